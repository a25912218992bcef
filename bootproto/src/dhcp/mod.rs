//! DHCP: a full server with replicated leases, and proxyDHCP beside an existing server.
//!
//! - [`core::DhcpCore`] is the sans-IO decision core: bytes in, a [`core::Decision`] out. It
//!   keeps the leader's view of the lease table ([`leases::LeaseBook`]) with short offer
//!   reservations, and never commits anything itself.
//! - [`server::DhcpServer`] is the tokio shell: sockets, the clock, leadership checks, and lease
//!   commits through a [`LeaseCommitter`] *before* the DHCPACK is sent.
//!
//! The node implements [`BootDirectory`] and [`LeaseCommitter`] on top of the replicated state;
//! this module knows nothing about Raft.

pub mod config;
pub mod core;
pub mod leases;
pub mod server;
pub mod wire;

#[cfg(test)]
mod core_tests;

use std::future::Future;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::mac::MacAddr;

pub use config::{DhcpConfig, DhcpMode, PoolConfig, PxeConfig, UnknownClientPolicy};

/// One DHCP lease as it is committed to the replicated state. The table is keyed by MAC: a MAC
/// holds at most one lease, and (by construction of [`leases::LeaseBook`]) an IP is held by at
/// most one MAC. A release is committed as a lease whose `expires_unix_secs` is the release time:
/// the address stays with that MAC until the pool runs out of never-used addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
    /// Wall-clock expiry (leases are replicated, so the leader's wall clock is the reference).
    pub expires_unix_secs: u64,
    /// Option 12 as sent by the client, if any (informational).
    pub hostname: Option<String>,
}

/// What the directory knows about a MAC address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientStatus {
    /// Registered (or adopted) client: it gets DHCP and PXE answers.
    Registered,
    /// Never seen by an admin: silence by default ([`UnknownClientPolicy`]).
    Unknown,
}

/// A MAC address seen by DHCP that the directory does not know; the node records it as a
/// *discovered* event so an admin can adopt it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveredClient {
    pub mac: MacAddr,
    /// Option 93, when sent.
    pub architecture: Option<u16>,
    /// Option 60, lossily decoded (e.g. `PXEClient:Arch:00000:UNDI:002001`).
    pub vendor_class: Option<String>,
    /// Option 12, when sent.
    pub hostname: Option<String>,
    /// The relay that forwarded the request (0.0.0.0 when the client is on our link).
    pub relay: Ipv4Addr,
}

/// Client lookup used by the sans-IO core. Must be quick and must not block: the node answers it
/// from its local copy of the replicated state (the leader's copy is current under its lease).
pub trait ClientLookup {
    fn client(&self, mac: MacAddr) -> ClientStatus;
}

/// Everything the DHCP server needs from the cluster besides committing leases.
///
/// Calls are made on the packet path: they must be quick and non-blocking.
pub trait BootDirectory: ClientLookup + Send + Sync + 'static {
    /// `Some(epoch)` while this node is the Raft leader, where `epoch` changes every time
    /// leadership is (re)gained (the Raft term is a good epoch). `None`: stay silent.
    fn leader_epoch(&self) -> Option<u64>;
    /// The committed lease table. Read once each time the epoch changes, to rebuild the
    /// leader's lease book, so the new leader answers the next request without a restart.
    fn leases(&self) -> Vec<Lease>;
    /// Record an unknown MAC as *discovered*. Fire and forget (the node may queue it and
    /// deduplicate); the server calls it at most once per received packet.
    fn record_discovered(&self, client: DiscoveredClient);
}

/// Why a lease commit failed. The server does not send the DHCPACK; the client retries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    #[error("not the leader (leadership lost before the lease commit)")]
    NotLeader,
    #[error("lease commit failed: {0}")]
    Failed(String),
}

/// Commits leases durably (the node: through Raft) before the server acknowledges them.
///
/// `commit_leases` receives a batch (in arrival order, at most `commit_batch_max`, never two
/// leases for the same MAC in one batch). It must resolve `Ok` only once every lease of the
/// batch is committed; on `Err` none of them is acknowledged to clients (a partial commit is
/// harmless: the same client retries and gets the same address).
pub trait LeaseCommitter: Send + Sync + 'static {
    fn commit_leases(
        &self,
        leases: Vec<Lease>,
    ) -> impl Future<Output = Result<(), CommitError>> + Send;
}
