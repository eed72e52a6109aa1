//! The management HTTP API (TCP): its routes and handlers. `control-plane/API.md` is
//! the contract; every handler is a thin translation to a [`Store`] operation, run on
//! the blocking pool because sled flushes and Argon2id block. The state and the
//! extractors are the shared shell in [`crate::http`].

use std::collections::{BTreeMap, BTreeSet};

use agent_vault_rules::{Grant, RateLimit, Role, Service, UnmatchedHostPolicy};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::access::{Principal, VaultRole};
use crate::credentials::Secret;
use crate::error::{Error, Result};
use crate::http::{blocking, presented_token, AppState, Caller, JsonBody, OptionalJsonBody};
use crate::proposals::diff::Diff;
use crate::proposals::{approval_url, Approval, ProposalInput, ProposalStatus, ProposalView};
use crate::store::Store;

/// The vault an agent-facing request is about: `X-Vault`, else the agent's only vault.
pub fn requested_vault(headers: &HeaderMap, principal: &Principal) -> Result<String> {
    if let Some(vault) = headers.get("x-vault").and_then(|v| v.to_str().ok()) {
        return Ok(vault.trim().to_string());
    }
    match principal {
        Principal::Agent { grants, .. } if grants.len() == 1 => Ok(grants[0].vault.clone()),
        Principal::Agent { .. } => Err(Error::bad_request(
            "vault_required",
            "this agent has several vaults: name one with the X-Vault header",
        )),
        Principal::User { .. } => Ok(crate::access::DEFAULT_VAULT.to_string()),
    }
}

/// The API's routes (the UI's are merged beside them by [`crate::server::app`]).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/health", get(health))
        .route("/v1/auth/register", post(register))
        .route("/v1/auth/login", post(login))
        .route("/v1/auth/logout", post(logout))
        .route("/v1/auth/whoami", get(whoami))
        .route("/v1/vaults", get(list_vaults).post(create_vault))
        .route(
            "/v1/vaults/{vault}",
            axum::routing::patch(update_vault).delete(delete_vault),
        )
        .route(
            "/v1/vaults/{vault}/users",
            get(list_members).post(add_member),
        )
        .route(
            "/v1/vaults/{vault}/users/{email}",
            axum::routing::delete(remove_member),
        )
        .route(
            "/v1/vaults/{vault}/credentials",
            get(list_credentials).post(set_credentials),
        )
        .route(
            "/v1/vaults/{vault}/credentials/delete",
            post(delete_credentials),
        )
        .route("/v1/vaults/{vault}/credentials/{key}", get(get_credential))
        .route("/v1/vaults/{vault}/logs", get(read_logs))
        .route(
            "/v1/vaults/{vault}/services",
            get(list_services).post(add_service).put(replace_services),
        )
        .route(
            "/v1/vaults/{vault}/services/{name}",
            axum::routing::delete(remove_service),
        )
        .route(
            "/v1/vaults/{vault}/services/{name}/enable",
            post(enable_service),
        )
        .route(
            "/v1/vaults/{vault}/services/{name}/disable",
            post(disable_service),
        )
        .route("/v1/agents", get(list_agents).post(create_agent))
        .route("/v1/agents/{name}", axum::routing::delete(revoke_agent))
        .route("/v1/agents/{name}/rotate", post(rotate_agent))
        .route(
            "/v1/proposals",
            get(list_own_proposals).post(create_proposal),
        )
        .route("/v1/proposals/{id}", get(get_own_proposal))
        .route("/v1/vaults/{vault}/proposals", get(list_proposals))
        .route("/v1/vaults/{vault}/proposals/{id}", get(get_proposal))
        .route(
            "/v1/vaults/{vault}/proposals/{id}/approve",
            post(approve_proposal),
        )
        .route(
            "/v1/vaults/{vault}/proposals/{id}/reject",
            post(reject_proposal),
        )
        .route("/discover", get(discover))
        .route("/v1/master-password", post(change_master_password))
        .route("/v1/master-key/rotate", post(rotate_master_key))
        .route("/v1/ca", get(ca_certificate))
        .route("/v1/service-catalog", get(service_catalog))
        .route("/v1/ca/rotate", post(rotate_ca))
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// Runs `f(store, principal)` on the blocking pool and answers JSON.
async fn with_store<T: Serialize + Send + 'static>(
    state: &AppState,
    caller: Caller,
    f: impl FnOnce(&Store, &Principal) -> Result<T> + Send + 'static,
) -> Result<Json<T>> {
    let store = state.store.clone();
    blocking(move || f(&store, &caller.0)).await.map(Json)
}

