//! The per-worker credential cache: `(vault, key)` → value (or "known missing").
//!
//! Values live only in this worker's memory, never in Envoy shared data or logs. An
//! entry is used while it is younger than `credential_cache_ttl_ms`; the whole cache is
//! dropped when the snapshot version changes (every credential write bumps it), so a
//! changed or deleted credential takes effect within one poll interval. Keys the
//! control plane reported missing are cached too, so a service whose credential was
//! deleted costs one callout per TTL, not one per request.
//!
//! **Refresh-ahead.** An entry that is *used* in the last [`REFRESH_AHEAD_PERCENT`] % of
//! its TTL is due for a background refresh ([`CredentialCache::lookup`] says so to the
//! first lookup that finds it there, and only to that one): the request is served
//! from the cache at once, the worker re-fetches the keys, and the answer replaces the
//! entry with a fresh `fetched_at` (see [`crate::worker`]). So a credential in steady
//! use never makes a request wait; an entry nobody uses is not refreshed and expires.
//! A refresh is asked for once per fetched entry: if it fails, the entry stays as it
//! was and expires at its TTL, and the next request waits on a normal fetch.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt;
use std::rc::Rc;

use crate::decide::Rendered;
use crate::flight::FlightKey;

/// A credential value: not printable, wiped (best effort) when dropped.
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    /// The value, to render a header.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        wipe(std::mem::take(&mut self.0).into_bytes());
    }
}

/// Overwrites a buffer that held secret material before it is freed.
pub fn wipe(mut bytes: Vec<u8>) {
    bytes.fill(0);
    // Keeps the stores from being optimised away as dead.
    std::hint::black_box(&bytes);
}

/// What the cache knows about one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cached<'a> {
    /// A fresh value.
    Value(&'a str),
    /// The control plane recently said the vault has no such credential.
    Missing,
    /// Unknown or stale: ask the control plane.
    Unknown,
}

/// The last part of an entry's TTL, in percent, in which using it asks for a
/// background refresh. 20 % of the default 60 s TTL is 12 s: room for the root
/// context's next tick, which dispatches the refresh (at most `snapshot_poll_ms` /
/// `log_flush_ms` away, 1 s by default), plus the callout (`callout_timeout_ms`, 2 s by
/// default) before the entry expires; and a key in steady use is fetched at most once
/// per 80 % of the TTL per worker, 1.25 × the fetches of a plain TTL. With a TTL below
/// about five ticks the refresh may land after the entry expired: then the request
/// after the TTL waits, as without refresh-ahead.
pub const REFRESH_AHEAD_PERCENT: u64 = 20;

struct Entry {
    value: Option<Secret>,
    fetched_at_ms: u64,
    /// A background refresh was asked for (once per fetched entry).
    refresh_asked: Cell<bool>,
}

/// A service of the current snapshot: its vault's name and its index there.
type ServiceRef = (Rc<str>, usize);

/// Credential values of one worker.
pub struct CredentialCache {
    ttl_ms: u64,
    /// The age from which a used entry is due for a refresh: the TTL less its last
    /// [`REFRESH_AHEAD_PERCENT`] %.
    refresh_from_ms: u64,
    vaults: HashMap<String, HashMap<String, Entry>>,
    /// What services' values rendered to, by vault and service index in the current
    /// snapshot: kept only as long as every value it was made from is unchanged, so
    /// dropped whenever a value is stored, expired or cleared (and with it the copies
    /// of secrets it holds).
    renders: RefCell<HashMap<ServiceRef, Rc<Rendered>>>,
    /// Refreshes asked for by the decision being made (the decision only borrows the
    /// cache): the fetches to send, drained by the worker after it.
    wanted: RefCell<Vec<FlightKey>>,
}

impl fmt::Debug for CredentialCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialCache")
            .field("ttl_ms", &self.ttl_ms)
            .field("entries", &self.len())
            .finish()
    }
}

impl CredentialCache {
    /// A cache whose entries live `ttl_ms`; 0 disables it.
    pub fn new(ttl_ms: u64) -> CredentialCache {
        CredentialCache {
            ttl_ms,
            refresh_from_ms: ttl_ms
                .saturating_sub(ttl_ms.saturating_mul(REFRESH_AHEAD_PERCENT) / 100),
            vaults: HashMap::new(),
            renders: RefCell::default(),
            wanted: RefCell::new(Vec::new()),
        }
    }

