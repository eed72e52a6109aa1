//! The life of a vault: opening the store with its `default` vault, creating, listing,
//! changing the unmatched-host policy and the passthrough hosts, deleting. Deleting a vault cascades to
//! everything in it (credentials, services, members, proposals, agents' grants), so
//! this is the one concept module that knows every other; who may do what is decided
//! in [`crate::access`].

use std::path::Path;

use agent_vault_rules::{
    parse_passthrough_host, validate_vault_name, HostPattern, RateLimit, UnmatchedHostPolicy,
    MAX_PASSTHROUGH_HOSTS,
};
use serde::Serialize;

use crate::access::{
    put_member, vault_not_found, Principal, VaultRecord, VaultRole, DEFAULT_VAULT,
};
use crate::agents::AgentRecord;
use crate::clock::SharedClock;
use crate::error::{Error, Result};
use crate::services::read_services_tx;
use crate::store::{
    abort, get_json, put_json, scan_json, vault_prefix, OpenError, Store, StoreLocation, Tx,
    TxResult,
};

#[derive(Debug, Clone, Serialize)]
pub struct VaultView {
    pub name: String,
    pub role: &'static str,
    pub unmatched_host_policy: UnmatchedHostPolicy,
    pub passthrough_hosts: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

impl VaultView {
    fn of(record: VaultRecord, role: &'static str) -> VaultView {
        VaultView {
            name: record.name,
            role,
            unmatched_host_policy: record.unmatched_host_policy,
            passthrough_hosts: record.passthrough_hosts,
            rate_limit: record.rate_limit,
        }
    }
}

/// A change of a vault's settings; `None` leaves a setting as it is.
#[derive(Debug, Clone, Default)]
pub struct VaultUpdate {
    pub unmatched_host_policy: Option<UnmatchedHostPolicy>,
    /// The whole new list (empty: none).
    pub passthrough_hosts: Option<Vec<String>>,
    /// `Some(None)` removes the vault's rate limit.
    pub rate_limit: Option<Option<RateLimit>>,
}

impl Store {
    /// Opens (or creates) the store in `data_dir` (see [`Store::open_storage`]), makes
    /// sure the `default` vault exists, and writes this process's local tokens
    /// ([`crate::users`]) into `data_dir`.
    pub fn open(
        data_dir: &Path,
        password: Option<&str>,
        clock: SharedClock,
        allow_private_upstreams: bool,
    ) -> std::result::Result<Store, OpenError> {
        let sled = StoreLocation::Sled(None);
        Store::open_at(&sled, data_dir, password, clock, allow_private_upstreams)
    }

    /// [`Store::open`] with the storage at `location` (`--store`).
    pub fn open_at(
        location: &StoreLocation,
        data_dir: &Path,
        password: Option<&str>,
        clock: SharedClock,
        allow_private_upstreams: bool,
    ) -> std::result::Result<Store, OpenError> {
        let store =
            Store::open_storage(location, data_dir, password, clock, allow_private_upstreams)?;
        store
            .ensure_default_vault()
            .map_err(|e| OpenError::Corrupt(e.to_string()))?;
        store
            .write_local_tokens()
            .map_err(|e| OpenError::LocalTokens(data_dir.to_path_buf(), e.to_string()))?;
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
            passthrough_hosts: Vec::new(),
            rate_limit: None,
            created_at: self.now_secs(),
        }
    }

