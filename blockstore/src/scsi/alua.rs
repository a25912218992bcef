//! Asymmetric logical unit access (SPC-4 5.15, implicit only) for a device with several paths
//! ([`BlockDevice::port_groups`]): a session's volume is served by its primary's node and its
//! standby's, one target port group (with one target port) per node.
//!
//! - INQUIRY reports TPGS 01b (implicit), page 0x83 adds the relative target port and target
//!   port group designators of this path (the device identifier stays the same on every node).
//! - REPORT TARGET PORT GROUPS (MAINTENANCE IN, service action 0Ah) lists every group and its
//!   state, with the length-only or the extended header.
//! - In the standby and unavailable states, the commands SPC-4 does not allow in that state get
//!   CHECK CONDITION, NOT READY, 04h/0Bh or 04h/0Ch, at once, before anything else looks at
//!   them. In the transitioning state the device holds a command until the transition ended
//!   (a promoted standby waits out the old primary's lease, under a second) or answers 04h/0Ah
//!   itself: a short wait costs the initiator less than a retry. TEST UNIT READY on a standby
//!   path keeps the device's bounded hold ([`BlockDevice::ready`]) instead of answering at
//!   once, as long as the nexus has sent nothing else: iPXE opens every path and boots from the
//!   first whose TEST UNIT READY succeeds (its first command), and a dead primary's standby must
//!   win that race once it is promoted; an operating system starts with INQUIRY, and its
//!   multipath checker's TEST UNIT READY then gets the standby state at once.
//! - Each nexus gets the unit attention "asymmetric access state changed" (2Ah/06h) at its next
//!   command after the states changed.
//!
//! [`BlockDevice::port_groups`]: crate::device::BlockDevice::port_groups
//! [`BlockDevice::ready`]: crate::device::BlockDevice::ready

use super::sense::{self, Sense};
use super::{bad_field, be_u, CmdResult, Lun, LunState};
use crate::device::{AccessState, PortGroups};

/// Supported states: T_SUP, U_SUP, S_SUP and AO_SUP.
const SUPPORTED_STATES: u8 = 0x80 | 0x08 | 0x04 | 0x01;
/// "Status code" of a group's descriptor: its state was altered by implicit behaviour.
const ALTERED_IMPLICITLY: u8 = 0x02;
/// Implicit transition time reported in the extended header, in seconds: a failover's worst.
const IMPLICIT_TRANSITION_SECONDS: u8 = 15;

/// Commands SPC-4 (5.15.2.4.4-5) allows in the standby and unavailable states, and READ
/// CAPACITY, which an operating system sends while it probes every path (Linux's sd): a path
/// that fails it gets a size of zero, and multipath then leaves it out of the map as a path of
/// another size (LIO allows it too).
fn allowed_when_not_active(opcode: u8, cdb: &[u8]) -> bool {
    match opcode {
        // READ CAPACITY (10), SERVICE ACTION IN (16): READ CAPACITY (16).
        0x25 => true,
        0x9e => matches!(cdb.get(1).map(|b| b & 0x1f), Some(0x10)),
        // INQUIRY, REQUEST SENSE, REPORT LUNS, MODE SENSE/SELECT, LOG SENSE/SELECT, RECEIVE/SEND
        // DIAGNOSTIC, PERSISTENT RESERVE IN/OUT.
        0x12 | 0x03 | 0xa0 | 0x1a | 0x5a | 0x15 | 0x55 | 0x4d | 0x4c | 0x1c | 0x1d | 0x5e
        | 0x5f => true,
        // MAINTENANCE IN: REPORT TARGET PORT GROUPS, REPORT SUPPORTED OPERATION CODES.
        0xa3 => matches!(cdb.get(1).map(|b| b & 0x1f), Some(0x0a | 0x0c)),
        _ => false,
    }
}

