//! Synchronous mirroring of a writable layer from a session's primary to its standby
//! (DESIGN.md "Two copies of every writable layer"): DRBD's protocol C with a volatile write
//! cache, fenced by generations that Raft decides and that this crate is only told.
//!
//! # The protocol
//!
//! A session's mirror *stream* belongs to one generation: one primary, one standby, operations
//! numbered from 1. The primary applies a write, unmap or WRITE SAME locally, then hands it to
//! [`Primary::submit`] (with the volume's block stripes still held, so two operations on one
//! block enter the stream in the order they were applied); the initiator gets GOOD once the
//! standby acknowledged it ([`Primary::is_complete`]). A flush completes when the standby
//! reports it durable; the primary runs its own flush at the same time.
//!
//! - **Acknowledgements** are cumulative: `applied` (held, in order) and `durable` (on stable
//!   storage). The standby applies operations strictly in sequence order and drops anything
//!   after a gap; the primary goes back to the first unacknowledged operation after
//!   [`MirrorConfig::retransmit_timeout`] (go-back-N). Duplicates are acknowledged again.
//! - **Incarnations.** Each core has a random incarnation, sent with every message. A
//!   stream is between two incarnations: a node that restarted lost what its part of the
//!   stream held in memory (and an unflushed write may be gone from its disk), so the peer
//!   treats it as failed ([`RefusedReason::StreamLost`]) and the standby is dropped and
//!   resynced. A standby created for a generation from before its node started
//!   ([`Standby::new`] with `restarted`) refuses the stream at once and never asks for a
//!   failover: its copy may lack acknowledged writes.
//! - **Generations** fence. Every message names its generation; a node refuses an older one
//!   ([`RefusedReason::Fenced`]), and a primary told so stops acknowledging anything.
//! - **A standby that does not answer** within [`MirrorConfig::standby_timeout`] (or makes no
//!   progress within [`MirrorConfig::progress_timeout`]) is reported
//!   ([`PrimaryEvent::StandbyUnreachable`]); the primary keeps every unacknowledged operation
//!   pending until the shell tells it that "standby dropped" was committed
//!   ([`Primary::handle_standby_dropped`]). A primary cut off from both the leader and its
//!   standby therefore stalls instead of diverging.
//! - **Read lease.** Every acknowledgement grants the primary a lease of
//!   [`MirrorConfig::lease`] from when the standby received the message it answers; the primary
//!   dates it from when it sent that message, which is earlier, and keeps a margin for clock
//!   rate differences. The primary serves reads only within its lease
//!   ([`Primary::can_read`]); a standby that is promoted serves only once every lease it
//!   granted has run out ([`Standby::promote`]). So a cut-off old primary never serves a stale
//!   read, and a new primary never serves before the old one stopped.
//! - **Failure detection.** The standby reports a primary silent for
//!   [`MirrorConfig::primary_timeout`] ([`StandbyEvent::PrimarySilent`]); heartbeats every
//!   [`MirrorConfig::heartbeat_interval`] keep an idle stream alive.
//! - **Resync.** A new or returning standby is brought up to date while new writes are mirrored
//!   to it: region by region ([`REGION_BLOCKS`] blocks), the standby reports a digest of its
//!   copy (a state and a content hash per block) at a point of the stream, the primary's shell
//!   compares it with its own copy and submits what differs (whole blocks, unmaps, or
//!   "back to base"), under the stripes of the region, so a concurrent write is ordered with
//!   the copy. A fresh standby (an empty layer on the same base) skips the digests. A node that
//!   returns with an old copy sends only what changed: its digests match elsewhere. The copy is
//!   bounded by a bandwidth limit; when every region is compared, a flush made durable on the
//!   standby completes the resync ([`PrimaryEvent::ResyncComplete`]), and the shell asks Raft to
//!   record the standby as in sync.
//!
//! # What this module does not do
//!
//! No sockets, clocks, threads or disks: `now` and messages come in, messages, actions and
//! events go out ([`Primary`], [`Standby`]). The shells that read a volume, run a transport and
//! propose to Raft live elsewhere. Who is primary, standby, and the generation are decided by
//! Raft alone; the cores never change them on their own.

pub mod primary;
pub mod standby;
pub mod wire;

#[cfg(test)]
mod tests;

use std::time::Duration;

use bytes::Bytes;

pub use primary::{
    region_blocks, Primary, PrimaryEvent, ResyncProgress, StandbySync, SubmitError, Ticket,
    UnreachableReason,
};
pub use standby::{Standby, StandbyAction, StandbyEvent};
pub use wire::{Message, WireError};

/// Blocks per resync region: 256 × 4 KiB = 1 MiB, a digest of at most 4.4 KiB.
pub const REGION_BLOCKS: u64 = 256;
/// Largest write one operation carries (what one iSCSI command may write, 32 MiB).
pub const OPERATION_BYTES_MAX: usize = 32 << 20;

/// The volume a stream belongs to: its VPD 0x83 identifier, the same on every node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VolumeId(pub [u8; 16]);

impl std::fmt::Display for VolumeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for byte in &self.0[..8] {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

/// A layer change as the standby must apply it, in 4 KiB blocks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Operation {
    /// Whole 4 KiB blocks from `first_block` (after the primary's read-modify-write).
    Write { first_block: u64, data: Bytes },
    /// Blocks that read as zeros.
    Unmap { first_block: u64, block_count: u64 },
    /// Blocks that read from the base image again (resync of a copy that has them written).
    Discard { first_block: u64, block_count: u64 },
    /// Everything before this in the stream becomes durable.
    Flush,
    /// Resync: report a digest of this region as it stands at this point of the stream.
    Digest { region: u64 },
}

