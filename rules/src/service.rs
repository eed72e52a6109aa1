//! A vault's service rules: which host gets which auth.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::auth::Auth;
use crate::error::RuleError;
use crate::host::{HostPattern, ValidationOptions};
use crate::names::validate_service_name;
use crate::substitution::{validate_substitutions, Substitution};

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
    /// A plain-HTTP upstream (`upstream_tls: false`) that speaks HTTP/2 without TLS
    /// (h2c with prior knowledge: gRPC inside a cluster): Envoy forwards every request
    /// to it as HTTP/2. `false` (absent in JSON): HTTP/1.1. A TLS upstream needs no
    /// setting: Envoy offers `h2` and `http/1.1` by ALPN and speaks what it picks.
    #[serde(default, skip_serializing_if = "is_false")]
    pub upstream_h2c: bool,
    /// The HTTP methods the service forwards, as given (see [`validate_methods`]).
    /// `None` (absent in JSON): every method but `TRACE`/`TRACK`, which the proxy
    /// refuses whatever the service. A request with another method is refused with
    /// 403 `method_not_allowed_for_service` and never gets the credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
    /// At most this many requests per agent token in each window (see [`RateLimit`]).
    /// `None` (absent in JSON): no limit. Past it, the filter answers 429
    /// `rate_limited` with `Retry-After`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Placeholders the filter replaces with a credential's value on the surfaces each
    /// one names (see [`crate::substitution`]). Empty (absent in JSON): none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub substitutions: Vec<Substitution>,
    /// Whether the filter removes the values it injected into a request from that
    /// request's response (headers and body; raw and in the encodings an echo uses).
    /// `None` (absent in JSON): on. See [`Service::redacts_responses`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redact_responses: Option<bool>,
}

/// Most requests a rate limit may allow per window.
pub const MAX_RATE_LIMIT_REQUESTS: u32 = 1_000_000;

/// A service's per-agent rate limit: `requests` per `per` (a fixed window aligned on
/// the clock: each second, or each minute, starts afresh).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// 1 to [`MAX_RATE_LIMIT_REQUESTS`].
    pub requests: u32,
    /// The window.
    pub per: RatePeriod,
}

/// The window of a [`RateLimit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RatePeriod {
    /// One second.
    Second,
    /// One minute.
    Minute,
}

impl RatePeriod {
    /// As JSON names it.
    pub fn as_str(self) -> &'static str {
        match self {
            RatePeriod::Second => "second",
            RatePeriod::Minute => "minute",
        }
    }

    /// The window's length in milliseconds.
    pub fn millis(self) -> u64 {
        match self {
            RatePeriod::Second => 1_000,
            RatePeriod::Minute => 60_000,
        }
    }
}

impl RateLimit {
    /// Checks `requests` is 1 to [`MAX_RATE_LIMIT_REQUESTS`].
    pub fn validate(&self) -> Result<(), RuleError> {
        if self.requests == 0 || self.requests > MAX_RATE_LIMIT_REQUESTS {
            return Err(RuleError::InvalidRateLimit {
                reason: format!(
                    "requests is 1 to {MAX_RATE_LIMIT_REQUESTS}, not {}",
                    self.requests
                ),
            });
        }
        Ok(())
    }

    /// Parses the CLI's short form: `N/s`, `N/sec`, `N/second`, `N/min`, `N/minute`
    /// (e.g. `10/s`, `600/min`), then validates it.
    pub fn parse_short(text: &str) -> Result<RateLimit, RuleError> {
        let invalid = |reason: &str| RuleError::InvalidRateLimit {
            reason: reason.to_owned(),
        };
        let (count, unit) = text
            .trim()
            .split_once('/')
            .ok_or_else(|| invalid("write it as N/s or N/min, e.g. 10/s"))?;
        let requests: u32 = count
            .trim()
            .parse()
            .map_err(|_| invalid("the count is a whole number, e.g. 10/s"))?;
        let per = match unit.trim() {
            "s" | "sec" | "second" => RatePeriod::Second,
            "m" | "min" | "minute" => RatePeriod::Minute,
            _ => return Err(invalid("the unit is s (per second) or min (per minute)")),
        };
        let limit = RateLimit { requests, per };
        limit.validate()?;
        Ok(limit)
    }
}

