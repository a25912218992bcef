//! TFTP: read-only, confined to its root, with blksize, tsize, timeout (RFC 2347-2349) and
//! windowsize (RFC 7440). [`wire`] parses and encodes packets, [`transfer`] is the sans-IO
//! per-transfer state machine, [`server`] the tokio shell.

pub mod server;
pub mod transfer;
pub mod wire;

pub use server::{TftpConfig, TftpServer, TftpServerError};
pub use transfer::TransferLimits;
