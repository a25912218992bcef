//! Proves that a failed synced write of the Raft log stops the node: the RocksDB store poisons
//! itself (every later call fails), and a running `ClusterNode` stops Raft instead of continuing.

use std::time::Duration;

use cairn_consensus::domain::{Command, Name};
use cairn_consensus::store::rocks;
use cairn_consensus::types::TypeConfig;
use cairn_consensus::{ClusterCa, ClusterNode, NodeAddress, NodeConfig, ProposeError, RaftTuning};
use openraft::storage::RaftLogStorage;

#[tokio::test]
async fn failed_write_poisons_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _state_machine) = rocks::open(dir.path()).unwrap();
    log.save_vote(&openraft::Vote::new(1, 1)).await.unwrap();
    log.inject_write_failure();
    assert!(log.save_vote(&openraft::Vote::new(2, 1)).await.is_err());
    assert!(log.is_poisoned());
    // Nothing continues: even reads fail now.
    assert!(RaftLogStorage::<TypeConfig>::read_vote(&mut log)
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_fsync_stops_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::generate().unwrap();
    let listen = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let advertise = NodeAddress::new(listen, "");
    let node = ClusterNode::start(NodeConfig {
        node_id: 1,
        data_dir: dir.path().to_path_buf(),
        raft_listen: listen,
        advertise: advertise.clone(),
        identity: ca.issue_node_certificate(1).unwrap(),
        tuning: RaftTuning::default(),
    })
    .await
    .unwrap();
    node.initialize(advertise).await.unwrap();
    let admin = Name::new("admin").unwrap();
    let create = |n: u32| Command::CreateImage {
        name: Name::new(format!("image-{n}")).unwrap(),
        description: String::new(),
    };
    node.propose(admin.clone(), create(1)).await.unwrap();

    node.inject_storage_failure();
    let error = node.propose(admin, create(2)).await.unwrap_err();
    assert!(
        matches!(
            error,
            ProposeError::Stopped(_) | ProposeError::Unavailable(_)
        ),
        "{error:?}"
    );
    let mut metrics = node.metrics();
    let stopped = tokio::time::timeout(
        Duration::from_secs(5),
        metrics.wait_for(|m| m.running_state.is_err()),
    )
    .await;
    assert!(stopped.is_ok(), "raft stopped after the failed write");
    assert_eq!(
        node.local_state(|s| s.last_seq),
        1,
        "nothing applied after the failure"
    );
    node.shutdown().await;
}
