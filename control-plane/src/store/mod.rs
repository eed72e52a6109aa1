//! The store: trees, schema version, transactions, durability and the data key, on
//! one of two backends chosen at start ([`StoreLocation`], `--store`): the embedded
//! sled database (the default), or PostgreSQL, which several control planes share
//! ([`postgres`]). The domain code sees one interface ([`kv`]): named trees of
//! ordered keys, read directly or inside a transaction over all of them.
//!
//! Every write goes through [`Store::write`] or [`Store::write_published`]: one
//! transaction over all trees (so a change that touches several keys is all or
//! nothing; serializable on PostgreSQL, retried on conflict on both), made durable
//! (sled's flush, PostgreSQL's commit) before the caller gets an answer — an
//! acknowledged write survives `kill -9`. Writes that change what the data plane sees
//! (vaults, services, agents, credentials) also bump the snapshot version inside the
//! same transaction, so the filter can never see new rules with an old version; the
//! new version is then announced on [`Store::watch_version`] (on PostgreSQL also to
//! every other control plane, by NOTIFY), which the data plane's long-poll waits on.
//!
//! With several control planes on one database, one of them may rotate the data key:
//! the others take the new key when the change reaches them ([`Store::data_key`]), and
//! refuse a write made with the old one meanwhile (it would seal with a key that is
//! gone); reads retry with the new key ([`Store::open_with_data_key`]).
//!
//! Concept modules (`access`, `users`, `vaults`, `credentials`, `services`, `agents`,
//! `proposals`, `logs`) add their operations as `impl Store` blocks; this module only
//! knows about storage.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionalTree};
use sled::Transactional;

use crate::clock::SharedClock;
use crate::crypto::{KdfParams, Key, PasswordHashing, DATA_KEY_AAD};
use crate::error::{Error, Result};

mod kv;
mod postgres;

pub(crate) use kv::{prefix_end, Batch, Bytes, Tree, TxError, TxResult, TxTree};
use postgres::{PgTx, Postgres};

/// Bumped when the layout of the records changes; a newer store is refused.
pub const SCHEMA_VERSION: u32 = 1;

const META_SCHEMA: &[u8] = b"schema_version";
const META_DATA_KEY: &[u8] = b"data_key";
/// A random id of the current data key, new with each key: another control plane on
/// the same database sees from it that the key was rotated.
const META_DATA_KEY_ID: &[u8] = b"data_key_id";
const META_VERSION: &[u8] = b"snapshot_version";

/// File that holds the key-encryption key in passwordless mode.
pub const KEY_FILE: &str = "master.key";

/// Aborts the surrounding transaction with `error`.
pub(crate) fn abort<T>(error: Error) -> TxResult<T> {
    Err(TxError::Abort(error))
}

macro_rules! trees {
    ($($name:ident),* $(,)?) => {
        /// Handles on every tree, for reads outside transactions.
        #[derive(Clone)]
        pub(crate) struct Trees { $(pub $name: Tree,)* }

        impl Trees {
            /// The trees of a sled database, and the same trees as sled handles for
            /// its transactions.
            fn sled(db: &sled::Db) -> sled::Result<(Trees, Vec<sled::Tree>)> {
                $(let $name = db.open_tree(stringify!($name))?;)*
                let all = vec![$($name.clone(),)*];
                Ok((Trees { $($name: Tree::sled(stringify!($name), $name),)* }, all))
            }

            fn postgres(pg: &Arc<Postgres>) -> Trees {
                Trees { $($name: Tree::postgres(stringify!($name), pg.clone()),)* }
            }

            /// Every tree, for tests that look at the raw bytes.
            #[cfg(test)]
            pub(crate) fn all_for_tests(&self) -> Vec<Tree> {
                vec![$(self.$name.clone(),)*]
            }
        }

        /// The same trees inside one transaction. Not every tree is written
        /// transactionally (the request log appends in batches).
        #[allow(dead_code)]
        #[derive(Clone, Copy)]
        pub(crate) struct Tx<'a> { $(pub $name: TxTree<'a>,)* }

        impl<'a> Tx<'a> {
            fn sled(trees: &'a [TransactionalTree]) -> Tx<'a> {
                let mut it = trees.iter();
                Tx { $($name: TxTree::sled(
                    stringify!($name),
                    it.next().expect("one transactional tree per tree"),
                ),)* }
            }

            fn postgres(tx: &'a PgTx<'a>) -> Tx<'a> {
                Tx { $($name: TxTree::postgres(stringify!($name), tx),)* }
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
    login_failures,
    log_counts,
);

/// Where the store keeps its data, chosen at start (`--store`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// The embedded sled database: in the given directory, or `<data dir>/store`.
    Sled(Option<PathBuf>),
    /// A PostgreSQL database (a `postgres://` URL), which several control planes may
    /// share.
    Postgres(String),
}

