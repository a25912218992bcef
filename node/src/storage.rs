//! The node's data path: its chunk store, the iSCSI target on its portal, and the reconciler
//! that makes both follow the replicated state.
//!
//! - Every node keeps every ready image version: a version it lacks is pulled from a peer that
//!   has it (manifest and chunks over the admin API, each chunk verified against its hash on
//!   receipt), so any node can be chosen as a client's primary.
//! - A client's volume is served only by the node its boot session names as primary, at the
//!   session's generation. The standby does not serve it yet: until writes are mirrored (a later
//!   issue) two writable copies would diverge, and iPXE falls back to the second path only when
//!   the first fails. A new session at a higher generation fences the old volume handle, and a
//!   non-persistent layer is reset to the session's base version.
//! - Volumes live in `<data_dir>/volumes/<mac>/<image>`; the store in `<data_dir>/store`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context};

use cairn_blockstore::chunks::{ChunkHash, ChunkStore, ChunkStoreConfig};
use cairn_blockstore::image::{Manifest, ManifestHash};
use cairn_blockstore::iscsi::{target_name_for_client, Target, TargetConfig};
use cairn_blockstore::volume::{Volume, VolumeOptions, VolumeSpec};
use cairn_consensus::domain::{DiskMode, Hash32, Mac, Name, State, VersionState};
use cairn_consensus::ClusterNode;

use crate::config::NodeConfig;

/// The initiator name a client uses (the iPXE script sets it) and the only one its target admits.
pub fn initiator_name_for_client(mac: &Mac) -> String {
    format!("iqn.2026-11.org.cairn:initiator.{}", mac.to_compact())
}

pub fn manifest_hash(hash: &Hash32) -> ManifestHash {
    ManifestHash(ChunkHash(hash.0))
}

struct Served {
    iqn: String,
    image: Name,
    generation: u64,
    volume: Arc<Volume>,
}

pub struct Storage {
    pub store: Arc<ChunkStore>,
    pub target: Target,
    node_id: u64,
    data_dir: PathBuf,
    served: Mutex<BTreeMap<Mac, Served>>,
    /// Extra initiator names every volume admits (for tests and tools such as libiscsi's suite).
    extra_initiators: Vec<String>,
}

impl Storage {
    pub fn open(config: &NodeConfig) -> anyhow::Result<Arc<Storage>> {
        let store = ChunkStore::open(&config.data_dir.join("store"), ChunkStoreConfig::default())
            .with_context(|| {
            format!("opening the chunk store in {}", config.data_dir.display())
        })?;
        Ok(Arc::new(Storage {
            store: Arc::new(store),
            target: Target::new(),
            node_id: config.node_id,
            data_dir: config.data_dir.clone(),
            served: Mutex::new(BTreeMap::new()),
            extra_initiators: config.iscsi_extra_initiators.clone(),
        }))
    }

    pub fn has_manifest(&self, hash: &Hash32) -> bool {
        self.store.load_manifest(&manifest_hash(hash)).is_ok()
    }

    /// Makes the served volumes match the boot sessions that name this node primary.
    pub fn reconcile_volumes(&self, state: &State) {
        let mut served = self.served.lock().unwrap_or_else(|p| p.into_inner());
        let wanted: BTreeMap<Mac, _> = state
            .boot_sessions
            .values()
            .filter(|s| s.primary == self.node_id)
            .filter_map(|session| {
                let version = state
                    .images
                    .get(&session.image)?
                    .versions
                    .get(&session.version)?;
                let manifest = version
                    .manifest
                    .filter(|_| version.state != VersionState::Importing)?;
                Some((session.mac, (session.clone(), manifest)))
            })
            .collect();
        let gone: Vec<Mac> = served
            .keys()
            .filter(|mac| !wanted.contains_key(mac))
            .copied()
            .collect();
        for mac in gone {
            if let Some(old) = served.remove(&mac) {
                self.stop_serving(old);
            }
        }
        for (mac, (session, manifest)) in wanted {
            if served
                .get(&mac)
                .is_some_and(|s| s.generation == session.generation && s.image == session.image)
            {
                continue;
            }
            if !self.has_manifest(&manifest) {
                // The pull loop fetches it; the next pass serves the volume.
                continue;
            }
            if let Some(old) = served.remove(&mac) {
                self.stop_serving(old);
            }
            match self.serve(
                &mac,
                &session.image,
                manifest,
                session.mode,
                session.generation,
            ) {
                Ok(entry) => {
                    tracing::info!(client_mac = %mac, image = %session.image, generation = session.generation, iqn = %entry.iqn, "serving volume");
                    served.insert(mac, entry);
                }
                Err(error) => tracing::error!(client_mac = %mac, %error, "cannot serve volume"),
            }
        }
        metrics::gauge!("cairn_storage_volumes_served").set(served.len() as f64);
    }