/// [`Lun::alua_preflight`] under the LUN's lock, with the device's `groups`: callers that
/// look at the LUN's state anyway (the fast READ path) take the lock once.
pub(super) fn alua_check(
    st: &mut LunState,
    groups: &PortGroups,
    nexus_id: u64,
    opcode: u8,
    cdb: &[u8],
) -> Option<Sense> {
    let seen = st.alua_seen.insert(nexus_id, groups.version);
    if seen.is_some_and(|seen| seen != groups.version) {
        st.unit_attentions
            .entry(nexus_id)
            .or_default()
            .push_back(sense::ASYMMETRIC_ACCESS_STATE_CHANGED);
    }
    let only_tur_so_far = if opcode == 0x00 {
        !st.past_first_tur.contains(&nexus_id)
    } else {
        st.past_first_tur.insert(nexus_id);
        false
    };
    if allowed_when_not_active(opcode, cdb) {
        return None;
    }
    match groups.local_state() {
        AccessState::ActiveOptimized => None,
        // The bounded hold of `ready` (see the module docs).
        AccessState::Standby if opcode == 0x00 && only_tur_so_far => None,
        AccessState::Standby => Some(sense::ALUA_STANDBY),
        AccessState::Unavailable => Some(sense::ALUA_UNAVAILABLE),
        // The device holds the command until the transition ends (see the module docs).
        AccessState::Transitioning => None,
    }
}

impl Lun {
    /// Before a command's own checks: the unit attention of a state change this nexus has not
    /// seen, then the refusal of a command this path's state does not allow. `Some` is the
    /// command's outcome.
    pub(super) fn alua_preflight(&self, nexus_id: u64, opcode: u8, cdb: &[u8]) -> Option<Sense> {
        let groups = self.device.port_groups()?;
        alua_check(&mut self.lock(), &groups, nexus_id, opcode, cdb)
    }
    /// TPGS of the standard INQUIRY data: 01b (implicit ALUA) when the device has paths.
    pub(super) fn tpgs(&self) -> u8 {
        if self.device.port_groups().is_some() {
            0x10
        } else {
            0x00
        }
    }

    /// Page 0x83's designators of this path: relative target port (type 4) and target port
    /// group (type 5), both of association "target port".
    pub(super) fn port_designators(&self) -> Vec<u8> {
        let Some(groups) = self.device.port_groups() else {
            return Vec::new();
        };
        let id = groups.local.to_be_bytes();
        let mut out = Vec::with_capacity(16);
        for kind in [0x14u8, 0x15] {
            out.extend_from_slice(&[0x01, kind, 0x00, 4, 0x00, 0x00, id[0], id[1]]);
        }
        out
    }

