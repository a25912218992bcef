//! MODE SENSE (6/10) and MODE SELECT (6/10) (SPC-4) and the mode pages this LUN offers:
//! Read-Write Error Recovery (0x01) and Caching (0x08) from SBC-3, Control (0x0A) and
//! Informational Exceptions Control (0x1C) from SPC-4, with the short (8-byte) or long LBA
//! (16-byte) block descriptor.
//!
//! Changeable: WCE in the caching page (turning it off flushes the device, and every later write
//! is forced to the medium) and D_SENSE in the control page. Saved values are not offered.

use super::{bad_field, be_u, device_failure, sense, CmdResult, Failure, Lun};

impl Lun {
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

    pub(super) fn mode_sense(&self, cdb: &[u8]) -> CmdResult {
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

    pub(super) fn mode_select(&self, cdb: &[u8], data_out: &[u8]) -> CmdResult {
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
}

#[cfg(test)]
mod tests {
    use super::super::sense;
    use super::super::testing::*;
    use super::super::Lun;

    const READ_WRITE_RECOVERY: [u8; 12] = [0x01, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    /// WCE set.
    const CACHING: [u8; 20] = [
        0x08, 18, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    /// Queue algorithm modifier 1 (unrestricted), TAS, busy timeout unlimited.
    const CONTROL: [u8; 12] = [0x0a, 10, 0x00, 0x10, 0, 0x40, 0, 0, 0xff, 0xff, 0, 0];
    const INFORMATIONAL: [u8; 12] = [0x1c, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    /// Short LBA block descriptor: 2048 blocks of 512 bytes.
    const SHORT_DESCRIPTOR: [u8; 8] = [0, 0, 0x08, 0x00, 0, 0, 0x02, 0x00];
    /// Long LBA block descriptor: 2048 blocks of 512 bytes.
    const LONG_DESCRIPTOR: [u8; 16] = [0, 0, 0, 0, 0, 0, 0x08, 0x00, 0, 0, 0, 0, 0, 0, 0x02, 0x00];
    /// DPOFUA in the device-specific parameter.
    const DPOFUA: u8 = 0x10;

    /// MODE SENSE (6); `control` is PC (bits 7..6) and the page code.
    fn mode_sense6(dbd: bool, control: u8, subpage: u8, allocation_bytes: u8) -> Vec<u8> {
        cdb6(0x1a, (dbd as u8) << 3, control, subpage, allocation_bytes)
    }

    fn mode_sense10(llbaa: bool, dbd: bool, control: u8, allocation_bytes: u16) -> Vec<u8> {
        let mut c = cdb10(
            0x5a,
            (llbaa as u8) << 4 | (dbd as u8) << 3,
            0,
            allocation_bytes,
        );
        c[2] = control;
        c
    }

    /// MODE SELECT (6) with PF set and the parameter list length of `parameters`.
    fn mode_select6(parameters: &[u8]) -> Vec<u8> {
        cdb6(0x15, 0x10, 0, 0, parameters.len() as u8)
    }

    fn mode_select10(parameters: &[u8]) -> Vec<u8> {
        cdb10(0x55, 0x10, 0, parameters.len() as u16)
    }

    /// A MODE SELECT (6) parameter list: the 4-byte header (no block descriptor), then `page`.
    fn select6_list(page: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 4];
        p.extend_from_slice(page);
        p
    }

    fn select10_list(page: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 8];
        p.extend_from_slice(page);
        p
    }

    fn concat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    #[test]
    fn mode_sense_table() {
        let all_pages = concat(&[&READ_WRITE_RECOVERY, &CACHING, &CONTROL, &INFORMATIONAL]);
        let mut changeable_caching = [0u8; 20];
        changeable_caching[..3].copy_from_slice(&[0x08, 18, 0x04]);
        let rows: Vec<Row> = vec![
            (
                "MODE SENSE (6) caching page with the block descriptor",
                mode_sense6(false, 0x08, 0, 255),
                vec![],
                good_data(concat(&[&[31, 0, DPOFUA, 8], &SHORT_DESCRIPTOR, &CACHING])),
            ),
            (
                "MODE SENSE (6) caching page, DBD",
                mode_sense6(true, 0x08, 0, 255),
                vec![],
                good_data(concat(&[&[23, 0, DPOFUA, 0], &CACHING])),
            ),
            (
                "MODE SENSE (6) read-write error recovery page",
                mode_sense6(true, 0x01, 0, 255),
                vec![],
                good_data(concat(&[&[15, 0, DPOFUA, 0], &READ_WRITE_RECOVERY])),
            ),
            (
                "MODE SENSE (6) control page",
                mode_sense6(true, 0x0a, 0, 255),
                vec![],
                good_data(concat(&[&[15, 0, DPOFUA, 0], &CONTROL])),
            ),
            (
                "MODE SENSE (6) informational exceptions page",
                mode_sense6(true, 0x1c, 0, 255),
                vec![],
                good_data(concat(&[&[15, 0, DPOFUA, 0], &INFORMATIONAL])),
            ),
            (
                "MODE SENSE (6) all pages",
                mode_sense6(true, 0x3f, 0, 255),
                vec![],
                good_data(concat(&[&[59, 0, DPOFUA, 0], &all_pages])),
            ),
            (
                "MODE SENSE (6) all pages and subpages",
                mode_sense6(true, 0x3f, 0xff, 255),
                vec![],
                good_data(concat(&[&[59, 0, DPOFUA, 0], &all_pages])),
            ),
            (
                "MODE SENSE (6) truncated to the header",
                mode_sense6(false, 0x3f, 0, 4),
                vec![],
                good_data([67, 0, DPOFUA, 8]),
            ),
            (
                "MODE SENSE (6) changeable caching: WCE",
                mode_sense6(true, 0x48, 0, 255),
                vec![],
                good_data(concat(&[&[23, 0, DPOFUA, 0], &changeable_caching])),
            ),
            (
                "MODE SENSE (6) changeable control: D_SENSE",
                mode_sense6(true, 0x4a, 0, 255),
                vec![],
                good_data(concat(&[
                    &[15, 0, DPOFUA, 0],
                    &[0x0a, 10, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                ])),
            ),
            (
                "MODE SENSE (6) changeable read-write error recovery: nothing",
                mode_sense6(true, 0x41, 0, 255),
                vec![],
                good_data(concat(&[&[15, 0, DPOFUA, 0], &READ_WRITE_RECOVERY])),
            ),
            (
                "MODE SENSE (6) default control",
                mode_sense6(true, 0x8a, 0, 255),
                vec![],
                good_data(concat(&[&[15, 0, DPOFUA, 0], &CONTROL])),
            ),
            (
                "MODE SENSE (6) saved values",
                mode_sense6(true, 0xc8, 0, 255),
                vec![],
                check_condition(sense::SAVING_PARAMETERS_NOT_SUPPORTED),
            ),
            (
                "MODE SENSE (6) page 0x02 not offered",
                mode_sense6(true, 0x02, 0, 255),
                vec![],
                bad_field_at(2),
            ),
            (
                "MODE SENSE (6) subpage 1",
                mode_sense6(true, 0x08, 1, 255),
                vec![],
                bad_field_at(3),
            ),
            (
                "MODE SENSE (10) caching page, short descriptor",
                mode_sense10(false, false, 0x08, 255),
                vec![],
                good_data(concat(&[
                    &[0, 34, 0, DPOFUA, 0, 0, 0, 8],
                    &SHORT_DESCRIPTOR,
                    &CACHING,
                ])),
            ),
            (
                "MODE SENSE (10) caching page, LLBAA: long descriptor",
                mode_sense10(true, false, 0x08, 255),
                vec![],
                good_data(concat(&[
                    &[0, 42, 0, DPOFUA, 0x01, 0, 0, 16],
                    &LONG_DESCRIPTOR,
                    &CACHING,
                ])),
            ),
            (
                "MODE SENSE (10) LLBAA and DBD: no descriptor, LONGLBA clear",
                mode_sense10(true, true, 0x08, 255),
                vec![],
                good_data(concat(&[&[0, 26, 0, DPOFUA, 0, 0, 0, 0], &CACHING])),
            ),
            (
                "MODE SENSE (10) truncated",
                mode_sense10(false, true, 0x3f, 10),
                vec![],
                good_data(concat(&[&[0, 62, 0, DPOFUA, 0, 0, 0, 0], &all_pages[..2]])),
            ),
        ];
        each_fresh(&rows);
    }

    #[test]
    fn mode_select_table() {
        let mut caching_off = CACHING;
        caching_off[2] = 0;
        let mut caching_read_cache_off = CACHING;
        caching_read_cache_off[2] |= 0x01; // RCD is not changeable
        let mut short_caching = CACHING.to_vec();
        short_caching[1] = 10;
        short_caching.truncate(12);
        let rows: Vec<Row> = vec![
            (
                "MODE SELECT (6) with SP",
                cdb6(0x15, 0x11, 0, 0, 24),
                select6_list(&CACHING),
                check_condition(sense::SAVING_PARAMETERS_NOT_SUPPORTED),
            ),
            (
                "MODE SELECT (6) parameter list length 0",
                cdb6(0x15, 0x10, 0, 0, 0),
                vec![],
                good_empty(),
            ),
            (
                "MODE SELECT (6) without PF",
                cdb6(0x15, 0x00, 0, 0, 24),
                select6_list(&CACHING),
                bad_field_at(1),
            ),
            (
                "MODE SELECT (6) less data than the length says",
                cdb6(0x15, 0x10, 0, 0, 24),
                select6_list(&CACHING)[..10].to_vec(),
                check_condition(sense::PARAMETER_LIST_LENGTH_ERROR),
            ),
            (
                "MODE SELECT (6) shorter than its header",
                cdb6(0x15, 0x10, 0, 0, 3),
                vec![0; 3],
                check_condition(sense::PARAMETER_LIST_LENGTH_ERROR),
            ),
            (
                "MODE SELECT (6) header only",
                mode_select6(&[0; 4]),
                vec![0; 4],
                good_empty(),
            ),
            (
                "MODE SELECT (6) caching page as it is",
                mode_select6(&select6_list(&CACHING)),
                select6_list(&CACHING),
                good_empty(),
            ),
            (
                "MODE SELECT (6) caching page, WCE off",
                mode_select6(&select6_list(&caching_off)),
                select6_list(&caching_off),
                good_empty(),
            ),
            (
                "MODE SELECT (6) caching page, a bit that is not changeable",
                mode_select6(&select6_list(&caching_read_cache_off)),
                select6_list(&caching_read_cache_off),
                check_condition(sense::INVALID_FIELD_IN_PARAMETER_LIST),
            ),
            (
                "MODE SELECT (6) caching page of the wrong length",
                mode_select6(&select6_list(&short_caching)),
                select6_list(&short_caching),
                check_condition(sense::INVALID_FIELD_IN_PARAMETER_LIST),
            ),
            (
                "MODE SELECT (6) page 0x02 not offered",
                mode_select6(&select6_list(&[0x02, 2, 0, 0])),
                select6_list(&[0x02, 2, 0, 0]),
                check_condition(sense::INVALID_FIELD_IN_PARAMETER_LIST),
            ),
            (
                "MODE SELECT (6) subpage format",
                mode_select6(&select6_list(&[0x48, 2, 0, 0])),
                select6_list(&[0x48, 2, 0, 0]),
                check_condition(sense::INVALID_FIELD_IN_PARAMETER_LIST),
            ),
            (
                "MODE SELECT (6) page running past the list",
                mode_select6(&select6_list(&CACHING[..6])),
                select6_list(&CACHING[..6]),
                check_condition(sense::PARAMETER_LIST_LENGTH_ERROR),
            ),
            (
                "MODE SELECT (6) half a page header",
                mode_select6(&select6_list(&[0x08])),
                select6_list(&[0x08]),
                check_condition(sense::PARAMETER_LIST_LENGTH_ERROR),
            ),
            (
                "MODE SELECT (10) caching page as it is",
                mode_select10(&select10_list(&CACHING)),
                select10_list(&CACHING),
                good_empty(),
            ),
            (
                "MODE SELECT (10) control page as it is",
                mode_select10(&select10_list(&CONTROL)),
                select10_list(&CONTROL),
                good_empty(),
            ),
            (
                "MODE SELECT (10) skips the block descriptor",
                mode_select10(&concat(&[
                    &[0, 0, 0, 0, 0, 0, 0, 8],
                    &SHORT_DESCRIPTOR,
                    &CACHING,
                ])),
                concat(&[&[0, 0, 0, 0, 0, 0, 0, 8], &SHORT_DESCRIPTOR, &CACHING]),
                good_empty(),
            ),
        ];
        each_fresh(&rows);
    }

    /// WCE off flushes the device once and forces every later write to the medium; back on,
    /// writes are cached again. D_SENSE is remembered (the current value; the default stays 0).
    #[test]
    fn mode_select_changes_what_mode_sense_reports() {
        let device = memory();
        let lun = Lun::new(device.clone());
        let mut caching_off = CACHING;
        caching_off[2] = 0;
        let mut control_descriptor_sense = CONTROL;
        control_descriptor_sense[2] = 0x04;
        in_order(
            &lun,
            &[
                (
                    "WCE off",
                    mode_select6(&select6_list(&caching_off)),
                    select6_list(&caching_off),
                    good_empty(),
                ),
                (
                    "caching page shows WCE off",
                    mode_sense6(true, 0x08, 0, 255),
                    vec![],
                    good_data(concat(&[&[23, 0, DPOFUA, 0], &caching_off])),
                ),
                (
                    "default caching page still has WCE on",
                    mode_sense6(true, 0x88, 0, 255),
                    vec![],
                    good_data(concat(&[&[23, 0, DPOFUA, 0], &CACHING])),
                ),
            ],
        );
        assert_eq!(device.flushes(), 1, "turning the write cache off flushes");
        check(
            &lun,
            "WRITE (10) without FUA, cache off",
            &cdb10(0x2a, 0, 0, 1),
            &pattern(1, 1),
            &good_empty(),
        );
        assert_eq!((device.writes(), device.fua_writes()), (1, 1));
        in_order(
            &lun,
            &[
                (
                    "WCE on",
                    mode_select10(&select10_list(&CACHING)),
                    select10_list(&CACHING),
                    good_empty(),
                ),
                (
                    "WRITE (10) without FUA, cache on",
                    cdb10(0x2a, 0, 0, 1),
                    pattern(2, 1),
                    good_empty(),
                ),
                (
                    "D_SENSE on",
                    mode_select6(&select6_list(&control_descriptor_sense)),
                    select6_list(&control_descriptor_sense),
                    good_empty(),
                ),
                (
                    "control page shows D_SENSE",
                    mode_sense6(true, 0x0a, 0, 255),
                    vec![],
                    good_data(concat(&[&[15, 0, DPOFUA, 0], &control_descriptor_sense])),
                ),
                (
                    "default control page has D_SENSE off",
                    mode_sense6(true, 0x8a, 0, 255),
                    vec![],
                    good_data(concat(&[&[15, 0, DPOFUA, 0], &CONTROL])),
                ),
            ],
        );
        assert_eq!(
            device.flushes(),
            1,
            "turning the write cache on does not flush"
        );
        assert_eq!((device.writes(), device.fua_writes()), (2, 1));
    }
}
