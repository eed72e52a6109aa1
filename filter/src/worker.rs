//! The state of one Envoy worker (one wasm VM), shared by its root context and all
//! its HTTP contexts: configuration, the compiled snapshot, the credential cache, the
//! fetches in flight, the pending request-log batch, and the snapshot poller.
//!
//! Everything here is plain data driven by [`crate::driver`] with the current time in
//! unix milliseconds, so every timing rule is testable without a host. A worker runs
//! one callback at a time, so `Rc<RefCell<Worker>>` is enough; a borrow never outlives
//! the callback that took it.

use std::rc::Rc;

use agent_vault_rules::reply;
use agent_vault_rules::{Snapshot, SNAPSHOT_PATH, SNAPSHOT_WAIT_PARAM};

use crate::cache::{CredentialCache, Secret};
use crate::config::Config;
use crate::decide::{decide, Decision, Request};
use crate::flight::{Answer, Completion, FlightKey, Flights, Join, Waiter};
use crate::host_budget::{HostBudget, MAX_OPEN_HOSTS, WINDOW_MS};
use crate::rate_limit::SharedStore;
use crate::request_log::{LogBatch, RequestLog};
use crate::snapshot::CompiledSnapshot;
use crate::upgrades::{OpenUpgrade, OpenUpgrades};

/// Tick period while no snapshot is loaded: requests get 503 until one is.
pub const STARTUP_TICK_MS: u64 = 100;

/// What became of a snapshot poll answer, for the driver to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PollOutcome {
    /// A new snapshot is in use.
    Loaded {
        /// Its version.
        version: String,
        /// Whether the version differs from the previous one (the cache was dropped).
        changed: bool,
        /// Whether it is the worker's first snapshot.
        first: bool,
        /// Vaults and agents in it.
        counts: (usize, usize),
    },
    /// 304: nothing changed.
    NotModified,
    /// The control plane sent a snapshot that does not parse; the last good one stays.
    Invalid(String),
    /// No answer from the control plane (Envoy's 503/504) or another status.
    Unavailable(String),
    /// Not the poll in flight (a late answer after its slot was freed).
    Stale,
}

/// The poller's state.
#[derive(Debug, Default)]
struct Poller {
    /// Token and start of the poll in flight.
    in_flight: Option<(u32, u64)>,
    /// Whether the poll in flight is a long-poll (see [`Worker::long_poll_due`]).
    long: bool,
    /// Whether the last answer lets a long-poll go out at once: it was usable, and
    /// not a long-poll answered early without news (a control plane that does not
    /// hold them, or one that is stopping), which would make the next one a busy loop.
    push: bool,
    /// When the last poll was dispatched.
    last_started_ms: Option<u64>,
    /// Consecutive polls without a usable answer (to log the first failure and the
    /// recovery rather than every failure).
    failures: u32,
}

/// One worker's state.
#[derive(Debug)]
pub struct Worker {
    config: Rc<Config>,
    snapshot: Option<Rc<CompiledSnapshot>>,
    cache: CredentialCache,
    flights: Flights,
    logs: LogBatch,
    poller: Poller,
    hosts: HostBudget,
    upgrades: OpenUpgrades,
}

