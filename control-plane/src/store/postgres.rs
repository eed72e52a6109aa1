//! The PostgreSQL backend: the trees of [`super::kv`] as rows of one table, shared by
//! every control plane that opens the same database.
//!
//! - **Schema**: versioned migrations ([`MIGRATIONS`]), applied at start in one
//!   transaction under an advisory lock, so control planes starting together apply
//!   them once; a database migrated by a newer agent-vault is refused.
//! - **Transactions** are `SERIALIZABLE`: a closure reads and writes through its
//!   transaction, and on a serialization failure (or deadlock) it runs again, as on
//!   sled. Commit is synchronous (PostgreSQL's default `synchronous_commit`), so an
//!   acknowledged write survives `kill -9` of the control plane.
//! - **Changes reach every control plane**: a write that bumps the snapshot version
//!   sends `NOTIFY agent_vault_snapshot` with the version in its transaction (delivered
//!   at commit); each control plane `LISTEN`s on a connection of its own and also reads
//!   the version row every [`VERSION_POLL`] as the fallback (a lost listener connection
//!   is re-established with backoff, and the row read at once).
//! - **The driver**: tokio-postgres with a deadpool pool, on a small runtime this
//!   backend owns. The domain code is synchronous (run on the HTTP server's blocking
//!   pool); each statement is waited on from the calling thread, with the runtime
//!   entered so the pool's timers work.
//! - **Unavailable database**: every error reaching the database is 503
//!   `store_unavailable`; the pool drops broken connections and opens new ones when
//!   the database is back, so the control plane recovers without a restart.

use std::future::Future;
use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::kv::{Bytes, TxError, TxResult};

type PgResult<T> = std::result::Result<T, tokio_postgres::Error>;
use crate::error::{Error, Result};

/// The key-value table: one row per key of every tree (created by [`MIGRATIONS`]).
const TABLE: &str = "agent_vault_kv";
/// The statements on it, each written once.
const SELECT_VALUE: &str = "SELECT value FROM agent_vault_kv WHERE tree = $1 AND key = $2";
const INSERT_NEW: &str =
    "INSERT INTO agent_vault_kv (tree, key, value) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING";
const UPSERT: &str = "INSERT INTO agent_vault_kv (tree, key, value) VALUES ($1, $2, $3) \
                      ON CONFLICT (tree, key) DO UPDATE SET value = EXCLUDED.value";
const DELETE: &str = "DELETE FROM agent_vault_kv WHERE tree = $1 AND key = $2 RETURNING value";
const COUNT: &str = "SELECT count(*) FROM agent_vault_kv WHERE tree = $1";
/// A PEM file of the roots that check the database's certificate (`sslmode=require`)
/// instead of the system's.
pub(crate) const STORE_CA_ENV: &str = "AGENT_VAULT_STORE_CA";
/// The notification channel of snapshot version changes.
pub(crate) const CHANNEL: &str = "agent_vault_snapshot";
/// How often the version row is read besides the notifications.
pub(crate) const VERSION_POLL: Duration = Duration::from_secs(1);
/// Serialization failures retried before the write gives up.
const MAX_ATTEMPTS: u32 = 64;
/// Connections per control plane (plus the listener's own).
const POOL_SIZE: usize = 16;
/// How long a statement waits for a pooled connection or a new one.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Taken (transaction-scoped) while migrations are applied.
const MIGRATION_LOCK: i64 = 0x6167_656e_7476_6d31;
/// Taken (transaction-scoped) by writers of the request log, so log sequences commit
/// in the order they are drawn across control planes.
const LOG_LOCK: i64 = 0x6167_656e_7476_6c67;

