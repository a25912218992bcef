//! What one seed simulates: cluster size, timing and fault mix, all drawn from the seed (swarm
//! testing: every seed picks its own mix, so rare combinations get their turn across many seeds).

use std::fmt;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The configuration of one run, derived from its seed alone.
#[derive(Clone, Debug, PartialEq)]
pub struct SimConfig {
    pub seed: u64,
    /// Voters in the cluster: 3 or 5.
    pub node_count: u64,
    /// Simulated time during which faults are injected.
    pub fault_phase_ms: u64,
    /// Simulated time the cluster gets, after the faults stop, to elect, converge and serve.
    pub converge_timeout_ms: u64,
    pub heartbeat_interval_ms: u64,
    /// Each node's election timeout is drawn from `[min, max)` at every (re)start.
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// One-way message delay is drawn from `[min, max]`; a spread makes messages overtake.
    pub delay_min_ms: u64,
    pub delay_max_ms: u64,
    /// Probability that one message (request or response) is lost, in parts per million.
    pub loss_ppm: u32,
    /// Mean pause between two fault actions.
    pub fault_interval_ms: u64,
    /// Relative weights of the fault actions (0 turns one off).
    pub weight_crash: u32,
    pub weight_restart: u32,
    pub weight_partition: u32,
    pub weight_one_way: u32,
    pub weight_heal: u32,
    pub weight_loss_burst: u32,
    /// Concurrent clients submitting admin commands.
    pub client_count: u32,
    /// Mean pause between two commands of one client.
    pub command_interval_ms: u64,
    /// openraft snapshot policy: build a snapshot after this many entries (small, so snapshots,
    /// purges and snapshot installs happen in every run).
    pub snapshot_after_entries: u64,
    pub logs_kept_after_snapshot: u64,
    pub snapshot_chunk_bytes: u64,
}

impl SimConfig {
    /// The configuration seed `seed` stands for. Uses its own RNG stream, separate from the run's.
    pub fn from_seed(seed: u64) -> SimConfig {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_c0f1_9000_0001);
        let node_count = if rng.gen_bool(0.6) { 3 } else { 5 };
        let heartbeat_interval_ms = rng.gen_range(30..=80);
        let election_timeout_min_ms = heartbeat_interval_ms * rng.gen_range(3..=5);
        let election_timeout_max_ms = election_timeout_min_ms * 2;
        let delay_min_ms = rng.gen_range(0..=3);
        let delay_max_ms = delay_min_ms + rng.gen_range(1..=heartbeat_interval_ms / 2);
        let mut weight = |on: f64, max: u32| {
            if rng.gen_bool(on) {
                rng.gen_range(1..=max)
            } else {
                0
            }
        };
        let weight_crash = weight(0.8, 4);
        let weight_restart = if weight_crash > 0 {
            weight_crash + 1
        } else {
            0
        };
        let weight_partition = weight(0.7, 4);
        let weight_one_way = weight(0.5, 3);
        let weight_heal = if weight_partition + weight_one_way > 0 {
            3
        } else {
            0
        };
        let weight_loss_burst = weight(0.4, 2);
        let loss_ppm = if rng.gen_bool(0.5) {
            rng.gen_range(0..=50_000)
        } else {
            0
        };
        SimConfig {
            seed,
            node_count,
            fault_phase_ms: rng.gen_range(5_000..=15_000),
            converge_timeout_ms: 30_000,
            heartbeat_interval_ms,
            election_timeout_min_ms,
            election_timeout_max_ms,
            delay_min_ms,
            delay_max_ms,
            loss_ppm,
            fault_interval_ms: rng.gen_range(200..=1_500),
            weight_crash,
            weight_restart,
            weight_partition,
            weight_one_way,
            weight_heal,
            weight_loss_burst,
            client_count: rng.gen_range(1..=4),
            command_interval_ms: rng.gen_range(5..=100),
            snapshot_after_entries: rng.gen_range(5..=40),
            logs_kept_after_snapshot: rng.gen_range(0..=10),
            snapshot_chunk_bytes: rng.gen_range(256..=8_192),
        }
    }
}

impl fmt::Display for SimConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed={} nodes={} fault_phase_ms={} heartbeat_ms={} election_ms={}..{} \
             delay_ms={}..{} loss_ppm={} fault_interval_ms={} weights(crash={} restart={} \
             partition={} one_way={} heal={} loss_burst={}) clients={} command_interval_ms={} \
             snapshot_after={} logs_kept={} chunk_bytes={}",
            self.seed,
            self.node_count,
            self.fault_phase_ms,
            self.heartbeat_interval_ms,
            self.election_timeout_min_ms,
            self.election_timeout_max_ms,
            self.delay_min_ms,
            self.delay_max_ms,
            self.loss_ppm,
            self.fault_interval_ms,
            self.weight_crash,
            self.weight_restart,
            self.weight_partition,
            self.weight_one_way,
            self.weight_heal,
            self.weight_loss_burst,
            self.client_count,
            self.command_interval_ms,
            self.snapshot_after_entries,
            self.logs_kept_after_snapshot,
            self.snapshot_chunk_bytes,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_depends_on_seed_only() {
        assert_eq!(SimConfig::from_seed(7), SimConfig::from_seed(7));
        let sizes: std::collections::BTreeSet<u64> = (0..64)
            .map(|seed| SimConfig::from_seed(seed).node_count)
            .collect();
        assert_eq!(sizes, [3, 5].into());
    }
}
