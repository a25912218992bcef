//! The invariants, one per file. Each file owns its part of `Checks` and exposes plain functions
//! the driver calls at fixed points (a metrics change, every check interval, a client's answer,
//! the end of the run). A check never panics: it returns a `Violation`, which stops the run and
//! is printed with `--reproduce <seed>`.
//!
//! To add an invariant: add a file here with a `check_*` function returning
//! `Result<(), Violation>`, keep whatever it must remember in a field of `Checks`, and call it
//! from `sim::check_all` (periodic) or `sim::final_checks` (end of run).

pub mod acknowledged;
pub mod convergence;
pub mod history;
pub mod replay;
pub mod single_leader;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use cairn_consensus::domain::{Event, NodeId, State};

/// A broken invariant: which one, and what was seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub invariant: &'static str,
    pub detail: String,
}

impl Violation {
    pub fn new(invariant: &'static str, detail: impl Into<String>) -> Violation {
        Violation {
            invariant,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invariant {} violated: {}", self.invariant, self.detail)
    }
}

/// What one node's history has been checked up to.
#[derive(Default)]
pub struct NodeProgress {
    /// Events of this node's history already compared with the reference.
    pub checked_len: u64,
    /// The fold of those events (the replay, kept incrementally).
    pub replayed: State,
}

/// The invariant checkers' memory.
#[derive(Default)]
pub struct Checks {
    /// Messages sent so far (also numbers them in the trace).
    pub messages_total: u64,
    /// Which nodes were seen as leader in each term.
    pub leaders_by_term: BTreeMap<u64, BTreeSet<NodeId>>,
    /// Fail when two nodes lead in one term (Raft's election safety). openraft 0.9 without its
    /// `single-term-leader` feature elects by `(term, node id)` and may legitimately elect two
    /// leaders in one term, one after the other; off by default for that reason.
    pub strict_terms: bool,
    /// The committed history: the longest history seen on any node. Every node's history must be
    /// a prefix of it.
    pub history: Vec<Event>,
    pub per_node: BTreeMap<NodeId, NodeProgress>,
    /// Commands whose proposer was told they were committed, with their events.
    pub acknowledged: Vec<acknowledged::Acknowledged>,
    /// Last (term, state, leader) seen per node, to trace changes only.
    pub last_seen: BTreeMap<NodeId, (u64, openraft::ServerState, Option<NodeId>)>,
}

#[cfg(test)]
mod tests {
    //! Each checker must catch what it claims to: fed a broken history, it returns a violation.

    use cairn_consensus::domain::{Command, Event, Hash32, Name, Proposal, State};

    use super::*;

    fn events(groups: &[&str]) -> Vec<Event> {
        let mut state = State::default();
        let mut all = Vec::new();
        for (index, group) in groups.iter().enumerate() {
            let proposal = Proposal {
                actor: Name::new("test").unwrap(),
                time_ms: 1_000 + index as i64,
                command: Command::AddGroup {
                    name: Name::new(*group).unwrap(),
                    description: String::new(),
                },
            };
            all.extend(state.execute(&proposal).unwrap());
        }
        all
    }

    #[test]
    fn history_catches_a_divergent_event() {
        let mut checks = Checks::default();
        history::check_whole(&mut checks, 1, &events(&["a", "b"])).unwrap();
        history::check_whole(&mut checks, 2, &events(&["a"])).unwrap();
        let violation = history::check_whole(&mut checks, 3, &events(&["a", "c"])).unwrap_err();
        assert_eq!(violation.invariant, "history_prefix");
    }

    #[test]
    fn acknowledged_catches_lost_and_replaced_events() {
        let mut checks = Checks::default();
        history::check_whole(&mut checks, 1, &events(&["a", "b"])).unwrap();
        let replaced = acknowledged::Acknowledged {
            client: 0,
            via: 1,
            kind: "add_group",
            events: events(&["a", "x"])[1..].to_vec(),
        };
        assert!(acknowledged::record(&mut checks, replaced).is_err());
        let mut checks = Checks::default();
        history::check_whole(&mut checks, 1, &events(&["a"])).unwrap();
        let beyond = acknowledged::Acknowledged {
            client: 0,
            via: 1,
            kind: "add_group",
            events: events(&["a", "b"])[1..].to_vec(),
        };
        acknowledged::record(&mut checks, beyond).unwrap();
        assert!(acknowledged::check_final(&checks).is_err());
    }

    #[test]
    fn single_leader_strict_catches_two_leaders_in_a_term() {
        let mut checks = Checks::default();
        single_leader::check_leader(&mut checks, 1, 4, Some(1)).unwrap();
        single_leader::check_leader(&mut checks, 2, 4, Some(2)).unwrap();
        assert_eq!(single_leader::multi_leader_terms(&checks), 1);
        assert!(single_leader::check_leader(&mut checks, 2, 5, Some(1)).is_err());
        let mut strict = Checks {
            strict_terms: true,
            ..Checks::default()
        };
        single_leader::check_leader(&mut strict, 1, 4, Some(1)).unwrap();
        assert!(single_leader::check_leader(&mut strict, 2, 4, Some(2)).is_err());
    }

    #[test]
    fn replay_catches_a_state_that_is_not_its_history() {
        let machine = cairn_consensus::store::mem::MemStateMachine::new();
        replay::check_whole(1, &machine, &[]).unwrap();
        let violation = replay::check_whole(1, &machine, &events(&["a"])).unwrap_err();
        assert_eq!(violation.invariant, "replay_hash");
    }

    #[test]
    fn convergence_catches_different_hashes() {
        let same = [(1, 3, Hash32([1; 32])), (2, 3, Hash32([1; 32]))];
        convergence::check_same(&same).unwrap();
        let different = [(1, 3, Hash32([1; 32])), (2, 3, Hash32([2; 32]))];
        assert!(convergence::check_same(&different).is_err());
    }
}
