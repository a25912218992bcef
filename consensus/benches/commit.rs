//! Commit benchmark of the replicated state: three `ClusterNode`s, each in its own child process
//! (this binary re-executed with `CAIRN_BENCH_NODE`), on 127.0.0.1 over QUIC with mutual TLS, with
//! synced RocksDB in temporary directories on the filesystem of $TMPDIR.
//!
//! Prints, in one run:
//! - commit latency p50/p99 at 1 writer and events/s at 64 concurrent writers, the writers running
//!   inside the leader's process (`ClusterNode::propose`), and 64 writers through a follower
//!   (every write forwarded to the leader);
//! - failover: the leader's process is killed with SIGKILL (no shutdown, no goodbye to its
//!   peers), then a survivor proposes until a write commits; the time from the kill to that commit,
//!   over `BENCH_FAILOVERS` rounds (the killed node is restarted on its data and caught up before
//!   the next round);
//! - a three-member etcd on the same filesystem (`etcdctl check perf`) as the reference;
//! - the disk's own floor, in the same directory: 4 KiB write + fdatasync, appending to a new file
//!   and overwriting a written file in place (what a synced write of the Raft log can at best
//!   cost), and the machine's load average (the machine is shared);
//! - after each load, per node, where the time went: the log's synced writes, an append until
//!   synced, AppendEntries round trips (leader) and handling (followers), state machine apply,
//!   proposals per entry (from the crate's `metrics` histograms, collected in each node process).
//!
//! Goals (issue 2): >= 10,000 events/s at 64 writers, p99 <= 5 ms at 1 writer, writable again
//! within 1.5 s of a leader kill. Figures only; nothing is asserted.
//!
//! `cargo bench -p cairn-consensus --bench commit` (env BENCH_SECONDS, default 5;
//! BENCH_FAILOVERS, default 5; BENCH_ETCD=0 leaves etcd out; BENCH_FLUSH_PACING=0 runs the
//! proposer's older rule, for before/after figures; BENCH_PRE_VOTE=0 lets openraft campaign on
//! its own timer; TMPDIR=/dev/shm for tmpfs; with RUST_LOG,
//! BENCH_NODE_LOGS=<dir> writes each node's log to <dir>/node-<id>.log).

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_consensus::domain::{Command, Name};
use cairn_consensus::{ClusterCa, ClusterNode, NodeAddress, NodeConfig, ProposeError, RaftTuning};

const NODES: u64 = 3;

