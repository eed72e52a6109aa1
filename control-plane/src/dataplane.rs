//! The data-plane protocol (DESIGN.md §4), served only on the Unix socket.
//!
//! The snapshot is rebuilt only when the store's version changed, and the serialized
//! bytes are shared between polls: with many Envoy workers polling every second,
//! the common answer is a 304 that costs one atomic read and a string compare.
//! Every reply carries [`CONTROL_PLANE_HEADER`] so the filter can tell it from the
//! 503/504 that Envoy synthesizes when this server is down or slow.
//!
//! Two more routes serve operators and the benchmark (`./dev bench`), still only on
//! the socket:
//! - `GET /v1/dataplane/stats`: [`DataplaneStats`], requests counted by route and the
//!   last snapshot build (no names, no secrets).
//! - `/v1/dataplane/ext_authz/...` (any method): a check endpoint for Envoy's
//!   `ext_authz` HTTP service, the "no wasm filter" alternative that asks this server
//!   on every request. It does what the filter does (agent token, vault, service
//!   match, credential) with the same rules crate, and answers 200 with the rendered
//!   auth headers (for `allowed_upstream_headers`) and
//!   `x-envoy-auth-headers-to-remove: proxy-authorization, x-vault`, or the refusal.
//!   It hands out no more than [`CREDENTIALS_PATH`] already does to a socket peer
//!   (less: it needs the raw agent token, not its hash), so the socket's trust
//!   boundary (§4: owner-only, `SO_PEERCRED`) covers it; it is never on TCP.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use agent_vault_rules::proxy_auth::{self, DECODE_BUFFER_LEN};
use agent_vault_rules::reply::{self, Reject};
use agent_vault_rules::{
    normalize_authority, CredentialsRequest, LogRecord, ServiceMatcher, Snapshot, SnapshotAgent,
    SnapshotVault, UnmatchedHostPolicy, CONTROL_PLANE_HEADER, CREDENTIALS_PATH, LOGS_PATH,
    SNAPSHOT_PATH,
};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::Router;
use serde::Serialize;
use zeroize::Zeroizing;

use crate::api::{blocking, AppState, JsonBody};
use crate::error::{Error, Result};
use crate::store::{scan_json, Store};
use crate::vaults::VaultRecord;

/// The stats route's path and answer (wire types live in `rules/`).
pub use agent_vault_rules::{DataplaneCounts, STATS_PATH};

/// Prefix of the `ext_authz` check route (Envoy appends the original path).
pub const EXT_AUTHZ_PATH: &str = "/v1/dataplane/ext_authz";

