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
pub mod storage;
