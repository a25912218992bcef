//! Image versions: immutable manifests over the chunk store, import, garbage collection.
//!
//! A version of an image is a [`Manifest`]: name, version number, size, chunk size and the list
//! of chunk hashes (or a zero marker for an all-zero chunk). Its BLAKE3 hash over the stable
//! binary encoding below is the [`ManifestHash`] that the replicated state records.
//!
//! # Manifest encoding (version 1, all integers little-endian)
//!
//! ```text
//! offset  size  field
//! 0       8     magic "CAIRNMF1"
//! 8       4     format version = 1
//! 12      4     chunk_size_bytes (CHUNK_SIZE_BYTES = 65536 today)
//! 16      8     size_bytes (the image's virtual size)
//! 24      8     version
//! 32      2     name length N, 1..=255
//! 34      N     name, UTF-8
//! 34+N    8     chunk count = ceil(size_bytes / chunk_size_bytes)
//! 42+N    32*k  chunk hashes in order; 32 zero bytes = the chunk is all zeros (not stored)
//! ```
//!
//! Stored as `<store>/manifests/<manifest hash hex>.manifest`; loading re-hashes the file and
//! compares it with its name, so a corrupt manifest is an error, never a wrong image.
//!
//! # Crash safety of import (the commit point)
//!
//! An import writes every new chunk durably (temp, `fdatasync`, rename), fsyncs each fan-out
//! directory it added a file to, and only then writes the manifest (temp, `fsync`, rename, fsync
//! of `manifests/`). The manifest's rename is the commit point: before it, a crash leaves only
//! complete but unreferenced chunks (removed by the next garbage collection) and temp files
//! (removed at open); after it, every chunk the manifest names is durable. A committed manifest
//! is never rewritten (content addressed), so a committed image cannot be corrupted by a crash.
//!
//! # Garbage collection
//!
//! The roots are the manifests stored in `manifests/`: the node removes the manifest of a
//! retired version with [`ChunkStore::remove_manifest`], then [`ChunkStore::collect_garbage`]
//! deletes every chunk no stored manifest references. Using the stored set (rather than a list
//! passed in) means a manifest that an import has just committed but the replicated state has
//! not recorded yet is still a root. Imports pin each chunk they reference before checking
//! whether it exists; a collection re-checks pins under the same lock right before each unlink.
//! Pins of a committed import stay until the next collection *starts* (which lists manifests
//! after dropping them, and so sees that import's manifest).
//!
//! # Not done here
//!
//! Replication of chunks and manifests between nodes, the importing → ready state (the node's
//! job), conversion of image formats in-process (qemu's tools do it: see [`import`]).

pub mod import;
pub mod nbd;
pub mod progress;

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::PathBuf;

use crate::chunks::{io_error, sync_dir, ChunkError, ChunkHash, ChunkStore, CHUNK_SIZE_BYTES};

pub use import::{detect_format, ImageFormat, ImportError};
pub use progress::{ImportProgress, NoProgress, TerminalProgress};

const MANIFEST_MAGIC: &[u8; 8] = b"CAIRNMF1";
const MANIFEST_FORMAT_VERSION: u32 = 1;
const NAME_LENGTH_MAX: usize = 255;

/// The BLAKE3 hash of a manifest's encoding.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct ManifestHash(pub ChunkHash);

impl std::fmt::Display for ManifestHash {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, formatter)
    }
}

impl ManifestHash {
    pub fn to_hex(&self) -> String {
        self.0.to_hex()
    }
    pub fn from_hex(text: &str) -> Option<Self> {
        ChunkHash::from_hex(text).map(ManifestHash)
    }
}

/// One immutable image version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub name: String,
    pub version: u64,
    pub size_bytes: u64,
    pub chunk_size_bytes: u32,
    /// `None`: the chunk is all zeros and not stored.
    pub chunks: Vec<Option<ChunkHash>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is truncated: {0} bytes")]
    Truncated(usize),
    #[error("not a manifest: bad magic {0:02x?}")]
    BadMagic([u8; 8]),
    #[error("unsupported manifest format version {0}")]
    UnsupportedVersion(u32),
    #[error("unsupported chunk size {0} bytes")]
    BadChunkSize(u32),
    #[error("bad image name length {0}")]
    BadNameLength(usize),
    #[error("image name is not utf-8")]
    NameNotUtf8,
    #[error("manifest lists {listed} chunks, size {size_bytes} needs {expected}")]
    ChunkCountMismatch {
        listed: u64,
        expected: u64,
        size_bytes: u64,
    },
    #[error("manifest length {actual} bytes, expected {expected}")]
    LengthMismatch { actual: usize, expected: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("manifest {hash} is corrupt on disk: content hashes to {actual}")]
    ManifestCorrupt {
        hash: ManifestHash,
        actual: ManifestHash,
    },
    #[error("manifest {hash} is missing")]
    ManifestMissing { hash: ManifestHash },
    #[error("manifest {hash} is invalid: {source}")]
    ManifestInvalid {
        hash: ManifestHash,
        source: ManifestError,
    },
    #[error(transparent)]
    Chunk(#[from] ChunkError),
}

