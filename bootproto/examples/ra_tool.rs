//! `ra_tool respond <interface>`: run the router advertisement responder.
//! `ra_tool solicit <interface>`: send one router solicitation and print the advertisement
//! received within 3 s as `RA flags=<hex> lifetime=<secs> len=<bytes>` (exit 1 if none).
//! Used by the network-namespace test; needs CAP_NET_RAW.
use std::net::{Ipv6Addr, SocketAddrV6};
use std::time::Duration;

use cairn_bootproto::ra::{RaConfig, RaResponder};
use socket2::{Domain, Protocol, Socket, Type};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() == 3,
        "usage: ra_tool respond|solicit <interface>"
    );
    let interface = args[2].clone();
    if args[1] == "respond" {
        let responder = RaResponder::bind(&RaConfig {
            interface,
            router_lifetime_secs: 0,
        })?;
        eprintln!("ra responder ready");
        responder.run().await?;
        return Ok(());
    }
    let index: u32 = std::fs::read_to_string(format!("/sys/class/net/{interface}/ifindex"))?
        .trim()
        .parse()?;
    let socket = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?;
    socket.bind_device(Some(interface.as_bytes()))?;
    socket.set_multicast_hops_v6(255)?;
    socket.set_multicast_if_v6(index)?;
    socket.set_nonblocking(true)?;
    let std_socket: std::net::UdpSocket = socket.into();
    let socket = tokio::net::UdpSocket::from_std(std_socket)?;
    let all_routers = SocketAddrV6::new(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2), 0, 0, index);
    socket
        .send_to(&[133, 0, 0, 0, 0, 0, 0, 0], all_routers)
        .await?;
    let mut buffer = vec![0u8; 1500];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        let (len, from) = tokio::time::timeout_at(deadline, socket.recv_from(&mut buffer))
            .await
            .map_err(|_| anyhow::anyhow!("no router advertisement within 3 s"))??;
        if len >= 16 && buffer[0] == 134 {
            let lifetime = u16::from_be_bytes([buffer[6], buffer[7]]);
            println!(
                "RA flags={:02x} lifetime={lifetime} len={len} from={from}",
                buffer[5]
            );
            return Ok(());
        }
    }
}
