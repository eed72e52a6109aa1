//! Allowed methods per service (issue 13): a service's `methods` list, through the
//! real Envoy with loopback upstreams, over plain requests and inside HTTPS tunnels; a
//! method the service does not list is 403 `method_not_allowed_for_service`, gets no
//! credential, and never reaches the upstream. Bad lists are a 400 from the API, and a
//! proposal's list takes effect once approved.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};

use agent_vault_testkit::control_plane::{Server, ServerOptions};
use agent_vault_testkit::http::{proxy_basic, HttpResponse, RawResponse};
use agent_vault_testkit::https_agent::{HttpsTunnel, TlsOptions};
use agent_vault_testkit::stack::{on_every_worker, wait_for, Stack};
use agent_vault_testkit::upstream::{Echo, TestCa};

/// Both workers load their first snapshot (and a change) within this.
const SNAPSHOT: Duration = Duration::from_secs(15);

/// A stack whose Envoy may reach exactly these plain echo upstreams.
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

#[track_caller]
fn assert_method_refused(
    status: u16,
    error_header: Option<&str>,
    body: &str,
    method: &str,
) -> Value {
    assert_eq!(
        (status, error_header),
        (403, Some("true")),
        "{method}: {status} {body}"
    );
    let body: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(body["error"], "method_not_allowed_for_service", "{body}");
    assert_eq!(body["method"], method, "{body}");
    body
}

/// The request log's records with this error code.
fn logged_refusals(stack: &Stack, vault: &str) -> Vec<Value> {
    stack
        .request_log(vault)
        .into_iter()
        .filter(|r| r["error"] == "method_not_allowed_for_service")
        .collect()
}

#[test]
fn plain_requests_get_only_the_services_methods_and_a_proposals_methods_take_effect_once_approved()
{
    let echo = Echo::plain();
    let writer_echo = Echo::plain();
    let stack = stack_allowing(&[&echo, &writer_echo]);
    let secret = "sk_live_methods_5f4e3d2c";
    stack.set_credential("default", "ECHO_TOKEN", secret);
    stack.add_service(
        "default",
        json!({"name": "reader", "host": echo.authority(), "upstream_tls": false,
               "methods": ["GET"], "auth": {"type": "bearer", "token": "ECHO_TOKEN"}}),
    );
    let token = stack.create_agent("methodical", &["default"]);
    on_every_worker(
        &stack.envoy,
        SNAPSHOT,
        4,
        || stack.get_as(&token, "default", &echo.url("/ready"), &[]),
        |r| r.status == 200,
    );

    let got = stack.get_as(&token, "default", &echo.url("/v1/items"), &[]);
    assert_eq!(
        got.echoed()["headers"]["authorization"],
        format!("Bearer {secret}")
    );
    echo.clear();
    let auth = proxy_basic(&token, "default");
    for method in ["POST", "DELETE", "PUT", "PATCH"] {
        let refused = stack.envoy.request(
            method,
            &echo.url("/v1/items"),
            &[("Proxy-Authorization", &auth)],
            Some(b"{\"x\":1}"),
        );
        let body = assert_method_refused(
            refused.status,
            refused.header("x-agent-vault-error"),
            &refused.body,
            method,
        );
        assert_eq!(body["service"], "reader");
        assert_eq!(body["allowed_methods"], json!(["GET"]));
        assert!(!refused.body.contains(secret), "{}", refused.body);
    }
    assert!(
        echo.received().is_empty(),
        "a refused method reached the upstream: {:?}",
        echo.received()
    );
    let logged = wait_for(SNAPSHOT, || {
        let records = logged_refusals(&stack, "default");
        (records.len() >= 4).then_some(records)
    })
    .unwrap_or_else(|| panic!("not logged: {:?}", stack.request_log("default")));
    assert!(
        logged
            .iter()
            .all(|r| r["service"] == "reader" && r["status"] == 403),
        "{logged:?}"
    );

    // An agent proposes a POST-only service with a credential of its own; a human
    // approves it; POST then gets that credential, GET does not.
    let agent = stack.server.api(Some(&token));
    let proposal = json!({
        "services": [{"name": "writer", "host": writer_echo.authority(), "upstream_tls": false,
                      "methods": ["POST"], "auth": {"type": "bearer", "token": "WRITE_TOKEN"}}],
        "credentials": [{"key": "WRITE_TOKEN", "description": "write key"}],
    });
    let (status, created) = agent.post("/v1/proposals", &proposal);
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_u64().unwrap();
    let (status, shown) = stack
        .api()
        .get(&format!("/v1/vaults/default/proposals/{id}"));
    assert_eq!(status, 200, "{shown}");
    assert_eq!(
        shown["diff"]["services"][0]["after"]["methods"],
        json!(["POST"]),
        "{shown}"
    );
    let acknowledge: Vec<Value> = shown["diff"]["warnings"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|w| w["id"].clone())
        .collect();
    let write_secret = "sk_live_writer_0a1b2c";
    let (status, approved) = stack.api().post(
        &format!("/v1/vaults/default/proposals/{id}/approve"),
        &json!({"values": {"WRITE_TOKEN": write_secret}, "acknowledge": acknowledge}),
    );
    assert_eq!(status, 200, "{approved}");

    let posted = on_every_worker(
        &stack.envoy,
        SNAPSHOT,
        4,
        || {
            stack.envoy.request(
                "POST",
                &writer_echo.url("/v1/write"),
                &[("Proxy-Authorization", &auth)],
                Some(b"{}"),
            )
        },
        |r| r.status == 200,
    );
    assert_eq!(posted.echoed()["method"], "POST");
    // A service from a proposal redacts responses (the default): the upstream got the
    // credential, the agent sees its echo redacted.
    assert_eq!(
        agent_vault_testkit::http::unmasked(
            posted.echoed()["headers"]["authorization"]
                .as_str()
                .unwrap_or_default()
        ),
        "[REDACTED]"
    );
    assert_eq!(
        writer_echo
            .received()
            .last()
            .map(|seen| seen["headers"]["authorization"].clone()),
        Some(json!(format!("Bearer {write_secret}")))
    );
    writer_echo.clear();
    let get: HttpResponse = stack.get_as(&token, "default", &writer_echo.url("/v1/write"), &[]);
    let body = assert_method_refused(
        get.status,
        get.header("x-agent-vault-error"),
        &get.body,
        "GET",
    );
    assert_eq!(body["service"], "writer");
    assert_eq!(body["allowed_methods"], json!(["POST"]));
    assert!(
        writer_echo.received().is_empty(),
        "{:?}",
        writer_echo.received()
    );
}

