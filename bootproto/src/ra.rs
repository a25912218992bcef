//! A minimal IPv6 router advertisement responder, so that iPXE stops waiting for IPv6 routers.
//!
//! iPXE's "Configuring (net0 ...)" sends router solicitations and waits (about 14 s) for a
//! router advertisement before it gives up on IPv6. dnsmasq's `enable-ra` answers them, with a
//! prefix. We answer with the smallest advertisement that ends the wait without configuring
//! anything: Managed = 0 and Other = 0 (so iPXE starts no DHCPv6), router lifetime 0 (we are not
//! a default router), no prefix information, and our link-layer address.
//!
//! [`parse_router_solicitation`] and [`router_advertisement`] are pure; [`RaResponder`] is the
//! shell: a raw ICMPv6 socket bound to one interface, in the all-routers group (ff02::2), that
//! answers each solicitation (the kernel fills in the ICMPv6 checksum on raw ICMPv6 sockets).
//! Used only when configured. Not done: the hop-limit-255 check on receive (we never act on what
//! we receive beyond answering it), periodic unsolicited advertisements.

use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};

use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};

pub const ICMPV6_ROUTER_SOLICITATION: u8 = 133;
pub const ICMPV6_ROUTER_ADVERTISEMENT: u8 = 134;
const OPTION_SOURCE_LINK_LAYER: u8 = 1;
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
const ALL_ROUTERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);

/// A router solicitation (RFC 4861 4.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterSolicitation {
    pub source_link_layer: Option<[u8; 6]>,
}

/// Parses an ICMPv6 message (as a raw ICMPv6 socket delivers it: no IPv6 header). `None` for
/// anything that is not a well-formed router solicitation. Never panics.
pub fn parse_router_solicitation(bytes: &[u8]) -> Option<RouterSolicitation> {
    if bytes.len() < 8 || bytes[0] != ICMPV6_ROUTER_SOLICITATION || bytes[1] != 0 {
        return None;
    }
    let mut source_link_layer = None;
    let mut options = &bytes[8..];
    while !options.is_empty() {
        let kind = options[0];
        let len = usize::from(*options.get(1)?) * 8;
        if len == 0 || len > options.len() {
            return None; // RFC 4861: a zero-length option means discard the packet
        }
        if kind == OPTION_SOURCE_LINK_LAYER && len == 8 {
            let mut mac = [0u8; 6];
            mac.copy_from_slice(&options[2..8]);
            source_link_layer = Some(mac);
        }
        options = &options[len..];
    }
    Some(RouterSolicitation { source_link_layer })
}

/// Builds a router advertisement with M = O = 0, no prefixes, the given router lifetime and,
/// when known, our link-layer address. The checksum is left 0 for the kernel to fill in.
pub fn router_advertisement(
    router_lifetime_secs: u16,
    source_link_layer: Option<[u8; 6]>,
) -> Vec<u8> {
    let mut out = vec![
        ICMPV6_ROUTER_ADVERTISEMENT,
        0,
        0,
        0, // checksum
        0, // current hop limit: unspecified
        0, // flags: M = 0, O = 0
    ];
    out.extend_from_slice(&router_lifetime_secs.to_be_bytes());
    out.extend_from_slice(&0u32.to_be_bytes()); // reachable time: unspecified
    out.extend_from_slice(&0u32.to_be_bytes()); // retrans timer: unspecified
    if let Some(mac) = source_link_layer {
        out.extend_from_slice(&[OPTION_SOURCE_LINK_LAYER, 1]);
        out.extend_from_slice(&mac);
    }
    out
}

/// Router advertisement responder configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaConfig {
    /// The interface facing the booting clients.
    pub interface: String,
    /// 0 (the default): not a default router, only "no IPv6 configuration here".
    #[serde(default)]
    pub router_lifetime_secs: u16,
}

/// Why the responder could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum RaError {
    #[error("interface {interface:?}: {source}")]
    Interface {
        interface: String,
        source: std::io::Error,
    },
    #[error("raw icmpv6 socket on {interface:?}: {source}")]
    Socket {
        interface: String,
        source: std::io::Error,
    },
    #[error("icmpv6 receive failed: {0}")]
    Receive(std::io::Error),
}

/// Answers router solicitations on one interface.
pub struct RaResponder {
    socket: tokio::net::UdpSocket,
    interface_index: u32,
    advertisement: Vec<u8>,
}

