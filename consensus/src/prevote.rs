//! Pre-vote (Raft thesis, section 9.6) in front of openraft 0.9, which has none.
//!
//! Why: a member that cannot hear its leader (restarted behind a stale connection, cut off by a
//! partition, a one-way link) times out and campaigns in a higher term. openraft's voters refuse it
//! while their leader lease runs, but the higher term still reaches the leader in a replication
//! answer, and the leader steps down: the whole cluster stops taking writes for an election
//! because one member was cut off, and again each time the link flaps. With pre-vote, a member
//! first asks the voters whether they would elect anyone now; only if a majority (itself
//! included) has also not heard from a leader does it start a real election. A cut-off member
//! never raises its term, so healing the cut costs nothing.
//!
//! How, on openraft 0.9: openraft's own election timer is off (`Config::enable_elect = false`,
//! see `RaftTuning::raft_config`); the `CampaignGuard` task plays that timer. It waits the same
//! silence openraft would (the leader lease, `election_timeout_max`, plus a timeout drawn from
//! `[election_timeout_min, election_timeout_max)`; only the drawn timeout after its own attempt),
//! then sends `PreVote` to every other voter and triggers openraft's election
//! (`Trigger::elect`, which the switch does not affect) if a majority grants it (a majority of
//! each voter set during a joint membership change, as the election itself needs). `initialize`
//! still elects at once, as before.
//!
//! A voter grants a pre-vote when it is not the leader and has not heard from a leader for the
//! leader lease (`LeaderContact`: touched by every AppendEntries or InstallSnapshot this member
//! accepted, by every change of its vote, and at start). It does not compare logs: openraft 0.9
//! does not expose a member's last log id. A member with a shorter log may therefore pass a
//! pre-vote and lose the real vote, raising the term once; that happens only when a majority
//! has no leader, so there is no leader to depose.
//!
//! Invariants: a pre-vote changes no state on any member (no term, no vote, nothing stored); a
//! guard never triggers an election while a majority of voters has heard from a leader within
//! the lease; the guard ends when its service is dropped or its Raft stops.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use openraft::ServerState;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::domain::NodeId;
use crate::rpc::{RpcRequest, RpcResponse, Transport};
use crate::service::{RaftService, StateView};
use crate::types::Raft;

/// When this member last heard from a leader it accepted (or changed its vote, or started).
pub struct LeaderContact {
    last: Mutex<Instant>,
}

impl LeaderContact {
    /// Counts from now: a member that just started waits a whole election timeout.
    pub fn new() -> LeaderContact {
        LeaderContact {
            last: Mutex::new(Instant::now()),
        }
    }

    pub fn touch(&self) {
        *self.lock() = Instant::now();
    }

