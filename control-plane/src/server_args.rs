use std::path::PathBuf;

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
    /// Request-log records kept per vault (the oldest are dropped first).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..), env = "AGENT_VAULT_LOG_MAX_RECORDS")]
    pub log_max_records: u64,
}
