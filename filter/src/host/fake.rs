//! A [`Host`] for unit tests that plays Envoy's part and records what the filter asks
//! of it.
//!
//! Calls that act on a request are recorded with the context they act on (the current
//! one), so a test sees which request was forwarded, refused or resumed. Log lines and
//! stat events are recorded apart from the calls, so a test can assert the exact
//! sequence of host calls without them. Dispatches get tokens from
//! [`FakeHost::FIRST_TOKEN`] up, unless a test makes the host refuse them.

use std::collections::{BTreeMap, BTreeSet};

use agent_vault_rules::reply::{self, Reject};
use agent_vault_rules::CredentialsRequest;

use super::{CallResponse, Host, LogLevel, Refused, Stat, TunnelInfo};
use crate::config::Config;
use crate::decide::{Forward, Route};
use crate::header_map::{serialize, HeaderMap};
use crate::rate_limit::{MemoryStore, SetError, SharedStore};
use crate::stats::Callout;

/// A host call, as the fake saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// The request headers of `context` were read.
    ReadRequestHeaders {
        /// The current context.
        context: u32,
    },
    /// The response status of `context` was read.
    ReadResponseStatus {
        /// The current context.
        context: u32,
    },
    /// The response code details of `context` were read.
    ReadResponseCodeDetails {
        /// The current context.
        context: u32,
    },
    /// What Envoy knows of `context`'s tunnel was read.
    ReadTunnel {
        /// The current context.
        context: u32,
    },
    /// The callout answer being delivered was read.
    ReadCallResponse,
    /// A request was forwarded.
    Forward {
        /// The current context.
        context: u32,
        /// The `:path` of the headers passed as known (whose headers they are).
        known_path: Option<String>,
        /// Headers injected.
        inject: Vec<(String, String)>,
        /// The routing header's value.
        route: &'static str,
        /// The tunnel identity set on a `CONNECT` (encoded).
        tunnel: Option<String>,
    },
    /// The filter answered a request itself.
    Reject {
        /// The current context.
        context: u32,
        /// HTTP status.
        status: u16,
        /// The error code.
        code: &'static str,
    },
    /// The filter refused a gRPC call (trailers-only, `grpc-status`).
    GrpcReject {
        /// The current context.
        context: u32,
        /// The `grpc-status`.
        grpc_status: u8,
        /// The error code.
        code: &'static str,
    },
    /// A paused request was resumed.
    Resume {
        /// The current context.
        context: u32,
    },
    /// The filter made `context` current; `known`: Envoy still knew it.
    SwitchTo {
        /// The context asked for.
        context: u32,
        /// Whether the switch happened.
        known: bool,
    },
    /// A credential fetch, from the current context (`token: None`: refused).
    DispatchCredentials {
        /// The current context (it receives the answer).
        from: u32,
        /// The keys asked for.
        keys: Vec<String>,
        /// The token given.
        token: Option<u32>,
    },
    /// A snapshot poll (`token: None`: refused).
    DispatchPoll {
        /// The `if-none-match` header.
        if_none_match: Option<String>,
        /// The token given.
        token: Option<u32>,
    },
    /// A snapshot long-poll (`token: None`: refused).
    DispatchLongPoll {
        /// Its `:path` (with the wait).
        path: String,
        /// The `if-none-match` header.
        if_none_match: Option<String>,
        /// The callout timeout asked for.
        timeout_ms: u64,
        /// The token given.
        token: Option<u32>,
    },
    /// A request-log batch was posted (or refused: `sent` false).
    PostLogs {
        /// Its records, each as `method path status [error]`.
        records: Vec<String>,
        /// Whether the host took it.
        sent: bool,
    },
    /// The tick period was set.
    SetTickPeriod(u64),
    /// The metrics were defined.
    DefineStats,
    /// The counts were flushed to Envoy.
    FlushStats {
        /// Callouts older than this are no longer timed.
        max_callout_ms: u64,
    },
    /// Request headers were replaced (substitution).
    EditHeaders {
        /// The current context.
        context: u32,
        /// Each name with its new values (none: removed).
        edits: Vec<(String, Vec<String>)>,
    },
    /// The buffered request body was read.
    ReadBody {
        /// The current context.
        context: u32,
        /// The size asked for.
        size: usize,
    },
    /// The buffered request body was replaced.
    ReplaceBody {
        /// The current context.
        context: u32,
        /// The new body (lossy UTF-8).
        body: String,
    },
    /// A request header was set.
    SetRequestHeader {
        /// The current context.
        context: u32,
        /// Its name.
        name: String,
        /// Its value.
        value: String,
    },
    /// The response headers of `context` were read.
    ReadResponseHeaders {
        /// The current context.
        context: u32,
    },
    /// A response header was replaced (no values: removed).
    SetResponseHeader {
        /// The current context.
        context: u32,
        /// Its name.
        name: String,
        /// Its new values.
        values: Vec<String>,
    },
    /// The response body chunk of `context` was read.
    ReadResponseBody {
        /// The current context.
        context: u32,
    },
    /// The response body chunk of `context` was replaced.
    SetResponseBody {
        /// The current context.
        context: u32,
        /// The new chunk.
        body: String,
    },
    /// The stream of `context` was reset.
    ResetStream {
        /// The current context.
        context: u32,
    },
    /// A property of `context` was set (the request log's filter state).
    SetProperty {
        /// The current context.
        context: u32,
        /// The property path.
        path: String,
        /// The value (lossy UTF-8).
        value: String,
    },
}

