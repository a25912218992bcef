//! Decision-core tests: each case feeds requests to a fresh core and compares a one-line summary
//! of every decision with the expected text (`check`). Property tests feed arbitrary bytes (never
//! panics) and random request sequences (no IP is ever committed to two MACs at once).

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};

use dhcproto::v4::{self, DhcpOption, MessageType, OptionCode};
use dhcproto::Encodable;
use proptest::prelude::*;

use super::config::{DhcpConfig, PoolConfig, UnknownClientPolicy};
use super::core::{Decision, DhcpCore, Packet};
use super::{ClientLookup, ClientStatus, Lease};
use crate::mac::MacAddr;

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const RELAY: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);

struct Registry(HashSet<MacAddr>);
impl ClientLookup for Registry {
    fn client(&self, mac: MacAddr) -> ClientStatus {
        if self.0.contains(&mac) {
            ClientStatus::Registered
        } else {
            ClientStatus::Unknown
        }
    }
}

fn mac(n: u8) -> MacAddr {
    MacAddr([0x52, 0x54, 0, 0, 0, n])
}

fn config() -> DhcpConfig {
    let mut local = PoolConfig::new(
        Ipv4Addr::new(10, 0, 0, 0),
        24,
        Ipv4Addr::new(10, 0, 0, 100),
        Ipv4Addr::new(10, 0, 0, 102),
    );
    local.routers = vec![SERVER];
    local.lease_secs = 600;
    let relayed = PoolConfig::new(
        Ipv4Addr::new(10, 1, 0, 0),
        16,
        Ipv4Addr::new(10, 1, 0, 10),
        Ipv4Addr::new(10, 1, 0, 11),
    );
    let mut config = DhcpConfig::full(SERVER, local, "http://10.0.0.1:8080/boot/ipxe");
    config.pools.push(relayed);
    config
}

/// A request as a client would send it, described by short words:
/// `discover`, `request`, `release`, `decline`, `inform`, `offer` (bad: server message),
/// then modifiers `mac=N`, `ip=A.B.C.D` (option 50), `sid=A.B.C.D`, `ci=A.B.C.D`, `relay`,
/// `arch=N`, `ipxe`, `pxe`.
fn request(spec: &str) -> Vec<u8> {
    let mut words = spec.split_whitespace();
    let kind = match words.next() {
        Some("discover") => MessageType::Discover,
        Some("request") => MessageType::Request,
        Some("release") => MessageType::Release,
        Some("decline") => MessageType::Decline,
        Some("inform") => MessageType::Inform,
        Some("offer") => MessageType::Offer,
        Some("type99") => MessageType::Unknown(99),
        other => panic!("bad spec {other:?}"),
    };
    let mut m = v4::Message::new_with_id(
        0x1234,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &mac(1).0,
    );
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    for word in words {
        let (key, value) = word.split_once('=').unwrap_or((word, ""));
        match key {
            "mac" => {
                m.set_chaddr(&mac(value.parse().unwrap()).0);
            }
            "ip" => {
                m.opts_mut()
                    .insert(DhcpOption::RequestedIpAddress(value.parse().unwrap()));
            }
            "sid" => {
                m.opts_mut()
                    .insert(DhcpOption::ServerIdentifier(value.parse().unwrap()));
            }
            "ci" => {
                m.set_ciaddr(value.parse::<Ipv4Addr>().unwrap());
            }
            "relay" => {
                m.set_giaddr(RELAY);
            }
            "arch" => {
                m.opts_mut()
                    .insert(DhcpOption::ClientSystemArchitecture(v4::Architecture(
                        value.parse().unwrap(),
                    )));
                m.opts_mut().insert(DhcpOption::ClassIdentifier(
                    b"PXEClient:Arch:00007".to_vec(),
                ));
            }
            "pxe" => {
                m.opts_mut().insert(DhcpOption::ClassIdentifier(
                    b"PXEClient:Arch:00000:UNDI:002001".to_vec(),
                ));
            }
            "ipxe" => {
                m.opts_mut().insert(DhcpOption::UserClass(b"iPXE".to_vec()));
                m.opts_mut().insert(DhcpOption::ParameterRequestList(vec![
                    OptionCode::BootfileName,
                    OptionCode::from(175),
                ]));
            }
            other => panic!("bad modifier {other}"),
        }
    }
    if kind == MessageType::Offer {
        m.set_opcode(v4::Opcode::BootReply);
    }
    m.to_vec().unwrap()
}

