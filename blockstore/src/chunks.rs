//! Content-addressed chunk store: fixed-size chunks named by their BLAKE3 hash, stored once.
//!
//! # On-disk layout
//!
//! ```text
//! <root>/chunks/<hh>/<64 hex digits>   one file per chunk, exactly CHUNK_SIZE_BYTES long,
//!                                      <hh> = first byte of the hash (256 fan-out directories)
//! <root>/manifests/<64 hex>.manifest   committed image versions (see `crate::image`)
//! <root>/tmp/                          files being written; emptied at open
//! ```
//!
//! # Why one file per chunk (and not pack files)
//!
//! A chunk is 64 KiB, so even a 1 TiB store is ~16 M files spread over 256 directories, which
//! ext4 and XFS handle well. In exchange: a chunk is written crash-safely by the classic
//! temp-file, `fdatasync`, rename, directory-`fsync` sequence with no index to keep consistent;
//! garbage collection is an `unlink` with no compaction; a corrupt file damages one chunk only;
//! replication (a later issue) copies files by name. Pack files would avoid a sync per chunk
//! during import; instead an import writes new chunks to `tmp/` unsynced, makes a batch of 256
//! durable with one `syncfs`, and only then renames them into place (see `crate::image::import`).
//! Single chunks (`put_chunk`) use temp file + `fdatasync` + rename.
//!
//! # Invariants
//!
//! - A file under `chunks/` at its final name always holds the complete chunk: its data is
//!   made durable (`fdatasync`, or `syncfs` for an import batch) *before* the rename that gives
//!   it that name. The rename itself becomes durable
//!   when the directory is fsynced, which an import does for every directory it touched before it
//!   writes its manifest (the commit point). So after a crash, a chunk file is either complete or
//!   absent, and every chunk of a committed manifest is present.
//! - Every chunk read from disk is hashed and compared with its name before a single byte is
//!   returned: corruption is an error ([`ChunkError::Corrupt`]), never data. Verified chunks are
//!   kept in a bounded CLOCK cache ([`ChunkStoreConfig::cache_bytes_max`]) and served from memory
//!   without re-hashing (memory is trusted, the disk is not).
//! - All-zero chunks are never stored: manifests mark them, readers synthesise zeros.
//! - Garbage collection never removes a chunk that a stored manifest references or that an
//!   import in progress has pinned (see [`ChunkStore::collect_garbage`] in `crate::image`).
//!
//! # Not done here
//!
//! Replication between nodes, compression, encryption, variable-size (content-defined) chunking.
//! One `ChunkStore` owns a store directory at a time (the node's); nothing locks it against a
//! second, and a second one's `open` would delete the first one's in-flight temp files.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Size of every chunk. Images are cut at these boundaries; the last chunk is zero-padded.
pub const CHUNK_SIZE_BYTES: usize = 64 * 1024;

/// A BLAKE3 hash naming a chunk (or, in `crate::image`, a manifest).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    pub fn of(data: &[u8]) -> Self {
        ChunkHash(*blake3::hash(data).as_bytes())
    }

    pub fn to_hex(&self) -> String {
        let mut text = String::with_capacity(64);
        for byte in self.0 {
            text.push(char::from_digit((byte >> 4) as u32, 16).unwrap_or('0'));
            text.push(char::from_digit((byte & 0xf) as u32, 16).unwrap_or('0'));
        }
        text
    }

    pub fn from_hex(text: &str) -> Option<Self> {
        if text.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        let bytes = text.as_bytes();
        for (index, slot) in out.iter_mut().enumerate() {
            let high = (bytes[2 * index] as char).to_digit(16)?;
            let low = (bytes[2 * index + 1] as char).to_digit(16)?;
            *slot = (high * 16 + low) as u8;
        }
        Some(ChunkHash(out))
    }
}

impl std::fmt::Debug for ChunkHash {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{}", &self.to_hex()[..16])
    }
}

impl std::fmt::Display for ChunkHash {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.to_hex())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk {hash} is corrupt on disk: content hashes to {actual}")]
    Corrupt { hash: ChunkHash, actual: ChunkHash },
    #[error("chunk {hash} has the wrong size on disk: {size_bytes} bytes")]
    WrongSize { hash: ChunkHash, size_bytes: u64 },
    #[error("chunk {0} is missing from the store")]
    Missing(ChunkHash),
    #[error("chunk data is {0} bytes, expected {CHUNK_SIZE_BYTES}")]
    BadLength(usize),
    #[error("chunk store i/o error at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub(crate) fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ChunkError + '_ {
    move |source| ChunkError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Clone, Debug)]
