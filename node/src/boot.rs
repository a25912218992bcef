//! The node's boot services: bootproto's DHCP, TFTP and router-advertisement servers wired to the
//! replicated state, and the HTTP server of the per-client iPXE scripts.
//!
//! - [`ClusterDirectory`] answers the DHCP server's questions from this node's `ClusterNode`:
//!   leadership (the Raft term while this node leads *and* has applied an entry of its own term,
//!   so its lease table and client list are complete), registered MACs and the lease table from
//!   the local projection, and unknown MACs recorded as `RecordDiscovered`.
//! - [`RaftLeaseCommitter`] commits each batch of leases as one `CommitLeases` entry; the DHCP
//!   server sends a DHCPACK only after that returned `Ok`.
//! - The script server (`GET /boot/ipxe?mac=..`, `GET /boot/<mac>.ipxe`, `GET /boot/login?..`)
//!   runs on every node. For a boot it proposes `BeginBoot` (a follower's `propose` forwards to the
//!   leader), and renders `sanboot` with the primary's and the standby's portals from the
//!   resulting session. Several images give a menu whose entries come back with `&image=`;
//!   images assigned only to users give an iPXE `login`.
//!
//! Invariants: every node runs the servers, only the Raft leader answers DHCP (checked per
//! packet, so a new leader answers the next request without a restart); no DHCPACK before its
//! lease is committed; DHCP is off unless `[boot] dhcp_mode` says otherwise, so a node never
//! answers DHCP on a network it was not configured for.
//!
//! Not done here: the protocols themselves (bootproto), serving volumes (`storage`), CHAP.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, RawQuery, State as AxumState};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use cairn_bootproto::dhcp::server::DhcpServer;
use cairn_bootproto::dhcp::{
    BootDirectory, ClientLookup, ClientStatus, CommitError, DhcpConfig, DhcpMode, DiscoveredClient,
    Lease, LeaseCommitter, PoolConfig, PxeConfig, UnknownClientPolicy,
};
use cairn_bootproto::ipxe::{render_ipxe_script, BootEntry, BootMessage, BootPlan, PlanContent};
use cairn_bootproto::ra::{RaConfig, RaResponder};
use cairn_bootproto::tftp::{TftpConfig, TftpServer};
use cairn_bootproto::MacAddr;
use cairn_consensus::domain::{
    AssignmentList, AssignmentTarget, Command, EventPayload, LeaseRequest, Mac, Name, NodeId,
    Rejection, State, LEASES_PER_COMMAND_MAX,
};
use cairn_consensus::{ClusterNode, ProposeError, ReadError};

use crate::config::NodeConfig;

/// How the node takes part in DHCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BootDhcpMode {
    /// No DHCP server (the default).
    #[default]
    Off,
    /// Full DHCP server handing out addresses from `pools` (leases replicated through Raft).
    Full,
    /// proxyDHCP beside an existing DHCP server (boot information only).
    Proxy,
}

/// `[boot]` in `node.toml`. Every field has a default; with none given the node serves boot
/// scripts on its `listen_boot_http` address and nothing else.
///
/// In `full` mode every node of the cluster must carry the same `pools` (they share one lease
/// table, and whichever node leads hands addresses out).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootConfig {
    #[serde(default)]
    pub dhcp_mode: BootDhcpMode,
    /// The interface facing the booting clients: DHCP binds to it (SO_BINDTODEVICE) and the
    /// router advertisement responder answers on it.
    #[serde(default)]
    pub interface: Option<String>,
    /// Our address on the clients' network (DHCP server identifier, TFTP next-server);
    /// defaults to the node's `address` when that is IPv4.
    #[serde(default)]
    pub server_ip: Option<Ipv4Addr>,
    /// Address the DHCP server binds; default 0.0.0.0, which clients' broadcasts need. A server
    /// that is reached only through relays may bind its own address, which also lets several
    /// nodes share one host (the benchmarks run three nodes on loopback).
    #[serde(default)]
    pub dhcp_bind_ip: Option<Ipv4Addr>,
    /// Address pools (full mode).
    #[serde(default)]
    pub pools: Vec<PoolConfig>,
    /// What unregistered MACs get (they are recorded as discovered in every case).
    #[serde(default)]
    pub unknown_clients: UnknownClientPolicy,
    /// With `unknown_clients = "answer"`: register an unknown machine into this group when its
    /// iPXE asks for a script (name `auto-<12 hex digits>`, recorded as an `AddClient` by this
    /// node), so it boots the group's default image. Without it, an unknown machine's script
    /// tells it to wait for an administrator to register it (`cairn client discovered`, then
    /// `cairn client add`) and retries.
    #[serde(default)]
    pub unknown_group: Option<String>,
    /// Boot file for BIOS PXE clients (default `undionly.kpxe`).
    #[serde(default)]
    pub bios_boot_file: Option<String>,
    /// Boot file for x86-64 UEFI clients (default `snponly.efi`: a regular file in Debian's
    /// `/usr/lib/ipxe`, where `ipxe.efi` is a symlink out of the directory that the confined
    /// TFTP server refuses; it drives the NIC through the firmware's own driver).
    #[serde(default)]
    pub efi_x64_boot_file: Option<String>,
    /// Serve the iPXE binaries over TFTP on `server_ip:69`; default: on when DHCP is on.
    #[serde(default)]
    pub tftp: Option<bool>,
    #[serde(default = "default_tftp_root")]
    pub tftp_root: PathBuf,
    /// Answer IPv6 router solicitations on `interface` (iPXE otherwise waits ~14 s for routers).
    #[serde(default)]
    pub ra: bool,
    /// Base URL of this node's script server as the clients reach it, e.g.
    /// `http://192.168.77.1:8080`; defaults to `http://<listen_boot_http>`.
    #[serde(default)]
    pub http_url: Option<String>,
    /// How long a boot menu waits before it boots the default image.
    #[serde(default = "default_menu_timeout_ms")]
    pub menu_timeout_ms: u64,
}

