//! The primary's side of a mirror stream (see the module docs of `mirror`).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use super::{
    BlockDigest, Message, MirrorConfig, Operation, RefusedReason, RegionDigest, VolumeId,
    REGION_BLOCKS,
};

/// Names one submitted operation: its stream's generation and its place in that stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket {
    pub generation: u64,
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The in-flight byte limit is reached: wait for acknowledgements, then submit again.
    #[error("mirror stream full")]
    Full,
    /// A newer generation exists: this node must not acknowledge anything more.
    #[error("fenced: generation {held} is older than {current}")]
    Fenced { held: u64, current: u64 },
}

/// Why the standby is reported unreachable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnreachableReason {
    /// Nothing heard for `standby_timeout`.
    Silent,
    /// Heard, but operations made no progress for `progress_timeout`.
    NoProgress,
    /// It reported a storage failure, or refused an operation as not fitting its copy.
    Failed,
}

/// What the shell must act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PrimaryEvent {
    /// Ask the leader to commit "standby dropped" at `generation + 1`; everything not yet
    /// acknowledged stays pending until [`Primary::handle_standby_dropped`]. Repeated every
    /// `standby_timeout` while it lasts.
    StandbyUnreachable {
        generation: u64,
        reason: UnreachableReason,
    },
    /// The standby knows a newer generation: stop serving (Raft will say who serves now).
    Fenced { current: u64 },
    /// Resync: compare this region of the local copy with the standby's digest and submit what
    /// differs (with the region's stripes held), then call [`Primary::handle_region_compared`].
    ResyncCompare { region: u64, standby: RegionDigest },
    /// Every region is copied and durable on the standby: ask the leader to record it in sync.
    ResyncComplete { generation: u64 },
}

/// How far a resync is, for status and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResyncProgress {
    pub regions_done: u64,
    pub regions_total: u64,
    pub bytes_copied: u64,
    pub elapsed: Duration,
    pub bytes_per_second: u64,
    /// `None` until a rate is known.
    pub eta: Option<Duration>,
}

/// Where the standby of a new stream stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StandbySync {
    /// It holds the same copy (a non-persistent layer reset on both, or a persistent layer both
    /// homes of which are recorded in sync).
    InSync,
    /// An empty layer on the same base: copy every written block.
    Fresh { block_count: u64 },
    /// An older copy (a node that returns): compare region digests and copy what differs.
    Compare { block_count: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Mirrored,
    /// "Standby dropped" is committed: the only copy, nothing to wait for.
    Alone,
    Fenced {
        current: u64,
    },
}

struct Pending {
    seq: u64,
    operation: Operation,
}

struct Resync {
    fresh: bool,
    block_count: u64,
    region_count: u64,
    next_region: u64,
    /// Digest requests in the stream, by seq: (region, when submitted).
    requested: BTreeMap<u64, (u64, Instant)>,
    /// `ResyncCompare` events handed out and not yet compared.
    comparing: usize,
    regions_done: u64,
    bytes_copied: u64,
    started_at: Instant,
    /// The bandwidth limit lets the next region start at this time.
    budget_at: Instant,
    final_flush: Option<u64>,
    complete_reported: bool,
    /// When the final flush became durable.
    completed_at: Option<Instant>,
}

/// The primary's side of one session's mirror stream: sans-IO, driven by the shell.
pub struct Primary {
    volume: VolumeId,
    generation: u64,
    incarnation: u64,
    /// The standby core this stream talks to, from its first acknowledgement.
    standby_incarnation: Option<u64>,
    config: MirrorConfig,
    epoch: Instant,
    mode: Mode,
    next_seq: u64,
    /// Submitted and not complete, in seq order, contiguous.
    pending: VecDeque<Pending>,
    next_send: u64,
    applied: u64,
    durable: u64,
    in_flight_bytes: u64,
    last_heard: Instant,
    last_progress: Instant,
    retransmit_at: Option<Instant>,
    next_heartbeat: Instant,
    lease_until: Option<Instant>,
    next_unreachable_report: Option<Instant>,
    events: VecDeque<PrimaryEvent>,
    resync: Option<Resync>,
    last_resync: Option<ResyncProgress>,
}

