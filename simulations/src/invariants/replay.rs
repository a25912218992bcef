//! Every node's live state equals the replay of its own history: `State::hash()` of the state
//! machine's projection equals the hash of `replay` over its stored events.
//!
//! Checked incrementally (the replay is extended with each node's new events and compared at
//! every check) and in full at the end (`domain::replay` over the whole history).

use cairn_consensus::domain::{replay, Event, NodeId, ReplayBound};
use cairn_consensus::store::mem::MemStateMachine;

use super::{Checks, Violation};

const NAME: &str = "replay_hash";

/// Folds `new` (the events just checked by `history`) into the node's replay and compares.
pub fn check_node(
    checks: &mut Checks,
    node_id: NodeId,
    machine: &MemStateMachine,
    new: &[Event],
) -> Result<(), Violation> {
    let progress = checks.per_node.entry(node_id).or_default();
    for event in new {
        progress.replayed.apply_event(event);
    }
    progress.checked_len += new.len() as u64;
    let live = machine.with_state(|state| state.hash());
    let replayed = progress.replayed.hash();
    if live != replayed {
        return Err(Violation::new(
            NAME,
            format!(
                "n{node_id} state hash {live} differs from the replay of its {} events ({replayed})",
                progress.checked_len
            ),
        ));
    }
    Ok(())
}

/// Replays the whole history from scratch (end of run).
pub fn check_whole(
    node_id: NodeId,
    machine: &MemStateMachine,
    events: &[Event],
) -> Result<(), Violation> {
    let state = replay(events, ReplayBound::Everything).map_err(|error| {
        Violation::new(NAME, format!("n{node_id} history does not replay: {error}"))
    })?;
    let live = machine.with_state(|state| state.hash());
    if state.hash() != live {
        return Err(Violation::new(
            NAME,
            format!(
                "n{node_id} state hash {live} differs from a full replay ({})",
                state.hash()
            ),
        ));
    }
    Ok(())
}
