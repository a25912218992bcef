//! DHCP server configuration (plain data, read by the node from TOML).

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// Full DHCP server, or proxyDHCP beside an existing DHCP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DhcpMode {
    /// Hands out addresses from `pools`; every lease is committed before the DHCPACK.
    #[default]
    Full,
    /// Adds only boot information (PXE/iPXE) on ports 67 and 4011; no addresses, no leases.
    Proxy,
}

/// What an unregistered MAC gets. In every case it is reported as *discovered*.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum UnknownClientPolicy {
    /// Silence (the default: only registered MACs get answers).
    #[default]
    Ignore,
    /// A normal answer (address and boot file); its iPXE script is then a default image or a
    /// registration menu, as the node's boot plan says.
    Answer,
}

/// One address pool, for one subnet. Relayed requests pick the pool whose subnet holds the
/// relay's `giaddr`; requests on our own link pick the pool whose subnet holds `server_ip`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolConfig {
    /// Network address of the subnet, e.g. 192.168.77.0.
    pub subnet: Ipv4Addr,
    pub prefix_len: u8,
    /// First and last address handed out (inclusive), inside the subnet.
    pub range_first: Ipv4Addr,
    pub range_last: Ipv4Addr,
    #[serde(default)]
    pub routers: Vec<Ipv4Addr>,
    #[serde(default)]
    pub dns_servers: Vec<Ipv4Addr>,
    #[serde(default)]
    pub domain_name: Option<String>,
    #[serde(default = "default_lease_secs")]
    pub lease_secs: u32,
}

/// Boot information sent to PXE and iPXE clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PxeConfig {
    /// TFTP server for the boot file (`siaddr` / option 66); defaults to `server_ip`.
    #[serde(default)]
    pub tftp_server: Option<Ipv4Addr>,
    /// Option 93 = 0 (BIOS x86).
    #[serde(default = "default_bios_file")]
    pub bios_boot_file: String,
    /// Option 93 = 7 or 9 (x86-64 UEFI). `snponly.efi` is the alternative.
    #[serde(default = "default_efi_x64_file")]
    pub efi_x64_boot_file: String,
    /// Option 93 = 6 (IA32 UEFI); none by default (Debian ships no 32-bit EFI iPXE).
    #[serde(default)]
    pub efi_ia32_boot_file: Option<String>,
    /// Option 93 = 11 (ARM64 UEFI); none by default.
    #[serde(default)]
    pub efi_arm64_boot_file: Option<String>,
    /// URL of the iPXE script served by the node; the server appends `?mac=<mac>`
    /// (or `&mac=` when the URL already has a query).
    pub script_url: String,
    /// Send option 175 sub-option 176 = 1 so iPXE does not wait ~2 s for ProxyDHCP offers.
    #[serde(default = "default_true")]
    pub ipxe_no_proxydhcp: bool,
}

/// The DHCP server's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DhcpConfig {
    #[serde(default)]
    pub mode: DhcpMode,
    /// Our address on the clients' network: server identifier (54) and default TFTP server.
    pub server_ip: Ipv4Addr,
    /// Address to bind (0.0.0.0 to receive broadcasts). With `interface`, SO_BINDTODEVICE.
    #[serde(default = "default_bind_ip")]
    pub bind_ip: Ipv4Addr,
    #[serde(default)]
    pub interface: Option<String>,
    #[serde(default = "default_server_port")]
    pub server_port: u16,
    #[serde(default = "default_client_port")]
    pub client_port: u16,
    /// proxyDHCP's second port (PXE boot server discovery).
    #[serde(default = "default_proxy_port")]
    pub proxy_port: u16,
    #[serde(default)]
    pub pools: Vec<PoolConfig>,
    pub pxe: PxeConfig,
    #[serde(default)]
    pub unknown_clients: UnknownClientPolicy,
    /// How long an offered address stays reserved for the MAC it was offered to.
    #[serde(default = "default_offer_reservation_secs")]
    pub offer_reservation_secs: u32,
    /// How long a declined address (DHCPDECLINE: in use on the wire) is kept out of the pool.
    #[serde(default = "default_decline_quarantine_secs")]
    pub decline_quarantine_secs: u32,
    /// Leases per `commit_leases` call at most.
    #[serde(default = "default_commit_batch_max")]
    pub commit_batch_max: usize,
    /// Concurrent `commit_leases` calls at most (pipelining through Raft).
    #[serde(default = "default_commits_in_flight_max")]
    pub commits_in_flight_max: usize,
    /// Requests waiting for a commit at most; beyond this, requests are dropped (clients retry).
    #[serde(default = "default_commit_queue_max")]
    pub commit_queue_max: usize,
    /// Addresses in all pools together at most (bounds the lease book's memory).
    #[serde(default = "default_pool_addresses_max")]
    pub pool_addresses_max: u32,
}