fn summary(decision: &Decision) -> String {
    let reply_summary = |r: &super::core::Reply| {
        let m = &r.message;
        let mut s = format!(
            "{:?} {} to {}",
            m.opts().msg_type().unwrap(),
            m.yiaddr(),
            r.to
        );
        if let Some(Ok(file)) = m.fname_str() {
            s += &format!(" file={file}");
        }
        if let Some(DhcpOption::Unknown(o)) = m.opts().get(OptionCode::from(175)) {
            s += &format!(" o175={:?}", o.data());
        }
        s
    };
    match decision {
        Decision::Ignore(reason) => format!("ignore {reason:?}"),
        Decision::Reply(r) => reply_summary(r),
        Decision::CommitThenReply { lease, reply } => {
            let after = reply
                .as_ref()
                .map(|r| format!(" then {}", reply_summary(r)))
                .unwrap_or_default();
            format!(
                "commit {} {} exp={}{after}",
                lease.mac, lease.ip, lease.expires_unix_secs
            )
        }
    }
}

/// Runs the steps (`<time> <request spec>`, or `<time> commit-fails`) against a fresh core
/// whose registered MACs are 1..=9. A commit is in flight for the rest of its time step and
/// succeeds at the next one, unless a `commit-fails` step comes first.
fn check_with(config: DhcpConfig, steps: &str, expect: &str) {
    let mut core = DhcpCore::new(config).unwrap();
    core.handle_leadership(1, &[]);
    let registry = Registry((1..=9).map(mac).collect());
    let mut out = Vec::new();
    let mut pending: Vec<(u64, Lease)> = Vec::new();
    for line in steps.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let (time, spec) = line.split_once(' ').unwrap();
        let now: u64 = time.parse().unwrap();
        if spec == "commit-fails" {
            for (_, lease) in pending.drain(..) {
                core.handle_commit(&lease, false, now);
                out.push("commit failed".to_owned());
            }
            continue;
        }
        // Commits started at an earlier time have completed; same-time ones are in flight.
        for (_, lease) in pending.iter().filter(|(t, _)| *t < now) {
            core.handle_commit(lease, true, now);
        }
        pending.retain(|(t, _)| *t >= now);
        let bytes = request(spec);
        let outcome = core.handle_packet(
            now,
            Packet {
                bytes: &bytes,
                source: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68),
                local_port: 67,
            },
            &registry,
        );
        let mut line = summary(&outcome.decision);
        if let Some(d) = outcome.discovered {
            line += &format!(" (discovered {})", d.mac);
        }
        if let Decision::CommitThenReply { lease, .. } = &outcome.decision {
            pending.push((now, lease.clone()));
        }
        core.book().check_invariants();
        out.push(line);
    }
    let got = out.join("\n");
    let expect: Vec<&str> = expect
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(got, expect.join("\n"), "\n--- got ---\n{got}\n");
}

fn check(steps: &str, expect: &str) {
    check_with(config(), steps, expect)
}

#[test]
fn dora_commits_before_ack() {
    check(
        "0 discover mac=1
         0 request mac=1 ip=10.0.0.100 sid=10.0.0.1
         5 request mac=1 ci=10.0.0.100",
        "Offer 10.0.0.100 to 255.255.255.255:68
         commit 52:54:00:00:00:01 10.0.0.100 exp=600 then Ack 10.0.0.100 to 255.255.255.255:68
         commit 52:54:00:00:00:01 10.0.0.100 exp=605 then Ack 10.0.0.100 to 10.0.0.100:68",
    );
}

