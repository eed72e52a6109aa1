//! `agent-vault vault proposal`: agents ask for access, humans review it.
//!
//! - `create` (agents, or users): a one-service proposal from `vault service add`'s
//!   flags plus `--credential KEY[:description]` slots, or the seed's full JSON with
//!   `-f FILE|-`. Prints the id, the status and the approval link for a human.
//! - `list`, `show`: never a value (the server sends `has_value` instead), except
//!   `show --reveal`: the values the agent supplied, for a member or admin to confirm.
//! - `approve N [KEY=VALUE …] [--yes] [--accept-warnings]`: every set slot needs a
//!   value (`KEY=-` reads it instead of taking it from the command line); missing ones
//!   are prompted for without echo on a terminal, and agent-supplied values are
//!   accepted only after asking (or with `--yes`). Without a terminal, a missing value
//!   is an error naming the key. The proposal is shown as a diff against the vault;
//!   each warning (an existing credential sent to a new host, a host changed, TLS
//!   turned off, a rule shadowing another) is acknowledged one by one on a terminal,
//!   or with `--accept-warnings` after reading them; else nothing is applied.
//! - `reject N [--reason R]`.
//! - `review`: each pending proposal in turn, approve / reject / skip / quit, and a
//!   summary at the end. Without a terminal the answers come from stdin, one per line
//!   (see [`review`]), so scripts and tests can drive it.
//!
//! Everything the agent wrote (messages, descriptions, names) is printed through
//! [`output::cell`], so it cannot smuggle terminal escape sequences.

use std::io::{BufRead, Read, Write};

use anyhow::{anyhow, bail, Context as _};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Map, Value};
use zeroize::Zeroizing;

use super::client::{api_path, Client};
use super::context::{Context, VaultSource};
use super::credentials::{check_key, read_pairs};
use super::output::{self, str_field};
use super::prompt;
use super::services::{
    build_service, is_h2c, methods_text, rate_limit_text, redact_text, substitutions_text,
    AddService, AuthType, ServiceFlags,
};

#[derive(Debug, Subcommand)]
pub enum ProposalCommand {
    /// Propose a service and the credential slots it needs (a human approves it)
    Create(Box<CreateArgs>),
    /// List the vault's proposals (an agent sees its own)
    List {
        /// Only proposals in this state
        #[arg(long, value_enum, value_name = "STATUS")]
        status: Option<StatusArg>,
    },
    /// Show one proposal (a credential value only with --reveal)
    Show {
        /// The proposal id
        id: u64,
        /// Also print the values the agent supplied, to confirm them before approving
        /// (members and admins of the vault; never an agent)
        #[arg(long)]
        reveal: bool,
    },
    /// Approve a pending proposal, giving a value for each credential slot
    Approve {
        /// The proposal id
        id: u64,
        /// Values for the proposal's credential slots; missing ones are prompted for
        #[arg(value_name = "KEY=VALUE")]
        pairs: Vec<String>,
        /// Accept the values the agent supplied without asking
        #[arg(long, short = 'y')]
        yes: bool,
        /// Acknowledge every warning of the proposal's diff (read them first: `show N`)
        #[arg(long)]
        accept_warnings: bool,
    },
    /// Reject a pending proposal
    Reject {
        /// The proposal id
        id: u64,
        /// Why (the agent sees it)
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
    /// Go through the pending proposals one by one: approve, reject, skip or quit
    Review,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatusArg {
    Pending,
    Applied,
    Rejected,
    Expired,
}

impl StatusArg {
    fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Applied => "applied",
            Self::Rejected => "rejected",
            Self::Expired => "expired",
        }
    }
}

#[derive(Debug, Clone, Default, Args)]
pub struct CreateArgs {
    /// The whole proposal as JSON (the seed's shape); `-` reads stdin
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: Option<String>,
    /// Name of the service to add or replace
    #[arg(long, value_name = "NAME")]
    pub service_name: Option<String>,
    /// The service's host: api.stripe.com, *.github.com, with optional :port and /path*
    #[arg(long)]
    pub host: Option<String>,
    #[arg(long, value_enum, value_name = "TYPE")]
    pub auth_type: Option<AuthType>,
    #[command(flatten)]
    pub flags: ServiceFlags,
    /// Remove this service (repeatable)
    #[arg(long = "delete-service", value_name = "NAME")]
    pub delete_service: Vec<String>,
    /// A credential slot a human fills in, with an optional description (repeatable)
    #[arg(long = "credential", value_name = "KEY[:DESCRIPTION]")]
    pub credential: Vec<String>,
    /// Remove this credential (repeatable)
    #[arg(long = "delete-credential", value_name = "KEY")]
    pub delete_credential: Vec<String>,
    /// Short summary for the reviewer
    #[arg(long, value_name = "TEXT")]
    pub message: Option<String>,
    /// Longer explanation shown on the approval page
    #[arg(long, value_name = "TEXT")]
    pub user_message: Option<String>,
}

pub fn run(cmd: ProposalCommand, ctx: &Context) -> anyhow::Result<()> {
    match cmd {
        ProposalCommand::Create(args) => create(ctx, &args),
        ProposalCommand::List { status } => list(ctx, status),
        ProposalCommand::Show { id, reveal } => show(ctx, id, reveal),
        ProposalCommand::Approve {
            id,
            pairs,
            yes,
            accept_warnings,
        } => approve(ctx, id, &pairs, yes, accept_warnings),
        ProposalCommand::Reject { id, reason } => reject(ctx, id, reason.as_deref()),
        ProposalCommand::Review => review(ctx),
    }
}

// ---------------------------------------------------------------- routes

/// Whether this command runs with an agent token (agents use `/v1/proposals`).
fn is_agent(ctx: &Context) -> bool {
    ctx.token()
        .is_ok_and(|(token, _)| token.starts_with("av_agt_"))
}

/// A client for the agent routes: `X-Vault` unless an agent left the vault implicit
/// (an agent with one vault may omit it; `default` is only a user's fallback).
fn agent_route_client(ctx: &Context) -> anyhow::Result<Client> {
    let vault = ctx.vault();
    let header = if is_agent(ctx) && vault.source == VaultSource::Default {
        None
    } else {
        Some(vault.name)
    };
    Ok(ctx.client()?.with_vault_header(header))
}

