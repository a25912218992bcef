//! Arbitrary login text through the key=value parser and the negotiator, then as the data of a
//! real login request to the connection core: nothing may panic, and negotiated values stay
//! within the RFC's bounds.
#![no_main]

use std::sync::Arc;

use cairn_blockstore::iscsi::connection::{Connection, PortalInfo};
use cairn_blockstore::iscsi::target::Registry;
use cairn_blockstore::iscsi::text::{parse_pairs, Negotiation};
use cairn_blockstore::iscsi::wire::{InitiatorPdu, LoginRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(pairs) = parse_pairs(data) {
        let mut n = Negotiation::default();
        for (k, v) in &pairs {
            let _ = n.answer(k, v, false);
        }
        let p = &n.params;
        assert!(p.initiator_max_recv_data_segment_length >= 512);
        assert!(p.first_burst_length <= p.max_burst_length.max(512));
        assert_eq!(p.error_recovery_level, 0);
    }
    let registry = Arc::new(Registry::default());
    let mut conn = Connection::new(
        registry,
        PortalInfo {
            addresses: vec![],
            portal_group_tag: 1,
        },
        [3; 16],
    );
    let stage = data.first().copied().unwrap_or(0);
    let req = LoginRequest {
        transit: stage & 0x80 != 0,
        continue_: stage & 0x40 != 0,
        current_stage: (stage >> 2) & 3,
        next_stage: stage & 3,
        version_max: 0,
        version_min: 0,
        isid: [0x80, 0, 0, 0, 0, 1],
        tsih: 0,
        itt: 1,
        cid: 0,
        cmd_sn: 0,
        exp_stat_sn: 0,
        data: data.iter().copied().take(8192).collect(),
    };
    conn.handle_bytes(&InitiatorPdu::Login(req).to_pdu().encode(false, false));
    while conn.poll_transmit().is_some() {}
});
