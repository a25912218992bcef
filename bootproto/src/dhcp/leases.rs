//! The leader's lease book: committed leases plus in-flight offers and commits.
//!
//! Invariants (checked by `check_invariants` in tests):
//! - an IP is bound to at most one MAC, and a MAC to at most one IP (`by_ip` and `by_mac` mirror
//!   each other), so no two clients ever hold the same address;
//! - a MAC that holds an address keeps it: allocation returns the MAC's own binding first;
//! - allocation is deterministic given the book: the requested address if it is free, else the
//!   lowest never-bound address, else the lowest expired binding.
//!
//! Offers reserve their address for `offer_reservation_secs`, so two concurrent DISCOVERs from
//! different MACs never get the same address. A `Committing` binding is never reclaimed.

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;

use super::config::PoolConfig;
use super::Lease;
use crate::mac::MacAddr;

/// State of one address held by one MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindingState {
    /// Offered, not yet requested: reserved until `until_unix_secs`.
    Offered { until_unix_secs: u64 },
    /// DHCPREQUEST accepted, lease being committed; the ACK waits for the commit.
    /// `previous_expires_unix_secs` is the committed expiry before this commit (0 if none).
    Committing {
        expires_unix_secs: u64,
        previous_expires_unix_secs: u64,
    },
    /// Committed lease (possibly expired or released: then reclaimable, but still the MAC's).
    Bound { expires_unix_secs: u64 },
    /// DHCPDECLINE: someone else uses it; out of the pool until `until_unix_secs`.
    Declined { until_unix_secs: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub mac: MacAddr,
    pub state: BindingState,
}

impl Binding {
    fn reclaimable(&self, now_unix_secs: u64) -> bool {
        match self.state {
            BindingState::Offered { until_unix_secs }
            | BindingState::Declined { until_unix_secs } => until_unix_secs <= now_unix_secs,
            BindingState::Bound { expires_unix_secs } => expires_unix_secs <= now_unix_secs,
            BindingState::Committing { .. } => false,
        }
    }
}

#[derive(Debug, Clone)]
struct PoolState {
    first: u32,
    last: u32,
    /// Addresses in `first..cursor` were scanned; those of them not bound are in `free`.
    cursor: u64,
    free: BTreeSet<u32>,
}

/// Lease book for all pools of one server.
#[derive(Debug, Clone)]
pub struct LeaseBook {
    pools: Vec<PoolState>,
    by_ip: HashMap<u32, Binding>,
    by_mac: HashMap<MacAddr, u32>,
}

impl LeaseBook {
    pub fn new(pools: &[PoolConfig]) -> LeaseBook {
        LeaseBook {
            pools: pools
                .iter()
                .map(|p| PoolState {
                    first: u32::from(p.range_first),
                    last: u32::from(p.range_last),
                    cursor: u64::from(u32::from(p.range_first)),
                    free: BTreeSet::new(),
                })
                .collect(),
            by_ip: HashMap::new(),
            by_mac: HashMap::new(),
        }
    }

    /// Replaces the book's content with the committed lease table (on gaining leadership).
    /// Leases outside every pool are ignored; if two leases name one IP (never written by this
    /// code), the later-expiring one wins, then the lower MAC, so the result is deterministic.
    pub fn load(&mut self, leases: &[Lease]) {
        for pool in &mut self.pools {
            pool.cursor = u64::from(pool.first);
            pool.free.clear();
        }
        self.by_ip.clear();
        self.by_mac.clear();
        let mut sorted: Vec<&Lease> = leases
            .iter()
            .filter(|l| self.pool_of(l.ip).is_some())
            .collect();
        sorted.sort_by(|a, b| (b.expires_unix_secs, a.mac).cmp(&(a.expires_unix_secs, b.mac)));
        for lease in sorted {
            let ip = u32::from(lease.ip);
            if self.by_ip.contains_key(&ip) || self.by_mac.contains_key(&lease.mac) {
                continue;
            }
            self.by_ip.insert(
                ip,
                Binding {
                    mac: lease.mac,
                    state: BindingState::Bound {
                        expires_unix_secs: lease.expires_unix_secs,
                    },
                },
            );
            self.by_mac.insert(lease.mac, ip);
        }
    }

    /// Index of the pool whose range holds `ip`.
    pub fn pool_of(&self, ip: Ipv4Addr) -> Option<usize> {
        let ip = u32::from(ip);
        self.pools
            .iter()
            .position(|p| ip >= p.first && ip <= p.last)
    }

    pub fn binding_of_mac(&self, mac: MacAddr) -> Option<(Ipv4Addr, &Binding)> {
        let ip = *self.by_mac.get(&mac)?;
        self.by_ip.get(&ip).map(|b| (Ipv4Addr::from(ip), b))
    }

    pub fn binding_of_ip(&self, ip: Ipv4Addr) -> Option<&Binding> {
        self.by_ip.get(&u32::from(ip))
    }

