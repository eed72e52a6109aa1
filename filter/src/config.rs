//! The plugin configuration: JSON from Envoy's `configuration` field, parsed and
//! validated once per worker in the root context's `on_configure`.
//!
//! Every field is optional; unknown fields are refused, so a typo cannot silently fall
//! back to a default. Envoy shows this configuration in `/config_dump`, so it never
//! holds a secret: only where the control plane is and how often to ask it.

use std::fmt;

use agent_vault_rules::{MAX_LOG_BATCH_RECORDS, MAX_SNAPSHOT_WAIT_MS};
use serde::Deserialize;

/// Settings of one filter instance.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Envoy cluster whose endpoint is the control plane's Unix socket.
    pub cluster: String,
    /// `:authority` of the callouts to the control plane.
    pub authority: String,
    /// How often each worker asks for a new rules snapshot.
    pub snapshot_poll_ms: u64,
    /// How long a fetched credential value is reused; 0 fetches on every request.
    pub credential_cache_ttl_ms: u64,
    /// Timeout of every callout to the control plane.
    pub callout_timeout_ms: u64,
    /// Longest time a request-log record waits before it is sent.
    pub log_flush_ms: u64,
    /// Request-log records sent in one batch; a full batch is sent at once.
    pub log_batch_max: usize,
    /// Request header the filter sets to `tls` or `plain` so the route picks the
    /// upstream cluster (always overwritten: the agent cannot choose); `tunnel` or
    /// `opaque` for a `CONNECT` it lets through.
    pub tls_header: String,
    /// Where this filter instance runs (see [`Mode`]).
    pub mode: Mode,
    /// Largest request body the filter holds to substitute placeholders in (services
    /// with a `body` substitution only); a larger one is answered 413
    /// `request_body_too_large`. The body is held in the worker's VM, not in Envoy's
    /// buffer, so Envoy's buffer limit does not bound it.
    pub max_substitution_body_bytes: u64,
    /// How long each worker's snapshot long-poll asks the control plane to hold it
    /// (DESIGN.md §4): a change then arrives at once instead of on the next poll. 0
    /// turns the long-poll off (plain polling every `snapshot_poll_ms`). The callout's
    /// timeout is this plus `callout_timeout_ms`.
    pub snapshot_wait_ms: u64,
    /// How the request log reaches the control plane (see [`RequestLogMode`]).
    pub request_log: RequestLogMode,
}

/// How the request log reaches the control plane.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestLogMode {
    /// Each worker builds the records and posts them in batches to
    /// `POST /v1/dataplane/logs` (`log_flush_ms`, `log_batch_max`).
    #[default]
    Post,
    /// The filter sets what only it knows as one filter-state value per request
    /// ([`agent_vault_rules::LogState`]); Envoy's gRPC access log sends it with the
    /// rest of the record to the control plane. Nothing is built or posted in the VM.
    AccessLog,
}

/// The default of [`Config::snapshot_wait_ms`]: 25 s.
pub const DEFAULT_SNAPSHOT_WAIT_MS: u64 = 25_000;
/// The shortest long-poll wait [`Config::snapshot_wait_ms`] may set (0 aside).
pub const MIN_SNAPSHOT_WAIT_MS: u64 = 1000;

/// The default of [`Config::max_substitution_body_bytes`]: 4 MiB.
pub const DEFAULT_MAX_SUBSTITUTION_BODY_BYTES: u64 = 4 * 1024 * 1024;

/// Where a filter instance runs: on the listener agents connect to, or inside the
/// tunnels of HTTPS agents that Envoy decrypts (DESIGN.md §3, "HTTPS agents").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The agents' listener: every request proves its agent with its proxy credential;
    /// a `CONNECT` that does is let through to Envoy's TLS-terminating internal
    /// listener with the identity it proved ([`crate::tunnel`]).
    #[default]
    Proxy,
    /// Behind that internal listener: the agent is the one proven on the tunnel's
    /// `CONNECT`, which Envoy hands over as filter state; nothing sent inside the
    /// tunnel (no header, no second proxy credential) changes it.
    Tunnel,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cluster: "agent_vault_control_plane".to_owned(),
            authority: "agent-vault".to_owned(),
            snapshot_poll_ms: 1000,
            credential_cache_ttl_ms: 60_000,
            callout_timeout_ms: 2000,
            log_flush_ms: 1000,
            log_batch_max: 1000,
            tls_header: "x-agent-vault-upstream".to_owned(),
            mode: Mode::Proxy,
            max_substitution_body_bytes: DEFAULT_MAX_SUBSTITUTION_BODY_BYTES,
            snapshot_wait_ms: DEFAULT_SNAPSHOT_WAIT_MS,
            request_log: RequestLogMode::Post,
        }
    }
}