/// Reads go to `/v1/proposals…` for agents and `/v1/vaults/{vault}/proposals…` for users.
fn read_client_and_path(ctx: &Context, id: Option<u64>) -> anyhow::Result<(Client, String)> {
    let id = id.map(|id| id.to_string());
    if is_agent(ctx) {
        let mut segments = vec!["v1", "proposals"];
        segments.extend(id.as_deref());
        return Ok((agent_route_client(ctx)?, api_path(&segments)));
    }
    let vault = ctx.vault().name;
    let mut segments = vec!["v1", "vaults", vault.as_str(), "proposals"];
    segments.extend(id.as_deref());
    Ok((ctx.client()?, api_path(&segments)))
}

fn user_path(vault: &str, id: u64, action: &str) -> String {
    api_path(&["v1", "vaults", vault, "proposals", &id.to_string(), action])
}

// ---------------------------------------------------------------- create

/// Whether any flag that builds a proposal is given (besides `-f`).
fn has_proposal_flags(args: &CreateArgs) -> bool {
    has_service_flags(args)
        || args.service_name.is_some()
        || !args.delete_service.is_empty()
        || !args.credential.is_empty()
        || !args.delete_credential.is_empty()
        || args.message.is_some()
        || args.user_message.is_some()
}

/// Whether a flag that describes the one service is given (besides its name).
fn has_service_flags(args: &CreateArgs) -> bool {
    args.host.is_some() || args.auth_type.is_some() || args.flags.any()
}

/// The proposal JSON for `create`'s flags.
pub fn build_proposal(args: &CreateArgs) -> anyhow::Result<Value> {
    let mut services = Vec::new();
    match &args.service_name {
        Some(name) => {
            let host = args
                .host
                .clone()
                .ok_or_else(|| anyhow!("--service-name needs --host"))?;
            let auth_type = args
                .auth_type
                .ok_or_else(|| anyhow!("--service-name needs --auth-type"))?;
            let add = AddService {
                name: name.clone(),
                host,
                auth_type,
                flags: args.flags.clone(),
            };
            let mut service = build_service(&add)?;
            if let Some(object) = service.as_object_mut() {
                object.insert("action".into(), json!("set"));
            }
            services.push(service);
        }
        None if has_service_flags(args) => {
            bail!("--host, --auth-type and the auth flags describe a service: add --service-name NAME")
        }
        None => {}
    }
    for name in &args.delete_service {
        services.push(json!({"action": "delete", "name": name}));
    }
    let mut credentials = Vec::new();
    for raw in &args.credential {
        let (key, description) = match raw.split_once(':') {
            Some((key, description)) => (key.trim(), Some(description.trim())),
            None => (raw.trim(), None),
        };
        check_key(key)?;
        let mut slot = json!({"action": "set", "key": key});
        if let Some(description) = description.filter(|d| !d.is_empty()) {
            slot["description"] = json!(description);
        }
        credentials.push(slot);
    }
    for key in &args.delete_credential {
        check_key(key)?;
        credentials.push(json!({"action": "delete", "key": key}));
    }
    if services.is_empty() && credentials.is_empty() {
        bail!(
            "nothing to propose: give --service-name with --host and --auth-type, \
             --credential KEY, --delete-service, --delete-credential, or -f FILE"
        );
    }
    let mut proposal = Map::new();
    if !services.is_empty() {
        proposal.insert("services".into(), Value::Array(services));
    }
    if !credentials.is_empty() {
        proposal.insert("credentials".into(), Value::Array(credentials));
    }
    if let Some(message) = &args.message {
        proposal.insert("message".into(), json!(message));
    }
    if let Some(user_message) = &args.user_message {
        proposal.insert("user_message".into(), json!(user_message));
    }
    Ok(Value::Object(proposal))
}

/// `-f`'s input: one JSON object (the server checks the rest).
pub fn parse_proposal_file(text: &str, source: &str) -> anyhow::Result<Value> {
    let value: Value =
        serde_json::from_str(text).with_context(|| format!("{source} is not valid JSON"))?;
    if !value.is_object() {
        bail!(
            "{source}: expected a JSON object like {{\"services\": [...], \"credentials\": [...]}}"
        );
    }
    Ok(value)
}

fn read_file_arg(file: &str) -> anyhow::Result<(String, String)> {
    if file == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read the proposal from stdin")?;
        Ok((text, "stdin".to_owned()))
    } else {
        let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {file}"))?;
        Ok((text, file.to_owned()))
    }
}

fn create(ctx: &Context, args: &CreateArgs) -> anyhow::Result<()> {
    let body = match &args.file {
        Some(file) => {
            if has_proposal_flags(args) {
                bail!("-f takes the whole proposal: do not combine it with other proposal flags");
            }
            let (text, source) = read_file_arg(file)?;
            parse_proposal_file(&text, &source)?
        }
        None => build_proposal(args)?,
    };
    let created = agent_route_client(ctx)?.post(&api_path(&["v1", "proposals"]), &body)?;
    if ctx.json {
        return output::json(&created);
    }
    output::text(&format!(
        "Proposal {} is {} in vault {}.\nApproval link for a human (valid 24 hours):\n  {}\n",
        created.get("id").and_then(Value::as_u64).unwrap_or(0),
        output::cell(str_field(&created, "status")),
        output::cell(str_field(&created, "vault")),
        output::cell(str_field(&created, "approval_url")),
    ))
}

// ---------------------------------------------------------------- reading

fn list(ctx: &Context, status: Option<StatusArg>) -> anyhow::Result<()> {
    let (client, mut path) = read_client_and_path(ctx, None)?;
    if let Some(status) = status {
        path.push_str(&format!("?status={}", status.as_str()));
    }
    let proposals = client.get(&path)?;
    if ctx.json {
        return output::json(&proposals);
    }
    let vault = ctx.vault().name;
    let rows: Vec<Vec<String>> = output::items(&proposals)
        .iter()
        .map(|p| {
            vec![
                p.get("id").and_then(Value::as_u64).unwrap_or(0).to_string(),
                str_field(p, "status").to_owned(),
                proposer(p),
                output::time(p.get("created_at")),
                services_summary(p),
                credentials_summary(p),
                shorten(&output::cell(str_field(p, "message")), 60),
            ]
        })
        .collect();
    if rows.is_empty() {
        let which = status
            .map(|s| format!("{} ", s.as_str()))
            .unwrap_or_default();
        return output::line(&format!("No {which}proposals in vault {vault}"));
    }
    output::text(&output::table(
        &[
            "ID",
            "STATUS",
            "FROM",
            "CREATED",
            "SERVICES",
            "CREDENTIALS",
            "MESSAGE",
        ],
        &rows,
    ))
}

