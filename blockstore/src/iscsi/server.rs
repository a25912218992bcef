//! The tokio shell around [`Connection`]: one task per TCP connection, Nagle off, reads framed by
//! the core, SCSI commands run on the blocking pool, plain READs straight into reused Data-In
//! buffers, answers written in batches with vectored writes (data segments are not copied into
//! a send buffer).
//!
//! # Several READs of one connection at once
//!
//! The plain READs the core hands out together (a run: what arrived in one socket read) are
//! read on the connection task, except that a run asking for [`POOL_RUN_BYTES_MIN`] or more
//! gives its later half, as one job, to the target's read pool (`read_pool`: one thread per
//! core, shared by all connections), so a volume's chunks are read and verified on two cores
//! while the connection task goes on framing input and writing answers. Their outcomes come
//! back in the order they finish and are answered then (tasks are independent by ITT; StatSN
//! follows the order answers leave in). Small runs stay inline: a hand-off (a thread wake-up
//! and a reply that wakes the connection) costs about what reading and verifying 64 KiB does.
//! Ordering rules kept from one-command-at-a-time: any command other than a plain READ waits
//! until the pooled READs before it completed, and READs after it wait for it; task management
//! and logout requests wait in the core until every command the shell took completed
//! ([`Connection::input_held`]), so no answer of an affected task follows the TMF's. At most
//! [`READS_OUT_BYTES_MAX`] of pooled READs are out per connection.
//!
//! # Several WRITEs of one connection at once
//!
//! A run of plain WRITEs (10/12/16) is applied in order on the blocking pool in one hand-off
//! ([`crate::scsi::Lun::start_write`]); what each still waits for (a mirrored write: its
//! standby holding it, [`crate::device::BlockDevice::start_write`]) is a future polled here,
//! so the writes of one connection wait for the mirror together instead of one round trip
//! each, and complete in the order their waits resolve. WRITEs run while other WRITEs wait;
//! READs wait for the WRITEs out and WRITEs for the READs out, so neither overtakes the other;
//! anything else waits for both.
//!
//! READs longer than [`STREAM_READ_BYTES_MIN`] (up to the whole LUN, in one command) are
//! streamed: read from the device one PDU-sized piece at a time, each handed to the core as it
//! is read, and output handed to the writer task in bounded batches, so a READ of any length
//! holds at most a few batches in memory; the reads stop while the socket is full.
//!
//! Memory per session is bounded: the socket read buffer (256 KiB), the frame being assembled
//! (one PDU, at most our MaxRecvDataSegmentLength of 256 KiB), write data being gathered
//! (`WRITE_BUFFER_BYTES_MAX`, 32 MiB), the Data-In buffer pool (32 x 256 KiB), pooled READs out
//! ([`READS_OUT_BYTES_MAX`], 8 MiB), and queued output (`WRITE_BATCHES_MAX` batches of about
//! `WRITE_BATCH_BYTES`, plus one being written and one being filled): about 53 MiB in the
//! worst case; an idle session holds a few tens of KiB. The benchmark
//! prints the measured figures; `tests/large_reads.rs` checks a 100 MB READ stays bounded.

use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use super::connection::{Command, Connection, Event, PortalInfo};
use super::read_pool::{self, ReadJob, ReadPool};
use super::target::{Registry, RegistryError, SessionRecord, TargetConfig};
use super::wire::Pdu;
use crate::device::{BlockDevice, WriteCompletion};
use crate::scsi::ScsiResult;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;

/// Socket read size; also bounds how much unframed input one connection holds at a time
/// (plus one PDU).
const READ_CHUNK_BYTES: usize = 256 * 1024;
/// Encoded output handed to the writer task in one piece once it is this big...
const WRITE_BATCH_BYTES: usize = 512 * 1024;
/// ...and at most this many batches wait for the socket (bounds memory per session).
const WRITE_BATCHES_MAX: usize = 4;

