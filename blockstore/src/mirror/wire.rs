//! The mirror stream's messages and their byte encoding.
//!
//! ```text
//! every message   u8 kind | 16-byte volume id | u64 generation | body        (little-endian)
//! 1 Operation     u64 incarnation | u64 seq | u64 stamp | u8 op | op body
//!                   op 1 Write    u64 first block | u32 byte count | data (whole 4 KiB blocks)
//!                   op 2 Unmap    u64 first block | u64 block count
//!                   op 3 Discard  u64 first block | u64 block count (back to the base image)
//!                   op 4 Flush
//!                   op 5 Digest   u64 region
//! 2 Heartbeat     u64 incarnation | u64 highest seq sent | u64 stamp
//! 3 Ack           u64 incarnation | u64 applied | u64 durable | u64 stamp echoed | u32 lease ms
//! 4 Digest        u64 seq | u64 region | u16 block count | per block: u8 state (0 base,
//!                 1 layer + 16-byte BLAKE3 prefix of its content, 2 unmapped)
//! 5 Refused       u64 the receiver's generation | u8 reason
//! ```
//!
//! The transport frames messages (one message per frame); [`Message::decode`] takes exactly one.
//! Decoding never panics: anything malformed is a [`WireError`] with what was wrong.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{
    BlockDigest, Operation, RefusedReason, RegionDigest, VolumeId, OPERATION_BYTES_MAX,
    REGION_BLOCKS,
};
use crate::volume::LAYER_BLOCK_SIZE_BYTES;

/// One message of the mirror protocol. Each names the volume and the generation of the
/// session it belongs to; a node refuses anything of an older generation than its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Primary → standby: the next operation of the stream.
    Operation {
        volume: VolumeId,
        generation: u64,
        /// Which run of the sender's core this is: a different one within a generation means
        /// the sender restarted and lost its part of the stream.
        incarnation: u64,
        seq: u64,
        /// The primary's clock when it sent this (microseconds of its own epoch), echoed back
        /// in the acknowledgement so the primary can date the lease it gets.
        stamp: u64,
        operation: Operation,
    },
    /// Primary → standby, when idle: keeps the lease and tells the highest seq sent.
    Heartbeat {
        volume: VolumeId,
        generation: u64,
        incarnation: u64,
        seq_sent: u64,
        stamp: u64,
    },
    /// Standby → primary: every operation up to `applied` is held, up to `durable` is on
    /// stable storage; a read lease of `lease_ms` from when `stamp` was sent.
    Ack {
        volume: VolumeId,
        generation: u64,
        incarnation: u64,
        applied: u64,
        durable: u64,
        stamp: u64,
        lease_ms: u32,
    },
    /// Standby → primary: the answer to an `Operation::Digest` at `seq`.
    Digest {
        volume: VolumeId,
        generation: u64,
        seq: u64,
        region: u64,
        digest: RegionDigest,
    },
    /// Either way: the receiver will not take this stream.
    Refused {
        volume: VolumeId,
        /// The generation of the refused message.
        generation: u64,
        /// The receiver's own generation for this volume (0 when it has none).
        current: u64,
        reason: RefusedReason,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("mirror message truncated: needed {needed} more bytes for {what}")]
    Truncated { what: &'static str, needed: usize },
    #[error("unknown mirror message kind {0}")]
    UnknownKind(u8),
    #[error("unknown mirror operation {0}")]
    UnknownOperation(u8),
    #[error("unknown refusal reason {0}")]
    UnknownReason(u8),
    #[error("unknown block state {0} in a digest")]
    UnknownBlockState(u8),
    #[error("write of {0} bytes is empty, not whole 4 KiB blocks, or over the limit")]
    BadWriteLength(u32),
    #[error("digest of {0} blocks is over the region size")]
    BadDigestLength(u16),
    #[error("{0} bytes after the end of the message")]
    TrailingBytes(usize),
}

impl Message {
    pub fn volume(&self) -> VolumeId {
        match self {
            Message::Operation { volume, .. }
            | Message::Heartbeat { volume, .. }
            | Message::Ack { volume, .. }
            | Message::Digest { volume, .. }
            | Message::Refused { volume, .. } => *volume,
        }
    }

    pub fn generation(&self) -> u64 {
        match self {
            Message::Operation { generation, .. }
            | Message::Heartbeat { generation, .. }
            | Message::Ack { generation, .. }
            | Message::Digest { generation, .. }
            | Message::Refused { generation, .. } => *generation,
        }
    }

