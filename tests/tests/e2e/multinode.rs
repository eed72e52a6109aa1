//! Several control planes on one PostgreSQL database (`agent-vault server --store
//! postgres://…`), each with its own data dir, sockets and Envoy, as one node each of a
//! DaemonSet: a change made through any control plane reaches every Envoy; approval,
//! the request log and the login limiter hold across nodes; the database stopped under
//! load fails closed and the control planes recover when it is back, without a restart;
//! a node that does not hold the store's master password or key file is refused; and a
//! data key rotated or a master password changed through one node holds on the others.
//!
//! The database is a real PostgreSQL ([`agent_vault_pgtest`]): the test process's
//! shared server with a database per test, or a server of the test's own when the test
//! stops it. Changes reach the other control plane through LISTEN/NOTIFY (or its 1 s
//! version poll) and Envoy through the filter's snapshot poll (1 s), so the bounds
//! below are generous; the times seen are printed (`--nocapture`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use agent_vault_pgtest::Cluster;
use agent_vault_testkit::control_plane::{socket_request, Api, Backend, Server, ServerOptions};
use agent_vault_testkit::envoy::EnvoyOptions;
use agent_vault_testkit::stack::{on_every_worker, wait_for, Stack};
use agent_vault_testkit::upstream::Echo;

use crate::proposals::api_error;
use crate::proxy::{injected, is_refusal};

/// Long enough for the filter's first snapshot on both workers.
const FIRST_SNAPSHOT: Duration = Duration::from_secs(10);
/// How long a change made through one control plane may take to show on every worker
/// of the other node's Envoy.
const ACROSS_NODES: Duration = Duration::from_secs(5);
/// Requests in a run that must all show a state (and reach both workers).
const STREAK: usize = 6;
const OWNER: &str = "owner@example.com";
const OWNER_PASSWORD: &str = "owner-password";

// --- helpers -------------------------------------------------------------------------

fn bearer_service(name: &str, host: &str, key: &str) -> Value {
    json!({"name": name, "host": host, "upstream_tls": false,
           "auth": {"type": "bearer", "token": key}})
}

/// A client with a timeout, so a hung server fails the test instead of blocking it.
fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("http client")
}

/// The management API of `server` as `token`, with [`client`].
fn api(server: &Server, token: &str) -> Api {
    Api {
        client: client(),
        ..server.api(Some(token))
    }
}

/// Envoy with no credential cache: every request fetches its values from the control
/// plane (and so from the database).
fn no_cache(options: EnvoyOptions) -> EnvoyOptions {
    EnvoyOptions {
        credential_cache_ttl_ms: 0,
        ..options
    }
}

/// Two nodes on a fresh database of the shared PostgreSQL: `a` (the owner registered
/// through it) and `b` joined to it; Envoys `configure`d.
fn two_stacks(name: &str, configure: fn(EnvoyOptions) -> EnvoyOptions) -> (Stack, Stack) {
    let a = Stack::start_with(Backend::Postgres.options(name), configure);
    let b = a.join(configure);
    (a, b)
}

/// A credential `KEY`, a bearer service for `echo` and an agent `bot` on `default`,
/// made through `stack`'s control plane; the agent's token.
fn service_and_agent(stack: &Stack, echo: &Echo, value: &str) -> String {
    stack.set_credential("default", "KEY", value);
    stack.add_service("default", bearer_service("svc", &echo.authority(), "KEY"));
    stack.create_agent("bot", &["default"])
}

/// Waits until both workers of `stack`'s Envoy inject `Bearer value` for `token`.
#[track_caller]
fn until_injected(stack: &Stack, token: &str, echo: &Echo, value: &str) {
    let expected = format!("Bearer {value}");
    on_every_worker(
        &stack.envoy,
        FIRST_SNAPSHOT,
        STREAK,
        || stack.get_as(token, "default", &echo.url("/warm"), &[]),
        |r| injected(r, "authorization", &expected),
    );
}

// --- a. changes through either control plane reach both Envoys --------------------

