//! Unit tests of the mirror cores: a primary and a standby joined by a lossless or lossy
//! in-memory link, with in-memory copies of a small layer as their shells' storage.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;

const BLOCKS: u64 = 600; // three regions, the last one short

/// One copy of a layer, as the shells see it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Copy {
    blocks: Vec<BlockDigest>,
    data: Vec<Option<u8>>,
    flushes: u64,
}

impl Copy {
    fn new() -> Copy {
        Copy {
            blocks: vec![BlockDigest::Base; BLOCKS as usize],
            data: vec![None; BLOCKS as usize],
            flushes: 0,
        }
    }

    fn write(&mut self, block: u64, fill: u8) {
        self.blocks[block as usize] = BlockDigest::of_layer_block(&[fill; 4096]);
        self.data[block as usize] = Some(fill);
    }

    fn apply(&mut self, operation: &Operation) {
        match operation {
            Operation::Write { first_block, data } => {
                for (index, block) in data.chunks(4096).enumerate() {
                    self.write(first_block + index as u64, block[0]);
                }
            }
            Operation::Unmap {
                first_block,
                block_count,
            } => {
                for block in *first_block..first_block + block_count {
                    self.blocks[block as usize] = BlockDigest::Unmapped;
                    self.data[block as usize] = None;
                }
            }
            Operation::Discard {
                first_block,
                block_count,
            } => {
                for block in *first_block..first_block + block_count {
                    self.blocks[block as usize] = BlockDigest::Base;
                    self.data[block as usize] = None;
                }
            }
            Operation::Flush | Operation::Digest { .. } => {}
        }
    }

    fn region(&self, region: u64) -> &[BlockDigest] {
        let first = (region * REGION_BLOCKS) as usize;
        let count = region_blocks(BLOCKS, region) as usize;
        &self.blocks[first..first + count]
    }
}

fn write(block: u64, fill: u8) -> Operation {
    Operation::Write {
        first_block: block,
        data: Bytes::from(vec![fill; 4096]),
    }
}

struct Pair {
    now: Instant,
    primary: Primary,
    standby: Standby,
    local: Copy,
    remote: Copy,
    /// Drops every message to the standby while set.
    cut: bool,
    primary_events: Vec<PrimaryEvent>,
    standby_events: Vec<StandbyEvent>,
}

impl Pair {
    fn new(sync: StandbySync) -> Pair {
        Pair::with_config(sync, MirrorConfig::default())
    }

    fn with_config(sync: StandbySync, config: MirrorConfig) -> Pair {
        let now = Instant::now();
        let volume = VolumeId([1; 16]);
        Pair {
            now,
            primary: Primary::new(now, volume, 1, 11, Some(sync), config.clone()),
            standby: Standby::new(now, volume, 1, 22, false, config),
            local: Copy::new(),
            remote: Copy::new(),
            cut: false,
            primary_events: Vec::new(),
            standby_events: Vec::new(),
        }
    }

    /// The primary's shell: apply locally, then submit.
    fn submit(&mut self, operation: Operation) -> Ticket {
        self.local.apply(&operation);
        self.primary
            .submit(self.now, operation)
            .expect("room in the stream")
    }