impl Default for BootConfig {
    fn default() -> BootConfig {
        BootConfig {
            dhcp_mode: BootDhcpMode::Off,
            interface: None,
            server_ip: None,
            dhcp_bind_ip: None,
            pools: Vec::new(),
            unknown_clients: UnknownClientPolicy::Ignore,
            unknown_group: None,
            bios_boot_file: None,
            efi_x64_boot_file: None,
            tftp: None,
            tftp_root: default_tftp_root(),
            ra: false,
            http_url: None,
            menu_timeout_ms: default_menu_timeout_ms(),
        }
    }
}

const DEFAULT_EFI_X64_BOOT_FILE: &str = "snponly.efi";

fn default_tftp_root() -> PathBuf {
    PathBuf::from("/usr/lib/ipxe")
}

fn default_menu_timeout_ms() -> u64 {
    5000
}

/// Why the boot services could not be set up from the configuration.
#[derive(Debug, thiserror::Error)]
pub enum BootConfigError {
    #[error("[boot] needs server_ip: the node address {0} is not IPv4")]
    NoServerIp(IpAddr),
    #[error("[boot] ra = true needs an interface")]
    RaWithoutInterface,
}

impl BootConfig {
    /// The script server's base URL as clients reach it (no trailing slash).
    pub fn http_base(&self, node: &NodeConfig) -> String {
        match &self.http_url {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => format!("http://{}", node.boot_http()),
        }
    }

    pub fn server_ip(&self, node: &NodeConfig) -> Result<Ipv4Addr, BootConfigError> {
        match (self.server_ip, node.address) {
            (Some(ip), _) => Ok(ip),
            (None, IpAddr::V4(ip)) => Ok(ip),
            (None, other) => Err(BootConfigError::NoServerIp(other)),
        }
    }

    /// The group unknown machines join, when they are answered at all and the name is valid.
    fn unknown_group(&self) -> Option<Name> {
        let raw = self.unknown_group.as_deref()?;
        if self.unknown_clients != UnknownClientPolicy::Answer {
            tracing::warn!(group = raw, "[boot] unknown_group needs unknown_clients = \"answer\"; unknown machines get no answer, so none is registered");
            return None;
        }
        match Name::new(raw) {
            Ok(name) => Some(name),
            Err(error) => {
                tracing::error!(group = raw, %error, "[boot] unknown_group is not a valid name; unknown machines are not registered");
                None
            }
        }
    }

    fn tftp_enabled(&self) -> bool {
        self.tftp.unwrap_or(self.dhcp_mode != BootDhcpMode::Off)
    }

    /// The DHCP server's configuration, `None` when DHCP is off.
    pub fn dhcp_config(&self, node: &NodeConfig) -> Result<Option<DhcpConfig>, BootConfigError> {
        let mode = match self.dhcp_mode {
            BootDhcpMode::Off => return Ok(None),
            BootDhcpMode::Full => DhcpMode::Full,
            BootDhcpMode::Proxy => DhcpMode::Proxy,
        };
        let server_ip = self.server_ip(node)?;
        let mut pxe = PxeConfig::new(format!("{}/boot/ipxe", self.http_base(node)));
        if let Some(file) = &self.bios_boot_file {
            pxe.bios_boot_file = file.clone();
        }
        pxe.efi_x64_boot_file = self
            .efi_x64_boot_file
            .clone()
            .unwrap_or_else(|| DEFAULT_EFI_X64_BOOT_FILE.to_owned());
        let mut config = match mode {
            DhcpMode::Full => {
                let mut config = DhcpConfig::proxy(server_ip, pxe.script_url.clone());
                config.mode = DhcpMode::Full;
                config.pools = self.pools.clone();
                config
            }
            DhcpMode::Proxy => DhcpConfig::proxy(server_ip, pxe.script_url.clone()),
        };
        config.pxe = pxe;
        config.interface = self.interface.clone();
        if let Some(ip) = self.dhcp_bind_ip {
            config.bind_ip = ip;
        }
        config.unknown_clients = self.unknown_clients;
        // One batch is one Raft entry, which the state machine bounds.
        config.commit_batch_max = config.commit_batch_max.min(LEASES_PER_COMMAND_MAX);
        Ok(Some(config))
    }
}

