//! Capacity and medium information (SBC-3): READ CAPACITY (10) and (16), GET LBA STATUS (both
//! 16-byte forms are service actions of SERVICE ACTION IN (16), opcode 0x9e), and READ DEFECT
//! DATA (10/12), which reports an empty defect list (a virtual disk has no defects).
//!
//! READ CAPACITY (16) advertises thin provisioning (LBPME) with unmapped blocks reading as zeros
//! (LBPRZ), which GET LBA STATUS and VPD page 0xB2 (inquiry.rs) agree with.

use super::{bad_field, be_u, device_failure, sense, CmdResult, Lun};

impl Lun {
    /// READ CAPACITY (10): last LBA (0xffffffff when it does not fit, telling the initiator to
    /// use READ CAPACITY (16)) and block length. RELADR, PMI and a non-zero LBA are refused.
    pub(super) fn read_capacity10(&self, cdb: &[u8]) -> CmdResult {
        if cdb[1] & 0x01 != 0 || cdb[8] & 0x01 != 0 || be_u(cdb, 2, 4) != 0 {
            return Err(bad_field(2));
        }
        let block = self.device.block_size_bytes();
        let last = self.device.block_count().saturating_sub(1);
        let mut d = vec![0u8; 8];
        d[0..4].copy_from_slice(&(last.min(0xffff_ffff) as u32).to_be_bytes());
        d[4..8].copy_from_slice(&block.to_be_bytes());
        Ok(d)
    }

    pub(super) fn read_capacity16(&self, cdb: &[u8]) -> CmdResult {
        let alloc = be_u(cdb, 10, 4) as usize;
        let mut d = vec![0u8; 32];
        d[0..8].copy_from_slice(&self.device.block_count().saturating_sub(1).to_be_bytes());
        d[8..12].copy_from_slice(&self.device.block_size_bytes().to_be_bytes());
        // Physical block exponent 0: every logical block can be mapped and unmapped alone.
        d[14] = 0x80 | 0x40; // LBPME, LBPRZ
        d.truncate(alloc);
        Ok(d)
    }

