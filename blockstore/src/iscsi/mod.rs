//! The iSCSI target (RFC 7143): a sans-IO protocol core and a tokio server.
//!
//! - [`wire`]: PDU framing (BHS, AHS, CRC32C digests) and typed PDUs.
//! - [`text`]: login/text key=value negotiation; [`chap`]: CHAP and mutual CHAP (MD5).
//! - [`connection`]: the per-connection state machine (login, full feature phase, R2T and
//!   Data-Out, NOP, task management, logout), driven by `handle_*` and drained by `poll_*`.
//! - [`target`]: the registry of targets and sessions, shared by all connections.
//! - [`server`]: [`Target`], the tokio shell: `add_target`, `remove_target`, `serve(listener)`.
//!
//! # Naming
//!
//! Each client's volume is one target named after the client's MAC address,
//! `iqn.2026-11.org.cairn:client.<12 lowercase hex digits>` (for example
//! `iqn.2026-11.org.cairn:client.525400770010`), its disk at LUN 0. See
//! [`target_name_for_client`].
//!
//! # Wiring (for the node)
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use cairn_blockstore::iscsi::{Chap, Target, TargetConfig, target_name_for_client};
//! # async fn wire(volume: Arc<dyn cairn_blockstore::device::BlockDevice>) -> std::io::Result<()> {
//! let target = Target::new(); // device calls on the blocking pool, READs on the read pool
//! target
//!     .add_target(
//!         &target_name_for_client([0x52, 0x54, 0x00, 0x77, 0x00, 0x10]),
//!         volume,
//!         TargetConfig {
//!             allowed_initiators: vec!["iqn.2026-11.org.cairn:client.525400770010".into()],
//!             chap: Some(Chap { user: "client".into(), secret: "a-secret-of-12+".into() }),
//!             mutual_chap: None,
//!         },
//!     )
//!     .expect("new target");
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:3260").await?;
//! tokio::spawn({ let t = target.clone(); async move { t.serve(listener).await } });
//! // later: target.remove_target(name) closes its sessions.
//! # Ok(()) }
//! ```
//!
//! Every portal of a node serves every target (call `serve` once per listener); persistent
//! reservations, unit attentions and mode pages are per target, shared by all portals and
//! sessions. A device error `Fenced` becomes NOT READY sense (04/0A) for the command.
//!
//! # Invariants
//!
//! - Peer input never panics the target: bad PDUs get a Reject, bad logins a login failure
//!   status, bad commands CHECK CONDITION with sense data.
//! - A write reaches the device only when all of its data arrived intact and in order.
//! - Reservations and other LUN state are per target, shared by every session and portal.
//! - Several READs of one session may run at once and complete in any order; nothing else
//!   overtakes or is overtaken by them, and a task management or logout request is answered
//!   only after the answers of the commands it affects (a streamed READ it aborts stops
//!   instead, with no answer). See `server`.
//! - Memory per session is bounded whatever the initiator asks (see `server` for the sum).
//!
//! # Not done
//!
//! ErrorRecoveryLevel above 0 (no SNACK, no connection recovery), more than one connection per
//! session (MC/S), markers, bidirectional commands, asynchronous messages.

pub mod chap;
pub mod connection;
mod read_pool;
pub mod server;
pub mod target;
pub mod text;
pub mod wire;

pub use chap::Chap;
pub use server::Target;
pub use target::{Listing, Registry, RegistryError, TargetConfig};

/// The target name of a client's volume: `iqn.2026-11.org.cairn:client.` and the MAC address
/// as 12 lowercase hex digits without separators.
pub fn target_name_for_client(mac: [u8; 6]) -> String {
    let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
    format!("iqn.2026-11.org.cairn:client.{hex}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn client_target_name() {
        assert_eq!(
            super::target_name_for_client([0x52, 0x54, 0x00, 0x77, 0x00, 0x10]),
            "iqn.2026-11.org.cairn:client.525400770010"
        );
    }
}
