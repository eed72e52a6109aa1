//! `agent-vault vault service`: the rules that say which host gets which credential.
//!
//! `service add` turns flags into the service JSON of DESIGN.md §5; the server (through
//! the `agent-vault-rules` crate) validates hosts and templates. The CLI only checks
//! what it can say more clearly: which flag is missing or does not fit the auth type.

use std::io::Read;

use agent_vault_rules::substitution::{validate_substitutions, Substitution, Surface};
use agent_vault_rules::{Auth, RateLimit};
use anyhow::{anyhow, bail, Context as _};
use clap::{Args, Subcommand, ValueEnum};
use serde::Deserialize as _;
use serde_json::{json, Map, Value};

use super::client::api_path;
use super::context::Context;
use super::credentials::check_key;
use super::output::{self, str_field, yes_no};

#[derive(Debug, Subcommand)]
// Parsed once per process: the size of the `add` variant does not matter.
#[allow(clippy::large_enum_variant)]
pub enum ServiceCommand {
    /// Add a service: a host and how to authenticate to it, or a catalog template
    Add(Box<AddCommand>),
    /// List the vault's services in match order
    List,
    /// Remove a service
    Remove {
        /// The service to remove
        name: String,
    },
    /// Enable a disabled service
    Enable {
        /// The service to enable
        name: String,
    },
    /// Disable a service (the proxy answers 403 service_disabled)
    Disable {
        /// The service to disable
        name: String,
    },
    /// Replace every service of the vault with the ones in a JSON file, atomically
    Set {
        /// A JSON array of services or {"services": [...]}; `-` reads stdin
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthType {
    /// Authorization: Bearer <token-key>
    Bearer,
    /// Authorization: Basic base64(<username-key>:<password-key>)
    Basic,
    /// <api-key-header>: <api-key-prefix><api-key-key>
    ApiKey,
    /// Headers rendered from templates (--custom-header)
    Custom,
    /// Allow the host, inject nothing
    Passthrough,
}

impl AuthType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bearer => "bearer",
            Self::Basic => "basic",
            Self::ApiKey => "api-key",
            Self::Custom => "custom",
            Self::Passthrough => "passthrough",
        }
    }
}

/// `service add`: a service described by its flags, or a catalog template.
#[derive(Debug, Clone, Args)]
pub struct AddCommand {
    /// Start from a built-in template (`agent-vault catalog` lists them): its host and
    /// auth; --name, --host, --method, --disabled, --no-upstream-tls and --h2c adjust it
    #[arg(long, value_name = "NAME", conflicts_with = "auth_type")]
    pub from_catalog: Option<String>,
    /// Service name, unique in the vault [default with --from-catalog: the template's]
    #[arg(long, required_unless_present = "from_catalog")]
    pub name: Option<String>,
    /// api.stripe.com, *.github.com, with optional :port and /path* suffix
    #[arg(long, required_unless_present = "from_catalog")]
    pub host: Option<String>,
    #[arg(
        long,
        value_enum,
        value_name = "TYPE",
        required_unless_present = "from_catalog"
    )]
    pub auth_type: Option<AuthType>,
    #[command(flatten)]
    pub flags: ServiceFlags,
}

#[derive(Debug, Clone, Args)]
pub struct AddService {
    /// Service name, unique in the vault
    #[arg(long)]
    pub name: String,
    /// api.stripe.com, *.github.com, with optional :port and /path* suffix
    #[arg(long)]
    pub host: String,
    #[arg(long, value_enum, value_name = "TYPE")]
    pub auth_type: AuthType,
    #[command(flatten)]
    pub flags: ServiceFlags,
}

/// The flags that describe a service's auth and transport, shared by `service add`
/// and `proposal create`.
#[derive(Debug, Clone, Default, Args)]
pub struct ServiceFlags {
    /// Credential key of the bearer token (bearer)
    #[arg(long, value_name = "KEY")]
    pub token_key: Option<String>,
    /// Credential key of the username (basic)
    #[arg(long, value_name = "KEY")]
    pub username_key: Option<String>,
    /// Credential key of the password (basic)
    #[arg(long, value_name = "KEY")]
    pub password_key: Option<String>,
    /// Credential key of the API key (api-key)
    #[arg(long, value_name = "KEY")]
    pub api_key_key: Option<String>,
    /// Header that carries the API key (api-key) [default: x-api-key]
    #[arg(long, value_name = "HEADER")]
    pub api_key_header: Option<String>,
    /// Text before the API key in the header, e.g. "Token " (api-key) [default: ""]
    #[arg(long, value_name = "PREFIX", allow_hyphen_values = true)]
    pub api_key_prefix: Option<String>,
    /// A header and its template, e.g. 'X-Token: tok {{ KEY }}' (custom; repeatable)
    #[arg(long = "custom-header", value_name = "'HEADER: TEMPLATE'")]
    pub custom_header: Vec<String>,
    /// Talk plain HTTP to the upstream (internal services only)
    #[arg(long)]
    pub no_upstream_tls: bool,
    /// Talk HTTP/2 without TLS to the upstream (h2c, e.g. gRPC in a cluster); needs
    /// --no-upstream-tls [default: HTTP/1.1]
    #[arg(long)]
    pub h2c: bool,
    /// Add the service disabled
    #[arg(long)]
    pub disabled: bool,
    /// Forward only this method, e.g. GET (repeatable, or comma-separated with
    /// --methods GET,POST) [default: every method but TRACE and TRACK]
    #[arg(
        long = "method",
        visible_alias = "methods",
        value_name = "METHOD",
        value_delimiter = ','
    )]
    pub methods: Vec<String>,
    /// At most this many requests per agent: N/s or N/min, e.g. 10/s or 600/min
    /// [default: no limit]
    #[arg(long, value_name = "N/s|N/min", value_parser = parse_rate_limit)]
    pub rate_limit: Option<RateLimit>,
    /// Replace PLACEHOLDER with credential KEY's value on these surfaces (path, query,
    /// header, body), e.g. BOT_TOKEN:__BOT_TOKEN__:path (repeatable)
    #[arg(
        long = "substitute",
        value_name = "KEY:PLACEHOLDER:SURFACE[,SURFACE...]",
        value_parser = parse_substitute
    )]
    pub substitute: Vec<Substitution>,
    /// Do not remove the injected values from responses [default: redacted]
    #[arg(long)]
    pub no_redact: bool,
}

