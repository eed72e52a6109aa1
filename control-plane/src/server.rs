//! Starting and stopping the server: the TCP listener for the management API and UI,
//! the Unix socket for the data plane, and the SDS socket Envoy fetches the leaf
//! certificates of HTTPS interception from ([`crate::sds`]).
//!
//! [`serve`] takes pre-bound listeners and a shutdown future so tests bind port 0 and
//! stop cleanly; [`run_from_args`] is what `agent-vault server` does around it.
//!
//! The TCP listener bounds what a client can hold ([`ListenerLimits`]): a connection
//! must send each request's headers within [`HEADER_TIMEOUT`] (which also closes a
//! keep-alive connection idle that long), a body must arrive within
//! [`BODY_TIMEOUT`], and at most [`MAX_CONNECTIONS`] are served at once (more wait in
//! the kernel's backlog). axum's `serve` has no header timeout, so the accept loop is
//! hyper's own HTTP/1 connection with a timer; it serves a plain TCP listener and
//! [`crate::tls::TlsListener`] alike. Per-address limits would not help: on loopback
//! every client, agent or human, has the same address.
//!
//! The data-plane socket is the trust boundary between Envoy and everything else:
//! whoever can connect can fetch credentials. So it lives in a 0700 (or 0750 with a
//! group) directory, the socket file is 0600 (0660 with `--socket-gid`), and every
//! accepted connection's peer credentials (`SO_PEERCRED`) are checked against the
//! allowed uid/gid before a byte is read. The directory's mode is set only when the
//! server creates it; an existing one that others can write to (or another user's) is
//! refused, and a data dir others can enter is warned about at start. The SDS socket
//! hands out private keys of certificates the agents trust, so it gets exactly the
//! same treatment (by default it is `sds.sock` beside the data-plane socket).

use std::future::{Future, IntoFuture};
use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use tokio::net::{TcpListener, UnixListener, UnixStream};

use crate::clock::{SharedClock, SystemClock};
use crate::dataplane::{DataplaneState, DataplaneStats};
use crate::http::AppState;
use crate::store::Store;

/// `agent-vault server` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// Address the HTTP API and UI listen on (loopback by default).
    #[arg(long, default_value = "127.0.0.1", env = "AGENT_VAULT_HOST")]
    pub host: String,
    /// TCP port of the HTTP API and UI.
    #[arg(long, default_value_t = 14321, env = "AGENT_VAULT_PORT")]
    pub port: u16,
    /// Where the sled store and the key file live (default: ~/.local/share/agent-vault).
    #[arg(long, env = "AGENT_VAULT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Where the data is kept: `sled` (the embedded store in the data dir, the
    /// default), `sled:DIR`, or `postgres://USER@HOST/DB` (also
    /// `postgres://USER@/DB?host=/socket/dir`), a database several control planes can
    /// share: each serves its own node's Envoys, and a change made through any of
    /// them reaches all. The key file and local tokens stay in the data dir either way.
    #[arg(
        long,
        default_value = "sled",
        env = "AGENT_VAULT_STORE",
        value_name = "STORE"
    )]
    pub store: crate::store::StoreLocation,
    /// The data-plane Unix socket Envoy connects to (default: <data-dir>/run/dataplane.sock).
    #[arg(long, env = "AGENT_VAULT_SOCKET")]
    pub socket: Option<PathBuf>,
    /// The SDS Unix socket Envoy fetches leaf certificates from for HTTPS interception
    /// (default: sds.sock beside the data-plane socket).
    #[arg(long, env = "AGENT_VAULT_SDS_SOCKET")]
    pub sds_socket: Option<PathBuf>,
    /// Lifetime of the leaf certificates of HTTPS interception, in seconds; they are
    /// re-minted and pushed to Envoy after two thirds of it.
    #[arg(long, default_value_t = crate::leaves::DEFAULT_TTL_SECS, value_parser = clap::value_parser!(i64).range(3..=30 * 86_400), env = "AGENT_VAULT_LEAF_TTL_SECS")]
    pub leaf_ttl_secs: i64,
    /// New host names that get a leaf certificate per hour, server-wide; past it, new
    /// names are refused until the hour ends (ten times as many are held at most).
    #[arg(long, default_value_t = crate::leaves::DEFAULT_NAMES_PER_HOUR as u64, value_parser = clap::value_parser!(u64).range(1..=1_000_000), env = "AGENT_VAULT_LEAF_NAMES_PER_HOUR")]
    pub leaf_names_per_hour: u64,
    /// Read the master password from the first line of stdin.
    #[arg(long)]
    pub password_stdin: bool,
    /// Base URL used in approval links (default: http://<host>:<port>).
    #[arg(long, env = "AGENT_VAULT_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Allow services whose host is an IP literal, localhost or an internal name
    /// (for tests and local development only).
    #[arg(long, env = "AGENT_VAULT_ALLOW_PRIVATE_UPSTREAMS")]
    pub allow_private_upstreams: bool,
    /// Extra group id allowed on the data-plane socket (socket becomes 0660 with this group).
    #[arg(long, env = "AGENT_VAULT_SOCKET_GID")]
    pub socket_gid: Option<u32>,
    /// Request-log records older than this many days are dropped.
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u32).range(1..), env = "AGENT_VAULT_LOG_RETENTION_DAYS")]
    pub log_retention_days: u32,
    /// Request-log records kept per vault, and again for its refused requests (the
    /// oldest are dropped first): a flood of refusals cannot evict forwarded requests.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..), env = "AGENT_VAULT_LOG_MAX_RECORDS")]
    pub log_max_records: u64,
    /// Serve the API and the UI over https with this PEM certificate chain (with
    /// --tls-key): the UI's session cookie then never reaches another local port.
    #[arg(
        long,
        env = "AGENT_VAULT_TLS_CERT",
        value_name = "PEM",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(
        long,
        env = "AGENT_VAULT_TLS_KEY",
        value_name = "PEM",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
}

