//! Helpers for the benchmarks in `tests/benches/` (`cargo bench -p cairn-tests`): tool checks,
//! a private network namespace the benchmark re-runs itself in, a three-node cluster with DHCP
//! on, the admin API through curl (one `curl --parallel` process for thousands of writes),
//! Prometheus text parsing, and a relay-mode DHCP client.
//!
//! Everything stays on loopback addresses (127.0.0.0/8) inside a network namespace the benchmark
//! creates, so port 67 and the node addresses never clash with the host or other tests.
//! Not done here: asserting on speed (benchmarks print figures, they do not fail on them).

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use dhcproto::v4::{self, DhcpOption, MessageType, OptionCode};
use dhcproto::{Decodable, Encodable};
use serde_json::Value;

use crate::{on_path, ProcessCluster};

/// The first of `programs` that is missing, with the package that brings it.
pub fn missing_tool(programs: &[(&str, &str)]) -> Option<String> {
    programs
        .iter()
        .find(|(program, _)| !on_path(program))
        .map(|(program, package)| format!("{program} not installed (package {package})"))
}

pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs this benchmark binary again inside a private network namespace (see
/// [`cairn_bootproto::testing::peers::in_private_netns`]), after building the cairn binary
/// outside it, so the inner run finds it built.
pub fn in_private_netns(bench: &str, addresses: &[&str]) -> Option<bool> {
    if std::env::var_os(cairn_bootproto::testing::peers::IN_NETNS_ENV).is_none() {
        let _ = crate::cairn_binary();
    }
    cairn_bootproto::testing::peers::in_private_netns(bench, addresses)
}

/// The `[boot]` table for one node: full DHCP bound to the node's own address (three nodes
/// share one loopback), no TFTP, relayed requests from anywhere in 127.0.0.0/8 served from
/// `range_first..=range_last`.
pub fn full_dhcp_boot_config(address: &str, range_first: &str, range_last: &str) -> String {
    format!(
        "\n[boot]\ndhcp_mode = \"full\"\ndhcp_bind_ip = \"{address}\"\ntftp = false\n\n\
         [[boot.pools]]\nsubnet = \"127.0.0.0\"\nprefix_len = 8\nrange_first = \"{range_first}\"\n\
         range_last = \"{range_last}\"\nlease_secs = 3600\n"
    )
}

/// A three-node cluster (`ProcessCluster::start`) whose nodes are then stopped, given DHCP in
/// full mode (see [`full_dhcp_boot_config`]) and `extra_top_level` lines in `node.toml`, and
/// started again; returns once a leader has been elected and all three are voters.
pub fn start_cluster_with_dhcp(
    subnet: u8,
    range_first: &str,
    range_last: &str,
    extra_top_level: &str,
) -> anyhow::Result<ProcessCluster> {
    let mut cluster = ProcessCluster::start(subnet, 3)?;
    for node in &mut cluster.nodes {
        node.kill();
    }
    for node in &cluster.nodes {
        let path = node.data_dir.join("node.toml");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let mut top = String::new();
        let mut tables = String::new();
        let mut in_table = false;
        let mut in_boot = false;
        for line in text.lines() {
            let trimmed = line.trim_start();
            if trimmed.starts_with('[') {
                in_table = true;
                in_boot = trimmed.starts_with("[boot") || trimmed.starts_with("[[boot");
            }
            if in_boot {
                continue;
            }
            let part = if in_table { &mut tables } else { &mut top };
            part.push_str(line);
            part.push('\n');
        }
        let config = format!(
            "{top}{extra_top_level}\n{tables}{}",
            full_dhcp_boot_config(&node.address, range_first, range_last)
        );
        std::fs::write(&path, config)?;
    }
    let log_dir = cluster.dir.path().to_owned();
    for node in &mut cluster.nodes {
        node.start(&log_dir)?;
    }
    cluster.wait_for(Duration::from_secs(60), |status| {
        status["leader"].is_u64()
            && status["nodes"].as_array().is_some_and(|nodes| {
                nodes.iter().filter(|n| n["raft_role"] == "voter").count() == 3
            })
    })?;
    Ok(cluster)
}

/// The current leader's id and address.
pub fn leader(cluster: &ProcessCluster) -> anyhow::Result<(u64, String)> {
    let status = cluster.wait_for(Duration::from_secs(30), |s| s["leader"].is_u64())?;
    let id = status["leader"].as_u64().context("leader id")?;
    let node = cluster
        .nodes
        .iter()
        .find(|n| n.id == id)
        .context("leader among the nodes")?;
    Ok((id, node.address.clone()))
}

/// One node's admin API, reached with curl: HTTPS with the cluster CA, the certificate's name
/// `node-<id>.cairn` mapped to the node's address, the admin token from the CLI's config.
pub struct Api {
    base: String,
    connect_to: String,
    token: String,
    ca_file: PathBuf,
    scratch: PathBuf,
}

impl Api {
    pub fn new(cluster: &ProcessCluster, node_id: u64) -> anyhow::Result<Api> {
        let text = std::fs::read_to_string(&cluster.cli_config)?;
        let value = |key: &str| -> anyhow::Result<String> {
            text.lines()
                .filter_map(|line| line.split_once('='))
                .find(|(k, _)| k.trim() == key)
                .map(|(_, v)| v.trim().trim_matches('"').to_owned())
                .with_context(|| format!("{key} in {}", cluster.cli_config.display()))
        };
        let node = cluster
            .nodes
            .iter()
            .find(|n| n.id == node_id)
            .with_context(|| format!("node {node_id}"))?;
        let host = format!("node-{node_id}.cairn");
        Ok(Api {
            base: format!("https://{host}:7400"),
            connect_to: format!("{host}:7400:{}:7400", node.address),
            token: value("token")?,
            ca_file: PathBuf::from(value("ca_file")?),
            scratch: cluster.dir.path().to_owned(),
        })
    }

    fn curl(&self, path: &str) -> Command {
        let mut command = Command::new("curl");
        command
            .args(["-sS", "--max-time", "60", "--cacert"])
            .arg(&self.ca_file)
            .args(["--connect-to", &self.connect_to])
            .args(["-H", &format!("Authorization: Bearer {}", self.token)])
            .arg(format!("{}{path}", self.base));
        command
    }

    pub fn get_text(&self, path: &str) -> anyhow::Result<String> {
        let output = self.curl(path).arg("--fail").output()?;
        if !output.status.success() {
            bail!(
                "GET {path}: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    pub fn get_json(&self, path: &str) -> anyhow::Result<Value> {
        Ok(serde_json::from_str(&self.get_text(path)?)?)
    }

    /// POSTs every body to `path` with at most `parallel` requests at once from one curl
    /// process (connections are reused); returns how many got a 2xx answer.
    pub fn post_many(
        &self,
        path: &str,
        bodies: &[Value],
        parallel: usize,
    ) -> anyhow::Result<usize> {
        let quote = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
        let mut config = String::new();
        for (index, body) in bodies.iter().enumerate() {
            // `next` only between operations: a trailing one is an operation without a URL,
            // which makes curl stop with an error and abandon transfers still in flight.
            if index > 0 {
                config += "next\n";
            }
            config += &format!("url = {}\n", quote(&format!("{}{path}", self.base)));
            config += &format!("cacert = {}\n", quote(&self.ca_file.to_string_lossy()));
            config += &format!("connect-to = {}\n", quote(&self.connect_to));
            config += &format!(
                "header = {}\n",
                quote(&format!("Authorization: Bearer {}", self.token))
            );
            config += "header = \"Content-Type: application/json\"\n";
            config += &format!("data-raw = {}\n", quote(&body.to_string()));
            config += "output = \"/dev/null\"\nwrite-out = \"%{http_code}\\n\"\nsilent\n";
        }
        let file = self.scratch.join("curl-posts.conf");
        std::fs::write(&file, config)?;
        let output = Command::new("curl")
            .args(["--parallel", "--parallel-max", &parallel.to_string()])
            .arg("--config")
            .arg(&file)
            .output()?;
        let codes = String::from_utf8_lossy(&output.stdout);
        Ok(codes.lines().filter(|code| code.starts_with('2')).count())
    }
}

/// A MAC address as `aa:bb:cc:dd:ee:ff`.
pub fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// `count` MACs `prefix:00:00:01`, `prefix:00:00:02`, ...
pub fn macs(prefix: [u8; 3], count: usize) -> Vec<[u8; 6]> {
    (1..=count as u32)
        .map(|i| {
            let [_, a, b, c] = i.to_be_bytes();
            [prefix[0], prefix[1], prefix[2], a, b, c]
        })
        .collect()
}

/// Registers `macs` as clients (named `<name_prefix>-<index>`, in `group` if given) through the
/// API of `api`, 32 requests at a time, retrying what the client list does not show; returns
/// the MACs still missing after that (printed as a warning).
pub fn register_clients(
    api: &Api,
    macs: &[[u8; 6]],
    name_prefix: &str,
    group: Option<&str>,
) -> anyhow::Result<Vec<String>> {
    let bodies: Vec<Value> = macs
        .iter()
        .enumerate()
        .map(|(i, mac)| {
            let mut body =
                serde_json::json!({"mac": mac_text(*mac), "name": format!("{name_prefix}-{i}")});
            if let Some(group) = group {
                body["group"] = Value::from(group);
            }
            body
        })
        .collect();
    // A write can fail under load (a proposal timing out); registering is idempotent enough to
    // retry what the client list does not show yet.
    let mut pending = bodies;
    for _round in 0..5 {
        api.post_many("/v1/clients", &pending, 32)?;
        let listed = api.get_json("/v1/clients")?;
        let known: std::collections::HashSet<String> = listed
            .as_array()
            .or_else(|| listed["clients"].as_array())
            .map(|list| {
                list.iter()
                    .filter_map(|c| c["mac"].as_str().map(str::to_lowercase))
                    .collect()
            })
            .unwrap_or_default();
        pending.retain(|body| !known.contains(body["mac"].as_str().unwrap_or("")));
        if pending.is_empty() {
            return Ok(Vec::new());
        }
    }
    let missing: Vec<String> = pending
        .iter()
        .filter_map(|body| body["mac"].as_str().map(str::to_owned))
        .collect();
    println!(
        "warning: {} of {} clients not in the client list after 5 rounds (left out), e.g. {:?}",
        missing.len(),
        macs.len(),
        &missing[..missing.len().min(3)]
    );
    Ok(missing)
}

/// Prometheus text: the sum over all series of `name` (any labels).
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        if let Some(value) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += value;
        }
    }
    found
}

