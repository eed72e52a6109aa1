//! End to end through the real Envoy with the built filter: an agent's plain-HTTP
//! request through the forward proxy reaches a loopback echo upstream with the
//! credential injected and the agent token gone.

use std::time::Duration;

use serde_json::{json, Value};

use agent_vault_testkit::control_plane::ServerOptions;
use agent_vault_testkit::envoy::EnvoyOptions;
use agent_vault_testkit::http::{proxy_basic, raw_request};
use agent_vault_testkit::stack::{eventually, on_every_worker, Stack};
use agent_vault_testkit::upstream::{Echo, TestCa};

/// Long enough for the filter's first snapshot poll (on start, then every 1 s).
const FIRST_SNAPSHOT: Duration = Duration::from_secs(5);

/// Every header value the upstream saw, as one string (to look for leaked tokens).
fn all_header_values(echo: &Value) -> String {
    echo["header_list"].to_string()
}

#[test]
fn smoke_a_plain_http_service_gets_the_bearer_credential_and_never_the_agent_token() {
    let stack = Stack::start();
    let echo = Echo::plain();
    let secret = "sk_test_smoke_0123456789";
    stack.set_credential("default", "ECHO_TOKEN", secret);
    stack.add_service(
        "default",
        json!({"name": "echo", "host": echo.authority(), "upstream_tls": false,
               "auth": {"type": "bearer", "token": "ECHO_TOKEN"}}),
    );
    let token = stack.create_agent("smoke", &["default"]);

    let url = echo.url("/v1/x?q=1");
    let response = eventually(
        &stack.envoy,
        FIRST_SNAPSHOT,
        || {
            stack.get_as(
                &token,
                "default",
                &url,
                // The agent tries to pick the route and to bring its own credential.
                &[
                    ("x-agent-vault-upstream", "tls"),
                    ("authorization", "Bearer agent-supplied"),
                ],
            )
        },
        |r| r.status == 200,
    );
    let seen = response.echoed();
    assert_eq!(seen["method"], "GET");
    assert_eq!(
        seen["path"], "/v1/x?q=1",
        "path and query reach the upstream"
    );
    assert_eq!(seen["tls"], false);
    let headers = &seen["headers"];
    assert_eq!(headers["authorization"], format!("Bearer {secret}"));
    assert_eq!(headers["host"], echo.authority());
    assert!(
        headers.get("proxy-authorization").is_none(),
        "the proxy credential is removed: {headers}"
    );
    assert!(
        headers.get("x-agent-vault-upstream").is_none(),
        "the routing header never leaves Envoy: {headers}"
    );
    let values = all_header_values(&seen);
    assert!(!values.contains(&token), "agent token leaked: {values}");
    assert!(!values.contains("agent-supplied"), "{values}");
    assert_eq!(
        seen["header_list"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| h[0].as_str().unwrap().eq_ignore_ascii_case("authorization"))
            .count(),
        1,
        "exactly one Authorization header"
    );
}

#[test]
fn a_tls_service_is_reached_over_tls_with_sni_and_a_verified_certificate() {
    let stack = Stack::start();
    let upstream = Echo::tls(&stack.ca);
    stack.set_credential("default", "TLS_KEY", "tls-secret-value");
    stack.add_service(
        "default",
        json!({"name": "secure", "host": upstream.authority(), "upstream_tls": true,
               "auth": {"type": "api-key", "key": "TLS_KEY", "header": "x-api-key"}}),
    );
    let token = stack.create_agent("tls-agent", &["default"]);

    // The agent speaks plain http:// to the proxy; Envoy originates the TLS.
    let url = upstream.url("/v1/secure?page=2");
    let response = eventually(
        &stack.envoy,
        FIRST_SNAPSHOT,
        || stack.get_as(&token, "default", &url, &[]),
        |r| r.status == 200,
    );
    let seen = response.echoed();
    assert_eq!(seen["tls"], true, "the upstream was reached over TLS");
    assert_eq!(seen["sni"], "localhost", "SNI from the service host");
    assert_eq!(seen["path"], "/v1/secure?page=2");
    assert_eq!(seen["headers"]["x-api-key"], "tls-secret-value");
    assert!(seen["headers"].get("proxy-authorization").is_none());
    assert!(seen["headers"].get("x-agent-vault-upstream").is_none());
}

#[test]
fn an_upstream_certificate_from_an_untrusted_ca_fails_closed() {
    let stack = Stack::start();
    let rogue_ca = TestCa::new("not trusted by Envoy");
    let rogue = Echo::tls(&rogue_ca);
    let trusted = Echo::tls(&stack.ca);
    stack.set_credential("default", "KEY", "must-not-reach-rogue");
    for (name, echo) in [("rogue", &rogue), ("trusted", &trusted)] {
        stack.add_service(
            "default",
            json!({"name": name, "host": echo.authority(), "upstream_tls": true,
                   "auth": {"type": "bearer", "token": "KEY"}}),
        );
    }
    let token = stack.create_agent("ca-agent", &["default"]);

    // Once the trusted service answers, the filter has the snapshot with both.
    eventually(
        &stack.envoy,
        FIRST_SNAPSHOT,
        || stack.get_as(&token, "default", &trusted.url("/ok"), &[]),
        |r| r.status == 200,
    );
    // Each Envoy worker polls its own snapshot: retry until the filter lets the
    // request through (no `x-agent-vault-error`), then it is Envoy's TLS that refuses.
    let response = eventually(
        &stack.envoy,
        FIRST_SNAPSHOT,
        || stack.get_as(&token, "default", &rogue.url("/steal"), &[]),
        |r| r.header("x-agent-vault-error").is_none(),
    );
    assert_eq!(
        response.status, 503,
        "TLS verification failure is an error: {} {}",
        response.status, response.body
    );
    assert!(
        rogue.received().is_empty(),
        "no request reached the upstream with the untrusted certificate"
    );
}