#[test]
fn two_control_planes_and_two_envoys_on_one_database_see_each_others_changes() {
    let (a, b) = two_stacks("two_nodes", |options| options);
    let echo = Echo::plain();
    // Everything made through A.
    let token = service_and_agent(&a, &echo, "multinode-secret-1");
    // B's control plane reads it from the database: the owner's session from A works
    // there too.
    let (status, services) = api(&b.server, &a.owner).get("/v1/vaults/default/services");
    assert_eq!(status, 200, "{services}");
    assert_eq!(services[0]["name"], "svc", "{services}");

    // A request through Envoy B (fed by control plane B) gets the credential set
    // through A; and through Envoy A too.
    until_injected(&b, &token, &echo, "multinode-secret-1");
    until_injected(&a, &token, &echo, "multinode-secret-1");
    let seen = echo.received();
    assert!(
        seen.iter()
            .all(|r| r["headers"]["proxy-authorization"].is_null()),
        "the agent token never reaches the upstream"
    );

    // A credential deleted through B: Envoy A (whose workers had the value cached for
    // 60 s) answers the missing-credential error.
    b.delete_credentials("default", &["KEY"]);
    let deleted = Instant::now();
    on_every_worker(
        &a.envoy,
        ACROSS_NODES,
        STREAK,
        || a.get_as(&token, "default", &echo.url("/after-delete"), &[]),
        |r| is_refusal(r, 502, "credential_not_found"),
    );
    let delete_took = deleted.elapsed();
    let (status, _) = api(&a.server, &a.owner).get("/v1/vaults/default/credentials/KEY");
    assert_eq!(status, 404, "A's API no longer has the key");
    echo.clear();
    for _ in 0..10 {
        let response = a.get_as(&token, "default", &echo.url("/deleted"), &[]);
        assert!(
            is_refusal(&response, 502, "credential_not_found"),
            "{response:?}"
        );
    }
    assert!(echo.received().is_empty(), "{:?}", echo.received());

    // An agent revoked through A: Envoy B refuses its token.
    a.set_credential("default", "KEY", "multinode-secret-2");
    until_injected(&b, &token, &echo, "multinode-secret-2");
    a.revoke_agent("bot");
    let revoked = Instant::now();
    on_every_worker(
        &b.envoy,
        ACROSS_NODES,
        STREAK,
        || b.get_as(&token, "default", &echo.url("/after-revoke"), &[]),
        |r| is_refusal(r, 407, "invalid_token"),
    );
    let revoke_took = revoked.elapsed();
    println!(
        "across nodes: credential delete through B refused by every worker of Envoy A \
         after {delete_took:?}; agent revoke through A refused by every worker of Envoy B \
         after {revoke_took:?}"
    );
    // From then on, nothing the revoked agent sends reaches the upstream, through
    // either Envoy.
    echo.clear();
    for stack in [&a, &b] {
        for _ in 0..10 {
            let response = stack.get_as(&token, "default", &echo.url("/revoked"), &[]);
            assert!(is_refusal(&response, 407, "invalid_token"), "{response:?}");
        }
    }
    assert!(echo.received().is_empty(), "{:?}", echo.received());
}

// --- c. one approval wins ----------------------------------------------------------

