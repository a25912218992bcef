//! The admin HTTP API (JSON under `/v1`), `/health` and `/metrics`, served by every node.
//!
//! Writes become `Command`s proposed through Raft (a follower forwards them to the leader inside
//! `ClusterNode::propose`); reads go through `ClusterNode::read`, which is linearizable on every
//! node. Every `/v1` route but the CA certificate and the join call needs a bearer token; the
//! token's name is the actor recorded with each event.

pub mod error;
mod store;
pub mod types;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State as AxumState};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use cairn_consensus::domain::{
    AssignmentTarget, BootSession, Command, Event, Mac, Name, ReplayBound, State, TimeMs,
};
use cairn_consensus::{ClusterCa, ClusterNode, NodeAddress};

use crate::config::NodeConfig;
use crate::secrets;
use error::ApiError;
use types::*;

/// Largest request body the API reads; anything bigger is refused with 413.
pub const REQUEST_BYTES_MAX: usize = 64 * 1024;
/// Most events one `GET /v1/events` returns.
pub const EVENTS_PAGE_MAX: usize = 10_000;

pub struct ApiState {
    pub cluster: ClusterNode,
    pub config: NodeConfig,
    pub ca: ClusterCa,
    pub prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
    pub http: reqwest::Client,
    pub storage: Arc<crate::storage::Storage>,
    /// See `secrets::node_token`.
    pub node_token: String,
}

pub type Shared = Arc<ApiState>;

pub fn router(state: Shared) -> Router {
    let authenticated = Router::new()
        .route("/v1/cluster/status", get(cluster_status))
        .route("/v1/cluster/join-tokens", post(create_join_token))
        .route("/v1/cluster/nodes/{id}", delete(remove_node))
        .route("/v1/clients", get(list_clients).post(add_client))
        .route(
            "/v1/clients/{mac}",
            get(show_client).patch(update_client).delete(remove_client),
        )
        .route("/v1/discovered", get(list_discovered))
        .route("/v1/images", get(list_images).post(create_image))
        .route("/v1/images/{name}", get(show_image).delete(remove_image))
        .route("/v1/images/{name}/versions", post(begin_version))
        .route(
            "/v1/images/{name}/versions/{version}",
            put(complete_version).delete(retire_version),
        )
        .route("/v1/users", get(list_users).post(add_user))
        .route("/v1/users/{name}", delete(remove_user))
        .route("/v1/users/{name}/password", put(set_password))
        .route("/v1/groups", get(list_groups).post(add_group))
        .route("/v1/groups/{name}", delete(remove_group))
        .route(
            "/v1/assignments",
            get(list_assignments).post(assign).delete(unassign),
        )
        .route("/v1/tokens", get(list_tokens).post(create_token))
        .route("/v1/tokens/{name}", delete(revoke_token))
        .route("/v1/events", get(list_events))
        .route("/v1/events/export", get(export_events))
        .route("/v1/sessions", get(list_sessions))
        .route("/v1/sessions/copies", get(local_copies))
        .route("/v1/sessions/{mac}/serving", get(session_serving))
        .route("/v1/sessions/{mac}/copy", get(local_copy))
        .route("/v1/leases", get(list_leases))
        .route("/v1/clients/{mac}/boot", post(boot_client))
        .route("/v1/clients/{mac}/verify", get(verify_client))
        .route("/v1/store/manifests/{hash}", get(store::get_manifest))
        .route("/v1/store/chunks/{hash}", get(store::get_chunk))
        .route(
            "/v1/images/{name}/import",
            put(store::import_image).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .merge(authenticated)
        .route("/v1/cluster/ca", get(ca_certificate))
        .route("/v1/cluster/join", post(join))
        .route("/health", get(health))
        .route("/metrics", get(render_metrics))
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(axum::extract::DefaultBodyLimit::max(REQUEST_BYTES_MAX))
        .layer(middleware::from_fn(record_latency))
        .with_state(state)
}

/// The token's name, the actor of whatever the request writes.
#[derive(Clone)]
pub struct Actor(pub Name);

async fn authenticate(
    AxumState(state): AxumState<Shared>,
    mut request: Request,
    next: Next,
) -> Response {
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let Some(token) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
        return ApiError::unauthorized("missing bearer token (Authorization: Bearer <token>)")
            .into_response();
    };
    let token = token.trim();
    if token == state.node_token {
        request
            .extensions_mut()
            .insert(Actor(Name::new("cluster").expect("valid name")));
        return next.run(request).await;
    }
    let digest = secrets::digest(token);
    // Tokens are checked against this node's projection: a token created a moment ago on another
    // node may need one replication round trip to be known here.
    let actor = state.cluster.local_state(|s| {
        s.tokens
            .values()
            .find(|t| t.digest == digest)
            .map(|t| t.name.clone())
    });
    match actor {
        Some(name) => {
            request.extensions_mut().insert(Actor(name));
            next.run(request).await
        }
        None => ApiError::unauthorized("unknown or revoked token").into_response(),
    }
}

