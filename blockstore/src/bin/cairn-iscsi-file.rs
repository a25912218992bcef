//! Serves one file as LUN 0 of one iSCSI target, for conformance tests and benchmarks:
//!
//! `cairn-iscsi-file --portal 127.0.0.1:3260 [--portal 127.0.0.1:3261] --iqn IQN --file IMG
//!  [--size-mib N] [--initiator IQN]... [--chap USER:SECRET] [--mutual-chap USER:SECRET]
//!  [--threads N] [--inline-io]`
//!
//! `--inline-io` runs device calls on the connection task (see `Target::with_inline_io`).
//!
//! Prints `ready` on stdout once every portal listens.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use cairn_blockstore::iscsi::{Chap, Target, TargetConfig};
use cairn_blockstore::scsi::FileDevice;

fn parse_chap(value: &str) -> anyhow::Result<Chap> {
    let (user, secret) = value
        .split_once(':')
        .context("chap credentials are USER:SECRET")?;
    Ok(Chap {
        user: user.to_string(),
        secret: secret.to_string(),
    })
}

fn main() -> anyhow::Result<()> {
    let mut portals = Vec::new();
    let mut iqn = None;
    let mut file = None;
    let mut size_mib: Option<u64> = None;
    let mut config = TargetConfig::default();
    let mut threads = 2usize;
    let mut inline_io = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--portal" => portals.push(value()?),
            "--iqn" => iqn = Some(value()?),
            "--file" => file = Some(PathBuf::from(value()?)),
            "--size-mib" => size_mib = Some(value()?.parse().context("--size-mib")?),
            "--initiator" => config.allowed_initiators.push(value()?),
            "--chap" => config.chap = Some(parse_chap(&value()?)?),
            "--mutual-chap" => config.mutual_chap = Some(parse_chap(&value()?)?),
            "--threads" => threads = value()?.parse().context("--threads")?,
            "--inline-io" => inline_io = true,
            other => bail!("unknown argument {other:?}"),
        }
    }
    let iqn = iqn.context("--iqn is required")?;
    let file = file.context("--file is required")?;
    if portals.is_empty() {
        portals.push("127.0.0.1:3260".to_string());
    }
    // A stable id from the target name: both portals, and any restart, show the same disk.
    let digest = blake3::hash(iqn.as_bytes());
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest.as_bytes()[..16]);
    let device = FileDevice::open(&file, size_mib.map(|m| m << 20), id)
        .with_context(|| format!("opening {}", file.display()))?;
    let target = Target::new().with_inline_io(inline_io);
    target.add_target(&iqn, Arc::new(device), config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let mut tasks = Vec::new();
        for p in &portals {
            let listener = tokio::net::TcpListener::bind(p)
                .await
                .with_context(|| format!("binding {p}"))?;
            let t = target.clone();
            tasks.push(tokio::spawn(async move { t.serve(listener).await }));
        }
        println!("ready");
        for t in tasks {
            t.await??;
        }
        Ok(())
    })
}
