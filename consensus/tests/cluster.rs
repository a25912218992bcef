//! Proves the replicated state end to end: three `ClusterNode`s in one process over real QUIC
//! with mutual TLS on 127.0.0.1 (distinct ports) and RocksDB in temporary directories.
//! - a write through a follower is forwarded to the leader and committed; a refused command
//!   returns its precise rejection and writes nothing;
//! - linearizable reads on a follower see every committed write;
//! - after the leader is shut down a new leader is elected and writes continue;
//! - the old leader restarts from its data directory and catches up;
//! - every node ends with the same state hash and the same complete history;
//! - after a snapshot and a log purge, a late learner receives the whole history via snapshot.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use cairn_consensus::domain::{replay, Command, EntityKind, Event, Name, Rejection, ReplayBound};
use cairn_consensus::{ClusterCa, ClusterNode, NodeAddress, NodeConfig, ProposeError, RaftTuning};

fn free_port() -> SocketAddr {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap()
}

fn config(ca: &ClusterCa, node_id: u64, root: &std::path::Path, listen: SocketAddr) -> NodeConfig {
    NodeConfig {
        node_id,
        data_dir: root.join(format!("node-{node_id}")),
        raft_listen: listen,
        advertise: NodeAddress::new(listen, format!("http://{listen}")),
        identity: ca.issue_node_certificate(node_id).unwrap(),
        tuning: RaftTuning {
            snapshot_after_entries: 50,
            logs_kept_after_snapshot: 0,
            // Small chunks: the late learner's snapshot arrives in many InstallSnapshot RPCs.
            snapshot_chunk_bytes: 512,
            ..RaftTuning::default()
        },
    }
}

fn create_image(n: usize) -> Command {
    Command::CreateImage {
        name: Name::new(format!("image-{n}")).unwrap(),
        description: format!("image {n}"),
    }
}

fn admin() -> Name {
    Name::new("admin").unwrap()
}

/// Proposes like a careful client: an ambiguous failure (`Unavailable`: the leader went away
/// while the proposal was in flight) is retried, and a retry that finds the image already there
/// counts as done. Returns whether it was written (false only if it already existed before).
async fn create_retrying(node: &ClusterNode, n: usize) -> bool {
    let mut ambiguous = false;
    for _ in 0..50 {
        match node.propose(admin(), create_image(n)).await {
            Ok(_) => return true,
            Err(ProposeError::Rejected(Rejection::AlreadyExists { .. })) if ambiguous => {
                return true
            }
            Err(ProposeError::Unavailable(_)) | Err(ProposeError::NoLeader { .. }) => {
                ambiguous = true
            }
            Err(error) => panic!("create image-{n}: {error}"),
        }
    }
    panic!("create image-{n}: cluster stayed unavailable");
}

