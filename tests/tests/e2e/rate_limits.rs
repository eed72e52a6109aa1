//! Per-agent rate limits of services (issue 13): a service's `rate_limit`, through the
//! real Envoy (two workers) with loopback upstreams. The count is kept per agent token
//! and service in Envoy's shared data, so it holds across connections, across workers
//! and across HTTPS tunnels; past it, a JSON 429 `rate_limited` with `Retry-After`,
//! and the upstream never sees the request.
//!
//! Windows are aligned on the clock minute: a scenario (about a second) waits out the
//! last seconds of a minute before it starts, so it never straddles two windows.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use agent_vault_testkit::control_plane::{Server, ServerOptions};
use agent_vault_testkit::http::{proxy_basic, HttpResponse};
use agent_vault_testkit::https_agent::{HttpsTunnel, TlsOptions};
use agent_vault_testkit::stack::{on_every_worker, wait_for, Stack};
use agent_vault_testkit::upstream::{Echo, TestCa};

use crate::proxy::is_refusal;

/// Both workers load their first snapshot within this.
const SNAPSHOT: Duration = Duration::from_secs(15);

/// The limit of the services below: 5 requests per minute and agent.
const LIMIT: usize = 5;

/// Sleeps through the last 6 seconds of a clock minute, if it is in them.
fn away_from_a_minute_boundary() {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let left = 60_000 - now % 60_000;
    if left < 6_000 {
        std::thread::sleep(Duration::from_millis(u64::try_from(left).unwrap_or(0) + 50));
    }
}

#[track_caller]
fn assert_rate_limited(
    status: u16,
    error_header: Option<&str>,
    retry_after: Option<&str>,
    body: &str,
) {
    assert_eq!(
        (status, error_header),
        (429, Some("true")),
        "{status} {body}"
    );
    let body: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(body["error"], "rate_limited", "{body}");
    assert_eq!(body["service"], "limited", "{body}");
    assert_eq!(
        body["limit"],
        json!({"requests": LIMIT, "per": "minute"}),
        "{body}"
    );
    let seconds: u64 = retry_after
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("Retry-After: {retry_after:?}"));
    assert!((1..=60).contains(&seconds), "Retry-After {seconds}");
    assert_eq!(body["retry_after"], seconds, "{body}");
}

