//! The data-plane protocol (DESIGN.md §4), served only on the Unix socket.
//!
//! Every reply carries [`CONTROL_PLANE_HEADER`] so the filter can tell it from the
//! 503/504 that Envoy synthesizes when this server is down or slow. The socket's
//! routes have their own state, [`DataplaneState`]: the management API's login limiter
//! and public URL are not even in reach here (DESIGN.md §4: the management API is
//! never on the socket).
//!
//! Two more routes serve operators and the benchmark (`./dev bench`), still only on
//! the socket:
//! - `GET /v1/dataplane/stats`: [`DataplaneStats`], requests counted by route and the
//!   last snapshot build (no names, no secrets).
//! - `/v1/dataplane/ext_authz/...` (any method): [`ext_authz`], a check endpoint for
//!   Envoy's `ext_authz` HTTP service.

pub mod ext_authz;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use agent_vault_rules::{
    CredentialsRequest, LogRecord, CONTROL_PLANE_HEADER, CREDENTIALS_PATH, LOGS_PATH, SNAPSHOT_PATH,
};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::Router;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::http::{blocking, JsonBody};
use crate::logs::{LogRetention, RequestLog};
use crate::snapshot::SnapshotCache;
use crate::store::Store;

/// The stats route's path and answer (wire types live in `rules/`).
pub use agent_vault_rules::{DataplaneCounts, STATS_PATH};
pub use ext_authz::EXT_AUTHZ_PATH;

/// What the socket's handlers share.
#[derive(Clone)]
pub struct DataplaneState {
    pub store: Arc<Store>,
    pub snapshots: Arc<SnapshotCache>,
    pub request_log: Arc<RequestLog>,
    /// Also read by `/metrics` on the TCP listener.
    pub stats: Arc<DataplaneStats>,
}

impl DataplaneState {
    /// The data plane of `store`, keeping its request log within `retention`.
    pub fn new(store: Arc<Store>, retention: LogRetention) -> DataplaneState {
        DataplaneState {
            request_log: Arc::new(RequestLog::new(store.clone(), retention)),
            store,
            snapshots: Arc::default(),
            stats: Arc::default(),
        }
    }
}

/// Data-plane requests counted by route since the server started, and the cost of the
/// last snapshot build. Plain relaxed atomics: counting costs one uncontended add.
#[derive(Debug, Default)]
pub struct DataplaneStats {
    snapshot_full: AtomicU64,
    snapshot_not_modified: AtomicU64,
    credentials: AtomicU64,
    logs: AtomicU64,
    log_records: AtomicU64,
    ext_authz: AtomicU64,
    snapshot_builds: AtomicU64,
    last_build_us: AtomicU64,
    last_snapshot_bytes: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

impl DataplaneStats {
    /// The counters now.
    pub fn counts(&self) -> DataplaneCounts {
        let read = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DataplaneCounts {
            snapshot_full: read(&self.snapshot_full),
            snapshot_not_modified: read(&self.snapshot_not_modified),
            credentials: read(&self.credentials),
            logs: read(&self.logs),
            log_records: read(&self.log_records),
            ext_authz: read(&self.ext_authz),
            snapshot_builds: read(&self.snapshot_builds),
            last_build_us: read(&self.last_build_us),
            last_snapshot_bytes: read(&self.last_snapshot_bytes),
        }
    }

    /// Records a snapshot build.
    pub fn built(&self, took_us: u64, bytes: usize) {
        bump(&self.snapshot_builds, 1);
        self.last_build_us.store(took_us, Ordering::Relaxed);
        self.last_snapshot_bytes
            .store(u64::try_from(bytes).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

pub fn router(state: DataplaneState) -> Router {
    Router::new()
        .route(SNAPSHOT_PATH, get(snapshot))
        .route(CREDENTIALS_PATH, post(credentials))
        .route(LOGS_PATH, post(logs))
        .route(STATS_PATH, get(stats))
        .route(EXT_AUTHZ_PATH, any(ext_authz::check))
        .route(
            &format!("{EXT_AUTHZ_PATH}/{{*path}}"),
            any(ext_authz::check),
        )
        .fallback(|| async { Error::not_found("not_found", "no such data-plane route") })
        .layer(axum::middleware::map_response(tag_as_control_plane))
        .with_state(state)
}

async fn tag_as_control_plane(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(CONTROL_PLANE_HEADER, HeaderValue::from_static("1"));
    response
}

fn etag(version: u64) -> String {
    format!("\"{version}\"")
}

async fn snapshot(State(state): State<DataplaneState>, headers: HeaderMap) -> Result<Response> {
    let store = state.store.clone();
    let current = store.snapshot_version()?;
    let known = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    if known == Some(etag(current).as_str()) {
        bump(&state.stats.snapshot_not_modified, 1);
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag(current))]).into_response());
    }
    bump(&state.stats.snapshot_full, 1);
    let (version, bytes) = blocking(move || {
        state
            .snapshots
            .current(&store, |took_us, bytes| state.stats.built(took_us, bytes))
    })
    .await?;
    Ok((
        [
            (header::ETAG, etag(version)),
            (header::CONTENT_TYPE, "application/json".to_string()),
        ],
        bytes,
    )
        .into_response())
}

