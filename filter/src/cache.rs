//! The per-worker credential cache: `(vault, key)` → value (or "known missing").
//!
//! Values live only in this worker's memory, never in Envoy shared data or logs. An
//! entry is used while it is younger than `credential_cache_ttl_ms`; the whole cache is
//! dropped when the snapshot version changes (every credential write bumps it), so a
//! changed or deleted credential takes effect within one poll interval. Keys the
//! control plane reported missing are cached too, so a service whose credential was
//! deleted costs one callout per TTL, not one per request.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::rc::Rc;

use crate::decide::Rendered;

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

struct Entry {
    value: Option<Secret>,
    fetched_at_ms: u64,
}

/// A service of the current snapshot: its vault's name and its index there.
type ServiceRef = (Rc<str>, usize);

/// Credential values of one worker.
pub struct CredentialCache {
    ttl_ms: u64,
    vaults: HashMap<String, HashMap<String, Entry>>,
    /// What services' values rendered to, by vault and service index in the current
    /// snapshot: kept only as long as every value it was made from is unchanged, so
    /// dropped whenever a value is stored, expired or cleared (and with it the copies
    /// of secrets it holds).
    renders: RefCell<HashMap<ServiceRef, Rc<Rendered>>>,
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
            vaults: HashMap::new(),
            renders: RefCell::default(),
        }
    }

    /// Looks a key up at time `now_ms`. Lookups borrow; nothing is allocated.
    pub fn get(&self, vault: &str, key: &str, now_ms: u64) -> Cached<'_> {
        let Some(entry) = self.vaults.get(vault).and_then(|keys| keys.get(key)) else {
            return Cached::Unknown;
        };
        if !self.fresh(entry, now_ms) {
            return Cached::Unknown;
        }
        match &entry.value {
            Some(secret) => Cached::Value(secret.expose()),
            None => Cached::Missing,
        }
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
    fn debug_never_shows_values() {
        let mut cache = CredentialCache::new(1000);
        cache.insert("v1", "KEY", secret("sk_live_secret"), 0);
        let debug = format!("{cache:?} {:?}", Secret::new("sk_live_secret".into()));
        assert!(!debug.contains("sk_live_secret"), "{debug}");
    }
}
