//! TFTP packets (RFC 1350) with option extension (RFC 2347) and OACK: parse and encode.

/// TFTP error codes (RFC 1350, RFC 2347).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    NotDefined = 0,
    FileNotFound = 1,
    AccessViolation = 2,
    DiskFull = 3,
    IllegalOperation = 4,
    UnknownTransferId = 5,
    FileExists = 6,
    NoSuchUser = 7,
    OptionRefused = 8,
}

/// One TFTP packet. Options keep the order they were sent in; names are lowercased on parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Rrq {
        filename: String,
        mode: String,
        options: Vec<(String, String)>,
    },
    Wrq {
        filename: String,
        mode: String,
        options: Vec<(String, String)>,
    },
    Data {
        block: u16,
        data: Vec<u8>,
    },
    Ack {
        block: u16,
    },
    Error {
        code: u16,
        message: String,
    },
    Oack {
        options: Vec<(String, String)>,
    },
}

/// Why bytes are not a TFTP packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TftpParseError {
    #[error("packet of {0} bytes is too short")]
    Short(usize),
    #[error("unknown opcode {0}")]
    Opcode(u16),
    #[error("string field not terminated by nul")]
    Unterminated,
    #[error("string field is not utf-8")]
    NotUtf8,
    #[error("option {0:?} has no value")]
    OptionWithoutValue(String),
    #[error("{0} options, above the limit of 16")]
    TooManyOptions(usize),
}

const OPTIONS_MAX: usize = 16;

/// Parses one datagram. Never panics.
pub fn parse(bytes: &[u8]) -> Result<Packet, TftpParseError> {
    if bytes.len() < 2 {
        return Err(TftpParseError::Short(bytes.len()));
    }
    let opcode = u16::from_be_bytes([bytes[0], bytes[1]]);
    let body = &bytes[2..];
    let block = || -> Result<u16, TftpParseError> {
        match body {
            [a, b, ..] => Ok(u16::from_be_bytes([*a, *b])),
            _ => Err(TftpParseError::Short(bytes.len())),
        }
    };
    Ok(match opcode {
        1 | 2 => {
            let mut fields = Strings(body);
            let filename = fields.next_string()?;
            let mode = fields.next_string()?.to_ascii_lowercase();
            let options = parse_options(fields)?;
            if opcode == 1 {
                Packet::Rrq {
                    filename,
                    mode,
                    options,
                }
            } else {
                Packet::Wrq {
                    filename,
                    mode,
                    options,
                }
            }
        }
        3 => Packet::Data {
            block: block()?,
            data: body[2..].to_vec(),
        },
        4 => Packet::Ack { block: block()? },
        5 => {
            let code = block()?;
            // Some peers omit the terminating nul or send other encodings: keep what is there,
            // up to the first nul, lossily decoded.
            let text = &body[2..];
            let end = text.iter().position(|b| *b == 0).unwrap_or(text.len());
            let message = String::from_utf8_lossy(&text[..end]).into_owned();
            Packet::Error { code, message }
        }
        6 => Packet::Oack {
            options: parse_options(Strings(body))?,
        },
        other => return Err(TftpParseError::Opcode(other)),
    })
}

fn parse_options(mut fields: Strings<'_>) -> Result<Vec<(String, String)>, TftpParseError> {
    let mut options = Vec::new();
    while !fields.0.is_empty() {
        let name = fields.next_string()?.to_ascii_lowercase();
        let value = fields
            .next_string()
            .map_err(|_| TftpParseError::OptionWithoutValue(name.clone()))?;
        options.push((name, value));
        if options.len() > OPTIONS_MAX {
            return Err(TftpParseError::TooManyOptions(options.len()));
        }
    }
    Ok(options)
}

struct Strings<'a>(&'a [u8]);

impl Strings<'_> {
    fn next_string(&mut self) -> Result<String, TftpParseError> {
        let end = self
            .0
            .iter()
            .position(|b| *b == 0)
            .ok_or(TftpParseError::Unterminated)?;
        let text = std::str::from_utf8(&self.0[..end])
            .map_err(|_| TftpParseError::NotUtf8)?
            .to_owned();
        self.0 = &self.0[end + 1..];
        Ok(text)
    }
}

