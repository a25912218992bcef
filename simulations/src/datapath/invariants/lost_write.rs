//! No acknowledged write lost when one node dies (and none lost that was flushed, in any
//! crash): every read returns a value the block may hold by what the initiator was told.
//! After a power loss of every node, `Expectation::power_lost` widens what the block may hold
//! to its last flushed write and anything issued after it.

use cairn_consensus::domain::{Mac, NodeId};

use super::Violation;
use crate::datapath::model::Expectation;

pub fn check_read(
    expect: &Expectation,
    mac: Mac,
    block: u64,
    value: u64,
    node: NodeId,
    generation: u64,
) -> Result<(), Violation> {
    let possible = &expect.possible[block as usize];
    if possible.contains(&value) {
        return Ok(());
    }
    Err(Violation {
        invariant: "no acknowledged write lost",
        detail: format!(
            "client {mac} read block {block} as {value} from node {node} at generation \
             {generation}; it may hold only {possible:?}"
        ),
    })
}
