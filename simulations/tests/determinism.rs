//! The same seed twice gives the same run: identical trace hash (every fault, message fate,
//! leader change and client answer, with its simulated time), identical final state hash.

use cairn_simulations::{run_seed, RunOptions};

#[test]
fn same_seed_same_trace() {
    let options = RunOptions::default();
    for seed in [11u64, 12] {
        let first = run_seed(seed, &options).unwrap_or_else(|failure| panic!("{failure}"));
        let second = run_seed(seed, &options).unwrap_or_else(|failure| panic!("{failure}"));
        assert_eq!(
            first.trace_hash, second.trace_hash,
            "seed {seed} gave two different traces ({} and {} lines)",
            first.trace_lines, second.trace_lines
        );
        assert_eq!(first.final_state_hash, second.final_state_hash);
        assert!(
            first.trace_lines > 100,
            "seed {seed} traced only {} lines",
            first.trace_lines
        );
    }
}

#[test]
fn different_seeds_differ() {
    let options = RunOptions::default();
    let a = run_seed(21, &options).unwrap_or_else(|failure| panic!("{failure}"));
    let b = run_seed(22, &options).unwrap_or_else(|failure| panic!("{failure}"));
    assert_ne!(a.trace_hash, b.trace_hash);
}
