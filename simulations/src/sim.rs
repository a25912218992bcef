//! The driver of one run: build the world from the seed, start the cluster, run clients, faults
//! and periodic checks for the fault phase, heal, check convergence, run the final checks.

use std::collections::BTreeMap;
use std::fmt;

use cairn_consensus::domain::{Command, Hash32, Name, NodeId};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::SimConfig;
use crate::faults;
use crate::invariants::{acknowledged, convergence, history, replay, single_leader, Violation};
use crate::trace::Trace;
use crate::workload;
use crate::world::{
    crash_node, lock, new_world, node_address, sleep_ms, start_node, Shared, FORWARD_TIMEOUT_MS,
};

/// Simulated time between two periodic invariant checks.
pub const CHECK_INTERVAL_MS: u64 = 100;
/// Simulated time between two looks at every node's leadership.
pub const LEADER_POLL_MS: u64 = 1;

/// How a run is observed; none of this changes what happens in it, except `without_pre_vote`.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Let openraft campaign on its own timer instead of the pre-vote guard
    /// (`cairn_consensus::prevote`): a different run of the same seed, for comparisons.
    pub without_pre_vote: bool,
    /// Print every trace line as it happens.
    pub verbose: bool,
    /// Fail on two leaders in one term (see `invariants::single_leader`).
    pub strict_terms: bool,
}

/// What a passing run did.
#[derive(Clone, Debug)]
pub struct Report {
    pub seed: u64,
    pub config: SimConfig,
    /// BLAKE3 of the whole trace: equal for two runs of one seed.
    pub trace_hash: String,
    pub trace_lines: u64,
    pub final_state_hash: Hash32,
    pub events_total: usize,
    pub commands_submitted: u64,
    pub commands_acknowledged: usize,
    pub messages_total: u64,
    pub simulated_ms: u64,
    pub multi_leader_terms: usize,
    /// Terms in which some node led: elections won over the run.
    pub elections_won: usize,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {} ok: nodes={} simulated_ms={} events={} submitted={} acknowledged={} \
             messages={} elections_won={} multi_leader_terms={} trace={}",
            self.seed,
            self.config.node_count,
            self.simulated_ms,
            self.events_total,
            self.commands_submitted,
            self.commands_acknowledged,
            self.messages_total,
            self.elections_won,
            self.multi_leader_terms,
            &self.trace_hash[..16]
        )
    }
}

/// A failed run: what broke, the seed's configuration and the end of its trace.
#[derive(Clone, Debug)]
pub struct Failure {
    pub seed: u64,
    pub config: SimConfig,
    pub violation: Violation,
    pub trace_tail: Vec<String>,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "simulation failed: {}", self.violation)?;
        writeln!(f, "config: {}", self.config)?;
        writeln!(f, "last trace lines:")?;
        for line in &self.trace_tail {
            writeln!(f, "  {line}")?;
        }
        write!(
            f,
            "reproduce with: cargo run -p cairn-simulations --release -- --reproduce {}",
            self.seed
        )
    }
}

/// Runs seed `seed` to its end on a fresh current-thread runtime with a paused clock.
pub fn run_seed(seed: u64, options: &RunOptions) -> Result<Report, Failure> {
    let config = SimConfig::from_seed(seed);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => {
            return Err(Failure {
                seed,
                config,
                violation: Violation::new("harness", format!("cannot build the runtime: {error}")),
                trace_tail: Vec::new(),
            })
        }
    };
    runtime.block_on(run(config, options.clone()))
}

