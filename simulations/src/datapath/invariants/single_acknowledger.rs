//! At most one node acknowledges writes for a session per generation.

use std::collections::BTreeMap;

use cairn_consensus::domain::{Mac, NodeId};

use super::Violation;

#[derive(Default)]
pub struct Acknowledgers {
    by_generation: BTreeMap<(Mac, u64), NodeId>,
}

impl Acknowledgers {
    pub fn record(&mut self, mac: Mac, generation: u64, node: NodeId) -> Result<(), Violation> {
        let first = *self.by_generation.entry((mac, generation)).or_insert(node);
        if first != node {
            return Err(Violation {
                invariant: "one acknowledging node per generation",
                detail: format!(
                    "client {mac}: nodes {first} and {node} both acknowledged writes at \
                     generation {generation}"
                ),
            });
        }
        Ok(())
    }
}