#[test]
fn a_rate_limit_holds_across_connections_and_workers_and_each_agent_has_its_own() {
    let limited = Echo::plain();
    let ready = Echo::plain();
    let entries = [
        format!("127.0.0.1/32:{}", limited.port),
        format!("127.0.0.1/32:{}", ready.port),
    ];
    let stack = Stack::start_with(ServerOptions::default(), |options| {
        options.allow_private_upstreams(&[&entries[0], &entries[1]])
    });
    let secret = "sk_live_rate_9c8b7a";
    stack.set_credential("default", "ECHO_TOKEN", secret);
    stack.add_service(
        "default",
        json!({"name": "limited", "host": limited.authority(), "upstream_tls": false,
               "rate_limit": {"requests": LIMIT, "per": "minute"},
               "auth": {"type": "bearer", "token": "ECHO_TOKEN"}}),
    );
    stack.add_service(
        "default",
        json!({"name": "ready", "host": ready.authority(), "upstream_tls": false,
               "auth": {"type": "passthrough"}}),
    );
    let (status, listed) = stack.api().get("/v1/vaults/default/services");
    assert_eq!(status, 200, "{listed}");
    let shown = listed
        .as_array()
        .and_then(|all| all.iter().find(|s| s["name"] == "limited").cloned())
        .unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(
        shown["rate_limit"],
        json!({"requests": LIMIT, "per": "minute"})
    );
    let first = stack.create_agent("rate-one", &["default"]);
    let second = stack.create_agent("rate-two", &["default"]);
    // The snapshot with every agent and both services is on every worker.
    on_every_worker(
        &stack.envoy,
        SNAPSHOT,
        4,
        || stack.get_as(&second, "default", &ready.url("/ready"), &[]),
        |r| r.status == 200,
    );

    away_from_a_minute_boundary();
    let before = stack.envoy.worker_connections();
    let mut responses: Vec<HttpResponse> = Vec::new();
    // Every request on a new connection; at least 12, until both workers took some.
    while responses.len() < 12
        || (responses.len() < 40 && {
            let now = stack.envoy.worker_connections();
            now.iter().zip(&before).filter(|(n, b)| n > b).count() < before.len()
        })
    {
        responses.push(stack.get_as(&first, "default", &limited.url("/v1/items"), &[]));
    }
    let (workers_before, workers_after) = (before, stack.envoy.worker_connections());
    let admitted: Vec<&HttpResponse> = responses.iter().filter(|r| r.status == 200).collect();
    assert_eq!(
        admitted.len(),
        LIMIT,
        "{} requests over as many connections, workers {workers_before:?} → {workers_after:?}: {:?}",
        responses.len(),
        responses.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    // The first LIMIT were admitted, with the credential; every later one is a 429.
    for (i, response) in responses.iter().enumerate() {
        if i < LIMIT {
            assert_eq!(
                response.echoed()["headers"]["authorization"],
                format!("Bearer {secret}")
            );
        } else {
            assert_rate_limited(
                response.status,
                response.header("x-agent-vault-error"),
                response.header("retry-after"),
                &response.body,
            );
            assert!(!response.body.contains(secret), "{}", response.body);
        }
    }
    assert_eq!(
        limited.received().len(),
        LIMIT,
        "a refused request reached the upstream"
    );
    assert!(
        workers_after
            .iter()
            .zip(&workers_before)
            .all(|(a, b)| a > b),
        "the requests reached every worker: {workers_before:?} → {workers_after:?}"
    );

    // Another agent has its own budget.
    let other = stack.get_as(&second, "default", &limited.url("/v1/other"), &[]);
    assert_eq!(
        other.echoed()["headers"]["authorization"],
        format!("Bearer {secret}")
    );

    // A refusal is logged with its service.
    let logged = wait_for(SNAPSHOT, || {
        let records: Vec<Value> = stack
            .request_log("default")
            .into_iter()
            .filter(|r| r["error"] == "rate_limited")
            .collect();
        (!records.is_empty()).then_some(records)
    })
    .unwrap_or_else(|| panic!("not logged: {:?}", stack.request_log("default")));
    assert!(
        logged
            .iter()
            .all(|r| r["service"] == "limited" && r["status"] == 429),
        "{logged:?}"
    );
}

#[test]
fn inside_https_tunnels_the_same_budget_applies_as_before_them() {
    let upstream_ca = TestCa::new("upstream test CA");
    let echo = Echo::tls(&upstream_ca);
    let ready = Echo::plain();
    let entries = [
        format!("127.0.0.1/32:{}", echo.port),
        format!("127.0.0.1/32:{}", ready.port),
    ];
    let stack = Stack::start_with_ca(ServerOptions::default(), upstream_ca, |options| {
        options.allow_private_upstreams(&[&entries[0], &entries[1]])
    });
    let proxy_ca: PathBuf = stack.server.proxy_ca();
    let ca_pem = std::fs::read_to_string(&proxy_ca).unwrap();
    let secret = "sk_test_tunnel_rate_31f0";
    stack.set_credential("default", "ECHO_TOKEN", secret);
    stack.add_service(
        "default",
        json!({"name": "limited", "host": echo.authority(),
               "rate_limit": {"requests": LIMIT, "per": "minute"},
               "auth": {"type": "bearer", "token": "ECHO_TOKEN"}}),
    );
    stack.add_service(
        "default",
        json!({"name": "ready", "host": ready.authority(), "upstream_tls": false,
               "auth": {"type": "passthrough"}}),
    );
    let token = stack.create_agent("rate-tunnel", &["default"]);
    let agent = token.as_str();
    on_every_worker(
        &stack.envoy,
        SNAPSHOT,
        4,
        || stack.get_as(agent, "default", &ready.url("/ready"), &[]),
        |r| r.status == 200,
    );

    away_from_a_minute_boundary();
    {
        let auth = proxy_basic(agent, "default");
        let open = || {
            HttpsTunnel::open(
                stack.envoy.port,
                &echo.authority(),
                &[("Proxy-Authorization", &auth)],
                &TlsOptions::new("localhost", &ca_pem),
            )
            .unwrap_or_else(|e| panic!("{e:?}\n{}", stack.envoy.log_tail(30)))
        };
        // 2 plain requests (new connections), then 2 in one tunnel, 1 in another: 5.
        for path in ["/plain/1", "/plain/2"] {
            let got = stack.get_as(agent, "default", &echo.url(path), &[]);
            assert_eq!(
                got.echoed()["headers"]["authorization"],
                format!("Bearer {secret}")
            );
        }
        let mut tunnel = open();
        for path in ["/tunnel/1", "/tunnel/2"] {
            let got = tunnel.get(path, &[]).unwrap();
            assert_eq!(got.status, 200, "{path}: {}", got.text());
        }
        let mut second = open();
        let got = second.get("/tunnel/3", &[]).unwrap();
        assert_eq!(got.status, 200, "{}", got.text());
        let seen: Value = serde_json::from_slice(&got.body).unwrap();
        assert_eq!(seen["headers"]["authorization"], format!("Bearer {secret}"));

        // The budget is spent: a new tunnel, the old one and a plain request are 429.
        let mut third = open();
        for (what, refused) in [
            ("a new tunnel", third.get("/tunnel/4", &[]).unwrap()),
            ("an open tunnel", tunnel.get("/tunnel/5", &[]).unwrap()),
        ] {
            let text = refused.text();
            assert!(refused.status == 429, "{what}: {} {text}", refused.status);
            assert_rate_limited(
                refused.status,
                refused.header("x-agent-vault-error"),
                refused.header("retry-after"),
                &text,
            );
            assert!(!text.contains(secret), "{text}");
        }
        let plain = stack.get_as(agent, "default", &echo.url("/plain/3"), &[]);
        assert_rate_limited(
            plain.status,
            plain.header("x-agent-vault-error"),
            plain.header("retry-after"),
            &plain.body,
        );
        let paths: Vec<String> = echo
            .received()
            .iter()
            .map(|r| r["path"].as_str().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(
            paths,
            [
                "/plain/1",
                "/plain/2",
                "/tunnel/1",
                "/tunnel/2",
                "/tunnel/3"
            ],
            "only the admitted requests reached the upstream"
        );
    }
}

#[test]
fn the_cli_sets_a_rate_limit_as_n_per_second_or_minute_and_refuses_a_bad_one() {
    let server = Server::start();
    let session = server.owner_token();
    let cli = server.cli().with_token(&session);
    let add = |name: &str, extra: &[&str]| {
        let host = format!("{name}.example.com");
        let mut args = vec![
            "vault",
            "service",
            "add",
            "--name",
            name,
            "--host",
            host.as_str(),
            "--auth-type",
            "passthrough",
            "--vault",
            "default",
        ];
        args.extend_from_slice(extra);
        cli.run(&args)
    };
    let refused = add("bad", &["--rate-limit", "0/s"]).fails();
    assert!(
        refused
            .stderr
            .contains("invalid rate limit: requests is 1 to 1000000"),
        "{}",
        refused.stderr
    );
    let out = add("fast", &["--rate-limit", "10/s"]).ok();
    assert!(
        out.stdout.contains("rate limit 10/s per agent"),
        "{}",
        out.stdout
    );
    add("slow", &["--rate-limit", "600/min"]).ok();
    add("free", &[]).ok();
    let listed = cli
        .run(&["vault", "service", "list", "--vault", "default"])
        .ok()
        .stdout;
    assert!(listed.contains("RATE LIMIT"), "{listed}");
    let line = |name: &str| {
        listed
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_default()
            .to_owned()
    };
    assert!(line("fast ").contains(" 10/s "), "{listed}");
    assert!(line("slow ").contains(" 600/min "), "{listed}");
    assert!(line("free ").contains(" none "), "{listed}");
    assert!(!listed.contains("bad.example.com"), "{listed}");
    let json = cli
        .run(&["vault", "service", "list", "--vault", "default", "--json"])
        .ok()
        .json();
    let slow = json
        .as_array()
        .and_then(|all| all.iter().find(|s| s["name"] == "slow").cloned())
        .unwrap_or_default();
    assert_eq!(
        slow["rate_limit"],
        json!({"requests": 600, "per": "minute"})
    );
}

#[test]
fn a_vault_wide_limit_counts_all_its_services_together_and_the_cli_sets_and_removes_it() {
    let one = Echo::plain();
    let two = Echo::plain();
    let entries = [
        format!("127.0.0.1/32:{}", one.port),
        format!("127.0.0.1/32:{}", two.port),
    ];
    let stack = Stack::start_with(ServerOptions::default(), |options| {
        options.allow_private_upstreams(&[&entries[0], &entries[1]])
    });
    stack.set_credential("default", "ECHO_TOKEN", "sk_live_vault_rate_1f2e");
    for (name, echo) in [("one", &one), ("two", &two)] {
        stack.add_service(
            "default",
            json!({"name": name, "host": echo.authority(), "upstream_tls": false,
                   "auth": {"type": "bearer", "token": "ECHO_TOKEN"}}),
        );
    }
    let api = stack.api();
    // Bad input: the same rules as a service's limit.
    let (status, body) = api.patch(
        "/v1/vaults/default",
        &json!({"rate_limit": {"requests": 0, "per": "minute"}}),
    );
    assert_eq!(
        (status, &body["error"]),
        (400, &json!("invalid_rate_limit")),
        "{body}"
    );
    let cli = stack.server.cli().with_token(&stack.owner);
    let refused = cli
        .run(&["vault", "update", "default", "--rate-limit", "3/hour"])
        .fails();
    assert!(
        refused.stderr.contains("--rate-limit"),
        "{}",
        refused.stderr
    );

    let set = cli
        .run(&[
            "vault",
            "update",
            "default",
            "--rate-limit",
            &format!("{LIMIT}/min"),
        ])
        .ok();
    assert!(
        set.stdout.contains(&format!(
            "at most {LIMIT}/min per agent over all its services"
        )),
        "{}",
        set.stdout
    );
    let listed = cli.run(&["vault", "list"]).ok().stdout;
    assert!(
        listed.contains("RATE LIMIT") && listed.contains(&format!("{LIMIT}/min")),
        "{listed}"
    );
    let agent = stack.create_agent("vault-rate", &["default"]);
    // Both workers have the snapshot with the limit (the agent came after it). Every
    // service of the vault is under the limit, so the probe asks for a host none lists,
    // which is never counted (the 5 of 10 below would show it): 407 while a worker does
    // not know the agent yet, 403 `forbidden` once it does.
    let unlisted = Echo::plain();
    on_every_worker(
        &stack.envoy,
        SNAPSHOT,
        4,
        || stack.get_as(&agent, "default", &unlisted.url("/ready"), &[]),
        |r| is_refusal(r, 403, "forbidden"),
    );
    assert!(unlisted.received().is_empty());

    away_from_a_minute_boundary();
    let responses: Vec<HttpResponse> = (0..2 * LIMIT)
        .map(|i| {
            let echo = if i % 2 == 0 { &one } else { &two };
            stack.get_as(&agent, "default", &echo.url("/v1/items"), &[])
        })
        .collect();
    let statuses: Vec<u16> = responses.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        LIMIT,
        "{LIMIT} per minute over both services together: {statuses:?}"
    );
    let refused = responses
        .iter()
        .find(|r| r.status == 429)
        .unwrap_or_else(|| panic!("{statuses:?}"));
    let body = refused.json();
    assert_eq!(body["error"], "rate_limited", "{body}");
    assert_eq!(body["scope"], "vault", "{body}");
    assert_eq!(
        body["limit"],
        json!({"requests": LIMIT, "per": "minute"}),
        "{body}"
    );
    assert!(
        refused.header("retry-after").is_some(),
        "{:?}",
        refused.headers
    );

    // Removed: the agent is admitted again once the snapshot says so.
    let removed = cli
        .run(&["vault", "update", "default", "--no-rate-limit"])
        .ok();
    assert!(
        removed.stdout.contains("no vault-wide rate limit"),
        "{}",
        removed.stdout
    );
    let (_, vault) = api.get("/v1/vaults");
    assert!(
        vault
            .as_array()
            .is_some_and(|all| all.iter().all(|v| v.get("rate_limit").is_none())),
        "{vault}"
    );
    wait_for(SNAPSHOT, || {
        let r = stack.get_as(&agent, "default", &two.url("/v1/items"), &[]);
        (r.status == 200).then_some(())
    })
    .expect("admitted again once the vault's limit is removed");
}