pub fn chunk_count_for(size_bytes: u64, chunk_size_bytes: u32) -> u64 {
    size_bytes.div_ceil(chunk_size_bytes.max(1) as u64)
}

impl Manifest {
    pub fn chunk_count(&self) -> u64 {
        self.chunks.len() as u64
    }

    pub fn encode(&self) -> Vec<u8> {
        let name = self.name.as_bytes();
        let mut out = Vec::with_capacity(42 + name.len() + 32 * self.chunks.len());
        out.extend_from_slice(MANIFEST_MAGIC);
        out.extend_from_slice(&MANIFEST_FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&self.chunk_size_bytes.to_le_bytes());
        out.extend_from_slice(&self.size_bytes.to_le_bytes());
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(name);
        out.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        for chunk in &self.chunks {
            out.extend_from_slice(&chunk.map(|hash| hash.0).unwrap_or([0; 32]));
        }
        out
    }

    pub fn hash(&self) -> ManifestHash {
        ManifestHash(ChunkHash::of(&self.encode()))
    }

    /// Parses an encoded manifest. Never panics; allocates only after checking the length.
    pub fn decode(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let truncated = || ManifestError::Truncated(bytes.len());
        let field =
            |start: usize, length: usize| bytes.get(start..start + length).ok_or_else(truncated);
        let u32_at =
            |start| field(start, 4).map(|b| u32::from_le_bytes(b.try_into().unwrap_or([0; 4])));
        let u64_at =
            |start| field(start, 8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])));
        let magic: [u8; 8] = field(0, 8)?.try_into().unwrap_or([0; 8]);
        if &magic != MANIFEST_MAGIC {
            return Err(ManifestError::BadMagic(magic));
        }
        let format = u32_at(8)?;
        if format != MANIFEST_FORMAT_VERSION {
            return Err(ManifestError::UnsupportedVersion(format));
        }
        let chunk_size_bytes = u32_at(12)?;
        if !chunk_size_bytes.is_power_of_two() || !(4096..=(16 << 20)).contains(&chunk_size_bytes) {
            return Err(ManifestError::BadChunkSize(chunk_size_bytes));
        }
        let size_bytes = u64_at(16)?;
        let version = u64_at(24)?;
        let name_length = field(32, 2).map(|b| u16::from_le_bytes([b[0], b[1]]))? as usize;
        if name_length == 0 || name_length > NAME_LENGTH_MAX {
            return Err(ManifestError::BadNameLength(name_length));
        }
        let name = std::str::from_utf8(field(34, name_length)?)
            .map_err(|_| ManifestError::NameNotUtf8)?
            .to_string();
        let listed = u64_at(34 + name_length)?;
        let expected = chunk_count_for(size_bytes, chunk_size_bytes);
        if listed != expected {
            return Err(ManifestError::ChunkCountMismatch {
                listed,
                expected,
                size_bytes,
            });
        }
        let header = 42 + name_length as u64;
        let expected_length = listed
            .checked_mul(32)
            .and_then(|body| body.checked_add(header));
        if expected_length != Some(bytes.len() as u64) {
            return Err(ManifestError::LengthMismatch {
                actual: bytes.len(),
                expected: expected_length.unwrap_or(u64::MAX),
            });
        }
        let chunks = bytes[header as usize..]
            .chunks_exact(32)
            .map(|entry| {
                let hash: [u8; 32] = entry.try_into().unwrap_or([0; 32]);
                (hash != [0; 32]).then_some(ChunkHash(hash))
            })
            .collect();
        Ok(Manifest {
            name,
            version,
            size_bytes,
            chunk_size_bytes,
            chunks,
        })
    }

    /// Distinct stored chunks this manifest references.
    pub fn referenced_chunks(&self) -> HashSet<ChunkHash> {
        self.chunks.iter().flatten().copied().collect()
    }
}

/// What [`ChunkStore::scrub`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScrubReport {
    pub chunks_verified: u64,
    pub missing: Vec<ChunkHash>,
    pub corrupt: Vec<ChunkHash>,
}

impl ScrubReport {
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.corrupt.is_empty()
    }
}

/// What one garbage collection did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcStats {
    pub manifests_live: u64,
    pub chunks_scanned: u64,
    pub chunks_live: u64,
    pub chunks_removed: u64,
    pub chunks_pinned: u64,
    pub bytes_freed: u64,
}

