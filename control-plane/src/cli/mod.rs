//! The `agent-vault` command line: the server and the human's administration tool in
//! one binary.
//!
//! Every command except `server` is a thin HTTP client of the control plane's API
//! (`control-plane/API.md`); nothing here touches the store directly, so the CLI can
//! never do what the API would refuse.
//!
//! | module | concept |
//! |---|---|
//! | [`context`] | what a command runs against: server address, token, vault |
//! | [`session`] | `~/.agent-vault/session.json` and `config.json` |
//! | [`client`] | the HTTP client and its one-line errors |
//! | [`prompt`] | passwords (terminal or `--password-stdin`) and confirmations |
//! | [`output`] | tables, JSON and timestamps |
//! | [`auth`] | `auth register|login|logout|whoami` |
//! | [`vaults`] | `vault create|list|delete|use|update|discover` and the vault subtrees |
//! | [`users`] | `vault user` |
//! | [`credentials`] | `vault credential` (alias `creds`) |
//! | [`services`] | `vault service` |
//! | [`logs`] | `vault logs` |
//! | [`proposals`] | `vault proposal create|list|show|approve|reject|review` |
//! | [`agents`] | `agent` |
//! | [`agent_env`] | `agent env`, `--env`: the environment an agent runs with |
//! | [`ca`] | `ca cert|rotate`: the proxy CA of HTTPS interception |
//! | [`master_key`] | `master-password change`, `master-key rotate` |
//! | [`healthcheck`] | `healthcheck`: the container probe |
//!
//! Errors: every failure is one line on stderr (`error: …`) and exit code 1; clap's
//! own usage errors keep clap's exit code 2. Nothing panics on bad input.

pub mod agent_env;
pub mod agents;
pub mod auth;
pub mod ca;
pub mod catalog;
pub mod client;
pub mod context;
pub mod credentials;
pub mod healthcheck;
pub mod logs;
pub mod master_key;
pub mod output;
pub mod prompt;
pub mod proposals;
pub mod services;
pub mod session;
pub mod users;
pub mod vaults;

use std::io::Write;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::server::ServerArgs;
use context::Context;

/// The address the CLI talks to when neither `--address`, `AGENT_VAULT_ADDR` nor a
/// saved session names one.
pub const DEFAULT_ADDRESS: &str = "http://127.0.0.1:14321";

/// `agent-vault`: a credential broker for AI agents.
#[derive(Debug, Parser)]
#[command(
    name = "agent-vault",
    version,
    about = "Agent Vault: a credential broker for AI agents",
    long_about = "Agent Vault: a credential broker for AI agents.\n\n\
        Agents send their HTTP traffic through Envoy; the agent-vault filter injects the \
        real credentials, so agents never hold them. This binary runs the control plane \
        (`agent-vault server`) and administers it: users, vaults, credentials, services \
        and agent tokens.",
    after_help = "Start here:\n  \
        agent-vault server &\n  \
        agent-vault auth register --email you@example.com\n  \
        agent-vault auth login --email you@example.com\n  \
        agent-vault vault credential set STRIPE_KEY=sk_test_abc123 --vault default\n  \
        agent-vault vault service add --name stripe --host api.stripe.com --auth-type bearer --token-key STRIPE_KEY\n  \
        agent-vault agent create my-agent --vault default --env   # the agent's HTTPS_PROXY & co."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

const GLOBAL_OPTIONS: &str = "Global options";

