//! The sans-IO DHCP decision core: one received datagram in, one [`Decision`] out.
//!
//! No sockets, no clock, no spawning: `now_unix_secs` comes in as an argument, client lookups
//! through [`ClientLookup`], and lease commits go out as [`Decision::CommitThenReply`], which the
//! shell must commit before it sends the reply, then report with [`DhcpCore::handle_commit`].
//!
//! Bad input (undecodable bytes, BOOTREPLY opcodes, non-Ethernet hardware, missing or unknown
//! message types, wrong-typed options) is ignored: silence, never a panic, never a lease.

use std::net::{Ipv4Addr, SocketAddrV4};

use dhcproto::v4::{self, DhcpOption, MessageType, Opcode, OptionCode};

use super::config::{ConfigError, DhcpConfig, DhcpMode, UnknownClientPolicy};
use super::leases::{BindingState, LeaseBook};
use super::{ClientLookup, ClientStatus, DiscoveredClient, Lease};
use crate::mac::MacAddr;

/// One received datagram.
#[derive(Debug, Clone, Copy)]
pub struct Packet<'a> {
    pub bytes: &'a [u8],
    /// Sender address (a relay agent, or the client).
    pub source: SocketAddrV4,
    /// Our port it arrived on: `server_port` (67) or, in proxy mode, `proxy_port` (4011).
    pub local_port: u16,
}

/// Where and what to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub message: v4::Message,
    pub to: SocketAddrV4,
}

impl Reply {
    /// Encodes the reply, padded to the 300-byte BOOTP minimum some PXE ROMs insist on.
    pub fn encode(&self) -> Result<Vec<u8>, dhcproto::error::EncodeError> {
        use dhcproto::Encodable;
        let mut bytes = self.message.to_vec()?;
        if bytes.len() < 300 {
            bytes.resize(300, 0);
        }
        Ok(bytes)
    }
}

/// Why a datagram got no answer (for logs and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    Malformed,
    NotARequest,
    NotEthernet,
    NoMessageType,
    UnhandledMessageType,
    UnknownClient,
    NotPxeClient,
    NoPool,
    PoolExhausted,
    OtherServerChosen,
    NoBinding,
    Released,
}

impl Ignored {
    /// A stable snake_case name (metrics label).
    pub fn as_str(self) -> &'static str {
        match self {
            Ignored::Malformed => "malformed",
            Ignored::NotARequest => "not_a_request",
            Ignored::NotEthernet => "not_ethernet",
            Ignored::NoMessageType => "no_message_type",
            Ignored::UnhandledMessageType => "unhandled_message_type",
            Ignored::UnknownClient => "unknown_client",
            Ignored::NotPxeClient => "not_pxe_client",
            Ignored::NoPool => "no_pool",
            Ignored::PoolExhausted => "pool_exhausted",
            Ignored::OtherServerChosen => "other_server_chosen",
            Ignored::NoBinding => "no_binding",
            Ignored::Released => "released",
        }
    }
}

/// What the shell must do with a datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Stay silent.
    Ignore(Ignored),
    /// Send now (offers, NAKs, proxyDHCP answers, INFORM acks).
    Reply(Reply),
    /// Commit `lease` (DHCPREQUEST granted, or DHCPRELEASE), then send `reply` if any, then
    /// call [`DhcpCore::handle_commit`] with the outcome.
    CommitThenReply { lease: Lease, reply: Option<Reply> },
}

/// A decision plus the unknown client to record, if the request came from one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub decision: Decision,
    pub discovered: Option<DiscoveredClient>,
}

/// The decision core of one DHCP server.
#[derive(Debug, Clone)]
pub struct DhcpCore {
    config: DhcpConfig,
    book: LeaseBook,
    epoch: Option<u64>,
}

