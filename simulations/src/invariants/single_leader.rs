//! Election safety: at most one leader per term.
//!
//! Every node's openraft metrics are watched; each time a node reports itself leader, its term is
//! recorded. openraft 0.9 (without the `single-term-leader` feature, as consensus builds it)
//! identifies a leader by `(term, node id)`, so a higher node id may win the same term after a
//! lower one: the strict Raft check is enabled with `Checks::strict_terms` (`--strict-terms`);
//! by default, terms with several leaders are counted and the leaders of one term must still be
//! distinct nodes that each won the vote at `(term, self)`.

use std::sync::{Mutex, Weak};

use cairn_consensus::domain::NodeId;
use cairn_consensus::types::RaftMetrics;
use openraft::ServerState;
use tokio::sync::watch;

use super::{Checks, Violation};
use crate::world::{lock, World};

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

/// Watches one incarnation of a node until it stops.
pub async fn watch(
    world: Weak<Mutex<World>>,
    node_id: NodeId,
    incarnation: u64,
    mut metrics: watch::Receiver<RaftMetrics>,
) {
    let mut last_seen: Option<(u64, ServerState, Option<NodeId>)> = None;
    loop {
        let (term, state, leader, vote_node) = {
            let current = metrics.borrow_and_update();
            (
                current.current_term,
                current.state,
                current.current_leader,
                current.vote.leader_id().voted_for(),
            )
        };
        let Some(shared) = world.upgrade() else { return };
        {
            let mut world = lock(&shared);
            let alive = world.nodes.get(&node_id).map(|slot| slot.incarnation) == Some(incarnation)
                && world.running(node_id).is_some();
            if !alive {
                return;
            }
            if last_seen != Some((term, state, leader)) {
                last_seen = Some((term, state, leader));
                world.record(format_args!(
                    "n{node_id} state={state:?} term={term} leader={leader:?}"
                ));
            }
            if state == ServerState::Leader {
                if let Err(violation) = check_leader(&mut world.checks, node_id, term, vote_node) {
                    world.fail(violation);
                }
            }
        }
        drop(shared);
        if metrics.changed().await.is_err() {
            return;
        }
    }
}
