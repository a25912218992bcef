//! Mirror streams benchmark: how the mirror frames of N sessions should travel from a primary
//! (node A) to its standby (node B) over the cluster's QUIC connections. Two designs, measured in
//! the same run:
//!
//! - (a) multiplexed: one one-way stream per peer and direction carrying the frames of every
//!   session, length-prefixed, written by one writer task with a bounded queue: what
//!   `streams::PeerStreams` does today.
//! - (b) per session: one one-way stream per session and direction, each with its own writer
//!   task and queue (the same writer code, keyed by session instead of by peer).
//!
//! How: two nodes in this process, each with its own tokio runtime (as two processes would
//! have), on 127.0.0.1. Each binds the cluster's endpoint (`quic::bind_endpoint`: mutual TLS
//! from a `ClusterCa`, the cluster's transport windows), serves it with `quic::serve` (so frames
//! are read by the crate's own `streams::read_frames`) and dials its peer through a
//! `QuicTransport`, as a node does: A->B frames travel on the connection A dialed, B->A
//! acknowledgements on the one B dialed. `PeerStreams::new` is crate-private, so its `send` (the
//! per-stream queues) is copied here (`Outgoing`); the writer task is streams.rs's own
//! `write_frames`. The cluster lets a peer open only a
//! few one-way streams per connection (probed at start and printed), too few for (b) at 32
//! sessions: for (b) the server configuration is replaced by the same one (the crate's TLS
//! configuration, a copy of quic.rs's transport settings) with that limit raised by one stream
//! per session plus the bulk session's.
//!
//! Workload, per cell (design, sessions N, write size S): each session is a closed loop that
//! emulates an initiator with Q writes in flight. A write is a frame [session id, seq, S bytes]
//! A->B; B acknowledges each frame with a frame [session id, seq] B->A (on the peer's stream in
//! (a), on the session's stream in (b)); the write completes when its acknowledgement reaches
//! the session. After a warm-up (dial, congestion window), the small writes run alone for
//! BENCH_SECONDS; then a bulk session starts, a resync-like stream of 1 MiB frames with 8 in
//! flight (the resync's window of regions of 1 MiB), and after a short settling time the small
//! writes are measured again for BENCH_SECONDS while it runs: head-of-line blocking shows there.
//!
//! Prints, per write size, N and design: writes/s and MB/s (10^6 bytes) without bulk, write
//! latency p50/p99/max, then with the bulk session running: the small writes' p99 and writes/s
//! and the bulk session's MB/s; the ratio (b)/(a) of each figure; and a conclusion line per N
//! computed from the figures. Each cell runs BENCH_ROUNDS times, the order of the designs
//! alternating per round (the machine is shared and noisy); figures are medians over rounds.
//! Figures only; nothing is asserted about speed.
//!
//! `cargo bench -p cairn-consensus --bench mirror_streams` (env BENCH_ROUNDS, default 3;
//! BENCH_SECONDS, default 3, per measured phase (two per cell); BENCH_SESSIONS, default
//! "1,8,32"; BENCH_WRITE_BYTES, default "4096,65536"; BENCH_WRITES_IN_FLIGHT, default 8;
//! BENCH_WARMUP_MS, default 500; BENCH_WORKER_THREADS per node runtime, default the number of
//! cores).

mod common;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use bytes::{BufMut, Bytes, BytesMut};
use cairn_consensus::domain::NodeId;
use cairn_consensus::quic::{self, QuicTransport};
use cairn_consensus::rpc::{RpcHandler, RpcRequest, RpcResponse};
use cairn_consensus::streams::{write_frames, Frame, StreamHandler, STREAM_FRAME_BYTES_MAX};
use cairn_consensus::tls::ALPN_RAFT;
use cairn_consensus::{ClusterCa, NodeAddress, NodeIdentity};
use quinn::crypto::rustls::QuicServerConfig;
use tokio::sync::mpsc;

