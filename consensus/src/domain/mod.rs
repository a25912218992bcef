//! The replicated state as a pure, event-sourced domain model: commands are validated against the
//! state and become events; the state is a fold over the events.
//!
//! Nothing here does I/O, reads a clock or draws randomness: the leader's time and the actor come
//! in with the `Proposal`, so every node computes the same events and the same state hash.

mod command;
mod event;
mod rejection;
mod sessions;
mod state;
mod types;

use serde::{Deserialize, Serialize};

pub use command::{AssignmentTarget, Command, DiskMode, LeaseRequest};
pub use event::{Event, EventPayload};
pub use rejection::{EntityKind, Rejection};
pub use state::{
    Assignment, AssignmentList, BootSession, Client, Discovered, Group, Image, ImageVersion,
    JoinToken, LayerCopies, Lease, StandbyCopy, State, StorageNode, Token, User, VersionState,
    ASSIGNMENTS_PER_TARGET_MAX, DESCRIPTION_BYTES_MAX, LAYER_HOMES_MAX, LEASES_PER_COMMAND_MAX,
};
pub use types::{Hash32, Mac, Name, NodeId, Seq, TimeMs};

/// What one Raft log entry carries: a command, who asked, and the leader's clock when it proposed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Proposal {
    pub actor: Name,
    pub time_ms: TimeMs,
    pub command: Command,
}

/// The Raft response to one proposal: the events it produced, or why it was refused.
pub type Outcome = Result<Vec<Event>, Rejection>;

/// Where a replay stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplayBound {
    /// Up to and including this sequence number.
    Seq(Seq),
    /// Every event whose leader time is at or before this.
    Time(TimeMs),
    Everything,
}

impl ReplayBound {
    pub fn includes(&self, event: &Event) -> bool {
        match *self {
            ReplayBound::Seq(seq) => event.seq <= seq,
            ReplayBound::Time(time_ms) => event.time_ms <= time_ms,
            ReplayBound::Everything => true,
        }
    }
}

/// Folds `events` (in sequence order, from seq 1) into a state, stopping at `bound`. Time bounds
/// stop at the first event past the bound: leader clocks may step back across a leader change,
/// and a replay is a prefix of the history, never a filter of it.
pub fn replay<'a>(
    events: impl IntoIterator<Item = &'a Event>,
    bound: ReplayBound,
) -> Result<State, ReplayError> {
    let mut state = State::default();
    for event in events {
        if !bound.includes(event) {
            break;
        }
        if event.seq != state.last_seq + 1 {
            return Err(ReplayError::Gap {
                expected: state.last_seq + 1,
                found: event.seq,
            });
        }
        state.apply_event(event);
    }
    Ok(state)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReplayError {
    #[error("history has a gap: expected event {expected}, found {found}")]
    Gap { expected: Seq, found: Seq },
}

#[cfg(test)]
mod tests;
