//! Credentials: values sealed with the data key, bound to their vault and key.
//!
//! Values are decrypted only to answer a member's read or the data plane's fetch,
//! and live in [`Secret`]s that are wiped on drop and never printed.

use std::collections::{BTreeMap, BTreeSet};

use agent_vault_rules::validate_credential_key;
use base64::Engine;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::access::{ensure_vault_unchanged, Principal};
use crate::crypto::{credential_aad, Key};
use crate::error::{Error, Result};
use crate::store::{
    abort, get_json, put_json, scan_json, vault_key, vault_prefix, Store, Tx, TxResult,
};

/// Largest value accepted for one credential.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

/// A decrypted credential value: wiped on drop, redacted in `Debug`.
#[derive(Clone, PartialEq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(Zeroizing::new(value))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Secret, D::Error> {
        String::deserialize(d).map(Secret::new)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CredentialRecord {
    /// base64 of `version || nonce || ciphertext+tag`.
    sealed: String,
    updated_at: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CredentialView {
    pub key: String,
    pub updated_at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

fn credential_not_found(key: &str, vault: &str) -> Error {
    Error::not_found(
        "credential_not_found",
        format!("credential {key} not found in vault \"{vault}\""),
    )
}

/// Checks a key and its value before anything is written.
pub fn validate_entry(key: &str, value: &str) -> Result<()> {
    validate_credential_key(key)?;
    if value.is_empty() {
        return Err(Error::bad_request(
            "invalid_value",
            format!("the value of {key} is empty"),
        ));
    }
    if value.len() > MAX_VALUE_BYTES {
        return Err(Error::bad_request(
            "invalid_value",
            format!("the value of {key} is larger than {MAX_VALUE_BYTES} bytes"),
        ));
    }
    Ok(())
}

pub(crate) fn seal_record(
    key: &Key,
    vault_id: &str,
    name: &str,
    value: &str,
    now: i64,
) -> CredentialRecord {
    let sealed = key.seal(&credential_aad(vault_id, name), value.as_bytes());
    CredentialRecord {
        sealed: base64::engine::general_purpose::STANDARD.encode(sealed),
        updated_at: now,
    }
}

fn open_record(key: &Key, vault_id: &str, name: &str, record: &CredentialRecord) -> Result<Secret> {
    let sealed = base64::engine::general_purpose::STANDARD
        .decode(&record.sealed)
        .map_err(|_| Error::internal(format!("credential {name}: stored value is not base64")))?;
    let plain = key
        .open(&credential_aad(vault_id, name), &sealed)
        .map_err(|e| Error::internal(format!("credential {name}: {e}")))?;
    let text = std::str::from_utf8(&plain)
        .map_err(|_| Error::internal(format!("credential {name}: not UTF-8")))?;
    Ok(Secret::new(text.to_string()))
}

/// Writes sealed credentials inside a transaction (used by `set` and by proposals).
pub(crate) fn put_credentials(
    tx: &Tx,
    vault_id: &str,
    values: &BTreeMap<String, CredentialRecord>,
) -> TxResult<()> {
    for (name, record) in values {
        put_json(tx.credentials, vault_key(vault_id, name), record)?;
    }
    Ok(())
}

/// Re-encrypts the credentials stored under `db_keys` from `old` to `new`.
pub(crate) fn reseal(
    tx: &Tx,
    db_keys: &[crate::store::Bytes],
    old: &Key,
    new: &Key,
) -> TxResult<usize> {
    let mut count = 0;
    for db_key in db_keys {
        let Some(record) = get_json::<CredentialRecord>(tx.credentials, db_key)? else {
            continue;
        };
        let Some(split) = db_key.iter().position(|&b| b == 0) else {
            continue;
        };
        let vault_id = String::from_utf8_lossy(&db_key[..split]).into_owned();
        let name = String::from_utf8_lossy(&db_key[split + 1..]).into_owned();
        let secret = match open_record(old, &vault_id, &name, &record) {
            Ok(secret) => secret,
            Err(e) => return abort(e),
        };
        let resealed = seal_record(new, &vault_id, &name, secret.expose(), record.updated_at);
        put_json(tx.credentials, db_key, &resealed)?;
        count += 1;
    }
    Ok(count)
}

impl Store {
    /// Sets every entry or none; overwrites existing values.
    pub fn set_credentials(
        &self,
        principal: &Principal,
        vault: &str,
        entries: &BTreeMap<String, Secret>,
    ) -> Result<Vec<String>> {
        let (record, access) = self.access(principal, vault)?;
        access.require_member()?;
        if entries.is_empty() {
            return Err(Error::bad_request(
                "invalid_request",
                "no credentials given",
            ));
        }
        for (key, value) in entries {
            validate_entry(key, value.expose())?;
        }
        let data_key = self.data_key();
        let now = self.now_secs();
        let sealed: BTreeMap<String, CredentialRecord> = entries
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    seal_record(&data_key, &record.id, k, v.expose(), now),
                )
            })
            .collect();
        self.write_published(|tx| {
            ensure_vault_unchanged(tx, vault, &record.id)?;
            put_credentials(tx, &record.id, &sealed)
        })?;
        Ok(entries.keys().cloned().collect())
    }

    pub fn get_credential(&self, principal: &Principal, vault: &str, key: &str) -> Result<Secret> {
        let (record, access) = self.access(principal, vault)?;
        access.require_member()?;
        self.open_with_data_key(|data_key| {
            let stored: CredentialRecord =
                crate::store::read_json(&self.trees.credentials, vault_key(&record.id, key))?
                    .ok_or_else(|| credential_not_found(key, vault))?;
            open_record(data_key, &record.id, key, &stored)
        })
    }

    /// Keys (and, with `reveal`, values) of a vault. Agents may list keys only.
    pub fn list_credentials(
        &self,
        principal: &Principal,
        vault: &str,
        reveal: bool,
    ) -> Result<Vec<CredentialView>> {
        let (record, access) = self.access(principal, vault)?;
        if reveal {
            access.require_member()?;
        }
        self.open_with_data_key(|data_key| {
            let prefix = vault_prefix(&record.id);
            let mut views = Vec::new();
            for (db_key, stored) in scan_json::<CredentialRecord>(&self.trees.credentials, &prefix)?
            {
                let key = String::from_utf8_lossy(&db_key[prefix.len()..]).into_owned();
                let value = if reveal {
                    Some(
                        open_record(data_key, &record.id, &key, &stored)?
                            .expose()
                            .to_string(),
                    )
                } else {
                    None
                };
                views.push(CredentialView {
                    key,
                    updated_at: stored.updated_at,
                    value,
                });
            }
            Ok(views)
        })
    }

    /// The keys present in a vault (for discovery and service validation).
    pub(crate) fn credential_keys(&self, vault_id: &str) -> Result<BTreeSet<String>> {
        let prefix = vault_prefix(vault_id);
        self.trees
            .credentials
            .scan_prefix(&prefix)
            .keys()
            .map(|key| Ok(String::from_utf8_lossy(&key?[prefix.len()..]).into_owned()))
            .collect()
    }

    /// Deletes every key or none: an unknown key aborts the whole batch.
    pub fn delete_credentials(
        &self,
        principal: &Principal,
        vault: &str,
        keys: &[String],
    ) -> Result<Vec<String>> {
        let (record, access) = self.access(principal, vault)?;
        access.require_member()?;
        if keys.is_empty() {
            return Err(Error::bad_request("invalid_request", "no keys given"));
        }
        for key in keys {
            validate_credential_key(key)?;
        }
        self.write_published(|tx| {
            ensure_vault_unchanged(tx, vault, &record.id)?;
            for key in keys {
                if tx.credentials.remove(vault_key(&record.id, key))?.is_none() {
                    return abort(credential_not_found(key, vault));
                }
            }
            Ok(())
        })?;
        let mut deleted = keys.to_vec();
        deleted.dedup();
        Ok(deleted)
    }

    /// Decrypts `keys` of a vault for the data plane; absent keys are reported, not
    /// errors. The caller has already checked the agent's grant.
    pub fn resolve_credentials(
        &self,
        vault_id: &str,
        keys: &[String],
    ) -> Result<(BTreeMap<String, Secret>, Vec<String>)> {
        self.open_with_data_key(|data_key| {
            let mut values = BTreeMap::new();
            let mut missing = Vec::new();
            for key in keys {
                match crate::store::read_json::<CredentialRecord>(
                    &self.trees.credentials,
                    vault_key(vault_id, key),
                )? {
                    Some(stored) => {
                        values.insert(key.clone(), open_record(data_key, vault_id, key, &stored)?);
                    }
                    None => missing.push(key.clone()),
                }
            }
            Ok((values, missing))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use crate::testing::{owner, secrets};
    use std::sync::Arc;

    fn open(dir: &std::path::Path) -> Store {
        crate::testing::open_store(dir, None, Arc::new(SystemClock), false).unwrap()
    }

    fn set(store: &Store, key: &str, value: &str) {
        store
            .set_credentials(&owner(), "default", &secrets(&[(key, value)]))
            .unwrap();
    }

    fn raw_key(store: &Store, key: &str) -> Vec<u8> {
        let vault = store.vault("default").unwrap().unwrap();
        vault_key(&vault.id, key)
    }

    #[test]
    fn tampered_ciphertext_is_an_error_not_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        set(&store, "A", "secret-a");
        let key = raw_key(&store, "A");
        let mut record: CredentialRecord =
            serde_json::from_slice(&store.trees.credentials.get(&key).unwrap().unwrap()).unwrap();
        let mut sealed = base64::engine::general_purpose::STANDARD
            .decode(&record.sealed)
            .unwrap();
        let middle = sealed.len() / 2;
        sealed[middle] ^= 0x01;
        record.sealed = base64::engine::general_purpose::STANDARD.encode(sealed);
        store
            .trees
            .credentials
            .insert(&key, serde_json::to_vec(&record).unwrap())
            .unwrap();
        let err = store.get_credential(&owner(), "default", "A").unwrap_err();
        assert!(matches!(err, Error::Internal(_)), "{err:?}");
        assert!(store
            .resolve_credentials(&store.vault("default").unwrap().unwrap().id, &["A".into()])
            .is_err());
    }

    #[test]
    fn ciphertext_swapped_between_keys_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        set(&store, "A", "secret-a");
        set(&store, "B", "secret-b");
        let a = store
            .trees
            .credentials
            .get(raw_key(&store, "A"))
            .unwrap()
            .unwrap();
        store
            .trees
            .credentials
            .insert(raw_key(&store, "B"), a)
            .unwrap();
        assert!(store.get_credential(&owner(), "default", "B").is_err());
        assert_eq!(
            store
                .get_credential(&owner(), "default", "A")
                .unwrap()
                .expose(),
            "secret-a"
        );
    }

    #[test]
    fn rotation_reencrypts_every_value_and_they_stay_readable() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        set(&store, "A", "secret-a");
        set(&store, "B", "secret-b");
        let before = store
            .trees
            .credentials
            .get(raw_key(&store, "A"))
            .unwrap()
            .unwrap();
        let version = store.snapshot_version().unwrap();
        assert_eq!(store.rotate_data_key().unwrap(), 2);
        let after = store
            .trees
            .credentials
            .get(raw_key(&store, "A"))
            .unwrap()
            .unwrap();
        assert_ne!(before, after, "the value was re-encrypted");
        assert!(store.snapshot_version().unwrap() > version);
        assert_eq!(
            store
                .get_credential(&owner(), "default", "B")
                .unwrap()
                .expose(),
            "secret-b"
        );
        drop(store);
        let reopened = crate::testing::reopen(dir.path()).unwrap();
        assert_eq!(
            reopened
                .get_credential(&owner(), "default", "A")
                .unwrap()
                .expose(),
            "secret-a"
        );
    }

    #[test]
    fn a_batch_with_one_bad_entry_sets_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let entries = BTreeMap::from([
            ("GOOD".to_string(), Secret::new("1".into())),
            ("bad-key".to_string(), Secret::new("2".into())),
        ]);
        assert!(store
            .set_credentials(&owner(), "default", &entries)
            .is_err());
        assert!(store
            .list_credentials(&owner(), "default", false)
            .unwrap()
            .is_empty());
        let empty = BTreeMap::from([("EMPTY".to_string(), Secret::new(String::new()))]);
        assert!(store.set_credentials(&owner(), "default", &empty).is_err());
    }

    #[test]
    fn delete_of_an_unknown_key_deletes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        set(&store, "A", "secret-a");
        let err = store
            .delete_credentials(&owner(), "default", &["A".into(), "MISSING".into()])
            .unwrap_err();
        assert_eq!(err.code(), "credential_not_found");
        assert!(store.get_credential(&owner(), "default", "A").is_ok());
    }

    #[test]
    fn secret_debug_is_redacted() {
        assert_eq!(
            format!("{:?}", Secret::new("sk_live".into())),
            "Secret(<redacted>)"
        );
    }
}
