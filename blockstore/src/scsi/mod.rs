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
//!
//! Code map. This file holds the shared types ([`Lun`], [`Nexus`], [`ScsiResult`], the internal
//! `Failure`), the CDB helpers, the checks every command passes (`preflight`: LUN, CDB length,
//! unit attention, reservation conflict) and the dispatcher, which hands each opcode to its
//! family:
//! - `unit`: TEST UNIT READY, REQUEST SENSE, START STOP UNIT, PREVENT ALLOW MEDIUM REMOVAL;
//! - `inquiry`: INQUIRY standard data and the VPD pages;
//! - `capacity`: READ CAPACITY (10/16), GET LBA STATUS, READ DEFECT DATA (10/12);
//! - `io`: READ, WRITE, WRITE AND VERIFY, VERIFY, ORWRITE, COMPARE AND WRITE, WRITE SAME, UNMAP,
//!   PRE-FETCH, SYNCHRONIZE CACHE, and the streaming and fast READ paths;
//! - `mode`: MODE SENSE and MODE SELECT (6/10) and the mode pages;
//! - `report`: REPORT LUNS, REPORT SUPPORTED OPERATION CODES;
//! - `reservation`: RESERVE/RELEASE (6/10) and PERSISTENT RESERVE IN/OUT;
//! - `sense`: status codes and sense data; `file`: a [`BlockDevice`] over a plain file.
//!
//! Architecture invariant: the family files hold no state of their own; everything shared
//! between sessions is in [`Lun`] (behind its mutex) or in the device.

mod alua;
mod capacity;
pub mod file;
mod inquiry;
mod io;
mod mode;
mod report;
mod reservation;
pub mod sense;
#[cfg(test)]
mod testing;
mod unit;

