//! Helpers for the real-process tests in `tests/tests/`: build the `cairn` binary, start real
//! `cairn node run` processes, and drive them through the real CLI.

pub mod bench;
pub mod guest;
pub mod initiator;
pub mod pxe;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

pub use cairn_bootproto::testing::{missing_prerequisite, slow_tests};

/// Slow suites run when `CAIRN_SLOW_TESTS=1` (as `.ci/run` sets); otherwise they print why they
/// were skipped and pass. Once they run, a missing tool fails them ([`missing_prerequisite`]).
pub fn slow_tests_enabled(test: &str) -> bool {
    if slow_tests() {
        return true;
    }
    eprintln!("skipping {test}: set CAIRN_SLOW_TESTS=1 to run it (.ci/run does)");
    false
}

/// The `cairn` binary of this workspace, built once with the same profile as the tests.
pub fn cairn_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let release = !cfg!(debug_assertions);
        let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        // `--workspace` so that features unify as in `cargo test --workspace`: building only
        // cairn-node would pick other features and recompile half the dependencies.
        command.args(["build", "-q", "--workspace", "--bins"]);
        if release {
            command.arg("--release");
        }
        command.current_dir(workspace_root());
        let status = command.status().expect("cargo runs");
        assert!(status.success(), "building the cairn binary failed");
        target_dir()
            .join(if release { "release" } else { "debug" })
            .join("cairn")
    })
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => workspace_root().join("target"),
    }
}

/// One `cairn node run` process.
pub struct NodeProcess {
    pub id: u64,
    pub data_dir: PathBuf,
    pub address: String,
    child: Option<Child>,
}

impl NodeProcess {
    pub fn api_url(&self) -> String {
        format!("https://{}:7400", self.address)
    }

    pub fn start(&mut self, log_dir: &Path) -> anyhow::Result<()> {
        assert!(self.child.is_none(), "node {} already running", self.id);
        let log = std::fs::File::create(log_dir.join(format!("node{}.log", self.id)))?;
        let child = Command::new(cairn_binary())
            .args(["node", "run", "--data-dir"])
            .arg(&self.data_dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning cairn node run")?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL: no shutdown path runs, as in a power loss of the process.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|child| child.id())
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A cluster of real processes on loopback addresses `127.0.<subnet>.<id>`.
pub struct ProcessCluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<NodeProcess>,
    pub cli_config: PathBuf,
}

impl ProcessCluster {
    /// `cluster init` on node 1, then `cluster join` for the others, all started and voters.
    pub fn start(subnet: u8, size: u64) -> anyhow::Result<ProcessCluster> {
        ProcessCluster::start_with(subnet, size, |_| None)
    }

    /// [`ProcessCluster::start`] with each node's `--capacity-sessions` (`None`: the default;
    /// `Some(0)`: a witness that votes but holds no client disk).
    pub fn start_with(
        subnet: u8,
        size: u64,
        capacity: impl Fn(u64) -> Option<u32>,
    ) -> anyhow::Result<ProcessCluster> {
        let dir = tempfile::tempdir()?;
        let cli_config = dir.path().join("cli.toml");
        let mut cluster = ProcessCluster {
            nodes: Vec::new(),
            cli_config,
            dir,
        };
        for id in 1..=size {
            cluster.nodes.push(NodeProcess {
                id,
                data_dir: cluster.dir.path().join(format!("node{id}")),
                address: format!("127.0.{subnet}.{id}"),
                child: None,
            });
        }
        let capacity_args = |id: u64| -> Vec<String> {
            capacity(id)
                .map(|c| vec!["--capacity-sessions".to_string(), c.to_string()])
                .unwrap_or_default()
        };
        let first = &cluster.nodes[0];
        let mut init = vec![
            "cluster".to_string(),
            "init".into(),
            "--node-id".into(),
            "1".into(),
            "--address".into(),
            first.address.clone(),
            "--data-dir".into(),
            first.data_dir.to_str().expect("utf-8 path").into(),
        ];
        init.extend(capacity_args(1));
        cluster.cli_ok(&init.iter().map(String::as_str).collect::<Vec<_>>())?;
        let log_dir = cluster.dir.path().to_owned();
        cluster.nodes[0].start(&log_dir)?;
        cluster.wait_for(Duration::from_secs(30), |status| status["leader"].is_u64())?;
        for index in 1..cluster.nodes.len() {
            let token = cluster.cli_json(&["cluster", "join-token"])?["token"]
                .as_str()
                .context("join token")?
                .to_string();
            let node = &cluster.nodes[index];
            let (id, address, data_dir) = (
                node.id.to_string(),
                node.address.clone(),
                node.data_dir.clone(),
            );
            let server = cluster.nodes[0].api_url();
            let mut join = vec![
                "cluster",
                "join",
                "--server",
                &server,
                "--join-token",
                &token,
                "--node-id",
                &id,
                "--address",
                &address,
                "--data-dir",
                data_dir.to_str().expect("utf-8 path"),
            ];
            let extra = capacity_args(index as u64 + 1);
            join.extend(extra.iter().map(String::as_str));
            cluster.cli_ok(&join)?;
            cluster.nodes[index].start(&log_dir)?;
        }
        let voters = size as usize;
        cluster.wait_for(Duration::from_secs(60), |status| {
            status["nodes"].as_array().is_some_and(|nodes| {
                nodes.iter().filter(|n| n["raft_role"] == "voter").count() == voters
            })
        })?;
        Ok(cluster)
    }

    /// Runs the CLI against the cluster (its config file), optionally against one node's API.
    pub fn cli(
        &self,
        server: Option<&str>,
        args: &[&str],
    ) -> anyhow::Result<(bool, String, String)> {
        run_cli(
            Command::new(cairn_binary()),
            &self.cli_config,
            server,
            args,
            None,
        )
    }

    pub fn cli_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let (ok, stdout, stderr) = self.cli(None, args)?;
        if !ok {
            bail!("cairn {} failed: {stderr}", args.join(" "));
        }
        Ok(stdout)
    }

    pub fn cli_json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let mut with_json = vec!["--json"];
        with_json.extend_from_slice(args);
        Ok(serde_json::from_str(&self.cli_ok(&with_json)?)?)
    }

