//! The request log end to end (DESIGN.md §3 step 7, §4): batches posted on
//! the data-plane socket the way the filter does, read back through the management
//! API and `agent-vault vault logs`, against the real binary.
//!
//! Covered: ordering and paging, the query string never stored, unknown vaults
//! dropped, agents refused, bad batches (malformed, unknown fields, too many records,
//! too many bytes) refused with nothing stored, retention flags, durability of an
//! acknowledged batch, `--follow`, and the routes staying on their own listener.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{json, Value};

use agent_vault_testkit::control_plane::{
    binary, bytes_on_disk, socket_request, Server, ServerOptions,
};

const LOGS: &str = "/v1/vaults/default/logs";

fn record(path: &str) -> Value {
    record_in("default", path)
}

fn record_in(vault: &str, path: &str) -> Value {
    json!({
        "ts": now_ms(),
        "agent": "claude", "vault": vault, "method": "POST", "host": "api.stripe.com",
        "path": path, "service": "stripe", "status": 200, "latency_ms": 42, "error": null
    })
}

/// Unix milliseconds: records must be recent, or retention drops them.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Whether `text` starts with `YYYY-MM-DD HH:MM:SS`.
fn starts_with_utc_time(text: &str) -> bool {
    let pattern = "dddd-dd-dd dd:dd:dd";
    text.len() >= pattern.len()
        && pattern.bytes().zip(text.bytes()).all(|(p, t)| match p {
            b'd' => t.is_ascii_digit(),
            _ => p == t,
        })
}

/// Posts `body` to the logs route on the socket: (status, whole answer).
fn post_raw(server: &Server, body: &[u8]) -> (u16, String) {
    let mut request = format!(
        "POST /v1/dataplane/logs HTTP/1.1\r\nHost: cp\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    let answer = socket_request(&server.socket(), request).expect("an answer on the socket");
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {answer}"));
    (status, answer)
}

fn post_records(server: &Server, records: &[Value]) -> (u16, String) {
    post_raw(server, Value::from(records.to_vec()).to_string().as_bytes())
}

fn read_logs(server: &Server, token: &str, query: &str) -> Value {
    let (status, body) = server.api(Some(token)).get(&format!("{LOGS}{query}"));
    assert_eq!(status, 200, "GET logs{query}: {body}");
    body
}

fn paths(page: &Value) -> Vec<String> {
    page["records"]
        .as_array()
        .expect("records")
        .iter()
        .map(|r| r["path"].as_str().expect("path").to_string())
        .collect()
}

fn seqs(page: &Value) -> Vec<u64> {
    page["records"]
        .as_array()
        .expect("records")
        .iter()
        .map(|r| r["seq"].as_u64().expect("seq"))
        .collect()
}

#[test]
fn records_posted_on_the_socket_are_read_through_the_api_and_the_cli() {
    let server = Server::start();
    let token = server.owner_token();

    let (status, answer) = post_records(
        &server,
        &[
            record("/v1/charges?token=secret"),
            record_in("no-such-vault", "/dropped"),
            record("/v1/customers#section"),
        ],
    );
    assert_eq!(status, 204, "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("x-agent-vault-control-plane"),
        "{answer}"
    );
    let (status, _) = post_records(&server, &[record("/v1/refunds")]);
    assert_eq!(status, 204);

    let page = read_logs(&server, &token, "");
    assert_eq!(
        paths(&page),
        ["/v1/charges", "/v1/customers", "/v1/refunds"],
        "ascending, query and fragment stripped, unknown vault dropped: {page}"
    );
    let seqs = seqs(&page);
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(page["next"].as_u64(), seqs.last().copied());
    let first = &page["records"][0];
    for (field, expected) in [
        ("agent", json!("claude")),
        ("vault", json!("default")),
        ("method", json!("POST")),
        ("host", json!("api.stripe.com")),
        ("service", json!("stripe")),
        ("status", json!(200)),
        ("latency_ms", json!(42)),
        ("error", Value::Null),
    ] {
        assert_eq!(first[field], expected, "{field} in {first}");
    }
    assert!(first["ts"].as_i64().is_some(), "{first}");
    assert!(!page.to_string().contains("secret"), "{page}");

    // Paging: the newest `limit` without `after`; after the last seq, nothing new.
    let newest = read_logs(&server, &token, "?limit=2");
    assert_eq!(paths(&newest), ["/v1/customers", "/v1/refunds"]);
    let rest = read_logs(&server, &token, &format!("?after={}", seqs[0]));
    assert_eq!(paths(&rest), ["/v1/customers", "/v1/refunds"]);
    let none = read_logs(&server, &token, &format!("?after={}&limit=10", seqs[2]));
    assert_eq!(none["records"], json!([]));
    assert_eq!(none["next"].as_u64(), Some(seqs[2]));

    // Bad queries are clear 400s.
    let api = server.api(Some(&token));
    for (query, code) in [
        ("?limit=0", "invalid_limit"),
        ("?limit=1001", "invalid_limit"),
        ("?limit=abc", "invalid_request"),
        ("?after=-1", "invalid_request"),
        ("?bogus=1", "invalid_request"),
    ] {
        let (status, body) = api.get(&format!("{LOGS}{query}"));
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"], code, "{query}: {body}");
    }
    let (status, body) = api.get("/v1/vaults/no-such-vault/logs");
    assert_eq!(status, 404, "{body}");

    // The CLI: JSON lines, and a table.
    let cli = server.cli().with_token(&token);
    let out = cli.run(&["vault", "logs", "--json"]).ok();
    let lines: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines.len(), 3, "{}", out.stdout);
    assert_eq!(
        lines,
        page["records"].as_array().cloned().unwrap_or_default()
    );
    let out = cli
        .run(&[
            "vault", "logs", "--limit", "1", "--json", "--vault", "default",
        ])
        .ok();
    assert_eq!(out.stdout.lines().count(), 1, "{}", out.stdout);
    assert!(out.stdout.contains("/v1/refunds"), "{}", out.stdout);

    let table = cli.run(&["vault", "logs"]).ok().stdout;
    let header = table.lines().next().unwrap_or_default();
    for column in [
        "TIME (UTC)",
        "AGENT",
        "METHOD",
        "HOST",
        "PATH",
        "SERVICE",
        "STATUS",
        "LATENCY MS",
        "ERROR",
    ] {
        assert!(header.contains(column), "{column} missing: {table}");
    }
    assert_eq!(table.lines().count(), 4, "{table}");
    assert!(table.lines().skip(1).all(starts_with_utc_time), "{table}");
    assert!(
        table.contains("/v1/charges") && !table.contains("secret"),
        "{table}"
    );

    // An empty vault says so.
    let (status, _) = api.post("/v1/vaults", &json!({"name": "quiet"}));
    assert_eq!(status, 201);
    let out = cli.run(&["vault", "logs", "--vault", "quiet"]).ok();
    assert!(out.stdout.contains("No requests"), "{}", out.stdout);
    let out = cli
        .run(&["vault", "logs", "--vault", "quiet", "--json"])
        .ok();
    assert_eq!(out.stdout, "");

    // The query string never reached the disk either.
    let mut server = server;
    server.stop();
    let found = bytes_on_disk(&server.data_dir(), b"token=secret");
    assert!(found.is_empty(), "query string on disk in {found:?}");
}