fn show(ctx: &Context, id: u64, reveal: bool) -> anyhow::Result<()> {
    if reveal && is_agent(ctx) {
        bail!(
            "an agent cannot reveal a proposal's values: a member or admin of the vault \
             confirms them (proposal show {id} --reveal, or the approval page)"
        );
    }
    let (client, mut path) = read_client_and_path(ctx, Some(id))?;
    if reveal {
        path.push_str("?reveal=true");
    }
    let proposal = client.get(&path)?;
    if ctx.json {
        return output::json(&proposal);
    }
    output::text(&describe(&proposal))
}

/// `agent bot` or `user a@b.c`.
fn proposer(p: &Value) -> String {
    let by = p.get("created_by").unwrap_or(&Value::Null);
    let who = match str_field(by, "kind") {
        "agent" => format!("agent {}", str_field(by, "name")),
        "user" => format!("user {}", str_field(by, "email")),
        _ => match str_field(p, "agent") {
            "" => "-".to_owned(),
            name => format!("agent {name}"),
        },
    };
    output::cell(&who)
}

fn is_delete(entry: &Value) -> bool {
    str_field(entry, "action") == "delete"
}

/// `stripe, -old-service` (deletes marked with `-`).
fn services_summary(p: &Value) -> String {
    let names: Vec<String> = output::items(p.get("services").unwrap_or(&Value::Null))
        .iter()
        .map(|s| {
            let sign = if is_delete(s) { "-" } else { "" };
            output::cell(&format!("{sign}{}", str_field(s, "name")))
        })
        .collect();
    if names.is_empty() {
        "-".to_owned()
    } else {
        names.join(", ")
    }
}

/// `STRIPE_KEY, GENERATED_TOKEN*, -OLD_API_KEY` (`*`: the agent supplied a value).
fn credentials_summary(p: &Value) -> String {
    let keys: Vec<String> = output::items(p.get("credentials").unwrap_or(&Value::Null))
        .iter()
        .map(|c| {
            let sign = if is_delete(c) { "-" } else { "" };
            let star = if has_value(c) { "*" } else { "" };
            output::cell(&format!("{sign}{}{star}", str_field(c, "key")))
        })
        .collect();
    if keys.is_empty() {
        "-".to_owned()
    } else {
        keys.join(", ")
    }
}

fn has_value(slot: &Value) -> bool {
    slot.get("has_value").and_then(Value::as_bool) == Some(true)
}

fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let cut: String = text.chars().take(max.saturating_sub(1)).collect();
    format!("{cut}…")
}

