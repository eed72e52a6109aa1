//! Steady load on (e) with the default credential TTL (issue 15): `wrk` at a fixed
//! connection count for `--steady-secs` (300 by default), after a warm-up outside the
//! window, reading the filter's Envoy counters and the control plane's before and after.
//! With refresh-ahead (filter/src/cache.rs) a credential in steady use is re-fetched in
//! the background before its TTL ends, so no request should wait on a fetch: the target
//! is zero `agent_vault.cache.misses` in the window.

use std::time::Duration;

use crate::controlplane::ControlPlane;
use crate::envoy::Envoy;
use crate::load;

/// wrk's connections: the higher count of the throughput runs.
pub const CONNECTIONS: usize = 16;
/// The credential TTL of (e)'s filter configuration (`envoy.rs`): the default.
pub const TTL_MS: u64 = 60_000;
/// Load before the window, not counted: every worker fetches and caches the credential.
const WARMUP: Duration = Duration::from_secs(2);
/// The filter adds its counts to Envoy's on its tick (every second): wait a bit longer
/// before each reading.
const SETTLE: Duration = Duration::from_millis(1500);

/// Envoy's counter of the requests that waited on a credential fetch.
pub const WAITED_STAT: &str = "agent_vault.cache.misses";
/// Envoy's counter of the background refreshes.
pub const REFRESHES_STAT: &str = "agent_vault.cache.refreshes";

/// What the window saw.
#[derive(Debug, Clone, Copy, Default)]
pub struct Steady {
    pub secs: u64,
    pub connections: usize,
    /// Requests wrk completed, and its rate.
    pub requests: u64,
    pub rps: f64,
    pub non_2xx: u64,
    /// Requests paused for a credential fetch (`None`: Envoy's counter not readable).
    pub waited: Option<u64>,
    /// Background refreshes sent.
    pub refreshes: Option<u64>,
    /// Credential fetches the control plane answered (refreshes and misses).
    pub cp_fetches: u64,
}

/// Runs the window on `envoy` (the (e) variant) and its control plane `cp`.
pub fn run(
    envoy: &Envoy,
    cp: &ControlPlane,
    target: &load::Target<'_>,
    secs: u64,
) -> Result<Steady, String> {
    load::wrk(target, CONNECTIONS, WARMUP)?;
    std::thread::sleep(SETTLE);
    let read = || {
        (
            envoy.counter_sum(WAITED_STAT),
            envoy.counter_sum(REFRESHES_STAT),
            cp.counts(),
        )
    };
    let (waited, refreshes, cp_before) = read();
    let run = load::wrk(target, CONNECTIONS, Duration::from_secs(secs))?;
    std::thread::sleep(SETTLE);
    let (waited_after, refreshes_after, cp_after) = read();
    let delta = |after: Option<u64>, before: Option<u64>| {
        after.zip(before).map(|(a, b)| a.saturating_sub(b))
    };
    Ok(Steady {
        secs,
        connections: CONNECTIONS,
        requests: run.requests,
        rps: run.rps,
        non_2xx: run.non_2xx + run.socket_errors,
        waited: delta(waited_after, waited),
        refreshes: delta(refreshes_after, refreshes),
        cp_fetches: cp_after.since(cp_before).credentials,
    })
}