impl std::fmt::Display for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = match self.per {
            RatePeriod::Second => "s",
            RatePeriod::Minute => "min",
        };
        write!(f, "{}/{unit}", self.requests)
    }
}

fn default_true() -> bool {
    true
}

fn is_false(value: &bool) -> bool {
    !*value
}

impl Service {
    /// Checks the name, the host pattern and the auth block.
    pub fn validate(&self, options: &ValidationOptions) -> Result<(), RuleError> {
        validate_service_name(&self.name)?;
        HostPattern::parse(&self.host, options)?;
        self.auth.validate()?;
        if let Some(methods) = &self.methods {
            validate_methods(methods)?;
        }
        if let Some(limit) = &self.rate_limit {
            limit.validate()?;
        }
        validate_substitutions(&self.substitutions)?;
        if self.upstream_h2c && self.upstream_tls {
            return Err(RuleError::InvalidUpstream {
                reason: "upstream_h2c is for plain-HTTP upstreams (upstream_tls: false); \
                         a TLS upstream gets HTTP/2 by ALPN when it offers it"
                    .to_owned(),
            });
        }
        Ok(())
    }

    /// Whether responses are redacted: unless the service turns it off. A service that
    /// injects nothing has nothing to redact, whatever this says.
    pub fn redacts_responses(&self) -> bool {
        self.redact_responses.unwrap_or(true)
    }

