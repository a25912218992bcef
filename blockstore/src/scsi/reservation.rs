//! SPC-2 RESERVE/RELEASE and SPC-4 persistent reservations of one LUN.
//!
//! Registrations and the reservation are kept per I_T nexus id. They live in the LUN, so every
//! session (every path) to the same volume sees the same state. Persist Through Power Loss is not
//! offered (REPORT CAPABILITIES says so): state lasts as long as the target process.

use super::sense::{self, Sense};
use super::{bad_field, be_u, Access, CmdResult, Failure, Lun, Nexus};

pub const WRITE_EXCLUSIVE: u8 = 1;
pub const EXCLUSIVE_ACCESS: u8 = 3;
pub const WRITE_EXCLUSIVE_REGISTRANTS_ONLY: u8 = 5;
pub const EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: u8 = 6;
pub const WRITE_EXCLUSIVE_ALL_REGISTRANTS: u8 = 7;
pub const EXCLUSIVE_ACCESS_ALL_REGISTRANTS: u8 = 8;

#[derive(Debug, Clone, Copy)]
struct Reservation {
    holder: u64,
    kind: u8,
}

#[derive(Debug, Default)]
pub struct Reservations {
    /// (nexus id, key), in registration order.
    registrations: Vec<(u64, u64)>,
    reservation: Option<Reservation>,
    generation: u32,
    /// SPC-2 RESERVE(6/10) holder.
    spc2_holder: Option<u64>,
}

fn all_registrants(kind: u8) -> bool {
    matches!(
        kind,
        WRITE_EXCLUSIVE_ALL_REGISTRANTS | EXCLUSIVE_ACCESS_ALL_REGISTRANTS
    )
}

fn registrants_only_or_all(kind: u8) -> bool {
    matches!(
        kind,
        WRITE_EXCLUSIVE_REGISTRANTS_ONLY
            | EXCLUSIVE_ACCESS_REGISTRANTS_ONLY
            | WRITE_EXCLUSIVE_ALL_REGISTRANTS
            | EXCLUSIVE_ACCESS_ALL_REGISTRANTS
    )
}

fn exclusive_access(kind: u8) -> bool {
    matches!(
        kind,
        EXCLUSIVE_ACCESS | EXCLUSIVE_ACCESS_REGISTRANTS_ONLY | EXCLUSIVE_ACCESS_ALL_REGISTRANTS
    )
}

fn valid_kind(kind: u8) -> bool {
    matches!(
        kind,
        WRITE_EXCLUSIVE
            | EXCLUSIVE_ACCESS
            | WRITE_EXCLUSIVE_REGISTRANTS_ONLY
            | EXCLUSIVE_ACCESS_REGISTRANTS_ONLY
            | WRITE_EXCLUSIVE_ALL_REGISTRANTS
            | EXCLUSIVE_ACCESS_ALL_REGISTRANTS
    )
}

impl Reservations {
    pub fn any(&self) -> bool {
        self.reservation.is_some() || self.spc2_holder.is_some()
    }

    fn key_of(&self, nexus: u64) -> Option<u64> {
        self.registrations
            .iter()
            .find(|(n, _)| *n == nexus)
            .map(|(_, k)| *k)
    }

    fn is_holder(&self, nexus: u64) -> bool {
        match self.reservation {
            Some(r) if all_registrants(r.kind) => self.key_of(nexus).is_some(),
            Some(r) => r.holder == nexus,
            None => false,
        }
    }

    pub fn reserve_spc2(&mut self, nexus: u64) -> bool {
        if self.reservation.is_some() {
            return false;
        }
        match self.spc2_holder {
            Some(h) if h != nexus => false,
            _ => {
                self.spc2_holder = Some(nexus);
                true
            }
        }
    }

    pub fn release_spc2(&mut self, nexus: u64) {
        if self.spc2_holder == Some(nexus) {
            self.spc2_holder = None;
        }
    }

