//! The vault list and a vault's pages: proposals, services, credentials (masked,
//! revealed to members on a POST), agents and the request log.
//!
//! Every page reads through the same [`Store`] functions as the JSON API with the
//! logged-in user's principal, so the access rules are the API's: a vault the user
//! cannot see is a 404, an action their role does not allow is a 403.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::Response;
use maud::{html, Markup};

use super::layout::{page, respond, store_error_page};
use super::security::{
    confirm_password, csrf_ok, csrf_refused, require_session, Form, Session, CONFIRM_FIELD,
    CSRF_FIELD,
};
use crate::access::{Access, Principal};
use crate::clock::{utc_minutes, utc_seconds};
use crate::error::Result;
use crate::http::{blocking, AppState};
use crate::proposals::{ProposalStatus, ProposalView, Proposer};
use crate::store::Store;

/// Number of request-log records the log page shows.
const LOG_PAGE: usize = 100;

/// The tabs of a vault's pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tab {
    Proposals,
    Services,
    Credentials,
    Agents,
    Log,
}

/// Runs `f` with the session's principal on the blocking pool: the session (or a
/// redirect to the login page) and the result (or its error page).
pub async fn with_session<T: Send + 'static>(
    state: &AppState,
    headers: &HeaderMap,
    uri: &Uri,
    f: impl FnOnce(&Store, &Principal) -> Result<T> + Send + 'static,
) -> std::result::Result<(Session, T), Response> {
    let session = require_session(state, headers, uri).await?;
    let store = state.store.clone();
    let principal = session.principal.clone();
    match blocking(move || f(&store, &principal)).await {
        Ok(value) => Ok((session, value)),
        Err(error) => Err(store_error_page(error, Some(&session))),
    }
}

/// The vault's name, the user's role on it and the tabs.
pub fn vault_header(vault: &str, access: Access, active: Tab) -> Markup {
    let base = format!("/ui/vaults/{vault}");
    let tabs = [
        (Tab::Proposals, "Proposals", base.clone()),
        (Tab::Services, "Services", format!("{base}/services")),
        (
            Tab::Credentials,
            "Credentials",
            format!("{base}/credentials"),
        ),
        (Tab::Agents, "Agents", format!("{base}/agents")),
        (Tab::Log, "Request log", format!("{base}/logs")),
    ];
    html! {
        div.vault-head {
            p.crumbs { a href="/ui" { "Vaults" } " / " }
            h1 { "Vault " code { (vault) } }
            span.badge { (access.role_name()) }
        }
        nav.tabs {
            @for (tab, label, href) in tabs {
                @if tab == active {
                    a.active href=(href) aria-current="page" { (label) }
                } @else {
                    a href=(href) { (label) }
                }
            }
        }
    }
}

pub async fn vault_list(State(state): State<AppState>, headers: HeaderMap, uri: Uri) -> Response {
    let (session, vaults) =
        match with_session(&state, &headers, &uri, |store, who| store.list_vaults(who)).await {
            Ok(found) => found,
            Err(response) => return response,
        };
    let body = html! {
        h1 { "Vaults" }
        @if vaults.is_empty() {
            p.empty { "You are not a member of any vault yet. Ask a vault admin to add you." }
        } @else {
            table {
                thead { tr { th { "Vault" } th { "Your role" } th { "Unmatched hosts" } } }
                tbody {
                    @for vault in &vaults {
                        tr {
                            td { a href={ "/ui/vaults/" (vault.name) } { (vault.name) } }
                            td { (vault.role) }
                            td { (format!("{:?}", vault.unmatched_host_policy).to_lowercase()) }
                        }
                    }
                }
            }
        }
    };
    respond(StatusCode::OK, page("Vaults", Some(&session), body))
}

fn status_badge(status: ProposalStatus) -> Markup {
    html! { span class={ "status status-" (status.as_str()) } { (status.as_str()) } }
}

/// Who raised a proposal, in words.
pub fn proposer(view: &ProposalView) -> String {
    match &view.created_by {
        Proposer::Agent { name } => format!("agent {name}"),
        Proposer::User { email } => format!("user {email}"),
    }
}

