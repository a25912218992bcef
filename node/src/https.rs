//! The admin API speaks HTTPS with the node's cluster certificate. Clients (the CLI, and nodes
//! forwarding to each other) trust only the cluster CA. Node certificates name the node
//! (`node-<id>.cairn`), not an address, so clients check the chain to the cluster CA and not the
//! host name: the CA signs cluster nodes only, so any certificate it signed is a cluster node.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use cairn_consensus::NodeIdentity;

/// Installs ring as the process's rustls provider (reqwest's `rustls-no-provider` needs one).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Serves `router` over TLS on `listener` until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    identity: &NodeIdentity,
    router: axum::Router,
) -> anyhow::Result<()> {
    let config = identity
        .server_config(false, &[b"http/1.1"])
        .map_err(|e| anyhow::anyhow!("tls: {e}"))?;
    let acceptor = TlsAcceptor::from(Arc::new(config));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "api accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(
                std::time::Duration::from_secs(10),
                acceptor.accept(stream),
            )
            .await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    tracing::debug!(%peer, %error, "api tls handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let service = hyper_util::service::TowerToHyperService::new(router);
            if let Err(error) = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service)
                .await
            {
                tracing::debug!(%peer, %error, "api connection ended with an error");
            }
        });
    }
}

/// An HTTPS client that trusts exactly the cluster CA in `ca_pem`.
pub fn client(ca_pem: &str) -> anyhow::Result<reqwest::Client> {
    install_crypto_provider();
    let ca = reqwest::Certificate::from_pem(ca_pem.as_bytes())?;
    Ok(reqwest::Client::builder()
        .tls_certs_only([ca])
        .tls_danger_accept_invalid_hostnames(true)
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(std::time::Duration::from_secs(60))
        .build()?)
}

/// An HTTPS client that accepts any certificate: only for fetching a cluster's CA certificate,
/// which the caller then checks against the fingerprint in its join token.
pub fn unverified_client() -> anyhow::Result<reqwest::Client> {
    install_crypto_provider();
    Ok(reqwest::Client::builder()
        .tls_danger_accept_invalid_certs(true)
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(std::time::Duration::from_secs(30))
        .build()?)
}

pub async fn bind(address: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {address}: {e}"))
}
