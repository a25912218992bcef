//! A minimal NBD client (fixed newstyle handshake, `NBD_OPT_EXPORT_NAME`, `NBD_CMD_READ`), used
//! to stream the raw contents of a qcow2/VHD/VHDX/VMDK image out of `qemu-nbd`.
//!
//! Why NBD: `qemu-img convert` insists on a regular file as its raw output (it resizes and seeks
//! it), so it cannot write into a pipe; `qemu-nbd` (same Debian package, qemu-utils) serves the
//! guest-visible bytes of any format qemu reads, and reading them in order keeps memory bounded.
//! Only what an import needs: sequential reads of one read-only export.

use std::io::{self, Read, Write};

const INIT_MAGIC: &[u8; 8] = b"NBDMAGIC";
const OPTION_MAGIC: u64 = 0x4948_4156_454F_5054; // "IHAVEOPT"
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPTION_EXPORT_NAME: u32 = 1;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const COMMAND_READ: u16 = 0;
const COMMAND_DISCONNECT: u16 = 2;
/// Largest read asked for at once (qemu-nbd accepts 32 MiB).
const READ_LENGTH_MAX: usize = 1 << 20;

fn protocol_error(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("nbd: {message}"))
}

/// A connected NBD export, read sequentially from offset 0 through [`Read`].
pub struct NbdReader<S: Read + Write> {
    stream: S,
    size_bytes: u64,
    offset: u64,
    cookie: u64,
}

impl<S: Read + Write> NbdReader<S> {
    /// Runs the handshake on `stream` and selects the default export.
    pub fn connect(mut stream: S) -> io::Result<Self> {
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting)?;
        if &greeting[..8] != INIT_MAGIC || greeting[8..16] != OPTION_MAGIC.to_be_bytes() {
            return Err(protocol_error(format!(
                "not a newstyle server: {:02x?}",
                &greeting[..16]
            )));
        }
        let server_flags = u16::from_be_bytes([greeting[16], greeting[17]]);
        if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(protocol_error(format!(
                "server flags {server_flags:#x} lack fixed newstyle"
            )));
        }
        let client_flags = (server_flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)) as u32;
        let mut request = Vec::with_capacity(20);
        request.extend_from_slice(&client_flags.to_be_bytes());
        request.extend_from_slice(&OPTION_MAGIC.to_be_bytes());
        request.extend_from_slice(&OPTION_EXPORT_NAME.to_be_bytes());
        request.extend_from_slice(&0u32.to_be_bytes()); // default export: empty name
        stream.write_all(&request)?;
        stream.flush()?;
        let mut export = [0u8; 10];
        stream.read_exact(&mut export)?;
        let size_bytes = u64::from_be_bytes(export[..8].try_into().unwrap_or([0; 8]));
        if server_flags & FLAG_NO_ZEROES == 0 {
            let mut zeroes = [0u8; 124];
            stream.read_exact(&mut zeroes)?;
        }
        Ok(NbdReader {
            stream,
            size_bytes,
            offset: 0,
            cookie: 0,
        })
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn send_request(&mut self, command: u16, offset: u64, length: u32) -> io::Result<()> {
        self.cookie += 1;
        let mut request = [0u8; 28];
        request[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        request[6..8].copy_from_slice(&command.to_be_bytes());
        request[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        request[16..24].copy_from_slice(&offset.to_be_bytes());
        request[24..28].copy_from_slice(&length.to_be_bytes());
        self.stream.write_all(&request)?;
        self.stream.flush()
    }

    /// Politely ends the session.
    pub fn disconnect(mut self) -> io::Result<()> {
        self.send_request(COMMAND_DISCONNECT, 0, 0)
    }
}

impl<S: Read + Write> Read for NbdReader<S> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let remaining = self.size_bytes - self.offset;
        let length = (buffer.len() as u64)
            .min(remaining)
            .min(READ_LENGTH_MAX as u64) as usize;
        if length == 0 {
            return Ok(0);
        }
        self.send_request(COMMAND_READ, self.offset, length as u32)?;
        let mut reply = [0u8; 16];
        self.stream.read_exact(&mut reply)?;
        let magic = u32::from_be_bytes(reply[..4].try_into().unwrap_or([0; 4]));
        let error = u32::from_be_bytes(reply[4..8].try_into().unwrap_or([0; 4]));
        let cookie = u64::from_be_bytes(reply[8..16].try_into().unwrap_or([0; 8]));
        if magic != SIMPLE_REPLY_MAGIC || cookie != self.cookie {
            return Err(protocol_error(format!(
                "bad reply magic {magic:#x} cookie {cookie}"
            )));
        }
        if error != 0 {
            return Err(protocol_error(format!(
                "read of {length} bytes at offset {} failed with error {error}",
                self.offset
            )));
        }
        self.stream.read_exact(&mut buffer[..length])?;
        self.offset += length as u64;
        Ok(length)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A scripted server: replies are canned, requests are recorded.
    struct Scripted {
        replies: Cursor<Vec<u8>>,
        sent: Vec<u8>,
    }
    impl Read for Scripted {
        fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
            self.replies.read(buffer)
        }
    }
    impl Write for Scripted {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            self.sent.extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn handshake_and_read() {
        let mut replies = Vec::new();
        replies.extend_from_slice(b"NBDMAGIC");
        replies.extend_from_slice(&OPTION_MAGIC.to_be_bytes());
        replies.extend_from_slice(&3u16.to_be_bytes());
        replies.extend_from_slice(&5u64.to_be_bytes());
        replies.extend_from_slice(&1u16.to_be_bytes());
        replies.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        replies.extend_from_slice(&0u32.to_be_bytes());
        replies.extend_from_slice(&1u64.to_be_bytes());
        replies.extend_from_slice(b"hello");
        let stream = Scripted {
            replies: Cursor::new(replies),
            sent: Vec::new(),
        };
        let mut reader = NbdReader::connect(stream).unwrap();
        assert_eq!(reader.size_bytes(), 5);
        let mut out = Vec::new();
        reader.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"hello");
        assert_eq!(&reader.stream.sent[..4], &3u32.to_be_bytes());
    }

    #[test]
    fn garbage_greeting_is_an_error() {
        let stream = Scripted {
            replies: Cursor::new(vec![7; 40]),
            sent: Vec::new(),
        };
        assert!(NbdReader::connect(stream).is_err());
        let stream = Scripted {
            replies: Cursor::new(vec![]),
            sent: Vec::new(),
        };
        assert!(NbdReader::connect(stream).is_err());
    }
}
