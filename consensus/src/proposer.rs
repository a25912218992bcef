//! The leader's proposal batcher: proposals that arrive while earlier entries are in flight go
//! into one Raft entry together (a `ProposalBatch`).
//!
//! Why: openraft 0.9's core appends each `client_write` as its own log write and waits for that
//! write's fsync before it takes the next request, on the leader and on every follower. One entry
//! per proposal therefore means one fsync per proposal, one after another, whatever the number of
//! writers (about 1,200 proposals/s on a disk whose fsync takes 0.8 ms). Here at most
//! `BATCHES_IN_FLIGHT_MAX` entries are handed to openraft at a time; proposals that arrive
//! meanwhile wait in a queue and share the next entry and its fsyncs. A lone proposal on an idle
//! leader is handed over at once: there is no timer waiting to fill a batch.
//!
//! Paced by the leader's log (`enable_flush_pacing`, wired by `ClusterNode` to the RocksDB store's
//! flush hook): openraft 0.9's leader sends an entry to its followers only after its own fsync of
//! it, and takes the next entry only then. An entry handed over while the previous one is still
//! being flushed would wait in openraft's queue with its content already fixed; so a new entry is
//! cut only once every earlier entry of the term is flushed on the leader, and then takes every
//! proposal waiting. Up to `BATCHES_IN_FLIGHT_PACED_MAX` flushed entries may be replicating and
//! committing at once. Measured on this project's 2-core machine with 64 writers: the old rule
//! (two entries in flight, cut when one is answered) left proposals waiting for a whole commit of
//! the entry ahead; pacing cuts that wait to the leader's fsync. Without pacing (the simulation's
//! in-memory store) the old rule holds: at most `BATCHES_IN_FLIGHT_MAX` entries in flight.
//!
//! Invariants:
//! - Every queued proposal is answered exactly once: with its own outcome once its entry is
//!   applied; with `NotLeader` if openraft refused the entry as not the leader's or dropped it
//!   uncommitted (safe to retry: it was never committed), or if it was still queued when this
//!   node stopped leading (never proposed); with `Unavailable` (outcome unknown) when openraft gave no answer in time.
//! - Proposals enter the log in queue order (entries are handed to openraft under the queue
//!   lock), and their times are made non-decreasing in that order (per Raft instance), so
//!   concurrent callers cannot make the leader's clock step back.
//! - One entry holds at most `PROPOSALS_PER_BATCH_MAX` proposals and `BATCH_BYTES_MAX` encoded
//!   bytes (a larger proposal goes alone), so an AppendEntries of openraft's default 300 entries
//!   stays below the RPC frame limit.
//! - At most `PROPOSALS_WAITING_MAX` proposals wait; more are refused at once, unproposed.
//! - Durability is openraft's: an entry is acknowledged only after a majority flushed it (the
//!   flush hook only decides when the next entry is cut; openraft counts the leader's own copy
//!   from its own `LogFlushed` callback, never from the hook).
//!
//! Not done here: validation (the caller pre-checks, the state machine decides), deduplication,
//! waiting to fill batches.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use openraft::error::ClientWriteError;
use tokio::sync::oneshot;

use crate::domain::{Event, Proposal, TimeMs};
use crate::rpc::ForwardError;
use crate::types::{NodeAddress, ProposalBatch, TypeConfig};

/// Entries handed to openraft and not yet answered. Two keep the leader's log writer busy (one
/// being flushed, the next queued behind it) while the previous entry replicates; more would
/// split the waiting proposals into smaller entries, each costing its own fsync.
pub const BATCHES_IN_FLIGHT_MAX: usize = 2;
/// Entries in flight when the log store reports flushes (`Proposer::enable_flush_pacing`): a new
/// entry is cut only when the leader's log has flushed the previous one, so several can be
/// replicating and committing without splitting the waiting proposals into entries that would
/// queue behind each other's fsyncs.
pub const BATCHES_IN_FLIGHT_PACED_MAX: usize = 4;
/// Most proposals in one entry.
pub const PROPOSALS_PER_BATCH_MAX: usize = 1024;
/// Most encoded proposal bytes in one entry (a single larger proposal goes alone). openraft sends
/// up to 300 entries per AppendEntries: 300 x 128 KiB stays below `rpc::FRAME_BYTES_MAX`.
pub const BATCH_BYTES_MAX: usize = 128 * 1024;

/// Most proposals waiting for an entry; more are refused at once (never proposed).
pub const PROPOSALS_WAITING_MAX: usize = 16 * 1024;