/// Options every command accepts, before or after the subcommand.
#[derive(Debug, Clone, Default, Args)]
pub struct GlobalArgs {
    /// Control-plane URL [default: the saved session's address, else http://127.0.0.1:14321]
    #[arg(
        long,
        global = true,
        env = "AGENT_VAULT_ADDR",
        value_name = "URL",
        help_heading = GLOBAL_OPTIONS
    )]
    pub address: Option<String>,
    /// Vault to act on [env: AGENT_VAULT_VAULT] [default: the one chosen with `vault use`, else `default`]
    #[arg(long, global = true, value_name = "NAME", help_heading = GLOBAL_OPTIONS)]
    pub vault: Option<String>,
    /// Print the server's JSON instead of a table or a message
    #[arg(long, global = true, help_heading = GLOBAL_OPTIONS)]
    pub json: bool,
    /// PEM file of CA certificates to trust for an https address, besides the system's
    #[arg(
        long,
        global = true,
        env = "AGENT_VAULT_CA_FILE",
        value_name = "PEM",
        help_heading = GLOBAL_OPTIONS
    )]
    pub ca_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the control plane (HTTP API, UI and the data-plane socket for Envoy)
    Server(ServerArgs),
    /// Register, log in and out, and show who you are
    #[command(subcommand)]
    Auth(auth::AuthCommand),
    /// Manage vaults and what is in them: users, credentials, services
    #[command(subcommand)]
    Vault(vaults::VaultCommand),
    /// Manage agent tokens, and print the environment an agent runs with
    #[command(subcommand)]
    Agent(agents::AgentCommand),
    /// The proxy CA agents trust for HTTPS through the proxy: print it, or rotate it
    #[command(subcommand)]
    Ca(ca::CaCommand),
    /// List the built-in service templates (`vault service add --from-catalog NAME`)
    Catalog,
    /// Change or remove the master password that wraps the data key (owner only)
    #[command(subcommand)]
    MasterPassword(master_key::MasterPasswordCommand),
    /// Rotate the data key that encrypts every credential value (owner only)
    #[command(subcommand)]
    MasterKey(master_key::MasterKeyCommand),
    /// Exit 0 if the server at --address answers GET /health (a container probe)
    Healthcheck(healthcheck::HealthcheckArgs),
}

/// Entry point of the `agent-vault` binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            // Help and version go to stdout with exit 0; usage errors to stderr with 2.
            let _ = err.print();
            return ExitCode::from(u8::try_from(err.exit_code()).unwrap_or(2));
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => report(&err),
    }
}

/// Runs one parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let Cli { global, command } = cli;
    // Resolved lazily: `server` needs no session, and a broken ~/.agent-vault must not
    // stop the server from starting.
    let ctx = || Context::from_env(&global);
    match command {
        Command::Server(args) => crate::server::run_from_args(args),
        Command::Auth(cmd) => auth::run(cmd, &ctx()?),
        Command::Vault(cmd) => vaults::run(cmd, &ctx()?),
        Command::Agent(cmd) => agents::run(cmd, &ctx()?),
        Command::Ca(cmd) => ca::run(cmd, &ctx()?),
        Command::Catalog => catalog::run(&ctx()?),
        Command::MasterPassword(cmd) => master_key::run_password(cmd, &ctx()?),
        Command::MasterKey(cmd) => master_key::run_key(cmd, &ctx()?),
        Command::Healthcheck(args) => healthcheck::run(global.address.as_deref(), &args),
    }
}

/// Prints `err` as one line on stderr and picks the exit code.
fn report(err: &anyhow::Error) -> ExitCode {
    // A reader that went away (`agent-vault vault credential list | head -1`) is not
    // an error worth a message.
    let broken_pipe = err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    });
    if broken_pipe {
        return ExitCode::SUCCESS;
    }
    let _ = writeln!(std::io::stderr(), "error: {}", one_line(err));
    ExitCode::FAILURE
}