    pub fn release_spc2_of(&mut self, nexus: u64) {
        self.release_spc2(nexus)
    }

    pub fn clear_spc2(&mut self) {
        self.spc2_holder = None;
    }

    /// Whether a command from `nexus` must end in RESERVATION CONFLICT.
    pub fn conflicts(&self, nexus: u64, opcode: u8, cdb: &[u8], access: Access) -> bool {
        // Commands allowed whatever the reservations (SPC-4 table 109 / SPC-2 5.5.1).
        let always = matches!(opcode, 0x12 | 0xa0 | 0x03 | 0x5e | 0xa3 | 0x25)
            || (opcode == 0x9e && cdb.get(1).map(|b| b & 0x1f) == Some(0x10));
        if let Some(holder) = self.spc2_holder {
            if holder != nexus {
                return !(always || matches!(opcode, 0x17 | 0x57))
                    || (opcode == 0x1e && cdb.get(4).is_some_and(|b| b & 3 != 0));
            }
            return false;
        }
        if matches!(opcode, 0x16 | 0x56) {
            // RESERVE(6/10) while a persistent reservation exists.
            return self.reservation.is_some();
        }
        let Some(r) = self.reservation else {
            return false;
        };
        if always || opcode == 0x5f || opcode == 0x00 {
            return false;
        }
        if self.is_holder(nexus) {
            return false;
        }
        if registrants_only_or_all(r.kind) && self.key_of(nexus).is_some() {
            return false;
        }
        match access {
            Access::Write => true,
            Access::Read => exclusive_access(r.kind),
            Access::None => exclusive_access(r.kind) && matches!(opcode, 0x1a | 0x5a),
        }
    }
}

pub fn persistent_reserve_in(r: &Reservations, _nexus: &Nexus, cdb: &[u8]) -> CmdResult {
    let action = cdb[1] & 0x1f;
    let alloc = be_u(cdb, 7, 2) as usize;
    let mut d = Vec::new();
    match action {
        0x00 => {
            d.extend_from_slice(&r.generation.to_be_bytes());
            d.extend_from_slice(&((r.registrations.len() * 8) as u32).to_be_bytes());
            for (_, key) in &r.registrations {
                d.extend_from_slice(&key.to_be_bytes());
            }
        }
        0x01 => {
            d.extend_from_slice(&r.generation.to_be_bytes());
            match r.reservation {
                Some(res) => {
                    d.extend_from_slice(&16u32.to_be_bytes());
                    let key = if all_registrants(res.kind) {
                        0
                    } else {
                        r.key_of(res.holder).unwrap_or(0)
                    };
                    d.extend_from_slice(&key.to_be_bytes());
                    d.extend_from_slice(&[0, 0, 0, 0, 0, res.kind & 0x0f, 0, 0]);
                }
                None => d.extend_from_slice(&0u32.to_be_bytes()),
            }
        }
        0x02 => {
            d = vec![0u8; 8];
            d[0..2].copy_from_slice(&8u16.to_be_bytes());
            d[2] = 0x10; // CRH: RESERVE/RELEASE(6) conflict with persistent reservations
            d[3] = 0x80 | (0x1 << 4); // TMV, ALLOW COMMANDS = 001b
            d[4] = 0x80 | 0x40 | 0x20 | 0x08 | 0x02;
            d[5] = 0x01;
        }
        0x03 => {
            d.extend_from_slice(&r.generation.to_be_bytes());
            d.extend_from_slice(&0u32.to_be_bytes());
            for (nexus, key) in &r.registrations {
                let mut desc = vec![0u8; 24];
                desc[0..8].copy_from_slice(&key.to_be_bytes());
                if let Some(res) = r.reservation {
                    let holds = if all_registrants(res.kind) {
                        true
                    } else {
                        res.holder == *nexus
                    };
                    if holds {
                        desc[12] = 0x01; // R_HOLDER
                        desc[13] = res.kind & 0x0f;
                    }
                }
                // No TransportID detail: ADDITIONAL DESCRIPTOR LENGTH 0.
                d.extend(desc);
            }
            let len = (d.len() - 8) as u32;
            d[4..8].copy_from_slice(&len.to_be_bytes());
        }
        _ => return Err(bad_field(1)),
    }
    d.truncate(alloc);
    Ok(d)
}

