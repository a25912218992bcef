//! The run's trace: one line per thing that happened in the world (faults, message fates, client
//! requests and answers, leader changes). Every line goes into a running BLAKE3 hash; the last
//! lines are kept for the failure report. Two runs of one seed must give the same hash.

use std::collections::VecDeque;
use std::fmt;

/// Lines kept for printing when a run fails.
pub const TRACE_TAIL_LINES_MAX: usize = 200;

pub struct Trace {
    hasher: blake3::Hasher,
    lines_total: u64,
    tail: VecDeque<String>,
    /// Print every line as it is recorded (`--verbose`).
    pub echo: bool,
}

impl Default for Trace {
    fn default() -> Trace {
        Trace {
            hasher: blake3::Hasher::new(),
            lines_total: 0,
            tail: VecDeque::with_capacity(TRACE_TAIL_LINES_MAX),
            echo: false,
        }
    }
}

impl Trace {
    /// Records one line stamped with the simulated time.
    pub fn record(&mut self, now_ms: u64, line: fmt::Arguments<'_>) {
        let line = format!("{now_ms:>7} {line}");
        self.hasher.update(line.as_bytes());
        self.hasher.update(b"\n");
        self.lines_total += 1;
        if self.echo {
            println!("{line}");
        }
        if self.tail.len() == TRACE_TAIL_LINES_MAX {
            self.tail.pop_front();
        }
        self.tail.push_back(line);
    }

    /// The hash of every line so far (hex).
    pub fn hash(&self) -> String {
        self.hasher.finalize().to_hex().to_string()
    }

    pub fn lines_total(&self) -> u64 {
        self.lines_total
    }

    pub fn tail(&self) -> impl Iterator<Item = &String> {
        self.tail.iter()
    }
}
