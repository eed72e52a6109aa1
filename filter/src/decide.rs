//! What to do with one request: refuse it, forward it (with credentials injected), or
//! fetch credentials first. Pure: the driver reads the request headers, calls
//! [`decide`], and carries out the [`Decision`] (see [`crate::driver`]).
//!
//! On the agents' listener ([`crate::config::Mode::Proxy`]), in order (each refusal
//! is a row of DESIGN.md §6):
//! 1. `TRACE`/`TRACK` → 405 `method_not_allowed` (no callout).
//! 2. Proxy credential from `Proxy-Authorization` → else 407 `proxy_auth_required`.
//! 3. No snapshot yet → 503 `control_plane_unavailable`.
//! 4. `sha256(token)` → agent → else 407 `invalid_token` (also when expired).
//! 5. Vault: named (credential, else `X-Vault`), else the agent's only vault →
//!    400 `vault_required` / 403 `forbidden`.
//! 6. A `CONNECT` (an HTTPS agent) opens a tunnel if a service of the vault names its
//!    host on its port, whatever the service's path or state: Envoy decrypts it and
//!    the requests inside are decided one by one (below). A host on the vault's
//!    passthrough list gets an untouched tunnel instead, unless a service that injects
//!    a credential names it. A host no service names is 403 with `proposal_hint`
//!    (policy `deny`), or an untouched tunnel (policy `passthrough`). Nothing is
//!    fetched for a `CONNECT`.
//! 7. `:authority` + `:path` → service → 400 `invalid_request`; no match: policy
//!    `passthrough` forwards without credentials, `deny` → 403 with `proposal_hint`.
//! 8. Disabled → 403 `service_disabled`; a method the service does not list in its
//!    `methods` → 403 `method_not_allowed_for_service` (nothing fetched); the agent
//!    over the service's `rate_limit` → 429 `rate_limited` with `Retry-After` (counted
//!    per agent token and service in Envoy's shared data, [`crate::rate_limit`], so
//!    neither new connections nor tunnels reset it; nothing fetched); auth rule broken
//!    → 502 `invalid_service`.
//! 9. Keys all fresh in the cache → render and forward; a key known missing → 502
//!    `credential_not_found`; else fetch. Forwarded from the cache with a key in the
//!    last part of its TTL: the cache is also asked for a background refresh of the
//!    service's keys ([`crate::cache`], "Refresh-ahead"); the request does not wait.
//!
//! Inside a decrypted tunnel ([`crate::config::Mode::Tunnel`]) steps 2 to 5 are
//! replaced: the agent and vault are the ones proven on the tunnel's `CONNECT`
//! ([`crate::tunnel`]), looked up again in the snapshot in use (407 `invalid_token`
//! once revoked, 403 once the vault is no longer granted); the TLS SNI and the
//! `:authority` must name the `CONNECT`'s host and port (421 `tunnel_host_mismatch`);
//! `CONNECT` is refused (405). Steps 7 to 9 are the same, with 443 as the default port.
//!
//! The cached path allocates only the normalized host and the rendered headers (and,
//! once per fetched entry, the refresh it asks for).

use std::rc::Rc;

use agent_vault_rules::proxy_auth::{self, DECODE_BUFFER_LEN};
use agent_vault_rules::reply::{self, Reject};
use agent_vault_rules::{normalize_authority, CompiledAuth, UnmatchedHostPolicy};

use agent_vault_rules::substitution::Substitution;

use crate::cache::{Cached, CredentialCache, Secret};
use crate::flight::FlightKey;
use crate::rate_limit::{self, Admission, SharedStore};
use crate::redact::Patterns;
use crate::request_log::RequestLog;
use crate::snapshot::{Agent, CompiledSnapshot, CompiledVault, ServiceInfo, TokenHash};
use crate::tunnel::{sni_names, TunnelIdentity};

pub use agent_vault_rules::reply::{DEFAULT_PORT, TLS_PORT};

/// The request headers the filter looks at.
#[derive(Debug, Clone, Copy, Default)]
pub struct Request<'a> {
    /// `:method`.
    pub method: &'a str,
    /// `:authority` (`None`: absent or not UTF-8).
    pub authority: Option<&'a str>,
    /// `:path`, query string included.
    pub path: &'a str,
    /// `proxy-authorization` (`None`: absent or not UTF-8).
    pub proxy_authorization: Option<&'a str>,
    /// `x-vault`.
    pub x_vault: Option<&'a str>,
    /// Set for a request inside a decrypted tunnel (the filter runs in
    /// [`crate::config::Mode::Tunnel`]): what Envoy knows of the tunnel.
    pub tunnel: Option<Tunnelled<'a>>,
}

/// What Envoy tells the filter about the tunnel a request came through; neither part
/// is anything the agent sent inside the tunnel.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tunnelled<'a> {
    /// The [`TunnelIdentity`] as encoded, from the tunnel connection's filter state
    /// (`None`: Envoy has none).
    pub identity: Option<&'a str>,
    /// The TLS SNI the agent's client sent when it started TLS inside the tunnel.
    pub sni: Option<&'a str>,
    /// The tunnel's bytes are TLS Envoy decrypted ([`crate::config::Mode::Tunnel`]);
    /// `false`: plain HTTP ([`crate::config::Mode::PlainTunnel`]), no SNI to check.
    pub tls: bool,
}

/// What to do with a request.
#[derive(Debug)]
pub enum Decision {
    /// Answer with this response.
    Reject(Reject),
    /// Forward, after the header changes in [`Forward`].
    Forward(Forward),
    /// Pause, fetch these credentials, then finish with [`FetchPlan::finish`].
    Fetch(FetchPlan),
}

/// Which of Envoy's routes a forwarded request takes: the value of the routing header
/// (`x-agent-vault-upstream`) the filter sets, and the routes of
/// `envoy/forward-proxy.yaml` match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// To the upstream over TLS Envoy originates (`tls`).
    Tls,
    /// To the upstream over plain HTTP/1.1 (`plain`).
    Plain,
    /// To the upstream over plain HTTP/2, prior knowledge (`h2c`).
    H2c,
    /// A `CONNECT` into Envoy's TLS-terminating internal listener (`tunnel`), with the
    /// identity the requests inside will carry ([`crate::tunnel::TUNNEL_HEADER`]).
    Tunnel(TunnelIdentity),
    /// A `CONNECT` tunnelled untouched to the host (`opaque`): nothing can be
    /// injected, and nothing of the agent's is decrypted.
    Opaque,
}

impl Route {
    /// The routing header's value.
    pub fn header_value(&self) -> &'static str {
        match self {
            Route::Tls => "tls",
            Route::Plain => "plain",
            Route::H2c => "h2c",
            Route::Tunnel(_) => "tunnel",
            Route::Opaque => "opaque",
        }
    }
}

/// How Envoy speaks to a service's upstream: its route for the requests it forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upstream {
    /// TLS Envoy originates; HTTP/2 or HTTP/1.1 as the upstream picks by ALPN.
    Tls,
    /// Plain HTTP/1.1.
    Plain,
    /// Plain HTTP/2 (`upstream_h2c`).
    H2c,
}

impl Upstream {
    /// A service rule's upstream.
    pub fn of(service: &agent_vault_rules::Service) -> Upstream {
        match (service.upstream_tls, service.upstream_h2c) {
            (true, _) => Upstream::Tls,
            (false, false) => Upstream::Plain,
            (false, true) => Upstream::H2c,
        }
    }

    /// The route of the requests forwarded to it.
    pub fn route(self) -> Route {
        match self {
            Upstream::Tls => Route::Tls,
            Upstream::Plain => Route::Plain,
            Upstream::H2c => Route::H2c,
        }
    }
}

/// How to forward a request. Always: remove `proxy-authorization`, `x-vault`, the
/// routing header and every header in `inject` (by lowercase name, so any case); then
/// set `inject`, the routing header (and for [`Route::Tunnel`] the tunnel's identity
/// header), and `:authority` if `authority` is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// Headers to set (lowercase names): the service's auth headers, rendered.
    pub inject: Vec<(String, String)>,
    /// The route.
    pub route: Route,
    /// New `:authority` (`<host>:443` for TLS services without an explicit port).
    pub authority: Option<String>,
    /// The host is one the agent chose, not one a service names exactly: a wildcard
    /// match or the `passthrough` policy ([`crate::host_budget`]).
    pub open_host: bool,
    /// The values the request was given, for what happens after its headers
    /// (substitution, redaction); `None` when the service needs neither.
    pub secrets: Option<Rc<Secrets>>,
}

/// The credential values one forwarded request was given, kept by its context for the
/// rest of the exchange. Wiped when the last holder drops it.
#[derive(Debug, Default)]
pub struct Secrets {
    /// The service's substitutions, each with its key's value.
    pub substitutions: Vec<(Substitution, Secret)>,
    /// What to remove from the response (empty when the service does not redact):
    /// every credential value of the service's keys and every header value injected,
    /// each once, if at least [`crate::redact::MIN_SECRET_LEN`] bytes long.
    pub redact: Vec<Secret>,
    /// The search patterns of `redact`, built with it (once per set of cached
    /// values, see [`CredentialCache::rendered`]), `None` when nothing is redacted.
    pub patterns: Option<Patterns>,
}

impl PartialEq for Secrets {
    fn eq(&self, other: &Secrets) -> bool {
        let pairs = |s: &Secrets| -> Vec<(Substitution, String)> {
            s.substitutions
                .iter()
                .map(|(sub, v)| (sub.clone(), v.expose().to_owned()))
                .collect()
        };
        let values = |s: &Secrets| -> Vec<String> {
            s.redact.iter().map(|v| v.expose().to_owned()).collect()
        };
        pairs(self) == pairs(other) && values(self) == values(other)
    }
}

impl Eq for Secrets {}

impl Secrets {
    /// What `service`'s request needs kept, given its keys' values (`lookup`) and the
    /// headers rendered for it; `None` if nothing.
    fn of<'v>(
        service: &ServiceInfo,
        lookup: &impl Fn(&str) -> Option<&'v str>,
        inject: &[(String, String)],
    ) -> Option<Rc<Secrets>> {
        let substitutions: Vec<(Substitution, Secret)> = service
            .substitutions
            .iter()
            .filter_map(|sub| Some((sub.clone(), Secret::new(lookup(&sub.key)?.to_owned()))))
            .collect();
        let mut redact: Vec<Secret> = Vec::new();
        if service.redact {
            let keys = service.keys.iter().filter_map(|key| lookup(key));
            for value in keys.chain(inject.iter().map(|(_, value)| value.as_str())) {
                if value.len() >= crate::redact::MIN_SECRET_LEN
                    && !redact.iter().any(|known| known.expose() == value)
                {
                    redact.push(Secret::new(value.to_owned()));
                }
            }
        }
        (!substitutions.is_empty() || !redact.is_empty()).then(|| {
            let patterns = Patterns::new(redact.iter().map(Secret::expose));
            Rc::new(Secrets {
                substitutions,
                redact,
                patterns,
            })
        })
    }
}