async fn record_latency(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::histogram!("cairn_api_request_duration_seconds", "method" => method.to_string(), "route" => route, "status" => status)
        .record(started.elapsed().as_secs_f64());
    response
}

impl<S: Send + Sync> FromRequestParts<S> for Actor {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Actor, ApiError> {
        parts
            .extensions
            .get::<Actor>()
            .cloned()
            .ok_or_else(|| ApiError::unauthorized("not authenticated"))
    }
}

/// A JSON body whose problems (syntax, missing fields, invalid names or MACs, wrong content
/// type, too large) become JSON errors.
pub struct Body<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;
    async fn from_request(request: Request, state: &S) -> Result<Body<T>, ApiError> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(Body(value)),
            Err(rejection) => {
                let status = rejection.status();
                let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
                    "too-large"
                } else {
                    "bad-request"
                };
                let status = if status == StatusCode::PAYLOAD_TOO_LARGE {
                    status
                } else {
                    StatusCode::BAD_REQUEST
                };
                Err(ApiError::new(status, code, rejection.body_text()))
            }
        }
    }
}

fn parse<T: std::str::FromStr<Err = cairn_consensus::domain::Rejection>>(
    text: &str,
) -> Result<T, ApiError> {
    text.parse().map_err(ApiError::from)
}

pub(crate) async fn write(
    state: &ApiState,
    actor: Name,
    command: Command,
) -> Result<Json<Vec<Event>>, ApiError> {
    Ok(Json(state.cluster.propose(actor, command).await?))
}

/// A read whose answer is built as JSON inside the read (it borrows the state).
async fn read_json(
    state: &ApiState,
    f: impl FnOnce(&State) -> serde_json::Result<serde_json::Value>,
) -> Result<Json<serde_json::Value>, ApiError> {
    read(state, f)
        .await?
        .map(Json)
        .map_err(|e| ApiError::internal(e.to_string()))
}

async fn read<T>(state: &ApiState, f: impl FnOnce(&State) -> T) -> Result<T, ApiError> {
    Ok(state.cluster.read(f).await?)
}

// ---------------------------------------------------------------------------------- health

async fn health(AxumState(state): AxumState<Shared>) -> Response {
    let metrics = state.cluster.metrics().borrow().clone();
    let running = metrics.running_state.is_ok();
    let (last_seq, hash) = state.cluster.local_state(|s| (s.last_seq, s.hash()));
    let body = Health {
        status: if !running {
            "stopped"
        } else if metrics.current_leader.is_some() {
            "ok"
        } else {
            "no-leader"
        }
        .into(),
        node_id: state.config.node_id,
        leader: metrics.current_leader,
        term: metrics.current_term,
        last_applied: metrics.last_applied.map(|l| l.index),
        last_seq,
        state_hash: hash.to_hex(),
    };
    let status = if body.status == "ok" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn render_metrics(AxumState(state): AxumState<Shared>) -> Response {
    match &state.prometheus {
        Some(handle) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => {
            ApiError::unavailable("metrics recorder not installed in this process").into_response()
        }
    }
}

// ---------------------------------------------------------------------------------- cluster

async fn ca_certificate(AxumState(state): AxumState<Shared>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        state.ca.cert_pem().to_string(),
    )
        .into_response()
}

async fn cluster_status(
    AxumState(state): AxumState<Shared>,
) -> Result<Json<ClusterStatus>, ApiError> {
    let metrics = state.cluster.metrics().borrow().clone();
    let membership = metrics.membership_config.membership().clone();
    let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
    let learners: std::collections::BTreeSet<u64> = membership.learner_ids().collect();
    let (nodes, last_seq, hash) = read(&state, |s| {
        let sessions = s.sessions_per_node();
        let nodes = s
            .nodes
            .values()
            .map(|node| NodeStatus {
                node: node.clone(),
                raft_role: if voters.contains(&node.node_id) {
                    "voter"
                } else if learners.contains(&node.node_id) {
                    "learner"
                } else {
                    "none"
                }
                .into(),
                sessions: sessions.get(&node.node_id).copied().unwrap_or(0),
                degraded_sessions: s
                    .boot_sessions
                    .values()
                    .filter(|b| b.primary == node.node_id && b.is_degraded())
                    .count(),
            })
            .collect::<Vec<NodeStatus>>();
        (nodes, s.last_seq, s.hash())
    })
    .await?;
    // The resyncs running, as each node's primaries report them.
    let asked = nodes.iter().map(|n| {
        let state = state.clone();
        let node = n.node.node_id;
        async move { ask_node::<Vec<CopyStatus>>(&state, node, "/v1/sessions/copies").await }
    });
    let resyncs = futures::future::join_all(asked)
        .await
        .into_iter()
        .flatten()
        .flatten()
        .filter(|copy| copy.role == CopyRole::Primary && copy.resync.is_some())
        .collect();
    Ok(Json(ClusterStatus {
        this_node: state.config.node_id,
        leader: metrics.current_leader,
        term: metrics.current_term,
        last_log_index: metrics.last_log_index,
        last_applied: metrics.last_applied.map(|l| l.index),
        last_seq,
        state_hash: hash.to_hex(),
        nodes,
        resyncs,
    }))
}

