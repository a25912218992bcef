//! The standby's side of a mirror stream (see the module docs of `mirror`).

use std::collections::VecDeque;
use std::time::Instant;

use super::{Message, MirrorConfig, Operation, RefusedReason, RegionDigest, VolumeId};

/// What the shell must do to its copy, strictly in the order given, reporting each with
/// [`Standby::handle_applied`] (and a flush also with [`Standby::handle_flushed`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StandbyAction {
    /// Apply a write, unmap or discard.
    Apply { seq: u64, operation: Operation },
    /// Make everything applied before it durable. It may run while later operations are
    /// applied, as long as it starts after every earlier one was.
    Flush { seq: u64 },
    /// Compute the digest of `region` of the copy as it stands now, and hand it to
    /// [`Standby::handle_digest`].
    Digest { seq: u64, region: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StandbyEvent {
    /// Nothing from the primary for `primary_timeout`: ask the leader to fail the session over
    /// to this node (at `generation + 1`). Repeated every `primary_timeout` while it lasts.
    PrimarySilent { generation: u64 },
    /// Applying or flushing failed: the copy cannot be trusted and the node must stop.
    StorageFailed { seq: u64 },
}

/// The standby's side of one session's mirror stream: sans-IO, driven by the shell.
pub struct Standby {
    volume: VolumeId,
    generation: u64,
    incarnation: u64,
    /// The primary core of this stream, from its first message.
    primary_incarnation: Option<u64>,
    /// The stream is lost for this core (its node restarted, or the primary's did).
    lost: bool,
    /// It saw the stream from its first operation: only then does its copy hold everything
    /// the primary acknowledged, and only then may it ask for a failover.
    from_start: bool,
    config: MirrorConfig,
    next_expected: u64,
    /// Handed to the shell, not yet reported applied.
    handed_out: u64,
    applied: u64,
    durable: u64,
    stamp: u64,
    last_heard: Instant,
    granted_until: Instant,
    next_silent_report: Option<Instant>,
    ack_due: bool,
    failed: bool,
    promoted: bool,
    actions: VecDeque<StandbyAction>,
    out: VecDeque<Message>,
    events: VecDeque<StandbyEvent>,
}

impl Standby {
    /// A standby at `generation`. It counts as having granted a lease just now: a node that
    /// restarted may have granted one before it crashed, and must not be promoted before that
    /// one ran out. `restarted`: the generation is older than this node's start, so the
    /// stream's start is gone with the previous run; the core refuses the stream
    /// ([`RefusedReason::StreamLost`]) and never reports the primary silent.
    pub fn new(
        now: Instant,
        volume: VolumeId,
        generation: u64,
        incarnation: u64,
        restarted: bool,
        config: MirrorConfig,
    ) -> Standby {
        Standby {
            volume,
            generation,
            incarnation,
            primary_incarnation: None,
            lost: restarted,
            from_start: false,
            next_expected: 1,
            handed_out: 0,
            applied: 0,
            durable: 0,
            stamp: 0,
            last_heard: now,
            granted_until: now + config.lease,
            next_silent_report: None,
            ack_due: false,
            failed: false,
            promoted: false,
            actions: VecDeque::new(),
            out: VecDeque::new(),
            events: VecDeque::new(),
            config,
        }
    }

    pub fn volume(&self) -> VolumeId {
        self.volume
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Highest seq applied, in order.
    /// Whether this core refuses its stream for good (see [`Standby::new`]).
    pub fn is_lost(&self) -> bool {
        self.lost
    }

    pub fn applied(&self) -> u64 {
        self.applied
    }

    pub fn durable(&self) -> u64 {
        self.durable
    }

    pub fn handle_message(&mut self, now: Instant, message: Message) {
        if message.volume() != self.volume {
            return;
        }
        let generation = message.generation();
        let is_stream = matches!(
            message,
            Message::Operation { .. } | Message::Heartbeat { .. }
        );
        if !is_stream {
            return;
        }
        let incarnation = match &message {
            Message::Operation { incarnation, .. } | Message::Heartbeat { incarnation, .. } => {
                *incarnation
            }
            _ => 0,
        };
        if generation == self.generation
            && !self.lost
            && *self.primary_incarnation.get_or_insert(incarnation) != incarnation
        {
            // The primary restarted within this generation: it lost its part of the stream.
            self.lost = true;
        }
        if generation != self.generation || self.failed || self.promoted || self.lost {
            let (reason, current) = if self.failed {
                (RefusedReason::Storage, self.generation)
            } else if self.lost && generation == self.generation {
                (RefusedReason::StreamLost, self.generation)
            } else if self.promoted && generation <= self.generation {
                // Failed over: whatever the new generation is, it is newer than this.
                (RefusedReason::Fenced, self.generation + 1)
            } else if generation < self.generation {
                (RefusedReason::Fenced, self.generation)
            } else {
                (RefusedReason::NotYet, self.generation)
            };
            self.out.push_back(Message::Refused {
                volume: self.volume,
                generation,
                current,
                reason,
            });
            return;
        }
        self.last_heard = now;
        self.next_silent_report = None;
        self.granted_until = self.granted_until.max(now + self.config.lease);
        match message {
            Message::Operation {
                seq,
                stamp,
                operation,
                ..
            } => {
                self.stamp = self.stamp.max(stamp);
                if seq == self.next_expected {
                    if seq == 1 {
                        self.from_start = true;
                    }
                    self.next_expected += 1;
                    self.handed_out = seq;
                    self.actions.push_back(match operation {
                        Operation::Flush => StandbyAction::Flush { seq },
                        Operation::Digest { region } => StandbyAction::Digest { seq, region },
                        operation => StandbyAction::Apply { seq, operation },
                    });
                } else {
                    // A duplicate (acknowledge again) or a gap (dropped: the primary goes back
                    // to `applied + 1` when it sees no progress).
                    self.ack_due = true;
                }
            }
            Message::Heartbeat {
                stamp, seq_sent, ..
            } => {
                if seq_sent == 0 && self.next_expected == 1 {
                    self.from_start = true;
                }
                self.stamp = self.stamp.max(stamp);
                self.ack_due = true;
            }
            _ => {}
        }
    }

    pub fn poll_action(&mut self) -> Option<StandbyAction> {
        self.actions.pop_front()
    }

    /// The operation at `seq` (the next one handed out) was applied, or failed.
    pub fn handle_applied(&mut self, seq: u64, result: Result<(), String>) {
        if self.failed {
            return;
        }
        if let Err(error) = result {
            self.fail(seq, &error);
            return;
        }
        if seq == self.applied + 1 && seq <= self.handed_out {
            self.applied = seq;
            self.ack_due = true;
        }
    }

    /// The flush at `seq` made everything before it durable, or failed.
    pub fn handle_flushed(&mut self, seq: u64, result: Result<(), String>) {
        if self.failed {
            return;
        }
        if let Err(error) = result {
            self.fail(seq, &error);
            return;
        }
        if seq <= self.applied && seq > self.durable {
            self.durable = seq;
            self.ack_due = true;
        }
    }

    /// The digest asked for at `seq`; counts as applying it.
    pub fn handle_digest(&mut self, seq: u64, region: u64, digest: RegionDigest) {
        if self.failed {
            return;
        }
        self.handle_applied(seq, Ok(()));
        self.out.push_back(Message::Digest {
            volume: self.volume,
            generation: self.generation,
            seq,
            region,
            digest,
        });
    }

    fn fail(&mut self, seq: u64, error: &str) {
        tracing::error!(volume = %self.volume, seq, %error, "mirror standby storage failed");
        self.failed = true;
        self.actions.clear();
        self.events.push_back(StandbyEvent::StorageFailed { seq });
        self.out.push_back(Message::Refused {
            volume: self.volume,
            generation: self.generation,
            current: self.generation,
            reason: RefusedReason::Storage,
        });
    }

    pub fn poll_transmit(&mut self) -> Option<Message> {
        if let Some(message) = self.out.pop_front() {
            return Some(message);
        }
        if self.ack_due && !self.failed && !self.promoted && !self.lost {
            self.ack_due = false;
            return Some(Message::Ack {
                volume: self.volume,
                generation: self.generation,
                incarnation: self.incarnation,
                applied: self.applied,
                durable: self.durable,
                stamp: self.stamp,
                lease_ms: self.config.lease.as_millis() as u32,
            });
        }
        None
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.failed || self.promoted || self.lost {
            return;
        }
        // A core that joined a stream midway (its node restarted without knowing) lacks
        // operations the primary acknowledged: it must never be promoted.
        let silent = self.from_start
            && now.saturating_duration_since(self.last_heard) >= self.config.primary_timeout;
        if silent && self.next_silent_report.is_none_or(|at| now >= at) {
            self.next_silent_report = Some(now + self.config.primary_timeout);
            tracing::warn!(volume = %self.volume, generation = self.generation, "mirror primary silent");
            self.events.push_back(StandbyEvent::PrimarySilent {
                generation: self.generation,
            });
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.failed || self.promoted || self.lost {
            return None;
        }
        Some(
            self.next_silent_report
                .unwrap_or(self.last_heard + self.config.primary_timeout),
        )
    }

    pub fn poll_event(&mut self) -> Option<StandbyEvent> {
        self.events.pop_front()
    }

    /// The session fails over to this node: it stops taking the old primary's stream and may
    /// serve from the returned instant on, when every lease it granted has run out.
    pub fn promote(&mut self, now: Instant) -> Instant {
        self.promoted = true;
        self.actions.clear();
        self.granted_until.max(now)
    }
}
