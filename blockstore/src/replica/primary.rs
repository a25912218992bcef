//! The primary's shell: see the module docs of `replica`.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{lock, MirrorLink, POLL};
use crate::device::DeviceError;
use crate::mirror::{
    Message, MirrorConfig, Operation, Primary, PrimaryEvent, StandbySync, SubmitError, Ticket,
    VolumeId,
};
use crate::volume::{MirrorCompletion, MirrorError, MirrorOperation, MirrorTicket, WriteMirror};

struct PrimaryState {
    core: Primary,
    peer: Option<u64>,
    stopped: bool,
}

/// The primary's side of a session's mirror, shared by the volume (as its mirror), the node's
/// timer task and the message handler.
pub struct PrimaryShell {
    state: Mutex<PrimaryState>,
    /// Wakes the threads blocked in `wait` or `submit` on any change of the core...
    changed: Condvar,
    /// ...and the futures of [`WriteMirror::completion`].
    changed_async: tokio::sync::Notify,
    link: Arc<dyn MirrorLink>,
}

impl PrimaryShell {
    pub fn new(
        volume: VolumeId,
        generation: u64,
        standby: Option<(u64, StandbySync)>,
        config: MirrorConfig,
        link: Arc<dyn MirrorLink>,
    ) -> Arc<PrimaryShell> {
        let core = Primary::new(
            Instant::now(),
            volume,
            generation,
            rand::random(),
            standby.map(|(_, sync)| sync),
            config,
        );
        let shell = Arc::new(PrimaryShell {
            state: Mutex::new(PrimaryState {
                core,
                peer: standby.map(|(peer, _)| peer),
                stopped: false,
            }),
            changed: Condvar::new(),
            changed_async: tokio::sync::Notify::new(),
            link,
        });
        shell.with_core(|_| ());
        shell
    }

    /// Runs `f` on the core, then sends what it produced and wakes the waiters.
    fn with_core<R>(&self, f: impl FnOnce(&mut Primary) -> R) -> R {
        let mut state = lock(&self.state);
        let result = f(&mut state.core);
        let now = Instant::now();
        let mut out = Vec::new();
        while let Some(message) = state.core.poll_transmit(now) {
            out.push(message);
        }
        let peer = state.peer;
        drop(state);
        self.notify();
        if let Some(peer) = peer {
            for message in out {
                self.link.send(peer, message);
            }
        }
        result
    }

    fn notify(&self) {
        self.changed.notify_all();
        self.changed_async.notify_waiters();
    }

    /// Whether `ticket` is complete (`Some(Ok)`), failed (`Some(Err)`), or still waits.
    fn outcome(state: &PrimaryState, ticket: Ticket) -> Option<Result<(), MirrorError>> {
        match state.core.is_complete(ticket) {
            Ok(true) => Some(Ok(())),
            Ok(false) if state.stopped => Some(Err(MirrorError("mirror stopped".into()))),
            Ok(false) => None,
            Err(error) => Some(Err(MirrorError(error.to_string()))),
        }
    }

    pub fn generation(&self) -> u64 {
        lock(&self.state).core.generation()
    }

    pub fn peer(&self) -> Option<u64> {
        lock(&self.state).peer
    }

    /// Handles a message from the standby; returns whether the core has events for
    /// [`PrimaryShell::tick`] (the node ticks at once then).
    pub fn handle_message(&self, message: Message) -> bool {
        self.with_core(|core| {
            core.handle_message(Instant::now(), message);
            core.has_events()
        })
    }

    /// Runs the core's timers; returns its events for the node.
    pub fn tick(&self) -> Vec<PrimaryEvent> {
        self.with_core(|core| {
            core.handle_timeout(Instant::now());
            std::iter::from_fn(|| core.poll_event()).collect()
        })
    }

    pub fn handle_standby_dropped(&self, generation: u64) {
        self.with_core(|core| core.handle_standby_dropped(generation));
        lock(&self.state).peer = None;
    }

    pub fn handle_standby_added(&self, generation: u64, peer: u64, sync: StandbySync) {
        lock(&self.state).peer = Some(peer);
        self.with_core(|core| core.handle_standby_added(Instant::now(), generation, sync));
    }

    pub fn handle_resync_recorded(&self) {
        self.with_core(|core| core.handle_resync_recorded());
    }

    /// A region of the resync compared and submitted; returns whether the core has events
    /// (the next regions).
    pub fn handle_region_compared(&self, region: u64, bytes_copied: u64) -> bool {
        self.with_core(|core| {
            core.handle_region_compared(Instant::now(), region, bytes_copied);
            core.has_events()
        })
    }

    /// Fences the core: every waiting and later operation fails. Call before fencing the
    /// volume (which waits for the calls in flight).
    pub fn fence(&self, current: u64) {
        self.with_core(|core| core.handle_fenced(current));
        lock(&self.state).stopped = true;
        self.notify();
    }

    pub fn resync_progress(&self) -> Option<crate::mirror::ResyncProgress> {
        lock(&self.state).core.resync_progress(Instant::now())
    }

    /// The last resync that completed, at its completion.
    pub fn last_resync(&self) -> Option<crate::mirror::ResyncProgress> {
        lock(&self.state).core.last_resync()
    }

    pub fn is_alone(&self) -> bool {
        lock(&self.state).core.is_alone()
    }

    pub fn is_resyncing(&self) -> bool {
        lock(&self.state).core.is_resyncing()
    }