impl Worker {
    /// A worker with no snapshot yet.
    pub fn new(config: Config, now_ms: u64) -> Worker {
        Worker {
            cache: CredentialCache::new(config.credential_cache_ttl_ms),
            logs: LogBatch::new(config.log_batch_max, now_ms),
            config: Rc::new(config),
            snapshot: None,
            flights: Flights::default(),
            poller: Poller::default(),
            hosts: HostBudget::default(),
            upgrades: OpenUpgrades::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Rc<Config> {
        &self.config
    }

    /// The snapshot in use.
    pub fn snapshot(&self) -> Option<&Rc<CompiledSnapshot>> {
        self.snapshot.as_ref()
    }

    /// Decides a request (see [`crate::decide`]); a host the agent chose (wildcard,
    /// passthrough) also has to fit its budget of new hosts ([`crate::host_budget`]).
    pub fn decide(
        &mut self,
        request: &Request<'_>,
        now_ms: u64,
        log: &mut RequestLog,
        store: &mut impl SharedStore,
    ) -> Decision {
        let decision = decide(
            self.snapshot.as_ref(),
            &self.cache,
            request,
            now_ms,
            log,
            store,
        );
        self.take_refreshes(now_ms);
        if !decision.open_host() {
            return decision;
        }
        let Some(agent) = log.agent.as_ref() else {
            return decision;
        };
        if self.hosts.admit(agent, &log.host, now_ms) {
            return decision;
        }
        let reject = reply::too_many_hosts(agent, MAX_OPEN_HOSTS, WINDOW_MS / 1000);
        log.error = Some(reject.code);
        Decision::Reject(reject)
    }

    // --- Credential fetches (see [`crate::flight`]) -------------------------------

    /// Turns the refreshes the decision asked the cache for into refresh flights,
    /// tagged with the snapshot version in use; the root dispatches them on its next
    /// tick ([`Worker::orphans`]).
    fn take_refreshes(&mut self, now_ms: u64) {
        let refreshes = self.cache.take_refreshes();
        if refreshes.is_empty() {
            return;
        }
        let version = self.version().to_owned();
        for key in refreshes {
            self.flights.refresh(key, &version, now_ms);
        }
    }

    /// Whether callout `token` is a background refresh no request waits on (for the
    /// log line of a failure).
    pub fn is_refresh_token(&self, token: u32) -> bool {
        self.flights.is_unwaited_refresh(token)
    }

    /// Whether the flight for `key` is a background refresh (for the stats).
    pub fn is_refresh(&self, key: &FlightKey) -> bool {
        self.flights.is_refresh(key)
    }

    /// A request waits for a fetch, tagged with the snapshot version in use: join the
    /// flight for its keys, or dispatch a new one.
    pub fn join_fetch(&mut self, waiter: Waiter, now_ms: u64) -> Join {
        let version = self.version().to_owned();
        self.flights.join(waiter, &version, now_ms)
    }

    /// The fetch for `key` was dispatched from context `owner` with `token`.
    pub fn fetch_dispatched(&mut self, key: &FlightKey, token: u32, owner: u32, now_ms: u64) {
        self.flights.dispatched(key, token, owner, now_ms);
    }

    /// The fetch for `key` could not be dispatched: its waiters, failed with 503.
    pub fn fetch_failed(&mut self, key: &FlightKey, reason: &str) -> Vec<Completion> {
        self.flights.dispatch_failed(key, reason)
    }

    /// The request in context `context_id` is gone: it no longer waits, and a fetch
    /// it owned is orphaned if others still wait on it.
    pub fn context_gone(&mut self, context_id: u32) {
        self.flights.context_gone(context_id);
    }

    /// Whether `token` is a credential fetch of this worker.
    pub fn is_fetch(&self, token: u32) -> bool {
        self.flights.owns(token)
    }

    /// Orphaned fetches for the root to dispatch again (see [`crate::flight`]).
    pub fn orphans(&self) -> Vec<(FlightKey, Vec<u8>)> {
        self.flights.orphans()
    }

    /// The snapshot version new flights are tagged with.
    pub fn version(&self) -> &str {
        self.snapshot.as_ref().map_or("", |s| s.version.as_str())
    }

    // --- Snapshot polling -------------------------------------------------------

    /// The headers of a snapshot poll if one is due at `now_ms`: none in flight (a
    /// poll unanswered past the callout timeout frees its slot), and either no
    /// snapshot yet or `snapshot_poll_ms` since the last one.
    pub fn poll_due(&mut self, now_ms: u64) -> Option<Vec<(&'static str, String)>> {
        if let Some((_, started)) = self.poller.in_flight {
            let limit = self
                .in_flight_timeout_ms()
                .saturating_add(crate::flight::GRACE_MS);
            if now_ms.saturating_sub(started) <= limit {
                return None;
            }
            self.poller.in_flight = None;
            self.poller.push = false;
        }
        let due = match (self.snapshot.is_some(), self.poller.last_started_ms) {
            (false, _) | (true, None) => true,
            (true, Some(last)) => {
                now_ms.saturating_sub(last)
                    >= self.config.snapshot_poll_ms.saturating_sub(self.slack_ms())
            }
        };
        if !due {
            return None;
        }
        Some(self.snapshot_request(SNAPSHOT_PATH.to_owned()))
    }

    /// The headers of a snapshot request to `path`, with the loaded version (if any)
    /// as `if-none-match`.
    fn snapshot_request(&self, path: String) -> Vec<(&'static str, String)> {
        let mut headers = vec![
            (":method", "GET".to_owned()),
            (":path", path),
            (":authority", self.config.authority.clone()),
            ("accept", "application/json".to_owned()),
        ];
        if let Some(snapshot) = &self.snapshot {
            headers.push(("if-none-match", format!("\"{}\"", snapshot.version)));
        }
        headers
    }

    /// The poll was dispatched with `token` (or failed to dispatch: `None`, then the
    /// next tick tries again).
    pub fn poll_dispatched(&mut self, token: Option<u32>, now_ms: u64) {
        self.poller.last_started_ms = Some(now_ms);
        self.poller.in_flight = token.map(|t| (t, now_ms));
        self.poller.long = false;
        self.poller.push = false;
    }

    /// The headers of a snapshot long-poll if one may go out now: `snapshot_wait_ms`
    /// is not 0, a snapshot is loaded (its version is what the control plane waits to
    /// change), nothing is in flight, and the last answer was usable and not an early
    /// one without news. The driver asks right after each answer, so one long-poll is
    /// always outstanding while the control plane answers them; after a failure the
    /// periodic poll ([`Worker::poll_due`]) takes over until one succeeds.
    pub fn long_poll_due(&self) -> Option<Vec<(&'static str, String)>> {
        let wait_ms = self.config.snapshot_wait_ms;
        if wait_ms == 0 || self.poller.in_flight.is_some() || !self.poller.push {
            return None;
        }
        self.snapshot.as_ref()?;
        Some(self.snapshot_request(format!("{SNAPSHOT_PATH}?{SNAPSHOT_WAIT_PARAM}={wait_ms}")))
    }

    /// The long-poll was dispatched with `token`; `None`: the host refused it, and the
    /// periodic poll takes over.
    pub fn long_poll_dispatched(&mut self, token: Option<u32>, now_ms: u64) {
        self.poller.push = false;
        self.poller.in_flight = token.map(|t| (t, now_ms));
        self.poller.long = token.is_some();
        if token.is_none() {
            self.poller.failures = self.poller.failures.saturating_add(1);
        }
    }

    /// Whether `token` is a long-poll in flight.
    pub fn is_long_poll(&self, token: u32) -> bool {
        self.poller.long && self.is_poll(token)
    }

    /// The timeout of a long-poll callout: the wait plus `callout_timeout_ms` for the
    /// answer (a snapshot build) to arrive.
    pub fn long_poll_timeout_ms(&self) -> u64 {
        self.config
            .snapshot_wait_ms
            .saturating_add(self.config.callout_timeout_ms)
    }

    fn in_flight_timeout_ms(&self) -> u64 {
        if self.poller.long {
            self.long_poll_timeout_ms()
        } else {
            self.config.callout_timeout_ms
        }
    }

    /// Whether `token` is the snapshot poll in flight.
    pub fn is_poll(&self, token: u32) -> bool {
        self.poller.in_flight.is_some_and(|(t, _)| t == token)
    }

    /// Consecutive failed polls (0 after a good answer).
    pub fn poll_failures(&self) -> u32 {
        self.poller.failures
    }

    /// Handles the answer to the poll `token`, arrived at `now_ms`.
    pub fn on_poll_answer(
        &mut self,
        token: u32,
        status: Option<u16>,
        from_control_plane: bool,
        body: Vec<u8>,
        now_ms: u64,
    ) -> PollOutcome {
        if !self.is_poll(token) {
            return PollOutcome::Stale;
        }
        let started = self.poller.in_flight.take().map_or(now_ms, |(_, at)| at);
        let long = std::mem::take(&mut self.poller.long);
        let outcome = match (from_control_plane, status) {
            (true, Some(304)) => PollOutcome::NotModified,
            (true, Some(200)) => match serde_json::from_slice::<Snapshot>(&body) {
                Ok(snapshot) => {
                    // The body can be megabytes: free it before compiling, so a VM's
                    // memory (which never shrinks) peaks lower.
                    drop(body);
                    self.install(snapshot)
                }
                Err(error) => PollOutcome::Invalid(format!(
                    "the control plane sent a snapshot that does not parse ({error}); \
                     keeping the last good one"
                )),
            },
            (true, Some(status)) => {
                PollOutcome::Unavailable(format!("the control plane answered {status}"))
            }
            (false, Some(status)) => PollOutcome::Unavailable(format!(
                "no answer from the control plane (Envoy replied {status})"
            )),
            (_, None) => PollOutcome::Unavailable("no status in the answer".to_owned()),
        };
        match outcome {
            PollOutcome::Loaded { .. } | PollOutcome::NotModified => self.poller.failures = 0,
            _ => self.poller.failures = self.poller.failures.saturating_add(1),
        }
        let news = matches!(outcome, PollOutcome::Loaded { changed: true, .. });
        let usable = matches!(
            outcome,
            PollOutcome::Loaded { .. } | PollOutcome::NotModified
        );
        // A held long-poll answers without news only once its wait is (nearly) over.
        let early = now_ms.saturating_sub(started) < self.config.snapshot_wait_ms / 2;
        self.poller.push = usable && !(long && early && !news);
        outcome
    }

    /// Replaces the snapshot; drops the cache when the version changed.
    pub fn install(&mut self, snapshot: Snapshot) -> PollOutcome {
        // Let go of the old snapshot before compiling the new one (requests waiting
        // for a fetch keep theirs alive), so two compiled copies rarely coexist.
        let old_version = self.snapshot.take().map(|old| old.version.clone());
        let compiled = CompiledSnapshot::new(snapshot);
        let first = old_version.is_none();
        let changed = old_version.is_none_or(|old| old != compiled.version);
        if changed {
            self.cache.clear();
            self.flights.drop_refreshes();
        }
        let outcome = PollOutcome::Loaded {
            version: compiled.version.clone(),
            changed,
            first,
            counts: compiled.counts(),
        };
        self.snapshot = Some(Rc::new(compiled));
        outcome
    }

    // --- Credential answers -----------------------------------------------------

    /// Handles the answer to credential fetch `token`: caches the values (only if the
    /// snapshot version is still the one the fetch was made under, so an answer
    /// computed before a credential change cannot outlive the change) and finishes
    /// every waiter. `None` if `token` is not a fetch of this worker.
    pub fn on_fetch_answer(
        &mut self,
        token: u32,
        answer: Answer,
        now_ms: u64,
    ) -> Option<Vec<Completion>> {
        let answered = self.flights.answer(token, &answer)?;
        if let Answer::Values { values, missing } = answer {
            let current = self.snapshot.as_ref().map(|s| s.version.as_str());
            if current == Some(answered.version.as_str()) {
                let vault = &answered.key.vault;
                let asked = |key: &String| answered.key.keys.contains(key);
                for (key, value) in values.into_iter().filter(|(k, _)| asked(k)) {
                    self.cache.insert(vault, &key, Some(value), now_ms);
                }
                for key in missing.into_iter().filter(asked) {
                    self.cache.insert(vault, &key, None::<Secret>, now_ms);
                }
            }
        }
        Some(answered.completions)
    }

    // --- Request log --------------------------------------------------------------

    /// Adds a finished request's record; returns a batch body to post now if the batch
    /// is full.
    pub fn log<S: serde::Serialize>(
        &mut self,
        record: &agent_vault_rules::LogRecord<S>,
        now_ms: u64,
    ) -> Option<Vec<u8>> {
        self.logs.push(record);
        if self.logs.is_full() {
            return self.logs.take_due(now_ms, self.flush_period_ms());
        }
        None
    }

    /// A batch body to post if `log_flush_ms` passed (called on every tick).
    pub fn logs_due(&mut self, now_ms: u64) -> Option<Vec<u8>> {
        self.logs.take_due(now_ms, self.flush_period_ms())
    }

    fn flush_period_ms(&self) -> u64 {
        self.config.log_flush_ms.saturating_sub(self.slack_ms())
    }

    // --- Housekeeping on tick -----------------------------------------------------

    // --- Upgraded streams (see [`crate::upgrades`]) ----------------------------------

    /// A stream was upgraded (a WebSocket's `101`).
    pub fn upgrade_opened(&mut self, upgrade: OpenUpgrade) {
        self.upgrades.opened(upgrade);
    }

    /// An upgraded stream ended.
    pub fn upgrade_gone(&mut self, context_id: u32) {
        self.upgrades.gone(context_id);
    }

    /// The upgraded streams the snapshot in use no longer allows at `now_ms`: to reset.
    pub fn revoked_upgrades(&mut self, now_ms: u64) -> Vec<u32> {
        self.upgrades.revoked(self.snapshot.as_deref(), now_ms)
    }

    /// Expired flights to fail, and stale cache entries dropped.
    pub fn housekeeping(&mut self, now_ms: u64) -> Vec<Completion> {
        self.cache.purge(now_ms);
        self.flights.expire(now_ms, self.config.callout_timeout_ms)
    }

    /// Ticks arrive with jitter: a poll or flush due "almost now" runs on this tick
    /// rather than one whole period later (which would double the interval).
    fn slack_ms(&self) -> u64 {
        self.tick_period_ms() / 2
    }

    /// The tick period the root context should run at.
    pub fn tick_period_ms(&self) -> u64 {
        if self.snapshot.is_none() {
            return STARTUP_TICK_MS;
        }
        self.config.snapshot_poll_ms.min(self.config.log_flush_ms)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::decide::tests::{basic, ALICE, NOW_MS};
    use crate::rate_limit::MemoryStore;
    use agent_vault_rules::{
        Auth, Grant, Role, Service, SnapshotAgent, SnapshotVault, UnmatchedHostPolicy,
    };
    use std::cell::RefCell;

    fn config() -> Config {
        Config {
            snapshot_poll_ms: 1000,
            log_flush_ms: 500,
            callout_timeout_ms: 2000,
            credential_cache_ttl_ms: 60_000,
            log_batch_max: 2,
            ..Config::default()
        }
    }

    pub(crate) fn snapshot(version: &str) -> Snapshot {
        Snapshot {
            version: version.into(),
            vaults: vec![SnapshotVault {
                name: "default".into(),
                unmatched_host_policy: UnmatchedHostPolicy::Deny,
                services: vec![Service {
                    name: "stripe".into(),
                    host: "api.stripe.com".into(),
                    enabled: true,
                    auth: Auth::Bearer {
                        token: "STRIPE_KEY".into(),
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
                token_sha256: crate::snapshot::TokenHash::of(ALICE).as_str().to_owned(),
                name: "alice".into(),
                vaults: vec![Grant {
                    vault: "default".into(),
                    role: Role::Proxy,
                }],
                expires_at: None,
            }],
        }
    }

    /// A snapshot answer: vault `default` with stripe (bearer `STRIPE_KEY`), agent alice.
    pub(crate) fn body(version: &str) -> Vec<u8> {
        serde_json::to_vec(&snapshot(version)).unwrap_or_default()
    }

    fn header<'a>(headers: &'a [(&'static str, String)], name: &str) -> Option<&'a str> {
        headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Polls at `now` and answers with (status, header, body).
    fn poll(
        worker: &mut Worker,
        now: u64,
        token: u32,
        status: u16,
        cp: bool,
        body: &[u8],
    ) -> PollOutcome {
        let body = body.to_vec();
        let Some(_) = worker.poll_due(now) else {
            panic!("poll due at {now}");
        };
        worker.poll_dispatched(Some(token), now);
        worker.on_poll_answer(token, Some(status), cp, body, now)
    }

    #[test]
    fn polling_schedule() {
        let mut worker = Worker::new(config(), 0);
        assert_eq!(worker.tick_period_ms(), STARTUP_TICK_MS);
        let first = worker.poll_due(0).unwrap_or_default();
        assert_eq!(header(&first, ":path"), Some("/v1/dataplane/snapshot"));
        assert_eq!(header(&first, ":authority"), Some("agent-vault"));
        assert_eq!(header(&first, "if-none-match"), None);
        worker.poll_dispatched(Some(1), 0);
        assert!(
            worker.poll_due(100).is_none(),
            "one poll in flight at a time"
        );
        assert!(
            worker.poll_due(3000).is_none(),
            "still within timeout + grace"
        );
        let freed = worker.poll_due(3001);
        assert!(freed.is_some(), "an unanswered poll frees its slot");
        worker.poll_dispatched(Some(2), 3001);
        assert_eq!(
            worker.on_poll_answer(1, Some(200), true, body("1"), 3001),
            PollOutcome::Stale
        );
        assert!(matches!(
            worker.on_poll_answer(2, Some(200), true, body("1"), 3001),
            PollOutcome::Loaded {
                first: true,
                changed: true,
                ..
            }
        ));
        assert_eq!(worker.tick_period_ms(), 500);
        assert!(
            worker.poll_due(3500).is_none(),
            "not before snapshot_poll_ms"
        );
        let next = worker.poll_due(4001).unwrap_or_default();
        assert_eq!(header(&next, "if-none-match"), Some("\"1\""));
    }

    #[test]
    fn the_long_poll_is_due_only_after_a_usable_answer_with_nothing_in_flight() {
        let long = || Config {
            snapshot_wait_ms: 25_000,
            ..config()
        };
        let mut worker = Worker::new(long(), 0);
        assert!(
            worker.long_poll_due().is_none(),
            "no snapshot, no version to wait on"
        );
        poll(&mut worker, 0, 1, 200, true, &body("1"));
        let headers = worker.long_poll_due().unwrap_or_default();
        assert_eq!(
            header(&headers, ":path"),
            Some("/v1/dataplane/snapshot?wait_ms=25000")
        );
        assert_eq!(header(&headers, "if-none-match"), Some("\"1\""));
        assert_eq!(worker.long_poll_timeout_ms(), 27_000);
        worker.long_poll_dispatched(Some(2), 10);
        assert!(worker.is_long_poll(2));
        assert!(worker.long_poll_due().is_none(), "one in flight at a time");
        assert!(worker.poll_due(20_000).is_none(), "no plain poll beside it");
        // Held for the whole wait, then 304: the next one may go.
        assert_eq!(
            worker.on_poll_answer(2, Some(304), true, vec![], 25_010),
            PollOutcome::NotModified
        );
        assert!(worker.long_poll_due().is_some());
        // A failure: not until a poll succeeds again.
        worker.long_poll_dispatched(Some(3), 25_010);
        worker.on_poll_answer(3, Some(503), false, vec![], 25_020);
        assert!(worker.long_poll_due().is_none());
        assert_eq!(worker.poll_failures(), 1);
        assert!(poll(&mut worker, 25_020, 4, 304, true, &[]) == PollOutcome::NotModified);
        assert!(worker.long_poll_due().is_some());
        // Off: never.
        let mut off = Worker::new(
            Config {
                snapshot_wait_ms: 0,
                ..config()
            },
            0,
        );
        poll(&mut off, 0, 1, 200, true, &body("1"));
        assert!(off.long_poll_due().is_none());
    }

    #[test]
    fn without_a_snapshot_every_tick_polls() {
        let mut worker = Worker::new(config(), 0);
        assert!(matches!(
            poll(&mut worker, 0, 1, 503, false, b"upstream connect error"),
            PollOutcome::Unavailable(_)
        ));
        assert!(worker.poll_due(100).is_some());
        assert_eq!(worker.poll_failures(), 1);
    }

    #[test]
    fn poll_answers() {
        let mut worker = Worker::new(config(), 0);
        assert!(matches!(
            poll(&mut worker, 0, 1, 200, true, &body("1")),
            PollOutcome::Loaded { .. }
        ));
        // (behaviour, status, control-plane header, body, expected kind, version kept)
        type Case<'a> = (&'a str, u16, bool, Vec<u8>, &'a str, &'a str);
        #[rustfmt::skip]
        let cases: Vec<Case<'_>> = vec![
            ("304 changes nothing", 304, true, vec![], "not-modified", "1"),
            ("garbage keeps the last good snapshot", 200, true, b"{not json".to_vec(), "invalid", "1"),
            ("wrong shape keeps the last good snapshot", 200, true, br#"{"version":"2"}"#.to_vec(), "invalid", "1"),
            ("Envoy's 503 keeps it", 503, false, b"upstream connect error".to_vec(), "unavailable", "1"),
            ("a 200 not from the control plane is not trusted", 200, false, body("9"), "unavailable", "1"),
            ("control plane 500 keeps it", 500, true, vec![], "unavailable", "1"),
            ("a new version replaces it", 200, true, body("2"), "loaded", "2"),
        ];
        let mut now = 0;
        for (token, (behaviour, status, cp, body, kind, version)) in (10..).zip(cases) {
            now += 1000;
            let outcome = poll(&mut worker, now, token, status, cp, &body);
            let got = match outcome {
                PollOutcome::Loaded { .. } => "loaded",
                PollOutcome::NotModified => "not-modified",
                PollOutcome::Invalid(_) => "invalid",
                PollOutcome::Unavailable(_) => "unavailable",
                PollOutcome::Stale => "stale",
            };
            assert_eq!(got, kind, "{behaviour}");
            assert_eq!(worker.version(), version, "{behaviour}");
        }
    }

    fn fetch_and_answer(
        worker: &mut Worker,
        context_id: u32,
        token: u32,
        value: &str,
        now: u64,
    ) -> Vec<Completion> {
        let auth = basic(ALICE, "");
        let request = Request {
            method: "GET",
            authority: Some("api.stripe.com"),
            path: "/",
            proxy_authorization: Some(&auth),
            x_vault: None,
            tunnel: None,
        };
        let log = Rc::new(RefCell::new(RequestLog::default()));
        let Decision::Fetch(plan) = worker.decide(
            &request,
            now,
            &mut log.borrow_mut(),
            &mut MemoryStore::default(),
        ) else {
            panic!("expected a fetch");
        };
        let waiter = Waiter {
            context_id,
            plan,
            log: Rc::downgrade(&log),
        };
        let Join::Dispatch(key, _) = worker.join_fetch(waiter, now) else {
            panic!("expected a dispatch");
        };
        worker.fetch_dispatched(&key, token, context_id, now);
        let answer = Answer::classify(
            Some(200),
            true,
            format!(r#"{{"values":{{"STRIPE_KEY":"{value}","NOT_ASKED":"x"}},"missing":[]}}"#)
                .into_bytes(),
        );
        worker
            .on_fetch_answer(token, answer, now)
            .unwrap_or_default()
    }

    /// Alice's `GET https://api.stripe.com/`, decided by `worker` at `now`.
    fn alice_decision(worker: &mut Worker, now: u64) -> Decision {
        let auth = basic(ALICE, "");
        let request = Request {
            method: "GET",
            authority: Some("api.stripe.com"),
            path: "/",
            proxy_authorization: Some(&auth),
            x_vault: None,
            tunnel: None,
        };
        worker.decide(
            &request,
            now,
            &mut RequestLog::default(),
            &mut MemoryStore::default(),
        )
    }

    fn cached_decision(worker: &mut Worker, now: u64) -> String {
        match alice_decision(worker, now) {
            Decision::Forward(f) => format!("{:?}", f.inject),
            Decision::Fetch(_) => "fetch".to_owned(),
            Decision::Reject(r) => r.code.as_str().to_owned(),
        }
    }

    #[test]
    fn fetched_values_are_cached_until_the_ttl_or_a_new_version() {
        let mut worker = Worker::new(config(), NOW_MS);
        worker.install(snapshot("1"));
        let completions = fetch_and_answer(&mut worker, 1, 50, "sk_1", NOW_MS);
        assert_eq!(completions.len(), 1);
        assert_eq!(
            cached_decision(&mut worker, NOW_MS + 10),
            r#"[("authorization", "Bearer sk_1")]"#
        );
        assert_eq!(
            cached_decision(&mut worker, NOW_MS + 60_000),
            "fetch",
            "stale after the ttl"
        );
        // Only keys that were asked for are cached.
        assert!(worker.cache.len() == 1);
        // Same version again: the cache stays.
        worker.install(snapshot("1"));
        assert_eq!(
            cached_decision(&mut worker, NOW_MS + 10),
            r#"[("authorization", "Bearer sk_1")]"#
        );
        // New version: the cache is dropped.
        let outcome = worker.install(snapshot("2"));
        assert!(matches!(
            outcome,
            PollOutcome::Loaded {
                changed: true,
                first: false,
                ..
            }
        ));
        assert_eq!(cached_decision(&mut worker, NOW_MS + 10), "fetch");
    }

    fn cached_forward(worker: &mut Worker, now: u64) -> Option<crate::decide::Forward> {
        match alice_decision(worker, now) {
            Decision::Forward(forward) => Some(forward),
            Decision::Fetch(_) | Decision::Reject(_) => None,
        }
    }

    #[test]
    fn a_render_is_reused_until_one_of_its_values_changes() {
        let secrets_of = |forward: Option<crate::decide::Forward>| {
            forward
                .and_then(|f| f.secrets)
                .unwrap_or_else(|| panic!("a redacting forward"))
        };
        let mut worker = Worker::new(config(), NOW_MS);
        worker.install(snapshot("1"));
        fetch_and_answer(&mut worker, 1, 50, "sk_live_first", NOW_MS);
        let first = secrets_of(cached_forward(&mut worker, NOW_MS + 10));
        let again = secrets_of(cached_forward(&mut worker, NOW_MS + 20));
        assert!(
            Rc::ptr_eq(&first, &again),
            "the second hit renders nothing: it shares the first one's secrets"
        );
        assert!(first.patterns.is_some(), "built once, with the secrets");

        // A new value (an answer stored) is rendered anew.
        fetch_and_answer(&mut worker, 2, 51, "sk_live_second", NOW_MS + 60_000);
        let second = secrets_of(cached_forward(&mut worker, NOW_MS + 60_010));
        assert!(!Rc::ptr_eq(&first, &second));
        assert_eq!(
            cached_decision(&mut worker, NOW_MS + 60_020),
            r#"[("authorization", "Bearer sk_live_second")]"#
        );

        // Expired: fetched again, never served from the old render.
        assert_eq!(cached_decision(&mut worker, NOW_MS + 120_010), "fetch");
        // A new version drops it with the values.
        fetch_and_answer(&mut worker, 3, 52, "sk_live_third", NOW_MS + 120_020);
        secrets_of(cached_forward(&mut worker, NOW_MS + 120_025));
        assert!(worker.cache.rendered(&Rc::from("default"), 0).is_some());
        worker.install(snapshot("2"));
        assert_eq!(cached_decision(&mut worker, NOW_MS + 120_030), "fetch");
        assert!(worker.cache.rendered(&Rc::from("default"), 0).is_none());
    }

    #[test]
    fn an_answer_from_before_a_version_change_is_not_cached() {
        let mut worker = Worker::new(config(), NOW_MS);
        worker.install(snapshot("1"));
        let auth = basic(ALICE, "");
        let request = Request {
            method: "GET",
            authority: Some("api.stripe.com"),
            path: "/",
            proxy_authorization: Some(&auth),
            x_vault: None,
            tunnel: None,
        };
        let log = Rc::new(RefCell::new(RequestLog::default()));
        let Decision::Fetch(plan) = worker.decide(
            &request,
            NOW_MS,
            &mut log.borrow_mut(),
            &mut MemoryStore::default(),
        ) else {
            panic!("expected a fetch");
        };
        let waiter = Waiter {
            context_id: 1,
            plan,
            log: Rc::downgrade(&log),
        };
        assert_eq!(worker.version(), "1", "the fetch is made under version 1");
        let Join::Dispatch(key, _) = worker.join_fetch(waiter, NOW_MS) else {
            panic!("dispatch");
        };
        worker.fetch_dispatched(&key, 5, 1, NOW_MS);
        worker.install(snapshot("2")); // a credential changed meanwhile
        let answer = Answer::classify(
            Some(200),
            true,
            br#"{"values":{"STRIPE_KEY":"old"}}"#.to_vec(),
        );
        let completions = worker
            .on_fetch_answer(5, answer, NOW_MS)
            .unwrap_or_default();
        assert_eq!(completions.len(), 1, "the waiter is still served");
        assert_eq!(
            cached_decision(&mut worker, NOW_MS + 1),
            "fetch",
            "but nothing is cached"
        );
    }

    #[test]
    fn ttl_zero_fetches_every_time() {
        let mut worker = Worker::new(
            Config {
                credential_cache_ttl_ms: 0,
                ..config()
            },
            NOW_MS,
        );
        worker.install(snapshot("1"));
        fetch_and_answer(&mut worker, 1, 50, "sk_1", NOW_MS);
        assert_eq!(cached_decision(&mut worker, NOW_MS), "fetch");
        assert!(worker.orphans().is_empty(), "and never refreshes");
    }

    // --- Refresh-ahead ------------------------------------------------------------

    /// The window of the default 60 s TTL starts at 48 s.
    const IN_WINDOW: u64 = NOW_MS + 48_000;

    /// A hit in the refresh window at `now`, which must be served from the cache; the
    /// refresh it asks for, dispatched by the root with `token`.
    fn hit_and_refresh(worker: &mut Worker, now: u64, token: u32) {
        assert_eq!(
            cached_decision(worker, now),
            r#"[("authorization", "Bearer sk_1")]"#,
            "served from the cache at once"
        );
        let orphans = worker.orphans();
        let [(key, _)] = &orphans[..] else {
            panic!("one refresh to send: {orphans:?}");
        };
        assert!(worker.is_refresh(key));
        worker.fetch_dispatched(key, token, 1, now);
        assert!(worker.orphans().is_empty());
    }

    fn answer(status: u16, body: &str) -> Answer {
        Answer::classify(Some(status), true, body.as_bytes().to_vec())
    }

    #[test]
    fn a_used_entry_is_refreshed_once_and_the_answer_replaces_it() {
        let mut worker = Worker::new(config(), NOW_MS);
        worker.install(snapshot("1"));
        fetch_and_answer(&mut worker, 1, 50, "sk_1", NOW_MS);
        cached_decision(&mut worker, NOW_MS + 47_999);
        assert!(worker.orphans().is_empty(), "not before the last 20 %");
        hit_and_refresh(&mut worker, IN_WINDOW, 51);
        cached_decision(&mut worker, IN_WINDOW + 1);
        assert!(worker.orphans().is_empty(), "one refresh at a time");
        let done = worker.on_fetch_answer(
            51,
            answer(200, r#"{"values":{"STRIPE_KEY":"sk_2"},"missing":[]}"#),
            IN_WINDOW + 5,
        );
        assert_eq!(done.map(|c| c.len()), Some(0), "nobody waited on it");
        assert_eq!(
            cached_decision(&mut worker, NOW_MS + 90_000),
            r#"[("authorization", "Bearer sk_2")]"#,
            "fresh fetched_at: alive past the first TTL"
        );
        assert!(
            worker.orphans().is_empty(),
            "not yet in the new window (from 48 s after the refresh)"
        );
        cached_decision(&mut worker, IN_WINDOW + 5 + 48_000);
        assert_eq!(worker.orphans().len(), 1, "then refreshed again");
    }

    #[test]
    fn a_refresh_answered_missing_replaces_the_value() {
        let mut worker = Worker::new(config(), NOW_MS);
        worker.install(snapshot("1"));
        fetch_and_answer(&mut worker, 1, 50, "sk_1", NOW_MS);
        hit_and_refresh(&mut worker, IN_WINDOW, 51);
        worker.on_fetch_answer(
            51,
            answer(200, r#"{"values":{},"missing":["STRIPE_KEY"]}"#),
            IN_WINDOW,
        );
        assert_eq!(
            cached_decision(&mut worker, IN_WINDOW + 1),
            "credential_not_found",
            "the credential was deleted"
        );
    }

    #[test]
    fn a_failed_or_refused_refresh_leaves_the_entry_until_its_ttl() {
        #[rustfmt::skip]
        let cases: Vec<(&str, Answer)> = vec![
            ("Envoy's 503", Answer::classify(Some(503), false, b"upstream connect error".to_vec())),
            ("control plane 500", answer(500, "{}")),
            ("control plane 403 (grant revoked)", answer(403, r#"{"error":"forbidden"}"#)),
            ("a body that does not parse", answer(200, "<html>")),
        ];
        for (behaviour, failed) in cases {
            let mut worker = Worker::new(config(), NOW_MS);
            worker.install(snapshot("1"));
            fetch_and_answer(&mut worker, 1, 50, "sk_1", NOW_MS);
            hit_and_refresh(&mut worker, IN_WINDOW, 51);
            worker.on_fetch_answer(51, failed, IN_WINDOW + 1);
            assert_eq!(
                cached_decision(&mut worker, NOW_MS + 59_999),
                r#"[("authorization", "Bearer sk_1")]"#,
                "{behaviour}: the entry as it was"
            );
            assert!(
                worker.orphans().is_empty(),
                "{behaviour}: no second refresh"
            );
            assert_eq!(
                cached_decision(&mut worker, NOW_MS + 60_000),
                "fetch",
                "{behaviour}: it still expires at its TTL"
            );
        }
    }

    #[test]
    fn a_refresh_cannot_outlive_a_version_change() {
        // Asked for, not sent yet: dropped with the cache.
        let mut worker = Worker::new(config(), NOW_MS);
        worker.install(snapshot("1"));
        fetch_and_answer(&mut worker, 1, 50, "sk_1", NOW_MS);
        cached_decision(&mut worker, IN_WINDOW);
        assert_eq!(worker.orphans().len(), 1);
        worker.install(snapshot("2"));
        assert!(worker.orphans().is_empty(), "the refresh is dropped");
        assert!(worker.flights.is_empty());
        assert_eq!(
            cached_decision(&mut worker, IN_WINDOW),
            "fetch",
            "so is the cache"
        );

        // Sent under version 1, answered after version 2 arrived: not installed.
        let mut worker = Worker::new(config(), NOW_MS);
        worker.install(snapshot("1"));
        fetch_and_answer(&mut worker, 1, 50, "sk_1", NOW_MS);
        hit_and_refresh(&mut worker, IN_WINDOW, 51);
        worker.install(snapshot("2"));
        let old = answer(200, r#"{"values":{"STRIPE_KEY":"old"},"missing":[]}"#);
        assert!(
            worker.on_fetch_answer(51, old, IN_WINDOW + 1).is_none(),
            "no longer a fetch of this worker"
        );
        assert_eq!(cached_decision(&mut worker, IN_WINDOW + 2), "fetch");
    }

    #[test]
    fn a_refresh_made_under_an_older_version_is_not_cached_even_if_still_tracked() {
        // The version guard itself, without drop_refreshes: a refresh a request also
        // waits on survives the version change, and its answer must not be cached.
        let mut worker = Worker::new(config(), NOW_MS);
        worker.install(snapshot("1"));
        fetch_and_answer(&mut worker, 1, 50, "sk_1", NOW_MS);
        hit_and_refresh(&mut worker, IN_WINDOW, 51);
        // The entry expires and a request joins the refresh in flight.
        let log = Rc::new(RefCell::new(RequestLog::default()));
        let auth = basic(ALICE, "");
        let request = Request {
            method: "GET",
            authority: Some("api.stripe.com"),
            path: "/",
            proxy_authorization: Some(&auth),
            x_vault: None,
            tunnel: None,
        };
        let Decision::Fetch(plan) = worker.decide(
            &request,
            NOW_MS + 60_000,
            &mut log.borrow_mut(),
            &mut MemoryStore::default(),
        ) else {
            panic!("expired: fetch");
        };
        let waiter = Waiter {
            context_id: 7,
            plan,
            log: Rc::downgrade(&log),
        };
        assert_eq!(worker.join_fetch(waiter, NOW_MS + 60_000), Join::Joined);
        worker.install(snapshot("2"));
        let old = answer(200, r#"{"values":{"STRIPE_KEY":"old"},"missing":[]}"#);
        let done = worker.on_fetch_answer(51, old, NOW_MS + 60_001);
        assert_eq!(done.map(|c| c.len()), Some(1), "the waiter is served");
        assert_eq!(cached_decision(&mut worker, NOW_MS + 60_002), "fetch");
    }

    #[test]
    fn entries_nobody_uses_are_not_refreshed() {
        let mut worker = Worker::new(config(), NOW_MS);
        worker.install(snapshot("1"));
        fetch_and_answer(&mut worker, 1, 50, "sk_1", NOW_MS);
        for now in (NOW_MS..NOW_MS + 70_000).step_by(1000) {
            assert!(worker.housekeeping(now).is_empty());
            assert!(worker.orphans().is_empty(), "at {now}");
        }
        assert!(worker.cache.is_empty(), "it expired");
    }

    #[test]
    fn log_batches_flush_when_full_or_due() {
        let mut worker = Worker::new(config(), 0);
        let record = |ts| agent_vault_rules::LogRecord {
            ts,
            agent: "a",
            vault: "v",
            method: "GET",
            host: "h",
            path: "/",
            service: None,
            status: 200,
            latency_ms: 1,
            error: None,
            redactions: 0,
        };
        assert!(worker.log(&record(1), 10).is_none());
        assert!(worker.logs_due(100).is_none());
        assert!(
            worker.log(&record(2), 110).is_some(),
            "full at log_batch_max"
        );
        assert!(worker.log(&record(3), 120).is_none());
        // No snapshot yet: 100 ms ticks, so due 50 ms (half a tick) before flush_ms.
        assert!(
            worker.logs_due(559).is_none(),
            "flush_ms counts from the last flush"
        );
        assert!(worker.logs_due(560).is_some());
    }

    #[test]
    fn housekeeping_expires_flights() {
        let mut worker = Worker::new(config(), NOW_MS);
        worker.install(snapshot("1"));
        let auth = basic(ALICE, "");
        let request = Request {
            method: "GET",
            authority: Some("api.stripe.com"),
            path: "/",
            proxy_authorization: Some(&auth),
            x_vault: None,
            tunnel: None,
        };
        let log = Rc::new(RefCell::new(RequestLog::default()));
        let Decision::Fetch(plan) = worker.decide(
            &request,
            NOW_MS,
            &mut log.borrow_mut(),
            &mut MemoryStore::default(),
        ) else {
            panic!("fetch");
        };
        let waiter = Waiter {
            context_id: 3,
            plan,
            log: Rc::downgrade(&log),
        };
        let Join::Dispatch(key, _) = worker.join_fetch(waiter, NOW_MS) else {
            panic!("dispatch");
        };
        worker.fetch_dispatched(&key, 5, 3, NOW_MS);
        assert!(worker.housekeeping(NOW_MS + 1000).is_empty());
        let failed = worker.housekeeping(NOW_MS + 4000);
        assert_eq!(failed.len(), 1);
        assert_eq!(
            log.borrow().error.map(|c| c.as_str()),
            Some("control_plane_unavailable")
        );
    }
}
