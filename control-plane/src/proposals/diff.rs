//! What approving a proposal would change in its vault, and which of those changes a
//! human must acknowledge before Allow (DESIGN.md §5, invariant 11): a proposal can
//! send a credential that is already in the vault somewhere new without asking for
//! any secret, so the approval page, the CLI and the API show it as the change it is.
//!
//! Warnings (each has a stable `id` the approver acknowledges):
//! - `existing_credential_to_new_host`: a service would send a credential the vault
//!   already holds to a host no service sends it to today;
//! - `host_changed`: an existing service would get another host;
//! - `upstream_tls_off`: an existing service would turn upstream TLS off, or a new one
//!   would send credentials over plain HTTP;
//! - `shadows_service`: a rule would take requests that an existing service serves
//!   today (a more specific host, port or path wins the match);
//! - `agent_value_replaces_credential`: the agent supplied its own value for a key the
//!   vault already holds; it needs acknowledging only when that value is accepted.
//!
//! Pure: computed from the proposal and the vault as it is, for the review, and again
//! inside the approving transaction so what is acknowledged is what is applied.

use std::collections::BTreeSet;

use agent_vault_rules::{HostPattern, Service, ServiceMatcher, ValidationOptions};
use serde::Serialize;

use super::{ProposalAction, ServiceChange, SlotView};

/// The changes of one proposal against its vault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diff {
    pub services: Vec<ServiceDiff>,
    pub credentials: Vec<CredentialDiff>,
    pub warnings: Vec<Warning>,
}

/// What a service looks like, before or after.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceSummary {
    pub host: String,
    pub auth_type: &'static str,
    pub keys: Vec<String>,
    pub upstream_tls: bool,
    /// A plain-HTTP upstream spoken to as HTTP/2 (h2c); absent: HTTP/1.1 (or TLS).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub upstream_h2c: bool,
    pub enabled: bool,
    /// The methods the service forwards; absent: all but TRACE/TRACK.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
    /// The per-agent rate limit; absent: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<agent_vault_rules::RateLimit>,
    /// The placeholders the filter replaces, with their keys and surfaces; absent:
    /// none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub substitutions: Vec<agent_vault_rules::substitution::Substitution>,
    /// Whether responses are redacted (on unless the service turns it off).
    pub redact_responses: bool,
}

