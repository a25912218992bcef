//! A running Linux guest on a multipathed Cairn disk ([`build_multipath_disk`]): boot it, watch
//! its workload's records, have it check them back, and measure the pauses it saw. Shared by
//! the end-to-end test (`tests/tests/guest_failover.rs`) and the pause benchmark
//! (`tests/benches/guest_pause.rs`).
//!
//! [`build_multipath_disk`]: crate::pxe::build_multipath_disk

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

use crate::pxe::{multipath_guest as says, tail, Firmware, LabCluster, Qemu};

/// Why this machine cannot run a multipath guest, if it cannot: the PXE lab's prerequisites,
/// and what the guest's initramfs is built from.
pub fn unmet_prerequisite() -> Option<String> {
    if let Some(reason) = crate::pxe::unmet_prerequisite() {
        return Some(reason);
    }
    for (path, package) in [
        ("/usr/sbin/iscsid", "open-iscsi"),
        ("/usr/sbin/iscsiadm", "open-iscsi"),
        ("/sbin/multipathd", "multipath-tools"),
        ("/sbin/kpartx", "kpartx"),
        ("/usr/sbin/dmsetup", "dmsetup"),
        ("/lib/systemd/systemd-udevd", "udev"),
        ("/usr/share/OVMF/OVMF_CODE_4M.fd", "ovmf"),
        (
            "/usr/lib/systemd/boot/efi/linuxx64.efi.stub",
            "systemd-boot-efi",
        ),
    ] {
        if !std::path::Path::new(path).exists() {
            return Some(format!("{path} is missing (package {package})"));
        }
    }
    None
}

/// Copies the guests' consoles and the nodes' logs out of the lab's directory (removed with the
/// cluster) into `<tmp>/cairn-<what>`, for a failed run.
pub fn keep_consoles(cluster: &LabCluster, what: &str) {
    let kept = std::env::temp_dir().join(format!("cairn-{what}"));
    let _ = std::fs::create_dir_all(&kept);
    for entry in std::fs::read_dir(cluster.dir.path())
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name();
        if name.to_string_lossy().ends_with(".log") {
            let _ = std::fs::copy(entry.path(), kept.join(&name));
        }
    }
    eprintln!(
        "the guests' consoles and the nodes' logs are in {}",
        kept.display()
    );
}

/// How long a TCG guest may take from power-on to its workload.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// One record of the workload: written and fsynced between `before` and `after` (the guest's
/// uptime, in seconds).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Record {
    pub number: u64,
    pub before: f64,
    pub after: f64,
}

impl Record {
    /// How long the write and its fsync took, as the guest saw it.
    pub fn pause(&self) -> f64 {
        self.after - self.before
    }
}

/// A booted guest running its workload.
pub struct Guest {
    pub qemu: Qemu,
    /// Records found on the disk when the workload started.
    pub found_at_boot: u64,
}

impl Guest {
    /// Powers on `mac` and waits until its workload runs.
    pub fn boot(
        cluster: &LabCluster,
        firmware: Firmware,
        mac: &str,
        run: &str,
    ) -> anyhow::Result<Guest> {
        let mut qemu = Qemu::start(&cluster.lab, cluster.dir.path(), firmware, mac, run)?;
        qemu.wait_for_marker(
            &format!("{} ", says::STARTED),
            &[crate::pxe::guest::FAILED, says::IO_FAILED],
            BOOT_TIMEOUT,
        )?;
        let console = qemu.console();
        let found_at_boot = console
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{} ", says::STARTED)))
            .and_then(|n| n.trim().parse().ok())
            .context("the workload's first line")?;
        Ok(Guest {
            qemu,
            found_at_boot,
        })
    }

    fn console(&self) -> String {
        self.qemu.console()
    }

    /// Every record the guest reported so far, in order.
    pub fn records(&self) -> Vec<Record> {
        parse_records(&self.console())
    }

    /// The last record reported, if any.
    pub fn last_record(&self) -> Option<Record> {
        self.records().last().copied()
    }

