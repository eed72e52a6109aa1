//! Proposals: an agent asks for a new service rule and the credential slots it needs;
//! a human (member or admin of the vault) approves or rejects, in the browser or the
//! CLI. The agent never sees a value. `control-plane/API.md` ("Proposals") is the
//! contract; the JSON is the seed's, exactly.
//!
//! Storage:
//! - `proposals`: `<vault id>\0<u64 BE id>` → [`ProposalRecord`] (JSON). Ids are
//!   sequential per vault; the sequence lives in `meta` (`proposal_seq\0<vault id>`).
//! - `meta` `proposal_pending\0<vault id>`: the ids that were pending at the last
//!   write, so the pending limit is checked inside the creating transaction without
//!   iterating (sled cannot iterate inside a transaction).
//! - `proposal_links`: SHA-256 (hex) of the approval token → the proposal's key. The
//!   token itself is never stored; the record keeps its hash too, compared in constant
//!   time.
//!
//! Agent-supplied values are sealed with the data key at creation (AAD = vault id +
//! proposal id + key, [`crate::crypto::proposal_value_aad`]), never returned, resealed
//! by `master-key rotate`, and dropped from the record once the proposal is decided
//! (applied, rejected or expired).
//!
//! Lifecycle: `pending → applied | rejected | expired`. A pending proposal 7 days old
//! reads as `expired` everywhere (and is stored so on the next read or write); it can
//! be neither approved nor rejected. Approval applies every service merge, credential
//! set and delete, and the status change in ONE transaction: any failure applies
//! nothing (409 `apply_failed`) and the proposal stays pending.

pub mod diff;
mod validate;

use diff::{merge_services, Diff};
use validate::check_references;
pub use validate::{
    validate_proposal, MAX_DESCRIPTION, MAX_INSTRUCTIONS, MAX_MESSAGE, MAX_OBTAIN, MAX_SERVICES,
    MAX_SLOTS, MAX_USER_MESSAGE,
};

use std::collections::{BTreeMap, BTreeSet};

use agent_vault_rules::substitution::Substitution;
use agent_vault_rules::{validate_services, Auth, RateLimit, Service};
use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::access::{ensure_vault_unchanged, Access, Principal};
use crate::credentials::{put_credentials, seal_record, validate_entry, CredentialRecord, Secret};
use crate::crypto::{new_token, proposal_value_aad, sha256_hex, Key, APPROVAL_PREFIX};
use crate::error::{Error, Result};
use crate::services::{check_keys_exist, read_services_tx};
use crate::store::{
    abort, get_json, put_json, read_json, scan_json, vault_key, vault_prefix, Store, Tx, TxError,
    TxResult,
};

/// A pending proposal expires this long after it was created.
pub const PROPOSAL_TTL_SECS: i64 = 7 * 86_400;
/// An approval link can be used this long after the proposal was created.
pub const LINK_TTL_SECS: i64 = 86_400;
/// Most pending proposals per vault; one more is 429 `too_many_proposals`.
pub const MAX_PENDING: usize = 20;
/// Longest rejection reason.
pub const MAX_REASON: usize = 1000;

const META_SEQ: &[u8] = b"proposal_seq\0";
const META_PENDING: &[u8] = b"proposal_pending\0";

/// `pending → applied | rejected | expired`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProposalStatus {
    Pending,
    Applied,
    Rejected,
    Expired,
}

impl ProposalStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ProposalStatus::Pending => "pending",
            ProposalStatus::Applied => "applied",
            ProposalStatus::Rejected => "rejected",
            ProposalStatus::Expired => "expired",
        }
    }
}

impl std::fmt::Display for ProposalStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ProposalStatus {
    type Err = Error;

    fn from_str(s: &str) -> Result<ProposalStatus> {
        match s {
            "pending" => Ok(ProposalStatus::Pending),
            "applied" => Ok(ProposalStatus::Applied),
            "rejected" => Ok(ProposalStatus::Rejected),
            "expired" => Ok(ProposalStatus::Expired),
            other => Err(Error::bad_request(
                "invalid_request",
                format!(
                    "unknown proposal status {other:?}: use pending, applied, rejected or expired"
                ),
            )),
        }
    }
}

/// `set` (add or replace) or `delete` (remove). Defaults to `set` when left out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProposalAction {
    #[default]
    Set,
    Delete,
}