#[test]
fn inside_an_https_tunnel_a_method_the_service_does_not_list_is_403_and_never_reaches_the_upstream()
{
    let upstream_ca = TestCa::new("upstream test CA");
    let echo = Echo::tls(&upstream_ca);
    let allowed = format!("127.0.0.1/32:{}", echo.port);
    let stack = Stack::start_with_ca(ServerOptions::default(), upstream_ca, |options| {
        options.allow_private_upstreams(&[&allowed])
    });
    let proxy_ca: PathBuf = stack.server.proxy_ca();
    let secret = "sk_test_tunnel_methods_77aa";
    stack.set_credential("default", "ECHO_TOKEN", secret);
    stack.add_service(
        "default",
        json!({"name": "echo", "host": echo.authority(), "methods": ["GET", "HEAD"],
               "auth": {"type": "bearer", "token": "ECHO_TOKEN"}}),
    );
    let token = stack.create_agent("tunneller", &["default"]);
    let ca_pem = std::fs::read_to_string(&proxy_ca).unwrap();
    let auth = proxy_basic(&token, "default");
    let open = || {
        HttpsTunnel::open(
            stack.envoy.port,
            &echo.authority(),
            &[("Proxy-Authorization", &auth)],
            &TlsOptions::new("localhost", &ca_pem),
        )
    };
    let mut last = String::new();
    let mut tunnel = wait_for(SNAPSHOT, || match open() {
        Ok(mut tunnel) => match tunnel.get("/ready", &[]) {
            Ok(r) if r.status == 200 => Some(tunnel),
            Ok(r) => {
                last = format!("{} {}", r.status, r.text());
                None
            }
            Err(e) => {
                last = e.to_string();
                None
            }
        },
        Err(e) => {
            last = format!("{e:?}");
            None
        }
    })
    .unwrap_or_else(|| panic!("no working tunnel: {last}\n{}", stack.envoy.log_tail(30)));

    let got = tunnel.get("/v1/items", &[]).unwrap();
    assert_eq!(got.status, 200, "{}", got.text());
    let seen: Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(seen["headers"]["authorization"], format!("Bearer {secret}"));
    assert_eq!(seen["tls"], true);

    echo.clear();
    // Envoy closes an HTTP/1 connection whose request body it did not read after a
    // local reply (as for every refusal), so each refused request has its own tunnel.
    for method in ["POST", "DELETE"] {
        let mut tunnel = open().unwrap_or_else(|e| panic!("{e:?}"));
        let refused: RawResponse = tunnel
            .request(
                method,
                "/v1/items",
                &[("content-type", "application/json")],
                Some(b"{}"),
            )
            .unwrap();
        let text = refused.text();
        let body = assert_method_refused(
            refused.status,
            refused.header("x-agent-vault-error"),
            &text,
            method,
        );
        assert_eq!(body["service"], "echo");
        assert_eq!(body["allowed_methods"], json!(["GET", "HEAD"]));
        assert!(!text.contains(secret), "{text}");
    }
    assert!(
        echo.received().is_empty(),
        "a refused method reached the upstream: {:?}",
        echo.received()
    );
    // The tunnel stays usable for the allowed methods.
    let again = tunnel.get("/v1/again", &[]).unwrap();
    assert_eq!(again.status, 200, "{}", again.text());
}

