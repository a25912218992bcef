//! The node's data path: its chunk store, the iSCSI target on its portal, and the reconciler
//! that makes both follow the replicated state.
//!
//! - Every node keeps every ready image version: a version it lacks is pulled from a peer that
//!   has it (manifest and chunks over the admin API, each chunk verified against its hash on
//!   receipt), so any node can be chosen as a client's primary.
//! - The sessions' volumes, their targets and their mirror are `crate::sessions`; this module
//!   runs the reconciler that feeds it the committed sessions.
//! - The store lives in `<data_dir>/store`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};

use cairn_blockstore::chunks::{ChunkHash, ChunkStore, ChunkStoreConfig};
use cairn_blockstore::image::{Manifest, ManifestHash};
use cairn_blockstore::iscsi::Target;
use cairn_consensus::domain::{Hash32, Mac, VersionState};
use cairn_consensus::ClusterNode;

use crate::config::NodeConfig;
use crate::sessions::Wanted;

/// The initiator name a client uses (the iPXE script sets it) and the only one its target admits.
pub fn initiator_name_for_client(mac: &Mac) -> String {
    format!("iqn.2026-11.org.cairn:initiator.{}", mac.to_compact())
}

pub fn manifest_hash(hash: &Hash32) -> ManifestHash {
    ManifestHash(ChunkHash(hash.0))
}

pub struct Storage {
    pub store: Arc<ChunkStore>,
    pub target: Target,
    /// The sessions this node serves, as primary or standby.
    pub sessions: crate::sessions::Sessions,
}

impl Storage {
    pub fn open(config: &NodeConfig) -> anyhow::Result<Arc<Storage>> {
        let store = ChunkStore::open(&config.data_dir.join("store"), ChunkStoreConfig::default())
            .with_context(|| {
            format!("opening the chunk store in {}", config.data_dir.display())
        })?;
        let store = Arc::new(store);
        let target = Target::new();
        Ok(Arc::new(Storage {
            sessions: crate::sessions::Sessions::new(config, store.clone(), target.clone()),
            store,
            target,
        }))
    }

    pub fn has_manifest(&self, hash: &Hash32) -> bool {
        self.store.load_manifest(&manifest_hash(hash)).is_ok()
    }

    /// Whether this node serves `mac`'s volume as primary at `generation` or a later one.
    pub fn serves_primary(&self, mac: &Mac, generation: u64) -> bool {
        self.sessions.serves_primary(mac, generation)
    }

    /// Waits (at most `timeout`) until this node serves `mac` as primary at `generation` or
    /// later: the script server answers iPXE only once the target its script names is up.
    pub async fn wait_serving(&self, mac: &Mac, generation: u64, timeout: Duration) -> bool {
        self.sessions.wait_serving(mac, generation, timeout).await
    }

    /// Makes every served volume's layer durable (at shutdown).
    pub fn flush_all(&self) {
        self.sessions.flush_all();
    }

    /// Fetches a manifest and its missing chunks from `peer_api`, verifying every chunk.
    async fn pull(
        self: &Arc<Self>,
        http: &reqwest::Client,
        peer_api: &str,
        token: &str,
        hash: Hash32,
    ) -> anyhow::Result<()> {
        let get = |path: String| async move {
            http.get(format!("{peer_api}{path}"))
                .bearer_auth(token)
                .send()
                .await?
                .error_for_status()?
                .bytes()
                .await
        };
        let bytes = get(format!("/v1/store/manifests/{hash}")).await?;
        let manifest = Manifest::decode(&bytes)
            .map_err(|e| anyhow!("manifest {hash} from {peer_api}: {e}"))?;
        if manifest.hash() != manifest_hash(&hash) {
            anyhow::bail!("manifest from {peer_api} does not hash to {hash}");
        }
        for chunk in self.store.missing_chunks(&manifest) {
            let data = get(format!("/v1/store/chunks/{chunk}")).await?;
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || store.put_chunk_verified(&chunk, &data))
                .await?
                .map_err(|e| anyhow!("chunk {chunk} from {peer_api}: {e}"))?;
        }
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.commit_manifest(&manifest))
            .await?
            .map_err(|e| anyhow!("{e}"))?;
        Ok(())
    }
}

