//! Per-agent rate limits of services (a service's `rate_limit`), counted in Envoy's
//! shared data so the bound is global: every worker VM of the `agent_vault` `vm_id`
//! (the agents' listener and the tunnels' internal listener alike) reads and writes the
//! same counter, with compare-and-swap.
//!
//! One key per agent token and service ([`key`]): `av-rl|<sha256(token)>|vault|service`;
//! its value is the window's start (unix ms, aligned on the clock) and the count in it.
//! A new window overwrites the value, so keys never multiply with time: their number is
//! bounded by agents × limited services (keys of revoked agents stay until Envoy
//! restarts; each is under 200 bytes). Keying by the authenticated token, not by the
//! connection, is what keeps new connections and new tunnels from resetting the count.
//!
//! A write that loses a race ([`SetError::CasMismatch`]) is retried from a fresh read,
//! up to [`MAX_ATTEMPTS`] times; then, or when the host refuses shared data, the
//! request is refused (fails closed, `Retry-After: 1`). One race is not covered by
//! CAS: two workers creating the same key at once (Envoy has no insert-if-absent), so
//! the very first window of a key may admit one request more.

use agent_vault_rules::RateLimit;

/// Reads and writes of Envoy's shared data (see [`crate::host::Host`]).
pub trait SharedStore {
    /// The value under `key` and its CAS (`(None, 0)`: no such key).
    fn shared_get(&mut self, key: &str) -> (Option<Vec<u8>>, u32);

    /// Writes `value` under `key` if its CAS is still `cas` (0: unconditionally).
    fn shared_set(&mut self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError>;
}

/// Why a [`SharedStore::shared_set`] did not write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetError {
    /// Another writer changed the value since it was read.
    CasMismatch,
    /// The host refused, with its status.
    Refused(String),
}

/// Writes retried after losing a CAS race before the request is refused.
pub const MAX_ATTEMPTS: usize = 8;

/// The service part of the key of a vault-wide limit: no service name can be `*`.
pub const WHOLE_VAULT: &str = "*";

/// The shared-data key of an agent's count for a service ([`WHOLE_VAULT`]: for all of
/// the vault's services).
pub fn key(token_sha256: &str, vault: &str, service: &str) -> String {
    format!("av-rl|{token_sha256}|{vault}|{service}")
}

/// What [`admit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Counted; go on.
    Admitted,
    /// Over the limit (or the count could not be kept): retry in this many seconds.
    Limited {
        /// Seconds until the window ends (at least 1).
        retry_after_s: u64,
    },
}

fn encode(start_ms: u64, count: u32) -> [u8; 12] {
    let mut value = [0u8; 12];
    let (start, rest) = value.split_at_mut(8);
    start.copy_from_slice(&start_ms.to_le_bytes());
    rest.copy_from_slice(&count.to_le_bytes());
    value
}

fn decode(value: &[u8]) -> Option<(u64, u32)> {
    let start: [u8; 8] = value.get(..8)?.try_into().ok()?;
    let count: [u8; 4] = value.get(8..12)?.try_into().ok()?;
    Some((u64::from_le_bytes(start), u32::from_le_bytes(count)))
}

/// Counts one request under `key` against `limit` at `now_ms` (a fixed window aligned
/// on the clock), unless the window's count already reached the limit.
pub fn admit(store: &mut impl SharedStore, key: &str, limit: RateLimit, now_ms: u64) -> Admission {
    let window = limit.per.millis();
    let start = now_ms - now_ms % window;
    let retry_after_s = (start + window - now_ms).div_ceil(1000).max(1);
    for _ in 0..MAX_ATTEMPTS {
        let (value, cas) = store.shared_get(key);
        let count = match value.as_deref().and_then(decode) {
            Some((stored, count)) if stored == start => count,
            // No key, another window (past, or a clock that stepped), or garbage.
            _ => 0,
        };
        if count >= limit.requests {
            return Admission::Limited { retry_after_s };
        }
        match store.shared_set(key, &encode(start, count.saturating_add(1)), cas) {
            Ok(()) => return Admission::Admitted,
            Err(SetError::CasMismatch) => {}
            Err(SetError::Refused(_)) => return Admission::Limited { retry_after_s: 1 },
        }
    }
    Admission::Limited { retry_after_s: 1 }
}