/// `err` and its causes as one line: `outer: inner: root`, without repeating a cause
/// that the outer message already quotes.
pub fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Parses `flags` as one command's arguments `T`, the way the CLI does (panics with
/// clap's message if they do not parse).
#[cfg(test)]
pub(crate) fn parse_flags<T: clap::Args>(flags: &[&str]) -> T {
    #[derive(clap::Parser)]
    struct Wrapper<T: clap::Args> {
        #[command(flatten)]
        inner: T,
    }
    let args = std::iter::once("command").chain(flags.iter().copied());
    match <Wrapper<T> as clap::Parser>::try_parse_from(args) {
        Ok(w) => w.inner,
        Err(err) => panic!("{flags:?}: {err}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    fn parse(args: &[&str]) -> Cli {
        match Cli::try_parse_from(args) {
            Ok(cli) => cli,
            Err(err) => panic!("{args:?} did not parse: {err}"),
        }
    }

    #[test]
    fn seed_set_command_parses_with_trailing_vault() {
        let cli = parse(&[
            "agent-vault",
            "vault",
            "credential",
            "set",
            "STRIPE_KEY=sk_test_abc123",
            "--vault",
            "my-vault",
        ]);
        assert_eq!(cli.global.vault.as_deref(), Some("my-vault"));
        match cli.command {
            Command::Vault(vaults::VaultCommand::Credential(
                credentials::CredentialCommand::Set { pairs },
            )) => assert_eq!(pairs, vec!["STRIPE_KEY=sk_test_abc123".to_string()]),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn creds_alias_sets_several_pairs() {
        let cli = parse(&["agent-vault", "vault", "creds", "set", "A=1", "B=2"]);
        assert_eq!(cli.global.vault, None);
        match cli.command {
            Command::Vault(vaults::VaultCommand::Credential(
                credentials::CredentialCommand::Set { pairs },
            )) => assert_eq!(pairs, vec!["A=1".to_string(), "B=2".to_string()]),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn seed_delete_command_parses() {
        let cli = parse(&[
            "agent-vault",
            "vault",
            "credential",
            "delete",
            "STRIPE_KEY",
            "--vault",
            "my-vault",
        ]);
        assert_eq!(cli.global.vault.as_deref(), Some("my-vault"));
        match cli.command {
            Command::Vault(vaults::VaultCommand::Credential(
                credentials::CredentialCommand::Delete { keys },
            )) => assert_eq!(keys, vec!["STRIPE_KEY".to_string()]),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn global_flags_work_before_and_after_the_subcommand() {
        let before = parse(&[
            "agent-vault",
            "--json",
            "--vault",
            "a",
            "vault",
            "credential",
            "list",
        ]);
        assert!(before.global.json);
        assert_eq!(before.global.vault.as_deref(), Some("a"));
        let after = parse(&[
            "agent-vault",
            "vault",
            "credential",
            "list",
            "--reveal",
            "--json",
            "--address",
            "http://127.0.0.1:1",
        ]);
        assert!(after.global.json);
        assert_eq!(after.global.address.as_deref(), Some("http://127.0.0.1:1"));
    }

    #[test]
    fn agent_create_takes_repeated_vault_grants() {
        let cli = parse(&[
            "agent-vault",
            "agent",
            "create",
            "bot",
            "--vault",
            "a",
            "--vault",
            "b:proxy",
        ]);
        match cli.command {
            Command::Agent(agents::AgentCommand::Create {
                name, vault, env, ..
            }) => {
                assert_eq!(name, "bot");
                assert_eq!(vault, vec!["a".to_string(), "b:proxy".to_string()]);
                assert!(!env);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn agent_env_takes_the_proxy_and_the_bundle_path_but_no_token() {
        let cli = parse(&[
            "agent-vault",
            "agent",
            "env",
            "bot",
            "--proxy",
            "http://10.0.0.2:10000",
            "--ca-out",
            "/srv/bot/ca.pem",
        ]);
        match cli.command {
            Command::Agent(agents::AgentCommand::Env { name, env_args }) => {
                assert_eq!(name, "bot");
                assert_eq!(env_args.proxy, "http://10.0.0.2:10000");
                assert_eq!(
                    env_args.ca_out.unwrap(),
                    std::path::Path::new("/srv/bot/ca.pem")
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        let no_token_flag =
            Cli::try_parse_from(["agent-vault", "agent", "env", "bot", "--token", "x"]);
        assert!(no_token_flag.is_err());
    }

    #[test]
    fn vault_logs_takes_follow_limit_and_the_global_flags() {
        let cli = parse(&[
            "agent-vault",
            "vault",
            "logs",
            "--follow",
            "--limit",
            "5",
            "--json",
            "--vault",
            "v1x",
        ]);
        assert!(cli.global.json);
        assert_eq!(cli.global.vault.as_deref(), Some("v1x"));
        match cli.command {
            Command::Vault(vaults::VaultCommand::Logs(args)) => {
                assert!(args.follow);
                assert_eq!(args.limit, 5);
            }
            other => panic!("unexpected {other:?}"),
        }
        for bad in ["0", "1001", "x"] {
            assert!(Cli::try_parse_from(["agent-vault", "vault", "logs", "--limit", bad]).is_err());
        }
    }

    #[test]
    fn vault_proposal_subcommands_parse() {
        let cli = parse(&[
            "agent-vault",
            "vault",
            "proposal",
            "approve",
            "3",
            "STRIPE_KEY=sk_test_abc123",
            "--yes",
            "--vault",
            "my-vault",
        ]);
        assert_eq!(cli.global.vault.as_deref(), Some("my-vault"));
        match cli.command {
            Command::Vault(vaults::VaultCommand::Proposal(
                proposals::ProposalCommand::Approve { id, pairs, yes, .. },
            )) => {
                assert_eq!(id, 3);
                assert_eq!(pairs, vec!["STRIPE_KEY=sk_test_abc123".to_string()]);
                assert!(yes);
            }
            other => panic!("unexpected {other:?}"),
        }
        let cli = parse(&[
            "agent-vault",
            "vault",
            "proposal",
            "list",
            "--status",
            "pending",
            "--json",
        ]);
        assert!(cli.global.json);
        match cli.command {
            Command::Vault(vaults::VaultCommand::Proposal(proposals::ProposalCommand::List {
                status,
            })) => assert_eq!(status, Some(proposals::StatusArg::Pending)),
            other => panic!("unexpected {other:?}"),
        }
        for args in [
            &[
                "agent-vault",
                "vault",
                "proposal",
                "reject",
                "1",
                "--reason",
                "no",
            ][..],
            &["agent-vault", "vault", "proposal", "review"][..],
            &["agent-vault", "vault", "proposal", "show", "2"][..],
            &["agent-vault", "vault", "proposal", "create", "-f", "-"][..],
            &[
                "agent-vault",
                "vault",
                "proposal",
                "create",
                "--service-name",
                "s",
                "--host",
                "a.com",
                "--auth-type",
                "bearer",
                "--token-key",
                "K",
                "--credential",
                "K:desc",
            ][..],
        ] {
            parse(args);
        }
        for bad in [
            &["agent-vault", "vault", "proposal", "show", "x"][..],
            &[
                "agent-vault",
                "vault",
                "proposal",
                "list",
                "--status",
                "done",
            ][..],
            &["agent-vault", "vault", "proposal", "approve"][..],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn server_subcommand_takes_server_flags() {
        let cli = parse(&["agent-vault", "server", "--port", "0", "--password-stdin"]);
        match cli.command {
            Command::Server(args) => {
                assert_eq!(args.port, 0);
                assert!(args.password_stdin);
                assert_eq!(args.log_retention_days, 7);
                assert_eq!(args.log_max_records, 10_000);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn usage_errors_are_clap_errors() {
        for args in [
            &["agent-vault", "vault", "credential", "set"][..],
            &["agent-vault", "vault", "service", "add", "--name", "x"][..],
            &["agent-vault", "vault", "frobnicate"][..],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?} parsed");
        }
    }

    #[test]
    fn one_line_joins_causes_without_newlines() {
        let err = anyhow::anyhow!("root\ncause").context("outer");
        assert_eq!(one_line(&err), "outer: root cause");
    }
}
