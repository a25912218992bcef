//! What each CLI command does.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use reqwest::Method;
use serde_json::Value;

use cairn_consensus::domain::{AssignmentTarget, DiskMode, Event, Name, ReplayBound, State};
use cairn_consensus::ClusterCa;

use crate::api::types::*;
use crate::api::{format_time, parse_time};
use crate::cli::*;
use crate::client::{ApiClient, Connection};
use crate::config::{CliConfig, NodeConfig};
use crate::output::{json, table};
use crate::secrets;
use crate::server::{DataFiles, InitPending};

pub fn connect(global: &Global) -> anyhow::Result<ApiClient> {
    ApiClient::connect(Connection {
        server: global.server.clone(),
        token: global.token.clone(),
        ca_file: global.ca_file.clone(),
    })
}

fn node_config(location: &NodeLocation) -> anyhow::Result<NodeConfig> {
    let name = location
        .name
        .clone()
        .unwrap_or_else(|| format!("node-{}", location.node_id));
    Name::new(name.clone())?;
    std::fs::create_dir_all(&location.data_dir)
        .with_context(|| format!("cannot create {}", location.data_dir.display()))?;
    let data_dir = location.data_dir.canonicalize()?;
    let path = NodeConfig::path_in(&data_dir);
    if path.exists() {
        bail!(
            "{} is already initialised ({} exists); nothing changed",
            data_dir.display(),
            path.display()
        );
    }
    if data_dir.join("raft").exists() {
        bail!(
            "{} already holds a raft store; nothing changed",
            data_dir.display()
        );
    }
    let mut config = NodeConfig::new(location.node_id, name, data_dir, location.address);
    if let Some(capacity) = location.capacity_sessions {
        config.capacity_sessions = capacity;
    }
    Ok(config)
}

fn save_cli_config(location: &NodeLocation, config: &CliConfig) -> anyhow::Result<PathBuf> {
    let path = location
        .cli_config
        .clone()
        .or_else(CliConfig::default_path)
        .ok_or_else(|| anyhow!("no place for the cli config"))?;
    config.save(&path)?;
    Ok(path)
}

/// `cluster init`: the CA, this node's certificate, its config and the first admin token. Raft
/// is initialised by the first `node run` (see `server::finish_init`).
pub fn cluster_init(args: &InitArgs) -> anyhow::Result<()> {
    let config = node_config(&args.node)?;
    let ca = ClusterCa::generate().map_err(|e| anyhow!("{e}"))?;
    let identity = ca
        .issue_node_certificate(config.node_id)
        .map_err(|e| anyhow!("{e}"))?;
    let files = DataFiles::new(&config.data_dir);
    files.write_tls(
        ca.cert_pem(),
        &ca.key_pem(),
        &identity.cert_pem,
        &identity.key_pem,
    )?;
    let token = secrets::admin_token();
    let pending = InitPending {
        admin_token_name: Name::new("admin")?,
        admin_token_digest: secrets::digest(&token),
    };
    crate::config::write_private(&files.init_pending(), &serde_json::to_vec_pretty(&pending)?)?;
    config.save(&NodeConfig::path_in(&config.data_dir))?;
    let cli = CliConfig {
        server: Some(config.api_url()),
        other_servers: Vec::new(),
        token: Some(token.clone()),
        ca_file: Some(files.ca_cert()),
    };
    let cli_path = save_cli_config(&args.node, &cli)?;
    println!(
        "cluster created; node {} in {}",
        config.node_id,
        config.data_dir.display()
    );
    println!(
        "admin token (shown once, also saved in {}):\n  {token}",
        cli_path.display()
    );
    println!(
        "next: cairn node run --data-dir {}",
        config.data_dir.display()
    );
    Ok(())
}

/// Adds a joined node to the CLI config of the same cluster (same CA), so that the CLI finds
/// another node when its own server is down.
fn remember_in_cli_config(
    location: &NodeLocation,
    ca_pem: &str,
    api_url: &str,
) -> anyhow::Result<()> {
    let Some(path) = location.cli_config.clone().or_else(CliConfig::default_path) else {
        return Ok(());
    };
    let mut cli = CliConfig::load(&path)?;
    let same_cluster = cli
        .ca_file
        .as_ref()
        .and_then(|file| std::fs::read_to_string(file).ok())
        .is_some_and(|pem| pem.trim() == ca_pem.trim());
    let known =
        cli.server.as_deref() == Some(api_url) || cli.other_servers.iter().any(|s| s == api_url);
    if same_cluster && !known {
        cli.other_servers.push(api_url.to_string());
        cli.save(&path)?;
    }
    Ok(())
}

