//! `cairn node run`: one node's process. It starts the replicated state (`ClusterNode`), the
//! admin API, and the node's background duties (finishing `cluster init`, promoting caught-up
//! learners to voters while it leads).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use cairn_consensus::domain::{Command, Hash32, Name, Rejection};
use cairn_consensus::{
    ClusterCa, ClusterNode, NodeAddress, NodeIdentity, ProposeError, RaftTuning,
};

use crate::api::{self, ApiState};
use crate::config::{write_private, NodeConfig};
use crate::https;

/// Files in a node's data directory besides `node.toml` and the Raft store.
pub struct DataFiles {
    dir: PathBuf,
}

impl DataFiles {
    pub fn new(data_dir: &Path) -> DataFiles {
        DataFiles {
            dir: data_dir.to_owned(),
        }
    }
    pub fn tls_dir(&self) -> PathBuf {
        self.dir.join("tls")
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.tls_dir().join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.tls_dir().join("ca.key")
    }
    pub fn node_cert(&self) -> PathBuf {
        self.tls_dir().join("node.pem")
    }
    pub fn node_key(&self) -> PathBuf {
        self.tls_dir().join("node.key")
    }
    /// Present between `cluster init` and the first start that finished initialising.
    pub fn init_pending(&self) -> PathBuf {
        self.dir.join("init-pending.json")
    }

    pub fn write_tls(
        &self,
        ca_cert: &str,
        ca_key: &str,
        node_cert: &str,
        node_key: &str,
    ) -> anyhow::Result<()> {
        std::fs::create_dir_all(self.tls_dir())
            .with_context(|| format!("cannot create {}", self.tls_dir().display()))?;
        for (path, text) in [
            (self.ca_cert(), ca_cert),
            (self.ca_key(), ca_key),
            (self.node_cert(), node_cert),
            (self.node_key(), node_key),
        ] {
            write_private(&path, text.as_bytes())?;
        }
        Ok(())
    }

    pub fn load_tls(&self, node_id: u64) -> anyhow::Result<(ClusterCa, NodeIdentity)> {
        let read = |path: PathBuf| {
            std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))
        };
        let ca_cert = read(self.ca_cert())?;
        let ca = ClusterCa::from_pem(&ca_cert, &read(self.ca_key())?)
            .map_err(|e| anyhow::anyhow!("cluster ca: {e}"))?;
        let identity = NodeIdentity {
            node_id,
            cert_pem: read(self.node_cert())?,
            key_pem: read(self.node_key())?,
            ca_cert_pem: ca_cert,
        };
        Ok((ca, identity))
    }
}

/// What `cluster init` leaves for the first start: the first admin token's digest.
#[derive(Debug, Serialize, Deserialize)]
pub struct InitPending {
    pub admin_token_name: Name,
    pub admin_token_digest: Hash32,
}

/// A node running in this process.
pub struct RunningNode {
    pub cluster: ClusterNode,
    pub config: NodeConfig,
    storage: Arc<crate::storage::Storage>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningNode {
    pub async fn shutdown(self) {
        for task in &self.tasks {
            task.abort();
        }
        // Writes under the initiator's write cache become durable before the process goes.
        let storage = self.storage.clone();
        let _ = tokio::task::spawn_blocking(move || storage.flush_all()).await;
        self.cluster.shutdown().await;
    }
}

/// Starts every part of a node and returns once its API listens.
pub async fn start(
    config: NodeConfig,
    prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
) -> anyhow::Result<RunningNode> {
    raise_open_files_limit();
    let files = DataFiles::new(&config.data_dir);
    let (ca, identity) = files.load_tls(config.node_id)?;
    let advertise = NodeAddress::new(config.raft(), config.api_url());
    let cluster = ClusterNode::start(cairn_consensus::NodeConfig {
        node_id: config.node_id,
        data_dir: config.data_dir.clone(),
        raft_listen: config.raft(),
        advertise: advertise.clone(),
        identity: identity.clone(),
        tuning: RaftTuning::default(),
    })
    .await
    .with_context(|| format!("starting node {}", config.node_id))?;

    let http = https::client(&identity.ca_cert_pem)?;
    let node_token = crate::secrets::node_token(&ca.key_pem());
    let storage = crate::storage::Storage::open(&config)?;
    let storage_tasks = crate::storage::start(
        storage.clone(),
        cluster.clone(),
        &config,
        http.clone(),
        node_token.clone(),
    )
    .await?;
    let state = Arc::new(ApiState {
        cluster: cluster.clone(),
        config: config.clone(),
        ca,
        prometheus,
        http,
        storage: storage.clone(),
        node_token,
    });
    let listener = https::bind(config.api()).await?;
    let router = api::router(state.clone());
    let api_identity = identity.clone();
    let mut tasks = vec![tokio::spawn(async move {
        if let Err(error) = https::serve(listener, &api_identity, router).await {
            tracing::error!(%error, "admin api stopped");
        }
    })];

    let pending_path = files.init_pending();
    if pending_path.exists() {
        finish_init(&cluster, &config, &advertise, &pending_path).await?;
    }
    tasks.extend(storage_tasks);
    tasks.push(tokio::spawn(stop_on_fatal_storage_error(cluster.clone())));
    tasks.push(tokio::spawn(check_peer_health(
        cluster.clone(),
        state.http.clone(),
    )));
    tasks.extend(crate::boot::start(
        cluster.clone(),
        &config,
        crate::boot::PrimaryProbe {
            storage: storage.clone(),
            http: state.http.clone(),
            node_token: state.node_token.clone(),
        },
    ));
    tasks.push(tokio::spawn(promote_learners(
        cluster.clone(),
        config.voters_max,
    )));
    tracing::info!(node_id = config.node_id, api = %config.api(), raft = %config.raft(), "node running");
    Ok(RunningNode {
        cluster,
        config,
        storage,
        tasks,
    })
}

/// The chunk store keeps up to 16,384 chunk files open (half the soft limit at most), besides
/// sockets for every iSCSI session: take the hard limit of open files, which systemd and most
/// distributions set far above the soft 1,024.
fn raise_open_files_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    // `None` is unlimited, which the kernel refuses for open files: take a large number instead.
    let wanted = limit.maximum.unwrap_or(65_536);
    if limit.current.is_none_or(|current| current >= wanted) {
        return;
    }
    let raised = Rlimit {
        current: Some(wanted),
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => tracing::debug!(from = ?limit.current, to = wanted, "open files limit raised"),
        Err(error) => {
            tracing::warn!(%error, current = ?limit.current, "cannot raise the open files limit")
        }
    }
}