async fn run(config: SimConfig, options: RunOptions) -> Result<Report, Failure> {
    let seed = config.seed;
    let rng = ChaCha8Rng::seed_from_u64(seed);
    let mut trace = Trace::default();
    trace.echo = options.verbose;
    let shared = new_world(config.clone(), rng, trace);
    {
        let mut world = lock(&shared);
        world.checks.strict_terms = options.strict_terms;
        world.pre_vote = !options.without_pre_vote;
        world.record(format_args!("config {config}"));
    }
    let outcome = drive(&shared).await;
    // Stop every node so their tasks end before the runtime is dropped.
    let ids: Vec<NodeId> = lock(&shared).nodes.keys().copied().collect();
    for node_id in ids {
        crash_node(&shared, node_id).await;
    }
    let world = lock(&shared);
    let violation = match outcome {
        Err(violation) => Some(violation),
        Ok(()) => world.failure.clone(),
    };
    if let Some(violation) = violation {
        return Err(Failure {
            seed,
            config,
            violation,
            trace_tail: world.trace.tail().cloned().collect(),
        });
    }
    let multi_leader_terms = single_leader::multi_leader_terms(&world.checks);
    let final_state_hash = world
        .nodes
        .values()
        .next()
        .map(|slot| slot.machine.with_state(|state| state.hash()))
        .unwrap_or_default();
    Ok(Report {
        seed,
        trace_hash: world.trace.hash(),
        trace_lines: world.trace.lines_total(),
        final_state_hash,
        events_total: world.checks.history.len(),
        commands_submitted: world.commands_submitted,
        commands_acknowledged: world.checks.acknowledged.len(),
        messages_total: world.checks.messages_total,
        simulated_ms: world.now_ms(),
        multi_leader_terms,
        elections_won: world.checks.leaders_by_term.len(),
        config,
    })
}

fn harness(error: impl fmt::Display) -> Violation {
    Violation::new("harness", error.to_string())
}

fn failed(shared: &Shared) -> bool {
    lock(shared).failure.is_some()
}

async fn drive(shared: &Shared) -> Result<(), Violation> {
    let config = lock(shared).config.clone();
    // Start every node and make them one cluster.
    let ids: Vec<NodeId> = (1..=config.node_count).collect();
    for node_id in &ids {
        start_node(shared, *node_id).await.map_err(harness)?;
    }
    let members: BTreeMap<NodeId, _> = ids.iter().map(|id| (*id, node_address(*id))).collect();
    let first = lock(shared)
        .running(1)
        .ok_or_else(|| harness("node 1 did not start"))?;
    first.raft.initialize(members).await.map_err(harness)?;
    drop(first);

    let checker = tokio::spawn(check_loop(shared.clone()));
    let clients: Vec<_> = (0..config.client_count)
        .map(|client| tokio::spawn(client_loop(shared.clone(), client)))
        .collect();

    // Fault phase.
    let fault_phase_end = lock(shared).now_ms() + config.fault_phase_ms;
    loop {
        let now_ms = lock(shared).now_ms();
        if now_ms >= fault_phase_end || failed(shared) {
            break;
        }
        let pause = lock(shared).rng.gen_range(0..=config.fault_interval_ms * 2);
        sleep_ms(pause).await;
        let fault = faults::draw(&mut lock(shared));
        if let Some(fault) = fault {
            faults::inject(shared, fault).await.map_err(harness)?;
        }
    }

    // Faults stop: heal the network, restart every node, let the clients finish.
    {
        let mut world = lock(shared);
        world.clients_stop = true;
        world.net.heal(true);
        world.record(format_args!("faults stop: network healed"));
    }
    let down = lock(shared).down_ids();
    for node_id in down {
        start_node(shared, node_id).await.map_err(harness)?;
    }
    for client in clients {
        client.await.map_err(harness)?;
    }
    lock(shared).record(format_args!("clients stopped; waiting for convergence"));
    if !failed(shared) {
        converge(shared, &config).await?;
    }
    lock(shared).checks_stop = true;
    checker.await.map_err(harness)?;
    if failed(shared) {
        return Ok(());
    }
    final_checks(shared)
}