async fn create_join_token(
    AxumState(state): AxumState<Shared>,
    Actor(actor): Actor,
    Body(request): Body<NewJoinToken>,
) -> Result<Json<IssuedJoinToken>, ApiError> {
    let ttl_seconds = request.ttl_seconds.unwrap_or(3600).clamp(60, 7 * 24 * 3600);
    let secret = secrets::random_secret();
    let expires_ms = now_ms() + (ttl_seconds * 1000) as TimeMs;
    state
        .cluster
        .propose(
            actor,
            Command::CreateJoinToken {
                digest: secrets::digest(&secret),
                expires_ms,
            },
        )
        .await?;
    let fingerprint = state
        .ca
        .fingerprint()
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Json(IssuedJoinToken {
        token: secrets::join_token(&secret, &fingerprint),
        expires: format_time(expires_ms),
    }))
}

/// A new node presents its one-time join token; the leader records the node, adds it as a Raft
/// learner and hands it a certificate (and the CA, so that it can admit nodes when it leads).
/// A follower passes the call on to the leader's API.
async fn join(
    AxumState(state): AxumState<Shared>,
    Body(request): Body<JoinRequest>,
) -> Result<Json<JoinResponse>, ApiError> {
    let Some((secret, _fingerprint)) = secrets::parse_join_token(&request.join_token) else {
        return Err(ApiError::unauthorized("malformed join token"));
    };
    if !state.cluster.is_leader() {
        return forward_join(&state, &request).await;
    }
    let raft_address: std::net::SocketAddr = request.raft_address.parse().map_err(|_| {
        ApiError::bad_request(format!(
            "raft_address {:?} is not ip:port",
            request.raft_address
        ))
    })?;
    let actor = Name::new(format!("node-{}", state.config.node_id)).expect("node names are valid");
    state
        .cluster
        .propose(
            actor.clone(),
            Command::ConsumeJoinToken {
                digest: secrets::digest(&secret),
                node_id: request.node_id,
            },
        )
        .await
        .map_err(|error| match error {
            cairn_consensus::ProposeError::Rejected(rejection) => ApiError::new(
                StatusCode::FORBIDDEN,
                "join-refused",
                format!("join refused: {rejection}"),
            ),
            other => other.into(),
        })?;
    let identity = state
        .ca
        .issue_node_certificate(request.node_id)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    state
        .cluster
        .propose(
            actor,
            Command::RegisterNode {
                node_id: request.node_id,
                name: request.name.clone(),
                raft_address: request.raft_address.clone(),
                api_address: request.api_address.clone(),
                portal_address: request.portal_address.clone(),
                boot_address: request.boot_address.clone(),
                capacity_sessions: request.capacity_sessions,
            },
        )
        .await?;
    // openraft commits the membership change first and then waits for the learner to catch up,
    // which it can only do once the new node runs: so do not hold the join call open for it.
    let cluster = state.cluster.clone();
    let (node_id, address) = (
        request.node_id,
        NodeAddress::new(raft_address, request.api_address.clone()),
    );
    tokio::spawn(async move {
        match cluster.add_learner(node_id, address).await {
            Ok(()) => tracing::info!(node_id, "learner caught up"),
            Err(error) => tracing::warn!(node_id, %error, "adding the learner did not finish"),
        }
    });
    Ok(Json(JoinResponse {
        ca_cert_pem: state.ca.cert_pem().to_string(),
        ca_key_pem: state.ca.key_pem(),
        node_cert_pem: identity.cert_pem,
        node_key_pem: identity.key_pem,
    }))
}

