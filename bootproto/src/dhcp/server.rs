//! The tokio shell of the DHCP server: sockets, the wall clock, leadership checks, and lease
//! commits batched through a [`LeaseCommitter`] before the DHCPACK is sent.
//!
//! Flow: receive a datagram; if the directory says we are not the leader, drop it; if the
//! leadership epoch changed, rebuild the lease book from [`BootDirectory::leases`]; ask the core;
//! send replies at once, but queue `CommitThenReply` decisions to the commit task, which gathers
//! what is queued into one `commit_leases` call (up to `commit_batch_max`, with at most
//! `commits_in_flight_max` calls in flight) and sends each ACK only after its batch committed.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, Semaphore};

use super::config::{ConfigError, DhcpConfig, DhcpMode};
use super::core::{Decision, DhcpCore, Packet, Reply};
use super::{BootDirectory, Lease, LeaseCommitter};

/// Why the DHCP server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum DhcpServerError {
    #[error("invalid dhcp config: {0}")]
    Config(#[from] ConfigError),
    #[error("cannot bind dhcp socket {address}: {source}")]
    Bind {
        address: SocketAddrV4,
        source: std::io::Error,
    },
    #[error("cannot bind dhcp socket to interface {interface:?}: {source}")]
    Interface {
        interface: String,
        source: std::io::Error,
    },
    #[error("dhcp socket receive failed: {0}")]
    Receive(std::io::Error),
}

/// A DHCP server (full or proxy mode) bound to its sockets, ready to [`run`](Self::run).
pub struct DhcpServer<D, C> {
    shared: Arc<Shared<D, C>>,
    sockets: Vec<(Arc<UdpSocket>, u16)>,
}

struct Shared<D, C> {
    core: Mutex<DhcpCore>,
    directory: Arc<D>,
    committer: Arc<C>,
    reply_socket: Arc<UdpSocket>,
}

struct PendingCommit {
    lease: Lease,
    reply: Option<Reply>,
}

impl<D: BootDirectory, C: LeaseCommitter> DhcpServer<D, C> {
    /// Validates `config` and binds `bind_ip:server_port` (and `bind_ip:proxy_port` in proxy
    /// mode), with SO_BROADCAST and, when `interface` is set, SO_BINDTODEVICE.
    pub async fn bind(
        config: DhcpConfig,
        directory: Arc<D>,
        committer: Arc<C>,
    ) -> Result<Self, DhcpServerError> {
        let core = DhcpCore::new(config.clone())?;
        let mut ports = vec![config.server_port];
        if config.mode == DhcpMode::Proxy {
            ports.push(config.proxy_port);
        }
        let mut sockets = Vec::new();
        for port in ports {
            let socket = bind_socket(
                SocketAddrV4::new(config.bind_ip, port),
                config.interface.as_deref(),
            )?;
            sockets.push((Arc::new(socket), port));
        }
        let reply_socket = sockets[0].0.clone();
        Ok(DhcpServer {
            shared: Arc::new(Shared {
                core: Mutex::new(core),
                directory,
                committer,
                reply_socket,
            }),
            sockets,
        })
    }

    /// Local addresses of the bound sockets (server port first).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.sockets
            .iter()
            .filter_map(|(s, _)| s.local_addr().ok())
            .collect()
    }

    /// Serves until a socket fails. Cancel by dropping the future (or aborting its task).
    pub async fn run(self) -> Result<(), DhcpServerError> {
        let config = lock(&self.shared.core).config().clone();
        let (commit_tx, commit_rx) = mpsc::channel::<PendingCommit>(config.commit_queue_max);
        let committer_task = tokio::spawn(commit_loop(
            self.shared.clone(),
            commit_rx,
            config.commit_batch_max,
            config.commits_in_flight_max,
        ));
        let mut receivers = tokio::task::JoinSet::new();
        for (socket, port) in self.sockets {
            receivers.spawn(receive_loop(
                self.shared.clone(),
                socket,
                port,
                commit_tx.clone(),
            ));
        }
        drop(commit_tx);
        let result = match receivers.join_next().await {
            Some(Ok(result)) => result,
            Some(Err(join)) => Err(DhcpServerError::Receive(std::io::Error::other(
                join.to_string(),
            ))),
            None => Ok(()),
        };
        receivers.abort_all();
        committer_task.abort();
        result
    }
}

fn bind_socket(
    address: SocketAddrV4,
    interface: Option<&str>,
) -> Result<UdpSocket, DhcpServerError> {
    let bind_error = |source| DhcpServerError::Bind { address, source };
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(bind_error)?;
    socket.set_reuse_address(true).map_err(bind_error)?;
    socket.set_broadcast(true).map_err(bind_error)?;
    socket.set_nonblocking(true).map_err(bind_error)?;
    // Bursts of relayed requests (perfdhcp, a rack powering on) must not be dropped by the kernel.
    let _ = socket.set_recv_buffer_size(4 << 20);
    if let Some(interface) = interface {
        socket
            .bind_device(Some(interface.as_bytes()))
            .map_err(|source| DhcpServerError::Interface {
                interface: interface.to_owned(),
                source,
            })?;
    }
    socket
        .bind(&SocketAddr::V4(address).into())
        .map_err(bind_error)?;
    UdpSocket::from_std(socket.into()).map_err(bind_error)
}