/// The schema, one migration per entry; entry `i` is version `i + 1`. Never edit an
/// entry that has shipped: add one.
const MIGRATIONS: &[&str] = &["
    CREATE TABLE agent_vault_kv (
        tree  text  NOT NULL,
        key   bytea NOT NULL,
        value bytea NOT NULL,
        PRIMARY KEY (tree, key)
    );
    CREATE SEQUENCE agent_vault_ids START 1;
"];

pub(crate) struct Postgres {
    pool: Pool,
    config: tokio_postgres::Config,
    /// With `sslmode=require`: TLS, the server's certificate checked. Otherwise none
    /// (a Unix socket, or a network the operator trusts: libpq's `prefer` would take
    /// any certificate, which is no protection).
    tls: Option<MakeRustlsConnect>,
    /// The runtime the pool's connections (and the listener) run on; shut down in the
    /// background on drop, so a store may be dropped anywhere, async code included.
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// A database error as the caller sees it: the database is unreachable or refused
/// (with the causes, e.g. why a TLS handshake failed).
fn unavailable(error: impl std::error::Error) -> Error {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    Error::StoreUnavailable(format!("the PostgreSQL store is unavailable: {message}"))
}

fn is_conflict(error: &tokio_postgres::Error) -> bool {
    matches!(
        error.code(),
        Some(&SqlState::T_R_SERIALIZATION_FAILURE) | Some(&SqlState::T_R_DEADLOCK_DETECTED)
    )
}

fn tx_error(error: tokio_postgres::Error) -> TxError {
    if is_conflict(&error) {
        TxError::Conflict
    } else {
        TxError::Storage(unavailable(error))
    }
}

impl Postgres {
    /// Connects to `url` (a libpq-style URL or key=value string), applies the
    /// migrations and returns the backend. `Err` is a message for the operator.
    pub(crate) fn connect(url: &str) -> std::result::Result<Arc<Postgres>, String> {
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| format!("not a PostgreSQL connection URL: {e}"))?;
        let tls = match config.get_ssl_mode() {
            tokio_postgres::config::SslMode::Require => Some(tls_connector()?),
            _ => None,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("agent-vault-postgres")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the PostgreSQL runtime: {e}"))?;
        let handle = runtime.handle().clone();
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match &tls {
            Some(tls) => Manager::from_config(config.clone(), tls.clone(), manager_config),
            None => Manager::from_config(config.clone(), NoTls, manager_config),
        };
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| format!("cannot create the connection pool: {e}"))?;
        let pg = Postgres {
            pool,
            config,
            tls,
            runtime: Some(runtime),
            handle,
        };
        pg.migrate()?;
        Ok(Arc::new(pg))
    }

    /// Waits for `future` on this thread, with the backend's runtime entered.
    fn block<F: Future>(&self, future: F) -> F::Output {
        let _entered = self.handle.enter();
        futures_executor::block_on(future)
    }

    /// [`Postgres::block`] for a database call: its error is 503 `store_unavailable`.
    fn run<T>(&self, call: impl Future<Output = PgResult<T>>) -> Result<T> {
        self.block(call).map_err(unavailable)
    }

    fn client(&self) -> Result<Object> {
        self.block(self.pool.get()).map_err(unavailable)
    }

    fn migrate(&self) -> std::result::Result<(), String> {
        let mut client = self.client().map_err(|e| e.to_string())?;
        self.block(async {
            let tx = client.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .await?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS agent_vault_migrations (
                     version integer PRIMARY KEY,
                     applied_at timestamptz NOT NULL DEFAULT now()
                 )",
            )
            .await?;
            let applied: i32 = tx
                .query_one(
                    "SELECT coalesce(max(version), 0) FROM agent_vault_migrations",
                    &[],
                )
                .await?
                .get(0);
            let known = MIGRATIONS.len() as i32;
            if applied > known {
                return Ok(Err(format!(
                    "the database has schema version {applied}, newer than this \
                     agent-vault supports ({known}); upgrade agent-vault"
                )));
            }
            for (index, migration) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
                tx.batch_execute(migration).await?;
                let version = index as i32 + 1;
                tx.execute(
                    "INSERT INTO agent_vault_migrations (version) VALUES ($1)",
                    &[&version],
                )
                .await?;
            }
            tx.commit().await?;
            Ok::<_, tokio_postgres::Error>(Ok(()))
        })
        .map_err(|e| format!("cannot apply the schema migrations: {e}"))?
    }

    pub(crate) fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Bytes>> {
        let client = self.client()?;
        self.run(value_of(&client, SELECT_VALUE, tree, key))
    }

    pub(crate) fn insert_new(&self, tree: &str, key: &[u8], value: &[u8]) -> Result<bool> {
        let client = self.client()?;
        self.run(async {
            let statement = client.prepare_cached(INSERT_NEW).await?;
            Ok(client.execute(&statement, &[&tree, &key, &value]).await? == 1)
        })
    }

    pub(crate) fn count(&self, tree: &str) -> Result<usize> {
        let client = self.client()?;
        self.run(async {
            let row = client.query_one(COUNT, &[&tree]).await?;
            Ok(row.get::<_, i64>(0) as usize)
        })
    }

    /// Up to `limit` rows of `tree` between the bounds, in key order (or reversed).
    pub(crate) fn page(
        &self,
        tree: &str,
        from: &Bound<Bytes>,
        to: &Bound<Bytes>,
        reverse: bool,
        limit: i64,
    ) -> Result<Vec<(Bytes, Bytes)>> {
        let mut sql = format!("SELECT key, value FROM {TABLE} WHERE tree = $1");
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&tree];
        for (bound, inclusive, exclusive) in [(from, ">=", ">"), (to, "<=", "<")] {
            let (op, key) = match bound {
                Bound::Included(key) => (inclusive, key),
                Bound::Excluded(key) => (exclusive, key),
                Bound::Unbounded => continue,
            };
            params.push(key);
            sql.push_str(&format!(" AND key {op} ${}", params.len()));
        }
        sql.push_str(if reverse {
            " ORDER BY key DESC"
        } else {
            " ORDER BY key"
        });
        params.push(&limit);
        sql.push_str(&format!(" LIMIT ${}", params.len()));
        let client = self.client()?;
        self.run(async {
            let statement = client.prepare_cached(&sql).await?;
            let rows = client.query(&statement, &params).await?;
            Ok(rows
                .into_iter()
                .map(|row| (row.get::<_, Vec<u8>>(0), row.get::<_, Vec<u8>>(1)))
                .collect())
        })
    }

    /// Bytes the key-value table takes, with its index and TOAST data.
    pub(crate) fn size_on_disk(&self) -> Result<u64> {
        let client = self.client()?;
        self.run(async {
            let sql = format!("SELECT pg_total_relation_size('{TABLE}')");
            let row = client.query_one(&sql, &[]).await?;
            Ok(row.get::<_, i64>(0) as u64)
        })
    }

    /// Applies `writes` (`None`: remove) in one transaction.
    pub(crate) fn apply(&self, writes: Vec<(&'static str, Bytes, Option<Bytes>)>) -> Result<()> {
        let mut client = self.client()?;
        self.run(async {
            let tx = client.transaction().await?;
            write_all(&tx, &writes).await?;
            tx.commit().await
        })
    }

    /// `n` new ids, larger than every one drawn before by any control plane.
    pub(crate) fn next_ids(&self, n: usize) -> Result<Vec<u64>> {
        let client = self.client()?;
        self.run(async {
            let rows = client
                .query(
                    "SELECT nextval('agent_vault_ids') FROM generate_series(1, $1)",
                    &[&(n as i32)],
                )
                .await?;
            Ok(rows.iter().map(|row| row.get::<_, i64>(0) as u64).collect())
        })
    }

    /// Draws `n` ids and applies the writes `f` builds from them in one transaction
    /// that holds the request log's lock from the draw to the commit: ids commit in
    /// the order they are drawn, across control planes, so a reader continuing after
    /// the last id it saw never skips one that commits later.
    pub(crate) fn with_log_ids<R>(
        &self,
        n: usize,
        f: impl FnOnce(Vec<u64>) -> Result<(Vec<(&'static str, Bytes, Option<Bytes>)>, R)>,
    ) -> Result<R> {
        let mut client = self.client()?;
        let tx = self
            .block(async {
                let tx = client.transaction().await?;
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOG_LOCK])
                    .await?;
                Ok::<_, tokio_postgres::Error>(tx)
            })
            .map_err(unavailable)?;
        let ids = self
            .block(tx.query(
                "SELECT nextval('agent_vault_ids') FROM generate_series(1, $1)",
                &[&(n as i32)],
            ))
            .map_err(unavailable)?
            .iter()
            .map(|row| row.get::<_, i64>(0) as u64)
            .collect();
        let (writes, result) = f(ids)?;
        self.run(async {
            write_all(&tx, &writes).await?;
            tx.commit().await
        })?;
        Ok(result)
    }

    /// Runs `f` in a serializable transaction, again on a serialization failure.
    pub(crate) fn transact<R>(&self, f: impl Fn(&PgTx) -> TxResult<R>) -> Result<R> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let client = self.client()?;
            self.block(client.batch_execute("BEGIN ISOLATION LEVEL SERIALIZABLE"))
                .map_err(unavailable)?;
            let tx = PgTx {
                pg: self,
                client: &client,
            };
            let outcome = match f(&tx) {
                Ok(result) => match self.block(client.batch_execute("COMMIT")) {
                    Ok(()) => return Ok(result),
                    Err(e) if is_conflict(&e) => TxError::Conflict,
                    Err(e) => return Err(unavailable(e)),
                },
                Err(error) => error,
            };
            // A broken connection cannot roll back; the pool drops it.
            let _ = self.block(client.batch_execute("ROLLBACK"));
            match outcome {
                TxError::Conflict if attempt < MAX_ATTEMPTS => {
                    // Back off a little, more each time, so the writers spread out.
                    let jitter = rand::random::<u64>() % (u64::from(attempt) * 2 + 1);
                    std::thread::sleep(Duration::from_millis(jitter));
                }
                TxError::Conflict => {
                    return Err(Error::StoreUnavailable(
                        "too many concurrent writes conflicted in the PostgreSQL store; try again"
                            .into(),
                    ))
                }
                TxError::Abort(e) | TxError::Storage(e) => return Err(e),
            }
        }
    }

    /// Starts listening for version changes made by any control plane: `changed` gets
    /// every version notified or read from the row (it ignores ones it knows).
    pub(crate) fn listen(
        self: &Arc<Postgres>,
        version_key: &'static [u8],
        changed: impl Fn(u64) + Send + Sync + 'static,
    ) {
        let weak = Arc::downgrade(self);
        let config = self.config.clone();
        let tls = self.tls.clone();
        self.handle.spawn(async move {
            let changed = Arc::new(changed);
            let mut backoff = Duration::from_millis(50);
            loop {
                match listen_once(&config, tls.as_ref(), &weak, version_key, changed.clone()).await
                {
                    Ok(()) => return,
                    Err(error) => {
                        // The next connection reads the version row first, so nothing
                        // notified meanwhile is missed.
                        tracing::warn!(
                            "PostgreSQL change notifications interrupted ({error}); \
                             reconnecting, and reading the version every {VERSION_POLL:?} meanwhile"
                        );
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(VERSION_POLL);
            }
        });
    }
}

/// One listening connection's life: `Ok` when the backend is gone, `Err` when the
/// connection failed.
async fn listen_once(
    config: &tokio_postgres::Config,
    tls: Option<&MakeRustlsConnect>,
    backend: &std::sync::Weak<Postgres>,
    version_key: &'static [u8],
    changed: Arc<impl Fn(u64) + Send + Sync + 'static>,
) -> std::result::Result<(), String> {
    let (notes, mut notified) = tokio::sync::mpsc::unbounded_channel();
    let (client, driver) = match tls {
        Some(tls) => {
            let (client, connection) = config
                .connect(tls.clone())
                .await
                .map_err(|e| e.to_string())?;
            (
                client,
                tokio::spawn(forward_notifications(connection, notes)),
            )
        }
        None => {
            let (client, connection) = config.connect(NoTls).await.map_err(|e| e.to_string())?;
            (
                client,
                tokio::spawn(forward_notifications(connection, notes)),
            )
        }
    };
    let result = async {
        client
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .await
            .map_err(|e| e.to_string())?;
        let read_version = || async {
            let row = client
                .query_opt(SELECT_VALUE, &[&"meta", &version_key])
                .await
                .map_err(|e| e.to_string())?;
            Ok::<u64, String>(
                row.and_then(|row| row.get::<_, Vec<u8>>(0).as_slice().try_into().ok())
                    .map(u64::from_be_bytes)
                    .unwrap_or(0),
            )
        };
        // Whatever changed while nobody listened.
        changed(read_version().await?);
        let mut poll = tokio::time::interval(VERSION_POLL);
        loop {
            if backend.strong_count() == 0 {
                return Ok(());
            }
            tokio::select! {
                note = notified.recv() => match note {
                    Some(payload) => {
                        if let Ok(version) = payload.parse() {
                            changed(version);
                        }
                    }
                    None => return Err("the connection closed".to_string()),
                },
                _ = poll.tick() => changed(read_version().await?),
            }
        }
    }
    .await;
    driver.abort();
    result
}

/// Drives a listening connection, sending each notification's payload on; ends when
/// the connection does.
async fn forward_notifications<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    notes: tokio::sync::mpsc::UnboundedSender<String>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
        match message {
            Ok(tokio_postgres::AsyncMessage::Notification(note)) => {
                let _ = notes.send(note.payload().to_string());
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
}

/// The TLS of `sslmode=require`: the server's certificate must chain to a root of the
/// system's store, or to one in the PEM file `AGENT_VAULT_STORE_CA` (a managed
/// database's own CA), and name the host.
fn tls_connector() -> std::result::Result<MakeRustlsConnect, String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match std::env::var_os(STORE_CA_ENV) {
        Some(path) => {
            let certs = rustls::pki_types::CertificateDer::pem_file_iter(&path)
                .and_then(|certs| certs.collect::<std::result::Result<Vec<_>, _>>())
                .map_err(|e| format!("{STORE_CA_ENV}={}: {e}", Path::new(&path).display()))?;
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| format!("{STORE_CA_ENV}={}: {e}", Path::new(&path).display()))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    if roots.is_empty() {
        return Err(format!(
            "sslmode=require, and no root certificate to check the server with: install the \
             system's CA certificates or set {STORE_CA_ENV} to a PEM file"
        ));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

async fn write_all(
    tx: &tokio_postgres::Transaction<'_>,
    writes: &[(&'static str, Bytes, Option<Bytes>)],
) -> std::result::Result<(), tokio_postgres::Error> {
    let upsert = tx.prepare(UPSERT).await?;
    let delete = tx.prepare(DELETE).await?;
    for (tree, key, value) in writes {
        match value {
            Some(value) => tx.execute(&upsert, &[tree, key, value]).await?,
            None => tx.execute(&delete, &[tree, key]).await?,
        };
    }
    Ok(())
}

/// The `value` `sql` returns for `(tree, key)` (a select, or a delete's `RETURNING`),
/// with the connection's cached statement.
async fn value_of(client: &Object, sql: &str, tree: &str, key: &[u8]) -> PgResult<Option<Bytes>> {
    let statement = client.prepare_cached(sql).await?;
    let row = client.query_opt(&statement, &[&tree, &key]).await?;
    Ok(row.map(|row| row.get::<_, Vec<u8>>(0)))
}

/// An open serializable transaction ([`Postgres::transact`]).
pub(crate) struct PgTx<'a> {
    pg: &'a Postgres,
    client: &'a Object,
}

impl PgTx<'_> {
    fn in_tx<T>(&self, call: impl Future<Output = PgResult<T>>) -> TxResult<T> {
        self.pg.block(call).map_err(tx_error)
    }

    pub(crate) fn get(&self, tree: &str, key: &[u8]) -> TxResult<Option<Bytes>> {
        self.in_tx(value_of(self.client, SELECT_VALUE, tree, key))
    }

    pub(crate) fn insert(&self, tree: &str, key: &[u8], value: &[u8]) -> TxResult<()> {
        self.in_tx(async {
            let statement = self.client.prepare_cached(UPSERT).await?;
            self.client
                .execute(&statement, &[&tree, &key, &value])
                .await
                .map(drop)
        })
    }

    pub(crate) fn remove(&self, tree: &str, key: &[u8]) -> TxResult<Option<Bytes>> {
        self.in_tx(value_of(self.client, DELETE, tree, key))
    }

    /// Tells every listening control plane, at commit, that `version` is current.
    pub(crate) fn notify(&self, version: u64) -> TxResult<()> {
        self.pg
            .block(self.client.execute(
                "SELECT pg_notify($1, $2)",
                &[&CHANNEL, &version.to_string()],
            ))
            .map(drop)
            .map_err(tx_error)
    }
}
