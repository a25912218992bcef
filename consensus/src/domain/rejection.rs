//! Why a command was refused. A rejection writes nothing.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EntityKind {
    Node,
    Image,
    ImageVersion,
    Client,
    User,
    Group,
    Token,
    JoinToken,
    Assignment,
    Lease,
    BootSession,
}

impl std::fmt::Display for EntityKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EntityKind::Node => "node",
            EntityKind::Image => "image",
            EntityKind::ImageVersion => "image version",
            EntityKind::Client => "client",
            EntityKind::User => "user",
            EntityKind::Group => "group",
            EntityKind::Token => "token",
            EntityKind::JoinToken => "join token",
            EntityKind::Assignment => "assignment",
            EntityKind::Lease => "lease",
            EntityKind::BootSession => "boot session of client",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum Rejection {
    #[error("{kind} {name} not found")]
    NotFound { kind: EntityKind, name: String },
    #[error("{kind} {name} already exists")]
    AlreadyExists { kind: EntityKind, name: String },
    #[error("{kind} {name} is in use: {reason}")]
    InUse {
        kind: EntityKind,
        name: String,
        reason: String,
    },
    #[error("invalid {field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("conflict: {reason}")]
    Conflict { reason: String },
    #[error("nothing to change: {what}")]
    Unchanged { what: String },
}

impl Rejection {
    pub fn invalid(field: &str, reason: impl Into<String>) -> Rejection {
        Rejection::Invalid {
            field: field.to_string(),
            reason: reason.into(),
        }
    }
}
