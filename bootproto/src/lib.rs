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
//! Wiring (the node):
//! 1. Implement [`dhcp::BootDirectory`] (leader epoch = Raft term while leader, client lookup,
//!    committed lease table, discovered-MAC recording) and [`dhcp::LeaseCommitter`] (one Raft
//!    entry per batch of leases). Build a [`dhcp::DhcpConfig`] (TOML), then
//!    `DhcpServer::bind(config, directory, committer).await?.run().await` on every node: only the
//!    leader answers, and a new leader rebuilds its lease book from the table on its first packet.
//! 2. `TftpServer::bind(TftpConfig).await?.run()` with root `/usr/lib/ipxe` (Debian's ipxe).
//! 3. Serve `render_ipxe_script(&plan)` at `PxeConfig::script_url` (any node), reading the
//!    client's MAC with [`ipxe::parse_boot_query`]; the login step posts back to the plan's
//!    `login_url` with `mac`, `user` and `password`.
//! 4. On the clients' link, `RaResponder::bind(&RaConfig)?.run()` so iPXE does not wait ~14 s
//!    for IPv6 routers.
//!
//! [`testing`] has in-memory stand-ins of both traits (tests, benchmark, `examples/boot_lab.rs`),
//! and what a test does when a peer tool it needs is missing.
//!
//! Deliberately not done: DHCPv6, BOOTP-only clients, relay agent information echo (option 82),
//! option overload, TFTP writes, HTTP serving (the node serves the rendered scripts).
pub mod dhcp;
pub mod ipxe;
pub mod mac;
pub mod metrics;
pub mod ra;
pub mod testing;
pub mod tftp;

pub use mac::MacAddr;
