//! Proves the leader's batching (`proposer`) on a real openraft core with the in-memory stores
//! (a one-member cluster, single-threaded runtime so the interleaving is fixed): 200 concurrent
//! proposals, some of them rejected, each get their own answer; far fewer Raft entries than
//! proposals are written; the events are dense and in log order with non-decreasing times even
//! when the leader's clock steps back between calls; replaying them gives the live state. The
//! same on the RocksDB store with flush pacing on (as `ClusterNode` runs it): nothing stalls.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cairn_consensus::domain::{replay, Command, Event, Name, ReplayBound};
use cairn_consensus::network::NetworkFactory;
use cairn_consensus::rpc::{RpcRequest, RpcResponse, Transport, TransportError};
use cairn_consensus::service::{Clock, ProposeError, RaftService, ServiceTimeouts, StateView};
use cairn_consensus::store::mem::{MemLogStore, MemStateMachine};
use cairn_consensus::types::{Raft, TypeConfig};
use cairn_consensus::{NodeAddress, RaftTuning};
use openraft::storage::{RaftLogStorage, RaftStateMachine};

/// A one-member cluster never calls a peer.
#[derive(Clone)]
struct NoPeers;

impl Transport for NoPeers {
    async fn call(
        &self,
        target: u64,
        _address: &NodeAddress,
        _request: RpcRequest,
        _timeout: Duration,
    ) -> Result<RpcResponse, TransportError> {
        Err(TransportError::Unreachable {
            node_id: target,
            address: String::new(),
            reason: "no peers".into(),
        })
    }
}

/// The image proposal `n` creates: every fifth repeats the name of the one before (and is
/// rejected, or that one is).
fn image_number(n: i32) -> i32 {
    if n % 5 == 4 {
        n - 1
    } else {
        n
    }
}

fn create_image(n: i32) -> Command {
    Command::CreateImage {
        name: Name::new(format!("image-{}", image_number(n))).unwrap(),
        description: String::new(),
    }
}

/// Makes the service's Raft a one-member cluster and waits until it leads; returns the last log
/// index then.
async fn lead_alone<S: StateView, T: Transport>(service: &RaftService<S, T>) -> u64 {
    service
        .initialize(NodeAddress {
            raft: "node-1".into(),
            api: String::new(),
        })
        .await
        .unwrap();
    service
        .raft
        .metrics()
        .wait_for(|m| m.current_leader == Some(1))
        .await
        .unwrap();
    let last = service.raft.metrics().borrow().last_log_index.unwrap();
    last
}

/// Member 1's Raft on these stores, with default tuning and no peers.
async fn one_member_raft<LS, SM>(log: LS, state_machine: SM) -> Raft
where
    LS: RaftLogStorage<TypeConfig>,
    SM: RaftStateMachine<TypeConfig>,
{
    let config = Arc::new(RaftTuning::default().raft_config().unwrap());
    Raft::new(
        1,
        config,
        NetworkFactory::new(1, NoPeers),
        log,
        state_machine,
    )
    .await
    .unwrap()
}

/// A one-member service over `raft` and `state`, stamping times with `clock`.
fn one_member<S: StateView>(raft: Raft, state: S, clock: Clock) -> Arc<RaftService<S, NoPeers>> {
    Arc::new(RaftService {
        node_id: 1,
        raft,
        state,
        transport: NoPeers,
        clock,
        timeouts: ServiceTimeouts::default(),
    })
}

type Answer = Result<Vec<Event>, ProposeError>;

/// Proposes `create_image(n)` for each `n` in `0..count` at once; each task yields `n` and its
/// answer (a proposal still unanswered after 30 s fails the test: it stalled).
fn propose_all<S: StateView>(
    service: &Arc<RaftService<S, NoPeers>>,
    count: i32,
) -> Vec<tokio::task::JoinHandle<(i32, Answer)>> {
    let admin = Name::new("admin").unwrap();
    (0..count)
        .map(|n| {
            let service = service.clone();
            let admin = admin.clone();
            tokio::spawn(async move {
                let answer = tokio::time::timeout(
                    Duration::from_secs(30),
                    service.propose(admin, create_image(n)),
                )
                .await
                .expect("a proposal stalled");
                (n, answer)
            })
        })
        .collect()
}