/// Who may connect to the data-plane socket.
#[derive(Debug, Clone, Copy)]
pub struct PeerPolicy {
    pub uid: u32,
    pub gid: Option<u32>,
}

impl PeerPolicy {
    /// The server's own user (and root, which can read the data dir anyway).
    pub fn current_user(gid: Option<u32>) -> PeerPolicy {
        // SAFETY: getuid has no preconditions and cannot fail.
        let uid = unsafe { libc::getuid() };
        PeerPolicy { uid, gid }
    }

    pub fn allows(&self, uid: u32, gid: u32) -> bool {
        uid == self.uid || uid == 0 || self.gid == Some(gid)
    }
}

/// A Unix listener that drops connections from peers the policy does not allow.
pub struct PeerCheckedListener {
    inner: UnixListener,
    policy: PeerPolicy,
    /// What the socket is, for the log (`data-plane`, `SDS`).
    what: &'static str,
}

impl PeerCheckedListener {
    /// The allowed peers' connections as a stream (what tonic serves).
    pub fn into_incoming(
        self,
    ) -> impl futures_util::Stream<Item = std::io::Result<UnixStream>> + Send + 'static {
        futures_util::stream::unfold(self, |mut listener| async move {
            let (stream, _) = axum::serve::Listener::accept(&mut listener).await;
            Some((Ok(stream), listener))
        })
    }
}