/// `cluster join`: check the cluster's CA against the join token, then ask it to admit this node.
pub async fn cluster_join(global: &Global, args: &JoinArgs) -> anyhow::Result<()> {
    let server = global
        .server
        .clone()
        .ok_or_else(|| anyhow!("--server (any node's API URL) is required to join"))?;
    let (_, fingerprint) = secrets::parse_join_token(&args.join_token)
        .ok_or_else(|| anyhow!("malformed join token (expected cairnjoin_...)"))?;
    let config = node_config(&args.node)?;
    let server = server.trim_end_matches('/').to_string();
    let ca_pem = crate::https::unverified_client()?
        .get(format!("{server}/v1/cluster/ca"))
        .send()
        .await
        .with_context(|| format!("cannot reach {server}"))?
        .text()
        .await?;
    let actual = cairn_consensus::tls::ca_fingerprint(&ca_pem).map_err(|e| anyhow!("{e}"))?;
    if actual != fingerprint {
        bail!("the cluster at {server} has CA fingerprint {actual}, but the join token expects {fingerprint}; refusing to join");
    }
    let request = JoinRequest {
        join_token: args.join_token.clone(),
        node_id: config.node_id,
        name: Name::new(config.name.clone())?,
        raft_address: config.raft().to_string(),
        api_address: config.api_url(),
        portal_address: config.iscsi().to_string(),
        boot_address: format!("http://{}", config.boot_http()),
        capacity_sessions: config.capacity_sessions,
    };
    let client = ApiClient::connect(Connection {
        server: Some(server.clone()),
        token: None,
        ca_file: None,
    })
    .or_else(|_| -> anyhow::Result<ApiClient> {
        let path = std::env::temp_dir().join(format!("cairn-join-ca-{}.pem", std::process::id()));
        std::fs::write(&path, &ca_pem)?;
        ApiClient::connect(Connection {
            server: Some(server.clone()),
            token: None,
            ca_file: Some(path),
        })
    })?;
    let response: JoinResponse = client.post("/v1/cluster/join", &request).await?;
    let files = DataFiles::new(&config.data_dir);
    files.write_tls(
        &response.ca_cert_pem,
        &response.ca_key_pem,
        &response.node_cert_pem,
        &response.node_key_pem,
    )?;
    config.save(&NodeConfig::path_in(&config.data_dir))?;
    remember_in_cli_config(&args.node, &response.ca_cert_pem, &config.api_url())?;
    println!(
        "node {} joined as a learner; it becomes a voter once it has caught up",
        config.node_id
    );
    println!(
        "next: cairn node run --data-dir {}",
        config.data_dir.display()
    );
    Ok(())
}

pub async fn cluster_status(global: &Global) -> anyhow::Result<()> {
    let status: ClusterStatus = connect(global)?.get("/v1/cluster/status").await?;
    if global.json {
        json(&status);
        return Ok(());
    }
    println!(
        "leader: {}  term: {}  last seq: {}  state hash: {}",
        status
            .leader
            .map(|l| format!("node {l}"))
            .unwrap_or_else(|| "none".into()),
        status.term,
        status.last_seq,
        status.state_hash
    );
    let rows: Vec<Vec<String>> = status
        .nodes
        .iter()
        .map(|n| {
            vec![
                n.node.node_id.to_string(),
                n.node.name.to_string(),
                n.raft_role.clone(),
                if status.leader == Some(n.node.node_id) {
                    "leader".into()
                } else {
                    String::new()
                },
                if n.node.healthy {
                    "healthy".into()
                } else {
                    "unhealthy".into()
                },
                if n.node.draining {
                    "draining".into()
                } else {
                    String::new()
                },
                if n.degraded_sessions > 0 {
                    format!(
                        "{}/{} ({} degraded)",
                        n.sessions, n.node.capacity_sessions, n.degraded_sessions
                    )
                } else {
                    format!("{}/{}", n.sessions, n.node.capacity_sessions)
                },
                n.node.api_address.clone(),
                n.node.portal_address.clone(),
            ]
        })
        .collect();
    table(
        &[
            "ID", "NAME", "RAFT", "ROLE", "HEALTH", "DRAIN", "SESSIONS", "API", "PORTAL",
        ],
        &rows,
    );
    for copy in &status.resyncs {
        if let Some(resync) = copy.resync {
            println!(
                "resync {} ({}): node {} -> node {}  {}",
                copy.mac,
                copy.image,
                copy.node,
                copy.peer
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "?".into()),
                resync_line(&resync)
            );
        }
    }
    Ok(())
}

