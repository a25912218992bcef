//! Proves the chunk store's promises on real files: identical chunks are stored once across
//! images; zero chunks are not stored; a flipped byte in a chunk file is reported as a medium
//! error through a volume, never served; garbage collection removes exactly the chunks no
//! manifest references, also while an import runs; qcow2, VHD, VHDX and VMDK images made by
//! `qemu-img` import to the same manifest as their raw contents (skipped, saying why, when
//! qemu-img is missing; failed instead under `CAIRN_SLOW_TESTS=1`); a corrupt image file gives a
//! clear error; progress is reported.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cairn_blockstore::chunks::{ChunkError, ChunkStore, ChunkStoreConfig, CHUNK_SIZE_BYTES};
use cairn_blockstore::device::{BlockDevice, DeviceError};
use cairn_blockstore::image::{ImageFormat, ImportError, ImportProgress, NoProgress};
use cairn_blockstore::volume::{Volume, VolumeOptions, VolumeSpec};

mod common;

fn open_store(root: &Path) -> ChunkStore {
    ChunkStore::open(root, ChunkStoreConfig::default()).unwrap()
}

/// `count` chunks; chunk i is filled from `seed + i`, or zeros when `seed + i` is 0.
fn image(seeds: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(seeds.len() * CHUNK_SIZE_BYTES);
    for seed in seeds {
        out.extend(
            (0..CHUNK_SIZE_BYTES).map(|index| if *seed == 0 { 0 } else { (index as u8) ^ seed }),
        );
    }
    out
}

#[test]
fn identical_chunks_are_stored_once_across_images() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let first = image(&[1, 2, 3, 0, 3]);
    let second = image(&[3, 2, 9, 0, 0]);
    let a = store
        .import_raw("a", 1, &mut &first[..], first.len() as u64, &NoProgress)
        .unwrap();
    let b = store
        .import_raw("b", 1, &mut &second[..], second.len() as u64, &NoProgress)
        .unwrap();
    assert_eq!(
        (a.chunks_written, a.chunks_deduplicated, a.chunks_zero),
        (3, 1, 1)
    );
    assert_eq!(
        (b.chunks_written, b.chunks_deduplicated, b.chunks_zero),
        (1, 2, 2)
    );
    // 1, 2, 3, 9: four distinct non-zero chunks on disk.
    assert_eq!(store.list_chunks().unwrap().len(), 4);
    assert_eq!(a.manifest.chunks[2], b.manifest.chunks[0]);
    assert_eq!(a.manifest.chunks[3], None);
    // Importing the same content again commits the same manifest and writes nothing.
    let again = store
        .import_raw("a", 1, &mut &first[..], first.len() as u64, &NoProgress)
        .unwrap();
    assert_eq!(again.manifest_hash, a.manifest_hash);
    assert_eq!(again.chunks_written, 0);
}

#[test]
fn short_source_and_odd_size_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let data = image(&[1, 2]);
    let error = store
        .import_raw("x", 1, &mut &data[..], data.len() as u64 + 512, &NoProgress)
        .unwrap_err();
    assert!(matches!(error, ImportError::ShortRead { .. }), "{error}");
    let error = store
        .import_raw("x", 1, &mut &data[..], 1000, &NoProgress)
        .unwrap_err();
    assert!(matches!(error, ImportError::BadSize(1000)), "{error}");
    assert!(
        store.list_manifests().unwrap().is_empty(),
        "a failed import commits nothing"
    );
}

#[test]
fn corrupt_chunk_is_reported_through_a_volume_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open_store(&dir.path().join("store")));
    let data = image(&[5, 6]);
    let outcome = store
        .import_raw("img", 1, &mut &data[..], data.len() as u64, &NoProgress)
        .unwrap();
    let hash = outcome.manifest.chunks[1].unwrap();
    let path = store.chunk_path(&hash);
    let mut bytes = fs::read(&path).unwrap();
    bytes[12345] ^= 0x01;
    fs::write(&path, bytes).unwrap();
    let spec = VolumeSpec {
        base: outcome.manifest_hash,
        persistent: false,
        unique_id: [1; 16],
    };
    let volume_dir = dir.path().join("volume");
    let volume =
        Volume::open_or_create(store.clone(), &volume_dir, &spec, VolumeOptions::default())
            .unwrap();
    let mut buffer = vec![0u8; 4096];
    volume.read(0, &mut buffer).unwrap();
    assert_eq!(buffer, data[..4096]);
    let lba = (CHUNK_SIZE_BYTES / 512) as u64;
    match volume.read(lba, &mut buffer) {
        Err(DeviceError::Medium {
            lba: reported,
            reason,
        }) => {
            assert_eq!(reported, lba);
            assert!(reason.contains("corrupt"), "{reason}");
        }
        other => panic!("expected a medium error, got {other:?}"),
    }
    assert_eq!(store.read_stats().corrupt_total, 1);
    // Overwriting the damaged range through the layer makes it readable again.
    volume.write(lba, &vec![9u8; 4096], false).unwrap();
    volume.read(lba, &mut buffer).unwrap();
    assert_eq!(buffer, vec![9u8; 4096]);
}