fn main() {
    match std::env::var("CAIRN_BENCH_NODE") {
        Ok(id) => node_process(id.parse().expect("CAIRN_BENCH_NODE is a node id")),
        Err(_) => orchestrate(),
    }
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------------
// The orchestrating process: starts, drives and kills the node processes.

/// One node's child process and its command pipe.
struct NodeProcess {
    id: u64,
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl NodeProcess {
    fn spawn(id: u64, root: &Path, ports: &[u16]) -> NodeProcess {
        let ports = ports
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let mut command = std::process::Command::new(std::env::current_exe().unwrap());
        command
            .env("CAIRN_BENCH_NODE", id.to_string())
            .env("CAIRN_BENCH_ROOT", root)
            .env("CAIRN_BENCH_PORTS", ports)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        // BENCH_NODE_LOGS=<dir>: each node's stderr (its RUST_LOG output) goes to <dir>/node-<id>.log,
        // appended across restarts.
        if let Some(dir) = std::env::var_os("BENCH_NODE_LOGS") {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(Path::new(&dir).join(format!("node-{id}.log")))
                .expect("open node log");
            command.stderr(log);
        }
        let mut child = command.spawn().expect("spawn node process");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut node = NodeProcess {
            id,
            child,
            stdin,
            stdout,
        };
        node.expect_line("ready");
        node
    }

    /// Sends one command line and returns the node's one-line answer.
    fn ask(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").expect("write to node process");
        self.stdin.flush().unwrap();
        self.read_line()
    }

    fn read_line(&mut self) -> String {
        let mut line = String::new();
        let read = self.stdout.read_line(&mut line).expect("read node process");
        assert!(read > 0, "node {} process ended", self.id);
        line.trim().to_string()
    }

    fn expect_line(&mut self, expected: &str) {
        let line = self.read_line();
        assert_eq!(line, expected, "node {} answered {line:?}", self.id);
    }

    /// SIGKILL: the process dies at once, sending nothing to its peers.
    fn kill(&mut self) {
        self.child.kill().expect("kill node process");
        let _ = self.child.wait();
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// "done count=.. failed=.. seconds=.. p50_us=.. p99_us=.. max_us=.." as a map.
fn fields(line: &str) -> std::collections::BTreeMap<String, f64> {
    line.split_whitespace()
        .filter_map(|field| field.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect()
}

fn ms(us: f64) -> String {
    format!("{:.2} ms", us / 1000.0)
}

/// `count` 4 KiB writes each followed by fdatasync on `path`: appending (the file grows, so the
/// filesystem journals its size too) or overwriting blocks already written and synced (data
/// only). Returns the latencies.
fn fdatasync_run(path: &Path, count: usize, overwrite: bool) -> std::io::Result<Vec<Duration>> {
    use std::os::unix::fs::FileExt;
    let block = vec![0x5au8; 4096];
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(path)?;
    if overwrite {
        for i in 0..count {
            file.write_all_at(&block, (i * block.len()) as u64)?;
        }
        file.sync_all()?;
    }
    let mut latencies = Vec::with_capacity(count);
    for i in 0..count {
        let started = Instant::now();
        file.write_all_at(&block, (i * block.len()) as u64)?;
        file.sync_data()?;
        latencies.push(started.elapsed());
    }
    drop(file);
    std::fs::remove_file(path)?;
    Ok(latencies)
}

/// The disk's floor in `dir`: one appender, one overwriter, and three appenders at once (one per
/// node, as the cluster's three logs sync on one disk), each `count` x 4 KiB write + fdatasync.
fn fdatasync_probe(dir: &Path, count: usize) -> std::io::Result<String> {
    let summary = |name: &str, mut latencies: Vec<Duration>| {
        latencies.sort();
        format!(
            "{name} p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            percentile(&latencies, 0.5).as_secs_f64() * 1e3,
            percentile(&latencies, 0.99).as_secs_f64() * 1e3,
            latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        )
    };
    let append = fdatasync_run(&dir.join("probe-append"), count, false)?;
    let overwrite = fdatasync_run(&dir.join("probe-overwrite"), count, true)?;
    let threads: Vec<_> = (0..NODES)
        .map(|i| {
            let path = dir.join(format!("probe-concurrent-{i}"));
            std::thread::spawn(move || fdatasync_run(&path, count, false))
        })
        .collect();
    let mut concurrent = Vec::new();
    for thread in threads {
        concurrent.extend(thread.join().expect("probe thread")?);
    }
    Ok([
        summary("append", append),
        summary("overwrite", overwrite),
        summary("3 appenders at once", concurrent),
    ]
    .join("; "))
}

/// Asks every node for its histograms since the last ask and prints them.
fn print_stats(nodes: &mut [NodeProcess]) {
    for node in nodes.iter_mut() {
        let answer = node.ask("stats");
        for histogram in answer.split(';').filter(|h| !h.trim().is_empty()) {
            println!("    node {}: {}", node.id, histogram.trim());
        }
    }
}

fn orchestrate() {
    let seconds = env_number("BENCH_SECONDS", 5);
    let failovers = env_number("BENCH_FAILOVERS", 5);
    let root = tempfile::tempdir().unwrap();
    println!(
        "load average {}; proposer flush pacing {}",
        common::load_average(),
        if env_number("BENCH_FLUSH_PACING", 1) != 0 {
            "on"
        } else {
            "off (BENCH_FLUSH_PACING=0)"
        }
    );
    match fdatasync_probe(root.path(), 500) {
        Ok(report) => println!("disk floor, 500 x 4 KiB write + fdatasync: {report}"),
        Err(error) => println!("fdatasync probe failed: {error}"),
    }
    let ca = ClusterCa::generate().unwrap();
    // Issued once: a restarted node keeps its key (as `cairn node run` does), which its QUIC
    // stateless resets are derived from.
    for id in 1..=NODES {
        let identity = ca.issue_node_certificate(id).unwrap();
        std::fs::write(
            root.path().join(format!("node-{id}.identity.json")),
            serde_json::to_vec(&identity).unwrap(),
        )
        .unwrap();
    }
    let ports: Vec<u16> = (0..NODES)
        .map(|_| {
            std::net::UdpSocket::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        })
        .collect();
    println!(
        "three node processes, data under {} (set TMPDIR to move it)",
        std::env::temp_dir().display()
    );
    let mut nodes: Vec<NodeProcess> = (1..=NODES)
        .map(|id| NodeProcess::spawn(id, root.path(), &ports))
        .collect();
    assert_eq!(nodes[0].ask("init"), "ok");
    for node in nodes.iter_mut() {
        node.ask("stats");
    }

    let answer = nodes[0].ask(&format!("load 1 {seconds}"));
    let result = fields(&answer);
    println!(
        "1 writer: {} commits in {seconds} s, p50 {}, p99 {}, max {} ({} failed)",
        result["count"],
        ms(result["p50_us"]),
        ms(result["p99_us"]),
        ms(result["max_us"]),
        result["failed"],
    );
    print_stats(&mut nodes);
    let answer = nodes[0].ask(&format!("load 64 {seconds}"));
    let result = fields(&answer);
    let cairn_rate = result["count"] / result["seconds"];
    println!(
        "64 writers on the leader: {} events in {:.1} s = {cairn_rate:.0} events/s, p50 {}, p99 {} ({} failed)",
        result["count"],
        result["seconds"],
        ms(result["p50_us"]),
        ms(result["p99_us"]),
        result["failed"],
    );
    print_stats(&mut nodes);
    let answer = nodes[1].ask(&format!("load 64 {seconds}"));
    let result = fields(&answer);
    println!(
        "64 writers on a follower (forwarded): {:.0} events/s, p50 {}, p99 {} ({} failed)",
        result["count"] / result["seconds"],
        ms(result["p50_us"]),
        ms(result["p99_us"]),
        result["failed"],
    );
    print_stats(&mut nodes);
    println!("load average {}", common::load_average());
    match fdatasync_probe(root.path(), 500) {
        Ok(report) => println!("disk floor again, cluster idle: {report}"),
        Err(error) => println!("fdatasync probe failed: {error}"),
    }

    let mut recoveries = Vec::new();
    for _ in 0..failovers {
        let leader = fields(&nodes[0].ask("leader"))["id"] as u64;
        let index = nodes.iter().position(|n| n.id == leader).unwrap();
        let survivor = (index + 1) % nodes.len();
        // A little traffic first, so the kill lands on a leader that is replicating.
        nodes[survivor].ask("write");
        let killed = Instant::now();
        nodes[index].kill();
        let answer = nodes[survivor].ask("write");
        let elapsed = killed.elapsed();
        assert!(answer.starts_with("ok"), "write after kill: {answer}");
        recoveries.push(elapsed);
        // Restart the killed node on its data and wait until it serves a linearizable read, so
        // the next round starts with three healthy members.
        nodes[index] = NodeProcess::spawn(leader, root.path(), &ports);
        assert_eq!(nodes[index].ask("sync"), "ok");
        std::thread::sleep(Duration::from_secs(1));
    }
    if !recoveries.is_empty() {
        let mut sorted = recoveries.clone();
        sorted.sort();
        println!(
            "writable again after SIGKILL of the leader ({} rounds): median {} ms, max {} ms (each: {:?} ms)",
            sorted.len(),
            sorted[sorted.len() / 2].as_millis(),
            sorted[sorted.len() - 1].as_millis(),
            recoveries.iter().map(|d| d.as_millis()).collect::<Vec<_>>()
        );
    }
    drop(nodes);
    drop(root);
    println!("load average {}", common::load_average());
    if env_number("BENCH_ETCD", 1) == 0 {
        println!("etcd reference skipped (BENCH_ETCD=0)");
        return;
    }
    // etcd's perf check sometimes fails on a loaded machine; one more try.
    match etcd_reference().or_else(|first| {
        println!("etcd reference failed ({first}); trying once more");
        etcd_reference()
    }) {
        Ok(etcd_rate) => println!(
            "etcd (3 members on 127.0.0.1-3, same filesystem, etcdctl check perf --load=l): {etcd_rate:.0} writes/s; Cairn/etcd = {:.2}",
            cairn_rate / etcd_rate
        ),
        Err(reason) => println!("etcd reference skipped: {reason}"),
    }
}

// ---------------------------------------------------------------------------------------------
// A node process: one ClusterNode, driven by command lines on stdin, one answer line each.

fn create(n: u64) -> Command {
    Command::CreateImage {
        name: Name::new(format!("image-{n}")).unwrap(),
        description: String::new(),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread")]
async fn node_process(id: u64) {
    // RUST_LOG=openraft=info (say) shows a node's elections on stderr.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .init();
    }
    let root = PathBuf::from(std::env::var("CAIRN_BENCH_ROOT").unwrap());
    let ports: Vec<u16> = std::env::var("CAIRN_BENCH_PORTS")
        .unwrap()
        .split(',')
        .map(|p| p.parse().unwrap())
        .collect();
    let config = |id: u64| {
        let listen = SocketAddr::from(([127, 0, 0, 1], ports[id as usize - 1]));
        NodeConfig {
            node_id: id,
            data_dir: root.join(format!("node-{id}")),
            raft_listen: listen,
            advertise: NodeAddress::new(listen, ""),
            identity: serde_json::from_slice(
                &std::fs::read(root.join(format!("node-{id}.identity.json"))).unwrap(),
            )
            .unwrap(),
            tuning: RaftTuning {
                proposal_flush_pacing: env_number("BENCH_FLUSH_PACING", 1) != 0,
                pre_vote: env_number("BENCH_PRE_VOTE", 1) != 0,
                ..RaftTuning::default()
            },
        }
    };
    let histograms = Histograms::install();
    let node = ClusterNode::start(config(id)).await.unwrap();
    let actor = Name::new("bench").unwrap();
    // Image names must be unique across processes and restarts.
    let counter = Arc::new(AtomicU64::new(id << 48 | (std::process::id() as u64) << 24));
    println!("ready");
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(tokio::io::stdin()));
    while let Ok(Some(line)) = lines.next_line().await {
        let words: Vec<&str> = line.split_whitespace().collect();
        let answer = match words.as_slice() {
            ["init"] => {
                node.initialize(config(id).advertise).await.unwrap();
                while !node.is_leader() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                for other in (1..=NODES).filter(|&other| other != id) {
                    node.add_learner(other, config(other).advertise)
                        .await
                        .unwrap();
                }
                node.change_membership(BTreeSet::from_iter(1..=NODES))
                    .await
                    .unwrap();
                "ok".to_string()
            }
            ["leader"] => {
                let mut metrics = node.metrics();
                let leader = metrics
                    .wait_for(|m| m.current_leader.is_some())
                    .await
                    .unwrap()
                    .current_leader
                    .unwrap();
                format!("id={leader}")
            }
            ["load", writers, seconds] => {
                load(
                    &node,
                    &actor,
                    &counter,
                    writers.parse().unwrap(),
                    seconds.parse().unwrap(),
                )
                .await
            }
            // Proposes until a write commits (retrying whatever fails but a rejection).
            ["write"] => loop {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                match node.propose(actor.clone(), create(n)).await {
                    Ok(_) => break "ok".to_string(),
                    Err(ProposeError::Rejected(rejection)) => {
                        break format!("rejected {rejection}")
                    }
                    Err(_) => continue,
                }
            },
            // Waits until this node serves a linearizable read (it knows the leader and applied
            // everything committed before).
            ["sync"] => loop {
                if node.read(|state| state.last_seq).await.is_ok() {
                    break "ok".to_string();
                }
            },
            ["stats"] => histograms.take(),
            _ => format!("unknown command {line:?}"),
        };
        println!("{answer}");
    }
}

/// A `metrics` recorder keeping every histogram value of this node process, so the bench can show
/// where a commit's time goes (counters and gauges are dropped).
#[derive(Clone, Default)]
struct Histograms {
    values: Arc<std::sync::Mutex<std::collections::BTreeMap<String, Vec<f64>>>>,
}

struct HistogramHandle {
    name: String,
    values: Arc<std::sync::Mutex<std::collections::BTreeMap<String, Vec<f64>>>>,
}

impl metrics::HistogramFn for HistogramHandle {
    fn record(&self, value: f64) {
        let mut values = self.values.lock().unwrap();
        let list = values.entry(self.name.clone()).or_default();
        // Bounded: a long run keeps its first million values of each histogram.
        if list.len() < 1_000_000 {
            list.push(value);
        }
    }
}

impl metrics::Recorder for Histograms {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn register_counter(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        metrics::Counter::noop()
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }
    fn register_histogram(
        &self,
        key: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::from_arc(Arc::new(HistogramHandle {
            name: key.name().to_string(),
            values: self.values.clone(),
        }))
    }
}

impl Histograms {
    fn install() -> Histograms {
        let histograms = Histograms::default();
        metrics::set_global_recorder(histograms.clone()).expect("first recorder of this process");
        histograms
    }

    /// "name: n=.. p50=.. p99=..;" for every histogram since the last call, then forgets them.
    fn take(&self) -> String {
        let taken = std::mem::take(&mut *self.values.lock().unwrap());
        let mut answer = String::new();
        for (name, mut values) in taken {
            values.sort_by(f64::total_cmp);
            let at = |p: f64| values[((values.len() as f64 - 1.0) * p).round() as usize];
            let short = name.trim_start_matches("cairn_raft_");
            let (p50, p99, max) = (at(0.5), at(0.99), at(1.0));
            if short.ends_with("_seconds") {
                answer.push_str(&format!(
                    "{short}: n={} p50={:.2}ms p99={:.2}ms max={:.2}ms; ",
                    values.len(),
                    p50 * 1e3,
                    p99 * 1e3,
                    max * 1e3
                ));
            } else {
                answer.push_str(&format!(
                    "{short}: n={} p50={p50:.0} p99={p99:.0} max={max:.0}; ",
                    values.len()
                ));
            }
        }
        answer
    }
}

/// `writers` concurrent writers proposing through `node` for `seconds`.
async fn load(
    node: &ClusterNode,
    actor: &Name,
    counter: &Arc<AtomicU64>,
    writers: usize,
    seconds: u64,
) -> String {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let node = node.clone();
        let actor = actor.clone();
        let counter = counter.clone();
        tasks.push(tokio::spawn(async move {
            let (mut latencies, mut failed) = (Vec::new(), 0usize);
            while Instant::now() < deadline {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let started = Instant::now();
                match node.propose(actor.clone(), create(n)).await {
                    Ok(_) => latencies.push(started.elapsed()),
                    Err(_) => failed += 1,
                }
            }
            (latencies, failed)
        }));
    }
    let (mut all, mut failed) = (Vec::new(), 0);
    for task in tasks {
        let (latencies, failures) = task.await.unwrap();
        all.extend(latencies);
        failed += failures;
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    format!(
        "done count={} failed={failed} seconds={elapsed:.3} p50_us={} p99_us={} max_us={}",
        all.len(),
        percentile(&all, 0.5).as_micros(),
        percentile(&all, 0.99).as_micros(),
        all.last().copied().unwrap_or_default().as_micros(),
    )
}

/// The peer for durable Raft commits on this machine: a three-member etcd cluster (Debian's
/// etcd-server) on 127.0.0.1-3 in a temporary directory, measured by `etcdctl check perf`.
fn etcd_reference() -> Result<f64, String> {
    use std::process::Command;
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
            .ok_or_else(|| {
                // The progress bar fills most of the output: keep its end, where the error is.
                let errors = String::from_utf8_lossy(&output.stderr);
                let all = format!("{text} {errors}");
                let tail: String = all
                    .chars()
                    .rev()
                    .take(400)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                format!("no throughput in etcdctl output: ...{}", tail.trim())
            })
    })();
    for mut member in members {
        let _ = member.kill();
        let _ = member.wait();
    }
    result
}
