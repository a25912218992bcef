//! INQUIRY (SPC-4): the standard inquiry data and the vital product data pages this LUN offers:
//! 0x00 Supported VPD Pages, 0x80 Unit Serial Number and 0x83 Device Identification (SPC-4), and
//! SBC-3's 0xB0 Block Limits, 0xB1 Block Device Characteristics and 0xB2 Logical Block
//! Provisioning.
//!
//! The device identifier (page 0x83) and the serial number (page 0x80) come from the device's
//! unique id alone, so every node serving one volume reports the same disk (multipath).

use super::{
    bad_field, be_u, hex, sense, CmdResult, Lun, COMPARE_AND_WRITE_BLOCKS_MAX,
    OPTIMAL_TRANSFER_BLOCKS, TRANSFER_BLOCKS_MAX, UNMAP_BLOCKS_MAX, UNMAP_DESCRIPTORS_MAX,
    UNMAP_GRANULARITY_BLOCKS, WRITE_SAME_BLOCKS_MAX,
};

impl Lun {
    pub(super) fn inquiry(&self, cdb: &[u8], no_lun: bool) -> CmdResult {
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
            d[5] = self.tpgs(); // no 3PC, TPGS 01b with ALUA paths, PROTECT 0
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
                // With ALUA paths: this path's relative target port and port group.
                body.extend(self.port_designators());
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
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::{sense, Lun};

    fn inquiry(evpd: bool, page: u8, allocation_bytes: u16) -> Vec<u8> {
        let a = allocation_bytes.to_be_bytes();
        vec![0x12, evpd as u8, page, a[0], a[1], 0]
    }

    /// Page 0x83 of [`UNIQUE_ID`]: an NAA type 6 designator (the id with its top nibble
    /// replaced by 6) and a T10 vendor id designator ("CAIRN   " and the id in hex).
    fn device_identification() -> Vec<u8> {
        let mut page = vec![
            0x00, 0x83, 0x00, 0x40, // header: 64 bytes follow
            0x01, 0x03, 0x00, 0x10, // binary, NAA, 16 bytes
            0x61, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54,
            0x32, 0x10, //
            0x02, 0x01, 0x00, 40, // ASCII, T10 vendor id, 40 bytes
        ];
        page.extend_from_slice(b"CAIRN   0123456789abcdeffedcba9876543210");
        page
    }

    #[test]
    fn inquiry_table() {
        let mut serial = vec![0x00, 0x80, 0x00, 16];
        serial.extend_from_slice(b"0123456789abcdef");
        let block_limits = [
            0x00, 0xb0, 0x00, 0x3c, // header
            0x00, 0xff, // WSNZ 0, MAXIMUM COMPARE AND WRITE LENGTH 255
            0x00, 0x08, // OPTIMAL TRANSFER LENGTH GRANULARITY: 8 blocks
            0x00, 0x00, 0x20, 0x00, // MAXIMUM TRANSFER LENGTH: 8192
            0x00, 0x00, 0x01, 0x00, // OPTIMAL TRANSFER LENGTH: 256
            0x00, 0x00, 0x00, 0x00, // MAXIMUM PREFETCH LENGTH
            0x00, 0x10, 0x00, 0x00, // MAXIMUM UNMAP LBA COUNT: 1 Mi
            0x00, 0x00, 0x01, 0x00, // MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT: 256
            0x00, 0x00, 0x00, 0x08, // OPTIMAL UNMAP GRANULARITY: 8
            0x80, 0x00, 0x00, 0x00, // UGAVALID, alignment 0
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x20, 0x00, // MAXIMUM WRITE SAME LENGTH: 8192
        ];
        let rows: Vec<Row> = vec![
            (
                "standard data",
                inquiry(false, 0, 96),
                vec![],
                good()
                    .len(96)
                    // direct access, not removable, SPC-4, format 2, 91 more bytes, CMDQUE
                    .at(0, &[0x00, 0x00, 0x06, 0x02, 91, 0x00, 0x00, 0x02])
                    .at(8, b"CAIRN   VOLUME          0001")
                    // version descriptors: SAM-5, iSCSI, SPC-4, SBC-3
                    .at(58, &[0x00, 0xa0, 0x09, 0x60, 0x04, 0x60, 0x04, 0xc0]),
            ),
            (
                "standard data, allocation length above it",
                inquiry(false, 0, 1024),
                vec![],
                good().len(96),
            ),
            (
                "standard data truncated to the allocation length",
                inquiry(false, 0, 36),
                vec![],
                good().len(36).at(8, b"CAIRN   VOLUME          0001"),
            ),
            (
                "allocation length 0",
                inquiry(false, 0, 0),
                vec![],
                good_empty(),
            ),
            (
                "CMDDT (obsolete) set",
                vec![0x12, 0x02, 0, 0, 96, 0],
                vec![],
                bad_field_at(1),
            ),
            (
                "page code without EVPD",
                inquiry(false, 0x80, 96),
                vec![],
                bad_field_at(2),
            ),
            (
                "VPD 0x00 supported pages",
                inquiry(true, 0x00, 255),
                vec![],
                good_data([0x00, 0x00, 0x00, 6, 0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]),
            ),
            (
                "VPD 0x80 unit serial number",
                inquiry(true, 0x80, 255),
                vec![],
                good_data(serial),
            ),
            (
                "VPD 0x83 device identification",
                inquiry(true, 0x83, 255),
                vec![],
                good_data(device_identification()),
            ),
            (
                "VPD 0x83 truncated",
                inquiry(true, 0x83, 8),
                vec![],
                good_data(device_identification()[..8].to_vec()),
            ),
            (
                "VPD 0xB0 block limits",
                inquiry(true, 0xb0, 255),
                vec![],
                good().len(64).at(0, &block_limits),
            ),
            (
                "VPD 0xB1 block device characteristics: non-rotating",
                inquiry(true, 0xb1, 255),
                vec![],
                good().len(64).at(0, &[0x00, 0xb1, 0x00, 0x3c, 0x00, 0x01]),
            ),
            (
                "VPD 0xB2 logical block provisioning: LBPU, LBPWS, LBPWS10, LBPRZ, thin",
                inquiry(true, 0xb2, 255),
                vec![],
                good_data([0x00, 0xb2, 0x00, 0x04, 0x00, 0xe4, 0x02, 0x00]),
            ),
            (
                "VPD 0x81 not offered",
                inquiry(true, 0x81, 255),
                vec![],
                bad_field_at(2),
            ),
            (
                "VPD 0xB3 not offered",
                inquiry(true, 0xb3, 255),
                vec![],
                bad_field_at(2),
            ),
        ];
        each_fresh(&rows);
    }

    /// Page 0x83 and the serial number depend on the device's unique id only: the same on every
    /// node serving the volume whatever its size, every time asked, and different for another id.
    #[test]
    fn device_identifier_is_stable() {
        let ask = |lun: &Lun, page: u8| {
            check(lun, "VPD", &inquiry(true, page, 255), &[], &good()).data_in
        };
        let here = Lun::new(memory());
        let there = Lun::new(Memory::new(BLOCKS * 4, 512, UNIQUE_ID));
        for page in [0x80, 0x83] {
            assert_eq!(ask(&here, page), ask(&here, page), "page {page:#x} twice");
            assert_eq!(
                ask(&here, page),
                ask(&there, page),
                "page {page:#x} on two nodes"
            );
        }
        assert_eq!(ask(&here, 0x83), device_identification());

        let mut other_id = UNIQUE_ID;
        other_id[15] ^= 1;
        let other = Lun::new(Memory::new(BLOCKS, 512, other_id));
        assert_ne!(ask(&other, 0x83), ask(&here, 0x83));

        // The NAA field is 6 whatever the id's first nibble.
        let high = Lun::new(Memory::new(BLOCKS, 512, [0xff; 16]));
        assert_eq!(ask(&high, 0x83)[8], 0x6f);
    }

    /// INQUIRY to a LUN that does not exist: standard data says "no device here" (peripheral
    /// qualifier 3), VPD pages are refused.
    #[test]
    fn inquiry_of_a_missing_lun() {
        let lun = Lun::new(memory());
        check_as(
            &lun,
            NEXUS,
            1,
            "standard data",
            &inquiry(false, 0, 96),
            &[],
            &good().len(96).at(0, &[0x7f]),
        );
        check_as(
            &lun,
            NEXUS,
            1,
            "VPD page",
            &inquiry(true, 0x83, 255),
            &[],
            &check_condition(sense::LUN_NOT_SUPPORTED),
        );
    }
}
