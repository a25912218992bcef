//! A standby whose disk is full (issue "No acknowledged write lost", "Bad input and faults"):
//! the standby's copy lives on a real file system that runs out of space (a 1 MiB tmpfs, so
//! the error is the kernel's own ENOSPC, not an injected one), the primary's on the test's
//! temporary directory. The two shells are the node's own (`replica`), their messages carried
//! by hand. What must hold:
//!
//! - every write acknowledged while mirrored was applied by the standby first;
//! - the write the standby could not store is not acknowledged while the standby is still the
//!   session's: the primary reports the standby failed and waits for "standby dropped";
//! - the standby's copy is failed for good, with the file system's error as the reason, and
//!   reports it (the node stops on it);
//! - once "standby dropped" is committed the write completes on the primary alone, and every
//!   write reads back there.
//!
//! Mounting a tmpfs needs root: without it the test is skipped with the reason (and fails under
//! `CAIRN_SLOW_TESTS=1`, as a missing tool does).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use cairn_blockstore::mirror::{
    Message, MirrorConfig, PrimaryEvent, StandbyEvent, StandbySync, UnreachableReason, VolumeId,
};
use cairn_blockstore::replica::{MirrorLink, PrimaryShell, StandbyShell};
use cairn_blockstore::volume::{Volume, VolumeOptions};
use common::{missing_prerequisite, store_with_base};
use futures::FutureExt;

const BLOCK: usize = 4096;
/// The base image, and so the volume: far more than the standby's file system holds.
const SIZE_BYTES: usize = 8 << 20;
const TMPFS_BYTES: usize = 1 << 20;
const VOLUME: VolumeId = VolumeId([5; 16]);

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, bytes: usize) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(at).map_err(|e| e.to_string())?;
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(at)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "mount -t tmpfs failed (root is needed): {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(Tmpfs(at.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Messages in flight each way; the test delivers them.
#[derive(Default)]
struct Wire {
    to_standby: Mutex<Vec<Message>>,
    to_primary: Mutex<Vec<Message>>,
}

struct Link {
    wire: Arc<Wire>,
    to_standby: bool,
}

impl MirrorLink for Link {
    fn send(&self, _peer: u64, message: Message) {
        let queue = if self.to_standby {
            &self.wire.to_standby
        } else {
            &self.wire.to_primary
        };
        queue.lock().unwrap().push(message);
    }
}

/// Delivers messages both ways until none is left (the standby's shell applies inline: no
/// tokio runtime here).
fn pump(wire: &Wire, primary: &PrimaryShell, standby: &Arc<StandbyShell>) {
    loop {
        let to_standby = std::mem::take(&mut *wire.to_standby.lock().unwrap());
        let to_primary = std::mem::take(&mut *wire.to_primary.lock().unwrap());
        if to_standby.is_empty() && to_primary.is_empty() {
            return;
        }
        for message in to_standby {
            standby.handle_message(message);
        }
        for message in to_primary {
            primary.handle_message(message);
        }
    }
}

fn pattern(block: usize) -> Vec<u8> {
    (0..BLOCK)
        .map(|index| (block * 31 + index / 512) as u8)
        .collect()
}

#[test]
fn a_standby_whose_disk_is_full_fails_and_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let tmpfs = match Tmpfs::mount(&dir.path().join("standby-disk"), TMPFS_BYTES) {
        Ok(tmpfs) => tmpfs,
        Err(reason) => return missing_prerequisite(&reason),
    };
    let (store, spec) = store_with_base(dir.path(), &vec![0x11u8; SIZE_BYTES], VOLUME.0);
    let primary_dir = dir.path().join("primary");
    let standby_dir = tmpfs.0.join("copy");
    Volume::create(&store, &primary_dir, &spec).unwrap();
    Volume::create(&store, &standby_dir, &spec).unwrap();

    let wire = Arc::new(Wire::default());
    let config = MirrorConfig::default();
    let standby_volume = Arc::new(
        Volume::open(
            store.clone(),
            &standby_dir,
            VolumeOptions {
                generation: 1,
                ..VolumeOptions::default()
            },
        )
        .unwrap(),
    );
    let standby = StandbyShell::new(
        VOLUME,
        1,
        false,
        standby_volume.clone(),
        1,
        config.clone(),
        Arc::new(Link {
            wire: wire.clone(),
            to_standby: false,
        }),
    );
    let primary = PrimaryShell::new(
        VOLUME,
        1,
        Some((2, StandbySync::InSync)),
        config,
        Arc::new(Link {
            wire: wire.clone(),
            to_standby: true,
        }),
    );
    let volume = Volume::open(
        store.clone(),
        &primary_dir,
        VolumeOptions {
            generation: 1,
            mirror: Some(primary.clone()),
            ..VolumeOptions::default()
        },
    )
    .unwrap();
    pump(&wire, &primary, &standby);

    // Write block after block until the standby's file system is full.
    let blocks = SIZE_BYTES / BLOCK;
    let mut acknowledged = 0;
    let mut waiting = None;
    for block in 0..blocks {
        let completion = volume
            .start_write_at((block * BLOCK) as u64, &pattern(block), false)
            .expect("the primary's disk has room")
            .expect("a mirrored write waits for its standby");
        pump(&wire, &primary, &standby);
        let mut completion = completion;
        match (&mut completion).now_or_never() {
            Some(result) => {
                result.expect("acknowledged while mirrored");
                acknowledged += 1;
            }
            None => {
                waiting = Some((block, completion));
                break;
            }
        }
    }
    let (full_at, completion) = waiting.expect("the standby's file system filled up");
    eprintln!("{acknowledged} writes acknowledged mirrored; block {full_at} hit the full disk");
    assert!(
        acknowledged > 0 && acknowledged < TMPFS_BYTES / BLOCK,
        "{acknowledged} writes fit on a {TMPFS_BYTES}-byte file system"
    );

    // The standby's copy failed for good, with the kernel's reason, and says so.
    let failure = standby_volume.failure().expect("the standby's copy failed");
    assert!(
        failure.contains("No space left on device"),
        "the reason names ENOSPC: {failure}"
    );
    assert!(matches!(
        standby.tick().as_slice(),
        [StandbyEvent::StorageFailed { .. }]
    ));
    // The primary holds the write, reports the standby failed, and does not acknowledge it
    // while the standby is the session's.
    let events = primary.tick();
    assert!(
        events.contains(&PrimaryEvent::StandbyUnreachable {
            generation: 1,
            reason: UnreachableReason::Failed
        }),
        "{events:?}"
    );
    let mut completion = completion;
    assert!((&mut completion).now_or_never().is_none());

    // Raft commits "standby dropped" (generation 2): the write completes on the primary alone.
    volume.advance_generation(2);
    primary.handle_standby_dropped(2);
    assert!(matches!(completion.now_or_never(), Some(Ok(()))));
    for block in 0..=full_at {
        let mut data = vec![0u8; BLOCK];
        volume.read_at((block * BLOCK) as u64, &mut data).unwrap();
        assert!(
            data == pattern(block),
            "block {block} reads back on the primary"
        );
    }
    // The session goes on, degraded, on the primary.
    volume
        .write_at(((full_at + 1) * BLOCK) as u64, &pattern(full_at + 1), false)
        .unwrap();
    volume.flush().unwrap();
    drop(volume);
    drop(standby);
    drop(standby_volume);
}
