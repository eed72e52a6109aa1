//! `agent-vault vault user`: who may administer a vault.

use clap::{Subcommand, ValueEnum};
use serde_json::{json, Value};

use super::client::api_path;
use super::context::Context;
use super::output::{self, str_field};

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Add a user to the vault; prints a one-time invite when they have no account yet
    Add {
        /// The user's email; they get an invite if they have no account yet
        email: String,
        #[arg(long, value_enum, default_value_t = UserRole::Member)]
        role: UserRole,
    },
    /// List the vault's users and pending invites
    List,
    /// Remove a user from the vault
    Remove {
        /// The user to remove
        email: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum UserRole {
    /// Read, set and delete credentials; approve proposals
    Member,
    /// Everything a member does, plus services, agents and users
    Admin,
}

impl UserRole {
    fn as_str(self) -> &'static str {
        match self {
            Self::Member => "member",
            Self::Admin => "admin",
        }
    }
}

pub fn run(cmd: UserCommand, ctx: &Context) -> anyhow::Result<()> {
    let vault = ctx.vault().name;
    match cmd {
        UserCommand::Add { email, role } => add(ctx, &vault, &email, role),
        UserCommand::List => list(ctx, &vault),
        UserCommand::Remove { email } => remove(ctx, &vault, &email),
    }
}

fn add(ctx: &Context, vault: &str, email: &str, role: UserRole) -> anyhow::Result<()> {
    let added = ctx.client()?.post(
        &api_path(&["v1", "vaults", vault, "users"]),
        &json!({ "email": email, "role": role.as_str() }),
    )?;
    if ctx.json {
        return output::json(&added);
    }
    let email = match str_field(&added, "email") {
        "" => email,
        e => e,
    };
    output::text(&add_message(vault, email, role.as_str(), &added))
}

/// What `vault user add` prints: the invite and how to use it, when there is one.
fn add_message(vault: &str, email: &str, role: &str, added: &Value) -> String {
    match added.get("invite").and_then(Value::as_str) {
        Some(invite) if !invite.is_empty() => format!(
            "Invited {email} to vault {vault} as {role}.\n\
             Invite token (one-time, valid 7 days): {invite}\n\
             They register with:\n  \
             agent-vault auth register --email {email} --invite {invite}\n"
        ),
        _ => format!("Added {email} to vault {vault} as {role}\n"),
    }
}

fn list(ctx: &Context, vault: &str) -> anyhow::Result<()> {
    let users = ctx
        .client()?
        .get(&api_path(&["v1", "vaults", vault, "users"]))?;
    if ctx.json {
        return output::json(&users);
    }
    let rows: Vec<Vec<String>> = output::items(&users)
        .iter()
        .map(|u| {
            let pending = u.get("pending").and_then(Value::as_bool) == Some(true);
            vec![
                str_field(u, "email").to_owned(),
                str_field(u, "role").to_owned(),
                if pending { "invited" } else { "active" }.to_owned(),
            ]
        })
        .collect();
    if rows.is_empty() {
        return output::line(&format!("No users in vault {vault}"));
    }
    output::text(&output::table(&["EMAIL", "ROLE", "STATUS"], &rows))
}

fn remove(ctx: &Context, vault: &str, email: &str) -> anyhow::Result<()> {
    ctx.client()?
        .delete(&api_path(&["v1", "vaults", vault, "users", email]))?;
    output::line(&format!("Removed {email} from vault {vault}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invite_message_prints_the_register_line() {
        let text = add_message(
            "my-vault",
            "bob@example.com",
            "member",
            &json!({"email": "bob@example.com", "role": "member", "invite": "av_inv_abc"}),
        );
        assert!(
            text.lines().any(|l| l.trim()
                == "agent-vault auth register --email bob@example.com --invite av_inv_abc"),
            "{text}"
        );
    }

    #[test]
    fn existing_user_is_added_without_an_invite() {
        let text = add_message(
            "v",
            "a@b.c",
            "admin",
            &json!({"email": "a@b.c", "role": "admin", "invite": null}),
        );
        assert_eq!(text, "Added a@b.c to vault v as admin\n");
    }
}