    /// Bytes of payload this message carries (what in-flight limits count).
    pub fn payload_bytes(&self) -> usize {
        match self {
            Message::Operation { operation, .. } => operation.payload_bytes(),
            _ => 0,
        }
    }

    pub fn encode(&self) -> Bytes {
        let (head, body) = self.encode_parts();
        if body.is_empty() {
            return head;
        }
        let mut out = BytesMut::with_capacity(head.len() + body.len());
        out.put_slice(&head);
        out.put_slice(&body);
        out.freeze()
    }

    /// The encoding in two pieces, to be sent one after the other: everything but a write's
    /// data, and the data itself (shared, not copied; empty for other messages).
    pub fn encode_parts(&self) -> (Bytes, Bytes) {
        let mut out = BytesMut::with_capacity(64);
        let mut body = Bytes::new();
        let (kind, volume, generation) = match self {
            Message::Operation {
                volume, generation, ..
            } => (1, volume, generation),
            Message::Heartbeat {
                volume, generation, ..
            } => (2, volume, generation),
            Message::Ack {
                volume, generation, ..
            } => (3, volume, generation),
            Message::Digest {
                volume, generation, ..
            } => (4, volume, generation),
            Message::Refused {
                volume, generation, ..
            } => (5, volume, generation),
        };
        out.put_u8(kind);
        out.put_slice(&volume.0);
        out.put_u64_le(*generation);
        match self {
            Message::Operation {
                incarnation,
                seq,
                stamp,
                operation,
                ..
            } => {
                out.put_u64_le(*incarnation);
                out.put_u64_le(*seq);
                out.put_u64_le(*stamp);
                match operation {
                    Operation::Write { first_block, data } => {
                        out.put_u8(1);
                        out.put_u64_le(*first_block);
                        out.put_u32_le(data.len() as u32);
                        body = data.clone();
                    }
                    Operation::Unmap {
                        first_block,
                        block_count,
                    } => {
                        out.put_u8(2);
                        out.put_u64_le(*first_block);
                        out.put_u64_le(*block_count);
                    }
                    Operation::Discard {
                        first_block,
                        block_count,
                    } => {
                        out.put_u8(3);
                        out.put_u64_le(*first_block);
                        out.put_u64_le(*block_count);
                    }
                    Operation::Flush => out.put_u8(4),
                    Operation::Digest { region } => {
                        out.put_u8(5);
                        out.put_u64_le(*region);
                    }
                }
            }
            Message::Heartbeat {
                incarnation,
                seq_sent,
                stamp,
                ..
            } => {
                out.put_u64_le(*incarnation);
                out.put_u64_le(*seq_sent);
                out.put_u64_le(*stamp);
            }
            Message::Ack {
                incarnation,
                applied,
                durable,
                stamp,
                lease_ms,
                ..
            } => {
                out.put_u64_le(*incarnation);
                out.put_u64_le(*applied);
                out.put_u64_le(*durable);
                out.put_u64_le(*stamp);
                out.put_u32_le(*lease_ms);
            }
            Message::Digest {
                seq,
                region,
                digest,
                ..
            } => {
                out.put_u64_le(*seq);
                out.put_u64_le(*region);
                out.put_u16_le(digest.blocks.len() as u16);
                for block in &digest.blocks {
                    match block {
                        BlockDigest::Base => out.put_u8(0),
                        BlockDigest::Layer(hash) => {
                            out.put_u8(1);
                            out.put_slice(hash);
                        }
                        BlockDigest::Unmapped => out.put_u8(2),
                    }
                }
            }
            Message::Refused {
                current, reason, ..
            } => {
                out.put_u64_le(*current);
                out.put_u8(*reason as u8);
            }
        }
        (out.freeze(), body)
    }