pub struct ChunkStoreConfig {
    /// Upper bound on verified chunk bytes held in memory. 0 disables the cache.
    pub cache_bytes_max: u64,
}

impl Default for ChunkStoreConfig {
    fn default() -> Self {
        ChunkStoreConfig {
            cache_bytes_max: 256 * 1024 * 1024,
        }
    }
}

/// Counters of the chunk read path, for metrics and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChunkReadStats {
    pub cache_hits_total: u64,
    pub disk_reads_total: u64,
    pub corrupt_total: u64,
}

/// Chunks pinned against garbage collection. `active` counts imports using a chunk; `committed`
/// holds chunks of manifests committed since the last collection started (see
/// `ChunkStore::collect_garbage` for why they stay pinned until then).
#[derive(Default)]
pub(crate) struct Pins {
    pub(crate) active: HashMap<ChunkHash, u32>,
    pub(crate) committed: HashSet<ChunkHash>,
}

pub struct ChunkStore {
    root: PathBuf,
    chunks_dir: PathBuf,
    tmp_dir: PathBuf,
    cache: ChunkCache,
    pins: Mutex<Pins>,
    temp_counter: AtomicU64,
    cache_hits_total: AtomicU64,
    disk_reads_total: AtomicU64,
    corrupt_total: AtomicU64,
}

/// Whether a chunk-sized buffer is all zeros (such chunks are never stored).
pub fn is_zero(data: &[u8]) -> bool {
    // Slice equality compiles to memcmp, fast even in unoptimised builds.
    static ZEROS: [u8; CHUNK_SIZE_BYTES] = [0; CHUNK_SIZE_BYTES];
    data.chunks(CHUNK_SIZE_BYTES)
        .all(|piece| piece == &ZEROS[..piece.len()])
}

