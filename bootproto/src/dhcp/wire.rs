//! DHCP wire format: a strict pre-pass in front of `dhcproto`.
//!
//! `dhcproto` trusts option lengths in places (it asserts on some, subtracts from others and
//! slices with the header's `hlen`), so raw peer bytes never reach it. [`parse`] first walks the
//! option list itself, keeps only the options the server uses, checks each one's length for its
//! type, concatenates split long options (RFC 3396), and rebuilds a clean datagram for
//! `dhcproto` to decode. Anything else (options we do not read, option overload, relay agent
//! information) is dropped, not echoed.

use dhcproto::v4;
use dhcproto::Decodable;

/// Fixed BOOTP header up to and including the magic cookie.
pub const HEADER_LEN: usize = 240;
const MAGIC: [u8; 4] = [99, 130, 83, 99];

/// Why a datagram is not a DHCP message we accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DhcpParseError {
    #[error("datagram of {0} bytes is shorter than the 240-byte dhcp header")]
    Short(usize),
    #[error("bad magic cookie {0:02x?}")]
    Magic([u8; 4]),
    #[error("hardware type {htype} length {hlen} is not ethernet")]
    NotEthernet { htype: u8, hlen: u8 },
    #[error("option {code} runs past the end of the datagram")]
    Truncated { code: u8 },
    #[error("option {code} has invalid length {len}")]
    OptionLength { code: u8, len: usize },
    #[error("dhcproto rejected the message: {0}")]
    Decode(String),
}

/// Options kept, and the lengths they must have.
fn length_ok(code: u8, len: usize) -> Option<bool> {
    Some(match code {
        53 => len == 1,                 // message type
        50 | 54 | 51 => len == 4,       // requested ip, server id, lease time
        57 => len == 2,                 // maximum message size
        93 => len >= 2 && len & 1 == 0, // client architectures (first one is used)
        12 => (1..=255).contains(&len), // host name
        60 | 77 | 55 | 97 => (1..=255).contains(&len),
        61 => (2..=255).contains(&len), // client identifier
        175 => len <= 255,              // iPXE encapsulated options (presence only)
        _ => return None,
    })
}

/// Parses a DHCPv4 datagram from a peer. Never panics.
pub fn parse(bytes: &[u8]) -> Result<v4::Message, DhcpParseError> {
    let clean = sanitize(bytes)?;
    v4::Message::from_bytes(&clean).map_err(|e| DhcpParseError::Decode(e.to_string()))
}