    /// Decodes exactly one message. `bytes` is sliced, not copied, for a write's data.
    pub fn decode(mut bytes: Bytes) -> Result<Message, WireError> {
        let kind = take_u8(&mut bytes, "kind")?;
        need(&bytes, 24, "header")?;
        let mut id = [0u8; 16];
        bytes.copy_to_slice(&mut id);
        let volume = VolumeId(id);
        let generation = bytes.get_u64_le();
        let message = match kind {
            1 => {
                need(&bytes, 25, "operation header")?;
                let incarnation = bytes.get_u64_le();
                let seq = bytes.get_u64_le();
                let stamp = bytes.get_u64_le();
                let operation = match bytes.get_u8() {
                    1 => {
                        need(&bytes, 12, "write header")?;
                        let first_block = bytes.get_u64_le();
                        let length = bytes.get_u32_le();
                        let whole = (length as u64).is_multiple_of(LAYER_BLOCK_SIZE_BYTES);
                        if length == 0 || !whole || length as usize > OPERATION_BYTES_MAX {
                            return Err(WireError::BadWriteLength(length));
                        }
                        need(&bytes, length as usize, "write data")?;
                        Operation::Write {
                            first_block,
                            data: bytes.split_to(length as usize),
                        }
                    }
                    op @ (2 | 3) => {
                        need(&bytes, 16, "unmap")?;
                        let first_block = bytes.get_u64_le();
                        let block_count = bytes.get_u64_le();
                        if op == 2 {
                            Operation::Unmap {
                                first_block,
                                block_count,
                            }
                        } else {
                            Operation::Discard {
                                first_block,
                                block_count,
                            }
                        }
                    }
                    4 => Operation::Flush,
                    5 => Operation::Digest {
                        region: take_u64(&mut bytes, "digest region")?,
                    },
                    other => return Err(WireError::UnknownOperation(other)),
                };
                Message::Operation {
                    volume,
                    generation,
                    incarnation,
                    seq,
                    stamp,
                    operation,
                }
            }
            2 => {
                need(&bytes, 24, "heartbeat")?;
                Message::Heartbeat {
                    volume,
                    generation,
                    incarnation: bytes.get_u64_le(),
                    seq_sent: bytes.get_u64_le(),
                    stamp: bytes.get_u64_le(),
                }
            }
            3 => {
                need(&bytes, 36, "ack")?;
                Message::Ack {
                    volume,
                    generation,
                    incarnation: bytes.get_u64_le(),
                    applied: bytes.get_u64_le(),
                    durable: bytes.get_u64_le(),
                    stamp: bytes.get_u64_le(),
                    lease_ms: bytes.get_u32_le(),
                }
            }
            4 => {
                need(&bytes, 18, "digest header")?;
                let seq = bytes.get_u64_le();
                let region = bytes.get_u64_le();
                let count = bytes.get_u16_le();
                if count as u64 > REGION_BLOCKS {
                    return Err(WireError::BadDigestLength(count));
                }
                let mut blocks = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    blocks.push(match take_u8(&mut bytes, "block state")? {
                        0 => BlockDigest::Base,
                        1 => {
                            need(&bytes, 16, "block hash")?;
                            let mut hash = [0u8; 16];
                            bytes.copy_to_slice(&mut hash);
                            BlockDigest::Layer(hash)
                        }
                        2 => BlockDigest::Unmapped,
                        other => return Err(WireError::UnknownBlockState(other)),
                    });
                }
                Message::Digest {
                    volume,
                    generation,
                    seq,
                    region,
                    digest: RegionDigest { blocks },
                }
            }
            5 => {
                let current = take_u64(&mut bytes, "refusal")?;
                let reason = RefusedReason::from_u8(take_u8(&mut bytes, "refusal reason")?)?;
                Message::Refused {
                    volume,
                    generation,
                    current,
                    reason,
                }
            }
            other => return Err(WireError::UnknownKind(other)),
        };
        if !bytes.is_empty() {
            return Err(WireError::TrailingBytes(bytes.len()));
        }
        Ok(message)
    }
}

fn need(bytes: &Bytes, count: usize, what: &'static str) -> Result<(), WireError> {
    match count.checked_sub(bytes.len()) {
        Some(missing) if missing > 0 => Err(WireError::Truncated {
            what,
            needed: missing,
        }),
        _ => Ok(()),
    }
}

fn take_u8(bytes: &mut Bytes, what: &'static str) -> Result<u8, WireError> {
    need(bytes, 1, what)?;
    Ok(bytes.get_u8())
}

fn take_u64(bytes: &mut Bytes, what: &'static str) -> Result<u64, WireError> {
    need(bytes, 8, what)?;
    Ok(bytes.get_u64_le())
}

