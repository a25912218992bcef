//! Volumes: a client's disk, a base image version plus a writable layer at 4 KiB granularity.
//!
//! Reads look in the layer, then the base; writes go to the layer; UNMAP (and WRITE SAME with
//! the unmap bit) makes blocks read as zeros. Each 4 KiB block is in one of three states
//! ([`BlockState`]): from the base, in the layer, or unmapped. Sub-4 KiB writes (iSCSI blocks
//! are 512 bytes) read-modify-write the whole 4 KiB block into the layer.
//!
//! # On-disk layout (one directory per volume, chosen by the node)
//!
//! ```text
//! volume.meta    immutable after creation: magic "CAIRNVM1", unique id (16 bytes),
//!                persistent flag (1 byte), crc32c
//! layer.data     sparse file, block i at offset i * 4096 (valid only where the map says Layer)
//! layer.map      checkpoint of the block map, with the base manifest hash and the journal
//!                generation G it continues with (format in `layer`)
//! journal.<G>    map changes since the checkpoint, 24-byte crc-protected records
//! ```
//!
//! # Durability contract
//!
//! - A write or unmap is *acknowledged* when its call returns: every later read sees it.
//! - It is *durable* (survives a crash of the node) once a later [`Volume::flush`] returns, or
//!   when it was written with `fua = true` (which flushes before returning).
//! - After a crash, a block reads as its content at the last durable point or as any later
//!   acknowledged write to it; a 4 KiB block never shows data that was never written to it.
//!   Blocks of an unflushed write may individually be old or new (as on a disk).
//!
//! # Crash-safety argument
//!
//! The map is the only thing that says where a block's data is, and it changes durably only in
//! `flush`, in this order: (1) the data file is `fdatasync`ed, (2) the map changes recorded since
//! the last flush are appended to the journal and `fdatasync`ed. A block therefore never becomes
//! `Layer` in the durable map before its data is durable. A block enters `Layer` only after a
//! whole 4 KiB block was written at its offset (read-modify-write for partial writes), so stale
//! bytes left in `layer.data` (by a reset, or an unflushed write whose map change was lost) are
//! never read. A torn journal append is cut at replay by the per-record crc (it was never
//! acknowledged). Checkpoints and resets write a new `layer.map` naming a new journal generation
//! via temp file, fsync, rename, directory fsync: the rename is atomic, so the map is the old
//! checkpoint + old journal or the new checkpoint + new (empty) journal, never a mix. The map
//! copy inside a checkpoint is taken under the same lock that orders journal records, and the
//! data file is synced after the copy, so a checkpoint never names data that is not durable.
//! Base chunks are verified on every read from disk, whole or by 4 KiB leaf (see
//! `crate::chunks`).
//!
//! # Concurrency
//!
//! Any number of sessions may call a `Volume` at once (multipath). Reads take no lock besides a
//! shared reader lock on the layer (held exclusively only by `reset`). Writers and unmaps lock
//! the stripes of the 4 KiB blocks they touch, so read-modify-write is atomic per block and the
//! standby mirror sees writes to one block in the order they were applied locally.
//!
//! # Fencing and mirroring
//!
//! A volume is opened at a generation ([`VolumeOptions::generation`]), which moves on when Raft
//! drops or adds the standby ([`Volume::advance_generation`]). [`Volume::fence`] with a newer
//! generation makes every later call fail with [`DeviceError::Fenced`] and *waits for the calls
//! in flight* (each holds the volume's I/O gate for its whole length, mirror wait included), so
//! once it returns nothing more is acknowledged at the old generation. The shell must fence the
//! mirror first, so that calls waiting for the standby end.
//!
//! Every write, unmap and flush is handed to the standby mirror ([`WriteMirror`]) in two
//! steps: [`WriteMirror::submit`] right after the local change, with the stripes of the blocks
//! still held (so the stream has writes to one block in the order they were applied here), and
//! [`WriteMirror::wait`] after the stripes are released, before the call returns. A flush is
//! submitted before the local flush runs, so the two run at the same time.
//!
//! # Storage faults are fatal
//!
//! A failed write, `fdatasync` or journal append marks the volume failed for good: every later
//! call returns [`VolumeError::Failed`]. After a failed fsync the page cache may have dropped
//! the data while a retried fsync reports success, so nothing written before can be trusted to
//! be durable; the node stops and its sessions fail over ([`Volume::failure`] says why).
//!
//! # Not done here
//!
//! Space of unmapped blocks is not punched out of `layer.data` (a reset reclaims it). Promoting a
//! layer into a new image version, snapshots and clones are later issues. Drop does not flush:
//! dropping a `Volume` is what a crash looks like; call [`Volume::close`] to shut down cleanly.

pub mod layer;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard};

use crate::chunks::{ChunkError, ChunkStore, CHUNK_SIZE_BYTES};
use crate::device::{BlockDevice, DeviceError, WriteCompletion};
use crate::image::{ImageError, Manifest, ManifestHash};
use crate::mirror::REGION_BLOCKS;
use crate::mirror::{region_blocks, region_differences, BlockDigest, Difference, RegionDigest};
pub use layer::BlockState;

/// See [`Volume::copy_digest`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyDigest {
    pub hash: [u8; 32],
    /// Blocks the layer holds data for (written and not unmapped or discarded).
    pub written_blocks: u64,
}
use layer::{BlockMap, Journal, MapFile, Record};

/// Granularity of the writable layer.
pub const LAYER_BLOCK_SIZE_BYTES: u64 = 4096;
/// Logical block size served to initiators.
pub const SECTOR_SIZE_BYTES: u64 = 512;
/// Default for [`VolumeOptions::journal_bytes_max`].
pub const JOURNAL_BYTES_MAX: u64 = 4 << 20;
const STRIPES: usize = 256;
/// Blocks of one resync write (256 KiB).
const RESYNC_WRITE_BLOCKS_MAX: u64 = 64;
/// Most 4 KiB blocks one `mapping_at` call looks at (4 GiB).
const MAPPING_SCAN_BLOCKS_MAX: u64 = 1 << 20;
const META_MAGIC: &[u8; 8] = b"CAIRNVM1";

