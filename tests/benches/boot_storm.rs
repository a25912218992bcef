//! Boot storm: N simulated diskless clients booting at once from a real three-node Cairn
//! cluster, with bounded concurrency. Each client does what a PXE/iPXE machine does on the wire:
//!
//! 1. DHCP: DISCOVER/OFFER/REQUEST/ACK as an iPXE client (user class `iPXE`) through a relay
//!    agent on its own loopback address, forwarded to all three nodes; only the leader answers,
//!    and only after the lease is committed through Raft. The ACK's boot file is the script URL.
//! 2. Script: HTTP GET of that URL (the leader's script server), which commits the boot session
//!    (`BeginBoot`: primary and standby placement) and returns `sanboot iscsi:...` paths and the
//!    initiator name to use.
//! 3. iSCSI: qemu-io (qemu's libiscsi driver) logs in to the primary path with that initiator
//!    name and reads the boot working set from the client's volume, which is a copy-on-write
//!    layer over the shared base image: the first 16 MiB in 1 MiB reads (boot loader, kernel,
//!    initrd), then 128 scattered 64 KiB reads over the rest of the image (the same offsets for
//!    every client, as machines booting one OS read the same blocks). A failed login is retried
//!    (the primary exposes the target within a reconcile period) and counted.
//!
//! The image is incompressible random data (no chunk is deduplicated away), imported with
//! `cairn image import` and replicated to every node before the storm. Everything runs in a
//! private network namespace on 127.0.62.1-3 (nodes) and 127.1.0.x (relays). Prints clients
//! per minute, per-phase latencies, how sessions spread over the nodes (primary and standby),
//! and bytes per second served. Settings (environment): CAIRN_STORM_CLIENTS (32),
//! CAIRN_STORM_CONCURRENCY (8), CAIRN_STORM_IMAGE_MIB (96). Needs root, curl, qemu-io with the
//! iscsi block driver; otherwise it says why and exits 0.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cairn_tests::bench::{
    self, dhcp_exchange, env_u64, http_get, leader, macs, register_clients, sanboot_paths,
    script_initiator, Api, SanPath,
};
use cairn_tests::ProcessCluster;

const BENCH: &str = "boot_storm";
const SUBNET: u8 = 62;
const MIB: u64 = 1 << 20;
/// Sequential part of the working set (boot loader, kernel, initrd), read in 1 MiB requests.
const SEQUENTIAL_MIB: u64 = 16;
/// Scattered part: this many 64 KiB reads over the rest of the image.
const SCATTERED_READS: u64 = 128;
const SCATTERED_READ_BYTES: u64 = 64 << 10;
const LOGIN_ATTEMPTS_MAX: u32 = 10;

fn main() {
    if let Some(reason) = bench::missing_tool(&[("curl", "curl"), ("qemu-io", "qemu-utils")]) {
        println!("{BENCH}: skipped: {reason}");
        return;
    }
    if !Path::new("/usr/lib/x86_64-linux-gnu/qemu/block-iscsi.so").exists() {
        println!(
            "{BENCH}: skipped: qemu's iscsi block driver is missing (package qemu-block-extra)"
        );
        return;
    }
    match bench::in_private_netns(BENCH, &[]) {
        Some(true) => return,
        Some(false) => std::process::exit(1),
        None => {}
    }
    let clients = env_u64("CAIRN_STORM_CLIENTS", 32) as usize;
    let concurrency = env_u64("CAIRN_STORM_CONCURRENCY", 8).clamp(1, 64) as usize;
    let image_mib = env_u64("CAIRN_STORM_IMAGE_MIB", 96).max(SEQUENTIAL_MIB + 8);
    let cluster = match bench::start_cluster_with_dhcp(SUBNET, "127.200.0.1", "127.200.255.254", "")
    {
        Ok(cluster) => cluster,
        Err(error) => {
            eprintln!("{BENCH}: failed to start the cluster: {error:#}");
            std::process::exit(1);
        }
    };
    if let Err(error) = storm(&cluster, clients, concurrency, image_mib) {
        eprintln!("{BENCH}: failed: {error:#}");
        eprintln!("{}", cluster.logs());
        // `exit` runs no destructors: stop the nodes first.
        drop(cluster);
        std::process::exit(1);
    }
}

/// What one client went through.
struct Boot {
    dhcp: Duration,
    script: Duration,
    disk: Duration,
    total: Duration,
    primary: String,
    standby: Option<String>,
    bytes: u64,
    login_retries: u32,
}

fn working_set(image_bytes: u64) -> Vec<(u64, u64)> {
    let mut reads: Vec<(u64, u64)> = (0..SEQUENTIAL_MIB).map(|i| (i * MIB, MIB)).collect();
    let rest_first = SEQUENTIAL_MIB * MIB;
    let slots = (image_bytes - rest_first - SCATTERED_READ_BYTES) / 4096;
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..SCATTERED_READS {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        reads.push((rest_first + (state % slots) * 4096, SCATTERED_READ_BYTES));
    }
    reads
}

