//! The SCSI block command set (SPC-4 / SBC-3) over a [`BlockDevice`].
//!
//! [`Lun::execute`] is a function of (CDB, data-out, the device, this LUN's shared state) to
//! (status, sense, data-in). The shared state (persistent and SPC-2 reservations, unit
//! attentions, mode pages) lives in the [`Lun`], which every session to the same target uses, so
//! two paths to one volume (multipath) see one set of reservations.
//!
//! Invariants:
//! - every peer-supplied length and LBA is checked against the device before any I/O;
//! - a command that fails its checks never touches the device (no partial writes from bad CDBs);
//! - COMPARE AND WRITE holds the LUN's I/O lock across its read, compare and write, so it is
//!   atomic against every other write through this LUN.
//!
//! Streaming: READs above [`TRANSFER_BLOCKS_MAX`] are not run by [`Lun::execute`]; a shell
//! checks them with [`Lun::start_read`] and reads them piece by piece with [`Lun::read_blocks`].
//! WRITE, VERIFY and ORWRITE are gathered whole, up to [`WRITE_TRANSFER_BLOCKS_MAX`] (above the
//! advertised MAXIMUM TRANSFER LENGTH, as READs are).
//!
//! Not done: protection information (RDPROTECT/WRPROTECT other than 0 are rejected), EXTENDED COPY,
//! SANITIZE, WRITE ATOMIC, ALUA (REPORT TARGET PORT GROUPS), removable media.

pub mod file;
mod reservation;
pub mod sense;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};

use crate::device::{BlockDevice, DeviceError};
pub use file::FileDevice;
use reservation::Reservations;
use sense::Sense;

/// Largest transfer in blocks of a command whose data is held whole (writes, VERIFY, ORWRITE,
/// and READs run through [`Lun::execute`]), advertised as MAXIMUM TRANSFER LENGTH in VPD page
/// 0xB0, which Linux sizes its requests by. READs of any length within the LUN are still
/// served when the shell streams them ([`Lun::start_read`]): iPXE's UEFI SAN boot ignores the
/// page and reads a whole 9 MB file in one command (tgt accepts that too). This deliberately
/// departs from SBC's "shall reject" for reads.
pub const TRANSFER_BLOCKS_MAX: u32 = 8192;
/// Largest WRITE, VERIFY or ORWRITE in blocks. Their data is gathered whole before they run,
/// within what one session may gather ([`crate::iscsi::connection::WRITE_BUFFER_BYTES_MAX`],
/// 32 MiB of 512-byte blocks), and arrives within the session's MaxBurstLength and R2T rules
/// like any write. Above the MAXIMUM TRANSFER LENGTH the VPD page advertises (as READs are):
/// initiators that size requests by the page never send more, those that do are served.
pub const WRITE_TRANSFER_BLOCKS_MAX: u32 = 65_536;
/// OPTIMAL TRANSFER LENGTH in VPD page 0xB0 (128 KiB).
pub const OPTIMAL_TRANSFER_BLOCKS: u32 = 256;
/// Largest WRITE SAME in blocks (VPD page 0xB0).
pub const WRITE_SAME_BLOCKS_MAX: u64 = 8192;
/// UNMAP limits (VPD page 0xB0).
pub const UNMAP_DESCRIPTORS_MAX: u32 = 256;
pub const UNMAP_BLOCKS_MAX: u32 = 1 << 20;
/// Unmap granularity in blocks (4 KiB, the file systems' block size).
pub const UNMAP_GRANULARITY_BLOCKS: u32 = 8;
pub const COMPARE_AND_WRITE_BLOCKS_MAX: u8 = 255;

/// The blocks a READ started with [`Lun::start_read`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadExtent {
    pub lba: u64,
    pub blocks: u64,
    pub block_size_bytes: u32,
}

impl ReadExtent {
    pub fn bytes(&self) -> u64 {
        self.blocks * self.block_size_bytes as u64
    }
}

/// One I_T nexus: an initiator port (name + ISID) talking to this target.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Nexus {
    /// Unique for the life of the process; identifies the session.
    pub id: u64,
    pub initiator_name: String,
    pub isid: [u8; 6],
}

/// What a command produced.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScsiResult {
    pub status: u8,
    /// Fixed-format sense data when status is CHECK CONDITION.
    pub sense: Vec<u8>,
    pub data_in: Vec<u8>,
}

impl ScsiResult {
    pub fn good(data_in: Vec<u8>) -> ScsiResult {
        ScsiResult {
            status: sense::GOOD,
            sense: Vec::new(),
            data_in,
        }
    }
    pub fn check(s: Sense) -> ScsiResult {
        ScsiResult {
            status: sense::CHECK_CONDITION,
            sense: s.to_bytes(),
            data_in: Vec::new(),
        }
    }
    pub fn status(status: u8) -> ScsiResult {
        ScsiResult {
            status,
            sense: Vec::new(),
            data_in: Vec::new(),
        }
    }
}

type CmdResult = Result<Vec<u8>, Failure>;

/// Why a command did not complete with GOOD.
#[derive(Debug)]
enum Failure {
    Check(Sense),
    Status(u8),
}

impl From<Sense> for Failure {
    fn from(s: Sense) -> Failure {
        Failure::Check(s)
    }
}

fn device_failure(e: DeviceError, write: bool) -> Failure {
    match e {
        DeviceError::OutOfRange { .. } => Failure::Check(sense::LBA_OUT_OF_RANGE),
        // Retryable on another path (NOT READY, asymmetric access state transition): never a
        // medium error, which an operating system would pass to its file system.
        DeviceError::Fenced { .. } | DeviceError::Unavailable(_) => Failure::Check(sense::FENCED),
        DeviceError::Medium { lba, .. } => Failure::Check(Sense {
            information: Some(lba.min(u32::MAX as u64) as u32),
            ..if write {
                sense::WRITE_ERROR
            } else {
                sense::UNRECOVERED_READ_ERROR
            }
        }),
        DeviceError::Io(_) => Failure::Check(if write {
            sense::WRITE_ERROR
        } else {
            sense::UNRECOVERED_READ_ERROR
        }),
    }
}

/// The caching mode page's changeable state.
#[derive(Debug, Clone, Copy)]
struct ModeState {
    write_cache_enabled: bool,
    descriptor_sense: bool,
}

struct LunState {
    reservations: Reservations,
    /// Pending unit attentions per nexus id.
    unit_attentions: HashMap<u64, VecDeque<Sense>>,
    mode: ModeState,
    /// Medium removal prevented, per nexus.
    prevent_removal: HashMap<u64, bool>,
    stopped: bool,
}