/// The checked and rebuilt datagram that [`parse`] hands to `dhcproto`.
pub fn sanitize(bytes: &[u8]) -> Result<Vec<u8>, DhcpParseError> {
    if bytes.len() < HEADER_LEN {
        return Err(DhcpParseError::Short(bytes.len()));
    }
    let magic = [bytes[236], bytes[237], bytes[238], bytes[239]];
    if magic != MAGIC {
        return Err(DhcpParseError::Magic(magic));
    }
    let (htype, hlen) = (bytes[1], bytes[2]);
    if htype != 1 || hlen != 6 {
        return Err(DhcpParseError::NotEthernet { htype, hlen });
    }
    // code -> concatenated data, in first-seen order.
    let mut options: Vec<(u8, Vec<u8>)> = Vec::new();
    let mut at = HEADER_LEN;
    while at < bytes.len() {
        let code = bytes[at];
        match code {
            0 => {
                at += 1;
                continue;
            }
            255 => break,
            _ => {}
        }
        let Some(&len) = bytes.get(at + 1) else {
            return Err(DhcpParseError::Truncated { code });
        };
        let start = at + 2;
        let end = start + usize::from(len);
        let Some(data) = bytes.get(start..end) else {
            return Err(DhcpParseError::Truncated { code });
        };
        at = end;
        if length_ok(code, 1).is_none() {
            continue;
        }
        match options.iter_mut().find(|(c, _)| *c == code) {
            Some((_, existing)) => existing.extend_from_slice(data),
            None => options.push((code, data.to_vec())),
        }
    }
    let mut clean = Vec::with_capacity(bytes.len().min(1024));
    clean.extend_from_slice(&bytes[..HEADER_LEN]);
    for (code, mut data) in options {
        if length_ok(code, data.len()) != Some(true) {
            return Err(DhcpParseError::OptionLength {
                code,
                len: data.len(),
            });
        }
        if code == 93 {
            data.truncate(2);
        }
        clean.push(code);
        clean.push(data.len() as u8);
        clean.extend_from_slice(&data);
    }
    clean.push(255);
    Ok(clean)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dhcproto::v4::{DhcpOption, MessageType, OptionCode};
    use dhcproto::Encodable;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    fn discover() -> v4::Message {
        let mut m = v4::Message::new_with_id(
            7,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::new(10, 1, 0, 1),
            &[2, 0, 0, 0, 0, 1],
        );
        let opts = m.opts_mut();
        opts.insert(DhcpOption::MessageType(MessageType::Discover));
        opts.insert(DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 0, 0, 5)));
        opts.insert(DhcpOption::Hostname("client-1".into()));
        opts.insert(DhcpOption::ClientSystemArchitecture(v4::Architecture(7)));
        opts.insert(DhcpOption::ClassIdentifier(
            b"PXEClient:Arch:00007".to_vec(),
        ));
        opts.insert(DhcpOption::UserClass(b"iPXE".to_vec()));
        opts.insert(DhcpOption::ParameterRequestList(vec![
            OptionCode::SubnetMask,
            OptionCode::BootfileName,
        ]));
        m
    }

    #[test]
    fn kept_options_round_trip() {
        let m = discover();
        let parsed = parse(&m.to_vec().unwrap()).unwrap();
        assert_eq!(parsed, m);
    }

    #[test]
    fn wrong_lengths_and_truncation_are_rejected() {
        let mut bytes = discover().to_vec().unwrap();
        let end = bytes.iter().rposition(|b| *b == 255).unwrap();
        bytes.truncate(end);
        let with = |extra: &[u8]| {
            let mut b = bytes.clone();
            b.extend_from_slice(extra);
            parse(&b)
        };
        assert_eq!(
            with(&[51, 3, 0, 0, 1, 255]),
            Err(DhcpParseError::OptionLength { code: 51, len: 3 })
        );
        assert_eq!(
            with(&[12, 9, b'x']),
            Err(DhcpParseError::Truncated { code: 12 })
        );
        assert!(
            with(&[81, 0, 255]).is_ok(),
            "an option we do not read is dropped, not decoded"
        );
        assert_eq!(parse(&[0u8; 100]), Err(DhcpParseError::Short(100)));
        let split = with(&[12, 2, b'a', b'b', 12, 1, b'c', 255]).unwrap();
        assert_eq!(
            split.opts().get(OptionCode::Hostname),
            Some(&DhcpOption::Hostname("client-1abc".into()))
        );
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn never_panics_after_a_valid_header(tail in proptest::collection::vec(any::<u8>(), 0..400)) {
            let mut bytes = discover().to_vec().unwrap();
            bytes.truncate(HEADER_LEN);
            bytes.extend_from_slice(&tail);
            let _ = parse(&bytes);
        }

        #[test]
        fn encode_decode_round_trip(xid in any::<u32>(), mac in any::<[u8; 6]>(), ip in any::<u32>(), name in "[a-z0-9-]{1,40}", arch in any::<u16>()) {
            let mut m = v4::Message::new_with_id(xid, Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, Ipv4Addr::from(ip), &mac);
            m.opts_mut().insert(DhcpOption::MessageType(MessageType::Request));
            m.opts_mut().insert(DhcpOption::RequestedIpAddress(Ipv4Addr::from(ip)));
            m.opts_mut().insert(DhcpOption::Hostname(name));
            m.opts_mut().insert(DhcpOption::ClientSystemArchitecture(v4::Architecture(arch)));
            let parsed = parse(&m.to_vec().unwrap()).unwrap();
            prop_assert_eq!(parsed, m);
        }
    }
}