impl RaResponder {
    /// Opens the raw ICMPv6 socket (needs CAP_NET_RAW) on `config.interface`.
    pub fn bind(config: &RaConfig) -> Result<RaResponder, RaError> {
        let interface = &config.interface;
        let sys = |file: &str| {
            std::fs::read_to_string(format!("/sys/class/net/{interface}/{file}"))
                .map(|s| s.trim().to_owned())
                .map_err(|source| RaError::Interface {
                    interface: interface.clone(),
                    source,
                })
        };
        if interface.is_empty() || interface.contains('/') || interface.contains("..") {
            return Err(RaError::Interface {
                interface: interface.clone(),
                source: std::io::Error::other("bad interface name"),
            });
        }
        let interface_index: u32 = sys("ifindex")?.parse().map_err(|_| RaError::Interface {
            interface: interface.clone(),
            source: std::io::Error::other("bad ifindex"),
        })?;
        let mac = sys("address")
            .ok()
            .and_then(|text| text.parse::<crate::MacAddr>().ok())
            .map(|m| m.0);
        let socket_error = |source| RaError::Socket {
            interface: interface.clone(),
            source,
        };
        let socket =
            Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6)).map_err(socket_error)?;
        socket
            .bind_device(Some(interface.as_bytes()))
            .map_err(socket_error)?;
        socket
            .join_multicast_v6(&ALL_ROUTERS, interface_index)
            .map_err(socket_error)?;
        // RFC 4861: neighbour discovery messages carry hop limit 255.
        socket.set_multicast_hops_v6(255).map_err(socket_error)?;
        socket.set_unicast_hops_v6(255).map_err(socket_error)?;
        socket
            .set_multicast_if_v6(interface_index)
            .map_err(socket_error)?;
        socket.set_multicast_loop_v6(false).map_err(socket_error)?;
        socket.set_nonblocking(true).map_err(socket_error)?;
        // A raw datagram socket behaves like a UDP one for recvfrom/sendto: let tokio drive it.
        let std_socket: std::net::UdpSocket = socket.into();
        let socket = tokio::net::UdpSocket::from_std(std_socket).map_err(socket_error)?;
        Ok(RaResponder {
            socket,
            interface_index,
            advertisement: router_advertisement(config.router_lifetime_secs, mac),
        })
    }

    /// Answers solicitations until the socket fails. Cancel by dropping the future.
    pub async fn run(self) -> Result<(), RaError> {
        let mut buffer = vec![0u8; 1500];
        loop {
            let (len, from) = self
                .socket
                .recv_from(&mut buffer)
                .await
                .map_err(RaError::Receive)?;
            let Some(_solicitation) = parse_router_solicitation(&buffer[..len]) else {
                continue;
            };
            // Unicast to the soliciting node when it has an address, else to all nodes.
            let to = match from {
                SocketAddr::V6(from) if !from.ip().is_unspecified() => {
                    SocketAddrV6::new(*from.ip(), 0, 0, self.interface_index)
                }
                _ => SocketAddrV6::new(ALL_NODES, 0, 0, self.interface_index),
            };
            if let Err(e) = self.socket.send_to(&self.advertisement, to).await {
                tracing::debug!(%to, error = %e, "router advertisement not sent");
            } else {
                crate::metrics::ra_advertisement();
                tracing::debug!(%to, "router advertisement sent");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn solicitation_and_advertisement() {
        let rs = [133, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0x52, 0x54, 0, 0x77, 0, 0x10];
        assert_eq!(
            parse_router_solicitation(&rs),
            Some(RouterSolicitation {
                source_link_layer: Some([0x52, 0x54, 0, 0x77, 0, 0x10])
            })
        );
        assert_eq!(
            parse_router_solicitation(&rs[..8]),
            Some(RouterSolicitation {
                source_link_layer: None
            })
        );
        assert_eq!(
            parse_router_solicitation(&[133, 0, 0, 0, 0, 0, 0, 0, 1, 0]),
            None,
            "zero-length option"
        );
        assert_eq!(parse_router_solicitation(&[134, 0, 0, 0, 0, 0, 0, 0]), None);
        let ra = router_advertisement(0, Some([2, 0, 0, 0, 0, 1]));
        assert_eq!(
            ra,
            [134, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 2, 0, 0, 0, 0, 1]
        );
    }

    proptest! {
        #[test]
        fn parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_router_solicitation(&bytes);
        }
    }
}
