//! The real DHCP peers the benchmarks measure Cairn against, and the private network namespace
//! they run in: perfdhcp (package kea-admin) as a relay at 127.0.0.1, and kea-dhcp4
//! (kea-dhcp4-server, memfile persisted to CSV) on 127.0.0.3. Used by bootproto's `dhcp_vs_kea`
//! bench and the tests crate's `dhcp_raft_vs_kea`; not by the node.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The address Kea listens on (`lo/127.0.0.3`); the namespace must carry it.
pub const KEA_ADDRESS: &str = "127.0.0.3";

/// Set in the environment of the run that [`in_private_netns`] starts inside the namespace.
pub const IN_NETNS_ENV: &str = "CAIRN_BENCH_IN_NETNS";

/// Whether `program` is on the PATH.
pub fn on_path(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs this benchmark binary again inside a new network namespace whose `lo` is up and also
/// carries `addresses` (e.g. `127.0.0.3/8` for Kea, which wants its address on an interface).
/// Returns `None` in the re-run process (carry on with the benchmark), `Some(success)` in the
/// outer one once the inner run ended (the namespace is deleted). Needs root and `ip`; without
/// them, prints why and returns `Some(true)`.
pub fn in_private_netns(bench: &str, addresses: &[&str]) -> Option<bool> {
    if std::env::var_os(IN_NETNS_ENV).is_some() {
        return None;
    }
    if !on_path("ip") {
        println!("{bench}: skipped: ip not installed (package iproute2)");
        return Some(true);
    }
    let ns = format!("cairnbench{}", std::process::id());
    let ip = |args: &[&str]| {
        Command::new("ip")
            .args(args)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ip(&["netns", "add", &ns]) {
        println!("{bench}: skipped: cannot create a network namespace (needs root)");
        return Some(true);
    }
    let mut ok = ip(&["-n", &ns, "link", "set", "lo", "up"]);
    for address in addresses {
        ok &= ip(&["-n", &ns, "addr", "add", address, "dev", "lo"]);
    }
    let success = ok
        && std::env::current_exe().is_ok_and(|exe| {
            Command::new("ip")
                .args(["netns", "exec", &ns])
                .arg(exe)
                .args(std::env::args().skip(1))
                .env(IN_NETNS_ENV, "1")
                .status()
                .is_ok_and(|s| s.success())
        });
    let _ = ip(&["netns", "del", &ns]);
    Some(success)
}

/// Which clients perfdhcp simulates.
pub enum PerfdhcpClients<'a> {
    /// `-R n`: n random MACs.
    Random(u64),
    /// `-M file`: the MACs listed in the file, one per line.
    MacList(&'a Path),
}

/// What one perfdhcp run reported. perfdhcp sends for `-p` seconds, then waits briefly for late
/// answers: rates are per test period.
#[derive(Debug, Clone)]
pub struct PerfdhcpRun {
    pub acks: u64,
    pub requests: u64,
    pub discovers: u64,
    pub offers: u64,
    pub seconds: f64,
    /// perfdhcp's own figure: completed 4-way exchanges per second (NaN if it printed none).
    pub perfdhcp_rate: f64,
    /// REQUESTs perfdhcp counted as lost (no ACK within its drop time, `-d`, 1 s by default,
    /// or still unanswered when the run ended).
    pub ack_drops: u64,
    /// Answers perfdhcp could not match to a REQUEST it sent.
    pub ack_orphans: u64,
    /// perfdhcp's REQUEST-to-ACK delay, as it prints it ("0.512 ms", or "n/a").
    pub ack_delay_avg: String,
    pub ack_delay_max: String,
}

impl PerfdhcpRun {
    /// Acknowledged DHCPREQUESTs per second.
    pub fn leases_per_second(&self) -> f64 {
        self.acks as f64 / self.seconds
    }

    /// Where REQUESTs went that perfdhcp did not count as acknowledged, and how long ACKs took.
    pub fn ack_losses(&self) -> String {
        format!(
            "REQUEST-ACK: {} drops, {} orphans; delay avg {}, max {}",
            self.ack_drops, self.ack_orphans, self.ack_delay_avg, self.ack_delay_max
        )
    }
}

/// Runs perfdhcp as the relay at 127.0.0.1 (giaddr 127.0.0.1) against `server` for `seconds`
/// at `rate` DISCOVERs per second.
pub fn perfdhcp(
    server: &str,
    seconds: u64,
    rate: u64,
    clients: PerfdhcpClients<'_>,
) -> io::Result<PerfdhcpRun> {
    let mut command = Command::new("perfdhcp");
    command.args(["-4", "-l", "127.0.0.1", "-r", &rate.to_string()]);
    match clients {
        PerfdhcpClients::Random(count) => command.args(["-R", &count.to_string()]),
        PerfdhcpClients::MacList(list) => command.arg("-M").arg(list),
    };
    let output = command
        .args(["-p", &seconds.to_string(), server])
        .output()?;
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    if report.is_empty() {
        return Err(io::Error::other(format!(
            "perfdhcp printed nothing: {}",
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    Ok(parse_report(&report, seconds as f64))
}

/// Reads perfdhcp's printed report (its statistics sections) of a run of `seconds`.
pub fn parse_report(report: &str, seconds: f64) -> PerfdhcpRun {
    // The value after `key` on the last line of section `name` that starts with it (perfdhcp
    // prints "avg delay:" twice; the last one holds the figure).
    let text = |name: &str, key: &str| -> Option<String> {
        report
            .split(&format!("Statistics for: {name}"))
            .nth(1)
            .and_then(|part| {
                part.split("Statistics for:")
                    .next()
                    .unwrap_or(part)
                    .lines()
                    .rev()
                    .find_map(|l| l.trim().strip_prefix(key))
                    .map(|v| v.trim().to_string())
            })
    };
    let section = |name: &str, key: &str| -> u64 {
        text(name, key).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    PerfdhcpRun {
        acks: section("REQUEST-ACK", "received packets:"),
        requests: section("REQUEST-ACK", "sent packets:"),
        discovers: section("DISCOVER-OFFER", "sent packets:"),
        offers: section("DISCOVER-OFFER", "received packets:"),
        seconds,
        perfdhcp_rate: report
            .lines()
            .find_map(|l| l.trim().strip_prefix("Rate:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN),
        ack_drops: section("REQUEST-ACK", "drops:"),
        ack_orphans: section("REQUEST-ACK", "orphans:"),
        ack_delay_avg: text("REQUEST-ACK", "avg delay:").unwrap_or_else(|| "n/a".into()),
        ack_delay_max: text("REQUEST-ACK", "max delay:").unwrap_or_else(|| "n/a".into()),
    }
}

/// kea-dhcp4 on [`KEA_ADDRESS`], leases in memory persisted to a CSV file in `work`, handing
/// out `pool_first - pool_last` of 127.0.0.0/8 to relayed requests. Stopped on drop.
pub struct Kea {
    child: Child,
    log: PathBuf,
}

impl Kea {
    /// Starts Kea and gives it two seconds to open its sockets.
    pub fn start(work: &Path, pool_first: &str, pool_last: &str) -> io::Result<Kea> {
        let config = work.join("kea-dhcp4.json");
        let leases = work.join("leases4.csv");
        let log = work.join("kea.log");
        std::fs::write(
            &config,
            format!(
                r#"{{"Dhcp4": {{
  "interfaces-config": {{"interfaces": ["lo/{KEA_ADDRESS}"], "dhcp-socket-type": "udp"}},
  "lease-database": {{"type": "memfile", "persist": true, "name": "{}", "lfc-interval": 0}},
  "valid-lifetime": 3600,
  "subnet4": [{{"id": 1, "subnet": "127.0.0.0/8", "pools": [{{"pool": "{pool_first} - {pool_last}"}}]}}],
  "loggers": [{{"name": "kea-dhcp4", "output_options": [{{"output": "{}"}}], "severity": "WARN"}}]
}}}}"#,
                leases.display(),
                log.display()
            ),
        )?;
        let child = Command::new("kea-dhcp4")
            .arg("-c")
            .arg(&config)
            .env("KEA_PIDFILE_DIR", work)
            .env("KEA_LOCKFILE_DIR", work)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        std::thread::sleep(Duration::from_secs(2));
        Ok(Kea { child, log })
    }

    /// The first lines of Kea's log, joined (for a run in which it answered nothing).
    pub fn log_head(&self) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .take(5)
            .collect::<Vec<_>>()
            .join(" | ")
    }

    /// `kea-dhcp4 -v`.
    pub fn version() -> String {
        Command::new("kea-dhcp4")
            .arg("-v")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    }
}

impl Drop for Kea {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of perfdhcp's report (Kea 2.2), figures changed to tell the fields apart.
    const REPORT: &str = "Running: perfdhcp -4 -l 127.0.0.1 -r 10 -R 10 -p 2 127.0.0.9
***Rate statistics***
Rate: 9.5 4-way exchanges/second, expected rate: 10
***Statistics for: DISCOVER-OFFER***
sent packets: 19
received packets: 18
drops: 1
orphans: 0
avg delay: min delay: 0.1 ms
avg delay: 0.3 ms
max delay: 0.9 ms
***Statistics for: REQUEST-ACK***
sent packets: 18
received packets: 15
drops: 2
drops ratio: 11 %
orphans: 1
min delay: 0.2 ms
avg delay: min delay: 0.2 ms
avg delay: 21.5 ms
max delay: 40.25 ms
collected packets: 0
";

    #[test]
    fn report_fields_come_from_their_own_section() {
        let run = parse_report(REPORT, 2.0);
        assert_eq!((run.discovers, run.offers), (19, 18));
        assert_eq!((run.requests, run.acks), (18, 15));
        assert_eq!((run.ack_drops, run.ack_orphans), (2, 1));
        assert_eq!(run.ack_delay_avg, "21.5 ms");
        assert_eq!(run.ack_delay_max, "40.25 ms");
        assert_eq!(run.perfdhcp_rate, 9.5);
        assert_eq!(run.leases_per_second(), 7.5);
    }

    #[test]
    fn a_report_without_sections_reads_as_nothing() {
        let run = parse_report("perfdhcp: garbage", 1.0);
        assert_eq!((run.acks, run.ack_drops), (0, 0));
        assert_eq!(run.ack_delay_avg, "n/a");
        assert!(run.perfdhcp_rate.is_nan());
    }
}
