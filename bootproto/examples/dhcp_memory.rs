//! Runs Cairn's DHCP server with the in-memory directory and committer, for trying clients
//! (perfdhcp, dhclient, qemu) by hand: `dhcp_memory <server_ip> <subnet>/<prefix> <first> <last> [commit_delay_ms]`.
use std::time::Duration;

use cairn_bootproto::dhcp::server::DhcpServer;
use cairn_bootproto::dhcp::{DhcpConfig, PoolConfig};
use cairn_bootproto::testing::{MemoryCommitter, MemoryDirectory};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() >= 5,
        "usage: dhcp_memory <server_ip> <subnet>/<prefix> <first> <last> [commit_delay_ms]"
    );
    let (subnet, prefix) = args[2]
        .split_once('/')
        .ok_or_else(|| anyhow::anyhow!("subnet needs /prefix"))?;
    let pool = PoolConfig::new(
        subnet.parse()?,
        prefix.parse()?,
        args[3].parse()?,
        args[4].parse()?,
    );
    let mut config = DhcpConfig::full(
        args[1].parse()?,
        pool,
        format!("http://{}:8080/boot/ipxe", args[1]),
    );
    config.bind_ip = args[1].parse()?;
    let delay = Duration::from_millis(args.get(5).map(|d| d.parse()).transpose()?.unwrap_or(0));
    let committer = MemoryCommitter::new(delay);
    let directory = MemoryDirectory::new(committer.clone(), true);
    let server = DhcpServer::bind(config, directory, committer.clone()).await?;
    eprintln!("dhcp listening on {:?}", server.local_addrs());
    let run = tokio::spawn(server.run());
    tokio::signal::ctrl_c().await?;
    run.abort();
    eprintln!("commit calls, leases, conflicts: {:?}", committer.counts());
    Ok(())
}
