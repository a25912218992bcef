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
}