#[test]
fn concurrent_discovers_get_different_addresses_and_macs_keep_theirs() {
    check(
        "0 discover mac=1
         0 discover mac=2
         0 discover mac=1
         0 request mac=2 ip=10.0.0.101 sid=10.0.0.1
         1 discover mac=2",
        "Offer 10.0.0.100 to 255.255.255.255:68
         Offer 10.0.0.101 to 255.255.255.255:68
         Offer 10.0.0.100 to 255.255.255.255:68
         commit 52:54:00:00:00:02 10.0.0.101 exp=600 then Ack 10.0.0.101 to 255.255.255.255:68
         Offer 10.0.0.101 to 255.255.255.255:68",
    );
}

#[test]
fn requests_for_another_clients_address_are_naked() {
    check(
        "0 discover mac=1
         0 request mac=2 ip=10.0.0.100
         0 request mac=2 ip=10.0.0.100 sid=10.0.0.1
         0 request mac=3 ip=10.0.0.250
         0 request mac=3",
        "Offer 10.0.0.100 to 255.255.255.255:68
         Nak 0.0.0.0 to 255.255.255.255:68
         Nak 0.0.0.0 to 255.255.255.255:68
         Nak 0.0.0.0 to 255.255.255.255:68
         Nak 0.0.0.0 to 255.255.255.255:68",
    );
}

#[test]
fn duplicate_request_during_commit_is_committed_again_and_failed_commit_keeps_address() {
    check(
        "0 discover mac=1
         0 request mac=1 ip=10.0.0.100 sid=10.0.0.1
         0 discover mac=1
         0 request mac=1 ip=10.0.0.100 sid=10.0.0.1
         0 commit-fails
         1 discover mac=2
         1 request mac=1 ip=10.0.0.100 sid=10.0.0.1",
        "Offer 10.0.0.100 to 255.255.255.255:68
         commit 52:54:00:00:00:01 10.0.0.100 exp=600 then Ack 10.0.0.100 to 255.255.255.255:68
         Offer 10.0.0.100 to 255.255.255.255:68
         commit 52:54:00:00:00:01 10.0.0.100 exp=600 then Ack 10.0.0.100 to 255.255.255.255:68
         commit failed
         commit failed
         Offer 10.0.0.101 to 255.255.255.255:68
         commit 52:54:00:00:00:01 10.0.0.100 exp=601 then Ack 10.0.0.100 to 255.255.255.255:68",
    );
}

#[test]
fn other_server_chosen_frees_the_offer() {
    check(
        "0 discover mac=1
         0 request mac=1 ip=10.0.0.100 sid=10.0.0.9
         0 discover mac=2",
        "Offer 10.0.0.100 to 255.255.255.255:68
         ignore OtherServerChosen
         Offer 10.0.0.100 to 255.255.255.255:68",
    );
}

#[test]
fn pool_exhaustion_then_expiry_reclaims_lowest() {
    check(
        "0 discover mac=1
         0 discover mac=2
         0 discover mac=3
         0 discover mac=4
         31 discover mac=4",
        "Offer 10.0.0.100 to 255.255.255.255:68
         Offer 10.0.0.101 to 255.255.255.255:68
         Offer 10.0.0.102 to 255.255.255.255:68
         ignore PoolExhausted
         Offer 10.0.0.100 to 255.255.255.255:68",
    );
}

#[test]
fn relayed_requests_use_the_relay_pool_and_answer_the_relay() {
    check(
        "0 discover mac=1 relay
         0 request mac=1 relay ip=10.1.0.10 sid=10.0.0.1
         0 request mac=2 relay ip=10.0.0.100",
        "Offer 10.1.0.10 to 10.1.0.1:67
         commit 52:54:00:00:00:01 10.1.0.10 exp=3600 then Ack 10.1.0.10 to 10.1.0.1:67
         Nak 0.0.0.0 to 10.1.0.1:67",
    );
}

#[test]
fn release_commits_expiry_and_keeps_affinity() {
    check(
        "0 discover mac=1
         0 request mac=1 ip=10.0.0.100 sid=10.0.0.1
         10 release mac=1 ci=10.0.0.100
         11 release mac=1 ci=10.0.0.100
         12 discover mac=2
         13 discover mac=1",
        "Offer 10.0.0.100 to 255.255.255.255:68
         commit 52:54:00:00:00:01 10.0.0.100 exp=600 then Ack 10.0.0.100 to 255.255.255.255:68
         commit 52:54:00:00:00:01 10.0.0.100 exp=10
         ignore Released
         Offer 10.0.0.101 to 255.255.255.255:68
         Offer 10.0.0.100 to 255.255.255.255:68",
    );
}