/// The parts of a request the decision needs, read once.
struct Request {
    message: v4::Message,
    kind: MessageType,
    mac: MacAddr,
    requested_ip: Option<Ipv4Addr>,
    server_id: Option<Ipv4Addr>,
    hostname: Option<String>,
    architecture: Option<u16>,
    vendor_class: Option<Vec<u8>>,
    is_ipxe: bool,
    is_pxe: bool,
    wants: Vec<OptionCode>,
}

const IPXE_ENCAPSULATED: u8 = 175;
const IPXE_NO_PXEDHCP: u8 = 176;

impl DhcpCore {
    pub fn new(config: DhcpConfig) -> Result<DhcpCore, ConfigError> {
        config.validate()?;
        let book = LeaseBook::new(&config.pools);
        Ok(DhcpCore {
            config,
            book,
            epoch: None,
        })
    }

    pub fn config(&self) -> &DhcpConfig {
        &self.config
    }

    pub fn book(&self) -> &LeaseBook {
        &self.book
    }

    /// The epoch whose lease table the book holds (see [`super::BootDirectory::leader_epoch`]).
    pub fn epoch(&self) -> Option<u64> {
        self.epoch
    }

    /// Rebuilds the lease book from the committed table for a new leadership epoch. In-flight
    /// offers and commits of the old epoch are forgotten (their commits fail or are re-done).
    pub fn handle_leadership(&mut self, epoch: u64, leases: &[Lease]) {
        self.book.load(leases);
        self.epoch = Some(epoch);
    }

    /// Reports a commit's outcome for a lease from [`Decision::CommitThenReply`].
    ///
    /// A failed commit may still have been applied (a Raft timeout does not undo the entry), so
    /// the address stays bound to the MAC until the later of the old and the attempted expiry:
    /// it can never be handed to another MAC while the table might name it.
    pub fn handle_commit(&mut self, lease: &Lease, committed: bool, _now_unix_secs: u64) {
        let previous = match self.book.binding_of_ip(lease.ip) {
            Some(b) if b.mac == lease.mac => match b.state {
                BindingState::Committing {
                    previous_expires_unix_secs,
                    ..
                } => previous_expires_unix_secs,
                // Another commit of the same lease finished first: keep the later expiry.
                BindingState::Bound { expires_unix_secs } => {
                    if committed && lease.expires_unix_secs > expires_unix_secs {
                        self.book.set_state(
                            lease.ip,
                            lease.mac,
                            BindingState::Bound {
                                expires_unix_secs: lease.expires_unix_secs,
                            },
                        );
                    }
                    return;
                }
                _ => return,
            },
            _ => return,
        };
        let expires_unix_secs = if committed {
            lease.expires_unix_secs
        } else {
            lease.expires_unix_secs.max(previous)
        };
        self.book.set_state(
            lease.ip,
            lease.mac,
            BindingState::Bound { expires_unix_secs },
        );
    }

    /// Decides what to do with one datagram.
    pub fn handle_packet(
        &mut self,
        now_unix_secs: u64,
        packet: Packet<'_>,
        clients: &dyn ClientLookup,
    ) -> Outcome {
        let request = match parse_request(packet.bytes) {
            Ok(request) => request,
            Err(ignored) => {
                return Outcome {
                    decision: Decision::Ignore(ignored),
                    discovered: None,
                }
            }
        };
        let status = clients.client(request.mac);
        let discovered = (status == ClientStatus::Unknown).then(|| DiscoveredClient {
            mac: request.mac,
            architecture: request.architecture,
            vendor_class: request
                .vendor_class
                .as_ref()
                .map(|v| String::from_utf8_lossy(v).into_owned()),
            hostname: request.hostname.clone(),
            relay: request.message.giaddr(),
        });
        let answer = status == ClientStatus::Registered
            || self.config.unknown_clients == UnknownClientPolicy::Answer;
        let decision = if !answer
            && matches!(
                request.kind,
                MessageType::Discover | MessageType::Request | MessageType::Inform
            ) {
            Decision::Ignore(Ignored::UnknownClient)
        } else {
            match self.config.mode {
                DhcpMode::Full => self.decide_full(now_unix_secs, &request, packet),
                DhcpMode::Proxy => self.decide_proxy(&request, packet),
            }
        };
        Outcome {
            decision,
            discovered,
        }
    }

