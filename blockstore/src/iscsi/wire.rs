//! iSCSI PDU framing and typed PDUs (RFC 7143 section 11).
//!
//! A PDU on the wire is a 48-byte Basic Header Segment (BHS), optional Additional Header Segments
//! (AHS, `TotalAHSLength` 4-byte words), an optional CRC32C header digest, a data segment padded
//! to 4 bytes, and an optional CRC32C data digest. [`FrameDecoder`] cuts a byte stream into
//! [`Pdu`]s and checks lengths and digests; [`Pdu::encode_into`] writes one back.
//! [`InitiatorPdu::parse`] turns a frame sent by an initiator into a typed value; the target's
//! answers are built with the `*Builder`-style constructors on [`Pdu`].
//!
//! Nothing here panics on peer input: every length is checked before it is used.

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;
/// The largest data segment the decoder accepts at all, whatever was negotiated (16 MiB - 1).
pub const DATA_SEGMENT_LEN_MAX: usize = (1 << 24) - 1;
/// The reserved "no tag" value for task tags and target transfer tags.
pub const TAG_NONE: u32 = 0xffff_ffff;

/// Opcodes of PDUs sent by initiators.
pub mod opcode {
    pub const NOP_OUT: u8 = 0x00;
    pub const SCSI_COMMAND: u8 = 0x01;
    pub const TASK_MANAGEMENT_REQUEST: u8 = 0x02;
    pub const LOGIN_REQUEST: u8 = 0x03;
    pub const TEXT_REQUEST: u8 = 0x04;
    pub const DATA_OUT: u8 = 0x05;
    pub const LOGOUT_REQUEST: u8 = 0x06;
    pub const SNACK_REQUEST: u8 = 0x10;
    pub const NOP_IN: u8 = 0x20;
    pub const SCSI_RESPONSE: u8 = 0x21;
    pub const TASK_MANAGEMENT_RESPONSE: u8 = 0x22;
    pub const LOGIN_RESPONSE: u8 = 0x23;
    pub const TEXT_RESPONSE: u8 = 0x24;
    pub const DATA_IN: u8 = 0x25;
    pub const LOGOUT_RESPONSE: u8 = 0x26;
    pub const R2T: u8 = 0x31;
    pub const ASYNC_MESSAGE: u8 = 0x32;
    pub const REJECT: u8 = 0x3f;
}

/// Reject reasons (RFC 7143 11.17.1).
pub mod reject_reason {
    pub const DATA_DIGEST_ERROR: u8 = 0x02;
    pub const SNACK_REJECT: u8 = 0x03;
    pub const PROTOCOL_ERROR: u8 = 0x04;
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x05;
    pub const IMMEDIATE_COMMAND_REJECT: u8 = 0x06;
    pub const TASK_IN_PROGRESS: u8 = 0x07;
    pub const INVALID_DATA_ACK: u8 = 0x08;
    pub const INVALID_PDU_FIELD: u8 = 0x09;
    pub const OUT_OF_RESOURCES: u8 = 0x0a;
    pub const WAITING_FOR_LOGOUT: u8 = 0x0c;
}

#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum WireError {
    #[error("data segment of {len} bytes exceeds the limit of {max}")]
    DataSegmentTooLong { len: usize, max: usize },
    #[error("header digest mismatch: received {received:#010x}, computed {computed:#010x}")]
    HeaderDigest { received: u32, computed: u32 },
    #[error("data digest mismatch: received {received:#010x}, computed {computed:#010x}")]
    DataDigest { received: u32, computed: u32 },
    #[error("pdu of {len} bytes is too short for a {what}")]
    Truncated { what: &'static str, len: usize },
    #[error("opcode {0:#04x} is not one an initiator sends")]
    UnknownOpcode(u8),
    #[error("malformed additional header segment: {0}")]
    BadAhs(&'static str),
}

impl WireError {
    /// Errors after which the byte stream can no longer be framed: the connection must close.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            WireError::HeaderDigest { .. } | WireError::DataSegmentTooLong { .. }
        )
    }
}

/// CRC32C as iSCSI uses it for digests (RFC 7143 13.1; the `crc32c` crate computes the same
/// Castagnoli CRC with the standard reflection and final XOR, sent little-endian on the wire).
pub fn digest(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

fn pad4(len: usize) -> usize {
    (4 - len % 4) % 4
}

pub fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
pub fn be24(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([0, b[at], b[at + 1], b[at + 2]])
}
pub fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
pub fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}
pub fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}
pub fn put24(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 3].copy_from_slice(&v.to_be_bytes()[1..]);
}
pub fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
pub fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// One framed PDU: header, additional headers and data (without padding or digests).
#[derive(Clone, PartialEq, Eq)]
pub struct Pdu {
    pub bhs: [u8; BHS_LEN],
    pub ahs: Vec<u8>,
    pub data: Vec<u8>,
}

