//! Proves that both Raft stores (RocksDB and in-memory) pass openraft's own storage conformance
//! suite (`openraft::testing::Suite::test_all`), each test on a fresh store.

#![allow(clippy::result_large_err)] // openraft's StorageError is what the suite returns.

use cairn_consensus::store::mem::{MemLogStore, MemStateMachine};
use cairn_consensus::store::rocks::{self, RocksLogStore, RocksStateMachine};
use cairn_consensus::types::{StorageError, TypeConfig};
use openraft::testing::{StoreBuilder, Suite};

struct RocksBuilder;

impl StoreBuilder<TypeConfig, RocksLogStore, RocksStateMachine, tempfile::TempDir>
    for RocksBuilder
{
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, RocksLogStore, RocksStateMachine), StorageError> {
        let dir = tempfile::tempdir().expect("temporary directory");
        let (log, state_machine) = rocks::open(dir.path()).expect("open rocksdb");
        Ok((dir, log, state_machine))
    }
}

struct MemBuilder;

impl StoreBuilder<TypeConfig, MemLogStore, MemStateMachine, ()> for MemBuilder {
    async fn build(&self) -> Result<((), MemLogStore, MemStateMachine), StorageError> {
        Ok(((), MemLogStore::new(), MemStateMachine::new()))
    }
}

#[test]
fn rocksdb_store_passes_openraft_suite() -> Result<(), StorageError> {
    Suite::test_all(RocksBuilder)
}

#[test]
fn mem_store_passes_openraft_suite() -> Result<(), StorageError> {
    Suite::test_all(MemBuilder)
}
