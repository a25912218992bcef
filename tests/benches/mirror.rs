//! The mirror: a client's persistent disk on a real three-node Cairn cluster, every write of
//! which is mirrored synchronously from the session's primary to its standby (QUIC) before it
//! is acknowledged, measured in one run:
//!
//! 1. **Throughput against tgt.** 4 KiB random writes (IOPS) and 64 KiB sequential writes
//!    (MB/s), 32 commands in flight, with the small pipelined initiator written here (WRITE(10),
//!    WRITE(16) past 2^32 blocks), against the session's primary (its standby checked in sync
//!    before each measurement) and against tgt (Debian's user-space target, one unmirrored copy)
//!    serving a file of the same size on the same machine; same initiator, same duration. Then
//!    the same two shapes as reads with libiscsi's `iscsi-perf`, which in this version only
//!    reads (its options are -i, -m, -b, -t, -r, -l, -n, -x: no write flag). The order of the
//!    two targets rotates over the rounds and the medians are kept: the machine is shared.
//!    Goal: writes >= 1.0x tgt, both shapes.
//! 2. **Failover time.** With the standby in sync, SIGKILL of the primary, then a 4 KiB WRITE
//!    and SYNCHRONIZE CACHE against the standby's portal in a loop (logging in again after a
//!    connection error) until both succeed: ms from the kill to that success. Repeated
//!    (the killed node restarts, the session gets an in-sync standby again, the new primary is
//!    killed). Goal: <= 2000 ms.
//! 3. **Resync throughput.** A sequential fill of the volume (mirrored), then SIGKILL of the
//!    *standby*: the primary drops it, the leader assigns the third node as a fresh standby, and
//!    the primary copies every written block to it. Progress and the result come from
//!    `cairn --json client show` (the primary's `copies[].status.resync` and `last_resync`),
//!    with a fallback to the time until `standby_copy` is `InSync` again. Compared with one raw
//!    TCP stream (1 MiB writes, reader discarding) between two of the cluster's loopback
//!    addresses, measured in the same run. Prints the resync bandwidth limit that applied.
//!    Goal: >= 50% of raw TCP.
//!
//! `cargo bench -p cairn-tests --bench mirror`. Environment: `BENCH_ROUNDS` (3),
//! `BENCH_SECONDS` (5, per measurement), `BENCH_IMAGE_MIB` (256: the image, random data so
//! nothing is deduplicated, and tgt's file), `BENCH_FAILOVERS` (2), `BENCH_RESYNC_FILL_MIB`
//! (128), `BENCH_TCP_MIB` (1024), `BENCH_RESYNC_TIMEOUT_SECONDS` (600). Nodes listen on
//! 127.0.63.1-3, tgt on 127.0.63.10; no traffic leaves 127.0.0.0/8. Needs tgt (tgtd, tgtadm);
//! without `iscsi-perf` (libiscsi-bin) the reads are skipped. A missing tool is reported and
//! the benchmark exits 0. It prints figures and goals; it asserts nothing.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cairn_tests::bench::{env_u64, missing_tool, write_random_image};
use cairn_tests::ProcessCluster;
use serde_json::Value;

const BENCH: &str = "mirror";
/// Nodes on 127.0.63.1-3 (other real-process tests and benches use 41-44, 61, 62).
const SUBNET: u8 = 63;
const MAC: &str = "52:54:00:63:00:01";
const MAC_HEX: &str = "525400630001";
const IMAGE: &str = "mirror-bench";
const IN_FLIGHT: usize = 32;
const MIB: u64 = 1 << 20;
const TGT_ADDRESS: &str = "127.0.63.10";
const TGT_IQN: &str = "iqn.2026-11.org.cairn.reference:tgt-mirror-bench";

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if let Some(reason) = missing_tool(&[("tgtd", "tgt"), ("tgtadm", "tgt")]) {
        println!("{BENCH}: skipped: {reason}");
        return;
    }
    let settings = Settings::from_env();
    println!("{BENCH}: {settings:?}");
    let started = Instant::now();
    let mut cluster = match ProcessCluster::start(SUBNET, 3) {
        Ok(cluster) => cluster,
        Err(error) => {
            eprintln!("{BENCH}: failed to start the cluster: {error:#}");
            std::process::exit(1);
        }
    };
    println!(
        "{BENCH}: three nodes up in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let result = run(&mut cluster, &settings);
    if let Err(error) = &result {
        eprintln!("{BENCH}: failed: {error:#}");
        eprintln!("{}", cluster.logs());
    }
    keep_logs(&cluster, result.is_err());
    if result.is_err() {
        // `exit` runs no destructors: stop the nodes first.
        drop(cluster);
        std::process::exit(1);
    }
}

/// Copies the nodes' logs out of the cluster's temporary directory: into `BENCH_LOG_DIR` when
/// set, else after a failure into /tmp/cairn-mirror-bench-<pid>.
fn keep_logs(cluster: &ProcessCluster, failed: bool) {
    let into = match std::env::var_os("BENCH_LOG_DIR") {
        Some(dir) => std::path::PathBuf::from(dir),
        None if failed => {
            std::env::temp_dir().join(format!("cairn-{BENCH}-bench-{}", std::process::id()))
        }
        None => return,
    };
    if std::fs::create_dir_all(&into).is_err() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(cluster.dir.path()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name.to_string_lossy().starts_with("node") && name.to_string_lossy().contains(".log") {
            let _ = std::fs::copy(entry.path(), into.join(&name));
        }
    }
    println!("{BENCH}: node logs kept in {}", into.display());
}

#[derive(Debug)]
struct Settings {
    rounds: usize,
    seconds: u64,
    image_mib: u64,
    failovers: u64,
    resync_fill_mib: u64,
    tcp_mib: u64,
    resync_timeout_seconds: u64,
    iscsi_perf: bool,
}

impl Settings {
    fn from_env() -> Settings {
        let iscsi_perf = missing_tool(&[("iscsi-perf", "libiscsi-bin")]);
        if let Some(reason) = &iscsi_perf {
            println!("{BENCH}: reads skipped: {reason}");
        }
        let image_mib = env_u64("BENCH_IMAGE_MIB", 256).max(16);
        Settings {
            rounds: env_u64("BENCH_ROUNDS", 3).max(1) as usize,
            seconds: env_u64("BENCH_SECONDS", 5).max(1),
            image_mib,
            failovers: env_u64("BENCH_FAILOVERS", 2),
            resync_fill_mib: env_u64("BENCH_RESYNC_FILL_MIB", 128).min(image_mib),
            tcp_mib: env_u64("BENCH_TCP_MIB", 1024).max(1),
            resync_timeout_seconds: env_u64("BENCH_RESYNC_TIMEOUT_SECONDS", 600),
            iscsi_perf: iscsi_perf.is_none(),
        }
    }
}

/// What the run found, printed again together at the end.
#[derive(Default)]
struct Summary {
    lines: Vec<String>,
}

impl Summary {
    fn add(&mut self, line: String) {
        println!("{line}");
        self.lines.push(line);
    }
}

fn run(cluster: &mut ProcessCluster, settings: &Settings) -> anyhow::Result<()> {
    let started = Instant::now();
    let step = |what: &str| println!("{:>8.1} s  {what}", started.elapsed().as_secs_f64());
    let scratch = cluster.dir.path().to_owned();
    let image_bytes = settings.image_mib * MIB;

    step("importing the image");
    let image_file = scratch.join("image.raw");
    write_random_image(&image_file, image_bytes as usize, 63)?;
    cluster.cli_ok(&["image", "import", IMAGE, path_str(&image_file)?])?;
    // tgt serves a copy of the same bytes, in the same file system as the nodes' data.
    let tgt_file = scratch.join("tgt.img");
    std::fs::rename(&image_file, &tgt_file)?;
    step("waiting until the other nodes hold the image");
    cluster.wait_replicated(Duration::from_secs(300))?;

    cluster.cli_ok(&["client", "add", MAC, "--name", "mirror-bench"])?;
    cluster.cli_ok(&["assign", IMAGE, "--client", MAC, "--mode", "persistent"])?;
    step("booting the client");
    let events = cluster.cli_json(&["client", "boot", MAC, "--image", IMAGE])?;
    let boot = &events[0]["payload"]["boot_started"];
    println!(
        "boot session: primary {}, standby {}",
        boot["primary"], boot["standby"]
    );
    step("waiting for the standby to be in sync");
    let roles = wait_in_sync(cluster, Duration::from_secs(180))?;
    step(&format!(
        "in sync: primary node {}, standby node {}",
        roles.primary, roles.standby
    ));

    let mut summary = Summary::default();
    throughput(cluster, settings, &tgt_file, &mut summary)?;
    std::fs::remove_file(&tgt_file).ok();
    step("throughput done; failovers");
    failovers(cluster, settings, &mut summary)?;
    step("failovers done; resync");
    resync(cluster, settings, &mut summary)?;
    step("done");
    println!();
    println!("{BENCH} summary (same run, same machine):");
    for line in &summary.lines {
        println!("  {line}");
    }
    Ok(())
}