impl RefusedReason {
    fn from_u8(value: u8) -> Result<RefusedReason, WireError> {
        Ok(match value {
            1 => RefusedReason::Fenced,
            2 => RefusedReason::NotYet,
            3 => RefusedReason::UnknownVolume,
            4 => RefusedReason::Storage,
            5 => RefusedReason::NotPrimary,
            6 => RefusedReason::BadOperation,
            7 => RefusedReason::StreamLost,
            other => return Err(WireError::UnknownReason(other)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn volume() -> VolumeId {
        VolumeId([7; 16])
    }

    fn operation() -> impl Strategy<Value = Operation> {
        prop_oneof![
            (any::<u64>(), 1usize..4, any::<u8>()).prop_map(|(first_block, blocks, byte)| {
                Operation::Write {
                    first_block,
                    data: Bytes::from(vec![byte; blocks * 4096]),
                }
            }),
            (any::<u64>(), any::<u64>()).prop_map(|(first_block, block_count)| {
                Operation::Unmap {
                    first_block,
                    block_count,
                }
            }),
            (any::<u64>(), any::<u64>()).prop_map(|(first_block, block_count)| {
                Operation::Discard {
                    first_block,
                    block_count,
                }
            }),
            Just(Operation::Flush),
            any::<u64>().prop_map(|region| Operation::Digest { region }),
        ]
    }

    fn block_digest() -> impl Strategy<Value = BlockDigest> {
        prop_oneof![
            Just(BlockDigest::Base),
            Just(BlockDigest::Unmapped),
            any::<[u8; 16]>().prop_map(BlockDigest::Layer),
        ]
    }

    fn reason() -> impl Strategy<Value = RefusedReason> {
        (1u8..=7).prop_map(|v| RefusedReason::from_u8(v).expect("valid"))
    }

    fn message() -> impl Strategy<Value = Message> {
        let v = volume();
        prop_oneof![
            (any::<u64>(), any::<u64>(), any::<u64>(), operation()).prop_map(
                move |(generation, seq, stamp, operation)| Message::Operation {
                    volume: v,
                    generation,
                    incarnation: stamp ^ 5,
                    seq,
                    stamp,
                    operation,
                }
            ),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
                move |(generation, seq_sent, stamp)| Message::Heartbeat {
                    volume: v,
                    generation,
                    incarnation: seq_sent ^ 3,
                    seq_sent,
                    stamp,
                }
            ),
            (
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                any::<u32>()
            )
                .prop_map(move |(generation, applied, durable, stamp, lease_ms)| {
                    Message::Ack {
                        volume: v,
                        generation,
                        incarnation: durable ^ 9,
                        applied,
                        durable,
                        stamp,
                        lease_ms,
                    }
                }),
            (
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                proptest::collection::vec(block_digest(), 0..=256)
            )
                .prop_map(move |(generation, seq, region, blocks)| Message::Digest {
                    volume: v,
                    generation,
                    seq,
                    region,
                    digest: RegionDigest { blocks },
                }),
            (any::<u64>(), any::<u64>(), reason()).prop_map(
                move |(generation, current, reason)| Message::Refused {
                    volume: v,
                    generation,
                    current,
                    reason,
                }
            ),
        ]
    }

    proptest! {
        #[test]
        fn every_message_decodes_to_itself(message in message()) {
            prop_assert_eq!(Message::decode(message.encode()), Ok(message));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Message::decode(Bytes::from(bytes));
        }

        #[test]
        fn every_cut_of_a_message_is_an_error(message in message(), cut in any::<prop::sample::Index>()) {
            let encoded = message.encode();
            let at = cut.index(encoded.len());
            prop_assert!(Message::decode(encoded.slice(..at)).is_err());
        }
    }

    #[test]
    fn bad_input_gets_a_clear_error() {
        let check = |bytes: Vec<u8>, expect: WireError| {
            assert_eq!(Message::decode(Bytes::from(bytes)), Err(expect));
        };
        let header = |kind: u8| {
            let mut out = vec![kind];
            out.extend_from_slice(&[0; 24]);
            out
        };
        check(header(9), WireError::UnknownKind(9));
        let mut write = header(1);
        write.extend_from_slice(&[0; 24]);
        write.push(1);
        write.extend_from_slice(&0u64.to_le_bytes());
        write.extend_from_slice(&100u32.to_le_bytes());
        check(write, WireError::BadWriteLength(100));
        let mut refused = header(5);
        refused.extend_from_slice(&0u64.to_le_bytes());
        refused.push(99);
        check(refused, WireError::UnknownReason(99));
        let mut ack = header(3);
        ack.extend_from_slice(&[0; 37]);
        check(ack, WireError::TrailingBytes(1));
    }
}