/// One entry of a proposal's `services`: a service to set (the whole service, as in
/// `vault service add`) or the name of one to delete. Stored and returned with
/// `enabled` and `upstream_tls` filled in for `set`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceChange {
    #[serde(default)]
    pub action: ProposalAction,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<Auth>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_tls: Option<bool>,
    /// `true`: a plain-HTTP upstream (`upstream_tls: false`) spoken to as HTTP/2 (h2c);
    /// absent: HTTP/1.1 (or a catalog template's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_h2c: Option<bool>,
    /// A `set` from a service catalog template ([`crate::catalog`]): its host, auth and
    /// transport fill what the entry leaves out. Expanded when the proposal is created,
    /// so a stored proposal never carries it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalog: Option<String>,
    /// The methods the service forwards (validated as for `vault service add`);
    /// absent: every method but TRACE/TRACK.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
    /// The service's per-agent rate limit (validated as for `vault service add`);
    /// absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Placeholders the filter replaces with a credential's value (validated as for
    /// `vault service add`); absent: none, or a catalog template's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub substitutions: Option<Vec<Substitution>>,
    /// `false` turns response redaction off; absent: on (or a catalog template's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redact_responses: Option<bool>,
}

impl ServiceChange {
    /// The service a `set` entry stands for (`None` for deletes and incomplete sets).
    pub fn service(&self) -> Option<Service> {
        match (self.action, &self.host, &self.auth) {
            (ProposalAction::Set, Some(host), Some(auth)) => Some(Service {
                name: self.name.clone(),
                host: host.clone(),
                enabled: self.enabled.unwrap_or(true),
                auth: auth.clone(),
                upstream_tls: self.upstream_tls.unwrap_or(true),
                upstream_h2c: self.upstream_h2c.unwrap_or(false),
                methods: self.methods.clone(),
                rate_limit: self.rate_limit,
                substitutions: self.substitutions.clone().unwrap_or_default(),
                redact_responses: self.redact_responses,
            }),
            _ => None,
        }
    }
}

/// One entry of a proposal's `credentials` as sent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialSlotInput {
    #[serde(default)]
    pub action: ProposalAction,
    pub key: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub obtain: Option<String>,
    #[serde(default)]
    pub obtain_instructions: Option<String>,
    /// A value the agent generated itself (sealed at once, never returned).
    #[serde(default)]
    pub value: Option<Secret>,
}

/// The body of `POST /v1/proposals`: the seed's JSON.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProposalInput {
    #[serde(default)]
    pub services: Vec<ServiceChange>,
    #[serde(default)]
    pub credentials: Vec<CredentialSlotInput>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub user_message: Option<String>,
}

/// Who raised a proposal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Proposer {
    Agent { name: String },
    User { email: String },
}

/// Who decided, when, and (for rejections) why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Review {
    pub by: String,
    pub at: i64,
    pub reason: Option<String>,
}

/// A credential slot as returned: never a value, `has_value` instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlotView {
    pub action: ProposalAction,
    pub key: String,
    pub description: Option<String>,
    pub obtain: Option<String>,
    pub obtain_instructions: Option<String>,
    /// The agent supplied a value (it is sealed, and never returned).
    pub has_value: bool,
}

/// A proposal as every reader sees it (API, UI, CLI).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProposalView {
    pub id: u64,
    pub vault: String,
    pub status: ProposalStatus,
    /// The proposing agent's name; `null` when a user proposed.
    pub agent: Option<String>,
    pub created_by: Proposer,
    pub created_at: i64,
    pub expires_at: i64,
    pub services: Vec<ServiceChange>,
    pub credentials: Vec<SlotView>,
    pub message: Option<String>,
    pub user_message: Option<String>,
    pub review: Option<Review>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSlot {
    action: ProposalAction,
    key: String,
    description: Option<String>,
    obtain: Option<String>,
    obtain_instructions: Option<String>,
    /// The agent supplied a value (kept after the sealed copy is dropped).
    agent_value: bool,
    /// base64 of the sealed agent value while the proposal is pending.
    sealed: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ProposalRecord {
    id: u64,
    vault_id: String,
    vault: String,
    status: ProposalStatus,
    created_by: Proposer,
    created_at: i64,
    expires_at: i64,
    link_sha256: String,
    link_expires_at: i64,
    services: Vec<ServiceChange>,
    credentials: Vec<StoredSlot>,
    message: Option<String>,
    user_message: Option<String>,
    review: Option<Review>,
}

impl ProposalRecord {
    fn view(&self) -> ProposalView {
        ProposalView {
            id: self.id,
            vault: self.vault.clone(),
            status: self.status,
            agent: match &self.created_by {
                Proposer::Agent { name } => Some(name.clone()),
                Proposer::User { .. } => None,
            },
            created_by: self.created_by.clone(),
            created_at: self.created_at,
            expires_at: self.expires_at,
            services: self.services.clone(),
            credentials: self
                .credentials
                .iter()
                .map(|slot| SlotView {
                    action: slot.action,
                    key: slot.key.clone(),
                    description: slot.description.clone(),
                    obtain: slot.obtain.clone(),
                    obtain_instructions: slot.obtain_instructions.clone(),
                    has_value: slot.agent_value,
                })
                .collect(),
            message: self.message.clone(),
            user_message: self.user_message.clone(),
            review: self.review.clone(),
        }
    }

    fn is_due(&self, now: i64) -> bool {
        self.status == ProposalStatus::Pending && !unexpired(self.expires_at, now)
    }

    /// Marks the proposal decided: its sealed agent values are no longer needed.
    fn decide(&mut self, status: ProposalStatus, review: Option<Review>) {
        self.status = status;
        self.review = review;
        for slot in &mut self.credentials {
            slot.sealed = None;
        }
    }

    fn visible_to(&self, principal: &Principal) -> bool {
        match (principal, &self.created_by) {
            (Principal::User { .. }, _) => true,
            (Principal::Agent { name, .. }, Proposer::Agent { name: proposer }) => name == proposer,
            (Principal::Agent { .. }, Proposer::User { .. }) => false,
        }
    }
}

/// `<vault id>\0<u64 BE id>`.
pub(crate) fn proposal_key(vault_id: &str, id: u64) -> Vec<u8> {
    let mut key = vault_prefix(vault_id);
    key.extend_from_slice(&id.to_be_bytes());
    key
}

fn meta_key(prefix: &[u8], vault_id: &str) -> Vec<u8> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(vault_id.as_bytes());
    key
}