pub fn persistent_reserve_out(
    r: &mut Reservations,
    nexus: &Nexus,
    cdb: &[u8],
    data_out: &[u8],
    attentions: &mut Vec<(u64, Sense)>,
) -> CmdResult {
    let action = cdb[1] & 0x1f;
    let scope = cdb[2] >> 4;
    let kind = cdb[2] & 0x0f;
    let param_len = be_u(cdb, 5, 4) as usize;
    if action > 7 {
        return Err(bad_field(1));
    }
    if action == 7 {
        // REGISTER AND MOVE is not offered (REPORT CAPABILITIES does not list it).
        return Err(bad_field(1));
    }
    if param_len != 24 {
        return Err(sense::PARAMETER_LIST_LENGTH_ERROR.into());
    }
    if data_out.len() < 24 {
        return Err(sense::PARAMETER_LIST_LENGTH_ERROR.into());
    }
    let key = be_u(data_out, 0, 8);
    let sa_key = be_u(data_out, 8, 8);
    let flags = data_out[20];
    if flags & 0x08 != 0 || flags & 0x01 != 0 {
        // SPEC_I_PT and APTPL are not offered.
        return Err(sense::INVALID_FIELD_IN_PARAMETER_LIST.into());
    }
    let me = nexus.id;
    let my_key = r.key_of(me);
    let conflict = Err(Failure::Status(sense::RESERVATION_CONFLICT));
    match action {
        0x00 | 0x06 => {
            if action == 0x00 {
                match my_key {
                    None if key != 0 => return conflict,
                    Some(k) if k != key => return conflict,
                    _ => {}
                }
            }
            if sa_key == 0 {
                if my_key.is_some() {
                    unregister(r, me, attentions);
                    r.generation = r.generation.wrapping_add(1);
                }
            } else {
                match r.registrations.iter_mut().find(|(n, _)| *n == me) {
                    Some(entry) => entry.1 = sa_key,
                    None => r.registrations.push((me, sa_key)),
                }
                r.generation = r.generation.wrapping_add(1);
            }
            Ok(Vec::new())
        }
        0x01 => {
            if my_key != Some(key) {
                return conflict;
            }
            if scope != 0 {
                return Err(bad_field(2));
            }
            if !valid_kind(kind) {
                return Err(bad_field(2));
            }
            match r.reservation {
                None => {
                    r.reservation = Some(Reservation { holder: me, kind });
                    Ok(Vec::new())
                }
                Some(res) if r.is_holder(me) && res.kind == kind => Ok(Vec::new()),
                Some(_) => conflict,
            }
        }
        0x02 => {
            if my_key != Some(key) {
                return conflict;
            }
            let Some(res) = r.reservation else {
                return Ok(Vec::new());
            };
            if !r.is_holder(me) {
                return Ok(Vec::new());
            }
            if scope != 0 || res.kind != kind {
                return Err(sense::INVALID_RELEASE_OF_PERSISTENT_RESERVATION.into());
            }
            r.reservation = None;
            if registrants_only_or_all(res.kind) {
                for (n, _) in &r.registrations {
                    if *n != me {
                        attentions.push((*n, sense::RESERVATIONS_RELEASED));
                    }
                }
            }
            Ok(Vec::new())
        }
        0x03 => {
            if my_key != Some(key) {
                return conflict;
            }
            for (n, _) in &r.registrations {
                if *n != me {
                    attentions.push((*n, sense::RESERVATIONS_PREEMPTED));
                }
            }
            r.registrations.clear();
            r.reservation = None;
            r.generation = r.generation.wrapping_add(1);
            Ok(Vec::new())
        }
        0x04 | 0x05 => {
            if my_key != Some(key) {
                return conflict;
            }
            if scope != 0 || !valid_kind(kind) {
                return Err(bad_field(2));
            }
            match r.reservation {
                Some(res) if all_registrants(res.kind) => {
                    if sa_key == 0 {
                        // Preempt every other registrant and take the reservation.
                        let others: Vec<u64> = r
                            .registrations
                            .iter()
                            .map(|(n, _)| *n)
                            .filter(|n| *n != me)
                            .collect();
                        for n in &others {
                            attentions.push((*n, sense::REGISTRATIONS_PREEMPTED));
                        }
                        r.registrations.retain(|(n, _)| *n == me);
                        r.reservation = Some(Reservation { holder: me, kind });
                    } else {
                        if !r.registrations.iter().any(|(_, k)| *k == sa_key) {
                            return conflict;
                        }
                        remove_key(r, me, sa_key, attentions);
                    }
                }
                Some(res) => {
                    let holder_key = r.key_of(res.holder);
                    if holder_key == Some(sa_key) {
                        remove_key(r, me, sa_key, attentions);
                        r.reservation = Some(Reservation { holder: me, kind });
                        if res.kind != kind || res.holder != me {
                            for (n, _) in &r.registrations {
                                if *n != me && !attentions.iter().any(|(a, _)| a == n) {
                                    attentions.push((*n, sense::RESERVATIONS_RELEASED));
                                }
                            }
                        }
                    } else {
                        if sa_key == 0 {
                            return Err(sense::INVALID_FIELD_IN_PARAMETER_LIST.into());
                        }
                        if !r.registrations.iter().any(|(_, k)| *k == sa_key) {
                            return conflict;
                        }
                        remove_key(r, me, sa_key, attentions);
                    }
                }
                None => {
                    if sa_key == 0 {
                        return Err(sense::INVALID_FIELD_IN_PARAMETER_LIST.into());
                    }
                    if !r.registrations.iter().any(|(_, k)| *k == sa_key) {
                        return conflict;
                    }
                    remove_key(r, me, sa_key, attentions);
                }
            }
            r.generation = r.generation.wrapping_add(1);
            Ok(Vec::new())
        }
        _ => Err(bad_field(1)),
    }
}

