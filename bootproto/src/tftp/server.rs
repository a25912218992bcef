//! The tokio shell of the TFTP server: one listening socket for requests, one new socket (a new
//! transfer ID, as RFC 1350 says) per transfer, at most `transfers_max` transfers at once.

use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;

use super::transfer::{
    check_filename, ReadTransfer, Refusal, TransferLimits, TransferState, Transmit,
};
use super::wire::{self, ErrorCode, Packet};

/// TFTP server configuration (plain data, read by the node from TOML).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TftpConfig {
    /// Listening address, 0.0.0.0:69 by default.
    #[serde(default = "default_bind")]
    pub bind: SocketAddr,
    /// The only directory served (Debian's ipxe package: /usr/lib/ipxe).
    #[serde(default = "default_root")]
    pub root: PathBuf,
    /// Concurrent transfers at most; requests beyond get ERROR 0 "server busy".
    #[serde(default = "default_transfers_max")]
    pub transfers_max: usize,
    #[serde(default, flatten)]
    pub limits: TransferLimits,
}

impl TftpConfig {
    pub fn new(bind: SocketAddr, root: impl Into<PathBuf>) -> TftpConfig {
        TftpConfig {
            bind,
            root: root.into(),
            transfers_max: default_transfers_max(),
            limits: TransferLimits::default(),
        }
    }
}

fn default_bind() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 69))
}
fn default_root() -> PathBuf {
    PathBuf::from("/usr/lib/ipxe")
}
fn default_transfers_max() -> usize {
    64
}

/// Why the TFTP server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum TftpServerError {
    #[error("tftp root {path}: {source}")]
    Root {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot bind tftp socket {address}: {source}")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("tftp socket receive failed: {0}")]
    Receive(std::io::Error),
}

/// A read-only TFTP server bound to its socket, ready to [`run`](Self::run).
pub struct TftpServer {
    socket: UdpSocket,
    root: PathBuf,
    config: TftpConfig,
}

impl TftpServer {
    pub async fn bind(config: TftpConfig) -> Result<TftpServer, TftpServerError> {
        let root = std::fs::canonicalize(&config.root).map_err(|source| TftpServerError::Root {
            path: config.root.clone(),
            source,
        })?;
        let socket =
            UdpSocket::bind(config.bind)
                .await
                .map_err(|source| TftpServerError::Bind {
                    address: config.bind,
                    source,
                })?;
        Ok(TftpServer {
            socket,
            root,
            config,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Serves until the socket fails. Cancel by dropping the future (or aborting its task);
    /// running transfers then finish on their own.
    pub async fn run(self) -> Result<(), TftpServerError> {
        let slots = Arc::new(Semaphore::new(self.config.transfers_max));
        let root = Arc::new(self.root);
        let limits = Arc::new(self.config.limits);
        let local_ip = self
            .socket
            .local_addr()
            .map_err(TftpServerError::Receive)?
            .ip();
        let mut buffer = vec![0u8; 1024];
        loop {
            let (len, peer) = match self.socket.recv_from(&mut buffer).await {
                Ok(received) => received,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(TftpServerError::Receive(e)),
            };
            let request = match wire::parse(&buffer[..len]) {
                Ok(Packet::Rrq {
                    filename,
                    mode,
                    options,
                }) => (filename, mode, options),
                Ok(Packet::Wrq { filename, .. }) => {
                    tracing::debug!(%peer, filename, "tftp write request refused");
                    let _ = self
                        .socket
                        .send_to(
                            &wire::error(
                                ErrorCode::IllegalOperation,
                                "read-only server: write refused",
                            ),
                            peer,
                        )
                        .await;
                    continue;
                }
                Ok(Packet::Error { .. }) => continue,
                Ok(_) => {
                    // DATA, ACK or OACK on the request port: not part of any transfer here.
                    let _ = self
                        .socket
                        .send_to(
                            &wire::error(ErrorCode::UnknownTransferId, "no transfer on this port"),
                            peer,
                        )
                        .await;
                    continue;
                }
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "tftp bad request");
                    let _ = self
                        .socket
                        .send_to(
                            &wire::error(ErrorCode::IllegalOperation, &e.to_string()),
                            peer,
                        )
                        .await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                crate::metrics::tftp_transfer("busy");
                let _ = self
                    .socket
                    .send_to(
                        &wire::error(ErrorCode::NotDefined, "server busy, try again"),
                        peer,
                    )
                    .await;
                continue;
            };
            let (root, limits) = (root.clone(), limits.clone());
            tokio::spawn(async move {
                let (filename, mode, options) = request;
                match serve(&root, &limits, local_ip, peer, &filename, &mode, &options).await {
                    Ok(()) => crate::metrics::tftp_transfer("finished"),
                    Err(e) => {
                        crate::metrics::tftp_transfer("failed");
                        tracing::debug!(%peer, filename, error = %e, "tftp transfer ended with an error");
                    }
                }
                drop(permit);
            });
        }
    }
}

/// Opens `filename` under `root` (canonical), refusing anything that resolves outside it.
pub fn open_confined(root: &Path, filename: &str) -> Result<(std::fs::File, u64), Refusal> {
    let parts = check_filename(filename)?;
    let mut path = root.to_path_buf();
    path.extend(parts);
    let resolved = match std::fs::canonicalize(&path) {
        Ok(resolved) => resolved,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Refusal::new(
                ErrorCode::FileNotFound,
                format!("file not found: {filename:?}"),
            ))
        }
        Err(_) => {
            return Err(Refusal::new(
                ErrorCode::AccessViolation,
                format!("access denied: {filename:?}"),
            ))
        }
    };
    if !resolved.starts_with(root) {
        return Err(Refusal::new(
            ErrorCode::AccessViolation,
            format!("outside the tftp root: {filename:?}"),
        ));
    }
    let file = std::fs::File::open(&resolved).map_err(|_| {
        Refusal::new(
            ErrorCode::AccessViolation,
            format!("access denied: {filename:?}"),
        )
    })?;
    let metadata = file.metadata().map_err(|_| {
        Refusal::new(
            ErrorCode::AccessViolation,
            format!("access denied: {filename:?}"),
        )
    })?;
    if !metadata.is_file() {
        return Err(Refusal::new(
            ErrorCode::AccessViolation,
            format!("not a regular file: {filename:?}"),
        ));
    }
    Ok((file, metadata.len()))
}

