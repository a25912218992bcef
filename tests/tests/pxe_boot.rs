//! End-to-end network boot through Cairn's own servers: three real `cairn node run` processes,
//! each in a network namespace of its own on one bridge, with DHCP (full mode), TFTP and router
//! advertisements on; a qemu (TCG) client on the same bridge boots with iPXE from DHCP (only
//! the Raft leader answers, every lease committed through Raft), gets its script from the boot
//! HTTP server (which commits a `BeginBoot`: primary and standby), and `sanboot`s its volume
//! from the primary's iSCSI portal. The disk is a small Linux (kernel from /boot, busybox
//! initramfs) that prints a marker on ttyS0: seeing the marker proves the whole path.
//!
//! Cases, in one cluster (its setup is the slow part): BIOS boot; boot right after the Raft
//! leader was killed (the new leader answers DHCP, no restart of anything); a boot menu whose
//! default entry is a second image; UEFI (OVMF's PXE, `snponly.efi` over Cairn's TFTP; only with
//! `CAIRN_PXE_UEFI=1` for now, see case 4).
//!
//! Needs root, qemu-system-x86_64, Debian's ipxe/syslinux/ovmf packages and
//! `CAIRN_SLOW_TESTS=1`; otherwise it prints why and passes.

use std::time::{Duration, Instant};

use cairn_tests::pxe::{build_boot_disk, missing_prerequisite, tail, Firmware, LabCluster, Qemu};
use cairn_tests::slow_tests_enabled;
use serde_json::Value;

const MAC: &str = "52:54:00:77:00:10";
const MARKER_A: &str = "CAIRN-PXE-BOOT-OK-A";
const MARKER_B: &str = "CAIRN-PXE-BOOT-OK-B";
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

#[test]
fn pxe_boot_through_cairn() -> anyhow::Result<()> {
    if !slow_tests_enabled("pxe_boot_through_cairn") {
        return Ok(());
    }
    if let Some(reason) = missing_prerequisite() {
        eprintln!("skipping pxe_boot_through_cairn: {reason}");
        return Ok(());
    }
    let started = Instant::now();
    let mut cluster = LabCluster::start(3)?;
    eprintln!("[{:6.1}s] three nodes up", started.elapsed().as_secs_f64());
    let result = run(&mut cluster, started);
    if result.is_err() {
        eprintln!("{}", cluster.logs(40));
    }
    result
}

