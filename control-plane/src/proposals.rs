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

use std::collections::{BTreeMap, BTreeSet};

use agent_vault_rules::{
    validate_credential_key, validate_service_name, validate_services, Auth, Service,
    ValidationOptions,
};
use base64::Engine;
use serde::{Deserialize, Serialize};
use sled::transaction::ConflictableTransactionError;

use crate::credentials::{
    ensure_vault_unchanged, put_credentials, seal_record, validate_entry, CredentialRecord, Secret,
};
use crate::crypto::{new_token, proposal_value_aad, sha256_hex, Key};
use crate::error::{Error, Result};
use crate::services::{check_keys_exist, read_services_tx};
use crate::store::{
    abort, get_json, put_json, read_json, scan_json, vault_key, vault_prefix, Store, Tx, TxResult,
};
use crate::vaults::{Access, Principal};

/// A pending proposal expires this long after it was created.
pub const PROPOSAL_TTL_SECS: i64 = 7 * 86_400;
/// An approval link can be used this long after the proposal was created.
pub const LINK_TTL_SECS: i64 = 86_400;
/// Most service changes in one proposal.
pub const MAX_SERVICES: usize = 10;
/// Most credential slots in one proposal.
pub const MAX_SLOTS: usize = 10;
/// Most pending proposals per vault; one more is 429 `too_many_proposals`.
pub const MAX_PENDING: usize = 20;
pub const MAX_DESCRIPTION: usize = 500;
pub const MAX_OBTAIN: usize = 500;
pub const MAX_INSTRUCTIONS: usize = 1000;
pub const MAX_MESSAGE: usize = 2000;
pub const MAX_USER_MESSAGE: usize = 5000;
/// Longest rejection reason.
pub const MAX_REASON: usize = 1000;
/// Prefix of approval tokens (`av_appr_<64 hex>`).
pub const APPROVAL_PREFIX: &str = "av_appr_";

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
        self.status == ProposalStatus::Pending && now >= self.expires_at
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

fn invalid(message: impl Into<String>) -> Error {
    Error::bad_request("invalid_proposal", message)
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

fn reviewer(principal: &Principal) -> Result<String> {
    match principal {
        Principal::User { email, .. } => Ok(email.clone()),
        Principal::Agent { .. } => Err(Error::forbidden(
            "agents cannot approve or reject proposals; a member or admin of the vault must",
        )),
    }
}

fn check_len(what: &str, value: Option<&str>, max: usize) -> Result<()> {
    match value {
        Some(text) if text.chars().count() > max => {
            Err(invalid(format!("{what} is longer than {max} characters")))
        }
        _ => Ok(()),
    }
}

/// An http(s) URL without whitespace or control characters, with a host.
fn valid_obtain_url(url: &str) -> bool {
    let lower = url.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("https://")
        .or_else(|| lower.strip_prefix("http://"));
    let Some(rest) = rest else { return false };
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    !host.is_empty()
        && !url
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '<' | '>' | '\\'))
}