    /// Looks a key up at time `now_ms`. Lookups borrow; nothing is allocated.
    pub fn get(&self, vault: &str, key: &str, now_ms: u64) -> Cached<'_> {
        match self.entry(vault, key, now_ms) {
            Some(Entry {
                value: Some(secret),
                ..
            }) => Cached::Value(secret.expose()),
            Some(Entry { value: None, .. }) => Cached::Missing,
            None => Cached::Unknown,
        }
    }

    /// The fresh entry for a key.
    fn entry(&self, vault: &str, key: &str, now_ms: u64) -> Option<&Entry> {
        self.vaults
            .get(vault)
            .and_then(|keys| keys.get(key))
            .filter(|entry| self.fresh(entry, now_ms))
    }

    /// Looks a key up at time `now_ms` like [`CredentialCache::get`], and says whether
    /// the entry is due for a background refresh: it is fresh and in the last
    /// [`REFRESH_AHEAD_PERCENT`] % of its TTL, and no refresh was asked for it yet.
    /// `true` is said once per fetched entry: this lookup takes the refresh on.
    pub fn lookup(&self, vault: &str, key: &str, now_ms: u64) -> (Cached<'_>, bool) {
        let Some(entry) = self.entry(vault, key, now_ms) else {
            return (Cached::Unknown, false);
        };
        let refresh = self.refresh_window(entry, now_ms) && !entry.refresh_asked.replace(true);
        let cached = match &entry.value {
            Some(secret) => Cached::Value(secret.expose()),
            None => Cached::Missing,
        };
        (cached, refresh)
    }

    /// Whether a fresh entry is in the last [`REFRESH_AHEAD_PERCENT`] % of its TTL.
    fn refresh_window(&self, entry: &Entry, now_ms: u64) -> bool {
        now_ms.saturating_sub(entry.fetched_at_ms) >= self.refresh_from_ms
    }

    /// Records that a request served from the cache found its keys due for a
    /// refresh (see [`CredentialCache::lookup`]); the worker takes it with
    /// [`CredentialCache::take_refreshes`] right after the decision.
    pub fn want_refresh(&self, refresh: FlightKey) {
        if let Ok(mut wanted) = self.wanted.try_borrow_mut() {
            wanted.push(refresh);
        }
    }

    /// The refreshes asked for since the last call (nothing is allocated when none).
    pub fn take_refreshes(&self) -> Vec<FlightKey> {
        self.wanted
            .try_borrow_mut()
            .map(|mut wanted| std::mem::take(&mut *wanted))
            .unwrap_or_default()
    }

    /// Stores a value (`None`: known missing) fetched at `now_ms`.
    pub fn insert(&mut self, vault: &str, key: &str, value: Option<Secret>, now_ms: u64) {
        if self.ttl_ms == 0 {
            return;
        }
        self.renders.get_mut().clear();
        let entry = Entry {
            value,
            fetched_at_ms: now_ms,
            refresh_asked: Cell::new(false),
        };
        match self.vaults.get_mut(vault) {
            Some(keys) => {
                keys.insert(key.to_owned(), entry);
            }
            None => {
                self.vaults
                    .insert(vault.to_owned(), HashMap::from([(key.to_owned(), entry)]));
            }
        }
    }

    /// Drops everything (the snapshot version changed).
    pub fn clear(&mut self) {
        self.vaults.clear();
        self.renders.get_mut().clear();
    }

    /// Drops stale entries, so values do not linger in memory past their TTL.
    pub fn purge(&mut self, now_ms: u64) {
        let ttl_ms = self.ttl_ms;
        let before = self.len();
        for keys in self.vaults.values_mut() {
            keys.retain(|_, entry| is_fresh(ttl_ms, entry, now_ms));
        }
        self.vaults.retain(|_, keys| !keys.is_empty());
        if self.len() != before {
            self.renders.get_mut().clear();
        }
    }

    /// What service `service` of `vault` rendered to, if its values have not changed
    /// since (the caller checks that they are all still fresh).
    pub fn rendered(&self, vault: &Rc<str>, service: usize) -> Option<Rc<Rendered>> {
        self.renders
            .borrow()
            .get(&(Rc::clone(vault), service))
            .map(Rc::clone)
    }

    /// Keeps what service `service` of `vault` rendered to, and returns it.
    pub fn remember(&self, vault: &Rc<str>, service: usize, rendered: Rendered) -> Rc<Rendered> {
        let rendered = Rc::new(rendered);
        self.renders
            .borrow_mut()
            .insert((Rc::clone(vault), service), Rc::clone(&rendered));
        rendered
    }

    /// Number of cached keys.
    pub fn len(&self) -> usize {
        self.vaults.values().map(HashMap::len).sum()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn fresh(&self, entry: &Entry, now_ms: u64) -> bool {
        is_fresh(self.ttl_ms, entry, now_ms)
    }
}

