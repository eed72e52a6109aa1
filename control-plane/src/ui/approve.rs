//! Reviewing a proposal: the approval-link page (`/approve/{id}?token=…`) and the
//! same review inside the vault's pages (`/ui/vaults/{vault}/proposals/{id}`).
//!
//! The link lets its holder *view* the proposal; deciding needs a logged-in member or
//! admin of the vault, checked again on every POST (the link only tells which vault
//! the proposal is in). Without a session, the page embeds the login form, which
//! comes back here. Secrets the human types are only ever in the POST body; when a
//! decision fails, the page comes back with the error and what was chosen (accepted
//! agent values, the reason), never with a typed secret. Values the agent supplied are
//! shown to a member or admin who asks ("Reveal", password again) so they can confirm
//! them before accepting; never to an agent, and never on a page anyone else gets.

use std::collections::{BTreeMap, BTreeSet};

use agent_vault_rules::substitution::{Substitution, Surface};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{html, Markup};
use serde::Deserialize;

use super::auth::login_form;
use super::layout::{error_page, page, respond, store_error_page};
use super::security::{
    confirm_password, csrf_ok, csrf_refused, current_session, login_csrf, require_session, Form,
    Session, CONFIRM_FIELD, CSRF_FIELD,
};
use super::vaults::{proposer, vault_header, Tab};
use crate::access::{Access, Principal};
use crate::clock::utc_minutes;
use crate::credentials::Secret;
use crate::error::Error;
use crate::http::{blocking, AppState};
use crate::proposals::diff::{CredentialDiff, Diff, ServiceDiff, ServiceSummary};
use crate::proposals::{Approval, ProposalAction, ProposalStatus, ProposalView, SlotView};

/// Where a review lives: behind an approval link, or in the vault's pages.
#[derive(Debug, Clone)]
enum Target {
    Link { id: u64, token: String },
    Vault { vault: String, id: u64 },
}

impl Target {
    /// The page itself (where a decision redirects to, and where login returns).
    fn page_path(&self) -> String {
        match self {
            Target::Link { id, token } => {
                let token: String = form_urlencoded::byte_serialize(token.as_bytes()).collect();
                format!("/approve/{id}?token={token}")
            }
            Target::Vault { vault, id } => format!("/ui/vaults/{vault}/proposals/{id}"),
        }
    }

    fn action(&self, decision: &str) -> String {
        match self {
            Target::Link { id, .. } => format!("/approve/{id}/{decision}"),
            Target::Vault { vault, id } => format!("/ui/vaults/{vault}/proposals/{id}/{decision}"),
        }
    }

    /// Hidden fields a decision form carries besides the CSRF token.
    fn hidden(&self) -> Markup {
        html! {
            @if let Target::Link { token, .. } = self {
                input type="hidden" name="token" value=(token);
            }
        }
    }
}

/// Who is looking at the review.
enum Viewer<'a> {
    /// Not logged in: the login form, with its double-submit token.
    Anonymous { csrf: String },
    /// Logged in, but neither member nor admin of the vault: view only.
    Outsider(&'a Session),
    /// A member or admin: may decide.
    Reviewer(&'a Session),
}

impl Viewer<'_> {
    fn session(&self) -> Option<&Session> {
        match self {
            Viewer::Anonymous { .. } => None,
            Viewer::Outsider(session) | Viewer::Reviewer(session) => Some(session),
        }
    }
}

/// What the reviewer chose on a failed attempt, shown again (never a typed secret),
/// and the agent's values once the reviewer revealed them (password confirmed).
#[derive(Default)]
struct Draft {
    accepted: BTreeSet<String>,
    acknowledged: BTreeSet<String>,
    reason: String,
    error: Option<String>,
    revealed: BTreeMap<String, Secret>,
}

/// The form field of each acknowledged warning (one checkbox per warning id).
const ACK_FIELD: &str = "ack";

fn value_field(key: &str) -> String {
    format!("value.{key}")
}

fn accept_field(key: &str) -> String {
    format!("accept.{key}")
}

/// Only http(s) URLs become links (validation already refuses others; this is the
/// second wall against a `javascript:` link).
fn safe_link(url: &str) -> Option<&str> {
    let lower = url.to_ascii_lowercase();
    (lower.starts_with("https://") || lower.starts_with("http://")).then_some(url)
}