/// Fault-injection points, active only with the crate's `failpoints` feature (tests set them
/// with `fail::cfg(NAME, "return")`): the data file's `fdatasync`, its writes, and journal
/// appends fail with an I/O error.
pub const FAILPOINT_SYNC_DATA: &str = "volume::sync_data";
pub const FAILPOINT_WRITE_DATA: &str = "volume::write_data";
pub const FAILPOINT_JOURNAL_APPEND: &str = "volume::journal_append";

/// An injected I/O error at `name`, if that failpoint is set.
fn injected(name: &str) -> std::io::Result<()> {
    #[cfg(feature = "failpoints")]
    fail::fail_point!(name, |_| Err(std::io::Error::other(format!(
        "injected fault at {name}"
    ))));
    let _ = name;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("volume i/o error at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("volume {path} is damaged: {reason}")]
    Damaged { path: PathBuf, reason: String },
    #[error("volume {0} already exists")]
    AlreadyExists(PathBuf),
    #[error("base image {base} size {size_bytes} bytes is not a multiple of 512")]
    BadBaseSize { base: ManifestHash, size_bytes: u64 },
    #[error("base image: {0}")]
    Base(#[from] ImageError),
    #[error("base chunk at byte {offset}: {source}")]
    Chunk { offset: u64, source: ChunkError },
    #[error("range {offset}+{length} bytes is unaligned or past the end ({size_bytes} bytes)")]
    OutOfRange {
        offset: u64,
        length: u64,
        size_bytes: u64,
    },
    #[error("volume is fenced: opened at generation {held}, current is {current}")]
    Fenced { held: u64, current: u64 },
    #[error("mirror to standby failed: {0}")]
    Mirror(#[from] MirrorError),
    #[error("volume storage failed earlier ({0}); it takes no more i/o")]
    Failed(String),
}

impl VolumeError {
    pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> VolumeError + '_ {
        move |source| VolumeError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// What the standby reported when a mirrored operation failed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct MirrorError(pub String);

/// A layer operation as applied locally, in 4 KiB blocks: what the standby must apply too.
#[derive(Debug, Clone, Copy)]
pub enum MirrorOperation<'a> {
    /// Whole 4 KiB blocks from `first_block` (after read-modify-write): `data.len()` is a
    /// multiple of 4096.
    Write {
        first_block: u64,
        data: &'a [u8],
    },
    Unmap {
        first_block: u64,
        block_count: u64,
    },
    /// Blocks that read from the base image again (only a resync sends it).
    Discard {
        first_block: u64,
        block_count: u64,
    },
    /// Make everything mirrored so far durable on the standby.
    Flush,
}

/// Names a submitted mirror operation until it is waited for.
pub type MirrorTicket = crate::mirror::Ticket;

/// What [`WriteMirror::completion`] returns.
pub type MirrorCompletion =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), MirrorError>> + Send>>;

/// Synchronous mirroring of layer changes to a standby node (`crate::mirror` is the protocol;
/// the node's shell carries it over QUIC).
pub trait WriteMirror: Send + Sync {
    /// Queues an operation applied locally. Called with the stripes of its blocks held and with
    /// the volume's generation, so the standby can reject a fenced primary. May block while the
    /// stream is full (backpressure).
    fn submit(
        &self,
        generation: u64,
        operation: MirrorOperation<'_>,
    ) -> Result<MirrorTicket, MirrorError>;
    /// Returns once the standby holds the operation (durably, for `Flush`), or with an error
    /// (fenced, or the shell gave up): the operation must then not be acknowledged.
    fn wait(&self, ticket: MirrorTicket) -> Result<(), MirrorError>;
    /// `wait` without holding a thread: a future that resolves when the standby holds the
    /// operation, polled by the iSCSI connection task ([`Volume::start_write_at`]). `None`
    /// (the default): this mirror has no such future, and the write waits with `wait`.
    fn completion(self: Arc<Self>, ticket: MirrorTicket) -> Option<MirrorCompletion> {
        let _ = ticket;
        None
    }
    /// `submit` for the copy of a resync region ([`Volume::resync_region`]): must not block
    /// for space, since it is called with a whole region's stripes held.
    fn submit_resync(
        &self,
        generation: u64,
        operation: MirrorOperation<'_>,
    ) -> Result<MirrorTicket, MirrorError> {
        self.submit(generation, operation)
    }
}

/// How to create a volume.
#[derive(Clone, Debug)]
pub struct VolumeSpec {
    pub base: ManifestHash,
    /// Informational for the node: persistent layers are kept across boots, non-persistent
    /// ones are [`Volume::reset`] at each boot.
    pub persistent: bool,
    /// VPD page 0x83 identifier, the same on every node serving this volume.
    pub unique_id: [u8; 16],
}

/// How to open a volume.
#[derive(Clone)]
pub struct VolumeOptions {
    /// The generation this node serves the volume at (from the replicated boot session).
    pub generation: u64,
    pub mirror: Option<Arc<dyn WriteMirror>>,
    /// A flush that would grow the journal past this writes a checkpoint of the map instead.
    pub journal_bytes_max: u64,
}

impl Default for VolumeOptions {
    fn default() -> Self {
        VolumeOptions {
            generation: 0,
            mirror: None,
            journal_bytes_max: JOURNAL_BYTES_MAX,
        }
    }
}

struct LayerState {
    base: Manifest,
    base_hash: ManifestHash,
    size_bytes: u64,
    map: BlockMap,
}

/// A client's disk. Implements [`BlockDevice`]; share it as `Arc<Volume>`.
pub struct Volume {
    store: Arc<ChunkStore>,
    dir: PathBuf,
    data: File,
    data_path: PathBuf,
    unique_id: [u8; 16],
    persistent: bool,
    generation: AtomicU64,
    fenced_at: AtomicU64,
    /// Set by the node when it serves the volume as a session's primary with a standby.
    mirror: RwLock<Option<Arc<dyn WriteMirror>>>,
    /// Every call holds it shared for its whole length; `fence` takes it exclusively once, so
    /// it returns only after the calls in flight ended.
    io_gate: RwLock<()>,
    /// Set by the first failed write, sync or journal append; never cleared.
    failure: OnceLock<String>,
    state: RwLock<LayerState>,
    stripes: Vec<Mutex<()>>,
    /// Map changes not yet in the journal. Map updates happen under this lock so records are
    /// in the order the map changed.
    pending: Mutex<Vec<Record>>,
    journal: Mutex<Journal>,
    data_dirty: AtomicBool,
    journal_bytes_max: u64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn encode_meta(spec: &VolumeSpec) -> Vec<u8> {
    let mut out = Vec::with_capacity(29);
    out.extend_from_slice(META_MAGIC);
    out.extend_from_slice(&spec.unique_id);
    out.push(spec.persistent as u8);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn decode_meta(bytes: &[u8]) -> Option<([u8; 16], bool)> {
    if bytes.len() != 29 || &bytes[..8] != META_MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes(bytes[25..29].try_into().ok()?);
    if crc != crc32c::crc32c(&bytes[..25]) || bytes[24] > 1 {
        return None;
    }
    Some((bytes[8..24].try_into().ok()?, bytes[24] == 1))
}

fn layer_blocks(size_bytes: u64) -> u64 {
    size_bytes.div_ceil(LAYER_BLOCK_SIZE_BYTES)
}

fn load_base(store: &ChunkStore, base: &ManifestHash) -> Result<Manifest, VolumeError> {
    let manifest = store.load_manifest(base)?;
    if manifest.size_bytes % SECTOR_SIZE_BYTES != 0 {
        return Err(VolumeError::BadBaseSize {
            base: *base,
            size_bytes: manifest.size_bytes,
        });
    }
    Ok(manifest)
}

impl Volume {
    /// Creates an empty layer over `spec.base` in `dir` (which must not hold a volume yet).
    /// `layer.map` is written last: a directory without it is not a volume (and may be reused).
    pub fn create(store: &ChunkStore, dir: &Path, spec: &VolumeSpec) -> Result<(), VolumeError> {
        if layer::map_path(dir).exists() {
            return Err(VolumeError::AlreadyExists(dir.to_path_buf()));
        }
        let base = load_base(store, &spec.base)?;
        fs::create_dir_all(dir).map_err(VolumeError::io(dir))?;
        layer::write_file_atomic(&dir.join("volume.meta"), &encode_meta(spec))?;
        let data_path = dir.join("layer.data");
        let data = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&data_path)
            .map_err(VolumeError::io(&data_path))?;
        data.set_len(layer_blocks(base.size_bytes) * LAYER_BLOCK_SIZE_BYTES)
            .map_err(VolumeError::io(&data_path))?;
        data.sync_all().map_err(VolumeError::io(&data_path))?;
        Journal::create(dir, 1)?;
        let block_count = layer_blocks(base.size_bytes);
        let map = MapFile {
            generation: 1,
            base: spec.base,
            block_count,
            packed: vec![0; block_count.div_ceil(4) as usize],
        };
        layer::write_file_atomic(&layer::map_path(dir), &map.encode())
    }

    /// Opens an existing volume: loads the checkpoint, replays the journal, loads the base.
    pub fn open(
        store: Arc<ChunkStore>,
        dir: &Path,
        options: VolumeOptions,
    ) -> Result<Volume, VolumeError> {
        let damaged = |reason: String| VolumeError::Damaged {
            path: dir.to_path_buf(),
            reason,
        };
        let meta_path = dir.join("volume.meta");
        let meta = fs::read(&meta_path).map_err(VolumeError::io(&meta_path))?;
        let (unique_id, persistent) =
            decode_meta(&meta).ok_or_else(|| damaged("bad volume.meta".into()))?;
        let map_path = layer::map_path(dir);
        let map_bytes = fs::read(&map_path).map_err(VolumeError::io(&map_path))?;
        let map_file = MapFile::decode(&map_bytes).map_err(damaged)?;
        let base = load_base(&store, &map_file.base)?;
        if layer_blocks(base.size_bytes) != map_file.block_count {
            return Err(damaged(format!(
                "map has {} blocks, base {} needs {}",
                map_file.block_count,
                map_file.base,
                layer_blocks(base.size_bytes)
            )));
        }
        let map = BlockMap::from_packed(&map_file.packed, map_file.block_count).map_err(damaged)?;
        let (journal, applied) = Journal::replay(dir, map_file.generation, &map)?;
        layer::remove_stale_journals(dir, map_file.generation)?;
        let data_path = dir.join("layer.data");
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&data_path)
            .map_err(VolumeError::io(&data_path))?;
        let data_bytes = map_file.block_count * LAYER_BLOCK_SIZE_BYTES;
        if data.metadata().map_err(VolumeError::io(&data_path))?.len() < data_bytes {
            data.set_len(data_bytes)
                .map_err(VolumeError::io(&data_path))?;
        }
        tracing::info!(
            volume = %dir.display(),
            generation = options.generation,
            journal_records = applied,
            "volume opened"
        );
        Ok(Volume {
            store,
            dir: dir.to_path_buf(),
            data,
            data_path,
            unique_id,
            persistent,
            generation: AtomicU64::new(options.generation),
            fenced_at: AtomicU64::new(0),
            io_gate: RwLock::new(()),
            failure: OnceLock::new(),
            mirror: RwLock::new(options.mirror),
            state: RwLock::new(LayerState {
                size_bytes: base.size_bytes,
                base,
                base_hash: map_file.base,
                map,
            }),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            pending: Mutex::new(Vec::new()),
            journal: Mutex::new(journal),
            data_dirty: AtomicBool::new(false),
            journal_bytes_max: options.journal_bytes_max,
        })
    }

    /// Opens `dir`, creating it from `spec` first if it holds no volume.
    pub fn open_or_create(
        store: Arc<ChunkStore>,
        dir: &Path,
        spec: &VolumeSpec,
        options: VolumeOptions,
    ) -> Result<Volume, VolumeError> {
        if !layer::map_path(dir).exists() {
            Volume::create(&store, dir, spec)?;
        }
        Volume::open(store, dir, options)
    }

    /// Flushes and closes (the clean shutdown). Dropping without this is a simulated crash.
    pub fn close(self) -> Result<(), VolumeError> {
        self.flush()
    }

    pub fn size_bytes(&self) -> u64 {
        self.layer().size_bytes
    }

    pub fn base(&self) -> ManifestHash {
        self.layer().base_hash
    }

    pub fn is_persistent(&self) -> bool {
        self.persistent
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Raft moved the session to `generation` with this node still its primary ("standby
    /// dropped" or a standby added): later mirror operations carry it.
    pub fn advance_generation(&self, generation: u64) {
        self.generation.fetch_max(generation, Ordering::AcqRel);
    }

    /// Why the volume's storage failed, if it did (see "Storage faults are fatal").
    pub fn failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
    }

    /// Records a storage fault for good and returns it as the call's error.
    fn fail(&self, error: VolumeError) -> VolumeError {
        let reason = error.to_string();
        if self.failure.set(reason.clone()).is_ok() {
            tracing::error!(volume = %self.dir.display(), %reason, "volume storage failed; it takes no more i/o");
        }
        error
    }

    /// Enters a call: holds the I/O gate and checks the fence and the failure flag after
    /// taking it (a fence that waits for the gate is seen by every call that starts later).
    fn enter(&self) -> Result<RwLockReadGuard<'_, ()>, VolumeError> {
        let gate = self
            .io_gate
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(reason) = self.failure.get() {
            return Err(VolumeError::Failed(reason.clone()));
        }
        self.check_fence()?;
        Ok(gate)
    }

    pub fn directory(&self) -> &Path {
        &self.dir
    }

    /// Fences the volume if `current_generation` is newer than its own: every later call
    /// fails, and this returns only once the calls in flight have ended (fence the mirror
    /// first, so calls waiting for the standby end). Returns whether it is fenced now.
    pub fn fence(&self, current_generation: u64) -> bool {
        if current_generation > self.generation() {
            self.fenced_at
                .fetch_max(current_generation, Ordering::AcqRel);
            // Drain: wait for every call that entered before the fence was set.
            drop(
                self.io_gate
                    .write()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()),
            );
        }
        self.fenced_at.load(Ordering::Acquire) != 0
    }

    fn check_fence(&self) -> Result<(), VolumeError> {
        match self.fenced_at.load(Ordering::Acquire) {
            0 => Ok(()),
            current => Err(VolumeError::Fenced {
                held: self.generation(),
                current,
            }),
        }
    }

    fn layer(&self) -> RwLockReadGuard<'_, LayerState> {
        self.state
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Count of 4 KiB blocks per state: (base, layer, unmapped).
    pub fn block_states(&self) -> (u64, u64, u64) {
        let layer = self.layer();
        (
            layer.map.count(BlockState::Base),
            layer.map.count(BlockState::Layer),
            layer.map.count(BlockState::Unmapped),
        )
    }

    fn check_range(&self, layer: &LayerState, offset: u64, length: u64) -> Result<(), VolumeError> {
        let aligned =
            offset.is_multiple_of(SECTOR_SIZE_BYTES) && length.is_multiple_of(SECTOR_SIZE_BYTES);
        if !aligned
            || offset
                .checked_add(length)
                .is_none_or(|end| end > layer.size_bytes)
        {
            return Err(VolumeError::OutOfRange {
                offset,
                length,
                size_bytes: layer.size_bytes,
            });
        }
        Ok(())
    }

    /// Reads `buffer.len()` bytes at `offset` (both multiples of 512).
    pub fn read_at(&self, offset: u64, buffer: &mut [u8]) -> Result<(), VolumeError> {
        let _gate = self.enter()?;
        let layer = self.layer();
        self.check_range(&layer, offset, buffer.len() as u64)?;
        self.read_locked(&layer, offset, buffer)
    }

    fn read_locked(
        &self,
        layer: &LayerState,
        mut offset: u64,
        buffer: &mut [u8],
    ) -> Result<(), VolumeError> {
        let end = offset + buffer.len() as u64;
        let mut done = 0usize;
        while offset < end {
            let block = offset / LAYER_BLOCK_SIZE_BYTES;
            let state = layer.map.get(block);
            let mut run_end = (block + 1) * LAYER_BLOCK_SIZE_BYTES;
            while run_end < end && layer.map.get(run_end / LAYER_BLOCK_SIZE_BYTES) == state {
                run_end += LAYER_BLOCK_SIZE_BYTES;
            }
            let run_end = run_end.min(end);
            let target = &mut buffer[done..done + (run_end - offset) as usize];
            match state {
                BlockState::Layer => self
                    .data
                    .read_exact_at(target, offset)
                    .map_err(VolumeError::io(&self.data_path))?,
                BlockState::Unmapped => target.fill(0),
                BlockState::Base => self.read_base(&layer.base, offset, target)?,
            }
            done += target.len();
            offset = run_end;
        }
        Ok(())
    }

    fn read_base(
        &self,
        base: &Manifest,
        mut offset: u64,
        target: &mut [u8],
    ) -> Result<(), VolumeError> {
        let chunk_size = CHUNK_SIZE_BYTES as u64;
        let mut done = 0usize;
        while done < target.len() {
            let index = (offset / chunk_size) as usize;
            let within = (offset % chunk_size) as usize;
            let length = (CHUNK_SIZE_BYTES - within).min(target.len() - done);
            let part = &mut target[done..done + length];
            match base.chunks.get(index).copied().flatten() {
                None => part.fill(0),
                Some(hash) => self
                    .store
                    .read_into(&hash, within, part)
                    .map_err(|source| VolumeError::Chunk { offset, source })?,
            }
            done += length;
            offset += length as u64;
        }
        Ok(())
    }

    /// Locks the stripes of blocks `first..=last` in ascending order (no deadlock between
    /// overlapping writers).
    fn lock_stripes(&self, first: u64, last: u64) -> Vec<MutexGuard<'_, ()>> {
        let count = (last - first + 1).min(STRIPES as u64);
        let mut indexes: Vec<usize> = (0..count)
            .map(|step| ((first + step) % STRIPES as u64) as usize)
            .collect();
        indexes.sort_unstable();
        indexes
            .into_iter()
            .map(|index| lock(&self.stripes[index]))
            .collect()
    }

    /// Writes `data` at `offset` (both multiples of 512). With `fua`, the write (and everything
    /// acknowledged before it) is durable when this returns.
    pub fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), VolumeError> {
        let _gate = self.enter()?;
        let ticket = self.write_entered(offset, data)?;
        self.mirror_wait(ticket)?;
        if fua && !data.is_empty() {
            self.flush_entered()?;
        }
        Ok(())
    }

    /// A write's local part, inside the I/O gate: checks the range, takes the stripes, writes
    /// and hands it to the mirror. Returns the mirror's ticket (none for an empty write).
    fn write_entered(&self, offset: u64, data: &[u8]) -> Result<Option<MirrorTicket>, VolumeError> {
        let layer = self.layer();
        self.check_range(&layer, offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(None);
        }
        let first = offset / LAYER_BLOCK_SIZE_BYTES;
        let last = (offset + data.len() as u64 - 1) / LAYER_BLOCK_SIZE_BYTES;
        let _stripes = self.lock_stripes(first, last);
        self.write_locked(&layer, offset, data)
    }

    /// [`Volume::write_at`] whose wait for the standby is left to the caller: applies the
    /// write, hands it to the mirror and returns what its acknowledgement waits for (`None`:
    /// nothing, it is complete). A FUA write, or one through a mirror without
    /// [`WriteMirror::completion`], completes here. The future fails if the mirror is fenced
    /// before the standby holds the write; the fence is what orders it with a failover, as the
    /// I/O gate does for [`Volume::write_at`] (the shell fences the mirror before the volume).
    pub fn start_write_at(
        &self,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> Result<Option<MirrorCompletion>, VolumeError> {
        if fua {
            return self.write_at(offset, data, fua).map(|()| None);
        }
        let _gate = self.enter()?;
        let Some(ticket) = self.write_entered(offset, data)? else {
            return Ok(None);
        };
        let Some(mirror) = self.mirror().clone() else {
            return Ok(None);
        };
        match mirror.clone().completion(ticket) {
            Some(completion) => Ok(Some(completion)),
            None => mirror.wait(ticket).map(|()| None).map_err(Into::into),
        }
    }

    /// The write path proper; the caller holds the stripes of every block touched. Returns the
    /// mirror's ticket, to wait for once the stripes are released.
    fn write_locked(
        &self,
        layer: &LayerState,
        offset: u64,
        data: &[u8],
    ) -> Result<Option<MirrorTicket>, VolumeError> {
        let first = offset / LAYER_BLOCK_SIZE_BYTES;
        let last = (offset + data.len() as u64 - 1) / LAYER_BLOCK_SIZE_BYTES;
        let block_offset = first * LAYER_BLOCK_SIZE_BYTES;
        let aligned = offset.is_multiple_of(LAYER_BLOCK_SIZE_BYTES)
            && (data.len() as u64).is_multiple_of(LAYER_BLOCK_SIZE_BYTES);
        let merged;
        let whole_blocks: &[u8] = if aligned {
            data
        } else {
            // Read-modify-write: the current content of the partial head and tail blocks.
            let mut buffer = vec![0u8; ((last - first + 1) * LAYER_BLOCK_SIZE_BYTES) as usize];
            let block = LAYER_BLOCK_SIZE_BYTES as usize;
            let tail_start = buffer.len() - block;
            if !offset.is_multiple_of(LAYER_BLOCK_SIZE_BYTES) {
                self.read_locked(layer, block_offset, &mut buffer[..block])?;
            }
            let end = offset + data.len() as u64;
            if !end.is_multiple_of(LAYER_BLOCK_SIZE_BYTES)
                && (last != first || offset.is_multiple_of(LAYER_BLOCK_SIZE_BYTES))
            {
                self.read_locked(
                    layer,
                    last * LAYER_BLOCK_SIZE_BYTES,
                    &mut buffer[tail_start..],
                )?;
            }
            let start = (offset - block_offset) as usize;
            buffer[start..start + data.len()].copy_from_slice(data);
            merged = buffer;
            &merged
        };
        injected(FAILPOINT_WRITE_DATA)
            .and_then(|()| self.data.write_all_at(whole_blocks, block_offset))
            .map_err(|e| self.fail(VolumeError::io(&self.data_path)(e)))?;
        self.data_dirty.store(true, Ordering::Release);
        self.set_states(layer, first, last, BlockState::Layer);
        self.mirror_submit(MirrorOperation::Write {
            first_block: first,
            data: whole_blocks,
        })
    }

    /// Sets blocks `first..=last` to `state`, recording changes for the journal.
    fn set_states(&self, layer: &LayerState, first: u64, last: u64, state: BlockState) {
        let mut pending = lock(&self.pending);
        for block in first..=last {
            if layer.map.set(block, state) != state {
                layer::push_record(&mut pending, block, state);
            }
        }
    }

    /// THE place where every layer change enters the mirror stream to the standby
    /// (DESIGN.md "Two copies of every writable layer"). Called after the local change, with
    /// the stripes of the affected blocks still held (so per-block order matches), and for
    /// flushes before the local flush. Without a mirror, nothing to wait for.
    fn mirror_submit(
        &self,
        operation: MirrorOperation<'_>,
    ) -> Result<Option<MirrorTicket>, VolumeError> {
        match &*self.mirror() {
            None => Ok(None),
            Some(mirror) => Ok(Some(mirror.submit(self.generation(), operation)?)),
        }
    }

    fn resync_submit(&self, operation: MirrorOperation<'_>) -> Result<(), VolumeError> {
        if let Some(mirror) = &*self.mirror() {
            mirror.submit_resync(self.generation(), operation)?;
        }
        Ok(())
    }

    /// Waits until the standby holds what `ticket` names: the last step before acknowledging.
    fn mirror_wait(&self, ticket: Option<MirrorTicket>) -> Result<(), VolumeError> {
        let mirror = self.mirror().clone();
        match (mirror, ticket) {
            (Some(mirror), Some(ticket)) => Ok(mirror.wait(ticket)?),
            _ => Ok(()),
        }
    }

    fn mirror(&self) -> RwLockReadGuard<'_, Option<Arc<dyn WriteMirror>>> {
        self.mirror
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sets (or removes) the mirror every later write, unmap and flush goes through: the node
    /// does it when this copy becomes a session's primary or stops being one. Waits for the
    /// calls in flight, so none of them is half through the old mirror and half through the
    /// new one.
    pub fn set_mirror(&self, mirror: Option<Arc<dyn WriteMirror>>) {
        let _drained = self
            .io_gate
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *self
            .mirror
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = mirror;
    }

    /// The standby side of [`WriteMirror`]: applies an operation the primary mirrored, unless
    /// it comes from an older generation than this volume was opened at (a fenced primary).
    /// Writes are whole 4 KiB blocks; nothing is mirrored further.
    pub fn apply_mirrored(
        &self,
        generation: u64,
        operation: MirrorOperation<'_>,
    ) -> Result<(), VolumeError> {
        let _gate = self.enter()?;
        if generation < self.generation() {
            return Err(VolumeError::Fenced {
                held: generation,
                current: self.generation(),
            });
        }
        let block = LAYER_BLOCK_SIZE_BYTES;
        match operation {
            MirrorOperation::Write { first_block, data } => {
                let layer = self.layer();
                let blocks = data.len() as u64 / block;
                let fits = first_block
                    .checked_add(blocks)
                    .is_some_and(|end| end <= layer.map.block_count());
                if data.is_empty() || !(data.len() as u64).is_multiple_of(block) || !fits {
                    return Err(VolumeError::OutOfRange {
                        offset: first_block.saturating_mul(block),
                        length: data.len() as u64,
                        size_bytes: layer.size_bytes,
                    });
                }
                let _stripes = self.lock_stripes(first_block, first_block + blocks - 1);
                injected(FAILPOINT_WRITE_DATA)
                    .and_then(|()| self.data.write_all_at(data, first_block * block))
                    .map_err(|e| self.fail(VolumeError::io(&self.data_path)(e)))?;
                self.data_dirty.store(true, Ordering::Release);
                self.set_states(
                    &layer,
                    first_block,
                    first_block + blocks - 1,
                    BlockState::Layer,
                );
                Ok(())
            }
            MirrorOperation::Unmap {
                first_block,
                block_count,
            }
            | MirrorOperation::Discard {
                first_block,
                block_count,
            } => {
                let state = match operation {
                    MirrorOperation::Discard { .. } => BlockState::Base,
                    _ => BlockState::Unmapped,
                };
                let layer = self.layer();
                let fits = first_block
                    .checked_add(block_count)
                    .is_some_and(|end| end <= layer.map.block_count());
                if block_count == 0 || !fits {
                    return Err(VolumeError::OutOfRange {
                        offset: first_block.saturating_mul(block),
                        length: block_count.saturating_mul(block),
                        size_bytes: layer.size_bytes,
                    });
                }
                let _stripes = self.lock_stripes(first_block, first_block + block_count - 1);
                self.set_states(&layer, first_block, first_block + block_count - 1, state);
                Ok(())
            }
            MirrorOperation::Flush => self.flush_local(),
        }
    }

    /// The standby's side of a resync: a digest of `region` of this copy (see
    /// `crate::mirror`), taken with the region's stripes held.
    pub fn region_digest(&self, region: u64) -> Result<RegionDigest, VolumeError> {
        let _gate = self.enter()?;
        let layer = self.layer();
        let block_count = layer.map.block_count();
        let first = region.saturating_mul(REGION_BLOCKS);
        let count = region_blocks(block_count, region);
        if count == 0 {
            return Ok(RegionDigest::default());
        }
        let _stripes = self.lock_stripes(first, first + count - 1);
        self.digest_locked(&layer, first, count, None)
            .map(|blocks| RegionDigest { blocks })
    }

    /// A digest of this whole copy of the layer (each block's state, and the hash of every
    /// written block), region by region with each region's stripes held: two copies of a layer
    /// in sync have the same digest once no write is in flight. `cairn client verify` compares
    /// the primary's and the standby's.
    pub fn copy_digest(&self) -> Result<CopyDigest, VolumeError> {
        let block_count = self.layer().map.block_count();
        let mut hasher = blake3::Hasher::new();
        let mut written_blocks = 0u64;
        let mut region = 0u64;
        while region.saturating_mul(REGION_BLOCKS) < block_count {
            for block in self.region_digest(region)?.blocks {
                match block {
                    BlockDigest::Base => hasher.update(&[0]),
                    BlockDigest::Unmapped => hasher.update(&[1]),
                    BlockDigest::Layer(hash) => {
                        written_blocks += 1;
                        hasher.update(&[2]).update(&hash)
                    }
                };
            }
            region += 1;
        }
        Ok(CopyDigest {
            hash: *hasher.finalize().as_bytes(),
            written_blocks,
        })
    }

    /// The digest of blocks `first..first + count`. With `against` (the standby's digest of
    /// the same blocks), a written block is hashed only where the standby's is written too:
    /// elsewhere the two differ whatever the hash, so it gets a placeholder (a fresh standby's
    /// resync hashes nothing).
    fn digest_locked(
        &self,
        layer: &LayerState,
        first: u64,
        count: u64,
        against: Option<&RegionDigest>,
    ) -> Result<Vec<BlockDigest>, VolumeError> {
        let mut buffer = [0u8; LAYER_BLOCK_SIZE_BYTES as usize];
        let theirs_written = |block: u64| {
            against.is_none_or(|digest| {
                matches!(
                    digest.blocks.get((block - first) as usize),
                    Some(BlockDigest::Layer(_))
                )
            })
        };
        (first..first + count)
            .map(|block| match layer.map.get(block) {
                BlockState::Base => Ok(BlockDigest::Base),
                BlockState::Unmapped => Ok(BlockDigest::Unmapped),
                BlockState::Layer if !theirs_written(block) => Ok(BlockDigest::Layer([0; 16])),
                BlockState::Layer => {
                    self.data
                        .read_exact_at(&mut buffer, block * LAYER_BLOCK_SIZE_BYTES)
                        .map_err(VolumeError::io(&self.data_path))?;
                    Ok(BlockDigest::of_layer_block(&buffer))
                }
            })
            .collect()
    }

    /// The primary's side of a resync: compares `region` of this copy with the standby's
    /// digest and submits what differs to the mirror, with the region's stripes held so no
    /// write to it slips between the read and the submission. Returns the bytes of block data
    /// submitted; completion is the resync's final flush (`crate::mirror::Primary`).
    pub fn resync_region(&self, region: u64, standby: &RegionDigest) -> Result<u64, VolumeError> {
        let _gate = self.enter()?;
        let layer = self.layer();
        let first = region.saturating_mul(REGION_BLOCKS);
        let count = region_blocks(layer.map.block_count(), region);
        if count == 0 {
            return Ok(0);
        }
        let _stripes = self.lock_stripes(first, first + count - 1);
        let local = self.digest_locked(&layer, first, count, Some(standby))?;
        let mut copied = 0u64;
        let mut data = Vec::new();
        for difference in region_differences(first, &local, standby, RESYNC_WRITE_BLOCKS_MAX) {
            match difference {
                Difference::Write {
                    first_block,
                    block_count,
                } => {
                    data.resize((block_count * LAYER_BLOCK_SIZE_BYTES) as usize, 0);
                    self.data
                        .read_exact_at(&mut data, first_block * LAYER_BLOCK_SIZE_BYTES)
                        .map_err(VolumeError::io(&self.data_path))?;
                    copied += data.len() as u64;
                    self.resync_submit(MirrorOperation::Write {
                        first_block,
                        data: &data,
                    })?;
                }
                Difference::Unmap {
                    first_block,
                    block_count,
                } => {
                    self.resync_submit(MirrorOperation::Unmap {
                        first_block,
                        block_count,
                    })?;
                }
                Difference::Discard {
                    first_block,
                    block_count,
                } => {
                    self.resync_submit(MirrorOperation::Discard {
                        first_block,
                        block_count,
                    })?;
                }
            }
        }
        Ok(copied)
    }

    /// Makes `length` bytes at `offset` read as zeros (multiples of 512). Whole 4 KiB blocks
    /// become unmapped; partial blocks at the edges are written with zeros.
    pub fn unmap_at(&self, offset: u64, length: u64) -> Result<(), VolumeError> {
        let _gate = self.enter()?;
        let tickets = self.unmap_locked(offset, length)?;
        for ticket in tickets {
            self.mirror_wait(Some(ticket))?;
        }
        Ok(())
    }

    /// The unmap proper: takes the stripes, returns the mirror tickets to wait for.
    fn unmap_locked(&self, offset: u64, length: u64) -> Result<Vec<MirrorTicket>, VolumeError> {
        let layer = self.layer();
        self.check_range(&layer, offset, length)?;
        let mut tickets = Vec::new();
        if length == 0 {
            return Ok(tickets);
        }
        let end = offset + length;
        let first = offset / LAYER_BLOCK_SIZE_BYTES;
        let last = (end - 1) / LAYER_BLOCK_SIZE_BYTES;
        let _stripes = self.lock_stripes(first, last);
        let whole_first = offset.div_ceil(LAYER_BLOCK_SIZE_BYTES);
        let whole_end = end / LAYER_BLOCK_SIZE_BYTES; // exclusive
        let zeros = [0u8; LAYER_BLOCK_SIZE_BYTES as usize];
        if whole_first >= whole_end {
            // Within one or two partial blocks, no whole block.
            let mut at = offset;
            while at < end {
                let piece = (LAYER_BLOCK_SIZE_BYTES - at % LAYER_BLOCK_SIZE_BYTES).min(end - at);
                tickets.extend(self.write_locked(&layer, at, &zeros[..piece as usize])?);
                at += piece;
            }
            return Ok(tickets);
        }
        let head_end = whole_first * LAYER_BLOCK_SIZE_BYTES;
        if offset < head_end {
            tickets.extend(self.write_locked(
                &layer,
                offset,
                &zeros[..(head_end - offset) as usize],
            )?);
        }
        let tail_start = whole_end * LAYER_BLOCK_SIZE_BYTES;
        if tail_start < end {
            tickets.extend(self.write_locked(
                &layer,
                tail_start,
                &zeros[..(end - tail_start) as usize],
            )?);
        }
        self.set_states(&layer, whole_first, whole_end - 1, BlockState::Unmapped);
        // Give the space back. Safe before the map change is durable: the unmap is already
        // acknowledged-to-be, and a crash may show a block as old data or zeros (both allowed).
        // Failure (a file system without hole punching) only costs space.
        let _ = rustix::fs::fallocate(
            &self.data,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            whole_first * LAYER_BLOCK_SIZE_BYTES,
            (whole_end - whole_first) * LAYER_BLOCK_SIZE_BYTES,
        );
        tickets.extend(self.mirror_submit(MirrorOperation::Unmap {
            first_block: whole_first,
            block_count: whole_end - whole_first,
        })?);
        Ok(tickets)
    }

    /// Makes every acknowledged write and unmap durable, here and on the standby at once.
    pub fn flush(&self) -> Result<(), VolumeError> {
        let _gate = self.enter()?;
        self.flush_entered()
    }

    /// `flush` for a caller that already holds the I/O gate.
    fn flush_entered(&self) -> Result<(), VolumeError> {
        // Submitted first: the standby flushes while this node does.
        let ticket = self.mirror_submit(MirrorOperation::Flush)?;
        self.flush_local()?;
        self.mirror_wait(ticket)
    }

    /// Makes every write and unmap applied here so far durable on this node's disk.
    fn flush_local(&self) -> Result<(), VolumeError> {
        let layer = self.layer();
        let mut journal = lock(&self.journal);
        // Data before the map: a block is durable `Layer` only once its data is durable. The
        // dirty flag is cleared only after a successful sync, and the pending records are
        // taken only after it: a failed sync loses neither (and fails the volume for good).
        if self.data_dirty.swap(false, Ordering::AcqRel) {
            if let Err(error) = injected(FAILPOINT_SYNC_DATA).and_then(|()| self.data.sync_data()) {
                self.data_dirty.store(true, Ordering::Release);
                return Err(self.fail(VolumeError::io(&self.data_path)(error)));
            }
        }
        let (records, checkpoint) = {
            let mut pending = lock(&self.pending);
            let records = std::mem::take(&mut *pending);
            let grows_to = journal.bytes + (records.len() * layer::RECORD_BYTES) as u64;
            let checkpoint = (grows_to > self.journal_bytes_max).then(|| layer.map.to_packed());
            (records, checkpoint)
        };
        let written = match checkpoint {
            Some(packed) => {
                let generation = journal.generation + 1;
                let map = MapFile {
                    generation,
                    base: layer.base_hash,
                    block_count: layer.map.block_count(),
                    packed,
                };
                self.write_checkpoint(&map).map(|new| *journal = new)
            }
            None => injected(FAILPOINT_JOURNAL_APPEND)
                .map_err(VolumeError::io(&layer::journal_path(
                    &self.dir,
                    journal.generation,
                )))
                .and_then(|()| journal.append(&records, &self.dir)),
        };
        if let Err(error) = written {
            // Keep the records pending (a checkpoint's map copy already held them), so nothing
            // is dropped from memory; the volume takes no more i/o anyway.
            lock(&self.pending).splice(0..0, records);
            return Err(self.fail(error));
        }
        Ok(())
    }

    /// Writes `map` as the new checkpoint with an empty journal of its generation.
    fn write_checkpoint(&self, map: &MapFile) -> Result<Journal, VolumeError> {
        let journal = Journal::create(&self.dir, map.generation)?;
        layer::write_file_atomic(&layer::map_path(&self.dir), &map.encode())?;
        layer::remove_stale_journals(&self.dir, map.generation)?;
        Ok(journal)
    }

    /// Discards the layer atomically (a non-persistent volume at boot), optionally moving to a
    /// new base version. Waits for in-flight I/O; the layer is empty and durable on return.
    pub fn reset(&self, new_base: Option<ManifestHash>) -> Result<(), VolumeError> {
        let _gate = self.enter()?;
        let mut layer = self
            .state
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut journal = lock(&self.journal);
        let base_hash = new_base.unwrap_or(layer.base_hash);
        let base = load_base(&self.store, &base_hash)?;
        let block_count = layer_blocks(base.size_bytes);
        let map = MapFile {
            generation: journal.generation + 1,
            base: base_hash,
            block_count,
            packed: vec![0; block_count.div_ceil(4) as usize],
        };
        // The commit point is the rename of layer.map inside write_checkpoint.
        *journal = self.write_checkpoint(&map)?;
        lock(&self.pending).clear();
        // Stale data left in layer.data is never read: every block is Base now. Reclaim space.
        self.data
            .set_len(0)
            .map_err(VolumeError::io(&self.data_path))?;
        self.data
            .set_len(block_count * LAYER_BLOCK_SIZE_BYTES)
            .map_err(VolumeError::io(&self.data_path))?;
        self.data_dirty.store(false, Ordering::Release);
        *layer = LayerState {
            size_bytes: base.size_bytes,
            base,
            base_hash,
            map: BlockMap::new(block_count),
        };
        tracing::info!(volume = %self.dir.display(), base = %base_hash, "volume layer reset");
        Ok(())
    }

    /// Whether the 4 KiB block holding `offset` holds data (false: unmapped or a zero base chunk),
    /// and how many bytes from `offset` share that answer.
    pub fn mapping_at(&self, offset: u64) -> Result<(bool, u64), VolumeError> {
        let _gate = self.enter()?;
        let layer = self.layer();
        let block_count = layer.map.block_count();
        let mapped = |block: u64| match layer.map.get(block) {
            BlockState::Layer => true,
            BlockState::Unmapped => false,
            BlockState::Base => {
                let chunk = (block * LAYER_BLOCK_SIZE_BYTES / CHUNK_SIZE_BYTES as u64) as usize;
                layer.base.chunks.get(chunk).copied().flatten().is_some()
            }
        };
        let first = offset / LAYER_BLOCK_SIZE_BYTES;
        if first >= block_count {
            return Ok((true, 0));
        }
        let answer = mapped(first);
        let mut block = first + 1;
        // A shorter run is a valid answer; bound the work of one GET LBA STATUS.
        let scan_end = block_count.min(first + MAPPING_SCAN_BLOCKS_MAX);
        while block < scan_end && mapped(block) == answer {
            block += 1;
        }
        let end = (block * LAYER_BLOCK_SIZE_BYTES).min(layer.size_bytes);
        Ok((answer, end - offset))
    }
}

