//! QUIC transport for node-to-node RPC (quinn, mutual TLS from the cluster CA).
//!
//! One connection per peer, reopened when it fails; one bidirectional stream per RPC carrying one
//! request frame and one response frame; one-way streams of frames for the data path's mirror
//! (`streams`). The server learns the peer's node id from its
//! certificate and refuses a request that claims another id.
//!
//! Stateless resets: each node derives its QUIC reset key from its private key, so a node that
//! crashed and restarted on the same address answers packets of its peers' stale connections with
//! a reset they accept, and they redial at once. With a random key per process those connections
//! would hang until the idle timeout, and the restarted node would hear no heartbeat meanwhile
//! and start elections that depose a healthy leader (openraft 0.9 has no pre-vote).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint};
use rustls_pki_types::CertificateDer;

use crate::domain::NodeId;
use crate::rpc::{
    decode_body, encode_frame, frame_length, RequestEnvelope, RpcHandler, RpcRequest, RpcResponse,
    Transport, TransportError, FRAME_BYTES_MAX,
};
use crate::tls::{self, NodeIdentity, TlsError, ALPN_RAFT};
use crate::types::NodeAddress;

/// How long a server waits for a request's bytes once its stream is open.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a handshake: a peer that does not answer within it is unreachable (and a
/// caller may safely retry elsewhere, since nothing was sent).
const CONNECT_TIMEOUT: Duration = Duration::from_millis(250);
/// Concurrent RPCs one peer may have open on a connection.
const STREAMS_PER_CONNECTION_MAX: u32 = 1024;
/// Concurrent one-way streams one peer may have open on a connection.
const UNI_STREAMS_PER_CONNECTION_MAX: u32 = 16;

#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    #[error("tls: {0}")]
    Tls(#[from] TlsError),
    #[error("quic configuration: {0}")]
    Config(String),
    #[error("cannot bind {address}: {error}")]
    Bind {
        address: SocketAddr,
        error: std::io::Error,
    },
}

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut config = quinn::TransportConfig::default();
    config.keep_alive_interval(Some(Duration::from_millis(500)));
    if let Ok(idle) = Duration::from_secs(5).try_into() {
        config.max_idle_timeout(Some(idle));
    }
    config.max_concurrent_bidi_streams(STREAMS_PER_CONNECTION_MAX.into());
    // One-way message streams (`streams`): one per peer and direction, a few spare for
    // reopening.
    config.max_concurrent_uni_streams(UNI_STREAMS_PER_CONNECTION_MAX.into());
    // Room for the mirror's in-flight writes (64 MiB per stream by default).
    config.stream_receive_window((64u32 << 20).into());
    config.receive_window((128u32 << 20).into());
    config.send_window(128 << 20);
    // Path MTU discovery up to the largest UDP payload (quinn stops at 1452 by default): a
    // storage LAN with jumbo frames, or loopback, carries a mirrored write in a few packets
    // instead of one per 1.4 KiB (each sealed and sent on its own); on a 1500-byte LAN it
    // settles where it would anyway.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(u16::MAX);
    config.mtu_discovery_config(Some(mtu));
    Arc::new(config)
}

/// Binds a QUIC endpoint that serves RPCs (clients must hold a cluster certificate) and can dial
/// peers with this node's certificate.
pub fn bind_endpoint(identity: &NodeIdentity, listen: SocketAddr) -> Result<Endpoint, QuicError> {
    let server_tls = identity.server_config(true, &[ALPN_RAFT])?;
    let server_crypto =
        QuicServerConfig::try_from(server_tls).map_err(|e| QuicError::Config(e.to_string()))?;
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
    server_config.transport_config(transport_config());
    let bind_error = |error| QuicError::Bind {
        address: listen,
        error,
    };
    let socket = std::net::UdpSocket::bind(listen).map_err(bind_error)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| QuicError::Config("no async runtime for quinn".into()))?;
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(ResetKey::of(identity)));
    // quinn's default generator drops packets whose connection ids another process issued
    // before any reset could be sent; these ids are random and not checked.
    endpoint_config.cid_generator(|| Box::new(RandomConnectionIds));
    let mut endpoint =
        Endpoint::new(endpoint_config, Some(server_config), socket, runtime).map_err(bind_error)?;
    endpoint.set_default_client_config(client_config(identity)?);
    Ok(endpoint)
}