async fn forward_join(
    state: &ApiState,
    request: &JoinRequest,
) -> Result<Json<JoinResponse>, ApiError> {
    let leader_api = state
        .cluster
        .leader()
        .and_then(|leader| {
            state
                .cluster
                .local_state(|s| s.nodes.get(&leader).map(|n| n.api_address.clone()))
        })
        .ok_or_else(|| ApiError::unavailable("no leader known; try again"))?;
    let response = state
        .http
        .post(format!("{leader_api}/v1/cluster/join"))
        .json(request)
        .send()
        .await
        .map_err(|e| {
            ApiError::unavailable(format!(
                "forwarding to the leader at {leader_api} failed: {e}"
            ))
        })?;
    let status = response.status();
    if status.is_success() {
        let body = response
            .json()
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?;
        Ok(Json(body))
    } else {
        let body: ErrorBody = response.json().await.unwrap_or(ErrorBody {
            error: "unavailable".into(),
            message: status.to_string(),
        });
        Err(ApiError::new(status, "join-refused", body.message))
    }
}

async fn remove_node(
    AxumState(state): AxumState<Shared>,
    Actor(actor): Actor,
    Path(id): Path<u64>,
) -> Result<Json<Vec<Event>>, ApiError> {
    if id == state.config.node_id && state.cluster.is_leader() {
        // Removing the leader works (it steps down), but say so in the logs.
        tracing::warn!(node_id = id, "removing the current leader from the cluster");
    }
    state.cluster.remove_node(id).await.map_err(|e| match e {
        cairn_consensus::MembershipError::Refused(reason) => {
            ApiError::new(StatusCode::CONFLICT, "membership", reason)
        }
        other => ApiError::unavailable(other.to_string()),
    })?;
    write(&state, actor, Command::RemoveNode { node_id: id }).await
}

// ---------------------------------------------------------------------------------- clients

async fn list_clients(
    AxumState(state): AxumState<Shared>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let rows = read(&state, |s| {
        // Leases are keyed by address: index them by MAC once, not once per client.
        let ips: std::collections::HashMap<Mac, std::net::Ipv4Addr> =
            s.leases.values().map(|l| (l.mac, l.ip)).collect();
        s.clients
            .values()
            .map(|client| {
                serde_json::json!({
                    "mac": client.mac,
                    "name": client.name,
                    "group": client.group,
                    "session": s.boot_sessions.get(&client.mac),
                    "ip": ips.get(&client.mac),
                })
            })
            .collect::<Vec<_>>()
    })
    .await?;
    Ok(Json(serde_json::Value::Array(rows)))
}

async fn add_client(
    AxumState(state): AxumState<Shared>,
    Actor(actor): Actor,
    Body(new): Body<NewClient>,
) -> Result<Json<Vec<Event>>, ApiError> {
    write(
        &state,
        actor,
        Command::AddClient {
            mac: new.mac,
            name: new.name,
            group: new.group,
        },
    )
    .await
}

async fn show_client(
    AxumState(state): AxumState<Shared>,
    Path(mac): Path<String>,
) -> Result<Json<ClientDetail>, ApiError> {
    let mac: Mac = parse(&mac)?;
    let mut detail = read(&state, |s| {
        let client = s.clients.get(&mac)?.clone();
        Some(ClientDetail {
            images: s.client_images(&mac),
            session: s.boot_sessions.get(&mac).cloned(),
            lease: s.leases.values().find(|l| l.mac == mac).cloned(),
            client,
            copies: Vec::new(),
        })
    })
    .await?
    .ok_or_else(|| ApiError::not_found(format!("client {mac} not found")))?;
    if let Some(session) = &detail.session {
        detail.copies = ask_copies(&state, session, false).await;
    }
    Ok(Json(detail))
}

/// Asks the session's primary and standby about their copies (with digests if `digest`).
async fn ask_copies(state: &Shared, session: &BootSession, digest: bool) -> Vec<CopyReport> {
    let nodes = std::iter::once(session.primary).chain(session.standby);
    let path = format!(
        "/v1/sessions/{}/copy?digest={digest}",
        cairn_bootproto::MacAddr(session.mac.0).to_hyphenated()
    );
    let reports = nodes.map(|node| {
        let (state, path) = (state.clone(), path.clone());
        async move {
            match ask_node::<CopyStatus>(&state, node, &path).await {
                Ok(status) => CopyReport {
                    node,
                    status: Some(status),
                    unreachable: None,
                },
                Err(reason) => CopyReport {
                    node,
                    status: None,
                    unreachable: Some(reason),
                },
            }
        }
    });
    futures::future::join_all(reports).await
}

async fn verify_client(
    AxumState(state): AxumState<Shared>,
    Path(mac): Path<String>,
) -> Result<Json<CopyVerification>, ApiError> {
    let mac: Mac = parse(&mac)?;
    let session = read(&state, |s| s.boot_sessions.get(&mac).cloned())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("client {mac} has no boot session")))?;
    let copies = ask_copies(&state, &session, true).await;
    let digests: Vec<(u64, &str)> = copies
        .iter()
        .filter_map(|c| c.status.as_ref())
        .filter_map(|s| Some((s.generation, s.digest.as_deref()?)))
        .collect();
    let equal = digests.len() == 2 && digests[0] == digests[1];
    Ok(Json(CopyVerification { equal, copies }))
}