/// Envoy's shared data in memory, with its CAS rules (for tests).
#[cfg(test)]
#[derive(Debug, Default)]
pub struct MemoryStore {
    /// Each key's value and CAS.
    pub values: std::collections::BTreeMap<String, (Vec<u8>, u32)>,
    next_cas: u32,
    /// Writes to fail with a CAS mismatch before the next one succeeds.
    pub lose_races: usize,
    /// Refuse every write.
    pub refuse: bool,
}

#[cfg(test)]
impl SharedStore for MemoryStore {
    fn shared_get(&mut self, key: &str) -> (Option<Vec<u8>>, u32) {
        match self.values.get(key) {
            Some((value, cas)) => (Some(value.clone()), *cas),
            None => (None, 0),
        }
    }

    fn shared_set(&mut self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError> {
        if self.refuse {
            return Err(SetError::Refused("NotAllowed".into()));
        }
        if self.lose_races > 0 {
            self.lose_races -= 1;
            return Err(SetError::CasMismatch);
        }
        if let Some((_, current)) = self.values.get(key) {
            if cas != 0 && cas != *current {
                return Err(SetError::CasMismatch);
            }
        }
        self.next_cas += 1;
        self.values
            .insert(key.to_owned(), (value.to_vec(), self.next_cas));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_vault_rules::RatePeriod;

    const MINUTE_START: u64 = 1_700_000_040_000; // a multiple of 60 000

    fn five_per_minute() -> RateLimit {
        RateLimit {
            requests: 5,
            per: RatePeriod::Minute,
        }
    }

    #[test]
    fn counts_up_to_the_limit_then_says_when_the_window_ends() {
        assert_eq!(MINUTE_START % 60_000, 0);
        let mut store = MemoryStore::default();
        let key = key("abc", "v", "s");
        for i in 0..5 {
            let now = MINUTE_START + 1_000 * i;
            assert_eq!(
                admit(&mut store, &key, five_per_minute(), now),
                Admission::Admitted,
                "{i}"
            );
        }
        assert_eq!(
            admit(&mut store, &key, five_per_minute(), MINUTE_START + 20_500),
            Admission::Limited { retry_after_s: 40 }
        );
        assert_eq!(
            admit(&mut store, &key, five_per_minute(), MINUTE_START + 59_999),
            Admission::Limited { retry_after_s: 1 }
        );
        // The next window starts afresh, in the same key.
        assert_eq!(
            admit(&mut store, &key, five_per_minute(), MINUTE_START + 60_000),
            Admission::Admitted
        );
        assert_eq!(store.values.len(), 1);
    }

    #[test]
    fn keys_are_per_agent_and_service() {
        let mut store = MemoryStore::default();
        let one = RateLimit {
            requests: 1,
            per: RatePeriod::Second,
        };
        let now = MINUTE_START + 10;
        for k in [key("a", "v", "s"), key("b", "v", "s"), key("a", "v", "t")] {
            assert_eq!(admit(&mut store, &k, one, now), Admission::Admitted, "{k}");
            assert_eq!(
                admit(&mut store, &k, one, now),
                Admission::Limited { retry_after_s: 1 },
                "{k}"
            );
        }
        assert_eq!(
            admit(&mut store, &key("a", "v", "s"), one, now + 1_000),
            Admission::Admitted
        );
    }

    #[test]
    fn lost_races_are_retried_and_too_many_fail_closed() {
        let mut store = MemoryStore {
            lose_races: MAX_ATTEMPTS - 1,
            ..MemoryStore::default()
        };
        let key = key("a", "v", "s");
        assert_eq!(
            admit(&mut store, &key, five_per_minute(), MINUTE_START),
            Admission::Admitted
        );
        store.lose_races = MAX_ATTEMPTS;
        assert_eq!(
            admit(&mut store, &key, five_per_minute(), MINUTE_START),
            Admission::Limited { retry_after_s: 1 }
        );
        store.refuse = true;
        assert_eq!(
            admit(&mut store, &key, five_per_minute(), MINUTE_START),
            Admission::Limited { retry_after_s: 1 }
        );
    }

    #[test]
    fn a_stale_cas_is_a_mismatch() {
        let mut store = MemoryStore::default();
        assert_eq!(store.shared_set("k", b"1", 0), Ok(()));
        let (_, cas) = store.shared_get("k");
        assert_eq!(store.shared_set("k", b"2", cas), Ok(()));
        assert_eq!(store.shared_set("k", b"3", cas), Err(SetError::CasMismatch));
        assert_eq!(decode(b"short"), None);
    }
}
