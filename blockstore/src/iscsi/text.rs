//! Login and text key=value negotiation (RFC 7143 section 6 and 13).
//!
//! [`parse_pairs`] reads the NUL-separated `key=value` list of a data segment; [`Negotiation`]
//! answers the operational keys with the result functions the RFC gives (minimum, maximum,
//! AND, OR, list choice) and records the outcome in [`SessionParams`].

/// Operational parameters of a session after negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionParams {
    pub header_digest: bool,
    pub data_digest: bool,
    /// The most data the initiator accepts in one PDU from us.
    pub initiator_max_recv_data_segment_length: u32,
    /// The most data we accept in one PDU (declared by us).
    pub target_max_recv_data_segment_length: u32,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub first_burst_length: u32,
    pub max_burst_length: u32,
    pub max_outstanding_r2t: u32,
    pub default_time2wait: u32,
    pub default_time2retain: u32,
    pub error_recovery_level: u32,
}

impl Default for SessionParams {
    fn default() -> Self {
        SessionParams {
            header_digest: false,
            data_digest: false,
            initiator_max_recv_data_segment_length: 8192,
            target_max_recv_data_segment_length: TARGET_MAX_RECV_DATA_SEGMENT_LENGTH,
            initial_r2t: true,
            immediate_data: true,
            first_burst_length: 65536,
            max_burst_length: 262144,
            max_outstanding_r2t: 1,
            default_time2wait: 2,
            default_time2retain: 20,
            error_recovery_level: 0,
        }
    }
}

/// Our MaxRecvDataSegmentLength.
pub const TARGET_MAX_RECV_DATA_SEGMENT_LENGTH: u32 = 262144;
/// Our MaxBurstLength and FirstBurstLength offers.
pub const TARGET_MAX_BURST_LENGTH: u32 = 1 << 20;
pub const TARGET_FIRST_BURST_LENGTH: u32 = 262144;
/// Keys longer than this, or a text segment with more pairs, are refused (bounded memory).
pub const KEY_LEN_MAX: usize = 63;
pub const VALUE_LEN_MAX: usize = 8192;
pub const PAIRS_MAX: usize = 128;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TextError {
    #[error("text pair without '=': {0:?}")]
    NoEquals(String),
    #[error("key {0:?} is empty, too long or has bad characters")]
    BadKey(String),
    #[error("value of {0:?} is too long")]
    ValueTooLong(String),
    #[error("key {0:?} appears twice")]
    Duplicate(String),
    #[error("more than {PAIRS_MAX} pairs")]
    TooMany,
    #[error("text is not utf-8")]
    NotUtf8,
}

/// Parses `key=value\0key=value\0...`. Trailing NULs and a missing final NUL are accepted.
pub fn parse_pairs(data: &[u8]) -> Result<Vec<(String, String)>, TextError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for item in data.split(|b| *b == 0) {
        if item.is_empty() {
            continue;
        }
        let text = std::str::from_utf8(item).map_err(|_| TextError::NotUtf8)?;
        let (key, value) = text
            .split_once('=')
            .ok_or_else(|| TextError::NoEquals(text.chars().take(64).collect()))?;
        if key.is_empty()
            || key.len() > KEY_LEN_MAX
            || !key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+' | '@' | '_'))
        {
            return Err(TextError::BadKey(key.chars().take(64).collect()));
        }
        if value.len() > VALUE_LEN_MAX {
            return Err(TextError::ValueTooLong(key.to_string()));
        }
        if out.iter().any(|(k, _)| k == key) {
            return Err(TextError::Duplicate(key.to_string()));
        }
        if out.len() >= PAIRS_MAX {
            return Err(TextError::TooMany);
        }
        out.push((key.to_string(), value.to_string()));
    }
    Ok(out)
}

/// Appends `key=value\0`.
pub fn push_pair(out: &mut Vec<u8>, key: &str, value: &str) {
    out.extend_from_slice(key.as_bytes());
    out.push(b'=');
    out.extend_from_slice(value.as_bytes());
    out.push(0);
}