async fn serve(
    root: &Path,
    limits: &TransferLimits,
    local_ip: std::net::IpAddr,
    peer: SocketAddr,
    filename: &str,
    mode: &str,
    options: &[(String, String)],
) -> std::io::Result<()> {
    // A new socket is this transfer's ID (RFC 1350 section 4).
    let socket = UdpSocket::bind(SocketAddr::new(local_ip, 0)).await?;
    let socket = &socket;
    let refuse = |refusal: Refusal| async move {
        let _ = socket
            .send_to(&wire::error(refusal.code, &refusal.message), peer)
            .await;
        Err(std::io::Error::other(refusal.message))
    };
    if mode != "octet" && mode != "netascii" {
        return refuse(Refusal::new(
            ErrorCode::IllegalOperation,
            format!("unsupported mode {mode:?}"),
        ))
        .await;
    }
    let root_owned = root.to_path_buf();
    let name = filename.to_owned();
    let opened = tokio::task::spawn_blocking(move || open_confined(&root_owned, &name))
        .await
        .map_err(std::io::Error::other)?;
    let (file, size) = match opened {
        Ok(opened) => opened,
        Err(refusal) => return refuse(refusal).await,
    };
    let mut transfer = match ReadTransfer::start(options, size, limits, Instant::now()) {
        Ok(transfer) => transfer,
        Err(refusal) => return refuse(refusal).await,
    };
    tracing::debug!(%peer, filename, size, block_size = transfer.block_size(), window_size = transfer.window_size(), "tftp transfer started");
    let mut packet = vec![0u8; 4 + transfer.block_size() as usize];
    let mut incoming = vec![0u8; 1024];
    loop {
        while let Some(transmit) = transfer.poll_transmit() {
            match transmit {
                Transmit::Oack(options) => {
                    socket
                        .send_to(&wire::encode(&Packet::Oack { options }), peer)
                        .await?;
                }
                Transmit::Data { block, offset, len } => {
                    packet[..4].copy_from_slice(&wire::data_header(block));
                    file.read_exact_at(&mut packet[4..4 + len], offset)?;
                    socket.send_to(&packet[..4 + len], peer).await?;
                }
            }
        }
        match transfer.state() {
            TransferState::Finished => return Ok(()),
            TransferState::Failed => {
                return Err(std::io::Error::other(
                    "transfer failed (timeout or client error)",
                ))
            }
            TransferState::Running => {}
        }
        let Some(deadline) = transfer.poll_timeout() else {
            return Ok(());
        };
        match tokio::time::timeout_at(deadline.into(), socket.recv_from(&mut incoming)).await {
            Err(_elapsed) => transfer.handle_timeout(Instant::now()),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                transfer.handle_error()
            }
            Ok(Err(e)) => return Err(e),
            Ok(Ok((_, from))) if from != peer => {
                let _ = socket
                    .send_to(
                        &wire::error(ErrorCode::UnknownTransferId, "unknown transfer id"),
                        from,
                    )
                    .await;
            }
            Ok(Ok((len, _))) => match wire::parse(&incoming[..len]) {
                Ok(Packet::Ack { block }) => transfer.handle_ack(Instant::now(), block),
                Ok(Packet::Error { .. }) => transfer.handle_error(),
                _ => {
                    let _ = socket
                        .send_to(
                            &wire::error(ErrorCode::IllegalOperation, "expected an ack"),
                            peer,
                        )
                        .await;
                    transfer.handle_error();
                }
            },
        }
    }
}
