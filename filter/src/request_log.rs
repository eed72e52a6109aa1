//! The request log: one [`LogRecord`] per request the filter handled (forwarded or
//! refused), batched per worker and posted to the control plane fire-and-forget.
//!
//! A record holds names, the method, the host without port or userinfo, the path
//! without query string or fragment, the status and the latency. Never a header value,
//! a query string or a body: a query string can carry an API key.

use std::rc::Rc;

use agent_vault_rules::reply::ErrorCode;
use agent_vault_rules::{loggable_path, truncated, LogRecord, LogState, MAX_LOG_METHOD};
use serde::Serialize;

use crate::decide::Secrets;
use crate::substitute::BodyPlan;

/// A batch this large is sent whatever its record count: well under the control
/// plane's 1 MiB body limit even with one more record of the longest kind.
pub const MAX_BATCH_BYTES: usize = 512 * 1024;

/// What one request's record will say, filled in as the request is decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestLog {
    /// Unix ms when the request headers arrived; `None`: never seen, never logged.
    pub started_ms: Option<u64>,
    /// HTTP method.
    pub method: String,
    /// Normalized host, no port.
    pub host: String,
    /// Path without query string or fragment.
    pub path: String,
    /// Authenticated agent.
    pub agent: Option<Rc<str>>,
    /// Never logged: the authenticated agent's token hash (an upgraded stream is
    /// re-checked against it, [`crate::upgrades`]).
    pub token_sha256: Option<Rc<str>>,
    /// Resolved vault (only a vault the agent may use).
    pub vault: Option<Rc<str>>,
    /// Matched service.
    pub service: Option<Rc<str>>,
    /// Set when the filter answered itself.
    pub error: Option<ErrorCode>,
    /// The `:status` of the response headers, when they passed through the filter.
    pub response_status: Option<u16>,
    /// Never logged: the values a forwarded request was given, for its body and its
    /// response. Kept here because this is the state a paused request shares with
    /// the flight that finishes it ([`crate::flight::Waiter`]).
    pub secrets: Option<Rc<Secrets>>,
    /// Never logged: what the request's body callbacks do (set when its headers are
    /// forwarded; until then, and after a refusal, the body is held). Shared for the
    /// same reason as `secrets`.
    pub body: BodyPlan,
    /// Occurrences of a secret replaced in the response ([`crate::redact`]).
    pub redactions: u64,
    /// `request_log: "access_log"`: what only the filter knows goes to Envoy as filter
    /// state ([`RequestLog::state`]) instead of a record built here; `method` and
    /// `path` stay empty (Envoy logs its own) unless Envoy would log them wrong: a
    /// method its access log cannot name, a path the filter rewrote.
    pub access_log: bool,
}

impl RequestLog {
    /// Starts a record: `method` and `path` cut to what may be logged. In
    /// `access_log` mode Envoy logs the path, and the method unless it is one its
    /// access log cannot name: only such a method is kept.
    pub fn start(&mut self, now_ms: u64, method: &str, path: &str) {
        self.started_ms = Some(now_ms);
        if self.access_log {
            if !agent_vault_rules::envoy_names_method(method) {
                self.method = truncated(method, MAX_LOG_METHOD).to_owned();
            }
            return;
        }
        self.method = truncated(method, MAX_LOG_METHOD).to_owned();
        self.path = loggable_path(path).to_owned();
    }

    /// What the filter sets as filter state in `access_log` mode: the fields of the
    /// record Envoy does not know.
    pub fn state(&self) -> LogState<&str> {
        LogState {
            agent: self.agent.as_deref().unwrap_or_default(),
            vault: self.vault.as_deref().unwrap_or_default(),
            service: self.service.as_deref(),
            host: &self.host,
            error: self.error.map(ErrorCode::as_str),
            redactions: self.redactions,
            method: (!self.method.is_empty()).then_some(self.method.as_str()),
            path: (!self.path.is_empty()).then_some(self.path.as_str()),
        }
    }

    /// The record, at `now_ms`, borrowing this state. The status is the response's
    /// (`response_status`) when known; otherwise the status the filter sent; otherwise 0.
    pub fn record(&self, now_ms: u64) -> Option<LogRecord<&str>> {
        let started = self.started_ms?;
        let status = self
            .response_status
            .or_else(|| self.error.map(ErrorCode::status))
            .unwrap_or(0);
        Some(LogRecord {
            ts: i64::try_from(started).unwrap_or(i64::MAX),
            agent: self.agent.as_deref().unwrap_or_default(),
            vault: self.vault.as_deref().unwrap_or_default(),
            method: &self.method,
            host: &self.host,
            path: &self.path,
            service: self.service.as_deref(),
            status,
            latency_ms: now_ms.saturating_sub(started),
            error: self.error.map(ErrorCode::as_str),
            redactions: self.redactions,
        })
    }
}

/// Records waiting to be posted, already written as the JSON array the control plane
/// takes (`POST /v1/dataplane/logs`): a record is serialized when it is added, so
/// nothing is kept per record but its bytes.
#[derive(Debug)]
pub struct LogBatch {
    body: Vec<u8>,
    records: usize,
    max: usize,
    last_flush_ms: u64,
}

impl LogBatch {
    /// An empty batch that is full at `max` records.
    pub fn new(max: usize, now_ms: u64) -> LogBatch {
        LogBatch {
            body: Vec::new(),
            records: 0,
            max,
            last_flush_ms: now_ms,
        }
    }

