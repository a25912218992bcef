//! No acknowledged write lost, with real processes and a real initiator: three `cairn node run`
//! processes (nodes 1 and 2 hold client disks, node 3 is a witness that only votes, so that a
//! node that returns is the one its sessions take back as standby), one persistent and one
//! non-persistent client. A workload writes numbered 4 KiB blocks through qemu's iSCSI client
//! and keeps going against whichever node the session names primary; every block the target
//! acknowledged must read back after each fault:
//!
//! 1. SIGKILL of the persistent disk's primary; the node restarts and catches up as standby
//!    incrementally (its resync copies what it missed, not the layer), the copies hash equal.
//! 2. SIGSTOP of the non-persistent disk's primary (a hung node: no TCP reset); after SIGCONT
//!    the old primary acknowledges nothing, and catches up as standby.
//! 3. The persistent disk's primary cut off from the other two nodes (iptables on the loopback
//!    addresses) while the initiator still reaches it: once the failover is committed the old
//!    primary acknowledges no write; after the cut heals it catches up.
//!
//! Runs only with `CAIRN_SLOW_TESTS=1`, and then fails if qemu or iptables is missing.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

use cairn_tests::initiator::{
    client_initiator, image_opts, qemu_available, qemu_io_within, wait_served,
};
use cairn_tests::{missing_prerequisite, signal, slow_tests_enabled, ProcessCluster};

const SUBNET: u8 = 44;
const BLOCK: u64 = 4096;
const DISK_BYTES: usize = 16 << 20;
/// Writes per qemu-io session (one login each).
const BATCH: u64 = 8;

/// The byte every 4 KiB block `block` is written with (never 0, the base's byte).
fn pattern(block: u64) -> u8 {
    (block % 250) as u8 + 1
}

