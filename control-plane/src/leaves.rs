//! Leaf certificates for intercepted hosts: which names get one, minting, renewal and
//! the bounds that keep all of it finite.
//!
//! Envoy asks for a certificate named after the SNI of each TLS handshake inside a
//! `CONNECT` tunnel, and (in 1.40) keeps every one it got for as long as it runs. An
//! agent chooses the SNI, so what it may make Envoy ask for, and this server mint and
//! hold, is bounded three ways:
//!
//! - **Rules.** A name is served only if some service rule of some vault could match
//!   it: its exact host, or one label under a wildcard (any port and path, disabled
//!   services included). A name no rule could ever match gets nothing, so Envoy never
//!   caches a certificate for it ([`decide`]).
//! - **A budget of new names per period** (by default 1000 an hour, for the whole
//!   server): past it, names without a certificate are refused until the period ends
//!   ([`MintBudget`]). Wildcard rules are what make this necessary: `*.github.com`
//!   matches a million names.
//! - **A cap on the certificates held** (ten times the budget): a name past it is
//!   refused. A certificate is dropped when it is due for renewal and no Envoy stream
//!   subscribes to it any more, or as soon as no rule matches its name.
//!
//! A certificate lives `ttl` (24 h by default) and is re-minted at two thirds of it;
//! [`Leaves::maintain`] does that (and notices rule changes) on a timer, and every
//! change is announced on a `watch` channel the SDS streams follow ([`crate::sds`]),
//! so a re-minted, dropped or newly servable certificate reaches every Envoy long
//! before the old one expires. Rotating the CA re-mints every held certificate.
//!
//! One mutex guards the state. Minting happens under it (a P-256 key and a signature
//! take well under a millisecond), so two streams asking for the same new name get the
//! same certificate and the budget counts it once.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use agent_vault_rules::{HostPattern, ValidationOptions};
use tokio::sync::watch;

use crate::access::VaultRecord;
use crate::ca::{CertificateAuthority, LeafCertificate};
use crate::clock::utc_minutes;
use crate::error::Result;
use crate::store::{scan_json, Store};

/// Default lifetime of a leaf certificate.
pub const DEFAULT_TTL_SECS: i64 = 24 * 3600;
/// Default budget of new names per hour.
pub const DEFAULT_NAMES_PER_HOUR: usize = 1000;
/// Certificates held at most, as a multiple of the budget of new names per period.
pub const HELD_PER_BUDGET: usize = 10;

/// How long leaves live and how many there may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeafLimits {
    /// Lifetime of a leaf; it is re-minted after two thirds of it.
    pub ttl_secs: i64,
    /// Names that get a certificate without having one, per period.
    pub new_names_per_period: usize,
    pub period_secs: i64,
    /// Certificates held at once.
    pub max_held: usize,
}

impl LeafLimits {
    /// `ttl_secs` per leaf, `names_per_hour` new names an hour, ten times that held.
    pub fn new(ttl_secs: i64, names_per_hour: usize) -> LeafLimits {
        let names = names_per_hour.max(1);
        LeafLimits {
            ttl_secs: ttl_secs.max(1),
            new_names_per_period: names,
            period_secs: 3600,
            max_held: names.saturating_mul(HELD_PER_BUDGET),
        }
    }

    /// Milliseconds after minting when a leaf is re-minted: two thirds of its life.
    fn renew_after_ms(&self) -> i64 {
        self.ttl_secs.saturating_mul(1000).saturating_mul(2) / 3
    }
}

impl Default for LeafLimits {
    fn default() -> Self {
        LeafLimits::new(DEFAULT_TTL_SECS, DEFAULT_NAMES_PER_HOUR)
    }
}

/// Why a name gets no certificate (Envoy is answered with its removal, and the TLS
/// handshake fails).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// Not a DNS host name (an IP address, a wildcard, a port, junk).
    NotAHostName,
    /// No service rule of any vault could match it.
    NoRule,
    /// The budget of new names for this period is spent.
    BudgetSpent,
    /// As many certificates are held as allowed.
    TooManyHeld,
    /// Minting failed (logged).
    MintFailed,
}

impl Refusal {
    pub const ALL: [Refusal; 5] = [
        Refusal::NotAHostName,
        Refusal::NoRule,
        Refusal::BudgetSpent,
        Refusal::TooManyHeld,
        Refusal::MintFailed,
    ];