/// The fake host. Fields are the test's controls and what was recorded.
#[derive(Debug)]
pub struct FakeHost {
    /// The clock.
    pub now_ms: u64,
    /// The context host calls act on (a test sets it to the context whose callback
    /// it runs, as Envoy does).
    pub current: u32,
    /// Contexts Envoy no longer knows: switching to them fails.
    pub gone: BTreeSet<u32>,
    /// Each context's request headers.
    pub headers: BTreeMap<u32, Vec<(&'static str, String)>>,
    /// What Envoy knows of each context's tunnel.
    pub tunnels: BTreeMap<u32, TunnelInfo>,
    /// Each context's response status.
    pub response_status: BTreeMap<u32, u16>,
    /// Each context's response code details (Envoy's reason for the status).
    pub response_code_details: BTreeMap<u32, String>,
    /// The callout answer being delivered.
    pub response: Option<CallResponse>,
    /// Refuse every callout with this status.
    pub refuse_callouts: Option<&'static str>,
    /// Every host call, in order (but logs and stats).
    pub calls: Vec<Call>,
    /// Every log line.
    pub logs: Vec<(LogLevel, String)>,
    /// Every stat event, described.
    pub stats: Vec<String>,
    /// The agent (token hash) of every credential fetch, in order.
    pub fetched_for: Vec<String>,
    /// Envoy's shared data (the rate limits' counters).
    pub shared: MemoryStore,
    /// Each context's buffered request body.
    pub bodies: BTreeMap<u32, Vec<u8>>,
    /// Each context's response headers.
    pub response_headers: BTreeMap<u32, Vec<(&'static str, String)>>,
    /// Each context's current response body chunk (replaced by `set_response_body`).
    pub response_body: BTreeMap<u32, Vec<u8>>,
    /// How many times the clock was read.
    pub clock_reads: u64,
    next_token: u32,
}

impl SharedStore for FakeHost {
    fn shared_get(&mut self, key: &str) -> (Option<Vec<u8>>, u32) {
        self.shared.shared_get(key)
    }

    fn shared_set(&mut self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError> {
        self.shared.shared_set(key, value, cas)
    }
}

impl FakeHost {
    /// The token of the first dispatch.
    pub const FIRST_TOKEN: u32 = 100;

    /// A host at `now_ms`, running context `current`.
    pub fn new(now_ms: u64, current: u32) -> FakeHost {
        FakeHost {
            now_ms,
            current,
            gone: BTreeSet::new(),
            headers: BTreeMap::new(),
            tunnels: BTreeMap::new(),
            response_status: BTreeMap::new(),
            response_code_details: BTreeMap::new(),
            response: None,
            refuse_callouts: None,
            calls: Vec::new(),
            logs: Vec::new(),
            stats: Vec::new(),
            fetched_for: Vec::new(),
            shared: MemoryStore::default(),
            bodies: BTreeMap::new(),
            response_headers: BTreeMap::new(),
            response_body: BTreeMap::new(),
            clock_reads: 0,
            next_token: Self::FIRST_TOKEN,
        }
    }

    /// Forgets what was recorded.
    pub fn clear(&mut self) {
        self.calls.clear();
        self.logs.clear();
        self.stats.clear();
    }

    /// The token the next dispatch gets.
    pub fn next_token(&self) -> u32 {
        self.next_token
    }

    fn dispatch(&mut self) -> Result<u32, Refused> {
        if let Some(status) = self.refuse_callouts {
            return Err(Refused(status.to_owned()));
        }
        let token = self.next_token;
        self.next_token += 1;
        Ok(token)
    }
}

fn describe(event: Stat<'_>) -> String {
    match event {
        Stat::Denied(code) => format!("denied {}", code.as_str()),
        Stat::Forwarded {
            forward,
            from_cache,
        } => {
            if let Route::Tunnel(_) | Route::Opaque = forward.route {
                return format!("tunnel {}", forward.route.header_value());
            }
            let what = if forward.inject.is_empty() {
                "passthrough"
            } else {
                "injected"
            };
            let how = if from_cache {
                "on arrival"
            } else {
                "after a fetch"
            };
            format!("forwarded {what} {how}")
        }
        Stat::CacheMiss => "cache miss".to_owned(),
        Stat::CalloutSent { kind, token } => {
            let kind = match kind {
                Callout::Fetch => "fetch",
                Callout::Poll => "poll",
            };
            match token {
                Some(token) => format!("{kind} {token} sent"),
                None => format!("{kind} not sent"),
            }
        }
        Stat::CalloutAnswered { token, usable } => {
            let usable = if usable { "usable" } else { "unusable" };
            format!("{token} answered {usable}")
        }
        Stat::SnapshotLoaded { version } => format!("snapshot {version}"),
        Stat::Redacted(n) => format!("redacted {n}"),
        Stat::LongPollSent { sent: true } => "long-poll sent".to_owned(),
        Stat::LongPollSent { sent: false } => "long-poll not sent".to_owned(),
        Stat::LongPollAnswered { usable } => {
            let usable = if usable { "usable" } else { "unusable" };
            format!("long-poll answered {usable}")
        }
        Stat::CacheRefresh => "cache refresh".to_owned(),
        Stat::UpgradeOpened => "upgrade opened".to_owned(),
        Stat::UpgradeRevoked => "upgrade revoked".to_owned(),
    }
}

impl Host for FakeHost {
    fn now_ms(&mut self) -> u64 {
        self.clock_reads += 1;
        self.now_ms
    }

    fn request_headers(&mut self) -> HeaderMap {
        self.calls.push(Call::ReadRequestHeaders {
            context: self.current,
        });
        let headers = self.headers.get(&self.current).cloned().unwrap_or_default();
        let pairs: Vec<(&str, &[u8])> = headers
            .iter()
            .map(|(name, value)| (*name, value.as_bytes()))
            .collect();
        HeaderMap::parse(serialize(&pairs))
    }

    fn tunnel(&mut self) -> TunnelInfo {
        self.calls.push(Call::ReadTunnel {
            context: self.current,
        });
        self.tunnels.get(&self.current).cloned().unwrap_or_default()
    }

    fn response_status(&mut self) -> Option<u16> {
        self.calls.push(Call::ReadResponseStatus {
            context: self.current,
        });
        self.response_status.get(&self.current).copied()
    }

    fn response_code_details(&mut self) -> String {
        self.calls.push(Call::ReadResponseCodeDetails {
            context: self.current,
        });
        self.response_code_details
            .get(&self.current)
            .cloned()
            .unwrap_or_default()
    }

    fn call_response(&mut self, _num_headers: usize, _body_size: usize) -> CallResponse {
        self.calls.push(Call::ReadCallResponse);
        self.response.take().unwrap_or_default()
    }

    fn apply_forward(&mut self, _config: &Config, forward: &Forward, known: &HeaderMap) {
        self.calls.push(Call::Forward {
            context: self.current,
            known_path: known.get(":path").map(str::to_owned),
            inject: forward.inject.clone(),
            route: forward.route.header_value(),
            tunnel: match &forward.route {
                Route::Tunnel(identity) => Some(identity.encode()),
                _ => None,
            },
        });
    }

    fn send_reject(&mut self, reject: &Reject) {
        let grpc = self.headers.get(&self.current).is_some_and(|headers| {
            headers
                .iter()
                .any(|(name, value)| *name == "content-type" && reply::is_grpc(Some(value)))
        });
        if grpc {
            self.calls.push(Call::GrpcReject {
                context: self.current,
                grpc_status: reject.code.grpc_status().code(),
                code: reject.code.as_str(),
            });
            return;
        }
        self.calls.push(Call::Reject {
            context: self.current,
            status: reject.status(),
            code: reject.code.as_str(),
        });
    }

    fn resume(&mut self) {
        self.calls.push(Call::Resume {
            context: self.current,
        });
    }

    fn switch_to(&mut self, context_id: u32) -> bool {
        let known = !self.gone.contains(&context_id);
        if known {
            self.current = context_id;
        }
        self.calls.push(Call::SwitchTo {
            context: context_id,
            known,
        });
        known
    }

    fn dispatch_credentials(&mut self, _config: &Config, body: &[u8]) -> Result<u32, Refused> {
        let result = self.dispatch();
        let request = serde_json::from_slice::<CredentialsRequest>(body).ok();
        self.fetched_for
            .extend(request.as_ref().map(|r| r.token_sha256.clone()));
        let keys = request.map(|request| request.keys).unwrap_or_default();
        self.calls.push(Call::DispatchCredentials {
            from: self.current,
            keys,
            token: result.as_ref().ok().copied(),
        });
        result
    }

    /// Recorded as [`Call::DispatchLongPoll`] when the `:path` asks the control plane
    /// to wait, else as [`Call::DispatchPoll`].
    fn dispatch_poll(
        &mut self,
        _config: &Config,
        headers: &[(&'static str, String)],
        timeout_ms: u64,
    ) -> Result<u32, Refused> {
        let result = self.dispatch();
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, value)| value.clone())
        };
        let path = header(":path").unwrap_or_default();
        let if_none_match = header("if-none-match");
        let token = result.as_ref().ok().copied();
        self.calls
            .push(if path.contains(agent_vault_rules::SNAPSHOT_WAIT_PARAM) {
                Call::DispatchLongPoll {
                    path,
                    if_none_match,
                    timeout_ms,
                    token,
                }
            } else {
                Call::DispatchPoll {
                    if_none_match,
                    token,
                }
            });
        result
    }

    fn post_logs(&mut self, _config: &Config, body: &[u8]) -> Result<(), Refused> {
        let result = self.dispatch().map(|_| ());
        let records: Vec<serde_json::Value> = serde_json::from_slice(body).unwrap_or_default();
        self.calls.push(Call::PostLogs {
            records: records
                .iter()
                .map(|record| {
                    let line = format!(
                        "{} {} {}",
                        record["method"].as_str().unwrap_or_default(),
                        record["path"].as_str().unwrap_or_default(),
                        record["status"]
                    );
                    match record["error"].as_str() {
                        Some(error) => format!("{line} {error}"),
                        None => line,
                    }
                })
                .collect(),
            sent: result.is_ok(),
        });
        result
    }

    fn set_tick_period(&mut self, period_ms: u64) {
        self.calls.push(Call::SetTickPeriod(period_ms));
    }

    fn log(&mut self, level: LogLevel, message: &str) {
        self.logs.push((level, message.to_owned()));
    }

    fn define_stats(&mut self) {
        self.calls.push(Call::DefineStats);
    }

    fn stat(&mut self, event: Stat<'_>) {
        self.stats.push(describe(event));
    }

    fn flush_stats(&mut self, max_callout_ms: u64) {
        self.calls.push(Call::FlushStats { max_callout_ms });
    }

    fn edit_request_headers(&mut self, edits: &[(String, Vec<String>)]) {
        self.calls.push(Call::EditHeaders {
            context: self.current,
            edits: edits.to_vec(),
        });
    }

    fn request_body(&mut self, size: usize) -> Vec<u8> {
        self.calls.push(Call::ReadBody {
            context: self.current,
            size,
        });
        let body = self.bodies.get(&self.current).cloned().unwrap_or_default();
        body.into_iter().take(size).collect()
    }

    fn replace_request_body(&mut self, _old_size: usize, body: &[u8]) {
        self.calls.push(Call::ReplaceBody {
            context: self.current,
            body: String::from_utf8_lossy(body).into_owned(),
        });
        self.bodies.insert(self.current, body.to_vec());
    }

    fn set_request_header(&mut self, name: &str, value: &str) {
        self.calls.push(Call::SetRequestHeader {
            context: self.current,
            name: name.to_owned(),
            value: value.to_owned(),
        });
    }

    fn response_headers(&mut self) -> HeaderMap {
        self.calls.push(Call::ReadResponseHeaders {
            context: self.current,
        });
        let headers = self
            .response_headers
            .get(&self.current)
            .cloned()
            .unwrap_or_default();
        let pairs: Vec<(&str, &[u8])> = headers
            .iter()
            .map(|(name, value)| (*name, value.as_bytes()))
            .collect();
        HeaderMap::parse(serialize(&pairs))
    }

    fn set_response_header(&mut self, name: &str, values: &[Vec<u8>]) {
        self.calls.push(Call::SetResponseHeader {
            context: self.current,
            name: name.to_owned(),
            values: values
                .iter()
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .collect(),
        });
    }

    fn response_body(&mut self, size: usize) -> Vec<u8> {
        self.calls.push(Call::ReadResponseBody {
            context: self.current,
        });
        let mut body = self
            .response_body
            .get(&self.current)
            .cloned()
            .unwrap_or_default();
        body.truncate(size);
        body
    }

    fn set_response_body(&mut self, _size: usize, body: &[u8]) {
        self.response_body.insert(self.current, body.to_vec());
        self.calls.push(Call::SetResponseBody {
            context: self.current,
            body: String::from_utf8_lossy(body).into_owned(),
        });
    }

    fn reset_stream(&mut self) {
        self.calls.push(Call::ResetStream {
            context: self.current,
        });
    }

    fn set_property(&mut self, path: &str, value: &[u8]) {
        self.calls.push(Call::SetProperty {
            context: self.current,
            path: path.to_owned(),
            value: String::from_utf8_lossy(value).into_owned(),
        });
    }
}