fn no_content<T>(result: Result<Json<T>>) -> Result<StatusCode> {
    result.map(|_| StatusCode::NO_CONTENT)
}

fn created<T: Serialize>(result: Result<Json<T>>) -> Result<Response> {
    result.map(|body| (StatusCode::CREATED, body).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    email: String,
    password: String,
    #[serde(default)]
    invite: Option<String>,
    /// The first registration's proof (the file `bootstrap-token` in the data dir).
    #[serde(default)]
    bootstrap_token: Option<String>,
}

async fn register(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<RegisterBody>,
) -> Result<Response> {
    let store = state.store.clone();
    let registered = blocking(move || {
        store.register(
            &body.email,
            &body.password,
            body.invite.as_deref(),
            body.bootstrap_token.as_deref(),
        )
    })
    .await?;
    Ok((StatusCode::CREATED, Json(registered)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    email: String,
    password: String,
    /// The data dir's `local-login-token`: such a login is not held back by failures.
    #[serde(default)]
    local_login_token: Option<String>,
}

async fn login(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<LoginBody>,
) -> Result<Response> {
    let store = state.store.clone();
    let limiter = state.limiter.clone();
    let logged_in = blocking(move || {
        store.login_with(
            &limiter,
            &body.email,
            &body.password,
            body.local_login_token.as_deref(),
        )
    })
    .await?;
    Ok(Json(logged_in).into_response())
}

async fn logout(State(state): State<AppState>, headers: HeaderMap) -> Result<StatusCode> {
    let token =
        presented_token(&headers).ok_or_else(|| Error::Unauthorized("not logged in".into()))?;
    let store = state.store.clone();
    blocking(move || {
        store.authenticate(&token)?;
        store.logout(&token)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn whoami(caller: Caller) -> Json<serde_json::Value> {
    Json(match caller.0 {
        Principal::User { email, owner } => {
            serde_json::json!({"kind": "user", "email": email, "owner": owner})
        }
        Principal::Agent { name, grants } => {
            serde_json::json!({"kind": "agent", "name": name, "vaults": grants})
        }
    })
}

async fn list_vaults(State(state): State<AppState>, caller: Caller) -> Result<Response> {
    Ok(
        with_store(&state, caller, |store, who| store.list_vaults(who))
            .await?
            .into_response(),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateVaultBody {
    name: String,
}

async fn create_vault(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody<CreateVaultBody>,
) -> Result<Response> {
    created(
        with_store(&state, caller, move |store, who| {
            store.create_vault(who, &body.name)
        })
        .await,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateVaultBody {
    unmatched_host_policy: Option<UnmatchedHostPolicy>,
    passthrough_hosts: Option<Vec<String>>,
    /// Absent: unchanged; `null`: removed.
    #[serde(default, deserialize_with = "present")]
    rate_limit: Option<Option<RateLimit>>,
}

/// A field that may be `null`: `Some(None)` when it is, `None` (by `default`) when
/// it is absent.
fn present<'de, D, T>(deserializer: D) -> std::result::Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

async fn update_vault(
    State(state): State<AppState>,
    caller: Caller,
    Path(vault): Path<String>,
    JsonBody(body): JsonBody<UpdateVaultBody>,
) -> Result<Response> {
    if body.unmatched_host_policy.is_none()
        && body.passthrough_hosts.is_none()
        && body.rate_limit.is_none()
    {
        return Err(Error::bad_request(
            "invalid_request",
            "give unmatched_host_policy, passthrough_hosts, rate_limit (null removes it), or several",
        ));
    }
    let update = crate::vaults::VaultUpdate {
        unmatched_host_policy: body.unmatched_host_policy,
        passthrough_hosts: body.passthrough_hosts,
        rate_limit: body.rate_limit,
    };
    Ok(with_store(&state, caller, move |store, who| {
        store.update_vault(who, &vault, update)
    })
    .await?
    .into_response())
}

async fn delete_vault(
    State(state): State<AppState>,
    caller: Caller,
    Path(vault): Path<String>,
) -> Result<StatusCode> {
    no_content(
        with_store(&state, caller, move |store, who| {
            store.delete_vault(who, &vault)
        })
        .await,
    )
}

async fn list_members(
    State(state): State<AppState>,
    caller: Caller,
    Path(vault): Path<String>,
) -> Result<Response> {
    Ok(with_store(&state, caller, move |store, who| {
        store.list_members(who, &vault)
    })
    .await?
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddMemberBody {
    email: String,
    role: VaultRole,
}

async fn add_member(
    State(state): State<AppState>,
    caller: Caller,
    Path(vault): Path<String>,
    JsonBody(body): JsonBody<AddMemberBody>,
) -> Result<Response> {
    created(
        with_store(&state, caller, move |store, who| {
            store.add_member(who, &vault, &body.email, body.role)
        })
        .await,
    )
}

async fn remove_member(
    State(state): State<AppState>,
    caller: Caller,
    Path((vault, email)): Path<(String, String)>,
) -> Result<StatusCode> {
    no_content(
        with_store(&state, caller, move |store, who| {
            store.remove_member(who, &vault, &email)
        })
        .await,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevealQuery {
    #[serde(default)]
    reveal: bool,
}

async fn list_credentials(
    State(state): State<AppState>,
    caller: Caller,
    Path(vault): Path<String>,
    Query(query): Query<RevealQuery>,
) -> Result<Response> {
    Ok(with_store(&state, caller, move |store, who| {
        store.list_credentials(who, &vault, query.reveal)
    })
    .await?
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetCredentialsBody {
    credentials: BTreeMap<String, Secret>,
}

async fn set_credentials(
    State(state): State<AppState>,
    caller: Caller,
    Path(vault): Path<String>,
    JsonBody(body): JsonBody<SetCredentialsBody>,
) -> Result<Response> {
    let set = with_store(&state, caller, move |store, who| {
        store.set_credentials(who, &vault, &body.credentials)
    })
    .await?;
    Ok(Json(serde_json::json!({"set": set.0})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteCredentialsBody {
    keys: Vec<String>,
}

async fn delete_credentials(
    State(state): State<AppState>,
    caller: Caller,
    Path(vault): Path<String>,
    JsonBody(body): JsonBody<DeleteCredentialsBody>,
) -> Result<Response> {
    let deleted = with_store(&state, caller, move |store, who| {
        store.delete_credentials(who, &vault, &body.keys)
    })
    .await?;
    Ok(Json(serde_json::json!({"deleted": deleted.0})).into_response())
}

async fn get_credential(
    State(state): State<AppState>,
    caller: Caller,
    Path((vault, key)): Path<(String, String)>,
) -> Result<Response> {
    let value = with_store(&state, caller, move |store, who| {
        let secret = store.get_credential(who, &vault, &key)?;
        Ok(serde_json::json!({"key": key, "value": secret.expose()}))
    })
    .await?;
    Ok(value.into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogsQuery {
    after: Option<u64>,
    limit: Option<usize>,
}

async fn read_logs(
    State(state): State<AppState>,
    caller: Caller,
    Path(vault): Path<String>,
    query: std::result::Result<Query<LogsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response> {
    let Query(query) = query.map_err(|e| Error::bad_request("invalid_request", e.body_text()))?;
    let limit = query.limit.unwrap_or(crate::logs::DEFAULT_PAGE);
    Ok(with_store(&state, caller, move |store, who| {
        store.read_logs(who, &vault, query.after, limit)
    })
    .await?
    .into_response())
}

async fn list_services(
    State(state): State<AppState>,
    caller: Caller,
    Path(vault): Path<String>,
) -> Result<Response> {
    Ok(with_store(&state, caller, move |store, who| {
        store.list_services(who, &vault)
    })
    .await?
    .into_response())
}

async fn add_service(
    State(state): State<AppState>,
    caller: Caller,
    Path(vault): Path<String>,
    JsonBody(service): JsonBody<Service>,
) -> Result<Response> {
    created(
        with_store(&state, caller, move |store, who| {
            store.add_service(who, &vault, service)
        })
        .await,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplaceServicesBody {
    services: Vec<Service>,
}

async fn replace_services(
    State(state): State<AppState>,
    caller: Caller,
    Path(vault): Path<String>,
    JsonBody(body): JsonBody<ReplaceServicesBody>,
) -> Result<Response> {
    Ok(with_store(&state, caller, move |store, who| {
        store.replace_services(who, &vault, body.services)
    })
    .await?
    .into_response())
}

async fn remove_service(
    State(state): State<AppState>,
    caller: Caller,
    Path((vault, name)): Path<(String, String)>,
) -> Result<StatusCode> {
    no_content(
        with_store(&state, caller, move |store, who| {
            store.remove_service(who, &vault, &name)
        })
        .await,
    )
}

async fn enable_service(
    State(state): State<AppState>,
    caller: Caller,
    Path((vault, name)): Path<(String, String)>,
) -> Result<Response> {
    Ok(with_store(&state, caller, move |store, who| {
        store.set_service_enabled(who, &vault, &name, true)
    })
    .await?
    .into_response())
}

async fn disable_service(
    State(state): State<AppState>,
    caller: Caller,
    Path((vault, name)): Path<(String, String)>,
) -> Result<Response> {
    Ok(with_store(&state, caller, move |store, who| {
        store.set_service_enabled(who, &vault, &name, false)
    })
    .await?
    .into_response())
}

async fn list_agents(State(state): State<AppState>, caller: Caller) -> Result<Response> {
    Ok(
        with_store(&state, caller, |store, who| store.list_agents(who))
            .await?
            .into_response(),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantBody {
    vault: String,
    #[serde(default)]
    role: Role,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateAgentBody {
    name: String,
    vaults: Vec<GrantBody>,
    #[serde(default)]
    expires_at: Option<i64>,
}

async fn create_agent(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody<CreateAgentBody>,
) -> Result<Response> {
    let grants = body
        .vaults
        .into_iter()
        .map(|g| Grant {
            vault: g.vault,
            role: g.role,
        })
        .collect();
    created(
        with_store(&state, caller, move |store, who| {
            store.create_agent(who, &body.name, grants, body.expires_at)
        })
        .await,
    )
}

async fn revoke_agent(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode> {
    no_content(
        with_store(&state, caller, move |store, who| {
            store.revoke_agent(who, &name)
        })
        .await,
    )
}

async fn rotate_agent(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response> {
    Ok(with_store(&state, caller, move |store, who| {
        store.rotate_agent(who, &name)
    })
    .await?
    .into_response())
}

#[derive(Serialize)]
struct DiscoveredService {
    name: String,
    host: String,
    auth_type: &'static str,
    enabled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    methods: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rate_limit: Option<agent_vault_rules::RateLimit>,
    /// What the agent writes and where: each placeholder, its key and its surfaces
    /// (the same shape as the service's; a key name, never a value).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    substitutions: Vec<agent_vault_rules::substitution::Substitution>,
    /// Whether the filter removes the injected values from responses.
    redact_responses: bool,
    /// The upstream speaks HTTP/2 without TLS (h2c, e.g. gRPC); absent: it does not.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    upstream_h2c: bool,
}

async fn discover(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
) -> Result<Response> {
    let vault = requested_vault(&headers, &caller.0)?;
    Ok(with_store(&state, caller, move |store, who| {
        let (record, _) = store.access(who, &vault)?;
        let services: Vec<DiscoveredService> = store
            .services_of(&record.id)?
            .into_iter()
            .map(|s| DiscoveredService {
                auth_type: s.auth.type_name(),
                redact_responses: s.redacts_responses(),
                upstream_h2c: s.upstream_h2c,
                name: s.name,
                host: s.host,
                enabled: s.enabled,
                methods: s.methods,
                rate_limit: s.rate_limit,
                substitutions: s.substitutions,
            })
            .collect();
        let credentials: Vec<String> = store.credential_keys(&record.id)?.into_iter().collect();
        Ok(serde_json::json!({"vault": vault, "services": services, "credentials": credentials}))
    })
    .await?
    .into_response())
}

fn require_owner(principal: &Principal) -> Result<()> {
    require_owner_to(principal, "manage the master key")
}

fn require_owner_to(principal: &Principal, what: &str) -> Result<()> {
    match principal {
        Principal::User { owner: true, .. } => Ok(()),
        _ => Err(Error::forbidden(format!("only the owner can {what}"))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MasterPasswordBody {
    current: Option<String>,
    new: Option<String>,
}

async fn change_master_password(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody<MasterPasswordBody>,
) -> Result<StatusCode> {
    no_content(
        with_store(&state, caller, move |store, who| {
            require_owner(who)?;
            if let Some(new) = &body.new {
                if new.chars().count() < crate::users::MIN_PASSWORD_LEN {
                    return Err(Error::bad_request(
                        "weak_password",
                        format!(
                            "the master password needs at least {} characters",
                            crate::users::MIN_PASSWORD_LEN
                        ),
                    ));
                }
            }
            let current = body.current.as_deref().filter(|c| !c.is_empty());
            store.change_master_password(current, body.new.as_deref())
        })
        .await,
    )
}

async fn rotate_master_key(State(state): State<AppState>, caller: Caller) -> Result<Response> {
    let count = with_store(&state, caller, |store, who| {
        require_owner(who)?;
        store.rotate_data_key()
    })
    .await?;
    Ok(Json(serde_json::json!({"reencrypted": count.0})).into_response())
}

// ---------------------------------------------------------------- proxy CA

/// `Content-Type` of `GET /v1/ca`.
pub const PEM_CONTENT_TYPE: &str = "application/x-pem-file";

/// The proxy CA's certificate, PEM. No login: it is public, and agents and their tools
/// fetch it to trust the certificates Envoy presents inside their tunnels.
/// The built-in service templates (public: no secret in them).
async fn service_catalog() -> Response {
    Json(crate::catalog::entries()).into_response()
}

async fn ca_certificate(State(state): State<AppState>) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, PEM_CONTENT_TYPE)],
        state.leaves.ca_pem(),
    )
        .into_response()
}

/// A new proxy CA (owner only): every leaf Envoy holds is re-minted from it and
/// pushed; agents must trust the new certificate from now on.
async fn rotate_ca(State(state): State<AppState>, caller: Caller) -> Result<Response> {
    require_owner_to(&caller.0, "rotate the proxy CA")?;
    let leaves = state.leaves.clone();
    let summary = blocking(move || leaves.rotate_ca()).await?;
    Ok(Json(summary).into_response())
}

// ---------------------------------------------------------------- proposals

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusQuery {
    status: Option<ProposalStatus>,
}

type StatusQueryResult =
    std::result::Result<Query<StatusQuery>, axum::extract::rejection::QueryRejection>;

fn status_filter(query: StatusQueryResult) -> Result<Option<ProposalStatus>> {
    let Query(query) = query.map_err(|e| {
        Error::bad_request(
            "invalid_request",
            format!(
                "{}; status is one of pending, applied, rejected, expired",
                e.body_text()
            ),
        )
    })?;
    Ok(query.status)
}

/// A proposal id from the path; anything but a number names no proposal.
fn proposal_id(raw: &str) -> Result<u64> {
    raw.parse()
        .map_err(|_| Error::not_found("proposal_not_found", format!("no proposal {raw:?}")))
}

#[derive(Serialize)]
struct ProposalCreated {
    id: u64,
    status: ProposalStatus,
    vault: String,
    approval_url: String,
    message: String,
}

async fn create_proposal(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    JsonBody(input): JsonBody<ProposalInput>,
) -> Result<Response> {
    let vault = requested_vault(&headers, &caller.0)?;
    let public_url = state.public_url.clone();
    created(
        with_store(&state, caller, move |store, who| {
            let (proposal, token) = store.create_proposal(who, &vault, input)?;
            let url = approval_url(&public_url, proposal.id, &token);
            Ok(ProposalCreated {
                message: format!(
                    "Proposal {id} is pending. Give this link to a human to review and approve it \
                     (valid 24 hours): {url} ; then poll GET /v1/proposals/{id} for the outcome.",
                    id = proposal.id
                ),
                id: proposal.id,
                status: proposal.status,
                vault: proposal.vault,
                approval_url: url,
            })
        })
        .await,
    )
}

async fn list_own_proposals(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    query: StatusQueryResult,
) -> Result<Response> {
    let status = status_filter(query)?;
    let vault = requested_vault(&headers, &caller.0)?;
    Ok(with_store(&state, caller, move |store, who| {
        store.list_proposals(who, &vault, status)
    })
    .await?
    .into_response())
}

async fn get_own_proposal(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response> {
    let vault = requested_vault(&headers, &caller.0)?;
    let id = proposal_id(&id)?;
    Ok(with_store(&state, caller, move |store, who| {
        store.get_proposal(who, &vault, id)
    })
    .await?
    .into_response())
}

async fn list_proposals(
    State(state): State<AppState>,
    caller: Caller,
    Path(vault): Path<String>,
    query: StatusQueryResult,
) -> Result<Response> {
    let status = status_filter(query)?;
    Ok(with_store(&state, caller, move |store, who| {
        store.list_proposals(who, &vault, status)
    })
    .await?
    .into_response())
}

async fn get_proposal(
    State(state): State<AppState>,
    caller: Caller,
    Path((vault, id)): Path<(String, String)>,
    Query(query): Query<RevealQuery>,
) -> Result<Response> {
    let id = proposal_id(&id)?;
    Ok(with_store(&state, caller, move |store, who| {
        let view = store.get_proposal(who, &vault, id)?;
        // What approving would change, for the humans who decide.
        let diff = match who {
            Principal::User { .. } if view.status == ProposalStatus::Pending => {
                Some(store.proposal_diff(who, &vault, id)?)
            }
            _ => None,
        };
        // `?reveal=true`: the values the agent supplied, for a member or admin to
        // confirm (403 for anyone else, agents included).
        let values = if query.reveal {
            let opened = store.reveal_proposal_values(who, &vault, id)?;
            Some(
                opened
                    .into_iter()
                    .map(|(key, value)| (key, value.expose().to_string()))
                    .collect(),
            )
        } else {
            None
        };
        Ok(ProposalReview { view, diff, values })
    })
    .await?
    .into_response())
}

/// A proposal as a human reviewer gets it: the proposal and, while it is pending,
/// what approving it would change; with `?reveal=true`, the values the agent supplied.
#[derive(Serialize)]
struct ProposalReview {
    #[serde(flatten)]
    view: ProposalView,
    #[serde(skip_serializing_if = "Option::is_none")]
    diff: Option<Diff>,
    #[serde(skip_serializing_if = "Option::is_none")]
    values: Option<BTreeMap<String, String>>,
}

/// Approving and rejecting are for humans: an agent is refused before anything else
/// is looked at, whatever it names.
fn decider_is_not_an_agent(caller: &Caller) -> Result<()> {
    if matches!(caller.0, Principal::Agent { .. }) {
        return Err(Error::forbidden(
            "agents cannot approve or reject proposals; a member or admin of the vault must",
        ));
    }
    Ok(())
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApproveBody {
    #[serde(default)]
    values: BTreeMap<String, Secret>,
    #[serde(default)]
    accept_agent_values: bool,
    /// The ids of the diff's warnings the human has seen (`GET` shows them).
    #[serde(default)]
    acknowledge: BTreeSet<String>,
}

async fn approve_proposal(
    State(state): State<AppState>,
    caller: Caller,
    Path((vault, id)): Path<(String, String)>,
    OptionalJsonBody(body): OptionalJsonBody<ApproveBody>,
) -> Result<Response> {
    decider_is_not_an_agent(&caller)?;
    let id = proposal_id(&id)?;
    Ok(with_store(&state, caller, move |store, who| {
        let approval = Approval {
            values: body.values,
            accept_agent_values: body.accept_agent_values,
            acknowledged: body.acknowledge,
        };
        store.approve_proposal(who, &vault, id, approval)
    })
    .await?
    .into_response())
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RejectBody {
    #[serde(default)]
    reason: Option<String>,
}

async fn reject_proposal(
    State(state): State<AppState>,
    caller: Caller,
    Path((vault, id)): Path<(String, String)>,
    OptionalJsonBody(body): OptionalJsonBody<RejectBody>,
) -> Result<Response> {
    decider_is_not_an_agent(&caller)?;
    let id = proposal_id(&id)?;
    Ok(with_store(&state, caller, move |store, who| {
        store.reject_proposal(who, &vault, id, body.reason)
    })
    .await?
    .into_response())
}

#[cfg(test)]
mod tests;
