//! Election safety: at most one leader per term.
//!
//! Every node's openraft metrics are polled; each time a node reports itself leader, its term is
//! recorded. openraft 0.9 (without the `single-term-leader` feature, as consensus builds it)
//! identifies a leader by `(term, node id)`, so a higher node id may win the same term after a
//! lower one: the strict Raft check is enabled with `Checks::strict_terms` (`--strict-terms`);
//! by default, terms with several leaders are counted and the leaders of one term must still be
//! distinct nodes that each won the vote at `(term, self)`.

use cairn_consensus::domain::NodeId;
use cairn_consensus::types::RaftMetrics;
use openraft::ServerState;

use super::{Checks, Violation};
use crate::world::World;

/// Records that `node_id` leads with `vote_node` as the vote's leader in `term`.
pub fn check_leader(
    checks: &mut Checks,
    node_id: NodeId,
    term: u64,
    vote_node: Option<NodeId>,
) -> Result<(), Violation> {
    if vote_node != Some(node_id) {
        return Err(Violation::new(
            "single_leader",
            format!("n{node_id} acts as leader in term {term} but its vote is for {vote_node:?}"),
        ));
    }
    let leaders = checks.leaders_by_term.entry(term).or_default();
    leaders.insert(node_id);
    if checks.strict_terms && leaders.len() > 1 {
        return Err(Violation::new(
            "single_leader",
            format!("term {term} has several leaders: {leaders:?}"),
        ));
    }
    Ok(())
}

/// Terms in which more than one node led (allowed by openraft's default leader id).
pub fn multi_leader_terms(checks: &Checks) -> usize {
    checks
        .leaders_by_term
        .values()
        .filter(|leaders| leaders.len() > 1)
        .count()
}

/// Polls every running node's openraft metrics (each `LEADER_POLL_MS` of simulated time) and
/// records what changed. Polled, not watched: tokio's `watch` wakes its waiters in a random order,
/// which would make the run depend on more than its seed.
pub fn poll(world: &mut World) {
    let running: Vec<(NodeId, RaftMetrics)> = world
        .nodes
        .iter()
        .filter_map(|(id, slot)| {
            slot.running
                .as_ref()
                .map(|service| (*id, service.raft.metrics().borrow().clone()))
        })
        .collect();
    for (node_id, metrics) in running {
        let seen = (metrics.current_term, metrics.state, metrics.current_leader);
        if world.checks.last_seen.get(&node_id) != Some(&seen) {
            world.checks.last_seen.insert(node_id, seen);
            world.record(format_args!(
                "n{node_id} state={:?} term={} leader={:?}",
                metrics.state, metrics.current_term, metrics.current_leader
            ));
        }
        if metrics.state == ServerState::Leader {
            let vote_node = metrics.vote.leader_id().voted_for();
            if let Err(violation) =
                check_leader(&mut world.checks, node_id, metrics.current_term, vote_node)
            {
                world.fail(violation);
            }
        }
    }
}
