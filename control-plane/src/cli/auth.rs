//! `agent-vault auth`: accounts and the saved session.

use std::path::PathBuf;

use clap::Subcommand;
use serde_json::{json, Value};

use crate::crypto::{BOOTSTRAP_PREFIX, LOCAL_LOGIN_PREFIX};
use crate::users::{BOOTSTRAP_TOKEN_FILE, LOCAL_LOGIN_TOKEN_FILE};

use super::client::{api_path, ApiError};
use super::context::{Context, TOKEN_ENV};
use super::output::{self, str_field};
use super::prompt;
use super::session::Session;

#[derive(Debug, Subcommand)]
pub enum AuthCommand {
    /// Create an account; the first one becomes the owner, later ones need an invite
    Register {
        #[arg(long, value_name = "EMAIL")]
        email: String,
        /// Read the password from the first line of stdin instead of prompting
        #[arg(long)]
        password_stdin: bool,
        /// The invite token printed by `vault user add`
        #[arg(long, value_name = "TOKEN")]
        invite: Option<String>,
        /// The first registration's (the owner's) proof: the token the server wrote to
        /// `bootstrap-token` in its data dir; read from there when this user can
        #[arg(long, value_name = "TOKEN", env = BOOTSTRAP_TOKEN_ENV)]
        bootstrap_token: Option<String>,
    },
    /// Log in and save the session (0600) under ~/.agent-vault/
    Login {
        #[arg(long, value_name = "EMAIL")]
        email: String,
        /// Read the password from the first line of stdin instead of prompting
        #[arg(long)]
        password_stdin: bool,
    },
    /// End the saved session on the server and forget it
    Logout,
    /// Show who the current token belongs to
    Whoami,
}

pub fn run(cmd: AuthCommand, ctx: &Context) -> anyhow::Result<()> {
    match cmd {
        AuthCommand::Register {
            email,
            password_stdin,
            invite,
            bootstrap_token,
        } => register(ctx, &email, password_stdin, invite, bootstrap_token),
        AuthCommand::Login {
            email,
            password_stdin,
        } => login(ctx, &email, password_stdin),
        AuthCommand::Logout => logout(ctx),
        AuthCommand::Whoami => whoami(ctx),
    }
}

/// Names the server's data dir for the CLI (the server's `--data-dir` default too).
pub const DATA_DIR_ENV: &str = "AGENT_VAULT_DATA_DIR";
pub const BOOTSTRAP_TOKEN_ENV: &str = "AGENT_VAULT_BOOTSTRAP_TOKEN";

/// Where the server this CLI talks to keeps its data: `AGENT_VAULT_DATA_DIR`, else the
/// default data dir, but only for a server on this machine (a loopback address) unless
/// the variable names it: a token of one server is never sent to another.
fn local_data_dir(address: &str) -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os(DATA_DIR_ENV).filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    is_loopback_address(address).then(crate::server::default_data_dir)
}