/// Starts the boot services of this node: the script server always, DHCP, TFTP and RA as
/// configured. A service that cannot start is logged and left out; the node keeps running.
pub fn start(
    cluster: ClusterNode,
    config: &NodeConfig,
    primaries: PrimaryProbe,
) -> Vec<JoinHandle<()>> {
    let boot = config.boot.clone();
    let mut tasks = Vec::new();
    let scripts = Arc::new(ScriptService {
        cluster: cluster.clone(),
        http_base: boot.http_base(config),
        menu_timeout_ms: boot.menu_timeout_ms,
        actor: crate::server::node_actor(config.node_id),
        primaries,
        unknown_group: boot.unknown_group(),
    });
    let listen = config.boot_http();
    tasks.push(tokio::spawn(async move {
        let listener = match tokio::net::TcpListener::bind(listen).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::error!(%listen, %error, "boot script server cannot bind; no boot scripts from this node");
                return;
            }
        };
        tracing::info!(%listen, "boot script server listening");
        if let Err(error) = axum::serve(listener, router(scripts)).await {
            tracing::error!(%error, "boot script server stopped");
        }
    }));
    tasks.push(tokio::spawn(session_gauges(cluster.clone())));

    let dhcp = match boot.dhcp_config(config) {
        Ok(dhcp) => dhcp,
        Err(error) => {
            tracing::error!(%error, "boot services not started");
            return tasks;
        }
    };
    if let Some(dhcp) = dhcp {
        let directory = Arc::new(ClusterDirectory::new(cluster.clone(), config.node_id));
        let committer = Arc::new(RaftLeaseCommitter {
            cluster: cluster.clone(),
            actor: crate::server::node_actor(config.node_id),
        });
        tasks.push(tokio::spawn(async move {
            let mode = dhcp.mode;
            let server = match DhcpServer::bind(dhcp, directory, committer).await {
                Ok(server) => server,
                Err(error) => {
                    tracing::error!(%error, "dhcp server not started");
                    return;
                }
            };
            tracing::info!(addresses = ?server.local_addrs(), ?mode, "dhcp server listening (answers while this node leads)");
            if let Err(error) = server.run().await {
                tracing::error!(%error, "dhcp server stopped");
            }
        }));
    }
    if boot.tftp_enabled() {
        warn_about_boot_files(&boot);
        match boot.server_ip(config) {
            Ok(ip) => {
                let tftp = TftpConfig::new(SocketAddr::new(ip.into(), 69), boot.tftp_root.clone());
                tasks.push(tokio::spawn(async move {
                    let bind = tftp.bind;
                    let server = match TftpServer::bind(tftp).await {
                        Ok(server) => server,
                        Err(error) => {
                            tracing::error!(%error, "tftp server not started");
                            return;
                        }
                    };
                    tracing::info!(%bind, "tftp server listening");
                    if let Err(error) = server.run().await {
                        tracing::error!(%error, "tftp server stopped");
                    }
                }));
            }
            Err(error) => tracing::error!(%error, "tftp server not started"),
        }
    }
    if boot.ra {
        match &boot.interface {
            Some(interface) => {
                let ra = RaConfig {
                    interface: interface.clone(),
                    router_lifetime_secs: 0,
                };
                match RaResponder::bind(&ra) {
                    Ok(responder) => {
                        tracing::info!(interface, "router advertisement responder running");
                        tasks.push(tokio::spawn(async move {
                            if let Err(error) = responder.run().await {
                                tracing::error!(%error, "router advertisement responder stopped");
                            }
                        }));
                    }
                    Err(error) => {
                        tracing::error!(%error, "router advertisement responder not started")
                    }
                }
            }
            None => {
                tracing::error!(error = %BootConfigError::RaWithoutInterface, "router advertisement responder not started")
            }
        }
    }
    tasks
}

/// Logs boot files the confined TFTP server will refuse (missing, or resolving out of the root,
/// as Debian's `ipxe.efi` symlink does), so an admin sees it at start, not at a client's boot.
fn warn_about_boot_files(boot: &BootConfig) {
    let files = [
        boot.bios_boot_file
            .clone()
            .unwrap_or_else(|| "undionly.kpxe".to_owned()),
        boot.efi_x64_boot_file
            .clone()
            .unwrap_or_else(|| DEFAULT_EFI_X64_BOOT_FILE.to_owned()),
    ];
    for file in files {
        let path = boot.tftp_root.join(&file);
        match std::fs::canonicalize(&path) {
            Ok(resolved) if resolved.starts_with(&boot.tftp_root) => {}
            Ok(resolved) => {
                tracing::warn!(path = %path.display(), resolved = %resolved.display(), "boot file resolves outside the tftp root; tftp will refuse it")
            }
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "boot file not found in the tftp root")
            }
        }
    }
}

/// `cairn_boot_sessions{node_id}`: active boot sessions per primary node, from this node's copy
/// of the state (node ids are few, so the label is bounded).
async fn session_gauges(cluster: ClusterNode) {
    let mut interval = tokio::time::interval(Duration::from_secs(2));
    loop {
        interval.tick().await;
        let rows: Vec<(NodeId, usize)> = cluster.local_state(|state| {
            let sessions = state.sessions_per_node();
            state
                .nodes
                .keys()
                .map(|id| (*id, sessions.get(id).copied().unwrap_or(0)))
                .collect()
        });
        for (node_id, count) in rows {
            metrics::gauge!("cairn_boot_sessions", "node_id" => node_id.to_string())
                .set(count as f64);
        }
    }
}