    /// Moves messages both ways and runs both shells until nothing moves.
    fn pump(&mut self) {
        loop {
            let mut moved = false;
            while let Some(message) = self.primary.poll_transmit(self.now) {
                moved = true;
                let bytes = message.encode();
                if !self.cut {
                    let decoded = Message::decode(bytes).expect("decodes");
                    self.standby.handle_message(self.now, decoded);
                }
            }
            while let Some(action) = self.standby.poll_action() {
                moved = true;
                match action {
                    StandbyAction::Apply { seq, operation } => {
                        self.remote.apply(&operation);
                        self.standby.handle_applied(seq, Ok(()));
                    }
                    StandbyAction::Flush { seq } => {
                        self.remote.flushes += 1;
                        self.standby.handle_applied(seq, Ok(()));
                        self.standby.handle_flushed(seq, Ok(()));
                    }
                    StandbyAction::Digest { seq, region } => {
                        let digest = RegionDigest {
                            blocks: self.remote.region(region).to_vec(),
                        };
                        self.standby.handle_digest(seq, region, digest);
                    }
                }
            }
            while let Some(message) = self.standby.poll_transmit() {
                moved = true;
                if !self.cut {
                    let decoded = Message::decode(message.encode()).expect("decodes");
                    self.primary.handle_message(self.now, decoded);
                }
            }
            while let Some(event) = self.primary.poll_event() {
                moved = true;
                match event {
                    PrimaryEvent::ResyncCompare { region, standby } => {
                        let first = region * REGION_BLOCKS;
                        let local = self.local.region(region).to_vec();
                        let mut bytes = 0;
                        for difference in region_differences(first, &local, &standby, 64) {
                            let operation = match difference {
                                Difference::Write {
                                    first_block,
                                    block_count,
                                } => {
                                    let mut data = Vec::new();
                                    for block in first_block..first_block + block_count {
                                        let fill = self.local.data[block as usize].expect("data");
                                        data.extend_from_slice(&[fill; 4096]);
                                    }
                                    bytes += data.len() as u64;
                                    Operation::Write {
                                        first_block,
                                        data: Bytes::from(data),
                                    }
                                }
                                Difference::Unmap {
                                    first_block,
                                    block_count,
                                } => Operation::Unmap {
                                    first_block,
                                    block_count,
                                },
                                Difference::Discard {
                                    first_block,
                                    block_count,
                                } => Operation::Discard {
                                    first_block,
                                    block_count,
                                },
                            };
                            self.primary
                                .submit_resync(self.now, operation)
                                .expect("mirrored");
                        }
                        self.primary.handle_region_compared(self.now, region, bytes);
                    }
                    other => self.primary_events.push(other),
                }
            }
            while let Some(event) = self.standby.poll_event() {
                moved = true;
                self.standby_events.push(event);
            }
            if !moved {
                return;
            }
        }
    }

    /// Advances time by `step`, running timeouts and pumping.
    fn advance(&mut self, step: Duration) {
        self.now += step;
        self.primary.handle_timeout(self.now);
        self.standby.handle_timeout(self.now);
        self.pump();
    }
}

#[test]
fn a_write_is_acknowledged_only_once_the_standby_applied_it() {
    let mut pair = Pair::new(StandbySync::InSync);
    pair.cut = true;
    let ticket = pair.submit(write(3, 0xaa));
    pair.pump();
    assert_eq!(pair.primary.is_complete(ticket), Ok(false));
    pair.cut = false;
    pair.advance(Duration::from_millis(400)); // the retransmit timeout resends it
    assert_eq!(pair.primary.is_complete(ticket), Ok(true));
    assert_eq!(pair.remote.blocks[3], pair.local.blocks[3]);
    assert_eq!(pair.primary.in_flight_bytes(), 0);
}

