//! The life of a vault: opening the store with its `default` vault, creating, listing,
//! changing the unmatched-host policy, deleting. Deleting a vault cascades to
//! everything in it (credentials, services, members, proposals, agents' grants), so
//! this is the one concept module that knows every other; who may do what is decided
//! in [`crate::access`].

use std::path::Path;

use agent_vault_rules::validate_vault_name;
use agent_vault_rules::UnmatchedHostPolicy;
use serde::Serialize;

use crate::access::{
    put_member, vault_not_found, Principal, VaultRecord, VaultRole, DEFAULT_VAULT,
};
use crate::clock::SharedClock;
use crate::error::{Error, Result};
use crate::store::{
    abort, get_json, put_json, scan_json, vault_prefix, OpenError, Store, Tx, TxResult,
};

#[derive(Debug, Clone, Serialize)]
pub struct VaultView {
    pub name: String,
    pub role: &'static str,
    pub unmatched_host_policy: UnmatchedHostPolicy,
}

impl Store {
    /// Opens (or creates) the store in `data_dir` (see [`Store::open_storage`]) and
    /// makes sure the `default` vault exists.
    pub fn open(
        data_dir: &Path,
        password: Option<&str>,
        clock: SharedClock,
        allow_private_upstreams: bool,
    ) -> std::result::Result<Store, OpenError> {
        let store = Store::open_storage(data_dir, password, clock, allow_private_upstreams)?;
        store
            .ensure_default_vault()
            .map_err(|e| OpenError::Corrupt(e.to_string()))?;
        Ok(store)
    }

    fn ensure_default_vault(&self) -> Result<()> {
        if self.trees.vaults.contains_key(DEFAULT_VAULT)? {
            return Ok(());
        }
        let record = self.new_vault_record(DEFAULT_VAULT);
        self.write_published(|tx| {
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
        self.write_published(|tx| {
            if tx.vaults.get(name)?.is_some() {
                return abort(Error::conflict(
                    "vault_exists",
                    format!("vault \"{name}\" already exists"),
                ));
            }
            put_json(tx.vaults, name, &record)?;
            put_member(tx, &record.id, email, VaultRole::Admin)?;
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
        let record = self.write_published(|tx| {
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
        self.write_published(|tx| {
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