#[test]
fn decline_quarantines_the_address() {
    check(
        "0 discover mac=1
         0 request mac=1 ip=10.0.0.100 sid=10.0.0.1
         1 decline mac=1 ip=10.0.0.100
         2 discover mac=1",
        "Offer 10.0.0.100 to 255.255.255.255:68
         commit 52:54:00:00:00:01 10.0.0.100 exp=600 then Ack 10.0.0.100 to 255.255.255.255:68
         ignore Released
         Offer 10.0.0.101 to 255.255.255.255:68",
    );
}

#[test]
fn pxe_boot_file_follows_architecture_and_ipxe_gets_script_url() {
    check(
        "0 discover mac=1 pxe
         0 discover mac=2 arch=7
         0 discover mac=3 arch=9
         0 discover mac=4 ipxe pxe",
        "Offer 10.0.0.100 to 255.255.255.255:68 file=undionly.kpxe
         Offer 10.0.0.101 to 255.255.255.255:68 file=ipxe.efi
         Offer 10.0.0.102 to 255.255.255.255:68 file=ipxe.efi
         ignore PoolExhausted",
    );
    let mut config = config();
    config.pools[0].range_last = Ipv4Addr::new(10, 0, 0, 120);
    check_with(
        config,
        "0 discover mac=4 ipxe pxe",
        "Offer 10.0.0.100 to 255.255.255.255:68 file=http://10.0.0.1:8080/boot/ipxe?mac=52-54-00-00-00-04 o175=[176, 1, 1]",
    );
}

#[test]
fn unknown_macs_are_discovered_and_ignored_by_default() {
    check(
        "0 discover mac=42 pxe
         0 request mac=42 ip=10.0.0.100",
        "ignore UnknownClient (discovered 52:54:00:00:00:2a)
         ignore UnknownClient (discovered 52:54:00:00:00:2a)",
    );
    let mut config = config();
    config.unknown_clients = UnknownClientPolicy::Answer;
    check_with(
        config,
        "0 discover mac=42 pxe",
        "Offer 10.0.0.100 to 255.255.255.255:68 file=undionly.kpxe (discovered 52:54:00:00:00:2a)",
    );
}

#[test]
fn bad_messages_are_ignored() {
    check(
        "0 offer mac=1
         0 type99 mac=1
         0 inform mac=1 ci=10.0.0.55",
        "ignore NotARequest
         ignore UnhandledMessageType
         Ack 0.0.0.0 to 10.0.0.55:68",
    );
}

#[test]
fn proxy_mode_answers_pxe_clients_only_without_addresses() {
    let config = DhcpConfig::proxy(SERVER, "http://10.0.0.1:8080/boot/ipxe");
    check_with(
        config,
        "0 discover mac=1
         0 discover mac=1 pxe
         0 discover mac=2 arch=7
         0 request mac=1 ip=10.0.0.77 sid=10.0.0.254 pxe",
        "ignore NotPxeClient
         Offer 0.0.0.0 to 255.255.255.255:68 file=undionly.kpxe
         Offer 0.0.0.0 to 255.255.255.255:68 file=ipxe.efi
         ignore UnhandledMessageType",
    );
}

#[test]
fn proxy_mode_port_4011_answers_unicast() {
    let config = DhcpConfig::proxy(SERVER, "http://10.0.0.1:8080/boot/ipxe");
    let mut core = DhcpCore::new(config).unwrap();
    core.handle_leadership(1, &[]);
    let registry = Registry([mac(1)].into_iter().collect());
    let bytes = request("request mac=1 pxe ci=10.0.0.77");
    let source = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 77), 4011);
    let outcome = core.handle_packet(
        0,
        Packet {
            bytes: &bytes,
            source,
            local_port: 4011,
        },
        &registry,
    );
    assert_eq!(
        summary(&outcome.decision),
        "Ack 0.0.0.0 to 10.0.0.77:4011 file=undionly.kpxe"
    );
}