async fn credentials(
    State(state): State<DataplaneState>,
    JsonBody(request): JsonBody<CredentialsRequest>,
) -> Result<Response> {
    bump(&state.stats.credentials, 1);
    // Inline on the async worker, not on the blocking pool: a handful of in-memory
    // sled reads and one AES-GCM open take microseconds, while a hop to a blocking
    // thread and back adds tens of them to every fetch (`./dev bench`, variant f).
    let bytes = credentials_body(&state.store, &request)?;
    Ok(([(header::CONTENT_TYPE, "application/json")], bytes).into_response())
}

/// `{"values": {KEY: value}, "missing": [KEY]}` for an agent still allowed on the vault.
fn credentials_body(store: &Store, request: &CredentialsRequest) -> Result<Bytes> {
    #[derive(Serialize)]
    struct Body<'a> {
        values: BTreeMap<&'a str, &'a str>,
        missing: &'a [String],
    }
    let now = store.now_secs();
    let agent = store
        .agent_by_token_hash(&request.token_sha256)?
        .filter(|agent| agent.expires_at.is_none_or(|at| at > now))
        .ok_or_else(|| Error::forbidden("unknown, revoked or expired agent"))?;
    if !agent
        .vaults
        .iter()
        .any(|grant| grant.vault == request.vault)
    {
        return Err(Error::forbidden(format!(
            "agent \"{}\" has no grant on vault \"{}\"",
            agent.name, request.vault
        )));
    }
    let vault = store
        .vault(&request.vault)?
        .ok_or_else(|| crate::access::vault_not_found(&request.vault))?;
    let (values, missing) = store.resolve_credentials(&vault.id, &request.keys)?;
    // Serialized straight from the secrets (borrowed), so no plain copy outlives the
    // reply but the body itself.
    let body = Body {
        values: values
            .iter()
            .map(|(k, v)| (k.as_str(), v.expose()))
            .collect(),
        missing: &missing,
    };
    Ok(Bytes::from(serde_json::to_vec(&body)?))
}

/// A batch of request-log records (at most [`agent_vault_rules::MAX_LOG_BATCH_RECORDS`]); records
/// for unknown vaults are dropped. Stored and flushed before the 204.
async fn logs(
    State(state): State<DataplaneState>,
    JsonBody(records): JsonBody<Vec<LogRecord>>,
) -> Result<StatusCode> {
    bump(&state.stats.logs, 1);
    bump(
        &state.stats.log_records,
        u64::try_from(records.len()).unwrap_or(u64::MAX),
    );
    blocking(move || state.request_log.append(records)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn stats(State(state): State<DataplaneState>) -> axum::Json<DataplaneCounts> {
    axum::Json(state.stats.counts())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testing::{agent_on, owner, secrets, system_store};
    use agent_vault_rules::{Auth, Service};
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    /// A store with `API_TOKEN`, a bearer service for `api.example.com` and an agent
    /// `bot` on `default`; returns the agent token.
    pub(crate) fn seeded() -> (tempfile::TempDir, DataplaneState, String) {
        let (dir, store) = system_store();
        store
            .set_credentials(&owner(), "default", &secrets(&[("API_TOKEN", "sk_live_1")]))
            .unwrap();
        store
            .add_service(
                &owner(),
                "default",
                Service {
                    name: "api".into(),
                    host: "api.example.com".into(),
                    enabled: true,
                    auth: Auth::Bearer {
                        token: "API_TOKEN".into(),
                    },
                    upstream_tls: true,
                    methods: None,
                    rate_limit: None,
                    substitutions: Vec::new(),
                    redact_responses: None,
                },
            )
            .unwrap();
        let token = agent_on(&store, "bot", &["default"]);
        let state = DataplaneState::new(Arc::new(store), LogRetention::default());
        (dir, state, token)
    }

    pub(crate) async fn send(
        state: &DataplaneState,
        request: Request<Body>,
    ) -> (StatusCode, HeaderMap, Bytes) {
        let response = router(state.clone()).oneshot(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
        (parts.status, parts.headers, body)
    }

    #[tokio::test]
    async fn stats_count_routes_and_snapshot_builds() {
        let (_dir, state, token) = seeded();
        let snapshot = || Request::get(SNAPSHOT_PATH).body(Body::empty()).unwrap();
        let (status, headers, body) = send(&state, snapshot()).await;
        assert_eq!(status, StatusCode::OK);
        let etag = headers[header::ETAG].to_str().unwrap().to_string();
        let not_modified = Request::get(SNAPSHOT_PATH)
            .header(header::IF_NONE_MATCH, &etag)
            .body(Body::empty())
            .unwrap();
        assert_eq!(send(&state, not_modified).await.0, StatusCode::NOT_MODIFIED);
        let fetch = Request::post(CREDENTIALS_PATH)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(
                serde_json::json!({
                    "token_sha256": crate::crypto::sha256_hex(token.as_bytes()),
                    "vault": "default",
                    "keys": ["API_TOKEN"],
                })
                .to_string(),
            ))
            .unwrap();
        assert_eq!(send(&state, fetch).await.0, StatusCode::OK);
        let counts = state.stats.counts();
        assert_eq!(
            (
                counts.snapshot_full,
                counts.snapshot_not_modified,
                counts.credentials,
                counts.snapshot_builds,
            ),
            (1, 1, 1, 1)
        );
        assert_eq!(counts.last_snapshot_bytes, body.len() as u64);
    }
}