impl axum::serve::Listener for PeerCheckedListener {
    type Io = UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => match stream.peer_cred() {
                    Ok(cred) if self.policy.allows(cred.uid(), cred.gid()) => {
                        return (stream, addr)
                    }
                    Ok(cred) => tracing::warn!(
                        uid = cred.uid(),
                        gid = cred.gid(),
                        socket = self.what,
                        "refused a connection from a peer that is not allowed"
                    ),
                    Err(e) => tracing::warn!(
                        error = %e,
                        socket = self.what,
                        "cannot read a peer's credentials"
                    ),
                },
                Err(e) => {
                    tracing::warn!(error = %e, socket = self.what, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A Unix socket the server binds: what it is called in messages, and its flag.
#[derive(Debug, Clone, Copy)]
pub struct SocketRole {
    pub what: &'static str,
    pub flag: &'static str,
}

/// The data-plane socket (`--socket`).
pub const DATA_PLANE_SOCKET: SocketRole = SocketRole {
    what: "data-plane",
    flag: "--socket",
};
/// The SDS socket (`--sds-socket`).
pub const SDS_SOCKET: SocketRole = SocketRole {
    what: "SDS",
    flag: "--sds-socket",
};

/// Binds the data-plane socket: replaces a stale socket file, refuses a live one,
/// and sets the file's mode. The directory's mode and group are set only when this
/// call creates it: an existing directory is the operator's (compose's volume, say),
/// and one that others may write to (/tmp itself) is refused, since whoever can
/// write there can replace the socket.
pub async fn bind_socket(path: &Path, policy: PeerPolicy) -> anyhow::Result<PeerCheckedListener> {
    bind_socket_as(path, policy, DATA_PLANE_SOCKET).await
}

/// [`bind_socket`] for the socket `role` (the SDS socket is bound the same way).
pub async fn bind_socket_as(
    path: &Path,
    policy: PeerPolicy,
    role: SocketRole,
) -> anyhow::Result<PeerCheckedListener> {
    use std::os::unix::fs::PermissionsExt;
    let SocketRole { what, flag } = role;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let created = !dir.exists();
    if created {
        crate::store::create_private_dir(dir)
            .with_context(|| format!("cannot create the socket directory {}", dir.display()))?;
    } else {
        check_socket_dir(dir, policy, role)?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            anyhow::bail!(
                "another agent-vault server is already listening on {}; stop it or pass another {flag}",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot bind the {what} socket {}", path.display()))?;
    let (file_mode, dir_mode) = match policy.gid {
        Some(_) => (0o660, 0o750),
        None => (0o600, 0o700),
    };
    if let Some(gid) = policy.gid {
        std::os::unix::fs::chown(path, None, Some(gid))
            .and_then(|_| match created {
                true => std::os::unix::fs::chown(dir, None, Some(gid)),
                false => Ok(()),
            })
            .with_context(|| format!("cannot give group {gid} to {}", path.display()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(file_mode))?;
    if created {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(dir_mode))?;
    }
    Ok(PeerCheckedListener {
        inner: listener,
        policy,
        what,
    })
}

/// Refuses an existing socket directory that everyone can write to, that is sticky
/// (a shared directory such as /tmp) or that belongs to another user; warns when its
/// group can write to it or the allowed group cannot enter it.
fn check_socket_dir(dir: &Path, policy: PeerPolicy, role: SocketRole) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let SocketRole { what, flag } = role;
    let meta = std::fs::metadata(dir)
        .with_context(|| format!("cannot read the socket directory {}", dir.display()))?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o1002 != 0 {
        anyhow::bail!(
            "the socket directory {} is shared (mode {mode:04o}: writable by everyone or sticky, \
             like /tmp): anyone could replace the {what} socket there; pass a {flag} path \
             in a directory of its own (it is created 0700)",
            dir.display()
        );
    }
    if mode & 0o020 != 0 {
        tracing::warn!(
            dir = %dir.display(),
            socket = what,
            "the socket directory is writable by its group: its members can replace the socket"
        );
    }
    if meta.uid() != policy.uid && meta.uid() != 0 {
        anyhow::bail!(
            "the socket directory {} belongs to uid {}, not to this user ({}): its owner could \
             replace the {what} socket; pass a {flag} path in a directory of your own",
            dir.display(),
            meta.uid(),
            policy.uid
        );
    }
    if let Some(gid) = policy.gid {
        let group_enters = meta.gid() == gid && mode & 0o010 != 0;
        if !group_enters && mode & 0o001 == 0 {
            tracing::warn!(
                dir = %dir.display(),
                gid,
                "group {gid} cannot enter the socket directory (it was not created here, so its \
                 mode and group are left as they are)"
            );
        }
    }
    Ok(())
}

/// A warning when the data dir can be read or entered by others than its owner: it
/// holds the store, the key file (passwordless mode) and the local tokens. Their own
/// modes are 0600/0700, but a directory the operator made is not changed here.
pub fn data_dir_warning(dir: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir).ok()?.permissions().mode() & 0o7777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "agent-vault: WARNING: the data dir {} is accessible to others (mode {mode:04o}); \
             it holds the store, the key file and the bootstrap and login tokens: chmod 700 it",
            dir.display()
        )
    })
}

/// The application on the TCP listener: the management API and the UI side by side,
/// plus `GET /metrics` (which also reports the data plane's counters), with every
/// request counted for it. Unknown routes get the API's JSON 404. Requests for a
/// `Host` this server does not answer for are refused ([`crate::http::check_host`]).
pub fn app(state: AppState, dataplane: Arc<DataplaneStats>) -> Router {
    let store = state.store.clone();
    let leaves = state.leaves.clone();
    let host_check = axum::middleware::from_fn_with_state(state.clone(), crate::http::check_host);
    // JSON answers may carry values (`?reveal=true`, `credentials/{key}`): no cache may
    // keep any of them.
    let api = crate::api::routes().layer(axum::middleware::map_response(no_store));
    let routes = api
        .merge(crate::ui::router())
        .fallback(not_found)
        .with_state(state);
    crate::metrics::instrument(routes, store, dataplane, leaves)
        .layer(axum::middleware::from_fn(body_in_time))
        .layer(host_check)
}

async fn no_store(mut response: axum::response::Response) -> axum::response::Response {
    response.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    response
}

/// Reads the whole body (at most [`crate::http::MAX_BODY_BYTES`]) before the handler
/// runs, within [`BODY_TIMEOUT`] in all: a client that trickles its body holds a
/// connection no longer than that (hyper bounds only the headers).
async fn body_in_time(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let (parts, body) = request.into_parts();
    let limit = crate::http::MAX_BODY_BYTES;
    match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => {
            let request = axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes));
            next.run(request).await
        }
        Ok(Err(_)) => crate::error::Error::PayloadTooLarge(limit).into_response(),
        Err(_) => crate::error::Error::RequestTimeout(format!(
            "the request body did not arrive within {} s",
            BODY_TIMEOUT.as_secs()
        ))
        .into_response(),
    }
}

