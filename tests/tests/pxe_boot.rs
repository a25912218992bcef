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
//! default entry is a second image; UEFI (OVMF's PXE, `snponly.efi` over Cairn's TFTP); a boot
//! whose primary node is killed the moment the boot is placed (iPXE takes the second path, the
//! standby, which serves once the leader has committed the failover); a persistent and a
//! non-persistent disk across two boots each, written by the booted Linux through its own iSCSI
//! login from the iBFT (the file is there in the second boot, or gone); a client whose images
//! are assigned to a user: iPXE's `login` form, typed on the serial console (a wrong password
//! first, which boots nothing), then a keypress choosing the user's second image from the menu;
//! last, the cluster restarted in proxyDHCP mode beside dnsmasq as the LAN's DHCP server: dnsmasq
//! leases the address, Cairn's leader answers the PXE part (ports 67 and 4011), BIOS and UEFI.
//! Unknown machines: in full mode (the default policy) one gets no answer and is recorded as
//! discovered; in the proxy part the nodes answer unknown machines and register them into a
//! group, and an unknown machine boots the group's default image.
//!
//! Runs only with `CAIRN_SLOW_TESTS=1` (otherwise it prints why and passes), and then needs root,
//! qemu-system-x86_64 and Debian's ipxe/syslinux/ovmf/open-iscsi/dnsmasq packages: a missing one
//! fails it, saying which, before the cluster starts.

use std::time::{Duration, Instant};

use cairn_tests::pxe::{
    build_boot_disk, build_iscsi_disk, guest, tail, unmet_prerequisite, Dnsmasq, Firmware,
    LabCluster, LabDhcp, Qemu,
};
use cairn_tests::{missing_prerequisite, on_path, slow_tests_enabled};
use serde_json::Value;

const MAC: &str = "52:54:00:77:00:10";
const MAC_PERSISTENT: &str = "52:54:00:77:00:11";
const MAC_NON_PERSISTENT: &str = "52:54:00:77:00:12";
const MAC_LOGIN: &str = "52:54:00:77:00:13";
const MAC_PROXY: &str = "52:54:00:77:00:14";
/// Never registered by the test.
const MAC_UNKNOWN: &str = "52:54:00:77:00:15";
const MARKER_A: &str = "CAIRN-PXE-BOOT-OK-A";
const MARKER_B: &str = "CAIRN-PXE-BOOT-OK-B";
const MARKER_I: &str = "CAIRN-PXE-BOOT-OK-I";
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