fn to_mac(mac: MacAddr) -> Mac {
    Mac(mac.0)
}

/// bootproto's view of the cluster, answered from this node's `ClusterNode`.
pub struct ClusterDirectory {
    cluster: ClusterNode,
    node_id: NodeId,
    /// MACs whose discovery was already proposed by this process (bounded).
    recorded: Mutex<HashSet<Mac>>,
}

/// Most MACs remembered as already recorded; beyond it, the state's own check deduplicates.
const RECORDED_MAX: usize = 4096;

impl ClusterDirectory {
    pub fn new(cluster: ClusterNode, node_id: NodeId) -> ClusterDirectory {
        ClusterDirectory {
            cluster,
            node_id,
            recorded: Mutex::new(HashSet::new()),
        }
    }
}

impl ClientLookup for ClusterDirectory {
    fn client(&self, mac: MacAddr) -> ClientStatus {
        if self
            .cluster
            .local_state(|state| state.clients.contains_key(&to_mac(mac)))
        {
            ClientStatus::Registered
        } else {
            ClientStatus::Unknown
        }
    }
}

impl BootDirectory for ClusterDirectory {
    fn leader_epoch(&self) -> Option<u64> {
        let metrics = self.cluster.metrics();
        let metrics = metrics.borrow();
        if metrics.current_leader != Some(self.node_id) {
            return None;
        }
        // A new leader has applied every earlier committed entry once it applied one of its own
        // term (the blank entry it commits on election): only then are its leases complete.
        let applied_term = metrics
            .last_applied
            .as_ref()
            .map(|log_id| log_id.leader_id.term);
        (applied_term == Some(metrics.current_term)).then_some(metrics.current_term)
    }

    fn leases(&self) -> Vec<Lease> {
        self.cluster.local_state(|state| {
            state
                .leases
                .values()
                .map(|lease| Lease {
                    mac: MacAddr(lease.mac.0),
                    ip: lease.ip,
                    expires_unix_secs: u64::try_from(lease.expires_ms / 1000).unwrap_or(0),
                    hostname: None,
                })
                .collect()
        })
    }

    fn record_discovered(&self, client: DiscoveredClient) {
        let mac = to_mac(client.mac);
        {
            let Ok(mut recorded) = self.recorded.lock() else {
                return;
            };
            if recorded.contains(&mac) {
                return;
            }
            if recorded.len() >= RECORDED_MAX {
                recorded.clear();
            }
            recorded.insert(mac);
        }
        if self.cluster.local_state(|state| {
            state.discovered.contains_key(&mac) || state.clients.contains_key(&mac)
        }) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let cluster = self.cluster.clone();
        let node_id = self.node_id;
        runtime.spawn(async move {
            let actor = crate::server::node_actor(node_id);
            match cluster.propose(actor, Command::RecordDiscovered { mac, node_id }).await {
                Ok(_) => tracing::info!(client_mac = %mac, vendor_class = ?client.vendor_class, "unknown client recorded as discovered"),
                Err(ProposeError::Rejected(Rejection::Unchanged { .. } | Rejection::AlreadyExists { .. })) => {}
                Err(error) => tracing::warn!(client_mac = %mac, %error, "recording a discovered client failed"),
            }
        });
    }
}

/// Commits DHCP leases through Raft: one `CommitLeases` entry per batch, releases (a lease
/// whose expiry is not in the future) as `ReleaseLease`.
pub struct RaftLeaseCommitter {
    cluster: ClusterNode,
    actor: Name,
}

impl LeaseCommitter for RaftLeaseCommitter {
    async fn commit_leases(&self, leases: Vec<Lease>) -> Result<(), CommitError> {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let (grants, releases): (Vec<Lease>, Vec<Lease>) = leases
            .into_iter()
            .partition(|lease| lease.expires_unix_secs as i64 * 1000 > now_ms);
        let started = std::time::Instant::now();
        let count = grants.len();
        if !grants.is_empty() {
            let requests = grants
                .iter()
                .map(|lease| LeaseRequest {
                    ip: lease.ip,
                    mac: to_mac(lease.mac),
                    expires_ms: lease.expires_unix_secs as i64 * 1000,
                })
                .collect();
            self.cluster
                .propose(
                    self.actor.clone(),
                    Command::CommitLeases { leases: requests },
                )
                .await
                .map_err(commit_error)?;
        }
        for release in releases {
            match self
                .cluster
                .propose(
                    self.actor.clone(),
                    Command::ReleaseLease {
                        mac: to_mac(release.mac),
                    },
                )
                .await
            {
                Ok(_) | Err(ProposeError::Rejected(Rejection::NotFound { .. })) => {}
                Err(error) => return Err(commit_error(error)),
            }
        }
        tracing::debug!(
            leases = count,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "leases committed"
        );
        Ok(())
    }
}

