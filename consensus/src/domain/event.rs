//! Events: facts that happened, in the order Raft committed them. The state is a pure fold over
//! them (`State::apply_event`), so they carry every value the fold needs, including decisions the
//! leader's state machine made (a version number, a boot placement).

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::command::{AssignmentTarget, DiskMode};
use super::types::{Hash32, Mac, Name, NodeId, Seq, TimeMs};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub seq: Seq,
    /// The leader's clock when it proposed the command.
    pub time_ms: TimeMs,
    /// The admin token (or the node's own service identity, `node-<id>`) that asked for it.
    pub actor: Name,
    pub payload: EventPayload,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventPayload {
    NodeRegistered {
        node_id: NodeId,
        name: Name,
        raft_address: String,
        api_address: String,
        portal_address: String,
        boot_address: String,
        capacity_sessions: u32,
    },
    NodeDrainingSet {
        node_id: NodeId,
        draining: bool,
    },
    NodeHealthSet {
        node_id: NodeId,
        healthy: bool,
    },
    NodeRemoved {
        node_id: NodeId,
    },

    ImageCreated {
        name: Name,
        description: String,
    },
    ImageRemoved {
        name: Name,
    },
    ImageVersionBegun {
        image: Name,
        version: u32,
    },
    ImageVersionReady {
        image: Name,
        version: u32,
        manifest: Hash32,
        size_bytes: u64,
    },
    ImageVersionRetired {
        image: Name,
        version: u32,
    },

    ClientAdded {
        mac: Mac,
        name: Name,
        group: Option<Name>,
    },
    ClientUpdated {
        mac: Mac,
        name: Name,
        group: Option<Name>,
    },
    ClientRemoved {
        mac: Mac,
    },
    ClientDiscovered {
        mac: Mac,
        node_id: NodeId,
    },

    UserAdded {
        name: Name,
        password_hash: Option<String>,
    },
    UserPasswordSet {
        name: Name,
        password_hash: Option<String>,
    },
    UserRemoved {
        name: Name,
    },
    GroupAdded {
        name: Name,
        description: String,
    },
    GroupRemoved {
        name: Name,
    },
    TokenCreated {
        name: Name,
        digest: Hash32,
    },
    TokenRevoked {
        name: Name,
    },
    JoinTokenCreated {
        digest: Hash32,
        expires_ms: TimeMs,
    },
    JoinTokenConsumed {
        digest: Hash32,
        node_id: NodeId,
    },

    Assigned {
        target: AssignmentTarget,
        image: Name,
        mode: DiskMode,
        default: bool,
        position: u32,
    },
    Unassigned {
        target: AssignmentTarget,
        image: Name,
    },

    BootStarted {
        mac: Mac,
        image: Name,
        version: u32,
        mode: DiskMode,
        user: Option<Name>,
        primary: NodeId,
        standby: Option<NodeId>,
        generation: u64,
    },
    /// The primary of a session went down (its health probes failed, or its standby found it
    /// silent): the in-sync standby serves the volume from here on, at the next generation
    /// (which fences the old primary), with a new standby to resync if one is left.
    BootFailedOver {
        mac: Mac,
        from: NodeId,
        primary: NodeId,
        standby: Option<NodeId>,
        generation: u64,
    },
    /// The primary could not reach its standby (or the standby's node went down): the primary
    /// serves alone from this generation on, one copy (degraded).
    StandbyDropped {
        mac: Mac,
        standby: NodeId,
        generation: u64,
    },
    /// A session without a standby got one, at this generation; its copy is resynced.
    StandbyAssigned {
        mac: Mac,
        standby: NodeId,
        generation: u64,
    },
    /// The standby's resync completed: its copy is current and it may be promoted.
    StandbyInSync {
        mac: Mac,
        standby: NodeId,
        generation: u64,
    },
    LeaseGranted {
        ip: Ipv4Addr,
        mac: Mac,
        expires_ms: TimeMs,
    },
    LeaseReleased {
        ip: Ipv4Addr,
        mac: Mac,
    },
}

