//! Chunk store and volume figures, printed (never asserted):
//! - import throughput of a raw image of distinct data, and of the same image again (all dedup);
//! - random 4 KiB read IOPS from a volume's base, cached (verified chunks in memory) and uncached
//!   (every read hashes a 64 KiB chunk from the page cache), and from the writable layer, each
//!   next to `pread` of a plain file (what tgt does with a file-backed LUN) in the same run;
//! - random 4 KiB write IOPS, without FUA and with FUA (fdatasync per write), and 512-byte
//!   writes (read-modify-write of a 4 KiB block).
//!
//! - through iSCSI (libiscsi's `iscsi-perf`, 32 commands in flight): random 4 KiB and sequential
//!   64 KiB reads from a volume served by Cairn's target, next to tgt serving the raw image file
//!   (the reference peer), when tgt and libiscsi-bin are installed.
//!
//! `cargo bench -p cairn-blockstore --bench store`; `CAIRN_BENCH_IMAGE_MIB` (default 256) sets
//! the image size, `CAIRN_BENCH_SECONDS` (default 2) the time per figure.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_blockstore::chunks::{ChunkStore, ChunkStoreConfig};
use cairn_blockstore::device::BlockDevice;
use cairn_blockstore::image::NoProgress;
use cairn_blockstore::volume::{Volume, VolumeOptions, VolumeSpec};

