//! `RaftService`: what a cluster member does on top of openraft, independent of storage and
//! network. The real node (`raft_node::ClusterNode`) runs it with RocksDB and QUIC; the
//! deterministic simulation runs the same code with `store::mem` and its own `Transport`.
//!
//! - Writes: only the leader stamps the time (from the injected `Clock`), pre-checks the command
//!   against its state and proposes it; other members forward to the leader. A rejected command
//!   returns its `Rejection` and writes nothing.
//! - Linearizable reads: the leader confirms its leadership (`ensure_linearizable`) and returns
//!   the read index; a follower waits until it applied that index.
//! - Membership changes are forwarded to the leader like writes.
//!
//! Retries: a request that provably never reached the leader (no leader, leader unreachable,
//! "not the leader") is retried until `forward_timeout_ms`; a request whose outcome is unknown
//! (the leader went away after receiving it) is returned as `Unavailable`, never retried, so a
//! command is never applied twice by this layer.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::raft::AppendEntriesResponse;
use openraft::ChangeMembers;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::domain::{Command, Event, Name, NodeId, Proposal, Rejection, State, TimeMs};
use crate::rpc::{ForwardError, RpcHandler, RpcRequest, RpcResponse, Transport, TransportError};
use crate::types::{NodeAddress, Raft, RaftMetrics};

/// How often a proposal waiting in the leader's queue checks that this node still leads.
const LEADERSHIP_POLL: Duration = Duration::from_millis(100);

/// Read access to a state machine's projection (the state machine itself lives inside Raft).
pub trait StateView: Clone + Send + Sync + 'static {
    fn with_state<T>(&self, f: impl FnOnce(&State) -> T) -> T;
}

impl StateView for crate::store::rocks::StateReader {
    fn with_state<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        crate::store::rocks::StateReader::with_state(self, f)
    }
}

impl StateView for crate::store::mem::MemStateMachine {
    fn with_state<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        crate::store::mem::MemStateMachine::with_state(self, f)
    }
}

/// The leader's clock: milliseconds since the Unix epoch. Injected so the simulation controls it.
pub type Clock = Arc<dyn Fn() -> TimeMs + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as TimeMs)
            .unwrap_or(0)
    })
}