impl EventPayload {
    /// A short name for logs, filters and metrics (bounded set of values).
    pub fn kind(&self) -> &'static str {
        match self {
            EventPayload::NodeRegistered { .. } => "node_registered",
            EventPayload::NodeDrainingSet { .. } => "node_draining_set",
            EventPayload::NodeHealthSet { .. } => "node_health_set",
            EventPayload::NodeRemoved { .. } => "node_removed",
            EventPayload::ImageCreated { .. } => "image_created",
            EventPayload::ImageRemoved { .. } => "image_removed",
            EventPayload::ImageVersionBegun { .. } => "image_version_begun",
            EventPayload::ImageVersionReady { .. } => "image_version_ready",
            EventPayload::ImageVersionRetired { .. } => "image_version_retired",
            EventPayload::ClientAdded { .. } => "client_added",
            EventPayload::ClientUpdated { .. } => "client_updated",
            EventPayload::ClientRemoved { .. } => "client_removed",
            EventPayload::ClientDiscovered { .. } => "client_discovered",
            EventPayload::UserAdded { .. } => "user_added",
            EventPayload::UserPasswordSet { .. } => "user_password_set",
            EventPayload::UserRemoved { .. } => "user_removed",
            EventPayload::GroupAdded { .. } => "group_added",
            EventPayload::GroupRemoved { .. } => "group_removed",
            EventPayload::TokenCreated { .. } => "token_created",
            EventPayload::TokenRevoked { .. } => "token_revoked",
            EventPayload::JoinTokenCreated { .. } => "join_token_created",
            EventPayload::JoinTokenConsumed { .. } => "join_token_consumed",
            EventPayload::Assigned { .. } => "assigned",
            EventPayload::Unassigned { .. } => "unassigned",
            EventPayload::BootStarted { .. } => "boot_started",
            EventPayload::BootFailedOver { .. } => "boot_failed_over",
            EventPayload::StandbyDropped { .. } => "standby_dropped",
            EventPayload::StandbyAssigned { .. } => "standby_assigned",
            EventPayload::StandbyInSync { .. } => "standby_in_sync",
            EventPayload::LeaseGranted { .. } => "lease_granted",
            EventPayload::LeaseReleased { .. } => "lease_released",
        }
    }

    /// The client this event concerns, for `events log --client`.
    pub fn client(&self) -> Option<Mac> {
        match self {
            EventPayload::ClientAdded { mac, .. }
            | EventPayload::ClientUpdated { mac, .. }
            | EventPayload::ClientRemoved { mac }
            | EventPayload::ClientDiscovered { mac, .. }
            | EventPayload::BootStarted { mac, .. }
            | EventPayload::BootFailedOver { mac, .. }
            | EventPayload::StandbyDropped { mac, .. }
            | EventPayload::StandbyAssigned { mac, .. }
            | EventPayload::StandbyInSync { mac, .. }
            | EventPayload::LeaseGranted { mac, .. }
            | EventPayload::LeaseReleased { mac, .. } => Some(*mac),
            EventPayload::Assigned {
                target: AssignmentTarget::Client(mac),
                ..
            }
            | EventPayload::Unassigned {
                target: AssignmentTarget::Client(mac),
                ..
            } => Some(*mac),
            _ => None,
        }
    }

    /// The image this event concerns, for `events log --image`.
    pub fn image(&self) -> Option<&Name> {
        match self {
            EventPayload::ImageCreated { name, .. } | EventPayload::ImageRemoved { name } => {
                Some(name)
            }
            EventPayload::ImageVersionBegun { image, .. }
            | EventPayload::ImageVersionReady { image, .. }
            | EventPayload::ImageVersionRetired { image, .. }
            | EventPayload::Assigned { image, .. }
            | EventPayload::Unassigned { image, .. }
            | EventPayload::BootStarted { image, .. } => Some(image),
            _ => None,
        }
    }
}
