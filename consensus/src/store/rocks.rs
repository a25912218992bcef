//! RocksDB log store and state machine, sharing one database.
//!
//! Column families: `logs` (Raft entries by index, big-endian), `meta` (vote, committed, last
//! purged, state machine position), `events` (the event history by seq, big-endian).
//!
//! Durability: log appends, truncation, purge, vote and snapshot installation are synced; an
//! append's `LogFlushed` callback runs only after its synced write returned. The state machine's
//! apply batches and `committed` are written without their own fsync, so no fsync of the state
//! machine is ever on the commit path. Why that is safe:
//! - Each apply batch holds its events *and* the state machine position (`last_applied`), so
//!   after a crash the stored events and position always agree (one atomic batch).
//! - RocksDB has one write-ahead log for all column families, written in order; a synced write
//!   syncs every earlier record (all live WAL files), so the next synced write (every append,
//!   purge, vote) makes earlier apply batches durable too.
//! - Until then, the entries they came from are still in the log: the log is purged only up to a
//!   snapshot, a snapshot is built from applied (written) events, and the purge is itself a synced
//!   write that comes after those apply batches in the WAL. So a crash loses at most applied
//!   state whose entries are still in the durable log, and openraft re-applies them from
//!   `last_applied` on restart. `committed` is only a hint for that replay.
//!
//! Critical path of one commit (measured by the `commit` bench's histograms): openraft 0.9's
//! leader syncs its own append before it sends the entry to followers, and each follower syncs
//! before it answers, so a commit costs two synced writes in series plus one round trip; the
//! state machine apply (no fsync) follows. Writes go through one writer thread, which merges
//! whatever is queued into one batch and one fsync (group commit) and, after each flushed append,
//! calls the flush hook (`on_flushed`) by which the leader's proposer paces its entries.
//!
//! A failed write poisons the store: it and every later call return `StorageError`, on which
//! openraft stops the node; nothing continues on top of a log it could not make durable.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine};
use openraft::{OptionalSend, RaftLogReader, RaftSnapshotBuilder};
use rocksdb::{
    ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB,
};

use super::snapshot::{self, Header};
use super::{read_error, write_error, StateMachineCore};
use crate::codec;
use crate::domain::{Event, Seq, State};
use crate::types::{
    BatchOutcome, Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
    Vote,
};

const CF_LOGS: &str = "logs";
const CF_META: &str = "meta";
const CF_EVENTS: &str = "events";
const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";
const KEY_STATE_MACHINE: &[u8] = b"state_machine";

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open rocksdb at {path}: {error}")]
    Open { path: String, error: rocksdb::Error },
    #[error("stored state is corrupt: {0}")]
    Corrupt(String),
}

/// The database and the fault flags shared by the log store and the state machine.
struct Shared {
    db: DB,
    /// Set after a failed write; every later operation fails.
    poisoned: AtomicBool,
    /// Test hook: when set, the next writes fail as a failed fsync would.
    inject_write_failure: AtomicBool,
    /// Called by the writer thread once per append it flushed (see `RocksLogStore::on_flushed`).
    flush_hook: std::sync::OnceLock<FlushHook>,
}

type FlushHook = Box<dyn Fn() + Send + Sync>;

impl Shared {
    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column families are created at open")
    }

    fn check(&self) -> Result<(), StorageError> {
        if self.poisoned.load(Ordering::SeqCst) {
            return Err(write_error("storage stopped after a failed write"));
        }
        Ok(())
    }

    /// Writes `batch`, synced or not (see the module docs); on failure poisons the store.
    fn write_opt(&self, batch: WriteBatch, sync: bool) -> Result<(), StorageError> {
        self.check()?;
        let result = if self.inject_write_failure.load(Ordering::SeqCst) {
            Err("injected fsync failure".to_string())
        } else {
            let mut options = WriteOptions::default();
            options.set_sync(sync);
            self.db
                .write_opt(batch, &options)
                .map_err(|e| e.to_string())
        };
        if let Err(error) = result {
            self.poisoned.store(true, Ordering::SeqCst);
            tracing::error!(%error, "raft storage write failed; stopping");
            crate::metrics::storage_failed();
            return Err(write_error(format!("synced write failed: {error}")));
        }
        Ok(())
    }

    fn get<T: serde::de::DeserializeOwned>(
        &self,
        cf: &str,
        key: &[u8],
    ) -> Result<Option<T>, StorageError> {
        self.check()?;
        match self.db.get_cf(self.cf(cf), key).map_err(read_error)? {
            None => Ok(None),
            Some(bytes) => Ok(Some(codec::decode(&bytes).map_err(read_error)?)),
        }
    }
}