    pub fn silent_for(&self) -> Duration {
        Instant::now().saturating_duration_since(*self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Instant> {
        self.last
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Default for LeaderContact {
    fn default() -> LeaderContact {
        LeaderContact::new()
    }
}

/// "Would you elect me now?" Carries nothing a voter needs beyond the asking member's id (the
/// transport authenticates it); a voter's answer depends only on its own view.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreVoteRequest {
    /// The term the candidate would campaign in (for logs and traces).
    pub next_term: u64,
}

/// A voter's answer to `PreVoteRequest`: granted if it is not the leader and has not heard from
/// one for the leader lease.
pub fn answer(raft: &Raft) -> bool {
    let leading = raft.metrics().borrow().state == ServerState::Leader;
    let lease = Duration::from_millis(raft.config().election_timeout_max);
    let granted = !leading && raft.contact().silent_for() >= lease;
    crate::metrics::pre_vote_answered(granted);
    granted
}

/// Whether `granted` holds a majority of every voter set of `configs` (one set, or two during
/// a joint membership change), as an election needs.
fn majority_in_each(configs: &[BTreeSet<NodeId>], granted: &BTreeSet<NodeId>) -> bool {
    !configs.is_empty()
        && configs
            .iter()
            .all(|voters| voters.intersection(granted).count() * 2 > voters.len())
}

/// Starts the task that campaigns for `service`'s member (see the module docs); `seed` draws its
/// election timeouts (the simulation passes one from its run's seed, so a seed replays exactly).
/// Its Raft must run with `enable_elect = false`, or openraft's own timer campaigns beside it.
/// The task holds the service weakly and ends when the service is dropped or its Raft stops.
pub fn spawn_campaign_guard<S: StateView, T: Transport>(
    service: &Arc<RaftService<S, T>>,
    seed: u64,
) -> tokio::task::JoinHandle<()> {
    let weak = Arc::downgrade(service);
    tokio::spawn(async move { campaign_guard(weak, StdRng::seed_from_u64(seed)).await })
}

async fn campaign_guard<S: StateView, T: Transport>(
    service: Weak<RaftService<S, T>>,
    mut random: StdRng,
) {
    let Some((tick, timeout_min, timeout_max)) = service.upgrade().map(|service| {
        let config = service.raft.config();
        (
            Duration::from_millis((config.heartbeat_interval / 2).max(1)),
            config.election_timeout_min,
            config.election_timeout_max,
        )
    }) else {
        return;
    };
    // openraft's leader lease is `election_timeout_max`.
    let lease = timeout_max;
    let mut draw = move || random.gen_range(timeout_min..timeout_max.max(timeout_min + 1));
    // The silence after which this member asks for votes: the lease plus a drawn timeout after
    // hearing from a leader, only a drawn timeout after its own attempt.
    let mut wait = Duration::from_millis(lease + draw());
    let mut last_vote = None;
    loop {
        tokio::time::sleep(tick).await;
        let Some(service) = service.upgrade() else {
            return;
        };
        let raft = &service.raft;
        let (stopped, state, vote, leader_known, voter) = {
            let metrics = raft.metrics();
            let metrics = metrics.borrow();
            (
                metrics.running_state.is_err(),
                metrics.state,
                metrics.vote,
                metrics.current_leader.is_some(),
                metrics
                    .membership_config
                    .membership()
                    .voter_ids()
                    .any(|id| id == service.node_id),
            )
        };
        if stopped {
            return;
        }
        if last_vote != Some(vote) {
            // A vote granted, a new term seen, a leader elected: a fresh start of the timer, as
            // openraft's own timer counts from its vote's last change.
            if last_vote.is_some() && leader_known {
                wait = Duration::from_millis(lease + draw());
            }
            last_vote = Some(vote);
            raft.contact().touch();
        }
        if state == ServerState::Leader {
            // A leader hears itself: once deposed, it waits a whole timeout like any follower.
            raft.contact().touch();
            continue;
        }
        // Not a voter in its own view (a learner, or a member that has not yet received the
        // membership): it does not campaign, and its contact stays untouched so that it grants
        // the pre-votes of voters that know it as one.
        if !voter || raft.contact().silent_for() < wait {
            continue;
        }
        let next_term = vote.leader_id().term + 1;
        let won = hold_pre_vote(&service, next_term, Duration::from_millis(timeout_min)).await;
        raft.contact().touch();
        wait = Duration::from_millis(draw());
        if won {
            if let Err(error) = raft.trigger().elect().await {
                tracing::debug!(%error, "election trigger failed; raft stopped");
                return;
            }
        }
    }
}

/// Asks every other voter at once and returns whether a majority of each voter set granted;
/// stops at the first such majority (a dead voter's answer, which would only time out after
/// `timeout`, is not waited for).
async fn hold_pre_vote<S: StateView, T: Transport>(
    service: &RaftService<S, T>,
    next_term: u64,
    timeout: Duration,
) -> bool {
    let membership = service
        .raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .clone();
    let configs = membership.get_joint_config();
    let mut asks: futures::stream::FuturesUnordered<_> = membership
        .voter_ids()
        .filter(|id| *id != service.node_id)
        .map(|id| {
            let address = membership.get_node(&id).cloned();
            let transport = service.transport.clone();
            async move {
                let Some(address) = address else {
                    return (id, false);
                };
                let request = RpcRequest::PreVote(PreVoteRequest { next_term });
                let granted = matches!(
                    transport.call(id, &address, request, timeout).await,
                    Ok(RpcResponse::PreVote(true))
                );
                (id, granted)
            }
        })
        .collect();
    let mut granted = BTreeSet::from([service.node_id]);
    while !majority_in_each(configs, &granted) {
        match futures::StreamExt::next(&mut asks).await {
            Some((id, true)) => {
                granted.insert(id);
            }
            Some((_, false)) => {}
            None => break,
        }
    }
    let won = majority_in_each(configs, &granted);
    crate::metrics::pre_vote_held(won);
    tracing::info!(
        node_id = service.node_id,
        next_term,
        grants = granted.len(),
        voters = membership.voter_ids().count(),
        won,
        "pre-vote"
    );
    won
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pre_vote_needs_a_majority_of_every_joint_config() {
        let set = |ids: &[NodeId]| ids.iter().copied().collect::<BTreeSet<NodeId>>();
        let one = vec![set(&[1, 2, 3])];
        assert!(!majority_in_each(&one, &set(&[1])));
        assert!(majority_in_each(&one, &set(&[1, 3])));
        // Moving from {1,2,3} to {3,4,5}: {1,2} is a majority of the old set only.
        let joint = vec![set(&[1, 2, 3]), set(&[3, 4, 5])];
        assert!(!majority_in_each(&joint, &set(&[1, 2])));
        assert!(!majority_in_each(&joint, &set(&[4, 5])));
        assert!(majority_in_each(&joint, &set(&[1, 3, 4])));
        assert!(majority_in_each(&[set(&[7])], &set(&[7])));
        assert!(!majority_in_each(&[], &set(&[1])));
    }
}
