//! Commit benchmark of the replicated state: a three-node cluster on 127.0.0.1 over QUIC with
//! mutual TLS and synced RocksDB in temporary directories (on the filesystem of $TMPDIR).
//! Prints throughput at 64 concurrent writers, latency percentiles at 1 writer, and the time
//! from a leader shutdown until a write succeeds again. Goals (issue): >= 10,000 events/s at 64
//! writers, p99 <= 5 ms at 1 writer, writable within 1.5 s. Figures only; nothing is asserted.
//!
//! `cargo bench -p cairn-consensus --bench commit` (env BENCH_SECONDS, default 5).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_consensus::domain::{Command, Name};
use cairn_consensus::{ClusterCa, ClusterNode, NodeAddress, NodeConfig, ProposeError, RaftTuning};

fn free_port() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn create(n: usize) -> Command {
    Command::CreateImage {
        name: Name::new(format!("image-{n}")).unwrap(),
        description: String::new(),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let root = tempfile::tempdir().unwrap();
    let ca = ClusterCa::generate().unwrap();
    let mut configs = Vec::new();
    let mut nodes = Vec::new();
    for id in 1..=3u64 {
        let listen = free_port();
        let config = NodeConfig {
            node_id: id,
            data_dir: root.path().join(format!("node-{id}")),
            raft_listen: listen,
            advertise: NodeAddress::new(listen, ""),
            identity: ca.issue_node_certificate(id).unwrap(),
            tuning: RaftTuning::default(),
        };
        nodes.push(ClusterNode::start(config.clone()).await.unwrap());
        configs.push(config);
    }
    nodes[0]
        .initialize(configs[0].advertise.clone())
        .await
        .unwrap();
    while !nodes[0].is_leader() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for config in &configs[1..] {
        nodes[0]
            .add_learner(config.node_id, config.advertise.clone())
            .await
            .unwrap();
    }
    nodes[0]
        .change_membership(BTreeSet::from([1, 2, 3]))
        .await
        .unwrap();
    let leader = nodes[0].clone();
    let actor = Name::new("bench").unwrap();
    let counter = Arc::new(AtomicUsize::new(0));

    // 1 writer: latency.
    let mut latencies = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < deadline {
        let n = counter.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        if leader.propose(actor.clone(), create(n)).await.is_ok() {
            latencies.push(started.elapsed());
        }
    }
    latencies.sort();
    println!(
        "1 writer: {} commits in {seconds} s, p50 {:?}, p99 {:?}, max {:?}",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies[latencies.len() - 1]
    );

    // 64 writers: throughput.
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let leader = leader.clone();
        let actor = actor.clone();
        let counter = counter.clone();
        tasks.push(tokio::spawn(async move {
            let (mut latencies, mut failed) = (Vec::new(), 0usize);
            while Instant::now() < deadline {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let started = Instant::now();
                match leader.propose(actor.clone(), create(n)).await {
                    Ok(_) => latencies.push(started.elapsed()),
                    Err(_) => failed += 1,
                }
            }
            (latencies, failed)
        }));
    }
    let (mut all, mut failures) = (Vec::new(), 0);
    for task in tasks {
        let (latencies, failed) = task.await.unwrap();
        all.extend(latencies);
        failures += failed;
    }
    all.sort();
    let total = all.len();
    let elapsed = started.elapsed().as_secs_f64();
    let cairn_rate = total as f64 / elapsed;
    println!(
        "64 writers: {total} events in {elapsed:.1} s = {cairn_rate:.0} events/s, p50 {:?}, p99 {:?} ({failures} failed proposals)",
        percentile(&all, 0.5),
        percentile(&all, 0.99),
    );

    // Leader shutdown: time until a write through a survivor succeeds.
    let killed = Instant::now();
    leader.shutdown().await;
    let survivor = nodes[1].clone();
    loop {
        let n = counter.fetch_add(1, Ordering::Relaxed);
        match survivor.propose(actor.clone(), create(n)).await {
            Ok(_) => break,
            Err(ProposeError::Rejected(rejection)) => panic!("{rejection}"),
            Err(_) => continue,
        }
    }
    println!(
        "writable again {} ms after the leader shutdown",
        killed.elapsed().as_millis()
    );
    for node in &nodes[1..] {
        node.shutdown().await;
    }
    drop(root);
    match etcd_reference() {
        Ok(etcd_rate) => println!(
            "etcd (3 members on 127.0.0.1-3, same disk, etcdctl check perf --load=l): {etcd_rate:.0} writes/s; Cairn/etcd = {:.2}",
            cairn_rate / etcd_rate
        ),
        Err(reason) => println!("etcd reference skipped: {reason}"),
    }
}

/// The peer for durable Raft commits on this machine: a three-member etcd cluster (Debian's
/// etcd-server) on 127.0.0.1-3 in a temporary directory, measured by `etcdctl check perf`.
fn etcd_reference() -> Result<f64, String> {
    use std::process::{Command, Stdio};
    if Command::new("etcd").arg("--version").output().is_err() {
        return Err("etcd not installed (apt-get install etcd-server etcd-client)".into());
    }
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let cluster = "n1=http://127.0.0.1:23800,n2=http://127.0.0.2:23800,n3=http://127.0.0.3:23800";
    let endpoints = "http://127.0.0.1:23790,http://127.0.0.2:23790,http://127.0.0.3:23790";
    let mut members = Vec::new();
    for i in 1..=3 {
        let member = Command::new("etcd")
            .args(["--name", &format!("n{i}"), "--data-dir"])
            .arg(dir.path().join(format!("n{i}")))
            .args(["--listen-client-urls", &format!("http://127.0.0.{i}:23790")])
            .args([
                "--advertise-client-urls",
                &format!("http://127.0.0.{i}:23790"),
            ])
            .args(["--listen-peer-urls", &format!("http://127.0.0.{i}:23800")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.{i}:23800"),
            ])
            .args([
                "--initial-cluster",
                cluster,
                "--initial-cluster-state",
                "new",
            ])
            .args(["--initial-cluster-token", "cairn-bench"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        members.push(member);
    }
    let result = (|| {
        let healthy = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(200));
            Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .args(["--endpoints", endpoints, "endpoint", "health"])
                .output()
                .is_ok_and(|o| o.status.success())
        });
        if !healthy {
            return Err("etcd cluster did not become healthy".to_string());
        }
        let output = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", endpoints, "check", "perf", "--load=l"])
            .output()
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&output.stdout).replace('\r', "\n");
        // "PASS: Throughput is 10015 writes/s" or "FAIL: Throughput too low: 2682 writes/s"
        text.lines()
            .find(|l| l.contains("Throughput"))
            .and_then(|l| {
                l.split_whitespace()
                    .rev()
                    .nth(1)
                    .and_then(|n| n.parse().ok())
            })
            .ok_or_else(|| format!("no throughput in etcdctl output: {text}"))
    })();
    for mut member in members {
        let _ = member.kill();
        let _ = member.wait();
    }
    result
}
