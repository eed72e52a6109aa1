//! `agent-vault agent`: agent tokens and their vault grants.
//!
//! A token is shown once, by `create` and `rotate`. It goes alone to stdout so
//! `TOKEN=$(agent-vault agent create bot)` captures exactly the token; everything
//! said around it goes to stderr. With `--env` they print the agent's whole
//! environment instead (proxy URLs with the token, `NO_PROXY`, the CA bundle), and
//! `agent env NAME` prints it later from the token on stdin ([`super::agent_env`]).

use anyhow::bail;
use clap::Subcommand;
use serde_json::{json, Value};

use super::agent_env::{self, EnvArgs};
use super::client::api_path;
use super::context::Context;
use super::output::{self, str_field};

pub const DEFAULT_AGENT_ROLE: &str = "proxy";

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Create an agent and print its token (shown once)
    Create {
        /// The agent's name, unique on this server
        name: String,
        /// Grant access to VAULT with ROLE (default proxy); repeatable.
        /// Without it: the global vault (AGENT_VAULT_VAULT, `vault use`, `default`)
        #[arg(long, value_name = "VAULT[:ROLE]")]
        vault: Vec<String>,
        /// Print the agent's environment (proxy URLs with the token, NO_PROXY, the CA
        /// bundle's variables) instead of the token alone
        #[arg(long)]
        env: bool,
        #[command(flatten)]
        env_args: EnvArgs,
    },
    /// List agents with a grant on a vault you administer
    List,
    /// Revoke an agent: its token stops working at the next snapshot
    Revoke {
        /// The agent to revoke
        name: String,
    },
    /// Give an agent a new token; the old one stops working
    Rotate {
        /// The agent whose token to replace
        name: String,
        /// Print the agent's environment with the new token instead of the token alone
        #[arg(long)]
        env: bool,
        #[command(flatten)]
        env_args: EnvArgs,
    },
    /// Print the environment an agent runs with: HTTPS_PROXY/HTTP_PROXY with its
    /// token, NO_PROXY, and SSL_CERT_FILE & co. naming a CA bundle written now. The
    /// token is read from stdin (or a hidden prompt), never from the command line
    #[command(
        after_help = "Example:\n  agent-vault agent env my-agent --ca-out /srv/agent/ca.pem < token.txt > agent.env\n  \
                      eval \"$(agent-vault agent env my-agent < token.txt)\""
    )]
    Env {
        /// The agent whose token is on stdin
        name: String,
        #[command(flatten)]
        env_args: EnvArgs,
    },
}

/// A vault grant of an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub vault: String,
    pub role: String,
}

/// `my-vault` → proxy on my-vault; `my-vault:proxy` → the role given.
pub fn parse_grant(raw: &str) -> anyhow::Result<Grant> {
    let (vault, role) = match raw.split_once(':') {
        Some((vault, role)) => (vault.trim(), role.trim()),
        None => (raw.trim(), DEFAULT_AGENT_ROLE),
    };
    if vault.is_empty() {
        bail!("--vault {raw:?}: expected VAULT or VAULT:ROLE");
    }
    if role.is_empty() {
        bail!(
            "--vault {raw:?}: the role after ':' is empty (agents have role {DEFAULT_AGENT_ROLE})"
        );
    }
    Ok(Grant {
        vault: vault.to_owned(),
        role: role.to_owned(),
    })
}

/// The grants of `agent create`: the `--vault` flags, else the resolved vault.
pub fn grants(flags: &[String], resolved_vault: &str) -> anyhow::Result<Vec<Grant>> {
    if flags.is_empty() {
        return Ok(vec![Grant {
            vault: resolved_vault.to_owned(),
            role: DEFAULT_AGENT_ROLE.to_owned(),
        }]);
    }
    let mut grants: Vec<Grant> = Vec::with_capacity(flags.len());
    for raw in flags {
        let grant = parse_grant(raw)?;
        if grants.iter().any(|g| g.vault == grant.vault) {
            bail!("--vault {} is given twice", grant.vault);
        }
        grants.push(grant);
    }
    Ok(grants)
}

pub fn run(cmd: AgentCommand, ctx: &Context) -> anyhow::Result<()> {
    match cmd {
        AgentCommand::Create {
            name,
            vault,
            env,
            env_args,
        } => create(ctx, &name, &vault, env.then_some(&env_args)),
        AgentCommand::List => list(ctx),
        AgentCommand::Revoke { name } => {
            ctx.client()?.delete(&api_path(&["v1", "agents", &name]))?;
            output::line(&format!("Revoked agent {name}"))
        }
        AgentCommand::Rotate {
            name,
            env,
            env_args,
        } => {
            if env {
                // Refused before the old token is thrown away.
                agent_env::proxy_authority(&env_args.proxy)?;
            }
            let rotated = ctx
                .client()?
                .post(&api_path(&["v1", "agents", &name, "rotate"]), &json!({}))?;
            let headline = format!("Rotated the token of agent {name}");
            match env {
                true => {
                    output::note(&headline);
                    agent_env::print_issued(ctx, &env_args, &rotated)
                }
                false => show_token(ctx, &rotated, &headline),
            }
        }
        AgentCommand::Env { name, env_args } => agent_env::run_env(ctx, &name, &env_args),
    }
}

