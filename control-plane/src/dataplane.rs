//! The data-plane protocol (DESIGN.md §4), served only on the Unix socket.
//!
//! The snapshot is rebuilt only when the store's version changed, and the serialized
//! bytes are shared between polls: with many Envoy workers polling every second,
//! the common answer is a 304 that costs one atomic read and a string compare.
//! Every reply carries [`CONTROL_PLANE_HEADER`] so the filter can tell it from the
//! 503/504 that Envoy synthesizes when this server is down or slow.

use std::sync::{Arc, Mutex};

use agent_vault_rules::{
    CredentialsRequest, LogRecord, Snapshot, SnapshotAgent, SnapshotVault, CONTROL_PLANE_HEADER,
    CREDENTIALS_PATH, LOGS_PATH, SNAPSHOT_PATH,
};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::api::{blocking, AppState, JsonBody};
use crate::error::{Error, Result};
use crate::store::{scan_json, Store};
use crate::vaults::VaultRecord;

/// The last snapshot built: its version and serialized JSON.
#[derive(Default)]
pub struct SnapshotCache(Mutex<Option<(u64, Bytes)>>);

pub fn router(state: AppState) -> Router {
    Router::new()
        .route(SNAPSHOT_PATH, get(snapshot))
        .route(CREDENTIALS_PATH, post(credentials))
        .route(LOGS_PATH, post(logs))
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
        let version = self.snapshot_version()?;
        let mut cached = cache.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((v, bytes)) = cached.as_ref() {
            if *v == version {
                return Ok((*v, bytes.clone()));
            }
        }
        let snapshot = self.build_snapshot()?;
        let built_version: u64 = snapshot.version.parse().unwrap_or(version);
        let bytes = Bytes::from(serde_json::to_vec(&snapshot)?);
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
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag(current))]).into_response());
    }
    let (version, bytes) = blocking(move || store.snapshot_bytes(&cache)).await?;
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
    let store = state.store.clone();
    blocking(move || {
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
        // Serialized straight from the secrets, so no plain copy outlives the reply.
        let mut body = serde_json::Map::new();
        let values: serde_json::Map<String, serde_json::Value> = values
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.expose().to_string())))
            .collect();
        body.insert("values".into(), values.into());
        body.insert("missing".into(), missing.into());
        Ok(Bytes::from(serde_json::to_vec(&body)?))
    })
    .await
    .map(|bytes| ([(header::CONTENT_TYPE, "application/json")], bytes).into_response())
}

/// A batch of request-log records (at most [`crate::logs::MAX_BATCH_RECORDS`]); records
/// for unknown vaults are dropped. Stored and flushed before the 204.
async fn logs(
    State(state): State<AppState>,
    JsonBody(records): JsonBody<Vec<LogRecord>>,
) -> Result<StatusCode> {
    let store = state.store.clone();
    blocking(move || store.append_logs(records)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Shared snapshot cache handle for [`AppState`].
pub type SharedSnapshotCache = Arc<SnapshotCache>;