impl ChunkStore {
    /// Opens (creating if needed) the store rooted at `root` and removes leftovers in `tmp/`.
    pub fn open(root: &Path, config: ChunkStoreConfig) -> Result<Self, ChunkError> {
        let chunks_dir = root.join("chunks");
        let tmp_dir = root.join("tmp");
        for dir in [
            root.to_path_buf(),
            chunks_dir.clone(),
            root.join("manifests"),
            tmp_dir.clone(),
        ] {
            fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        }
        // Anything in tmp/ is a write that never reached its rename: not part of any chunk.
        for entry in fs::read_dir(&tmp_dir).map_err(io_error(&tmp_dir))? {
            let entry = entry.map_err(io_error(&tmp_dir))?;
            let path = entry.path();
            fs::remove_file(&path).map_err(io_error(&path))?;
        }
        Ok(ChunkStore {
            root: root.to_path_buf(),
            chunks_dir,
            tmp_dir,
            cache: ChunkCache::new(config.cache_bytes_max),
            pins: Mutex::new(Pins::default()),
            temp_counter: AtomicU64::new(0),
            cache_hits_total: AtomicU64::new(0),
            disk_reads_total: AtomicU64::new(0),
            corrupt_total: AtomicU64::new(0),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn pins(&self) -> MutexGuard<'_, Pins> {
        self.pins
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn chunk_path(&self, hash: &ChunkHash) -> PathBuf {
        let hex = hash.to_hex();
        self.chunks_dir.join(&hex[..2]).join(hex)
    }

    pub(crate) fn fanout_dir(&self, hash: &ChunkHash) -> PathBuf {
        self.chunks_dir.join(&hash.to_hex()[..2])
    }

    pub(crate) fn chunks_dir(&self) -> &Path {
        &self.chunks_dir
    }

    pub(crate) fn temp_path(&self, label: &str) -> PathBuf {
        let serial = self.temp_counter.fetch_add(1, Ordering::Relaxed);
        self.tmp_dir
            .join(format!("{label}-{}-{serial}", std::process::id()))
    }

    /// Whether the chunk's file exists (not verified).
    pub fn contains(&self, hash: &ChunkHash) -> bool {
        self.chunk_path(hash).exists()
    }

    /// Returns a verified chunk: from the cache, or read from disk and checked against its hash.
    /// A cache hit costs a lock, a hash-map probe and an `Arc` clone: no allocation, no copy.
    pub fn read_chunk(&self, hash: &ChunkHash) -> Result<Arc<[u8]>, ChunkError> {
        if let Some(data) = self.cache.get(hash) {
            self.cache_hits_total.fetch_add(1, Ordering::Relaxed);
            return Ok(data);
        }
        let data = self.read_chunk_uncached(hash)?;
        self.cache.insert(*hash, data.clone());
        Ok(data)
    }

    /// Reads and verifies a chunk from disk, bypassing (and not filling) the cache.
    pub fn read_chunk_uncached(&self, hash: &ChunkHash) -> Result<Arc<[u8]>, ChunkError> {
        self.disk_reads_total.fetch_add(1, Ordering::Relaxed);
        let path = self.chunk_path(hash);
        let mut file = match File::open(&path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Err(ChunkError::Missing(*hash))
            }
            Err(error) => {
                return Err(ChunkError::Io {
                    path,
                    source: error,
                })
            }
        };
        let mut data = vec![0u8; CHUNK_SIZE_BYTES];
        let mut filled = 0;
        loop {
            let count = file.read(&mut data[filled..]).map_err(io_error(&path))?;
            if count == 0 {
                break;
            }
            filled += count;
            if filled == CHUNK_SIZE_BYTES {
                // One more byte means the file is too long.
                let mut extra = [0u8; 1];
                if file.read(&mut extra).map_err(io_error(&path))? != 0 {
                    let size_bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
                    self.corrupt_total.fetch_add(1, Ordering::Relaxed);
                    return Err(ChunkError::WrongSize {
                        hash: *hash,
                        size_bytes,
                    });
                }
                break;
            }
        }
        if filled != CHUNK_SIZE_BYTES {
            self.corrupt_total.fetch_add(1, Ordering::Relaxed);
            return Err(ChunkError::WrongSize {
                hash: *hash,
                size_bytes: filled as u64,
            });
        }
        let actual = ChunkHash::of(&data);
        if actual != *hash {
            self.corrupt_total.fetch_add(1, Ordering::Relaxed);
            tracing::error!(chunk = %hash, actual = %actual, "chunk corrupt on disk");
            return Err(ChunkError::Corrupt {
                hash: *hash,
                actual,
            });
        }
        Ok(Arc::from(data.into_boxed_slice()))
    }

    /// Stores a chunk received from elsewhere only if it hashes to `expected`: a corrupt copy
    /// is refused, never stored under the wrong name.
    pub fn put_chunk_verified(&self, expected: &ChunkHash, data: &[u8]) -> Result<(), ChunkError> {
        let actual = ChunkHash::of(data);
        if actual != *expected {
            return Err(ChunkError::Corrupt {
                hash: *expected,
                actual,
            });
        }
        self.put_chunk(data).map(|_| ())
    }

    /// Writes one chunk durably unless it is already stored; returns its hash. Used for chunks
    /// arriving one by one (replication, a later issue). The chunk is complete and its name
    /// durable when this returns. Does not pin: callers racing a GC must hold their own pin.
    pub fn put_chunk(&self, data: &[u8]) -> Result<ChunkHash, ChunkError> {
        let hash = ChunkHash::of(data);
        self.write_chunk_file(&hash, data)?;
        let dir = self.fanout_dir(&hash);
        sync_dir(&dir)?;
        Ok(hash)
    }

    /// Writes `data` (which must hash to `hash`) to its final name if it is not there yet:
    /// temp file, `fdatasync`, rename. The caller fsyncs the fan-out directory before relying on
    /// the name being durable. Returns whether a file was written.
    pub(crate) fn write_chunk_file(
        &self,
        hash: &ChunkHash,
        data: &[u8],
    ) -> Result<bool, ChunkError> {
        if data.len() != CHUNK_SIZE_BYTES {
            return Err(ChunkError::BadLength(data.len()));
        }
        let final_path = self.chunk_path(hash);
        if final_path.exists() {
            return Ok(false);
        }
        let dir = self.fanout_dir(hash);
        fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        let temp = self.temp_path("chunk");
        let result = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&temp)
                .map_err(io_error(&temp))?;
            file.write_all(data).map_err(io_error(&temp))?;
            file.sync_data().map_err(io_error(&temp))?;
            fs::rename(&temp, &final_path).map_err(io_error(&final_path))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result.map(|()| true)
    }

    /// Writes chunk data to a new temp file without syncing it; [`Self::publish_staged`] makes
    /// it durable and names it. Used by imports, which sync whole batches at once.
    pub(crate) fn stage_chunk_file(&self, data: &[u8]) -> Result<PathBuf, ChunkError> {
        if data.len() != CHUNK_SIZE_BYTES {
            return Err(ChunkError::BadLength(data.len()));
        }
        let temp = self.temp_path("staged");
        let result = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)
            .and_then(|mut file| file.write_all(data))
            .map_err(io_error(&temp));
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result.map(|()| temp)
    }