impl ServiceSummary {
    fn of(service: &Service) -> ServiceSummary {
        ServiceSummary {
            host: service.host.clone(),
            auth_type: service.auth.type_name(),
            keys: service.credential_keys(),
            upstream_tls: service.upstream_tls,
            upstream_h2c: service.upstream_h2c,
            enabled: service.enabled,
            methods: service.methods.clone(),
            rate_limit: service.rate_limit,
            substitutions: service.substitutions.clone(),
            redact_responses: service.redacts_responses(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum ServiceDiff {
    /// A new service.
    Add { name: String, after: ServiceSummary },
    /// An existing service of that name is replaced.
    Replace {
        name: String,
        before: ServiceSummary,
        after: ServiceSummary,
    },
    /// A service is removed (`before` is `None` when the vault has no such service:
    /// approving then fails and changes nothing).
    Remove {
        name: String,
        before: Option<ServiceSummary>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum CredentialDiff {
    /// A key the vault does not hold yet.
    Add { key: String, from_agent: bool },
    /// A key the vault holds: its value is replaced.
    Overwrite { key: String, from_agent: bool },
    /// A key is deleted (`exists: false`: approving then fails and changes nothing).
    Remove { key: String, exists: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WarningKind {
    ExistingCredentialToNewHost,
    HostChanged,
    UpstreamTlsOff,
    ShadowsService,
    AgentValueReplacesCredential,
}

impl WarningKind {
    fn as_str(self) -> &'static str {
        match self {
            WarningKind::ExistingCredentialToNewHost => "existing_credential_to_new_host",
            WarningKind::HostChanged => "host_changed",
            WarningKind::UpstreamTlsOff => "upstream_tls_off",
            WarningKind::ShadowsService => "shadows_service",
            WarningKind::AgentValueReplacesCredential => "agent_value_replaces_credential",
        }
    }
}

/// A change that can send an existing credential somewhere new.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Warning {
    /// `<kind>:<subject>`: what the approver acknowledges.
    pub id: String,
    pub kind: WarningKind,
    /// One sentence for a human.
    pub message: String,
    /// For `agent_value_replaces_credential`: the key, which needs acknowledging only
    /// when the agent's value is accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl Warning {
    fn new(kind: WarningKind, subject: &str, message: String) -> Warning {
        Warning {
            id: format!("{}:{subject}", kind.as_str()),
            kind,
            message,
            key: None,
        }
    }
}

impl Diff {
    /// The warnings an approval must acknowledge, given the keys whose agent-supplied
    /// value it accepts.
    pub fn required<'a>(
        &'a self,
        accepted_agent_values: &'a BTreeSet<String>,
    ) -> impl Iterator<Item = &'a Warning> {
        self.warnings
            .iter()
            .filter(move |warning| match &warning.key {
                Some(key) => accepted_agent_values.contains(key),
                None => true,
            })
    }
}

/// Applies a proposal's service changes to `services` (a `set` replaces the service of
/// its name in place, or appends; a `delete` removes it). Returns the services the
/// proposal sets, or why the changes cannot apply.
pub fn merge_services(
    services: &mut Vec<Service>,
    changes: &[ServiceChange],
    vault: &str,
) -> Result<Vec<Service>, String> {
    let mut set = Vec::new();
    for change in changes {
        match change.action {
            ProposalAction::Set => {
                let Some(service) = change.service() else {
                    return Err(format!("service {:?} has no host or auth", change.name));
                };
                match services.iter_mut().find(|s| s.name == service.name) {
                    Some(existing) => *existing = service.clone(),
                    None => services.push(service.clone()),
                }
                set.push(service);
            }
            ProposalAction::Delete => {
                let before = services.len();
                services.retain(|s| s.name != change.name);
                if services.len() == before {
                    return Err(format!(
                        "service {:?} is not in vault \"{vault}\"",
                        change.name
                    ));
                }
            }
        }
    }
    Ok(set)
}

/// The diff of a proposal (`services`, `slots`) against a vault's `current` services
/// and the keys it holds (`exists`).
pub fn diff(
    services: &[ServiceChange],
    slots: &[SlotView],
    current: &[Service],
    exists: impl Fn(&str) -> bool,
) -> Diff {
    let mut warnings = Vec::new();
    let mut service_diffs = Vec::new();
    for change in services {
        let before = current.iter().find(|s| s.name == change.name);
        match (change.action, change.service()) {
            (ProposalAction::Set, Some(after)) => {
                service_change_warnings(&after, before, current, &exists, &mut warnings);
                service_diffs.push(match before {
                    Some(before) => ServiceDiff::Replace {
                        name: change.name.clone(),
                        before: ServiceSummary::of(before),
                        after: ServiceSummary::of(&after),
                    },
                    None => ServiceDiff::Add {
                        name: change.name.clone(),
                        after: ServiceSummary::of(&after),
                    },
                });
            }
            // An incomplete `set` never passes validation; nothing to show.
            (ProposalAction::Set, None) => {}
            (ProposalAction::Delete, _) => service_diffs.push(ServiceDiff::Remove {
                name: change.name.clone(),
                before: before.map(ServiceSummary::of),
            }),
        }
    }
    warnings.extend(shadow_warnings(services, current));

    let mut credential_diffs = Vec::new();
    for slot in slots {
        let key = slot.key.clone();
        match slot.action {
            ProposalAction::Set if exists(&slot.key) => {
                if slot.has_value {
                    warnings.push(agent_value_warning(&slot.key, current));
                }
                credential_diffs.push(CredentialDiff::Overwrite {
                    key,
                    from_agent: slot.has_value,
                });
            }
            ProposalAction::Set => credential_diffs.push(CredentialDiff::Add {
                key,
                from_agent: slot.has_value,
            }),
            ProposalAction::Delete => credential_diffs.push(CredentialDiff::Remove {
                exists: exists(&slot.key),
                key,
            }),
        }
    }
    Diff {
        services: service_diffs,
        credentials: credential_diffs,
        warnings,
    }
}

/// `stripe → api.stripe.com, billing → billing.example.com` for the services using
/// `key`, or "no service" when none does.
fn users_of(key: &str, current: &[Service]) -> String {
    let users: Vec<String> = current
        .iter()
        .filter(|s| s.credential_keys().iter().any(|k| k == key))
        .map(|s| format!("{} → {}", s.name, s.host))
        .collect();
    if users.is_empty() {
        "no service".to_string()
    } else {
        users.join(", ")
    }
}

fn service_change_warnings(
    after: &Service,
    before: Option<&Service>,
    current: &[Service],
    exists: &impl Fn(&str) -> bool,
    warnings: &mut Vec<Warning>,
) {
    let keys = after.credential_keys();
    let name = &after.name;
    let new_host = pattern(after).map(|p| probes(&p).0);
    for key in &keys {
        // Some service sends the key to this host name today (any port or path): not
        // a new host. The shadow and TLS warnings cover other ports and paths.
        let covered = current.iter().any(|s| {
            s.credential_keys().contains(key)
                && match (pattern(s), &new_host) {
                    (Some(old), Some(host)) => serves_host(&old, host),
                    _ => s.host == after.host,
                }
        });
        if exists(key) && !covered {
            warnings.push(Warning::new(
                WarningKind::ExistingCredentialToNewHost,
                &format!("{key}@{}", after.host),
                format!(
                    "credential {key}, already in the vault, would be sent to {}, a host no \
                     service sends it to today (today: {})",
                    after.host,
                    users_of(key, current)
                ),
            ));
        }
    }
    let sends = if keys.is_empty() {
        String::new()
    } else {
        format!(" with {}", keys.join(", "))
    };
    match before {
        Some(before) => {
            if before.host != after.host {
                warnings.push(Warning::new(
                    WarningKind::HostChanged,
                    name,
                    format!(
                        "service {name} would move from {} to {}: its requests{sends} would go \
                         to the new host",
                        before.host, after.host
                    ),
                ));
            }
            if before.upstream_tls && !after.upstream_tls {
                warnings.push(Warning::new(
                    WarningKind::UpstreamTlsOff,
                    name,
                    format!(
                        "service {name} would turn upstream TLS off: its requests{sends} would \
                         cross the network in plain HTTP"
                    ),
                ));
            }
        }
        None if !after.upstream_tls && !keys.is_empty() => {
            warnings.push(Warning::new(
                WarningKind::UpstreamTlsOff,
                name,
                format!(
                    "new service {name} has upstream TLS off: its requests{sends} would cross \
                     the network in plain HTTP"
                ),
            ));
        }
        None => {}
    }
}

fn agent_value_warning(key: &str, current: &[Service]) -> Warning {
    let mut warning = Warning::new(
        WarningKind::AgentValueReplacesCredential,
        key,
        format!(
            "the agent supplied its own value for {key}, which the vault already holds: \
             accepting it replaces the value that every service using {key} sends (today: {})",
            users_of(key, current)
        ),
    );
    warning.key = Some(key.to_string());
    warning
}

/// Analysis only: parses whatever the vault holds, private hosts included.
fn pattern(service: &Service) -> Option<HostPattern> {
    let options = ValidationOptions {
        allow_private_upstreams: true,
    };
    HostPattern::parse(&service.host, &options).ok()
}

/// Whether `pattern` covers the host name `host` (its own port and path aside).
fn serves_host(pattern: &HostPattern, host: &str) -> bool {
    let port = pattern.port.unwrap_or(443);
    let path = pattern.path.as_ref().map_or("/", |p| p.prefix.as_str());
    pattern.matches(host, port, path)
}

/// Requests a pattern stands for: its host (a wildcard with one label filled in), its
/// port or the default ports, its path prefix or `/`.
fn probes(pattern: &HostPattern) -> (String, Vec<u16>, String) {
    let host = if pattern.wildcard {
        format!("shadow-probe.{}", pattern.host)
    } else {
        pattern.host.clone()
    };
    let ports = match pattern.port {
        Some(port) => vec![port],
        None => vec![80, 443],
    };
    let path = pattern
        .path
        .as_ref()
        .map_or("/".to_string(), |p| p.prefix.clone());
    (host, ports, path)
}

/// For each rule the proposal sets and each existing service it does not change: is
/// there a request the existing service serves today that the new rule would take?
/// The same matcher the filter uses decides, before and after.
fn shadow_warnings(changes: &[ServiceChange], current: &[Service]) -> Vec<Warning> {
    let mut merged = current.to_vec();
    // A delete of a missing service only makes the approval fail; the rest still tells.
    let applicable: Vec<ServiceChange> = changes
        .iter()
        .filter(|c| c.action == ProposalAction::Set || current.iter().any(|s| s.name == c.name))
        .cloned()
        .collect();
    if merge_services(&mut merged, &applicable, "").is_err() {
        return Vec::new();
    }
    let changed: BTreeSet<&str> = changes.iter().map(|c| c.name.as_str()).collect();
    let before = ServiceMatcher::new(current);
    let after = ServiceMatcher::new(&merged);
    let mut warnings = Vec::new();
    for new in changes.iter().filter_map(ServiceChange::service) {
        let Some(new_pattern) = pattern(&new) else {
            continue;
        };
        let new_index = merged.iter().position(|s| s.name == new.name);
        for (old_index, old) in current.iter().enumerate() {
            if changed.contains(old.name.as_str()) {
                continue;
            }
            let Some(old_pattern) = pattern(old) else {
                continue;
            };
            let (new_host, new_ports, new_path) = probes(&new_pattern);
            let (old_host, old_ports, old_path) = probes(&old_pattern);
            let hosts = [new_host, old_host];
            let ports: BTreeSet<u16> = new_ports.into_iter().chain(old_ports).collect();
            let paths = [new_path, old_path, "/".to_string()];
            let taken = hosts.iter().find_map(|host| {
                ports.iter().find_map(|port| {
                    paths.iter().find_map(|path| {
                        let shadowed = before.find(host, *port, path) == Some(old_index)
                            && after.find(host, *port, path) == new_index;
                        shadowed.then(|| format!("{host}:{port}{path}"))
                    })
                })
            });
            if let Some(request) = taken {
                warnings.push(Warning::new(
                    WarningKind::ShadowsService,
                    &format!("{}>{}", new.name, old.name),
                    format!(
                        "rule {} ({}) would take requests such as {request} that service {} ({}) \
                         serves today",
                        new.name, new.host, old.name, old.host
                    ),
                ));
            }
        }
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_vault_rules::Auth;

    fn service(name: &str, host: &str, key: &str, tls: bool) -> Service {
        Service {
            name: name.into(),
            host: host.into(),
            enabled: true,
            auth: Auth::Bearer { token: key.into() },
            upstream_tls: tls,
            methods: None,
            rate_limit: None,
            substitutions: Vec::new(),
            redact_responses: None,
            upstream_h2c: false,
        }
    }

    fn set(name: &str, host: &str, key: &str, tls: bool) -> ServiceChange {
        ServiceChange {
            action: ProposalAction::Set,
            name: name.into(),
            host: Some(host.into()),
            auth: Some(Auth::Bearer { token: key.into() }),
            enabled: None,
            upstream_tls: Some(tls),
            upstream_h2c: None,
            catalog: None,
            methods: None,
            rate_limit: None,
            substitutions: None,
            redact_responses: None,
        }
    }

    fn slot(key: &str, from_agent: bool) -> SlotView {
        SlotView {
            action: ProposalAction::Set,
            key: key.into(),
            description: None,
            obtain: None,
            obtain_instructions: None,
            has_value: from_agent,
        }
    }

    fn vault() -> Vec<Service> {
        vec![
            service("stripe", "api.stripe.com", "STRIPE_KEY", true),
            service("echo", "echo.example.com", "ECHO_TOKEN", true),
        ]
    }

    fn held(key: &str) -> bool {
        matches!(key, "STRIPE_KEY" | "ECHO_TOKEN")
    }

    fn kinds(diff: &Diff) -> Vec<(WarningKind, &str)> {
        diff.warnings
            .iter()
            .map(|w| (w.kind, w.id.split_once(':').map_or("", |(_, s)| s)))
            .collect()
    }

    #[test]
    fn each_risky_change_is_warned_about_and_harmless_ones_are_not() {
        use WarningKind::*;
        type Case = (
            &'static str,
            Vec<ServiceChange>,
            Vec<SlotView>,
            Vec<(WarningKind, &'static str)>,
        );
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            ("a new service with a new key and its own slot",
                vec![set("github", "api.github.com", "GH_TOKEN", true)], vec![slot("GH_TOKEN", false)], vec![]),
            ("an existing key bound to a new host",
                vec![set("metrics", "collector.attacker.example", "STRIPE_KEY", true)], vec![],
                vec![(ExistingCredentialToNewHost, "STRIPE_KEY@collector.attacker.example")]),
            ("a second service for a host that already gets the key",
                vec![set("stripe-v2", "api.stripe.com/v2/*", "STRIPE_KEY", true)], vec![],
                vec![(ShadowsService, "stripe-v2>stripe")]),
            ("an existing service moved to another host",
                vec![set("echo", "echo.attacker.example", "ECHO_TOKEN", true)], vec![],
                vec![(ExistingCredentialToNewHost, "ECHO_TOKEN@echo.attacker.example"), (HostChanged, "echo")]),
            ("an existing service with TLS turned off",
                vec![set("echo", "echo.example.com", "ECHO_TOKEN", false)], vec![], vec![(UpstreamTlsOff, "echo")]),
            ("a new plain-HTTP service that carries a credential",
                vec![set("plain", "plain.example.com", "NEW_KEY", false)], vec![slot("NEW_KEY", false)],
                vec![(UpstreamTlsOff, "plain")]),
            ("a plain rule on port 80 in front of a TLS service",
                vec![set("stripe-plain", "api.stripe.com:80", "STRIPE_KEY", false)], vec![],
                vec![(UpstreamTlsOff, "stripe-plain"), (ShadowsService, "stripe-plain>stripe")]),
            ("the agent's own value for a key the vault holds",
                vec![], vec![slot("STRIPE_KEY", true)], vec![(AgentValueReplacesCredential, "STRIPE_KEY")]),
            ("a human-typed value for a key the vault holds",
                vec![], vec![slot("STRIPE_KEY", false)], vec![]),
            ("replacing a service with itself",
                vec![set("stripe", "api.stripe.com", "STRIPE_KEY", true)], vec![], vec![]),
        ];
        for (behaviour, services, slots, expected) in cases {
            let diff = diff(&services, &slots, &vault(), held);
            assert_eq!(kinds(&diff), expected, "{behaviour}: {:#?}", diff.warnings);
        }
    }

    #[test]
    fn an_exact_host_shadows_a_wildcard_and_a_wildcard_over_an_exact_host_is_a_new_host() {
        let current = vec![service("gh", "*.github.com", "GH", true)];
        let exact = diff(
            &[set("api", "api.github.com", "GH", true)],
            &[],
            &current,
            |_| true,
        );
        assert_eq!(kinds(&exact), [(WarningKind::ShadowsService, "api>gh")]);
        let current = vec![service("api", "api.github.com", "GH", true)];
        let wildcard = diff(
            &[set("gh", "*.github.com", "GH", true)],
            &[],
            &current,
            |_| true,
        );
        assert_eq!(
            kinds(&wildcard),
            [(WarningKind::ExistingCredentialToNewHost, "GH@*.github.com")]
        );
    }

    #[test]
    fn the_diff_names_what_is_added_replaced_and_removed() {
        let mut delete = set("echo", "", "", true);
        delete.action = ProposalAction::Delete;
        delete.host = None;
        delete.auth = None;
        let mut gone = delete.clone();
        gone.name = "missing".into();
        let diff = diff(
            &[
                set("stripe", "api.stripe.com", "STRIPE_KEY", true),
                delete,
                gone,
            ],
            &[slot("NEW", false), slot("STRIPE_KEY", false)],
            &vault(),
            held,
        );
        assert!(matches!(&diff.services[0], ServiceDiff::Replace { name, .. } if name == "stripe"));
        assert!(
            matches!(&diff.services[1], ServiceDiff::Remove { name, before: Some(_) } if name == "echo")
        );
        assert!(matches!(
            &diff.services[2],
            ServiceDiff::Remove { before: None, .. }
        ));
        assert_eq!(
            diff.credentials,
            [
                CredentialDiff::Add {
                    key: "NEW".into(),
                    from_agent: false
                },
                CredentialDiff::Overwrite {
                    key: "STRIPE_KEY".into(),
                    from_agent: false
                }
            ]
        );
    }

    #[test]
    fn a_rate_limit_change_shows_in_the_before_and_after() {
        let mut limited = set("stripe", "api.stripe.com", "STRIPE_KEY", true);
        limited.rate_limit = Some(agent_vault_rules::RateLimit {
            requests: 10,
            per: agent_vault_rules::RatePeriod::Second,
        });
        let diff = diff(&[limited], &[], &vault(), held);
        let ServiceDiff::Replace { before, after, .. } = &diff.services[0] else {
            panic!("{:?}", diff.services)
        };
        assert_eq!(before.rate_limit, None);
        assert_eq!(
            after.rate_limit.map(|l| l.to_string()).as_deref(),
            Some("10/s")
        );
        let json = serde_json::to_value(&diff.services[0]).unwrap_or_default();
        assert_eq!(
            json["after"]["rate_limit"],
            serde_json::json!({"requests": 10, "per": "second"})
        );
        assert!(json["before"].get("rate_limit").is_none(), "{json}");
    }

    #[test]
    fn a_substitution_and_redaction_change_shows_in_the_before_and_after() {
        let mut in_path = set("telegram", "api.telegram.org", "TELEGRAM_BOT_TOKEN", true);
        in_path.auth = Some(Auth::Passthrough {});
        in_path.substitutions = Some(vec![serde_json::from_value(serde_json::json!(
            {"key": "BOT_TOKEN", "placeholder": "__BOT_TOKEN__", "in": ["path", "query"]}
        ))
        .unwrap_or_else(|e| panic!("{e}"))]);
        in_path.redact_responses = Some(false);
        let mut before_service =
            service("telegram", "api.telegram.org", "TELEGRAM_BOT_TOKEN", true);
        before_service.auth = Auth::Passthrough {};
        let diff = diff(&[in_path], &[], &[before_service], held);
        let ServiceDiff::Replace { before, after, .. } = &diff.services[0] else {
            panic!("{:?}", diff.services)
        };
        assert!(before.substitutions.is_empty() && before.redact_responses);
        assert!(!after.redact_responses);
        // The substitution's key is one of the service's keys.
        assert_eq!(after.keys, vec!["BOT_TOKEN".to_owned()]);
        let json = serde_json::to_value(&diff.services[0]).unwrap_or_default();
        assert_eq!(
            json["after"]["substitutions"],
            serde_json::json!([{"key": "BOT_TOKEN", "placeholder": "__BOT_TOKEN__", "in": ["path", "query"]}])
        );
        assert_eq!(json["after"]["redact_responses"], false);
        assert!(json["before"].get("substitutions").is_none(), "{json}");
        assert_eq!(json["before"]["redact_responses"], true);
    }

    #[test]
    fn an_h2c_change_shows_in_the_after_and_is_left_out_when_off() {
        let mut h2c = set("grpc", "grpc.example.com:50051", "GRPC_KEY", false);
        h2c.upstream_h2c = Some(true);
        let before_service = service("grpc", "grpc.example.com:50051", "GRPC_KEY", false);
        let diff = diff(&[h2c], &[], &[before_service], held);
        let ServiceDiff::Replace { before, after, .. } = &diff.services[0] else {
            panic!("{:?}", diff.services)
        };
        assert!(!before.upstream_h2c && after.upstream_h2c);
        let json = serde_json::to_value(&diff.services[0]).unwrap_or_default();
        assert_eq!(json["after"]["upstream_h2c"], true, "{json}");
        assert!(json["before"].get("upstream_h2c").is_none(), "{json}");
        // The protocol is shown, not warned about: TLS was already off.
        assert!(diff.warnings.is_empty(), "{:?}", diff.warnings);
    }

    #[test]
    fn a_methods_change_shows_in_the_before_and_after() {
        let mut only_get = set("stripe", "api.stripe.com", "STRIPE_KEY", true);
        only_get.methods = Some(vec!["GET".into()]);
        let diff = diff(&[only_get], &[], &vault(), held);
        let ServiceDiff::Replace { before, after, .. } = &diff.services[0] else {
            panic!("{:?}", diff.services)
        };
        assert_eq!(before.methods, None);
        assert_eq!(after.methods.as_deref(), Some(&["GET".to_owned()][..]));
        let json = serde_json::to_value(&diff.services[0]).unwrap_or_default();
        assert_eq!(json["after"]["methods"], serde_json::json!(["GET"]));
        assert!(json["before"].get("methods").is_none(), "{json}");
        assert!(diff.warnings.is_empty(), "{:?}", diff.warnings);
    }

    #[test]
    fn an_agent_value_warning_is_required_only_when_the_value_is_accepted() {
        let diff = diff(&[], &[slot("STRIPE_KEY", true)], &vault(), held);
        assert_eq!(diff.required(&BTreeSet::new()).count(), 0);
        let accepted = BTreeSet::from(["STRIPE_KEY".to_string()]);
        assert_eq!(diff.required(&accepted).count(), 1);
    }
}
