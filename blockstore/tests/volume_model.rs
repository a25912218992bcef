//! Proves that a `Volume`, driven through the `BlockDevice` trait the iSCSI target uses, behaves
//! like a plain byte array under random reads, writes (with and without FUA), unmaps, flushes,
//! clean restarts and simulated crashes (drop without flush, then reopen), including journal
//! checkpoints (a tiny `journal_bytes_max` forces them) and layer resets.
//!
//! The model keeps, per 512-byte sector, the current content and the set of contents a crash may
//! legitimately leave: the durable one plus every write acknowledged since. After a crash every
//! sector must read as one of them; after a clean restart, exactly the current content. A second
//! model, fed only through the `WriteMirror` hook, must end up identical to the volume: the
//! mirror sees every layer change.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use cairn_blockstore::chunks::{ChunkStore, ChunkStoreConfig, CHUNK_SIZE_BYTES};
use cairn_blockstore::device::{BlockDevice, DeviceError};
use cairn_blockstore::image::{ManifestHash, NoProgress};
use cairn_blockstore::volume::{
    MirrorError, MirrorOperation, MirrorTicket, Volume, VolumeOptions, VolumeSpec, WriteMirror,
};
use proptest::prelude::*;

const SECTOR: usize = 512;
const BASE_CHUNKS: usize = 3;
const SIZE_BYTES: usize = BASE_CHUNKS * CHUNK_SIZE_BYTES - 3 * SECTOR; // last 4K block partial
const SECTORS: u64 = (SIZE_BYTES / SECTOR) as u64;

fn base_image() -> Vec<u8> {
    let mut image = vec![0u8; SIZE_BYTES];
    // Chunk 0 random-ish, chunk 1 all zeros (not stored), chunk 2 partly data.
    for (index, byte) in image[..CHUNK_SIZE_BYTES].iter_mut().enumerate() {
        *byte = (index * 7 + index / 511) as u8;
    }
    for (index, byte) in image[2 * CHUNK_SIZE_BYTES..]
        .iter_mut()
        .enumerate()
        .step_by(3)
    {
        *byte = (index % 251) as u8 | 1;
    }
    image
}

fn sector_key(data: &[u8]) -> [u8; 32] {
    *blake3::hash(data).as_bytes()
}

/// Applies mirrored operations to a plain array of 4 KiB blocks, as a standby would.
struct StandbyModel {
    blocks: Mutex<Vec<Option<Vec<u8>>>>,
    operations: Mutex<u64>,
}

impl WriteMirror for StandbyModel {
    fn submit(
        &self,
        generation: u64,
        operation: MirrorOperation<'_>,
    ) -> Result<MirrorTicket, MirrorError> {
        let mut count = self.operations.lock().unwrap();
        *count += 1;
        let mut blocks = self.blocks.lock().unwrap();
        match operation {
            MirrorOperation::Write { first_block, data } => {
                assert_eq!(
                    data.len() % 4096,
                    0,
                    "mirrored writes are whole 4 KiB blocks"
                );
                for (index, block) in data.chunks(4096).enumerate() {
                    blocks[first_block as usize + index] = Some(block.to_vec());
                }
            }
            MirrorOperation::Unmap {
                first_block,
                block_count,
            } => {
                for block in first_block..first_block + block_count {
                    blocks[block as usize] = Some(vec![0; 4096]);
                }
            }
            MirrorOperation::Discard { .. } => panic!("only a resync discards"),
            MirrorOperation::Flush => {}
        }
        Ok(MirrorTicket {
            generation,
            seq: *count,
        })
    }

    fn wait(&self, _ticket: MirrorTicket) -> Result<(), MirrorError> {
        Ok(())
    }
}

#[derive(Clone, Debug)]
enum Operation {
    Read { sector: u64, count: u64 },
    Write { sector: u64, count: u64, fua: bool },
    Unmap { sector: u64, count: u64 },
    Flush,
    Restart,
    Crash,
    Reset,
}

