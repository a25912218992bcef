//! Metrics of the replicated state, all declared here. Names: `cairn_raft_*`, base units.

use crate::types::RaftMetrics;

pub const TERM: &str = "cairn_raft_term";
pub const COMMIT_INDEX: &str = "cairn_raft_commit_index";
/// openraft 0.9's metrics carry no commit index; the last log index and the applied index bound it.
pub const LAST_LOG_INDEX: &str = "cairn_raft_last_log_index";
pub const LAST_APPLIED_INDEX: &str = "cairn_raft_last_applied_index";
pub const APPLY_LAG: &str = "cairn_raft_apply_lag_entries";
pub const IS_LEADER: &str = "cairn_raft_is_leader";
pub const EVENTS_APPLIED: &str = "cairn_raft_events_applied_total";
pub const SNAPSHOT_BUILT_BYTES: &str = "cairn_raft_snapshot_built_bytes";
pub const SNAPSHOTS_INSTALLED: &str = "cairn_raft_snapshots_installed_total";
pub const STORAGE_FAILURES: &str = "cairn_raft_storage_failures_total";
pub const STREAM_FRAMES_DROPPED: &str = "cairn_consensus_stream_frames_dropped_total";
pub const LOG_WRITE_JOBS: &str = "cairn_raft_log_write_jobs";
pub const LOG_WRITE_SECONDS: &str = "cairn_raft_log_write_seconds";
/// From an `append` handed to the writer thread until its entries are synced (queueing included).
pub const LOG_APPEND_FLUSH_SECONDS: &str = "cairn_raft_log_append_flush_seconds";
/// One state machine `apply` call, its RocksDB write included.
pub const APPLY_SECONDS: &str = "cairn_raft_apply_seconds";
/// Leader side: one AppendEntries RPC carrying entries, sent until answered.
pub const APPEND_ENTRIES_RPC_SECONDS: &str = "cairn_raft_append_entries_rpc_seconds";
/// Follower side: handling one AppendEntries carrying entries (its log sync included).
pub const APPEND_ENTRIES_HANDLE_SECONDS: &str = "cairn_raft_append_entries_handle_seconds";
pub const PROPOSE_SECONDS: &str = "cairn_raft_propose_seconds";
pub const PROPOSALS_REJECTED: &str = "cairn_raft_proposals_rejected_total";
/// Proposals per Raft entry the leader wrote (see `proposer`).
pub const BATCH_PROPOSALS: &str = "cairn_raft_batch_proposals";
/// Pre-votes this member held, by outcome (`won`: it then started an election). See `prevote`.
pub const PRE_VOTES_HELD: &str = "cairn_raft_pre_votes_held_total";
/// Pre-vote requests this member answered, by answer (`granted` or `denied`).
pub const PRE_VOTES_ANSWERED: &str = "cairn_raft_pre_votes_answered_total";

pub(crate) fn observe(metrics: &RaftMetrics) {
    metrics::gauge!(TERM).set(metrics.current_term as f64);
    let applied = metrics.last_applied.map(|id| id.index).unwrap_or(0);
    let last_log = metrics.last_log_index.unwrap_or(0);
    metrics::gauge!(LAST_LOG_INDEX).set(last_log as f64);
    metrics::gauge!(LAST_APPLIED_INDEX).set(applied as f64);
    metrics::gauge!(APPLY_LAG).set(last_log.saturating_sub(applied) as f64);
    metrics::gauge!(IS_LEADER).set(if metrics.current_leader == Some(metrics.id) {
        1.0
    } else {
        0.0
    });
}

pub(crate) fn events_applied(count: usize) {
    metrics::counter!(EVENTS_APPLIED).increment(count as u64);
}

pub(crate) fn snapshot_built(bytes: usize) {
    metrics::gauge!(SNAPSHOT_BUILT_BYTES).set(bytes as f64);
}

pub(crate) fn snapshot_installed(_events: usize) {
    metrics::counter!(SNAPSHOTS_INSTALLED).increment(1);
}

pub(crate) fn storage_failed() {
    metrics::counter!(STORAGE_FAILURES).increment(1);
}

pub(crate) fn propose_finished(seconds: f64, rejected: bool) {
    metrics::histogram!(PROPOSE_SECONDS).record(seconds);
    if rejected {
        metrics::counter!(PROPOSALS_REJECTED).increment(1);
    }
}

/// One group commit of the writer thread: how many jobs it merged and how long the write took.
pub(crate) fn log_written(jobs: usize, seconds: f64) {
    metrics::histogram!(LOG_WRITE_JOBS).record(jobs as f64);
    metrics::histogram!(LOG_WRITE_SECONDS).record(seconds);
}

/// The highest log index known committed (openraft 0.9's metrics do not carry it; the log store
/// is told through `save_committed`).
pub fn committed(index: u64) {
    metrics::gauge!(COMMIT_INDEX).set(index as f64);
}

/// The leader handed an entry of `proposals` proposals to Raft.
pub(crate) fn batch_proposed(proposals: usize) {
    metrics::histogram!(BATCH_PROPOSALS).record(proposals as f64);
}

pub(crate) fn log_append_flushed(seconds: f64) {
    metrics::histogram!(LOG_APPEND_FLUSH_SECONDS).record(seconds);
}

pub(crate) fn applied(seconds: f64) {
    metrics::histogram!(APPLY_SECONDS).record(seconds);
}

pub(crate) fn append_entries_sent(seconds: f64) {
    metrics::histogram!(APPEND_ENTRIES_RPC_SECONDS).record(seconds);
}

pub(crate) fn stream_frame_dropped() {
    metrics::counter!(STREAM_FRAMES_DROPPED).increment(1);
}

pub(crate) fn append_entries_handled(seconds: f64) {
    metrics::histogram!(APPEND_ENTRIES_HANDLE_SECONDS).record(seconds);
}

pub(crate) fn pre_vote_held(won: bool) {
    let outcome = if won { "won" } else { "lost" };
    metrics::counter!(PRE_VOTES_HELD, "outcome" => outcome).increment(1);
}

pub(crate) fn pre_vote_answered(granted: bool) {
    let answer = if granted { "granted" } else { "denied" };
    metrics::counter!(PRE_VOTES_ANSWERED, "answer" => answer).increment(1);
}
