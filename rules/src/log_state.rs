//! The request log through Envoy's access log: what the filter knows of a request and
//! Envoy does not (who, which vault and service, the filter's error, the redactions),
//! set as one filter-state value ([`LOG_STATE_PROPERTY`]) that Envoy's gRPC access
//! log hands to the control plane ([`LOG_STATE_FILTER_STATE`]). Envoy adds what it
//! knows itself (start time, method, path, status, latency), and the control plane
//! builds the same [`crate::LogRecord`] the filter posts in `post` mode.
//!
//! The format is one line of tab-separated fields, versioned by its first field:
//!
//! ```text
//! 1 \t agent \t vault \t service \t host \t error \t redactions \t method \t path
//! ```
//!
//! Agent, vault and service are validated names and the host a normalized host name
//! (none holds a tab or a control character); the error is an error code; an empty
//! field is "none". [`LogState::encode`] drops any control character anyway, so a
//! field can never shift the others.
//!
//! The method is there only when Envoy's access log cannot name it (its
//! `RequestMethod` has nine; `PROPFIND` is `METHOD_UNSPECIFIED`). The path is there
//! only when the filter rewrote the request's (a placeholder substituted in it):
//! Envoy would log the rewritten path, with the credential in it; this one is the
//! agent's, already cut by [`crate::loggable_path`].

use std::fmt;

/// The property path the filter sets (`proxy_set_property`).
pub const LOG_STATE_PROPERTY: &str = "agent_vault_log";
/// The filter-state object Envoy makes of it: what the access log's
/// `filter_state_objects_to_log` names, and the key of the entry's
/// `common_properties.filter_state_objects`.
pub const LOG_STATE_FILTER_STATE: &str = "wasm.agent_vault_log";
/// The version this build writes (the first field).
pub const LOG_STATE_VERSION: &str = "1";
/// Fields of a version-1 value, the version included.
const FIELDS: usize = 9;

/// What the filter sets on a request for its log record. `S` is `&str` in the filter
/// (borrowing its state), `String` once decoded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogState<S = String> {
    /// Authenticated agent ("" when none).
    pub agent: S,
    /// Resolved vault ("" when none).
    pub vault: S,
    /// Matched service.
    pub service: Option<S>,
    /// Request host, without port ("" when it had none the filter could read).
    pub host: S,
    /// The filter's error code, when it answered itself.
    pub error: Option<S>,
    /// Occurrences of a secret replaced in the response.
    pub redactions: u64,
    /// The method, when not one Envoy's access log names ([`envoy_names_method`]).
    pub method: Option<S>,
    /// The agent's path (no query string), when the filter rewrote the request's.
    pub path: Option<S>,
}

/// Whether Envoy's access-log entry names `method` itself (its `RequestMethod` enum).
pub fn envoy_names_method(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "POST" | "PUT" | "DELETE" | "CONNECT" | "OPTIONS" | "TRACE" | "PATCH"
    )
}

/// Why a filter-state value is not a [`LogState`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogStateError {
    /// The first field is not a version this build reads.
    Version(String),
    /// Not as many fields as the version has.
    Fields(usize),
    /// The redactions field is not a count.
    Redactions(String),
}

impl fmt::Display for LogStateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LogStateError::Version(version) => write!(
                f,
                "request-log state of version {version:?}; this control plane reads version {LOG_STATE_VERSION}"
            ),
            LogStateError::Fields(n) => write!(
                f,
                "request-log state with {n} fields; version {LOG_STATE_VERSION} has {FIELDS}"
            ),
            LogStateError::Redactions(value) => {
                write!(f, "request-log state with redactions {value:?}, not a count")
            }
        }
    }
}

impl std::error::Error for LogStateError {}

fn push_field(out: &mut String, field: &str) {
    out.push('\t');
    if field.chars().any(char::is_control) {
        out.extend(field.chars().filter(|c| !c.is_control()));
    } else {
        out.push_str(field);
    }
}

impl<S: AsRef<str>> LogState<S> {
    /// The filter-state value.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(
            16 + self.agent.as_ref().len()
                + self.vault.as_ref().len()
                + self.host.as_ref().len()
                + self.service.as_ref().map_or(0, |s| s.as_ref().len())
                + self.error.as_ref().map_or(0, |s| s.as_ref().len()),
        );
        out.push_str(LOG_STATE_VERSION);
        push_field(&mut out, self.agent.as_ref());
        push_field(&mut out, self.vault.as_ref());
        push_field(&mut out, self.service.as_ref().map_or("", AsRef::as_ref));
        push_field(&mut out, self.host.as_ref());
        push_field(&mut out, self.error.as_ref().map_or("", AsRef::as_ref));
        out.push('\t');
        if self.redactions > 0 {
            out.push_str(&self.redactions.to_string());
        }
        push_field(&mut out, self.method.as_ref().map_or("", AsRef::as_ref));
        push_field(&mut out, self.path.as_ref().map_or("", AsRef::as_ref));
        out
    }
}