fn storm(
    cluster: &ProcessCluster,
    clients: usize,
    concurrency: usize,
    image_mib: u64,
) -> anyhow::Result<()> {
    let (leader_id, _) = leader(cluster)?;
    let api = Api::new(cluster, leader_id)?;

    // The shared base image, imported once and replicated to every node.
    let image_bytes = image_mib * MIB;
    let image_file = cluster.dir.path().join("base.raw");
    bench::write_random_image(&image_file, image_bytes as usize, 62)?;
    let started = Instant::now();
    cluster.cli_ok(&[
        "image",
        "import",
        "base",
        image_file.to_str().context("utf-8 path")?,
    ])?;
    let import = started.elapsed();
    cluster.wait_replicated(Duration::from_secs(180))?;
    let replicated = started.elapsed();
    std::fs::remove_file(&image_file)?;

    cluster.cli_ok(&["group", "add", "storm"])?;
    let client_macs = macs([0x52, 0x54, SUBNET], clients);
    let missing = register_clients(&api, &client_macs, "storm", Some("storm"))?;
    if !missing.is_empty() {
        bail!("clients not registered: {missing:?}");
    }
    cluster.cli_ok(&["assign", "base", "--group", "storm"])?;

    let servers: Vec<Ipv4Addr> = cluster
        .nodes
        .iter()
        .map(|n| n.address.parse())
        .collect::<Result<_, _>>()?;
    let node_of = |ip: Ipv4Addr| {
        cluster
            .nodes
            .iter()
            .find(|n| n.address == ip.to_string())
            .map(|n| format!("node {}", n.id))
            .unwrap_or_else(|| ip.to_string())
    };
    let reads = working_set(image_bytes);
    let next = AtomicUsize::new(0);
    let boots: Mutex<Vec<Boot>> = Mutex::new(Vec::new());
    let failures: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let storm_started = Instant::now();
    std::thread::scope(|scope| {
        for worker in 0..concurrency {
            let (next, boots, failures, servers, reads, client_macs, node_of) = (
                &next,
                &boots,
                &failures,
                &servers,
                &reads,
                &client_macs,
                &node_of,
            );
            scope.spawn(move || {
                let relay = Ipv4Addr::new(127, 1, 0, worker as u8 + 1);
                loop {
                    let index = next.fetch_add(1, Ordering::SeqCst);
                    let Some(mac) = client_macs.get(index) else {
                        return;
                    };
                    match boot_one(relay, servers, *mac, index as u32, reads, node_of) {
                        Ok(boot) => boots.lock().expect("lock").push(boot),
                        Err(error) => failures
                            .lock()
                            .expect("lock")
                            .push(format!("client {index}: {error:#}")),
                    }
                }
            });
        }
    });
    let wall = storm_started.elapsed();
    let boots = boots.into_inner().expect("lock");
    let failures = failures.into_inner().expect("lock");

    let bytes: u64 = boots.iter().map(|b| b.bytes).sum();
    let minutes = wall.as_secs_f64() / 60.0;
    println!(
        "{BENCH}: {clients} clients, {concurrency} at a time, against a 3-node cluster (leader node {leader_id}) on loopback in a private netns"
    );
    println!(
        "  setup: {image_mib} MiB random base image imported in {:.1} s, on all 3 nodes after {:.1} s",
        import.as_secs_f64(),
        replicated.as_secs_f64()
    );
    println!(
        "  working set per client: {} MiB sequential (1 MiB reads) + {} x {} KiB scattered = {:.1} MiB, read with qemu-io (libiscsi)",
        SEQUENTIAL_MIB,
        SCATTERED_READS,
        SCATTERED_READ_BYTES >> 10,
        reads.iter().map(|r| r.1).sum::<u64>() as f64 / MIB as f64
    );
    println!(
        "  booted: {} of {clients} in {:.1} s: {:.1} clients/minute",
        boots.len(),
        wall.as_secs_f64(),
        boots.len() as f64 / minutes
    );
    println!(
        "  served: {:.1} MiB in total, {:.1} MiB/s ({:.0} bytes/s) over the storm",
        bytes as f64 / MIB as f64,
        bytes as f64 / MIB as f64 / wall.as_secs_f64(),
        bytes as f64 / wall.as_secs_f64()
    );
    let phase = |name: &str, pick: &dyn Fn(&Boot) -> Duration| {
        let mut values: Vec<f64> = boots.iter().map(|b| pick(b).as_secs_f64()).collect();
        values.sort_by(f64::total_cmp);
        if values.is_empty() {
            return;
        }
        let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
        println!(
            "  {name:<7} p50 {:>7.3} s  p90 {:>7.3} s  max {:>7.3} s",
            at(0.5),
            at(0.9),
            at(1.0)
        );
    };
    phase("dhcp", &|b| b.dhcp);
    phase("script", &|b| b.script);
    phase("disk", &|b| b.disk);
    phase("total", &|b| b.total);
    if !boots.is_empty() {
        let rate_sum: f64 = boots
            .iter()
            .map(|b| b.bytes as f64 / MIB as f64 / b.disk.as_secs_f64().max(1e-6))
            .sum();
        println!(
            "  per-client read rate (login and reads, one qemu-io): {:.1} MiB/s on average",
            rate_sum / boots.len() as f64
        );
    }
    let retries: u32 = boots.iter().map(|b| b.login_retries).sum();
    println!("  iscsi login retries (target not yet exposed): {retries}");
    let mut primaries: BTreeMap<&str, usize> = BTreeMap::new();
    let mut standbys: BTreeMap<&str, usize> = BTreeMap::new();
    for boot in &boots {
        *primaries.entry(&boot.primary).or_default() += 1;
        *standbys
            .entry(boot.standby.as_deref().unwrap_or("none"))
            .or_default() += 1;
    }
    println!("  sessions by primary (from the scripts): {primaries:?}");
    println!("  sessions by standby (from the scripts): {standbys:?}");
    match api.get_json("/v1/cluster/status") {
        Ok(status) => {
            let spread: Vec<String> = status["nodes"]
                .as_array()
                .map(|nodes| {
                    nodes
                        .iter()
                        .map(|n| format!("node {}: {}", n["node"]["node_id"], n["sessions"]))
                        .collect()
                })
                .unwrap_or_default();
            println!(
                "  active sessions per node (cluster status): {}",
                spread.join(", ")
            );
        }
        Err(error) => println!("  cluster status unavailable: {error:#}"),
    }
    if !failures.is_empty() {
        println!("  failed clients: {}", failures.len());
        for failure in failures.iter().take(5) {
            println!("    {failure}");
        }
    }
    if boots.is_empty() {
        bail!("no client booted");
    }
    Ok(())
}

