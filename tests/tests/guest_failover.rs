//! A running machine survives the death of its disk's node: three real `cairn node run`
//! processes in the network-namespace lab, a qemu (TCG) machine that boots with iPXE from
//! them and runs Linux from its Cairn disk the way an installed system would (iscsid logged in
//! to both paths of the iBFT, multipathd with `prio alua` joining them, its file system on the
//! multipath device; see `build_multipath_disk`), and a workload in it that appends numbered
//! records with fsync. Then the machine's primary node is killed, or hung:
//!
//! - `kill`: SIGKILL of the primary (its TCP connections are reset);
//! - `stop`: SIGSTOP of the primary (a hung node: nothing answers, only NOP-Out timeouts tell);
//! - `twice`: SIGKILL of the primary, then, once the new standby (on the third node, which the
//!   guest had no session to) is in sync and the guest's discovery daemon has logged in to it,
//!   SIGKILL of the new primary;
//! - `persistent`: SIGKILL on a persistent disk, then the machine powers off and boots again
//!   (UEFI this time) and finds every record.
//!
//! Each time the workload must go on with no I/O error reaching it or the kernel's log above
//! multipath, and every fsynced record must read back from the disk. The longest pause the
//! workload saw is printed (the benchmark `guest_pause` measures it over many kills).
//!
//! Runs only with `CAIRN_SLOW_TESTS=1`; then it needs root, qemu, Debian's ipxe, ovmf,
//! open-iscsi and multipath-tools: a missing one fails it, saying which, before anything starts.
//! `CAIRN_GUEST_CASES=kill,stop,twice,persistent` picks cases (unset: all, as CI does).

use std::time::{Duration, Instant};

use cairn_tests::guest::{self, fault_primary, Fault, Guest};
use cairn_tests::pxe::{build_multipath_disk, Firmware, LabCluster};
use cairn_tests::{missing_prerequisite, slow_tests_enabled};

const MAC_KILL: &str = "52:54:00:77:00:20";
const MAC_STOP: &str = "52:54:00:77:00:21";
const MAC_PERSISTENT: &str = "52:54:00:77:00:22";
const MAC_TWICE: &str = "52:54:00:77:00:23";
const MARKER: &str = "CAIRN-MULTIPATH-GUEST";
#[test]
fn a_running_guest_survives_its_primary() -> anyhow::Result<()> {
    if !slow_tests_enabled("a_running_guest_survives_its_primary") {
        return Ok(());
    }
    if let Some(reason) = guest::unmet_prerequisite() {
        missing_prerequisite(&reason);
        return Ok(());
    }
    let started = Instant::now();
    let mut cluster = LabCluster::start(3)?;
    let result = run(&mut cluster, started);
    if result.is_err() {
        eprintln!("{}", cluster.logs(40));
        guest::keep_consoles(&cluster, "guest-failover");
    }
    result
}

fn run(cluster: &mut LabCluster, started: Instant) -> anyhow::Result<()> {
    let log = |what: &str| eprintln!("[{:6.1}s] {what}", started.elapsed().as_secs_f64());
    log("three nodes up");
    let work = cluster.dir.path().to_owned();
    let disk = build_multipath_disk(&work, "mp", MARKER)?;
    cluster.cli_ok(&["image", "import", "mp", disk.to_str().expect("utf-8")])?;
    cluster.wait_images_ready(&["mp"])?;
    log("multipath guest image imported");

    if selected("kill") {
        let pause = survive(cluster, MAC_KILL, "non-persistent", Fault::Kill, &log)?;
        log(&format!(
            "SIGKILL of the primary: the guest went on, longest pause {pause:.2}s"
        ));
    }
    if selected("stop") {
        let pause = survive(cluster, MAC_STOP, "non-persistent", Fault::Stop, &log)?;
        log(&format!(
            "SIGSTOP of the primary: the guest went on, longest pause {pause:.2}s"
        ));
    }
    if selected("twice") {
        twice(cluster, &log)?;
    }
    if selected("persistent") {
        persistent(cluster, &log)?;
    }
    Ok(())
}