#[test]
fn garbage_collection_keeps_referenced_chunks_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let first = image(&[1, 2, 3]);
    let second = image(&[3, 4]);
    let a = store
        .import_raw("a", 1, &mut &first[..], first.len() as u64, &NoProgress)
        .unwrap();
    let b = store
        .import_raw("b", 1, &mut &second[..], second.len() as u64, &NoProgress)
        .unwrap();
    let stats = store.collect_garbage().unwrap();
    assert_eq!((stats.chunks_scanned, stats.chunks_removed), (4, 0));
    assert!(store.remove_manifest(&a.manifest_hash).unwrap());
    let stats = store.collect_garbage().unwrap();
    assert_eq!(
        stats.chunks_removed, 2,
        "chunks 1 and 2 go, 3 is still used by b"
    );
    assert_eq!(stats.bytes_freed, 2 * CHUNK_SIZE_BYTES as u64);
    let mut left = store.list_chunks().unwrap();
    left.sort();
    let mut expected: Vec<_> = b.manifest.chunks.iter().flatten().copied().collect();
    expected.sort();
    assert_eq!(left, expected);
    // b still reads fully and verifies.
    for hash in b.manifest.chunks.iter().flatten() {
        store.read_chunk_uncached(hash).unwrap();
    }
}

/// A progress callback that runs a garbage collection in the middle of an import: the chunks
/// the import already references (written or deduplicated) must survive it.
struct CollectMidway<'a> {
    store: &'a ChunkStore,
    collected: AtomicU64,
}

impl ImportProgress for CollectMidway<'_> {
    fn update(&self, done_bytes: u64, _total_bytes: u64) {
        if done_bytes >= 4 * CHUNK_SIZE_BYTES as u64
            && self.collected.fetch_add(1, Ordering::SeqCst) == 0
        {
            // Give the writer threads time to finish the chunks handed to them.
            std::thread::sleep(std::time::Duration::from_millis(200));
            let stats = self.store.collect_garbage().unwrap();
            // Chunk 7 is garbage by the manifests on disk, but this import already deduplicated
            // against it: it must be pinned, not removed.
            assert_eq!(
                (stats.chunks_pinned, stats.chunks_removed),
                (1, 0),
                "{stats:?}"
            );
        }
    }
}

#[test]
fn garbage_collection_during_an_import_keeps_its_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let old = image(&[7]);
    let old_import = store
        .import_raw("old", 1, &mut &old[..], old.len() as u64, &NoProgress)
        .unwrap();
    store.remove_manifest(&old_import.manifest_hash).unwrap();
    // Chunk 7 is now garbage, but the new import deduplicates against it before GC runs.
    let data = image(&[7, 11, 12, 13, 14, 15, 16, 17]);
    let progress = CollectMidway {
        store: &store,
        collected: AtomicU64::new(0),
    };
    let outcome = store
        .import_raw("new", 1, &mut &data[..], data.len() as u64, &progress)
        .unwrap();
    assert!(
        progress.collected.load(Ordering::SeqCst) > 0,
        "the collection ran"
    );
    for hash in outcome.manifest.chunks.iter().flatten() {
        store.read_chunk_uncached(hash).unwrap();
    }
    // And a collection after the import (its manifest now on disk) keeps them too.
    let stats = store.collect_garbage().unwrap();
    assert_eq!(stats.chunks_removed, 0);
    assert_eq!(stats.chunks_live, 8);
}

struct Recorder {
    calls: AtomicU64,
    last: AtomicU64,
    finished: AtomicU64,
}