async fn not_found() -> crate::error::Error {
    crate::error::Error::not_found("not_found", "no such route")
}

/// A connection must send each request's headers within this time.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A request's body must arrive within this time.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections the TCP listener serves at once.
pub const MAX_CONNECTIONS: usize = 512;

/// Limits of the TCP listener (see the module doc).
#[derive(Debug, Clone, Copy)]
pub struct ListenerLimits {
    /// Time to send a request's headers; also how long a keep-alive connection may
    /// sit idle.
    pub header_timeout: Duration,
    /// Connections served at once; more wait to be accepted.
    pub max_connections: usize,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        ListenerLimits {
            header_timeout: HEADER_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
        }
    }
}

/// The two Unix sockets, both peer-checked: the data plane's and SDS's.
pub struct Sockets {
    pub dataplane: PeerCheckedListener,
    pub sds: PeerCheckedListener,
}

/// Serves the API on `tcp` (plain, or a [`crate::tls::TlsListener`]), the data
/// plane and SDS on `sockets`, and renews leaf certificates, until `shutdown`
/// resolves. All share the store; the sockets' handlers get their own state, never
/// the API's.
pub async fn serve<L>(
    state: AppState,
    dataplane: DataplaneState,
    tcp: L,
    sockets: Sockets,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    serve_with_limits(
        ListenerLimits::default(),
        state,
        dataplane,
        tcp,
        sockets,
        shutdown,
    )
    .await
}

/// [`serve`] with the TCP listener's limits given (tests shorten them).
pub async fn serve_with_limits<L>(
    limits: ListenerLimits,
    state: AppState,
    dataplane: DataplaneState,
    tcp: L,
    sockets: Sockets,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let stats = dataplane.stats.clone();
    let leaves = state.leaves.clone();
    let held = dataplane.clone();
    let dataplane = crate::dataplane::router(dataplane);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let wait = move |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let maintenance = tokio::spawn(leaves.clone().run_maintenance(wait(stop_rx.clone())));
    let sds = crate::sds::serve(
        leaves,
        held.clone(),
        sockets.sds.into_incoming(),
        wait(stop_rx.clone()),
    );
    let api = serve_tcp(tcp, app(state, stats), limits, stop_rx.clone());
    let dataplane = axum::serve(sockets.dataplane, dataplane).with_graceful_shutdown(wait(stop_rx));
    tokio::spawn(async move {
        shutdown.await;
        // Held snapshot long-polls answer now, or the graceful shutdown would wait
        // for them.
        held.close();
        let _ = stop_tx.send(true);
    });
    let (api, dataplane, sds) = tokio::join!(api, dataplane.into_future(), sds);
    let _ = maintenance.await;
    api.context("management API")?;
    dataplane.context("data-plane socket")?;
    sds.context("SDS socket")?;
    Ok(())
}