    fn decide_full(&mut self, now: u64, request: &Request, packet: Packet<'_>) -> Decision {
        if packet.local_port != self.config.server_port {
            return Decision::Ignore(Ignored::UnhandledMessageType);
        }
        let giaddr = request.message.giaddr();
        let link = if giaddr.is_unspecified() {
            self.config.server_ip
        } else {
            giaddr
        };
        let Some(pool) = self.config.pools.iter().position(|p| p.contains(link)) else {
            return Decision::Ignore(Ignored::NoPool);
        };
        match request.kind {
            MessageType::Discover => {
                if let Some((ip, b)) = self.book.binding_of_mac(request.mac) {
                    if matches!(b.state, BindingState::Committing { .. }) {
                        // A client starting over while its lease is being committed: offer the
                        // same address and leave the binding to the commit.
                        return Decision::Reply(self.full_reply(
                            request,
                            pool,
                            MessageType::Offer,
                            ip,
                        ));
                    }
                }
                let Some(ip) = self
                    .book
                    .choose(pool, request.mac, request.requested_ip, now)
                else {
                    return Decision::Ignore(Ignored::PoolExhausted);
                };
                let state = match self.book.binding_of_ip(ip) {
                    // Keep a live committed lease as it is; the offer changes nothing.
                    Some(b)
                        if b.mac == request.mac
                            && matches!(b.state, BindingState::Bound { expires_unix_secs } if expires_unix_secs > now) =>
                    {
                        b.state.clone()
                    }
                    _ => BindingState::Offered {
                        until_unix_secs: now + u64::from(self.config.offer_reservation_secs),
                    },
                };
                self.book.bind(ip, request.mac, state);
                Decision::Reply(self.full_reply(request, pool, MessageType::Offer, ip))
            }
            MessageType::Request => {
                if let Some(server_id) = request.server_id {
                    if server_id != self.config.server_ip {
                        self.book.drop_offer(request.mac);
                        return Decision::Ignore(Ignored::OtherServerChosen);
                    }
                }
                let ciaddr = request.message.ciaddr();
                let wanted = request
                    .requested_ip
                    .or((!ciaddr.is_unspecified()).then_some(ciaddr));
                let Some(wanted) = wanted else {
                    return Decision::Reply(self.nak(request));
                };
                let binding = self
                    .book
                    .binding_of_mac(request.mac)
                    .map(|(ip, b)| (ip, b.state.clone()));
                // A REQUEST for the address whose commit is in flight (a retransmission, or the
                // client started over) is committed again: its ACK, too, goes out only once a
                // commit of its own is durable. Same MAC, same address: never a second lease.
                let pool_config = &self.config.pools[pool];
                if !pool_config.in_range(wanted) || !self.book.available(wanted, request.mac, now) {
                    // Wrong network, outside the range, or someone else's address.
                    return Decision::Reply(self.nak(request));
                }
                if request.server_id.is_some()
                    && binding.as_ref().map(|(ip, _)| *ip) != Some(wanted)
                {
                    // SELECTING an address we did not offer (or whose offer was reclaimed).
                    return Decision::Reply(self.nak(request));
                }
                let expires = now + u64::from(pool_config.lease_secs);
                let previous = match &binding {
                    // Keep what was durable before the first of the commits in flight.
                    Some((
                        ip,
                        BindingState::Committing {
                            previous_expires_unix_secs,
                            ..
                        },
                    )) if *ip == wanted => *previous_expires_unix_secs,
                    _ => self.book.committed_expiry(wanted, request.mac),
                };
                self.book.bind(
                    wanted,
                    request.mac,
                    BindingState::Committing {
                        expires_unix_secs: expires,
                        previous_expires_unix_secs: previous,
                    },
                );
                let lease = Lease {
                    mac: request.mac,
                    ip: wanted,
                    expires_unix_secs: expires,
                    hostname: request.hostname.clone(),
                };
                let reply = self.full_reply(request, pool, MessageType::Ack, wanted);
                Decision::CommitThenReply {
                    lease,
                    reply: Some(reply),
                }
            }
            MessageType::Release => {
                let ciaddr = request.message.ciaddr();
                match self.book.binding_of_mac(request.mac) {
                    Some((ip, b))
                        if ip == ciaddr
                            && matches!(b.state, BindingState::Bound { expires_unix_secs } if expires_unix_secs > now) =>
                    {
                        let previous = self.book.committed_expiry(ip, request.mac);
                        self.book.bind(
                            ip,
                            request.mac,
                            BindingState::Committing {
                                expires_unix_secs: now,
                                previous_expires_unix_secs: previous,
                            },
                        );
                        let lease = Lease {
                            mac: request.mac,
                            ip,
                            expires_unix_secs: now,
                            hostname: None,
                        };
                        Decision::CommitThenReply { lease, reply: None }
                    }
                    _ => Decision::Ignore(Ignored::Released),
                }
            }
            MessageType::Decline => {
                let Some(ip) = request.requested_ip else {
                    return Decision::Ignore(Ignored::NoBinding);
                };
                match self.book.binding_of_mac(request.mac) {
                    Some((bound, b))
                        if bound == ip && !matches!(b.state, BindingState::Committing { .. }) =>
                    {
                        // Not before the MAC's committed lease on it expires, either.
                        let until = (now + u64::from(self.config.decline_quarantine_secs))
                            .max(self.book.committed_expiry(ip, request.mac));
                        self.book.bind(
                            ip,
                            MacAddr::ZERO,
                            BindingState::Declined {
                                until_unix_secs: until,
                            },
                        );
                        // The MAC's committed lease still names `ip`; it stays quarantined here
                        // and the client's next DISCOVER gets a new address that replaces it.
                        self.book.drop_offer(request.mac);
                        Decision::Ignore(Ignored::Released)
                    }
                    _ => Decision::Ignore(Ignored::NoBinding),
                }
            }
            MessageType::Inform => {
                let mut reply =
                    self.full_reply(request, pool, MessageType::Ack, Ipv4Addr::UNSPECIFIED);
                let opts = reply.message.opts_mut();
                opts.remove(OptionCode::AddressLeaseTime);
                opts.remove(OptionCode::Renewal);
                opts.remove(OptionCode::Rebinding);
                Decision::Reply(reply)
            }
            _ => Decision::Ignore(Ignored::UnhandledMessageType),
        }
    }

