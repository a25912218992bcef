//! The data path through real processes and a real initiator: an image uploaded with
//! `cairn image import` to one node, replicated to the others, served as a client's volume by
//! the node its boot session names primary, and read and written with qemu's libiscsi client.
//! A persistent disk has a primary and a standby: after a SIGKILL of the primary, the standby
//! serves every write the primary acknowledged (flushed or not); a non-persistent disk reads as
//! its base again after the next boot. Runs only with `CAIRN_SLOW_TESTS=1`, and
//! then fails if qemu-io or qemu's iscsi block driver is missing.

use std::time::{Duration, Instant};

use cairn_tests::initiator::{image_opts, qemu_available, qemu_io, read_disk, wait_served};
use cairn_tests::{slow_tests_enabled, ProcessCluster};

const SIZE_BYTES: usize = 4 << 20;

fn boot(cluster: &ProcessCluster, mac: &str, image: &str) -> anyhow::Result<(u64, String)> {
    let (primary, portal, _) = boot_with_standby(cluster, mac, image)?;
    Ok((primary, portal))
}

/// Boots `mac`; returns its primary, the primary's portal and the standby's portal.
fn boot_with_standby(
    cluster: &ProcessCluster,
    mac: &str,
    image: &str,
) -> anyhow::Result<(u64, String, Option<String>)> {
    let events = cluster.cli_json(&["client", "boot", mac, "--image", image])?;
    let started = &events[0]["payload"]["boot_started"];
    let primary = started["primary"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no primary in {events}"))?;
    let portal = |id: u64| {
        cluster
            .nodes
            .iter()
            .find(|n| n.id == id)
            .map(|node| format!("{}:3260", node.address))
    };
    let standby = started["standby"].as_u64().and_then(portal);
    Ok((primary, portal(primary).expect("primary node"), standby))
}

#[test]
fn imported_image_is_served_persistent_and_non_persistent() -> anyhow::Result<()> {
    if !slow_tests_enabled("imported_image_is_served_persistent_and_non_persistent")
        || !qemu_available()
    {
        return Ok(());
    }
    let mut cluster = ProcessCluster::start(43, 3)?;
    let result = run(&mut cluster);
    if result.is_err() {
        eprintln!("{}", cluster.logs());
    }
    result
}

fn run(cluster: &mut ProcessCluster) -> anyhow::Result<()> {
    let started = Instant::now();
    let step = |what: &str| println!("{:>7} ms  {what}", started.elapsed().as_millis());
    let scratch = cluster.dir.path().to_owned();
    // A base image: every 4 KiB block holds its own index, the last MiB is zeros.
    let mut base = vec![0u8; SIZE_BYTES];
    for (index, block) in base[..SIZE_BYTES - (1 << 20)].chunks_mut(4096).enumerate() {
        block.fill((index % 251) as u8 + 1);
    }
    let image_file = scratch.join("base.raw");
    std::fs::write(&image_file, &base)?;
    step("importing the image");
    cluster.cli_ok(&[
        "image",
        "import",
        "disk",
        image_file.to_str().expect("utf-8"),
    ])?;
    let images = cluster.cli_json(&["image", "list"])?;
    assert_eq!(images[0]["versions"]["1"]["state"], "ready", "{images}");

    // A persistent client.
    let mac = "52:54:00:43:00:01";
    let mac_hex = "525400430001";
    cluster.cli_ok(&["client", "add", mac, "--name", "desk-1"])?;
    cluster.cli_ok(&["assign", "disk", "--client", mac, "--mode", "persistent"])?;
    step("booting the persistent client");
    let (primary, portal, first_standby) = boot_with_standby(cluster, mac, "disk")?;
    anyhow::ensure!(
        first_standby.is_some(),
        "a persistent disk on three nodes has a standby"
    );
    let initiator = format!("iqn.2026-11.org.cairn:initiator.{mac_hex}");
    let opts = image_opts(&portal, mac_hex, &initiator);
    step("reading through the primary");
    let read = wait_served(&opts, &scratch.join("read1.raw"))?;
    assert!(
        read == base,
        "volume on node {primary} does not read as the imported image"
    );

    // Only the client's own initiator gets in.
    let foreign = image_opts(&portal, mac_hex, "iqn.2026-11.org.example:intruder");
    assert!(
        read_disk(&foreign, &scratch.join("foreign.raw")).is_err(),
        "a foreign initiator logged in"
    );

    // Write (mirrored to the standby before GOOD), SIGKILL the primary: the standby is
    // promoted and serves every acknowledged write, flushed or not.
    step("writing through the primary");
    qemu_io(
        &opts,
        &[
            "write -P 0x5a 8192 12288",
            "write -P 0xc3 512 1024",
            "flush",
        ],
    )?;
    qemu_io(&opts, &["write -P 0x3c 65536 4096"])?;
    // Only an in-sync standby may be promoted: a standby still being filled (here, one whose
    // node had not yet received the image when the boot began) would leave the disk unserved.
    step("waiting for the standby to be in sync");
    let standby = cluster.wait_in_sync(None, mac)?["standby"]
        .as_u64()
        .expect("a standby");
    let shown = cluster.cli_ok(&["client", "show", mac])?;
    assert!(
        shown.contains("two copies in sync")
            && shown.contains(&format!("node {primary}: Primary at generation"))
            && shown.contains(&format!("node {standby}: Standby at generation")),
        "client show does not tell the copies: {shown}"
    );
    let standby_portal = cluster
        .nodes
        .iter()
        .find(|n| n.id == standby)
        .map(|n| format!("{}:3260", n.address))
        .expect("standby node");
    let log_dir = cluster.dir.path().to_owned();
    step("killing the primary");
    let killed_at = Instant::now();
    cluster
        .nodes
        .iter_mut()
        .find(|n| n.id == primary)
        .expect("primary")
        .kill();
    let mut expected = base.clone();
    expected[8192..8192 + 12288].fill(0x5a);
    expected[512..1536].fill(0xc3);
    expected[65536..65536 + 4096].fill(0x3c);
    let standby_opts = image_opts(&standby_portal, mac_hex, &initiator);
    let read = wait_served(&standby_opts, &scratch.join("read2.raw"))?;
    println!(
        "the standby served the disk {} ms after SIGKILL of the primary",
        killed_at.elapsed().as_millis()
    );
    assert!(
        read == expected,
        "acknowledged writes lost in the failover from node {primary}"
    );
    // The new primary takes writes; the old one comes back and catches up as its standby.
    step("writing through the new primary");
    qemu_io(&standby_opts, &["write -P 0x11 131072 8192", "flush"])?;
    cluster
        .nodes
        .iter_mut()
        .find(|n| n.id == primary)
        .expect("primary")
        .start(&log_dir)?;
    step("old primary restarted");
    expected[131072..131072 + 8192].fill(0x11);
    let read = wait_served(&standby_opts, &scratch.join("read2b.raw"))?;
    assert!(read == expected, "the new primary lost a write");

    // A non-persistent client: its write is gone after the next boot.
    step("non-persistent client");
    let mac2 = "52:54:00:43:00:02";
    let mac2_hex = "525400430002";
    cluster.cli_ok(&["client", "add", mac2, "--name", "desk-2"])?;
    cluster.cli_ok(&[
        "assign",
        "disk",
        "--client",
        mac2,
        "--mode",
        "non-persistent",
    ])?;
    let (_, portal2) = boot(cluster, mac2, "disk")?;
    let opts2 = image_opts(
        &portal2,
        mac2_hex,
        &format!("iqn.2026-11.org.cairn:initiator.{mac2_hex}"),
    );
    wait_served(&opts2, &scratch.join("read3.raw"))?;
    qemu_io(
        &opts2,
        &["write -P 0x77 0 65536", "flush", "read -P 0x77 0 65536"],
    )?;
    step("rebooting the non-persistent client");
    let (_, portal2) = boot(cluster, mac2, "disk")?;
    let opts2 = image_opts(
        &portal2,
        mac2_hex,
        &format!("iqn.2026-11.org.cairn:initiator.{mac2_hex}"),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let read = wait_served(&opts2, &scratch.join("read4.raw"))?;
        if read == base {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "non-persistent disk does not read as its base after a new boot"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    step("done");
    Ok(())
}