/// How long a node waits for another node's answer about its copies.
const ASK_NODE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// GETs `path` from node `node`'s admin API (this node's own router when it is this node), with
/// the node token; the reason as text when it cannot.
async fn ask_node<T: serde::de::DeserializeOwned>(
    state: &Shared,
    node: u64,
    path: &str,
) -> Result<T, String> {
    let api = state
        .cluster
        .local_state(|s| s.nodes.get(&node).map(|n| n.api_address.clone()))
        .ok_or_else(|| format!("node {node} is not registered"))?;
    let response = state
        .http
        .get(format!("{api}{path}"))
        .bearer_auth(&state.node_token)
        .timeout(ASK_NODE_TIMEOUT)
        .send()
        .await
        .map_err(|error| format!("cannot reach node {node}: {error}"))?;
    if !response.status().is_success() {
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<ErrorBody>(&body)
            .map(|e| e.message)
            .unwrap_or(body);
        return Err(format!("node {node}: {message} ({})", status.as_u16()));
    }
    response
        .json()
        .await
        .map_err(|error| format!("node {node}: unexpected answer: {error}"))
}

#[derive(Deserialize)]
struct CopyQuery {
    /// Also take the copy's digest (reads every written block of the layer).
    #[serde(default)]
    digest: bool,
}

/// This node's copy of the client's layer, if it serves the session (local, not replicated).
async fn local_copy(
    AxumState(state): AxumState<Shared>,
    Path(mac): Path<String>,
    query: Result<Query<CopyQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<CopyStatus>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let mac: Mac = parse(&mac)?;
    let (mut status, volume) = state.storage.sessions.copy_status(&mac).ok_or_else(|| {
        ApiError::not_found(format!(
            "node {} holds no copy of {mac}'s session",
            state.config.node_id
        ))
    })?;
    if query.digest {
        let volume = volume.ok_or_else(|| {
            ApiError::unavailable(format!(
                "node {} has no open copy of {mac}'s layer",
                state.config.node_id
            ))
        })?;
        let digest = tokio::task::spawn_blocking(move || volume.copy_digest())
            .await
            .map_err(|error| ApiError::internal(error.to_string()))?
            .map_err(|error| ApiError::unavailable(error.to_string()))?;
        status.digest = Some(blake3::Hash::from(digest.hash).to_hex().to_string());
        status.written_blocks = Some(digest.written_blocks);
    }
    Ok(Json(status))
}

/// Every copy this node holds (local, not replicated).
async fn local_copies(AxumState(state): AxumState<Shared>) -> Json<Vec<CopyStatus>> {
    Json(state.storage.sessions.copy_statuses())
}

async fn update_client(
    AxumState(state): AxumState<Shared>,
    Actor(actor): Actor,
    Path(mac): Path<String>,
    Body(change): Body<ClientChange>,
) -> Result<Json<Vec<Event>>, ApiError> {
    let mac: Mac = parse(&mac)?;
    let group = match change.group.as_deref() {
        None => None,
        Some("") => Some(None),
        Some(name) => Some(Some(parse(name)?)),
    };
    write(
        &state,
        actor,
        Command::UpdateClient {
            mac,
            name: change.name,
            group,
        },
    )
    .await
}

async fn remove_client(
    AxumState(state): AxumState<Shared>,
    Actor(actor): Actor,
    Path(mac): Path<String>,
) -> Result<Json<Vec<Event>>, ApiError> {
    let mac: Mac = parse(&mac)?;
    write(&state, actor, Command::RemoveClient { mac }).await
}

async fn boot_client(
    AxumState(state): AxumState<Shared>,
    Actor(actor): Actor,
    Path(mac): Path<String>,
    Body(request): Body<BootRequest>,
) -> Result<Json<Vec<Event>>, ApiError> {
    let mac: Mac = parse(&mac)?;
    write(
        &state,
        actor,
        Command::BeginBoot {
            mac,
            image: request.image,
            user: request.user,
        },
    )
    .await
}

async fn list_discovered(
    AxumState(state): AxumState<Shared>,
) -> Result<Json<serde_json::Value>, ApiError> {
    read_json(&state, |s| {
        serde_json::to_value(s.discovered.values().collect::<Vec<_>>())
    })
    .await
}

// ---------------------------------------------------------------------------------- images

