//! Threads that run plain READs for every connection of a [`super::Target`], so the commands
//! of one connection are read (and, for volumes, verified) on several cores at once while the
//! connection task frames input and writes responses.
//!
//! One pool per `Target`, shared by all its connections: a fixed number of threads
//! ([`ReadPool::threads`], the machine's parallelism, at most [`READ_THREADS_MAX`]) pulling
//! jobs from one FIFO queue, so a busy session does not get more threads than the machine has
//! cores, and sessions are served in arrival order. Threads start with the first job and end
//! when the `Target` and every connection are gone. A job's outcome goes back to its
//! connection through a channel; a connection that closed meanwhile drops it.
//!
//! Not done here: priorities between sessions, cancelling a job that started.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::connection::Command;
use crate::scsi::ScsiResult;

/// Most read threads one pool starts, whatever the machine's parallelism.
pub const READ_THREADS_MAX: usize = 16;

/// Plain READs to run in order, and where their outcomes go (all at once, one wake-up of the
/// connection per job).
pub(crate) struct ReadJob {
    /// Each with a buffer to read into (from the connection's pool), sized by the job.
    pub(crate) commands: Vec<(Command, Vec<u8>)>,
    pub(crate) reply: tokio::sync::mpsc::UnboundedSender<Vec<(u32, ScsiResult)>>,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<ReadJob>,
    threads_started: usize,
    /// Threads waiting for a job.
    idle: usize,
    closed: bool,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
}

fn lock(shared: &Shared) -> MutexGuard<'_, Queue> {
    shared
        .queue
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(crate) struct ReadPool {
    shared: Arc<Shared>,
    threads: usize,
}

impl Default for ReadPool {
    fn default() -> Self {
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .clamp(1, READ_THREADS_MAX);
        ReadPool {
            shared: Arc::new(Shared::default()),
            threads,
        }
    }
}

impl ReadPool {
    /// Queues a job; starts a thread when none is idle and the pool is not at its size.
    pub(crate) fn submit(&self, job: ReadJob) {
        let mut queue = lock(&self.shared);
        queue.jobs.push_back(job);
        if queue.idle > 0 {
            drop(queue);
            self.shared.ready.notify_one();
            return;
        }
        if queue.threads_started < self.threads {
            let shared = self.shared.clone();
            let spawned = std::thread::Builder::new()
                .name("cairn-iscsi-read".into())
                .spawn(move || worker(&shared));
            if spawned.is_ok() {
                queue.threads_started += 1;
            } else if queue.threads_started == 0 {
                // No thread at all: run it here rather than never (the caller's thread).
                let job = queue.jobs.pop_back();
                drop(queue);
                if let Some(job) = job {
                    run(job);
                }
            }
        }
    }
}

impl Drop for ReadPool {
    fn drop(&mut self) {
        lock(&self.shared).closed = true;
        self.shared.ready.notify_all();
    }
}

fn worker(shared: &Shared) {
    loop {
        let job = {
            let mut queue = lock(shared);
            loop {
                if let Some(job) = queue.jobs.pop_front() {
                    break job;
                }
                if queue.closed {
                    queue.threads_started -= 1;
                    return;
                }
                queue.idle += 1;
                queue = shared
                    .ready
                    .wait(queue)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                queue.idle -= 1;
            }
        };
        run(job);
    }
}

/// Runs one plain READ into the job's buffer: the fast path when the LUN allows it (no unit
/// attention, reservation or stopped unit), the full command otherwise.
fn run(job: ReadJob) {
    let ReadJob { commands, reply } = job;
    let results = commands
        .into_iter()
        .map(|(command, mut buffer)| (command.itt, read_command(&command, &mut buffer)))
        .collect();
    // The connection may have closed: then nobody wants the answers.
    let _ = reply.send(results);
}

pub(crate) fn read_command(command: &Command, buffer: &mut Vec<u8>) -> ScsiResult {
    let lun = &command.target.lun;
    match lun.try_fast_read(&command.nexus, command.lun, &command.cdb, buffer) {
        Some(result) if result.status == crate::scsi::sense::GOOD => {
            ScsiResult::good(std::mem::take(buffer))
        }
        Some(result) => result,
        None => lun.execute(&command.nexus, command.lun, &command.cdb, &command.data_out),
    }
}
