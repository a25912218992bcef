//! Import: stream an image into the chunk store with bounded memory and commit its manifest.
//!
//! Raw files are read directly. qcow2, VHD (qemu calls it `vpc`), VHDX and VMDK are recognised by
//! their magic bytes and streamed through `qemu-nbd` from Debian's qemu-utils (see
//! [`super::nbd`] for why not `qemu-img convert`), after `qemu-img check` has passed (qemu reads
//! clusters past the end of a truncated file as zeros, which would import silently wrong).
//! A clear [`ImportError::ConverterMissing`] when the tools are not installed, and qemu's own
//! message when it rejects a corrupt file. A raw file cannot be corrupt as such: any bytes are
//! a valid disk.
//!
//! Memory: the reading thread fills chunk buffers from a fixed pool of `2 * WRITER_THREADS + 2`
//! buffers (about 1 MiB in all) and hands them to `WRITER_THREADS` threads that hash, skip zero
//! chunks, and write new chunks (their `fdatasync`s overlap). Whatever the image size, data in
//! memory is bounded by that pool; the manifest itself (32 bytes per 64 KiB chunk, 1/2048 of the
//! image) is the only part that grows with size.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{chunk_count_for, nbd::NbdReader, ImportProgress, Manifest, ManifestHash};
use crate::chunks::{is_zero, ChunkError, ChunkHash, ChunkStore, CHUNK_SIZE_BYTES};

/// Threads that hash and write chunks during an import.
pub const WRITER_THREADS: usize = 4;
/// New chunks written to temp files before one `syncfs` makes them all durable and they are
/// renamed into place (16 MiB of data).
pub const STAGE_BATCH_CHUNKS: usize = 256;
const QEMU_NBD: &str = "qemu-nbd";
const QEMU_IMG: &str = "qemu-img";
const NBD_READ_BYTES: usize = 1 << 20;
const QEMU_NBD_START_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    Raw,
    Qcow2,
    /// Virtual PC / Hyper-V VHD (fixed or dynamic); qemu's `vpc` driver.
    Vhd,
    Vhdx,
    Vmdk,
}

impl ImageFormat {
    /// The name qemu's `-f` option takes.
    pub fn qemu_name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Vhd => "vpc",
            ImageFormat::Vhdx => "vhdx",
            ImageFormat::Vmdk => "vmdk",
        }
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Vhd => "vhd",
            ImageFormat::Vhdx => "vhdx",
            ImageFormat::Vmdk => "vmdk",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read image file {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("image source ended after {read_bytes} of {size_bytes} bytes")]
    ShortRead { read_bytes: u64, size_bytes: u64 },
    #[error("reading the image source failed after {read_bytes} bytes: {source}")]
    Read { read_bytes: u64, source: io::Error },
    #[error("{format} image {path} needs `{tool}` to import; install Debian's qemu-utils")]
    ConverterMissing {
        format: ImageFormat,
        path: PathBuf,
        tool: &'static str,
    },
    #[error("{tool} could not read {format} image {path}: {message}")]
    Converter {
        format: ImageFormat,
        path: PathBuf,
        tool: &'static str,
        message: String,
    },
    #[error("image name {0:?} must be 1 to 255 bytes")]
    BadName(String),
    #[error("image size {0} bytes is not a multiple of 512")]
    BadSize(u64),
    #[error(transparent)]
    Store(#[from] ChunkError),
}

/// Recognises an image format from its magic bytes (and a VHD footer at the end).
pub fn detect_format(file: &mut File) -> io::Result<ImageFormat> {
    let mut head = [0u8; 64];
    file.seek(SeekFrom::Start(0))?;
    let head_length = read_up_to(file, &mut head)?;
    let head = &head[..head_length];
    let format = if head.starts_with(b"QFI\xfb") {
        ImageFormat::Qcow2
    } else if head.starts_with(b"vhdxfile") {
        ImageFormat::Vhdx
    } else if head.starts_with(b"KDMV") || head.starts_with(b"# Disk DescriptorFile") {
        ImageFormat::Vmdk
    } else if head.starts_with(b"conectix") {
        ImageFormat::Vhd
    } else {
        let length = file.metadata()?.len();
        let mut footer = [0u8; 8];
        if length >= 512 {
            file.seek(SeekFrom::Start(length - 512))?;
            let footer_length = read_up_to(file, &mut footer)?;
            if footer_length == 8 && &footer == b"conectix" {
                file.seek(SeekFrom::Start(0))?;
                return Ok(ImageFormat::Vhd);
            }
        }
        ImageFormat::Raw
    };
    file.seek(SeekFrom::Start(0))?;
    Ok(format)
}

