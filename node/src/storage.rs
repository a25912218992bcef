//! The node's data path: its chunk store, the iSCSI target on its portal, and the reconciler
//! that makes both follow the replicated state.
//!
//! - Every node keeps every ready image version: a version it lacks is pulled from a peer that
//!   has it (manifest and chunks over the admin API, each chunk verified against its hash on
//!   receipt), so any node can be chosen as a client's primary.
//! - A client's volume is served by the node its boot session names as primary, at the
//!   session's generation. A new session at a higher generation fences the old volume handle,
//!   and a non-persistent layer is reset to the session's base version.
//! - The standby of a non-persistent session registers the same target too, but holds every
//!   read and write (for up to [`STANDBY_WAIT`]) until the session names it primary: iPXE and
//!   the OS try the second path when the first fails, and the leader commits the failover once
//!   its health probes find the primary down. Holding the I/O instead of refusing the login is
//!   what lets a client that reached the standby first carry on without an error. Until writes
//!   are mirrored (a later issue) the standby starts from the base version, so writes the dead
//!   primary acknowledged in this boot are lost; persistent disks have no standby path at all.
//! - Volumes live in `<data_dir>/volumes/<mac>/<image>`; the store in `<data_dir>/store`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};

use cairn_blockstore::chunks::{ChunkHash, ChunkStore, ChunkStoreConfig};
use cairn_blockstore::device::{BlockDevice, DeviceError};
use cairn_blockstore::image::{Manifest, ManifestHash};
use cairn_blockstore::iscsi::{target_name_for_client, Target, TargetConfig};
use cairn_blockstore::volume::{Volume, VolumeOptions, VolumeSpec};
use cairn_consensus::domain::{BootSession, DiskMode, Hash32, Mac, Name, State, VersionState};
use cairn_consensus::ClusterNode;

use crate::config::NodeConfig;

/// The initiator name a client uses (the iPXE script sets it) and the only one its target admits.
pub fn initiator_name_for_client(mac: &Mac) -> String {
    format!("iqn.2026-11.org.cairn:initiator.{}", mac.to_compact())
}

pub fn manifest_hash(hash: &Hash32) -> ManifestHash {
    ManifestHash(ChunkHash(hash.0))
}

/// How long a standby holds a read or write before answering NOT READY (asymmetric access
/// state transition), so the initiator retries. Longer than the leader needs to find a dead
/// primary (three missed one-second probes) and commit the failover; shorter than iPXE's SAN
/// command timeout (15 s).
pub const STANDBY_WAIT: Duration = Duration::from_secs(12);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Primary,
    Standby,
}

/// Per client: the session, its base manifest, and this node's role in it.
type Wanted = BTreeMap<Mac, (BootSession, Hash32, Role)>;

struct Served {
    iqn: String,
    image: Name,
    generation: u64,
    device: Arc<PathDevice>,
}

impl Served {
    fn role(&self) -> Role {
        match self.device.volume.get() {
            Some(_) => Role::Primary,
            None => Role::Standby,
        }
    }
}

/// The LUN a node registers for a client: the volume while this node is the session's
/// primary; while it is the standby, no volume yet and I/O waits for one (see the module docs).
/// The volume is set once (at start, or at the failover) and never replaced: a new session
/// registers a new device, and a stopped one's volume is fenced, so I/O takes no lock.
struct PathDevice {
    block_count: u64,
    unique_id: [u8; 16],
    volume: OnceLock<Volume>,
    /// Whether the target was stopped; guards the wait for `volume` on a standby.
    stopped: Mutex<bool>,
    changed: Condvar,
}

impl PathDevice {
    fn new(block_count: u64, unique_id: [u8; 16], volume: Option<Volume>) -> PathDevice {
        let device = PathDevice {
            block_count,
            unique_id,
            volume: OnceLock::new(),
            stopped: Mutex::new(false),
            changed: Condvar::new(),
        };
        if let Some(volume) = volume {
            device.install(volume);
        }
        device
    }

