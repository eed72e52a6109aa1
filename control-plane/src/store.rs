//! The sled store: trees, schema version, transactions, durability and the data key.
//!
//! Every write goes through [`Store::write`] or [`Store::write_published`]: one sled
//! transaction over all trees (so a change that touches several keys is all or
//! nothing), then a flush, and only then does the caller get an answer — an
//! acknowledged write survives `kill -9`. Writes that change what the data plane sees
//! (vaults, services, agents, credentials) also bump the snapshot version inside the
//! same transaction, so the filter can never see new rules with an old version.
//!
//! Concept modules (`access`, `users`, `vaults`, `credentials`, `services`, `agents`,
//! `proposals`, `logs`) add their operations as `impl Store` blocks; this module only
//! knows about storage.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock, RwLockReadGuard};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionalTree};
use sled::Transactional;

use crate::clock::SharedClock;
use crate::crypto::{KdfParams, Key, PasswordHashing, DATA_KEY_AAD};
use crate::error::{Error, Result};

/// Bumped when the on-disk layout changes; a newer store is refused.
pub const SCHEMA_VERSION: u32 = 1;

const META_SCHEMA: &[u8] = b"schema_version";
const META_DATA_KEY: &[u8] = b"data_key";
const META_VERSION: &[u8] = b"snapshot_version";

/// File that holds the key-encryption key in passwordless mode.
pub const KEY_FILE: &str = "master.key";

pub(crate) type TxResult<T> = std::result::Result<T, ConflictableTransactionError<Error>>;

/// Aborts the surrounding transaction with `error`.
pub(crate) fn abort<T>(error: Error) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(error))
}

macro_rules! trees {
    ($($name:ident),* $(,)?) => {
        /// Handles on every tree, for reads outside transactions.
        #[derive(Clone)]
        pub(crate) struct Trees { $(pub $name: sled::Tree,)* }

        impl Trees {
            fn open(db: &sled::Db) -> sled::Result<Trees> {
                Ok(Trees { $($name: db.open_tree(stringify!($name))?,)* })
            }

            fn all(&self) -> Vec<sled::Tree> {
                vec![$(self.$name.clone(),)*]
            }

            /// Every tree, for tests that look at the raw bytes.
            #[cfg(test)]
            pub(crate) fn all_for_tests(&self) -> Vec<sled::Tree> {
                self.all()
            }
        }

        /// The same trees inside one transaction. Not every tree is written
        /// transactionally (the request log appends with sled batches).
        #[allow(dead_code)]
        pub(crate) struct Tx<'a> { $(pub $name: &'a TransactionalTree,)* }

        impl<'a> Tx<'a> {
            fn new(trees: &'a [TransactionalTree]) -> Tx<'a> {
                let mut it = trees.iter();
                Tx { $($name: it.next().unwrap_or(&trees[0]),)* }
            }
        }
    };
}

trees!(
    meta,
    users,
    sessions,
    invites,
    vaults,
    members,
    credentials,
    services,
    agents,
    agent_tokens,
    logs,
    other_logs,
    proposals,
    proposal_links,
);

/// This process's bootstrap and local-login tokens as SHA-256 (the tokens themselves
/// are only in the data dir's files); [`crate::users`] writes and checks them.
#[derive(Default)]
pub(crate) struct LocalTokens {
    /// While there is no owner.
    pub bootstrap: Mutex<Option<String>>,
    pub local_login: Mutex<Option<String>>,
}

/// How the data key is wrapped, as stored in `meta/data_key`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kek", rename_all = "lowercase")]
enum WrappedDataKey {
    /// Key-encryption key in `<data-dir>/master.key`.
    File { wrapped: String },
    /// Key-encryption key derived from the master password.
    Password { kdf: KdfParams, wrapped: String },
}

/// How the running server protects the data key.
#[derive(Clone)]
enum Kek {
    File(Key),
    Password(Key, KdfParams),
}