/// The TCP listener's accept loop: hyper's HTTP/1 with a header timeout, at most
/// `max_connections` at once; on `stop`, stops accepting, lets each connection
/// finish its request, and returns once all are closed.
async fn serve_tcp<L>(
    mut listener: L,
    app: Router,
    limits: ListenerLimits,
    stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
{
    let max = limits
        .max_connections
        .clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
    let slots = Arc::new(tokio::sync::Semaphore::new(max));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let stopped = |mut stop: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stop.wait_for(|stop| *stop).await;
    };
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot,
            () = stopped(stop.clone()) => break,
        };
        let Ok(slot) = slot else { break };
        let (io, _) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stopped(stop.clone()) => break,
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let connection = http.serve_connection(hyper_util::rt::TokioIo::new(io), service);
        let stop = stop.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(%error, "connection ended");
                    }
                }
                () = stopped(stop) => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    // Every slot back: every connection is closed.
    let _ = slots
        .acquire_many(u32::try_from(max).unwrap_or(u32::MAX))
        .await;
    Ok(())
}

/// The data dir when `--data-dir` / `AGENT_VAULT_DATA_DIR` names none (the CLI looks
/// for the server's local tokens there too).
pub fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("agent-vault");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".local/share/agent-vault")
}

/// The master password from `--password-stdin` or `AGENT_VAULT_MASTER_PASSWORD`.
fn master_password(args: &ServerArgs) -> anyhow::Result<Option<zeroize::Zeroizing<String>>> {
    if args.password_stdin {
        if std::io::stdin().is_terminal() {
            let password = rpassword::prompt_password("Master password: ")
                .context("cannot read the master password")?;
            return Ok(Some(zeroize::Zeroizing::new(password)));
        }
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("cannot read the master password from stdin")?;
        let password = line.trim_end_matches(['\r', '\n']).to_string();
        anyhow::ensure!(
            !password.is_empty(),
            "--password-stdin: stdin gave an empty password"
        );
        return Ok(Some(zeroize::Zeroizing::new(password)));
    }
    Ok(std::env::var("AGENT_VAULT_MASTER_PASSWORD")
        .ok()
        .filter(|p| !p.is_empty())
        .map(zeroize::Zeroizing::new))
}

