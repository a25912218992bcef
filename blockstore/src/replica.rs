//! The threaded shells around the mirror cores (`crate::mirror`) and the device a node
//! serves for one session, on the primary's path or the standby's.
//!
//! - [`PrimaryShell`] owns a [`Primary`] core behind a mutex and is the volume's
//!   [`WriteMirror`]: `submit` queues an operation (waiting while the stream is full), `wait`
//!   blocks the calling I/O thread until the core says the standby holds it. Messages the core
//!   produces go out through a [`MirrorLink`] at once.
//! - [`PrimaryShell`] is also what a started write waits on without a thread
//!   ([`WriteMirror::completion`]): the iSCSI connection task polls the waits of all its
//!   writes at once, so 32 writes in flight cost one round trip to the standby, not 32.
//! - [`StandbyShell`] owns a [`Standby`] core and the standby's copy: messages are handled in
//!   arrival order on a blocking-pool thread, in batches (what arrived while the last batch
//!   was applied), and the core's actions are applied to the copy in that same order, under
//!   the core's lock; one acknowledgement answers a batch.
//! - [`SessionDevice`] is the LUN of a session on one node: on the standby it holds I/O (for
//!   at most [`STANDBY_WAIT`]) until a failover makes this node primary; on the primary it
//!   serves once the old primary's lease has run out, and reads only within its own lease.
//!
//! The node drives the shells' timers ([`PrimaryShell::tick`], [`StandbyShell::tick`]), carries
//! their messages between nodes, and turns their events into Raft proposals. This module
//! knows nothing about Raft or the transport.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::device::{AccessState, BlockDevice, DeviceError, PortGroups, WriteCompletion};
use crate::mirror::{
    Message, MirrorConfig, Operation, Primary, PrimaryEvent, Standby, StandbyAction, StandbyEvent,
    StandbySync, SubmitError, Ticket, VolumeId,
};
use crate::volume::{
    MirrorCompletion, MirrorError, MirrorOperation, MirrorTicket, Volume, WriteMirror,
};

/// How long the standby's path holds a read or write before answering NOT READY (asymmetric
/// access state transition), so the initiator retries: longer than a failover takes, shorter
/// than iPXE's SAN command timeout (15 s).
pub const STANDBY_WAIT: Duration = Duration::from_secs(12);
/// How long a read on the primary waits for a lease before answering NOT READY.
const LEASE_WAIT: Duration = Duration::from_secs(10);
/// Longest a waiting thread sleeps before looking again (the core is also re-checked on every
/// change it signals).
const POLL: Duration = Duration::from_millis(50);

/// What the shells need from the node: a way to the peer.
pub trait MirrorLink: Send + Sync + 'static {
    /// Sends a message to node `peer`. Never blocks; may drop it (the protocol retransmits).
    fn send(&self, peer: u64, message: Message);
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

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

struct StandbyState {
    core: Standby,
}

/// Messages from the primary not handled yet, and whether a thread is draining them.
#[derive(Default)]
struct Inbox {
    messages: Vec<Message>,
    draining: bool,
}

/// The standby's side of a session's mirror: the core and the copy it keeps up to date.
pub struct StandbyShell {
    state: Mutex<StandbyState>,
    inbox: Mutex<Inbox>,
    volume: Arc<Volume>,
    peer: u64,
    link: Arc<dyn MirrorLink>,
}

impl StandbyShell {
    /// `restarted`: the session's generation is older than this node's start (see
    /// [`Standby::new`]).
    pub fn new(
        volume_id: VolumeId,
        generation: u64,
        restarted: bool,
        volume: Arc<Volume>,
        peer: u64,
        config: MirrorConfig,
        link: Arc<dyn MirrorLink>,
    ) -> Arc<StandbyShell> {
        let core = Standby::new(
            Instant::now(),
            volume_id,
            generation,
            rand::random(),
            restarted,
            config,
        );
        Arc::new(StandbyShell {
            state: Mutex::new(StandbyState { core }),
            inbox: Mutex::default(),
            volume,
            peer,
            link,
        })
    }

    pub fn generation(&self) -> u64 {
        lock(&self.state).core.generation()
    }

