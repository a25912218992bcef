//! Storage faults are fatal for a volume (DESIGN.md "Durability of one node's disk"): an
//! injected I/O error in `fdatasync`, a data write or a journal append makes that call fail
//! and every later call fail too, so no SYNCHRONIZE CACHE is ever answered GOOD for writes that
//! did not reach the disk. The faults are injected through the crate's `failpoints` feature on
//! a real volume in a temporary directory; after each fault the volume is dropped (a crash) and
//! reopened to check that everything flushed before the fault is still there.
//!
//! The bug this guards against: `flush` used to take the pending map records and clear the
//! dirty flag *before* `fdatasync`; when the sync failed both were lost, and the next flush
//! answered GOOD without syncing anything.

mod common;

use std::sync::Arc;

use cairn_blockstore::chunks::ChunkStore;
use cairn_blockstore::device::{BlockDevice, DeviceError};
use cairn_blockstore::volume::{
    Volume, VolumeError, VolumeOptions, VolumeSpec, FAILPOINT_JOURNAL_APPEND, FAILPOINT_SYNC_DATA,
    FAILPOINT_WRITE_DATA,
};
use common::store_with_base;

const SIZE_BYTES: usize = 1 << 20;

fn setup() -> (tempfile::TempDir, Arc<ChunkStore>, VolumeSpec) {
    let dir = tempfile::tempdir().unwrap();
    let (store, spec) = store_with_base(dir.path(), &vec![0x11u8; SIZE_BYTES], [3; 16]);
    (dir, store, spec)
}

fn read(volume: &Volume, offset: u64) -> Vec<u8> {
    let mut buffer = vec![0u8; 4096];
    volume.read_at(offset, &mut buffer).unwrap();
    buffer
}

/// Runs one fault: writes and flushes block 0, writes block 1, arms `failpoint`, runs `faulty`
/// (which must fail), and checks the volume refuses everything after, then that a reopened
/// copy still has block 0.
fn check_fault(failpoint: &str, faulty: impl FnOnce(&Volume) -> Result<(), VolumeError>) {
    let (dir, store, spec) = setup();
    let path = dir.path().join("volume");
    let volume =
        Volume::open_or_create(store.clone(), &path, &spec, VolumeOptions::default()).unwrap();
    volume.write_at(0, &[0xaa; 4096], false).unwrap();
    volume.flush().unwrap();
    volume.write_at(4096, &[0xbb; 4096], false).unwrap();

    fail::cfg(failpoint, "return").unwrap();
    let result = faulty(&volume);
    fail::remove(failpoint);
    assert!(
        matches!(result, Err(VolumeError::Io { .. })),
        "{failpoint}: the faulty call fails with the i/o error, got {result:?}"
    );
    assert!(
        volume.failure().is_some(),
        "{failpoint}: volume marked failed"
    );

    // Every later call fails, the fault being gone: above all, a flush never answers GOOD.
    assert!(matches!(volume.flush(), Err(VolumeError::Failed(_))));
    assert!(matches!(
        volume.write_at(8192, &[1; 4096], false),
        Err(VolumeError::Failed(_))
    ));
    let mut buffer = vec![0u8; 4096];
    assert!(matches!(
        volume.read_at(0, &mut buffer),
        Err(VolumeError::Failed(_))
    ));
    // The iSCSI target sees a retryable error for another path, not a medium error.
    assert!(matches!(
        BlockDevice::flush(&volume),
        Err(DeviceError::Unavailable(_))
    ));

    drop(volume); // the node stops: a crash
    let reopened = Volume::open(store, &path, VolumeOptions::default()).unwrap();
    assert_eq!(
        read(&reopened, 0),
        vec![0xaa; 4096],
        "{failpoint}: flushed write kept"
    );
    let second = read(&reopened, 4096);
    assert!(
        second == vec![0xbb; 4096] || second == vec![0x11; 4096],
        "{failpoint}: an unflushed write reads old or new"
    );
}

/// One test function: failpoints are global to the process, so the cases run one by one.
#[test]
fn a_storage_fault_fails_the_volume_for_good() {
    let scenario = fail::FailScenario::setup();
    check_fault(FAILPOINT_SYNC_DATA, |volume| volume.flush());
    check_fault(FAILPOINT_JOURNAL_APPEND, |volume| volume.flush());
    check_fault(FAILPOINT_WRITE_DATA, |volume| {
        volume.write_at(12288, &[0xcc; 4096], false)
    });
    // A FUA write whose sync fails is not acknowledged.
    check_fault(FAILPOINT_SYNC_DATA, |volume| {
        volume.write_at(12288, &[0xdd; 4096], true)
    });
    scenario.teardown();
}
