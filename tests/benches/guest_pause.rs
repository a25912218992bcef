//! The pause a running machine sees when its disk's node dies: three real nodes in the
//! network-namespace lab, a qemu (TCG) machine booted with iPXE from them that runs Linux on a
//! multipathed Cairn disk (iscsid on both paths of the iBFT, multipathd with `prio alua`, the
//! settings of README's "Client operating systems"), and a workload in it that appends numbered
//! records with fsync and reports each one with the guest's uptime before and after. For each
//! round a fresh machine boots, writes 20 records, and its primary node is faulted:
//!
//! - SIGKILL (the process dies, its TCP connections are reset), or
//! - SIGSTOP (a hung node: nothing answers, only the initiator's NOP-Out timeout tells).
//!
//! Per round it prints where the seconds went, each from the fault: when the standby asked for
//! the failover (its "primary silent" in the nodes' logs), when the cluster had committed it
//! (the CLI polled every 50 ms), how long the promoted standby waited out the old primary's
//! lease (its log), when the workload's next record came, and the longest pause the workload
//! saw (the guest-visible I/O pause); then median and max per fault. Every round also
//! checks what the test `guest_failover` checks (no I/O error, every record read back).
//! Goal: at most 5 s, both faults.
//!
//! `cargo bench -p cairn-tests --bench guest_pause`. Environment: `BENCH_FAULTS` (5: rounds per
//! fault). Needs root, qemu, Debian's ipxe, ovmf, open-iscsi, multipath-tools and udev; a
//! missing one is reported and the benchmark exits 0. Traffic stays inside the lab's
//! namespaces. It prints figures and goals; it asserts nothing beyond the guest's survival.

use std::time::Instant;

use cairn_tests::bench::env_u64;
use cairn_tests::guest::{self, fault_primary, Fault, Guest, Survived};
use cairn_tests::pxe::{build_multipath_disk, without_escapes, Firmware, LabCluster};

const BENCH: &str = "guest_pause";
const GOAL_SECONDS: f64 = 5.0;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if let Some(reason) = guest::unmet_prerequisite() {
        println!("{BENCH}: skipped: {reason}");
        return;
    }
    let rounds = env_u64("BENCH_FAULTS", 5);
    let started = Instant::now();
    let mut cluster = match LabCluster::start(3) {
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
    if let Err(error) = run(&mut cluster, rounds) {
        eprintln!("{BENCH}: failed: {error:#}");
        eprintln!("{}", cluster.logs(40));
        guest::keep_consoles(&cluster, BENCH);
        drop(cluster);
        std::process::exit(1);
    }
}

fn run(cluster: &mut LabCluster, rounds: u64) -> anyhow::Result<()> {
    let disk = build_multipath_disk(cluster.dir.path(), "pause", "CAIRN-PAUSE-GUEST")?;
    cluster.cli_ok(&["image", "import", "pause", disk.to_str().expect("utf-8")])?;
    cluster.wait_images_ready(&["pause"])?;
    let log = |what: &str| println!("{BENCH}:   {what}");
    let mut results: Vec<(Fault, Vec<Survived>)> = Vec::new();
    let mut client = 0u8;
    for fault in [Fault::Kill, Fault::Stop] {
        let mut survived = Vec::new();
        for round in 1..=rounds {
            client += 1;
            let mac = format!("52:54:00:77:01:{client:02x}");
            cluster.cli_ok(&["client", "add", &mac, "--name", &format!("pause-{client}")])?;
            cluster.cli_ok(&[
                "assign",
                "pause",
                "--client",
                &mac,
                "--mode",
                "non-persistent",
            ])?;
            let mut machine = Guest::boot(cluster, Firmware::Bios, &mac, &format!("p{client}"))?;
            let outcome = fault_primary(cluster, &mut machine, &mac, fault, &log)?;
            machine.stop()?;
            let (asked, lease_wait) = failover_in_logs(cluster, &mac, outcome.faulted_at);
            let seconds = |s: Option<f64>| s.map_or("?".into(), |s| format!("{s:.2}"));
            println!(
                "{BENCH}: {fault:?} round {round}: pause {:.2} s; the standby asked for the \
                 failover after {} s, committed after {:.2} s, lease wait {} s, workload went \
                 on after {:.2} s",
                outcome.pause,
                seconds(asked),
                outcome.failover_committed.as_secs_f64(),
                seconds(lease_wait),
                outcome.went_on.as_secs_f64()
            );
            survived.push(outcome);
        }
        results.push((fault, survived));
    }
    for (fault, survived) in &results {
        let pauses: Vec<f64> = survived.iter().map(|s| s.pause).collect();
        let committed: Vec<f64> = survived
            .iter()
            .map(|s| s.failover_committed.as_secs_f64())
            .collect();
        let went_on: Vec<f64> = survived.iter().map(|s| s.went_on.as_secs_f64()).collect();
        let (median, max) = median_max(&pauses);
        println!(
            "{BENCH}: {fault:?} x{}: guest-visible pause median {median:.2} s, max {max:.2} s \
             (goal <= {GOAL_SECONDS:.0} s: {}); failover committed median {:.2} s; workload \
             went on median {:.2} s",
            pauses.len(),
            if max <= GOAL_SECONDS { "met" } else { "missed" },
            median_max(&committed).0,
            median_max(&went_on).0,
        );
    }
    Ok(())
}

/// From the nodes' logs: seconds from the fault until the standby asked for the failover
/// ("primary silent"), and the promoted standby's wait for the old primary's lease.
fn failover_in_logs(
    cluster: &LabCluster,
    mac: &str,
    faulted_at: std::time::SystemTime,
) -> (Option<f64>, Option<f64>) {
    let faulted = faulted_at
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() % 86_400.0);
    let mut asked = None;
    let mut lease_wait = None;
    for node in &cluster.nodes {
        let log = std::fs::read_to_string(cluster.dir.path().join(format!("node{}.log", node.id)))
            .unwrap_or_default();
        for line in without_escapes(&log).lines() {
            if !line.contains(&format!("client_mac={mac}")) {
                continue;
            }
            let Some(at) = time_of_day(line) else {
                continue;
            };
            if at < faulted {
                continue;
            }
            if line.contains("primary silent") && asked.is_none() {
                asked = Some(at - faulted);
            }
            if line.contains("promoted: serving after failover") {
                lease_wait = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("lease_wait_ms="))
                    .and_then(|ms| ms.parse::<f64>().ok())
                    .map(|ms| ms / 1000.0);
            }
        }
    }
    (asked, lease_wait)
}

/// Seconds since midnight (UTC) of a log line that starts with an RFC 3339 time.
fn time_of_day(line: &str) -> Option<f64> {
    let time = line.get(11..26)?; // HH:MM:SS.ffffff
    let mut parts = time.split(':');
    let hours: f64 = parts.next()?.parse().ok()?;
    let minutes: f64 = parts.next()?.parse().ok()?;
    let seconds: f64 = parts.next()?.parse().ok()?;
    Some(hours * 3600.0 + minutes * 60.0 + seconds)
}

fn median_max(values: &[f64]) -> (f64, f64) {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    let max = sorted.last().copied().unwrap_or(0.0);
    (median, max)
}
