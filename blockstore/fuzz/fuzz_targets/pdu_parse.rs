//! Arbitrary bytes through the PDU framer and typer, and through a logged-in connection core:
//! nothing may panic, and every framed PDU re-encodes to the bytes it came from.
#![no_main]

use std::sync::Arc;

use cairn_blockstore::device::{BlockDevice, DeviceError};
use cairn_blockstore::iscsi::connection::{Connection, Event, PortalInfo};
use cairn_blockstore::iscsi::target::{Registry, TargetConfig};
use cairn_blockstore::iscsi::wire::{Decoded, FrameDecoder, InitiatorPdu};
use libfuzzer_sys::fuzz_target;

struct Zeros;
impl BlockDevice for Zeros {
    fn block_size_bytes(&self) -> u32 {
        512
    }
    fn block_count(&self) -> u64 {
        2048
    }
    fn unique_id(&self) -> [u8; 16] {
        [7; 16]
    }
    fn read(&self, _lba: u64, buffer: &mut [u8]) -> Result<(), DeviceError> {
        buffer.fill(0);
        Ok(())
    }
    fn write(&self, _lba: u64, _data: &[u8], _fua: bool) -> Result<(), DeviceError> {
        Ok(())
    }
    fn unmap(&self, _lba: u64, _blocks: u64) -> Result<(), DeviceError> {
        Ok(())
    }
    fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let decoder = FrameDecoder {
        header_digest: flags & 1 != 0,
        data_digest: flags & 2 != 0,
        data_segment_len_max: 1 << 16,
    };
    let mut at = 0;
    while at < rest.len() {
        match decoder.decode(&rest[at..]) {
            Ok(Decoded::Pdu(pdu, used)) => {
                let again = pdu.encode(decoder.header_digest, decoder.data_digest);
                // Re-encoding canonicalises padding bytes only.
                assert_eq!(again.len(), used);
                let _ = InitiatorPdu::parse(pdu);
                at += used;
            }
            _ => break,
        }
    }
    // The whole connection core on the same bytes.
    let registry = Arc::new(Registry::default());
    let _ = registry.add_target(
        "iqn.2026-11.org.cairn:client.000000000001",
        Arc::new(Zeros),
        TargetConfig::default(),
    );
    let mut conn = Connection::new(
        registry,
        PortalInfo {
            addresses: vec!["127.0.0.1:3260,1".into()],
            portal_group_tag: 1,
        },
        [1; 16],
    );
    conn.handle_bytes(rest);
    while let Some(event) = conn.poll_event() {
        if let Event::Execute(c) = event {
            let result = c.target.lun.execute(&c.nexus, c.lun, &c.cdb, &c.data_out);
            conn.handle_command_complete(c.itt, result);
        }
    }
    while conn.poll_transmit().is_some() {}
});
