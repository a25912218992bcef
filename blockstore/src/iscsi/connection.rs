//! The sans-IO state machine of one iSCSI connection (one session: MaxConnections is 1).
//!
//! Input: [`Connection::handle_bytes`] with what arrived on the socket, and
//! [`Connection::handle_command_complete`] with the outcome of a SCSI command the shell ran.
//! Output: [`Connection::poll_transmit`] (PDUs to send, in order) and [`Connection::poll_event`]
//! (SCSI commands to run, close requests). No sockets, no clock, no threads: the randomness CHAP
//! needs is passed in at creation.
//!
//! Invariants:
//! - non-immediate commands are handed out in CmdSN order; CmdSNs outside the window are
//!   dropped silently (RFC 7143 4.2.2.1);
//! - a write command is handed out only once all its data arrived, in order, within the
//!   expected length, with valid DataSNs; anything else ends the command with CHECK CONDITION
//!   and nothing is written;
//! - the data kept per connection is bounded: at most [`COMMANDS_MAX`] commands in the CmdSN
//!   window, write data at most [`WRITE_BUFFER_BYTES_MAX`] in all and
//!   [`TRANSFER_BYTES_MAX`] per command;
//! - a READ may be of any length: the shell streams it in pieces
//!   ([`Connection::handle_read_start`], [`Connection::handle_read_data`], then
//!   [`Connection::handle_command_complete`] with the last piece), and each piece leaves as
//!   Data-In PDUs at once, so the core never holds a whole large read.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use super::chap;
use super::target::{Registry, TargetEntry};
use super::text::{self, Negotiation, SessionParams};
use super::wire::{
    self, opcode, reject_reason, stage, DataOut, Decoded, FrameDecoder, InitiatorPdu, LoginRequest,
    Pdu, Residual, ScsiCommand, Sequence, BHS_LEN, TAG_NONE,
};
use crate::scsi::sense::{self, Sense};
use crate::scsi::{Nexus, ScsiResult};

/// Commands allowed in the CmdSN window at once.
pub const COMMANDS_MAX: u32 = 64;
/// Largest expected data transfer length accepted for one command that sends data (bytes): what
/// one session may gather at once ([`WRITE_BUFFER_BYTES_MAX`]), so a command never waits for
/// room it can never get; it holds [`crate::scsi::WRITE_TRANSFER_BLOCKS_MAX`] blocks of 512
/// bytes (COMPARE AND WRITE, at most 255 blocks twice, is far below). Reads have no such limit
/// (their data is streamed, never gathered).
pub const TRANSFER_BYTES_MAX: u32 = WRITE_BUFFER_BYTES_MAX as u32;
/// Write data one connection may hold while gathering it; more write commands wait with
/// TASK SET FULL until earlier ones complete (bounds memory per session).
pub const WRITE_BUFFER_BYTES_MAX: u64 = 32 << 20;
/// Largest login or text request gathered over continued PDUs.
const TEXT_BYTES_MAX: usize = 64 * 1024;

/// A SCSI command ready to run.
#[derive(Debug)]
pub struct Command {
    pub itt: u32,
    pub lun: u64,
    pub cdb: Vec<u8>,
    pub data_out: Vec<u8>,
    pub target: Arc<TargetEntry>,
    pub nexus: Nexus,
    /// Whether the initiator expects data back (R bit), and how much at most.
    pub read: bool,
    pub expected_length: u32,
}