/// The `meta` keys that belong to a vault's proposals (removed with the vault).
pub(crate) fn proposal_meta_keys(vault_id: &str) -> [Vec<u8>; 2] {
    [
        meta_key(META_SEQ, vault_id),
        meta_key(META_PENDING, vault_id),
    ]
}

/// `<public url>/approve/<id>?token=<token>`: the link a human opens.
pub fn approval_url(public_url: &str, id: u64, token: &str) -> String {
    format!(
        "{}/approve/{id}?token={token}",
        public_url.trim_end_matches('/')
    )
}

fn proposal_not_found(id: u64, vault: &str) -> Error {
    Error::not_found(
        "proposal_not_found",
        format!("proposal {id} not found in vault \"{vault}\""),
    )
}

fn invalid_link() -> Error {
    Error::not_found(
        "invalid_link",
        "this approval link is invalid or has expired; ask the agent for a new proposal or review it in the vault",
    )
}

fn not_pending(record: &ProposalRecord) -> Error {
    Error::conflict(
        "not_pending",
        format!(
            "proposal {} is {}; only pending proposals can be approved or rejected",
            record.id, record.status
        ),
    )
}

fn apply_failed(id: u64, reason: impl std::fmt::Display) -> Error {
    Error::conflict(
        "apply_failed",
        format!("proposal {id} was not applied and nothing changed: {reason}"),
    )
}

/// Fills each `set` that names a catalog template with the template's host, auth and
/// transport where the entry gives none (what the entry says wins), and adds a slot,
/// with the template's description and "obtain" link, for each key the template reads
/// that is neither in the vault nor already in the proposal.
fn expand_catalog(mut input: ProposalInput, existing: &BTreeSet<String>) -> Result<ProposalInput> {
    let mut slots = Vec::new();
    for change in &mut input.services {
        let Some(name) = change.catalog.take() else {
            continue;
        };
        if change.action != ProposalAction::Set {
            return Err(Error::bad_request(
                "invalid_request",
                format!(
                    "service \"{}\": \"catalog\" applies to a set, not a delete",
                    change.name
                ),
            ));
        }
        let entry = crate::catalog::find(&name)?;
        let template = &entry.service;
        change.host.get_or_insert_with(|| template.host.clone());
        change.auth.get_or_insert_with(|| template.auth.clone());
        change.upstream_tls.get_or_insert(template.upstream_tls);
        if change.upstream_h2c.is_none() && template.upstream_h2c {
            change.upstream_h2c = Some(true);
        }
        if change.substitutions.is_none() && !template.substitutions.is_empty() {
            change.substitutions = Some(template.substitutions.clone());
        }
        if change.redact_responses.is_none() {
            change.redact_responses = template.redact_responses;
        }
        let used_keys = change
            .service()
            .map(|service| service.credential_keys())
            .unwrap_or_default();
        for credential in &entry.credentials {
            let listed = input
                .credentials
                .iter()
                .any(|slot| slot.key == credential.key)
                || slots
                    .iter()
                    .any(|slot: &CredentialSlotInput| slot.key == credential.key);
            let used = used_keys.contains(&credential.key);
            if used && !listed && !existing.contains(&credential.key) {
                slots.push(CredentialSlotInput {
                    action: ProposalAction::Set,
                    key: credential.key.clone(),
                    description: Some(credential.description.clone()),
                    obtain: Some(credential.obtain.clone()),
                    obtain_instructions: None,
                    value: None,
                });
            }
        }
    }
    input.credentials.extend(slots);
    Ok(input)
}