fn path_str(path: &Path) -> anyhow::Result<&str> {
    path.to_str().context("utf-8 path")
}

// ---------------------------------------------------------------------------------------------
// The cluster: who serves the session.

#[derive(Clone, Copy, Debug)]
struct Roles {
    primary: u64,
    standby: u64,
}

fn client_show(cluster: &ProcessCluster) -> anyhow::Result<Value> {
    cluster.cli_json(&["client", "show", MAC])
}

/// Waits until the session has a standby whose copy is in sync, and, where `client show`
/// lists the copies, the primary reports itself not degraded and the standby serves its copy,
/// all of it holding for [`STEADY`]: every write is mirrored. (A session is recorded
/// `InSync` from its start, also while its standby's node still lacks the image and the
/// primary keeps dropping it.)
fn wait_in_sync(cluster: &ProcessCluster, timeout: Duration) -> anyhow::Result<Roles> {
    let deadline = Instant::now() + timeout;
    let mut steady_since: Option<(Instant, u64, u64)> = None;
    loop {
        let last = match client_show(cluster) {
            Ok(shown) => {
                let session = &shown["session"];
                let roles = match (
                    session["primary"].as_u64(),
                    session["standby"].as_u64(),
                    session["standby_copy"].as_str(),
                ) {
                    (Some(primary), Some(standby), Some("InSync"))
                        if copies_mirrored(&shown, primary, standby) =>
                    {
                        Some((primary, standby))
                    }
                    _ => None,
                };
                match (roles, steady_since) {
                    (Some((primary, standby)), Some((since, p, s)))
                        if (p, s) == (primary, standby) =>
                    {
                        if since.elapsed() >= STEADY {
                            return Ok(Roles { primary, standby });
                        }
                    }
                    (Some((primary, standby)), _) => {
                        steady_since = Some((Instant::now(), primary, standby))
                    }
                    (None, _) => steady_since = None,
                }
                format!("session {session}, copies {}", shown["copies"])
            }
            Err(error) => format!("{error:#}"),
        };
        if Instant::now() > deadline {
            bail!("{MAC}'s standby not in sync within {timeout:?}; last: {last}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// How long the session must look mirrored before [`wait_in_sync`] believes it: longer than
/// a primary takes to find its standby silent (`MirrorConfig::standby_timeout`, 700 ms).
const STEADY: Duration = Duration::from_millis(1500);

/// The copies as `client show` reports them: the primary's not degraded and the standby's
/// served. True when the build lists no copies (nothing more to check).
fn copies_mirrored(shown: &Value, primary: u64, standby: u64) -> bool {
    let Some(copies) = shown["copies"].as_array() else {
        return true;
    };
    let status = |node: u64| {
        copies
            .iter()
            .find(|c| c["node"].as_u64() == Some(node))
            .map(|c| &c["status"])
    };
    let primary_ok =
        status(primary).is_some_and(|s| s["role"] == "primary" && s["degraded"] == false);
    let standby_ok = status(standby).is_some_and(|s| s["role"] == "standby");
    primary_ok && standby_ok
}

/// Wall-clock time of day (UTC), to find an instant in the nodes' logs.
fn utc_now() -> String {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let ms_of_day = since_epoch.as_millis() % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}Z",
        ms_of_day / 3_600_000,
        ms_of_day / 60_000 % 60,
        ms_of_day / 1000 % 60,
        ms_of_day % 1000
    )
}

fn node_address(cluster: &ProcessCluster, id: u64) -> anyhow::Result<String> {
    cluster
        .nodes
        .iter()
        .find(|n| n.id == id)
        .map(|n| n.address.clone())
        .with_context(|| format!("no node {id}"))
}

fn cairn_endpoint(cluster: &ProcessCluster, node: u64) -> anyhow::Result<Endpoint> {
    Ok(Endpoint {
        portal: format!("{}:3260", node_address(cluster, node)?),
        iqn: format!("iqn.2026-11.org.cairn:client.{MAC_HEX}"),
        lun: 0,
        initiator: format!("iqn.2026-11.org.cairn:initiator.{MAC_HEX}"),
    })
}

fn leader_id(cluster: &ProcessCluster) -> Option<u64> {
    cluster
        .wait_for(Duration::from_secs(10), |s| s["leader"].is_u64())
        .ok()
        .and_then(|s| s["leader"].as_u64())
}

fn kill_node(cluster: &mut ProcessCluster, id: u64) -> anyhow::Result<()> {
    cluster
        .nodes
        .iter_mut()
        .find(|n| n.id == id)
        .with_context(|| format!("no node {id}"))?
        .kill();
    Ok(())
}

/// Starts a killed node again. Its log file starts over: the old one is kept beside it first
/// (`node<id>.log.<ms since the epoch>`).
fn restart_node(cluster: &mut ProcessCluster, id: u64) -> anyhow::Result<()> {
    let log_dir = cluster.dir.path().to_owned();
    let log = log_dir.join(format!("node{id}.log"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let _ = std::fs::rename(&log, log_dir.join(format!("node{id}.log.{now}")));
    cluster
        .nodes
        .iter_mut()
        .find(|n| n.id == id)
        .with_context(|| format!("no node {id}"))?
        .start(&log_dir)
}

/// Logs in, retrying while the target is not (yet) there.
fn login_retrying(endpoint: &Endpoint, isid: u8, timeout: Duration) -> anyhow::Result<Session> {
    let deadline = Instant::now() + timeout;
    loop {
        match Session::login(endpoint, isid, Duration::from_secs(10)) {
            Ok(session) => return Ok(session),
            Err(error) if Instant::now() > deadline => {
                return Err(error.context(format!(
                    "no login to {} within {timeout:?}",
                    endpoint.portal
                )))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Throughput against tgt.

/// One figure's samples of a target's [`Figures`].
type Pick = fn(&Figures) -> &Vec<f64>;

#[derive(Default)]
struct Figures {
    random_write_iops: Vec<f64>,
    sequential_write_mbps: Vec<f64>,
    random_read_iops: Vec<f64>,
    sequential_read_mbps: Vec<f64>,
}

fn throughput(
    cluster: &ProcessCluster,
    settings: &Settings,
    tgt_file: &Path,
    summary: &mut Summary,
) -> anyhow::Result<()> {
    let roles = wait_in_sync(cluster, Duration::from_secs(60))?;
    let cairn = cairn_endpoint(cluster, roles.primary)?;
    let tgt_port = free_tgt_port()?;
    let _tgt = start_tgt(path_str(tgt_file)?, tgt_port, TGT_IQN)?;
    let tgt = Endpoint {
        portal: format!("{TGT_ADDRESS}:{tgt_port}"),
        iqn: TGT_IQN.into(),
        // tgt's LUN 0 is its controller; the disk is LUN 1.
        lun: 1,
        initiator: cairn.initiator.clone(),
    };
    let subjects = [("cairn (mirrored)", &cairn), ("tgt", &tgt)];
    // Both answer before anything is measured, and report the same size.
    for (label, endpoint) in subjects {
        let session = login_retrying(endpoint, 0x01, Duration::from_secs(60))?;
        println!(
            "{label}: {} at {}, {} blocks of {} bytes ({} MiB); negotiated: target MaxRecvDataSegmentLength {}, FirstBurstLength {}, InitialR2T {}, ImmediateData {}, CmdSN window {}",
            endpoint.iqn,
            endpoint.portal,
            session.block_count,
            session.block_size,
            session.block_count * session.block_size as u64 / MIB,
            session.target_data_segment_max,
            session.first_burst,
            session.initial_r2t,
            session.immediate_data,
            session.max_cmd_sn.wrapping_sub(session.cmd_sn).wrapping_add(1)
        );
        session.logout();
    }
    let seconds = Duration::from_secs(settings.seconds);
    let mut figures: Vec<Figures> = subjects.iter().map(|_| Figures::default()).collect();
    for round in 0..settings.rounds {
        for step in 0..subjects.len() {
            let index = (round + step) % subjects.len();
            let (label, endpoint) = subjects[index];
            if index == 0 {
                // Every Cairn figure is of mirrored writes: the standby is in sync.
                let now = wait_in_sync(cluster, Duration::from_secs(60))?;
                if now.primary != roles.primary {
                    bail!(
                        "the primary moved from node {} to node {} during the throughput runs",
                        roles.primary,
                        now.primary
                    );
                }
            }
            let mut session =
                login_retrying(endpoint, 0x10 + round as u8, Duration::from_secs(30))?;
            let random = write_load(
                &mut session,
                Pattern::Random4k,
                Stop::After(seconds),
                round as u64,
            )?;
            session.logout();
            let mut session =
                login_retrying(endpoint, 0x20 + round as u8, Duration::from_secs(30))?;
            let sequential = write_load(
                &mut session,
                Pattern::Sequential64k,
                Stop::After(seconds),
                round as u64,
            )?;
            session.logout();
            let f = &mut figures[index];
            f.random_write_iops.push(random.iops());
            f.sequential_write_mbps
                .push(sequential.megabytes_per_second());
            let mut reads = String::new();
            if settings.iscsi_perf {
                let url = format!(
                    "iscsi://{}/{}/{}",
                    endpoint.portal, endpoint.iqn, endpoint.lun
                );
                let (random_iops, _) =
                    iscsi_perf(&url, &endpoint.initiator, 8, true, settings.seconds);
                let (_, sequential_mbps) =
                    iscsi_perf(&url, &endpoint.initiator, 128, false, settings.seconds);
                f.random_read_iops.push(random_iops);
                f.sequential_read_mbps.push(sequential_mbps);
                reads = format!(
                    "  read rand4k {random_iops:8.0} IOPS  read seq64k {sequential_mbps:7.1} MB/s"
                );
            }
            println!(
                "round {round} {label:<17}: write rand4k {:8.0} IOPS  write seq64k {:7.1} MB/s{reads}",
                random.iops(),
                sequential.megabytes_per_second(),
            );
        }
    }
    let after = wait_in_sync(cluster, Duration::from_secs(60))?;
    println!(
        "after the runs: primary node {}, standby node {} in sync",
        after.primary, after.standby
    );
    let median_of = |index: usize, pick: Pick| median(pick(&figures[index]));
    let rows: [(&str, Pick, &str, &str); 4] = [
        (
            "write rand4k",
            |f| &f.random_write_iops,
            "IOPS",
            "goal >= 1.0x tgt",
        ),
        (
            "write seq64k",
            |f| &f.sequential_write_mbps,
            "MB/s",
            "goal >= 1.0x tgt",
        ),
        (
            "read rand4k",
            |f| &f.random_read_iops,
            "IOPS",
            "iscsi-perf, no goal here",
        ),
        (
            "read seq64k",
            |f| &f.sequential_read_mbps,
            "MB/s",
            "iscsi-perf, no goal here",
        ),
    ];
    summary.add(format!(
        "throughput: medians of {} rounds of {} s, {IN_FLIGHT} in flight, {} MiB disk, Cairn primary node {} mirrored to node {}:",
        settings.rounds, settings.seconds, settings.image_mib, roles.primary, roles.standby
    ));
    for (name, pick, unit, goal) in rows {
        if figures[0].random_read_iops.is_empty() && name.starts_with("read") {
            continue;
        }
        let (cairn, tgt) = (median_of(0, pick), median_of(1, pick));
        summary.add(format!(
            "  {name:<13} cairn {cairn:9.1} {unit}  tgt {tgt:9.1} {unit}  cairn/tgt {:5.2}x  ({goal})",
            cairn / tgt.max(1e-9)
        ));
    }
    Ok(())
}

fn median(values: &[f64]) -> f64 {
    let mut values = values.to_vec();
    values.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    match values.len() {
        0 => 0.0,
        n if n % 2 == 0 => (values[n / 2 - 1] + values[n / 2]) / 2.0,
        n => values[n / 2],
    }
}

/// Runs iscsi-perf and returns (IOPS, MB/s) from its "iops average N (M MB/s)" line.
fn iscsi_perf(url: &str, initiator: &str, blocks: u32, random: bool, seconds: u64) -> (f64, f64) {
    let mut command = Command::new("timeout");
    command
        .arg((seconds + 20).to_string())
        .arg("iscsi-perf")
        .args(["-i", initiator, "-m", &IN_FLIGHT.to_string()])
        .args(["-b", &blocks.to_string(), "-t", &seconds.to_string()]);
    if random {
        command.arg("-r");
    }
    let output = match command.arg(url).output() {
        Ok(output) => output,
        Err(error) => {
            println!("iscsi-perf {url}: {error}");
            return (0.0, 0.0);
        }
    };
    let text = String::from_utf8_lossy(&output.stdout).replace('\r', "\n");
    let Some(line) = text.lines().rfind(|l| l.starts_with("iops average")) else {
        println!(
            "iscsi-perf {url} gave no average: {} {}",
            text.lines().last().unwrap_or(""),
            String::from_utf8_lossy(&output.stderr).trim()
        );
        return (0.0, 0.0);
    };
    let iops: f64 = line
        .split(|c: char| !c.is_ascii_digit())
        .find(|s| !s.is_empty())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0);
    // MB/s from IOPS: iscsi-perf rounds its own figure down to whole MiB.
    (iops, iops * blocks as f64 * 512.0 / 1e6)
}

struct Tgt {
    child: Child,
    control: String,
}

impl Drop for Tgt {
    fn drop(&mut self) {
        let _ = Command::new("tgtadm")
            .args(["-C", &self.control, "--lld", "iscsi", "--op", "delete"])
            .args(["--force", "--mode", "target", "--tid", "1"])
            .output();
        let _ = Command::new("tgtadm")
            .args(["-C", &self.control, "--op", "delete", "--mode", "system"])
            .output();
        std::thread::sleep(Duration::from_millis(300));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tgt_control(port: u16) -> String {
    (port % 1000 + 100).to_string()
}

/// A free port on tgt's address whose derived control port no other tgtd uses.
fn free_tgt_port() -> anyhow::Result<u16> {
    for _ in 0..50 {
        let port = TcpListener::bind((TGT_ADDRESS, 0))?.local_addr()?.port();
        let socket = format!("/var/run/tgtd/socket.{}", tgt_control(port));
        if !Path::new(&socket).exists() {
            return Ok(port);
        }
    }
    bail!("no free tgt control port")
}

/// The steps of shared/peers/tgt-reference.sh: tgtd in the foreground with its own control
/// port, one target, the file as LUN 1, open to all initiators.
fn start_tgt(file: &str, port: u16, iqn: &str) -> anyhow::Result<Tgt> {
    let control = tgt_control(port);
    let child = Command::new("tgtd")
        .args(["-f", "-C", &control, "--iscsi"])
        .arg(format!("portal={TGT_ADDRESS}:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting tgtd")?;
    let tgt = Tgt {
        child,
        control: control.clone(),
    };
    let tgtadm = |args: &[&str]| {
        Command::new("tgtadm")
            .args(["-C", &control])
            .args(args)
            .output()
    };
    for _ in 0..50 {
        if tgtadm(&["--op", "show", "--mode", "sys"]).is_ok_and(|o| o.status.success()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for args in [
        &[
            "--lld", "iscsi", "--op", "new", "--mode", "target", "--tid", "1", "-T", iqn,
        ][..],
        &[
            "--lld",
            "iscsi",
            "--op",
            "new",
            "--mode",
            "logicalunit",
            "--tid",
            "1",
            "--lun",
            "1",
            "-b",
            file,
        ],
        &[
            "--lld", "iscsi", "--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL",
        ],
    ] {
        let output = tgtadm(args)?;
        if !output.status.success() {
            bail!(
                "tgtadm {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
    Ok(tgt)
}

// ---------------------------------------------------------------------------------------------
// 2. Failover time.

fn failovers(
    cluster: &mut ProcessCluster,
    settings: &Settings,
    summary: &mut Summary,
) -> anyhow::Result<()> {
    let mut times_ms = Vec::new();
    for attempt in 0..settings.failovers {
        let roles = wait_in_sync(cluster, Duration::from_secs(180))?;
        let leader = leader_id(cluster);
        let standby = cairn_endpoint(cluster, roles.standby)?;
        // The disk takes writes through the primary, mirrored, right before the kill.
        let mut session = login_retrying(
            &cairn_endpoint(cluster, roles.primary)?,
            0x30,
            Duration::from_secs(30),
        )?;
        write_and_flush(&mut session, attempt * 8, Instant::now())?;
        let killed_utc = utc_now();
        let killed_at = Instant::now();
        kill_node(cluster, roles.primary)?;
        drop(session);
        let first = first_write_after(
            &standby,
            killed_at,
            Duration::from_secs(60),
            0x40 + attempt as u8,
        );
        let leader_note = if leader == Some(roles.primary) {
            " (also the Raft leader)"
        } else {
            ""
        };
        let refusal = first
            .last_error
            .as_ref()
            .map(|e| format!(", last refusal: {e}"))
            .unwrap_or_default();
        match first.flush_ms {
            Some(flush_ms) => {
                times_ms.push(flush_ms);
                summary.add(format!(
                    "failover {}: SIGKILL of primary node {}{leader_note} at {killed_utc}; on node {}: login after {:.0} ms, WRITE done after {:.0} ms, SYNCHRONIZE CACHE done after {flush_ms:.0} ms (at {}; {} tries{refusal}) (goal <= 2000 ms)",
                    attempt + 1,
                    roles.primary,
                    roles.standby,
                    first.login_ms.unwrap_or(f64::NAN),
                    first.write_ms.unwrap_or(f64::NAN),
                    first.done_utc,
                    first.tries,
                ));
            }
            None => summary.add(format!(
                "failover {}: SIGKILL of primary node {}{leader_note} at {killed_utc}; NO write+flush succeeded on node {} within 60 s ({} tries{refusal})",
                attempt + 1,
                roles.primary,
                roles.standby,
                first.tries,
            )),
        }
        restart_node(cluster, roles.primary)?;
        let again = wait_in_sync(cluster, Duration::from_secs(180))?;
        println!(
            "node {} restarted; {:.1} s after the kill the session is primary node {}, standby node {}, in sync",
            roles.primary,
            killed_at.elapsed().as_secs_f64(),
            again.primary,
            again.standby
        );
    }
    if !times_ms.is_empty() {
        summary.add(format!(
            "failover: kill to first write+flush: median {:.0} ms, worst {:.0} ms over {} (goal <= 2000 ms)",
            median(&times_ms),
            times_ms.iter().cloned().fold(0.0, f64::max),
            times_ms.len()
        ));
    }
    Ok(())
}

/// A 4 KiB WRITE, then SYNCHRONIZE CACHE; returns when each ended, in ms since `since`.
fn write_and_flush(
    session: &mut Session,
    block_index: u64,
    since: Instant,
) -> anyhow::Result<(f64, f64)> {
    let blocks = 4096 / session.block_size as u64;
    let data = vec![0x11u8; 4096];
    let (done, _) = session.command(&write_cdb(block_index * blocks, blocks as u32), &data, 0)?;
    done.check("WRITE")?;
    let write_ms = since.elapsed().as_secs_f64() * 1000.0;
    let (done, _) = session.command(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 0)?;
    done.check("SYNCHRONIZE CACHE")?;
    Ok((write_ms, since.elapsed().as_secs_f64() * 1000.0))
}

/// The first write and flush after a kill, in ms since the kill.
#[derive(Default)]
struct FirstWrite {
    login_ms: Option<f64>,
    write_ms: Option<f64>,
    flush_ms: Option<f64>,
    done_utc: String,
    tries: u32,
    last_error: Option<String>,
}

/// Tries a 4 KiB write and a flush against `endpoint` until both succeed (logging in again
/// after a connection error; a SCSI error is retried on the same session).
fn first_write_after(
    endpoint: &Endpoint,
    since: Instant,
    timeout: Duration,
    isid: u8,
) -> FirstWrite {
    let mut first = FirstWrite::default();
    let mut session: Option<Session> = None;
    while since.elapsed() < timeout {
        first.tries += 1;
        if session.is_none() {
            match Session::login(endpoint, isid, Duration::from_secs(5)) {
                Ok(s) => {
                    first.login_ms = Some(since.elapsed().as_secs_f64() * 1000.0);
                    session = Some(s);
                }
                Err(error) => {
                    first.last_error = Some(format!("{error:#}"));
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
            }
        }
        let live = session.as_mut().expect("logged in");
        match write_and_flush(live, 1, since) {
            Ok((write_ms, flush_ms)) => {
                first.done_utc = utc_now();
                first.write_ms = Some(write_ms);
                first.flush_ms = Some(flush_ms);
                return first;
            }
            Err(error) => {
                let text = format!("{error:#}");
                // A SCSI status: the session is fine, the target refused; anything else: log in
                // again.
                if !text.contains("status 0x") {
                    session = None;
                }
                first.last_error = Some(text);
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    first
}

// ---------------------------------------------------------------------------------------------
// 3. Resync throughput.

fn resync(
    cluster: &mut ProcessCluster,
    settings: &Settings,
    summary: &mut Summary,
) -> anyhow::Result<()> {
    // Every node runs again (the failovers restarted theirs); the fill is mirrored.
    let roles = wait_in_sync(cluster, Duration::from_secs(180))?;
    let fill_bytes = settings.resync_fill_mib * MIB;
    let mut session = login_retrying(
        &cairn_endpoint(cluster, roles.primary)?,
        0x50,
        Duration::from_secs(30),
    )?;
    let fill = write_load(
        &mut session,
        Pattern::Sequential64k,
        Stop::Bytes(fill_bytes),
        7,
    )?;
    let (done, _) = session.command(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 0)?;
    done.check("SYNCHRONIZE CACHE")?;
    session.logout();
    println!(
        "filled {} MiB sequentially through primary node {} (mirrored to node {}) at {:.1} MB/s",
        settings.resync_fill_mib,
        roles.primary,
        roles.standby,
        fill.megabytes_per_second()
    );
    let roles = wait_in_sync(cluster, Duration::from_secs(60))?;
    let third = cluster
        .nodes
        .iter()
        .map(|n| n.id)
        .find(|id| *id != roles.primary && *id != roles.standby)
        .context("a third node")?;
    let limit = resync_limit();
    println!("resync bandwidth limit: {limit}");

    let killed_utc = utc_now();
    let killed_at = Instant::now();
    kill_node(cluster, roles.standby)?;
    let timeout = Duration::from_secs(settings.resync_timeout_seconds);
    let mut assigned: Option<(u64, Duration)> = None;
    let mut last_progress: Option<Value> = None;
    let mut progress_changed_at = Instant::now();
    let mut printed_at = Instant::now();
    let mut copies_seen = false;
    // What `client show` said of the standby, each time it changed.
    let mut transitions: Vec<(Duration, String)> = Vec::new();
    let finished = loop {
        if killed_at.elapsed() > timeout {
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
        let Ok(shown) = client_show(cluster) else {
            continue;
        };
        let session = &shown["session"];
        if session["primary"].as_u64() != Some(roles.primary) {
            bail!(
                "the primary moved from node {} during the resync: {session}",
                roles.primary
            );
        }
        let standby = session["standby"].as_u64();
        let state = format!("standby {} {}", session["standby"], session["standby_copy"]);
        if transitions.last().is_none_or(|(_, last)| *last != state) {
            transitions.push((killed_at.elapsed(), state));
        }
        if let Some(new) = standby.filter(|s| *s != roles.standby) {
            assigned.get_or_insert((new, killed_at.elapsed()));
        }
        let primary_copy = shown["copies"]
            .as_array()
            .and_then(|copies| {
                copies
                    .iter()
                    .find(|c| c["node"].as_u64() == Some(roles.primary))
            })
            .map(|c| c["status"].clone());
        copies_seen |= primary_copy.is_some();
        if let Some(resync) = primary_copy
            .as_ref()
            .map(|s| s["resync"].clone())
            .filter(|r| !r.is_null())
        {
            if last_progress.as_ref().map(|p| &p["regions_done"]) != Some(&resync["regions_done"]) {
                progress_changed_at = Instant::now();
            }
            if printed_at.elapsed() > Duration::from_secs(2) {
                printed_at = Instant::now();
                println!(
                    "  {:>6.1} s  resync {}",
                    killed_at.elapsed().as_secs_f64(),
                    progress_line(&resync)
                );
            }
            last_progress = Some(resync);
        }
        if assigned.is_some() && progress_changed_at.elapsed() > Duration::from_secs(60) {
            bail!(
                "the resync stalled: no region done for 60 s; last progress {}, session {session}",
                last_progress.map(|p| p.to_string()).unwrap_or_default()
            );
        }
        if standby.is_some_and(|s| s != roles.standby) && session["standby_copy"] == "InSync" {
            let last = primary_copy
                .map(|s| s["last_resync"].clone())
                .filter(|r| !r.is_null());
            break Some((killed_at.elapsed(), last));
        }
    };
    restart_node(cluster, roles.standby)?;
    let transitions: Vec<String> = transitions
        .iter()
        .map(|(at, state)| format!("{:.2} s {state}", at.as_secs_f64()))
        .collect();
    summary.add(format!(
        "resync: the session's standby after the SIGKILL of node {}: {}",
        roles.standby,
        transitions.join(" -> ")
    ));
    let Some((in_sync_after, last_resync)) = finished else {
        summary.add(format!(
            "resync: NOT in sync {} s after the SIGKILL of standby node {} (assigned: {assigned:?}, last progress: {})",
            timeout.as_secs(),
            roles.standby,
            last_progress.map(|p| p.to_string()).unwrap_or_else(|| "none".into())
        ));
        return Ok(());
    };
    let (new_standby, assigned_after) = assigned.expect("a new standby once in sync");
    if new_standby != third {
        println!("(the new standby is node {new_standby}, not the third node {third})");
    }
    // The primary's own figures when `copies` reports them; the wall clock otherwise.
    let (bytes, seconds, how) = match &last_resync {
        Some(last) => (
            last["bytes_copied"].as_u64().unwrap_or(0),
            last["elapsed_ms"].as_u64().unwrap_or(0) as f64 / 1000.0,
            format!("primary's report: {}", progress_line(last)),
        ),
        None => {
            let written = session_written_bytes(cluster, roles.primary, settings.image_mib * MIB);
            (
                written,
                (in_sync_after - assigned_after).as_secs_f64(),
                format!(
                    "no resync report in `client show` (copies {}): written bytes over the time from the assignment to InSync",
                    if copies_seen { "present" } else { "absent" }
                ),
            )
        }
    };
    let resync_mib_per_second = bytes as f64 / MIB as f64 / seconds.max(1e-9);
    // The wall clock from the first assignment of the new standby to InSync: includes every
    // drop and restart of its resync, which the primary's figures (of the last run) do not.
    let written = session_written_bytes(cluster, roles.primary, settings.image_mib * MIB);
    let wall = (in_sync_after - assigned_after).as_secs_f64();
    let wall_mib_per_second = written as f64 / MIB as f64 / wall.max(1e-9);
    println!("measuring one raw TCP stream for comparison");
    let tcp = raw_tcp_mib_per_second(settings.tcp_mib * MIB)?;
    summary.add(format!(
        "resync: SIGKILL of standby node {} at {killed_utc}; node {new_standby} assigned after {:.2} s, in sync after {:.2} s; {:.1} MiB copied in {seconds:.2} s = {resync_mib_per_second:.1} MiB/s ({how})",
        roles.standby,
        assigned_after.as_secs_f64(),
        in_sync_after.as_secs_f64(),
        bytes as f64 / MIB as f64,
    ));
    summary.add(format!(
        "resync, wall clock: {:.1} MiB written on the primary, {wall:.2} s from the assignment of node {new_standby} to InSync = {wall_mib_per_second:.1} MiB/s",
        written as f64 / MIB as f64,
    ));
    summary.add(format!(
        "resync vs raw TCP ({} MiB, 127.0.{SUBNET}.1 -> 127.0.{SUBNET}.3, 1 MiB writes): {tcp:.1} MiB/s; the resync's own rate is {:.1}% of it, the wall-clock rate {:.1}% (goal >= 50%); bandwidth limit: {limit}",
        settings.tcp_mib,
        resync_mib_per_second * 100.0 / tcp.max(1e-9),
        wall_mib_per_second * 100.0 / tcp.max(1e-9)
    ));
    Ok(())
}

fn progress_line(resync: &Value) -> String {
    let mib = |v: &Value| v.as_u64().unwrap_or(0) as f64 / MIB as f64;
    format!(
        "{}/{} regions, {:.1} MiB copied at {:.1} MiB/s, {} ms elapsed, eta {} ms",
        resync["regions_done"],
        resync["regions_total"],
        mib(&resync["bytes_copied"]),
        mib(&resync["bytes_per_second"]),
        resync["elapsed_ms"],
        resync["eta_ms"]
    )
}

/// The primary's written blocks (4 KiB each) as its copy reports them (only with a digest,
/// which `client show` does not ask for), else the whole disk: the sequential writes of the
/// throughput runs covered all of it.
fn session_written_bytes(cluster: &ProcessCluster, primary: u64, disk_bytes: u64) -> u64 {
    let shown = client_show(cluster).unwrap_or(Value::Null);
    shown["copies"]
        .as_array()
        .and_then(|copies| copies.iter().find(|c| c["node"].as_u64() == Some(primary)))
        .and_then(|c| c["status"]["written_blocks"].as_u64())
        .map(|blocks| blocks * 4096)
        .unwrap_or(disk_bytes)
}

/// The limit a node's resync runs with: `MirrorConfig::default()` as `node/src/sessions.rs`
/// builds it, unless the node's sources set `resync_bytes_per_second_max` themselves. Read
/// from the sources of this checkout, so the figure printed follows the code measured.
fn resync_limit() -> String {
    let root = cairn_tests::workspace_root();
    let mirror =
        std::fs::read_to_string(root.join("blockstore/src/mirror/mod.rs")).unwrap_or_default();
    let default = mirror
        .split("impl Default for MirrorConfig")
        .nth(1)
        .and_then(|rest| {
            rest.lines()
                .find(|l| l.trim_start().starts_with("resync_bytes_per_second_max:"))
        })
        .map(|l| l.trim().trim_end_matches(',').to_string())
        .unwrap_or_else(|| "resync_bytes_per_second_max: unknown".into());
    let mut overrides = Vec::new();
    for file in [
        "node/src/sessions.rs",
        "node/src/config.rs",
        "node/src/storage.rs",
        "node/src/server.rs",
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap_or_default();
        for line in text
            .lines()
            .filter(|l| l.contains("resync_bytes_per_second_max"))
        {
            overrides.push(format!("{file}: {}", line.trim()));
        }
    }
    let value = default
        .rsplit(':')
        .next()
        .unwrap_or("")
        .trim()
        .replace('_', "");
    let meaning = match value.parse::<u64>() {
        Ok(0) => "none".to_string(),
        Ok(bytes) => format!("{:.1} MiB/s", bytes as f64 / MIB as f64),
        Err(_) => value.clone(),
    };
    if overrides.is_empty() {
        format!("{meaning} (MirrorConfig::default() {default}, and the node sets no other)")
    } else {
        format!(
            "MirrorConfig::default() {default} ({meaning}), and in the node: {}",
            overrides.join("; ")
        )
    }
}

/// One TCP stream from 127.0.SUBNET.1 to a listener on 127.0.SUBNET.3: `bytes` in 1 MiB
/// writes, the reader discarding; MiB/s from the connect to the reader's last byte.
fn raw_tcp_mib_per_second(bytes: u64) -> anyhow::Result<f64> {
    let listener = TcpListener::bind((Ipv4Addr::new(127, 0, SUBNET, 3), 0))?;
    let to = match listener.local_addr()? {
        SocketAddr::V4(address) => address,
        SocketAddr::V6(_) => bail!("an IPv4 listener"),
    };
    let reader = std::thread::spawn(move || -> anyhow::Result<(u64, Instant)> {
        let (mut stream, from) = listener.accept()?;
        anyhow::ensure!(
            from.ip() == Ipv4Addr::new(127, 0, SUBNET, 1),
            "connection from {from}"
        );
        let mut buffer = vec![0u8; MIB as usize];
        let mut received = 0u64;
        loop {
            let n = stream.read(&mut buffer)?;
            if n == 0 {
                return Ok((received, Instant::now()));
            }
            received += n as u64;
        }
    });
    let started = Instant::now();
    let mut stream = connect_from(Ipv4Addr::new(127, 0, SUBNET, 1), to)?;
    let mut block = vec![0u8; MIB as usize];
    XorShift(0x63).fill(&mut block);
    let mut sent = 0;
    while sent < bytes {
        stream.write_all(&block)?;
        sent += MIB;
    }
    drop(stream);
    let (received, ended) = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    anyhow::ensure!(received == sent, "sent {sent} bytes, received {received}");
    Ok(received as f64 / MIB as f64 / (ended - started).as_secs_f64())
}

/// A TCP connection from a chosen local address (bind before connect, which std lacks).
#[allow(unsafe_code)]
fn connect_from(from: Ipv4Addr, to: SocketAddrV4) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    let address = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let (local, remote) = (address(from, 0), address(*to.ip(), to.port()));
    let length = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a new socket owned by the TcpStream at once (closed on every path by its drop);
    // the addresses are valid sockaddr_in values that outlive the calls.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        if libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), length) != 0
            || libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), length) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stream)
    }
}

// ---------------------------------------------------------------------------------------------
// A small pipelined iSCSI initiator (RFC 7143): login without digests or authentication,
// SCSI commands with immediate, unsolicited and solicited (R2T) data, NOP-In answers, CmdSN
// window respected. Enough for writes at 32 in flight; reads go through iscsi-perf.

const BHS_LEN: usize = 48;
const TAG_NONE: u32 = 0xffff_ffff;

fn be32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn put32(bytes: &mut [u8], at: usize, value: u32) {
    bytes[at..at + 4].copy_from_slice(&value.to_be_bytes());
}

/// `a` is at or before `b` in serial number arithmetic (RFC 1982).
fn serial_at_or_before(a: u32, b: u32) -> bool {
    (b.wrapping_sub(a) as i32) >= 0
}

fn encode(bhs: &[u8; BHS_LEN], data: &[u8], out: &mut Vec<u8>) {
    let mut header = *bhs;
    let length = data.len() as u32;
    header[5..8].copy_from_slice(&length.to_be_bytes()[1..]);
    out.extend_from_slice(&header);
    out.extend_from_slice(data);
    out.resize(out.len() + (4 - data.len() % 4) % 4, 0);
}

fn text_pairs(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut text = Vec::new();
    for (key, value) in pairs {
        text.extend_from_slice(format!("{key}={value}").as_bytes());
        text.push(0);
    }
    text
}

struct Pdu {
    bhs: [u8; BHS_LEN],
    data: Vec<u8>,
}

impl Pdu {
    fn opcode(&self) -> u8 {
        self.bhs[0] & 0x3f
    }

    fn itt(&self) -> u32 {
        be32(&self.bhs, 16)
    }
}

/// Where a LUN is: portal, target name, LUN, and the initiator name to log in with.
struct Endpoint {
    portal: String,
    iqn: String,
    lun: u64,
    initiator: String,
}

/// A SCSI command's end.
struct Completion {
    itt: u32,
    response: u8,
    status: u8,
    sense: Vec<u8>,
}

impl Completion {
    fn check(&self, what: &str) -> anyhow::Result<()> {
        if self.response == 0 && self.status == 0 {
            return Ok(());
        }
        let (key, asc, ascq) = match self.sense.as_slice() {
            // Fixed format.
            [0x70 | 0x71, _, key, _, _, _, _, _, _, _, _, _, asc, ascq, ..] => {
                (key & 0x0f, *asc, *ascq)
            }
            // Descriptor format.
            [0x72 | 0x73, key, asc, ascq, ..] => (key & 0x0f, *asc, *ascq),
            _ => (0, 0, 0),
        };
        bail!(
            "{what}: response {:#x} status {:#04x}, sense key {key:#x} asc {asc:#04x} ascq {ascq:#04x}",
            self.response,
            self.status
        )
    }
}

struct Session {
    stream: TcpStream,
    received: Vec<u8>,
    buffer: Vec<u8>,
    cmd_sn: u32,
    exp_stat_sn: u32,
    max_cmd_sn: u32,
    lun: [u8; 8],
    /// The target's MaxRecvDataSegmentLength, FirstBurstLength, InitialR2T, ImmediateData.
    target_data_segment_max: usize,
    first_burst: usize,
    initial_r2t: bool,
    immediate_data: bool,
    block_size: u32,
    block_count: u64,
    next_itt: u32,
}

impl Session {
    /// Logs in (security stage, then operational), clears a unit attention, reads the
    /// capacity. `timeout` bounds the connect and every read from the socket.
    fn login(endpoint: &Endpoint, isid_tail: u8, timeout: Duration) -> anyhow::Result<Session> {
        let address: SocketAddr = endpoint.portal.parse().context("portal address")?;
        let stream = TcpStream::connect_timeout(&address, timeout)
            .with_context(|| format!("connecting to {}", endpoint.portal))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut lun = [0u8; 8];
        // SAM single-level peripheral addressing.
        lun[0..2].copy_from_slice(&(endpoint.lun as u16).to_be_bytes());
        let mut session = Session {
            stream,
            received: Vec::new(),
            buffer: vec![0; 256 * 1024],
            cmd_sn: 1,
            exp_stat_sn: 0,
            max_cmd_sn: 1,
            lun,
            target_data_segment_max: 8192,
            first_burst: 65536,
            initial_r2t: true,
            immediate_data: true,
            block_size: 512,
            block_count: 0,
            next_itt: 0x100,
        };
        let isid = [0x80, SUBNET, 0x00, 0x00, 0x00, isid_tail];
        let security = text_pairs(&[
            ("InitiatorName", &endpoint.initiator),
            ("TargetName", &endpoint.iqn),
            ("SessionType", "Normal"),
            ("AuthMethod", "None"),
        ]);
        let operational = text_pairs(&[
            ("HeaderDigest", "None"),
            ("DataDigest", "None"),
            ("ImmediateData", "Yes"),
            ("InitialR2T", "No"),
            ("MaxRecvDataSegmentLength", "262144"),
            ("FirstBurstLength", "65536"),
            ("MaxBurstLength", "262144"),
            ("MaxOutstandingR2T", "1"),
            ("ErrorRecoveryLevel", "0"),
            ("MaxConnections", "1"),
            ("DataPDUInOrder", "Yes"),
            ("DataSequenceInOrder", "Yes"),
        ]);
        let mut stage = 0u8;
        let mut keys_sent = false;
        let mut answered = Vec::new();
        let mut logged_in = false;
        for _ in 0..8 {
            let (next, keys) = if stage == 0 {
                (1, &security)
            } else {
                (3, &operational)
            };
            let data: &[u8] = if keys_sent { &[] } else { keys };
            keys_sent = true;
            let mut bhs = [0u8; BHS_LEN];
            bhs[0] = 0x40 | 0x03;
            bhs[1] = 0x80 | (stage << 2) | next;
            bhs[8..14].copy_from_slice(&isid);
            put32(&mut bhs, 16, 1);
            put32(&mut bhs, 24, session.cmd_sn);
            put32(&mut bhs, 28, session.exp_stat_sn);
            let mut out = Vec::new();
            encode(&bhs, data, &mut out);
            session.stream.write_all(&out)?;
            let response = session.recv()?;
            if response.opcode() != 0x23 {
                bail!(
                    "expected a login response, got opcode {:#x}",
                    response.opcode()
                );
            }
            if response.bhs[36] != 0 {
                bail!(
                    "login to {} refused: status class {} detail {}",
                    endpoint.portal,
                    response.bhs[36],
                    response.bhs[37]
                );
            }
            session.exp_stat_sn = be32(&response.bhs, 24).wrapping_add(1);
            session.max_cmd_sn = be32(&response.bhs, 32);
            if stage == 1 {
                answered.extend_from_slice(&response.data);
            }
            if response.bhs[1] & 0x80 != 0 {
                let next_stage = response.bhs[1] & 0x03;
                if next_stage == 3 {
                    logged_in = true;
                    break;
                }
                if next_stage != stage {
                    stage = next_stage;
                    keys_sent = false;
                }
            }
        }
        if !logged_in {
            bail!(
                "login to {} did not reach full feature phase",
                endpoint.portal
            );
        }
        for pair in answered.split(|b| *b == 0) {
            let pair = String::from_utf8_lossy(pair);
            if let Some((key, value)) = pair.split_once('=') {
                match key {
                    "MaxRecvDataSegmentLength" => {
                        session.target_data_segment_max = value.parse().unwrap_or(8192)
                    }
                    "FirstBurstLength" => session.first_burst = value.parse().unwrap_or(65536),
                    "InitialR2T" => session.initial_r2t = value == "Yes",
                    "ImmediateData" => session.immediate_data = value == "Yes",
                    _ => {}
                }
            }
        }
        session.clear_unit_attention()?;
        session.read_capacity()?;
        Ok(session)
    }

    fn recv(&mut self) -> anyhow::Result<Pdu> {
        loop {
            if self.received.len() >= BHS_LEN {
                let additional = self.received[4] as usize * 4;
                let data_length =
                    u32::from_be_bytes([0, self.received[5], self.received[6], self.received[7]])
                        as usize;
                let total = BHS_LEN + additional + data_length.div_ceil(4) * 4;
                if self.received.len() >= total {
                    let bhs: [u8; BHS_LEN] = self.received[..BHS_LEN].try_into().expect("48 bytes");
                    let start = BHS_LEN + additional;
                    let data = self.received[start..start + data_length].to_vec();
                    self.received.drain(..total);
                    return Ok(Pdu { bhs, data });
                }
            }
            let n = self
                .stream
                .read(&mut self.buffer)
                .context("receiving from the target")?;
            if n == 0 {
                bail!("the target closed the connection");
            }
            self.received.extend_from_slice(&self.buffer[..n]);
        }
    }

    fn take_itt(&mut self) -> u32 {
        self.next_itt = self.next_itt.wrapping_add(1);
        if self.next_itt == TAG_NONE {
            self.next_itt = 0x100;
        }
        self.next_itt
    }

    fn window_open(&self) -> bool {
        serial_at_or_before(self.cmd_sn, self.max_cmd_sn)
    }

    /// Appends a SCSI command, with the immediate and unsolicited data the session allows, to
    /// `out`; the rest of `write` waits for R2Ts.
    fn issue(&mut self, itt: u32, cdb: &[u8], write: &[u8], read_length: u32, out: &mut Vec<u8>) {
        let immediate = if self.immediate_data {
            self.first_burst
                .min(self.target_data_segment_max)
                .min(write.len())
        } else {
            0
        };
        let unsolicited_end = if self.initial_r2t {
            immediate
        } else {
            self.first_burst.min(write.len())
        };
        let mut bhs = [0u8; BHS_LEN];
        bhs[0] = 0x01;
        bhs[1] = if unsolicited_end == immediate {
            0x80
        } else {
            0
        } | if read_length > 0 { 0x40 } else { 0 }
            | if write.is_empty() { 0 } else { 0x20 }
            | 1;
        bhs[8..16].copy_from_slice(&self.lun);
        put32(&mut bhs, 16, itt);
        let expected = if write.is_empty() {
            read_length
        } else {
            write.len() as u32
        };
        put32(&mut bhs, 20, expected);
        put32(&mut bhs, 24, self.cmd_sn);
        put32(&mut bhs, 28, self.exp_stat_sn);
        bhs[32..32 + cdb.len()].copy_from_slice(cdb);
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        encode(&bhs, &write[..immediate], out);
        self.data_out(itt, TAG_NONE, write, immediate, unsolicited_end, out);
    }

    fn data_out(&self, itt: u32, ttt: u32, data: &[u8], from: usize, to: usize, out: &mut Vec<u8>) {
        let mut at = from;
        let mut data_sn = 0;
        while at < to {
            let end = (at + self.target_data_segment_max).min(to);
            let mut bhs = [0u8; BHS_LEN];
            bhs[0] = 0x05;
            bhs[1] = if end == to { 0x80 } else { 0 };
            bhs[8..16].copy_from_slice(&self.lun);
            put32(&mut bhs, 16, itt);
            put32(&mut bhs, 20, ttt);
            put32(&mut bhs, 28, self.exp_stat_sn);
            put32(&mut bhs, 36, data_sn);
            put32(&mut bhs, 40, at as u32);
            encode(&bhs, &data[at..end], out);
            data_sn += 1;
            at = end;
        }
    }

    /// Receives one PDU and handles it: R2Ts are answered from `pending` (the data of each
    /// write in flight), NOP-In pings answered, Data-In gathered into `read`. Returns the
    /// command that ended, if one did.
    fn poll(
        &mut self,
        pending: &HashMap<u32, Vec<u8>>,
        read: &mut Vec<u8>,
    ) -> anyhow::Result<Option<Completion>> {
        let pdu = self.recv()?;
        if matches!(pdu.opcode(), 0x20..=0x26 | 0x31 | 0x32 | 0x3f) {
            let max_cmd_sn = be32(&pdu.bhs, 32);
            if serial_at_or_before(self.max_cmd_sn, max_cmd_sn) {
                self.max_cmd_sn = max_cmd_sn;
            }
        }
        let sense_of = |data: &[u8]| -> Vec<u8> {
            if data.len() < 2 {
                return Vec::new();
            }
            let length = u16::from_be_bytes([data[0], data[1]]) as usize;
            data[2..(2 + length).min(data.len())].to_vec()
        };
        match pdu.opcode() {
            0x21 => {
                self.exp_stat_sn = be32(&pdu.bhs, 24).wrapping_add(1);
                Ok(Some(Completion {
                    itt: pdu.itt(),
                    response: pdu.bhs[2],
                    status: pdu.bhs[3],
                    sense: sense_of(&pdu.data),
                }))
            }
            0x25 => {
                let offset = be32(&pdu.bhs, 40) as usize;
                if read.len() < offset + pdu.data.len() {
                    read.resize(offset + pdu.data.len(), 0);
                }
                read[offset..offset + pdu.data.len()].copy_from_slice(&pdu.data);
                if pdu.bhs[1] & 0x01 == 0 {
                    return Ok(None);
                }
                self.exp_stat_sn = be32(&pdu.bhs, 24).wrapping_add(1);
                Ok(Some(Completion {
                    itt: pdu.itt(),
                    response: 0,
                    status: pdu.bhs[3],
                    sense: Vec::new(),
                }))
            }
            0x31 => {
                let (itt, ttt) = (pdu.itt(), be32(&pdu.bhs, 20));
                let (offset, length) = (be32(&pdu.bhs, 40) as usize, be32(&pdu.bhs, 44) as usize);
                let data = pending
                    .get(&itt)
                    .with_context(|| format!("R2T for task {itt:#x}, which sends no data"))?;
                if offset + length > data.len() {
                    bail!("R2T beyond the data of task {itt:#x}: {offset}+{length}");
                }
                let mut out = Vec::new();
                self.data_out(itt, ttt, data, offset, offset + length, &mut out);
                self.stream.write_all(&out)?;
                Ok(None)
            }
            0x20 => {
                let ttt = be32(&pdu.bhs, 20);
                if ttt != TAG_NONE {
                    let mut bhs = [0u8; BHS_LEN];
                    bhs[0] = 0x40;
                    bhs[1] = 0x80;
                    bhs[8..16].copy_from_slice(&pdu.bhs[8..16]);
                    put32(&mut bhs, 16, TAG_NONE);
                    put32(&mut bhs, 20, ttt);
                    put32(&mut bhs, 24, self.cmd_sn);
                    put32(&mut bhs, 28, self.exp_stat_sn);
                    let mut out = Vec::new();
                    encode(&bhs, &[], &mut out);
                    self.stream.write_all(&out)?;
                }
                Ok(None)
            }
            0x32 => {
                if pdu.bhs[36] == 1 {
                    bail!("the target asks for a logout");
                }
                Ok(None)
            }
            0x3f => bail!("the target rejected a PDU: reason {:#x}", pdu.bhs[2]),
            other => bail!("unexpected PDU, opcode {other:#x}"),
        }
    }

    /// One command, waited for.
    fn command(
        &mut self,
        cdb: &[u8],
        write: &[u8],
        read_length: u32,
    ) -> anyhow::Result<(Completion, Vec<u8>)> {
        let itt = self.take_itt();
        let mut out = Vec::new();
        self.issue(itt, cdb, write, read_length, &mut out);
        self.stream.write_all(&out)?;
        let pending = HashMap::from([(itt, write.to_vec())]);
        let mut read = Vec::new();
        loop {
            if let Some(done) = self.poll(&pending, &mut read)? {
                if done.itt == itt {
                    return Ok((done, read));
                }
            }
        }
    }

    /// TEST UNIT READY until GOOD: a new nexus may first get a unit attention (tgt reports
    /// POWER ON RESET).
    fn clear_unit_attention(&mut self) -> anyhow::Result<()> {
        let mut last = None;
        for _ in 0..5 {
            let (done, _) = self.command(&[0; 6], &[], 0)?;
            if done.check("TEST UNIT READY").is_ok() {
                return Ok(());
            }
            last = Some(done);
        }
        last.expect("a try").check("TEST UNIT READY")
    }

    fn read_capacity(&mut self) -> anyhow::Result<()> {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x9e;
        cdb[1] = 0x10;
        put32(&mut cdb, 10, 32);
        let (done, data) = self.command(&cdb, &[], 32)?;
        if done.check("READ CAPACITY(16)").is_ok() && data.len() >= 12 {
            self.block_count = u64::from_be_bytes(data[0..8].try_into().expect("8 bytes")) + 1;
            self.block_size = be32(&data, 8);
            return Ok(());
        }
        let (done, data) = self.command(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 8)?;
        done.check("READ CAPACITY(10)")?;
        anyhow::ensure!(
            data.len() >= 8,
            "READ CAPACITY(10) returned {} bytes",
            data.len()
        );
        self.block_count = be32(&data, 0) as u64 + 1;
        self.block_size = be32(&data, 4);
        Ok(())
    }

    /// Best effort: asks to close the session and waits briefly for the answer.
    fn logout(mut self) {
        let mut bhs = [0u8; BHS_LEN];
        bhs[0] = 0x40 | 0x06;
        bhs[1] = 0x80;
        put32(&mut bhs, 16, self.take_itt());
        put32(&mut bhs, 24, self.cmd_sn);
        put32(&mut bhs, 28, self.exp_stat_sn);
        let mut out = Vec::new();
        encode(&bhs, &[], &mut out);
        if self.stream.write_all(&out).is_ok() {
            let _ = self.stream.set_read_timeout(Some(Duration::from_secs(2)));
            for _ in 0..16 {
                match self.recv() {
                    Ok(pdu) if pdu.opcode() == 0x26 => break,
                    Ok(_) => continue,
                    Err(_) => break,
                }
            }
        }
    }
}

fn write_cdb(lba: u64, blocks: u32) -> Vec<u8> {
    if lba + blocks as u64 <= u32::MAX as u64 && blocks <= u16::MAX as u32 {
        let mut cdb = vec![0x2a, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        cdb[2..6].copy_from_slice(&(lba as u32).to_be_bytes());
        cdb[7..9].copy_from_slice(&(blocks as u16).to_be_bytes());
        cdb
    } else {
        let mut cdb = vec![0x8a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        cdb[2..10].copy_from_slice(&lba.to_be_bytes());
        cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
        cdb
    }
}

#[derive(Clone, Copy)]
enum Pattern {
    /// 4 KiB at random 4 KiB-aligned offsets.
    Random4k,
    /// 64 KiB one after the other from offset 0, wrapping at the end of the disk.
    Sequential64k,
}

#[derive(Clone, Copy)]
enum Stop {
    After(Duration),
    Bytes(u64),
}

struct Load {
    commands: u64,
    bytes: u64,
    elapsed: Duration,
}

impl Load {
    fn iops(&self) -> f64 {
        self.commands as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn megabytes_per_second(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Writes with [`IN_FLIGHT`] commands in flight (fewer if the target's CmdSN window is
/// smaller) until `stop`, then waits for the last ones. Each write's data is random, with a
/// counter in its first bytes, so no two are alike.
fn write_load(
    session: &mut Session,
    pattern: Pattern,
    stop: Stop,
    seed: u64,
) -> anyhow::Result<Load> {
    let write_bytes: u64 = match pattern {
        Pattern::Random4k => 4096,
        Pattern::Sequential64k => 65536,
    };
    let blocks = write_bytes / session.block_size as u64;
    let slots = session.block_count / blocks;
    anyhow::ensure!(slots > 0, "a disk of {} blocks", session.block_count);
    let mut random = XorShift(0x9e37_79b9_7f4a_7c15 ^ seed.wrapping_mul(0x1000_0001));
    let mut template = vec![0u8; write_bytes as usize];
    random.fill(&mut template);
    let mut pending: HashMap<u32, Vec<u8>> = HashMap::new();
    let mut next_slot = 0u64;
    let mut issued_bytes = 0u64;
    let mut counter = 0u64;
    let (mut commands, mut bytes) = (0u64, 0u64);
    let mut out = Vec::new();
    let mut read = Vec::new();
    let started = Instant::now();
    loop {
        let stopping = match stop {
            Stop::After(duration) => started.elapsed() >= duration,
            Stop::Bytes(total) => issued_bytes >= total,
        };
        while !stopping && pending.len() < IN_FLIGHT && session.window_open() {
            let slot = match pattern {
                Pattern::Random4k => random.next() % slots,
                Pattern::Sequential64k => {
                    let slot = next_slot;
                    next_slot = (next_slot + 1) % slots;
                    slot
                }
            };
            let mut data = template.clone();
            counter += 1;
            data[..8].copy_from_slice(&counter.to_le_bytes());
            let itt = session.take_itt();
            session.issue(
                itt,
                &write_cdb(slot * blocks, blocks as u32),
                &data,
                0,
                &mut out,
            );
            pending.insert(itt, data);
            issued_bytes += write_bytes;
            if let Stop::Bytes(total) = stop {
                if issued_bytes >= total {
                    break;
                }
            }
        }
        if !out.is_empty() {
            session.stream.write_all(&out).context("sending writes")?;
            out.clear();
        }
        if pending.is_empty() {
            if stopping {
                break;
            }
            bail!("the target's CmdSN window is closed with nothing in flight");
        }
        if let Some(done) = session.poll(&pending, &mut read)? {
            if pending.remove(&done.itt).is_none() {
                bail!("an answer for task {:#x}, which is not in flight", done.itt);
            }
            done.check("WRITE")?;
            commands += 1;
            bytes += write_bytes;
        }
    }
    Ok(Load {
        commands,
        bytes,
        elapsed: started.elapsed(),
    })
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn fill(&mut self, bytes: &mut [u8]) {
        for chunk in bytes.chunks_mut(8) {
            let value = self.next().to_le_bytes();
            chunk.copy_from_slice(&value[..chunk.len()]);
        }
    }
}