    fn decide_proxy(&mut self, request: &Request, packet: Packet<'_>) -> Decision {
        if !request.is_pxe {
            return Decision::Ignore(Ignored::NotPxeClient);
        }
        let on_proxy_port = packet.local_port == self.config.proxy_port;
        let kind = match (request.kind, on_proxy_port) {
            (MessageType::Discover, false) => MessageType::Offer,
            (MessageType::Request, true) | (MessageType::Inform, true) => MessageType::Ack,
            (MessageType::Request, false) if request.server_id == Some(self.config.server_ip) => {
                MessageType::Ack
            }
            _ => return Decision::Ignore(Ignored::UnhandledMessageType),
        };
        let mut message = self.base_reply(request, kind);
        message.set_yiaddr(Ipv4Addr::UNSPECIFIED);
        message
            .opts_mut()
            .insert(DhcpOption::ClassIdentifier(b"PXEClient".to_vec()));
        // PXE vendor options: discovery control = 8 (use the boot file in this offer directly).
        message
            .opts_mut()
            .insert(DhcpOption::VendorExtensions(vec![6, 1, 8, 255]));
        if let Some(DhcpOption::ClientMachineIdentifier(uuid)) = request
            .message
            .opts()
            .get(OptionCode::ClientMachineIdentifier)
        {
            message
                .opts_mut()
                .insert(DhcpOption::ClientMachineIdentifier(uuid.clone()));
        }
        self.add_boot(request, &mut message);
        let to = if on_proxy_port {
            packet.source
        } else {
            self.destination(request, kind)
        };
        Decision::Reply(Reply { message, to })
    }

