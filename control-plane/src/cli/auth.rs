//! `agent-vault auth`: accounts and the saved session.

use clap::Subcommand;
use serde_json::{json, Value};

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
        } => register(ctx, &email, password_stdin, invite),
        AuthCommand::Login {
            email,
            password_stdin,
        } => login(ctx, &email, password_stdin),
        AuthCommand::Logout => logout(ctx),
        AuthCommand::Whoami => whoami(ctx),
    }
}

fn register(
    ctx: &Context,
    email: &str,
    password_stdin: bool,
    invite: Option<String>,
) -> anyhow::Result<()> {
    let password = prompt::new_password("Password for the new account: ", password_stdin)?;
    let mut body = json!({ "email": email, "password": password.as_str() });
    if let Some(invite) = invite {
        body["invite"] = Value::String(invite);
    }
    let registered = ctx
        .anonymous_client()?
        .post(&api_path(&["v1", "auth", "register"]), &body)?;
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

fn login(ctx: &Context, email: &str, password_stdin: bool) -> anyhow::Result<()> {
    let password = prompt::password("Password: ", password_stdin)?;
    let answer = ctx.anonymous_client()?.post(
        &api_path(&["v1", "auth", "login"]),
        &json!({ "email": email, "password": password.as_str() }),
    )?;
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