    /// Number of bindings (all states).
    pub fn len(&self) -> usize {
        self.by_ip.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty()
    }

    /// Can `mac` take `ip` now (free, its own, or reclaimable)?
    pub fn available(&self, ip: Ipv4Addr, mac: MacAddr, now_unix_secs: u64) -> bool {
        match self.by_ip.get(&u32::from(ip)) {
            None => true,
            Some(b) if b.mac == mac && !matches!(b.state, BindingState::Declined { .. }) => true,
            Some(b) => b.reclaimable(now_unix_secs),
        }
    }

    /// Picks the address for `mac` in pool `pool` without changing the book (see module docs
    /// for the order). `None` when the pool is exhausted.
    pub fn choose(
        &mut self,
        pool: usize,
        mac: MacAddr,
        requested: Option<Ipv4Addr>,
        now_unix_secs: u64,
    ) -> Option<Ipv4Addr> {
        let state = self.pools.get(pool)?;
        let (first, last) = (state.first, state.last);
        if let Some(&ip) = self.by_mac.get(&mac) {
            if ip >= first && ip <= last {
                return Some(Ipv4Addr::from(ip));
            }
        }
        if let Some(ip) = requested {
            let raw = u32::from(ip);
            if raw >= first && raw <= last && self.available(ip, mac, now_unix_secs) {
                return Some(ip);
            }
        }
        // Lowest scanned-and-free address (entries may be stale: drop those bound since).
        loop {
            let candidate = self.pools[pool].free.first().copied();
            match candidate {
                Some(ip) if self.by_ip.contains_key(&ip) => {
                    self.pools[pool].free.remove(&ip);
                }
                Some(ip) => return Some(Ipv4Addr::from(ip)),
                None => break,
            }
        }
        // Next never-scanned address.
        while self.pools[pool].cursor <= u64::from(last) {
            let ip = self.pools[pool].cursor as u32;
            self.pools[pool].cursor += 1;
            if !self.by_ip.contains_key(&ip) {
                // Keep it findable until it is actually taken.
                self.pools[pool].free.insert(ip);
                return Some(Ipv4Addr::from(ip));
            }
        }
        // Exhausted: the lowest reclaimable binding (expired lease, stale offer, old decline).
        self.by_ip
            .iter()
            .filter(|(ip, b)| **ip >= first && **ip <= last && b.reclaimable(now_unix_secs))
            .map(|(ip, _)| *ip)
            .min()
            .map(Ipv4Addr::from)
    }

    /// Binds `ip` to `mac` in `state`, taking it from whoever held it (the caller checked
    /// `available`) and releasing `mac`'s previous address.
    pub fn bind(&mut self, ip: Ipv4Addr, mac: MacAddr, state: BindingState) {
        let raw = u32::from(ip);
        if let Some(previous) = self.by_mac.get(&mac).copied() {
            if previous != raw {
                // The replicated table may still name the old address for this MAC until the
                // new lease replaces it: keep the old address out of the pool until then.
                let held_until = match self.by_ip.get(&previous).map(|b| &b.state) {
                    Some(BindingState::Bound { expires_unix_secs }) => *expires_unix_secs,
                    Some(BindingState::Committing {
                        expires_unix_secs,
                        previous_expires_unix_secs,
                    }) => (*expires_unix_secs).max(*previous_expires_unix_secs),
                    _ => 0,
                };
                self.unbind_ip(previous);
                if held_until > 0 {
                    self.by_ip.insert(
                        previous,
                        Binding {
                            mac: MacAddr::ZERO,
                            state: BindingState::Declined {
                                until_unix_secs: held_until,
                            },
                        },
                    );
                }
            }
        }
        if let Some(old) = self.by_ip.get(&raw) {
            if old.mac != mac {
                let old_mac = old.mac;
                if self.by_mac.get(&old_mac) == Some(&raw) {
                    self.by_mac.remove(&old_mac);
                }
            }
        }
        if let Some(pool) = self.pool_of(ip) {
            self.pools[pool].free.remove(&raw);
        }
        let declined = matches!(state, BindingState::Declined { .. });
        self.by_ip.insert(raw, Binding { mac, state });
        if declined {
            self.by_mac.remove(&mac);
        } else {
            self.by_mac.insert(mac, raw);
        }
    }

    /// The committed expiry of `mac`'s binding at `ip` (0 when there is none).
    pub fn committed_expiry(&self, ip: Ipv4Addr, mac: MacAddr) -> u64 {
        match self.by_ip.get(&u32::from(ip)) {
            Some(b) if b.mac == mac => match b.state {
                BindingState::Bound { expires_unix_secs } => expires_unix_secs,
                BindingState::Committing {
                    expires_unix_secs,
                    previous_expires_unix_secs,
                } => expires_unix_secs.max(previous_expires_unix_secs),
                _ => 0,
            },
            _ => 0,
        }
    }