impl Forward {
    /// Forward with credentials removed and nothing injected, to a host the agent
    /// chose (the `passthrough` policy): over plain HTTP, or over TLS when the agent
    /// spoke TLS to it (inside a tunnel).
    pub fn untouched(tls: bool) -> Forward {
        Forward {
            inject: Vec::new(),
            route: if tls { Route::Tls } else { Route::Plain },
            authority: None,
            open_host: true,
            secrets: None,
        }
    }

    /// Whether Envoy originates TLS to the upstream.
    pub fn upstream_tls(&self) -> bool {
        self.route == Route::Tls
    }
}

impl Decision {
    /// Whether a request that goes ahead (forwarded or fetched) is for a host the
    /// agent chose rather than one a service names exactly.
    pub fn open_host(&self) -> bool {
        match self {
            Decision::Forward(forward) => forward.open_host,
            Decision::Fetch(plan) => plan.open_host,
            Decision::Reject(_) => false,
        }
    }
}

/// A request waiting for credentials: what it matched, so it can be finished with the
/// fetched values even if a new snapshot arrives meanwhile.
#[derive(Debug, Clone)]
pub struct FetchPlan {
    /// The snapshot the request was decided against.
    pub snapshot: Rc<CompiledSnapshot>,
    /// Vault name.
    pub vault: Rc<str>,
    /// Matched service index in the vault.
    pub service: usize,
    /// The agent's token hash, for the control plane's re-check.
    pub token_sha256: String,
    /// How Envoy speaks to the upstream.
    pub upstream: Upstream,
    /// New `:authority`, if any.
    pub authority: Option<String>,
    /// Matched through a wildcard (see [`Forward::open_host`]).
    pub open_host: bool,
}

impl FetchPlan {
    fn auth(&self) -> Option<&CompiledAuth> {
        self.snapshot
            .vault(&self.vault)
            .and_then(|v| v.matcher.auth(self.service))
            .and_then(|auth| auth.as_ref().ok())
    }

    fn service_info(&self) -> Option<&ServiceInfo> {
        self.snapshot
            .vault(&self.vault)
            .and_then(|v| v.services.get(self.service))
    }

    fn service_name(&self) -> &str {
        self.service_info().map_or("", |s| &*s.name)
    }

    /// The credential keys to fetch (auth and substitutions), sorted and deduplicated.
    pub fn keys(&self) -> &[String] {
        self.service_info().map(|s| &*s.keys).unwrap_or_default()
    }

    /// Finishes the request with fetched values: any needed key missing → 502
    /// `credential_not_found`; else render and forward.
    pub fn finish<'v>(
        &self,
        lookup: impl Fn(&str) -> Option<&'v str>,
        missing: &[String],
    ) -> Decision {
        let (Some(auth), Some(service)) = (self.auth(), self.service_info()) else {
            // Cannot happen: a plan is only made for a compiled auth.
            return Decision::Reject(reply::invalid_service(
                &self.vault,
                self.service_name(),
                "not compiled",
            ));
        };
        if let Some(key) = service
            .keys
            .iter()
            .find(|k| missing.contains(k) || lookup(k).is_none())
        {
            return Decision::Reject(reply::credential_not_found(&self.vault, key));
        }
        render(
            auth,
            lookup,
            (&self.vault, service),
            (self.upstream, self.open_host),
            self.authority.clone(),
        )
    }
}

/// Renders a service's headers into a [`Forward`], with the [`Secrets`] the rest of
/// the exchange needs; the flags are (upstream TLS, open host).
fn render<'v>(
    auth: &CompiledAuth,
    lookup: impl Fn(&str) -> Option<&'v str>,
    (vault, service): (&str, &ServiceInfo),
    (upstream, open_host): (Upstream, bool),
    authority: Option<String>,
) -> Decision {
    match Rendered::of(auth, &lookup, service) {
        Ok(rendered) => rendered.forward(upstream, open_host, authority),
        Err(error) => Decision::Reject(reply::render_failed(vault, &service.name, &error)),
    }
}

/// What a service's credential values render to: the headers injected and the
/// secrets its requests keep (with their redaction patterns). The same for every
/// request those values serve, so a worker keeps it with the values
/// ([`CredentialCache::rendered`]) until one of them changes.
#[derive(Debug)]
pub struct Rendered {
    inject: Vec<(String, String)>,
    secrets: Option<Rc<Secrets>>,
}

impl Rendered {
    fn of<'v>(
        auth: &CompiledAuth,
        lookup: &impl Fn(&str) -> Option<&'v str>,
        service: &ServiceInfo,
    ) -> Result<Rendered, agent_vault_rules::RenderError> {
        let inject = auth.render(lookup)?;
        let secrets = Secrets::of(service, lookup, &inject);
        Ok(Rendered { inject, secrets })
    }

    fn forward(&self, upstream: Upstream, open_host: bool, authority: Option<String>) -> Decision {
        Decision::Forward(Forward {
            inject: self.inject.clone(),
            route: upstream.route(),
            authority,
            open_host,
            secrets: self.secrets.clone(),
        })
    }
}

/// Decides what to do with `request` at `now_ms`, recording what it learns (agent,
/// vault, host, service, error) in `log`.
/// Rate limits are counted in `store` (Envoy's shared data).
pub fn decide(
    snapshot: Option<&Rc<CompiledSnapshot>>,
    cache: &CredentialCache,
    request: &Request<'_>,
    now_ms: u64,
    log: &mut RequestLog,
    store: &mut impl SharedStore,
) -> Decision {
    let decision = match &request.tunnel {
        None => decide_inner(snapshot, cache, request, now_ms, log, store),
        Some(tunnel) => decide_in_tunnel(snapshot, cache, request, tunnel, now_ms, log, store),
    };
    if let Decision::Reject(reject) = &decision {
        log.error = Some(reject.code);
    }
    decision
}

fn decide_inner(
    snapshot: Option<&Rc<CompiledSnapshot>>,
    cache: &CredentialCache,
    request: &Request<'_>,
    now_ms: u64,
    log: &mut RequestLog,
    store: &mut impl SharedStore,
) -> Decision {
    use Decision::Reject as R;

    // 1. An upstream that implements TRACE echoes the injected credential back.
    if reply::is_refused_method(request.method) {
        return R(reply::method_not_allowed(request.method));
    }
    let connect = request.method.eq_ignore_ascii_case("CONNECT");

    // 2. Proxy credential.
    let mut buffer = [0u8; DECODE_BUFFER_LEN];
    let credential = match proxy_auth::parse(request.proxy_authorization, &mut buffer) {
        Ok(credential) => credential,
        Err(error) => {
            if connect {
                log_connect_host(request, log);
            }
            return R(reply::proxy_auth_required(error.reason()));
        }
    };
    let named_vault = credential
        .vault
        .or_else(|| proxy_auth::x_vault(request.x_vault));

    // 3. Rules.
    let Some(snapshot) = snapshot else {
        return R(reply::control_plane_unavailable(
            "the proxy has not loaded its rules yet",
        ));
    };

    // 4. Agent.
    let token_hash = TokenHash::of(credential.token);
    let Some(agent) = snapshot.agent(token_hash.as_str()) else {
        return R(reply::invalid_token());
    };
    if agent.expired(now_ms) {
        return R(reply::invalid_token());
    }
    log.agent = Some(Rc::clone(&agent.name));
    log.token_sha256 = Some(Rc::clone(&agent.token_sha256));

    // 5. Vault.
    let vault: &CompiledVault = match reply::choose_vault(&agent.name, &agent.vaults, named_vault) {
        Ok(name) => match snapshot.vault(name) {
            Some(vault) => vault,
            None => return R(reply::vault_forbidden(&agent.name, Some(name))),
        },
        Err(reject) => return R(reject),
    };
    log.vault = Some(Rc::clone(&vault.name));

    // 6. An HTTPS agent's tunnel.
    if connect {
        return decide_connect(vault, token_hash.as_str(), request.authority, log);
    }

    // 7. to 9.
    let Some((host, port)) = request
        .authority
        .and_then(|a| normalize_authority(a, DEFAULT_PORT))
    else {
        return R(reply::invalid_request());
    };
    let found = Matched {
        snapshot,
        vault,
        token_sha256: token_hash.as_str(),
        host,
        port,
        in_tunnel: false,
        tls: false,
        method: request.method,
    };
    decide_service(found, cache, request.path, now_ms, log, store)
}

/// For the log of a refused `CONNECT`: the host it asked for.
fn log_connect_host(request: &Request<'_>, log: &mut RequestLog) {
    if let Some((host, _)) = request
        .authority
        .and_then(|a| normalize_authority(a, TLS_PORT))
    {
        log.host = host;
    }
}

/// Step 6: a `CONNECT host:port` from an authenticated agent. Nothing is fetched and
/// nothing injected here; the tunnel carries the identity to the requests inside.
fn decide_connect(
    vault: &CompiledVault,
    token_sha256: &str,
    authority: Option<&str>,
    log: &mut RequestLog,
) -> Decision {
    let Some((host, port)) = authority.and_then(|a| normalize_authority(a, TLS_PORT)) else {
        return Decision::Reject(reply::invalid_request());
    };
    // Nothing to inject into, nothing decrypted: raw bytes to the host.
    let opaque = || {
        Decision::Forward(Forward {
            route: Route::Opaque,
            ..Forward::untouched(false)
        })
    };
    let pinned = || {
        vault
            .passthrough_hosts
            .iter()
            .any(|pattern| pattern.matches_tunnel(&host, port))
    };
    let found = vault.matcher.find_for_tunnel(&host, port);
    let injects = found
        .and_then(|index| vault.matcher.auth(index))
        .is_none_or(|auth| {
            auth.as_ref()
                .map_or(true, |auth| auth.header_names().next().is_some())
        });
    let Some(index) = found.filter(|_| injects || !pinned()) else {
        let decision = if pinned() {
            // A client that pins its certificates: it would refuse ours.
            opaque()
        } else {
            match vault.policy {
                // No certificate is minted for a host no rule names.
                UnmatchedHostPolicy::Passthrough => opaque(),
                UnmatchedHostPolicy::Deny => {
                    Decision::Reject(reply::no_service_for_tunnel(&vault.name, &host, port))
                }
            }
        };
        log.host = host;
        return decision;
    };
    if let Some(service) = vault.services.get(index) {
        log.service = Some(Rc::clone(&service.name));
    }
    let open_host = vault.matcher.pattern(index).is_some_and(|p| p.wildcard);
    let identity = TunnelIdentity {
        token_sha256: token_sha256.to_owned(),
        vault: vault.name.to_string(),
        host,
        port,
    };
    log.host.clone_from(&identity.host);
    Decision::Forward(Forward {
        inject: Vec::new(),
        route: Route::Tunnel(identity),
        authority: None,
        open_host,
        secrets: None,
    })
}