    /// A fixed word for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NotAHostName => "not_a_host_name",
            Refusal::NoRule => "no_rule",
            Refusal::BudgetSpent => "budget_spent",
            Refusal::TooManyHeld => "too_many_held",
            Refusal::MintFailed => "mint_failed",
        }
    }

    /// Whether the same name may be served later without being asked again (a rule
    /// may be added, the budget renews); junk never will.
    pub fn may_change(self) -> bool {
        !matches!(self, Refusal::NotAHostName)
    }
}

/// The host name a requested secret name stands for: lowercase, without a trailing
/// dot, a syntactically valid DNS name (the same label rules as service hosts), not
/// an IP address, a wildcard, a port or a path. `None` for anything else.
pub fn normalize_name(requested: &str) -> Option<String> {
    if requested.is_empty() || requested.contains([':', '/', '[', '*']) {
        return None;
    }
    // Service hosts and certificate names share one notion of a valid name; the
    // option only lets single-label and internal names through, which the rules
    // then decide on like any other.
    let options = ValidationOptions {
        allow_private_upstreams: true,
    };
    let pattern = HostPattern::parse(requested, &options).ok()?;
    let plain = !pattern.wildcard && pattern.port.is_none() && pattern.path.is_none();
    (plain && pattern.host.parse::<Ipv4Addr>().is_err()).then_some(pattern.host)
}

/// The hosts the service rules could send a request to: exact names, and the parents
/// of wildcards (`github.com` for `*.github.com`). IP literals are left out: a TLS
/// client sends no SNI for an address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleHosts {
    exact: HashSet<String>,
    wildcard_parents: HashSet<String>,
}

impl RuleHosts {
    /// The hosts of service patterns (`api.stripe.com:443/v1*`, `*.github.com`); ones
    /// that do not parse are skipped (the store validated them).
    pub fn from_patterns<'a>(patterns: impl IntoIterator<Item = &'a str>) -> RuleHosts {
        let options = ValidationOptions {
            allow_private_upstreams: true,
        };
        let mut hosts = RuleHosts::default();
        for pattern in patterns {
            let Ok(parsed) = HostPattern::parse(pattern, &options) else {
                continue;
            };
            if parsed.host.starts_with('[') || parsed.host.parse::<Ipv4Addr>().is_ok() {
                continue;
            }
            match parsed.wildcard {
                true => hosts.wildcard_parents.insert(parsed.host),
                false => hosts.exact.insert(parsed.host),
            };
        }
        hosts
    }

    /// Whether some rule could match `name` (normalized).
    pub fn could_match(&self, name: &str) -> bool {
        if self.exact.contains(name) {
            return true;
        }
        match name.split_once('.') {
            Some((label, parent)) => !label.is_empty() && self.wildcard_parents.contains(parent),
            None => false,
        }
    }
}

/// The budget of new names: how many names got a certificate without having one, in
/// the current period. It counts a name once per period, however often it is minted.
#[derive(Debug, Clone)]
pub struct MintBudget {
    period_start_ms: i64,
    counted: HashSet<String>,
    /// Whether the refusal of this period was logged.
    warned: bool,
}

impl MintBudget {
    pub fn new(now_ms: i64) -> MintBudget {
        MintBudget {
            period_start_ms: now_ms,
            counted: HashSet::new(),
            warned: false,
        }
    }

    /// Starts a new period when the current one is over; whether it did.
    pub fn roll(&mut self, now_ms: i64, period_secs: i64) -> bool {
        let period_ms = period_secs.saturating_mul(1000);
        if now_ms.saturating_sub(self.period_start_ms) < period_ms {
            return false;
        }
        self.period_start_ms = now_ms;
        self.counted = HashSet::new();
        self.warned = false;
        true
    }

    /// When the current period ends (unix ms).
    pub fn period_end_ms(&self, period_secs: i64) -> i64 {
        self.period_start_ms
            .saturating_add(period_secs.saturating_mul(1000))
    }

    /// Names counted in this period.
    pub fn spent(&self) -> usize {
        self.counted.len()
    }
}

