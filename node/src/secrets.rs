//! Tokens and passwords. The cluster stores digests only: an admin token or a join token is
//! shown once and never enters the Raft log.
//!
//! Formats: an admin token is `cairn_<64 hex>`; a join token is `cairnjoin_<64 hex>_<64 hex>`,
//! the secret and the BLAKE3 fingerprint of the cluster CA, so that a joining node can check it
//! talks to the right cluster before it trusts anything it is sent (as kubeadm's discovery hash).

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use rand::RngCore;

use cairn_consensus::domain::Hash32;

use crate::api::error::ApiError;

pub const PASSWORD_BYTES_MAX: usize = 256;

pub fn random_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

pub fn admin_token() -> String {
    format!("cairn_{}", random_secret())
}

/// The token nodes use with each other's admin API (pulling image versions). Every node holds
/// the cluster CA key, so every node derives the same token; nobody else can.
pub fn node_token(ca_key_pem: &str) -> String {
    let key = blake3::derive_key("cairn node api token v1", ca_key_pem.as_bytes());
    format!("cairn_node_{}", hex::encode(key))
}

pub fn digest(token: &str) -> Hash32 {
    Hash32::of(token.as_bytes())
}

pub fn join_token(secret: &str, ca_fingerprint: &str) -> String {
    format!("cairnjoin_{secret}_{ca_fingerprint}")
}

/// Splits a join token into (secret, CA fingerprint).
pub fn parse_join_token(token: &str) -> Option<(String, String)> {
    let rest = token.trim().strip_prefix("cairnjoin_")?;
    let (secret, fingerprint) = rest.split_once('_')?;
    let hex64 = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex64(secret) && hex64(fingerprint))
        .then(|| (secret.to_string(), fingerprint.to_ascii_lowercase()))
}

pub fn hash_password(password: &str) -> Result<String, ApiError> {
    if password.is_empty() || password.len() > PASSWORD_BYTES_MAX {
        return Err(ApiError::bad_request(format!(
            "a password has 1 to {PASSWORD_BYTES_MAX} bytes"
        )));
    }
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| ApiError::internal(format!("password hashing failed: {e}")))
}

pub fn verify_password(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc).is_ok_and(|hash| {
        Argon2::default()
            .verify_password(password.as_bytes(), &hash)
            .is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_tokens_parse_strictly() {
        let secret = random_secret();
        let fingerprint = "ab".repeat(32);
        let token = join_token(&secret, &fingerprint);
        assert_eq!(
            parse_join_token(&token),
            Some((secret.clone(), fingerprint))
        );
        assert_eq!(parse_join_token(&format!("cairnjoin_{secret}")), None);
        assert_eq!(parse_join_token("cairnjoin_zz_zz"), None);
        assert_eq!(parse_join_token(&admin_token()), None);
    }

    #[test]
    fn passwords_verify() {
        let phc = hash_password("hunter2").unwrap();
        assert!(phc.starts_with("$argon2"));
        assert!(verify_password("hunter2", &phc));
        assert!(!verify_password("hunter3", &phc));
        assert!(hash_password("").is_err());
    }
}
