//! Sans-IO state machine of one read transfer (RFC 1350 with RFC 2347-2349 options and RFC 7440
//! windowsize), plus the pure filename check.
//!
//! The shell creates a [`ReadTransfer`] once it knows the file's size, sends whatever
//! [`ReadTransfer::poll_transmit`] yields (reading DATA payloads from the file at the given
//! offset), feeds ACKs with [`ReadTransfer::handle_ack`] and wakes it at
//! [`ReadTransfer::poll_timeout`] with [`ReadTransfer::handle_timeout`].
//!
//! Duplicate or late ACKs never trigger retransmission (no Sorcerer's Apprentice); only a
//! timeout resends, from the first unacknowledged block.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::wire::ErrorCode;

/// Limits of the TFTP server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferLimits {
    /// Largest block size granted (RFC 2348 allows up to 65464).
    #[serde(default = "default_block_size_bytes_max")]
    pub block_size_bytes_max: u16,
    /// Largest window granted (RFC 7440).
    #[serde(default = "default_window_size_max")]
    pub window_size_max: u16,
    /// Retransmission timeout when the client asks none (RFC 2349 lets it choose 1-255 s).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Retransmissions of one window before giving up.
    #[serde(default = "default_retries_max")]
    pub retries_max: u32,
    /// Largest file served.
    #[serde(default = "default_file_size_bytes_max")]
    pub file_size_bytes_max: u64,
}

impl Default for TransferLimits {
    fn default() -> Self {
        TransferLimits {
            block_size_bytes_max: default_block_size_bytes_max(),
            window_size_max: default_window_size_max(),
            timeout_ms: default_timeout_ms(),
            retries_max: default_retries_max(),
            file_size_bytes_max: default_file_size_bytes_max(),
        }
    }
}

fn default_block_size_bytes_max() -> u16 {
    // Fits a 1500-byte MTU: 1500 - 20 (IPv4) - 8 (UDP) - 4 (TFTP header).
    1468
}
fn default_window_size_max() -> u16 {
    16
}
fn default_timeout_ms() -> u64 {
    1000
}
fn default_retries_max() -> u32 {
    5
}
fn default_file_size_bytes_max() -> u64 {
    256 << 20
}

/// A request refused, with the TFTP error to send.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

/// Checks a requested filename lexically: relative, no `..`, no NUL or backslash, not empty.
/// Returns the path components to join under the root. The shell must still resolve symlinks
/// and check the result stays inside the root.
pub fn check_filename(filename: &str) -> Result<Vec<&str>, Refusal> {
    let refuse = |why: &str| {
        Refusal::new(
            ErrorCode::AccessViolation,
            format!(
                "{why}: {:?}",
                filename.chars().take(128).collect::<String>()
            ),
        )
    };
    if filename.is_empty() || filename.len() > 255 {
        return Err(refuse("bad filename length"));
    }
    if filename.starts_with('/') {
        return Err(refuse("absolute path refused"));
    }
    if filename.contains('\0') || filename.contains('\\') {
        return Err(refuse("bad character in filename"));
    }
    let mut parts = Vec::new();
    for part in filename.split('/') {
        match part {
            "" | "." => continue,
            ".." => return Err(refuse("parent directory refused")),
            part => parts.push(part),
        }
    }
    if parts.is_empty() {
        return Err(refuse("no file named"));
    }
    Ok(parts)
}