/// READs whose CDB asks for more than this are streamed piece by piece (see the module doc);
/// shorter ones are read whole into one pooled buffer.
pub const STREAM_READ_BYTES_MIN: u64 = 1 << 20;

/// Data-In buffers handed back after they were sent, so reads reuse warm memory instead of
/// faulting in fresh pages for every command. Bounded.
#[derive(Default)]
struct BufferPool(Mutex<Vec<Vec<u8>>>);

const POOL_BUFFERS_MAX: usize = 32;
const POOL_BUFFER_BYTES_MAX: usize = 256 * 1024;

impl BufferPool {
    fn take(&self) -> Vec<u8> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_default()
    }
    fn give(&self, buffers: &mut Vec<Vec<u8>>) {
        let mut pool = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for b in buffers.drain(..) {
            // Kept at its length: the next read overwrites it without zeroing it first.
            if pool.len() < POOL_BUFFERS_MAX
                && (4096..=POOL_BUFFER_BYTES_MAX).contains(&b.capacity())
            {
                pool.push(b);
            }
        }
    }
}

/// Encoded PDUs: headers packed in `out`, data segments kept in their own buffers.
#[derive(Default)]
struct Batch {
    out: Vec<u8>,
    datas: Vec<Vec<u8>>,
    /// (header start, header end, index into `datas`)
    pieces: Vec<(usize, usize, Option<usize>)>,
    bytes: usize,
}

/// Moves everything the connection wants to send into `batch`; returns the batch's size.
fn drain_into(conn: &mut Connection, batch: &mut Batch) -> usize {
    while let Some((pdu, h, d)) = conn.poll_transmit() {
        batch.bytes += pdu.wire_len(h, d);
        encode_split(
            pdu,
            h,
            d,
            &mut batch.out,
            &mut batch.datas,
            &mut batch.pieces,
        );
    }
    batch.bytes
}

/// The iSCSI target of one node: the registry of targets plus the listeners serving them.
#[derive(Clone, Default)]
pub struct Target {
    registry: Arc<Registry>,
    portals: Arc<Mutex<Vec<SocketAddr>>>,
    inline_io: bool,
    /// Runs the plain READs of every connection (unless `inline_io`).
    reads: Arc<ReadPool>,
}

impl Target {
    pub fn new() -> Target {
        Target::default()
    }

    /// Runs every device call on the connection's own task instead of the blocking pool, and
    /// every plain READ there too (none goes to the read pool): one command at a time.
    /// Cheapest per command for devices whose calls return in microseconds (a file in the page
    /// cache); wrong for devices that wait on the network or a disk, which would stall other
    /// sessions.
    pub fn with_inline_io(mut self, inline_io: bool) -> Target {
        self.inline_io = inline_io;
        self
    }

    /// Serves `device` as LUN 0 of target `iqn`.
    pub fn add_target(
        &self,
        iqn: &str,
        device: Arc<dyn BlockDevice>,
        config: TargetConfig,
    ) -> Result<(), RegistryError> {
        self.registry.add_target(iqn, device, config)
    }

