//! The node's configuration file (`<data_dir>/node.toml`) and the CLI's (`cli.toml`).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const PORT_API: u16 = 7400;
pub const PORT_RAFT: u16 = 7401;
pub const PORT_ISCSI: u16 = 3260;
pub const PORT_BOOT_HTTP: u16 = 8080;

/// One node's configuration. Every field but `node_id` and `data_dir` has a default, so the file
/// `cluster init` and `cluster join` write is short and an admin can add to it by hand.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub node_id: u64,
    pub name: String,
    pub data_dir: PathBuf,
    /// Address every service listens on unless its own `listen_*` says otherwise.
    pub address: IpAddr,
    #[serde(default)]
    pub listen_api: Option<SocketAddr>,
    #[serde(default)]
    pub listen_raft: Option<SocketAddr>,
    #[serde(default)]
    pub listen_iscsi: Option<SocketAddr>,
    #[serde(default)]
    pub listen_boot_http: Option<SocketAddr>,
    /// Active boot sessions this node is meant to carry (placement divides load by it).
    #[serde(default = "default_capacity_sessions")]
    pub capacity_sessions: u32,
    /// Most voters the cluster promotes learners to (3 or 5; more nodes stay learners).
    #[serde(default = "default_voters_max")]
    pub voters_max: usize,
    /// Boot services (DHCP, TFTP, router advertisements, iPXE scripts): `[boot]`.
    #[serde(default)]
    pub boot: crate::boot::BootConfig,
    /// Initiator names every volume admits besides its own client's (conformance suites, tools).
    #[serde(default)]
    pub iscsi_extra_initiators: Vec<String>,
}

fn default_capacity_sessions() -> u32 {
    100
}

fn default_voters_max() -> usize {
    5
}

impl NodeConfig {
    pub fn new(node_id: u64, name: String, data_dir: PathBuf, address: IpAddr) -> NodeConfig {
        NodeConfig {
            node_id,
            name,
            data_dir,
            address,
            listen_api: None,
            listen_raft: None,
            listen_iscsi: None,
            listen_boot_http: None,
            capacity_sessions: default_capacity_sessions(),
            voters_max: default_voters_max(),
            boot: crate::boot::BootConfig::default(),
            iscsi_extra_initiators: Vec::new(),
        }
    }

    pub fn api(&self) -> SocketAddr {
        self.listen_api
            .unwrap_or(SocketAddr::new(self.address, PORT_API))
    }
    pub fn raft(&self) -> SocketAddr {
        self.listen_raft
            .unwrap_or(SocketAddr::new(self.address, PORT_RAFT))
    }
    pub fn iscsi(&self) -> SocketAddr {
        self.listen_iscsi
            .unwrap_or(SocketAddr::new(self.address, PORT_ISCSI))
    }
    pub fn boot_http(&self) -> SocketAddr {
        self.listen_boot_http
            .unwrap_or(SocketAddr::new(self.address, PORT_BOOT_HTTP))
    }
    pub fn api_url(&self) -> String {
        format!("https://{}", self.api())
    }

    pub fn path_in(data_dir: &Path) -> PathBuf {
        data_dir.join("node.toml")
    }

    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        toml::from_str(&text).map_err(|error| ConfigError::Parse {
            path: path.to_owned(),
            reason: error.to_string(),
        })
    }

    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let text = toml::to_string_pretty(self).expect("a node config always serializes");
        write_private(path, text.as_bytes())
    }
}

/// What the CLI needs to reach the admin API. Written by `cluster init` and `cluster join`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CliConfig {
    /// Admin API base URL, `https://ip:port`.
    pub server: Option<String>,
    /// The other nodes' API URLs, tried in turn when `server` cannot be reached (a node that is
    /// down or restarting). `cluster join` run with this config adds the joining node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub other_servers: Vec<String>,
    pub token: Option<String>,
    /// The cluster CA certificate (PEM file) the API's certificate must chain to.
    pub ca_file: Option<PathBuf>,
}

impl CliConfig {
    /// `$CAIRN_CLI_CONFIG`, else `$XDG_CONFIG_HOME/cairn/cli.toml`, else `~/.config/cairn/cli.toml`.
    pub fn default_path() -> Option<PathBuf> {
        if let Some(path) = std::env::var_os("CAIRN_CLI_CONFIG") {
            return Some(PathBuf::from(path));
        }
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")))?;
        Some(base.join("cairn").join("cli.toml"))
    }

    pub fn load(path: &Path) -> Result<CliConfig, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).map_err(|error| ConfigError::Parse {
                path: path.to_owned(),
                reason: error.to_string(),
            }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(CliConfig::default()),
            Err(error) => Err(ConfigError::Read {
                path: path.to_owned(),
                error,
            }),
        }
    }

    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|error| ConfigError::Write {
                path: parent.to_owned(),
                error,
            })?;
        }
        let text = toml::to_string_pretty(self).expect("a cli config always serializes");
        write_private(path, text.as_bytes())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot parse {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("cannot write {path}: {error}")]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// Writes a file readable only by its owner (it may hold a token or a key), atomically: a crash
/// leaves the old file or the new one, never half of one.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), ConfigError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let temporary = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)?;
        if let Some(parent) = path.parent() {
            std::fs::File::open(parent)?.sync_all()?;
        }
        Ok(())
    };
    write().map_err(|error| ConfigError::Write {
        path: path.to_owned(),
        error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_config_round_trips_and_refuses_unknown_fields() {
        let dir = tempfile::tempdir().unwrap();
        let config = NodeConfig::new(
            2,
            "node-2".into(),
            dir.path().to_owned(),
            "127.0.0.2".parse().unwrap(),
        );
        let path = NodeConfig::path_in(dir.path());
        config.save(&path).unwrap();
        assert_eq!(NodeConfig::load(&path).unwrap(), config);
        assert_eq!(config.api().to_string(), "127.0.0.2:7400");
        std::fs::write(&path, "node_id = 1\nbogus = 3\n").unwrap();
        let error = NodeConfig::load(&path).unwrap_err().to_string();
        assert!(error.contains("bogus"), "{error}");
    }
}
