//! Raft storage: the log store and the state machine, on RocksDB (`rocks`) and in memory (`mem`).
//!
//! Both state machines share `StateMachineCore` (how an entry is applied) and the snapshot format
//! (`snapshot`), so the simulation exercises exactly the apply logic the real node runs.
//!
//! Invariants:
//! - The events are the durable truth; `State` is a projection rebuilt by folding them.
//! - A snapshot carries the whole event history (not just the projection), so purging the Raft
//!   log never loses history and a node that joins late receives all of it.
//! - A failed write to the log or the state machine is fatal: the store poisons itself and every
//!   later call fails, and openraft stops the node on the returned `StorageError`.

pub mod mem;
pub mod rocks;
pub mod snapshot;

use openraft::{EntryPayload, StorageIOError};

use crate::domain::{Event, Outcome, State};
use crate::types::{Entry, LogId, StorageError, StoredMembership};

/// The apply step shared by every state machine: what one committed entry does to the projection.
#[derive(Clone, Debug, Default)]
pub struct StateMachineCore {
    pub state: State,
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
}

impl StateMachineCore {
    /// Applies one entry. Returns the Raft response and the events to persist (empty for blank and
    /// membership entries and for rejected proposals: a rejection writes nothing but last_applied).
    pub fn apply_entry(&mut self, entry: &Entry) -> (Outcome, Vec<Event>) {
        self.last_applied = Some(entry.log_id);
        match &entry.payload {
            EntryPayload::Blank => (Ok(Vec::new()), Vec::new()),
            EntryPayload::Membership(membership) => {
                self.membership = StoredMembership::new(Some(entry.log_id), membership.clone());
                (Ok(Vec::new()), Vec::new())
            }
            EntryPayload::Normal(proposal) => match self.state.execute(proposal) {
                Ok(events) => (Ok(events.clone()), events),
                Err(rejection) => (Err(rejection), Vec::new()),
            },
        }
    }
}

pub(crate) fn write_error(error: impl std::fmt::Display) -> StorageError {
    StorageIOError::write(&std::io::Error::other(error.to_string())).into()
}

pub(crate) fn read_error(error: impl std::fmt::Display) -> StorageError {
    StorageIOError::read(&std::io::Error::other(error.to_string())).into()
}
