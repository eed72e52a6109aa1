//! What to do with one request: refuse it, forward it (with credentials injected), or
//! fetch credentials first. Pure: the driver reads the request headers, calls
//! [`decide`], and carries out the [`Decision`] (see [`crate::driver`]).
//!
//! The steps, in order (each refusal is a row of DESIGN.md §6):
//! 1. `CONNECT` → 405 `connect_not_supported`; `TRACE`/`TRACK` → 405
//!    `method_not_allowed` (no callout).
//! 2. Proxy credential from `Proxy-Authorization` → else 407 `proxy_auth_required`.
//! 3. No snapshot yet → 503 `control_plane_unavailable`.
//! 4. `sha256(token)` → agent → else 407 `invalid_token` (also when expired).
//! 5. Vault: named (credential, else `X-Vault`), else the agent's only vault →
//!    400 `vault_required` / 403 `forbidden`.
//! 6. `:authority` + `:path` → service → 400 `invalid_request`; no match: policy
//!    `passthrough` forwards without credentials, `deny` → 403 with `proposal_hint`.
//! 7. Disabled → 403 `service_disabled`; auth rule broken → 502 `invalid_service`.
//! 8. Keys all fresh in the cache → render and forward; a key known missing → 502
//!    `credential_not_found`; else fetch.
//!
//! The cached path allocates only the normalized host and the rendered headers.

use std::rc::Rc;

use agent_vault_rules::proxy_auth::{self, DECODE_BUFFER_LEN};
use agent_vault_rules::reply::{self, Reject};
use agent_vault_rules::{normalize_authority, CompiledAuth, UnmatchedHostPolicy};

use crate::cache::{Cached, CredentialCache};
use crate::request_log::RequestLog;
use crate::snapshot::{CompiledSnapshot, CompiledVault, TokenHash};

pub use agent_vault_rules::reply::DEFAULT_PORT;
/// Port of TLS upstreams whose host pattern names none.
pub const TLS_PORT: u16 = 443;

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

/// How to forward a request. Always: remove `proxy-authorization`, `x-vault`, the TLS
/// routing header and every header in `inject` (by lowercase name, so any case); then
/// set `inject`, the TLS routing header, and `:authority` if `authority` is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// Headers to set (lowercase names): the service's auth headers, rendered.
    pub inject: Vec<(String, String)>,
    /// Route to the TLS-originating cluster.
    pub upstream_tls: bool,
    /// New `:authority` (`<host>:443` for TLS services without an explicit port).
    pub authority: Option<String>,
    /// The host is one the agent chose, not one a service names exactly: a wildcard
    /// match or the `passthrough` policy ([`crate::host_budget`]).
    pub open_host: bool,
}

impl Forward {
    /// Forward with credentials removed and nothing injected, over plain HTTP, to a
    /// host the agent chose (the `passthrough` policy).
    pub fn untouched() -> Forward {
        Forward {
            inject: Vec::new(),
            upstream_tls: false,
            authority: None,
            open_host: true,
        }
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
    /// Route to the TLS-originating cluster.
    pub upstream_tls: bool,
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

    fn service_name(&self) -> &str {
        self.snapshot
            .vault(&self.vault)
            .and_then(|v| v.services.get(self.service))
            .map_or("", |s| &*s.name)
    }

    /// The credential keys to fetch, sorted and deduplicated.
    pub fn keys(&self) -> &[String] {
        self.auth().map(CompiledAuth::keys).unwrap_or_default()
    }

    /// Finishes the request with fetched values: any needed key missing → 502
    /// `credential_not_found`; else render and forward.
    pub fn finish<'v>(
        &self,
        lookup: impl Fn(&str) -> Option<&'v str>,
        missing: &[String],
    ) -> Decision {
        let Some(auth) = self.auth() else {
            // Cannot happen: a plan is only made for a compiled auth.
            return Decision::Reject(reply::invalid_service(
                &self.vault,
                self.service_name(),
                "not compiled",
            ));
        };
        if let Some(key) = auth
            .keys()
            .iter()
            .find(|k| missing.contains(k) || lookup(k).is_none())
        {
            return Decision::Reject(reply::credential_not_found(&self.vault, key));
        }
        render(
            auth,
            lookup,
            (&self.vault, self.service_name()),
            (self.upstream_tls, self.open_host),
            self.authority.clone(),
        )
    }
}

