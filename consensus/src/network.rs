//! openraft's `RaftNetworkFactory` / `RaftNetwork` over any `Transport`.
//!
//! Generic over the transport so the simulation runs the real Raft over a simulated network. Each
//! RPC gets openraft's own deadline (`RPCOption::hard_ttl`); snapshots go through openraft's
//! chunked sender, one `InstallSnapshot` RPC per chunk, each with its own deadline, so a large
//! snapshot never has to fit in one timeout.

use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

use crate::domain::NodeId;
use crate::rpc::{RpcRequest, RpcResponse, Transport, TransportError};
use crate::types::{NodeAddress, TypeConfig};

/// Creates one `PeerClient` per replication target.
#[derive(Clone)]
pub struct NetworkFactory<T: Transport> {
    pub node_id: NodeId,
    pub transport: T,
}

impl<T: Transport> NetworkFactory<T> {
    pub fn new(node_id: NodeId, transport: T) -> NetworkFactory<T> {
        NetworkFactory { node_id, transport }
    }
}

impl<T: Transport> RaftNetworkFactory<TypeConfig> for NetworkFactory<T> {
    type Network = PeerClient<T>;

    async fn new_client(&mut self, target: NodeId, node: &NodeAddress) -> Self::Network {
        PeerClient {
            node_id: self.node_id,
            target,
            address: node.clone(),
            transport: self.transport.clone(),
        }
    }
}

/// The Raft RPC client for one peer.
pub struct PeerClient<T: Transport> {
    node_id: NodeId,
    target: NodeId,
    address: NodeAddress,
    transport: T,
}

type RpcResult<R, E> = Result<R, RPCError<u64, NodeAddress, RaftError<u64, E>>>;

impl<T: Transport> PeerClient<T> {
    async fn call<E: std::error::Error>(
        &self,
        action: RPCTypes,
        request: RpcRequest,
        timeout: Duration,
    ) -> Result<RpcResponse, RPCError<u64, NodeAddress, RaftError<u64, E>>> {
        match self
            .transport
            .call(self.target, &self.address, request, timeout)
            .await
        {
            Ok(response) => Ok(response),
            Err(TransportError::Timeout { .. }) => Err(RPCError::Timeout(Timeout {
                action,
                id: self.node_id,
                target: self.target,
                timeout,
            })),
            Err(error @ TransportError::Unreachable { .. }) => {
                Err(RPCError::Unreachable(Unreachable::new(&error)))
            }
            Err(error) => Err(RPCError::Network(NetworkError::new(&error))),
        }
    }

    fn unexpected<E: std::error::Error>(
        &self,
        response: RpcResponse,
    ) -> RPCError<u64, NodeAddress, RaftError<u64, E>> {
        let error = TransportError::Failed {
            node_id: self.target,
            reason: format!("unexpected response {response:?}"),
        };
        RPCError::Network(NetworkError::new(&error))
    }

    fn remote<R, E: std::error::Error>(
        &self,
        result: Result<R, RaftError<u64, E>>,
    ) -> RpcResult<R, E> {
        result.map_err(|error| {
            RPCError::RemoteError(RemoteError::new_with_node(
                self.target,
                self.address.clone(),
                error,
            ))
        })
    }
}

/// How long openraft's replication to a peer waits after an `Unreachable` error (no connection
/// could be made, nothing sent) before it tries again. openraft's default is 500 ms; a node that
/// restarts campaigns after 600-800 ms without a heartbeat (`RaftTuning`), so with 500 ms it could
/// miss the first heartbeats of a leader that tried it while it was down, and depose that leader
/// (openraft 0.9 has no pre-vote). A dial every 100 ms to a dead peer costs one small packet.
pub const UNREACHABLE_BACKOFF: Duration = Duration::from_millis(100);

impl<T: Transport> RaftNetwork<TypeConfig> for PeerClient<T> {
    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(std::iter::repeat(UNREACHABLE_BACKOFF))
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<u64>, openraft::error::Infallible> {
        // Only timed (for the metric) when it carries entries: heartbeats would drown them.
        let started = (!rpc.entries.is_empty()).then(std::time::Instant::now);
        let response = self
            .call(
                RPCTypes::AppendEntries,
                RpcRequest::AppendEntries(rpc),
                option.hard_ttl(),
            )
            .await?;
        if let Some(started) = started {
            crate::metrics::append_entries_sent(started.elapsed().as_secs_f64());
        }
        match response {
            RpcResponse::AppendEntries(result) => self.remote(result),
            other => Err(self.unexpected(other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<u64>, InstallSnapshotError> {
        match self
            .call(
                RPCTypes::InstallSnapshot,
                RpcRequest::InstallSnapshot(rpc),
                option.hard_ttl(),
            )
            .await?
        {
            RpcResponse::InstallSnapshot(result) => self.remote(result),
            other => Err(self.unexpected(other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<u64>, openraft::error::Infallible> {
        match self
            .call(RPCTypes::Vote, RpcRequest::Vote(rpc), option.hard_ttl())
            .await?
        {
            RpcResponse::Vote(result) => self.remote(result),
            other => Err(self.unexpected(other)),
        }
    }
}
