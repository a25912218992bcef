//! The simulated world: every node's durable storage and running Raft, the network's state, the
//! run's RNG and trace, and the invariant checkers' state. One `World` behind one mutex, shared by
//! every task of the run; the lock is never held across an `.await`.
//!
//! Determinism: all tasks run on one current-thread tokio runtime with a paused clock, so task
//! order is a function of the run's history; every random choice (faults, message fates, client
//! commands, election timeouts) is drawn from `World::rng`, seeded by the run's seed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use cairn_consensus::domain::{NodeId, TimeMs};
use cairn_consensus::network::NetworkFactory;
use cairn_consensus::service::{Clock, RaftService, ServiceTimeouts};
use cairn_consensus::store::mem::{MemLogStore, MemStateMachine};
use cairn_consensus::types::{NodeAddress, Raft};
use openraft::SnapshotPolicy;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use tokio::time::Instant;

use crate::config::SimConfig;
use crate::invariants::{Checks, Violation};
use crate::network::{NetState, SimTransport};
use crate::trace::Trace;

/// The leaders' clocks start here (2026-01-01T00:00:00Z), plus a per-node skew.
pub const SIM_EPOCH_MS: TimeMs = 1_767_225_600_000;
/// Largest clock skew of a node against simulated time, either way.
pub const CLOCK_SKEW_MS_MAX: i64 = 2_000;
/// Deadline of a forwarded write (and how long a write looks for a leader).
pub const FORWARD_TIMEOUT_MS: u64 = 3_000;

pub type Service = RaftService<MemStateMachine, SimTransport>;

/// One node: what survives a crash (its stores, as fsynced data would) and what does not (the
/// running Raft).
pub struct NodeSlot {
    pub log: MemLogStore,
    pub machine: MemStateMachine,
    pub running: Option<Arc<Service>>,
    /// Bumped at every start; a reply computed by an earlier incarnation is never delivered.
    pub incarnation: u64,
    pub clock_skew_ms: i64,
    /// Fired (dropped) when this node crashes: a client's call to it ends at once, as a reset
    /// connection would end it.
    pub crash_signals: Vec<tokio::sync::oneshot::Sender<()>>,
    /// Clients of this node take turns (see `sim::client_loop`).
    pub client_turn: Arc<tokio::sync::Mutex<()>>,
}

pub struct World {
    pub config: SimConfig,
    pub rng: ChaCha8Rng,
    pub trace: Trace,
    pub start: Instant,
    pub net: NetState,
    pub nodes: BTreeMap<NodeId, NodeSlot>,
    pub checks: Checks,
    /// The first invariant violation; the run stops at the next step once set.
    pub failure: Option<Violation>,
    pub clients_stop: bool,
    pub checks_stop: bool,
    pub commands_submitted: u64,
    /// Elections go through the pre-vote guard (on unless `RunOptions::without_pre_vote`).
    pub pre_vote: bool,
}

pub type Shared = Arc<Mutex<World>>;

pub fn lock(shared: &Mutex<World>) -> MutexGuard<'_, World> {
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Simulated milliseconds since the run started.
pub fn elapsed_ms(start: Instant) -> u64 {
    Instant::now().duration_since(start).as_millis() as u64
}

impl World {
    /// Every node's state machine, running or crashed (the durable state counts).
    pub fn machines(&self) -> Vec<(NodeId, MemStateMachine)> {
        self.nodes
            .iter()
            .map(|(id, slot)| (*id, slot.machine.clone()))
            .collect()
    }

    pub fn now_ms(&self) -> u64 {
        elapsed_ms(self.start)
    }

    pub fn record(&mut self, line: std::fmt::Arguments<'_>) {
        let now = self.now_ms();
        self.trace.record(now, line);
    }

    /// Records the first violation (later ones are consequences).
    pub fn fail(&mut self, violation: Violation) {
        self.record(format_args!("VIOLATION {violation}"));
        if self.failure.is_none() {
            self.failure = Some(violation);
        }
    }

    pub fn running(&self, node_id: NodeId) -> Option<Arc<Service>> {
        self.nodes
            .get(&node_id)
            .and_then(|slot| slot.running.clone())
    }

    /// A receiver that resolves when `node_id` crashes.
    pub fn crash_signal(&mut self, node_id: NodeId) -> tokio::sync::oneshot::Receiver<()> {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        if let Some(slot) = self.nodes.get_mut(&node_id) {
            slot.crash_signals.retain(|sender| !sender.is_closed());
            slot.crash_signals.push(sender);
        }
        receiver
    }

    pub fn running_ids(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, slot)| slot.running.is_some())
            .map(|(id, _)| *id)
            .collect()
    }

    pub fn down_ids(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, slot)| slot.running.is_none())
            .map(|(id, _)| *id)
            .collect()
    }
}

pub fn node_address(node_id: NodeId) -> NodeAddress {
    NodeAddress {
        raft: format!("sim-node-{node_id}"),
        api: format!("sim-api-{node_id}"),
    }
}