fn commit_error(error: ProposeError) -> CommitError {
    match error {
        ProposeError::NoLeader { .. } => CommitError::NotLeader,
        other => CommitError::Failed(other.to_string()),
    }
}

// ------------------------------------------------------------------ the script server

struct ScriptService {
    cluster: ClusterNode,
    http_base: String,
    menu_timeout_ms: u64,
    actor: Name,
    primaries: PrimaryProbe,
    /// See `BootConfig::unknown_group`.
    unknown_group: Option<Name>,
}

/// Asks a boot's primary whether it serves the new session yet: this node's storage directly,
/// another node over its admin API (`GET /v1/sessions/{mac}/serving`, with the node token).
pub struct PrimaryProbe {
    pub storage: Arc<crate::storage::Storage>,
    pub http: reqwest::Client,
    pub node_token: String,
}

impl PrimaryProbe {
    /// True once `primary` serves `mac` at `generation`; false when it did not within `wait`
    /// or could not be asked.
    async fn serving(
        &self,
        cluster: &ClusterNode,
        primary: u64,
        mac: Mac,
        generation: u64,
        wait: Duration,
    ) -> bool {
        if primary == cluster.node_id() {
            return self.storage.wait_serving(&mac, generation, wait).await;
        }
        let Some(api) =
            cluster.local_state(|s| s.nodes.get(&primary).map(|n| n.api_address.clone()))
        else {
            return false;
        };
        let url = format!(
            "{api}/v1/sessions/{}/serving?generation={generation}&wait_ms={}",
            MacAddr(mac.0).to_hyphenated(),
            wait.as_millis()
        );
        let answer = self
            .http
            .get(url)
            .bearer_auth(&self.node_token)
            .timeout(wait + Duration::from_millis(500))
            .send()
            .await;
        match answer {
            Ok(response) if response.status().is_success() => response
                .json::<serde_json::Value>()
                .await
                .is_ok_and(|body| body["serving"] == true),
            Ok(response) => {
                tracing::debug!(primary, status = %response.status(), "primary readiness query refused");
                false
            }
            Err(error) => {
                tracing::debug!(primary, %error, "primary readiness query failed");
                false
            }
        }
    }
}

/// The query of a script or login request: bootproto's fields plus the menu's `image`.
struct ScriptQuery {
    mac: Option<Mac>,
    image: Option<String>,
    login: Option<(String, String)>,
}

fn router(service: Arc<ScriptService>) -> Router {
    Router::new()
        .route("/boot/ipxe", get(script_by_query))
        .route("/boot/login", get(script_by_query))
        .route("/boot/{file}", get(script_by_path))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "#!ipxe\necho Cairn: no such boot URL\n",
            )
        })
        .with_state(service)
}

fn parse_query(raw: Option<&str>) -> Result<ScriptQuery, String> {
    let raw = raw.unwrap_or("");
    let parsed = cairn_bootproto::ipxe::parse_boot_query(raw).map_err(|e| e.to_string())?;
    let image = raw
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == "image")
        .map(|(_, value)| value.to_owned());
    let login = match (parsed.user, parsed.password) {
        (Some(user), Some(password)) => Some((user, password)),
        (Some(user), None) => Some((user, String::new())),
        _ => None,
    };
    Ok(ScriptQuery {
        mac: parsed.mac.map(to_mac),
        image,
        login,
    })
}

async fn script_by_query(
    AxumState(service): AxumState<Arc<ScriptService>>,
    RawQuery(raw): RawQuery,
) -> Response {
    match parse_query(raw.as_deref()) {
        Ok(query) => match query.mac {
            Some(mac) => service.script(mac, query).await,
            None => bad_request("the boot url needs ?mac=<mac address>"),
        },
        Err(reason) => bad_request(&reason),
    }
}

async fn script_by_path(
    AxumState(service): AxumState<Arc<ScriptService>>,
    Path(file): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    let Some(mac) = file
        .strip_suffix(".ipxe")
        .and_then(|m| m.parse::<Mac>().ok())
    else {
        return bad_request(&format!(
            "{:?} is not <mac address>.ipxe",
            file.chars().take(64).collect::<String>()
        ));
    };
    match parse_query(raw.as_deref()) {
        Ok(mut query) => {
            query.mac = Some(mac);
            service.script(mac, query).await
        }
        Err(reason) => bad_request(&reason),
    }
}

fn ipxe_response(status: StatusCode, script: String) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        script,
    )
        .into_response()
}

fn bad_request(reason: &str) -> Response {
    metrics::counter!("cairn_boot_scripts_total", "outcome" => "bad_request").increment(1);
    ipxe_response(
        StatusCode::BAD_REQUEST,
        format!(
            "#!ipxe\necho Cairn: bad boot request: {}\n",
            safe_text(reason)
        ),
    )
}

/// Free text for an `echo` line: printable ASCII without iPXE's special characters.
fn safe_text(raw: &str) -> String {
    raw.chars()
        .map(|c| {
            if c == ' ' || (c.is_ascii_graphic() && !"$#\\\"'|&;`{}".contains(c)) {
                c
            } else {
                '_'
            }
        })
        .take(200)
        .collect()
}

