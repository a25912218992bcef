//! Runs a fixed list of seeds through the whole simulation (see the crate docs): every invariant
//! is checked as each run goes and at its end. A failing seed prints its configuration, the end
//! of its trace and `--reproduce <seed>`. Seeds that once failed are kept in `REGRESSION_SEEDS`.
//! About 0.2 s per seed in a debug build.

use cairn_simulations::{run_seed_catching, RunOptions};

/// A spread of configurations (3 and 5 nodes, every fault kind), cheap enough for CI.
const CI_SEEDS: std::ops::Range<u64> = 0..48;
/// Seeds that found bugs; each must keep passing.
/// - 1418, 1747: `RaftService::propose_as_leader` awaited `client_write` with no deadline; a
///   restarted node that resumed leadership of its old term, accepted a write and was then deposed
///   (its uncommitted entry replaced through a snapshot install) never answered: `propose` hung.
///   Fixed by bounding the wait (the outcome is then reported unknown).
const REGRESSION_SEEDS: &[u64] = &[1418, 1747];

#[test]
fn fixed_seeds_pass() {
    let options = RunOptions::default();
    let mut failures = Vec::new();
    let mut runs = 0;
    for seed in CI_SEEDS.chain(REGRESSION_SEEDS.iter().copied()) {
        runs += 1;
        match run_seed_catching(seed, &options) {
            Ok(report) => println!("{report}"),
            Err(failure) => {
                eprintln!("{failure}\n");
                failures.push(seed);
            }
        }
    }
    assert!(runs >= 48);
    assert!(
        failures.is_empty(),
        "failing seeds: {failures:?} (see --reproduce above)"
    );
}