/// The primary: runs the sessions, sends their writes.
const NODE_A: NodeId = 1;
/// The standby: acknowledges every frame.
const NODE_B: NodeId = 2;
/// Frames queued per stream before new ones are dropped (streams.rs `QUEUE_FRAMES_MAX`).
const QUEUE_FRAMES_MAX: usize = 4096;
/// Session id and sequence number, `u64` little-endian each.
const FRAME_HEADER_BYTES: usize = 16;
/// The bulk session's frames: one resync region (256 blocks of 4 KiB).
const BULK_FRAME_BYTES: usize = 1 << 20;
/// The bulk session's frames in flight: the resync's window of regions.
const BULK_FRAMES_IN_FLIGHT: usize = 8;
/// Between the start of the bulk session and the measurement: its window fills.
const BULK_SETTLE: Duration = Duration::from_millis(250);
/// How long the probe waits for one more stream before it calls the limit reached.
const PROBE_STREAM_WAIT: Duration = Duration::from_millis(500);
/// The probe stops counting here.
const PROBE_STREAMS_MAX: usize = 256;
/// How long sessions may take to see their last acknowledgement once told to stop.
const SESSION_STOP_WAIT: Duration = Duration::from_secs(10);
/// A ratio within this distance of 1 is noise on a shared machine, not a difference.
const DIFFERENCE_THRESHOLD: f64 = 0.10;

fn main() -> anyhow::Result<()> {
    let settings = Settings::from_env()?;
    let ca = ClusterCa::generate()?;
    let identity_a = ca.issue_node_certificate(NODE_A)?;
    let identity_b = ca.issue_node_certificate(NODE_B)?;

    println!(
        "mirror_streams: node {NODE_A} (primary) -> node {NODE_B} (standby) on 127.0.0.1, \
         quinn with the cluster's mutual TLS and transport settings, each node its own tokio \
         runtime of {} worker threads",
        settings.worker_threads
    );
    println!(
        "  {} writes in flight per session; bulk session: {} MiB frames, {} in flight; \
         {} s per phase after {} ms warm-up; {} rounds, designs alternating, medians shown",
        settings.writes_in_flight,
        BULK_FRAME_BYTES >> 20,
        BULK_FRAMES_IN_FLIGHT,
        settings.phase.as_secs_f64(),
        settings.warmup.as_millis(),
        settings.rounds,
    );
    println!("  load average at start: {}", common::load_average());

    let cluster_uni_streams_max = probe_uni_stream_limit(&identity_a, &identity_b, &settings)?;
    let sessions_max = settings.session_counts.iter().copied().max().unwrap_or(0);
    println!(
        "  probe: with the cluster's settings one peer opens {cluster_uni_streams_max} one-way \
         streams at once on a connection (stream {} waited over {} ms); (b) needs one per \
         session plus the bulk session's ({} at N={sessions_max}), so (b) runs with the limit \
         raised to {cluster_uni_streams_max} + N + 1",
        cluster_uni_streams_max + 1,
        PROBE_STREAM_WAIT.as_millis(),
        sessions_max + 1,
    );
    println!();

    let mut results: BTreeMap<(usize, usize, Design), Vec<Figures>> = BTreeMap::new();
    for round in 0..settings.rounds {
        for &write_bytes in &settings.write_sizes_bytes {
            for &sessions in &settings.session_counts {
                let order = if round % 2 == 0 {
                    [Design::Multiplexed, Design::PerSession]
                } else {
                    [Design::PerSession, Design::Multiplexed]
                };
                for design in order {
                    let cell = Cell {
                        design,
                        sessions,
                        write_bytes,
                    };
                    let uni_streams_max = match design {
                        Design::Multiplexed => None,
                        Design::PerSession => {
                            Some(cluster_uni_streams_max as u32 + sessions as u32 + 1)
                        }
                    };
                    let figures =
                        run_cell(&cell, &identity_a, &identity_b, uni_streams_max, &settings)
                            .with_context(|| {
                                format!("{} N={sessions} {}", size_name(write_bytes), design.name())
                            })?;
                    eprintln!(
                        "round {}/{} {} N={sessions} {}: {:.0} writes/s, p99 {:.3} ms, \
                         with bulk p99 {:.3} ms",
                        round + 1,
                        settings.rounds,
                        size_name(write_bytes),
                        design.name(),
                        figures.0[Figure::WritesPerSecond as usize],
                        figures.0[Figure::LatencyP99 as usize],
                        figures.0[Figure::BulkLatencyP99 as usize],
                    );
                    results
                        .entry((write_bytes, sessions, design))
                        .or_default()
                        .push(figures);
                }
            }
        }
    }

    print_tables(&results, &settings);
    print_conclusions(&results, &settings);
    println!("  load average at end: {}", common::load_average());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Settings and figures.

struct Settings {
    rounds: usize,
    /// Each of the two measured phases of a cell.
    phase: Duration,
    warmup: Duration,
    session_counts: Vec<usize>,
    write_sizes_bytes: Vec<usize>,
    writes_in_flight: usize,
    worker_threads: usize,
}

impl Settings {
    fn from_env() -> anyhow::Result<Settings> {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let settings = Settings {
            rounds: env_list("BENCH_ROUNDS", &[3])?[0],
            phase: Duration::from_secs_f64(env_f64("BENCH_SECONDS", 3.0)?),
            warmup: Duration::from_millis(env_list("BENCH_WARMUP_MS", &[500])?[0] as u64),
            session_counts: env_list("BENCH_SESSIONS", &[1, 8, 32])?,
            write_sizes_bytes: env_list("BENCH_WRITE_BYTES", &[4096, 65536])?,
            writes_in_flight: env_list("BENCH_WRITES_IN_FLIGHT", &[8])?[0],
            worker_threads: env_list("BENCH_WORKER_THREADS", &[cores])?[0],
        };
        anyhow::ensure!(settings.rounds > 0, "BENCH_ROUNDS must be at least 1");
        anyhow::ensure!(settings.writes_in_flight > 0, "BENCH_WRITES_IN_FLIGHT is 0");
        anyhow::ensure!(settings.worker_threads > 0, "BENCH_WORKER_THREADS is 0");
        anyhow::ensure!(
            settings.session_counts.iter().all(|&n| n > 0),
            "BENCH_SESSIONS holds 0"
        );
        for &bytes in &settings.write_sizes_bytes {
            anyhow::ensure!(
                bytes > 0 && FRAME_HEADER_BYTES + bytes <= STREAM_FRAME_BYTES_MAX,
                "write of {bytes} bytes does not fit a stream frame"
            );
        }
        // Every frame in flight fits one writer queue, so the bench never measures a drop (which
        // the mirror would cure by retransmitting, after its timeout).
        let sessions_max = settings.session_counts.iter().copied().max().unwrap_or(0);
        anyhow::ensure!(
            sessions_max * settings.writes_in_flight + BULK_FRAMES_IN_FLIGHT <= QUEUE_FRAMES_MAX,
            "{sessions_max} sessions x {} writes in flight overflow a queue of {QUEUE_FRAMES_MAX}",
            settings.writes_in_flight
        );
        Ok(settings)
    }
}

fn env_list(name: &str, default: &[usize]) -> anyhow::Result<Vec<usize>> {
    match std::env::var(name) {
        Err(_) => Ok(default.to_vec()),
        Ok(text) => {
            let list = text
                .split(',')
                .map(|item| item.trim().parse::<usize>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| anyhow!("{name}={text:?}: {e}"))?;
            anyhow::ensure!(!list.is_empty(), "{name} is empty");
            Ok(list)
        }
    }
}

fn env_f64(name: &str, default: f64) -> anyhow::Result<f64> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(text) => {
            let value: f64 = text
                .trim()
                .parse()
                .map_err(|e| anyhow!("{name}={text:?}: {e}"))?;
            anyhow::ensure!(value > 0.0, "{name} must be positive, not {value}");
            Ok(value)
        }
    }
}

