//! The snapshot long-poll through the real Envoy and the real control plane (DESIGN.md
//! §4): with the periodic poll ten minutes away, only the long-poll each worker keeps
//! outstanding can deliver a change, so every change below reaching every worker within
//! seconds is the long-poll at work. It also waits out one whole long-poll (25 s): the
//! held requests must end in a 304 and go out again, not in Envoy's timeout.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use agent_vault_testkit::control_plane::ServerOptions;
use agent_vault_testkit::envoy::EnvoyOptions;
use agent_vault_testkit::http::HttpResponse;
use agent_vault_testkit::stack::{on_every_worker, wait_for, Stack};
use agent_vault_testkit::upstream::Echo;

/// Far longer than any wait below: a change that arrives came through the long-poll.
const POLL_MS: u64 = 600_000;
/// How long a change may take to reach every worker here (the target is milliseconds;
/// this leaves room for a loaded machine).
const PUSHED: Duration = Duration::from_secs(4);
/// Requests in a run that must all show a state (and reach both workers).
const STREAK: usize = 6;

fn injected(response: &HttpResponse, value: &str) -> bool {
    response.status == 200
        && response.header("x-agent-vault-error").is_none()
        && serde_json::from_str::<Value>(&response.body)
            .map(|seen| seen["headers"]["authorization"] == format!("Bearer {value}"))
            .unwrap_or(false)
}

fn refused(response: &HttpResponse, status: u16, code: &str) -> bool {
    response.status == status
        && response.header("x-agent-vault-error") == Some("true")
        && serde_json::from_str::<Value>(&response.body)
            .map(|body| body["error"] == code)
            .unwrap_or(false)
}

#[test]
fn with_the_periodic_poll_ten_minutes_away_a_revoke_reaches_every_worker_through_the_long_poll() {
    let stack = Stack::start_with(ServerOptions::default(), |options| EnvoyOptions {
        snapshot_poll_ms: POLL_MS,
        credential_cache_ttl_ms: 3_600_000,
        ..options
    });
    // Every worker holds a long-poll (two filter instances per worker in this
    // bootstrap: the agents' listener and the decrypted tunnels').
    let held = wait_for(Duration::from_secs(10), || {
        let held = stack.dataplane_stats()["long_polls_held"].as_u64()?;
        (held >= 2).then_some(held)
    });
    assert!(
        held.is_some(),
        "the workers do not hold long-polls: {}",
        stack.dataplane_stats()
    );
    println!(
        "long-polls held: {} (one per filter VM)",
        stack.dataplane_stats()["long_polls_held"]
    );

    // Everything below was written after Envoy loaded its first snapshot.
    let echo = Echo::plain();
    let started = Instant::now();
    stack.set_credential("default", "LP_KEY", "lp-secret");
    stack.add_service(
        "default",
        json!({"name": "lp", "host": echo.authority(), "upstream_tls": false,
               "auth": {"type": "bearer", "token": "LP_KEY"}}),
    );
    let doomed = stack.create_agent("doomed", &["default"]);
    let get = || stack.get_as(&doomed, "default", &echo.url("/lp"), &[]);
    // Fresh connections, so both workers answer; each fetches and caches the value.
    on_every_worker(&stack.envoy, PUSHED, STREAK, get, |r| {
        injected(r, "lp-secret")
    });
    println!(
        "a new service, credential and agent reached every worker in {:?}",
        started.elapsed()
    );

    stack.revoke_agent("doomed");
    let ack = Instant::now();
    let last = on_every_worker(&stack.envoy, PUSHED, STREAK, get, |r| {
        refused(r, 407, "invalid_token")
    });
    let took = ack.elapsed();
    println!("the revoke reached every worker within {took:?}");
    assert!(refused(&last, 407, "invalid_token"));

    // A credential change drops the cached value everywhere too.
    let keeper = stack.create_agent("keeper", &["default"]);
    let get = || stack.get_as(&keeper, "default", &echo.url("/lp"), &[]);
    on_every_worker(&stack.envoy, PUSHED, STREAK, get, |r| {
        injected(r, "lp-secret")
    });
    stack.set_credential("default", "LP_KEY", "lp-secret-2");
    on_every_worker(&stack.envoy, PUSHED, STREAK, get, |r| {
        injected(r, "lp-secret-2")
    });

    let stats = stack.dataplane_stats();
    assert!(
        stats["long_polls"].as_u64().unwrap_or(0) >= 8,
        "the changes came through long-polls: {stats}"
    );

    // Nothing changes for a whole wait (the filter's default, 25 s): the held requests
    // are answered 304 and sent again, and Envoy's callout timeout (the wait plus
    // callout_timeout_ms) does not cut them short.
    let not_modified = |stats: &Value| stats["snapshot_not_modified"].as_u64().unwrap_or(0);
    let before = not_modified(&stats);
    let after = wait_for(Duration::from_secs(40), || {
        let now = stack.dataplane_stats();
        (not_modified(&now) >= before + 2 && now["long_polls_held"].as_u64() >= Some(2))
            .then_some(now)
    });
    assert!(
        after.is_some(),
        "held long-polls were not answered 304 and sent again: {}",
        stack.dataplane_stats()
    );
    let log = stack.envoy.logs();
    assert!(
        !log.contains("snapshot poll failed"),
        "no long-poll failed: {}",
        stack.envoy.log_tail(30)
    );
}

/// Waits until the control plane holds at least `n` long-polls.
#[track_caller]
fn until_held(stack: &Stack, n: u64, within: Duration) {
    let held = wait_for(within, || {
        let held = stack.dataplane_stats()["long_polls_held"].as_u64()?;
        (held >= n).then_some(held)
    });
    assert!(
        held.is_some(),
        "fewer than {n} long-polls held after {within:?}: {}\n--- Envoy log (tail) ---\n{}",
        stack.dataplane_stats(),
        stack.envoy.log_tail(30)
    );
}

#[test]
fn a_control_plane_holding_long_polls_stops_at_once_and_once_back_the_workers_long_poll_again() {
    // The production settings: the long-poll on, plain polling every second as the
    // fallback.
    let mut stack = Stack::start();
    until_held(&stack, 2, Duration::from_secs(10));

    // SIGTERM: the held requests are answered, so the graceful shutdown does not wait
    // out their 25 s (the kit would SIGKILL it after 10 s).
    let stopping = Instant::now();
    stack.server.stop();
    let took = stopping.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "the control plane took {took:?} to stop"
    );

    // Same data dir and socket; Envoy untouched. The workers poll (1 s) until one
    // answers, then hold long-polls again.
    stack.server.restart();
    until_held(&stack, 2, Duration::from_secs(10));
    let echo = Echo::plain();
    stack.set_credential("default", "BACK_KEY", "back-secret");
    stack.add_service(
        "default",
        json!({"name": "back", "host": echo.authority(), "upstream_tls": false,
               "auth": {"type": "bearer", "token": "BACK_KEY"}}),
    );
    let token = stack.create_agent("back", &["default"]);
    let get = || stack.get_as(&token, "default", &echo.url("/back"), &[]);
    on_every_worker(&stack.envoy, PUSHED, STREAK, get, |r| {
        injected(r, "back-secret")
    });
    stack.revoke_agent("back");
    on_every_worker(&stack.envoy, PUSHED, STREAK, get, |r| {
        refused(r, 407, "invalid_token")
    });
}
