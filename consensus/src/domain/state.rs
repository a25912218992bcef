//! The projection: what the event history adds up to. `apply_event` is the fold step and the only
//! code that changes a `State`; `decide` is the validation that turns a command into events.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::command::{AssignmentTarget, Command, DiskMode, LeaseRequest};
use super::event::{Event, EventPayload};
use super::rejection::{EntityKind, Rejection};
use super::types::{Hash32, Mac, Name, NodeId, Seq, TimeMs};
use super::Proposal;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageNode {
    pub node_id: NodeId,
    pub name: Name,
    pub raft_address: String,
    pub api_address: String,
    pub portal_address: String,
    pub boot_address: String,
    pub capacity_sessions: u32,
    pub healthy: bool,
    pub draining: bool,
}

impl StorageNode {
    /// Its iSCSI portal, if the recorded address parses.
    pub fn portal(&self) -> Option<std::net::SocketAddr> {
        self.portal_address.parse().ok()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VersionState {
    Importing,
    Ready,
    Retired,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageVersion {
    pub version: u32,
    pub state: VersionState,
    pub manifest: Option<Hash32>,
    pub size_bytes: u64,
    pub created_ms: TimeMs,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    pub name: Name,
    pub description: String,
    pub versions: BTreeMap<u32, ImageVersion>,
    pub created_ms: TimeMs,
}

impl Image {
    /// The newest ready version: what a boot uses.
    pub fn current_version(&self) -> Option<&ImageVersion> {
        self.versions
            .values()
            .rev()
            .find(|v| v.state == VersionState::Ready)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Client {
    pub mac: Mac,
    pub name: Name,
    pub group: Option<Name>,
    pub created_ms: TimeMs,
    /// The copies of each persistent disk's writable layer (image -> copies): its homes, and
    /// which of them are current.
    #[serde(default)]
    pub layers: BTreeMap<Name, LayerCopies>,
}

/// Where a persistent layer's copies are (DESIGN.md "Two copies of every writable layer").
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerCopies {
    /// Nodes that hold a copy, current or not: at most [`LAYER_HOMES_MAX`].
    pub homes: BTreeSet<NodeId>,
    /// Homes whose copy is current: only one of these may become the primary of a boot or a
    /// failover. A copy leaves this set as soon as a primary serves without it.
    pub in_sync: BTreeSet<NodeId>,
}

/// Homes a persistent layer keeps: its two copies.
pub const LAYER_HOMES_MAX: usize = 2;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Discovered {
    pub mac: Mac,
    pub node_id: NodeId,
    pub first_seen_ms: TimeMs,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub name: Name,
    pub password_hash: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub name: Name,
    pub description: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    pub name: Name,
    pub digest: Hash32,
    pub created_ms: TimeMs,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    pub digest: Hash32,
    pub expires_ms: TimeMs,
    pub used_by: Option<NodeId>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub image: Name,
    pub mode: DiskMode,
}

/// A target's assigned images in menu order and its default.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignmentList {
    pub images: Vec<Assignment>,
    pub default: Option<Name>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSession {
    pub mac: Mac,
    pub image: Name,
    pub version: u32,
    pub mode: DiskMode,
    pub user: Option<Name>,
    pub primary: NodeId,
    pub standby: Option<NodeId>,
    /// Where the standby's copy stands; only an in-sync standby may be promoted.
    pub standby_copy: StandbyCopy,
    pub generation: u64,
    /// The generation the boot started at: a node resets a non-persistent layer only for a
    /// role at this generation (later ones are failovers and standby changes of the same boot).
    pub boot_generation: u64,
    pub started_ms: TimeMs,
}

/// The state of a session standby's copy of the writable layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StandbyCopy {
    /// Complete and current (mirrored since the session began, or resynced): it may be
    /// promoted. Also the value when there is no standby.
    InSync,
    /// An empty layer on the same base, to be filled by a resync.
    Fresh,
    /// An older copy (a home that missed writes, a node that returned): the resync sends what
    /// differs.
    Stale,
}

impl BootSession {
    /// One copy only: no standby, or one still being resynced.
    pub fn is_degraded(&self) -> bool {
        self.standby.is_none() || self.standby_copy != StandbyCopy::InSync
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub ip: Ipv4Addr,
    pub mac: Mac,
    pub expires_ms: TimeMs,
}

/// Everything the event history adds up to. Ordered maps only, so that the encoding, and with it
/// `hash`, is canonical.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub last_seq: Seq,
    pub last_time_ms: TimeMs,
    pub nodes: BTreeMap<NodeId, StorageNode>,
    pub images: BTreeMap<Name, Image>,
    pub clients: BTreeMap<Mac, Client>,
    pub discovered: BTreeMap<Mac, Discovered>,
    pub users: BTreeMap<Name, User>,
    pub groups: BTreeMap<Name, Group>,
    pub tokens: BTreeMap<Name, Token>,
    pub join_tokens: BTreeMap<Hash32, JoinToken>,
    pub assignments: BTreeMap<AssignmentTarget, AssignmentList>,
    pub boot_sessions: BTreeMap<Mac, BootSession>,
    /// Volume generations outlive sessions: a new boot always gets a higher one.
    pub generations: BTreeMap<Mac, u64>,
    pub leases: BTreeMap<Ipv4Addr, Lease>,
}

/// Most leases one `CommitLeases` may carry; bounds one Raft entry.
pub const LEASES_PER_COMMAND_MAX: usize = 1024;
/// Most images one target may have assigned (an iPXE menu of more is useless).
pub const ASSIGNMENTS_PER_TARGET_MAX: usize = 64;
/// Longest free-text description.
pub const DESCRIPTION_BYTES_MAX: usize = 1024;

impl State {
    /// Validates `proposal` and, if it is accepted, applies the events it produces and returns
    /// them. Deterministic: the same state and proposal give the same events on every node.
    pub fn execute(&mut self, proposal: &Proposal) -> Result<Vec<Event>, Rejection> {
        let payloads = self.decide(&proposal.command, proposal.time_ms)?;
        let mut events = Vec::with_capacity(payloads.len());
        for payload in payloads {
            let event = Event {
                seq: self.last_seq + 1,
                time_ms: proposal.time_ms,
                actor: proposal.actor.clone(),
                payload,
            };
            self.apply_event(&event);
            events.push(event);
        }
        Ok(events)
    }

    /// Validation only: the leader's cheap pre-check before it proposes.
    pub fn check(&self, proposal: &Proposal) -> Result<(), Rejection> {
        self.decide(&proposal.command, proposal.time_ms).map(|_| ())
    }

    /// BLAKE3 of the canonical binary encoding.
    pub fn hash(&self) -> Hash32 {
        let bytes = crate::codec::encode(self).expect("a state always encodes");
        Hash32::of(&bytes)
    }

    /// The fold step. Events are facts: they are applied without validation. An event that does
    /// not fit (which `decide` never produces) is applied as far as it goes, never panics.
    pub fn apply_event(&mut self, event: &Event) {
        assert_eq!(
            event.seq,
            self.last_seq + 1,
            "events must be applied in sequence"
        );
        self.last_seq = event.seq;
        self.last_time_ms = event.time_ms;
        let now = event.time_ms;
        match &event.payload {
            EventPayload::NodeRegistered {
                node_id,
                name,
                raft_address,
                api_address,
                portal_address,
                boot_address,
                capacity_sessions,
            } => {
                self.nodes.insert(
                    *node_id,
                    StorageNode {
                        node_id: *node_id,
                        name: name.clone(),
                        raft_address: raft_address.clone(),
                        api_address: api_address.clone(),
                        portal_address: portal_address.clone(),
                        boot_address: boot_address.clone(),
                        capacity_sessions: *capacity_sessions,
                        healthy: true,
                        draining: false,
                    },
                );
            }
            EventPayload::NodeDrainingSet { node_id, draining } => {
                if let Some(node) = self.nodes.get_mut(node_id) {
                    node.draining = *draining;
                }
            }
            EventPayload::NodeHealthSet { node_id, healthy } => {
                if let Some(node) = self.nodes.get_mut(node_id) {
                    node.healthy = *healthy;
                }
            }
            EventPayload::NodeRemoved { node_id } => {
                self.nodes.remove(node_id);
            }
            EventPayload::ImageCreated { name, description } => {
                self.images.insert(
                    name.clone(),
                    Image {
                        name: name.clone(),
                        description: description.clone(),
                        versions: BTreeMap::new(),
                        created_ms: now,
                    },
                );
            }
            EventPayload::ImageRemoved { name } => {
                self.images.remove(name);
            }
            EventPayload::ImageVersionBegun { image, version } => {
                if let Some(image) = self.images.get_mut(image) {
                    image.versions.insert(
                        *version,
                        ImageVersion {
                            version: *version,
                            state: VersionState::Importing,
                            manifest: None,
                            size_bytes: 0,
                            created_ms: now,
                        },
                    );
                }
            }
            EventPayload::ImageVersionReady {
                image,
                version,
                manifest,
                size_bytes,
            } => {
                if let Some(entry) = self
                    .images
                    .get_mut(image)
                    .and_then(|i| i.versions.get_mut(version))
                {
                    entry.state = VersionState::Ready;
                    entry.manifest = Some(*manifest);
                    entry.size_bytes = *size_bytes;
                }
            }
            EventPayload::ImageVersionRetired { image, version } => {
                if let Some(entry) = self
                    .images
                    .get_mut(image)
                    .and_then(|i| i.versions.get_mut(version))
                {
                    entry.state = VersionState::Retired;
                }
            }
            EventPayload::ClientAdded { mac, name, group } => {
                self.discovered.remove(mac);
                self.clients.insert(
                    *mac,
                    Client {
                        mac: *mac,
                        name: name.clone(),
                        group: group.clone(),
                        created_ms: now,
                        layers: BTreeMap::new(),
                    },
                );
            }
            EventPayload::ClientUpdated { mac, name, group } => {
                if let Some(client) = self.clients.get_mut(mac) {
                    client.name = name.clone();
                    client.group = group.clone();
                }
            }
            EventPayload::ClientRemoved { mac } => {
                self.clients.remove(mac);
                self.assignments.remove(&AssignmentTarget::Client(*mac));
                self.boot_sessions.remove(mac);
            }
            EventPayload::ClientDiscovered { mac, node_id } => {
                self.discovered.insert(
                    *mac,
                    Discovered {
                        mac: *mac,
                        node_id: *node_id,
                        first_seen_ms: now,
                    },
                );
            }
            EventPayload::UserAdded {
                name,
                password_hash,
            } => {
                self.users.insert(
                    name.clone(),
                    User {
                        name: name.clone(),
                        password_hash: password_hash.clone(),
                    },
                );
            }
            EventPayload::UserPasswordSet {
                name,
                password_hash,
            } => {
                if let Some(user) = self.users.get_mut(name) {
                    user.password_hash = password_hash.clone();
                }
            }
            EventPayload::UserRemoved { name } => {
                self.users.remove(name);
                self.assignments
                    .remove(&AssignmentTarget::User(name.clone()));
            }
            EventPayload::GroupAdded { name, description } => {
                self.groups.insert(
                    name.clone(),
                    Group {
                        name: name.clone(),
                        description: description.clone(),
                    },
                );
            }
            EventPayload::GroupRemoved { name } => {
                self.groups.remove(name);
                self.assignments
                    .remove(&AssignmentTarget::Group(name.clone()));
            }
            EventPayload::TokenCreated { name, digest } => {
                self.tokens.insert(
                    name.clone(),
                    Token {
                        name: name.clone(),
                        digest: *digest,
                        created_ms: now,
                    },
                );
            }
            EventPayload::TokenRevoked { name } => {
                self.tokens.remove(name);
            }
            EventPayload::JoinTokenCreated { digest, expires_ms } => {
                self.join_tokens.insert(
                    *digest,
                    JoinToken {
                        digest: *digest,
                        expires_ms: *expires_ms,
                        used_by: None,
                    },
                );
            }
            EventPayload::JoinTokenConsumed { digest, node_id } => {
                if let Some(token) = self.join_tokens.get_mut(digest) {
                    token.used_by = Some(*node_id);
                }
            }
            EventPayload::Assigned {
                target,
                image,
                mode,
                default,
                position,
            } => {
                let list = self.assignments.entry(target.clone()).or_default();
                list.images.retain(|a| &a.image != image);
                let position = (*position as usize).min(list.images.len());
                list.images.insert(
                    position,
                    Assignment {
                        image: image.clone(),
                        mode: *mode,
                    },
                );
                if *default {
                    list.default = Some(image.clone());
                }
            }
            EventPayload::Unassigned { target, image } => {
                if let Some(list) = self.assignments.get_mut(target) {
                    list.images.retain(|a| &a.image != image);
                    if list.default.as_ref() == Some(image) {
                        list.default = None;
                    }
                    if list.images.is_empty() {
                        self.assignments.remove(target);
                    }
                }
            }
            EventPayload::BootStarted {
                mac,
                image,
                version,
                mode,
                user,
                primary,
                standby,
                generation,
            } => {
                self.generations.insert(*mac, *generation);
                let standby_copy = match mode {
                    DiskMode::Persistent => self.copies_at_boot(mac, image, *primary, *standby),
                    // Both copies are reset to the base at the boot.
                    DiskMode::NonPersistent => StandbyCopy::InSync,
                };
                self.boot_sessions.insert(
                    *mac,
                    BootSession {
                        mac: *mac,
                        image: image.clone(),
                        version: *version,
                        mode: *mode,
                        user: user.clone(),
                        primary: *primary,
                        standby: *standby,
                        standby_copy,
                        generation: *generation,
                        boot_generation: *generation,
                        started_ms: now,
                    },
                );
            }
            EventPayload::BootFailedOver {
                mac,
                primary,
                standby,
                generation,
                ..
            } => {
                self.generations.insert(*mac, *generation);
                self.apply_session_change(mac, *generation, Some(*primary), *standby);
            }
            EventPayload::StandbyDropped {
                mac, generation, ..
            } => {
                self.generations.insert(*mac, *generation);
                self.apply_session_change(mac, *generation, None, None);
            }
            EventPayload::StandbyAssigned {
                mac,
                standby,
                generation,
            } => {
                self.generations.insert(*mac, *generation);
                self.apply_session_change(mac, *generation, None, Some(*standby));
            }
            EventPayload::StandbyInSync { mac, standby, .. } => {
                self.apply_standby_in_sync(mac, *standby);
            }
            EventPayload::LeaseGranted {
                ip,
                mac,
                expires_ms,
            } => {
                // A MAC holds at most one lease: a new one replaces its old address.
                self.leases.retain(|_, lease| lease.mac != *mac);
                self.leases.insert(
                    *ip,
                    Lease {
                        ip: *ip,
                        mac: *mac,
                        expires_ms: *expires_ms,
                    },
                );
            }
            EventPayload::LeaseReleased { ip, .. } => {
                self.leases.remove(ip);
            }
        }
    }

    /// The images a client may boot, in menu order: its own assignments, then its group's; the
    /// first assignment of an image wins. The default is the client's, else the group's.
    pub fn client_images(&self, mac: &Mac) -> AssignmentList {
        let mut merged = AssignmentList::default();
        let Some(client) = self.clients.get(mac) else {
            return merged;
        };
        let own = self.assignments.get(&AssignmentTarget::Client(*mac));
        let group = client
            .group
            .as_ref()
            .and_then(|g| self.assignments.get(&AssignmentTarget::Group(g.clone())));
        for list in [own, group].into_iter().flatten() {
            for assignment in &list.images {
                if !merged.images.iter().any(|a| a.image == assignment.image) {
                    merged.images.push(assignment.clone());
                }
            }
            if merged.default.is_none() {
                merged.default = list.default.clone();
            }
        }
        merged
    }

    /// The images assigned to a user (offered after an iPXE `login`).
    pub fn user_images(&self, user: &Name) -> AssignmentList {
        self.assignments
            .get(&AssignmentTarget::User(user.clone()))
            .cloned()
            .unwrap_or_default()
    }

    /// Active boot sessions per node as primary.
    pub fn sessions_per_node(&self) -> BTreeMap<NodeId, usize> {
        let mut counts: BTreeMap<NodeId, usize> = self.nodes.keys().map(|id| (*id, 0)).collect();
        for session in self.boot_sessions.values() {
            *counts.entry(session.primary).or_default() += 1;
        }
        counts
    }

    /// Placement for a new boot of `mac`: the healthy, non-draining node with the fewest active
    /// sessions for its capacity is primary; the next such node is standby. The client's own
    /// current session does not count against its node (it is being replaced).
    pub fn place(&self, mac: &Mac) -> Option<(NodeId, Option<NodeId>)> {
        let candidates = self.placement_candidates(mac, &[]);
        let primary = *candidates.first()?;
        Some((primary, candidates.get(1).copied()))
    }

    /// Healthy, non-draining nodes other than `exclude`, least loaded first (active sessions as
    /// primary for their capacity, sessions of `mac` not counted); ties go to the lower node id.
    pub fn placement_candidates(&self, mac: &Mac, exclude: &[NodeId]) -> Vec<NodeId> {
        let mut load: BTreeMap<NodeId, u64> = BTreeMap::new();
        for session in self.boot_sessions.values().filter(|s| s.mac != *mac) {
            *load.entry(session.primary).or_default() += 1;
        }
        let mut candidates: Vec<&StorageNode> = self
            .nodes
            .values()
            .filter(|n| n.healthy && !n.draining && n.capacity_sessions > 0)
            .filter(|n| !exclude.contains(&n.node_id))
            .collect();
        // Compare load/capacity as fractions; candidates are sorted by id already and the sort
        // is stable.
        candidates.sort_by(|a, b| {
            let load_a = load.get(&a.node_id).copied().unwrap_or(0);
            let load_b = load.get(&b.node_id).copied().unwrap_or(0);
            (load_a * u64::from(b.capacity_sessions))
                .cmp(&(load_b * u64::from(a.capacity_sessions)))
        });
        candidates.into_iter().map(|n| n.node_id).collect()
    }

    /// Validates a command against this state and returns the events it would produce.
    fn decide(&self, command: &Command, now: TimeMs) -> Result<Vec<EventPayload>, Rejection> {
        use EventPayload as E;
        let events = match command {
            Command::RegisterNode {
                node_id,
                name,
                raft_address,
                api_address,
                portal_address,
                boot_address,
                capacity_sessions,
            } => {
                for (field, value) in [
                    ("raft_address", raft_address),
                    ("api_address", api_address),
                    ("portal_address", portal_address),
                    ("boot_address", boot_address),
                ] {
                    check_text(field, value, 256)?;
                }
                if let Some(other) = self
                    .nodes
                    .values()
                    .find(|n| &n.name == name && n.node_id != *node_id)
                {
                    return Err(Rejection::AlreadyExists {
                        kind: EntityKind::Node,
                        name: format!("{name} (node id {})", other.node_id),
                    });
                }
                // Registering again updates the addresses (a node restarted with new ones).
                vec![E::NodeRegistered {
                    node_id: *node_id,
                    name: name.clone(),
                    raft_address: raft_address.clone(),
                    api_address: api_address.clone(),
                    portal_address: portal_address.clone(),
                    boot_address: boot_address.clone(),
                    capacity_sessions: *capacity_sessions,
                }]
            }
            Command::SetNodeDraining { node_id, draining } => {
                self.node(*node_id)?;
                vec![E::NodeDrainingSet {
                    node_id: *node_id,
                    draining: *draining,
                }]
            }
            Command::SetNodeHealth { node_id, healthy } => {
                let node = self.node(*node_id)?;
                if node.healthy == *healthy {
                    return Err(Rejection::Unchanged {
                        what: format!("node {node_id} health is already {healthy}"),
                    });
                }
                let mut events = vec![E::NodeHealthSet {
                    node_id: *node_id,
                    healthy: *healthy,
                }];
                if !*healthy {
                    events.extend(self.failovers_from(*node_id));
                }
                events
            }
            Command::RemoveNode { node_id } => {
                self.node(*node_id)?;
                vec![E::NodeRemoved { node_id: *node_id }]
            }
            Command::CreateImage { name, description } => {
                check_text("description", description, DESCRIPTION_BYTES_MAX)?;
                if self.images.contains_key(name) {
                    return Err(Rejection::AlreadyExists {
                        kind: EntityKind::Image,
                        name: name.to_string(),
                    });
                }
                vec![E::ImageCreated {
                    name: name.clone(),
                    description: description.clone(),
                }]
            }
            Command::RemoveImage { name } => {
                self.image(name)?;
                if let Some(target) = self
                    .assignments
                    .iter()
                    .find(|(_, l)| l.images.iter().any(|a| &a.image == name))
                    .map(|(t, _)| t)
                {
                    return Err(Rejection::InUse {
                        kind: EntityKind::Image,
                        name: name.to_string(),
                        reason: format!("assigned to {target}"),
                    });
                }
                if let Some(session) = self.boot_sessions.values().find(|s| &s.image == name) {
                    return Err(Rejection::InUse {
                        kind: EntityKind::Image,
                        name: name.to_string(),
                        reason: format!("booted by client {}", session.mac),
                    });
                }
                vec![E::ImageRemoved { name: name.clone() }]
            }
            Command::BeginImageVersion { image } => {
                let entry = self.image(image)?;
                let version = entry.versions.keys().next_back().copied().unwrap_or(0) + 1;
                vec![E::ImageVersionBegun {
                    image: image.clone(),
                    version,
                }]
            }
            Command::CompleteImageVersion {
                image,
                version,
                manifest,
                size_bytes,
            } => {
                let entry = self.version(image, *version)?;
                if entry.state != VersionState::Importing {
                    return Err(Rejection::Conflict {
                        reason: format!(
                            "image {image} version {version} is {:?}, not importing",
                            entry.state
                        ),
                    });
                }
                if *size_bytes == 0 {
                    return Err(Rejection::invalid(
                        "size_bytes",
                        "an image version cannot be empty",
                    ));
                }
                vec![E::ImageVersionReady {
                    image: image.clone(),
                    version: *version,
                    manifest: *manifest,
                    size_bytes: *size_bytes,
                }]
            }
            Command::RetireImageVersion { image, version } => {
                let entry = self.version(image, *version)?;
                if entry.state == VersionState::Retired {
                    return Err(Rejection::Unchanged {
                        what: format!("image {image} version {version} is already retired"),
                    });
                }
                if let Some(session) = self
                    .boot_sessions
                    .values()
                    .find(|s| &s.image == image && s.version == *version)
                {
                    return Err(Rejection::InUse {
                        kind: EntityKind::Image,
                        name: format!("{image} version {version}"),
                        reason: format!("booted by client {}", session.mac),
                    });
                }
                vec![E::ImageVersionRetired {
                    image: image.clone(),
                    version: *version,
                }]
            }
            Command::AddClient { mac, name, group } => {
                if self.clients.contains_key(mac) {
                    return Err(Rejection::AlreadyExists {
                        kind: EntityKind::Client,
                        name: mac.to_string(),
                    });
                }
                if let Some(other) = self.clients.values().find(|c| &c.name == name) {
                    return Err(Rejection::AlreadyExists {
                        kind: EntityKind::Client,
                        name: format!("{name} ({})", other.mac),
                    });
                }
                if let Some(group) = group {
                    self.group(group)?;
                }
                vec![E::ClientAdded {
                    mac: *mac,
                    name: name.clone(),
                    group: group.clone(),
                }]
            }
            Command::UpdateClient { mac, name, group } => {
                let client = self.client(mac)?;
                if let Some(name) = name {
                    if let Some(other) = self
                        .clients
                        .values()
                        .find(|c| &c.name == name && c.mac != *mac)
                    {
                        return Err(Rejection::AlreadyExists {
                            kind: EntityKind::Client,
                            name: format!("{name} ({})", other.mac),
                        });
                    }
                }
                if let Some(Some(group)) = group {
                    self.group(group)?;
                }
                vec![E::ClientUpdated {
                    mac: *mac,
                    name: name.clone().unwrap_or_else(|| client.name.clone()),
                    group: group.clone().unwrap_or_else(|| client.group.clone()),
                }]
            }
            Command::RemoveClient { mac } => {
                self.client(mac)?;
                let mut events = vec![];
                if let Some(lease) = self.leases.values().find(|l| l.mac == *mac) {
                    events.push(E::LeaseReleased {
                        ip: lease.ip,
                        mac: *mac,
                    });
                }
                events.push(E::ClientRemoved { mac: *mac });
                events
            }
            Command::RecordDiscovered { mac, node_id } => {
                if self.clients.contains_key(mac) {
                    return Err(Rejection::AlreadyExists {
                        kind: EntityKind::Client,
                        name: mac.to_string(),
                    });
                }
                if self.discovered.contains_key(mac) {
                    return Err(Rejection::Unchanged {
                        what: format!("client {mac} is already discovered"),
                    });
                }
                vec![E::ClientDiscovered {
                    mac: *mac,
                    node_id: *node_id,
                }]
            }
            Command::AddUser {
                name,
                password_hash,
            } => {
                check_password_hash(password_hash)?;
                if self.users.contains_key(name) {
                    return Err(Rejection::AlreadyExists {
                        kind: EntityKind::User,
                        name: name.to_string(),
                    });
                }
                vec![E::UserAdded {
                    name: name.clone(),
                    password_hash: password_hash.clone(),
                }]
            }
            Command::SetUserPassword {
                name,
                password_hash,
            } => {
                check_password_hash(password_hash)?;
                self.user(name)?;
                vec![E::UserPasswordSet {
                    name: name.clone(),
                    password_hash: password_hash.clone(),
                }]
            }
            Command::RemoveUser { name } => {
                self.user(name)?;
                if let Some(session) = self
                    .boot_sessions
                    .values()
                    .find(|s| s.user.as_ref() == Some(name))
                {
                    return Err(Rejection::InUse {
                        kind: EntityKind::User,
                        name: name.to_string(),
                        reason: format!("booted client {}", session.mac),
                    });
                }
                vec![E::UserRemoved { name: name.clone() }]
            }
            Command::AddGroup { name, description } => {
                check_text("description", description, DESCRIPTION_BYTES_MAX)?;
                if self.groups.contains_key(name) {
                    return Err(Rejection::AlreadyExists {
                        kind: EntityKind::Group,
                        name: name.to_string(),
                    });
                }
                vec![E::GroupAdded {
                    name: name.clone(),
                    description: description.clone(),
                }]
            }
            Command::RemoveGroup { name } => {
                self.group(name)?;
                if let Some(client) = self
                    .clients
                    .values()
                    .find(|c| c.group.as_ref() == Some(name))
                {
                    return Err(Rejection::InUse {
                        kind: EntityKind::Group,
                        name: name.to_string(),
                        reason: format!("client {} ({}) is a member", client.name, client.mac),
                    });
                }
                vec![E::GroupRemoved { name: name.clone() }]
            }
            Command::CreateToken { name, digest } => {
                if self.tokens.contains_key(name) {
                    return Err(Rejection::AlreadyExists {
                        kind: EntityKind::Token,
                        name: name.to_string(),
                    });
                }
                if self.tokens.values().any(|t| t.digest == *digest) {
                    return Err(Rejection::invalid("token", "this secret is already in use"));
                }
                vec![E::TokenCreated {
                    name: name.clone(),
                    digest: *digest,
                }]
            }
            Command::RevokeToken { name } => {
                if !self.tokens.contains_key(name) {
                    return Err(Rejection::NotFound {
                        kind: EntityKind::Token,
                        name: name.to_string(),
                    });
                }
                if self.tokens.len() == 1 {
                    return Err(Rejection::Conflict {
                        reason: format!("token {name} is the last admin token"),
                    });
                }
                vec![E::TokenRevoked { name: name.clone() }]
            }
            Command::CreateJoinToken { digest, expires_ms } => {
                if *expires_ms <= now {
                    return Err(Rejection::invalid(
                        "expires_ms",
                        "a join token must expire in the future",
                    ));
                }
                if self.join_tokens.contains_key(digest) {
                    return Err(Rejection::AlreadyExists {
                        kind: EntityKind::JoinToken,
                        name: digest.to_hex(),
                    });
                }
                vec![E::JoinTokenCreated {
                    digest: *digest,
                    expires_ms: *expires_ms,
                }]
            }
            Command::ConsumeJoinToken { digest, node_id } => {
                let token = self
                    .join_tokens
                    .get(digest)
                    .ok_or_else(|| Rejection::NotFound {
                        kind: EntityKind::JoinToken,
                        name: "(given token)".into(),
                    })?;
                if let Some(used_by) = token.used_by {
                    return Err(Rejection::Conflict {
                        reason: format!("join token was already used by node {used_by}"),
                    });
                }
                if token.expires_ms <= now {
                    return Err(Rejection::Conflict {
                        reason: "join token has expired".into(),
                    });
                }
                if self.nodes.contains_key(node_id) {
                    return Err(Rejection::AlreadyExists {
                        kind: EntityKind::Node,
                        name: node_id.to_string(),
                    });
                }
                vec![E::JoinTokenConsumed {
                    digest: *digest,
                    node_id: *node_id,
                }]
            }
            Command::Assign {
                target,
                image,
                mode,
                default,
                position,
            } => {
                self.target(target)?;
                self.image(image)?;
                let list = self.assignments.get(target);
                let count =
                    list.map_or(0, |l| l.images.iter().filter(|a| &a.image != image).count());
                if count >= ASSIGNMENTS_PER_TARGET_MAX {
                    return Err(Rejection::Conflict {
                        reason: format!(
                            "{target} already has {ASSIGNMENTS_PER_TARGET_MAX} images assigned"
                        ),
                    });
                }
                let position = position.map_or(count as u32, |p| p.min(count as u32));
                vec![E::Assigned {
                    target: target.clone(),
                    image: image.clone(),
                    mode: *mode,
                    default: *default,
                    position,
                }]
            }
            Command::Unassign { target, image } => {
                let assigned = self
                    .assignments
                    .get(target)
                    .is_some_and(|l| l.images.iter().any(|a| &a.image == image));
                if !assigned {
                    return Err(Rejection::NotFound {
                        kind: EntityKind::Assignment,
                        name: format!("{image} to {target}"),
                    });
                }
                vec![E::Unassigned {
                    target: target.clone(),
                    image: image.clone(),
                }]
            }
            Command::BeginBoot { mac, image, user } => {
                self.client(mac)?;
                let images = match user {
                    Some(user) => {
                        self.user(user)?;
                        self.user_images(user)
                    }
                    None => self.client_images(mac),
                };
                let assignment = images
                    .images
                    .iter()
                    .find(|a| &a.image == image)
                    .ok_or_else(|| Rejection::NotFound {
                        kind: EntityKind::Assignment,
                        name: match user {
                            Some(user) => format!("{image} to user {user}"),
                            None => format!("{image} to client {mac}"),
                        },
                    })?;
                let version =
                    self.image(image)?
                        .current_version()
                        .ok_or_else(|| Rejection::Conflict {
                            reason: format!("image {image} has no ready version"),
                        })?;
                let (primary, standby) = self.place_boot(mac, image, assignment.mode)?;
                let generation = self.generations.get(mac).copied().unwrap_or(0) + 1;
                vec![E::BootStarted {
                    mac: *mac,
                    image: image.clone(),
                    version: version.version,
                    mode: assignment.mode,
                    user: user.clone(),
                    primary,
                    standby,
                    generation,
                }]
            }
            Command::CommitLeases { leases } => self.decide_leases(leases, now)?,
            Command::DropStandby { mac, generation } => {
                self.decide_drop_standby(mac, *generation)?
            }
            Command::FailOver { mac, generation } => self.decide_fail_over(mac, *generation)?,
            Command::AssignStandby { mac, generation } => {
                self.decide_assign_standby(mac, *generation)?
            }
            Command::MarkStandbyInSync {
                mac,
                generation,
                standby,
            } => self.decide_standby_in_sync(mac, *generation, *standby)?,
            Command::ReleaseLease { mac } => {
                let lease = self
                    .leases
                    .values()
                    .find(|l| l.mac == *mac)
                    .ok_or_else(|| Rejection::NotFound {
                        kind: EntityKind::Lease,
                        name: mac.to_string(),
                    })?;
                vec![E::LeaseReleased {
                    ip: lease.ip,
                    mac: *mac,
                }]
            }
        };
        Ok(events)
    }

    /// All leases of one batch are granted or none: an address held by another MAC whose lease
    /// has not expired refuses the whole batch, so the DHCP server never ACKs a double lease.
    fn decide_leases(
        &self,
        leases: &[LeaseRequest],
        now: TimeMs,
    ) -> Result<Vec<EventPayload>, Rejection> {
        if leases.is_empty() || leases.len() > LEASES_PER_COMMAND_MAX {
            return Err(Rejection::invalid(
                "leases",
                format!(
                    "{} leases; a batch holds 1 to {LEASES_PER_COMMAND_MAX}",
                    leases.len()
                ),
            ));
        }
        let mut batch_ips: BTreeMap<Ipv4Addr, Mac> = BTreeMap::new();
        let mut batch_macs: BTreeMap<Mac, Ipv4Addr> = BTreeMap::new();
        for lease in leases {
            if lease.expires_ms <= now {
                return Err(Rejection::invalid(
                    "expires_ms",
                    format!("lease of {} for {} is already expired", lease.ip, lease.mac),
                ));
            }
            if let Some(holder) = self.leases.get(&lease.ip) {
                if holder.mac != lease.mac && holder.expires_ms > now {
                    return Err(Rejection::Conflict {
                        reason: format!("address {} is leased to {}", lease.ip, holder.mac),
                    });
                }
            }
            if batch_ips
                .insert(lease.ip, lease.mac)
                .is_some_and(|other| other != lease.mac)
                || batch_macs
                    .insert(lease.mac, lease.ip)
                    .is_some_and(|other| other != lease.ip)
            {
                return Err(Rejection::Conflict {
                    reason: format!("batch leases {} or {} twice", lease.ip, lease.mac),
                });
            }
        }
        Ok(leases
            .iter()
            .map(|l| EventPayload::LeaseGranted {
                ip: l.ip,
                mac: l.mac,
                expires_ms: l.expires_ms,
            })
            .collect())
    }

    fn node(&self, id: NodeId) -> Result<&StorageNode, Rejection> {
        self.nodes.get(&id).ok_or_else(|| Rejection::NotFound {
            kind: EntityKind::Node,
            name: id.to_string(),
        })
    }
    fn image(&self, name: &Name) -> Result<&Image, Rejection> {
        self.images.get(name).ok_or_else(|| Rejection::NotFound {
            kind: EntityKind::Image,
            name: name.to_string(),
        })
    }
    fn version(&self, image: &Name, version: u32) -> Result<&ImageVersion, Rejection> {
        self.image(image)?
            .versions
            .get(&version)
            .ok_or_else(|| Rejection::NotFound {
                kind: EntityKind::ImageVersion,
                name: format!("{image} version {version}"),
            })
    }
    fn client(&self, mac: &Mac) -> Result<&Client, Rejection> {
        self.clients.get(mac).ok_or_else(|| Rejection::NotFound {
            kind: EntityKind::Client,
            name: mac.to_string(),
        })
    }
    fn user(&self, name: &Name) -> Result<&User, Rejection> {
        self.users.get(name).ok_or_else(|| Rejection::NotFound {
            kind: EntityKind::User,
            name: name.to_string(),
        })
    }
    fn group(&self, name: &Name) -> Result<&Group, Rejection> {
        self.groups.get(name).ok_or_else(|| Rejection::NotFound {
            kind: EntityKind::Group,
            name: name.to_string(),
        })
    }
    fn target(&self, target: &AssignmentTarget) -> Result<(), Rejection> {
        match target {
            AssignmentTarget::Client(mac) => self.client(mac).map(|_| ()),
            AssignmentTarget::Group(name) => self.group(name).map(|_| ()),
            AssignmentTarget::User(name) => self.user(name).map(|_| ()),
        }
    }
}

fn check_text(field: &str, value: &str, bytes_max: usize) -> Result<(), Rejection> {
    if value.len() > bytes_max {
        return Err(Rejection::invalid(
            field,
            format!("{} bytes; at most {bytes_max}", value.len()),
        ));
    }
    if value.chars().any(|c| c.is_control()) {
        return Err(Rejection::invalid(
            field,
            "control characters are not allowed",
        ));
    }
    Ok(())
}

fn check_password_hash(password_hash: &Option<String>) -> Result<(), Rejection> {
    match password_hash {
        Some(hash) if !hash.starts_with('$') || hash.len() > 256 => Err(Rejection::invalid(
            "password_hash",
            "expected a PHC string such as $argon2id$...",
        )),
        _ => Ok(()),
    }
}