    /// Adds a record.
    pub fn push<S: Serialize>(&mut self, record: &LogRecord<S>) {
        let before = self.body.len();
        self.body.push(if self.records == 0 { b'[' } else { b',' });
        if serde_json::to_writer(&mut self.body, record).is_ok() {
            self.records += 1;
        } else {
            // Cannot happen for these fields; the batch stays valid JSON regardless.
            self.body.truncate(before);
        }
    }

    /// Whether the batch should be sent now.
    pub fn is_full(&self) -> bool {
        self.records >= self.max || self.body.len() >= MAX_BATCH_BYTES
    }

    /// Records waiting.
    pub fn len(&self) -> usize {
        self.records
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// The JSON body to post when the batch is full or `flush_ms` passed since the
    /// last flush; the batch is emptied (fire and forget). `None`: nothing to send yet.
    pub fn take_due(&mut self, now_ms: u64, flush_ms: u64) -> Option<Vec<u8>> {
        let elapsed = now_ms.saturating_sub(self.last_flush_ms) >= flush_ms;
        if self.is_empty() || !(elapsed || self.is_full()) {
            return None;
        }
        self.last_flush_ms = now_ms;
        self.records = 0;
        // The next batch starts with room for one like this.
        let capacity = self.body.len() + self.body.len() / 8;
        let mut body = std::mem::replace(&mut self.body, Vec::with_capacity(capacity));
        body.push(b']');
        Some(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_has_no_query_string_and_names_what_was_resolved() {
        let mut log = RequestLog::default();
        log.start(
            1_700_000_000_000,
            "GET",
            "/v1/charges?api_key=sk_live_secret#frag",
        );
        log.host = "api.stripe.com".into();
        log.agent = Some("claude".into());
        log.vault = Some("default".into());
        log.service = Some("stripe".into());
        log.response_status = Some(200);
        let record = log
            .record(1_700_000_000_042)
            .unwrap_or_else(|| panic!("a started request is logged"));
        assert_eq!(
            record,
            LogRecord {
                ts: 1_700_000_000_000,
                agent: "claude",
                vault: "default",
                method: "GET",
                host: "api.stripe.com",
                path: "/v1/charges",
                service: Some("stripe"),
                status: 200,
                latency_ms: 42,
                error: None,
                redactions: 0,
            }
        );
        let json = serde_json::to_string(&record).unwrap_or_default();
        assert!(
            !json.contains("sk_live_secret") && !json.contains("frag"),
            "{json}"
        );
    }

    #[test]
    fn a_refused_request_logs_the_filter_status_and_error() {
        let mut log = RequestLog::default();
        log.start(10, "CONNECT", "");
        log.error = Some(ErrorCode::ConnectNotSupported);
        let record = log.record(12).unwrap_or_else(|| panic!("logged"));
        assert_eq!(record.status, 405);
        assert_eq!(record.error, Some("connect_not_supported"));
        assert_eq!(record.agent, "");
        assert_eq!(record.vault, "");
        assert_eq!(record.service, None);
        // The response's status wins when known.
        log.response_status = Some(502);
        assert_eq!(log.record(12).map(|r| r.status), Some(502));
    }

    #[test]
    fn unstarted_requests_are_not_logged() {
        assert_eq!(RequestLog::default().record(5), None);
    }

    #[test]
    fn long_paths_and_methods_are_cut() {
        let mut log = RequestLog::default();
        log.start(0, &"M".repeat(100), &format!("/{}", "é".repeat(3000)));
        assert!(log.path.len() <= agent_vault_rules::MAX_LOG_PATH);
        assert!(log.path.starts_with("/é"));
        assert_eq!(log.method.len(), MAX_LOG_METHOD);
    }

    #[test]
    fn batch_flushes_when_due_or_full() {
        let record = |ts| LogRecord {
            ts,
            agent: String::new(),
            vault: String::new(),
            method: "GET".into(),
            host: "h".into(),
            path: "/".into(),
            service: None,
            status: 200,
            latency_ms: 0,
            error: None,
            redactions: 0,
        };
        let mut batch = LogBatch::new(3, 1000);
        assert_eq!(
            batch.take_due(5000, 1000),
            None,
            "empty batch sends nothing"
        );
        batch.push(&record(1));
        assert!(batch.take_due(1500, 1000).is_none(), "not due yet");
        let body = batch.take_due(2000, 1000).unwrap_or_default();
        let sent: Vec<LogRecord> = serde_json::from_slice(&body).unwrap_or_default();
        assert_eq!(sent, vec![record(1)]);
        assert!(batch.is_empty());
        for ts in 0..3 {
            batch.push(&record(ts));
        }
        assert!(batch.is_full());
        let body = batch.take_due(2001, 1000).unwrap_or_default();
        let sent: Vec<LogRecord> = serde_json::from_slice(&body).unwrap_or_default();
        assert_eq!(sent.len(), 3, "a full batch goes at once");
    }

    #[test]
    fn a_batch_of_long_paths_is_full_by_size_well_under_the_control_plane_limit() {
        let mut log = RequestLog::default();
        log.start(0, "GET", &format!("/{}", "p".repeat(5000)));
        log.host = "h".repeat(253);
        let mut batch = LogBatch::new(1000, 0);
        let mut records = 0;
        while !batch.is_full() {
            batch.push(&log.record(1).unwrap_or_else(|| panic!("started")));
            records += 1;
        }
        assert!(records < 1000, "full by size after {records} records");
        let body = batch.take_due(2, 1000).unwrap_or_default();
        assert!(body.len() < 1024 * 1024 * 3 / 4, "{} bytes", body.len());
        let sent: Vec<LogRecord> = serde_json::from_slice(&body).unwrap_or_default();
        assert_eq!(sent.len(), records);
    }
}
