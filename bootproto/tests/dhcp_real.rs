//! Real-socket DHCP tests on loopback: a hand-written relay agent checks the leader-only
//! answering, the commit-before-ACK rule, failed commits (no ACK) and a leadership change (the
//! new leader answers at once from the committed table); perfdhcp (Debian's kea-admin package,
//! relay mode) checks complete exchanges under load with the in-memory committer, and that no
//! address was committed to two MACs. That one needs root (port 67) and perfdhcp: without them it
//! prints why and returns, or fails under `CAIRN_SLOW_TESTS=1`.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use cairn_bootproto::dhcp::server::DhcpServer;
use cairn_bootproto::dhcp::{DhcpConfig, PoolConfig};
use cairn_bootproto::testing::{missing_prerequisite, MemoryCommitter, MemoryDirectory};
use cairn_bootproto::MacAddr;
use dhcproto::v4::{self, DhcpOption, MessageType};
use dhcproto::{Decodable, Encodable};
use tokio::net::UdpSocket;

const RELAY: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 5);

fn config(server: Ipv4Addr, port: u16) -> DhcpConfig {
    let pool = PoolConfig::new(
        Ipv4Addr::new(127, 0, 0, 0),
        8,
        Ipv4Addr::new(127, 20, 0, 1),
        Ipv4Addr::new(127, 20, 0, 200),
    );
    let mut config = DhcpConfig::full(server, pool, "http://127.0.0.4:8080/boot/ipxe");
    config.bind_ip = server;
    config.server_port = port;
    config
}

fn relayed(
    kind: MessageType,
    mac: MacAddr,
    requested: Option<Ipv4Addr>,
    server_id: Option<Ipv4Addr>,
) -> Vec<u8> {
    let mut m = v4::Message::new_with_id(
        rand_xid(mac),
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        RELAY,
        &mac.0,
    );
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    if let Some(ip) = requested {
        m.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
    }
    if let Some(ip) = server_id {
        m.opts_mut().insert(DhcpOption::ServerIdentifier(ip));
    }
    m.to_vec().unwrap()
}

fn rand_xid(mac: MacAddr) -> u32 {
    u32::from_be_bytes([mac.0[2], mac.0[3], mac.0[4], mac.0[5]])
}

