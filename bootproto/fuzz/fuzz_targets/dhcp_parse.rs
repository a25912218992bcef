//! DHCP: the strict pre-parse plus dhcproto, and the whole decision core, on arbitrary bytes.
//! Run: `cd bootproto/fuzz && cargo +nightly fuzz run dhcp_parse`.
#![no_main]

use std::net::{Ipv4Addr, SocketAddrV4};

use cairn_bootproto::dhcp::core::{DhcpCore, Packet};
use cairn_bootproto::dhcp::{wire, ClientLookup, ClientStatus, DhcpConfig, PoolConfig};
use cairn_bootproto::MacAddr;
use libfuzzer_sys::fuzz_target;

struct Everyone;
impl ClientLookup for Everyone {
    fn client(&self, _mac: MacAddr) -> ClientStatus {
        ClientStatus::Registered
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = wire::parse(data);
    let pool = PoolConfig::new(Ipv4Addr::new(10, 0, 0, 0), 24, Ipv4Addr::new(10, 0, 0, 10), Ipv4Addr::new(10, 0, 0, 20));
    for config in [DhcpConfig::full(Ipv4Addr::new(10, 0, 0, 1), pool, "http://10.0.0.1/boot"), DhcpConfig::proxy(Ipv4Addr::new(10, 0, 0, 1), "http://10.0.0.1/boot")] {
        let mut core = DhcpCore::new(config).expect("valid config");
        core.handle_leadership(1, &[]);
        for port in [67, 4011] {
            let outcome = core.handle_packet(0, Packet { bytes: data, source: SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 50), 68), local_port: port }, &Everyone);
            if let cairn_bootproto::dhcp::core::Decision::Reply(reply) = outcome.decision {
                let _ = reply.encode();
            }
        }
    }
});