    /// Waits (at most `wait`) until the primary may serve a read.
    pub fn wait_readable(&self, wait: Duration) -> Result<(), DeviceError> {
        let deadline = Instant::now() + wait;
        let mut state = lock(&self.state);
        loop {
            let now = Instant::now();
            if let Some(current) = state.core.fenced_by() {
                return Err(DeviceError::Fenced {
                    held: state.core.generation(),
                    current,
                });
            }
            if state.core.can_read(now) {
                return Ok(());
            }
            if now >= deadline || state.stopped {
                return Err(DeviceError::Unavailable(
                    "no read lease from the standby".into(),
                ));
            }
            state = self
                .changed
                .wait_timeout(state, POLL.min(deadline - now))
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }

    fn submit_with(
        &self,
        operation: MirrorOperation<'_>,
        resync: bool,
    ) -> Result<MirrorTicket, MirrorError> {
        let operation = match operation {
            MirrorOperation::Write { first_block, data } => Operation::Write {
                first_block,
                data: Bytes::copy_from_slice(data),
            },
            MirrorOperation::Unmap {
                first_block,
                block_count,
            } => Operation::Unmap {
                first_block,
                block_count,
            },
            MirrorOperation::Discard {
                first_block,
                block_count,
            } => Operation::Discard {
                first_block,
                block_count,
            },
            MirrorOperation::Flush => Operation::Flush,
        };
        loop {
            let result = self.with_core(|core| {
                let now = Instant::now();
                if resync {
                    core.submit_resync(now, operation.clone())
                } else {
                    core.submit(now, operation.clone())
                }
            });
            match result {
                Ok(ticket) => return Ok(ticket),
                Err(SubmitError::Full) => {
                    let state = lock(&self.state);
                    if state.stopped {
                        return Err(MirrorError("mirror stopped".into()));
                    }
                    // Backpressure: wait for acknowledgements to free room.
                    drop(
                        self.changed
                            .wait_timeout(state, POLL)
                            .unwrap_or_else(|poisoned| poisoned.into_inner()),
                    );
                }
                Err(error) => return Err(MirrorError(error.to_string())),
            }
        }
    }
}

impl WriteMirror for PrimaryShell {
    fn completion(self: Arc<Self>, ticket: Ticket) -> Option<MirrorCompletion> {
        Some(Box::pin(async move {
            loop {
                // Registered before looking, so a change in between still wakes it.
                let changed = self.changed_async.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if let Some(outcome) = Self::outcome(&lock(&self.state), ticket) {
                    return outcome;
                }
                changed.await;
            }
        }))
    }

    fn submit(
        &self,
        _generation: u64,
        operation: MirrorOperation<'_>,
    ) -> Result<MirrorTicket, MirrorError> {
        self.submit_with(operation, false)
    }

    fn submit_resync(
        &self,
        _generation: u64,
        operation: MirrorOperation<'_>,
    ) -> Result<MirrorTicket, MirrorError> {
        self.submit_with(operation, true)
    }

    fn wait(&self, ticket: Ticket) -> Result<(), MirrorError> {
        let mut state = lock(&self.state);
        loop {
            if let Some(outcome) = Self::outcome(&state, ticket) {
                return outcome;
            }
            state = self
                .changed
                .wait_timeout(state, POLL)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the primary's shell sent, and to whom.
    #[derive(Default)]
    struct Outbox(Mutex<Vec<(u64, Message)>>);

    impl MirrorLink for Outbox {
        fn send(&self, peer: u64, message: Message) {
            lock(&self.0).push((peer, message));
        }
    }

    const VOLUME: VolumeId = VolumeId([3; 16]);

    fn ack(applied: u64) -> Message {
        Message::Ack {
            volume: VOLUME,
            generation: 1,
            incarnation: 7,
            applied,
            durable: 0,
            stamp: 0,
            lease_ms: 900,
        }
    }

    /// A write's acknowledgement waits on a future, not a thread: it resolves when the standby
    /// acknowledges that write (not before, not for a later one), and fails once the mirror is
    /// fenced, so nothing is acknowledged at the old generation after a failover.
    #[tokio::test]
    async fn a_writes_wait_resolves_with_its_standby_and_fails_once_fenced() {
        let outbox = Arc::new(Outbox::default());
        let shell = PrimaryShell::new(
            VOLUME,
            1,
            Some((2, StandbySync::InSync)),
            MirrorConfig::default(),
            outbox.clone(),
        );
        let write = |block: u64| {
            let data = [block as u8; 4096];
            let operation = MirrorOperation::Write {
                first_block: block,
                data: &data,
            };
            shell.submit(1, operation).expect("room")
        };
        let (first, second) = (write(0), write(1));
        let sent: Vec<u64> = lock(&outbox.0)
            .iter()
            .filter_map(|(peer, message)| match message {
                Message::Operation { seq, .. } => Some(*peer * 100 + *seq),
                _ => None,
            })
            .collect();
        assert_eq!(sent, [201, 202], "both writes went to node 2 at once");
        let mut first_done = shell.clone().completion(first).expect("a future");
        let mut second_done = shell.clone().completion(second).expect("a future");
        assert!(futures::poll!(&mut first_done).is_pending());
        assert!(!shell.handle_message(ack(1)));
        assert_eq!(first_done.await.map_err(|e| e.0), Ok(()));
        assert!(futures::poll!(&mut second_done).is_pending());
        shell.fence(2);
        assert!(
            second_done.await.is_err(),
            "fenced before the standby held it"
        );
        let third = shell.clone().completion(second).expect("a future");
        assert!(third.await.is_err());
    }
}
