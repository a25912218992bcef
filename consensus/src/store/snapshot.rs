//! The snapshot byte format, shared by every state machine.
//!
//! `MAGIC`, then frames (`u32` big-endian length, then the `codec` encoding): one `Header`, then
//! `Header::event_count` frames of one `Event` each, in sequence order from seq 1. A snapshot is
//! the whole history plus the Raft position it corresponds to; the projection is rebuilt from it.

use serde::{Deserialize, Serialize};

use crate::codec;
use crate::domain::{Event, State};
use crate::types::{LogId, StoredMembership};

pub const MAGIC: &[u8; 8] = b"CAIRNSN1";
/// Upper bound on one frame (one event or the header).
pub const FRAME_BYTES_MAX: usize = 16 * 1024 * 1024;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Header {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    pub event_count: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot does not start with the magic bytes")]
    Magic,
    #[error("snapshot truncated at byte {0}")]
    Truncated(usize),
    #[error("snapshot frame of {0} bytes exceeds the limit")]
    FrameTooLarge(usize),
    #[error("snapshot frame at byte {offset} does not decode: {error}")]
    Decode {
        offset: usize,
        error: codec::CodecError,
    },
    #[error("snapshot event {found} out of sequence, expected {expected}")]
    Sequence { expected: u64, found: u64 },
    #[error("snapshot encode failed: {0}")]
    Encode(codec::CodecError),
}

/// Builds snapshot bytes incrementally (the caller streams events from its store).
pub struct Writer {
    bytes: Vec<u8>,
    next_seq: u64,
}

impl Writer {
    pub fn new(header: &Header) -> Result<Writer, SnapshotError> {
        let mut writer = Writer {
            bytes: MAGIC.to_vec(),
            next_seq: 1,
        };
        writer.frame(header)?;
        Ok(writer)
    }

    pub fn push(&mut self, event: &Event) -> Result<(), SnapshotError> {
        if event.seq != self.next_seq {
            return Err(SnapshotError::Sequence {
                expected: self.next_seq,
                found: event.seq,
            });
        }
        self.next_seq += 1;
        self.frame(event)
    }

    pub fn push_encoded(&mut self, seq: u64, encoded_event: &[u8]) -> Result<(), SnapshotError> {
        if seq != self.next_seq {
            return Err(SnapshotError::Sequence {
                expected: self.next_seq,
                found: seq,
            });
        }
        self.next_seq += 1;
        self.raw_frame(encoded_event)
    }

    fn frame<T: Serialize>(&mut self, value: &T) -> Result<(), SnapshotError> {
        let encoded = codec::encode(value).map_err(SnapshotError::Encode)?;
        self.raw_frame(&encoded)
    }

    fn raw_frame(&mut self, encoded: &[u8]) -> Result<(), SnapshotError> {
        if encoded.len() > FRAME_BYTES_MAX {
            return Err(SnapshotError::FrameTooLarge(encoded.len()));
        }
        self.bytes
            .extend_from_slice(&(encoded.len() as u32).to_be_bytes());
        self.bytes.extend_from_slice(encoded);
        Ok(())
    }

    /// Finishes; fails if fewer events were pushed than the header announced.
    pub fn finish(self, header: &Header) -> Result<Vec<u8>, SnapshotError> {
        if self.next_seq - 1 != header.event_count {
            return Err(SnapshotError::Sequence {
                expected: header.event_count + 1,
                found: self.next_seq,
            });
        }
        Ok(self.bytes)
    }
}

/// Parses snapshot bytes: the header, then the events one by one. Never panics on garbage.
pub struct Reader<'a> {
    bytes: &'a [u8],
    offset: usize,
    pub header: Header,
    remaining: u64,
    next_seq: u64,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Result<Reader<'a>, SnapshotError> {
        if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
            return Err(SnapshotError::Magic);
        }
        let mut offset = MAGIC.len();
        let header: Header = read_frame(bytes, &mut offset)?;
        let remaining = header.event_count;
        Ok(Reader {
            bytes,
            offset,
            header,
            remaining,
            next_seq: 1,
        })
    }

    /// The next event, or `None` after the last one (trailing bytes are an error).
    pub fn next_event(&mut self) -> Result<Option<Event>, SnapshotError> {
        if self.remaining == 0 {
            if self.offset != self.bytes.len() {
                return Err(SnapshotError::Truncated(self.offset));
            }
            return Ok(None);
        }
        let event: Event = read_frame(self.bytes, &mut self.offset)?;
        if event.seq != self.next_seq {
            return Err(SnapshotError::Sequence {
                expected: self.next_seq,
                found: event.seq,
            });
        }
        self.next_seq += 1;
        self.remaining -= 1;
        Ok(Some(event))
    }
}