/// Whether `http(s)://host[:port]` names this machine.
fn is_loopback_address(address: &str) -> bool {
    let authority = address
        .split_once("://")
        .map_or(address, |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A token the server wrote into its data dir (`file`), when this user can read it:
/// the server's own OS user can, agents (other users) cannot.
fn local_token(ctx: &Context, file: &str, prefix: &str) -> Option<String> {
    let dir = local_data_dir(&ctx.address)?;
    let text = std::fs::read_to_string(dir.join(file)).ok()?;
    let token = text.trim();
    token.starts_with(prefix).then(|| token.to_owned())
}

fn register(
    ctx: &Context,
    email: &str,
    password_stdin: bool,
    invite: Option<String>,
    bootstrap_token: Option<String>,
) -> anyhow::Result<()> {
    let password = prompt::new_password("Password for the new account: ", password_stdin)?;
    let mut body = json!({ "email": email, "password": password.as_str() });
    if let Some(invite) = invite {
        body["invite"] = Value::String(invite);
    }
    let bootstrap_token = bootstrap_token
        .filter(|t| !t.trim().is_empty())
        .or_else(|| local_token(ctx, BOOTSTRAP_TOKEN_FILE, BOOTSTRAP_PREFIX));
    if let Some(token) = bootstrap_token {
        body["bootstrap_token"] = Value::String(token);
    }
    let registered = ctx
        .anonymous_client()?
        .post(&api_path(&["v1", "auth", "register"]), &body)
        .map_err(|err| with_bootstrap_hint(ctx, err))?;
    if ctx.json {
        return output::json(&registered);
    }
    let email = non_empty(str_field(&registered, "email"), email);
    if registered.get("owner").and_then(Value::as_bool) == Some(true) {
        output::line(&format!("Registered {email} as the owner"))?;
    } else {
        output::line(&format!("Registered {email}"))?;
    }
    output::note(&format!(
        "Log in with: agent-vault auth login --email {email}"
    ));
    Ok(())
}

/// Says where the CLI looked for the bootstrap token when the server wanted one.
fn with_bootstrap_hint(ctx: &Context, mut err: anyhow::Error) -> anyhow::Error {
    let looked = local_data_dir(&ctx.address).map(|dir| dir.join(BOOTSTRAP_TOKEN_FILE));
    if let Some(api) = err.downcast_mut::<ApiError>() {
        if api.code == "bootstrap_token_required" {
            api.hint = Some(match looked {
                Some(file) => format!(
                    "no readable {} here; run this as the server's OS user, set {DATA_DIR_ENV} \
                     to the server's data dir, or pass --bootstrap-token",
                    file.display()
                ),
                None => format!(
                    "this server is not on a loopback address: set {DATA_DIR_ENV} to its data \
                     dir or pass --bootstrap-token"
                ),
            });
        }
    }
    err
}

fn login(ctx: &Context, email: &str, password_stdin: bool) -> anyhow::Result<()> {
    let password = prompt::password("Password: ", password_stdin)?;
    let mut body = json!({ "email": email, "password": password.as_str() });
    // Proves this login comes from the server's OS user: failed logins by others (an
    // agent trying passwords) then never keep it waiting.
    if let Some(token) = local_token(ctx, LOCAL_LOGIN_TOKEN_FILE, LOCAL_LOGIN_PREFIX) {
        body["local_login_token"] = Value::String(token);
    }
    let answer = ctx
        .anonymous_client()?
        .post(&api_path(&["v1", "auth", "login"]), &body)?;
    let token = str_field(&answer, "token");
    if token.is_empty() {
        anyhow::bail!("the server's login answer has no token");
    }
    let email = non_empty(str_field(&answer, "email"), email);
    ctx.state.save_session(&Session {
        address: ctx.address.clone(),
        email: email.to_owned(),
        token: token.to_owned(),
    })?;
    if ctx.env_token_set() {
        output::note(&format!(
            "note: {TOKEN_ENV} is set and overrides this session until you unset it"
        ));
    }
    if ctx.json {
        // Never the token: it is in the 0600 session file, not on a terminal.
        return output::json(&json!({
            "email": email,
            "address": ctx.address,
            "expires_at": answer.get("expires_at").cloned().unwrap_or(Value::Null),
        }));
    }
    output::line(&format!("Logged in as {email}"))
}

fn logout(ctx: &Context) -> anyhow::Result<()> {
    let Some(session) = &ctx.session else {
        return output::line("Not logged in");
    };
    // End the session on the server that issued it, whatever --address says.
    let ended = super::client::Client::new(
        &session.address,
        Some(session.token.clone()),
        ctx.ca_file.as_deref(),
    )
    .and_then(|client| client.post(&api_path(&["v1", "auth", "logout"]), &json!({})));
    ctx.state.remove_session()?;
    match ended {
        Ok(_) => {}
        // An expired session is as logged out as it gets.
        Err(err) if ApiError::find(&err).is_some_and(|e| e.status == 401) => {}
        Err(err) => output::note(&format!(
            "warning: the server did not end the session ({}); the local session is removed",
            super::one_line(&err)
        )),
    }
    output::line(&format!("Logged out {}", session.email))
}

fn whoami(ctx: &Context) -> anyhow::Result<()> {
    let me = ctx.client()?.get(&api_path(&["v1", "auth", "whoami"]))?;
    if ctx.json {
        return output::json(&me);
    }
    let line = match str_field(&me, "kind") {
        "agent" => {
            let grants: Vec<String> = output::items(me.get("vaults").unwrap_or(&Value::Null))
                .iter()
                .map(|g| format!("{}:{}", str_field(g, "vault"), str_field(g, "role")))
                .collect();
            format!(
                "agent {} (vaults: {}) at {}",
                str_field(&me, "name"),
                if grants.is_empty() {
                    "none".to_owned()
                } else {
                    grants.join(", ")
                },
                ctx.address
            )
        }
        _ => {
            let owner = if me.get("owner").and_then(Value::as_bool) == Some(true) {
                " (owner)"
            } else {
                ""
            };
            format!("{}{owner} at {}", str_field(&me, "email"), ctx.address)
        }
    };
    output::line(&line)
}

fn non_empty<'a>(preferred: &'a str, fallback: &'a str) -> &'a str {
    if preferred.is_empty() {
        fallback
    } else {
        preferred
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_servers_on_this_machine_get_the_data_dirs_tokens_by_default() {
        for (address, loopback) in [
            ("http://127.0.0.1:14321", true),
            ("https://localhost:14321", true),
            ("http://[::1]:14321", true),
            ("http://127.0.0.2", true),
            ("https://vault.example.com", false),
            ("http://10.0.0.5:14321", false),
            ("http://[2001:db8::1]:14321", false),
        ] {
            assert_eq!(is_loopback_address(address), loopback, "{address}");
        }
    }
}