fn reviewer(principal: &Principal) -> Result<String> {
    match principal {
        Principal::User { email, .. } => Ok(email.clone()),
        Principal::Agent { .. } => Err(Error::forbidden(
            "agents cannot approve or reject proposals; a member or admin of the vault must",
        )),
    }
}

fn seal_value(key: &Key, vault_id: &str, id: u64, name: &str, value: &str) -> String {
    let sealed = key.seal(&proposal_value_aad(vault_id, id, name), value.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sealed)
}

fn open_value(key: &Key, vault_id: &str, id: u64, name: &str, sealed: &str) -> Result<Secret> {
    let what = || format!("proposal {id}, value of {name}");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(sealed)
        .map_err(|_| Error::internal(format!("{}: not base64", what())))?;
    let plain = key
        .open(&proposal_value_aad(vault_id, id, name), &bytes)
        .map_err(|e| Error::internal(format!("{}: {e}", what())))?;
    let text = std::str::from_utf8(&plain)
        .map_err(|_| Error::internal(format!("{}: not UTF-8", what())))?;
    Ok(Secret::new(text.to_string()))
}

fn read_pending(tx: &Tx, vault_id: &str) -> TxResult<Vec<u64>> {
    Ok(get_json(tx.meta, meta_key(META_PENDING, vault_id))?.unwrap_or_default())
}

fn write_pending(tx: &Tx, vault_id: &str, ids: &[u64]) -> TxResult<()> {
    put_json(tx.meta, meta_key(META_PENDING, vault_id), &ids)
}

fn remove_pending(tx: &Tx, vault_id: &str, id: u64) -> TxResult<()> {
    let mut ids = read_pending(tx, vault_id)?;
    ids.retain(|&p| p != id);
    write_pending(tx, vault_id, &ids)
}

/// The vault's proposals that are still pending at `now`; those past expiry are
/// stored as expired on the way.
fn live_pending(tx: &Tx, vault_id: &str, now: i64) -> TxResult<Vec<u64>> {
    let mut live = Vec::new();
    for id in read_pending(tx, vault_id)? {
        let key = proposal_key(vault_id, id);
        let Some(mut record) = get_json::<ProposalRecord>(tx.proposals, &key)? else {
            continue;
        };
        if record.is_due(now) {
            record.decide(ProposalStatus::Expired, None);
            put_json(tx.proposals, &key, &record)?;
        } else if record.status == ProposalStatus::Pending {
            live.push(id);
        }
    }
    Ok(live)
}

/// Re-encrypts the agent-supplied values of the proposals under `db_keys`.
pub(crate) fn reseal(
    tx: &Tx,
    db_keys: &[crate::store::Bytes],
    old: &Key,
    new: &Key,
) -> TxResult<usize> {
    let mut count = 0;
    for db_key in db_keys {
        let Some(mut record) = get_json::<ProposalRecord>(tx.proposals, db_key)? else {
            continue;
        };
        let mut changed = false;
        for slot in &mut record.credentials {
            let Some(sealed) = &slot.sealed else { continue };
            let secret = match open_value(old, &record.vault_id, record.id, &slot.key, sealed) {
                Ok(secret) => secret,
                Err(e) => return abort(e),
            };
            slot.sealed = Some(seal_value(
                new,
                &record.vault_id,
                record.id,
                &slot.key,
                secret.expose(),
            ));
            changed = true;
            count += 1;
        }
        if changed {
            put_json(tx.proposals, db_key, &record)?;
        }
    }
    Ok(count)
}

/// Runs a transaction step whose abort error should read as an apply failure.
fn as_apply_failure<T>(id: u64, result: TxResult<T>) -> TxResult<T> {
    match result {
        Err(TxError::Abort(e)) => abort(apply_failed(id, e)),
        other => other,
    }
}

/// Whether a proposal that expires at `expires_at` is still open at `now`.
fn unexpired(expires_at: i64, now: i64) -> bool {
    now < expires_at
}

impl Store {
    /// What approving proposal `id` would change in `vault` now, with the warnings the
    /// approver must acknowledge (members and admins; agents never see it).
    pub fn proposal_diff(&self, principal: &Principal, vault: &str, id: u64) -> Result<Diff> {
        reviewer(principal)?;
        let (record, access) = self.access(principal, vault)?;
        access.require_member()?;
        let view = self.get_proposal(principal, vault, id)?;
        let current = self.services_of(&record.id)?;
        let held = self.credential_keys(&record.id)?;
        Ok(diff::diff(
            &view.services,
            &view.credentials,
            &current,
            |k| held.contains(k),
        ))
    }