/// Why the store could not be opened: each is a clear message for the operator.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open the store in {0}: {1}")]
    Sled(PathBuf, sled::Error),
    #[error("the store in {path} has schema version {found}, newer than this agent-vault supports ({SCHEMA_VERSION}); upgrade agent-vault")]
    NewerSchema { path: PathBuf, found: u32 },
    #[error("the store is protected by a master password: set AGENT_VAULT_MASTER_PASSWORD or pass --password-stdin")]
    PasswordRequired,
    #[error("wrong master password: the data key could not be unwrapped")]
    WrongPassword,
    #[error("the store is passwordless (key file {0}); start without a master password, then set one with `agent-vault master-password change`")]
    PasswordlessStore(PathBuf),
    #[error("the key file {0} is missing or unreadable: {1}")]
    KeyFile(PathBuf, String),
    #[error("the store is damaged: {0}")]
    Corrupt(String),
    #[error("cannot write the bootstrap and local login tokens into {0}: {1}")]
    LocalTokens(PathBuf, String),
}

pub struct Store {
    db: sled::Db,
    pub(crate) trees: Trees,
    all: Vec<sled::Tree>,
    data_dir: PathBuf,
    /// Held for reading by everything that seals or opens a value (across the
    /// transaction that stores it), and for writing by rotation, so no value is ever
    /// sealed with a key that is being replaced.
    data_key: RwLock<Key>,
    kek: Mutex<Kek>,
    pub(crate) clock: SharedClock,
    pub(crate) allow_private_upstreams: bool,
    /// Every user-password hash goes through it (bounded; see its doc).
    pub(crate) passwords: PasswordHashing,
    /// The bootstrap and local-login tokens of this process ([`crate::users`]).
    pub(crate) local_tokens: LocalTokens,
    /// The snapshot version as last known: every published write sends the version
    /// it committed, so the data plane's long-poll wakes at once.
    version: tokio::sync::watch::Sender<u64>,
}

