//! Proves the simulation seam: the real openraft core, `RaftService` and the in-memory stores run
//! over a `Transport` that is not QUIC (here an in-process router that calls peers' handlers
//! directly, with a fixed clock). A write through a follower is forwarded and stamped with the
//! leader's clock, a rejection writes nothing, a linearizable read on a follower sees the write,
//! and a cut-off peer makes forwarding fail cleanly. With pre-vote (`prevote`), a follower cut
//! off for many election timeouts rejoins without an election; without, it deposes the leader.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_consensus::domain::{Command, Name, NodeId};
use cairn_consensus::network::NetworkFactory;
use cairn_consensus::prevote;
use cairn_consensus::rpc::{RpcHandler, RpcRequest, RpcResponse, Transport, TransportError};
use cairn_consensus::service::{
    MembershipChange, ProposeError, RaftService, ServiceHandler, ServiceTimeouts,
};
use cairn_consensus::store::mem::{MemLogStore, MemStateMachine};
use cairn_consensus::types::Raft;
use cairn_consensus::{NodeAddress, RaftTuning};

type Service = RaftService<MemStateMachine, Router>;
type Handlers = Arc<Mutex<HashMap<NodeId, Arc<ServiceHandler<MemStateMachine, Router>>>>>;

/// Routes calls to the handlers of nodes in the same process; a node can be cut off.
#[derive(Clone)]
struct Router {
    from: NodeId,
    handlers: Handlers,
    cut: Arc<Mutex<BTreeSet<NodeId>>>,
}

impl Transport for Router {
    async fn call(
        &self,
        target: NodeId,
        _address: &NodeAddress,
        request: RpcRequest,
        _timeout: Duration,
    ) -> Result<RpcResponse, TransportError> {
        let cut = self.cut.lock().unwrap().clone();
        let handler = self.handlers.lock().unwrap().get(&target).cloned();
        match handler {
            Some(handler) if !cut.contains(&target) && !cut.contains(&self.from) => {
                Ok(handler.handle(self.from, request).await)
            }
            _ => Err(TransportError::Unreachable {
                node_id: target,
                address: format!("node-{target}"),
                reason: "cut off".into(),
            }),
        }
    }
}

fn address(id: NodeId) -> NodeAddress {
    NodeAddress {
        raft: format!("node-{id}"),
        api: String::new(),
    }
}