impl ChunkStore {
    fn manifests_dir(&self) -> PathBuf {
        self.root().join("manifests")
    }

    fn manifest_path(&self, hash: &ManifestHash) -> PathBuf {
        self.manifests_dir()
            .join(format!("{}.manifest", hash.to_hex()))
    }

    /// Writes a manifest durably (the commit point of an import). Idempotent. The caller must
    /// have made every chunk it references durable first.
    pub fn commit_manifest(&self, manifest: &Manifest) -> Result<ManifestHash, ChunkError> {
        let bytes = manifest.encode();
        let hash = ManifestHash(ChunkHash::of(&bytes));
        let final_path = self.manifest_path(&hash);
        if final_path.exists() {
            return Ok(hash);
        }
        let temp = self.temp_path("manifest");
        let result = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&temp)
                .map_err(io_error(&temp))?;
            file.write_all(&bytes).map_err(io_error(&temp))?;
            file.sync_all().map_err(io_error(&temp))?;
            fs::rename(&temp, &final_path).map_err(io_error(&final_path))?;
            sync_dir(&self.manifests_dir())
        })();
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result.map(|()| hash)
    }

    /// Loads and verifies a stored manifest.
    pub fn load_manifest(&self, hash: &ManifestHash) -> Result<Manifest, ImageError> {
        let path = self.manifest_path(hash);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Err(ImageError::ManifestMissing { hash: *hash })
            }
            Err(source) => return Err(ChunkError::Io { path, source }.into()),
        };
        let actual = ManifestHash(ChunkHash::of(&bytes));
        if actual != *hash {
            return Err(ImageError::ManifestCorrupt {
                hash: *hash,
                actual,
            });
        }
        Manifest::decode(&bytes).map_err(|source| ImageError::ManifestInvalid {
            hash: *hash,
            source,
        })
    }

    pub fn list_manifests(&self) -> Result<Vec<ManifestHash>, ChunkError> {
        let dir = self.manifests_dir();
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_error(&dir))? {
            let entry = entry.map_err(io_error(&dir))?;
            let name = entry.file_name();
            if let Some(hash) = name
                .to_str()
                .and_then(|name| name.strip_suffix(".manifest"))
                .and_then(ManifestHash::from_hex)
            {
                out.push(hash);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes a stored manifest (a retired version). Its chunks go at the next collection.
    pub fn remove_manifest(&self, hash: &ManifestHash) -> Result<bool, ChunkError> {
        let path = self.manifest_path(hash);
        match fs::remove_file(&path) {
            Ok(()) => {
                sync_dir(&self.manifests_dir())?;
                Ok(true)
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(ChunkError::Io { path, source }),
        }
    }

    /// Deletes every chunk that no stored manifest references and no import has pinned.
    /// Safe to run while imports run. Refuses to delete anything if a manifest cannot be read.
    pub fn collect_garbage(&self) -> Result<GcStats, ImageError> {
        // Pins of imports committed before this point are dropped: their manifests are on disk
        // (the rename happened before the pins moved to `committed`) and are listed next.
        self.pins().committed.clear();
        let mut stats = GcStats::default();
        let mut live: HashSet<ChunkHash> = HashSet::new();
        for hash in self.list_manifests()? {
            let manifest = self.load_manifest(&hash)?;
            live.extend(manifest.chunks.iter().flatten().copied());
            stats.manifests_live += 1;
        }
        let mut touched_dirs = HashSet::new();
        for hash in self.list_chunks()? {
            stats.chunks_scanned += 1;
            if live.contains(&hash) {
                stats.chunks_live += 1;
                continue;
            }
            let pins = self.pins();
            if pins.active.contains_key(&hash) || pins.committed.contains(&hash) {
                stats.chunks_pinned += 1;
                continue;
            }
            let path = self.chunk_path(&hash);
            match fs::remove_file(&path) {
                Ok(()) => {
                    stats.chunks_removed += 1;
                    stats.bytes_freed += CHUNK_SIZE_BYTES as u64;
                    touched_dirs.insert(self.fanout_dir(&hash));
                }
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(ChunkError::Io { path, source }.into()),
            }
            drop(pins);
            self.evict_cached(&hash);
        }
        for dir in touched_dirs {
            sync_dir(&dir)?;
        }
        tracing::info!(
            removed = stats.chunks_removed,
            live = stats.chunks_live,
            pinned = stats.chunks_pinned,
            "chunk garbage collection done"
        );
        Ok(stats)
    }

    /// Chunks of `manifest` that are not stored here (not verified): what a node must still
    /// receive before it holds the version (replication, a later issue).
    pub fn missing_chunks(&self, manifest: &Manifest) -> Vec<ChunkHash> {
        let mut seen = HashSet::new();
        manifest
            .chunks
            .iter()
            .flatten()
            .filter(|hash| seen.insert(**hash) && !self.contains(hash))
            .copied()
            .collect()
    }

    /// Reads and verifies every chunk of `manifest` from disk (bypassing the cache): the scrub
    /// an admin runs, and the check before declaring a version held. Never stops at the first
    /// problem; I/O errors other than missing or corrupt chunks are returned as errors.
    pub fn scrub(&self, manifest: &Manifest) -> Result<ScrubReport, ChunkError> {
        let mut report = ScrubReport::default();
        let mut seen = HashSet::new();
        for hash in manifest.chunks.iter().flatten() {
            if !seen.insert(*hash) {
                continue;
            }
            match self.read_chunk_uncached(hash) {
                Ok(_) => report.chunks_verified += 1,
                Err(ChunkError::Missing(hash)) => report.missing.push(hash),
                Err(ChunkError::Corrupt { hash, .. } | ChunkError::WrongSize { hash, .. }) => {
                    self.evict_cached(&hash);
                    report.corrupt.push(hash)
                }
                Err(other) => return Err(other),
            }
        }
        Ok(report)
    }

    /// Fsyncs every fan-out directory (used after an import that wrote files in many of them).
    pub(crate) fn sync_fanout_dirs(&self, fanouts: &HashSet<u8>) -> Result<(), ChunkError> {
        for byte in fanouts {
            sync_dir(&self.chunks_dir().join(format!("{byte:02x}")))?;
        }
        sync_dir(self.chunks_dir())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Manifest {
        Manifest {
            name: "debian-12".into(),
            version: 3,
            size_bytes: 3 * CHUNK_SIZE_BYTES as u64 - 512,
            chunk_size_bytes: CHUNK_SIZE_BYTES as u32,
            chunks: vec![Some(ChunkHash::of(b"a")), None, Some(ChunkHash::of(b"b"))],
        }
    }

    #[test]
    fn encoding_round_trips_and_is_stable() {
        let manifest = sample();
        let bytes = manifest.encode();
        assert_eq!(&bytes[..8], b"CAIRNMF1");
        assert_eq!(bytes.len(), 42 + 9 + 3 * 32);
        assert_eq!(Manifest::decode(&bytes).unwrap(), manifest);
        assert_eq!(manifest.hash(), manifest.clone().hash());
    }

    #[test]
    fn decode_rejects_inconsistent_headers() {
        let mut bytes = sample().encode();
        bytes[16] = 0; // size changes, chunk count no longer matches
        bytes[17] = 0;
        bytes[18] = 0;
        assert!(matches!(
            Manifest::decode(&bytes),
            Err(ManifestError::ChunkCountMismatch { .. })
        ));
        let bytes = sample().encode();
        assert!(matches!(
            Manifest::decode(&bytes[..bytes.len() - 1]),
            Err(ManifestError::LengthMismatch { .. })
        ));
        assert!(matches!(
            Manifest::decode(b"CAIRNMF"),
            Err(ManifestError::Truncated(7))
        ));
    }

    #[test]
    fn stored_manifest_is_verified() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), Default::default()).unwrap();
        let hash = store.commit_manifest(&sample()).unwrap();
        assert_eq!(store.load_manifest(&hash).unwrap(), sample());
        assert_eq!(store.list_manifests().unwrap(), vec![hash]);
        let path = store.manifest_path(&hash);
        let mut bytes = fs::read(&path).unwrap();
        bytes[40] ^= 1;
        fs::write(&path, bytes).unwrap();
        assert!(matches!(
            store.load_manifest(&hash),
            Err(ImageError::ManifestCorrupt { .. })
        ));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Manifest::decode(&bytes);
        }

        #[test]
        fn decode_never_panics_on_mutated_manifests(position in 0usize..147, value in any::<u8>()) {
            let mut bytes = sample().encode();
            let length = bytes.len();
            bytes[position % length] = value;
            let _ = Manifest::decode(&bytes);
        }

        #[test]
        fn round_trip(name in "[a-z0-9.-]{1,40}", version in any::<u64>(), chunk_count in 0u64..20,
                      zero_mask in any::<u32>()) {
            let chunks = (0..chunk_count)
                .map(|index| (zero_mask >> index & 1 == 0).then(|| ChunkHash::of(&index.to_le_bytes())))
                .collect();
            let manifest = Manifest {
                name, version, size_bytes: chunk_count * CHUNK_SIZE_BYTES as u64,
                chunk_size_bytes: CHUNK_SIZE_BYTES as u32, chunks,
            };
            prop_assert_eq!(Manifest::decode(&manifest.encode()).unwrap(), manifest);
        }
    }
}