#[test]
fn pxe_boot_through_cairn() -> anyhow::Result<()> {
    if !slow_tests_enabled("pxe_boot_through_cairn") {
        return Ok(());
    }
    if let Some(reason) = unmet_prerequisite().or_else(unmet_case_prerequisite) {
        missing_prerequisite(&reason);
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
    cluster.wait_images_ready(&["deb-a", "deb-b"])?;
    log("images imported and ready");
    cluster.cli_ok(&["client", "add", MAC, "--name", "pxe1"])?;
    cluster.cli_ok(&["assign", "deb-a", "--client", MAC])?;

    let wanted = |case: &str| {
        let run = selected(case);
        if !run {
            eprintln!("case {case} not selected by CAIRN_PXE_CASES");
        }
        run
    };

    if wanted("bios") {
        // 1. BIOS: SeaBIOS + the e1000's iPXE ROM.
        let seconds = boot(cluster, Firmware::Bios, MAC, "bios", MARKER_A)?;
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
        // node is started again once a new leader is elected.
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
        let script_host = script_url(cluster, new_leader);
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
    }

    // From here on the client has a menu: deb-a, and deb-b as the default.
    cluster.cli_ok(&["assign", "deb-b", "--client", MAC, "--default"])?;
    if wanted("menu") {
        // 3. A menu: two images, the second one the default; the menu times out onto it.
        let seconds = boot(cluster, Firmware::Bios, MAC, "menu", MARKER_B)?;
        log(&format!(
            "menu boot (default deb-b): marker after {seconds:.1}s"
        ));
        assert_eq!(client_show(cluster)?["session"]["image"], "deb-b");
    }

    if wanted("uefi") {
        // 4. UEFI: OVMF's own PXE fetches snponly.efi from Cairn's TFTP, which asks DHCP again,
        // gets its script and sanboots. OVMF's FAT driver reads the 9 MB BOOTX64.EFI in one
        // BlockIo call, which iPXE sends as one READ of ~18,400 blocks.
        let seconds = boot(cluster, Firmware::Uefi, MAC, "uefi", MARKER_B)?;
        log(&format!("UEFI boot: marker after {seconds:.1}s"));
    }

    if wanted("second-path") {
        // 5. The primary is killed the moment the boot is placed (the script names it first):
        // iPXE finds it dead and takes the second path; the standby holds the I/O until the leader
        // has found the primary down and committed the failover, then serves.
        second_path(cluster, &work, &log)?;
    }

    if wanted("persistence") {
        // 6. A persistent and a non-persistent disk, two boots each: the booted Linux logs in from
        // the iBFT, finds (or not) the file the first boot wrote, and writes it.
        let disk_i = build_iscsi_disk(&work, "deb-i", MARKER_I)?;
        cluster.cli_ok(&["image", "import", "deb-i", disk_i.to_str().expect("utf-8")])?;
        cluster.wait_images_ready(&["deb-i"])?;
        for (mac, name, mode) in [
            (MAC_PERSISTENT, "pxe-p", "persistent"),
            (MAC_NON_PERSISTENT, "pxe-n", "non-persistent"),
        ] {
            cluster.cli_ok(&["client", "add", mac, "--name", name])?;
            cluster.cli_ok(&["assign", "deb-i", "--client", mac, "--mode", mode])?;
            let first = guest_boot(cluster, mac, &format!("{name}-1"))?;
            assert!(
                first.contains(guest::FILE_ABSENT),
                "{mode}, first boot:\n{first}"
            );
            let second = guest_boot(cluster, mac, &format!("{name}-2"))?;
            let expected = match mode {
                "persistent" => guest::FILE_PRESENT,
                _ => guest::FILE_ABSENT,
            };
            assert!(
                second.contains(expected),
                "{mode}, second boot should show {expected}:\n{second}"
            );
            log(&format!(
                "{mode} disk across two boots: {expected} in the second"
            ));
        }
    }

    if wanted("login") {
        // 7. Images assigned to a user: iPXE asks for a login; a wrong password boots nothing,
        // the right one gives the user's menu, and the key `2` picks the second image.
        login(cluster, &log)?;
    }

    if wanted("discovered") {
        // 8. An unregistered machine gets no answer (the default policy) and is recorded as
        // discovered, for the administrator to adopt.
        discovered(cluster, &log)?;
    }

    let list = cluster.cli_ok(&["client", "list"])?;
    eprintln!("{list}");

    if wanted("proxy") {
        // 9. Last, as it restarts the cluster: proxyDHCP beside dnsmasq.
        proxy(cluster, &work, &log)?;
    }
    Ok(())
}

fn login(cluster: &LabCluster, log: &dyn Fn(&str)) -> anyhow::Result<()> {
    const PASSWORD: &str = "s3cret & pass";
    cluster.cli_ok_with_input(
        &["user", "add", "ann", "--password-stdin"],
        Some(&format!("{PASSWORD}\n")),
    )?;
    cluster.cli_ok(&["client", "add", MAC_LOGIN, "--name", "pxe-login"])?;
    cluster.cli_ok(&["assign", "deb-a", "--user", "ann"])?;
    cluster.cli_ok(&["assign", "deb-b", "--user", "ann"])?;
    let mut qemu = Qemu::start(
        &cluster.lab,
        cluster.dir.path(),
        Firmware::Bios,
        MAC_LOGIN,
        "login",
    )?;
    qemu.wait_for_text("Password", BOOT_TIMEOUT)?;
    // Give iPXE's form a moment to take input after drawing itself.
    std::thread::sleep(Duration::from_millis(500));
    qemu.type_text("ann\rwrong\r")?;
    qemu.wait_for_text("login failed for", Duration::from_secs(60))?;
    let refused = qemu.console();
    assert!(
        !refused.contains("Cairn: booting"),
        "a wrong password booted:\n{}",
        tail(&refused, 30)
    );
    // The refusal retries the script after a few seconds: the form comes back.
    let before = refused.matches("Password").count();
    qemu.wait_until(
        "no second login form",
        Duration::from_secs(60),
        Duration::from_millis(200),
        |qemu| Ok(qemu.console().matches("Password").count() > before),
    )?;
    // The name stays filled in from the first try; the password was cleared.
    std::thread::sleep(Duration::from_millis(500));
    qemu.type_text(&format!("\r{PASSWORD}\r"))?;
    qemu.wait_for_text("2. deb-b", Duration::from_secs(60))?;
    qemu.type_text("2")?;
    let seconds = qemu.wait_for_marker(MARKER_B, &[MARKER_A], BOOT_TIMEOUT)?;
    log(&format!(
        "login (wrong password refused, then ann) and menu key 2: deb-b's marker after {seconds:.1}s"
    ));
    let client = cluster.cli_json(&["client", "show", MAC_LOGIN])?;
    assert_eq!(client["session"]["image"], "deb-b", "{client}");
    assert_eq!(client["session"]["user"], "ann", "{client}");
    Ok(())
}

fn discovered(cluster: &LabCluster, log: &dyn Fn(&str)) -> anyhow::Result<()> {
    let qemu = Qemu::start(
        &cluster.lab,
        cluster.dir.path(),
        Firmware::Bios,
        MAC_UNKNOWN,
        "discovered",
    )?;
    qemu.wait_until(
        &format!("{MAC_UNKNOWN} not discovered"),
        Duration::from_secs(90),
        Duration::from_millis(500),
        |_| is_discovered(cluster, MAC_UNKNOWN),
    )?;
    // iPXE retries DHCP for a while; it must not have been offered anything in the meantime.
    std::thread::sleep(Duration::from_secs(3));
    let console = qemu.console();
    assert!(
        !console.contains("Filename:") && !console.contains("Next server:"),
        "an unregistered machine got a boot answer:\n{}",
        tail(&console, 20)
    );
    log(&format!(
        "unregistered {MAC_UNKNOWN}: no answer, listed by `client discovered`"
    ));
    Ok(())
}

fn proxy(
    cluster: &mut LabCluster,
    work: &std::path::Path,
    log: &dyn Fn(&str),
) -> anyhow::Result<()> {
    cluster.restart_with_dhcp(LabDhcp::Proxy)?;
    log("cluster restarted in proxyDHCP mode");
    let dnsmasq = Dnsmasq::start(&cluster.lab, work)?;
    cluster.cli_ok(&["client", "add", MAC_PROXY, "--name", "pxe-proxy"])?;
    cluster.cli_ok(&["assign", "deb-a", "--client", MAC_PROXY])?;
    // The nodes register unknown machines into `guests` (see LabDhcp::Proxy).
    cluster.cli_ok(&["group", "add", "guests"])?;
    cluster.cli_ok(&["assign", "deb-b", "--group", "guests", "--default"])?;
    for (firmware, run) in [
        (Firmware::Bios, "proxy-bios"),
        (Firmware::Uefi, "proxy-uefi"),
    ] {
        let leader = cluster.leader()?;
        let mut qemu = Qemu::start(&cluster.lab, work, firmware, MAC_PROXY, run)?;
        let seconds = qemu
            .wait_for_marker(MARKER_A, &[], BOOT_TIMEOUT)
            .map_err(|e| {
                let dhcp_log = std::fs::read_to_string(&dnsmasq.log).unwrap_or_default();
                e.context(format!("dnsmasq's log:\n{}", tail(&dhcp_log, 30)))
            })?;
        let console = qemu.console();
        log(&format!("{run}: marker after {seconds:.1}s"));
        let lease = dnsmasq.lease_of(MAC_PROXY);
        let lease = lease.as_deref().unwrap_or_default();
        assert!(
            lease.contains(&format!("{}.2", cairn_tests::pxe::SUBNET)),
            "dnsmasq leased the address: {lease:?}"
        );
        if firmware == Firmware::Bios {
            let script_host = script_url(cluster, leader);
            assert!(
                console.contains(&script_host),
                "the leader's proxyDHCP gave the script:\n{}",
                tail(&console, 30)
            );
        }
        let client = cluster.cli_json(&["client", "show", MAC_PROXY])?;
        assert!(
            client["lease"].is_null(),
            "Cairn leased no address: {client}"
        );
        assert_eq!(client["session"]["image"], "deb-a", "{client}");
    }

    // An unknown machine (discovered in the full-mode part, or never seen): answered, registered
    // into `guests` by the script server, boots the group's default image.
    let mut qemu = Qemu::start(
        &cluster.lab,
        work,
        Firmware::Bios,
        MAC_UNKNOWN,
        "proxy-unknown",
    )?;
    let seconds = qemu.wait_for_marker(MARKER_B, &[MARKER_A], BOOT_TIMEOUT)?;
    log(&format!(
        "unknown machine registered into guests: deb-b's marker after {seconds:.1}s"
    ));
    let client = cluster.cli_json(&["client", "show", MAC_UNKNOWN])?;
    assert_eq!(client["client"]["group"], "guests", "{client}");
    assert_eq!(client["client"]["name"], "auto-525400770015", "{client}");
    assert_eq!(client["session"]["image"], "deb-b", "{client}");
    assert!(
        !is_discovered(cluster, MAC_UNKNOWN)?,
        "registered, so no longer discovered"
    );
    Ok(())
}

fn boot(
    cluster: &LabCluster,
    firmware: Firmware,
    mac: &str,
    run: &str,
    marker: &str,
) -> anyhow::Result<f64> {
    let mut qemu = Qemu::start(&cluster.lab, cluster.dir.path(), firmware, mac, run)?;
    qemu.wait_for_marker(marker, &[], BOOT_TIMEOUT)
}

/// Boots the iSCSI guest of `mac` (BIOS) to its last line; returns its console.
fn guest_boot(cluster: &LabCluster, mac: &str, run: &str) -> anyhow::Result<String> {
    let mut qemu = Qemu::start(&cluster.lab, cluster.dir.path(), Firmware::Bios, mac, run)?;
    qemu.wait_for_marker(guest::FILE_WRITTEN, &[guest::FAILED], BOOT_TIMEOUT)?;
    Ok(qemu.console())
}

fn second_path(
    cluster: &mut LabCluster,
    work: &std::path::Path,
    log: &dyn Fn(&str),
) -> anyhow::Result<()> {
    let generation = client_show(cluster)?["session"]["generation"]
        .as_u64()
        .unwrap_or(0);
    let mut qemu = Qemu::start(&cluster.lab, work, Firmware::Bios, MAC, "second-path")?;
    // The boot is placed when iPXE asks for the script of the chosen entry (after the menu);
    // kill its primary as soon as iPXE has that script and says it is booting (killing it
    // earlier could kill the script's server too, when the primary is also the Raft leader). iPXE logs in right after, so it meets a dead primary either at
    // login or in the middle of its first reads.
    qemu.wait_until(
        "no script fetched",
        BOOT_TIMEOUT,
        Duration::from_millis(20),
        |qemu| Ok(qemu.console().contains("Cairn: booting")),
    )?;
    let client = client_show(cluster)?;
    let session = client["session"].clone();
    anyhow::ensure!(
        session["generation"].as_u64().unwrap_or(0) > generation,
        "the script fetch placed no boot: {client}"
    );
    let primary = session["primary"].as_u64().expect("primary");
    let standby = session["standby"]
        .as_u64()
        .expect("a non-persistent disk has a standby");
    cluster.node_mut(primary).kill();
    log(&format!(
        "boot placed on {primary} (standby {standby}); node {primary} killed"
    ));
    let seconds = qemu.wait_for_marker(MARKER_B, &[], BOOT_TIMEOUT)?;
    log(&format!(
        "boot through the second path: marker after {seconds:.1}s"
    ));
    drop(qemu);
    let client = client_show(cluster)?;
    assert_eq!(
        client["session"]["primary"].as_u64(),
        Some(standby),
        "the standby took over: {client}"
    );
    assert_eq!(
        client["session"]["generation"].as_u64(),
        session["generation"].as_u64().map(|g| g + 1),
        "the failover fenced the old primary with a new generation: {client}"
    );
    let events = cluster.cli_ok(&["events", "log", "--client", MAC])?;
    assert!(events.contains("boot_failed_over"), "{events}");
    cluster.start_node(primary as u8)?;
    Ok(())
}

/// Whether OVMF and the UKI stub the UEFI disk needs are installed.
/// Whether `case` runs. For working on one case:
/// `CAIRN_PXE_CASES=bios,menu,uefi,second-path,persistence,login,discovered,proxy` (a comma list;
/// unset runs them all, as CI does).
fn selected(case: &str) -> bool {
    std::env::var("CAIRN_PXE_CASES")
        .ok()
        .is_none_or(|list| list.split(',').any(|c| c.trim() == case))
}

/// What the selected cases need beyond [`unmet_prerequisite`]; checked before the cluster starts,
/// so that a missing one fails the test at once rather than after the first boots.
fn unmet_case_prerequisite() -> Option<String> {
    if (selected("uefi") || selected("proxy")) && !uefi_available() {
        return Some("the UEFI cases need packages ovmf and systemd-boot-efi".into());
    }
    if selected("persistence") && !on_path("iscsistart") {
        return Some("the persistence case needs iscsistart (package open-iscsi)".into());
    }
    if selected("proxy") && !on_path("dnsmasq") {
        return Some("the proxy case needs dnsmasq (package dnsmasq)".into());
    }
    None
}

fn uefi_available() -> bool {
    std::path::Path::new("/usr/share/OVMF/OVMF_CODE_4M.fd").exists()
        && std::path::Path::new("/usr/lib/systemd/boot/efi/linuxx64.efi.stub").exists()
}

/// The script URL that node `id`'s DHCP answers carry (iPXE prints it when it fetches it).
fn script_url(cluster: &LabCluster, id: u64) -> String {
    format!(
        "http://{}:8080/boot/ipxe",
        cluster.lab.node_address(id as u8)
    )
}

/// Whether `cairn client discovered` lists `mac`.
fn is_discovered(cluster: &LabCluster, mac: &str) -> anyhow::Result<bool> {
    let listed = cluster.cli_json(&["client", "discovered"])?;
    Ok(listed
        .as_array()
        .is_some_and(|rows| rows.iter().any(|row| row["mac"] == mac)))
}

fn client_show(cluster: &LabCluster) -> anyhow::Result<Value> {
    cluster.cli_json(&["client", "show", MAC])
}

fn wait_new_leader(cluster: &LabCluster, old: u64) -> anyhow::Result<u64> {
    let status = cluster.wait_for(Duration::from_secs(30), |s| {
        s["leader"].as_u64().is_some_and(|l| l != old)
    })?;
    Ok(status["leader"].as_u64().expect("leader checked"))
}
