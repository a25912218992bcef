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
//!
//! Files: `primary.rs` ([`PrimaryShell`]), `standby.rs` ([`StandbyShell`]), `device.rs`
//! ([`SessionDevice`]).

mod device;
mod primary;
mod standby;

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use crate::mirror::Message;

pub use device::SessionDevice;
pub use primary::PrimaryShell;
pub use standby::StandbyShell;

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
