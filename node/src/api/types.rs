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