/// What the script server decided for one request.
enum Decision {
    Plan(PlanContent),
    /// Several images: a menu whose entries come back with `&image=`.
    Menu {
        images: Vec<Name>,
        default: usize,
        user: Option<Name>,
    },
}

impl ScriptService {
    fn script_url(&self, mac: &Mac) -> String {
        format!(
            "{}/boot/ipxe?mac={}",
            self.http_base,
            MacAddr(mac.0).to_hyphenated()
        )
    }

    async fn script(&self, mac: Mac, query: ScriptQuery) -> Response {
        let started = std::time::Instant::now();
        let (decision, note) = self.decide(mac, &query).await;
        let client_name = self
            .cluster
            .local_state(|s| s.clients.get(&mac).map(|c| c.name.to_string()));
        let outcome;
        let script = match decision {
            Decision::Plan(content) => {
                outcome = match &content {
                    PlanContent::Boot { .. } => "boot",
                    PlanContent::Login { .. } => "login",
                    PlanContent::Message {
                        message: BootMessage::ClusterUnavailable,
                        ..
                    } => "unavailable",
                    PlanContent::Message { .. } => "message",
                };
                let plan = BootPlan {
                    client_mac: MacAddr(mac.0),
                    client_name: client_name.clone(),
                    initiator_iqn: crate::storage::initiator_name_for_client(&mac),
                    retry_url: self.script_url(&mac),
                    content,
                };
                let script = render_ipxe_script(&plan);
                match note {
                    // The reason goes right after the `#!ipxe` line.
                    Some(note) => script.replacen(
                        "#!ipxe\n",
                        &format!("#!ipxe\necho Cairn: {}\n", safe_text(&note)),
                        1,
                    ),
                    None => script,
                }
            }
            Decision::Menu {
                images,
                default,
                user,
            } => {
                outcome = "menu";
                self.render_menu(
                    &mac,
                    client_name.as_deref(),
                    &images,
                    default,
                    user.is_some(),
                )
            }
        };
        metrics::counter!("cairn_boot_scripts_total", "outcome" => outcome).increment(1);
        tracing::info!(client_mac = %mac, outcome, elapsed_ms = started.elapsed().as_millis() as u64, "boot script served");
        ipxe_response(StatusCode::OK, script)
    }

    fn unavailable(retry_secs: u32) -> PlanContent {
        PlanContent::Message {
            message: BootMessage::ClusterUnavailable,
            retry_secs,
        }
    }

    /// The decision and, when useful, one line of explanation shown before it.
    async fn decide(&self, mac: Mac, query: &ScriptQuery) -> (Decision, Option<String>) {
        let message = |message, retry_secs| {
            Decision::Plan(PlanContent::Message {
                message,
                retry_secs,
            })
        };
        let login = &query.login;
        let mut snapshot = self.client_snapshot(mac, login).await;
        if let (
            Ok(ClientSnapshot {
                registered: false, ..
            }),
            Some(group),
        ) = (&snapshot, &self.unknown_group)
        {
            if let Err(note) = self.adopt(mac, group.clone()).await {
                return (message(BootMessage::NotRegistered, 30), Some(note));
            }
            snapshot = self.client_snapshot(mac, login).await;
        }
        let ClientSnapshot {
            registered,
            client_images,
            user_assignments,
            user,
        } = match snapshot {
            Ok(snapshot) => snapshot,
            Err(error) => {
                return (
                    Decision::Plan(Self::unavailable(10)),
                    Some(error.to_string()),
                )
            }
        };
        if !registered {
            return (message(BootMessage::NotRegistered, 30), None);
        }
        let (images, user) = match user {
            Some(Some((user, images))) if !images.images.is_empty() => (images, Some(user)),
            Some(_) => return (message(BootMessage::LoginFailed, 5), None),
            None if client_images.images.is_empty() && user_assignments => {
                let login_url = format!("{}/boot/login", self.http_base);
                return (Decision::Plan(PlanContent::Login { login_url }), None);
            }
            None => (client_images, None),
        };
        if images.images.is_empty() {
            return (message(BootMessage::NoImageAssigned, 30), None);
        }
        let chosen = match &query.image {
            Some(wanted) => match images.images.iter().find(|a| a.image.as_str() == wanted) {
                Some(assignment) => assignment.image.clone(),
                None => {
                    let note = format!("image {wanted} is not assigned here; choose again");
                    let names: Vec<Name> = images.images.iter().map(|a| a.image.clone()).collect();
                    return (
                        Decision::Menu {
                            default: default_index(&names, &images.default),
                            images: names,
                            user,
                        },
                        Some(note),
                    );
                }
            },
            None if images.images.len() == 1 => images.images[0].image.clone(),
            None => {
                let names: Vec<Name> = images.images.iter().map(|a| a.image.clone()).collect();
                return (
                    Decision::Menu {
                        default: default_index(&names, &images.default),
                        images: names,
                        user,
                    },
                    None,
                );
            }
        };
        match self.begin_boot(mac, chosen.clone(), user).await {
            Ok(entry) => (
                Decision::Plan(PlanContent::Boot {
                    entries: vec![entry],
                    default_entry: 0,
                    menu_timeout_ms: self.menu_timeout_ms,
                }),
                None,
            ),
            Err(BeginBootError::Rejected(rejection)) => (
                Decision::Plan(Self::unavailable(15)),
                Some(format!("cannot boot {chosen}: {rejection}")),
            ),
            Err(BeginBootError::Unavailable(reason)) => {
                (Decision::Plan(Self::unavailable(10)), Some(reason))
            }
        }
    }