fn parse_number(value: &str) -> Option<u64> {
    if let Some(hex) = value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        u64::from_str_radix(hex, 16).ok()
    } else {
        value.parse().ok()
    }
}

fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "Yes"
    } else {
        "No"
    }
}

/// Keys that belong to login only (declarations and security), which the operational
/// negotiator leaves to the login state machine.
pub fn is_login_key(key: &str) -> bool {
    matches!(
        key,
        "InitiatorName"
            | "InitiatorAlias"
            | "TargetName"
            | "SessionType"
            | "AuthMethod"
            | "TargetAlias"
            | "TargetAddress"
            | "TargetPortalGroupTag"
    ) || key.starts_with("CHAP_")
}

/// Answers operational keys. Keeps what was negotiated so far across login PDUs.
#[derive(Debug, Clone, Default)]
pub struct Negotiation {
    pub params: SessionParams,
    /// Keys the initiator offered, so FirstBurstLength can be checked against MaxBurstLength.
    offered: Vec<String>,
    /// Whether our MaxRecvDataSegmentLength was declared already.
    declared_mrdsl: bool,
}

impl Negotiation {
    /// Answers one operational key. Returns the response pair to send, or `None` when the key
    /// is a declaration that needs no answer. `discovery` limits the keys that make sense.
    pub fn answer(&mut self, key: &str, value: &str, discovery: bool) -> Option<(String, String)> {
        let p = &mut self.params;
        self.offered.push(key.to_string());
        let reply = |v: &str| Some((key.to_string(), v.to_string()));
        let number = |lo: u64, hi: u64| parse_number(value).filter(|n| (lo..=hi).contains(n));
        match key {
            "HeaderDigest" | "DataDigest" => {
                let choice = value.split(',').find(|v| *v == "CRC32C" || *v == "None");
                match choice {
                    Some(c) => {
                        let on = c == "CRC32C";
                        if key == "HeaderDigest" {
                            p.header_digest = on;
                        } else {
                            p.data_digest = on;
                        }
                        reply(c)
                    }
                    None => reply("Reject"),
                }
            }
            "MaxRecvDataSegmentLength" => match number(512, (1 << 24) - 1) {
                Some(n) => {
                    p.initiator_max_recv_data_segment_length = n as u32;
                    if self.declared_mrdsl {
                        None
                    } else {
                        self.declared_mrdsl = true;
                        Some((
                            key.to_string(),
                            p.target_max_recv_data_segment_length.to_string(),
                        ))
                    }
                }
                None => reply("Reject"),
            },
            "InitialR2T" => match parse_bool(value) {
                // Result function OR; we would say No, so the initiator's value wins.
                Some(b) if !discovery => {
                    p.initial_r2t = b;
                    reply(yes_no(b))
                }
                Some(_) => reply("Irrelevant"),
                None => reply("Reject"),
            },
            "ImmediateData" => match parse_bool(value) {
                // Result function AND; we would say Yes.
                Some(b) if !discovery => {
                    p.immediate_data = b;
                    reply(yes_no(b))
                }
                Some(_) => reply("Irrelevant"),
                None => reply("Reject"),
            },
            "MaxBurstLength" => match number(512, (1 << 24) - 1) {
                Some(n) if !discovery => {
                    p.max_burst_length = (n as u32).min(TARGET_MAX_BURST_LENGTH);
                    if p.first_burst_length > p.max_burst_length {
                        p.first_burst_length = p.max_burst_length;
                    }
                    Some((key.to_string(), p.max_burst_length.to_string()))
                }
                Some(_) => reply("Irrelevant"),
                None => reply("Reject"),
            },
            "FirstBurstLength" => match number(512, (1 << 24) - 1) {
                Some(n) if !discovery => {
                    p.first_burst_length = (n as u32)
                        .min(TARGET_FIRST_BURST_LENGTH)
                        .min(p.max_burst_length.max(512));
                    Some((key.to_string(), p.first_burst_length.to_string()))
                }
                Some(_) => reply("Irrelevant"),
                None => reply("Reject"),
            },
            "MaxOutstandingR2T" => match number(1, 65535) {
                Some(_) if !discovery => {
                    p.max_outstanding_r2t = 1;
                    reply("1")
                }
                Some(_) => reply("Irrelevant"),
                None => reply("Reject"),
            },
            "DefaultTime2Wait" => match number(0, 3600) {
                Some(n) => {
                    p.default_time2wait = (n as u32).max(2);
                    Some((key.to_string(), p.default_time2wait.to_string()))
                }
                None => reply("Reject"),
            },
            "DefaultTime2Retain" => match number(0, 3600) {
                Some(n) => {
                    p.default_time2retain = (n as u32).min(20);
                    Some((key.to_string(), p.default_time2retain.to_string()))
                }
                None => reply("Reject"),
            },
            "MaxConnections" => match number(1, 65535) {
                Some(_) if !discovery => reply("1"),
                Some(_) => reply("Irrelevant"),
                None => reply("Reject"),
            },
            "ErrorRecoveryLevel" => match number(0, 2) {
                Some(_) => {
                    p.error_recovery_level = 0;
                    reply("0")
                }
                None => reply("Reject"),
            },
            "DataPDUInOrder" | "DataSequenceInOrder" => match parse_bool(value) {
                // OR with our Yes: always Yes.
                Some(_) if !discovery => reply("Yes"),
                Some(_) => reply("Irrelevant"),
                None => reply("Reject"),
            },
            "IFMarker" | "OFMarker" => reply("No"),
            "IFMarkInt" | "OFMarkInt" => reply("Irrelevant"),
            _ => reply("NotUnderstood"),
        }
    }

