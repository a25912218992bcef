//! cairn-consensus: the replicated, event-sourced state of a Cairn cluster.
//!
//! openraft 0.9 with a RocksDB log store and state machine, node-to-node RPC over QUIC with mutual
//! TLS from a cluster CA, and `ClusterNode`, which the `cairn` binary drives. The domain model
//! (`domain`) is pure: commands are validated against the state and become events; the state is a
//! fold over the events.
//!
//! Code map:
//! - `domain`, `codec`: the pure model and the one binary encoding (integrator's).
//! - `types`: the openraft type configuration (`TypeConfig`: entries carry a `ProposalBatch`,
//!   responses are one `Outcome` per proposal, nodes are `NodeAddress`es, snapshots are byte
//!   streams) and `Raft`, openraft's handle with its proposal batcher.
//! - `proposer`: the leader's batcher; proposals arriving while earlier entries are in flight
//!   share one entry (and its fsyncs). On RocksDB (`ClusterNode`) the next entry is cut when the
//!   leader's log has flushed the previous one (the store's flush hook).
//! - `store`: `StateMachineCore` (the apply step) and the snapshot format, shared by
//!   `store::rocks` (RocksDB, one group-committing writer thread) and `store::mem` (simulation).
//! - `rpc`: request/response messages, the `Transport` (client) and `RpcHandler` (server) traits.
//! - `network`: openraft's `RaftNetworkFactory` over any `Transport`.
//! - `prevote`: the campaign guard that replaces openraft's election timer: a member asks the
//!   voters first and campaigns only if a majority has no leader either (openraft 0.9 has no
//!   pre-vote), so a cut-off or restarted member never deposes a healthy leader.
//! - `tls`, `quic`: the cluster CA, node certificates, and the QUIC `Transport` and server.
//! - `service`: `RaftService`, writes/reads/membership through the leader over any state machine
//!   and transport, with an injected clock (what the simulation runs).
//! - `raft_node`: `ClusterNode` = `RaftService` on RocksDB and QUIC.
//! - `metrics`: every metric name.
//!
//! Invariants:
//! - The event history is the durable truth and is never lost: snapshots carry all of it, so
//!   purging the Raft log keeps it, and nodes that join late receive it.
//! - A failed write of the log or state machine stops the node; it never continues.
//! - A peer is accepted only with a certificate from the cluster CA naming the node id it claims.
//! - Only the leader stamps a proposal's time; followers forward writes to it. A forwarded write
//!   whose outcome is unknown is reported as such (`ProposeError::Unavailable`), never retried.
//!
//! Not done here: the admin API, tokens and authorization (the `node` crate), idempotent
//! proposals (no request ids), and any clock or network in the domain.
// openraft's own error types (StorageError, RPCError) are large; boxing them would fight its API.
#![allow(clippy::result_large_err)]

pub mod codec;
pub mod domain;
pub mod metrics;
pub mod network;
pub mod prevote;
pub mod proposer;
pub mod quic;
pub mod raft_node;
pub mod rpc;
pub mod service;
pub mod store;
pub mod streams;
pub mod tls;
pub mod types;

pub use raft_node::{ClusterNode, NodeConfig, RaftTuning, StartError};
pub use service::{MembershipError, ProposeError, ReadError};
pub use tls::{ClusterCa, NodeIdentity};
pub use types::NodeAddress;
