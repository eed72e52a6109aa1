//! The data-plane protocol between the filter and the control plane (DESIGN.md §4):
//! JSON bodies over the control plane's Unix socket.
//!
//! The snapshot carries rules and agents' token hashes, never a credential value;
//! values travel only in [`CredentialsResponse`], whose `Debug` output is redacted.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::service::{RateLimit, Service, UnmatchedHostPolicy};

/// `GET`: the rules snapshot (`If-None-Match: "<version>"` → 304 when unchanged).
pub const SNAPSHOT_PATH: &str = "/v1/dataplane/snapshot";
/// `POST` a [`CredentialsRequest`] → [`CredentialsResponse`].
pub const CREDENTIALS_PATH: &str = "/v1/dataplane/credentials";
/// `POST` a JSON array of [`LogRecord`] → 204.
pub const LOGS_PATH: &str = "/v1/dataplane/logs";
/// `GET` → [`DataplaneCounts`]: data-plane requests counted since start (not in
/// DESIGN.md §4; see the control plane's API.md).
pub const STATS_PATH: &str = "/v1/dataplane/stats";
/// Response header the control plane sets on every data-plane reply, so the filter can
/// tell them from the 503/504 replies Envoy synthesizes when the socket is down or slow.
pub const CONTROL_PLANE_HEADER: &str = "x-agent-vault-control-plane";
/// The `type` values of [`crate::Auth`], for the 403 `proposal_hint`.
pub const SUPPORTED_AUTH_TYPES: [&str; 5] = ["bearer", "basic", "api-key", "custom", "passthrough"];

/// The query parameter of a snapshot long-poll: `GET /v1/dataplane/snapshot?wait_ms=N`
/// with `If-None-Match` equal to the current version is held until the version changes
/// (200) or `N` ms pass (304). Without it (or with 0) the answer is immediate.
pub const SNAPSHOT_WAIT_PARAM: &str = "wait_ms";
/// The longest wait a snapshot long-poll may ask for; a longer one is refused (400).
pub const MAX_SNAPSHOT_WAIT_MS: u64 = 60_000;

/// Everything the filter needs to authenticate agents and match services.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Changes on every write that affects rules, agents or credentials; sent back in
    /// `If-None-Match`.
    pub version: String,
    /// Every vault with its services.
    pub vaults: Vec<SnapshotVault>,
    /// Every agent that can use the proxy.
    pub agents: Vec<SnapshotAgent>,
}

/// A vault's rules in the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotVault {
    /// Vault name.
    pub name: String,
    /// What to do with a host no service matches.
    #[serde(default)]
    pub unmatched_host_policy: UnmatchedHostPolicy,
    /// Services in declaration order (the order breaks matching ties).
    pub services: Vec<Service>,
    /// Hosts whose HTTPS tunnels go through untouched, never decrypted (clients that
    /// pin certificates): patterns as [`crate::host::parse_passthrough_host`] takes
    /// them. Never for a host a service that injects a credential names: that service
    /// wins. Empty by default.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub passthrough_hosts: Vec<String>,
    /// At most this many requests per agent token in each window, over all the vault's
    /// services together (each service's own `rate_limit` still applies). `None`
    /// (absent in JSON): no vault-wide limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

/// An agent in the snapshot: identified by the SHA-256 of its token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotAgent {
    /// Lowercase hex SHA-256 of the agent token.
    pub token_sha256: String,
    /// Agent name.
    pub name: String,
    /// Vaults the agent may use.
    pub vaults: Vec<Grant>,
    /// Unix seconds after which the token is refused; `None` never expires.
    #[serde(default)]
    pub expires_at: Option<i64>,
}

/// An agent's access to one vault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Vault name.
    pub vault: String,
    /// What the agent may do in it.
    #[serde(default)]
    pub role: Role,
}

/// An agent's role in a vault.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Use the proxy, create and read its proposals, discover service names and keys.
    #[default]
    Proxy,
}

/// Filter → control plane: the values of some keys, for one agent and vault. The
/// control plane re-checks the agent's access.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialsRequest {
    /// Lowercase hex SHA-256 of the agent token.
    pub token_sha256: String,
    /// Vault name.
    pub vault: String,
    /// Keys wanted.
    pub keys: Vec<String>,
}

