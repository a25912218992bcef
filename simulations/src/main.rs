//! `cairn-simulations`: runs many seeds of the deterministic simulation, or reproduces one.
//!
//! `cargo run -p cairn-simulations --release -- --seeds 1000 [--start 5000]`
//! `cargo run -p cairn-simulations --release -- --reproduce 42 [--verbose]`
//! `cargo run -p cairn-simulations --release -- --datapath --seeds 1000 [--bug ack-before-standby]`

use std::process::ExitCode;
use std::time::Instant;

use cairn_simulations::{run_seed_catching, run_seeds, RunOptions};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "Cairn's deterministic simulation: many seeds, or one reproduced")]
struct Args {
    /// How many seeds to run.
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 0)]
    start: u64,
    /// Run this one seed (and print its report or failure).
    #[arg(long)]
    reproduce: Option<u64>,
    /// Print the whole trace as it happens.
    #[arg(long)]
    verbose: bool,
    /// Fail on two leaders in one term (openraft's default leader id allows it).
    #[arg(long)]
    strict_terms: bool,
    /// Let openraft campaign on its own timer, without pre-vote (for comparisons).
    #[arg(long)]
    no_pre_vote: bool,
    /// Run the data path's simulation (mirror cores, failover, resync) instead of Raft's.
    #[arg(long)]
    datapath: bool,
    /// With --datapath: put a real bug back, to see the simulation catch it
    /// (`ack-before-standby`).
    #[arg(long)]
    bug: Option<String>,
    /// Log openraft and consensus with tracing (RUST_LOG filter, e.g. `openraft=debug`).
    #[arg(long)]
    log: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(filter) = &args.log {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .init();
    }
    if args.datapath {
        return run_datapath(&args);
    }
    let options = RunOptions {
        without_pre_vote: args.no_pre_vote,
        verbose: args.verbose,
        strict_terms: args.strict_terms,
    };
    if let Some(seed) = args.reproduce {
        return match run_seed_catching(seed, &options) {
            Ok(report) => {
                println!("{report}");
                println!("trace hash {}", report.trace_hash);
                ExitCode::SUCCESS
            }
            Err(failure) => {
                eprintln!("{failure}");
                ExitCode::FAILURE
            }
        };
    }
    let started = Instant::now();
    let mut simulated_ms = 0u64;
    let mut passed = 0u64;
    let mut elections = 0usize;
    let failures = run_seeds(
        args.start..args.start + args.seeds,
        &options,
        |result| match result {
            Ok(report) => {
                passed += 1;
                simulated_ms += report.simulated_ms;
                elections += report.elections_won;
                println!("{report}");
            }
            Err(failure) => eprintln!("{failure}\n"),
        },
    );
    println!(
        "{} seeds: {passed} passed, {} failed; {:.1} s wall, {:.0} s simulated; {elections} elections won",
        args.seeds,
        failures.len(),
        started.elapsed().as_secs_f64(),
        simulated_ms as f64 / 1000.0
    );
    for failure in &failures {
        println!("FAILED --reproduce {}: {}", failure.seed, failure.violation);
    }
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn run_datapath(args: &Args) -> ExitCode {
    use cairn_simulations::datapath::{run_datapath_seed_catching, Bug, DataOptions};
    let bug = match args.bug.as_deref() {
        None => None,
        Some("ack-before-standby") => Some(Bug::AckBeforeStandby),
        Some(other) => {
            eprintln!("unknown bug {other:?}; known: ack-before-standby");
            return ExitCode::FAILURE;
        }
    };
    let options = DataOptions {
        bug,
        verbose: args.verbose,
    };
    if let Some(seed) = args.reproduce {
        return match run_datapath_seed_catching(seed, &options) {
            Ok(report) => {
                println!("{report}");
                println!("trace hash {}", report.trace_hash);
                ExitCode::SUCCESS
            }
            Err(failure) => {
                eprintln!("{failure}");
                ExitCode::FAILURE
            }
        };
    }
    let started = Instant::now();
    let mut failed = Vec::new();
    for seed in args.start..args.start + args.seeds {
        match run_datapath_seed_catching(seed, &options) {
            Ok(report) => println!("{report}"),
            Err(failure) => {
                eprintln!("{failure}\n");
                failed.push((seed, failure.violation.to_string()));
            }
        }
    }
    println!(
        "{} datapath seeds: {} passed, {} failed; {:.1} s wall",
        args.seeds,
        args.seeds - failed.len() as u64,
        failed.len(),
        started.elapsed().as_secs_f64()
    );
    for (seed, violation) in &failed {
        println!("FAILED --datapath --reproduce {seed}: {violation}");
    }
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
