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
    /// TEST UNIT READY: returns once the device can take I/O. A device that is not serving
    /// yet (a standby path) may hold the caller here for a bounded time; an error answers NOT
    /// READY. Most devices are always ready.
    fn ready(&self) -> Result<(), DeviceError> {
        Ok(())
    }
}
