//! DHCP lease throughput: Cairn's DHCP server against Kea (kea-dhcp4-server, memfile) in the
//! same run, both driven by perfdhcp (kea-admin) in relay mode.
//!
//! The benchmark creates a private network namespace and re-runs itself inside it, where lo
//! carries 127.0.0.1 (perfdhcp, acting as the relay: giaddr 127.0.0.1, port 67), 127.0.0.2
//! (Cairn) and 127.0.0.3 (Kea). It prints leases/s (acknowledged DHCPREQUESTs per second) for
//! each server and the ratio, and names the lease committer Cairn used.
//!
//! Cairn here commits through `testing::MemoryCommitter` with a configurable delay per commit
//! call standing in for a Raft round trip; the node's integration reruns this with the real
//! Raft committer. Settings (environment): CAIRN_BENCH_SECONDS (10), CAIRN_BENCH_RATE (perfdhcp
//! -r, 20000), CAIRN_BENCH_CLIENTS (perfdhcp -R, 50000), CAIRN_BENCH_COMMIT_DELAY_MS (2).
//! Needs root (namespace, port 67), perfdhcp and kea-dhcp4; otherwise it says why and exits 0.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::Duration;

use cairn_bootproto::dhcp::server::DhcpServer;
use cairn_bootproto::dhcp::{DhcpConfig, PoolConfig};
use cairn_bootproto::testing::{MemoryCommitter, MemoryDirectory};