fn status_panel(view: &ProposalView) -> Markup {
    html! {
        @match view.status {
            ProposalStatus::Pending => {},
            ProposalStatus::Applied => section.outcome.applied {
                h2 { "Applied" }
                p {
                    "This proposal was approved"
                    @if let Some(review) = &view.review { " by " (review.by) " on " (utc_minutes(review.at)) }
                    ". Its services and credentials are in the vault; the agent can retry its request."
                }
            },
            ProposalStatus::Rejected => section.outcome.rejected {
                h2 { "Rejected" }
                p {
                    "This proposal was denied"
                    @if let Some(review) = &view.review { " by " (review.by) " on " (utc_minutes(review.at)) }
                    ". Nothing was changed."
                }
                @if let Some(reason) = view.review.as_ref().and_then(|r| r.reason.as_deref()) {
                    p { "Reason given to the agent: " q.reason { (reason) } }
                }
            },
            ProposalStatus::Expired => section.outcome.expired {
                h2 { "Expired" }
                p { "This proposal expired on " (utc_minutes(view.expires_at)) " without a decision. Nothing was changed; the agent has to propose again." }
            },
        }
    }
}

fn services_table(view: &ProposalView) -> Markup {
    html! {
        @if !view.services.is_empty() {
            section {
                h2 { "Services" }
                table.changes {
                    thead { tr { th { "Change" } th { "Service" } th { "Host" } th { "Auth" } th { "Credentials" } th { "Upstream TLS" } th { "Methods" } th { "Rate limit" } th { "Substitutions" } th { "Responses" } } }
                    tbody {
                        @for change in &view.services {
                            @match change.action {
                                ProposalAction::Set => tr {
                                    td { span.action-set { "set" } }
                                    td { (change.name) }
                                    td { code { (change.host.as_deref().unwrap_or("")) } }
                                    td { (change.auth.as_ref().map(|a| a.type_name()).unwrap_or("")) }
                                    td {
                                        @for key in change.service().map(|s| s.credential_keys()).unwrap_or_default() {
                                            code.key { (key) } " "
                                        }
                                    }
                                    td { (upstream_cell(change.upstream_tls.unwrap_or(true), change.upstream_h2c.unwrap_or(false))) }
                                    td { (methods_cell(change.methods.as_deref())) }
                                    td { (rate_limit_cell(change.rate_limit)) }
                                    td { (substitutions_cell(change.substitutions.as_deref().unwrap_or_default())) }
                                    td { (redaction_cell(change.redact_responses.unwrap_or(true))) }
                                },
                                ProposalAction::Delete => tr {
                                    td { span.action-delete { "delete" } }
                                    td { (change.name) }
                                    td colspan="8" { "the service is removed from the vault" }
                                },
                            }
                        }
                    }
                }
            }
        }
    }
}

fn summary_cells(summary: &ServiceSummary) -> Markup {
    html! {
        code { (summary.host) } " · " (summary.auth_type)
        @for key in &summary.keys { " " code.key { (key) } }
        " · TLS " @if summary.upstream_tls { "on" } @else { strong { "off" } }
        @if summary.upstream_h2c { " · HTTP/2 (h2c)" }
        " · methods " (methods_cell(summary.methods.as_deref()))
        " · rate limit " (rate_limit_cell(summary.rate_limit))
        " · substitutions " (substitutions_cell(&summary.substitutions))
        " · responses " (redaction_cell(summary.redact_responses))
    }
}

/// A service's substitutions: `__PLACEHOLDER__ ← KEY in path, query` each, or "none".
/// Placeholders and key names only: never a value.
pub(crate) fn substitutions_cell(substitutions: &[Substitution]) -> Markup {
    html! {
        @if substitutions.is_empty() {
            "none"
        }
        @for (i, substitution) in substitutions.iter().enumerate() {
            @if i > 0 { "; " }
            code.placeholder { (substitution.placeholder) } " ← " code.key { (substitution.key) }
            " in " (surfaces_text(&substitution.surfaces))
        }
    }
}