/// Encodes a packet.
pub fn encode(packet: &Packet) -> Vec<u8> {
    let mut out = Vec::new();
    let push_str = |out: &mut Vec<u8>, s: &str| {
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    };
    match packet {
        Packet::Rrq {
            filename,
            mode,
            options,
        }
        | Packet::Wrq {
            filename,
            mode,
            options,
        } => {
            out.extend_from_slice(
                &(if matches!(packet, Packet::Rrq { .. }) {
                    1u16
                } else {
                    2
                })
                .to_be_bytes(),
            );
            push_str(&mut out, filename);
            push_str(&mut out, mode);
            for (name, value) in options {
                push_str(&mut out, name);
                push_str(&mut out, value);
            }
        }
        Packet::Data { block, data } => {
            out.extend_from_slice(&3u16.to_be_bytes());
            out.extend_from_slice(&block.to_be_bytes());
            out.extend_from_slice(data);
        }
        Packet::Ack { block } => {
            out.extend_from_slice(&4u16.to_be_bytes());
            out.extend_from_slice(&block.to_be_bytes());
        }
        Packet::Error { code, message } => {
            out.extend_from_slice(&5u16.to_be_bytes());
            out.extend_from_slice(&code.to_be_bytes());
            push_str(&mut out, message);
        }
        Packet::Oack { options } => {
            out.extend_from_slice(&6u16.to_be_bytes());
            for (name, value) in options {
                push_str(&mut out, name);
                push_str(&mut out, value);
            }
        }
    }
    out
}

/// An ERROR packet.
pub fn error(code: ErrorCode, message: &str) -> Vec<u8> {
    encode(&Packet::Error {
        code: code as u16,
        message: message.to_owned(),
    })
}

/// The header of a DATA packet for `block`, followed by the caller's data.
pub fn data_header(block: u16) -> [u8; 4] {
    let b = block.to_be_bytes();
    [0, 3, b[0], b[1]]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_packets() {
        let rrq = b"\x00\x01undionly.kpxe\x00octet\x00blksize\x001468\x00TSIZE\x000\x00";
        assert_eq!(
            parse(rrq),
            Ok(Packet::Rrq {
                filename: "undionly.kpxe".into(),
                mode: "octet".into(),
                options: vec![
                    ("blksize".into(), "1468".into()),
                    ("tsize".into(), "0".into())
                ],
            })
        );
        assert_eq!(parse(b"\x00\x09"), Err(TftpParseError::Opcode(9)));
        assert_eq!(parse(b"\x00\x01name"), Err(TftpParseError::Unterminated));
        assert_eq!(parse(b"\x00\x04\x01"), Err(TftpParseError::Short(3)));
        assert_eq!(
            parse(b"\x00\x05\x00\x01oops"),
            Ok(Packet::Error {
                code: 1,
                message: "oops".into()
            })
        );
    }

    fn text() -> impl Strategy<Value = String> {
        "[a-z0-9./_-]{0,20}"
    }

    fn packet() -> impl Strategy<Value = Packet> {
        let options = proptest::collection::vec(("[a-z]{1,8}", "[0-9]{1,5}"), 0..4);
        prop_oneof![
            ("[a-z0-9./_-]{1,20}", "octet|netascii", options.clone()).prop_map(
                |(filename, mode, options)| Packet::Rrq {
                    filename,
                    mode,
                    options
                }
            ),
            ("[a-z0-9./_-]{1,20}", "octet|netascii", options.clone()).prop_map(
                |(filename, mode, options)| Packet::Wrq {
                    filename,
                    mode,
                    options
                }
            ),
            (any::<u16>(), proptest::collection::vec(any::<u8>(), 0..600))
                .prop_map(|(block, data)| Packet::Data { block, data }),
            any::<u16>().prop_map(|block| Packet::Ack { block }),
            (0u16..9, text()).prop_map(|(code, message)| Packet::Error { code, message }),
            options.prop_map(|options| Packet::Oack { options }),
        ]
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn round_trip(p in packet()) {
            prop_assert_eq!(parse(&encode(&p)), Ok(p));
        }

        /// Whatever parses re-encodes to something that parses to the same packet.
        #[test]
        fn parsed_packets_re_encode(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            if let Ok(p) = parse(&bytes) {
                prop_assert_eq!(parse(&encode(&p)), Ok(p));
            }
        }
    }
}
