//! Refresh-ahead through the real Envoy and the real control plane (filter/src/cache.rs,
//! "Refresh-ahead"): with a short credential TTL and steady traffic, a credential in
//! use is re-fetched in the background before its TTL ends, so no request after each
//! worker's first waits on a fetch; a credential changed through the API is still
//! served new at once (the snapshot version change drops the cache).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use agent_vault_testkit::control_plane::ServerOptions;
use agent_vault_testkit::envoy::EnvoyOptions;
use agent_vault_testkit::http::{proxy_basic, Conn, HttpResponse, TcpConn};
use agent_vault_testkit::stack::{on_every_worker, Stack};
use agent_vault_testkit::upstream::Echo;

/// The credential TTL: its last 20 % (300 ms) is the refresh window.
const TTL_MS: u64 = 1500;
/// The root's tick (the poll period bounds it), which sends the refreshes: well inside
/// the window.
const POLL_MS: u64 = 100;
/// How long the steady traffic runs, and how often it sends a request.
const STEADY: Duration = Duration::from_secs(5);
const EVERY: Duration = Duration::from_millis(50);

fn injected(response: &HttpResponse, value: &str) -> bool {
    response.status == 200
        && response.header("x-agent-vault-error").is_none()
        && serde_json::from_str::<Value>(&response.body)
            .map(|seen| seen["headers"]["authorization"] == format!("Bearer {value}"))
            .unwrap_or(false)
}

fn stat(stats: &BTreeMap<String, u64>, name: &str) -> u64 {
    stats.get(name).copied().unwrap_or(0)
}

/// Credential fetches the control plane answered (`GET /v1/dataplane/stats`).
fn control_plane_fetches(stack: &Stack) -> u64 {
    let stats = stack.dataplane_stats();
    stats["credentials"]
        .as_u64()
        .unwrap_or_else(|| panic!("no credentials count in {stats}"))
}

/// The workers add their counts to Envoy's counters on their tick: wait for a few.
fn settle() {
    std::thread::sleep(Duration::from_millis(4 * POLL_MS));
}

#[test]
fn under_steady_traffic_no_request_waits_on_a_fetch_and_a_changed_credential_is_served_at_once() {
    let stack = Stack::start_with(ServerOptions::default(), |options| EnvoyOptions {
        snapshot_poll_ms: POLL_MS,
        credential_cache_ttl_ms: TTL_MS,
        ..options
    });
    let echo = Echo::plain();
    stack.set_credential("default", "RA_KEY", "ra-secret-1");
    stack.add_service(
        "default",
        json!({"name": "ra", "host": echo.authority(), "upstream_tls": false,
               "auth": {"type": "bearer", "token": "RA_KEY"}}),
    );
    let agent = stack.create_agent("steady", &["default"]);
    let get = || stack.get_as(&agent, "default", &echo.url("/ra"), &[]);
    // Each worker's first request waits on a fetch and fills its cache.
    on_every_worker(&stack.envoy, Duration::from_secs(10), 4, get, |r| {
        injected(r, "ra-secret-1")
    });
    // One keep-alive connection on each worker: each worker's cache is used every
    // 100 ms, several times in each refresh window (an entry nobody uses in its window
    // is not refreshed, by design).
    let auth = proxy_basic(&agent, "default");
    let target = echo.url("/ra");
    let mut connections: Vec<TcpConn> = Vec::new();
    let mut seen = vec![false; stack.envoy.worker_connections().len()];
    let opened = Instant::now();
    while seen.iter().any(|s| !s) {
        assert!(
            opened.elapsed() < Duration::from_secs(10),
            "a connection on every worker"
        );
        let before = stack.envoy.worker_connections();
        let mut conn = Conn::tcp(stack.envoy.port).expect("connect to Envoy");
        let response = conn
            .request("GET", &target, &[("Proxy-Authorization", &auth)], None)
            .expect("a response");
        assert_eq!(response.status, 200, "{}", response.text());
        let after = stack.envoy.worker_connections();
        let worker = after.iter().zip(&before).position(|(a, b)| a > b);
        if let Some(worker) = worker.filter(|w| !seen[*w]) {
            seen[worker] = true;
            connections.push(conn);
        }
    }
    settle();
    let before = stack.envoy.filter_stats();
    let fetches_before = control_plane_fetches(&stack);

    // Steady traffic for more than three TTLs: a request every 50 ms, taking turns on
    // the connections.
    let started = Instant::now();
    let mut sent = 0u64;
    while started.elapsed() < STEADY {
        let n = connections.len();
        let conn = &mut connections[usize::try_from(sent).unwrap_or(0) % n];
        let response = conn
            .request("GET", &target, &[("Proxy-Authorization", &auth)], None)
            .expect("a response");
        let value = response.json()["headers"]["authorization"].clone();
        assert!(
            response.status == 200 && value == "Bearer ra-secret-1",
            "request {sent}: {} {}",
            response.status,
            response.text()
        );
        sent += 1;
        std::thread::sleep(EVERY);
    }
    settle();
    let after = stack.envoy.filter_stats();
    let fetches = control_plane_fetches(&stack) - fetches_before;
    let delta = |name: &str| stat(&after, name) - stat(&before, name);
    let (waited, refreshes, hits) = (
        delta("agent_vault.cache.misses"),
        delta("agent_vault.cache.refreshes"),
        delta("agent_vault.cache.hits"),
    );
    println!(
        "{sent} requests in {:?}: {hits} from the cache, {waited} waited on a fetch, \
         {refreshes} background refreshes, {fetches} credential fetches at the control \
         plane",
        started.elapsed()
    );
    assert_eq!(hits, sent, "every request was served from the cache");
    assert_eq!(waited, 0, "no request waited on a fetch");
    // Each worker in use refreshes about once per 80 % of the TTL (1.2 s): 5 s of
    // traffic makes at least 3 on one of them.
    assert!(refreshes >= 3, "periodic refreshes: {refreshes}");
    assert!(
        fetches >= refreshes,
        "the control plane answered every refresh: {fetches} fetches, {refreshes} refreshes"
    );

    // A credential changed through the API: the snapshot version changes, every
    // worker drops its cache, and the new value is served at once: once a worker has
    // served it, no request gets the old one again.
    stack.set_credential("default", "RA_KEY", "ra-secret-2");
    on_every_worker(&stack.envoy, Duration::from_secs(4), 4, get, |r| {
        injected(r, "ra-secret-2")
    });
    let changed = Instant::now();
    while changed.elapsed() < Duration::from_secs(2) {
        let response = get();
        assert!(
            injected(&response, "ra-secret-2"),
            "after the change: {} {}",
            response.status,
            response.body
        );
        std::thread::sleep(EVERY);
    }
}
