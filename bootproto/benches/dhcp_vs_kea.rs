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
use std::time::Duration;

use cairn_bootproto::dhcp::server::DhcpServer;
use cairn_bootproto::dhcp::{DhcpConfig, PoolConfig};
use cairn_bootproto::testing::peers::{
    in_private_netns, on_path, perfdhcp, Kea, PerfdhcpClients, KEA_ADDRESS,
};
use cairn_bootproto::testing::{MemoryCommitter, MemoryDirectory};

const BENCH: &str = "dhcp_vs_kea";
const RANGE_FIRST: &str = "127.16.0.1";
const RANGE_LAST: &str = "127.31.255.254";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    for (program, package) in [("perfdhcp", "kea-admin"), ("kea-dhcp4", "kea-dhcp4-server")] {
        if !on_path(program) {
            println!("{BENCH}: skipped: {program} not installed (package {package})");
            return;
        }
    }
    match in_private_netns(BENCH, &["127.0.0.2/8", "127.0.0.3/8"]) {
        Some(true) => return,
        Some(false) => std::process::exit(1),
        None => {}
    }
    if let Err(e) = inner() {
        eprintln!("{BENCH}: failed: {e:#}");
        std::process::exit(1);
    }
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
    let cairn = perfdhcp("127.0.0.2", seconds, rate, PerfdhcpClients::Random(clients))?;
    task.abort();
    let (calls, committed, conflicts) = committer.counts();
    drop(runtime);

    // Kea, memfile, persisted to a CSV file in the temp dir.
    let kea = Kea::start(work.path(), RANGE_FIRST, RANGE_LAST)?;
    let kea_run = perfdhcp(KEA_ADDRESS, seconds, rate, PerfdhcpClients::Random(clients));
    let kea_log = kea.log_head();
    drop(kea);
    let kea_run = kea_run?;
    let kea_version = Kea::version();

    println!("dhcp_vs_kea: perfdhcp -4 relay mode (giaddr 127.0.0.1), {seconds} s, rate {rate}/s, {clients} clients, in a private netns");
    println!(
        "  cairn  : {:>9.1} leases/s  ({} acks / {} requests / {} discovers); committer: MemoryCommitter with {delay_ms} ms delay per commit call (stand-in for Raft): {calls} calls, {committed} leases, {:.1} leases/call, {conflicts} conflicts",
        cairn.leases_per_second(),
        cairn.acks,
        cairn.requests,
        cairn.discovers,
        committed as f64 / calls.max(1) as f64
    );
    println!(
        "  kea    : {:>9.1} leases/s  ({} acks / {} requests / {} discovers); kea-dhcp4 {kea_version}, memfile persisted to csv",
        kea_run.leases_per_second(),
        kea_run.acks,
        kea_run.requests,
        kea_run.discovers
    );
    let ratio = if kea_run.acks > 0 {
        cairn.leases_per_second() / kea_run.leases_per_second()
    } else {
        f64::NAN
    };
    println!("  ratio cairn/kea: {ratio:.2}x");
    if kea_run.acks == 0 {
        println!("  note: kea answered nothing; its log: {kea_log}");
    }
    Ok(())
}