    pub fn cli_json_at(&self, server: &str, args: &[&str]) -> anyhow::Result<Value> {
        let mut with_json = vec!["--json"];
        with_json.extend_from_slice(args);
        let (ok, stdout, stderr) = self.cli(Some(server), &with_json)?;
        if !ok {
            bail!(
                "cairn --server {server} {} failed: {stderr}",
                args.join(" ")
            );
        }
        Ok(serde_json::from_str(&stdout)?)
    }

    /// Waits until every node but the importing one logged that it holds the imported image
    /// version, so that any node can serve it from the start.
    pub fn wait_replicated(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let holders = self
                .nodes
                .iter()
                .filter(|n| {
                    std::fs::read_to_string(self.dir.path().join(format!("node{}.log", n.id)))
                        .is_ok_and(|log| log.contains("image version replicated"))
                })
                .count();
            if holders + 1 >= self.nodes.len() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the image reached only {holders} other nodes within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// `client show MAC` (its session and copies), at `server` or through the CLI config.
    pub fn client_show(&self, server: Option<&str>, mac: &str) -> anyhow::Result<Value> {
        match server {
            Some(server) => self.cli_json_at(server, &["client", "show", mac]),
            None => self.cli_json(&["client", "show", mac]),
        }
    }

    /// Waits (up to a minute) until `mac`'s session has a standby whose copy is in sync, that
    /// is, promotable; returns the session.
    pub fn wait_in_sync(&self, server: Option<&str>, mac: &str) -> anyhow::Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let shown = self.client_show(server, mac);
            if let Ok(shown) = &shown {
                let session = &shown["session"];
                if session["standby"].is_u64() && session["standby_copy"] == "InSync" {
                    return Ok(session.clone());
                }
            }
            if Instant::now() > deadline {
                bail!("{mac}'s standby not in sync within 60 s: {shown:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Polls `cluster status` on any running node until `done` holds.
    pub fn wait_for(
        &self,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        let mut last = Value::Null;
        loop {
            for node in self.nodes.iter().filter(|n| n.is_running()) {
                if let Ok(status) = self.cli_json_at(&node.api_url(), &["cluster", "status"]) {
                    if done(&status) {
                        return Ok(status);
                    }
                    last = status;
                }
            }
            if Instant::now() > deadline {
                bail!("timed out after {timeout:?}; last status: {last}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn logs(&self) -> String {
        node_logs(self.dir.path(), self.nodes.iter().map(|n| n.id), 30)
    }
}

/// Whether `tool` is a file in one of the PATH's directories.
/// Sends the signal `name` (`STOP`, `CONT`, ...) to `pid` with kill(1).
pub fn signal(pid: u32, name: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill -{name} {pid} failed");
    Ok(())
}

pub fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).exists()))
}

/// Runs the `cairn` CLI through `command` (the binary itself, or a wrapper such as
/// `ip netns exec <ns> <binary>`) with the cluster's CLI config and nothing from the
/// environment; returns (success, stdout, stderr).
pub fn run_cli(
    mut command: Command,
    cli_config: &Path,
    server: Option<&str>,
    args: &[&str],
    input: Option<&str>,
) -> anyhow::Result<(bool, String, String)> {
    command
        .env("CAIRN_CLI_CONFIG", cli_config)
        .env_remove("CAIRN_SERVER")
        .env_remove("CAIRN_TOKEN");
    if let Some(server) = server {
        command.args(["--server", server]);
    }
    command
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().context("running the cairn cli")?;
    {
        use std::io::Write;
        // Dropped at the end of the block: the CLI sees end of input.
        let mut stdin = child.stdin.take().context("cli stdin")?;
        if let Some(input) = input {
            stdin.write_all(input.as_bytes())?;
        }
    }
    let output = child.wait_with_output().context("running the cairn cli")?;
    Ok((
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

/// The last `lines` lines of each node's `node<id>.log` in `dir`.
pub fn node_logs(
    dir: &Path,
    ids: impl Iterator<Item = impl std::fmt::Display>,
    lines: usize,
) -> String {
    let mut text = String::new();
    for id in ids {
        let log = std::fs::read_to_string(dir.join(format!("node{id}.log"))).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(lines).collect();
        text.push_str(&format!("--- node {id} (last {lines} lines)\n"));
        for line in tail.into_iter().rev() {
            text.push_str(line);
            text.push('\n');
        }
    }
    text
}