impl std::fmt::Debug for Pdu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pdu")
            .field("opcode", &format_args!("{:#04x}", self.opcode()))
            .field("itt", &format_args!("{:#x}", self.itt()))
            .field("ahs_len", &self.ahs.len())
            .field("data_len", &self.data.len())
            .finish()
    }
}

impl Pdu {
    pub fn new(opcode: u8) -> Pdu {
        let mut bhs = [0u8; BHS_LEN];
        bhs[0] = opcode & 0x3f;
        Pdu {
            bhs,
            ahs: Vec::new(),
            data: Vec::new(),
        }
    }
    pub fn opcode(&self) -> u8 {
        self.bhs[0] & 0x3f
    }
    pub fn immediate(&self) -> bool {
        self.bhs[0] & 0x40 != 0
    }
    pub fn final_bit(&self) -> bool {
        self.bhs[1] & 0x80 != 0
    }
    pub fn itt(&self) -> u32 {
        be32(&self.bhs, 16)
    }
    pub fn set_itt(&mut self, v: u32) {
        put32(&mut self.bhs, 16, v)
    }
    pub fn lun_field(&self) -> u64 {
        be64(&self.bhs, 8)
    }

    /// Bytes this PDU takes on the wire with the given digests.
    pub fn wire_len(&self, header_digest: bool, data_digest: bool) -> usize {
        let mut n = BHS_LEN + self.ahs.len() + if header_digest { 4 } else { 0 };
        if !self.data.is_empty() {
            n += self.data.len() + pad4(self.data.len()) + if data_digest { 4 } else { 0 };
        }
        n
    }

    /// Appends the PDU to `out`, filling in TotalAHSLength and DataSegmentLength.
    pub fn encode_into(&self, out: &mut Vec<u8>, header_digest: bool, data_digest: bool) {
        let start = out.len();
        let mut bhs = self.bhs;
        bhs[4] = self.ahs.len().div_ceil(4).min(255) as u8;
        put24(&mut bhs, 5, self.data.len() as u32);
        out.extend_from_slice(&bhs);
        out.extend_from_slice(&self.ahs);
        out.resize(out.len() + pad4(self.ahs.len()), 0);
        if header_digest {
            let d = digest(&out[start..]);
            out.extend_from_slice(&d.to_le_bytes());
        }
        encode_data(out, &self.data, data_digest);
    }

    pub fn encode(&self, header_digest: bool, data_digest: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.wire_len(header_digest, data_digest));
        self.encode_into(&mut out, header_digest, data_digest);
        out
    }
}

/// Appends a data segment with its padding and optional digest.
pub fn encode_data(out: &mut Vec<u8>, data: &[u8], data_digest: bool) {
    if data.is_empty() {
        return;
    }
    out.extend_from_slice(data);
    let pad = pad4(data.len());
    out.extend_from_slice(&[0u8; 3][..pad]);
    if data_digest {
        let mut hasher = crc32c::crc32c(data);
        if pad > 0 {
            hasher = crc32c::crc32c_append(hasher, &[0u8; 3][..pad]);
        }
        out.extend_from_slice(&hasher.to_le_bytes());
    }
}

/// Result of looking at the start of a byte stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A whole PDU and how many bytes it took.
    Pdu(Pdu, usize),
    /// Not enough bytes yet; at least this many are needed in total.
    NeedMore(usize),
}

/// Cuts PDUs out of a byte stream. Digest settings change once login completes.
#[derive(Debug, Clone, Copy)]
pub struct FrameDecoder {
    pub header_digest: bool,
    pub data_digest: bool,
    /// Largest data segment accepted (our MaxRecvDataSegmentLength, or more during login).
    pub data_segment_len_max: usize,
}

impl FrameDecoder {
    /// Header length (BHS + AHS + digest) and data segment length declared by `header`,
    /// which must hold at least [`BHS_LEN`] bytes.
    fn lengths(&self, header: &[u8]) -> (usize, usize) {
        let ahs_len = header[4] as usize * 4;
        let data_len = be24(header, 5) as usize;
        (
            BHS_LEN + ahs_len + if self.header_digest { 4 } else { 0 },
            data_len,
        )
    }