use std::collections::{HashMap, HashSet, VecDeque};
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
    /// The version of the device's port groups each nexus last saw (ALUA, `alua.rs`).
    alua_seen: HashMap<u64, u64>,
    /// The nexuses that sent a command other than TEST UNIT READY (`alua.rs`).
    past_first_tur: HashSet<u64>,
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
                alua_seen: HashMap::new(),
                past_first_tur: HashSet::new(),
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
        st.alua_seen.remove(&nexus.id);
        st.past_first_tur.remove(&nexus.id);
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
        // Before anything reads CDB fields (a short CDB to any LUN must not panic).
        if cdb.len() < cdb_len_for(opcode).min(16) {
            return Some(ScsiResult::check(sense::INVALID_OPCODE));
        }
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
        // The path's ALUA state: a state change is a unit attention; a state that refuses this
        // command refuses it before anything else.
        let refused = self.alua_preflight(nexus.id, opcode, cdb);
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
        refused.map(ScsiResult::check)
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

    /// Runs a command that passed `preflight`: the opcode picks its family's handler.
    fn dispatch(&self, nexus: &Nexus, cdb: &[u8], data_out: &[u8]) -> CmdResult {
        match cdb[0] {
            // Unit state (unit.rs).
            0x00 => self.test_unit_ready(),
            0x03 => self.request_sense(nexus, cdb),
            0x1b => self.start_stop_unit(cdb),
            0x1e => self.prevent_allow_medium_removal(nexus, cdb),
            // Inquiry data (inquiry.rs).
            0x12 => self.inquiry(cdb, false),
            // Capacity and medium information (capacity.rs).
            0x25 => self.read_capacity10(cdb),
            0x9e => match cdb[1] & 0x1f {
                0x10 => self.read_capacity16(cdb),
                0x12 => self.get_lba_status(cdb),
                _ => Err(bad_field(1)),
            },
            0x37 => self.read_defect_data10(cdb),
            0xb7 => self.read_defect_data12(cdb),
            // Block I/O (io.rs).
            0x08 | 0x28 | 0xa8 | 0x88 => self.read(cdb),
            0x0a | 0x2a | 0xaa | 0x8a => self.write(cdb, data_out, false),
            0x2e | 0xae | 0x8e => self.write(cdb, data_out, true),
            0x2f | 0xaf | 0x8f => self.verify(cdb, data_out),
            0x34 | 0x90 => self.pre_fetch(cdb),
            0x35 | 0x91 => self.synchronize_cache(cdb),
            0x41 | 0x93 => self.write_same(cdb, data_out),
            0x42 => self.unmap(cdb, data_out),
            0x89 => self.compare_and_write(cdb, data_out),
            0x8b => self.or_write(cdb, data_out),
            // Mode pages (mode.rs).
            0x1a | 0x5a => self.mode_sense(cdb),
            0x15 | 0x55 => self.mode_select(cdb, data_out),
            // Reservations (reservation.rs).
            0x16 | 0x56 => self.reserve(nexus, cdb),
            0x17 | 0x57 => self.release(nexus),
            0x5e => self.persistent_reserve_in(nexus, cdb),
            0x5f => self.persistent_reserve_out(nexus, cdb, data_out),
            // Reports (report.rs).
            0xa0 => self.report_luns(cdb),
            0xa3 => match cdb[1] & 0x1f {
                0x0a => self.report_target_port_groups(cdb),
                0x0c => self.report_supported_opcodes(cdb),
                _ => Err(bad_field(1)),
            },
            _ => Err(sense::INVALID_OPCODE.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::sense;
    use super::testing::*;
    use super::Lun;

    /// What every command goes through before its family: the CDB must name an opcode this LUN
    /// implements and be long enough for its group; only LUN 0 exists.
    #[test]
    fn dispatcher_table() {
        let sixteen = |opcode: u8| {
            let mut c = vec![0u8; 16];
            c[0] = opcode;
            c
        };
        let rows: Vec<Row> = vec![
            (
                "no CDB",
                vec![],
                vec![],
                check_condition(sense::INVALID_OPCODE),
            ),
            (
                "0x02",
                sixteen(0x02),
                vec![],
                check_condition(sense::INVALID_OPCODE),
            ),
            (
                "FORMAT UNIT",
                sixteen(0x04),
                vec![],
                check_condition(sense::INVALID_OPCODE),
            ),
            (
                "WRITE BUFFER",
                sixteen(0x3b),
                vec![],
                check_condition(sense::INVALID_OPCODE),
            ),
            (
                "variable length",
                sixteen(0x7f),
                vec![],
                check_condition(sense::INVALID_OPCODE),
            ),
            (
                "EXTENDED COPY",
                sixteen(0x83),
                vec![],
                check_condition(sense::INVALID_OPCODE),
            ),
            (
                "vendor specific",
                sixteen(0xc0),
                vec![],
                check_condition(sense::INVALID_OPCODE),
            ),
            (
                "0xff",
                sixteen(0xff),
                vec![],
                check_condition(sense::INVALID_OPCODE),
            ),
            (
                "READ (10) CDB of 3 bytes",
                vec![0x28, 0, 0],
                vec![],
                check_condition(sense::INVALID_OPCODE),
            ),
            (
                "READ (16) CDB of 10 bytes",
                cdb10(0x88, 0, 0, 1),
                vec![],
                check_condition(sense::INVALID_OPCODE),
            ),
            (
                "READ (10) in a 16-byte CDB",
                cdb10(0x28, 0, 0, 1),
                vec![],
                good().len(512),
            ),
        ];
        each_fresh(&rows);
    }

    /// A LUN number other than 0: INQUIRY, REPORT LUNS and REQUEST SENSE answer (REQUEST SENSE
    /// with LOGICAL UNIT NOT SUPPORTED as its data), everything else is refused with it.
    #[test]
    fn missing_lun() {
        let lun = Lun::new(memory());
        let not_supported = sense::LUN_NOT_SUPPORTED.to_bytes();
        let rows: [(&str, Vec<u8>, Expect); 6] = [
            (
                "TEST UNIT READY",
                vec![0; 6],
                check_condition(sense::LUN_NOT_SUPPORTED),
            ),
            (
                "READ (10)",
                cdb10(0x28, 0, 0, 1),
                check_condition(sense::LUN_NOT_SUPPORTED),
            ),
            (
                "INQUIRY",
                cdb6(0x12, 0, 0, 0, 96),
                good().len(96).at(0, &[0x7f]),
            ),
            ("REPORT LUNS", cdb12(0xa0, 0, 0, 16), good().len(16)),
            (
                "REQUEST SENSE",
                cdb6(0x03, 0, 0, 0, 18),
                good_data(not_supported.clone()),
            ),
            (
                "REQUEST SENSE truncated",
                cdb6(0x03, 0, 0, 0, 8),
                good_data(not_supported[..8].to_vec()),
            ),
        ];
        for (name, cdb, expect) in &rows {
            check_as(&lun, NEXUS, 1, name, cdb, &[], expect);
        }
    }
}