/// A request inside a decrypted tunnel: the agent and vault proven on its `CONNECT`,
/// checked again against the snapshot in use, and the tunnel's host.
fn decide_in_tunnel(
    snapshot: Option<&Rc<CompiledSnapshot>>,
    cache: &CredentialCache,
    request: &Request<'_>,
    tunnel: &Tunnelled<'_>,
    now_ms: u64,
    log: &mut RequestLog,
    store: &mut impl SharedStore,
) -> Decision {
    use Decision::Reject as R;

    if request.method.eq_ignore_ascii_case("CONNECT") {
        return R(reply::connect_not_supported());
    }
    if reply::is_refused_method(request.method) {
        return R(reply::method_not_allowed(request.method));
    }
    // Proven on the CONNECT, carried by Envoy; the request's own Proxy-Authorization
    // and X-Vault, if any, are not even read (and are removed before forwarding).
    let Some(identity) = tunnel.identity.and_then(TunnelIdentity::parse) else {
        return R(reply::tunnel_without_identity());
    };
    let Some(snapshot) = snapshot else {
        return R(reply::control_plane_unavailable(
            "the proxy has not loaded its rules yet",
        ));
    };
    // The agent as it is now: revoked, rotated or expired since the CONNECT is 407.
    let Some(agent) = snapshot.agent(&identity.token_sha256) else {
        return R(reply::invalid_token());
    };
    if agent.expired(now_ms) {
        return R(reply::invalid_token());
    }
    log.agent = Some(Rc::clone(&agent.name));
    log.token_sha256 = Some(Rc::clone(&agent.token_sha256));
    let Some(vault) = granted_vault(snapshot, agent, &identity.vault) else {
        return R(reply::vault_forbidden(&agent.name, Some(&identity.vault)));
    };
    log.vault = Some(Rc::clone(&vault.name));

    // The tunnel's host only: its certificate was minted for it, and the CONNECT was
    // authorised for it. The SNI first: it chose the certificate. (A plain tunnel has
    // no TLS, so no SNI and no certificate: only its :authority is checked.)
    if tunnel.tls && !sni_names(tunnel.sni, &identity.host) {
        log.host.clone_from(&identity.host);
        return R(reply::tunnel_host_mismatch(
            "TLS server name (SNI)",
            tunnel.sni.unwrap_or("(none)"),
            &identity.authority(),
        ));
    }
    let default_port = if tunnel.tls { TLS_PORT } else { DEFAULT_PORT };
    let Some((host, port)) = request
        .authority
        .and_then(|a| normalize_authority(a, default_port))
    else {
        return R(reply::invalid_request());
    };
    if host != identity.host || port != identity.port {
        log.host = host;
        return R(reply::tunnel_host_mismatch(
            ":authority (Host)",
            request.authority.unwrap_or_default(),
            &identity.authority(),
        ));
    }
    let found = Matched {
        snapshot,
        vault,
        token_sha256: &identity.token_sha256,
        host,
        port,
        in_tunnel: true,
        tls: tunnel.tls,
        method: request.method,
    };
    decide_service(found, cache, request.path, now_ms, log, store)
}

/// The vault `name` if `agent` is (still) granted it and it (still) exists.
fn granted_vault<'s>(
    snapshot: &'s CompiledSnapshot,
    agent: &Agent,
    name: &str,
) -> Option<&'s CompiledVault> {
    agent
        .vaults
        .iter()
        .any(|granted| **granted == *name)
        .then(|| snapshot.vault(name))
        .flatten()
}

/// An authenticated request and where it goes, for [`decide_service`].
struct Matched<'a> {
    snapshot: &'a Rc<CompiledSnapshot>,
    vault: &'a CompiledVault,
    token_sha256: &'a str,
    host: String,
    port: u16,
    /// From inside a tunnel.
    in_tunnel: bool,
    /// The agent spoke TLS (a decrypted tunnel): an untouched request goes on over
    /// TLS.
    tls: bool,
    /// The request's `:method`.
    method: &'a str,
}

