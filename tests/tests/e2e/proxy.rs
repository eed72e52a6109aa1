//! What an agent and an upstream see through the real Envoy with the built filter and
//! the real control plane (DESIGN.md §3–§6, §11): injection for each auth type, the
//! error table of §6, how fast rule and credential changes reach every worker
//! (measured), the host matcher's priorities, the request log, the security invariants
//! that can be checked from outside, and bad input — including a fake control plane
//! that answers garbage, slowly, or with a snapshot that does not parse.
//!
//! Envoy runs two workers, each with its own filter VM, snapshot and credential cache:
//! a state is "visible" once a run of requests that reached *both* workers shows it
//! ([`on_every_worker`]).

use std::io::Write;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};

use agent_vault_testkit::control_plane::{socket_request, ServerOptions};
use agent_vault_testkit::envoy::{Envoy, EnvoyOptions};
use agent_vault_testkit::fake_control_plane::{fake_stack, Credentials, GOOD_VALUES};
use agent_vault_testkit::http::{proxy_basic, proxy_get, raw_request, HttpResponse};
use agent_vault_testkit::stack::{on_every_worker, wait_for, Stack};
use agent_vault_testkit::upstream::Echo;

/// Long enough for the filter's first snapshot on both workers.
const FIRST_SNAPSHOT: Duration = Duration::from_secs(8);
/// Long enough for a change to reach both workers (poll 1 s) with a wide margin.
const CHANGE: Duration = Duration::from_secs(6);
/// Requests in a run that must all show a state (and reach both workers).
const STREAK: usize = 6;

// --- helpers -------------------------------------------------------------------------

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// A well-formed agent token that no agent has.
fn unknown_token() -> String {
    format!("av_agt_{}", "0123456789abcdef".repeat(4))
}

