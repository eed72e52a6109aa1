//! The one error type of rule validation.
//!
//! Every variant has a stable snake_case [`RuleError::code`] (what the API puts in its
//! `error` field and tests match on) and a one-line `Display` message that names the
//! offending value and states the rule (what a human reads in the CLI or the UI).

/// Longest part of an offending value quoted back in a message; the rest is elided so
/// that a huge bad input cannot produce a huge error line.
const MAX_QUOTED_CHARS: usize = 80;

/// Why a vault name, credential key, host pattern, auth block or service was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// A vault name does not match `^[a-z0-9]([a-z0-9-]{1,62}[a-z0-9])$`.
    #[error("invalid vault name {}: {reason}", quoted(.name))]
    InvalidVaultName {
        /// The refused name.
        name: String,
        /// The rule it breaks.
        reason: String,
    },
    /// A credential key does not match `^[A-Z][A-Z0-9_]*$` (at most 128 characters).
    #[error("invalid credential key {}: {reason}", quoted(.key))]
    InvalidKey {
        /// The refused key.
        key: String,
        /// The rule it breaks.
        reason: String,
    },
    /// A host pattern is malformed.
    #[error("invalid host {}: {reason}", quoted(.host))]
    InvalidHost {
        /// The refused pattern, as given.
        host: String,
        /// The rule it breaks.
        reason: String,
    },
    /// A host pattern names an IP literal, `localhost` or an internal name, and the
    /// server was not started with `--allow-private-upstreams`.
    #[error(
        "host {} is {what}; the server refuses it unless started with --allow-private-upstreams",
        quoted(.host)
    )]
    PrivateHost {
        /// The host part of the refused pattern.
        host: String,
        /// What kind of address it is ("a private or internal address", ...).
        what: &'static str,
    },
    /// An auth block is malformed (header names, templates, prefixes, ...).
    #[error("invalid auth: {reason}")]
    InvalidAuth {
        /// What is wrong with it.
        reason: String,
    },
    /// A service name does not match `^[a-z0-9][a-z0-9._-]{0,62}$`.
    #[error("invalid service name {}: {reason}", quoted(.name))]
    InvalidServiceName {
        /// The refused name.
        name: String,
        /// The rule it breaks.
        reason: String,
    },
    /// An agent name does not match `^[a-z0-9][a-z0-9._-]{0,62}$`.
    #[error("invalid agent name {}: {reason}", quoted(.name))]
    InvalidAgentName {
        /// The refused name.
        name: String,
        /// The rule it breaks.
        reason: String,
    },
    /// A service's `methods` list is empty, too long, or names a method that is not an
    /// uppercase HTTP token, is listed twice, or is never allowed (TRACE, TRACK, CONNECT).
    #[error("invalid method {}: {reason}", quoted(.method))]
    InvalidMethod {
        /// The refused method (empty when the list itself is refused).
        method: String,
        /// The rule it breaks.
        reason: String,
    },
    /// A service's `substitutions` are malformed (placeholder form, surfaces, collisions).
    #[error("invalid substitution {}: {reason}", quoted(.placeholder))]
    InvalidSubstitution {
        /// The refused placeholder (empty when the list itself is refused).
        placeholder: String,
        /// The rule it breaks.
        reason: String,
    },
    /// A service's `rate_limit` allows 0 or more than 1,000,000 requests per window
    /// (or its short form does not parse).
    #[error("invalid rate limit: {reason}")]
    InvalidRateLimit {
        /// The rule it breaks.
        reason: String,
    },
    /// A service's upstream protocol settings contradict each other (`upstream_h2c`
    /// on a TLS upstream).
    #[error("invalid upstream: {reason}")]
    InvalidUpstream {
        /// The rule it breaks.
        reason: String,
    },
    /// Two services of one vault share a name.
    #[error(
        "duplicate service name {}: service names must be unique within a vault",
        quoted(.name)
    )]
    DuplicateService {
        /// The name used more than once.
        name: String,
    },
}