    fn stopped(&self) -> MutexGuard<'_, bool> {
        self.stopped.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn install(&self, volume: Volume) {
        let _ = self.volume.set(volume);
        // Under the lock, so a standby between its check and its wait cannot miss this.
        let _stopped = self.stopped();
        self.changed.notify_all();
    }

    /// Stops waiting I/O for good; returns the volume, if this device had one.
    fn stop(&self) -> Option<&Volume> {
        *self.stopped() = true;
        self.changed.notify_all();
        self.volume.get()
    }

    fn volume(&self) -> Result<&Volume, DeviceError> {
        if let Some(volume) = self.volume.get() {
            return Ok(volume);
        }
        // Standby: wait off the async workers if called on one (plain READs run inline).
        let wait = || {
            let deadline = Instant::now() + STANDBY_WAIT;
            let mut stopped = self.stopped();
            loop {
                if let Some(volume) = self.volume.get() {
                    return Ok(volume);
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() || *stopped {
                    return Err(DeviceError::Fenced {
                        held: 0,
                        current: 0,
                    });
                }
                stopped = self
                    .changed
                    .wait_timeout(stopped, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        };
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(wait),
            _ => wait(),
        }
    }
}

impl BlockDevice for PathDevice {
    fn block_size_bytes(&self) -> u32 {
        512
    }

    fn block_count(&self) -> u64 {
        self.block_count
    }

    fn unique_id(&self) -> [u8; 16] {
        self.unique_id
    }

    fn read(&self, lba: u64, buffer: &mut [u8]) -> Result<(), DeviceError> {
        BlockDevice::read(self.volume()?, lba, buffer)
    }

    fn write(&self, lba: u64, data: &[u8], force_unit_access: bool) -> Result<(), DeviceError> {
        BlockDevice::write(self.volume()?, lba, data, force_unit_access)
    }

    fn unmap(&self, lba: u64, blocks: u64) -> Result<(), DeviceError> {
        BlockDevice::unmap(self.volume()?, lba, blocks)
    }

    fn flush(&self) -> Result<(), DeviceError> {
        BlockDevice::flush(self.volume()?)
    }

    fn mapping_status(&self, lba: u64) -> Result<(bool, u64), DeviceError> {
        BlockDevice::mapping_status(self.volume()?, lba)
    }

    /// iPXE opens all paths at once and uses the first whose TEST UNIT READY succeeds: holding
    /// it on the standby lets a live primary win the race, and a dead one's standby take over.
    fn ready(&self) -> Result<(), DeviceError> {
        self.volume().map(|_| ())
    }
}

pub struct Storage {
    pub store: Arc<ChunkStore>,
    pub target: Target,
    node_id: u64,
    data_dir: PathBuf,
    served: Mutex<BTreeMap<Mac, Served>>,
    /// Counts reconcile passes; [`Storage::wait_serving`] waits on it.
    reconciled: tokio::sync::watch::Sender<u64>,
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
            reconciled: tokio::sync::watch::Sender::new(0),
            extra_initiators: config.iscsi_extra_initiators.clone(),
        }))
    }

    pub fn has_manifest(&self, hash: &Hash32) -> bool {
        self.store.load_manifest(&manifest_hash(hash)).is_ok()
    }

    /// Whether this node serves `mac`'s volume as primary at `generation` or a later one.
    pub fn serves_primary(&self, mac: &Mac, generation: u64) -> bool {
        let served = self.served.lock().unwrap_or_else(|p| p.into_inner());
        served
            .get(mac)
            .is_some_and(|s| s.generation >= generation && s.role() == Role::Primary)
    }

    /// Waits (at most `timeout`) until this node serves `mac` as primary at `generation` or
    /// later: the script server answers iPXE only once the target its script names is up.
    pub async fn wait_serving(&self, mac: &Mac, generation: u64, timeout: Duration) -> bool {
        let mut passes = self.reconciled.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            passes.borrow_and_update();
            if self.serves_primary(mac, generation) {
                return true;
            }
            match tokio::time::timeout_at(deadline, passes.changed()).await {
                Ok(Ok(())) => continue,
                _ => return self.serves_primary(mac, generation),
            }
        }
    }

    /// The volumes this node should serve: the boot sessions that name it primary, or standby
    /// of a non-persistent disk, with their base manifests. Cheap next to a copy of the state,
    /// which every applied entry (a DHCP lease, say) would otherwise cost.
    fn wanted(&self, state: &State) -> Wanted {
        state
            .boot_sessions
            .values()
            .filter_map(|session| {
                let role = if session.primary == self.node_id {
                    Role::Primary
                } else if session.standby == Some(self.node_id)
                    && session.mode == DiskMode::NonPersistent
                {
                    Role::Standby
                } else {
                    return None;
                };
                let version = state
                    .images
                    .get(&session.image)?
                    .versions
                    .get(&session.version)?;
                let manifest = version
                    .manifest
                    .filter(|_| version.state != VersionState::Importing)?;
                Some((session.mac, (session.clone(), manifest, role)))
            })
            .collect()
    }

    /// Makes the served volumes match `wanted`; false if some could not be served yet (its
    /// version is still being pulled, or opening it failed), so the caller tries again.
    fn reconcile_volumes(&self, wanted: Wanted) -> bool {
        let complete = self.reconcile_locked(wanted);
        self.reconciled.send_modify(|passes| *passes += 1);
        complete
    }

    fn reconcile_locked(&self, wanted: Wanted) -> bool {
        let mut complete = true;
        let mut served = self.served.lock().unwrap_or_else(|p| p.into_inner());
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
        for (mac, (session, manifest, role)) in wanted {
            let current = served.get(&mac);
            if current.is_some_and(|s| {
                s.generation == session.generation && s.image == session.image && s.role() == role
            }) {
                continue;
            }
            if !self.has_manifest(&manifest) {
                // The pull loop fetches it; the next pass serves the volume.
                complete = false;
                continue;
            }
            // A failover: the standby's target stays up (its waiting sessions carry on) and
            // gets the volume.
            let promoted = current.is_some_and(|s| {
                s.role() == Role::Standby && role == Role::Primary && s.image == session.image
            });
            if promoted {
                let entry = served.get_mut(&mac).expect("checked above");
                match self.open_volume(&session, manifest) {
                    Ok(volume) => {
                        entry.device.install(volume);
                        entry.generation = session.generation;
                        tracing::warn!(client_mac = %mac, image = %session.image, generation = session.generation, "serving volume after failover");
                    }
                    Err(error) => {
                        complete = false;
                        tracing::error!(client_mac = %mac, %error, "cannot serve volume after failover")
                    }
                }
                continue;
            }
            if let Some(old) = served.remove(&mac) {
                self.stop_serving(old);
            }
            match self.serve(&session, manifest, role) {
                Ok(entry) => {
                    tracing::info!(client_mac = %mac, image = %session.image, generation = session.generation, iqn = %entry.iqn, ?role, "serving volume");
                    served.insert(mac, entry);
                }
                Err(error) => {
                    complete = false;
                    tracing::error!(client_mac = %mac, %error, "cannot serve volume")
                }
            }
        }
        metrics::gauge!("cairn_storage_volumes_served").set(
            served
                .values()
                .filter(|s| s.role() == Role::Primary)
                .count() as f64,
        );
        metrics::gauge!("cairn_storage_volumes_standby").set(
            served
                .values()
                .filter(|s| s.role() == Role::Standby)
                .count() as f64,
        );
        complete
    }

    /// Makes every served volume's layer durable (at shutdown).
    pub fn flush_all(&self) {
        let served = self.served.lock().unwrap_or_else(|p| p.into_inner());
        for entry in served.values() {
            if let Some(volume) = entry.device.volume.get() {
                if let Err(error) = volume.flush() {
                    tracing::error!(iqn = %entry.iqn, %error, "flushing a volume failed");
                }
            }
        }
    }

    fn volume_dir(&self, mac: &Mac, image: &Name) -> PathBuf {
        self.data_dir
            .join("volumes")
            .join(mac.to_compact())
            .join(image.as_str())
    }

    fn unique_id(mac: &Mac, image: &Name) -> [u8; 16] {
        blake3::hash(format!("{mac}/{image}").as_bytes()).as_bytes()[..16]
            .try_into()
            .expect("16 bytes")
    }

    /// Opens (creating it the first time) the client's volume at the session's generation; a
    /// non-persistent one starts from its base.
    fn open_volume(&self, session: &BootSession, manifest: Hash32) -> anyhow::Result<Volume> {
        let dir = self.volume_dir(&session.mac, &session.image);
        let base = manifest_hash(&manifest);
        let persistent = session.mode == DiskMode::Persistent;
        if !dir.join("volume.meta").exists() {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            Volume::create(
                &self.store,
                &dir,
                &VolumeSpec {
                    base,
                    persistent,
                    unique_id: Self::unique_id(&session.mac, &session.image),
                },
            )
            .map_err(|e| anyhow!("creating volume {}: {e}", dir.display()))?;
        }
        let volume = Volume::open(
            self.store.clone(),
            &dir,
            VolumeOptions {
                generation: session.generation,
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
        Ok(volume)
    }

    fn serve(&self, session: &BootSession, manifest: Hash32, role: Role) -> anyhow::Result<Served> {
        let mac = &session.mac;
        let device = match role {
            Role::Primary => {
                let volume = self.open_volume(session, manifest)?;
                PathDevice::new(
                    BlockDevice::block_count(&volume),
                    BlockDevice::unique_id(&volume),
                    Some(volume),
                )
            }
            Role::Standby => {
                let base = self
                    .store
                    .load_manifest(&manifest_hash(&manifest))
                    .map_err(|e| anyhow!("loading manifest {manifest}: {e}"))?;
                PathDevice::new(
                    base.size_bytes / 512,
                    Self::unique_id(mac, &session.image),
                    None,
                )
            }
        };
        let iqn = target_name_for_client(mac.0);
        let mut allowed_initiators = vec![initiator_name_for_client(mac)];
        allowed_initiators.extend(self.extra_initiators.iter().cloned());
        let device = Arc::new(device);
        self.target
            .add_target(
                &iqn,
                device.clone(),
                TargetConfig {
                    allowed_initiators,
                    chap: None,
                    mutual_chap: None,
                },
            )
            .map_err(|e| anyhow!("adding target {iqn}: {e}"))?;
        Ok(Served {
            iqn,
            image: session.image.clone(),
            generation: session.generation,
            device,
        })
    }

    fn stop_serving(&self, old: Served) {
        let _ = self.target.remove_target(&old.iqn);
        // Waiting standby I/O gives up at once.
        if let Some(volume) = old.device.stop() {
            // Flush first: writes the initiator never asked to flush (write cache on, and Linux
            // sends no SYNCHRONIZE CACHE for a plain `sync` of a FAT file system) are in the
            // layer's data but not yet in its durable map; a fenced volume refuses the flush.
            if let Err(error) = volume.flush() {
                tracing::error!(iqn = %old.iqn, %error, "flushing a volume being stopped failed");
            }
            volume.fence(old.generation + 1);
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
                (s.last_seq, moved.then(|| storage.wanted(s)))
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
                tokio::task::spawn_blocking(move || storage.reconcile_volumes(wanted))
            };
            let complete = pass.await.unwrap_or(false);
            last = Some((wanted, complete));
        }
    });
    Ok(vec![serve, reconcile])
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
