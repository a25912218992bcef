//! No committed event is lost or reordered: every node's event history (the durable state
//! machine's, crashed nodes included) is a prefix of one committed history, and a node's history
//! never shrinks, across crashes, restarts and snapshot installs.
//!
//! Checked incrementally: only events past what was already checked are compared; the final
//! check compares every node's whole history.

use cairn_consensus::domain::{Event, NodeId};
use cairn_consensus::store::mem::MemStateMachine;

use super::{Checks, Violation};

const NAME: &str = "history_prefix";

/// Compares the events of `node_id` past its checked length with the reference history, extends
/// the reference, and returns the new events (for the replay check).
pub fn check_node(
    checks: &mut Checks,
    node_id: NodeId,
    machine: &MemStateMachine,
) -> Result<Vec<Event>, Violation> {
    let last_seq = machine.with_state(|state| state.last_seq);
    let progress = checks.per_node.entry(node_id).or_default();
    if last_seq < progress.checked_len {
        return Err(Violation::new(
            NAME,
            format!(
                "n{node_id} history shrank from {} to {last_seq} events",
                progress.checked_len
            ),
        ));
    }
    let start = progress.checked_len;
    let new = machine.events(start + 1, usize::MAX);
    if start + new.len() as u64 != last_seq {
        return Err(Violation::new(
            NAME,
            format!(
                "n{node_id} state is at seq {last_seq} but its history holds {} events",
                start + new.len() as u64
            ),
        ));
    }
    for (offset, event) in new.iter().enumerate() {
        let seq = start + offset as u64 + 1;
        compare(&mut checks.history, node_id, seq, event)?;
    }
    Ok(new)
}

/// Compares event `seq` of `node_id` with the reference, or appends it there.
fn compare(
    history: &mut Vec<Event>,
    node_id: NodeId,
    seq: u64,
    event: &Event,
) -> Result<(), Violation> {
    if event.seq != seq {
        return Err(Violation::new(
            NAME,
            format!("n{node_id} holds event seq {} at position {seq}", event.seq),
        ));
    }
    match history.get(seq as usize - 1) {
        Some(reference) if reference != event => Err(Violation::new(
            NAME,
            format!("n{node_id} event {seq} is {event:?}, another node committed {reference:?}"),
        )),
        Some(_) => Ok(()),
        None => {
            history.push(event.clone());
            Ok(())
        }
    }
}

/// The whole history of `node_id` against the reference (end of run).
pub fn check_whole(
    checks: &mut Checks,
    node_id: NodeId,
    events: &[Event],
) -> Result<(), Violation> {
    let checked = checks
        .per_node
        .get(&node_id)
        .map(|p| p.checked_len)
        .unwrap_or(0);
    if (events.len() as u64) < checked {
        return Err(Violation::new(
            NAME,
            format!(
                "n{node_id} history shrank from {checked} to {} events",
                events.len()
            ),
        ));
    }
    for (offset, event) in events.iter().enumerate() {
        compare(&mut checks.history, node_id, offset as u64 + 1, event)?;
    }
    Ok(())
}
