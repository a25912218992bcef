//! The simulated data path: nodes running the real mirror cores, initiators, the network, and
//! the configuration master deciding with the real domain (`State::execute`).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_blockstore::mirror::{
    region_differences, Difference, Message, MirrorConfig, Operation, Primary, PrimaryEvent,
    Standby, StandbyAction, StandbyEvent, StandbySync, SubmitError, Ticket, VolumeId,
    REGION_BLOCKS,
};
use cairn_consensus::domain::{
    AssignmentTarget, BootSession, Command, DiskMode, Hash32, Mac, Name, NodeId, Proposal,
    StandbyCopy, State,
};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::invariants::{
    copies_equal, flushed_write, lost_write, single_acknowledger, stale_read, Violation,
};
use super::model::{block_bytes, Copy, Expectation};
use super::{Bug, DataConfig};
use crate::trace::Trace;

/// Microseconds of simulated time.
pub type Time = u64;

const MS: Time = 1_000;
const TICK: Time = 5 * MS;
const PING_INTERVAL: Time = 100 * MS;
const LEADER_INTERVAL: Time = 300 * MS;
/// A node not heard from for this long is marked down by the leader.
const NODE_DOWN_AFTER: Time = 1_000 * MS;
const REQUEST_TIMEOUT: Time = 1_500 * MS;
const OPS_IN_FLIGHT_MAX: usize = 3;
/// A fault is injected only after the cluster looked healthy for this long.
const SETTLE: Time = 2_000 * MS;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Endpoint {
    Node(NodeId),
    Initiator(usize),
    Leader,
}

#[derive(Clone, Debug)]
enum Op {
    Write { block: u64, value: u64 },
    Flush,
    Read { block: u64 },
}

#[derive(Clone, Debug)]
enum Answer {
    Written { generation: u64 },
    Flushed,
    Read { value: u64, generation: u64 },
}

#[derive(Clone, Debug)]
enum Payload {
    Mirror {
        mac: Mac,
        bytes: Bytes,
    },
    Request {
        id: u64,
        mac: Mac,
        op: Op,
    },
    Reply {
        id: u64,
        node: NodeId,
        result: Result<Answer, String>,
    },
    Propose(Command),
    Ping,
    State(Arc<State>),
}

enum Event {
    Deliver {
        from: Endpoint,
        to: Endpoint,
        payload: Payload,
    },
    Restart(NodeId),
    Heal,
}

struct Scheduled {
    at: Time,
    order: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.order) == (other.at, other.order)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.order).cmp(&(other.at, other.order))
    }
}

enum HeldKind {
    Write {
        ticket: Ticket,
    },
    Flush {
        ticket: Ticket,
    },
    Read {
        block: u64,
    },
    /// Not submitted yet: the stream was full. Applied locally only when submitted.
    Unsubmitted {
        op: Op,
    },
}

struct Held {
    id: u64,
    from: usize,
    kind: HeldKind,
}

enum Role {
    Primary {
        core: Box<Primary>,
        peer: Option<NodeId>,
        serve_at: Time,
        held: Vec<Held>,
    },
    Standby {
        core: Box<Standby>,
        peer: NodeId,
    },
    /// Restarted as the primary of a generation from before its start, with an in-sync
    /// standby: it asked for a failover and serves nothing.
    AwaitingFailover {
        generation: u64,
    },
}

struct Node {
    id: NodeId,
    up: bool,
    state: Arc<State>,
    copies: BTreeMap<Mac, Copy>,
    roles: BTreeMap<Mac, Role>,
    /// (client, generation) of the sessions it served when it (re)started.
    restarted: BTreeSet<(Mac, u64)>,
    next_ping: Time,
}

struct LogicalOp {
    op: Op,
    number: u64,
    snapshot: Option<Vec<Option<(u64, u64)>>>,
    sent_at: Time,
    target: NodeId,
}

struct Initiator {
    mac: Mac,
    block_count: u64,
    expect: Expectation,
    target: NodeId,
    next_number: u64,
    ops: BTreeMap<u64, LogicalOp>,
    /// Request id -> logical op.
    requests: BTreeMap<u64, u64>,
    busy_blocks: BTreeSet<u64>,
}

/// Counters for the report.
#[derive(Default, Debug, Clone)]
pub struct DataStats {
    pub writes_acknowledged: u64,
    pub flushes_acknowledged: u64,
    pub reads_checked: u64,
    pub crashes: u64,
    pub isolations: u64,
    pub cuts: u64,
    pub disk_faults: u64,
    pub power_losses: u64,
    pub failovers: u64,
    pub standbys_dropped: u64,
    pub resyncs_completed: u64,
    pub messages_lost: u64,
}

pub struct World {
    pub config: DataConfig,
    bug: Option<Bug>,
    rng: ChaCha8Rng,
    now: Time,
    base: Instant,
    order: u64,
    queue: BinaryHeap<Reverse<Scheduled>>,
    leader: State,
    leader_seen: BTreeMap<NodeId, Time>,
    next_leader_round: Time,
    nodes: BTreeMap<NodeId, Node>,
    initiators: Vec<Initiator>,
    cut: BTreeSet<(NodeId, NodeId)>,
    isolated: Option<NodeId>,
    disk_fault_armed: bool,
    /// No new fault before this time: the last one's effects must be seen first (single
    /// failures are separated by more than the detection time).
    settled_at: Time,
    next_request: u64,
    pub trace: Trace,
    pub stats: DataStats,
    acknowledgers: single_acknowledger::Acknowledgers,
    reads: stale_read::Reads,
    mirror: MirrorConfig,
}

