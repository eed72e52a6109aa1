//! `agent-vault vault`: vaults themselves, and the subtrees for what lives in a vault
//! (users, credentials, services, logs, proposals).

use agent_vault_rules::RateLimit;
use anyhow::bail;
use clap::{Subcommand, ValueEnum};
use serde_json::{json, Value};

use super::client::api_path;
use super::context::{Context, VaultSource};
use super::output::{self, str_field, yes_no};
use super::{credentials, logs, prompt, proposals, services, users};

#[derive(Debug, Subcommand)]
// Parsed once per process: the size of the `service`/`proposal` variants does not matter.
#[allow(clippy::large_enum_variant)]
pub enum VaultCommand {
    /// Create a vault; you become its admin
    Create {
        /// Lowercase letters, digits and dashes, e.g. my-vault
        name: String,
    },
    /// List the vaults you can see (* marks the one commands act on)
    List,
    /// Delete a vault with its credentials, services, members and agent grants
    Delete {
        /// The vault to delete
        name: String,
        /// Do not ask for confirmation (required when stdin is not a terminal)
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Make NAME the vault commands act on when --vault is not given
    Use {
        /// The vault to act on from now on
        name: String,
    },
    /// Change a vault's settings
    #[command(group(clap::ArgGroup::new("setting").required(true).multiple(true)
        .args(["unmatched_host_policy", "passthrough_host", "no_passthrough_hosts",
               "rate_limit", "no_rate_limit"])))]
    Update {
        /// The vault to change
        name: String,
        /// What the proxy does with a host no service matches
        #[arg(long, value_enum, value_name = "POLICY")]
        unmatched_host_policy: Option<UnmatchedHostPolicy>,
        /// A host whose HTTPS tunnels the proxy never decrypts (clients that pin
        /// certificates), e.g. api.example.com, *.example.com or api.example.com:8443;
        /// repeat for several. Replaces the vault's list. Refused for a host a service
        /// that injects a credential names
        #[arg(long, value_name = "HOST", conflicts_with = "no_passthrough_hosts")]
        passthrough_host: Vec<String>,
        /// Empty the vault's passthrough list: every tunnel is decrypted again
        #[arg(long)]
        no_passthrough_hosts: bool,
        /// At most this many requests per agent over all the vault's services together
        /// (each service's own limit still applies): N/s or N/min, e.g. 100/min
        #[arg(long, value_name = "N/s|N/min", value_parser = services::parse_rate_limit,
              conflicts_with = "no_rate_limit")]
        rate_limit: Option<RateLimit>,
        /// Remove the vault-wide rate limit
        #[arg(long)]
        no_rate_limit: bool,
    },
    /// Invite and manage the vault's users
    #[command(subcommand)]
    User(users::UserCommand),
    /// Set, read and delete credentials
    #[command(subcommand, visible_alias = "creds", alias = "credentials")]
    Credential(credentials::CredentialCommand),
    /// Manage the service rules that say which host gets which credential
    #[command(subcommand)]
    Service(services::ServiceCommand),
    /// Show the vault's services and credential keys (what an agent can discover)
    Discover,
    /// Show the vault's request log (what agents sent through the proxy)
    Logs(logs::LogsArgs),
    /// Propose access (agents), and review, approve or reject proposals (members)
    #[command(subcommand, visible_alias = "proposals")]
    Proposal(proposals::ProposalCommand),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum UnmatchedHostPolicy {
    /// Refuse requests to hosts no service matches (403 with a proposal hint)
    Deny,
    /// Forward them untouched, without credentials
    Passthrough,
}

impl UnmatchedHostPolicy {
    fn as_str(self) -> &'static str {
        match self {
            Self::Deny => "deny",
            Self::Passthrough => "passthrough",
        }
    }
}