    /// What the decision needs to know of the client, read linearizably: a client added a
    /// moment ago (on any node) is seen.
    async fn client_snapshot(
        &self,
        mac: Mac,
        login: &Option<(String, String)>,
    ) -> Result<ClientSnapshot, ReadError> {
        self.cluster
            .read(|state| ClientSnapshot {
                registered: state.clients.contains_key(&mac),
                client_images: state.client_images(&mac),
                user_assignments: state
                    .assignments
                    .keys()
                    .any(|t| matches!(t, AssignmentTarget::User(_))),
                user: login
                    .as_ref()
                    .map(|(name, password)| check_login(state, name, password)),
            })
            .await
    }

    /// Registers an unknown machine into `group` (see `BootConfig::unknown_group`).
    async fn adopt(&self, mac: Mac, group: Name) -> Result<(), String> {
        let name = Name::new(format!("auto-{}", mac.to_compact()))
            .map_err(|e| format!("no name for {mac}: {e}"))?;
        let command = Command::AddClient {
            mac,
            name,
            group: Some(group.clone()),
        };
        match self.cluster.propose(self.actor.clone(), command).await {
            // Another node's script server may have registered it a moment ago.
            Ok(_) | Err(ProposeError::Rejected(Rejection::AlreadyExists { .. })) => {
                tracing::info!(client_mac = %mac, %group, "unknown machine registered into the unknown-clients group");
                Ok(())
            }
            Err(error) => Err(format!(
                "registering {mac} into group {group} failed: {error}"
            )),
        }
    }

    /// Commits the boot (placement, generation) and returns the entry for `sanboot`.
    async fn begin_boot(
        &self,
        mac: Mac,
        image: Name,
        user: Option<Name>,
    ) -> Result<BootEntry, BeginBootError> {
        let events = match self
            .cluster
            .propose(
                self.actor.clone(),
                Command::BeginBoot {
                    mac,
                    image: image.clone(),
                    user,
                },
            )
            .await
        {
            Ok(events) => events,
            Err(ProposeError::Rejected(rejection)) => {
                return Err(BeginBootError::Rejected(rejection))
            }
            Err(error) => return Err(BeginBootError::Unavailable(error.to_string())),
        };
        let Some((primary, standby, generation)) =
            events.iter().find_map(|event| match &event.payload {
                EventPayload::BootStarted {
                    primary,
                    standby,
                    generation,
                    ..
                } => Some((*primary, *standby, *generation)),
                _ => None,
            })
        else {
            return Err(BeginBootError::Unavailable(
                "the boot was committed without a session".into(),
            ));
        };
        // Node addresses change rarely; a linearizable read sees a node registered a moment ago.
        let portals = self
            .cluster
            .read(|state| {
                (
                    portal(state, primary),
                    standby.and_then(|id| portal(state, id)),
                )
            })
            .await
            .map_err(|e| BeginBootError::Unavailable(e.to_string()))?;
        let (Some(primary_portal), standby_portal) = portals else {
            return Err(BeginBootError::Unavailable(format!(
                "node {primary} has no usable portal address"
            )));
        };
        tracing::info!(client_mac = %mac, %image, primary, ?standby, generation, "boot begun");
        // The primary exposes the new session's target once it has applied the entry: iPXE
        // gets the script only then, else its first login races the target, fails, and the
        // retry starts yet another session. A primary that does not confirm in time (slow, or
        // just died) still gets named: iPXE then takes the standby, which waits for the failover.
        let waited = std::time::Instant::now();
        let serving = self
            .primaries
            .serving(&self.cluster, primary, mac, generation, SESSION_READY_WAIT)
            .await;
        metrics::histogram!("cairn_boot_primary_ready_seconds")
            .record(waited.elapsed().as_secs_f64());
        if !serving {
            tracing::warn!(client_mac = %mac, primary, generation, waited_ms = waited.elapsed().as_millis() as u64, "the primary did not confirm the new session; answering anyway");
        }
        Ok(BootEntry {
            label: image.to_string(),
            target_iqn: cairn_blockstore::iscsi::target_name_for_client(mac.0),
            primary: primary_portal,
            standby: standby_portal,
            lun: 0,
        })
    }