fn volume_of(mac: &Mac) -> VolumeId {
    let mut id = [0u8; 16];
    id[..6].copy_from_slice(&mac.0);
    VolumeId(id)
}

fn mac_of(index: usize) -> Mac {
    Mac([0x52, 0x54, 0, 0, 0x10, index as u8])
}

fn name(text: &str) -> Name {
    Name::new(text).expect("valid name")
}

impl World {
    pub fn new(seed: u64, config: DataConfig, bug: Option<Bug>, rng: ChaCha8Rng) -> World {
        let mut world = World {
            config,
            bug,
            rng,
            now: 0,
            base: Instant::now(),
            order: 0,
            queue: BinaryHeap::new(),
            leader: State::default(),
            leader_seen: BTreeMap::new(),
            next_leader_round: 0,
            nodes: BTreeMap::new(),
            initiators: Vec::new(),
            cut: BTreeSet::new(),
            isolated: None,
            disk_fault_armed: false,
            settled_at: 0,
            next_request: 1,
            trace: Trace::default(),
            stats: DataStats::default(),
            acknowledgers: Default::default(),
            reads: Default::default(),
            mirror: MirrorConfig {
                // Small streams exercise backpressure.
                in_flight_bytes_max: 64 * 4096,
                ..MirrorConfig::default()
            },
        };
        world
            .trace
            .record(0, format_args!("datapath seed {seed}: {:?}", world.config));
        world.setup();
        world
    }

    fn instant(&self) -> Instant {
        self.base + Duration::from_micros(self.now)
    }

    fn record(&mut self, line: std::fmt::Arguments<'_>) {
        self.trace.record(self.now / MS, line);
    }

    fn execute(&mut self, command: Command) -> bool {
        let proposal = Proposal {
            actor: name("sim"),
            time_ms: (self.now / MS) as i64,
            command,
        };
        match self.leader.execute(&proposal) {
            Ok(events) => {
                for event in &events {
                    let kind = event.payload.kind();
                    match kind {
                        "boot_failed_over" => self.stats.failovers += 1,
                        "standby_dropped" => self.stats.standbys_dropped += 1,
                        "standby_in_sync" => self.stats.resyncs_completed += 1,
                        _ => {}
                    }
                    self.trace
                        .record(self.now / MS, format_args!("commit {:?}", event.payload));
                }
                self.broadcast_state();
                true
            }
            Err(rejection) => {
                self.trace.record(
                    self.now / MS,
                    format_args!("refused {}: {rejection}", proposal.command.kind()),
                );
                false
            }
        }
    }

    fn setup(&mut self) {
        let nodes = self.config.nodes as NodeId;
        let mut commands = Vec::new();
        for id in 1..=nodes {
            commands.push(Command::RegisterNode {
                node_id: id,
                name: name(&format!("node-{id}")),
                raft_address: format!("127.0.0.{id}:7401"),
                api_address: format!("https://127.0.0.{id}:7400"),
                portal_address: format!("127.0.0.{id}:3260"),
                boot_address: format!("http://127.0.0.{id}:8080"),
                capacity_sessions: 100,
            });
        }
        commands.push(Command::CreateImage {
            name: name("img"),
            description: String::new(),
        });
        commands.push(Command::BeginImageVersion { image: name("img") });
        commands.push(Command::CompleteImageVersion {
            image: name("img"),
            version: 1,
            manifest: Hash32::of(b"img"),
            size_bytes: self.config.block_count * 4096,
        });
        for index in 0..self.config.sessions {
            let mac = mac_of(index);
            let mode = if self.config.persistent[index] {
                DiskMode::Persistent
            } else {
                DiskMode::NonPersistent
            };
            commands.push(Command::AddClient {
                mac,
                name: name(&format!("pc{index}")),
                group: None,
            });
            commands.push(Command::Assign {
                target: AssignmentTarget::Client(mac),
                image: name("img"),
                mode,
                default: true,
                position: None,
            });
            commands.push(Command::BeginBoot {
                mac,
                image: name("img"),
                user: None,
            });
        }
        for command in commands {
            assert!(self.execute(command), "setup command refused");
        }
        for id in 1..=nodes {
            self.nodes.insert(
                id,
                Node {
                    id,
                    up: true,
                    state: Arc::new(self.leader.clone()),
                    copies: BTreeMap::new(),
                    roles: BTreeMap::new(),
                    restarted: BTreeSet::new(),
                    next_ping: 0,
                },
            );
            self.leader_seen.insert(id, 0);
        }
        for index in 0..self.config.sessions {
            let mac = mac_of(index);
            let target = self.leader.boot_sessions[&mac].primary;
            self.initiators.push(Initiator {
                mac,
                block_count: self.config.block_count,
                expect: Expectation::new(self.config.block_count),
                target,
                next_number: 1,
                ops: BTreeMap::new(),
                requests: BTreeMap::new(),
                busy_blocks: BTreeSet::new(),
            });
        }
        for id in 1..=nodes {
            self.reconcile(id);
        }
    }

    // ----- the network

    fn reachable(&self, from: Endpoint, to: Endpoint) -> bool {
        let node_up = |id: NodeId| self.nodes.get(&id).is_some_and(|n| n.up);
        match (from, to) {
            (Endpoint::Node(a), Endpoint::Node(b)) => {
                node_up(a)
                    && node_up(b)
                    && self.isolated != Some(a)
                    && self.isolated != Some(b)
                    && !self.cut.contains(&(a.min(b), a.max(b)))
            }
            (Endpoint::Node(a), Endpoint::Leader) | (Endpoint::Leader, Endpoint::Node(a)) => {
                node_up(a) && self.isolated != Some(a)
            }
            (Endpoint::Node(a), Endpoint::Initiator(_))
            | (Endpoint::Initiator(_), Endpoint::Node(a)) => node_up(a),
            _ => true,
        }
    }