/// Removes every other registration holding `key`, with a unit attention for each.
fn remove_key(r: &mut Reservations, me: u64, key: u64, attentions: &mut Vec<(u64, Sense)>) {
    let removed: Vec<u64> = r
        .registrations
        .iter()
        .filter(|(n, k)| *k == key && *n != me)
        .map(|(n, _)| *n)
        .collect();
    for n in &removed {
        attentions.push((*n, sense::REGISTRATIONS_PREEMPTED));
    }
    r.registrations.retain(|(n, k)| !(*k == key && *n != me));
}

/// Unregisters `me`; a holder's (non all-registrants) reservation goes with it.
fn unregister(r: &mut Reservations, me: u64, attentions: &mut Vec<(u64, Sense)>) {
    r.registrations.retain(|(n, _)| *n != me);
    if let Some(res) = r.reservation {
        if all_registrants(res.kind) {
            if r.registrations.is_empty() {
                r.reservation = None;
            }
        } else if res.holder == me {
            r.reservation = None;
            if registrants_only_or_all(res.kind) {
                for (n, _) in &r.registrations {
                    attentions.push((*n, sense::RESERVATIONS_RELEASED));
                }
            }
        }
    }
}

/// The reservation commands as the LUN runs them, under its state lock.
impl Lun {
    /// RESERVE (6/10); third-party reservations are not supported.
    pub(super) fn reserve(&self, nexus: &Nexus, cdb: &[u8]) -> CmdResult {
        if cdb[0] == 0x56 && cdb[1] & 0x12 != 0 {
            return Err(bad_field(1));
        }
        let mut st = self.lock();
        if !st.reservations.reserve_spc2(nexus.id) {
            return Err(Failure::Status(sense::RESERVATION_CONFLICT));
        }
        Ok(Vec::new())
    }