async fn list_images(
    AxumState(state): AxumState<Shared>,
) -> Result<Json<serde_json::Value>, ApiError> {
    read_json(&state, |s| {
        serde_json::to_value(s.images.values().collect::<Vec<_>>())
    })
    .await
}

async fn create_image(
    AxumState(state): AxumState<Shared>,
    Actor(actor): Actor,
    Body(new): Body<NewImage>,
) -> Result<Json<Vec<Event>>, ApiError> {
    write(
        &state,
        actor,
        Command::CreateImage {
            name: new.name,
            description: new.description,
        },
    )
    .await
}

async fn show_image(
    AxumState(state): AxumState<Shared>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let name: Name = parse(&name)?;
    let image = read(&state, |s| s.images.get(&name).map(serde_json::to_value)).await?;
    match image {
        Some(value) => value
            .map(Json)
            .map_err(|e| ApiError::internal(e.to_string())),
        None => Err(ApiError::not_found(format!("image {name} not found"))),
    }
}

async fn remove_image(
    AxumState(state): AxumState<Shared>,
    Actor(actor): Actor,
    Path(name): Path<String>,
) -> Result<Json<Vec<Event>>, ApiError> {
    write(
        &state,
        actor,
        Command::RemoveImage {
            name: parse(&name)?,
        },
    )
    .await
}

async fn begin_version(
    AxumState(state): AxumState<Shared>,
    Actor(actor): Actor,
    Path(name): Path<String>,
) -> Result<Json<Vec<Event>>, ApiError> {
    write(
        &state,
        actor,
        Command::BeginImageVersion {
            image: parse(&name)?,
        },
    )
    .await
}

async fn complete_version(
    AxumState(state): AxumState<Shared>,
    Actor(actor): Actor,
    Path((name, version)): Path<(String, u32)>,
    Body(body): Body<CompleteVersion>,
) -> Result<Json<Vec<Event>>, ApiError> {
    let command = Command::CompleteImageVersion {
        image: parse(&name)?,
        version,
        manifest: body.manifest,
        size_bytes: body.size_bytes,
    };
    write(&state, actor, command).await
}

async fn retire_version(
    AxumState(state): AxumState<Shared>,
    Actor(actor): Actor,
    Path((name, version)): Path<(String, u32)>,
) -> Result<Json<Vec<Event>>, ApiError> {
    write(
        &state,
        actor,
        Command::RetireImageVersion {
            image: parse(&name)?,
            version,
        },
    )
    .await
}

// ---------------------------------------------------------------------------------- users, groups, tokens

async fn list_users(
    AxumState(state): AxumState<Shared>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let rows = read(&state, |s| {
        s.users
            .values()
            .map(|u| serde_json::json!({ "name": u.name, "has_password": u.password_hash.is_some() }))
            .collect::<Vec<_>>()
    })
    .await?;
    Ok(Json(serde_json::Value::Array(rows)))
}

async fn add_user(
    AxumState(state): AxumState<Shared>,
    Actor(actor): Actor,
    Body(new): Body<NewUser>,
) -> Result<Json<Vec<Event>>, ApiError> {
    let password_hash = new
        .password
        .as_deref()
        .map(secrets::hash_password)
        .transpose()?;
    write(
        &state,
        actor,
        Command::AddUser {
            name: new.name,
            password_hash,
        },
    )
    .await
}

async fn set_password(
    AxumState(state): AxumState<Shared>,
    Actor(actor): Actor,
    Path(name): Path<String>,
    Body(body): Body<NewPassword>,
) -> Result<Json<Vec<Event>>, ApiError> {
    let password_hash = body
        .password
        .as_deref()
        .map(secrets::hash_password)
        .transpose()?;
    write(
        &state,
        actor,
        Command::SetUserPassword {
            name: parse(&name)?,
            password_hash,
        },
    )
    .await
}

async fn remove_user(
    AxumState(state): AxumState<Shared>,
    Actor(actor): Actor,
    Path(name): Path<String>,
) -> Result<Json<Vec<Event>>, ApiError> {
    write(
        &state,
        actor,
        Command::RemoveUser {
            name: parse(&name)?,
        },
    )
    .await
}

async fn list_groups(
    AxumState(state): AxumState<Shared>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let rows = read(&state, |s| {
        s.groups
            .values()
            .map(|g| {
                let members = s.clients.values().filter(|c| c.group.as_ref() == Some(&g.name)).count();
                serde_json::json!({ "name": g.name, "description": g.description, "clients": members })
            })
            .collect::<Vec<_>>()
    })
    .await?;
    Ok(Json(serde_json::Value::Array(rows)))
}

