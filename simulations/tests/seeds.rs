//! Runs a fixed list of seeds through the whole simulation (see the crate docs): every invariant
//! is checked as each run goes and at its end. A failing seed prints its configuration, the end
//! of its trace and `--reproduce <seed>`. Seeds that once failed are kept in `REGRESSION_SEEDS`.

use cairn_simulations::{run_seed_catching, RunOptions};

/// A spread of configurations (3 and 5 nodes, every fault kind), cheap enough for CI.
const CI_SEEDS: &[u64] = &[0, 1, 2, 3, 4, 5, 6, 7];
/// Seeds that found bugs; each must keep passing.
const REGRESSION_SEEDS: &[u64] = &[];

#[test]
fn fixed_seeds_pass() {
    let options = RunOptions::default();
    let mut failures = Vec::new();
    for &seed in CI_SEEDS.iter().chain(REGRESSION_SEEDS) {
        match run_seed_catching(seed, &options) {
            Ok(report) => println!("{report}"),
            Err(failure) => {
                eprintln!("{failure}\n");
                failures.push(seed);
            }
        }
    }
    assert!(failures.is_empty(), "failing seeds: {failures:?} (see --reproduce above)");
}
