//! The request log through Envoy's gRPC access log (`request_log: "access_log"` and
//! the access log envoy/README.md tells operators to add, as the test kit's
//! `with_access_log` adds them to the shipped forward proxy): nothing lost at
//! concurrency, never a query string, refusals with their error, and the same records
//! the filter posts (the shipped default, which the other request-log tests use).

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use agent_vault_testkit::control_plane::ServerOptions;
use agent_vault_testkit::envoy::EnvoyOptions;
use agent_vault_testkit::http::proxy_basic;
use agent_vault_testkit::stack::{on_every_worker, Stack};
use agent_vault_testkit::upstream::Echo;

/// Requests of the concurrency test, and the threads sending them.
const REQUESTS: usize = 3000;
const THREADS: usize = 16;

/// Every record of `vault`'s log, oldest first (paged with `after`).
fn all_records(stack: &Stack, vault: &str) -> Vec<Value> {
    let mut records = Vec::new();
    let mut after = 0u64;
    loop {
        let (status, body) = stack
            .api()
            .get(&format!("/v1/vaults/{vault}/logs?after={after}&limit=1000"));
        assert_eq!(status, 200, "{body}");
        let page = body["records"].as_array().cloned().unwrap_or_default();
        if page.is_empty() {
            return records;
        }
        after = body["next"].as_u64().unwrap_or(u64::MAX);
        records.extend(page);
    }
}