impl Primary {
    /// A primary at `generation`; `standby` is `None` when it serves alone (no standby, or
    /// "standby dropped" committed). `incarnation` is random per core (see the module docs).
    pub fn new(
        now: Instant,
        volume: VolumeId,
        generation: u64,
        incarnation: u64,
        standby: Option<StandbySync>,
        config: MirrorConfig,
    ) -> Primary {
        let mut primary = Primary {
            volume,
            generation,
            incarnation,
            standby_incarnation: None,
            config,
            epoch: now,
            mode: Mode::Alone,
            next_seq: 1,
            pending: VecDeque::new(),
            next_send: 1,
            applied: 0,
            durable: 0,
            in_flight_bytes: 0,
            last_heard: now,
            last_progress: now,
            retransmit_at: None,
            next_heartbeat: now,
            lease_until: None,
            next_unreachable_report: None,
            events: VecDeque::new(),
            resync: None,
            last_resync: None,
        };
        if let Some(sync) = standby {
            primary.start_stream(now, generation, sync);
        }
        primary
    }

    pub fn volume(&self) -> VolumeId {
        self.volume
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether a standby holds (or is being brought up to) a second copy.
    pub fn is_mirrored(&self) -> bool {
        self.mode == Mode::Mirrored
    }

    /// Whether this primary serves alone: its session is degraded (one copy).
    pub fn is_alone(&self) -> bool {
        self.mode == Mode::Alone
    }

    pub fn fenced_by(&self) -> Option<u64> {
        match self.mode {
            Mode::Fenced { current } => Some(current),
            _ => None,
        }
    }

    /// Nothing submitted waits for the standby (every operation complete).
    pub fn is_idle(&self) -> bool {
        self.pending.is_empty()
    }

    /// Payload bytes the standby has not applied yet.
    pub fn in_flight_bytes(&self) -> u64 {
        self.in_flight_bytes
    }

    fn stamp(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_micros() as u64
    }

    fn start_stream(&mut self, now: Instant, generation: u64, sync: StandbySync) {
        self.generation = generation;
        self.mode = Mode::Mirrored;
        self.standby_incarnation = None;
        self.next_seq = 1;
        self.next_send = 1;
        self.applied = 0;
        self.durable = 0;
        self.pending.clear();
        self.in_flight_bytes = 0;
        self.last_heard = now;
        self.last_progress = now;
        self.retransmit_at = None;
        self.next_heartbeat = now;
        self.lease_until = None;
        self.next_unreachable_report = None;
        self.resync = match sync {
            StandbySync::InSync => None,
            StandbySync::Fresh { block_count } | StandbySync::Compare { block_count } => {
                Some(Resync {
                    fresh: matches!(sync, StandbySync::Fresh { .. }),
                    block_count,
                    region_count: block_count.div_ceil(REGION_BLOCKS),
                    next_region: 0,
                    requested: BTreeMap::new(),
                    comparing: 0,
                    regions_done: 0,
                    bytes_copied: 0,
                    started_at: now,
                    budget_at: now,
                    final_flush: None,
                    complete_reported: false,
                    completed_at: None,
                })
            }
        };
        self.drive_resync(now);
    }

    /// Queues an operation the primary has applied locally. Call it with the stripes of the
    /// blocks it touches still held. The operation is acknowledged once
    /// [`Primary::is_complete`] says so.
    pub fn submit(&mut self, now: Instant, operation: Operation) -> Result<Ticket, SubmitError> {
        self.enqueue(now, operation, true)
    }

    /// Submits an operation of a resync's region copy: never refused for space, since what a
    /// resync has in flight is already bounded: regions are handed out only while less than
    /// half of [`MirrorConfig::in_flight_bytes_max`] is in flight, at most
    /// [`MirrorConfig::resync_digests_in_flight_max`] at once. Call it with the region's
    /// stripes held, between [`PrimaryEvent::ResyncCompare`] and
    /// [`Primary::handle_region_compared`].
    pub fn submit_resync(
        &mut self,
        now: Instant,
        operation: Operation,
    ) -> Result<Ticket, SubmitError> {
        self.enqueue(now, operation, false)
    }

    fn enqueue(
        &mut self,
        now: Instant,
        operation: Operation,
        bounded: bool,
    ) -> Result<Ticket, SubmitError> {
        match self.mode {
            Mode::Fenced { current } => Err(SubmitError::Fenced {
                held: self.generation,
                current,
            }),
            Mode::Alone => Ok(self.take_seq()),
            Mode::Mirrored => {
                let bytes = operation.payload_bytes() as u64;
                if bounded
                    && self.in_flight_bytes > 0
                    && self.in_flight_bytes + bytes > self.config.in_flight_bytes_max
                {
                    return Err(SubmitError::Full);
                }
                if self.applied + 1 == self.next_seq {
                    // Nothing was outstanding: progress is measured from now.
                    self.last_progress = now;
                }
                let ticket = self.take_seq();
                self.in_flight_bytes += bytes;
                self.pending.push_back(Pending {
                    seq: ticket.seq,
                    operation,
                });
                Ok(ticket)
            }
        }
    }

    fn take_seq(&mut self) -> Ticket {
        let seq = self.next_seq;
        self.next_seq += 1;
        Ticket {
            generation: self.generation,
            seq,
        }
    }

    /// Whether the standby holds the operation (durably, for a flush); an error once fenced.
    /// Operations of an older stream completed when it ended (standby dropped or replaced).
    pub fn is_complete(&self, ticket: Ticket) -> Result<bool, SubmitError> {
        if let Mode::Fenced { current } = self.mode {
            return Err(SubmitError::Fenced {
                held: self.generation,
                current,
            });
        }
        if ticket.generation < self.generation || self.mode == Mode::Alone {
            return Ok(true);
        }
        if self.resync.as_ref().is_some_and(|resync| {
            resync
                .final_flush
                .is_none_or(|final_flush| ticket.seq < final_flush)
        }) {
            // The standby is being resynced and cannot be promoted: the session has one copy
            // and the primary answers alone, as after "standby dropped" (a client's flush does
            // not wait behind the resync's data). The operation still goes to the standby
            // in order, before the resync's final flush, so the standby holds it once the
            // resync completes; what comes after the final flush waits for the standby again.
            return Ok(true);
        }
        let Some(front) = self.pending.front() else {
            return Ok(ticket.seq < self.next_seq);
        };
        if ticket.seq < front.seq {
            return Ok(true);
        }
        let Some(entry) = self.pending.get((ticket.seq - front.seq) as usize) else {
            return Ok(false);
        };
        Ok(self.entry_complete(entry))
    }

    fn entry_complete(&self, entry: &Pending) -> bool {
        match entry.operation {
            Operation::Flush => self.durable >= entry.seq,
            _ => self.applied >= entry.seq,
        }
    }

    /// Whether the primary may serve a read now: it serves alone, its standby is still being
    /// resynced (and so cannot be promoted), or it holds a lease.
    pub fn can_read(&self, now: Instant) -> bool {
        match self.mode {
            Mode::Alone => true,
            Mode::Fenced { .. } => false,
            Mode::Mirrored => {
                // A standby still being resynced cannot be promoted, so it needs no lease; from
                // the moment its completion is reported, Raft may record it in sync, so it does.
                let resyncing = self
                    .resync
                    .as_ref()
                    .is_some_and(|resync| !resync.complete_reported);
                resyncing || self.lease_until.is_some_and(|until| now < until)
            }
        }
    }

    pub fn lease_until(&self) -> Option<Instant> {
        self.lease_until
    }

    /// "Standby dropped" is committed at `generation`: everything pending completes, and from
    /// now on operations complete at once (one copy) until a standby is added.
    pub fn handle_standby_dropped(&mut self, generation: u64) {
        if generation <= self.generation || matches!(self.mode, Mode::Fenced { .. }) {
            return;
        }
        self.generation = generation;
        self.mode = Mode::Alone;
        self.pending.clear();
        self.in_flight_bytes = 0;
        self.resync = None;
        self.retransmit_at = None;
        self.next_unreachable_report = None;
    }

    /// A standby (new, returning, or a replacement of the current one) is committed at
    /// `generation`: a new stream starts. Operations pending in the old stream complete (the
    /// commit made this node the only complete copy until the new standby is in sync).
    pub fn handle_standby_added(&mut self, now: Instant, generation: u64, sync: StandbySync) {
        if generation <= self.generation || matches!(self.mode, Mode::Fenced { .. }) {
            return;
        }
        self.start_stream(now, generation, sync);
    }

    /// Raft says a newer generation exists in which this node is not this session's primary.
    pub fn handle_fenced(&mut self, current: u64) {
        if current > self.generation && !matches!(self.mode, Mode::Fenced { .. }) {
            self.mode = Mode::Fenced { current };
            self.pending.clear();
            self.in_flight_bytes = 0;
            self.resync = None;
            self.events.push_back(PrimaryEvent::Fenced { current });
        }
    }

    pub fn handle_message(&mut self, now: Instant, message: Message) {
        if message.volume() != self.volume || message.generation() != self.generation {
            return;
        }
        if self.mode != Mode::Mirrored {
            return;
        }
        match message {
            Message::Ack {
                incarnation,
                applied,
                durable,
                stamp,
                lease_ms,
                ..
            } => {
                if *self.standby_incarnation.get_or_insert(incarnation) != incarnation {
                    // The standby restarted within this stream: what it acknowledged is gone.
                    self.report_unreachable(now, UnreachableReason::Failed);
                    return;
                }
                self.handle_ack(now, applied, durable, stamp, lease_ms)
            }
            Message::Digest {
                seq,
                region,
                digest,
                ..
            } => {
                let Some(resync) = &mut self.resync else {
                    return;
                };
                if resync.requested.get(&seq).map(|r| r.0) != Some(region) {
                    return;
                }
                resync.requested.remove(&seq);
                let expected = region_blocks(resync.block_count, region);
                if digest.blocks.len() as u64 != expected {
                    // A copy of another size: the standby cannot hold this volume.
                    self.report_unreachable(now, UnreachableReason::Failed);
                    return;
                }
                resync.comparing += 1;
                self.events.push_back(PrimaryEvent::ResyncCompare {
                    region,
                    standby: digest,
                });
            }
            Message::Refused {
                current, reason, ..
            } => match reason {
                RefusedReason::Fenced if current > self.generation => {
                    self.handle_fenced(current);
                }
                RefusedReason::Storage
                | RefusedReason::BadOperation
                | RefusedReason::StreamLost => {
                    self.report_unreachable(now, UnreachableReason::Failed);
                }
                // Transient: the standby has not set the stream up yet. Timeouts escalate.
                _ => {}
            },
            Message::Operation { .. } | Message::Heartbeat { .. } => {}
        }
    }

    fn handle_ack(&mut self, now: Instant, applied: u64, durable: u64, stamp: u64, lease_ms: u32) {
        let sent_last = self.next_seq - 1;
        if applied > sent_last || durable > applied || stamp > self.stamp(now) {
            // Acknowledges what was never sent: not from this stream's standby. Ignore it.
            tracing::warn!(volume = %self.volume, applied, durable, sent_last, "mirror ack out of range");
            return;
        }
        self.last_heard = now;
        let granted = Duration::from_millis(lease_ms as u64)
            .min(self.config.lease)
            .mul_f64(self.config.lease_use_per_mille as f64 / 1000.0);
        let until = self.epoch + Duration::from_micros(stamp) + granted;
        if self.lease_until.is_none_or(|current| until > current) {
            self.lease_until = Some(until);
        }
        if applied > self.applied {
            for entry in &self.pending {
                if entry.seq > self.applied && entry.seq <= applied {
                    self.in_flight_bytes -= entry.operation.payload_bytes() as u64;
                }
            }
            self.applied = applied;
            self.last_progress = now;
            self.next_send = self.next_send.max(applied + 1);
            self.retransmit_at =
                (self.applied + 1 < self.next_send).then(|| now + self.config.retransmit_timeout);
        }
        self.durable = self.durable.max(durable);
        while self
            .pending
            .front()
            .is_some_and(|entry| self.entry_complete(entry))
        {
            self.pending.pop_front();
        }
        if now.saturating_duration_since(self.last_progress) < self.config.progress_timeout {
            self.next_unreachable_report = None;
        }
        self.drive_resync(now);
    }

    fn report_unreachable(&mut self, now: Instant, reason: UnreachableReason) {
        if self.next_unreachable_report.is_some_and(|at| now < at) {
            return;
        }
        self.next_unreachable_report = Some(now + self.config.standby_timeout);
        tracing::warn!(volume = %self.volume, generation = self.generation, ?reason, "mirror standby unreachable");
        self.events.push_back(PrimaryEvent::StandbyUnreachable {
            generation: self.generation,
            reason,
        });
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.mode != Mode::Mirrored {
            return;
        }
        let outstanding = self.applied + 1 < self.next_send;
        if outstanding && self.retransmit_at.is_some_and(|at| at <= now) {
            // Go back to the first operation the standby has not applied.
            self.next_send = self.applied + 1;
            self.retransmit_at = Some(now + self.config.retransmit_timeout);
        }
        if now.saturating_duration_since(self.last_heard) >= self.config.standby_timeout {
            self.report_unreachable(now, UnreachableReason::Silent);
        } else if self.applied + 1 < self.next_seq
            && now.saturating_duration_since(self.last_progress) >= self.config.progress_timeout
        {
            self.report_unreachable(now, UnreachableReason::NoProgress);
        }
        self.drive_resync(now);
    }

    /// The next time [`Primary::handle_timeout`] has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.mode != Mode::Mirrored {
            return None;
        }
        let mut at = self.next_heartbeat;
        let mut consider = |candidate: Instant| at = at.min(candidate);
        if let Some(retransmit) = self.retransmit_at {
            consider(retransmit);
        }
        consider(
            self.next_unreachable_report
                .unwrap_or(self.last_heard + self.config.standby_timeout),
        );
        if self.applied + 1 < self.next_seq {
            consider(self.last_progress + self.config.progress_timeout);
        }
        if let Some(resync) = &self.resync {
            if resync.next_region < resync.region_count {
                consider(resync.budget_at);
            }
        }
        Some(at)
    }

    /// The next message to send to the standby.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Message> {
        if self.mode != Mode::Mirrored {
            return None;
        }
        if self.next_send < self.next_seq {
            let front = self.pending.front()?.seq;
            let Some(entry) = self.pending.get((self.next_send - front) as usize) else {
                // Everything from here was completed and dropped (cannot happen: acks move
                // next_send past it). Skip ahead rather than resend.
                self.next_send = self.next_seq;
                return None;
            };
            let message = Message::Operation {
                volume: self.volume,
                generation: self.generation,
                incarnation: self.incarnation,
                seq: entry.seq,
                stamp: self.stamp(now),
                operation: entry.operation.clone(),
            };
            self.next_send += 1;
            if self.retransmit_at.is_none() {
                self.retransmit_at = Some(now + self.config.retransmit_timeout);
            }
            return Some(message);
        }
        if now >= self.next_heartbeat {
            self.next_heartbeat = now + self.config.heartbeat_interval;
            return Some(Message::Heartbeat {
                volume: self.volume,
                generation: self.generation,
                incarnation: self.incarnation,
                seq_sent: self.next_send - 1,
                stamp: self.stamp(now),
            });
        }
        None
    }

    /// Whether [`Primary::poll_event`] has something: a shell that polls events on a timer
    /// can poll at once instead (a resync's next regions wait for it).
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    pub fn poll_event(&mut self) -> Option<PrimaryEvent> {
        self.events.pop_front()
    }

    /// A region handed out by [`PrimaryEvent::ResyncCompare`] is compared and what differed
    /// was submitted (`bytes_copied` of block data).
    pub fn handle_region_compared(&mut self, now: Instant, region: u64, bytes_copied: u64) {
        let limit = self.config.resync_bytes_per_second_max;
        let Some(resync) = &mut self.resync else {
            return;
        };
        if resync.comparing == 0 || region >= resync.region_count {
            return;
        }
        resync.comparing -= 1;
        resync.regions_done += 1;
        resync.bytes_copied += bytes_copied;
        if limit > 0 {
            let cost = Duration::from_secs_f64(bytes_copied as f64 / limit as f64);
            resync.budget_at = resync.budget_at.max(now) + cost;
        }
        self.drive_resync(now);
    }

    pub fn resync_progress(&self, now: Instant) -> Option<ResyncProgress> {
        self.resync.as_ref().map(|resync| resync.progress(now))
    }

    /// The last resync that completed (its figures at completion).
    pub fn last_resync(&self) -> Option<ResyncProgress> {
        self.last_resync
    }

    fn drive_resync(&mut self, now: Instant) {
        if self.mode != Mode::Mirrored {
            return;
        }
        let Some(resync) = &mut self.resync else {
            return;
        };
        // A digest the standby applied but whose answer was lost is asked for again.
        let lost: Vec<(u64, u64)> = resync
            .requested
            .iter()
            .filter(|(seq, (_, at))| {
                **seq <= self.applied && now >= *at + self.config.retransmit_timeout
            })
            .map(|(seq, (region, _))| (*seq, *region))
            .collect();
        let mut requests = Vec::new();
        for (seq, region) in lost {
            resync.requested.remove(&seq);
            requests.push(region);
        }
        let window = self.config.resync_digests_in_flight_max;
        // The copy's data is submitted unbounded (under a region's stripes, it cannot wait),
        // so a region is handed out only while the stream has room for it: half of what the
        // stream may hold, counting a whole region for each one handed out and not compared
        // yet; the other half stays for the client's writes. Acknowledgements hand out the
        // next.
        let resync_bytes_max = self.config.in_flight_bytes_max / 2;
        let region_bytes = REGION_BLOCKS * 4096;
        loop {
            let out = (resync.requested.len() + resync.comparing + requests.len()) as u64;
            let room = self.in_flight_bytes + out * region_bytes < resync_bytes_max;
            if resync.next_region >= resync.region_count
                || out as usize >= window
                || !room
                || now < resync.budget_at
            {
                break;
            }
            let region = resync.next_region;
            resync.next_region += 1;
            if resync.fresh {
                resync.comparing += 1;
                let blocks = region_blocks(resync.block_count, region);
                self.events.push_back(PrimaryEvent::ResyncCompare {
                    region,
                    standby: RegionDigest {
                        blocks: vec![BlockDigest::Base; blocks as usize],
                    },
                });
            } else {
                requests.push(region);
            }
        }
        let all_compared = resync.regions_done == resync.region_count;
        let final_flush = resync.final_flush;
        for region in requests {
            let ticket = self.push_internal(now, Operation::Digest { region });
            if let Some(resync) = &mut self.resync {
                resync.requested.insert(ticket, (region, now));
            }
        }
        if all_compared && final_flush.is_none() {
            let seq = self.push_internal(now, Operation::Flush);
            if let Some(resync) = &mut self.resync {
                resync.final_flush = Some(seq);
            }
        }
        let durable = self.durable;
        let generation = self.generation;
        let Some(resync) = &mut self.resync else {
            return;
        };
        if let Some(flush) = resync.final_flush {
            if durable >= flush && !resync.complete_reported {
                resync.complete_reported = true;
                resync.completed_at = Some(now);
                self.events
                    .push_back(PrimaryEvent::ResyncComplete { generation });
            }
        }
    }

    /// Submits an operation of the core's own (never refused for space: it carries no data).
    fn push_internal(&mut self, now: Instant, operation: Operation) -> u64 {
        // Only called while mirrored (never fenced), so it cannot fail.
        self.enqueue(now, operation, false)
            .map_or(self.next_seq - 1, |ticket| ticket.seq)
    }

    /// The standby is in sync and recorded so (the resync's completion is committed).
    pub fn handle_resync_recorded(&mut self) {
        if self
            .resync
            .as_ref()
            .is_some_and(|resync| resync.complete_reported)
        {
            // Complete, so `completed_at` is set and the figures are those at completion.
            self.last_resync = self.resync.take().map(|r| r.progress(r.started_at));
        }
    }

    pub fn is_resyncing(&self) -> bool {
        self.resync.is_some()
    }
}

impl Resync {
    fn progress(&self, now: Instant) -> ResyncProgress {
        let now = self.completed_at.unwrap_or(now);
        let elapsed = now.saturating_duration_since(self.started_at);
        let seconds = elapsed.as_secs_f64();
        let bytes_per_second = if seconds > 0.0 {
            (self.bytes_copied as f64 / seconds) as u64
        } else {
            0
        };
        let eta = (self.regions_done > 0 && seconds > 0.0).then(|| {
            let per_region = seconds / self.regions_done as f64;
            Duration::from_secs_f64(per_region * (self.region_count - self.regions_done) as f64)
        });
        ResyncProgress {
            regions_done: self.regions_done,
            regions_total: self.region_count,
            bytes_copied: self.bytes_copied,
            elapsed,
            bytes_per_second,
            eta,
        }
    }
}

/// Blocks in `region` of a copy of `block_count` blocks.
pub fn region_blocks(block_count: u64, region: u64) -> u64 {
    block_count
        .saturating_sub(region * REGION_BLOCKS)
        .min(REGION_BLOCKS)
}
