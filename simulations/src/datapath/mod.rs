//! The data path's simulation: the real mirror cores (`cairn_blockstore::mirror::{Primary,
//! Standby}`) on N nodes, the real domain (`State::execute`) deciding who is primary and
//! standby at which generation, simulated initiators that write, flush and read through the
//! session's primary and move to another node when it fails, and faults.
//!
//! # The world
//!
//! One seed picks a configuration ([`DataConfig`], swarm style: 3 to 5 nodes, 1 to 3 sessions,
//! persistent or not, layer size, message loss and delay, fault rate, power loss or not, disk
//! faults or not) and seeds the one RNG of the run. Time is simulated in 5 ms ticks with
//! messages delivered in between, in a deterministic order; nothing reads the system clock
//! except the base `Instant` the cores' times are offsets of. The same seed gives the same
//! trace (its hash is in the report).
//!
//! - **Nodes** run the node's shell logic: a reconciler that turns the committed sessions into
//!   `Primary` and `Standby` cores (promotion, "standby dropped", standby added with its resync
//!   mode; a node that restarts as the primary of an older generation asks for a failover
//!   instead of serving a copy that may lack acknowledged writes), a primary that applies a
//!   write locally, submits it and answers once the core says the standby holds it, a standby
//!   that applies, flushes and digests its copy, and the proposals the cores' events call for.
//! - **Storage** is a model of a layer's copy (`model::Copy`): a crash keeps or loses each
//!   unflushed block by a coin flip, as the volume's durability contract allows.
//! - **The configuration master** executes the nodes' proposals with the real domain and sends
//!   the new state to every node it reaches, marks a node down after a second without pings
//!   (which fails its sessions over or drops it as standby), and gives degraded sessions a new
//!   standby. It stands in for the Raft cluster, which `sim` simulates on its own: the
//!   decisions are the same code, the replication of them is not simulated here.
//! - **Faults**, one at a time on a healthy cluster (what the system is meant to ride out
//!   without losing an acknowledged write): crashes (with restart), a node cut off from the
//!   other nodes and the leader while its initiators still reach it, a cut link between two
//!   nodes, a failed fsync (the node stops), message loss, delay and reordering on the mirror
//!   streams. Some seeds also lose power on every node at once, after which only flushed
//!   writes must survive.
//!
//! # Invariants (`invariants/`, one file each)
//!
//! No acknowledged write lost (every read), no flushed write lost (the final sweep), one
//! acknowledging node per generation, no stale read after a failover, both copies equal after
//! the resync (at the end, once every session has an in-sync standby and is idle).
//!
//! # The reintroduced bug
//!
//! `--bug ack-before-standby` (`Bug::AckBeforeStandby`) makes the primary answer a write once
//! it is applied locally, without waiting for the standby: the seeds in CI must catch it.
//!
//! Not simulated yet: reboots of a client (a new boot resets a non-persistent layer), drains,
//! partial writes and unmaps from the initiator (the cores see whole-block writes), and Raft
//! itself under the configuration master.

pub mod invariants;
pub mod model;
pub mod world;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use invariants::Violation;
use world::{DataStats, World};

/// A real bug put back behind a switch, to show the simulation finds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bug {
    /// The primary acknowledges a write before the standby holds it.
    AckBeforeStandby,
}

/// One seed's configuration.
#[derive(Clone, Debug)]
pub struct DataConfig {
    pub nodes: usize,
    pub sessions: usize,
    pub persistent: Vec<bool>,
    pub block_count: u64,
    pub loss_per_mille: u32,
    pub delay_us_min: u64,
    pub delay_us_max: u64,
    pub fault_per_million_ticks: u32,
    pub power_loss: bool,
    pub disk_faults: bool,
    /// Faults happen until here (µs).
    pub faults_until_us: u64,
    /// Initiators stop issuing new operations from here (µs), so the run can settle.
    pub quiet_from_us: u64,
}

