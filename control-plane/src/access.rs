//! Who may act on which vault (DESIGN.md §5, Roles): the principals that ask (users
//! and agents), the vault records they ask about, the per-vault roles of users (the
//! `members` tree) and the one place access is decided, [`Store::access`]: the owner
//! is admin of every vault, users have a per-vault role, agents have grants. A vault
//! the caller cannot see answers 404, so names do not leak.
//!
//! Every concept module (credentials, services, agents, proposals, logs, users)
//! builds on this one; it builds only on the store.

use agent_vault_rules::{Grant, RateLimit, UnmatchedHostPolicy};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::store::{abort, get_json, read_json, vault_key, Store, Tx, TxResult};

pub const DEFAULT_VAULT: &str = "default";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VaultRecord {
    /// Random id: the AAD of credentials and the prefix of per-vault keys, so a vault
    /// deleted and created again under the same name shares nothing with the old one.
    pub id: String,
    pub name: String,
    pub unmatched_host_policy: UnmatchedHostPolicy,
    /// Hosts whose HTTPS tunnels are not decrypted (certificate-pinning clients);
    /// empty by default, and in records written before it existed.
    #[serde(default)]
    pub passthrough_hosts: Vec<String>,
    /// Per agent, over all the vault's services; none by default, and in records
    /// written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    pub created_at: i64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum VaultRole {
    Member,
    Admin,
}

impl VaultRole {
    pub fn as_str(self) -> &'static str {
        match self {
            VaultRole::Member => "member",
            VaultRole::Admin => "admin",
        }
    }
}

/// Who is asking.
#[derive(Debug, Clone)]
pub enum Principal {
    User { email: String, owner: bool },
    Agent { name: String, grants: Vec<Grant> },
}

/// What the principal may do on one vault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Agent,
    Member,
    Admin,
}

impl Access {
    /// Reading and writing credential values: members and admins, never agents.
    pub fn require_member(self) -> Result<()> {
        match self {
            Access::Member | Access::Admin => Ok(()),
            Access::Agent => Err(Error::forbidden(
                "agents cannot read or change credential values; only vault members and admins can",
            )),
        }
    }

    pub fn require_admin(self) -> Result<()> {
        match self {
            Access::Admin => Ok(()),
            Access::Member => Err(Error::forbidden("this needs the admin role on the vault")),
            Access::Agent => Err(Error::forbidden("agents cannot manage vaults")),
        }
    }

    pub fn role_name(self) -> &'static str {
        match self {
            Access::Agent => "proxy",
            Access::Member => "member",
            Access::Admin => "admin",
        }
    }
}

pub(crate) fn vault_not_found(name: &str) -> Error {
    Error::not_found("vault_not_found", format!("vault \"{name}\" not found"))
}

pub(crate) fn put_member(tx: &Tx, vault_id: &str, email: &str, role: VaultRole) -> TxResult<()> {
    tx.members
        .insert(vault_key(vault_id, email), role.as_str().as_bytes())?;
    Ok(())
}

pub(crate) fn parse_role(raw: &[u8]) -> Option<VaultRole> {
    match raw {
        b"admin" => Some(VaultRole::Admin),
        b"member" => Some(VaultRole::Member),
        _ => None,
    }
}

/// Aborts when the vault was deleted (or deleted and re-created) since it was read.
pub(crate) fn ensure_vault_unchanged(tx: &Tx, vault: &str, vault_id: &str) -> TxResult<()> {
    match get_json::<VaultRecord>(tx.vaults, vault)? {
        Some(record) if record.id == vault_id => Ok(()),
        _ => abort(vault_not_found(vault)),
    }
}

impl Store {
    pub fn vault(&self, name: &str) -> Result<Option<VaultRecord>> {
        read_json(&self.trees.vaults, name)
    }

    /// The vault and what `principal` may do on it; 404 when it cannot see it.
    pub fn access(&self, principal: &Principal, name: &str) -> Result<(VaultRecord, Access)> {
        let vault = self.vault(name)?.ok_or_else(|| vault_not_found(name))?;
        let access = match principal {
            Principal::User { owner: true, .. } => Some(Access::Admin),
            Principal::User { email, .. } => {
                self.member_role(&vault.id, email)?.map(|role| match role {
                    VaultRole::Admin => Access::Admin,
                    VaultRole::Member => Access::Member,
                })
            }
            Principal::Agent { grants, .. } => grants
                .iter()
                .any(|grant| grant.vault == name)
                .then_some(Access::Agent),
        };
        access
            .map(|a| (vault, a))
            .ok_or_else(|| vault_not_found(name))
    }

    pub(crate) fn member_role(&self, vault_id: &str, email: &str) -> Result<Option<VaultRole>> {
        Ok(self
            .trees
            .members
            .get(vault_key(vault_id, email))?
            .and_then(|raw| parse_role(&raw)))
    }

    pub fn is_admin_of(&self, principal: &Principal, vault: &str) -> bool {
        matches!(self.access(principal, vault), Ok((_, Access::Admin)))
    }
}
