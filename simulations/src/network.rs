//! The simulated network: `SimTransport` implements consensus's `Transport`, so the real
//! `NetworkFactory` (openraft's network) and `RaftService` forwarding run over it unchanged.
//!
//! Every request and response goes through the real wire codec (`encode_frame` / `decode_body`),
//! is delayed by a drawn one-way delay (so messages overtake each other), may be lost, and is
//! dropped by a partition that is in force when it arrives. A request to a node that is down is
//! refused (`Unreachable`, as a closed port would answer). A lost message is noticed by the
//! caller only through its own deadline (`Timeout`), as on a real network.

use std::collections::BTreeSet;
use std::sync::{Mutex, Weak};
use std::time::Duration;

use cairn_consensus::domain::NodeId;
use cairn_consensus::rpc::{
    decode_body, encode_frame, RpcRequest, RpcResponse, Transport, TransportError,
};
use cairn_consensus::types::NodeAddress;
use rand::Rng;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::world::{lock, World};

/// Faults of the network. Directed: `(a, b)` in `blocked` drops what `a` sends to `b`.
#[derive(Debug, Default)]
pub struct NetState {
    pub blocked: BTreeSet<(NodeId, NodeId)>,
    /// The run's base loss probability, parts per million.
    pub loss_ppm: u32,
    /// A temporary higher loss probability, until the given simulated time.
    pub burst: Option<(u32, u64)>,
}

impl NetState {
    pub fn new(loss_ppm: u32) -> NetState {
        NetState {
            loss_ppm,
            ..NetState::default()
        }
    }

    pub fn link_open(&self, from: NodeId, to: NodeId) -> bool {
        !self.blocked.contains(&(from, to))
    }

    fn loss_ppm_at(&self, now_ms: u64) -> u32 {
        match self.burst {
            Some((ppm, until_ms)) if now_ms < until_ms => ppm.max(self.loss_ppm),
            _ => self.loss_ppm,
        }
    }

    /// Removes every partition and loss burst (the base loss stays unless `quiet`).
    pub fn heal(&mut self, quiet: bool) {
        self.blocked.clear();
        self.burst = None;
        if quiet {
            self.loss_ppm = 0;
        }
    }
}

/// The client side of node `from`'s RPC on the simulated network.
#[derive(Clone)]
pub struct SimTransport {
    from: NodeId,
    world: Weak<Mutex<World>>,
}

impl SimTransport {
    pub fn new(from: NodeId, world: Weak<Mutex<World>>) -> SimTransport {
        SimTransport { from, world }
    }
}

/// A short label for the trace.
fn describe(request: &RpcRequest) -> String {
    match request {
        RpcRequest::AppendEntries(rpc) => format!(
            "append(vote={} prev={:?} entries={} commit={:?})",
            rpc.vote,
            rpc.prev_log_id.map(|id| id.index),
            rpc.entries.len(),
            rpc.leader_commit.map(|id| id.index)
        ),
        RpcRequest::Vote(rpc) => format!(
            "vote(vote={} last={:?})",
            rpc.vote,
            rpc.last_log_id.map(|id| id.index)
        ),
        RpcRequest::InstallSnapshot(rpc) => format!(
            "snapshot(vote={} offset={} bytes={} done={})",
            rpc.vote,
            rpc.offset,
            rpc.data.len(),
            rpc.done
        ),
        RpcRequest::ForwardProposal { command, .. } => format!("forward({})", command.kind()),
        RpcRequest::ReadIndex => "read_index".into(),
        RpcRequest::ChangeMembership(change) => format!("membership({change:?})"),
        RpcRequest::PreVote(request) => format!("pre_vote(next_term={})", request.next_term),
    }
}

/// What the wire does to a value: encode it as a frame and decode the body back.
fn through_wire<T>(value: &T) -> Result<T, TransportError>
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    let frame = encode_frame(value)?;
    decode_body(&frame[4..])
}

type Reply = Result<RpcResponse, TransportError>;

impl World {
    fn draw_delay_ms(&mut self) -> u64 {
        let (min, max) = (self.config.delay_min_ms, self.config.delay_max_ms);
        self.rng.gen_range(min..=max)
    }

    fn draw_lost(&mut self) -> bool {
        let ppm = self.net.loss_ppm_at(self.now_ms());
        ppm > 0 && self.rng.gen_range(0..1_000_000) < ppm
    }
}