    /// RELEASE (6/10): releases this nexus's SPC-2 reservation, if it holds one.
    pub(super) fn release(&self, nexus: &Nexus) -> CmdResult {
        self.lock().reservations.release_spc2(nexus.id);
        Ok(Vec::new())
    }

    /// PERSISTENT RESERVE IN: see [`persistent_reserve_in`].
    pub(super) fn persistent_reserve_in(&self, nexus: &Nexus, cdb: &[u8]) -> CmdResult {
        let st = self.lock();
        persistent_reserve_in(&st.reservations, nexus, cdb)
    }

    /// PERSISTENT RESERVE OUT: see [`persistent_reserve_out`]; the unit attentions it raises are
    /// queued for the nexuses they are meant for.
    pub(super) fn persistent_reserve_out(
        &self,
        nexus: &Nexus,
        cdb: &[u8],
        data_out: &[u8],
    ) -> CmdResult {
        let mut st = self.lock();
        let st = &mut *st;
        let mut attentions = Vec::new();
        let r = persistent_reserve_out(&mut st.reservations, nexus, cdb, data_out, &mut attentions);
        for (id, s) in attentions {
            st.unit_attentions.entry(id).or_default().push_back(s);
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::super::sense;
    use super::super::testing::*;
    use super::super::Lun;
    use super::WRITE_EXCLUSIVE;

    fn persistent_reserve_in(action: u8) -> Vec<u8> {
        cdb10(0x5e, action, 0, 255)
    }

    /// PERSISTENT RESERVE OUT with its 24-byte parameter list.
    fn persistent_reserve_out(
        action: u8,
        kind: u8,
        key: u64,
        action_key: u64,
    ) -> (Vec<u8>, Vec<u8>) {
        let cdb = vec![0x5f, action, kind, 0, 0, 0, 0, 0, 24, 0];
        let mut parameters = key.to_be_bytes().to_vec();
        parameters.extend_from_slice(&action_key.to_be_bytes());
        parameters.extend_from_slice(&[0; 8]);
        (cdb, parameters)
    }

    fn read10() -> Vec<u8> {
        cdb10(0x28, 0, 0, 1)
    }

    fn write10() -> Vec<u8> {
        cdb10(0x2a, 0, 0, 1)
    }

    /// SPC-2 RESERVE (6): another nexus gets RESERVATION CONFLICT for medium access but not for
    /// INQUIRY; RELEASE (or the holder's nexus going away) frees the unit.
    #[test]
    fn reserve_and_release() {
        let lun = Lun::new(memory());
        let conflict = status(sense::RESERVATION_CONFLICT);
        let steps: Vec<NexusRow> = vec![
            (
                1,
                "RESERVE (6)",
                cdb6(0x16, 0, 0, 0, 0),
                vec![],
                good_empty(),
            ),
            (
                1,
                "RESERVE (6) again by the holder",
                cdb6(0x16, 0, 0, 0, 0),
                vec![],
                good_empty(),
            ),
            (
                2,
                "READ (10) by another nexus",
                read10(),
                vec![],
                conflict.clone(),
            ),
            (
                2,
                "INQUIRY by another nexus",
                cdb6(0x12, 0, 0, 0, 36),
                vec![],
                good().len(36),
            ),
            (
                2,
                "RESERVE (10) by another nexus",
                cdb10(0x56, 0, 0, 0),
                vec![],
                conflict.clone(),
            ),
            (
                1,
                "READ (10) by the holder",
                read10(),
                vec![],
                good().len(512),
            ),
            (
                2,
                "RELEASE (6) by another nexus: no effect",
                cdb6(0x17, 0, 0, 0, 0),
                vec![],
                good_empty(),
            ),
            (
                1,
                "RELEASE (10) by the holder",
                cdb10(0x57, 0, 0, 0),
                vec![],
                good_empty(),
            ),
            (
                2,
                "READ (10) once released",
                read10(),
                vec![],
                good().len(512),
            ),
        ];
        in_order_by(&lun, &steps);
        check_as(
            &lun,
            2,
            0,
            "RESERVE (6) by nexus 2",
            &cdb6(0x16, 0, 0, 0, 0),
            &[],
            &good_empty(),
        );
        lun.nexus_lost(&nexus(2));
        check(
            &lun,
            "READ (10) after the holder's nexus is gone",
            &read10(),
            &[],
            &good().len(512),
        );
        check(
            &lun,
            "RESERVE (10) third-party",
            &cdb10(0x56, 0x10, 0, 0),
            &[],
            &bad_field_at(1),
        );
    }

    /// Persistent reservations through the LUN: registration, a WRITE EXCLUSIVE reservation
    /// that stops other nexuses' writes but not their reads, the keys and reservation reported,
    /// and CLEAR queueing a unit attention for the other registrant.
    #[test]
    fn persistent_reservations() {
        let lun = Lun::new(memory());
        let (register, register_1) = persistent_reserve_out(0x00, 0, 0, 0x1111);
        let (_, register_2) = persistent_reserve_out(0x00, 0, 0, 0x2222);
        let (reserve, reserve_1) = persistent_reserve_out(0x01, WRITE_EXCLUSIVE, 0x1111, 0);
        let (release, release_1) = persistent_reserve_out(0x02, WRITE_EXCLUSIVE, 0x1111, 0);
        let (clear, clear_1) = persistent_reserve_out(0x03, 0, 0x1111, 0);
        let conflict = status(sense::RESERVATION_CONFLICT);
        let data = pattern(1, 1);
        let mut keys = vec![0, 0, 0, 2, 0, 0, 0, 16];
        keys.extend_from_slice(&0x1111u64.to_be_bytes());
        keys.extend_from_slice(&0x2222u64.to_be_bytes());
        let mut reservation = vec![0, 0, 0, 2, 0, 0, 0, 16];
        reservation.extend_from_slice(&0x1111u64.to_be_bytes());
        reservation.extend_from_slice(&[0, 0, 0, 0, 0, WRITE_EXCLUSIVE, 0, 0]);
        let steps: Vec<NexusRow> = vec![
            (
                1,
                "register nexus 1",
                register.clone(),
                register_1,
                good_empty(),
            ),
            (
                2,
                "register nexus 2",
                register.clone(),
                register_2,
                good_empty(),
            ),
            (
                2,
                "READ KEYS",
                persistent_reserve_in(0x00),
                vec![],
                good_data(keys),
            ),
            (
                1,
                "reserve WRITE EXCLUSIVE",
                reserve.clone(),
                reserve_1.clone(),
                good_empty(),
            ),
            (
                2,
                "READ RESERVATION",
                persistent_reserve_in(0x01),
                vec![],
                good_data(reservation),
            ),
            (
                2,
                "WRITE by the other nexus",
                write10(),
                data.clone(),
                conflict.clone(),
            ),
            (
                2,
                "READ by the other nexus",
                read10(),
                vec![],
                good().len(512),
            ),
            (
                1,
                "WRITE by the holder",
                write10(),
                data.clone(),
                good_empty(),
            ),
            (1, "release", release, release_1, good_empty()),
            (
                2,
                "WRITE once released",
                write10(),
                data.clone(),
                good_empty(),
            ),
            (1, "reserve again", reserve, reserve_1, good_empty()),
            (1, "CLEAR", clear, clear_1, good_empty()),
            (
                2,
                "the other registrant learns of it",
                cdb6(0x00, 0, 0, 0, 0),
                vec![],
                check_condition(sense::RESERVATIONS_PREEMPTED),
            ),
        ];
        in_order_by(&lun, &steps);
        check(
            &lun,
            "PERSISTENT RESERVE IN with an unknown service action",
            &persistent_reserve_in(0x04),
            &[],
            &bad_field_at(1),
        );
    }
}
