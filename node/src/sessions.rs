//! The sessions this node serves: the reconciler that turns the committed boot sessions into
//! volumes, targets and mirror shells, the mirror's transport over the cluster's QUIC
//! endpoint, and the driver that runs the shells' timers and proposes what their events call
//! for (DESIGN.md "Two copies of every writable layer").
//!
//! - A session's **primary** serves the client's volume on its portal. Every write, unmap and
//!   flush goes through the session's `PrimaryShell` to the standby before it is acknowledged.
//! - Its **standby** registers the same target, holding I/O until a failover, and applies the
//!   mirror stream to its own copy (`StandbyShell`).
//! - **Failover**: when a session names this node primary where it was standby, the standby
//!   shell is promoted (the volume serves once the old primary's lease has run out), and a new
//!   primary shell mirrors to the new standby, resyncing it if it is not in sync.
//! - **Standby dropped / added** at the same primary: the primary shell's stream ends or
//!   starts anew at the new generation (with a resync of the new standby).
//! - **A restarted node** does not continue a role of a generation it held before its start:
//!   as standby it proposes `DropStandby` (its copy may lack writes it held only in memory),
//!   as primary with an in-sync standby it proposes `FailOver` and serves nothing.
//! - The shells' events become proposals: a standby unreachable → `DropStandby`, a primary
//!   silent → `FailOver`, a resync complete → `MarkStandbyInSync`. A storage fault of a volume
//!   stops the node (its sessions fail over).
//! - Volumes live in `<data_dir>/volumes/<mac>/<image>`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use bytes::Bytes;

use cairn_blockstore::chunks::ChunkStore;
use cairn_blockstore::iscsi::{target_name_for_client, Listing, Target, TargetConfig};
use cairn_blockstore::mirror::{
    Message, MirrorConfig, PrimaryEvent, RefusedReason, ResyncProgress, StandbyEvent, StandbySync,
    VolumeId,
};
use cairn_blockstore::replica::{MirrorLink, PrimaryShell, SessionDevice, StandbyShell};
use cairn_blockstore::volume::{Volume, VolumeOptions, VolumeSpec, WriteMirror};
use cairn_consensus::domain::{
    BootSession, Command, DiskMode, Hash32, Mac, Name, StandbyCopy, State, VersionState,
};
use cairn_consensus::ClusterNode;

use crate::api::types::{CopyRole, CopyStatus, ResyncStatus};
use crate::config::NodeConfig;
use crate::storage::{initiator_name_for_client, manifest_hash};

/// How often the driver runs the shells' timers (heartbeats are every 100 ms).
const TICK: Duration = Duration::from_millis(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Primary,
    Standby,
}

/// A session this node should serve, and in which role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Want {
    pub session: BootSession,
    pub manifest: Hash32,
    pub role: Role,
}

pub type Wanted = BTreeMap<Mac, Want>;

enum Shell {
    Primary(Arc<PrimaryShell>),
    Standby(Arc<StandbyShell>),
    /// Restarted as the primary of an in-sync session: asked for a failover, serves nothing.
    AwaitingFailover,
}

struct Served {
    iqn: String,
    image: Name,
    generation: u64,
    boot_generation: u64,
    volume_id: VolumeId,
    device: Arc<SessionDevice>,
    volume: Option<Arc<Volume>>,
    shell: Shell,
}

impl Served {
    fn role(&self) -> Role {
        match self.shell {
            Shell::Primary(_) => Role::Primary,
            _ => Role::Standby,
        }
    }
}

/// One session's shells, taken out of the lock for a tick.
struct Ticked {
    mac: Mac,
    volume_id: VolumeId,
    volume: Option<Arc<Volume>>,
    primary: Option<Arc<PrimaryShell>>,
    standby: Option<Arc<StandbyShell>>,
}

/// Sends the shells' messages on the cluster's one-way QUIC streams.
struct QuicLink {
    cluster: ClusterNode,
}

impl MirrorLink for QuicLink {
    fn send(&self, peer: u64, message: Message) {
        let (head, body) = message.encode_parts();
        self.cluster
            .send_to_peer(peer, cairn_consensus::streams::Frame { head, body });
    }
}