impl std::str::FromStr for StoreLocation {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<StoreLocation, String> {
        if text == "sled" {
            return Ok(StoreLocation::Sled(None));
        }
        if let Some(dir) = text.strip_prefix("sled:") {
            if dir.is_empty() {
                return Err(
                    "sled: needs a directory (sled:/path/to/dir), or give just `sled`".into(),
                );
            }
            return Ok(StoreLocation::Sled(Some(PathBuf::from(dir))));
        }
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            return Ok(StoreLocation::Postgres(text.to_string()));
        }
        Err(format!(
            "unknown store {text:?}: give `sled` (the default), `sled:DIR` or a postgres:// URL"
        ))
    }
}

impl StoreLocation {
    /// The location for messages: a PostgreSQL URL without its password.
    pub fn describe(&self, data_dir: &Path) -> String {
        match self {
            StoreLocation::Sled(dir) => {
                let dir = dir.clone().unwrap_or_else(|| data_dir.join("store"));
                format!("sled in {}", dir.display())
            }
            StoreLocation::Postgres(url) => format!("PostgreSQL at {}", redact_password(url)),
        }
    }
}

/// `url` with any password in it replaced by `***`.
fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let authority = match authority.rsplit_once('@') {
        Some((user, host)) => match user.split_once(':') {
            Some((name, _)) => format!("{name}:***@{host}"),
            None => authority.to_string(),
        },
        None => authority.to_string(),
    };
    let tail = match tail.split_once("password=") {
        Some((before, after)) => {
            let rest = after.find('&').map_or("", |at| &after[at..]);
            format!("{before}password=***{rest}")
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}

enum Backend {
    /// The database, and its trees as sled handles for transactions.
    Sled(sled::Db, Vec<sled::Tree>),
    Postgres(Arc<Postgres>),
}

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
    #[error("cannot open the PostgreSQL store at {0}: {1}")]
    Postgres(String, String),
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

/// The data key this process uses, and where it came from.
struct DataKeyOrigin {
    /// `meta/data_key_id` when the key was loaded or made.
    id: Bytes,
    /// `meta/data_key` as this process last read or wrote it.
    record: Bytes,
}

pub struct Store {
    backend: Backend,
    pub(crate) trees: Trees,
    data_dir: PathBuf,
    /// Held for reading by everything that seals or opens a value (across the
    /// transaction that stores it), and for writing by rotation, so no value is ever
    /// sealed with a key that is being replaced.
    data_key: RwLock<Key>,
    data_key_origin: Mutex<DataKeyOrigin>,
    /// Set when another control plane may have rotated the data key (PostgreSQL):
    /// the next use of the key checks `meta/data_key_id` first.
    data_key_stale: Arc<AtomicBool>,
    kek: Mutex<Kek>,
    pub(crate) clock: SharedClock,
    pub(crate) allow_private_upstreams: bool,
    /// Every user-password hash goes through it (bounded; see its doc).
    pub(crate) passwords: PasswordHashing,
    /// The bootstrap and local-login tokens of this process ([`crate::users`]).
    pub(crate) local_tokens: LocalTokens,
    /// The snapshot version as last known: every published write sends the version
    /// it committed (and on PostgreSQL, so do other control planes' writes, through
    /// the change listener), so the data plane's long-poll wakes at once.
    version: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Store {
    /// Opens (or creates) the storage at `location` (sled: in `data_dir` unless the
    /// location says where). With `password`, the data key is wrapped by an Argon2id
    /// key derived from it; without, by the key file in `data_dir`.
    /// [`Store::open`] (in [`crate::vaults`]) is this plus the `default` vault.
    pub(crate) fn open_storage(
        location: &StoreLocation,
        data_dir: &Path,
        password: Option<&str>,
        clock: SharedClock,
        allow_private_upstreams: bool,
    ) -> std::result::Result<Store, OpenError> {
        create_private_dir(data_dir)
            .map_err(|e| OpenError::KeyFile(data_dir.to_path_buf(), e.to_string()))?;
        let (backend, trees, path) = match location {
            StoreLocation::Sled(dir) => {
                let path = dir.clone().unwrap_or_else(|| data_dir.join("store"));
                create_private_dir(&path)
                    .map_err(|e| OpenError::KeyFile(path.clone(), e.to_string()))?;
                let db = sled::Config::new()
                    .path(&path)
                    .open()
                    .map_err(|e| OpenError::Sled(path.clone(), e))?;
                let (trees, all) =
                    Trees::sled(&db).map_err(|e| OpenError::Sled(path.clone(), e))?;
                (Backend::Sled(db, all), trees, path)
            }
            StoreLocation::Postgres(url) => {
                let described = redact_password(url);
                let pg = Postgres::connect(url)
                    .map_err(|e| OpenError::Postgres(described.clone(), e))?;
                let trees = Trees::postgres(&pg);
                (Backend::Postgres(pg), trees, PathBuf::from(described))
            }
        };
        let storage_err = |e: Error| OpenError::Corrupt(e.to_string());

        // A fresh store gets this version; an existing one is checked.
        trees
            .meta
            .insert_new(META_SCHEMA, SCHEMA_VERSION.to_be_bytes())
            .map_err(storage_err)?;
        let raw = trees.meta.get(META_SCHEMA).map_err(storage_err)?;
        let found = u32::from_be_bytes(
            raw.as_deref()
                .and_then(|raw| raw.try_into().ok())
                .ok_or_else(|| OpenError::Corrupt("schema version".into()))?,
        );
        if found > SCHEMA_VERSION {
            return Err(OpenError::NewerSchema { path, found });
        }

        let key_file = data_dir.join(KEY_FILE);
        let stored = trees.meta.get(META_DATA_KEY).map_err(storage_err)?;
        let (data_key, kek, record) = match stored {
            Some(raw) => {
                let (key, kek) = unwrap_stored(&raw, password, &key_file)?;
                (key, kek, raw)
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
                let id = new_data_key_id();
                trees
                    .meta
                    .insert_new(META_DATA_KEY_ID, &id)
                    .map_err(storage_err)?;
                if trees
                    .meta
                    .insert_new(META_DATA_KEY, &record)
                    .map_err(storage_err)?
                {
                    (data_key, kek, record)
                } else {
                    // Another control plane created the store at the same moment:
                    // use its key.
                    let raw = trees
                        .meta
                        .get(META_DATA_KEY)
                        .map_err(storage_err)?
                        .ok_or_else(|| OpenError::Corrupt("data key record".into()))?;
                    let (key, kek) = unwrap_stored(&raw, password, &key_file)?;
                    (key, kek, raw)
                }
            }
        };
        let id = trees
            .meta
            .get(META_DATA_KEY_ID)
            .map_err(storage_err)?
            .unwrap_or_default();
        if let Backend::Sled(db, _) = &backend {
            db.flush().map_err(|e| OpenError::Sled(path.clone(), e))?;
        }
        let version = read_version(
            trees
                .meta
                .get(META_VERSION)
                .map_err(storage_err)?
                .as_deref(),
        );

        let store = Store {
            backend,
            trees,
            data_dir: data_dir.to_path_buf(),
            data_key: RwLock::new(data_key),
            data_key_origin: Mutex::new(DataKeyOrigin { id, record }),
            data_key_stale: Arc::default(),
            kek: Mutex::new(kek),
            clock,
            allow_private_upstreams,
            passwords: PasswordHashing::for_this_machine(),
            local_tokens: LocalTokens::default(),
            version: Arc::new(tokio::sync::watch::Sender::new(version)),
        };
        if let Backend::Postgres(pg) = &store.backend {
            let version = store.version.clone();
            let stale = store.data_key_stale.clone();
            pg.listen(META_VERSION, move |committed| {
                if announce(&version, committed) {
                    stale.store(true, Ordering::Release);
                }
            });
        }
        Ok(store)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Whether several control planes may share this store (PostgreSQL).
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    pub fn is_passwordless(&self) -> bool {
        matches!(*lock(&self.kek), Kek::File(_))
    }

    pub(crate) fn now_secs(&self) -> i64 {
        self.clock.now_secs()
    }

    /// A number larger than every one returned before, also across restarts (and on
    /// PostgreSQL across control planes).
    pub(crate) fn generate_id(&self) -> Result<u64> {
        match &self.backend {
            Backend::Sled(db, _) => Ok(db.generate_id()?),
            Backend::Postgres(pg) => pg
                .next_ids(1)?
                .pop()
                .ok_or_else(|| Error::internal("no id drawn")),
        }
    }

    /// The data key; hold the guard while sealing/opening and storing the result.
    pub(crate) fn data_key(&self) -> RwLockReadGuard<'_, Key> {
        if self.data_key_stale.swap(false, Ordering::AcqRel) {
            self.reload_data_key();
        }
        self.data_key.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the data key another control plane rotated to, if it did: read from
    /// `meta`, unwrapped with this process's key-encryption key.
    fn reload_data_key(&self) {
        let stored_id = match self.trees.meta.get(META_DATA_KEY_ID) {
            Ok(id) => id.unwrap_or_default(),
            Err(error) => {
                tracing::warn!("cannot check the data key's id: {error}");
                self.data_key_stale.store(true, Ordering::Release);
                return;
            }
        };
        if stored_id == lock(&self.data_key_origin).id {
            return;
        }
        let record = match self.trees.meta.get(META_DATA_KEY) {
            Ok(Some(record)) => record,
            other => {
                tracing::warn!("cannot read the rotated data key: {other:?}");
                self.data_key_stale.store(true, Ordering::Release);
                return;
            }
        };
        let Some(new) = open_with_kek(&record, &lock(&self.kek)) else {
            tracing::error!(
                "another control plane rotated the data key, and this one cannot unwrap \
                 it (was the master password changed too?): restart this control plane \
                 with the current master password"
            );
            return;
        };
        // Not while this thread (or another) seals with the current key.
        match self.data_key.try_write() {
            Ok(mut key) => {
                *key = new;
                *lock(&self.data_key_origin) = DataKeyOrigin {
                    id: stored_id,
                    record,
                };
                tracing::info!("took the data key another control plane rotated to");
            }
            Err(_) => self.data_key_stale.store(true, Ordering::Release),
        }
    }

    /// Runs `f` in one transaction over every tree and makes it durable before
    /// returning. `f` may run more than once on conflict: it must not have side
    /// effects outside the transaction (draw random tokens before calling).
    pub(crate) fn write<R>(&self, f: impl Fn(&Tx) -> TxResult<R>) -> Result<R> {
        self.transact(false, f)
    }

    /// Applies `batch` to `tree` atomically and durably: for data that needs no
    /// transaction with other trees (the request log). Far cheaper than
    /// [`Store::write`], whose transaction spans every tree.
    pub(crate) fn apply_flushed(&self, tree: &Tree, batch: Batch) -> Result<()> {
        self.apply_flushed_all(vec![(tree, batch)])
    }

    /// [`Store::apply_flushed`] for several trees, all durable together.
    pub(crate) fn apply_flushed_all(&self, batches: Vec<(&Tree, Batch)>) -> Result<()> {
        match &self.backend {
            Backend::Sled(db, _) => {
                for (tree, batch) in batches {
                    tree.as_sled()
                        .expect("a tree of this sled store")
                        .apply_batch(sled_batch(batch))?;
                }
                db.flush()?;
                Ok(())
            }
            Backend::Postgres(pg) => pg.apply(writes_of(batches)),
        }
    }

    /// Draws `n` ids ([`Store::generate_id`]) and applies the batches `f` builds with
    /// them, so that ids become visible in the order they were drawn, also across
    /// control planes (the request log's sequences: a reader continuing after the
    /// last one it saw never misses one committed later). The caller serializes its
    /// own process's writers.
    pub(crate) fn apply_with_ids<'s, R>(
        &'s self,
        n: usize,
        f: impl FnOnce(Vec<u64>) -> Result<(Vec<(&'s Tree, Batch)>, R)>,
    ) -> Result<R> {
        match &self.backend {
            Backend::Sled(..) => {
                let ids = (0..n)
                    .map(|_| self.generate_id())
                    .collect::<Result<Vec<_>>>()?;
                let (batches, result) = f(ids)?;
                self.apply_flushed_all(batches)?;
                Ok(result)
            }
            Backend::Postgres(pg) => pg.with_log_ids(n, |ids| {
                let (batches, result) = f(ids)?;
                Ok((writes_of(batches), result))
            }),
        }
    }

    /// Like [`Store::write`], and bumps the snapshot version in the same transaction.
    pub(crate) fn write_published<R>(&self, f: impl Fn(&Tx) -> TxResult<R>) -> Result<R> {
        self.transact(true, f)
    }

    fn transact<R>(&self, bump: bool, f: impl Fn(&Tx) -> TxResult<R>) -> Result<R> {
        let (result, version) = match &self.backend {
            Backend::Sled(db, all) => {
                let outcome = all[..].transaction(|trees| {
                    run_transaction(&Tx::sled(trees), bump, &f).map_err(|e| match e {
                        TxError::Conflict => ConflictableTransactionError::Conflict,
                        TxError::Abort(e) | TxError::Storage(e) => {
                            ConflictableTransactionError::Abort(e)
                        }
                    })
                })?;
                db.flush()?;
                outcome
            }
            Backend::Postgres(pg) => pg.transact(|pg_tx| {
                let tx = Tx::postgres(pg_tx);
                self.check_data_key_id(&tx)?;
                let outcome = run_transaction(&tx, bump, &f)?;
                if let Some(version) = outcome.1 {
                    pg_tx.notify(version)?;
                }
                Ok(outcome)
            })?,
        };
        if let Some(version) = version {
            announce(&self.version, version);
        }
        Ok(result)
    }

    /// On a shared store, refuses a write made with a data key another control plane
    /// has rotated away from (the write could seal a value with the old key): the
    /// caller gets 503 and the key is reloaded before the next attempt.
    fn check_data_key_id(&self, tx: &Tx) -> TxResult<()> {
        let stored = tx.meta.get(META_DATA_KEY_ID)?.unwrap_or_default();
        if stored != lock(&self.data_key_origin).id {
            self.data_key_stale.store(true, Ordering::Release);
            return abort(Error::StoreUnavailable(
                "another control plane has just rotated the data key; try again".into(),
            ));
        }
        Ok(())
    }

    /// The snapshot version: changes on every write that affects the data plane.
    pub fn snapshot_version(&self) -> Result<u64> {
        Ok(read_version(self.trees.meta.get(META_VERSION)?.as_deref()))
    }

    /// The snapshot version as last committed or announced, without reading storage;
    /// the receiver wakes on every change (the data plane's long-poll waits on it).
    pub fn watch_version(&self) -> tokio::sync::watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Total bytes the store takes on disk.
    pub fn size_on_disk(&self) -> u64 {
        match &self.backend {
            Backend::Sled(db, _) => db.size_on_disk().unwrap_or(0),
            Backend::Postgres(pg) => pg.size_on_disk().unwrap_or(0),
        }
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
        // Not `data_key()`: its reload takes `kek`, which this holds.
        let current_key = self.data_key.read().unwrap_or_else(|p| p.into_inner());
        let record = serde_json::to_vec(&wrap_data_key(&current_key, &new_kek))?;
        drop(current_key);
        let known = lock(&self.data_key_origin).record.clone();
        self.write(|tx| {
            refuse_if_changed_elsewhere(tx, &known)?;
            tx.meta.insert(META_DATA_KEY, &record)?;
            Ok(())
        })?;
        if matches!(new_kek, Kek::Password(..)) {
            // The old key file now unwraps nothing; remove it.
            let _ = std::fs::remove_file(&key_file);
        }
        lock(&self.data_key_origin).record = record;
        *kek = new_kek;
        Ok(())
    }

    /// Replaces the data key: `list` reads what must be re-sealed, then one transaction
    /// stores the new wrapped key and calls `reseal(tx, listed, old, new)`, which
    /// returns how many values it re-sealed. Holds the data key's write lock
    /// throughout, so no value is sealed or opened with the old key while the new one
    /// takes over, and nothing is sealed between `list` and the transaction (sled
    /// cannot iterate inside one). On a shared store, the other control planes'
    /// writes with the old key fail from the commit on ([`Store::write`]), and they
    /// take the new key when the change reaches them.
    pub(crate) fn replace_data_key<L>(
        &self,
        list: impl FnOnce(&Trees) -> Result<L>,
        reseal: impl Fn(&Tx, &L, &Key, &Key) -> TxResult<usize>,
    ) -> Result<usize> {
        let kek = lock(&self.kek);
        let mut data_key = self.data_key.write().unwrap_or_else(|p| p.into_inner());
        let new = Key::generate();
        let record = serde_json::to_vec(&wrap_data_key(&new, &kek))?;
        let id = new_data_key_id();
        let known = lock(&self.data_key_origin).record.clone();
        let listed = list(&self.trees)?;
        let count = self.write_published(|tx| {
            refuse_if_changed_elsewhere(tx, &known)?;
            tx.meta.insert(META_DATA_KEY, &record)?;
            tx.meta.insert(META_DATA_KEY_ID, &id)?;
            reseal(tx, &listed, &data_key, &new)
        })?;
        *data_key = new;
        *lock(&self.data_key_origin) = DataKeyOrigin { id, record };
        Ok(count)
    }
}

impl Store {
    /// Opens sealed values with the data key: runs `f` with it and, on a shared
    /// store, when `f` fails because another control plane rotated the key after this
    /// one last took it (the rotation committed, its notification not here yet, so
    /// the values read are sealed with a key this process does not hold yet), takes
    /// the new key and runs `f` once more. Any other failure is `f`'s own.
    pub(crate) fn open_with_data_key<R>(&self, f: impl Fn(&Key) -> Result<R>) -> Result<R> {
        let first = f(&self.data_key());
        if first.is_ok() || !matches!(self.backend, Backend::Postgres(_)) {
            return first;
        }
        let before = lock(&self.data_key_origin).id.clone();
        // A few tries: the new key is taken only while no other thread holds the
        // current one (`reload_data_key`), which they do for one request at most.
        for _ in 0..50 {
            self.reload_data_key();
            if lock(&self.data_key_origin).id != before {
                return f(&self.data_key());
            }
            if !self.data_key_stale.load(Ordering::Acquire) {
                break; // not rotated (or not unwrappable, logged): the failure stands
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        first
    }
}

/// Refuses to re-wrap or replace the data key when another control plane changed
/// `meta/data_key` since this one read it (a new master password there would
/// otherwise be overwritten by a record wrapped with the old one).
fn refuse_if_changed_elsewhere(tx: &Tx, known: &[u8]) -> TxResult<()> {
    if tx.meta.get(META_DATA_KEY)?.as_deref() != Some(known) {
        return abort(Error::conflict(
            "master_key_changed",
            "another control plane changed the master password or the data key; restart \
             this control plane (with the current master password) and try again",
        ));
    }
    Ok(())
}

/// Runs a transaction's closure and, when `bump`, moves the snapshot version on in
/// the same transaction: returns the closure's result and the new version.
fn run_transaction<R>(
    tx: &Tx,
    bump: bool,
    f: &impl Fn(&Tx) -> TxResult<R>,
) -> TxResult<(R, Option<u64>)> {
    let result = f(tx)?;
    if !bump {
        return Ok((result, None));
    }
    let version = read_version(tx.meta.get(META_VERSION)?.as_deref()) + 1;
    tx.meta.insert(META_VERSION, version.to_be_bytes())?;
    Ok((result, Some(version)))
}

/// Records `version` as committed (never moving back) and wakes its watchers; `true`
/// when it is newer than the one known.
fn announce(sender: &tokio::sync::watch::Sender<u64>, version: u64) -> bool {
    sender.send_if_modified(|known| {
        let newer = version > *known;
        if newer {
            *known = version;
        }
        newer
    })
}

fn new_data_key_id() -> Bytes {
    crate::crypto::new_token("dk_").into_bytes()
}

fn sled_batch(batch: Batch) -> sled::Batch {
    let mut sled_batch = sled::Batch::default();
    for (key, value) in batch.0 {
        match value {
            Some(value) => sled_batch.insert(key, value),
            None => sled_batch.remove(key),
        }
    }
    sled_batch
}

fn writes_of(batches: Vec<(&Tree, Batch)>) -> Vec<(&'static str, Bytes, Option<Bytes>)> {
    batches
        .into_iter()
        .flat_map(|(tree, batch)| {
            let name = tree.name();
            batch
                .0
                .into_iter()
                .map(move |(key, value)| (name, key, value))
        })
        .collect()
}

/// Unwraps a stored `meta/data_key` record as the process was started (password or
/// key file).
fn unwrap_stored(
    raw: &[u8],
    password: Option<&str>,
    key_file: &Path,
) -> std::result::Result<(Key, Kek), OpenError> {
    let record: WrappedDataKey = serde_json::from_slice(raw)
        .map_err(|e| OpenError::Corrupt(format!("data key record: {e}")))?;
    unwrap_data_key(&record, password, key_file)
}

/// Unwraps a stored record with the key-encryption key already in memory (`None`
/// when it does not fit: another password, another key file).
fn open_with_kek(raw: &[u8], kek: &Kek) -> Option<Key> {
    let record: WrappedDataKey = serde_json::from_slice(raw).ok()?;
    let (key, wrapped) = match (&record, kek) {
        (WrappedDataKey::File { wrapped }, Kek::File(key)) => (key, wrapped),
        (WrappedDataKey::Password { kdf, wrapped }, Kek::Password(key, ours)) if kdf == ours => {
            (key, wrapped)
        }
        _ => return None,
    };
    let plain = key.open(DATA_KEY_AAD, &hex::decode(wrapped).ok()?).ok()?;
    Key::from_bytes(&plain)
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
    tree: TxTree<'_>,
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
    tree: TxTree<'_>,
    key: impl AsRef<[u8]>,
    value: &T,
) -> TxResult<()> {
    match serde_json::to_vec(value) {
        Ok(raw) => tree.insert(key.as_ref(), raw),
        Err(e) => abort(e.into()),
    }
}

/// Reads a JSON record outside a transaction.
pub(crate) fn read_json<T: DeserializeOwned>(
    tree: &Tree,
    key: impl AsRef<[u8]>,
) -> Result<Option<T>> {
    match tree.get(key.as_ref())? {
        Some(raw) => Ok(Some(serde_json::from_slice(&raw)?)),
        None => Ok(None),
    }
}

/// Every JSON record of a tree (or of the keys under `prefix`), in key order.
pub(crate) fn scan_json<T: DeserializeOwned>(
    tree: &Tree,
    prefix: impl AsRef<[u8]>,
) -> Result<Vec<(Bytes, T)>> {
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
mod tests;
