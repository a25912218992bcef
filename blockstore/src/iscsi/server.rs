//! The tokio shell around [`Connection`]: one task per TCP connection, Nagle off, reads framed by
//! the core, SCSI commands run on the blocking pool (plain READs inline, straight into the
//! Data-In buffer), answers written in batches.

use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use super::connection::{Command, Connection, Event, PortalInfo};
use super::target::{Registry, RegistryError, SessionRecord, TargetConfig};
use super::wire::Pdu;
use crate::device::BlockDevice;
use crate::scsi::ScsiResult;

/// Socket read size; also bounds how much unframed input one connection holds at a time
/// (plus one PDU).
const READ_CHUNK_BYTES: usize = 256 * 1024;

/// The iSCSI target of one node: the registry of targets plus the listeners serving them.
#[derive(Clone, Default)]
pub struct Target {
    registry: Arc<Registry>,
    portals: Arc<Mutex<Vec<SocketAddr>>>,
}

impl Target {
    pub fn new() -> Target {
        Target::default()
    }

    /// Serves `device` as LUN 0 of target `iqn`.
    pub fn add_target(&self, iqn: &str, device: Arc<dyn BlockDevice>, config: TargetConfig) -> Result<(), RegistryError> {
        self.registry.add_target(iqn, device, config)
    }

