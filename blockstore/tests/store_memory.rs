//! Proves that import memory is bounded whatever the image size: a large sparse raw file (1 GiB
//! by default, `CAIRN_IMPORT_TEST_GIB` to change) with data scattered through it is imported
//! and the growth of the process's peak resident set (VmHWM) stays far below the image size.
//! The peak is printed. This file holds one test so no other test shares the process's peak.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use cairn_blockstore::chunks::{ChunkStore, ChunkStoreConfig, CHUNK_SIZE_BYTES};
use cairn_blockstore::image::NoProgress;

fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| {
            value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| kib * 1024)
        .unwrap_or(0)
}

#[test]
fn sparse_image_import_has_bounded_memory() {
    let gib: u64 = std::env::var("CAIRN_IMPORT_TEST_GIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let size_bytes = gib << 30;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sparse.img");
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .unwrap();
    file.set_len(size_bytes).unwrap();
    // 64 data chunks spread over the image, each distinct.
    let data_chunks = 64u64;
    for index in 0..data_chunks {
        let chunk: Vec<u8> = (0..CHUNK_SIZE_BYTES)
            .map(|byte| (byte as u64 * 31 + index) as u8 | 1)
            .collect();
        let offset = index * (size_bytes / data_chunks);
        file.write_all_at(&chunk, offset - offset % CHUNK_SIZE_BYTES as u64)
            .unwrap();
    }
    drop(file);
    // A small cache, so it does not count as import memory either.
    let store = ChunkStore::open(
        &dir.path().join("store"),
        ChunkStoreConfig {
            cache_bytes_max: 1 << 20,
        },
    )
    .unwrap();
    let before = peak_rss_bytes();
    let started = Instant::now();
    let outcome = store
        .import_file(&path, "sparse", 1, None, &NoProgress)
        .unwrap();
    let seconds = started.elapsed().as_secs_f64();
    let after = peak_rss_bytes();
    assert_eq!(outcome.manifest.size_bytes, size_bytes);
    assert_eq!(outcome.chunks_written, data_chunks);
    assert_eq!(
        outcome.chunks_zero,
        size_bytes / CHUNK_SIZE_BYTES as u64 - data_chunks
    );
    let growth = after.saturating_sub(before);
    eprintln!(
        "imported {gib} GiB sparse image in {seconds:.1} s ({:.0} MiB/s); peak RSS {:.1} MiB, grew {:.1} MiB; manifest {} KiB",
        size_bytes as f64 / seconds / (1 << 20) as f64,
        after as f64 / (1 << 20) as f64,
        growth as f64 / (1 << 20) as f64,
        outcome.manifest.encode().len() / 1024
    );
    // Data buffers are a fixed pool (~1 MiB); the manifest is 1/2048 of the image in memory.
    let bound = 64 * (1 << 20) + size_bytes / 1024;
    assert!(
        growth < bound,
        "peak RSS grew {growth} bytes importing {size_bytes} bytes (bound {bound})"
    );
}
