//! DHCP lease throughput of a real three-node Cairn cluster, every lease committed through Raft,
//! against Kea (kea-dhcp4-server, memfile persisted to CSV) in the same run, both driven by
//! perfdhcp (kea-admin) in relay mode over loopback.
//!
//! The benchmark re-runs itself in a private network namespace (lo up, 127.0.0.3 on lo for Kea).
//! perfdhcp is the relay at 127.0.0.1:67 (giaddr 127.0.0.1). Kea runs first, alone, on
//! 127.0.0.3. Then three `cairn node run` processes start on 127.0.61.1-3 with `[boot]
//! dhcp_mode = "full"` bound to each node's own address; the MACs perfdhcp will use (`-M` list)
//! are registered as clients through the admin API; perfdhcp runs against the leader, which
//! sends each DHCPACK only after its lease's `CommitLeases` entry is committed (batched by the
//! DHCP server). Both servers get the same MAC list, rate and duration.
//!
//! Prints leases/s (acknowledged DHCPREQUESTs per second) for each and the ratio, and where
//! Cairn's time goes: leases per commit, commit latency, Raft propose and log-write latency from
//! the leader's /metrics, and the lease table's size on the leader and on a follower (the leases
//! really are replicated). Settings (environment): CAIRN_BENCH_SECONDS (10), CAIRN_BENCH_RATE
//! (perfdhcp -r, 10000), CAIRN_BENCH_CLIENTS (MACs in the list, 4000). Needs root (namespace,
//! port 67), perfdhcp, kea-dhcp4 and curl; otherwise it says why and exits 0.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use cairn_bootproto::testing::peers::{perfdhcp, Kea, PerfdhcpClients, PerfdhcpRun, KEA_ADDRESS};
use cairn_tests::bench::{
    self, dhcp_exchange, env_u64, leader, mac_text, macs, metric_sum, register_clients, summary,
    Api,
};

const BENCH: &str = "dhcp_raft_vs_kea";
const RANGE_FIRST: &str = "127.16.0.1";
const RANGE_LAST: &str = "127.31.255.254";

fn main() {
    if let Some(reason) = bench::missing_tool(&[
        ("perfdhcp", "kea-admin"),
        ("kea-dhcp4", "kea-dhcp4-server"),
        ("curl", "curl"),
    ]) {
        println!("{BENCH}: skipped: {reason}");
        return;
    }
    match bench::in_private_netns(BENCH, &["127.0.0.3/8"]) {
        Some(true) => return,
        Some(false) => std::process::exit(1),
        None => {}
    }
    if let Err(error) = inner() {
        eprintln!("{BENCH}: failed: {error:#}");
        std::process::exit(1);
    }
}

fn lease_count(api: &Api) -> anyhow::Result<usize> {
    let leases = api.get_json("/v1/leases")?;
    leases
        .as_array()
        .or_else(|| leases["leases"].as_array())
        .map(|list| list.len())
        .with_context(|| format!("unexpected /v1/leases answer: {leases:.200}"))
}

fn inner() -> anyhow::Result<()> {
    let seconds = env_u64("CAIRN_BENCH_SECONDS", 10);
    let rate = env_u64("CAIRN_BENCH_RATE", 10_000);
    let clients = env_u64("CAIRN_BENCH_CLIENTS", 4_000) as usize;
    let work = tempfile::tempdir()?;
    let mac_list = work.path().join("macs.txt");
    let client_macs = macs([0x52, 0x54, 0x61], clients);
    std::fs::write(
        &mac_list,
        client_macs
            .iter()
            .map(|m| mac_text(*m) + "\n")
            .collect::<String>(),
    )?;

    // Kea first, alone on the machine.
    let kea = Kea::start(work.path(), RANGE_FIRST, RANGE_LAST)?;
    let kea_run = perfdhcp(
        KEA_ADDRESS,
        seconds,
        rate,
        PerfdhcpClients::MacList(&mac_list),
    );
    let kea_log = kea.log_head();
    drop(kea);
    let kea_run = kea_run?;
    anyhow::ensure!(kea_run.acks > 0, "kea answered nothing; its log: {kea_log}");
    let kea_version = Kea::version();

    // Cairn: three real nodes, DHCP on every one, the leader answers.
    let cluster = bench::start_cluster_with_dhcp(61, RANGE_FIRST, RANGE_LAST, "")?;
    let result = cairn(&cluster, seconds, rate, &client_macs, &mac_list);
    if result.is_err() {
        eprintln!("{}", cluster.logs());
    }
    let cairn = result?;

    println!(
        "{BENCH}: perfdhcp -4 relay mode (giaddr 127.0.0.1), {seconds} s, rate {rate}/s, {clients} registered MACs (-M), private netns, loopback"
    );
    println!(
        "  cairn  : {:>9.1} leases/s  (perfdhcp rate {:.1}; {} acks / {} requests / {} offers / {} discovers); 3-node cluster, leader node {}, every lease committed through Raft (CommitLeases)",
        cairn.run.leases_per_second(),
        cairn.run.perfdhcp_rate,
        cairn.run.acks,
        cairn.run.requests,
        cairn.run.offers,
        cairn.run.discovers,
        cairn.leader_id,
    );
    println!(
        "  kea    : {:>9.1} leases/s  (perfdhcp rate {:.1}; {} acks / {} requests / {} offers / {} discovers); kea-dhcp4 {kea_version}, memfile persisted to csv",
        kea_run.leases_per_second(),
        kea_run.perfdhcp_rate,
        kea_run.acks,
        kea_run.requests,
        kea_run.offers,
        kea_run.discovers
    );
    let ratio = if kea_run.acks > 0 {
        cairn.run.leases_per_second() / kea_run.leases_per_second()
    } else {
        f64::NAN
    };
    println!("  cairn  {}", cairn.run.ack_losses());
    println!("  kea    {}", kea_run.ack_losses());
    println!("  ratio cairn/kea: {ratio:.2}x (goal: >= 1.0x)");
    for line in &cairn.details {
        println!("  {line}");
    }
    Ok(())
}

