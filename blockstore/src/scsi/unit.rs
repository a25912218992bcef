//! The logical unit's own state (SPC-4, SBC-3): TEST UNIT READY, REQUEST SENSE, START STOP UNIT
//! (stopped: medium access answers NOT READY) and PREVENT ALLOW MEDIUM REMOVAL (per nexus; an
//! eject is refused while any nexus prevents removal).
//!
//! Unit attentions are raised elsewhere (reset, reservations) and reported by `preflight` in
//! mod.rs, or here by REQUEST SENSE, which consumes one.

use super::{bad_field, device_failure, sense, CmdResult, Lun, Nexus};

impl Lun {
    /// TEST UNIT READY: NOT READY while stopped; otherwise whatever the device's `ready` says.
    pub(super) fn test_unit_ready(&self) -> CmdResult {
        if self.lock().stopped {
            return Err(sense::NOT_READY_STOPPED.into());
        }
        self.device.ready().map_err(|e| device_failure(e, false))?;
        Ok(Vec::new())
    }

    pub(super) fn request_sense(&self, nexus: &Nexus, cdb: &[u8]) -> CmdResult {
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

    /// START STOP UNIT: IMMED, POWER CONDITION, LOEJ, START.
    pub(super) fn start_stop_unit(&self, cdb: &[u8]) -> CmdResult {
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

    /// PREVENT ALLOW MEDIUM REMOVAL: remembered per nexus (dropped when the nexus goes).
    pub(super) fn prevent_allow_medium_removal(&self, nexus: &Nexus, cdb: &[u8]) -> CmdResult {
        let prevent = cdb[4] & 0x03;
        if prevent > 1 {
            return Err(bad_field(4));
        }
        self.lock().prevent_removal.insert(nexus.id, prevent == 1);
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::super::sense;
    use super::super::testing::*;
    use super::super::Lun;

    const TEST_UNIT_READY: [u8; 6] = [0; 6];

    fn request_sense(descriptor: bool, allocation_bytes: u8) -> Vec<u8> {
        cdb6(0x03, descriptor as u8, 0, 0, allocation_bytes)
    }

    fn start_stop_unit(byte4: u8) -> Vec<u8> {
        cdb6(0x1b, 0, 0, 0, byte4)
    }

    fn prevent_allow(prevent: u8) -> Vec<u8> {
        cdb6(0x1e, 0, 0, 0, prevent)
    }

    #[test]
    fn unit_table() {
        let no_sense = sense::NO_SENSE.to_bytes();
        let rows: Vec<Row> = vec![
            (
                "TEST UNIT READY",
                TEST_UNIT_READY.to_vec(),
                vec![],
                good_empty(),
            ),
            (
                "REQUEST SENSE with nothing pending",
                request_sense(false, 252),
                vec![],
                good_data([0x70, 0, 0, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            ),
            (
                "REQUEST SENSE truncated",
                request_sense(false, 8),
                vec![],
                good_data(no_sense[..8].to_vec()),
            ),
            (
                "REQUEST SENSE in descriptor format",
                request_sense(true, 252),
                vec![],
                bad_field_at(1),
            ),
            (
                "START STOP UNIT with a power condition: ignored",
                start_stop_unit(0x10),
                vec![],
                good_empty(),
            ),
            (
                "START STOP UNIT: start",
                start_stop_unit(0x01),
                vec![],
                good_empty(),
            ),
            (
                "PREVENT ALLOW MEDIUM REMOVAL: allow",
                prevent_allow(0),
                vec![],
                good_empty(),
            ),
            (
                "PREVENT ALLOW MEDIUM REMOVAL: prevent",
                prevent_allow(1),
                vec![],
                good_empty(),
            ),
            (
                "PREVENT ALLOW MEDIUM REMOVAL: 2",
                prevent_allow(2),
                vec![],
                bad_field_at(4),
            ),
            (
                "PREVENT ALLOW MEDIUM REMOVAL: 3",
                prevent_allow(3),
                vec![],
                bad_field_at(4),
            ),
        ];
        each_fresh(&rows);
    }

    /// A stopped unit answers NOT READY to TEST UNIT READY and to medium access, reports it in
    /// REQUEST SENSE, still answers INQUIRY, and serves again once started.
    #[test]
    fn stopped_unit_is_not_ready() {
        let device = memory();
        let lun = Lun::new(device.clone());
        in_order(
            &lun,
            &[
                ("stop", start_stop_unit(0x00), vec![], good_empty()),
                (
                    "TEST UNIT READY while stopped",
                    TEST_UNIT_READY.to_vec(),
                    vec![],
                    check_condition(sense::NOT_READY_STOPPED),
                ),
                (
                    "REQUEST SENSE while stopped",
                    request_sense(false, 18),
                    vec![],
                    good_data(sense::NOT_READY_STOPPED.to_bytes()),
                ),
                (
                    "READ (10) while stopped",
                    cdb10(0x28, 0, 0, 1),
                    vec![],
                    check_condition(sense::NOT_READY_STOPPED),
                ),
                (
                    "WRITE (10) while stopped",
                    cdb10(0x2a, 0, 0, 1),
                    pattern(1, 1),
                    check_condition(sense::NOT_READY_STOPPED),
                ),
                (
                    "INQUIRY while stopped",
                    cdb6(0x12, 0, 0, 0, 36),
                    vec![],
                    good().len(36),
                ),
                ("start", start_stop_unit(0x01), vec![], good_empty()),
                (
                    "TEST UNIT READY once started",
                    TEST_UNIT_READY.to_vec(),
                    vec![],
                    good_empty(),
                ),
                (
                    "READ (10) once started",
                    cdb10(0x28, 0, 0, 1),
                    vec![],
                    good().len(512),
                ),
            ],
        );
        assert_eq!(device.writes(), 0, "nothing written while stopped");
    }

    /// An eject is refused while any nexus prevents removal; a load (or an allowed eject)
    /// leaves the unit started: the medium is not removable.
    #[test]
    fn prevent_medium_removal_refuses_eject() {
        let lun = Lun::new(memory());
        let eject = start_stop_unit(0x02);
        check_as(
            &lun,
            2,
            0,
            "nexus 2 prevents",
            &prevent_allow(1),
            &[],
            &good_empty(),
        );
        check(
            &lun,
            "eject from nexus 1",
            &eject,
            &[],
            &check_condition(sense::MEDIUM_REMOVAL_PREVENTED),
        );
        check(&lun, "load", &start_stop_unit(0x03), &[], &good_empty());
        check_as(
            &lun,
            2,
            0,
            "nexus 2 allows",
            &prevent_allow(0),
            &[],
            &good_empty(),
        );
        in_order(
            &lun,
            &[
                ("eject once allowed", eject.clone(), vec![], good_empty()),
                (
                    "still ready",
                    TEST_UNIT_READY.to_vec(),
                    vec![],
                    good_empty(),
                ),
            ],
        );
        // A nexus that goes away takes its prevention with it.
        check_as(
            &lun,
            2,
            0,
            "nexus 2 prevents again",
            &prevent_allow(1),
            &[],
            &good_empty(),
        );
        lun.nexus_lost(&nexus(2));
        check(
            &lun,
            "eject after nexus 2 is gone",
            &eject,
            &[],
            &good_empty(),
        );
    }

    /// A reset queues a unit attention for each nexus: the next command (other than INQUIRY,
    /// REPORT LUNS and REQUEST SENSE) fails with it once; REQUEST SENSE returns and consumes it.
    #[test]
    fn unit_attention_after_reset() {
        let lun = Lun::new(memory());
        lun.reset(&[1, 2]);
        in_order(
            &lun,
            &[
                (
                    "nexus 1: INQUIRY is exempt",
                    cdb6(0x12, 0, 0, 0, 36),
                    vec![],
                    good().len(36),
                ),
                (
                    "nexus 1: REPORT LUNS is exempt",
                    cdb12(0xa0, 0, 0, 16),
                    vec![],
                    good().len(16),
                ),
                (
                    "nexus 1: an unknown opcode reports the unit attention first",
                    vec![0x02, 0, 0, 0, 0, 0],
                    vec![],
                    check_condition(sense::BUS_DEVICE_RESET),
                ),
                (
                    "nexus 1: reported once",
                    TEST_UNIT_READY.to_vec(),
                    vec![],
                    good_empty(),
                ),
            ],
        );
        check_as(
            &lun,
            2,
            0,
            "nexus 2: REQUEST SENSE returns the unit attention",
            &request_sense(false, 18),
            &[],
            &good_data(sense::BUS_DEVICE_RESET.to_bytes()),
        );
        check_as(
            &lun,
            2,
            0,
            "nexus 2: consumed",
            &TEST_UNIT_READY,
            &[],
            &good_empty(),
        );
        check_as(
            &lun,
            3,
            0,
            "nexus 3: was not there",
            &TEST_UNIT_READY,
            &[],
            &good_empty(),
        );
    }
}