    /// Stops serving `iqn` and closes its sessions.
    pub fn remove_target(&self, iqn: &str) -> Result<(), RegistryError> {
        self.registry.remove_target(iqn)
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Accepts connections on `listener` until it fails. Call once per portal.
    pub async fn serve(&self, listener: TcpListener) -> std::io::Result<()> {
        let local = listener.local_addr()?;
        self.portals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(local);
        loop {
            let (stream, peer) = listener.accept().await?;
            let this = self.clone();
            tokio::spawn(async move {
                if let Err(err) = this.run_connection(stream).await {
                    tracing::debug!(%peer, error = %err, "iscsi connection ended with an error");
                }
            });
        }
    }

    fn portal_info(&self, local: SocketAddr) -> PortalInfo {
        let portals = self
            .portals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut addresses = Vec::new();
        let mut add = |a: SocketAddr| {
            let a = if a.ip().is_unspecified() {
                SocketAddr::new(local.ip(), a.port())
            } else {
                a
            };
            let s = match a {
                SocketAddr::V4(v4) => format!("{}:{},1", v4.ip(), v4.port()),
                SocketAddr::V6(v6) => format!("[{}]:{},1", v6.ip(), v6.port()),
            };
            if !addresses.contains(&s) {
                addresses.push(s);
            }
        };
        add(local);
        for p in portals {
            add(p);
        }
        PortalInfo {
            addresses,
            portal_group_tag: 1,
        }
    }

    async fn run_connection(&self, stream: TcpStream) -> std::io::Result<()> {
        stream.set_nodelay(true)?;
        let local = stream.local_addr()?;
        let mut challenge = [0u8; 16];
        rand::Rng::fill(&mut rand::thread_rng(), &mut challenge[..]);
        let mut conn = Connection::new(self.registry.clone(), self.portal_info(local), challenge);
        let (mut reader, writer) = stream.into_split();
        // Big batches go to a writer task so sending one overlaps with reading and executing
        // the next; small ones are written inline when the writer is idle (a task hand-off
        // costs more than a small write). The channel is bounded: a slow initiator stops our
        // reads.
        let writer = Arc::new(tokio::sync::Mutex::new(writer));
        let pending = Arc::new(AtomicUsize::new(0));
        let pool = Arc::new(BufferPool::default());
        let (batches, mut to_send) = tokio::sync::mpsc::channel::<Batch>(WRITE_BATCHES_MAX);
        let writer_task = {
            let writer = writer.clone();
            let pending = pending.clone();
            let pool = pool.clone();
            tokio::spawn(async move {
                while let Some(mut batch) = to_send.recv().await {
                    let mut w = writer.lock().await;
                    let r = write_pieces(&mut w, &batch).await;
                    pending.fetch_sub(1, Ordering::AcqRel);
                    r?;
                    pool.give(&mut batch.datas);
                }
                let _ = writer.lock().await.shutdown().await;
                Ok::<(), std::io::Error>(())
            })
        };
        let closer = Arc::new(Notify::new());
        let mut registered: Option<u64> = None;
        let mut buf = vec![0u8; READ_CHUNK_BYTES];
        // Plain READs run on the target's read pool, several at once; their outcomes come back
        // here in the order they finish (tasks are independent by ITT).
        let (done_sender, mut done) =
            tokio::sync::mpsc::unbounded_channel::<Vec<(u32, ScsiResult)>>();
        // Pooled READs and the streamed READ not completed yet. Anything but a pooled READ
        // waits in the core until they completed (so a WRITE never overtakes or is overtaken
        // by a READ, as with one command at a time; and while it waits there, a task
        // management request can still cancel it).
        let mut reads_out = ReadsOut::default();
        // The streamed READ in progress: its task tag and its pieces, read by a blocking-pool
        // thread at most `STREAM_PIECES_MAX` ahead of the socket.
        let mut stream: Option<(u32, tokio::sync::mpsc::Receiver<Piece>)> = None;
        // Plain WRITEs applied and waiting for their standby (see the module doc), any number
        // at once: they complete in the order their waits resolve.
        let mut writes_out: FuturesUnordered<WriteOut> = FuturesUnordered::new();
        let result = loop {
            tokio::select! {
                biased;
                Some((itt, result)) = writes_out.next(), if !writes_out.is_empty() => {
                    conn.handle_command_complete(itt, result);
                    while let Some(Some((itt, result))) = writes_out.next().now_or_never() {
                        conn.handle_command_complete(itt, result);
                    }
                }
                Some(results) = done.recv(), if reads_out.count > 0 => {
                    let mut results = Some(results);
                    while let Some(finished) = results.take().or_else(|| done.try_recv().ok()) {
                        for (itt, result) in finished {
                            reads_out.finished(itt);
                            conn.handle_command_complete(itt, result);
                        }
                    }
                }
                piece = next_piece(&mut stream), if stream.is_some() => {
                    let itt = stream.as_ref().map_or(0, |(itt, _)| *itt);
                    let finished = if conn.take_stream_aborted(itt) {
                        // A task management request stopped it: dropping the receiver stops
                        // the reading thread.
                        true
                    } else {
                        match piece {
                            Some(Piece::Data(data)) => {
                                conn.handle_read_data(itt, data);
                                false
                            }
                            Some(Piece::Last(result)) => {
                                conn.handle_command_complete(itt, result);
                                true
                            }
                            None => {
                                conn.handle_command_complete(
                                    itt,
                                    ScsiResult::check(crate::scsi::sense::INTERNAL_TARGET_FAILURE),
                                );
                                true
                            }
                        }
                    };
                    if finished {
                        stream = None;
                        reads_out.finished(itt);
                    }
                }
                r = reader.read(&mut buf), if !conn.input_held() => {
                    match r {
                        Ok(0) => break Ok(()),
                        Ok(n) => conn.handle_bytes(&buf[..n]),
                        Err(e) => break Err(e),
                    }
                }
                _ = closer.notified() => break Ok(()),
            }
            let mut close = false;
            let mut batch = Batch::default();
            loop {
                let runnable = match conn.peek_event() {
                    None => break,
                    // READs overtake no WRITE, and WRITEs no READ; WRITEs run together, as do
                    // READs.
                    Some(Event::Execute(next)) if !self.inline_io && is_pooled_read(next) => {
                        writes_out.is_empty()
                    }
                    Some(Event::Execute(next)) if !self.inline_io && is_plain_write(next) => {
                        reads_out.count == 0
                    }
                    // A barrier: waits for the READs and WRITEs out before it.
                    Some(_) => reads_out.count == 0 && writes_out.is_empty(),
                };
                if !runnable {
                    break;
                }
                let Some(event) = conn.poll_event() else {
                    break;
                };
                match event {
                    Event::Execute(command) if !self.inline_io && is_pooled_read(&command) => {
                        // A run of READs: the later half goes to the read pool in one job when
                        // the run is big enough to be worth a hand-off; the rest are read
                        // here, in order, so a lone READ costs no thread switch.
                        let mut run = vec![command];
                        while matches!(conn.peek_event(), Some(Event::Execute(next)) if is_pooled_read(next))
                        {
                            if let Some(Event::Execute(next)) = conn.poll_event() {
                                run.push(next);
                            }
                        }
                        let run_bytes: u64 = run.iter().map(read_bytes).sum();
                        let inline = if run.len() >= 2 && run_bytes >= POOL_RUN_BYTES_MIN {
                            run.len() / 2
                        } else {
                            run.len()
                        };
                        let mut offload = run.split_off(inline);
                        let bytes: u64 = offload.iter().map(read_bytes).sum();
                        if !offload.is_empty() && !reads_out.has_room(bytes) {
                            // Too much out already: read these here too.
                            run.append(&mut offload);
                        }
                        if !offload.is_empty() {
                            reads_out.started(offload.iter().map(|c| c.itt), bytes);
                            self.reads.submit(ReadJob {
                                commands: offload.into_iter().map(|c| (c, pool.take())).collect(),
                                reply: done_sender.clone(),
                            });
                        }
                        for command in run {
                            let mut buffer = pool.take();
                            let result = read_pool::read_command(&command, &mut buffer);
                            conn.handle_command_complete(command.itt, result);
                        }
                    }
                    Event::Execute(command) if !self.inline_io && is_plain_write(&command) => {
                        // A run of WRITEs is applied in order on the blocking pool in one
                        // hand-off; what each still waits for (its standby) is polled here.
                        let mut run = vec![command];
                        while matches!(conn.peek_event(), Some(Event::Execute(next)) if is_plain_write(next))
                        {
                            if let Some(Event::Execute(next)) = conn.poll_event() {
                                run.push(next);
                            }
                        }
                        for (itt, started) in start_writes(run).await {
                            match started {
                                Ok(Some(completion)) => writes_out.push(Box::pin(async move {
                                    (itt, crate::scsi::Lun::write_outcome(completion.await))
                                })),
                                Ok(None) => {
                                    conn.handle_command_complete(itt, ScsiResult::good(Vec::new()))
                                }
                                Err(result) => conn.handle_command_complete(itt, result),
                            }
                        }
                    }
                    Event::Execute(command) if is_streamed_read(&command) => {
                        let itt = command.itt;
                        if let Some(receiver) = start_stream(&mut conn, command, &pool) {
                            reads_out.started(std::iter::once(itt), 0);
                            stream = Some((itt, receiver));
                        }
                    }
                    Event::Execute(command) => {
                        // A run of commands for the blocking pool goes in one hand-off. Order
                        // is kept.
                        let mut run = vec![command];
                        while !self.inline_io && !is_plain_read(&run[0]) {
                            match conn.peek_event() {
                                Some(Event::Execute(next))
                                    if !is_plain_read(next) && !is_streamed_read(next) =>
                                {
                                    if let Some(Event::Execute(next)) = conn.poll_event() {
                                        run.push(next);
                                    }
                                }
                                _ => break,
                            }
                        }
                        let results = execute_run(run, &pool, self.inline_io).await;
                        for (itt, result) in results {
                            conn.handle_command_complete(itt, result);
                        }
                    }
                    Event::ResetTarget {
                        target,
                        cold,
                        session_id,
                    } => {
                        if cold {
                            self.registry
                                .close_sessions_of(&target.name, Some(session_id));
                        }
                    }
                    Event::Close => close = true,
                }
                // Hand big batches to the writer early so it works while we go on.
                if drain_into(&mut conn, &mut batch) >= WRITE_BATCH_BYTES {
                    pending.fetch_add(1, Ordering::AcqRel);
                    if batches.send(std::mem::take(&mut batch)).await.is_err() {
                        close = true;
                    }
                }
                if close {
                    break;
                }
            }
            if registered.is_none() {
                if let (Some(id), Some(target), Some(nexus)) =
                    (conn.session_id(), conn.target(), conn.nexus())
                {
                    let c = closer.clone();
                    self.registry.register_session(SessionRecord {
                        id,
                        nexus_id: nexus.id,
                        target: target.name.clone(),
                        initiator_name: nexus.initiator_name.clone(),
                        isid: conn.isid(),
                        tsih: conn.tsih(),
                        close: Arc::new(move || c.notify_one()),
                    });
                    registered = Some(id);
                }
            }
            drain_into(&mut conn, &mut batch);
            if !batch.pieces.is_empty() {
                let mut batch = batch;
                if batch.bytes < WRITE_BATCH_BYTES && pending.load(Ordering::Acquire) == 0 {
                    // Nothing queued for the writer: writing here keeps the order.
                    let mut w = writer.lock().await;
                    if let Err(e) = write_pieces(&mut w, &batch).await {
                        break Err(e);
                    }
                    pool.give(&mut batch.datas);
                } else {
                    pending.fetch_add(1, Ordering::AcqRel);
                    if batches.send(batch).await.is_err() {
                        break Ok(());
                    }
                }
            }
            if close || conn.is_closing() {
                break Ok(());
            }
        };
        drop(batches);
        let written = writer_task.await.unwrap_or(Ok(()));
        if let Some(id) = registered {
            self.registry.unregister_session(id);
            if let (Some(target), Some(nexus)) = (conn.target(), conn.nexus()) {
                target.lun.nexus_lost(nexus);
            }
        }
        result.and(written)
    }
}

/// Bytes a connection's pooled READs may have out at once (their buffers and not yet sent
/// data): bounds memory per session, and is more than 32 commands of 64 KiB in flight need.
pub const READS_OUT_BYTES_MAX: u64 = 8 << 20;

/// The pooled READs of one connection not completed yet.
#[derive(Default)]
struct ReadsOut {
    count: usize,
    bytes: u64,
    /// (task tag, bytes) of each, to give the bytes back when it completes.
    tasks: Vec<(u32, u64)>,
}

impl ReadsOut {
    fn has_room(&self, bytes: u64) -> bool {
        self.count == 0 || self.bytes + bytes <= READS_OUT_BYTES_MAX
    }
    fn started(&mut self, itts: impl Iterator<Item = u32>, bytes: u64) {
        let first = self.tasks.len();
        self.tasks.extend(itts.map(|itt| (itt, 0)));
        self.count = self.tasks.len();
        self.bytes += bytes;
        // The whole job's bytes are given back with its first task (they complete together).
        if let Some(task) = self.tasks.get_mut(first) {
            task.1 = bytes;
        }
    }
    fn finished(&mut self, itt: u32) {
        if let Some(index) = self.tasks.iter().position(|(t, _)| *t == itt) {
            let (_, bytes) = self.tasks.swap_remove(index);
            self.count = self.tasks.len();
            self.bytes -= bytes;
        }
    }
}

/// Runs of READs (taken from the core at once) asking for at least this many bytes share their
/// work with the read pool: a hand-off (a thread wake-up, a reply that wakes the connection)
/// costs about what reading and verifying 64 KiB does, so smaller runs are read on the
/// connection task.
const POOL_RUN_BYTES_MIN: u64 = 256 * 1024;

/// A READ that goes to the read pool: a plain READ short enough not to be streamed.
fn is_pooled_read(command: &Command) -> bool {
    is_plain_read(command) && !is_streamed_read(command)
}

/// The data length a READ asks for (0 for anything else).
fn read_bytes(command: &Command) -> u64 {
    crate::scsi::Lun::read_transfer_blocks(&command.cdb)
        .unwrap_or(0)
        .saturating_mul(command.target.lun.block_size_bytes() as u64)
}

/// Whether a command is a READ long enough to stream (see [`STREAM_READ_BYTES_MIN`]).
fn is_streamed_read(command: &Command) -> bool {
    crate::scsi::Lun::read_transfer_blocks(&command.cdb).is_some_and(|blocks| {
        blocks.saturating_mul(command.target.lun.block_size_bytes() as u64) > STREAM_READ_BYTES_MIN
    })
}

/// A piece of a streamed READ, from its reading thread.
enum Piece {
    Data(Vec<u8>),
    /// The last piece with the command's outcome (or the failure that ended it).
    Last(ScsiResult),
}

/// Pieces a streamed READ reads ahead of the socket (each at most one Data-In PDU's payload,
/// at most 256 KiB).
const STREAM_PIECES_MAX: usize = 4;

/// The next piece of the stream in progress (never ready when there is none).
async fn next_piece(
    stream: &mut Option<(u32, tokio::sync::mpsc::Receiver<Piece>)>,
) -> Option<Piece> {
    match stream.as_mut() {
        Some((_, receiver)) => receiver.recv().await,
        None => std::future::pending().await,
    }
}

/// Starts a long READ: checks it, then has a blocking-pool thread read it one Data-In-sized
/// piece at a time into a bounded channel (it waits while the channel is full, so memory stays
/// bounded whatever the transfer length, and stops when the receiver is dropped: the session
/// closed or a task management request aborted the READ). The connection task meanwhile goes
/// on reading its socket, so task management requests and NOP-Outs are answered during a long
/// READ. `None`: the command already completed (it failed its checks).
fn start_stream(
    conn: &mut Connection,
    command: Command,
    pool: &Arc<BufferPool>,
) -> Option<tokio::sync::mpsc::Receiver<Piece>> {
    let lun = command.target.lun.clone();
    let itt = command.itt;
    let extent = match lun.start_read(&command.nexus, command.lun, &command.cdb) {
        Ok(extent) => extent,
        Err(result) => {
            conn.handle_command_complete(itt, result);
            return None;
        }
    };
    let block = extent.block_size_bytes.max(1) as u64;
    let transfer = extent.bytes();
    conn.handle_read_start(itt, transfer);
    // Only what the initiator takes (the core drops bytes past its expected length).
    let wanted = transfer.min((command.expected_length as u64).div_ceil(block) * block);
    let piece_max =
        (conn.data_in_segment_bytes().min(POOL_BUFFER_BYTES_MAX) as u64 / block).max(1) * block;
    let (sender, receiver) = tokio::sync::mpsc::channel(STREAM_PIECES_MAX);
    let pool = pool.clone();
    tokio::task::spawn_blocking(move || {
        let mut at = 0u64;
        loop {
            let length = piece_max.min(wanted - at);
            let mut buffer = pool.take();
            buffer.resize(length as usize, 0);
            if let Err(result) = lun.read_blocks(extent.lba + at / block, &mut buffer) {
                let _ = sender.blocking_send(Piece::Last(result));
                return;
            }
            at += length;
            if at == wanted {
                let _ = sender.blocking_send(Piece::Last(ScsiResult::good(buffer)));
                return;
            }
            if sender.blocking_send(Piece::Data(buffer)).is_err() {
                return;
            }
        }
    });
    Some(receiver)
}

/// Appends a PDU's header part (BHS, AHS, header digest) to `out` and keeps its data segment
/// (with padding and digest) aside as its own buffer.
fn encode_split(
    mut pdu: Pdu,
    header_digest: bool,
    data_digest: bool,
    out: &mut Vec<u8>,
    datas: &mut Vec<Vec<u8>>,
    pieces: &mut Vec<(usize, usize, Option<usize>)>,
) {
    let start = out.len();
    let data = std::mem::take(&mut pdu.data);
    let data_len = data.len();
    // Encode the header with the real data length, then the data separately.
    let mut header_only = pdu;
    header_only.data = Vec::new();
    header_only.encode_into(out, header_digest, false);
    super::wire::put24(&mut out[start..], 5, data_len as u32);
    if header_digest {
        // Recompute: the length changed after the digest was taken.
        let hdr_end = out.len() - 4;
        let d = super::wire::digest(&out[start..hdr_end]);
        out[hdr_end..].copy_from_slice(&d.to_le_bytes());
    }
    if data_len == 0 {
        pieces.push((start, out.len(), None));
        return;
    }
    let mut data = data;
    let pad = (4 - data_len % 4) % 4;
    data.resize(data_len + pad, 0);
    if data_digest {
        let d = super::wire::digest(&data);
        data.extend_from_slice(&d.to_le_bytes());
    }
    datas.push(data);
    pieces.push((start, out.len(), Some(datas.len() - 1)));
}

async fn write_pieces(
    writer: &mut tokio::net::tcp::OwnedWriteHalf,
    batch: &Batch,
) -> std::io::Result<()> {
    let (out, datas, pieces) = (&batch.out, &batch.datas, &batch.pieces);
    let mut slices: Vec<&[u8]> = Vec::with_capacity(pieces.len() * 2);
    for (s, e, d) in pieces {
        slices.push(&out[*s..*e]);
        if let Some(i) = d {
            slices.push(&datas[*i]);
        }
    }
    let mut index = 0;
    let mut offset = 0;
    while index < slices.len() {
        let io: Vec<IoSlice<'_>> = std::iter::once(IoSlice::new(&slices[index][offset..]))
            .chain(slices[index + 1..].iter().take(63).map(|s| IoSlice::new(s)))
            .collect();
        let mut n = writer.write_vectored(&io).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                "socket closed",
            ));
        }
        while n > 0 && index < slices.len() {
            let left = slices[index].len() - offset;
            if n >= left {
                n -= left;
                index += 1;
                offset = 0;
            } else {
                offset += n;
                n = 0;
            }
        }
    }
    Ok(())
}