fn read_up_to<R: Read + ?Sized>(reader: &mut R, buffer: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(count) => filled += count,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(filled)
}

/// What an import produced.
#[derive(Clone, Debug)]
pub struct ImportOutcome {
    pub manifest: Manifest,
    pub manifest_hash: ManifestHash,
    pub chunks_written: u64,
    pub chunks_deduplicated: u64,
    pub chunks_zero: u64,
}

struct ImportShared<'a> {
    store: &'a ChunkStore,
    chunks: Mutex<Vec<Option<ChunkHash>>>,
    pinned: Mutex<HashSet<ChunkHash>>,
    fanouts: Mutex<HashSet<u8>>,
    /// Chunk files written to tmp/ but not yet synced and renamed.
    staged: Mutex<Vec<(ChunkHash, PathBuf)>>,
    counters: Mutex<(u64, u64, u64)>,
    error: Mutex<Option<ChunkError>>,
}

impl ImportShared<'_> {
    /// Pins `hash` for this import; false if this import had already pinned it (another of
    /// its writer threads handles or handled that content).
    fn pin(&self, hash: ChunkHash) -> bool {
        let mut mine = self
            .pinned
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let first = mine.insert(hash);
        if first {
            *self.store.pins().active.entry(hash).or_insert(0) += 1;
        }
        first
    }

    fn unpin_all(&self, committed: bool) {
        let mine = std::mem::take(
            &mut *self
                .pinned
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        let mut pins = self.store.pins();
        for hash in mine {
            if let Some(count) = pins.active.get_mut(&hash) {
                *count -= 1;
                if *count == 0 {
                    pins.active.remove(&hash);
                }
            }
            if committed {
                pins.committed.insert(hash);
            }
        }
    }

    /// Makes a batch of staged chunk files durable and gives them their names.
    fn publish(&self, batch: Vec<(ChunkHash, PathBuf)>) -> Result<(), ChunkError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.store.publish_staged(&batch)?;
        let mut fanouts = self
            .fanouts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        fanouts.extend(batch.iter().map(|(hash, _)| hash.0[0]));
        Ok(())
    }

    fn store_chunk(&self, index: usize, data: &[u8]) -> Result<(), ChunkError> {
        let entry = if is_zero(data) {
            self.counters
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .2 += 1;
            None
        } else {
            let hash = ChunkHash::of(data);
            // Pin before looking: a collection re-checks pins right before each unlink.
            let new = self.pin(hash) && !self.store.contains(&hash);
            if new {
                let temp = self.store.stage_chunk_file(data)?;
                self.counters
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .0 += 1;
                let batch = {
                    let mut staged = self
                        .staged
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                    staged.push((hash, temp));
                    if staged.len() >= STAGE_BATCH_CHUNKS {
                        std::mem::take(&mut *staged)
                    } else {
                        Vec::new()
                    }
                };
                self.publish(batch)?;
            } else {
                self.counters
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .1 += 1;
            }
            Some(hash)
        };
        self.chunks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())[index] = entry;
        Ok(())
    }
}

impl ChunkStore {
    /// Imports `size_bytes` read from `reader` as version `version` of image `name`. The source
    /// must yield exactly `size_bytes` (a multiple of 512); the last chunk is zero-padded.
    pub fn import_raw(
        &self,
        name: &str,
        version: u64,
        reader: &mut dyn Read,
        size_bytes: u64,
        progress: &dyn ImportProgress,
    ) -> Result<ImportOutcome, ImportError> {
        if name.is_empty() || name.len() > 255 {
            return Err(ImportError::BadName(name.to_string()));
        }
        if !size_bytes.is_multiple_of(512) {
            return Err(ImportError::BadSize(size_bytes));
        }
        let chunk_count = chunk_count_for(size_bytes, CHUNK_SIZE_BYTES as u32) as usize;
        let shared = ImportShared {
            store: self,
            chunks: Mutex::new(vec![None; chunk_count]),
            pinned: Mutex::new(HashSet::new()),
            fanouts: Mutex::new(HashSet::new()),
            staged: Mutex::new(Vec::new()),
            counters: Mutex::new((0, 0, 0)),
            error: Mutex::new(None),
        };
        let result = self.import_chunks(&shared, reader, size_bytes, chunk_count, progress);
        let result = result.and_then(|()| {
            let rest =
                std::mem::take(&mut *shared.staged.lock().unwrap_or_else(|p| p.into_inner()));
            shared.publish(rest)?;
            let fanouts =
                std::mem::take(&mut *shared.fanouts.lock().unwrap_or_else(|p| p.into_inner()));
            self.sync_fanout_dirs(&fanouts)?;
            let manifest = Manifest {
                name: name.to_string(),
                version,
                size_bytes,
                chunk_size_bytes: CHUNK_SIZE_BYTES as u32,
                chunks: std::mem::take(
                    &mut *shared.chunks.lock().unwrap_or_else(|p| p.into_inner()),
                ),
            };
            let manifest_hash = self.commit_manifest(&manifest)?;
            let (written, deduplicated, zero) =
                *shared.counters.lock().unwrap_or_else(|p| p.into_inner());
            Ok(ImportOutcome {
                manifest,
                manifest_hash,
                chunks_written: written,
                chunks_deduplicated: deduplicated,
                chunks_zero: zero,
            })
        });
        for (_, temp) in
            std::mem::take(&mut *shared.staged.lock().unwrap_or_else(|p| p.into_inner()))
        {
            let _ = std::fs::remove_file(temp); // a failed import's unpublished chunks
        }
        shared.unpin_all(result.is_ok());
        if let Ok(outcome) = &result {
            progress.finish(size_bytes, size_bytes);
            tracing::info!(
                image = name,
                version,
                manifest = %outcome.manifest_hash,
                written = outcome.chunks_written,
                deduplicated = outcome.chunks_deduplicated,
                zero = outcome.chunks_zero,
                "image imported"
            );
        }
        result
    }