impl DhcpConfig {
    /// A full-mode config with one pool; handy for tests and the demo.
    pub fn full(
        server_ip: Ipv4Addr,
        pool: PoolConfig,
        script_url: impl Into<String>,
    ) -> DhcpConfig {
        DhcpConfig {
            mode: DhcpMode::Full,
            server_ip,
            bind_ip: default_bind_ip(),
            interface: None,
            server_port: default_server_port(),
            client_port: default_client_port(),
            proxy_port: default_proxy_port(),
            pools: vec![pool],
            pxe: PxeConfig::new(script_url),
            unknown_clients: UnknownClientPolicy::Ignore,
            offer_reservation_secs: default_offer_reservation_secs(),
            decline_quarantine_secs: default_decline_quarantine_secs(),
            commit_batch_max: default_commit_batch_max(),
            commits_in_flight_max: default_commits_in_flight_max(),
            commit_queue_max: default_commit_queue_max(),
            pool_addresses_max: default_pool_addresses_max(),
        }
    }

    /// A proxyDHCP config (no pools).
    pub fn proxy(server_ip: Ipv4Addr, script_url: impl Into<String>) -> DhcpConfig {
        DhcpConfig {
            mode: DhcpMode::Proxy,
            pools: Vec::new(),
            ..DhcpConfig::full(server_ip, PoolConfig::empty(), script_url)
        }
    }
}

impl PoolConfig {
    fn empty() -> PoolConfig {
        PoolConfig::new(
            Ipv4Addr::UNSPECIFIED,
            32,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
        )
    }

    pub fn new(
        subnet: Ipv4Addr,
        prefix_len: u8,
        range_first: Ipv4Addr,
        range_last: Ipv4Addr,
    ) -> PoolConfig {
        PoolConfig {
            subnet,
            prefix_len,
            range_first,
            range_last,
            routers: Vec::new(),
            dns_servers: Vec::new(),
            domain_name: None,
            lease_secs: default_lease_secs(),
        }
    }

    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(prefix_mask(self.prefix_len))
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = prefix_mask(self.prefix_len);
        u32::from(ip) & mask == u32::from(self.subnet) & mask
    }

    pub fn in_range(&self, ip: Ipv4Addr) -> bool {
        let ip = u32::from(ip);
        ip >= u32::from(self.range_first) && ip <= u32::from(self.range_last)
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet) | !prefix_mask(self.prefix_len))
    }
}

impl PxeConfig {
    pub fn new(script_url: impl Into<String>) -> PxeConfig {
        PxeConfig {
            tftp_server: None,
            bios_boot_file: default_bios_file(),
            efi_x64_boot_file: default_efi_x64_file(),
            efi_ia32_boot_file: None,
            efi_arm64_boot_file: None,
            script_url: script_url.into(),
            ipxe_no_proxydhcp: true,
        }
    }
}

