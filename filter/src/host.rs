//! What the filter asks of Envoy, as a trait: the seam between the per-request state
//! machine ([`crate::driver`]) and the proxy-wasm host calls.
//!
//! Envoy's implementation is the proxy-wasm glue (`glue/host.rs`, wasm32 only); unit
//! tests use `fake::FakeHost` (`host/fake.rs`), which records every call. The driver is generic over
//! the host, so the wasm build calls Envoy directly, as if the glue made the calls
//! itself: no indirection and no allocation is added per request.
//!
//! Calls that act on a request (read its headers, forward, reply, resume) act on the
//! *current* context: the one whose callback is running, until [`Host::switch_to`]
//! makes another current. Envoy carries out a reply or a resume, and delivers the
//! failure of a callout it could not start, only after the current callback returns:
//! no host call runs another callback of the filter, so the driver may keep the
//! worker borrowed across host calls.

use std::fmt;

use agent_vault_rules::reply::{ErrorCode, Reject};

use crate::config::Config;
use crate::decide::Forward;
use crate::header_map::HeaderMap;
use crate::rate_limit::SharedStore;
use crate::stats::Callout;

#[cfg(test)]
pub mod fake;

/// The levels the filter logs at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    /// Routine, or a repeat of something already logged.
    Debug,
    /// A change an operator may want to see (a new snapshot, a recovery).
    Info,
    /// A failure that makes requests fail (first occurrence).
    Warn,
    /// The filter cannot run.
    Error,
}

/// The host refused a call; holds its status, as the host names it (for logs and for
/// the reason of a 503).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The answer to a callout, read in the callout-answer callback.
#[derive(Debug, Default)]
pub struct CallResponse {
    /// `:status`, if any.
    pub status: Option<u16>,
    /// Whether the control plane's marker header is present.
    pub from_control_plane: bool,
    /// The body.
    pub body: Vec<u8>,
}

/// What Envoy knows of a decrypted tunnel's connection (see [`Host::tunnel`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TunnelInfo {
    /// The encoded [`crate::tunnel::TunnelIdentity`], if Envoy has one.
    pub identity: Option<String>,
    /// The TLS SNI the agent's client sent, if any.
    pub sni: Option<String>,
    /// The tunnel's bytes are TLS Envoy decrypted; `false`: plain HTTP inside the
    /// `CONNECT` (no SNI, no certificate).
    pub tls: bool,
}

/// Something the filter's Envoy stats count (see [`crate::stats`]). Request-path
/// events only bump integers in the VM; the host writes to Envoy on the root's tick.
#[derive(Debug, Clone, Copy)]
pub enum Stat<'a> {
    /// The filter answered a request itself.
    Denied(ErrorCode),
    /// A request goes upstream; `from_cache`: decided on arrival, without a fetch.
    Forwarded {
        /// How.
        forward: &'a Forward,
        /// Decided on arrival.
        from_cache: bool,
    },
    /// A request has to wait for a credential fetch.
    CacheMiss,
    /// A callout was dispatched (`Some(token)`) or could not be (`None`).
    CalloutSent {
        /// What it asks for.
        kind: Callout,
        /// Its token.
        token: Option<u32>,
    },
    /// The answer to callout `token` arrived.
    CalloutAnswered {
        /// The callout.
        token: u32,
        /// The control plane itself answered something the filter could use.
        usable: bool,
    },
    /// A snapshot was installed.
    SnapshotLoaded {
        /// Its version.
        version: &'a str,
    },
    /// This many occurrences of a secret were replaced in a response.
    Redacted(u64),
    /// A snapshot long-poll was dispatched (`sent`) or refused. Long-polls are not
    /// timed: they are held on purpose.
    LongPollSent {
        /// The host took it.
        sent: bool,
    },
    /// A snapshot long-poll's answer arrived.
    LongPollAnswered {
        /// The control plane itself answered 200 or 304.
        usable: bool,
    },
    /// A background refresh of cached credentials was sent (refresh-ahead).
    CacheRefresh,
    /// A stream was upgraded (a WebSocket's `101`).
    UpgradeOpened,
    /// An upgraded stream was reset: its agent lost access ([`crate::upgrades`]).
    UpgradeRevoked,
}

/// The host calls the filter makes. `config` is passed where the call goes to the
/// control plane's cluster or names the routing header. Envoy's shared data (for the
/// rate limits' counters, [`crate::rate_limit`]) is the [`SharedStore`] part.
pub trait Host: SharedStore {
    /// Unix milliseconds (0 if the host cannot tell).
    fn now_ms(&mut self) -> u64;

    /// Every request header of the current context, in one host call; empty if the
    /// host cannot give them.
    fn request_headers(&mut self) -> HeaderMap;

