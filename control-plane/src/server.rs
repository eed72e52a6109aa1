//! Starting and stopping the server: the TCP listener for the management API and UI,
//! and the Unix socket for the data plane.
//!
//! [`serve`] takes pre-bound listeners and a shutdown future so tests bind port 0 and
//! stop cleanly; [`run_from_args`] is what `agent-vault server` does around it.
//!
//! The data-plane socket is the trust boundary between Envoy and everything else:
//! whoever can connect can fetch credentials. So it lives in a 0700 (or 0750 with a
//! group) directory, the socket file is 0600 (0660 with `--socket-gid`), and every
//! accepted connection's peer credentials (`SO_PEERCRED`) are checked against the
//! allowed uid/gid before a byte is read.

use std::future::{Future, IntoFuture};
use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
    /// The data-plane Unix socket Envoy connects to (default: <data-dir>/run/dataplane.sock).
    #[arg(long, env = "AGENT_VAULT_SOCKET")]
    pub socket: Option<PathBuf>,
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
                        "refused a data-plane connection from a peer that is not allowed"
                    ),
                    Err(e) => tracing::warn!(error = %e, "cannot read data-plane peer credentials"),
                },
                Err(e) => {
                    tracing::warn!(error = %e, "data-plane accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// Binds the data-plane socket: replaces a stale socket file, refuses a live one,
/// and sets the directory and file modes.
pub async fn bind_socket(path: &Path, policy: PeerPolicy) -> anyhow::Result<PeerCheckedListener> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    crate::store::create_private_dir(dir)
        .with_context(|| format!("cannot create the socket directory {}", dir.display()))?;
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            anyhow::bail!(
                "another agent-vault server is already listening on {}; stop it or pass another --socket",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot bind the data-plane socket {}", path.display()))?;
    let (file_mode, dir_mode) = match policy.gid {
        Some(_) => (0o660, 0o750),
        None => (0o600, 0o700),
    };
    if let Some(gid) = policy.gid {
        std::os::unix::fs::chown(path, None, Some(gid))
            .and_then(|_| std::os::unix::fs::chown(dir, None, Some(gid)))
            .with_context(|| format!("cannot give group {gid} to {}", path.display()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(file_mode))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(dir_mode))?;
    Ok(PeerCheckedListener {
        inner: listener,
        policy,
    })
}

/// The application on the TCP listener: the management API and the UI side by side,
/// plus `GET /metrics` (which also reports the data plane's counters), with every
/// request counted for it. Unknown routes get the API's JSON 404. Requests for a
/// `Host` this server does not answer for are refused ([`crate::http::check_host`]).
pub fn app(state: AppState, dataplane: Arc<DataplaneStats>) -> Router {
    let store = state.store.clone();
    let host_check = axum::middleware::from_fn_with_state(state.clone(), crate::http::check_host);
    let routes = crate::api::routes()
        .merge(crate::ui::router())
        .fallback(not_found)
        .with_state(state);
    crate::metrics::instrument(routes, store, dataplane).layer(host_check)
}

async fn not_found() -> crate::error::Error {
    crate::error::Error::not_found("not_found", "no such route")
}

/// Serves the API on `tcp` (plain, or a [`crate::tls::TlsListener`]) and the data
/// plane on `socket` until `shutdown` resolves. Both share the store; the socket's
/// routes get their own state, never the API's.
pub async fn serve<L>(
    state: AppState,
    dataplane: DataplaneState,
    tcp: L,
    socket: PeerCheckedListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let stats = dataplane.stats.clone();
    let dataplane = crate::dataplane::router(dataplane);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let wait = move |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let api = axum::serve(tcp, app(state, stats)).with_graceful_shutdown(wait(stop_rx.clone()));
    let dataplane = axum::serve(socket, dataplane).with_graceful_shutdown(wait(stop_rx));
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let (api, dataplane) = tokio::join!(api.into_future(), dataplane.into_future());
    api.context("management API")?;
    dataplane.context("data-plane socket")?;
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
    let password = master_password(&args)?;
    let clock: SharedClock = Arc::new(SystemClock);
    let store = Store::open(
        &data_dir,
        password.as_deref().map(String::as_str),
        clock,
        args.allow_private_upstreams,
    )?;
    let retention = crate::logs::LogRetention {
        max_records: usize::try_from(args.log_max_records).unwrap_or(usize::MAX),
        max_age_days: args.log_retention_days,
    };
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

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let tcp = TcpListener::bind((args.host.as_str(), args.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
        let addr = tcp.local_addr()?;
        let unix = bind_socket(&socket, PeerPolicy::current_user(args.socket_gid)).await?;
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
        let store = Arc::new(store);
        let dataplane = DataplaneState::new(store.clone(), retention);
        let state = AppState::new(store, &public_url);
        // One line for humans and for scripts (tests parse the address from it).
        println!(
            "agent-vault listening on {scheme}://{addr} (data-plane socket {}, data dir {})",
            socket.display(),
            data_dir.display()
        );
        match tls {
            Some(config) => {
                let tcp = crate::tls::TlsListener::new(tcp, config)?;
                serve(state, dataplane, tcp, unix, shutdown_signal()).await?;
            }
            None => serve(state, dataplane, tcp, unix, shutdown_signal()).await?,
        }
        let _ = std::fs::remove_file(&socket);
        eprintln!("agent-vault: stopped");
        Ok(())
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}