fn environment(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// xorshift64*: fast deterministic pseudo-random numbers.
struct Random(u64);
impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn write_image(path: &Path, size_bytes: u64) {
    let mut file = File::create(path).unwrap();
    let mut random = Random(0x9e37_79b9_7f4a_7c15);
    let mut buffer = vec![0u8; 1 << 20];
    for _ in 0..size_bytes >> 20 {
        for word in buffer.chunks_exact_mut(8) {
            word.copy_from_slice(&random.next().to_le_bytes());
        }
        file.write_all(&buffer).unwrap();
    }
    file.sync_all().unwrap();
}

/// Runs `operation` for `duration`, returns operations per second.
fn rate(duration: Duration, mut operation: impl FnMut(u64)) -> f64 {
    let started = Instant::now();
    let mut count = 0u64;
    while started.elapsed() < duration {
        for _ in 0..64 {
            operation(count);
            count += 1;
        }
    }
    count as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    if std::env::args().any(|argument| argument == "--list") {
        return; // `cargo test --benches` lists benchmarks; there are none to list.
    }
    let image_mib = environment("CAIRN_BENCH_IMAGE_MIB", 256);
    let duration = Duration::from_secs(environment("CAIRN_BENCH_SECONDS", 2));
    let size_bytes = image_mib << 20;
    let dir = tempfile::tempdir_in(
        std::env::var("CAIRN_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()),
    )
    .unwrap();
    let image_path = dir.path().join("image.raw");
    write_image(&image_path, size_bytes);
    println!(
        "store benchmark: {image_mib} MiB image in {}",
        dir.path().display()
    );

    // Import.
    let store = Arc::new(
        ChunkStore::open(
            &dir.path().join("store"),
            ChunkStoreConfig {
                cache_bytes_max: 2 * size_bytes,
            },
        )
        .unwrap(),
    );
    let started = Instant::now();
    let outcome = store
        .import_file(&image_path, "bench", 1, None, &NoProgress)
        .unwrap();
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "import (new data):       {:8.1} MiB/s  ({} chunks written in {seconds:.2} s)",
        image_mib as f64 / seconds,
        outcome.chunks_written
    );
    let started = Instant::now();
    let again = store
        .import_file(&image_path, "bench", 2, None, &NoProgress)
        .unwrap();
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "import (all duplicate):  {:8.1} MiB/s  ({} chunks deduplicated)",
        image_mib as f64 / seconds,
        again.chunks_deduplicated
    );

    // Volume over the image.
    let spec = VolumeSpec {
        base: outcome.manifest_hash,
        persistent: true,
        unique_id: [0; 16],
    };
    let volume = Volume::open_or_create(
        store.clone(),
        &dir.path().join("volume"),
        &spec,
        VolumeOptions::default(),
    )
    .unwrap();
    let blocks_4k = size_bytes / 4096;
    let plain = File::open(&image_path).unwrap();
    let mut buffer = vec![0u8; 4096];
    let mut random = Random(42);

    let plain_iops = rate(duration, |_| {
        let block = random.next() % blocks_4k;
        plain.read_exact_at(&mut buffer, block * 4096).unwrap();
    });
    println!("random 4K read, plain file pread:      {plain_iops:10.0} IOPS");

    // Warm the cache with one pass, then measure.
    for block in (0..blocks_4k).step_by(16) {
        volume.read(block * 8, &mut buffer).unwrap();
    }
    let cached_iops = rate(duration, |_| {
        let block = random.next() % blocks_4k;
        volume.read(block * 8, &mut buffer).unwrap();
    });
    println!(
        "random 4K read, volume base (cached):  {cached_iops:10.0} IOPS  ({:.2}x plain file)",
        cached_iops / plain_iops
    );

    let uncached_store = Arc::new(
        ChunkStore::open(
            &dir.path().join("store"),
            ChunkStoreConfig { cache_bytes_max: 0 },
        )
        .unwrap(),
    );
    let uncached = Volume::open(
        uncached_store,
        &dir.path().join("volume"),
        VolumeOptions::default(),
    )
    .unwrap();
    let uncached_iops = rate(duration, |_| {
        let block = random.next() % blocks_4k;
        uncached.read(block * 8, &mut buffer).unwrap();
    });
    println!(
        "random 4K read, volume base (uncached, verify 64K chunk each): {uncached_iops:10.0} IOPS  ({:.2}x plain)",
        uncached_iops / plain_iops
    );
    drop(uncached);

    // Writes.
    let data = vec![0x5au8; 4096];
    let write_iops = rate(duration, |_| {
        let block = random.next() % blocks_4k;
        volume.write(block * 8, &data, false).unwrap();
    });
    println!("random 4K write, no FUA:               {write_iops:10.0} IOPS");
    volume.flush().unwrap();
    let sector_iops = rate(duration, |_| {
        let sector = random.next() % (size_bytes / 512);
        volume.write(sector, &data[..512], false).unwrap();
    });
    println!("random 512B write (4K RMW), no FUA:    {sector_iops:10.0} IOPS");
    volume.flush().unwrap();
    let fua_iops = rate(duration, |_| {
        let block = random.next() % blocks_4k;
        volume.write(block * 8, &data, true).unwrap();
    });
    let plain_write = OpenOptions::new().write(true).open(&image_path).unwrap();
    let plain_fua_iops = rate(duration, |_| {
        let block = random.next() % blocks_4k;
        plain_write.write_all_at(&data, block * 4096).unwrap();
        plain_write.sync_data().unwrap();
    });
    println!(
        "random 4K write, FUA:                  {fua_iops:10.0} IOPS  (plain file pwrite+fdatasync: {plain_fua_iops:.0})"
    );
    let (base, layer, unmapped) = volume.block_states();
    let layer_iops = rate(duration, |_| {
        let block = random.next() % blocks_4k;
        volume.read(block * 8, &mut buffer).unwrap();
    });
    println!(
        "random 4K read, mixed layer/base:      {layer_iops:10.0} IOPS  (4K blocks: {base} base, {layer} layer, {unmapped} unmapped)"
    );
    volume.flush().unwrap();
    drop(volume);
    iscsi_figures(&store, &dir.path().join("volume"), &image_path, duration);

    let stats = store.read_stats();
    println!(
        "chunk reads: {} cache hits, {} from disk, cache holds {} MiB",
        stats.cache_hits_total,
        stats.disk_reads_total,
        store.cache_bytes() >> 20
    );
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|output| output.status.success())
        .unwrap_or(false)
}

