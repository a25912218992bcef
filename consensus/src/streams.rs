//! One-way message streams between nodes over the cluster's QUIC connections (mutual TLS, the
//! same endpoint as Raft): what the data path's mirror uses. Raft's RPCs are request/response;
//! a mirror stream is a flow of messages each way, acknowledged by messages of the other side.
//!
//! Each node opens one unidirectional QUIC stream per peer and sends length-prefixed frames on
//! it (`u32` little-endian length, then the frame), so the frames of one sender reach the peer
//! in order. A frame is handed to a per-peer writer task through a bounded queue: a sender
//! never blocks, and a frame that finds the queue full, or a stream that fails, is dropped.
//! The mirror protocol retransmits what was not acknowledged, so a loss costs time, not data.
//! A failed stream is reopened (and the connection redialed) with the next frame.
//!
//! The receiving side learns the sender's node id from its certificate (never from the frame):
//! only a node holding a certificate of the cluster CA can send a frame, and it cannot pass for
//! another node.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::domain::NodeId;
use crate::quic::QuicTransport;
use crate::types::NodeAddress;

/// Largest frame accepted: a mirrored write of 32 MiB with its header, and room to spare.
pub const STREAM_FRAME_BYTES_MAX: usize = 40 << 20;
/// A writer sends what is queued in one write of at most this many bytes...
const BATCH_BYTES_MAX: usize = 4 << 20;
/// ...and pieces (three per frame at most).
const BATCH_PIECES_MAX: usize = 192;
/// Frames queued per peer before new ones are dropped.
const QUEUE_FRAMES_MAX: usize = 4096;

/// A frame to send: its head and its body, written one after the other without being copied
/// into one buffer (a mirrored write's body is the write's data, shared with the retransmit
/// queue). Received, it is one piece again.
#[derive(Clone, Debug, Default)]
pub struct Frame {
    pub head: Bytes,
    pub body: Bytes,
}

impl Frame {
    pub fn len(&self) -> usize {
        self.head.len() + self.body.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl From<Bytes> for Frame {
    fn from(head: Bytes) -> Frame {
        Frame {
            head,
            body: Bytes::new(),
        }
    }
}

/// What receives the frames of every peer's stream.
pub type FrameHandler = Arc<dyn Fn(NodeId, Bytes) + Send + Sync>;

/// Set once by the data path; frames that arrive before are dropped.
#[derive(Default)]
pub struct StreamHandler(OnceLock<FrameHandler>);

impl StreamHandler {
    pub fn set(&self, handler: FrameHandler) {
        let _ = self.0.set(handler);
    }

    pub(crate) fn handle(&self, peer: NodeId, frame: Bytes) {
        if let Some(handler) = self.0.get() {
            handler(peer, frame);
        }
    }
}

/// The sending side: a writer task and queue per peer.
#[derive(Clone)]
pub struct PeerStreams {
    transport: QuicTransport,
    writers: Arc<Mutex<HashMap<NodeId, mpsc::Sender<Frame>>>>,
    runtime: tokio::runtime::Handle,
}

impl PeerStreams {
    pub(crate) fn new(transport: QuicTransport, runtime: tokio::runtime::Handle) -> PeerStreams {
        PeerStreams {
            transport,
            writers: Arc::default(),
            runtime,
        }
    }

    /// Queues `frame` for `peer` at `address`; false if it was dropped (queue full). Never
    /// blocks: callable from any thread.
    pub fn send(&self, peer: NodeId, address: &NodeAddress, frame: Frame) -> bool {
        let sender = {
            let mut writers = self
                .writers
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let alive = writers.get(&peer).is_some_and(|s| !s.is_closed());
            if !alive {
                let (sender, receiver) = mpsc::channel(QUEUE_FRAMES_MAX);
                let transport = self.transport.clone();
                let address = address.clone();
                self.runtime
                    .spawn(write_frames(transport, peer, address, receiver, || {
                        // Logged by the writer; the metric counts frames refused at the queue.
                    }));
                writers.insert(peer, sender);
            }
            writers.get(&peer).expect("inserted").clone()
        };
        let sent = sender.try_send(frame).is_ok();
        if !sent {
            crate::metrics::stream_frame_dropped();
        }
        sent
    }
}

/// The writer task of one stream: opens a one-way stream to `peer` (again after a failure)
/// and writes each frame length-prefixed, what is queued in one write. A frame that cannot be
/// written is dropped and reported to `dropped` (the mirror retransmits). Public for the benchmarks that compare
/// stream layouts (`benches/mirror_streams.rs`).
pub async fn write_frames(
    transport: QuicTransport,
    peer: NodeId,
    address: NodeAddress,
    mut frames: mpsc::Receiver<Frame>,
    dropped: impl Fn(),
) {
    let mut stream: Option<quinn::SendStream> = None;
    let mut pieces: Vec<Bytes> = Vec::new();
    while let Some(frame) = frames.recv().await {
        if stream.is_none() {
            match transport.open_uni(peer, &address).await {
                Ok(opened) => stream = Some(opened),
                Err(error) => {
                    tracing::debug!(peer, %error, "cannot open a stream to the peer; frame dropped");
                    dropped();
                    continue;
                }
            }
        }
        let Some(send) = stream.as_mut() else {
            continue;
        };
        // What is queued goes out in one write (one hand-off to the connection, not one per
        // frame), up to a bound so a failure drops little.
        let (mut batch_bytes, mut batch_frames) = (0, 0);
        let mut next = Some(frame);
        while let Some(frame) = next.take() {
            batch_bytes += frame.len();
            batch_frames += 1;
            pieces.push(Bytes::copy_from_slice(&(frame.len() as u32).to_le_bytes()));
            pieces.push(frame.head);
            if !frame.body.is_empty() {
                pieces.push(frame.body);
            }
            if batch_bytes < BATCH_BYTES_MAX && pieces.len() < BATCH_PIECES_MAX {
                next = frames.try_recv().ok();
            }
        }
        let written = send.write_all_chunks(&mut pieces).await;
        pieces.clear();
        if let Err(error) = written {
            tracing::debug!(peer, %error, "stream to the peer failed; reopening with the next frame");
            for _ in 0..batch_frames {
                dropped();
            }
            stream = None;
        } else if frames.is_empty() {
            let _ = send.flush().await;
        }
    }
}

/// Reads frames from one peer's stream until it ends, handing each to `handler`.
pub(crate) async fn read_frames(
    mut recv: quinn::RecvStream,
    peer: NodeId,
    handler: Arc<StreamHandler>,
) {
    loop {
        let mut prefix = [0u8; 4];
        if recv.read_exact(&mut prefix).await.is_err() {
            return;
        }
        let length = u32::from_le_bytes(prefix) as usize;
        if length > STREAM_FRAME_BYTES_MAX {
            tracing::warn!(peer, length, "stream frame over the limit; stream closed");
            let _ = recv.stop(1u32.into());
            return;
        }
        // The frame as quinn received it, in one piece (one copy when it spans several
        // chunks, none when it does not).
        if length == 0 {
            handler.handle(peer, Bytes::new());
            continue;
        }
        let first = match recv.read_chunk(length, true).await {
            Ok(Some(chunk)) => chunk.bytes,
            Ok(None) | Err(_) => return,
        };
        if first.len() == length {
            handler.handle(peer, first);
            continue;
        }
        let mut body = bytes::BytesMut::with_capacity(length);
        body.extend_from_slice(&first);
        while body.len() < length {
            match recv.read_chunk(length - body.len(), true).await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk.bytes),
                Ok(None) | Err(_) => return,
            }
        }
        handler.handle(peer, body.freeze());
    }
}
