//! The environment an agent runs with: `agent env NAME`, and `--env` on `agent create`
//! and `agent rotate`.
//!
//! What an agent needs (DESIGN.md §3):
//! - `HTTPS_PROXY` and `HTTP_PROXY` (and their lowercase forms, which curl and others
//!   read instead): `http://<token>:<vault>@<proxy>`;
//! - `NO_PROXY`: the control plane's host, which agents reach directly (proposals,
//!   `/discover`);
//! - the proxy CA in `SSL_CERT_FILE`, `REQUESTS_CA_BUNDLE`, `NODE_EXTRA_CA_CERTS`,
//!   `CURL_CA_BUNDLE` and `GIT_SSL_CAINFO`. Most of these *replace* the system's
//!   roots (OpenSSL's `SSL_CERT_FILE`, Python requests), so they point at a bundle the
//!   CLI writes: the proxy CA, then the system's roots for the hosts agents reach
//!   without the proxy.
//!
//! The token is shown once and stored hashed, so the CLI cannot look it up: `create
//! --env` and `rotate --env` print the lines while they have it; `agent env NAME`
//! reads it from stdin (or a hidden prompt), never from argv, checks with the server
//! that it is NAME's, and takes the vault from its grants. The lines are shell
//! `export`s (`eval "$(…)"`), or JSON with `--json`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::Args;
use serde_json::Value;
use zeroize::Zeroizing;

use super::client::{api_path, ApiError, Client};
use super::context::{Context, VaultSource};
use super::output;
use super::prompt;

/// Where agents reach Envoy when `--proxy` says nothing.
pub const DEFAULT_PROXY: &str = "http://127.0.0.1:10000";
/// The bundle's file in `~/.agent-vault/` when `--ca-out` says nothing.
pub const DEFAULT_BUNDLE: &str = "ca-bundle.pem";

/// System CA bundles, by distribution; the first that exists is copied.
const SYSTEM_BUNDLES: [&str; 5] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
    "/usr/local/etc/openssl/cert.pem",
];

/// The variables that name the CA bundle.
pub const CA_VARIABLES: [&str; 5] = [
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "CURL_CA_BUNDLE",
    "GIT_SSL_CAINFO",
];

/// Flags of the commands that print an agent's environment.
#[derive(Debug, Clone, Args)]
pub struct EnvArgs {
    /// Envoy's address as agents reach it
    #[arg(long, value_name = "URL", env = "AGENT_VAULT_PROXY", default_value = DEFAULT_PROXY)]
    pub proxy: String,
    /// Where to write the CA bundle (the proxy CA plus the system's roots), 0644
    /// [default: ~/.agent-vault/ca-bundle.pem, which other OS users cannot read]
    #[arg(long, value_name = "PATH")]
    pub ca_out: Option<PathBuf>,
    /// The system CA bundle to append [default: the first of the usual places]
    #[arg(long, value_name = "PEM", env = "AGENT_VAULT_SYSTEM_CA_BUNDLE")]
    pub system_ca: Option<PathBuf>,
}

/// `http://host:port` of `--proxy`, checked: plain http (Envoy's listener), no user,
/// no path.
pub fn proxy_authority(proxy: &str) -> anyhow::Result<String> {
    let bad = || {
        anyhow::anyhow!(
            "--proxy {proxy:?}: expected Envoy's address as http://HOST:PORT, e.g. {DEFAULT_PROXY}"
        )
    };
    let rest = proxy.trim().strip_prefix("http://").ok_or_else(bad)?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty()
        || authority.contains(['/', '?', '#', '@', ' '])
        || authority.starts_with(':')
    {
        return Err(bad());
    }
    Ok(authority.to_string())
}

/// `http://<token>:<vault>@<authority>`: what `HTTPS_PROXY` and `HTTP_PROXY` hold.
pub fn proxy_url(authority: &str, token: &str, vault: &str) -> String {
    format!("http://{token}:{vault}@{authority}")
}

/// The host of a control-plane address (`http://127.0.0.1:14321` → `127.0.0.1`).
pub fn address_host(address: &str) -> String {
    let rest = address.split_once("://").map_or(address, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default().to_string(),
        None => authority
            .rsplit_once(':')
            .map_or(authority, |(host, _)| host)
            .to_string(),
    }
}

