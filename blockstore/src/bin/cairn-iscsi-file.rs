//! Serves one file as LUN 0 of one iSCSI target, for conformance tests and benchmarks:
//!
//! `cairn-iscsi-file --portal 127.0.0.1:3260 [--portal 127.0.0.1:3261] --iqn IQN --file IMG
//!  [--size-mib N] [--initiator IQN]... [--chap USER:SECRET] [--mutual-chap USER:SECRET]
//!  [--threads N] [--inline-io] [--volume DIR [--cache-mib N]] [--alua GROUP]`
//!
//! `--inline-io` runs device calls on the connection task (see `Target::with_inline_io`).
//!
//! `--volume DIR` serves what clients get instead of the plain file: the file is imported into a
//! chunk store in `DIR/store` (BLAKE3-named 64 KiB chunks, verified when read from disk), and
//! each `--iqn` (repeatable in this mode) serves its own volume (`DIR/volume-<n>`: that image
//! version as base plus an empty 4 KiB writable layer). `--cache-mib` sets the verified-chunk
//! cache (default: the store's default, an eighth of the memory available, at least 256 MiB).
//!
//! `--alua GROUP` serves each device as a session's primary path does: implicit ALUA, this
//! path active/optimized in target port group GROUP, a second group (GROUP + 1) on standby.
//!
//! Prints `ready` on stdout once every portal listens.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use cairn_blockstore::chunks::{ChunkStore, ChunkStoreConfig};
use cairn_blockstore::device::{
    AccessState, BlockDevice, DeviceError, PortGroups, WriteCompletion,
};
use cairn_blockstore::image::NoProgress;
use cairn_blockstore::iscsi::{Chap, Target, TargetConfig};
use cairn_blockstore::scsi::FileDevice;
use cairn_blockstore::volume::{Volume, VolumeOptions, VolumeSpec};

fn parse_chap(value: &str) -> anyhow::Result<Chap> {
    let (user, secret) = value
        .split_once(':')
        .context("chap credentials are USER:SECRET")?;
    Ok(Chap {
        user: user.to_string(),
        secret: secret.to_string(),
    })
}

/// A device as a session's primary path serves it (ALUA active/optimized, one standby group).
struct PrimaryPath {
    inner: Arc<dyn BlockDevice>,
    group: u16,
}

impl BlockDevice for PrimaryPath {
    fn block_size_bytes(&self) -> u32 {
        self.inner.block_size_bytes()
    }
    fn block_count(&self) -> u64 {
        self.inner.block_count()
    }
    fn unique_id(&self) -> [u8; 16] {
        self.inner.unique_id()
    }
    fn read(&self, lba: u64, buffer: &mut [u8]) -> Result<(), DeviceError> {
        self.inner.read(lba, buffer)
    }
    fn write(&self, lba: u64, data: &[u8], force_unit_access: bool) -> Result<(), DeviceError> {
        self.inner.write(lba, data, force_unit_access)
    }
    fn start_write(
        &self,
        lba: u64,
        data: &[u8],
        force_unit_access: bool,
    ) -> Result<Option<WriteCompletion>, DeviceError> {
        self.inner.start_write(lba, data, force_unit_access)
    }
    fn unmap(&self, lba: u64, blocks: u64) -> Result<(), DeviceError> {
        self.inner.unmap(lba, blocks)
    }
    fn flush(&self) -> Result<(), DeviceError> {
        self.inner.flush()
    }
    fn mapping_status(&self, lba: u64) -> Result<(bool, u64), DeviceError> {
        self.inner.mapping_status(lba)
    }
    fn ready(&self) -> Result<(), DeviceError> {
        self.inner.ready()
    }
    fn port_groups(&self) -> Option<PortGroups> {
        Some(PortGroups::new(
            (self.group, AccessState::ActiveOptimized),
            &[(self.group.wrapping_add(1), AccessState::Standby)],
            1,
        ))
    }
}

fn with_paths(device: Arc<dyn BlockDevice>, alua: Option<u16>) -> Arc<dyn BlockDevice> {
    match alua {
        Some(group) => Arc::new(PrimaryPath {
            inner: device,
            group,
        }),
        None => device,
    }
}

fn main() -> anyhow::Result<()> {
    let mut portals = Vec::new();
    let mut iqns: Vec<String> = Vec::new();
    let mut volume_dir: Option<PathBuf> = None;
    let mut alua: Option<u16> = None;
    let mut cache_mib: Option<u64> = None;
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
            "--iqn" => iqns.push(value()?),
            "--volume" => volume_dir = Some(PathBuf::from(value()?)),
            "--cache-mib" => cache_mib = Some(value()?.parse().context("--cache-mib")?),
            "--file" => file = Some(PathBuf::from(value()?)),
            "--size-mib" => size_mib = Some(value()?.parse().context("--size-mib")?),
            "--initiator" => config.allowed_initiators.push(value()?),
            "--chap" => config.chap = Some(parse_chap(&value()?)?),
            "--mutual-chap" => config.mutual_chap = Some(parse_chap(&value()?)?),
            "--threads" => threads = value()?.parse().context("--threads")?,
            "--inline-io" => inline_io = true,
            "--alua" => alua = Some(value()?.parse::<u16>().context("--alua")?),
            other => bail!("unknown argument {other:?}"),
        }
    }
    if iqns.is_empty() {
        bail!("--iqn is required");
    }
    let file = file.context("--file is required")?;
    if portals.is_empty() {
        portals.push("127.0.0.1:3260".to_string());
    }
    // A stable id from the target name: both portals, and any restart, show the same disk.
    let unique_id = |iqn: &str| {
        let digest = blake3::hash(iqn.as_bytes());
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest.as_bytes()[..16]);
        id
    };
    let target = Target::new().with_inline_io(inline_io);
    match volume_dir {
        None => {
            if iqns.len() > 1 {
                bail!("more than one --iqn needs --volume");
            }
            let device = FileDevice::open(&file, size_mib.map(|m| m << 20), unique_id(&iqns[0]))
                .with_context(|| format!("opening {}", file.display()))?;
            target.add_target(&iqns[0], with_paths(Arc::new(device), alua), config)?;
        }
        Some(dir) => {
            let mut store_config = ChunkStoreConfig::default();
            if let Some(mib) = cache_mib {
                store_config.cache_bytes_max = mib << 20;
            }
            let store = Arc::new(
                ChunkStore::open(&dir.join("store"), store_config)
                    .with_context(|| format!("opening the chunk store in {}", dir.display()))?,
            );
            let imported = store
                .import_file(&file, "served", 1, None, &NoProgress)
                .with_context(|| format!("importing {}", file.display()))?;
            for (index, iqn) in iqns.iter().enumerate() {
                let spec = VolumeSpec {
                    base: imported.manifest_hash,
                    persistent: true,
                    unique_id: unique_id(iqn),
                };
                let volume = Volume::open_or_create(
                    store.clone(),
                    &dir.join(format!("volume-{index}")),
                    &spec,
                    VolumeOptions::default(),
                )
                .with_context(|| format!("opening the volume of {iqn}"))?;
                if volume.base() != imported.manifest_hash {
                    volume.reset(Some(imported.manifest_hash))?;
                }
                target.add_target(iqn, with_paths(Arc::new(volume), alua), config.clone())?;
            }
        }
    }
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
