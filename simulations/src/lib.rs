//! cairn-simulations: Cairn's deterministic simulation harness.
//!
//! # The world
//!
//! One run = one seed. The seed picks the run's configuration (`config::SimConfig`, swarm style:
//! 3 or 5 nodes, timing, delay spread, loss, which faults and how often, how many clients) and
//! seeds the one RNG every random choice of the run is drawn from. Everything runs on one
//! current-thread tokio runtime whose clock is paused and auto-advances when every task waits, so
//! simulated seconds cost only the CPU of what happens in them, and task order follows from the
//! run's own history. The same seed gives the same trace (`trace::Trace` hashes every line);
//! `tests/determinism.rs` checks it.
//!
//! # Real and simulated
//!
//! Real (consensus's own code, unchanged): openraft 0.9 with consensus's `NetworkFactory`, the
//! in-memory log store and state machine (`store::mem`, which shares its apply step and snapshot
//! format with the RocksDB store), `service::RaftService` (leader stamping, pre-check, follower
//! forwarding, retry rules), the domain (`Command` → `Event`, `State`, `replay`), and the wire
//! codec (every message is encoded and decoded as on QUIC).
//!
//! Simulated: the network (`network::SimTransport` implements consensus's `Transport`: delay,
//! reordering, loss, symmetric and one-way partitions, refused connections to a down node), the
//! clock (each node's leader clock is simulated time plus a per-node skew), crashes (the Raft is
//! shut down at whatever await point it is at; the stores survive, as fsynced data would) and the
//! clients (`workload`: random admin commands to random nodes, with a record of what was
//! acknowledged).
//!
//! Determinism needs care where tokio or openraft take randomness from the process:
//! - openraft draws election timeouts from the thread RNG, so every node (re)start gets a
//!   one-value range drawn from the run's RNG (`world::start_node`);
//! - tokio's `select!` (unless `biased;`) and `watch` (which spreads waiters over 8 `Notify`s)
//!   draw from a per-runtime RNG that only `--cfg tokio_unstable` could seed. So: every `select!`
//!   the simulation runs must be `biased;` (openraft's core loop is; consensus's
//!   `RaftService::on_leader` is not yet, see /work/notes/sim-needs.md), at most one task waits
//!   on one node's metrics `watch` (clients take turns per node, leadership is polled, not
//!   watched), and a crashed node's pending calls, which openraft wakes through its metrics
//!   `watch`, end silently (`network`) or are cut off first by a crash signal (`sim`);
//! - nothing in the harness reads the system clock or iterates a hash map.
//!
//! # Invariants (`invariants`, one file each)
//!
//! - `single_leader`: one leader per term (strict Raft check behind `RunOptions::strict_terms`;
//!   see the file for why openraft's default leader id allows two).
//! - `history`: every node's committed event history is a prefix of one history; it never
//!   shrinks or changes (no committed event lost or reordered), crashed nodes included.
//! - `replay`: every node's `State::hash()` equals the replay of its own history.
//! - `acknowledged`: every acknowledged command's events are in the history, at their seqs.
//! - `convergence`: after the faults stop, a write through every node succeeds and all nodes
//!   reach one history and one state hash.
//!
//! # Running
//!
//! `cargo test -p cairn-simulations` runs a fixed list of seeds and the determinism check.
//! `cargo run -p cairn-simulations --release -- --seeds 1000` runs many (`--start N` picks the
//! first), `--reproduce SEED --verbose` replays one with its whole trace. A failure prints the
//! violated invariant, the seed's configuration, the end of the trace and `--reproduce <seed>`;
//! every failing seed found this way belongs in `tests/seeds.rs` (`REGRESSION_SEEDS` once fixed;
//! `KNOWN_BUG_SEEDS`, run with `--ignored`, while the bug is open).
//!
//! # Growing it
//!
//! - A new invariant: a file in `invariants/` (see its module docs) called from `sim::check_all`
//!   or `sim::final_checks`.
//! - A new fault: a `faults::Fault` variant with a weight in `SimConfig` (see `faults`).
//! - A new component (the data path, the boot service): give it a slot in `world::NodeSlot`,
//!   drive its sans-IO core from tasks on the same runtime, and route its traffic through
//!   `network` so partitions and loss apply to it too.
//!
//! Deliberately not done yet: membership changes, storage faults (failed fsync, torn writes),
//! clock jumps, the RocksDB store, and the data path and boot service (later issues).

// A `Failure` carries the trace's tail; it is returned once per failed run, never in a hot path.
#![allow(clippy::result_large_err)]

pub mod config;
pub mod datapath;
pub mod faults;
pub mod invariants;
pub mod network;
pub mod sim;
pub mod trace;
pub mod workload;
pub mod world;

pub use config::SimConfig;
pub use sim::{run_seed, run_seed_catching, run_seeds, Failure, Report, RunOptions};