/// Control plane → filter: decrypted values, and the keys the vault does not have.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialsResponse {
    /// Key → decrypted value.
    pub values: BTreeMap<String, String>,
    /// Requested keys with no credential.
    #[serde(default)]
    pub missing: Vec<String>,
}

/// Shows keys, never values.
impl fmt::Debug for CredentialsResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Redacted<'a>(&'a BTreeMap<String, String>);
        impl fmt::Debug for Redacted<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_map()
                    .entries(self.0.keys().map(|k| (k, "<redacted>")))
                    .finish()
            }
        }
        f.debug_struct("CredentialsResponse")
            .field("values", &Redacted(&self.values))
            .field("missing", &self.missing)
            .finish()
    }
}

/// One proxied request in the request log: no header values, no query string, no body.
/// Unknown fields are refused, so a record can never smuggle extra data into the log.
///
/// The text fields are `String` when a record is read; the filter writes records with
/// `S = &str`, borrowing its own state, so logging a request allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogRecord<S = String> {
    /// Unix milliseconds.
    pub ts: i64,
    /// Agent name.
    pub agent: S,
    /// Vault name.
    pub vault: S,
    /// HTTP method.
    pub method: S,
    /// Request host (without port).
    pub host: S,
    /// Request path without the query string.
    pub path: S,
    /// Matched service, if any.
    pub service: Option<S>,
    /// Status sent to the agent.
    pub status: u16,
    /// Time from request to response.
    pub latency_ms: u64,
    /// Error code when the filter answered itself (`forbidden`, ...).
    pub error: Option<S>,
    /// Occurrences of an injected credential the filter replaced in the response
    /// (its headers and body); omitted when none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub redactions: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Most records one request-log batch may carry (`POST` [`LOGS_PATH`]).
pub const MAX_LOG_BATCH_RECORDS: usize = 1000;
/// Longest path a request-log record keeps, in bytes.
pub const MAX_LOG_PATH: usize = 2048;
/// Longest method a request-log record keeps, in bytes.
pub const MAX_LOG_METHOD: usize = 32;
/// Longest host a request-log record keeps (a DNS name's limit).
pub const MAX_LOG_HOST: usize = 253;
/// Longest agent, vault or service name a request-log record keeps.
pub const MAX_LOG_NAME: usize = 128;
/// Longest error code a request-log record keeps.
pub const MAX_LOG_ERROR: usize = 64;

/// What of a request path may be logged: no query string, no fragment (either can
/// carry a secret), at most [`MAX_LOG_PATH`] bytes.
pub fn loggable_path(path: &str) -> &str {
    let path = path
        .find(['?', '#'])
        .and_then(|end| path.get(..end))
        .unwrap_or(path);
    truncated(path, MAX_LOG_PATH)
}

/// `text` cut to at most `max` bytes, at a character boundary.
pub fn truncated(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.get(..end).unwrap_or_default()
}

fn truncate(text: &mut String, max: usize) {
    let keep = truncated(text, max).len();
    text.truncate(keep);
}

impl LogRecord {
    /// The record as it may be stored: the path cut by [`loggable_path`], every text
    /// field capped by its limit. The filter sends records like this already; the
    /// control plane applies it again to whatever arrives.
    pub fn sanitized(mut self) -> LogRecord {
        let path = loggable_path(&self.path).len();
        self.path.truncate(path);
        truncate(&mut self.host, MAX_LOG_HOST);
        truncate(&mut self.method, MAX_LOG_METHOD);
        truncate(&mut self.agent, MAX_LOG_NAME);
        truncate(&mut self.vault, MAX_LOG_NAME);
        if let Some(service) = self.service.as_mut() {
            truncate(service, MAX_LOG_NAME);
        }
        if let Some(error) = self.error.as_mut() {
            truncate(error, MAX_LOG_ERROR);
        }
        self
    }
}

