//! The filter's Envoy stats: what operators graph and alert on.
//!
//! Envoy lists wasm-defined metrics under the `wasmcustom.` namespace: `/stats` shows
//! `wasmcustom.agent_vault.requests.injected`, `/stats/prometheus` shows
//! `agent_vault_requests_injected` (Envoy strips the namespace there), and the
//! bootstraps under `envoy/` turn the denial reason into a label with a `stats_tags`
//! rule: `agent_vault_requests_denied{reason="forbidden"}`.
//!
//! | metric (after `wasmcustom.`)                  | type      | counts |
//! |-----------------------------------------------|-----------|--------|
//! | `agent_vault.requests.injected`               | counter   | requests forwarded with credentials injected |
//! | `agent_vault.requests.passthrough`            | counter   | requests forwarded with nothing injected (passthrough rules and policies) |
//! | `agent_vault.requests.denied.<error code>`    | counter   | requests the filter answered itself, one counter per code of [`ErrorCode`]; `destination_forbidden` counts the forwarded requests Envoy's destination check refused |
//! | `agent_vault.tunnels.intercepted`             | counter   | HTTPS agents' `CONNECT`s let through into Envoy's decrypting listener (their requests count as the rows above) |
//! | `agent_vault.tunnels.opaque`                  | counter   | `CONNECT`s tunnelled untouched (the `passthrough` policy) |
//! | `agent_vault.cache.hits`                      | counter   | requests injected from the worker's cache, no callout |
//! | `agent_vault.cache.misses`                    | counter   | requests that had to wait for a credential fetch |
//! | `agent_vault.cache.refreshes`                 | counter   | background refreshes of cached credentials sent (refresh-ahead: an entry used in the last part of its TTL, [`crate::cache`]); no request waits on them |
//! | `agent_vault.control_plane.fetch_failures`    | counter   | credential fetches without a usable answer (not sent, Envoy's 503/504, timeout, bad body) |
//! | `agent_vault.control_plane.poll_failures`     | counter   | snapshot polls and long-polls without a usable answer |
//! | `agent_vault.control_plane.long_polls`        | counter   | snapshot long-polls answered 200 or 304 (not timed: they are held on purpose) |
//! | `agent_vault.upgrades.opened`                 | counter   | streams upgraded (WebSocket `101`) after their upgrade request was let through |
//! | `agent_vault.upgrades.revoked`                | counter   | upgraded streams the filter reset because their agent lost access ([`crate::upgrades`]) |
//! | `agent_vault.responses.redactions`            | counter   | occurrences of an injected credential replaced in responses (headers and bodies; [`crate::redact`]) |
//! | `agent_vault.control_plane.fetch_us`          | histogram | credential fetch latency, microseconds |
//! | `agent_vault.control_plane.poll_us`           | histogram | snapshot poll latency, microseconds |
//! | `agent_vault.snapshot.version`                | gauge     | the rules snapshot version in use (every worker converges on the same one) |
//!
//! **Hot-path cost.** Every worker VM defines the metrics once (Envoy hands back the
//! same stat for the same name, so the workers' counts add up) and keeps their ids.
//! A request only bumps plain integers here; the root context adds the deltas to
//! Envoy's counters on its tick (at least once per `snapshot_poll_ms`), so the cached
//! path makes no extra host call, and the counters trail the traffic by one tick.
//! Latencies and the snapshot version are written when a callout answers, which is
//! off the cached path anyway.
//!
//! Latencies are in microseconds: a healthy control plane on a local Unix socket
//! answers in well under a millisecond, below the resolution of Envoy's millisecond
//! histograms. Nothing here is secret: names are fixed, values are counts and times.

use std::collections::HashMap;

use crate::decide::{Forward, Route};
use agent_vault_rules::reply::ErrorCode;

/// Every name starts with this (inside Envoy's `wasmcustom.` namespace).
pub const PREFIX: &str = "agent_vault";

/// Every error code, in the order of their denial counters.
pub const ERROR_CODES: [ErrorCode; ErrorCode::ALL.len()] = ErrorCode::ALL;