/// Younger than the TTL. A clock that went backwards makes entries stale rather than
/// fresh for longer.
fn is_fresh(ttl_ms: u64, entry: &Entry, now_ms: u64) -> bool {
    now_ms >= entry.fetched_at_ms && now_ms - entry.fetched_at_ms < ttl_ms
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(value: &str) -> Option<Secret> {
        Some(Secret::new(value.to_owned()))
    }

    #[test]
    fn entries_expire_after_the_ttl() {
        let mut cache = CredentialCache::new(1000);
        cache.insert("v1", "KEY", secret("s1"), 10_000);
        cache.insert("v1", "GONE", None, 10_000);
        // (behaviour, vault, key, now, expected)
        #[rustfmt::skip]
        let cases: &[(&str, &str, &str, u64, Cached<'_>)] = &[
            ("fresh value", "v1", "KEY", 10_000, Cached::Value("s1")),
            ("still fresh just before the ttl", "v1", "KEY", 10_999, Cached::Value("s1")),
            ("stale at the ttl", "v1", "KEY", 11_000, Cached::Unknown),
            ("clock went backwards", "v1", "KEY", 9_999, Cached::Unknown),
            ("known missing", "v1", "GONE", 10_500, Cached::Missing),
            ("known missing goes stale too", "v1", "GONE", 11_000, Cached::Unknown),
            ("other key", "v1", "OTHER", 10_000, Cached::Unknown),
            ("same key in another vault", "v2", "KEY", 10_000, Cached::Unknown),
        ];
        for (behaviour, vault, key, now, expected) in cases {
            assert_eq!(cache.get(vault, key, *now), *expected, "{behaviour}");
        }
    }

    #[test]
    fn ttl_zero_disables_the_cache() {
        let mut cache = CredentialCache::new(0);
        cache.insert("v1", "KEY", secret("s1"), 10_000);
        assert_eq!(cache.get("v1", "KEY", 10_000), Cached::Unknown);
        assert!(cache.is_empty());
    }

    #[test]
    fn clear_and_purge() {
        let mut cache = CredentialCache::new(1000);
        cache.insert("v1", "OLD", secret("a"), 1_000);
        cache.insert("v1", "NEW", secret("b"), 1_800);
        cache.insert("v2", "OLD", secret("c"), 1_000);
        cache.purge(2_100);
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.get("v1", "NEW", 2_100), Cached::Value("b"));
        cache.insert("v1", "NEW", secret("b2"), 2_200);
        assert_eq!(cache.get("v1", "NEW", 2_200), Cached::Value("b2"));
        cache.clear();
        assert!(cache.is_empty());
        assert_eq!(cache.get("v1", "NEW", 2_200), Cached::Unknown);
    }

    #[test]
    fn a_refresh_is_due_once_per_fetched_entry_in_the_last_fifth_of_its_ttl() {
        assert_eq!(REFRESH_AHEAD_PERCENT, 20);
        let mut cache = CredentialCache::new(1000);
        cache.insert("v1", "KEY", secret("s1"), 10_000);
        cache.insert("v1", "GONE", None, 10_000);
        // (behaviour, key, now, expected lookup), in this order: a lookup that says
        // "due" takes the refresh on.
        #[rustfmt::skip]
        let cases: &[(&str, &str, u64, (Cached<'_>, bool))] = &[
            ("fresh, early", "KEY", 10_000, (Cached::Value("s1"), false)),
            ("just before the window", "KEY", 10_799, (Cached::Value("s1"), false)),
            ("in the window: due", "KEY", 10_800, (Cached::Value("s1"), true)),
            ("asked once only", "KEY", 10_900, (Cached::Value("s1"), false)),
            ("stale: a normal miss, no refresh", "KEY", 11_000, (Cached::Unknown, false)),
            ("unknown key", "OTHER", 10_900, (Cached::Unknown, false)),
            ("known missing in the window", "GONE", 10_999, (Cached::Missing, true)),
        ];
        for (behaviour, key, now, expected) in cases {
            assert_eq!(cache.lookup("v1", key, *now), *expected, "{behaviour}");
        }
        // A new value (the refresh's answer) starts a new TTL, and may be refreshed.
        cache.insert("v1", "KEY", secret("s2"), 10_950);
        assert_eq!(
            cache.lookup("v1", "KEY", 11_500),
            (Cached::Value("s2"), false)
        );
        assert_eq!(
            cache.lookup("v1", "KEY", 11_750),
            (Cached::Value("s2"), true)
        );
        // `get` never takes a refresh on.
        cache.insert("v1", "KEY", secret("s3"), 20_000);
        assert_eq!(cache.get("v1", "KEY", 20_900), Cached::Value("s3"));
        assert_eq!(
            cache.lookup("v1", "KEY", 20_900),
            (Cached::Value("s3"), true)
        );
    }

    #[test]
    fn ttl_zero_never_refreshes_and_wanted_refreshes_are_taken_once() {
        let mut cache = CredentialCache::new(0);
        cache.insert("v1", "KEY", secret("s1"), 10_000);
        assert_eq!(cache.lookup("v1", "KEY", 10_000), (Cached::Unknown, false));
        assert!(cache.take_refreshes().is_empty());
        let refresh = FlightKey {
            token_sha256: "t".into(),
            vault: Rc::from("v1"),
            keys: vec!["KEY".into()],
        };
        cache.want_refresh(refresh.clone());
        assert_eq!(cache.take_refreshes(), vec![refresh]);
        assert!(cache.take_refreshes().is_empty());
    }

    #[test]
    fn debug_never_shows_values() {
        let mut cache = CredentialCache::new(1000);
        cache.insert("v1", "KEY", secret("sk_live_secret"), 0);
        let debug = format!("{cache:?} {:?}", Secret::new("sk_live_secret".into()));
        assert!(!debug.contains("sk_live_secret"), "{debug}");
    }
}