impl Store {
    /// Opens (or creates) the storage in `data_dir`. With `password`, the data key is
    /// wrapped by an Argon2id key derived from it; without, by the key file.
    /// [`Store::open`] (in [`crate::vaults`]) is this plus the `default` vault.
    pub(crate) fn open_storage(
        data_dir: &Path,
        password: Option<&str>,
        clock: SharedClock,
        allow_private_upstreams: bool,
    ) -> std::result::Result<Store, OpenError> {
        create_private_dir(data_dir)
            .map_err(|e| OpenError::KeyFile(data_dir.to_path_buf(), e.to_string()))?;
        let path = data_dir.join("store");
        create_private_dir(&path).map_err(|e| OpenError::KeyFile(path.clone(), e.to_string()))?;
        let db = sled::Config::new()
            .path(&path)
            .open()
            .map_err(|e| OpenError::Sled(path.clone(), e))?;
        let trees = Trees::open(&db).map_err(|e| OpenError::Sled(path.clone(), e))?;
        let sled_err = |e| OpenError::Sled(path.clone(), e);

        match trees.meta.get(META_SCHEMA).map_err(sled_err)? {
            Some(raw) => {
                let found = u32::from_be_bytes(
                    raw.as_ref()
                        .try_into()
                        .map_err(|_| OpenError::Corrupt("schema version".into()))?,
                );
                if found > SCHEMA_VERSION {
                    return Err(OpenError::NewerSchema { path, found });
                }
            }
            None => {
                trees
                    .meta
                    .insert(META_SCHEMA, &SCHEMA_VERSION.to_be_bytes())
                    .map_err(sled_err)?;
            }
        }

        let key_file = data_dir.join(KEY_FILE);
        let (data_key, kek) = match trees.meta.get(META_DATA_KEY).map_err(sled_err)? {
            Some(raw) => {
                let record: WrappedDataKey = serde_json::from_slice(&raw)
                    .map_err(|e| OpenError::Corrupt(format!("data key record: {e}")))?;
                unwrap_data_key(&record, password, &key_file)?
            }
            None => {
                let data_key = Key::generate();
                let kek = match password {
                    Some(password) => {
                        let kdf = KdfParams::new_random();
                        let derived = kdf
                            .derive(password)
                            .map_err(|e| OpenError::Corrupt(e.to_string()))?;
                        Kek::Password(derived, kdf)
                    }
                    None => {
                        let kek = Key::generate();
                        write_private_file(&key_file, hex::encode(kek.as_bytes()).as_bytes())
                            .map_err(|e| OpenError::KeyFile(key_file.clone(), e.to_string()))?;
                        Kek::File(kek)
                    }
                };
                let record = serde_json::to_vec(&wrap_data_key(&data_key, &kek))
                    .map_err(|e| OpenError::Corrupt(e.to_string()))?;
                trees.meta.insert(META_DATA_KEY, record).map_err(sled_err)?;
                (data_key, kek)
            }
        };
        db.flush().map_err(sled_err)?;
        let version = read_version(trees.meta.get(META_VERSION).map_err(sled_err)?.as_deref());

        let all = trees.all();
        Ok(Store {
            db,
            trees,
            all,
            data_dir: data_dir.to_path_buf(),
            data_key: RwLock::new(data_key),
            kek: Mutex::new(kek),
            clock,
            allow_private_upstreams,
            passwords: PasswordHashing::for_this_machine(),
            local_tokens: LocalTokens::default(),
            version: tokio::sync::watch::Sender::new(version),
        })
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn is_passwordless(&self) -> bool {
        matches!(*lock(&self.kek), Kek::File(_))
    }

    pub(crate) fn now_secs(&self) -> i64 {
        self.clock.now_secs()
    }

    /// A number larger than every one returned before, also across restarts.
    pub(crate) fn generate_id(&self) -> Result<u64> {
        Ok(self.db.generate_id()?)
    }

    /// The data key; hold the guard while sealing/opening and storing the result.
    pub(crate) fn data_key(&self) -> RwLockReadGuard<'_, Key> {
        self.data_key.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` in one transaction over every tree and flushes before returning.
    /// `f` may run more than once on conflict: it must not have side effects
    /// outside the transaction (draw random tokens before calling).
    pub(crate) fn write<R>(&self, f: impl Fn(&Tx) -> TxResult<R>) -> Result<R> {
        self.transact(false, f)
    }

    /// Applies `batch` to `tree` atomically, then flushes: for data that needs no
    /// transaction with other trees (the request log). Far cheaper than
    /// [`Store::write`], whose transaction spans every tree.
    pub(crate) fn apply_flushed(&self, tree: &sled::Tree, batch: sled::Batch) -> Result<()> {
        tree.apply_batch(batch)?;
        self.db.flush()?;
        Ok(())
    }

    /// [`Store::apply_flushed`] for several trees, with one flush after all of them.
    pub(crate) fn apply_flushed_all(&self, batches: Vec<(&sled::Tree, sled::Batch)>) -> Result<()> {
        for (tree, batch) in batches {
            tree.apply_batch(batch)?;
        }
        self.db.flush()?;
        Ok(())
    }

    /// Like [`Store::write`], and bumps the snapshot version in the same transaction.
    pub(crate) fn write_published<R>(&self, f: impl Fn(&Tx) -> TxResult<R>) -> Result<R> {
        self.transact(true, f)
    }

    fn transact<R>(&self, bump: bool, f: impl Fn(&Tx) -> TxResult<R>) -> Result<R> {
        let (result, version) = self.all[..].transaction(|trees| {
            let tx = Tx::new(trees);
            let result = f(&tx)?;
            let mut published = None;
            if bump {
                let version = read_version(tx.meta.get(META_VERSION)?.as_deref()) + 1;
                tx.meta.insert(META_VERSION, &version.to_be_bytes())?;
                published = Some(version);
            }
            Ok((result, published))
        })?;
        self.db.flush()?;
        if let Some(version) = version {
            self.announce_version(version);
        }
        Ok(result)
    }

    /// Records `version` as committed (never moving back) and wakes its watchers.
    fn announce_version(&self, version: u64) {
        self.version.send_if_modified(|known| {
            let newer = version > *known;
            if newer {
                *known = version;
            }
            newer
        });
    }

    /// The snapshot version as last committed or announced, without reading storage;
    /// the receiver wakes on every change (the data plane's long-poll waits on it).
    pub fn watch_version(&self) -> tokio::sync::watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// The snapshot version: changes on every write that affects the data plane.
    pub fn snapshot_version(&self) -> Result<u64> {
        Ok(read_version(self.trees.meta.get(META_VERSION)?.as_deref()))
    }

    /// Total bytes sled reports on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    /// Re-wraps the data key: `new_password: None` makes the store passwordless.
    pub fn change_master_password(
        &self,
        current: Option<&str>,
        new_password: Option<&str>,
    ) -> Result<()> {
        let mut kek = lock(&self.kek);
        let current_ok = match (&*kek, current) {
            (Kek::File(_), None) => true,
            (Kek::Password(key, kdf), Some(given)) => kdf
                .derive(given)
                .map(|derived| {
                    bool::from(subtle::ConstantTimeEq::ct_eq(
                        &derived.as_bytes()[..],
                        &key.as_bytes()[..],
                    ))
                })
                .unwrap_or(false),
            _ => false,
        };
        if !current_ok {
            return Err(Error::InvalidCredentials(
                "the current master password is wrong".into(),
            ));
        }
        let key_file = self.data_dir.join(KEY_FILE);
        let new_kek = match new_password {
            Some(password) => {
                let kdf = KdfParams::new_random();
                Kek::Password(kdf.derive(password)?, kdf)
            }
            None => {
                let key = Key::generate();
                // Written before the store points at it; a crash in between leaves the
                // old record valid and the new file unused.
                write_private_file(&key_file, hex::encode(key.as_bytes()).as_bytes())
                    .map_err(Error::internal)?;
                Kek::File(key)
            }
        };
        let record = serde_json::to_vec(&wrap_data_key(&self.data_key(), &new_kek))?;
        self.write(|tx| {
            tx.meta.insert(META_DATA_KEY, record.clone())?;
            Ok(())
        })?;
        if matches!(new_kek, Kek::Password(..)) {
            // The old key file now unwraps nothing; remove it.
            let _ = std::fs::remove_file(&key_file);
        }
        *kek = new_kek;
        Ok(())
    }

    /// Replaces the data key: `list` reads what must be re-sealed, then one transaction
    /// stores the new wrapped key and calls `reseal(tx, listed, old, new)`, which
    /// returns how many values it re-sealed. Holds the data key's write lock
    /// throughout, so no value is sealed or opened with the old key while the new one
    /// takes over, and nothing is sealed between `list` and the transaction (sled
    /// cannot iterate inside one).
    pub(crate) fn replace_data_key<L>(
        &self,
        list: impl FnOnce(&Trees) -> Result<L>,
        reseal: impl Fn(&Tx, &L, &Key, &Key) -> TxResult<usize>,
    ) -> Result<usize> {
        let kek = lock(&self.kek);
        let mut data_key = self.data_key.write().unwrap_or_else(|p| p.into_inner());
        let new = Key::generate();
        let record = serde_json::to_vec(&wrap_data_key(&new, &kek))?;
        let listed = list(&self.trees)?;
        let count = self.write_published(|tx| {
            tx.meta.insert(META_DATA_KEY, record.clone())?;
            reseal(tx, &listed, &data_key, &new)
        })?;
        *data_key = new;
        Ok(count)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

fn read_version(raw: Option<&[u8]>) -> u64 {
    raw.and_then(|bytes| bytes.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

fn wrap_data_key(data_key: &Key, kek: &Kek) -> WrappedDataKey {
    match kek {
        Kek::File(key) => WrappedDataKey::File {
            wrapped: hex::encode(key.seal(DATA_KEY_AAD, data_key.as_bytes())),
        },
        Kek::Password(key, kdf) => WrappedDataKey::Password {
            kdf: kdf.clone(),
            wrapped: hex::encode(key.seal(DATA_KEY_AAD, data_key.as_bytes())),
        },
    }
}

fn unwrap_data_key(
    record: &WrappedDataKey,
    password: Option<&str>,
    key_file: &Path,
) -> std::result::Result<(Key, Kek), OpenError> {
    let (kek, wrapped, wrong) = match (record, password) {
        (WrappedDataKey::Password { .. }, None) => return Err(OpenError::PasswordRequired),
        (WrappedDataKey::File { .. }, Some(_)) => {
            return Err(OpenError::PasswordlessStore(key_file.to_path_buf()))
        }
        (WrappedDataKey::Password { kdf, wrapped }, Some(password)) => {
            let derived = kdf
                .derive(password)
                .map_err(|e| OpenError::Corrupt(e.to_string()))?;
            (
                Kek::Password(derived, kdf.clone()),
                wrapped,
                OpenError::WrongPassword,
            )
        }
        (WrappedDataKey::File { wrapped }, None) => {
            let text = std::fs::read_to_string(key_file)
                .map_err(|e| OpenError::KeyFile(key_file.to_path_buf(), e.to_string()))?;
            let key = hex::decode(text.trim())
                .ok()
                .and_then(|bytes| Key::from_bytes(&bytes))
                .ok_or_else(|| {
                    OpenError::KeyFile(key_file.to_path_buf(), "not a 256-bit hex key".into())
                })?;
            let wrong = OpenError::KeyFile(
                key_file.to_path_buf(),
                "this key does not unwrap the store's data key".into(),
            );
            (Kek::File(key), wrapped, wrong)
        }
    };
    let kek_key = match &kek {
        Kek::File(key) | Kek::Password(key, _) => key,
    };
    let sealed = hex::decode(wrapped).map_err(|e| OpenError::Corrupt(e.to_string()))?;
    let plain = kek_key.open(DATA_KEY_AAD, &sealed).map_err(|_| wrong)?;
    let data_key =
        Key::from_bytes(&plain).ok_or_else(|| OpenError::Corrupt("data key length".into()))?;
    Ok((data_key, kek))
}

/// Creates `dir` (and parents) with mode 0700 where it is created.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Writes `contents` to `path` with mode 0600, atomically (temp file + rename + fsync).
pub fn write_private_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// Reads a JSON record inside a transaction.
pub(crate) fn get_json<T: DeserializeOwned>(
    tree: &TransactionalTree,
    key: impl AsRef<[u8]>,
) -> TxResult<Option<T>> {
    match tree.get(key.as_ref())? {
        Some(raw) => match serde_json::from_slice(&raw) {
            Ok(value) => Ok(Some(value)),
            Err(e) => abort(e.into()),
        },
        None => Ok(None),
    }
}

/// Writes a JSON record inside a transaction.
pub(crate) fn put_json<T: Serialize>(
    tree: &TransactionalTree,
    key: impl AsRef<[u8]>,
    value: &T,
) -> TxResult<()> {
    match serde_json::to_vec(value) {
        Ok(raw) => {
            tree.insert(key.as_ref(), raw)?;
            Ok(())
        }
        Err(e) => abort(e.into()),
    }
}

/// Reads a JSON record outside a transaction.
pub(crate) fn read_json<T: DeserializeOwned>(
    tree: &sled::Tree,
    key: impl AsRef<[u8]>,
) -> Result<Option<T>> {
    match tree.get(key.as_ref())? {
        Some(raw) => Ok(Some(serde_json::from_slice(&raw)?)),
        None => Ok(None),
    }
}

/// Every JSON record of a tree (or of the keys under `prefix`), in key order.
pub(crate) fn scan_json<T: DeserializeOwned>(
    tree: &sled::Tree,
    prefix: impl AsRef<[u8]>,
) -> Result<Vec<(sled::IVec, T)>> {
    tree.scan_prefix(prefix.as_ref())
        .map(|entry| {
            let (key, raw) = entry?;
            Ok((key, serde_json::from_slice(&raw)?))
        })
        .collect()
}

/// `<vault id>\0<name>`: the key of a per-vault record.
pub(crate) fn vault_key(vault_id: &str, name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(vault_id.len() + 1 + name.len());
    key.extend_from_slice(vault_id.as_bytes());
    key.push(0);
    key.extend_from_slice(name.as_bytes());
    key
}

/// The prefix of every per-vault record of `vault_id`.
pub(crate) fn vault_prefix(vault_id: &str) -> Vec<u8> {
    vault_key(vault_id, "")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use std::sync::Arc;

    #[test]
    fn a_store_with_a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), None, Arc::new(SystemClock), false).unwrap();
        store
            .trees
            .meta
            .insert(META_SCHEMA, &(SCHEMA_VERSION + 1).to_be_bytes())
            .unwrap();
        store.db.flush().unwrap();
        drop(store);
        let err = crate::testing::reopen(dir.path())
            .err()
            .expect("newer schema refused");
        assert!(matches!(err, OpenError::NewerSchema { .. }), "{err}");
        assert!(err.to_string().contains("upgrade agent-vault"));
    }

    #[test]
    fn rule_writes_bump_the_snapshot_version_and_others_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), None, Arc::new(SystemClock), false).unwrap();
        let v0 = store.snapshot_version().unwrap();
        store.write(|_| Ok(())).unwrap();
        assert_eq!(store.snapshot_version().unwrap(), v0);
        store.write_published(|_| Ok(())).unwrap();
        assert_eq!(store.snapshot_version().unwrap(), v0 + 1);
    }
}
