//! Metrics of the boot protocol servers (the `metrics` crate facade; the node installs the
//! Prometheus exporter). Labels are bounded enums only: never a MAC or an IP.

use std::time::Duration;

/// DHCP datagrams by decision (`offer`... via message kind, or the ignore reason).
pub const DHCP_REQUESTS_TOTAL: &str = "cairn_bootproto_dhcp_requests_total";
/// Leases whose commit succeeded (and whose ACK was then sent).
pub const DHCP_LEASES_COMMITTED_TOTAL: &str = "cairn_bootproto_dhcp_leases_committed_total";
/// Leases whose commit failed (no ACK sent).
pub const DHCP_LEASES_COMMIT_FAILED_TOTAL: &str = "cairn_bootproto_dhcp_leases_commit_failed_total";
/// Requests dropped because the commit queue was full.
pub const DHCP_COMMIT_QUEUE_FULL_TOTAL: &str = "cairn_bootproto_dhcp_commit_queue_full_total";
/// Leases per commit call.
pub const DHCP_COMMIT_BATCH_LEASES: &str = "cairn_bootproto_dhcp_commit_batch_leases";
/// Duration of one commit call.
pub const DHCP_COMMIT_SECONDS: &str = "cairn_bootproto_dhcp_commit_seconds";
/// TFTP requests by outcome (`finished`, `failed`: refused or timed out, `busy`).
pub const TFTP_TRANSFERS_TOTAL: &str = "cairn_bootproto_tftp_transfers_total";
/// Router advertisements sent.
pub const RA_ADVERTISEMENTS_TOTAL: &str = "cairn_bootproto_ra_advertisements_total";

pub(crate) fn dhcp_request(decision: &'static str) {
    metrics::counter!(DHCP_REQUESTS_TOTAL, "decision" => decision).increment(1);
}

pub(crate) fn dhcp_commit(leases: usize, elapsed: Duration, ok: bool) {
    metrics::histogram!(DHCP_COMMIT_BATCH_LEASES).record(leases as f64);
    metrics::histogram!(DHCP_COMMIT_SECONDS).record(elapsed.as_secs_f64());
    let name = if ok {
        DHCP_LEASES_COMMITTED_TOTAL
    } else {
        DHCP_LEASES_COMMIT_FAILED_TOTAL
    };
    metrics::counter!(name).increment(leases as u64);
}

pub(crate) fn dhcp_commit_queue_full() {
    metrics::counter!(DHCP_COMMIT_QUEUE_FULL_TOTAL).increment(1);
}

pub(crate) fn tftp_transfer(outcome: &'static str) {
    metrics::counter!(TFTP_TRANSFERS_TOTAL, "outcome" => outcome).increment(1);
}

pub(crate) fn ra_advertisement() {
    metrics::counter!(RA_ADVERTISEMENTS_TOTAL).increment(1);
}