fn size_name(bytes: usize) -> String {
    match bytes % 1024 {
        0 => format!("{} KiB", bytes / 1024),
        _ => format!("{bytes} B"),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Design {
    Multiplexed,
    PerSession,
}

impl Design {
    fn name(self) -> &'static str {
        match self {
            Design::Multiplexed => "(a) multiplexed",
            Design::PerSession => "(b) per session",
        }
    }
}

struct Cell {
    design: Design,
    sessions: usize,
    write_bytes: usize,
}

/// The figures of one cell, indexed by `Figure`.
#[derive(Clone, Copy, Debug)]
struct Figures([f64; FIGURE_COUNT]);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Figure {
    WritesPerSecond,
    MegabytesPerSecond,
    LatencyP50,
    LatencyP99,
    LatencyMax,
    BulkLatencyP99,
    BulkWritesPerSecond,
    BulkSessionMegabytesPerSecond,
}

const FIGURE_COUNT: usize = 8;
const FIGURES: [Figure; FIGURE_COUNT] = [
    Figure::WritesPerSecond,
    Figure::MegabytesPerSecond,
    Figure::LatencyP50,
    Figure::LatencyP99,
    Figure::LatencyMax,
    Figure::BulkLatencyP99,
    Figure::BulkWritesPerSecond,
    Figure::BulkSessionMegabytesPerSecond,
];

impl Figure {
    fn higher_is_better(self) -> bool {
        matches!(
            self,
            Figure::WritesPerSecond
                | Figure::MegabytesPerSecond
                | Figure::BulkWritesPerSecond
                | Figure::BulkSessionMegabytesPerSecond
        )
    }

    /// What the conclusion weighs: throughput, tail latency with and without the bulk session,
    /// and the bulk session's own rate (a resync that crawls leaves the session degraded longer).
    /// MB/s repeats writes/s; p50 and max are reported, not weighed (max is one sample).
    fn weighed(self) -> bool {
        matches!(
            self,
            Figure::WritesPerSecond
                | Figure::LatencyP99
                | Figure::BulkLatencyP99
                | Figure::BulkSessionMegabytesPerSecond
        )
    }

    fn short_name(self) -> &'static str {
        match self {
            Figure::WritesPerSecond => "writes/s",
            Figure::MegabytesPerSecond => "MB/s",
            Figure::LatencyP50 => "p50",
            Figure::LatencyP99 => "p99",
            Figure::LatencyMax => "max",
            Figure::BulkLatencyP99 => "p99 with bulk",
            Figure::BulkWritesPerSecond => "writes/s with bulk",
            Figure::BulkSessionMegabytesPerSecond => "bulk MB/s",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The nodes.

/// Raft RPCs are not part of this benchmark.
struct NoRpc;

impl RpcHandler for NoRpc {
    async fn handle(&self, _from: NodeId, _request: RpcRequest) -> RpcResponse {
        RpcResponse::Refused("the benchmark node serves no rpc".into())
    }
}

/// One node: its runtime, its endpoint (served) and its client side.
struct Node {
    runtime: tokio::runtime::Runtime,
    endpoint: quinn::Endpoint,
    transport: QuicTransport,
    address: NodeAddress,
    frames: Arc<StreamHandler>,
}

impl Node {
    /// The cluster's endpoint; with `uni_streams_max`, its server configuration is replaced by
    /// an equal one that lets a peer open that many one-way streams.
    fn start(
        identity: &NodeIdentity,
        uni_streams_max: Option<u32>,
        settings: &Settings,
    ) -> anyhow::Result<Node> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(settings.worker_threads)
            .thread_name(format!("node-{}", identity.node_id))
            .enable_all()
            .build()?;
        let frames = Arc::new(StreamHandler::default());
        let endpoint = runtime.block_on(async {
            let listen: SocketAddr = "127.0.0.1:0".parse().expect("a socket address");
            let endpoint = quic::bind_endpoint(identity, listen)?;
            if let Some(limit) = uni_streams_max {
                endpoint.set_server_config(Some(server_config(identity, limit)?));
            }
            quic::serve(endpoint.clone(), Arc::new(NoRpc), frames.clone());
            anyhow::Ok(endpoint)
        })?;
        let address = NodeAddress::new(endpoint.local_addr()?, "");
        let transport = QuicTransport::new(identity.node_id, endpoint.clone());
        Ok(Node {
            runtime,
            endpoint,
            transport,
            address,
            frames,
        })
    }

    fn stop(self) {
        self.endpoint.close(0u32.into(), b"benchmark cell done");
        self.runtime.shutdown_timeout(Duration::from_secs(1));
    }
}

/// The cluster's transport settings (quic.rs `transport_config`, private there; keep in step)
/// with the limit of one-way streams a peer may have open as a parameter.
fn cluster_transport_config(uni_streams_max: u32) -> Arc<quinn::TransportConfig> {
    let mut config = quinn::TransportConfig::default();
    config.keep_alive_interval(Some(Duration::from_millis(500)));
    if let Ok(idle) = Duration::from_secs(5).try_into() {
        config.max_idle_timeout(Some(idle));
    }
    config.max_concurrent_bidi_streams(1024u32.into());
    config.max_concurrent_uni_streams(uni_streams_max.into());
    config.stream_receive_window((64u32 << 20).into());
    config.receive_window((128u32 << 20).into());
    config.send_window(128 << 20);
    Arc::new(config)
}

/// The server side of `quic::bind_endpoint` (the crate's TLS configuration, mutual
/// authentication) with `cluster_transport_config(uni_streams_max)`.
fn server_config(
    identity: &NodeIdentity,
    uni_streams_max: u32,
) -> anyhow::Result<quinn::ServerConfig> {
    let tls = identity.server_config(true, &[ALPN_RAFT])?;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| anyhow!("quic tls: {e}"))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(cluster_transport_config(uni_streams_max));
    Ok(config)
}

/// How many one-way streams node A can have open to node B at once with the cluster's
/// endpoints, unchanged.
fn probe_uni_stream_limit(
    identity_a: &NodeIdentity,
    identity_b: &NodeIdentity,
    settings: &Settings,
) -> anyhow::Result<usize> {
    let node_b = Node::start(identity_b, None, settings)?;
    let node_a = Node::start(identity_a, None, settings)?;
    let opened = node_a.runtime.block_on(async {
        let mut streams = Vec::new();
        while streams.len() < PROBE_STREAMS_MAX {
            let open = node_a.transport.open_uni(NODE_B, &node_b.address);
            match tokio::time::timeout(PROBE_STREAM_WAIT, open).await {
                Ok(Ok(stream)) => streams.push(stream),
                Ok(Err(error)) => return Err(anyhow!("probe: {error}")),
                Err(_) => break,
            }
        }
        Ok(streams.len())
    })?;
    node_a.stop();
    node_b.stop();
    anyhow::ensure!(opened > 0, "probe: no stream opened");
    Ok(opened)
}

// ---------------------------------------------------------------------------------------------
// Sending frames: `streams::PeerStreams` (whose constructor is crate-private), keyed by peer in
// (a) and by session in (b).

struct Outgoing {
    design: Design,
    transport: QuicTransport,
    peer: NodeId,
    address: NodeAddress,
    runtime: tokio::runtime::Handle,
    writers: Mutex<HashMap<u64, mpsc::Sender<Frame>>>,
    /// Frames a writer lost (stream failed to open or to write): each stalls a session.
    frames_lost: Arc<AtomicU64>,
}

impl Outgoing {
    fn new(design: Design, node: &Node, peer: NodeId, address: &NodeAddress) -> Outgoing {
        Outgoing {
            design,
            transport: node.transport.clone(),
            peer,
            address: address.clone(),
            runtime: node.runtime.handle().clone(),
            writers: Mutex::default(),
            frames_lost: Arc::default(),
        }
    }

    /// `PeerStreams::send`: queues `frame`, false if it was dropped (queue full). Never blocks.
    fn send(&self, session: u64, frame: Bytes) -> bool {
        let stream_key = match self.design {
            Design::Multiplexed => 0,
            Design::PerSession => session,
        };
        let sender = {
            let mut writers = self
                .writers
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let alive = writers.get(&stream_key).is_some_and(|s| !s.is_closed());
            if !alive {
                let (sender, receiver) = mpsc::channel(QUEUE_FRAMES_MAX);
                let lost = self.frames_lost.clone();
                self.runtime.spawn(write_frames(
                    self.transport.clone(),
                    self.peer,
                    self.address.clone(),
                    receiver,
                    move || {
                        lost.fetch_add(1, Ordering::Relaxed);
                    },
                ));
                writers.insert(stream_key, sender);
            }
            writers.get(&stream_key).expect("inserted").clone()
        };
        sender.try_send(frame.into()).is_ok()
    }
}

fn encode_frame(session: u64, seq: u64, payload: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(FRAME_HEADER_BYTES + payload.len());
    frame.put_u64_le(session);
    frame.put_u64_le(seq);
    frame.put_slice(payload);
    frame.freeze()
}

/// (session id, seq) of a frame of this benchmark.
fn decode_header(frame: &[u8]) -> (u64, u64) {
    assert!(
        frame.len() >= FRAME_HEADER_BYTES,
        "frame of {} bytes has no header",
        frame.len()
    );
    let session = u64::from_le_bytes(frame[0..8].try_into().expect("8 bytes"));
    let seq = u64::from_le_bytes(frame[8..16].try_into().expect("8 bytes"));
    (session, seq)
}

// ---------------------------------------------------------------------------------------------
// One cell.

struct Completion {
    completed: Instant,
    latency: Duration,
}

/// A closed loop: `in_flight` writes of `write_bytes` outstanding, the next sent when the oldest
/// is acknowledged (acknowledgements of one session arrive in order in both designs: each
/// session's frames travel on one stream). Returns every completion until `stop`.
async fn run_session(
    session: u64,
    write_bytes: usize,
    in_flight: usize,
    outgoing: Arc<Outgoing>,
    mut acks: mpsc::Receiver<u64>,
    stop: Arc<AtomicBool>,
) -> Vec<Completion> {
    let payload = vec![0x5a; write_bytes];
    let mut sent: VecDeque<(u64, Instant)> = VecDeque::with_capacity(in_flight);
    let mut completions = Vec::new();
    let send = |seq: u64, sent: &mut VecDeque<(u64, Instant)>| {
        let frame = encode_frame(session, seq, &payload);
        sent.push_back((seq, Instant::now()));
        assert!(
            outgoing.send(session, frame),
            "session {session}: frame {seq} dropped (writer queue full)"
        );
    };
    for seq in 0..in_flight as u64 {
        send(seq, &mut sent);
    }
    let mut next_seq = in_flight as u64;
    while let Some(seq) = acks.recv().await {
        let now = Instant::now();
        let (expected, started) = sent
            .pop_front()
            .expect("an acknowledgement answers a write in flight");
        assert_eq!(
            seq, expected,
            "session {session}: acknowledgements in order"
        );
        completions.push(Completion {
            completed: now,
            latency: now - started,
        });
        if stop.load(Ordering::Relaxed) {
            break;
        }
        send(next_seq, &mut sent);
        next_seq += 1;
    }
    completions
}

fn run_cell(
    cell: &Cell,
    identity_a: &NodeIdentity,
    identity_b: &NodeIdentity,
    uni_streams_max: Option<u32>,
    settings: &Settings,
) -> anyhow::Result<Figures> {
    let node_b = Node::start(identity_b, uni_streams_max, settings)?;
    let node_a = Node::start(identity_a, uni_streams_max, settings)?;
    let outgoing_a = Arc::new(Outgoing::new(cell.design, &node_a, NODE_B, &node_b.address));
    let outgoing_b = Arc::new(Outgoing::new(cell.design, &node_b, NODE_A, &node_a.address));

    // B, the standby: acknowledges every frame as it arrives.
    let acknowledger = outgoing_b.clone();
    node_b.frames.set(Arc::new(move |peer, frame: Bytes| {
        assert_eq!(peer, NODE_A, "frames come from the primary");
        let (session, seq) = decode_header(&frame);
        let sent = acknowledger.send(session, encode_frame(session, seq, &[]));
        assert!(sent, "session {session}: acknowledgement {seq} dropped");
    }));

    // A, the primary: hands each acknowledgement to its session. Session `sessions` is the bulk.
    let bulk_session = cell.sessions as u64;
    let mut ack_senders = Vec::new();
    let mut ack_receivers = Vec::new();
    for session in 0..=cell.sessions {
        let in_flight = if session as u64 == bulk_session {
            BULK_FRAMES_IN_FLIGHT
        } else {
            settings.writes_in_flight
        };
        let (sender, receiver) = mpsc::channel(in_flight);
        ack_senders.push(sender);
        ack_receivers.push(receiver);
    }
    node_a.frames.set(Arc::new(move |peer, frame: Bytes| {
        assert_eq!(peer, NODE_B, "acknowledgements come from the standby");
        let (session, seq) = decode_header(&frame);
        let sessions = &ack_senders;
        let sender = sessions
            .get(session as usize)
            .unwrap_or_else(|| panic!("acknowledgement for unknown session {session}"));
        match sender.try_send(seq) {
            // Closed: the session stopped after its last measured write.
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                panic!("session {session}: more acknowledgements than writes in flight")
            }
        }
    }));

    let stop = Arc::new(AtomicBool::new(false));
    let mut ack_receivers = ack_receivers.into_iter();
    let small_sessions: Vec<_> = (0..cell.sessions as u64)
        .zip(ack_receivers.by_ref())
        .map(|(session, acks)| {
            node_a.runtime.spawn(run_session(
                session,
                cell.write_bytes,
                settings.writes_in_flight,
                outgoing_a.clone(),
                acks,
                stop.clone(),
            ))
        })
        .collect();
    let bulk_acks = ack_receivers.next().expect("the bulk session's channel");

    std::thread::sleep(settings.warmup);
    let quiet_from = Instant::now();
    std::thread::sleep(settings.phase);
    let quiet_to = Instant::now();
    let bulk = node_a.runtime.spawn(run_session(
        bulk_session,
        BULK_FRAME_BYTES,
        BULK_FRAMES_IN_FLIGHT,
        outgoing_a.clone(),
        bulk_acks,
        stop.clone(),
    ));
    std::thread::sleep(BULK_SETTLE);
    let bulk_from = Instant::now();
    std::thread::sleep(settings.phase);
    let bulk_to = Instant::now();
    stop.store(true, Ordering::Relaxed);

    let joined = node_a.runtime.block_on(async {
        tokio::time::timeout(SESSION_STOP_WAIT, async {
            let mut small = Vec::new();
            for session in small_sessions {
                small.extend(session.await?);
            }
            let bulk = bulk.await?;
            anyhow::Ok((small, bulk))
        })
        .await
    });
    let frames_lost = (
        outgoing_a.frames_lost.load(Ordering::Relaxed),
        outgoing_b.frames_lost.load(Ordering::Relaxed),
    );
    let (small, bulk) = match joined {
        Ok(result) => result?,
        Err(_) => anyhow::bail!(
            "sessions did not stop within {SESSION_STOP_WAIT:?} (frames lost by A {}, by B {})",
            frames_lost.0,
            frames_lost.1
        ),
    };
    node_a.stop();
    node_b.stop();
    anyhow::ensure!(
        frames_lost == (0, 0),
        "frames lost: A {}, B {}",
        frames_lost.0,
        frames_lost.1
    );

    let window = |completions: &[Completion], from: Instant, to: Instant| -> Vec<Duration> {
        let mut latencies: Vec<Duration> = completions
            .iter()
            .filter(|c| c.completed >= from && c.completed < to)
            .map(|c| c.latency)
            .collect();
        latencies.sort_unstable();
        latencies
    };
    let quiet = window(&small, quiet_from, quiet_to);
    let quiet_seconds = (quiet_to - quiet_from).as_secs_f64();
    let with_bulk = window(&small, bulk_from, bulk_to);
    let bulk_seconds = (bulk_to - bulk_from).as_secs_f64();
    let bulk_frames = window(&bulk, bulk_from, bulk_to);
    let writes_per_second = quiet.len() as f64 / quiet_seconds;

    let mut figures = [0.0; FIGURE_COUNT];
    figures[Figure::WritesPerSecond as usize] = writes_per_second;
    figures[Figure::MegabytesPerSecond as usize] =
        writes_per_second * cell.write_bytes as f64 / 1e6;
    figures[Figure::LatencyP50 as usize] = milliseconds(percentile(&quiet, 0.50));
    figures[Figure::LatencyP99 as usize] = milliseconds(percentile(&quiet, 0.99));
    figures[Figure::LatencyMax as usize] = milliseconds(percentile(&quiet, 1.0));
    figures[Figure::BulkLatencyP99 as usize] = milliseconds(percentile(&with_bulk, 0.99));
    figures[Figure::BulkWritesPerSecond as usize] = with_bulk.len() as f64 / bulk_seconds;
    figures[Figure::BulkSessionMegabytesPerSecond as usize] =
        bulk_frames.len() as f64 * BULK_FRAME_BYTES as f64 / 1e6 / bulk_seconds;
    Ok(Figures(figures))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn milliseconds(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

// ---------------------------------------------------------------------------------------------
// Report.

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    let middle = values.len() / 2;
    if values.is_empty() {
        0.0
    } else if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    }
}

