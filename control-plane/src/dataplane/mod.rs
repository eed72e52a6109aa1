//! The data-plane protocol (DESIGN.md §4), served only on the Unix socket.
//!
//! Every reply carries [`CONTROL_PLANE_HEADER`] so the filter can tell it from the
//! 503/504 that Envoy synthesizes when this server is down or slow. The socket's
//! routes have their own state, [`DataplaneState`]: the management API's login limiter
//! and public URL are not even in reach here (DESIGN.md §4: the management API is
//! never on the socket).
//!
//! The snapshot route is also a long-poll (DESIGN.md §4): with `?wait_ms=N`
//! ([`agent_vault_rules::SNAPSHOT_WAIT_PARAM`], at most
//! [`agent_vault_rules::MAX_SNAPSHOT_WAIT_MS`]) and an `If-None-Match` equal to the
//! current version, the request waits, asynchronously and without touching storage, on
//! the store's version watch ([`Store::watch_version`]) until a published write changes
//! the version (200 with the new snapshot) or the wait passes (304). Stopping the
//! server answers every held request 304 at once ([`DataplaneState::close`]), so a
//! shutdown never waits for them.
//!
//! Two more routes serve operators and the benchmark (`./dev bench`), still only on
//! the socket:
//! - `GET /v1/dataplane/stats`: [`DataplaneStats`], requests counted by route and the
//!   last snapshot build (no names, no secrets).
//! - `/v1/dataplane/ext_authz/...` (any method): [`ext_authz`], a check endpoint for
//!   Envoy's `ext_authz` HTTP service.

pub mod als;
pub mod ext_authz;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use std::time::Duration;

use agent_vault_rules::{
    CredentialsRequest, LogRecord, CONTROL_PLANE_HEADER, CREDENTIALS_PATH, LOGS_PATH,
    MAX_SNAPSHOT_WAIT_MS, SNAPSHOT_PATH, SNAPSHOT_WAIT_PARAM,
};
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
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
    /// Set once the server stops: held long-polls answer at once.
    closing: Arc<tokio::sync::watch::Sender<bool>>,
}

impl DataplaneState {
    /// The data plane of `store`, keeping its request log within `retention`.
    pub fn new(store: Arc<Store>, retention: LogRetention) -> DataplaneState {
        DataplaneState {
            request_log: Arc::new(RequestLog::new(store.clone(), retention)),
            store,
            snapshots: Arc::default(),
            stats: Arc::default(),
            closing: Arc::new(tokio::sync::watch::Sender::new(false)),
        }
    }

    /// The server is stopping: every held long-poll answers now (304 unless the
    /// version changed), and new ones do not wait.
    pub fn close(&self) {
        self.closing.send_replace(true);
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
    long_polls: AtomicU64,
    long_polls_held: AtomicU64,
    als_records: AtomicU64,
    als_skipped: AtomicU64,
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
            long_polls: read(&self.long_polls),
            long_polls_held: read(&self.long_polls_held),
            als_records: read(&self.als_records),
            als_skipped: read(&self.als_skipped),
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

/// How long a snapshot request may wait: `wait_ms=N` in the query, 0 when absent.
fn requested_wait(query: Option<&str>) -> Result<Duration> {
    let mut wait = None;
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if name != SNAPSHOT_WAIT_PARAM {
            return Err(Error::bad_request(
                "invalid_request",
                format!(
                    "unknown query parameter {name:?} on the snapshot route (only \"{SNAPSHOT_WAIT_PARAM}\")"
                ),
            ));
        }
        if wait.is_some() {
            return Err(Error::bad_request(
                "invalid_request",
                format!("\"{SNAPSHOT_WAIT_PARAM}\" is given more than once"),
            ));
        }
        let ms = Some(value)
            .filter(|v| !v.is_empty() && v.len() <= 6 && v.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|ms| *ms <= MAX_SNAPSHOT_WAIT_MS)
            .ok_or_else(|| {
                Error::bad_request(
                    "invalid_request",
                    format!(
                        "\"{SNAPSHOT_WAIT_PARAM}\" must be a whole number of milliseconds from 0 to {MAX_SNAPSHOT_WAIT_MS}, not {value:?}"
                    ),
                )
            })?;
        wait = Some(ms);
    }
    Ok(Duration::from_millis(wait.unwrap_or(0)))
}

/// Counts a held long-poll while it lives (a request whose client went away is
/// dropped, and so is this).
struct Held<'a>(&'a AtomicU64);