/// Second half of `cluster init`, on the first start: make this node a one-member cluster,
/// record it and the first admin token. Every step tolerates having been done already, so a
/// crash in between is repaired by the next start.
async fn finish_init(
    cluster: &ClusterNode,
    config: &NodeConfig,
    advertise: &NodeAddress,
    pending_path: &Path,
) -> anyhow::Result<()> {
    let pending: InitPending = serde_json::from_slice(&std::fs::read(pending_path)?)
        .with_context(|| format!("cannot parse {}", pending_path.display()))?;
    if !cluster.is_initialized().await {
        cluster
            .initialize(advertise.clone())
            .await
            .map_err(|e| anyhow::anyhow!("initialising raft: {e}"))?;
    }
    let actor = node_actor(config.node_id);
    let commands = [
        Command::RegisterNode {
            node_id: config.node_id,
            name: Name::new(config.name.clone())?,
            raft_address: config.raft().to_string(),
            api_address: config.api_url(),
            portal_address: config.iscsi().to_string(),
            boot_address: format!("http://{}", config.boot_http()),
            capacity_sessions: config.capacity_sessions,
        },
        Command::CreateToken {
            name: pending.admin_token_name.clone(),
            digest: pending.admin_token_digest,
        },
    ];
    for command in commands {
        loop {
            match cluster.propose(actor.clone(), command.clone()).await {
                Ok(_) | Err(ProposeError::Rejected(Rejection::AlreadyExists { .. })) => break,
                Err(ProposeError::Rejected(rejection)) => {
                    anyhow::bail!("initialising the cluster: {rejection}")
                }
                Err(error) => {
                    tracing::info!(%error, "waiting for the new cluster to elect this node");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
    std::fs::remove_file(pending_path)?;
    tracing::info!(node_id = config.node_id, "cluster initialised");
    Ok(())
}

/// A node whose Raft log cannot be written (a failed fsync) must not go on serving volumes and
/// answering boots from a state it can no longer keep: it exits, and its clients fail over.
async fn stop_on_fatal_storage_error(cluster: ClusterNode) {
    let mut metrics = cluster.metrics();
    loop {
        let fatal = match &metrics.borrow().running_state {
            Err(openraft::error::Fatal::Stopped) | Ok(()) => None,
            Err(fatal) => Some(fatal.to_string()),
        };
        if let Some(fatal) = fatal {
            tracing::error!(error = %fatal, "raft stopped on a fatal error; the node exits");
            crate::exit_now(70);
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// Consecutive failed probes after which the leader marks a node unhealthy (boot placement then
/// skips it); one good probe marks it healthy again.
const HEALTH_FAILURES_MAX: u32 = 3;
const HEALTH_PROBE_INTERVAL_MS: u64 = 1000;
/// How long the leader waits before it gives a session back the standby it just lost.
const STANDBY_REASSIGN_BACKOFF: Duration = Duration::from_secs(5);

/// While this node leads: probe every other registered node's `/health` and record changes of
/// health in the replicated state (`SetNodeHealth`), so that boots are not placed on dead nodes.
async fn check_peer_health(cluster: ClusterNode, http: reqwest::Client) {
    let mut failures: std::collections::BTreeMap<u64, u32> = std::collections::BTreeMap::new();
    // Each session's last standby, and when this leader first saw the session without it.
    let mut last_standby: std::collections::BTreeMap<
        cairn_consensus::domain::Mac,
        (u64, Option<std::time::Instant>),
    > = std::collections::BTreeMap::new();
    let mut interval = tokio::time::interval(Duration::from_millis(HEALTH_PROBE_INTERVAL_MS));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let actor = node_actor(cluster.node_id());
    loop {
        interval.tick().await;
        if !cluster.is_leader() {
            failures.clear();
            last_standby.clear();
            continue;
        }
        let peers: Vec<(u64, String, bool)> = cluster.local_state(|s| {
            s.nodes
                .values()
                .filter(|n| n.node_id != cluster.node_id())
                .map(|n| (n.node_id, n.api_address.clone(), n.healthy))
                .collect()
        });
        for (node_id, api, healthy) in peers {
            // Any HTTP answer means the process is up (503 only says it sees no leader yet).
            let up = http
                .get(format!("{api}/health"))
                .timeout(Duration::from_millis(800))
                .send()
                .await
                .is_ok();
            let count = failures.entry(node_id).or_default();
            *count = if up { 0 } else { count.saturating_add(1) };
            let verdict = if up {
                Some(true)
            } else if *count >= HEALTH_FAILURES_MAX {
                Some(false)
            } else {
                None
            };
            if let Some(now_healthy) = verdict.filter(|v| *v != healthy) {
                let command = Command::SetNodeHealth {
                    node_id,
                    healthy: now_healthy,
                };
                match cluster.propose(actor.clone(), command).await {
                    Ok(_) => tracing::warn!(node_id, healthy = now_healthy, "node health changed"),
                    Err(error) => tracing::debug!(node_id, %error, "recording node health failed"),
                }
            }
        }
        // Sessions without a standby (one copy) get one as soon as a node can take it; its
        // copy is then resynced in the background. Not a node whose last probe failed, and
        // not, for a while, the node just dropped as this session's standby: its process may
        // answer probes while the mirror cannot reach it (a cut link), and giving it back at
        // once would drop it again ~0.7 s later, over and over.
        let now = std::time::Instant::now();
        let degraded: Vec<(cairn_consensus::domain::Mac, u64)> = cluster.local_state(|s| {
            let mut degraded = Vec::new();
            for session in s.boot_sessions.values() {
                if let Some(standby) = session.standby {
                    last_standby.insert(session.mac, (standby, None));
                    continue;
                }
                let dropped = last_standby.get_mut(&session.mac).map(|(node, at)| {
                    let at = *at.get_or_insert(now);
                    (*node, at)
                });
                let Some(pick) = s.pick_standby_for(session) else {
                    continue;
                };
                let failing = failures.get(&pick).copied().unwrap_or(0) > 0;
                let just_dropped = dropped.is_some_and(|(node, at)| {
                    node == pick && now.duration_since(at) < STANDBY_REASSIGN_BACKOFF
                });
                if !failing && !just_dropped {
                    degraded.push((session.mac, session.generation));
                }
            }
            degraded
        });
        for (mac, generation) in degraded {
            let command = Command::AssignStandby { mac, generation };
            if let Err(error) = cluster.propose(actor.clone(), command).await {
                tracing::debug!(client_mac = %mac, %error, "no standby assigned");
            }
        }
    }
}

pub fn node_actor(node_id: u64) -> Name {
    Name::new(format!("node-{node_id}")).expect("node actor names are valid")
}

/// While this node leads: learners that are registered storage nodes and have caught up with
/// the log become voters, up to `voters_max`. More nodes stay learners (they still serve volumes).
async fn promote_learners(cluster: ClusterNode, voters_max: usize) {
    let mut interval = tokio::time::interval(Duration::from_millis(500));
    loop {
        interval.tick().await;
        if !cluster.is_leader() {
            continue;
        }
        let metrics = cluster.metrics().borrow().clone();
        let membership = metrics.membership_config.membership().clone();
        let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        if voters.len() >= voters_max {
            continue;
        }
        let last_index = metrics.last_log_index.unwrap_or(0);
        let Some(replication) = metrics.replication.as_ref() else {
            continue;
        };
        let caught_up = membership.learner_ids().find(|id| {
            let registered = cluster.local_state(|s| s.nodes.contains_key(id));
            let matched = replication
                .get(id)
                .and_then(|m| m.as_ref())
                .map(|log_id| log_id.index)
                .unwrap_or(0);
            registered && matched + 16 >= last_index
        });
        if let Some(id) = caught_up {
            let mut new_voters = voters.clone();
            new_voters.insert(id);
            match cluster.change_membership(new_voters).await {
                Ok(()) => tracing::info!(node_id = id, "learner promoted to voter"),
                Err(error) => tracing::warn!(node_id = id, %error, "promotion failed; will retry"),
            }
        }
    }
}