/// The variables and their values, in the order they are printed.
pub fn variables(proxy_url: &str, no_proxy: &str, bundle: &Path) -> Vec<(&'static str, String)> {
    let bundle = bundle.display().to_string();
    let mut vars = vec![
        ("HTTPS_PROXY", proxy_url.to_string()),
        ("https_proxy", proxy_url.to_string()),
        ("HTTP_PROXY", proxy_url.to_string()),
        ("http_proxy", proxy_url.to_string()),
        ("NO_PROXY", no_proxy.to_string()),
        ("no_proxy", no_proxy.to_string()),
    ];
    vars.extend(CA_VARIABLES.iter().map(|name| (*name, bundle.clone())));
    vars
}

/// `export NAME='value'`, quoted for any POSIX shell.
pub fn export_line(name: &str, value: &str) -> String {
    format!("export {name}='{}'", value.replace('\'', r"'\''"))
}

/// The system CA bundle to append: `explicit`, else the first usual place that exists.
fn system_bundle(explicit: Option<&Path>) -> anyhow::Result<Option<(PathBuf, String)>> {
    if let Some(path) = explicit {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the system CA bundle {}", path.display()))?;
        return Ok(Some((path.to_path_buf(), text)));
    }
    Ok(SYSTEM_BUNDLES.iter().find_map(|path| {
        std::fs::read_to_string(path)
            .ok()
            .map(|text| (PathBuf::from(path), text))
    }))
}

/// The bundle: the proxy CA first, then `system` (if any).
pub fn bundle(ca_pem: &str, system: Option<&str>) -> String {
    let mut out =
        String::from("# The Agent Vault proxy CA: Envoy presents certificates it signs\n");
    out.push_str(ca_pem.trim_end());
    out.push('\n');
    if let Some(system) = system {
        out.push_str("# The system's roots, for hosts reached without the proxy\n");
        out.push_str(system.trim_end());
        out.push('\n');
    }
    out
}

/// Writes `contents` to `path` with mode 0644 (agents may run as other users),
/// atomically; creates the directory if needed.
fn write_bundle(path: &Path, contents: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the directory {}", dir.display()))?;
    }
    crate::ca::write_public_file(path, contents.as_bytes())
        .with_context(|| format!("cannot write the CA bundle {}", path.display()))
}

/// `av_agt_` and 64 hex digits.
pub fn check_token_format(token: &str) -> anyhow::Result<()> {
    let hex = token.strip_prefix("av_agt_").unwrap_or_default();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!(
            "that is not an agent token: expected av_agt_ followed by 64 hex digits (the token \
             `agent create` or `agent rotate` printed)"
        );
    }
    Ok(())
}

/// The agent's token: one line of stdin, or a hidden prompt on a terminal.
fn read_token(name: &str) -> anyhow::Result<Zeroizing<String>> {
    let token = if prompt::stdin_is_terminal() {
        prompt::prompt_hidden(&format!("Token of agent {name} (av_agt_…): "))?
    } else {
        prompt::read_line(&mut std::io::stdin().lock())?.with_context(|| {
            format!("no token on stdin: pipe agent {name}'s token (av_agt_…) into this command")
        })?
    };
    let token = Zeroizing::new(token.trim().to_string());
    check_token_format(&token)?;
    Ok(token)
}

/// The vault named in the proxy URL: the one asked for (it must be granted), else the
/// agent's only one.
pub fn choose_vault(
    agent: &str,
    granted: &[String],
    asked: Option<&str>,
) -> anyhow::Result<String> {
    match asked {
        Some(vault) if granted.iter().any(|g| g == vault) => Ok(vault.to_string()),
        Some(vault) => bail!(
            "agent {agent} has no access to vault {vault:?} (it has: {})",
            granted.join(", ")
        ),
        None => match granted {
            [only] => Ok(only.clone()),
            [] => bail!("agent {agent} has access to no vault: grant one with `agent create`"),
            several => bail!(
                "agent {agent} has access to several vaults ({}): name one with --vault",
                several.join(", ")
            ),
        },
    }
}

