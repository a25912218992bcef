//! `ClusterNode`: one member of the Raft cluster, as the `cairn` binary drives it.
//!
//! It owns the RocksDB stores, the QUIC endpoint (serving Raft and application RPCs) and the
//! openraft instance. Writes go to the leader (followers forward them; the leader stamps the
//! time), linearizable reads use a read index from the leader, and stale reads use the local
//! projection.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, SnapshotPolicy};
use tokio::sync::watch;

use crate::domain::{
    Command, Event, Hash32, Name, NodeId, Proposal, Rejection, Seq, State, TimeMs,
};
use crate::network::NetworkFactory;
use crate::quic::{self, QuicError, QuicTransport};
use crate::rpc::{ForwardError, RpcHandler, RpcRequest, RpcResponse, Transport, TransportError};
use crate::store::rocks::{self, OpenError, RocksLogStore, StateReader};
use crate::tls::NodeIdentity;
use crate::types::{NodeAddress, Raft, RaftMetrics, StorageError};

/// Raft timing and log-compaction settings. Defaults aim at a new writable leader well within
/// 1.5 s of a leader loss on a LAN.
#[derive(Clone, Debug)]
pub struct RaftTuning {
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many log entries since the last one.
    pub snapshot_after_entries: u64,
    /// Log entries kept behind a snapshot (so slightly lagging followers need no snapshot).
    pub logs_kept_after_snapshot: u64,
    /// Snapshot bytes per `InstallSnapshot` RPC.
    pub snapshot_chunk_bytes: usize,
    /// Deadline of one snapshot chunk (not of the whole snapshot).
    pub snapshot_chunk_timeout_ms: u64,
    /// Deadline of a forwarded write or read-index request.
    pub forward_timeout_ms: u64,
}