/// A counter's slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    /// Forwarded with credentials injected.
    Injected,
    /// Forwarded with nothing injected.
    Passthrough,
    /// Answered by the filter with this error.
    Denied(ErrorCode),
    /// Injected from the cache.
    CacheHit,
    /// Waited for a fetch.
    CacheMiss,
    /// A credential fetch failed.
    FetchFailure,
    /// A snapshot poll failed.
    PollFailure,
    /// A `CONNECT` let through into the decrypting listener.
    TunnelIntercepted,
    /// A `CONNECT` tunnelled untouched.
    TunnelOpaque,
    /// Occurrences of a secret replaced in responses.
    Redactions,
    /// A snapshot long-poll answered 200 or 304.
    LongPoll,
    /// A background refresh of cached credentials was sent.
    CacheRefresh,
    /// A stream was upgraded (WebSocket).
    UpgradeOpened,
    /// An upgraded stream was reset: its agent lost access.
    UpgradeRevoked,
}

/// Number of counters.
pub const COUNTERS: usize = 13 + ERROR_CODES.len();

impl Counter {
    /// Every counter, in slot order.
    pub fn all() -> impl Iterator<Item = Counter> {
        [Counter::Injected, Counter::Passthrough]
            .into_iter()
            .chain(ERROR_CODES.into_iter().map(Counter::Denied))
            .chain([
                Counter::CacheHit,
                Counter::CacheMiss,
                Counter::FetchFailure,
                Counter::PollFailure,
                Counter::TunnelIntercepted,
                Counter::TunnelOpaque,
                Counter::Redactions,
                Counter::LongPoll,
                Counter::CacheRefresh,
                Counter::UpgradeOpened,
                Counter::UpgradeRevoked,
            ])
    }

    /// The slot (`0..COUNTERS`).
    pub fn slot(self) -> usize {
        match self {
            Counter::Injected => 0,
            Counter::Passthrough => 1,
            Counter::Denied(code) => 2 + code.index(),
            Counter::CacheHit => 2 + ERROR_CODES.len(),
            Counter::CacheMiss => 3 + ERROR_CODES.len(),
            Counter::FetchFailure => 4 + ERROR_CODES.len(),
            Counter::PollFailure => 5 + ERROR_CODES.len(),
            Counter::TunnelIntercepted => 6 + ERROR_CODES.len(),
            Counter::TunnelOpaque => 7 + ERROR_CODES.len(),
            Counter::Redactions => 8 + ERROR_CODES.len(),
            Counter::LongPoll => 9 + ERROR_CODES.len(),
            Counter::CacheRefresh => 10 + ERROR_CODES.len(),
            Counter::UpgradeOpened => 11 + ERROR_CODES.len(),
            Counter::UpgradeRevoked => 12 + ERROR_CODES.len(),
        }
    }

    /// The Envoy stat name (without the `wasmcustom.` namespace).
    pub fn name(self) -> String {
        match self {
            Counter::Injected => format!("{PREFIX}.requests.injected"),
            Counter::Passthrough => format!("{PREFIX}.requests.passthrough"),
            Counter::Denied(code) => format!("{PREFIX}.requests.denied.{}", code.as_str()),
            Counter::CacheHit => format!("{PREFIX}.cache.hits"),
            Counter::CacheMiss => format!("{PREFIX}.cache.misses"),
            Counter::FetchFailure => format!("{PREFIX}.control_plane.fetch_failures"),
            Counter::PollFailure => format!("{PREFIX}.control_plane.poll_failures"),
            Counter::TunnelIntercepted => format!("{PREFIX}.tunnels.intercepted"),
            Counter::TunnelOpaque => format!("{PREFIX}.tunnels.opaque"),
            Counter::Redactions => format!("{PREFIX}.responses.redactions"),
            Counter::LongPoll => format!("{PREFIX}.control_plane.long_polls"),
            Counter::CacheRefresh => format!("{PREFIX}.cache.refreshes"),
            Counter::UpgradeOpened => format!("{PREFIX}.upgrades.opened"),
            Counter::UpgradeRevoked => format!("{PREFIX}.upgrades.revoked"),
        }
    }
}

/// The kind of a callout to the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Callout {
    /// `POST /v1/dataplane/credentials`.
    Fetch,
    /// `GET /v1/dataplane/snapshot`.
    Poll,
}

impl Callout {
    fn failure(self) -> Counter {
        match self {
            Callout::Fetch => Counter::FetchFailure,
            Callout::Poll => Counter::PollFailure,
        }
    }

