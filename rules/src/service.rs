//! A vault's service rules: which host gets which auth.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::auth::Auth;
use crate::error::RuleError;
use crate::host::{HostPattern, ValidationOptions};
use crate::names::validate_service_name;

/// One service rule of a vault (DESIGN.md §5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// Unique within the vault, `^[a-z0-9][a-z0-9._-]{0,62}$`.
    pub name: String,
    /// Host pattern, see [`HostPattern`].
    pub host: String,
    /// A disabled service still matches, and the filter answers 403 `service_disabled`.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// What to inject.
    pub auth: Auth,
    /// Envoy connects to the upstream over TLS (port 443 unless the host names one).
    #[serde(default = "default_true")]
    pub upstream_tls: bool,
}

fn default_true() -> bool {
    true
}

impl Service {
    /// Checks the name, the host pattern and the auth block.
    pub fn validate(&self, options: &ValidationOptions) -> Result<(), RuleError> {
        validate_service_name(&self.name)?;
        HostPattern::parse(&self.host, options)?;
        self.auth.validate()
    }
}

/// Validates every service of a vault and refuses duplicate names. Returns the first
/// error, in declaration order.
pub fn validate_services(
    services: &[Service],
    options: &ValidationOptions,
) -> Result<(), RuleError> {
    let mut seen = HashSet::with_capacity(services.len());
    for service in services {
        service.validate(options)?;
        if !seen.insert(service.name.as_str()) {
            return Err(RuleError::DuplicateService {
                name: service.name.clone(),
            });
        }
    }
    Ok(())
}

/// What the filter does with a request whose host matches no service of the vault.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnmatchedHostPolicy {
    /// Answer 403 `forbidden` with a proposal hint.
    #[default]
    Deny,
    /// Forward the request untouched (no credential injected).
    Passthrough,
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRICT: ValidationOptions = ValidationOptions {
        allow_private_upstreams: false,
    };

    fn service(name: &str, host: &str) -> Service {
        Service {
            name: name.to_owned(),
            host: host.to_owned(),
            enabled: true,
            auth: Auth::Bearer {
                token: "STRIPE_KEY".to_owned(),
            },
            upstream_tls: true,
        }
    }

    #[test]
    fn json_defaults_and_round_trip() {
        let json = r#"{"name":"stripe","host":"api.stripe.com","auth":{"type":"bearer","token":"STRIPE_KEY"}}"#;
        let parsed: Service = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed, service("stripe", "api.stripe.com"));
        let full = r#"{"name":"stripe","host":"api.stripe.com","enabled":true,"auth":{"type":"bearer","token":"STRIPE_KEY"},"upstream_tls":true}"#;
        assert_eq!(serde_json::to_string(&parsed).ok().as_deref(), Some(full));
        let off: Service = serde_json::from_str(
            r#"{"name":"x","host":"x.example.com","enabled":false,"upstream_tls":false,"auth":{"type":"passthrough"}}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(!off.enabled && !off.upstream_tls);
    }

    #[test]
    fn bad_json_is_refused() {
        let cases: &[(&str, &str)] = &[
            (
                "unknown field",
                r#"{"name":"s","host":"a.com","auth":{"type":"passthrough"},"tls":true}"#,
            ),
            (
                "unknown field inside auth",
                r#"{"name":"s","host":"a.com","auth":{"type":"passthrough","x":1}}"#,
            ),
            ("missing auth", r#"{"name":"s","host":"a.com"}"#),
            (
                "missing host",
                r#"{"name":"s","auth":{"type":"passthrough"}}"#,
            ),
            (
                "enabled not a bool",
                r#"{"name":"s","host":"a.com","enabled":"yes","auth":{"type":"passthrough"}}"#,
            ),
        ];
        for (behaviour, json) in cases {
            assert!(
                serde_json::from_str::<Service>(json).is_err(),
                "{behaviour}"
            );
        }
    }

    #[test]
    fn validation() {
        let bad_auth = Service {
            auth: Auth::Bearer {
                token: "lower".to_owned(),
            },
            ..service("stripe", "api.stripe.com")
        };
        // (behaviour, services, expected error code)
        let cases: Vec<(&str, Vec<Service>, Option<&str>)> = vec![
            (
                "valid service",
                vec![service("stripe", "api.stripe.com")],
                None,
            ),
            ("no services", vec![], None),
            (
                "bad name",
                vec![service("Stripe", "api.stripe.com")],
                Some("invalid_service_name"),
            ),
            (
                "bad host",
                vec![service("stripe", "https://api.stripe.com")],
                Some("invalid_host"),
            ),
            (
                "private host",
                vec![service("local", "localhost:8080")],
                Some("private_host"),
            ),
            ("bad auth", vec![bad_auth], Some("invalid_key")),
            (
                "duplicate names",
                vec![
                    service("stripe", "api.stripe.com"),
                    service("stripe", "files.stripe.com"),
                ],
                Some("duplicate_service"),
            ),
            (
                "same host under two names",
                vec![
                    service("a", "api.stripe.com"),
                    service("b", "api.stripe.com"),
                ],
                None,
            ),
        ];
        for (behaviour, services, expected) in cases {
            let result = validate_services(&services, &STRICT);
            assert_eq!(
                result.as_ref().err().map(RuleError::code),
                expected,
                "{behaviour}: {result:?}"
            );
        }
        let allowed = ValidationOptions {
            allow_private_upstreams: true,
        };
        assert!(service("local", "localhost:8080")
            .validate(&allowed)
            .is_ok());
    }

    #[test]
    fn duplicate_message_names_the_service() {
        let services = vec![
            service("stripe", "a.stripe.com"),
            service("stripe", "b.stripe.com"),
        ];
        assert_eq!(
            validate_services(&services, &STRICT)
                .err()
                .map(|e| e.to_string())
                .as_deref(),
            Some("duplicate service name \"stripe\": service names must be unique within a vault")
        );
    }

    #[test]
    fn unmatched_host_policy_json() {
        for (policy, json) in [
            (UnmatchedHostPolicy::Deny, "\"deny\""),
            (UnmatchedHostPolicy::Passthrough, "\"passthrough\""),
        ] {
            assert_eq!(serde_json::to_string(&policy).ok().as_deref(), Some(json));
            assert_eq!(
                serde_json::from_str::<UnmatchedHostPolicy>(json).ok(),
                Some(policy)
            );
        }
        assert_eq!(UnmatchedHostPolicy::default(), UnmatchedHostPolicy::Deny);
        assert!(serde_json::from_str::<UnmatchedHostPolicy>("\"allow\"").is_err());
    }
}
