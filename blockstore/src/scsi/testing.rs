//! Test support for the SCSI command tests: a sparse in-memory [`BlockDevice`] (a huge device
//! costs nothing; it counts flushes and FUA writes and can be told to fail), CDB builders, and
//! the one [`check`] every family's table goes through.
//!
//! A table row is a command (CDB and data-out) and what must come back: the status, the sense
//! key, ASC and ASCQ (plus INFORMATION and the field pointer when the row names them), and the
//! data-in bytes, whole or a few fields of them. [`each_fresh`] runs every row against a new LUN;
//! [`in_order`] runs them one after another against one LUN, for sequences (write then read).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::sense::{self, Sense};
use super::{Lun, Nexus, ScsiResult};
use crate::device::{AccessState, BlockDevice, DeviceError, PortGroups};

/// The default test device: 2048 blocks of 512 bytes (1 MiB).
pub(super) const BLOCKS: u64 = 2048;
pub(super) const BLOCK_BYTES: usize = 512;
pub(super) const UNIQUE_ID: [u8; 16] = [
    0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54, 0x32, 0x10,
];
/// The nexus [`check`] sends from.
pub(super) const NEXUS: u64 = 1;

/// What the memory device answers every read, write, unmap and flush with while set.
#[derive(Debug, Clone, Copy)]
pub(super) enum Fault {
    Medium { lba: u64 },
    Fenced,
    Unavailable,
    Io,
}

#[derive(Default)]
struct MemoryState {
    /// Written blocks; an absent block is unmapped and reads as zeros.
    blocks: BTreeMap<u64, Vec<u8>>,
    writes: u64,
    fua_writes: u64,
    flushes: u64,
    fault: Option<Fault>,
    /// ALUA paths, while set (`alua.rs`).
    port_groups: Option<PortGroups>,
}

/// A sparse in-memory block device.
pub(super) struct Memory {
    block_size_bytes: u32,
    block_count: u64,
    unique_id: [u8; 16],
    state: Mutex<MemoryState>,
}