/// `client show`: the client, its session and each copy of its disk.
fn print_client(detail: &crate::api::types::ClientDetail) {
    let client = &detail.client;
    println!(
        "client {} ({}){}",
        client.mac,
        client.name,
        client
            .group
            .as_ref()
            .map(|g| format!(", group {g}"))
            .unwrap_or_default()
    );
    if let Some(lease) = &detail.lease {
        println!("address: {}", lease.ip);
    }
    let Some(session) = &detail.session else {
        println!("no boot session");
        return;
    };
    let copy_state = match (session.standby, session.standby_copy) {
        (None, _) => "degraded: no standby".to_string(),
        (Some(_), cairn_consensus::domain::StandbyCopy::InSync) => "two copies in sync".into(),
        (Some(_), state) => format!("degraded: the standby's copy is {state:?}, being resynced"),
    };
    println!(
        "session: image {} version {} ({:?}), generation {}, primary node {}, standby {}: {copy_state}",
        session.image,
        session.version,
        session.mode,
        session.generation,
        session.primary,
        session
            .standby
            .map(|s| format!("node {s}"))
            .unwrap_or_else(|| "none".into()),
    );
    for copy in &detail.copies {
        match (&copy.status, &copy.unreachable) {
            (Some(status), _) => {
                let mut line = format!(
                    "  node {}: {:?} at generation {}{}",
                    copy.node,
                    status.role,
                    status.generation,
                    if status.serving { ", serving" } else { "" }
                );
                if let Some(resync) = &status.resync {
                    line += &format!(
                        "; resyncing node {}: {}",
                        status.peer.unwrap_or(0),
                        resync_line(resync)
                    );
                } else if let Some(last) = &status.last_resync {
                    line += &format!(
                        "; last resync {:.1} MiB in {:.1} s",
                        last.bytes_copied as f64 / (1 << 20) as f64,
                        last.elapsed_ms as f64 / 1000.0
                    );
                }
                println!("{line}");
            }
            (None, reason) => println!(
                "  node {}: {}",
                copy.node,
                reason.as_deref().unwrap_or("no answer")
            ),
        }
    }
}

/// Progress of a resync: regions, bytes, rate and time left.
pub fn resync_line(resync: &crate::api::types::ResyncStatus) -> String {
    let percent = if resync.regions_total == 0 {
        100.0
    } else {
        resync.regions_done as f64 * 100.0 / resync.regions_total as f64
    };
    let eta = resync
        .eta_ms
        .map(|ms| format!("{:.0} s left", ms as f64 / 1000.0))
        .unwrap_or_else(|| "time left unknown".into());
    format!(
        "{percent:.1}% ({}/{} regions), {:.1} MiB copied at {:.1} MiB/s, {eta}",
        resync.regions_done,
        resync.regions_total,
        resync.bytes_copied as f64 / (1 << 20) as f64,
        resync.bytes_per_second as f64 / (1 << 20) as f64,
    )
}

fn print_events(global: &Global, events: &[Event]) {
    if global.json {
        json(&events);
        return;
    }
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            let payload = serde_json::to_value(&e.payload).unwrap_or(Value::Null);
            let detail = match payload {
                Value::Object(map) => map
                    .values()
                    .next()
                    .map(|v| v.to_string())
                    .unwrap_or_default(),
                other => other.to_string(),
            };
            vec![
                e.seq.to_string(),
                format_time(e.time_ms),
                e.actor.to_string(),
                e.payload.kind().into(),
                detail,
            ]
        })
        .collect();
    table(&["SEQ", "TIME", "ACTOR", "EVENT", "DETAIL"], &rows);
}