fn medians(rounds: &[Figures]) -> [f64; FIGURE_COUNT] {
    let mut result = [0.0; FIGURE_COUNT];
    for (index, value) in result.iter_mut().enumerate() {
        let mut values: Vec<f64> = rounds.iter().map(|f| f.0[index]).collect();
        *value = median(&mut values);
    }
    result
}

fn ratio(b: f64, a: f64) -> Option<f64> {
    (a > 0.0 && b.is_finite()).then(|| b / a)
}

fn format_figure(figure: Figure, value: f64) -> String {
    match figure {
        Figure::WritesPerSecond | Figure::BulkWritesPerSecond => format!("{value:.0}"),
        Figure::MegabytesPerSecond | Figure::BulkSessionMegabytesPerSecond => {
            format!("{value:.1}")
        }
        _ => format!("{value:.3}"),
    }
}

const COLUMN_WIDTHS: [usize; FIGURE_COUNT] = [9, 8, 8, 8, 8, 10, 10, 10];

fn print_tables(results: &BTreeMap<(usize, usize, Design), Vec<Figures>>, settings: &Settings) {
    for &write_bytes in &settings.write_sizes_bytes {
        println!(
            "{} writes ({} in flight per session); latencies in ms; MB = 10^6 bytes",
            size_name(write_bytes),
            settings.writes_in_flight
        );
        println!(
            "{:>8}  {:<16}|{:^43}|{:^32}",
            "", "", "small writes alone", "while the bulk session runs"
        );
        println!(
            "{:>8}  {:<16}|{:>9}{:>8}{:>8}{:>8}{:>8}  |{:>10}{:>10}{:>10}  ",
            "sessions",
            "design",
            "writes/s",
            "MB/s",
            "p50",
            "p99",
            "max",
            "p99",
            "writes/s",
            "bulk MB/s"
        );
        for &sessions in &settings.session_counts {
            let a = results.get(&(write_bytes, sessions, Design::Multiplexed));
            let b = results.get(&(write_bytes, sessions, Design::PerSession));
            let (Some(a), Some(b)) = (a, b) else {
                continue;
            };
            let (a, b) = (medians(a), medians(b));
            for (design, values) in [(Design::Multiplexed, a), (Design::PerSession, b)] {
                let cells: Vec<String> = FIGURES
                    .iter()
                    .zip(COLUMN_WIDTHS)
                    .map(|(&figure, width)| {
                        format!("{:>width$}", format_figure(figure, values[figure as usize]))
                    })
                    .collect();
                println!(
                    "{sessions:>8}  {:<16}|{}  |{}",
                    design.name(),
                    cells[..5].concat(),
                    cells[5..].concat()
                );
            }
            let cells: Vec<String> = FIGURES
                .iter()
                .zip(COLUMN_WIDTHS)
                .map(|(&figure, width)| {
                    let text = match ratio(b[figure as usize], a[figure as usize]) {
                        Some(r) => format!("{r:.2}x"),
                        None => "-".into(),
                    };
                    format!("{text:>width$}")
                })
                .collect();
            println!(
                "{sessions:>8}  {:<16}|{}  |{}",
                "(b)/(a)",
                cells[..5].concat(),
                cells[5..].concat()
            );
        }
        println!();
    }
}

