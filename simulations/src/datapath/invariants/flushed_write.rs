//! No flushed write lost in any crash: after the faults stop, every block of every disk,
//! read on its final primary, holds a value it may hold (its last acknowledged write, or after
//! a power loss its last flushed write or a later one).

use cairn_consensus::domain::{Mac, NodeId};

use super::Violation;
use crate::datapath::model::Expectation;

pub fn check_disk(
    expect: &Expectation,
    mac: Mac,
    node: NodeId,
    contents: &[u64],
) -> Result<(), Violation> {
    for (block, value) in contents.iter().enumerate() {
        let possible = &expect.possible[block];
        if !possible.contains(value) {
            return Err(Violation {
                invariant: "no flushed write lost",
                detail: format!(
                    "client {mac}: block {block} on its final primary, node {node}, holds \
                     {value}; it may hold only {possible:?}"
                ),
            });
        }
    }
    Ok(())
}