/// The last snapshot built: its version and serialized JSON.
#[derive(Default)]
pub struct SnapshotCache(Mutex<Option<(u64, Bytes)>>);

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

    fn built(&self, took_us: u64, bytes: usize) {
        bump(&self.snapshot_builds, 1);
        self.last_build_us.store(took_us, Ordering::Relaxed);
        self.last_snapshot_bytes
            .store(u64::try_from(bytes).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route(SNAPSHOT_PATH, get(snapshot))
        .route(CREDENTIALS_PATH, post(credentials))
        .route(LOGS_PATH, post(logs))
        .route(STATS_PATH, get(stats))
        .route(EXT_AUTHZ_PATH, any(ext_authz))
        .route(&format!("{EXT_AUTHZ_PATH}/{{*path}}"), any(ext_authz))
        .fallback(|| async { Error::not_found("not_found", "no such data-plane route") })
        .layer(axum::middleware::map_response(mark_reply))
        .with_state(state)
}

async fn mark_reply(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(CONTROL_PLANE_HEADER, HeaderValue::from_static("1"));
    response
}

impl Store {
    /// The data plane's view: vaults with their services, agents with their grants.
    /// No secrets: token hashes only, no credential values.
    pub fn build_snapshot(&self) -> Result<Snapshot> {
        let version = self.snapshot_version()?;
        let mut vaults = Vec::new();
        for (_, vault) in scan_json::<VaultRecord>(&self.trees.vaults, b"")? {
            vaults.push(SnapshotVault {
                services: self.services_of(&vault.id)?,
                name: vault.name,
                unmatched_host_policy: vault.unmatched_host_policy,
            });
        }
        let agents = self
            .all_agents()?
            .into_iter()
            .map(|agent| SnapshotAgent {
                token_sha256: agent.token_sha256,
                name: agent.name,
                vaults: agent.vaults,
                expires_at: agent.expires_at,
            })
            .collect();
        Ok(Snapshot {
            version: version.to_string(),
            vaults,
            agents,
        })
    }

    /// The serialized snapshot for `version`, from the cache when it is current.
    pub fn snapshot_bytes(&self, cache: &SnapshotCache) -> Result<(u64, Bytes)> {
        self.snapshot_bytes_counted(cache, &DataplaneStats::default())
    }

    /// [`Store::snapshot_bytes`], recording a build in `stats`.
    pub fn snapshot_bytes_counted(
        &self,
        cache: &SnapshotCache,
        stats: &DataplaneStats,
    ) -> Result<(u64, Bytes)> {
        let version = self.snapshot_version()?;
        let mut cached = cache.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((v, bytes)) = cached.as_ref() {
            if *v == version {
                return Ok((*v, bytes.clone()));
            }
        }
        let started = Instant::now();
        let snapshot = self.build_snapshot()?;
        let built_version: u64 = snapshot.version.parse().unwrap_or(version);
        let bytes = Bytes::from(serde_json::to_vec(&snapshot)?);
        stats.built(
            u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            bytes.len(),
        );
        *cached = Some((built_version, bytes.clone()));
        Ok((built_version, bytes))
    }
}

fn etag(version: u64) -> String {
    format!("\"{version}\"")
}

async fn snapshot(State(state): State<AppState>, headers: HeaderMap) -> Result<Response> {
    let store = state.store.clone();
    let cache = state.snapshots.clone();
    let current = store.snapshot_version()?;
    let known = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    if known == Some(etag(current).as_str()) {
        bump(&state.dataplane_stats.snapshot_not_modified, 1);
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag(current))]).into_response());
    }
    bump(&state.dataplane_stats.snapshot_full, 1);
    let stats = state.dataplane_stats.clone();
    let (version, bytes) = blocking(move || store.snapshot_bytes_counted(&cache, &stats)).await?;
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
    State(state): State<AppState>,
    JsonBody(request): JsonBody<CredentialsRequest>,
) -> Result<Response> {
    bump(&state.dataplane_stats.credentials, 1);
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
        .ok_or_else(|| crate::vaults::vault_not_found(&request.vault))?;
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
    State(state): State<AppState>,
    JsonBody(records): JsonBody<Vec<LogRecord>>,
) -> Result<StatusCode> {
    bump(&state.dataplane_stats.logs, 1);
    bump(
        &state.dataplane_stats.log_records,
        u64::try_from(records.len()).unwrap_or(u64::MAX),
    );
    let store = state.store.clone();
    blocking(move || store.append_logs(records)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn stats(State(state): State<AppState>) -> axum::Json<DataplaneCounts> {
    axum::Json(state.dataplane_stats.counts())
}

/// What an `ext_authz` check sees of the original request.
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckRequest<'a> {
    pub proxy_authorization: Option<&'a str>,
    pub x_vault: Option<&'a str>,
    /// The original `:authority` (Envoy sends it as the check request's `Host`).
    pub authority: Option<&'a str>,
    /// The original path (after the route prefix).
    pub path: &'a str,
}

impl Store {
    /// The `ext_authz` decision: the headers to inject, or the refusal the filter would
    /// send (the same parser and rejects, from `agent-vault-rules`). One request, no
    /// cache: every check reads the agent, the vault's services and the credential
    /// values from the store and decrypts them.
    pub fn ext_authz_check(
        &self,
        request: &CheckRequest<'_>,
    ) -> std::result::Result<Vec<(String, String)>, Reject> {
        let internal = |e: Error| {
            tracing::error!(error = %e, "ext_authz check failed");
            reply::control_plane_unavailable("the control plane could not answer")
        };
        // The decoded Basic credentials hold the token: wiped when dropped.
        let mut buffer = Zeroizing::new([0u8; DECODE_BUFFER_LEN]);
        let credential = proxy_auth::parse(request.proxy_authorization, &mut buffer)
            .map_err(|error| reply::proxy_auth_required(error.reason()))?;
        let hash = crate::crypto::sha256_hex(credential.token.as_bytes());
        let now = self.now_secs();
        let agent = self
            .agent_by_token_hash(&hash)
            .map_err(internal)?
            .filter(|agent| agent.expires_at.is_none_or(|at| at > now))
            .ok_or_else(reply::invalid_token)?;
        let named_vault = credential
            .vault
            .or_else(|| proxy_auth::x_vault(request.x_vault));
        let grants: Vec<&str> = agent.vaults.iter().map(|g| g.vault.as_str()).collect();
        let vault_name = reply::choose_vault(&agent.name, &grants, named_vault)?;
        let vault = self
            .vault(vault_name)
            .map_err(internal)?
            .ok_or_else(|| reply::vault_forbidden(&agent.name, Some(vault_name)))?;
        let Some((host, port)) = request
            .authority
            .and_then(|a| normalize_authority(a, reply::DEFAULT_PORT))
        else {
            return Err(reply::invalid_request());
        };
        let services = self.services_of(&vault.id).map_err(internal)?;
        let matcher = ServiceMatcher::new(&services);
        let Some(index) = matcher.find(&host, port, request.path) else {
            return match vault.unmatched_host_policy {
                UnmatchedHostPolicy::Passthrough => Ok(Vec::new()),
                UnmatchedHostPolicy::Deny => Err(reply::no_service(&vault.name, &host, port)),
            };
        };
        let (Some(service), Some(auth)) = (services.get(index), matcher.auth(index)) else {
            return Err(reply::invalid_service(&vault.name, "", "not indexed"));
        };
        if !service.enabled {
            return Err(reply::service_disabled(&vault.name, &service.name));
        }
        let auth = auth
            .as_ref()
            .map_err(|e| reply::invalid_service(&vault.name, &service.name, &e.to_string()))?;
        let (values, _missing) = self
            .resolve_credentials(&vault.id, auth.keys())
            .map_err(internal)?;
        auth.render(|key| values.get(key).map(|v| v.expose()))
            .map_err(|error| reply::render_failed(&vault.name, &service.name, &error))
    }
}

async fn ext_authz(
    State(state): State<AppState>,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Response {
    bump(&state.dataplane_stats.ext_authz, 1);
    let text = |name: header::HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let proxy_authorization = text(header::PROXY_AUTHORIZATION);
    let x_vault = text(header::HeaderName::from_static("x-vault"));
    let authority = text(header::HOST).or_else(|| uri.authority().map(|a| a.to_string()));
    let path = uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .strip_prefix(EXT_AUTHZ_PATH)
        .filter(|p| !p.is_empty())
        .unwrap_or("/")
        .to_string();
    let store = state.store.clone();
    let decision = blocking(move || {
        Ok(store.ext_authz_check(&CheckRequest {
            proxy_authorization: proxy_authorization.as_deref(),
            x_vault: x_vault.as_deref(),
            authority: authority.as_deref(),
            path: &path,
        }))
    })
    .await;
    let decision = match decision {
        Ok(decision) => decision,
        Err(error) => return error.into_response(),
    };
    match decision {
        Ok(inject) => {
            let mut response = StatusCode::OK.into_response();
            let out = response.headers_mut();
            for (name, value) in inject {
                if let (Ok(name), Ok(value)) = (
                    header::HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(&value),
                ) {
                    out.append(name, value);
                }
            }
            out.insert(
                "x-envoy-auth-headers-to-remove",
                HeaderValue::from_static("proxy-authorization, x-vault"),
            );
            response
        }
        Err(reject) => {
            let status =
                StatusCode::from_u16(reject.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let headers = reject
                .headers()
                .into_iter()
                .map(|(name, value)| (name, HeaderValue::from_static(value)));
            let mut response = (status, reject.body).into_response();
            for (name, value) in headers {
                response.headers_mut().insert(name, value);
            }
            response
        }
    }
}

/// Shared snapshot cache handle for [`AppState`].
pub type SharedSnapshotCache = Arc<SnapshotCache>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use crate::credentials::Secret;
    use crate::vaults::Principal;
    use agent_vault_rules::{Auth, Grant, Role, Service};
    use axum::body::Body;
    use axum::http::Request;
    use base64::Engine as _;
    use std::collections::BTreeMap;
    use tower::ServiceExt;

    fn owner() -> Principal {
        Principal::User {
            email: "owner@example.com".into(),
            owner: true,
        }
    }

    /// A store with `API_TOKEN`, a bearer service for `api.example.com` and an agent
    /// `bot` on `default`; returns the agent token.
    fn seeded() -> (tempfile::TempDir, AppState, String) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), None, Arc::new(SystemClock), false).unwrap();
        let entries = BTreeMap::from([("API_TOKEN".to_string(), Secret::new("sk_live_1".into()))]);
        store
            .set_credentials(&owner(), "default", &entries)
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
                },
            )
            .unwrap();
        let grant = Grant {
            vault: "default".into(),
            role: Role::Proxy,
        };
        let agent = store
            .create_agent(&owner(), "bot", vec![grant], None)
            .unwrap();
        let state = AppState::new(Arc::new(store), "http://127.0.0.1");
        (dir, state, agent.token)
    }

    async fn send(state: &AppState, request: Request<Body>) -> (StatusCode, HeaderMap, Bytes) {
        let response = router(state.clone()).oneshot(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
        (parts.status, parts.headers, body)
    }

    fn check(host: &str, proxy_authorization: Option<&str>) -> Request<Body> {
        let mut request =
            Request::get(format!("{EXT_AUTHZ_PATH}/v1/charges?limit=1")).header(header::HOST, host);
        if let Some(value) = proxy_authorization {
            request = request.header(header::PROXY_AUTHORIZATION, value);
        }
        request.body(Body::empty()).unwrap()
    }

    fn basic(token: &str, vault: &str) -> String {
        let pair = format!("{token}:{vault}");
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        )
    }

    #[tokio::test]
    async fn ext_authz_check_injects_the_credential_or_refuses() {
        let (_dir, state, token) = seeded();

        let (status, headers, _) =
            send(&state, check("api.example.com", Some(&basic(&token, "")))).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["authorization"], "Bearer sk_live_1");
        assert_eq!(
            headers["x-envoy-auth-headers-to-remove"],
            "proxy-authorization, x-vault"
        );
        assert_eq!(headers[CONTROL_PLANE_HEADER], "1");

        let bearer = format!("Bearer {token}");
        #[rustfmt::skip]
        let refusals: &[(&str, Option<&str>, StatusCode, &str)] = &[
            ("no proxy credential", None, StatusCode::PROXY_AUTHENTICATION_REQUIRED, "proxy_auth_required"),
            ("unknown token", Some("Bearer av_agt_nope"), StatusCode::PROXY_AUTHENTICATION_REQUIRED, "invalid_token"),
            ("host of no service", Some(bearer.as_str()), StatusCode::FORBIDDEN, "forbidden"),
        ];
        for (behaviour, credential, expected, code) in refusals {
            let host = if *behaviour == "host of no service" {
                "other.example.com"
            } else {
                "api.example.com"
            };
            let (status, headers, body) = send(&state, check(host, *credential)).await;
            assert_eq!(status, *expected, "{behaviour}");
            assert!(headers.get("authorization").is_none(), "{behaviour}");
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(body["error"], *code, "{behaviour}");
            assert!(!body.to_string().contains("sk_live_1"), "{behaviour}");
        }

        // A deleted credential is seen on the next check: nothing is cached.
        state
            .store
            .delete_credentials(&owner(), "default", &["API_TOKEN".to_string()])
            .unwrap_or_else(|e| panic!("delete: {e}"));
        let (status, _, body) = send(&state, check("api.example.com", Some(&bearer))).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{body:?}");

        let (status, _, body) = send(
            &state,
            Request::get(STATS_PATH).body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let counts: DataplaneCounts = serde_json::from_slice(&body).unwrap();
        assert_eq!(counts.ext_authz, 5);
        assert_eq!(counts.credentials, 0);
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
        let counts = state.dataplane_stats.counts();
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
