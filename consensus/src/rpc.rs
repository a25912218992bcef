//! Node-to-node RPC messages and the transport boundary.
//!
//! One request, one response, each a length-prefixed `codec` frame. The Raft RPCs are openraft's
//! own messages; the application RPCs forward a write to the leader and ask the leader for a read
//! index. `Transport` is the client side and `RpcHandler` the server side; the QUIC implementation
//! is in `quic`, and the simulation can plug in its own transport and call handlers directly.

use std::future::Future;
use std::time::Duration;

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use crate::codec;
use crate::domain::{Command, Event, Name, NodeId, Rejection};
use crate::types::{NodeAddress, TypeConfig};

/// Upper bound on one RPC frame. Append-entries batches and snapshot chunks stay far below it.
pub const FRAME_BYTES_MAX: usize = 64 * 1024 * 1024;

/// A request as sent: who sends it (the server checks this against the peer's certificate).
#[derive(Debug, Serialize, Deserialize)]
pub struct RequestEnvelope {
    pub from: NodeId,
    pub request: RpcRequest,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum RpcRequest {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<u64>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// A follower forwards a write; the leader stamps the time and proposes it.
    ForwardProposal {
        actor: Name,
        command: Command,
    },
    /// The leader confirms its leadership and returns the log index a linearizable read must wait
    /// for.
    ReadIndex,
    /// A member forwards a membership change to the leader.
    ChangeMembership(crate::service::MembershipChange),
    /// A member asks whether this voter would elect anyone now (`prevote`).
    PreVote(crate::prevote::PreVoteRequest),
}

#[derive(Debug, Serialize, Deserialize)]
pub enum RpcResponse {
    AppendEntries(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    InstallSnapshot(Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>),
    Proposal(Result<Vec<Event>, ForwardError>),
    ReadIndex(Result<u64, ForwardError>),
    Membership(Result<(), ForwardError>),
    /// Granted or not (`prevote::answer`).
    PreVote(bool),
    /// The server refused the request (wrong claimed node id, undecodable request).
    Refused(String),
}

/// Why the leader could not serve a forwarded request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, thiserror::Error)]
pub enum ForwardError {
    #[error("rejected: {0}")]
    Rejected(Rejection),
    #[error("node is not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<NodeId> },
    #[error("no leader elected within {waited_ms} ms")]
    NoLeader { waited_ms: u64 },
    #[error("membership change refused: {0}")]
    Membership(String),
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("node stopped: {0}")]
    Stopped(String),
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("peer {node_id} at {address} unreachable: {reason}")]
    Unreachable {
        node_id: NodeId,
        address: String,
        reason: String,
    },
    #[error("rpc to peer {node_id} failed: {reason}")]
    Failed { node_id: NodeId, reason: String },
    #[error("rpc to peer {node_id} timed out after {timeout:?}")]
    Timeout { node_id: NodeId, timeout: Duration },
    #[error("peer {node_id} refused the request: {reason}")]
    Refused { node_id: NodeId, reason: String },
    #[error("bad frame: {0}")]
    Frame(String),
}

/// The client side of node-to-node RPC.
pub trait Transport: Clone + Send + Sync + 'static {
    /// Sends `request` to node `target` at `address` and waits at most `timeout` for its answer.
    fn call(
        &self,
        target: NodeId,
        address: &NodeAddress,
        request: RpcRequest,
        timeout: Duration,
    ) -> impl Future<Output = Result<RpcResponse, TransportError>> + Send;
}

/// The server side: what a node does with a request from peer `from` (already authenticated).
pub trait RpcHandler: Send + Sync + 'static {
    fn handle(&self, from: NodeId, request: RpcRequest)
        -> impl Future<Output = RpcResponse> + Send;
}

/// Encodes one frame: `u32` big-endian length, then the body.
pub fn encode_frame<T: Serialize>(value: &T) -> Result<Vec<u8>, TransportError> {
    let body = codec::encode(value).map_err(|e| TransportError::Frame(e.to_string()))?;
    if body.len() > FRAME_BYTES_MAX {
        return Err(TransportError::Frame(format!(
            "frame of {} bytes exceeds {FRAME_BYTES_MAX}",
            body.len()
        )));
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Checks a frame length prefix against the bound.
pub fn frame_length(prefix: [u8; 4]) -> Result<usize, TransportError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > FRAME_BYTES_MAX {
        return Err(TransportError::Frame(format!(
            "frame of {len} bytes exceeds {FRAME_BYTES_MAX}"
        )));
    }
    Ok(len)
}

pub fn decode_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, TransportError> {
    codec::decode(body).map_err(|e| TransportError::Frame(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn request_decode_never_panics(bytes: Vec<u8>) {
            let _ = decode_body::<RequestEnvelope>(&bytes);
            let _ = decode_body::<RpcResponse>(&bytes);
        }
    }

    #[test]
    fn raft_messages_round_trip() {
        let request = RequestEnvelope {
            from: 3,
            request: RpcRequest::Vote(VoteRequest::new(openraft::Vote::new(2, 3), None)),
        };
        let frame = encode_frame(&request).unwrap();
        let len = frame_length(frame[..4].try_into().unwrap()).unwrap();
        let back: RequestEnvelope = decode_body(&frame[4..4 + len]).unwrap();
        assert_eq!(back.from, 3);
        assert!(matches!(back.request, RpcRequest::Vote(v) if v.vote == openraft::Vote::new(2, 3)));
        let error: RpcResponse =
            RpcResponse::AppendEntries(Err(RaftError::Fatal(openraft::error::Fatal::Stopped)));
        let back: RpcResponse = decode_body(&encode_frame(&error).unwrap()[4..]).unwrap();
        assert!(matches!(
            back,
            RpcResponse::AppendEntries(Err(RaftError::Fatal(_)))
        ));
    }
}