    pub fn peer(&self) -> u64 {
        self.peer
    }

    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }

    /// Takes a message from the primary; returns at once. The messages are handled in
    /// arrival order on a blocking-pool thread (inline without a tokio runtime), in batches:
    /// whatever arrived while the last batch was applied is applied next and acknowledged
    /// with one message. The core's events (a storage failure among them) come out of
    /// [`StandbyShell::tick`].
    pub fn handle_message(self: &Arc<Self>, message: Message) {
        let start = {
            let mut inbox = lock(&self.inbox);
            inbox.messages.push(message);
            !std::mem::replace(&mut inbox.draining, true)
        };
        if !start {
            return;
        }
        let shell = self.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(move || shell.drain())),
            Err(_) => shell.drain(),
        }
    }

    /// Handles the inbox until it is empty.
    fn drain(&self) {
        loop {
            let batch = {
                let mut inbox = lock(&self.inbox);
                if inbox.messages.is_empty() {
                    inbox.draining = false;
                    return;
                }
                std::mem::take(&mut inbox.messages)
            };
            let mut state = lock(&self.state);
            for message in batch {
                state.core.handle_message(Instant::now(), message);
                self.apply(&mut state);
            }
            self.transmit(&mut state);
        }
    }

    pub fn tick(&self) -> Vec<StandbyEvent> {
        let mut state = lock(&self.state);
        state.core.handle_timeout(Instant::now());
        self.apply(&mut state);
        self.transmit(&mut state);
        std::iter::from_fn(|| state.core.poll_event()).collect()
    }

    /// The failover made this node primary: the instant it may serve from.
    pub fn promote(&self) -> Instant {
        lock(&self.state).core.promote(Instant::now())
    }

    /// Applies to the copy what the core asks for, in order.
    fn apply(&self, state: &mut StandbyState) {
        while let Some(action) = state.core.poll_action() {
            match action {
                StandbyAction::Apply { seq, operation } => {
                    let generation = state.core.generation();
                    let result = match &operation {
                        Operation::Write { first_block, data } => self.volume.apply_mirrored(
                            generation,
                            MirrorOperation::Write {
                                first_block: *first_block,
                                data,
                            },
                        ),
                        Operation::Unmap {
                            first_block,
                            block_count,
                        } => self.volume.apply_mirrored(
                            generation,
                            MirrorOperation::Unmap {
                                first_block: *first_block,
                                block_count: *block_count,
                            },
                        ),
                        Operation::Discard {
                            first_block,
                            block_count,
                        } => self.volume.apply_mirrored(
                            generation,
                            MirrorOperation::Discard {
                                first_block: *first_block,
                                block_count: *block_count,
                            },
                        ),
                        Operation::Flush | Operation::Digest { .. } => Ok(()),
                    };
                    state
                        .core
                        .handle_applied(seq, result.map_err(|e| e.to_string()));
                }
                StandbyAction::Flush { seq } => {
                    let result = self.volume.flush().map_err(|e| e.to_string());
                    let ok = result.is_ok();
                    state.core.handle_applied(seq, result.clone());
                    if ok {
                        state.core.handle_flushed(seq, result);
                    }
                }
                StandbyAction::Digest { seq, region } => match self.volume.region_digest(region) {
                    Ok(digest) => state.core.handle_digest(seq, region, digest),
                    Err(error) => state.core.handle_applied(seq, Err(error.to_string())),
                },
            }
        }
    }

    fn transmit(&self, state: &mut StandbyState) {
        while let Some(message) = state.core.poll_transmit() {
            self.link.send(self.peer, message);
        }
    }
}

enum Path {
    /// The standby's path: I/O waits for a failover.
    Waiting,
    Serving {
        volume: Arc<Volume>,
        primary: Arc<PrimaryShell>,
        serve_at: Instant,
    },
    Stopped,
}

/// The two paths of a session for ALUA: this node's target port group and the session's other
/// node's (node ids), and a count of changes.
#[derive(Clone, Copy, Default)]
struct Paths {
    local: u16,
    other: Option<u16>,
    changes: u64,
}

/// The LUN a node registers for a session's client: see the module docs.
pub struct SessionDevice {
    block_count: u64,
    unique_id: [u8; 16],
    path: Mutex<Path>,
    changed: Condvar,
    paths: Mutex<Paths>,
}