pub fn run(cmd: VaultCommand, ctx: &Context) -> anyhow::Result<()> {
    match cmd {
        VaultCommand::Create { name } => create(ctx, &name),
        VaultCommand::List => list(ctx),
        VaultCommand::Delete { name, yes } => delete(ctx, &name, yes),
        VaultCommand::Use { name } => use_vault(ctx, &name),
        VaultCommand::Update {
            name,
            unmatched_host_policy,
            passthrough_host,
            no_passthrough_hosts,
            rate_limit,
            no_rate_limit,
        } => {
            let hosts =
                (no_passthrough_hosts || !passthrough_host.is_empty()).then_some(passthrough_host);
            let limit = (no_rate_limit || rate_limit.is_some()).then_some(rate_limit);
            update(ctx, &name, unmatched_host_policy, hosts, limit)
        }
        VaultCommand::User(cmd) => users::run(cmd, ctx),
        VaultCommand::Credential(cmd) => credentials::run(cmd, ctx),
        VaultCommand::Service(cmd) => services::run(cmd, ctx),
        VaultCommand::Discover => discover(ctx),
        VaultCommand::Logs(args) => logs::run(&args, ctx),
        VaultCommand::Proposal(cmd) => proposals::run(cmd, ctx),
    }
}

/// DESIGN.md §5: `^[a-z0-9]([a-z0-9-]{1,62}[a-z0-9])$`.
pub fn valid_vault_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    let edge = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    (3..=64).contains(&bytes.len())
        && bytes.first().is_some_and(edge)
        && bytes.last().is_some_and(edge)
        && bytes.iter().all(|b| edge(b) || *b == b'-')
}

fn check_vault_name(name: &str) -> anyhow::Result<()> {
    if !valid_vault_name(name) {
        bail!(
            "invalid vault name {name:?}: use 3-64 lowercase letters, digits and dashes, \
             starting and ending with a letter or digit"
        );
    }
    Ok(())
}

fn create(ctx: &Context, name: &str) -> anyhow::Result<()> {
    check_vault_name(name)?;
    let vault = ctx
        .client()?
        .post(&api_path(&["v1", "vaults"]), &json!({ "name": name }))?;
    if ctx.json {
        return output::json(&vault);
    }
    output::line(&format!("Created vault {name}"))
}

fn list(ctx: &Context) -> anyhow::Result<()> {
    let vaults = ctx.client()?.get(&api_path(&["v1", "vaults"]))?;
    if ctx.json {
        return output::json(&vaults);
    }
    let current = ctx.vault().name;
    let rows: Vec<Vec<String>> = output::items(&vaults)
        .iter()
        .map(|v| {
            let name = str_field(v, "name");
            vec![
                if name == current { "*" } else { "" }.to_owned(),
                name.to_owned(),
                str_field(v, "role").to_owned(),
                str_field(v, "unmatched_host_policy").to_owned(),
                services::rate_limit_text(v),
            ]
        })
        .collect();
    if rows.is_empty() {
        return output::line("No vaults");
    }
    output::text(&output::table(
        &["", "NAME", "ROLE", "UNMATCHED HOSTS", "RATE LIMIT"],
        &rows,
    ))
}

fn delete(ctx: &Context, name: &str, yes: bool) -> anyhow::Result<()> {
    let client = ctx.client()?;
    if !yes {
        if !prompt::stdin_is_terminal() {
            bail!("refusing to delete vault {name} without confirmation: pass --yes");
        }
        let question = format!(
            "Delete vault {name} with all its credentials, services, members and agent grants? \
             This cannot be undone."
        );
        if !prompt::confirm(&question)? {
            bail!("vault {name} not deleted");
        }
    }
    client.delete(&api_path(&["v1", "vaults", name]))?;
    // A deleted vault must not stay the implicit target of every later command.
    if ctx.config.vault.as_deref() == Some(name) {
        let mut config = ctx.config.clone();
        config.vault = None;
        ctx.state.save_config(&config)?;
        output::note(&format!(
            "note: vault {name} was the one chosen with `vault use`; commands now act on `default`"
        ));
    }
    output::line(&format!("Deleted vault {name}"))
}

fn use_vault(ctx: &Context, name: &str) -> anyhow::Result<()> {
    check_vault_name(name)?;
    let mut config = ctx.config.clone();
    config.vault = Some(name.to_owned());
    ctx.state.save_config(&config)?;
    if std::env::var(super::context::VAULT_ENV).is_ok_and(|v| !v.trim().is_empty()) {
        output::note(&format!(
            "note: {} is set and takes precedence over `vault use`",
            super::context::VAULT_ENV
        ));
    }
    output::line(&format!("Using vault {name}"))
}

