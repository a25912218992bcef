//! `ClusterNode`: one member of the Raft cluster, as the `cairn` binary drives it.
//!
//! It owns the RocksDB stores, the QUIC endpoint (serving Raft and application RPCs) and the
//! openraft instance, and runs the storage- and network-independent `service::RaftService` on
//! them: writes go to the leader (followers forward them; the leader stamps the time),
//! linearizable reads use a read index from the leader, stale reads use the local projection.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::SnapshotPolicy;
use tokio::sync::watch;

use crate::domain::{Command, Event, Hash32, Name, NodeId, Seq, State};
use crate::network::NetworkFactory;
use crate::quic::{self, QuicError, QuicTransport};
use crate::service::{
    system_clock, MembershipChange, MembershipError, ProposeError, RaftService, ReadError,
    ServiceHandler, ServiceTimeouts,
};
use crate::store::rocks::{self, OpenError, RocksLogStore, StateReader};
use crate::tls::NodeIdentity;
use crate::types::{NodeAddress, Raft, RaftMetrics, StorageError};

/// Raft timing and log-compaction settings. Defaults aim at a new writable leader well within
/// 1.5 s of a leader loss on a LAN: openraft 0.9 lets a follower that knows a leader campaign only
/// after `election_timeout_max` (its leader lease) plus its own timeout drawn from
/// `[election_timeout_min_ms, election_timeout_max_ms)` without hearing from it, checked every
/// 1.5 heartbeat intervals: 600-875 ms of silence here (a node that lost a split vote waits
/// another timeout). Ten or more missed heartbeats, so a loaded but live leader is not deposed.
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
    /// How long a write or read looks for a leader; deadline of one forwarded request.
    pub forward_timeout_ms: u64,
    /// Deadline of a membership change (adding a learner waits until it caught up).
    pub membership_timeout_ms: u64,
    /// Elections go through pre-vote (`prevote`): openraft's own election timer is off and the
    /// campaign guard plays it. Off, openraft campaigns on its own (kept for before/after runs).
    pub pre_vote: bool,
    /// The leader cuts its next entry when its log has flushed the previous one
    /// (`proposer::Proposer::pace_by_flushes`); off, the older rule of at most two entries in
    /// flight holds (kept for before/after benchmarks).
    pub proposal_flush_pacing: bool,
}

impl Default for RaftTuning {
    fn default() -> RaftTuning {
        RaftTuning {
            heartbeat_interval_ms: 50,
            election_timeout_min_ms: 200,
            election_timeout_max_ms: 400,
            snapshot_after_entries: 10_000,
            logs_kept_after_snapshot: 1_000,
            snapshot_chunk_bytes: 1024 * 1024,
            snapshot_chunk_timeout_ms: 5_000,
            forward_timeout_ms: 5_000,
            membership_timeout_ms: 120_000,
            proposal_flush_pacing: true,
            pre_vote: true,
        }
    }
}