/// How a service's auth reads in one line: `bearer (STRIPE_KEY)`.
fn auth_summary(auth: &Value) -> String {
    let kind = str_field(auth, "type");
    let keys: Vec<String> = match kind {
        "bearer" => vec![str_field(auth, "token").to_owned()],
        "basic" => vec![
            str_field(auth, "username").to_owned(),
            str_field(auth, "password").to_owned(),
        ],
        "api-key" => vec![format!(
            "{} in {}",
            str_field(auth, "key"),
            str_field(auth, "header")
        )],
        "custom" => auth
            .get("headers")
            .and_then(Value::as_object)
            .map(|headers| {
                headers
                    .iter()
                    .map(|(name, template)| format!("{name}: {}", template.as_str().unwrap_or("")))
                    .collect()
            })
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    if keys.is_empty() {
        kind.to_owned()
    } else {
        format!("{kind} ({})", keys.join("; "))
    }
}

/// The full human-readable description of a proposal. A value only when the API sent
/// `values` (`show --reveal`); otherwise `has_value` alone.
pub fn describe(p: &Value) -> String {
    let mut out = String::new();
    let id = p.get("id").and_then(Value::as_u64).unwrap_or(0);
    out.push_str(&format!(
        "Proposal {id} in vault {}: {}\n",
        output::cell(str_field(p, "vault")),
        output::cell(str_field(p, "status"))
    ));
    out.push_str(&format!("  From:     {}\n", proposer(p)));
    out.push_str(&format!(
        "  Created:  {}\n",
        output::time(p.get("created_at"))
    ));
    if str_field(p, "status") == "pending" {
        out.push_str(&format!(
            "  Expires:  {}\n",
            output::time(p.get("expires_at"))
        ));
    }
    if let Some(message) = p.get("message").and_then(Value::as_str) {
        out.push_str(&format!("  Message:  {}\n", output::cell(message)));
    }
    if let Some(user_message) = p.get("user_message").and_then(Value::as_str) {
        out.push_str("  Explanation:\n");
        for line in user_message.lines() {
            out.push_str(&format!("    {}\n", output::cell(line)));
        }
    }
    let services = output::items(p.get("services").unwrap_or(&Value::Null));
    if !services.is_empty() {
        out.push_str("  Services:\n");
        for s in services {
            if is_delete(s) {
                out.push_str(&format!(
                    "    delete  {}\n",
                    output::cell(str_field(s, "name"))
                ));
                continue;
            }
            let mut flags = Vec::new();
            if s.get("enabled").and_then(Value::as_bool) == Some(false) {
                flags.push("disabled".to_owned());
            }
            if s.get("upstream_tls").and_then(Value::as_bool) == Some(false) {
                flags.push(if is_h2c(s) {
                    "plain HTTP/2 (h2c) upstream".to_owned()
                } else {
                    "plain HTTP upstream".to_owned()
                });
            }
            if s.get("methods").is_some() {
                flags.push(format!("methods {}", methods_text(s)));
            }
            if s.get("rate_limit").is_some() {
                flags.push(format!("rate limit {} per agent", rate_limit_text(s)));
            }
            if s.get("substitutions").is_some() {
                flags.push(format!("substitutes {}", substitutions_text(s)));
            }
            if redact_text(s) == "no" {
                flags.push("responses not redacted".to_owned());
            }
            let flags = if flags.is_empty() {
                String::new()
            } else {
                format!("  [{}]", flags.join(", "))
            };
            out.push_str(&format!(
                "    set     {}  {}  {}{flags}\n",
                output::cell(str_field(s, "name")),
                output::cell(str_field(s, "host")),
                output::cell(&auth_summary(s.get("auth").unwrap_or(&Value::Null))),
            ));
        }
    }
    let slots = output::items(p.get("credentials").unwrap_or(&Value::Null));
    if !slots.is_empty() {
        out.push_str("  Credentials:\n");
        for c in slots {
            let key = output::cell(str_field(c, "key"));
            if is_delete(c) {
                out.push_str(&format!("    delete  {key}\n"));
                continue;
            }
            let mut line = format!("    set     {key}");
            if let Some(description) = c.get("description").and_then(Value::as_str) {
                line.push_str(&format!("  {}", output::cell(description)));
            }
            if has_value(c) {
                line.push_str("  [value provided by the agent]");
            }
            out.push_str(&line);
            let revealed = p
                .get("values")
                .and_then(|values| values.get(str_field(c, "key")))
                .and_then(Value::as_str);
            if let Some(value) = revealed {
                out.push_str(&format!("\n            value:  {}", output::cell(value)));
            }
            out.push('\n');
            if let Some(obtain) = c.get("obtain").and_then(Value::as_str) {
                out.push_str(&format!("            obtain: {}\n", output::cell(obtain)));
            }
            if let Some(how) = c.get("obtain_instructions").and_then(Value::as_str) {
                out.push_str(&format!("            how:    {}\n", output::cell(how)));
            }
        }
    }
    if let Some(diff) = p.get("diff").filter(|d| d.is_object()) {
        out.push_str(&describe_diff(diff));
    }
    if let Some(review) = p.get("review").filter(|r| r.is_object()) {
        let mut line = format!(
            "  Reviewed: {} by {} at {}",
            output::cell(str_field(p, "status")),
            output::cell(str_field(review, "by")),
            output::time(review.get("at"))
        );
        if let Some(reason) = review.get("reason").and_then(Value::as_str) {
            line.push_str(&format!(": {}", output::cell(reason)));
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// `api.stripe.com, bearer STRIPE_KEY, TLS on`.
fn summary_line(s: &Value, with_methods: bool) -> String {
    let keys: Vec<String> = output::items(s.get("keys").unwrap_or(&Value::Null))
        .iter()
        .filter_map(Value::as_str)
        .map(output::cell)
        .collect();
    let tls = match s.get("upstream_tls").and_then(Value::as_bool) {
        Some(false) if is_h2c(s) => "TLS OFF, HTTP/2 (h2c)",
        Some(false) => "TLS OFF",
        _ => "TLS on",
    };
    let methods = if with_methods || s.get("methods").is_some() {
        format!(", methods {}", methods_text(s))
    } else {
        String::new()
    };
    let methods = if s.get("rate_limit").is_some() {
        format!("{methods}, rate limit {} per agent", rate_limit_text(s))
    } else {
        methods
    };
    let methods = if s.get("substitutions").is_some() {
        format!("{methods}, substitutes {}", substitutions_text(s))
    } else {
        methods
    };
    let methods = if redact_text(s) == "no" {
        format!("{methods}, responses NOT redacted")
    } else {
        methods
    };
    format!(
        "{}, {} {}, {tls}{methods}",
        output::cell(str_field(s, "host")),
        output::cell(str_field(s, "auth_type")),
        keys.join(" ")
    )
}

/// The server's diff of a pending proposal against its vault, and its warnings.
fn describe_diff(diff: &Value) -> String {
    let mut out = String::from("  Changes to the vault:\n");
    for change in output::items(diff.get("services").unwrap_or(&Value::Null)) {
        let name = output::cell(str_field(change, "name"));
        // Both sides name their methods when either has a list, so a change shows.
        let with_methods = ["before", "after"]
            .iter()
            .any(|side| change.get(*side).and_then(|s| s.get("methods")).is_some());
        let side = |field: &str| change.get(field).map(|s| summary_line(s, with_methods));
        let line = match str_field(change, "change") {
            "add" => format!(
                "    new service {name}: {}",
                side("after").unwrap_or_default()
            ),
            "replace" => format!(
                "    REPLACE service {name}: {}  ->  {}",
                side("before").unwrap_or_default(),
                side("after").unwrap_or_default()
            ),
            _ => match side("before") {
                Some(before) => format!("    remove service {name}: {before}"),
                None => format!("    remove service {name} (not in the vault: approving fails)"),
            },
        };
        out.push_str(&line);
        out.push('\n');
    }
    for change in output::items(diff.get("credentials").unwrap_or(&Value::Null)) {
        let key = output::cell(str_field(change, "key"));
        let agent = if change.get("from_agent").and_then(Value::as_bool) == Some(true) {
            " (the agent's value)"
        } else {
            ""
        };
        let line = match str_field(change, "change") {
            "add" => format!("    new credential {key}{agent}"),
            "overwrite" => format!("    OVERWRITE existing credential {key}{agent}"),
            _ => format!("    delete credential {key}"),
        };
        out.push_str(&line);
        out.push('\n');
    }
    for warning in warnings(diff) {
        out.push_str(&format!("  WARNING: {}\n", output::cell(&warning.message)));
    }
    out
}

/// A warning of a proposal's diff.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Warning {
    id: String,
    message: String,
    /// Needs acknowledging only when the agent's value for this key is accepted.
    key: Option<String>,
}

fn warnings(diff: &Value) -> Vec<Warning> {
    output::items(diff.get("warnings").unwrap_or(&Value::Null))
        .iter()
        .map(|w| Warning {
            id: str_field(w, "id").to_owned(),
            message: str_field(w, "message").to_owned(),
            key: w.get("key").and_then(Value::as_str).map(str::to_owned),
        })
        .collect()
}

/// The warnings of proposal `p` this approval must acknowledge.
fn required_warnings(p: &Value, approval: &Approval, slots: &[Slot]) -> Vec<Warning> {
    let takes_agent_value = |key: &str| {
        approval.accept_agent_values
            && !approval.values.contains_key(key)
            && slots.iter().any(|s| s.key == key && s.has_value)
    };
    warnings(p.get("diff").unwrap_or(&Value::Null))
        .into_iter()
        .filter(|w| w.key.as_deref().is_none_or(takes_agent_value))
        .collect()
}

// ---------------------------------------------------------------- deciding

/// A set slot of a proposal as the approval needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Slot {
    key: String,
    description: Option<String>,
    obtain: Option<String>,
    obtain_instructions: Option<String>,
    has_value: bool,
}

fn set_slots(p: &Value) -> Vec<Slot> {
    let text = |c: &Value, name: &str| c.get(name).and_then(Value::as_str).map(str::to_owned);
    output::items(p.get("credentials").unwrap_or(&Value::Null))
        .iter()
        .filter(|c| !is_delete(c))
        .map(|c| Slot {
            key: str_field(c, "key").to_owned(),
            description: text(c, "description"),
            obtain: text(c, "obtain"),
            obtain_instructions: text(c, "obtain_instructions"),
            has_value: has_value(c),
        })
        .collect()
}

/// What the human supplied: values for slots, whether the agent's are accepted, and
/// the warnings acknowledged.
struct Approval {
    values: Map<String, Value>,
    accept_agent_values: bool,
    acknowledge: Vec<String>,
}

impl Approval {
    fn body(&self) -> Value {
        json!({
            "values": self.values,
            "accept_agent_values": self.accept_agent_values,
            "acknowledge": self.acknowledge,
        })
    }
}

fn slot_help(slot: &Slot) -> String {
    let mut help = output::cell(&slot.key);
    if let Some(description) = &slot.description {
        help.push_str(&format!(": {}", output::cell(description)));
    }
    if let Some(obtain) = &slot.obtain {
        help.push_str(&format!("\n  obtain it at {}", output::cell(obtain)));
    }
    if let Some(how) = &slot.obtain_instructions {
        help.push_str(&format!("\n  {}", output::cell(how)));
    }
    help
}

fn ensure_pending(p: &Value, id: u64) -> anyhow::Result<()> {
    match str_field(p, "status") {
        "pending" => Ok(()),
        other => bail!(
            "proposal {id} is {}; only pending proposals can be approved or rejected",
            output::cell(other)
        ),
    }
}

fn approve(
    ctx: &Context,
    id: u64,
    pairs: &[String],
    yes: bool,
    accept_warnings: bool,
) -> anyhow::Result<()> {
    let vault = ctx.vault().name;
    let client = ctx.client()?;
    let proposal = client.get(&api_path(&[
        "v1",
        "vaults",
        &vault,
        "proposals",
        &id.to_string(),
    ]))?;
    ensure_pending(&proposal, id)?;
    let slots = set_slots(&proposal);
    let given = read_pairs(pairs)?;
    for (key, _) in &given {
        if !slots.iter().any(|s| s.key == *key) {
            bail!("proposal {id} has no credential slot {key} to set");
        }
    }
    let interactive = prompt::stdin_is_terminal();
    if interactive {
        output::note(&describe(&proposal));
    }
    let mut approval = Approval {
        values: Map::new(),
        accept_agent_values: false,
        acknowledge: Vec::new(),
    };
    for slot in &slots {
        if let Some((_, value)) = given.iter().find(|(k, _)| *k == slot.key) {
            approval
                .values
                .insert(slot.key.clone(), Value::String(value.to_string()));
            continue;
        }
        if slot.has_value {
            if yes {
                approval.accept_agent_values = true;
                continue;
            }
            if !interactive {
                bail!(
                    "the agent supplied a value for {key}: pass --yes to accept it, or {key}=VALUE to use your own",
                    key = slot.key
                );
            }
            let question = format!("Accept the value the agent supplied for {}?", slot.key);
            if prompt::confirm(&question)? {
                approval.accept_agent_values = true;
                continue;
            }
        }
        if !interactive {
            bail!(
                "no value for {key}: pass {key}=VALUE (stdin is not a terminal, so the CLI cannot prompt)",
                key = slot.key
            );
        }
        output::note(&slot_help(slot));
        let value = prompt::prompt_hidden(&format!("Value for {}: ", slot.key))?;
        if value.is_empty() {
            bail!("no value given for {}; nothing was applied", slot.key);
        }
        approval
            .values
            .insert(slot.key.clone(), Value::String(value.to_string()));
    }
    for warning in required_warnings(&proposal, &approval, &slots) {
        if !accept_warnings {
            if !interactive {
                bail!(
                    "proposal {id} needs its warnings acknowledged; nothing was applied:\n  {}\n\
                     read them (agent-vault vault proposal show {id}), then pass --accept-warnings",
                    output::cell(&warning.message)
                );
            }
            output::note(&format!("WARNING: {}", output::cell(&warning.message)));
            if !prompt::confirm("Allow this change?")? {
                bail!("proposal {id} not approved; nothing was applied");
            }
        }
        approval.acknowledge.push(warning.id);
    }
    let applied = client.post(&user_path(&vault, id, "approve"), &approval.body())?;
    if ctx.json {
        return output::json(&applied);
    }
    output::line(&applied_message(&applied, id, &vault))
}

fn applied_message(applied: &Value, id: u64, vault: &str) -> String {
    let mut message = format!("Applied proposal {id} in vault {vault}");
    let services = services_summary(applied);
    if services != "-" {
        message.push_str(&format!("; services: {services}"));
    }
    let credentials = credentials_summary(applied).replace('*', "");
    if credentials != "-" {
        message.push_str(&format!("; credentials: {credentials}"));
    }
    message
}

fn reject(ctx: &Context, id: u64, reason: Option<&str>) -> anyhow::Result<()> {
    let vault = ctx.vault().name;
    let mut body = json!({});
    if let Some(reason) = reason {
        body["reason"] = json!(reason);
    }
    let rejected = ctx
        .client()?
        .post(&user_path(&vault, id, "reject"), &body)?;
    if ctx.json {
        return output::json(&rejected);
    }
    output::line(&format!("Rejected proposal {id} in vault {vault}"))
}

// ---------------------------------------------------------------- review

/// One answer of `review`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Approve,
    Reject,
    Skip,
    Quit,
}

pub fn parse_decision(answer: &str) -> Option<Decision> {
    match answer.trim().to_ascii_lowercase().as_str() {
        "a" | "approve" => Some(Decision::Approve),
        "r" | "reject" => Some(Decision::Reject),
        "s" | "skip" => Some(Decision::Skip),
        "q" | "quit" => Some(Decision::Quit),
        _ => None,
    }
}

/// Where `review` reads answers: the terminal (prompts on stderr, hidden values), or
/// plain lines from stdin.
struct Answers<R: BufRead> {
    input: R,
    interactive: bool,
}

impl<R: BufRead> Answers<R> {
    fn ask(&mut self, question: &str) -> anyhow::Result<Option<Zeroizing<String>>> {
        if self.interactive {
            let mut stderr = std::io::stderr();
            write!(stderr, "{question}").context("cannot write the prompt")?;
            stderr.flush().context("cannot write the prompt")?;
        }
        prompt::read_line(&mut self.input)
    }

    fn decision(&mut self) -> anyhow::Result<Decision> {
        loop {
            let Some(answer) = self.ask("[a]pprove, [r]eject, [s]kip or [q]uit? ")? else {
                return Ok(Decision::Quit);
            };
            match parse_decision(&answer) {
                Some(decision) => return Ok(decision),
                None => output::note("answer a, r, s or q"),
            }
        }
    }

    /// Values for the set slots: on a terminal, accept the agent's (y/N) or type one
    /// hidden; from stdin, one line per slot (empty = accept the agent's value).
    fn approval(&mut self, slots: &[Slot]) -> anyhow::Result<Approval> {
        let mut approval = Approval {
            values: Map::new(),
            accept_agent_values: false,
            acknowledge: Vec::new(),
        };
        for slot in slots {
            if self.interactive {
                output::note(&slot_help(slot));
                if slot.has_value {
                    let question = format!(
                        "Accept the value the agent supplied for {}? [y/N] ",
                        slot.key
                    );
                    let answer = self.ask(&question)?.unwrap_or_default();
                    if matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
                        approval.accept_agent_values = true;
                        continue;
                    }
                }
                let value = prompt::prompt_hidden(&format!("Value for {}: ", slot.key))?;
                if value.is_empty() {
                    bail!("no value given for {}", slot.key);
                }
                approval
                    .values
                    .insert(slot.key.clone(), Value::String(value.to_string()));
            } else {
                let line = self.ask("")?;
                match line {
                    Some(value) if !value.is_empty() => {
                        approval
                            .values
                            .insert(slot.key.clone(), Value::String(value.to_string()));
                    }
                    _ if slot.has_value => approval.accept_agent_values = true,
                    _ => bail!("no value for {} on stdin", slot.key),
                }
            }
        }
        Ok(approval)
    }

    /// Acknowledges each warning the approval needs (a `y`/`yes` answer each, on the
    /// terminal or one line of stdin); any other answer approves nothing.
    fn acknowledge(
        &mut self,
        warnings: Vec<Warning>,
        approval: &mut Approval,
    ) -> anyhow::Result<()> {
        for warning in warnings {
            output::note(&format!("WARNING: {}", output::cell(&warning.message)));
            let answer = self.ask("Allow this change? [y/N] ")?.unwrap_or_default();
            if !matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
                bail!("a warning was not acknowledged; nothing was applied");
            }
            approval.acknowledge.push(warning.id);
        }
        Ok(())
    }
}