async fn add_group(
    AxumState(state): AxumState<Shared>,
    Actor(actor): Actor,
    Body(new): Body<NewGroup>,
) -> Result<Json<Vec<Event>>, ApiError> {
    write(
        &state,
        actor,
        Command::AddGroup {
            name: new.name,
            description: new.description,
        },
    )
    .await
}

async fn remove_group(
    AxumState(state): AxumState<Shared>,
    Actor(actor): Actor,
    Path(name): Path<String>,
) -> Result<Json<Vec<Event>>, ApiError> {
    write(
        &state,
        actor,
        Command::RemoveGroup {
            name: parse(&name)?,
        },
    )
    .await
}

async fn list_tokens(
    AxumState(state): AxumState<Shared>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let rows = read(&state, |s| {
        s.tokens
            .values()
            .map(|t| serde_json::json!({ "name": t.name, "created": format_time(t.created_ms) }))
            .collect::<Vec<_>>()
    })
    .await?;
    Ok(Json(serde_json::Value::Array(rows)))
}

async fn create_token(
    AxumState(state): AxumState<Shared>,
    Actor(actor): Actor,
    Body(new): Body<NewToken>,
) -> Result<Json<IssuedToken>, ApiError> {
    let token = secrets::admin_token();
    state
        .cluster
        .propose(
            actor,
            Command::CreateToken {
                name: new.name.clone(),
                digest: secrets::digest(&token),
            },
        )
        .await?;
    Ok(Json(IssuedToken {
        name: new.name.to_string(),
        token,
    }))
}

async fn revoke_token(
    AxumState(state): AxumState<Shared>,
    Actor(actor): Actor,
    Path(name): Path<String>,
) -> Result<Json<Vec<Event>>, ApiError> {
    write(
        &state,
        actor,
        Command::RevokeToken {
            name: parse(&name)?,
        },
    )
    .await
}

// ---------------------------------------------------------------------------------- assignments

async fn list_assignments(
    AxumState(state): AxumState<Shared>,
) -> Result<Json<Vec<AssignmentRow>>, ApiError> {
    let rows = read(&state, |s| {
        s.assignments
            .iter()
            .map(|(target, list)| AssignmentRow {
                target: target.clone(),
                list: list.clone(),
            })
            .collect()
    })
    .await?;
    Ok(Json(rows))
}

async fn assign(
    AxumState(state): AxumState<Shared>,
    Actor(actor): Actor,
    Body(new): Body<NewAssignment>,
) -> Result<Json<Vec<Event>>, ApiError> {
    let command = Command::Assign {
        target: new.target,
        image: new.image,
        mode: new.mode,
        default: new.default,
        position: new.position,
    };
    write(&state, actor, command).await
}

async fn unassign(
    AxumState(state): AxumState<Shared>,
    Actor(actor): Actor,
    Body(removed): Body<RemovedAssignment>,
) -> Result<Json<Vec<Event>>, ApiError> {
    write(
        &state,
        actor,
        Command::Unassign {
            target: removed.target,
            image: removed.image,
        },
    )
    .await
}

async fn list_sessions(
    AxumState(state): AxumState<Shared>,
) -> Result<Json<serde_json::Value>, ApiError> {
    read_json(&state, |s| {
        serde_json::to_value(s.boot_sessions.values().collect::<Vec<_>>())
    })
    .await
}

#[derive(Deserialize)]
struct ServingQuery {
    generation: u64,
    /// How long to wait for it; at most [`SERVING_WAIT_MS_MAX`].
    #[serde(default)]
    wait_ms: u64,
}

/// Longest wait `GET /v1/sessions/{mac}/serving` accepts.
pub const SERVING_WAIT_MS_MAX: u64 = 5_000;

/// Whether this node serves the client's volume as primary at `generation` (or later), waiting
/// up to `wait_ms` for it: the script server asks the primary this before it hands iPXE a script
/// naming that primary. Local to this node, not a replicated read.
async fn session_serving(
    AxumState(state): AxumState<Shared>,
    Path(mac): Path<String>,
    query: Result<Query<ServingQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let mac: Mac = parse(&mac)?;
    let wait = std::time::Duration::from_millis(query.wait_ms.min(SERVING_WAIT_MS_MAX));
    let serving = state
        .storage
        .wait_serving(&mac, query.generation, wait)
        .await;
    Ok(Json(serde_json::json!({ "serving": serving })))
}

async fn list_leases(
    AxumState(state): AxumState<Shared>,
) -> Result<Json<serde_json::Value>, ApiError> {
    read_json(&state, |s| {
        serde_json::to_value(s.leases.values().collect::<Vec<_>>())
    })
    .await
}

