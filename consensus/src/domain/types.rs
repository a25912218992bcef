//! Small validated value types used by commands, events and the state.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::Rejection;

pub type NodeId = u64;
/// Position of an event in the whole history, starting at 1.
pub type Seq = u64;
/// Milliseconds since the Unix epoch, read from the leader's clock when it proposed the command.
pub type TimeMs = i64;

/// A BLAKE3 hash (image manifests, token digests, state hashes).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hash32(pub [u8; 32]);

impl Hash32 {
    pub fn of(bytes: &[u8]) -> Hash32 {
        Hash32(*blake3::hash(bytes).as_bytes())
    }
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Hash32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Hash32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash32({})", self.to_hex())
    }
}

impl FromStr for Hash32 {
    type Err = Rejection;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes)
            .map_err(|_| Rejection::invalid("hash", format!("{text:?} is not 64 hex digits")))?;
        Ok(Hash32(bytes))
    }
}

impl Serialize for Hash32 {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.serialize_str(&self.to_hex())
        } else {
            self.0.serialize(serializer)
        }
    }
}

impl<'de> Deserialize<'de> for Hash32 {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let text = String::deserialize(deserializer)?;
            text.parse().map_err(serde::de::Error::custom)
        } else {
            Ok(Hash32(<[u8; 32]>::deserialize(deserializer)?))
        }
    }
}

/// An Ethernet MAC address. Text form: six lowercase hex pairs joined by `:`; parsing also takes
/// `-` as separator and uppercase digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// Lowercase hex without separators, as used in target names.
    pub fn to_compact(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Mac({self})")
    }
}

impl FromStr for Mac {
    type Err = Rejection;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || {
            Rejection::invalid(
                "mac",
                format!("{text:?} is not a MAC address like 52:54:00:12:34:56"),
            )
        };
        let parts: Vec<&str> = text.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(invalid());
        }
        let mut bytes = [0u8; 6];
        for (byte, part) in bytes.iter_mut().zip(parts) {
            // `from_str_radix` alone would take "+f".
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| invalid())?;
        }
        Ok(Mac(bytes))
    }
}

impl Serialize for Mac {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_str(self)
        } else {
            self.0.serialize(serializer)
        }
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let text = String::deserialize(deserializer)?;
            text.parse().map_err(serde::de::Error::custom)
        } else {
            Ok(Mac(<[u8; 6]>::deserialize(deserializer)?))
        }
    }
}

/// The name of a client, image, user, group, token or node: 1 to 63 characters, ASCII letters,
/// digits, `-`, `_` and `.`, starting with a letter or digit. Names appear in iSCSI target names,
/// iPXE scripts and file paths, so the alphabet is deliberately small.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(String);

impl Name {
    pub const LENGTH_MAX: usize = 63;

    pub fn new(text: impl Into<String>) -> Result<Name, Rejection> {
        let text = text.into();
        let valid_start = text
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric());
        let valid_chars = text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if text.is_empty() || text.len() > Self::LENGTH_MAX || !valid_start || !valid_chars {
            return Err(Rejection::invalid(
                "name",
                format!(
                    "{text:?} must be 1 to {} characters of letters, digits, '-', '_' or '.', starting with a letter or digit",
                    Self::LENGTH_MAX
                ),
            ));
        }
        Ok(Name(text))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Name {
    type Error = Rejection;
    fn try_from(text: String) -> Result<Self, Self::Error> {
        Name::new(text)
    }
}

impl From<Name> for String {
    fn from(name: Name) -> String {
        name.0
    }
}

impl FromStr for Name {
    type Err = Rejection;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Name::new(text)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_text_round_trip() {
        let mac: Mac = "52:54:00:AB:cd:0F".parse().unwrap();
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:0f");
        assert_eq!("52-54-00-ab-cd-0f".parse::<Mac>().unwrap(), mac);
        assert_eq!(mac.to_compact(), "525400abcd0f");
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:11",
            "5:54:00:ab:cd:0f",
            "zz:54:00:ab:cd:0f",
            "52:54:00:ab:cd:+f",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn names_are_checked() {
        for good in ["a", "lab-01", "Win11_base.v2", &"x".repeat(63)] {
            assert!(Name::new(good).is_ok(), "{good:?} refused");
        }
        for bad in ["", "-a", ".hidden", "a b", "a/b", "ä", &"x".repeat(64)] {
            assert!(Name::new(bad).is_err(), "{bad:?} accepted");
        }
        assert!(serde_json::from_str::<Name>("\"a/b\"").is_err());
    }

    #[test]
    fn binary_and_json_forms() {
        let mac: Mac = "52:54:00:00:00:01".parse().unwrap();
        assert_eq!(
            serde_json::to_string(&mac).unwrap(),
            "\"52:54:00:00:00:01\""
        );
        let bytes = crate::codec::encode(&mac).unwrap();
        assert_eq!(crate::codec::decode::<Mac>(&bytes).unwrap(), mac);
        let hash = Hash32::of(b"x");
        let json = serde_json::to_string(&hash).unwrap();
        assert_eq!(serde_json::from_str::<Hash32>(&json).unwrap(), hash);
    }
}