/// Every rule that needs no store: counts, lengths, key and name formats, duplicates,
/// what set and delete entries carry, and each set service's own validity.
pub fn validate_proposal(input: &ProposalInput, options: &ValidationOptions) -> Result<()> {
    if input.services.is_empty() && input.credentials.is_empty() {
        return Err(invalid(
            "a proposal needs at least one service or credential slot",
        ));
    }
    if input.services.len() > MAX_SERVICES {
        return Err(invalid(format!(
            "a proposal holds at most {MAX_SERVICES} services ({} given)",
            input.services.len()
        )));
    }
    if input.credentials.len() > MAX_SLOTS {
        return Err(invalid(format!(
            "a proposal holds at most {MAX_SLOTS} credential slots ({} given)",
            input.credentials.len()
        )));
    }
    check_len("message", input.message.as_deref(), MAX_MESSAGE)?;
    check_len(
        "user_message",
        input.user_message.as_deref(),
        MAX_USER_MESSAGE,
    )?;

    let mut names = BTreeSet::new();
    for change in &input.services {
        let name = &change.name;
        match change.action {
            ProposalAction::Set => {
                let Some(service) = change.service() else {
                    return Err(invalid(format!(
                        "service {name:?}: a set service needs host and auth"
                    )));
                };
                service
                    .validate(options)
                    .map_err(|e| invalid(format!("service {name:?}: {e}")))?;
            }
            ProposalAction::Delete => {
                validate_service_name(name).map_err(|e| invalid(e.to_string()))?;
                if change.host.is_some()
                    || change.auth.is_some()
                    || change.enabled.is_some()
                    || change.upstream_tls.is_some()
                {
                    return Err(invalid(format!(
                        "service {name:?}: a delete service carries only its name"
                    )));
                }
            }
        }
        if !names.insert(name.as_str()) {
            return Err(invalid(format!(
                "service {name:?} appears twice: name each service at most once per proposal"
            )));
        }
    }

    let mut keys = BTreeSet::new();
    for slot in &input.credentials {
        let key = &slot.key;
        validate_credential_key(key).map_err(|e| invalid(e.to_string()))?;
        if !keys.insert(key.as_str()) {
            return Err(invalid(format!(
                "credential {key} appears twice: name each key at most once per proposal"
            )));
        }
        match slot.action {
            ProposalAction::Set => {
                check_len(
                    &format!("the description of {key}"),
                    slot.description.as_deref(),
                    MAX_DESCRIPTION,
                )?;
                if let Some(url) = &slot.obtain {
                    if url.chars().count() > MAX_OBTAIN {
                        return Err(invalid(format!(
                            "the obtain URL of {key} is longer than {MAX_OBTAIN} characters"
                        )));
                    }
                    if !valid_obtain_url(url) {
                        return Err(invalid(format!(
                            "the obtain URL of {key} must be an http:// or https:// URL"
                        )));
                    }
                }
                check_len(
                    &format!("the obtain_instructions of {key}"),
                    slot.obtain_instructions.as_deref(),
                    MAX_INSTRUCTIONS,
                )?;
                if let Some(value) = &slot.value {
                    validate_entry(key, value.expose()).map_err(|e| invalid(e.to_string()))?;
                }
            }
            ProposalAction::Delete => {
                if slot.description.is_some()
                    || slot.obtain.is_some()
                    || slot.obtain_instructions.is_some()
                    || slot.value.is_some()
                {
                    return Err(invalid(format!(
                        "credential {key}: a delete slot carries only its key"
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Every key a set service references is in the vault (`existing`) or a set slot of
/// the proposal, and none is deleted by the same proposal.
fn check_references(input: &ProposalInput, existing: &BTreeSet<String>, vault: &str) -> Result<()> {
    let slots = |action| -> BTreeSet<&str> {
        input
            .credentials
            .iter()
            .filter(|s| s.action == action)
            .map(|s| s.key.as_str())
            .collect()
    };
    let set = slots(ProposalAction::Set);
    let deleted = slots(ProposalAction::Delete);
    for service in input.services.iter().filter_map(ServiceChange::service) {
        for key in service.auth.referenced_keys() {
            if deleted.contains(key.as_str()) {
                return Err(invalid(format!(
                    "service {:?} references credential {key}, which this proposal deletes",
                    service.name
                )));
            }
            if !set.contains(key.as_str()) && !existing.contains(&key) {
                return Err(invalid(format!(
                    "service {:?} references credential {key}, which is neither in vault \"{vault}\" nor a set slot of this proposal",
                    service.name
                )));
            }
        }
    }
    Ok(())
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
pub(crate) fn reseal(tx: &Tx, db_keys: &[sled::IVec], old: &Key, new: &Key) -> TxResult<usize> {
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
        Err(ConflictableTransactionError::Abort(e)) => abort(apply_failed(id, e)),
        other => other,
    }
}

impl Store {
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
        validate_proposal(&input, &self.validation_options())?;
        let existing = self.credential_keys(&vault_record.id)?;
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
            tx.meta.insert(seq_key, &id.to_be_bytes())?;
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
    /// `values`, else (with `accept_agent_values`) the agent's.
    pub fn approve_proposal(
        &self,
        principal: &Principal,
        vault: &str,
        id: u64,
        values: BTreeMap<String, Secret>,
        accept_agent_values: bool,
    ) -> Result<ProposalView> {
        let by = reviewer(principal)?;
        let (vault_record, access) = self.access(principal, vault)?;
        require_reviewer(access)?;
        let vault_id = vault_record.id.as_str();
        let record = self
            .read_proposal(vault_id, id)?
            .ok_or_else(|| proposal_not_found(id, vault))?;
        let record = self.expire_if_due(record)?;
        if record.status != ProposalStatus::Pending {
            return Err(not_pending(&record));
        }
        for (key, value) in &values {
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
                (None, Some(agent)) if accept_agent_values => {
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
        let outcome = self.write_rules(|tx| {
            ensure_vault_unchanged(tx, vault, vault_id)?;
            let Some(mut current) = get_json::<ProposalRecord>(tx.proposals, &key)? else {
                return abort(proposal_not_found(id, vault));
            };
            if current.is_due(now) {
                // Commit the expiry, answer not_pending.
                current.decide(ProposalStatus::Expired, None);
                put_json(tx.proposals, &key, &current)?;
                remove_pending(tx, vault_id, id)?;
                return Ok(Err(not_pending(&current)));
            }
            if current.status != ProposalStatus::Pending {
                return abort(not_pending(&current));
            }

            let mut services = read_services_tx(tx, vault_id)?;
            let mut set_services = Vec::new();
            for change in &current.services {
                match change.action {
                    ProposalAction::Set => {
                        let Some(service) = change.service() else {
                            return abort(apply_failed(
                                id,
                                format!("service {:?} has no host or auth", change.name),
                            ));
                        };
                        match services.iter_mut().find(|s| s.name == service.name) {
                            Some(existing) => *existing = service.clone(),
                            None => services.push(service.clone()),
                        }
                        set_services.push(service);
                    }
                    ProposalAction::Delete => {
                        let before = services.len();
                        services.retain(|s| s.name != change.name);
                        if services.len() == before {
                            return abort(apply_failed(
                                id,
                                format!("service {:?} is not in vault \"{vault}\"", change.name),
                            ));
                        }
                    }
                }
            }
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
        require_reviewer(access)?;
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
            ensure_vault_unchanged(tx, vault, vault_id)?;
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

/// Members and admins decide proposals (agents were refused before).
fn require_reviewer(access: Access) -> Result<()> {
    access.require_member()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::vaults::VaultRole;
    use agent_vault_rules::{Grant, Role};
    use serde_json::{json, Value};
    use std::sync::Arc;

    const T0_MS: i64 = 1_700_000_000_000;

    struct Fixture {
        _dir: tempfile::TempDir,
        store: Store,
        clock: Arc<ManualClock>,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(T0_MS);
        let store = Store::open(dir.path(), None, clock.clone(), false).unwrap();
        // A member (not admin) of `default`.
        let vault_id = store.vault("default").unwrap().unwrap().id;
        store
            .write(|tx| crate::users::put_member(tx, &vault_id, MEMBER, VaultRole::Member))
            .unwrap();
        Fixture {
            _dir: dir,
            store,
            clock,
        }
    }

    const MEMBER: &str = "member@example.com";

    fn owner() -> Principal {
        Principal::User {
            email: "owner@example.com".into(),
            owner: true,
        }
    }

    fn member() -> Principal {
        Principal::User {
            email: MEMBER.into(),
            owner: false,
        }
    }

    fn stranger() -> Principal {
        Principal::User {
            email: "stranger@example.com".into(),
            owner: false,
        }
    }

    fn agent(name: &str) -> Principal {
        Principal::Agent {
            name: name.into(),
            grants: vec![Grant {
                vault: "default".into(),
                role: Role::Proxy,
            }],
        }
    }

    fn input(value: Value) -> ProposalInput {
        serde_json::from_value(value).unwrap_or_else(|e| panic!("{e}"))
    }

    fn propose(f: &Fixture, value: Value) -> Result<(ProposalView, String)> {
        f.store
            .create_proposal(&agent("bot"), "default", input(value))
    }

    fn set_credential(f: &Fixture, key: &str, value: &str) {
        let entries = BTreeMap::from([(key.to_string(), Secret::new(value.to_string()))]);
        f.store
            .set_credentials(&owner(), "default", &entries)
            .unwrap();
    }

    fn credential(f: &Fixture, key: &str) -> Option<String> {
        f.store
            .get_credential(&owner(), "default", key)
            .ok()
            .map(|s| s.expose().to_string())
    }

    fn service_names(f: &Fixture) -> Vec<String> {
        f.store
            .list_services(&owner(), "default")
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect()
    }

    fn values(pairs: &[(&str, &str)]) -> BTreeMap<String, Secret> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Secret::new(v.to_string())))
            .collect()
    }

    fn stripe() -> Value {
        json!({
            "services": [{"action": "set", "name": "stripe", "host": "api.stripe.com",
                          "auth": {"type": "bearer", "token": "STRIPE_KEY"}}],
            "credentials": [{"action": "set", "key": "STRIPE_KEY", "description": "Stripe API key",
                             "obtain": "https://dashboard.stripe.com/apikeys",
                             "obtain_instructions": "Developers > API Keys > Reveal test key"}],
            "message": "Stripe access",
        })
    }

    fn raw_record(f: &Fixture, id: u64) -> ProposalRecord {
        let vault_id = f.store.vault("default").unwrap().unwrap().id;
        f.store.read_proposal(&vault_id, id).unwrap().unwrap()
    }

    /// Every byte stored in every tree, keys and values.
    fn all_stored_bytes(f: &Fixture) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for tree in f.store.trees.all_for_tests() {
            for entry in tree.iter() {
                let (k, v) = entry.unwrap();
                out.push(k.to_vec());
                out.push(v.to_vec());
            }
        }
        out
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn the_seeds_three_examples_are_accepted() {
        let f = fixture();
        let examples = [
            json!({"credentials": [{"action": "set", "key": "STRIPE_KEY", "description": "Stripe API key",
                    "obtain": "https://dashboard.stripe.com/apikeys",
                    "obtain_instructions": "Developers > API Keys > Reveal test key"}]}),
            json!({"credentials": [{"action": "set", "key": "GENERATED_TOKEN",
                    "description": "Token generated during setup", "value": "tok_abc123"}]}),
            json!({"credentials": [{"action": "delete", "key": "OLD_API_KEY"}],
                   "message": "Remove unused API key"}),
        ];
        for (i, example) in examples.into_iter().enumerate() {
            let (view, token) = propose(&f, example).unwrap();
            assert_eq!(view.id, i as u64 + 1, "ids are sequential per vault");
            assert_eq!(view.status, ProposalStatus::Pending);
            assert_eq!(view.agent.as_deref(), Some("bot"));
            assert_eq!(view.expires_at, view.created_at + PROPOSAL_TTL_SECS);
            assert!(token.starts_with(APPROVAL_PREFIX) && token.len() == 8 + 64);
        }
        let second = f.store.get_proposal(&agent("bot"), "default", 2).unwrap();
        assert!(second.credentials[0].has_value);
        let json = serde_json::to_string(&second).unwrap();
        assert!(!json.contains("tok_abc123"), "{json}");
        assert!(json.contains("\"has_value\":true"), "{json}");
        let third = f.store.get_proposal(&owner(), "default", 3).unwrap();
        assert_eq!(third.message.as_deref(), Some("Remove unused API key"));
        assert_eq!(third.credentials[0].action, ProposalAction::Delete);
    }

    #[test]
    fn action_defaults_to_set_and_set_services_get_their_defaults() {
        let f = fixture();
        let (view, _) = propose(
            &f,
            json!({"services": [{"name": "gh", "host": "api.github.com", "auth": {"type": "passthrough"}}]}),
        )
        .unwrap();
        assert_eq!(view.services[0].action, ProposalAction::Set);
        assert_eq!(view.services[0].enabled, Some(true));
        assert_eq!(view.services[0].upstream_tls, Some(true));
    }

    #[test]
    fn unknown_fields_are_refused_by_the_body_type() {
        for bad in [
            json!({"services": [], "extra": 1}),
            json!({"credentials": [{"key": "A", "colour": "red"}]}),
            json!({"services": [{"name": "s", "host": "a.com", "auth": {"type": "passthrough"}, "tls": true}]}),
            json!({"credentials": [{"action": "replace", "key": "A"}]}),
        ] {
            assert!(
                serde_json::from_value::<ProposalInput>(bad.clone()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn every_validation_rule_is_a_400_naming_the_rule_and_stores_nothing() {
        let f = fixture();
        set_credential(&f, "EXISTING", "x");
        let long = |n: usize| "x".repeat(n);
        let svc = |name: &str| {
            json!({"action": "set", "name": name, "host": format!("{name}.example.com"),
                   "auth": {"type": "passthrough"}})
        };
        let slot = |key: &str| json!({"action": "set", "key": key});
        let cases: Vec<(&str, Value, &str)> = vec![
            (
                "empty proposal",
                json!({}),
                "at least one service or credential slot",
            ),
            (
                "empty lists",
                json!({"services": [], "credentials": []}),
                "at least one",
            ),
            (
                "11 services",
                json!({"services": (0..11).map(|i| svc(&format!("s{i}"))).collect::<Vec<_>>()}),
                "at most 10 services",
            ),
            (
                "11 slots",
                json!({"credentials": (0..11).map(|i| slot(&format!("K{i}"))).collect::<Vec<_>>()}),
                "at most 10 credential slots",
            ),
            (
                "description over 500",
                json!({"credentials": [{"key": "A", "description": long(501)}]}),
                "description of A is longer than 500",
            ),
            (
                "obtain not http(s)",
                json!({"credentials": [{"key": "A", "obtain": "javascript:alert(1)"}]}),
                "http:// or https:// URL",
            ),
            (
                "obtain without host",
                json!({"credentials": [{"key": "A", "obtain": "https:///x"}]}),
                "http:// or https:// URL",
            ),
            (
                "obtain with a space",
                json!({"credentials": [{"key": "A", "obtain": "https://a.com/x y"}]}),
                "http:// or https:// URL",
            ),
            (
                "obtain over 500",
                json!({"credentials": [{"key": "A", "obtain": format!("https://a.com/{}", long(490))}]}),
                "obtain URL of A is longer than 500",
            ),
            (
                "instructions over 1000",
                json!({"credentials": [{"key": "A", "obtain_instructions": long(1001)}]}),
                "obtain_instructions of A is longer than 1000",
            ),
            (
                "message over 2000",
                json!({"credentials": [slot("A")], "message": long(2001)}),
                "message is longer than 2000",
            ),
            (
                "user_message over 5000",
                json!({"credentials": [slot("A")], "user_message": long(5001)}),
                "user_message is longer than 5000",
            ),
            (
                "lowercase key",
                json!({"credentials": [slot("stripe_key")]}),
                "invalid credential key",
            ),
            (
                "key starting with a digit",
                json!({"credentials": [slot("1KEY")]}),
                "invalid credential key",
            ),
            (
                "delete slot with a bad key",
                json!({"credentials": [{"action": "delete", "key": "old-key"}]}),
                "invalid credential key",
            ),
            (
                "duplicate keys",
                json!({"credentials": [slot("A"), {"action": "delete", "key": "A"}]}),
                "credential A appears twice",
            ),
            (
                "duplicate service names",
                json!({"services": [svc("s"), {"action": "delete", "name": "s"}]}),
                "service \"s\" appears twice",
            ),
            (
                "reference to a missing key",
                json!({"services": [{"name": "s", "host": "s.example.com",
                                     "auth": {"type": "bearer", "token": "MISSING"}}]}),
                "references credential MISSING, which is neither in vault",
            ),
            (
                "reference to a key the proposal deletes",
                json!({"services": [{"name": "s", "host": "s.example.com",
                                     "auth": {"type": "bearer", "token": "EXISTING"}}],
                       "credentials": [{"action": "delete", "key": "EXISTING"}]}),
                "which this proposal deletes",
            ),
            (
                "reference only in a delete slot is not a set slot",
                json!({"services": [{"name": "s", "host": "s.example.com",
                                     "auth": {"type": "basic", "username": "EXISTING", "password": "NEW"}}],
                       "credentials": [{"action": "delete", "key": "NEW"}]}),
                "which this proposal deletes",
            ),
            (
                "delete slot with a description",
                json!({"credentials": [{"action": "delete", "key": "A", "description": "d"}]}),
                "a delete slot carries only its key",
            ),
            (
                "delete slot with a value",
                json!({"credentials": [{"action": "delete", "key": "A", "value": "v"}]}),
                "a delete slot carries only its key",
            ),
            (
                "delete slot with obtain",
                json!({"credentials": [{"action": "delete", "key": "A", "obtain": "https://a.com"}]}),
                "a delete slot carries only its key",
            ),
            (
                "delete service with a host",
                json!({"services": [{"action": "delete", "name": "s", "host": "s.example.com"}]}),
                "a delete service carries only its name",
            ),
            (
                "delete service with auth",
                json!({"services": [{"action": "delete", "name": "s", "auth": {"type": "passthrough"}}]}),
                "a delete service carries only its name",
            ),
            (
                "set service without auth",
                json!({"services": [{"name": "s", "host": "s.example.com"}]}),
                "a set service needs host and auth",
            ),
            (
                "set service without host",
                json!({"services": [{"name": "s", "auth": {"type": "passthrough"}}]}),
                "a set service needs host and auth",
            ),
            (
                "invalid host",
                json!({"services": [{"name": "s", "host": "https://s.example.com", "auth": {"type": "passthrough"}}]}),
                "invalid host",
            ),
            (
                "private host",
                json!({"services": [{"name": "s", "host": "localhost:8080", "auth": {"type": "passthrough"}}]}),
                "allow-private-upstreams",
            ),
            (
                "invalid service name",
                json!({"services": [{"name": "Stripe", "host": "s.example.com", "auth": {"type": "passthrough"}}]}),
                "invalid service name",
            ),
            (
                "invalid auth",
                json!({"services": [{"name": "s", "host": "s.example.com", "auth": {"type": "bearer", "token": "lower"}}]}),
                "invalid credential key",
            ),
            (
                "empty agent value",
                json!({"credentials": [{"key": "A", "value": ""}]}),
                "value of A is empty",
            ),
            (
                "agent value over 64 KiB",
                json!({"credentials": [{"key": "A", "value": long(64 * 1024 + 1)}]}),
                "larger than",
            ),
        ];
        for (behaviour, body, expected) in cases {
            let err = propose(&f, body).unwrap_err();
            assert_eq!(err.code(), "invalid_proposal", "{behaviour}: {err}");
            assert_eq!(
                err.status(),
                axum::http::StatusCode::BAD_REQUEST,
                "{behaviour}"
            );
            assert!(
                err.to_string().contains(expected),
                "{behaviour}: {err:?} should mention {expected:?}"
            );
        }
        assert!(f
            .store
            .list_proposals(&owner(), "default", None)
            .unwrap()
            .is_empty());
        assert!(f.store.trees.proposals.is_empty());
        assert!(f.store.trees.proposal_links.is_empty());
        // The next valid proposal still gets id 1.
        assert_eq!(propose(&f, stripe()).unwrap().0.id, 1);
    }

    #[test]
    fn limits_are_inclusive() {
        let f = fixture();
        let long = |n: usize| "é".repeat(n);
        let services: Vec<Value> = (0..10)
            .map(|i| json!({"name": format!("s{i}"), "host": format!("s{i}.example.com"), "auth": {"type": "passthrough"}}))
            .collect();
        let mut slots: Vec<Value> = (0..9).map(|i| json!({"key": format!("K{i}")})).collect();
        slots.push(json!({"key": "LAST", "description": long(500),
            "obtain": format!("https://a.com/{}", "x".repeat(486)),
            "obtain_instructions": long(1000), "value": "v"}));
        let (view, _) = propose(
            &f,
            json!({"services": services, "credentials": slots,
                   "message": long(2000), "user_message": long(5000)}),
        )
        .unwrap();
        assert_eq!(view.services.len(), 10);
        assert_eq!(view.credentials.len(), 10);
        // A set service may reference an existing key or a set slot of the proposal.
        set_credential(&f, "EXISTING", "x");
        propose(
            &f,
            json!({"services": [{"name": "b", "host": "b.example.com",
                                 "auth": {"type": "basic", "username": "EXISTING", "password": "NEW"}}],
                   "credentials": [{"key": "NEW"}]}),
        )
        .unwrap();
    }

    #[test]
    fn more_than_20_pending_is_429_and_decided_or_expired_ones_do_not_count() {
        let f = fixture();
        for _ in 0..MAX_PENDING {
            propose(&f, stripe()).unwrap();
        }
        let err = propose(&f, stripe()).unwrap_err();
        assert_eq!(err.code(), "too_many_proposals");
        assert_eq!(err.status(), axum::http::StatusCode::TOO_MANY_REQUESTS);
        // Users count against the same limit.
        assert_eq!(
            f.store
                .create_proposal(&member(), "default", input(stripe()))
                .unwrap_err()
                .code(),
            "too_many_proposals"
        );
        f.store
            .reject_proposal(&member(), "default", 1, None)
            .unwrap();
        assert_eq!(propose(&f, stripe()).unwrap().0.id, 21);
        assert!(propose(&f, stripe()).is_err());
        f.clock.advance_secs(PROPOSAL_TTL_SECS);
        // All 20 pending ones expired: a new one is welcome, and they read as expired.
        assert_eq!(propose(&f, stripe()).unwrap().0.id, 22);
        assert_eq!(
            f.store
                .list_proposals(&owner(), "default", Some(ProposalStatus::Expired))
                .unwrap()
                .len(),
            20
        );
        // Another vault has its own limit and its own ids.
        f.store.create_vault(&owner(), "other").unwrap();
        let (view, _) = f
            .store
            .create_proposal(&owner(), "other", input(stripe()))
            .unwrap();
        assert_eq!(view.id, 1);
    }

    #[test]
    fn agents_see_only_their_own_proposals_and_users_see_all() {
        let f = fixture();
        propose(&f, stripe()).unwrap();
        f.store
            .create_proposal(&agent("other-bot"), "default", input(stripe()))
            .unwrap();
        let (by_user, _) = f
            .store
            .create_proposal(&member(), "default", input(stripe()))
            .unwrap();
        assert_eq!(by_user.agent, None);
        assert_eq!(
            by_user.created_by,
            Proposer::User {
                email: MEMBER.into()
            }
        );
        let mine = f
            .store
            .list_proposals(&agent("bot"), "default", None)
            .unwrap();
        assert_eq!(mine.iter().map(|p| p.id).collect::<Vec<_>>(), vec![1]);
        let err = f
            .store
            .get_proposal(&agent("bot"), "default", 2)
            .unwrap_err();
        assert_eq!(err.code(), "proposal_not_found");
        assert_eq!(
            f.store
                .get_proposal(&agent("bot"), "default", 3)
                .unwrap_err()
                .code(),
            "proposal_not_found"
        );
        assert_eq!(
            f.store
                .list_proposals(&member(), "default", None)
                .unwrap()
                .len(),
            3
        );
        assert_eq!(
            f.store
                .get_proposal(&owner(), "default", 9)
                .unwrap_err()
                .code(),
            "proposal_not_found"
        );
        // A user who is not a member sees no vault at all.
        assert_eq!(
            f.store
                .list_proposals(&stranger(), "default", None)
                .unwrap_err()
                .code(),
            "vault_not_found"
        );
        assert_eq!(
            f.store
                .create_proposal(&stranger(), "default", input(stripe()))
                .unwrap_err()
                .code(),
            "vault_not_found"
        );
    }

    #[test]
    fn agents_can_never_approve_or_reject_not_even_their_own() {
        let f = fixture();
        propose(&f, stripe()).unwrap();
        for who in [agent("bot"), agent("other")] {
            let err = f
                .store
                .approve_proposal(&who, "default", 1, values(&[("STRIPE_KEY", "sk")]), true)
                .unwrap_err();
            assert_eq!(err.status(), axum::http::StatusCode::FORBIDDEN, "{err}");
            let err = f
                .store
                .reject_proposal(&who, "default", 1, None)
                .unwrap_err();
            assert_eq!(err.status(), axum::http::StatusCode::FORBIDDEN, "{err}");
        }
        // An agent of another vault is refused the same way (not 404).
        let elsewhere = Principal::Agent {
            name: "x".into(),
            grants: vec![],
        };
        assert_eq!(
            f.store
                .reject_proposal(&elsewhere, "default", 1, None)
                .unwrap_err()
                .status(),
            axum::http::StatusCode::FORBIDDEN
        );
        assert_eq!(
            f.store.get_proposal(&owner(), "default", 1).unwrap().status,
            ProposalStatus::Pending
        );
        // A non-member user cannot see the vault.
        assert_eq!(
            f.store
                .reject_proposal(&stranger(), "default", 1, None)
                .unwrap_err()
                .code(),
            "vault_not_found"
        );
    }

    #[test]
    fn a_member_approves_and_everything_is_applied() {
        let f = fixture();
        set_credential(&f, "OLD_API_KEY", "old");
        f.store
            .add_service(
                &owner(),
                "default",
                serde_json::from_value(json!({"name": "old-service", "host": "old.example.com",
                    "auth": {"type": "bearer", "token": "OLD_API_KEY"}}))
                .unwrap(),
            )
            .unwrap();
        f.store
            .add_service(
                &owner(),
                "default",
                serde_json::from_value(json!({"name": "stripe", "host": "old.stripe.com",
                    "auth": {"type": "passthrough"}}))
                .unwrap(),
            )
            .unwrap();
        let (view, _) = propose(
            &f,
            json!({
                "services": [
                    {"action": "set", "name": "stripe", "host": "api.stripe.com",
                     "auth": {"type": "bearer", "token": "STRIPE_KEY"}},
                    {"action": "set", "name": "gen", "host": "gen.example.com",
                     "auth": {"type": "api-key", "key": "GENERATED_TOKEN"}},
                    {"action": "delete", "name": "old-service"}
                ],
                "credentials": [
                    {"action": "set", "key": "STRIPE_KEY", "description": "Stripe API key"},
                    {"action": "set", "key": "GENERATED_TOKEN", "value": "tok_abc123"},
                    {"action": "delete", "key": "OLD_API_KEY"}
                ]
            }),
        )
        .unwrap();
        let version = f.store.snapshot_version().unwrap();
        // Values must cover every set slot.
        let err = f
            .store
            .approve_proposal(
                &member(),
                "default",
                view.id,
                values(&[("STRIPE_KEY", "sk")]),
                false,
            )
            .unwrap_err();
        assert_eq!(err.code(), "value_required");
        assert!(err.to_string().contains("GENERATED_TOKEN"), "{err}");
        assert!(err.to_string().contains("accept_agent_values"), "{err}");
        let err = f
            .store
            .approve_proposal(&member(), "default", view.id, BTreeMap::new(), true)
            .unwrap_err();
        assert_eq!(err.code(), "value_required");
        assert!(err.to_string().contains("STRIPE_KEY"), "{err}");
        // A value for a key the proposal does not set is refused.
        let err = f
            .store
            .approve_proposal(
                &member(),
                "default",
                view.id,
                values(&[("STRIPE_KEY", "sk"), ("OTHER", "x")]),
                true,
            )
            .unwrap_err();
        assert_eq!(err.code(), "invalid_request");
        let err = f
            .store
            .approve_proposal(
                &member(),
                "default",
                view.id,
                values(&[("STRIPE_KEY", "")]),
                true,
            )
            .unwrap_err();
        assert_eq!(err.code(), "invalid_value");
        assert_eq!(f.store.snapshot_version().unwrap(), version);

        let applied = f
            .store
            .approve_proposal(
                &member(),
                "default",
                view.id,
                values(&[("STRIPE_KEY", "sk_test_abc123")]),
                true,
            )
            .unwrap();
        assert_eq!(applied.status, ProposalStatus::Applied);
        let review = applied.review.clone().unwrap();
        assert_eq!(review.by, MEMBER);
        assert_eq!(review.reason, None);
        assert_eq!(
            credential(&f, "STRIPE_KEY").as_deref(),
            Some("sk_test_abc123")
        );
        assert_eq!(
            credential(&f, "GENERATED_TOKEN").as_deref(),
            Some("tok_abc123")
        );
        assert_eq!(credential(&f, "OLD_API_KEY"), None);
        // Replaced in place, appended, removed.
        assert_eq!(service_names(&f), vec!["stripe", "gen"]);
        let services = f.store.list_services(&owner(), "default").unwrap();
        assert_eq!(services[0].host, "api.stripe.com");
        assert!(f.store.snapshot_version().unwrap() > version);
        // Decided: the sealed agent value is gone from the record, has_value stays.
        let record = raw_record(&f, view.id);
        assert!(record.credentials.iter().all(|s| s.sealed.is_none()));
        assert!(applied.credentials[1].has_value);
        // Once only.
        let err = f
            .store
            .approve_proposal(
                &member(),
                "default",
                view.id,
                values(&[("STRIPE_KEY", "x")]),
                true,
            )
            .unwrap_err();
        assert_eq!(err.code(), "not_pending");
        assert!(err.to_string().contains("applied"), "{err}");
        let err = f
            .store
            .reject_proposal(&owner(), "default", view.id, None)
            .unwrap_err();
        assert_eq!(err.code(), "not_pending");
        assert_eq!(err.status(), axum::http::StatusCode::CONFLICT);
    }

    #[test]
    fn agent_values_are_used_only_when_accepted_and_can_be_overridden() {
        let f = fixture();
        let body = json!({"credentials": [{"key": "GENERATED_TOKEN", "value": "tok_abc123"}]});
        propose(&f, body.clone()).unwrap();
        propose(&f, body).unwrap();
        f.store
            .approve_proposal(&owner(), "default", 1, BTreeMap::new(), true)
            .unwrap();
        assert_eq!(
            credential(&f, "GENERATED_TOKEN").as_deref(),
            Some("tok_abc123")
        );
        f.store
            .approve_proposal(
                &owner(),
                "default",
                2,
                values(&[("GENERATED_TOKEN", "tok_human")]),
                true,
            )
            .unwrap();
        assert_eq!(
            credential(&f, "GENERATED_TOKEN").as_deref(),
            Some("tok_human")
        );
    }

    #[test]
    fn a_failing_apply_changes_nothing_and_the_proposal_stays_pending() {
        let f = fixture();
        set_credential(&f, "KEEP", "keep-value");
        set_credential(&f, "GONE_LATER", "x");
        f.store
            .add_service(
                &owner(),
                "default",
                serde_json::from_value(json!({"name": "keep", "host": "keep.example.com",
                    "auth": {"type": "bearer", "token": "KEEP"}}))
                .unwrap(),
            )
            .unwrap();
        let (view, _) = propose(
            &f,
            json!({
                "services": [{"name": "new", "host": "new.example.com",
                              "auth": {"type": "bearer", "token": "NEW_KEY"}},
                             {"name": "keep", "host": "changed.example.com",
                              "auth": {"type": "passthrough"}}],
                "credentials": [
                    {"key": "NEW_KEY"},
                    {"action": "set", "key": "KEEP"},
                    {"action": "delete", "key": "GONE_LATER"}
                ]
            }),
        )
        .unwrap();
        // The key to delete disappears before approval: the delete must fail.
        f.store
            .delete_credentials(&owner(), "default", &["GONE_LATER".into()])
            .unwrap();
        let services_before = f.store.list_services(&owner(), "default").unwrap();
        let version = f.store.snapshot_version().unwrap();
        let err = f
            .store
            .approve_proposal(
                &member(),
                "default",
                view.id,
                values(&[("NEW_KEY", "new-value"), ("KEEP", "overwritten")]),
                false,
            )
            .unwrap_err();
        assert_eq!(err.code(), "apply_failed", "{err}");
        assert_eq!(err.status(), axum::http::StatusCode::CONFLICT);
        assert!(err.to_string().contains("GONE_LATER"), "{err}");
        assert_eq!(
            f.store.list_services(&owner(), "default").unwrap(),
            services_before
        );
        assert_eq!(credential(&f, "NEW_KEY"), None);
        assert_eq!(credential(&f, "KEEP").as_deref(), Some("keep-value"));
        assert_eq!(f.store.snapshot_version().unwrap(), version);
        let still = f.store.get_proposal(&owner(), "default", view.id).unwrap();
        assert_eq!(still.status, ProposalStatus::Pending);
        assert_eq!(still.review, None);

        // A delete of a service that is not there fails the same way.
        let (view, _) = propose(
            &f,
            json!({"services": [{"action": "delete", "name": "absent"}],
                   "credentials": [{"key": "OTHER_KEY"}]}),
        )
        .unwrap();
        let err = f
            .store
            .approve_proposal(
                &member(),
                "default",
                view.id,
                values(&[("OTHER_KEY", "v")]),
                false,
            )
            .unwrap_err();
        assert_eq!(err.code(), "apply_failed");
        assert!(err.to_string().contains("absent"), "{err}");
        assert_eq!(credential(&f, "OTHER_KEY"), None);

        // A referenced key deleted after creation fails at apply time.
        let (view, _) = propose(
            &f,
            json!({"services": [{"name": "late", "host": "late.example.com",
                                 "auth": {"type": "bearer", "token": "KEEP"}}]}),
        )
        .unwrap();
        f.store
            .delete_credentials(&owner(), "default", &["KEEP".into()])
            .unwrap();
        let err = f
            .store
            .approve_proposal(&member(), "default", view.id, BTreeMap::new(), false)
            .unwrap_err();
        assert_eq!(err.code(), "apply_failed");
        assert!(err.to_string().contains("KEEP"), "{err}");
        assert!(!service_names(&f).contains(&"late".to_string()));
    }

    #[test]
    fn expiry_is_enforced_on_read_approve_and_reject() {
        let f = fixture();
        propose(&f, stripe()).unwrap();
        propose(&f, stripe()).unwrap();
        propose(&f, stripe()).unwrap();
        f.clock.advance_secs(PROPOSAL_TTL_SECS - 1);
        assert_eq!(
            f.store.get_proposal(&owner(), "default", 1).unwrap().status,
            ProposalStatus::Pending
        );
        f.clock.advance_secs(1);
        // Read: expired, and stored so.
        assert_eq!(raw_record(&f, 1).status, ProposalStatus::Pending);
        let view = f.store.get_proposal(&agent("bot"), "default", 1).unwrap();
        assert_eq!(view.status, ProposalStatus::Expired);
        assert_eq!(raw_record(&f, 1).status, ProposalStatus::Expired);
        // Approve.
        let err = f
            .store
            .approve_proposal(
                &member(),
                "default",
                2,
                values(&[("STRIPE_KEY", "sk")]),
                false,
            )
            .unwrap_err();
        assert_eq!(err.code(), "not_pending");
        assert!(err.to_string().contains("expired"), "{err}");
        assert_eq!(credential(&f, "STRIPE_KEY"), None);
        assert!(service_names(&f).is_empty());
        assert_eq!(raw_record(&f, 2).status, ProposalStatus::Expired);
        // Reject.
        let err = f
            .store
            .reject_proposal(&member(), "default", 3, Some("late".into()))
            .unwrap_err();
        assert_eq!(err.code(), "not_pending");
        assert!(err.to_string().contains("expired"), "{err}");
        let third = f.store.get_proposal(&owner(), "default", 3).unwrap();
        assert_eq!(third.status, ProposalStatus::Expired);
        assert_eq!(third.review, None);
        assert_eq!(
            f.store
                .list_proposals(&owner(), "default", Some(ProposalStatus::Pending))
                .unwrap(),
            vec![]
        );
    }

    #[test]
    fn expiry_inside_the_approval_transaction_is_committed() {
        // Rejection checks expiry inside its transaction only: the expiry is
        // committed even though the rejection is refused.
        let f = fixture();
        propose(&f, stripe()).unwrap();
        f.clock.advance_secs(PROPOSAL_TTL_SECS + 5);
        let err = f
            .store
            .reject_proposal(&owner(), "default", 1, None)
            .unwrap_err();
        assert_eq!(err.code(), "not_pending");
        let vault_id = f.store.vault("default").unwrap().unwrap().id;
        assert_eq!(raw_record(&f, 1).status, ProposalStatus::Expired);
        let pending: Vec<u64> = read_json(&f.store.trees.meta, meta_key(META_PENDING, &vault_id))
            .unwrap()
            .unwrap();
        assert!(pending.is_empty());
    }

    #[test]
    fn rejection_records_who_when_and_why() {
        let f = fixture();
        propose(
            &f,
            json!({"credentials": [{"key": "A", "value": "agent-secret"}]}),
        )
        .unwrap();
        let err = f
            .store
            .reject_proposal(&member(), "default", 1, Some("x".repeat(MAX_REASON + 1)))
            .unwrap_err();
        assert_eq!(err.code(), "invalid_request");
        f.clock.advance_secs(60);
        let rejected = f
            .store
            .reject_proposal(&member(), "default", 1, Some("  not needed  ".into()))
            .unwrap();
        assert_eq!(rejected.status, ProposalStatus::Rejected);
        let expected = Review {
            by: MEMBER.into(),
            at: T0_MS / 1000 + 60,
            reason: Some("not needed".into()),
        };
        assert_eq!(rejected.review.as_ref(), Some(&expected));
        let seen = f.store.get_proposal(&agent("bot"), "default", 1).unwrap();
        assert_eq!(seen.review, Some(expected));
        assert!(raw_record(&f, 1).credentials[0].sealed.is_none());
        assert_eq!(credential(&f, "A"), None);
        assert_eq!(
            f.store
                .list_proposals(&agent("bot"), "default", Some(ProposalStatus::Rejected))
                .unwrap()
                .len(),
            1
        );
        // An empty reason is no reason.
        propose(&f, stripe()).unwrap();
        let rejected = f
            .store
            .reject_proposal(&owner(), "default", 2, Some("   ".into()))
            .unwrap();
        assert_eq!(rejected.review.unwrap().reason, None);
    }

    #[test]
    fn agent_values_are_sealed_and_never_stored_or_returned_in_clear() {
        let f = fixture();
        let secret = "tok_abc123_very_recognisable";
        propose(
            &f,
            json!({"credentials": [{"key": "GENERATED_TOKEN", "value": secret}]}),
        )
        .unwrap();
        for bytes in all_stored_bytes(&f) {
            assert!(!contains(&bytes, secret.as_bytes()), "plaintext stored");
        }
        let record = raw_record(&f, 1);
        let sealed = record.credentials[0].sealed.clone().unwrap();
        let vault_id = record.vault_id.clone();
        // Bound to its proposal and slot.
        let key = f.store.data_key();
        assert_eq!(
            open_value(&key, &vault_id, 1, "GENERATED_TOKEN", &sealed)
                .unwrap()
                .expose(),
            secret
        );
        assert!(open_value(&key, &vault_id, 2, "GENERATED_TOKEN", &sealed).is_err());
        assert!(open_value(&key, &vault_id, 1, "OTHER", &sealed).is_err());
        drop(key);
        for view in [
            f.store.get_proposal(&owner(), "default", 1).unwrap(),
            f.store
                .list_proposals(&agent("bot"), "default", None)
                .unwrap()[0]
                .clone(),
        ] {
            let json = serde_json::to_string(&view).unwrap();
            assert!(!json.contains(secret), "{json}");
            assert!(!json.contains(&sealed), "{json}");
        }
    }

    #[test]
    fn the_approval_link_shows_its_proposal_for_24_hours_and_nothing_else() {
        let f = fixture();
        let (first, token) = propose(&f, stripe()).unwrap();
        let (_, other_token) = propose(&f, stripe()).unwrap();
        let (vault, view) = f.store.proposal_by_link(first.id, &token).unwrap();
        assert_eq!(vault, "default");
        assert_eq!(view, first);
        let wrong: Vec<(u64, String)> = vec![
            (first.id, other_token.clone()),
            (2, token.clone()),
            (99, token.clone()),
            (first.id, format!("{token}x")),
            (first.id, token[..token.len() - 1].to_string()),
            (first.id, new_token(APPROVAL_PREFIX)),
            (first.id, String::new()),
            (
                first.id,
                token.trim_start_matches(APPROVAL_PREFIX).to_string(),
            ),
        ];
        for (id, bad) in &wrong {
            let err = f.store.proposal_by_link(*id, bad).unwrap_err();
            assert_eq!(err.code(), "invalid_link", "{id} {bad}");
            assert_eq!(err.status(), axum::http::StatusCode::NOT_FOUND);
        }
        // The token is stored hashed only.
        for bytes in all_stored_bytes(&f) {
            assert!(!contains(&bytes, token.as_bytes()), "token stored in clear");
        }
        // Still valid after a decision (the page shows the outcome), until 24 h.
        f.store
            .reject_proposal(&owner(), "default", 2, Some("no".into()))
            .unwrap();
        let (_, decided) = f.store.proposal_by_link(2, &other_token).unwrap();
        assert_eq!(decided.status, ProposalStatus::Rejected);
        f.clock.advance_secs(LINK_TTL_SECS - 1);
        assert!(f.store.proposal_by_link(first.id, &token).is_ok());
        f.clock.advance_secs(1);
        let err = f.store.proposal_by_link(first.id, &token).unwrap_err();
        assert_eq!(err.code(), "invalid_link");
        let expired_message = err.to_string();
        let wrong_message = f
            .store
            .proposal_by_link(first.id, &other_token)
            .unwrap_err()
            .to_string();
        assert_eq!(
            expired_message, wrong_message,
            "no hint which part is wrong"
        );
        // The proposal itself is still pending and readable in the vault.
        assert_eq!(
            f.store.get_proposal(&owner(), "default", 1).unwrap().status,
            ProposalStatus::Pending
        );
    }

    #[test]
    fn rotation_keeps_agent_values_readable() {
        let f = fixture();
        set_credential(&f, "EXISTING", "e");
        propose(
            &f,
            json!({"credentials": [{"key": "GENERATED_TOKEN", "value": "tok_abc123"}]}),
        )
        .unwrap();
        let before = raw_record(&f, 1).credentials[0].sealed.clone();
        assert_eq!(
            f.store.rotate_data_key().unwrap(),
            2,
            "one credential, one proposal value"
        );
        let after = raw_record(&f, 1).credentials[0].sealed.clone();
        assert_ne!(before, after, "resealed under the new key");
        f.store
            .approve_proposal(&owner(), "default", 1, BTreeMap::new(), true)
            .unwrap();
        assert_eq!(
            credential(&f, "GENERATED_TOKEN").as_deref(),
            Some("tok_abc123")
        );
        assert_eq!(credential(&f, "EXISTING").as_deref(), Some("e"));
    }

    #[test]
    fn deleting_a_vault_removes_its_proposals_and_links() {
        let f = fixture();
        f.store.create_vault(&owner(), "doomed").unwrap();
        let (view, token) = f
            .store
            .create_proposal(&owner(), "doomed", input(stripe()))
            .unwrap();
        assert!(f.store.proposal_by_link(view.id, &token).is_ok());
        f.store.delete_vault(&owner(), "doomed").unwrap();
        assert!(f.store.trees.proposals.is_empty());
        assert!(f.store.trees.proposal_links.is_empty());
        assert_eq!(
            f.store
                .proposal_by_link(view.id, &token)
                .unwrap_err()
                .code(),
            "invalid_link"
        );
        // Created again: nothing of the old one, ids start over.
        f.store.create_vault(&owner(), "doomed").unwrap();
        assert!(f
            .store
            .list_proposals(&owner(), "doomed", None)
            .unwrap()
            .is_empty());
        let (again, _) = f
            .store
            .create_proposal(&owner(), "doomed", input(stripe()))
            .unwrap();
        assert_eq!(again.id, 1);
    }

    #[test]
    fn status_names_round_trip() {
        for status in [
            ProposalStatus::Pending,
            ProposalStatus::Applied,
            ProposalStatus::Rejected,
            ProposalStatus::Expired,
        ] {
            assert_eq!(status.as_str().parse::<ProposalStatus>().unwrap(), status);
            assert_eq!(
                serde_json::to_value(status).unwrap(),
                Value::String(status.as_str().into())
            );
        }
        assert!("done".parse::<ProposalStatus>().is_err());
    }

    #[test]
    fn approval_urls() {
        assert_eq!(
            approval_url("http://127.0.0.1:14321/", 3, "av_appr_x"),
            "http://127.0.0.1:14321/approve/3?token=av_appr_x"
        );
    }
}