/// Prints what a write produced (one line per event) or its JSON.
async fn write_and_report<B: serde::Serialize>(
    global: &Global,
    method: Method,
    path: &str,
    body: Option<&B>,
) -> anyhow::Result<()> {
    let events: Vec<Event> = connect(global)?.request(method, path, body).await?;
    print_events(global, &events);
    Ok(())
}

fn target_of(args: &TargetArgs) -> anyhow::Result<AssignmentTarget> {
    Ok(match (&args.client, &args.group, &args.user) {
        (Some(mac), _, _) => AssignmentTarget::Client(mac.parse()?),
        (_, Some(group), _) => AssignmentTarget::Group(group.parse()?),
        (_, _, Some(user)) => AssignmentTarget::User(user.parse()?),
        _ => bail!("give --client, --group or --user"),
    })
}

fn rows_of(value: &Value, columns: &[(&str, &str)]) -> Vec<Vec<String>> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|item| {
                    columns
                        .iter()
                        .map(|(_, pointer)| match item.pointer(pointer) {
                            None | Some(Value::Null) => String::new(),
                            Some(Value::String(s)) => s.clone(),
                            Some(other) => other.to_string(),
                        })
                        .collect()
                })
                .collect()
        })
        .unwrap_or_default()
}

async fn list(global: &Global, path: &str, columns: &[(&str, &str)]) -> anyhow::Result<()> {
    let value: Value = connect(global)?.get(path).await?;
    if global.json {
        json(&value);
    } else {
        let headers: Vec<&str> = columns.iter().map(|(h, _)| *h).collect();
        table(&headers, &rows_of(&value, columns));
    }
    Ok(())
}

fn read_password() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let password = line.trim_end_matches(['\n', '\r']).to_string();
    if password.is_empty() {
        bail!("no password on standard input");
    }
    Ok(password)
}