    /// Makes staged chunk files durable with one `syncfs` of the store's file system, then
    /// renames each to its final name (data durable before the name exists: the invariant
    /// above). The caller fsyncs the fan-out directories before its commit point.
    pub(crate) fn publish_staged(&self, staged: &[(ChunkHash, PathBuf)]) -> Result<(), ChunkError> {
        let tmp = File::open(&self.tmp_dir).map_err(io_error(&self.tmp_dir))?;
        rustix::fs::syncfs(&tmp).map_err(|errno| ChunkError::Io {
            path: self.tmp_dir.clone(),
            source: std::io::Error::from_raw_os_error(errno.raw_os_error()),
        })?;
        for (hash, temp) in staged {
            let dir = self.fanout_dir(hash);
            fs::create_dir_all(&dir).map_err(io_error(&dir))?;
            let final_path = self.chunk_path(hash);
            fs::rename(temp, &final_path).map_err(io_error(&final_path))?;
        }
        Ok(())
    }

    pub fn read_stats(&self) -> ChunkReadStats {
        ChunkReadStats {
            cache_hits_total: self.cache_hits_total.load(Ordering::Relaxed),
            disk_reads_total: self.disk_reads_total.load(Ordering::Relaxed),
            corrupt_total: self.corrupt_total.load(Ordering::Relaxed),
        }
    }

    /// Bytes of verified chunks held in memory now.
    pub fn cache_bytes(&self) -> u64 {
        self.cache.bytes()
    }

    /// Drops every cached chunk (benchmarks, tests, and after detecting tampering).
    pub fn clear_cache(&self) {
        self.cache.clear();
    }

    pub(crate) fn evict_cached(&self, hash: &ChunkHash) {
        self.cache.remove(hash);
    }

    /// Every chunk file name in the store (not verified). Order unspecified.
    pub fn list_chunks(&self) -> Result<Vec<ChunkHash>, ChunkError> {
        let mut out = Vec::new();
        for fanout in fs::read_dir(&self.chunks_dir).map_err(io_error(&self.chunks_dir))? {
            let fanout = fanout.map_err(io_error(&self.chunks_dir))?.path();
            if !fanout.is_dir() {
                continue;
            }
            for entry in fs::read_dir(&fanout).map_err(io_error(&fanout))? {
                let entry = entry.map_err(io_error(&fanout))?;
                if let Some(hash) = entry.file_name().to_str().and_then(ChunkHash::from_hex) {
                    out.push(hash);
                }
            }
        }
        Ok(out)
    }
}

/// fsync a directory so that renames and unlinks inside it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), ChunkError> {
    File::open(dir)
        .and_then(|handle| handle.sync_all())
        .map_err(io_error(dir))
}

const CACHE_SHARDS: usize = 16;

/// Bounded cache of verified chunks, CLOCK eviction, sharded by the hash's first byte.
struct ChunkCache {
    shards: Vec<Mutex<CacheShard>>,
    shard_bytes_max: u64,
}

#[derive(Default)]
struct CacheShard {
    entries: HashMap<ChunkHash, CacheEntry>,
    clock: VecDeque<ChunkHash>,
    bytes: u64,
}

struct CacheEntry {
    data: Arc<[u8]>,
    referenced: bool,
}

impl ChunkCache {
    fn new(bytes_max: u64) -> Self {
        ChunkCache {
            shards: (0..CACHE_SHARDS)
                .map(|_| Mutex::new(CacheShard::default()))
                .collect(),
            shard_bytes_max: bytes_max / CACHE_SHARDS as u64,
        }
    }

    fn shard(&self, hash: &ChunkHash) -> MutexGuard<'_, CacheShard> {
        self.shards[hash.0[0] as usize % CACHE_SHARDS]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn get(&self, hash: &ChunkHash) -> Option<Arc<[u8]>> {
        let mut shard = self.shard(hash);
        let entry = shard.entries.get_mut(hash)?;
        entry.referenced = true;
        Some(entry.data.clone())
    }