    fn serve(
        &self,
        mac: &Mac,
        image: &Name,
        manifest: Hash32,
        mode: DiskMode,
        generation: u64,
    ) -> anyhow::Result<Served> {
        let dir = self
            .data_dir
            .join("volumes")
            .join(mac.to_compact())
            .join(image.as_str());
        let base = manifest_hash(&manifest);
        let persistent = mode == DiskMode::Persistent;
        let unique_id: [u8; 16] = blake3::hash(format!("{mac}/{image}").as_bytes()).as_bytes()
            [..16]
            .try_into()
            .expect("16 bytes");
        if !dir.join("volume.meta").exists() {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            Volume::create(
                &self.store,
                &dir,
                &VolumeSpec {
                    base,
                    persistent,
                    unique_id,
                },
            )
            .map_err(|e| anyhow!("creating volume {}: {e}", dir.display()))?;
        }
        let volume = Volume::open(
            self.store.clone(),
            &dir,
            VolumeOptions {
                generation,
                ..VolumeOptions::default()
            },
        )
        .map_err(|e| anyhow!("opening volume {}: {e}", dir.display()))?;
        // A non-persistent disk starts every boot from its base; a persistent one keeps its
        // layer (and its base) until the admin resets it.
        if !persistent {
            volume
                .reset(Some(base))
                .map_err(|e| anyhow!("resetting volume {}: {e}", dir.display()))?;
        }
        let iqn = target_name_for_client(mac.0);
        let mut allowed_initiators = vec![initiator_name_for_client(mac)];
        allowed_initiators.extend(self.extra_initiators.iter().cloned());
        let volume = Arc::new(volume);
        self.target
            .add_target(
                &iqn,
                volume.clone(),
                TargetConfig {
                    allowed_initiators,
                    chap: None,
                    mutual_chap: None,
                },
            )
            .map_err(|e| anyhow!("adding target {iqn}: {e}"))?;
        Ok(Served {
            iqn,
            image: image.clone(),
            generation,
            volume,
        })
    }

    fn stop_serving(&self, old: Served) {
        let _ = self.target.remove_target(&old.iqn);
        old.volume.fence(old.generation + 1);
        if let Err(error) = old.volume.flush() {
            tracing::error!(iqn = %old.iqn, %error, "flushing a volume being stopped failed");
        }
        tracing::info!(iqn = %old.iqn, "stopped serving volume");
    }

    /// Fetches a manifest and its missing chunks from `peer_api`, verifying every chunk.
    async fn pull(
        self: &Arc<Self>,
        http: &reqwest::Client,
        peer_api: &str,
        token: &str,
        hash: Hash32,
    ) -> anyhow::Result<()> {
        let bytes = http
            .get(format!("{peer_api}/v1/store/manifests/{hash}"))
            .bearer_auth(token)
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?;
        let manifest = Manifest::decode(&bytes)
            .map_err(|e| anyhow!("manifest {hash} from {peer_api}: {e}"))?;
        if manifest.hash() != manifest_hash(&hash) {
            anyhow::bail!("manifest from {peer_api} does not hash to {hash}");
        }
        for chunk in self.store.missing_chunks(&manifest) {
            let data = http
                .get(format!("{peer_api}/v1/store/chunks/{chunk}"))
                .bearer_auth(token)
                .send()
                .await?
                .error_for_status()?
                .bytes()
                .await?;
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

/// Starts the iSCSI portal and the reconciler; returns their tasks.
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
    let node_id = config.node_id;
    let reconcile = tokio::spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_millis(250));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Reconcile when the history moved or a pull brought a version in; otherwise idle.
        let mut reconciled_seq = None;
        loop {
            interval.tick().await;
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
            for hash in needed.into_iter().filter(|h| !storage.has_manifest(h)) {
                for peer in &peers {
                    match storage.pull(&http, peer, &node_token, hash).await {
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
            let seq = cluster.local_state(|s| s.last_seq);
            if reconciled_seq == Some(seq) && !pulled {
                continue;
            }
            reconciled_seq = Some(seq);
            let storage = storage.clone();
            let state = cluster.local_state(|s| s.clone());
            let _ = tokio::task::spawn_blocking(move || storage.reconcile_volumes(&state)).await;
        }
    });
    Ok(vec![serve, reconcile])
}