    pub(super) fn get_lba_status(&self, cdb: &[u8]) -> CmdResult {
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

    /// READ DEFECT DATA (10): a virtual disk has no defect list.
    pub(super) fn read_defect_data10(&self, cdb: &[u8]) -> CmdResult {
        let mut d = vec![0u8, cdb[2] & 0x1f, 0, 0];
        d.truncate(be_u(cdb, 7, 2) as usize);
        Ok(d)
    }

    /// READ DEFECT DATA (12): as the 10-byte form, with the 12-byte header.
    pub(super) fn read_defect_data12(&self, cdb: &[u8]) -> CmdResult {
        let mut d = vec![0u8, cdb[1] & 0x1f, 0, 0, 0, 0, 0, 0];
        d.truncate(be_u(cdb, 6, 4) as usize);
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::super::sense;
    use super::super::testing::*;
    use super::super::Lun;

    fn read_capacity10(byte1: u8, lba: u32, pmi: bool) -> Vec<u8> {
        let mut c = cdb10(0x25, byte1, lba, 0);
        c[8] = pmi as u8;
        c
    }

    /// SERVICE ACTION IN (16): READ CAPACITY (16) is 0x10, GET LBA STATUS 0x12.
    fn service_action_in(action: u8, lba: u64, allocation_bytes: u32) -> Vec<u8> {
        cdb16(0x9e, action, lba, allocation_bytes)
    }

    /// One GET LBA STATUS descriptor: LBA, blocks, provisioning status (0 mapped, 1 deallocated).
    fn lba_status(lba: u64, blocks: u32, status: u8) -> Vec<u8> {
        let mut d = lba.to_be_bytes().to_vec();
        d.extend_from_slice(&blocks.to_be_bytes());
        d.extend_from_slice(&[status, 0, 0, 0]);
        d
    }

    fn lba_status_data(descriptors: &[Vec<u8>]) -> Vec<u8> {
        let mut d = ((4 + 16 * descriptors.len()) as u32).to_be_bytes().to_vec();
        d.extend_from_slice(&[0; 4]);
        for descriptor in descriptors {
            d.extend_from_slice(descriptor);
        }
        d
    }

    #[test]
    fn capacity_table() {
        let mut capacity16 = vec![
            0, 0, 0, 0, 0, 0, 0x07, 0xff, 0, 0, 0x02, 0x00, 0, 0, 0xc0, 0,
        ];
        capacity16.resize(32, 0);
        let rows: Vec<Row> = vec![
            (
                "READ CAPACITY (10): last LBA 2047, 512-byte blocks",
                read_capacity10(0, 0, false),
                vec![],
                good_data([0x00, 0x00, 0x07, 0xff, 0x00, 0x00, 0x02, 0x00]),
            ),
            (
                "READ CAPACITY (10) with an LBA",
                read_capacity10(0, 1, false),
                vec![],
                bad_field_at(2),
            ),
            (
                // The field pointer says byte 2 for every refused field.
                "READ CAPACITY (10) with PMI",
                read_capacity10(0, 0, true),
                vec![],
                check_condition(sense::INVALID_FIELD_IN_CDB),
            ),
            (
                "READ CAPACITY (10) with RELADR",
                read_capacity10(0x01, 0, false),
                vec![],
                check_condition(sense::INVALID_FIELD_IN_CDB),
            ),
            (
                "READ CAPACITY (16): last LBA, block length, LBPME and LBPRZ",
                service_action_in(0x10, 0, 32),
                vec![],
                good_data(capacity16.clone()),
            ),
            (
                "READ CAPACITY (16) truncated to the allocation length",
                service_action_in(0x10, 0, 12),
                vec![],
                good_data(capacity16[..12].to_vec()),
            ),
            (
                "READ CAPACITY (16) allocation length 0",
                service_action_in(0x10, 0, 0),
                vec![],
                good_empty(),
            ),
            (
                "SERVICE ACTION IN (16) with an unknown service action",
                service_action_in(0x11, 0, 32),
                vec![],
                bad_field_at(1),
            ),
            (
                "GET LBA STATUS of a device never written: one deallocated extent",
                service_action_in(0x12, 0, 64),
                vec![],
                good_data(lba_status_data(&[lba_status(0, 2048, 1)])),
            ),
            (
                "GET LBA STATUS of the last LBA",
                service_action_in(0x12, 2047, 64),
                vec![],
                good_data(lba_status_data(&[lba_status(2047, 1, 1)])),
            ),
            (
                "GET LBA STATUS truncated to the header",
                service_action_in(0x12, 0, 8),
                vec![],
                good_data([0, 0, 0, 20, 0, 0, 0, 0]),
            ),
            (
                "GET LBA STATUS past the last LBA",
                service_action_in(0x12, 2048, 64),
                vec![],
                check_condition(sense::LBA_OUT_OF_RANGE),
            ),
            (
                "READ DEFECT DATA (10): empty list, format echoed",
                cdb10(0x37, 0, 0x1d00_0000, 255),
                vec![],
                good_data([0x00, 0x1d, 0x00, 0x00]),
            ),
            (
                "READ DEFECT DATA (10) truncated",
                cdb10(0x37, 0, 0x1d00_0000, 2),
                vec![],
                good_data([0x00, 0x1d]),
            ),
            (
                "READ DEFECT DATA (12): empty list",
                cdb12(0xb7, 0x1d, 0, 255),
                vec![],
                good_data([0x00, 0x1d, 0, 0, 0, 0, 0, 0]),
            ),
        ];
        each_fresh(&rows);
    }

    /// READ CAPACITY on devices other than the default: one too big for READ CAPACITY (10), and
    /// one with 4 KiB blocks.
    #[test]
    fn capacity_of_other_devices() {
        let huge = Lun::new(Memory::new(1 << 33, 512, UNIQUE_ID));
        check(
            &huge,
            "READ CAPACITY (10) of 2^33 blocks: use the 16-byte form",
            &read_capacity10(0, 0, false),
            &[],
            &good_data([0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x02, 0x00]),
        );
        check(
            &huge,
            "READ CAPACITY (16) of 2^33 blocks",
            &service_action_in(0x10, 0, 32),
            &[],
            &good()
                .len(32)
                .at(0, &[0, 0, 0, 0x01, 0xff, 0xff, 0xff, 0xff, 0, 0, 2, 0]),
        );
        let four_k = Lun::new(Memory::new(256, 4096, UNIQUE_ID));
        check(
            &four_k,
            "READ CAPACITY (10) of 256 blocks of 4 KiB",
            &read_capacity10(0, 0, false),
            &[],
            &good_data([0x00, 0x00, 0x00, 0xff, 0x00, 0x00, 0x10, 0x00]),
        );
    }

    /// GET LBA STATUS follows writes and unmaps: one descriptor per run of blocks with the same
    /// status, starting at the LBA asked for.
    #[test]
    fn lba_status_follows_writes_and_unmaps() {
        let lun = Lun::new(memory());
        in_order(
            &lun,
            &[
                (
                    "write 3 blocks at LBA 10",
                    cdb10(0x2a, 0, 10, 3),
                    pattern(1, 3),
                    good_empty(),
                ),
                (
                    "status from LBA 0",
                    service_action_in(0x12, 0, 255),
                    vec![],
                    good_data(lba_status_data(&[
                        lba_status(0, 10, 1),
                        lba_status(10, 3, 0),
                        lba_status(13, 2035, 1),
                    ])),
                ),
                (
                    "status from LBA 11",
                    service_action_in(0x12, 11, 255),
                    vec![],
                    good_data(lba_status_data(&[
                        lba_status(11, 2, 0),
                        lba_status(13, 2035, 1),
                    ])),
                ),
                (
                    "unmap LBA 11",
                    cdb10(0x42, 0, 0, 24),
                    unmap_parameters(&[(11, 1)]),
                    good_empty(),
                ),
                (
                    "status from LBA 10, room for two descriptors",
                    service_action_in(0x12, 10, 8 + 2 * 16),
                    vec![],
                    good_data(lba_status_data(&[
                        lba_status(10, 1, 0),
                        lba_status(11, 1, 1),
                    ])),
                ),
            ],
        );
    }
}
