//! The `cairn` command line.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "cairn",
    version,
    about = "Network boot and diskless storage cluster"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Top,
}

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Admin API base URL of any node, e.g. https://127.0.0.1:7400.
    #[arg(long, global = true, env = "CAIRN_SERVER")]
    pub server: Option<String>,
    /// Admin bearer token.
    #[arg(long, global = true, env = "CAIRN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Cluster CA certificate (a node's <data-dir>/tls/ca.pem).
    #[arg(long = "ca", global = true, env = "CAIRN_CA")]
    pub ca_file: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum Top {
    /// Create, join and inspect the cluster.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Run a node.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Diskless machines, by MAC address.
    #[command(subcommand)]
    Client(ClientCommand),
    /// Disk images and their versions.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Users (who may `login` at boot and pick their images).
    #[command(subcommand)]
    User(UserCommand),
    /// Groups of clients.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Admin API tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Assign an image to a client, group or user.
    Assign(AssignArgs),
    /// Take an image away from a client, group or user.
    Unassign(UnassignArgs),
    /// The event history: log, export, replay.
    #[command(subcommand)]
    Events(EventsCommand),
    /// Start a three-node cluster on 127.0.0.1-3 in this process, with sample data.
    Demo(DemoArgs),
}

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Create a new cluster: its CA, this node's certificate, the first admin token.
    Init(InitArgs),
    /// Prepare this machine as a new node of an existing cluster.
    Join(JoinArgs),
    /// Leader, term, nodes and their sessions.
    Status,
    /// Create a one-time token for `cluster join`.
    JoinToken {
        /// How long the token stays valid.
        #[arg(long, default_value_t = 3600)]
        ttl_seconds: u64,
    },
    /// Remove a node from the Raft membership and the cluster.
    RemoveNode { node_id: u64 },
}

#[derive(Args, Debug)]
pub struct NodeLocation {
    /// The node's data directory (holds node.toml, tls/, raft/).
    #[arg(long, default_value = "/var/lib/cairn")]
    pub data_dir: PathBuf,
    /// This node's id, unique in the cluster.
    #[arg(long, default_value_t = 1)]
    pub node_id: u64,
    /// The address the node's services listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub address: IpAddr,
    /// Node name (default node-<id>).
    #[arg(long)]
    pub name: Option<String>,
    /// Where to write the CLI config (server, token, CA); default $CAIRN_CLI_CONFIG or
    /// ~/.config/cairn/cli.toml.
    #[arg(long)]
    pub cli_config: Option<PathBuf>,
    /// Boot sessions this node takes at most (default 100); 0 makes a witness: a voter of
    /// the cluster that is never primary or standby of a client's disk.
    #[arg(long)]
    pub capacity_sessions: Option<u32>,
}

#[derive(Args, Debug)]
pub struct InitArgs {
    #[command(flatten)]
    pub node: NodeLocation,
}

#[derive(Args, Debug)]
pub struct JoinArgs {
    #[command(flatten)]
    pub node: NodeLocation,
    /// The one-time token from `cairn cluster join-token`.
    #[arg(long = "join-token", env = "CAIRN_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: String,
}

#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// Run the node in the foreground until SIGINT or SIGTERM.
    Run {
        /// The node's data directory (holds node.toml).
        #[arg(long, default_value = "/var/lib/cairn")]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// Register a client (also adopts a discovered MAC).
    Add {
        mac: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        group: Option<String>,
    },
    List,
    /// Unknown MACs that asked to boot.
    Discovered,
    /// The client, its session, and each copy of its disk (role, resync progress).
    Show {
        mac: String,
    },
    /// Compares the digests of the primary's and the standby's copies of the client's disk
    /// (reads every written block on both; meaningful while the client is not writing).
    Verify {
        mac: String,
    },
    /// Rename a client or move it to another group (`--group ""` takes it out).
    Update {
        mac: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        group: Option<String>,
    },
    Remove {
        mac: String,
    },
    /// Start a boot session now (what the boot service does when the client's iPXE asks for
    /// its script): place the volume on a primary and a standby node, bump its generation.
    Boot {
        mac: String,
        #[arg(long)]
        image: String,
        #[arg(long)]
        user: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    Create {
        name: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Upload a disk image (raw, qcow2, VHD/VHDX, VMDK) as the image's next version; creates
    /// the image if it does not exist.
    Import {
        name: String,
        file: PathBuf,
        #[arg(long, default_value = "")]
        description: String,
    },
    List,
    Show {
        name: String,
    },
    Remove {
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum UserCommand {
    Add {
        name: String,
        /// Read the user's boot password from standard input (one line).
        #[arg(long)]
        password_stdin: bool,
    },
    List,
    Passwd {
        name: String,
    },
    Remove {
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum GroupCommand {
    Add {
        name: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    List,
    Remove {
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    Create { name: String },
    List,
    Revoke { name: String },
}

#[derive(Args, Debug)]
#[group(id = "target", required = true, multiple = false)]
pub struct TargetArgs {
    #[arg(long, group = "target")]
    pub client: Option<String>,
    #[arg(long, group = "target")]
    pub group: Option<String>,
    #[arg(long, group = "target")]
    pub user: Option<String>,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum Mode {
    Persistent,
    NonPersistent,
}

#[derive(Args, Debug)]
pub struct AssignArgs {
    pub image: String,
    #[command(flatten)]
    pub target: TargetArgs,
    #[arg(long, value_enum, default_value = "non-persistent")]
    pub mode: Mode,
    /// Make it the preselected menu entry.
    #[arg(long)]
    pub default: bool,
    /// Menu position (0 = first).
    #[arg(long)]
    pub position: Option<u32>,
}

#[derive(Args, Debug)]
pub struct UnassignArgs {
    pub image: String,
    #[command(flatten)]
    pub target: TargetArgs,
}

#[derive(Subcommand, Debug)]
pub enum EventsCommand {
    /// Events matching all given filters, oldest first.
    Log {
        #[arg(long)]
        client: Option<String>,
        #[arg(long)]
        image: Option<String>,
        #[arg(long)]
        actor: Option<String>,
        /// RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        /// RFC 3339 time.
        #[arg(long)]
        until: Option<String>,
        #[arg(long, default_value_t = 1)]
        from_seq: u64,
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Write the whole history (JSON Lines, see ARCHITECTURE.md) to a file or stdout.
    Export {
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Fold the history up to a point and print the state and its hash.
    Replay {
        /// A sequence number or an RFC 3339 time; default: everything.
        #[arg(long)]
        until: Option<String>,
        /// Replay an export file instead of asking the cluster.
        #[arg(long)]
        from: Option<PathBuf>,
    },
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Where the three nodes keep their data (default: a new temporary directory).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Exit after setting up instead of running until Ctrl-C (for tests).
    #[arg(long, hide = true)]
    pub exit_after_setup: bool,
}
