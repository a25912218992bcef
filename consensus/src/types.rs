//! The openraft type configuration shared by the stores, the network and the node.

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::domain::{Outcome, Proposal};
use crate::proposer::Proposer;

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

/// What one Raft log entry carries: the proposals the leader gathered while earlier entries were
/// in flight (`proposer`), in the order they are executed. Each is executed on its own: a rejected
/// proposal writes nothing and does not affect the others, and every event keeps its own dense
/// sequence number, so the history is exactly what one entry per proposal would have written.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProposalBatch {
    pub proposals: Vec<Proposal>,
}

/// The response to one entry: one `Outcome` per proposal of its batch, in order (none for blank
/// and membership entries).
pub type BatchOutcome = Vec<Outcome>;

openraft::declare_raft_types!(
    /// Cairn's Raft types: a log entry carries a `ProposalBatch`, its response is one `Outcome`
    /// per proposal. Snapshots are byte streams (see `store::snapshot` for their format).
    pub TypeConfig:
        D = ProposalBatch,
        R = BatchOutcome,
        NodeId = u64,
        Node = NodeAddress,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// openraft's handle plus this Raft instance's proposal batcher (`proposer::Proposer`), which
/// `service::RaftService` writes through. Dereferences to `openraft::Raft`, so every openraft
/// method is there; `Raft::new` takes openraft's arguments. Clones share the batcher.
#[derive(Clone)]
pub struct Raft {
    raft: openraft::Raft<TypeConfig>,
    proposer: std::sync::Arc<Proposer>,
    contact: std::sync::Arc<crate::prevote::LeaderContact>,
}

impl Raft {
    /// Starts openraft (see `openraft::Raft::new`) with an empty proposal queue.
    pub async fn new<N, LS, SM>(
        id: u64,
        config: std::sync::Arc<openraft::Config>,
        network: N,
        log_store: LS,
        state_machine: SM,
    ) -> Result<Raft, openraft::error::Fatal<u64>>
    where
        N: openraft::RaftNetworkFactory<TypeConfig>,
        LS: openraft::storage::RaftLogStorage<TypeConfig>,
        SM: openraft::storage::RaftStateMachine<TypeConfig>,
    {
        let raft = openraft::Raft::new(id, config, network, log_store, state_machine).await?;
        Ok(Raft {
            raft,
            proposer: std::sync::Arc::new(Proposer::default()),
            contact: std::sync::Arc::new(crate::prevote::LeaderContact::new()),
        })
    }

    /// The leader's proposal batcher of this Raft instance.
    pub fn proposer(&self) -> &std::sync::Arc<Proposer> {
        &self.proposer
    }

    /// When this member last heard from a leader (`prevote`).
    pub fn contact(&self) -> &crate::prevote::LeaderContact {
        &self.contact
    }

    /// openraft's own handle.
    pub fn openraft(&self) -> &openraft::Raft<TypeConfig> {
        &self.raft
    }
}

impl std::ops::Deref for Raft {
    type Target = openraft::Raft<TypeConfig>;

    fn deref(&self) -> &openraft::Raft<TypeConfig> {
        &self.raft
    }
}

pub type LogId = openraft::LogId<u64>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StoredMembership = openraft::StoredMembership<u64, NodeAddress>;
pub type SnapshotMeta = openraft::SnapshotMeta<u64, NodeAddress>;
pub type Snapshot = openraft::storage::Snapshot<TypeConfig>;
pub type StorageError = openraft::StorageError<u64>;
pub type Vote = openraft::Vote<u64>;
pub type RaftMetrics = openraft::RaftMetrics<u64, NodeAddress>;
