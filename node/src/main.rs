use clap::Parser;

use cairn_node::cli::{Cli, ClusterCommand, NodeCommand, Top};
use cairn_node::{commands, demo, server};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // A node logs what it does; the demo and the CLI talk to a person and log only problems.
    let serving = matches!(cli.command, Top::Node(_));
    // (Peers that are still starting make openraft log replication errors; not the admin's worry.)
    let quiet = "warn,openraft=error,cairn_consensus::quic=error";
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| {
        if serving {
            "info".into()
        } else {
            quiet.into()
        }
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    cairn_node::https::install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(run(cli)) {
        Ok(()) => 0,
        Err(error) => {
            eprintln!("error: {error:#}");
            1
        }
    };
    drop(runtime);
    cairn_node::exit_now(code)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Top::Cluster(ClusterCommand::Init(args)) => commands::cluster_init(args),
        Top::Cluster(ClusterCommand::Join(args)) => commands::cluster_join(&cli.global, args).await,
        Top::Node(NodeCommand::Run { data_dir }) => {
            let config = commands::load_node_config(data_dir)?;
            let node = server::start(config, Some(install_metrics()?)).await?;
            demo::shutdown_signal().await;
            tracing::info!("shutting down");
            node.shutdown().await;
            Ok(())
        }
        Top::Demo(args) => demo::run(args, Some(install_metrics()?)).await,
        other => commands::run_api_command(&cli.global, other).await,
    }
}

fn install_metrics() -> anyhow::Result<metrics_exporter_prometheus::PrometheusHandle> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| anyhow::anyhow!("cannot install the metrics recorder: {e}"))
}
