//! A [`BlockDevice`] over a plain file: pread/pwrite, fdatasync for flush and FUA, hole punching
//! for unmap, SEEK_DATA/SEEK_HOLE for GET LBA STATUS. Used by tests, the benchmark and
//! `cairn-iscsi-file`; Cairn's volumes implement the trait themselves.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::device::{BlockDevice, DeviceError};

const BLOCK: u64 = 512;

pub struct FileDevice {
    file: File,
    block_count: u64,
    unique_id: [u8; 16],
}

impl FileDevice {
    /// Opens (creating if needed) `path`; `size_bytes` sets its length when given, otherwise
    /// the file's length is used (rounded down to whole blocks).
    pub fn open(
        path: &Path,
        size_bytes: Option<u64>,
        unique_id: [u8; 16],
    ) -> std::io::Result<FileDevice> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        if let Some(size) = size_bytes {
            file.set_len(size)?;
        }
        let len = file.metadata()?.len();
        Ok(FileDevice {
            file,
            block_count: len / BLOCK,
            unique_id,
        })
    }

    fn check(&self, lba: u64, bytes: usize) -> Result<u64, DeviceError> {
        let blocks = bytes as u64 / BLOCK;
        if !(bytes as u64).is_multiple_of(BLOCK)
            || lba > self.block_count
            || blocks > self.block_count - lba
        {
            return Err(DeviceError::OutOfRange {
                lba,
                blocks,
                block_count: self.block_count,
            });
        }
        Ok(lba * BLOCK)
    }
}

impl BlockDevice for FileDevice {
    fn block_size_bytes(&self) -> u32 {
        BLOCK as u32
    }
    fn block_count(&self) -> u64 {
        self.block_count
    }
    fn unique_id(&self) -> [u8; 16] {
        self.unique_id
    }
    fn read(&self, lba: u64, buffer: &mut [u8]) -> Result<(), DeviceError> {
        let offset = self.check(lba, buffer.len())?;
        self.file.read_exact_at(buffer, offset)?;
        Ok(())
    }
    fn write(&self, lba: u64, data: &[u8], force_unit_access: bool) -> Result<(), DeviceError> {
        let offset = self.check(lba, data.len())?;
        self.file.write_all_at(data, offset)?;
        if force_unit_access {
            self.file.sync_data()?;
        }
        Ok(())
    }
    fn unmap(&self, lba: u64, blocks: u64) -> Result<(), DeviceError> {
        let offset = self.check(lba, 0)?;
        if blocks > self.block_count - lba {
            return Err(DeviceError::OutOfRange {
                lba,
                blocks,
                block_count: self.block_count,
            });
        }
        let len = blocks * BLOCK;
        let punched = rustix::fs::fallocate(
            &self.file,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            offset,
            len,
        );
        if punched.is_err() {
            // No hole punching here: zeros serve the same contract (unmapped reads as zero).
            let zeros = vec![0u8; (1 << 20).min(len as usize)];
            let mut at = 0u64;
            while at < len {
                let n = (zeros.len() as u64).min(len - at) as usize;
                self.file.write_all_at(&zeros[..n], offset + at)?;
                at += n as u64;
            }
        }
        Ok(())
    }
    fn flush(&self) -> Result<(), DeviceError> {
        self.file.sync_data()?;
        Ok(())
    }
    fn mapping_status(&self, lba: u64) -> Result<(bool, u64), DeviceError> {
        if lba >= self.block_count {
            return Err(DeviceError::OutOfRange {
                lba,
                blocks: 1,
                block_count: self.block_count,
            });
        }
        let offset = lba * BLOCK;
        let end = self.block_count * BLOCK;
        let data = rustix::fs::seek(&self.file, rustix::fs::SeekFrom::Data(offset));
        let (mapped, until) = match data {
            Ok(d) if d == offset => {
                let hole =
                    rustix::fs::seek(&self.file, rustix::fs::SeekFrom::Hole(offset)).unwrap_or(end);
                (true, hole.min(end))
            }
            Ok(d) => (false, d.min(end)),
            // ENXIO: no data past offset, a hole to the end.
            Err(rustix::io::Errno::NXIO) => (false, end),
            Err(_) => (true, end),
        };
        // Whole blocks only; a partial block at the edge counts with this run.
        let run = (until.saturating_sub(offset)).div_ceil(BLOCK).max(1);
        Ok((mapped, run.min(self.block_count - lba)))
    }
}