/// What one proposal's caller receives.
pub type Answer = Result<Vec<Event>, ForwardError>;

struct Waiting {
    ticket: u64,
    proposal: Proposal,
    size_bytes: usize,
    reply: oneshot::Sender<Answer>,
}

struct InFlight {
    batch: u64,
    /// Term it was proposed in.
    term: u64,
    /// The leader's log store reported a flush since it was handed over (see `log_flushed`).
    flushed: bool,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Waiting>,
    /// Entries handed to openraft and not yet answered, in the order handed over.
    /// Only those of the current term count against the in-flight limit: an entry of an
    /// earlier term may never be answered (see `answer`) and must not hold up a re-elected leader.
    in_flight: Vec<InFlight>,
    /// Set once the log store reports the leader's own flushes (`log_flushed`).
    flush_paced: bool,
    next_batch: u64,
    /// Time of the last proposal handed to openraft.
    last_time_ms: TimeMs,
    next_ticket: u64,
}

/// One Raft instance's queue of proposals waiting for an entry. Lives in `types::Raft`.
#[derive(Default)]
pub struct Proposer {
    queue: Mutex<Queue>,
}

/// A queued proposal: withdraw it with its ticket, or wait for its answer.
pub struct Ticket {
    pub ticket: u64,
    pub answer: oneshot::Receiver<Answer>,
}

impl Proposer {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues `proposal` (already time-stamped and pre-checked by the leader) and starts an entry
    /// if fewer than `BATCHES_IN_FLIGHT_MAX` are in flight. `timeout` bounds the wait for
    /// openraft's answer to that entry.
    pub fn submit(
        self: &Arc<Proposer>,
        raft: &openraft::Raft<TypeConfig>,
        proposal: Proposal,
        timeout: Duration,
    ) -> Ticket {
        // The size only bounds entries; a proposal that cannot be encoded fails in openraft's
        // log write like before, so count it as large.
        let size_bytes = crate::codec::encode(&proposal).map_or(BATCH_BYTES_MAX, |b| b.len());
        let (reply, answer) = oneshot::channel();
        let ticket = {
            let mut queue = self.lock();
            let ticket = queue.next_ticket;
            queue.next_ticket += 1;
            if queue.waiting.len() >= PROPOSALS_WAITING_MAX {
                let _ = reply.send(Err(ForwardError::Unavailable(format!(
                    "{} proposals already wait for the log; not proposed",
                    queue.waiting.len()
                ))));
                return Ticket { ticket, answer };
            }
            queue.waiting.push_back(Waiting {
                ticket,
                proposal,
                size_bytes,
                reply,
            });
            ticket
        };
        self.start_next(raft, timeout);
        Ticket { ticket, answer }
    }

    /// Takes a proposal back if it is still queued (it then was never proposed).
    pub fn withdraw(&self, ticket: u64) -> bool {
        let mut queue = self.lock();
        match queue.waiting.iter().position(|w| w.ticket == ticket) {
            Some(position) => {
                queue.waiting.remove(position);
                true
            }
            None => false,
        }
    }

    /// Switches to pacing by the leader's own log flushes: from now on the log store calls
    /// `log_flushed` after each flushed append (see `BATCHES_IN_FLIGHT_PACED_MAX`).
    fn enable_flush_pacing(&self) {
        self.lock().flush_paced = true;
    }

    /// The log store flushed one append on this node. On the leader, appends reach the store in
    /// the order entries were handed over, so the oldest entry of the newest term not yet marked
    /// is flushed now (or the append was a blank or membership entry of openraft's own, and the
    /// mark comes one entry early, which only lets the next entry start sooner). Entries of an
    /// earlier term are left alone: a deposed leader's entry may never reach the store, and
    /// marking it would leave the current term's entry unmarked and hold up the next cut by one
    /// flush. Returns whether proposals wait, so the caller should run `start_next`.
    fn log_flushed(&self) -> bool {
        let mut queue = self.lock();
        let newest = queue.in_flight.iter().map(|b| b.term).max();
        if let Some(batch) = queue
            .in_flight
            .iter_mut()
            .find(|b| Some(b.term) == newest && !b.flushed)
        {
            batch.flushed = true;
        }
        !queue.waiting.is_empty()
    }