#[test]
fn only_members_and_admins_read_the_log() {
    let server = Server::start();
    let token = server.owner_token();
    let (status, _) = post_records(&server, &[record("/v1/charges")]);
    assert_eq!(status, 204);

    let (status, body) = server.api(Some(&token)).post(
        "/v1/agents",
        &json!({"name": "bot", "vaults": [{"vault": "default", "role": "proxy"}]}),
    );
    assert_eq!(status, 201, "{body}");
    let agent_token = body["token"].as_str().expect("agent token").to_string();

    let (status, body) = server.api(Some(&agent_token)).get(LOGS);
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"], "forbidden");
    assert!(!body.to_string().contains("/v1/charges"), "{body}");
    let out = server
        .cli()
        .with_token(&agent_token)
        .run(&["vault", "logs"])
        .fails();
    assert!(out.stderr.contains("request log"), "{}", out.stderr);
    assert!(!out.stdout.contains("/v1/charges"), "{}", out.stdout);

    let (status, _) = server.api(None).get(LOGS);
    assert_eq!(status, 401);

    // A member who is not the owner reads it too.
    let (status, body) = server.api(Some(&token)).post(
        "/v1/vaults/default/users",
        &json!({"email": "bob@example.com", "role": "member"}),
    );
    assert_eq!(status, 201, "{body}");
    let invite = body["invite"].as_str().expect("invite").to_string();
    let api = server.api(None);
    let (status, body) = api.post(
        "/v1/auth/register",
        &json!({"email": "bob@example.com", "password": "bob-password-1", "invite": invite}),
    );
    assert_eq!(status, 201, "{body}");
    let (status, body) = api.post(
        "/v1/auth/login",
        &json!({"email": "bob@example.com", "password": "bob-password-1"}),
    );
    assert_eq!(status, 200, "{body}");
    let bob = body["token"].as_str().expect("token").to_string();
    assert_eq!(paths(&read_logs(&server, &bob, "")), ["/v1/charges"]);
}