/// The serving decision for a requested name: the normalized name to serve, or why
/// not. Pure: everything it looks at is passed in, and the only thing it changes is
/// `budget` (a new name is counted).
///
/// Order matters: the rules come first, so an agent cannot spend the budget on names
/// no rule could match; a name that has a certificate is served without touching the
/// budget (renewals and other Envoy workers cost nothing).
pub fn decide(
    requested: &str,
    rules: &RuleHosts,
    is_held: impl Fn(&str) -> bool,
    held_count: usize,
    budget: &mut MintBudget,
    limits: &LeafLimits,
    now_ms: i64,
) -> std::result::Result<String, Refusal> {
    let name = normalize_name(requested).ok_or(Refusal::NotAHostName)?;
    if !rules.could_match(&name) {
        return Err(Refusal::NoRule);
    }
    if is_held(&name) {
        return Ok(name);
    }
    budget.roll(now_ms, limits.period_secs);
    let fresh = !budget.counted.contains(&name);
    if fresh && budget.counted.len() >= limits.new_names_per_period {
        return Err(Refusal::BudgetSpent);
    }
    if held_count >= limits.max_held {
        return Err(Refusal::TooManyHeld);
    }
    if fresh {
        budget.counted.insert(name.clone());
    }
    Ok(name)
}

/// Which held certificates maintenance re-mints and which it drops, at `now_ms`. Pure.
///
/// A certificate is due at its renewal time; a due one is re-minted when some stream
/// subscribes to it, else dropped. One whose name no rule matches any more is dropped
/// at once.
pub fn schedule<'a>(
    held: impl IntoIterator<Item = (&'a str, i64)>,
    rules: &RuleHosts,
    subscribed: impl Fn(&str) -> bool,
    now_ms: i64,
) -> (Vec<String>, Vec<String>) {
    let (mut remint, mut drop) = (Vec::new(), Vec::new());
    for (name, renew_at_ms) in held {
        if !rules.could_match(name) {
            drop.push(name.to_string());
        } else if renew_at_ms <= now_ms {
            match subscribed(name) {
                true => remint.push(name.to_string()),
                false => drop.push(name.to_string()),
            }
        }
    }
    remint.sort();
    drop.sort();
    (remint, drop)
}

impl Store {
    /// The hosts of every service rule of every vault.
    pub fn rule_hosts(&self) -> Result<RuleHosts> {
        let mut patterns = Vec::new();
        for (_, vault) in scan_json::<VaultRecord>(&self.trees.vaults, b"")? {
            patterns.extend(self.services_of(&vault.id)?.into_iter().map(|s| s.host));
        }
        Ok(RuleHosts::from_patterns(
            patterns.iter().map(String::as_str),
        ))
    }
}

struct Held {
    leaf: Arc<LeafCertificate>,
    renew_at_ms: i64,
}

struct State {
    ca: CertificateAuthority,
    rules: RuleHosts,
    /// The store version `rules` was read at.
    rules_version: Option<u64>,
    held: HashMap<String, Held>,
    budget: MintBudget,
    /// Streams subscribed to each held name.
    subscribers: HashMap<String, usize>,
}

/// What `GET /v1/ca` and `ca rotate` say about the CA.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CaSummary {
    pub generation: u64,
    pub fingerprint_sha256: String,
    pub not_after: i64,
    /// Certificates re-minted from it (rotation only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reminted: Option<usize>,
}

/// Counters for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeafStats {
    pub held: usize,
    pub minted: u64,
    /// Refusals Envoy was told about, by [`Refusal::ALL`]'s order.
    pub refused: [u64; 5],
}

/// The leaf certificates of this server: the CA that signs them, the ones held, and
/// the SDS streams' subscriptions.
pub struct Leaves {
    store: Arc<Store>,
    limits: LeafLimits,
    state: Mutex<State>,
    changes: watch::Sender<u64>,
    minted: AtomicU64,
    refused: [AtomicU64; 5],
}

impl std::fmt::Debug for Leaves {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leaves")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Leaves {
    /// The leaves of `store`'s CA (created now if the store has none).
    pub fn open(store: Arc<Store>, limits: LeafLimits) -> Result<Arc<Leaves>> {
        let ca = store.load_or_create_ca()?;
        let now = store.clock.now_ms();
        let state = State {
            ca,
            rules: RuleHosts::default(),
            rules_version: None,
            held: HashMap::new(),
            budget: MintBudget::new(now),
            subscribers: HashMap::new(),
        };
        let leaves = Leaves {
            store,
            limits,
            state: Mutex::new(state),
            changes: watch::channel(0).0,
            minted: AtomicU64::new(0),
            refused: Default::default(),
        };
        leaves.refresh_rules(&mut leaves.lock())?;
        Ok(Arc::new(leaves))
    }