fn proposal_rows(vault: &str, proposals: &[&ProposalView], pending: bool) -> Markup {
    html! {
        table.proposals {
            thead {
                tr {
                    th { "#" } th { "Status" } th { "From" } th { "Summary" } th { "Created" }
                    @if pending { th { "Expires" } } @else { th { "Decided" } }
                }
            }
            tbody {
                @for p in proposals {
                    tr {
                        td { a href={ "/ui/vaults/" (vault) "/proposals/" (p.id) } { "#" (p.id) } }
                        td { (status_badge(p.status)) }
                        td { (proposer(p)) }
                        td.summary { (p.message.as_deref().unwrap_or("")) }
                        td { (utc_minutes(p.created_at)) }
                        @if pending {
                            td { (utc_minutes(p.expires_at)) }
                        } @else {
                            td {
                                @if let Some(review) = &p.review {
                                    (utc_minutes(review.at)) " by " (review.by)
                                } @else {
                                    "—"
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

pub async fn proposals(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    Path(vault): Path<String>,
) -> Response {
    let name = vault.clone();
    let (session, (access, mut proposals)) =
        match with_session(&state, &headers, &uri, move |store, who| {
            let (_, access) = store.access(who, &name)?;
            Ok((access, store.list_proposals(who, &name, None)?))
        })
        .await
        {
            Ok(found) => found,
            Err(response) => return response,
        };
    proposals.sort_by_key(|p| std::cmp::Reverse(p.id));
    let pending: Vec<&ProposalView> = proposals
        .iter()
        .filter(|p| p.status == ProposalStatus::Pending)
        .collect();
    let past: Vec<&ProposalView> = proposals
        .iter()
        .filter(|p| p.status != ProposalStatus::Pending)
        .collect();
    let body = html! {
        (vault_header(&vault, access, Tab::Proposals))
        section {
            h2 { "Pending proposals" }
            @if pending.is_empty() {
                p.empty { "No proposal is waiting for review." }
            } @else {
                (proposal_rows(&vault, &pending, true))
            }
        }
        section {
            h2 { "Past proposals" }
            @if past.is_empty() {
                p.empty { "None yet." }
            } @else {
                (proposal_rows(&vault, &past, false))
            }
        }
    };
    respond(
        StatusCode::OK,
        page(&format!("{vault}: proposals"), Some(&session), body),
    )
}

pub async fn services(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    Path(vault): Path<String>,
) -> Response {
    let name = vault.clone();
    let (session, (access, services)) =
        match with_session(&state, &headers, &uri, move |store, who| {
            let (_, access) = store.access(who, &name)?;
            Ok((access, store.list_services(who, &name)?))
        })
        .await
        {
            Ok(found) => found,
            Err(response) => return response,
        };
    let body = html! {
        (vault_header(&vault, access, Tab::Services))
        @if services.is_empty() {
            p.empty { "This vault has no services yet: agents propose them, or an admin adds them with " code { "agent-vault vault service add" } "." }
        } @else {
            table {
                thead { tr { th { "Name" } th { "Host" } th { "Auth" } th { "Credentials" } th { "Enabled" } th { "Upstream TLS" } th { "Methods" } th { "Rate limit" } th { "Substitutions" } th { "Responses" } } }
                tbody {
                    @for service in &services {
                        tr {
                            td { (service.name) }
                            td { code { (service.host) } }
                            td { (service.auth.type_name()) }
                            td {
                                @for key in service.credential_keys() {
                                    code.key { (key) } " "
                                }
                            }
                            td { @if service.enabled { "yes" } @else { span.off { "disabled" } } }
                            td { (super::approve::upstream_cell(service.upstream_tls, service.upstream_h2c)) }
                            td { (super::approve::methods_cell(service.methods.as_deref())) }
                            td { (super::approve::rate_limit_cell(service.rate_limit)) }
                            td { (super::approve::substitutions_cell(&service.substitutions)) }
                            td { (super::approve::redaction_cell(service.redacts_responses())) }
                        }
                    }
                }
            }
        }
    };
    respond(
        StatusCode::OK,
        page(&format!("{vault}: services"), Some(&session), body),
    )
}

async fn credentials_page(
    state: AppState,
    headers: HeaderMap,
    uri: Uri,
    vault: String,
    form: Option<Form>,
) -> Response {
    let session = match require_session(&state, &headers, &uri).await {
        Ok(session) => session,
        Err(response) => return response,
    };
    let mut refused = None;
    if let Some(form) = &form {
        if !csrf_ok(&session, form) {
            return csrf_refused();
        }
        if let Err(message) = confirm_password(&state, &session, form).await {
            refused = Some(message);
        }
    }
    let reveal = form.is_some() && refused.is_none();
    let store = state.store.clone();
    let principal = session.principal.clone();
    let name = vault.clone();
    let loaded = blocking(move || {
        let (_, access) = store.access(&principal, &name)?;
        // Reveal is the member check of the API: agents never get here.
        Ok((access, store.list_credentials(&principal, &name, reveal)?))
    })
    .await;
    let (access, credentials) = match loaded {
        Ok(found) => found,
        Err(error) => return store_error_page(error, Some(&session)),
    };
    let body = html! {
        (vault_header(&vault, access, Tab::Credentials))
        @if credentials.is_empty() {
            p.empty { "No credentials yet." }
        } @else {
            @if let Some(message) = &refused {
                p.error role="alert" { (message) }
            }
            @if reveal {
                p.notice { "Values are shown on this page only; it is not cached. " a href={ "/ui/vaults/" (vault) "/credentials" } { "Hide them" } "." }
            } @else {
                form.inline method="post" action={ "/ui/vaults/" (vault) "/credentials/reveal" } {
                    input type="hidden" name=(CSRF_FIELD) value=(session.csrf());
                    label for="confirm-password" { "Your password" }
                    input #confirm-password type="password" name=(CONFIRM_FIELD) autocomplete="current-password" required;
                    button type="submit" { "Reveal values" }
                }
            }
            table.credentials {
                thead { tr { th { "Key" } th { "Value" } th { "Updated" } } }
                tbody {
                    @for credential in &credentials {
                        tr {
                            td { code.key { (credential.key) } }
                            td {
                                @match &credential.value {
                                    Some(value) => code.value { (value) },
                                    None => span.masked aria-label="hidden value" { "••••••••" },
                                }
                            }
                            td { (utc_minutes(credential.updated_at)) }
                        }
                    }
                }
            }
        }
    };
    let status = if refused.is_some() {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::OK
    };
    respond(
        status,
        page(&format!("{vault}: credentials"), Some(&session), body),
    )
}

pub async fn credentials(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    Path(vault): Path<String>,
) -> Response {
    credentials_page(state, headers, uri, vault, None).await
}

pub async fn reveal_credentials(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    Path(vault): Path<String>,
    form: Form,
) -> Response {
    credentials_page(state, headers, uri, vault, Some(form)).await
}

pub async fn agents(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    Path(vault): Path<String>,
) -> Response {
    let name = vault.clone();
    let (session, (access, agents)) =
        match with_session(&state, &headers, &uri, move |store, who| {
            let (_, access) = store.access(who, &name)?;
            let agents: Vec<_> = store
                .list_agents(who)?
                .into_iter()
                .filter(|agent| agent.vaults.iter().any(|grant| grant.vault == name))
                .collect();
            Ok((access, agents))
        })
        .await
        {
            Ok(found) => found,
            Err(response) => return response,
        };
    let body = html! {
        (vault_header(&vault, access, Tab::Agents))
        @if access != Access::Admin {
            p.empty { "Only admins of this vault see its agents." }
        } @else if agents.is_empty() {
            p.empty { "No agent can use this vault yet: create one with " code { "agent-vault agent create NAME --vault " (vault) } "." }
        } @else {
            table {
                thead { tr { th { "Agent" } th { "Vaults" } th { "Created" } th { "Expires" } } }
                tbody {
                    @for agent in &agents {
                        tr {
                            td { (agent.name) }
                            td {
                                @for grant in &agent.vaults {
                                    code { (grant.vault) } " "
                                }
                            }
                            td { (utc_minutes(agent.created_at)) }
                            td {
                                @match agent.expires_at {
                                    Some(at) => (utc_minutes(at)),
                                    None => "never",
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    respond(
        StatusCode::OK,
        page(&format!("{vault}: agents"), Some(&session), body),
    )
}

pub async fn request_log(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    Path(vault): Path<String>,
) -> Response {
    let name = vault.clone();
    let (session, (access, log)) = match with_session(&state, &headers, &uri, move |store, who| {
        let (_, access) = store.access(who, &name)?;
        Ok((access, store.read_logs(who, &name, None, LOG_PAGE)?))
    })
    .await
    {
        Ok(found) => found,
        Err(response) => return response,
    };
    let body = html! {
        (vault_header(&vault, access, Tab::Log))
        p.hint { "The latest " (LOG_PAGE) " requests agents sent through the proxy, newest first. No header value, query string or body is ever recorded." }
        @if log.records.is_empty() {
            p.empty { "No requests yet." }
        } @else {
            table.log {
                thead { tr { th { "Time" } th { "Agent" } th { "Method" } th { "Host" } th { "Path" } th { "Service" } th { "Status" } th { "Latency" } th { "Redacted" } th { "Error" } } }
                tbody {
                    @for entry in log.records.iter().rev() {
                        @let r = &entry.record;
                        tr {
                            td { (utc_seconds(r.ts)) " UTC" }
                            td { (r.agent) }
                            td { (r.method) }
                            td { code { (r.host) } }
                            td.path { code { (r.path) } }
                            td { (r.service.as_deref().unwrap_or("—")) }
                            td class={ "http-" (r.status / 100) "xx" } { (r.status) }
                            td { (r.latency_ms) " ms" }
                            td { @if r.redactions > 0 { (r.redactions) } }
                            td { (r.error.as_deref().unwrap_or("")) }
                        }
                    }
                }
            }
        }
    };
    respond(
        StatusCode::OK,
        page(&format!("{vault}: request log"), Some(&session), body),
    )
}
