//! The boundary between the iSCSI target and the storage it serves.

use std::future::Future;
use std::pin::Pin;

/// What a started write still waits for before it may be acknowledged (a mirrored write: its
/// standby holding it), resolving to the write's outcome. The iSCSI connection task polls it,
/// so a write waiting for its standby holds no thread, and one connection has many at once.
pub type WriteCompletion = Pin<Box<dyn Future<Output = Result<(), DeviceError>> + Send>>;

/// Errors a device reports to the SCSI layer, which turns them into sense data.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("lba range {lba}+{blocks} is past the end of the device ({block_count} blocks)")]
    OutOfRange {
        lba: u64,
        blocks: u64,
        block_count: u64,
    },
    #[error("medium error at lba {lba}: {reason}")]
    Medium { lba: u64, reason: String },
    #[error("device i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("device is fenced: generation {held} is older than {current}")]
    Fenced { held: u64, current: u64 },
    /// This node cannot serve the I/O now (its mirror failed or gave up, or its storage
    /// failed and it is stopping), but another path may: the initiator should retry.
    #[error("device unavailable on this path: {0}")]
    Unavailable(String),
}

/// The asymmetric access state of a target port group (SPC-4 ALUA, implicit only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum AccessState {
    /// The session's primary: all commands.
    ActiveOptimized = 0x0,
    /// The session's standby: media access refused at once (NOT READY, 04h/0Bh).
    Standby = 0x2,
    /// This path serves nothing (stopped, or the node is not the session's).
    Unavailable = 0x3,
    /// Between two states (a failover or switchover): NOT READY, 04h/0Ah, retry.
    Transitioning = 0xf,
}

/// Where a device stands on each of its paths (ALUA): one target port group per node, each
/// with one target port whose relative identifier is the group's. `version` changes with
/// every state change, so the SCSI layer raises "asymmetric access state changed".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortGroups {
    /// This path's group (and relative target port); non-zero.
    pub local: u16,
    /// Every group with its state, this path's among them.
    pub groups: Vec<(u16, AccessState)>,
    pub version: u64,
}

impl PortGroups {
    /// The groups of a device whose path here is `local` and whose other paths are `others`.
    pub fn new(
        local: (u16, AccessState),
        others: &[(u16, AccessState)],
        version: u64,
    ) -> PortGroups {
        let mut groups = vec![local];
        groups.extend(
            others
                .iter()
                .copied()
                .filter(|(group, _)| *group != local.0),
        );
        PortGroups {
            local: local.0,
            groups,
            version,
        }
    }

    /// This path's state.
    pub fn local_state(&self) -> AccessState {
        self.groups
            .iter()
            .find(|(group, _)| *group == self.local)
            .map_or(AccessState::Unavailable, |(_, state)| *state)
    }
}

/// A block device served as one LUN: a client's volume, or a plain file in tests.
///
/// Calls are blocking; the iSCSI server decides where to run them. Implementations must be safe
/// to call from several sessions at once (multipath: two sessions, one device).
pub trait BlockDevice: Send + Sync + 'static {
    /// Logical block size; Cairn serves 512-byte blocks (what BIOS INT 13h boot paths expect).
    fn block_size_bytes(&self) -> u32;
    fn block_count(&self) -> u64;
    /// A stable identifier, the same on every node that serves this device (VPD page 0x83).
    fn unique_id(&self) -> [u8; 16];
    fn read(&self, lba: u64, buffer: &mut [u8]) -> Result<(), DeviceError>;
    /// `force_unit_access`: durable before returning.
    fn write(&self, lba: u64, data: &[u8], force_unit_access: bool) -> Result<(), DeviceError>;
    /// Starts a write: applies it here and returns what its acknowledgement still waits for
    /// (`None`: nothing, it is complete). Blocks like `write` may (backpressure, a path that
    /// does not serve yet), but never for a round trip to another node. Devices without such
    /// a wait keep this default, `write` itself.
    fn start_write(
        &self,
        lba: u64,
        data: &[u8],
        force_unit_access: bool,
    ) -> Result<Option<WriteCompletion>, DeviceError> {
        self.write(lba, data, force_unit_access).map(|()| None)
    }
    /// Blocks read as zeros afterwards.
    fn unmap(&self, lba: u64, blocks: u64) -> Result<(), DeviceError>;
    /// Everything written before is durable when this returns (SYNCHRONIZE CACHE).
    fn flush(&self) -> Result<(), DeviceError>;
    /// Whether `lba` is mapped (holds data other than a known-zero hole) and how many blocks
    /// from there share that answer (GET LBA STATUS). Devices without thin provisioning
    /// answer `(true, block_count - lba)`.
    fn mapping_status(&self, lba: u64) -> Result<(bool, u64), DeviceError> {
        Ok((true, self.block_count().saturating_sub(lba)))
    }
    /// The device's ALUA target port groups, if it has several paths (a session's volume on
    /// its primary and standby); `None`: one path, no ALUA (TPGS 0).
    fn port_groups(&self) -> Option<PortGroups> {
        None
    }
    /// TEST UNIT READY: returns once the device can take I/O. A device that is not serving
    /// yet (a standby path) may hold the caller here for a bounded time; an error answers NOT
    /// READY. Most devices are always ready.
    fn ready(&self) -> Result<(), DeviceError> {
        Ok(())
    }
}