async fn answer(
    relay: &UdpSocket,
    server: SocketAddr,
    request: &[u8],
    wait_ms: u64,
) -> Option<v4::Message> {
    relay.send_to(request, server).await.unwrap();
    let mut buffer = vec![0u8; 1500];
    match tokio::time::timeout(Duration::from_millis(wait_ms), relay.recv_from(&mut buffer)).await {
        Ok(Ok((len, _))) => Some(v4::Message::from_bytes(&buffer[..len]).unwrap()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_only_commit_before_ack_and_leadership_change() {
    let server_ip = Ipv4Addr::new(127, 0, 0, 4);
    let port = 16767;
    let committer = MemoryCommitter::new(Duration::from_millis(20));
    let directory = MemoryDirectory::new(committer.clone(), false);
    let mac = MacAddr([0x52, 0x54, 0, 0, 0, 1]);
    directory.register(mac);
    directory.set_leader(None);
    let server = DhcpServer::bind(
        config(server_ip, port),
        directory.clone(),
        committer.clone(),
    )
    .await
    .unwrap();
    let task = tokio::spawn(server.run());
    let relay = UdpSocket::bind(SocketAddr::from((RELAY, port)))
        .await
        .unwrap();
    let to = SocketAddr::from((server_ip, port));

    assert!(
        answer(
            &relay,
            to,
            &relayed(MessageType::Discover, mac, None, None),
            300
        )
        .await
        .is_none(),
        "a follower stays silent"
    );
    directory.set_leader(Some(1));
    let offer = answer(
        &relay,
        to,
        &relayed(MessageType::Discover, mac, None, None),
        2000,
    )
    .await
    .expect("the leader offers");
    assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
    let ip = offer.yiaddr();
    assert_eq!(ip, Ipv4Addr::new(127, 20, 0, 1));
    assert_eq!(directory.lease_of(mac), None, "an offer commits nothing");

    let ack = answer(
        &relay,
        to,
        &relayed(MessageType::Request, mac, Some(ip), Some(server_ip)),
        2000,
    )
    .await
    .expect("ack");
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(
        directory.lease_of(mac),
        Some(ip),
        "the lease is in the table when the ack arrives"
    );

    committer.set_failing(true);
    assert!(
        answer(
            &relay,
            to,
            &relayed(MessageType::Request, mac, Some(ip), None),
            500
        )
        .await
        .is_none(),
        "no ack without a commit"
    );
    committer.set_failing(false);

    // Leadership moves away and back (new epoch): the book is rebuilt from the table.
    directory.set_leader(None);
    assert!(answer(
        &relay,
        to,
        &relayed(MessageType::Request, mac, Some(ip), None),
        300
    )
    .await
    .is_none());
    directory.set_leader(Some(2));
    let other = MacAddr([0x52, 0x54, 0, 0, 0, 2]);
    directory.register(other);
    let offer = answer(
        &relay,
        to,
        &relayed(MessageType::Discover, other, Some(ip), None),
        2000,
    )
    .await
    .expect("new leader answers");
    assert_ne!(
        offer.yiaddr(),
        ip,
        "another client never gets a leased address"
    );
    let ack = answer(
        &relay,
        to,
        &relayed(MessageType::Request, mac, Some(ip), None),
        2000,
    )
    .await
    .expect("renewal after leader change");
    assert_eq!(
        (ack.opts().msg_type(), ack.yiaddr()),
        (Some(MessageType::Ack), ip)
    );

    // Unknown MACs: silence, recorded as discovered.
    let stranger = MacAddr([0x52, 0x54, 0, 0, 0, 9]);
    assert!(answer(
        &relay,
        to,
        &relayed(MessageType::Discover, stranger, None, None),
        300
    )
    .await
    .is_none());
    assert!(directory
        .discovered()
        .iter()
        .any(|d| d.mac == stranger && d.relay == RELAY));
    assert_eq!(
        committer.counts().2,
        0,
        "no conflicting lease was ever committed"
    );
    task.abort();
}

/// Runs perfdhcp and returns its output (stdout, then stderr); an error when it cannot run.
fn perfdhcp(args: &[&str]) -> std::io::Result<String> {
    let output = std::process::Command::new("perfdhcp").args(args).output()?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr))
}

/// (sent, received) for one exchange section of perfdhcp's report.
fn exchange(report: &str, section: &str) -> (u64, u64) {
    let part = report
        .split(&format!("Statistics for: {section}"))
        .nth(1)
        .unwrap_or("");
    let value = |key: &str| {
        part.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    (value("sent packets:"), value("received packets:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn perfdhcp_relay_mode_against_the_leader() {
    let server_ip = Ipv4Addr::new(127, 0, 0, 3);
    let committer = MemoryCommitter::new(Duration::from_millis(2));
    let directory = MemoryDirectory::new(committer.clone(), true);
    let mut config = config(server_ip, 67);
    config.pools[0].range_last = Ipv4Addr::new(127, 20, 255, 254);
    let server = match DhcpServer::bind(config, directory.clone(), Arc::clone(&committer)).await {
        Ok(server) => server,
        Err(e) => {
            missing_prerequisite(&format!("cannot bind port 67 ({e}); needs root"));
            return;
        }
    };
    let task = tokio::spawn(server.run());
    // perfdhcp acts as a relay on 127.0.0.1:67 (giaddr 127.0.0.1) and expects replies there.
    let run = tokio::task::spawn_blocking(|| {
        perfdhcp(&[
            "-4",
            "-l",
            "127.0.0.1",
            "-r",
            "200",
            "-R",
            "400",
            "-p",
            "3",
            "127.0.0.3",
        ])
    })
    .await
    .unwrap();
    task.abort();
    let report = match run {
        Ok(report) => report,
        Err(e) => {
            missing_prerequisite(&format!(
                "perfdhcp not runnable ({e}); install Debian's kea-admin"
            ));
            return;
        }
    };
    let (discovers, offers) = exchange(&report, "DISCOVER-OFFER");
    let (requests, acks) = exchange(&report, "REQUEST-ACK");
    eprintln!("perfdhcp: {discovers} discovers, {offers} offers, {requests} requests, {acks} acks");
    assert!(
        discovers > 100 && acks > 100,
        "perfdhcp completed too few exchanges:\n{report}"
    );
    assert!(
        offers * 100 >= discovers * 95 && acks * 100 >= requests * 95,
        "more than 5% lost:\n{report}"
    );
    let table = committer.table();
    assert!(
        table.len() as u64 >= acks.min(400),
        "every acked lease is committed ({} in table, {acks} acks)",
        table.len()
    );
    let mut ips: Vec<_> = table.iter().map(|l| l.ip).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), table.len(), "two MACs hold one address");
    assert_eq!(committer.counts().2, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_mode_answers_on_both_ports_without_leases() {
    let server_ip = Ipv4Addr::new(127, 0, 0, 6);
    let (port, proxy_port) = (16768, 16769);
    let committer = MemoryCommitter::new(Duration::ZERO);
    let directory = MemoryDirectory::new(committer.clone(), true);
    let mut config = DhcpConfig::proxy(server_ip, "http://127.0.0.6:8080/boot/ipxe");
    config.bind_ip = server_ip;
    config.server_port = port;
    config.proxy_port = proxy_port;
    let server = DhcpServer::bind(config, directory, committer.clone())
        .await
        .unwrap();
    assert_eq!(server.local_addrs().len(), 2);
    let task = tokio::spawn(server.run());
    let relay = UdpSocket::bind(SocketAddr::from((RELAY, port)))
        .await
        .unwrap();
    let mac = MacAddr([0x52, 0x54, 0, 0, 0, 7]);
    let mut discover =
        v4::Message::from_bytes(&relayed(MessageType::Discover, mac, None, None)).unwrap();
    discover.opts_mut().insert(DhcpOption::ClassIdentifier(
        b"PXEClient:Arch:00000:UNDI:002001".to_vec(),
    ));
    let offer = answer(
        &relay,
        SocketAddr::from((server_ip, port)),
        &discover.to_vec().unwrap(),
        2000,
    )
    .await
    .expect("proxy offer");
    assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
    assert_eq!(
        offer.yiaddr(),
        Ipv4Addr::UNSPECIFIED,
        "proxyDHCP gives no address"
    );
    assert_eq!(file(&offer), "undionly.kpxe");
    assert_eq!(
        offer.opts().get(dhcproto::v4::OptionCode::ClassIdentifier),
        Some(&DhcpOption::ClassIdentifier(b"PXEClient".to_vec()))
    );

    // Boot server discovery on the proxy port: answered to the sender's address and port.
    let client = UdpSocket::bind("127.0.0.7:0").await.unwrap();
    let mut request =
        v4::Message::from_bytes(&relayed(MessageType::Request, mac, None, None)).unwrap();
    request.set_giaddr(Ipv4Addr::UNSPECIFIED);
    request.set_ciaddr(Ipv4Addr::new(127, 0, 0, 7));
    request.opts_mut().insert(DhcpOption::ClassIdentifier(
        b"PXEClient:Arch:00007".to_vec(),
    ));
    request
        .opts_mut()
        .insert(DhcpOption::ClientSystemArchitecture(v4::Architecture(7)));
    let ack = answer(
        &client,
        SocketAddr::from((server_ip, proxy_port)),
        &request.to_vec().unwrap(),
        2000,
    )
    .await
    .expect("proxy ack");
    assert_eq!(
        (ack.opts().msg_type(), file(&ack).as_str()),
        (Some(MessageType::Ack), "ipxe.efi")
    );
    assert_eq!(committer.counts(), (0, 0, 0), "proxy mode commits no lease");
    task.abort();
}

/// The boot file name field (dhcproto keeps the C string's terminating nul).
fn file(message: &v4::Message) -> String {
    message
        .fname()
        .map(|f| String::from_utf8_lossy(f).trim_end_matches('\0').to_owned())
        .unwrap_or_default()
}
