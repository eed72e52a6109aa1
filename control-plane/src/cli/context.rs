//! What a command runs against: which server, with which token, on which vault.
//!
//! - Address: `--address` / `AGENT_VAULT_ADDR`, else the saved session's server, else
//!   `http://127.0.0.1:14321`; `http://` or `https://` (`--ca-file` / `AGENT_VAULT_CA_FILE`
//!   adds a CA to trust besides the system's).
//! - Token: `AGENT_VAULT_TOKEN` (agent or session token), else the saved session — but
//!   only when the session belongs to the address in use, so a session token is never
//!   sent to a server that did not issue it.
//! - Vault: `--vault`, else `AGENT_VAULT_VAULT`, else `vault use`'s choice, else `default`.

use anyhow::bail;

use super::client::Client;
use super::session::{Config, Session, StateDir};
use super::{GlobalArgs, DEFAULT_ADDRESS};

pub const TOKEN_ENV: &str = "AGENT_VAULT_TOKEN";
pub const VAULT_ENV: &str = "AGENT_VAULT_VAULT";
pub const DEFAULT_VAULT: &str = "default";

/// Where the vault a command acts on came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VaultSource {
    Flag,
    Env,
    Config,
    Default,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedVault {
    pub name: String,
    pub source: VaultSource,
}

/// The vault resolution order; empty values count as unset.
pub fn resolve_vault(flag: Option<&str>, env: Option<&str>, config: Option<&str>) -> ResolvedVault {
    let candidates = [
        (flag, VaultSource::Flag),
        (env, VaultSource::Env),
        (config, VaultSource::Config),
    ];
    for (value, source) in candidates {
        if let Some(name) = value.map(str::trim).filter(|v| !v.is_empty()) {
            return ResolvedVault {
                name: name.to_owned(),
                source,
            };
        }
    }
    ResolvedVault {
        name: DEFAULT_VAULT.to_owned(),
        source: VaultSource::Default,
    }
}

/// `http(s)://host:port` without a trailing slash.
pub fn normalize_address(raw: &str) -> anyhow::Result<String> {
    let address = raw.trim().trim_end_matches('/');
    let rest = address
        .strip_prefix("https://")
        .or_else(|| address.strip_prefix("http://"));
    let Some(rest) = rest else {
        bail!("invalid address {address:?}: expected a URL like {DEFAULT_ADDRESS}");
    };
    if rest.is_empty() || rest.contains(['/', '?', '#', ' ']) {
        bail!("invalid address {address:?}: expected a URL like {DEFAULT_ADDRESS}");
    }
    Ok(address.to_owned())
}

/// Picks the server address: explicit, else the session's, else the default.
pub fn resolve_address(
    explicit: Option<&str>,
    session: Option<&Session>,
) -> anyhow::Result<String> {
    match explicit.filter(|a| !a.trim().is_empty()) {
        Some(address) => normalize_address(address),
        None => match session {
            Some(session) => normalize_address(&session.address),
            None => Ok(DEFAULT_ADDRESS.to_owned()),
        },
    }
}

/// Where the bearer token comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    Env,
    Session { email: String },
}

/// Picks the bearer token for `address`, or says how to get one.
pub fn resolve_token(
    env_token: Option<&str>,
    session: Option<&Session>,
    address: &str,
) -> anyhow::Result<(String, TokenSource)> {
    if let Some(token) = env_token.map(str::trim).filter(|t| !t.is_empty()) {
        return Ok((token.to_owned(), TokenSource::Env));
    }
    match session {
        Some(session) if same_address(&session.address, address) => Ok((
            session.token.clone(),
            TokenSource::Session {
                email: session.email.clone(),
            },
        )),
        Some(session) => bail!(
            "not logged in to {address} (the saved session is for {}): run agent-vault auth login --email {} --address {address}",
            session.address,
            session.email
        ),
        None => bail!("not logged in: run agent-vault auth login --email <EMAIL>"),
    }
}