pub async fn run_api_command(global: &Global, command: &Top) -> anyhow::Result<()> {
    match command {
        Top::Cluster(ClusterCommand::Status) => cluster_status(global).await,
        Top::Cluster(ClusterCommand::JoinToken { ttl_seconds }) => {
            let issued: IssuedJoinToken = connect(global)?
                .post(
                    "/v1/cluster/join-tokens",
                    &NewJoinToken {
                        ttl_seconds: Some(*ttl_seconds),
                    },
                )
                .await?;
            if global.json {
                json(&issued);
            } else {
                println!(
                    "join token (one use, expires {}):\n  {}",
                    issued.expires, issued.token
                );
                println!("on the new node: cairn cluster join --server <this API URL> --join-token <token> --node-id N --address IP --data-dir DIR");
            }
            Ok(())
        }
        Top::Cluster(ClusterCommand::RemoveNode { node_id }) => {
            write_and_report::<()>(
                global,
                Method::DELETE,
                &format!("/v1/cluster/nodes/{node_id}"),
                None,
            )
            .await
        }
        Top::Client(ClientCommand::Add { mac, name, group }) => {
            let body = NewClient {
                mac: mac.parse()?,
                name: name.parse()?,
                group: group.as_deref().map(str::parse).transpose()?,
            };
            write_and_report(global, Method::POST, "/v1/clients", Some(&body)).await
        }
        Top::Client(ClientCommand::List) => {
            list(
                global,
                "/v1/clients",
                &[
                    ("MAC", "/mac"),
                    ("NAME", "/name"),
                    ("GROUP", "/group"),
                    ("IP", "/ip"),
                    ("IMAGE", "/session/image"),
                    ("PRIMARY", "/session/primary"),
                    ("STANDBY", "/session/standby"),
                    ("GEN", "/session/generation"),
                ],
            )
            .await
        }
        Top::Client(ClientCommand::Discovered) => {
            list(
                global,
                "/v1/discovered",
                &[
                    ("MAC", "/mac"),
                    ("SEEN BY NODE", "/node_id"),
                    ("FIRST SEEN (ms)", "/first_seen_ms"),
                ],
            )
            .await
        }
        Top::Client(ClientCommand::Show { mac }) => {
            let mac: cairn_consensus::domain::Mac = mac.parse()?;
            let detail: Value = connect(global)?.get(&format!("/v1/clients/{mac}")).await?;
            if global.json {
                json(&detail);
                return Ok(());
            }
            match serde_json::from_value::<crate::api::types::ClientDetail>(detail.clone()) {
                Ok(detail) => print_client(&detail),
                // A newer server's answer this CLI cannot read: show it as it came.
                Err(_) => json(&detail),
            }
            Ok(())
        }
        Top::Client(ClientCommand::Verify { mac }) => {
            let mac: cairn_consensus::domain::Mac = mac.parse()?;
            let report: crate::api::types::CopyVerification = connect(global)?
                .get(&format!("/v1/clients/{mac}/verify"))
                .await?;
            if global.json {
                json(&report);
            } else {
                for copy in &report.copies {
                    match (&copy.status, &copy.unreachable) {
                        (Some(status), _) => println!(
                            "node {} ({:?}, generation {}): digest {} ({} written blocks)",
                            copy.node,
                            status.role,
                            status.generation,
                            status.digest.as_deref().unwrap_or("-"),
                            status.written_blocks.unwrap_or(0)
                        ),
                        (None, reason) => println!(
                            "node {}: {}",
                            copy.node,
                            reason.as_deref().unwrap_or("no answer")
                        ),
                    }
                }
            }
            if !report.equal {
                bail!("the copies of {mac}'s disk differ or could not all be read");
            }
            if !global.json {
                println!("the copies are equal");
            }
            Ok(())
        }
        Top::Client(ClientCommand::Update { mac, name, group }) => {
            let mac: cairn_consensus::domain::Mac = mac.parse()?;
            let body = ClientChange {
                name: name.as_deref().map(str::parse).transpose()?,
                group: group.clone(),
            };
            write_and_report(
                global,
                Method::PATCH,
                &format!("/v1/clients/{mac}"),
                Some(&body),
            )
            .await
        }
        Top::Client(ClientCommand::Remove { mac }) => {
            let mac: cairn_consensus::domain::Mac = mac.parse()?;
            write_and_report::<()>(global, Method::DELETE, &format!("/v1/clients/{mac}"), None)
                .await
        }
        Top::Client(ClientCommand::Boot { mac, image, user }) => {
            let mac: cairn_consensus::domain::Mac = mac.parse()?;
            let body = BootRequest {
                image: image.parse()?,
                user: user.as_deref().map(str::parse).transpose()?,
            };
            write_and_report(
                global,
                Method::POST,
                &format!("/v1/clients/{mac}/boot"),
                Some(&body),
            )
            .await
        }
        Top::Image(ImageCommand::Import {
            name,
            file,
            description,
        }) => {
            let name: Name = name.parse()?;
            let client = connect(global)?;
            let created: anyhow::Result<Vec<Event>> = client
                .post(
                    "/v1/images",
                    &NewImage {
                        name: name.clone(),
                        description: description.clone(),
                    },
                )
                .await;
            if let Err(error) = created {
                if !error.to_string().contains("already exists") {
                    return Err(error);
                }
            }
            let events: Vec<Event> = client
                .upload(&format!("/v1/images/{name}/import"), file)
                .await?;
            print_events(global, &events);
            Ok(())
        }
        Top::Image(ImageCommand::Create { name, description }) => {
            let body = NewImage {
                name: name.parse()?,
                description: description.clone(),
            };
            write_and_report(global, Method::POST, "/v1/images", Some(&body)).await
        }
        Top::Image(ImageCommand::List) => {
            let images: Value = connect(global)?.get("/v1/images").await?;
            if global.json {
                json(&images);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = images
                .as_array()
                .into_iter()
                .flatten()
                .map(|image| {
                    let versions = image["versions"].as_object().map(|v| v.len()).unwrap_or(0);
                    let ready = image["versions"]
                        .as_object()
                        .and_then(|v| v.values().rev().find(|v| v["state"] == "ready"))
                        .map(|v| format!("v{} ({} bytes)", v["version"], v["size_bytes"]))
                        .unwrap_or_else(|| "-".into());
                    vec![
                        image["name"].as_str().unwrap_or_default().to_string(),
                        versions.to_string(),
                        ready,
                        image["description"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                    ]
                })
                .collect();
            table(&["NAME", "VERSIONS", "CURRENT", "DESCRIPTION"], &rows);
            Ok(())
        }
        Top::Image(ImageCommand::Show { name }) => {
            let name: Name = name.parse()?;
            let image: Value = connect(global)?.get(&format!("/v1/images/{name}")).await?;
            json(&image);
            Ok(())
        }
        Top::Image(ImageCommand::Remove { name }) => {
            let name: Name = name.parse()?;
            write_and_report::<()>(global, Method::DELETE, &format!("/v1/images/{name}"), None)
                .await
        }
        Top::User(UserCommand::Add {
            name,
            password_stdin,
        }) => {
            let password = if *password_stdin {
                Some(read_password()?)
            } else {
                None
            };
            let body = NewUser {
                name: name.parse()?,
                password,
            };
            write_and_report(global, Method::POST, "/v1/users", Some(&body)).await
        }
        Top::User(UserCommand::List) => {
            list(
                global,
                "/v1/users",
                &[("NAME", "/name"), ("PASSWORD", "/has_password")],
            )
            .await
        }
        Top::User(UserCommand::Passwd { name }) => {
            let name: Name = name.parse()?;
            let body = NewPassword {
                password: Some(read_password()?),
            };
            write_and_report(
                global,
                Method::PUT,
                &format!("/v1/users/{name}/password"),
                Some(&body),
            )
            .await
        }
        Top::User(UserCommand::Remove { name }) => {
            let name: Name = name.parse()?;
            write_and_report::<()>(global, Method::DELETE, &format!("/v1/users/{name}"), None).await
        }
        Top::Group(GroupCommand::Add { name, description }) => {
            let body = NewGroup {
                name: name.parse()?,
                description: description.clone(),
            };
            write_and_report(global, Method::POST, "/v1/groups", Some(&body)).await
        }
        Top::Group(GroupCommand::List) => {
            list(
                global,
                "/v1/groups",
                &[
                    ("NAME", "/name"),
                    ("CLIENTS", "/clients"),
                    ("DESCRIPTION", "/description"),
                ],
            )
            .await
        }
        Top::Group(GroupCommand::Remove { name }) => {
            let name: Name = name.parse()?;
            write_and_report::<()>(global, Method::DELETE, &format!("/v1/groups/{name}"), None)
                .await
        }
        Top::Token(TokenCommand::Create { name }) => {
            let issued: IssuedToken = connect(global)?
                .post(
                    "/v1/tokens",
                    &NewToken {
                        name: name.parse()?,
                    },
                )
                .await?;
            if global.json {
                json(&issued);
            } else {
                println!("token {} (shown once):\n  {}", issued.name, issued.token);
            }
            Ok(())
        }
        Top::Token(TokenCommand::List) => {
            list(
                global,
                "/v1/tokens",
                &[("NAME", "/name"), ("CREATED", "/created")],
            )
            .await
        }
        Top::Token(TokenCommand::Revoke { name }) => {
            let name: Name = name.parse()?;
            write_and_report::<()>(global, Method::DELETE, &format!("/v1/tokens/{name}"), None)
                .await
        }
        Top::Assign(args) => {
            let body = NewAssignment {
                target: target_of(&args.target)?,
                image: args.image.parse()?,
                mode: match args.mode {
                    Mode::Persistent => DiskMode::Persistent,
                    Mode::NonPersistent => DiskMode::NonPersistent,
                },
                default: args.default,
                position: args.position,
            };
            write_and_report(global, Method::POST, "/v1/assignments", Some(&body)).await
        }
        Top::Unassign(args) => {
            let body = RemovedAssignment {
                target: target_of(&args.target)?,
                image: args.image.parse()?,
            };
            write_and_report(global, Method::DELETE, "/v1/assignments", Some(&body)).await
        }
        Top::Events(EventsCommand::Log {
            client,
            image,
            actor,
            since,
            until,
            from_seq,
            limit,
        }) => {
            let mut query: Vec<(&str, String)> = vec![
                ("from_seq", from_seq.to_string()),
                ("limit", limit.to_string()),
            ];
            for (key, value) in [
                ("client", client),
                ("image", image),
                ("actor", actor),
                ("since", since),
                ("until", until),
            ] {
                if let Some(value) = value {
                    query.push((key, value.clone()));
                }
            }
            let query = query
                .iter()
                .map(|(k, v)| format!("{k}={}", urlencode(v)))
                .collect::<Vec<_>>()
                .join("&");
            let page: EventPage = connect(global)?.get(&format!("/v1/events?{query}")).await?;
            print_events(global, &page.events);
            if let (Some(next), false) = (page.next_seq, global.json) {
                println!("(more: --from-seq {next})");
            }
            Ok(())
        }
        Top::Events(EventsCommand::Export { output }) => {
            let text = connect(global)?.get_text("/v1/events/export").await?;
            match output {
                Some(path) => {
                    std::fs::write(path, &text)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    let header: ExportHeader =
                        serde_json::from_str(text.lines().next().unwrap_or_default())?;
                    eprintln!(
                        "{} events written to {} (state hash {})",
                        header.last_seq,
                        path.display(),
                        header.state_hash
                    );
                }
                None => print!("{text}"),
            }
            Ok(())
        }
        Top::Events(EventsCommand::Replay { until, from }) => {
            let text = match from {
                Some(path) => std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))?,
                None => connect(global)?.get_text("/v1/events/export").await?,
            };
            let (header, events) = parse_export(&text)?;
            let bound = match until.as_deref() {
                None => ReplayBound::Everything,
                Some(text) => match text.parse::<u64>() {
                    Ok(seq) => ReplayBound::Seq(seq),
                    Err(_) => ReplayBound::Time(parse_time(text).map_err(|e| anyhow!(e.message))?),
                },
            };
            let state = cairn_consensus::domain::replay(&events, bound)?;
            if bound == ReplayBound::Everything && state.hash().to_hex() != header.state_hash {
                bail!(
                    "replayed hash {} differs from the export's {}: the file is damaged",
                    state.hash(),
                    header.state_hash
                );
            }
            print_replay(global, &state);
            Ok(())
        }
        Top::Cluster(ClusterCommand::Init(_) | ClusterCommand::Join(_))
        | Top::Node(_)
        | Top::Demo(_) => {
            unreachable!("handled in main")
        }
    }
}

