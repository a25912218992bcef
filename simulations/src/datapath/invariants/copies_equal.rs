//! After a resync, both copies of a layer are equal: at the end of a run, with the faults
//! healed and every session's standby in sync, each session's primary and standby hold the
//! same value in every block.

use cairn_consensus::domain::{Mac, NodeId};

use super::Violation;

pub fn check(
    mac: Mac,
    primary: (NodeId, &[u64]),
    standby: (NodeId, &[u64]),
) -> Result<(), Violation> {
    let differing: Vec<usize> = primary
        .1
        .iter()
        .zip(standby.1)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(block, _)| block)
        .collect();
    if differing.is_empty() && primary.1.len() == standby.1.len() {
        return Ok(());
    }
    Err(Violation {
        invariant: "both copies equal after a resync",
        detail: format!(
            "client {mac}: primary node {} and in-sync standby node {} differ in {} blocks \
             (first {:?})",
            primary.0,
            standby.0,
            differing.len(),
            differing.first()
        ),
    })
}
