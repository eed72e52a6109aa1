//! The management API in process: the whole TCP app ([`crate::server::app`]) driven
//! through `oneshot` over a temporary store, no socket and no binary. What needs a
//! real process (CLI parsing and output, `kill -9`, socket permissions, `--follow`)
//! stays in the end-to-end tests.

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use serde_json::{json, Value};

use crate::testing::{owner, secrets, Harness, Reply, MEMBER, OUTSIDER, OWNER, PASSWORD};

/// A request with an optional bearer token and JSON body.
fn call(method: Method, path: &str, token: Option<&str>, body: Option<Value>) -> Request<Body> {
    let mut request = Request::builder().method(method).uri(path);
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let body = match body {
        Some(value) => {
            request = request.header(header::CONTENT_TYPE, "application/json");
            Body::from(value.to_string())
        }
        None => Body::empty(),
    };
    request.body(body).unwrap()
}

fn raw(method: Method, path: &str, token: &str, body: impl Into<Body>) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(path)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.into())
        .unwrap()
}

impl Harness {
    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Reply {
        self.send(call(method, path, token, body)).await
    }

    fn vault_names(&self) -> Vec<String> {
        self.store()
            .list_vaults(&owner())
            .unwrap()
            .into_iter()
            .map(|v| v.name)
            .collect()
    }
}

#[tokio::test]
async fn health_needs_no_login_and_unknown_routes_get_a_json_404() {
    let h = Harness::new();
    let health = h.call(Method::GET, "/health", None, None).await;
    assert_eq!(
        (health.status, health.json()),
        (StatusCode::OK, json!({"status": "ok"}))
    );
    let missing = h.call(Method::GET, "/v1/no/such/route", None, None).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.error(), "not_found");
}

#[tokio::test]
async fn a_session_from_login_is_a_bearer_token_until_logout() {
    let h = Harness::new();
    let wrong = json!({"email": OWNER, "password": "not-the-password"});
    let refused = h
        .call(Method::POST, "/v1/auth/login", None, Some(wrong))
        .await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert_eq!(refused.error(), "invalid_credentials");

    let right = json!({"email": OWNER, "password": PASSWORD});
    let login = h
        .call(Method::POST, "/v1/auth/login", None, Some(right))
        .await;
    assert_eq!(login.status, StatusCode::OK, "{}", login.body);
    let token = login.json()["token"].as_str().unwrap().to_string();
    assert!(token.starts_with("av_sess_"), "{token}");

    let whoami = h
        .call(Method::GET, "/v1/auth/whoami", Some(&token), None)
        .await;
    assert_eq!(
        whoami.json(),
        json!({"kind": "user", "email": OWNER, "owner": true})
    );
    let logout = h
        .call(Method::POST, "/v1/auth/logout", Some(&token), None)
        .await;
    assert_eq!(logout.status, StatusCode::NO_CONTENT);
    let after = h
        .call(Method::GET, "/v1/auth/whoami", Some(&token), None)
        .await;
    assert_eq!(after.status, StatusCode::UNAUTHORIZED);
    assert_eq!(after.error(), "unauthorized");
}

#[tokio::test]
async fn registering_after_the_owner_needs_an_invite() {
    let h = Harness::new();
    let body = json!({"email": "new@example.com", "password": "long-enough-1"});
    let reply = h
        .call(Method::POST, "/v1/auth/register", None, Some(body))
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(reply.error(), "invite_required");
}

#[tokio::test]
async fn every_management_route_needs_a_token() {
    let h = Harness::new();
    for (method, path) in [
        (Method::GET, "/v1/vaults"),
        (Method::GET, "/v1/vaults/default/credentials"),
        (Method::POST, "/v1/vaults/default/credentials"),
        (Method::GET, "/v1/agents"),
        (Method::POST, "/v1/proposals"),
        (Method::POST, "/v1/master-key/rotate"),
    ] {
        let reply = h.call(method.clone(), path, None, None).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{method} {path}");
        assert_eq!(reply.error(), "unauthorized", "{method} {path}");
        let forged = h
            .call(method.clone(), path, Some("av_sess_forged"), None)
            .await;
        assert_eq!(forged.status, StatusCode::UNAUTHORIZED, "{method} {path}");
    }
}