    pub fn limits(&self) -> LeafLimits {
        self.limits
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A receiver that sees a new number whenever a certificate is re-minted or
    /// dropped, the CA rotates, the rules change or a new budget period starts: the
    /// moments an SDS stream may have something new to say.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn announce(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The CA certificate (PEM).
    pub fn ca_pem(&self) -> String {
        self.lock().ca.cert_pem().to_string()
    }

    pub fn ca_summary(&self) -> CaSummary {
        let state = self.lock();
        CaSummary {
            generation: state.ca.generation(),
            fingerprint_sha256: state.ca.fingerprint(),
            not_after: state.ca.not_after(),
            reminted: None,
        }
    }

    pub fn stats(&self) -> LeafStats {
        let held = self.lock().held.len();
        let mut refused = [0; 5];
        for (count, counter) in refused.iter_mut().zip(&self.refused) {
            *count = counter.load(Ordering::Relaxed);
        }
        LeafStats {
            held,
            minted: self.minted.load(Ordering::Relaxed),
            refused,
        }
    }

    /// Re-reads the rules when the store changed since; whether they changed.
    fn refresh_rules(&self, state: &mut State) -> Result<bool> {
        let version = self.store.snapshot_version()?;
        if state.rules_version == Some(version) {
            return Ok(false);
        }
        let rules = self.store.rule_hosts()?;
        state.rules_version = Some(version);
        let changed = rules != state.rules;
        state.rules = rules;
        Ok(changed)
    }

    /// Mints and holds a leaf for `name` (normalized).
    fn mint(&self, state: &mut State, name: &str, now_ms: i64) -> Option<Arc<LeafCertificate>> {
        match state.ca.mint_leaf(name, now_ms, self.limits.ttl_secs) {
            Ok(leaf) => {
                self.minted.fetch_add(1, Ordering::Relaxed);
                let leaf = Arc::new(leaf);
                state.held.insert(
                    name.to_string(),
                    Held {
                        leaf: leaf.clone(),
                        renew_at_ms: now_ms.saturating_add(self.limits.renew_after_ms()),
                    },
                );
                Some(leaf)
            }
            Err(e) => {
                tracing::error!(name, error = %e, "cannot mint a leaf certificate");
                None
            }
        }
    }

    /// Counts a refusal Envoy was told about (for `/metrics`).
    pub fn count_refusal(&self, refusal: Refusal) {
        let index = Refusal::ALL.iter().position(|r| *r == refusal).unwrap_or(0);
        self.refused[index].fetch_add(1, Ordering::Relaxed);
    }

    /// The certificates for `requested` names (as Envoy asks for them), each the held
    /// one or minted now, or why not. A held one that is due is re-minted first.
    pub fn serve(
        &self,
        requested: &[&str],
    ) -> Vec<std::result::Result<Arc<LeafCertificate>, Refusal>> {
        let mut state = self.lock();
        let mut changed = match self.refresh_rules(&mut state) {
            Ok(changed) => changed,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the service rules; using the last ones");
                false
            }
        };
        let now = self.store.clock.now_ms();
        let mut answers = Vec::with_capacity(requested.len());
        for name in requested {
            let state = &mut *state;
            let held = &state.held;
            let decision = decide(
                name,
                &state.rules,
                |n| held.contains_key(n),
                held.len(),
                &mut state.budget,
                &self.limits,
                now,
            );
            let answer = match decision {
                Ok(name) => match state.held.get(&name) {
                    Some(held) if held.renew_at_ms > now => Ok(held.leaf.clone()),
                    due_or_new => {
                        changed |= due_or_new.is_some();
                        self.mint(state, &name, now).ok_or(Refusal::MintFailed)
                    }
                },
                Err(refusal) => Err(refusal),
            };
            if let Err(refusal) = answer {
                if refusal == Refusal::BudgetSpent && !state.budget.warned {
                    state.budget.warned = true;
                    tracing::warn!(
                        budget = self.limits.new_names_per_period,
                        until = %utc_minutes(state.budget.period_end_ms(self.limits.period_secs) / 1000),
                        "the budget of new certificate names is spent: new names are refused \
                         until the period ends"
                    );
                }
                tracing::debug!(name, reason = refusal.as_str(), "refused a certificate");
            }
            answers.push(answer);
        }
        drop(state);
        if changed {
            self.announce();
        }
        answers
    }

