//! The openraft type configuration shared by the stores, the network and the node.

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::domain::{Outcome, Proposal};

/// Where a cluster member can be reached: its Raft (QUIC) endpoint and its admin API base URL.
/// This is the openraft `Node` type, so it is replicated with the membership.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddress {
    /// QUIC address of the Raft endpoint, `ip:port`.
    pub raft: String,
    /// Admin API base URL (opaque to this crate).
    pub api: String,
}

impl NodeAddress {
    pub fn new(raft: std::net::SocketAddr, api: impl Into<String>) -> NodeAddress {
        NodeAddress {
            raft: raft.to_string(),
            api: api.into(),
        }
    }
}

impl fmt::Display for NodeAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "raft={} api={}", self.raft, self.api)
    }
}

openraft::declare_raft_types!(
    /// Cairn's Raft types: a log entry carries one `Proposal`, its response is an `Outcome`.
    /// Snapshots are byte streams (see `store::snapshot` for their format).
    pub TypeConfig:
        D = Proposal,
        R = Outcome,
        NodeId = u64,
        Node = NodeAddress,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<u64>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StoredMembership = openraft::StoredMembership<u64, NodeAddress>;
pub type SnapshotMeta = openraft::SnapshotMeta<u64, NodeAddress>;
pub type Snapshot = openraft::storage::Snapshot<TypeConfig>;
pub type StorageError = openraft::StorageError<u64>;
pub type Vote = openraft::Vote<u64>;
pub type RaftMetrics = openraft::RaftMetrics<u64, NodeAddress>;
