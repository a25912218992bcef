//! Block I/O commands (SBC-3): READ (6/10/12/16), WRITE (6/10/12/16), WRITE AND VERIFY
//! (10/12/16), VERIFY (10/12/16), ORWRITE (16), COMPARE AND WRITE, WRITE SAME (10/16), UNMAP,
//! PRE-FETCH (10/16) and SYNCHRONIZE CACHE (10/16); also the READ paths a shell drives itself:
//! streaming ([`Lun::start_read`], [`Lun::read_blocks`]) for transfers above
//! [`TRANSFER_BLOCKS_MAX`], and [`Lun::try_fast_read`] straight into a reused buffer.
//!
//! Every handler checks its CDB fields, the LBA range against the device and the data-out length
//! before it touches the device. Plain writers, WRITE SAME and UNMAP hold the LUN's I/O lock
//! shared; COMPARE AND WRITE and ORWRITE hold it exclusively across their read-modify-write.

use super::sense::{self, Sense};
use super::{
    bad_field, be_u, cdb_len_for, device_failure, CmdResult, Failure, Lun, Nexus, ReadExtent,
    ScsiResult, COMPARE_AND_WRITE_BLOCKS_MAX, TRANSFER_BLOCKS_MAX, UNMAP_BLOCKS_MAX,
    UNMAP_DESCRIPTORS_MAX, WRITE_SAME_BLOCKS_MAX, WRITE_TRANSFER_BLOCKS_MAX,
};
use crate::device::{DeviceError, WriteCompletion};

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

impl Lun {
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