impl SessionDevice {
    /// The standby's path: registered, every I/O held until [`SessionDevice::serve`].
    pub fn waiting(block_count: u64, unique_id: [u8; 16]) -> SessionDevice {
        SessionDevice {
            block_count,
            unique_id,
            path: Mutex::new(Path::Waiting),
            changed: Condvar::new(),
            paths: Mutex::default(),
        }
    }

    /// Names this path's target port group (this node) and the other path's (the session's
    /// other node, if it has one) for ALUA; until then the device reports no port groups.
    pub fn set_paths(&self, local: u64, other: Option<u64>) {
        let group = |node: u64| u16::try_from(node).unwrap_or(u16::MAX);
        let mut paths = lock(&self.paths);
        let (local, other) = (group(local), other.map(group));
        if (paths.local, paths.other) != (local, other) {
            paths.local = local;
            paths.other = other;
            paths.changes += 1;
        }
    }

    fn path_changed(&self) {
        lock(&self.paths).changes += 1;
        self.changed.notify_all();
    }

    /// Serves `volume` through `primary` from `serve_at` on (a promoted standby waits out the
    /// old primary's lease).
    pub fn serve(&self, volume: Arc<Volume>, primary: Arc<PrimaryShell>, serve_at: Instant) {
        *lock(&self.path) = Path::Serving {
            volume,
            primary,
            serve_at,
        };
        self.path_changed();
    }

    /// Stops serving for good: held I/O fails at once.
    pub fn stop(&self) {
        *lock(&self.path) = Path::Stopped;
        self.path_changed();
    }

    pub fn is_serving(&self) -> bool {
        matches!(*lock(&self.path), Path::Serving { .. })
    }

    /// The volume and its mirror once serving (waiting for them on the standby's path).
    fn serving(&self) -> Result<(Arc<Volume>, Arc<PrimaryShell>), DeviceError> {
        let run = || {
            let deadline = Instant::now() + STANDBY_WAIT;
            let mut path = lock(&self.path);
            loop {
                let now = Instant::now();
                match &*path {
                    Path::Serving {
                        volume,
                        primary,
                        serve_at,
                    } if now >= *serve_at => return Ok((volume.clone(), primary.clone())),
                    Path::Stopped => {
                        return Err(DeviceError::Unavailable("path stopped".into()));
                    }
                    _ if now >= deadline => {
                        return Err(DeviceError::Unavailable(
                            "this path is the session's standby".into(),
                        ));
                    }
                    Path::Serving { serve_at, .. } => {
                        let until = (*serve_at).min(deadline);
                        path = self
                            .changed
                            .wait_timeout(path, until - now)
                            .unwrap_or_else(|poisoned| poisoned.into_inner())
                            .0;
                    }
                    Path::Waiting => {
                        path = self
                            .changed
                            .wait_timeout(path, deadline - now)
                            .unwrap_or_else(|poisoned| poisoned.into_inner())
                            .0;
                    }
                }
            }
        };
        // Off the async workers if called on one (plain READs run inline).
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(run),
            _ => run(),
        }
    }
}

impl BlockDevice for SessionDevice {
    fn block_size_bytes(&self) -> u32 {
        512
    }

    fn block_count(&self) -> u64 {
        self.block_count
    }

    fn unique_id(&self) -> [u8; 16] {
        self.unique_id
    }

    fn read(&self, lba: u64, buffer: &mut [u8]) -> Result<(), DeviceError> {
        let (volume, primary) = self.serving()?;
        primary.wait_readable(LEASE_WAIT)?;
        BlockDevice::read(&*volume, lba, buffer)
    }

    fn write(&self, lba: u64, data: &[u8], force_unit_access: bool) -> Result<(), DeviceError> {
        let (volume, _) = self.serving()?;
        BlockDevice::write(&*volume, lba, data, force_unit_access)
    }

    fn start_write(
        &self,
        lba: u64,
        data: &[u8],
        force_unit_access: bool,
    ) -> Result<Option<WriteCompletion>, DeviceError> {
        let (volume, _) = self.serving()?;
        BlockDevice::start_write(&*volume, lba, data, force_unit_access)
    }

    fn unmap(&self, lba: u64, blocks: u64) -> Result<(), DeviceError> {
        let (volume, _) = self.serving()?;
        BlockDevice::unmap(&*volume, lba, blocks)
    }

    fn flush(&self) -> Result<(), DeviceError> {
        let (volume, _) = self.serving()?;
        BlockDevice::flush(&*volume)
    }