impl RuleError {
    /// The stable machine-readable code of this error (`invalid_host`, ...).
    pub fn code(&self) -> &'static str {
        match self {
            RuleError::InvalidVaultName { .. } => "invalid_vault_name",
            RuleError::InvalidKey { .. } => "invalid_key",
            RuleError::InvalidHost { .. } => "invalid_host",
            RuleError::PrivateHost { .. } => "private_host",
            RuleError::InvalidAuth { .. } => "invalid_auth",
            RuleError::InvalidServiceName { .. } => "invalid_service_name",
            RuleError::InvalidAgentName { .. } => "invalid_agent_name",
            RuleError::DuplicateService { .. } => "duplicate_service",
            RuleError::InvalidMethod { .. } => "invalid_method",
            RuleError::InvalidSubstitution { .. } => "invalid_substitution",
            RuleError::InvalidRateLimit { .. } => "invalid_rate_limit",
            RuleError::InvalidUpstream { .. } => "invalid_upstream",
        }
    }

    pub(crate) fn invalid_auth(reason: impl Into<String>) -> Self {
        RuleError::InvalidAuth {
            reason: reason.into(),
        }
    }
}

/// `value` in double quotes with control characters and quotes escaped (so the message
/// stays on one line) and cut after [`MAX_QUOTED_CHARS`] characters.
pub(crate) fn quoted(value: &str) -> String {
    match value.char_indices().nth(MAX_QUOTED_CHARS) {
        None => format!("{value:?}"),
        Some((cut, _)) => {
            let head = value.get(..cut).unwrap_or(value);
            let debug = format!("{head:?}");
            // `"head"` → `"head…"`: put the ellipsis inside the quotes.
            let inner = debug.strip_suffix('"').map_or(debug.as_str(), |s| s);
            format!("{inner}…\"")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_stable_snake_case() {
        let cases: Vec<(RuleError, &str)> = vec![
            (
                RuleError::InvalidVaultName {
                    name: "A".into(),
                    reason: "r".into(),
                },
                "invalid_vault_name",
            ),
            (
                RuleError::InvalidKey {
                    key: "a".into(),
                    reason: "r".into(),
                },
                "invalid_key",
            ),
            (
                RuleError::InvalidHost {
                    host: "h".into(),
                    reason: "r".into(),
                },
                "invalid_host",
            ),
            (
                RuleError::PrivateHost {
                    host: "h".into(),
                    what: "w",
                },
                "private_host",
            ),
            (RuleError::invalid_auth("r"), "invalid_auth"),
            (
                RuleError::InvalidServiceName {
                    name: "n".into(),
                    reason: "r".into(),
                },
                "invalid_service_name",
            ),
            (
                RuleError::InvalidAgentName {
                    name: "n".into(),
                    reason: "r".into(),
                },
                "invalid_agent_name",
            ),
            (
                RuleError::DuplicateService { name: "n".into() },
                "duplicate_service",
            ),
            (
                RuleError::InvalidMethod {
                    method: "get".into(),
                    reason: "r".into(),
                },
                "invalid_method",
            ),
            (
                RuleError::InvalidRateLimit { reason: "r".into() },
                "invalid_rate_limit",
            ),
            (
                RuleError::InvalidUpstream { reason: "r".into() },
                "invalid_upstream",
            ),
            (
                RuleError::InvalidSubstitution {
                    placeholder: "__X__".into(),
                    reason: "r".into(),
                },
                "invalid_substitution",
            ),
        ];
        for (error, code) in cases {
            assert_eq!(error.code(), code, "{error}");
        }
    }

    #[test]
    fn messages_stay_on_one_line_and_short() {
        let error = RuleError::InvalidKey {
            key: format!("a\nb\"{}", "x".repeat(500)),
            reason: "keys are UPPER_SNAKE_CASE".into(),
        };
        let message = error.to_string();
        assert!(!message.contains('\n'), "{message}");
        assert!(
            message.starts_with(r#"invalid credential key "a\nb\"xx"#),
            "{message}"
        );
        assert!(message.contains("x…\": keys are"), "{message}");
        assert!(message.len() < 200, "{message}");
    }

    #[test]
    fn short_values_are_quoted_whole() {
        assert_eq!(quoted("stripe_key"), "\"stripe_key\"");
        assert_eq!(quoted(""), "\"\"");
    }
}