/// Data-plane requests counted by route since the control plane started, and its last
/// snapshot build (what `GET` [`STATS_PATH`] answers). No names, no secrets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataplaneCounts {
    /// Snapshot polls answered 200 with the snapshot.
    pub snapshot_full: u64,
    /// Snapshot polls answered 304.
    pub snapshot_not_modified: u64,
    /// Credential fetches.
    pub credentials: u64,
    /// Request-log batches posted.
    pub logs: u64,
    /// Request-log records in those batches.
    pub log_records: u64,
    /// `ext_authz` checks.
    pub ext_authz: u64,
    /// Snapshots built (once per version that was asked for).
    pub snapshot_builds: u64,
    /// Microseconds the last build took (read the store and serialize).
    pub last_build_us: u64,
    /// Size of the last snapshot built, in bytes.
    pub last_snapshot_bytes: u64,
    /// Snapshot requests that asked to wait ([`SNAPSHOT_WAIT_PARAM`]); their answers
    /// count in `snapshot_full` / `snapshot_not_modified` too.
    #[serde(default)]
    pub long_polls: u64,
    /// Long-polls held right now (a gauge: one per filter worker, normally).
    #[serde(default)]
    pub long_polls_held: u64,
    /// Request-log records received through Envoy's gRPC access log (`access_log`
    /// mode), stored like posted ones.
    #[serde(default)]
    pub als_records: u64,
    /// Access-log entries without the filter's state (requests the filter never saw,
    /// e.g. Envoy's own early refusals), or with a state that does not decode: not
    /// stored.
    #[serde(default)]
    pub als_skipped: u64,
}

impl DataplaneCounts {
    /// The requests counted between `before` and this reading (the last build's
    /// figures are this reading's).
    pub fn since(self, before: DataplaneCounts) -> DataplaneCounts {
        DataplaneCounts {
            snapshot_full: self.snapshot_full.saturating_sub(before.snapshot_full),
            snapshot_not_modified: self
                .snapshot_not_modified
                .saturating_sub(before.snapshot_not_modified),
            credentials: self.credentials.saturating_sub(before.credentials),
            logs: self.logs.saturating_sub(before.logs),
            log_records: self.log_records.saturating_sub(before.log_records),
            ext_authz: self.ext_authz.saturating_sub(before.ext_authz),
            snapshot_builds: self.snapshot_builds.saturating_sub(before.snapshot_builds),
            last_build_us: self.last_build_us,
            last_snapshot_bytes: self.last_snapshot_bytes,
            long_polls: self.long_polls.saturating_sub(before.long_polls),
            long_polls_held: self.long_polls_held,
            als_records: self.als_records.saturating_sub(before.als_records),
            als_skipped: self.als_skipped.saturating_sub(before.als_skipped),
        }
    }

    /// Every data-plane request counted.
    pub fn calls(&self) -> u64 {
        self.snapshot_full
            + self.snapshot_not_modified
            + self.credentials
            + self.logs
            + self.ext_authz
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Auth;

    fn snapshot() -> Snapshot {
        Snapshot {
            version: "42".to_owned(),
            vaults: vec![SnapshotVault {
                name: "default".to_owned(),
                unmatched_host_policy: UnmatchedHostPolicy::Deny,
                services: vec![Service {
                    name: "stripe".to_owned(),
                    host: "api.stripe.com".to_owned(),
                    enabled: true,
                    auth: Auth::Bearer {
                        token: "STRIPE_KEY".to_owned(),
                    },
                    upstream_tls: true,
                    methods: None,
                    rate_limit: None,
                    substitutions: Vec::new(),
                    redact_responses: None,
                    upstream_h2c: false,
                }],
                passthrough_hosts: vec![],
                rate_limit: None,
            }],
            agents: vec![SnapshotAgent {
                token_sha256: "ab".repeat(32),
                name: "claude".to_owned(),
                vaults: vec![Grant {
                    vault: "default".to_owned(),
                    role: Role::Proxy,
                }],
                expires_at: None,
            }],
        }
    }

    #[test]
    fn snapshot_json_has_the_designed_shape() {
        let json = serde_json::to_value(snapshot()).unwrap_or_default();
        let expected = serde_json::json!({
            "version": "42",
            "vaults": [{
                "name": "default",
                "unmatched_host_policy": "deny",
                "services": [{
                    "name": "stripe",
                    "host": "api.stripe.com",
                    "enabled": true,
                    "auth": {"type": "bearer", "token": "STRIPE_KEY"},
                    "upstream_tls": true
                }]
            }],
            "agents": [{
                "token_sha256": "ab".repeat(32),
                "name": "claude",
                "vaults": [{"vault": "default", "role": "proxy"}],
                "expires_at": null
            }]
        });
        assert_eq!(json, expected);
        let back: Option<Snapshot> = serde_json::from_value(json).ok();
        assert_eq!(back, Some(snapshot()));
    }

    #[test]
    fn a_services_methods_travel_in_the_snapshot_only_when_set() {
        let mut with = snapshot();
        with.vaults[0].services[0].methods = Some(vec!["GET".to_owned(), "HEAD".to_owned()]);
        let json = serde_json::to_value(&with).unwrap_or_default();
        assert_eq!(
            json["vaults"][0]["services"][0]["methods"],
            serde_json::json!(["GET", "HEAD"])
        );
        let back: Snapshot = serde_json::from_value(json).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, with);
        // A snapshot from before methods existed parses, every method allowed.
        let without = serde_json::to_string(&snapshot()).unwrap_or_default();
        assert!(!without.contains("methods"), "{without}");
        let old: Snapshot = serde_json::from_str(&without).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(old.vaults[0].services[0].methods, None);
    }

