//! Cairn's boot servers on one interface, with in-memory directory and committer, for a lab
//! boot (qemu in a network namespace) without a cluster:
//! `boot_lab <interface> <server_ip> <subnet>/<prefix> <first> <last> <tftp_root> <script_url> [mac...]`
//! Runs full DHCP (only the listed MACs registered; none listed: all), TFTP on port 69 and the
//! router advertisement responder. Logs to stderr (RUST_LOG-free: info level).
use std::sync::Arc;
use std::time::Duration;

use cairn_bootproto::dhcp::server::DhcpServer;
use cairn_bootproto::dhcp::{DhcpConfig, PoolConfig};
use cairn_bootproto::ra::{RaConfig, RaResponder};
use cairn_bootproto::testing::{MemoryCommitter, MemoryDirectory};
use cairn_bootproto::tftp::{TftpConfig, TftpServer};
use cairn_bootproto::MacAddr;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(args.len() >= 8, "usage: boot_lab <interface> <server_ip> <subnet>/<prefix> <first> <last> <tftp_root> <script_url> [mac...]");
    let interface = args[1].clone();
    let server_ip = args[2].parse()?;
    let (subnet, prefix) = args[3]
        .split_once('/')
        .ok_or_else(|| anyhow::anyhow!("subnet needs /prefix"))?;
    let mut pool = PoolConfig::new(
        subnet.parse()?,
        prefix.parse()?,
        args[4].parse()?,
        args[5].parse()?,
    );
    pool.routers = vec![server_ip];
    let mut config = DhcpConfig::full(server_ip, pool, args[7].clone());
    config.interface = Some(interface.clone());
    let macs: Vec<MacAddr> = args[8..]
        .iter()
        .map(|m| m.parse())
        .collect::<Result<_, _>>()?;
    let committer = MemoryCommitter::new(Duration::from_millis(1));
    let directory = MemoryDirectory::new(committer.clone(), macs.is_empty());
    for mac in macs {
        directory.register(mac);
    }
    let dhcp = DhcpServer::bind(config, directory.clone(), Arc::clone(&committer)).await?;
    let tftp = TftpServer::bind(TftpConfig::new(
        std::net::SocketAddr::new(server_ip.into(), 69),
        &args[6],
    ))
    .await?;
    // CAIRN_LAB_NO_RA=1 leaves router solicitations unanswered (to see iPXE's wait).
    let ra = match std::env::var_os("CAIRN_LAB_NO_RA") {
        Some(_) => None,
        None => Some(RaResponder::bind(&RaConfig {
            interface,
            router_lifetime_secs: 0,
        })?),
    };
    let ra_run = async move {
        match ra {
            Some(ra) => ra.run().await,
            None => std::future::pending().await,
        }
    };
    eprintln!(
        "boot_lab: dhcp {:?}, tftp {}, ra on {}: {}",
        dhcp.local_addrs(),
        tftp.local_addr()?,
        args[1],
        std::env::var_os("CAIRN_LAB_NO_RA").is_none()
    );
    let started = std::time::Instant::now();
    let watch = directory.clone();
    tokio::spawn(async move {
        let (mut seen, mut discovered) = (0, 0);
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let table = watch.leases();
            if table.len() != seen {
                seen = table.len();
                for lease in &table {
                    eprintln!(
                        "boot_lab: [{:6.2}] lease {} -> {}",
                        started.elapsed().as_secs_f64(),
                        lease.mac,
                        lease.ip
                    );
                }
            }
            let found = watch.discovered();
            for d in found.iter().skip(discovered) {
                eprintln!("boot_lab: discovered {}", d.mac);
            }
            discovered = found.len();
        }
    });
    use cairn_bootproto::dhcp::BootDirectory;
    tokio::select! {
        r = dhcp.run() => r?,
        r = tftp.run() => r?,
        r = ra_run => r?,
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