impl LogState {
    /// Reads a value [`LogState::encode`] wrote.
    pub fn decode(value: &str) -> Result<LogState, LogStateError> {
        let fields: Vec<&str> = value.split('\t').collect();
        let version = fields.first().copied().unwrap_or_default();
        if version != LOG_STATE_VERSION {
            return Err(LogStateError::Version(
                crate::truncated(version, 16).to_owned(),
            ));
        }
        let [_, agent, vault, service, host, error, redactions, method, path] = fields.as_slice()
        else {
            return Err(LogStateError::Fields(fields.len()));
        };
        let optional = |field: &str| (!field.is_empty()).then(|| field.to_owned());
        let redactions = if redactions.is_empty() {
            0
        } else {
            redactions.parse::<u64>().map_err(|_| {
                LogStateError::Redactions(crate::truncated(redactions, 24).to_owned())
            })?
        };
        Ok(LogState {
            agent: (*agent).to_owned(),
            vault: (*vault).to_owned(),
            service: optional(service),
            host: (*host).to_owned(),
            error: optional(error),
            redactions,
            method: optional(method),
            path: optional(path),
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_forwarded_request_and_a_refused_one_are_written_as_documented() {
        let forwarded = LogState {
            agent: "claude",
            vault: "default",
            service: Some("stripe"),
            host: "api.stripe.com",
            error: None,
            redactions: 2,
            method: None,
            path: Some("/bot__TOKEN__/send"),
        };
        assert_eq!(
            forwarded.encode(),
            "1\tclaude\tdefault\tstripe\tapi.stripe.com\t\t2\t\t/bot__TOKEN__/send"
        );
        let refused = LogState {
            agent: "",
            vault: "",
            service: None,
            host: "",
            error: Some("proxy_auth_required"),
            redactions: 0,
            method: Some("PROPFIND"),
            path: None,
        };
        assert_eq!(
            refused.encode(),
            "1\t\t\t\t\tproxy_auth_required\t\tPROPFIND\t"
        );
        assert_eq!(
            LogState::decode(&refused.encode()),
            Ok(LogState {
                error: Some("proxy_auth_required".to_owned()),
                method: Some("PROPFIND".to_owned()),
                ..LogState::default()
            })
        );
    }

    #[test]
    fn a_control_character_in_a_field_cannot_shift_the_others() {
        let state = LogState {
            agent: "a\tb\nc",
            vault: "v",
            service: None,
            host: "h",
            error: None,
            redactions: 0,
            method: None,
            path: None,
        };
        let decoded = LogState::decode(&state.encode()).unwrap();
        assert_eq!(decoded.agent, "abc");
        assert_eq!(decoded.vault, "v");
        assert_eq!(decoded.host, "h");
    }

    #[test]
    fn values_that_are_not_a_state_are_refused_with_the_reason() {
        let cases: [(&str, LogStateError, &str); 5] = [
            (
                "",
                LogStateError::Version(String::new()),
                "request-log state of version \"\"; this control plane reads version 1",
            ),
            (
                "2\ta\tv\ts\th\t\t0\t\t",
                LogStateError::Version("2".into()),
                "request-log state of version \"2\"; this control plane reads version 1",
            ),
            (
                "1\ta\tv\ts\th\t\t\t",
                LogStateError::Fields(8),
                "request-log state with 8 fields; version 1 has 9",
            ),
            (
                "1\ta\tv\ts",
                LogStateError::Fields(4),
                "request-log state with 4 fields; version 1 has 9",
            ),
            (
                "1\ta\tv\ts\th\t\t-1\t\t",
                LogStateError::Redactions("-1".into()),
                "request-log state with redactions \"-1\", not a count",
            ),
        ];
        for (value, error, message) in cases {
            assert_eq!(LogState::decode(value), Err(error), "{value:?}");
            assert_eq!(
                LogState::decode(value).unwrap_err().to_string(),
                message,
                "{value:?}"
            );
        }
    }

    fn name() -> impl Strategy<Value = String> {
        "[a-z0-9][a-z0-9_-]{0,20}|"
    }

    proptest! {
        #[test]
        fn decode_reads_what_encode_wrote(
            agent in name(),
            vault in name(),
            service in proptest::option::of("[a-z0-9][a-z0-9_-]{0,20}"),
            host in "[a-z0-9.-]{0,40}",
            error in proptest::option::of("[a-z_]{1,30}"),
            redactions in any::<u64>(),
            method in proptest::option::of("[A-Z-]{1,20}"),
            path in proptest::option::of("/[^\\p{Cc}]{0,60}"),
        ) {
            let state = LogState { agent, vault, service, host, error, redactions, method, path };
            prop_assert_eq!(LogState::decode(&state.encode()), Ok(state));
        }

        #[test]
        fn decode_never_panics(value in "\\PC{0,80}") {
            let _ = LogState::decode(&value);
        }
    }
}