/// Boots `mac` on a `mode` disk, faults its primary under the workload, and checks the guest
/// went on and kept every record. Leaves the faulted node running again. Returns the longest
/// pause the workload saw.
fn survive(
    cluster: &mut LabCluster,
    mac: &str,
    mode: &str,
    fault: Fault,
    log: &dyn Fn(&str),
) -> anyhow::Result<f64> {
    let run = format!("{fault:?}").to_lowercase();
    cluster.cli_ok(&["client", "add", mac, "--name", &format!("mp-{run}")])?;
    cluster.cli_ok(&["assign", "mp", "--client", mac, "--mode", mode])?;
    let mut guest = Guest::boot(cluster, Firmware::Bios, mac, &run)?;
    let survived = fault_primary(cluster, &mut guest, mac, fault, log)?;
    log(&format!(
        "{run}: failover committed after {:.2}s, the workload went on after {:.2}s",
        survived.failover_committed.as_secs_f64(),
        survived.went_on.as_secs_f64()
    ));
    let verified = guest.stop()?;
    log(&format!("{run}: {verified} records verified at power-off"));
    Ok(survived.pause)
}

/// Two failures in a row under one running guest. After the first failover the cluster resyncs
/// a new standby on the third node, which the guest had no session to: its discovery daemon
/// finds it in SendTargets (any node lists the portals serving the disk now) and logs in, and
/// multipath adds the path. Then the new primary is killed too, and the guest carries on
/// through that path.
fn twice(cluster: &mut LabCluster, log: &dyn Fn(&str)) -> anyhow::Result<()> {
    cluster.cli_ok(&["client", "add", MAC_TWICE, "--name", "mp-twice"])?;
    cluster.cli_ok(&[
        "assign",
        "mp",
        "--client",
        MAC_TWICE,
        "--mode",
        "non-persistent",
    ])?;
    let mut guest = Guest::boot(cluster, Firmware::Bios, MAC_TWICE, "twice")?;
    // The paths are reported with the first record.
    guest.wait_record(guest.found_at_boot + 1, guest::RECOVERY_TIMEOUT)?;
    let booted_with = guest.path_nodes();
    anyhow::ensure!(
        booted_with.len() == 2,
        "booted with two paths: {booted_with:?}"
    );
    let first = fault_primary(cluster, &mut guest, MAC_TWICE, Fault::Kill, log)?;
    let session = guest::wait_standby_in_sync(cluster, MAC_TWICE, Duration::from_secs(120))?;
    let standby = session["standby"].as_u64().expect("checked") as u8;
    anyhow::ensure!(
        !booted_with.contains(&cluster.lab.node_address(standby)),
        "the new standby {standby} is on a node the guest booted with: {booted_with:?}"
    );
    let paths = guest.wait_path_to(&cluster.lab.node_address(standby), Duration::from_secs(60))?;
    log(&format!(
        "twice: first pause {:.2}s; new standby {standby} in sync, the guest's paths go to \
         {booted_with:?}, then {paths:?}",
        first.pause
    ));
    let second = fault_primary(cluster, &mut guest, MAC_TWICE, Fault::Kill, log)?;
    let verified = guest.stop()?;
    log(&format!(
        "twice: second pause {:.2}s through the discovered path; {verified} records verified",
        second.pause
    ));
    Ok(())
}

/// SIGKILL under a persistent disk, then a power-off and a boot (UEFI) that finds every record.
fn persistent(cluster: &mut LabCluster, log: &dyn Fn(&str)) -> anyhow::Result<()> {
    cluster.cli_ok(&["client", "add", MAC_PERSISTENT, "--name", "mp-persistent"])?;
    cluster.cli_ok(&[
        "assign",
        "mp",
        "--client",
        MAC_PERSISTENT,
        "--mode",
        "persistent",
    ])?;
    let mut guest = Guest::boot(cluster, Firmware::Bios, MAC_PERSISTENT, "persistent-1")?;
    anyhow::ensure!(
        guest.found_at_boot == 0,
        "a new persistent disk has no records"
    );
    let pause = fault_primary(cluster, &mut guest, MAC_PERSISTENT, Fault::Kill, log)?.pause;
    let verified = guest.stop()?;
    log(&format!(
        "persistent: SIGKILL, longest pause {pause:.2}s; {verified} records at power-off"
    ));
    let again = Guest::boot(cluster, Firmware::Uefi, MAC_PERSISTENT, "persistent-2")?;
    anyhow::ensure!(
        again.found_at_boot >= verified,
        "after the reboot the disk holds {} records, {verified} were written",
        again.found_at_boot
    );
    let found = again.found_at_boot;
    let verified = again.stop()?;
    anyhow::ensure!(verified >= found, "{verified} of {found} records read back");
    log(&format!(
        "persistent: rebooted (UEFI), {found} records found and read back"
    ));
    Ok(())
}

fn selected(case: &str) -> bool {
    std::env::var("CAIRN_GUEST_CASES")
        .ok()
        .is_none_or(|list| list.split(',').any(|c| c.trim() == case))
}
