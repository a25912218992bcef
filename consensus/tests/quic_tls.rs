//! Proves node-to-node mutual TLS over real quinn sockets on 127.0.0.1: a peer with a certificate
//! from the cluster CA is served; a peer with a foreign CA's certificate, a peer claiming another
//! node id than its certificate names, and a server answering for the wrong node id are refused.

use std::sync::Arc;
use std::time::Duration;

use cairn_consensus::domain::NodeId;
use cairn_consensus::quic::{bind_endpoint, serve, QuicTransport};
use cairn_consensus::rpc::{RpcHandler, RpcRequest, RpcResponse, Transport, TransportError};
use cairn_consensus::tls::ClusterCa;
use cairn_consensus::NodeAddress;

/// Answers every request with the node id the server authenticated.
struct WhoAmI;

impl RpcHandler for WhoAmI {
    async fn handle(&self, from: NodeId, _request: RpcRequest) -> RpcResponse {
        RpcResponse::ReadIndex(Ok(from))
    }
}

const TIMEOUT: Duration = Duration::from_secs(5);

fn local() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[tokio::test]
async fn mutual_tls_accepts_members_and_refuses_strangers() {
    let ca = ClusterCa::generate().unwrap();
    let foreign_ca = ClusterCa::generate().unwrap();
    let server_endpoint = bind_endpoint(&ca.issue_node_certificate(1).unwrap(), local()).unwrap();
    let server_address = NodeAddress::new(server_endpoint.local_addr().unwrap(), "");
    let streams = Arc::new(cairn_consensus::streams::StreamHandler::default());
    let server = serve(server_endpoint.clone(), Arc::new(WhoAmI), streams);

    // A member of the cluster is served, and the server knows who it is.
    let member = QuicTransport::new(
        2,
        bind_endpoint(&ca.issue_node_certificate(2).unwrap(), local()).unwrap(),
    );
    let response = member
        .call(1, &server_address, RpcRequest::ReadIndex, TIMEOUT)
        .await
        .unwrap();
    assert!(
        matches!(response, RpcResponse::ReadIndex(Ok(2))),
        "{response:?}"
    );

    // A certificate from another CA fails the handshake.
    let stranger = QuicTransport::new(
        2,
        bind_endpoint(&foreign_ca.issue_node_certificate(2).unwrap(), local()).unwrap(),
    );
    let error = stranger
        .call(1, &server_address, RpcRequest::ReadIndex, TIMEOUT)
        .await
        .unwrap_err();
    assert!(
        matches!(error, TransportError::Unreachable { .. }),
        "{error:?}"
    );

    // A member claiming another node id than its certificate names is refused.
    let impostor = QuicTransport::new(
        5,
        bind_endpoint(&ca.issue_node_certificate(2).unwrap(), local()).unwrap(),
    );
    let error = impostor
        .call(1, &server_address, RpcRequest::ReadIndex, TIMEOUT)
        .await
        .unwrap_err();
    assert!(matches!(error, TransportError::Refused { .. }), "{error:?}");

    // Dialling node 3 at node 1's address fails: the server's certificate names node 1.
    let error = member
        .call(3, &server_address, RpcRequest::ReadIndex, TIMEOUT)
        .await
        .unwrap_err();
    assert!(
        matches!(error, TransportError::Unreachable { .. }),
        "{error:?}"
    );

    // And a client that trusts another CA refuses our server.
    let error = stranger
        .call(1, &server_address, RpcRequest::ReadIndex, TIMEOUT)
        .await
        .unwrap_err();
    assert!(
        matches!(error, TransportError::Unreachable { .. }),
        "{error:?}"
    );

    server_endpoint.close(0u32.into(), b"done");
    server.abort();
}