fn iptables_available() -> bool {
    let ok = Command::new("iptables")
        .args(["-L", "INPUT", "-n"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        missing_prerequisite("needs iptables (and root) to cut a node off on loopback");
    }
    ok
}

#[test]
fn no_acknowledged_write_lost_on_kill_stop_or_cut() -> anyhow::Result<()> {
    if !slow_tests_enabled("no_acknowledged_write_lost_on_kill_stop_or_cut")
        || !qemu_available()
        || !iptables_available()
    {
        return Ok(());
    }
    let mut cluster = ProcessCluster::start_with(SUBNET, 3, |id| (id == 3).then_some(0))?;
    let result = run(&mut cluster);
    if result.is_err() {
        eprintln!("{}", cluster.logs());
    }
    result
}

struct Client {
    mac: &'static str,
    mac_hex: &'static str,
    /// Blocks this client's workload writes: `first..first + count`.
    first: u64,
}

impl Client {
    fn opts(&self, cluster: &ProcessCluster, node: u64) -> String {
        image_opts(
            &portal(cluster, node),
            self.mac_hex,
            &client_initiator(self.mac_hex),
        )
    }
}

fn portal(cluster: &ProcessCluster, node: u64) -> String {
    let node = cluster.nodes.iter().find(|n| n.id == node).expect("node");
    format!("{}:3260", node.address)
}

fn api(cluster: &ProcessCluster, node: u64) -> String {
    cluster
        .nodes
        .iter()
        .find(|n| n.id == node)
        .expect("node")
        .api_url()
}

/// What a workload knows: blocks acknowledged, and blocks sent but not acknowledged (which may
/// read either way).
#[derive(Default)]
struct Written {
    acknowledged: BTreeSet<u64>,
    unacknowledged: BTreeSet<u64>,
    /// Each qemu-io session: its node, when it started, and how many writes it got
    /// acknowledged.
    by_node: Vec<(u64, Instant, usize)>,
}

/// Writes numbered blocks against the session's primary (as `control` reports it), moving to
/// the new primary when a session fails.
struct Workload {
    stop: Arc<AtomicBool>,
    written: Arc<Mutex<Written>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl Workload {
    fn start(
        cluster: &ProcessCluster,
        client: &Client,
        next: u64,
        control: u64,
    ) -> anyhow::Result<Workload> {
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(Mutex::new(Written::default()));
        let portals: Vec<(u64, String)> = cluster
            .nodes
            .iter()
            .map(|n| (n.id, format!("{}:3260", n.address)))
            .collect();
        let control_api = api(cluster, control);
        let (cli_config, mac, mac_hex) = (cluster.cli_config.clone(), client.mac, client.mac_hex);
        let (stop_in, written_in) = (stop.clone(), written.clone());
        let thread = std::thread::spawn(move || -> anyhow::Result<()> {
            let mut block = next;
            let mut primary = None;
            while !stop_in.load(Ordering::Relaxed) {
                let node = match primary {
                    Some(node) => node,
                    None => match session_at(&cli_config, &control_api, mac) {
                        Ok(session) => session["primary"].as_u64().context("primary")?,
                        Err(_) => {
                            std::thread::sleep(Duration::from_millis(200));
                            continue;
                        }
                    },
                };
                let portal = &portals
                    .iter()
                    .find(|(id, _)| *id == node)
                    .context("node")?
                    .1;
                let opts = image_opts(portal, mac_hex, &client_initiator(mac_hex));
                let commands: Vec<String> = (block..block + BATCH)
                    .map(|b| format!("write -P {} {} {}", pattern(b), b * BLOCK, BLOCK))
                    .chain(["flush".to_string()])
                    .collect();
                let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
                let started = Instant::now();
                let run = qemu_io_within(&opts, &commands, Duration::from_secs(4))?;
                let acked: BTreeSet<u64> = run
                    .acknowledged_writes()
                    .into_iter()
                    .map(|offset| offset / BLOCK)
                    .collect();
                {
                    let mut written = written_in.lock().expect("lock");
                    for b in block..block + BATCH {
                        if acked.contains(&b) {
                            written.acknowledged.insert(b);
                        } else {
                            written.unacknowledged.insert(b);
                        }
                    }
                    written.by_node.push((node, started, acked.len()));
                }
                block += BATCH;
                primary = if run.success && acked.len() as u64 == BATCH {
                    Some(node)
                } else {
                    std::thread::sleep(Duration::from_millis(200));
                    None
                };
            }
            Ok(())
        });
        Ok(Workload {
            stop,
            written,
            thread: Some(thread),
        })
    }

    fn acknowledged(&self) -> usize {
        self.written.lock().expect("lock").acknowledged.len()
    }

    /// Waits until `more` blocks beyond `from` are acknowledged.
    fn wait_acknowledged(&self, from: usize, more: usize, what: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(90);
        while self.acknowledged() < from + more {
            if Instant::now() > deadline {
                bail!(
                    "{what}: {} of {more} more writes acknowledged within 90 s",
                    self.acknowledged() - from
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Stops the workload; returns what it wrote and the next free block.
    fn finish(mut self) -> anyhow::Result<Written> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("running")
            .join()
            .map_err(|_| anyhow::anyhow!("workload panicked"))??;
        Ok(std::mem::take(&mut *self.written.lock().expect("lock")))
    }
}

/// The session of `mac` as the node at `api` reports it.
fn session_at(cli_config: &std::path::Path, api: &str, mac: &str) -> anyhow::Result<Value> {
    let output = Command::new(cairn_tests::cairn_binary())
        .env("CAIRN_CLI_CONFIG", cli_config)
        .args(["--server", api, "--json", "client", "show", mac])
        .output()?;
    if !output.status.success() {
        bail!("client show: {}", String::from_utf8_lossy(&output.stderr));
    }
    let shown: Value = serde_json::from_slice(&output.stdout)?;
    Ok(shown["session"].clone())
}

/// Every acknowledged block reads back with its pattern; an unacknowledged one reads as its
/// pattern or as the base (zeros); a block never written reads as the base.
fn check_disk(disk: &[u8], written: &Written, what: &str) -> anyhow::Result<()> {
    for block in 0..(disk.len() as u64 / BLOCK) {
        let data = &disk[(block * BLOCK) as usize..((block + 1) * BLOCK) as usize];
        let expected = pattern(block);
        let holds = |byte: u8| data.iter().all(|b| *b == byte);
        if written.acknowledged.contains(&block) {
            if !holds(expected) {
                bail!(
                    "{what}: acknowledged block {block} lost (reads {:#x}...)",
                    data[0]
                );
            }
        } else if written.unacknowledged.contains(&block) {
            if !holds(expected) && !holds(0) {
                bail!("{what}: unacknowledged block {block} reads as neither old nor new");
            }
        } else if !holds(0) {
            bail!(
                "{what}: block {block}, never written, reads {:#x}...",
                data[0]
            );
        }
    }
    Ok(())
}

struct Timeline(Instant);

impl Timeline {
    fn step(&self, what: &str) {
        println!("{:>7} ms  {what}", self.0.elapsed().as_millis());
    }
}

/// iptables rules that drop every packet between `node` and the other nodes' addresses (the
/// cluster's QUIC: Raft and the mirror); removed on drop.
struct Cut {
    rules: Vec<Vec<String>>,
}

impl Cut {
    fn new(cluster: &ProcessCluster, node: u64) -> anyhow::Result<Cut> {
        let address = &cluster
            .nodes
            .iter()
            .find(|n| n.id == node)
            .expect("node")
            .address;
        let mut cut = Cut { rules: Vec::new() };
        for other in cluster.nodes.iter().filter(|n| n.id != node) {
            for (from, to) in [(address, &other.address), (&other.address, address)] {
                let rule: Vec<String> = ["INPUT", "-s", from, "-d", to, "-j", "DROP"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
                let status = Command::new("iptables").arg("-I").args(&rule).status()?;
                if !status.success() {
                    bail!("iptables -I {rule:?} failed");
                }
                cut.rules.push(rule);
            }
        }
        Ok(cut)
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        for rule in &self.rules {
            let _ = Command::new("iptables").arg("-D").args(rule).status();
        }
    }
}

fn run(cluster: &mut ProcessCluster) -> anyhow::Result<()> {
    let time = Timeline(Instant::now());
    let scratch: PathBuf = cluster.dir.path().to_owned();
    let log_dir = scratch.clone();
    let image = scratch.join("zeros.raw");
    std::fs::write(&image, vec![0u8; DISK_BYTES])?;
    cluster.cli_ok(&["image", "import", "disk", image.to_str().expect("utf-8")])?;
    let persistent = Client {
        mac: "52:54:00:44:00:01",
        mac_hex: "525400440001",
        first: 0,
    };
    let volatile = Client {
        mac: "52:54:00:44:00:02",
        mac_hex: "525400440002",
        first: 0,
    };
    for (client, mode) in [(&persistent, "persistent"), (&volatile, "non-persistent")] {
        cluster.cli_ok(&["client", "add", client.mac, "--name", client.mac_hex])?;
        cluster.cli_ok(&["assign", "disk", "--client", client.mac, "--mode", mode])?;
        cluster.cli_json(&["client", "boot", client.mac, "--image", "disk"])?;
    }

    // 1. SIGKILL of the persistent disk's primary.
    time.step("persistent disk: in sync, workload running");
    let session = cluster.wait_in_sync(None, persistent.mac)?;
    let primary = session["primary"].as_u64().context("primary")?;
    let other = 3 - primary;
    // A large written layer first, so that a full copy and a catch-up differ clearly.
    let bulk = 512u64;
    let mut all = Written::default();
    write_bulk(cluster, &persistent, primary, bulk, &mut all)?;
    let workload = Workload::start(cluster, &persistent, persistent.first + bulk, other)?;
    workload.wait_acknowledged(0, 24, "before the kill")?;
    time.step("SIGKILL of the primary");
    let killed_at = Instant::now();
    node_mut(cluster, primary).kill();
    let before = workload.acknowledged();
    workload.wait_acknowledged(before, 24, "after the kill")?;
    time.step(&format!(
        "workload goes on at the new primary ({} ms after the kill)",
        killed_at.elapsed().as_millis()
    ));
    let written = workload.finish()?;
    merge(&mut all, written);
    let disk = wait_served(&persistent.opts(cluster, other), &scratch.join("p1.raw"))?;
    check_disk(&disk, &all, "after SIGKILL of the primary")?;
    time.step("every acknowledged write reads back; the killed node restarts");
    node_mut(cluster, primary).start(&log_dir)?;
    let session = cluster.wait_in_sync(Some(&api(cluster, other)), persistent.mac)?;
    anyhow::ensure!(
        session["standby"] == primary,
        "the returning node {primary} is the only node that can be standby: {session}"
    );
    let copy = primary_copy(cluster, other, persistent.mac)?;
    let copied = copy["last_resync"]["bytes_copied"]
        .as_u64()
        .with_context(|| format!("no completed resync in {copy}"))?;
    let layer_bytes = all.acknowledged.len() as u64 * BLOCK;
    println!(
        "the returning node caught up with {} KiB of a {} KiB layer",
        copied / 1024,
        layer_bytes / 1024
    );
    anyhow::ensure!(
        copied < layer_bytes / 2,
        "the returning node was sent {copied} bytes of a {layer_bytes}-byte layer: not incremental"
    );
    verify(cluster, other, persistent.mac)?;
    time.step("caught up incrementally; the copies are equal");

    // 2. SIGSTOP of the non-persistent disk's primary.
    let session = cluster.wait_in_sync(Some(&api(cluster, other)), volatile.mac)?;
    let primary = session["primary"].as_u64().context("primary")?;
    let other = 3 - primary;
    let volatile_first = 2048;
    let mut all_volatile = Written::default();
    let workload = Workload::start(cluster, &volatile, volatile_first, other)?;
    workload.wait_acknowledged(0, 24, "before the stop")?;
    time.step("SIGSTOP of the non-persistent disk's primary");
    let stopped = node_mut(cluster, primary).pid().context("pid")?;
    signal(stopped, "STOP")?;
    let before = workload.acknowledged();
    let result = workload.wait_acknowledged(before, 24, "after the stop");
    let written = workload.finish();
    time.step("workload went on at the new primary; SIGCONT");
    signal(stopped, "CONT")?;
    result?;
    merge(&mut all_volatile, written?);
    // The old primary wakes up at an old generation: it must not acknowledge a write.
    let marker = volatile_first + 1500;
    let stale = probe_write(cluster, &volatile, primary, marker)?;
    anyhow::ensure!(
        stale.is_empty(),
        "the stopped primary acknowledged {stale:?} after it woke up"
    );
    all_volatile.unacknowledged.insert(marker);
    let disk = wait_served(&volatile.opts(cluster, other), &scratch.join("v1.raw"))?;
    check_disk(&disk, &all_volatile, "after SIGSTOP of the primary")?;
    anyhow::ensure!(
        disk[(marker * BLOCK) as usize] == 0,
        "the old primary's unacknowledged write reached the new primary"
    );
    cluster.wait_in_sync(Some(&api(cluster, other)), volatile.mac)?;
    verify(cluster, other, volatile.mac)?;
    time.step("the old primary acknowledged nothing, caught up; the copies are equal");

    // 3. The persistent disk's primary cut off from the other nodes.
    let session = cluster.wait_in_sync(Some(&api(cluster, other)), persistent.mac)?;
    let primary = session["primary"].as_u64().context("primary")?;
    let other = 3 - primary;
    let generation = session["generation"].as_u64().context("generation")?;
    let next = all
        .acknowledged
        .iter()
        .chain(&all.unacknowledged)
        .max()
        .map_or(0, |b| b + 1);
    let workload = Workload::start(cluster, &persistent, next, other)?;
    workload.wait_acknowledged(0, 24, "before the cut")?;
    time.step("cutting the persistent disk's primary off from the other nodes");
    let cut = Cut::new(cluster, primary)?;
    let failed_over = wait_primary_changed(cluster, other, persistent.mac, generation)?;
    time.step("failover committed");
    let marker = next + 1200;
    let stale = probe_write(cluster, &persistent, primary, marker)?;
    let before = workload.acknowledged();
    let result = workload.wait_acknowledged(before, 24, "after the cut");
    let written = workload.finish()?;
    result?;
    anyhow::ensure!(
        stale.is_empty(),
        "the cut-off primary acknowledged {stale:?} after the failover was committed"
    );
    let late: Vec<_> = written
        .by_node
        .iter()
        .filter(|(node, started, acked)| *node == primary && *started > failed_over && *acked > 0)
        .collect();
    anyhow::ensure!(
        late.is_empty(),
        "the cut-off primary acknowledged writes after the failover: {late:?}"
    );
    merge(&mut all, written);
    all.unacknowledged.insert(marker);
    let disk = wait_served(&persistent.opts(cluster, other), &scratch.join("p2.raw"))?;
    check_disk(&disk, &all, "after the cut")?;
    drop(cut);
    time.step("every acknowledged write reads back; the cut healed");
    let session = cluster.wait_in_sync(Some(&api(cluster, other)), persistent.mac)?;
    anyhow::ensure!(session["standby"] == primary, "{session}");
    verify(cluster, other, persistent.mac)?;
    time.step("the cut-off node caught up; the copies are equal");
    Ok(())
}

fn merge(all: &mut Written, more: Written) {
    all.acknowledged.extend(more.acknowledged);
    all.unacknowledged.extend(more.unacknowledged);
    all.by_node.extend(more.by_node);
}

fn node_mut(cluster: &mut ProcessCluster, id: u64) -> &mut cairn_tests::NodeProcess {
    cluster.nodes.iter_mut().find(|n| n.id == id).expect("node")
}

/// `count` blocks from the client's first, in 64 KiB writes, at `node`.
fn write_bulk(
    cluster: &ProcessCluster,
    client: &Client,
    node: u64,
    count: u64,
    written: &mut Written,
) -> anyhow::Result<()> {
    let commands: Vec<String> = (client.first..client.first + count)
        .map(|b| format!("write -P {} {} {}", pattern(b), b * BLOCK, BLOCK))
        .chain(["flush".to_string()])
        .collect();
    let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
    let run = qemu_io_within(
        &client.opts(cluster, node),
        &commands,
        Duration::from_secs(60),
    )?;
    anyhow::ensure!(run.success, "bulk write: {}", run.text);
    for offset in run.acknowledged_writes() {
        written.acknowledged.insert(offset / BLOCK);
    }
    anyhow::ensure!(
        written.acknowledged.len() as u64 == count,
        "bulk write: {}",
        run.text
    );
    Ok(())
}

/// Tries one write at `node`'s portal for ten seconds; returns the blocks it acknowledged.
fn probe_write(
    cluster: &ProcessCluster,
    client: &Client,
    node: u64,
    block: u64,
) -> anyhow::Result<Vec<u64>> {
    let command = format!("write -P {} {} {}", pattern(block), block * BLOCK, BLOCK);
    let run = qemu_io_within(
        &client.opts(cluster, node),
        &[&command, "flush"],
        Duration::from_secs(10),
    )?;
    Ok(run
        .acknowledged_writes()
        .into_iter()
        .map(|o| o / BLOCK)
        .collect())
}

/// Waits until `mac`'s session, as `node` reports it, is past `generation` with another
/// primary; returns when that was seen.
fn wait_primary_changed(
    cluster: &ProcessCluster,
    node: u64,
    mac: &str,
    generation: u64,
) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(shown) = cluster.client_show(Some(&api(cluster, node)), mac) {
            let session = &shown["session"];
            if session["generation"].as_u64() > Some(generation) && session["primary"] == node {
                return Ok(Instant::now());
            }
        }
        if Instant::now() > deadline {
            bail!("no failover of {mac} to node {node} within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The primary's report of its copy of `mac`.
fn primary_copy(cluster: &ProcessCluster, node: u64, mac: &str) -> anyhow::Result<Value> {
    let shown = cluster.client_show(Some(&api(cluster, node)), mac)?;
    shown["copies"]
        .as_array()
        .and_then(|copies| {
            copies
                .iter()
                .find(|c| c["status"]["role"] == "primary")
                .map(|c| c["status"].clone())
        })
        .with_context(|| format!("no primary copy in {shown}"))
}

/// `cairn client verify`: the two copies' digests are equal.
fn verify(cluster: &ProcessCluster, node: u64, mac: &str) -> anyhow::Result<()> {
    let report = cluster.cli_json_at(&api(cluster, node), &["client", "verify", mac])?;
    anyhow::ensure!(report["equal"] == true, "copies differ: {report}");
    Ok(())
}