impl ImportProgress for Recorder {
    fn update(&self, done_bytes: u64, total_bytes: u64) {
        assert!(done_bytes <= total_bytes);
        assert!(
            done_bytes >= self.last.swap(done_bytes, Ordering::SeqCst),
            "progress goes forward"
        );
        self.calls.fetch_add(1, Ordering::SeqCst);
    }
    fn finish(&self, done_bytes: u64, total_bytes: u64) {
        assert_eq!(done_bytes, total_bytes);
        self.finished.store(done_bytes, Ordering::SeqCst);
    }
}

#[test]
fn raw_file_import_reports_progress() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir.path().join("store"));
    let data = image(&[1, 0, 2, 3]);
    let path = dir.path().join("disk.img");
    fs::write(&path, &data[..data.len() - 1536]).unwrap();
    let recorder = Recorder {
        calls: AtomicU64::new(0),
        last: AtomicU64::new(0),
        finished: AtomicU64::new(0),
    };
    let outcome = store
        .import_file(&path, "disk", 2, None, &recorder)
        .unwrap();
    assert_eq!(outcome.manifest.size_bytes, data.len() as u64 - 1536);
    assert_eq!(recorder.calls.load(Ordering::SeqCst), 4);
    assert_eq!(
        recorder.finished.load(Ordering::SeqCst),
        outcome.manifest.size_bytes
    );
    assert_eq!(
        store.load_manifest(&outcome.manifest_hash).unwrap(),
        outcome.manifest
    );
}

fn qemu_img_available() -> bool {
    let found = Command::new("qemu-img").arg("--version").output().is_ok()
        && Command::new("qemu-nbd").arg("--version").output().is_ok();
    if !found {
        common::missing_prerequisite("qemu-img/qemu-nbd not installed (Debian package qemu-utils)");
    }
    found
}

fn qemu_img(arguments: &[&str]) {
    let output = Command::new("qemu-img").args(arguments).output().unwrap();
    assert!(
        output.status.success(),
        "qemu-img {arguments:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn qcow2_vhd_vhdx_vmdk_import_like_their_raw_contents() {
    if !qemu_img_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir.path().join("store"));
    let mut data = image(&[1, 0, 2, 0, 0, 3, 4, 0]);
    data.truncate(data.len() - 4096);
    let raw = dir.path().join("disk.raw");
    fs::write(&raw, &data).unwrap();
    let reference = store
        .import_file(&raw, "disk", 1, None, &NoProgress)
        .unwrap();
    for (format, qemu_format) in [
        (ImageFormat::Qcow2, "qcow2"),
        (ImageFormat::Vhd, "vpc"),
        (ImageFormat::Vhdx, "vhdx"),
        (ImageFormat::Vmdk, "vmdk"),
    ] {
        let path = dir.path().join(format!("disk.{format}"));
        let mut arguments = vec!["convert", "-q", "-f", "raw", "-O", qemu_format];
        if format == ImageFormat::Vhd {
            arguments.extend(["-o", "force_size=on"]);
        }
        let (raw_text, path_text) = (raw.to_str().unwrap(), path.to_str().unwrap());
        arguments.extend([raw_text, path_text]);
        qemu_img(&arguments);
        let mut file = fs::File::open(&path).unwrap();
        assert_eq!(
            cairn_blockstore::image::detect_format(&mut file).unwrap(),
            format
        );
        let outcome = store
            .import_file(&path, "disk", 1, None, &NoProgress)
            .unwrap();
        assert_eq!(
            outcome.manifest.size_bytes,
            data.len() as u64,
            "{format} virtual size"
        );
        assert_eq!(
            outcome.manifest_hash, reference.manifest_hash,
            "{format} content differs"
        );
    }
}

#[test]
fn qcow2_made_by_qemu_img_create_boots_as_zeros() {
    if !qemu_img_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open_store(&dir.path().join("store")));
    let path = dir.path().join("empty.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path.to_str().unwrap(), "64M"]);
    let outcome = store
        .import_file(&path, "empty", 1, None, &NoProgress)
        .unwrap();
    assert_eq!(outcome.manifest.size_bytes, 64 << 20);
    assert_eq!(outcome.chunks_zero, 1024);
    assert!(
        store.list_chunks().unwrap().is_empty(),
        "zero chunks are not stored"
    );
}