/// Creates the world with `config.node_count` nodes, none running yet.
pub fn new_world(config: SimConfig, rng: ChaCha8Rng, trace: Trace) -> Shared {
    let mut world = World {
        nodes: BTreeMap::new(),
        net: NetState::new(config.loss_ppm),
        config,
        rng,
        trace,
        start: Instant::now(),
        checks: Checks::default(),
        failure: None,
        clients_stop: false,
        checks_stop: false,
        commands_submitted: 0,
        pre_vote: true,
    };
    for node_id in 1..=world.config.node_count {
        let clock_skew_ms = world.rng.gen_range(-CLOCK_SKEW_MS_MAX..=CLOCK_SKEW_MS_MAX);
        world.nodes.insert(
            node_id,
            NodeSlot {
                log: MemLogStore::new(),
                machine: MemStateMachine::new(),
                running: None,
                incarnation: 0,
                clock_skew_ms,
                client_turn: Arc::default(),
                crash_signals: Vec::new(),
            },
        );
    }
    Arc::new(Mutex::new(world))
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("node {0} does not exist")]
    Unknown(NodeId),
    #[error("raft config for node {node_id}: {reason}")]
    Config { node_id: NodeId, reason: String },
    #[error("raft for node {node_id} did not start: {reason}")]
    Start { node_id: NodeId, reason: String },
}

/// Starts (or restarts) `node_id` on its durable stores. openraft draws the election timeout
/// with the thread RNG, so each start gets a one-value range `[t, t+1)` with `t` drawn from the
/// run's RNG: deterministic, and still different between nodes and restarts.
pub async fn start_node(shared: &Shared, node_id: NodeId) -> Result<(), NodeError> {
    let (raft_config, log, machine, transport, clock, guard_seed, pre_vote) = {
        let mut world = lock(shared);
        let guard_seed = world.rng.gen::<u64>();
        let pre_vote = world.pre_vote;
        let config = world.config.clone();
        let election_timeout_min = world
            .rng
            .gen_range(config.election_timeout_min_ms..config.election_timeout_max_ms);
        let start = world.start;
        let slot = world
            .nodes
            .get_mut(&node_id)
            .ok_or(NodeError::Unknown(node_id))?;
        if slot.running.is_some() {
            return Ok(());
        }
        slot.incarnation += 1;
        let skew = slot.clock_skew_ms;
        let clock: Clock = Arc::new(move || SIM_EPOCH_MS + elapsed_ms(start) as TimeMs + skew);
        let raft_config = openraft::Config {
            cluster_name: "cairn-sim".into(),
            heartbeat_interval: config.heartbeat_interval_ms,
            election_timeout_min,
            election_timeout_max: election_timeout_min + 1,
            install_snapshot_timeout: config.heartbeat_interval_ms * 10,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_after_entries),
            max_in_snapshot_log_to_keep: config.logs_kept_after_snapshot,
            snapshot_max_chunk_size: config.snapshot_chunk_bytes,
            purge_batch_size: 1,
            // Elections go through pre-vote, as on a real node (`cairn_consensus::prevote`).
            enable_elect: !pre_vote,
            ..Default::default()
        }
        .validate()
        .map_err(|error| NodeError::Config {
            node_id,
            reason: error.to_string(),
        })?;
        let log = slot.log.clone();
        let machine = slot.machine.clone();
        let incarnation = slot.incarnation;
        world.record(format_args!(
            "start n{node_id} incarnation={incarnation} election_timeout_ms={election_timeout_min}"
        ));
        let transport = SimTransport::new(node_id, Arc::downgrade(shared));
        (
            raft_config,
            log,
            machine,
            transport,
            clock,
            guard_seed,
            pre_vote,
        )
    };
    let network = NetworkFactory::new(node_id, transport.clone());
    let raft = Raft::new(
        node_id,
        Arc::new(raft_config),
        network,
        log,
        machine.clone(),
    )
    .await
    .map_err(|error| NodeError::Start {
        node_id,
        reason: error.to_string(),
    })?;
    let service = Arc::new(RaftService {
        node_id,
        raft: raft.clone(),
        state: machine,
        transport,
        clock,
        timeouts: ServiceTimeouts {
            forward_timeout_ms: FORWARD_TIMEOUT_MS,
            membership_timeout_ms: FORWARD_TIMEOUT_MS * 4,
        },
    });
    // Ends by itself once the service is dropped (crash) or its Raft stops.
    if pre_vote {
        drop(cairn_consensus::prevote::spawn_campaign_guard(
            &service, guard_seed,
        ));
    }
    let incarnation = {
        let mut world = lock(shared);
        let slot = world
            .nodes
            .get_mut(&node_id)
            .ok_or(NodeError::Unknown(node_id))?;
        slot.running = Some(service);
        slot.incarnation
    };
    lock(shared).record(format_args!("n{node_id} incarnation={incarnation} running"));
    Ok(())
}

/// Crashes `node_id`: its Raft stops at whatever await point it is at; its stores stay.
pub async fn crash_node(shared: &Shared, node_id: NodeId) {
    let running = {
        let mut world = lock(shared);
        let running = world.nodes.get_mut(&node_id).and_then(|slot| {
            slot.crash_signals.clear();
            slot.running.take()
        });
        if running.is_some() {
            world.record(format_args!("crash n{node_id}"));
        }
        running
    };
    if let Some(service) = running {
        // Stops RaftCore and its replication tasks; the stores are kept in the slot.
        let _ = service.raft.shutdown().await;
    }
}

/// Sleeps `ms` of simulated time.
pub async fn sleep_ms(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}