    fn insert(&self, hash: ChunkHash, data: Arc<[u8]>) {
        let size = data.len() as u64;
        if size > self.shard_bytes_max {
            return;
        }
        let mut shard = self.shard(&hash);
        if shard.entries.contains_key(&hash) {
            return;
        }
        while shard.bytes + size > self.shard_bytes_max {
            let Some(victim) = shard.clock.pop_front() else {
                break;
            };
            let second_chance = match shard.entries.get_mut(&victim) {
                Some(entry) if entry.referenced => {
                    entry.referenced = false;
                    true
                }
                Some(_) => false,
                None => continue,
            };
            if second_chance {
                shard.clock.push_back(victim);
            } else if let Some(entry) = shard.entries.remove(&victim) {
                shard.bytes -= entry.data.len() as u64;
            }
        }
        shard.bytes += size;
        shard.clock.push_back(hash);
        shard.entries.insert(
            hash,
            CacheEntry {
                data,
                referenced: false,
            },
        );
    }

    fn remove(&self, hash: &ChunkHash) {
        let mut shard = self.shard(hash);
        if let Some(entry) = shard.entries.remove(hash) {
            shard.bytes -= entry.data.len() as u64;
            shard.clock.retain(|candidate| candidate != hash);
        }
    }

    fn clear(&self) {
        for shard in &self.shards {
            let mut shard = shard
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            *shard = CacheShard::default();
        }
    }

    fn bytes(&self) -> u64 {
        self.shards
            .iter()
            .map(|shard| {
                shard
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .bytes
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(seed: u8) -> Vec<u8> {
        (0..CHUNK_SIZE_BYTES)
            .map(|index| (index as u8).wrapping_mul(seed).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn put_then_read_verifies_and_caches() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), ChunkStoreConfig::default()).unwrap();
        let data = chunk(7);
        let hash = store.put_chunk(&data).unwrap();
        assert_eq!(hash, ChunkHash::of(&data));
        assert_eq!(&*store.read_chunk(&hash).unwrap(), &data[..]);
        assert_eq!(&*store.read_chunk(&hash).unwrap(), &data[..]);
        let stats = store.read_stats();
        assert_eq!(stats.disk_reads_total, 1);
        assert_eq!(stats.cache_hits_total, 1);
        assert_eq!(store.list_chunks().unwrap(), vec![hash]);
    }

    #[test]
    fn flipped_byte_is_reported_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), ChunkStoreConfig::default()).unwrap();
        let hash = store.put_chunk(&chunk(3)).unwrap();
        let path = store.chunk_path(&hash);
        let mut bytes = fs::read(&path).unwrap();
        bytes[1000] ^= 0x40;
        fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            store.read_chunk(&hash),
            Err(ChunkError::Corrupt { .. })
        ));
        fs::write(&path, &bytes[..100]).unwrap();
        assert!(matches!(
            store.read_chunk(&hash),
            Err(ChunkError::WrongSize {
                size_bytes: 100,
                ..
            })
        ));
        fs::remove_file(&path).unwrap();
        assert!(matches!(
            store.read_chunk(&hash),
            Err(ChunkError::Missing(_))
        ));
        assert_eq!(store.read_stats().corrupt_total, 2);
    }

    #[test]
    fn cache_stays_within_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let bytes_max = (CHUNK_SIZE_BYTES * CACHE_SHARDS * 2) as u64;
        let store = ChunkStore::open(
            dir.path(),
            ChunkStoreConfig {
                cache_bytes_max: bytes_max,
            },
        )
        .unwrap();
        for seed in 1..=200u8 {
            let hash = store.put_chunk(&chunk(seed)).unwrap();
            store.read_chunk(&hash).unwrap();
            assert!(store.cache_bytes() <= bytes_max);
        }
        assert!(store.cache_bytes() > 0);
    }

    #[test]
    fn hex_round_trip_and_zero_detection() {
        let hash = ChunkHash::of(b"cairn");
        assert_eq!(ChunkHash::from_hex(&hash.to_hex()), Some(hash));
        assert_eq!(ChunkHash::from_hex("zz"), None);
        assert!(is_zero(&[0u8; 100]));
        let mut data = [0u8; 100];
        data[99] = 1;
        assert!(!is_zero(&data));
        data[99] = 0;
        data[3] = 1;
        assert!(!is_zero(&data));
    }
}
