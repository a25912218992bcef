//! CHAP with MD5 (RFC 1994, RFC 7143 12.1.3): response = MD5(identifier || secret || challenge).
//! Binary values travel as `0x` hex or `0b` base64.

use md5::{Digest, Md5};

/// A CHAP user name and secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chap {
    pub user: String,
    pub secret: String,
}

/// The smallest secret RFC 7143 (12.1.3) asks for: 96 bits.
pub const SECRET_LEN_MIN: usize = 12;

pub fn response(identifier: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([identifier]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

pub fn encode_hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 + bytes.len() * 2);
    s.push_str("0x");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Decodes a `0x` hex or `0b` base64 binary value; `None` on malformed input.
pub fn decode_binary(value: &str) -> Option<Vec<u8>> {
    if let Some(hex) = value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        let hex = hex.as_bytes();
        // An odd number of digits has an implied leading zero.
        let mut out = Vec::with_capacity(hex.len() / 2 + 1);
        let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        let mut i = 0;
        if hex.len() % 2 == 1 {
            out.push(digit(hex[0])?);
            i = 1;
        }
        while i < hex.len() {
            out.push(digit(hex[i])? << 4 | digit(hex[i + 1])?);
            i += 2;
        }
        if out.is_empty() {
            return None;
        }
        Some(out)
    } else if let Some(b64) = value
        .strip_prefix("0b")
        .or_else(|| value.strip_prefix("0B"))
    {
        decode_base64(b64)
    } else {
        None
    }
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return None,
        } as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    if out.is_empty() {
        None
    } else {
        Some(out)
    }
}

/// Constant-time comparison of two responses.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_hex_and_base64() {
        assert_eq!(decode_binary("0x0102ff").unwrap(), vec![1, 2, 255]);
        assert_eq!(decode_binary("0x102").unwrap(), vec![1, 2]);
        assert_eq!(decode_binary("0bAQL/").unwrap(), vec![1, 2, 255]);
        assert!(decode_binary("0xzz").is_none());
        assert!(decode_binary("12").is_none());
        assert!(decode_binary("0x").is_none());
    }

    #[test]
    fn md5_response_matches_known_value() {
        // MD5(0x01 || "secret" || 0x0203): computed independently.
        let r = response(1, b"secret", &[2, 3]);
        let mut h = Md5::new();
        h.update([1u8, b's', b'e', b'c', b'r', b'e', b't', 2, 3]);
        let want: [u8; 16] = h.finalize().into();
        assert_eq!(r, want);
    }
}