/// `--substitute KEY:__PLACEHOLDER__:path,query`, checked as the server checks it.
pub fn parse_substitute(text: &str) -> Result<Substitution, String> {
    let form =
        "write it as KEY:PLACEHOLDER:SURFACE[,SURFACE...], e.g. BOT_TOKEN:__BOT_TOKEN__:path";
    let mut parts = text.splitn(3, ':');
    let (Some(key), Some(placeholder), Some(surfaces)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("invalid substitution {text:?}: {form}"));
    };
    let (key, placeholder) = (key.trim(), placeholder.trim());
    if key.is_empty() || placeholder.is_empty() {
        return Err(format!("invalid substitution {text:?}: {form}"));
    }
    let surfaces = surfaces
        .split(',')
        .map(|surface| match surface.trim() {
            "path" => Ok(Surface::Path),
            "query" => Ok(Surface::Query),
            "header" => Ok(Surface::Header),
            "body" => Ok(Surface::Body),
            "" => Err(format!(
                "invalid substitution {text:?}: name at least one surface: path, query, header or body"
            )),
            other => Err(format!(
                "invalid substitution {text:?}: unknown surface {other:?}: one of path, query, header, body"
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let substitution = Substitution {
        key: key.to_owned(),
        placeholder: placeholder.to_owned(),
        surfaces,
    };
    validate_substitutions(std::slice::from_ref(&substitution)).map_err(|e| e.to_string())?;
    Ok(substitution)
}

/// One substitution as `--substitute` writes it: `KEY:__PLACEHOLDER__:path,query`.
fn substitution_text(substitution: &Substitution) -> String {
    let surfaces: Vec<&str> = substitution
        .surfaces
        .iter()
        .map(|surface| surface.as_str())
        .collect();
    format!(
        "{}:{}:{}",
        substitution.key,
        substitution.placeholder,
        surfaces.join(",")
    )
}

/// A service's (or a diff summary's) `substitutions` for people, each as
/// `--substitute` takes it, space-separated; `none` without any.
pub fn substitutions_text(service: &Value) -> String {
    let substitutions: Vec<Substitution> = service
        .get("substitutions")
        .and_then(|v| Vec::<Substitution>::deserialize(v).ok())
        .unwrap_or_default();
    if substitutions.is_empty() {
        return "none".to_owned();
    }
    substitutions
        .iter()
        .map(|s| output::cell(&substitution_text(s)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether a service's (or a diff summary's) responses are redacted: `yes` unless
/// `redact_responses` is `false`.
pub fn redact_text(service: &Value) -> &'static str {
    if service.get("redact_responses").and_then(Value::as_bool) == Some(false) {
        "no"
    } else {
        "yes"
    }
}

/// Whether a service (or a diff summary) is a plain-HTTP upstream spoken to as HTTP/2.
pub fn is_h2c(service: &Value) -> bool {
    service.get("upstream_h2c").and_then(Value::as_bool) == Some(true)
}

/// A service's `TLS` column: `yes`, `no`, or `no (h2c)` for an HTTP/2 plain upstream.
fn tls_text(service: &Value) -> &'static str {
    match yes_no(service.get("upstream_tls")) {
        "no" if is_h2c(service) => "no (h2c)",
        shown => shown,
    }
}

/// `--h2c`: the service's upstream speaks HTTP/2 without TLS. Refused on a TLS
/// upstream, as the server would, but naming the flag that is missing.
fn apply_h2c(service: &mut Value, flags: &ServiceFlags) -> anyhow::Result<()> {
    if !flags.h2c {
        return Ok(());
    }
    if service.get("upstream_tls").and_then(Value::as_bool) != Some(false) {
        bail!(
            "--h2c is for a plain-HTTP upstream: add --no-upstream-tls \
             (a TLS upstream gets HTTP/2 by ALPN when it offers it)"
        );
    }
    service["upstream_h2c"] = json!(true);
    Ok(())
}

/// `, HTTP/2 without TLS (h2c), substitutes KEY:__P__:path, responses not redacted`
/// for a confirmation line.
fn policy_suffix(service: &Value) -> String {
    let mut out = String::new();
    if is_h2c(service) {
        out.push_str(", HTTP/2 without TLS (h2c)");
    }
    if service.get("substitutions").is_some() {
        out.push_str(&format!(", substitutes {}", substitutions_text(service)));
    }
    if redact_text(service) == "no" {
        out.push_str(", responses not redacted");
    }
    out
}

/// `--rate-limit 10/s` or `600/min`, checked as the server checks it.
pub fn parse_rate_limit(text: &str) -> Result<RateLimit, String> {
    RateLimit::parse_short(text).map_err(|e| e.to_string())
}

/// A service's `rate_limit` for people: `10/s`, `600/min`, or `none`.
pub fn rate_limit_text(service: &Value) -> String {
    service
        .get("rate_limit")
        .and_then(|v| RateLimit::deserialize(v).ok())
        .map_or_else(|| "none".to_owned(), |limit| limit.to_string())
}

impl ServiceFlags {
    /// Whether any of these flags was given.
    pub fn any(&self) -> bool {
        self.any_auth()
            || self.no_upstream_tls
            || self.h2c
            || self.disabled
            || !self.methods.is_empty()
            || self.rate_limit.is_some()
            || !self.substitute.is_empty()
            || self.no_redact
    }

    /// Whether any flag of the auth block was given (a catalog template brings its own).
    fn any_auth(&self) -> bool {
        self.token_key.is_some()
            || self.username_key.is_some()
            || self.password_key.is_some()
            || self.api_key_key.is_some()
            || self.api_key_header.is_some()
            || self.api_key_prefix.is_some()
            || !self.custom_header.is_empty()
    }
}

pub fn run(cmd: ServiceCommand, ctx: &Context) -> anyhow::Result<()> {
    let vault = ctx.vault().name;
    match cmd {
        ServiceCommand::Add(args) => match args.from_catalog.clone() {
            Some(template) => add_from_catalog(ctx, &vault, &template, *args),
            None => add(
                ctx,
                &vault,
                &AddService {
                    name: args.name.unwrap_or_default(),
                    host: args.host.unwrap_or_default(),
                    auth_type: args.auth_type.unwrap_or(AuthType::Passthrough),
                    flags: args.flags,
                },
            ),
        },
        ServiceCommand::List => list(ctx, &vault),
        ServiceCommand::Remove { name } => {
            ctx.client()?
                .delete(&api_path(&["v1", "vaults", &vault, "services", &name]))?;
            output::line(&format!("Removed service {name} from vault {vault}"))
        }
        ServiceCommand::Enable { name } => toggle(ctx, &vault, &name, true),
        ServiceCommand::Disable { name } => toggle(ctx, &vault, &name, false),
        ServiceCommand::Set { file } => set(ctx, &vault, &file),
    }
}

/// The `auth` object of DESIGN.md §5 for `service add`'s flags.
pub fn build_auth(args: &AddService) -> anyhow::Result<Value> {
    let kind = args.auth_type;
    // A flag for another auth type is a mistake worth stopping on, not ignoring.
    let flags: [(&str, bool, &[AuthType]); 7] = [
        (
            "--token-key",
            args.flags.token_key.is_some(),
            &[AuthType::Bearer],
        ),
        (
            "--username-key",
            args.flags.username_key.is_some(),
            &[AuthType::Basic],
        ),
        (
            "--password-key",
            args.flags.password_key.is_some(),
            &[AuthType::Basic],
        ),
        (
            "--api-key-key",
            args.flags.api_key_key.is_some(),
            &[AuthType::ApiKey],
        ),
        (
            "--api-key-header",
            args.flags.api_key_header.is_some(),
            &[AuthType::ApiKey],
        ),
        (
            "--api-key-prefix",
            args.flags.api_key_prefix.is_some(),
            &[AuthType::ApiKey],
        ),
        (
            "--custom-header",
            !args.flags.custom_header.is_empty(),
            &[AuthType::Custom],
        ),
    ];
    for (flag, given, applies_to) in flags {
        if given && !applies_to.contains(&kind) {
            bail!("{flag} does not apply to --auth-type {}", kind.as_str());
        }
    }
    let required = |value: &Option<String>, flag: &str| -> anyhow::Result<String> {
        let key = value
            .as_deref()
            .filter(|v| !v.is_empty())
            .ok_or_else(|| anyhow!("--auth-type {} needs {flag} KEY", kind.as_str()))?;
        check_key(key)?;
        Ok(key.to_owned())
    };
    Ok(match kind {
        AuthType::Bearer => json!({
            "type": "bearer",
            "token": required(&args.flags.token_key, "--token-key")?,
        }),
        AuthType::Basic => json!({
            "type": "basic",
            "username": required(&args.flags.username_key, "--username-key")?,
            "password": required(&args.flags.password_key, "--password-key")?,
        }),
        AuthType::ApiKey => {
            let header = args.flags.api_key_header.as_deref().unwrap_or("x-api-key");
            if header.trim().is_empty() {
                bail!("--api-key-header cannot be empty");
            }
            json!({
                "type": "api-key",
                "key": required(&args.flags.api_key_key, "--api-key-key")?,
                "header": header.trim(),
                "prefix": args.flags.api_key_prefix.as_deref().unwrap_or(""),
            })
        }
        AuthType::Custom => {
            if args.flags.custom_header.is_empty() {
                bail!("--auth-type custom needs --custom-header 'HEADER: TEMPLATE' (at least one)");
            }
            let mut headers = Map::new();
            for raw in &args.flags.custom_header {
                let (name, template) = parse_custom_header(raw)?;
                if headers.keys().any(|h| h.eq_ignore_ascii_case(&name)) {
                    bail!("--custom-header {name} is given twice");
                }
                headers.insert(name, Value::String(template));
            }
            json!({ "type": "custom", "headers": headers })
        }
        AuthType::Passthrough => json!({ "type": "passthrough" }),
    })
}

/// `'X-Token: tok {{ KEY }}'` → `("X-Token", "tok {{ KEY }}")`.
pub fn parse_custom_header(raw: &str) -> anyhow::Result<(String, String)> {
    let Some((name, template)) = raw.split_once(':') else {
        bail!("--custom-header expects 'HEADER: TEMPLATE', e.g. 'X-Token: tok {{{{ KEY }}}}'");
    };
    let name = name.trim();
    let template = template.trim();
    let token_char = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || !name.chars().all(token_char) {
        bail!("--custom-header has an invalid header name {name:?}");
    }
    if template.is_empty() {
        bail!("--custom-header {name} has an empty template");
    }
    Ok((name.to_owned(), template.to_owned()))
}

/// The service JSON that `service add` sends.
/// The methods are sent as given: the server checks them (uppercase, no duplicates,
/// neither TRACE, TRACK nor CONNECT).
pub fn build_service(args: &AddService) -> anyhow::Result<Value> {
    let mut service = json!({
        "name": args.name,
        "host": args.host,
        "enabled": !args.flags.disabled,
        "auth": build_auth(args)?,
        "upstream_tls": !args.flags.no_upstream_tls,
    });
    apply_h2c(&mut service, &args.flags)?;
    let methods: Vec<&str> = args.flags.methods.iter().map(|m| m.trim()).collect();
    if !methods.is_empty() {
        if let Some(object) = service.as_object_mut() {
            object.insert("methods".into(), json!(methods));
        }
    }
    if let Some(limit) = args.flags.rate_limit {
        service["rate_limit"] = json!(limit);
    }
    if !args.flags.substitute.is_empty() {
        service["substitutions"] = json!(args.flags.substitute);
    }
    if args.flags.no_redact {
        service["redact_responses"] = json!(false);
    }
    Ok(service)
}

/// A service's (or a diff summary's) `methods` for people: `GET, POST`, or `all` when
/// the service has no list.
pub fn methods_text(service: &Value) -> String {
    match service.get("methods").and_then(Value::as_array) {
        Some(methods) => methods
            .iter()
            .filter_map(Value::as_str)
            .map(output::cell)
            .collect::<Vec<_>>()
            .join(", "),
        None => "all".to_owned(),
    }
}

fn add(ctx: &Context, vault: &str, args: &AddService) -> anyhow::Result<()> {
    let service = build_service(args)?;
    let added = ctx
        .client()?
        .post(&api_path(&["v1", "vaults", vault, "services"]), &service)?;
    if ctx.json {
        return output::json(&added);
    }
    let methods = if args.flags.methods.is_empty() {
        String::new()
    } else {
        format!(", methods {}", methods_text(&service))
    };
    let methods = match args.flags.rate_limit {
        Some(limit) => format!("{methods}, rate limit {limit} per agent"),
        None => methods,
    };
    let methods = format!("{methods}{}", policy_suffix(&service));
    output::line(&format!(
        "Added service {} ({}, {}{methods}) to vault {vault}{}",
        args.name,
        args.host,
        args.auth_type.as_str(),
        if args.flags.disabled {
            ", disabled"
        } else {
            ""
        }
    ))
}

/// `service add --from-catalog NAME`: the template's service, with the name, host and
/// transport flags applied; the keys it reads are named so the human sets them.
fn add_from_catalog(
    ctx: &Context,
    vault: &str,
    template: &str,
    args: AddCommand,
) -> anyhow::Result<()> {
    let flags = &args.flags;
    if flags.any_auth() {
        anyhow::bail!(
            "--from-catalog takes the template's auth: drop the auth flags, or describe the \
             service with --auth-type instead"
        );
    }
    let entry = super::catalog::entry(ctx, template)?;
    let mut service = entry["service"].clone();
    let mut keys: Vec<&str> = output::items(&entry["credentials"])
        .iter()
        .filter_map(|c| c["key"].as_str())
        .collect();
    // The template's substitutions stay; --substitute adds to them.
    for extra in &flags.substitute {
        if !keys.contains(&extra.key.as_str()) {
            keys.push(&extra.key);
        }
    }
    if let Some(name) = &args.name {
        service["name"] = Value::from(name.as_str());
    }
    if let Some(host) = &args.host {
        service["host"] = Value::from(host.as_str());
    }
    service["enabled"] = Value::from(!flags.disabled);
    if flags.no_upstream_tls {
        service["upstream_tls"] = Value::from(false);
    }
    apply_h2c(&mut service, flags)?;
    let methods: Vec<&str> = flags.methods.iter().map(|m| m.trim()).collect();
    if !methods.is_empty() {
        service["methods"] = json!(methods);
    }
    if let Some(limit) = flags.rate_limit {
        service["rate_limit"] = json!(limit);
    }
    if !flags.substitute.is_empty() {
        let mut all = output::items(&service["substitutions"]).to_vec();
        all.extend(flags.substitute.iter().map(|s| json!(s)));
        service["substitutions"] = Value::Array(all);
    }
    if flags.no_redact {
        service["redact_responses"] = json!(false);
    }
    let client = ctx.client()?;
    let held = client.get(&api_path(&["v1", "vaults", vault, "credentials"]))?;
    let missing: Vec<&str> = keys
        .iter()
        .copied()
        .filter(|key| !output::items(&held).iter().any(|c| c["key"] == *key))
        .collect();
    if !missing.is_empty() {
        bail!(
            "the {template} template reads {}, not in vault {vault} yet: set {} first \
             (agent-vault vault credential set {})",
            keys.join(", "),
            if missing.len() == 1 { "it" } else { "them" },
            missing
                .iter()
                .map(|k| format!("{k}=…"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    let added = client.post(&api_path(&["v1", "vaults", vault, "services"]), &service)?;
    if ctx.json {
        return output::json(&added);
    }
    output::line(&format!(
        "Added service {} ({}, {}{}) to vault {vault} from the catalog's {template}",
        output::cell(service["name"].as_str().unwrap_or_default()),
        output::cell(service["host"].as_str().unwrap_or_default()),
        output::cell(service["auth"]["type"].as_str().unwrap_or_default()),
        policy_suffix(&service),
    ))
}

fn list(ctx: &Context, vault: &str) -> anyhow::Result<()> {
    let services = ctx
        .client()?
        .get(&api_path(&["v1", "vaults", vault, "services"]))?;
    if ctx.json {
        return output::json(&services);
    }
    let rows: Vec<Vec<String>> = output::items(&services)
        .iter()
        .map(|s| {
            let auth = s.get("auth").unwrap_or(&Value::Null);
            vec![
                str_field(s, "name").to_owned(),
                str_field(s, "host").to_owned(),
                str_field(auth, "type").to_owned(),
                service_keys(s).join(","),
                yes_no(s.get("enabled")).to_owned(),
                tls_text(s).to_owned(),
                rate_limit_text(s),
                redact_text(s).to_owned(),
                substitutions_text(s),
                methods_text(s),
            ]
        })
        .collect();
    if rows.is_empty() {
        return output::line(&format!("No services in vault {vault}"));
    }
    output::text(&output::table(
        &[
            "NAME",
            "HOST",
            "AUTH",
            "KEYS",
            "ENABLED",
            "TLS",
            "RATE LIMIT",
            "REDACT",
            "SUBSTITUTIONS",
            "METHODS",
        ],
        &rows,
    ))
}

/// Every credential key a service reads, for the `KEYS` column: its auth's as written,
/// then its substitutions' not named already.
fn service_keys(service: &Value) -> Vec<String> {
    let mut keys = auth_keys(service.get("auth").unwrap_or(&Value::Null));
    for substitution in output::items(service.get("substitutions").unwrap_or(&Value::Null)) {
        if let Some(key) = substitution.get("key").and_then(Value::as_str) {
            if !keys.iter().any(|k| k == key) {
                keys.push(key.to_owned());
            }
        }
    }
    keys
}

/// The credential keys an auth object references, for the `KEYS` column, as the rules
/// crate reads them (none for an auth object it does not know).
fn auth_keys(auth: &Value) -> Vec<String> {
    Auth::deserialize(auth).map_or_else(
        |_| Vec::new(),
        |auth| {
            auth.keys_as_written()
                .into_iter()
                .map(str::to_owned)
                .collect()
        },
    )
}

fn toggle(ctx: &Context, vault: &str, name: &str, enable: bool) -> anyhow::Result<()> {
    let action = if enable { "enable" } else { "disable" };
    let service = ctx.client()?.post(
        &api_path(&["v1", "vaults", vault, "services", name, action]),
        &json!({}),
    )?;
    if ctx.json {
        return output::json(&service);
    }
    output::line(&format!(
        "{} service {name} in vault {vault}",
        if enable { "Enabled" } else { "Disabled" }
    ))
}

/// Reads `service set -f`'s input: a JSON array of services or `{"services": [...]}`.
pub fn parse_services_file(text: &str, source: &str) -> anyhow::Result<Vec<Value>> {
    let value: Value =
        serde_json::from_str(text).with_context(|| format!("{source} is not valid JSON"))?;
    let shape =
        || anyhow!("{source}: expected a JSON array of services or {{\"services\": [...]}}");
    let services = match value {
        Value::Array(services) => services,
        Value::Object(mut object) => {
            if let Some(other) = object.keys().find(|k| k.as_str() != "services") {
                bail!("{source}: unexpected field {other:?}; expected {{\"services\": [...]}}");
            }
            match object.remove("services") {
                Some(Value::Array(services)) => services,
                _ => return Err(shape()),
            }
        }
        _ => return Err(shape()),
    };
    if let Some(i) = services.iter().position(|s| !s.is_object()) {
        bail!("{source}: service #{} is not a JSON object", i + 1);
    }
    Ok(services)
}

fn set(ctx: &Context, vault: &str, file: &str) -> anyhow::Result<()> {
    let (text, source) = if file == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read the services from stdin")?;
        (text, "stdin".to_owned())
    } else {
        let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {file}"))?;
        (text, file.to_owned())
    };
    let services = parse_services_file(&text, &source)?;
    let client = ctx.client()?;
    let applied = client.put(
        &api_path(&["v1", "vaults", vault, "services"]),
        &json!({ "services": services }),
    )?;
    if ctx.json {
        return output::json(&applied);
    }
    // The server answers with the list it stored; fall back to what was sent.
    let stored = if applied.is_array() {
        output::items(&applied)
    } else {
        services.as_slice()
    };
    let names: Vec<&str> = stored.iter().map(|s| str_field(s, "name")).collect();
    let mut message = format!(
        "Vault {vault} now has {}",
        output::count(names.len(), "service", "services")
    );
    if !names.is_empty() {
        message.push_str(&format!(": {}", names.join(", ")));
    }
    output::line(&message)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `service add` flags the way the CLI does.
    fn add_args(flags: &[&str]) -> AddService {
        crate::cli::parse_flags(flags)
    }

    fn auth(flags: &[&str]) -> anyhow::Result<Value> {
        let mut all = vec!["--name", "svc", "--host", "api.example.com"];
        all.extend_from_slice(flags);
        build_auth(&add_args(&all))
    }

    fn err(flags: &[&str]) -> String {
        match auth(flags) {
            Ok(v) => panic!("{flags:?} built {v}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn methods_are_repeatable_or_comma_separated_and_absent_by_default() {
        let base = [
            "--name",
            "ro",
            "--host",
            "a.example.com",
            "--auth-type",
            "passthrough",
        ];
        let with = |extra: &[&str]| {
            let mut all = base.to_vec();
            all.extend_from_slice(extra);
            build_service(&add_args(&all)).unwrap()
        };
        assert!(with(&[]).get("methods").is_none());
        assert_eq!(methods_text(&with(&[])), "all");
        let repeated = with(&["--method", "GET", "--method", "POST"]);
        assert_eq!(repeated["methods"], json!(["GET", "POST"]));
        assert_eq!(methods_text(&repeated), "GET, POST");
        assert_eq!(
            with(&["--methods", "GET,HEAD"])["methods"],
            json!(["GET", "HEAD"])
        );
        // Sent as given: the server explains what is wrong with a lowercase method.
        assert_eq!(with(&["--method", "get"])["methods"], json!(["get"]));
    }

    #[test]
    fn substitute_flag_is_key_placeholder_surfaces_and_repeatable() {
        let service = build_service(&add_args(&[
            "--name",
            "bot",
            "--host",
            "api.telegram.org",
            "--auth-type",
            "passthrough",
            "--substitute",
            "BOT_TOKEN:__BOT_TOKEN__:path",
            "--substitute",
            " API_KEY : __API_KEY_X__ : query, body ",
        ]))
        .unwrap();
        assert_eq!(
            service["substitutions"],
            json!([
                {"key": "BOT_TOKEN", "placeholder": "__BOT_TOKEN__", "in": ["path"]},
                {"key": "API_KEY", "placeholder": "__API_KEY_X__", "in": ["query", "body"]}
            ])
        );
        assert_eq!(
            substitutions_text(&service),
            "BOT_TOKEN:__BOT_TOKEN__:path API_KEY:__API_KEY_X__:query,body"
        );
        assert_eq!(service_keys(&service), vec!["BOT_TOKEN", "API_KEY"]);
        assert!(service.get("redact_responses").is_none());
        assert_eq!(redact_text(&service), "yes");
        assert_eq!(
            policy_suffix(&service),
            ", substitutes BOT_TOKEN:__BOT_TOKEN__:path API_KEY:__API_KEY_X__:query,body"
        );
        let plain = build_service(&add_args(&[
            "--name",
            "p",
            "--host",
            "a.example.com",
            "--auth-type",
            "passthrough",
        ]))
        .unwrap();
        assert!(plain.get("substitutions").is_none());
        assert_eq!(substitutions_text(&plain), "none");
    }

    #[test]
    fn a_malformed_substitute_flag_says_what_is_wrong() {
        #[rustfmt::skip]
        let cases = [
            ("no surfaces", "BOT_TOKEN:__BOT_TOKEN__", "write it as KEY:PLACEHOLDER:SURFACE"),
            ("only a key", "BOT_TOKEN", "write it as KEY:PLACEHOLDER:SURFACE"),
            ("an empty key", ":__BOT_TOKEN__:path", "write it as KEY:PLACEHOLDER:SURFACE"),
            ("an empty surface list", "BOT_TOKEN:__BOT_TOKEN__:", "name at least one surface"),
            ("a trailing comma", "BOT_TOKEN:__BOT_TOKEN__:path,", "name at least one surface"),
            ("an unknown surface", "BOT_TOKEN:__BOT_TOKEN__:cookie", "unknown surface \"cookie\": one of path, query, header, body"),
            ("a surface twice", "BOT_TOKEN:__BOT_TOKEN__:path,path", "lists path twice"),
            ("a bad placeholder", "BOT_TOKEN:BOT_TOKEN:path", "starts and ends with __"),
            ("a lowercase placeholder", "BOT_TOKEN:__bot__x__:path", "only A-Z"),
            ("a bad key", "bot-token:__BOT_TOKEN__:path", "UPPER_SNAKE_CASE"),
        ];
        for (behaviour, flag, reason) in cases {
            let refused = parse_substitute(flag).err().unwrap_or_default();
            assert!(
                refused.starts_with("invalid substitution"),
                "{behaviour}: {refused}"
            );
            assert!(refused.contains(reason), "{behaviour}: {refused}");
        }
    }

    #[test]
    fn no_redact_flag_turns_redaction_off() {
        let service = build_service(&add_args(&[
            "--name",
            "echo",
            "--host",
            "echo.example.com",
            "--auth-type",
            "bearer",
            "--token-key",
            "K",
            "--no-redact",
        ]))
        .unwrap();
        assert_eq!(service["redact_responses"], json!(false));
        assert_eq!(redact_text(&service), "no");
        assert_eq!(policy_suffix(&service), ", responses not redacted");
    }

    #[test]
    fn h2c_flag_sends_upstream_h2c_for_a_plain_upstream_only() {
        let base = [
            "--name",
            "grpc",
            "--host",
            "grpc.example.com:50051",
            "--auth-type",
            "passthrough",
        ];
        let with = |extra: &[&str]| {
            let mut all = base.to_vec();
            all.extend_from_slice(extra);
            build_service(&add_args(&all))
        };
        let plain = with(&["--no-upstream-tls"]).unwrap();
        assert!(plain.get("upstream_h2c").is_none());
        assert!(!is_h2c(&plain));
        assert_eq!(tls_text(&plain), "no");
        let h2c = with(&["--no-upstream-tls", "--h2c"]).unwrap();
        assert_eq!(h2c["upstream_h2c"], json!(true));
        assert_eq!(h2c["upstream_tls"], json!(false));
        assert_eq!(tls_text(&h2c), "no (h2c)");
        assert_eq!(policy_suffix(&h2c), ", HTTP/2 without TLS (h2c)");
        let refused = "--h2c is for a plain-HTTP upstream: add --no-upstream-tls \
                       (a TLS upstream gets HTTP/2 by ALPN when it offers it)";
        let alone = with(&["--h2c"]).err().map(|e| e.to_string());
        assert_eq!(alone.as_deref(), Some(refused));

        // A catalog template's TLS upstream too, unless --no-upstream-tls turns it off.
        let flags = |extra: &[&str]| add_args(&[&base[..], extra].concat()).flags;
        let mut template = json!({"name": "stripe", "upstream_tls": true});
        let over_tls = apply_h2c(&mut template, &flags(&["--h2c"]));
        assert_eq!(
            over_tls.err().map(|e| e.to_string()).as_deref(),
            Some(refused)
        );
        assert!(template.get("upstream_h2c").is_none());
        template["upstream_tls"] = json!(false);
        apply_h2c(&mut template, &flags(&["--h2c"])).unwrap();
        assert_eq!(template["upstream_h2c"], json!(true));
    }

    #[test]
    fn rate_limit_flag_is_n_per_second_or_minute_and_absent_by_default() {
        let base = [
            "--name",
            "ro",
            "--host",
            "a.example.com",
            "--auth-type",
            "passthrough",
        ];
        let with = |extra: &[&str]| {
            let mut all = base.to_vec();
            all.extend_from_slice(extra);
            build_service(&add_args(&all)).unwrap()
        };
        assert!(with(&[]).get("rate_limit").is_none());
        assert_eq!(rate_limit_text(&with(&[])), "none");
        let per_second = with(&["--rate-limit", "10/s"]);
        assert_eq!(
            per_second["rate_limit"],
            json!({"requests": 10, "per": "second"})
        );
        assert_eq!(rate_limit_text(&per_second), "10/s");
        assert_eq!(
            with(&["--rate-limit", "600/min"])["rate_limit"],
            json!({"requests": 600, "per": "minute"})
        );
        for bad in ["0/s", "10/h", "ten/s", "10", "1000001/min"] {
            let refused = parse_rate_limit(bad).err().unwrap_or_default();
            assert!(
                refused.starts_with("invalid rate limit: "),
                "{bad}: {refused}"
            );
        }
    }

    #[test]
    fn bearer() {
        assert_eq!(
            auth(&["--auth-type", "bearer", "--token-key", "STRIPE_KEY"]).unwrap(),
            json!({"type": "bearer", "token": "STRIPE_KEY"})
        );
        assert_eq!(
            err(&["--auth-type", "bearer"]),
            "--auth-type bearer needs --token-key KEY"
        );
    }

    #[test]
    fn basic() {
        assert_eq!(
            auth(&[
                "--auth-type",
                "basic",
                "--username-key",
                "U",
                "--password-key",
                "P"
            ])
            .unwrap(),
            json!({"type": "basic", "username": "U", "password": "P"})
        );
        assert_eq!(
            err(&["--auth-type", "basic", "--username-key", "U"]),
            "--auth-type basic needs --password-key KEY"
        );
        assert_eq!(
            err(&["--auth-type", "basic", "--password-key", "P"]),
            "--auth-type basic needs --username-key KEY"
        );
    }

    #[test]
    fn api_key_with_defaults() {
        assert_eq!(
            auth(&["--auth-type", "api-key", "--api-key-key", "OPENAI_KEY"]).unwrap(),
            json!({"type": "api-key", "key": "OPENAI_KEY", "header": "x-api-key", "prefix": ""})
        );
    }

    #[test]
    fn api_key_with_header_and_prefix() {
        assert_eq!(
            auth(&[
                "--auth-type",
                "api-key",
                "--api-key-key",
                "K",
                "--api-key-header",
                "Authorization",
                "--api-key-prefix",
                "Token "
            ])
            .unwrap(),
            json!({"type": "api-key", "key": "K", "header": "Authorization", "prefix": "Token "})
        );
        assert_eq!(
            err(&["--auth-type", "api-key"]),
            "--auth-type api-key needs --api-key-key KEY"
        );
    }

    #[test]
    fn custom_headers() {
        assert_eq!(
            auth(&[
                "--auth-type",
                "custom",
                "--custom-header",
                "X-Token: tok {{ KEY }}",
                "--custom-header",
                "X-Org:{{ORG}}"
            ])
            .unwrap(),
            json!({"type": "custom", "headers": {"X-Token": "tok {{ KEY }}", "X-Org": "{{ORG}}"}})
        );
        assert!(err(&["--auth-type", "custom"]).contains("needs --custom-header"));
        assert!(
            err(&["--auth-type", "custom", "--custom-header", "no colon"])
                .contains("expects 'HEADER: TEMPLATE'")
        );
        assert!(
            err(&["--auth-type", "custom", "--custom-header", "X-A:"]).contains("empty template")
        );
        assert!(
            err(&["--auth-type", "custom", "--custom-header", "Bad Name: x"])
                .contains("invalid header name")
        );
        assert!(err(&[
            "--auth-type",
            "custom",
            "--custom-header",
            "X-A: 1",
            "--custom-header",
            "x-a: 2"
        ])
        .contains("given twice"));
    }

    #[test]
    fn passthrough() {
        assert_eq!(
            auth(&["--auth-type", "passthrough"]).unwrap(),
            json!({"type": "passthrough"})
        );
    }

    #[test]
    fn flags_for_another_auth_type_are_refused() {
        assert_eq!(
            err(&["--auth-type", "passthrough", "--token-key", "K"]),
            "--token-key does not apply to --auth-type passthrough"
        );
        assert_eq!(
            err(&[
                "--auth-type",
                "bearer",
                "--token-key",
                "K",
                "--api-key-header",
                "X"
            ]),
            "--api-key-header does not apply to --auth-type bearer"
        );
    }

    #[test]
    fn referenced_keys_must_be_valid() {
        assert!(err(&["--auth-type", "bearer", "--token-key", "stripe"])
            .contains("invalid credential key"));
    }

    #[test]
    fn service_json_has_flags_applied() {
        let args = add_args(&[
            "--name",
            "internal",
            "--host",
            "svc.internal:8080",
            "--auth-type",
            "passthrough",
            "--no-upstream-tls",
            "--disabled",
        ]);
        assert_eq!(
            build_service(&args).unwrap(),
            json!({
                "name": "internal",
                "host": "svc.internal:8080",
                "enabled": false,
                "auth": {"type": "passthrough"},
                "upstream_tls": false,
            })
        );
        let args = add_args(&[
            "--name",
            "stripe",
            "--host",
            "api.stripe.com",
            "--auth-type",
            "bearer",
            "--token-key",
            "STRIPE_KEY",
        ]);
        let service = build_service(&args).unwrap();
        assert_eq!(service["enabled"], true);
        assert_eq!(service["upstream_tls"], true);
    }

    #[test]
    fn services_file_shapes() {
        let one = r#"{"name":"a","host":"a.com","auth":{"type":"passthrough"}}"#;
        assert_eq!(
            parse_services_file(&format!("[{one}]"), "f").unwrap().len(),
            1
        );
        assert_eq!(
            parse_services_file(&format!(r#"{{"services":[{one},{one}]}}"#), "f")
                .unwrap()
                .len(),
            2
        );
        assert!(parse_services_file("[]", "f").unwrap().is_empty());
        assert!(parse_services_file(r#"{"services":{}}"#, "f").is_err());
        assert!(parse_services_file(r#"{"services":[],"x":1}"#, "f").is_err());
        assert!(parse_services_file("[1]", "f").is_err());
        assert!(parse_services_file("nope", "f")
            .unwrap_err()
            .to_string()
            .contains("not valid JSON"));
    }

    #[test]
    fn keys_column() {
        assert_eq!(
            auth_keys(&json!({"type":"custom","headers":{"A":"{{ K1 }} {{K2}}","B":"{{K1}}"}})),
            vec!["K1".to_owned(), "K2".to_owned()]
        );
        assert_eq!(
            auth_keys(&json!({"type":"basic","username":"U","password":"P"})),
            vec!["U".to_owned(), "P".to_owned()]
        );
    }
}