#[tokio::test]
async fn bad_bodies_are_refused_with_their_code_and_change_nothing() {
    let h = Harness::new();
    let token = h.session(OWNER);
    let before = h.vault_names();
    let oversized = format!("{{\"name\":\"{}\"}}", "a".repeat(1024 * 1024));
    #[rustfmt::skip]
    let cases: [(&str, Request<Body>, StatusCode, &str); 5] = [
        ("malformed JSON", raw(Method::POST, "/v1/vaults", &token, "{\"name\":"), StatusCode::BAD_REQUEST, "invalid_json"),
        ("an unknown field", raw(Method::POST, "/v1/vaults", &token, r#"{"name":"x1y","admin":true}"#), StatusCode::BAD_REQUEST, "invalid_request"),
        ("a wrong type", raw(Method::POST, "/v1/vaults", &token, r#"{"name":7}"#), StatusCode::BAD_REQUEST, "invalid_request"),
        ("an invalid vault name", raw(Method::POST, "/v1/vaults", &token, r#"{"name":"Not A Name"}"#), StatusCode::BAD_REQUEST, "invalid_vault_name"),
        ("a body over 1 MiB", raw(Method::POST, "/v1/vaults", &token, oversized), StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
    ];
    for (behaviour, request, status, code) in cases {
        let reply = h.send(request).await;
        assert_eq!(reply.status, status, "{behaviour}: {}", reply.body);
        assert_eq!(reply.error(), code, "{behaviour}");
    }
    assert_eq!(h.vault_names(), before);
}

#[tokio::test]
async fn an_agent_token_never_reads_a_credential_value() {
    let h = Harness::new();
    h.store()
        .set_credentials(
            &owner(),
            "default",
            &secrets(&[("STRIPE_KEY", "sk_live_secret")]),
        )
        .unwrap();
    let agent = h.agent_token.clone();

    let list = h
        .call(
            Method::GET,
            "/v1/vaults/default/credentials",
            Some(&agent),
            None,
        )
        .await;
    assert_eq!(list.status, StatusCode::OK);
    assert_eq!(list.json()[0]["key"], "STRIPE_KEY");
    for (path, code) in [
        ("/v1/vaults/default/credentials?reveal=true", "forbidden"),
        ("/v1/vaults/default/credentials/STRIPE_KEY", "forbidden"),
        ("/v1/vaults/default/logs", "forbidden"),
    ] {
        let reply = h.call(Method::GET, path, Some(&agent), None).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{path}");
        assert_eq!(reply.error(), code, "{path}");
    }
    let discover = h.call(Method::GET, "/discover", Some(&agent), None).await;
    assert_eq!(discover.json()["credentials"], json!(["STRIPE_KEY"]));
    for reply in [&list, &discover] {
        assert!(!reply.body.contains("sk_live_secret"), "{}", reply.body);
    }

    // A member reads it.
    let member = h.session(MEMBER);
    let get = h
        .call(
            Method::GET,
            "/v1/vaults/default/credentials/STRIPE_KEY",
            Some(&member),
            None,
        )
        .await;
    assert_eq!(
        get.json(),
        json!({"key": "STRIPE_KEY", "value": "sk_live_secret"})
    );
}

#[tokio::test]
async fn a_vault_the_caller_is_not_in_is_not_found_not_forbidden() {
    let h = Harness::new();
    let outsider = h.session(OUTSIDER);
    for path in [
        "/v1/vaults/default/credentials",
        "/v1/vaults/default/services",
        "/v1/vaults/no-such-vault/credentials",
    ] {
        let reply = h.call(Method::GET, path, Some(&outsider), None).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(reply.error(), "vault_not_found", "{path}");
    }
}

#[tokio::test]
async fn a_proposal_is_raised_by_the_agent_and_decided_only_by_a_human() {
    let h = Harness::new();
    let agent = h.agent_token.clone();
    let proposal = json!({
        "services": [{"action": "set", "name": "stripe", "host": "api.stripe.com",
                      "auth": {"type": "bearer", "token": "STRIPE_KEY"}}],
        "credentials": [{"action": "set", "key": "STRIPE_KEY", "description": "Stripe API key"}],
        "user_message": "I need Stripe."
    });
    let created = h
        .call(Method::POST, "/v1/proposals", Some(&agent), Some(proposal))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let created = created.json();
    assert_eq!(created["status"], "pending");
    assert_eq!(created["vault"], "default");
    let url = created["approval_url"].as_str().unwrap();
    assert!(
        url.starts_with("http://127.0.0.1:14321/approve/1?token=av_appr_"),
        "{url}"
    );

    let values = json!({"values": {"STRIPE_KEY": "sk_test_1"}});
    let by_agent = h
        .call(
            Method::POST,
            "/v1/vaults/default/proposals/1/approve",
            Some(&agent),
            Some(values.clone()),
        )
        .await;
    assert_eq!(by_agent.status, StatusCode::FORBIDDEN);
    assert_eq!(by_agent.error(), "forbidden");

    // A service change is an admin's to approve (a member may approve credential-only
    // proposals).
    let member = h.session(MEMBER);
    let by_member = h
        .call(
            Method::POST,
            "/v1/vaults/default/proposals/1/approve",
            Some(&member),
            Some(values.clone()),
        )
        .await;
    assert_eq!(
        by_member.status,
        StatusCode::FORBIDDEN,
        "{}",
        by_member.body
    );
    let owner_session = h.session(OWNER);
    let approved = h
        .call(
            Method::POST,
            "/v1/vaults/default/proposals/1/approve",
            Some(&owner_session),
            Some(values),
        )
        .await;
    assert_eq!(approved.status, StatusCode::OK, "{}", approved.body);
    assert_eq!(approved.json()["status"], "applied");

    let seen = h
        .call(Method::GET, "/v1/proposals/1", Some(&agent), None)
        .await;
    assert_eq!(seen.json()["status"], "applied");
    assert!(!seen.body.contains("sk_test_1"), "{}", seen.body);
    let value = h.store().get_credential(&owner(), "default", "STRIPE_KEY");
    assert_eq!(
        value.map(|v| v.expose().to_string()).ok().as_deref(),
        Some("sk_test_1")
    );
}

#[tokio::test]
async fn an_agent_with_several_vaults_names_one_with_x_vault() {
    let h = Harness::new();
    let token = crate::testing::agent_on(h.store(), "multi", &["default", "other"]);
    let proposal = json!({"credentials": [{"key": "NEW_KEY", "description": "d"}]});
    let unnamed = h
        .call(
            Method::POST,
            "/v1/proposals",
            Some(&token),
            Some(proposal.clone()),
        )
        .await;
    assert_eq!(unnamed.status, StatusCode::BAD_REQUEST);
    assert_eq!(unnamed.error(), "vault_required");

    let mut named = call(Method::POST, "/v1/proposals", Some(&token), Some(proposal));
    named
        .headers_mut()
        .insert("x-vault", header::HeaderValue::from_static("other"));
    let reply = h.send(named).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    assert_eq!(reply.json()["vault"], "other");
}

#[tokio::test]
async fn the_api_takes_no_cookie_and_no_ui_session_only_a_bearer_token() {
    let h = Harness::new();
    let (view, _) = h
        .store()
        .create_proposal(
            &h.agent,
            "default",
            serde_json::from_value(
                json!({"credentials": [{"key": "NEW_KEY", "description": "d"}]}),
            )
            .unwrap(),
        )
        .unwrap();
    let approve = format!("/v1/vaults/default/proposals/{}/approve", view.id);
    // What a page on another local port can make the browser send: the UI's cookie,
    // a text/plain body (no CORS preflight).
    let ui_session = h.ui_session(OWNER);
    let forged = Request::builder()
        .method(Method::POST)
        .uri(&approve)
        .header(header::COOKIE, format!("av_session={ui_session}"))
        .header(header::CONTENT_TYPE, "text/plain")
        .header("origin", "http://127.0.0.1:8000")
        .body(Body::from(r#"{"values":{"NEW_KEY":"attacker"}}"#))
        .unwrap();
    let reply = h.send(forged).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.body);
    // The UI's session token is no bearer token either (a leaked cookie).
    let as_bearer = h
        .call(
            Method::GET,
            "/v1/vaults/default/credentials?reveal=true",
            Some(&ui_session),
            None,
        )
        .await;
    assert_eq!(as_bearer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        h.store()
            .get_proposal(&owner(), "default", view.id)
            .unwrap()
            .status,
        crate::proposals::ProposalStatus::Pending
    );
}

#[tokio::test]
async fn a_body_not_declared_as_json_is_refused_before_anything_changes() {
    let h = Harness::new();
    let token = h.session(OWNER);
    let before = h.vault_names();
    for content_type in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let mut request = Request::builder()
            .method(Method::POST)
            .uri("/v1/vaults")
            .header(header::AUTHORIZATION, format!("Bearer {token}"));
        if let Some(content_type) = content_type {
            request = request.header(header::CONTENT_TYPE, content_type);
        }
        let reply = h
            .send(request.body(Body::from(r#"{"name":"sneaky"}"#)).unwrap())
            .await;
        assert_eq!(
            reply.status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{content_type:?}"
        );
        assert_eq!(reply.error(), "unsupported_media_type");
    }
    // A body-less POST needs no content type.
    let reject = h
        .store()
        .create_proposal(
            &h.agent,
            "default",
            serde_json::from_value(json!({"credentials": [{"key": "NEW_KEY"}]})).unwrap(),
        )
        .unwrap()
        .0;
    let bodyless = Request::builder()
        .method(Method::POST)
        .uri(format!("/v1/vaults/default/proposals/{}/reject", reject.id))
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Body::empty())
        .unwrap();
    let reply = h.send(bodyless).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(h.vault_names(), before);
}

#[tokio::test]
async fn a_reviewer_sees_the_diff_and_must_acknowledge_its_warnings() {
    let h = Harness::new();
    h.store()
        .set_credentials(
            &owner(),
            "default",
            &secrets(&[("STRIPE_KEY", "sk_live_human")]),
        )
        .unwrap();
    crate::testing::add_stripe_service(h.store());
    let agent = h.agent_token.clone();
    let proposal = json!({"services": [{"name": "stripe", "host": "api.stripe.com",
        "auth": {"type": "bearer", "token": "STRIPE_KEY"}, "upstream_tls": false}]});
    let created = h
        .call(Method::POST, "/v1/proposals", Some(&agent), Some(proposal))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let owner_token = h.session(OWNER);
    let shown = h
        .call(
            Method::GET,
            "/v1/vaults/default/proposals/1",
            Some(&owner_token),
            None,
        )
        .await
        .json();
    assert_eq!(shown["diff"]["services"][0]["change"], "replace");
    assert_eq!(shown["diff"]["services"][0]["before"]["upstream_tls"], true);
    assert_eq!(shown["diff"]["services"][0]["after"]["upstream_tls"], false);
    assert_eq!(
        shown["diff"]["warnings"][0]["id"],
        "upstream_tls_off:stripe"
    );
    // The agent's own view has no diff.
    let own = h
        .call(Method::GET, "/v1/proposals/1", Some(&agent), None)
        .await
        .json();
    assert!(own.get("diff").is_none(), "{own}");

    let path = "/v1/vaults/default/proposals/1/approve";
    let refused = h
        .call(Method::POST, path, Some(&owner_token), Some(json!({})))
        .await;
    assert_eq!(refused.status, StatusCode::CONFLICT);
    assert_eq!(refused.error(), "warnings_not_acknowledged");
    assert!(refused.body.contains("plain HTTP"), "{}", refused.body);
    let approved = h
        .call(
            Method::POST,
            path,
            Some(&owner_token),
            Some(json!({"acknowledge": ["upstream_tls_off:stripe"]})),
        )
        .await;
    assert_eq!(approved.status, StatusCode::OK, "{}", approved.body);
}

#[tokio::test]
async fn answers_that_can_carry_values_are_never_stored_by_a_cache() {
    let h = Harness::new();
    h.store()
        .set_credentials(
            &owner(),
            "default",
            &secrets(&[("STRIPE_KEY", "sk_live_secret")]),
        )
        .unwrap();
    let member = h.session(MEMBER);
    for path in [
        "/v1/vaults/default/credentials?reveal=true",
        "/v1/vaults/default/credentials/STRIPE_KEY",
        "/v1/vaults/default/credentials/NO_SUCH_KEY",
        "/v1/auth/whoami",
    ] {
        let reply = h.call(Method::GET, path, Some(&member), None).await;
        assert_eq!(
            reply
                .headers
                .get(header::CACHE_CONTROL)
                .map(|v| v.as_bytes()),
            Some(&b"no-store"[..]),
            "{path}: {}",
            reply.status
        );
    }
    let login = h
        .call(
            Method::POST,
            "/v1/auth/login",
            None,
            Some(json!({"email": OWNER, "password": PASSWORD})),
        )
        .await;
    assert_eq!(login.headers[header::CACHE_CONTROL], "no-store");
}

/// A request body that never sends another byte.
struct Stalled;

impl http_body::Body for Stalled {
    type Data = axum::body::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::task::Poll::Pending
    }
}

#[tokio::test(start_paused = true)]
async fn a_body_that_stops_arriving_is_answered_408_after_the_body_timeout() {
    let h = Harness::new();
    let token = h.session(OWNER);
    let request = Request::builder()
        .method(Method::POST)
        .uri("/v1/vaults")
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::new(Stalled))
        .unwrap();
    let started = tokio::time::Instant::now();
    let reply = tokio::time::timeout(crate::server::BODY_TIMEOUT * 2, h.send(request))
        .await
        .expect("no answer: the body would be waited for forever");
    assert_eq!(reply.status, StatusCode::REQUEST_TIMEOUT, "{}", reply.body);
    assert_eq!(reply.error(), "request_timeout");
    assert_eq!(started.elapsed(), crate::server::BODY_TIMEOUT);
}

#[tokio::test]
async fn patch_vault_sets_the_policy_the_passthrough_hosts_or_both_and_refuses_an_empty_change() {
    let h = Harness::new();
    let token = h.session(OWNER);
    let hosts = h
        .call(
            Method::PATCH,
            "/v1/vaults/default",
            Some(&token),
            Some(json!({"passthrough_hosts": ["pinned.example.com"]})),
        )
        .await;
    assert_eq!(hosts.status, StatusCode::OK, "{}", hosts.body);
    assert_eq!(
        hosts.json(),
        json!({"name": "default", "role": "admin", "unmatched_host_policy": "deny",
               "passthrough_hosts": ["pinned.example.com"]})
    );
    let policy = h
        .call(
            Method::PATCH,
            "/v1/vaults/default",
            Some(&token),
            Some(json!({"unmatched_host_policy": "passthrough"})),
        )
        .await;
    assert_eq!(
        policy.json()["passthrough_hosts"],
        json!(["pinned.example.com"]),
        "the list stays when only the policy changes"
    );
    let empty = h
        .call(
            Method::PATCH,
            "/v1/vaults/default",
            Some(&token),
            Some(json!({})),
        )
        .await;
    assert_eq!(empty.status, StatusCode::BAD_REQUEST);
    assert_eq!(empty.error(), "invalid_request");
    let path = h
        .call(
            Method::PATCH,
            "/v1/vaults/default",
            Some(&token),
            Some(json!({"passthrough_hosts": ["pinned.example.com/v1/*"]})),
        )
        .await;
    assert_eq!(path.status, StatusCode::BAD_REQUEST);
    assert_eq!(path.error(), "invalid_host");
    let member = h.session(MEMBER);
    let refused = h
        .call(
            Method::PATCH,
            "/v1/vaults/default",
            Some(&member),
            Some(json!({"passthrough_hosts": []})),
        )
        .await;
    assert!(
        refused.status == StatusCode::FORBIDDEN || refused.status == StatusCode::NOT_FOUND,
        "only an admin: {} {}",
        refused.status,
        refused.body
    );
}

#[tokio::test]
async fn the_proxy_ca_is_public_and_only_the_owner_rotates_it() {
    let h = Harness::new();
    let pem = h.call(Method::GET, "/v1/ca", None, None).await;
    assert_eq!(pem.status, StatusCode::OK);
    assert_eq!(
        pem.headers[header::CONTENT_TYPE],
        crate::api::PEM_CONTENT_TYPE
    );
    assert!(
        pem.body.starts_with("-----BEGIN CERTIFICATE-----"),
        "{}",
        pem.body
    );
    assert!(!pem.body.contains("PRIVATE"), "{}", pem.body);
    assert_eq!(
        pem.body,
        std::fs::read_to_string(h.store().ca_file()).unwrap(),
        "the API and <data-dir>/ca.pem agree"
    );

    let refused = [
        (None, StatusCode::UNAUTHORIZED),
        (Some(h.agent_token.clone()), StatusCode::FORBIDDEN),
        (Some(h.session(MEMBER)), StatusCode::FORBIDDEN),
    ];
    for (token, status) in refused {
        let answer = h
            .call(Method::POST, "/v1/ca/rotate", token.as_deref(), None)
            .await;
        assert_eq!(answer.status, status, "{}", answer.body);
    }
    let unchanged = h.call(Method::GET, "/v1/ca", None, None).await;
    assert_eq!(
        unchanged.body, pem.body,
        "a refused rotation changed nothing"
    );

    let owner = h.session(OWNER);
    let rotated = h
        .call(Method::POST, "/v1/ca/rotate", Some(&owner), None)
        .await;
    assert_eq!(rotated.status, StatusCode::OK, "{}", rotated.body);
    let summary = rotated.json();
    assert_eq!(summary["generation"], 2);
    assert_eq!(summary["reminted"], 0);
    let new_pem = h.call(Method::GET, "/v1/ca", None, None).await.body;
    assert_ne!(new_pem, pem.body);
    let der = crate::ca::pem_to_der(&new_pem).unwrap();
    assert_eq!(summary["fingerprint_sha256"], crate::ca::fingerprint(&der));
}

#[tokio::test]
async fn reveal_gives_a_reviewer_the_agents_value_and_an_agent_a_403() {
    let h = Harness::new();
    let agent = h.agent_token.clone();
    let created = h
        .call(
            Method::POST,
            "/v1/proposals",
            Some(&agent),
            Some(json!({"credentials": [
                {"key": "GENERATED_TOKEN", "value": "tok_check_me"},
                {"key": "HUMAN_KEY"}]})),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let path = "/v1/vaults/default/proposals/1";
    let plain = h
        .call(Method::GET, path, Some(&h.session(MEMBER)), None)
        .await;
    assert!(plain.json().get("values").is_none());
    assert!(!plain.body.contains("tok_check_me"));
    let revealed = h
        .call(
            Method::GET,
            &format!("{path}?reveal=true"),
            Some(&h.session(MEMBER)),
            None,
        )
        .await;
    assert_eq!(revealed.status, StatusCode::OK, "{}", revealed.body);
    assert_eq!(
        revealed.json()["values"],
        json!({"GENERATED_TOKEN": "tok_check_me"})
    );
    let refused = h
        .call(
            Method::GET,
            &format!("{path}?reveal=true"),
            Some(&agent),
            None,
        )
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.body);
    assert!(!refused.body.contains("tok_check_me"));
    // The agents' own route has no reveal: the query changes nothing.
    let own = h
        .call(
            Method::GET,
            "/v1/proposals/1?reveal=true",
            Some(&agent),
            None,
        )
        .await;
    assert!(own.json().get("values").is_none(), "{}", own.body);
    assert!(!own.body.contains("tok_check_me"));
}

#[tokio::test]
async fn a_services_methods_are_validated_stored_and_shown() {
    let h = Harness::new();
    let token = h.session(OWNER);
    let service = |methods: Value| {
        json!({"name": "ro", "host": "ro.example.com", "auth": {"type": "passthrough"},
               "methods": methods})
    };
    // (behaviour, methods, refused method quoted in the message)
    let cases: [(&str, Value, &str); 6] = [
        ("lowercase", json!(["get"]), "\"get\""),
        ("empty list", json!([]), "\"\""),
        ("duplicate", json!(["GET", "GET"]), "\"GET\""),
        ("TRACE", json!(["TRACE"]), "\"TRACE\""),
        ("CONNECT", json!(["CONNECT"]), "\"CONNECT\""),
        ("not a token", json!(["GE T"]), "\"GE T\""),
    ];
    for (behaviour, methods, quoted) in cases {
        let reply = h
            .call(
                Method::POST,
                "/v1/vaults/default/services",
                Some(&token),
                Some(service(methods)),
            )
            .await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{behaviour}: {}",
            reply.body
        );
        assert_eq!(reply.error(), "invalid_method", "{behaviour}");
        let message = reply.json()["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            message.starts_with(&format!("invalid method {quoted}")),
            "{behaviour}: {message}"
        );
    }
    let not_a_list = h
        .call(
            Method::POST,
            "/v1/vaults/default/services",
            Some(&token),
            Some(service(json!("GET"))),
        )
        .await;
    assert_eq!(
        not_a_list.status,
        StatusCode::BAD_REQUEST,
        "{}",
        not_a_list.body
    );
    let listed = h
        .call(
            Method::GET,
            "/v1/vaults/default/services",
            Some(&token),
            None,
        )
        .await;
    assert!(
        !listed.body.contains("\"ro\""),
        "nothing stored: {}",
        listed.body
    );

    let added = h
        .call(
            Method::POST,
            "/v1/vaults/default/services",
            Some(&token),
            Some(service(json!(["POST", "GET"]))),
        )
        .await;
    assert!(added.status.is_success(), "{}", added.body);
    let listed = h
        .call(
            Method::GET,
            "/v1/vaults/default/services",
            Some(&token),
            None,
        )
        .await;
    assert!(
        listed.body.contains(r#""methods":["POST","GET"]"#),
        "kept as given: {}",
        listed.body
    );

    // A proposal's service is validated the same way.
    let agent = h.agent_token.clone();
    let proposal = json!({"services": [{"name": "ro2", "host": "ro2.example.com",
        "auth": {"type": "passthrough"}, "methods": ["get"]}]});
    let refused = h
        .call(Method::POST, "/v1/proposals", Some(&agent), Some(proposal))
        .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{}", refused.body);
    assert!(refused.body.contains("invalid method"), "{}", refused.body);
    let proposal = json!({"services": [{"name": "ro2", "host": "ro2.example.com",
        "auth": {"type": "passthrough"}, "methods": ["GET"]}]});
    let created = h
        .call(Method::POST, "/v1/proposals", Some(&agent), Some(proposal))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let shown = h
        .call(Method::GET, "/v1/proposals/1", Some(&agent), None)
        .await;
    assert_eq!(
        shown.json()["services"][0]["methods"],
        json!(["GET"]),
        "{}",
        shown.body
    );
}

#[tokio::test]
async fn a_services_rate_limit_is_validated_stored_and_shown() {
    let h = Harness::new();
    let token = h.session(OWNER);
    let service = |limit: Value| {
        json!({"name": "limited", "host": "limited.example.com",
               "auth": {"type": "passthrough"}, "rate_limit": limit})
    };
    for (behaviour, limit) in [
        ("zero", json!({"requests": 0, "per": "second"})),
        ("too many", json!({"requests": 1_000_001, "per": "minute"})),
        ("unknown period", json!({"requests": 5, "per": "hour"})),
        ("no period", json!({"requests": 5})),
        ("a string", json!("10/s")),
    ] {
        let reply = h
            .call(
                Method::POST,
                "/v1/vaults/default/services",
                Some(&token),
                Some(service(limit)),
            )
            .await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{behaviour}: {}",
            reply.body
        );
    }
    let zero = h
        .call(
            Method::POST,
            "/v1/vaults/default/services",
            Some(&token),
            Some(service(json!({"requests": 0, "per": "second"}))),
        )
        .await;
    assert_eq!(zero.error(), "invalid_rate_limit", "{}", zero.body);
    let limit = json!({"requests": 600, "per": "minute"});
    let added = h
        .call(
            Method::POST,
            "/v1/vaults/default/services",
            Some(&token),
            Some(service(limit.clone())),
        )
        .await;
    assert_eq!(added.status, StatusCode::CREATED, "{}", added.body);
    let listed = h
        .call(
            Method::GET,
            "/v1/vaults/default/services",
            Some(&token),
            None,
        )
        .await;
    let shown = listed.json();
    let limited = shown
        .as_array()
        .and_then(|all| all.iter().find(|s| s["name"] == "limited").cloned())
        .unwrap_or_default();
    assert_eq!(limited["rate_limit"], limit, "{shown}");
}

#[tokio::test]
async fn a_services_substitutions_are_validated_stored_listed_and_discovered_without_values() {
    let h = Harness::new();
    let token = h.session(OWNER);
    h.store()
        .set_credentials(
            &owner(),
            "default",
            &secrets(&[("BOT_TOKEN", "123456:secret-bot-token")]),
        )
        .unwrap();
    let service = |substitutions: Value| {
        json!({"name": "bot", "host": "api.telegram.org",
               "auth": {"type": "passthrough"}, "substitutions": substitutions})
    };
    #[rustfmt::skip]
    let refused: &[(&str, Value, &str)] = &[
        ("a placeholder without __", json!([{"key": "BOT_TOKEN", "placeholder": "BOT_TOKEN_X", "in": ["path"]}]), "starts and ends with __"),
        ("a lowercase placeholder", json!([{"key": "BOT_TOKEN", "placeholder": "__bot_token__", "in": ["path"]}]), "only A-Z, 0-9 and _"),
        ("an empty in", json!([{"key": "BOT_TOKEN", "placeholder": "__BOT_TOKEN__", "in": []}]), "at least one of path, query, header, body"),
        ("an unknown surface", json!([{"key": "BOT_TOKEN", "placeholder": "__BOT_TOKEN__", "in": ["cookie"]}]), "unknown variant `cookie`"),
        ("colliding placeholders", json!([{"key": "BOT_TOKEN", "placeholder": "__BOT_TOKEN__", "in": ["path"]},
                                          {"key": "OTHER", "placeholder": "__BOT_TOKEN__2__", "in": ["query"]}]), "collides"),
        ("a bad key", json!([{"key": "bot-token", "placeholder": "__BOT_TOKEN__", "in": ["path"]}]), "UPPER_SNAKE_CASE"),
    ];
    for (behaviour, substitutions, reason) in refused {
        let reply = h
            .call(
                Method::POST,
                "/v1/vaults/default/services",
                Some(&token),
                Some(service(substitutions.clone())),
            )
            .await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{behaviour}: {}",
            reply.body
        );
        assert_eq!(reply.error(), "invalid_substitution", "{behaviour}");
        let message = reply.json()["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(message.contains(reason), "{behaviour}: {message}");
    }
    // The same rules hold when replacing every service at once.
    let replaced = h
        .call(
            Method::PUT,
            "/v1/vaults/default/services",
            Some(&token),
            Some(json!({"services": [service(json!([{"key": "BOT_TOKEN",
                "placeholder": "__BOT_TOKEN__", "in": ["path", "path"]}]))]})),
        )
        .await;
    assert_eq!(
        replaced.error(),
        "invalid_substitution",
        "{}",
        replaced.body
    );

    let declared =
        json!([{"key": "BOT_TOKEN", "placeholder": "__BOT_TOKEN__", "in": ["path", "query"]}]);
    let mut unredacted = service(declared.clone());
    unredacted["redact_responses"] = json!(false);
    let added = h
        .call(
            Method::POST,
            "/v1/vaults/default/services",
            Some(&token),
            Some(unredacted),
        )
        .await;
    assert_eq!(added.status, StatusCode::CREATED, "{}", added.body);
    let listed = h
        .call(
            Method::GET,
            "/v1/vaults/default/services",
            Some(&token),
            None,
        )
        .await;
    let shown = listed.json();
    let bot = shown
        .as_array()
        .and_then(|all| all.iter().find(|s| s["name"] == "bot").cloned())
        .unwrap_or_default();
    assert_eq!(bot["substitutions"], declared, "{shown}");
    assert_eq!(bot["redact_responses"], false, "{shown}");

    // An agent discovers what to write and where, and that responses are not
    // redacted; never the value.
    let discover = h
        .call(Method::GET, "/discover", Some(&h.agent_token), None)
        .await;
    assert_eq!(discover.status, StatusCode::OK, "{}", discover.body);
    let services = discover.json()["services"].clone();
    let found = services
        .as_array()
        .and_then(|all| all.iter().find(|s| s["name"] == "bot").cloned())
        .unwrap_or_default();
    assert_eq!(found["substitutions"], declared, "{services}");
    assert_eq!(found["redact_responses"], false, "{services}");
    assert!(
        !discover.body.contains("secret-bot-token"),
        "{}",
        discover.body
    );
    // A service without substitutions shows none, and redaction on.
    let mut plain = service(json!([]));
    plain["name"] = json!("plain");
    plain["host"] = json!("plain.example.com");
    let added = h
        .call(
            Method::POST,
            "/v1/vaults/default/services",
            Some(&token),
            Some(plain),
        )
        .await;
    assert_eq!(added.status, StatusCode::CREATED, "{}", added.body);
    let discover = h
        .call(Method::GET, "/discover", Some(&h.agent_token), None)
        .await;
    let plain = discover.json()["services"]
        .as_array()
        .and_then(|all| all.iter().find(|s| s["name"] == "plain").cloned())
        .unwrap_or_default();
    assert!(plain.get("substitutions").is_none(), "{plain}");
    assert_eq!(plain["redact_responses"], true, "{plain}");

    // A proposal: an unknown surface has the same code; another bad substitution is
    // the proposal's 400 with the substitution's reason.
    for (substitutions, code, reason) in [
        (
            json!([{"key": "BOT_TOKEN", "placeholder": "__BOT_TOKEN__", "in": ["cookie"]}]),
            "invalid_substitution",
            "unknown variant `cookie`",
        ),
        (
            json!([{"key": "BOT_TOKEN", "placeholder": "__BOT_TOKEN__", "in": []}]),
            "invalid_proposal",
            "invalid substitution \"__BOT_TOKEN__\"",
        ),
    ] {
        let mut proposed = service(substitutions);
        proposed["name"] = json!("proposed");
        let reply = h
            .call(
                Method::POST,
                "/v1/proposals",
                Some(&h.agent_token),
                Some(json!({"services": [proposed]})),
            )
            .await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
        assert_eq!(reply.error(), code, "{}", reply.body);
        let message = reply.json()["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(message.contains(reason), "{message}");
    }
}

#[tokio::test]
async fn an_h2c_upstream_is_plain_http_only_stored_listed_and_discovered() {
    let h = Harness::new();
    let token = h.session(OWNER);
    let service = |tls: Option<bool>, h2c: Value| {
        let mut service = json!({"name": "grpc", "host": "grpc.example.com:50051",
                                 "auth": {"type": "passthrough"}, "upstream_h2c": h2c});
        if let Some(tls) = tls {
            service["upstream_tls"] = json!(tls);
        }
        service
    };
    let add = |body: Value| {
        h.call(
            Method::POST,
            "/v1/vaults/default/services",
            Some(&token),
            Some(body),
        )
    };
    for (behaviour, refused) in [
        ("with upstream_tls true", service(Some(true), json!(true))),
        (
            "with upstream_tls left out (true)",
            service(None, json!(true)),
        ),
    ] {
        let reply = add(refused).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{behaviour}: {}",
            reply.body
        );
        assert_eq!(reply.error(), "invalid_upstream", "{behaviour}");
        let message = reply.json()["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert_eq!(
            message,
            "invalid upstream: upstream_h2c is for plain-HTTP upstreams (upstream_tls: false); \
             a TLS upstream gets HTTP/2 by ALPN when it offers it",
            "{behaviour}"
        );
    }
    let not_a_bool = add(service(Some(false), json!("yes"))).await;
    assert_eq!(not_a_bool.error(), "invalid_request", "{}", not_a_bool.body);
    // Replacing every service at once holds to the same rule.
    let replaced = h
        .call(
            Method::PUT,
            "/v1/vaults/default/services",
            Some(&token),
            Some(json!({"services": [service(Some(true), json!(true))]})),
        )
        .await;
    assert_eq!(replaced.error(), "invalid_upstream", "{}", replaced.body);
    let listed = h
        .call(
            Method::GET,
            "/v1/vaults/default/services",
            Some(&token),
            None,
        )
        .await;
    assert!(
        !listed.body.contains("\"grpc\""),
        "nothing stored: {}",
        listed.body
    );

    let added = add(service(Some(false), json!(true))).await;
    assert_eq!(added.status, StatusCode::CREATED, "{}", added.body);
    assert_eq!(added.json()["upstream_h2c"], true, "{}", added.body);
    let mut plain = service(Some(false), json!(false));
    plain["name"] = json!("plain");
    plain["host"] = json!("plain.example.com");
    let added = add(plain).await;
    assert_eq!(added.status, StatusCode::CREATED, "{}", added.body);
    // Off is the default and is left out, as in the rules.
    assert!(added.json().get("upstream_h2c").is_none(), "{}", added.body);

    let listed = h
        .call(
            Method::GET,
            "/v1/vaults/default/services",
            Some(&token),
            None,
        )
        .await;
    let named = |all: &Value, name: &str| {
        all.as_array()
            .and_then(|all| all.iter().find(|s| s["name"] == name).cloned())
            .unwrap_or_default()
    };
    let shown = listed.json();
    assert_eq!(named(&shown, "grpc")["upstream_h2c"], true, "{shown}");
    assert!(
        named(&shown, "plain").get("upstream_h2c").is_none(),
        "{shown}"
    );
    let discover = h
        .call(Method::GET, "/discover", Some(&h.agent_token), None)
        .await;
    assert_eq!(discover.status, StatusCode::OK, "{}", discover.body);
    let services = discover.json()["services"].clone();
    assert_eq!(named(&services, "grpc")["upstream_h2c"], true, "{services}");
    assert!(
        named(&services, "plain").get("upstream_h2c").is_none(),
        "{services}"
    );

    // A proposal: refused on a TLS upstream, naming the rule; kept on a plain one.
    let mut proposed = service(None, json!(true));
    proposed["name"] = json!("proposed");
    let refused = h
        .call(
            Method::POST,
            "/v1/proposals",
            Some(&h.agent_token),
            Some(json!({"services": [proposed.clone()]})),
        )
        .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{}", refused.body);
    assert_eq!(refused.error(), "invalid_proposal", "{}", refused.body);
    let message = refused.json()["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        message.starts_with(
            "service \"proposed\": invalid upstream: upstream_h2c is for plain-HTTP upstreams"
        ),
        "{message}"
    );
    proposed["upstream_tls"] = json!(false);
    let created = h
        .call(
            Method::POST,
            "/v1/proposals",
            Some(&h.agent_token),
            Some(json!({"services": [proposed]})),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let id = created.json()["id"].as_u64().unwrap_or_default();
    let shown = h
        .call(
            Method::GET,
            &format!("/v1/proposals/{id}"),
            Some(&h.agent_token),
            None,
        )
        .await;
    assert_eq!(
        shown.json()["services"][0]["upstream_h2c"],
        true,
        "{}",
        shown.body
    );
    let reviewed = h
        .call(
            Method::GET,
            &format!("/v1/vaults/default/proposals/{id}"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(
        reviewed.json()["diff"]["services"][0]["after"]["upstream_h2c"],
        true,
        "{}",
        reviewed.body
    );
}