/// A READ(10/12/16) of LUN 0: runs on the connection task or the read pool (see the module
/// doc), never on the blocking pool.
fn is_plain_read(command: &Command) -> bool {
    command.lun == 0 && matches!(command.cdb.first(), Some(0x28 | 0x88 | 0xa8))
}

/// A WRITE(10/12/16) of LUN 0: started on the blocking pool, its wait polled by the connection
/// task (see the module doc).
fn is_plain_write(command: &Command) -> bool {
    command.lun == 0 && matches!(command.cdb.first(), Some(0x2a | 0xaa | 0x8a))
}

/// A started WRITE's wait, resolving to its task tag and outcome.
type WriteOut = std::pin::Pin<Box<dyn std::future::Future<Output = (u32, ScsiResult)> + Send>>;

/// Starts WRITEs in order on the blocking pool ([`crate::scsi::Lun::start_write`]): (task
/// tag, what each still waits for, or its outcome).
async fn start_writes(
    run: Vec<Command>,
) -> Vec<(u32, Result<Option<WriteCompletion>, ScsiResult>)> {
    on_blocking_pool(
        run,
        |c| {
            c.target
                .lun
                .start_write(&c.nexus, c.lun, &c.cdb, &c.data_out)
        },
        Err,
    )
    .await
}