/// `agent-vault server`: opens the store, binds both listeners, serves until Ctrl-C
/// or SIGTERM.
pub fn run_from_args(args: ServerArgs) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AGENT_VAULT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();

    let data_dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
    let socket = args
        .socket
        .clone()
        .unwrap_or_else(|| data_dir.join("run").join("dataplane.sock"));
    let sds_socket = args.sds_socket.clone().unwrap_or_else(|| {
        socket
            .parent()
            .unwrap_or(Path::new("."))
            .join(crate::sds::DEFAULT_SOCKET_NAME)
    });
    anyhow::ensure!(
        sds_socket != socket,
        "--sds-socket and --socket name the same file ({}): give each socket its own path",
        socket.display()
    );
    let password = master_password(&args)?;
    let clock: SharedClock = Arc::new(SystemClock);
    let store = Store::open_at(
        &args.store,
        &data_dir,
        password.as_deref().map(String::as_str),
        clock,
        args.allow_private_upstreams,
    )?;
    let described_store = args.store.describe(&data_dir);
    let retention = crate::logs::LogRetention {
        max_records: usize::try_from(args.log_max_records).unwrap_or(usize::MAX),
        max_age_days: args.log_retention_days,
    };
    if let Some(warning) = data_dir_warning(&data_dir) {
        eprintln!("{warning}");
    }
    if let Some(file) = store.bootstrap_token_file() {
        eprintln!(
            "agent-vault: no owner yet: the first `agent-vault auth register` needs the one-time \
             bootstrap token in {} (readable by this OS user only). Run it as this user: the CLI \
             reads the file (set AGENT_VAULT_DATA_DIR={} unless that is the default), or pass \
             --bootstrap-token.",
            file.display(),
            data_dir.display()
        );
    }
    if store.is_passwordless() {
        eprintln!(
            "agent-vault: running passwordless: the data key is protected only by the file {} (set a master password with `agent-vault master-password change`)",
            data_dir.join(crate::store::KEY_FILE).display()
        );
    }

    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(crate::tls::server_config(cert, key)?),
        _ => None,
    };
    let store = Arc::new(store);
    let limits = crate::leaves::LeafLimits::new(
        args.leaf_ttl_secs,
        usize::try_from(args.leaf_names_per_hour).unwrap_or(usize::MAX),
    );
    let leaves =
        crate::leaves::Leaves::open(store.clone(), limits).context("cannot load the proxy CA")?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let tcp = TcpListener::bind((args.host.as_str(), args.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
        let addr = tcp.local_addr()?;
        let policy = PeerPolicy::current_user(args.socket_gid);
        let sockets = Sockets {
            dataplane: bind_socket(&socket, policy).await?,
            sds: bind_socket_as(&sds_socket, policy, SDS_SOCKET).await?,
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let public_url = args
            .public_url
            .clone()
            .unwrap_or_else(|| format!("{scheme}://{addr}"));
        if !public_url.starts_with("https://") {
            eprintln!(
                "agent-vault: WARNING: the UI is served over plain HTTP ({public_url}): browsers \
                 send its session cookie to every port of this host, so a server an agent runs \
                 here can receive it. It cannot reveal a value or decide a proposal with it (those \
                 ask for the password again), but it can read the UI's pages. Serve it over \
                 https with --tls-cert and --tls-key."
            );
        }
        let dataplane = DataplaneState::new(store.clone(), retention);
        let ca_file = store.ca_file();
        let state = AppState::new(store, leaves, &public_url);
        let stop = shutdown_signal();
        // One line for humans and for scripts (tests parse the address from it).
        println!(
            "agent-vault listening on {scheme}://{addr} (data-plane socket {}, SDS socket {}, \
             proxy CA {}, data dir {}, store: {described_store})",
            socket.display(),
            sds_socket.display(),
            ca_file.display(),
            data_dir.display()
        );
        match tls {
            Some(config) => {
                let tcp = crate::tls::TlsListener::new(tcp, config)?;
                serve(state, dataplane, tcp, sockets, stop).await?;
            }
            None => serve(state, dataplane, tcp, sockets, stop).await?,
        }
        let _ = std::fs::remove_file(&socket);
        let _ = std::fs::remove_file(&sds_socket);
        eprintln!("agent-vault: stopped");
        Ok(())
    })
}