fn boot_one(
    relay: Ipv4Addr,
    servers: &[Ipv4Addr],
    mac: [u8; 6],
    index: u32,
    reads: &[(u64, u64)],
    node_of: &dyn Fn(Ipv4Addr) -> String,
) -> anyhow::Result<Boot> {
    let started = Instant::now();
    let lease = dhcp_exchange(
        relay,
        servers,
        mac,
        0x0057_0000 + index,
        Duration::from_secs(2),
    )
    .context("dhcp")?;
    let dhcp = started.elapsed();
    let url = lease
        .boot_file
        .context("the dhcp answer names no boot file")?;
    let (status, script) = http_get(&url, Duration::from_secs(30)).context("boot script")?;
    let paths = sanboot_paths(&script);
    let Some(primary) = paths.first().cloned() else {
        bail!(
            "script ({status}) without sanboot: {}",
            script.lines().take(3).collect::<Vec<_>>().join(" | ")
        );
    };
    let initiator = script_initiator(&script).context("script sets no initiator-iqn")?;
    let script_done = started.elapsed();
    let login_retries = read_working_set(&primary, &initiator, reads)?;
    let total = started.elapsed();
    let ip = |path: &SanPath| match path.portal.ip() {
        std::net::IpAddr::V4(ip) => node_of(ip),
        other => other.to_string(),
    };
    Ok(Boot {
        dhcp,
        script: script_done - dhcp,
        disk: total - script_done,
        total,
        primary: ip(&primary),
        standby: paths.get(1).map(ip),
        bytes: reads.iter().map(|r| r.1).sum(),
        login_retries,
    })
}

/// Logs in with qemu-io and reads `reads` (offset, length) in order; returns the failed logins
/// before the one that worked.
fn read_working_set(path: &SanPath, initiator: &str, reads: &[(u64, u64)]) -> anyhow::Result<u32> {
    let options = format!(
        "driver=raw,file.driver=iscsi,file.transport=tcp,file.portal={},file.target={},file.lun={},file.initiator-name={initiator}",
        path.portal, path.target, path.lun
    );
    let mut last = String::new();
    for attempt in 0..LOGIN_ATTEMPTS_MAX {
        let mut command = Command::new("qemu-io");
        command.args(["-r", "--image-opts"]);
        for (offset, length) in reads {
            command.args(["-c", &format!("read -q {offset} {length}")]);
        }
        let output = command.arg(&options).output()?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        let failed = !output.status.success() || text.contains("failed") || text.contains("rror");
        if !failed {
            return Ok(attempt);
        }
        // A read error after a successful login is a real failure, not a retry.
        if text.contains("read failed") {
            bail!("qemu-io: {}", text.trim());
        }
        last = text;
        std::thread::sleep(Duration::from_millis(300));
    }
    bail!(
        "no iscsi login to {} after {LOGIN_ATTEMPTS_MAX} attempts: {}",
        path.portal,
        last.trim()
    )
}