impl<'a> Held<'a> {
    fn new(gauge: &'a AtomicU64) -> Held<'a> {
        gauge.fetch_add(1, Ordering::Relaxed);
        Held(gauge)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn snapshot(
    State(state): State<DataplaneState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response> {
    let wait = requested_wait(query.as_deref())?;
    // The version as last committed, from memory: a 304 costs no storage read.
    let mut versions = state.store.watch_version();
    let mut current = *versions.borrow_and_update();
    let known = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .map(str::to_owned);
    let unchanged = |version: u64| known.as_deref() == Some(etag(version).as_str());
    if !wait.is_zero() {
        bump(&state.stats.long_polls, 1);
        if unchanged(current) {
            let _held = Held::new(&state.stats.long_polls_held);
            let mut closing = state.closing.subscribe();
            tokio::select! {
                changed = versions.wait_for(|v| *v != current) => {
                    if let Ok(version) = changed {
                        current = *version;
                    }
                }
                () = tokio::time::sleep(wait) => {}
                _ = closing.wait_for(|closing| *closing) => {}
            }
        }
    }
    if unchanged(current) {
        bump(&state.stats.snapshot_not_modified, 1);
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag(current))]).into_response());
    }
    bump(&state.stats.snapshot_full, 1);
    let store = state.store.clone();
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
    // On sled, inline on the async worker, not on the blocking pool: a handful of
    // in-memory sled reads and one AES-GCM open take microseconds, while a hop to a
    // blocking thread and back adds tens of them to every fetch (`./dev bench`,
    // variant f). On PostgreSQL each read is a round trip to the database: those wait
    // on the blocking pool, never on an async worker.
    let bytes = if state.store.is_shared() {
        let store = state.store.clone();
        blocking(move || credentials_body(&store, &request)).await?
    } else {
        credentials_body(&state.store, &request)?
    };
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
                    upstream_h2c: false,
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

    #[tokio::test]
    async fn the_snapshot_carries_an_h2c_upstream_and_leaves_it_out_when_off() {
        let (_dir, state, _) = seeded();
        let grpc: Service = serde_json::from_value(serde_json::json!({
            "name": "grpc", "host": "grpc.example.com:50051", "upstream_tls": false,
            "upstream_h2c": true, "auth": {"type": "passthrough"}
        }))
        .unwrap();
        state.store.add_service(&owner(), "default", grpc).unwrap();
        let request = Request::get(SNAPSHOT_PATH).body(Body::empty()).unwrap();
        let (status, _, body) = send(&state, request).await;
        assert_eq!(status, StatusCode::OK);
        let snapshot: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let services = snapshot["vaults"][0]["services"].clone();
        let named = |name: &str| {
            services
                .as_array()
                .and_then(|all| all.iter().find(|s| s["name"] == name).cloned())
                .unwrap_or_default()
        };
        assert_eq!(named("grpc")["upstream_h2c"], true, "{services}");
        assert!(named("api").get("upstream_h2c").is_none(), "{services}");
    }
}

#[cfg(test)]
mod long_poll_tests {
    use super::tests::{seeded, send};
    use super::*;
    use crate::testing::owner;
    use axum::body::Body;
    use axum::http::Request;
    use std::time::Instant;

    fn poll(query: &str, etag: Option<&str>) -> Request<Body> {
        let mut request = Request::get(format!("{SNAPSHOT_PATH}{query}"));
        if let Some(etag) = etag {
            request = request.header(header::IF_NONE_MATCH, etag);
        }
        request.body(Body::empty()).unwrap()
    }

    /// The snapshot's current ETag, from a plain request.
    async fn current_etag(state: &DataplaneState) -> String {
        let (status, headers, _) = send(state, poll("", None)).await;
        assert_eq!(status, StatusCode::OK);
        headers[header::ETAG].to_str().unwrap().to_string()
    }