    /// The latency histogram's name.
    pub fn histogram(self) -> String {
        match self {
            Callout::Fetch => format!("{PREFIX}.control_plane.fetch_us"),
            Callout::Poll => format!("{PREFIX}.control_plane.poll_us"),
        }
    }
}

/// The gauge of the snapshot version in use.
pub fn snapshot_version_gauge() -> String {
    format!("{PREFIX}.snapshot.version")
}

/// The gauge value for a snapshot version (the control plane's versions are integers;
/// anything else is not graphed).
pub fn snapshot_version_value(version: &str) -> Option<u64> {
    version.parse().ok()
}

/// One worker's counts since the last flush, and the callouts it is timing.
#[derive(Debug)]
pub struct Stats {
    pending: [u64; COUNTERS],
    /// Callout token → (kind, dispatch time in microseconds).
    callouts: HashMap<u32, (Callout, u64)>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            pending: [0; COUNTERS],
            callouts: HashMap::new(),
        }
    }
}

impl Stats {
    /// Counts one event.
    pub fn count(&mut self, counter: Counter) {
        if let Some(slot) = self.pending.get_mut(counter.slot()) {
            *slot = slot.saturating_add(1);
        }
    }

    /// Counts `n` events at once.
    pub fn add(&mut self, counter: Counter, n: u64) {
        if let Some(slot) = self.pending.get_mut(counter.slot()) {
            *slot = slot.saturating_add(n);
        }
    }

    /// A request is forwarded. `from_cache`: decided on arrival (no fetch), so any
    /// credential it carries came from the cache.
    pub fn forwarded(&mut self, forward: &Forward, from_cache: bool) {
        match forward.route {
            Route::Tunnel(_) => return self.count(Counter::TunnelIntercepted),
            Route::Opaque => return self.count(Counter::TunnelOpaque),
            Route::Tls | Route::Plain | Route::H2c => {}
        }
        if forward.inject.is_empty() {
            self.count(Counter::Passthrough);
            return;
        }
        self.count(Counter::Injected);
        if from_cache {
            self.count(Counter::CacheHit);
        }
    }

    /// A callout was dispatched with `token` at `now_us`.
    pub fn callout_started(&mut self, token: u32, kind: Callout, now_us: u64) {
        self.callouts.insert(token, (kind, now_us));
    }

    /// A callout could not even be dispatched.
    pub fn callout_not_sent(&mut self, kind: Callout) {
        self.count(kind.failure());
    }

    /// The answer to callout `token` arrived at `now_us`; `usable`: the control plane
    /// itself answered something the filter could use. Returns the latency sample to
    /// record, in microseconds (`None` for a token this worker is not timing).
    pub fn callout_answered(
        &mut self,
        token: u32,
        now_us: u64,
        usable: bool,
    ) -> Option<(Callout, u64)> {
        let (kind, started) = self.callouts.remove(&token)?;
        if !usable {
            self.count(kind.failure());
        }
        Some((kind, now_us.saturating_sub(started)))
    }

    /// Callouts older than `max_age_us` will get no answer this worker sees (Envoy
    /// drops the answer of a request that went away; the flight is re-dispatched or
    /// times out): count them as failures and stop timing them.
    pub fn expire_callouts(&mut self, now_us: u64, max_age_us: u64) {
        let mut expired = Vec::new();
        self.callouts.retain(|_, (kind, started)| {
            let keep = now_us.saturating_sub(*started) <= max_age_us;
            if !keep {
                expired.push(*kind);
            }
            keep
        });
        for kind in expired {
            self.count(kind.failure());
        }
    }