/// What `review` did, for the summary at the end.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub approved: Vec<u64>,
    pub rejected: Vec<u64>,
    pub skipped: Vec<u64>,
    pub failed: Vec<u64>,
    pub not_reviewed: Vec<u64>,
}

impl Tally {
    pub fn summary(&self, vault: &str) -> String {
        let ids = |ids: &[u64]| {
            if ids.is_empty() {
                String::new()
            } else {
                let list: Vec<String> = ids.iter().map(|id| format!("#{id}")).collect();
                format!(" ({})", list.join(", "))
            }
        };
        let mut text = format!(
            "Review of vault {vault}: {} approved{}, {} rejected{}, {} skipped{}",
            self.approved.len(),
            ids(&self.approved),
            self.rejected.len(),
            ids(&self.rejected),
            self.skipped.len(),
            ids(&self.skipped),
        );
        if !self.failed.is_empty() {
            text.push_str(&format!(
                ", {} failed{}",
                self.failed.len(),
                ids(&self.failed)
            ));
        }
        if !self.not_reviewed.is_empty() {
            text.push_str(&format!(
                ", {} not reviewed{}",
                self.not_reviewed.len(),
                ids(&self.not_reviewed)
            ));
        }
        text
    }
}

/// `vault proposal review`: every pending proposal in turn.
///
/// Without a terminal, stdin holds one line per answer: `a`, `r`, `s` or `q` for each
/// proposal; after `a`, one line per credential slot the proposal sets, holding its
/// value (an empty line accepts the agent's value where it supplied one); after `r`,
/// one line with the reason (may be empty). The end of input quits.
fn review(ctx: &Context) -> anyhow::Result<()> {
    let vault = ctx.vault().name;
    let client = ctx.client()?;
    let list_path = format!(
        "{}?status=pending",
        api_path(&["v1", "vaults", &vault, "proposals"])
    );
    let pending = client.get(&list_path)?;
    let pending = output::items(&pending).to_vec();
    if pending.is_empty() {
        return output::line(&format!("No pending proposals in vault {vault}"));
    }
    let mut answers = Answers {
        input: std::io::stdin().lock(),
        interactive: prompt::stdin_is_terminal(),
    };
    let mut tally = Tally::default();
    let total = pending.len();
    for (index, listed) in pending.iter().enumerate() {
        let id = listed.get("id").and_then(Value::as_u64).unwrap_or(0);
        // One by one: the proposal with its diff against the vault as it is now.
        let proposal = client
            .get(&api_path(&[
                "v1",
                "vaults",
                &vault,
                "proposals",
                &id.to_string(),
            ]))
            .unwrap_or_else(|_| listed.clone());
        output::text(&format!(
            "\n[{}/{total}] {}",
            index + 1,
            describe(&proposal)
        ))?;
        match answers.decision()? {
            Decision::Quit => {
                tally.not_reviewed.extend(
                    pending[index..]
                        .iter()
                        .filter_map(|p| p.get("id").and_then(Value::as_u64)),
                );
                break;
            }
            Decision::Skip => {
                output::line(&format!("Skipped proposal {id}"))?;
                tally.skipped.push(id);
            }
            Decision::Reject => {
                let reason = answers
                    .ask("Reason (optional, the agent sees it): ")?
                    .map(|r| r.trim().to_owned())
                    .filter(|r| !r.is_empty());
                let mut body = json!({});
                if let Some(reason) = reason {
                    body["reason"] = json!(reason);
                }
                match client.post(&user_path(&vault, id, "reject"), &body) {
                    Ok(_) => {
                        output::line(&format!("Rejected proposal {id}"))?;
                        tally.rejected.push(id);
                    }
                    Err(err) => {
                        output::note(&format!(
                            "error: proposal {id} not rejected: {}",
                            super::one_line(&err)
                        ));
                        tally.failed.push(id);
                    }
                }
            }
            Decision::Approve => {
                let slots = set_slots(&proposal);
                let result = answers
                    .approval(&slots)
                    .and_then(|mut approval| {
                        let required = required_warnings(&proposal, &approval, &slots);
                        answers.acknowledge(required, &mut approval)?;
                        Ok(approval)
                    })
                    .and_then(|approval| {
                        client.post(&user_path(&vault, id, "approve"), &approval.body())
                    });
                match result {
                    Ok(applied) => {
                        output::line(&applied_message(&applied, id, &vault))?;
                        tally.approved.push(id);
                    }
                    Err(err) => {
                        output::note(&format!(
                            "error: proposal {id} not applied: {}",
                            super::one_line(&err)
                        ));
                        tally.failed.push(id);
                    }
                }
            }
        }
    }
    output::line(&format!("\n{}", tally.summary(&vault)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create_args(flags: &[&str]) -> CreateArgs {
        crate::cli::parse_flags(flags)
    }

    fn proposal(flags: &[&str]) -> anyhow::Result<Value> {
        build_proposal(&create_args(flags))
    }

    #[test]
    fn flags_build_the_seed_shape() {
        let built = proposal(&[
            "--service-name",
            "stripe",
            "--host",
            "api.stripe.com",
            "--auth-type",
            "bearer",
            "--token-key",
            "STRIPE_KEY",
            "--credential",
            "STRIPE_KEY:Stripe API key",
            "--message",
            "Stripe access",
            "--user-message",
            "I need to create charges.",
        ])
        .unwrap();
        assert_eq!(
            built,
            json!({
                "services": [{"action": "set", "name": "stripe", "host": "api.stripe.com",
                              "enabled": true, "upstream_tls": true,
                              "auth": {"type": "bearer", "token": "STRIPE_KEY"}}],
                "credentials": [{"action": "set", "key": "STRIPE_KEY", "description": "Stripe API key"}],
                "message": "Stripe access",
                "user_message": "I need to create charges.",
            })
        );
    }

    #[test]
    fn a_proposed_services_substitutions_and_redaction_are_sent_and_shown_with_the_diff() {
        let built = proposal(&[
            "--service-name",
            "bot",
            "--host",
            "api.telegram.org",
            "--auth-type",
            "passthrough",
            "--substitute",
            "BOT_TOKEN:__BOT_TOKEN__:path",
            "--no-redact",
            "--credential",
            "BOT_TOKEN:the bot's token",
        ])
        .unwrap();
        assert_eq!(
            built["services"][0]["substitutions"],
            json!([{"key": "BOT_TOKEN", "placeholder": "__BOT_TOKEN__", "in": ["path"]}])
        );
        assert_eq!(built["services"][0]["redact_responses"], json!(false));
        // Alone, the flags still need a service name.
        let lone = proposal(&["--substitute", "BOT_TOKEN:__BOT_TOKEN__:path"])
            .unwrap_err()
            .to_string();
        assert!(lone.contains("--service-name"), "{lone}");
        let shown = describe(&json!({
            "id": 1, "vault": "default", "status": "pending",
            "services": [{"action": "set", "name": "bot", "host": "api.telegram.org",
                          "auth": {"type": "passthrough"}, "redact_responses": false,
                          "substitutions": [{"key": "BOT_TOKEN", "placeholder": "__BOT_TOKEN__", "in": ["path"]}]}],
            "diff": {"services": [{"change": "add", "name": "bot",
                "after": {"host": "api.telegram.org", "auth_type": "passthrough", "keys": ["BOT_TOKEN"],
                          "upstream_tls": true, "enabled": true, "redact_responses": false,
                          "substitutions": [{"key": "BOT_TOKEN", "placeholder": "__BOT_TOKEN__", "in": ["path"]}]}}],
                "credentials": [], "warnings": []},
        }));
        assert!(
            shown.contains("[substitutes BOT_TOKEN:__BOT_TOKEN__:path, responses not redacted]"),
            "{shown}"
        );
        assert!(
            shown.contains(
                "new service bot: api.telegram.org, passthrough BOT_TOKEN, TLS on, substitutes BOT_TOKEN:__BOT_TOKEN__:path, responses NOT redacted"
            ),
            "{shown}"
        );
    }

    #[test]
    fn a_proposed_h2c_upstream_is_sent_and_shown_with_the_diff() {
        let base = [
            "--service-name",
            "grpc",
            "--host",
            "grpc.example.com:50051",
            "--auth-type",
            "passthrough",
        ];
        let built = proposal(&[&base[..], &["--no-upstream-tls", "--h2c"]].concat()).unwrap();
        assert_eq!(built["services"][0]["upstream_h2c"], json!(true));
        assert_eq!(built["services"][0]["upstream_tls"], json!(false));
        let plain = proposal(&[&base[..], &["--no-upstream-tls"]].concat()).unwrap();
        assert!(plain["services"][0].get("upstream_h2c").is_none());
        let refused = proposal(&[&base[..], &["--h2c"]].concat())
            .unwrap_err()
            .to_string();
        assert_eq!(
            refused,
            "--h2c is for a plain-HTTP upstream: add --no-upstream-tls \
             (a TLS upstream gets HTTP/2 by ALPN when it offers it)"
        );
        // Alone, the flag still needs a service name.
        let lone = proposal(&["--h2c"]).unwrap_err().to_string();
        assert!(lone.contains("--service-name"), "{lone}");
        let shown = describe(&json!({
            "id": 1, "vault": "default", "status": "pending",
            "services": [{"action": "set", "name": "grpc", "host": "grpc.example.com:50051",
                          "auth": {"type": "passthrough"}, "upstream_tls": false, "upstream_h2c": true}],
            "diff": {"services": [{"change": "add", "name": "grpc",
                "after": {"host": "grpc.example.com:50051", "auth_type": "passthrough", "keys": [],
                          "upstream_tls": false, "upstream_h2c": true, "enabled": true,
                          "redact_responses": true}}],
                "credentials": [], "warnings": []},
        }));
        assert!(shown.contains("[plain HTTP/2 (h2c) upstream]"), "{shown}");
        assert!(
            shown.contains(
                "new service grpc: grpc.example.com:50051, passthrough , TLS OFF, HTTP/2 (h2c)\n"
            ),
            "{shown}"
        );
    }

    #[test]
    fn a_proposed_services_methods_are_sent_and_shown_with_the_diff() {
        let built = proposal(&[
            "--service-name",
            "ro",
            "--host",
            "ro.example.com",
            "--auth-type",
            "passthrough",
            "--methods",
            "GET,HEAD",
        ])
        .unwrap();
        assert_eq!(built["services"][0]["methods"], json!(["GET", "HEAD"]));
        let shown = describe(&json!({
            "id": 1, "vault": "default", "status": "pending",
            "services": [{"action": "set", "name": "ro", "host": "ro.example.com",
                          "auth": {"type": "passthrough"}, "methods": ["GET", "HEAD"]}],
            "diff": {"services": [{"change": "replace", "name": "ro",
                "before": {"host": "ro.example.com", "auth_type": "passthrough", "keys": [],
                           "upstream_tls": true, "enabled": true},
                "after": {"host": "ro.example.com", "auth_type": "passthrough", "keys": [],
                          "upstream_tls": true, "enabled": true, "methods": ["GET", "HEAD"]}}],
                "credentials": [], "warnings": []},
        }));
        assert!(shown.contains("[methods GET, HEAD]"), "{shown}");
        assert!(
            shown.contains(
                "TLS on, methods all  ->  ro.example.com, passthrough , TLS on, methods GET, HEAD"
            ),
            "{shown}"
        );
    }

    #[test]
    fn credential_only_and_delete_proposals() {
        assert_eq!(
            proposal(&["--credential", "A", "--credential", "B: the b key "]).unwrap(),
            json!({"credentials": [{"action": "set", "key": "A"},
                                   {"action": "set", "key": "B", "description": "the b key"}]})
        );
        assert_eq!(
            proposal(&[
                "--delete-credential",
                "OLD_API_KEY",
                "--delete-service",
                "old",
                "--message",
                "Remove unused API key"
            ])
            .unwrap(),
            json!({"services": [{"action": "delete", "name": "old"}],
                   "credentials": [{"action": "delete", "key": "OLD_API_KEY"}],
                   "message": "Remove unused API key"})
        );
    }

    #[test]
    fn incomplete_flags_are_clear_errors() {
        let err = |flags: &[&str]| proposal(flags).unwrap_err().to_string();
        assert!(err(&[]).contains("nothing to propose"));
        assert!(err(&["--host", "a.com", "--credential", "A"]).contains("--service-name"));
        assert!(err(&["--service-name", "s", "--auth-type", "passthrough"]).contains("--host"));
        assert!(err(&["--service-name", "s", "--host", "a.com"]).contains("--auth-type"));
        assert!(err(&[
            "--service-name",
            "s",
            "--host",
            "a.com",
            "--auth-type",
            "bearer"
        ])
        .contains("--token-key"));
        assert!(err(&["--credential", "lower"]).contains("invalid credential key"));
        assert!(err(&["--delete-credential", "lower"]).contains("invalid credential key"));
    }

    #[test]
    fn file_and_flags_do_not_mix() {
        assert!(!has_proposal_flags(&create_args(&["-f", "p.json"])));
        assert!(has_proposal_flags(&create_args(&[
            "-f",
            "p.json",
            "--message",
            "m"
        ])));
        assert!(has_proposal_flags(&create_args(&["-f", "-", "--disabled"])));
    }

    #[test]
    fn proposal_files_must_be_objects() {
        assert!(parse_proposal_file(r#"{"credentials": []}"#, "f").is_ok());
        assert!(parse_proposal_file("[]", "f").is_err());
        assert!(parse_proposal_file("nope", "f")
            .unwrap_err()
            .to_string()
            .contains("not valid JSON"));
    }

    #[test]
    fn decisions() {
        for (answer, decision) in [
            ("a", Decision::Approve),
            (" Approve ", Decision::Approve),
            ("r", Decision::Reject),
            ("S", Decision::Skip),
            ("quit", Decision::Quit),
        ] {
            assert_eq!(parse_decision(answer), Some(decision), "{answer}");
        }
        assert_eq!(parse_decision("yes"), None);
        assert_eq!(parse_decision(""), None);
    }

    fn sample() -> Value {
        json!({
            "id": 3, "vault": "default", "status": "pending",
            "agent": "bot", "created_by": {"kind": "agent", "name": "bot"},
            "created_at": 1_700_000_000, "expires_at": 1_700_604_800,
            "services": [
                {"action": "set", "name": "stripe", "host": "api.stripe.com", "enabled": true,
                 "upstream_tls": true, "auth": {"type": "bearer", "token": "STRIPE_KEY"}},
                {"action": "delete", "name": "old"}
            ],
            "credentials": [
                {"action": "set", "key": "STRIPE_KEY", "description": "Stripe API key\u{1b}[31m",
                 "obtain": "https://dashboard.stripe.com/apikeys",
                 "obtain_instructions": "Developers > API Keys", "has_value": false},
                {"action": "set", "key": "GENERATED_TOKEN", "description": null, "obtain": null,
                 "obtain_instructions": null, "has_value": true},
                {"action": "delete", "key": "OLD_API_KEY", "description": null, "obtain": null,
                 "obtain_instructions": null, "has_value": false}
            ],
            "message": "Stripe", "user_message": "line one\nline two", "review": null
        })
    }

    #[test]
    fn describe_shows_everything_but_escapes_control_characters() {
        let text = describe(&sample());
        for expected in [
            "Proposal 3 in vault default: pending",
            "agent bot",
            "set     stripe  api.stripe.com  bearer (STRIPE_KEY)",
            "delete  old",
            "obtain: https://dashboard.stripe.com/apikeys",
            "GENERATED_TOKEN  [value provided by the agent]",
            "delete  OLD_API_KEY",
            "    line one\n    line two\n",
        ] {
            assert!(text.contains(expected), "{expected:?} in:\n{text}");
        }
        assert!(!text.contains('\u{1b}'), "escape sequences are neutralised");
        assert_eq!(
            credentials_summary(&sample()),
            "STRIPE_KEY, GENERATED_TOKEN*, -OLD_API_KEY"
        );
        assert_eq!(services_summary(&sample()), "stripe, -old");
    }

    #[test]
    fn stdin_answers_drive_the_approval() {
        let slots = set_slots(&sample());
        assert_eq!(slots.len(), 2);
        // A value for STRIPE_KEY, then an empty line: accept the agent's value.
        let mut answers = Answers {
            input: std::io::Cursor::new(b"sk_test_1\n\n".to_vec()),
            interactive: false,
        };
        let approval = answers.approval(&slots).unwrap();
        assert_eq!(approval.values.get("STRIPE_KEY"), Some(&json!("sk_test_1")));
        assert!(!approval.values.contains_key("GENERATED_TOKEN"));
        assert!(approval.accept_agent_values);
        // Overriding the agent's value.
        let mut answers = Answers {
            input: std::io::Cursor::new(b"a\nmine\n".to_vec()),
            interactive: false,
        };
        let approval = answers.approval(&slots).unwrap();
        assert_eq!(approval.values.get("GENERATED_TOKEN"), Some(&json!("mine")));
        assert!(!approval.accept_agent_values);
        // A slot without a value and nothing on stdin.
        let mut answers = Answers {
            input: std::io::Cursor::new(b"".to_vec()),
            interactive: false,
        };
        let err = answers.approval(&slots).err().unwrap().to_string();
        assert!(err.contains("STRIPE_KEY"), "{err}");
        // Decisions skip unknown answers and quit at the end of input.
        let mut answers = Answers {
            input: std::io::Cursor::new(b"maybe\nr\n".to_vec()),
            interactive: false,
        };
        assert_eq!(answers.decision().unwrap(), Decision::Reject);
        assert_eq!(answers.decision().unwrap(), Decision::Quit);
    }

    #[test]
    fn tally_summary() {
        let tally = Tally {
            approved: vec![1],
            rejected: vec![2, 3],
            skipped: vec![],
            failed: vec![4],
            not_reviewed: vec![5],
        };
        assert_eq!(
            tally.summary("default"),
            "Review of vault default: 1 approved (#1), 2 rejected (#2, #3), 0 skipped, 1 failed (#4), 1 not reviewed (#5)"
        );
    }
}