pub struct Sessions {
    node_id: u64,
    data_dir: PathBuf,
    store: Arc<ChunkStore>,
    target: Target,
    /// Extra initiator names every volume admits (for tests and tools such as libiscsi's suite).
    extra_initiators: Vec<String>,
    served: Mutex<BTreeMap<Mac, Served>>,
    /// Counts reconcile passes; [`Sessions::wait_serving`] waits on it.
    reconciled: tokio::sync::watch::Sender<u64>,
    /// Each session's generation when this process first reconciled: a role at that
    /// generation or an older one is from before this node's start.
    first_seen: OnceLock<BTreeMap<Mac, u64>>,
    link: OnceLock<Arc<dyn MirrorLink>>,
    mirror: MirrorConfig,
    proposals: tokio::sync::mpsc::UnboundedSender<Command>,
    proposals_out: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Command>>>,
    /// Wakes the driver before its next tick: a primary core has events (a resync's next
    /// regions to compare), which would otherwise wait up to a tick.
    wake: Arc<tokio::sync::Notify>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The volume's identifier, the same on every node (VPD 0x83 and the mirror's volume id).
pub fn unique_id(mac: &Mac, image: &Name) -> [u8; 16] {
    blake3::hash(format!("{mac}/{image}").as_bytes()).as_bytes()[..16]
        .try_into()
        .expect("16 bytes")
}

fn sync_of(session: &BootSession, block_count: u64) -> Option<(u64, StandbySync)> {
    let standby = session.standby?;
    let sync = match session.standby_copy {
        StandbyCopy::InSync => StandbySync::InSync,
        StandbyCopy::Fresh => StandbySync::Fresh { block_count },
        StandbyCopy::Stale => StandbySync::Compare { block_count },
    };
    Some((standby, sync))
}

impl Sessions {
    pub fn new(config: &NodeConfig, store: Arc<ChunkStore>, target: Target) -> Sessions {
        let (proposals, proposals_out) = tokio::sync::mpsc::unbounded_channel();
        Sessions {
            node_id: config.node_id,
            data_dir: config.data_dir.clone(),
            store,
            target,
            extra_initiators: config.iscsi_extra_initiators.clone(),
            served: Mutex::new(BTreeMap::new()),
            reconciled: tokio::sync::watch::Sender::new(0),
            first_seen: OnceLock::new(),
            link: OnceLock::new(),
            mirror: MirrorConfig::default(),
            proposals,
            proposals_out: Mutex::new(Some(proposals_out)),
            wake: Arc::default(),
        }
    }

    fn link(&self) -> Arc<dyn MirrorLink> {
        self.link.get().expect("link set at start").clone()
    }

    fn propose(&self, command: Command) {
        let _ = self.proposals.send(command);
    }

    /// Whether this node serves `mac`'s volume as primary at `generation` or a later one.
    pub fn serves_primary(&self, mac: &Mac, generation: u64) -> bool {
        let served = lock(&self.served);
        served.get(mac).is_some_and(|s| {
            s.generation >= generation && s.role() == Role::Primary && s.device.is_serving()
        })
    }

    /// Waits (at most `timeout`) until this node serves `mac` as primary at `generation` or
    /// later.
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