/// A change of the cluster's membership, as forwarded to the leader.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MembershipChange {
    /// Adds a non-voting member and waits until it caught up.
    AddLearner {
        node_id: NodeId,
        address: NodeAddress,
    },
    /// Makes exactly these members voters (learners among them are promoted; other voters are
    /// kept as learners).
    SetVoters(BTreeSet<NodeId>),
    /// Removes a member, voter or learner.
    Remove(NodeId),
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProposeError {
    #[error("rejected: {0}")]
    Rejected(Rejection),
    #[error("no leader elected within {waited_ms} ms")]
    NoLeader { waited_ms: u64 },
    /// The outcome is unknown (the leader went away while the proposal was in flight) or the
    /// cluster stayed unreachable; the command may or may not have been committed.
    #[error("cluster unavailable: {0}")]
    Unavailable(String),
    #[error("node stopped: {0}")]
    Stopped(String),
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ReadError {
    #[error("no leader elected within {waited_ms} ms")]
    NoLeader { waited_ms: u64 },
    #[error("cluster unavailable: {0}")]
    Unavailable(String),
    #[error("node stopped: {0}")]
    Stopped(String),
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MembershipError {
    #[error("no leader elected within {waited_ms} ms")]
    NoLeader { waited_ms: u64 },
    #[error("membership change refused: {0}")]
    Refused(String),
    #[error("cluster unavailable: {0}")]
    Unavailable(String),
    #[error("node stopped: {0}")]
    Stopped(String),
}

/// Timeouts of the service.
#[derive(Clone, Debug)]
pub struct ServiceTimeouts {
    /// How long a write or read keeps looking for a leader, and the deadline of one forwarded
    /// request.
    pub forward_timeout_ms: u64,
    /// Deadline of a membership change (adding a learner waits for it to catch up).
    pub membership_timeout_ms: u64,
}

impl Default for ServiceTimeouts {
    fn default() -> ServiceTimeouts {
        ServiceTimeouts {
            forward_timeout_ms: 5_000,
            membership_timeout_ms: 120_000,
        }
    }
}

/// One cluster member's service: openraft plus state access, clock and transport to peers.
pub struct RaftService<S: StateView, T: Transport> {
    pub node_id: NodeId,
    pub raft: Raft,
    pub state: S,
    pub transport: T,
    pub clock: Clock,
    pub timeouts: ServiceTimeouts,
}

enum Attempt<R> {
    Done(R),
    /// Nothing happened; try again (possibly with another leader).
    Retry(String),
}

impl<S: StateView, T: Transport> RaftService<S, T> {
    pub fn metrics(&self) -> watch::Receiver<RaftMetrics> {
        self.raft.metrics()
    }

    fn stopped(&self) -> Option<String> {
        self.raft
            .metrics()
            .borrow()
            .running_state
            .as_ref()
            .err()
            .map(|fatal| fatal.to_string())
    }

    /// Waits (until `deadline`) for a known leader and its address.
    async fn wait_leader(&self, deadline: Instant) -> Option<(NodeId, Option<NodeAddress>)> {
        let mut metrics = self.raft.metrics();
        loop {
            {
                let current = metrics.borrow();
                if let Some(leader) = current.current_leader {
                    let address = current
                        .membership_config
                        .membership()
                        .get_node(&leader)
                        .cloned();
                    return Some((leader, address));
                }
            }
            let remaining = deadline.checked_duration_since(Instant::now())?;
            if tokio::time::timeout(remaining, metrics.changed())
                .await
                .ok()?
                .is_err()
            {
                return None;
            }
        }
    }

    /// Resolves once this member no longer believes `leader` leads.
    async fn leader_changed_from(&self, leader: NodeId) {
        let mut metrics = self.raft.metrics();
        let _ = metrics
            .wait_for(|current| current.current_leader != Some(leader))
            .await;
    }

    /// Runs `local` on the leader or `remote` towards it, retrying while nothing happened.
    async fn on_leader<R, L, LF, RF>(
        &self,
        timeout: Duration,
        local: L,
        remote: impl Fn(NodeId, NodeAddress) -> RF,
    ) -> Result<R, ForwardError>
    where
        L: Fn() -> LF,
        LF: std::future::Future<Output = Result<R, ForwardError>>,
        RF: std::future::Future<Output = Result<R, ForwardError>>,
    {
        let started = Instant::now();
        let deadline = started + timeout;
        loop {
            let attempt = match self.wait_leader(deadline).await {
                None => {
                    return Err(ForwardError::NoLeader {
                        waited_ms: started.elapsed().as_millis() as u64,
                    })
                }
                Some((leader, _)) if leader == self.node_id => classify(local().await),
                Some((leader, Some(address))) => {
                    // A leader that died with our request in flight never answers: give up as
                    // soon as this member sees another leader (or an election) instead.
                    // `biased`: the same order of polling every time, so a simulated run
                    // replays exactly from its seed.
                    tokio::select! {
                        biased;
                        result = remote(leader, address) => classify(result),
                        () = self.leader_changed_from(leader) => Attempt::Done(Err(ForwardError::Unavailable(
                            format!("leader {leader} changed while the request was in flight; outcome unknown"),
                        ))),
                    }
                }
                Some((leader, None)) => Attempt::Retry(format!("leader {leader} has no address")),
            };
            match attempt {
                Attempt::Done(result) => return result,
                Attempt::Retry(reason) => {
                    if let Some(fatal) = self.stopped() {
                        return Err(ForwardError::Stopped(fatal));
                    }
                    if Instant::now() >= deadline {
                        return Err(ForwardError::Unavailable(reason));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    /// Proposes `command` on behalf of `actor` and returns its events once committed and applied
    /// on the leader. Forwards to the leader when this member is not it.
    pub async fn propose(&self, actor: Name, command: Command) -> Result<Vec<Event>, ProposeError> {
        let started = std::time::Instant::now();
        let timeout = Duration::from_millis(self.timeouts.forward_timeout_ms);
        let result = self
            .on_leader(
                timeout,
                || self.propose_as_leader(actor.clone(), command.clone()),
                |leader, address| {
                    let request = RpcRequest::ForwardProposal {
                        actor: actor.clone(),
                        command: command.clone(),
                    };
                    async move {
                        match self.forward(leader, &address, request, timeout).await? {
                            RpcResponse::Proposal(result) => result,
                            other => Err(ForwardError::Unavailable(format!(
                                "unexpected response {other:?}"
                            ))),
                        }
                    }
                },
            )
            .await;
        let result = result.map_err(|error| match error {
            ForwardError::Rejected(rejection) => ProposeError::Rejected(rejection),
            ForwardError::NoLeader { waited_ms } => ProposeError::NoLeader { waited_ms },
            ForwardError::Stopped(reason) => ProposeError::Stopped(reason),
            other => ProposeError::Unavailable(other.to_string()),
        });
        crate::metrics::propose_finished(
            started.elapsed().as_secs_f64(),
            matches!(result, Err(ProposeError::Rejected(_))),
        );
        result
    }

    /// The leader's half of a write: stamp the time, pre-check, propose, wait for the outcome.
    pub async fn propose_as_leader(
        &self,
        actor: Name,
        command: Command,
    ) -> Result<Vec<Event>, ForwardError> {
        // Never earlier than the last event: clocks may differ across leaders.
        let now = (self.clock)();
        let time_ms = self.state.with_state(|state| now.max(state.last_time_ms));
        let proposal = Proposal {
            actor,
            time_ms,
            command,
        };
        if self
            .state
            .with_state(|state| state.check(&proposal))
            .is_err()
        {
            // This node's state may lag what the cluster committed (a node restarted as the
            // leader of its old term answers before it learns of a newer one): a rejection is
            // final only once its leadership is confirmed and everything committed is applied.
            // Nothing was proposed yet, so "not the leader" here is safe to retry elsewhere.
            self.read_index().await?;
            self.state
                .with_state(|state| state.check(&proposal))
                .map_err(ForwardError::Rejected)?;
        }
        // Concurrent proposals share one Raft entry (see `proposer`). Bounded: a leader deposed
        // right after accepting an entry may never answer it; the proposer then answers
        // "outcome unknown" after the timeout.
        let timeout = Duration::from_millis(self.timeouts.forward_timeout_ms);
        let proposer = self.raft.proposer();
        let mut ticket = proposer.submit(self.raft.openraft(), proposal, timeout);
        // Leadership lost while the proposal still waits in the queue: it was never proposed, so
        // it is taken back and the caller retries with the new leader. Polled, not watched: see
        // `Proposer::start_next`.
        let answer = loop {
            match tokio::time::timeout(LEADERSHIP_POLL, &mut ticket.answer).await {
                Ok(answer) => break answer,
                Err(_) => {
                    let leader = self.raft.metrics().borrow().current_leader;
                    if leader != Some(self.node_id) && proposer.withdraw(ticket.ticket) {
                        return Err(ForwardError::NotLeader { leader });
                    }
                    // Still leading, or already proposed: the entry's answer is bounded by the
                    // proposer's timeout.
                }
            }
        };
        answer.unwrap_or_else(|_| {
            Err(ForwardError::Unavailable(
                "the proposal's writer stopped; outcome unknown".into(),
            ))
        })
    }

    /// Runs `f` on a linearizable view of the state: it reflects every write committed before the
    /// call. Works on followers (read index from the leader, then wait until applied).
    pub async fn read<R>(&self, f: impl FnOnce(&State) -> R) -> Result<R, ReadError> {
        let timeout = Duration::from_millis(self.timeouts.forward_timeout_ms);
        let index = self
            .on_leader(
                timeout,
                || self.read_index(),
                |leader, address| async move {
                    match self
                        .forward(leader, &address, RpcRequest::ReadIndex, timeout)
                        .await
                    {
                        Ok(RpcResponse::ReadIndex(result)) => result,
                        Ok(other) => Err(ForwardError::Unavailable(format!(
                            "unexpected response {other:?}"
                        ))),
                        // A read changes nothing: any failure may be retried.
                        Err(error) => Err(ForwardError::NotLeader { leader: None }).inspect_err(
                            |_| tracing::debug!(%error, leader, "read index failed; retrying"),
                        ),
                    }
                },
            )
            .await
            .map_err(|error| match error {
                ForwardError::NoLeader { waited_ms } => ReadError::NoLeader { waited_ms },
                ForwardError::Stopped(reason) => ReadError::Stopped(reason),
                other => ReadError::Unavailable(other.to_string()),
            })?;
        self.raft
            .wait(Some(timeout))
            .applied_index_at_least(Some(index), "linearizable read")
            .await
            .map_err(|e| ReadError::Unavailable(e.to_string()))?;
        Ok(self.state.with_state(f))
    }

    /// The leader's half of a linearizable read: confirm leadership with a quorum and return the
    /// index a reader must have applied.
    pub async fn read_index(&self) -> Result<u64, ForwardError> {
        match self.raft.ensure_linearizable().await {
            Ok(log_id) => Ok(log_id.map(|id| id.index).unwrap_or(0)),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(forward))) => {
                Err(ForwardError::NotLeader {
                    leader: forward.leader_id,
                })
            }
            Err(error) => Err(ForwardError::Unavailable(error.to_string())),
        }
    }

    /// Changes the membership through the leader.
    pub async fn change_membership(&self, change: MembershipChange) -> Result<(), MembershipError> {
        let timeout = Duration::from_millis(self.timeouts.membership_timeout_ms);
        self.on_leader(
            timeout,
            || self.change_membership_as_leader(change.clone()),
            |leader, address| {
                let request = RpcRequest::ChangeMembership(change.clone());
                async move {
                    match self.forward(leader, &address, request, timeout).await? {
                        RpcResponse::Membership(result) => result,
                        other => Err(ForwardError::Unavailable(format!(
                            "unexpected response {other:?}"
                        ))),
                    }
                }
            },
        )
        .await
        .map_err(|error| match error {
            ForwardError::NoLeader { waited_ms } => MembershipError::NoLeader { waited_ms },
            ForwardError::Membership(reason) => MembershipError::Refused(reason),
            ForwardError::Stopped(reason) => MembershipError::Stopped(reason),
            other => MembershipError::Unavailable(other.to_string()),
        })
    }

    /// The leader's half of a membership change.
    pub async fn change_membership_as_leader(
        &self,
        change: MembershipChange,
    ) -> Result<(), ForwardError> {
        let membership = self.raft.metrics().borrow().membership_config.clone();
        let membership = membership.membership();
        let result = match change {
            MembershipChange::AddLearner { node_id, address } => self
                .raft
                .add_learner(node_id, address, true)
                .await
                .map(|_| ()),
            MembershipChange::SetVoters(voters) => self
                .raft
                .change_membership(ChangeMembers::ReplaceAllVoters(voters), true)
                .await
                .map(|_| ()),
            MembershipChange::Remove(node_id) => {
                let ids = BTreeSet::from([node_id]);
                let is_voter = membership.voter_ids().any(|id| id == node_id);
                let is_learner = membership.learner_ids().any(|id| id == node_id);
                if is_voter {
                    // Without `retain` the removed voter leaves the cluster entirely.
                    self.raft
                        .change_membership(ChangeMembers::RemoveVoters(ids), false)
                        .await
                        .map(|_| ())
                } else if is_learner {
                    self.raft
                        .change_membership(ChangeMembers::RemoveNodes(ids), false)
                        .await
                        .map(|_| ())
                } else {
                    return Err(ForwardError::Membership(format!(
                        "node {node_id} is not a member"
                    )));
                }
            }
        };
        match result {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                Err(ForwardError::NotLeader {
                    leader: forward.leader_id,
                })
            }
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(error))) => {
                Err(ForwardError::Membership(error.to_string()))
            }
            Err(error) => Err(ForwardError::Unavailable(error.to_string())),
        }
    }

    /// Makes this member a one-member cluster.
    pub async fn initialize(&self, address: NodeAddress) -> Result<(), MembershipError> {
        let members = BTreeMap::from([(self.node_id, address)]);
        self.raft
            .initialize(members)
            .await
            .map_err(|e| MembershipError::Refused(e.to_string()))
    }

    async fn forward(
        &self,
        leader: NodeId,
        address: &NodeAddress,
        request: RpcRequest,
        timeout: Duration,
    ) -> Result<RpcResponse, ForwardError> {
        match self.transport.call(leader, address, request, timeout).await {
            Ok(response) => Ok(response),
            // Nothing reached the leader: safe to retry with whoever leads next.
            Err(error @ TransportError::Unreachable { .. }) => {
                tracing::debug!(%error, leader, "leader unreachable; retrying");
                Err(ForwardError::NotLeader { leader: None })
            }
            // The request may have been acted on: the outcome is unknown.
            Err(error) => Err(ForwardError::Unavailable(error.to_string())),
        }
    }

    /// Serves one request from peer `from` (already authenticated by the transport).
    pub async fn handle(&self, _from: NodeId, request: RpcRequest) -> RpcResponse {
        match request {
            RpcRequest::AppendEntries(rpc) => {
                // From the leader this member already follows: contact at once, not after the
                // log write, so a slow fsync here does not look like a silent leader.
                let vote = self.raft.metrics().borrow().vote;
                if vote.is_committed() && rpc.vote == vote {
                    self.raft.contact().touch();
                }
                let response = self.raft.append_entries(rpc).await;
                // Accepted from the leader of this member's vote (a conflict too): contact.
                if matches!(&response, Ok(answer) if !matches!(answer, AppendEntriesResponse::HigherVote(_)))
                {
                    self.raft.contact().touch();
                }
                RpcResponse::AppendEntries(response)
            }
            RpcRequest::Vote(rpc) => RpcResponse::Vote(self.raft.vote(rpc).await),
            RpcRequest::InstallSnapshot(rpc) => {
                let response = self.raft.install_snapshot(rpc).await;
                if response.is_ok() {
                    self.raft.contact().touch();
                }
                RpcResponse::InstallSnapshot(response)
            }
            RpcRequest::PreVote(_) => RpcResponse::PreVote(crate::prevote::answer(&self.raft)),
            RpcRequest::ForwardProposal { actor, command } => {
                RpcResponse::Proposal(self.propose_as_leader(actor, command).await)
            }
            RpcRequest::ReadIndex => RpcResponse::ReadIndex(self.read_index().await),
            RpcRequest::ChangeMembership(change) => {
                RpcResponse::Membership(self.change_membership_as_leader(change).await)
            }
        }
    }
}

fn classify<R>(result: Result<R, ForwardError>) -> Attempt<Result<R, ForwardError>> {
    match result {
        Err(ForwardError::NotLeader { leader }) => {
            Attempt::Retry(format!("not the leader (leader: {leader:?})"))
        }
        other => Attempt::Done(other),
    }
}

/// Serves peers' RPCs with a service it holds weakly, so a stopped node can be dropped while its
/// endpoint still drains connections.
pub struct ServiceHandler<S: StateView, T: Transport> {
    service: Weak<RaftService<S, T>>,
}

impl<S: StateView, T: Transport> ServiceHandler<S, T> {
    pub fn new(service: &Arc<RaftService<S, T>>) -> ServiceHandler<S, T> {
        ServiceHandler {
            service: Arc::downgrade(service),
        }
    }
}

impl<S: StateView, T: Transport> RpcHandler for ServiceHandler<S, T> {
    async fn handle(&self, from: NodeId, request: RpcRequest) -> RpcResponse {
        match self.service.upgrade() {
            Some(service) => service.handle(from, request).await,
            None => RpcResponse::Refused("node is shutting down".into()),
        }
    }
}