    /// Spawns `request`; its answer and how long it took.
    fn spawn(
        state: &DataplaneState,
        request: Request<Body>,
    ) -> tokio::task::JoinHandle<(StatusCode, HeaderMap, Bytes, Duration)> {
        let state = state.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let (status, headers, body) = send(&state, request).await;
            (status, headers, body, started.elapsed())
        })
    }

    /// Waits until `n` long-polls are held (the spawned request got as far as waiting).
    async fn until_held(state: &DataplaneState, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while state.stats.counts().long_polls_held != n {
            assert!(Instant::now() < deadline, "never {n} held");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_long_poll_is_held_until_a_published_write_then_answers_the_new_snapshot() {
        let (_dir, state, _) = seeded();
        let etag = current_etag(&state).await;
        let held = spawn(&state, poll("?wait_ms=20000", Some(&etag)));
        until_held(&state, 1).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!held.is_finished(), "answered before anything changed");
        state
            .store
            .set_credentials(
                &owner(),
                "default",
                &crate::testing::secrets(&[("OTHER", "v2")]),
            )
            .unwrap();
        let written = Instant::now();
        let (status, headers, body, took) = held.await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert!(took < Duration::from_secs(10), "{took:?}");
        assert!(
            written.elapsed() < Duration::from_secs(2),
            "the write did not wake the long-poll at once"
        );
        let new_etag = headers[header::ETAG].to_str().unwrap();
        assert_ne!(new_etag, etag);
        let snapshot: agent_vault_rules::Snapshot = serde_json::from_slice(&body).unwrap();
        assert_eq!(format!("\"{}\"", snapshot.version), new_etag);
        let counts = state.stats.counts();
        assert_eq!((counts.long_polls, counts.long_polls_held), (1, 0));
        assert_eq!(counts.snapshot_full, 2);
    }

    #[tokio::test]
    async fn a_long_poll_answers_304_once_the_wait_passes() {
        let (_dir, state, _) = seeded();
        let etag = current_etag(&state).await;
        let (status, headers, body, took) = spawn(&state, poll("?wait_ms=300", Some(&etag)))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::NOT_MODIFIED);
        assert_eq!(headers[header::ETAG].to_str().unwrap(), etag);
        assert!(body.is_empty());
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
        let counts = state.stats.counts();
        assert_eq!(
            (
                counts.long_polls,
                counts.long_polls_held,
                counts.snapshot_not_modified
            ),
            (1, 0, 1)
        );
    }

    #[tokio::test]
    async fn a_long_poll_with_an_old_or_no_etag_answers_at_once() {
        let (_dir, state, _) = seeded();
        let etag = current_etag(&state).await;
        for old in [Some("\"0\""), Some("garbage"), None] {
            let (status, headers, _, took) =
                spawn(&state, poll("?wait_ms=60000", old)).await.unwrap();
            assert_eq!(status, StatusCode::OK, "{old:?}");
            assert_eq!(headers[header::ETAG].to_str().unwrap(), etag);
            assert!(took < Duration::from_secs(5), "{old:?} waited {took:?}");
        }
        // wait_ms=0 is a plain poll: 304 at once.
        let (status, _, _, took) = spawn(&state, poll("?wait_ms=0", Some(&etag)))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::NOT_MODIFIED);
        assert!(took < Duration::from_secs(5), "{took:?}");
        assert_eq!(state.stats.counts().long_polls, 3, "0 is not a long-poll");
    }

    #[tokio::test]
    async fn a_malformed_wait_is_refused_400_with_the_reason() {
        let (_dir, state, _) = seeded();
        // (behaviour, query, text the message must contain)
        #[rustfmt::skip]
        let cases = [
            ("not a number", "?wait_ms=abc", "\"wait_ms\" must be a whole number of milliseconds from 0 to 60000, not \"abc\""),
            ("negative", "?wait_ms=-1", "not \"-1\""),
            ("over the bound", "?wait_ms=60001", "not \"60001\""),
            ("huge", "?wait_ms=99999999999999999999", "from 0 to 60000"),
            ("empty", "?wait_ms=", "not \"\""),
            ("no value", "?wait_ms", "not \"\""),
            ("seconds", "?wait_ms=25s", "not \"25s\""),
            ("twice", "?wait_ms=1&wait_ms=2", "\"wait_ms\" is given more than once"),
            ("unknown parameter", "?wait=25", "unknown query parameter \"wait\""),
        ];
        for (behaviour, query, needle) in cases {
            let (status, headers, body) = send(&state, poll(query, Some("\"1\""))).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{behaviour}");
            assert!(headers.contains_key(CONTROL_PLANE_HEADER), "{behaviour}");
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(body["error"], "invalid_request", "{behaviour}: {body}");
            let message = body["message"].as_str().unwrap_or_default();
            assert!(message.contains(needle), "{behaviour}: {message}");
        }
        assert_eq!(state.stats.counts().long_polls, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn closing_answers_held_long_polls_at_once_and_new_ones_do_not_wait() {
        let (_dir, state, _) = seeded();
        let etag = current_etag(&state).await;
        let held: Vec<_> = (0..3)
            .map(|_| spawn(&state, poll("?wait_ms=60000", Some(&etag))))
            .collect();
        until_held(&state, 3).await;
        state.close();
        for request in held {
            let (status, _, _, took) = request.await.unwrap();
            assert_eq!(status, StatusCode::NOT_MODIFIED);
            assert!(took < Duration::from_secs(10), "{took:?}");
        }
        assert_eq!(state.stats.counts().long_polls_held, 0);
        let (status, _, _, took) = spawn(&state, poll("?wait_ms=60000", Some(&etag)))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::NOT_MODIFIED);
        assert!(took < Duration::from_secs(5), "{took:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_long_poll_whose_client_goes_away_is_no_longer_counted_as_held() {
        let (_dir, state, _) = seeded();
        let etag = current_etag(&state).await;
        let held = spawn(&state, poll("?wait_ms=60000", Some(&etag)));
        until_held(&state, 1).await;
        held.abort();
        until_held(&state, 0).await;
    }
}
