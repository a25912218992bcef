//! cairn-bootproto: the boot protocols of a Cairn node (DHCP, proxyDHCP, PXE/iPXE, TFTP, iPXE
//! scripts, IPv6 router advertisements).
//!
//! Each protocol is a sans-IO core (no sockets, no clock, no spawning, no filesystem) plus a thin
//! tokio shell: [`dhcp::core`] + [`dhcp::server`], [`tftp::transfer`] + [`tftp::server`],
//! [`ra`] (packet builder + responder). [`ipxe`] renders iPXE scripts from a pure [`ipxe::BootPlan`].
//!
//! Invariants:
//! - bootproto knows nothing about Raft or the cluster. The node implements
//!   [`dhcp::BootDirectory`] (leadership, client lookup, committed leases, discovered MACs) and
//!   [`dhcp::LeaseCommitter`] (commit leases through Raft); the DHCP server sends a DHCPACK only
//!   after its lease's commit returned `Ok`.
//! - No IP is ever leased to two MACs, and a MAC keeps its address (see [`dhcp::leases`]).
//! - Parsers never panic on peer input; bad input gets the protocol's error or silence.
//! - TFTP is read-only, confined to its root, bounded in transfer size and concurrency.
//!
//! Deliberately not done: DHCPv6, BOOTP-only clients, relay agent information echo (option 82),
//! option overload, TFTP writes, HTTP serving (the node serves the rendered scripts).
pub mod dhcp;
pub mod ipxe;
pub mod mac;
pub mod ra;
pub mod testing;
pub mod tftp;

pub use mac::MacAddr;