/// Three members over the router, initialized through member 1 and made voters through member 3
/// (membership changes through a member that may not lead yet are forwarded). With `pre_vote`,
/// elections go through each member's campaign guard, as on a real node; without, openraft's own
/// timer campaigns.
async fn three_members(
    pre_vote: bool,
) -> (BTreeMap<NodeId, Arc<Service>>, Arc<Mutex<BTreeSet<NodeId>>>) {
    let handlers = Arc::new(Mutex::new(HashMap::new()));
    let cut = Arc::new(Mutex::new(BTreeSet::new()));
    let tuning = RaftTuning {
        pre_vote,
        ..RaftTuning::default()
    };
    let config = Arc::new(tuning.raft_config().unwrap());
    let mut services: BTreeMap<NodeId, Arc<Service>> = BTreeMap::new();
    for id in 1..=3 {
        let transport = Router {
            from: id,
            handlers: handlers.clone(),
            cut: cut.clone(),
        };
        let state_machine = MemStateMachine::new();
        let raft = Raft::new(
            id,
            config.clone(),
            NetworkFactory::new(id, transport.clone()),
            MemLogStore::new(),
            state_machine.clone(),
        )
        .await
        .unwrap();
        let service = Arc::new(RaftService {
            node_id: id,
            raft,
            state: state_machine,
            transport,
            clock: Arc::new(|| 1_700_000_000_000),
            timeouts: ServiceTimeouts {
                forward_timeout_ms: 3_000,
                membership_timeout_ms: 10_000,
            },
        });
        if pre_vote {
            prevote::spawn_campaign_guard(&service, id);
        }
        handlers
            .lock()
            .unwrap()
            .insert(id, Arc::new(ServiceHandler::new(&service)));
        services.insert(id, service);
    }
    services[&1].initialize(address(1)).await.unwrap();
    for id in [2, 3] {
        services[&1]
            .change_membership(MembershipChange::AddLearner {
                node_id: id,
                address: address(id),
            })
            .await
            .unwrap();
    }
    services[&3]
        .change_membership(MembershipChange::SetVoters(BTreeSet::from([1, 2, 3])))
        .await
        .unwrap();
    (services, cut)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_service_runs_over_a_simulated_transport() {
    let (services, cut) = three_members(true).await;

    let admin = Name::new("admin").unwrap();
    let create = Command::CreateImage {
        name: Name::new("base").unwrap(),
        description: String::new(),
    };
    let events = services[&2]
        .propose(admin.clone(), create.clone())
        .await
        .unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(
        events[0].time_ms, 1_700_000_000_000,
        "the leader's injected clock stamps the event"
    );
    let error = services[&3]
        .propose(admin.clone(), create)
        .await
        .unwrap_err();
    assert!(matches!(error, ProposeError::Rejected(_)), "{error:?}");
    let images = services[&3].read(|state| state.images.len()).await.unwrap();
    assert_eq!(images, 1);
    assert_eq!(
        services[&3].state.events(1, 10),
        events,
        "the rejection wrote nothing"
    );

    // A member cut off from everyone cannot reach a leader: its write fails without hanging.
    cut.lock().unwrap().insert(2);
    let leader = services[&1].raft.metrics().borrow().current_leader.unwrap();
    if leader != 2 {
        let other = Command::CreateImage {
            name: Name::new("other").unwrap(),
            description: String::new(),
        };
        let error = services[&2].propose(admin, other).await.unwrap_err();
        assert!(
            matches!(
                error,
                ProposeError::Unavailable(_) | ProposeError::NoLeader { .. }
            ),
            "{error:?}"
        );
    }
    for service in services.values() {
        service.raft.shutdown().await.unwrap();
    }
}

/// (leader, term) as member `id` sees them.
fn view(services: &BTreeMap<NodeId, Arc<Service>>, id: NodeId) -> (Option<NodeId>, u64) {
    let metrics = services[&id].raft.metrics().borrow().clone();
    (metrics.current_leader, metrics.current_term)
}

/// Cuts a follower off for 3 s (many election timeouts), heals the cut, waits 2 s, and returns
/// the leader and term before the cut and, after the heal, as every member sees them.
async fn cut_a_follower_and_heal(
    services: &BTreeMap<NodeId, Arc<Service>>,
    cut: &Mutex<BTreeSet<NodeId>>,
) -> ((Option<NodeId>, u64), Vec<(Option<NodeId>, u64)>) {
    // Settle first: the membership change's leader may still be taking over.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = view(services, 1);
    let leader = before.0.expect("a leader");
    let follower = *services.keys().find(|id| **id != leader).unwrap();
    cut.lock().unwrap().insert(follower);
    tokio::time::sleep(Duration::from_secs(3)).await;
    cut.lock().unwrap().clear();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = services.keys().map(|id| view(services, *id)).collect();
    (before, after)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_follower_rejoins_without_deposing_the_leader() {
    let (services, cut) = three_members(true).await;
    let (before, after) = cut_a_follower_and_heal(&services, &cut).await;
    assert_eq!(
        after,
        vec![before; 3],
        "every member keeps the leader and term it had before the cut"
    );
    for service in services.values() {
        service.raft.shutdown().await.unwrap();
    }
}

/// The control for the test above: the same cut without pre-vote costs the leader its term, so
/// that test would catch a pre-vote that did nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_pre_vote_a_cut_off_follower_deposes_the_leader() {
    let (services, cut) = three_members(false).await;
    let (before, after) = cut_a_follower_and_heal(&services, &cut).await;
    assert!(
        after.iter().all(|(_, term)| *term > before.1),
        "the cut-off follower's elections raised every member's term: before {before:?}, after {after:?}"
    );
    for service in services.values() {
        service.raft.shutdown().await.unwrap();
    }
}