/// One conclusion per N: for each weighed figure and write size, (b) is better or worse when the
/// median ratio is beyond `DIFFERENCE_THRESHOLD` and every round's paired ratio (the two designs
/// ran back to back) points the same way; otherwise the figure is a tie.
fn print_conclusions(
    results: &BTreeMap<(usize, usize, Design), Vec<Figures>>,
    settings: &Settings,
) {
    println!(
        "conclusion per N (a figure counts when (b)/(a) is beyond ±{:.0}% and every round agrees):",
        DIFFERENCE_THRESHOLD * 100.0
    );
    for &sessions in &settings.session_counts {
        let mut better = Vec::new();
        let mut worse = Vec::new();
        let mut ties = Vec::new();
        for &write_bytes in &settings.write_sizes_bytes {
            let a = results.get(&(write_bytes, sessions, Design::Multiplexed));
            let b = results.get(&(write_bytes, sessions, Design::PerSession));
            let (Some(a_rounds), Some(b_rounds)) = (a, b) else {
                continue;
            };
            let (a, b) = (medians(a_rounds), medians(b_rounds));
            for figure in FIGURES.into_iter().filter(|f| f.weighed()) {
                let index = figure as usize;
                let Some(median_ratio) = ratio(b[index], a[index]) else {
                    continue;
                };
                // > 1 when (b) is better, whatever the direction of the figure.
                let gain = |r: f64| {
                    if figure.higher_is_better() {
                        r
                    } else {
                        1.0 / r
                    }
                };
                let round_gains: Vec<f64> = a_rounds
                    .iter()
                    .zip(b_rounds)
                    .filter_map(|(a, b)| ratio(b.0[index], a.0[index]))
                    .map(gain)
                    .collect();
                let all_better = round_gains.iter().all(|&g| g > 1.0);
                let all_worse = round_gains.iter().all(|&g| g < 1.0);
                let text = format!(
                    "{} {:.2}x ({})",
                    figure.short_name(),
                    median_ratio,
                    size_name(write_bytes)
                );
                let median_gain = gain(median_ratio);
                if median_gain > 1.0 + DIFFERENCE_THRESHOLD && all_better {
                    better.push(text);
                } else if median_gain < 1.0 / (1.0 + DIFFERENCE_THRESHOLD) && all_worse {
                    worse.push(text);
                } else {
                    ties.push(text);
                }
            }
        }
        let verdict = match (better.is_empty(), worse.is_empty()) {
            (false, true) => "(b) per session is better",
            (true, false) => "(a) multiplexed is better",
            (false, false) => "trade-off, neither design is better on every figure",
            (true, true) => "no clear difference",
        };
        let list = |items: &[String]| {
            if items.is_empty() {
                "none".to_string()
            } else {
                items.join(", ")
            }
        };
        println!(
            "  N={sessions}: {verdict}. (b)/(a) in favour of (b): {}; in favour of (a): {}; \
             even: {}",
            list(&better),
            list(&worse),
            list(&ties)
        );
    }
}