/// One logical unit: a device plus the state every session to it shares.
pub struct Lun {
    device: Arc<dyn BlockDevice>,
    state: Mutex<LunState>,
    /// Writers take it shared; COMPARE AND WRITE takes it exclusively.
    io_lock: RwLock<()>,
    /// Product and serial strings for INQUIRY.
    serial: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SCSI operation codes this LUN implements, with service action and CDB length, for
/// REPORT SUPPORTED OPERATION CODES.
const SUPPORTED_OPCODES: &[(u8, Option<u16>, usize)] = &[
    (0x00, None, 6),        // TEST UNIT READY
    (0x03, None, 6),        // REQUEST SENSE
    (0x08, None, 6),        // READ(6)
    (0x0a, None, 6),        // WRITE(6)
    (0x12, None, 6),        // INQUIRY
    (0x15, None, 6),        // MODE SELECT(6)
    (0x16, None, 6),        // RESERVE(6)
    (0x17, None, 6),        // RELEASE(6)
    (0x1a, None, 6),        // MODE SENSE(6)
    (0x1b, None, 6),        // START STOP UNIT
    (0x1e, None, 6),        // PREVENT ALLOW MEDIUM REMOVAL
    (0x25, None, 10),       // READ CAPACITY(10)
    (0x28, None, 10),       // READ(10)
    (0x2a, None, 10),       // WRITE(10)
    (0x2e, None, 10),       // WRITE AND VERIFY(10)
    (0x2f, None, 10),       // VERIFY(10)
    (0x34, None, 10),       // PRE-FETCH(10)
    (0x35, None, 10),       // SYNCHRONIZE CACHE(10)
    (0x37, None, 10),       // READ DEFECT DATA(10)
    (0x41, None, 10),       // WRITE SAME(10)
    (0x42, None, 10),       // UNMAP
    (0x55, None, 10),       // MODE SELECT(10)
    (0x56, None, 10),       // RESERVE(10)
    (0x57, None, 10),       // RELEASE(10)
    (0x5a, None, 10),       // MODE SENSE(10)
    (0x5e, Some(0x00), 10), // PERSISTENT RESERVE IN: READ KEYS
    (0x5e, Some(0x01), 10), // READ RESERVATION
    (0x5e, Some(0x02), 10), // REPORT CAPABILITIES
    (0x5e, Some(0x03), 10), // READ FULL STATUS
    (0x5f, Some(0x00), 10), // PERSISTENT RESERVE OUT: REGISTER
    (0x5f, Some(0x01), 10), // RESERVE
    (0x5f, Some(0x02), 10), // RELEASE
    (0x5f, Some(0x03), 10), // CLEAR
    (0x5f, Some(0x04), 10), // PREEMPT
    (0x5f, Some(0x05), 10), // PREEMPT AND ABORT
    (0x5f, Some(0x06), 10), // REGISTER AND IGNORE EXISTING KEY
    (0x88, None, 16),       // READ(16)
    (0x89, None, 16),       // COMPARE AND WRITE
    (0x8a, None, 16),       // WRITE(16)
    (0x8b, None, 16),       // ORWRITE(16)
    (0x8e, None, 16),       // WRITE AND VERIFY(16)
    (0x8f, None, 16),       // VERIFY(16)
    (0x90, None, 16),       // PRE-FETCH(16)
    (0x91, None, 16),       // SYNCHRONIZE CACHE(16)
    (0x93, None, 16),       // WRITE SAME(16)
    (0x9e, Some(0x10), 16), // SERVICE ACTION IN: READ CAPACITY(16)
    (0x9e, Some(0x12), 16), // GET LBA STATUS
    (0xa0, None, 12),       // REPORT LUNS
    (0xa3, Some(0x0c), 12), // MAINTENANCE IN: REPORT SUPPORTED OPERATION CODES
    (0xa8, None, 12),       // READ(12)
    (0xaa, None, 12),       // WRITE(12)
    (0xae, None, 12),       // WRITE AND VERIFY(12)
    (0xaf, None, 12),       // VERIFY(12)
    (0xb7, None, 12),       // READ DEFECT DATA(12)
];

/// The CDB usage bitmap (SPC-4 6.35.3): which bits of each CDB byte the command looks at.
fn cdb_usage(opcode: u8, service_action: Option<u16>, len: usize) -> Vec<u8> {
    let mut u = vec![0xffu8; len];
    u[0] = opcode;
    if let Some(sa) = service_action {
        if len >= 2 {
            u[1] = (sa & 0x1f) as u8 | 0xe0;
        }
    }
    u[len - 1] = 0x07; // CONTROL: NACA and the link bits are all we look at
    u
}

fn bad_field(byte: u16) -> Failure {
    Failure::Check(Sense::invalid_field_in_cdb_at(byte))
}

fn cdb_len_for(opcode: u8) -> usize {
    match opcode >> 5 {
        0 => 6,
        1 | 2 => 10,
        4 => 16,
        5 => 12,
        _ => 6,
    }
}

/// Read/write CDB fields.
struct Rw {
    lba: u64,
    blocks: u64,
    fua: bool,
    protect: u8,
}

fn parse_rw(cdb: &[u8]) -> Result<Rw, Failure> {
    let be = |from: usize, n: usize| -> u64 {
        cdb[from..from + n]
            .iter()
            .fold(0u64, |a, &b| (a << 8) | b as u64)
    };
    let need = cdb_len_for(cdb[0]);
    if cdb.len() < need {
        return Err(bad_field(0));
    }
    Ok(match cdb[0] >> 5 {
        0 => {
            let lba = be(1, 3) & 0x1f_ffff;
            let blocks = if cdb[4] == 0 { 256 } else { cdb[4] as u64 };
            Rw {
                lba,
                blocks,
                fua: false,
                protect: 0,
            }
        }
        1 | 2 => Rw {
            lba: be(2, 4),
            blocks: be(7, 2),
            fua: cdb[1] & 0x08 != 0,
            protect: cdb[1] >> 5,
        },
        5 => Rw {
            lba: be(2, 4),
            blocks: be(6, 4),
            fua: cdb[1] & 0x08 != 0,
            protect: cdb[1] >> 5,
        },
        _ => Rw {
            lba: be(2, 8),
            blocks: be(10, 4),
            fua: cdb[1] & 0x08 != 0,
            protect: cdb[1] >> 5,
        },
    })
}

fn be_u(cdb: &[u8], from: usize, n: usize) -> u64 {
    cdb.get(from..from + n)
        .map(|s| s.iter().fold(0u64, |a, &b| (a << 8) | b as u64))
        .unwrap_or(0)
}

/// Whether an opcode accesses the medium (for reservation conflicts and NOT READY).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    None,
    Read,
    Write,
}

fn access_of(opcode: u8) -> Access {
    match opcode {
        0x08 | 0x28 | 0xa8 | 0x88 | 0x2f | 0xaf | 0x8f | 0x34 | 0x90 | 0x9e => Access::Read,
        0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0xae | 0x8e | 0x41 | 0x93 | 0x42 | 0x89 | 0x8b
        | 0x35 | 0x91 | 0x15 | 0x55 | 0x1b => Access::Write,
        _ => Access::None,
    }
}

