//! A real initiator for the data-path tests: qemu's libiscsi block driver, through `qemu-img`
//! (whole-disk reads) and `qemu-io` (writes, flushes, pattern checks).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::missing_prerequisite;

const ISCSI_DRIVER: &str = "/usr/lib/x86_64-linux-gnu/qemu/block-iscsi.so";

/// qemu-io, qemu-img and qemu's iSCSI block driver are installed; otherwise says so (and, with
/// `CAIRN_SLOW_TESTS=1`, fails the test: see [`missing_prerequisite`]).
pub fn qemu_available() -> bool {
    let tools = ["qemu-io", "qemu-img"]
        .iter()
        .all(|tool| Command::new(tool).arg("--version").output().is_ok());
    let driver = Path::new(ISCSI_DRIVER).exists();
    if !(tools && driver) {
        missing_prerequisite(
            "needs qemu-io, qemu-img and qemu's iscsi block driver (qemu-utils, qemu-block-extra)",
        );
    }
    tools && driver
}

/// The initiator name a client's target admits.
pub fn client_initiator(mac_hex: &str) -> String {
    format!("iqn.2026-11.org.cairn:initiator.{mac_hex}")
}

/// `--image-opts` for LUN 0 of a client's target at `portal`.
pub fn image_opts(portal: &str, mac_hex: &str, initiator: &str) -> String {
    format!(
        "driver=raw,file.driver=iscsi,file.transport=tcp,file.portal={portal},file.target=iqn.2026-11.org.cairn:client.{mac_hex},file.lun=0,file.initiator-name={initiator}"
    )
}

/// Reads the whole disk into `out` and returns its bytes.
pub fn read_disk(opts: &str, out: &Path) -> anyhow::Result<Vec<u8>> {
    let _ = std::fs::remove_file(out);
    let output = Command::new("timeout")
        .args([
            "-s",
            "KILL",
            "60",
            "qemu-img",
            "convert",
            "--image-opts",
            opts,
        ])
        .args(["-O", "raw"])
        .arg(out)
        .output()?;
    if !output.status.success() {
        anyhow::bail!(
            "qemu-img convert failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(std::fs::read(out)?)
}

/// Runs `commands` in one qemu-io session; fails if any fails or a pattern check does not hold.
pub fn qemu_io(opts: &str, commands: &[&str]) -> anyhow::Result<()> {
    let run = qemu_io_within(opts, commands, Duration::from_secs(60))?;
    if !run.success
        || run.text.contains("Pattern verification failed")
        || run.text.contains("failed")
    {
        anyhow::bail!("qemu-io {commands:?}: {}", run.text);
    }
    Ok(())
}

/// What one qemu-io session printed.
pub struct QemuIoRun {
    /// It ran to its end and exited with success.
    pub success: bool,
    pub text: String,
}

impl QemuIoRun {
    /// The offsets of the writes the target acknowledged (qemu-io prints
    /// `wrote N/N bytes at offset X` only after GOOD).
    pub fn acknowledged_writes(&self) -> Vec<u64> {
        self.text
            .lines()
            .filter_map(|line| line.strip_prefix("wrote "))
            .filter_map(|rest| rest.split(" at offset ").nth(1))
            .filter_map(|offset| offset.trim().parse().ok())
            .collect()
    }
}

/// Runs `commands` in one qemu-io session, killed after `limit` (an initiator retries a dead
/// portal for a long time): whatever it printed until then.
pub fn qemu_io_within(opts: &str, commands: &[&str], limit: Duration) -> anyhow::Result<QemuIoRun> {
    let mut command = Command::new("timeout");
    command.args(["-s", "KILL", &limit.as_secs().max(1).to_string(), "qemu-io"]);
    command.arg("--image-opts");
    for each in commands {
        command.args(["-c", each]);
    }
    command.arg(opts);
    let output = command.output()?;
    Ok(QemuIoRun {
        success: output.status.success(),
        text: String::from_utf8_lossy(&output.stdout).to_string()
            + &String::from_utf8_lossy(&output.stderr),
    })
}

/// Reads the whole disk once `opts` can be read (the primary serves the volume), trying for
/// up to a minute.
pub fn wait_served(opts: &str, scratch: &Path) -> anyhow::Result<Vec<u8>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match read_disk(opts, scratch) {
            Ok(bytes) => return Ok(bytes),
            Err(error) if Instant::now() > deadline => {
                return Err(error.context(format!("{opts} not served within 60 s")))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(300)),
        }
    }
}
