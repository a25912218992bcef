//! No stale read after a failover: once a node acknowledged a write at some generation, no
//! other node serves a read at an older one (the old primary's lease ran out before the new
//! primary served).

use std::collections::BTreeMap;

use cairn_consensus::domain::{Mac, NodeId};

use super::Violation;

#[derive(Default)]
pub struct Reads {
    /// Per client: the newest generation a write was acknowledged at, and by which node.
    newest_write: BTreeMap<Mac, (u64, NodeId)>,
}

impl Reads {
    pub fn write_acknowledged(&mut self, mac: Mac, generation: u64, node: NodeId) {
        let entry = self.newest_write.entry(mac).or_insert((generation, node));
        if generation > entry.0 {
            *entry = (generation, node);
        }
    }

    pub fn check_read(&self, mac: Mac, generation: u64, node: NodeId) -> Result<(), Violation> {
        match self.newest_write.get(&mac) {
            Some((newest, writer)) if *newest > generation && *writer != node => Err(Violation {
                invariant: "no stale read after a failover",
                detail: format!(
                    "client {mac}: node {node} served a read at generation {generation} after \
                     node {writer} acknowledged a write at generation {newest}"
                ),
            }),
            _ => Ok(()),
        }
    }
}
