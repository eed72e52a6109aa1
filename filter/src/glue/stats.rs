//! The host side of [`crate::stats`]: defines the metrics once per VM, keeps their ids,
//! and writes to Envoy. One VM runs one worker's callbacks one at a time, so the state
//! is a thread-local of the VM.
//!
//! The metric host calls are imported directly rather than through the SDK's
//! `hostcalls`, which panic (trap the VM) on a status they do not expect, and with a
//! plain `u32` status (no enum the host could send an unknown value for): a stats
//! failure must never break a request.

use std::cell::RefCell;
use std::time::UNIX_EPOCH;

use proxy_wasm::hostcalls;
use proxy_wasm::types::{MetricType, Status};

use crate::decide::Forward;
use crate::stats::{self, Callout, Counter, Stats, COUNTERS};
use agent_vault_rules::reply::ErrorCode;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_define_metric(
        metric_type: u32,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
}

/// Envoy's ids of this VM's metrics (`None`: the host refused to define one).
struct Ids {
    counters: [Option<u32>; COUNTERS],
    fetch_us: Option<u32>,
    poll_us: Option<u32>,
    snapshot_version: Option<u32>,
}

#[derive(Default)]
struct Registry {
    ids: Option<Ids>,
    stats: Stats,
}

thread_local! {
    static REGISTRY: RefCell<Registry> = RefCell::new(Registry::default());
}

fn define_metric(kind: MetricType, name: &str) -> Option<u32> {
    let mut id = 0u32;
    // SAFETY: the name outlives the call; the host writes one u32 through `id`.
    let status = unsafe { proxy_define_metric(kind as u32, name.as_ptr(), name.len(), &mut id) };
    (status == Status::Ok as u32).then_some(id)
}

/// Unix microseconds from the host clock (0 if the host cannot tell).
fn now_us() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

fn with(f: impl FnOnce(&mut Registry)) {
    REGISTRY.with(|registry| {
        if let Ok(mut registry) = registry.try_borrow_mut() {
            f(&mut registry);
        }
    });
}

/// Defines every metric of this VM (once, whatever the number of root contexts).
pub fn define() {
    with(|registry| {
        if registry.ids.is_some() {
            return;
        }
        let mut counters = [None; COUNTERS];
        for counter in Counter::all() {
            if let Some(slot) = counters.get_mut(counter.slot()) {
                *slot = define_metric(MetricType::Counter, &counter.name());
            }
        }
        registry.ids = Some(Ids {
            counters,
            fetch_us: define_metric(MetricType::Histogram, &Callout::Fetch.histogram()),
            poll_us: define_metric(MetricType::Histogram, &Callout::Poll.histogram()),
            snapshot_version: define_metric(MetricType::Gauge, &stats::snapshot_version_gauge()),
        });
    });
}

/// The filter answered a request itself.
pub fn denied(code: ErrorCode) {
    with(|r| r.stats.count(Counter::Denied(code)));
}

/// A request goes upstream; `from_cache`: decided on arrival, without a fetch.
pub fn forwarded(forward: &Forward, from_cache: bool) {
    with(|r| r.stats.forwarded(forward, from_cache));
}

/// `n` occurrences of a secret were replaced in a response.
pub fn redacted(n: u64) {
    with(|r| r.stats.add(Counter::Redactions, n));
}

/// A request has to wait for a credential fetch.
pub fn cache_miss() {
    with(|r| r.stats.count(Counter::CacheMiss));
}

/// One more of `counter` (an event with nothing else to record).
pub fn count(counter: Counter) {
    with(|r| r.stats.count(counter));
}

/// A callout was dispatched (`Some(token)`) or could not be (`None`).
pub fn callout_sent(kind: Callout, token: Option<u32>) {
    with(|r| match token {
        Some(token) => r.stats.callout_started(token, kind, now_us()),
        None => r.stats.callout_not_sent(kind),
    });
}

/// The answer to callout `token` arrived; records its latency.
pub fn callout_answered(token: u32, usable: bool) {
    with(|r| {
        let Some((kind, latency_us)) = r.stats.callout_answered(token, now_us(), usable) else {
            return;
        };
        let id = r.ids.as_ref().and_then(|ids| match kind {
            Callout::Fetch => ids.fetch_us,
            Callout::Poll => ids.poll_us,
        });
        if let Some(id) = id {
            // SAFETY: plain values; the host ignores an id it does not know.
            let _ = unsafe { proxy_record_metric(id, latency_us) };
        }
    });
}

/// A snapshot long-poll was dispatched, or refused (a poll failure).
pub fn long_poll_sent(sent: bool) {
    if !sent {
        with(|r| r.stats.count(Counter::PollFailure));
    }
}

/// A snapshot long-poll's answer arrived: counted, or a poll failure.
pub fn long_poll_answered(usable: bool) {
    with(|r| {
        r.stats.count(if usable {
            Counter::LongPoll
        } else {
            Counter::PollFailure
        })
    });
}

/// A snapshot was installed.
pub fn snapshot_loaded(version: &str) {
    with(|r| {
        let id = r.ids.as_ref().and_then(|ids| ids.snapshot_version);
        if let (Some(id), Some(value)) = (id, stats::snapshot_version_value(version)) {
            // SAFETY: plain values.
            let _ = unsafe { proxy_record_metric(id, value) };
        }
    });
}

/// Adds the counts since the last flush to Envoy's counters (on the root's tick), and
/// gives up timing callouts older than `max_callout_ms`.
pub fn flush(max_callout_ms: u64) {
    with(|r| {
        r.stats
            .expire_callouts(now_us(), max_callout_ms.saturating_mul(1000));
        let Some(ids) = r.ids.as_ref() else {
            return;
        };
        for (slot, count) in r.stats.take() {
            let id = ids.counters.get(slot).copied().flatten();
            if let Some(id) = id {
                let delta = i64::try_from(count).unwrap_or(i64::MAX);
                // SAFETY: plain values.
                let _ = unsafe { proxy_increment_metric(id, delta) };
            }
        }
    });
}
