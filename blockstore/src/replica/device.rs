//! The LUN of a session on one node: see the module docs of `replica`.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use super::{lock, PrimaryShell, LEASE_WAIT, STANDBY_WAIT};
use crate::device::{AccessState, BlockDevice, DeviceError, PortGroups, WriteCompletion};
use crate::volume::Volume;

enum Path {
    /// The standby's path: I/O waits for a failover.
    Waiting,
    Serving {
        volume: Arc<Volume>,
        primary: Arc<PrimaryShell>,
        serve_at: Instant,
    },
    Stopped,
}

/// The two paths of a session for ALUA: this node's target port group and the session's other
/// node's (node ids), and a count of changes.
#[derive(Clone, Copy, Default)]
struct Paths {
    local: u16,
    other: Option<u16>,
    changes: u64,
}

/// The LUN a node registers for a session's client: see the module docs.
pub struct SessionDevice {
    block_count: u64,
    unique_id: [u8; 16],
    path: Mutex<Path>,
    changed: Condvar,
    paths: Mutex<Paths>,
}

impl SessionDevice {
    /// The standby's path: registered, every I/O held until [`SessionDevice::serve`].
    pub fn waiting(block_count: u64, unique_id: [u8; 16]) -> SessionDevice {
        SessionDevice {
            block_count,
            unique_id,
            path: Mutex::new(Path::Waiting),
            changed: Condvar::new(),
            paths: Mutex::default(),
        }
    }

    /// Names this path's target port group (this node) and the other path's (the session's
    /// other node, if it has one) for ALUA; until then the device reports no port groups.
    pub fn set_paths(&self, local: u64, other: Option<u64>) {
        let group = |node: u64| u16::try_from(node).unwrap_or(u16::MAX);
        let mut paths = lock(&self.paths);
        let (local, other) = (group(local), other.map(group));
        if (paths.local, paths.other) != (local, other) {
            paths.local = local;
            paths.other = other;
            paths.changes += 1;
        }
    }

    fn path_changed(&self) {
        lock(&self.paths).changes += 1;
        self.changed.notify_all();
    }

    /// Serves `volume` through `primary` from `serve_at` on (a promoted standby waits out the
    /// old primary's lease).
    pub fn serve(&self, volume: Arc<Volume>, primary: Arc<PrimaryShell>, serve_at: Instant) {
        *lock(&self.path) = Path::Serving {
            volume,
            primary,
            serve_at,
        };
        self.path_changed();
    }

    /// Stops serving for good: held I/O fails at once.
    pub fn stop(&self) {
        *lock(&self.path) = Path::Stopped;
        self.path_changed();
    }

    pub fn is_serving(&self) -> bool {
        matches!(*lock(&self.path), Path::Serving { .. })
    }

    /// The volume and its mirror once serving (waiting for them on the standby's path).
    fn serving(&self) -> Result<(Arc<Volume>, Arc<PrimaryShell>), DeviceError> {
        let run = || {
            let deadline = Instant::now() + STANDBY_WAIT;
            let mut path = lock(&self.path);
            loop {
                let now = Instant::now();
                match &*path {
                    Path::Serving {
                        volume,
                        primary,
                        serve_at,
                    } if now >= *serve_at => return Ok((volume.clone(), primary.clone())),
                    Path::Stopped => {
                        return Err(DeviceError::Unavailable("path stopped".into()));
                    }
                    _ if now >= deadline => {
                        return Err(DeviceError::Unavailable(
                            "this path is the session's standby".into(),
                        ));
                    }
                    Path::Serving { serve_at, .. } => {
                        let until = (*serve_at).min(deadline);
                        path = self
                            .changed
                            .wait_timeout(path, until - now)
                            .unwrap_or_else(|poisoned| poisoned.into_inner())
                            .0;
                    }
                    Path::Waiting => {
                        path = self
                            .changed
                            .wait_timeout(path, deadline - now)
                            .unwrap_or_else(|poisoned| poisoned.into_inner())
                            .0;
                    }
                }
            }
        };
        // Off the async workers if called on one (plain READs run inline).
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(run),
            _ => run(),
        }
    }
}