fn lock(core: &Mutex<DhcpCore>) -> MutexGuard<'_, DhcpCore> {
    // A panic while holding the lock would be a bug in the core; the book is still consistent
    // at every await point, so carry on with it.
    core.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn now_unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn receive_loop<D: BootDirectory, C: LeaseCommitter>(
    shared: Arc<Shared<D, C>>,
    socket: Arc<UdpSocket>,
    port: u16,
    commits: mpsc::Sender<PendingCommit>,
) -> Result<(), DhcpServerError> {
    let mut buffer = vec![0u8; 2048];
    loop {
        let (len, source) = match socket.recv_from(&mut buffer).await {
            Ok(received) => received,
            // ICMP errors from earlier sends surface here on Linux; they are not fatal.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
            Err(e) => return Err(DhcpServerError::Receive(e)),
        };
        let SocketAddr::V4(source) = source else {
            continue;
        };
        let Some(epoch) = shared.directory.leader_epoch() else {
            tracing::trace!(%source, "dhcp request ignored: not the leader");
            continue;
        };
        let now = now_unix_secs();
        let outcome = {
            let mut core = lock(&shared.core);
            if core.epoch() != Some(epoch) {
                let leases = shared.directory.leases();
                tracing::info!(
                    epoch,
                    leases = leases.len(),
                    "dhcp lease book rebuilt for new leadership"
                );
                core.handle_leadership(epoch, &leases);
            }
            core.handle_packet(
                now,
                Packet {
                    bytes: &buffer[..len],
                    source,
                    local_port: port,
                },
                &*shared.directory,
            )
        };
        if let Some(discovered) = outcome.discovered {
            tracing::debug!(client_mac = %discovered.mac, "dhcp unknown client discovered");
            shared.directory.record_discovered(discovered);
        }
        match outcome.decision {
            Decision::Ignore(reason) => {
                crate::metrics::dhcp_request(reason.as_str());
                tracing::trace!(?reason, %source, "dhcp request ignored");
            }
            Decision::Reply(reply) => {
                crate::metrics::dhcp_request(reply_kind(&reply));
                send_reply(&socket, &reply).await
            }
            Decision::CommitThenReply { lease, reply } => {
                crate::metrics::dhcp_request(if reply.is_some() {
                    "commit_then_ack"
                } else {
                    "commit_release"
                });
                if let Err(
                    mpsc::error::TrySendError::Full(pending)
                    | mpsc::error::TrySendError::Closed(pending),
                ) = commits.try_send(PendingCommit { lease, reply })
                {
                    crate::metrics::dhcp_commit_queue_full();
                    tracing::warn!(client_mac = %pending.lease.mac, "dhcp commit queue full: request dropped");
                    lock(&shared.core).handle_commit(&pending.lease, false, now);
                }
            }
        }
    }
}

fn reply_kind(reply: &Reply) -> &'static str {
    use dhcproto::v4::MessageType;
    match reply.message.opts().msg_type() {
        Some(MessageType::Offer) => "offer",
        Some(MessageType::Ack) => "ack",
        Some(MessageType::Nak) => "nak",
        _ => "other",
    }
}

async fn send_reply(socket: &UdpSocket, reply: &Reply) {
    match reply.encode() {
        Ok(bytes) => {
            if let Err(e) = socket.send_to(&bytes, reply.to).await {
                tracing::debug!(to = %reply.to, error = %e, "dhcp reply not sent");
            }
        }
        Err(e) => tracing::warn!(error = %e, "dhcp reply not encodable"),
    }
}

async fn commit_loop<D: BootDirectory, C: LeaseCommitter>(
    shared: Arc<Shared<D, C>>,
    mut queue: mpsc::Receiver<PendingCommit>,
    batch_max: usize,
    in_flight_max: usize,
) {
    let in_flight = Arc::new(Semaphore::new(in_flight_max));
    loop {
        // Wait for a free commit slot first, so that requests pile up into bigger batches while
        // all slots are busy.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = queue.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < batch_max {
            match queue.try_recv() {
                Ok(pending) => batch.push(pending),
                Err(_) => break,
            }
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            let leases: Vec<Lease> = batch.iter().map(|p| p.lease.clone()).collect();
            let started = std::time::Instant::now();
            let result = shared.committer.commit_leases(leases).await;
            crate::metrics::dhcp_commit(batch.len(), started.elapsed(), result.is_ok());
            let now = now_unix_secs();
            {
                let mut core = lock(&shared.core);
                for pending in &batch {
                    core.handle_commit(&pending.lease, result.is_ok(), now);
                }
            }
            match result {
                Ok(()) => {
                    for pending in &batch {
                        if let Some(reply) = &pending.reply {
                            send_reply(&shared.reply_socket, reply).await;
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, leases = batch.len(), "dhcp lease commit failed: no ack sent")
                }
            }
            drop(permit);
        });
    }
}

/// The unspecified address as a convenience for configs binding every interface.
pub const ANY: Ipv4Addr = Ipv4Addr::UNSPECIFIED;
