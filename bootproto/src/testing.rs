//! In-memory implementations of [`BootDirectory`] and [`LeaseCommitter`], for tests, the
//! benchmark and single-machine demos. They stand in for the node's Raft-backed ones: the
//! committer can add a delay per commit call to model a Raft round trip. [`peers`] runs the real
//! DHCP peers (perfdhcp, Kea) the benchmarks compare against. [`missing_prerequisite`] is what a
//! test does when a tool or privilege it needs is missing (the tests crate uses it too).

pub mod peers;

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::dhcp::{
    BootDirectory, ClientLookup, ClientStatus, CommitError, DiscoveredClient, Lease, LeaseCommitter,
};
use crate::mac::MacAddr;

/// Whether `CAIRN_SLOW_TESTS=1` (as `.ci/run` sets): the slow suites run, and every tool and
/// privilege a test needs must be there.
pub fn slow_tests() -> bool {
    std::env::var("CAIRN_SLOW_TESTS").as_deref() == Ok("1")
}

/// For a test that cannot run because `reason` (a missing tool, package or root) holds; the test
/// returns right after. Under `CAIRN_SLOW_TESTS=1` this fails the test instead, so that a missing
/// prerequisite cannot pass for a passing test; otherwise it prints `skipped: <reason>`.
/// Benchmarks do not call it: they are not tests, and keep skipping with a printed reason.
pub fn missing_prerequisite(reason: &str) {
    assert!(
        !slow_tests(),
        "missing prerequisite under CAIRN_SLOW_TESTS=1: {reason} \
         (.ci/setup installs the tools; the slow suites run as root)"
    );
    eprintln!("skipped: {reason}");
}

/// A lease table in memory, keyed by MAC like the replicated one.
#[derive(Debug, Default)]
pub struct MemoryCommitter {
    table: Mutex<HashMap<MacAddr, Lease>>,
    delay: Duration,
    fail: std::sync::atomic::AtomicBool,
    calls: AtomicU64,
    leases: AtomicU64,
    /// Commits that would have given an address to a second MAC with an unexpired lease.
    conflicts: AtomicU64,
}

impl MemoryCommitter {
    /// `delay` is awaited once per `commit_leases` call (a stand-in for a Raft commit).
    pub fn new(delay: Duration) -> Arc<MemoryCommitter> {
        Arc::new(MemoryCommitter {
            delay,
            ..MemoryCommitter::default()
        })
    }

    pub fn set_failing(&self, fail: bool) {
        self.fail.store(fail, Ordering::SeqCst);
    }

    pub fn table(&self) -> Vec<Lease> {
        self.table
            .lock()
            .map(|t| t.values().cloned().collect())
            .unwrap_or_default()
    }

    /// (commit calls, leases committed, conflicts seen).
    pub fn counts(&self) -> (u64, u64, u64) {
        (
            self.calls.load(Ordering::SeqCst),
            self.leases.load(Ordering::SeqCst),
            self.conflicts.load(Ordering::SeqCst),
        )
    }
}

impl LeaseCommitter for MemoryCommitter {
    async fn commit_leases(&self, leases: Vec<Lease>) -> Result<(), CommitError> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        if self.fail.load(Ordering::SeqCst) {
            return Err(CommitError::Failed("memory committer set to fail".into()));
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut table = self
            .table
            .lock()
            .map_err(|_| CommitError::Failed("poisoned".into()))?;
        self.calls.fetch_add(1, Ordering::SeqCst);
        for lease in leases {
            let clash = table
                .values()
                .any(|l| l.ip == lease.ip && l.mac != lease.mac && l.expires_unix_secs > now);
            if clash {
                self.conflicts.fetch_add(1, Ordering::SeqCst);
            }
            self.leases.fetch_add(1, Ordering::SeqCst);
            table.insert(lease.mac, lease);
        }
        Ok(())
    }
}

/// A directory in memory: leadership is an epoch you set, clients are registered by MAC (or all).
#[derive(Debug)]
pub struct MemoryDirectory {
    /// 0: not the leader.
    epoch: AtomicU64,
    register_all: bool,
    registered: Mutex<HashSet<MacAddr>>,
    discovered: Mutex<Vec<DiscoveredClient>>,
    committer: Arc<MemoryCommitter>,
}

impl MemoryDirectory {
    /// A leader (epoch 1) whose lease table is `committer`'s.
    pub fn new(committer: Arc<MemoryCommitter>, register_all: bool) -> Arc<MemoryDirectory> {
        Arc::new(MemoryDirectory {
            epoch: AtomicU64::new(1),
            register_all,
            registered: Mutex::new(HashSet::new()),
            discovered: Mutex::new(Vec::new()),
            committer,
        })
    }

    pub fn register(&self, mac: MacAddr) {
        if let Ok(mut r) = self.registered.lock() {
            r.insert(mac);
        }
    }

    /// `None`: not the leader; `Some(epoch)`: leader in `epoch` (change it to model a new term).
    pub fn set_leader(&self, epoch: Option<u64>) {
        self.epoch.store(epoch.unwrap_or(0), Ordering::SeqCst);
    }

    pub fn discovered(&self) -> Vec<DiscoveredClient> {
        self.discovered
            .lock()
            .map(|d| d.clone())
            .unwrap_or_default()
    }

    /// The address leased to `mac`, if any.
    pub fn lease_of(&self, mac: MacAddr) -> Option<Ipv4Addr> {
        self.committer
            .table()
            .into_iter()
            .find(|l| l.mac == mac)
            .map(|l| l.ip)
    }
}

impl ClientLookup for MemoryDirectory {
    fn client(&self, mac: MacAddr) -> ClientStatus {
        let known = self.register_all
            || self
                .registered
                .lock()
                .map(|r| r.contains(&mac))
                .unwrap_or(false);
        if known {
            ClientStatus::Registered
        } else {
            ClientStatus::Unknown
        }
    }
}

impl BootDirectory for MemoryDirectory {
    fn leader_epoch(&self) -> Option<u64> {
        match self.epoch.load(Ordering::SeqCst) {
            0 => None,
            epoch => Some(epoch),
        }
    }

    fn leases(&self) -> Vec<Lease> {
        self.committer.table()
    }

    fn record_discovered(&self, client: DiscoveredClient) {
        if let Ok(mut d) = self.discovered.lock() {
            if d.len() < 10_000 && !d.iter().any(|c| c.mac == client.mac) {
                d.push(client);
            }
        }
    }
}