/// The key of this node's stateless reset tokens (keyed BLAKE3 as the MAC), derived from its
/// private key: the same after a restart, unknown to anyone without that key.
struct ResetKey([u8; 32]);

impl ResetKey {
    fn of(identity: &NodeIdentity) -> ResetKey {
        ResetKey(blake3::derive_key(
            "cairn 2026 quic stateless reset key",
            identity.key_pem.as_bytes(),
        ))
    }
}

impl quinn::crypto::HmacKey for ResetKey {
    fn sign(&self, data: &[u8], signature_out: &mut [u8]) {
        let mut hasher = blake3::Hasher::new_keyed(&self.0);
        hasher.update(data);
        hasher.finalize_xof().fill(signature_out);
    }

    fn signature_len(&self) -> usize {
        32
    }

    fn verify(&self, data: &[u8], signature: &[u8]) -> Result<(), quinn::crypto::CryptoError> {
        let mut expected = vec![0u8; signature.len()];
        self.sign(data, &mut expected);
        // Constant time: every byte is compared.
        let difference = expected
            .iter()
            .zip(signature)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if difference == 0 && signature.len() == self.signature_len() {
            Ok(())
        } else {
            Err(quinn::crypto::CryptoError)
        }
    }
}

/// Random 8-byte connection ids from rustls' secure random source. They carry no key, so a
/// restarted process treats its predecessor's ids like its own and answers them with a reset.
struct RandomConnectionIds;

impl quinn::ConnectionIdGenerator for RandomConnectionIds {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let mut bytes = [0u8; 8];
        let random = rustls::crypto::ring::default_provider().secure_random;
        if random.fill(&mut bytes).is_err() {
            // Never seen in practice; ids only need to be unique among this node's connections.
            static FALLBACK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
            bytes = FALLBACK
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                .to_be_bytes();
        }
        quinn::ConnectionId::new(&bytes)
    }

    fn cid_len(&self) -> usize {
        8
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

fn client_config(identity: &NodeIdentity) -> Result<quinn::ClientConfig, QuicError> {
    let client_tls = identity.client_config(&[ALPN_RAFT])?;
    let client_crypto =
        QuicClientConfig::try_from(client_tls).map_err(|e| QuicError::Config(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(client_crypto));
    config.transport_config(transport_config());
    Ok(config)
}

/// The node id named by the certificate the peer presented on `connection`.
pub fn peer_node_id(connection: &Connection) -> Result<NodeId, TlsError> {
    let identity = connection.peer_identity().ok_or(TlsError::NoNodeId)?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| TlsError::NoNodeId)?;
    let leaf = chain.first().ok_or(TlsError::NoNodeId)?;
    tls::node_id_of_certificate(leaf.as_ref())
}

/// Serves RPCs on `endpoint` until it is closed: every accepted connection and stream is handled
/// by `handler`. Returns the accept loop's task.
pub fn serve<H: RpcHandler>(
    endpoint: Endpoint,
    handler: Arc<H>,
    streams: Arc<crate::streams::StreamHandler>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let handler = handler.clone();
            let streams = streams.clone();
            tokio::spawn(async move {
                let connection = match incoming.await {
                    Ok(connection) => connection,
                    Err(error) => {
                        tracing::warn!(%error, "peer handshake failed");
                        return;
                    }
                };
                let peer = match peer_node_id(&connection) {
                    Ok(peer) => peer,
                    Err(error) => {
                        tracing::warn!(%error, remote = %connection.remote_address(), "peer certificate names no node");
                        connection.close(1u32.into(), b"certificate names no node");
                        return;
                    }
                };
                let uni = connection.clone();
                tokio::spawn(async move {
                    while let Ok(recv) = uni.accept_uni().await {
                        tokio::spawn(crate::streams::read_frames(recv, peer, streams.clone()));
                    }
                });
                serve_connection(connection, peer, handler).await;
            });
        }
    })
}

