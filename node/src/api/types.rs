//! Request and response bodies of the admin API, shared by the server and the CLI's client.

use serde::{Deserialize, Serialize};

use cairn_consensus::domain::{
    AssignmentList, AssignmentTarget, BootSession, Client, DiskMode, Event, Lease, Mac, Name,
    NodeId, StorageNode,
};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewClient {
    pub mac: Mac,
    pub name: Name,
    #[serde(default)]
    pub group: Option<Name>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientChange {
    #[serde(default)]
    pub name: Option<Name>,
    /// `null` leaves the group alone; `""` takes the client out of its group.
    #[serde(default)]
    pub group: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClientDetail {
    pub client: Client,
    pub images: AssignmentList,
    pub session: Option<BootSession>,
    pub lease: Option<Lease>,
    /// The session's copies as their nodes report them (primary first); a node that cannot
    /// be asked appears with `unreachable`.
    #[serde(default)]
    pub copies: Vec<CopyReport>,
}

/// One node's copy of a session's writable layer, from `GET /v1/sessions/{mac}/copy`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CopyStatus {
    pub node: NodeId,
    pub mac: Mac,
    pub image: Name,
    pub generation: u64,
    pub role: CopyRole,
    /// The other copy's node: the standby of a primary, the primary of a standby.
    pub peer: Option<NodeId>,
    /// The primary answers the initiator (a promoted standby once the old lease ran out).
    pub serving: bool,
    /// A primary whose writes have no second copy: "standby dropped" is committed, or the
    /// new standby is still being resynced.
    pub degraded: bool,
    pub resync: Option<ResyncStatus>,
    /// The last resync of this primary's standby that completed, at completion.
    pub last_resync: Option<ResyncStatus>,
    /// With `?digest=true`: the copy's digest (`Volume::copy_digest`), hex.
    pub digest: Option<String>,
    pub written_blocks: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyRole {
    Primary,
    Standby,
    /// A restarted primary that asked for a failover and serves nothing.
    AwaitingFailover,
}

/// A primary's resync of its standby.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncStatus {
    pub regions_done: u64,
    pub regions_total: u64,
    pub bytes_copied: u64,
    pub bytes_per_second: u64,
    pub elapsed_ms: u64,
    /// Unknown until a rate is known.
    pub eta_ms: Option<u64>,
}

/// `GET /v1/clients/{mac}/verify`: the digests of the session's copies.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CopyVerification {
    /// Two copies answered, at the same generation, with the same digest.
    pub equal: bool,
    pub copies: Vec<CopyReport>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CopyReport {
    pub node: NodeId,
    pub status: Option<CopyStatus>,
    /// Why the node could not be asked, or does not hold the copy.
    pub unreachable: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewImage {
    pub name: Name,
    #[serde(default)]
    pub description: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompleteVersion {
    pub manifest: cairn_consensus::domain::Hash32,
    pub size_bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    pub name: Name,
    #[serde(default)]
    pub password: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewPassword {
    pub password: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewGroup {
    pub name: Name,
    #[serde(default)]
    pub description: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewAssignment {
    pub target: AssignmentTarget,
    pub image: Name,
    pub mode: DiskMode,
    #[serde(default)]
    pub default: bool,
    #[serde(default)]
    pub position: Option<u32>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemovedAssignment {
    pub target: AssignmentTarget,
    pub image: Name,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AssignmentRow {
    pub target: AssignmentTarget,
    pub list: AssignmentList,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    pub name: Name,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IssuedToken {
    pub name: String,
    /// Shown once; the cluster keeps only its digest.
    pub token: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewJoinToken {
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IssuedJoinToken {
    pub token: String,
    pub expires: String,
}

/// What a joining node sends (authenticated by its one-time join token, not a bearer token).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    pub join_token: String,
    pub node_id: NodeId,
    pub name: Name,
    pub raft_address: String,
    pub api_address: String,
    pub portal_address: String,
    pub boot_address: String,
    pub capacity_sessions: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinResponse {
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
    pub node_cert_pem: String,
    pub node_key_pem: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: StorageNode,
    /// voter, learner, or none (registered but not in the Raft membership).
    pub raft_role: String,
    pub sessions: usize,
    /// Sessions this node is primary of with one copy only (no standby, or one being resynced).
    #[serde(default)]
    pub degraded_sessions: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub this_node: NodeId,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub last_log_index: Option<u64>,
    pub last_applied: Option<u64>,
    pub last_seq: u64,
    pub state_hash: String,
    pub nodes: Vec<NodeStatus>,
    /// Resyncs of standbys in progress, as the primaries report them.
    #[serde(default)]
    pub resyncs: Vec<CopyStatus>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    pub node_id: NodeId,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub last_applied: Option<u64>,
    pub last_seq: u64,
    pub state_hash: String,
}

/// First line of an events export (see ARCHITECTURE.md, "Event export format").
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ExportHeader {
    pub format: String,
    pub version: u32,
    pub exported_by: NodeId,
    pub exported_at: String,
    pub last_seq: u64,
    pub state_hash: String,
}

pub const EXPORT_FORMAT: &str = "cairn-events";
pub const EXPORT_VERSION: u32 = 1;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EventPage {
    pub events: Vec<Event>,
    /// Where the next page starts, if the scan stopped at `limit`.
    pub next_seq: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub message: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootRequest {
    pub image: Name,
    #[serde(default)]
    pub user: Option<Name>,
}