    /// Drops `mac`'s binding if it is only an offer (the client chose another server).
    pub fn drop_offer(&mut self, mac: MacAddr) {
        if let Some((ip, binding)) = self.binding_of_mac(mac) {
            if matches!(binding.state, BindingState::Offered { .. }) {
                self.unbind_ip(u32::from(ip));
            }
        }
    }

    /// Sets the state of an existing binding of `mac` at `ip`; false if there is none.
    pub fn set_state(&mut self, ip: Ipv4Addr, mac: MacAddr, state: BindingState) -> bool {
        match self.by_ip.get_mut(&u32::from(ip)) {
            Some(b) if b.mac == mac => {
                b.state = state;
                true
            }
            _ => false,
        }
    }

    fn unbind_ip(&mut self, ip: u32) {
        if let Some(old) = self.by_ip.remove(&ip) {
            if self.by_mac.get(&old.mac) == Some(&ip) {
                self.by_mac.remove(&old.mac);
            }
        }
        if let Some(pool) = self.pool_of(Ipv4Addr::from(ip)) {
            if u64::from(ip) < self.pools[pool].cursor {
                self.pools[pool].free.insert(ip);
            }
        }
    }

    /// Panics if the two maps disagree (tests and debug assertions only).
    pub fn check_invariants(&self) {
        for (mac, ip) in &self.by_mac {
            let binding = self
                .by_ip
                .get(ip)
                .expect("by_mac points to a missing binding");
            assert_eq!(
                binding.mac,
                *mac,
                "by_mac and by_ip disagree on {}",
                Ipv4Addr::from(*ip)
            );
        }
        let holders = self
            .by_ip
            .values()
            .filter(|b| !matches!(b.state, BindingState::Declined { .. }))
            .count();
        assert_eq!(
            holders,
            self.by_mac.len(),
            "a mac holds two addresses or a binding is orphaned"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn book() -> LeaseBook {
        LeaseBook::new(&[PoolConfig::new(
            Ipv4Addr::new(10, 0, 0, 0),
            24,
            Ipv4Addr::new(10, 0, 0, 10),
            Ipv4Addr::new(10, 0, 0, 12),
        )])
    }

    fn mac(n: u8) -> MacAddr {
        MacAddr([2, 0, 0, 0, 0, n])
    }

    #[test]
    fn allocation_is_lowest_free_and_sticky() {
        let mut b = book();
        let ip1 = b.choose(0, mac(1), None, 0).unwrap();
        b.bind(
            ip1,
            mac(1),
            BindingState::Offered {
                until_unix_secs: 30,
            },
        );
        let ip2 = b.choose(0, mac(2), None, 0).unwrap();
        assert_eq!(
            (ip1, ip2),
            (Ipv4Addr::new(10, 0, 0, 10), Ipv4Addr::new(10, 0, 0, 11))
        );
        b.bind(
            ip2,
            mac(2),
            BindingState::Offered {
                until_unix_secs: 30,
            },
        );
        assert_eq!(
            b.choose(0, mac(1), None, 0),
            Some(ip1),
            "a mac keeps its address"
        );
        let ip3 = b.choose(0, mac(3), Some(ip1), 0).unwrap();
        assert_eq!(
            ip3,
            Ipv4Addr::new(10, 0, 0, 12),
            "a reserved address is not given to another mac"
        );
        b.bind(
            ip3,
            mac(3),
            BindingState::Bound {
                expires_unix_secs: 100,
            },
        );
        assert_eq!(
            b.choose(0, mac(4), None, 10),
            None,
            "exhausted while offers are live"
        );
        assert_eq!(
            b.choose(0, mac(4), None, 31),
            Some(ip1),
            "expired offers are reclaimed lowest first"
        );
        b.bind(
            ip1,
            mac(4),
            BindingState::Offered {
                until_unix_secs: 60,
            },
        );
        assert_eq!(b.binding_of_mac(mac(1)), None);
        b.check_invariants();
    }

    #[test]
    fn load_rebuilds_and_keeps_affinity() {
        let mut b = book();
        b.load(&[
            Lease {
                mac: mac(7),
                ip: Ipv4Addr::new(10, 0, 0, 11),
                expires_unix_secs: 5,
                hostname: None,
            },
            Lease {
                mac: mac(8),
                ip: Ipv4Addr::new(10, 0, 0, 99),
                expires_unix_secs: 5,
                hostname: None,
            },
        ]);
        assert_eq!(b.len(), 1, "a lease outside the pools is ignored");
        assert_eq!(
            b.choose(0, mac(7), None, 1000),
            Some(Ipv4Addr::new(10, 0, 0, 11))
        );
        assert_eq!(
            b.choose(0, mac(1), None, 1000),
            Some(Ipv4Addr::new(10, 0, 0, 10))
        );
        b.check_invariants();
    }
}