/// Stops on SIGTERM or SIGINT. The handlers are installed when this is called, not
/// when the future is first polled, so a signal that arrives right after the server
/// announced itself still stops it cleanly (sockets removed) instead of killing it.
fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::system_store;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    /// A server on 127.0.0.1:0 with `limits`, stopped when the returned sender drops.
    struct Running {
        addr: std::net::SocketAddr,
        _stop: tokio::sync::oneshot::Sender<()>,
        _dir: tempfile::TempDir,
        /// The serving task (ends once the server stopped).
        task: tokio::task::JoinHandle<anyhow::Result<()>>,
    }

    async fn start(limits: ListenerLimits, tls: Option<Arc<rustls::ServerConfig>>) -> Running {
        let (dir, store) = system_store();
        let store = Arc::new(store);
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let policy = PeerPolicy::current_user(None);
        let socket = Sockets {
            dataplane: bind_socket(&dir.path().join("run/dp.sock"), policy)
                .await
                .unwrap(),
            sds: bind_socket_as(&dir.path().join("run/sds.sock"), policy, SDS_SOCKET)
                .await
                .unwrap(),
        };
        let leaves =
            crate::leaves::Leaves::open(store.clone(), crate::leaves::LeafLimits::default())
                .unwrap();
        let state = AppState::new(store.clone(), leaves, &format!("http://{addr}"));
        let dataplane = DataplaneState::new(store, crate::logs::LogRetention::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
        };
        let task = match tls {
            Some(config) => {
                let tcp = crate::tls::TlsListener::new(tcp, config).unwrap();
                tokio::spawn(serve_with_limits(
                    limits, state, dataplane, tcp, socket, shutdown,
                ))
            }
            None => tokio::spawn(serve_with_limits(
                limits, state, dataplane, tcp, socket, shutdown,
            )),
        };
        Running {
            addr,
            _stop: stop,
            _dir: dir,
            task,
        }
    }

    /// Reads until the server closes the connection; how long that took (`None`: it
    /// was still open after `patience`).
    fn closed_within(mut stream: TcpStream, patience: Duration) -> Option<Duration> {
        let started = std::time::Instant::now();
        stream.set_read_timeout(Some(patience)).unwrap();
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => return Some(started.elapsed()),
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Some(started.elapsed())
                }
                Err(_) => return None,
            }
        }
    }

    fn get_health(addr: std::net::SocketAddr) -> String {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer
    }

    fn short(header_timeout_ms: u64, max_connections: usize) -> ListenerLimits {
        ListenerLimits {
            header_timeout: Duration::from_millis(header_timeout_ms),
            max_connections,
        }
    }

    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn set_mode(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[tokio::test]
    async fn a_socket_in_a_shared_directory_is_refused_and_the_directory_left_alone() {
        for shared in [0o1777, 0o0777, 0o1700, 0o0703] {
            let tmp = tempfile::tempdir().unwrap();
            set_mode(tmp.path(), shared);
            let err = bind_socket(&tmp.path().join("dp.sock"), PeerPolicy::current_user(None))
                .await
                .err()
                .unwrap_or_else(|| panic!("{shared:o} accepted"));
            assert!(err.to_string().contains("is shared"), "{err}");
            assert_eq!(mode(tmp.path()), shared, "the directory was changed");
            assert!(!tmp.path().join("dp.sock").exists());
        }
    }

    #[tokio::test]
    async fn an_existing_socket_directory_keeps_its_mode_and_a_created_one_is_private() {
        let tmp = tempfile::tempdir().unwrap();
        set_mode(tmp.path(), 0o755);
        let socket = tmp.path().join("dp.sock");
        let listener = bind_socket(&socket, PeerPolicy::current_user(None)).await;
        assert!(listener.is_ok(), "{:?}", listener.err());
        assert_eq!(
            mode(tmp.path()),
            0o755,
            "an existing directory is not chmodded"
        );
        assert_eq!(mode(&socket), 0o600);

        let created = tmp.path().join("run");
        let listener = bind_socket(&created.join("dp.sock"), PeerPolicy::current_user(None)).await;
        assert!(listener.is_ok(), "{:?}", listener.err());
        assert_eq!(mode(&created), 0o700);
    }

    #[test]
    fn a_data_dir_others_can_enter_is_warned_about() {
        let tmp = tempfile::tempdir().unwrap();
        set_mode(tmp.path(), 0o700);
        assert_eq!(data_dir_warning(tmp.path()), None);
        for open in [0o755, 0o750, 0o701] {
            set_mode(tmp.path(), open);
            let warning = data_dir_warning(tmp.path()).expect("a warning");
            assert!(warning.contains(&format!("{open:04o}")), "{warning}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_that_sends_half_its_headers_is_closed_after_the_header_timeout() {
        let server = start(short(300, 64), None).await;
        let addr = server.addr;
        let closed = tokio::task::spawn_blocking(move || {
            let mut stream = TcpStream::connect(addr).unwrap();
            stream
                .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            closed_within(stream, Duration::from_secs(5))
        })
        .await
        .unwrap();
        let after = closed.expect("the half-sent request's connection stayed open");
        assert!(after >= Duration::from_millis(250), "{after:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_keep_alive_connection_is_closed_after_the_header_timeout() {
        let server = start(short(300, 64), None).await;
        let addr = server.addr;
        let closed = tokio::task::spawn_blocking(move || {
            let mut stream = TcpStream::connect(addr).unwrap();
            stream
                .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                .unwrap();
            let mut buf = [0u8; 1024];
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let n = stream.read(&mut buf).unwrap();
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
            // Nothing more: the connection is idle.
            closed_within(stream, Duration::from_secs(5))
        })
        .await
        .unwrap();
        assert!(closed.is_some(), "the idle connection stayed open");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hundreds_of_idle_connections_do_not_stop_a_new_clients_request() {
        let server = start(ListenerLimits::default(), None).await;
        let addr = server.addr;
        let answer = tokio::task::spawn_blocking(move || {
            let idle: Vec<TcpStream> = (0..300)
                .map(|_| TcpStream::connect(addr).unwrap())
                .collect();
            let started = std::time::Instant::now();
            let answer = get_health(addr);
            drop(idle);
            (answer, started.elapsed())
        })
        .await
        .unwrap();
        assert!(answer.0.starts_with("HTTP/1.1 200"), "{}", answer.0);
        assert!(answer.1 < Duration::from_secs(5), "{:?}", answer.1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn past_the_connection_limit_a_new_client_waits_only_until_an_idle_one_times_out() {
        let server = start(short(500, 4), None).await;
        let addr = server.addr;
        let (answer, waited) = tokio::task::spawn_blocking(move || {
            let idle: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
            std::thread::sleep(Duration::from_millis(100));
            let started = std::time::Instant::now();
            let answer = get_health(addr);
            drop(idle);
            (answer, started.elapsed())
        })
        .await
        .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            waited >= Duration::from_millis(200),
            "served past the limit: {waited:?}"
        );
        assert!(waited < Duration::from_secs(5), "{waited:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_https_listener_is_served_with_the_same_limits() {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        let config = crate::tls::server_config(&cert_path, &key_path).unwrap();
        let server = start(short(300, 64), Some(config)).await;

        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let mut tls = connector.connect(name.clone(), tcp).await.unwrap();
        tls.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let _ = tls.read_to_end(&mut answer).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

        // Half the headers over TLS: closed after the header timeout as well.
        let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let mut tls = connector.connect(name, tcp).await.unwrap();
        tls.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest)).await;
        assert!(
            read.is_ok(),
            "the half-sent request's TLS connection stayed open"
        );
    }

    /// One HTTP/1.1 request on the data-plane socket of `dir`; the whole answer.
    fn socket_get(dir: &Path, path_and_headers: &str) -> String {
        let mut stream = std::os::unix::net::UnixStream::connect(dir.join("run/dp.sock")).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        write!(
            stream,
            "GET {path_and_headers}\r\nHost: agent-vault\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stopping_the_server_answers_held_long_polls_and_does_not_wait_for_them() {
        let Running {
            _stop: stop,
            _dir: dir,
            task,
            ..
        } = start(ListenerLimits::default(), None).await;
        let path = dir.path().to_path_buf();
        let first = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || {
                socket_get(&path, "/v1/dataplane/snapshot HTTP/1.1")
            })
            .await
            .unwrap()
        };
        assert!(first.starts_with("HTTP/1.1 200"), "{first}");
        let etag = first
            .lines()
            .find_map(|l| l.strip_prefix("etag: "))
            .expect("an etag")
            .trim()
            .to_string();
        let held = tokio::task::spawn_blocking(move || {
            socket_get(
                &path,
                &format!("/v1/dataplane/snapshot?wait_ms=60000 HTTP/1.1\r\nIf-None-Match: {etag}"),
            )
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!held.is_finished(), "the long-poll was not held");
        let stopping = std::time::Instant::now();
        drop(stop);
        let stopped = tokio::time::timeout(Duration::from_secs(10), task).await;
        assert!(
            matches!(stopped, Ok(Ok(Ok(())))),
            "the server did not stop: {stopped:?}"
        );
        assert!(
            stopping.elapsed() < Duration::from_secs(5),
            "stopping took {:?}",
            stopping.elapsed()
        );
        let answer = held.await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 304"), "{answer}");
    }
}