#[test]
fn thousands_of_requests_at_concurrency_give_exactly_as_many_records_without_query_strings() {
    let stack = Stack::start_with(ServerOptions::default(), EnvoyOptions::access_log);
    let echo = Echo::plain();
    stack.set_credential("default", "ALS_KEY", "sk_als_secret_1234");
    stack.add_service(
        "default",
        json!({"name": "billing", "host": echo.authority(), "upstream_tls": false,
               "auth": {"type": "bearer", "token": "ALS_KEY"}}),
    );
    let token = stack.create_agent("als-agent", &["default"]);
    on_every_worker(
        &stack.envoy,
        Duration::from_secs(8),
        6,
        || stack.get_as(&token, "default", &echo.url("/warmup"), &[]),
        |r| r.status == 200,
    );
    let auth = proxy_basic(&token, "default");
    let before = stack.dataplane_stats();

    let started = Instant::now();
    std::thread::scope(|scope| {
        for thread in 0..THREADS {
            let (stack, echo, auth) = (&stack, &echo, &auth);
            scope.spawn(move || {
                for i in (thread..REQUESTS).step_by(THREADS) {
                    // Every tenth is refused (no service for the host): logged with
                    // its error.
                    let url = if i.is_multiple_of(10) {
                        format!("http://nowhere.example/n/{i}?api_key=SECRETQ")
                    } else {
                        echo.url(&format!("/n/{i}?api_key=SECRETQ"))
                    };
                    let response = stack.envoy.request(
                        "GET",
                        &url,
                        &[("Proxy-Authorization", auth.as_str())],
                        None,
                    );
                    let expected = if i.is_multiple_of(10) { 403 } else { 200 };
                    assert_eq!(response.status, expected, "{i}: {}", response.body);
                }
            });
        }
    });
    let sent = started.elapsed();

    let deadline = Instant::now() + Duration::from_secs(15);
    let ours = loop {
        let ours: Vec<Value> = all_records(&stack, "default")
            .into_iter()
            .filter(|r| r["path"].as_str().unwrap_or_default().starts_with("/n/"))
            .collect();
        if ours.len() >= REQUESTS || Instant::now() > deadline {
            break ours;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    println!(
        "{REQUESTS} requests sent in {sent:?}; {} records stored {:?} after the last",
        ours.len(),
        started.elapsed() - sent
    );
    assert_eq!(ours.len(), REQUESTS, "every request logged, once");
    let mut seen = vec![false; REQUESTS];
    for record in &ours {
        let path = record["path"].as_str().unwrap_or_default();
        assert!(!path.contains('?'), "{record}");
        let i: usize = path.trim_start_matches("/n/").parse().unwrap();
        assert!(!seen[i], "logged twice: {record}");
        seen[i] = true;
        assert_eq!(record["agent"], "als-agent", "{record}");
        assert_eq!(record["method"], "GET", "{record}");
        if i.is_multiple_of(10) {
            assert_eq!(record["status"], 403, "{record}");
            assert_eq!(record["error"], "forbidden", "{record}");
            assert_eq!(record["host"], "nowhere.example", "{record}");
            assert!(record["service"].is_null(), "{record}");
        } else {
            assert_eq!(record["status"], 200, "{record}");
            assert!(record["error"].is_null(), "{record}");
            assert_eq!(record["service"], "billing", "{record}");
            assert_eq!(record["host"], "localhost", "{record}");
        }
    }
    let text = Value::from(ours).to_string();
    assert!(!text.contains("SECRETQ") && !text.contains("api_key"));

    let after = stack.dataplane_stats();
    let received =
        after["als_records"].as_u64().unwrap_or(0) - before["als_records"].as_u64().unwrap_or(0);
    assert!(
        received >= REQUESTS as u64,
        "the control plane counted {received} records through the access log"
    );
    assert_eq!(
        after["log_records"], before["log_records"],
        "nothing posted the old way"
    );
    let written = stack
        .envoy
        .counter("access_logs.grpc_access_log.logs_written");
    let dropped = stack
        .envoy
        .counter("access_logs.grpc_access_log.logs_dropped");
    println!("Envoy: access log entries written {written}, dropped {dropped}");
    assert!(written >= REQUESTS as u64, "written {written}");
    assert_eq!(dropped, 0, "Envoy dropped access-log entries");
}

/// The same requests through the shipped bootstrap (the filter posts) and through the
/// access log give the same records, apart from their times and order: a forward with
/// a query string, a method Envoy's enum cannot name, a refusal (no service); a
/// request without a token (407) belongs to no vault and is in neither log.
#[test]
fn the_access_log_gives_the_records_the_filter_posts() {
    let records = |configure: fn(EnvoyOptions) -> EnvoyOptions| {
        let stack = Stack::start_with(ServerOptions::default(), configure);
        let echo = Echo::plain();
        stack.set_credential("default", "SAME_KEY", "sk_same_secret_123456");
        stack.add_service(
            "default",
            json!({"name": "same", "host": echo.authority(), "upstream_tls": false,
                   "auth": {"type": "bearer", "token": "SAME_KEY"}}),
        );
        let token = stack.create_agent("same-agent", &["default"]);
        let ok = agent_vault_testkit::stack::wait_for(Duration::from_secs(10), || {
            (stack
                .get_as(&token, "default", &echo.url("/first"), &[])
                .status
                == 200)
                .then_some(())
        });
        assert!(ok.is_some(), "the first request is forwarded");
        let auth = proxy_basic(&token, "default");
        for (method, url, headers) in [
            (
                "POST",
                echo.url("/v1/charges?key=SECRETQ"),
                vec![("Proxy-Authorization", auth.as_str())],
            ),
            (
                "PROPFIND",
                echo.url("/dav"),
                vec![("Proxy-Authorization", auth.as_str())],
            ),
            ("GET", echo.url("/no-token"), vec![]),
            (
                "GET",
                "http://nowhere.example/x".to_owned(),
                vec![("Proxy-Authorization", auth.as_str())],
            ),
        ] {
            stack.envoy.request(method, &url, &headers, None);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut got = all_records(&stack, "default");
            for record in &mut got {
                let record = record.as_object_mut().expect("a record is an object");
                for volatile in ["ts", "latency_ms", "seq"] {
                    record.remove(volatile);
                }
            }
            if got.len() >= 4 || Instant::now() > deadline {
                // Each worker sends its own batches: the order across them varies.
                got.sort_by_key(|record| record["path"].to_string());
                return got;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let posted = records(|options| options);
    let through_envoy = records(EnvoyOptions::access_log);
    assert!(posted.len() >= 4, "{posted:#?}");
    assert_eq!(through_envoy, posted);
}
