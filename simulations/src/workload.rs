//! The client workload: random admin commands over small name pools, so that commands build on
//! each other (a client joins an existing group, a boot finds an assigned image) and some are
//! rejected (duplicates, missing references), as with real administrators.

use std::net::Ipv4Addr;

use cairn_consensus::domain::{
    AssignmentTarget, Command, DiskMode, Hash32, LeaseRequest, Mac, Name, NodeId,
};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::world::SIM_EPOCH_MS;

const GROUPS: u32 = 4;
const IMAGES: u32 = 4;
const MACS: u8 = 10;
const USERS: u32 = 3;

fn name(text: String) -> Name {
    // The pools only produce valid names (letters, digits and `-`).
    Name::new(text).unwrap_or_else(|_| unreachable!("pool names are valid"))
}

fn group(rng: &mut ChaCha8Rng) -> Name {
    name(format!("group-{}", rng.gen_range(0..GROUPS)))
}

fn image(rng: &mut ChaCha8Rng) -> Name {
    name(format!("image-{}", rng.gen_range(0..IMAGES)))
}

fn user(rng: &mut ChaCha8Rng) -> Name {
    name(format!("user-{}", rng.gen_range(0..USERS)))
}

fn mac(rng: &mut ChaCha8Rng) -> Mac {
    Mac([0x52, 0x54, 0x00, 0x00, 0x00, rng.gen_range(0..MACS)])
}

fn mode(rng: &mut ChaCha8Rng) -> DiskMode {
    if rng.gen_bool(0.5) {
        DiskMode::Persistent
    } else {
        DiskMode::NonPersistent
    }
}

/// Draws one admin command for a cluster of `node_count` nodes.
pub fn command(rng: &mut ChaCha8Rng, node_count: u64) -> Command {
    match rng.gen_range(0..100) {
        0..=7 => Command::AddGroup {
            name: group(rng),
            description: "simulated".into(),
        },
        8..=15 => Command::CreateImage {
            name: image(rng),
            description: "simulated".into(),
        },
        16..=22 => Command::BeginImageVersion { image: image(rng) },
        23..=30 => Command::CompleteImageVersion {
            image: image(rng),
            version: rng.gen_range(1..=3),
            manifest: Hash32(rng.gen()),
            size_bytes: rng.gen_range(1..=1 << 30),
        },
        31..=42 => Command::AddClient {
            mac: mac(rng),
            name: name(format!("pc-{}", rng.gen_range(0..MACS))),
            group: rng.gen_bool(0.5).then(|| group(rng)),
        },
        43..=45 => Command::RemoveClient { mac: mac(rng) },
        46..=48 => Command::UpdateClient {
            mac: mac(rng),
            name: None,
            group: Some(rng.gen_bool(0.7).then(|| group(rng))),
        },
        49..=58 => {
            let target = if rng.gen_bool(0.6) {
                AssignmentTarget::Client(mac(rng))
            } else {
                AssignmentTarget::Group(group(rng))
            };
            Command::Assign {
                target,
                image: image(rng),
                mode: mode(rng),
                default: rng.gen_bool(0.3),
                position: None,
            }
        }
        59..=61 => Command::Unassign {
            target: AssignmentTarget::Client(mac(rng)),
            image: image(rng),
        },
        62..=67 => {
            let node_id: NodeId = rng.gen_range(1..=node_count);
            Command::RegisterNode {
                node_id,
                name: name(format!("node-{node_id}")),
                raft_address: format!("10.0.0.{node_id}:7000"),
                api_address: format!("http://10.0.0.{node_id}:8080"),
                portal_address: format!("10.0.0.{node_id}:3260"),
                boot_address: format!("http://10.0.0.{node_id}:8081"),
                capacity_sessions: rng.gen_range(1..=50),
            }
        }
        68..=69 => Command::SetNodeHealth {
            node_id: rng.gen_range(1..=node_count),
            healthy: rng.gen_bool(0.7),
        },
        70..=71 => Command::SetNodeDraining {
            node_id: rng.gen_range(1..=node_count),
            draining: rng.gen_bool(0.3),
        },
        72..=81 => Command::BeginBoot {
            mac: mac(rng),
            image: image(rng),
            user: None,
        },
        82..=89 => {
            let count = rng.gen_range(1..=3);
            let leases = (0..count)
                .map(|_| LeaseRequest {
                    ip: Ipv4Addr::new(10, 0, 1, rng.gen_range(10..40)),
                    mac: mac(rng),
                    expires_ms: SIM_EPOCH_MS + rng.gen_range(0..600_000),
                })
                .collect();
            Command::CommitLeases { leases }
        }
        90..=92 => Command::ReleaseLease { mac: mac(rng) },
        93..=96 => Command::AddUser {
            name: user(rng),
            password_hash: None,
        },
        _ => Command::RemoveGroup { name: group(rng) },
    }
}