#[test]
fn leadership_change_rebuilds_from_committed_leases() {
    let mut core = DhcpCore::new(config()).unwrap();
    let registry = Registry((1..=9).map(mac).collect());
    core.handle_leadership(
        7,
        &[Lease {
            mac: mac(2),
            ip: Ipv4Addr::new(10, 0, 0, 100),
            expires_unix_secs: 1000,
            hostname: None,
        }],
    );
    let bytes = request("discover mac=1");
    let outcome = core.handle_packet(
        0,
        Packet {
            bytes: &bytes,
            source: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68),
            local_port: 67,
        },
        &registry,
    );
    assert_eq!(
        summary(&outcome.decision),
        "Offer 10.0.0.101 to 255.255.255.255:68"
    );
    let bytes = request("discover mac=2");
    let outcome = core.handle_packet(
        0,
        Packet {
            bytes: &bytes,
            source: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68),
            local_port: 67,
        },
        &registry,
    );
    assert_eq!(
        summary(&outcome.decision),
        "Offer 10.0.0.100 to 255.255.255.255:68"
    );
}

proptest! {
    #[test]
    fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let mut core = DhcpCore::new(config()).unwrap();
        core.handle_leadership(1, &[]);
        let registry = Registry((1..=9).map(mac).collect());
        let _ = core.handle_packet(0, Packet { bytes: &bytes, source: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68), local_port: 67 }, &registry);
    }

    #[test]
    fn never_panics_on_mutated_requests(index in 0usize..400, value in any::<u8>(), truncate in 236usize..400) {
        let mut bytes = request("request mac=1 ipxe pxe ip=10.0.0.100 sid=10.0.0.1");
        if index < bytes.len() { bytes[index] = value; }
        bytes.truncate(truncate);
        let mut core = DhcpCore::new(config()).unwrap();
        core.handle_leadership(1, &[]);
        let registry = Registry((1..=9).map(mac).collect());
        let _ = core.handle_packet(0, Packet { bytes: &bytes, source: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68), local_port: 67 }, &registry);
    }

    /// Random clients doing random things with random commit outcomes: the committed table
    /// never gives one address to two MACs with unexpired leases, and every ACK follows a commit
    /// of exactly the acknowledged address.
    #[test]
    fn no_double_lease(steps in proptest::collection::vec((1u8..=6, 0u8..5, any::<bool>(), 0u64..3), 1..80)) {
        let mut core = DhcpCore::new(config()).unwrap();
        core.handle_leadership(1, &[]);
        let registry = Registry((1..=9).map(mac).collect());
        let mut committed: HashMap<MacAddr, Lease> = HashMap::new();
        let mut now = 0;
        for (client, action, commit_ok, dt) in steps {
            now += dt * 200;
            let spec = match action {
                0 => format!("discover mac={client}"),
                1 => format!("request mac={client} ip=10.0.0.{} sid=10.0.0.1", 100 + client % 3),
                2 => format!("request mac={client} ip=10.0.0.{}", 100 + client % 3),
                3 => format!("release mac={client} ci=10.0.0.{}", 100 + client % 3),
                _ => format!("request mac={client} ci=10.0.0.{}", 100 + client % 3),
            };
            let bytes = request(&spec);
            let outcome = core.handle_packet(now, Packet { bytes: &bytes, source: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68), local_port: 67 }, &registry);
            core.book().check_invariants();
            if let Decision::CommitThenReply { lease, reply } = outcome.decision {
                if let Some(reply) = &reply {
                    prop_assert_eq!(reply.message.yiaddr(), lease.ip);
                }
                if commit_ok {
                    committed.insert(lease.mac, lease.clone());
                }
                core.handle_commit(&lease, commit_ok, now);
                let mut holders: HashMap<Ipv4Addr, MacAddr> = HashMap::new();
                for l in committed.values().filter(|l| l.expires_unix_secs > now) {
                    if let Some(other) = holders.insert(l.ip, l.mac) {
                        prop_assert!(false, "{} leased to {} and {}", l.ip, other, l.mac);
                    }
                }
            }
        }
    }
}