/// Opens (or creates) the database at `path` and returns its log store and state machine.
/// The state machine's projection is rebuilt by folding the stored events.
pub fn open(path: &Path) -> Result<(RocksLogStore, RocksStateMachine), OpenError> {
    let mut options = Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    let cfs = [CF_LOGS, CF_META, CF_EVENTS]
        .map(|name| ColumnFamilyDescriptor::new(name, Options::default()));
    let db = DB::open_cf_descriptors(&options, path, cfs).map_err(|error| OpenError::Open {
        path: path.display().to_string(),
        error,
    })?;
    let shared = Arc::new(Shared {
        db,
        poisoned: AtomicBool::new(false),
        inject_write_failure: AtomicBool::new(false),
        flush_hook: std::sync::OnceLock::new(),
    });
    let core = load_core(&shared)?;
    let writer = Writer::start(shared.clone())
        .map_err(|e| OpenError::Corrupt(format!("cannot start the log writer: {e}")))?;
    let log = RocksLogStore::open(shared.clone(), writer.clone())?;
    let state_machine = RocksStateMachine {
        shared,
        core: Arc::new(RwLock::new(core)),
        current: Arc::new(Mutex::new(None)),
        snapshot_counter: Arc::new(AtomicU64::new(0)),
        writer,
        write_gate: Arc::new(tokio::sync::Mutex::new(())),
    };
    Ok((log, state_machine))
}