/// iscsi-perf's "iops average N" for `blocks` 512-byte blocks per command.
fn iscsi_perf(url: &str, blocks: u32, random: bool, seconds: u64) -> f64 {
    let mut arguments = vec![
        "-m".to_string(),
        "32".into(),
        "-b".into(),
        blocks.to_string(),
        "-t".into(),
        seconds.to_string(),
    ];
    if random {
        arguments.push("-r".into());
    }
    arguments.push(url.to_string());
    let output = Command::new("timeout")
        .arg((seconds + 20).to_string())
        .arg("iscsi-perf")
        .args(&arguments)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).replace('\r', "\n");
    let line = text
        .lines()
        .rfind(|line| line.starts_with("iops average"))
        .unwrap_or("");
    line.split(|c: char| !c.is_ascii_digit())
        .find(|word| !word.is_empty())
        .and_then(|word| word.parse().ok())
        .unwrap_or(0.0)
}

fn iscsi_figures(store: &Arc<ChunkStore>, volume_dir: &Path, image: &Path, duration: Duration) {
    use cairn_blockstore::iscsi::server::Target;
    use cairn_blockstore::iscsi::target::TargetConfig;
    if !have("iscsi-perf") {
        println!("iscsi figures skipped: iscsi-perf not found (apt-get install -y libiscsi-bin)");
        return;
    }
    let seconds = duration.as_secs().max(3);
    // The volume was filled by the write figures; reset it so reads come from the base (the
    // boot case: a shared image, verified chunks in the cache).
    let volume = Volume::open(store.clone(), volume_dir, VolumeOptions::default()).unwrap();
    volume.reset(None).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let target = Target::new();
    let iqn = "iqn.2026-11.org.cairn:bench-volume";
    target
        .add_target(iqn, Arc::new(volume), TargetConfig::default())
        .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!(
        "iscsi://127.0.0.1:{}/{iqn}/0",
        listener.local_addr().unwrap().port()
    );
    runtime.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let _ = target.serve(listener).await;
    });
    // Warm the chunk cache (and tgt's page cache below) with one sequential pass.
    iscsi_perf(&url, 128, false, 2);
    let volume_random = iscsi_perf(&url, 8, true, seconds);
    let volume_sequential = iscsi_perf(&url, 128, false, seconds) * 65536.0 / 1e6;

    let script = Path::new("/work/shared/peers/tgt-reference.sh");
    let tgt = if have("tgtd") && script.exists() {
        let portal = "127.0.0.1:3291";
        let started = Command::new("bash")
            .arg(script)
            .args(["start", image.to_str().unwrap(), portal])
            .output()
            .unwrap();
        let tgt_url = String::from_utf8_lossy(&started.stdout)
            .lines()
            .last()
            .unwrap_or("")
            .trim()
            .to_string();
        let figures = if started.status.success() && tgt_url.starts_with("iscsi://") {
            iscsi_perf(&tgt_url, 128, false, 2);
            Some((
                iscsi_perf(&tgt_url, 8, true, seconds),
                iscsi_perf(&tgt_url, 128, false, seconds) * 65536.0 / 1e6,
            ))
        } else {
            println!(
                "tgt did not start: {}",
                String::from_utf8_lossy(&started.stderr)
            );
            None
        };
        let _ = Command::new("bash")
            .arg(script)
            .args(["stop", portal])
            .output();
        figures
    } else {
        println!(
            "tgt figures skipped: tgtd or {} not found",
            script.display()
        );
        None
    };
    match tgt {
        Some((tgt_random, tgt_sequential)) => {
            println!(
                "iSCSI random 4K read:   volume {volume_random:8.0} IOPS, tgt (raw file) {tgt_random:8.0} IOPS ({:.2}x)",
                volume_random / tgt_random.max(1.0)
            );
            println!(
                "iSCSI sequential 64K:   volume {volume_sequential:8.0} MB/s, tgt (raw file) {tgt_sequential:8.0} MB/s ({:.2}x)",
                volume_sequential / tgt_sequential.max(1.0)
            );
        }
        None => {
            println!("iSCSI random 4K read:   volume {volume_random:8.0} IOPS");
            println!("iSCSI sequential 64K:   volume {volume_sequential:8.0} MB/s");
        }
    }
    drop(runtime);
}