    /// Proposals waiting for a human in every vault, now (for `/metrics`). Reads only;
    /// a pending proposal past its expiry is not counted, though it is stored as
    /// expired only on its next read or write.
    pub fn pending_proposal_count(&self) -> Result<usize> {
        /// The two fields a count needs (the rest is skipped unread).
        #[derive(Deserialize)]
        struct State {
            status: ProposalStatus,
            expires_at: i64,
        }
        let now = self.now_secs();
        Ok(scan_json::<State>(&self.trees.proposals, b"")?
            .into_iter()
            .filter(|(_, p)| p.status == ProposalStatus::Pending && unexpired(p.expires_at, now))
            .count())
    }

    /// The approval-link index entries of a vault's proposals (removed with the vault).
    pub(crate) fn proposal_link_keys(&self, vault_id: &str) -> Result<Vec<Vec<u8>>> {
        Ok(
            scan_json::<ProposalRecord>(&self.trees.proposals, vault_prefix(vault_id))?
                .into_iter()
                .map(|(_, record)| record.link_sha256.into_bytes())
                .collect(),
        )
    }

    fn read_proposal(&self, vault_id: &str, id: u64) -> Result<Option<ProposalRecord>> {
        read_json(&self.trees.proposals, proposal_key(vault_id, id))
    }

    /// Stores a pending proposal past its expiry as expired (lazily, on read).
    fn expire_if_due(&self, record: ProposalRecord) -> Result<ProposalRecord> {
        let now = self.now_secs();
        if !record.is_due(now) {
            return Ok(record);
        }
        let key = proposal_key(&record.vault_id, record.id);
        let vault_id = record.vault_id.clone();
        let stored = self.write(|tx| {
            let Some(mut current) = get_json::<ProposalRecord>(tx.proposals, &key)? else {
                // Removed meanwhile (vault deleted): answer with what was read.
                let mut gone = record.clone();
                gone.decide(ProposalStatus::Expired, None);
                return Ok(gone);
            };
            if current.is_due(now) {
                current.decide(ProposalStatus::Expired, None);
                put_json(tx.proposals, &key, &current)?;
                remove_pending(tx, &vault_id, current.id)?;
            }
            Ok(current)
        })?;
        Ok(stored)
    }

    /// Raises a proposal (agents, and users with access to the vault). Returns the
    /// proposal and its approval token (`av_appr_…`), shown only here.
    pub fn create_proposal(
        &self,
        principal: &Principal,
        vault: &str,
        input: ProposalInput,
    ) -> Result<(ProposalView, String)> {
        let (vault_record, _) = self.access(principal, vault)?;
        let created_by = match principal {
            Principal::Agent { name, .. } => Proposer::Agent { name: name.clone() },
            Principal::User { email, .. } => Proposer::User {
                email: email.clone(),
            },
        };
        let existing = self.credential_keys(&vault_record.id)?;
        let input = expand_catalog(input, &existing)?;
        validate_proposal(&input, &self.validation_options())?;
        check_references(&input, &existing, vault)?;

        let token = new_token(APPROVAL_PREFIX);
        let link_sha256 = sha256_hex(token.as_bytes());
        let now = self.now_secs();
        let vault_id = vault_record.id.as_str();
        let services: Vec<ServiceChange> = input
            .services
            .iter()
            .map(|change| match change.action {
                ProposalAction::Set => ServiceChange {
                    enabled: Some(change.enabled.unwrap_or(true)),
                    upstream_tls: Some(change.upstream_tls.unwrap_or(true)),
                    ..change.clone()
                },
                ProposalAction::Delete => change.clone(),
            })
            .collect();
        let non_empty = |text: &Option<String>| text.clone().filter(|t| !t.is_empty());
        // Held across the transaction: rotation cannot swap the key under us.
        let data_key = self.data_key();
        let record = self.write(|tx| {
            ensure_vault_unchanged(tx, vault, vault_id)?;
            let mut pending = live_pending(tx, vault_id, now)?;
            if pending.len() >= MAX_PENDING {
                return abort(Error::TooMany(
                    "too_many_proposals",
                    format!(
                        "vault \"{vault}\" already has {MAX_PENDING} pending proposals; wait until a human reviews them"
                    ),
                ));
            }
            let seq_key = meta_key(META_SEQ, vault_id);
            let id = tx
                .meta
                .get(&seq_key)?
                .and_then(|raw| <[u8; 8]>::try_from(raw.as_ref()).ok())
                .map(u64::from_be_bytes)
                .unwrap_or(0)
                + 1;
            let credentials = input
                .credentials
                .iter()
                .map(|slot| StoredSlot {
                    action: slot.action,
                    key: slot.key.clone(),
                    description: non_empty(&slot.description),
                    obtain: non_empty(&slot.obtain),
                    obtain_instructions: non_empty(&slot.obtain_instructions),
                    agent_value: slot.value.is_some(),
                    sealed: slot
                        .value
                        .as_ref()
                        .map(|value| seal_value(&data_key, vault_id, id, &slot.key, value.expose())),
                })
                .collect();
            let record = ProposalRecord {
                id,
                vault_id: vault_id.to_string(),
                vault: vault.to_string(),
                status: ProposalStatus::Pending,
                created_by: created_by.clone(),
                created_at: now,
                expires_at: now + PROPOSAL_TTL_SECS,
                link_sha256: link_sha256.clone(),
                link_expires_at: now + LINK_TTL_SECS,
                services: services.clone(),
                credentials,
                message: non_empty(&input.message),
                user_message: non_empty(&input.user_message),
                review: None,
            };
            let key = proposal_key(vault_id, id);
            put_json(tx.proposals, &key, &record)?;
            tx.proposal_links.insert(link_sha256.as_bytes(), key)?;
            tx.meta.insert(seq_key, id.to_be_bytes())?;
            pending.push(id);
            write_pending(tx, vault_id, &pending)?;
            Ok(record)
        })?;
        drop(data_key);
        Ok((record.view(), token))
    }