/// Liveness: within the convergence timeout, a write through every node succeeds and all nodes
/// reach the same history and state hash.
async fn converge(shared: &Shared, config: &crate::config::SimConfig) -> Result<(), Violation> {
    let deadline = lock(shared).now_ms() + config.converge_timeout_ms;
    let ids: Vec<NodeId> = lock(shared).nodes.keys().copied().collect();
    let actor = Name::new("probe").map_err(harness)?;
    for node_id in &ids {
        let group = Name::new(format!("probe-n{node_id}")).map_err(harness)?;
        loop {
            if lock(shared).now_ms() >= deadline {
                return Err(Violation::new(
                    convergence::NAME,
                    format!(
                        "no write through n{node_id} succeeded within {} ms after the faults stopped",
                        config.converge_timeout_ms
                    ),
                ));
            }
            let service = lock(shared)
                .running(*node_id)
                .ok_or_else(|| harness("node down"))?;
            let command = Command::AddGroup {
                name: group.clone(),
                description: "probe".into(),
            };
            let remaining_ms = {
                let mut world = lock(shared);
                world.record(format_args!("probe submitted via n{node_id}"));
                deadline.saturating_sub(world.now_ms())
            };
            let call = tokio::time::timeout(
                std::time::Duration::from_millis(remaining_ms),
                service.propose(actor.clone(), command),
            );
            let Ok(result) = call.await else {
                return Err(Violation::new(
                    convergence::NAME,
                    format!(
                        "a write through n{node_id} never returned: `propose` was still waiting \
                         {} ms after the faults stopped",
                        config.converge_timeout_ms
                    ),
                ));
            };
            let done = {
                let mut world = lock(shared);
                world.record(format_args!("probe via n{node_id}: {result:?}"));
                match result {
                    Ok(events) => {
                        let ack = acknowledged::Acknowledged {
                            client: u32::MAX,
                            via: *node_id,
                            kind: "probe",
                            events,
                        };
                        if let Err(violation) = acknowledged::record(&mut world.checks, ack) {
                            world.fail(violation);
                        }
                        true
                    }
                    // A retried probe whose first attempt committed: the group exists; done.
                    Err(cairn_consensus::service::ProposeError::Rejected(_)) => true,
                    Err(_) => false,
                }
            };
            if done {
                break;
            }
            sleep_ms(CHECK_INTERVAL_MS).await;
        }
    }
    loop {
        let states: Vec<(NodeId, u64, Hash32)> = {
            let world = lock(shared);
            world
                .nodes
                .iter()
                .map(|(id, slot)| {
                    slot.machine
                        .with_state(|state| (*id, state.last_seq, state.hash()))
                })
                .collect()
        };
        match convergence::check_same(&states) {
            Ok(()) => {
                lock(shared).record(format_args!("converged: {:?}", states[0]));
                return Ok(());
            }
            Err(violation) => {
                if lock(shared).now_ms() >= deadline {
                    return Err(violation);
                }
            }
        }
        sleep_ms(CHECK_INTERVAL_MS).await;
    }
}

/// The periodic checks over every node (running or crashed: the durable state counts).
fn check_all(shared: &Shared) {
    let mut world = lock(shared);
    let machines = world.machines();
    for (node_id, machine) in machines {
        let result = history::check_node(&mut world.checks, node_id, &machine)
            .and_then(|new| replay::check_node(&mut world.checks, node_id, &machine, &new));
        if let Err(violation) = result {
            world.fail(violation);
            return;
        }
    }
}

async fn check_loop(shared: Shared) {
    let mut since_check_ms = 0;
    loop {
        {
            let mut world = lock(&shared);
            single_leader::poll(&mut world);
        }
        if since_check_ms == 0 {
            check_all(&shared);
        }
        since_check_ms = (since_check_ms + LEADER_POLL_MS) % CHECK_INTERVAL_MS;
        {
            let world = lock(&shared);
            if world.checks_stop || world.failure.is_some() {
                return;
            }
        }
        sleep_ms(LEADER_POLL_MS).await;
    }
}

fn final_checks(shared: &Shared) -> Result<(), Violation> {
    check_all(shared);
    let mut world = lock(shared);
    if let Some(violation) = world.failure.clone() {
        return Err(violation);
    }
    let machines = world.machines();
    for (node_id, machine) in machines {
        let events = machine.events(1, usize::MAX);
        history::check_whole(&mut world.checks, node_id, &events)?;
        replay::check_whole(node_id, &machine, &events)?;
        if events.len() != world.checks.history.len() {
            return Err(Violation::new(
                convergence::NAME,
                format!(
                    "n{node_id} holds {} events, the committed history {}",
                    events.len(),
                    world.checks.history.len()
                ),
            ));
        }
    }
    acknowledged::check_final(&world.checks)
}