// ---------------------------------------------------------------------------------- events

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventQuery {
    pub from_seq: Option<u64>,
    pub limit: Option<usize>,
    pub client: Option<String>,
    pub image: Option<String>,
    pub actor: Option<String>,
    /// RFC 3339.
    pub since: Option<String>,
    /// RFC 3339.
    pub until: Option<String>,
}

/// Events of the history that match every given filter, oldest first, at most `limit`.
async fn list_events(
    AxumState(state): AxumState<Shared>,
    query: Result<Query<EventQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<EventPage>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let client: Option<Mac> = query.client.as_deref().map(parse).transpose()?;
    let image: Option<Name> = query.image.as_deref().map(parse).transpose()?;
    let actor: Option<Name> = query.actor.as_deref().map(parse).transpose()?;
    let since = query.since.as_deref().map(parse_time).transpose()?;
    let until = query.until.as_deref().map(parse_time).transpose()?;
    let limit = query.limit.unwrap_or(1000).clamp(1, EVENTS_PAGE_MAX);
    // Linearizable: the page reflects every write acknowledged before this request.
    let last_seq = read(&state, |s| s.last_seq).await?;
    let mut events = Vec::new();
    let mut seq = query.from_seq.unwrap_or(1).max(1);
    const SCAN_BATCH: usize = 4096;
    while seq <= last_seq && events.len() < limit {
        let batch = state
            .cluster
            .events(seq, SCAN_BATCH)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        if batch.is_empty() {
            break;
        }
        for event in batch {
            seq = event.seq + 1;
            if event.seq > last_seq {
                break;
            }
            let keep = client.is_none_or(|mac| event.payload.client() == Some(mac))
                && image
                    .as_ref()
                    .is_none_or(|name| event.payload.image() == Some(name))
                && actor.as_ref().is_none_or(|name| &event.actor == name)
                && since.is_none_or(|t| event.time_ms >= t)
                && until.is_none_or(|t| event.time_ms <= t);
            if keep {
                events.push(event);
                if events.len() == limit {
                    break;
                }
            }
        }
    }
    let next_seq = (events.len() == limit && seq <= last_seq).then_some(seq);
    Ok(Json(EventPage { events, next_seq }))
}

/// The whole history as JSON Lines: a header line, then one event per line (see ARCHITECTURE.md).
async fn export_events(AxumState(state): AxumState<Shared>) -> Result<Response, ApiError> {
    let last_seq = read(&state, |s| s.last_seq).await?;
    let mut out = Vec::new();
    let mut events = Vec::with_capacity(last_seq as usize);
    let mut seq = 1;
    while seq <= last_seq {
        let batch = state
            .cluster
            .events(seq, 4096)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        if batch.is_empty() {
            break;
        }
        for event in batch.into_iter().take_while(|e| e.seq <= last_seq) {
            seq = event.seq + 1;
            events.push(event);
        }
    }
    // The header's hash is the replay of exactly the exported events, so a reader can check it.
    let replayed = cairn_consensus::domain::replay(&events, ReplayBound::Everything)
        .map_err(|e| ApiError::internal(format!("stored history is inconsistent: {e}")))?;
    let header = ExportHeader {
        format: EXPORT_FORMAT.into(),
        version: EXPORT_VERSION,
        exported_by: state.config.node_id,
        exported_at: format_time(now_ms()),
        last_seq: replayed.last_seq,
        state_hash: replayed.hash().to_hex(),
    };
    serde_json::to_writer(&mut out, &header).map_err(|e| ApiError::internal(e.to_string()))?;
    out.push(b'\n');
    for event in &events {
        serde_json::to_writer(&mut out, event).map_err(|e| ApiError::internal(e.to_string()))?;
        out.push(b'\n');
    }
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], out).into_response())
}

// ---------------------------------------------------------------------------------- helpers

pub fn now_ms() -> TimeMs {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as TimeMs)
        .unwrap_or(0)
}

pub fn format_time(ms: TimeMs) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

pub fn parse_time(text: &str) -> Result<TimeMs, ApiError> {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as TimeMs)
        .map_err(|e| ApiError::bad_request(format!("{text:?} is not an RFC 3339 time: {e}")))
}

/// Assignment targets in paths and CLI flags: `client:<mac>`, `group:<name>`, `user:<name>`.
pub fn parse_target(text: &str) -> Result<AssignmentTarget, ApiError> {
    match text.split_once(':') {
        Some(("client", mac)) => Ok(AssignmentTarget::Client(parse(mac)?)),
        Some(("group", name)) => Ok(AssignmentTarget::Group(parse(name)?)),
        Some(("user", name)) => Ok(AssignmentTarget::User(parse(name)?)),
        _ => Err(ApiError::bad_request(format!(
            "{text:?}: expected client:<mac>, group:<name> or user:<name>"
        ))),
    }
}