    /// Decodes one PDU from the front of `buf`.
    ///
    /// A data digest error is reported with the frame length so the caller can skip the PDU and
    /// answer with a Reject (RFC 7143 7.8); other errors are fatal to the connection.
    pub fn decode(&self, buf: &[u8]) -> Result<Decoded, (WireError, usize, Option<[u8; BHS_LEN]>)> {
        if buf.len() < BHS_LEN {
            return Ok(Decoded::NeedMore(BHS_LEN));
        }
        let (header_len, data_len) = self.lengths(buf);
        if data_len > self.data_segment_len_max {
            return Err((
                WireError::DataSegmentTooLong {
                    len: data_len,
                    max: self.data_segment_len_max,
                },
                0,
                None,
            ));
        }
        let data_wire = if data_len == 0 {
            0
        } else {
            data_len + pad4(data_len) + if self.data_digest { 4 } else { 0 }
        };
        let total = header_len + data_wire;
        if buf.len() < total {
            return Ok(Decoded::NeedMore(total));
        }
        let mut bhs = [0u8; BHS_LEN];
        bhs.copy_from_slice(&buf[..BHS_LEN]);
        let ahs_end = header_len - if self.header_digest { 4 } else { 0 };
        if self.header_digest {
            let received = u32::from_le_bytes([
                buf[ahs_end],
                buf[ahs_end + 1],
                buf[ahs_end + 2],
                buf[ahs_end + 3],
            ]);
            let computed = digest(&buf[..ahs_end]);
            if received != computed {
                return Err((
                    WireError::HeaderDigest { received, computed },
                    total,
                    Some(bhs),
                ));
            }
        }
        let data = &buf[header_len..header_len + data_len];
        if self.data_digest && data_len > 0 {
            let at = header_len + data_len + pad4(data_len);
            let received = u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
            let computed = digest(&buf[header_len..at]);
            if received != computed {
                return Err((
                    WireError::DataDigest { received, computed },
                    total,
                    Some(bhs),
                ));
            }
        }
        let pdu = Pdu {
            bhs,
            ahs: buf[BHS_LEN..ahs_end].to_vec(),
            data: data.to_vec(),
        };
        Ok(Decoded::Pdu(pdu, total))
    }
}