struct CairnRun {
    run: PerfdhcpRun,
    leader_id: u64,
    details: Vec<String>,
}

fn cairn(
    cluster: &cairn_tests::ProcessCluster,
    seconds: u64,
    rate: u64,
    client_macs: &[[u8; 6]],
    mac_list: &Path,
) -> anyhow::Result<CairnRun> {
    let (leader_id, leader_address) = leader(cluster)?;
    let api = Api::new(cluster, leader_id)?;
    let started = Instant::now();
    let missing = register_clients(&api, client_macs, "perf", None)?;
    if !missing.is_empty() {
        // perfdhcp must only use MACs the cluster answers.
        let text = std::fs::read_to_string(mac_list)?;
        let kept: String = text
            .lines()
            .filter(|mac| !missing.iter().any(|m| m == mac))
            .map(|mac| format!("{mac}\n"))
            .collect();
        std::fs::write(mac_list, kept)?;
    }
    let registration = started.elapsed();
    let mut details = vec![format!(
        "setup: {} clients registered through the admin API in {:.1} s ({:.0}/s, one AddClient entry each, 32 requests in flight)",
        client_macs.len(),
        registration.as_secs_f64(),
        client_macs.len() as f64 / registration.as_secs_f64()
    )];

    // The leader's DHCP server answers once it has applied an entry of its term; probe until a
    // whole exchange works (this also warms up the path), from a relay address perfdhcp does not use.
    let leader_ip: Ipv4Addr = leader_address.parse()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match dhcp_exchange(
            Ipv4Addr::new(127, 0, 0, 9),
            &[leader_ip],
            client_macs[0],
            0x5eed_0001,
            Duration::from_millis(500),
        ) {
            Ok(_) => break,
            Err(error) if Instant::now() > deadline => {
                return Err(error.context("the leader's dhcp server never answered"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }

    let before = api.get_text("/metrics")?;
    let run = perfdhcp(
        &leader_address,
        seconds,
        rate,
        PerfdhcpClients::MacList(mac_list),
    )?;
    let after = api.get_text("/metrics")?;
    let (leader_after, _) = leader(cluster)?;
    if leader_after != leader_id {
        details.push(format!(
            "warning: leadership moved from node {leader_id} to {leader_after} during the run"
        ));
    }

    let delta = |name: &str| {
        metric_sum(&after, name).unwrap_or(0.0) - metric_sum(&before, name).unwrap_or(0.0)
    };
    let commits = delta("cairn_bootproto_dhcp_commit_seconds_count");
    let committed = delta("cairn_bootproto_dhcp_leases_committed_total");
    let failed = delta("cairn_bootproto_dhcp_leases_commit_failed_total");
    let queue_full = delta("cairn_bootproto_dhcp_commit_queue_full_total");
    let commit_seconds = delta("cairn_bootproto_dhcp_commit_seconds_sum");
    details.push(format!(
        "dhcp commits during the run: {commits:.0} CommitLeases proposals, {committed:.0} leases committed ({:.1} leases/proposal), mean commit {:.2} ms, {failed:.0} failed, {queue_full:.0} dropped (commit queue full)",
        committed / commits.max(1.0),
        commit_seconds / commits.max(1.0) * 1000.0,
    ));
    // What the leader's DHCP server decided for each datagram (silences by reason).
    let decisions: Vec<String> = after
        .lines()
        .filter_map(|line| line.strip_prefix("cairn_bootproto_dhcp_requests_total{decision=\""))
        .filter_map(|rest| rest.split_once('"'))
        .map(|(decision, _)| {
            let name = format!("cairn_bootproto_dhcp_requests_total{{decision=\"{decision}\"}}");
            format!("{decision} {:.0}", delta(&name))
        })
        .collect();
    details.push(format!(
        "dhcp decisions during the run: {}",
        decisions.join(", ")
    ));
    for (name, unit_scale, unit) in [
        ("cairn_bootproto_dhcp_commit_seconds", 1000.0, "ms"),
        ("cairn_bootproto_dhcp_commit_batch_leases", 1.0, "leases"),
        ("cairn_raft_propose_seconds", 1000.0, "ms"),
        ("cairn_raft_log_write_seconds", 1000.0, "ms"),
        ("cairn_raft_log_write_jobs", 1.0, "jobs"),
        ("cairn_raft_batch_proposals", 1.0, "proposals"),
    ] {
        if let Some((count, mean, p50, p99)) = summary(&after, name) {
            details.push(format!(
                "{name} (whole process life): n={count:.0} mean={:.2} p50={:.2} p99={:.2} {unit}",
                mean * unit_scale,
                p50 * unit_scale,
                p99 * unit_scale
            ));
        }
    }
    let leader_leases = lease_count(&api)?;
    let follower = cluster
        .nodes
        .iter()
        .find(|n| n.id != leader_id)
        .context("a follower")?;
    // The follower may apply the last entries a moment later.
    std::thread::sleep(Duration::from_millis(500));
    let follower_leases = lease_count(&Api::new(cluster, follower.id)?)?;
    details.push(format!(
        "replicated lease table: {leader_leases} leases on the leader (node {leader_id}), {follower_leases} on node {} (distinct MACs acked at least once)",
        follower.id
    ));
    Ok(CairnRun {
        run,
        leader_id,
        details,
    })
}
