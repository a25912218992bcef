//! What the tests that drive `cairn-iscsi-file` or a peer tool share: starting it, free loopback
//! ports, checking for a peer tool, and what a test does when one is missing; and a chunk store
//! with a base image for the tests of volumes. Each test file uses a part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use cairn_blockstore::chunks::{ChunkStore, ChunkStoreConfig};
use cairn_blockstore::image::NoProgress;
use cairn_blockstore::volume::VolumeSpec;

/// A running `cairn-iscsi-file`, killed on drop.
pub struct IscsiFile(Child);

impl IscsiFile {
    /// Starts it with `args` and waits for its `ready` line.
    pub fn start<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> IscsiFile {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cairn-iscsi-file"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start cairn-iscsi-file");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read ready line");
        assert_eq!(line.trim(), "ready", "cairn-iscsi-file did not start");
        IscsiFile(child)
    }

    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for IscsiFile {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Whether `tool` is on the PATH.
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Whether `CAIRN_SLOW_TESTS=1` (as `.ci/run` sets): the slow suites run, and every tool a test
/// needs must be there.
pub fn slow_tests() -> bool {
    std::env::var("CAIRN_SLOW_TESTS").as_deref() == Ok("1")
}

/// For a test that cannot run because `reason` (a missing tool or package) holds; the test
/// returns right after. Under `CAIRN_SLOW_TESTS=1` this fails the test instead, so that a missing
/// tool cannot pass for a passing test; otherwise it prints `skipped: <reason>`.
pub fn missing_prerequisite(reason: &str) {
    assert!(
        !slow_tests(),
        "missing prerequisite under CAIRN_SLOW_TESTS=1: {reason} (.ci/setup installs it)"
    );
    eprintln!("skipped: {reason}");
}

/// A chunk store in `dir/store` holding `base` as an image version, and the spec of a
/// persistent volume on it with `unique_id`.
pub fn store_with_base(
    dir: &Path,
    base: &[u8],
    unique_id: [u8; 16],
) -> (Arc<ChunkStore>, VolumeSpec) {
    let store =
        Arc::new(ChunkStore::open(&dir.join("store"), ChunkStoreConfig::default()).unwrap());
    let outcome = store
        .import_raw("base", 1, &mut &base[..], base.len() as u64, &NoProgress)
        .unwrap();
    let spec = VolumeSpec {
        base: outcome.manifest_hash,
        persistent: true,
        unique_id,
    };
    (store, spec)
}