/// `path, query`: the surfaces as JSON names them.
pub(crate) fn surfaces_text(surfaces: &[Surface]) -> String {
    surfaces
        .iter()
        .map(|surface| surface.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// How Envoy reaches the upstream: `yes` (TLS), `no (plain HTTP)`, or, for an h2c
/// upstream, `no (plain HTTP/2, h2c)`.
pub(crate) fn upstream_cell(tls: bool, h2c: bool) -> Markup {
    html! {
        @if tls { "yes" } @else if h2c { "no (plain HTTP/2, h2c)" } @else { "no (plain HTTP)" }
    }
}

/// Whether the filter removes injected values from responses.
pub(crate) fn redaction_cell(redacts: bool) -> Markup {
    html! {
        @if redacts { "redacted" } @else { strong { "not redacted" } }
    }
}

/// A service's per-agent rate limit (`10/s per agent`), or "none".
pub(crate) fn rate_limit_cell(limit: Option<agent_vault_rules::RateLimit>) -> Markup {
    html! {
        @match limit {
            Some(limit) => { code { (limit) } " per agent" },
            None => "none",
        }
    }
}

/// A service's allowed methods: each in `code`, or "all but TRACE/TRACK" with no list.
pub(crate) fn methods_cell(methods: Option<&[String]>) -> Markup {
    html! {
        @match methods {
            Some(methods) => @for (i, method) in methods.iter().enumerate() {
                @if i > 0 { " " } code.method { (method) }
            },
            None => "all but TRACE/TRACK",
        }
    }
}

/// What approving changes in the vault, against what is there now: the reviewer sees
/// a replaced service's old and new host and TLS, and which keys already exist.
fn diff_section(diff: &Diff) -> Markup {
    html! {
        @if !diff.services.is_empty() {
            section.diff {
                h2 { "Services: what changes" }
                table.changes {
                    thead { tr { th { "Change" } th { "Service" } th { "Now" } th { "After approval" } } }
                    tbody {
                        @for change in &diff.services {
                            @match change {
                                ServiceDiff::Add { name, after } => tr {
                                    td { span.action-set { "new" } } td { (name) }
                                    td { "—" } td { (summary_cells(after)) }
                                },
                                ServiceDiff::Replace { name, before, after } => tr.replace {
                                    td { span.action-set { "replace" } } td { (name) }
                                    td { (summary_cells(before)) } td { (summary_cells(after)) }
                                },
                                ServiceDiff::Remove { name, before } => tr {
                                    td { span.action-delete { "remove" } } td { (name) }
                                    td { @match before { Some(before) => (summary_cells(before)), None => "not in the vault" } }
                                    td { "—" }
                                },
                            }
                        }
                    }
                }
            }
        }
        @let overwrites: Vec<&CredentialDiff> = diff.credentials.iter().filter(|c| matches!(c, CredentialDiff::Overwrite { .. })).collect();
        @if !overwrites.is_empty() {
            p.notice {
                "Already in the vault, replaced by approving: "
                @for change in overwrites {
                    @if let CredentialDiff::Overwrite { key, .. } = change { code.key { (key) } " " }
                }
            }
        }
    }
}

/// The warnings, each with the checkbox that acknowledges it (required before Allow).
fn warnings_fieldset(diff: &Diff, draft: &Draft) -> Markup {
    html! {
        @if !diff.warnings.is_empty() {
            fieldset.warnings {
                legend { "Read before you allow" }
                @for (index, warning) in diff.warnings.iter().enumerate() {
                    @let id = format!("ack-{index}");
                    div.warning role="alert" {
                        p { strong { "Warning: " } (warning.message) }
                        label.check for=(id) {
                            input id=(id) type="checkbox" name=(ACK_FIELD) value=(warning.id)
                                required[warning.key.is_none()] checked[draft.acknowledged.contains(&warning.id)];
                            " I understand, and allow this change"
                        }
                    }
                }
            }
        }
    }
}

/// The password field every decision is confirmed with: a session cookie alone (which
/// browsers also send to other servers on this host) never decides.
fn confirm_field(id: &str) -> Markup {
    html! {
        label for=(id) { "Your password (confirms this decision)" }
        input id=(id) type="password" name=(CONFIRM_FIELD) autocomplete="current-password" required;
    }
}

/// The slot's description, "obtain" link and instructions.
fn slot_help(slot: &SlotView) -> Markup {
    html! {
        @if let Some(description) = &slot.description {
            p.description { (description) }
        }
        @if let Some(obtain) = slot.obtain.as_deref() {
            p.obtain {
                @if let Some(url) = safe_link(obtain) {
                    "Get it here: "
                    a href=(url) target="_blank" rel="noopener noreferrer" { (url) }
                } @else {
                    "Where to get it: " code { (obtain) }
                }
            }
        }
        @if let Some(instructions) = &slot.obtain_instructions {
            p.instructions { (instructions) }
        }
    }
}

/// The credential slots, read-only (no session, outsider, or decided).
fn slots_readonly(view: &ProposalView) -> Markup {
    html! {
        @if !view.credentials.is_empty() {
            section {
                h2 { "Credentials" }
                @for slot in &view.credentials {
                    div.slot {
                        h3 {
                            code.key { (slot.key) }
                            @match slot.action {
                                ProposalAction::Set => span.action-set { "set" },
                                ProposalAction::Delete => span.action-delete { "delete" },
                            }
                            @if slot.has_value { span.badge.agent { "provided by the agent" } }
                        }
                        @if slot.action == ProposalAction::Delete {
                            p { "Approving deletes this credential from the vault." }
                        }
                        (slot_help(slot))
                    }
                }
            }
        }
    }
}

/// The Allow form: one password field per `set` slot, a checkbox and an override
/// field for the values the agent supplied.
fn allow_form(
    view: &ProposalView,
    diff: Option<&Diff>,
    target: &Target,
    session: &Session,
    draft: &Draft,
) -> Markup {
    html! {
        form.allow method="post" action=(target.action("allow")) autocomplete="off" {
            input type="hidden" name=(CSRF_FIELD) value=(session.csrf());
            (target.hidden())
            @if let Some(diff) = diff {
                (warnings_fieldset(diff, draft))
            }
            @if !view.credentials.is_empty() {
                h2 { "Credentials" }
            }
            @for slot in &view.credentials {
                @let value_id = format!("value-{}", slot.key);
                @let accept_id = format!("accept-{}", slot.key);
                div.slot {
                    h3 {
                        code.key { (slot.key) }
                        @match slot.action {
                            ProposalAction::Set => span.action-set { "set" },
                            ProposalAction::Delete => span.action-delete { "delete" },
                        }
                    }
                    @match (slot.action, slot.has_value) {
                        (ProposalAction::Delete, _) => {
                            p { "Approving deletes the credential " code { (slot.key) } " from the vault for good." }
                        },
                        (ProposalAction::Set, false) => {
                            (slot_help(slot))
                            label for=(value_id) { "Value for " (slot.key) }
                            input id=(value_id) type="password" name=(value_field(&slot.key)) autocomplete="off" required;
                        },
                        (ProposalAction::Set, true) => {
                            (slot_help(slot))
                            @match draft.revealed.get(&slot.key) {
                                Some(value) => p.revealed {
                                    span.badge.agent { "provided by the agent" }
                                    " The agent's value: " code.value { (value.expose()) }
                                },
                                None => p { span.badge.agent { "provided by the agent" } " The agent supplied this value itself; reveal it below to check it before you accept it." },
                            }
                            label.check for=(accept_id) {
                                input id=(accept_id) type="checkbox" name=(accept_field(&slot.key)) value="1" checked[draft.accepted.contains(&slot.key)];
                                " Accept the agent's value"
                            }
                            label for=(value_id) { "Or type your own value (replaces the agent's)" }
                            input id=(value_id) type="password" name=(value_field(&slot.key)) autocomplete="off";
                        },
                    }
                }
            }
            div.decide {
                (confirm_field("confirm-allow"))
                button.primary #allow type="submit" { "Allow" }
            }
        }
    }
}

/// Reveal the values the agent supplied (password again, like a credential reveal);
/// shown while some slot has one and they are not shown yet.
fn reveal_form(view: &ProposalView, target: &Target, session: &Session, draft: &Draft) -> Markup {
    let hidden = view
        .credentials
        .iter()
        .any(|slot| slot.has_value && !draft.revealed.contains_key(&slot.key));
    html! {
        @if hidden {
            form.reveal method="post" action=(target.action("reveal")) autocomplete="off" {
                input type="hidden" name=(CSRF_FIELD) value=(session.csrf());
                (target.hidden())
                p { "Check the values the agent supplied before you accept them." }
                label for="confirm-reveal" { "Your password" }
                input #confirm-reveal type="password" name=(CONFIRM_FIELD) autocomplete="current-password" required;
                button #reveal type="submit" { "Reveal the agent's values" }
            }
        }
        @if !draft.revealed.is_empty() {
            p.notice { "The agent's values are shown on this page only; it is not cached. Reload it to hide them." }
        }
    }
}

fn deny_form(target: &Target, session: &Session, draft: &Draft) -> Markup {
    html! {
        form.deny method="post" action=(target.action("deny")) {
            input type="hidden" name=(CSRF_FIELD) value=(session.csrf());
            (target.hidden())
            label for="reason" { "Reason (optional; the agent sees it)" }
            textarea #reason name="reason" rows="2" maxlength="1000" { (draft.reason) }
            (confirm_field("confirm-deny"))
            button.danger #deny type="submit" { "Deny" }
        }
    }
}

/// The whole review: what the agent asks for, and what the viewer can do about it.
fn review(
    view: &ProposalView,
    diff: Option<&Diff>,
    target: &Target,
    viewer: &Viewer,
    draft: &Draft,
) -> Markup {
    let pending = view.status == ProposalStatus::Pending;
    html! {
        div.proposal-head {
            h1 { "Proposal #" (view.id) " " span class={ "status status-" (view.status.as_str()) } { (view.status.as_str()) } }
            p.meta {
                "Vault " code { (view.vault) } " · from " (proposer(view))
                " · created " (utc_minutes(view.created_at))
                @if pending { " · expires " (utc_minutes(view.expires_at)) }
            }
        }
        (status_panel(view))
        @if let Some(error) = &draft.error {
            p.error role="alert" { (error) }
        }
        @if let Some(user_message) = &view.user_message {
            section {
                h2 { "What the agent says" }
                div.user-message { (user_message) }
            }
        }
        @if let Some(message) = &view.message {
            p.summary { strong { "Summary: " } (message) }
        }
        @match diff {
            Some(diff) => (diff_section(diff)),
            None => (services_table(view)),
        }
        @match viewer {
            Viewer::Reviewer(session) if pending => {
                (reveal_form(view, target, session, draft))
                (allow_form(view, diff, target, session, draft))
                (deny_form(target, session, draft))
            },
            Viewer::Anonymous { csrf } if pending => {
                (slots_readonly(view))
                section.card.narrow.inline-login {
                    h2 { "Log in to decide" }
                    p { "Only a member or admin of vault " code { (view.vault) } " can allow or deny this proposal." }
                    (login_form(csrf, Some(&target.page_path()), "", None))
                    p.hint { "Already logged in? " a href=(target.page_path()) { "Continue" } "." }
                }
            },
            Viewer::Outsider(session) if pending => {
                (slots_readonly(view))
                p.notice {
                    "You are logged in as " (session.email) ", who is not a member or admin of vault "
                    code { (view.vault) } ": you can view this proposal, but not decide it."
                }
            },
            _ => (slots_readonly(view)),
        }
    }
}

fn status_code(view: &ProposalView) -> StatusCode {
    match view.status {
        ProposalStatus::Expired => StatusCode::GONE,
        _ => StatusCode::OK,
    }
}

fn review_response(
    status: StatusCode,
    view: &ProposalView,
    diff: Option<&Diff>,
    target: &Target,
    viewer: &Viewer,
    draft: &Draft,
    access: Option<Access>,
) -> Response {
    let title = format!("Proposal #{}", view.id);
    let body = html! {
        @if let (Target::Vault { vault, .. }, Some(access)) = (target, access) {
            (vault_header(vault, access, Tab::Proposals))
        }
        (review(view, diff, target, viewer, draft))
    };
    respond(status, page(&title, viewer.session(), body))
}

/// One page for every unusable link (unknown id, wrong token, older than 24 h): a
/// guesser learns nothing.
fn invalid_link_page(session: Option<&Session>) -> Response {
    error_page(
        StatusCode::NOT_FOUND,
        "Invalid or expired link",
        "This approval link is invalid or has expired (links last 24 hours). If you are a \
         member of the vault, you can still review the proposal from the vault's page.",
        session,
    )
}

fn link_error_page(error: Error, session: Option<&Session>) -> Response {
    match error {
        Error::NotFound(..) | Error::BadRequest(..) => invalid_link_page(session),
        other => store_error_page(other, session),
    }
}

#[derive(Deserialize)]
pub struct LinkQuery {
    token: Option<String>,
}

/// The proposal behind a link, and the vault it is in.
async fn resolve_link(
    state: &AppState,
    id: &str,
    token: &str,
) -> Result<(String, ProposalView), Error> {
    let id: u64 = id
        .parse()
        .map_err(|_| Error::not_found("invalid_link", "invalid link"))?;
    let store = state.store.clone();
    let token = token.to_string();
    blocking(move || store.proposal_by_link(id, &token)).await
}

/// What `principal` may do on `vault` (None: cannot see it).
async fn access_of(state: &AppState, principal: &Principal, vault: &str) -> Option<Access> {
    let store = state.store.clone();
    let principal = principal.clone();
    let vault = vault.to_string();
    blocking(move || store.access(&principal, &vault).map(|(_, access)| access))
        .await
        .ok()
}

/// The diff a reviewer decides on (only while pending; `None` if it cannot be read).
async fn diff_for(state: &AppState, viewer: &Viewer<'_>, view: &ProposalView) -> Option<Diff> {
    let Viewer::Reviewer(session) = viewer else {
        return None;
    };
    if view.status != ProposalStatus::Pending {
        return None;
    }
    let store = state.store.clone();
    let principal = session.principal.clone();
    let (vault, id) = (view.vault.clone(), view.id);
    blocking(move || store.proposal_diff(&principal, &vault, id))
        .await
        .ok()
}

fn can_decide(access: Option<Access>) -> bool {
    matches!(access, Some(Access::Member | Access::Admin))
}

pub async fn link_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(query): Query<LinkQuery>,
) -> Response {
    let session = current_session(&state, &headers).await;
    let token = query.token.unwrap_or_default();
    let (vault, view) = match resolve_link(&state, &id, &token).await {
        Ok(found) => found,
        Err(error) => return link_error_page(error, session.as_ref()),
    };
    let target = Target::Link { id: view.id, token };
    let mut set_cookie = None;
    let viewer = match &session {
        Some(session) => {
            if can_decide(access_of(&state, &session.principal, &vault).await) {
                Viewer::Reviewer(session)
            } else {
                Viewer::Outsider(session)
            }
        }
        None => {
            let (csrf, cookie) = login_csrf(&state, &headers);
            set_cookie = cookie;
            Viewer::Anonymous { csrf }
        }
    };
    let diff = diff_for(&state, &viewer, &view).await;
    let mut response = review_response(
        status_code(&view),
        &view,
        diff.as_ref(),
        &target,
        &viewer,
        &Draft::default(),
        None,
    );
    if let Some(cookie) = set_cookie {
        response.headers_mut().append(header::SET_COOKIE, cookie);
    }
    response
}

pub async fn vault_proposal(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    Path((vault, id)): Path<(String, String)>,
) -> Response {
    let session = match require_session(&state, &headers, &uri).await {
        Ok(session) => session,
        Err(response) => return response,
    };
    let Ok(id) = id.parse::<u64>() else {
        return error_page(
            StatusCode::NOT_FOUND,
            "Not found",
            "There is no such proposal.",
            Some(&session),
        );
    };
    let store = state.store.clone();
    let principal = session.principal.clone();
    let name = vault.clone();
    let loaded = blocking(move || {
        let (_, access) = store.access(&principal, &name)?;
        Ok((access, store.get_proposal(&principal, &name, id)?))
    })
    .await;
    let (access, view) = match loaded {
        Ok(found) => found,
        Err(error) => return store_error_page(error, Some(&session)),
    };
    let target = Target::Vault { vault, id };
    let viewer = if can_decide(Some(access)) {
        Viewer::Reviewer(&session)
    } else {
        Viewer::Outsider(&session)
    };
    let diff = diff_for(&state, &viewer, &view).await;
    review_response(
        status_code(&view),
        &view,
        diff.as_ref(),
        &target,
        &viewer,
        &Draft::default(),
        Some(access),
    )
}

/// Allow or Deny, or Reveal the agent's values first (each asks for the password).
#[derive(Debug, Clone, Copy)]
enum Decision {
    Allow,
    Deny,
    Reveal,
}

impl Decision {
    /// The decision a form posts to (the last segment of its action, [`Target::action`]).
    fn from_path(segment: &str) -> Option<Decision> {
        match segment {
            "allow" => Some(Decision::Allow),
            "deny" => Some(Decision::Deny),
            "reveal" => Some(Decision::Reveal),
            _ => None,
        }
    }
}

/// What every decision POST checks first: a session (403 without: a form posted with
/// no session cannot carry a valid token), its CSRF token, the proposal (via the
/// link, or the vault), and the member/admin role. Returns the session, the vault,
/// the proposal and the viewer's access.
async fn prepare(
    state: &AppState,
    headers: &HeaderMap,
    form: &Form,
    link_id: Option<&str>,
    vault_target: Option<(&str, &str)>,
) -> Result<(Session, Target, ProposalView, Access), Response> {
    let Some(session) = current_session(state, headers).await else {
        return Err(error_page(
            StatusCode::FORBIDDEN,
            "Not logged in",
            "You are not logged in (or your session expired), so nothing was changed. Open the \
             approval link again and log in.",
            None,
        ));
    };
    if !csrf_ok(&session, form) {
        return Err(csrf_refused());
    }
    let (vault, view, target) = if let Some(id) = link_id {
        let token = form.text("token").to_string();
        match resolve_link(state, id, &token).await {
            Ok((vault, view)) => {
                let target = Target::Link { id: view.id, token };
                (vault, view, target)
            }
            Err(error) => return Err(link_error_page(error, Some(&session))),
        }
    } else {
        let (vault, id) = vault_target.unwrap_or_default();
        let Ok(id) = id.parse::<u64>() else {
            return Err(error_page(
                StatusCode::NOT_FOUND,
                "Not found",
                "There is no such proposal.",
                Some(&session),
            ));
        };
        let store = state.store.clone();
        let principal = session.principal.clone();
        let name = vault.to_string();
        match blocking(move || store.get_proposal(&principal, &name, id)).await {
            Ok(view) => {
                let target = Target::Vault {
                    vault: vault.to_string(),
                    id,
                };
                (vault.to_string(), view, target)
            }
            Err(error) => return Err(store_error_page(error, Some(&session))),
        }
    };
    let access = access_of(state, &session.principal, &vault).await;
    if !can_decide(access) {
        return Err(error_page(
            StatusCode::FORBIDDEN,
            "Not allowed",
            &format!(
                "You are logged in as {}, who is not a member or admin of vault \"{vault}\": \
                 only they can allow or deny its proposals. Nothing was changed.",
                session.email
            ),
            Some(&session),
        ));
    }
    let access = access.unwrap_or(Access::Member);
    Ok((session, target, view, access))
}

/// The values to approve with, from the form: a typed value wins; an agent-supplied
/// slot without one needs its "accept" box. Errors name the slots still missing.
fn collect_values(
    view: &ProposalView,
    form: &Form,
    draft: &mut Draft,
) -> Result<(BTreeMap<String, Secret>, bool), String> {
    let mut values = BTreeMap::new();
    let mut accept_agent_values = false;
    let mut missing = Vec::new();
    for slot in view
        .credentials
        .iter()
        .filter(|slot| slot.action == ProposalAction::Set)
    {
        let typed = form.text(&value_field(&slot.key));
        let accepted = slot.has_value && form.get(&accept_field(&slot.key)) == Some("1");
        if accepted {
            draft.accepted.insert(slot.key.clone());
        }
        if !typed.is_empty() {
            values.insert(slot.key.clone(), Secret::new(typed.to_string()));
        } else if accepted {
            accept_agent_values = true;
        } else {
            missing.push(slot.key.as_str());
        }
    }
    if missing.is_empty() {
        Ok((values, accept_agent_values))
    } else {
        Err(format!(
            "Nothing was changed: type a value for {}{}.",
            missing.join(", "),
            if view.credentials.iter().any(|s| s.has_value) {
                " (or accept the agent's value)"
            } else {
                ""
            }
        ))
    }
}

async fn decide(
    state: AppState,
    headers: HeaderMap,
    form: Form,
    decision: Decision,
    link_id: Option<String>,
    vault_target: Option<(String, String)>,
) -> Response {
    let (session, target, view, access) = match prepare(
        &state,
        &headers,
        &form,
        link_id.as_deref(),
        vault_target.as_ref().map(|(v, i)| (v.as_str(), i.as_str())),
    )
    .await
    {
        Ok(prepared) => prepared,
        Err(response) => return response,
    };
    let access_shown = matches!(target, Target::Vault { .. }).then_some(access);
    let reviewer = Viewer::Reviewer(&session);
    let mut draft = Draft {
        acknowledged: form.all(ACK_FIELD).map(str::to_string).collect(),
        ..Draft::default()
    };
    // What the page shows again when the decision does not go through: the proposal
    // as it is now (it may have expired or been decided meanwhile), and its diff.
    let again = |status: StatusCode, view: &ProposalView, diff: Option<&Diff>, draft: &Draft| {
        review_response(status, view, diff, &target, &reviewer, draft, access_shown)
    };
    if view.status != ProposalStatus::Pending {
        // Decided meanwhile: show how.
        return again(StatusCode::CONFLICT, &view, None, &draft);
    }
    if let Err(message) = confirm_password(&state, &session, &form).await {
        draft.error = Some(message);
        let diff = diff_for(&state, &reviewer, &view).await;
        return again(StatusCode::UNAUTHORIZED, &view, diff.as_ref(), &draft);
    }
    let store = state.store.clone();
    let principal = session.principal.clone();
    let vault = view.vault.clone();
    let id = view.id;
    let result = match decision {
        Decision::Allow => match collect_values(&view, &form, &mut draft) {
            Ok((values, accept_agent_values)) => {
                let approval = Approval {
                    values,
                    accept_agent_values,
                    acknowledged: draft.acknowledged.clone(),
                };
                blocking(move || store.approve_proposal(&principal, &vault, id, approval)).await
            }
            Err(message) => {
                draft.error = Some(message);
                let diff = diff_for(&state, &reviewer, &view).await;
                return again(StatusCode::BAD_REQUEST, &view, diff.as_ref(), &draft);
            }
        },
        Decision::Reveal => {
            // Nothing changes: the same page, with the agent's values in their slots.
            match blocking(move || store.reveal_proposal_values(&principal, &vault, id)).await {
                Ok(values) => draft.revealed = values,
                Err(error) => draft.error = Some(error.to_string()),
            }
            let diff = diff_for(&state, &reviewer, &view).await;
            return again(StatusCode::OK, &view, diff.as_ref(), &draft);
        }
        Decision::Deny => {
            draft.reason = form.text("reason").to_string();
            let reason = Some(draft.reason.clone());
            blocking(move || store.reject_proposal(&principal, &vault, id, reason)).await
        }
    };
    match result {
        Ok(_) => Redirect::to(&target.page_path()).into_response(),
        Err(error) => {
            if let Error::Internal(detail) = &error {
                tracing::error!(%detail, "deciding a proposal failed");
            }
            let status = error.status();
            draft.error = Some(match &error {
                Error::Internal(_) => {
                    "Nothing was changed: internal error; see the server log.".to_string()
                }
                other => other.to_string(),
            });
            let store = state.store.clone();
            let principal = session.principal.clone();
            let vault = view.vault.clone();
            let current = blocking(move || store.get_proposal(&principal, &vault, id))
                .await
                .unwrap_or(view);
            let diff = diff_for(&state, &reviewer, &current).await;
            again(status, &current, diff.as_ref(), &draft)
        }
    }
}

/// `POST /approve/{id}/{allow|deny|reveal}`.
pub async fn link_decision(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((id, decision)): Path<(String, String)>,
    form: Form,
) -> Response {
    match Decision::from_path(&decision) {
        Some(decision) => decide(state, headers, form, decision, Some(id), None).await,
        None => super::layout::not_found().await,
    }
}

/// `POST /ui/vaults/{vault}/proposals/{id}/{allow|deny|reveal}`.
pub async fn vault_decision(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((vault, id, decision)): Path<(String, String, String)>,
    form: Form,
) -> Response {
    match Decision::from_path(&decision) {
        Some(decision) => decide(state, headers, form, decision, None, Some((vault, id))).await,
        None => super::layout::not_found().await,
    }
}