    pub(super) fn read(&self, cdb: &[u8]) -> CmdResult {
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
        let groups = self.device.port_groups();
        {
            let mut st = self.lock();
            // A path state that refuses READs, or a change of it to report first: `execute`
            // says so.
            if groups.is_some_and(|groups| {
                super::alua::alua_check(&mut st, &groups, nexus.id, cdb[0], cdb).is_some()
            }) {
                return None;
            }
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

    pub(super) fn write(&self, cdb: &[u8], data_out: &[u8], verify: bool) -> CmdResult {
        let Some((lba, len, fua)) = self.check_write(cdb, data_out, verify)? else {
            return Ok(Vec::new());
        };
        let _guard = self.io_lock.read().unwrap_or_else(|p| p.into_inner());
        self.device
            .write(lba, &data_out[..len], fua)
            .map_err(|e| device_failure(e, true))?;
        Ok(Vec::new())
    }

    /// The checks of a WRITE before it touches the device: `(lba, bytes, fua)`, or `None` for
    /// a write of no blocks.
    fn check_write(
        &self,
        cdb: &[u8],
        data_out: &[u8],
        verify: bool,
    ) -> Result<Option<(u64, usize, bool)>, Failure> {
        let rw = parse_rw(cdb)?;
        if rw.protect != 0 {
            return Err(bad_field(1));
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
            return Ok(None);
        }
        let fua = rw.fua || verify || !self.lock().mode.write_cache_enabled;
        Ok(Some((rw.lba, len, fua)))
    }

    /// A WRITE (10/12/16) whose acknowledgement the caller waits for
    /// ([`crate::device::BlockDevice::start_write`]): runs every check `execute` would,
    /// applies the write, and returns what is left to wait for. `Err` is the command's outcome
    /// (checks failed, or the device refused the write); `Ok(None)`: complete, GOOD. Once
    /// the wait resolves, [`Lun::write_outcome`] turns it into the command's outcome.
    pub fn start_write(
        &self,
        nexus: &Nexus,
        lun_id: u64,
        cdb: &[u8],
        data_out: &[u8],
    ) -> Result<Option<WriteCompletion>, ScsiResult> {
        if !matches!(cdb.first(), Some(0x2a | 0xaa | 0x8a)) {
            return Err(ScsiResult::check(sense::INVALID_OPCODE));
        }
        if let Some(result) = self.preflight(nexus, lun_id, cdb) {
            return Err(result);
        }
        let Some((lba, len, fua)) = self
            .check_write(cdb, data_out, false)
            .map_err(Self::failure)?
        else {
            return Ok(None);
        };
        let _guard = self.io_lock.read().unwrap_or_else(|p| p.into_inner());
        self.device
            .start_write(lba, &data_out[..len], fua)
            .map_err(|e| Self::failure(device_failure(e, true)))
    }

    /// The outcome of a write started with [`Lun::start_write`] once its wait resolved.
    pub fn write_outcome(result: Result<(), DeviceError>) -> ScsiResult {
        match result {
            Ok(()) => ScsiResult::good(Vec::new()),
            Err(e) => Self::failure(device_failure(e, true)),
        }
    }

    pub(super) fn verify(&self, cdb: &[u8], data_out: &[u8]) -> CmdResult {
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

    pub(super) fn write_same(&self, cdb: &[u8], data_out: &[u8]) -> CmdResult {
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
            // pattern was. This is what LIO does and what libiscsi's WriteSame*.Unmap* tests
            // expect (they send 0xff blocks and read zeros back); qemu's emulation writes a
            // non-zero pattern instead.
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

    pub(super) fn unmap(&self, cdb: &[u8], data_out: &[u8]) -> CmdResult {
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

    pub(super) fn compare_and_write(&self, cdb: &[u8], data_out: &[u8]) -> CmdResult {
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
    pub(super) fn or_write(&self, cdb: &[u8], data_out: &[u8]) -> CmdResult {
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

    /// PRE-FETCH (10/16): the range is checked, nothing is read. Everything a file holds is
    /// already "in cache" as far as SBC is concerned, so the answer is CONDITION MET.
    pub(super) fn pre_fetch(&self, cdb: &[u8]) -> CmdResult {
        let (lba, blocks) = if cdb[0] == 0x34 {
            (be_u(cdb, 2, 4), be_u(cdb, 7, 2))
        } else {
            (be_u(cdb, 2, 8), be_u(cdb, 10, 4))
        };
        self.check_range(lba, blocks)?;
        Err(Failure::Status(sense::CONDITION_MET))
    }

    /// SYNCHRONIZE CACHE (10/16): the range is checked, then the whole device is flushed.
    pub(super) fn synchronize_cache(&self, cdb: &[u8]) -> CmdResult {
        let (lba, blocks) = if cdb[0] == 0x35 {
            (be_u(cdb, 2, 4), be_u(cdb, 7, 2))
        } else {
            (be_u(cdb, 2, 8), be_u(cdb, 10, 4))
        };
        self.check_range(lba, blocks)?;
        self.device.flush().map_err(|e| device_failure(e, true))?;
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::super::sense::{self, Sense};
    use super::super::testing::*;
    use super::super::{
        Lun, ReadExtent, ScsiResult, TRANSFER_BLOCKS_MAX, UNMAP_BLOCKS_MAX, UNMAP_DESCRIPTORS_MAX,
        WRITE_SAME_BLOCKS_MAX, WRITE_TRANSFER_BLOCKS_MAX,
    };

    fn read6(lba: u32, blocks: u8) -> Vec<u8> {
        cdb6(
            0x08,
            (lba >> 16) as u8 & 0x1f,
            (lba >> 8) as u8,
            lba as u8,
            blocks,
        )
    }

    fn write6(lba: u32, blocks: u8) -> Vec<u8> {
        cdb6(
            0x0a,
            (lba >> 16) as u8 & 0x1f,
            (lba >> 8) as u8,
            lba as u8,
            blocks,
        )
    }

    fn read10(lba: u32, blocks: u16) -> Vec<u8> {
        cdb10(0x28, 0, lba, blocks)
    }

    fn write10(lba: u32, blocks: u16) -> Vec<u8> {
        cdb10(0x2a, 0, lba, blocks)
    }

    fn verify10(bytchk: u8, lba: u32, blocks: u16) -> Vec<u8> {
        cdb10(0x2f, bytchk << 1, lba, blocks)
    }

    /// UNMAP with this parameter list length.
    fn unmap(parameter_bytes: u16) -> Vec<u8> {
        cdb10(0x42, 0, 0, parameter_bytes)
    }

    fn unmap_list(ranges: &[(u64, u32)]) -> (Vec<u8>, Vec<u8>) {
        let parameters = unmap_parameters(ranges);
        (unmap(parameters.len() as u16), parameters)
    }

    fn compare_and_write(byte1: u8, lba: u64, blocks: u8) -> Vec<u8> {
        let mut c = cdb16(0x89, byte1, lba, 0);
        c[13] = blocks;
        c
    }

    fn zeros(blocks: usize) -> Vec<u8> {
        vec![0; blocks * BLOCK_BYTES]
    }

    #[test]
    fn io_checks_table() {
        let (unmap_past_end, unmap_past_end_list) = unmap_list(&[(2040, 9)]);
        let (unmap_too_many, unmap_too_many_list) =
            unmap_list(&[(0, 1); UNMAP_DESCRIPTORS_MAX as usize + 1]);
        let rows: Vec<Row> = vec![
            (
                "READ (10) of the last block",
                read10(2047, 1),
                vec![],
                good_data(zeros(1)),
            ),
            (
                "READ (10) past the end",
                read10(2047, 2),
                vec![],
                check_condition(sense::LBA_OUT_OF_RANGE),
            ),
            (
                "READ (10) starting past the end",
                read10(2048, 1),
                vec![],
                check_condition(sense::LBA_OUT_OF_RANGE),
            ),
            (
                "READ (10) of 0 blocks at the end",
                read10(2048, 0),
                vec![],
                good_empty(),
            ),
            (
                "READ (10) of 0 blocks past the end",
                read10(2049, 0),
                vec![],
                check_condition(sense::LBA_OUT_OF_RANGE),
            ),
            (
                "READ (12) past the end",
                cdb12(0xa8, 0, 2000, 49),
                vec![],
                check_condition(sense::LBA_OUT_OF_RANGE),
            ),
            (
                "READ (16) at LBA 2^64-1: no overflow",
                cdb16(0x88, 0, u64::MAX, 1),
                vec![],
                check_condition(sense::LBA_OUT_OF_RANGE),
            ),
            (
                "READ (6) transfer length 0 means 256 blocks",
                read6(0, 0),
                vec![],
                good_data(zeros(256)),
            ),
            (
                "READ (6) past the end",
                read6(2047, 2),
                vec![],
                check_condition(sense::LBA_OUT_OF_RANGE),
            ),
            (
                "READ (10) with RDPROTECT",
                cdb10(0x28, 0x20, 0, 1),
                vec![],
                bad_field_at(1),
            ),
            (
                "READ (16) with RDPROTECT",
                cdb16(0x88, 0x60, 0, 1),
                vec![],
                bad_field_at(1),
            ),
            (
                "WRITE (10) past the end",
                write10(2047, 2),
                pattern(1, 2),
                check_condition(sense::LBA_OUT_OF_RANGE),
            ),
            (
                "WRITE (16) past the end",
                cdb16(0x8a, 0, 2040, 9),
                pattern(1, 9),
                check_condition(sense::LBA_OUT_OF_RANGE),
            ),
            (
                "WRITE AND VERIFY (10) past the end",
                cdb10(0x2e, 0, 2048, 1),
                pattern(1, 1),
                check_condition(sense::LBA_OUT_OF_RANGE),
            ),
            (
                "WRITE (10) with WRPROTECT",
                cdb10(0x2a, 0x20, 0, 1),
                pattern(1, 1),
                bad_field_at(1),
            ),
            (
                "WRITE (10) with less data than the CDB says",
                write10(0, 2),
                pattern(1, 1),
                check_condition(sense::PARAMETER_LIST_LENGTH_ERROR),
            ),
            (
                "WRITE (10) of 0 blocks",
                write10(0, 0),
                vec![],
                good_empty(),
            ),
            (
                "VERIFY (10) without BYTCHK",
                verify10(0, 0, 8),
                vec![],
                good_empty(),
            ),
            (
                "VERIFY (10) with BYTCHK 2",
                verify10(2, 0, 1),
                pattern(1, 1),
                bad_field_at(1),
            ),
            (
                "VERIFY (10) past the end",
                verify10(0, 2047, 2),
                vec![],
                check_condition(sense::LBA_OUT_OF_RANGE),
            ),
            (
                "VERIFY (10) with less data than the CDB says",
                verify10(1, 0, 2),
                pattern(1, 1),
                check_condition(sense::PARAMETER_LIST_LENGTH_ERROR),
            ),
            (
                "VERIFY (16) with VRPROTECT",
                cdb16(0x8f, 0x20, 0, 1),
                vec![],
                bad_field_at(1),
            ),
            (
                "SYNCHRONIZE CACHE (10) of the whole device",
                cdb10(0x35, 0, 0, 0),
                vec![],
                good_empty(),
            ),
            (
                "SYNCHRONIZE CACHE (16) of a range",
                cdb16(0x91, 0, 100, 10),
                vec![],
                good_empty(),
            ),
            (
                "SYNCHRONIZE CACHE (10) past the end",
                cdb10(0x35, 0, 2040, 9),
                vec![],
                check_condition(sense::LBA_OUT_OF_RANGE),
            ),
            (
                "PRE-FETCH (10): already in cache",
                cdb10(0x34, 0, 0, 8),
                vec![],
                status(sense::CONDITION_MET),
            ),
            (
                "PRE-FETCH (16): already in cache",
                cdb16(0x90, 0, 2000, 48),
                vec![],
                status(sense::CONDITION_MET),
            ),
            (
                "PRE-FETCH (10) past the end",
                cdb10(0x34, 0, 2048, 1),
                vec![],
                check_condition(sense::LBA_OUT_OF_RANGE),
            ),
            (
                "WRITE SAME (10) with ANCHOR",
                cdb10(0x41, 0x10, 0, 1),
                pattern(1, 1),
                bad_field_at(1),
            ),
            (
                "WRITE SAME (16) with WRPROTECT",
                cdb16(0x93, 0x20, 0, 1),
                pattern(1, 1),
                bad_field_at(1),
            ),
            (
                "WRITE SAME (16) past the end",
                cdb16(0x93, 0, 2047, 2),
                pattern(1, 1),
                check_condition(sense::LBA_OUT_OF_RANGE),
            ),
            (
                "WRITE SAME (10) without data",
                cdb10(0x41, 0, 0, 1),
                vec![],
                check_condition(sense::PARAMETER_LIST_LENGTH_ERROR),
            ),
            (
                "WRITE SAME (16) with NDOB needs no data",
                cdb16(0x93, 0x01, 0, 4),
                vec![],
                good_empty(),
            ),
            (
                "UNMAP with ANCHOR",
                cdb10(0x42, 0x01, 0, 24),
                unmap_parameters(&[(0, 1)]),
                bad_field_at(1),
            ),
            (
                "UNMAP, parameter list length 0",
                unmap(0),
                vec![],
                good_empty(),
            ),
            (
                "UNMAP, parameter list length 4",
                unmap(4),
                vec![0; 4],
                check_condition(sense::PARAMETER_LIST_LENGTH_ERROR),
            ),
            (
                "UNMAP, less data than the header",
                unmap(24),
                vec![0; 4],
                check_condition(sense::PARAMETER_LIST_LENGTH_ERROR),
            ),
            (
                "UNMAP past the end",
                unmap_past_end,
                unmap_past_end_list,
                check_condition(sense::LBA_OUT_OF_RANGE),
            ),
            (
                "UNMAP with one descriptor too many",
                unmap_too_many,
                unmap_too_many_list,
                check_condition(sense::INVALID_FIELD_IN_PARAMETER_LIST),
            ),
            (
                "COMPARE AND WRITE of 0 blocks",
                compare_and_write(0, 0, 0),
                vec![],
                good_empty(),
            ),
            (
                "COMPARE AND WRITE past the end",
                compare_and_write(0, 2048, 1),
                pattern(1, 2),
                check_condition(sense::LBA_OUT_OF_RANGE),
            ),
            (
                "COMPARE AND WRITE with WRPROTECT",
                compare_and_write(0x20, 0, 1),
                pattern(1, 2),
                bad_field_at(1),
            ),
            (
                "COMPARE AND WRITE with one block of data for one block",
                compare_and_write(0, 0, 1),
                pattern(1, 1),
                check_condition(sense::PARAMETER_LIST_LENGTH_ERROR),
            ),
            (
                "ORWRITE with ORPROTECT",
                cdb16(0x8b, 0x20, 0, 1),
                pattern(1, 1),
                bad_field_at(1),
            ),
            (
                "ORWRITE past the end",
                cdb16(0x8b, 0, 2047, 2),
                pattern(1, 2),
                check_condition(sense::LBA_OUT_OF_RANGE),
            ),
            (
                "ORWRITE with less data than the CDB says",
                cdb16(0x8b, 0, 0, 2),
                pattern(1, 1),
                check_condition(sense::PARAMETER_LIST_LENGTH_ERROR),
            ),
            (
                "ORWRITE of 0 blocks",
                cdb16(0x8b, 0, 0, 0),
                vec![],
                good_empty(),
            ),
        ];
        each_fresh(&rows);
    }

    /// The transfer-length limits, on a device big enough that the range check passes. A command
    /// refused by them reads and writes nothing.
    #[test]
    fn transfer_limits() {
        let device = Memory::new(1 << 24, 512, UNIQUE_ID);
        let lun = Lun::new(device.clone());
        let read_max = TRANSFER_BLOCKS_MAX + 1;
        let write_max = WRITE_TRANSFER_BLOCKS_MAX + 1;
        let write_same_max = WRITE_SAME_BLOCKS_MAX as u32 + 1;
        let (unmap_big, unmap_big_list) = unmap_list(&[(0, UNMAP_BLOCKS_MAX + 1)]);
        let (unmap_max, unmap_max_list) = unmap_list(&[(0, UNMAP_BLOCKS_MAX)]);
        in_order(
            &lun,
            &[
                (
                    "READ (10) above MAXIMUM TRANSFER LENGTH",
                    read10(0, read_max as u16),
                    vec![],
                    bad_field_at(7),
                ),
                (
                    // The field pointer says byte 7 whatever the CDB size.
                    "READ (16) above MAXIMUM TRANSFER LENGTH",
                    cdb16(0x88, 0, 0, read_max),
                    vec![],
                    check_condition(sense::INVALID_FIELD_IN_CDB),
                ),
                (
                    "WRITE (16) above the write limit",
                    cdb16(0x8a, 0, 0, write_max),
                    vec![],
                    check_condition(sense::INVALID_FIELD_IN_CDB),
                ),
                (
                    "VERIFY (16) above the write limit",
                    cdb16(0x8f, 0x02, 0, write_max),
                    vec![],
                    check_condition(sense::INVALID_FIELD_IN_CDB),
                ),
                (
                    "ORWRITE above the write limit",
                    cdb16(0x8b, 0, 0, write_max),
                    vec![],
                    bad_field_at(10),
                ),
                (
                    "WRITE SAME (10) of 0 blocks: to the end, above the limit",
                    cdb10(0x41, 0, 0, 0),
                    pattern(1, 1),
                    bad_field_at(7),
                ),
                (
                    "WRITE SAME (16) above the limit",
                    cdb16(0x93, 0, 0, write_same_max),
                    pattern(1, 1),
                    bad_field_at(10),
                ),
                (
                    "UNMAP of more blocks than MAXIMUM UNMAP LBA COUNT",
                    unmap_big,
                    unmap_big_list,
                    check_condition(sense::INVALID_FIELD_IN_PARAMETER_LIST),
                ),
            ],
        );
        assert_eq!(device.writes(), 0);
        in_order(
            &lun,
            &[
                (
                    "READ (10) of MAXIMUM TRANSFER LENGTH",
                    read10(0, TRANSFER_BLOCKS_MAX as u16),
                    vec![],
                    good().len(TRANSFER_BLOCKS_MAX as usize * BLOCK_BYTES),
                ),
                (
                    "WRITE SAME (16) of the limit, unmapping",
                    cdb16(0x93, 0x08, 0, write_same_max - 1),
                    zeros(1),
                    good_empty(),
                ),
                (
                    "UNMAP of MAXIMUM UNMAP LBA COUNT",
                    unmap_max,
                    unmap_max_list,
                    good_empty(),
                ),
            ],
        );
    }

    /// Every WRITE form followed by every READ form gives back what was written, in place.
    #[test]
    fn write_then_read_round_trip() {
        let device = memory();
        let lun = Lun::new(device.clone());
        let writes: [(&str, CdbFor); 8] = [
            ("WRITE (6)", write6),
            ("WRITE (10)", |lba, n| write10(lba, n as u16)),
            ("WRITE (12)", |lba, n| cdb12(0xaa, 0, lba, n as u32)),
            ("WRITE (16)", |lba, n| cdb16(0x8a, 0, lba as u64, n as u32)),
            ("WRITE (16) with FUA", |lba, n| {
                cdb16(0x8a, 0x08, lba as u64, n as u32)
            }),
            ("WRITE AND VERIFY (10)", |lba, n| {
                cdb10(0x2e, 0, lba, n as u16)
            }),
            ("WRITE AND VERIFY (12)", |lba, n| {
                cdb12(0xae, 0, lba, n as u32)
            }),
            ("WRITE AND VERIFY (16)", |lba, n| {
                cdb16(0x8e, 0, lba as u64, n as u32)
            }),
        ];
        let reads: [(&str, CdbFor); 4] = [
            ("READ (6)", read6),
            ("READ (10)", |lba, n| read10(lba, n as u16)),
            ("READ (12)", |lba, n| cdb12(0xa8, 0, lba, n as u32)),
            ("READ (16)", |lba, n| cdb16(0x88, 0, lba as u64, n as u32)),
        ];
        for (i, (write_name, write)) in writes.iter().enumerate() {
            let lba = 10 * (i as u32 + 1);
            let seed = i as u8 + 1;
            let data = pattern(seed, 3);
            check(&lun, write_name, &write(lba, 3), &data, &good_empty());
            for (read_name, read) in &reads {
                let name = format!("{read_name} after {write_name}");
                check(&lun, &name, &read(lba, 3), &[], &good_data(data.clone()));
            }
            // One block either side is untouched.
            let around = [zeros(1), data.clone(), zeros(1)].concat();
            let name = format!("READ (10) around {write_name}");
            check(&lun, &name, &read10(lba - 1, 5), &[], &good_data(around));
        }
        assert_eq!(device.writes(), 8);
        assert_eq!(
            device.fua_writes(),
            4,
            "FUA and WRITE AND VERIFY force the medium"
        );
        // The last block is reachable by every form.
        check(
            &lun,
            "WRITE (10) of the last block",
            &write10(2047, 1),
            &pattern(9, 1),
            &good_empty(),
        );
        check(
            &lun,
            "READ (16) of the last block",
            &cdb16(0x88, 0, 2047, 1),
            &[],
            &good_data(pattern(9, 1)),
        );
    }

    #[test]
    fn verify_compares_with_the_medium() {
        let lun = Lun::new(memory());
        let data = pattern(5, 2);
        let mut wrong = data.clone();
        wrong[515] ^= 0x40;
        let same_block_twice = [pattern(7, 1), pattern(7, 1)].concat();
        in_order(
            &lun,
            &[
                (
                    "write 2 blocks at 100",
                    write10(100, 2),
                    data.clone(),
                    good_empty(),
                ),
                (
                    "write a block twice at 200",
                    write10(200, 2),
                    same_block_twice,
                    good_empty(),
                ),
                (
                    "VERIFY (10) BYTCHK 1, same",
                    verify10(1, 100, 2),
                    data.clone(),
                    good_empty(),
                ),
                (
                    "VERIFY (12) BYTCHK 1, same",
                    cdb12(0xaf, 0x02, 100, 2),
                    data.clone(),
                    good_empty(),
                ),
                (
                    "VERIFY (16) BYTCHK 1, same",
                    cdb16(0x8f, 0x02, 100, 2),
                    data.clone(),
                    good_empty(),
                ),
                (
                    "VERIFY (10) BYTCHK 1, differs at byte 515",
                    verify10(1, 100, 2),
                    wrong,
                    check_condition(Sense {
                        information: Some(515),
                        ..sense::MISCOMPARE_DURING_VERIFY
                    }),
                ),
                (
                    "VERIFY (10) BYTCHK 3: one block against each",
                    verify10(3, 200, 2),
                    pattern(7, 1),
                    good_empty(),
                ),
                (
                    "VERIFY (10) BYTCHK 3: second block differs from the first",
                    verify10(3, 100, 2),
                    pattern(5, 1),
                    check_condition(Sense {
                        information: Some(512),
                        ..sense::MISCOMPARE_DURING_VERIFY
                    }),
                ),
            ],
        );
    }

    /// WRITE SAME repeats one block (or deallocates with UNMAP, whatever the pattern); UNMAP
    /// deallocates its ranges,
    /// all or nothing when a range is out of bounds. Deallocated blocks read as zeros.
    #[test]
    fn write_same_and_unmap() {
        let device = memory();
        let lun = Lun::new(device.clone());
        let block = pattern(3, 1);
        let four = [block.clone(), block.clone(), block.clone(), block.clone()].concat();
        let data = pattern(6, 8);
        let (unmap_some, unmap_some_list) = unmap_list(&[(300, 2), (303, 1), (306, 0)]);
        let after_unmap = [
            zeros(2),
            data[1024..1536].to_vec(),
            zeros(1),
            data[2048..].to_vec(),
        ]
        .concat();
        let (unmap_bad, unmap_bad_list) = unmap_list(&[(304, 1), (2047, 2)]);
        in_order(
            &lun,
            &[
                (
                    "WRITE SAME (10) of 4 blocks",
                    cdb10(0x41, 0, 200, 4),
                    block.clone(),
                    good_empty(),
                ),
                ("read them", read10(200, 4), vec![], good_data(four.clone())),
                (
                    "WRITE SAME (16) with UNMAP over the middle two",
                    cdb16(0x93, 0x08, 201, 2),
                    zeros(1),
                    good_empty(),
                ),
                (
                    "read them after UNMAP",
                    read10(200, 4),
                    vec![],
                    good_data([block.clone(), zeros(2), block.clone()].concat()),
                ),
                (
                    "WRITE SAME (16) with UNMAP and a non-zero pattern deallocates too",
                    cdb16(0x93, 0x08, 210, 2),
                    block.clone(),
                    good_empty(),
                ),
                (
                    "which reads as zeros",
                    read10(210, 2),
                    vec![],
                    good_data(zeros(2)),
                ),
                (
                    "WRITE SAME (16) with NDOB: zeros",
                    cdb16(0x93, 0x01, 203, 1),
                    vec![],
                    good_empty(),
                ),
                (
                    "read after NDOB",
                    read10(200, 4),
                    vec![],
                    good_data([block.clone(), zeros(3)].concat()),
                ),
                (
                    "WRITE SAME (10) of 0 blocks: to the end",
                    cdb10(0x41, 0, 2044, 0),
                    block.clone(),
                    good_empty(),
                ),
                ("read the end", read10(2044, 4), vec![], good_data(four)),
                (
                    "write 8 blocks at 300",
                    write10(300, 8),
                    data.clone(),
                    good_empty(),
                ),
                (
                    "UNMAP three ranges",
                    unmap_some,
                    unmap_some_list,
                    good_empty(),
                ),
                (
                    "read after UNMAP",
                    read10(300, 8),
                    vec![],
                    good_data(after_unmap.clone()),
                ),
                (
                    "UNMAP with a range past the end",
                    unmap_bad,
                    unmap_bad_list,
                    check_condition(sense::LBA_OUT_OF_RANGE),
                ),
                (
                    "nothing unmapped",
                    read10(300, 8),
                    vec![],
                    good_data(after_unmap),
                ),
            ],
        );
        assert!(!device.mapped(201) && !device.mapped(301) && device.mapped(304));
    }

    /// COMPARE AND WRITE writes only when the compare data matches, and otherwise reports the
    /// offset of the first byte that differs; ORWRITE ORs into what the blocks hold.
    #[test]
    fn compare_and_write_and_or_write() {
        let device = memory();
        let lun = Lun::new(device.clone());
        let old = pattern(8, 2);
        let new = pattern(9, 2);
        let mut stale = new.clone();
        stale[700] ^= 1;
        in_order(
            &lun,
            &[
                (
                    "write 2 blocks at 500",
                    write10(500, 2),
                    old.clone(),
                    good_empty(),
                ),
                (
                    "COMPARE AND WRITE, compare matches",
                    compare_and_write(0, 500, 2),
                    [old.clone(), new.clone()].concat(),
                    good_empty(),
                ),
                (
                    "read after the write",
                    read10(500, 2),
                    vec![],
                    good_data(new.clone()),
                ),
                (
                    "COMPARE AND WRITE, differs at byte 700",
                    compare_and_write(0, 500, 2),
                    [stale, old.clone()].concat(),
                    check_condition(Sense {
                        information: Some(700),
                        ..sense::MISCOMPARE_DURING_VERIFY
                    }),
                ),
                ("nothing written", read10(500, 2), vec![], good_data(new)),
                (
                    "write 0x0f at 600",
                    write10(600, 1),
                    vec![0x0f; 512],
                    good_empty(),
                ),
                (
                    "ORWRITE 0xf0",
                    cdb16(0x8b, 0, 600, 1),
                    vec![0xf0; 512],
                    good_empty(),
                ),
                (
                    "read 0xff",
                    read10(600, 1),
                    vec![],
                    good_data(vec![0xff; 512]),
                ),
                (
                    "ORWRITE into a block never written",
                    cdb16(0x8b, 0, 601, 1),
                    vec![0x33; 512],
                    good_empty(),
                ),
                (
                    "read 0x33",
                    read10(601, 1),
                    vec![],
                    good_data(vec![0x33; 512]),
                ),
            ],
        );
        assert_eq!(device.writes(), 5);
    }

    #[test]
    fn synchronize_cache_flushes() {
        let device = memory();
        let lun = Lun::new(device.clone());
        check(
            &lun,
            "SYNCHRONIZE CACHE (10)",
            &cdb10(0x35, 0, 0, 0),
            &[],
            &good_empty(),
        );
        check(
            &lun,
            "SYNCHRONIZE CACHE (16)",
            &cdb16(0x91, 0x02, 0, 2048),
            &[],
            &good_empty(),
        );
        assert_eq!(device.flushes(), 2);
        check(
            &lun,
            "SYNCHRONIZE CACHE (16) past the end",
            &cdb16(0x91, 0, 0, 2049),
            &[],
            &check_condition(sense::LBA_OUT_OF_RANGE),
        );
        assert_eq!(
            device.flushes(),
            2,
            "a refused SYNCHRONIZE CACHE does not flush"
        );
    }

    /// Device errors become sense data: medium errors with the LBA in INFORMATION, a fenced or
    /// unavailable device NOT READY (retry elsewhere), an I/O error a medium error without LBA.
    #[test]
    fn device_errors_become_sense() {
        let device = memory();
        let lun = Lun::new(device.clone());
        let at_lba_7 = |s: Sense| Sense {
            information: Some(7),
            ..s
        };
        let cases: [(Fault, [Sense; 4]); 4] = [
            (
                Fault::Medium { lba: 7 },
                [
                    at_lba_7(sense::UNRECOVERED_READ_ERROR),
                    at_lba_7(sense::WRITE_ERROR),
                    at_lba_7(sense::WRITE_ERROR),
                    at_lba_7(sense::WRITE_ERROR),
                ],
            ),
            (Fault::Fenced, [sense::FENCED; 4]),
            (Fault::Unavailable, [sense::FENCED; 4]),
            (
                Fault::Io,
                [
                    sense::UNRECOVERED_READ_ERROR,
                    sense::WRITE_ERROR,
                    sense::WRITE_ERROR,
                    sense::WRITE_ERROR,
                ],
            ),
        ];
        let (unmap_one, unmap_one_list) = unmap_list(&[(0, 8)]);
        for (fault, [on_read, on_write, on_unmap, on_flush]) in cases {
            device.set_fault(Some(fault));
            let name = |what: &str| format!("{what} with {fault:?}");
            check(
                &lun,
                &name("READ (10)"),
                &read10(0, 8),
                &[],
                &check_condition(on_read),
            );
            check(
                &lun,
                &name("WRITE (10)"),
                &write10(0, 8),
                &pattern(1, 8),
                &check_condition(on_write),
            );
            check(
                &lun,
                &name("UNMAP"),
                &unmap_one,
                &unmap_one_list,
                &check_condition(on_unmap),
            );
            check(
                &lun,
                &name("SYNCHRONIZE CACHE"),
                &cdb10(0x35, 0, 0, 0),
                &[],
                &check_condition(on_flush),
            );
        }
        device.set_fault(None);
        check(
            &lun,
            "READ (10) once healed",
            &read10(0, 8),
            &[],
            &good_data(zeros(8)),
        );
    }

    /// The READ paths the iSCSI shell drives itself: the transfer length of a READ CDB,
    /// streaming reads of any length, and the fast path into a reused buffer.
    #[test]
    fn streaming_and_fast_reads() {
        let table: [(&str, Vec<u8>, Option<u64>); 7] = [
            ("READ (6) length 0", read6(0, 0), Some(256)),
            ("READ (10)", read10(0, 8), Some(8)),
            ("READ (12)", cdb12(0xa8, 0, 0, 9), Some(9)),
            ("READ (16)", cdb16(0x88, 0, 0, 70_000), Some(70_000)),
            ("WRITE (10)", write10(0, 8), None),
            ("no CDB", vec![], None),
            ("READ (10) cut short", vec![0x28, 0, 0], None),
        ];
        for (name, cdb, blocks) in table {
            assert_eq!(Lun::read_transfer_blocks(&cdb), blocks, "{name}");
        }

        let device = Memory::new(1 << 24, 512, UNIQUE_ID);
        let lun = Lun::new(device.clone());
        let me = nexus(NEXUS);
        let extent = lun.start_read(&me, 0, &cdb16(0x88, 0, 5, 100_000)).unwrap();
        assert_eq!(
            extent,
            ReadExtent {
                lba: 5,
                blocks: 100_000,
                block_size_bytes: 512
            }
        );
        assert_eq!(extent.bytes(), 100_000 * 512);
        let refused: [(&str, u64, Vec<u8>, Expect); 4] = [
            (
                "start_read past the end",
                0,
                cdb16(0x88, 0, (1 << 24) - 1, 2),
                check_condition(sense::LBA_OUT_OF_RANGE),
            ),
            (
                "start_read of a WRITE",
                0,
                write10(0, 1),
                check_condition(sense::INVALID_OPCODE),
            ),
            (
                "start_read with RDPROTECT",
                0,
                cdb10(0x28, 0x20, 0, 1),
                bad_field_at(1),
            ),
            (
                "start_read on LUN 1",
                1,
                read10(0, 1),
                check_condition(sense::LUN_NOT_SUPPORTED),
            ),
        ];
        for (name, lun_id, cdb, expect) in &refused {
            let result = lun.start_read(&me, *lun_id, cdb).unwrap_err();
            expect.assert(name, cdb, &result);
        }

        let data = pattern(4, 2);
        check(
            &lun,
            "write 2 blocks at 10",
            &write10(10, 2),
            &data,
            &good_empty(),
        );
        let mut piece = vec![0u8; 1024];
        lun.read_blocks(10, &mut piece).unwrap();
        assert_eq!(piece, data, "read_blocks");
        lun.read_blocks(10, &mut []).unwrap();

        let mut buffer = vec![0xee; 4096];
        let result = lun.try_fast_read(&me, 0, &read10(10, 2), &mut buffer);
        assert_eq!(result, Some(ScsiResult::good(Vec::new())), "fast READ (10)");
        assert_eq!(
            buffer, data,
            "fast READ (10) fills the buffer and only that"
        );
        for (name, lun_id, cdb) in [
            ("READ (6)", 0, read6(10, 2)),
            ("LUN 1", 1, read10(10, 2)),
            ("past the end", 0, cdb16(0x88, 0, (1 << 24) - 1, 2)),
            (
                "above MAXIMUM TRANSFER LENGTH",
                0,
                cdb16(0x88, 0, 0, TRANSFER_BLOCKS_MAX + 1),
            ),
        ] {
            assert_eq!(
                lun.try_fast_read(&me, lun_id, &cdb, &mut buffer),
                None,
                "fast path for {name}"
            );
        }
        lun.reset(&[NEXUS]);
        assert_eq!(
            lun.try_fast_read(&me, 0, &read10(10, 2), &mut buffer),
            None,
            "fast path with a unit attention"
        );
        check(
            &lun,
            "the unit attention",
            &read10(10, 2),
            &[],
            &check_condition(sense::BUS_DEVICE_RESET),
        );

        device.set_fault(Some(Fault::Medium { lba: 11 }));
        let result = lun
            .try_fast_read(&me, 0, &read10(10, 2), &mut buffer)
            .unwrap();
        check_condition(Sense {
            information: Some(11),
            ..sense::UNRECOVERED_READ_ERROR
        })
        .assert("fast READ (10) of a bad block", &read10(10, 2), &result);
        assert!(
            buffer.is_empty(),
            "a failed fast read leaves no data behind"
        );
        let result = lun.read_blocks(10, &mut piece).unwrap_err();
        check_condition(Sense {
            information: Some(11),
            ..sense::UNRECOVERED_READ_ERROR
        })
        .assert("read_blocks of a bad block", &read10(10, 2), &result);
    }
}