fn load_core(shared: &Shared) -> Result<StateMachineCore, OpenError> {
    let corrupt = |what: String| OpenError::Corrupt(what);
    let (last_applied, membership): (Option<LogId>, StoredMembership) = shared
        .get(CF_META, KEY_STATE_MACHINE)
        .map_err(|e| corrupt(e.to_string()))?
        .unwrap_or_default();
    let mut state = State::default();
    for item in shared
        .db
        .iterator_cf(shared.cf(CF_EVENTS), IteratorMode::Start)
    {
        let (key, value) = item.map_err(|e| corrupt(e.to_string()))?;
        let event: Event = codec::decode(&value)
            .map_err(|e| corrupt(format!("event {}: {e}", hex::encode(&key))))?;
        if event.seq != state.last_seq + 1 || key.as_ref() != event.seq.to_be_bytes() {
            return Err(corrupt(format!(
                "event history has a gap before seq {}",
                event.seq
            )));
        }
        state.apply_event(&event);
    }
    Ok(StateMachineCore {
        state,
        last_applied,
        membership,
    })
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn key_index(key: &[u8]) -> Result<u64, StorageError> {
    let bytes: [u8; 8] = key
        .try_into()
        .map_err(|_| read_error(format!("key of {} bytes", key.len())))?;
    Ok(u64::from_be_bytes(bytes))
}

/// One write operation, queued to the writer thread.
enum Op {
    Put {
        cf: &'static str,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    DeleteRange {
        cf: &'static str,
        from: Vec<u8>,
        to: Vec<u8>,
    },
}

/// What to do once a job is on disk.
enum Done {
    /// An `append`: tell openraft the entries are flushed.
    Flushed(LogFlushed<TypeConfig>),
    /// A caller waiting for the write.
    Reply(tokio::sync::oneshot::Sender<Result<(), String>>),
    /// Nobody waits (`committed`, which a later synced write makes durable).
    Nothing,
}

struct Job {
    ops: Vec<Op>,
    sync: bool,
    done: Done,
    submitted: std::time::Instant,
}

/// Most jobs merged into one RocksDB write.
const JOBS_PER_WRITE_MAX: usize = 4096;

/// The log's writer thread: takes jobs in order, merges whatever is queued into one write batch
/// and one fsync (group commit), then completes them. After a failed write every job fails.
fn run_writer(shared: Arc<Shared>, jobs: std::sync::mpsc::Receiver<Job>) {
    while let Ok(first) = jobs.recv() {
        let mut group = vec![first];
        while group.len() < JOBS_PER_WRITE_MAX {
            match jobs.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        let mut batch = WriteBatch::default();
        let mut sync = false;
        for job in &group {
            sync |= job.sync;
            for op in &job.ops {
                match op {
                    Op::Put { cf, key, value } => batch.put_cf(shared.cf(cf), key, value),
                    Op::DeleteRange { cf, from, to } => {
                        batch.delete_range_cf(shared.cf(cf), from, to)
                    }
                }
            }
        }
        let started = std::time::Instant::now();
        let result = shared.write_opt(batch, sync).map_err(|e| e.to_string());
        crate::metrics::log_written(group.len(), started.elapsed().as_secs_f64());
        let mut appends_flushed = 0usize;
        for job in group {
            match job.done {
                Done::Flushed(callback) => {
                    crate::metrics::log_append_flushed(job.submitted.elapsed().as_secs_f64());
                    callback.log_io_completed(result.clone().map_err(std::io::Error::other));
                    appends_flushed += usize::from(result.is_ok());
                }
                Done::Reply(reply) => {
                    let _ = reply.send(result.clone());
                }
                Done::Nothing => {}
            }
        }
        if let Some(hook) = shared.flush_hook.get() {
            for _ in 0..appends_flushed {
                hook();
            }
        }
    }
}

/// The handle of the writer thread. Every write of the log and the state machine goes through it
/// in order, so they never block an async task on an fsync.
#[derive(Clone)]
struct Writer {
    jobs: std::sync::mpsc::Sender<Job>,
}

impl Writer {
    /// Starts the writer thread; it ends when the last handle is dropped.
    fn start(shared: Arc<Shared>) -> std::io::Result<Writer> {
        let (jobs, receiver) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("cairn-raft-log".into())
            .spawn(move || run_writer(shared, receiver))?;
        Ok(Writer { jobs })
    }

    fn submit(
        &self,
        shared: &Shared,
        ops: Vec<Op>,
        sync: bool,
        done: Done,
    ) -> Result<(), StorageError> {
        shared.check()?;
        self.jobs
            .send(Job {
                ops,
                sync,
                done,
                submitted: std::time::Instant::now(),
            })
            .map_err(|_| write_error("the log writer has stopped"))
    }

    /// Queues `ops` and waits until they are written (and synced, with `sync`).
    async fn write_and_wait(
        &self,
        shared: &Shared,
        ops: Vec<Op>,
        sync: bool,
    ) -> Result<(), StorageError> {
        let (reply, done) = tokio::sync::oneshot::channel();
        self.submit(shared, ops, sync, Done::Reply(reply))?;
        match done.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(write_error(error)),
            Err(_) => Err(write_error("the log writer has stopped")),
        }
    }
}

/// The log entries not yet purged, the vote and the purge point, kept in memory as well (the
/// log between two snapshots is small), so entries are readable as soon as they are submitted,
/// before the writer thread has flushed them.
#[derive(Default)]
struct LogCache {
    entries: BTreeMap<u64, Entry>,
    last_purged: Option<LogId>,
    vote: Option<Vote>,
    committed: Option<LogId>,
}

/// The Raft log on RocksDB. Writes go through one writer thread that group-commits them.
#[derive(Clone)]
pub struct RocksLogStore {
    shared: Arc<Shared>,
    cache: Arc<Mutex<LogCache>>,
    writer: Writer,
}

impl RocksLogStore {
    fn open(shared: Arc<Shared>, writer: Writer) -> Result<RocksLogStore, OpenError> {
        let corrupt = |what: String| OpenError::Corrupt(what);
        let mut cache = LogCache {
            last_purged: shared
                .get(CF_META, KEY_LAST_PURGED)
                .map_err(|e| corrupt(e.to_string()))?,
            vote: shared
                .get(CF_META, KEY_VOTE)
                .map_err(|e| corrupt(e.to_string()))?,
            committed: shared
                .get::<Option<LogId>>(CF_META, KEY_COMMITTED)
                .map_err(|e| corrupt(e.to_string()))?
                .flatten(),
            entries: BTreeMap::new(),
        };
        for item in shared
            .db
            .iterator_cf(shared.cf(CF_LOGS), IteratorMode::Start)
        {
            let (key, value) = item.map_err(|e| corrupt(e.to_string()))?;
            let index = key_index(&key).map_err(|e| corrupt(e.to_string()))?;
            let entry: Entry =
                codec::decode(&value).map_err(|e| corrupt(format!("log entry {index}: {e}")))?;
            cache.entries.insert(index, entry);
        }
        Ok(RocksLogStore {
            shared,
            cache: Arc::new(Mutex::new(cache)),
            writer,
        })
    }

    /// Makes every later write fail as a failed fsync would (tests of the fatal-storage path).
    pub fn inject_write_failure(&self) {
        self.shared
            .inject_write_failure
            .store(true, Ordering::SeqCst);
    }

    /// Sets `hook`, which the writer thread calls once for every append it has flushed, after
    /// telling openraft (the leader's proposer paces its entries by it). Only the first hook set
    /// is kept. It runs on the writer thread: it must not block.
    pub fn on_flushed(&self, hook: impl Fn() + Send + Sync + 'static) {
        let _ = self.shared.flush_hook.set(Box::new(hook));
    }

    /// Whether a write has failed (the store refuses everything after that).
    pub fn is_poisoned(&self) -> bool {
        self.shared.poisoned.load(Ordering::SeqCst)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, LogCache> {
        self.cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn submit(&self, ops: Vec<Op>, sync: bool, done: Done) -> Result<(), StorageError> {
        self.writer.submit(&self.shared, ops, sync, done)
    }

    async fn write_and_wait(&self, ops: Vec<Op>) -> Result<(), StorageError> {
        self.writer.write_and_wait(&self.shared, ops, true).await
    }
}

impl RaftLogReader<TypeConfig> for RocksLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        self.shared.check()?;
        Ok(self
            .cache()
            .entries
            .range(range)
            .map(|(_, entry)| entry.clone())
            .collect())
    }
}

impl RaftLogStorage<TypeConfig> for RocksLogStore {
    type LogReader = RocksLogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        self.shared.check()?;
        let cache = self.cache();
        let last_log_id = cache
            .entries
            .values()
            .next_back()
            .map(|entry| entry.log_id)
            .or(cache.last_purged);
        Ok(LogState {
            last_purged_log_id: cache.last_purged,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let value = codec::encode(vote).map_err(write_error)?;
        self.write_and_wait(vec![Op::Put {
            cf: CF_META,
            key: KEY_VOTE.to_vec(),
            value,
        }])
        .await?;
        self.cache().vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.shared.check()?;
        Ok(self.cache().vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        let value = codec::encode(&committed).map_err(write_error)?;
        self.cache().committed = committed;
        crate::metrics::committed(committed.map_or(0, |log_id| log_id.index));
        self.submit(
            vec![Op::Put {
                cf: CF_META,
                key: KEY_COMMITTED.to_vec(),
                value,
            }],
            false,
            Done::Nothing,
        )
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        self.shared.check()?;
        Ok(self.cache().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut ops = Vec::new();
        let mut cache = self.cache();
        for entry in entries {
            let value = codec::encode(&entry).map_err(write_error)?;
            ops.push(Op::Put {
                cf: CF_LOGS,
                key: index_key(entry.log_id.index).to_vec(),
                value,
            });
            cache.entries.insert(entry.log_id.index, entry);
        }
        drop(cache);
        // Returns at once; the writer thread calls back when the entries are flushed.
        self.submit(ops, true, Done::Flushed(callback))
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.cache().entries.split_off(&log_id.index);
        self.write_and_wait(vec![Op::DeleteRange {
            cf: CF_LOGS,
            from: index_key(log_id.index).to_vec(),
            to: vec![0xff; 9],
        }])
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        {
            let mut cache = self.cache();
            cache.last_purged = Some(log_id);
            let kept = cache.entries.split_off(&(log_id.index + 1));
            cache.entries = kept;
        }
        let value = codec::encode(&log_id).map_err(write_error)?;
        self.write_and_wait(vec![
            Op::Put {
                cf: CF_META,
                key: KEY_LAST_PURGED.to_vec(),
                value,
            },
            Op::DeleteRange {
                cf: CF_LOGS,
                from: index_key(0).to_vec(),
                to: index_key(log_id.index + 1).to_vec(),
            },
        ])
        .await
    }
}

/// The last snapshot built or installed: its meta and bytes.
type CachedSnapshot = (SnapshotMeta, Vec<u8>);

/// The state machine on RocksDB: the event history plus the in-memory projection folded from it.
#[derive(Clone)]
pub struct RocksStateMachine {
    shared: Arc<Shared>,
    core: Arc<RwLock<StateMachineCore>>,
    current: Arc<Mutex<Option<CachedSnapshot>>>,
    snapshot_counter: Arc<AtomicU64>,
    writer: Writer,
    /// Held from changing `core` until its write is in RocksDB, and while a snapshot captures
    /// its position and a RocksDB snapshot, so the two always agree.
    write_gate: Arc<tokio::sync::Mutex<()>>,
}

/// A read handle on the state machine, kept by the node after the state machine moved into Raft.
#[derive(Clone)]
pub struct StateReader {
    shared: Arc<Shared>,
    core: Arc<RwLock<StateMachineCore>>,
}

impl StateReader {
    /// Runs `f` on the current projection.
    pub fn with_state<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        let core = self
            .core
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&core.state)
    }

    pub fn last_applied(&self) -> Option<LogId> {
        self.core
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .last_applied
    }

    /// Up to `limit` stored events starting at `from_seq`, in order.
    pub fn events(&self, from_seq: Seq, limit: usize) -> Result<Vec<Event>, StorageError> {
        self.shared.check()?;
        let mut events = Vec::new();
        let iter = self.shared.db.iterator_cf(
            self.shared.cf(CF_EVENTS),
            IteratorMode::From(&from_seq.to_be_bytes(), Direction::Forward),
        );
        for item in iter.take(limit) {
            let (_, value) = item.map_err(read_error)?;
            events.push(codec::decode(&value).map_err(read_error)?);
        }
        Ok(events)
    }
}

impl RocksStateMachine {
    pub fn reader(&self) -> StateReader {
        StateReader {
            shared: self.shared.clone(),
            core: self.core.clone(),
        }
    }

    async fn build(&self) -> Result<Snapshot, StorageError> {
        // Capture the position and a RocksDB snapshot under the gate so the events match it.
        let gate = self.write_gate.lock().await;
        let core = self
            .core
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let db_snapshot = self.shared.db.snapshot();
        let header = Header {
            last_applied: core.last_applied,
            membership: core.membership.clone(),
            event_count: core.state.last_seq,
        };
        drop(core);
        drop(gate);
        let mut writer = snapshot::Writer::new(&header).map_err(read_error)?;
        for item in db_snapshot.iterator_cf(self.shared.cf(CF_EVENTS), IteratorMode::Start) {
            let (key, value) = item.map_err(read_error)?;
            writer
                .push_encoded(key_index(&key)?, &value)
                .map_err(read_error)?;
        }
        let bytes = writer.finish(&header).map_err(read_error)?;
        let meta = snapshot_meta(
            &header,
            self.snapshot_counter.fetch_add(1, Ordering::SeqCst),
        );
        *self
            .current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some((meta.clone(), bytes.clone()));
        crate::metrics::snapshot_built(bytes.len());
        Ok(Snapshot {
            meta,
            snapshot: Box::new(std::io::Cursor::new(bytes)),
        })
    }
}

pub(crate) fn snapshot_meta(header: &Header, counter: u64) -> SnapshotMeta {
    let snapshot_id = match header.last_applied {
        Some(log_id) => format!(
            "{}-{}-{}-{counter}",
            log_id.leader_id.term, log_id.leader_id.node_id, log_id.index
        ),
        None => format!("none-{counter}"),
    };
    SnapshotMeta {
        last_log_id: header.last_applied,
        last_membership: header.membership.clone(),
        snapshot_id,
    }
}

impl RaftSnapshotBuilder<TypeConfig> for RocksStateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        self.build().await
    }
}