impl From<VolumeError> for DeviceError {
    fn from(error: VolumeError) -> Self {
        match error {
            VolumeError::Fenced { held, current } => DeviceError::Fenced { held, current },
            VolumeError::Io { source, .. } => DeviceError::Io(source),
            VolumeError::Mirror(error) => DeviceError::Unavailable(error.0),
            VolumeError::Failed(reason) => DeviceError::Unavailable(reason),
            VolumeError::Chunk { offset, source } => DeviceError::Medium {
                lba: offset / SECTOR_SIZE_BYTES,
                reason: source.to_string(),
            },
            other => DeviceError::Io(std::io::Error::other(other.to_string())),
        }
    }
}

impl BlockDevice for Volume {
    fn block_size_bytes(&self) -> u32 {
        SECTOR_SIZE_BYTES as u32
    }

    fn block_count(&self) -> u64 {
        self.size_bytes() / SECTOR_SIZE_BYTES
    }

    fn unique_id(&self) -> [u8; 16] {
        self.unique_id
    }

    fn read(&self, lba: u64, buffer: &mut [u8]) -> Result<(), DeviceError> {
        let offset = self.device_range(lba, buffer.len())?;
        Ok(self.read_at(offset, buffer)?)
    }

    fn write(&self, lba: u64, data: &[u8], force_unit_access: bool) -> Result<(), DeviceError> {
        let offset = self.device_range(lba, data.len())?;
        Ok(self.write_at(offset, data, force_unit_access)?)
    }

