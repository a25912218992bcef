//! Proves the simulation seam: the real openraft core, `RaftService` and the in-memory stores run
//! over a `Transport` that is not QUIC (here an in-process router that calls peers' handlers
//! directly, with a fixed clock). A write through a follower is forwarded and stamped with the
//! leader's clock, a rejection writes nothing, a linearizable read on a follower sees the write,
//! and a cut-off peer makes forwarding fail cleanly.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_consensus::domain::{Command, Name, NodeId};
use cairn_consensus::network::NetworkFactory;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_service_runs_over_a_simulated_transport() {
    let handlers = Arc::new(Mutex::new(HashMap::new()));
    let cut = Arc::new(Mutex::new(BTreeSet::new()));
    let config = Arc::new(RaftTuning::default().raft_config().unwrap());
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
        handlers
            .lock()
            .unwrap()
            .insert(id, Arc::new(ServiceHandler::new(&service)));
        services.insert(id, service);
    }
    services[&1].initialize(address(1)).await.unwrap();
    for id in [2, 3] {
        // Membership changes through a member that may not lead yet are forwarded.
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