/// Starts the iSCSI portal, the sessions' mirror driver and the reconciler; returns their
/// tasks.
pub async fn start(
    storage: Arc<Storage>,
    cluster: ClusterNode,
    config: &NodeConfig,
    http: reqwest::Client,
    node_token: String,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let listener = tokio::net::TcpListener::bind(config.iscsi())
        .await
        .map_err(|e| anyhow!("cannot listen for iSCSI on {}: {e}", config.iscsi()))?;
    let target = storage.target.clone();
    let portal = config.iscsi();
    let serve = tokio::spawn(async move {
        if let Err(error) = target.serve(listener).await {
            tracing::error!(%portal, %error, "iSCSI portal stopped");
        }
    });
    let mut tasks = crate::sessions::start(storage.clone(), cluster.clone());
    let node_id = config.node_id;
    let reconcile = tokio::spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_millis(250));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Raft's metrics change when an entry is applied: a new boot session is served as soon
        // as it is applied here, not at the next tick (the script server waits for it).
        let mut metrics = cluster.metrics();
        // Reconcile when what this node should serve changed or a pull brought a version in;
        // otherwise idle.
        let mut last: Option<(Wanted, bool)> = None;
        let mut last_seq = None;
        loop {
            let ticked = tokio::select! {
                biased;
                changed = metrics.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    false
                }
                _ = interval.tick() => true,
            };
            let mut pulled = false;
            if ticked {
                pulled = storage
                    .pull_missing(&cluster, &http, &node_token, node_id)
                    .await;
            }
            // Metrics change on heartbeats too: look at the sessions only when the history moved.
            let (seq, wanted) = cluster.local_state(|s| {
                let moved = ticked || last_seq != Some(s.last_seq);
                if moved {
                    storage.sessions.list_targets(s);
                }
                (s.last_seq, moved.then(|| storage.sessions.wanted(s)))
            });
            last_seq = Some(seq);
            let Some(wanted) = wanted else {
                continue;
            };
            // An incomplete pass is retried at the next tick, not at every applied entry.
            let unchanged = last
                .as_ref()
                .is_some_and(|(before, complete)| (*complete || !ticked) && *before == wanted);
            if unchanged && !pulled {
                continue;
            }
            let pass = {
                let storage = storage.clone();
                let wanted = wanted.clone();
                tokio::task::spawn_blocking(move || storage.sessions.reconcile(wanted))
            };
            let complete = pass.await.unwrap_or(false);
            last = Some((wanted, complete));
        }
    });
    tasks.extend([serve, reconcile]);
    Ok(tasks)
}

impl Storage {
    /// Pulls every ready version this node lacks from a peer that has it; true if one came in.
    async fn pull_missing(
        self: &Arc<Self>,
        cluster: &ClusterNode,
        http: &reqwest::Client,
        node_token: &str,
        node_id: u64,
    ) -> bool {
        let mut pulled = false;
        // Pull every ready version this node lacks from a peer that has it.
        let (needed, peers): (Vec<Hash32>, Vec<String>) = cluster.local_state(|s| {
            let needed = s
                .images
                .values()
                .flat_map(|i| i.versions.values())
                .filter(|v| v.state == VersionState::Ready)
                .filter_map(|v| v.manifest)
                .collect();
            let peers = s
                .nodes
                .values()
                .filter(|n| n.node_id != node_id)
                .map(|n| n.api_address.clone())
                .collect();
            (needed, peers)
        });
        for hash in needed.into_iter().filter(|h| !self.has_manifest(h)) {
            for peer in &peers {
                match self.pull(http, peer, node_token, hash).await {
                    Ok(()) => {
                        tracing::info!(manifest = %hash, from = %peer, "image version replicated");
                        pulled = true;
                        break;
                    }
                    Err(error) => {
                        tracing::debug!(manifest = %hash, from = %peer, %error, "pull failed")
                    }
                }
            }
        }
        pulled
    }
}