    /// Stops serving `iqn` and closes its sessions.
    pub fn remove_target(&self, iqn: &str) -> Result<(), RegistryError> {
        self.registry.remove_target(iqn)
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Accepts connections on `listener` until it fails. Call once per portal.
    pub async fn serve(&self, listener: TcpListener) -> std::io::Result<()> {
        let local = listener.local_addr()?;
        self.portals.lock().unwrap_or_else(|p| p.into_inner()).push(local);
        loop {
            let (stream, peer) = listener.accept().await?;
            let this = self.clone();
            tokio::spawn(async move {
                if let Err(err) = this.run_connection(stream).await {
                    tracing::debug!(%peer, error = %err, "iscsi connection ended with an error");
                }
            });
        }
    }

    fn portal_info(&self, local: SocketAddr) -> PortalInfo {
        let portals = self.portals.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut addresses = Vec::new();
        let mut add = |a: SocketAddr| {
            let a = if a.ip().is_unspecified() { SocketAddr::new(local.ip(), a.port()) } else { a };
            let s = match a {
                SocketAddr::V4(v4) => format!("{}:{},1", v4.ip(), v4.port()),
                SocketAddr::V6(v6) => format!("[{}]:{},1", v6.ip(), v6.port()),
            };
            if !addresses.contains(&s) {
                addresses.push(s);
            }
        };
        add(local);
        for p in portals {
            add(p);
        }
        PortalInfo { addresses, portal_group_tag: 1 }
    }

    async fn run_connection(&self, stream: TcpStream) -> std::io::Result<()> {
        stream.set_nodelay(true)?;
        let local = stream.local_addr()?;
        let mut challenge = [0u8; 16];
        rand::Rng::fill(&mut rand::thread_rng(), &mut challenge[..]);
        let mut conn = Connection::new(self.registry.clone(), self.portal_info(local), challenge);
        let (mut reader, mut writer) = stream.into_split();
        let closer = Arc::new(Notify::new());
        let mut registered: Option<u64> = None;
        let mut buf = vec![0u8; READ_CHUNK_BYTES];
        let mut out: Vec<u8> = Vec::with_capacity(64 * 1024);
        let mut datas: Vec<Vec<u8>> = Vec::new();
        let result = loop {
            let n = tokio::select! {
                r = reader.read(&mut buf) => match r {
                    Ok(0) => break Ok(()),
                    Ok(n) => n,
                    Err(e) => break Err(e),
                },
                _ = closer.notified() => break Ok(()),
            };
            conn.handle_bytes(&buf[..n]);
            let mut close = false;
            while let Some(event) = conn.poll_event() {
                match event {
                    Event::Execute(command) => {
                        let itt = command.itt;
                        let result = execute(command).await;
                        conn.handle_command_complete(itt, result);
                    }
                    Event::ResetTarget { target, cold, session_id } => {
                        if cold {
                            self.registry.close_sessions_of(&target.name, Some(session_id));
                        }
                    }
                    Event::Close => close = true,
                }
            }
            if registered.is_none() {
                if let (Some(id), Some(target), Some(nexus)) = (conn.session_id(), conn.target(), conn.nexus()) {
                    let c = closer.clone();
                    self.registry.register_session(SessionRecord {
                        id,
                        nexus_id: nexus.id,
                        target: target.name.clone(),
                        initiator_name: nexus.initiator_name.clone(),
                        isid: conn.isid(),
                        tsih: conn.tsih(),
                        close: Arc::new(move || c.notify_one()),
                    });
                    registered = Some(id);
                }
            }
            // Encode everything queued; data segments go out without an extra copy.
            out.clear();
            datas.clear();
            let mut pieces: Vec<(usize, usize, Option<usize>)> = Vec::new(); // (header start, header end, data index)
            while let Some((pdu, h, d)) = conn.poll_transmit() {
                encode_split(pdu, h, d, &mut out, &mut datas, &mut pieces);
            }
            if !pieces.is_empty() {
                write_pieces(&mut writer, &out, &datas, &pieces).await?;
            }
            if close || conn.is_closing() {
                break Ok(());
            }
        };
        if let Some(id) = registered {
            self.registry.unregister_session(id);
            if let (Some(target), Some(nexus)) = (conn.target(), conn.nexus()) {
                target.lun.nexus_lost(nexus);
            }
        }
        let _ = writer.shutdown().await;
        result
    }
}


/// Appends a PDU's header part (BHS, AHS, header digest) to `out` and keeps its data segment
/// (with padding and digest) aside as its own buffer.
fn encode_split(
    mut pdu: Pdu,
    header_digest: bool,
    data_digest: bool,
    out: &mut Vec<u8>,
    datas: &mut Vec<Vec<u8>>,
    pieces: &mut Vec<(usize, usize, Option<usize>)>,
) {
    let start = out.len();
    let data = std::mem::take(&mut pdu.data);
    let data_len = data.len();
    // Encode the header with the real data length, then the data separately.
    let mut header_only = pdu;
    header_only.data = Vec::new();
    header_only.encode_into(out, header_digest, false);
    super::wire::put24(&mut out[start..], 5, data_len as u32);
    if header_digest {
        // Recompute: the length changed after the digest was taken.
        let hdr_end = out.len() - 4;
        let d = super::wire::digest(&out[start..hdr_end]);
        out[hdr_end..].copy_from_slice(&d.to_le_bytes());
    }
    if data_len == 0 {
        pieces.push((start, out.len(), None));
        return;
    }
    let mut data = data;
    let pad = (4 - data_len % 4) % 4;
    if data_digest {
        let d = super::wire::digest(&{
            let mut padded = data.clone();
            padded.resize(data_len + pad, 0);
            padded
        });
        data.resize(data_len + pad, 0);
        data.extend_from_slice(&d.to_le_bytes());
    } else {
        data.resize(data_len + pad, 0);
    }
    datas.push(data);
    pieces.push((start, out.len(), Some(datas.len() - 1)));
}

async fn write_pieces(
    writer: &mut tokio::net::tcp::OwnedWriteHalf,
    out: &[u8],
    datas: &[Vec<u8>],
    pieces: &[(usize, usize, Option<usize>)],
) -> std::io::Result<()> {
    let mut slices: Vec<&[u8]> = Vec::with_capacity(pieces.len() * 2);
    for (s, e, d) in pieces {
        slices.push(&out[*s..*e]);
        if let Some(i) = d {
            slices.push(&datas[*i]);
        }
    }
    let mut index = 0;
    let mut offset = 0;
    while index < slices.len() {
        let io: Vec<IoSlice<'_>> = std::iter::once(IoSlice::new(&slices[index][offset..]))
            .chain(slices[index + 1..].iter().take(63).map(|s| IoSlice::new(s)))
            .collect();
        let mut n = writer.write_vectored(&io).await?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::WriteZero, "socket closed"));
        }
        while n > 0 && index < slices.len() {
            let left = slices[index].len() - offset;
            if n >= left {
                n -= left;
                index += 1;
                offset = 0;
            } else {
                offset += n;
                n = 0;
            }
        }
    }
    Ok(())
}

/// Runs one SCSI command. Plain READs run inline (page-cache reads are shorter than a trip to
/// the blocking pool); everything else runs on the blocking pool so a slow flush does not stall
/// the runtime.
async fn execute(command: Command) -> ScsiResult {
    let Command { lun, cdb, data_out, target, nexus, .. } = command;
    let mut buffer = Vec::new();
    if let Some(result) = target.lun.try_fast_read(&nexus, lun, &cdb, &mut buffer) {
        return if result.status == crate::scsi::sense::GOOD { ScsiResult::good(buffer) } else { result };
    }
    tokio::task::spawn_blocking(move || target.lun.execute(&nexus, lun, &cdb, &data_out))
    .await
    .unwrap_or_else(|_| ScsiResult::check(crate::scsi::sense::INTERNAL_TARGET_FAILURE))
}