/// The vault names of a `{"vaults": [{"vault", "role"}]}` answer.
fn granted_vaults(answer: &Value) -> Vec<String> {
    output::items(answer.get("vaults").unwrap_or(&Value::Null))
        .iter()
        .map(|g| output::str_field(g, "vault").to_string())
        .filter(|v| !v.is_empty())
        .collect()
}

/// Writes the bundle and prints the environment of an agent with `token` on `vault`.
pub fn print_env(ctx: &Context, args: &EnvArgs, token: &str, vault: &str) -> anyhow::Result<()> {
    let authority = proxy_authority(&args.proxy)?;
    let ca_pem = super::ca::fetch_pem(ctx)?;
    let system = system_bundle(args.system_ca.as_deref())?;
    let path = match &args.ca_out {
        Some(path) => path.clone(),
        None => ctx.state.dir().join(DEFAULT_BUNDLE),
    };
    write_bundle(
        &path,
        &bundle(&ca_pem, system.as_ref().map(|(_, t)| t.as_str())),
    )?;
    match &system {
        Some((from, _)) => output::note(&format!(
            "Wrote the CA bundle {} (the proxy CA and the system's roots from {})",
            path.display(),
            from.display()
        )),
        None => output::note(&format!(
            "Wrote the CA bundle {} with the proxy CA only: no system CA bundle was found \
             (pass --system-ca), so hosts reached without the proxy will not verify",
            path.display()
        )),
    }
    if args.ca_out.is_none() {
        output::note(
            "It is in your ~/.agent-vault/, which other OS users cannot read: for an agent \
             that runs as another user, pass --ca-out with a path it can read.",
        );
    }
    let url = proxy_url(&authority, token, vault);
    let vars = variables(&url, &address_host(&ctx.address), &path);
    if ctx.json {
        let object: serde_json::Map<String, Value> = vars
            .into_iter()
            .map(|(k, v)| (k.to_string(), Value::String(v)))
            .collect();
        return output::json(&Value::Object(object));
    }
    let lines: Vec<String> = vars.iter().map(|(k, v)| export_line(k, v)).collect();
    output::text(&(lines.join("\n") + "\n"))
}

/// `agent env NAME`: reads the token, checks it is NAME's, prints its environment.
pub fn run_env(ctx: &Context, name: &str, args: &EnvArgs) -> anyhow::Result<()> {
    proxy_authority(&args.proxy)?;
    let token = read_token(name)?;
    let client = Client::new(
        &ctx.address,
        Some(token.to_string()),
        ctx.ca_file.as_deref(),
    )?;
    let whoami = client
        .get(&api_path(&["v1", "auth", "whoami"]))
        .map_err(|err| match ApiError::find(&err) {
            Some(api) if api.status == 401 => anyhow::anyhow!(
                "the server does not accept this token: it was revoked, rotated or mistyped \
                 (`agent-vault agent rotate {name} --env` issues a new one)"
            ),
            _ => err,
        })?;
    let kind = output::str_field(&whoami, "kind");
    let owner = output::str_field(&whoami, "name");
    if kind != "agent" {
        bail!("that is not an agent token");
    }
    if owner != name {
        bail!("this token belongs to agent {owner}, not {name}");
    }
    let vault = ctx.vault();
    let asked =
        matches!(vault.source, VaultSource::Flag | VaultSource::Env).then_some(vault.name.as_str());
    let vault = choose_vault(name, &granted_vaults(&whoami), asked)?;
    print_env(ctx, args, &token, &vault)
}

