//! TFTP: packet parsing, re-encoding round trip, filename checks and option negotiation on
//! arbitrary bytes. Run: `cd bootproto/fuzz && cargo +nightly fuzz run tftp_parse`.
#![no_main]

use std::time::Instant;

use cairn_bootproto::tftp::transfer::{check_filename, ReadTransfer, TransferLimits};
use cairn_bootproto::tftp::wire::{self, Packet};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(packet) = wire::parse(data) else { return };
    let again = wire::parse(&wire::encode(&packet)).expect("an encoded packet parses");
    assert_eq!(again, packet);
    if let Packet::Rrq { filename, options, .. } = &packet {
        let _ = check_filename(filename);
        let now = Instant::now();
        if let Ok(mut transfer) = ReadTransfer::start(options, 100_000, &TransferLimits::default(), now) {
            for block in 0..4u16 {
                while transfer.poll_transmit().is_some() {}
                transfer.handle_ack(now, block);
            }
        }
    }
});
