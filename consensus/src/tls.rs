//! The cluster CA and node certificates, and the rustls configurations built from them.
//!
//! `cairn cluster init` creates a `ClusterCa`; every node holds a certificate signed by it whose
//! subject alternative name is `node-<id>.cairn`. Both sides of a node-to-node connection present
//! a certificate (mutual TLS 1.3): the client checks the server's name against the node id it
//! dialled (SNI), the server reads the client's node id from its certificate. A certificate from
//! another CA fails the handshake. The CA's fingerprint (BLAKE3 of its DER) goes in join tokens.

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use crate::domain::NodeId;

/// ALPN protocol of node-to-node RPC.
pub const ALPN_RAFT: &[u8] = b"cairn-raft/1";
const NAME_PREFIX: &str = "node-";
const NAME_SUFFIX: &str = ".cairn";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot parse {what}: {reason}")]
    Parse { what: &'static str, reason: String },
    #[error("tls configuration failed: {0}")]
    Config(String),
    #[error("certificate names no node id (expected a dns name node-<id>.cairn)")]
    NoNodeId,
}

/// The server name (SNI and SAN) of node `node_id`.
pub fn node_server_name(node_id: NodeId) -> String {
    format!("{NAME_PREFIX}{node_id}{NAME_SUFFIX}")
}

/// Parses `node-<id>.cairn`.
pub fn parse_node_server_name(name: &str) -> Option<NodeId> {
    name.strip_prefix(NAME_PREFIX)?
        .strip_suffix(NAME_SUFFIX)?
        .parse()
        .ok()
}

/// The cluster certificate authority (its certificate and private key, PEM).
pub struct ClusterCa {
    certificate: rcgen::Certificate,
    key: KeyPair,
    cert_pem: String,
}

/// What a node needs to talk to its peers: its certificate and key, and the CA certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeIdentity {
    pub node_id: NodeId,
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_cert_pem: String,
}

impl ClusterCa {
    /// A new CA with a fresh ECDSA P-256 key.
    pub fn generate() -> Result<ClusterCa, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, "cairn cluster ca");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let certificate = params.self_signed(&key)?;
        let cert_pem = certificate.pem();
        Ok(ClusterCa {
            certificate,
            key,
            cert_pem,
        })
    }

    /// Loads a CA written by `cert_pem()` / `key_pem()`. Certificates it issues verify against
    /// the original CA certificate (same name and key).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<ClusterCa, TlsError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| TlsError::Parse {
            what: "ca key",
            reason: e.to_string(),
        })?;
        let params =
            CertificateParams::from_ca_cert_pem(cert_pem).map_err(|e| TlsError::Parse {
                what: "ca certificate",
                reason: e.to_string(),
            })?;
        let certificate = params.self_signed(&key)?;
        Ok(ClusterCa {
            certificate,
            key,
            cert_pem: cert_pem.to_string(),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// BLAKE3 of the CA certificate's DER, hex: what a joining node checks the CA against.
    pub fn fingerprint(&self) -> Result<String, TlsError> {
        ca_fingerprint(&self.cert_pem)
    }

    /// Issues the certificate of node `node_id`.
    pub fn issue_node_certificate(&self, node_id: NodeId) -> Result<NodeIdentity, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![node_server_name(node_id)])?;
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, node_server_name(node_id));
        params.distinguished_name = name;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let certificate = params.signed_by(&key, &self.certificate, &self.key)?;
        Ok(NodeIdentity {
            node_id,
            cert_pem: certificate.pem(),
            key_pem: key.serialize_pem(),
            ca_cert_pem: self.cert_pem.clone(),
        })
    }
}

/// BLAKE3 (hex) of the DER of the first certificate in `ca_cert_pem`.
pub fn ca_fingerprint(ca_cert_pem: &str) -> Result<String, TlsError> {
    let der = first_certificate(ca_cert_pem, "ca certificate")?;
    Ok(blake3::hash(der.as_ref()).to_hex().to_string())
}

fn first_certificate(pem: &str, what: &'static str) -> Result<CertificateDer<'static>, TlsError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .ok_or(TlsError::Parse {
            what,
            reason: "no certificate in pem".into(),
        })?
        .map_err(|e| TlsError::Parse {
            what,
            reason: e.to_string(),
        })
}

/// The node id a certificate names in its `node-<id>.cairn` DNS subject alternative name.
pub fn node_id_of_certificate(der: &[u8]) -> Result<NodeId, TlsError> {
    let (_, certificate) =
        x509_parser::parse_x509_certificate(der).map_err(|e| TlsError::Parse {
            what: "peer certificate",
            reason: e.to_string(),
        })?;
    let san = certificate
        .subject_alternative_name()
        .map_err(|e| TlsError::Parse {
            what: "subject alternative name",
            reason: e.to_string(),
        })?
        .ok_or(TlsError::NoNodeId)?;
    let mut ids = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::DNSName(dns) => parse_node_server_name(dns),
            _ => None,
        });
    match (ids.next(), ids.next()) {
        (Some(id), None) => Ok(id),
        _ => Err(TlsError::NoNodeId),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl NodeIdentity {
    fn chain_and_key(
        &self,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
        let chain = vec![first_certificate(&self.cert_pem, "node certificate")?];
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|e| {
            TlsError::Parse {
                what: "node key",
                reason: e.to_string(),
            }
        })?;
        Ok((chain, key))
    }

    fn roots(&self) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        roots
            .add(first_certificate(&self.ca_cert_pem, "ca certificate")?)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        Ok(roots)
    }

    /// TLS 1.3 server configuration. With `require_client_certificate`, only clients holding a
    /// certificate from the cluster CA get in (node-to-node RPC); without, any client may connect
    /// (the admin API, which authenticates with bearer tokens).
    pub fn server_config(
        &self,
        require_client_certificate: bool,
        alpn: &[&[u8]],
    ) -> Result<ServerConfig, TlsError> {
        let (chain, key) = self.chain_and_key()?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = if require_client_certificate {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(self.roots()?), provider())
                    .build()
                    .map_err(|e| TlsError::Config(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }

    /// TLS 1.3 client configuration trusting only the cluster CA and presenting this node's
    /// certificate. The caller connects with server name `node_server_name(peer)`.
    pub fn client_config(&self, alpn: &[&[u8]]) -> Result<ClientConfig, TlsError> {
        let (chain, key) = self.chain_and_key()?;
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(chain, key)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_certificate_names_its_node() {
        let ca = ClusterCa::generate().unwrap();
        let identity = ca.issue_node_certificate(42).unwrap();
        let der = first_certificate(&identity.cert_pem, "node").unwrap();
        assert_eq!(node_id_of_certificate(der.as_ref()).unwrap(), 42);
        assert_eq!(parse_node_server_name("node-7.cairn"), Some(7));
        assert_eq!(parse_node_server_name("node-x.cairn"), None);
    }

    #[test]
    fn reloaded_ca_keeps_fingerprint_and_issues() {
        let ca = ClusterCa::generate().unwrap();
        let again = ClusterCa::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(ca.fingerprint().unwrap(), again.fingerprint().unwrap());
        let identity = again.issue_node_certificate(3).unwrap();
        assert!(identity.server_config(true, &[ALPN_RAFT]).is_ok());
        assert!(identity.client_config(&[ALPN_RAFT]).is_ok());
    }

    #[test]
    fn garbage_certificate_is_refused() {
        assert!(node_id_of_certificate(b"not a certificate").is_err());
        assert!(ClusterCa::from_pem("garbage", "garbage").is_err());
    }
}