impl Default for RaftTuning {
    fn default() -> RaftTuning {
        RaftTuning {
            heartbeat_interval_ms: 75,
            election_timeout_min_ms: 300,
            election_timeout_max_ms: 600,
            snapshot_after_entries: 10_000,
            logs_kept_after_snapshot: 1_000,
            snapshot_chunk_bytes: 1024 * 1024,
            snapshot_chunk_timeout_ms: 5_000,
            forward_timeout_ms: 5_000,
        }
    }
}

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub node_id: NodeId,
    /// RocksDB lives in `<data_dir>/raft`.
    pub data_dir: PathBuf,
    pub raft_listen: SocketAddr,
    /// What peers store in the membership to reach this node.
    pub advertise: NodeAddress,
    pub identity: NodeIdentity,
    pub tuning: RaftTuning,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("node id {config} does not match the certificate's node id {certificate}")]
    IdentityMismatch { config: NodeId, certificate: NodeId },
    #[error("cannot create data directory {path}: {error}")]
    DataDir { path: String, error: std::io::Error },
    #[error("storage: {0}")]
    Storage(#[from] OpenError),
    #[error("network: {0}")]
    Network(#[from] QuicError),
    #[error("raft configuration: {0}")]
    Config(String),
    #[error("raft: {0}")]
    Raft(String),
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProposeError {
    #[error("rejected: {0}")]
    Rejected(Rejection),
    #[error("no leader elected within {waited_ms} ms")]
    NoLeader { waited_ms: u64 },
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

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("node {this} is not the leader (leader: {leader:?})")]
    NotLeader {
        this: NodeId,
        leader: Option<(NodeId, NodeAddress)>,
    },
    #[error("membership change failed: {0}")]
    Failed(String),
}

struct Inner {
    node_id: NodeId,
    raft: Raft,
    reader: StateReader,
    log: RocksLogStore,
    transport: QuicTransport,
    tuning: RaftTuning,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// A running cluster member. Clones are handles to the same node.
#[derive(Clone)]
pub struct ClusterNode {
    inner: Arc<Inner>,
}

fn now_ms() -> TimeMs {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as TimeMs)
        .unwrap_or(0)
}

impl ClusterNode {
    /// Opens (or creates) the node's storage in `data_dir`, binds its QUIC endpoint and starts
    /// Raft. A node restarted on its data directory rejoins with its log, vote and history.
    pub async fn start(config: NodeConfig) -> Result<ClusterNode, StartError> {
        if config.identity.node_id != config.node_id {
            return Err(StartError::IdentityMismatch {
                config: config.node_id,
                certificate: config.identity.node_id,
            });
        }
        let path = config.data_dir.join("raft");
        std::fs::create_dir_all(&path).map_err(|error| StartError::DataDir {
            path: path.display().to_string(),
            error,
        })?;
        let (log, state_machine) = rocks::open(&path)?;
        let reader = state_machine.reader();
        let endpoint = quic::bind_endpoint(&config.identity, config.raft_listen)?;
        let transport = QuicTransport::new(config.node_id, endpoint.clone());
        let tuning = config.tuning.clone();
        let raft_config = openraft::Config {
            cluster_name: "cairn".into(),
            heartbeat_interval: tuning.heartbeat_interval_ms,
            election_timeout_min: tuning.election_timeout_min_ms,
            election_timeout_max: tuning.election_timeout_max_ms,
            install_snapshot_timeout: tuning.snapshot_chunk_timeout_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(tuning.snapshot_after_entries),
            max_in_snapshot_log_to_keep: tuning.logs_kept_after_snapshot,
            snapshot_max_chunk_size: tuning.snapshot_chunk_bytes as u64,
            ..Default::default()
        }
        .validate()
        .map_err(|e| StartError::Config(e.to_string()))?;
        let network = NetworkFactory::new(config.node_id, transport.clone());
        let raft = Raft::new(
            config.node_id,
            Arc::new(raft_config),
            network,
            log.clone(),
            state_machine,
        )
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?;
        let inner = Arc::new(Inner {
            node_id: config.node_id,
            raft: raft.clone(),
            reader,
            log,
            transport,
            tuning,
            tasks: Mutex::new(Vec::new()),
        });
        let handler = Arc::new(NodeHandler {
            inner: Arc::downgrade(&inner),
        });
        let server = quic::serve(endpoint, handler);
        let metrics_task = tokio::spawn(watch_metrics(raft.metrics()));
        inner
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend([server, metrics_task]);
        tracing::info!(node_id = config.node_id, listen = %config.raft_listen, "cluster node started");
        Ok(ClusterNode { inner })
    }

    pub fn node_id(&self) -> NodeId {
        self.inner.node_id
    }

    /// The underlying openraft handle (for tests and tools).
    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// Makes this node a one-member cluster (first node of `cairn cluster init`). Calling it on an
    /// initialized node is an error from openraft that callers may ignore.
    pub async fn initialize(&self, advertise: NodeAddress) -> Result<(), MembershipError> {
        let members = BTreeMap::from([(self.inner.node_id, advertise)]);
        self.inner
            .raft
            .initialize(members)
            .await
            .map_err(|e| MembershipError::Failed(e.to_string()))
    }

    pub async fn is_initialized(&self) -> bool {
        self.inner.raft.is_initialized().await.unwrap_or(false)
    }

    /// Adds `node_id` as a learner and waits until it has caught up (leader only).
    pub async fn add_learner(
        &self,
        node_id: NodeId,
        address: NodeAddress,
    ) -> Result<(), MembershipError> {
        let result = self.inner.raft.add_learner(node_id, address, true).await;
        self.membership_result(result)
    }

    /// Makes `voters` the voting members (learners among them are promoted; voters not in it
    /// become learners). Leader only.
    pub async fn change_membership(&self, voters: BTreeSet<NodeId>) -> Result<(), MembershipError> {
        let result = self
            .inner
            .raft
            .change_membership(ChangeMembers::ReplaceAllVoters(voters), true)
            .await;
        self.membership_result(result)
    }

    /// Removes `node_id` from the cluster, voter or learner. Leader only.
    pub async fn remove_node(&self, node_id: NodeId) -> Result<(), MembershipError> {
        let metrics = self.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let ids = BTreeSet::from([node_id]);
        if membership.voter_ids().any(|id| id == node_id) {
            let result = self
                .inner
                .raft
                .change_membership(ChangeMembers::RemoveVoters(ids.clone()), false)
                .await;
            self.membership_result(result)?;
        }
        let metrics = self.metrics().borrow().clone();
        if metrics
            .membership_config
            .membership()
            .learner_ids()
            .any(|id| id == node_id)
        {
            let result = self
                .inner
                .raft
                .change_membership(ChangeMembers::RemoveNodes(ids), false)
                .await;
            self.membership_result(result)?;
        }
        Ok(())
    }

    fn membership_result<T>(
        &self,
        result: Result<T, RaftError<u64, ClientWriteError<u64, NodeAddress>>>,
    ) -> Result<(), MembershipError> {
        match result {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                Err(MembershipError::NotLeader {
                    this: self.inner.node_id,
                    leader: forward.leader_id.zip(forward.leader_node),
                })
            }
            Err(error) => Err(MembershipError::Failed(error.to_string())),
        }
    }

    /// Proposes `command` on behalf of `actor`; returns its events once committed and applied
    /// (on the leader). Followers forward to the leader; only the leader stamps the time.
    pub async fn propose(&self, actor: Name, command: Command) -> Result<Vec<Event>, ProposeError> {
        let started = Instant::now();
        let result = self.propose_inner(actor, command, started).await;
        crate::metrics::propose_finished(
            started.elapsed().as_secs_f64(),
            matches!(result, Err(ProposeError::Rejected(_))),
        );
        result
    }

    async fn propose_inner(
        &self,
        actor: Name,
        command: Command,
        started: Instant,
    ) -> Result<Vec<Event>, ProposeError> {
        let deadline = started + Duration::from_millis(self.inner.tuning.forward_timeout_ms);
        loop {
            let leader = match self.wait_leader(deadline).await {
                Some(leader) => leader,
                None => {
                    return Err(ProposeError::NoLeader {
                        waited_ms: started.elapsed().as_millis() as u64,
                    })
                }
            };
            let attempt = if leader == self.inner.node_id {
                self.inner
                    .propose_as_leader(actor.clone(), command.clone())
                    .await
            } else {
                self.forward_proposal(leader, actor.clone(), command.clone())
                    .await
            };
            match attempt {
                Ok(events) => return Ok(events),
                Err(ForwardError::Rejected(rejection)) => {
                    return Err(ProposeError::Rejected(rejection))
                }
                // Ambiguous: the leader may have committed it. Retrying could apply it twice.
                Err(ForwardError::Unavailable(reason)) => {
                    return Err(ProposeError::Unavailable(reason))
                }
                Err(error) => {
                    if Instant::now() >= deadline {
                        return Err(ProposeError::Unavailable(error.to_string()));
                    }
                    if let Err(fatal) = &self.metrics().borrow().running_state {
                        return Err(ProposeError::Stopped(fatal.to_string()));
                    }
                    // Leadership moved or the leader is unreachable: retry after a short pause.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    async fn forward_proposal(
        &self,
        leader: NodeId,
        actor: Name,
        command: Command,
    ) -> Result<Vec<Event>, ForwardError> {
        let address = self
            .leader_address(leader)
            .ok_or(ForwardError::NotLeader { leader: None })?;
        let timeout = Duration::from_millis(self.inner.tuning.forward_timeout_ms);
        match self
            .inner
            .transport
            .call(
                leader,
                &address,
                RpcRequest::ForwardProposal { actor, command },
                timeout,
            )
            .await
        {
            Ok(RpcResponse::Proposal(result)) => result,
            Ok(other) => Err(ForwardError::Unavailable(format!(
                "unexpected response {other:?}"
            ))),
            // Nothing reached the leader: safe to retry with whoever leads next.
            Err(error @ TransportError::Unreachable { .. }) => {
                Err(ForwardError::NotLeader { leader: None }).inspect_err(
                    |_| tracing::debug!(%error, leader, "leader unreachable; retrying"),
                )
            }
            // The proposal may or may not have been committed: the caller must find out.
            Err(error) => Err(ForwardError::Unavailable(error.to_string())),
        }
    }

    fn leader_address(&self, leader: NodeId) -> Option<NodeAddress> {
        let metrics = self.metrics().borrow().clone();
        metrics
            .membership_config
            .membership()
            .get_node(&leader)
            .cloned()
    }

    /// Waits (until `deadline`) for a known leader.
    async fn wait_leader(&self, deadline: Instant) -> Option<NodeId> {
        let mut metrics = self.metrics();
        loop {
            if let Some(leader) = metrics.borrow().current_leader {
                return Some(leader);
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

    /// Runs `f` on a linearizable view of the state: it reflects every write committed before
    /// the call. Works on followers (read index from the leader, then wait for apply).
    pub async fn read<T>(&self, f: impl FnOnce(&State) -> T) -> Result<T, ReadError> {
        let started = Instant::now();
        let deadline = started + Duration::from_millis(self.inner.tuning.forward_timeout_ms);
        loop {
            let leader = match self.wait_leader(deadline).await {
                Some(leader) => leader,
                None => {
                    return Err(ReadError::NoLeader {
                        waited_ms: started.elapsed().as_millis() as u64,
                    })
                }
            };
            let index = if leader == self.inner.node_id {
                self.inner.read_index().await
            } else {
                self.remote_read_index(leader).await
            };
            match index {
                Ok(index) => {
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    self.inner
                        .raft
                        .wait(Some(remaining))
                        .applied_index_at_least(Some(index), "linearizable read")
                        .await
                        .map_err(|e| ReadError::Unavailable(e.to_string()))?;
                    return Ok(self.inner.reader.with_state(f));
                }
                Err(error) => {
                    if Instant::now() >= deadline {
                        return Err(ReadError::Unavailable(error.to_string()));
                    }
                    if let Err(fatal) = &self.metrics().borrow().running_state {
                        return Err(ReadError::Stopped(fatal.to_string()));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    async fn remote_read_index(&self, leader: NodeId) -> Result<u64, ForwardError> {
        let address = self
            .leader_address(leader)
            .ok_or(ForwardError::NotLeader { leader: None })?;
        let timeout = Duration::from_millis(self.inner.tuning.forward_timeout_ms);
        match self
            .inner
            .transport
            .call(leader, &address, RpcRequest::ReadIndex, timeout)
            .await
        {
            Ok(RpcResponse::ReadIndex(result)) => result,
            Ok(other) => Err(ForwardError::Unavailable(format!(
                "unexpected response {other:?}"
            ))),
            Err(error) => Err(ForwardError::Unavailable(error.to_string())),
        }
    }

    /// Runs `f` on this node's current projection, which may lag the leader.
    pub fn local_state<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        self.inner.reader.with_state(f)
    }

    /// Up to `limit` events of the stored history from `from_seq` on (this node's copy).
    pub fn events(&self, from_seq: Seq, limit: usize) -> Result<Vec<Event>, StorageError> {
        self.inner.reader.events(from_seq, limit)
    }

    /// Hash of this node's projection.
    pub fn state_hash(&self) -> Hash32 {
        self.inner.reader.with_state(|state| state.hash())
    }

    /// openraft's metrics: term, leader, last log and applied index, membership, running state
    /// (`running_state` is `Err` once the node stopped on a fatal error such as a failed fsync).
    pub fn metrics(&self) -> watch::Receiver<RaftMetrics> {
        self.inner.raft.metrics()
    }

    pub fn leader(&self) -> Option<NodeId> {
        self.metrics().borrow().current_leader
    }

    pub fn is_leader(&self) -> bool {
        self.leader() == Some(self.inner.node_id)
    }

    /// Builds a snapshot now and purges the log up to it (operators and tests).
    pub async fn snapshot_and_purge(&self) -> Result<(), String> {
        self.inner
            .raft
            .trigger()
            .snapshot()
            .await
            .map_err(|e| e.to_string())?;
        let mut metrics = self.metrics();
        let applied = metrics.borrow().last_applied;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let snapshot = metrics.borrow().snapshot;
            if snapshot.is_some() && snapshot >= applied {
                if let Some(log_id) = snapshot {
                    self.inner
                        .raft
                        .trigger()
                        .purge_log(log_id.index)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                return Ok(());
            }
            let remaining = deadline
                .checked_duration_since(Instant::now())
                .ok_or("snapshot timed out")?;
            match tokio::time::timeout(remaining, metrics.changed()).await {
                Ok(Ok(())) => {}
                _ => return Err("snapshot did not complete".into()),
            }
        }
    }

    /// Test hook: makes every later storage write fail as a failed fsync would.
    #[doc(hidden)]
    pub fn inject_storage_failure(&self) {
        self.inner.log.inject_write_failure();
    }

    /// Stops Raft and the endpoint. Storage is released once every handle is dropped.
    pub async fn shutdown(&self) {
        let _ = self.inner.raft.shutdown().await;
        self.inner
            .transport
            .endpoint()
            .close(0u32.into(), b"shutdown");
        for task in self
            .inner
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            task.abort();
        }
        tracing::info!(node_id = self.inner.node_id, "cluster node stopped");
    }
}

impl Inner {
    async fn propose_as_leader(
        &self,
        actor: Name,
        command: Command,
    ) -> Result<Vec<Event>, ForwardError> {
        // The leader's clock, never earlier than the last event (clocks may differ across leaders).
        let time_ms = self
            .reader
            .with_state(|state| now_ms().max(state.last_time_ms));
        let proposal = Proposal {
            actor,
            time_ms,
            command,
        };
        self.reader
            .with_state(|state| state.check(&proposal))
            .map_err(ForwardError::Rejected)?;
        match self.raft.client_write(proposal).await {
            Ok(response) => response.data.map_err(ForwardError::Rejected),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                Err(ForwardError::NotLeader {
                    leader: forward.leader_id,
                })
            }
            Err(error) => Err(ForwardError::Unavailable(error.to_string())),
        }
    }

    async fn read_index(&self) -> Result<u64, ForwardError> {
        match self.raft.ensure_linearizable().await {
            Ok(log_id) => Ok(log_id.map(|id| id.index).unwrap_or(0)),
            Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(
                forward,
            ))) => Err(ForwardError::NotLeader {
                leader: forward.leader_id,
            }),
            Err(error) => Err(ForwardError::Unavailable(error.to_string())),
        }
    }
}

/// Serves peers' RPCs for a node. Holds the node weakly so a stopped node can be dropped.
struct NodeHandler {
    inner: Weak<Inner>,
}

impl RpcHandler for NodeHandler {
    async fn handle(&self, _from: NodeId, request: RpcRequest) -> RpcResponse {
        let Some(inner) = self.inner.upgrade() else {
            return RpcResponse::Refused("node is shutting down".into());
        };
        match request {
            RpcRequest::AppendEntries(rpc) => {
                RpcResponse::AppendEntries(inner.raft.append_entries(rpc).await)
            }
            RpcRequest::Vote(rpc) => RpcResponse::Vote(inner.raft.vote(rpc).await),
            RpcRequest::InstallSnapshot(rpc) => {
                RpcResponse::InstallSnapshot(inner.raft.install_snapshot(rpc).await)
            }
            RpcRequest::ForwardProposal { actor, command } => {
                RpcResponse::Proposal(inner.propose_as_leader(actor, command).await)
            }
            RpcRequest::ReadIndex => RpcResponse::ReadIndex(inner.read_index().await),
        }
    }
}

async fn watch_metrics(mut metrics: watch::Receiver<RaftMetrics>) {
    loop {
        let snapshot = metrics.borrow().clone();
        crate::metrics::observe(&snapshot);
        if let Err(fatal) = &snapshot.running_state {
            if matches!(fatal, openraft::error::Fatal::Stopped) {
                tracing::info!(node_id = snapshot.id, "raft stopped");
            } else {
                tracing::error!(node_id = snapshot.id, error = %fatal, "raft stopped on a fatal error");
            }
            return;
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}
