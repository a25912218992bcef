//! cairn-blockstore: the data path. Content-addressed chunk store, immutable image versions,
//! per-client copy-on-write volumes, and the iSCSI target that serves them.
//!
//! Module ownership while the crate is being built:
//! - `device`: the `BlockDevice` trait between the iSCSI target and what it serves.
//! - `iscsi`, `scsi`: the target (sans-IO protocol core + tokio server) and the SCSI command set.
//! - `chunks`, `image`, `volume`: chunk store, manifests and import, writable layers.
//!
//! Architecture invariant: this crate knows nothing about Raft. It is told who owns a volume and
//! at which generation; `cairn-node` wires that to the replicated state.

pub mod chunks;
pub mod device;
pub mod image;
pub mod iscsi;
pub mod mirror;
pub mod replica;
pub mod scsi;
pub mod volume;