    fn base_reply(&self, request: &Request, kind: MessageType) -> v4::Message {
        let req = &request.message;
        let mut message = v4::Message::new_with_id(
            req.xid(),
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            req.giaddr(),
            &request.mac.0,
        );
        message.set_opcode(Opcode::BootReply);
        message.set_flags(req.flags());
        message.set_hops(0);
        let opts = message.opts_mut();
        opts.insert(DhcpOption::MessageType(kind));
        opts.insert(DhcpOption::ServerIdentifier(self.config.server_ip));
        message
    }

    fn full_reply(&self, request: &Request, pool: usize, kind: MessageType, ip: Ipv4Addr) -> Reply {
        let pool = &self.config.pools[pool];
        let mut message = self.base_reply(request, kind);
        message.set_yiaddr(ip);
        if kind == MessageType::Ack {
            message.set_ciaddr(request.message.ciaddr());
        }
        let opts = message.opts_mut();
        opts.insert(DhcpOption::AddressLeaseTime(pool.lease_secs));
        opts.insert(DhcpOption::Renewal(pool.lease_secs / 2));
        opts.insert(DhcpOption::Rebinding(
            (u64::from(pool.lease_secs) * 7 / 8) as u32,
        ));
        opts.insert(DhcpOption::SubnetMask(pool.netmask()));
        opts.insert(DhcpOption::BroadcastAddr(pool.broadcast()));
        if !pool.routers.is_empty() {
            opts.insert(DhcpOption::Router(pool.routers.clone()));
        }
        if !pool.dns_servers.is_empty() {
            opts.insert(DhcpOption::DomainNameServer(pool.dns_servers.clone()));
        }
        if let Some(domain) = &pool.domain_name {
            opts.insert(DhcpOption::DomainName(domain.clone()));
        }
        if request.is_pxe || request.is_ipxe {
            self.add_boot(request, &mut message);
        }
        let to = self.destination(request, kind);
        Reply { message, to }
    }

    fn add_boot(&self, request: &Request, message: &mut v4::Message) {
        let pxe = &self.config.pxe;
        let file = if request.is_ipxe {
            Some(script_url(&pxe.script_url, request.mac))
        } else {
            boot_file_for(pxe, request.architecture).map(str::to_owned)
        };
        message.set_siaddr(pxe.tftp_server.unwrap_or(self.config.server_ip));
        if let Some(file) = file {
            if file.len() <= 127 {
                message.set_fname_str(&file);
            }
            if request.wants.contains(&OptionCode::BootfileName) || file.len() > 127 {
                message
                    .opts_mut()
                    .insert(DhcpOption::BootfileName(file.into_bytes()));
            }
        }
        if request.is_ipxe && pxe.ipxe_no_proxydhcp {
            message
                .opts_mut()
                .insert(DhcpOption::Unknown(v4::UnknownOption::new(
                    OptionCode::from(IPXE_ENCAPSULATED),
                    vec![IPXE_NO_PXEDHCP, 1, 1],
                )));
        }
    }

    /// RFC 2131 4.1: relay, then ciaddr, then broadcast (we cannot unicast to a client with no
    /// address without writing its ARP entry, so we broadcast like most servers do).
    fn destination(&self, request: &Request, kind: MessageType) -> SocketAddrV4 {
        let req = &request.message;
        if !req.giaddr().is_unspecified() {
            return SocketAddrV4::new(req.giaddr(), self.config.server_port);
        }
        if kind != MessageType::Nak && !req.ciaddr().is_unspecified() {
            return SocketAddrV4::new(req.ciaddr(), self.config.client_port);
        }
        SocketAddrV4::new(Ipv4Addr::BROADCAST, self.config.client_port)
    }