    /// One proposal. Agents see only their own (others answer 404).
    pub fn get_proposal(
        &self,
        principal: &Principal,
        vault: &str,
        id: u64,
    ) -> Result<ProposalView> {
        let (vault_record, _) = self.access(principal, vault)?;
        let record = self
            .read_proposal(&vault_record.id, id)?
            .filter(|record| record.visible_to(principal))
            .ok_or_else(|| proposal_not_found(id, vault))?;
        Ok(self.expire_if_due(record)?.view())
    }

    /// The values the agent supplied in pending proposal `id`, opened, so that a member
    /// or admin of the vault can confirm them before approving (the seed: "you review
    /// the proposal and confirm the value is correct before it is stored"). Never for
    /// an agent, its own proposal included: no agent token reads a stored value back.
    /// A decided or expired proposal holds no value any more: the map is empty.
    pub fn reveal_proposal_values(
        &self,
        principal: &Principal,
        vault: &str,
        id: u64,
    ) -> Result<BTreeMap<String, Secret>> {
        reviewer(principal)?;
        let (vault_record, access) = self.access(principal, vault)?;
        access.require_member()?;
        let record = self
            .read_proposal(&vault_record.id, id)?
            .ok_or_else(|| proposal_not_found(id, vault))?;
        let record = self.expire_if_due(record)?;
        let first = std::cell::Cell::new(Some(record));
        self.open_with_data_key(|data_key| {
            // A second try reads again: the rotation elsewhere that made the first
            // fail re-sealed the agent's values.
            let record = match first.take() {
                Some(record) => record,
                None => self
                    .read_proposal(&vault_record.id, id)?
                    .ok_or_else(|| proposal_not_found(id, vault))?,
            };
            let mut values = BTreeMap::new();
            for slot in &record.credentials {
                if let Some(sealed) = &slot.sealed {
                    let value = open_value(data_key, &record.vault_id, id, &slot.key, sealed)?;
                    values.insert(slot.key.clone(), value);
                }
            }
            Ok(values)
        })
    }

    /// The vault's proposals by id (agents: their own), optionally of one status.
    pub fn list_proposals(
        &self,
        principal: &Principal,
        vault: &str,
        status: Option<ProposalStatus>,
    ) -> Result<Vec<ProposalView>> {
        let (vault_record, _) = self.access(principal, vault)?;
        let mut views = Vec::new();
        for (_, record) in
            scan_json::<ProposalRecord>(&self.trees.proposals, vault_prefix(&vault_record.id))?
        {
            if !record.visible_to(principal) {
                continue;
            }
            let record = self.expire_if_due(record)?;
            if status.is_none_or(|wanted| wanted == record.status) {
                views.push(record.view());
            }
        }
        Ok(views)
    }

    /// What an approval link shows: the vault's name and the proposal. Anything wrong
    /// (unknown or mistyped token, another proposal's token, a link older than 24 h,
    /// a deleted vault) is the same 404 `invalid_link`.
    pub fn proposal_by_link(&self, id: u64, token: &str) -> Result<(String, ProposalView)> {
        let hash = sha256_hex(token.as_bytes());
        let Some(key) = self.trees.proposal_links.get(hash.as_bytes())? else {
            return Err(invalid_link());
        };
        let Some(record) = read_json::<ProposalRecord>(&self.trees.proposals, &key)? else {
            return Err(invalid_link());
        };
        let hash_matches: bool =
            subtle::ConstantTimeEq::ct_eq(record.link_sha256.as_bytes(), hash.as_bytes()).into();
        if !hash_matches
            || record.id != id
            || !token.starts_with(APPROVAL_PREFIX)
            || self.now_secs() >= record.link_expires_at
        {
            return Err(invalid_link());
        }
        match self.vault(&record.vault)? {
            Some(vault) if vault.id == record.vault_id => {}
            _ => return Err(invalid_link()),
        }
        let record = self.expire_if_due(record)?;
        Ok((record.vault.clone(), record.view()))
    }