fn create(
    ctx: &Context,
    name: &str,
    vault_flags: &[String],
    env: Option<&EnvArgs>,
) -> anyhow::Result<()> {
    if let Some(env) = env {
        // Refused before the agent exists, so its token is never lost to a typo.
        agent_env::proxy_authority(&env.proxy)?;
    }
    let grants = grants(vault_flags, &ctx.vault().name)?;
    let vaults: Vec<Value> = grants
        .iter()
        .map(|g| json!({ "vault": g.vault, "role": g.role }))
        .collect();
    let created = ctx.client()?.post(
        &api_path(&["v1", "agents"]),
        &json!({ "name": name, "vaults": vaults }),
    )?;
    let access: Vec<String> = grants
        .iter()
        .map(|g| format!("{} ({})", g.vault, g.role))
        .collect();
    let headline = format!("Created agent {name} with access to {}", access.join(", "));
    match env {
        Some(env) => {
            output::note(&headline);
            agent_env::print_issued(ctx, env, &created)
        }
        None => show_token(ctx, &created, &headline),
    }
}

/// Prints a freshly issued token: JSON with `--json`, else the token alone on stdout
/// and the explanation on stderr.
fn show_token(ctx: &Context, answer: &Value, headline: &str) -> anyhow::Result<()> {
    if ctx.json {
        return output::json(answer);
    }
    let token = str_field(answer, "token");
    if token.is_empty() {
        bail!("the server's answer has no token");
    }
    output::note(headline);
    output::note("Store this token now: it will not be shown again.");
    output::line(token)?;
    let vault = output::items(answer.get("vaults").unwrap_or(&Value::Null))
        .first()
        .map(|g| str_field(g, "vault"))
        .filter(|v| !v.is_empty())
        .unwrap_or("VAULT");
    output::note(&format!(
        "The agent uses it through Envoy: HTTPS_PROXY=http://<token>:{vault}@127.0.0.1:10000 \
         (`agent-vault agent env NAME` prints every variable it needs, the proxy CA included)"
    ));
    Ok(())
}

fn list(ctx: &Context) -> anyhow::Result<()> {
    let agents = ctx.client()?.get(&api_path(&["v1", "agents"]))?;
    if ctx.json {
        return output::json(&agents);
    }
    let rows: Vec<Vec<String>> = output::items(&agents)
        .iter()
        .map(|a| {
            let vaults: Vec<String> = output::items(a.get("vaults").unwrap_or(&Value::Null))
                .iter()
                .map(|g| format!("{}:{}", str_field(g, "vault"), str_field(g, "role")))
                .collect();
            let expires = match a.get("expires_at") {
                None | Some(Value::Null) => "never".to_owned(),
                some => output::time(some),
            };
            vec![
                str_field(a, "name").to_owned(),
                vaults.join(", "),
                output::time(a.get("created_at")),
                expires,
            ]
        })
        .collect();
    if rows.is_empty() {
        return output::line("No agents");
    }
    output::text(&output::table(
        &["NAME", "VAULTS", "CREATED", "EXPIRES"],
        &rows,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(vault: &str, role: &str) -> Grant {
        Grant {
            vault: vault.into(),
            role: role.into(),
        }
    }

    #[test]
    fn vault_alone_means_proxy() {
        assert_eq!(parse_grant("my-vault").unwrap(), grant("my-vault", "proxy"));
    }

    #[test]
    fn vault_with_role() {
        assert_eq!(
            parse_grant("my-vault:proxy").unwrap(),
            grant("my-vault", "proxy")
        );
        assert_eq!(parse_grant("v:reader").unwrap(), grant("v", "reader"));
    }

    #[test]
    fn malformed_grants_are_refused() {
        for bad in ["", ":proxy", "my-vault:", " : "] {
            assert!(parse_grant(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn without_flags_the_resolved_vault_is_granted() {
        assert_eq!(
            grants(&[], "default").unwrap(),
            vec![grant("default", "proxy")]
        );
    }

    #[test]
    fn repeated_flags_become_grants_and_duplicates_are_refused() {
        let flags = vec!["a".to_owned(), "b:proxy".to_owned()];
        assert_eq!(
            grants(&flags, "ignored").unwrap(),
            vec![grant("a", "proxy"), grant("b", "proxy")]
        );
        let twice = vec!["a".to_owned(), "a:proxy".to_owned()];
        assert!(grants(&twice, "x").is_err());
    }
}