/// One client: submits random commands to random nodes until told to stop.
async fn client_loop(shared: Shared, client: u32) {
    let Ok(actor) = Name::new(format!("client-{client}")) else {
        return;
    };
    loop {
        let (pause, node_id, command) = {
            let mut world = lock(&shared);
            if world.clients_stop || world.failure.is_some() {
                return;
            }
            let mean = world.config.command_interval_ms;
            let pause = world.rng.gen_range(0..=mean * 2);
            let ids: Vec<NodeId> = world.nodes.keys().copied().collect();
            let node_id = ids.choose(&mut world.rng).copied().unwrap_or(1);
            let node_count = world.config.node_count;
            let command = workload::command(&mut world.rng, node_count);
            (pause, node_id, command)
        };
        sleep_ms(pause).await;
        let kind = command.kind();
        // One client at a time per node: `RaftService::propose` waits on openraft's metrics
        // channel, and tokio's `watch` wakes several waiters in a random order.
        let turn = lock(&shared)
            .nodes
            .get(&node_id)
            .map(|slot| slot.client_turn.clone());
        let Some(turn) = turn else { continue };
        let _turn = turn.lock().await;
        let (service, crashed) = {
            let mut world = lock(&shared);
            if world.clients_stop {
                return;
            }
            world.commands_submitted += 1;
            let service = world.running(node_id);
            let state = if service.is_some() {
                ""
            } else {
                " (node down)"
            };
            world.record(format_args!(
                "client {client} submits {kind} via n{node_id}{state}"
            ));
            (service, world.crash_signal(node_id))
        };
        let Some(service) = service else {
            continue;
        };
        // Bounded: a proposal stuck on a crashed node must not hold the client forever. The
        // crash signal ends the call as soon as the node crashes (biased: checked first), before
        // openraft's shutdown wakes its waiters in tokio's random order.
        let call = tokio::time::timeout(
            std::time::Duration::from_millis(FORWARD_TIMEOUT_MS * 2),
            service.propose(actor.clone(), command),
        );
        let result = tokio::select! {
            biased;
            _ = crashed => None,
            result = call => Some(result),
        };
        drop(service);
        let mut world = lock(&shared);
        let Some(result) = result else {
            world.record(format_args!(
                "client {client} {kind} lost its connection: n{node_id} crashed"
            ));
            continue;
        };
        match result {
            Ok(Ok(events)) => {
                let seqs: Vec<u64> = events.iter().map(|event| event.seq).collect();
                world.record(format_args!(
                    "client {client} {kind} acknowledged: seqs {seqs:?}"
                ));
                let ack = acknowledged::Acknowledged {
                    client,
                    via: node_id,
                    kind,
                    events,
                };
                if let Err(violation) = acknowledged::record(&mut world.checks, ack) {
                    world.fail(violation);
                }
            }
            Ok(Err(error)) => {
                world.record(format_args!("client {client} {kind} failed: {error}"));
            }
            Err(_elapsed) => {
                world.record(format_args!("client {client} {kind} timed out"));
            }
        }
    }
}

/// Runs many seeds and returns the failures (for the binary and the CI test).
pub fn run_seeds(
    seeds: impl IntoIterator<Item = u64>,
    options: &RunOptions,
    mut on_result: impl FnMut(&Result<Report, Failure>),
) -> Vec<Failure> {
    let mut failures = Vec::new();
    for seed in seeds {
        let result = run_seed_catching(seed, options);
        on_result(&result);
        if let Err(failure) = result {
            failures.push(failure);
        }
    }
    failures
}

/// `run_seed`, with a panic anywhere in the run turned into a failure that names the seed.
pub fn run_seed_catching(seed: u64, options: &RunOptions) -> Result<Report, Failure> {
    let options = options.clone();
    match std::panic::catch_unwind(move || run_seed(seed, &options)) {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "non-string panic".into());
            Err(Failure {
                seed,
                config: SimConfig::from_seed(seed),
                violation: Violation::new("no_panic", message),
                trace_tail: Vec::new(),
            })
        }
    }
}
