//! Commands: what an administrator (or a node acting for the cluster) asks for. A command is
//! validated against the current state and, if accepted, becomes one or more events.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::types::{Hash32, Mac, Name, NodeId, TimeMs};

/// Whether a client's writable layer survives a reboot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskMode {
    Persistent,
    NonPersistent,
}

/// Who an image is assigned to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AssignmentTarget {
    Client(Mac),
    Group(Name),
    User(Name),
}

impl std::fmt::Display for AssignmentTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AssignmentTarget::Client(mac) => write!(f, "client {mac}"),
            AssignmentTarget::Group(name) => write!(f, "group {name}"),
            AssignmentTarget::User(name) => write!(f, "user {name}"),
        }
    }
}

/// One DHCP lease as the boot service asks to commit it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRequest {
    pub ip: Ipv4Addr,
    pub mac: Mac,
    pub expires_ms: TimeMs,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    // Storage nodes.
    RegisterNode {
        node_id: NodeId,
        name: Name,
        /// QUIC address of the Raft endpoint, `ip:port`.
        raft_address: String,
        /// Admin API base URL, `https://ip:port` or `http://ip:port`.
        api_address: String,
        /// iSCSI portal, `ip:port`.
        portal_address: String,
        /// HTTP base URL for boot scripts, `http://ip:port`.
        boot_address: String,
        /// How many active boot sessions this node is meant to carry; placement divides by it.
        capacity_sessions: u32,
    },
    SetNodeDraining {
        node_id: NodeId,
        draining: bool,
    },
    SetNodeHealth {
        node_id: NodeId,
        healthy: bool,
    },
    RemoveNode {
        node_id: NodeId,
    },

    // Images and versions.
    CreateImage {
        name: Name,
        description: String,
    },
    RemoveImage {
        name: Name,
    },
    /// Starts a new version in state `importing`; the version number is the next free one.
    BeginImageVersion {
        image: Name,
    },
    /// Records the manifest of an imported version and makes it `ready`.
    CompleteImageVersion {
        image: Name,
        version: u32,
        manifest: Hash32,
        size_bytes: u64,
    },
    RetireImageVersion {
        image: Name,
        version: u32,
    },

    // Clients.
    AddClient {
        mac: Mac,
        name: Name,
        group: Option<Name>,
    },
    UpdateClient {
        mac: Mac,
        name: Option<Name>,
        /// `Some(None)` takes the client out of its group.
        group: Option<Option<Name>>,
    },
    RemoveClient {
        mac: Mac,
    },
    /// An unknown MAC asked for a boot; recorded so the admin can adopt it (`AddClient`).
    RecordDiscovered {
        mac: Mac,
        node_id: NodeId,
    },

    // Users, groups, tokens.
    AddUser {
        name: Name,
        /// PHC string of the password for iPXE `login`; hashed by the API, never stored in clear.
        password_hash: Option<String>,
    },
    SetUserPassword {
        name: Name,
        password_hash: Option<String>,
    },
    RemoveUser {
        name: Name,
    },
    AddGroup {
        name: Name,
        description: String,
    },
    RemoveGroup {
        name: Name,
    },
    CreateToken {
        name: Name,
        /// BLAKE3 of the secret; the secret itself never enters the log.
        digest: Hash32,
    },
    RevokeToken {
        name: Name,
    },
    CreateJoinToken {
        digest: Hash32,
        expires_ms: TimeMs,
    },
    /// A joining node used a one-time join token.
    ConsumeJoinToken {
        digest: Hash32,
        node_id: NodeId,
    },

    // Assignments.
    Assign {
        target: AssignmentTarget,
        image: Name,
        mode: DiskMode,
        /// Make this the target's default image (the menu's preselected entry).
        default: bool,
        /// Menu position (0 = first); at the end when absent.
        position: Option<u32>,
    },
    Unassign {
        target: AssignmentTarget,
        image: Name,
    },

    // Boots and leases (proposed by the leader's boot service).
    /// The client asked for its boot script: place its volume on a primary and a standby node.
    BeginBoot {
        mac: Mac,
        image: Name,
        /// Set when the image was chosen after an iPXE `login`.
        user: Option<Name>,
    },
    CommitLeases {
        leases: Vec<LeaseRequest>,
    },

    // The mirror of a session's writable layer (proposed by the nodes serving it). Each names
    // the generation its proposer saw: it is refused if the session moved on since, so of two
    // nodes that each suspect the other, only the first to commit wins.
    /// The session's primary cannot reach its standby: serve alone at generation + 1.
    DropStandby {
        mac: Mac,
        generation: u64,
    },
    /// The session's in-sync standby found its primary silent: promote it at generation + 1.
    FailOver {
        mac: Mac,
        generation: u64,
    },
    /// A session without a standby (degraded) gets one, to be resynced, at generation + 1.
    AssignStandby {
        mac: Mac,
        generation: u64,
    },
    /// The standby's resync completed at this generation.
    MarkStandbyInSync {
        mac: Mac,
        generation: u64,
        standby: NodeId,
    },
    ReleaseLease {
        mac: Mac,
    },
}

impl Command {
    /// A short name for logs and metrics (bounded set of values).
    pub fn kind(&self) -> &'static str {
        match self {
            Command::RegisterNode { .. } => "register_node",
            Command::SetNodeDraining { .. } => "set_node_draining",
            Command::SetNodeHealth { .. } => "set_node_health",
            Command::RemoveNode { .. } => "remove_node",
            Command::CreateImage { .. } => "create_image",
            Command::RemoveImage { .. } => "remove_image",
            Command::BeginImageVersion { .. } => "begin_image_version",
            Command::CompleteImageVersion { .. } => "complete_image_version",
            Command::RetireImageVersion { .. } => "retire_image_version",
            Command::AddClient { .. } => "add_client",
            Command::UpdateClient { .. } => "update_client",
            Command::RemoveClient { .. } => "remove_client",
            Command::RecordDiscovered { .. } => "record_discovered",
            Command::AddUser { .. } => "add_user",
            Command::SetUserPassword { .. } => "set_user_password",
            Command::RemoveUser { .. } => "remove_user",
            Command::AddGroup { .. } => "add_group",
            Command::RemoveGroup { .. } => "remove_group",
            Command::CreateToken { .. } => "create_token",
            Command::RevokeToken { .. } => "revoke_token",
            Command::CreateJoinToken { .. } => "create_join_token",
            Command::ConsumeJoinToken { .. } => "consume_join_token",
            Command::Assign { .. } => "assign",
            Command::DropStandby { .. } => "drop_standby",
            Command::FailOver { .. } => "fail_over",
            Command::AssignStandby { .. } => "assign_standby",
            Command::MarkStandbyInSync { .. } => "mark_standby_in_sync",
            Command::Unassign { .. } => "unassign",
            Command::BeginBoot { .. } => "begin_boot",
            Command::CommitLeases { .. } => "commit_leases",
            Command::ReleaseLease { .. } => "release_lease",
        }
    }
}