    fn import_chunks(
        &self,
        shared: &ImportShared<'_>,
        reader: &mut dyn Read,
        size_bytes: u64,
        chunk_count: usize,
        progress: &dyn ImportProgress,
    ) -> Result<(), ImportError> {
        let pool_size = 2 * WRITER_THREADS + 2;
        // (chunk index, chunk buffer) to the writer threads; at most WRITER_THREADS queued.
        let (work_sender, work_receiver) = mpsc::sync_channel::<(usize, Vec<u8>)>(WRITER_THREADS);
        let work_receiver = Mutex::new(work_receiver);
        let (free_sender, free_receiver) = mpsc::channel::<Vec<u8>>();
        std::thread::scope(|scope| {
            for _ in 0..WRITER_THREADS {
                let free_sender = free_sender.clone();
                let work_receiver = &work_receiver;
                scope.spawn(move || loop {
                    let next = work_receiver
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .recv();
                    let Ok((index, buffer)) = next else { return };
                    if let Err(error) = shared.store_chunk(index, &buffer) {
                        shared
                            .error
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(error);
                    }
                    let _ = free_sender.send(buffer);
                });
            }
            drop(free_sender);
            let mut allocated = 0;
            let mut read_bytes = 0u64;
            let outcome = (|| {
                for index in 0..chunk_count {
                    if shared
                        .error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .is_some()
                    {
                        return Ok(());
                    }
                    let mut buffer = match free_receiver.try_recv() {
                        Ok(buffer) => buffer,
                        Err(_) if allocated < pool_size => {
                            allocated += 1;
                            vec![0u8; CHUNK_SIZE_BYTES]
                        }
                        Err(_) => match free_receiver.recv() {
                            Ok(buffer) => buffer,
                            Err(_) => return Ok(()),
                        },
                    };
                    let wanted = (size_bytes - read_bytes).min(CHUNK_SIZE_BYTES as u64) as usize;
                    let filled = read_up_to(reader, &mut buffer[..wanted])
                        .map_err(|source| ImportError::Read { read_bytes, source })?;
                    read_bytes += filled as u64;
                    if filled < wanted {
                        return Err(ImportError::ShortRead {
                            read_bytes,
                            size_bytes,
                        });
                    }
                    buffer[wanted..].fill(0);
                    if work_sender.send((index, buffer)).is_err() {
                        return Ok(());
                    }
                    progress.update(read_bytes, size_bytes);
                }
                Ok(())
            })();
            drop(work_sender);
            outcome
        })?;
        if let Some(error) = shared
            .error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            return Err(error.into());
        }
        Ok(())
    }

    /// Imports an image file, detecting its format unless `format` is given.
    pub fn import_file(
        &self,
        path: &Path,
        name: &str,
        version: u64,
        format: Option<ImageFormat>,
        progress: &dyn ImportProgress,
    ) -> Result<ImportOutcome, ImportError> {
        let open_error = |source| ImportError::Open {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::open(path).map_err(open_error)?;
        let format = match format {
            Some(format) => format,
            None => detect_format(&mut file).map_err(open_error)?,
        };
        if format == ImageFormat::Raw {
            let size_bytes = file.metadata().map_err(open_error)?.len();
            let mut reader = io::BufReader::with_capacity(CHUNK_SIZE_BYTES, file);
            return self.import_raw(name, version, &mut reader, size_bytes, progress);
        }
        drop(file);
        check_image(path, format)?;
        let mut server = QemuNbd::start(self, path, format)?;
        let converter_error = |message: String| ImportError::Converter {
            format,
            path: path.to_path_buf(),
            tool: QEMU_NBD,
            message,
        };
        let stream = server.connect().map_err(converter_error)?;
        let reader =
            NbdReader::connect(stream).map_err(|error| converter_error(error.to_string()))?;
        let size_bytes = reader.size_bytes();
        // 1 MiB NBD reads: 16 chunks per round trip to qemu-nbd.
        let mut buffered = io::BufReader::with_capacity(NBD_READ_BYTES, reader);
        let outcome = self.import_raw(name, version, &mut buffered, size_bytes, progress);
        let _ = buffered.into_inner().disconnect();
        drop(server);
        outcome
    }
}

