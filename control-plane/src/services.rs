//! Service rules per vault: stored as one ordered list, because declaration order is
//! the matcher's last tie-breaker. Validation is the rules crate's; this module adds
//! what needs the store: every referenced key must exist in the vault.

use agent_vault_rules::{validate_services, Service, ValidationOptions};

use crate::access::{ensure_vault_unchanged, Principal};
use crate::error::{Error, Result};
use crate::store::{abort, get_json, put_json, read_json, vault_key, Store, Tx, TxResult};

fn service_not_found(name: &str, vault: &str) -> Error {
    Error::not_found(
        "service_not_found",
        format!("service \"{name}\" not found in vault \"{vault}\""),
    )
}

/// Every key the services reference must be a credential of the vault (or one of
/// `also_present`, the keys a proposal sets in the same transaction).
pub(crate) fn check_keys_exist(
    tx: &Tx,
    vault_id: &str,
    vault: &str,
    services: &[Service],
    also_present: &[String],
) -> TxResult<()> {
    for service in services {
        for key in service.credential_keys() {
            if also_present.contains(&key) {
                continue;
            }
            if tx.credentials.get(vault_key(vault_id, &key))?.is_none() {
                return abort(Error::bad_request(
                    "credential_not_found",
                    format!(
                        "service \"{}\" references credential {key}, which is not in vault \"{vault}\"; set it first",
                        service.name
                    ),
                ));
            }
        }
    }
    Ok(())
}

pub(crate) fn read_services_tx(tx: &Tx, vault_id: &str) -> TxResult<Vec<Service>> {
    Ok(get_json(tx.services, vault_id)?.unwrap_or_default())
}

impl Store {
    pub(crate) fn validation_options(&self) -> ValidationOptions {
        ValidationOptions {
            allow_private_upstreams: self.allow_private_upstreams,
        }
    }

    pub(crate) fn services_of(&self, vault_id: &str) -> Result<Vec<Service>> {
        Ok(read_json(&self.trees.services, vault_id)?.unwrap_or_default())
    }

    /// Services of a vault in declaration order (agents may list them too).
    pub fn list_services(&self, principal: &Principal, vault: &str) -> Result<Vec<Service>> {
        let (record, _) = self.access(principal, vault)?;
        self.services_of(&record.id)
    }

    /// Applies `change` to the vault's list, validates the result and stores it.
    fn change_services<R>(
        &self,
        principal: &Principal,
        vault: &str,
        change: impl Fn(&mut Vec<Service>) -> Result<R>,
    ) -> Result<R> {
        let (record, access) = self.access(principal, vault)?;
        access.require_admin()?;
        let options = self.validation_options();
        self.write_published(|tx| {
            ensure_vault_unchanged(tx, vault, &record.id)?;
            let before = read_services_tx(tx, &record.id)?;
            let mut services = before.clone();
            let result = match change(&mut services) {
                Ok(result) => result,
                Err(e) => return abort(e),
            };
            if let Err(e) = validate_services(&services, &options) {
                return abort(e.into());
            }
            // Only new or re-authed services must resolve: disabling or removing a
            // service whose credential was deleted must still work.
            let changed: Vec<Service> = services
                .iter()
                .filter(|s| !before.iter().any(|b| b.name == s.name && b.auth == s.auth))
                .cloned()
                .collect();
            check_keys_exist(tx, &record.id, vault, &changed, &[])?;
            put_json(tx.services, &record.id, &services)?;
            Ok(result)
        })
    }

    pub fn add_service(
        &self,
        principal: &Principal,
        vault: &str,
        service: Service,
    ) -> Result<Service> {
        self.change_services(principal, vault, |services| {
            if services.iter().any(|s| s.name == service.name) {
                return Err(Error::conflict(
                    "service_exists",
                    format!(
                        "service \"{}\" already exists in vault \"{vault}\"",
                        service.name
                    ),
                ));
            }
            services.push(service.clone());
            Ok(service.clone())
        })
    }

    /// Replaces the whole list atomically (`vault service set -f`).
    pub fn replace_services(
        &self,
        principal: &Principal,
        vault: &str,
        new_services: Vec<Service>,
    ) -> Result<Vec<Service>> {
        self.change_services(principal, vault, |services| {
            *services = new_services.clone();
            Ok(new_services.clone())
        })
    }

    pub fn remove_service(&self, principal: &Principal, vault: &str, name: &str) -> Result<()> {
        self.change_services(principal, vault, |services| {
            let before = services.len();
            services.retain(|s| s.name != name);
            if services.len() == before {
                return Err(service_not_found(name, vault));
            }
            Ok(())
        })
    }

    pub fn set_service_enabled(
        &self,
        principal: &Principal,
        vault: &str,
        name: &str,
        enabled: bool,
    ) -> Result<Service> {
        self.change_services(principal, vault, |services| {
            let service = services
                .iter_mut()
                .find(|s| s.name == name)
                .ok_or_else(|| service_not_found(name, vault))?;
            service.enabled = enabled;
            Ok(service.clone())
        })
    }
}