impl Transport for SimTransport {
    async fn call(
        &self,
        target: NodeId,
        _address: &NodeAddress,
        request: RpcRequest,
        timeout: Duration,
    ) -> Result<RpcResponse, TransportError> {
        let deadline = Instant::now() + timeout;
        let Some(world) = self.world.upgrade() else {
            return Err(TransportError::Failed {
                node_id: target,
                reason: "the simulation ended".into(),
            });
        };
        let request = through_wire(&request)?;
        let label = describe(&request);
        let (delay_ms, id) = {
            let mut world = lock(&world);
            world.checks.messages_total += 1;
            let id = world.checks.messages_total;
            let delay_ms = world.draw_delay_ms();
            world.record(format_args!(
                "msg#{id} n{}->n{target} send {label} delay_ms={delay_ms}",
                self.from
            ));
            (delay_ms, id)
        };
        let (reply_tx, reply_rx) = oneshot::channel::<Reply>();
        // The message travels on its own: the caller giving up does not recall it.
        tokio::spawn(deliver(
            self.world.clone(),
            self.from,
            target,
            id,
            request,
            delay_ms,
            reply_tx,
        ));
        drop(world);
        match tokio::time::timeout_at(deadline, reply_rx).await {
            Ok(Ok(reply)) => reply,
            // Lost on the way: the caller only learns it from its deadline.
            Ok(Err(_dropped)) => {
                tokio::time::sleep_until(deadline).await;
                Err(TransportError::Timeout {
                    node_id: target,
                    timeout,
                })
            }
            Err(_elapsed) => Err(TransportError::Timeout {
                node_id: target,
                timeout,
            }),
        }
    }
}

/// Carries one request to `target`, runs its handler, and carries the response back.
async fn deliver(
    world: Weak<Mutex<World>>,
    from: NodeId,
    target: NodeId,
    id: u64,
    request: RpcRequest,
    delay_ms: u64,
    reply: oneshot::Sender<Reply>,
) {
    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    let Some(shared) = world.upgrade() else {
        return;
    };
    let arrival = {
        let mut world = lock(&shared);
        if !world.net.link_open(from, target) {
            world.record(format_args!("msg#{id} dropped by partition"));
            None
        } else if world.draw_lost() {
            world.record(format_args!("msg#{id} lost"));
            None
        } else {
            let slot = world.nodes.get(&target);
            match slot.and_then(|slot| slot.running.clone().map(|s| (s, slot.incarnation))) {
                Some((service, incarnation)) => {
                    world.record(format_args!("msg#{id} delivered"));
                    Some(Ok((service, incarnation)))
                }
                None => {
                    world.record(format_args!("msg#{id} refused: n{target} is down"));
                    Some(Err(world.draw_delay_ms()))
                }
            }
        }
    };
    let (service, incarnation) = match arrival {
        None => return,
        Some(Err(back_ms)) => {
            tokio::time::sleep(Duration::from_millis(back_ms)).await;
            let _ = reply.send(Err(TransportError::Unreachable {
                node_id: target,
                address: format!("sim-node-{target}"),
                reason: "connection refused".into(),
            }));
            return;
        }
        Some(Ok(arrived)) => arrived,
    };
    drop(shared);
    let response = service.handle(from, request).await;
    drop(service);
    let response = match through_wire(&response) {
        Ok(response) => response,
        Err(error) => {
            let _ = reply.send(Err(error));
            return;
        }
    };
    let Some(shared) = world.upgrade() else {
        return;
    };
    let back_ms = {
        let mut world = lock(&shared);
        let same = world.nodes.get(&target).map(|slot| slot.incarnation) == Some(incarnation)
            && world.running(target).is_some();
        // Silent on purpose: a crashed node's pending calls end when openraft notices the
        // shutdown, and openraft wakes them through tokio's `watch` in a random order. Whatever
        // they do afterwards must leave no trace and draw nothing from the run's RNG.
        if !same {
            return;
        }
        world.draw_delay_ms()
    };
    drop(shared);
    tokio::time::sleep(Duration::from_millis(back_ms)).await;
    let Some(shared) = world.upgrade() else {
        return;
    };
    let mut world = lock(&shared);
    if !world.net.link_open(target, from) {
        world.record(format_args!("msg#{id} reply dropped by partition"));
    } else if world.draw_lost() {
        world.record(format_args!("msg#{id} reply lost"));
    } else {
        world.record(format_args!("msg#{id} reply delivered"));
        let _ = reply.send(Ok(response));
    }
}