/// Runs `qemu-img check`: qemu reads clusters past the end of a truncated file as zeros, so
/// without this a damaged image would import silently wrong. Exit codes (qemu-img(1)): 0 clean,
/// 3 only leaked clusters (harmless for reading), 63 the format has no check; anything else is
/// a damaged image.
fn check_image(path: &Path, format: ImageFormat) -> Result<(), ImportError> {
    let output = Command::new(QEMU_IMG)
        .arg("check")
        .arg("--format")
        .arg(format.qemu_name())
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .map_err(|error| {
            if error.kind() == io::ErrorKind::NotFound {
                ImportError::ConverterMissing {
                    format,
                    path: path.to_path_buf(),
                    tool: QEMU_IMG,
                }
            } else {
                ImportError::Converter {
                    format,
                    path: path.to_path_buf(),
                    tool: QEMU_IMG,
                    message: error.to_string(),
                }
            }
        })?;
    match output.status.code() {
        Some(0 | 3 | 63) => Ok(()),
        code => {
            let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).trim().to_string();
            let mut lines: Vec<String> = text(&output.stderr)
                .lines()
                .chain(text(&output.stdout).lines())
                .map(str::to_string)
                .filter(|line| !line.is_empty())
                .collect();
            lines.dedup();
            let shown: Vec<String> = lines.iter().take(3).cloned().collect();
            let more = lines.len().saturating_sub(shown.len());
            let mut message = format!("check failed (exit {code:?}): {}", shown.join("; "));
            if more > 0 {
                message.push_str(&format!("; and {more} more lines"));
            }
            Err(ImportError::Converter {
                format,
                path: path.to_path_buf(),
                tool: QEMU_IMG,
                message,
            })
        }
    }
}

/// A `qemu-nbd` child serving one image read-only on a Unix socket in the store's tmp dir.
struct QemuNbd {
    child: Child,
    socket: PathBuf,
    path: PathBuf,
    format: ImageFormat,
}

impl QemuNbd {
    fn start(store: &ChunkStore, path: &Path, format: ImageFormat) -> Result<Self, ImportError> {
        // A Unix socket path must fit in 108 bytes: use the system temp dir, not the store's.
        let serial = store.temp_path("nbd");
        let serial = serial
            .file_name()
            .and_then(|name| name.to_str())
            .unwrap_or("nbd");
        let socket = std::env::temp_dir().join(format!("cairn-{serial}.sock"));
        let child = Command::new(QEMU_NBD)
            .arg("--read-only")
            .arg("--persistent")
            .arg("--format")
            .arg(format.qemu_name())
            .arg("--socket")
            .arg(&socket)
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|error| {
                if error.kind() == io::ErrorKind::NotFound {
                    ImportError::ConverterMissing {
                        format,
                        path: path.to_path_buf(),
                        tool: QEMU_NBD,
                    }
                } else {
                    ImportError::Converter {
                        format,
                        path: path.to_path_buf(),
                        tool: QEMU_NBD,
                        message: error.to_string(),
                    }
                }
            })?;
        Ok(QemuNbd {
            child,
            socket,
            path: path.to_path_buf(),
            format,
        })
    }

    /// Waits for the socket; if qemu-nbd exits first (a corrupt image), returns its message.
    fn connect(&mut self) -> Result<UnixStream, String> {
        let started = Instant::now();
        loop {
            if let Ok(stream) = UnixStream::connect(&self.socket) {
                return Ok(stream);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                let mut message = String::new();
                if let Some(stderr) = self.child.stderr.as_mut() {
                    let _ = stderr.read_to_string(&mut message);
                }
                let message = message.trim().replace('\n', "; ");
                return Err(if message.is_empty() {
                    format!("exited with {status}")
                } else {
                    message
                });
            }
            if started.elapsed() > QEMU_NBD_START_TIMEOUT {
                return Err(format!(
                    "no socket after {} s serving {} ({})",
                    QEMU_NBD_START_TIMEOUT.as_secs(),
                    self.path.display(),
                    self.format
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}