#[test]
fn bad_batches_are_refused_and_store_nothing() {
    let server = Server::start();
    let token = server.owner_token();

    let (status, answer) = post_raw(&server, b"[{\"ts\": 1,");
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("invalid_json"), "{answer}");

    let mut extra = record("/x");
    extra["authorization"] = json!("Bearer sk_live_leak");
    let (status, answer) = post_records(&server, &[record("/ok-but-batch-refused"), extra]);
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("invalid_request"), "{answer}");

    let (status, answer) = post_raw(&server, br#"{"not": "an array"}"#);
    assert_eq!(status, 400, "{answer}");

    let too_many = vec![record("/many"); 1001];
    let (status, answer) = post_records(&server, &too_many);
    assert_eq!(status, 413, "{answer}");
    assert!(answer.contains("payload_too_large"), "{answer}");

    let huge_path = format!("/{}", "a".repeat(2 * 1024 * 1024));
    let (status, answer) = post_records(&server, &[record(&huge_path)]);
    assert_eq!(status, 413, "{answer}");

    let page = read_logs(&server, &token, "");
    assert_eq!(page["records"], json!([]), "{page}");
    assert_eq!(page["next"], json!(0));

    // Exactly 1000 is fine.
    let (status, answer) = post_records(&server, &vec![record("/max"); 1000]);
    assert_eq!(status, 204, "{answer}");
    let page = read_logs(&server, &token, "?limit=1000");
    assert_eq!(page["records"].as_array().map(Vec::len), Some(1000));
}

#[test]
fn the_routes_stay_on_their_own_listener() {
    let server = Server::start();
    let token = server.owner_token();
    // The data-plane route does not answer on TCP...
    let (status, _) = server
        .api(Some(&token))
        .post("/v1/dataplane/logs", &json!([record("/tcp")]));
    assert_eq!(status, 404);
    // ...and the management route does not answer on the socket.
    let answer = socket_request(
        &server.socket(),
        format!("GET {LOGS} HTTP/1.1\r\nHost: cp\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"),
    )
    .expect("answer");
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    assert_eq!(read_logs(&server, &token, "")["records"], json!([]));
}

#[test]
fn retention_flags_cap_each_vault_and_acknowledged_batches_survive_kill_9() {
    let mut server = Server::start_with(ServerOptions {
        extra_args: vec![
            "--allow-private-upstreams".into(),
            "--log-max-records".into(),
            "3".into(),
            "--log-retention-days".into(),
            "30".into(),
        ],
        ..ServerOptions::default()
    });
    let token = server.owner_token();
    for i in 0..5 {
        let (status, _) = post_records(&server, &[record(&format!("/{i}"))]);
        assert_eq!(status, 204);
    }
    assert_eq!(paths(&read_logs(&server, &token, "")), ["/2", "/3", "/4"]);
    let batch: Vec<Value> = (5..10).map(|i| record(&format!("/{i}"))).collect();
    let (status, _) = post_records(&server, &batch);
    assert_eq!(status, 204);
    assert_eq!(paths(&read_logs(&server, &token, "")), ["/7", "/8", "/9"]);

    server.kill9();
    server.restart();
    let token = server.owner_token();
    assert_eq!(paths(&read_logs(&server, &token, "")), ["/7", "/8", "/9"]);

    // Sequences keep increasing across the restart.
    let before = read_logs(&server, &token, "")["next"]
        .as_u64()
        .expect("next");
    let (status, _) = post_records(&server, &[record("/after-restart")]);
    assert_eq!(status, 204);
    let page = read_logs(&server, &token, &format!("?after={before}"));
    assert_eq!(paths(&page), ["/after-restart"]);

    // Bad retention flags are usage errors.
    let out = Command::new(binary())
        .args(["server", "--log-max-records", "0"])
        .output()
        .expect("run");
    assert!(!out.status.success());
}

#[test]
fn follow_prints_new_records_as_they_arrive() {
    let server = Server::start();
    let token = server.owner_token();
    let (status, _) = post_records(&server, &[record("/before")]);
    assert_eq!(status, 204);

    let mut child = Command::new(binary())
        .args(["vault", "logs", "--follow", "--json"])
        .env("HOME", server.home())
        .env("AGENT_VAULT_ADDR", server.url())
        .env("AGENT_VAULT_TOKEN", &token)
        .env_remove("AGENT_VAULT_VAULT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn vault logs --follow");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next_path = || -> String {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("a line from vault logs --follow");
        let value: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        value["path"].as_str().unwrap_or_default().to_string()
    };
    assert_eq!(next_path(), "/before");
    let (status, _) = post_records(&server, &[record("/during-1"), record("/during-2?q=1")]);
    assert_eq!(status, 204);
    assert_eq!(next_path(), "/during-1");
    assert_eq!(next_path(), "/during-2");
    let (status, _) = post_records(&server, &[record("/later")]);
    assert_eq!(status, 204);
    assert_eq!(next_path(), "/later");
    assert!(
        rx.recv_timeout(Duration::from_millis(1500)).is_err(),
        "nothing is printed twice"
    );
    let _ = child.kill();
    let _ = child.wait();
}