    fn send(&mut self, from: Endpoint, to: Endpoint, payload: Payload) {
        if !self.reachable(from, to) {
            return;
        }
        let lossy = matches!(payload, Payload::Mirror { .. });
        if lossy && self.rng.gen_range(0..1000) < self.config.loss_per_mille {
            self.stats.messages_lost += 1;
            return;
        }
        let delay = self
            .rng
            .gen_range(self.config.delay_us_min..=self.config.delay_us_max);
        self.schedule(self.now + delay, Event::Deliver { from, to, payload });
    }

    fn schedule(&mut self, at: Time, event: Event) {
        self.order += 1;
        self.queue.push(Reverse(Scheduled {
            at,
            order: self.order,
            event,
        }));
    }

    fn broadcast_state(&mut self) {
        let state = Arc::new(self.leader.clone());
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            self.send(
                Endpoint::Leader,
                Endpoint::Node(id),
                Payload::State(state.clone()),
            );
        }
    }

    // ----- the run

    /// Runs until `until` (simulated); returns the first violated invariant.
    pub fn run_until(&mut self, until: Time, faults: bool) -> Result<(), Violation> {
        while self.now < until {
            let next_tick = self.now + TICK;
            while let Some(Reverse(scheduled)) = self.queue.peek() {
                if scheduled.at > next_tick {
                    break;
                }
                let Reverse(scheduled) = self.queue.pop().expect("peeked");
                self.now = self.now.max(scheduled.at);
                self.handle(scheduled.event)?;
            }
            self.now = next_tick;
            self.tick(faults)?;
        }
        Ok(())
    }

    fn handle(&mut self, event: Event) -> Result<(), Violation> {
        match event {
            Event::Deliver { from, to, payload } => {
                if !self.reachable(from, to) {
                    return Ok(());
                }
                match to {
                    Endpoint::Node(id) => self.node_receive(id, from, payload),
                    Endpoint::Leader => {
                        self.leader_receive(from, payload);
                        Ok(())
                    }
                    Endpoint::Initiator(index) => self.initiator_receive(index, payload),
                }
            }
            Event::Restart(id) => {
                self.restart(id);
                Ok(())
            }
            Event::Heal => {
                self.cut.clear();
                if let Some(id) = self.isolated.take() {
                    self.record(format_args!("heal: node {id} reachable again"));
                }
                Ok(())
            }
        }
    }

    fn tick(&mut self, faults: bool) -> Result<(), Violation> {
        if faults {
            self.maybe_fault();
        }
        if self.now >= self.next_leader_round {
            self.next_leader_round = self.now + LEADER_INTERVAL;
            self.leader_round();
        }
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            self.node_tick(id)?;
        }
        for index in 0..self.initiators.len() {
            self.initiator_tick(index, faults || self.now < self.config.quiet_from_us);
        }
        Ok(())
    }

    // ----- faults

    fn healthy_everywhere(&self) -> bool {
        self.nodes.values().all(|n| n.up)
            && self.isolated.is_none()
            && self.cut.is_empty()
            && !self.disk_fault_armed
            && self.leader.nodes.values().all(|n| n.healthy)
            && self.leader.boot_sessions.values().all(|s| !s.is_degraded())
            && self.nodes.values().all(|n| {
                n.roles
                    .values()
                    .all(|r| !matches!(r, Role::AwaitingFailover { .. }))
            })
    }

    fn maybe_fault(&mut self) {
        if self.rng.gen_range(0..1_000_000) >= self.config.fault_per_million_ticks {
            return;
        }
        if self.config.power_loss && self.stats.power_losses == 0 && self.rng.gen_bool(0.2) {
            self.power_loss();
            return;
        }
        // Faults the system is meant to ride out without losing an acknowledged write: one at a
        // time, on a healthy cluster (a second fault before the resync is a double failure).
        if !self.healthy_everywhere() {
            self.settled_at = self.now + SETTLE;
            return;
        }
        if self.now < self.settled_at {
            return;
        }
        self.settled_at = self.now + SETTLE;
        let nodes: Vec<NodeId> = self.nodes.keys().copied().collect();
        let primaries: Vec<NodeId> = self
            .leader
            .boot_sessions
            .values()
            .map(|s| s.primary)
            .collect();
        let victim = if !primaries.is_empty() && self.rng.gen_bool(0.7) {
            primaries[self.rng.gen_range(0..primaries.len())]
        } else {
            nodes[self.rng.gen_range(0..nodes.len())]
        };
        match self.rng.gen_range(0..100) {
            0..=39 => self.crash(victim, "crash"),
            40..=64 => {
                self.stats.isolations += 1;
                self.isolated = Some(victim);
                self.record(format_args!(
                    "fault: node {victim} cut off from the other nodes and the leader"
                ));
                let heal = self.now + self.rng.gen_range(500 * MS..4_000 * MS);
                self.schedule(heal, Event::Heal);
            }
            65..=84 => {
                let other = nodes[self.rng.gen_range(0..nodes.len())];
                if other != victim {
                    self.stats.cuts += 1;
                    self.cut.insert((victim.min(other), victim.max(other)));
                    self.record(format_args!("fault: link {victim}-{other} cut"));
                    let heal = self.now + self.rng.gen_range(500 * MS..4_000 * MS);
                    self.schedule(heal, Event::Heal);
                }
            }
            _ => {
                if self.config.disk_faults {
                    self.disk_fault_armed = true;
                    self.record(format_args!("fault: the next fsync on some node fails"));
                }
            }
        }
    }

    fn crash(&mut self, id: NodeId, why: &str) {
        let Some(node) = self.nodes.get_mut(&id) else {
            return;
        };
        if !node.up {
            return;
        }
        node.up = false;
        node.roles.clear();
        for copy in node.copies.values_mut() {
            copy.crash(&mut self.rng);
        }
        self.stats.crashes += 1;
        self.record(format_args!("fault: node {id} {why}"));
        let back = self.now + self.rng.gen_range(300 * MS..3_000 * MS);
        self.schedule(back, Event::Restart(id));
    }

    fn power_loss(&mut self) {
        self.stats.power_losses += 1;
        self.record(format_args!("fault: power loss on every node"));
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            self.crash(id, "lost power");
        }
        for initiator in &mut self.initiators {
            initiator.expect.power_lost();
        }
    }

    fn restart(&mut self, id: NodeId) {
        let state = Arc::new(self.leader.clone());
        let Some(node) = self.nodes.get_mut(&id) else {
            return;
        };
        if node.up {
            return;
        }
        node.up = true;
        node.restarted = state
            .boot_sessions
            .values()
            .filter(|s| s.primary == id || s.standby == Some(id))
            .map(|s| (s.mac, s.generation))
            .collect();
        node.state = state;
        self.record(format_args!("node {id} restarted"));
        self.reconcile(id);
    }

    /// Makes every node reachable and up again (the end of the faults).
    pub fn heal_all(&mut self) {
        self.cut.clear();
        self.isolated = None;
        self.disk_fault_armed = false;
        let down: Vec<NodeId> = self
            .nodes
            .values()
            .filter(|n| !n.up)
            .map(|n| n.id)
            .collect();
        for id in down {
            self.restart(id);
        }
        self.record(format_args!("faults over: every node up and reachable"));
    }

    /// A local flush on `id`; false when an armed disk fault fails it (the node stops).
    fn local_flush(&mut self, id: NodeId, mac: Mac) -> bool {
        if self.disk_fault_armed {
            self.disk_fault_armed = false;
            self.stats.disk_faults += 1;
            self.crash(id, "stopped: fsync failed (EIO)");
            return false;
        }
        if let Some(copy) = self.nodes.get_mut(&id).and_then(|n| n.copies.get_mut(&mac)) {
            copy.flush();
        }
        true
    }

    // ----- the leader (the configuration master)

    fn leader_receive(&mut self, from: Endpoint, payload: Payload) {
        let Endpoint::Node(id) = from else {
            return;
        };
        match payload {
            Payload::Ping => {
                self.leader_seen.insert(id, self.now);
            }
            Payload::Propose(command) => {
                self.leader_seen.insert(id, self.now);
                self.execute(command);
            }
            _ => {}
        }
    }

    fn leader_round(&mut self) {
        let ids: Vec<NodeId> = self.leader.nodes.keys().copied().collect();
        for id in ids {
            let seen = self.leader_seen.get(&id).copied().unwrap_or(0);
            let healthy = self.leader.nodes[&id].healthy;
            let silent = self.now.saturating_sub(seen) > NODE_DOWN_AFTER;
            if healthy && silent {
                self.execute(Command::SetNodeHealth {
                    node_id: id,
                    healthy: false,
                });
            } else if !healthy && !silent {
                self.execute(Command::SetNodeHealth {
                    node_id: id,
                    healthy: true,
                });
            }
        }
        let degraded: Vec<(Mac, u64)> = self
            .leader
            .boot_sessions
            .values()
            .filter(|s| s.standby.is_none())
            .map(|s| (s.mac, s.generation))
            .collect();
        for (mac, generation) in degraded {
            self.execute(Command::AssignStandby { mac, generation });
        }
    }

    // ----- nodes

    fn propose(&mut self, id: NodeId, command: Command) {
        self.record(format_args!("node {id} proposes {command:?}"));
        self.send(
            Endpoint::Node(id),
            Endpoint::Leader,
            Payload::Propose(command),
        );
    }

    fn node_receive(
        &mut self,
        id: NodeId,
        from: Endpoint,
        payload: Payload,
    ) -> Result<(), Violation> {
        match payload {
            Payload::State(state) => {
                let node = self.nodes.get_mut(&id).expect("node");
                if state.last_seq > node.state.last_seq {
                    node.state = state;
                    self.reconcile(id);
                }
                Ok(())
            }
            Payload::Mirror { mac, bytes } => {
                let Endpoint::Node(sender) = from else {
                    return Ok(());
                };
                let message = Message::decode(bytes).expect("the simulation sends valid messages");
                self.mirror_receive(id, sender, mac, message);
                self.node_process(id, mac)
            }
            Payload::Request {
                id: request,
                mac,
                op,
            } => {
                let Endpoint::Initiator(from) = from else {
                    return Ok(());
                };
                self.node_request(id, from, request, mac, op)?;
                self.node_process(id, mac)
            }
            _ => Ok(()),
        }
    }

    fn mirror_receive(&mut self, id: NodeId, sender: NodeId, mac: Mac, message: Message) {
        let now = self.instant();
        let node = self.nodes.get_mut(&id).expect("node");
        let refusal = |current: u64, reason| Message::Refused {
            volume: message.volume(),
            generation: message.generation(),
            current,
            reason,
        };
        let reply = match node.roles.get_mut(&mac) {
            Some(Role::Standby { core, peer })
                if *peer == sender || message.generation() != core.generation() =>
            {
                core.handle_message(now, message);
                None
            }
            Some(Role::Primary { core, peer, .. })
                if message.generation() == core.generation() && *peer == Some(sender) =>
            {
                core.handle_message(now, message);
                None
            }
            Some(Role::Primary { core, .. }) if message.generation() < core.generation() => {
                Some(refusal(
                    core.generation(),
                    cairn_blockstore::mirror::RefusedReason::Fenced,
                ))
            }
            _ => {
                let current = node
                    .state
                    .boot_sessions
                    .get(&mac)
                    .map_or(0, |s| s.generation);
                let reason = if current > message.generation() {
                    cairn_blockstore::mirror::RefusedReason::Fenced
                } else {
                    cairn_blockstore::mirror::RefusedReason::UnknownVolume
                };
                let is_stream = matches!(
                    message,
                    Message::Operation { .. } | Message::Heartbeat { .. }
                );
                is_stream.then(|| refusal(current, reason))
            }
        };
        if let Some(reply) = reply {
            self.send(
                Endpoint::Node(id),
                Endpoint::Node(sender),
                Payload::Mirror {
                    mac,
                    bytes: reply.encode(),
                },
            );
        }
    }

    fn sync_of(&self, session: &BootSession) -> Option<StandbySync> {
        let block_count = self.config.block_count;
        session.standby.map(|_| match session.standby_copy {
            StandbyCopy::InSync => StandbySync::InSync,
            StandbyCopy::Fresh => StandbySync::Fresh { block_count },
            StandbyCopy::Stale => StandbySync::Compare { block_count },
        })
    }

    /// Makes the node's roles follow the sessions its state names (the reconciler).
    fn reconcile(&mut self, id: NodeId) {
        let now = self.instant();
        let now_us = self.now;
        let state = self.nodes[&id].state.clone();
        let mut proposals = Vec::new();
        let mut lines = Vec::new();
        let mirror = self.mirror.clone();
        let sessions: Vec<BootSession> = state.boot_sessions.values().cloned().collect();
        for session in &sessions {
            let mac = session.mac;
            let generation = session.generation;
            let sync = self.sync_of(session);
            let incarnation: u64 = self.rng.gen();
            let node = self.nodes.get_mut(&id).expect("node");
            let restarted = node.restarted.contains(&(mac, generation));
            if session.primary == id {
                let current = node.roles.remove(&mac);
                let role = match current {
                    Some(Role::Primary {
                        mut core,
                        serve_at,
                        held,
                        ..
                    }) if core.fenced_by().is_none() => {
                        if core.generation() < generation {
                            match sync {
                                None => core.handle_standby_dropped(generation),
                                Some(sync) => core.handle_standby_added(now, generation, sync),
                            }
                        } else if session.standby_copy == StandbyCopy::InSync {
                            // As the node does: the resync's completion is committed.
                            core.handle_resync_recorded();
                        }
                        Role::Primary {
                            core,
                            peer: session.standby,
                            serve_at,
                            held,
                        }
                    }
                    Some(Role::Standby { mut core, .. }) => {
                        let ready = core.promote(now);
                        let serve_at =
                            now_us + ready.saturating_duration_since(now).as_micros() as u64;
                        lines.push(format!(
                            "node {id} promoted for {mac} at generation {generation}, serving in {} ms",
                            (serve_at - now_us) / MS
                        ));
                        Role::Primary {
                            core: Box::new(Primary::new(
                                now,
                                volume_of(&mac),
                                generation,
                                incarnation,
                                sync,
                                mirror.clone(),
                            )),
                            peer: session.standby,
                            serve_at,
                            held: Vec::new(),
                        }
                    }
                    Some(Role::AwaitingFailover { generation: asked }) if asked == generation => {
                        Role::AwaitingFailover { generation }
                    }
                    _ if restarted
                        && session.standby.is_some()
                        && session.standby_copy == StandbyCopy::InSync =>
                    {
                        // Its copy may lack acknowledged writes the standby holds.
                        proposals.push(Command::FailOver { mac, generation });
                        Role::AwaitingFailover { generation }
                    }
                    _ => Role::Primary {
                        core: Box::new(Primary::new(
                            now,
                            volume_of(&mac),
                            generation,
                            incarnation,
                            sync,
                            mirror.clone(),
                        )),
                        peer: session.standby,
                        serve_at: now_us,
                        held: Vec::new(),
                    },
                };
                node.roles.insert(mac, role);
                node.copies.entry(mac).or_default();
            } else if session.standby == Some(id) {
                let keep = matches!(
                    node.roles.get(&mac),
                    Some(Role::Standby { core, .. }) if core.generation() == generation
                );
                if !keep {
                    if restarted {
                        // Its copy may lack acknowledged writes it held only in memory: it
                        // must stop counting as in sync now, not when its primary notices.
                        proposals.push(Command::DropStandby { mac, generation });
                    }
                    node.roles.remove(&mac);
                    let copy = node.copies.entry(mac).or_default();
                    if session.standby_copy == StandbyCopy::Fresh {
                        copy.reset();
                    }
                    node.roles.insert(
                        mac,
                        Role::Standby {
                            core: Box::new(Standby::new(
                                now,
                                volume_of(&mac),
                                generation,
                                incarnation,
                                restarted,
                                mirror.clone(),
                            )),
                            peer: session.primary,
                        },
                    );
                }
            } else {
                node.roles.remove(&mac);
            }
        }
        for line in lines {
            self.record(format_args!("{line}"));
        }
        for command in proposals {
            self.propose(id, command);
        }
    }

    fn node_request(
        &mut self,
        id: NodeId,
        from: usize,
        request: u64,
        mac: Mac,
        op: Op,
    ) -> Result<(), Violation> {
        let now_us = self.now;
        let node = self.nodes.get_mut(&id).expect("node");
        let serving = matches!(
            node.roles.get(&mac),
            Some(Role::Primary { core, serve_at, .. }) if core.fenced_by().is_none() && now_us >= *serve_at
        );
        if !serving {
            self.reply(id, from, request, Err("not serving".into()));
            return Ok(());
        }
        let Some(Role::Primary { held, .. }) = node.roles.get_mut(&mac) else {
            unreachable!("checked above");
        };
        let kind = match op {
            Op::Read { block } => HeldKind::Read { block },
            op => HeldKind::Unsubmitted { op },
        };
        held.push(Held {
            id: request,
            from,
            kind,
        });
        Ok(())
    }

    fn reply(&mut self, id: NodeId, to: usize, request: u64, result: Result<Answer, String>) {
        self.send(
            Endpoint::Node(id),
            Endpoint::Initiator(to),
            Payload::Reply {
                id: request,
                node: id,
                result,
            },
        );
    }

    fn node_tick(&mut self, id: NodeId) -> Result<(), Violation> {
        if !self.nodes[&id].up {
            return Ok(());
        }
        if self.now >= self.nodes[&id].next_ping {
            self.nodes.get_mut(&id).expect("node").next_ping = self.now + PING_INTERVAL;
            self.send(Endpoint::Node(id), Endpoint::Leader, Payload::Ping);
        }
        let now = self.instant();
        let macs: Vec<Mac> = self.nodes[&id].roles.keys().copied().collect();
        for mac in macs {
            if let Some(role) = self.nodes.get_mut(&id).expect("node").roles.get_mut(&mac) {
                match role {
                    Role::Primary { core, .. } => core.handle_timeout(now),
                    Role::Standby { core, .. } => core.handle_timeout(now),
                    Role::AwaitingFailover { .. } => {}
                }
            }
            self.node_process(id, mac)?;
        }
        Ok(())
    }

    /// Runs one role's shell: actions, events, held requests, messages out.
    fn node_process(&mut self, id: NodeId, mac: Mac) -> Result<(), Violation> {
        if !self.nodes[&id].up {
            return Ok(());
        }
        match self.nodes[&id].roles.get(&mac) {
            Some(Role::Primary { .. }) => self.process_primary(id, mac),
            Some(Role::Standby { .. }) => {
                self.process_standby(id, mac);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn process_standby(&mut self, id: NodeId, mac: Mac) {
        let block_count = self.config.block_count;
        loop {
            let node = self.nodes.get_mut(&id).expect("node");
            let Some(Role::Standby { core, .. }) = node.roles.get_mut(&mac) else {
                return;
            };
            let Some(action) = core.poll_action() else {
                break;
            };
            match action {
                StandbyAction::Apply { seq, operation } => {
                    node.copies.entry(mac).or_default().apply(&operation);
                    core.handle_applied(seq, Ok(()));
                }
                StandbyAction::Digest { seq, region } => {
                    let digest = node
                        .copies
                        .entry(mac)
                        .or_default()
                        .region_digest(block_count, region);
                    core.handle_digest(seq, region, digest);
                }
                StandbyAction::Flush { seq } => {
                    if !self.local_flush(id, mac) {
                        return;
                    }
                    let node = self.nodes.get_mut(&id).expect("node");
                    if let Some(Role::Standby { core, .. }) = node.roles.get_mut(&mac) {
                        core.handle_applied(seq, Ok(()));
                        core.handle_flushed(seq, Ok(()));
                    }
                }
            }
        }
        let mut proposals = Vec::new();
        let mut out = Vec::new();
        let node = self.nodes.get_mut(&id).expect("node");
        if let Some(Role::Standby { core, peer }) = node.roles.get_mut(&mac) {
            while let Some(event) = core.poll_event() {
                match event {
                    StandbyEvent::PrimarySilent { generation } => {
                        proposals.push(Command::FailOver { mac, generation })
                    }
                    StandbyEvent::StorageFailed { .. } => {}
                }
            }
            while let Some(message) = core.poll_transmit() {
                out.push((*peer, message));
            }
        }
        for command in proposals {
            self.propose(id, command);
        }
        for (peer, message) in out {
            self.send(
                Endpoint::Node(id),
                Endpoint::Node(peer),
                Payload::Mirror {
                    mac,
                    bytes: message.encode(),
                },
            );
        }
    }

    fn process_primary(&mut self, id: NodeId, mac: Mac) -> Result<(), Violation> {
        let now = self.instant();
        let now_us = self.now;
        let block_count = self.config.block_count;
        let bug = self.bug;
        let mut proposals = Vec::new();
        let mut replies: Vec<(usize, u64, Result<Answer, String>)> = Vec::new();
        let mut flush_needed = false;
        {
            let node = self.nodes.get_mut(&id).expect("node");
            let Some(Role::Primary {
                core, peer, held, ..
            }) = node.roles.get_mut(&mac)
            else {
                return Ok(());
            };
            let copy = node.copies.entry(mac).or_default();
            while let Some(event) = core.poll_event() {
                match event {
                    PrimaryEvent::StandbyUnreachable { generation, .. } => {
                        proposals.push(Command::DropStandby { mac, generation })
                    }
                    PrimaryEvent::Fenced { current } => {
                        let _ = current;
                    }
                    PrimaryEvent::ResyncCompare { region, standby } => {
                        let local = copy.region_digest(block_count, region);
                        let mut bytes = 0;
                        for difference in
                            region_differences(region * REGION_BLOCKS, &local.blocks, &standby, 16)
                        {
                            let operation = match difference {
                                Difference::Write {
                                    first_block,
                                    block_count,
                                } => {
                                    let mut data = Vec::new();
                                    for block in first_block..first_block + block_count {
                                        data.extend_from_slice(&block_bytes(copy.read(block)));
                                    }
                                    bytes += data.len() as u64;
                                    Operation::Write {
                                        first_block,
                                        data: Bytes::from(data),
                                    }
                                }
                                Difference::Unmap {
                                    first_block,
                                    block_count,
                                } => Operation::Unmap {
                                    first_block,
                                    block_count,
                                },
                                Difference::Discard {
                                    first_block,
                                    block_count,
                                } => Operation::Discard {
                                    first_block,
                                    block_count,
                                },
                            };
                            let _ = core.submit_resync(now, operation);
                        }
                        core.handle_region_compared(now, region, bytes);
                    }
                    PrimaryEvent::ResyncComplete { generation } => {
                        if let Some(standby) = *peer {
                            proposals.push(Command::MarkStandbyInSync {
                                mac,
                                generation,
                                standby,
                            });
                        }
                    }
                }
            }
            // Submit held writes and flushes in arrival order.
            for entry in held.iter_mut() {
                let HeldKind::Unsubmitted { op } = &entry.kind else {
                    continue;
                };
                let operation = match op {
                    Op::Write { block, value } => Operation::Write {
                        first_block: *block,
                        data: block_bytes(*value),
                    },
                    _ => Operation::Flush,
                };
                let op = op.clone();
                match core.submit(now, operation) {
                    Ok(ticket) => {
                        entry.kind = match op {
                            Op::Write { block, value } => {
                                copy.write(block, value);
                                HeldKind::Write { ticket }
                            }
                            _ => {
                                flush_needed = true;
                                HeldKind::Flush { ticket }
                            }
                        };
                    }
                    Err(SubmitError::Full) => break,
                    Err(SubmitError::Fenced { .. }) => break,
                }
            }
            let generation = core.generation();
            let fenced = core.fenced_by().is_some();
            held.retain(|entry| {
                let done = match &entry.kind {
                    HeldKind::Write { ticket } | HeldKind::Flush { ticket } => {
                        let acked_early = bug == Some(Bug::AckBeforeStandby)
                            && matches!(entry.kind, HeldKind::Write { .. });
                        match core.is_complete(*ticket) {
                            Ok(true) => Some(Ok(())),
                            Ok(false) if acked_early => Some(Ok(())),
                            Ok(false) => None,
                            Err(error) => Some(Err(error.to_string())),
                        }
                    }
                    HeldKind::Read { .. } if fenced => Some(Err("fenced".to_string())),
                    HeldKind::Read { .. } => core.can_read(now).then_some(Ok(())),
                    HeldKind::Unsubmitted { .. } if fenced => Some(Err("fenced".to_string())),
                    HeldKind::Unsubmitted { .. } => None,
                };
                let Some(result) = done else {
                    return true;
                };
                let answer = result.map(|()| match &entry.kind {
                    HeldKind::Write { .. } => Answer::Written { generation },
                    HeldKind::Flush { .. } => Answer::Flushed,
                    HeldKind::Read { block } => Answer::Read {
                        value: copy.read(*block),
                        generation,
                    },
                    HeldKind::Unsubmitted { .. } => unreachable!("never done"),
                });
                replies.push((entry.from, entry.id, answer));
                false
            });
        }
        if flush_needed && !self.local_flush(id, mac) {
            return Ok(());
        }
        let mut out = Vec::new();
        if let Some(Role::Primary { core, peer, .. }) =
            self.nodes.get_mut(&id).expect("node").roles.get_mut(&mac)
        {
            while let Some(message) = core.poll_transmit(now) {
                if let Some(peer) = *peer {
                    out.push((peer, message));
                }
            }
        }
        for (peer, message) in out {
            self.send(
                Endpoint::Node(id),
                Endpoint::Node(peer),
                Payload::Mirror {
                    mac,
                    bytes: message.encode(),
                },
            );
        }
        for command in proposals {
            self.propose(id, command);
        }
        for (to, request, result) in replies {
            // Checked where the answer is given, in the node's time.
            if let Ok(Answer::Read { generation, .. }) = &result {
                self.reads.check_read(mac, *generation, id)?;
            }
            if let Ok(Answer::Written { generation }) = &result {
                self.acknowledgers.record(mac, *generation, id)?;
                self.reads.write_acknowledged(mac, *generation, id);
            }
            self.reply(id, to, request, result);
        }
        let _ = now_us;
        Ok(())
    }

    // ----- initiators

    fn initiator_tick(&mut self, index: usize, issue: bool) {
        let now = self.now;
        // Requests without an answer go to the session's current primary again.
        let timed_out: Vec<u64> = self.initiators[index]
            .ops
            .iter()
            .filter(|(_, op)| now >= op.sent_at + REQUEST_TIMEOUT)
            .map(|(number, _)| *number)
            .collect();
        for number in timed_out {
            self.resend(index, number);
        }
        if !issue {
            return;
        }
        let initiator = &self.initiators[index];
        if initiator.ops.len() >= OPS_IN_FLIGHT_MAX || !self.rng.gen_bool(0.3) {
            return;
        }
        let hot = self.config.block_count.min(48);
        let block = if self.rng.gen_bool(0.8) {
            self.rng.gen_range(0..hot)
        } else {
            self.rng.gen_range(0..self.config.block_count)
        };
        let op = match self.rng.gen_range(0..100) {
            0..=59 => Op::Write { block, value: 0 },
            60..=74 => Op::Flush,
            _ => Op::Read { block },
        };
        let initiator = &mut self.initiators[index];
        if let Op::Write { block, .. } | Op::Read { block } = op {
            if !initiator.busy_blocks.insert(block) {
                return;
            }
        }
        let number = initiator.next_number;
        initiator.next_number += 1;
        let op = match op {
            Op::Write { block, .. } => {
                // Unique per run: client index in the top bits.
                let value = ((index as u64 + 1) << 40) | number;
                initiator.expect.write_issued(block, number, value);
                Op::Write { block, value }
            }
            other => other,
        };
        let snapshot = matches!(op, Op::Flush).then(|| initiator.expect.flush_issued());
        let target = initiator.target;
        initiator.ops.insert(
            number,
            LogicalOp {
                op,
                number,
                snapshot,
                sent_at: now,
                target,
            },
        );
        self.send_op(index, number);
    }

    fn send_op(&mut self, index: usize, number: u64) {
        let request = self.next_request;
        self.next_request += 1;
        let initiator = &mut self.initiators[index];
        let Some(op) = initiator.ops.get_mut(&number) else {
            return;
        };
        op.sent_at = self.now;
        op.target = initiator.target;
        initiator.requests.insert(request, number);
        let payload = Payload::Request {
            id: request,
            mac: initiator.mac,
            op: op.op.clone(),
        };
        let target = initiator.target;
        self.send(Endpoint::Initiator(index), Endpoint::Node(target), payload);
    }

    /// Tries the session's current primary (as a multipath rescan would find it).
    fn resend(&mut self, index: usize, number: u64) {
        let mac = self.initiators[index].mac;
        if let Some(session) = self.leader.boot_sessions.get(&mac) {
            self.initiators[index].target = session.primary;
        }
        self.send_op(index, number);
    }

    fn initiator_receive(&mut self, index: usize, payload: Payload) -> Result<(), Violation> {
        let Payload::Reply { id, node, result } = payload else {
            return Ok(());
        };
        let Some(number) = self.initiators[index].requests.remove(&id) else {
            return Ok(());
        };
        if !self.initiators[index].ops.contains_key(&number) {
            return Ok(());
        }
        let answer = match result {
            Ok(answer) => answer,
            Err(_) => {
                // Another path after a short pause.
                if let Some(op) = self.initiators[index].ops.get_mut(&number) {
                    op.sent_at = (self.now + 20 * MS).saturating_sub(REQUEST_TIMEOUT);
                }
                let mac = self.initiators[index].mac;
                if let Some(session) = self.leader.boot_sessions.get(&mac) {
                    self.initiators[index].target = session.primary;
                }
                return Ok(());
            }
        };
        let initiator = &mut self.initiators[index];
        let op = initiator.ops.remove(&number).expect("checked");
        match (op.op, answer) {
            (Op::Write { block, value }, Answer::Written { .. }) => {
                initiator.expect.write_acknowledged(block, op.number, value);
                initiator.busy_blocks.remove(&block);
                self.stats.writes_acknowledged += 1;
            }
            (Op::Flush, Answer::Flushed) => {
                if let Some(snapshot) = &op.snapshot {
                    initiator.expect.flush_completed(snapshot);
                }
                self.stats.flushes_acknowledged += 1;
            }
            (Op::Read { block }, Answer::Read { value, generation }) => {
                initiator.busy_blocks.remove(&block);
                self.stats.reads_checked += 1;
                lost_write::check_read(
                    &initiator.expect,
                    initiator.mac,
                    block,
                    value,
                    node,
                    generation,
                )?;
            }
            (op, answer) => panic!("answer {answer:?} to {op:?}"),
        }
        Ok(())
    }

    // ----- the end

    /// Whether every session has an in-sync standby, every node is idle, and no initiator
    /// waits: the state in which both copies must be equal.
    pub fn converged(&self) -> bool {
        let sessions_ok = self.leader.boot_sessions.values().all(|session| {
            let primary_idle = matches!(
                self.nodes[&session.primary].roles.get(&session.mac),
                Some(Role::Primary { core, held, .. })
                    if core.is_idle() && held.is_empty() && core.generation() == session.generation
            );
            let standby_ready = session.standby.is_some_and(|standby| {
                matches!(
                    self.nodes[&standby].roles.get(&session.mac),
                    Some(Role::Standby { core, .. }) if core.generation() == session.generation
                )
            });
            !session.is_degraded() && primary_idle && standby_ready
        });
        sessions_ok
            && self.initiators.iter().all(|i| i.ops.is_empty())
            && self
                .nodes
                .values()
                .all(|n| n.up && n.state.last_seq == self.leader.last_seq)
    }

    pub fn final_checks(&self) -> Result<(), Violation> {
        for initiator in &self.initiators {
            let session = &self.leader.boot_sessions[&initiator.mac];
            let primary = &self.nodes[&session.primary];
            let contents = primary
                .copies
                .get(&initiator.mac)
                .map(|copy| copy.contents(initiator.block_count))
                .unwrap_or_else(|| vec![0; initiator.block_count as usize]);
            flushed_write::check_disk(&initiator.expect, initiator.mac, primary.id, &contents)?;
            if let Some(standby) = session.standby {
                let theirs = self.nodes[&standby]
                    .copies
                    .get(&initiator.mac)
                    .map(|copy| copy.contents(initiator.block_count))
                    .unwrap_or_else(|| vec![0; initiator.block_count as usize]);
                copies_equal::check(initiator.mac, (primary.id, &contents), (standby, &theirs))?;
            }
        }
        Ok(())
    }

    pub fn now_ms(&self) -> u64 {
        self.now / MS
    }
}