    /// The addresses of the nodes the multipath device's paths go to, as the guest last
    /// reported them (a disk's name may be reused for another node's path).
    pub fn path_nodes(&self) -> Vec<String> {
        self.console()
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix(says::PATHS))
            .map(|paths| {
                paths
                    .split_whitespace()
                    .filter_map(|p| p.split_once('@').map(|(_, node)| node.to_owned()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until the multipath device has a path to the node at `address`.
    pub fn wait_path_to(&self, address: &str, timeout: Duration) -> anyhow::Result<Vec<String>> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            let nodes = self.path_nodes();
            if nodes.iter().any(|n| n == address) {
                return Ok(nodes);
            }
            if Instant::now() > deadline {
                bail!(
                    "no path to {address} after {timeout:?} (paths to {nodes:?}):\n{}",
                    tail(&self.console(), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Fails if the guest reported an I/O error to its workload or died.
    pub fn check_alive(&self) -> anyhow::Result<()> {
        let console = self.console();
        for bad in [says::IO_FAILED, crate::pxe::guest::FAILED, says::VERIFY_BAD] {
            if console.contains(bad) {
                bail!("the guest says {bad}:\n{}", tail(&console, 40));
            }
        }
        Ok(())
    }

    /// Waits until the record `number` is reported; fails on an I/O error or after `timeout`.
    pub fn wait_record(&self, number: u64, timeout: Duration) -> anyhow::Result<Record> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            if let Some(record) = self.records().into_iter().find(|r| r.number >= number) {
                return Ok(record);
            }
            if Instant::now() > deadline {
                bail!(
                    "record {number} not written after {timeout:?}:\n{}",
                    tail(&self.console(), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Has the guest read its records back from the disk (page cache dropped) and returns how
    /// many it found in order from 1; fails if the kernel logged an I/O error above multipath.
    pub fn verify(&mut self) -> anyhow::Result<u64> {
        let before = self.console().matches(says::VERIFIED).count();
        self.qemu
            .type_text(&format!("{}\r", says::VERIFY_COMMAND))?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let console = self.console();
            if console.matches(says::VERIFIED).count() > before {
                return verified(&console);
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                bail!("no answer to verify:\n{}", tail(&console, 40));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Has the guest verify, unmount and power off; returns the verified count.
    pub fn stop(mut self) -> anyhow::Result<u64> {
        self.qemu.type_text(&format!("{}\r", says::STOP_COMMAND))?;
        self.qemu.wait_for_marker(
            says::STOPPED,
            &[says::IO_FAILED, says::VERIFY_BAD],
            self.qemu.started.elapsed() + Duration::from_secs(120),
        )?;
        verified(&self.console())
    }
}

/// What happens to a guest's primary node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL: the process dies, the kernel resets its TCP connections.
    Kill,
    /// SIGSTOP: a hung node; its connections stay open and nothing answers.
    Stop,
}

/// Records the workload writes before a fault, and after it before the guest is checked.
pub const RECORDS_BEFORE: u64 = 20;
pub const RECORDS_AFTER: u64 = 30;
/// How long a guest may stand still after a fault before the run gives up (the goal is 5 s;
/// this only bounds a broken run).
pub const RECOVERY_TIMEOUT: Duration = Duration::from_secs(120);

/// What a guest went through when its primary was faulted.
#[derive(Clone, Copy, Debug)]
pub struct Survived {
    /// The longest pause the workload saw from the last record before the fault on, in seconds.
    pub pause: f64,
    /// From the fault until the cluster committed the failover (a new generation, the standby
    /// primary), as the CLI saw it.
    pub failover_committed: Duration,
    /// From the fault until the workload's first record after it.
    pub went_on: Duration,
    /// The last record the guest reported before it was asked to check them.
    pub last: u64,
    /// When the fault happened, on the wall clock (the nodes' logs use it).
    pub faulted_at: std::time::SystemTime,
}

/// Faults `mac`'s primary while `guest` writes; waits until the workload went on, has the guest
/// read every record back, checks that the standby took over at a new generation, and brings
/// the node back (a new process, or SIGCONT).
pub fn fault_primary(
    cluster: &mut LabCluster,
    guest: &mut Guest,
    mac: &str,
    fault: Fault,
    log: &dyn Fn(&str),
) -> anyhow::Result<Survived> {
    guest.wait_record(guest.found_at_boot + 1 + RECORDS_BEFORE, RECOVERY_TIMEOUT)?;
    let before = session(cluster, mac)?;
    let primary = before["primary"].as_u64().context("a primary")?;
    let standby = before["standby"].as_u64().context("a standby")?;
    let generation = before["generation"].as_u64().context("a generation")?;
    let at_fault = guest.last_record().map_or(0, |r| r.number);
    let faulted = Instant::now();
    let faulted_at = std::time::SystemTime::now();
    match fault {
        Fault::Kill => cluster.node_mut(primary).kill(),
        Fault::Stop => cluster.node_mut(primary).pause()?,
    }
    log(&format!(
        "{fault:?} of node {primary} (the primary; standby {standby}) at record {at_fault}"
    ));
    let mut committed = None;
    let mut went_on = None;
    while committed.is_none() || went_on.is_none() {
        if went_on.is_none() && guest.last_record().is_some_and(|r| r.number > at_fault + 1) {
            went_on = Some(faulted.elapsed());
        }
        if committed.is_none() {
            // While the Raft leader changes, a request may fail; ask again.
            let now = session(cluster, mac).unwrap_or_default();
            if now["generation"].as_u64() > Some(generation) {
                committed = Some(faulted.elapsed());
                anyhow::ensure!(
                    now["primary"].as_u64() == Some(standby),
                    "the standby took over: {before} -> {now}"
                );
            }
        }
        guest.check_alive()?;
        anyhow::ensure!(
            faulted.elapsed() < RECOVERY_TIMEOUT,
            "after {RECOVERY_TIMEOUT:?}: failover committed {committed:?}, workload went on \
             {went_on:?}:\n{}",
            tail(&guest.console(), 40)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let went_on_record = guest.wait_record(at_fault + RECORDS_AFTER, RECOVERY_TIMEOUT)?;
    let pause = longest_pause(&guest.records(), at_fault);
    let last = guest.last_record().map_or(0, |r| r.number);
    let verified = guest.verify()?;
    anyhow::ensure!(
        verified >= last,
        "the guest reported record {last} written, but only {verified} read back"
    );
    log(&format!(
        "record {} written after the fault, {verified} read back; longest pause {pause:.2}s",
        went_on_record.number
    ));
    match fault {
        Fault::Kill => cluster.start_node(primary as u8)?,
        Fault::Stop => cluster.node_mut(primary).resume()?,
    }
    Ok(Survived {
        pause,
        failover_committed: committed.unwrap_or_default(),
        went_on: went_on.unwrap_or_default(),
        last,
        faulted_at,
    })
}

/// Waits until `mac`'s session has a standby in sync (one a failover can promote); returns the
/// session.
pub fn wait_standby_in_sync(
    cluster: &LabCluster,
    mac: &str,
    timeout: Duration,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let now = session(cluster, mac).unwrap_or_default();
        if now["standby"].is_u64() && now["standby_copy"] == "InSync" {
            return Ok(now);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{mac}'s standby not in sync within {timeout:?}: {now}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn session(cluster: &LabCluster, mac: &str) -> anyhow::Result<Value> {
    Ok(cluster.cli_json(&["client", "show", mac])?["session"].clone())
}

/// The last `CAIRN-VERIFIED n` of `console`, after checking that no kernel error came with it.
fn verified(console: &str) -> anyhow::Result<u64> {
    let errors: Vec<&str> = console
        .lines()
        .filter(|l| l.starts_with(says::KERNEL_ERROR))
        .collect();
    if !errors.is_empty() {
        bail!(
            "the guest's kernel logged I/O errors above multipath:\n{}",
            errors.join("\n")
        );
    }
    if console.contains(says::VERIFY_BAD) {
        bail!(
            "a record is missing or out of order:\n{}",
            tail(console, 20)
        );
    }
    console
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix(&format!("{} ", says::VERIFIED)))
        .and_then(|n| n.trim().parse().ok())
        .context("the verified count")
}

/// The records in a console, skipping lines the serial console garbled (a line typed in the
/// middle of one).
pub fn parse_records(console: &str) -> Vec<Record> {
    let prefix = format!("{} ", says::RECORD);
    console
        .lines()
        .filter_map(|line| {
            let mut words = line.strip_prefix(&prefix)?.split_whitespace();
            let number = words.next()?.parse().ok()?;
            let before = words.next()?.parse().ok()?;
            let after = words.next()?.parse().ok()?;
            Some(Record {
                number,
                before,
                after,
            })
        })
        .collect()
}

/// The longest pause among `records` after record `from` (the record last seen before a fault),
/// including the gap between one record's end and the next one's start.
pub fn longest_pause(records: &[Record], from: u64) -> f64 {
    let after: Vec<&Record> = records.iter().filter(|r| r.number >= from).collect();
    let own = after.iter().map(|r| r.pause()).fold(0.0, f64::max);
    let gaps = after
        .windows(2)
        .map(|w| w[1].before - w[0].after)
        .fold(0.0, f64::max);
    own.max(gaps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_pauses_parse_from_a_console() {
        let console = "noise\nCAIRN-REC 1 10.00 10.02\nCAIRN-REC 2 10.05 13.55\nCAIRN-REC 3 \
                       13.60 13.61\nCAIRN-REC garbled\nCAIRN-REC 4 15.61 15.62\n";
        let records = parse_records(console);
        assert_eq!(records.len(), 4);
        assert_eq!(records[1].number, 2);
        assert!((longest_pause(&records, 1) - 3.5).abs() < 1e-9);
        // From record 3 on, the longest is the gap between 3's end and 4's start.
        assert!((longest_pause(&records, 3) - 2.0).abs() < 1e-9);
    }
}