    /// Wires flush pacing for `raft`: returns the hook the log store calls after each flushed
    /// append (it only marks the flush, so it never blocks the store's writer) and the task that
    /// then cuts the next entry on the runtime. The task ends when the hook is dropped; abort it
    /// on shutdown (it holds `raft`).
    pub fn pace_by_flushes(
        raft: &crate::types::Raft,
        timeout: Duration,
    ) -> (
        impl Fn() + Send + Sync + 'static,
        tokio::task::JoinHandle<()>,
    ) {
        raft.proposer().enable_flush_pacing();
        let (flushed_tx, mut flushed_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let proposer = raft.proposer().clone();
        let hook = move || {
            if proposer.log_flushed() {
                let _ = flushed_tx.send(());
            }
        };
        let raft = raft.clone();
        let task = tokio::spawn(async move {
            while flushed_rx.recv().await.is_some() {
                while flushed_rx.try_recv().is_ok() {}
                raft.proposer().start_next(raft.openraft(), timeout);
            }
        });
        (hook, task)
    }

    /// Proposals waiting for an entry (tests and metrics).
    pub fn queued(&self) -> usize {
        self.lock().waiting.len()
    }

    /// If a slot is free and proposals wait, takes the next batch, hands it to openraft and
    /// spawns the task that answers it. Handed over under the queue lock, so entries enter the
    /// log in queue order (and with it in time order). On a node that does not lead, every
    /// waiting proposal is answered `NotLeader` instead (never proposed: safe to retry).
    ///
    /// Leadership is read from openraft's metrics, never waited on: several tasks waiting on
    /// one metrics `watch` wake in an order tokio draws at random, which would break the
    /// simulation's replay of a seed.
    fn start_next(self: &Arc<Proposer>, raft: &openraft::Raft<TypeConfig>, timeout: Duration) {
        let (node_id, leader, term) = {
            let metrics = raft.metrics();
            let metrics = metrics.borrow();
            (metrics.id, metrics.current_leader, metrics.current_term)
        };
        let (batch, replies, written) = {
            let mut queue = self.lock();
            if queue.waiting.is_empty() {
                return;
            }
            if leader != Some(node_id) {
                for waiting in queue.waiting.drain(..) {
                    let _ = waiting.reply.send(Err(ForwardError::NotLeader { leader }));
                }
                return;
            }
            let busy = queue.in_flight.iter().filter(|b| b.term == term).count();
            let paced = queue.flush_paced;
            let cap = if paced {
                BATCHES_IN_FLIGHT_PACED_MAX
            } else {
                BATCHES_IN_FLIGHT_MAX
            };
            // Paced by the leader's log: while an entry of this term waits for the leader's own
            // fsync, the next one would only queue behind it in openraft's core; proposals that
            // arrive meanwhile are better off sharing the entry cut when that fsync ends.
            let unflushed = paced
                && queue
                    .in_flight
                    .iter()
                    .any(|batch| batch.term == term && !batch.flushed);
            if busy >= cap || unflushed {
                return;
            }
            let batch = queue.next_batch;
            queue.next_batch += 1;
            queue.in_flight.push(InFlight {
                batch,
                term,
                flushed: false,
            });
            let mut replies = Vec::new();
            let mut proposals = Vec::new();
            let mut bytes = 0usize;
            while let Some(next) = queue.waiting.front() {
                let full = proposals.len() >= PROPOSALS_PER_BATCH_MAX
                    || (!proposals.is_empty() && bytes + next.size_bytes > BATCH_BYTES_MAX);
                if full {
                    break;
                }
                let Some(mut waiting) = queue.waiting.pop_front() else {
                    break;
                };
                bytes += waiting.size_bytes;
                waiting.proposal.time_ms = waiting.proposal.time_ms.max(queue.last_time_ms);
                queue.last_time_ms = waiting.proposal.time_ms;
                replies.push(waiting.reply);
                proposals.push(waiting.proposal);
            }
            crate::metrics::batch_proposed(proposals.len());
            // `client_write_ff` only puts the entry on openraft's unbounded channel: it is ready
            // at once unless the core has stopped (then it would wait for the core's error).
            let written = raft
                .client_write_ff(ProposalBatch { proposals })
                .now_or_never();
            (batch, replies, written)
        };
        let answer = match written {
            Some(Ok(answer)) => answer,
            Some(Err(fatal)) => {
                let error = ForwardError::Stopped(fatal.to_string());
                return self.fail(raft, timeout, batch, replies, error);
            }
            None => {
                let error = ForwardError::Stopped("raft is not accepting writes".into());
                return self.fail(raft, timeout, batch, replies, error);
            }
        };
        let proposer = self.clone();
        let raft = raft.clone();
        tokio::spawn(async move { proposer.answer(raft, batch, replies, answer, timeout).await });
    }

    fn fail(
        self: &Arc<Proposer>,
        raft: &openraft::Raft<TypeConfig>,
        timeout: Duration,
        batch: u64,
        replies: Vec<oneshot::Sender<Answer>>,
        error: ForwardError,
    ) {
        for reply in replies {
            let _ = reply.send(Err(error.clone()));
        }
        self.release(raft, timeout, batch);
    }

    /// Ends batch `batch`'s time in flight and starts the next batch if proposals wait.
    fn release(
        self: &Arc<Proposer>,
        raft: &openraft::Raft<TypeConfig>,
        timeout: Duration,
        batch: u64,
    ) {
        self.lock().in_flight.retain(|b| b.batch != batch);
        self.start_next(raft, timeout);
    }

    /// Waits for openraft's answer to one entry and answers each of its proposals. A leader
    /// deposed with the entry in flight may never answer it (openraft answers pending writes only
    /// when it truncates them; found by the simulation, seeds 1418 and 1747): the wait is bounded
    /// by `timeout`, and the entry stops counting against the in-flight limit once the term
    /// changes.
    async fn answer(
        self: Arc<Proposer>,
        raft: openraft::Raft<TypeConfig>,
        batch: u64,
        replies: Vec<oneshot::Sender<Answer>>,
        answer: WriteAnswer,
        timeout: Duration,
    ) {
        let count = replies.len();
        let written = tokio::time::timeout(timeout, answer).await;
        let answers: Vec<Answer> = match written {
            Err(_elapsed) => vec![
                Err(ForwardError::Unavailable(format!(
                    "no answer from raft within {} ms; outcome unknown",
                    timeout.as_millis()
                )));
                count
            ],
            Ok(Err(_closed)) => vec![
                Err(ForwardError::Unavailable(
                    "raft stopped before answering; outcome unknown".into()
                ));
                count
            ],
            Ok(Ok(Ok(response))) if response.data.len() == count => response
                .data
                .into_iter()
                .map(|outcome| outcome.map_err(ForwardError::Rejected))
                .collect(),
            Ok(Ok(Ok(response))) => vec![
                Err(ForwardError::Unavailable(format!(
                    "entry of {count} proposals answered with {} outcomes",
                    response.data.len()
                )));
                count
            ],
            // Refused as not the leader's, or dropped uncommitted when a new leader overwrote
            // it: never committed, so safe to retry.
            Ok(Ok(Err(ClientWriteError::ForwardToLeader(forward)))) => {
                vec![
                    Err(ForwardError::NotLeader {
                        leader: forward.leader_id,
                    });
                    count
                ]
            }
            Ok(Ok(Err(error))) => vec![Err(ForwardError::Unavailable(error.to_string())); count],
        };
        for (reply, answer) in replies.into_iter().zip(answers) {
            // A caller that stopped waiting dropped its receiver; nothing to tell.
            let _ = reply.send(answer);
        }
        self.release(&raft, timeout, batch);
    }
}

/// openraft's receiver of one entry's outcome.
type WriteAnswer = oneshot::Receiver<
    Result<openraft::raft::ClientWriteResponse<TypeConfig>, ClientWriteError<u64, NodeAddress>>,
>;

#[cfg(test)]
mod tests {
    use super::*;

    fn flushed_marks(proposer: &Proposer) -> Vec<(u64, bool)> {
        let queue = proposer.lock();
        queue
            .in_flight
            .iter()
            .map(|b| (b.batch, b.flushed))
            .collect()
    }

    #[test]
    fn a_flush_marks_the_newest_terms_entry_not_a_stale_one() {
        let proposer = Proposer::default();
        {
            let mut queue = proposer.lock();
            queue.flush_paced = true;
            // Entry 0 was handed over in term 3 by a leader that was then deposed; re-elected in
            // term 5, it handed over entries 1 and 2.
            for (batch, term) in [(0, 3), (1, 5), (2, 5)] {
                queue.in_flight.push(InFlight {
                    batch,
                    term,
                    flushed: false,
                });
            }
        }
        assert!(!proposer.log_flushed(), "no proposal waits");
        assert_eq!(
            flushed_marks(&proposer),
            vec![(0, false), (1, true), (2, false)]
        );
        proposer.log_flushed();
        assert_eq!(
            flushed_marks(&proposer),
            vec![(0, false), (1, true), (2, true)]
        );
    }
}
