//! The one place that knows the binary encoding of everything Cairn stores or sends between nodes.
//!
//! bincode 2 (pinned `=2.0.1`) through serde, with the standard configuration: little-endian,
//! variable-length integers. Every other module calls `encode` / `decode` and never names bincode,
//! so the encoding can change in one place. Decoding is bounded (`LIMIT_BYTES`) so a hostile or
//! corrupt length prefix cannot make us allocate without bound.

use serde::{de::DeserializeOwned, Serialize};

/// Upper bound on one decoded value. Snapshots are streamed in chunks, so no single message needs
/// more than this.
pub const LIMIT_BYTES: usize = 256 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("encode failed: {0}")]
    Encode(String),
    #[error("decode failed: {0}")]
    Decode(String),
    #[error("decode left {0} trailing bytes")]
    Trailing(usize),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<LIMIT_BYTES>()
}

pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| CodecError::Encode(e.to_string()))
}

/// Appends the encoding of `value` to `out`.
pub fn encode_into<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let bytes = encode(value)?;
    out.extend_from_slice(&bytes);
    Ok(())
}

/// Decodes exactly one value; trailing bytes are an error (they mean a framing bug or corruption).
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (value, used) = bincode::serde::decode_from_slice(bytes, config())
        .map_err(|e| CodecError::Decode(e.to_string()))?;
    if used != bytes.len() {
        return Err(CodecError::Trailing(bytes.len() - used));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(values: Vec<(u64, String, Option<i32>)>) {
            let bytes = encode(&values).unwrap();
            let back: Vec<(u64, String, Option<i32>)> = decode(&bytes).unwrap();
            prop_assert_eq!(back, values);
        }

        #[test]
        fn decode_never_panics(bytes: Vec<u8>) {
            let _ = decode::<Vec<(u64, String, Option<i32>)>>(&bytes);
        }
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = encode(&7u64).unwrap();
        bytes.push(0);
        assert!(matches!(
            decode::<u64>(&bytes),
            Err(CodecError::Trailing(1))
        ));
    }
}