    /// Applies a pending proposal: every service merge, credential set and delete and
    /// the status change in one transaction. Each set slot takes its value from
    /// `values`, else (with `accept_agent_values`) the agent's. Every warning of the
    /// proposal's [`diff`](Store::proposal_diff) must be in `acknowledged`.
    pub fn approve_proposal(
        &self,
        principal: &Principal,
        vault: &str,
        id: u64,
        approval: Approval,
    ) -> Result<ProposalView> {
        let Approval {
            values,
            accept_agent_values,
            ..
        } = &approval;
        let by = reviewer(principal)?;
        let (vault_record, access) = self.access(principal, vault)?;
        // Members and admins decide proposals (agents were refused by `reviewer`).
        access.require_member()?;
        let vault_id = vault_record.id.as_str();
        let record = self
            .read_proposal(vault_id, id)?
            .ok_or_else(|| proposal_not_found(id, vault))?;
        let record = self.expire_if_due(record)?;
        if record.status != ProposalStatus::Pending {
            return Err(not_pending(&record));
        }
        // Only admins manage services, directly or through a proposal (a member could
        // otherwise propose and approve a service change itself).
        if !record.services.is_empty() && access != Access::Admin {
            return Err(Error::forbidden(format!(
                "proposal {id} changes services, which needs the admin role on vault \"{vault}\"; \
                 members can approve proposals that only set credentials"
            )));
        }
        // Keys whose agent-supplied value this approval takes.
        let agent_keys: BTreeSet<String> = record
            .credentials
            .iter()
            .filter(|slot| {
                slot.action == ProposalAction::Set
                    && slot.sealed.is_some()
                    && *accept_agent_values
                    && !values.contains_key(&slot.key)
            })
            .map(|slot| slot.key.clone())
            .collect();
        for (key, value) in values {
            let wanted = record
                .credentials
                .iter()
                .any(|slot| slot.action == ProposalAction::Set && slot.key == *key);
            if !wanted {
                return Err(Error::bad_request(
                    "invalid_request",
                    format!("proposal {id} has no credential slot {key} to set"),
                ));
            }
            validate_entry(key, value.expose())?;
        }

        let now = self.now_secs();
        // Held from opening the agent's values to storing the sealed credentials.
        let data_key = self.data_key();
        let mut sealed: BTreeMap<String, CredentialRecord> = BTreeMap::new();
        for slot in record
            .credentials
            .iter()
            .filter(|slot| slot.action == ProposalAction::Set)
        {
            let value = match (values.get(&slot.key), &slot.sealed) {
                (Some(value), _) => value.clone(),
                (None, Some(agent)) if *accept_agent_values => {
                    open_value(&data_key, vault_id, id, &slot.key, agent)?
                }
                (None, agent) => {
                    let hint = if agent.is_some() {
                        " (the agent supplied one: accept it with accept_agent_values, or give your own)"
                    } else {
                        ""
                    };
                    return Err(Error::bad_request(
                        "value_required",
                        format!("credential {} needs a value{hint}", slot.key),
                    ));
                }
            };
            sealed.insert(
                slot.key.clone(),
                seal_record(&data_key, vault_id, &slot.key, value.expose(), now),
            );
        }
        let set_keys: Vec<String> = sealed.keys().cloned().collect();
        let options = self.validation_options();
        let key = proposal_key(vault_id, id);
        let outcome = self.write_published(|tx| {
            let mut current = match load_pending(tx, (vault, vault_id), id, now)? {
                Ok(current) => current,
                Err(expired) => return Ok(Err(expired)),
            };

            let before = read_services_tx(tx, vault_id)?;
            // What is acknowledged must be what is applied: the diff again, against
            // the vault as this transaction sees it.
            let mut held = BTreeSet::new();
            for slot in &current.credentials {
                if tx
                    .credentials
                    .get(vault_key(vault_id, &slot.key))?
                    .is_some()
                {
                    held.insert(slot.key.clone());
                }
            }
            for change in current.services.iter().filter_map(ServiceChange::service) {
                for referenced in change.credential_keys() {
                    if tx
                        .credentials
                        .get(vault_key(vault_id, &referenced))?
                        .is_some()
                    {
                        held.insert(referenced);
                    }
                }
            }
            let view = current.view();
            let diff = diff::diff(&view.services, &view.credentials, &before, |k| {
                held.contains(k)
            });
            let missing: Vec<&diff::Warning> = diff
                .required(&agent_keys)
                .filter(|w| !approval.acknowledged.contains(&w.id))
                .collect();
            if !missing.is_empty() {
                return abort(unacknowledged(id, &missing));
            }
            let mut services = before;
            let set_services = match merge_services(&mut services, &current.services, vault) {
                Ok(set) => set,
                Err(reason) => return abort(apply_failed(id, reason)),
            };
            if let Err(e) = validate_services(&services, &options) {
                return abort(apply_failed(id, e));
            }

            for slot in &current.credentials {
                if slot.action == ProposalAction::Delete
                    && tx
                        .credentials
                        .remove(vault_key(vault_id, &slot.key))?
                        .is_none()
                {
                    return abort(apply_failed(
                        id,
                        format!("credential {} is not in vault \"{vault}\"", slot.key),
                    ));
                }
            }
            put_credentials(tx, vault_id, &sealed)?;
            as_apply_failure(
                id,
                check_keys_exist(tx, vault_id, vault, &set_services, &set_keys),
            )?;
            put_json(tx.services, vault_id, &services)?;

            current.decide(
                ProposalStatus::Applied,
                Some(Review {
                    by: by.clone(),
                    at: now,
                    reason: None,
                }),
            );
            put_json(tx.proposals, &key, &current)?;
            remove_pending(tx, vault_id, id)?;
            Ok(Ok(current))
        })?;
        drop(data_key);
        Ok(outcome?.view())
    }

