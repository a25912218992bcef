//! Reports about the target's logical units and command set (SPC-4): REPORT LUNS (one LUN,
//! LUN 0) and REPORT SUPPORTED OPERATION CODES (MAINTENANCE IN service action 0x0c), whose
//! table of opcodes must match what the dispatcher in mod.rs implements (a test checks it).

use super::{bad_field, be_u, CmdResult, Lun};

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

impl Lun {
    pub(super) fn report_luns(&self, cdb: &[u8]) -> CmdResult {
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

    /// The commands this LUN supports: the table, and REPORT TARGET PORT GROUPS on a device
    /// with ALUA paths.
    fn supported_opcodes(&self) -> Vec<(u8, Option<u16>, usize)> {
        let mut list = SUPPORTED_OPCODES.to_vec();
        if self.device.port_groups().is_some() {
            let at = list
                .iter()
                .position(|entry| *entry == (0xa3, Some(0x0c), 12))
                .unwrap_or(list.len());
            list.insert(at, (0xa3, Some(0x0a), 12));
        }
        list
    }

    pub(super) fn report_supported_opcodes(&self, cdb: &[u8]) -> CmdResult {
        let rctd = cdb[2] & 0x80 != 0;
        let options = cdb[2] & 0x07;
        let req_opcode = cdb[3];
        let req_sa = be_u(cdb, 4, 2) as u16;
        let alloc = be_u(cdb, 6, 4) as usize;
        let supported = self.supported_opcodes();
        let timeouts = |d: &mut Vec<u8>| {
            if rctd {
                d.extend_from_slice(&[0x00, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            }
        };
        let mut d = Vec::new();
        match options {
            0 => {
                d.extend_from_slice(&[0u8; 4]);
                for (op, sa, len) in &supported {
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
                let has_sa = |op: u8| supported.iter().any(|(o, sa, _)| *o == op && sa.is_some());
                let found = supported.iter().find(|(o, sa, _)| {
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
                    && supported.iter().any(|(o, _, _)| *o == req_opcode)
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

#[cfg(test)]
mod tests {
    use super::super::sense;
    use super::super::testing::*;
    use super::super::Lun;
    use super::SUPPORTED_OPCODES;

    fn report_luns(select: u8, allocation_bytes: u32) -> Vec<u8> {
        let mut c = cdb12(0xa0, 0, 0, allocation_bytes);
        c[2] = select;
        c
    }

    /// REPORT SUPPORTED OPERATION CODES: MAINTENANCE IN, service action 0x0c.
    fn report_opcodes(
        rctd: bool,
        options: u8,
        opcode: u8,
        action: u16,
        allocation_bytes: u32,
    ) -> Vec<u8> {
        let mut c = cdb12(0xa3, 0x0c, 0, allocation_bytes);
        c[2] = (rctd as u8) << 7 | options;
        c[3] = opcode;
        c[4..6].copy_from_slice(&action.to_be_bytes());
        c
    }

    /// The CDB usage data of a command without service action: every bit of every byte used,
    /// CONTROL's NACA and link bits.
    fn usage(opcode: u8, len: usize) -> Vec<u8> {
        let mut u = vec![0xff; len];
        u[0] = opcode;
        u[len - 1] = 0x07;
        u
    }

    #[test]
    fn report_luns_table() {
        let one_lun = [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let rows: Vec<Row> = vec![
            (
                "REPORT LUNS: LUN 0",
                report_luns(0, 16),
                vec![],
                good_data(one_lun),
            ),
            (
                "REPORT LUNS, allocation length above the list",
                report_luns(0, 1024),
                vec![],
                good_data(one_lun),
            ),
            (
                "REPORT LUNS, allocation length below 16",
                report_luns(0, 15),
                vec![],
                bad_field_at(6),
            ),
            (
                "SELECT REPORT 1",
                report_luns(1, 16),
                vec![],
                good_data(one_lun),
            ),
            (
                "SELECT REPORT 2",
                report_luns(2, 16),
                vec![],
                good_data(one_lun),
            ),
            (
                "SELECT REPORT 0x10",
                report_luns(0x10, 16),
                vec![],
                good_data(one_lun),
            ),
            (
                "SELECT REPORT 0x12",
                report_luns(0x12, 16),
                vec![],
                good_data(one_lun),
            ),
            (
                "SELECT REPORT 3",
                report_luns(3, 16),
                vec![],
                bad_field_at(2),
            ),
            (
                "SELECT REPORT 0x13",
                report_luns(0x13, 16),
                vec![],
                bad_field_at(2),
            ),
        ];
        each_fresh(&rows);
        // Also answered through a LUN number that does not exist.
        let lun = Lun::new(memory());
        check_as(
            &lun,
            NEXUS,
            7,
            "REPORT LUNS to LUN 7",
            &report_luns(0, 16),
            &[],
            &good_data(one_lun),
        );
    }

    #[test]
    fn report_supported_opcodes_table() {
        let count = SUPPORTED_OPCODES.len();
        let all_length = ((count * 8) as u32).to_be_bytes();
        let all_length_with_timeouts = ((count * 20) as u32).to_be_bytes();
        let timeouts = [0x00, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let read_capacity16_usage = {
            let mut u = usage(0x9e, 16);
            u[1] = 0xf0; // the service action bits
            u
        };
        let rows: Vec<Row> = vec![
            (
                "all commands: TEST UNIT READY first",
                report_opcodes(false, 0, 0, 0, 65536),
                vec![],
                good()
                    .len(4 + count * 8)
                    .at(0, &all_length)
                    .at(4, &[0x00, 0, 0, 0, 0, 0x00, 0, 6]),
            ),
            (
                "all commands with timeouts",
                report_opcodes(true, 0, 0, 0, 65536),
                vec![],
                good()
                    .len(4 + count * 20)
                    .at(0, &all_length_with_timeouts)
                    .at(4, &[0x00, 0, 0, 0, 0, 0x02, 0, 6])
                    .at(12, &timeouts),
            ),
            (
                "all commands truncated",
                report_opcodes(false, 0, 0, 0, 4),
                vec![],
                good_data(all_length),
            ),
            (
                "one command: READ (10)",
                report_opcodes(false, 1, 0x28, 0, 255),
                vec![],
                good_data([&[0, 0x03, 0, 10][..], &usage(0x28, 10)].concat()),
            ),
            (
                "one command with timeouts: READ (10)",
                report_opcodes(true, 1, 0x28, 0, 255),
                vec![],
                good_data([&[0, 0x83, 0, 10][..], &usage(0x28, 10), &timeouts].concat()),
            ),
            (
                "one command: FORMAT UNIT, not supported",
                report_opcodes(false, 1, 0x04, 0, 255),
                vec![],
                good_data([0, 0x01, 0, 0]),
            ),
            (
                "one command without service action, but it has some",
                report_opcodes(false, 1, 0x9e, 0, 255),
                vec![],
                bad_field_at(2),
            ),
            (
                "one service action: READ CAPACITY (16)",
                report_opcodes(false, 2, 0x9e, 0x10, 255),
                vec![],
                good_data([&[0, 0x03, 0, 16][..], &read_capacity16_usage].concat()),
            ),
            (
                "one service action: an unknown one",
                report_opcodes(false, 2, 0x9e, 0x11, 255),
                vec![],
                good_data([0, 0x01, 0, 0]),
            ),
            (
                "one service action of a command without them",
                report_opcodes(false, 2, 0x28, 0, 255),
                vec![],
                bad_field_at(2),
            ),
            (
                "options 3: READ (10)",
                report_opcodes(false, 3, 0x28, 0, 255),
                vec![],
                good_data([&[0, 0x03, 0, 10][..], &usage(0x28, 10)].concat()),
            ),
            (
                "options 3: READ CAPACITY (16)",
                report_opcodes(false, 3, 0x9e, 0x10, 255),
                vec![],
                good_data([&[0, 0x03, 0, 16][..], &read_capacity16_usage].concat()),
            ),
            (
                "one command truncated",
                report_opcodes(false, 1, 0x28, 0, 6),
                vec![],
                good_data([0, 0x03, 0, 10, 0x28, 0xff]),
            ),
            (
                "reporting options 4",
                report_opcodes(false, 4, 0x28, 0, 255),
                vec![],
                bad_field_at(2),
            ),
            (
                "MAINTENANCE IN with another service action",
                cdb12(0xa3, 0x0a, 0, 255),
                vec![],
                bad_field_at(1),
            ),
        ];
        each_fresh(&rows);
    }

    /// REPORT SUPPORTED OPERATION CODES tells the truth: every opcode in its table is
    /// implemented (never INVALID COMMAND OPERATION CODE, and each listed service action is
    /// accepted), and every opcode outside it is refused with INVALID COMMAND OPERATION CODE.
    /// Each command is a zeroed 16-byte CDB (as iSCSI carries it) on a fresh LUN.
    #[test]
    fn supported_opcodes_match_the_dispatcher() {
        let run = |cdb: &[u8]| Lun::new(memory()).execute(&nexus(NEXUS), 0, cdb, &[]);
        let refused = |sense_data: &[u8], s: sense::Sense| {
            sense_data.len() >= 18
                && (sense_data[2] & 0x0f, sense_data[12], sense_data[13]) == (s.key, s.asc, s.ascq)
        };
        for opcode in 0..=255u8 {
            let mut cdb = [0u8; 16];
            cdb[0] = opcode;
            let result = run(&cdb);
            let listed = SUPPORTED_OPCODES.iter().any(|(o, _, _)| *o == opcode);
            let invalid_opcode = result.status == sense::CHECK_CONDITION
                && refused(&result.sense, sense::INVALID_OPCODE);
            assert_eq!(
                listed, !invalid_opcode,
                "opcode {opcode:#04x}: listed {listed}, answered {result:02x?}"
            );
        }
        for (opcode, action, len) in SUPPORTED_OPCODES {
            let mut cdb = vec![0u8; 16];
            cdb[0] = *opcode;
            if let Some(action) = action {
                cdb[1] = *action as u8;
            }
            let result = run(&cdb);
            let bad_action = result.status == sense::CHECK_CONDITION
                && refused(&result.sense, sense::INVALID_FIELD_IN_CDB)
                && result.sense[15..18] == [0xc0, 0, 1];
            assert!(
                !bad_action && !refused(&result.sense, sense::INVALID_OPCODE),
                "opcode {opcode:#04x} service action {action:?}: answered {result:02x?}"
            );
            // The listed CDB length is the opcode group's.
            let group_len = match opcode >> 5 {
                0 => 6,
                1 | 2 => 10,
                4 => 16,
                5 => 12,
                _ => 0,
            };
            assert_eq!(*len, group_len, "CDB length of {opcode:#04x}");
        }
    }
}