fn run(cluster: &mut LabCluster, started: Instant) -> anyhow::Result<()> {
    let work = cluster.dir.path().to_owned();
    let log = |what: &str| eprintln!("[{:6.1}s] {what}", started.elapsed().as_secs_f64());

    let disk_a = build_boot_disk(&work, "deb-a", MARKER_A)?;
    let disk_b = build_boot_disk(&work, "deb-b", MARKER_B)?;
    log("disks built");
    cluster.cli_ok(&["image", "import", "deb-a", disk_a.to_str().expect("utf-8")])?;
    cluster.cli_ok(&["image", "import", "deb-b", disk_b.to_str().expect("utf-8")])?;
    wait_ready(cluster, &["deb-a", "deb-b"])?;
    log("images imported and ready");
    cluster.cli_ok(&["client", "add", MAC, "--name", "pxe1"])?;
    cluster.cli_ok(&["assign", "deb-a", "--client", MAC])?;

    // 1. BIOS: SeaBIOS + the e1000's iPXE ROM.
    let seconds = boot(cluster, Firmware::Bios, "bios", MARKER_A)?;
    log(&format!(
        "BIOS boot: marker after {seconds:.1}s of qemu time"
    ));
    let client = client_show(cluster)?;
    let session = &client["session"];
    assert_eq!(session["image"], "deb-a", "session: {client}");
    assert!(
        session["primary"].is_u64() && session["standby"].is_u64(),
        "two paths: {client}"
    );
    assert_ne!(session["primary"], session["standby"]);
    assert!(
        client["lease"]["ip"].is_string(),
        "the DHCP lease is in the replicated state: {client}"
    );
    let generation = session["generation"].as_u64().unwrap_or(0);

    // 2. The Raft leader is killed; the next boot is answered by the new leader. The killed
    // node is started again once a new leader is elected (it may be the volume's primary, and
    // a standby does not serve volumes yet).
    let old_leader = cluster.leader()?;
    cluster.node_mut(old_leader).kill();
    let new_leader = wait_new_leader(cluster, old_leader)?;
    log(&format!(
        "leader {old_leader} killed; node {new_leader} leads"
    ));
    cluster.start_node(old_leader as u8)?;
    let mut qemu = Qemu::start(
        &cluster.lab,
        &work,
        Firmware::Bios,
        MAC,
        "after-leader-kill",
    )?;
    let seconds = qemu.wait_for_marker(MARKER_A, &[], BOOT_TIMEOUT)?;
    let console = qemu.console();
    let script_host = format!(
        "http://{}:8080/boot/ipxe",
        cluster.lab.node_address(new_leader as u8)
    );
    assert!(
        console.contains(&script_host),
        "DHCP answered by the new leader {new_leader}:\n{}",
        tail(&console, 30)
    );
    log(&format!(
        "boot after leader kill: marker after {seconds:.1}s"
    ));
    let client = client_show(cluster)?;
    assert!(
        client["session"]["generation"].as_u64().unwrap_or(0) > generation,
        "a new session: {client}"
    );
    drop(qemu);

    // 3. A menu: two images, the second one the default; the menu times out onto it.
    cluster.cli_ok(&["assign", "deb-b", "--client", MAC, "--default"])?;
    let seconds = boot(cluster, Firmware::Bios, "menu", MARKER_B)?;
    log(&format!(
        "menu boot (default deb-b): marker after {seconds:.1}s"
    ));
    assert_eq!(client_show(cluster)?["session"]["image"], "deb-b");

    // 4. UEFI: OVMF's own PXE fetches snponly.efi from Cairn's TFTP, which asks DHCP again,
    // gets its script and sanboots. Known failure for now: iPXE registers the SAN device, then
    // "Boot from SAN device 0x80 failed: Error 0x7f22208e" (no bootable file system found),
    // while the same disk, snponly.efi and OVMF boot from tgt (pxe-boot-reference.sh with
    // snponly.efi). The likely cause: OVMF's FAT driver reads the 9 MB BOOTX64.EFI in one
    // BlockIo call, iPXE sends it as one READ of ~18,400 blocks (it never reads the Block
    // Limits VPD page), and blockstore's target refuses reads above TRANSFER_BLOCKS_MAX (8192)
    // with ILLEGAL REQUEST; tgt has no such limit. Runs only on request until that is fixed.
    let uefi_requested = std::env::var("CAIRN_PXE_UEFI").as_deref() == Ok("1");
    if !uefi_requested {
        eprintln!(
            "UEFI case not run: set CAIRN_PXE_UEFI=1 (known failure, see the comment in this test)"
        );
    } else if std::path::Path::new("/usr/share/OVMF/OVMF_CODE_4M.fd").exists()
        && std::path::Path::new("/usr/lib/systemd/boot/efi/linuxx64.efi.stub").exists()
    {
        let seconds = boot(cluster, Firmware::Uefi, "uefi", MARKER_B)?;
        log(&format!("UEFI boot: marker after {seconds:.1}s"));
    } else {
        eprintln!("UEFI case skipped: needs packages ovmf and systemd-boot-efi");
    }

    let list = cluster.cli_ok(&["client", "list"])?;
    eprintln!("{list}");
    Ok(())
}

fn boot(cluster: &LabCluster, firmware: Firmware, run: &str, marker: &str) -> anyhow::Result<f64> {
    let mut qemu = Qemu::start(&cluster.lab, cluster.dir.path(), firmware, MAC, run)?;
    qemu.wait_for_marker(marker, &[], BOOT_TIMEOUT)
}

fn client_show(cluster: &LabCluster) -> anyhow::Result<Value> {
    cluster.cli_json(&["client", "show", MAC])
}

fn wait_ready(cluster: &LabCluster, images: &[&str]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let listed = cluster.cli_json(&["image", "list"])?;
        let ready = |name: &str| {
            listed.as_array().is_some_and(|rows| {
                rows.iter().any(|row| {
                    row["name"] == name
                        && row["versions"]
                            .as_object()
                            .is_some_and(|v| v.values().any(|v| v["state"] == "ready"))
                })
            })
        };
        if images.iter().all(|name| ready(name)) {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "images not ready: {listed}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn wait_new_leader(cluster: &LabCluster, old: u64) -> anyhow::Result<u64> {
    let status = cluster.wait_for(Duration::from_secs(30), |s| {
        s["leader"].as_u64().is_some_and(|l| l != old)
    })?;
    Ok(status["leader"].as_u64().expect("leader checked"))
}
