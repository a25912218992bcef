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
//! - Part of a chunk may be read from disk alone ([`ChunkStore::read_into`]) once the chunk's
//!   *leaf table* is known: the BLAKE3 chaining values of its sixteen 4 KiB subtrees, computed
//!   from the whole chunk when it was read and verified (the table merges up the BLAKE3 tree to
//!   exactly the chunk's name, or it is refused). A piece read alone is hashed as its subtrees
//!   (BLAKE3's tree mode, as Bao does) and compared with the table before it is returned, so it
//!   is verified against the chunk's hash like a whole chunk, for 4 KiB of reading and hashing
//!   instead of 64 KiB. Tables are kept in their own bounded cache, 1/8 of the chunk cache's
//!   bound at about 600 bytes per chunk: a 256 MiB chunk cache comes with 32 MiB of tables,
//!   enough for about 3.5 GiB of distinct chunks.
//! - The chunk cache's default bound is sized from the memory available when the store opens
//!   ([`default_cache_bytes`]: an eighth of it, at least 256 MiB), so on a node with memory to
//!   spare a deduplicated image that many clients boot is served from memory after its first
//!   reads, without reading or hashing it again.
//! - Chunk files read lately stay open in a bounded descriptor cache
//!   ([`OPEN_CHUNK_FILES_MAX`], fewer when `RLIMIT_NOFILE` is low: at most half of it), so a miss is one `pread`
//!   rather than `openat` + `pread` + `close`. A descriptor is only a way to the bytes: what it
//!   reads is verified like anything else read from disk. A chunk found corrupt or of the wrong
//!   size, scrubbed, or deleted by garbage collection loses its descriptor, so the next read
//!   opens the file by name again (a chunk repaired by a new file is seen). A stale descriptor
//!   left by a read racing a collection can only ever read the chunk's own (verified) bytes, or
//!   fail verification; it holds the deleted file's blocks until it is evicted.
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
use std::io::Write;
use std::os::unix::fs::FileExt;
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
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut text = String::with_capacity(64);
        for byte in self.0 {
            text.push(DIGITS[(byte >> 4) as usize] as char);
            text.push(DIGITS[(byte & 0xf) as usize] as char);
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
    #[error("chunk {hash} is corrupt on disk: the 4 KiB at byte {offset} do not match its hash")]
    CorruptLeaf { hash: ChunkHash, offset: u64 },
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
    /// Upper bound on verified chunk bytes held in memory. 0 disables the cache. The default
    /// is [`default_cache_bytes`], sized from the memory available.
    pub cache_bytes_max: u64,
}

impl Default for ChunkStoreConfig {
    fn default() -> Self {
        ChunkStoreConfig {
            cache_bytes_max: default_cache_bytes(),
        }
    }
}

/// Smallest default chunk cache (also the default when the memory available is unknown).
pub const DEFAULT_CACHE_BYTES_MIN: u64 = 256 << 20;
/// Largest default chunk cache.
pub const DEFAULT_CACHE_BYTES_MAX: u64 = 64 << 30;

/// The default chunk cache bound: an eighth of the memory available now (`MemAvailable` in
/// `/proc/meminfo`), between [`DEFAULT_CACHE_BYTES_MIN`] and [`DEFAULT_CACHE_BYTES_MAX`]. A
/// cache hit is a copy from memory; a miss reads the chunk file and hashes what it read, so
/// every chunk the cache holds saves that work on each later read (many clients boot the same
/// deduplicated image). The leaf-table cache gets an eighth of this on top.
pub fn default_cache_bytes() -> u64 {
    let available_bytes = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib.saturating_mul(1024))
        })
        .unwrap_or(0);
    (available_bytes / 8).clamp(DEFAULT_CACHE_BYTES_MIN, DEFAULT_CACHE_BYTES_MAX)
}

/// Counters of the chunk read path, for metrics and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChunkReadStats {
    pub cache_hits_total: u64,
    /// Whole chunks read from disk (and verified by their hash).
    pub disk_reads_total: u64,
    /// Parts of chunks read from disk alone (and verified by the chunk's leaf table).
    pub partial_disk_reads_total: u64,
    pub corrupt_total: u64,
}