    fn render_menu(
        &self,
        mac: &Mac,
        client_name: Option<&str>,
        images: &[Name],
        default: usize,
        with_login: bool,
    ) -> String {
        let hyphenated = MacAddr(mac.0).to_hyphenated();
        let who = match client_name {
            Some(name) => format!("{} ({mac})", safe_text(name)),
            None => mac.to_string(),
        };
        let credentials = if with_login {
            "&user=${username:uristring}&password=${password:uristring}"
        } else {
            ""
        };
        let mut s = String::from("#!ipxe\n:menu\n");
        s += &format!("menu Cairn: choose an image for {who}\n");
        for (i, image) in images.iter().enumerate() {
            s += &cairn_bootproto::ipxe::menu_item(i, image.as_str());
        }
        s += &format!(
            "choose --default image{} --timeout {} target || goto menu\n",
            default.min(images.len().saturating_sub(1)),
            self.menu_timeout_ms
        );
        s += "goto ${target}\n";
        for (i, image) in images.iter().enumerate() {
            // Names use a small alphabet (letters, digits, - _ .): safe in a URL and a script.
            s += &format!(":image{i}\n");
            s += &format!(
                "chain --autofree --replace {}/boot/ipxe?mac={hyphenated}&image={image}{credentials} || goto failed\n",
                self.http_base
            );
        }
        s += ":failed\n";
        s += "echo Cairn: the boot script could not be loaded (${errno}); back to the menu in 10 s\n";
        s += "prompt --timeout 10000 Press any key ||\n";
        s += "goto menu\n";
        s
    }
}

/// See `ScriptService::client_snapshot`.
struct ClientSnapshot {
    registered: bool,
    client_images: AssignmentList,
    /// Whether any image is assigned to a user (then a client without images gets a login).
    user_assignments: bool,
    /// With a login: the user and their images, or `None` for a wrong name or password.
    user: Option<Option<(Name, AssignmentList)>>,
}

/// How long the script server waits for the primary to serve a new session (see `begin_boot`).
const SESSION_READY_WAIT: Duration = Duration::from_secs(3);

enum BeginBootError {
    Rejected(Rejection),
    Unavailable(String),
}

fn default_index(images: &[Name], default: &Option<Name>) -> usize {
    default
        .as_ref()
        .and_then(|d| images.iter().position(|i| i == d))
        .unwrap_or(0)
}

/// `Some((user, their images))` when the name and password are right.
fn check_login(
    state: &State,
    name: &str,
    password: &str,
) -> Option<(Name, cairn_consensus::domain::AssignmentList)> {
    let name = Name::new(name).ok()?;
    let user = state.users.get(&name)?;
    let hash = user.password_hash.as_deref()?;
    if !crate::secrets::verify_password(password, hash) {
        return None;
    }
    Some((name.clone(), state.user_images(&name)))
}

fn portal(state: &State, node_id: NodeId) -> Option<SocketAddr> {
    state.nodes.get(&node_id)?.portal()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_config_defaults_to_no_dhcp_and_round_trips() {
        let config: BootConfig = toml::from_str("").unwrap();
        assert_eq!(config, BootConfig::default());
        assert_eq!(config.dhcp_mode, BootDhcpMode::Off);
        assert!(!config.tftp_enabled());
        let node = NodeConfig::new(
            1,
            "n1".into(),
            "/tmp/x".into(),
            "192.168.77.1".parse().unwrap(),
        );
        assert_eq!(config.dhcp_config(&node).unwrap(), None);

        let text = r#"
            dhcp_mode = "full"
            interface = "eth0"
            ra = true
            [[pools]]
            subnet = "192.168.77.0"
            prefix_len = 24
            range_first = "192.168.77.100"
            range_last = "192.168.77.150"
        "#;
        let config: BootConfig = toml::from_str(text).unwrap();
        assert!(config.tftp_enabled());
        let dhcp = config.dhcp_config(&node).unwrap().unwrap();
        assert_eq!(dhcp.mode, DhcpMode::Full);
        assert_eq!(dhcp.server_ip, Ipv4Addr::new(192, 168, 77, 1));
        assert_eq!(dhcp.pxe.script_url, "http://192.168.77.1:8080/boot/ipxe");
        assert_eq!(dhcp.interface.as_deref(), Some("eth0"));
        assert_eq!(dhcp.pxe.efi_x64_boot_file, "snponly.efi");
        assert_eq!(dhcp.bind_ip, Ipv4Addr::UNSPECIFIED);
        let bound: BootConfig =
            toml::from_str(&format!("dhcp_bind_ip = \"192.168.77.1\"\n{text}")).unwrap();
        let bound = bound.dhcp_config(&node).unwrap().unwrap();
        assert_eq!(bound.bind_ip, Ipv4Addr::new(192, 168, 77, 1));
        dhcp.validate().unwrap();
        let back: BootConfig = toml::from_str(&toml::to_string(&config).unwrap()).unwrap();
        assert_eq!(back, config);
        assert!(toml::from_str::<BootConfig>("bogus = 1").is_err());
    }

    #[test]
    fn queries_are_parsed_and_text_is_made_safe() {
        let q = parse_query(Some(
            "mac=52-54-00-77-00-10&image=deb12&user=ann&password=a%20b",
        ))
        .unwrap();
        assert_eq!(q.mac, Some("52:54:00:77:00:10".parse().unwrap()));
        assert_eq!(q.image.as_deref(), Some("deb12"));
        assert_eq!(q.login, Some(("ann".into(), "a b".into())));
        assert!(parse_query(Some("mac=zz")).is_err());
        assert_eq!(
            safe_text("a${x}; chain http://evil"),
            "a__x__ chain http://evil"
        );
    }
}