async fn wait_for<F: Fn() -> bool>(what: &str, timeout: Duration, check: F) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn all_events(node: &ClusterNode) -> Vec<Event> {
    node.events(1, usize::MAX).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_replicate_fail_over_restart_and_feed_a_late_learner() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    let root = tempfile::tempdir().unwrap();
    let ca = ClusterCa::generate().unwrap();
    let configs: Vec<NodeConfig> = (1..=3)
        .map(|id| config(&ca, id, root.path(), free_port()))
        .collect();
    let mut nodes: Vec<Option<ClusterNode>> = Vec::new();
    for config in &configs {
        nodes.push(Some(ClusterNode::start(config.clone()).await.unwrap()));
    }
    let node =
        |nodes: &Vec<Option<ClusterNode>>, id: u64| nodes[(id - 1) as usize].clone().unwrap();

    // Form the cluster: initialize node 1, add 2 and 3 as learners, promote them.
    let first = node(&nodes, 1);
    first
        .initialize(configs[0].advertise.clone())
        .await
        .unwrap();
    wait_for("node 1 to lead", Duration::from_secs(10), || {
        first.is_leader()
    })
    .await;
    for config in &configs[1..] {
        first
            .add_learner(config.node_id, config.advertise.clone())
            .await
            .unwrap();
    }
    first
        .change_membership(BTreeSet::from([1, 2, 3]))
        .await
        .unwrap();

    // A write through a follower is forwarded to the leader.
    let follower = node(&nodes, 2);
    let events = follower.propose(admin(), create_image(0)).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].seq, 1);
    assert_eq!(events[0].actor, admin());
    assert!(events[0].time_ms > 0);

    // A refused command returns the precise rejection and writes nothing.
    let error = follower
        .propose(admin(), create_image(0))
        .await
        .unwrap_err();
    assert_eq!(
        error,
        ProposeError::Rejected(Rejection::AlreadyExists {
            kind: EntityKind::Image,
            name: "image-0".into()
        })
    );
    let mut written = 1;
    for n in 1..40 {
        let through = node(&nodes, 1 + (n as u64 % 3));
        through.propose(admin(), create_image(n)).await.unwrap();
        written += 1;
    }
    // Linearizable read on a follower sees every committed write.
    let count = node(&nodes, 3)
        .read(|state| state.images.len())
        .await
        .unwrap();
    assert_eq!(count, written);

    // Kill the leader; a new one is elected and writable.
    let old_leader_id = first.leader().unwrap();
    let old_leader = node(&nodes, old_leader_id);
    old_leader.shutdown().await;
    drop(old_leader);
    nodes[(old_leader_id - 1) as usize] = None;
    drop(first);
    let killed = Instant::now();
    let survivor = nodes.iter().flatten().next().unwrap().clone();
    assert!(create_retrying(&survivor, 1000).await);
    written += 1;
    println!(
        "writable again {} ms after the leader was shut down",
        killed.elapsed().as_millis()
    );
    assert_ne!(survivor.leader(), Some(old_leader_id));
    for n in 1001..1030 {
        assert!(create_retrying(&survivor, n).await);
        written += 1;
    }

    // Restart the old leader from its data directory; it catches up.
    let restarted = loop {
        match ClusterNode::start(configs[(old_leader_id - 1) as usize].clone()).await {
            Ok(node) => break node,
            Err(error) => {
                // The previous instance may still be releasing its RocksDB lock.
                eprintln!("restart retry: {error}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    nodes[(old_leader_id - 1) as usize] = Some(restarted);
    let live: Vec<ClusterNode> = nodes.iter().flatten().cloned().collect();
    wait_for(
        "all nodes to apply every event",
        Duration::from_secs(20),
        || {
            live.iter()
                .all(|n| n.local_state(|s| s.last_seq) == written as u64)
        },
    )
    .await;
    let hash = live[0].state_hash();
    let history = all_events(&live[0]);
    // The projection is exactly the fold of the history.
    let replayed = replay(&history, ReplayBound::Everything).unwrap();
    assert_eq!(
        replayed.hash(),
        hash,
        "replaying the history gives the live state"
    );
    assert_eq!(history.len(), written);
    for (i, event) in history.iter().enumerate() {
        assert_eq!(event.seq, i as u64 + 1, "history has no gaps");
    }
    for n in &live {
        assert_eq!(n.state_hash(), hash, "node {} state hash", n.node_id());
        assert_eq!(all_events(n), history, "node {} history", n.node_id());
    }

    // Snapshot and purge the log on the leader, then add a late learner: it must get everything.
    let leader_id = live[0].leader().unwrap();
    let leader = live
        .iter()
        .find(|n| n.node_id() == leader_id)
        .unwrap()
        .clone();
    leader.snapshot_and_purge().await.unwrap();
    let purged = leader.metrics().borrow().purged;
    assert!(purged.is_some(), "the leader purged its log");
    let late = config(&ca, 4, root.path(), free_port());
    let learner = ClusterNode::start(late.clone()).await.unwrap();
    leader.add_learner(4, late.advertise.clone()).await.unwrap();
    wait_for(
        "the learner to receive the history",
        Duration::from_secs(20),
        || learner.local_state(|s| s.last_seq) == written as u64,
    )
    .await;
    // The leader's log no longer starts at 1: the learner can only have caught up by snapshot.
    wait_for(
        "the learner to report its snapshot",
        Duration::from_secs(5),
        || learner.metrics().borrow().snapshot.is_some(),
    )
    .await;
    assert_eq!(learner.state_hash(), hash);
    assert_eq!(all_events(&learner), history);

    // Remove the learner again.
    leader.remove_node(4).await.unwrap();
    let membership = leader.metrics().borrow().membership_config.clone();
    assert!(membership.membership().get_node(&4).is_none());

    for n in live.iter().chain([&learner]) {
        n.shutdown().await;
    }
    let _unused: PathBuf = root.path().to_path_buf();
}