    /// A stream now subscribes to `name` (normalized, served).
    pub fn subscribe(&self, name: &str) {
        *self.lock().subscribers.entry(name.to_string()).or_insert(0) += 1;
    }

    /// A stream no longer subscribes to `name`.
    pub fn unsubscribe(&self, name: &str) {
        let mut state = self.lock();
        if let Some(count) = state.subscribers.get_mut(name) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                state.subscribers.remove(name);
            }
        }
    }

    /// Re-mints the certificates that are due, drops the ones nobody subscribes to or
    /// no rule matches, notices rule changes and new budget periods; announces any of
    /// it. Run by [`Leaves::run_maintenance`] on a timer, and by tests on their clock.
    pub fn maintain(&self) -> Result<()> {
        let mut state = self.lock();
        let now = self.store.clock.now_ms();
        let mut changed = self.refresh_rules(&mut state)?;
        changed |= state.budget.roll(now, self.limits.period_secs);
        let state = &mut *state;
        let subscribers = &state.subscribers;
        let (remint, dropped) = schedule(
            state.held.iter().map(|(n, h)| (n.as_str(), h.renew_at_ms)),
            &state.rules,
            |n| subscribers.get(n).is_some_and(|c| *c > 0),
            now,
        );
        for name in &dropped {
            state.held.remove(name);
        }
        for name in &remint {
            self.mint(state, name, now);
        }
        changed |= !remint.is_empty() || !dropped.is_empty();
        if !remint.is_empty() || !dropped.is_empty() {
            tracing::debug!(
                reminted = remint.len(),
                dropped = dropped.len(),
                "leaf certificates renewed"
            );
        }
        if changed {
            self.announce();
        }
        Ok(())
    }

    /// Replaces the CA (`agent-vault ca rotate`) and re-mints every held certificate
    /// that a stream subscribes to from the new one (the others are dropped); the
    /// streams push them.
    pub fn rotate_ca(&self) -> Result<CaSummary> {
        let mut state = self.lock();
        let ca = self.store.rotate_ca()?;
        state.ca = ca;
        let now = self.store.clock.now_ms();
        let state = &mut *state;
        let names: Vec<String> = state.held.keys().cloned().collect();
        let mut reminted = 0;
        for name in names {
            let subscribed = state.subscribers.get(&name).is_some_and(|c| *c > 0);
            if subscribed && state.rules.could_match(&name) {
                reminted += usize::from(self.mint(state, &name, now).is_some());
            } else {
                state.held.remove(&name);
            }
        }
        let summary = CaSummary {
            generation: state.ca.generation(),
            fingerprint_sha256: state.ca.fingerprint(),
            not_after: state.ca.not_after(),
            reminted: Some(reminted),
        };
        tracing::info!(
            generation = summary.generation,
            fingerprint = %summary.fingerprint_sha256,
            reminted,
            "rotated the proxy CA"
        );
        self.announce();
        Ok(summary)
    }

    /// How often maintenance runs: often enough for a renewal to happen well inside
    /// the last third of a leaf's life, and for a removed rule to take its
    /// certificates with it within a second.
    pub fn maintenance_interval(&self) -> Duration {
        let twelfth_ms = self.limits.ttl_secs.saturating_mul(1000) / 12;
        Duration::from_millis(u64::try_from(twelfth_ms.clamp(50, 1000)).unwrap_or(1000))
    }

    /// Runs [`Leaves::maintain`] every [`Leaves::maintenance_interval`] until `stop`.
    pub async fn run_maintenance(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        let mut tick = tokio::time::interval(self.maintenance_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stop = std::pin::pin!(stop);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = &mut stop => return,
            }
            let leaves = self.clone();
            match tokio::task::spawn_blocking(move || leaves.maintain()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "leaf certificate maintenance failed"),
                Err(e) => tracing::warn!(error = %e, "leaf certificate maintenance panicked"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::tests::verifies;
    use crate::clock::{Clock, ManualClock};
    use crate::testing::{owner, temp_store, T0_MS};

    fn rules(patterns: &[&str]) -> RuleHosts {
        RuleHosts::from_patterns(patterns.iter().copied())
    }

    #[test]
    fn names_are_normalized_and_only_host_names_pass() {
        #[rustfmt::skip]
        let cases = [
            ("a plain name", "api.example.com", Some("api.example.com")),
            ("upper case", "API.Example.COM", Some("api.example.com")),
            ("a trailing dot", "api.example.com.", Some("api.example.com")),
            ("a single label", "localhost", Some("localhost")),
            ("digits in labels", "1password.com", Some("1password.com")),
            ("an IPv4 address", "127.0.0.1", None),
            ("an IPv6 address", "[::1]", None),
            ("a bare IPv6 address", "::1", None),
            ("a wildcard", "*.example.com", None),
            ("a port", "api.example.com:443", None),
            ("a path", "api.example.com/x", None),
            ("an underscore", "a_b.example.com", None),
            ("an empty label", "a..example.com", None),
            ("a leading hyphen", "-a.example.com", None),
            ("spaces", "a b.example.com", None),
            ("empty", "", None),
            ("a label of 64", &*format!("{}.example.com", "a".repeat(64)), None),
            ("a name of 254", &*format!("{}.com", "a.".repeat(125)), None),
            ("non-ASCII", "bücher.example", None),
        ];
        for (behaviour, requested, want) in cases {
            assert_eq!(
                normalize_name(requested).as_deref(),
                want,
                "{behaviour}: {requested}"
            );
        }
    }

    const LIMITS: LeafLimits = LeafLimits {
        ttl_secs: 3600,
        new_names_per_period: 3,
        period_secs: 60,
        max_held: 4,
    };

    #[test]
    fn the_serving_decision() {
        let rules = rules(&[
            "api.stripe.com",
            "*.github.com",
            "internal.example.com:8443/v1/*",
            "127.0.0.1:9000",
        ]);
        let held: HashSet<&str> = ["held.github.com"].into();
        #[rustfmt::skip]
        let cases: &[(&str, &str, std::result::Result<&str, Refusal>)] = &[
            ("an exact rule", "api.stripe.com", Ok("api.stripe.com")),
            ("an exact rule, another case", "API.Stripe.com.", Ok("api.stripe.com")),
            ("one label under a wildcard", "gist.github.com", Ok("gist.github.com")),
            ("a path- and port-scoped rule counts", "internal.example.com", Ok("internal.example.com")),
            ("a held name", "held.github.com", Ok("held.github.com")),
            ("the wildcard's parent itself", "github.com", Err(Refusal::NoRule)),
            ("two labels under a wildcard", "a.b.github.com", Err(Refusal::NoRule)),
            ("a lookalike", "api.stripe.com.evil.example", Err(Refusal::NoRule)),
            ("a subdomain of an exact rule", "x.api.stripe.com", Err(Refusal::NoRule)),
            ("an unrelated name", "example.org", Err(Refusal::NoRule)),
            ("an IP rule gives no name", "127.0.0.1", Err(Refusal::NotAHostName)),
            ("junk", "not a name", Err(Refusal::NotAHostName)),
        ];
        for (behaviour, requested, want) in cases {
            let mut budget = MintBudget::new(T0_MS);
            let got = decide(
                requested,
                &rules,
                |n| held.contains(n),
                held.len(),
                &mut budget,
                &LIMITS,
                T0_MS,
            );
            assert_eq!(got.as_deref(), want.as_deref(), "{behaviour}");
            let counted = usize::from(got.is_ok() && !held.contains(requested));
            assert_eq!(budget.spent(), counted, "{behaviour}: budget");
        }
    }

    #[test]
    fn the_budget_counts_new_names_once_per_period_and_refuses_past_it() {
        let rules = rules(&["*.example.com"]);
        let mut budget = MintBudget::new(T0_MS);
        let mut held: HashSet<String> = HashSet::new();
        let ask = |name: &str, held: &mut HashSet<String>, budget: &mut MintBudget, now| {
            let h = held.clone();
            let got = decide(
                name,
                &rules,
                |n| h.contains(n),
                h.len(),
                budget,
                &LIMITS,
                now,
            );
            if let Ok(name) = &got {
                held.insert(name.clone());
            }
            got.map(|_| ())
        };
        for name in ["a", "b", "c"] {
            assert_eq!(
                ask(
                    &format!("{name}.example.com"),
                    &mut held,
                    &mut budget,
                    T0_MS
                ),
                Ok(())
            );
        }
        assert_eq!(
            ask("d.example.com", &mut held, &mut budget, T0_MS),
            Err(Refusal::BudgetSpent)
        );
        // Held names are served without touching the budget.
        assert_eq!(ask("a.example.com", &mut held, &mut budget, T0_MS), Ok(()));
        // A name dropped and asked for again in the same period is not counted again.
        held.remove("a.example.com");
        assert_eq!(ask("a.example.com", &mut held, &mut budget, T0_MS), Ok(()));
        assert_eq!(budget.spent(), 3);
        // The next period has a fresh budget.
        let later = T0_MS + 60_000;
        assert_eq!(ask("d.example.com", &mut held, &mut budget, later), Ok(()));
        // ...but no more held certificates than allowed (4 now).
        assert_eq!(
            ask("e.example.com", &mut held, &mut budget, later),
            Err(Refusal::TooManyHeld)
        );
    }

    #[test]
    fn the_schedule_renews_subscribed_certificates_and_drops_the_rest() {
        let rules = rules(&["*.example.com"]);
        let held = [
            ("due.example.com", T0_MS),
            ("later.example.com", T0_MS + 1),
            ("unwatched.example.com", T0_MS - 5),
            ("unwatched-later.example.com", T0_MS + 5),
            ("ruleless.other.org", T0_MS + 1000),
        ];
        let subscribed =
            |n: &str| n != "unwatched.example.com" && n != "unwatched-later.example.com";
        let (remint, drop) = schedule(held, &rules, subscribed, T0_MS);
        assert_eq!(remint, ["due.example.com"]);
        assert_eq!(drop, ["ruleless.other.org", "unwatched.example.com"]);
    }

    fn leaves_with(
        limits: LeafLimits,
    ) -> (tempfile::TempDir, Arc<Store>, Arc<ManualClock>, Arc<Leaves>) {
        let clock = ManualClock::new(T0_MS);
        let (dir, store) = temp_store(clock.clone(), false);
        crate::testing::register_owner(&store, crate::testing::OWNER, crate::testing::PASSWORD);
        let store = Arc::new(store);
        add_rule(&store, "wild", "*.example.com");
        let leaves = Leaves::open(store.clone(), limits).unwrap();
        (dir, store, clock, leaves)
    }

    fn add_rule(store: &Store, name: &str, host: &str) {
        let service = serde_json::from_value(serde_json::json!({
            "name": name, "host": host, "auth": {"type": "passthrough"}
        }))
        .unwrap();
        store.add_service(&owner(), "default", service).unwrap();
    }

    fn serve_one(
        leaves: &Leaves,
        name: &str,
    ) -> std::result::Result<Arc<LeafCertificate>, Refusal> {
        leaves.serve(&[name]).remove(0)
    }

    #[test]
    fn leaves_are_reminted_at_two_thirds_of_their_life_and_dropped_when_unwatched() {
        let limits = LeafLimits {
            ttl_secs: 30,
            ..LIMITS
        };
        let (_dir, store, clock, leaves) = leaves_with(limits);
        let mut changes = leaves.changes();
        let first = serve_one(&leaves, "a.example.com").unwrap();
        assert_eq!(first.not_after, T0_MS / 1000 + 30);
        leaves.subscribe("a.example.com");
        serve_one(&leaves, "b.example.com").unwrap();

        // Not yet due: the same certificate, nothing announced.
        clock.advance_secs(19);
        leaves.maintain().unwrap();
        assert!(!changes.has_changed().unwrap());
        assert_eq!(
            serve_one(&leaves, "a.example.com").unwrap().serial,
            first.serial
        );

        // At 2/3 of 30 s: the subscribed one is re-minted, the other dropped.
        clock.advance_secs(1);
        leaves.maintain().unwrap();
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        let renewed = serve_one(&leaves, "a.example.com").unwrap();
        assert_ne!(renewed.serial, first.serial);
        assert_eq!(renewed.not_after, clock.now_secs() + 30);
        let ca = store.load_or_create_ca().unwrap();
        verifies(
            ca.cert_der(),
            &renewed.chain_pem,
            "a.example.com",
            clock.now_secs() + 29,
        )
        .unwrap();
        assert_eq!(leaves.stats().held, 1, "b was dropped");
        assert_eq!(leaves.stats().minted, 3);

        // A held certificate asked for after its renewal time is re-minted on the spot.
        leaves.unsubscribe("a.example.com");
        clock.advance_secs(25);
        let fresh = serve_one(&leaves, "a.example.com").unwrap();
        assert_ne!(fresh.serial, renewed.serial);
        assert!(changes.has_changed().unwrap());
    }

    #[test]
    fn a_removed_rule_takes_its_certificates_with_it() {
        let (_dir, store, _clock, leaves) = leaves_with(LIMITS);
        add_rule(&store, "exact", "api.other.org");
        serve_one(&leaves, "api.other.org").unwrap();
        leaves.subscribe("api.other.org");
        let mut changes = leaves.changes();
        store.remove_service(&owner(), "default", "exact").unwrap();
        leaves.maintain().unwrap();
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        assert_eq!(leaves.stats().held, 0);
        assert_eq!(
            serve_one(&leaves, "api.other.org").unwrap_err(),
            Refusal::NoRule
        );
        // A rule added later is seen by the next request.
        add_rule(&store, "again", "api.other.org");
        assert!(serve_one(&leaves, "api.other.org").is_ok());
    }

    #[test]
    fn many_distinct_names_hold_no_more_than_the_bound() {
        let limits = LeafLimits {
            ttl_secs: 3600,
            new_names_per_period: 1000,
            period_secs: 3600,
            max_held: 10_000,
        };
        let (_dir, _store, clock, leaves) = leaves_with(limits);
        let names: Vec<String> = (0..1200).map(|i| format!("n{i}.example.com")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let answers = leaves.serve(&refs);
        let served = answers.iter().filter(|a| a.is_ok()).count();
        assert_eq!(served, 1000);
        assert!(answers[1000..]
            .iter()
            .all(|a| a.as_ref().err() == Some(&Refusal::BudgetSpent)));
        assert_eq!(leaves.stats().held, 1000);
        // The same names again cost nothing; new ones stay refused this hour.
        let again = leaves.serve(&refs[..10]);
        assert!(again.iter().all(Result::is_ok));
        assert_eq!(leaves.stats().minted, 1000);
        // Next hour: unwatched certificates are dropped when due, new names served.
        clock.advance_secs(3600);
        leaves.maintain().unwrap();
        assert_eq!(leaves.stats().held, 0);
        assert!(serve_one(&leaves, "n1100.example.com").is_ok());
    }

    #[test]
    fn rotating_the_ca_remints_the_watched_certificates_from_the_new_one() {
        let (_dir, store, clock, leaves) = leaves_with(LIMITS);
        serve_one(&leaves, "a.example.com").unwrap();
        let old_ca = crate::ca::pem_to_der(&leaves.ca_pem()).unwrap();
        leaves.subscribe("a.example.com");
        serve_one(&leaves, "b.example.com").unwrap();
        let before = leaves.ca_summary();
        let changes = leaves.changes();
        let summary = leaves.rotate_ca().unwrap();
        assert_eq!(summary.generation, before.generation + 1);
        assert_ne!(summary.fingerprint_sha256, before.fingerprint_sha256);
        assert_eq!(summary.reminted, Some(1));
        assert!(changes.has_changed().unwrap());
        let new = serve_one(&leaves, "a.example.com").unwrap();
        assert_eq!(new.ca_generation, summary.generation);
        let ca = store.load_or_create_ca().unwrap();
        verifies(
            ca.cert_der(),
            &new.chain_pem,
            "a.example.com",
            clock.now_secs(),
        )
        .unwrap();
        assert!(verifies(&old_ca, &new.chain_pem, "a.example.com", clock.now_secs()).is_err());
        assert_eq!(leaves.ca_pem(), ca.cert_pem());
    }

    #[test]
    fn maintenance_runs_often_enough_for_short_lives() {
        let (_dir, _store, _clock, leaves) = leaves_with(LeafLimits {
            ttl_secs: 3,
            ..LIMITS
        });
        assert_eq!(leaves.maintenance_interval(), Duration::from_millis(250));
        let (_dir, _store, _clock, leaves) = leaves_with(LeafLimits::default());
        assert_eq!(leaves.maintenance_interval(), Duration::from_secs(1));
    }
}