#[test]
fn a_flush_completes_only_when_durable_on_the_standby() {
    let mut pair = Pair::new(StandbySync::InSync);
    let written = pair.submit(write(1, 1));
    let flush = pair.primary.submit(pair.now, Operation::Flush).unwrap();
    // The standby applies both, but has not reported the flush durable yet.
    while let Some(message) = pair.primary.poll_transmit(pair.now) {
        pair.standby.handle_message(pair.now, message);
    }
    let mut flush_seq = None;
    while let Some(action) = pair.standby.poll_action() {
        match action {
            StandbyAction::Apply { seq, operation } => {
                pair.remote.apply(&operation);
                pair.standby.handle_applied(seq, Ok(()));
            }
            StandbyAction::Flush { seq } => {
                pair.standby.handle_applied(seq, Ok(()));
                flush_seq = Some(seq);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    while let Some(message) = pair.standby.poll_transmit() {
        pair.primary.handle_message(pair.now, message);
    }
    assert_eq!(pair.primary.is_complete(written), Ok(true));
    assert_eq!(pair.primary.is_complete(flush), Ok(false));
    pair.standby.handle_flushed(flush_seq.unwrap(), Ok(()));
    pair.pump();
    assert_eq!(pair.primary.is_complete(flush), Ok(true));
}

#[test]
fn the_standby_applies_in_order_and_drops_a_gap_until_it_is_filled() {
    let now = Instant::now();
    let volume = VolumeId([1; 16]);
    let mut standby = Standby::new(now, volume, 4, 22, false, MirrorConfig::default());
    let operation = |seq: u64| Message::Operation {
        volume,
        generation: 4,
        incarnation: 11,
        seq,
        stamp: seq,
        operation: write(seq, seq as u8),
    };
    standby.handle_message(now, operation(2)); // a gap: 1 is missing
    assert_eq!(standby.poll_action(), None);
    standby.handle_message(now, operation(1));
    standby.handle_message(now, operation(1)); // a duplicate
    standby.handle_message(now, operation(2));
    let mut applied = Vec::new();
    while let Some(StandbyAction::Apply { seq, .. }) = standby.poll_action() {
        standby.handle_applied(seq, Ok(()));
        applied.push(seq);
    }
    assert_eq!(applied, vec![1, 2]);
    match standby.poll_transmit() {
        Some(Message::Ack { applied, .. }) => assert_eq!(applied, 2),
        other => panic!("expected an ack, got {other:?}"),
    }
}

#[test]
fn an_older_generation_is_refused_and_fences_its_primary() {
    let now = Instant::now();
    let volume = VolumeId([1; 16]);
    let config = MirrorConfig::default();
    let mut primary = Primary::new(
        now,
        volume,
        3,
        11,
        Some(StandbySync::InSync),
        config.clone(),
    );
    let mut standby = Standby::new(now, volume, 5, 22, false, config);
    let ticket = primary.submit(now, write(0, 9)).unwrap();
    while let Some(message) = primary.poll_transmit(now) {
        standby.handle_message(now, message);
    }
    assert_eq!(
        standby.poll_action(),
        None,
        "nothing of generation 3 is applied"
    );
    while let Some(message) = standby.poll_transmit() {
        assert!(matches!(
            message,
            Message::Refused {
                reason: RefusedReason::Fenced,
                current: 5,
                ..
            }
        ));
        primary.handle_message(now, message);
    }
    assert_eq!(
        primary.poll_event(),
        Some(PrimaryEvent::Fenced { current: 5 })
    );
    assert_eq!(
        primary.is_complete(ticket),
        Err(SubmitError::Fenced {
            held: 3,
            current: 5
        })
    );
    assert!(primary.submit(now, write(0, 1)).is_err());
    assert!(!primary.can_read(now));
}

#[test]
fn a_silent_standby_is_reported_and_writes_wait_for_the_committed_drop() {
    let mut pair = Pair::new(StandbySync::InSync);
    pair.pump();
    pair.cut = true;
    let ticket = pair.submit(write(7, 7));
    for _ in 0..8 {
        pair.advance(Duration::from_millis(100));
    }
    assert!(pair
        .primary_events
        .contains(&PrimaryEvent::StandbyUnreachable {
            generation: 1,
            reason: UnreachableReason::Silent
        }));
    // Never acknowledged alone before the drop is committed, however long it takes.
    for _ in 0..50 {
        pair.advance(Duration::from_millis(100));
        assert_eq!(pair.primary.is_complete(ticket), Ok(false));
    }
    pair.primary.handle_standby_dropped(2);
    assert_eq!(pair.primary.is_complete(ticket), Ok(true));
    assert!(pair.primary.is_alone());
    let alone = pair.primary.submit(pair.now, write(8, 8)).unwrap();
    assert_eq!(pair.primary.is_complete(alone), Ok(true));
    assert!(pair.primary.can_read(pair.now));
}

#[test]
fn a_primary_reads_only_within_its_lease_and_a_promoted_standby_waits_it_out() {
    let mut pair = Pair::new(StandbySync::InSync);
    assert!(
        !pair.primary.can_read(pair.now),
        "no lease before the first ack"
    );
    pair.pump();
    assert!(pair.primary.can_read(pair.now));
    let lease_until = pair.primary.lease_until().unwrap();
    // The primary is cut off: its lease runs out, the standby reports it silent.
    pair.cut = true;
    let cut_at = pair.now;
    for _ in 0..20 {
        pair.advance(Duration::from_millis(50));
    }
    assert!(!pair.primary.can_read(pair.now));
    assert!(pair
        .standby_events
        .contains(&StandbyEvent::PrimarySilent { generation: 1 }));
    let serve_at = pair.standby.promote(pair.now);
    assert!(
        serve_at >= lease_until,
        "the new primary serves after the old lease"
    );
    assert!(serve_at >= cut_at + MirrorConfig::default().lease - Duration::from_millis(1));
}

#[test]
fn a_new_standby_counts_as_having_granted_a_lease() {
    let now = Instant::now();
    let config = MirrorConfig::default();
    let mut standby = Standby::new(now, VolumeId([1; 16]), 1, 22, false, config.clone());
    assert_eq!(standby.promote(now), now + config.lease);
}

#[test]
fn in_flight_bytes_are_bounded() {
    let now = Instant::now();
    let config = MirrorConfig {
        in_flight_bytes_max: 3 * 4096,
        ..MirrorConfig::default()
    };
    let mut primary = Primary::new(
        now,
        VolumeId([1; 16]),
        1,
        11,
        Some(StandbySync::InSync),
        config,
    );
    for block in 0..3 {
        primary.submit(now, write(block, 1)).unwrap();
    }
    assert_eq!(primary.submit(now, write(3, 1)), Err(SubmitError::Full));
    // A flush carries no data and always fits.
    assert!(primary.submit(now, Operation::Flush).is_ok());
}

#[test]
fn a_standby_whose_storage_fails_is_reported_at_once() {
    let mut pair = Pair::new(StandbySync::InSync);
    pair.local.apply(&write(2, 2));
    pair.primary.submit(pair.now, write(2, 2)).unwrap();
    while let Some(message) = pair.primary.poll_transmit(pair.now) {
        pair.standby.handle_message(pair.now, message);
    }
    while let Some(action) = pair.standby.poll_action() {
        if let StandbyAction::Apply { seq, .. } = action {
            pair.standby
                .handle_applied(seq, Err("no space left on device".into()));
        }
    }
    pair.pump();
    assert_eq!(
        pair.standby_events,
        vec![StandbyEvent::StorageFailed { seq: 1 }]
    );
    assert!(pair
        .primary_events
        .contains(&PrimaryEvent::StandbyUnreachable {
            generation: 1,
            reason: UnreachableReason::Failed
        }));
}

#[test]
fn a_fresh_standby_is_resynced_while_writes_go_on() {
    let mut pair = Pair::new(StandbySync::Fresh {
        block_count: BLOCKS,
    });
    // The primary's layer before the standby came.
    for block in (0..BLOCKS).step_by(7) {
        pair.local.write(block, block as u8);
    }
    for block in 300..310 {
        pair.local.apply(&Operation::Unmap {
            first_block: block,
            block_count: 1,
        });
    }
    // Resync and new writes interleave.
    let mut written = Vec::new();
    for round in 0..20u64 {
        written.push(pair.submit(write((round * 31) % BLOCKS, 0xf0 + round as u8)));
        pair.advance(Duration::from_millis(10));
    }
    for _ in 0..10 {
        pair.advance(Duration::from_millis(100));
    }
    assert!(pair
        .primary_events
        .contains(&PrimaryEvent::ResyncComplete { generation: 1 }));
    assert_eq!(pair.local.blocks, pair.remote.blocks);
    assert!(pair.remote.flushes >= 1, "a resync ends durable");
    for ticket in written {
        assert_eq!(pair.primary.is_complete(ticket), Ok(true));
    }
    let progress = pair.primary.resync_progress(pair.now).unwrap();
    assert_eq!(progress.regions_done, progress.regions_total);
    pair.primary.handle_resync_recorded();
    assert!(!pair.primary.is_resyncing());
}

/// A resync's data is submitted under a region's stripes and cannot wait for room, so the
/// primary hands out a region only while less than half of the stream's room is in flight: the
/// other half stays for the client's writes, and the copy follows the acknowledgements.
#[test]
fn a_resync_leaves_half_of_the_stream_to_the_clients_writes() {
    let config = MirrorConfig {
        // Half of it is one full region (256 blocks of 4 KiB).
        in_flight_bytes_max: 2 << 20,
        ..MirrorConfig::default()
    };
    let mut pair = Pair::with_config(
        StandbySync::Fresh {
            block_count: BLOCKS,
        },
        config,
    );
    for block in 0..BLOCKS {
        pair.local.write(block, block as u8);
    }
    pair.cut = true;
    pair.advance(Duration::from_millis(10));
    let progress = pair.primary.resync_progress(pair.now).unwrap();
    assert_eq!(
        (progress.regions_done, pair.primary.in_flight_bytes()),
        (1, 1 << 20),
        "with no acknowledgement, one region's copy fills the resync's half"
    );
    // A client's write still has room.
    pair.submit(write(5, 0xaa));
    pair.cut = false;
    for _ in 0..10 {
        pair.advance(Duration::from_millis(400));
    }
    assert!(pair
        .primary_events
        .contains(&PrimaryEvent::ResyncComplete { generation: 1 }));
    assert_eq!(pair.local.blocks, pair.remote.blocks);
}

/// While its standby is resynced (and so cannot be promoted) the primary answers alone: a
/// client's flush does not wait behind the resync's data. Once the resync's final flush is in
/// the stream, operations wait for the standby again.
#[test]
fn a_resyncing_standby_does_not_hold_the_clients_operations() {
    let mut pair = Pair::new(StandbySync::Fresh {
        block_count: BLOCKS,
    });
    for block in 0..BLOCKS {
        pair.local.write(block, 1);
    }
    let write_ticket = pair.submit(write(5, 0x77));
    let flush_ticket = pair.submit(Operation::Flush);
    // Nothing has reached the standby yet, and both are complete.
    assert_eq!(pair.primary.is_complete(write_ticket), Ok(true));
    assert_eq!(pair.primary.is_complete(flush_ticket), Ok(true));
    for _ in 0..20 {
        pair.advance(Duration::from_millis(100));
    }
    assert!(pair
        .primary_events
        .contains(&PrimaryEvent::ResyncComplete { generation: 1 }));
    assert_eq!(
        pair.local.blocks, pair.remote.blocks,
        "the standby holds them"
    );
    // After the final flush: the standby again holds each operation before it completes.
    let after = pair.submit(write(6, 0x78));
    assert_eq!(pair.primary.is_complete(after), Ok(false));
    pair.advance(Duration::from_millis(50));
    assert_eq!(pair.primary.is_complete(after), Ok(true));
}

#[test]
fn a_returning_copy_gets_only_what_differs() {
    let mut pair = Pair::new(StandbySync::Compare {
        block_count: BLOCKS,
    });
    for block in 0..BLOCKS {
        pair.local.write(block, 1);
        pair.remote.write(block, 1);
    }
    // What changed while the standby was away, and a write only it has (it was primary and
    // died before the write was acknowledged).
    pair.local.write(10, 2);
    pair.local.apply(&Operation::Unmap {
        first_block: 20,
        block_count: 2,
    });
    pair.local.apply(&Operation::Discard {
        first_block: 500,
        block_count: 1,
    });
    pair.remote.write(400, 9);
    pair.local.write(400, 1);
    for _ in 0..10 {
        pair.advance(Duration::from_millis(100));
    }
    assert_eq!(pair.local.blocks, pair.remote.blocks);
    let progress = pair.primary.resync_progress(pair.now).unwrap();
    assert_eq!(progress.bytes_copied, 2 * 4096, "blocks 10 and 400 only");
}

#[test]
fn lost_digests_are_asked_for_again() {
    let mut pair = Pair::new(StandbySync::Compare {
        block_count: BLOCKS,
    });
    pair.local.write(5, 5);
    // The first digest requests reach the standby, but their answers are lost.
    while let Some(message) = pair.primary.poll_transmit(pair.now) {
        pair.standby.handle_message(pair.now, message);
    }
    while let Some(action) = pair.standby.poll_action() {
        match action {
            StandbyAction::Digest { seq, .. } => pair.standby.handle_applied(seq, Ok(())),
            other => panic!("unexpected {other:?}"),
        }
    }
    pair.pump();
    for _ in 0..10 {
        pair.advance(Duration::from_millis(100));
    }
    assert_eq!(pair.local.blocks, pair.remote.blocks);
    assert!(pair
        .primary_events
        .contains(&PrimaryEvent::ResyncComplete { generation: 1 }));
}

#[test]
fn region_differences_are_runs_of_one_fix() {
    let a = BlockDigest::of_layer_block(&[1; 4096]);
    let b = BlockDigest::of_layer_block(&[2; 4096]);
    let check = |local: Vec<BlockDigest>, standby: Vec<BlockDigest>, expect: Vec<Difference>| {
        let got = region_differences(100, &local, &RegionDigest { blocks: standby }, 2);
        assert_eq!(got, expect, "local {local:?}");
    };
    use BlockDigest::{Base, Unmapped};
    check(vec![a, a], vec![a, a], vec![]);
    check(
        vec![a, b, a],
        vec![Base, Base, Base],
        vec![
            Difference::Write {
                first_block: 100,
                block_count: 2,
            },
            Difference::Write {
                first_block: 102,
                block_count: 1,
            },
        ],
    );
    check(
        vec![Unmapped, Unmapped, Base, Base],
        vec![a, Unmapped, a, b],
        vec![
            Difference::Unmap {
                first_block: 100,
                block_count: 1,
            },
            Difference::Discard {
                first_block: 102,
                block_count: 2,
            },
        ],
    );
}

#[test]
fn a_restarted_standby_refuses_its_old_stream_and_is_dropped() {
    let mut pair = Pair::new(StandbySync::InSync);
    let first = pair.submit(write(1, 1));
    pair.pump();
    assert_eq!(pair.primary.is_complete(first), Ok(true));
    // The standby's node restarts: its new core for the same generation knows it lost the
    // stream's start, refuses it, and never asks for a failover.
    pair.standby = Standby::new(
        pair.now,
        VolumeId([1; 16]),
        1,
        23,
        true,
        MirrorConfig::default(),
    );
    let second = pair.submit(write(2, 2));
    for _ in 0..20 {
        pair.advance(Duration::from_millis(100));
    }
    assert_eq!(pair.primary.is_complete(second), Ok(false));
    assert!(pair
        .primary_events
        .contains(&PrimaryEvent::StandbyUnreachable {
            generation: 1,
            reason: UnreachableReason::Failed
        }));
    assert!(pair.standby_events.is_empty(), "{:?}", pair.standby_events);
}

#[test]
fn a_restarted_primary_loses_its_stream_and_a_new_standby_core_is_told_by_its_acks() {
    let mut pair = Pair::new(StandbySync::InSync);
    pair.submit(write(1, 1));
    pair.pump();
    // The primary's node restarts and starts a new stream in the same generation: the standby
    // sees another incarnation and refuses.
    pair.primary = Primary::new(
        pair.now,
        VolumeId([1; 16]),
        1,
        12,
        Some(StandbySync::InSync),
        MirrorConfig::default(),
    );
    let ticket = pair.submit(write(2, 2));
    pair.advance(Duration::from_millis(10));
    assert_eq!(pair.primary.is_complete(ticket), Ok(false));
    assert!(pair.standby.is_lost());
    assert!(pair
        .primary_events
        .contains(&PrimaryEvent::StandbyUnreachable {
            generation: 1,
            reason: UnreachableReason::Failed
        }));
}
