//! The data path's invariants, one per file. Each returns a [`Violation`] naming itself.

pub mod copies_equal;
pub mod flushed_write;
pub mod lost_write;
pub mod single_acknowledger;
pub mod stale_read;

/// A broken invariant and what showed it.
#[derive(Clone, Debug)]
pub struct Violation {
    pub invariant: &'static str,
    pub detail: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invariant {} violated: {}", self.invariant, self.detail)
    }
}