impl DataConfig {
    pub fn for_seed(rng: &mut ChaCha8Rng) -> DataConfig {
        let sessions = rng.gen_range(1..=3);
        let delay_us_min = rng.gen_range(50..500);
        DataConfig {
            nodes: rng.gen_range(3..=5),
            sessions,
            persistent: (0..sessions).map(|_| rng.gen_bool(0.5)).collect(),
            block_count: rng.gen_range(40..=700),
            loss_per_mille: if rng.gen_bool(0.5) {
                rng.gen_range(0..60)
            } else {
                0
            },
            delay_us_min,
            delay_us_max: delay_us_min + rng.gen_range(0..5_000),
            fault_per_million_ticks: rng.gen_range(2_000..20_000),
            power_loss: rng.gen_bool(0.2),
            disk_faults: rng.gen_bool(0.5),
            faults_until_us: 15_000_000,
            quiet_from_us: 20_000_000,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct DataOptions {
    pub bug: Option<Bug>,
    pub verbose: bool,
}

/// What a passing seed did.
#[derive(Debug)]
pub struct DataReport {
    pub seed: u64,
    pub config: DataConfig,
    pub stats: DataStats,
    pub converged_at_ms: u64,
    pub trace_hash: String,
}

impl std::fmt::Display for DataReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.stats;
        write!(
            f,
            "seed {}: {} nodes, {} sessions: {} writes, {} flushes, {} reads checked; {} crashes, \
             {} isolations, {} cuts, {} disk faults, {} power losses; {} failovers, {} standbys \
             dropped, {} resyncs; converged at {} ms",
            self.seed,
            self.config.nodes,
            self.config.sessions,
            s.writes_acknowledged,
            s.flushes_acknowledged,
            s.reads_checked,
            s.crashes,
            s.isolations,
            s.cuts,
            s.disk_faults,
            s.power_losses,
            s.failovers,
            s.standbys_dropped,
            s.resyncs_completed,
            self.converged_at_ms
        )
    }
}

/// A failing seed: the violation, the configuration, the end of the trace.
#[derive(Debug)]
pub struct DataFailure {
    pub seed: u64,
    pub violation: Violation,
    pub config: DataConfig,
    pub trace_tail: Vec<String>,
}

impl std::fmt::Display for DataFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "datapath seed {} failed: {}", self.seed, self.violation)?;
        writeln!(f, "configuration: {:?}", self.config)?;
        writeln!(f, "last trace lines:")?;
        for line in &self.trace_tail {
            writeln!(f, "  {line}")?;
        }
        write!(
            f,
            "reproduce: cargo run -p cairn-simulations --release -- --datapath --reproduce {} --verbose",
            self.seed
        )
    }
}

/// Simulated time after the faults within which every session must have converged.
const CONVERGE_DEADLINE_US: u64 = 60_000_000;

pub fn run_datapath_seed(seed: u64, options: &DataOptions) -> Result<DataReport, DataFailure> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xda7a_9a7e);
    let config = DataConfig::for_seed(&mut rng);
    let mut world = World::new(seed, config.clone(), options.bug, rng);
    world.trace.echo = options.verbose;
    let fail = |world: &World, violation: Violation| DataFailure {
        seed,
        violation,
        config: world.config.clone(),
        trace_tail: world.trace.tail().cloned().collect(),
    };
    if let Err(violation) = world.run_until(config.faults_until_us, true) {
        return Err(fail(&world, violation));
    }
    world.heal_all();
    if let Err(violation) = world.run_until(config.quiet_from_us, false) {
        return Err(fail(&world, violation));
    }
    loop {
        if world.converged() {
            break;
        }
        if world.now_ms() * 1_000 > config.quiet_from_us + CONVERGE_DEADLINE_US {
            let violation = Violation {
                invariant: "convergence",
                detail: "sessions did not all reach an in-sync standby and go idle within 60 s \
                         after the faults"
                    .into(),
            };
            return Err(fail(&world, violation));
        }
        let until = world.now_ms() * 1_000 + 100_000;
        if let Err(violation) = world.run_until(until, false) {
            return Err(fail(&world, violation));
        }
    }
    if let Err(violation) = world.final_checks() {
        return Err(fail(&world, violation));
    }
    Ok(DataReport {
        seed,
        config,
        stats: world.stats.clone(),
        converged_at_ms: world.now_ms(),
        trace_hash: world.trace.hash(),
    })
}

/// `run_datapath_seed`, with a panic anywhere in the run turned into a failure naming the seed.
pub fn run_datapath_seed_catching(
    seed: u64,
    options: &DataOptions,
) -> Result<DataReport, DataFailure> {
    let options = options.clone();
    match std::panic::catch_unwind(move || run_datapath_seed(seed, &options)) {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            Err(DataFailure {
                seed,
                violation: Violation {
                    invariant: "no panic",
                    detail: message,
                },
                config: DataConfig::for_seed(&mut ChaCha8Rng::seed_from_u64(seed ^ 0xda7a_9a7e)),
                trace_tail: Vec::new(),
            })
        }
    }
}