/// Most chunk files kept open at once (see the module doc); each costs one descriptor and a
/// few hundred bytes of kernel memory. As many as a 1 GiB image has chunks: random reads over
/// an image much larger than the descriptors kept mostly miss (a profile of 4 KiB random reads
/// over a 1 GiB image with 1,024 kept still spent a sixth of the CPU in `openat` and `close`).
pub const OPEN_CHUNK_FILES_MAX: u64 = 16384;

/// How many chunk files may stay open: [`OPEN_CHUNK_FILES_MAX`], or half the soft
/// `RLIMIT_NOFILE` when that is lower (sockets, volumes' layer files and the rest need the
/// other half). A process that wants more raises its soft limit before opening the store.
fn open_chunk_files_max() -> u64 {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let soft = limit.current.unwrap_or(u64::MAX);
    (soft / 2).min(OPEN_CHUNK_FILES_MAX)
}

/// Size of a leaf of a chunk's verification table: a BLAKE3 subtree of four 1 KiB BLAKE3
/// chunks, aligned, so its chaining value is a node of the chunk's BLAKE3 tree.
pub const LEAF_SIZE_BYTES: usize = 4096;
const LEAVES: usize = CHUNK_SIZE_BYTES / LEAF_SIZE_BYTES;
/// What one cached leaf table costs: the table, its key, and the cache's bookkeeping.
const LEAF_TABLE_WEIGHT_BYTES: u64 = (LEAVES * 32 + 88) as u64;

/// The BLAKE3 chaining values of a chunk's 4 KiB subtrees, in order.
type LeafTable = [[u8; 32]; LEAVES];

/// The chaining value of leaf `index` of a chunk holding `data` at that place.
fn leaf_value(index: usize, data: &[u8]) -> [u8; 32] {
    use blake3::hazmat::HasherExt;
    blake3::Hasher::new()
        .set_input_offset((index * LEAF_SIZE_BYTES) as u64)
        .update(data)
        .finalize_non_root()
}

/// The leaf table of a whole chunk.
fn leaf_table(data: &[u8]) -> LeafTable {
    let mut table = [[0u8; 32]; LEAVES];
    for (index, leaf) in data.chunks_exact(LEAF_SIZE_BYTES).enumerate() {
        table[index] = leaf_value(index, leaf);
    }
    table
}

/// The chunk hash a leaf table merges to: the root of the BLAKE3 tree over its leaves (the
/// tree of a 64 KiB input is complete, so leaves pair up level by level).
fn table_root(table: &LeafTable) -> ChunkHash {
    use blake3::hazmat::{merge_subtrees_non_root, merge_subtrees_root, Mode};
    let mut level: Vec<[u8; 32]> = table.to_vec();
    while level.len() > 2 {
        level = level
            .chunks_exact(2)
            .map(|pair| merge_subtrees_non_root(&pair[0], &pair[1], Mode::Hash))
            .collect();
    }
    ChunkHash(*merge_subtrees_root(&level[0], &level[1], Mode::Hash).as_bytes())
}