/// Runs `each` on the commands in order in one blocking-pool call: (task tag, outcome) for
/// each. If that call panicked, every command gets `failed` of INTERNAL TARGET FAILURE.
async fn on_blocking_pool<T: Send + 'static>(
    run: Vec<Command>,
    each: fn(&Command) -> T,
    failed: fn(ScsiResult) -> T,
) -> Vec<(u32, T)> {
    let itts: Vec<u32> = run.iter().map(|c| c.itt).collect();
    tokio::task::spawn_blocking(move || run.iter().map(|c| (c.itt, each(c))).collect())
        .await
        .unwrap_or_else(|_| {
            let failure = ScsiResult::check(crate::scsi::sense::INTERNAL_TARGET_FAILURE);
            itts.into_iter()
                .map(|itt| (itt, failed(failure.clone())))
                .collect()
        })
}

/// Runs commands in order and returns (task tag, result) for each. Plain READs (here only with
/// `inline_io`) run inline straight into a pooled buffer; the rest run inline with
/// `inline_io`, otherwise in one blocking-pool call so a slow flush or a mirrored write does not
/// stall the runtime.
async fn execute_run(
    run: Vec<Command>,
    pool: &BufferPool,
    inline_io: bool,
) -> Vec<(u32, ScsiResult)> {
    let mut done = Vec::with_capacity(run.len());
    let mut rest = Vec::new();
    for command in run {
        if is_plain_read(&command) {
            let mut buffer = pool.take();
            if let Some(result) = command.target.lun.try_fast_read(
                &command.nexus,
                command.lun,
                &command.cdb,
                &mut buffer,
            ) {
                let result = if result.status == crate::scsi::sense::GOOD {
                    ScsiResult::good(buffer)
                } else {
                    result
                };
                done.push((command.itt, result));
                continue;
            }
        }
        if inline_io {
            let result = command.target.lun.execute(
                &command.nexus,
                command.lun,
                &command.cdb,
                &command.data_out,
            );
            done.push((command.itt, result));
        } else {
            rest.push(command);
        }
    }
    if rest.is_empty() {
        return done;
    }
    let results = on_blocking_pool(
        rest,
        |c| c.target.lun.execute(&c.nexus, c.lun, &c.cdb, &c.data_out),
        std::convert::identity,
    )
    .await;
    done.extend(results);
    done
}
