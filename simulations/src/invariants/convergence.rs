//! After the faults stop (network healed, every node restarted), the cluster elects a leader,
//! accepts a write through every node (followers forward to the leader), and every node converges
//! to the same history and the same state hash, within `SimConfig::converge_timeout_ms`.
//!
//! The waiting is done by the driver (`sim::converge`); this file holds the final comparison.

use cairn_consensus::domain::{Hash32, NodeId};

use super::Violation;

pub const NAME: &str = "convergence";

/// All nodes report the same last sequence number and state hash.
pub fn check_same(states: &[(NodeId, u64, Hash32)]) -> Result<(), Violation> {
    let Some((first_id, first_seq, first_hash)) = states.first() else {
        return Err(Violation::new(NAME, "no node to compare"));
    };
    for (node_id, seq, hash) in states {
        if (seq, hash) != (first_seq, first_hash) {
            return Err(Violation::new(
                NAME,
                format!(
                    "n{node_id} is at seq {seq} hash {hash}, n{first_id} at seq {first_seq} hash {first_hash}"
                ),
            ));
        }
    }
    Ok(())
}