    fn mapping_status(&self, lba: u64) -> Result<(bool, u64), DeviceError> {
        let (volume, primary) = self.serving()?;
        primary.wait_readable(LEASE_WAIT)?;
        BlockDevice::mapping_status(&*volume, lba)
    }

    /// This path: standby while it waits, transitioning until a promoted standby may serve,
    /// then active/optimized; unavailable once stopped. The other path is the opposite
    /// (unavailable while this one takes over from it).
    fn port_groups(&self) -> Option<PortGroups> {
        let paths = *lock(&self.paths);
        if paths.local == 0 {
            return None;
        }
        let (local, settled) = match &*lock(&self.path) {
            Path::Waiting => (AccessState::Standby, true),
            Path::Serving { serve_at, .. } if Instant::now() < *serve_at => {
                (AccessState::Transitioning, false)
            }
            Path::Serving { .. } => (AccessState::ActiveOptimized, true),
            Path::Stopped => (AccessState::Unavailable, true),
        };
        let other = match local {
            AccessState::ActiveOptimized => AccessState::Standby,
            AccessState::Transitioning => AccessState::Unavailable,
            AccessState::Standby | AccessState::Unavailable => AccessState::ActiveOptimized,
        };
        let others: Vec<(u16, AccessState)> = paths.other.map(|g| (g, other)).into_iter().collect();
        // The end of a lease wait changes the state without a call: it counts as a change.
        let version = paths.changes * 2 + settled as u64;
        Some(PortGroups::new((paths.local, local), &others, version))
    }

    /// iPXE opens all paths at once and uses the first whose TEST UNIT READY succeeds: holding
    /// it on the standby lets a live primary win the race, and a dead one's standby take over.
    fn ready(&self) -> Result<(), DeviceError> {
        self.serving().map(|_| ())
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

#[cfg(test)]
mod path_tests {
    use super::*;

    /// The ALUA states a session's device reports: standby while it waits, transitioning
    /// while a promoted standby waits out the lease (a change without a call, which still
    /// moves the version), active/optimized once it serves, unavailable once stopped; the
    /// other path the opposite; no port groups before the node named the paths.
    #[test]
    fn a_session_device_reports_its_path_states() {
        let device = SessionDevice::waiting(8, [1; 16]);
        assert_eq!(device.port_groups(), None);
        device.set_paths(3, Some(1));
        let groups = device.port_groups().expect("paths named");
        assert_eq!(
            groups.groups,
            [(3, AccessState::Standby), (1, AccessState::ActiveOptimized)]
        );
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            crate::chunks::ChunkStore::open(&dir.path().join("store"), Default::default()).unwrap(),
        );
        let base = vec![0u8; 64 << 10];
        let imported = store
            .import_raw(
                "base",
                1,
                &mut &base[..],
                base.len() as u64,
                &crate::image::NoProgress,
            )
            .unwrap();
        let spec = crate::volume::VolumeSpec {
            base: imported.manifest_hash,
            persistent: true,
            unique_id: [1; 16],
        };
        let volume = Arc::new(
            Volume::open_or_create(store, &dir.path().join("v"), &spec, Default::default())
                .unwrap(),
        );
        #[derive(Default)]
        struct Nowhere;
        impl MirrorLink for Nowhere {
            fn send(&self, _peer: u64, _message: Message) {}
        }
        let primary = PrimaryShell::new(
            VolumeId([1; 16]),
            2,
            None,
            MirrorConfig::default(),
            Arc::new(Nowhere),
        );
        let lease_end = Instant::now() + Duration::from_millis(200);
        device.set_paths(3, None);
        device.serve(volume, primary, lease_end);
        let during = device.port_groups().unwrap();
        assert_eq!(during.groups, [(3, AccessState::Transitioning)]);
        std::thread::sleep(Duration::from_millis(250));
        let after = device.port_groups().unwrap();
        assert_eq!(after.groups, [(3, AccessState::ActiveOptimized)]);
        assert_ne!(during.version, after.version);
        device.set_paths(3, Some(2));
        assert_eq!(
            device.port_groups().unwrap().groups,
            [(3, AccessState::ActiveOptimized), (2, AccessState::Standby)]
        );
        device.stop();
        assert_eq!(
            device.port_groups().unwrap().local_state(),
            AccessState::Unavailable
        );
    }
}