/// Login stages (CSG/NSG).
pub mod stage {
    pub const SECURITY: u8 = 0;
    pub const OPERATIONAL: u8 = 1;
    pub const FULL_FEATURE: u8 = 3;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginRequest {
    pub transit: bool,
    pub continue_: bool,
    pub current_stage: u8,
    pub next_stage: u8,
    pub version_max: u8,
    pub version_min: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiCommand {
    pub immediate: bool,
    pub final_: bool,
    pub read: bool,
    pub write: bool,
    pub attributes: u8,
    pub lun: u64,
    pub itt: u32,
    pub expected_data_transfer_length: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    /// The CDB: the 16 bytes of the BHS, extended by an Extended CDB AHS when present.
    pub cdb: Vec<u8>,
    /// Immediate data.
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataOut {
    pub final_: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub exp_stat_sn: u32,
    pub data_sn: u32,
    pub buffer_offset: u32,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NopOut {
    pub immediate: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextRequest {
    pub immediate: bool,
    pub final_: bool,
    pub continue_: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskManagementRequest {
    pub immediate: bool,
    pub function: u8,
    pub lun: u64,
    pub itt: u32,
    pub referenced_task_tag: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub ref_cmd_sn: u32,
    pub exp_data_sn: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogoutRequest {
    pub immediate: bool,
    pub reason: u8,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnackRequest {
    pub snack_type: u8,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub exp_stat_sn: u32,
    pub beg_run: u32,
    pub run_length: u32,
}

/// A PDU an initiator sends, typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitiatorPdu {
    NopOut(NopOut),
    ScsiCommand(ScsiCommand),
    TaskManagement(TaskManagementRequest),
    Login(LoginRequest),
    Text(TextRequest),
    DataOut(DataOut),
    Logout(LogoutRequest),
    Snack(SnackRequest),
}

impl InitiatorPdu {
    /// Types a framed PDU. Fails on an opcode initiators do not send or a malformed AHS.
    pub fn parse(pdu: Pdu) -> Result<InitiatorPdu, WireError> {
        let b = &pdu.bhs;
        let immediate = pdu.immediate();
        let final_ = pdu.final_bit();
        Ok(match pdu.opcode() {
            opcode::NOP_OUT => InitiatorPdu::NopOut(NopOut {
                immediate,
                lun: be64(b, 8),
                itt: be32(b, 16),
                ttt: be32(b, 20),
                cmd_sn: be32(b, 24),
                exp_stat_sn: be32(b, 28),
                data: pdu.data,
            }),
            opcode::SCSI_COMMAND => {
                let mut cdb = b[32..48].to_vec();
                // Extended CDB AHS (type 1): AHSLength counts the CDB bytes past 16 plus one
                // reserved byte.
                let mut ahs = &pdu.ahs[..];
                while ahs.len() >= 4 {
                    let len = be16(ahs, 0) as usize;
                    let kind = ahs[2];
                    let padded = len + pad4(len);
                    if len == 0 || 3 + len > ahs.len() {
                        return Err(WireError::BadAhs("length past the end"));
                    }
                    if kind == 1 {
                        cdb.extend_from_slice(&ahs[4..3 + len]);
                    }
                    ahs = &ahs[(3 + padded).min(ahs.len())..];
                }
                InitiatorPdu::ScsiCommand(ScsiCommand {
                    immediate,
                    final_,
                    read: b[1] & 0x40 != 0,
                    write: b[1] & 0x20 != 0,
                    attributes: b[1] & 0x07,
                    lun: be64(b, 8),
                    itt: be32(b, 16),
                    expected_data_transfer_length: be32(b, 20),
                    cmd_sn: be32(b, 24),
                    exp_stat_sn: be32(b, 28),
                    cdb,
                    data: pdu.data,
                })
            }
            opcode::TASK_MANAGEMENT_REQUEST => {
                InitiatorPdu::TaskManagement(TaskManagementRequest {
                    immediate,
                    function: b[1] & 0x7f,
                    lun: be64(b, 8),
                    itt: be32(b, 16),
                    referenced_task_tag: be32(b, 20),
                    cmd_sn: be32(b, 24),
                    exp_stat_sn: be32(b, 28),
                    ref_cmd_sn: be32(b, 32),
                    exp_data_sn: be32(b, 36),
                })
            }
            opcode::LOGIN_REQUEST => {
                let mut isid = [0u8; 6];
                isid.copy_from_slice(&b[8..14]);
                InitiatorPdu::Login(LoginRequest {
                    transit: b[1] & 0x80 != 0,
                    continue_: b[1] & 0x40 != 0,
                    current_stage: (b[1] >> 2) & 3,
                    next_stage: b[1] & 3,
                    version_max: b[2],
                    version_min: b[3],
                    isid,
                    tsih: be16(b, 14),
                    itt: be32(b, 16),
                    cid: be16(b, 20),
                    cmd_sn: be32(b, 24),
                    exp_stat_sn: be32(b, 28),
                    data: pdu.data,
                })
            }
            opcode::TEXT_REQUEST => InitiatorPdu::Text(TextRequest {
                immediate,
                final_,
                continue_: b[1] & 0x40 != 0,
                lun: be64(b, 8),
                itt: be32(b, 16),
                ttt: be32(b, 20),
                cmd_sn: be32(b, 24),
                exp_stat_sn: be32(b, 28),
                data: pdu.data,
            }),
            opcode::DATA_OUT => InitiatorPdu::DataOut(DataOut {
                final_,
                lun: be64(b, 8),
                itt: be32(b, 16),
                ttt: be32(b, 20),
                exp_stat_sn: be32(b, 28),
                data_sn: be32(b, 36),
                buffer_offset: be32(b, 40),
                data: pdu.data,
            }),
            opcode::LOGOUT_REQUEST => InitiatorPdu::Logout(LogoutRequest {
                immediate,
                reason: b[1] & 0x7f,
                itt: be32(b, 16),
                cid: be16(b, 20),
                cmd_sn: be32(b, 24),
                exp_stat_sn: be32(b, 28),
            }),
            opcode::SNACK_REQUEST => InitiatorPdu::Snack(SnackRequest {
                snack_type: b[1] & 0x0f,
                lun: be64(b, 8),
                itt: be32(b, 16),
                ttt: be32(b, 20),
                exp_stat_sn: be32(b, 28),
                beg_run: be32(b, 40),
                run_length: be32(b, 44),
            }),
            other => return Err(WireError::UnknownOpcode(other)),
        })
    }

    /// Builds the frame an initiator would send (used by tests and tools).
    pub fn to_pdu(&self) -> Pdu {
        let mut p;
        match self {
            InitiatorPdu::NopOut(x) => {
                p = Pdu::new(opcode::NOP_OUT);
                p.bhs[1] = 0x80;
                put64(&mut p.bhs, 8, x.lun);
                put32(&mut p.bhs, 16, x.itt);
                put32(&mut p.bhs, 20, x.ttt);
                put32(&mut p.bhs, 24, x.cmd_sn);
                put32(&mut p.bhs, 28, x.exp_stat_sn);
                p.data = x.data.clone();
                if x.immediate {
                    p.bhs[0] |= 0x40;
                }
            }
            InitiatorPdu::ScsiCommand(x) => {
                p = Pdu::new(opcode::SCSI_COMMAND);
                p.bhs[1] = (if x.final_ { 0x80 } else { 0 })
                    | (if x.read { 0x40 } else { 0 })
                    | (if x.write { 0x20 } else { 0 })
                    | (x.attributes & 7);
                put64(&mut p.bhs, 8, x.lun);
                put32(&mut p.bhs, 16, x.itt);
                put32(&mut p.bhs, 20, x.expected_data_transfer_length);
                put32(&mut p.bhs, 24, x.cmd_sn);
                put32(&mut p.bhs, 28, x.exp_stat_sn);
                let n = x.cdb.len().min(16);
                p.bhs[32..32 + n].copy_from_slice(&x.cdb[..n]);
                if x.cdb.len() > 16 {
                    let extra = &x.cdb[16..];
                    let len = extra.len() + 1;
                    p.ahs.extend_from_slice(&(len as u16).to_be_bytes());
                    p.ahs.push(1);
                    p.ahs.push(0);
                    p.ahs.extend_from_slice(extra);
                    p.ahs.resize(p.ahs.len() + pad4(p.ahs.len()), 0);
                }
                p.data = x.data.clone();
                if x.immediate {
                    p.bhs[0] |= 0x40;
                }
            }
            InitiatorPdu::TaskManagement(x) => {
                p = Pdu::new(opcode::TASK_MANAGEMENT_REQUEST);
                p.bhs[1] = 0x80 | (x.function & 0x7f);
                put64(&mut p.bhs, 8, x.lun);
                put32(&mut p.bhs, 16, x.itt);
                put32(&mut p.bhs, 20, x.referenced_task_tag);
                put32(&mut p.bhs, 24, x.cmd_sn);
                put32(&mut p.bhs, 28, x.exp_stat_sn);
                put32(&mut p.bhs, 32, x.ref_cmd_sn);
                put32(&mut p.bhs, 36, x.exp_data_sn);
                if x.immediate {
                    p.bhs[0] |= 0x40;
                }
            }
            InitiatorPdu::Login(x) => {
                p = Pdu::new(opcode::LOGIN_REQUEST);
                p.bhs[0] |= 0x40;
                p.bhs[1] = (if x.transit { 0x80 } else { 0 })
                    | (if x.continue_ { 0x40 } else { 0 })
                    | ((x.current_stage & 3) << 2)
                    | (x.next_stage & 3);
                p.bhs[2] = x.version_max;
                p.bhs[3] = x.version_min;
                p.bhs[8..14].copy_from_slice(&x.isid);
                put16(&mut p.bhs, 14, x.tsih);
                put32(&mut p.bhs, 16, x.itt);
                put16(&mut p.bhs, 20, x.cid);
                put32(&mut p.bhs, 24, x.cmd_sn);
                put32(&mut p.bhs, 28, x.exp_stat_sn);
                p.data = x.data.clone();
            }
            InitiatorPdu::Text(x) => {
                p = Pdu::new(opcode::TEXT_REQUEST);
                p.bhs[1] = (if x.final_ { 0x80 } else { 0 }) | (if x.continue_ { 0x40 } else { 0 });
                put64(&mut p.bhs, 8, x.lun);
                put32(&mut p.bhs, 16, x.itt);
                put32(&mut p.bhs, 20, x.ttt);
                put32(&mut p.bhs, 24, x.cmd_sn);
                put32(&mut p.bhs, 28, x.exp_stat_sn);
                p.data = x.data.clone();
                if x.immediate {
                    p.bhs[0] |= 0x40;
                }
            }
            InitiatorPdu::DataOut(x) => {
                p = Pdu::new(opcode::DATA_OUT);
                p.bhs[1] = if x.final_ { 0x80 } else { 0 };
                put64(&mut p.bhs, 8, x.lun);
                put32(&mut p.bhs, 16, x.itt);
                put32(&mut p.bhs, 20, x.ttt);
                put32(&mut p.bhs, 28, x.exp_stat_sn);
                put32(&mut p.bhs, 36, x.data_sn);
                put32(&mut p.bhs, 40, x.buffer_offset);
                p.data = x.data.clone();
            }
            InitiatorPdu::Logout(x) => {
                p = Pdu::new(opcode::LOGOUT_REQUEST);
                p.bhs[1] = 0x80 | (x.reason & 0x7f);
                put32(&mut p.bhs, 16, x.itt);
                put16(&mut p.bhs, 20, x.cid);
                put32(&mut p.bhs, 24, x.cmd_sn);
                put32(&mut p.bhs, 28, x.exp_stat_sn);
                if x.immediate {
                    p.bhs[0] |= 0x40;
                }
            }
            InitiatorPdu::Snack(x) => {
                p = Pdu::new(opcode::SNACK_REQUEST);
                p.bhs[1] = 0x80 | (x.snack_type & 0x0f);
                put64(&mut p.bhs, 8, x.lun);
                put32(&mut p.bhs, 16, x.itt);
                put32(&mut p.bhs, 20, x.ttt);
                put32(&mut p.bhs, 28, x.exp_stat_sn);
                put32(&mut p.bhs, 40, x.beg_run);
                put32(&mut p.bhs, 44, x.run_length);
            }
        }
        p
    }
}

/// Fields every target PDU carries in the same place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sequence {
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

impl Pdu {
    fn target(opcode: u8, itt: u32, seq: Sequence) -> Pdu {
        let mut p = Pdu::new(opcode);
        p.bhs[1] = 0x80;
        put32(&mut p.bhs, 16, itt);
        put32(&mut p.bhs, 24, seq.stat_sn);
        put32(&mut p.bhs, 28, seq.exp_cmd_sn);
        put32(&mut p.bhs, 32, seq.max_cmd_sn);
        p
    }

    pub fn nop_in(lun: u64, itt: u32, ttt: u32, seq: Sequence, data: Vec<u8>) -> Pdu {
        let mut p = Pdu::target(opcode::NOP_IN, itt, seq);
        put64(&mut p.bhs, 8, lun);
        put32(&mut p.bhs, 20, ttt);
        p.data = data;
        p
    }

    /// SCSI Response. `residual` is (overflow, count) relative to the expected length.
    pub fn scsi_response(
        itt: u32,
        seq: Sequence,
        status: u8,
        sense: &[u8],
        exp_data_sn: u32,
        residual: Residual,
    ) -> Pdu {
        let mut p = Pdu::target(opcode::SCSI_RESPONSE, itt, seq);
        p.bhs[1] = 0x80 | residual.flags();
        p.bhs[2] = 0; // command completed at target
        p.bhs[3] = status;
        put32(&mut p.bhs, 36, exp_data_sn);
        put32(&mut p.bhs, 44, residual.count());
        if !sense.is_empty() {
            p.data.reserve(2 + sense.len());
            p.data
                .extend_from_slice(&(sense.len() as u16).to_be_bytes());
            p.data.extend_from_slice(sense);
        }
        p
    }

    /// Data-In header (data is attached by the caller). `status` is Some for phase collapse.
    #[allow(clippy::too_many_arguments)]
    pub fn data_in_header(
        lun: u64,
        itt: u32,
        seq: Sequence,
        data_sn: u32,
        buffer_offset: u32,
        final_: bool,
        status: Option<(u8, Residual)>,
    ) -> Pdu {
        let mut p = Pdu::target(opcode::DATA_IN, itt, seq);
        p.bhs[1] = if final_ { 0x80 } else { 0 };
        put64(&mut p.bhs, 8, lun);
        put32(&mut p.bhs, 20, TAG_NONE);
        if let Some((status, residual)) = status {
            p.bhs[1] |= 0x01 | residual.flags();
            p.bhs[3] = status;
            put32(&mut p.bhs, 44, residual.count());
        } else {
            // StatSN is reserved unless the S bit is set.
            put32(&mut p.bhs, 24, 0);
        }
        put32(&mut p.bhs, 36, data_sn);
        put32(&mut p.bhs, 40, buffer_offset);
        p
    }

    #[allow(clippy::too_many_arguments)]
    pub fn r2t(
        lun: u64,
        itt: u32,
        ttt: u32,
        seq: Sequence,
        r2t_sn: u32,
        buffer_offset: u32,
        desired_length: u32,
    ) -> Pdu {
        let mut p = Pdu::target(opcode::R2T, itt, seq);
        put64(&mut p.bhs, 8, lun);
        put32(&mut p.bhs, 20, ttt);
        put32(&mut p.bhs, 36, r2t_sn);
        put32(&mut p.bhs, 40, buffer_offset);
        put32(&mut p.bhs, 44, desired_length);
        p
    }

    pub fn task_management_response(itt: u32, seq: Sequence, response: u8) -> Pdu {
        let mut p = Pdu::target(opcode::TASK_MANAGEMENT_RESPONSE, itt, seq);
        p.bhs[2] = response;
        p
    }

    pub fn text_response(
        itt: u32,
        ttt: u32,
        seq: Sequence,
        final_: bool,
        continue_: bool,
        data: Vec<u8>,
    ) -> Pdu {
        let mut p = Pdu::target(opcode::TEXT_RESPONSE, itt, seq);
        p.bhs[1] = (if final_ { 0x80 } else { 0 }) | (if continue_ { 0x40 } else { 0 });
        put32(&mut p.bhs, 20, ttt);
        p.data = data;
        p
    }

    pub fn logout_response(
        itt: u32,
        seq: Sequence,
        response: u8,
        time2wait: u16,
        time2retain: u16,
    ) -> Pdu {
        let mut p = Pdu::target(opcode::LOGOUT_RESPONSE, itt, seq);
        p.bhs[2] = response;
        put16(&mut p.bhs, 40, time2wait);
        put16(&mut p.bhs, 42, time2retain);
        p
    }

    /// Reject: the data segment carries the rejected PDU's header.
    pub fn reject(reason: u8, seq: Sequence, rejected_header: &[u8; BHS_LEN], data_sn: u32) -> Pdu {
        let mut p = Pdu::target(opcode::REJECT, TAG_NONE, seq);
        p.bhs[2] = reason;
        put32(&mut p.bhs, 36, data_sn);
        p.data = rejected_header.to_vec();
        p
    }

    #[allow(clippy::too_many_arguments)]
    pub fn login_response(
        request: &LoginRequest,
        transit: bool,
        current_stage: u8,
        next_stage: u8,
        tsih: u16,
        seq: Sequence,
        status_class: u8,
        status_detail: u8,
        data: Vec<u8>,
    ) -> Pdu {
        let mut p = Pdu::target(opcode::LOGIN_RESPONSE, request.itt, seq);
        p.bhs[1] = (if transit { 0x80 } else { 0 }) | ((current_stage & 3) << 2) | (next_stage & 3);
        p.bhs[2] = 0; // version max
        p.bhs[3] = 0; // version active
        p.bhs[8..14].copy_from_slice(&request.isid);
        put16(&mut p.bhs, 14, tsih);
        p.bhs[36] = status_class;
        p.bhs[37] = status_detail;
        p.data = data;
        p
    }
}

/// Residual of a command: what the initiator expected versus what the command moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Residual {
    #[default]
    None,
    /// Fewer bytes moved than expected.
    Underflow(u32),
    /// The command wanted to move more than expected.
    Overflow(u32),
}

impl Residual {
    pub fn between(expected: u32, actual: u64) -> Residual {
        let expected = expected as u64;
        if actual < expected {
            Residual::Underflow((expected - actual) as u32)
        } else if actual > expected {
            Residual::Overflow((actual - expected).min(u32::MAX as u64) as u32)
        } else {
            Residual::None
        }
    }
    fn flags(self) -> u8 {
        match self {
            Residual::None => 0,
            Residual::Underflow(_) => 0x02,
            Residual::Overflow(_) => 0x04,
        }
    }
    fn count(self) -> u32 {
        match self {
            Residual::None => 0,
            Residual::Underflow(n) | Residual::Overflow(n) => n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decoder(h: bool, d: bool) -> FrameDecoder {
        FrameDecoder {
            header_digest: h,
            data_digest: d,
            data_segment_len_max: 1 << 20,
        }
    }

    #[test]
    fn crc32c_matches_rfc_example() {
        // RFC 3720 B.4: 32 bytes of zeros -> 0x8a9136aa.
        assert_eq!(digest(&[0u8; 32]), 0x8a91_36aa);
    }

    #[test]
    fn data_digest_error_is_reported_with_length() {
        let mut p = Pdu::new(opcode::NOP_OUT);
        p.data = vec![1, 2, 3];
        let mut bytes = p.encode(true, true);
        let n = bytes.len();
        bytes[n - 1] ^= 0xff;
        match decoder(true, true).decode(&bytes) {
            Err((WireError::DataDigest { .. }, len, Some(_))) => assert_eq!(len, n),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn oversized_data_segment_is_fatal() {
        let mut p = Pdu::new(opcode::NOP_OUT);
        p.data = vec![0; 100];
        let bytes = p.encode(false, false);
        let d = FrameDecoder {
            header_digest: false,
            data_digest: false,
            data_segment_len_max: 50,
        };
        let err = d.decode(&bytes).unwrap_err().0;
        assert!(err.is_fatal());
    }

    fn arb_initiator_pdu() -> impl Strategy<Value = InitiatorPdu> {
        let data = proptest::collection::vec(any::<u8>(), 0..300);
        prop_oneof![
            (
                any::<bool>(),
                any::<u64>(),
                any::<u32>(),
                any::<u32>(),
                any::<u32>(),
                any::<u32>(),
                data.clone()
            )
                .prop_map(|(immediate, lun, itt, ttt, cmd_sn, exp_stat_sn, data)| {
                    InitiatorPdu::NopOut(NopOut {
                        immediate,
                        lun,
                        itt,
                        ttt,
                        cmd_sn,
                        exp_stat_sn,
                        data,
                    })
                }),
            (
                (
                    any::<bool>(),
                    any::<bool>(),
                    any::<bool>(),
                    any::<bool>(),
                    0u8..8
                ),
                (
                    any::<u64>(),
                    any::<u32>(),
                    any::<u32>(),
                    any::<u32>(),
                    any::<u32>()
                ),
                prop_oneof![
                    proptest::collection::vec(any::<u8>(), 16..=16),
                    proptest::collection::vec(any::<u8>(), 17..40)
                ],
                data.clone()
            )
                .prop_map(
                    |(
                        (immediate, final_, read, write, attributes),
                        (lun, itt, edtl, cmd_sn, exp_stat_sn),
                        cdb,
                        data,
                    )| {
                        InitiatorPdu::ScsiCommand(ScsiCommand {
                            immediate,
                            final_,
                            read,
                            write,
                            attributes,
                            lun,
                            itt,
                            expected_data_transfer_length: edtl,
                            cmd_sn,
                            exp_stat_sn,
                            cdb,
                            data,
                        })
                    }
                ),
            (
                any::<bool>(),
                any::<u64>(),
                any::<u32>(),
                any::<u32>(),
                any::<u32>(),
                any::<u32>(),
                any::<u32>(),
                data.clone()
            )
                .prop_map(
                    |(final_, lun, itt, ttt, exp_stat_sn, data_sn, buffer_offset, data)| {
                        InitiatorPdu::DataOut(DataOut {
                            final_,
                            lun,
                            itt,
                            ttt,
                            exp_stat_sn,
                            data_sn,
                            buffer_offset,
                            data,
                        })
                    }
                ),
            (
                (
                    any::<bool>(),
                    any::<bool>(),
                    0u8..4,
                    0u8..4,
                    any::<u8>(),
                    any::<u8>()
                ),
                (
                    any::<[u8; 6]>(),
                    any::<u16>(),
                    any::<u32>(),
                    any::<u16>(),
                    any::<u32>(),
                    any::<u32>()
                ),
                data.clone()
            )
                .prop_map(
                    |(
                        (transit, continue_, current_stage, next_stage, version_max, version_min),
                        (isid, tsih, itt, cid, cmd_sn, exp_stat_sn),
                        data,
                    )| {
                        InitiatorPdu::Login(LoginRequest {
                            transit,
                            continue_,
                            current_stage,
                            next_stage,
                            version_max,
                            version_min,
                            isid,
                            tsih,
                            itt,
                            cid,
                            cmd_sn,
                            exp_stat_sn,
                            data,
                        })
                    }
                ),
            (
                any::<bool>(),
                any::<bool>(),
                any::<bool>(),
                any::<u64>(),
                any::<u32>(),
                any::<u32>(),
                any::<u32>(),
                any::<u32>()
            )
                .prop_flat_map(
                    move |(immediate, final_, continue_, lun, itt, ttt, cmd_sn, exp_stat_sn)| {
                        proptest::collection::vec(any::<u8>(), 0..100).prop_map(move |data| {
                            InitiatorPdu::Text(TextRequest {
                                immediate,
                                final_,
                                continue_,
                                lun,
                                itt,
                                ttt,
                                cmd_sn,
                                exp_stat_sn,
                                data,
                            })
                        })
                    }
                ),
            (
                any::<bool>(),
                0u8..0x80,
                any::<u64>(),
                any::<u32>(),
                any::<u32>(),
                any::<u32>(),
                any::<u32>(),
                (any::<u32>(), any::<u32>())
            )
                .prop_map(
                    |(
                        immediate,
                        function,
                        lun,
                        itt,
                        referenced_task_tag,
                        cmd_sn,
                        exp_stat_sn,
                        (ref_cmd_sn, exp_data_sn),
                    )| {
                        InitiatorPdu::TaskManagement(TaskManagementRequest {
                            immediate,
                            function,
                            lun,
                            itt,
                            referenced_task_tag,
                            cmd_sn,
                            exp_stat_sn,
                            ref_cmd_sn,
                            exp_data_sn,
                        })
                    }
                ),
            (
                any::<bool>(),
                0u8..0x80,
                any::<u32>(),
                any::<u16>(),
                any::<u32>(),
                any::<u32>()
            )
                .prop_map(|(immediate, reason, itt, cid, cmd_sn, exp_stat_sn)| {
                    InitiatorPdu::Logout(LogoutRequest {
                        immediate,
                        reason,
                        itt,
                        cid,
                        cmd_sn,
                        exp_stat_sn,
                    })
                }),
            (
                0u8..16,
                any::<u64>(),
                any::<u32>(),
                any::<u32>(),
                any::<u32>(),
                any::<u32>(),
                any::<u32>()
            )
                .prop_map(
                    |(snack_type, lun, itt, ttt, exp_stat_sn, beg_run, run_length)| {
                        InitiatorPdu::Snack(SnackRequest {
                            snack_type,
                            lun,
                            itt,
                            ttt,
                            exp_stat_sn,
                            beg_run,
                            run_length,
                        })
                    }
                ),
        ]
    }

    proptest! {
        #[test]
        fn initiator_pdus_round_trip(pdu in arb_initiator_pdu(), h in any::<bool>(), d in any::<bool>()) {
            let bytes = pdu.to_pdu().encode(h, d);
            match decoder(h, d).decode(&bytes) {
                Ok(Decoded::Pdu(frame, used)) => {
                    prop_assert_eq!(used, bytes.len());
                    prop_assert_eq!(InitiatorPdu::parse(frame).unwrap(), pdu);
                }
                other => prop_assert!(false, "unexpected {:?}", other),
            }
        }

        #[test]
        fn frames_round_trip(bhs in proptest::collection::vec(any::<u8>(), 48..=48),
                             ahs_words in 0usize..4, data in proptest::collection::vec(any::<u8>(), 0..200),
                             h in any::<bool>(), d in any::<bool>()) {
            let mut p = Pdu::new(0);
            p.bhs.copy_from_slice(&bhs);
            p.ahs = vec![7u8; ahs_words * 4];
            p.data = data;
            let bytes = p.encode(h, d);
            prop_assert_eq!(bytes.len(), p.wire_len(h, d));
            let Ok(Decoded::Pdu(back, used)) = decoder(h, d).decode(&bytes) else {
                return Err(TestCaseError::fail("decode failed"));
            };
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(&back.ahs, &p.ahs);
            prop_assert_eq!(&back.data, &p.data);
            prop_assert_eq!(back.bhs[0], p.bhs[0]);
            prop_assert_eq!(&back.bhs[8..], &p.bhs[8..]);
            // Every strict prefix asks for more bytes.
            for cut in [0, 1, 47, bytes.len() - 1] {
                if cut < bytes.len() {
                    let r = decoder(h, d).decode(&bytes[..cut]);
                    prop_assert!(matches!(r, Ok(Decoded::NeedMore(n)) if n > cut));
                }
            }
        }

        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400),
                               h in any::<bool>(), d in any::<bool>()) {
            if let Ok(Decoded::Pdu(frame, _)) = decoder(h, d).decode(&bytes) {
                let _ = InitiatorPdu::parse(frame);
            }
        }
    }
}