fn update(
    ctx: &Context,
    name: &str,
    policy: Option<UnmatchedHostPolicy>,
    passthrough_hosts: Option<Vec<String>>,
    rate_limit: Option<Option<RateLimit>>,
) -> anyhow::Result<()> {
    let mut body = serde_json::Map::new();
    if let Some(limit) = &rate_limit {
        body.insert("rate_limit".into(), json!(limit));
    }
    if let Some(policy) = policy {
        body.insert("unmatched_host_policy".into(), json!(policy.as_str()));
    }
    if let Some(hosts) = &passthrough_hosts {
        body.insert("passthrough_hosts".into(), json!(hosts));
    }
    let vault = ctx
        .client()?
        .patch(&api_path(&["v1", "vaults", name]), &Value::Object(body))?;
    if ctx.json {
        return output::json(&vault);
    }
    if let Some(policy) = policy {
        let effect = match policy {
            UnmatchedHostPolicy::Deny => "refused",
            UnmatchedHostPolicy::Passthrough => "passed through without credentials",
        };
        output::line(&format!(
            "Vault {name}: requests to unmatched hosts are now {effect}"
        ))?;
    }
    if passthrough_hosts.is_some() {
        let hosts: Vec<&str> = vault["passthrough_hosts"]
            .as_array()
            .map(|hosts| hosts.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if hosts.is_empty() {
            output::line(&format!(
                "Vault {name}: no passthrough hosts; every HTTPS tunnel is decrypted"
            ))?;
        } else {
            output::line(&format!(
                "Vault {name}: HTTPS tunnels to {} go through untouched (nothing injected)",
                hosts.join(", ")
            ))?;
        }
    }
    if rate_limit.is_some() {
        output::line(&match services::rate_limit_text(&vault).as_str() {
            "none" => format!("Vault {name}: no vault-wide rate limit"),
            limit => format!("Vault {name}: at most {limit} per agent over all its services"),
        })?;
    }
    Ok(())
}

fn discover(ctx: &Context) -> anyhow::Result<()> {
    let vault = ctx.vault();
    let client = ctx.client()?;
    // An agent with a single vault may leave the vault out; name it only when the
    // caller did, or when it is a user (for whom `default` is the documented fallback).
    let is_agent = ctx
        .token()
        .is_ok_and(|(token, _)| token.starts_with("av_agt_"));
    let header = if is_agent && vault.source == VaultSource::Default {
        None
    } else {
        Some(vault.name.clone())
    };
    let found = client
        .with_vault_header(header)
        .get(&api_path(&["discover"]))?;
    if ctx.json {
        return output::json(&found);
    }
    let name = match str_field(&found, "vault") {
        "" => vault.name.as_str(),
        name => name,
    };
    let services: Vec<Vec<String>> = output::items(found.get("services").unwrap_or(&Value::Null))
        .iter()
        .map(|s| {
            vec![
                str_field(s, "name").to_owned(),
                str_field(s, "host").to_owned(),
                str_field(s, "auth_type").to_owned(),
                yes_no(s.get("enabled")).to_owned(),
                super::services::redact_text(s).to_owned(),
                super::services::substitutions_text(s),
            ]
        })
        .collect();
    let keys: Vec<&str> = output::items(found.get("credentials").unwrap_or(&Value::Null))
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let mut text = format!("Vault {name}\n\n");
    if services.is_empty() {
        text.push_str("No services\n");
    } else {
        text.push_str(&output::table(
            &[
                "SERVICE",
                "HOST",
                "AUTH",
                "ENABLED",
                "REDACT",
                "SUBSTITUTIONS",
            ],
            &services,
        ));
    }
    text.push('\n');
    if keys.is_empty() {
        text.push_str("No credentials\n");
    } else {
        text.push_str(&format!("Credentials: {}\n", keys.join(", ")));
    }
    output::text(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vault_names() {
        for good in ["default", "my-vault", "a1b", "x".repeat(64).as_str()] {
            assert!(valid_vault_name(good), "{good}");
        }
        for bad in [
            "",
            "ab",
            "-abc",
            "abc-",
            "My-Vault",
            "my_vault",
            "a b c",
            "x".repeat(65).as_str(),
        ] {
            assert!(!valid_vault_name(bad), "{bad}");
        }
    }
}