/// A CONNECT the filter does not let through (HTTPS agents, see `https_proxy` for the
/// ones it does) gets the filter's JSON, and nothing reaches an upstream.
#[test]
fn a_connect_the_filter_refuses_gets_a_clear_json_error_and_reaches_no_upstream() {
    let stack = Stack::start();
    let echo = Echo::plain();
    stack.set_credential("default", "KEY", "v");
    stack.add_service(
        "default",
        json!({"name": "echo", "host": echo.authority(), "upstream_tls": false,
               "auth": {"type": "bearer", "token": "KEY"}}),
    );
    let token = stack.create_agent("connect-agent", &["default"]);
    // Every worker, not just one: the CONNECTs below may land on either.
    on_every_worker(
        &stack.envoy,
        FIRST_SNAPSHOT,
        4,
        || stack.get_as(&token, "default", &echo.url("/ready"), &[]),
        |r| r.status == 200,
    );
    echo.clear();

    let auth = proxy_basic(&token, "default");
    let other_port = format!("localhost:{}", echo.port + 1);
    let cases = [
        (
            "no proxy credential",
            echo.authority(),
            None,
            407,
            "proxy_auth_required",
        ),
        (
            "a host no service names",
            "api.example.org:443".to_string(),
            Some(&auth),
            403,
            "forbidden",
        ),
        (
            "another port of the service's host",
            other_port,
            Some(&auth),
            403,
            "forbidden",
        ),
    ];
    for (behaviour, authority, auth, status, code) in cases {
        let mut request = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
        if let Some(auth) = auth {
            request.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
        }
        request.push_str("\r\n");
        let response = raw_request(stack.envoy.port, request.as_bytes());
        assert_eq!(response.status, status, "{behaviour}: {response:?}");
        assert_eq!(response.header("x-agent-vault-error"), Some("true"));
        assert!(response
            .header("content-type")
            .is_some_and(|c| c.starts_with("application/json")));
        let body = response.json();
        assert_eq!(body["error"], code, "{behaviour}: {body}");
        // The filter itself answered (upgrade_configs lets CONNECT reach it), not the
        // config's connect_matcher backstop.
        let message = body["message"].as_str().unwrap();
        assert!(
            !stack.envoy.config().contains(message),
            "{behaviour}: answered by the route backstop, not the filter: {body}"
        );
    }
    assert!(echo.received().is_empty(), "nothing was tunnelled");
}

/// `envoy/sidecar.yaml` end to end: the egress listener with a fixed TLS upstream.
#[test]
fn the_sidecar_config_injects_into_its_fixed_tls_upstream() {
    let ca = TestCa::new("sidecar upstream CA");
    let upstream = Echo::tls(&ca);
    let port = upstream.port;
    let stack = Stack::start_with_ca(ServerOptions::default(), ca, |options| {
        EnvoyOptions::sidecar(&options.socket, &options.ca_bundle, "localhost", port)
    });
    stack.set_credential("default", "SIDECAR_KEY", "sidecar-secret");
    stack.add_service(
        "default",
        json!({"name": "fixed", "host": upstream.authority(), "upstream_tls": true,
               "auth": {"type": "bearer", "token": "SIDECAR_KEY"}}),
    );
    let token = stack.create_agent("sidecar-agent", &["default"]);
    let response = eventually(
        &stack.envoy,
        FIRST_SNAPSHOT,
        || stack.get_as(&token, "default", &upstream.url("/v1/fixed"), &[]),
        |r| r.status == 200,
    );
    let seen = response.echoed();
    assert_eq!(seen["tls"], true);
    assert_eq!(seen["headers"]["authorization"], "Bearer sidecar-secret");
    assert!(seen["headers"].get("proxy-authorization").is_none());

    // Another host is not served by this listener, whatever the agent claims.
    // (Retried: the worker that takes this connection may not have polled the new
    // snapshot yet and would answer 407 for the new agent.)
    let other = eventually(
        &stack.envoy,
        FIRST_SNAPSHOT,
        || stack.get_as(&token, "default", "http://example.com/", &[]),
        |r| r.status != 407,
    );
    assert!(
        other.status == 403 && other.header("x-agent-vault-error") == Some("true"),
        "{other:?}"
    );
    assert_eq!(
        upstream.received().len(),
        1,
        "only the allowed request arrived"
    );
}