    fn nak(&self, request: &Request) -> Reply {
        let mut message = self.base_reply(request, MessageType::Nak);
        if !request.message.giaddr().is_unspecified() {
            // RFC 2131: a relayed NAK asks the relay to broadcast it.
            message.set_flags(request.message.flags().set_broadcast());
        }
        Reply {
            to: self.destination(request, MessageType::Nak),
            message,
        }
    }
}

/// The boot file for option 93's architecture (RFC 4578), for clients that are not iPXE yet.
pub fn boot_file_for(pxe: &super::PxeConfig, architecture: Option<u16>) -> Option<&str> {
    match architecture.unwrap_or(0) {
        0 => Some(pxe.bios_boot_file.as_str()),
        6 => pxe.efi_ia32_boot_file.as_deref(),
        7 | 9 => Some(pxe.efi_x64_boot_file.as_str()),
        11 => pxe.efi_arm64_boot_file.as_deref(),
        _ => None,
    }
}

/// `script_url` with the client's MAC appended as the `mac` query parameter.
pub fn script_url(base: &str, mac: MacAddr) -> String {
    let separator = if base.contains('?') { '&' } else { '?' };
    format!("{base}{separator}mac={}", mac.to_hyphenated())
}

fn parse_request(bytes: &[u8]) -> Result<Request, Ignored> {
    let message = match super::wire::parse(bytes) {
        Ok(message) => message,
        Err(super::wire::DhcpParseError::NotEthernet { .. }) => return Err(Ignored::NotEthernet),
        Err(_) => return Err(Ignored::Malformed),
    };
    if message.opcode() != Opcode::BootRequest {
        return Err(Ignored::NotARequest);
    }
    if message.htype() != v4::HType::Eth || message.hlen() != 6 {
        return Err(Ignored::NotEthernet);
    }
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&message.chaddr()[..6]);
    let opts = message.opts();
    let kind = match opts.msg_type() {
        Some(MessageType::Unknown(_)) => return Err(Ignored::UnhandledMessageType),
        Some(kind) => kind,
        None => return Err(Ignored::NoMessageType),
    };
    let requested_ip = match opts.get(OptionCode::RequestedIpAddress) {
        Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
        _ => None,
    };
    let server_id = match opts.get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
        _ => None,
    };
    let hostname = match opts.get(OptionCode::Hostname) {
        Some(DhcpOption::Hostname(name)) if name.len() <= 63 => Some(name.clone()),
        _ => None,
    };
    let architecture = match opts.get(OptionCode::ClientSystemArchitecture) {
        Some(DhcpOption::ClientSystemArchitecture(arch)) => Some(arch.0),
        _ => None,
    };
    let vendor_class = match opts.get(OptionCode::ClassIdentifier) {
        Some(DhcpOption::ClassIdentifier(class)) => Some(class.clone()),
        _ => None,
    };
    let user_class_ipxe = match opts.get(OptionCode::UserClass) {
        Some(DhcpOption::UserClass(class)) => class.windows(4).any(|w| w == b"iPXE"),
        _ => false,
    };
    let is_ipxe = user_class_ipxe || opts.get(OptionCode::from(IPXE_ENCAPSULATED)).is_some();
    let is_pxe = is_ipxe
        || architecture.is_some()
        || vendor_class
            .as_deref()
            .is_some_and(|v| v.starts_with(b"PXEClient"));
    let wants = match opts.get(OptionCode::ParameterRequestList) {
        Some(DhcpOption::ParameterRequestList(list)) => list.clone(),
        _ => Vec::new(),
    };
    Ok(Request {
        message,
        kind,
        mac: MacAddr(mac),
        requested_ip,
        server_id,
        hostname,
        architecture,
        vendor_class,
        is_ipxe,
        is_pxe,
        wants,
    })
}