/// What to send next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transmit {
    /// OACK with these options (answer to the request's options).
    Oack(Vec<(String, String)>),
    /// DATA `block` (wire number) holding `len` bytes of the file from `offset`.
    Data { block: u16, offset: u64, len: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferState {
    Running,
    Finished,
    /// Gave up after `retries_max` timeouts, or the client sent an ERROR.
    Failed,
}

/// One read transfer.
#[derive(Debug, Clone)]
pub struct ReadTransfer {
    file_size: u64,
    block_size: u64,
    window_size: u64,
    timeout: Duration,
    retries_max: u32,
    /// Total blocks; the last one is shorter than `block_size` (possibly empty).
    blocks: u64,
    /// Highest block index acknowledged (0: none; the OACK is acknowledged by ACK 0).
    acked: u64,
    /// Next block index to send.
    next: u64,
    oack: Option<Vec<(String, String)>>,
    oack_sent: bool,
    retries: u32,
    deadline: Instant,
    state: TransferState,
}

impl ReadTransfer {
    /// Negotiates `options` (from the RRQ) for a file of `file_size` bytes.
    pub fn start(
        options: &[(String, String)],
        file_size: u64,
        limits: &TransferLimits,
        now: Instant,
    ) -> Result<ReadTransfer, Refusal> {
        if file_size > limits.file_size_bytes_max {
            return Err(Refusal::new(
                ErrorCode::NotDefined,
                format!(
                    "file of {file_size} bytes above the limit of {}",
                    limits.file_size_bytes_max
                ),
            ));
        }
        let mut block_size: u64 = 512;
        let mut window_size: u64 = 1;
        let mut timeout = Duration::from_millis(limits.timeout_ms);
        let mut accepted = Vec::new();
        for (name, value) in options {
            let number = || {
                value.parse::<u64>().map_err(|_| {
                    Refusal::new(
                        ErrorCode::OptionRefused,
                        format!("option {name} has bad value {value:?}"),
                    )
                })
            };
            match name.as_str() {
                "blksize" => {
                    let asked = number()?;
                    if !(8..=65464).contains(&asked) {
                        return Err(Refusal::new(
                            ErrorCode::OptionRefused,
                            format!("blksize {asked} outside 8-65464"),
                        ));
                    }
                    block_size = asked.min(u64::from(limits.block_size_bytes_max.max(8)));
                    accepted.push((name.clone(), block_size.to_string()));
                }
                "tsize" => {
                    number()?;
                    accepted.push((name.clone(), file_size.to_string()));
                }
                "timeout" => {
                    let asked = number()?;
                    if !(1..=255).contains(&asked) {
                        return Err(Refusal::new(
                            ErrorCode::OptionRefused,
                            format!("timeout {asked} outside 1-255"),
                        ));
                    }
                    timeout = Duration::from_secs(asked);
                    accepted.push((name.clone(), asked.to_string()));
                }
                "windowsize" => {
                    let asked = number()?;
                    if !(1..=65535).contains(&asked) {
                        return Err(Refusal::new(
                            ErrorCode::OptionRefused,
                            format!("windowsize {asked} outside 1-65535"),
                        ));
                    }
                    window_size = asked.min(u64::from(limits.window_size_max.max(1)));
                    accepted.push((name.clone(), window_size.to_string()));
                }
                // RFC 2347: unknown options are ignored (left out of the OACK).
                _ => {}
            }
        }
        let blocks = file_size / block_size + 1;
        let oack = (!accepted.is_empty()).then_some(accepted);
        Ok(ReadTransfer {
            file_size,
            block_size,
            window_size,
            timeout,
            retries_max: limits.retries_max,
            blocks,
            acked: 0,
            next: if oack.is_some() { 0 } else { 1 },
            oack,
            oack_sent: false,
            retries: 0,
            deadline: now + timeout,
            state: TransferState::Running,
        })
    }

    pub fn state(&self) -> TransferState {
        self.state
    }

    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    pub fn window_size(&self) -> u64 {
        self.window_size
    }

    /// The next packet to send now, if any.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if self.state != TransferState::Running {
            return None;
        }
        if self.next == 0 {
            // Waiting for ACK 0 of the OACK.
            if self.oack_sent {
                return None;
            }
            self.oack_sent = true;
            return self.oack.clone().map(Transmit::Oack);
        }
        if self.next > self.blocks || self.next > self.acked + self.window_size {
            return None;
        }
        let index = self.next;
        self.next += 1;
        let offset = (index - 1) * self.block_size;
        let len = self.file_size.saturating_sub(offset).min(self.block_size) as usize;
        Some(Transmit::Data {
            block: index as u16,
            offset,
            len,
        })
    }

    /// When [`Self::handle_timeout`] must be called if nothing arrives.
    pub fn poll_timeout(&self) -> Option<Instant> {
        (self.state == TransferState::Running).then_some(self.deadline)
    }

    /// An ACK from the client's TID.
    pub fn handle_ack(&mut self, now: Instant, block: u16) {
        if self.state != TransferState::Running {
            return;
        }
        if self.next == 0 {
            if block == 0 && self.oack_sent {
                self.next = 1;
                self.retries = 0;
                self.deadline = now + self.timeout;
            }
            return;
        }
        // Map the 16-bit number onto the blocks in flight (acked, next).
        let diff = u64::from(block.wrapping_sub(self.acked as u16));
        let index = self.acked + diff;
        if diff == 0 || index >= self.next {
            return; // duplicate, late, or not sent yet: ignore
        }
        self.acked = index;
        self.retries = 0;
        self.deadline = now + self.timeout;
        if self.acked >= self.blocks {
            self.state = TransferState::Finished;
        }
    }

    /// An ERROR from the client: stop.
    pub fn handle_error(&mut self) {
        self.state = TransferState::Failed;
    }

    /// Called at or after [`Self::poll_timeout`]: resend from the first unacknowledged block.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state != TransferState::Running || now < self.deadline {
            return;
        }
        self.retries += 1;
        if self.retries > self.retries_max {
            self.state = TransferState::Failed;
            return;
        }
        if self.next == 0 {
            self.oack_sent = false;
        } else {
            self.next = self.acked + 1;
        }
        self.deadline = now + self.timeout;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    fn drain(t: &mut ReadTransfer) -> Vec<String> {
        std::iter::from_fn(|| t.poll_transmit())
            .map(|tx| match tx {
                Transmit::Oack(o) => format!("oack {o:?}"),
                Transmit::Data { block, offset, len } => format!("data {block}@{offset}+{len}"),
            })
            .collect()
    }

    #[test]
    fn filenames_are_confined() {
        assert_eq!(
            check_filename("ipxe/undionly.kpxe").unwrap(),
            vec!["ipxe", "undionly.kpxe"]
        );
        assert_eq!(check_filename("./a//b").unwrap(), vec!["a", "b"]);
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a\\b",
            "a\0b",
            ".",
            "./",
        ] {
            assert_eq!(
                check_filename(bad).unwrap_err().code,
                ErrorCode::AccessViolation,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn plain_transfer_lock_step_ignores_duplicate_acks() {
        let now = Instant::now();
        let mut t = ReadTransfer::start(&[], 1024, &TransferLimits::default(), now).unwrap();
        assert_eq!(drain(&mut t), ["data 1@0+512"]);
        t.handle_ack(now, 1);
        assert_eq!(drain(&mut t), ["data 2@512+512"]);
        t.handle_ack(now, 1);
        assert_eq!(
            drain(&mut t),
            Vec::<String>::new(),
            "duplicate ack sends nothing"
        );
        t.handle_ack(now, 2);
        assert_eq!(
            drain(&mut t),
            ["data 3@1024+0"],
            "a multiple of 512 ends with an empty block"
        );
        t.handle_ack(now, 3);
        assert_eq!(t.state(), TransferState::Finished);
    }

    #[test]
    fn options_are_negotiated_and_window_resends_after_timeout() {
        let now = Instant::now();
        let limits = TransferLimits {
            window_size_max: 4,
            ..TransferLimits::default()
        };
        let o = opts(&[
            ("blksize", "1024"),
            ("tsize", "0"),
            ("windowsize", "8"),
            ("foo", "1"),
            ("timeout", "2"),
        ]);
        let mut t = ReadTransfer::start(&o, 5000, &limits, now).unwrap();
        assert_eq!(
            drain(&mut t),
            [
                r#"oack [("blksize", "1024"), ("tsize", "5000"), ("windowsize", "4"), ("timeout", "2")]"#
            ]
        );
        t.handle_ack(now, 0);
        assert_eq!(
            drain(&mut t),
            [
                "data 1@0+1024",
                "data 2@1024+1024",
                "data 3@2048+1024",
                "data 4@3072+1024"
            ]
        );
        t.handle_ack(now, 2);
        assert_eq!(drain(&mut t), ["data 5@4096+904"]);
        assert_eq!(t.poll_timeout(), Some(now + Duration::from_secs(2)));
        t.handle_timeout(now + Duration::from_secs(2));
        assert_eq!(
            drain(&mut t),
            ["data 3@2048+1024", "data 4@3072+1024", "data 5@4096+904"]
        );
        t.handle_ack(now, 5);
        assert_eq!(t.state(), TransferState::Finished);
    }

    #[test]
    fn bad_options_and_big_files_are_refused() {
        let now = Instant::now();
        let limits = TransferLimits {
            file_size_bytes_max: 100,
            ..TransferLimits::default()
        };
        assert_eq!(
            ReadTransfer::start(&[], 101, &limits, now)
                .unwrap_err()
                .code,
            ErrorCode::NotDefined
        );
        for bad in [
            ("blksize", "7"),
            ("blksize", "x"),
            ("timeout", "0"),
            ("windowsize", "0"),
        ] {
            assert_eq!(
                ReadTransfer::start(&opts(&[bad]), 10, &limits, now)
                    .unwrap_err()
                    .code,
                ErrorCode::OptionRefused
            );
        }
    }

    #[test]
    fn gives_up_after_retries_and_block_numbers_roll_over() {
        let now = Instant::now();
        let limits = TransferLimits {
            retries_max: 2,
            ..TransferLimits::default()
        };
        let mut t = ReadTransfer::start(&[], 10, &limits, now).unwrap();
        drain(&mut t);
        for i in 1..=3 {
            t.handle_timeout(now + Duration::from_secs(i));
        }
        assert_eq!(t.state(), TransferState::Failed);

        let big = 512 * 70_000;
        let mut t = ReadTransfer::start(
            &[],
            big,
            &TransferLimits {
                file_size_bytes_max: big,
                ..limits
            },
            now,
        )
        .unwrap();
        for block in 1..=70_001u64 {
            let sent = t.poll_transmit().unwrap();
            assert!(matches!(sent, Transmit::Data { block: b, .. } if b == block as u16));
            t.handle_ack(now, block as u16);
        }
        assert_eq!(t.state(), TransferState::Finished);
    }
}