fn read_frame<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    offset: &mut usize,
) -> Result<T, SnapshotError> {
    let start = *offset;
    let len_bytes = bytes
        .get(start..start + 4)
        .ok_or(SnapshotError::Truncated(start))?;
    let len = u32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]) as usize;
    if len > FRAME_BYTES_MAX {
        return Err(SnapshotError::FrameTooLarge(len));
    }
    let body = bytes
        .get(start + 4..start + 4 + len)
        .ok_or(SnapshotError::Truncated(start))?;
    let value = codec::decode(body).map_err(|error| SnapshotError::Decode {
        offset: start,
        error,
    })?;
    *offset = start + 4 + len;
    Ok(value)
}

/// Reads a whole snapshot into (header, events, rebuilt state).
pub fn read_all(bytes: &[u8]) -> Result<(Header, Vec<Event>, State), SnapshotError> {
    let mut reader = Reader::new(bytes)?;
    let mut events = Vec::with_capacity(reader.header.event_count.min(1 << 20) as usize);
    let mut state = State::default();
    while let Some(event) = reader.next_event()? {
        state.apply_event(&event);
        events.push(event);
    }
    Ok((reader.header.clone(), events, state))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn reader_never_panics(bytes: Vec<u8>) {
            let mut with_magic = MAGIC.to_vec();
            with_magic.extend_from_slice(&bytes);
            for input in [&bytes[..], &with_magic[..]] {
                if let Ok(mut reader) = Reader::new(input) {
                    for _ in 0..64 {
                        match reader.next_event() { Ok(Some(_)) => {}, _ => break }
                    }
                }
            }
        }
    }

    proptest! {
        #[test]
        fn snapshot_round_trips(descriptions in proptest::collection::vec("[a-z ]{0,40}", 0..40)) {
            let actor = crate::domain::Name::new("admin").unwrap();
            let mut state = State::default();
            let mut events = Vec::new();
            for (n, description) in descriptions.iter().enumerate() {
                let event = Event {
                    seq: n as u64 + 1,
                    time_ms: 1_700_000_000_000 + n as i64,
                    actor: actor.clone(),
                    payload: crate::domain::EventPayload::ImageCreated {
                        name: crate::domain::Name::new(format!("image-{n}")).unwrap(),
                        description: description.clone(),
                    },
                };
                state.apply_event(&event);
                events.push(event);
            }
            let header = Header { last_applied: None, membership: Default::default(), event_count: events.len() as u64 };
            let mut writer = Writer::new(&header).unwrap();
            for event in &events {
                writer.push(event).unwrap();
            }
            let bytes = writer.finish(&header).unwrap();
            let (back, back_events, back_state) = read_all(&bytes).unwrap();
            prop_assert_eq!(back.event_count, events.len() as u64);
            prop_assert_eq!(back_events, events);
            prop_assert_eq!(back_state.hash(), state.hash());
            // Any truncation is detected, never a panic.
            if bytes.len() > MAGIC.len() {
                prop_assert!(read_all(&bytes[..bytes.len() - 1]).is_err());
            }
        }
    }

    #[test]
    fn empty_snapshot_round_trips() {
        let header = Header {
            last_applied: None,
            membership: Default::default(),
            event_count: 0,
        };
        let bytes = Writer::new(&header).unwrap().finish(&header).unwrap();
        let (back, events, state) = read_all(&bytes).unwrap();
        assert_eq!(back.event_count, 0);
        assert!(events.is_empty());
        assert_eq!(state, State::default());
    }
}