impl BlockDevice for SessionDevice {
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
        let (volume, primary) = self.serving()?;
        primary.wait_readable(LEASE_WAIT)?;
        BlockDevice::read(&*volume, lba, buffer)
    }

    fn write(&self, lba: u64, data: &[u8], force_unit_access: bool) -> Result<(), DeviceError> {
        let (volume, _) = self.serving()?;
        BlockDevice::write(&*volume, lba, data, force_unit_access)
    }

    fn start_write(
        &self,
        lba: u64,
        data: &[u8],
        force_unit_access: bool,
    ) -> Result<Option<WriteCompletion>, DeviceError> {
        let (volume, _) = self.serving()?;
        BlockDevice::start_write(&*volume, lba, data, force_unit_access)
    }

    fn unmap(&self, lba: u64, blocks: u64) -> Result<(), DeviceError> {
        let (volume, _) = self.serving()?;
        BlockDevice::unmap(&*volume, lba, blocks)
    }

    fn flush(&self) -> Result<(), DeviceError> {
        let (volume, _) = self.serving()?;
        BlockDevice::flush(&*volume)
    }

    fn mapping_status(&self, lba: u64) -> Result<(bool, u64), DeviceError> {
        let (volume, primary) = self.serving()?;
        primary.wait_readable(LEASE_WAIT)?;
        BlockDevice::mapping_status(&*volume, lba)
    }

    /// This path: standby while it waits, transitioning until a promoted standby may serve,
    /// then active/optimized; unavailable once stopped. The other path is the opposite
    /// (unavailable while this one takes over from it).
    fn port_groups(&self) -> Option<PortGroups> {
        let paths = *lock(&self.paths);
        if paths.local == 0 {
            return None;
        }
        let (local, settled) = match &*lock(&self.path) {
            Path::Waiting => (AccessState::Standby, true),
            Path::Serving { serve_at, .. } if Instant::now() < *serve_at => {
                (AccessState::Transitioning, false)
            }
            Path::Serving { .. } => (AccessState::ActiveOptimized, true),
            Path::Stopped => (AccessState::Unavailable, true),
        };
        let other = match local {
            AccessState::ActiveOptimized => AccessState::Standby,
            AccessState::Transitioning => AccessState::Unavailable,
            AccessState::Standby | AccessState::Unavailable => AccessState::ActiveOptimized,
        };
        let others = paths.other.map(|group| (group, other));
        // The end of a lease wait changes the state without a call: it counts as a change.
        let version = paths.changes * 2 + settled as u64;
        Some(PortGroups::new(
            (paths.local, local),
            others.as_slice(),
            version,
        ))
    }

    /// iPXE opens all paths at once and uses the first whose TEST UNIT READY succeeds: holding
    /// it on the standby lets a live primary win the race, and a dead one's standby take over.
    fn ready(&self) -> Result<(), DeviceError> {
        self.serving().map(|_| ())
    }
}

#[cfg(test)]
mod path_tests {
    use std::time::Duration;

    use super::*;
    use crate::mirror::{Message, MirrorConfig, VolumeId};
    use crate::replica::MirrorLink;

    /// The ALUA states a session's device reports: standby while it waits, transitioning
    /// while a promoted standby waits out the lease (a change without a call, which still
    /// moves the version), active/optimized once it serves, unavailable once stopped; the
    /// other path the opposite; no port groups before the node named the paths.
    #[test]
    fn a_session_device_reports_its_path_states() {
        let device = SessionDevice::waiting(8, [1; 16]);
        assert_eq!(device.port_groups(), None);
        device.set_paths(3, Some(1));
        let groups = device.port_groups().expect("paths named");
        assert_eq!(
            groups.groups,
            [(3, AccessState::Standby), (1, AccessState::ActiveOptimized)]
        );
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            crate::chunks::ChunkStore::open(&dir.path().join("store"), Default::default()).unwrap(),
        );
        let base = vec![0u8; 64 << 10];
        let imported = store
            .import_raw(
                "base",
                1,
                &mut &base[..],
                base.len() as u64,
                &crate::image::NoProgress,
            )
            .unwrap();
        let spec = crate::volume::VolumeSpec {
            base: imported.manifest_hash,
            persistent: true,
            unique_id: [1; 16],
        };
        let volume = Arc::new(
            Volume::open_or_create(store, &dir.path().join("v"), &spec, Default::default())
                .unwrap(),
        );
        #[derive(Default)]
        struct Nowhere;
        impl MirrorLink for Nowhere {
            fn send(&self, _peer: u64, _message: Message) {}
        }
        let primary = PrimaryShell::new(
            VolumeId([1; 16]),
            2,
            None,
            MirrorConfig::default(),
            Arc::new(Nowhere),
        );
        let lease_end = Instant::now() + Duration::from_millis(200);
        device.set_paths(3, None);
        device.serve(volume, primary, lease_end);
        let during = device.port_groups().unwrap();
        assert_eq!(during.groups, [(3, AccessState::Transitioning)]);
        std::thread::sleep(Duration::from_millis(250));
        let after = device.port_groups().unwrap();
        assert_eq!(after.groups, [(3, AccessState::ActiveOptimized)]);
        assert_ne!(during.version, after.version);
        device.set_paths(3, Some(2));
        assert_eq!(
            device.port_groups().unwrap().groups,
            [(3, AccessState::ActiveOptimized), (2, AccessState::Standby)]
        );
        device.stop();
        assert_eq!(
            device.port_groups().unwrap().local_state(),
            AccessState::Unavailable
        );
    }
}