const INNER: &str = "CAIRN_BENCH_IN_NETNS";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn main() {
    if std::env::var(INNER).is_ok() {
        if let Err(e) = inner() {
            eprintln!("dhcp_vs_kea: failed: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    for program in ["perfdhcp", "kea-dhcp4", "ip"] {
        if !have(program) {
            println!("dhcp_vs_kea: skipped: {program} not installed (packages kea-admin, kea-dhcp4-server, iproute2)");
            return;
        }
    }
    let ns = format!("cairnbench{}", std::process::id());
    if !Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
    {
        println!("dhcp_vs_kea: skipped: cannot create a network namespace (needs root)");
        return;
    }
    let setup = [
        vec!["-n", &ns, "link", "set", "lo", "up"],
        vec!["-n", &ns, "addr", "add", "127.0.0.2/8", "dev", "lo"],
        vec!["-n", &ns, "addr", "add", "127.0.0.3/8", "dev", "lo"],
    ];
    let mut ok = true;
    for args in setup {
        ok &= Command::new("ip")
            .args(&args)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
    }
    let status = if ok {
        let exe = std::env::current_exe().expect("current exe");
        Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(exe)
            .env(INNER, "1")
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    } else {
        false
    };
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    if !status {
        std::process::exit(1);
    }
}

struct Run {
    leases_per_second: f64,
    acks: u64,
    requests: u64,
    discovers: u64,
}

fn perfdhcp(server: &str, seconds: u64, rate: u64, clients: u64) -> anyhow::Result<Run> {
    let output = Command::new("perfdhcp")
        .args([
            "-4",
            "-l",
            "127.0.0.1",
            "-r",
            &rate.to_string(),
            "-R",
            &clients.to_string(),
            "-p",
            &seconds.to_string(),
            server,
        ])
        .output()?;
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    let section = |name: &str, key: &str| -> u64 {
        report
            .split(&format!("Statistics for: {name}"))
            .nth(1)
            .and_then(|part| {
                part.lines()
                    .find_map(|l| l.trim().strip_prefix(key))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0)
    };
    let acks = section("REQUEST-ACK", "received packets:");
    anyhow::ensure!(
        !report.is_empty(),
        "perfdhcp printed nothing: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(Run {
        leases_per_second: acks as f64 / seconds as f64,
        acks,
        requests: section("REQUEST-ACK", "sent packets:"),
        discovers: section("DISCOVER-OFFER", "sent packets:"),
    })
}

fn inner() -> anyhow::Result<()> {
    let seconds = env_u64("CAIRN_BENCH_SECONDS", 10);
    let rate = env_u64("CAIRN_BENCH_RATE", 20_000);
    let clients = env_u64("CAIRN_BENCH_CLIENTS", 50_000);
    let delay_ms = env_u64("CAIRN_BENCH_COMMIT_DELAY_MS", 2);
    let work = tempfile::tempdir()?;

    // Cairn.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let committer = MemoryCommitter::new(Duration::from_millis(delay_ms));
    let directory = MemoryDirectory::new(committer.clone(), true);
    let pool = PoolConfig::new(
        Ipv4Addr::new(127, 0, 0, 0),
        8,
        Ipv4Addr::new(127, 16, 0, 1),
        Ipv4Addr::new(127, 31, 255, 254),
    );
    let mut config = DhcpConfig::full(
        Ipv4Addr::new(127, 0, 0, 2),
        pool,
        "http://127.0.0.2:8080/boot/ipxe",
    );
    config.bind_ip = Ipv4Addr::new(127, 0, 0, 2);
    let server = runtime.block_on(DhcpServer::bind(config, directory, committer.clone()))?;
    let task = runtime.spawn(server.run());
    let cairn = perfdhcp("127.0.0.2", seconds, rate, clients)?;
    task.abort();
    let (calls, committed, conflicts) = committer.counts();
    drop(runtime);

    // Kea, memfile, persisted to a CSV file in the temp dir.
    let kea_config = work.path().join("kea-dhcp4.json");
    let leases = work.path().join("leases4.csv");
    let log = work.path().join("kea.log");
    std::fs::write(
        &kea_config,
        format!(
            r#"{{"Dhcp4": {{
  "interfaces-config": {{"interfaces": ["lo/127.0.0.3"], "dhcp-socket-type": "udp"}},
  "lease-database": {{"type": "memfile", "persist": true, "name": "{}", "lfc-interval": 0}},
  "valid-lifetime": 3600,
  "subnet4": [{{"id": 1, "subnet": "127.0.0.0/8", "pools": [{{"pool": "127.16.0.1 - 127.31.255.254"}}]}}],
  "loggers": [{{"name": "kea-dhcp4", "output_options": [{{"output": "{}"}}], "severity": "WARN"}}]
}}}}"#,
            leases.display(),
            log.display()
        ),
    )?;
    let mut kea = Command::new("kea-dhcp4")
        .arg("-c")
        .arg(&kea_config)
        .env("KEA_PIDFILE_DIR", work.path())
        .env("KEA_LOCKFILE_DIR", work.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(2));
    let kea_run = perfdhcp("127.0.0.3", seconds, rate, clients);
    let _ = kea.kill();
    let _ = kea.wait();
    let kea_run = kea_run?;
    let kea_version = Command::new("kea-dhcp4")
        .arg("-v")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();

    println!("dhcp_vs_kea: perfdhcp -4 relay mode (giaddr 127.0.0.1), {seconds} s, rate {rate}/s, {clients} clients, in a private netns");
    println!(
        "  cairn  : {:>9.1} leases/s  ({} acks / {} requests / {} discovers); committer: MemoryCommitter with {delay_ms} ms delay per commit call (stand-in for Raft): {calls} calls, {committed} leases, {:.1} leases/call, {conflicts} conflicts",
        cairn.leases_per_second,
        cairn.acks,
        cairn.requests,
        cairn.discovers,
        committed as f64 / calls.max(1) as f64
    );
    println!(
        "  kea    : {:>9.1} leases/s  ({} acks / {} requests / {} discovers); kea-dhcp4 {kea_version}, memfile persisted to csv",
        kea_run.leases_per_second, kea_run.acks, kea_run.requests, kea_run.discovers
    );
    let ratio = if kea_run.leases_per_second > 0.0 {
        cairn.leases_per_second / kea_run.leases_per_second
    } else {
        f64::NAN
    };
    println!("  ratio cairn/kea: {ratio:.2}x");
    if kea_run.acks == 0 {
        println!(
            "  note: kea answered nothing; its log: {}",
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .take(5)
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    Ok(())
}