async fn serve_connection<H: RpcHandler>(connection: Connection, peer: NodeId, handler: Arc<H>) {
    loop {
        let (mut send, mut recv) = match connection.accept_bi().await {
            Ok(streams) => streams,
            Err(_) => return,
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let request = match tokio::time::timeout(
                REQUEST_READ_TIMEOUT,
                read_frame::<RequestEnvelope>(&mut recv),
            )
            .await
            {
                Ok(Ok(request)) => request,
                Ok(Err(error)) => {
                    tracing::warn!(%error, peer, "bad rpc request");
                    let _ = respond(&mut send, &RpcResponse::Refused(error.to_string())).await;
                    return;
                }
                Err(_) => return,
            };
            let response = if request.from != peer {
                tracing::warn!(
                    peer,
                    claimed = request.from,
                    "peer claims another node id; refused"
                );
                RpcResponse::Refused(format!(
                    "certificate names node {peer}, request claims node {}",
                    request.from
                ))
            } else {
                // Followers' AppendEntries carrying entries are timed (their log sync included).
                let started = matches!(&request.request, RpcRequest::AppendEntries(rpc) if !rpc.entries.is_empty())
                    .then(std::time::Instant::now);
                let response = handler.handle(peer, request.request).await;
                if let Some(started) = started {
                    crate::metrics::append_entries_handled(started.elapsed().as_secs_f64());
                }
                response
            };
            let _ = respond(&mut send, &response).await;
        });
    }
}

async fn respond(
    send: &mut quinn::SendStream,
    response: &RpcResponse,
) -> Result<(), TransportError> {
    let frame = encode_frame(response)?;
    send.write_all(&frame)
        .await
        .map_err(|e| TransportError::Frame(e.to_string()))?;
    send.finish()
        .map_err(|e| TransportError::Frame(e.to_string()))?;
    Ok(())
}

async fn read_frame<T: serde::de::DeserializeOwned>(
    recv: &mut quinn::RecvStream,
) -> Result<T, TransportError> {
    let mut prefix = [0u8; 4];
    recv.read_exact(&mut prefix)
        .await
        .map_err(|e| TransportError::Frame(e.to_string()))?;
    let len = frame_length(prefix)?;
    debug_assert!(len <= FRAME_BYTES_MAX);
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| TransportError::Frame(e.to_string()))?;
    decode_body(&body)
}

/// The QUIC client side: cached connections to peers. Clones share the cache.
#[derive(Clone)]
pub struct QuicTransport {
    node_id: NodeId,
    endpoint: Endpoint,
    connections: Arc<Mutex<HashMap<NodeId, ConnectionSlot>>>,
}

/// The cached connection to one peer; the async lock makes concurrent callers share one dial.
type ConnectionSlot = Arc<tokio::sync::Mutex<Option<Connection>>>;

impl QuicTransport {
    /// `endpoint` must have a default client config (`bind_endpoint` sets it).
    pub fn new(node_id: NodeId, endpoint: Endpoint) -> QuicTransport {
        QuicTransport {
            node_id,
            endpoint,
            connections: Arc::default(),
        }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Opens a one-way stream to `target` on the cached connection (dialing it if needed).
    pub async fn open_uni(
        &self,
        target: NodeId,
        address: &NodeAddress,
    ) -> Result<quinn::SendStream, TransportError> {
        let connection = self.connection(target, address).await?;
        connection
            .open_uni()
            .await
            .map_err(|e| TransportError::Unreachable {
                node_id: target,
                address: address.raft.clone(),
                reason: e.to_string(),
            })
    }

    async fn connection(
        &self,
        target: NodeId,
        address: &NodeAddress,
    ) -> Result<Connection, TransportError> {
        let slot = {
            let mut connections = self
                .connections
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            connections.entry(target).or_default().clone()
        };
        let mut slot = slot.lock().await;
        if let Some(connection) = slot.as_ref() {
            match connection.close_reason() {
                None => return Ok(connection.clone()),
                Some(reason) => tracing::debug!(target, %reason, "connection to peer closed"),
            }
        }
        let unreachable = |reason: String| TransportError::Unreachable {
            node_id: target,
            address: address.raft.clone(),
            reason,
        };
        let socket: SocketAddr = address
            .raft
            .parse()
            .map_err(|_| unreachable("not an ip:port".into()))?;
        let started = std::time::Instant::now();
        tracing::debug!(target, %socket, "dialing peer");
        let connecting = self
            .endpoint
            .connect(socket, &tls::node_server_name(target))
            .map_err(|e| unreachable(e.to_string()))?;
        let connection = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| unreachable(format!("no handshake within {CONNECT_TIMEOUT:?}")))?
            .map_err(|e| unreachable(e.to_string()))
            .inspect_err(|error| tracing::debug!(target, %error, "dial failed"))?;
        tracing::debug!(target, elapsed = ?started.elapsed(), "dialed peer");
        *slot = Some(connection.clone());
        Ok(connection)
    }