impl Operation {
    pub fn payload_bytes(&self) -> usize {
        match self {
            Operation::Write { data, .. } => data.len(),
            _ => 0,
        }
    }
}

/// One block of a [`RegionDigest`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockDigest {
    Base,
    /// Written: the first 16 bytes of the BLAKE3 hash of its 4 KiB.
    Layer([u8; 16]),
    Unmapped,
}

impl BlockDigest {
    pub fn of_layer_block(data: &[u8]) -> BlockDigest {
        let hash = blake3::hash(data);
        BlockDigest::Layer(hash.as_bytes()[..16].try_into().expect("16 bytes"))
    }
}

/// The state of each block of one region of a copy (the last region may be shorter).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RegionDigest {
    pub blocks: Vec<BlockDigest>,
}

/// A run of blocks where the primary's copy differs from the standby's, and what to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Difference {
    /// Send the primary's data of these blocks.
    Write {
        first_block: u64,
        block_count: u64,
    },
    Unmap {
        first_block: u64,
        block_count: u64,
    },
    Discard {
        first_block: u64,
        block_count: u64,
    },
}

/// Compares the digest of one region of the primary's copy (`local`, starting at block
/// `first_block`) with the standby's, in runs of consecutive blocks that need the same fix.
/// Runs of writes are cut at `write_blocks_max` blocks, so one operation stays small.
pub fn region_differences(
    first_block: u64,
    local: &[BlockDigest],
    standby: &RegionDigest,
    write_blocks_max: u64,
) -> Vec<Difference> {
    let mut out: Vec<Difference> = Vec::new();
    for (index, block) in local.iter().enumerate() {
        let theirs = standby.blocks.get(index).copied();
        if theirs == Some(*block) {
            continue;
        }
        let at = first_block + index as u64;
        let next = match block {
            BlockDigest::Layer(_) => Difference::Write {
                first_block: at,
                block_count: 1,
            },
            BlockDigest::Unmapped => Difference::Unmap {
                first_block: at,
                block_count: 1,
            },
            BlockDigest::Base => Difference::Discard {
                first_block: at,
                block_count: 1,
            },
        };
        let merged = match (out.last_mut(), next) {
            (
                Some(Difference::Write {
                    first_block,
                    block_count,
                }),
                Difference::Write { .. },
            ) if *first_block + *block_count == at && *block_count < write_blocks_max => {
                *block_count += 1;
                true
            }
            (
                Some(Difference::Unmap {
                    first_block,
                    block_count,
                }),
                Difference::Unmap { .. },
            )
            | (
                Some(Difference::Discard {
                    first_block,
                    block_count,
                }),
                Difference::Discard { .. },
            ) if *first_block + *block_count == at => {
                *block_count += 1;
                true
            }
            _ => false,
        };
        if !merged {
            out.push(next);
        }
    }
    out
}

/// Why a node refused a mirror message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RefusedReason {
    /// The message's generation is older than the receiver's: its sender is fenced.
    Fenced = 1,
    /// The receiver has not learned this generation yet; try again.
    NotYet = 2,
    /// The receiver holds no copy of this volume (yet).
    UnknownVolume = 3,
    /// The receiver's storage failed; it takes nothing more.
    Storage = 4,
    /// The sender of an acknowledgement is not the standby of this stream, or an operation
    /// reached a node that is not this stream's standby.
    NotPrimary = 5,
    /// The operation does not fit the volume (out of range).
    BadOperation = 6,
    /// The standby restarted (or saw the primary restart) within this generation: its part of
    /// the stream is gone. Drop it; a new stream and a resync bring it back.
    StreamLost = 7,
}

/// Timing and limits of a mirror stream. The defaults aim at a failover within about a
/// second: a silent primary is reported after 700 ms, and a promoted standby waits out a 900 ms
/// lease counted from the last message it got.
#[derive(Clone, Debug)]
pub struct MirrorConfig {
    pub heartbeat_interval: Duration,
    /// Lease a standby grants with each acknowledgement, from when it received the message.
    pub lease: Duration,
    /// The primary counts its lease as this fraction (per mille) of `lease` from when it sent
    /// the message, allowing for clocks that run at different rates.
    pub lease_use_per_mille: u32,
    pub retransmit_timeout: Duration,
    /// No acknowledgement at all for this long: the standby is reported unreachable.
    pub standby_timeout: Duration,
    /// Acknowledgements that do not advance while operations wait, for this long: the standby
    /// is reported unreachable too (a slow or stuck disk).
    pub progress_timeout: Duration,
    /// Nothing from the primary for this long: the standby reports it silent.
    pub primary_timeout: Duration,
    /// Payload bytes submitted and not yet applied by the standby; [`Primary::submit`] refuses
    /// more ([`SubmitError::Full`]) until acknowledgements free room.
    pub in_flight_bytes_max: u64,
    /// Resync regions in flight at once (digests asked for, or regions being compared); the
    /// copy's bytes in flight are bounded by half of `in_flight_bytes_max` as well.
    pub resync_digests_in_flight_max: usize,
    /// Bandwidth limit of a resync's copy, bytes per second (0: none).
    pub resync_bytes_per_second_max: u64,
}

impl Default for MirrorConfig {
    fn default() -> Self {
        MirrorConfig {
            heartbeat_interval: Duration::from_millis(100),
            lease: Duration::from_millis(900),
            lease_use_per_mille: 900,
            retransmit_timeout: Duration::from_millis(300),
            standby_timeout: Duration::from_millis(700),
            progress_timeout: Duration::from_secs(5),
            primary_timeout: Duration::from_millis(700),
            in_flight_bytes_max: 64 << 20,
            resync_digests_in_flight_max: 32,
            resync_bytes_per_second_max: 0,
        }
    }
}
