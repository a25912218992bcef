//! cairn-node: the `cairn` binary. Configuration, the wiring of the replicated state to the
//! admin API, the CLI, and the embedded demo.
//!
//! Architecture invariant: the node holds no state of its own besides configuration and
//! key material; everything an admin changes goes through `ClusterNode::propose` and is an
//! event in the replicated history.

pub mod api;
pub mod boot;
pub mod cli;
pub mod client;
pub mod commands;
pub mod config;
pub mod demo;
pub mod https;
pub mod output;
pub mod secrets;
pub mod server;
pub mod sessions;
pub mod storage;

/// Ends the process without running C and C++ exit handlers. RocksDB's static destructors race
/// its own background threads at exit ("terminate called without an active exception", or a
/// segmentation fault) while a database handle is still alive in another thread. Nothing is
/// lost by skipping them: every acknowledged write is already durable, and a node must survive
/// SIGKILL at any point anyway (tests/tests/cluster_processes.rs).
pub fn exit_now(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    #[allow(unsafe_code)]
    // SAFETY: `_exit` takes no pointers and never returns; skipping exit handlers is the point.
    unsafe {
        libc::_exit(code)
    }
}