    fn start_write(
        &self,
        lba: u64,
        data: &[u8],
        force_unit_access: bool,
    ) -> Result<Option<WriteCompletion>, DeviceError> {
        let offset = self.device_range(lba, data.len())?;
        let completion = self.start_write_at(offset, data, force_unit_access)?;
        Ok(completion.map(|completion| -> WriteCompletion {
            Box::pin(async move {
                completion
                    .await
                    .map_err(|error| DeviceError::from(VolumeError::Mirror(error)))
            })
        }))
    }

    fn unmap(&self, lba: u64, blocks: u64) -> Result<(), DeviceError> {
        let offset = self.device_range(lba, 0)?;
        let block_count = BlockDevice::block_count(self);
        if blocks > block_count - lba {
            return Err(DeviceError::OutOfRange {
                lba,
                blocks,
                block_count,
            });
        }
        Ok(self.unmap_at(offset, blocks * SECTOR_SIZE_BYTES)?)
    }

    fn flush(&self) -> Result<(), DeviceError> {
        Ok(Volume::flush(self)?)
    }

    fn mapping_status(&self, lba: u64) -> Result<(bool, u64), DeviceError> {
        let (mapped, bytes) = self.mapping_at(lba.saturating_mul(SECTOR_SIZE_BYTES))?;
        Ok((mapped, bytes.div_ceil(SECTOR_SIZE_BYTES)))
    }
}

impl Volume {
    fn device_range(&self, lba: u64, length: usize) -> Result<u64, DeviceError> {
        let block_count = BlockDevice::block_count(self);
        let blocks = length as u64 / SECTOR_SIZE_BYTES;
        if !(length as u64).is_multiple_of(SECTOR_SIZE_BYTES)
            || lba > block_count
            || blocks > block_count - lba
        {
            return Err(DeviceError::OutOfRange {
                lba,
                blocks,
                block_count,
            });
        }
        Ok(lba * SECTOR_SIZE_BYTES)
    }
}