/// `--env` on `create` and `rotate`: the environment of the token just issued.
pub fn print_issued(ctx: &Context, args: &EnvArgs, issued: &Value) -> anyhow::Result<()> {
    let token = output::str_field(issued, "token");
    if token.is_empty() {
        bail!("the server's answer has no token");
    }
    let vaults = granted_vaults(issued);
    let vault = vaults
        .first()
        .context("the server's answer names no vault")?;
    if vaults.len() > 1 {
        output::note(&format!(
            "The proxy URLs name vault {vault}; for another of its vaults, the agent puts that \
             name after the ':'."
        ));
    }
    output::note("These lines hold the agent's token, shown this once: keep them.");
    print_env(ctx, args, token, vault)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "av_agt_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn the_proxy_must_be_envoys_plain_http_address() {
        assert_eq!(proxy_authority(DEFAULT_PROXY).unwrap(), "127.0.0.1:10000");
        assert_eq!(
            proxy_authority("http://proxy.internal:3128/").unwrap(),
            "proxy.internal:3128"
        );
        for bad in [
            "127.0.0.1:10000",
            "https://127.0.0.1:10000",
            "http://user:pw@127.0.0.1:10000",
            "http://127.0.0.1:10000/path",
            "http://",
            "http://:10000",
        ] {
            let err = proxy_authority(bad).unwrap_err().to_string();
            assert!(err.contains("--proxy"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_lines_name_the_proxy_with_the_token_the_control_plane_and_the_bundle() {
        let url = proxy_url("127.0.0.1:10000", TOKEN, "my-vault");
        assert_eq!(url, format!("http://{TOKEN}:my-vault@127.0.0.1:10000"));
        let vars = variables(&url, "127.0.0.1", Path::new("/home/a/ca bundle.pem"));
        let names: Vec<&str> = vars.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            names,
            [
                "HTTPS_PROXY",
                "https_proxy",
                "HTTP_PROXY",
                "http_proxy",
                "NO_PROXY",
                "no_proxy",
                "SSL_CERT_FILE",
                "REQUESTS_CA_BUNDLE",
                "NODE_EXTRA_CA_CERTS",
                "CURL_CA_BUNDLE",
                "GIT_SSL_CAINFO",
            ]
        );
        assert_eq!(
            export_line("SSL_CERT_FILE", "/home/a/ca bundle.pem"),
            "export SSL_CERT_FILE='/home/a/ca bundle.pem'"
        );
        assert_eq!(export_line("X", "it's"), r"export X='it'\''s'");
    }

    #[test]
    fn the_control_planes_host_is_what_no_proxy_names() {
        assert_eq!(address_host("http://127.0.0.1:14321"), "127.0.0.1");
        assert_eq!(
            address_host("https://vault.example.com"),
            "vault.example.com"
        );
        assert_eq!(address_host("http://[::1]:14321"), "::1");
    }

    #[test]
    fn the_bundle_holds_the_proxy_ca_first_then_the_system_roots() {
        let ca = "-----BEGIN CERTIFICATE-----\nA\n-----END CERTIFICATE-----\n";
        let system = "-----BEGIN CERTIFICATE-----\nB\n-----END CERTIFICATE-----";
        let both = bundle(ca, Some(system));
        let a = both.find("\nA\n").unwrap();
        let b = both.find("\nB\n").unwrap();
        assert!(a < b, "{both}");
        assert!(!bundle(ca, None).contains("system"));
    }

    #[test]
    fn the_bundle_is_written_readable_by_everyone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new").join("bundle.pem");
        write_bundle(&path, "x").unwrap();
        write_bundle(&path, "y").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "y");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
    }

    #[test]
    fn tokens_are_checked_before_anything_is_sent() {
        assert!(check_token_format(TOKEN).is_ok());
        for bad in [
            "",
            "av_agt_",
            "av_sess_0123",
            &TOKEN[..70],
            &format!("{TOKEN}0"),
        ] {
            let err = check_token_format(bad).unwrap_err().to_string();
            assert!(err.contains("not an agent token"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_vault_is_the_one_asked_for_or_the_only_one() {
        let one = vec!["a".to_string()];
        let two = vec!["a".to_string(), "b".to_string()];
        assert_eq!(choose_vault("bot", &one, None).unwrap(), "a");
        assert_eq!(choose_vault("bot", &two, Some("b")).unwrap(), "b");
        let err = choose_vault("bot", &two, None).unwrap_err().to_string();
        assert!(err.contains("several vaults (a, b)"), "{err}");
        let err = choose_vault("bot", &one, Some("c"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no access to vault \"c\""), "{err}");
    }
}