    pub fn list_vaults(&self, principal: &Principal) -> Result<Vec<VaultView>> {
        let mut views = Vec::new();
        for (_, vault) in scan_json::<VaultRecord>(&self.trees.vaults, b"")? {
            if let Ok((vault, access)) = self.access(principal, &vault.name) {
                views.push(VaultView::of(vault, access.role_name()));
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
        Ok(VaultView::of(record, "admin"))
    }

    pub fn update_vault_policy(
        &self,
        principal: &Principal,
        name: &str,
        policy: UnmatchedHostPolicy,
    ) -> Result<VaultView> {
        self.update_vault(
            principal,
            name,
            VaultUpdate {
                unmatched_host_policy: Some(policy),
                ..VaultUpdate::default()
            },
        )
    }

    /// Changes a vault's settings (admin). Passthrough hosts are validated like
    /// service hosts (no path), deduplicated, at most [`MAX_PASSTHROUGH_HOSTS`], and
    /// refused when a service of the vault that injects a credential could match the
    /// same host: that host's tunnels must be decrypted, or the credential could not be
    /// injected. (Should such a service be added later, the proxy decrypts anyway: a
    /// rule that injects always wins.)
    pub fn update_vault(
        &self,
        principal: &Principal,
        name: &str,
        update: VaultUpdate,
    ) -> Result<VaultView> {
        let (_, access) = self.access(principal, name)?;
        access.require_admin()?;
        let hosts = update
            .passthrough_hosts
            .map(|hosts| self.validate_passthrough_hosts(hosts))
            .transpose()?;
        if let Some(Some(limit)) = &update.rate_limit {
            limit.validate()?;
        }
        let record = self.write_published(|tx| {
            let Some(mut record) = get_json::<VaultRecord>(tx.vaults, name)? else {
                return abort(vault_not_found(name));
            };
            if let Some(policy) = update.unmatched_host_policy {
                record.unmatched_host_policy = policy;
            }
            if let Some((hosts, patterns)) = &hosts {
                let services = read_services_tx(tx, &record.id)?;
                if let Err(error) = no_injecting_service_overlaps(&services, hosts, patterns) {
                    return abort(error);
                }
                record.passthrough_hosts.clone_from(hosts);
            }
            if let Some(limit) = update.rate_limit {
                record.rate_limit = limit;
            }
            put_json(tx.vaults, name, &record)?;
            Ok(record)
        })?;
        Ok(VaultView::of(record, access.role_name()))
    }

    /// The canonical, deduplicated list and its parsed patterns.
    fn validate_passthrough_hosts(
        &self,
        hosts: Vec<String>,
    ) -> Result<(Vec<String>, Vec<HostPattern>)> {
        let options = self.validation_options();
        let mut canonical: Vec<String> = Vec::with_capacity(hosts.len());
        let mut patterns = Vec::with_capacity(hosts.len());
        for host in &hosts {
            let pattern = parse_passthrough_host(host, &options)?;
            let written = pattern.to_string();
            if !canonical.contains(&written) {
                canonical.push(written);
                patterns.push(pattern);
            }
        }
        if canonical.len() > MAX_PASSTHROUGH_HOSTS {
            return Err(Error::bad_request(
                "too_many_passthrough_hosts",
                format!("a vault has at most {MAX_PASSTHROUGH_HOSTS} passthrough hosts"),
            ));
        }
        Ok((canonical, patterns))
    }

    /// Deletes a vault with its credentials, services, members, proposals and agent
    /// grants.
    pub fn delete_vault(&self, principal: &Principal, name: &str) -> Result<()> {
        let deletion = self.plan_vault_deletion(principal, name)?;
        self.apply_vault_deletion(&deletion)
    }

    /// What deleting `name` removes, listed outside the transaction (sled cannot scan
    /// inside one); [`Store::apply_vault_deletion`] re-reads what others may change
    /// meanwhile.
    fn plan_vault_deletion(&self, principal: &Principal, name: &str) -> Result<VaultDeletion> {
        let (vault, access) = self.access(principal, name)?;
        access.require_admin()?;
        if name == DEFAULT_VAULT {
            return Err(Error::bad_request(
                "cannot_delete_default",
                "the default vault cannot be deleted",
            ));
        }
        let prefix = vault_prefix(&vault.id);
        let per_vault_keys = |tree: &crate::store::Tree| -> Result<Vec<crate::store::Bytes>> {
            tree.scan_prefix(&prefix)
                .keys()
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(VaultDeletion {
            credential_keys: per_vault_keys(&self.trees.credentials)?,
            member_keys: per_vault_keys(&self.trees.members)?,
            proposal_keys: per_vault_keys(&self.trees.proposals)?,
            link_keys: self.proposal_link_keys(&vault.id)?,
            agents: self
                .agents_with_grant(name)?
                .into_iter()
                .map(|agent| agent.name)
                .collect(),
            name: name.to_string(),
            vault,
        })
    }

    fn apply_vault_deletion(&self, deletion: &VaultDeletion) -> Result<()> {
        let VaultDeletion { name, vault, .. } = deletion;
        self.write_published(|tx| {
            tx.vaults.remove(name.as_bytes())?;
            tx.services.remove(vault.id.as_bytes())?;
            for key in deletion.credential_keys.iter() {
                tx.credentials.remove(key)?;
            }
            for key in deletion.member_keys.iter() {
                tx.members.remove(key)?;
            }
            for key in deletion.proposal_keys.iter() {
                tx.proposals.remove(key)?;
            }
            for key in deletion.link_keys.iter() {
                tx.proposal_links.remove(key.as_slice())?;
            }
            for key in crate::proposals::proposal_meta_keys(&vault.id) {
                tx.meta.remove(key)?;
            }
            remove_grants(tx, &deletion.agents, name)
        })?;
        // An agent granted this vault after the listing above (its transaction saw the
        // vault) would keep a grant that a new vault of the same name would honour.
        // Agents cannot be granted a vault that no longer exists, so one more pass
        // finds them all; it stops if the name was taken again meanwhile.
        let late: Vec<String> = self
            .agents_with_grant(name)?
            .into_iter()
            .map(|agent| agent.name)
            .collect();
        if !late.is_empty() {
            self.write_published(|tx| {
                if tx.vaults.get(name.as_bytes())?.is_some() {
                    return Ok(());
                }
                remove_grants(tx, &late, name)
            })?;
        }
        Ok(())
    }
}

/// A vault deletion as listed before its transaction.
struct VaultDeletion {
    name: String,
    vault: VaultRecord,
    credential_keys: Vec<crate::store::Bytes>,
    member_keys: Vec<crate::store::Bytes>,
    proposal_keys: Vec<crate::store::Bytes>,
    link_keys: Vec<Vec<u8>>,
    /// Names of the agents with a grant on the vault.
    agents: Vec<String>,
}

/// Removes `vault`'s grant from each named agent as it is inside the transaction: an
/// agent revoked or rotated since the listing stays revoked or rotated (writing back
/// the listed record would resurrect its old token in the snapshot).
fn remove_grants(tx: &Tx, agents: &[String], vault: &str) -> TxResult<()> {
    for name in agents {
        let Some(mut agent) = get_json::<AgentRecord>(tx.agents, name)? else {
            continue;
        };
        let before = agent.vaults.len();
        agent.vaults.retain(|grant| grant.vault != vault);
        if agent.vaults.len() != before {
            put_json(tx.agents, name, &agent)?;
        }
    }
    Ok(())
}

/// Refuses passthrough hosts a credential-injecting service of the vault could match.
fn no_injecting_service_overlaps(
    services: &[agent_vault_rules::Service],
    hosts: &[String],
    patterns: &[HostPattern],
) -> Result<()> {
    let options = agent_vault_rules::ValidationOptions {
        allow_private_upstreams: true,
    };
    for service in services {
        if service.auth.header_names().is_empty() {
            continue;
        }
        let Ok(service_pattern) = HostPattern::parse(&service.host, &options) else {
            continue;
        };
        if let Some(host) = patterns
            .iter()
            .position(|p| p.overlaps(&service_pattern))
            .and_then(|i| hosts.get(i))
        {
            return Err(Error::bad_request(
                "passthrough_host_has_service",
                format!(
                    "passthrough host {host:?} overlaps service {:?} ({}), which injects a \
                     credential: tunnels to its hosts must be decrypted for that; remove \
                     or narrow one of them",
                    service.name, service.host
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::sha256_hex;
    use crate::testing::{agent_on, owner, system_store};

    fn agent(store: &Store, name: &str) -> Option<AgentRecord> {
        store
            .all_agents()
            .unwrap()
            .into_iter()
            .find(|a| a.name == name)
    }

    fn hosts(store: &Store, vault: &str, hosts: &[&str]) -> Result<VaultView> {
        store.update_vault(
            &owner(),
            vault,
            VaultUpdate {
                passthrough_hosts: Some(hosts.iter().map(|h| h.to_string()).collect()),
                ..VaultUpdate::default()
            },
        )
    }

    #[test]
    fn passthrough_hosts_are_off_by_default_canonical_and_reach_the_snapshot() {
        let (_dir, store) = system_store();
        let views = store.list_vaults(&owner()).unwrap();
        assert!(views.iter().all(|v| v.passthrough_hosts.is_empty()));
        let view = hosts(
            &store,
            "default",
            &[
                "Pinned.Example.com.",
                "pinned.example.com",
                "*.apps.example.com:443",
            ],
        )
        .unwrap();
        assert_eq!(
            view.passthrough_hosts,
            ["pinned.example.com", "*.apps.example.com:443"],
            "canonical and deduplicated"
        );
        assert_eq!(
            view.unmatched_host_policy,
            UnmatchedHostPolicy::Deny,
            "unchanged"
        );
        let snapshot = store.build_snapshot().unwrap();
        let default = snapshot
            .vaults
            .iter()
            .find(|v| v.name == "default")
            .unwrap();
        assert_eq!(default.passthrough_hosts, view.passthrough_hosts);
        assert!(hosts(&store, "default", &[])
            .unwrap()
            .passthrough_hosts
            .is_empty());
    }

    #[test]
    fn a_passthrough_host_is_refused_where_a_service_injects_a_credential_or_it_is_no_host() {
        let (_dir, store) = system_store();
        store
            .set_credentials(
                &owner(),
                "default",
                &crate::testing::secrets(&[("STRIPE_KEY", "sk")]),
            )
            .unwrap();
        crate::testing::add_stripe_service(&store);
        let open: agent_vault_rules::Service = serde_json::from_value(serde_json::json!({
            "name": "open", "host": "open.example.com", "auth": {"type": "passthrough"}
        }))
        .unwrap();
        store.add_service(&owner(), "default", open).unwrap();
        // (behaviour, hosts, error code)
        #[rustfmt::skip]
        let refused: &[(&str, &[&str], &str)] = &[
            ("the injecting service's host", &["api.stripe.com"], "passthrough_host_has_service"),
            ("a wildcard over it", &["*.stripe.com"], "passthrough_host_has_service"),
            ("its host on a port", &["api.stripe.com:443"], "passthrough_host_has_service"),
            ("a path", &["pinned.example.com/v1/*"], "invalid_host"),
            ("a private name without --allow-private-upstreams", &["localhost:8443"], "private_host"),
        ];
        for (behaviour, list, code) in refused {
            let error = hosts(&store, "default", list).unwrap_err();
            assert_eq!(error.code(), *code, "{behaviour}: {error}");
        }
        let too_many: Vec<String> = (0..=agent_vault_rules::MAX_PASSTHROUGH_HOSTS)
            .map(|i| format!("h{i}.example.com"))
            .collect();
        let too_many: Vec<&str> = too_many.iter().map(String::as_str).collect();
        assert_eq!(
            hosts(&store, "default", &too_many).unwrap_err().code(),
            "too_many_passthrough_hosts"
        );
        // A service that injects nothing does not stand in the way.
        let view = hosts(&store, "default", &["open.example.com", "*.example.com"]).unwrap();
        assert_eq!(view.passthrough_hosts.len(), 2);
        let snapshot = store.build_snapshot().unwrap();
        assert!(
            snapshot
                .vaults
                .iter()
                .any(|v| v.passthrough_hosts.len() == 2),
            "nothing was half-applied before"
        );
    }

    #[test]
    fn an_agent_revoked_while_its_vault_is_deleted_stays_revoked() {
        let (_dir, store) = system_store();
        store.create_vault(&owner(), "doomed").unwrap();
        let token = agent_on(&store, "bot", &["default", "doomed"]);
        let deletion = store.plan_vault_deletion(&owner(), "doomed").unwrap();
        // Committed between the deletion's listing and its transaction.
        store.revoke_agent(&owner(), "bot").unwrap();
        store.apply_vault_deletion(&deletion).unwrap();

        assert_eq!(agent(&store, "bot"), None, "the revoked agent came back");
        assert!(store.authenticate(&token).is_err());
        let snapshot = store.build_snapshot().unwrap();
        assert!(snapshot.agents.is_empty(), "{:?}", snapshot.agents);
    }

    #[test]
    fn an_agent_rotated_while_its_vault_is_deleted_keeps_its_new_token_only() {
        let (_dir, store) = system_store();
        store.create_vault(&owner(), "doomed").unwrap();
        let old = agent_on(&store, "bot", &["default", "doomed"]);
        let deletion = store.plan_vault_deletion(&owner(), "doomed").unwrap();
        let new = store.rotate_agent(&owner(), "bot").unwrap().token;
        store.apply_vault_deletion(&deletion).unwrap();

        let bot = agent(&store, "bot").expect("the agent is still there");
        assert_eq!(bot.token_sha256, sha256_hex(new.as_bytes()));
        assert_ne!(bot.token_sha256, sha256_hex(old.as_bytes()));
        let grants: Vec<&str> = bot.vaults.iter().map(|g| g.vault.as_str()).collect();
        assert_eq!(grants, ["default"], "only the deleted vault's grant goes");
    }

    #[test]
    fn an_agent_granted_the_vault_while_it_is_deleted_loses_that_grant() {
        let (_dir, store) = system_store();
        store.create_vault(&owner(), "doomed").unwrap();
        let deletion = store.plan_vault_deletion(&owner(), "doomed").unwrap();
        agent_on(&store, "late", &["default", "doomed"]);
        store.apply_vault_deletion(&deletion).unwrap();

        let late = agent(&store, "late").unwrap();
        let grants: Vec<&str> = late.vaults.iter().map(|g| g.vault.as_str()).collect();
        assert_eq!(grants, ["default"]);
        // A new vault of the same name is not the old one's agents'.
        store.create_vault(&owner(), "doomed").unwrap();
        assert!(agent(&store, "late")
            .unwrap()
            .vaults
            .iter()
            .all(|g| g.vault != "doomed"));
    }
}