impl RaftTuning {
    /// The openraft configuration these settings mean.
    pub fn raft_config(&self) -> Result<openraft::Config, String> {
        openraft::Config {
            cluster_name: "cairn".into(),
            heartbeat_interval: self.heartbeat_interval_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            install_snapshot_timeout: self.snapshot_chunk_timeout_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_after_entries),
            max_in_snapshot_log_to_keep: self.logs_kept_after_snapshot,
            snapshot_max_chunk_size: self.snapshot_chunk_bytes as u64,
            // With pre-vote the campaign guard decides when to campaign (`prevote`).
            enable_elect: !self.pre_vote,
            ..Default::default()
        }
        .validate()
        .map_err(|e| e.to_string())
    }

    pub fn service_timeouts(&self) -> ServiceTimeouts {
        ServiceTimeouts {
            forward_timeout_ms: self.forward_timeout_ms,
            membership_timeout_ms: self.membership_timeout_ms,
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

type Service = RaftService<StateReader, QuicTransport>;

struct Inner {
    service: Arc<Service>,
    reader: StateReader,
    log: RocksLogStore,
    stream_handler: Arc<crate::streams::StreamHandler>,
    peer_streams: crate::streams::PeerStreams,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// A running cluster member. Clones are handles to the same node.
#[derive(Clone)]
pub struct ClusterNode {
    inner: Arc<Inner>,
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
        let raft_config = config.tuning.raft_config().map_err(StartError::Config)?;
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
        // The proposer cuts the leader's next entry when the log has flushed the previous one
        // (see `proposer::BATCHES_IN_FLIGHT_PACED_MAX`). The writer thread only marks the flush
        // and signals; the entry is started on the runtime.
        let mut tasks = Vec::new();
        if config.tuning.proposal_flush_pacing {
            let (hook, pacer) = crate::proposer::Proposer::pace_by_flushes(
                &raft,
                Duration::from_millis(config.tuning.forward_timeout_ms),
            );
            log.on_flushed(hook);
            tasks.push(pacer);
        }
        let service = Arc::new(RaftService {
            node_id: config.node_id,
            raft: raft.clone(),
            state: reader.clone(),
            transport,
            clock: system_clock(),
            timeouts: config.tuning.service_timeouts(),
        });
        if config.tuning.pre_vote {
            tasks.push(crate::prevote::spawn_campaign_guard(
                &service,
                rand::random(),
            ));
        }
        let stream_handler = Arc::new(crate::streams::StreamHandler::default());
        let peer_streams = crate::streams::PeerStreams::new(
            service.transport.clone(),
            tokio::runtime::Handle::current(),
        );
        let server = quic::serve(
            endpoint,
            Arc::new(ServiceHandler::new(&service)),
            stream_handler.clone(),
        );
        let metrics_task = tokio::spawn(watch_metrics(raft.metrics()));
        tasks.extend([server, metrics_task]);
        let inner = Arc::new(Inner {
            service,
            reader,
            log,
            stream_handler,
            peer_streams,
            tasks: Mutex::new(tasks),
        });
        tracing::info!(node_id = config.node_id, listen = %config.raft_listen, "cluster node started");
        Ok(ClusterNode { inner })
    }

    /// Sends `frame` on this node's one-way stream to `peer` (see `streams`); false if the
    /// peer is unknown or the frame was dropped.
    pub fn send_to_peer(&self, peer: NodeId, frame: crate::streams::Frame) -> bool {
        let address = self.local_state(|state| {
            state.nodes.get(&peer).map(|node| NodeAddress {
                raft: node.raft_address.clone(),
                api: node.api_address.clone(),
            })
        });
        match address {
            Some(address) => self.inner.peer_streams.send(peer, &address, frame),
            None => false,
        }
    }

    /// Sets what receives the frames peers send on their one-way streams (once).
    pub fn set_stream_handler(&self, handler: crate::streams::FrameHandler) {
        self.inner.stream_handler.set(handler);
    }

    pub fn node_id(&self) -> NodeId {
        self.inner.service.node_id
    }

    /// The underlying openraft handle (for tests and tools).
    pub fn raft(&self) -> &Raft {
        &self.inner.service.raft
    }

    /// Makes this node a one-member cluster (first node of `cairn cluster init`). Fails on a node
    /// that is already initialized.
    pub async fn initialize(&self, advertise: NodeAddress) -> Result<(), MembershipError> {
        self.inner.service.initialize(advertise).await
    }

    pub async fn is_initialized(&self) -> bool {
        self.raft().is_initialized().await.unwrap_or(false)
    }

    /// Adds `node_id` as a learner and waits until it has caught up. Any member may call it: the
    /// change is forwarded to the leader.
    pub async fn add_learner(
        &self,
        node_id: NodeId,
        address: NodeAddress,
    ) -> Result<(), MembershipError> {
        self.inner
            .service
            .change_membership(MembershipChange::AddLearner { node_id, address })
            .await
    }

    /// Makes `voters` the voting members (learners among them are promoted; voters not in it
    /// become learners). Forwarded to the leader.
    pub async fn change_membership(&self, voters: BTreeSet<NodeId>) -> Result<(), MembershipError> {
        self.inner
            .service
            .change_membership(MembershipChange::SetVoters(voters))
            .await
    }

    /// Removes `node_id` from the cluster, voter or learner. Forwarded to the leader.
    pub async fn remove_node(&self, node_id: NodeId) -> Result<(), MembershipError> {
        self.inner
            .service
            .change_membership(MembershipChange::Remove(node_id))
            .await
    }

    /// Proposes `command` on behalf of `actor`; returns its events once committed and applied
    /// (on the leader). Followers forward to the leader; only the leader stamps the time.
    pub async fn propose(&self, actor: Name, command: Command) -> Result<Vec<Event>, ProposeError> {
        self.inner.service.propose(actor, command).await
    }

    /// Runs `f` on a linearizable view of the state (works on followers).
    pub async fn read<T>(&self, f: impl FnOnce(&State) -> T) -> Result<T, ReadError> {
        self.inner.service.read(f).await
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
    /// (`running_state` is `Err` once the node stopped on a fatal error such as a failed fsync:
    /// the binary should then exit).
    pub fn metrics(&self) -> watch::Receiver<RaftMetrics> {
        self.raft().metrics()
    }

    pub fn leader(&self) -> Option<NodeId> {
        self.metrics().borrow().current_leader
    }

    pub fn is_leader(&self) -> bool {
        self.leader() == Some(self.node_id())
    }

    /// Builds a snapshot now and purges the log up to it (operators and tests).
    pub async fn snapshot_and_purge(&self) -> Result<(), String> {
        self.raft()
            .trigger()
            .snapshot()
            .await
            .map_err(|e| e.to_string())?;
        let mut metrics = self.metrics();
        let applied = metrics.borrow().last_applied;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let snapshot = metrics.borrow().snapshot;
            if snapshot.is_some() && snapshot >= applied {
                if let Some(log_id) = snapshot {
                    self.raft()
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
        let _ = self.raft().shutdown().await;
        self.inner
            .service
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
        tracing::info!(node_id = self.node_id(), "cluster node stopped");
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