/// The headers the upstream received, in order, as (name, value).
fn header_list(seen: &Value) -> Vec<(String, String)> {
    seen["header_list"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|pair| {
                    (
                        pair[0].as_str().unwrap_or_default().to_string(),
                        pair[1].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// How many header lines named `name` (any case) the upstream received.
fn count_header(seen: &Value, name: &str) -> usize {
    header_list(seen)
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .count()
}

/// Asserts no header name or value the upstream received (nor the path or body)
/// contains any of `needles`.
#[track_caller]
fn assert_upstream_never_saw(seen: &Value, needles: &[&str]) {
    for (name, value) in header_list(seen) {
        for needle in needles {
            assert!(
                !name.contains(needle) && !value.contains(needle),
                "the upstream saw {needle:?} in header {name}: {value}"
            );
        }
    }
    for needle in needles {
        assert!(
            !seen["path"].as_str().unwrap_or_default().contains(needle)
                && !seen["body"].as_str().unwrap_or_default().contains(needle),
            "the upstream saw {needle:?} in the path or body: {seen}"
        );
    }
}

/// Asserts `response` is the filter's own refusal `status`/`code` (DESIGN.md §6) and
/// returns its JSON body.
#[track_caller]
fn assert_refused(response: &HttpResponse, status: u16, code: &str) -> Value {
    assert_eq!(
        response.status, status,
        "expected {status} {code}: {} {:?} {}",
        response.status, response.headers, response.body
    );
    assert_eq!(
        response.header("x-agent-vault-error"),
        Some("true"),
        "{response:?}"
    );
    assert_eq!(
        response.header("content-type"),
        Some("application/json"),
        "{response:?}"
    );
    let body = response.json();
    assert_eq!(body["error"], code, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "a refusal says why: {body}"
    );
    body
}

/// Whether `response` is the echo's answer with `header: value` received once.
pub(crate) fn injected(response: &HttpResponse, header: &str, value: &str) -> bool {
    response.status == 200
        && response.header("x-agent-vault-error").is_none()
        && serde_json::from_str::<Value>(&response.body)
            .map(|seen| seen["headers"][header] == value && count_header(&seen, header) == 1)
            .unwrap_or(false)
}

/// Whether `response` is the filter's own refusal `status`/`code`.
pub(crate) fn is_refusal(response: &HttpResponse, status: u16, code: &str) -> bool {
    response.status == status
        && response.header("x-agent-vault-error") == Some("true")
        && serde_json::from_str::<Value>(&response.body)
            .map(|body| body["error"] == code)
            .unwrap_or(false)
}

/// Stops Envoy (its log file is flushed only every few seconds, and on exit) and
/// returns its log, after checking the filter wrote to it and no VM panicked.
#[track_caller]
fn final_envoy_log(envoy: &mut Envoy) -> String {
    envoy.stop();
    let log = envoy.logs();
    assert!(
        log.contains("agent-vault-filter: loaded rules snapshot"),
        "the filter's lines are in this log"
    );
    assert!(
        !log.contains("agent-vault-filter: panic"),
        "a filter VM panicked: {}",
        log.lines()
            .filter(|l| l.contains("agent-vault-filter"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    log
}

fn bearer_service(name: &str, host: &str, key: &str) -> Value {
    json!({"name": name, "host": host, "upstream_tls": false,
           "auth": {"type": "bearer", "token": key}})
}

// --- 1. injection --------------------------------------------------------------------

#[test]
fn each_auth_type_injects_exactly_its_headers_and_the_agent_token_never_reaches_the_upstream() {
    let stack = Stack::start();
    let (bearer, basic, api_key, custom, passthrough) = (
        Echo::plain(),
        Echo::plain(),
        Echo::plain(),
        Echo::plain(),
        Echo::plain(),
    );
    let secrets = [
        ("BEARER_TOKEN", "bearer-secret-1111"),
        ("BASIC_USER", "svc-user"),
        ("BASIC_PASS", "p@ss:w0rd-2222"),
        ("API_KEY", "apikey-secret-3333"),
        ("CUSTOM_TOKEN", "custom-secret-4444"),
        ("CLIENT_ID", "client-5555"),
    ];
    for (key, value) in secrets {
        stack.set_credential("default", key, value);
    }
    stack.add_service(
        "default",
        bearer_service("bearer", &bearer.authority(), "BEARER_TOKEN"),
    );
    stack.add_service(
        "default",
        json!({"name": "basic", "host": basic.authority(), "upstream_tls": false,
               "auth": {"type": "basic", "username": "BASIC_USER", "password": "BASIC_PASS"}}),
    );
    stack.add_service(
        "default",
        json!({"name": "api-key", "host": api_key.authority(), "upstream_tls": false,
               "auth": {"type": "api-key", "key": "API_KEY", "header": "X-Api-Key",
                        "prefix": "Key "}}),
    );
    stack.add_service(
        "default",
        json!({"name": "custom", "host": custom.authority(), "upstream_tls": false,
               "auth": {"type": "custom", "headers": {
                   "X-Token": "tok {{ CUSTOM_TOKEN }}",
                   "X-Client-Id": "client={{ CLIENT_ID }}"}}}),
    );
    stack.add_service(
        "default",
        json!({"name": "open", "host": passthrough.authority(), "upstream_tls": false,
               "auth": {"type": "passthrough"}}),
    );
    let token = stack.create_agent("injector", &["default"]);
    let proxy_auth = proxy_basic(&token, "default");
    let bearer_auth = format!("Bearer {token}");
    // Nothing of the agent's proxy credential may reach an upstream, in any form.
    let agent_forms = [token.as_str(), proxy_auth.as_str(), &b64(&token)[..40]];
    let secret_values: Vec<&str> = secrets.iter().map(|(_, v)| *v).collect();

    let bearer_url = bearer.url("/v1/charges?limit=3");
    on_every_worker(
        &stack.envoy,
        FIRST_SNAPSHOT,
        STREAK,
        || stack.get_as(&token, "default", &bearer_url, &[]),
        |r| injected(r, "authorization", "Bearer bearer-secret-1111"),
    );
    for upstream in [&bearer, &basic, &api_key, &custom, &passthrough] {
        upstream.clear();
    }

    // bearer: two agent-supplied Authorization headers, in two cases, become one.
    let seen = stack
        .get_as(
            &token,
            "default",
            &bearer_url,
            &[
                ("Authorization", "Bearer agent-supplied"),
                ("AUTHORIZATION", "Basic YWdlbnQ6c3VwcGxpZWQ="),
            ],
        )
        .echoed();
    assert_eq!(
        seen["headers"]["authorization"],
        "Bearer bearer-secret-1111"
    );
    assert_eq!(count_header(&seen, "authorization"), 1, "{seen}");
    assert_eq!(seen["path"], "/v1/charges?limit=3");
    assert_upstream_never_saw(&seen, &agent_forms);
    assert_upstream_never_saw(&seen, &["agent-supplied", "YWdlbnQ6c3VwcGxpZWQ="]);
    assert_upstream_never_saw(&seen, &secret_values[1..]);

    // basic: `Basic base64(user:pass)`, the agent's own Authorization replaced.
    let seen = stack
        .get_as(
            &token,
            "default",
            &basic.url("/user"),
            &[("authorization", "Basic bm90Om1pbmU=")],
        )
        .echoed();
    assert_eq!(
        seen["headers"]["authorization"],
        format!("Basic {}", b64("svc-user:p@ss:w0rd-2222"))
    );
    assert_eq!(count_header(&seen, "authorization"), 1, "{seen}");
    assert_upstream_never_saw(&seen, &agent_forms);
    assert_upstream_never_saw(&seen, &["bm90Om1pbmU="]);

    // api-key: custom header and prefix; the agent's copies in any case are replaced.
    let seen = stack
        .get_as(
            &token,
            "default",
            &api_key.url("/items"),
            &[("X-API-KEY", "agent-upper"), ("x-Api-Key", "agent-mixed")],
        )
        .echoed();
    assert_eq!(seen["headers"]["x-api-key"], "Key apikey-secret-3333");
    assert_eq!(count_header(&seen, "x-api-key"), 1, "{seen}");
    assert!(
        seen["headers"].get("authorization").is_none(),
        "api-key sets only its header: {seen}"
    );
    assert_upstream_never_saw(&seen, &agent_forms);
    assert_upstream_never_saw(&seen, &["agent-upper", "agent-mixed"]);

    // custom: both templated headers; proxy credential as Bearer + X-Vault this time.
    let seen = stack
        .envoy
        .get(
            &custom.url("/graphql"),
            &[
                ("Proxy-Authorization", bearer_auth.as_str()),
                ("X-Vault", "default"),
                ("x-token", "agent-fake"),
                ("X-CLIENT-ID", "agent-client"),
            ],
        )
        .echoed();
    assert_eq!(seen["headers"]["x-token"], "tok custom-secret-4444");
    assert_eq!(seen["headers"]["x-client-id"], "client=client-5555");
    assert_eq!(count_header(&seen, "x-token"), 1, "{seen}");
    assert_eq!(count_header(&seen, "x-client-id"), 1, "{seen}");
    assert!(seen["headers"].get("authorization").is_none(), "{seen}");
    assert!(
        seen["headers"].get("x-vault").is_none(),
        "X-Vault is removed: {seen}"
    );
    assert_upstream_never_saw(&seen, &agent_forms);
    assert_upstream_never_saw(&seen, &["agent-fake", "agent-client"]);

    // passthrough: forwarded, nothing injected, the proxy credential removed; what the
    // agent sends for itself is its own business.
    let seen = stack
        .envoy
        .get(
            &passthrough.url("/public?x=1"),
            &[
                ("Proxy-Authorization", bearer_auth.as_str()),
                ("Authorization", "Bearer agents-own-key"),
            ],
        )
        .echoed();
    assert_eq!(seen["path"], "/public?x=1");
    assert_eq!(seen["headers"]["authorization"], "Bearer agents-own-key");
    assert_eq!(count_header(&seen, "authorization"), 1);
    assert_upstream_never_saw(&seen, &agent_forms);
    assert_upstream_never_saw(&seen, &secret_values);

    // Every upstream: no proxy credential, no routing header, no agent token, no
    // credential of another service.
    for (upstream, allowed) in [
        (&bearer, vec!["bearer-secret-1111"]),
        (&basic, vec![]),
        (&api_key, vec!["apikey-secret-3333"]),
        (&custom, vec!["custom-secret-4444", "client-5555"]),
        (&passthrough, vec![]),
    ] {
        let received = upstream.received();
        assert_eq!(received.len(), 1, "one request each: {received:?}");
        for seen in &received {
            for name in ["proxy-authorization", "x-agent-vault-upstream", "x-vault"] {
                assert_eq!(count_header(seen, name), 0, "{name} reached: {seen}");
            }
            assert_upstream_never_saw(seen, &agent_forms);
            let others: Vec<&str> = secret_values
                .iter()
                .copied()
                .filter(|v| !allowed.contains(v))
                .collect();
            assert_upstream_never_saw(seen, &others);
        }
    }
}

// --- 2. the error table of DESIGN.md §6 ------------------------------------------------

#[test]
fn missing_or_garbled_proxy_credentials_get_407_proxy_auth_required_and_unknown_tokens_407_invalid_token(
) {
    let stack = Stack::start();
    let echo = Echo::plain();
    stack.set_credential("default", "KEY", "value-407-test");
    stack.add_service("default", bearer_service("echo", &echo.authority(), "KEY"));
    let token = stack.create_agent("auth-agent", &["default"]);
    let url = echo.url("/v1/x");
    on_every_worker(
        &stack.envoy,
        FIRST_SNAPSHOT,
        STREAK,
        || stack.get_as(&token, "default", &url, &[]),
        |r| r.status == 200,
    );
    echo.clear();

    let big_token = format!("av_agt_{}", "a".repeat(10 * 1024));
    let unknown = unknown_token();
    // (behaviour, Proxy-Authorization, expected error)
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("no header", None, "proxy_auth_required"),
        (
            "bad base64",
            Some("Basic !!!not-base64!!!".into()),
            "proxy_auth_required",
        ),
        (
            "Basic with no colon (the real token alone)",
            Some(format!("Basic {}", b64(&token))),
            "proxy_auth_required",
        ),
        (
            "Digest scheme",
            Some("Digest x".into()),
            "proxy_auth_required",
        ),
        ("scheme only", Some("Basic".into()), "proxy_auth_required"),
        (
            "10 KiB Bearer token",
            Some(format!("Bearer {big_token}")),
            "proxy_auth_required",
        ),
        (
            "10 KiB Basic token",
            Some(format!("Basic {}", b64(&format!("{big_token}:default")))),
            "proxy_auth_required",
        ),
        (
            "well-formed unknown token, Basic",
            Some(proxy_basic(&unknown, "default")),
            "invalid_token",
        ),
        (
            "well-formed unknown token, Bearer",
            Some(format!("Bearer {unknown}")),
            "invalid_token",
        ),
        (
            "the real token with one more character",
            Some(format!("Bearer {token}0")),
            "invalid_token",
        ),
    ];
    for (behaviour, header, code) in &cases {
        for _ in 0..3 {
            let response = match header {
                Some(value) => stack
                    .envoy
                    .get(&url, &[("Proxy-Authorization", value.as_str())]),
                None => stack.envoy.get(&url, &[]),
            };
            let body = assert_refused(&response, 407, code);
            assert_eq!(
                response.header("proxy-authenticate"),
                Some("Basic realm=\"agent-vault\""),
                "{behaviour}: {response:?}"
            );
            for needle in [token.as_str(), unknown.as_str(), "aaaaaaaaaaaaaaaa"] {
                assert!(
                    !response.body.contains(needle),
                    "{behaviour}: the body echoes the credential: {body}"
                );
            }
        }
    }
    assert!(
        echo.received().is_empty(),
        "nothing was forwarded: {:?}",
        echo.received()
    );
}

#[test]
fn an_agent_with_several_vaults_must_name_one_and_cannot_use_a_vault_it_lacks() {
    let stack = Stack::start();
    let echo = Echo::plain();
    let other = Echo::plain();
    stack.create_vault("second");
    stack.set_credential("default", "KEY", "default-vault-secret");
    stack.set_credential("second", "KEY", "second-vault-secret");
    stack.add_service("default", bearer_service("echo", &echo.authority(), "KEY"));
    stack.add_service("second", bearer_service("other", &other.authority(), "KEY"));
    let both = stack.create_agent("both", &["default", "second"]);
    let solo = stack.create_agent("solo", &["default"]);
    let url = echo.url("/v1/x");

    // Named in the proxy URL: works, and picks that vault's credential.
    on_every_worker(
        &stack.envoy,
        FIRST_SNAPSHOT,
        STREAK,
        || stack.get_as(&both, "default", &url, &[]),
        |r| injected(r, "authorization", "Bearer default-vault-secret"),
    );
    let seen = stack
        .get_as(&both, "second", &other.url("/y"), &[])
        .echoed();
    assert_eq!(
        seen["headers"]["authorization"],
        "Bearer second-vault-secret"
    );
    // Named with X-Vault (Bearer proxy credential): works, and X-Vault is removed.
    let bearer_both = format!("Bearer {both}");
    let seen = stack
        .envoy
        .get(
            &url,
            &[
                ("Proxy-Authorization", bearer_both.as_str()),
                ("X-Vault", "default"),
            ],
        )
        .echoed();
    assert_eq!(
        seen["headers"]["authorization"],
        "Bearer default-vault-secret"
    );
    assert!(seen["headers"].get("x-vault").is_none(), "{seen}");
    // An agent with one vault need not name it.
    let bearer_solo = format!("Bearer {solo}");
    let seen = stack
        .envoy
        .get(&url, &[("Proxy-Authorization", bearer_solo.as_str())])
        .echoed();
    assert_eq!(
        seen["headers"]["authorization"],
        "Bearer default-vault-secret"
    );
    echo.clear();
    other.clear();

    // Several vaults, none named: 400 vault_required (Bearer, and Basic `token:`).
    for response in [
        stack
            .envoy
            .get(&url, &[("Proxy-Authorization", bearer_both.as_str())]),
        stack.envoy.get(
            &url,
            &[(
                "Proxy-Authorization",
                &format!("Basic {}", b64(&format!("{both}:"))),
            )],
        ),
    ] {
        let body = assert_refused(&response, 400, "vault_required");
        let message = body["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("default") && message.contains("second"),
            "names the agent's vaults: {body}"
        );
    }

    // A vault the agent lacks, named either way, or one that does not exist: 403.
    for response in [
        stack.get_as(&solo, "second", &other.url("/y"), &[]),
        stack.envoy.get(
            &other.url("/y"),
            &[
                ("Proxy-Authorization", bearer_solo.as_str()),
                ("X-Vault", "second"),
            ],
        ),
        stack.get_as(&solo, "no-such-vault", &url, &[]),
        stack.get_as(&both, "no-such-vault", &url, &[]),
    ] {
        let body = assert_refused(&response, 403, "forbidden");
        assert!(
            body.get("proposal_hint").is_none(),
            "a vault refusal is no unmatched host: {body}"
        );
        assert!(!response.body.contains("second-vault-secret"), "{body}");
    }
    assert!(echo.received().is_empty(), "{:?}", echo.received());
    assert!(other.received().is_empty(), "{:?}", other.received());
}

#[test]
fn an_unmatched_host_gets_403_with_a_proposal_hint_unless_the_vault_policy_is_passthrough() {
    let stack = Stack::start();
    let echo = Echo::plain();
    let unlisted = Echo::plain();
    stack.set_credential("default", "KEY", "policy-secret-value");
    stack.add_service("default", bearer_service("echo", &echo.authority(), "KEY"));
    let token = stack.create_agent("wanderer", &["default"]);
    on_every_worker(
        &stack.envoy,
        FIRST_SNAPSHOT,
        STREAK,
        || stack.get_as(&token, "default", &echo.url("/"), &[]),
        |r| r.status == 200,
    );

    let supported = json!(["bearer", "basic", "api-key", "custom", "passthrough"]);
    // (url, the host the hint names: the port only when it is not 80)
    let unlisted_authority = unlisted.authority();
    for (url, host) in [
        (
            "http://api.unknown-vendor.example/v1/charges".to_string(),
            "api.unknown-vendor.example",
        ),
        (unlisted.url("/v1/x"), unlisted_authority.as_str()),
    ] {
        let response = stack.get_as(&token, "default", &url, &[]);
        let body = assert_refused(&response, 403, "forbidden");
        assert_eq!(
            body["proposal_hint"],
            json!({"host": host, "endpoint": "POST /v1/proposals",
                   "supported_auth_types": supported}),
            "{body}"
        );
    }
    assert!(unlisted.received().is_empty());

    // Policy passthrough: an unmatched host is forwarded without any credential.
    stack.set_unmatched_host_policy("default", "passthrough");
    on_every_worker(
        &stack.envoy,
        CHANGE,
        STREAK,
        || stack.get_as(&token, "default", &unlisted.url("/free?q=1"), &[]),
        |r| r.status == 200 && r.header("x-agent-vault-error").is_none(),
    );
    let received = unlisted.received();
    assert!(received.len() >= STREAK, "{received:?}");
    for seen in &received {
        assert_eq!(seen["path"], "/free?q=1");
        assert_eq!(count_header(seen, "authorization"), 0, "{seen}");
        assert_eq!(count_header(seen, "proxy-authorization"), 0, "{seen}");
        assert_upstream_never_saw(seen, &[&token, "policy-secret-value"]);
    }
    // The matched service still gets its credential.
    let seen = stack
        .get_as(&token, "default", &echo.url("/"), &[])
        .echoed();
    assert_eq!(
        seen["headers"]["authorization"],
        "Bearer policy-secret-value"
    );

    // And back to deny.
    stack.set_unmatched_host_policy("default", "deny");
    on_every_worker(
        &stack.envoy,
        CHANGE,
        STREAK,
        || stack.get_as(&token, "default", &unlisted.url("/free"), &[]),
        |r| is_refusal(r, 403, "forbidden"),
    );
}

#[test]
fn a_disabled_service_gets_403_and_a_deleted_credential_502_naming_the_key_and_never_its_value() {
    let stack = Stack::start();
    let (off, gone, never) = (Echo::plain(), Echo::plain(), Echo::plain());
    stack.set_credential("default", "OFF_KEY", "off-secret-value");
    stack.set_credential("default", "GONE_KEY", "gone-secret-value");
    stack.set_credential("default", "NEVER_KEY", "never-secret-value");
    let mut disabled = bearer_service("off", &off.authority(), "OFF_KEY");
    disabled["enabled"] = json!(false);
    stack.add_service("default", disabled);
    stack.add_service(
        "default",
        bearer_service("gone", &gone.authority(), "GONE_KEY"),
    );
    stack.add_service(
        "default",
        bearer_service("never", &never.authority(), "NEVER_KEY"),
    );
    let token = stack.create_agent("stater", &["default"]);

    // Disabled: 403 service_disabled, on every worker.
    let response = on_every_worker(
        &stack.envoy,
        FIRST_SNAPSHOT,
        STREAK,
        || stack.get_as(&token, "default", &off.url("/v1/x"), &[]),
        |r| is_refusal(r, 403, "service_disabled"),
    );
    let body = assert_refused(&response, 403, "service_disabled");
    assert!(
        body["message"].as_str().unwrap_or_default().contains("off"),
        "{body}"
    );
    assert!(off.received().is_empty());

    // Used (cached), then deleted: 502 credential_not_found naming the key.
    on_every_worker(
        &stack.envoy,
        CHANGE,
        STREAK,
        || stack.get_as(&token, "default", &gone.url("/v1/x"), &[]),
        |r| injected(r, "authorization", "Bearer gone-secret-value"),
    );
    gone.clear();
    stack.delete_credentials("default", &["GONE_KEY"]);
    // Not used before it was deleted (nothing cached): the same answer via the fetch.
    stack.delete_credentials("default", &["NEVER_KEY"]);
    for (echo, key, value) in [
        (&gone, "GONE_KEY", "gone-secret-value"),
        (&never, "NEVER_KEY", "never-secret-value"),
    ] {
        let response = on_every_worker(
            &stack.envoy,
            CHANGE,
            STREAK,
            || stack.get_as(&token, "default", &echo.url("/v1/x"), &[]),
            |r| is_refusal(r, 502, "credential_not_found"),
        );
        let body = assert_refused(&response, 502, "credential_not_found");
        assert_eq!(body["key"], key, "{body}");
        assert!(
            body["message"].as_str().unwrap_or_default().contains(key),
            "{body}"
        );
        assert!(!response.body.contains(value), "{body}");
        // Requests a worker answered from its cache before its next poll reached the
        // upstream with the old value (that window is measured elsewhere); from now
        // on, nothing may.
        echo.clear();
        for _ in 0..STREAK {
            let response = stack.get_as(&token, "default", &echo.url("/v1/x"), &[]);
            assert_refused(&response, 502, "credential_not_found");
        }
        assert!(
            echo.received().is_empty(),
            "nothing forwarded without its credential: {:?}",
            echo.received()
        );
    }
}

#[test]
fn a_stopped_control_plane_gets_503_for_uncached_credentials_and_envoy_recovers_when_it_restarts() {
    let mut stack = Stack::start();
    let (warm, cold) = (Echo::plain(), Echo::plain());
    stack.set_credential("default", "WARM_KEY", "warm-secret");
    stack.set_credential("default", "COLD_KEY", "cold-secret");
    stack.add_service(
        "default",
        bearer_service("warm", &warm.authority(), "WARM_KEY"),
    );
    stack.add_service(
        "default",
        bearer_service("cold", &cold.authority(), "COLD_KEY"),
    );
    let token = stack.create_agent("survivor", &["default"]);
    on_every_worker(
        &stack.envoy,
        FIRST_SNAPSHOT,
        STREAK,
        || stack.get_as(&token, "default", &warm.url("/"), &[]),
        |r| injected(r, "authorization", "Bearer warm-secret"),
    );
    let envoy_pid = stack.envoy.pid();

    stack.server.kill9();
    // A credential never fetched: no answer from the control plane → 503, fail closed.
    for _ in 0..6 {
        let started = Instant::now();
        let response = stack.get_as(&token, "default", &cold.url("/v1/x"), &[]);
        assert_refused(&response, 503, "control_plane_unavailable");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "answered within the callout timeout: {:?}",
            started.elapsed()
        );
    }
    assert!(cold.received().is_empty(), "{:?}", cold.received());
    // A credential in the cache (60 s TTL) is still injected meanwhile.
    for _ in 0..4 {
        let response = stack.get_as(&token, "default", &warm.url("/"), &[]);
        assert!(
            injected(&response, "authorization", "Bearer warm-secret"),
            "{response:?}"
        );
    }

    // Same data dir and socket path; Envoy is not touched.
    stack.server.restart();
    on_every_worker(
        &stack.envoy,
        CHANGE,
        STREAK,
        || stack.get_as(&token, "default", &cold.url("/v1/x"), &[]),
        |r| injected(r, "authorization", "Bearer cold-secret"),
    );
    // Snapshot polling recovered too: a change made after the restart arrives.
    stack.set_credential("default", "COLD_KEY", "cold-secret-2");
    on_every_worker(
        &stack.envoy,
        CHANGE,
        STREAK,
        || stack.get_as(&token, "default", &cold.url("/v1/x"), &[]),
        |r| injected(r, "authorization", "Bearer cold-secret-2"),
    );
    assert_eq!(stack.envoy.pid(), envoy_pid, "Envoy was not restarted");
}

#[test]
fn a_credential_value_that_cannot_go_into_a_header_gets_502_and_nothing_is_forwarded() {
    let stack = Stack::start();
    let (crlf, nul, colon) = (Echo::plain(), Echo::plain(), Echo::plain());
    // The control plane stores any value (a PEM has newlines); the filter must refuse
    // to put one into a header rather than split the request.
    stack.set_credential("default", "CRLF_KEY", "crlf-secret\r\nX-Injected: evil");
    stack.set_credential("default", "NUL_KEY", "nul-secret\u{0}rest");
    stack.set_credential("default", "COLON_USER", "user:with-colon");
    stack.set_credential("default", "PASS", "colon-pass-secret");
    stack.add_service(
        "default",
        bearer_service("crlf", &crlf.authority(), "CRLF_KEY"),
    );
    stack.add_service(
        "default",
        bearer_service("nul", &nul.authority(), "NUL_KEY"),
    );
    stack.add_service(
        "default",
        json!({"name": "colon", "host": colon.authority(), "upstream_tls": false,
               "auth": {"type": "basic", "username": "COLON_USER", "password": "PASS"}}),
    );
    let token = stack.create_agent("splitter", &["default"]);
    for (echo, key, value) in [
        (&crlf, "CRLF_KEY", "crlf-secret"),
        (&nul, "NUL_KEY", "nul-secret"),
        (&colon, "COLON_USER", "colon-pass-secret"),
    ] {
        let response = on_every_worker(
            &stack.envoy,
            FIRST_SNAPSHOT,
            STREAK,
            || stack.get_as(&token, "default", &echo.url("/v1/x"), &[]),
            |r| r.status != 407 && r.status != 403,
        );
        let body = assert_refused(&response, 502, "invalid_credential_value");
        assert_eq!(body["key"], key, "{body}");
        assert!(!response.body.contains(value), "{body}");
        assert!(response.header("x-injected").is_none());
        assert!(echo.received().is_empty(), "{:?}", echo.received());
    }
}

#[test]
fn a_request_body_and_concurrent_requests_survive_the_pause_for_a_credential_fetch() {
    // No credential cache: every request pauses for a fetch from the control plane.
    let stack = Stack::start_with(ServerOptions::default(), |options| EnvoyOptions {
        credential_cache_ttl_ms: 0,
        ..options
    });
    let echo = Echo::plain();
    stack.set_credential("default", "BODY_KEY", "body-secret");
    stack.add_service(
        "default",
        bearer_service("uploads", &echo.authority(), "BODY_KEY"),
    );
    let token = stack.create_agent("uploader", &["default"]);
    let auth = proxy_basic(&token, "default");
    let url = echo.url("/v1/upload");
    on_every_worker(
        &stack.envoy,
        FIRST_SNAPSHOT,
        STREAK,
        || stack.get_as(&token, "default", &url, &[]),
        |r| injected(r, "authorization", "Bearer body-secret"),
    );

    // Bodies small and large (the large one arrives while the request is paused).
    for size in [16, 64 * 1024, 512 * 1024] {
        echo.clear();
        let body: String = (0..size).map(|i| (b'a' + (i % 26) as u8) as char).collect();
        let response = stack.envoy.request(
            "POST",
            &url,
            &[
                ("Proxy-Authorization", auth.as_str()),
                ("Content-Type", "application/octet-stream"),
            ],
            Some(body.as_bytes()),
        );
        assert!(
            injected(&response, "authorization", "Bearer body-secret"),
            "POST with a {size}-byte body: {} {:?} {}",
            response.status,
            response.headers,
            &response.body[..response.body.len().min(300)]
        );
        let received = echo.received();
        assert_eq!(received.len(), 1, "{size}: one request upstream");
        assert_eq!(received[0]["method"], "POST");
        assert!(
            received[0]["body"] == body.as_str(),
            "{size}: the body arrived intact ({} bytes)",
            received[0]["body"].as_str().map(str::len).unwrap_or(0)
        );
    }

    // Many at once: concurrent misses on a worker share one fetch, and every waiting
    // request is finished with the credential.
    echo.clear();
    let port = stack.envoy.port;
    let threads: Vec<_> = (0..24)
        .map(|i| {
            let url = echo.url(&format!("/v1/concurrent/{i}"));
            let auth = auth.clone();
            std::thread::spawn(move || {
                proxy_get(port, &url, &[("Proxy-Authorization", auth.as_str())])
            })
        })
        .collect();
    for (i, thread) in threads.into_iter().enumerate() {
        let response = thread.join().expect("request thread");
        assert!(
            injected(&response, "authorization", "Bearer body-secret"),
            "concurrent request {i}: {} {}",
            response.status,
            response.body
        );
    }
    assert_eq!(echo.received().len(), 24);
}

// --- 3. propagation, measured ---------------------------------------------------------

/// How long after an acknowledged write requests showed the change.
#[derive(Debug)]
struct Propagation {
    /// The first request that showed it.
    first: Duration,
    /// The first request of the run that showed it until the end of the window (from
    /// then on, every request on every worker did).
    everywhere: Duration,
}

/// Samples `request` every ~20 ms from `ack` until `window` has passed. Every response
/// must show either the old state or the new one; once new, it must stay new.
#[track_caller]
fn measure(
    envoy: &Envoy,
    what: &str,
    ack: Instant,
    window: Duration,
    mut request: impl FnMut() -> HttpResponse,
    old: impl Fn(&HttpResponse) -> bool,
    new: impl Fn(&HttpResponse) -> bool,
) -> Propagation {
    let mut first = None;
    let mut everywhere: Option<(Duration, Vec<u64>)> = None;
    let mut samples = 0;
    loop {
        let workers_before = envoy.worker_connections();
        let response = request();
        let at = ack.elapsed();
        samples += 1;
        if new(&response) {
            first.get_or_insert(at);
            if everywhere.is_none() {
                everywhere = Some((at, workers_before));
            }
        } else {
            assert!(
                old(&response),
                "{what}: neither the old nor the new state at {at:?}: {} {:?} {}",
                response.status,
                response.headers,
                response.body
            );
            everywhere = None;
        }
        if at >= window {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let first = first.unwrap_or_else(|| panic!("{what}: never visible within {window:?}"));
    let (everywhere, workers_at) =
        everywhere.unwrap_or_else(|| panic!("{what}: still stale at the end of {window:?}"));
    let workers_now = envoy.worker_connections();
    assert!(
        workers_now.len() == 2 && workers_now.iter().zip(&workers_at).all(|(n, b)| n > b),
        "{what}: the run after {everywhere:?} did not reach both workers \
         ({workers_at:?} → {workers_now:?})"
    );
    let result = Propagation { first, everywhere };
    println!("propagation of {what}: {result:?} ({samples} requests sampled)");
    result
}

#[test]
fn a_credential_change_a_credential_delete_an_agent_revoke_and_a_service_disable_reach_every_worker_within_1_5_s(
) {
    // A long cache TTL: the change must come through the snapshot version, not expiry.
    let stack = Stack::start_with(ServerOptions::default(), |options| EnvoyOptions {
        credential_cache_ttl_ms: 3_600_000,
        snapshot_poll_ms: 1000,
        ..options
    });
    let (a, b, c) = (Echo::plain(), Echo::plain(), Echo::plain());
    stack.set_credential("default", "KEY_A", "prop-a-v1");
    stack.set_credential("default", "KEY_B", "prop-b-v1");
    stack.set_credential("default", "KEY_C", "prop-c-v1");
    stack.add_service("default", bearer_service("svc-a", &a.authority(), "KEY_A"));
    stack.add_service("default", bearer_service("svc-b", &b.authority(), "KEY_B"));
    stack.add_service("default", bearer_service("svc-c", &c.authority(), "KEY_C"));
    let token = stack.create_agent("prop", &["default"]);
    let doomed = stack.create_agent("doomed", &["default"]);
    let limit = Duration::from_millis(1500);
    let window = Duration::from_millis(2000);
    let get = |agent: &str, echo: &Echo| stack.get_as(agent, "default", &echo.url("/p"), &[]);
    // Both workers fetch and cache the value (1 h TTL) before each change.
    let warm = |agent: &str, echo: &Echo, value: &str| {
        on_every_worker(
            &stack.envoy,
            FIRST_SNAPSHOT,
            STREAK,
            || get(agent, echo),
            |r| injected(r, "authorization", &format!("Bearer {value}")),
        );
    };
    let mut results = Vec::new();

    warm(&token, &a, "prop-a-v1");
    stack.set_credential("default", "KEY_A", "prop-a-v2");
    let ack = Instant::now();
    results.push((
        "credential change",
        measure(
            &stack.envoy,
            "credential change",
            ack,
            window,
            || get(&token, &a),
            |r| injected(r, "authorization", "Bearer prop-a-v1"),
            |r| injected(r, "authorization", "Bearer prop-a-v2"),
        ),
    ));

    warm(&token, &b, "prop-b-v1");
    stack.delete_credentials("default", &["KEY_B"]);
    let ack = Instant::now();
    results.push((
        "credential delete",
        measure(
            &stack.envoy,
            "credential delete",
            ack,
            window,
            || get(&token, &b),
            |r| injected(r, "authorization", "Bearer prop-b-v1"),
            |r| is_refusal(r, 502, "credential_not_found"),
        ),
    ));

    warm(&token, &c, "prop-c-v1");
    stack.set_service_enabled("default", "svc-c", false);
    let ack = Instant::now();
    results.push((
        "service disable",
        measure(
            &stack.envoy,
            "service disable",
            ack,
            window,
            || get(&token, &c),
            |r| injected(r, "authorization", "Bearer prop-c-v1"),
            |r| is_refusal(r, 403, "service_disabled"),
        ),
    ));

    warm(&doomed, &a, "prop-a-v2");
    stack.revoke_agent("doomed");
    let ack = Instant::now();
    results.push((
        "agent revoke",
        measure(
            &stack.envoy,
            "agent revoke",
            ack,
            window,
            || get(&doomed, &a),
            |r| injected(r, "authorization", "Bearer prop-a-v2"),
            |r| is_refusal(r, 407, "invalid_token"),
        ),
    ));

    for (what, result) in &results {
        assert!(
            result.everywhere <= limit,
            "{what} took {:?} to reach every worker (first seen after {:?}); the limit is {limit:?}",
            result.everywhere,
            result.first
        );
    }
}

// --- 4. host matcher priorities -------------------------------------------------------

#[test]
fn the_host_matcher_prefers_exact_hosts_then_specific_ports_then_the_longest_path_through_envoy() {
    let stack = Stack::start();
    let (named, p2, p3, paths) = (Echo::plain(), Echo::plain(), Echo::plain(), Echo::plain());
    for (key, value) in [
        ("WILD", "wild-secret"),
        ("EXACT", "exact-secret"),
        ("EXACT_V1", "exact-v1-secret"),
        ("ANY_PORT", "any-port-secret"),
        ("ONE_PORT", "one-port-secret"),
        ("V1", "v1-secret"),
        ("ADMIN", "admin-secret"),
        ("STATUS", "status-secret"),
    ] {
        stack.set_credential("default", key, value);
    }
    let n = named.port;
    let pp = paths.port;
    // Each less specific rule is declared first, so declaration order cannot be what
    // makes the more specific one win.
    for (name, host, key) in [
        ("wild", format!("*.localhost:{n}"), "WILD"),
        ("exact", format!("api.localhost:{n}"), "EXACT"),
        ("exact-v1", format!("www.localhost:{n}/v1/*"), "EXACT_V1"),
        ("any-port", "localhost".to_string(), "ANY_PORT"),
        ("one-port", p2.authority(), "ONE_PORT"),
        ("v1", format!("127.0.0.1:{pp}/v1/*"), "V1"),
        ("admin", format!("127.0.0.1:{pp}/v1/admin/*"), "ADMIN"),
        ("status", format!("127.0.0.1:{pp}/v1/status"), "STATUS"),
    ] {
        stack.add_service("default", bearer_service(name, &host, key));
    }
    let token = stack.create_agent("matcher", &["default"]);
    on_every_worker(
        &stack.envoy,
        FIRST_SNAPSHOT,
        STREAK,
        || stack.get_as(&token, "default", &p2.url("/"), &[]),
        |r| injected(r, "authorization", "Bearer one-port-secret"),
    );

    // Envoy's resolver (c-ares) answers `*.localhost` names with loopback here
    // (RFC 6761), so the wildcard cases reach the echo too and show the header.
    // (url, upstream, the credential it must carry)
    let cases: Vec<(String, &Echo, &str)> = vec![
        // exact host over wildcard
        (
            format!("http://api.localhost:{n}/x"),
            &named,
            "exact-secret",
        ),
        (
            format!("http://API.Localhost:{n}/x"),
            &named,
            "exact-secret",
        ),
        (
            format!("http://other.localhost:{n}/x"),
            &named,
            "wild-secret",
        ),
        // an exact host whose path does not match falls back to the wildcard
        (
            format!("http://www.localhost:{n}/v1/x"),
            &named,
            "exact-v1-secret",
        ),
        (
            format!("http://www.localhost:{n}/other"),
            &named,
            "wild-secret",
        ),
        // specific port over a rule without a port
        (p2.url("/x"), &p2, "one-port-secret"),
        // longest literal path prefix; exact path over prefix
        (
            format!("http://127.0.0.1:{pp}/v1/users"),
            &paths,
            "v1-secret",
        ),
        (
            format!("http://127.0.0.1:{pp}/v1/admin/users"),
            &paths,
            "admin-secret",
        ),
        (
            format!("http://127.0.0.1:{pp}/v1/admin/"),
            &paths,
            "admin-secret",
        ),
        (
            format!("http://127.0.0.1:{pp}/v1/status"),
            &paths,
            "status-secret",
        ),
        (
            format!("http://127.0.0.1:{pp}/v1/status?verbose=1"),
            &paths,
            "status-secret",
        ),
        (
            format!("http://127.0.0.1:{pp}/v1/status/more"),
            &paths,
            "v1-secret",
        ),
        (
            format!("http://127.0.0.1:{pp}/v1/statusx"),
            &paths,
            "v1-secret",
        ),
        // dot segments are resolved by Envoy before the filter matches
        (
            format!("http://127.0.0.1:{pp}/v1/./admin/users"),
            &paths,
            "admin-secret",
        ),
        (
            format!("http://127.0.0.1:{pp}/v1/admin/../users"),
            &paths,
            "v1-secret",
        ),
    ];
    for (url, echo, secret) in &cases {
        echo.clear();
        let response = stack.get_as(&token, "default", url, &[]);
        assert!(
            injected(&response, "authorization", &format!("Bearer {secret}")),
            "{url} should carry {secret}: {} {}",
            response.status,
            response.body
        );
        assert_eq!(echo.received().len(), 1, "{url} reached its upstream");
    }
    // No rule matches: a deeper name (a wildcard covers one label), another path,
    // another port of a plain-HTTP rule without a port (it means port 80 only).
    for (url, host) in [
        (p3.url("/x"), p3.authority()),
        (
            format!("http://a.b.localhost:{n}/x"),
            format!("a.b.localhost:{n}"),
        ),
        (
            format!("http://127.0.0.1:{pp}/v2/x"),
            format!("127.0.0.1:{pp}"),
        ),
        (
            format!("http://127.0.0.1:{pp}/v1/admin/../../v2/x"),
            format!("127.0.0.1:{pp}"),
        ),
    ] {
        let body = assert_refused(
            &stack.get_as(&token, "default", &url, &[]),
            403,
            "forbidden",
        );
        assert_eq!(
            body["proposal_hint"]["host"],
            host.as_str(),
            "{url}: {body}"
        );
    }

    // The request log names the service each request matched.
    let expected = [
        ("api.localhost", "/x", "exact"),
        ("other.localhost", "/x", "wild"),
        ("www.localhost", "/v1/x", "exact-v1"),
        ("www.localhost", "/other", "wild"),
        ("127.0.0.1", "/v1/admin/users", "admin"),
        ("127.0.0.1", "/v1/status", "status"),
    ];
    let records = wait_for_records(&stack, "default", |records| {
        expected.iter().all(|(host, path, _)| {
            records
                .iter()
                .any(|r| r["host"] == *host && r["path"] == *path && r["status"] == 200)
        })
    });
    for (host, path, service) in expected {
        for record in records
            .iter()
            .filter(|r| r["host"] == host && r["path"] == path && r["status"] == 200)
        {
            assert_eq!(record["service"], service, "{record}");
        }
    }
}

// --- 5. request log -------------------------------------------------------------------

/// Polls the vault's request log until `done` holds (at most 8 s); returns the records.
#[track_caller]
fn wait_for_records(stack: &Stack, vault: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let records = stack.request_log(vault);
        if done(&records) {
            return records;
        }
        assert!(
            Instant::now() < deadline,
            "the request log did not get the expected records: {records:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn request_log_records_arrive_with_status_latency_and_names_but_no_secret_token_or_query() {
    let stack = Stack::start();
    let echo = Echo::plain();
    let secret = "sk_live_log_secret_9876";
    stack.set_credential("default", "LOG_KEY", secret);
    stack.add_service(
        "default",
        bearer_service("billing", &echo.authority(), "LOG_KEY"),
    );
    let token = stack.create_agent("logger", &["default"]);
    on_every_worker(
        &stack.envoy,
        FIRST_SNAPSHOT,
        STREAK,
        || stack.get_as(&token, "default", &echo.url("/warmup"), &[]),
        |r| r.status == 200,
    );
    let auth = proxy_basic(&token, "default");

    let started = Instant::now();
    let ok = stack.envoy.request(
        "GET",
        &echo.url("/v1/charges?api_key=SECRETQ&x=1"),
        &[("Proxy-Authorization", auth.as_str())],
        None,
    );
    assert!(
        injected(&ok, "authorization", &format!("Bearer {secret}")),
        "{ok:?}"
    );
    let denied = stack.envoy.request(
        "POST",
        "http://nowhere.example/v1/refunds?api_key=SECRETQ",
        &[("Proxy-Authorization", auth.as_str())],
        Some(b"{\"amount\": 1}"),
    );
    assert_refused(&denied, 403, "forbidden");
    // An unknown token naming the vault: 407.
    let unauthenticated = stack.envoy.get(
        &echo.url("/v1/probe?api_key=SECRETQ"),
        &[(
            "Proxy-Authorization",
            &proxy_basic(&unknown_token(), "default"),
        )],
    );
    assert_refused(&unauthenticated, 407, "invalid_token");

    let records = wait_for_records(&stack, "default", |records| {
        records.iter().any(|r| r["path"] == "/v1/charges")
            && records.iter().any(|r| r["path"] == "/v1/refunds")
    });
    println!("request log records arrived within {:?}", started.elapsed());
    let find = |path: &str| {
        records
            .iter()
            .find(|r| r["path"] == path)
            .unwrap_or_else(|| panic!("no record for {path}: {records:#?}"))
            .clone()
    };
    let record = find("/v1/charges");
    assert_eq!(record["status"], 200, "{record}");
    assert_eq!(record["agent"], "logger", "{record}");
    assert_eq!(record["vault"], "default", "{record}");
    assert_eq!(record["service"], "billing", "{record}");
    assert_eq!(record["method"], "GET", "{record}");
    assert_eq!(record["host"], "localhost", "{record}");
    assert!(record["error"].is_null(), "{record}");
    assert!(record["latency_ms"].is_u64(), "latency present: {record}");
    assert!(record["ts"].is_i64() || record["ts"].is_u64(), "{record}");

    let record = find("/v1/refunds");
    assert_eq!(record["status"], 403, "{record}");
    assert_eq!(record["error"], "forbidden", "{record}");
    assert_eq!(record["agent"], "logger", "{record}");
    assert_eq!(record["method"], "POST", "{record}");
    assert_eq!(record["host"], "nowhere.example", "{record}");
    assert!(record["service"].is_null(), "{record}");
    assert!(record["latency_ms"].is_u64(), "{record}");

    // The 407 came from an unauthenticated client: the filter knows no agent and no
    // vault for it, so it is in no vault's log (a client without a valid token must
    // not be able to write into, or flood, a vault's audit log).
    assert!(
        !records.iter().any(|r| r["path"] == "/v1/probe"),
        "an unauthenticated request was attributed to a vault: {records:#?}"
    );

    let text = Value::from(records.clone()).to_string();
    for needle in [secret, token.as_str(), "SECRETQ", "api_key", &auth[6..]] {
        assert!(
            !text.contains(needle),
            "{needle:?} in the request log: {text}"
        );
    }
    for record in &records {
        assert!(
            !record["path"].as_str().unwrap_or_default().contains('?'),
            "{record}"
        );
    }
}

// --- 6. security invariants -----------------------------------------------------------

#[test]
fn no_credential_value_or_agent_token_in_envoys_config_dump_the_snapshot_or_any_log() {
    let stack = Stack::start();
    let (one, two, three) = (Echo::plain(), Echo::plain(), Echo::plain());
    let secrets = [
        ("INV_TOKEN", "inv-bearer-secret-abc"),
        ("INV_USER", "inv-user-secret"),
        ("INV_PASS", "inv-pass-secret-def"),
        ("INV_GONE", "inv-deleted-secret-ghi"),
    ];
    for (key, value) in secrets {
        stack.set_credential("default", key, value);
    }
    stack.add_service(
        "default",
        bearer_service("one", &one.authority(), "INV_TOKEN"),
    );
    stack.add_service(
        "default",
        json!({"name": "two", "host": two.authority(), "upstream_tls": false,
               "auth": {"type": "basic", "username": "INV_USER", "password": "INV_PASS"}}),
    );
    stack.add_service(
        "default",
        bearer_service("three", &three.authority(), "INV_GONE"),
    );
    let token = stack.create_agent("invariant", &["default"]);
    on_every_worker(
        &stack.envoy,
        FIRST_SNAPSHOT,
        STREAK,
        || stack.get_as(&token, "default", &one.url("/?k=v"), &[]),
        |r| injected(r, "authorization", "Bearer inv-bearer-secret-abc"),
    );
    // Every path once: injected (cached and fetched), refused, failed fetch.
    for _ in 0..3 {
        assert_eq!(
            stack.get_as(&token, "default", &two.url("/"), &[]).status,
            200
        );
        assert_eq!(
            stack.get_as(&token, "default", &three.url("/"), &[]).status,
            200
        );
        assert_eq!(
            stack
                .get_as(&token, "default", "http://unknown.example/", &[])
                .status,
            403
        );
        assert_eq!(
            stack
                .envoy
                .get(
                    &one.url("/"),
                    &[("Proxy-Authorization", &format!("Bearer {token}x"))]
                )
                .status,
            407
        );
    }
    stack.delete_credentials("default", &["INV_GONE"]);
    on_every_worker(
        &stack.envoy,
        CHANGE,
        STREAK,
        || stack.get_as(&token, "default", &three.url("/"), &[]),
        |r| is_refusal(r, 502, "credential_not_found"),
    );

    let basic_pair = b64("inv-user-secret:inv-pass-secret-def");
    let proxy_auth = proxy_basic(&token, "default");
    let mut needles: Vec<&str> = secrets.iter().map(|(_, v)| *v).collect();
    needles.extend([
        token.as_str(),
        &token[7..],
        basic_pair.as_str(),
        &proxy_auth[6..],
    ]);
    let check = |what: &str, text: &str| {
        for needle in &needles {
            assert!(!text.contains(needle), "{needle:?} appears in {what}");
        }
    };

    let dump = stack.envoy.admin_get("/config_dump?include_eds");
    assert_eq!(dump.status, 200);
    assert!(
        dump.body.contains("agent_vault_control_plane") && dump.body.contains("snapshot_poll_ms"),
        "the dump shows the filter's configuration"
    );
    check("Envoy's /config_dump", &dump.body);

    let snapshot = socket_request(
        &stack.server.socket(),
        "GET /v1/dataplane/snapshot HTTP/1.1\r\nHost: agent-vault\r\nConnection: close\r\n\r\n",
    )
    .expect("a snapshot answer");
    assert!(snapshot.starts_with("HTTP/1.1 200"), "{snapshot}");
    assert!(
        snapshot.contains("\"invariant\"") && snapshot.contains("INV_TOKEN"),
        "the snapshot names the agent and the keys: {snapshot}"
    );
    check("the snapshot", &snapshot);

    // Stop both so their logs are complete.
    let mut stack = stack;
    let envoy_log = final_envoy_log(&mut stack.envoy);
    stack.server.stop();
    check("Envoy's log", &envoy_log);
    let server_log = stack.server.logs();
    assert!(!server_log.is_empty(), "the control plane logs something");
    check("the control plane's log", &server_log);
}

// --- 7. bad input ---------------------------------------------------------------------

#[test]
fn huge_or_invalid_headers_get_a_clear_4xx_and_envoy_keeps_serving() {
    let stack = Stack::start();
    let echo = Echo::plain();
    stack.set_credential("default", "KEY", "bad-input-secret");
    stack.add_service("default", bearer_service("echo", &echo.authority(), "KEY"));
    let token = stack.create_agent("fuzzer", &["default"]);
    let auth = proxy_basic(&token, "default");
    let url = echo.url("/v1/x");
    let normal = || stack.get_as(&token, "default", &url, &[]);
    let works = |r: &HttpResponse| injected(r, "authorization", "Bearer bad-input-secret");
    on_every_worker(&stack.envoy, FIRST_SNAPSHOT, STREAK, normal, works);
    echo.clear();

    // 60 KiB and 100 KiB headers: over Envoy's 60 KiB header limit.
    for size in [60 * 1024, 100 * 1024] {
        let big = "b".repeat(size);
        let response = stack.get_as(&token, "default", &url, &[("x-big", big.as_str())]);
        // Envoy's own answer, before any filter runs.
        assert_eq!(
            response.status,
            431,
            "{size} bytes of header: {} {:?} {}",
            response.status,
            response.headers,
            &response.body[..response.body.len().min(200)]
        );
        assert!(
            echo.received().is_empty(),
            "{size} bytes of header reached the upstream"
        );
        assert!(works(&normal()), "Envoy serves the next request");
        echo.clear();
    }
    // Invalid headers: a space in a name, a control character in a value.
    for bad in ["Bad Header: x\r\n", "x-ctl: a\u{1}b\r\n"] {
        let request = format!(
            "GET {url} HTTP/1.1\r\nHost: {}\r\nProxy-Authorization: {auth}\r\n{bad}\
             Connection: close\r\n\r\n",
            echo.authority()
        );
        let response = raw_request(stack.envoy.port, request.as_bytes());
        assert_eq!(
            response.status, 400,
            "{bad:?}: {} {}",
            response.status, response.body
        );
    }
    // A Proxy-Authorization that is not UTF-8: no credential the filter can read.
    let mut request = format!(
        "GET {url} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nProxy-Authorization: Basic ",
        echo.authority()
    )
    .into_bytes();
    request.extend_from_slice(&[0xff, 0xfe, 0x80, b'\r', b'\n', b'\r', b'\n']);
    let response = raw_request(stack.envoy.port, &request);
    assert_refused(&response, 407, "proxy_auth_required");
    assert!(
        echo.received().is_empty(),
        "none of these reached the upstream: {:?}",
        echo.received().len()
    );

    // A large header within the limit is forwarded intact, with the credential.
    let large = "l".repeat(30 * 1024);
    let seen = stack
        .get_as(&token, "default", &url, &[("x-large", large.as_str())])
        .echoed();
    assert_eq!(
        seen["headers"]["x-large"].as_str().map(str::len),
        Some(large.len())
    );
    assert_eq!(seen["headers"]["authorization"], "Bearer bad-input-secret");

    // Both workers' VMs are alive.
    on_every_worker(&stack.envoy, CHANGE, STREAK, normal, works);
    assert_eq!(stack.envoy.admin_get("/ready").status, 200);
    let mut stack = stack;
    let log = final_envoy_log(&mut stack.envoy);
    assert!(!log.contains(&token), "no agent token in Envoy's log");
}

#[test]
fn a_control_plane_answering_garbage_or_too_slowly_gets_503_and_nothing_is_forwarded() {
    let mut stack = fake_stack(Credentials::Answer(200, GOOD_VALUES.into()));
    let (fake, echo) = (&stack.fake, &stack.echo);
    let request = || stack.get("/v1/x");
    let works = |r: &HttpResponse| injected(r, "authorization", "Bearer fake-cp-secret");
    on_every_worker(&stack.envoy, FIRST_SNAPSHOT, STREAK, request, works);
    echo.clear();

    let garbage: [(u16, &str); 6] = [
        (200, "this is not JSON"),
        (200, "<html><body>502 Bad Gateway</body></html>"),
        (200, r#"{"values": 42}"#),
        (200, r#"{"values":{"FAKE_KEY":"truncated"#),
        (200, ""),
        (500, r#"{"error":"internal"}"#),
    ];
    for (status, body) in garbage {
        fake.set_credentials(Credentials::Answer(status, body.into()));
        let calls = fake.credential_calls();
        for _ in 0..4 {
            let response = request();
            assert_refused(&response, 503, "control_plane_unavailable");
            assert!(!response.body.contains("truncated"), "{}", response.body);
        }
        assert!(
            fake.credential_calls() > calls,
            "the filter asked the fake control plane"
        );
    }
    // Slower than callout_timeout_ms (500 ms): 503 once the callout times out.
    fake.set_credentials(Credentials::Slow(
        Duration::from_millis(1500),
        GOOD_VALUES.into(),
    ));
    for _ in 0..3 {
        let started = Instant::now();
        let response = request();
        assert_refused(&response, 503, "control_plane_unavailable");
        assert!(
            started.elapsed() < Duration::from_millis(1400),
            "answered at the callout timeout, not when the fake answered: {:?}",
            started.elapsed()
        );
    }
    assert!(
        echo.received().is_empty(),
        "no request was forwarded without its credential: {:?}",
        echo.received()
    );

    // The VMs keep serving.
    fake.set_credentials(Credentials::Answer(200, GOOD_VALUES.into()));
    on_every_worker(&stack.envoy, CHANGE, STREAK, request, works);
    let log = final_envoy_log(&mut stack.envoy);
    assert!(
        log.contains("credential fetch failed"),
        "the filter logs the failed fetches"
    );
    for needle in ["fake-cp-secret", "truncated", stack.token.as_str()] {
        assert!(!log.contains(needle), "{needle:?} in Envoy's log");
    }
}

#[test]
fn requests_waiting_for_a_slow_fetch_are_finished_even_when_the_client_that_started_it_disconnects()
{
    // Answers correctly, but after 300 ms (under the 500 ms callout timeout).
    let mut stack = fake_stack(Credentials::Slow(
        Duration::from_millis(300),
        GOOD_VALUES.into(),
    ));
    let (fake, echo, envoy, auth) = (&stack.fake, &stack.echo, &stack.envoy, &stack.auth);
    let works = |r: &HttpResponse| injected(r, "authorization", "Bearer fake-cp-secret");
    on_every_worker(envoy, FIRST_SNAPSHOT, STREAK, || stack.get("/warm"), works);

    for round in 0..3 {
        echo.clear();
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nProxy-Authorization: {auth}\r\nConnection: close\r\n\r\n",
            echo.url(&format!("/gone/{round}")),
            echo.authority()
        );
        // Clients that send, let the filter dispatch the fetch, and hang up before it
        // answers (their requests own the fetches), then clients that join those
        // fetches and wait for their answer.
        let calls = fake.credential_calls();
        for _ in 0..4 {
            let mut stream =
                std::net::TcpStream::connect(("127.0.0.1", envoy.port)).expect("connect");
            stream.write_all(request.as_bytes()).expect("send");
            // Long enough for the filter to dispatch the fetch, well before it answers.
            std::thread::sleep(Duration::from_millis(40));
            drop(stream);
        }
        let port = envoy.port;
        let waiting: Vec<_> = (0..6)
            .map(|i| {
                let url = echo.url(&format!("/stay/{round}/{i}"));
                let auth = auth.clone();
                std::thread::spawn(move || {
                    proxy_get(port, &url, &[("Proxy-Authorization", auth.as_str())])
                })
            })
            .collect();
        for (i, thread) in waiting.into_iter().enumerate() {
            let response = thread.join().expect("request thread");
            assert!(
                works(&response),
                "round {round}, waiting client {i}: {} {}",
                response.status,
                response.body
            );
        }
        println!(
            "round {round}: {} credential fetches",
            fake.credential_calls() - calls
        );
        for seen in echo.received() {
            assert_eq!(
                seen["headers"]["authorization"], "Bearer fake-cp-secret",
                "whatever reached the upstream carried its credential: {seen}"
            );
        }
    }
    on_every_worker(envoy, CHANGE, STREAK, || stack.get("/after"), works);
    final_envoy_log(&mut stack.envoy);
}

#[test]
fn a_snapshot_the_filter_cannot_parse_is_ignored_and_the_last_good_rules_keep_serving() {
    let mut stack = fake_stack(Credentials::Answer(200, GOOD_VALUES.into()));
    let fake = &stack.fake;
    let request = || stack.get("/v1/x");
    let works = |r: &HttpResponse| injected(r, "authorization", "Bearer fake-cp-secret");
    on_every_worker(&stack.envoy, FIRST_SNAPSHOT, STREAK, request, works);

    let garbage: [(&str, &[u8]); 3] = [
        ("\"garbage-1\"", b"{not json at all"),
        (
            "\"garbage-2\"",
            br#"{"version":"garbage-2","vaults":"nope","agents":[]}"#,
        ),
        ("\"garbage-3\"", b""),
    ];
    for (etag, body) in garbage {
        fake.set_snapshot(etag, body.to_vec());
        // Polls every 200 ms on each worker: wait until it was handed out many times.
        let served = wait_for(Duration::from_secs(5), || {
            (fake.snapshots_served() >= 6).then_some(())
        });
        assert!(
            served.is_some(),
            "the filter polled the bad snapshot ({etag})"
        );
        for _ in 0..(2 * STREAK) {
            let response = request();
            assert!(
                works(&response),
                "after the bad snapshot {etag}: {} {}",
                response.status,
                response.body
            );
        }
    }
    // A good snapshot again (the service now disabled) is picked up.
    let mut next = stack.snapshot.clone();
    next["version"] = json!("999999");
    next["vaults"][0]["services"][0]["enabled"] = json!(false);
    fake.set_snapshot("\"999999\"", next.to_string().into_bytes());
    on_every_worker(&stack.envoy, CHANGE, STREAK, request, |r| {
        is_refusal(r, 403, "service_disabled")
    });
    let log = final_envoy_log(&mut stack.envoy);
    assert!(
        log.contains("snapshot poll failed") && log.contains("keeping the last good"),
        "the filter logs the bad snapshot: {}",
        log.lines()
            .filter(|l| l.contains("agent-vault-filter"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