    /// The counts since the last call, by slot (zeros left out), and resets them.
    pub fn take(&mut self) -> Vec<(usize, u64)> {
        let taken = self
            .pending
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(slot, n)| (slot, *n))
            .collect();
        self.pending = [0; COUNTERS];
        taken
    }

    /// Callouts being timed.
    pub fn timing(&self) -> usize {
        self.callouts.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn forward(inject: &[(&str, &str)]) -> Forward {
        Forward {
            inject: inject
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            route: Route::Plain,
            authority: None,
            open_host: false,
            secrets: None,
        }
    }

    fn counts(stats: &mut Stats) -> Vec<(String, u64)> {
        let names: Vec<String> = Counter::all().map(Counter::name).collect();
        stats
            .take()
            .into_iter()
            .map(|(slot, n)| (names[slot].clone(), n))
            .collect()
    }

    #[test]
    fn every_counter_has_its_own_slot_and_a_distinct_name() {
        let all: Vec<Counter> = Counter::all().collect();
        assert_eq!(all.len(), COUNTERS);
        for (i, counter) in all.iter().enumerate() {
            assert_eq!(counter.slot(), i, "{counter:?}");
        }
        let names: BTreeSet<String> = all.iter().map(|c| c.name()).collect();
        assert_eq!(names.len(), COUNTERS);
        for code in ERROR_CODES {
            assert!(
                names.contains(&format!("agent_vault.requests.denied.{}", code.as_str())),
                "{code:?}"
            );
        }
        let codes: BTreeSet<&str> = ERROR_CODES.iter().map(|c| c.as_str()).collect();
        assert_eq!(codes.len(), ERROR_CODES.len(), "no code listed twice");
    }

    #[test]
    fn names_are_envoy_stat_names() {
        let mut names: Vec<String> = Counter::all().map(Counter::name).collect();
        names.push(Callout::Fetch.histogram());
        names.push(Callout::Poll.histogram());
        names.push(snapshot_version_gauge());
        for name in names {
            assert!(name.starts_with("agent_vault."), "{name}");
            assert!(
                name.bytes().all(|b| b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || b == b'.'
                    || b == b'_'),
                "{name}: lowercase, digits, dots and underscores only"
            );
            assert!(!name.contains(".."), "{name}");
        }
    }

    #[test]
    fn a_cached_injection_is_a_hit_and_a_fetched_one_is_not() {
        let mut stats = Stats::default();
        stats.forwarded(&forward(&[("authorization", "Bearer x")]), true);
        stats.count(Counter::CacheMiss);
        stats.forwarded(&forward(&[("authorization", "Bearer x")]), false);
        stats.forwarded(&forward(&[]), true);
        let tunnel = Forward {
            route: Route::Opaque,
            ..forward(&[])
        };
        stats.forwarded(&tunnel, true);
        stats.count(Counter::Denied(ErrorCode::Forbidden));
        stats.count(Counter::Denied(ErrorCode::Forbidden));
        stats.count(Counter::Denied(ErrorCode::InvalidToken));
        let got = counts(&mut stats);
        assert_eq!(
            got,
            [
                ("agent_vault.requests.injected".to_string(), 2),
                ("agent_vault.requests.passthrough".to_string(), 1),
                ("agent_vault.requests.denied.invalid_token".to_string(), 1),
                ("agent_vault.requests.denied.forbidden".to_string(), 2),
                ("agent_vault.cache.hits".to_string(), 1),
                ("agent_vault.cache.misses".to_string(), 1),
                ("agent_vault.tunnels.opaque".to_string(), 1),
            ]
        );
        assert!(stats.take().is_empty(), "taking resets the counts");
    }

    #[test]
    fn callouts_are_timed_and_failures_counted_by_kind() {
        let mut stats = Stats::default();
        stats.callout_started(1, Callout::Fetch, 1000);
        stats.callout_started(2, Callout::Poll, 1000);
        stats.callout_started(3, Callout::Fetch, 1000);
        assert_eq!(
            stats.callout_answered(1, 1012, true),
            Some((Callout::Fetch, 12))
        );
        assert_eq!(
            stats.callout_answered(2, 1003, false),
            Some((Callout::Poll, 3))
        );
        assert_eq!(stats.callout_answered(2, 1004, true), None, "answered once");
        assert_eq!(stats.callout_answered(99, 1004, true), None, "not ours");
        stats.callout_not_sent(Callout::Fetch);
        stats.expire_callouts(3000, 3000);
        assert_eq!(stats.timing(), 1, "young callouts stay");
        stats.expire_callouts(4001, 3000);
        assert_eq!(stats.timing(), 0);
        assert_eq!(
            counts(&mut stats),
            [
                ("agent_vault.control_plane.fetch_failures".to_string(), 2),
                ("agent_vault.control_plane.poll_failures".to_string(), 1),
            ]
        );
    }

    #[test]
    fn snapshot_versions_are_graphed_when_numeric() {
        assert_eq!(snapshot_version_value("42"), Some(42));
        assert_eq!(snapshot_version_value(""), None);
        assert_eq!(snapshot_version_value("v1"), None);
    }
}