    /// Whether the initiator offered `key` at some point of this login.
    pub fn offered(&self, key: &str) -> bool {
        self.offered.iter().any(|k| k == key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_and_answers() {
        let pairs =
            parse_pairs(b"HeaderDigest=CRC32C,None\0MaxRecvDataSegmentLength=65536\0X-foo=bar\0")
                .unwrap();
        let mut n = Negotiation::default();
        let answers: Vec<_> = pairs
            .iter()
            .filter_map(|(k, v)| n.answer(k, v, false))
            .collect();
        assert_eq!(answers[0], ("HeaderDigest".into(), "CRC32C".into()));
        assert_eq!(
            answers[1],
            ("MaxRecvDataSegmentLength".into(), "262144".into())
        );
        assert_eq!(answers[2], ("X-foo".into(), "NotUnderstood".into()));
        assert!(n.params.header_digest);
        assert_eq!(n.params.initiator_max_recv_data_segment_length, 65536);
    }

    #[test]
    fn rejects_bad_text() {
        assert!(parse_pairs(b"novalue\0").is_err());
        assert!(parse_pairs(b"a=1\0a=2\0").is_err());
        assert!(parse_pairs(b"=1\0").is_err());
        let mut n = Negotiation::default();
        assert_eq!(
            n.answer("MaxBurstLength", "abc", false).unwrap().1,
            "Reject"
        );
        assert_eq!(
            n.answer("MaxRecvDataSegmentLength", "1", false).unwrap().1,
            "Reject"
        );
    }

    proptest! {
        #[test]
        fn negotiation_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(pairs) = parse_pairs(&bytes) {
                let mut n = Negotiation::default();
                for (k, v) in pairs {
                    let _ = n.answer(&k, &v, false);
                }
                prop_assert!(n.params.first_burst_length <= n.params.max_burst_length.max(512));
            }
        }

        #[test]
        fn pairs_round_trip(pairs in proptest::collection::btree_map("[A-Za-z][A-Za-z0-9.]{0,20}", "[ -~&&[^=]]{0,40}", 0..10)) {
            let mut data = Vec::new();
            for (k, v) in &pairs {
                push_pair(&mut data, k, v);
            }
            let back = parse_pairs(&data).unwrap();
            let expected: Vec<(String, String)> = pairs.into_iter().collect();
            prop_assert_eq!(back, expected);
        }
    }
}