fn same_address(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

/// Everything a command needs to know about where it runs.
#[derive(Debug)]
pub struct Context {
    /// Print the server's JSON instead of human output.
    pub json: bool,
    /// The normalized server address.
    pub address: String,
    pub state: StateDir,
    pub session: Option<Session>,
    pub config: Config,
    /// More CA certificates to trust for https (`--ca-file`).
    pub ca_file: Option<std::path::PathBuf>,
    vault_flag: Option<String>,
    vault_env: Option<String>,
    env_token: Option<String>,
}

impl Context {
    /// Reads the global flags, the environment and `~/.agent-vault/`.
    pub fn from_env(global: &GlobalArgs) -> anyhow::Result<Self> {
        let state = StateDir::from_home()?;
        let session = state.load_session()?;
        let config = state.load_config()?;
        let address = resolve_address(global.address.as_deref(), session.as_ref())?;
        Ok(Self {
            json: global.json,
            address,
            state,
            session,
            config,
            ca_file: global.ca_file.clone(),
            vault_flag: global.vault.clone(),
            vault_env: std::env::var(VAULT_ENV).ok(),
            env_token: std::env::var(TOKEN_ENV).ok(),
        })
    }

    /// The vault this command acts on.
    pub fn vault(&self) -> ResolvedVault {
        resolve_vault(
            self.vault_flag.as_deref(),
            self.vault_env.as_deref(),
            self.config.vault.as_deref(),
        )
    }

    /// Whether `AGENT_VAULT_TOKEN` is set (it overrides any saved session).
    pub fn env_token_set(&self) -> bool {
        self.env_token
            .as_deref()
            .is_some_and(|t| !t.trim().is_empty())
    }

    /// The token this command would send and where it came from.
    pub fn token(&self) -> anyhow::Result<(String, TokenSource)> {
        resolve_token(
            self.env_token.as_deref(),
            self.session.as_ref(),
            &self.address,
        )
    }

    /// An authenticated client, or "not logged in".
    pub fn client(&self) -> anyhow::Result<Client> {
        let (token, source) = self.token()?;
        let hint = match source {
            TokenSource::Session { email } => {
                Some(format!("run agent-vault auth login --email {email}"))
            }
            TokenSource::Env => Some(format!("check {TOKEN_ENV}")),
        };
        Ok(
            Client::new(&self.address, Some(token), self.ca_file.as_deref())?
                .with_unauthorized_hint(hint),
        )
    }

    /// A client without a token (register, login).
    pub fn anonymous_client(&self) -> anyhow::Result<Client> {
        Client::new(&self.address, None, self.ca_file.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(address: &str) -> Session {
        Session {
            address: address.into(),
            email: "me@example.com".into(),
            token: "av_sess_saved".into(),
        }
    }

    #[test]
    fn vault_resolution_order() {
        let cases = [
            (
                "flag wins",
                Some("f"),
                Some("e"),
                Some("c"),
                "f",
                VaultSource::Flag,
            ),
            (
                "env over config",
                None,
                Some("e"),
                Some("c"),
                "e",
                VaultSource::Env,
            ),
            (
                "config over default",
                None,
                None,
                Some("c"),
                "c",
                VaultSource::Config,
            ),
            (
                "default last",
                None,
                None,
                None,
                "default",
                VaultSource::Default,
            ),
            (
                "empty env is unset",
                None,
                Some(""),
                Some("c"),
                "c",
                VaultSource::Config,
            ),
            (
                "blank flag is unset",
                Some(" "),
                None,
                None,
                "default",
                VaultSource::Default,
            ),
        ];
        for (name, flag, env, config, want, source) in cases {
            let got = resolve_vault(flag, env, config);
            assert_eq!(got.name, want, "{name}");
            assert_eq!(got.source, source, "{name}");
        }
    }

    #[test]
    fn addresses_are_normalized_or_refused() {
        assert_eq!(
            normalize_address("http://127.0.0.1:14321/").unwrap(),
            "http://127.0.0.1:14321"
        );
        assert!(normalize_address("127.0.0.1:14321").is_err());
        assert!(normalize_address("http://").is_err());
        assert!(normalize_address("http://host/path").is_err());
        assert_eq!(
            normalize_address("https://host:8443/").unwrap(),
            "https://host:8443"
        );
        assert!(normalize_address("ftp://host").is_err());
    }

    #[test]
    fn address_resolution_order() {
        let saved = session("http://10.1.2.3:9");
        assert_eq!(
            resolve_address(Some("http://a:1"), Some(&saved)).unwrap(),
            "http://a:1"
        );
        assert_eq!(
            resolve_address(None, Some(&saved)).unwrap(),
            "http://10.1.2.3:9"
        );
        assert_eq!(resolve_address(None, None).unwrap(), DEFAULT_ADDRESS);
    }

    #[test]
    fn env_token_overrides_the_session() {
        let saved = session(DEFAULT_ADDRESS);
        let (token, source) =
            resolve_token(Some("av_agt_env"), Some(&saved), DEFAULT_ADDRESS).unwrap();
        assert_eq!(token, "av_agt_env");
        assert_eq!(source, TokenSource::Env);
        let (token, _) = resolve_token(Some(""), Some(&saved), DEFAULT_ADDRESS).unwrap();
        assert_eq!(token, "av_sess_saved");
    }

    #[test]
    fn session_token_is_only_sent_to_its_own_server() {
        let saved = session("http://127.0.0.1:14321/");
        assert!(resolve_token(None, Some(&saved), "http://127.0.0.1:14321").is_ok());
        let err = resolve_token(None, Some(&saved), "http://evil:80")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("not logged in to http://evil:80"), "{err}");
    }

    #[test]
    fn no_token_says_how_to_log_in() {
        let err = resolve_token(None, None, DEFAULT_ADDRESS)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("not logged in: run agent-vault auth login --email"),
            "{err}"
        );
    }
}