    /// Rejects a pending proposal, with an optional reason the agent can read.
    pub fn reject_proposal(
        &self,
        principal: &Principal,
        vault: &str,
        id: u64,
        reason: Option<String>,
    ) -> Result<ProposalView> {
        let by = reviewer(principal)?;
        let (vault_record, access) = self.access(principal, vault)?;
        // Members and admins decide proposals (agents were refused by `reviewer`).
        access.require_member()?;
        let reason = reason
            .map(|r| r.trim().to_string())
            .filter(|r| !r.is_empty());
        if let Some(reason) = &reason {
            if reason.chars().count() > MAX_REASON {
                return Err(Error::bad_request(
                    "invalid_request",
                    format!("the reason is longer than {MAX_REASON} characters"),
                ));
            }
        }
        let vault_id = vault_record.id.as_str();
        let key = proposal_key(vault_id, id);
        let now = self.now_secs();
        let outcome = self.write(|tx| {
            let mut current = match load_pending(tx, (vault, vault_id), id, now)? {
                Ok(current) => current,
                Err(expired) => return Ok(Err(expired)),
            };
            current.decide(
                ProposalStatus::Rejected,
                Some(Review {
                    by: by.clone(),
                    at: now,
                    reason: reason.clone(),
                }),
            );
            put_json(tx.proposals, &key, &current)?;
            remove_pending(tx, vault_id, id)?;
            Ok(Ok(current))
        })?;
        Ok(outcome?.view())
    }
}

/// How a human approves: values for the set slots, whether the agent's own values are
/// accepted where it supplied them, and the warnings of the proposal's diff they have
/// seen and acknowledge (by id).
#[derive(Debug, Default)]
pub struct Approval {
    pub values: BTreeMap<String, Secret>,
    pub accept_agent_values: bool,
    pub acknowledged: BTreeSet<String>,
}

impl Approval {
    /// Values and the agent-values choice, acknowledging no warning.
    pub fn new(values: BTreeMap<String, Secret>, accept_agent_values: bool) -> Approval {
        Approval {
            values,
            accept_agent_values,
            acknowledged: BTreeSet::new(),
        }
    }
}

/// 409: the approval did not acknowledge every warning of the proposal's diff.
fn unacknowledged(id: u64, warnings: &[&diff::Warning]) -> Error {
    let listed: Vec<String> = warnings
        .iter()
        .map(|w| format!("[{}] {}", w.id, w.message))
        .collect();
    Error::conflict(
        "warnings_not_acknowledged",
        format!(
            "proposal {id} was not applied: acknowledge each warning to approve it: {}",
            listed.join("; ")
        ),
    )
}

/// Inside the transaction that decides proposal `id` of `vault` (name, id): the
/// proposal, if it is still pending. One past its expiry is stored as expired in this
/// transaction and comes back as `Err(not_pending)`, so the caller commits the expiry
/// and answers 409; a missing, decided or moved one aborts the transaction.
fn load_pending(
    tx: &Tx,
    (vault, vault_id): (&str, &str),
    id: u64,
    now: i64,
) -> TxResult<std::result::Result<ProposalRecord, Error>> {
    ensure_vault_unchanged(tx, vault, vault_id)?;
    let key = proposal_key(vault_id, id);
    let Some(mut current) = get_json::<ProposalRecord>(tx.proposals, &key)? else {
        return abort(proposal_not_found(id, vault));
    };
    if current.is_due(now) {
        current.decide(ProposalStatus::Expired, None);
        put_json(tx.proposals, &key, &current)?;
        remove_pending(tx, vault_id, id)?;
        return Ok(Err(not_pending(&current)));
    }
    if current.status != ProposalStatus::Pending {
        return abort(not_pending(&current));
    }
    Ok(Ok(current))
}

#[cfg(test)]
mod properties;
#[cfg(test)]
mod tests;
