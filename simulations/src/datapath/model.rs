//! The storage model of one node's copy of a layer, and what an initiator may read back.
//!
//! A copy holds one `u64` per 4 KiB block (0: the base image; every write in a run writes a
//! value of its own). Writes land in a volatile overlay; a flush makes the overlay durable. A
//! crash keeps each unflushed block's new value or loses it, each by a coin flip: the volume's
//! durability contract ("blocks of an unflushed write may individually be old or new").

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use cairn_blockstore::mirror::{BlockDigest, Operation, RegionDigest, REGION_BLOCKS};
use rand::Rng;

#[derive(Clone, Debug, Default)]
pub struct Copy {
    durable: BTreeMap<u64, u64>,
    volatile: BTreeMap<u64, u64>,
}

/// A write's 4 KiB: the value in the first 8 bytes.
pub fn block_bytes(value: u64) -> Bytes {
    let mut data = vec![0u8; 4096];
    data[..8].copy_from_slice(&value.to_le_bytes());
    Bytes::from(data)
}

fn value_of(data: &[u8]) -> u64 {
    u64::from_le_bytes(data[..8].try_into().expect("8 bytes"))
}

impl Copy {
    pub fn read(&self, block: u64) -> u64 {
        self.volatile
            .get(&block)
            .or_else(|| self.durable.get(&block))
            .copied()
            .unwrap_or(0)
    }

    pub fn write(&mut self, block: u64, value: u64) {
        self.volatile.insert(block, value);
    }

    pub fn apply(&mut self, operation: &Operation) {
        match operation {
            Operation::Write { first_block, data } => {
                for (index, block) in data.chunks(4096).enumerate() {
                    self.write(first_block + index as u64, value_of(block));
                }
            }
            Operation::Unmap {
                first_block,
                block_count,
            }
            | Operation::Discard {
                first_block,
                block_count,
            } => {
                for block in *first_block..first_block + block_count {
                    self.write(block, 0);
                }
            }
            Operation::Flush | Operation::Digest { .. } => {}
        }
    }

    pub fn flush(&mut self) {
        let volatile = std::mem::take(&mut self.volatile);
        self.durable.extend(volatile);
    }

    /// A crash: each unflushed block keeps its new value or not.
    pub fn crash(&mut self, rng: &mut impl Rng) {
        let volatile = std::mem::take(&mut self.volatile);
        for (block, value) in volatile {
            if rng.gen_bool(0.5) {
                self.durable.insert(block, value);
            }
        }
    }

    pub fn reset(&mut self) {
        self.durable.clear();
        self.volatile.clear();
    }

    fn digest_of(&self, block: u64) -> BlockDigest {
        match self.read(block) {
            0 => BlockDigest::Base,
            value => BlockDigest::of_layer_block(&block_bytes(value)),
        }
    }

    pub fn region_digest(&self, block_count: u64, region: u64) -> RegionDigest {
        let first = region * REGION_BLOCKS;
        let count = cairn_blockstore::mirror::region_blocks(block_count, region);
        RegionDigest {
            blocks: (first..first + count).map(|b| self.digest_of(b)).collect(),
        }
    }

    /// Every block's value (what both copies of a session must agree on).
    pub fn contents(&self, block_count: u64) -> Vec<u64> {
        (0..block_count).map(|block| self.read(block)).collect()
    }
}

/// What one initiator may read back from each block of its disk.
#[derive(Clone, Debug)]
pub struct Expectation {
    /// Values the block may hold now.
    pub possible: Vec<BTreeSet<u64>>,
    /// The write that the last completed flush made durable, per block: (write number,
    /// value); what survives any crash.
    floor: Vec<(u64, u64)>,
    /// Writes issued after the floor, in order (any of them may have reached the disk).
    since_floor: Vec<Vec<(u64, u64)>>,
    /// The last acknowledged write per block, `None` when a power loss made it uncertain.
    acked: Vec<Option<(u64, u64)>>,
}

impl Expectation {
    pub fn new(blocks: u64) -> Expectation {
        Expectation {
            possible: vec![BTreeSet::from([0]); blocks as usize],
            floor: vec![(0, 0); blocks as usize],
            since_floor: vec![Vec::new(); blocks as usize],
            acked: vec![Some((0, 0)); blocks as usize],
        }
    }

    pub fn write_issued(&mut self, block: u64, number: u64, value: u64) {
        self.possible[block as usize].insert(value);
        self.since_floor[block as usize].push((number, value));
    }

    pub fn write_acknowledged(&mut self, block: u64, number: u64, value: u64) {
        self.possible[block as usize] = BTreeSet::from([value]);
        self.acked[block as usize] = Some((number, value));
    }

    /// What a flush issued now will make durable, to pass to [`Expectation::flush_completed`].
    pub fn flush_issued(&self) -> Vec<Option<(u64, u64)>> {
        self.acked.clone()
    }

    pub fn flush_completed(&mut self, snapshot: &[Option<(u64, u64)>]) {
        for (block, acked) in snapshot.iter().enumerate() {
            if let Some((number, value)) = *acked {
                if number > self.floor[block].0 {
                    self.floor[block] = (number, value);
                    self.since_floor[block].retain(|(n, _)| *n > number);
                }
            }
        }
    }

    /// Every node lost power: a block holds its floor or any write issued after it.
    pub fn power_lost(&mut self) {
        for (block, possible) in self.possible.iter_mut().enumerate() {
            *possible = std::iter::once(self.floor[block].1)
                .chain(self.since_floor[block].iter().map(|(_, value)| *value))
                .collect();
            self.acked[block] = None;
        }
    }
}