/// Renders a service's headers into a [`Forward`]; the names are (vault, service),
/// the flags (upstream TLS, open host).
fn render<'v>(
    auth: &CompiledAuth,
    lookup: impl Fn(&str) -> Option<&'v str>,
    (vault, service): (&str, &str),
    (upstream_tls, open_host): (bool, bool),
    authority: Option<String>,
) -> Decision {
    match auth.render(lookup) {
        Ok(inject) => Decision::Forward(Forward {
            inject,
            upstream_tls,
            authority,
            open_host,
        }),
        Err(error) => Decision::Reject(reply::render_failed(vault, service, &error)),
    }
}

/// Decides what to do with `request` at `now_ms`, recording what it learns (agent,
/// vault, host, service, error) in `log`.
pub fn decide(
    snapshot: Option<&Rc<CompiledSnapshot>>,
    cache: &CredentialCache,
    request: &Request<'_>,
    now_ms: u64,
    log: &mut RequestLog,
) -> Decision {
    let decision = decide_inner(snapshot, cache, request, now_ms, log);
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
) -> Decision {
    use Decision::Reject as R;

    // 1. CONNECT: nothing could be injected into an opaque tunnel.
    if request.method.eq_ignore_ascii_case("CONNECT") {
        if let Some((host, _)) = request.authority.and_then(|a| normalize_authority(a, 443)) {
            log.host = host;
        }
        return R(reply::connect_not_supported());
    }
    // An upstream that implements TRACE echoes the injected credential back.
    if reply::is_refused_method(request.method) {
        return R(reply::method_not_allowed(request.method));
    }

    // 2. Proxy credential.
    let mut buffer = [0u8; DECODE_BUFFER_LEN];
    let credential = match proxy_auth::parse(request.proxy_authorization, &mut buffer) {
        Ok(credential) => credential,
        Err(error) => return R(reply::proxy_auth_required(error.reason())),
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

    // 5. Vault.
    let vault: &CompiledVault = match reply::choose_vault(&agent.name, &agent.vaults, named_vault) {
        Ok(name) => match snapshot.vault(name) {
            Some(vault) => vault,
            None => return R(reply::vault_forbidden(&agent.name, Some(name))),
        },
        Err(reject) => return R(reject),
    };
    log.vault = Some(Rc::clone(&vault.name));

    // 6. Service.
    let Some((host, port)) = request
        .authority
        .and_then(|a| normalize_authority(a, DEFAULT_PORT))
    else {
        return R(reply::invalid_request());
    };
    let found = vault.matcher.find(&host, port, request.path);
    let index = match found {
        Some(index) => index,
        None => {
            let decision = match vault.policy {
                UnmatchedHostPolicy::Passthrough => Decision::Forward(Forward::untouched()),
                UnmatchedHostPolicy::Deny => R(reply::no_service(&vault.name, &host, port)),
            };
            log.host = host;
            return decision;
        }
    };
    let (Some(service), Some(auth)) = (vault.services.get(index), vault.matcher.auth(index)) else {
        log.host = host;
        return R(reply::invalid_service(&vault.name, "", "not indexed"));
    };
    log.service = Some(Rc::clone(&service.name));

    // 7. Service state.
    if !service.enabled {
        log.host = host;
        return R(reply::service_disabled(&vault.name, &service.name));
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

    // 8. Credentials.
    let pattern = vault.matcher.pattern(index);
    let explicit_port = pattern.and_then(|p| p.port).is_some();
    let open_host = pattern.is_some_and(|p| p.wildcard);
    let authority = (service.upstream_tls && !explicit_port).then(|| format!("{host}:{TLS_PORT}"));
    log.host = host;
    let mut complete = true;
    for key in auth.keys() {
        match cache.get(&vault.name, key, now_ms) {
            Cached::Value(_) => {}
            Cached::Missing => return R(reply::credential_not_found(&vault.name, key)),
            Cached::Unknown => complete = false,
        }
    }
    if !complete {
        return Decision::Fetch(FetchPlan {
            snapshot: Rc::clone(snapshot),
            vault: Rc::clone(&vault.name),
            service: index,
            token_sha256: token_hash.as_str().to_owned(),
            upstream_tls: service.upstream_tls,
            authority,
            open_host,
        });
    }
    let lookup = |key: &str| match cache.get(&vault.name, key, now_ms) {
        Cached::Value(value) => Some(value),
        Cached::Missing | Cached::Unknown => None,
    };
    render(
        auth,
        lookup,
        (&vault.name, &service.name),
        (service.upstream_tls, open_host),
        authority,
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cache::Secret;
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

    fn service(name: &str, host: &str, auth: Auth) -> Service {
        Service {
            name: name.into(),
            host: host.into(),
            enabled: true,
            auth,
            upstream_tls: true,
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
                    ],
                },
                SnapshotVault {
                    name: "open".into(),
                    unmatched_host_policy: UnmatchedHostPolicy::Passthrough,
                    services: vec![],
                },
                SnapshotVault {
                    name: "other".into(),
                    unmatched_host_policy: UnmatchedHostPolicy::Deny,
                    services: vec![service("stripe", "api.stripe.com", bearer("STRIPE_KEY"))],
                },
            ],
            agents: vec![
                agent(ALICE, "alice", &["default"], None),
                agent(BOB, "bob", &["default", "open"], Some(2_000_000_000)),
                agent(EXPIRED, "old", &["default"], Some(1_600_000_000)),
                agent(LONELY, "lonely", &[], None),
                agent(ORPHAN, "orphan", &["deleted-vault"], None),
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
    }

    fn outcome(decision: Decision) -> Outcome {
        match decision {
            Decision::Reject(r) => Outcome::Reject(r.status(), r.code.as_str()),
            Decision::Forward(f) => Outcome::Forward(f.inject, f.upstream_tls, f.authority),
            Decision::Fetch(plan) => Outcome::Fetch(plan.keys().to_vec()),
        }
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
                method: "CONNECT",
                path: "",
                ..get(
                    "CONNECT is refused without a callout",
                    alice(),
                    "api.stripe.com:443",
                    Outcome::Reject(405, "connect_not_supported"),
                )
            },
            Case {
                method: "CONNECT",
                path: "",
                ..get(
                    "CONNECT is refused even without credentials",
                    None,
                    "api.stripe.com:443",
                    Outcome::Reject(405, "connect_not_supported"),
                )
            },
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
        // Step 3 and a cold cache are checked below with another snapshot/cache.
        for case in cases.drain(..) {
            let request = Request {
                method: case.method,
                authority: case.authority,
                path: case.path,
                proxy_authorization: case.proxy_authorization.as_deref(),
                x_vault: case.x_vault,
            };
            let mut log = RequestLog::default();
            let decision = decide(Some(&snapshot), &cache, &request, NOW_MS, &mut log);
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

    fn alice_to(authority: &'static str) -> (Request<'static>, String) {
        let auth = basic(ALICE, "");
        (
            Request {
                method: "GET",
                authority: Some(authority),
                path: "/",
                proxy_authorization: None,
                x_vault: None,
            },
            auth,
        )
    }

    #[test]
    fn no_snapshot_yet_is_503_after_the_credential_check() {
        let cache = CredentialCache::new(1000);
        let (mut request, auth) = alice_to("api.stripe.com");
        let mut log = RequestLog::default();
        let no_credential = decide(None, &cache, &request, NOW_MS, &mut log);
        assert_eq!(
            outcome(no_credential),
            Outcome::Reject(407, "proxy_auth_required")
        );
        request.proxy_authorization = Some(&auth);
        let decision = decide(None, &cache, &request, NOW_MS, &mut log);
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
        let decision = decide(Some(&snapshot), &empty, &request, NOW_MS, &mut log);
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
        let decision = decide(Some(&snapshot), &partly, &request, NOW_MS, &mut log);
        assert_eq!(outcome(decision), fetch(&["GH_PASS", "GH_USER"]));
        // A disabled cache always fetches.
        let disabled = CredentialCache::new(0);
        let decision = decide(Some(&snapshot), &disabled, &request, NOW_MS, &mut log);
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
            };
            let mut log = RequestLog::default();
            let _ = decide(Some(&snapshot), &cache, &request, NOW_MS, &mut log);
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
            };
            let mut log = RequestLog::default();
            let Decision::Reject(reject) =
                decide(Some(&snapshot), &cache, &request, NOW_MS, &mut log)
            else {
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
            };
            let mut log = RequestLog::default();
            match decide(Some(&snapshot), &cache, &request, NOW_MS, &mut log) {
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
    fn finishing_a_fetch() {
        let snapshot = snapshot();
        let (mut request, auth) = alice_to("api.github.com");
        request.proxy_authorization = Some(&auth);
        let mut log = RequestLog::default();
        let cache = CredentialCache::new(0);
        let Decision::Fetch(plan) = decide(Some(&snapshot), &cache, &request, NOW_MS, &mut log)
        else {
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