/// Why a plugin configuration was refused. The message names the field and the rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid plugin configuration: {}", self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Request headers the routing header may not be: the filter removes or sets these
/// for other reasons, or they frame the request.
const RESERVED_HEADERS: [&str; 12] = [
    "authorization",
    "proxy-authorization",
    "x-vault",
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "te",
    "upgrade",
    "keep-alive",
    "cookie",
    crate::tunnel::TUNNEL_HEADER,
];

impl Config {
    /// Parses and validates the plugin configuration. Empty (or all-whitespace) input
    /// means all defaults.
    pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
        let config = if bytes.iter().all(u8::is_ascii_whitespace) {
            Config::default()
        } else {
            serde_json::from_slice::<Config>(bytes).map_err(|e| ConfigError(e.to_string()))?
        };
        config.validated()
    }

    fn validated(mut self) -> Result<Config, ConfigError> {
        let err = |message: String| Err(ConfigError(message));
        if self.cluster.is_empty()
            || self.cluster.len() > 255
            || self.cluster.chars().any(char::is_control)
        {
            return err("\"cluster\" must name the Envoy cluster of the control plane's socket (1 to 255 characters)".to_owned());
        }
        if agent_vault_rules::normalize_authority(&self.authority, 80).is_none() {
            return err(format!(
                "\"authority\" must be a host name such as \"agent-vault\", not {:?}",
                self.authority
            ));
        }
        let ranges: [(&str, u64, u64, u64); 6] = [
            ("snapshot_poll_ms", self.snapshot_poll_ms, 100, 600_000),
            (
                "credential_cache_ttl_ms",
                self.credential_cache_ttl_ms,
                0,
                86_400_000,
            ),
            ("callout_timeout_ms", self.callout_timeout_ms, 10, 60_000),
            ("log_flush_ms", self.log_flush_ms, 100, 600_000),
            (
                "log_batch_max",
                u64::try_from(self.log_batch_max).unwrap_or(u64::MAX),
                1,
                // The control plane refuses larger batches.
                MAX_LOG_BATCH_RECORDS as u64,
            ),
            // The whole body is held in the worker's memory while it is substituted.
            (
                "max_substitution_body_bytes",
                self.max_substitution_body_bytes,
                1024,
                64 * 1024 * 1024,
            ),
        ];
        for (name, value, min, max) in ranges {
            if !(min..=max).contains(&value) {
                return err(format!(
                    "\"{name}\" must be between {min} and {max}, not {value}"
                ));
            }
        }
        // The control plane refuses a longer wait; a very short one is plain polling
        // with extra steps.
        if self.snapshot_wait_ms != 0
            && !(MIN_SNAPSHOT_WAIT_MS..=MAX_SNAPSHOT_WAIT_MS).contains(&self.snapshot_wait_ms)
        {
            return err(format!(
                "\"snapshot_wait_ms\" must be 0 (no long-poll: plain polling) or between \
                 {MIN_SNAPSHOT_WAIT_MS} and {MAX_SNAPSHOT_WAIT_MS}, not {}",
                self.snapshot_wait_ms
            ));
        }
        let is_tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        if self.tls_header.is_empty() || !self.tls_header.bytes().all(is_tchar) {
            return err(format!(
                "\"tls_header\" must be an HTTP header name, not {:?}",
                self.tls_header
            ));
        }
        // Envoy lowercases header names; matching and removal use the lowercase form.
        self.tls_header.make_ascii_lowercase();
        if RESERVED_HEADERS.contains(&self.tls_header.as_str()) {
            return err(format!(
                "\"tls_header\" cannot be {:?}: the filter manages that header for another purpose",
                self.tls_header
            ));
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_configuration_means_defaults() {
        for input in ["", "  \n", "{}"] {
            assert_eq!(
                Config::parse(input.as_bytes()),
                Ok(Config::default()),
                "{input:?}"
            );
        }
        let defaults = Config::default();
        assert_eq!(defaults.cluster, "agent_vault_control_plane");
        assert_eq!(defaults.authority, "agent-vault");
        assert_eq!(defaults.snapshot_poll_ms, 1000);
        assert_eq!(defaults.credential_cache_ttl_ms, 60_000);
        assert_eq!(defaults.callout_timeout_ms, 2000);
        assert_eq!(defaults.log_flush_ms, 1000);
        assert_eq!(defaults.log_batch_max, 1000);
        assert_eq!(defaults.tls_header, "x-agent-vault-upstream");
        assert_eq!(defaults.mode, Mode::Proxy);
        assert_eq!(defaults.max_substitution_body_bytes, 4 * 1024 * 1024);
        assert_eq!(defaults.snapshot_wait_ms, 25_000);
        assert_eq!(defaults.request_log, RequestLogMode::Post);
    }

    #[test]
    fn every_field_can_be_set() {
        let json = r#"{"cluster":"cp","authority":"vault.internal","snapshot_poll_ms":500,
            "credential_cache_ttl_ms":0,"callout_timeout_ms":300,"log_flush_ms":2000,
            "log_batch_max":10,"tls_header":"X-Upstream-TLS","mode":"tunnel",
            "max_substitution_body_bytes":2048,"snapshot_wait_ms":30000,
            "request_log":"access_log"}"#;
        let config = Config::parse(json.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            config,
            Config {
                cluster: "cp".into(),
                authority: "vault.internal".into(),
                snapshot_poll_ms: 500,
                credential_cache_ttl_ms: 0,
                callout_timeout_ms: 300,
                log_flush_ms: 2000,
                log_batch_max: 10,
                tls_header: "x-upstream-tls".into(),
                mode: Mode::Tunnel,
                max_substitution_body_bytes: 2048,
                snapshot_wait_ms: 30_000,
                request_log: RequestLogMode::AccessLog,
            }
        );
    }

    #[test]
    fn the_long_poll_wait_can_be_off_or_within_the_control_planes_bound() {
        for wait in [0, 1000, 25_000, 60_000] {
            let json = format!(r#"{{"snapshot_wait_ms":{wait}}}"#);
            let config = Config::parse(json.as_bytes()).unwrap_or_else(|e| panic!("{wait}: {e}"));
            assert_eq!(config.snapshot_wait_ms, wait);
        }
    }

    #[test]
    fn bad_configurations_are_refused_with_a_clear_reason() {
        // (behaviour, json, text the message must contain)
        #[rustfmt::skip]
        let cases: &[(&str, &str, &str)] = &[
            ("unknown field", r#"{"clutser":"x"}"#, "unknown field `clutser`"),
            ("a secret field", r#"{"token":"av_agt_x"}"#, "unknown field `token`"),
            ("not json", "cluster=x", "expected value"),
            ("wrong type", r#"{"snapshot_poll_ms":"1s"}"#, "invalid type"),
            ("negative", r#"{"callout_timeout_ms":-1}"#, "invalid value"),
            ("empty cluster", r#"{"cluster":""}"#, "\"cluster\""),
            ("bad authority", r#"{"authority":"a b"}"#, "\"authority\""),
            ("poll too fast", r#"{"snapshot_poll_ms":10}"#, "\"snapshot_poll_ms\" must be between 100"),
            ("zero timeout", r#"{"callout_timeout_ms":0}"#, "\"callout_timeout_ms\""),
            ("zero batch", r#"{"log_batch_max":0}"#, "\"log_batch_max\""),
            ("flush too fast", r#"{"log_flush_ms":1}"#, "\"log_flush_ms\""),
            ("ttl over a day", r#"{"credential_cache_ttl_ms":86400001}"#, "\"credential_cache_ttl_ms\""),
            ("tls header with a space", r#"{"tls_header":"x tls"}"#, "\"tls_header\""),
            ("tls header pseudo", r#"{"tls_header":":authority"}"#, "\"tls_header\""),
            ("tls header reserved", r#"{"tls_header":"Authorization"}"#, "cannot be \"authorization\""),
            ("tls header is the tunnel's", r#"{"tls_header":"X-Agent-Vault-Tunnel"}"#, "cannot be \"x-agent-vault-tunnel\""),
            ("unknown mode", r#"{"mode":"sidecar"}"#, "unknown variant `sidecar`"),
            ("body bound too small", r#"{"max_substitution_body_bytes":10}"#, "\"max_substitution_body_bytes\" must be between 1024 and 67108864"),
            ("body bound too large", r#"{"max_substitution_body_bytes":1000000000}"#, "\"max_substitution_body_bytes\""),
            ("wait too short", r#"{"snapshot_wait_ms":999}"#, "\"snapshot_wait_ms\" must be 0 (no long-poll: plain polling) or between 1000 and 60000, not 999"),
            ("wait over the control plane's bound", r#"{"snapshot_wait_ms":60001}"#, "not 60001"),
            ("wait in seconds", r#"{"snapshot_wait_ms":"25s"}"#, "invalid type"),
            ("unknown request log", r#"{"request_log":"file"}"#, "unknown variant `file`, expected `post` or `access_log`"),
            ("request log spelled as Envoy's field", r#"{"request_log":"accessLog"}"#, "unknown variant `accessLog`"),
        ];
        for (behaviour, json, needle) in cases {
            let message = match Config::parse(json.as_bytes()) {
                Ok(config) => panic!("{behaviour}: accepted {config:?}"),
                Err(error) => error.to_string(),
            };
            assert!(message.contains(needle), "{behaviour}: {message}");
            assert!(
                message.starts_with("invalid plugin configuration: "),
                "{message}"
            );
            assert!(!message.contains('\n'), "{behaviour}: {message}");
        }
    }
}