    /// For a request inside a decrypted tunnel ([`crate::config::Mode::Tunnel`]):
    /// what Envoy knows of the tunnel's connection, the identity proven on its
    /// `CONNECT` (filter state [`crate::tunnel::TUNNEL_STATE`]) and the TLS SNI. Two
    /// host calls, made only in that mode.
    fn tunnel(&mut self) -> TunnelInfo;

    /// The `:status` of the current context's response headers (`None` if absent).
    fn response_status(&mut self) -> Option<u16>;

    /// Envoy's response code details of the current context (`response.code_details`,
    /// e.g. `rbac_access_denied_matched_policy[none]`); empty if the host cannot tell.
    fn response_code_details(&mut self) -> String;

    /// Reads the callout answer being delivered. With no headers (Envoy reset the
    /// callout) there is nothing to read: status `None`.
    fn call_response(&mut self, num_headers: usize, body_size: usize) -> CallResponse;

    /// Carries out a [`Forward`] on the current context's request headers. `known`
    /// are those headers as read by [`Host::request_headers`]: only headers that are
    /// present are removed; an empty `known` removes every one blindly.
    fn apply_forward(&mut self, config: &Config, forward: &Forward, known: &HeaderMap);

    /// Sends the filter's own response on the current context.
    fn send_reject(&mut self, reject: &Reject);

    /// Resumes the current context's paused request.
    fn resume(&mut self);

    /// Makes `context_id` the current context. `false` if Envoy no longer knows it
    /// (the request is gone).
    fn switch_to(&mut self, context_id: u32) -> bool;

    /// `POST`s a credentials request to the control plane; the answer is delivered to
    /// the current context with the returned token.
    fn dispatch_credentials(&mut self, config: &Config, body: &[u8]) -> Result<u32, Refused>;

    /// `GET`s the snapshot with the poller's headers (a long-poll's `:path` carries
    /// the wait), with a callout timeout of `timeout_ms`.
    fn dispatch_poll(
        &mut self,
        config: &Config,
        headers: &[(&'static str, String)],
        timeout_ms: u64,
    ) -> Result<u32, Refused>;

    /// `POST`s a request-log batch, fire and forget.
    fn post_logs(&mut self, config: &Config, body: &[u8]) -> Result<(), Refused>;

    /// Sets the root context's tick period.
    fn set_tick_period(&mut self, period_ms: u64);

    /// Writes one line to Envoy's log.
    fn log(&mut self, level: LogLevel, message: &str);

    /// Defines the filter's metrics (once per VM, whatever the number of calls).
    fn define_stats(&mut self);

    /// Counts an event.
    fn stat(&mut self, event: Stat<'_>);

    /// Adds the counts since the last flush to Envoy's counters, and gives up timing
    /// callouts older than `max_callout_ms`.
    fn flush_stats(&mut self, max_callout_ms: u64);

    // Request-side placeholder substitution ([`crate::substitute`]).

    /// Replaces request headers of the current context (before they are forwarded):
    /// each name gets exactly the values given, in order; none removes it.
    fn edit_request_headers(&mut self, edits: &[(String, Vec<String>)]);

    /// The request body chunk being delivered to the current context (`size` bytes,
    /// as the body callback reported); empty if the host cannot give it.
    fn request_body(&mut self, size: usize) -> Vec<u8>;

    /// Replaces the request body chunk being delivered (`old_size` bytes) with `body`
    /// (empty: nothing of it passes on).
    fn replace_request_body(&mut self, old_size: usize, body: &[u8]);
    // Response redaction ([`crate::redact`]): only redacting requests make these.

    /// Sets a request header of the current context (replacing every value it had).
    fn set_request_header(&mut self, name: &str, value: &str);

    /// Every response header of the current context, in one host call; empty if the
    /// host cannot give them.
    fn response_headers(&mut self) -> HeaderMap;

    /// Replaces every value of response header `name` with `values` (none: removes
    /// it).
    fn set_response_header(&mut self, name: &str, values: &[Vec<u8>]);

    /// The current context's response body chunk (`size` bytes).
    fn response_body(&mut self, size: usize) -> Vec<u8>;

    /// Replaces the current response body chunk (`size` bytes) with `body`.
    fn set_response_body(&mut self, size: usize, body: &[u8]);

    /// Resets the current context's stream: the agent sees its response cut off (or
    /// its upgraded connection closed), and the upstream's is closed too.
    fn reset_stream(&mut self);

    // The request log through Envoy's access log (`request_log: "access_log"`).

    /// Sets property `path` of the current context to `value` (one
    /// `proxy_set_property`; Envoy keeps it as filter state `wasm.<path>`, which its
    /// access log reads).
    fn set_property(&mut self, path: &str, value: &[u8]);
}