fn operation() -> impl Strategy<Value = Operation> {
    let range =
        (0..SECTORS, 1u64..40).prop_map(|(sector, count)| (sector, count.min(SECTORS - sector)));
    prop_oneof![
        3 => range.clone().prop_map(|(sector, count)| Operation::Read { sector, count }),
        6 => (range.clone(), any::<bool>()).prop_map(|((sector, count), fua)| Operation::Write { sector, count, fua }),
        2 => range.prop_map(|(sector, count)| Operation::Unmap { sector, count }),
        2 => Just(Operation::Flush),
        1 => Just(Operation::Restart),
        2 => Just(Operation::Crash),
        1 => Just(Operation::Reset),
    ]
}

struct Harness {
    _dir: tempfile::TempDir,
    store: Arc<ChunkStore>,
    volume_dir: std::path::PathBuf,
    standby: Arc<StandbyModel>,
    base: Vec<u8>,
    current: Vec<u8>,
    candidates: Vec<HashSet<[u8; 32]>>,
    write_serial: u64,
}

impl Harness {
    fn new() -> (Harness, Volume, ManifestHash) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            ChunkStore::open(
                &dir.path().join("store"),
                ChunkStoreConfig {
                    cache_bytes_max: 1 << 20,
                },
            )
            .unwrap(),
        );
        let base = base_image();
        let outcome = store
            .import_raw("base", 1, &mut &base[..], base.len() as u64, &NoProgress)
            .unwrap();
        assert_eq!(outcome.chunks_zero, 1);
        let volume_dir = dir.path().join("volumes").join("client");
        let spec = VolumeSpec {
            base: outcome.manifest_hash,
            persistent: true,
            unique_id: [7; 16],
        };
        Volume::create(&store, &volume_dir, &spec).unwrap();
        let standby = Arc::new(StandbyModel {
            blocks: Mutex::new(vec![None; SIZE_BYTES.div_ceil(4096)]),
            operations: Mutex::new(0),
        });
        let candidates = base
            .chunks(SECTOR)
            .map(|sector| HashSet::from([sector_key(sector)]))
            .collect();
        let harness = Harness {
            _dir: dir,
            store,
            volume_dir,
            standby,
            current: base.clone(),
            base,
            candidates,
            write_serial: 0,
        };
        let volume = harness.open();
        (harness, volume, outcome.manifest_hash)
    }

    fn open(&self) -> Volume {
        let options = VolumeOptions {
            generation: 1,
            mirror: Some(self.standby.clone()),
            journal_bytes_max: 3 * 24,
        };
        Volume::open(self.store.clone(), &self.volume_dir, options).unwrap()
    }

    fn read_all(volume: &Volume) -> Vec<u8> {
        let mut out = vec![0u8; SIZE_BYTES];
        volume.read(0, &mut out).unwrap();
        out
    }

    fn all_durable(&mut self) {
        for (index, sector) in self.current.chunks(SECTOR).enumerate() {
            self.candidates[index] = HashSet::from([sector_key(sector)]);
        }
    }

    fn set(&mut self, sector: u64, data: &[u8], durable: bool) {
        let start = sector as usize * SECTOR;
        self.current[start..start + data.len()].copy_from_slice(data);
        for (index, piece) in data.chunks(SECTOR).enumerate() {
            let candidates = &mut self.candidates[sector as usize + index];
            if durable {
                candidates.clear();
            }
            candidates.insert(sector_key(piece));
        }
    }

    fn check_standby(&self, volume: &Volume) {
        let blocks = self.standby.blocks.lock().unwrap();
        let contents = Self::read_all(volume);
        for (index, block) in blocks.iter().enumerate() {
            let start = index * 4096;
            let end = (start + 4096).min(SIZE_BYTES);
            let expected = match block {
                Some(data) => &data[..end - start],
                None => &self.base[start..end],
            };
            assert_eq!(
                &contents[start..end],
                expected,
                "standby differs at 4 KiB block {index}"
            );
        }
    }

    fn run(&mut self, mut volume: Volume, operations: &[Operation]) {
        for operation in operations {
            match *operation {
                Operation::Read { sector, count } => {
                    let mut buffer = vec![0u8; count as usize * SECTOR];
                    volume.read(sector, &mut buffer).unwrap();
                    let start = sector as usize * SECTOR;
                    assert!(
                        buffer == self.current[start..start + buffer.len()],
                        "read {operation:?}"
                    );
                }
                Operation::Write { sector, count, fua } => {
                    self.write_serial += 1;
                    let serial = self.write_serial;
                    let data: Vec<u8> = (0..count as usize * SECTOR)
                        .map(|index| (index as u64 * 13 + serial * 101 + index as u64 / 512) as u8)
                        .collect();
                    volume.write(sector, &data, fua).unwrap();
                    if fua {
                        // FUA guarantees this write; everything else acknowledged may also be
                        // durable now (our flush is whole-volume) but the model does not count on it.
                        self.set(sector, &data, true);
                    } else {
                        self.set(sector, &data, false);
                    }
                }
                Operation::Unmap { sector, count } => {
                    volume.unmap(sector, count).unwrap();
                    self.set(sector, &vec![0u8; count as usize * SECTOR], false);
                }
                Operation::Flush => {
                    BlockDevice::flush(&volume).unwrap();
                    self.all_durable();
                }
                Operation::Restart => {
                    volume.close().unwrap();
                    volume = self.open();
                    assert!(
                        Self::read_all(&volume) == self.current,
                        "clean restart lost data"
                    );
                    self.all_durable();
                }
                Operation::Crash => {
                    drop(volume);
                    volume = self.open();
                    let contents = Self::read_all(&volume);
                    for (index, sector) in contents.chunks(SECTOR).enumerate() {
                        assert!(
                            self.candidates[index].contains(&sector_key(sector)),
                            "after a crash sector {index} holds data never written there"
                        );
                    }
                    self.current = contents;
                    self.all_durable();
                    // The standby mirrored every acknowledged change; after a crash the primary
                    // may have lost unflushed ones, so resynchronise the model from the primary.
                    let mut blocks = self.standby.blocks.lock().unwrap();
                    for (index, block) in blocks.iter_mut().enumerate() {
                        let start = index * 4096;
                        let end = (start + 4096).min(SIZE_BYTES);
                        let mut data = self.current[start..end].to_vec();
                        data.resize(4096, 0);
                        *block = Some(data);
                    }
                }
                Operation::Reset => {
                    volume.reset(None).unwrap();
                    self.current = self.base.clone();
                    self.all_durable();
                    *self.standby.blocks.lock().unwrap() = vec![None; SIZE_BYTES.div_ceil(4096)];
                }
            }
        }
        self.check_standby(&volume);
        volume.close().unwrap();
        let volume = self.open();
        assert!(
            Self::read_all(&volume) == self.current,
            "final restart lost data"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn volume_behaves_like_a_byte_array(operations in proptest::collection::vec(operation(), 1..60)) {
        let (mut harness, volume, _) = Harness::new();
        harness.run(volume, &operations);
    }
}

#[test]
fn persistent_layer_survives_restart_and_reset_discards_it() {
    let (harness, volume, _) = Harness::new();
    let data = vec![0xab; 8192];
    volume.write(10, &data, false).unwrap();
    volume.close().unwrap();
    let volume = harness.open();
    let mut buffer = vec![0u8; 8192];
    volume.read(10, &mut buffer).unwrap();
    assert_eq!(buffer, data);
    volume.reset(None).unwrap();
    volume.read(10, &mut buffer).unwrap();
    assert_eq!(buffer, harness.base[10 * SECTOR..10 * SECTOR + 8192]);
    drop(volume); // a crash right after the reset: it is durable
    let volume = harness.open();
    volume.read(10, &mut buffer).unwrap();
    assert_eq!(buffer, harness.base[10 * SECTOR..10 * SECTOR + 8192]);
    assert_eq!(volume.block_states().1, 0);
}

#[test]
fn fua_write_survives_a_crash() {
    let (harness, volume, _) = Harness::new();
    volume.write(3, &[0x5a; 512], true).unwrap();
    drop(volume);
    let volume = harness.open();
    let mut buffer = [0u8; 512];
    volume.read(3, &mut buffer).unwrap();
    assert_eq!(buffer, [0x5a; 512]);
}

#[test]
fn fenced_volume_refuses_io() {
    let (_harness, volume, _) = Harness::new();
    assert!(!volume.fence(1), "the current generation does not fence");
    assert!(!volume.fence(0), "an older generation does not fence");
    assert!(volume.fence(2));
    let mut buffer = [0u8; 512];
    assert!(matches!(
        volume.read(0, &mut buffer),
        Err(DeviceError::Fenced {
            held: 1,
            current: 2
        })
    ));
    assert!(matches!(
        volume.write(0, &buffer, false),
        Err(DeviceError::Fenced { .. })
    ));
    assert!(matches!(
        BlockDevice::flush(&volume),
        Err(DeviceError::Fenced { .. })
    ));
}

#[test]
fn out_of_range_and_mapping_status() {
    let (_harness, volume, _) = Harness::new();
    let mut buffer = [0u8; 1024];
    assert!(matches!(
        volume.read(SECTORS - 1, &mut buffer),
        Err(DeviceError::OutOfRange { .. })
    ));
    assert!(matches!(
        volume.unmap(SECTORS, 1),
        Err(DeviceError::OutOfRange { .. })
    ));
    assert_eq!(volume.block_count(), SECTORS);
    // Chunk 0 holds data, chunk 1 is a zero chunk (not mapped).
    let (mapped, blocks) = volume.mapping_status(0).unwrap();
    assert!(mapped);
    assert_eq!(blocks, (CHUNK_SIZE_BYTES / SECTOR) as u64);
    let (mapped, _) = volume
        .mapping_status((CHUNK_SIZE_BYTES / SECTOR) as u64)
        .unwrap();
    assert!(!mapped);
    volume.unmap(0, 16).unwrap();
    assert_eq!(volume.mapping_status(0).unwrap(), (false, 16));
}

#[test]
fn concurrent_sub_block_writers_do_not_lose_updates() {
    let (harness, volume, _) = Harness::new();
    let volume = Arc::new(volume);
    // Eight threads, each owning one 512-byte sector of every 4 KiB block in the first 64 KiB:
    // every write is a read-modify-write of a block the other threads write too.
    let threads: Vec<_> = (0..8u64)
        .map(|lane| {
            let volume = volume.clone();
            std::thread::spawn(move || {
                for round in 0..20u8 {
                    for block in 0..16u64 {
                        volume
                            .write(block * 8 + lane, &[round ^ lane as u8; 512], false)
                            .unwrap();
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let mut buffer = vec![0u8; 16 * 4096];
    volume.read(0, &mut buffer).unwrap();
    for (index, sector) in buffer.chunks(512).enumerate() {
        let lane = (index % 8) as u8;
        assert!(
            sector.iter().all(|byte| *byte == 19 ^ lane),
            "sector {index} lost an update"
        );
    }
    drop(harness);
}

/// Forwards mirrored operations straight to a standby `Volume` (the node's shell carries them
/// over QUIC through `cairn_blockstore::mirror`).
struct ToStandby(Arc<Volume>);

impl WriteMirror for ToStandby {
    fn submit(
        &self,
        generation: u64,
        operation: MirrorOperation<'_>,
    ) -> Result<MirrorTicket, MirrorError> {
        self.0
            .apply_mirrored(generation, operation)
            .map_err(|error| MirrorError(error.to_string()))?;
        Ok(MirrorTicket { generation, seq: 0 })
    }

    fn wait(&self, _ticket: MirrorTicket) -> Result<(), MirrorError> {
        Ok(())
    }
}

#[test]
fn a_standby_volume_fed_by_the_mirror_matches_the_primary() {
    let (harness, _volume, base) = Harness::new();
    let spec = VolumeSpec {
        base,
        persistent: true,
        unique_id: [8; 16],
    };
    let standby_dir = harness.volume_dir.with_file_name("standby");
    let standby = Arc::new(
        Volume::open_or_create(
            harness.store.clone(),
            &standby_dir,
            &spec,
            VolumeOptions {
                generation: 1,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let primary_dir = harness.volume_dir.with_file_name("primary");
    let options = VolumeOptions {
        generation: 1,
        mirror: Some(Arc::new(ToStandby(standby.clone()))),
        ..Default::default()
    };
    let primary =
        Volume::open_or_create(harness.store.clone(), &primary_dir, &spec, options).unwrap();
    let mut serial = 0u8;
    for (sector, count) in [
        (0u64, 1u64),
        (7, 3),
        (8, 8),
        (100, 33),
        (SECTORS - 5, 5),
        (130, 1),
    ] {
        serial += 1;
        primary
            .write(
                sector,
                &vec![serial; count as usize * SECTOR],
                serial.is_multiple_of(2),
            )
            .unwrap();
    }
    primary.unmap(9, 20).unwrap();
    primary.unmap(200, 64).unwrap();
    BlockDevice::flush(&primary).unwrap();
    assert!(
        Harness::read_all(&primary) == Harness::read_all(&standby),
        "standby diverged"
    );
    // The standby survives a crash of its own with everything the primary flushed.
    drop(primary);
    let expected = Harness::read_all(&standby);
    let standby = Arc::try_unwrap(standby)
        .ok()
        .expect("primary dropped its mirror");
    drop(standby);
    let reopened = Volume::open(
        harness.store.clone(),
        &standby_dir,
        VolumeOptions::default(),
    )
    .unwrap();
    assert!(Harness::read_all(&reopened) == expected);
    // A standby at generation 3 refuses mirror traffic from a primary still at generation 2.
    let fenced = Volume::open(
        harness.store.clone(),
        &standby_dir,
        VolumeOptions {
            generation: 3,
            ..Default::default()
        },
    )
    .unwrap();
    let result = fenced.apply_mirrored(
        2,
        MirrorOperation::Unmap {
            first_block: 0,
            block_count: 1,
        },
    );
    assert!(matches!(
        result,
        Err(cairn_blockstore::volume::VolumeError::Fenced {
            held: 2,
            current: 3
        })
    ));
}

#[test]
fn leftovers_of_an_interrupted_checkpoint_are_ignored_and_damage_is_reported() {
    let (harness, volume, _) = Harness::new();
    volume.write(40, &[0x77; 4096], true).unwrap();
    let expected = Harness::read_all(&volume);
    drop(volume);
    // A crash between creating the next journal / temp map and the rename of layer.map.
    std::fs::write(harness.volume_dir.join("journal.99"), [1u8; 48]).unwrap();
    std::fs::write(harness.volume_dir.join("layer.tmp"), b"half a map").unwrap();
    let volume = harness.open();
    assert!(Harness::read_all(&volume) == expected);
    assert!(!harness.volume_dir.join("journal.99").exists());
    drop(volume);
    // A damaged checkpoint is reported, not guessed around.
    let map = harness.volume_dir.join("layer.map");
    let mut bytes = std::fs::read(&map).unwrap();
    bytes[20] ^= 0xff;
    std::fs::write(&map, &bytes).unwrap();
    let error = Volume::open(
        harness.store.clone(),
        &harness.volume_dir,
        VolumeOptions::default(),
    )
    .err()
    .expect("a damaged map must not open");
    assert!(error.to_string().contains("damaged"), "{error}");
    bytes[20] ^= 0xff;
    std::fs::write(&map, &bytes).unwrap();
    let meta = harness.volume_dir.join("volume.meta");
    std::fs::write(&meta, b"garbage").unwrap();
    assert!(Volume::open(
        harness.store.clone(),
        &harness.volume_dir,
        VolumeOptions::default()
    )
    .is_err());
}