    #[test]
    fn optional_snapshot_fields_have_defaults() {
        let json = r#"{"version":"1","vaults":[{"name":"v1x","services":[]}],
            "agents":[{"token_sha256":"00","name":"a","vaults":[{"vault":"v1x"}]}]}"#;
        let parsed: Snapshot = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            parsed.vaults.first().map(|v| v.unmatched_host_policy),
            Some(UnmatchedHostPolicy::Deny)
        );
        let agent = parsed.agents.first();
        assert_eq!(agent.and_then(|a| a.expires_at), None);
        assert_eq!(
            agent.and_then(|a| a.vaults.first()).map(|g| g.role),
            Some(Role::Proxy)
        );
    }

    #[test]
    fn credentials_round_trip() {
        let request = CredentialsRequest {
            token_sha256: "ff".repeat(32),
            vault: "default".to_owned(),
            keys: vec!["A".to_owned(), "B".to_owned()],
        };
        let json = serde_json::to_string(&request).unwrap_or_default();
        assert_eq!(
            json,
            format!(
                r#"{{"token_sha256":"{}","vault":"default","keys":["A","B"]}}"#,
                "ff".repeat(32)
            )
        );
        assert_eq!(
            serde_json::from_str::<CredentialsRequest>(&json).ok(),
            Some(request)
        );

        let response: CredentialsResponse =
            serde_json::from_str(r#"{"values":{"A":"secret-a"},"missing":["B"]}"#)
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            response.values.get("A").map(String::as_str),
            Some("secret-a")
        );
        assert_eq!(response.missing, vec!["B".to_owned()]);
    }

    #[test]
    fn credentials_response_debug_redacts_values() {
        let response = CredentialsResponse {
            values: BTreeMap::from([("STRIPE_KEY".to_owned(), "sk_live_secret".to_owned())]),
            missing: vec!["OTHER".to_owned()],
        };
        let debug = format!("{response:?}");
        assert!(
            debug.contains("STRIPE_KEY") && debug.contains("OTHER"),
            "{debug}"
        );
        assert!(!debug.contains("sk_live_secret"), "{debug}");
    }

    #[test]
    fn a_borrowed_log_record_is_written_like_an_owned_one() {
        let borrowed = LogRecord {
            ts: 5,
            agent: "claude",
            vault: "default",
            method: "POST",
            host: "api.stripe.com",
            path: "/v1",
            service: Some("stripe"),
            status: 200,
            latency_ms: 3,
            error: None,
            redactions: 0,
        };
        let json = serde_json::to_string(&borrowed).unwrap_or_default();
        let owned: Option<LogRecord> = serde_json::from_str(&json).ok();
        assert_eq!(
            owned.map(|r| (r.agent, r.service)),
            Some(("claude".to_owned(), Some("stripe".to_owned())))
        );
    }

    #[test]
    fn a_log_records_redactions_are_omitted_when_none_and_read_when_present() {
        let base = serde_json::json!({
            "ts": 1, "agent": "a", "vault": "v", "method": "GET", "host": "h", "path": "/",
            "service": "s", "status": 200, "latency_ms": 1, "error": null
        });
        let old: Option<LogRecord> = serde_json::from_value(base.clone()).ok();
        assert_eq!(
            old.map(|r| r.redactions),
            Some(0),
            "a record without the field"
        );
        let mut with = base;
        with["redactions"] = serde_json::json!(3);
        let record: Option<LogRecord> = serde_json::from_value(with.clone()).ok();
        assert_eq!(record.as_ref().map(|r| r.redactions), Some(3));
        assert_eq!(
            record.map(|r| serde_json::to_value(r).ok()),
            Some(Some(with))
        );
    }

    #[test]
    fn log_record_round_trip() {
        let record = LogRecord {
            ts: 1_700_000_000_000,
            agent: "claude".to_owned(),
            vault: "default".to_owned(),
            method: "GET".to_owned(),
            host: "api.stripe.com".to_owned(),
            path: "/v1/charges".to_owned(),
            service: None,
            status: 403,
            latency_ms: 1,
            error: Some("forbidden".to_owned()),
            redactions: 0,
        };
        let json = serde_json::to_value(vec![record.clone()]).unwrap_or_default();
        assert_eq!(
            json,
            serde_json::json!([{
                "ts": 1_700_000_000_000_i64, "agent": "claude", "vault": "default", "method": "GET",
                "host": "api.stripe.com", "path": "/v1/charges", "service": null, "status": 403,
                "latency_ms": 1, "error": "forbidden"
            }])
        );
        assert_eq!(
            serde_json::from_value::<Vec<LogRecord>>(json).ok(),
            Some(vec![record])
        );
    }

    #[test]
    fn log_record_refuses_unknown_fields() {
        let json = serde_json::json!({
            "ts": 1, "agent": "a", "vault": "default", "method": "GET", "host": "h",
            "path": "/", "service": null, "status": 200, "latency_ms": 0, "error": null,
            "authorization": "Bearer sk_live_x"
        });
        assert!(serde_json::from_value::<LogRecord>(json).is_err());
    }

    #[test]
    fn loggable_paths_lose_query_and_fragment_and_are_cut_on_a_character() {
        #[rustfmt::skip]
        let cases: [(&str, String, String); 5] = [
            ("a query string goes", "/v1?api_key=secret".into(), "/v1".into()),
            ("a fragment goes", "/v1#frag?x".into(), "/v1".into()),
            ("a plain path stays", "/v1/charges".into(), "/v1/charges".into()),
            ("a long path is cut", format!("/{}", "p".repeat(3000)), format!("/{}", "p".repeat(MAX_LOG_PATH - 1))),
            ("a cut never splits a character", format!("/{}", "é".repeat(2000)), format!("/{}", "é".repeat((MAX_LOG_PATH - 1) / 2))),
        ];
        for (behaviour, path, expected) in cases {
            assert_eq!(loggable_path(&path), expected, "{behaviour}");
        }
    }

    #[test]
    fn a_sanitized_record_keeps_every_field_within_its_limit() {
        let record = LogRecord {
            ts: 1,
            agent: "é".repeat(100),
            vault: "v".repeat(200),
            method: "M".repeat(40),
            host: "h".repeat(300),
            path: "/a?token=secret".to_owned(),
            service: Some("s".repeat(200)),
            status: 200,
            latency_ms: 0,
            error: Some("e".repeat(100)),
            redactions: 0,
        }
        .sanitized();
        assert_eq!(record.agent, "é".repeat(64));
        assert_eq!(record.vault.len(), MAX_LOG_NAME);
        assert_eq!(record.method.len(), MAX_LOG_METHOD);
        assert_eq!(record.host.len(), MAX_LOG_HOST);
        assert_eq!(record.path, "/a");
        assert_eq!(record.service.as_deref().map(str::len), Some(MAX_LOG_NAME));
        assert_eq!(record.error.as_deref().map(str::len), Some(MAX_LOG_ERROR));
    }

    #[test]
    fn supported_auth_types_match_the_model() {
        let all = [
            Auth::Bearer { token: "K".into() },
            Auth::Basic {
                username: "U".into(),
                password: "P".into(),
            },
            Auth::ApiKey {
                key: "K".into(),
                header: "x-api-key".into(),
                prefix: String::new(),
            },
            Auth::Custom {
                headers: BTreeMap::new(),
            },
            Auth::Passthrough {},
        ];
        let names: Vec<&str> = all.iter().map(Auth::type_name).collect();
        assert_eq!(names, SUPPORTED_AUTH_TYPES);
    }

    #[test]
    fn protocol_constants() {
        assert_eq!(SNAPSHOT_PATH, "/v1/dataplane/snapshot");
        assert_eq!(CREDENTIALS_PATH, "/v1/dataplane/credentials");
        assert_eq!(LOGS_PATH, "/v1/dataplane/logs");
        assert_eq!(CONTROL_PLANE_HEADER, "x-agent-vault-control-plane");
    }
}