    /// Every credential key the service needs, its auth's and its substitutions',
    /// sorted and deduplicated: a request is forwarded only when all have values.
    pub fn credential_keys(&self) -> Vec<String> {
        let mut keys = self.auth.referenced_keys();
        keys.extend(self.substitutions.iter().map(|s| s.key.clone()));
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// Whether the service forwards a request with `method`. Methods are
    /// case-sensitive (RFC 9110 §9.1): with `methods: ["GET"]`, `get` is refused.
    /// `TRACE`/`TRACK` are refused before any service is looked at.
    pub fn allows_method(&self, method: &str) -> bool {
        method_allowed(self.methods.as_deref(), method)
    }
}

/// Longest method name a service may list.
pub const MAX_METHOD_LEN: usize = 32;
/// Most methods a service may list.
pub const MAX_METHODS: usize = 32;

/// Whether `allowed` (a service's `methods`, `None` = all) lets `method` through.
pub fn method_allowed<S: AsRef<str>>(allowed: Option<&[S]>, method: &str) -> bool {
    allowed.is_none_or(|list| list.iter().any(|m| m.as_ref() == method))
}

/// Checks a service's `methods` list: not empty, at most [`MAX_METHODS`], each an
/// uppercase HTTP token (`A`–`Z`, digits, `-`, `_`; at most [`MAX_METHOD_LEN`]
/// characters), none twice, and neither `TRACE`, `TRACK` (always refused) nor
/// `CONNECT` (tunnels are opened for a service's host whatever its methods). The list
/// is kept as given: its order is the one shown back.
pub fn validate_methods<S: AsRef<str>>(methods: &[S]) -> Result<(), RuleError> {
    let invalid = |method: &str, reason: &str| {
        Err(RuleError::InvalidMethod {
            method: method.to_owned(),
            reason: reason.to_owned(),
        })
    };
    if methods.is_empty() {
        return invalid(
            "",
            "the methods list is empty; omit it to allow every method but TRACE and TRACK",
        );
    }
    if let Some(extra) = methods.get(MAX_METHODS) {
        return invalid(
            extra.as_ref(),
            &format!("a service lists at most {MAX_METHODS} methods"),
        );
    }
    let mut seen = HashSet::with_capacity(methods.len());
    for method in methods {
        let method = method.as_ref();
        if method.is_empty() || method.len() > MAX_METHOD_LEN {
            return invalid(
                method,
                &format!("a method is 1 to {MAX_METHOD_LEN} characters, e.g. GET"),
            );
        }
        if !method
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return invalid(
                method,
                "methods are case-sensitive uppercase names (A-Z, 0-9, '-', '_'), e.g. GET or POST",
            );
        }
        if matches!(method, "TRACE" | "TRACK") {
            return invalid(
                method,
                "TRACE and TRACK are always refused: an upstream echoes the injected credential back",
            );
        }
        if method == "CONNECT" {
            return invalid(
                method,
                "CONNECT is not a service method: HTTPS agents' tunnels are opened for the service's host whatever its methods",
            );
        }
        if !seen.insert(method) {
            return invalid(method, "listed twice");
        }
    }
    Ok(())
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
    const LOOSE: ValidationOptions = ValidationOptions {
        allow_private_upstreams: true,
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
            upstream_h2c: false,
            methods: None,
            rate_limit: None,
            substitutions: Vec::new(),
            redact_responses: None,
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
    fn h2c_is_a_plain_upstreams_setting_shown_only_when_on() {
        let plain: Service = serde_json::from_str(
            r#"{"name":"g","host":"grpc.internal:50051","upstream_tls":false,"upstream_h2c":true,"auth":{"type":"passthrough"}}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(plain.upstream_h2c);
        assert_eq!(plain.validate(&LOOSE).map_err(|e| e.to_string()), Ok(()));
        let json = serde_json::to_string(&plain).unwrap_or_default();
        assert!(json.contains(r#""upstream_h2c":true"#), "{json}");
        let off = serde_json::to_string(&service("s", "a.com")).unwrap_or_default();
        assert!(!off.contains("upstream_h2c"), "{off}");

        let tls = Service {
            upstream_h2c: true,
            ..service("s", "a.com")
        };
        let error = tls.validate(&STRICT).err();
        assert_eq!(
            error.as_ref().map(RuleError::code),
            Some("invalid_upstream")
        );
        let message = error.map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("upstream_tls: false"), "{message}");
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
    fn methods_json_is_omitted_when_absent_and_kept_as_given() {
        let json =
            r#"{"name":"s","host":"a.com","auth":{"type":"passthrough"},"methods":["POST","GET"]}"#;
        let parsed: Service = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            parsed.methods.as_deref(),
            Some(&["POST".to_owned(), "GET".to_owned()][..])
        );
        let out = serde_json::to_string(&parsed).unwrap_or_default();
        assert!(out.ends_with(r#""methods":["POST","GET"]}"#), "{out}");
        let plain = serde_json::to_string(&service("s", "a.com")).unwrap_or_default();
        assert!(!plain.contains("methods"), "{plain}");
        assert!(
            serde_json::from_str::<Service>(
                r#"{"name":"s","host":"a.com","auth":{"type":"passthrough"},"methods":"GET"}"#
            )
            .is_err(),
            "a string is not a list"
        );
    }

    #[test]
    fn rate_limit_json_is_omitted_when_absent_and_validated() {
        let json = r#"{"name":"s","host":"a.com","auth":{"type":"passthrough"},"rate_limit":{"requests":5,"per":"minute"}}"#;
        let parsed: Service = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            parsed.rate_limit,
            Some(RateLimit {
                requests: 5,
                per: RatePeriod::Minute
            })
        );
        assert!(parsed.validate(&STRICT).is_ok());
        let out = serde_json::to_string(&parsed).unwrap_or_default();
        assert!(
            out.ends_with(r#""rate_limit":{"requests":5,"per":"minute"}}"#),
            "{out}"
        );
        let plain = serde_json::to_string(&service("s", "a.com")).unwrap_or_default();
        assert!(!plain.contains("rate_limit"), "{plain}");
        for bad in [
            r#"{"requests":5,"per":"hour"}"#,
            r#"{"requests":-1,"per":"second"}"#,
            r#"{"requests":5}"#,
            r#"{"requests":5,"per":"second","burst":2}"#,
        ] {
            let json = format!(
                r#"{{"name":"s","host":"a.com","auth":{{"type":"passthrough"}},"rate_limit":{bad}}}"#
            );
            assert!(serde_json::from_str::<Service>(&json).is_err(), "{bad}");
        }
        for (requests, valid) in [
            (0, false),
            (1, true),
            (MAX_RATE_LIMIT_REQUESTS, true),
            (MAX_RATE_LIMIT_REQUESTS + 1, false),
        ] {
            let service = Service {
                rate_limit: Some(RateLimit {
                    requests,
                    per: RatePeriod::Second,
                }),
                ..service("s", "a.com")
            };
            let result = service.validate(&STRICT);
            assert_eq!(result.is_ok(), valid, "{requests}: {result:?}");
            if !valid {
                assert!(
                    matches!(result, Err(RuleError::InvalidRateLimit { .. })),
                    "{result:?}"
                );
            }
        }
    }

    #[test]
    fn rate_limit_short_form() {
        let ok = |text: &str| RateLimit::parse_short(text).map(|l| l.to_string());
        assert_eq!(ok("10/s").ok().as_deref(), Some("10/s"));
        assert_eq!(ok(" 10 / second ").ok().as_deref(), Some("10/s"));
        assert_eq!(ok("600/min").ok().as_deref(), Some("600/min"));
        assert_eq!(ok("5/minute").ok().as_deref(), Some("5/min"));
        for bad in ["10", "10/h", "0/s", "x/s", "-1/s", "1000001/s", ""] {
            assert!(RateLimit::parse_short(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn methods_validation() {
        let with = |methods: &[&str]| Service {
            methods: Some(methods.iter().map(|m| (*m).to_owned()).collect()),
            ..service("s", "api.example.com")
        };
        let too_many: Vec<String> = (0..=MAX_METHODS).map(|i| format!("M{i}")).collect();
        let long = "X".repeat(MAX_METHOD_LEN + 1);
        // (behaviour, methods, refused method in the error, or None when valid)
        let cases: Vec<(&str, Service, Option<&str>)> = vec![
            ("GET only", with(&["GET"]), None),
            ("several, any order", with(&["POST", "GET", "DELETE"]), None),
            (
                "an extension method",
                with(&["PROPFIND", "X-CUSTOM_1"]),
                None,
            ),
            ("absent = all", service("s", "api.example.com"), None),
            ("empty list", with(&[]), Some("")),
            ("lowercase", with(&["get"]), Some("get")),
            ("mixed case", with(&["GET", "Post"]), Some("Post")),
            ("space", with(&["GET "]), Some("GET ")),
            ("empty name", with(&[""]), Some("")),
            ("too long", with(&[long.as_str()]), Some(long.as_str())),
            ("duplicate", with(&["GET", "POST", "GET"]), Some("GET")),
            ("TRACE", with(&["GET", "TRACE"]), Some("TRACE")),
            ("TRACK", with(&["TRACK"]), Some("TRACK")),
            ("CONNECT", with(&["CONNECT"]), Some("CONNECT")),
            (
                "too many",
                Service {
                    methods: Some(too_many),
                    ..service("s", "api.example.com")
                },
                Some("M32"),
            ),
        ];
        for (behaviour, service, refused) in cases {
            let result = service.validate(&STRICT);
            match (refused, result) {
                (None, Ok(())) => {}
                (Some(method), Err(RuleError::InvalidMethod { method: got, .. })) => {
                    assert_eq!(got, method, "{behaviour}");
                }
                (expected, got) => panic!("{behaviour}: expected {expected:?}, got {got:?}"),
            }
        }
        let message = with(&["get"])
            .validate(&STRICT)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            message.starts_with("invalid method \"get\": methods are case-sensitive uppercase"),
            "{message}"
        );
    }

    #[test]
    fn allowed_methods_are_matched_exactly() {
        let all = service("s", "a.com");
        assert!(all.allows_method("GET") && all.allows_method("PROPFIND"));
        let get = Service {
            methods: Some(vec!["GET".to_owned(), "HEAD".to_owned()]),
            ..service("s", "a.com")
        };
        assert!(get.allows_method("GET") && get.allows_method("HEAD"));
        for refused in ["POST", "get", "Get", "GE", "GETX", ""] {
            assert!(!get.allows_method(refused), "{refused}");
        }
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
