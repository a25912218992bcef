//! The registry of targets a node serves, and of the sessions logged in to them.
//!
//! Plain shared state, no I/O: the tokio shell and the sans-IO connection core both use it.
//! Per-LUN state (reservations, unit attentions) sits in each entry's [`Lun`], so every session
//! to the same target, through any portal, shares it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use super::chap::Chap;
use crate::device::BlockDevice;
use crate::scsi::Lun;

/// Who may log in to a target, and how.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetConfig {
    /// Initiator names (IQNs) allowed to log in; empty means any.
    pub allowed_initiators: Vec<String>,
    /// CHAP the initiator must pass (target authenticates initiator).
    pub chap: Option<Chap>,
    /// Credentials the target answers with when the initiator asks (mutual CHAP). Only used
    /// together with `chap`.
    pub mutual_chap: Option<Chap>,
}

/// One target: a name, its access rules and LUN 0.
pub struct TargetEntry {
    pub name: String,
    pub config: TargetConfig,
    pub lun: Arc<Lun>,
}

impl std::fmt::Debug for TargetEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetEntry")
            .field("name", &self.name)
            .finish()
    }
}

impl TargetEntry {
    pub fn allows(&self, initiator_name: &str) -> bool {
        allows(&self.config.allowed_initiators, initiator_name)
    }
}

/// Whether `initiator_name` may see a target that allows `allowed` (none: everyone).
fn allows(allowed: &[String], initiator_name: &str) -> bool {
    allowed.is_empty()
        || allowed
            .iter()
            .any(|a| a.eq_ignore_ascii_case(initiator_name))
}

/// A target as SendTargets lists it: served by this node or by others, with the portals that
/// serve it. A cluster lists every client's target on every node, with the portals of its
/// session's primary and standby, so that an initiator polling any node finds where its disk
/// is served now (open-iscsi's discovery daemon logs in to a new standby by itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub name: String,
    /// Initiators allowed to see it (none: everyone).
    pub allowed_initiators: Vec<String>,
    /// `address:port,tpgt` of each portal that serves it (TargetAddress values).
    pub portals: Vec<String>,
}

impl Listing {
    pub fn allows(&self, initiator_name: &str) -> bool {
        allows(&self.allowed_initiators, initiator_name)
    }
}

/// A logged-in session, as the registry sees it.
pub struct SessionRecord {
    pub id: u64,
    /// The I_T nexus id (stable per initiator port).
    pub nexus_id: u64,
    pub target: String,
    pub initiator_name: String,
    pub isid: [u8; 6],
    pub tsih: u16,
    /// Asks the connection carrying this session to close (session reinstatement, target
    /// reset, target removal). Installed by the shell.
    pub close: Arc<dyn Fn() + Send + Sync>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    #[error("target {0:?} already exists")]
    Exists(String),
    #[error("no target named {0:?}")]
    NotFound(String),
    #[error("target name {0:?} is not a valid iqn")]
    BadName(String),
    #[error("chap secret of {user:?} is {len} bytes; at least {min} are required")]
    WeakSecret {
        user: String,
        len: usize,
        min: usize,
    },
    #[error("the mutual chap secret must differ from the initiator's chap secret")]
    SameSecrets,
}

/// All targets and sessions of one node.
#[derive(Default)]
pub struct Registry {
    targets: RwLock<BTreeMap<String, Arc<TargetEntry>>>,
    /// What SendTargets lists beyond (or instead of) this node's own portals.
    listings: RwLock<BTreeMap<String, Listing>>,
    sessions: Mutex<BTreeMap<u64, SessionRecord>>,
    next_session_id: AtomicU64,
    next_tsih: AtomicU16,
}