#[test]
fn the_api_and_the_cli_refuse_invalid_methods_with_a_clear_400_and_store_nothing() {
    let server = Server::start();
    let session = server.owner_token();
    let owner = server.api(Some(&session));
    let service = |methods: Value| {
        json!({"name": "ro", "host": "ro.example.com", "auth": {"type": "passthrough"},
               "methods": methods})
    };
    // (behaviour, methods, what the message says)
    let cases: [(&str, Value, &str); 7] = [
        (
            "lowercase",
            json!(["get"]),
            "invalid method \"get\": methods are case-sensitive uppercase",
        ),
        ("empty list", json!([]), "the methods list is empty"),
        (
            "duplicate",
            json!(["GET", "POST", "GET"]),
            "invalid method \"GET\": listed twice",
        ),
        (
            "TRACE",
            json!(["TRACE"]),
            "TRACE and TRACK are always refused",
        ),
        (
            "CONNECT",
            json!(["CONNECT"]),
            "CONNECT is not a service method",
        ),
        ("not a token", json!(["GE/T"]), "invalid method \"GE/T\""),
        ("too long", json!(["X".repeat(40)]), "1 to 32 characters"),
    ];
    for (behaviour, methods, says) in cases {
        let (status, body) = owner.post("/v1/vaults/default/services", &service(methods));
        assert_eq!(status, 400, "{behaviour}: {body}");
        assert_eq!(body["error"], "invalid_method", "{behaviour}: {body}");
        let message = body["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{behaviour}: {message}");
    }
    let (status, body) = owner.post("/v1/vaults/default/services", &service(json!("GET")));
    assert_eq!(status, 400, "a string is not a list: {body}");
    let (status, listed) = owner.get("/v1/vaults/default/services");
    assert_eq!(status, 200);
    assert!(!listed.to_string().contains("ro.example.com"), "{listed}");

    // The CLI: --method repeated or --methods comma-separated; list shows them.
    let cli = server.cli().with_token(&session);
    let add = |name: &str, host: &str, methods: &[&str]| {
        let mut args = vec![
            "vault",
            "service",
            "add",
            "--name",
            name,
            "--host",
            host,
            "--auth-type",
            "passthrough",
            "--vault",
            "default",
        ];
        args.extend_from_slice(methods);
        cli.run(&args)
    };
    let out = add("bad", "bad.example.com", &["--method", "get"]).fails();
    let stderr = out.stderr.trim_end();
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains("invalid method \"get\": methods are case-sensitive uppercase"),
        "{stderr}"
    );
    let out = add(
        "ro",
        "ro.example.com",
        &["--method", "GET", "--method", "HEAD"],
    )
    .ok();
    assert!(out.stdout.contains("methods GET, HEAD"), "{}", out.stdout);
    add("rw", "rw.example.com", &["--methods", "GET,POST"]).ok();
    add("any", "any.example.com", &[]).ok();
    let listed = cli
        .run(&["vault", "service", "list", "--vault", "default"])
        .ok()
        .stdout;
    assert!(listed.contains("METHODS"), "{listed}");
    let line = |name: &str| {
        listed
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_default()
            .to_owned()
    };
    assert!(line("ro ").ends_with("GET, HEAD"), "{listed}");
    assert!(line("rw ").ends_with("GET, POST"), "{listed}");
    assert!(line("any ").ends_with("all"), "{listed}");
    let json = cli
        .run(&["vault", "service", "list", "--vault", "default", "--json"])
        .ok()
        .json();
    let rw = json
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "rw")
        .cloned()
        .unwrap();
    assert_eq!(rw["methods"], json!(["GET", "POST"]));
}
