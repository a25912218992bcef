//! In-memory log store and state machine for the deterministic simulation and tests. Same apply
//! logic (`StateMachineCore`) and snapshot format as the RocksDB store; no I/O.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine};
use openraft::{OptionalSend, RaftLogReader, RaftSnapshotBuilder};

use super::snapshot::{self, Header};
use super::{read_error, StateMachineCore};
use crate::domain::{Event, Seq, State};
use crate::types::{
    BatchOutcome, Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
    Vote,
};

#[derive(Default)]
struct MemLog {
    vote: Option<Vote>,
    committed: Option<LogId>,
    last_purged: Option<LogId>,
    entries: BTreeMap<u64, Entry>,
}

/// The Raft log in memory. Clones share the same log.
#[derive(Clone, Default)]
pub struct MemLogStore {
    inner: Arc<Mutex<MemLog>>,
}

impl MemLogStore {
    pub fn new() -> MemLogStore {
        MemLogStore::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemLog> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl RaftLogReader<TypeConfig> for MemLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        Ok(self
            .lock()
            .entries
            .range(range)
            .map(|(_, entry)| entry.clone())
            .collect())
    }
}

impl RaftLogStorage<TypeConfig> for MemLogStore {
    type LogReader = MemLogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let log = self.lock();
        let last_log_id = log
            .entries
            .values()
            .next_back()
            .map(|entry| entry.log_id)
            .or(log.last_purged);
        Ok(LogState {
            last_purged_log_id: log.last_purged,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.lock().vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(self.lock().vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.lock().committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.lock().committed)
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
        let mut log = self.lock();
        for entry in entries {
            log.entries.insert(entry.log_id.index, entry);
        }
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut log = self.lock();
        let _removed = log.entries.split_off(&log_id.index);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut log = self.lock();
        log.last_purged = Some(log_id);
        log.entries = log.entries.split_off(&(log_id.index + 1));
        Ok(())
    }
}

#[derive(Default)]
struct MemMachine {
    core: StateMachineCore,
    events: Vec<Event>,
    current: Option<(SnapshotMeta, Vec<u8>)>,
}

/// The state machine in memory: the history as a vector plus the projection. Clones share it.
#[derive(Clone, Default)]
pub struct MemStateMachine {
    inner: Arc<Mutex<MemMachine>>,
    snapshot_counter: Arc<AtomicU64>,
}

impl MemStateMachine {
    pub fn new() -> MemStateMachine {
        MemStateMachine::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemMachine> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn with_state<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.lock().core.state)
    }

    pub fn events(&self, from_seq: Seq, limit: usize) -> Vec<Event> {
        let machine = self.lock();
        let start = (from_seq.max(1) - 1) as usize;
        machine
            .events
            .iter()
            .skip(start)
            .take(limit)
            .cloned()
            .collect()
    }

    fn build(&self) -> Result<Snapshot, StorageError> {
        let mut machine = self.lock();
        let header = Header {
            last_applied: machine.core.last_applied,
            membership: machine.core.membership.clone(),
            event_count: machine.events.len() as u64,
        };
        let mut writer = snapshot::Writer::new(&header).map_err(read_error)?;
        for event in &machine.events {
            writer.push(event).map_err(read_error)?;
        }
        let bytes = writer.finish(&header).map_err(read_error)?;
        let meta = super::rocks::snapshot_meta(
            &header,
            self.snapshot_counter.fetch_add(1, Ordering::SeqCst),
        );
        machine.current = Some((meta.clone(), bytes.clone()));
        Ok(Snapshot {
            meta,
            snapshot: Box::new(std::io::Cursor::new(bytes)),
        })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for MemStateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        self.build()
    }
}

impl RaftStateMachine<TypeConfig> for MemStateMachine {
    type SnapshotBuilder = MemStateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let machine = self.lock();
        Ok((machine.core.last_applied, machine.core.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<BatchOutcome>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut machine = self.lock();
        let mut outcomes = Vec::new();
        for entry in entries {
            let (outcome, events) = machine.core.apply_entry(&entry);
            machine.events.extend(events);
            outcomes.push(outcome);
        }
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
        let bytes = snapshot.into_inner();
        let (header, events, state) = snapshot::read_all(&bytes).map_err(read_error)?;
        if header.last_applied != meta.last_log_id {
            return Err(read_error(format!(
                "snapshot content is at {:?} but its meta says {:?}",
                header.last_applied, meta.last_log_id
            )));
        }
        let mut machine = self.lock();
        machine.core = StateMachineCore {
            state,
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
        };
        machine.events = events;
        machine.current = Some((meta.clone(), bytes));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let (current, applied) = {
            let machine = self.lock();
            (machine.current.clone(), machine.core.last_applied)
        };
        if let Some((meta, bytes)) = current {
            return Ok(Some(Snapshot {
                meta,
                snapshot: Box::new(std::io::Cursor::new(bytes)),
            }));
        }
        if applied.is_none() {
            return Ok(None);
        }
        self.build().map(Some)
    }
}