impl Memory {
    pub(super) fn new(block_count: u64, block_size_bytes: u32, unique_id: [u8; 16]) -> Arc<Memory> {
        Arc::new(Memory {
            block_size_bytes,
            block_count,
            unique_id,
            state: Mutex::new(MemoryState::default()),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        self.state.lock().unwrap()
    }

    pub(super) fn writes(&self) -> u64 {
        self.state().writes
    }

    pub(super) fn fua_writes(&self) -> u64 {
        self.state().fua_writes
    }

    pub(super) fn flushes(&self) -> u64 {
        self.state().flushes
    }

    pub(super) fn set_fault(&self, fault: Option<Fault>) {
        self.state().fault = fault;
    }

    /// Serves the device on two paths from now on: this one in group 7 at `local`, the other
    /// in group 9 at `other`; each call is a change of the states.
    pub(super) fn set_paths(&self, local: AccessState, other: AccessState) {
        let mut state = self.state();
        let version = state
            .port_groups
            .as_ref()
            .map_or(1, |groups| groups.version + 1);
        state.port_groups = Some(PortGroups::new((7, local), &[(9, other)], version));
    }

    pub(super) fn mapped(&self, lba: u64) -> bool {
        self.state().blocks.contains_key(&lba)
    }

    fn check(&self, lba: u64, bytes: usize) -> Result<u64, DeviceError> {
        let block = self.block_size_bytes as usize;
        assert!(
            bytes.is_multiple_of(block),
            "device access of {bytes} bytes, not whole blocks"
        );
        let blocks = (bytes / block) as u64;
        if lba > self.block_count || blocks > self.block_count - lba {
            return Err(DeviceError::OutOfRange {
                lba,
                blocks,
                block_count: self.block_count,
            });
        }
        Ok(blocks)
    }

    fn fault(&self) -> Result<(), DeviceError> {
        match self.state().fault {
            None => Ok(()),
            Some(Fault::Medium { lba }) => Err(DeviceError::Medium {
                lba,
                reason: "injected".into(),
            }),
            Some(Fault::Fenced) => Err(DeviceError::Fenced {
                held: 1,
                current: 2,
            }),
            Some(Fault::Unavailable) => Err(DeviceError::Unavailable("injected".into())),
            Some(Fault::Io) => Err(DeviceError::Io(std::io::Error::other("injected"))),
        }
    }
}

impl BlockDevice for Memory {
    fn block_size_bytes(&self) -> u32 {
        self.block_size_bytes
    }
    fn block_count(&self) -> u64 {
        self.block_count
    }
    fn unique_id(&self) -> [u8; 16] {
        self.unique_id
    }
    fn read(&self, lba: u64, buffer: &mut [u8]) -> Result<(), DeviceError> {
        self.check(lba, buffer.len())?;
        self.fault()?;
        let state = self.state();
        let block = self.block_size_bytes as usize;
        for (i, out) in buffer.chunks_mut(block).enumerate() {
            match state.blocks.get(&(lba + i as u64)) {
                Some(data) => out.copy_from_slice(data),
                None => out.fill(0),
            }
        }
        Ok(())
    }
    fn write(&self, lba: u64, data: &[u8], force_unit_access: bool) -> Result<(), DeviceError> {
        self.check(lba, data.len())?;
        self.fault()?;
        let mut state = self.state();
        let block = self.block_size_bytes as usize;
        for (i, chunk) in data.chunks(block).enumerate() {
            state.blocks.insert(lba + i as u64, chunk.to_vec());
        }
        state.writes += 1;
        if force_unit_access {
            state.fua_writes += 1;
        }
        Ok(())
    }
    fn unmap(&self, lba: u64, blocks: u64) -> Result<(), DeviceError> {
        if lba > self.block_count || blocks > self.block_count - lba {
            return Err(DeviceError::OutOfRange {
                lba,
                blocks,
                block_count: self.block_count,
            });
        }
        self.fault()?;
        let mut state = self.state();
        let unmapped: Vec<u64> = state
            .blocks
            .range(lba..lba + blocks)
            .map(|(l, _)| *l)
            .collect();
        for l in unmapped {
            state.blocks.remove(&l);
        }
        Ok(())
    }
    fn flush(&self) -> Result<(), DeviceError> {
        self.fault()?;
        self.state().flushes += 1;
        Ok(())
    }
    fn port_groups(&self) -> Option<PortGroups> {
        self.state().port_groups.clone()
    }

    fn mapping_status(&self, lba: u64) -> Result<(bool, u64), DeviceError> {
        if lba >= self.block_count {
            return Err(DeviceError::OutOfRange {
                lba,
                blocks: 1,
                block_count: self.block_count,
            });
        }
        let state = self.state();
        if state.blocks.contains_key(&lba) {
            let mut end = lba;
            while state.blocks.contains_key(&end) {
                end += 1;
            }
            Ok((true, end - lba))
        } else {
            let next = state.blocks.range(lba..).next().map(|(l, _)| *l);
            Ok((false, next.unwrap_or(self.block_count) - lba))
        }
    }
}

/// The default test device.
pub(super) fn memory() -> Arc<Memory> {
    Memory::new(BLOCKS, BLOCK_BYTES as u32, UNIQUE_ID)
}

pub(super) fn nexus(id: u64) -> Nexus {
    Nexus {
        id,
        initiator_name: format!("iqn.2026-11.org.cairn:test{id}"),
        isid: [0x80, 0, 0, 0, 0, id as u8],
    }
}

/// What a command must produce. Built with [`good`], [`good_data`], [`check_condition`] or
/// [`status`], then narrowed with [`Expect::len`] and [`Expect::at`].
#[derive(Debug, Clone)]
pub(super) struct Expect {
    status: u8,
    /// Key, ASC and ASCQ always compared; INFORMATION and the sense-key specific bytes only
    /// when set here.
    sense: Option<Sense>,
    data: Option<Vec<u8>>,
    len: Option<usize>,
    fields: Vec<(usize, Vec<u8>)>,
}

/// GOOD; the data-in is checked only as far as [`Expect::len`] and [`Expect::at`] say.
pub(super) fn good() -> Expect {
    status(sense::GOOD)
}

/// GOOD with exactly these data-in bytes.
pub(super) fn good_data(data: impl Into<Vec<u8>>) -> Expect {
    Expect {
        data: Some(data.into()),
        ..good()
    }
}

/// GOOD and no data-in.
pub(super) fn good_empty() -> Expect {
    good_data(Vec::new())
}

/// CHECK CONDITION with this sense (and no data-in).
pub(super) fn check_condition(s: Sense) -> Expect {
    Expect {
        sense: Some(s),
        data: Some(Vec::new()),
        ..status(sense::CHECK_CONDITION)
    }
}

/// INVALID FIELD IN CDB pointing at CDB byte `byte`.
pub(super) fn bad_field_at(byte: u16) -> Expect {
    check_condition(Sense::invalid_field_in_cdb_at(byte))
}

/// A status other than GOOD or CHECK CONDITION (CONDITION MET, RESERVATION CONFLICT), with no
/// sense and no data-in.
pub(super) fn status(status: u8) -> Expect {
    Expect {
        status,
        sense: None,
        data: None,
        len: None,
        fields: Vec::new(),
    }
}

impl Expect {
    /// The data-in is `len` bytes long.
    pub(super) fn len(mut self, len: usize) -> Expect {
        self.len = Some(len);
        self
    }

    /// The data-in holds `bytes` at `offset`.
    pub(super) fn at(mut self, offset: usize, bytes: &[u8]) -> Expect {
        self.fields.push((offset, bytes.to_vec()));
        self
    }

    /// Panics, naming the row, unless `result` is what this expects.
    pub(super) fn assert(&self, name: &str, cdb: &[u8], result: &ScsiResult) {
        let context = format!("{name} (CDB {cdb:02x?}): got {result:02x?}");
        assert_eq!(result.status, self.status, "status of {context}");
        match self.sense {
            Some(want) => {
                let s = &result.sense;
                assert!(s.len() >= 18, "no fixed-format sense data in {context}");
                assert_eq!(
                    (s[2] & 0x0f, s[12], s[13]),
                    (want.key, want.asc, want.ascq),
                    "sense key/ASC/ASCQ of {context}"
                );
                if let Some(information) = want.information {
                    assert_eq!(s[0] & 0x80, 0x80, "VALID of {context}");
                    assert_eq!(
                        s[3..7],
                        information.to_be_bytes(),
                        "INFORMATION of {context}"
                    );
                }
                if let Some(specific) = want.specific {
                    assert_eq!(
                        s[15..18],
                        [specific[0] | 0x80, specific[1], specific[2]],
                        "sense-key specific bytes (field pointer) of {context}"
                    );
                }
            }
            None => assert!(result.sense.is_empty(), "sense data with {context}"),
        }
        if let Some(data) = &self.data {
            assert_eq!(&result.data_in, data, "data-in of {context}");
        }
        if let Some(len) = self.len {
            assert_eq!(result.data_in.len(), len, "data-in length of {context}");
        }
        for (offset, bytes) in &self.fields {
            let got = result.data_in.get(*offset..offset + bytes.len());
            assert_eq!(
                got,
                Some(&bytes[..]),
                "data-in bytes at {offset} of {context}"
            );
        }
    }
}

/// One table row: name, CDB, data-out, expectation.
pub(super) type Row = (&'static str, Vec<u8>, Vec<u8>, Expect);

/// Runs one command from nexus [`NEXUS`] to LUN 0 and asserts what it produced.
pub(super) fn check(
    lun: &Lun,
    name: &str,
    cdb: &[u8],
    data_out: &[u8],
    expect: &Expect,
) -> ScsiResult {
    check_as(lun, NEXUS, 0, name, cdb, data_out, expect)
}

/// [`check`] from another nexus or to another LUN number.
pub(super) fn check_as(
    lun: &Lun,
    nexus_id: u64,
    lun_id: u64,
    name: &str,
    cdb: &[u8],
    data_out: &[u8],
    expect: &Expect,
) -> ScsiResult {
    let result = lun.execute(&nexus(nexus_id), lun_id, cdb, data_out);
    expect.assert(name, cdb, &result);
    result
}

/// A table row sent from a given nexus: nexus id, name, CDB, data-out, expectation.
pub(super) type NexusRow = (u64, &'static str, Vec<u8>, Vec<u8>, Expect);

/// Makes a CDB for an LBA and a block count (one of the READ or WRITE forms).
pub(super) type CdbFor = fn(u32, u8) -> Vec<u8>;

/// Runs each row against a new LUN over a new default device.
pub(super) fn each_fresh(rows: &[Row]) {
    for (name, cdb, data_out, expect) in rows {
        let lun = Lun::new(memory());
        check(&lun, name, cdb, data_out, expect);
    }
}

/// Runs the rows one after another against `lun`: later rows see what earlier ones did.
pub(super) fn in_order(lun: &Lun, rows: &[Row]) {
    for (name, cdb, data_out, expect) in rows {
        check(lun, name, cdb, data_out, expect);
    }
}

/// A 6-byte CDB.
pub(super) fn cdb6(opcode: u8, byte1: u8, byte2: u8, byte3: u8, byte4: u8) -> Vec<u8> {
    vec![opcode, byte1, byte2, byte3, byte4, 0]
}

/// A 10-byte CDB in the READ (10) layout: LBA in bytes 2..6, length in bytes 7..9.
pub(super) fn cdb10(opcode: u8, byte1: u8, lba: u32, length: u16) -> Vec<u8> {
    let mut c = vec![0u8; 10];
    c[0] = opcode;
    c[1] = byte1;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&length.to_be_bytes());
    c
}

/// A 12-byte CDB in the READ (12) layout: LBA in bytes 2..6, length in bytes 6..10.
pub(super) fn cdb12(opcode: u8, byte1: u8, lba: u32, length: u32) -> Vec<u8> {
    let mut c = vec![0u8; 12];
    c[0] = opcode;
    c[1] = byte1;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[6..10].copy_from_slice(&length.to_be_bytes());
    c
}

/// A 16-byte CDB in the READ (16) layout: LBA in bytes 2..10, length in bytes 10..14.
pub(super) fn cdb16(opcode: u8, byte1: u8, lba: u64, length: u32) -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = opcode;
    c[1] = byte1;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&length.to_be_bytes());
    c
}

/// `blocks` blocks of data no two of which are alike (each byte depends on the seed, the block
/// and its offset), so a misplaced block shows.
pub(super) fn pattern(seed: u8, blocks: usize) -> Vec<u8> {
    (0..blocks * BLOCK_BYTES)
        .map(|i| seed ^ (i / BLOCK_BYTES) as u8 ^ (i as u8).wrapping_mul(7))
        .collect()
}

/// UNMAP's parameter list: the 8-byte header, then one 16-byte descriptor per (LBA, blocks).
pub(super) fn unmap_parameters(ranges: &[(u64, u32)]) -> Vec<u8> {
    let descriptor_bytes = 16 * ranges.len();
    let mut p = Vec::with_capacity(8 + descriptor_bytes);
    p.extend_from_slice(&((6 + descriptor_bytes) as u16).to_be_bytes());
    p.extend_from_slice(&(descriptor_bytes as u16).to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    for (lba, blocks) in ranges {
        p.extend_from_slice(&lba.to_be_bytes());
        p.extend_from_slice(&blocks.to_be_bytes());
        p.extend_from_slice(&[0; 4]);
    }
    p
}

/// [`in_order`] with each row from its own nexus.
pub(super) fn in_order_by(lun: &Lun, rows: &[NexusRow]) {
    for (nexus_id, name, cdb, data_out, expect) in rows {
        check_as(lun, *nexus_id, 0, name, cdb, data_out, expect);
    }
}
