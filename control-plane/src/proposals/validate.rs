//! Every rule of a proposal that needs no store: counts, lengths, key and name
//! formats, duplicates, what set and delete entries carry, each set service's own
//! validity, and whether the keys services reference exist.

use std::collections::BTreeSet;

use agent_vault_rules::{validate_credential_key, validate_service_name, ValidationOptions};

use super::{ProposalAction, ProposalInput, ServiceChange};
use crate::credentials::validate_entry;
use crate::error::{Error, Result};

/// Most service changes in one proposal.
pub const MAX_SERVICES: usize = 10;
/// Most credential slots in one proposal.
pub const MAX_SLOTS: usize = 10;
pub const MAX_DESCRIPTION: usize = 500;
pub const MAX_OBTAIN: usize = 500;
pub const MAX_INSTRUCTIONS: usize = 1000;
pub const MAX_MESSAGE: usize = 2000;
pub const MAX_USER_MESSAGE: usize = 5000;

fn invalid(message: impl Into<String>) -> Error {
    Error::bad_request("invalid_proposal", message)
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
                    || change.upstream_h2c.is_some()
                    || change.methods.is_some()
                    || change.rate_limit.is_some()
                    || change.substitutions.is_some()
                    || change.redact_responses.is_some()
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
pub(super) fn check_references(
    input: &ProposalInput,
    existing: &BTreeSet<String>,
    vault: &str,
) -> Result<()> {
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
        for key in service.credential_keys() {
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