impl Lun {
    pub fn new(device: Arc<dyn BlockDevice>) -> Lun {
        let serial = hex(&device.unique_id()[..8]);
        Lun {
            device,
            state: Mutex::new(LunState {
                reservations: Reservations::default(),
                unit_attentions: HashMap::new(),
                mode: ModeState {
                    write_cache_enabled: true,
                    descriptor_sense: false,
                },
                prevent_removal: HashMap::new(),
                stopped: false,
            }),
            io_lock: RwLock::new(()),
            serial,
        }
    }

    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.device
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LunState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A nexus ended (logout or connection loss): drop what belongs to it (SPC-2 reservation,
    /// prevent-removal), keep persistent registrations (they survive I_T nexus loss).
    pub fn nexus_lost(&self, nexus: &Nexus) {
        let mut st = self.lock();
        st.reservations.release_spc2_of(nexus.id);
        st.prevent_removal.remove(&nexus.id);
        st.unit_attentions.remove(&nexus.id);
    }

    /// LOGICAL UNIT RESET / target reset: SPC-2 reservations released, unit attention for all.
    pub fn reset(&self, nexus_ids: &[u64]) {
        let mut st = self.lock();
        st.reservations.clear_spc2();
        st.prevent_removal.clear();
        st.stopped = false;
        for id in nexus_ids {
            let q = st.unit_attentions.entry(*id).or_default();
            q.clear();
            q.push_back(sense::BUS_DEVICE_RESET);
        }
    }

    /// Expected data-out length in bytes for a CDB, when it can be derived from the CDB alone.
    pub fn block_size_bytes(&self) -> u32 {
        self.device.block_size_bytes()
    }

    /// Executes one command. `lun_id` is the LUN field of the command (only LUN 0 exists).
    /// READs above [`TRANSFER_BLOCKS_MAX`] blocks are refused here (their data would be held
    /// whole); a shell streams them with [`Lun::start_read`] and [`Lun::read_blocks`] instead.
    pub fn execute(&self, nexus: &Nexus, lun_id: u64, cdb: &[u8], data_out: &[u8]) -> ScsiResult {
        if let Some(result) = self.preflight(nexus, lun_id, cdb) {
            return result;
        }
        let result = self.dispatch(nexus, cdb, data_out);
        match result {
            Ok(data) => ScsiResult::good(data),
            Err(f) => Self::failure(f),
        }
    }

    /// Checks every command passes before its own handling: LUN, CDB length, unit attention,
    /// reservation conflict. `Some` is the command's outcome.
    fn preflight(&self, nexus: &Nexus, lun_id: u64, cdb: &[u8]) -> Option<ScsiResult> {
        if cdb.is_empty() {
            return Some(ScsiResult::check(sense::INVALID_OPCODE));
        }
        let opcode = cdb[0];
        if lun_id != 0 {
            return Some(match opcode {
                0x12 => match self.inquiry(cdb, true) {
                    Ok(d) => ScsiResult::good(d),
                    Err(f) => Self::failure(f),
                },
                0xa0 => match self.report_luns(cdb) {
                    Ok(d) => ScsiResult::good(d),
                    Err(f) => Self::failure(f),
                },
                0x03 => {
                    let mut d = sense::LUN_NOT_SUPPORTED.to_bytes();
                    d.truncate((cdb.get(4).copied().unwrap_or(0)) as usize);
                    ScsiResult::good(d)
                }
                _ => ScsiResult::check(sense::LUN_NOT_SUPPORTED),
            });
        }
        if cdb.len() < cdb_len_for(opcode).min(16) {
            return Some(ScsiResult::check(sense::INVALID_OPCODE));
        }
        // Unit attention, except for the commands SPC-4 exempts.
        if !matches!(opcode, 0x12 | 0xa0 | 0x03) {
            let mut st = self.lock();
            if let Some(q) = st.unit_attentions.get_mut(&nexus.id) {
                if let Some(ua) = q.pop_front() {
                    return Some(ScsiResult::check(ua));
                }
            }
        }
        // Reservation conflicts.
        {
            let st = self.lock();
            if st
                .reservations
                .conflicts(nexus.id, opcode, cdb, access_of(opcode))
            {
                return Some(ScsiResult::status(sense::RESERVATION_CONFLICT));
            }
        }
        None
    }

    /// Starts a READ (6/10/12/16) of any length whose data the caller streams: runs every
    /// check `execute` would (LUN, unit attention, reservations, CDB fields, range, stopped)
    /// and returns what to read, without reading anything. `Err` is the command's outcome.
    /// The caller then reads the blocks piece by piece with [`Lun::read_blocks`], so its memory
    /// is bounded by the piece size whatever the transfer length.
    pub fn start_read(
        &self,
        nexus: &Nexus,
        lun_id: u64,
        cdb: &[u8],
    ) -> Result<ReadExtent, ScsiResult> {
        if !matches!(cdb.first(), Some(0x08 | 0x28 | 0xa8 | 0x88)) {
            return Err(ScsiResult::check(sense::INVALID_OPCODE));
        }
        if let Some(result) = self.preflight(nexus, lun_id, cdb) {
            return Err(result);
        }
        let rw = parse_rw(cdb).map_err(Self::failure)?;
        if rw.protect != 0 {
            return Err(Self::failure(bad_field(1)));
        }
        self.check_range(rw.lba, rw.blocks).map_err(Self::failure)?;
        if self.lock().stopped {
            return Err(ScsiResult::check(sense::NOT_READY_STOPPED));
        }
        Ok(ReadExtent {
            lba: rw.lba,
            blocks: rw.blocks,
            block_size_bytes: self.device.block_size_bytes(),
        })
    }

    /// Reads `buffer.len()` bytes (whole blocks) at `lba` for a READ started with
    /// [`Lun::start_read`]. `Err` is the command's outcome (sense data of the device error).
    pub fn read_blocks(&self, lba: u64, buffer: &mut [u8]) -> Result<(), ScsiResult> {
        if buffer.is_empty() {
            return Ok(());
        }
        self.device
            .read(lba, buffer)
            .map_err(|e| Self::failure(device_failure(e, false)))
    }

    /// The transfer length in blocks of a READ (6/10/12/16) CDB; `None` for anything else or a
    /// CDB too short to hold it.
    pub fn read_transfer_blocks(cdb: &[u8]) -> Option<u64> {
        if !matches!(cdb.first(), Some(0x08 | 0x28 | 0xa8 | 0x88)) {
            return None;
        }
        parse_rw(cdb).ok().map(|rw| rw.blocks)
    }

    fn failure(f: Failure) -> ScsiResult {
        match f {
            Failure::Check(s) => ScsiResult::check(s),
            Failure::Status(st) => ScsiResult::status(st),
        }
    }

    fn check_range(&self, lba: u64, blocks: u64) -> Result<(), Failure> {
        let count = self.device.block_count();
        if lba > count || blocks > count - lba {
            return Err(sense::LBA_OUT_OF_RANGE.into());
        }
        Ok(())
    }

    fn dispatch(&self, nexus: &Nexus, cdb: &[u8], data_out: &[u8]) -> CmdResult {
        let opcode = cdb[0];
        let block = self.device.block_size_bytes() as u64;
        match opcode {
            0x00 => {
                if self.lock().stopped {
                    return Err(sense::NOT_READY_STOPPED.into());
                }
                self.device.ready().map_err(|e| device_failure(e, false))?;
                Ok(Vec::new())
            }
            0x03 => self.request_sense(nexus, cdb),
            0x12 => self.inquiry(cdb, false),
            0xa0 => self.report_luns(cdb),
            0x25 => {
                // READ CAPACITY(10)
                if cdb[1] & 0x01 != 0 || cdb[8] & 0x01 != 0 || be_u(cdb, 2, 4) != 0 {
                    return Err(bad_field(2));
                }
                let last = self.device.block_count().saturating_sub(1);
                let mut d = vec![0u8; 8];
                d[0..4].copy_from_slice(&(last.min(0xffff_ffff) as u32).to_be_bytes());
                d[4..8].copy_from_slice(&(block as u32).to_be_bytes());
                Ok(d)
            }
            0x9e => match cdb[1] & 0x1f {
                0x10 => self.read_capacity16(cdb),
                0x12 => self.get_lba_status(cdb),
                _ => Err(bad_field(1)),
            },
            0x08 | 0x28 | 0xa8 | 0x88 => self.read(cdb),
            0x0a | 0x2a | 0xaa | 0x8a => self.write(cdb, data_out, false),
            0x2e | 0xae | 0x8e => self.write(cdb, data_out, true),
            0x2f | 0xaf | 0x8f => self.verify(cdb, data_out),
            0x34 | 0x90 => {
                let lba = if opcode == 0x34 {
                    be_u(cdb, 2, 4)
                } else {
                    be_u(cdb, 2, 8)
                };
                let blocks = if opcode == 0x34 {
                    be_u(cdb, 7, 2)
                } else {
                    be_u(cdb, 10, 4)
                };
                self.check_range(lba, blocks)?;
                // Everything a file holds is already "in cache" as far as SBC is concerned.
                Err(Failure::Status(sense::CONDITION_MET))
            }
            0x35 | 0x91 => {
                let (lba, blocks) = if opcode == 0x35 {
                    (be_u(cdb, 2, 4), be_u(cdb, 7, 2))
                } else {
                    (be_u(cdb, 2, 8), be_u(cdb, 10, 4))
                };
                self.check_range(lba, blocks)?;
                self.device.flush().map_err(|e| device_failure(e, true))?;
                Ok(Vec::new())
            }
            0x41 | 0x93 => self.write_same(cdb, data_out),
            0x42 => self.unmap(cdb, data_out),
            0x89 => self.compare_and_write(cdb, data_out),
            0x8b => self.or_write(cdb, data_out),
            0x37 => {
                // READ DEFECT DATA(10): a virtual disk has no defect list.
                let mut d = vec![0u8, cdb[2] & 0x1f, 0, 0];
                d.truncate(be_u(cdb, 7, 2) as usize);
                Ok(d)
            }
            0xb7 => {
                // READ DEFECT DATA(12).
                let mut d = vec![0u8, cdb[1] & 0x1f, 0, 0, 0, 0, 0, 0];
                d.truncate(be_u(cdb, 6, 4) as usize);
                Ok(d)
            }
            0x1a | 0x5a => self.mode_sense(cdb),
            0x15 | 0x55 => self.mode_select(cdb, data_out),
            0x1b => {
                // START STOP UNIT: IMMED, POWER CONDITION, LOEJ, START.
                let power_condition = cdb[4] >> 4;
                if power_condition != 0 {
                    return Ok(Vec::new());
                }
                let start = cdb[4] & 0x01 != 0;
                let load_eject = cdb[4] & 0x02 != 0;
                let mut st = self.lock();
                if load_eject && !start && st.prevent_removal.values().any(|p| *p) {
                    return Err(sense::MEDIUM_REMOVAL_PREVENTED.into());
                }
                if load_eject {
                    // Not a removable medium: an eject is refused, a load is a no-op.
                    st.stopped = false;
                    return Ok(Vec::new());
                }
                st.stopped = !start;
                Ok(Vec::new())
            }
            0x1e => {
                let prevent = cdb[4] & 0x03;
                if prevent > 1 {
                    return Err(bad_field(4));
                }
                self.lock().prevent_removal.insert(nexus.id, prevent == 1);
                Ok(Vec::new())
            }
            0x16 | 0x56 => {
                // RESERVE(6)/(10); third-party reservations are not supported.
                if opcode == 0x56 && cdb[1] & 0x12 != 0 {
                    return Err(bad_field(1));
                }
                let mut st = self.lock();
                if !st.reservations.reserve_spc2(nexus.id) {
                    return Err(Failure::Status(sense::RESERVATION_CONFLICT));
                }
                Ok(Vec::new())
            }
            0x17 | 0x57 => {
                self.lock().reservations.release_spc2(nexus.id);
                Ok(Vec::new())
            }
            0x5e => {
                let st = self.lock();
                reservation::persistent_reserve_in(&st.reservations, nexus, cdb)
            }
            0x5f => {
                let mut st = self.lock();
                let st = &mut *st;
                let mut attentions = Vec::new();
                let r = reservation::persistent_reserve_out(
                    &mut st.reservations,
                    nexus,
                    cdb,
                    data_out,
                    &mut attentions,
                );
                for (id, s) in attentions {
                    st.unit_attentions.entry(id).or_default().push_back(s);
                }
                r
            }
            0xa3 => match cdb[1] & 0x1f {
                0x0c => self.report_supported_opcodes(cdb),
                _ => Err(bad_field(1)),
            },
            _ => Err(sense::INVALID_OPCODE.into()),
        }
    }

    fn request_sense(&self, nexus: &Nexus, cdb: &[u8]) -> CmdResult {
        if cdb[1] & 0x01 != 0 {
            // Descriptor format requested: we only produce fixed format.
            return Err(bad_field(1));
        }
        let alloc = cdb[4] as usize;
        let mut st = self.lock();
        let s = st
            .unit_attentions
            .get_mut(&nexus.id)
            .and_then(|q| q.pop_front())
            .unwrap_or(if st.stopped {
                sense::NOT_READY_STOPPED
            } else {
                sense::NO_SENSE
            });
        let mut d = s.to_bytes();
        d.truncate(alloc);
        Ok(d)
    }

    fn report_luns(&self, cdb: &[u8]) -> CmdResult {
        let select = cdb[2];
        if select > 2 && !(0x10..=0x12).contains(&select) {
            return Err(bad_field(2));
        }
        let alloc = be_u(cdb, 6, 4) as usize;
        if alloc < 16 {
            return Err(bad_field(6));
        }
        let mut d = vec![0u8; 16];
        d[0..4].copy_from_slice(&8u32.to_be_bytes());
        d.truncate(alloc);
        Ok(d)
    }

    fn inquiry(&self, cdb: &[u8], no_lun: bool) -> CmdResult {
        let evpd = cdb[1] & 0x01 != 0;
        let page = cdb[2];
        let alloc = be_u(cdb, 3, 2) as usize;
        if cdb[1] & 0x02 != 0 {
            return Err(bad_field(1)); // CMDDT is obsolete
        }
        if !evpd && page != 0 {
            return Err(bad_field(2));
        }
        let peripheral = if no_lun { 0x7f } else { 0x00 };
        let mut d = if !evpd {
            let mut d = vec![0u8; 96];
            d[0] = peripheral;
            d[1] = 0; // not removable
            d[2] = 0x06; // SPC-4
            d[3] = 0x02; // response data format 2, HISUP off
            d[4] = 96 - 5;
            d[5] = 0x00; // no 3PC, TPGS 0, PROTECT 0
            d[6] = 0x00;
            d[7] = 0x02; // CMDQUE
            d[8..16].copy_from_slice(b"CAIRN   ");
            d[16..32].copy_from_slice(b"VOLUME          ");
            d[32..36].copy_from_slice(b"0001");
            // Version descriptors: SAM-5, iSCSI, SPC-4, SBC-3.
            for (i, v) in [0x00a0u16, 0x0960, 0x0460, 0x04c0].iter().enumerate() {
                d[58 + i * 2..60 + i * 2].copy_from_slice(&v.to_be_bytes());
            }
            d
        } else {
            if no_lun {
                return Err(sense::LUN_NOT_SUPPORTED.into());
            }
            self.vpd(page)?
        };
        d.truncate(alloc);
        Ok(d)
    }

    fn vpd(&self, page: u8) -> CmdResult {
        let mut body: Vec<u8> = Vec::new();
        match page {
            0x00 => body.extend_from_slice(&[0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]),
            0x80 => body.extend_from_slice(self.serial.as_bytes()),
            0x83 => {
                let id = self.device.unique_id();
                // NAA IEEE Registered Extended (type 6): 16 bytes from the device's unique id,
                // the same on every node that serves the volume (multipath sees one disk).
                let mut naa = [0u8; 16];
                naa.copy_from_slice(&id);
                naa[0] = 0x60 | (naa[0] & 0x0f);
                body.extend_from_slice(&[0x01, 0x03, 0x00, 16]);
                body.extend_from_slice(&naa);
                // T10 vendor id designator.
                let t10 = format!("CAIRN   {}", hex(&id));
                body.extend_from_slice(&[0x02, 0x01, 0x00, t10.len() as u8]);
                body.extend_from_slice(t10.as_bytes());
            }
            0xb0 => {
                let mut b = vec![0u8; 60];
                b[1] = COMPARE_AND_WRITE_BLOCKS_MAX;
                b[2..4].copy_from_slice(&(UNMAP_GRANULARITY_BLOCKS as u16).to_be_bytes()); // optimal transfer granularity
                b[4..8].copy_from_slice(&TRANSFER_BLOCKS_MAX.to_be_bytes());
                b[8..12].copy_from_slice(&OPTIMAL_TRANSFER_BLOCKS.to_be_bytes());
                b[16..20].copy_from_slice(&UNMAP_BLOCKS_MAX.to_be_bytes());
                b[20..24].copy_from_slice(&UNMAP_DESCRIPTORS_MAX.to_be_bytes());
                b[24..28].copy_from_slice(&UNMAP_GRANULARITY_BLOCKS.to_be_bytes());
                b[28..32].copy_from_slice(&0x8000_0000u32.to_be_bytes()); // UGAVALID, alignment 0
                b[32..40].copy_from_slice(&WRITE_SAME_BLOCKS_MAX.to_be_bytes());
                body = b;
            }
            0xb1 => {
                let mut b = vec![0u8; 60];
                b[0..2].copy_from_slice(&1u16.to_be_bytes()); // non-rotating medium
                body = b;
            }
            0xb2 => {
                // Logical block provisioning: UNMAP, WRITE SAME(16/10) with UNMAP, unmapped
                // blocks read as zeros, thin provisioned.
                body = vec![0u8, 0xe0 | 0x04, 0x02, 0x00];
            }
            _ => return Err(bad_field(2)),
        }
        let mut d = vec![0u8, page, 0, 0];
        d[2..4].copy_from_slice(&(body.len() as u16).to_be_bytes());
        d.extend_from_slice(&body);
        Ok(d)
    }

    fn read_capacity16(&self, cdb: &[u8]) -> CmdResult {
        let alloc = be_u(cdb, 10, 4) as usize;
        let mut d = vec![0u8; 32];
        d[0..8].copy_from_slice(&self.device.block_count().saturating_sub(1).to_be_bytes());
        d[8..12].copy_from_slice(&self.device.block_size_bytes().to_be_bytes());
        // Physical block exponent 0: every logical block can be mapped and unmapped alone.
        d[14] = 0x80 | 0x40; // LBPME, LBPRZ
        d.truncate(alloc);
        Ok(d)
    }

    fn get_lba_status(&self, cdb: &[u8]) -> CmdResult {
        let lba = be_u(cdb, 2, 8);
        let alloc = be_u(cdb, 10, 4) as usize;
        let count = self.device.block_count();
        if lba >= count {
            return Err(sense::LBA_OUT_OF_RANGE.into());
        }
        let mut d = vec![0u8; 8];
        let mut at = lba;
        // Up to 64 descriptors or what fits the allocation length.
        let max_descriptors = (alloc.saturating_sub(8) / 16).clamp(1, 64);
        while at < count && (d.len() - 8) / 16 < max_descriptors {
            let (mapped, run) = self
                .device
                .mapping_status(at)
                .map_err(|e| device_failure(e, false))?;
            let run = run.clamp(1, count - at).min(u32::MAX as u64);
            let mut desc = [0u8; 16];
            desc[0..8].copy_from_slice(&at.to_be_bytes());
            desc[8..12].copy_from_slice(&(run as u32).to_be_bytes());
            desc[12] = if mapped { 0 } else { 1 };
            d.extend_from_slice(&desc);
            at += run;
        }
        let len = (d.len() - 4) as u32;
        d[0..4].copy_from_slice(&len.to_be_bytes());
        d.truncate(alloc);
        Ok(d)
    }

    fn read(&self, cdb: &[u8]) -> CmdResult {
        let rw = parse_rw(cdb)?;
        if rw.protect != 0 {
            return Err(bad_field(1));
        }
        self.check_range(rw.lba, rw.blocks)?;
        if rw.blocks > TRANSFER_BLOCKS_MAX as u64 {
            return Err(bad_field(7));
        }
        if self.lock().stopped {
            return Err(sense::NOT_READY_STOPPED.into());
        }
        let block = self.device.block_size_bytes() as usize;
        let mut buf = vec![0u8; rw.blocks as usize * block];
        if !buf.is_empty() {
            self.device
                .read(rw.lba, &mut buf)
                .map_err(|e| device_failure(e, false))?;
        }
        Ok(buf)
    }

    /// Reads straight into `buffer` (the caller's Data-In buffer, whose old contents are
    /// overwritten: a reused buffer is not zeroed first) when the command is a plain READ with
    /// no unit attention or reservation in the way; `None` means "use `execute`".
    pub fn try_fast_read(
        &self,
        nexus: &Nexus,
        lun_id: u64,
        cdb: &[u8],
        buffer: &mut Vec<u8>,
    ) -> Option<ScsiResult> {
        if lun_id != 0 || !matches!(cdb.first(), Some(0x28 | 0x88 | 0xa8)) {
            return None;
        }
        {
            let st = self.lock();
            if st.stopped
                || st
                    .unit_attentions
                    .get(&nexus.id)
                    .is_some_and(|q| !q.is_empty())
                || st.reservations.any()
            {
                return None;
            }
        }
        let rw = parse_rw(cdb).ok()?;
        if rw.protect != 0
            || rw.blocks > TRANSFER_BLOCKS_MAX as u64
            || self.check_range(rw.lba, rw.blocks).is_err()
        {
            return None;
        }
        let len = rw.blocks as usize * self.device.block_size_bytes() as usize;
        // Only the part beyond the old length gets zeroed; the device fills all of it.
        buffer.resize(len, 0);
        if len > 0 {
            if let Err(e) = self.device.read(rw.lba, buffer) {
                buffer.clear();
                return Some(Self::failure(device_failure(e, false)));
            }
        }
        Some(ScsiResult::good(Vec::new()))
    }

    fn write(&self, cdb: &[u8], data_out: &[u8], verify: bool) -> CmdResult {
        let rw = parse_rw(cdb)?;
        if rw.protect != 0 {
            return Err(bad_field(1));
        }
        if verify && cdb[1] & 0x02 != 0 && rw.protect == 0 {
            // BYTCHK is fine, we verify by writing and reading back nothing extra.
        }
        self.check_range(rw.lba, rw.blocks)?;
        if rw.blocks > WRITE_TRANSFER_BLOCKS_MAX as u64 {
            return Err(bad_field(7));
        }
        if self.lock().stopped {
            return Err(sense::NOT_READY_STOPPED.into());
        }
        let block = self.device.block_size_bytes() as usize;
        let len = rw.blocks as usize * block;
        if data_out.len() < len {
            // The initiator sent less than the CDB asks for (the iSCSI layer reports the
            // residual); SBC has no partial writes, so nothing is written.
            return Err(sense::PARAMETER_LIST_LENGTH_ERROR.into());
        }
        if len == 0 {
            return Ok(Vec::new());
        }
        let _guard = self.io_lock.read().unwrap_or_else(|p| p.into_inner());
        let fua = rw.fua || verify || !self.lock().mode.write_cache_enabled;
        self.device
            .write(rw.lba, &data_out[..len], fua)
            .map_err(|e| device_failure(e, true))?;
        Ok(Vec::new())
    }

    fn verify(&self, cdb: &[u8], data_out: &[u8]) -> CmdResult {
        let rw = parse_rw(cdb)?;
        if rw.protect != 0 {
            return Err(bad_field(1));
        }
        let bytchk = (cdb[1] >> 1) & 0x03;
        self.check_range(rw.lba, rw.blocks)?;
        if rw.blocks > WRITE_TRANSFER_BLOCKS_MAX as u64 {
            return Err(bad_field(7));
        }
        if bytchk == 0 || rw.blocks == 0 {
            return Ok(Vec::new());
        }
        let block = self.device.block_size_bytes() as usize;
        let expected_len = if bytchk == 3 {
            block
        } else {
            rw.blocks as usize * block
        };
        if bytchk == 2 {
            return Err(bad_field(1));
        }
        if data_out.len() < expected_len {
            return Err(sense::PARAMETER_LIST_LENGTH_ERROR.into());
        }
        let mut buf = vec![0u8; rw.blocks as usize * block];
        self.device
            .read(rw.lba, &mut buf)
            .map_err(|e| device_failure(e, false))?;
        for (i, b) in buf.iter().enumerate() {
            let want = if bytchk == 3 {
                data_out[i % block]
            } else {
                data_out[i]
            };
            if *b != want {
                return Err(Sense {
                    information: Some(i as u32),
                    ..sense::MISCOMPARE_DURING_VERIFY
                }
                .into());
            }
        }
        Ok(Vec::new())
    }

    fn write_same(&self, cdb: &[u8], data_out: &[u8]) -> CmdResult {
        let ten = cdb[0] == 0x41;
        let (lba, blocks) = if ten {
            (be_u(cdb, 2, 4), be_u(cdb, 7, 2))
        } else {
            (be_u(cdb, 2, 8), be_u(cdb, 10, 4))
        };
        let unmap = cdb[1] & 0x08 != 0;
        let anchor = cdb[1] & 0x10 != 0;
        let ndob = !ten && cdb[1] & 0x01 != 0;
        if cdb[1] >> 5 != 0 {
            return Err(bad_field(1)); // WRPROTECT
        }
        if anchor {
            return Err(bad_field(1));
        }
        self.check_range(lba, blocks)?;
        let count = self.device.block_count();
        let blocks = if blocks == 0 { count - lba } else { blocks };
        if blocks > WRITE_SAME_BLOCKS_MAX {
            return Err(bad_field(if ten { 7 } else { 10 }));
        }
        let block = self.device.block_size_bytes() as usize;
        let pattern: Vec<u8> = if ndob {
            vec![0u8; block]
        } else {
            if data_out.len() < block {
                return Err(sense::PARAMETER_LIST_LENGTH_ERROR.into());
            }
            data_out[..block].to_vec()
        };
        let _guard = self.io_lock.read().unwrap_or_else(|p| p.into_inner());
        if unmap {
            // UNMAP set: deallocate; with LBPRZ the blocks read back as zeros whatever the
            // pattern was (what initiators using WRITE SAME to discard expect).
            self.device
                .unmap(lba, blocks)
                .map_err(|e| device_failure(e, true))?;
            return Ok(Vec::new());
        }
        // Write in chunks of up to 1 MiB.
        let chunk_blocks = ((1 << 20) / block).max(1) as u64;
        let mut buf = Vec::with_capacity(chunk_blocks as usize * block);
        for _ in 0..chunk_blocks.min(blocks) {
            buf.extend_from_slice(&pattern);
        }
        let mut at = lba;
        let end = lba + blocks;
        while at < end {
            let n = chunk_blocks.min(end - at);
            self.device
                .write(at, &buf[..n as usize * block], false)
                .map_err(|e| device_failure(e, true))?;
            at += n;
        }
        Ok(Vec::new())
    }

    fn unmap(&self, cdb: &[u8], data_out: &[u8]) -> CmdResult {
        if cdb[1] & 0x01 != 0 {
            return Err(bad_field(1)); // ANCHOR
        }
        let param_len = be_u(cdb, 7, 2) as usize;
        if param_len == 0 {
            return Ok(Vec::new());
        }
        if param_len < 8 || data_out.len() < param_len.min(8) {
            return Err(sense::PARAMETER_LIST_LENGTH_ERROR.into());
        }
        let data = &data_out[..param_len.min(data_out.len())];
        let desc_len = (be_u(data, 2, 2) as usize).min(data.len().saturating_sub(8));
        let descriptors = desc_len / 16;
        if descriptors as u32 > UNMAP_DESCRIPTORS_MAX {
            return Err(sense::INVALID_FIELD_IN_PARAMETER_LIST.into());
        }
        let mut ranges = Vec::with_capacity(descriptors);
        for i in 0..descriptors {
            let d = &data[8 + i * 16..8 + (i + 1) * 16];
            let lba = be_u(d, 0, 8);
            let blocks = be_u(d, 8, 4);
            self.check_range(lba, blocks)?;
            if blocks > UNMAP_BLOCKS_MAX as u64 {
                return Err(sense::INVALID_FIELD_IN_PARAMETER_LIST.into());
            }
            ranges.push((lba, blocks));
        }
        let _guard = self.io_lock.read().unwrap_or_else(|p| p.into_inner());
        for (lba, blocks) in ranges {
            if blocks > 0 {
                self.device
                    .unmap(lba, blocks)
                    .map_err(|e| device_failure(e, true))?;
            }
        }
        Ok(Vec::new())
    }

    fn compare_and_write(&self, cdb: &[u8], data_out: &[u8]) -> CmdResult {
        let lba = be_u(cdb, 2, 8);
        let blocks = cdb[13] as u64;
        if cdb[1] >> 5 != 0 {
            return Err(bad_field(1));
        }
        self.check_range(lba, blocks)?;
        if blocks > COMPARE_AND_WRITE_BLOCKS_MAX as u64 {
            return Err(bad_field(13));
        }
        if blocks == 0 {
            return Ok(Vec::new());
        }
        let block = self.device.block_size_bytes() as usize;
        let len = blocks as usize * block;
        if data_out.len() < 2 * len {
            return Err(sense::PARAMETER_LIST_LENGTH_ERROR.into());
        }
        let (compare, write) = (&data_out[..len], &data_out[len..2 * len]);
        let _guard = self.io_lock.write().unwrap_or_else(|p| p.into_inner());
        let mut current = vec![0u8; len];
        self.device
            .read(lba, &mut current)
            .map_err(|e| device_failure(e, false))?;
        if let Some(offset) = current.iter().zip(compare).position(|(a, b)| a != b) {
            return Err(Sense {
                information: Some(offset as u32),
                ..sense::MISCOMPARE_DURING_VERIFY
            }
            .into());
        }
        let fua = cdb[1] & 0x08 != 0 || !self.lock().mode.write_cache_enabled;
        self.device
            .write(lba, write, fua)
            .map_err(|e| device_failure(e, true))?;
        Ok(Vec::new())
    }

    /// ORWRITE(16): OR the data into what the blocks hold, atomically against other writes.
    fn or_write(&self, cdb: &[u8], data_out: &[u8]) -> CmdResult {
        let lba = be_u(cdb, 2, 8);
        let blocks = be_u(cdb, 10, 4);
        if cdb[1] >> 5 != 0 {
            return Err(bad_field(1)); // ORPROTECT
        }
        self.check_range(lba, blocks)?;
        if blocks > WRITE_TRANSFER_BLOCKS_MAX as u64 {
            return Err(bad_field(10));
        }
        if blocks == 0 {
            return Ok(Vec::new());
        }
        let block = self.device.block_size_bytes() as usize;
        let len = blocks as usize * block;
        if data_out.len() < len {
            return Err(sense::PARAMETER_LIST_LENGTH_ERROR.into());
        }
        let _guard = self.io_lock.write().unwrap_or_else(|p| p.into_inner());
        let mut current = vec![0u8; len];
        self.device
            .read(lba, &mut current)
            .map_err(|e| device_failure(e, false))?;
        for (c, d) in current.iter_mut().zip(&data_out[..len]) {
            *c |= *d;
        }
        let fua = cdb[1] & 0x08 != 0 || !self.lock().mode.write_cache_enabled;
        self.device
            .write(lba, &current, fua)
            .map_err(|e| device_failure(e, true))?;
        Ok(Vec::new())
    }

    fn mode_pages(&self, page: u8, subpage: u8, pc: u8) -> Result<Vec<u8>, Failure> {
        let mode = self.lock().mode;
        let changeable = pc == 1;
        let default = pc == 2;
        let read_write_recovery = {
            let mut p = vec![0u8; 12];
            p[0] = 0x01;
            p[1] = 10;
            p
        };
        let caching = {
            let mut p = vec![0u8; 20];
            p[0] = 0x08;
            p[1] = 18;
            let wce = changeable || default || mode.write_cache_enabled;
            if wce {
                p[2] |= 0x04;
            }
            p
        };
        let control = {
            let mut p = vec![0u8; 12];
            p[0] = 0x0a;
            p[1] = 10;
            if changeable {
                p[2] = 0x04; // D_SENSE is changeable
            } else {
                if mode.descriptor_sense && !default {
                    p[2] |= 0x04;
                }
                p[3] = 0x10; // queue algorithm modifier: unrestricted reordering
                p[5] = 0x40; // TAS
                p[8] = 0xff;
                p[9] = 0xff; // busy timeout: unlimited
            }
            p
        };
        let informational = {
            let mut p = vec![0u8; 12];
            p[0] = 0x1c;
            p[1] = 10;
            p
        };
        if subpage != 0 && subpage != 0xff {
            return Err(bad_field(3));
        }
        let mut out = Vec::new();
        match page {
            0x01 => out.extend(read_write_recovery),
            0x08 => out.extend(caching),
            0x0a => out.extend(control),
            0x1c => out.extend(informational),
            0x3f => {
                out.extend(read_write_recovery);
                out.extend(caching);
                out.extend(control);
                out.extend(informational);
            }
            _ => return Err(bad_field(2)),
        }
        if changeable {
            // Zero the page bodies except the changeable bits set above.
            let mut at = 0;
            while at + 2 <= out.len() {
                let len = out[at + 1] as usize + 2;
                let code = out[at] & 0x3f;
                if code != 0x08 && code != 0x0a {
                    for b in &mut out[at + 2..at + len] {
                        *b = 0;
                    }
                }
                at += len;
            }
        }
        Ok(out)
    }

    fn mode_sense(&self, cdb: &[u8]) -> CmdResult {
        let six = cdb[0] == 0x1a;
        let dbd = cdb[1] & 0x08 != 0;
        let llbaa = !six && cdb[1] & 0x10 != 0;
        let pc = cdb[2] >> 6;
        let page = cdb[2] & 0x3f;
        let subpage = cdb[3];
        let alloc = if six {
            cdb[4] as usize
        } else {
            be_u(cdb, 7, 2) as usize
        };
        if pc == 3 {
            return Err(sense::SAVING_PARAMETERS_NOT_SUPPORTED.into());
        }
        let pages = self.mode_pages(page, subpage, pc)?;
        let count = self.device.block_count();
        let block = self.device.block_size_bytes();
        let descriptor: Vec<u8> = if dbd {
            Vec::new()
        } else if llbaa {
            let mut d = vec![0u8; 16];
            d[0..8].copy_from_slice(&count.to_be_bytes());
            d[12..16].copy_from_slice(&block.to_be_bytes());
            d
        } else {
            let mut d = vec![0u8; 8];
            d[0..4].copy_from_slice(&(count.min(0xffff_ffff) as u32).to_be_bytes());
            d[5..8].copy_from_slice(&block.to_be_bytes()[1..]);
            d
        };
        let device_specific = 0x10; // DPOFUA
        let mut d;
        if six {
            d = vec![0u8; 4];
            d[2] = device_specific;
            d[3] = descriptor.len() as u8;
            d.extend(descriptor);
            d.extend(pages);
            d[0] = (d.len() - 1).min(255) as u8;
        } else {
            d = vec![0u8; 8];
            d[3] = device_specific;
            if llbaa && !dbd {
                d[4] = 0x01;
            }
            d[6..8].copy_from_slice(&(descriptor.len() as u16).to_be_bytes());
            d.extend(descriptor);
            d.extend(pages);
            let len = (d.len() - 2) as u16;
            d[0..2].copy_from_slice(&len.to_be_bytes());
        }
        d.truncate(alloc);
        Ok(d)
    }

    fn mode_select(&self, cdb: &[u8], data_out: &[u8]) -> CmdResult {
        let six = cdb[0] == 0x15;
        let pf = cdb[1] & 0x10 != 0;
        let sp = cdb[1] & 0x01 != 0;
        let len = if six {
            cdb[4] as usize
        } else {
            be_u(cdb, 7, 2) as usize
        };
        if sp {
            return Err(sense::SAVING_PARAMETERS_NOT_SUPPORTED.into());
        }
        if len == 0 {
            return Ok(Vec::new());
        }
        if !pf {
            return Err(bad_field(1));
        }
        if data_out.len() < len {
            return Err(sense::PARAMETER_LIST_LENGTH_ERROR.into());
        }
        let data = &data_out[..len];
        let header = if six { 4 } else { 8 };
        if data.len() < header {
            return Err(sense::PARAMETER_LIST_LENGTH_ERROR.into());
        }
        let bd_len = if six {
            data[3] as usize
        } else {
            be_u(data, 6, 2) as usize
        };
        let mut at = header + bd_len;
        let mut new_mode = self.lock().mode;
        while at < data.len() {
            if at + 2 > data.len() {
                return Err(sense::PARAMETER_LIST_LENGTH_ERROR.into());
            }
            let code = data[at] & 0x3f;
            let spf = data[at] & 0x40 != 0;
            if spf {
                return Err(sense::INVALID_FIELD_IN_PARAMETER_LIST.into());
            }
            let plen = data[at + 1] as usize + 2;
            if at + plen > data.len() {
                return Err(sense::PARAMETER_LIST_LENGTH_ERROR.into());
            }
            let p = &data[at..at + plen];
            let current = self
                .mode_pages(code, 0, 0)
                .map_err(|_| Failure::Check(sense::INVALID_FIELD_IN_PARAMETER_LIST))?;
            let changeable = self
                .mode_pages(code, 0, 1)
                .map_err(|_| Failure::Check(sense::INVALID_FIELD_IN_PARAMETER_LIST))?;
            if current.len() != plen {
                return Err(sense::INVALID_FIELD_IN_PARAMETER_LIST.into());
            }
            for i in 2..plen {
                if (p[i] ^ current[i]) & !changeable[i] != 0 {
                    return Err(sense::INVALID_FIELD_IN_PARAMETER_LIST.into());
                }
            }
            match code {
                0x08 => new_mode.write_cache_enabled = p[2] & 0x04 != 0,
                0x0a => new_mode.descriptor_sense = p[2] & 0x04 != 0,
                _ => {}
            }
            at += plen;
        }
        let flush_needed = {
            let mut st = self.lock();
            let was = st.mode.write_cache_enabled;
            st.mode = new_mode;
            was && !new_mode.write_cache_enabled
        };
        if flush_needed {
            self.device.flush().map_err(|e| device_failure(e, true))?;
        }
        Ok(Vec::new())
    }

    fn report_supported_opcodes(&self, cdb: &[u8]) -> CmdResult {
        let rctd = cdb[2] & 0x80 != 0;
        let options = cdb[2] & 0x07;
        let req_opcode = cdb[3];
        let req_sa = be_u(cdb, 4, 2) as u16;
        let alloc = be_u(cdb, 6, 4) as usize;
        let timeouts = |d: &mut Vec<u8>| {
            if rctd {
                d.extend_from_slice(&[0x00, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            }
        };
        let mut d = Vec::new();
        match options {
            0 => {
                d.extend_from_slice(&[0u8; 4]);
                for (op, sa, len) in SUPPORTED_OPCODES {
                    let mut desc = vec![0u8; 8];
                    desc[0] = *op;
                    if let Some(sa) = sa {
                        desc[2..4].copy_from_slice(&sa.to_be_bytes());
                        desc[5] |= 0x01; // SERVACTV
                    }
                    if rctd {
                        desc[5] |= 0x02; // CTDP
                    }
                    desc[6..8].copy_from_slice(&(*len as u16).to_be_bytes());
                    d.extend(desc);
                    timeouts(&mut d);
                }
                let len = (d.len() - 4) as u32;
                d[0..4].copy_from_slice(&len.to_be_bytes());
            }
            1..=3 => {
                let has_sa = |op: u8| {
                    SUPPORTED_OPCODES
                        .iter()
                        .any(|(o, sa, _)| *o == op && sa.is_some())
                };
                let found = SUPPORTED_OPCODES.iter().find(|(o, sa, _)| {
                    *o == req_opcode
                        && match options {
                            1 => sa.is_none(),
                            2 => *sa == Some(req_sa),
                            _ => sa.map_or(req_sa == 0, |s| s == req_sa),
                        }
                });
                if options == 1 && has_sa(req_opcode) {
                    return Err(bad_field(2));
                }
                if options == 2
                    && !has_sa(req_opcode)
                    && SUPPORTED_OPCODES.iter().any(|(o, _, _)| *o == req_opcode)
                {
                    return Err(bad_field(2));
                }
                d.extend_from_slice(&[0u8; 4]);
                match found {
                    Some((op, sa, len)) => {
                        d[1] = 0x03 | if rctd { 0x80 } else { 0 }; // supported, per standard
                        d[2..4].copy_from_slice(&(*len as u16).to_be_bytes());
                        d.extend(cdb_usage(*op, *sa, *len));
                    }
                    None => d[1] = 0x01 | if rctd { 0x80 } else { 0 }, // not supported
                }
                timeouts(&mut d);
            }
            _ => return Err(bad_field(2)),
        }
        d.truncate(alloc);
        Ok(d)
    }
}