/// Reads an events export: a header line, then one event per line.
pub fn parse_export(text: &str) -> anyhow::Result<(ExportHeader, Vec<Event>)> {
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let (_, first) = lines.next().ok_or_else(|| anyhow!("empty export"))?;
    let header: ExportHeader =
        serde_json::from_str(first).context("line 1: not an export header")?;
    if header.format != EXPORT_FORMAT || header.version != EXPORT_VERSION {
        bail!(
            "unsupported export format {} version {}",
            header.format,
            header.version
        );
    }
    let events = lines
        .map(|(number, line)| {
            serde_json::from_str(line).with_context(|| format!("line {}: not an event", number + 1))
        })
        .collect::<anyhow::Result<Vec<Event>>>()?;
    Ok((header, events))
}

fn print_replay(global: &Global, state: &State) {
    if global.json {
        json(&serde_json::json!({ "state_hash": state.hash().to_hex(), "state": state }));
        return;
    }
    println!(
        "state after event {} ({})",
        state.last_seq,
        format_time(state.last_time_ms)
    );
    println!(
        "nodes {}  images {}  clients {}  discovered {}  users {}  groups {}  assignments {}  boot sessions {}  leases {}",
        state.nodes.len(),
        state.images.len(),
        state.clients.len(),
        state.discovered.len(),
        state.users.len(),
        state.groups.len(),
        state.assignments.len(),
        state.boot_sessions.len(),
        state.leases.len()
    );
    println!("state hash: {}", state.hash());
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub fn load_node_config(data_dir: &Path) -> anyhow::Result<NodeConfig> {
    let path = NodeConfig::path_in(data_dir);
    if !path.exists() {
        bail!(
            "{} does not exist: run `cairn cluster init` or `cairn cluster join` first",
            path.display()
        );
    }
    Ok(NodeConfig::load(&path)?)
}