#[test]
fn corrupt_image_files_give_a_clear_error() {
    if !qemu_img_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir.path().join("store"));
    let path = dir.path().join("bad.qcow2");
    let mut file = fs::File::create(&path).unwrap();
    file.write_all(b"QFI\xfb").unwrap();
    file.write_all(&[0x5a; 400]).unwrap();
    drop(file);
    let error = store
        .import_file(&path, "bad", 1, None, &NoProgress)
        .unwrap_err();
    let message = error.to_string();
    assert!(
        matches!(
            error,
            ImportError::Converter {
                format: ImageFormat::Qcow2,
                ..
            }
        ),
        "{message}"
    );
    assert!(
        message.contains("qcow2") && message.contains("bad.qcow2"),
        "{message}"
    );
    eprintln!("corrupt qcow2 -> {message}");
    // A truncated but otherwise valid qcow2: header fine, data missing.
    let good = dir.path().join("good.qcow2");
    let raw = dir.path().join("src.raw");
    fs::write(&raw, image(&[1, 2, 3, 4])).unwrap();
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        good.to_str().unwrap(),
    ]);
    let bytes = fs::read(&good).unwrap();
    let truncated = dir.path().join("truncated.qcow2");
    fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let error = store
        .import_file(&truncated, "truncated", 1, None, &NoProgress)
        .unwrap_err();
    eprintln!("truncated qcow2 -> {error}");
    assert!(
        matches!(
            error,
            ImportError::Converter { .. }
                | ImportError::Read { .. }
                | ImportError::ShortRead { .. }
        ),
        "{error}"
    );
    assert!(store.list_manifests().unwrap().is_empty());
    // A missing file names the path.
    let error = store
        .import_file(&dir.path().join("nope.img"), "x", 1, None, &NoProgress)
        .unwrap_err();
    assert!(error.to_string().contains("nope.img"));
}

#[test]
fn reopened_store_drops_temp_files_and_keeps_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let data = image(&[4, 5]);
    let outcome = store
        .import_raw("x", 1, &mut &data[..], data.len() as u64, &NoProgress)
        .unwrap();
    drop(store);
    // A crash mid-write leaves a temp file behind.
    fs::write(dir.path().join("tmp").join("chunk-1-1"), b"partial").unwrap();
    let store = open_store(dir.path());
    assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    let manifest = store.load_manifest(&outcome.manifest_hash).unwrap();
    for hash in manifest.chunks.iter().flatten() {
        store.read_chunk(hash).unwrap();
    }
    assert!(matches!(
        store.read_chunk(&cairn_blockstore::chunks::ChunkHash::of(b"absent")),
        Err(ChunkError::Missing(_))
    ));
}

#[test]
fn terminal_progress_renders_an_import() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let data = image(&[1, 2, 3, 4, 5, 6, 7, 8]);
    let progress = cairn_blockstore::image::TerminalProgress::new("importing test image");
    let outcome = store
        .import_raw("shown", 1, &mut &data[..], data.len() as u64, &progress)
        .unwrap();
    assert_eq!(outcome.chunks_written, 8);
}

#[test]
fn scrub_and_missing_chunks_say_what_a_node_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let data = image(&[1, 2, 3, 0, 1]);
    let outcome = store
        .import_raw("s", 1, &mut &data[..], data.len() as u64, &NoProgress)
        .unwrap();
    let manifest = &outcome.manifest;
    assert!(store.missing_chunks(manifest).is_empty());
    let report = store.scrub(manifest).unwrap();
    assert!(report.is_clean());
    assert_eq!(report.chunks_verified, 3);
    let [first, second] = [0, 1].map(|index| manifest.chunks[index].unwrap());
    fs::remove_file(store.chunk_path(&first)).unwrap();
    let path = store.chunk_path(&second);
    let mut bytes = fs::read(&path).unwrap();
    bytes[0] ^= 1;
    fs::write(&path, bytes).unwrap();
    assert_eq!(store.missing_chunks(manifest), vec![first]);
    let report = store.scrub(manifest).unwrap();
    assert_eq!(
        (
            report.chunks_verified,
            report.missing.clone(),
            report.corrupt.clone()
        ),
        (1, vec![first], vec![second])
    );
    // Receiving a chunk: a copy that does not match its name is refused; the right one heals.
    let good = data[..CHUNK_SIZE_BYTES].to_vec();
    let mut bad = good.clone();
    bad[5] ^= 1;
    assert!(matches!(
        store.put_chunk_verified(&first, &bad),
        Err(ChunkError::Corrupt { .. })
    ));
    store.put_chunk_verified(&first, &good).unwrap();
    assert!(store.missing_chunks(manifest).is_empty());
}