impl Registry {
    pub fn add_target(
        &self,
        name: &str,
        device: Arc<dyn BlockDevice>,
        config: TargetConfig,
    ) -> Result<(), RegistryError> {
        if !(name.starts_with("iqn.") || name.starts_with("eui.") || name.starts_with("naa."))
            || name.len() > 223
            || name.chars().any(|c| c.is_whitespace() || c == '\0')
        {
            return Err(RegistryError::BadName(name.to_string()));
        }
        // RFC 7143 12.1.3: secrets of at least 96 bits, and different in each direction.
        for chap in [&config.chap, &config.mutual_chap].into_iter().flatten() {
            if chap.secret.len() < super::chap::SECRET_LEN_MIN {
                return Err(RegistryError::WeakSecret {
                    user: chap.user.clone(),
                    len: chap.secret.len(),
                    min: super::chap::SECRET_LEN_MIN,
                });
            }
        }
        if let (Some(a), Some(b)) = (&config.chap, &config.mutual_chap) {
            if a.secret == b.secret {
                return Err(RegistryError::SameSecrets);
            }
        }
        let mut targets = self.targets.write().unwrap_or_else(|p| p.into_inner());
        if targets.contains_key(name) {
            return Err(RegistryError::Exists(name.to_string()));
        }
        let entry = TargetEntry {
            name: name.to_string(),
            config,
            lun: Arc::new(Lun::new(device)),
        };
        targets.insert(name.to_string(), Arc::new(entry));
        Ok(())
    }

    /// Removes a target and closes its sessions.
    pub fn remove_target(&self, name: &str) -> Result<(), RegistryError> {
        let removed = self
            .targets
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        if removed.is_none() {
            return Err(RegistryError::NotFound(name.to_string()));
        }
        for close in self.closers(|s| s.target == name) {
            close();
        }
        Ok(())
    }

    pub fn target(&self, name: &str) -> Option<Arc<TargetEntry>> {
        self.targets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    pub fn targets(&self) -> Vec<Arc<TargetEntry>> {
        self.targets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Replaces what SendTargets lists (see [`Listing`]).
    pub fn set_listings(&self, listings: impl IntoIterator<Item = Listing>) {
        let listings = listings.into_iter().map(|l| (l.name.clone(), l)).collect();
        *self.listings.write().unwrap_or_else(|p| p.into_inner()) = listings;
    }

    pub fn listing(&self, name: &str) -> Option<Listing> {
        self.listings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    pub fn listings(&self) -> Vec<Listing> {
        self.listings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn new_session_id(&self) -> u64 {
        self.next_session_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn new_tsih(&self) -> u16 {
        loop {
            let t = self
                .next_tsih
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_add(1);
            if t != 0 {
                return t;
            }
        }
    }

    /// Records a session; an older session of the same initiator port (name + ISID) to the same
    /// target is closed (session reinstatement, RFC 7143 6.3.5).
    pub fn register_session(&self, record: SessionRecord) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let old: Vec<u64> = sessions
            .values()
            .filter(|s| {
                s.target == record.target
                    && s.isid == record.isid
                    && s.initiator_name == record.initiator_name
            })
            .map(|s| s.id)
            .collect();
        let mut closers = Vec::new();
        for id in old {
            if let Some(s) = sessions.remove(&id) {
                closers.push(s.close);
            }
        }
        sessions.insert(record.id, record);
        drop(sessions);
        for close in closers {
            close();
        }
    }

    pub fn unregister_session(&self, id: u64) {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// Nexus ids of the sessions logged in to `target`.
    pub fn nexus_ids(&self, target: &str) -> Vec<u64> {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|s| s.target == target)
            .map(|s| s.nexus_id)
            .collect()
    }

    pub fn session_count(&self) -> usize {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Closes every session of `target` except `keep` (TARGET COLD RESET).
    pub fn close_sessions_of(&self, target: &str, keep: Option<u64>) {
        for close in self.closers(|s| s.target == target && Some(s.id) != keep) {
            close();
        }
    }

    fn closers(&self, pick: impl Fn(&SessionRecord) -> bool) -> Vec<Arc<dyn Fn() + Send + Sync>> {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|s| pick(s))
            .map(|s| s.close.clone())
            .collect()
    }
}