impl RaftStateMachine<TypeConfig> for RocksStateMachine {
    type SnapshotBuilder = RocksStateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        self.shared.check()?;
        let core = self
            .core
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Ok((core.last_applied, core.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<BatchOutcome>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        self.shared.check()?;
        let started = std::time::Instant::now();
        let _gate = self.write_gate.lock().await;
        let mut ops = Vec::new();
        let mut outcomes = Vec::new();
        let mut event_count = 0usize;
        {
            let mut core = self
                .core
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            for entry in entries {
                let (outcome, events) = core.apply_entry(&entry);
                for event in &events {
                    let value = codec::encode(event).map_err(write_error)?;
                    ops.push(Op::Put {
                        cf: CF_EVENTS,
                        key: event.seq.to_be_bytes().to_vec(),
                        value,
                    });
                }
                event_count += events.len();
                outcomes.push(outcome);
            }
            let position = (core.last_applied, core.membership.clone());
            let value = codec::encode(&position).map_err(write_error)?;
            ops.push(Op::Put {
                cf: CF_META,
                key: KEY_STATE_MACHINE.to_vec(),
                value,
            });
        }
        // Written here, not through the log's writer thread: queued behind a synced log write,
        // every apply would wait for an fsync it does not need, and apply is on the commit path
        // of every proposal. Not synced on its own: RocksDB has one write-ahead log, and the
        // next synced log write makes this record durable too (see the module docs).
        let mut batch = WriteBatch::default();
        for op in &ops {
            match op {
                Op::Put { cf, key, value } => batch.put_cf(self.shared.cf(cf), key, value),
                Op::DeleteRange { cf, from, to } => {
                    batch.delete_range_cf(self.shared.cf(cf), from, to)
                }
            }
        }
        self.shared.write_opt(batch, false)?;
        crate::metrics::events_applied(event_count);
        crate::metrics::applied(started.elapsed().as_secs_f64());
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<std::io::Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(std::io::Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<std::io::Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        self.shared.check()?;
        let bytes = snapshot.into_inner();
        let (header, events, state) = snapshot::read_all(&bytes).map_err(read_error)?;
        if header.last_applied != meta.last_log_id {
            return Err(read_error(format!(
                "snapshot content is at {:?} but its meta says {:?}",
                header.last_applied, meta.last_log_id
            )));
        }
        // One atomic batch: the old history is replaced by the snapshot's, with the position.
        let mut ops = vec![Op::DeleteRange {
            cf: CF_EVENTS,
            from: vec![0u8; 8],
            to: vec![0xffu8; 9],
        }];
        for event in &events {
            let value = codec::encode(event).map_err(write_error)?;
            ops.push(Op::Put {
                cf: CF_EVENTS,
                key: event.seq.to_be_bytes().to_vec(),
                value,
            });
        }
        let position = (meta.last_log_id, meta.last_membership.clone());
        let value = codec::encode(&position).map_err(write_error)?;
        ops.push(Op::Put {
            cf: CF_META,
            key: KEY_STATE_MACHINE.to_vec(),
            value,
        });
        let _gate = self.write_gate.lock().await;
        self.writer.write_and_wait(&self.shared, ops, true).await?;
        *self
            .core
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = StateMachineCore {
            state,
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
        };
        *self
            .current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some((meta.clone(), bytes));
        crate::metrics::snapshot_installed(events.len());
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        self.shared.check()?;
        let current = self
            .current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        if let Some((meta, bytes)) = current {
            return Ok(Some(Snapshot {
                meta,
                snapshot: Box::new(std::io::Cursor::new(bytes)),
            }));
        }
        // None cached (fresh start): the snapshot is derivable from the stored history.
        if self
            .core
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .last_applied
            .is_none()
        {
            return Ok(None);
        }
        self.build().await.map(Some)
    }
}