/// Prometheus text: one summary (`name{quantile=..}`, `name_sum`, `name_count`) as
/// `count, mean, p50, p99` in the metric's unit; `None` if it was never recorded.
pub fn summary(text: &str, name: &str) -> Option<(f64, f64, f64, f64)> {
    let count = metric_sum(text, &format!("{name}_count"))?;
    let sum = metric_sum(text, &format!("{name}_sum")).unwrap_or(0.0);
    let quantile = |q: &str| {
        text.lines()
            .find(|l| {
                l.starts_with(&format!("{name}{{")) && l.contains(&format!("quantile=\"{q}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    Some((
        count,
        if count > 0.0 { sum / count } else { f64::NAN },
        quantile("0.5"),
        quantile("0.99"),
    ))
}

/// What a DHCP exchange gave the client.
#[derive(Debug, Clone)]
pub struct DhcpLease {
    pub ip: Ipv4Addr,
    /// Who answered (server identifier).
    pub server: Ipv4Addr,
    /// The boot file: for an iPXE client, the URL of its boot script.
    pub boot_file: Option<String>,
}

/// One DISCOVER/OFFER/REQUEST/ACK exchange as a DHCP relay at `relay` (bound to `relay:67`,
/// giaddr `relay`) forwarding for an iPXE client `mac` to every one of `servers` (only the
/// leader answers). Retries the whole exchange up to three times, `timeout` per answer.
pub fn dhcp_exchange(
    relay: Ipv4Addr,
    servers: &[Ipv4Addr],
    mac: [u8; 6],
    xid: u32,
    timeout: Duration,
) -> anyhow::Result<DhcpLease> {
    let socket = UdpSocket::bind((relay, 67)).with_context(|| format!("binding {relay}:67"))?;
    socket.set_read_timeout(Some(timeout))?;
    let mut last_error = anyhow::anyhow!("no attempt");
    for attempt in 0..3u32 {
        let xid = xid.wrapping_add(attempt << 24);
        match exchange_once(&socket, relay, servers, mac, xid, timeout) {
            Ok(lease) => return Ok(lease),
            Err(error) => last_error = error,
        }
    }
    Err(last_error)
}

fn client_message(relay: Ipv4Addr, mac: [u8; 6], xid: u32, kind: MessageType) -> v4::Message {
    let mut message = v4::Message::new_with_id(
        xid,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        relay,
        &mac,
    );
    message.set_hops(1);
    let options = message.opts_mut();
    options.insert(DhcpOption::MessageType(kind));
    options.insert(DhcpOption::ClassIdentifier(
        b"PXEClient:Arch:00000:UNDI:002001".to_vec(),
    ));
    options.insert(DhcpOption::ClientSystemArchitecture(v4::Architecture(0)));
    options.insert(DhcpOption::UserClass(b"iPXE".to_vec()));
    options.insert(DhcpOption::ParameterRequestList(vec![
        OptionCode::SubnetMask,
        OptionCode::Router,
        OptionCode::BootfileName,
        OptionCode::from(175),
    ]));
    message
}

fn send_all(socket: &UdpSocket, servers: &[Ipv4Addr], message: &v4::Message) -> anyhow::Result<()> {
    let bytes = message.to_vec()?;
    for server in servers {
        socket.send_to(&bytes, SocketAddr::from((*server, 67)))?;
    }
    Ok(())
}

fn receive(
    socket: &UdpSocket,
    xid: u32,
    kind: MessageType,
    timeout: Duration,
) -> anyhow::Result<v4::Message> {
    let deadline = Instant::now() + timeout;
    let mut buffer = [0u8; 1500];
    while Instant::now() < deadline {
        let Ok((len, _)) = socket.recv_from(&mut buffer) else {
            break;
        };
        let Ok(message) = v4::Message::from_bytes(&buffer[..len]) else {
            continue;
        };
        if message.xid() != xid {
            continue;
        }
        match message.opts().msg_type() {
            Some(got) if got == kind => return Ok(message),
            Some(MessageType::Nak) => bail!("DHCPNAK for xid {xid:#x}"),
            _ => continue,
        }
    }
    bail!("no {kind:?} for xid {xid:#x} within {timeout:?}")
}

fn exchange_once(
    socket: &UdpSocket,
    relay: Ipv4Addr,
    servers: &[Ipv4Addr],
    mac: [u8; 6],
    xid: u32,
    timeout: Duration,
) -> anyhow::Result<DhcpLease> {
    send_all(
        socket,
        servers,
        &client_message(relay, mac, xid, MessageType::Discover),
    )?;
    let offer = receive(socket, xid, MessageType::Offer, timeout)?;
    let server = match offer.opts().get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(ip)) => *ip,
        _ => bail!("offer without a server identifier"),
    };
    let mut request = client_message(relay, mac, xid, MessageType::Request);
    request
        .opts_mut()
        .insert(DhcpOption::RequestedIpAddress(offer.yiaddr()));
    request
        .opts_mut()
        .insert(DhcpOption::ServerIdentifier(server));
    send_all(socket, servers, &request)?;
    let ack = receive(socket, xid, MessageType::Ack, timeout)?;
    let boot_file = match ack.opts().get(OptionCode::BootfileName) {
        Some(DhcpOption::BootfileName(name)) => Some(String::from_utf8_lossy(name).into_owned()),
        _ => ack.fname_str().and_then(|f| f.ok()).map(str::to_owned),
    }
    .filter(|f| !f.is_empty());
    Ok(DhcpLease {
        ip: ack.yiaddr(),
        server,
        boot_file,
    })
}

/// A plain HTTP/1.1 GET of `url` (`http://host:port/path`), as iPXE fetches its script.
pub fn http_get(url: &str, timeout: Duration) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("not an http url: {url}"))?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let address: SocketAddr = host
        .parse()
        .with_context(|| format!("host of {url} is not ip:port"))?;
    let mut stream = std::net::TcpStream::connect_timeout(&address, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: iPXE/1.0 (cairn bench)\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("no http status from {url}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// One path of a `sanboot` line: `iscsi:<ip>::<port>:<lun>:<iqn>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SanPath {
    pub portal: SocketAddr,
    pub lun: u32,
    pub target: String,
}

/// The paths of the first `sanboot` line of an iPXE script, primary first.
pub fn sanboot_paths(script: &str) -> Vec<SanPath> {
    let Some(line) = script
        .lines()
        .find(|l| l.trim_start().starts_with("sanboot"))
    else {
        return Vec::new();
    };
    line.split_whitespace()
        .filter_map(|word| word.strip_prefix("iscsi:"))
        .filter_map(|uri| {
            let mut fields = uri.splitn(5, ':');
            let ip: Ipv4Addr = fields.next()?.parse().ok()?;
            let _protocol = fields.next()?;
            let port = match fields.next()? {
                "" => 3260,
                port => port.parse().ok()?,
            };
            let lun = match fields.next()? {
                "" => 0,
                lun => lun.parse().ok()?,
            };
            let target = fields.next()?.to_owned();
            Some(SanPath {
                portal: SocketAddr::from((ip, port)),
                lun,
                target,
            })
        })
        .collect()
}

/// The initiator name an iPXE script sets (`set initiator-iqn <name>`).
pub fn script_initiator(script: &str) -> Option<String> {
    script.lines().find_map(|line| {
        line.trim()
            .strip_prefix("set initiator-iqn ")
            .map(|name| name.trim().to_owned())
    })
}

/// Writes `len` bytes of reproducible, incompressible, non-repeating data (xorshift) to `path`,
/// so no two 64 KiB chunks of the image are equal and nothing is deduplicated away.
pub fn write_random_image(path: &Path, len: usize, seed: u64) -> anyhow::Result<()> {
    let mut state = seed | 1;
    let mut bytes = Vec::with_capacity(len);
    while bytes.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(len);
    std::fs::write(path, bytes)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanboot_paths_are_parsed() {
        let script = "#!ipxe\nset initiator-iqn x\nsanboot iscsi:127.0.62.2::3260:0:iqn.2026-11.org.cairn:client.525400000001 iscsi:127.0.62.3:::0:iqn.2026-11.org.cairn:client.525400000001 || goto failed\n";
        let paths = sanboot_paths(script);
        assert_eq!(paths.len(), 2);
        assert_eq!(paths[0].portal, "127.0.62.2:3260".parse().unwrap());
        assert_eq!(paths[0].target, "iqn.2026-11.org.cairn:client.525400000001");
        assert_eq!(paths[1].portal, "127.0.62.3:3260".parse().unwrap());
        assert!(sanboot_paths("#!ipxe\necho no\n").is_empty());
        assert_eq!(script_initiator(script).as_deref(), Some("x"));
        assert!(sanboot_paths("sanboot iscsi:zz::1:0:x").is_empty());
    }

    #[test]
    fn prometheus_summaries_are_read() {
        let text = "# TYPE x summary\nx{quantile=\"0.5\"} 0.002\nx{quantile=\"0.99\"} 0.01\nx_sum 0.3\nx_count 100\ny_total{a=\"1\"} 2\ny_total{a=\"2\"} 3\n";
        let (count, mean, p50, p99) = summary(text, "x").unwrap();
        assert_eq!((count, p50, p99), (100.0, 0.002, 0.01));
        assert!((mean - 0.003).abs() < 1e-12);
        assert_eq!(metric_sum(text, "y_total"), Some(5.0));
        assert_eq!(metric_sum(text, "y"), None);
        assert!(summary(text, "z").is_none());
    }

    #[test]
    fn macs_count_up() {
        let list = macs([0x52, 0x54, 0x01], 300);
        assert_eq!(mac_text(list[0]), "52:54:01:00:00:01");
        assert_eq!(mac_text(list[299]), "52:54:01:00:01:2c");
    }
}
