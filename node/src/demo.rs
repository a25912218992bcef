//! `cairn demo`: a whole three-node cluster on 127.0.0.1, 127.0.0.2 and 127.0.0.3 in this
//! process, set up through the same code paths an administrator uses (`cluster init`, join
//! tokens, `cluster join`, the admin API), with sample data.

use std::time::Duration;

use anyhow::{anyhow, Context};

use crate::api::types::*;
use crate::cli::{DemoArgs, Global, InitArgs, JoinArgs, NodeLocation};
use crate::client::{ApiClient, Connection};
use crate::commands;
use crate::config::CliConfig;
use crate::server::{self, RunningNode};

pub async fn run(
    args: &DemoArgs,
    prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
) -> anyhow::Result<()> {
    let base = match &args.data_dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("cairn-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&base).with_context(|| format!("cannot create {}", base.display()))?;
    let cli_config = base.join("cli.toml");
    let location = |id: u64| NodeLocation {
        data_dir: base.join(format!("node{id}")),
        node_id: id,
        address: format!("127.0.0.{id}").parse().expect("loopback address"),
        name: None,
        cli_config: Some(cli_config.clone()),
        capacity_sessions: None,
    };

    let mut nodes: Vec<RunningNode> = Vec::new();
    let fresh = !base.join("node1").join("node.toml").exists();
    if fresh {
        commands::cluster_init(&InitArgs { node: location(1) })?;
    }
    nodes.push(
        server::start(
            commands::load_node_config(&base.join("node1"))?,
            prometheus.clone(),
        )
        .await?,
    );
    let cli = CliConfig::load(&cli_config)?;
    let client = ApiClient::connect(Connection {
        server: cli.server.clone(),
        token: cli.token.clone(),
        ca_file: cli.ca_file.clone(),
    })?;
    if fresh {
        // A new one-node cluster elects node 1 alone; the others join it.
        wait_for(&client, |s| s.leader.is_some()).await?;
    }
    for id in [2u64, 3] {
        let dir = base.join(format!("node{id}"));
        if !dir.join("node.toml").exists() {
            let issued: IssuedJoinToken = client
                .post(
                    "/v1/cluster/join-tokens",
                    &NewJoinToken {
                        ttl_seconds: Some(600),
                    },
                )
                .await?;
            let global = Global {
                server: cli.server.clone(),
                token: None,
                ca_file: None,
                json: false,
            };
            commands::cluster_join(
                &global,
                &JoinArgs {
                    node: location(id),
                    join_token: issued.token,
                },
            )
            .await?;
        }
        nodes.push(server::start(commands::load_node_config(&dir)?, prometheus.clone()).await?);
    }
    wait_for(&client, |s| {
        s.nodes.iter().filter(|n| n.raft_role == "voter").count() == 3
    })
    .await?;

    if fresh {
        add_samples(&client).await?;
    }
    let status: ClusterStatus = client.get("/v1/cluster/status").await?;
    print_welcome(&base, &cli_config, &status);

    if !args.exit_after_setup {
        shutdown_signal().await;
        println!(
            "\nstopping the demo cluster (data stays in {})",
            base.display()
        );
    }
    for node in nodes {
        node.shutdown().await;
    }
    Ok(())
}

async fn wait_for(client: &ApiClient, done: impl Fn(&ClusterStatus) -> bool) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(status) = client.get::<ClusterStatus>("/v1/cluster/status").await {
            if done(&status) {
                return Ok(());
            }
        }
        if tokio::time::Instant::now() > deadline {
            return Err(anyhow!("the demo cluster did not come up within 60 s"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn add_samples(client: &ApiClient) -> anyhow::Result<()> {
    use cairn_consensus::domain::{AssignmentTarget, DiskMode};
    let post = |path: &'static str, body: serde_json::Value| async move {
        client
            .post::<_, serde_json::Value>(path, &body)
            .await
            .with_context(|| format!("sample data: POST {path}"))
    };
    for (name, description) in [
        ("classroom", "Room 101 desktops"),
        ("servers", "Rack A blades"),
    ] {
        post(
            "/v1/groups",
            serde_json::json!({ "name": name, "description": description }),
        )
        .await?;
    }
    for (name, description) in [
        ("debian-12", "Debian 12 desktop"),
        ("win11-lab", "Windows 11 lab image"),
        ("rescue", "Rescue system"),
    ] {
        post(
            "/v1/images",
            serde_json::json!({ "name": name, "description": description }),
        )
        .await?;
    }
    for i in 1..=4 {
        post("/v1/clients", serde_json::json!({ "mac": format!("52:54:00:00:01:0{i}"), "name": format!("desk-{i}"), "group": "classroom" }))
            .await?;
    }
    post(
        "/v1/clients",
        serde_json::json!({ "mac": "52:54:00:00:02:01", "name": "blade-1", "group": "servers" }),
    )
    .await?;
    for (name, password) in [("alice", "alice-demo"), ("bob", "bob-demo")] {
        post(
            "/v1/users",
            serde_json::json!({ "name": name, "password": password }),
        )
        .await?;
    }
    // A small sample disk so that one image has a ready version (real images: `cairn image
    // import NAME FILE` with a raw, qcow2, VHD(X) or VMDK file).
    let sample = std::env::temp_dir().join(format!("cairn-demo-sample-{}.raw", std::process::id()));
    let mut bytes = vec![0u8; 8 << 20];
    for (index, block) in bytes.chunks_mut(4096).take(512).enumerate() {
        block[..32].copy_from_slice(blake3::hash(&index.to_le_bytes()).as_bytes());
    }
    std::fs::write(&sample, &bytes)?;
    let uploaded: anyhow::Result<Vec<cairn_consensus::domain::Event>> =
        client.upload("/v1/images/rescue/import", &sample).await;
    let _ = std::fs::remove_file(&sample);
    uploaded.context("sample data: importing the rescue image")?;
    let assignments = [
        (
            AssignmentTarget::Group("classroom".parse()?),
            "debian-12",
            DiskMode::NonPersistent,
            true,
        ),
        (
            AssignmentTarget::Group("classroom".parse()?),
            "win11-lab",
            DiskMode::NonPersistent,
            false,
        ),
        (
            AssignmentTarget::Group("servers".parse()?),
            "debian-12",
            DiskMode::Persistent,
            true,
        ),
        (
            AssignmentTarget::User("alice".parse()?),
            "rescue",
            DiskMode::Persistent,
            true,
        ),
    ];
    for (target, image, mode, default) in assignments {
        let body = NewAssignment {
            target,
            image: image.parse()?,
            mode,
            default,
            position: None,
        };
        client
            .post::<_, serde_json::Value>("/v1/assignments", &body)
            .await?;
    }
    Ok(())
}

fn print_welcome(base: &std::path::Path, cli_config: &std::path::Path, status: &ClusterStatus) {
    println!();
    println!(
        "Cairn demo: three nodes on 127.0.0.1, 127.0.0.2 and 127.0.0.3 (data in {})",
        base.display()
    );
    for node in &status.nodes {
        let role = if status.leader == Some(node.node.node_id) {
            "leader"
        } else {
            "follower"
        };
        println!(
            "  node {} {:<8} api {}  portal {}",
            node.node.node_id, role, node.node.api_address, node.node.portal_address
        );
    }
    println!();
    println!("In another terminal:");
    if let Ok(exe) = std::env::current_exe() {
        println!("  alias cairn={}", exe.display());
    }
    println!("  export CAIRN_CLI_CONFIG={}", cli_config.display());
    println!("  cairn cluster status");
    println!("  cairn client list");
    println!("  cairn client add 52:54:00:00:01:09 --name desk-9 --group classroom");
    println!("  cairn assign rescue --client 52:54:00:00:01:09 --mode persistent");
    println!(
        "  cairn client boot 52:54:00:00:01:09 --image rescue   # places its volume on a node"
    );
    println!("  cairn client list");
    println!("  cairn events log --client 52:54:00:00:01:09");
    println!("  cairn events replay --until 5");
    println!("  curl -sk https://127.0.0.2:7400/health");
    println!();
    println!("Press Ctrl-C to stop.");
}

pub async fn shutdown_signal() {
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match terminate.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending::<()>().await } } => {}
    }
}