#[test]
fn a_proposal_approved_through_two_control_planes_at_once_is_applied_exactly_once() {
    let a = Server::start_with(Backend::Postgres.options("approval_race"));
    let owner = a.owner_token();
    let b = a.join();
    let (status, created) = api(&a, &owner).post(
        "/v1/agents",
        &json!({"name": "proposer", "vaults": [{"vault": "default"}]}),
    );
    assert_eq!(status, 201, "{created}");
    let agent_token = created["token"].as_str().expect("token").to_string();
    let nodes = [("A", &a), ("B", &b)];
    let mut winners = BTreeMap::new();
    for round in 0..6 {
        let key = format!("KEY_{round}");
        let service = format!("svc-{round}");
        // The agent proposes through one node, alternately.
        let proposer = nodes[round % 2].1;
        let (status, proposed) = client()
            .post(format!("{}/v1/proposals", proposer.url()))
            .bearer_auth(&agent_token)
            .header("X-Vault", "default")
            .json(&json!({
                "services": [{"action": "set", "name": service,
                              "host": format!("api{round}.example.com"),
                              "auth": {"type": "bearer", "token": key}}],
                "credentials": [{"action": "set", "key": key}],
                "message": format!("round {round}")
            }))
            .send()
            .map(|r| {
                let status = r.status().as_u16();
                (status, r.json::<Value>().unwrap_or(Value::Null))
            })
            .expect("propose");
        assert_eq!(status, 201, "{proposed}");
        let id = proposed["id"].as_u64().expect("id");
        let path = format!("/v1/vaults/default/proposals/{id}/approve");

        // Both nodes approve at the same moment, each with its own value.
        let barrier = Arc::new(Barrier::new(2));
        let answers: Vec<(&str, String, (u16, Value))> = std::thread::scope(|scope| {
            let handles: Vec<_> = nodes
                .iter()
                .map(|(name, server)| {
                    let (barrier, path, key, owner) = (barrier.clone(), &path, &key, &owner);
                    scope.spawn(move || {
                        let api = api(server, owner);
                        // A warm connection, so both requests leave at once.
                        assert_eq!(api.get("/v1/auth/whoami").0, 200);
                        let value = format!("from-{name}-{round}");
                        barrier.wait();
                        let answer = api.post(path, &json!({"values": {key.as_str(): &value}}));
                        (*name, value, answer)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let applied: Vec<_> = answers.iter().filter(|(_, _, a)| a.0 == 200).collect();
        assert_eq!(
            applied.len(),
            1,
            "round {round}: exactly one approval succeeds: {answers:?}"
        );
        let (winner, value, (_, body)) = applied[0];
        assert_eq!(body["status"], "applied", "{body}");
        let (_, _, lost) = answers.iter().find(|(name, _, _)| name != winner).unwrap();
        let message = api_error(lost.clone(), 409, "not_pending");
        assert!(message.contains("applied"), "{message}");
        *winners.entry(*winner).or_insert(0) += 1;

        // Applied once, with the winner's value, as both nodes read it.
        for (_, server) in nodes {
            let api = api(server, &owner);
            let (status, got) = api.get(&format!("/v1/vaults/default/credentials/{key}"));
            assert_eq!((status, &got["value"]), (200, &json!(value)), "{got}");
            let (status, services) = api.get("/v1/vaults/default/services");
            assert_eq!(status, 200, "{services}");
            let named: Vec<_> = services
                .as_array()
                .unwrap()
                .iter()
                .filter(|s| s["name"] == service.as_str())
                .collect();
            assert_eq!(named.len(), 1, "{services}");
            let (_, shown) = api.get(&format!("/v1/vaults/default/proposals/{id}"));
            assert_eq!(shown["status"], "applied", "{shown}");
        }
    }
    let serialization_failures = agent_vault_pgtest::shared()
        .log_text()
        .matches("could not serialize access")
        .count();
    println!(
        "approval races won per node: {winners:?}; serialization failures PostgreSQL \
         logged in this process so far (retried by the store): {serialization_failures}"
    );
}

// --- d. PostgreSQL stopped and started under load -----------------------------------

/// What one request through an Envoy got, while the load ran.
#[derive(Debug)]
enum Outcome {
    /// The upstream's answer with the credential injected.
    Injected,
    /// The filter's 503 `control_plane_unavailable`.
    Unavailable,
    /// Anything else: never acceptable.
    Other(u16, String),
}

struct Sample {
    envoy: &'static str,
    started: Instant,
    outcome: Outcome,
}

#[test]
fn postgresql_stopped_under_load_fails_closed_and_the_control_planes_recover_without_restart() {
    let cluster = Cluster::start();
    let url = cluster.create_database("restart_under_load");
    let a = Stack::start_with(
        ServerOptions {
            store: Some(url),
            ..ServerOptions::default()
        },
        no_cache,
    );
    let b = a.join(no_cache);
    let echo = Echo::plain();
    let token = service_and_agent(&a, &echo, "load-secret");
    until_injected(&a, &token, &echo, "load-secret");
    until_injected(&b, &token, &echo, "load-secret");
    let expected = "Bearer load-secret";
    let apis = [
        ("A", api(&a.server, &a.owner)),
        ("B", api(&b.server, &b.owner)),
    ];
    // The filter's own credential fetch, straight on each control plane's socket.
    let fetch = |stack: &Stack| {
        let body = json!({"token_sha256": format!("{:x}", Sha256::digest(token.as_bytes())),
                          "vault": "default", "keys": ["KEY"]})
        .to_string();
        socket_request(
            &stack.server.socket(),
            format!(
                "POST /v1/dataplane/credentials HTTP/1.1\r\nHost: cp\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            ),
        )
        .expect("an answer on the socket")
    };
    for stack in [&a, &b] {
        let answer = fetch(stack);
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.contains("load-secret"),
            "{answer}"
        );
    }

    let stop = AtomicBool::new(false);
    let samples = Mutex::new(Vec::<Sample>::new());
    let mut report = Vec::new();
    std::thread::scope(|scope| {
        for (name, stack) in [("A", &a), ("B", &b)] {
            let (stop, samples, token, echo) = (&stop, &samples, &token, &echo);
            scope.spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let started = Instant::now();
                    let response = stack.get_as(token, "default", &echo.url("/load"), &[]);
                    let outcome = if injected(&response, "authorization", expected) {
                        Outcome::Injected
                    } else if is_refusal(&response, 503, "control_plane_unavailable") {
                        Outcome::Unavailable
                    } else {
                        Outcome::Other(response.status, response.body)
                    };
                    samples.lock().unwrap().push(Sample {
                        envoy: name,
                        started,
                        outcome,
                    });
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
        }
        std::thread::sleep(Duration::from_secs(1));

        for (how, down) in [
            ("stop -m fast", Cluster::stop as fn(&Cluster)),
            ("kill", Cluster::kill),
        ] {
            down(&cluster);
            let stopped = Instant::now();
            // Both APIs answer 503 store_unavailable.
            for (name, api) in &apis {
                let message = api_error(api.get("/v1/vaults"), 503, "store_unavailable");
                assert!(!message.is_empty(), "{name}");
            }
            let confirmed = Instant::now();
            for stack in [&a, &b] {
                let answer = fetch(stack);
                assert!(
                    answer.starts_with("HTTP/1.1 503") && answer.contains("store_unavailable"),
                    "{answer}"
                );
                assert!(!answer.contains("load-secret"), "{answer}");
                // The rules Envoy last loaded still hold: an unknown host is refused
                // by them, not with 503.
                let unmatched = stack.get_as(&token, "default", "http://nomatch.invalid/x", &[]);
                assert!(is_refusal(&unmatched, 403, "forbidden"), "{unmatched:?}");
            }
            std::thread::sleep(Duration::from_secs(3));
            let down_until = Instant::now();
            for (_, api) in &apis {
                api_error(
                    api.post(
                        "/v1/vaults/default/credentials",
                        &json!({"credentials": {"OTHER": "x"}}),
                    ),
                    503,
                    "store_unavailable",
                );
            }
            cluster.start_again();
            let started = Instant::now();
            // Requests succeed again through both Envoys, and both APIs work: the
            // control planes were not restarted.
            let pids = (a.server.pid(), b.server.pid());
            let recovered: Vec<(&str, Duration)> = apis
                .iter()
                .map(|(name, api)| {
                    wait_for(Duration::from_secs(20), || {
                        (api.get("/v1/vaults").0 == 200).then_some(())
                    })
                    .unwrap_or_else(|| {
                        panic!("API {name} did not recover: {:?}", api.get("/v1/vaults"))
                    });
                    (*name, started.elapsed())
                })
                .collect();
            for stack in [&a, &b] {
                on_every_worker(
                    &stack.envoy,
                    Duration::from_secs(20),
                    STREAK,
                    || stack.get_as(&token, "default", &echo.url("/probe"), &[]),
                    |r| injected(r, "authorization", expected),
                );
            }
            let requests_back = started.elapsed();
            assert_eq!(pids, (a.server.pid(), b.server.pid()), "no restart");
            // While the database was known to be down, nothing was injected.
            let during: Vec<_> = samples
                .lock()
                .unwrap()
                .iter()
                .filter(|s| s.started >= confirmed && s.started < down_until)
                .map(|s| (s.envoy, format!("{:?}", s.outcome)))
                .collect();
            for envoy in ["A", "B"] {
                let refused = during
                    .iter()
                    .filter(|(e, o)| *e == envoy && o == "Unavailable")
                    .count();
                assert!(
                    refused > 10,
                    "Envoy {envoy} refused while down ({how}): {during:?}"
                );
            }
            assert!(
                during.iter().all(|(_, o)| o == "Unavailable"),
                "only refusals while the database was down ({how}): {during:?}"
            );
            report.push(format!(
                "{how}: APIs 503 {:?} after the stop; APIs back {recovered:?}, requests \
                 through both Envoys on every worker {requests_back:?} after the start",
                confirmed - stopped
            ));
        }
        stop.store(true, Ordering::SeqCst);
    });
    let samples = samples.into_inner().unwrap();
    let bad: Vec<_> = samples
        .iter()
        .filter_map(|s| match &s.outcome {
            Outcome::Other(status, body) => Some((s.envoy, *status, body)),
            _ => None,
        })
        .collect();
    assert!(
        bad.is_empty(),
        "only injected answers or 503 refusals: {bad:?}"
    );
    assert!(
        echo.received()
            .iter()
            .all(|r| r["headers"]["authorization"] == expected),
        "the upstream never saw a request without the credential"
    );
    let count = |o: fn(&Outcome) -> bool| samples.iter().filter(|s| o(&s.outcome)).count();
    println!(
        "under load: {} requests, {} injected, {} refused 503; {}",
        samples.len(),
        count(|o| matches!(o, Outcome::Injected)),
        count(|o| matches!(o, Outcome::Unavailable)),
        report.join("; ")
    );

    // A change through B after both restarts still reaches Envoy A (notifications or
    // the version poll, on new connections).
    b.set_service_enabled("default", "svc", false);
    on_every_worker(
        &a.envoy,
        ACROSS_NODES,
        STREAK,
        || a.get_as(&token, "default", &echo.url("/disabled"), &[]),
        |r| is_refusal(r, 403, "service_disabled"),
    );
}

// --- e. the request log ------------------------------------------------------------

#[test]
fn the_request_log_holds_the_requests_of_every_node_read_through_either() {
    let (a, b) = two_stacks("log_across", |options| options);
    let echo = Echo::plain();
    let token = service_and_agent(&a, &echo, "log-secret");
    until_injected(&a, &token, &echo, "log-secret");
    until_injected(&b, &token, &echo, "log-secret");
    let mut paths = Vec::new();
    for i in 0..12 {
        for (name, stack) in [("a", &a), ("b", &b)] {
            let path = format!("/via-{name}/{i}");
            let response = stack.get_as(&token, "default", &echo.url(&path), &[]);
            assert!(
                injected(&response, "authorization", "Bearer log-secret"),
                "{response:?}"
            );
            paths.push(path);
        }
    }
    let ours = |records: &[Value]| -> Vec<(u64, String)> {
        records
            .iter()
            .filter(|r| r["path"].as_str().is_some_and(|p| p.starts_with("/via-")))
            .map(|r| {
                (
                    r["seq"].as_u64().expect("seq"),
                    r["path"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    // Each Envoy flushes its records to its own control plane (every second).
    let through_a = wait_for(Duration::from_secs(15), || {
        let records = ours(&a.request_log("default"));
        (records.len() >= paths.len()).then_some(records)
    })
    .unwrap_or_else(|| {
        panic!(
            "not every request logged: {:?}",
            ours(&a.request_log("default"))
        )
    });
    let all_a = a.request_log("default");
    let all_b = b.request_log("default");
    assert_eq!(all_a, all_b, "both control planes read the same log");
    let seqs: Vec<u64> = all_a.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "sequences increase: {seqs:?}"
    );
    let mut logged: Vec<String> = through_a.iter().map(|(_, p)| p.clone()).collect();
    logged.sort();
    let mut sent = paths.clone();
    sent.sort();
    assert_eq!(logged, sent, "every request once, none missing");
    for record in &all_a {
        if record["path"]
            .as_str()
            .is_some_and(|p| p.starts_with("/via-"))
        {
            assert_eq!(record["agent"], "bot", "{record}");
            assert_eq!(record["status"], 200, "{record}");
        }
    }

    // Paging through B after a sequence read through A: the same records.
    let mut paged = Vec::new();
    let mut after = 0;
    loop {
        let (status, page) =
            api(&b.server, &b.owner).get(&format!("/v1/vaults/default/logs?after={after}&limit=5"));
        assert_eq!(status, 200, "{page}");
        let records = page["records"].as_array().unwrap().clone();
        if records.is_empty() {
            break;
        }
        after = page["next"].as_u64().expect("next");
        paged.extend(records);
    }
    assert_eq!(
        paged, all_a,
        "paging through B gives every record once, in order"
    );
}

// --- f. the login limiter ----------------------------------------------------------

#[test]
fn failed_logins_through_one_control_plane_count_on_the_other() {
    let a = Server::start_with(Backend::Postgres.options("login_limit"));
    a.owner_token();
    let b = a.join();
    let anonymous = |server: &Server| Api {
        client: client(),
        ..server.api(None)
    };
    let login = |server: &Server, password: &str| {
        anonymous(server).post(
            "/v1/auth/login",
            &json!({"email": OWNER, "password": password}),
        )
    };
    // The allowed failures, all through A.
    for _ in 0..5 {
        api_error(login(&a, "not-the-password"), 401, "invalid_credentials");
    }
    // B holds the next one back, even with the right password.
    let message = api_error(login(&b, OWNER_PASSWORD), 429, "rate_limited");
    assert!(message.contains("try again in"), "{message}");
    // And so does A.
    api_error(login(&a, OWNER_PASSWORD), 429, "rate_limited");

    // Failures split across the nodes add up too (an email with a count of its own).
    let ghost = |server: &Server| {
        anonymous(server).post(
            "/v1/auth/login",
            &json!({"email": "ghost@example.com", "password": "some-password"}),
        )
    };
    for server in [&a, &b, &a, &b, &a] {
        api_error(ghost(server), 401, "invalid_credentials");
    }
    api_error(ghost(&b), 429, "rate_limited");
    api_error(ghost(&a), 429, "rate_limited");
}

// --- the data key and the owner across nodes ----------------------------------------

/// What a server that must not start wrote before it exited.
#[track_caller]
fn refused_at_start(options: ServerOptions) -> String {
    match Server::try_start_with(options) {
        Ok(server) => panic!("the server started at {}", server.url()),
        Err(log) => log,
    }
}

#[test]
fn a_node_without_the_stores_master_password_or_key_file_is_refused() {
    // With a master password: another one, or none, is refused at start.
    let a = Server::start_with(ServerOptions {
        password: Some("correct-horse-battery".into()),
        ..Backend::Postgres.options("key_password")
    });
    let owner = a.owner_token();
    api(&a, &owner).post(
        "/v1/vaults/default/credentials",
        &json!({"credentials": {"A": "value-a"}}),
    );
    for (password, says) in [
        (Some("wrong-horse-battery"), "wrong master password"),
        (None, "protected by a master password"),
    ] {
        let err = refused_at_start(ServerOptions {
            password: password.map(str::to_string),
            ..a.join_options()
        });
        assert!(err.contains(says), "{err}");
    }
    let b = a.join();
    let (status, got) = api(&b, &owner).get("/v1/vaults/default/credentials/A");
    assert_eq!((status, &got["value"]), (200, &json!("value-a")), "{got}");

    // Passwordless: a node needs the first one's key file; its own new one, or none, is
    // refused.
    let a = Server::start_with(Backend::Postgres.options("key_file"));
    let owner = a.owner_token();
    let other_key = tempfile::tempdir().unwrap();
    let other_key_file = other_key.path().join("master.key");
    std::fs::write(&other_key_file, format!("{}\n", "ab".repeat(32))).unwrap();
    let err = refused_at_start(ServerOptions {
        key_file: Some(other_key_file),
        ..a.join_options()
    });
    assert!(
        err.contains("does not unwrap the store's data key"),
        "{err}"
    );
    let err = refused_at_start(ServerOptions {
        key_file: None,
        ..a.join_options()
    });
    assert!(err.contains("master.key is missing or unreadable"), "{err}");
    let b = a.join();
    assert_eq!(api(&b, &owner).get("/v1/vaults").0, 200);
}

#[test]
fn the_owner_registers_once_through_either_node() {
    // Both nodes start before anyone registers: each has a bootstrap token of its own.
    let options = Backend::Postgres.options("bootstrap");
    let a = Server::start_with(options.clone());
    let b = Server::start_with(ServerOptions {
        key_file: Some(a.data_dir().join("master.key")),
        ..options
    });
    let (token_a, token_b) = (
        a.bootstrap_token().expect("A's bootstrap token"),
        b.bootstrap_token().expect("B's bootstrap token"),
    );
    assert_ne!(token_a, token_b);
    let register = |server: &Server, token: &str, email: &str| {
        Api {
            client: client(),
            ..server.api(None)
        }
        .post(
            "/v1/auth/register",
            &json!({"email": email, "password": OWNER_PASSWORD, "bootstrap_token": token}),
        )
    };
    // A node's token is its own.
    api_error(
        register(&b, &token_a, OWNER),
        403,
        "invalid_bootstrap_token",
    );
    let (status, body) = register(&b, &token_b, OWNER);
    assert_eq!(status, 201, "{body}");
    // The owner exists for A too: its token no longer makes anyone the owner.
    api_error(
        register(&a, &token_a, "second@example.com"),
        403,
        "invite_required",
    );
    // And the owner logs in through A.
    let (status, body) = Api {
        client: client(),
        ..a.api(None)
    }
    .post(
        "/v1/auth/login",
        &json!({"email": OWNER, "password": OWNER_PASSWORD}),
    );
    assert_eq!(status, 200, "{body}");
}

// --- the data key and the master password changed through one node -----------------

/// The values of `default` as `server` reveals them: (status, key → value).
fn revealed(api: &Api) -> (u16, BTreeMap<String, String>) {
    let (status, listed) = api.get("/v1/vaults/default/credentials?reveal=true");
    let values = listed
        .as_array()
        .map(|list| {
            list.iter()
                .map(|c| {
                    (
                        c["key"].as_str().unwrap_or_default().to_string(),
                        c["value"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    (status, values)
}

#[test]
fn a_data_key_rotated_through_one_node_is_taken_by_the_other_while_it_reads() {
    let a = Server::start_with(Backend::Postgres.options("rotation_across"));
    let owner = a.owner_token();
    let b = a.join();
    let expected: BTreeMap<String, String> = (0..5)
        .map(|i| (format!("KEY_{i}"), format!("value-{i}")))
        .collect();
    let (status, body) = api(&a, &owner).post(
        "/v1/vaults/default/credentials",
        &json!({"credentials": expected}),
    );
    assert_eq!(status, 200, "{body}");
    let (status, created) = api(&a, &owner).post(
        "/v1/agents",
        &json!({"name": "bot", "vaults": [{"vault": "default"}]}),
    );
    assert_eq!(status, 201, "{created}");
    let agent_hash = format!(
        "{:x}",
        Sha256::digest(created["token"].as_str().expect("token").as_bytes())
    );
    // What the filter asks B's socket for.
    let fetch = || {
        let body = json!({"token_sha256": agent_hash, "vault": "default",
                          "keys": expected.keys().collect::<Vec<_>>()})
        .to_string();
        let answer = socket_request(
            &b.socket(),
            format!(
                "POST /v1/dataplane/credentials HTTP/1.1\r\nHost: cp\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            ),
        )
        .unwrap_or_default();
        let ok = answer.starts_with("HTTP/1.1 200")
            && expected
                .values()
                .all(|value| answer.contains(value.as_str()));
        (ok, answer)
    };
    assert!(fetch().0, "{}", fetch().1);

    // B reads every value in a loop, through its API and as the data plane does,
    // while A rotates the data key again and again.
    let stop = AtomicBool::new(false);
    let (reads, failures) = std::thread::scope(|scope| {
        let reader = scope.spawn(|| {
            let api = api(&b, &owner);
            let (mut reads, mut failures) = (0, Vec::new());
            while !stop.load(Ordering::SeqCst) {
                let (status, values) = revealed(&api);
                if status != 200 || values != expected {
                    failures.push(format!("API: {status} {values:?}"));
                }
                let (ok, answer) = fetch();
                if !ok {
                    failures.push(format!("data plane: {answer}"));
                }
                reads += 2;
            }
            (reads, failures)
        });
        for _ in 0..8 {
            let (status, body) = api(&a, &owner).post("/v1/master-key/rotate", &json!({}));
            assert_eq!(
                (status, body["reencrypted"].as_u64()),
                (200, Some(5)),
                "{body}"
            );
            std::thread::sleep(Duration::from_millis(150));
        }
        stop.store(true, Ordering::SeqCst);
        reader.join().unwrap()
    });
    println!("{reads} reads through B during 8 rotations through A; failed: {failures:?}");
    assert!(
        failures.is_empty(),
        "reads through B during rotations through A: {failures:?}"
    );

    // B writes with the new key, and A reads it.
    let (status, body) = api(&b, &owner).post(
        "/v1/vaults/default/credentials",
        &json!({"credentials": {"FROM_B": "b-value"}}),
    );
    assert_eq!(status, 200, "{body}");
    let (status, got) = api(&a, &owner).get("/v1/vaults/default/credentials/FROM_B");
    assert_eq!((status, &got["value"]), (200, &json!("b-value")), "{got}");
}

#[test]
fn a_master_password_changed_through_one_node_is_needed_by_the_others_from_then_on() {
    let a = Server::start_with(ServerOptions {
        password: Some("first-master-pass".into()),
        ..Backend::Postgres.options("password_across")
    });
    let owner = a.owner_token();
    let mut b = a.join();
    let values: BTreeMap<String, String> = [("A".to_string(), "value-a".to_string())].into();
    let (status, body) = api(&a, &owner).post(
        "/v1/vaults/default/credentials",
        &json!({"credentials": values}),
    );
    assert_eq!(status, 200, "{body}");

    let (status, body) = api(&a, &owner).post(
        "/v1/master-password",
        &json!({"current": "first-master-pass", "new": "second-master-pass"}),
    );
    assert_eq!(status, 204, "{body}");
    // B still holds the data key: it keeps serving.
    assert_eq!(revealed(&api(&b, &owner)), (200, values.clone()));
    // But B must not wrap the key with the old password again, nor replace it.
    let message = api_error(
        api(&b, &owner).post(
            "/v1/master-password",
            &json!({"current": "first-master-pass", "new": "third-master-pass"}),
        ),
        409,
        "master_key_changed",
    );
    assert!(message.contains("restart"), "{message}");
    api_error(
        api(&b, &owner).post("/v1/master-key/rotate", &json!({})),
        409,
        "master_key_changed",
    );

    // Restarted, B needs the new password.
    b.set_password(Some("first-master-pass"));
    let err = b.try_restart().expect_err("the old password is refused");
    assert!(err.contains("wrong master password"), "{err}");
    b.set_password(Some("second-master-pass"));
    b.restart();
    assert_eq!(revealed(&api(&b, &owner)), (200, values.clone()));
    // And now B can rotate the key, and A takes the new one.
    let (status, body) = api(&b, &owner).post("/v1/master-key/rotate", &json!({}));
    assert_eq!(
        (status, body["reencrypted"].as_u64()),
        (200, Some(1)),
        "{body}"
    );
    assert_eq!(revealed(&api(&a, &owner)), (200, values));
}