    async fn exchange(
        &self,
        connection: &Connection,
        frame: &[u8],
        target: NodeId,
    ) -> Result<RpcResponse, TransportError> {
        let failed = |reason: String| TransportError::Failed {
            node_id: target,
            reason,
        };
        // Failing to open a stream means nothing was sent: the peer is unreachable, not ambiguous.
        let (mut send, mut recv) =
            connection
                .open_bi()
                .await
                .map_err(|e| TransportError::Unreachable {
                    node_id: target,
                    address: connection.remote_address().to_string(),
                    reason: e.to_string(),
                })?;
        send.write_all(frame)
            .await
            .map_err(|e| failed(e.to_string()))?;
        send.finish().map_err(|e| failed(e.to_string()))?;
        read_frame(&mut recv).await
    }
}

/// Closes `connection` if the peer sent not one datagram since `received_before` was read (the
/// start of a call that has now timed out), so that the next call dials afresh.
///
/// Why: a live peer acknowledges a request's packets within its ack delay (25 ms) however busy
/// its Raft core is, so a whole call without a datagram means the process behind the connection
/// is gone. If it restarts on the same address, its stateless reset (see the module docs) answers
/// only the packets that still reach it, and quinn sends those less and less often: with every
/// unacknowledged probe it doubles its probe timeout (about 27 ms, 54, 108, ... 864 ms), and new
/// requests wait behind the congestion window. Measured in the commit benchmark: a restarted node
/// heard its leader's first heartbeat only 1.2 s after it came up, started an election meanwhile
/// and deposed the healthy leader. A fresh dial reaches it as soon as it listens.
fn forget_if_silent(connection: &Connection, received_before: u64, target: NodeId) {
    if connection.stats().udp_rx.datagrams == received_before {
        tracing::debug!(
            target,
            "no datagram from the peer during a whole call; redialing next time"
        );
        connection.close(0u32.into(), b"peer silent");
    }
}

impl Transport for QuicTransport {
    async fn call(
        &self,
        target: NodeId,
        address: &NodeAddress,
        request: RpcRequest,
        timeout: Duration,
    ) -> Result<RpcResponse, TransportError> {
        let frame = encode_frame(&RequestEnvelope {
            from: self.node_id,
            request,
        })?;
        let started = tokio::time::Instant::now();
        let connection = tokio::time::timeout(timeout, self.connection(target, address))
            .await
            .map_err(|_| TransportError::Unreachable {
                node_id: target,
                address: address.raft.clone(),
                reason: "connect timed out".into(),
            })??;
        let remaining = timeout.saturating_sub(started.elapsed());
        let received_before = connection.stats().udp_rx.datagrams;
        let response = tokio::time::timeout(remaining, self.exchange(&connection, &frame, target))
            .await
            .map_err(|_| {
                forget_if_silent(&connection, received_before, target);
                TransportError::Timeout {
                    node_id: target,
                    timeout,
                }
            })??;
        if let RpcResponse::Refused(reason) = response {
            return Err(TransportError::Refused {
                node_id: target,
                reason,
            });
        }
        Ok(response)
    }
}