    /// The sessions this node should serve, with their base manifests.
    pub fn wanted(&self, state: &State) -> Wanted {
        state
            .boot_sessions
            .values()
            .filter_map(|session| {
                let role = if session.primary == self.node_id {
                    Role::Primary
                } else if session.standby == Some(self.node_id) {
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
                Some((
                    session.mac,
                    Want {
                        session: session.clone(),
                        manifest,
                        role,
                    },
                ))
            })
            .collect()
    }

    /// Lists every client's target for SendTargets on this node, at the portals of its
    /// session's primary and standby (see [`Listing`]): an initiator that polls any node
    /// finds the node its disk moved to, and a new standby.
    pub fn list_targets(&self, state: &State) {
        let listings = state.boot_sessions.values().filter_map(|session| {
            let portals: Vec<String> = std::iter::once(session.primary)
                .chain(session.standby)
                .filter_map(|id| state.nodes.get(&id)?.portal())
                .map(|address| format!("{address},1"))
                .collect();
            (!portals.is_empty()).then(|| Listing {
                name: target_name_for_client(session.mac.0),
                allowed_initiators: self.allowed_initiators(&session.mac),
                portals,
            })
        });
        self.target.registry().set_listings(listings);
    }

    fn allowed_initiators(&self, mac: &Mac) -> Vec<String> {
        let mut allowed = vec![initiator_name_for_client(mac)];
        allowed.extend(self.extra_initiators.iter().cloned());
        allowed
    }

    /// Makes the served sessions match `wanted`; false if some could not be served yet (its
    /// version is still being pulled, or opening it failed), so the caller tries again.
    pub fn reconcile(&self, wanted: Wanted) -> bool {
        let first_seen = self.first_seen.get_or_init(|| {
            wanted
                .iter()
                .map(|(mac, want)| (*mac, want.session.generation))
                .collect()
        });
        let mut complete = true;
        let mut served = lock(&self.served);
        let gone: Vec<Mac> = served
            .keys()
            .filter(|mac| !wanted.contains_key(mac))
            .copied()
            .collect();
        for mac in gone {
            if let Some(old) = served.remove(&mac) {
                self.stop_serving(old, None);
            }
        }
        for (mac, want) in wanted {
            let session = &want.session;
            let restarted = first_seen
                .get(&mac)
                .is_some_and(|seen| session.generation <= *seen);
            if !self.store_has(&want.manifest) {
                complete = false;
                continue;
            }
            let current = served.get_mut(&mac);
            match self.update_in_place(current, &want, restarted) {
                Ok(true) => continue,
                Ok(false) => {}
                Err(error) => {
                    complete = false;
                    tracing::error!(client_mac = %mac, %error, "cannot follow the session");
                    continue;
                }
            }
            if let Some(old) = served.remove(&mac) {
                self.stop_serving(old, Some(session.generation));
            }
            match self.serve(&want, restarted) {
                Ok(entry) => {
                    tracing::info!(client_mac = %mac, image = %session.image, generation = session.generation, role = ?want.role, standby = ?session.standby, "serving volume");
                    served.insert(mac, entry);
                }
                Err(error) => {
                    complete = false;
                    tracing::error!(client_mac = %mac, %error, "cannot serve volume");
                }
            }
        }
        let count = |role: Role| served.values().filter(|s| s.role() == role).count() as f64;
        metrics::gauge!("cairn_storage_volumes_served").set(count(Role::Primary));
        metrics::gauge!("cairn_storage_volumes_standby").set(count(Role::Standby));
        drop(served);
        self.reconciled.send_modify(|passes| *passes += 1);
        complete
    }

    fn store_has(&self, manifest: &Hash32) -> bool {
        self.store.load_manifest(&manifest_hash(manifest)).is_ok()
    }

    /// Follows a change of the session without re-serving: same generation (nothing to do), a
    /// standby dropped or added at the same primary, or a promotion of this standby. Returns
    /// false when the session must be served anew.
    fn update_in_place(
        &self,
        current: Option<&mut Served>,
        want: &Want,
        restarted: bool,
    ) -> anyhow::Result<bool> {
        let session = &want.session;
        let Some(entry) = current else {
            return Ok(false);
        };
        if entry.image != session.image || entry.boot_generation != session.boot_generation {
            return Ok(false);
        }
        if let Shell::Primary(shell) = &entry.shell {
            if entry.generation == session.generation && session.standby_copy == StandbyCopy::InSync
            {
                // The resync's completion is committed: the standby may be promoted now.
                shell.handle_resync_recorded();
            }
        }
        if entry.generation == session.generation
            && entry.role() == want.role
            && !matches!(entry.shell, Shell::AwaitingFailover)
        {
            return Ok(true);
        }
        match (&entry.shell, want.role) {
            (Shell::AwaitingFailover, _) if restarted => Ok(entry.generation == session.generation),
            (Shell::Primary(shell), Role::Primary) => {
                let volume = entry.volume.as_ref().expect("a primary has its volume");
                let block_count = volume.size_bytes().div_ceil(4096);
                match sync_of(session, block_count) {
                    None => shell.handle_standby_dropped(session.generation),
                    Some((peer, sync)) => {
                        shell.handle_standby_added(session.generation, peer, sync)
                    }
                }
                volume.advance_generation(session.generation);
                entry.device.set_paths(self.node_id, session.standby);
                entry.generation = session.generation;
                tracing::warn!(client_mac = %session.mac, generation = session.generation, standby = ?session.standby, "session standby changed");
                Ok(true)
            }
            (Shell::Standby(standby), Role::Primary) => {
                let serve_at = standby.promote();
                let volume = standby.volume().clone();
                let block_count = volume.size_bytes().div_ceil(4096);
                let primary = PrimaryShell::new(
                    VolumeId(entry.volume_id.0),
                    session.generation,
                    sync_of(session, block_count),
                    self.mirror.clone(),
                    self.link(),
                );
                volume.advance_generation(session.generation);
                volume.set_mirror(Some(primary.clone() as Arc<dyn WriteMirror>));
                entry.device.set_paths(self.node_id, session.standby);
                entry.device.serve(volume, primary.clone(), serve_at);
                entry.shell = Shell::Primary(primary);
                entry.generation = session.generation;
                let wait = serve_at.saturating_duration_since(Instant::now());
                tracing::warn!(client_mac = %session.mac, generation = session.generation, lease_wait_ms = wait.as_millis() as u64, "promoted: serving after failover");
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn volume_dir(&self, mac: &Mac, image: &Name) -> PathBuf {
        self.data_dir
            .join("volumes")
            .join(mac.to_compact())
            .join(image.as_str())
    }

    /// Opens (creating it the first time) the client's volume at the session's generation,
    /// reset to its base when `reset`.
    fn open_volume(
        &self,
        session: &BootSession,
        manifest: Hash32,
        reset: bool,
    ) -> anyhow::Result<Volume> {
        let dir = self.volume_dir(&session.mac, &session.image);
        let base = manifest_hash(&manifest);
        let persistent = session.mode == DiskMode::Persistent;
        if !dir.join("volume.meta").exists() || !dir.join("layer.map").exists() {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            Volume::create(
                &self.store,
                &dir,
                &VolumeSpec {
                    base,
                    persistent,
                    unique_id: unique_id(&session.mac, &session.image),
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
        // A copy on another base cannot be compared block by block: start it empty.
        if reset || volume.base() != base {
            volume
                .reset(Some(base))
                .map_err(|e| anyhow!("resetting volume {}: {e}", dir.display()))?;
        }
        Ok(volume)
    }

    fn serve(&self, want: &Want, restarted: bool) -> anyhow::Result<Served> {
        let session = &want.session;
        let mac = session.mac;
        let id = unique_id(&mac, &session.image);
        let new_boot = session.generation == session.boot_generation;
        let non_persistent = session.mode == DiskMode::NonPersistent;
        let (device, volume, shell) = match want.role {
            Role::Primary
                if restarted
                    && session.standby.is_some()
                    && session.standby_copy == StandbyCopy::InSync =>
            {
                // Its copy may lack acknowledged writes only the standby holds now.
                self.propose(Command::FailOver {
                    mac,
                    generation: session.generation,
                });
                tracing::warn!(client_mac = %mac, generation = session.generation, "restarted as primary: asking for a failover to the in-sync standby");
                let base = self
                    .store
                    .load_manifest(&manifest_hash(&want.manifest))
                    .map_err(|e| anyhow!("loading manifest {}: {e}", want.manifest))?;
                let device = SessionDevice::waiting(base.size_bytes / 512, id);
                (Arc::new(device), None, Shell::AwaitingFailover)
            }
            Role::Primary => {
                let volume = Arc::new(self.open_volume(
                    session,
                    want.manifest,
                    non_persistent && new_boot,
                )?);
                let block_count = volume.size_bytes().div_ceil(4096);
                let primary = PrimaryShell::new(
                    VolumeId(id),
                    session.generation,
                    sync_of(session, block_count),
                    self.mirror.clone(),
                    self.link(),
                );
                volume.set_mirror(Some(primary.clone() as Arc<dyn WriteMirror>));
                let device = SessionDevice::waiting(volume.size_bytes() / 512, id);
                device.serve(volume.clone(), primary.clone(), Instant::now());
                (Arc::new(device), Some(volume), Shell::Primary(primary))
            }
            Role::Standby => {
                let fresh = session.standby_copy == StandbyCopy::Fresh;
                let volume = Arc::new(self.open_volume(
                    session,
                    want.manifest,
                    fresh || (non_persistent && new_boot),
                )?);
                if restarted {
                    self.propose(Command::DropStandby {
                        mac,
                        generation: session.generation,
                    });
                }
                let standby = StandbyShell::new(
                    VolumeId(id),
                    session.generation,
                    restarted,
                    volume.clone(),
                    session.primary,
                    self.mirror.clone(),
                    self.link(),
                );
                let device = SessionDevice::waiting(volume.size_bytes() / 512, id);
                (Arc::new(device), Some(volume), Shell::Standby(standby))
            }
        };
        // ALUA: one target port group per node; the other path is the session's other node.
        let other = match want.role {
            Role::Primary => session.standby,
            Role::Standby => Some(session.primary),
        };
        device.set_paths(self.node_id, other);
        let iqn = target_name_for_client(mac.0);
        let allowed_initiators = self.allowed_initiators(&mac);
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
            boot_generation: session.boot_generation,
            volume_id: VolumeId(id),
            device,
            volume,
            shell,
        })
    }

    /// Stops serving a session: the mirror first (so writes waiting for the standby end), then
    /// the volume's own flush, then the fence (which waits for the calls in flight).
    fn stop_serving(&self, old: Served, newer: Option<u64>) {
        let _ = self.target.remove_target(&old.iqn);
        old.device.stop();
        let fence_at = newer.unwrap_or(old.generation + 1).max(old.generation + 1);
        if let Shell::Primary(shell) = &old.shell {
            shell.fence(fence_at);
        }
        if let Some(volume) = &old.volume {
            volume.set_mirror(None);
            // Writes under the initiator's write cache reach this copy's durable map, so a
            // later resync of it sends less.
            if let Err(error) = volume.flush() {
                tracing::error!(iqn = %old.iqn, %error, "flushing a volume being stopped failed");
            }
            volume.fence(fence_at);
        }
        tracing::info!(iqn = %old.iqn, "stopped serving volume");
    }

    /// This node's copy of `mac`'s layer, if it serves the session; the volume to take a
    /// digest of (off the async runtime) with it.
    pub fn copy_status(&self, mac: &Mac) -> Option<(CopyStatus, Option<Arc<Volume>>)> {
        let served = lock(&self.served);
        let entry = served.get(mac)?;
        let status = |p: ResyncProgress| ResyncStatus {
            regions_done: p.regions_done,
            regions_total: p.regions_total,
            bytes_copied: p.bytes_copied,
            bytes_per_second: p.bytes_per_second,
            elapsed_ms: p.elapsed.as_millis() as u64,
            eta_ms: p.eta.map(|eta| eta.as_millis() as u64),
        };
        let (role, peer, degraded, resyncs, volume) = match &entry.shell {
            Shell::Primary(shell) => {
                let resyncs = (
                    shell.resync_progress().map(status),
                    shell.last_resync().map(status),
                );
                let degraded = shell.is_alone() || shell.is_resyncing();
                (
                    CopyRole::Primary,
                    shell.peer(),
                    degraded,
                    resyncs,
                    entry.volume.clone(),
                )
            }
            Shell::Standby(shell) => (
                CopyRole::Standby,
                Some(shell.peer()),
                false,
                (None, None),
                Some(shell.volume().clone()),
            ),
            Shell::AwaitingFailover => {
                (CopyRole::AwaitingFailover, None, false, (None, None), None)
            }
        };
        let (resync, last_resync) = resyncs;
        let status = CopyStatus {
            node: self.node_id,
            mac: *mac,
            image: entry.image.clone(),
            generation: entry.generation,
            role,
            peer,
            serving: entry.device.is_serving(),
            degraded,
            resync,
            last_resync,
            digest: None,
            written_blocks: None,
        };
        Some((status, volume))
    }

    /// The degraded sessions and resyncs this node runs as primary, as metrics.
    fn set_copy_gauges(&self) {
        let statuses = self.copy_statuses();
        let primaries = statuses.iter().filter(|s| s.role == CopyRole::Primary);
        let degraded = primaries.clone().filter(|s| s.degraded).count();
        let resyncs: Vec<ResyncStatus> = primaries.filter_map(|s| s.resync).collect();
        metrics::gauge!("cairn_storage_sessions_degraded").set(degraded as f64);
        metrics::gauge!("cairn_storage_resyncs").set(resyncs.len() as f64);
        metrics::gauge!("cairn_storage_resync_regions_left").set(
            resyncs
                .iter()
                .map(|r| r.regions_total.saturating_sub(r.regions_done))
                .sum::<u64>() as f64,
        );
        metrics::gauge!("cairn_storage_resync_bytes_per_second")
            .set(resyncs.iter().map(|r| r.bytes_per_second).sum::<u64>() as f64);
    }

    /// [`Sessions::copy_status`] of every session this node serves.
    pub fn copy_statuses(&self) -> Vec<CopyStatus> {
        let macs: Vec<Mac> = lock(&self.served).keys().copied().collect();
        macs.iter()
            .filter_map(|mac| self.copy_status(mac).map(|(status, _)| status))
            .collect()
    }

    /// Makes every served volume's layer durable here (at shutdown; the standby holds every
    /// acknowledged write already).
    pub fn flush_all(&self) {
        let served = lock(&self.served);
        for entry in served.values() {
            if let Some(volume) = &entry.volume {
                volume.set_mirror(None);
                if let Err(error) = volume.flush() {
                    tracing::error!(iqn = %entry.iqn, %error, "flushing a volume failed");
                }
            }
        }
    }

    /// A frame from `peer` on its mirror stream.
    pub fn handle_frame(&self, peer: u64, frame: Bytes) {
        let message = match Message::decode(frame) {
            Ok(message) => message,
            Err(error) => {
                tracing::warn!(peer, %error, "bad mirror message; dropped");
                return;
            }
        };
        let volume = message.volume();
        let generation = message.generation();
        let is_stream = matches!(
            message,
            Message::Operation { .. } | Message::Heartbeat { .. }
        );
        enum Route {
            Primary(Arc<PrimaryShell>),
            Standby(Arc<StandbyShell>),
            Refuse(u64, RefusedReason),
            Drop,
        }
        let route = {
            let served = lock(&self.served);
            let entry = served.values().find(|s| s.volume_id == volume);
            match entry.map(|e| &e.shell) {
                Some(Shell::Standby(shell))
                    if is_stream && (shell.peer() == peer || generation != shell.generation()) =>
                {
                    Route::Standby(shell.clone())
                }
                Some(Shell::Primary(shell))
                    if !is_stream
                        && generation == shell.generation()
                        && shell.peer() == Some(peer) =>
                {
                    Route::Primary(shell.clone())
                }
                Some(Shell::Primary(shell)) if is_stream && generation < shell.generation() => {
                    Route::Refuse(shell.generation(), RefusedReason::Fenced)
                }
                Some(entry_shell) if is_stream => {
                    let current = match entry_shell {
                        Shell::Primary(shell) => shell.generation(),
                        Shell::Standby(shell) => shell.generation(),
                        Shell::AwaitingFailover => entry.map_or(0, |e| e.generation),
                    };
                    let reason = if current > generation {
                        RefusedReason::Fenced
                    } else {
                        RefusedReason::NotPrimary
                    };
                    Route::Refuse(current, reason)
                }
                None if is_stream => Route::Refuse(0, RefusedReason::UnknownVolume),
                _ => Route::Drop,
            }
        };
        match route {
            Route::Primary(shell) => {
                if shell.handle_message(message) {
                    self.wake.notify_one();
                }
            }
            // Applied on a blocking-pool thread, in order; its events come out of the tick.
            Route::Standby(shell) => shell.handle_message(message),
            Route::Refuse(current, reason) => {
                let refusal = Message::Refused {
                    volume,
                    generation,
                    current,
                    reason,
                };
                self.link().send(peer, refusal);
            }
            Route::Drop => {}
        }
    }

    fn mac_of(&self, volume: VolumeId) -> Option<Mac> {
        lock(&self.served)
            .iter()
            .find(|(_, s)| s.volume_id == volume)
            .map(|(mac, _)| *mac)
    }

    fn handle_standby_events(
        &self,
        shell: &StandbyShell,
        volume: VolumeId,
        events: Vec<StandbyEvent>,
    ) {
        for event in events {
            match event {
                StandbyEvent::PrimarySilent { generation } => {
                    if let Some(mac) = self.mac_of(volume) {
                        tracing::warn!(client_mac = %mac, generation, primary = shell.peer(), "primary silent: asking for a failover");
                        self.propose(Command::FailOver { mac, generation });
                    }
                }
                StandbyEvent::StorageFailed { seq } => {
                    tracing::error!(seq, failure = ?shell.volume().failure(), "standby copy failed; the node stops");
                    crate::exit_now(74);
                }
            }
        }
    }

    /// Runs every shell's timers once; returns the work their events call for.
    fn tick(&self) -> Vec<Work> {
        let shells: Vec<Ticked> = lock(&self.served)
            .iter()
            .map(|(mac, s)| {
                let (primary, standby) = match &s.shell {
                    Shell::Primary(shell) => (Some(shell.clone()), None),
                    Shell::Standby(shell) => (None, Some(shell.clone())),
                    Shell::AwaitingFailover => (None, None),
                };
                Ticked {
                    mac: *mac,
                    volume_id: s.volume_id,
                    volume: s.volume.clone(),
                    primary,
                    standby,
                }
            })
            .collect();
        let mut work = Vec::new();
        for Ticked {
            mac,
            volume_id,
            volume,
            primary,
            standby,
        } in shells
        {
            if let Some(volume) = &volume {
                if let Some(failure) = volume.failure() {
                    tracing::error!(client_mac = %mac, %failure, "volume storage failed; the node stops");
                    crate::exit_now(74);
                }
            }
            if let Some(standby) = standby {
                let events = standby.tick();
                self.handle_standby_events(&standby, volume_id, events);
            }
            let Some(primary) = primary else {
                continue;
            };
            for event in primary.tick() {
                match event {
                    PrimaryEvent::StandbyUnreachable { generation, reason } => {
                        tracing::warn!(client_mac = %mac, generation, ?reason, "standby unreachable: asking to drop it");
                        self.propose(Command::DropStandby { mac, generation });
                    }
                    PrimaryEvent::Fenced { current } => {
                        tracing::warn!(client_mac = %mac, current, "mirror fenced by a newer generation");
                    }
                    PrimaryEvent::ResyncCompare { region, standby } => {
                        if let Some(volume) = &volume {
                            work.push(Work::Compare {
                                volume: volume.clone(),
                                primary: primary.clone(),
                                region,
                                standby,
                            });
                        }
                    }
                    PrimaryEvent::ResyncComplete { generation } => {
                        if let Some(standby) = primary.peer() {
                            tracing::info!(client_mac = %mac, generation, standby, "resync complete");
                            self.propose(Command::MarkStandbyInSync {
                                mac,
                                generation,
                                standby,
                            });
                        }
                    }
                }
            }
        }
        work
    }
}

/// Work a tick hands to a blocking thread.
enum Work {
    Compare {
        volume: Arc<Volume>,
        primary: Arc<PrimaryShell>,
        region: u64,
        standby: cairn_blockstore::mirror::RegionDigest,
    },
}

/// Wires the mirror to the cluster's streams and starts the driver: the shells' timers, the
/// resync's region copies, and the proposals. Returns its tasks.
pub fn start(
    storage: Arc<crate::storage::Storage>,
    cluster: ClusterNode,
) -> Vec<tokio::task::JoinHandle<()>> {
    let sessions = &storage.sessions;
    let _ = sessions.link.set(Arc::new(QuicLink {
        cluster: cluster.clone(),
    }));
    {
        let storage = storage.clone();
        cluster.set_stream_handler(Arc::new(move |peer, frame| {
            storage.sessions.handle_frame(peer, frame)
        }));
    }
    let mut proposals = lock(&sessions.proposals_out)
        .take()
        .expect("sessions started once");
    let actor = crate::server::node_actor(cluster.node_id());
    let proposer = {
        let cluster = cluster.clone();
        tokio::spawn(async move {
            while let Some(command) = proposals.recv().await {
                let cluster = cluster.clone();
                let actor = actor.clone();
                tokio::spawn(async move {
                    let kind = command.kind();
                    match cluster.propose(actor, command).await {
                        Ok(events) => {
                            tracing::info!(kind, events = events.len(), "session change committed")
                        }
                        Err(error) => tracing::debug!(kind, %error, "session change refused"),
                    }
                });
            }
        })
    };
    let driver = tokio::spawn(async move {
        let mut interval = tokio::time::interval(TICK);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut gauges_at = Instant::now();
        let wake = storage.sessions.wake.clone();
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = wake.notified() => {}
            }
            if gauges_at.elapsed() >= Duration::from_secs(1) {
                gauges_at = Instant::now();
                storage.sessions.set_copy_gauges();
            }
            let work = storage.sessions.tick();
            for item in work {
                let Work::Compare {
                    volume,
                    primary,
                    region,
                    standby,
                } = item;
                let wake = wake.clone();
                tokio::task::spawn_blocking(move || {
                    match volume.resync_region(region, &standby) {
                        Ok(bytes) => {
                            metrics::counter!("cairn_storage_resync_bytes_total").increment(bytes);
                            if primary.handle_region_compared(region, bytes) {
                                wake.notify_one();
                            }
                        }
                        // A fenced or failed volume: the session moves on without this copy.
                        Err(error) => tracing::warn!(region, %error, "resync region failed"),
                    }
                });
            }
        }
    });
    vec![proposer, driver]
}