/// Why a configuration is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("pool {subnet}/{prefix_len}: prefix length above 32")]
    PrefixLength { subnet: Ipv4Addr, prefix_len: u8 },
    #[error("pool {subnet}/{prefix_len}: range {first}-{last} is empty or outside the subnet")]
    Range {
        subnet: Ipv4Addr,
        prefix_len: u8,
        first: Ipv4Addr,
        last: Ipv4Addr,
    },
    #[error("pools {a} and {b} overlap")]
    Overlap { a: Ipv4Addr, b: Ipv4Addr },
    #[error("pools hold {addresses} addresses, above pool_addresses_max {max}")]
    TooManyAddresses { addresses: u64, max: u32 },
    #[error("full mode needs at least one pool")]
    NoPool,
    #[error("boot file name {0:?} longer than 127 bytes")]
    BootFileName(String),
    #[error("{name} must be at least 1, is 0")]
    Zero { name: &'static str },
}

impl DhcpConfig {
    /// Checks what the core relies on: valid, non-overlapping pools within the size bound.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut total: u64 = 0;
        for pool in &self.pools {
            if pool.prefix_len > 32 {
                return Err(ConfigError::PrefixLength {
                    subnet: pool.subnet,
                    prefix_len: pool.prefix_len,
                });
            }
            if u32::from(pool.range_first) > u32::from(pool.range_last)
                || !pool.contains(pool.range_first)
                || !pool.contains(pool.range_last)
            {
                return Err(ConfigError::Range {
                    subnet: pool.subnet,
                    prefix_len: pool.prefix_len,
                    first: pool.range_first,
                    last: pool.range_last,
                });
            }
            total += u64::from(u32::from(pool.range_last) - u32::from(pool.range_first)) + 1;
        }
        for (i, a) in self.pools.iter().enumerate() {
            for b in &self.pools[i + 1..] {
                if a.in_range(b.range_first)
                    || a.in_range(b.range_last)
                    || b.in_range(a.range_first)
                {
                    return Err(ConfigError::Overlap {
                        a: a.range_first,
                        b: b.range_first,
                    });
                }
            }
        }
        if total > u64::from(self.pool_addresses_max) {
            return Err(ConfigError::TooManyAddresses {
                addresses: total,
                max: self.pool_addresses_max,
            });
        }
        if self.mode == DhcpMode::Full && self.pools.is_empty() {
            return Err(ConfigError::NoPool);
        }
        let files = [
            Some(&self.pxe.bios_boot_file),
            Some(&self.pxe.efi_x64_boot_file),
        ];
        for file in files
            .into_iter()
            .flatten()
            .chain(self.pxe.efi_ia32_boot_file.iter())
            .chain(self.pxe.efi_arm64_boot_file.iter())
        {
            if file.len() > 127 {
                return Err(ConfigError::BootFileName(file.clone()));
            }
        }
        for (name, value) in [
            ("commit_batch_max", self.commit_batch_max),
            ("commits_in_flight_max", self.commits_in_flight_max),
            ("commit_queue_max", self.commit_queue_max),
        ] {
            if value == 0 {
                return Err(ConfigError::Zero { name });
            }
        }
        Ok(())
    }
}

fn prefix_mask(prefix_len: u8) -> u32 {
    match prefix_len {
        0 => 0,
        1..=32 => u32::MAX << (32 - u32::from(prefix_len)),
        _ => u32::MAX,
    }
}

fn default_lease_secs() -> u32 {
    3600
}
fn default_bios_file() -> String {
    "undionly.kpxe".to_owned()
}
fn default_efi_x64_file() -> String {
    "ipxe.efi".to_owned()
}
fn default_true() -> bool {
    true
}
fn default_bind_ip() -> Ipv4Addr {
    Ipv4Addr::UNSPECIFIED
}
fn default_server_port() -> u16 {
    67
}
fn default_client_port() -> u16 {
    68
}
fn default_proxy_port() -> u16 {
    4011
}
fn default_offer_reservation_secs() -> u32 {
    30
}
fn default_decline_quarantine_secs() -> u32 {
    600
}
fn default_commit_batch_max() -> usize {
    512
}
fn default_commits_in_flight_max() -> usize {
    4
}
fn default_commit_queue_max() -> usize {
    8192
}
fn default_pool_addresses_max() -> u32 {
    1 << 20
}