#[derive(Debug)]
pub enum Event {
    /// Run this command and call [`Connection::handle_command_complete`].
    Execute(Command),
    /// A target reset asked for every other session of this target to close.
    ResetTarget {
        target: Arc<TargetEntry>,
        cold: bool,
        session_id: u64,
    },
    /// Close the connection once what `poll_transmit` gave is sent.
    Close,
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Phase {
    Login,
    FullFeature,
    /// Logout answered or fatal error: send what is queued, then close.
    Closing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Auth {
    /// No AuthMethod chosen yet.
    Start,
    /// We sent CHAP_A, CHAP_I, CHAP_C and wait for CHAP_N/CHAP_R.
    ChapChallenged {
        id: u8,
    },
    /// Waiting for the initiator to pick CHAP_A.
    ChapMethod,
    Done,
}

struct LoginState {
    negotiation: Negotiation,
    auth: Auth,
    initiator_name: Option<String>,
    target: Option<Arc<TargetEntry>>,
    discovery: bool,
    isid: [u8; 6],
    itt: u32,
    first: bool,
    pending_text: Vec<u8>,
    current_stage: u8,
    sent_tpgt: bool,
}

/// A command handed to the shell and not completed yet.
struct Running {
    lun: u64,
    expected_length: u32,
    read: bool,
    /// Writes: the data length the CDB asks for (for the residual).
    write_spdtl: Option<u64>,
    /// Set when the shell streams a READ's data before completing it.
    stream: Option<ReadStream>,
    /// Taken by the shell through [`Connection::poll_event`] (no longer cancellable here).
    handed_out: bool,
}

/// Progress of a streamed READ.
struct ReadStream {
    /// Bytes the CDB asks for (what the residual is computed against).
    transfer_bytes: u64,
    /// Bytes of Data-In queued so far (the next buffer offset).
    sent_bytes: u64,
    /// DataSN of the next Data-In PDU.
    data_sn: u32,
}

/// A write command collecting its data.
struct WriteTask {
    command: ScsiCommand,
    data: Vec<u8>,
    /// Bytes received so far (in order).
    received: u32,
    /// Unsolicited data still expected (until F in the unsolicited sequence).
    unsolicited_open: bool,
    /// Next DataSN expected in the current sequence.
    next_data_sn: u32,
    /// The outstanding R2T: (ttt, offset, length).
    r2t: Option<(u32, u32, u32)>,
    r2t_sn: u32,
    failed: Option<Sense>,
}

/// Portal information needed to answer SendTargets.
#[derive(Debug, Clone)]
pub struct PortalInfo {
    /// `ip:port,tpgt` values to advertise as TargetAddress.
    pub addresses: Vec<String>,
    pub portal_group_tag: u16,
}

pub struct Connection {
    registry: Arc<Registry>,
    portal: PortalInfo,
    phase: Phase,
    login: LoginState,
    params: SessionParams,
    rx: Vec<u8>,
    stat_sn: u32,
    exp_cmd_sn: u32,
    session: Option<(Nexus, Option<Arc<TargetEntry>>)>,
    tsih: u16,
    session_id: u64,
    writes: HashMap<u32, WriteTask>,
    /// Non-immediate PDUs that arrived ahead of ExpCmdSN.
    waiting: BTreeMap<u32, InitiatorPdu>,
    /// Commands handed to the shell and not completed yet, by task tag.
    running: HashMap<u32, Running>,
    /// How many of `running` the shell has taken (polled) and not completed.
    handed_out: usize,
    /// Framing stopped at a task management or logout request that must wait until the shell
    /// completed every command it took (see [`Connection::input_held`]).
    held: bool,
    /// Streamed READs a task management request aborted while the shell streams them: their
    /// pieces are refused, and their task tags are not reused, until the shell took notice
    /// ([`Connection::take_stream_aborted`]).
    aborted_streams: Vec<u32>,
    outbox: VecDeque<(Pdu, bool, bool)>,
    events: VecDeque<Event>,
    next_ttt: u32,
    challenge: [u8; 16],
    text_continuation: Option<(u32, Vec<u8>)>,
}

/// A stable id for an initiator port (name + ISID): the same after a reconnect, so persistent
/// reservations registered by a nexus stay its own (FNV-1a).
pub fn nexus_id(initiator_name: &str, isid: &[u8; 6]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in initiator_name
        .to_ascii_lowercase()
        .bytes()
        .chain([0u8])
        .chain(isid.iter().copied())
    {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn serial_lt(a: u32, b: u32) -> bool {
    a != b && (b.wrapping_sub(a) as i32) > 0
}

fn serial_le(a: u32, b: u32) -> bool {
    a == b || serial_lt(a, b)
}

/// Data-out bytes a CDB asks for (SPDTL), for commands whose length is in the CDB.
/// Rewrites the transfer length of a WRITE or WRITE AND VERIFY CDB; false for other commands
/// or a length the CDB cannot express.
fn set_transfer_blocks(cdb: &mut [u8], blocks: u64) -> bool {
    let (at, n) = match cdb.first() {
        Some(0x0a) => {
            if blocks == 0 || blocks > 255 {
                return blocks == 0;
            }
            (4, 1)
        }
        Some(0x2a | 0x2e) => (7, 2),
        Some(0xaa | 0xae) => (6, 4),
        Some(0x8a | 0x8e) => (10, 4),
        _ => return false,
    };
    if cdb.len() < at + n {
        return false;
    }
    let bytes = blocks.to_be_bytes();
    cdb[at..at + n].copy_from_slice(&bytes[8 - n..]);
    true
}

fn scsi_data_out_len(cdb: &[u8], block: u64) -> Option<u64> {
    let be = |from: usize, n: usize| -> u64 {
        cdb.get(from..from + n)
            .map(|s| s.iter().fold(0u64, |a, &b| (a << 8) | b as u64))
            .unwrap_or(0)
    };
    Some(match *cdb.first()? {
        0x0a => {
            (if cdb.get(4) == Some(&0) {
                256
            } else {
                be(4, 1)
            }) * block
        }
        0x2a | 0x2e => be(7, 2) * block,
        0xaa | 0xae => be(6, 4) * block,
        0x8a | 0x8e => be(10, 4) * block,
        0x89 => be(13, 1) * block * 2,
        0x8b => be(10, 4) * block,
        0x41 => block,
        // WRITE SAME(16) with NDOB carries no data.
        0x93 => {
            if cdb.get(1).is_some_and(|b| b & 0x01 != 0) {
                0
            } else {
                block
            }
        }
        _ => return None,
    })
}

impl Connection {
    pub fn new(registry: Arc<Registry>, portal: PortalInfo, challenge: [u8; 16]) -> Connection {
        Connection {
            registry,
            portal,
            phase: Phase::Login,
            login: LoginState {
                negotiation: Negotiation::default(),
                auth: Auth::Start,
                initiator_name: None,
                target: None,
                discovery: false,
                isid: [0; 6],
                itt: 0,
                first: true,
                pending_text: Vec::new(),
                current_stage: stage::SECURITY,
                sent_tpgt: false,
            },
            params: SessionParams::default(),
            rx: Vec::new(),
            stat_sn: 0,
            exp_cmd_sn: 0,
            session: None,
            tsih: 0,
            session_id: 0,
            writes: HashMap::new(),
            waiting: BTreeMap::new(),
            running: HashMap::new(),
            handed_out: 0,
            held: false,
            aborted_streams: Vec::new(),
            outbox: VecDeque::new(),
            events: VecDeque::new(),
            next_ttt: 1,
            challenge,
            text_continuation: None,
        }
    }

    /// The framing in force for bytes arriving now.
    pub fn decoder(&self) -> FrameDecoder {
        let full = self.phase == Phase::FullFeature;
        FrameDecoder {
            header_digest: full && self.params.header_digest,
            data_digest: full && self.params.data_digest,
            data_segment_len_max: if full {
                self.params.target_max_recv_data_segment_length as usize
            } else {
                // Login PDUs carry at most 8192 bytes of text (RFC 7143 6.1 and 13.12).
                8192
            },
        }
    }

    pub fn params(&self) -> &SessionParams {
        &self.params
    }

    /// The registry's id for this session, once logged in.
    pub fn session_id(&self) -> Option<u64> {
        self.session.as_ref().map(|_| self.session_id)
    }

    /// The I_T nexus of this session, once logged in.
    pub fn nexus(&self) -> Option<&Nexus> {
        self.session.as_ref().map(|(n, _)| n)
    }

    pub fn target(&self) -> Option<Arc<TargetEntry>> {
        self.session.as_ref().and_then(|(_, t)| t.clone())
    }

    /// Bytes buffered and not yet framed (for the memory figure).
    pub fn buffered_bytes(&self) -> usize {
        self.rx.capacity()
            + self
                .writes
                .values()
                .map(|w| w.data.capacity())
                .sum::<usize>()
    }

    pub fn is_closing(&self) -> bool {
        self.phase == Phase::Closing
    }

    pub fn poll_transmit(&mut self) -> Option<(Pdu, bool, bool)> {
        self.outbox.pop_front()
    }

    /// The next event [`Connection::poll_event`] would give, left in place: a command left
    /// here is not running yet, so a task management request can still cancel it.
    pub fn peek_event(&self) -> Option<&Event> {
        self.events.front()
    }

    /// Whether streamed READ `itt` was aborted by a task management request: the shell then
    /// stops reading it and hands in nothing more for it. True once per abort.
    pub fn take_stream_aborted(&mut self, itt: u32) -> bool {
        match self.aborted_streams.iter().position(|t| *t == itt) {
            Some(index) => {
                self.aborted_streams.swap_remove(index);
                true
            }
            None => false,
        }
    }

    /// Whether a request with opcode `op` must wait for commands the shell runs: a logout for
    /// all of them, a task management request for all but streamed READs (which it can abort
    /// while they stream).
    fn must_wait(&self, op: u8) -> bool {
        match op {
            opcode::LOGOUT_REQUEST => self.handed_out > 0,
            opcode::TASK_MANAGEMENT_REQUEST => self
                .running
                .values()
                .any(|r| r.handed_out && r.stream.is_none()),
            _ => false,
        }
    }

    /// Aborts streamed READs the shell runs (`itt`, or all): they get no further Data-In and no
    /// response. Returns how many.
    fn abort_streams(&mut self, itt: Option<u32>) -> usize {
        let itts: Vec<u32> = self
            .running
            .iter()
            .filter(|(tag, r)| r.handed_out && r.stream.is_some() && itt.is_none_or(|i| i == **tag))
            .map(|(tag, _)| *tag)
            .collect();
        for tag in &itts {
            self.running.remove(tag);
            self.handed_out -= 1;
            self.aborted_streams.push(*tag);
        }
        itts.len()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        let event = self.events.pop_front();
        if let Some(Event::Execute(command)) = &event {
            if let Some(running) = self.running.get_mut(&command.itt) {
                if !running.handed_out {
                    running.handed_out = true;
                    self.handed_out += 1;
                }
            }
        }
        event
    }

    /// Whether framing stopped at a task management or logout request that waits for the
    /// commands the shell is running: the shell should not read more from the socket until it
    /// completed them (framing resumes inside the last
    /// [`Connection::handle_command_complete`], which may queue events).
    pub fn input_held(&self) -> bool {
        self.held
    }

    /// Commands the shell took and has not completed.
    pub fn commands_out(&self) -> usize {
        self.handed_out
    }

    fn seq(&self) -> Sequence {
        Sequence {
            stat_sn: self.stat_sn,
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self
                .exp_cmd_sn
                .wrapping_add(COMMANDS_MAX - 1)
                .wrapping_sub(self.running.len() as u32),
        }
    }

    /// Sequence numbers for a status-bearing PDU: uses the current StatSN and advances it.
    fn next_status(&mut self) -> Sequence {
        let s = self.seq();
        self.stat_sn = self.stat_sn.wrapping_add(1);
        s
    }

    fn send(&mut self, pdu: Pdu) {
        let full = self.phase == Phase::FullFeature
            || (self.phase == Phase::Closing && self.session.is_some());
        let (h, d) = if full {
            (self.params.header_digest, self.params.data_digest)
        } else {
            (false, false)
        };
        self.outbox.push_back((pdu, h, d));
    }

    fn close(&mut self) {
        if self.phase != Phase::Closing {
            self.phase = Phase::Closing;
            self.events.push_back(Event::Close);
        }
    }

    fn reject(&mut self, reason: u8, header: &[u8; BHS_LEN]) {
        let seq = self.next_status();
        self.send(Pdu::reject(reason, seq, header, 0));
    }

    /// Feeds bytes from the socket. Frames as many PDUs as are complete.
    pub fn handle_bytes(&mut self, bytes: &[u8]) {
        self.rx.extend_from_slice(bytes);
        let mut used = 0;
        while self.phase != Phase::Closing {
            let decoder = self.decoder();
            match decoder.decode(&self.rx[used..]) {
                Ok(Decoded::NeedMore(_)) => break,
                Ok(Decoded::Pdu(pdu, n)) => {
                    // A task management function acts on the tasks before it, and a logout
                    // ends the session: both wait until the shell completed the commands it
                    // runs (it may run several at once), so their responses go out first
                    // (RFC 7143 4.2.3.3: no response of an affected task after the TMF's).
                    if self.phase == Phase::FullFeature && self.must_wait(Self::opcode_of(&pdu.bhs))
                    {
                        self.held = true;
                        break;
                    }
                    used += n;
                    self.handle_pdu(pdu);
                }
                Err((err, n, header)) => {
                    if err.is_fatal() || n == 0 {
                        tracing::warn!(error = %err, "iscsi framing error, closing connection");
                        self.close();
                        break;
                    }
                    used += n;
                    if let Some(h) = header {
                        tracing::warn!(error = %err, "iscsi pdu rejected");
                        // A data digest error: Reject, the initiator retries or aborts.
                        self.reject(reject_reason::DATA_DIGEST_ERROR, &h);
                    }
                }
            }
        }
        self.rx.drain(..used.min(self.rx.len()));
        if self.rx.capacity() > 1 << 20 && self.rx.len() < 1 << 16 {
            self.rx.shrink_to(1 << 16);
        }
    }

    /// Handles one framed PDU.
    pub fn handle_pdu(&mut self, pdu: Pdu) {
        let header = pdu.bhs;
        let parsed = match InitiatorPdu::parse(pdu) {
            Ok(p) => p,
            Err(err) => {
                tracing::debug!(error = %err, "unparsable pdu");
                if self.phase == Phase::Login {
                    self.close();
                } else {
                    self.reject(reject_reason::COMMAND_NOT_SUPPORTED, &header);
                }
                return;
            }
        };
        match self.phase {
            Phase::Login => match parsed {
                InitiatorPdu::Login(req) => self.handle_login(req),
                _ => {
                    // Anything but a login before full feature phase ends the connection.
                    self.close();
                }
            },
            Phase::FullFeature => self.handle_full_feature(parsed, header),
            Phase::Closing => {}
        }
    }

    fn handle_full_feature(&mut self, pdu: InitiatorPdu, header: [u8; BHS_LEN]) {
        // Data-Out and SNACK carry no CmdSN.
        match pdu {
            InitiatorPdu::DataOut(d) => return self.handle_data_out(d, &header),
            InitiatorPdu::Snack(_) => return self.reject(reject_reason::SNACK_REJECT, &header),
            InitiatorPdu::Login(_) => return self.reject(reject_reason::PROTOCOL_ERROR, &header),
            _ => {}
        }
        let (immediate, cmd_sn) = match &pdu {
            InitiatorPdu::NopOut(x) => (x.immediate, x.cmd_sn),
            InitiatorPdu::ScsiCommand(x) => (x.immediate, x.cmd_sn),
            InitiatorPdu::TaskManagement(x) => (x.immediate, x.cmd_sn),
            InitiatorPdu::Text(x) => (x.immediate, x.cmd_sn),
            InitiatorPdu::Logout(x) => (x.immediate, x.cmd_sn),
            _ => (true, self.exp_cmd_sn),
        };
        if immediate {
            return self.dispatch(pdu, header);
        }
        let max = self.seq().max_cmd_sn;
        if cmd_sn == self.exp_cmd_sn {
            self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
            self.dispatch(pdu, header);
            // Release commands that were waiting for this one.
            while let Some(next) = self.waiting.remove(&self.exp_cmd_sn) {
                self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
                let h = next.to_pdu().bhs;
                self.dispatch(next, h);
            }
        } else if serial_lt(self.exp_cmd_sn, cmd_sn) && serial_le(cmd_sn, max) {
            if self.waiting.len() < COMMANDS_MAX as usize {
                self.waiting.insert(cmd_sn, pdu);
            }
        } else {
            tracing::debug!(
                cmd_sn,
                exp_cmd_sn = self.exp_cmd_sn,
                "cmdsn outside the window, ignored"
            );
        }
    }

    fn dispatch(&mut self, pdu: InitiatorPdu, header: [u8; BHS_LEN]) {
        let discovery = self.login.discovery;
        match pdu {
            InitiatorPdu::NopOut(n) => {
                if n.itt == TAG_NONE {
                    // A ping answer or a CmdSN update: nothing to send.
                    return;
                }
                if n.ttt != TAG_NONE {
                    return self.reject(reject_reason::INVALID_PDU_FIELD, &header);
                }
                let seq = self.next_status();
                let mut data = n.data;
                data.truncate(self.params.initiator_max_recv_data_segment_length as usize);
                self.send(Pdu::nop_in(n.lun, n.itt, TAG_NONE, seq, data));
            }
            InitiatorPdu::ScsiCommand(c) => {
                if discovery {
                    return self.reject(reject_reason::PROTOCOL_ERROR, &header);
                }
                self.handle_scsi_command(c, &header);
            }
            InitiatorPdu::TaskManagement(t) => {
                if discovery {
                    return self.reject(reject_reason::PROTOCOL_ERROR, &header);
                }
                self.handle_task_management(t);
            }
            InitiatorPdu::Text(t) => self.handle_text(t, &header),
            InitiatorPdu::Logout(l) => {
                // Reason 0 closes the session, 1 the connection (the same here); 2 (recovery)
                // needs ErrorRecoveryLevel 2.
                let response = if l.reason == 2 { 2 } else { 0 };
                let seq = self.next_status();
                let (wait, retain) = (
                    self.params.default_time2wait as u16,
                    self.params.default_time2retain as u16,
                );
                self.send(Pdu::logout_response(l.itt, seq, response, wait, retain));
                if response == 0 {
                    self.close();
                }
            }
            InitiatorPdu::DataOut(_) | InitiatorPdu::Snack(_) | InitiatorPdu::Login(_) => {}
        }
    }

    fn nexus_and_target(&self) -> Option<(Nexus, Arc<TargetEntry>)> {
        match &self.session {
            Some((n, Some(t))) => Some((n.clone(), t.clone())),
            _ => None,
        }
    }

    fn handle_scsi_command(&mut self, c: ScsiCommand, header: &[u8; BHS_LEN]) {
        if self.running.contains_key(&c.itt)
            || self.writes.contains_key(&c.itt)
            || self.aborted_streams.contains(&c.itt)
        {
            return self.reject(reject_reason::TASK_IN_PROGRESS, header);
        }
        let Some((nexus, target)) = self.nexus_and_target() else {
            return self.reject(reject_reason::PROTOCOL_ERROR, header);
        };
        let edtl = c.expected_data_transfer_length;
        if c.data.len() as u64 > edtl as u64 && c.write
            || (!c.write && !c.data.is_empty())
            || (!self.params.immediate_data && !c.data.is_empty())
            || c.data.len() as u32 > self.params.first_burst_length
        {
            return self.reject(reject_reason::PROTOCOL_ERROR, header);
        }
        if edtl > TRANSFER_BYTES_MAX && c.write {
            let seq = self.next_status();
            let s = Sense::new(sense::key::ILLEGAL_REQUEST, 0x24, 0x00).to_bytes();
            self.send(Pdu::scsi_response(
                c.itt,
                seq,
                sense::CHECK_CONDITION,
                &s,
                0,
                Residual::None,
            ));
            return;
        }
        if c.write && edtl > c.data.len() as u32 {
            let gathering: u64 = self
                .writes
                .values()
                .map(|w| w.command.expected_data_transfer_length as u64)
                .sum();
            if gathering + edtl as u64 > WRITE_BUFFER_BYTES_MAX {
                let seq = self.next_status();
                self.send(Pdu::scsi_response(
                    c.itt,
                    seq,
                    sense::TASK_SET_FULL,
                    &[],
                    0,
                    Residual::None,
                ));
                return;
            }
            // Gather the rest: unsolicited Data-Out (if allowed and F is clear), then R2Ts.
            let unsolicited_open = !c.final_ && !self.params.initial_r2t;
            if !c.final_ && self.params.initial_r2t {
                return self.reject(reject_reason::PROTOCOL_ERROR, header);
            }
            // Grown as data arrives, never reserved up front for what was only announced.
            let mut data = Vec::new();
            data.extend_from_slice(&c.data);
            let received = c.data.len() as u32;
            let itt = c.itt;
            let mut task = WriteTask {
                command: ScsiCommand {
                    data: Vec::new(),
                    ..c
                },
                data,
                received,
                unsolicited_open,
                next_data_sn: 0,
                r2t: None,
                r2t_sn: 0,
                failed: None,
            };
            if !task.unsolicited_open {
                self.send_r2t(&mut task);
            }
            self.writes.insert(itt, task);
            return;
        }
        let mut c = c;
        let data = std::mem::take(&mut c.data);
        self.start_command(c, data, nexus, target);
    }

    fn start_command(
        &mut self,
        c: ScsiCommand,
        data: Vec<u8>,
        nexus: Nexus,
        target: Arc<TargetEntry>,
    ) {
        let block = target.lun.block_size_bytes() as u64;
        let edtl = c.expected_data_transfer_length;
        // For writes whose data length the CDB does not give (UNMAP, MODE SELECT, ...), the
        // data sent is what the command uses: no residual.
        let mut residual_base = if c.write { Some(edtl as u64) } else { None };
        let mut data = data;
        let mut c = c;
        if c.write {
            if let Some(spdtl) = scsi_data_out_len(&c.cdb, block) {
                let opcode = c.cdb[0];
                if matches!(opcode, 0x89 | 0x41 | 0x93) && spdtl != edtl as u64 {
                    // COMPARE AND WRITE and WRITE SAME need exactly the data their CDB names.
                    let seq = self.next_status();
                    let s = sense::INVALID_FIELD_IN_CDB.to_bytes();
                    let residual = Residual::between(edtl, spdtl);
                    self.send(Pdu::scsi_response(
                        c.itt,
                        seq,
                        sense::CHECK_CONDITION,
                        &s,
                        0,
                        residual,
                    ));
                    return;
                }
                if spdtl > edtl as u64 {
                    // The CDB asks for more than the initiator sends: write only the whole
                    // blocks that arrived and report the overflow (FCP-4 9.4.2 option a).
                    let blocks = edtl as u64 / block;
                    if !set_transfer_blocks(&mut c.cdb, blocks) {
                        let seq = self.next_status();
                        let s = Sense::new(sense::key::ILLEGAL_REQUEST, 0x0e, 0x03).to_bytes();
                        let residual = Residual::between(edtl, spdtl);
                        self.send(Pdu::scsi_response(
                            c.itt,
                            seq,
                            sense::CHECK_CONDITION,
                            &s,
                            0,
                            residual,
                        ));
                        return;
                    }
                    if blocks == 0 {
                        let seq = self.next_status();
                        let residual = Residual::between(edtl, spdtl);
                        self.send(Pdu::scsi_response(
                            c.itt,
                            seq,
                            sense::GOOD,
                            &[],
                            0,
                            residual,
                        ));
                        return;
                    }
                    data.truncate((blocks * block) as usize);
                } else {
                    data.truncate(spdtl as usize);
                }
                residual_base = Some(spdtl);
            }
        }
        self.running.insert(
            c.itt,
            Running {
                lun: c.lun,
                expected_length: edtl,
                read: c.read,
                write_spdtl: residual_base,
                stream: None,
                handed_out: false,
            },
        );
        self.events.push_back(Event::Execute(Command {
            itt: c.itt,
            lun: c.lun,
            cdb: c.cdb,
            data_out: data,
            target,
            nexus,
            read: c.read,
            expected_length: edtl,
        }));
    }

    fn send_r2t(&mut self, task: &mut WriteTask) {
        let edtl = task.command.expected_data_transfer_length;
        if task.received >= edtl {
            return;
        }
        let length = (edtl - task.received).min(self.params.max_burst_length);
        let ttt = self.next_ttt;
        self.next_ttt = self.next_ttt.wrapping_add(1);
        if self.next_ttt == TAG_NONE {
            self.next_ttt = 1;
        }
        task.r2t = Some((ttt, task.received, length));
        task.next_data_sn = 0;
        let seq = self.seq();
        let pdu = Pdu::r2t(
            task.command.lun,
            task.command.itt,
            ttt,
            seq,
            task.r2t_sn,
            task.received,
            length,
        );
        task.r2t_sn += 1;
        self.send(pdu);
    }

    fn handle_data_out(&mut self, d: DataOut, header: &[u8; BHS_LEN]) {
        let Some(mut task) = self.writes.remove(&d.itt) else {
            // Data for a task we do not know (aborted, or bogus): RFC 7143 says Reject.
            return self.reject(reject_reason::INVALID_PDU_FIELD, header);
        };
        let edtl = task.command.expected_data_transfer_length;
        let len = d.data.len() as u32;
        let solicited = d.ttt != TAG_NONE;
        let mut sequence_done = d.final_;
        if task.failed.is_none() {
            let problem: Option<Sense> = if solicited {
                match task.r2t {
                    Some((ttt, offset, length)) if ttt == d.ttt => {
                        let in_order =
                            d.data_sn == task.next_data_sn && d.buffer_offset == task.received;
                        let within = d
                            .buffer_offset
                            .checked_add(len)
                            .is_some_and(|end| end <= offset + length);
                        if in_order && within {
                            None
                        } else {
                            Some(Sense::new(sense::key::ABORTED_COMMAND, 0x4b, 0x00))
                        }
                    }
                    _ => Some(Sense::new(sense::key::ABORTED_COMMAND, 0x4b, 0x00)),
                }
            } else {
                // Unsolicited Data-Out: only while the unsolicited burst is open, in order,
                // within FirstBurstLength.
                let burst_end = self.params.first_burst_length.min(edtl);
                let ok = task.unsolicited_open
                    && d.data_sn == task.next_data_sn
                    && d.buffer_offset == task.received
                    && d.buffer_offset
                        .checked_add(len)
                        .is_some_and(|end| end <= burst_end);
                if ok {
                    None
                } else {
                    Some(Sense::new(sense::key::ABORTED_COMMAND, 0x4b, 0x00))
                }
            };
            match problem {
                Some(s) => task.failed = Some(s),
                None => {
                    task.data.extend_from_slice(&d.data);
                    task.received += len;
                    task.next_data_sn = task.next_data_sn.wrapping_add(1);
                }
            }
        }
        if let Some((_, offset, length)) = task.r2t {
            if solicited && task.received >= offset + length {
                sequence_done = true;
            }
        }
        if !sequence_done {
            self.writes.insert(d.itt, task);
            return;
        }
        if solicited {
            task.r2t = None;
        } else {
            task.unsolicited_open = false;
        }
        if let Some(s) = task.failed {
            // Wait for the rest of an unsolicited burst before answering is not needed: the
            // sequence ended with F. Answer now and forget the task.
            let seq = self.next_status();
            self.send(Pdu::scsi_response(
                task.command.itt,
                seq,
                sense::CHECK_CONDITION,
                &s.to_bytes(),
                0,
                Residual::None,
            ));
            return;
        }
        if task.received < edtl {
            self.send_r2t(&mut task);
            self.writes.insert(d.itt, task);
            return;
        }
        let Some((nexus, target)) = self.nexus_and_target() else {
            return;
        };
        let data = std::mem::take(&mut task.data);
        self.start_command(task.command, data, nexus, target);
    }

    /// The shell streams the data of READ `itt` (already checked, see
    /// `Lun::start_read`) in pieces instead of completing it with all its data at once:
    /// `transfer_bytes` is the length its CDB asks for. Follow with [`Self::handle_read_data`]
    /// for every piece but the last, and [`Self::handle_command_complete`] with the last piece
    /// (or the failure).
    pub fn handle_read_start(&mut self, itt: u32, transfer_bytes: u64) {
        if let Some(running) = self.running.get_mut(&itt) {
            running.stream = Some(ReadStream {
                transfer_bytes,
                sent_bytes: 0,
                data_sn: 0,
            });
        }
    }

    /// The next piece of a streamed READ's data, in order: queued as Data-In PDUs now (bytes
    /// beyond the initiator's expected length are dropped).
    pub fn handle_read_data(&mut self, itt: u32, data: Vec<u8>) {
        if self.phase == Phase::Closing {
            return;
        }
        let Some(running) = self.running.get_mut(&itt) else {
            return;
        };
        let (lun, edtl) = (running.lun, running.expected_length);
        let Some(stream) = running.stream.as_mut() else {
            return;
        };
        let (mut offset, mut data_sn) = (stream.sent_bytes, stream.data_sn);
        let mut data = data;
        data.truncate((edtl as u64).saturating_sub(offset) as usize);
        self.send_data_in(lun, itt, data, &mut offset, &mut data_sn, None);
        if let Some(stream) = self.running.get_mut(&itt).and_then(|r| r.stream.as_mut()) {
            stream.sent_bytes = offset;
            stream.data_sn = data_sn;
        }
    }

    /// Largest Data-In payload a PDU of this session carries (the initiator's
    /// MaxRecvDataSegmentLength, within MaxBurstLength): the shell sizes streamed pieces by it
    /// so each piece becomes one PDU without a copy.
    pub fn data_in_segment_bytes(&self) -> usize {
        (self.params.initiator_max_recv_data_segment_length)
            .min(self.params.max_burst_length)
            .max(1) as usize
    }

    /// Queues `data` as Data-In PDUs of task `itt`, starting at byte `offset` of its transfer:
    /// each PDU at most the initiator's MaxRecvDataSegmentLength and within one MaxBurstLength
    /// sequence, F set on the last PDU of every sequence (RFC 7143 11.7.1), the status in the
    /// last PDU when `status` is given. `data` is moved into the PDU when it fits whole.
    fn send_data_in(
        &mut self,
        lun: u64,
        itt: u32,
        data: Vec<u8>,
        offset: &mut u64,
        data_sn: &mut u32,
        status: Option<(u8, Residual)>,
    ) {
        let segment = self.params.initiator_max_recv_data_segment_length.max(1) as u64;
        let burst = self.params.max_burst_length.max(1) as u64;
        let total = data.len() as u64;
        let mut data = Some(data);
        let mut at = 0u64;
        while at < total {
            let piece = segment.min(burst - *offset % burst).min(total - at);
            let last = at + piece == total;
            let end_of_sequence = (*offset + piece).is_multiple_of(burst);
            let last_status = if last { status } else { None };
            let seq = if last_status.is_some() {
                self.next_status()
            } else {
                self.seq()
            };
            let mut p = Pdu::data_in_header(
                lun,
                itt,
                seq,
                *data_sn,
                *offset as u32,
                end_of_sequence || last_status.is_some(),
                last_status,
            );
            p.data = if at == 0 && last {
                data.take().unwrap_or_default()
            } else {
                data.as_ref()
                    .map(|d| d[at as usize..(at + piece) as usize].to_vec())
                    .unwrap_or_default()
            };
            self.send(p);
            *data_sn = data_sn.wrapping_add(1);
            *offset += piece;
            at += piece;
        }
    }

    /// The shell ran a command: queue its Data-In and response. For a streamed READ, `result`
    /// carries the last piece of data (or the failure).
    pub fn handle_command_complete(&mut self, itt: u32, result: ScsiResult) {
        let Some(running) = self.running.remove(&itt) else {
            return;
        };
        if running.handed_out {
            self.handed_out -= 1;
        }
        self.complete(running, itt, result);
        if self.held {
            // The held request may run now (it holds again if not); frame what is behind it.
            self.held = false;
            self.handle_bytes(&[]);
        }
    }

    fn complete(&mut self, running: Running, itt: u32, result: ScsiResult) {
        if self.phase == Phase::Closing {
            return;
        }
        let Running {
            lun,
            expected_length: edtl,
            read,
            write_spdtl,
            stream,
            handed_out: _,
        } = running;
        let ScsiResult {
            status,
            sense: sense_data,
            mut data_in,
        } = result;
        let (mut offset, mut data_sn) = stream
            .as_ref()
            .map_or((0, 0), |s| (s.sent_bytes, s.data_sn));
        let produced = match &stream {
            Some(s) if status == sense::GOOD => s.transfer_bytes,
            Some(s) => s.sent_bytes,
            None => data_in.len() as u64,
        };
        let residual = match write_spdtl {
            // Writes: what the CDB wanted against what the initiator said it would send.
            Some(spdtl) => Residual::between(edtl, spdtl),
            // Reads and commands without data: what we produced against what was expected.
            None => Residual::between(edtl, if read { produced } else { 0 }),
        };
        if !read {
            data_in.clear();
        }
        data_in.truncate((edtl as u64).saturating_sub(offset) as usize);
        let collapse = status == sense::GOOD && !data_in.is_empty();
        if !data_in.is_empty() {
            let last_status = collapse.then_some((status, residual));
            self.send_data_in(lun, itt, data_in, &mut offset, &mut data_sn, last_status);
        }
        if !collapse {
            let seq = self.next_status();
            self.send(Pdu::scsi_response(
                itt,
                seq,
                status,
                &sense_data,
                data_sn,
                residual,
            ));
        }
    }

    fn handle_task_management(&mut self, t: wire::TaskManagementRequest) {
        const COMPLETE: u8 = 0;
        const NO_TASK: u8 = 1;
        const NO_LUN: u8 = 2;
        const NOT_SUPPORTED: u8 = 5;
        let Some((nexus, target)) = self.nexus_and_target() else {
            return;
        };
        let response = match t.function {
            1 => {
                // ABORT TASK: a command still gathering data is dropped; a READ the shell
                // streams stops; another command handed to the shell completes (its response
                // goes out first: the request waited for it); an unknown one is complete if
                // its CmdSN was already passed (RFC 7143 11.6.1).
                if self.writes.remove(&t.referenced_task_tag).is_some() {
                    COMPLETE
                } else if self.abort_streams(Some(t.referenced_task_tag)) > 0 {
                    // Streaming: it stops, with no response.
                    COMPLETE
                } else if self.cancel_queued(Some(t.referenced_task_tag)) > 0 {
                    // Not started yet: it never runs and gets no response.
                    COMPLETE
                } else if self.waiting.remove(&t.ref_cmd_sn).is_some() {
                    COMPLETE
                } else {
                    NO_TASK
                }
            }
            2 | 4 => {
                // ABORT TASK SET, CLEAR TASK SET.
                self.writes.clear();
                self.abort_streams(None);
                self.cancel_queued(None);
                if t.lun != 0 {
                    NO_LUN
                } else {
                    COMPLETE
                }
            }
            3 => NOT_SUPPORTED, // CLEAR ACA: we never establish ACA
            5 => {
                if t.lun != 0 {
                    NO_LUN
                } else {
                    self.writes.clear();
                    self.abort_streams(None);
                    self.cancel_queued(None);
                    let mut ids = self.registry.nexus_ids(&target.name);
                    ids.push(nexus.id);
                    target.lun.reset(&ids);
                    COMPLETE
                }
            }
            6 | 7 => {
                self.writes.clear();
                self.abort_streams(None);
                self.cancel_queued(None);
                let mut ids = self.registry.nexus_ids(&target.name);
                ids.push(nexus.id);
                target.lun.reset(&ids);
                self.events.push_back(Event::ResetTarget {
                    target: target.clone(),
                    cold: t.function == 7,
                    session_id: self.session_id,
                });
                COMPLETE
            }
            _ => NOT_SUPPORTED,
        };
        let seq = self.next_status();
        self.send(Pdu::task_management_response(t.itt, seq, response));
        if t.function == 7 {
            // A cold reset ends this connection too, after the response (RFC 7143 11.5.1).
            self.close();
        }
    }

    /// Drops commands handed out as events but not taken by the shell yet (all, or one task
    /// tag). Returns how many were dropped.
    fn cancel_queued(&mut self, itt: Option<u32>) -> usize {
        let before = self.events.len();
        let running = &mut self.running;
        self.events.retain(|e| match e {
            Event::Execute(c) if itt.is_none_or(|t| t == c.itt) => {
                running.remove(&c.itt);
                false
            }
            _ => true,
        });
        before - self.events.len()
    }

    fn handle_text(&mut self, t: wire::TextRequest, header: &[u8; BHS_LEN]) {
        // Continuation of a long response we split earlier.
        if t.ttt != TAG_NONE {
            match self.text_continuation.take() {
                Some((ttt, rest)) if ttt == t.ttt => return self.send_text(t.itt, rest),
                _ => return self.reject(reject_reason::PROTOCOL_ERROR, header),
            }
        }
        if t.continue_ {
            // Multi-PDU text requests are not needed by any initiator we know; refuse.
            return self.reject(reject_reason::COMMAND_NOT_SUPPORTED, header);
        }
        let pairs = match text::parse_pairs(&t.data) {
            Ok(p) => p,
            Err(_) => return self.reject(reject_reason::PROTOCOL_ERROR, header),
        };
        let mut out = Vec::new();
        for (key, value) in pairs {
            if key == "SendTargets" {
                self.send_targets(&value, &mut out);
            } else {
                text::push_pair(&mut out, &key, "NotUnderstood");
            }
        }
        self.send_text(t.itt, out);
    }

    fn send_text(&mut self, itt: u32, mut data: Vec<u8>) {
        let max = self.params.initiator_max_recv_data_segment_length as usize;
        if data.len() > max {
            let rest = data.split_off(max);
            let ttt = self.next_ttt;
            self.next_ttt = self.next_ttt.wrapping_add(1).max(1);
            self.text_continuation = Some((ttt, rest));
            let seq = self.next_status();
            self.send(Pdu::text_response(itt, ttt, seq, false, true, data));
        } else {
            let seq = self.next_status();
            self.send(Pdu::text_response(itt, TAG_NONE, seq, true, false, data));
        }
    }

    /// SendTargets: the targets this initiator may see, each with its portals: those of its
    /// listing (the nodes serving it now, see [`Listing`]), else this portal's own addresses.
    /// A discovery session sees every served or listed target (or the one named); a normal
    /// session only its own.
    ///
    /// [`Listing`]: super::target::Listing
    fn send_targets(&self, value: &str, out: &mut Vec<u8>) {
        let initiator = self.login.initiator_name.clone().unwrap_or_default();
        let mut found: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let portals_of = |name: &str| {
            self.registry
                .listing(name)
                .map(|l| l.portals)
                .unwrap_or_else(|| self.portal.addresses.clone())
        };
        if self.login.discovery {
            let served: Vec<Arc<TargetEntry>> = match value {
                "All" => self.registry.targets(),
                name => self.registry.target(name).into_iter().collect(),
            };
            for t in served.iter().filter(|t| t.allows(&initiator)) {
                found.insert(t.name.clone(), portals_of(&t.name));
            }
            let listed = match value {
                "All" => self.registry.listings(),
                name => self.registry.listing(name).into_iter().collect(),
            };
            for l in listed.into_iter().filter(|l| l.allows(&initiator)) {
                found.insert(l.name, l.portals);
            }
        } else {
            // In a normal session only the session's own target may be named.
            match self.target() {
                Some(t)
                    if (value.is_empty() || value == t.name || value == "All")
                        && t.allows(&initiator) =>
                {
                    found.insert(t.name.clone(), portals_of(&t.name));
                }
                _ => {}
            }
        }
        for (name, portals) in found {
            text::push_pair(out, "TargetName", &name);
            for a in &portals {
                text::push_pair(out, "TargetAddress", a);
            }
        }
    }

    // ---------------------------------------------------------------- login

    fn login_fail(&mut self, req: &LoginRequest, class: u8, detail: u8) {
        let seq = Sequence {
            stat_sn: self.stat_sn,
            exp_cmd_sn: req.cmd_sn,
            max_cmd_sn: req.cmd_sn,
        };
        self.send(Pdu::login_response(
            req,
            false,
            req.current_stage,
            0,
            0,
            seq,
            class,
            detail,
            Vec::new(),
        ));
        self.close();
    }

    fn handle_login(&mut self, req: LoginRequest) {
        const INITIATOR_ERROR: (u8, u8) = (2, 0);
        const AUTH_FAILURE: (u8, u8) = (2, 1);
        const FORBIDDEN: (u8, u8) = (2, 2);
        const NOT_FOUND: (u8, u8) = (2, 3);
        const UNSUPPORTED_VERSION: (u8, u8) = (2, 5);
        const MISSING_PARAMETER: (u8, u8) = (2, 7);
        const SESSION_DOES_NOT_EXIST: (u8, u8) = (2, 0x0a);
        let fail = |c: &mut Connection, req: &LoginRequest, (class, detail): (u8, u8)| {
            c.login_fail(req, class, detail)
        };

        if self.login.first {
            self.login.first = false;
            if req.version_min > 0 {
                return fail(self, &req, UNSUPPORTED_VERSION);
            }
            if req.tsih != 0 {
                // Adding a connection to a session (MC/S) is not offered.
                return fail(self, &req, SESSION_DOES_NOT_EXIST);
            }
            self.login.isid = req.isid;
            self.login.itt = req.itt;
            self.exp_cmd_sn = req.cmd_sn;
            self.stat_sn = req.exp_stat_sn;
        } else if req.isid != self.login.isid || req.itt != self.login.itt {
            return fail(self, &req, INITIATOR_ERROR);
        }
        if req.current_stage == 2
            || (req.transit && (req.next_stage == 2 || req.next_stage <= req.current_stage))
        {
            return fail(self, &req, INITIATOR_ERROR);
        }
        if req.current_stage < self.login.current_stage {
            return fail(self, &req, INITIATOR_ERROR);
        }
        self.login.current_stage = req.current_stage;
        if self.login.pending_text.len() + req.data.len() > TEXT_BYTES_MAX {
            return fail(self, &req, INITIATOR_ERROR);
        }
        self.login.pending_text.extend_from_slice(&req.data);
        if req.continue_ {
            // More text follows: acknowledge with an empty response (RFC 7143 6.3).
            let seq = Sequence {
                stat_sn: self.stat_sn,
                exp_cmd_sn: self.exp_cmd_sn,
                max_cmd_sn: self.exp_cmd_sn,
            };
            self.send(Pdu::login_response(
                &req,
                false,
                req.current_stage,
                0,
                0,
                seq,
                0,
                0,
                Vec::new(),
            ));
            return;
        }
        let text = std::mem::take(&mut self.login.pending_text);
        let pairs = match text::parse_pairs(&text) {
            Ok(p) => p,
            Err(err) => {
                tracing::debug!(error = %err, "bad login text");
                return fail(self, &req, INITIATOR_ERROR);
            }
        };
        let get = |k: &str| {
            pairs
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };

        // Declarations, on the first PDU that carries them.
        if self.login.initiator_name.is_none() {
            let Some(name) = get("InitiatorName") else {
                return fail(self, &req, MISSING_PARAMETER);
            };
            if name.is_empty() || name.len() > 223 {
                return fail(self, &req, INITIATOR_ERROR);
            }
            self.login.initiator_name = Some(name);
            match get("SessionType").as_deref() {
                None | Some("Normal") => {
                    let Some(target_name) = get("TargetName") else {
                        return fail(self, &req, MISSING_PARAMETER);
                    };
                    let Some(target) = self.registry.target(&target_name) else {
                        return fail(self, &req, NOT_FOUND);
                    };
                    if !target.allows(self.login.initiator_name.as_deref().unwrap_or_default()) {
                        return fail(self, &req, FORBIDDEN);
                    }
                    self.login.target = Some(target);
                }
                Some("Discovery") => self.login.discovery = true,
                Some(_) => return fail(self, &req, (2, 9)),
            }
        }
        let chap_required = self
            .login
            .target
            .as_ref()
            .and_then(|t| t.config.chap.clone());
        let mut out = Vec::new();

        // Security stage.
        if req.current_stage == stage::SECURITY {
            if let Some(methods) = get("AuthMethod") {
                if self.login.auth == Auth::Start {
                    let offered: Vec<&str> = methods.split(',').collect();
                    let choice = if chap_required.is_some() {
                        offered.iter().find(|m| **m == "CHAP").copied()
                    } else {
                        offered.iter().find(|m| **m == "None").copied().or(None)
                    };
                    match choice {
                        Some("CHAP") => {
                            self.login.auth = Auth::ChapMethod;
                            text::push_pair(&mut out, "AuthMethod", "CHAP");
                        }
                        Some(_) => {
                            self.login.auth = Auth::Done;
                            text::push_pair(&mut out, "AuthMethod", "None");
                        }
                        None => return fail(self, &req, AUTH_FAILURE),
                    }
                }
            }
            if let Some(algorithms) = get("CHAP_A") {
                if self.login.auth != Auth::ChapMethod {
                    return fail(self, &req, INITIATOR_ERROR);
                }
                if !algorithms.split(',').any(|a| a == "5") {
                    text::push_pair(&mut out, "CHAP_A", "Reject");
                    return fail(self, &req, AUTH_FAILURE);
                }
                let id = self.challenge[0];
                text::push_pair(&mut out, "CHAP_A", "5");
                text::push_pair(&mut out, "CHAP_I", &id.to_string());
                text::push_pair(&mut out, "CHAP_C", &chap::encode_hex(&self.challenge));
                self.login.auth = Auth::ChapChallenged { id };
            }
            if let Some(user) = get("CHAP_N") {
                let Auth::ChapChallenged { id } = self.login.auth else {
                    return fail(self, &req, INITIATOR_ERROR);
                };
                let Some(chap_cfg) = chap_required.clone() else {
                    return fail(self, &req, AUTH_FAILURE);
                };
                let Some(resp) = get("CHAP_R").and_then(|r| chap::decode_binary(&r)) else {
                    return fail(self, &req, AUTH_FAILURE);
                };
                let expected = chap::response(id, chap_cfg.secret.as_bytes(), &self.challenge);
                if user != chap_cfg.user || !chap::same(&resp, &expected) {
                    tracing::info!(user, "chap authentication failed");
                    return fail(self, &req, AUTH_FAILURE);
                }
                // Mutual CHAP: the initiator challenges us.
                if let Some(ci) = get("CHAP_I") {
                    let mutual = self
                        .login
                        .target
                        .as_ref()
                        .and_then(|t| t.config.mutual_chap.clone());
                    let (Some(mutual), Ok(ident), Some(challenge)) = (
                        mutual,
                        ci.parse::<u8>(),
                        get("CHAP_C").and_then(|c| chap::decode_binary(&c)),
                    ) else {
                        return fail(self, &req, AUTH_FAILURE);
                    };
                    if challenge == self.challenge || challenge.len() > 1024 {
                        // A reflected challenge would let an attacker use us as an oracle.
                        return fail(self, &req, AUTH_FAILURE);
                    }
                    let answer = chap::response(ident, mutual.secret.as_bytes(), &challenge);
                    text::push_pair(&mut out, "CHAP_N", &mutual.user);
                    text::push_pair(&mut out, "CHAP_R", &chap::encode_hex(&answer));
                } else if get("CHAP_C").is_some() {
                    return fail(self, &req, AUTH_FAILURE);
                }
                self.login.auth = Auth::Done;
            }
            // Operational keys may ride in security-stage PDUs too.
        }
        for (key, value) in &pairs {
            if text::is_login_key(key) {
                continue;
            }
            if req.current_stage == stage::SECURITY
                && self.login.auth != Auth::Done
                && !key.starts_with("X")
            {
                // Operational keys before authentication completes are not negotiated yet.
            }
            if let Some((k, v)) = self
                .login
                .negotiation
                .answer(key, value, self.login.discovery)
            {
                text::push_pair(&mut out, &k, &v);
            }
        }
        // Transition.
        let mut transit = req.transit;
        let mut next = req.next_stage;
        if transit && req.current_stage == stage::SECURITY && self.login.auth != Auth::Done {
            if self.login.auth == Auth::Start
                && chap_required.is_none()
                && get("AuthMethod").is_none()
            {
                // The initiator skipped AuthMethod: fine when none is required.
                self.login.auth = Auth::Done;
            } else if self.login.auth == Auth::Start && chap_required.is_some() {
                return fail(self, &req, AUTH_FAILURE);
            } else {
                // Still exchanging CHAP: stay in the security stage.
                transit = false;
                next = 0;
            }
        }
        if chap_required.is_some()
            && req.current_stage != stage::SECURITY
            && self.login.auth != Auth::Done
        {
            return fail(self, &req, AUTH_FAILURE);
        }
        if !self.login.sent_tpgt && !self.login.discovery {
            text::push_pair(
                &mut out,
                "TargetPortalGroupTag",
                &self.portal.portal_group_tag.to_string(),
            );
            self.login.sent_tpgt = true;
        }
        let final_login = transit && next == stage::FULL_FEATURE;
        if final_login && !self.login.negotiation.offered("MaxRecvDataSegmentLength") {
            // Declare ours even if the initiator kept the default for its own.
            text::push_pair(
                &mut out,
                "MaxRecvDataSegmentLength",
                &self.params.target_max_recv_data_segment_length.to_string(),
            );
            self.login
                .negotiation
                .answer("MaxRecvDataSegmentLength", "8192", self.login.discovery);
        }
        if final_login {
            self.tsih = self.registry.new_tsih();
        }
        let seq = Sequence {
            stat_sn: self.stat_sn,
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.exp_cmd_sn.wrapping_add(COMMANDS_MAX - 1),
        };
        self.stat_sn = self.stat_sn.wrapping_add(1);
        let current = req.current_stage;
        let response = Pdu::login_response(
            &req,
            transit,
            current,
            if transit { next } else { 0 },
            self.tsih,
            seq,
            0,
            0,
            out,
        );
        self.send(response);
        if transit {
            self.login.current_stage = next;
        }
        if final_login {
            self.params = self.login.negotiation.params.clone();
            self.session_id = self.registry.new_session_id();
            let nexus = Nexus {
                id: nexus_id(
                    self.login.initiator_name.as_deref().unwrap_or_default(),
                    &self.login.isid,
                ),
                initiator_name: self.login.initiator_name.clone().unwrap_or_default(),
                isid: self.login.isid,
            };
            self.session = Some((nexus, self.login.target.clone()));
            self.phase = Phase::FullFeature;
        }
    }

    /// TSIH given to the session at the end of login (0 before).
    pub fn tsih(&self) -> u16 {
        self.tsih
    }

    /// ISID of the initiator port.
    pub fn isid(&self) -> [u8; 6] {
        self.login.isid
    }

    /// Whether the initiator expects a read for `itt` that could take the fast read path.
    pub fn running(&self, itt: u32) -> bool {
        self.running.contains_key(&itt)
    }

    /// Statistic for the opcode of a header, used by tests.
    pub fn opcode_of(header: &[u8]) -> u8 {
        header.first().map(|b| b & 0x3f).unwrap_or(opcode::NOP_OUT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{BlockDevice, DeviceError};
    use crate::iscsi::target::{Listing, TargetConfig};
    use crate::iscsi::wire::{DataOut as WireDataOut, NopOut, TextRequest};
    use proptest::prelude::*;
    use std::sync::Mutex;

    const IQN: &str = "iqn.2026-11.org.cairn:client.525400770010";

    /// A memory device for sans-IO tests.
    struct Memory(Mutex<Vec<u8>>);
    impl BlockDevice for Memory {
        fn block_size_bytes(&self) -> u32 {
            512
        }
        fn block_count(&self) -> u64 {
            self.0.lock().unwrap().len() as u64 / 512
        }
        fn unique_id(&self) -> [u8; 16] {
            [9; 16]
        }
        fn read(&self, lba: u64, buffer: &mut [u8]) -> Result<(), DeviceError> {
            let m = self.0.lock().unwrap();
            let at = lba as usize * 512;
            buffer.copy_from_slice(&m[at..at + buffer.len()]);
            Ok(())
        }
        fn write(&self, lba: u64, data: &[u8], _fua: bool) -> Result<(), DeviceError> {
            let mut m = self.0.lock().unwrap();
            let at = lba as usize * 512;
            m[at..at + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn unmap(&self, lba: u64, blocks: u64) -> Result<(), DeviceError> {
            let mut m = self.0.lock().unwrap();
            let at = lba as usize * 512;
            m[at..at + blocks as usize * 512].fill(0);
            Ok(())
        }
        fn flush(&self) -> Result<(), DeviceError> {
            Ok(())
        }
    }

    fn connection() -> Connection {
        connection_with_bytes(512 * 1024)
    }

    fn connection_with_bytes(device_bytes: usize) -> Connection {
        let registry = Arc::new(Registry::default());
        registry
            .add_target(
                IQN,
                Arc::new(Memory(Mutex::new(vec![0; device_bytes]))),
                TargetConfig::default(),
            )
            .unwrap();
        Connection::new(
            registry,
            PortalInfo {
                addresses: vec!["127.0.0.1:3260,1".into()],
                portal_group_tag: 1,
            },
            [5; 16],
        )
    }

    /// Runs every pending command and returns what the connection sends.
    fn drain(c: &mut Connection) -> Vec<Pdu> {
        while let Some(e) = c.poll_event() {
            if let Event::Execute(cmd) = e {
                let r = cmd
                    .target
                    .lun
                    .execute(&cmd.nexus, cmd.lun, &cmd.cdb, &cmd.data_out);
                c.handle_command_complete(cmd.itt, r);
            }
        }
        std::iter::from_fn(|| c.poll_transmit().map(|(p, _, _)| p)).collect()
    }

    fn login(c: &mut Connection, extra: &[(&str, &str)]) -> Vec<Pdu> {
        let mut text = Vec::new();
        for (k, v) in [
            ("InitiatorName", "iqn.2026-11.org.cairn:test"),
            ("TargetName", IQN),
            ("AuthMethod", "None"),
        ]
        .iter()
        .chain(extra.iter())
        {
            text::push_pair(&mut text, k, v);
        }
        let req = LoginRequest {
            transit: true,
            continue_: false,
            current_stage: 0,
            next_stage: 3,
            version_max: 0,
            version_min: 0,
            isid: [0x80, 0, 0, 0, 0, 1],
            tsih: 0,
            itt: 1,
            cid: 0,
            cmd_sn: 10,
            exp_stat_sn: 0,
            data: text,
        };
        c.handle_bytes(&InitiatorPdu::Login(req).to_pdu().encode(false, false));
        drain(c)
    }

    /// A discovery session's `SendTargets=<value>` answer, as (key, value) pairs.
    fn send_targets(c: &mut Connection, value: &str) -> Vec<(String, String)> {
        let mut data = Vec::new();
        text::push_pair(&mut data, "SendTargets", value);
        let request = InitiatorPdu::Text(TextRequest {
            immediate: true,
            final_: true,
            continue_: false,
            lun: 0,
            itt: 7,
            ttt: TAG_NONE,
            cmd_sn: 10,
            exp_stat_sn: 1,
            data,
        });
        c.handle_bytes(&request.to_pdu().encode(false, false));
        let answer = drain(c).pop().expect("a text response");
        // SendTargets repeats keys, which `parse_pairs` refuses in negotiation.
        answer
            .data
            .split(|b| *b == 0)
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let pair = std::str::from_utf8(pair).expect("utf-8");
                let (key, value) = pair.split_once('=').expect("key=value");
                (key.to_string(), value.to_string())
            })
            .collect()
    }

    #[test]
    fn send_targets_lists_the_portals_serving_each_target() {
        const INITIATOR: &str = "iqn.2026-11.org.cairn:test";
        const ELSEWHERE: &str = "iqn.2026-11.org.cairn:client.525400770011";
        let pairs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
            list.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let mut c = connection();
        let registry = c.registry.clone();
        login(&mut c, &[("SessionType", "Discovery")]);
        // Nothing listed: the served target at this portal's own address.
        assert_eq!(
            send_targets(&mut c, "All"),
            pairs(&[("TargetName", IQN), ("TargetAddress", "127.0.0.1:3260,1")])
        );
        // Listed: the served target at the portals of its session (this one among them), a
        // target served only elsewhere, and not one this initiator may not see.
        registry.set_listings([
            Listing {
                name: IQN.into(),
                allowed_initiators: vec![INITIATOR.into()],
                portals: vec!["127.0.0.2:3260,1".into(), "127.0.0.1:3260,1".into()],
            },
            Listing {
                name: ELSEWHERE.into(),
                allowed_initiators: vec![INITIATOR.to_uppercase()],
                portals: vec!["127.0.0.3:3260,1".into()],
            },
            Listing {
                name: "iqn.2026-11.org.cairn:client.525400770012".into(),
                allowed_initiators: vec!["iqn.2026-11.org.cairn:someone-else".into()],
                portals: vec!["127.0.0.3:3260,1".into()],
            },
        ]);
        assert_eq!(
            send_targets(&mut c, "All"),
            pairs(&[
                ("TargetName", IQN),
                ("TargetAddress", "127.0.0.2:3260,1"),
                ("TargetAddress", "127.0.0.1:3260,1"),
                ("TargetName", ELSEWHERE),
                ("TargetAddress", "127.0.0.3:3260,1"),
            ])
        );
        assert_eq!(
            send_targets(&mut c, ELSEWHERE),
            pairs(&[
                ("TargetName", ELSEWHERE),
                ("TargetAddress", "127.0.0.3:3260,1")
            ])
        );
        assert!(send_targets(&mut c, "iqn.2026-11.org.cairn:client.525400770012").is_empty());
    }

    #[allow(clippy::too_many_arguments)]
    fn command(
        cmd_sn: u32,
        itt: u32,
        cdb: &[u8],
        read: bool,
        write: bool,
        edtl: u32,
        data: Vec<u8>,
        final_: bool,
    ) -> Vec<u8> {
        let mut full = cdb.to_vec();
        full.resize(16, 0);
        InitiatorPdu::ScsiCommand(ScsiCommand {
            immediate: false,
            final_,
            read,
            write,
            attributes: 1,
            lun: 0,
            itt,
            expected_data_transfer_length: edtl,
            cmd_sn,
            exp_stat_sn: 0,
            cdb: full,
            data,
        })
        .to_pdu()
        .encode(false, false)
    }

    #[test]
    fn login_then_write_with_r2t_then_read_back() {
        let mut c = connection();
        let out = login(
            &mut c,
            &[
                ("InitialR2T", "Yes"),
                ("ImmediateData", "Yes"),
                ("MaxBurstLength", "4096"),
            ],
        );
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].opcode(), opcode::LOGIN_RESPONSE);
        assert_eq!(out[0].bhs[36], 0);
        // WRITE(10) of 16 blocks at LBA 8: 512 bytes immediate, the rest by two R2Ts of 4096.
        let payload: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
        let cdb = [0x2a, 0, 0, 0, 0, 8, 0, 0, 16, 0];
        c.handle_bytes(&command(
            10,
            0x100,
            &cdb,
            false,
            true,
            8192,
            payload[..512].to_vec(),
            true,
        ));
        let out = drain(&mut c);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].opcode(), opcode::R2T);
        let mut offset = wire::be32(&out[0].bhs, 40);
        let mut length = wire::be32(&out[0].bhs, 44);
        let mut ttt = wire::be32(&out[0].bhs, 20);
        assert_eq!((offset, length), (512, 4096));
        loop {
            let d = InitiatorPdu::DataOut(WireDataOut {
                final_: true,
                lun: 0,
                itt: 0x100,
                ttt,
                exp_stat_sn: 0,
                data_sn: 0,
                buffer_offset: offset,
                data: payload[offset as usize..(offset + length) as usize].to_vec(),
            });
            c.handle_bytes(&d.to_pdu().encode(false, false));
            let out = drain(&mut c);
            assert_eq!(out.len(), 1);
            if out[0].opcode() == opcode::SCSI_RESPONSE {
                assert_eq!(out[0].bhs[3], 0, "write failed");
                break;
            }
            assert_eq!(out[0].opcode(), opcode::R2T);
            offset = wire::be32(&out[0].bhs, 40);
            length = wire::be32(&out[0].bhs, 44);
            ttt = wire::be32(&out[0].bhs, 20);
        }
        // READ(10) back: one Data-In with status (phase collapse).
        let cdb = [0x28, 0, 0, 0, 0, 8, 0, 0, 16, 0];
        c.handle_bytes(&command(
            11,
            0x101,
            &cdb,
            true,
            false,
            8192,
            Vec::new(),
            true,
        ));
        let out = drain(&mut c);
        let data: Vec<u8> = out
            .iter()
            .filter(|p| p.opcode() == opcode::DATA_IN)
            .flat_map(|p| p.data.clone())
            .collect();
        assert_eq!(data, payload);
        let last = out.last().unwrap();
        assert_eq!(last.bhs[1] & 0x81, 0x81, "final Data-In carries status");
    }

    /// A WRITE far above the advertised MAXIMUM TRANSFER LENGTH (8,192 blocks) is gathered
    /// burst by burst (R2Ts of MaxBurstLength) and written whole; one above what a session may
    /// gather is refused with CHECK CONDITION, not left waiting.
    #[test]
    fn write_of_20000_blocks_arrives_by_r2t_and_is_written() {
        let mut c = connection_with_bytes(16 << 20);
        login(
            &mut c,
            &[
                ("InitialR2T", "Yes"),
                ("ImmediateData", "No"),
                ("MaxBurstLength", "65536"),
            ],
        );
        let blocks = 20_000u32;
        let payload: Vec<u8> = (0..blocks * 512).map(|i| (i % 249) as u8).collect();
        let mut cdb = vec![0x8a, 0];
        cdb.extend_from_slice(&16u64.to_be_bytes());
        cdb.extend_from_slice(&blocks.to_be_bytes());
        cdb.extend_from_slice(&[0, 0]);
        let edtl = blocks * 512;
        c.handle_bytes(&command(
            10,
            0x200,
            &cdb,
            false,
            true,
            edtl,
            Vec::new(),
            true,
        ));
        let mut r2ts = 0;
        let response = loop {
            let out = drain(&mut c);
            assert_eq!(out.len(), 1, "{out:?}");
            if out[0].opcode() != opcode::R2T {
                break out[0].clone();
            }
            r2ts += 1;
            let (ttt, offset, length) = (
                wire::be32(&out[0].bhs, 20),
                wire::be32(&out[0].bhs, 40),
                wire::be32(&out[0].bhs, 44),
            );
            assert!(length <= 65536, "R2T beyond MaxBurstLength: {length}");
            let d = InitiatorPdu::DataOut(WireDataOut {
                final_: true,
                lun: 0,
                itt: 0x200,
                ttt,
                exp_stat_sn: 0,
                data_sn: 0,
                buffer_offset: offset,
                data: payload[offset as usize..(offset + length) as usize].to_vec(),
            });
            c.handle_bytes(&d.to_pdu().encode(false, false));
        };
        assert_eq!(response.opcode(), opcode::SCSI_RESPONSE);
        assert_eq!(response.bhs[3], 0, "write failed");
        assert_eq!(r2ts, (edtl as usize).div_ceil(65536));
        let target = c.target().unwrap();
        let mut back = vec![0u8; payload.len()];
        target.lun.read_blocks(16, &mut back).unwrap();
        assert!(back == payload, "written data differs");
        // Beyond what a session may gather: refused at once.
        let too_many = (TRANSFER_BYTES_MAX / 512) + 8;
        let mut cdb = vec![0x8a, 0];
        cdb.extend_from_slice(&0u64.to_be_bytes());
        cdb.extend_from_slice(&too_many.to_be_bytes());
        cdb.extend_from_slice(&[0, 0]);
        c.handle_bytes(&command(
            11,
            0x201,
            &cdb,
            false,
            true,
            too_many * 512,
            Vec::new(),
            true,
        ));
        let out = drain(&mut c);
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].opcode(), out[0].bhs[3]),
            (opcode::SCSI_RESPONSE, sense::CHECK_CONDITION)
        );
    }

    #[test]
    fn commands_out_of_order_wait_and_out_of_window_are_dropped() {
        let mut c = connection();
        login(&mut c, &[]);
        let tur = [0u8; 6];
        // CmdSN 11 before 10: held, then both answered in order.
        c.handle_bytes(&command(11, 2, &tur, false, false, 0, Vec::new(), true));
        assert!(drain(&mut c).is_empty());
        c.handle_bytes(&command(10, 1, &tur, false, false, 0, Vec::new(), true));
        let out = drain(&mut c);
        assert_eq!(out.iter().map(|p| p.itt()).collect::<Vec<_>>(), vec![1, 2]);
        // Far outside the window: silently ignored.
        c.handle_bytes(&command(5000, 3, &tur, false, false, 0, Vec::new(), true));
        assert!(drain(&mut c).is_empty());
        // Still alive.
        let nop = InitiatorPdu::NopOut(NopOut {
            immediate: true,
            lun: 0,
            itt: 9,
            ttt: TAG_NONE,
            cmd_sn: 12,
            exp_stat_sn: 0,
            data: vec![],
        });
        c.handle_bytes(&nop.to_pdu().encode(false, false));
        assert_eq!(drain(&mut c)[0].opcode(), opcode::NOP_IN);
    }

    /// The shell may run several commands at once: a task management request arriving while
    /// it runs some waits until they completed, so their responses precede its response, and
    /// input behind it waits too.
    #[test]
    fn task_management_waits_for_commands_the_shell_runs() {
        let mut c = connection();
        login(&mut c, &[]);
        let read = [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0];
        let mut bytes = command(10, 1, &read, true, false, 512, Vec::new(), true);
        bytes.extend(command(11, 2, &read, true, false, 512, Vec::new(), true));
        c.handle_bytes(&bytes);
        let taken: Vec<Command> = std::iter::from_fn(|| c.poll_event())
            .filter_map(|e| match e {
                Event::Execute(cmd) => Some(cmd),
                _ => None,
            })
            .collect();
        assert_eq!(taken.len(), 2);
        assert_eq!(c.commands_out(), 2);
        // ABORT TASK SET, then a TEST UNIT READY behind it.
        let tmf = InitiatorPdu::TaskManagement(wire::TaskManagementRequest {
            immediate: true,
            function: 2,
            lun: 0,
            itt: 7,
            referenced_task_tag: TAG_NONE,
            cmd_sn: 12,
            exp_stat_sn: 0,
            ref_cmd_sn: 0,
            exp_data_sn: 0,
        });
        let mut bytes = tmf.to_pdu().encode(false, false);
        bytes.extend(command(12, 3, &[0u8; 6], false, false, 0, Vec::new(), true));
        c.handle_bytes(&bytes);
        assert!(c.input_held());
        assert!(c.poll_transmit().is_none() && c.poll_event().is_none());
        // Completed out of order (tasks are independent); the TMF answers after the last.
        for cmd in taken.into_iter().rev() {
            let r = cmd
                .target
                .lun
                .execute(&cmd.nexus, cmd.lun, &cmd.cdb, &cmd.data_out);
            c.handle_command_complete(cmd.itt, r);
        }
        assert!(!c.input_held());
        let out = drain(&mut c);
        assert_eq!(
            out.iter()
                .map(|p| (p.opcode(), p.itt()))
                .collect::<Vec<_>>(),
            vec![
                (opcode::DATA_IN, 2),
                (opcode::DATA_IN, 1),
                (opcode::TASK_MANAGEMENT_RESPONSE, 7),
                (opcode::SCSI_RESPONSE, 3),
            ]
        );
        // StatSN follows the order responses leave in.
        let stat_sns: Vec<u32> = out.iter().map(|p| wire::be32(&p.bhs, 24)).collect();
        assert!(
            stat_sns.windows(2).all(|w| w[1] == w[0].wrapping_add(1)),
            "{stat_sns:?}"
        );
    }

    /// A READ the shell streams does not hold a task management request back: ABORT TASK
    /// stops it at once (no more Data-In, no response) and its task tag is free again once the
    /// shell took notice.
    #[test]
    fn abort_task_stops_a_streamed_read_at_once() {
        let mut c = connection();
        login(&mut c, &[]);
        let read = [0x28, 0, 0, 0, 0, 0, 0, 0, 64, 0];
        c.handle_bytes(&command(
            10,
            1,
            &read,
            true,
            false,
            64 * 512,
            Vec::new(),
            true,
        ));
        let Some(Event::Execute(cmd)) = c.poll_event() else {
            panic!("no command");
        };
        c.handle_read_start(cmd.itt, 64 * 512);
        c.handle_read_data(cmd.itt, vec![1; 8192]);
        assert_eq!(drain(&mut c).len(), 1);
        let abort = InitiatorPdu::TaskManagement(wire::TaskManagementRequest {
            immediate: true,
            function: 1,
            lun: 0,
            itt: 7,
            referenced_task_tag: 1,
            cmd_sn: 11,
            exp_stat_sn: 0,
            ref_cmd_sn: 10,
            exp_data_sn: 0,
        });
        c.handle_bytes(&abort.to_pdu().encode(false, false));
        assert!(!c.input_held());
        let out = drain(&mut c);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].opcode(), opcode::TASK_MANAGEMENT_RESPONSE);
        assert_eq!(out[0].bhs[2], 0, "function complete");
        // Pieces still in flight are dropped; the tag stays taken until the shell knows.
        c.handle_read_data(1, vec![2; 8192]);
        c.handle_command_complete(1, ScsiResult::good(vec![3; 8192]));
        assert!(drain(&mut c).is_empty());
        c.handle_bytes(&command(
            11,
            1,
            &[0u8; 6],
            false,
            false,
            0,
            Vec::new(),
            true,
        ));
        assert_eq!(drain(&mut c)[0].opcode(), opcode::REJECT);
        assert!(c.take_stream_aborted(1));
        assert!(!c.take_stream_aborted(1));
        c.handle_bytes(&command(
            12,
            1,
            &[0u8; 6],
            false,
            false,
            0,
            Vec::new(),
            true,
        ));
        let out = drain(&mut c);
        assert_eq!((out[0].opcode(), out[0].itt()), (opcode::SCSI_RESPONSE, 1));
    }

    #[test]
    fn write_past_the_end_is_check_condition_and_writes_nothing() {
        let mut c = connection();
        login(&mut c, &[]);
        // 1024 blocks on the device; write 2 blocks at 1023.
        let cdb = [0x2a, 0, 0, 0, 0x03, 0xff, 0, 0, 2, 0];
        c.handle_bytes(&command(
            10,
            1,
            &cdb,
            false,
            true,
            1024,
            vec![0xaa; 1024],
            true,
        ));
        let out = drain(&mut c);
        assert_eq!(out[0].opcode(), opcode::SCSI_RESPONSE);
        assert_eq!(out[0].bhs[3], sense::CHECK_CONDITION);
        let s = &out[0].data[2..];
        assert_eq!(
            (s[2] & 0x0f, s[12], s[13]),
            (sense::key::ILLEGAL_REQUEST, 0x21, 0x00)
        );
        let cdb = [0x28, 0, 0, 0, 0x03, 0xff, 0, 0, 1, 0];
        c.handle_bytes(&command(11, 2, &cdb, true, false, 512, Vec::new(), true));
        let out = drain(&mut c);
        assert!(
            out[0].data.iter().all(|b| *b == 0),
            "the failed write changed the last block"
        );
    }

    #[test]
    fn digests_are_negotiated_checked_and_sent() {
        let mut c = connection();
        let out = login(
            &mut c,
            &[("HeaderDigest", "CRC32C,None"), ("DataDigest", "CRC32C")],
        );
        let text = String::from_utf8_lossy(&out[0].data).to_string();
        assert!(
            text.contains("HeaderDigest=CRC32C") && text.contains("DataDigest=CRC32C"),
            "{text}"
        );
        let nop = |itt: u32| {
            InitiatorPdu::NopOut(NopOut {
                immediate: true,
                lun: 0,
                itt,
                ttt: TAG_NONE,
                cmd_sn: 10,
                exp_stat_sn: 0,
                data: b"abc".to_vec(),
            })
            .to_pdu()
        };
        // A good PDU with both digests is answered, and the answer carries digests too.
        c.handle_bytes(&nop(1).encode(true, true));
        let mut sent = Vec::new();
        while let Some((p, h, d)) = c.poll_transmit() {
            assert!(h && d);
            p.encode_into(&mut sent, h, d);
        }
        let decoder = FrameDecoder {
            header_digest: true,
            data_digest: true,
            data_segment_len_max: 1 << 20,
        };
        assert!(
            matches!(decoder.decode(&sent), Ok(Decoded::Pdu(p, _)) if p.opcode() == opcode::NOP_IN && p.data == b"abc")
        );
        // A corrupted data digest: Reject with reason "data digest error", connection stays up.
        let mut bad = nop(2).encode(true, true);
        let n = bad.len();
        bad[n - 1] ^= 1;
        c.handle_bytes(&bad);
        let out = drain(&mut c);
        assert_eq!(out[0].opcode(), opcode::REJECT);
        assert_eq!(out[0].bhs[2], reject_reason::DATA_DIGEST_ERROR);
        c.handle_bytes(&nop(3).encode(true, true));
        assert_eq!(drain(&mut c)[0].itt(), 3);
        // A corrupted header digest: the stream cannot be trusted, the connection closes.
        let mut bad = nop(4).encode(true, true);
        bad[50] ^= 1;
        c.handle_bytes(&bad);
        assert!(c.is_closing());
    }

    /// Streams READ `itt` the way the tokio shell does: checked by `start_read`, then pieces of
    /// `piece_bytes`, the last one through `handle_command_complete`.
    fn stream(c: &mut Connection, piece_bytes: usize) -> Vec<Pdu> {
        let mut out = Vec::new();
        while let Some(e) = c.poll_event() {
            let Event::Execute(cmd) = e else { continue };
            let lun = cmd.target.lun.clone();
            let extent = match lun.start_read(&cmd.nexus, cmd.lun, &cmd.cdb) {
                Ok(extent) => extent,
                Err(result) => {
                    c.handle_command_complete(cmd.itt, result);
                    continue;
                }
            };
            c.handle_read_start(cmd.itt, extent.bytes());
            let wanted = extent.bytes().min(cmd.expected_length as u64);
            let mut at = 0u64;
            loop {
                let n = (piece_bytes as u64).min(wanted - at);
                let mut buffer = vec![0u8; n as usize];
                lun.read_blocks(extent.lba + at / 512, &mut buffer).unwrap();
                at += n;
                if at == wanted {
                    c.handle_command_complete(cmd.itt, ScsiResult::good(buffer));
                    break;
                }
                c.handle_read_data(cmd.itt, buffer);
                out.extend(std::iter::from_fn(|| c.poll_transmit().map(|(p, _, _)| p)));
            }
        }
        out.extend(std::iter::from_fn(|| c.poll_transmit().map(|(p, _, _)| p)));
        out
    }

    #[test]
    fn streamed_read_longer_than_the_transfer_limit_is_whole_and_in_sequences() {
        let mut c = connection();
        login(
            &mut c,
            &[
                ("MaxRecvDataSegmentLength", "8192"),
                ("MaxBurstLength", "65536"),
            ],
        );
        // Fill the 1024-block device with a pattern, directly.
        let pattern: Vec<u8> = (0..512 * 1024u32).map(|i| (i / 512 + i) as u8).collect();
        c.registry
            .target(IQN)
            .unwrap()
            .lun
            .device()
            .write(0, &pattern, false)
            .unwrap();
        // READ(16) of 1000 blocks at LBA 10: longer than one burst, many PDUs.
        let mut cdb = vec![0x88, 0];
        cdb.extend_from_slice(&10u64.to_be_bytes());
        cdb.extend_from_slice(&1000u32.to_be_bytes());
        cdb.extend_from_slice(&[0, 0]);
        let edtl = 1000 * 512;
        c.handle_bytes(&command(10, 7, &cdb, true, false, edtl, Vec::new(), true));
        let out = stream(&mut c, 3 * 8192);
        let mut data = Vec::new();
        for (sn, p) in out.iter().enumerate() {
            assert_eq!(p.opcode(), opcode::DATA_IN);
            assert!(p.data.len() <= 8192);
            assert_eq!(wire::be32(&p.bhs, 36), sn as u32, "DataSN");
            assert_eq!(wire::be32(&p.bhs, 40) as usize, data.len(), "buffer offset");
            data.extend_from_slice(&p.data);
            let end_of_burst = data.len() % 65536 == 0 || sn == out.len() - 1;
            assert_eq!(p.bhs[1] & 0x80 != 0, end_of_burst, "F bit of PDU {sn}");
            assert_eq!(
                p.bhs[1] & 0x01 != 0,
                sn == out.len() - 1,
                "S bit of PDU {sn}"
            );
        }
        assert_eq!(data, pattern[10 * 512..1010 * 512]);
        let last = out.last().unwrap();
        assert_eq!((last.bhs[3], last.bhs[1] & 0x06), (sense::GOOD, 0));
        // The initiator expects less than the CDB asks: it gets what it expects, and the
        // residual says how much more the command had (overflow).
        c.handle_bytes(&command(11, 8, &cdb, true, false, 4096, Vec::new(), true));
        let out = stream(&mut c, 8192);
        let data: Vec<u8> = out.iter().flat_map(|p| p.data.clone()).collect();
        assert_eq!(data, pattern[10 * 512..10 * 512 + 4096]);
        let last = out.last().unwrap();
        assert_eq!(
            last.bhs[1] & 0x05,
            0x05,
            "status in the last Data-In, overflow"
        );
        assert_eq!(wire::be32(&last.bhs, 44), edtl - 4096);
    }

    #[test]
    fn read_expecting_more_than_the_write_limit_is_accepted_and_past_the_end_refused() {
        let mut c = connection();
        login(&mut c, &[]);
        // An expected length above TRANSFER_BYTES_MAX does not refuse a READ; its range does.
        let mut cdb = vec![0x88, 0];
        cdb.extend_from_slice(&0u64.to_be_bytes());
        cdb.extend_from_slice(&20_000u32.to_be_bytes());
        cdb.extend_from_slice(&[0, 0]);
        c.handle_bytes(&command(
            10,
            1,
            &cdb,
            true,
            false,
            20_000 * 512,
            Vec::new(),
            true,
        ));
        let out = stream(&mut c, 65536);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].opcode(), opcode::SCSI_RESPONSE);
        let s = &out[0].data[2..];
        assert_eq!((s[12], s[13]), (0x21, 0x00), "lba out of range");
        // A write longer than a session may gather is refused up front.
        let mut cdb = vec![0x8a, 0];
        cdb.extend_from_slice(&0u64.to_be_bytes());
        cdb.extend_from_slice(&70_000u32.to_be_bytes());
        cdb.extend_from_slice(&[0, 0]);
        c.handle_bytes(&command(
            11,
            2,
            &cdb,
            false,
            true,
            70_000 * 512,
            Vec::new(),
            false,
        ));
        let out = drain(&mut c);
        assert_eq!(out[0].bhs[3], sense::CHECK_CONDITION);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_after_login_never_panic(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8)) {
            let mut c = connection();
            login(&mut c, &[]);
            for chunk in chunks {
                c.handle_bytes(&chunk);
                drain(&mut c);
            }
        }

        #[test]
        fn arbitrary_login_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut c = connection();
            c.handle_bytes(&bytes);
            drain(&mut c);
        }

        #[test]
        fn arbitrary_cdbs_never_panic(cdb in proptest::collection::vec(any::<u8>(), 6..16), edtl in 0u32..70000, write in any::<bool>()) {
            let mut c = connection();
            login(&mut c, &[]);
            let data = if write { vec![0x5a; (edtl as usize).min(4096)] } else { Vec::new() };
            c.handle_bytes(&command(10, 1, &cdb, !write, write, edtl, data, true));
            drain(&mut c);
        }
    }
}
