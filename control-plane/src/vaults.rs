//! Vaults, who may act on them, and the principals (users and agents) that ask.
//!
//! Access is decided in one place, [`Store::access`]: the owner is admin of every
//! vault, users have a per-vault role, agents have grants. A vault the caller cannot
//! see answers 404, so names do not leak.

use agent_vault_rules::{validate_vault_name, Grant, UnmatchedHostPolicy};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::store::{
    abort, get_json, put_json, read_json, scan_json, vault_prefix, Store, Tx, TxResult,
};

pub const DEFAULT_VAULT: &str = "default";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VaultRecord {
    /// Random id: the AAD of credentials and the prefix of per-vault keys, so a vault
    /// deleted and created again under the same name shares nothing with the old one.
    pub id: String,
    pub name: String,
    pub unmatched_host_policy: UnmatchedHostPolicy,
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

#[derive(Debug, Clone, Serialize)]
pub struct VaultView {
    pub name: String,
    pub role: &'static str,
    pub unmatched_host_policy: UnmatchedHostPolicy,
}

pub(crate) fn vault_not_found(name: &str) -> Error {
    Error::not_found("vault_not_found", format!("vault \"{name}\" not found"))
}

impl Store {
    pub(crate) fn ensure_default_vault(&self) -> Result<()> {
        if self.trees.vaults.contains_key(DEFAULT_VAULT)? {
            return Ok(());
        }
        let record = self.new_vault_record(DEFAULT_VAULT);
        self.write_rules(|tx| {
            if tx.vaults.get(DEFAULT_VAULT)?.is_none() {
                put_json(tx.vaults, DEFAULT_VAULT, &record)?;
            }
            Ok(())
        })
    }

    fn new_vault_record(&self, name: &str) -> VaultRecord {
        VaultRecord {
            id: crate::crypto::new_token("v_")[..26].to_string(),
            name: name.to_string(),
            unmatched_host_policy: UnmatchedHostPolicy::Deny,
            created_at: self.now_secs(),
        }
    }

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

    pub fn list_vaults(&self, principal: &Principal) -> Result<Vec<VaultView>> {
        let mut views = Vec::new();
        for (_, vault) in scan_json::<VaultRecord>(&self.trees.vaults, b"")? {
            if let Ok((vault, access)) = self.access(principal, &vault.name) {
                views.push(VaultView {
                    name: vault.name,
                    role: access.role_name(),
                    unmatched_host_policy: vault.unmatched_host_policy,
                });
            }
        }
        Ok(views)
    }

    pub fn create_vault(&self, principal: &Principal, name: &str) -> Result<VaultView> {
        let Principal::User { email, .. } = principal else {
            return Err(Error::forbidden("agents cannot create vaults"));
        };
        validate_vault_name(name)?;
        let record = self.new_vault_record(name);
        self.write_rules(|tx| {
            if tx.vaults.get(name)?.is_some() {
                return abort(Error::conflict(
                    "vault_exists",
                    format!("vault \"{name}\" already exists"),
                ));
            }
            put_json(tx.vaults, name, &record)?;
            crate::users::put_member(tx, &record.id, email, VaultRole::Admin)?;
            Ok(())
        })?;
        Ok(VaultView {
            name: name.to_string(),
            role: "admin",
            unmatched_host_policy: UnmatchedHostPolicy::Deny,
        })
    }

    pub fn update_vault_policy(
        &self,
        principal: &Principal,
        name: &str,
        policy: UnmatchedHostPolicy,
    ) -> Result<VaultView> {
        let (_, access) = self.access(principal, name)?;
        access.require_admin()?;
        let record = self.write_rules(|tx| {
            let Some(mut record) = get_json::<VaultRecord>(tx.vaults, name)? else {
                return abort(vault_not_found(name));
            };
            record.unmatched_host_policy = policy;
            put_json(tx.vaults, name, &record)?;
            Ok(record)
        })?;
        Ok(VaultView {
            name: record.name,
            role: access.role_name(),
            unmatched_host_policy: record.unmatched_host_policy,
        })
    }

    /// Deletes a vault with its credentials, services, members, proposals and agent
    /// grants.
    pub fn delete_vault(&self, principal: &Principal, name: &str) -> Result<()> {
        let (vault, access) = self.access(principal, name)?;
        access.require_admin()?;
        if name == DEFAULT_VAULT {
            return Err(Error::bad_request(
                "cannot_delete_default",
                "the default vault cannot be deleted",
            ));
        }
        let prefix = vault_prefix(&vault.id);
        let per_vault_keys = |tree: &sled::Tree| -> Result<Vec<sled::IVec>> {
            tree.scan_prefix(&prefix)
                .keys()
                .collect::<Result<Vec<_>, _>>()
                .map_err(Error::from)
        };
        let credential_keys = per_vault_keys(&self.trees.credentials)?;
        let member_keys = per_vault_keys(&self.trees.members)?;
        let proposal_keys = per_vault_keys(&self.trees.proposals)?;
        let link_keys = self.proposal_link_keys(&vault.id)?;
        let agents = self.agents_with_grant(name)?;
        self.write_rules(|tx| {
            tx.vaults.remove(name)?;
            tx.services.remove(vault.id.as_bytes())?;
            for key in credential_keys.iter() {
                tx.credentials.remove(key)?;
            }
            for key in member_keys.iter() {
                tx.members.remove(key)?;
            }
            for key in proposal_keys.iter() {
                tx.proposals.remove(key)?;
            }
            for key in link_keys.iter() {
                tx.proposal_links.remove(key.as_slice())?;
            }
            for key in crate::proposals::proposal_meta_keys(&vault.id) {
                tx.meta.remove(key)?;
            }
            remove_grants(tx, &agents, name)?;
            Ok(())
        })
    }
}

fn remove_grants(tx: &Tx, agents: &[crate::agents::AgentRecord], vault: &str) -> TxResult<()> {
    for agent in agents {
        let mut agent = agent.clone();
        agent.vaults.retain(|grant| grant.vault != vault);
        put_json(tx.agents, &agent.name, &agent)?;
    }
    Ok(())
}