/// Reads into `buffer` from `offset` until it is full or the file ends; returns bytes read.
fn read_full_at(file: &File, buffer: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match file.read_at(&mut buffer[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(count) => filled += count,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(filled)
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
    /// `chunks/`, open, and each fan-out directory under it once it was used: chunk files are
    /// opened relative to their directory, which spares the kernel a walk of the whole path on
    /// every read from disk. (Fan-out directories are never removed.)
    chunks_dir_fd: rustix::fd::OwnedFd,
    fanout_fds: Vec<std::sync::OnceLock<rustix::fd::OwnedFd>>,
    tmp_dir: PathBuf,
    cache: ChunkCache<Arc<[u8]>>,
    /// Verified leaf tables (see the module doc), for reading parts of chunks alone.
    tables: ChunkCache<Arc<LeafTable>>,
    /// Open chunk files, each weighing 1 (see the module doc). Readers clone the `Arc`, so an
    /// evicted descriptor closes when its last read is done.
    files: ChunkCache<Arc<File>>,
    pins: Mutex<Pins>,
    temp_counter: AtomicU64,
    cache_hits_total: AtomicU64,
    disk_reads_total: AtomicU64,
    partial_disk_reads_total: AtomicU64,
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
        let chunks_dir_fd = rustix::fs::open(
            &chunks_dir,
            rustix::fs::OFlags::RDONLY
                | rustix::fs::OFlags::DIRECTORY
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|errno| ChunkError::Io {
            path: chunks_dir.clone(),
            source: std::io::Error::from_raw_os_error(errno.raw_os_error()),
        })?;
        Ok(ChunkStore {
            root: root.to_path_buf(),
            chunks_dir_fd,
            fanout_fds: (0..256).map(|_| std::sync::OnceLock::new()).collect(),
            chunks_dir,
            tmp_dir,
            cache: ChunkCache::new(config.cache_bytes_max),
            tables: ChunkCache::new(config.cache_bytes_max / 8),
            files: ChunkCache::new(open_chunk_files_max()),
            pins: Mutex::new(Pins::default()),
            temp_counter: AtomicU64::new(0),
            cache_hits_total: AtomicU64::new(0),
            disk_reads_total: AtomicU64::new(0),
            partial_disk_reads_total: AtomicU64::new(0),
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
        self.cache.insert(*hash, data.clone(), data.len() as u64);
        Ok(data)
    }

    /// Copies `target.len()` bytes of chunk `hash`, from byte `within` of it, into `target`,
    /// verified, doing as little as it can: a cache hit is a copy; a whole chunk is read from
    /// disk straight into `target` and hashed there (then kept in the cache, or, when the cache
    /// does not take it, its leaf table derived from the same bytes kept); a part of a chunk
    /// whose leaf table is known is read alone and checked leaf by leaf against the table; the
    /// first part read of any other chunk reads and verifies the whole chunk and keeps it and its
    /// leaf table. On error, `target` holds garbage and must not be served.
    pub fn read_into(
        &self,
        hash: &ChunkHash,
        within: usize,
        target: &mut [u8],
    ) -> Result<(), ChunkError> {
        let length = target.len();
        if within
            .checked_add(length)
            .is_none_or(|end| end > CHUNK_SIZE_BYTES)
        {
            return Err(ChunkError::BadLength(within.saturating_add(length)));
        }
        if length == 0 {
            return Ok(());
        }
        // A hit copies under the shard's lock instead of cloning the `Arc`: the clone's
        // reference count sits at the start of the chunk, so a 4 KiB read elsewhere in a cold
        // chunk would pay a second cache (and TLB) miss for it (a fifth of a random 4 KiB hit's
        // CPU in a profile). A copy of at most 64 KiB is short next to the lock's other users.
        let hit = self.cache.with(hash, |data| {
            target.copy_from_slice(&data[within..within + length]);
        });
        if hit.is_some() {
            self.cache_hits_total.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        if length == CHUNK_SIZE_BYTES {
            self.disk_reads_total.fetch_add(1, Ordering::Relaxed);
            let file = self.chunk_file(hash)?;
            let filled = read_full_at(&file, target, 0).map_err(self.read_error(hash))?;
            if filled != CHUNK_SIZE_BYTES {
                return Err(self.wrong_size(hash, filled as u64));
            }
            // Keeping it costs a copy and usually an eviction: worth it when there is room, or
            // for a chunk read recently already (not for one pass of a scan larger than the
            // cache, which would only push out chunks that are read again).
            let admitted = self.cache.admits(hash, CHUNK_SIZE_BYTES as u64);
            // The bytes are served only if they are the chunk; a file longer than a chunk
            // whose first 64 KiB are right is served too (scrub reports it). A chunk not kept
            // whole keeps its leaf table instead, derived from the bytes at hand while they
            // are verified (the table must merge to the chunk's name), so a later read of a
            // part of it reads and hashes that part alone, not the whole chunk again. Hashing
            // by leaf costs more than one hash of the chunk, so it is done only then.
            if admitted || !self.tables.enabled() || self.tables.contains(hash) {
                self.check(hash, ChunkHash::of(target))?;
            } else {
                let table = leaf_table(target);
                self.check(hash, table_root(&table))?;
                self.tables
                    .insert(*hash, Arc::new(table), LEAF_TABLE_WEIGHT_BYTES);
            }
            if admitted {
                self.cache
                    .insert(*hash, Arc::from(&*target), CHUNK_SIZE_BYTES as u64);
            }
            return Ok(());
        }
        if let Some(table) = self.tables.get(hash) {
            self.partial_disk_reads_total
                .fetch_add(1, Ordering::Relaxed);
            let first = within / LEAF_SIZE_BYTES;
            let last = (within + length - 1) / LEAF_SIZE_BYTES;
            let span_start = first * LEAF_SIZE_BYTES;
            let span_length = (last - first + 1) * LEAF_SIZE_BYTES;
            let file = self.chunk_file(hash)?;
            let verify = |span: &[u8]| -> Result<(), ChunkError> {
                for (step, leaf) in span.chunks_exact(LEAF_SIZE_BYTES).enumerate() {
                    let actual = leaf_value(first + step, leaf);
                    if actual != table[first + step] {
                        self.corrupt_total.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(chunk = %hash, leaf = first + step, "chunk corrupt on disk");
                        self.forget(hash);
                        return Err(ChunkError::CorruptLeaf {
                            hash: *hash,
                            offset: ((first + step) * LEAF_SIZE_BYTES) as u64,
                        });
                    }
                }
                Ok(())
            };
            if within == span_start && length == span_length {
                let filled = read_full_at(&file, target, span_start as u64)
                    .map_err(self.read_error(hash))?;
                if filled != span_length {
                    return Err(self.wrong_size(hash, (span_start + filled) as u64));
                }
                return verify(target);
            }
            let mut span = vec![0u8; span_length];
            let filled =
                read_full_at(&file, &mut span, span_start as u64).map_err(self.read_error(hash))?;
            if filled != span_length {
                return Err(self.wrong_size(hash, (span_start + filled) as u64));
            }
            verify(&span)?;
            let from = within - span_start;
            target.copy_from_slice(&span[from..from + length]);
            return Ok(());
        }
        let data = self.read_verified(hash, self.tables.enabled())?;
        target.copy_from_slice(&data[within..within + length]);
        self.cache.insert(*hash, data, CHUNK_SIZE_BYTES as u64);
        Ok(())
    }

    /// Reads and verifies a chunk from disk, bypassing (and not filling) the cache. The file
    /// is opened by name (what a scrub must check), and a descriptor kept for it is dropped.
    pub fn read_chunk_uncached(&self, hash: &ChunkHash) -> Result<Arc<[u8]>, ChunkError> {
        self.files.remove(hash);
        let file = self.open_chunk(hash)?;
        self.read_verified_from(hash, &file, false)
    }

    /// A chunk's file, from the descriptor cache or opened (and then kept).
    fn chunk_file(&self, hash: &ChunkHash) -> Result<Arc<File>, ChunkError> {
        if let Some(file) = self.files.get(hash) {
            return Ok(file);
        }
        let file = Arc::new(self.open_chunk(hash)?);
        self.files.insert(*hash, file.clone(), 1);
        Ok(file)
    }

    /// Opens a chunk's file (`<hh>/<64 hex>` under `chunks/`). The path in errors is built
    /// only when there is an error.
    fn open_chunk(&self, hash: &ChunkHash) -> Result<File, ChunkError> {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let errno_error = |errno: rustix::io::Errno| match errno {
            rustix::io::Errno::NOENT => ChunkError::Missing(*hash),
            errno => ChunkError::Io {
                path: self.chunk_path(hash),
                source: std::io::Error::from_raw_os_error(errno.raw_os_error()),
            },
        };
        let mut name = [0u8; 64];
        for (index, byte) in hash.0.iter().enumerate() {
            name[2 * index] = DIGITS[(byte >> 4) as usize];
            name[2 * index + 1] = DIGITS[(byte & 0xf) as usize];
        }
        let name = std::str::from_utf8(&name).map_err(|_| ChunkError::Missing(*hash))?;
        let slot = &self.fanout_fds[hash.0[0] as usize];
        let directory = match slot.get() {
            Some(fd) => fd,
            None => {
                let fd = rustix::fs::openat(
                    &self.chunks_dir_fd,
                    &name[..2],
                    rustix::fs::OFlags::RDONLY
                        | rustix::fs::OFlags::DIRECTORY
                        | rustix::fs::OFlags::CLOEXEC,
                    rustix::fs::Mode::empty(),
                )
                .map_err(errno_error)?;
                // Another thread may have won the race; either descriptor names the directory.
                slot.get_or_init(|| fd)
            }
        };
        rustix::fs::openat(
            directory,
            name,
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map(File::from)
        .map_err(errno_error)
    }

    fn read_error(&self, hash: &ChunkHash) -> impl FnOnce(std::io::Error) -> ChunkError + '_ {
        let hash = *hash;
        move |source| ChunkError::Io {
            path: self.chunk_path(&hash),
            source,
        }
    }

    fn wrong_size(&self, hash: &ChunkHash, size_bytes: u64) -> ChunkError {
        self.corrupt_total.fetch_add(1, Ordering::Relaxed);
        self.forget(hash);
        ChunkError::WrongSize {
            hash: *hash,
            size_bytes,
        }
    }

    /// `Ok` when `actual` is `hash`; otherwise counts and reports the corruption.
    fn check(&self, hash: &ChunkHash, actual: ChunkHash) -> Result<(), ChunkError> {
        if actual == *hash {
            return Ok(());
        }
        self.corrupt_total.fetch_add(1, Ordering::Relaxed);
        tracing::error!(chunk = %hash, actual = %actual, "chunk corrupt on disk");
        self.forget(hash);
        Err(ChunkError::Corrupt {
            hash: *hash,
            actual,
        })
    }

    /// Drops what memory holds about a chunk found corrupt on disk or deleted (nothing of it
    /// is trusted again until it is read whole and verified; its file is opened again by name).
    fn forget(&self, hash: &ChunkHash) {
        self.cache.remove(hash);
        self.tables.remove(hash);
        self.files.remove(hash);
    }

    /// Reads a whole chunk from disk, checks its size and its hash (through its leaf table when
    /// `keep_table`, which then is cached), and returns it.
    fn read_verified(&self, hash: &ChunkHash, keep_table: bool) -> Result<Arc<[u8]>, ChunkError> {
        let file = self.chunk_file(hash)?;
        self.read_verified_from(hash, &file, keep_table)
    }

    fn read_verified_from(
        &self,
        hash: &ChunkHash,
        file: &File,
        keep_table: bool,
    ) -> Result<Arc<[u8]>, ChunkError> {
        self.disk_reads_total.fetch_add(1, Ordering::Relaxed);
        // Allocated once, as the Arc the cache keeps: no copy after the read.
        let mut data: Arc<[u8]> = std::iter::repeat_n(0u8, CHUNK_SIZE_BYTES).collect();
        let buffer = Arc::get_mut(&mut data).ok_or(ChunkError::BadLength(0))?;
        let filled = read_full_at(file, buffer, 0).map_err(self.read_error(hash))?;
        if filled != CHUNK_SIZE_BYTES {
            return Err(self.wrong_size(hash, filled as u64));
        }
        // One more byte means the file is too long.
        let mut extra = [0u8; 1];
        if read_full_at(file, &mut extra, CHUNK_SIZE_BYTES as u64).map_err(self.read_error(hash))?
            != 0
        {
            let size_bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
            return Err(self.wrong_size(hash, size_bytes));
        }
        if keep_table {
            let table = leaf_table(buffer);
            self.check(hash, table_root(&table))?;
            self.tables
                .insert(*hash, Arc::new(table), LEAF_TABLE_WEIGHT_BYTES);
        } else {
            self.check(hash, ChunkHash::of(buffer))?;
        }
        Ok(data)
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
            partial_disk_reads_total: self.partial_disk_reads_total.load(Ordering::Relaxed),
            corrupt_total: self.corrupt_total.load(Ordering::Relaxed),
        }
    }

    /// Bytes of verified chunks held in memory now.
    pub fn cache_bytes(&self) -> u64 {
        self.cache.bytes()
    }

    /// Drops every cached chunk and leaf table (benchmarks, tests, and after detecting
    /// tampering).
    pub fn clear_cache(&self) {
        self.cache.clear();
        self.tables.clear();
        self.files.clear();
    }

    /// Chunk files held open now.
    pub fn open_files(&self) -> u64 {
        self.files.bytes()
    }

    pub(crate) fn evict_cached(&self, hash: &ChunkHash) {
        self.forget(hash);
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

/// Hashes a [`ChunkHash`] key by taking 8 of its bytes: they are already uniformly random (a
/// BLAKE3 output), so SipHash's work buys nothing here. Bytes 8..16, not the first one, which
/// picks the shard.
#[derive(Default, Clone, Copy)]
struct ChunkHashHasher(u64);

impl std::hash::Hasher for ChunkHashHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        match bytes.get(8..16) {
            Some(word) => {
                let mut eight = [0u8; 8];
                eight.copy_from_slice(word);
                self.0 ^= u64::from_le_bytes(eight);
            }
            // Anything else (a length prefix): mixed in cheaply.
            None => {
                for byte in bytes {
                    self.0 = (self.0 ^ *byte as u64).wrapping_mul(0x0000_0100_0000_01b3);
                }
            }
        }
    }
}

type ChunkHashMap<V> = HashMap<ChunkHash, V, std::hash::BuildHasherDefault<ChunkHashHasher>>;
type ChunkHashSet = HashSet<ChunkHash, std::hash::BuildHasherDefault<ChunkHashHasher>>;

/// Bounded cache of verified data by chunk hash (chunks, leaf tables), CLOCK eviction, sharded
/// by the hash's first byte. Each entry is weighed by the caller.
struct ChunkCache<V> {
    shards: Vec<Mutex<CacheShard<V>>>,
    shard_bytes_max: u64,
}

struct CacheShard<V> {
    entries: ChunkHashMap<CacheEntry<V>>,
    clock: VecDeque<ChunkHash>,
    bytes: u64,
    /// Chunks refused admission lately (see [`ChunkCache::admits`]), oldest first; as many
    /// entries as the shard holds at most.
    refused: ChunkHashSet,
    refused_order: VecDeque<ChunkHash>,
}

impl<V> Default for CacheShard<V> {
    fn default() -> Self {
        CacheShard {
            entries: ChunkHashMap::default(),
            clock: VecDeque::new(),
            bytes: 0,
            refused: ChunkHashSet::default(),
            refused_order: VecDeque::new(),
        }
    }
}

struct CacheEntry<V> {
    data: V,
    weight_bytes: u64,
    referenced: bool,
}

impl<V: Clone> ChunkCache<V> {
    fn new(bytes_max: u64) -> Self {
        ChunkCache {
            shards: (0..CACHE_SHARDS)
                .map(|_| Mutex::new(CacheShard::default()))
                .collect(),
            shard_bytes_max: bytes_max / CACHE_SHARDS as u64,
        }
    }

    /// Whether anything can be kept at all.
    fn enabled(&self) -> bool {
        self.shard_bytes_max > 0
    }

    fn shard(&self, hash: &ChunkHash) -> MutexGuard<'_, CacheShard<V>> {
        self.shards[hash.0[0] as usize % CACHE_SHARDS]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn get(&self, hash: &ChunkHash) -> Option<V> {
        if !self.enabled() {
            return None;
        }
        let mut shard = self.shard(hash);
        let entry = shard.entries.get_mut(hash)?;
        entry.referenced = true;
        Some(entry.data.clone())
    }

    /// Runs `f` on the entry of `hash`, if held, under its shard's lock (no clone of it).
    fn with<R>(&self, hash: &ChunkHash, f: impl FnOnce(&V) -> R) -> Option<R> {
        if !self.enabled() {
            return None;
        }
        let mut shard = self.shard(hash);
        let entry = shard.entries.get_mut(hash)?;
        entry.referenced = true;
        Some(f(&entry.data))
    }

    /// Whether `hash` is held (without marking it used).
    fn contains(&self, hash: &ChunkHash) -> bool {
        self.enabled() && self.shard(hash).entries.contains_key(hash)
    }

    /// Admission on second touch (as in 2Q): whether `hash` should be inserted now. Yes when
    /// it fits without evicting anything, or when it was refused lately (it is being read
    /// again). Otherwise it is remembered as refused, and no. A cyclic scan larger than the
    /// cache then leaves the cache as it was instead of replacing all of it for no hits.
    fn admits(&self, hash: &ChunkHash, weight_bytes: u64) -> bool {
        if !self.enabled() || weight_bytes > self.shard_bytes_max {
            return false;
        }
        let mut shard = self.shard(hash);
        if shard.bytes + weight_bytes <= self.shard_bytes_max || shard.refused.remove(hash) {
            return true;
        }
        let remembered_max = (self.shard_bytes_max / weight_bytes.max(1)).max(1) as usize;
        while shard.refused_order.len() >= remembered_max {
            match shard.refused_order.pop_front() {
                Some(oldest) => {
                    shard.refused.remove(&oldest);
                }
                None => break,
            }
        }
        shard.refused.insert(*hash);
        shard.refused_order.push_back(*hash);
        false
    }

    fn insert(&self, hash: ChunkHash, data: V, weight_bytes: u64) {
        if weight_bytes > self.shard_bytes_max {
            return;
        }
        let mut shard = self.shard(&hash);
        if shard.entries.contains_key(&hash) {
            return;
        }
        while shard.bytes + weight_bytes > self.shard_bytes_max {
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
                shard.bytes -= entry.weight_bytes;
            }
        }
        shard.bytes += weight_bytes;
        shard.clock.push_back(hash);
        shard.entries.insert(
            hash,
            CacheEntry {
                data,
                weight_bytes,
                referenced: false,
            },
        );
    }

    fn remove(&self, hash: &ChunkHash) {
        let mut shard = self.shard(hash);
        if let Some(entry) = shard.entries.remove(hash) {
            shard.bytes -= entry.weight_bytes;
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
    fn leaf_tables_merge_to_the_chunk_hash() {
        for seed in [1u8, 2, 77, 255] {
            let data = chunk(seed);
            assert_eq!(table_root(&leaf_table(&data)), ChunkHash::of(&data));
            let mut other = leaf_table(&data);
            other[5][0] ^= 1;
            assert_ne!(table_root(&other), ChunkHash::of(&data));
        }
        let zeros = vec![0u8; CHUNK_SIZE_BYTES];
        assert_eq!(table_root(&leaf_table(&zeros)), ChunkHash::of(&zeros));
    }

    /// A store whose chunk cache cannot hold a chunk but whose table cache holds tables: every
    /// part read after the first goes to disk and is checked by leaf.
    fn leaf_store(dir: &Path) -> ChunkStore {
        ChunkStore::open(
            dir,
            ChunkStoreConfig {
                cache_bytes_max: (CACHE_SHARDS * CHUNK_SIZE_BYTES / 2) as u64,
            },
        )
        .unwrap()
    }

    #[test]
    fn parts_of_chunks_are_read_alone_and_verified_by_leaf() {
        let dir = tempfile::tempdir().unwrap();
        let store = leaf_store(dir.path());
        let data = chunk(9);
        let hash = store.put_chunk(&data).unwrap();
        // First part read: the whole chunk is read and verified, its table kept.
        let mut part = vec![0u8; 4096];
        store.read_into(&hash, 8192, &mut part).unwrap();
        assert_eq!(part, data[8192..12288]);
        assert_eq!(store.read_stats().disk_reads_total, 1);
        // Aligned and unaligned parts, across leaves: read alone.
        for (within, length) in [(4096, 4096), (512, 1024), (4000, 9000), (61440, 4096)] {
            let mut part = vec![0u8; length];
            store.read_into(&hash, within, &mut part).unwrap();
            assert_eq!(part, data[within..within + length], "{within}+{length}");
        }
        let stats = store.read_stats();
        assert_eq!(
            (stats.disk_reads_total, stats.partial_disk_reads_total),
            (1, 4)
        );
        // A whole chunk is read into the target and hashed there.
        let mut whole = vec![0u8; CHUNK_SIZE_BYTES];
        store.read_into(&hash, 0, &mut whole).unwrap();
        assert_eq!(whole, data);
        // A chunk read whole and not kept keeps its leaf table: its parts are then read alone.
        let other = chunk(10);
        let other_hash = store.put_chunk(&other).unwrap();
        store.read_into(&other_hash, 0, &mut whole).unwrap();
        assert_eq!(whole, other);
        let before = store.read_stats();
        store.read_into(&other_hash, 4096, &mut part).unwrap();
        assert_eq!(part, other[4096..8192]);
        let after = store.read_stats();
        assert_eq!(
            (
                after.disk_reads_total - before.disk_reads_total,
                after.partial_disk_reads_total - before.partial_disk_reads_total
            ),
            (0, 1)
        );
        // Out of the chunk: an error, not a panic.
        assert!(store.read_into(&hash, 65000, &mut part).is_err());
    }

    #[test]
    fn a_damaged_leaf_is_reported_never_served() {
        let dir = tempfile::tempdir().unwrap();
        let store = leaf_store(dir.path());
        let data = chunk(11);
        let hash = store.put_chunk(&data).unwrap();
        let mut part = vec![0u8; 4096];
        store.read_into(&hash, 0, &mut part).unwrap();
        let path = store.chunk_path(&hash);
        let mut bytes = fs::read(&path).unwrap();
        bytes[3 * 4096 + 100] ^= 0x01;
        fs::write(&path, &bytes).unwrap();
        // The damaged leaf is refused; an intact leaf still reads (it is checked on its own).
        assert!(matches!(
            store.read_into(&hash, 3 * 4096, &mut part),
            Err(ChunkError::CorruptLeaf { offset: 12288, .. })
        ));
        // The table was dropped: the next part read verifies the whole chunk, which fails.
        assert!(matches!(
            store.read_into(&hash, 0, &mut part),
            Err(ChunkError::Corrupt { .. })
        ));
        let mut whole = vec![0u8; CHUNK_SIZE_BYTES];
        assert!(matches!(
            store.read_into(&hash, 0, &mut whole),
            Err(ChunkError::Corrupt { .. })
        ));
        fs::write(&path, &bytes[..5000]).unwrap();
        assert!(matches!(
            store.read_into(&hash, 0, &mut whole),
            Err(ChunkError::WrongSize { .. })
        ));
        assert_eq!(store.read_stats().corrupt_total, 4);
    }

    #[test]
    fn chunk_files_stay_open_until_the_chunk_is_damaged_scrubbed_or_collected() {
        let dir = tempfile::tempdir().unwrap();
        let store = leaf_store(dir.path());
        let data = chunk(13);
        let hash = store.put_chunk(&data).unwrap();
        let mut part = vec![0u8; 4096];
        for within in [0, 4096, 8192] {
            store.read_into(&hash, within, &mut part).unwrap();
            assert_eq!(part, data[within..within + 4096]);
        }
        assert_eq!(store.open_files(), 1);
        assert!(store.open_files() <= open_chunk_files_max());
        // A scrub opens the file by name and drops the kept descriptor.
        store.read_chunk_uncached(&hash).unwrap();
        assert_eq!(store.open_files(), 0);
        store.read_into(&hash, 0, &mut part).unwrap();
        assert_eq!(store.open_files(), 1);
        // Collected (deleted) chunks lose their descriptor: the next read finds the file gone.
        store.evict_cached(&hash);
        assert_eq!(store.open_files(), 0);
        fs::remove_file(store.chunk_path(&hash)).unwrap();
        assert!(matches!(
            store.read_into(&hash, 0, &mut part),
            Err(ChunkError::Missing(_))
        ));
        // A damaged file read through a kept descriptor is refused and the descriptor dropped,
        // so a repaired file (a new one under the name) is what the next read sees.
        store.put_chunk(&data).unwrap();
        store.read_into(&hash, 0, &mut part).unwrap();
        let path = store.chunk_path(&hash);
        let mut bytes = fs::read(&path).unwrap();
        bytes[100] ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            store.read_into(&hash, 0, &mut part),
            Err(ChunkError::CorruptLeaf { offset: 0, .. })
        ));
        assert_eq!(store.open_files(), 0);
        fs::remove_file(&path).unwrap();
        store.put_chunk(&data).unwrap();
        store.read_into(&hash, 0, &mut part).unwrap();
        assert_eq!(part, data[..4096]);
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