/// Steps 7 to 9: the service for `host:port` and `path`, and its credentials.
fn decide_service(
    found: Matched<'_>,
    cache: &CredentialCache,
    path: &str,
    now_ms: u64,
    log: &mut RequestLog,
    store: &mut impl SharedStore,
) -> Decision {
    use Decision::Reject as R;
    let Matched {
        snapshot,
        vault,
        token_sha256,
        host,
        port,
        in_tunnel,
        tls,
        method,
    } = found;

    // 7. Service.
    let Some(index) = vault.matcher.find(&host, port, path) else {
        let decision = match (vault.policy, in_tunnel) {
            (UnmatchedHostPolicy::Passthrough, _) => Decision::Forward(Forward::untouched(tls)),
            (UnmatchedHostPolicy::Deny, false) => R(reply::no_service(&vault.name, &host, port)),
            (UnmatchedHostPolicy::Deny, true) => {
                R(reply::no_service_for_tunnel(&vault.name, &host, port))
            }
        };
        log.host = host;
        return decision;
    };
    let (Some(service), Some(auth)) = (vault.services.get(index), vault.matcher.auth(index)) else {
        log.host = host;
        return R(reply::invalid_service(&vault.name, "", "not indexed"));
    };
    log.service = Some(Rc::clone(&service.name));

    // 8. Service state.
    if !service.enabled {
        log.host = host;
        return R(reply::service_disabled(&vault.name, &service.name));
    }
    if !agent_vault_rules::method_allowed(service.methods.as_deref(), method) {
        log.host = host;
        return R(reply::method_not_allowed_for_service(
            &vault.name,
            &service.name,
            method,
            service.methods.as_deref().unwrap_or_default(),
        ));
    }
    // The service's limit, then the vault's (a request one refuses still counted
    // against the one checked before it).
    let limits = [
        (service.rate_limit, &*service.name),
        (vault.rate_limit, rate_limit::WHOLE_VAULT),
    ];
    for (limit, scope) in limits {
        let Some(limit) = limit else { continue };
        let key = rate_limit::key(token_sha256, &vault.name, scope);
        if let Admission::Limited { retry_after_s } = rate_limit::admit(store, &key, limit, now_ms)
        {
            log.host = host;
            let (requests, per) = (limit.requests, limit.per.as_str());
            return R(if scope == rate_limit::WHOLE_VAULT {
                reply::vault_rate_limited(&vault.name, requests, per, retry_after_s)
            } else {
                reply::rate_limited(&vault.name, scope, requests, per, retry_after_s)
            });
        }
    }
    let auth = match auth {
        Ok(auth) => auth,
        Err(error) => {
            log.host = host;
            return R(reply::invalid_service(
                &vault.name,
                &service.name,
                &error.to_string(),
            ));
        }
    };

    // 9. Credentials.
    let pattern = vault.matcher.pattern(index);
    let explicit_port = pattern.and_then(|p| p.port).is_some();
    let open_host = pattern.is_some_and(|p| p.wildcard);
    let authority =
        (service.upstream == Upstream::Tls && !explicit_port).then(|| format!("{host}:{TLS_PORT}"));
    log.host = host;
    let mut complete = true;
    let mut refresh = false;
    for key in &*service.keys {
        let (cached, due) = cache.lookup(&vault.name, key, now_ms);
        refresh |= due;
        match cached {
            Cached::Value(_) => {}
            Cached::Missing => return R(reply::credential_not_found(&vault.name, key)),
            Cached::Unknown => complete = false,
        }
    }
    // Served from the cache, some key near the end of its TTL: re-fetch in the
    // background (crate::cache, "Refresh-ahead").
    if complete && refresh {
        cache.want_refresh(FlightKey {
            token_sha256: token_sha256.to_owned(),
            vault: Rc::clone(&vault.name),
            keys: service.keys.to_vec(),
        });
    }
    if !complete {
        return Decision::Fetch(FetchPlan {
            snapshot: Rc::clone(snapshot),
            vault: Rc::clone(&vault.name),
            service: index,
            token_sha256: token_sha256.to_owned(),
            upstream: service.upstream,
            authority,
            open_host,
        });
    }
    // Rendered once per set of values, then reused: a hit renders nothing.
    if let Some(rendered) = cache.rendered(&vault.name, index) {
        return rendered.forward(service.upstream, open_host, authority);
    }
    let lookup = |key: &str| match cache.get(&vault.name, key, now_ms) {
        Cached::Value(value) => Some(value),
        Cached::Missing | Cached::Unknown => None,
    };
    match Rendered::of(auth, &lookup, service) {
        Ok(rendered) => cache.remember(&vault.name, index, rendered).forward(
            service.upstream,
            open_host,
            authority,
        ),
        Err(error) => R(reply::render_failed(&vault.name, &service.name, &error)),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cache::Secret;
    use crate::rate_limit::MemoryStore;
    use agent_vault_rules::reply::ErrorCode;
    use agent_vault_rules::{Auth, Grant, Role, Service, Snapshot, SnapshotAgent, SnapshotVault};
    use base64::Engine as _;
    use std::collections::BTreeMap;

    pub const NOW_MS: u64 = 1_700_000_000_000;
    pub const ALICE: &str = "av_agt_alice";
    pub const BOB: &str = "av_agt_bob";
    pub const EXPIRED: &str = "av_agt_expired";
    pub const LONELY: &str = "av_agt_lonely";
    pub const ORPHAN: &str = "av_agt_orphan";
    pub const PINNED: &str = "av_agt_pinned";

    fn service(name: &str, host: &str, auth: Auth) -> Service {
        Service {
            name: name.into(),
            host: host.into(),
            enabled: true,
            auth,
            upstream_tls: true,
            methods: None,
            rate_limit: None,
            substitutions: Vec::new(),
            redact_responses: None,
            upstream_h2c: false,
        }
    }

    fn bearer(key: &str) -> Auth {
        Auth::Bearer { token: key.into() }
    }

    fn agent(token: &str, name: &str, vaults: &[&str], expires_at: Option<i64>) -> SnapshotAgent {
        SnapshotAgent {
            token_sha256: TokenHash::of(token).as_str().to_owned(),
            name: name.into(),
            vaults: vaults
                .iter()
                .map(|v| Grant {
                    vault: (*v).into(),
                    role: Role::Proxy,
                })
                .collect(),
            expires_at,
        }
    }

    /// Vault `default` (deny): stripe (bearer), github wildcard (basic), a disabled
    /// service, a broken auth, a plain-HTTP api-key service with a port, a custom
    /// service, a passthrough service. Vault `open` (passthrough policy), vault `other`.
    pub fn snapshot() -> Rc<CompiledSnapshot> {
        let mut disabled = service("off", "off.example.com", bearer("STRIPE_KEY"));
        disabled.enabled = false;
        let mut internal = service(
            "internal",
            "internal.example.com:8080",
            Auth::ApiKey {
                key: "API_KEY".into(),
                header: "X-Api-Key".into(),
                prefix: "Key ".into(),
            },
        );
        internal.upstream_tls = false;
        let mut headers = BTreeMap::new();
        headers.insert("X-Token".to_owned(), "tok {{ STRIPE_KEY }}".to_owned());
        headers.insert("X-Client".to_owned(), "agent-vault".to_owned());
        Rc::new(CompiledSnapshot::new(Snapshot {
            version: "1".into(),
            vaults: vec![
                SnapshotVault {
                    name: "default".into(),
                    unmatched_host_policy: UnmatchedHostPolicy::Deny,
                    services: vec![
                        service("stripe", "api.stripe.com", bearer("STRIPE_KEY")),
                        service(
                            "github",
                            "*.github.com",
                            Auth::Basic {
                                username: "GH_USER".into(),
                                password: "GH_PASS".into(),
                            },
                        ),
                        disabled,
                        service("broken", "broken.example.com", bearer("lowercase")),
                        internal,
                        service("custom", "custom.example.com", Auth::Custom { headers }),
                        service("open-svc", "open.example.com", Auth::Passthrough {}),
                        service("tls-port", "tls.example.com:8443", bearer("STRIPE_KEY")),
                        service("crlf", "crlf.example.com", bearer("CRLF")),
                        service("absent", "absent.example.com", bearer("ABSENT")),
                        Service {
                            upstream_tls: false,
                            ..service("plain", "plain.example.com", bearer("STRIPE_KEY"))
                        },
                        Service {
                            methods: Some(vec!["GET".into(), "HEAD".into()]),
                            ..service("readonly", "readonly.example.com", bearer("STRIPE_KEY"))
                        },
                        Service {
                            methods: Some(vec!["POST".into()]),
                            ..service("post-cold", "cold.example.com", bearer("COLD_KEY"))
                        },
                        Service {
                            substitutions: vec![Substitution {
                                key: "BOT_TOKEN".into(),
                                placeholder: "__BOT_TOKEN__".into(),
                                surfaces: vec![agent_vault_rules::substitution::Surface::Path],
                            }],
                            ..service("telegram", "bot.example.com", bearer("STRIPE_KEY"))
                        },
                        Service {
                            redact_responses: Some(false),
                            ..service("no-redact", "echo.example.com", bearer("STRIPE_KEY"))
                        },
                        Service {
                            rate_limit: Some(agent_vault_rules::RateLimit {
                                requests: 3,
                                per: agent_vault_rules::RatePeriod::Minute,
                            }),
                            ..service("limited", "limited.example.com", bearer("COLD_KEY"))
                        },
                    ],
                    passthrough_hosts: vec![],
                    rate_limit: None,
                },
                SnapshotVault {
                    name: "open".into(),
                    unmatched_host_policy: UnmatchedHostPolicy::Passthrough,
                    services: vec![],
                    passthrough_hosts: vec![],
                    rate_limit: None,
                },
                SnapshotVault {
                    name: "pinned".into(),
                    unmatched_host_policy: UnmatchedHostPolicy::Deny,
                    services: vec![
                        service("injects", "stripe-pinned.example.com", bearer("STRIPE_KEY")),
                        service("allows", "open-pinned.example.com", Auth::Passthrough {}),
                    ],
                    passthrough_hosts: vec![
                        "pinned.example.com".into(),
                        "*.apps.example.com:443".into(),
                        "stripe-pinned.example.com".into(),
                        "open-pinned.example.com".into(),
                        "not a host".into(),
                    ],
                    rate_limit: None,
                },
                SnapshotVault {
                    name: "other".into(),
                    unmatched_host_policy: UnmatchedHostPolicy::Deny,
                    services: vec![service("stripe", "api.stripe.com", bearer("STRIPE_KEY"))],
                    passthrough_hosts: vec![],
                    rate_limit: None,
                },
            ],
            agents: vec![
                agent(ALICE, "alice", &["default"], None),
                agent(BOB, "bob", &["default", "open"], Some(2_000_000_000)),
                agent(EXPIRED, "old", &["default"], Some(1_600_000_000)),
                agent(LONELY, "lonely", &[], None),
                agent(ORPHAN, "orphan", &["deleted-vault"], None),
                agent(PINNED, "pinned", &["pinned"], None),
            ],
        }))
    }

    pub fn warm_cache() -> CredentialCache {
        let mut cache = CredentialCache::new(60_000);
        for (key, value) in [
            ("STRIPE_KEY", "sk_test_abc123"),
            ("GH_USER", "octo"),
            ("GH_PASS", "hunter2"),
            ("API_KEY", "k-123"),
            ("CRLF", "bad\r\nX-Evil: 1"),
        ] {
            cache.insert(
                "default",
                key,
                Some(Secret::new(value.into())),
                NOW_MS - 1000,
            );
        }
        cache.insert("default", "ABSENT", None, NOW_MS - 1000);
        cache
    }

    pub fn basic(token: &str, vault: &str) -> String {
        let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{token}:{vault}"));
        format!("Basic {encoded}")
    }

    /// What a decision comes to, for table comparisons.
    #[derive(Debug, PartialEq, Eq)]
    enum Outcome {
        Reject(u16, &'static str),
        Forward(Vec<(String, String)>, bool, Option<String>),
        Fetch(Vec<String>),
        /// A CONNECT into the decrypting listener, with this identity (encoded).
        Tunnel(String),
        /// A CONNECT tunnelled untouched.
        Opaque,
    }

    fn outcome(decision: Decision) -> Outcome {
        match decision {
            Decision::Reject(r) => Outcome::Reject(r.status(), r.code.as_str()),
            Decision::Forward(Forward {
                route: Route::Tunnel(identity),
                ..
            }) => Outcome::Tunnel(identity.encode()),
            Decision::Forward(Forward {
                route: Route::Opaque,
                ..
            }) => Outcome::Opaque,
            Decision::Forward(f) => {
                let tls = f.upstream_tls();
                Outcome::Forward(f.inject, tls, f.authority)
            }
            Decision::Fetch(plan) => Outcome::Fetch(plan.keys().to_vec()),
        }
    }

    /// The identity a CONNECT of `token` in `vault` to `host port` carries.
    pub fn identity(token: &str, vault: &str, host: &str, port: u16) -> String {
        TunnelIdentity {
            token_sha256: TokenHash::of(token).as_str().to_owned(),
            vault: vault.to_owned(),
            host: host.to_owned(),
            port,
        }
        .encode()
    }

    fn fwd(inject: &[(&str, &str)], tls: bool, authority: Option<&str>) -> Outcome {
        Outcome::Forward(
            inject
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect(),
            tls,
            authority.map(str::to_owned),
        )
    }

    fn fetch(keys: &[&str]) -> Outcome {
        Outcome::Fetch(keys.iter().map(|k| (*k).to_owned()).collect())
    }

    struct Case {
        behaviour: &'static str,
        method: &'static str,
        authority: Option<&'static str>,
        path: &'static str,
        proxy_authorization: Option<String>,
        x_vault: Option<&'static str>,
        expected: Outcome,
    }

    fn get(
        behaviour: &'static str,
        auth: Option<String>,
        authority: &'static str,
        expected: Outcome,
    ) -> Case {
        Case {
            behaviour,
            method: "GET",
            authority: Some(authority),
            path: "/v1/charges?limit=3",
            proxy_authorization: auth,
            x_vault: None,
            expected,
        }
    }

    #[test]
    fn decisions() {
        let snapshot = snapshot();
        let cache = warm_cache();
        let alice = || Some(basic(ALICE, ""));
        let gh_basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("octo:hunter2")
        );
        let mut cases = vec![
            // Step 1.
            Case {
                method: "TRACE",
                ..get(
                    "TRACE to a service is refused, never injected",
                    alice(),
                    "api.stripe.com",
                    Outcome::Reject(405, "method_not_allowed"),
                )
            },
            Case {
                method: "track",
                ..get(
                    "TRACK in lower case is refused too",
                    alice(),
                    "api.stripe.com",
                    Outcome::Reject(405, "method_not_allowed"),
                )
            },
            Case {
                method: "Trace",
                ..get(
                    "TRACE under a passthrough policy is refused",
                    Some(basic(BOB, "open")),
                    "anything.example.org",
                    Outcome::Reject(405, "method_not_allowed"),
                )
            },
            // Step 2.
            get(
                "no proxy credential",
                None,
                "api.stripe.com",
                Outcome::Reject(407, "proxy_auth_required"),
            ),
            get(
                "garbage proxy credential",
                Some("Basic %%%".into()),
                "api.stripe.com",
                Outcome::Reject(407, "proxy_auth_required"),
            ),
            get(
                "huge proxy credential",
                Some(format!("Bearer {}", "a".repeat(5000))),
                "api.stripe.com",
                Outcome::Reject(407, "proxy_auth_required"),
            ),
            // Step 4.
            get(
                "unknown token",
                Some(basic("av_agt_nobody", "")),
                "api.stripe.com",
                Outcome::Reject(407, "invalid_token"),
            ),
            get(
                "expired token",
                Some(basic(EXPIRED, "")),
                "api.stripe.com",
                Outcome::Reject(407, "invalid_token"),
            ),
            // Step 5.
            get(
                "several vaults, none named",
                Some(format!("Bearer {BOB}")),
                "api.stripe.com",
                Outcome::Reject(400, "vault_required"),
            ),
            get(
                "vault named but not granted",
                Some(basic(ALICE, "other")),
                "api.stripe.com",
                Outcome::Reject(403, "forbidden"),
            ),
            get(
                "vault named that does not exist",
                Some(basic(ALICE, "nope")),
                "api.stripe.com",
                Outcome::Reject(403, "forbidden"),
            ),
            get(
                "granted vault missing from the snapshot",
                Some(basic(ORPHAN, "")),
                "api.stripe.com",
                Outcome::Reject(403, "forbidden"),
            ),
            get(
                "agent with no vault",
                Some(basic(LONELY, "")),
                "api.stripe.com",
                Outcome::Reject(403, "forbidden"),
            ),
            Case {
                x_vault: Some("default"),
                ..get(
                    "vault from X-Vault with Bearer",
                    Some(format!("Bearer {BOB}")),
                    "api.stripe.com",
                    fwd(
                        &[("authorization", "Bearer sk_test_abc123")],
                        true,
                        Some("api.stripe.com:443"),
                    ),
                )
            },
            Case {
                x_vault: Some("open"),
                ..get(
                    "credential's vault wins over X-Vault",
                    Some(basic(BOB, "default")),
                    "api.stripe.com",
                    fwd(
                        &[("authorization", "Bearer sk_test_abc123")],
                        true,
                        Some("api.stripe.com:443"),
                    ),
                )
            },
            Case {
                x_vault: Some("  "),
                ..get(
                    "blank X-Vault is no vault",
                    Some(format!("Bearer {BOB}")),
                    "api.stripe.com",
                    Outcome::Reject(400, "vault_required"),
                )
            },
            // Step 6.
            Case {
                authority: None,
                ..get(
                    "no authority",
                    alice(),
                    "",
                    Outcome::Reject(400, "invalid_request"),
                )
            },
            get(
                "malformed authority",
                alice(),
                "user@api.stripe.com",
                Outcome::Reject(400, "invalid_request"),
            ),
            get(
                "authority with a bad port",
                alice(),
                "api.stripe.com:99999",
                Outcome::Reject(400, "invalid_request"),
            ),
            get(
                "no service, policy deny",
                alice(),
                "evil.example.org",
                Outcome::Reject(403, "forbidden"),
            ),
            get(
                "no service, policy passthrough",
                Some(basic(BOB, "open")),
                "anything.example.org:8080",
                fwd(&[], false, None),
            ),
            // Step 8: the service's methods.
            get(
                "GET to a GET/HEAD service is injected",
                alice(),
                "readonly.example.com",
                fwd(
                    &[("authorization", "Bearer sk_test_abc123")],
                    true,
                    Some("readonly.example.com:443"),
                ),
            ),
            Case {
                method: "HEAD",
                ..get(
                    "HEAD, the other listed method, is injected",
                    alice(),
                    "readonly.example.com",
                    fwd(
                        &[("authorization", "Bearer sk_test_abc123")],
                        true,
                        Some("readonly.example.com:443"),
                    ),
                )
            },
            Case {
                method: "POST",
                ..get(
                    "POST to a GET/HEAD service is 403",
                    alice(),
                    "readonly.example.com",
                    Outcome::Reject(403, "method_not_allowed_for_service"),
                )
            },
            Case {
                method: "get",
                ..get(
                    "methods are case-sensitive",
                    alice(),
                    "readonly.example.com",
                    Outcome::Reject(403, "method_not_allowed_for_service"),
                )
            },
            Case {
                method: "DELETE",
                ..get(
                    "a service without a methods list forwards any method",
                    alice(),
                    "api.stripe.com",
                    fwd(
                        &[("authorization", "Bearer sk_test_abc123")],
                        true,
                        Some("api.stripe.com:443"),
                    ),
                )
            },
            Case {
                method: "GET",
                ..get(
                    "a refused method is refused before any fetch (cold cache)",
                    alice(),
                    "cold.example.com",
                    Outcome::Reject(403, "method_not_allowed_for_service"),
                )
            },
            Case {
                method: "POST",
                ..get(
                    "an allowed method with a cold cache fetches",
                    alice(),
                    "cold.example.com",
                    fetch(&["COLD_KEY"]),
                )
            },
            // Step 7.
            get(
                "disabled service",
                alice(),
                "off.example.com",
                Outcome::Reject(403, "service_disabled"),
            ),
            get(
                "auth rule that does not compile",
                alice(),
                "broken.example.com",
                Outcome::Reject(502, "invalid_service"),
            ),
            // Step 8 and 9.
            get(
                "bearer from the cache",
                alice(),
                "api.stripe.com",
                fwd(
                    &[("authorization", "Bearer sk_test_abc123")],
                    true,
                    Some("api.stripe.com:443"),
                ),
            ),
            get(
                "host in upper case with a trailing dot",
                alice(),
                "API.Stripe.COM.",
                fwd(
                    &[("authorization", "Bearer sk_test_abc123")],
                    true,
                    Some("api.stripe.com:443"),
                ),
            ),
            get(
                "port 80 is rewritten to 443 for TLS",
                alice(),
                "api.stripe.com:80",
                fwd(
                    &[("authorization", "Bearer sk_test_abc123")],
                    true,
                    Some("api.stripe.com:443"),
                ),
            ),
            get(
                "basic on a wildcard",
                alice(),
                "api.github.com",
                fwd(
                    &[("authorization", gh_basic.as_str())],
                    true,
                    Some("api.github.com:443"),
                ),
            ),
            get(
                "api-key over plain HTTP keeps its port",
                alice(),
                "internal.example.com:8080",
                fwd(&[("x-api-key", "Key k-123")], false, None),
            ),
            get(
                "plain service without a port on port 80",
                alice(),
                "plain.example.com",
                fwd(&[("authorization", "Bearer sk_test_abc123")], false, None),
            ),
            get(
                "plain service without a port: another port of its host matches nothing",
                alice(),
                "plain.example.com:8080",
                Outcome::Reject(403, "forbidden"),
            ),
            get(
                "TLS service with an explicit port keeps it",
                alice(),
                "tls.example.com:8443",
                fwd(&[("authorization", "Bearer sk_test_abc123")], true, None),
            ),
            get(
                "custom headers",
                alice(),
                "custom.example.com",
                fwd(
                    &[
                        ("x-client", "agent-vault"),
                        ("x-token", "tok sk_test_abc123"),
                    ],
                    true,
                    Some("custom.example.com:443"),
                ),
            ),
            get(
                "passthrough service injects nothing",
                alice(),
                "open.example.com",
                fwd(&[], true, Some("open.example.com:443")),
            ),
            get(
                "credential known missing",
                alice(),
                "absent.example.com",
                Outcome::Reject(502, "credential_not_found"),
            ),
            get(
                "credential value with CR LF",
                alice(),
                "crlf.example.com",
                Outcome::Reject(502, "invalid_credential_value"),
            ),
        ];
        cases.extend(connect_cases());
        // Step 3 and a cold cache are checked below with another snapshot/cache.
        for case in cases.drain(..) {
            let request = Request {
                method: case.method,
                authority: case.authority,
                path: case.path,
                proxy_authorization: case.proxy_authorization.as_deref(),
                x_vault: case.x_vault,
                tunnel: None,
            };
            let mut log = RequestLog::default();
            let decision = decide(
                Some(&snapshot),
                &cache,
                &request,
                NOW_MS,
                &mut log,
                &mut MemoryStore::default(),
            );
            let expected_error = match &case.expected {
                Outcome::Reject(_, code) => Some(*code),
                _ => None,
            };
            assert_eq!(outcome(decision), case.expected, "{}", case.behaviour);
            assert_eq!(
                log.error.map(ErrorCode::as_str),
                expected_error,
                "{}",
                case.behaviour
            );
        }
    }

    fn connect(
        behaviour: &'static str,
        auth: Option<String>,
        authority: &'static str,
        expected: Outcome,
    ) -> Case {
        Case {
            method: "CONNECT",
            path: "",
            ..get(behaviour, auth, authority, expected)
        }
    }

    /// Step 6: what an HTTPS agent's CONNECT gets (no callout in any case: a warm or
    /// cold cache makes no difference, nothing is fetched for a tunnel).
    fn connect_cases() -> Vec<Case> {
        let alice = || Some(basic(ALICE, ""));
        vec![
            connect(
                "CONNECT without a proxy credential is 407",
                None,
                "api.stripe.com:443",
                Outcome::Reject(407, "proxy_auth_required"),
            ),
            connect(
                "CONNECT with an unknown token is 407",
                Some(basic("av_agt_nobody", "")),
                "api.stripe.com:443",
                Outcome::Reject(407, "invalid_token"),
            ),
            connect(
                "CONNECT with an expired token is 407",
                Some(basic(EXPIRED, "")),
                "api.stripe.com:443",
                Outcome::Reject(407, "invalid_token"),
            ),
            connect(
                "CONNECT to a vault not granted is 403",
                Some(basic(ALICE, "other")),
                "api.stripe.com:443",
                Outcome::Reject(403, "forbidden"),
            ),
            connect(
                "CONNECT with several vaults and none named is 400",
                Some(format!("Bearer {BOB}")),
                "api.stripe.com:443",
                Outcome::Reject(400, "vault_required"),
            ),
            connect(
                "CONNECT to a host a service names opens a tunnel carrying the identity",
                alice(),
                "api.stripe.com:443",
                Outcome::Tunnel(identity(ALICE, "default", "api.stripe.com", 443)),
            ),
            connect(
                "CONNECT carries the vault the agent named",
                Some(basic(BOB, "default")),
                "API.Stripe.com.:443",
                Outcome::Tunnel(identity(BOB, "default", "api.stripe.com", 443)),
            ),
            connect(
                "CONNECT without a port is for 443",
                alice(),
                "api.stripe.com",
                Outcome::Tunnel(identity(ALICE, "default", "api.stripe.com", 443)),
            ),
            connect(
                "CONNECT to a host under a wildcard service",
                alice(),
                "api.github.com:443",
                Outcome::Tunnel(identity(ALICE, "default", "api.github.com", 443)),
            ),
            connect(
                "CONNECT to a TLS service's own port",
                alice(),
                "tls.example.com:8443",
                Outcome::Tunnel(identity(ALICE, "default", "tls.example.com", 8443)),
            ),
            connect(
                "CONNECT to another port than the service names is 403",
                alice(),
                "tls.example.com:443",
                Outcome::Reject(403, "forbidden"),
            ),
            connect(
                "CONNECT to 443 of a plain service without a port is 403",
                alice(),
                "plain.example.com:443",
                Outcome::Reject(403, "forbidden"),
            ),
            connect(
                "CONNECT to a disabled service's host opens: the requests inside are refused",
                alice(),
                "off.example.com:443",
                Outcome::Tunnel(identity(ALICE, "default", "off.example.com", 443)),
            ),
            connect(
                "CONNECT to a host whose credential is missing opens: the requests inside are refused",
                alice(),
                "absent.example.com:443",
                Outcome::Tunnel(identity(ALICE, "default", "absent.example.com", 443)),
            ),
            connect(
                "CONNECT to a host no service names is 403 with a hint",
                alice(),
                "evil.example.org:443",
                Outcome::Reject(403, "forbidden"),
            ),
            connect(
                "CONNECT to a host no service names under the passthrough policy is tunnelled untouched",
                Some(basic(BOB, "open")),
                "anything.example.org:443",
                Outcome::Opaque,
            ),
            connect(
                "CONNECT to a malformed authority is 400",
                alice(),
                "api.stripe.com:99999",
                Outcome::Reject(400, "invalid_request"),
            ),
            connect(
                "CONNECT to a passthrough host is tunnelled untouched",
                Some(basic(PINNED, "")),
                "pinned.example.com:443",
                Outcome::Opaque,
            ),
            connect(
                "CONNECT to a host under a passthrough wildcard on its port",
                Some(basic(PINNED, "")),
                "a.apps.example.com:443",
                Outcome::Opaque,
            ),
            connect(
                "CONNECT to a host under a passthrough wildcard on another port is 403",
                Some(basic(PINNED, "")),
                "a.apps.example.com:8443",
                Outcome::Reject(403, "forbidden"),
            ),
            connect(
                "CONNECT to a passthrough host a credential-injecting service names is decrypted",
                Some(basic(PINNED, "")),
                "stripe-pinned.example.com:443",
                Outcome::Tunnel(identity(PINNED, "pinned", "stripe-pinned.example.com", 443)),
            ),
            connect(
                "CONNECT to a passthrough host whose service injects nothing is untouched",
                Some(basic(PINNED, "")),
                "open-pinned.example.com:443",
                Outcome::Opaque,
            ),
            connect(
                "another vault's passthrough host is no passthrough host",
                alice(),
                "pinned.example.com:443",
                Outcome::Reject(403, "forbidden"),
            ),
            Case {
                method: "connect",
                ..connect(
                    "CONNECT in lower case is a CONNECT",
                    alice(),
                    "api.stripe.com:443",
                    Outcome::Tunnel(identity(ALICE, "default", "api.stripe.com", 443)),
                )
            },
        ]
    }

    #[test]
    fn a_connects_hint_names_the_host_and_its_port_only_when_not_443() {
        let snapshot = snapshot();
        let cache = warm_cache();
        let auth = basic(ALICE, "");
        for (authority, hinted) in [
            ("evil.example.org:443", "evil.example.org"),
            ("evil.example.org", "evil.example.org"),
            ("evil.example.org:8443", "evil.example.org:8443"),
        ] {
            let request = Request {
                method: "CONNECT",
                authority: Some(authority),
                proxy_authorization: Some(&auth),
                ..Request::default()
            };
            let mut log = RequestLog::default();
            let Decision::Reject(reject) = decide(
                Some(&snapshot),
                &cache,
                &request,
                NOW_MS,
                &mut log,
                &mut MemoryStore::default(),
            ) else {
                panic!("{authority}: expected a refusal");
            };
            let body: serde_json::Value = serde_json::from_str(&reject.body).unwrap_or_default();
            assert_eq!(body["proposal_hint"]["host"], hinted, "{authority}");
            assert_eq!(body["proposal_hint"]["endpoint"], "POST /v1/proposals");
            assert_eq!(log.host, "evil.example.org");
        }
    }

    #[test]
    fn a_tunnel_never_fetches_and_logs_its_service() {
        let snapshot = snapshot();
        let cold = CredentialCache::new(0);
        let auth = basic(ALICE, "");
        let request = Request {
            method: "CONNECT",
            authority: Some("api.github.com:443"),
            proxy_authorization: Some(&auth),
            ..Request::default()
        };
        let mut log = RequestLog::default();
        let decision = decide(
            Some(&snapshot),
            &cold,
            &request,
            NOW_MS,
            &mut log,
            &mut MemoryStore::default(),
        );
        assert!(
            decision.open_host(),
            "a wildcard host counts in the host budget"
        );
        assert_eq!(
            outcome(decision),
            Outcome::Tunnel(identity(ALICE, "default", "api.github.com", 443))
        );
        assert_eq!(log.service.as_deref(), Some("github"));
        assert_eq!(log.host, "api.github.com");
    }

    /// A request inside a tunnel opened by `token` in `vault` to `host`:443, whose
    /// client sent `sni`, for `authority`.
    fn tunnelled<'a>(
        identity: Option<&'a str>,
        sni: Option<&'a str>,
        authority: &'a str,
        proxy_authorization: Option<&'a str>,
    ) -> Request<'a> {
        Request {
            method: "GET",
            authority: Some(authority),
            path: "/v1/charges",
            proxy_authorization,
            x_vault: None,
            tunnel: Some(Tunnelled {
                identity,
                sni,
                tls: true,
            }),
        }
    }

    #[test]
    fn a_rate_limit_counts_each_agent_across_connections_and_tunnels_before_any_fetch() {
        let snapshot = snapshot();
        let cache = warm_cache();
        let mut store = MemoryStore::default();
        let alice = basic(ALICE, "default");
        let bob = basic(BOB, "default");
        let alice_tunnel = identity(ALICE, "default", "limited.example.com", 443);
        let plain = |auth| Request {
            method: "GET",
            authority: Some("limited.example.com"),
            path: "/x",
            proxy_authorization: Some(auth),
            ..Request::default()
        };
        let inside = tunnelled(
            Some(&alice_tunnel),
            Some("limited.example.com"),
            "limited.example.com",
            None,
        );
        let mut run = |request: &Request<'_>, now_ms: u64| {
            let mut log = RequestLog::default();
            let decision = decide(
                Some(&snapshot),
                &cache,
                request,
                now_ms,
                &mut log,
                &mut store,
            );
            (decision, log)
        };
        // Cold key (COLD_KEY): admitted requests fetch; the limit is checked first.
        let (first, _) = run(&plain(&alice), NOW_MS);
        assert_eq!(outcome(first), fetch(&["COLD_KEY"]));
        let (second, _) = run(&inside, NOW_MS + 1);
        assert_eq!(
            outcome(second),
            fetch(&["COLD_KEY"]),
            "a tunnel shares the count"
        );
        let (third, _) = run(&plain(&alice), NOW_MS + 2);
        assert_eq!(outcome(third), fetch(&["COLD_KEY"]));
        for request in [plain(&alice), inside] {
            let (decision, log) = run(&request, NOW_MS + 3);
            let Decision::Reject(reject) = decision else {
                panic!("expected 429, got {decision:?}")
            };
            assert_eq!(reject.code, ErrorCode::RateLimited);
            let retry = (60_000 - (NOW_MS + 3) % 60_000).div_ceil(1000).to_string();
            assert!(
                reject.headers().contains(&("retry-after", retry.as_str())),
                "{:?}",
                reject.headers()
            );
            assert_eq!(log.error, Some(ErrorCode::RateLimited));
            assert_eq!(log.service.as_deref(), Some("limited"));
            assert_eq!(log.host, "limited.example.com");
        }
        let (other_agent, _) = run(&plain(&bob), NOW_MS + 4);
        assert_eq!(
            outcome(other_agent),
            fetch(&["COLD_KEY"]),
            "bob has his own"
        );
        let next_window = NOW_MS - NOW_MS % 60_000 + 60_000;
        let (later, _) = run(&plain(&alice), next_window);
        assert_eq!(outcome(later), fetch(&["COLD_KEY"]), "a new window");
        let (unlimited, _) = run(
            &Request {
                authority: Some("api.stripe.com"),
                ..plain(&alice)
            },
            NOW_MS + 5,
        );
        assert!(matches!(unlimited, Decision::Forward(_)));
        assert_eq!(store.values.len(), 2, "one key per agent and service");
    }

    #[test]
    fn a_vault_wide_limit_counts_every_service_of_the_vault_together() {
        let vault = |name: &str, rate_limit| SnapshotVault {
            name: name.into(),
            unmatched_host_policy: UnmatchedHostPolicy::Deny,
            services: vec![
                service("stripe", "api.stripe.com", bearer("STRIPE_KEY")),
                service("custom", "custom.example.com", bearer("STRIPE_KEY")),
            ],
            passthrough_hosts: vec![],
            rate_limit,
        };
        let snapshot = Rc::new(CompiledSnapshot::new(Snapshot {
            version: "1".into(),
            vaults: vec![
                vault(
                    "default",
                    Some(agent_vault_rules::RateLimit {
                        requests: 2,
                        per: agent_vault_rules::RatePeriod::Second,
                    }),
                ),
                vault("other", None),
            ],
            agents: vec![agent(ALICE, "alice", &["default", "other"], None)],
        }));
        let mut cache = warm_cache();
        cache.insert(
            "other",
            "STRIPE_KEY",
            Some(Secret::new("sk_other".into())),
            NOW_MS,
        );
        let mut store = MemoryStore::default();
        let mut run = |vault: &str, authority: &'static str| {
            let auth = basic(ALICE, vault);
            let request = Request {
                method: "GET",
                authority: Some(authority),
                path: "/x",
                proxy_authorization: Some(&auth),
                ..Request::default()
            };
            decide(
                Some(&snapshot),
                &cache,
                &request,
                NOW_MS,
                &mut RequestLog::default(),
                &mut store,
            )
        };
        assert!(matches!(
            run("default", "api.stripe.com"),
            Decision::Forward(_)
        ));
        assert!(matches!(
            run("default", "custom.example.com"),
            Decision::Forward(_)
        ));
        let Decision::Reject(reject) = run("default", "api.stripe.com") else {
            panic!("the vault's 2 per second are used up");
        };
        assert_eq!(reject.code, ErrorCode::RateLimited);
        let body: serde_json::Value = serde_json::from_str(&reject.body).expect("JSON");
        assert_eq!(body["scope"], "vault");
        assert_eq!(body["limit"]["requests"], 2);
        assert!(
            matches!(run("other", "api.stripe.com"), Decision::Forward(_)),
            "another vault has none"
        );
    }

    #[test]
    fn a_method_the_service_does_not_list_is_logged_with_its_service_and_names_the_list() {
        let snapshot = snapshot();
        let cache = warm_cache();
        let alice = basic(ALICE, "");
        let request = Request {
            method: "PATCH",
            authority: Some("readonly.example.com"),
            path: "/x",
            proxy_authorization: Some(&alice),
            ..Request::default()
        };
        let mut log = RequestLog::default();
        let Decision::Reject(reject) = decide(
            Some(&snapshot),
            &cache,
            &request,
            NOW_MS,
            &mut log,
            &mut MemoryStore::default(),
        ) else {
            panic!("refused")
        };
        assert_eq!(reject.code, ErrorCode::MethodNotAllowedForService);
        let body: serde_json::Value =
            serde_json::from_str(&reject.body).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(body["service"], "readonly");
        assert_eq!(body["method"], "PATCH");
        assert_eq!(body["allowed_methods"], serde_json::json!(["GET", "HEAD"]));
        assert!(!reject.body.contains("sk_test"), "{}", reject.body);
        assert_eq!(log.error, Some(ErrorCode::MethodNotAllowedForService));
        assert_eq!(log.service.as_deref(), Some("readonly"));
        assert_eq!(log.host, "readonly.example.com");
    }

    #[test]
    fn requests_inside_a_tunnel_are_decided_as_the_agent_proven_on_its_connect() {
        let snapshot = snapshot();
        let cache = warm_cache();
        let alice_stripe = identity(ALICE, "default", "api.stripe.com", 443);
        let alice_tls_port = identity(ALICE, "default", "tls.example.com", 8443);
        let alice_off = identity(ALICE, "default", "off.example.com", 443);
        let alice_readonly = identity(ALICE, "default", "readonly.example.com", 443);
        let alice_other = identity(ALICE, "other", "api.stripe.com", 443);
        let bob_open = identity(BOB, "open", "anything.example.org", 443);
        let expired = identity(EXPIRED, "default", "api.stripe.com", 443);
        let revoked = identity("av_agt_revoked", "default", "api.stripe.com", 443);
        let bob_basic = basic(BOB, "other");
        let stripe = || {
            fwd(
                &[("authorization", "Bearer sk_test_abc123")],
                true,
                Some("api.stripe.com:443"),
            )
        };
        let sni = Some("api.stripe.com");
        #[rustfmt::skip]
        let cases: Vec<(&str, Request<'_>, Outcome)> = vec![
            ("injected as for a plain request", tunnelled(Some(&alice_stripe), sni, "api.stripe.com", None), stripe()),
            ("the :authority may name the port", tunnelled(Some(&alice_stripe), sni, "api.stripe.com:443", None), stripe()),
            ("a proxy credential inside the tunnel changes nothing", tunnelled(Some(&alice_stripe), sni, "api.stripe.com", Some(&bob_basic)), stripe()),
            ("a TLS service on its own port keeps it", tunnelled(Some(&alice_tls_port), Some("tls.example.com"), "tls.example.com:8443", None), fwd(&[("authorization", "Bearer sk_test_abc123")], true, None)),
            ("no identity from Envoy is 407", tunnelled(None, sni, "api.stripe.com", Some(&bob_basic)), Outcome::Reject(407, "proxy_auth_required")),
            ("a malformed identity is 407", tunnelled(Some("v1 x default api.stripe.com 443"), sni, "api.stripe.com", None), Outcome::Reject(407, "proxy_auth_required")),
            ("a revoked agent is 407", tunnelled(Some(&revoked), sni, "api.stripe.com", None), Outcome::Reject(407, "invalid_token")),
            ("an agent expired since the CONNECT is 407", tunnelled(Some(&expired), sni, "api.stripe.com", None), Outcome::Reject(407, "invalid_token")),
            ("a vault no longer granted is 403", tunnelled(Some(&alice_other), sni, "api.stripe.com", None), Outcome::Reject(403, "forbidden")),
            ("another host in :authority is 421", tunnelled(Some(&alice_stripe), sni, "api.github.com", None), Outcome::Reject(421, "tunnel_host_mismatch")),
            ("another port in :authority is 421", tunnelled(Some(&alice_stripe), sni, "api.stripe.com:8443", None), Outcome::Reject(421, "tunnel_host_mismatch")),
            ("another host in the SNI is 421", tunnelled(Some(&alice_stripe), Some("api.github.com"), "api.stripe.com", None), Outcome::Reject(421, "tunnel_host_mismatch")),
            ("no SNI is 421", tunnelled(Some(&alice_stripe), None, "api.stripe.com", None), Outcome::Reject(421, "tunnel_host_mismatch")),
            ("no :authority is 400", Request { authority: None, ..tunnelled(Some(&alice_stripe), sni, "", None) }, Outcome::Reject(400, "invalid_request")),
            ("a disabled service is 403", tunnelled(Some(&alice_off), Some("off.example.com"), "off.example.com", None), Outcome::Reject(403, "service_disabled")),
            ("CONNECT inside a tunnel is 405", Request { method: "CONNECT", ..tunnelled(Some(&alice_stripe), sni, "api.stripe.com:443", None) }, Outcome::Reject(405, "connect_not_supported")),
            ("a listed method inside a tunnel is injected", tunnelled(Some(&alice_readonly), Some("readonly.example.com"), "readonly.example.com", None), fwd(&[("authorization", "Bearer sk_test_abc123")], true, Some("readonly.example.com:443"))),
            ("an unlisted method inside a tunnel is 403", Request { method: "POST", ..tunnelled(Some(&alice_readonly), Some("readonly.example.com"), "readonly.example.com", None) }, Outcome::Reject(403, "method_not_allowed_for_service")),
            ("TRACE inside a tunnel is 405", Request { method: "TRACE", ..tunnelled(Some(&alice_stripe), sni, "api.stripe.com", None) }, Outcome::Reject(405, "method_not_allowed")),
            ("unmatched under the passthrough policy goes on over TLS", tunnelled(Some(&bob_open), Some("anything.example.org"), "anything.example.org", None), fwd(&[], true, None)),
        ];
        for (behaviour, request, expected) in cases {
            let mut log = RequestLog::default();
            let decision = decide(
                Some(&snapshot),
                &cache,
                &request,
                NOW_MS,
                &mut log,
                &mut MemoryStore::default(),
            );
            assert_eq!(outcome(decision), expected, "{behaviour}");
        }
        // No snapshot yet: 503, after the identity is read.
        let request = tunnelled(Some(&alice_stripe), sni, "api.stripe.com", None);
        let mut log = RequestLog::default();
        assert_eq!(
            outcome(decide(
                None,
                &cache,
                &request,
                NOW_MS,
                &mut log,
                &mut MemoryStore::default()
            )),
            Outcome::Reject(503, "control_plane_unavailable")
        );
    }

    #[test]
    fn inside_a_tunnel_a_missing_credential_is_502_and_a_cold_cache_fetches_for_the_tunnels_agent()
    {
        let snapshot = snapshot();
        let identity = identity(BOB, "default", "api.stripe.com", 443);
        let request = tunnelled(
            Some(&identity),
            Some("api.stripe.com"),
            "api.stripe.com",
            None,
        );
        let mut log = RequestLog::default();
        let cold = CredentialCache::new(0);
        let Decision::Fetch(plan) = decide(
            Some(&snapshot),
            &cold,
            &request,
            NOW_MS,
            &mut log,
            &mut MemoryStore::default(),
        ) else {
            panic!("expected a fetch");
        };
        assert_eq!(plan.token_sha256, TokenHash::of(BOB).as_str());
        assert_eq!(&*plan.vault, "default");
        assert_eq!(log.agent.as_deref(), Some("bob"));
        let absent = super::tests::identity(BOB, "default", "absent.example.com", 443);
        let request = tunnelled(
            Some(&absent),
            Some("absent.example.com"),
            "absent.example.com",
            None,
        );
        assert_eq!(
            outcome(decide(
                Some(&snapshot),
                &warm_cache(),
                &request,
                NOW_MS,
                &mut log,
                &mut MemoryStore::default()
            )),
            Outcome::Reject(502, "credential_not_found")
        );
    }

    #[test]
    fn a_host_mismatch_inside_a_tunnel_is_logged_with_the_host_asked_for() {
        let snapshot = snapshot();
        let identity = identity(ALICE, "default", "api.stripe.com", 443);
        let request = tunnelled(
            Some(&identity),
            Some("api.stripe.com"),
            "API.github.com",
            None,
        );
        let mut log = RequestLog::default();
        let Decision::Reject(reject) = decide(
            Some(&snapshot),
            &warm_cache(),
            &request,
            NOW_MS,
            &mut log,
            &mut MemoryStore::default(),
        ) else {
            panic!("expected a refusal");
        };
        assert_eq!(log.host, "api.github.com");
        assert_eq!(log.error.map(|e| e.as_str()), Some("tunnel_host_mismatch"));
        let body: serde_json::Value = serde_json::from_str(&reject.body).unwrap_or_default();
        assert_eq!(body["host"], "api.stripe.com:443");
    }

    fn alice_to(authority: &'static str) -> (Request<'static>, String) {
        let auth = basic(ALICE, "");
        (
            Request {
                method: "GET",
                authority: Some(authority),
                path: "/",
                proxy_authorization: None,
                x_vault: None,
                tunnel: None,
            },
            auth,
        )
    }

    #[test]
    fn no_snapshot_yet_is_503_after_the_credential_check() {
        let cache = CredentialCache::new(1000);
        let (mut request, auth) = alice_to("api.stripe.com");
        let mut log = RequestLog::default();
        let no_credential = decide(
            None,
            &cache,
            &request,
            NOW_MS,
            &mut log,
            &mut MemoryStore::default(),
        );
        assert_eq!(
            outcome(no_credential),
            Outcome::Reject(407, "proxy_auth_required")
        );
        request.proxy_authorization = Some(&auth);
        let decision = decide(
            None,
            &cache,
            &request,
            NOW_MS,
            &mut log,
            &mut MemoryStore::default(),
        );
        assert_eq!(
            outcome(decision),
            Outcome::Reject(503, "control_plane_unavailable")
        );
    }

    #[test]
    fn cold_or_stale_cache_fetches() {
        let snapshot = snapshot();
        let (mut request, auth) = alice_to("api.github.com");
        request.proxy_authorization = Some(&auth);
        let mut log = RequestLog::default();
        let empty = CredentialCache::new(60_000);
        let decision = decide(
            Some(&snapshot),
            &empty,
            &request,
            NOW_MS,
            &mut log,
            &mut MemoryStore::default(),
        );
        assert_eq!(outcome(decision), fetch(&["GH_PASS", "GH_USER"]));
        // One key fresh, one stale: still a fetch.
        let mut partly = CredentialCache::new(60_000);
        partly.insert(
            "default",
            "GH_USER",
            Some(Secret::new("octo".into())),
            NOW_MS,
        );
        partly.insert(
            "default",
            "GH_PASS",
            Some(Secret::new("x".into())),
            NOW_MS - 60_000,
        );
        let decision = decide(
            Some(&snapshot),
            &partly,
            &request,
            NOW_MS,
            &mut log,
            &mut MemoryStore::default(),
        );
        assert_eq!(outcome(decision), fetch(&["GH_PASS", "GH_USER"]));
        // A disabled cache always fetches.
        let disabled = CredentialCache::new(0);
        let decision = decide(
            Some(&snapshot),
            &disabled,
            &request,
            NOW_MS,
            &mut log,
            &mut MemoryStore::default(),
        );
        assert!(matches!(decision, Decision::Fetch(_)));
    }

    #[test]
    fn the_log_learns_what_was_resolved() {
        let snapshot = snapshot();
        let cache = warm_cache();
        // (behaviour, proxy auth, authority, agent, vault, host, service)
        type Case<'a> = (
            &'a str,
            Option<String>,
            &'a str,
            &'a str,
            &'a str,
            &'a str,
            Option<&'a str>,
        );
        #[rustfmt::skip]
        let cases: Vec<Case<'_>> = vec![
            ("nothing known without a credential", None, "api.stripe.com", "", "", "", None),
            ("agent only when the vault is not granted", Some(basic(ALICE, "other")), "api.stripe.com", "alice", "", "", None),
            ("a token in the vault slot is not logged", Some(basic(ALICE, BOB)), "api.stripe.com", "alice", "", "", None),
            ("unmatched host", Some(basic(ALICE, "")), "evil.example.org:8080", "alice", "default", "evil.example.org", None),
            ("matched service", Some(basic(ALICE, "")), "API.stripe.com:80", "alice", "default", "api.stripe.com", Some("stripe")),
            ("disabled service", Some(basic(ALICE, "")), "off.example.com", "alice", "default", "off.example.com", Some("off")),
        ];
        for (behaviour, auth, authority, agent, vault, host, service) in cases {
            let request = Request {
                method: "GET",
                authority: Some(authority),
                path: "/",
                proxy_authorization: auth.as_deref(),
                x_vault: None,
                tunnel: None,
            };
            let mut log = RequestLog::default();
            let _ = decide(
                Some(&snapshot),
                &cache,
                &request,
                NOW_MS,
                &mut log,
                &mut MemoryStore::default(),
            );
            assert_eq!(log.agent.as_deref().unwrap_or(""), agent, "{behaviour}");
            assert_eq!(log.vault.as_deref().unwrap_or(""), vault, "{behaviour}");
            assert_eq!(log.host, host, "{behaviour}");
            assert_eq!(log.service.as_deref(), service, "{behaviour}");
        }
    }

    #[test]
    fn refusal_bodies_never_carry_the_token_or_a_value() {
        let snapshot = snapshot();
        let cache = warm_cache();
        let secret_values = ["sk_test_abc123", "hunter2", "k-123", "bad\r\n"];
        for (auth, authority) in [
            (basic(ALICE, BOB), "api.stripe.com"),
            (basic(ALICE, ""), "evil.example.org"),
            (basic(ALICE, ""), "crlf.example.com"),
            (basic(ALICE, ""), "absent.example.com"),
            (format!("Bearer {BOB}"), "api.stripe.com"),
            (basic(EXPIRED, ""), "api.stripe.com"),
        ] {
            let request = Request {
                method: "GET",
                authority: Some(authority),
                path: "/",
                proxy_authorization: Some(&auth),
                x_vault: None,
                tunnel: None,
            };
            let mut log = RequestLog::default();
            let Decision::Reject(reject) = decide(
                Some(&snapshot),
                &cache,
                &request,
                NOW_MS,
                &mut log,
                &mut MemoryStore::default(),
            ) else {
                panic!("{authority}: expected a refusal");
            };
            for token in [ALICE, BOB, EXPIRED] {
                assert!(!reject.body.contains(token), "{}", reject.body);
            }
            for value in secret_values {
                assert!(!reject.body.contains(value), "{}", reject.body);
            }
        }
    }

    #[test]
    fn refusal_messages_say_what_to_do() {
        let snapshot = snapshot();
        let cache = warm_cache();
        let body = |auth: String, authority: &'static str| {
            let request = Request {
                method: "GET",
                authority: Some(authority),
                path: "/",
                proxy_authorization: Some(&auth),
                x_vault: None,
                tunnel: None,
            };
            let mut log = RequestLog::default();
            match decide(
                Some(&snapshot),
                &cache,
                &request,
                NOW_MS,
                &mut log,
                &mut MemoryStore::default(),
            ) {
                Decision::Reject(r) => {
                    serde_json::from_str::<serde_json::Value>(&r.body).unwrap_or_default()
                }
                other => panic!("{other:?}"),
            }
        };
        let forbidden = body(basic(ALICE, "other"), "api.stripe.com");
        assert_eq!(
            forbidden["message"],
            "agent \"alice\" has no access to vault \"other\""
        );
        assert!(forbidden.get("proposal_hint").is_none());
        let required = body(format!("Bearer {BOB}"), "api.stripe.com");
        let message = required["message"].as_str().unwrap_or_default();
        assert!(message.contains("default, open"), "{message}");
        assert!(
            message.contains("http://<agent-token>:<vault>@"),
            "{message}"
        );
        let hint = body(basic(ALICE, ""), "evil.example.org:8080");
        assert_eq!(hint["proposal_hint"]["host"], "evil.example.org:8080");
        assert_eq!(hint["proposal_hint"]["endpoint"], "POST /v1/proposals");
        let hint80 = body(basic(ALICE, ""), "evil.example.org:80");
        assert_eq!(hint80["proposal_hint"]["host"], "evil.example.org");
        let missing = body(basic(ALICE, ""), "absent.example.com");
        assert_eq!(missing["key"], "ABSENT");
        assert!(missing["message"]
            .as_str()
            .unwrap_or_default()
            .contains("\"ABSENT\""));
        let crlf = body(basic(ALICE, ""), "crlf.example.com");
        assert_eq!(crlf["key"], "CRLF");
    }

    #[test]
    fn a_forward_carries_the_values_its_substitutions_and_its_redaction_need() {
        let secrets = |authority: &'static str, cache: &CredentialCache| {
            let auth = basic(ALICE, "default");
            let request = Request {
                method: "GET",
                authority: Some(authority),
                path: "/",
                proxy_authorization: Some(&auth),
                ..Request::default()
            };
            decide(
                Some(&snapshot()),
                cache,
                &request,
                NOW_MS,
                &mut RequestLog::default(),
                &mut MemoryStore::default(),
            )
        };
        // A substitution's key is fetched with the auth's.
        let Decision::Fetch(plan) = secrets("bot.example.com", &warm_cache()) else {
            panic!("the bot token is not cached: expected a fetch");
        };
        assert_eq!(plan.keys(), ["BOT_TOKEN", "STRIPE_KEY"]);
        let Decision::Forward(forward) = plan.finish(
            |key| match key {
                "BOT_TOKEN" => Some("123:abc"),
                "STRIPE_KEY" => Some("sk_test_1"),
                _ => None,
            },
            &[],
        ) else {
            panic!("expected a forward");
        };
        let kept = forward
            .secrets
            .expect("substitution and redaction need values");
        let values = |list: &[Secret]| {
            list.iter()
                .map(|v| v.expose().to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(kept.substitutions.len(), 1);
        assert_eq!(kept.substitutions[0].1.expose(), "123:abc");
        // The 7-byte bot token is substituted but too short to redact.
        assert_eq!(values(&kept.redact), ["sk_test_1", "Bearer sk_test_1"]);
        // A bot token the vault lacks is the 502 of any missing credential.
        let Decision::Reject(reject) = plan.finish(|key| (key == "STRIPE_KEY").then_some("v"), &[])
        else {
            panic!("expected a reject");
        };
        assert_eq!(reject.code, ErrorCode::CredentialNotFound);
        // Redaction off: nothing kept for a service that does not substitute.
        let Decision::Forward(forward) = secrets("echo.example.com", &warm_cache()) else {
            panic!("expected a forward");
        };
        assert!(forward.secrets.is_none());
        // On by default.
        let Decision::Forward(forward) = secrets("api.stripe.com", &warm_cache()) else {
            panic!("expected a forward");
        };
        assert_eq!(values(&forward.secrets.expect("redacts").redact).len(), 2);
    }

    #[test]
    fn finishing_a_fetch() {
        let snapshot = snapshot();
        let (mut request, auth) = alice_to("api.github.com");
        request.proxy_authorization = Some(&auth);
        let mut log = RequestLog::default();
        let cache = CredentialCache::new(0);
        let Decision::Fetch(plan) = decide(
            Some(&snapshot),
            &cache,
            &request,
            NOW_MS,
            &mut log,
            &mut MemoryStore::default(),
        ) else {
            panic!("expected a fetch");
        };
        assert_eq!(plan.token_sha256, TokenHash::of(ALICE).as_str());
        assert_eq!(&*plan.vault, "default");
        let values = BTreeMap::from([("GH_USER", "octo"), ("GH_PASS", "hunter2")]);
        let lookup = |k: &str| values.get(k).copied();
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("octo:hunter2")
        );
        assert_eq!(
            outcome(plan.finish(lookup, &[])),
            fwd(
                &[("authorization", &expected)],
                true,
                Some("api.github.com:443")
            )
        );
        assert_eq!(
            outcome(plan.finish(lookup, &["GH_PASS".to_owned()])),
            Outcome::Reject(502, "credential_not_found")
        );
        let only_user = |k: &str| (k == "GH_USER").then_some("octo");
        assert_eq!(
            outcome(plan.finish(only_user, &[])),
            Outcome::Reject(502, "credential_not_found")
        );
        let colon_user = |k: &str| Some(if k == "GH_USER" { "a:b" } else { "p" });
        assert_eq!(
            outcome(plan.finish(colon_user, &[])),
            Outcome::Reject(502, "invalid_credential_value")
        );
    }
}