#[tokio::test(flavor = "current_thread")]
async fn concurrent_proposals_share_entries_and_keep_their_own_outcomes() {
    let state_machine = MemStateMachine::new();
    let raft = one_member_raft(MemLogStore::new(), state_machine.clone()).await;
    // A clock that steps back on every reading.
    let ticks = Arc::new(AtomicI64::new(0));
    let service = one_member(
        raft,
        state_machine.clone(),
        Arc::new(move || 2_000_000 - ticks.fetch_add(1, Ordering::Relaxed)),
    );
    let entries_before = lead_alone(&service).await;

    let mut answers = BTreeMap::new();
    for task in propose_all(&service, 200) {
        let (n, answer) = task.await.unwrap();
        answers.insert(n, answer);
    }

    let mut seqs = Vec::new();
    for (n, answer) in &answers {
        if n % 5 == 4 {
            assert!(
                matches!(answer, Err(ProposeError::Rejected(_))),
                "proposal {n}: {answer:?}"
            );
        } else {
            let events = answer.as_ref().unwrap();
            assert_eq!(events.len(), 1, "proposal {n}");
            assert_eq!(
                events[0].payload.image().map(|i| i.as_str().to_string()),
                Some(format!("image-{n}")),
                "proposal {n} got its own event"
            );
            seqs.push(events[0].seq);
        }
    }
    seqs.sort();
    assert_eq!(
        seqs,
        (1..=160).collect::<Vec<u64>>(),
        "dense sequence numbers"
    );

    let entries = service.raft.metrics().borrow().last_log_index.unwrap() - entries_before;
    assert!(entries < 20, "200 proposals took {entries} entries");

    let events = state_machine.events(1, 1_000);
    assert_eq!(events.len(), 160);
    assert!(
        events.windows(2).all(|w| w[0].time_ms <= w[1].time_ms),
        "times never step back in log order"
    );
    let replayed = replay(&events, ReplayBound::Everything).unwrap();
    assert_eq!(replayed.hash(), state_machine.with_state(|s| s.hash()));
    service.raft.shutdown().await.unwrap();
}

/// Flush pacing (`Proposer::pace_by_flushes`, as `ClusterNode` wires it) on the RocksDB store with
/// real fsyncs: each of 200 concurrent proposals (40 of them rejected) is answered once with its
/// own outcome, none stalls waiting for a flush signal, proposals still share entries, and the
/// stored history replays to the live state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_paced_proposals_on_rocksdb_are_each_answered_once() {
    let dir = tempfile::tempdir().unwrap();
    let (log, state_machine) = cairn_consensus::store::rocks::open(dir.path()).unwrap();
    let reader = state_machine.reader();
    let raft = one_member_raft(log.clone(), state_machine).await;
    let (hook, pacer) =
        cairn_consensus::proposer::Proposer::pace_by_flushes(&raft, Duration::from_secs(5));
    log.on_flushed(hook);
    let service = one_member(raft, reader.clone(), Arc::new(|| 1_000_000));
    let entries_before = lead_alone(&service).await;
    let tasks = propose_all(&service, 200);
    // Tasks run on two threads, so of two proposals with the same name either may come first:
    // exactly one of each pair is accepted, with an event naming it.
    let mut seqs = Vec::new();
    let mut accepted = BTreeMap::<i32, usize>::new();
    for task in tasks {
        let (n, answer) = task.await.unwrap();
        let name = image_number(n);
        match answer {
            Ok(events) => {
                assert_eq!(events.len(), 1, "proposal {n}");
                assert_eq!(
                    events[0].payload.image().map(|i| i.as_str().to_string()),
                    Some(format!("image-{name}")),
                    "proposal {n} got its own event"
                );
                *accepted.entry(name).or_default() += 1;
                seqs.push(events[0].seq);
            }
            Err(ProposeError::Rejected(_)) => assert!(n % 5 >= 3, "proposal {n} rejected"),
            Err(other) => panic!("proposal {n}: {other:?}"),
        }
    }
    assert!(accepted.values().all(|&count| count == 1), "{accepted:?}");
    assert_eq!(accepted.len(), 160);
    seqs.sort();
    assert_eq!(
        seqs,
        (1..=160).collect::<Vec<u64>>(),
        "dense sequence numbers"
    );
    let entries = service.raft.metrics().borrow().last_log_index.unwrap() - entries_before;
    assert!(entries < 200, "200 proposals took {entries} entries");
    let events = reader.events(1, 1_000).unwrap();
    assert_eq!(events.len(), 160);
    let replayed = replay(&events, ReplayBound::Everything).unwrap();
    assert_eq!(replayed.hash(), reader.with_state(|s| s.hash()));
    service.raft.shutdown().await.unwrap();
    pacer.abort();
}