    /// REPORT TARGET PORT GROUPS.
    pub(super) fn report_target_port_groups(&self, cdb: &[u8]) -> CmdResult {
        let Some(groups) = self.device.port_groups() else {
            // MAINTENANCE IN is supported; this service action is not, on one path.
            return Err(bad_field(1));
        };
        let extended = match cdb[1] >> 5 {
            0 => false,
            1 => true,
            _ => return Err(bad_field(1)),
        };
        let allocation = be_u(cdb, 6, 4) as usize;
        let mut out = vec![0u8; if extended { 8 } else { 4 }];
        if extended {
            out[4] = 0x10; // format type 001b
            out[5] = IMPLICIT_TRANSITION_SECONDS;
        }
        for (group, state) in &groups.groups {
            let id = group.to_be_bytes();
            out.extend_from_slice(&[
                *state as u8,
                SUPPORTED_STATES,
                id[0],
                id[1],
                0,
                ALTERED_IMPLICITLY,
                0,
                1, // one target port
                0,
                0,
                id[0],
                id[1],
            ]);
        }
        let length = (out.len() - 4) as u32;
        out[..4].copy_from_slice(&length.to_be_bytes());
        out.truncate(allocation);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::testing::*;
    use super::super::{sense, Lun};
    use super::*;

    /// The memory device on two paths: this one active/optimized (group 7), the other on
    /// standby (group 9).
    fn lun_with_paths() -> (Lun, Arc<Memory>) {
        let paths = memory();
        paths.set_paths(AccessState::ActiveOptimized, AccessState::Standby);
        (Lun::new(paths.clone()), paths)
    }

    fn rtpg(extended: bool, allocation: u32) -> Vec<u8> {
        let a = allocation.to_be_bytes();
        let format = (extended as u8) << 5;
        vec![
            0xa3,
            0x0a | format,
            0,
            0,
            0,
            0,
            a[0],
            a[1],
            a[2],
            a[3],
            0,
            0,
        ]
    }

    fn read10() -> Vec<u8> {
        vec![0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]
    }

    fn descriptor(group: u16, state: AccessState) -> Vec<u8> {
        let id = group.to_be_bytes();
        vec![
            state as u8,
            0x8d,
            id[0],
            id[1],
            0,
            2,
            0,
            1,
            0,
            0,
            id[0],
            id[1],
        ]
    }

    fn run(lun: &Lun, rows: &[Row]) {
        for (name, cdb, data_out, expect) in rows {
            check(lun, name, cdb, data_out, expect);
        }
    }

    #[test]
    fn report_target_port_groups_table() {
        let (lun, _) = lun_with_paths();
        let mut length_only = vec![0, 0, 0, 24];
        length_only.extend(descriptor(7, AccessState::ActiveOptimized));
        length_only.extend(descriptor(9, AccessState::Standby));
        let mut extended = vec![0, 0, 0, 28, 0x10, 15, 0, 0];
        extended.extend_from_slice(&length_only[4..]);
        let truncated = length_only[..6].to_vec();
        run(
            &lun,
            &[
                (
                    "length-only header",
                    rtpg(false, 255),
                    vec![],
                    good_data(length_only),
                ),
                (
                    "extended header",
                    rtpg(true, 255),
                    vec![],
                    good_data(extended),
                ),
                ("truncated", rtpg(false, 6), vec![], good_data(truncated)),
                (
                    "format 2",
                    vec![0xa3, 0x4a, 0, 0, 0, 0, 0, 0, 0, 255, 0, 0],
                    vec![],
                    bad_field_at(1),
                ),
            ],
        );
    }

    /// REPORT SUPPORTED OPERATION CODES, one command: MAINTENANCE IN, REPORT TARGET PORT
    /// GROUPS.
    fn rsoc_rtpg() -> Vec<u8> {
        vec![0xa3, 0x0c, 0x02, 0xa3, 0x00, 0x0a, 0, 0, 1, 0, 0, 0]
    }

    #[test]
    fn report_target_port_groups_is_listed_only_with_paths() {
        let (lun, _) = lun_with_paths();
        run(
            &lun,
            &[("with paths", rsoc_rtpg(), vec![], good().at(1, &[0x03]))],
        );
        let plain = Lun::new(memory());
        run(
            &plain,
            &[("one path", rsoc_rtpg(), vec![], good().at(1, &[0x01]))],
        );
    }

    #[test]
    fn a_plain_device_has_no_port_groups() {
        let lun = Lun::new(memory());
        run(
            &lun,
            &[
                (
                    "REPORT TARGET PORT GROUPS",
                    rtpg(false, 255),
                    vec![],
                    bad_field_at(1),
                ),
                (
                    "INQUIRY: TPGS 0",
                    vec![0x12, 0, 0, 0, 96, 0],
                    vec![],
                    good().at(5, &[0x00]),
                ),
            ],
        );
    }

    #[test]
    fn inquiry_reports_implicit_alua_and_this_paths_port() {
        let (lun, _) = lun_with_paths();
        run(
            &lun,
            &[(
                "INQUIRY: TPGS 01b",
                vec![0x12, 0, 0, 0, 96, 0],
                vec![],
                good().at(5, &[0x10]),
            )],
        );
        let page = check(&lun, "VPD 0x83", &[0x12, 1, 0x83, 1, 0, 0], &[], &good()).data_in;
        let tail = &page[page.len() - 16..];
        assert_eq!(tail, [1, 0x14, 0, 4, 0, 0, 0, 7, 1, 0x15, 0, 4, 0, 0, 0, 7]);
    }

    #[test]
    fn a_standby_path_refuses_media_access_at_once_and_changes_raise_a_unit_attention() {
        let (lun, paths) = lun_with_paths();
        let ua = || check_condition(sense::ASYMMETRIC_ACCESS_STATE_CHANGED);
        run(&lun, &[("READ while active", read10(), vec![], good())]);
        paths.set_paths(AccessState::Standby, AccessState::ActiveOptimized);
        run(
            &lun,
            &[
                ("first command after the change", read10(), vec![], ua()),
                (
                    "READ on standby",
                    read10(),
                    vec![],
                    check_condition(sense::ALUA_STANDBY),
                ),
                (
                    "WRITE on standby",
                    vec![0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0],
                    vec![0; 512],
                    check_condition(sense::ALUA_STANDBY),
                ),
                (
                    "READ CAPACITY (10) on standby: allowed, multipath compares sizes",
                    vec![0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                    vec![],
                    good(),
                ),
                (
                    "READ CAPACITY (16) on standby",
                    vec![0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
                    vec![],
                    good(),
                ),
                (
                    "GET LBA STATUS on standby",
                    vec![0x9e, 0x12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
                    vec![],
                    check_condition(sense::ALUA_STANDBY),
                ),
                (
                    "TEST UNIT READY after other commands",
                    vec![0; 6],
                    vec![],
                    check_condition(sense::ALUA_STANDBY),
                ),
                (
                    "REPORT TARGET PORT GROUPS",
                    rtpg(false, 255),
                    vec![],
                    good(),
                ),
            ],
        );
        paths.set_paths(AccessState::Transitioning, AccessState::Unavailable);
        run(
            &lun,
            &[
                ("after the change", read10(), vec![], ua()),
                (
                    "transitioning: the device decides",
                    read10(),
                    vec![],
                    good(),
                ),
            ],
        );
        paths.set_paths(AccessState::Unavailable, AccessState::ActiveOptimized);
        run(
            &lun,
            &[
                ("after the change", read10(), vec![], ua()),
                (
                    "unavailable",
                    read10(),
                    vec![],
                    check_condition(sense::ALUA_UNAVAILABLE),
                ),
            ],
        );
        paths.set_paths(AccessState::ActiveOptimized, AccessState::Standby);
        run(
            &lun,
            &[
                ("after the change", read10(), vec![], ua()),
                ("active again", read10(), vec![], good()),
            ],
        );
        // A nexus that never saw the earlier states gets no unit attention.
        check_as(&lun, 2, 0, "another nexus", &read10(), &[], &good());
        // iPXE's first command on a standby path is TEST UNIT READY: it holds (the device's
        // `ready`, here at once) while the nexus has sent nothing else.
        paths.set_paths(AccessState::Standby, AccessState::ActiveOptimized);
        check_as(&lun, 3, 0, "first TUR of a nexus", &[0; 6], &[], &good());
        check_as(&lun, 3, 0, "again", &[0; 6], &[], &good());
        check_as(
            &lun,
            3,
            0,
            "READ",
            &read10(),
            &[],
            &check_condition(sense::ALUA_STANDBY),
        );
        check_as(
            &lun,
            3,
            0,
            "TUR after",
            &[0; 6],
            &[],
            &check_condition(sense::ALUA_STANDBY),
        );
        // The shells' fast READ path refuses nothing itself: it leaves the refusal and the unit
        // attention to `execute`.
        let mut buffer = Vec::new();
        let fast = |buffer: &mut Vec<u8>| lun.try_fast_read(&nexus(3), 0, &read10(), buffer);
        assert!(fast(&mut buffer).is_none(), "standby: left to execute");
        paths.set_paths(AccessState::ActiveOptimized, AccessState::Standby);
        assert!(
            fast(&mut buffer).is_none(),
            "a change to report: left to execute"
        );
        check_as(&lun, 3, 0, "its unit attention", &read10(), &[], &ua());
        assert!(fast(&mut buffer).is_some(), "active: read here");
    }
}
