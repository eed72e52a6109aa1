//! Handler-level tests of the UI: the whole router (API + UI) driven with
//! `tower::ServiceExt::oneshot`, over a temporary store with a manual clock.

use std::collections::BTreeMap;

use agent_vault_rules::{Grant, LogRecord, Role};
use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use serde_json::json;

use super::security::{
    csrf_for_session, safe_next, CONFIRM_FIELD, CONTENT_SECURITY_POLICY, CSRF_COOKIE,
    SECURE_CSRF_COOKIE,
};
use crate::credentials::Secret;
use crate::proposals::{ProposalInput, ProposalStatus};
use crate::testing::{owner, Harness, Reply, MEMBER, OUTSIDER, OWNER, PASSWORD, T0_MS};

fn harness() -> Harness {
    Harness::new()
}

fn harness_at(public_url: &str) -> Harness {
    Harness::at(public_url)
}

impl Harness {
    fn propose(&self, body: serde_json::Value) -> (u64, String) {
        let input: ProposalInput = serde_json::from_value(body).unwrap();
        let (view, token) = self
            .store()
            .create_proposal(&self.agent, "default", input)
            .unwrap();
        (view.id, token)
    }

    /// A proposal for one service and one slot the human fills in.
    fn stripe_proposal(&self) -> (u64, String) {
        self.propose(json!({
            "services": [{"action": "set", "name": "stripe", "host": "api.stripe.com",
                          "auth": {"type": "bearer", "token": "STRIPE_KEY"}}],
            "credentials": [{"action": "set", "key": "STRIPE_KEY", "description": "Stripe API key",
                             "obtain": "https://dashboard.stripe.com/apikeys",
                             "obtain_instructions": "Developers > API Keys > Reveal test key"}],
            "message": "Stripe access for billing",
            "user_message": "I need to read invoices."
        }))
    }

    fn status_of(&self, id: u64) -> ProposalStatus {
        self.store()
            .get_proposal(&owner(), "default", id)
            .unwrap()
            .status
    }

    fn credential(&self, key: &str) -> Option<String> {
        self.store()
            .get_credential(&owner(), "default", key)
            .ok()
            .map(|s| s.expose().to_string())
    }

    fn set_credential(&self, key: &str, value: &str) {
        let entries = BTreeMap::from([(key.to_string(), Secret::new(value.to_string()))]);
        self.store()
            .set_credentials(&owner(), "default", &entries)
            .unwrap();
    }

    async fn get(&self, path: &str, cookie: Option<&str>) -> Reply {
        let mut request = Request::get(path);
        if let Some(cookie) = cookie {
            request = request.header(header::COOKIE, cookie);
        }
        self.send(request.body(Body::empty()).unwrap()).await
    }

    /// A form post as the human at the keyboard: every form carries the password that
    /// confirms it (forms that do not ask for one ignore it). [`Harness::post_raw`]
    /// sends only `fields`.
    async fn post(&self, path: &str, cookie: Option<&str>, fields: &[(&str, &str)]) -> Reply {
        let mut confirmed = fields.to_vec();
        if !fields.iter().any(|(name, _)| *name == CONFIRM_FIELD) {
            confirmed.push((CONFIRM_FIELD, PASSWORD));
        }
        self.post_raw(path, cookie, &confirmed).await
    }

    async fn post_raw(&self, path: &str, cookie: Option<&str>, fields: &[(&str, &str)]) -> Reply {
        let body: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(fields)
            .finish();
        let mut request =
            Request::post(path).header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        if let Some(cookie) = cookie {
            request = request.header(header::COOKIE, cookie);
        }
        self.send(request.body(Body::from(body)).unwrap()).await
    }
}

fn session_cookie(token: &str) -> String {
    format!("av_session={token}")
}

#[tokio::test]
async fn every_ui_response_carries_the_security_headers() {
    let h = harness();
    let session = session_cookie(&h.ui_session(OWNER));
    let (id, token) = h.stripe_proposal();
    let replies = [
        h.get("/ui/login", None).await,
        h.get("/ui/static/style.css", None).await,
        h.get("/ui", None).await,
        h.get("/ui", Some(&session)).await,
        h.get("/ui/vaults/default", Some(&session)).await,
        h.get("/ui/vaults/nope", Some(&session)).await,
        h.get(&format!("/approve/{id}?token={token}"), None).await,
        h.get("/approve/1?token=wrong", None).await,
        h.post("/ui/logout", Some(&session), &[]).await,
        h.get("/ui/no/such/page", Some(&session)).await,
    ];
    for reply in &replies {
        let header = |name: &str| {
            reply
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        assert_eq!(header("content-security-policy"), CONTENT_SECURITY_POLICY);
        assert_eq!(header("x-frame-options"), "DENY");
        assert_eq!(header("x-content-type-options"), "nosniff");
        assert_eq!(header("referrer-policy"), "no-referrer");
        assert_eq!(header("cache-control"), "no-store");
    }
    assert!(CONTENT_SECURITY_POLICY.contains("default-src 'none'"));
    assert!(!CONTENT_SECURITY_POLICY.contains("unsafe-inline"));
    // No script anywhere, so the CSP's missing script-src breaks nothing.
    for reply in &replies {
        assert!(!reply.body.contains("<script"), "{}", reply.body);
    }
    // The API keeps its JSON answers (the headers are the UI's).
    let api = h.get("/health", None).await;
    assert_eq!(api.status, StatusCode::OK);
}

#[tokio::test]
async fn login_sets_a_strict_httponly_session_cookie_and_goes_to_next() {
    let h = harness();
    let page = h.get("/ui/login?next=/ui/vaults/default", None).await;
    assert_eq!(page.status, StatusCode::OK);
    let csrf_cookie = page
        .set_cookies()
        .into_iter()
        .find(|c| c.starts_with("av_csrf="))
        .expect("the login page sets the double-submit cookie");
    assert!(csrf_cookie.contains("HttpOnly") && csrf_cookie.contains("SameSite=Strict"));
    let csrf = page.cookie_value(CSRF_COOKIE).unwrap();
    assert!(page.body.contains(&csrf), "the form repeats the cookie");
    assert!(page
        .body
        .contains(r#"name="next" value="/ui/vaults/default""#));

    let reply = h
        .post(
            "/ui/login",
            Some(&format!("{CSRF_COOKIE}={csrf}")),
            &[
                ("csrf", &csrf),
                ("email", OWNER),
                ("password", PASSWORD),
                ("next", "/ui/vaults/default"),
            ],
        )
        .await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER);
    assert_eq!(reply.location(), "/ui/vaults/default");
    let cookie = reply
        .set_cookies()
        .into_iter()
        .find(|c| c.starts_with("av_session="))
        .unwrap();
    // A UI session, which the JSON API never accepts.
    assert!(cookie.starts_with("av_session=av_ui_"), "{cookie}");
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=604800"] {
        assert!(cookie.contains(attribute), "{cookie} lacks {attribute}");
    }
    assert!(!cookie.contains("Secure"), "http public URL: no Secure");
    let token = reply.cookie_value("av_session").unwrap();
    let vaults = h.get("/ui", Some(&session_cookie(&token))).await;
    assert_eq!(vaults.status, StatusCode::OK);
    assert!(vaults.body.contains("/ui/vaults/default"));
}

#[tokio::test]
async fn the_session_cookie_is_secure_behind_an_https_public_url() {
    let h = harness_at("https://vault.example.com");
    let csrf = "a".repeat(64);
    let reply = h
        .post(
            "/ui/login",
            Some(&format!("{SECURE_CSRF_COOKIE}={csrf}")),
            &[("csrf", &csrf), ("email", OWNER), ("password", PASSWORD)],
        )
        .await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER);
    assert_eq!(reply.location(), "/ui");
    let cookie = reply.set_cookies().join("\n");
    assert!(cookie.contains("; Secure"), "{cookie}");
    // `__Host-`: the browser keeps it to this origin, over TLS only.
    assert!(cookie.starts_with("__Host-av_session=av_ui_"), "{cookie}");
    // The plain-HTTP names do not log in over https.
    let plain = h
        .post(
            "/ui/login",
            Some(&format!("{CSRF_COOKIE}={csrf}")),
            &[("csrf", &csrf), ("email", OWNER), ("password", PASSWORD)],
        )
        .await;
    assert_eq!(plain.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn a_wrong_password_shows_the_form_again_without_a_session() {
    let h = harness();
    let csrf = "b".repeat(64);
    let reply = h
        .post(
            "/ui/login",
            Some(&format!("{CSRF_COOKIE}={csrf}")),
            &[
                ("csrf", &csrf),
                ("email", OWNER),
                ("password", "wrong-password"),
            ],
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert!(reply.body.contains("Invalid email or password"));
    assert!(reply.body.contains(OWNER), "the email is kept");
    assert!(
        !reply.body.contains("wrong-password"),
        "the password is not"
    );
    assert!(reply.cookie_value("av_session").is_none());
}

#[tokio::test]
async fn login_without_the_double_submit_token_is_refused() {
    let h = harness();
    let csrf = "c".repeat(64);
    type Case<'a> = (Option<String>, Vec<(&'a str, &'a str)>);
    let cases: [Case; 3] = [
        // No cookie (a cross-site POST carries no SameSite=Strict cookie).
        (None, vec![("csrf", &csrf)]),
        // No field.
        (Some(format!("{CSRF_COOKIE}={csrf}")), vec![]),
        // Field and cookie differ.
        (
            Some(format!("{CSRF_COOKIE}={}", "d".repeat(64))),
            vec![("csrf", &csrf)],
        ),
    ];
    for (cookie, mut fields) in cases {
        fields.extend([("email", OWNER), ("password", PASSWORD)]);
        let reply = h.post("/ui/login", cookie.as_deref(), &fields).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{cookie:?}");
        assert!(reply.cookie_value("av_session").is_none());
    }
}

#[test]
fn next_accepts_only_paths_of_this_site() {
    let good = ["/ui", "/ui/vaults/default", "/approve/3?token=av_appr_00ff"];
    for next in good {
        assert_eq!(safe_next(next), Some(next), "{next}");
    }
    let bad = [
        "",
        "https://evil.example/",
        "http://evil.example",
        "//evil.example",
        "///evil.example",
        "/\\evil.example",
        "\\\\evil.example",
        "/ui//evil.example",
        "/ui/\\evil.example",
        "javascript:alert(1)",
        "evil.example",
        "/ui\r\nSet-Cookie: x=y",
        "/ui/ x",
        "/v1/vaults",
        "/uievil",
        "/approve",
    ];
    for next in bad {
        assert_eq!(safe_next(next), None, "{next:?}");
    }
}

#[tokio::test]
async fn login_never_redirects_off_site() {
    let h = harness();
    let csrf = "e".repeat(64);
    for next in [
        "https://evil.example/",
        "//evil.example",
        "/\\evil.example",
        "/ui//evil.example",
    ] {
        let reply = h
            .post(
                "/ui/login",
                Some(&format!("{CSRF_COOKIE}={csrf}")),
                &[
                    ("csrf", &csrf),
                    ("email", OWNER),
                    ("password", PASSWORD),
                    ("next", next),
                ],
            )
            .await;
        assert_eq!(reply.status, StatusCode::SEE_OTHER, "{next}");
        assert_eq!(reply.location(), "/ui", "{next}");
        // The login page does not echo it into its form either.
        let encoded: String = form_urlencoded::byte_serialize(next.as_bytes()).collect();
        let page = h.get(&format!("/ui/login?next={encoded}"), None).await;
        assert!(!page.body.contains("evil.example"), "{next}");
    }
    // Logged in, the login page sends you on, but only on this site.
    let session = session_cookie(&h.ui_session(OWNER));
    let reply = h
        .get("/ui/login?next=%2F%2Fevil.example", Some(&session))
        .await;
    assert_eq!(reply.location(), "/ui");
}

#[tokio::test]
async fn pages_without_a_session_redirect_to_login_and_agent_tokens_are_no_session() {
    let h = harness();
    let reply = h.get("/ui/vaults/default/credentials", None).await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER);
    assert_eq!(
        reply.location(),
        "/ui/login?next=%2Fui%2Fvaults%2Fdefault%2Fcredentials"
    );
    let agent = h
        .store()
        .create_agent(
            &owner(),
            "bot2",
            vec![Grant {
                vault: "default".into(),
                role: Role::Proxy,
            }],
            None,
        )
        .unwrap();
    let reply = h.get("/ui", Some(&session_cookie(&agent.token))).await;
    assert_eq!(
        reply.status,
        StatusCode::SEE_OTHER,
        "an agent token is not a UI session"
    );
}

#[tokio::test]
async fn session_forms_without_the_csrf_token_are_refused_and_change_nothing() {
    let h = harness();
    h.set_credential("EXISTING", "existing-secret-value");
    let token = h.ui_session(MEMBER);
    let cookie = session_cookie(&token);
    let (id, link) = h.stripe_proposal();
    let wrong = csrf_for_session("av_sess_someone_else");
    for csrf in [None, Some(""), Some(wrong.as_str())] {
        let with = |mut fields: Vec<(&'static str, String)>| {
            if let Some(csrf) = csrf {
                fields.push(("csrf", csrf.to_string()));
            }
            fields
        };
        let allow = with(vec![
            ("token", link.clone()),
            ("value.STRIPE_KEY", "sk_test_typed".into()),
        ]);
        let allow: Vec<(&str, &str)> = allow.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let reply = h
            .post(&format!("/approve/{id}/allow"), Some(&cookie), &allow)
            .await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{csrf:?}");
        let deny = with(vec![("token", link.clone()), ("reason", "no".into())]);
        let deny: Vec<(&str, &str)> = deny.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let reply = h
            .post(&format!("/approve/{id}/deny"), Some(&cookie), &deny)
            .await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN);
        let reply = h
            .post(
                &format!("/ui/vaults/default/proposals/{id}/allow"),
                Some(&cookie),
                &allow,
            )
            .await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN);
        let reveal = with(vec![]);
        let reveal: Vec<(&str, &str)> = reveal.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let reply = h
            .post(
                "/ui/vaults/default/credentials/reveal",
                Some(&cookie),
                &reveal,
            )
            .await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN);
        assert!(!reply.body.contains("existing-secret-value"));
        let reply = h.post("/ui/logout", Some(&cookie), &reveal).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN);
    }
    assert_eq!(h.status_of(id), ProposalStatus::Pending);
    assert_eq!(h.credential("STRIPE_KEY"), None);
    assert!(
        h.store().authenticate_ui(&token).unwrap().is_some(),
        "still logged in"
    );
    // And with the token, logout works.
    let reply = h
        .post(
            "/ui/logout",
            Some(&cookie),
            &[("csrf", &csrf_for_session(&token))],
        )
        .await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER);
    assert!(reply
        .set_cookies()
        .iter()
        .any(|c| c.starts_with("av_session=;") && c.contains("Max-Age=0")));
    assert!(h.store().authenticate_ui(&token).unwrap().is_none());
}

#[tokio::test]
async fn agent_supplied_text_is_escaped() {
    let h = harness();
    let (id, link) = h.propose(json!({
        "services": [{"action": "set", "name": "evil", "host": "api.evil.example",
                      "auth": {"type": "bearer", "token": "EVIL_KEY"}}],
        "credentials": [{"action": "set", "key": "EVIL_KEY",
                         "description": "<img src=x onerror=alert(1)>",
                         "obtain": "https://evil.example/?a=1&b=2",
                         "obtain_instructions": "\"><script>alert(2)</script>"}],
        "message": "<b>bold</b>",
        "user_message": "<script>alert(1)</script>"
    }));
    let cookie = session_cookie(&h.ui_session(MEMBER));
    for reply in [
        h.get(&format!("/approve/{id}?token={link}"), None).await,
        h.get(&format!("/approve/{id}?token={link}"), Some(&cookie))
            .await,
        h.get(&format!("/ui/vaults/default/proposals/{id}"), Some(&cookie))
            .await,
        h.get("/ui/vaults/default", Some(&cookie)).await,
    ] {
        assert_eq!(reply.status, StatusCode::OK);
        assert!(!reply.body.contains("<script"), "{}", reply.body);
        assert!(!reply.body.contains("<img"), "{}", reply.body);
        assert!(!reply.body.contains("<b>bold"), "{}", reply.body);
    }
    let page = h.get(&format!("/approve/{id}?token={link}"), None).await;
    assert!(page.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(page.body.contains("&lt;img src=x onerror=alert(1)&gt;"));
    assert!(page.body.contains("&quot;&gt;&lt;script&gt;alert(2)"));
    assert!(page.body.contains(
        r#"href="https://evil.example/?a=1&amp;b=2" target="_blank" rel="noopener noreferrer""#
    ));
}

#[tokio::test]
async fn the_approval_page_without_a_session_offers_an_inline_login_that_returns() {
    let h = harness();
    let (id, link) = h.stripe_proposal();
    let path = format!("/approve/{id}?token={link}");
    let page = h.get(&path, None).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("I need to read invoices."));
    assert!(page.body.contains("Stripe access for billing"));
    assert!(page.body.contains("api.stripe.com") && page.body.contains("bearer"));
    assert!(page.body.contains(r#"action="/ui/login""#));
    assert!(page
        .body
        .contains(&format!(r#"name="next" value="{path}""#)));
    assert!(
        !page.body.contains("name=\"value."),
        "no secret field before login"
    );
    let csrf = page
        .cookie_value(CSRF_COOKIE)
        .expect("double-submit cookie");

    let login = h
        .post(
            "/ui/login",
            Some(&format!("{CSRF_COOKIE}={csrf}")),
            &[
                ("csrf", &csrf),
                ("email", MEMBER),
                ("password", PASSWORD),
                ("next", &path),
            ],
        )
        .await;
    assert_eq!(login.status, StatusCode::SEE_OTHER);
    assert_eq!(login.location(), path);
    let cookie = session_cookie(&login.cookie_value("av_session").unwrap());
    let page = h.get(&path, Some(&cookie)).await;
    assert!(page
        .body
        .contains(r#"type="password" name="value.STRIPE_KEY""#));
    assert!(page.body.contains(r#"id="allow""#) && page.body.contains(r#"id="deny""#));
}

#[tokio::test]
async fn allow_stores_the_value_and_the_page_shows_applied() {
    let h = harness();
    let (id, link) = h.stripe_proposal();
    // Changing services needs an admin (a member may approve credential-only proposals).
    let token = h.ui_session(OWNER);
    let cookie = session_cookie(&token);
    let reply = h
        .post(
            &format!("/approve/{id}/allow"),
            Some(&cookie),
            &[
                ("csrf", &csrf_for_session(&token)),
                ("token", &link),
                ("value.STRIPE_KEY", "sk_test_typed_in_browser"),
            ],
        )
        .await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER, "{}", reply.body);
    assert_eq!(reply.location(), format!("/approve/{id}?token={link}"));
    assert_eq!(
        h.credential("STRIPE_KEY").as_deref(),
        Some("sk_test_typed_in_browser")
    );
    assert_eq!(h.status_of(id), ProposalStatus::Applied);
    let page = h.get(reply.location(), Some(&cookie)).await;
    assert!(page.body.contains("Applied"));
    assert!(page.body.contains(OWNER));
    assert!(!page.body.contains("sk_test_typed_in_browser"));
    assert!(!page.body.contains(r#"id="allow""#), "no form once decided");
}

#[tokio::test]
async fn a_missing_value_is_shown_with_the_choices_kept_but_not_the_secrets() {
    let h = harness();
    let (id, link) = h.propose(json!({
        "credentials": [
            {"action": "set", "key": "TYPED", "description": "typed by the human"},
            {"action": "set", "key": "GENERATED", "value": "agent-generated-value"},
            {"action": "set", "key": "SECOND", "value": "agent-second-value"}
        ]
    }));
    let token = h.ui_session(MEMBER);
    let cookie = session_cookie(&token);
    let csrf = csrf_for_session(&token);
    // TYPED is empty: refused, the accepted box stays ticked.
    let reply = h
        .post(
            &format!("/approve/{id}/allow"),
            Some(&cookie),
            &[
                ("csrf", &csrf),
                ("token", &link),
                ("value.TYPED", ""),
                ("accept.GENERATED", "1"),
                ("value.SECOND", "human-second-value"),
            ],
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(
        reply.body.contains("type a value for TYPED"),
        "{}",
        reply.body
    );
    assert!(reply
        .body
        .contains(r#"name="accept.GENERATED" value="1" checked"#));
    assert!(!reply
        .body
        .contains(r#"name="accept.SECOND" value="1" checked"#));
    assert!(
        !reply.body.contains("human-second-value"),
        "typed secrets are dropped"
    );
    assert!(
        !reply.body.contains("agent-generated-value"),
        "agent values are never shown"
    );
    // An agent slot neither accepted nor overridden is missing too.
    let reply = h
        .post(
            &format!("/approve/{id}/allow"),
            Some(&cookie),
            &[
                ("csrf", &csrf),
                ("token", &link),
                ("value.TYPED", "human-typed-value"),
                ("accept.GENERATED", "1"),
            ],
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(reply.body.contains("SECOND"));
    assert!(!reply.body.contains("human-typed-value"));
    assert_eq!(h.status_of(id), ProposalStatus::Pending);
    assert_eq!(h.credential("TYPED"), None);
    // Accept one agent value, override the other.
    let reply = h
        .post(
            &format!("/approve/{id}/allow"),
            Some(&cookie),
            &[
                ("csrf", &csrf),
                ("token", &link),
                ("value.TYPED", "human-typed-value"),
                ("accept.GENERATED", "1"),
                ("accept.SECOND", "1"),
                ("value.SECOND", "human-second-value"),
            ],
        )
        .await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER, "{}", reply.body);
    assert_eq!(h.credential("TYPED").as_deref(), Some("human-typed-value"));
    assert_eq!(
        h.credential("GENERATED").as_deref(),
        Some("agent-generated-value")
    );
    assert_eq!(
        h.credential("SECOND").as_deref(),
        Some("human-second-value")
    );
}

#[tokio::test]
async fn an_apply_failure_is_shown_and_nothing_changes() {
    let h = harness();
    h.set_credential("OLD_KEY", "old");
    let (id, link) = h.propose(json!({
        "credentials": [
            {"action": "set", "key": "NEW_KEY"},
            {"action": "delete", "key": "OLD_KEY"}
        ]
    }));
    // Someone deletes OLD_KEY meanwhile: the proposal's delete can no longer apply.
    h.store()
        .delete_credentials(&owner(), "default", &["OLD_KEY".into()])
        .unwrap();
    let token = h.ui_session(MEMBER);
    let page = h
        .get(
            &format!("/approve/{id}?token={link}"),
            Some(&session_cookie(&token)),
        )
        .await;
    assert!(page.body.contains("deletes the credential"));
    let reply = h
        .post(
            &format!("/approve/{id}/allow"),
            Some(&session_cookie(&token)),
            &[
                ("csrf", &csrf_for_session(&token)),
                ("token", &link),
                ("value.NEW_KEY", "new-secret"),
            ],
        )
        .await;
    assert_eq!(reply.status, StatusCode::CONFLICT);
    assert!(reply.body.contains("was not applied"), "{}", reply.body);
    assert!(!reply.body.contains("new-secret"));
    assert!(
        reply.body.contains(r#"id="allow""#),
        "still pending: try again"
    );
    assert_eq!(h.credential("NEW_KEY"), None);
    assert_eq!(h.status_of(id), ProposalStatus::Pending);
}

#[tokio::test]
async fn deny_records_the_reason_for_the_agent() {
    let h = harness();
    let (id, link) = h.stripe_proposal();
    let token = h.ui_session(MEMBER);
    let reply = h
        .post(
            &format!("/approve/{id}/deny"),
            Some(&session_cookie(&token)),
            &[
                ("csrf", &csrf_for_session(&token)),
                ("token", &link),
                ("reason", "use the <test> account"),
            ],
        )
        .await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER);
    let view = h.store().get_proposal(&h.agent, "default", id).unwrap();
    assert_eq!(view.status, ProposalStatus::Rejected);
    assert_eq!(
        view.review.unwrap().reason.as_deref(),
        Some("use the <test> account")
    );
    let page = h.get(reply.location(), None).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("Rejected"));
    assert!(page.body.contains("use the &lt;test&gt; account"));
    assert!(
        !page.body.contains(r#"action="/ui/login""#),
        "nothing left to log in for"
    );
}

#[tokio::test]
async fn only_members_and_admins_of_the_vault_can_decide() {
    let h = harness();
    let (id, link) = h.stripe_proposal();
    let token = h.ui_session(OUTSIDER);
    let cookie = session_cookie(&token);
    let page = h
        .get(&format!("/approve/{id}?token={link}"), Some(&cookie))
        .await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("not a member or admin"));
    assert!(!page.body.contains(r#"id="allow""#));
    for decision in ["allow", "deny"] {
        let reply = h
            .post(
                &format!("/approve/{id}/{decision}"),
                Some(&cookie),
                &[
                    ("csrf", &csrf_for_session(&token)),
                    ("token", &link),
                    ("value.STRIPE_KEY", "sk_outsider"),
                ],
            )
            .await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{decision}");
    }
    // Nor through the vault's pages, which it cannot even see.
    let reply = h
        .get(&format!("/ui/vaults/default/proposals/{id}"), Some(&cookie))
        .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    // Without any session, a decision is refused too.
    let reply = h
        .post(
            &format!("/approve/{id}/allow"),
            None,
            &[("token", &link), ("value.STRIPE_KEY", "sk_nobody")],
        )
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(h.status_of(id), ProposalStatus::Pending);
    assert_eq!(h.credential("STRIPE_KEY"), None);
}

#[tokio::test]
async fn wrong_tokens_and_unknown_ids_get_one_generic_404() {
    let h = harness();
    let (id, link) = h.stripe_proposal();
    let (other, _) = h.stripe_proposal();
    let cookie = session_cookie(&h.ui_session(OWNER));
    let paths = [
        format!("/approve/{id}?token=av_appr_{}", "0".repeat(64)),
        format!("/approve/{id}?token=nonsense"),
        format!("/approve/{id}"),
        format!("/approve/{other}?token={link}"),
        format!("/approve/999?token={link}"),
        format!("/approve/abc?token={link}"),
    ];
    let mut bodies = Vec::new();
    for path in &paths {
        for cookie in [None, Some(cookie.as_str())] {
            let reply = h.get(path, cookie).await;
            assert_eq!(reply.status, StatusCode::NOT_FOUND, "{path}");
            assert!(reply.body.contains("Invalid or expired link"), "{path}");
            if cookie.is_none() {
                bodies.push(reply.body);
            }
        }
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]), "one page for all");
}

#[tokio::test]
async fn the_approval_link_expires_after_24_hours() {
    let h = harness();
    let (id, link) = h.stripe_proposal();
    h.clock.advance_secs(24 * 3600 - 60);
    let page = h.get(&format!("/approve/{id}?token={link}"), None).await;
    assert_eq!(page.status, StatusCode::OK);
    h.clock.advance_secs(60);
    let page = h.get(&format!("/approve/{id}?token={link}"), None).await;
    assert_eq!(page.status, StatusCode::NOT_FOUND);
    assert!(page.body.contains("Invalid or expired link"));
    // A POST through the dead link changes nothing either.
    // Changing services needs an admin (a member may approve credential-only proposals).
    let token = h.ui_session(OWNER);
    let cookie = session_cookie(&token);
    let reply = h
        .post(
            &format!("/approve/{id}/allow"),
            Some(&cookie),
            &[
                ("csrf", &csrf_for_session(&token)),
                ("token", &link),
                ("value.STRIPE_KEY", "sk_late"),
            ],
        )
        .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(h.credential("STRIPE_KEY"), None);
    // Members can still decide from the vault's pages.
    let page = h
        .get(&format!("/ui/vaults/default/proposals/{id}"), Some(&cookie))
        .await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains(r#"id="allow""#));
    let reply = h
        .post(
            &format!("/ui/vaults/default/proposals/{id}/allow"),
            Some(&cookie),
            &[
                ("csrf", &csrf_for_session(&token)),
                ("value.STRIPE_KEY", "sk_from_vault_page"),
            ],
        )
        .await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER);
    assert_eq!(
        reply.location(),
        format!("/ui/vaults/default/proposals/{id}")
    );
    assert_eq!(
        h.credential("STRIPE_KEY").as_deref(),
        Some("sk_from_vault_page")
    );
}

#[tokio::test]
async fn a_proposal_expires_after_7_days() {
    let h = harness();
    let (id, _) = h.stripe_proposal();
    let token = h.ui_session(MEMBER);
    let cookie = session_cookie(&token);
    h.clock.advance_secs(7 * 86_400);
    // The session lasts 7 days too: log in again.
    let token = h.ui_session(MEMBER);
    let cookie2 = session_cookie(&token);
    assert!(h.get("/ui", Some(&cookie)).await.status == StatusCode::SEE_OTHER);
    let page = h
        .get(
            &format!("/ui/vaults/default/proposals/{id}"),
            Some(&cookie2),
        )
        .await;
    assert_eq!(page.status, StatusCode::GONE);
    assert!(page.body.contains("Expired"));
    assert!(!page.body.contains(r#"id="allow""#));
    let reply = h
        .post(
            &format!("/ui/vaults/default/proposals/{id}/allow"),
            Some(&cookie2),
            &[
                ("csrf", &csrf_for_session(&token)),
                ("value.STRIPE_KEY", "sk_too_late"),
            ],
        )
        .await;
    assert_eq!(reply.status, StatusCode::CONFLICT);
    assert!(reply.body.contains("Expired"));
    assert_eq!(h.credential("STRIPE_KEY"), None);
    let list = h.get("/ui/vaults/default", Some(&cookie2)).await;
    assert!(list.body.contains("status-expired"));
}

#[tokio::test]
async fn credentials_are_masked_and_revealed_to_members_on_a_post() {
    let h = harness();
    h.set_credential("STRIPE_KEY", "sk_live_hidden_value");
    let token = h.ui_session(MEMBER);
    let cookie = session_cookie(&token);
    let page = h.get("/ui/vaults/default/credentials", Some(&cookie)).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("STRIPE_KEY"));
    assert!(page.body.contains("••••••••"));
    assert!(!page.body.contains("sk_live_hidden_value"));
    // A GET cannot reveal (the value would be one link away).
    let page = h
        .get("/ui/vaults/default/credentials/reveal", Some(&cookie))
        .await;
    assert!(!page.body.contains("sk_live_hidden_value"));
    let page = h
        .post(
            "/ui/vaults/default/credentials/reveal",
            Some(&cookie),
            &[("csrf", &csrf_for_session(&token))],
        )
        .await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("sk_live_hidden_value"));
    // An outsider cannot see the vault at all.
    let outsider = h.ui_session(OUTSIDER);
    let page = h
        .post(
            "/ui/vaults/default/credentials/reveal",
            Some(&session_cookie(&outsider)),
            &[("csrf", &csrf_for_session(&outsider))],
        )
        .await;
    assert_eq!(page.status, StatusCode::NOT_FOUND);
    assert!(!page.body.contains("sk_live_hidden_value"));
}

#[tokio::test]
async fn the_vault_pages_render() {
    let h = harness();
    h.set_credential("STRIPE_KEY", "sk");
    crate::testing::add_stripe_service(h.store());
    crate::logs::RequestLog::new(h.state.store.clone(), Default::default())
        .append(vec![LogRecord {
            ts: T0_MS,
            agent: "bot".into(),
            vault: "default".into(),
            method: "GET".into(),
            host: "api.stripe.com".into(),
            path: "/v1/<charges>".into(),
            service: Some("stripe".into()),
            status: 200,
            latency_ms: 12,
            error: None,
            redactions: 3,
        }])
        .unwrap();
    let (id, _) = h.stripe_proposal();
    let owner = session_cookie(&h.ui_session(OWNER));
    let list = h.get("/ui", Some(&owner)).await;
    assert!(list.body.contains("/ui/vaults/default") && list.body.contains("/ui/vaults/other"));
    let proposals = h.get("/ui/vaults/default", Some(&owner)).await;
    assert!(proposals
        .body
        .contains(&format!("/ui/vaults/default/proposals/{id}")));
    assert!(proposals.body.contains("Stripe access for billing"));
    let services = h.get("/ui/vaults/default/services", Some(&owner)).await;
    assert!(services.body.contains("api.stripe.com") && services.body.contains("bearer"));
    let agents = h.get("/ui/vaults/default/agents", Some(&owner)).await;
    assert!(agents.body.contains("bot"));
    let log = h.get("/ui/vaults/default/logs", Some(&owner)).await;
    assert_eq!(log.status, StatusCode::OK);
    assert!(log.body.contains("/v1/&lt;charges&gt;"));
    assert!(log.body.contains("2023-11-14 22:13:20 UTC"));
    assert!(log.body.contains("<th>Redacted</th>") && log.body.contains("<td>3</td>"));
    let member = session_cookie(&h.ui_session(MEMBER));
    let agents = h.get("/ui/vaults/default/agents", Some(&member)).await;
    assert!(agents.body.contains("Only admins"));
    let missing = h.get("/ui/vaults/nope/services", Some(&owner)).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
}

/// What a server an agent runs on another local port holds after one page view: the
/// session cookie (browsers send it to every port of the host), and so the CSRF token
/// derived from it. It must not reveal or decide with them.
#[tokio::test]
async fn a_stolen_session_cookie_neither_reveals_nor_decides_without_the_password() {
    let h = harness();
    h.set_credential("STRIPE_KEY", "sk_live_hidden_value");
    let (id, link) = h.propose(json!({
        "credentials": [{"key": "NEW_KEY", "description": "a new key"}]
    }));
    let token = h.ui_session(OWNER);
    let cookie = session_cookie(&token);
    let csrf = csrf_for_session(&token);
    for password in [None, Some("not-the-password")] {
        fn with<'a>(
            fields: &[(&'a str, &'a str)],
            password: Option<&'a str>,
        ) -> Vec<(&'a str, &'a str)> {
            let mut fields = fields.to_vec();
            if let Some(password) = password {
                fields.push((CONFIRM_FIELD, password));
            }
            fields
        }
        let reveal = h
            .post_raw(
                "/ui/vaults/default/credentials/reveal",
                Some(&cookie),
                &with(&[("csrf", &csrf)], password),
            )
            .await;
        assert_eq!(reveal.status, StatusCode::UNAUTHORIZED, "{password:?}");
        assert!(!reveal.body.contains("sk_live_hidden_value"));
        let allow = h
            .post_raw(
                &format!("/approve/{id}/allow"),
                Some(&cookie),
                &with(
                    &[
                        ("csrf", &csrf),
                        ("token", &link),
                        ("value.NEW_KEY", "attacker"),
                    ],
                    password,
                ),
            )
            .await;
        assert_eq!(allow.status, StatusCode::UNAUTHORIZED, "{password:?}");
        let deny = h
            .post_raw(
                &format!("/approve/{id}/deny"),
                Some(&cookie),
                &with(&[("csrf", &csrf), ("token", &link)], password),
            )
            .await;
        assert_eq!(deny.status, StatusCode::UNAUTHORIZED, "{password:?}");
        assert_eq!(h.status_of(id), ProposalStatus::Pending);
        assert_eq!(h.credential("NEW_KEY"), None);
    }
    // The human, typing the password, does both.
    let reveal = h
        .post(
            "/ui/vaults/default/credentials/reveal",
            Some(&cookie),
            &[("csrf", &csrf)],
        )
        .await;
    assert!(reveal.body.contains("sk_live_hidden_value"));
}

#[tokio::test]
async fn the_approval_page_shows_the_diff_and_allow_needs_each_warning_acknowledged() {
    let h = harness();
    h.set_credential("STRIPE_KEY", "sk_live_human");
    crate::testing::add_stripe_service(h.store());
    // No secret asked for: an existing key bound to the agent's host, one click away.
    let (id, link) = h.propose(json!({
        "services": [{"name": "metrics-exporter", "host": "collector.attacker.example",
                      "auth": {"type": "bearer", "token": "STRIPE_KEY"}}]
    }));
    let token = h.ui_session(OWNER);
    let cookie = session_cookie(&token);
    let page = h
        .get(&format!("/approve/{id}?token={link}"), Some(&cookie))
        .await;
    assert!(
        page.body.contains("Services: what changes"),
        "{}",
        page.body
    );
    assert!(page.body.contains("collector.attacker.example"));
    let warning = "existing_credential_to_new_host:STRIPE_KEY@collector.attacker.example";
    assert!(
        page.body
            .contains(&format!(r#"value="{warning}" required"#)),
        "{}",
        page.body
    );
    assert!(page.body.contains("already in the vault"));
    let base = [("csrf", csrf_for_session(&token)), ("token", link.clone())];
    let fields = |ack: bool| {
        let mut fields: Vec<(&str, &str)> = base.iter().map(|(k, v)| (*k, v.as_str())).collect();
        if ack {
            fields.push(("ack", warning));
        }
        fields
    };
    let refused = h
        .post(
            &format!("/approve/{id}/allow"),
            Some(&cookie),
            &fields(false),
        )
        .await;
    assert_eq!(refused.status, StatusCode::CONFLICT, "{}", refused.body);
    assert!(refused.body.contains("acknowledge"), "{}", refused.body);
    assert_eq!(h.status_of(id), ProposalStatus::Pending);
    let allowed = h
        .post(
            &format!("/approve/{id}/allow"),
            Some(&cookie),
            &fields(true),
        )
        .await;
    assert_eq!(allowed.status, StatusCode::SEE_OTHER, "{}", allowed.body);
    assert_eq!(h.status_of(id), ProposalStatus::Applied);
}

#[tokio::test]
async fn a_harmless_proposal_has_no_warning_to_acknowledge() {
    let h = harness();
    let (id, link) = h.stripe_proposal();
    let token = h.ui_session(OWNER);
    let page = h
        .get(
            &format!("/approve/{id}?token={link}"),
            Some(&session_cookie(&token)),
        )
        .await;
    assert!(page.body.contains("Services: what changes"));
    assert!(
        !page.body.contains("Read before you allow"),
        "{}",
        page.body
    );
}

#[tokio::test]
async fn a_reviewer_reveals_the_agents_value_with_the_password_and_an_outsider_never_does() {
    let h = harness();
    let (id, link) = h.propose(json!({
        "credentials": [{"key": "GENERATED", "value": "agent-generated-value"}]
    }));
    let token = h.ui_session(MEMBER);
    let cookie = session_cookie(&token);
    let csrf = csrf_for_session(&token);
    let page = h
        .get(&format!("/approve/{id}?token={link}"), Some(&cookie))
        .await;
    assert!(page.body.contains(r#"id="reveal""#), "{}", page.body);
    assert!(!page.body.contains("agent-generated-value"));
    // No password, a wrong one, no CSRF token: refused, nothing shown.
    for fields in [
        vec![("csrf", csrf.as_str()), ("token", link.as_str())],
        vec![
            ("csrf", csrf.as_str()),
            ("token", link.as_str()),
            (CONFIRM_FIELD, "not-the-password"),
        ],
    ] {
        let refused = h
            .post_raw(&format!("/approve/{id}/reveal"), Some(&cookie), &fields)
            .await;
        assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
        assert!(!refused.body.contains("agent-generated-value"));
    }
    let no_csrf = h
        .post(
            &format!("/approve/{id}/reveal"),
            Some(&cookie),
            &[("token", &link)],
        )
        .await;
    assert!(!no_csrf.body.contains("agent-generated-value"));
    // With the password, behind the link and in the vault's pages: the value, in its
    // slot; the proposal is still pending and the reveal form gone.
    for path in [
        format!("/approve/{id}/reveal"),
        format!("/ui/vaults/default/proposals/{id}/reveal"),
    ] {
        let shown = h
            .post(
                &path,
                Some(&cookie),
                &[("csrf", csrf.as_str()), ("token", link.as_str())],
            )
            .await;
        assert_eq!(shown.status, StatusCode::OK, "{path}: {}", shown.body);
        assert!(
            shown.body.contains("agent-generated-value"),
            "{path}: {}",
            shown.body
        );
        assert!(!shown.body.contains(r#"id="reveal""#));
        assert!(shown.body.contains(r#"id="allow""#));
    }
    assert_eq!(h.status_of(id), ProposalStatus::Pending);
    // Someone outside the vault gets no form and no value.
    let outsider = h.ui_session(OUTSIDER);
    let refused = h
        .post(
            &format!("/approve/{id}/reveal"),
            Some(&session_cookie(&outsider)),
            &[("csrf", &csrf_for_session(&outsider)), ("token", &link)],
        )
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert!(!refused.body.contains("agent-generated-value"));
}

#[tokio::test]
async fn the_approval_page_shows_the_methods_a_proposed_service_allows() {
    let h = harness();
    h.set_credential("STRIPE_KEY", "sk_live_human");
    crate::testing::add_stripe_service(h.store());
    let (id, link) = h.propose(json!({
        "services": [{"name": "stripe", "host": "api.stripe.com", "methods": ["GET", "HEAD"],
                      "auth": {"type": "bearer", "token": "STRIPE_KEY"}}]
    }));
    let token = h.ui_session(OWNER);
    let cookie = session_cookie(&token);
    let page = h
        .get(&format!("/approve/{id}?token={link}"), Some(&cookie))
        .await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert!(
        page.body
            .contains(r#"<code class="method">GET</code> <code class="method">HEAD</code>"#),
        "{}",
        page.body
    );
    // The diff: all methods today, GET and HEAD once approved.
    assert!(
        page.body.contains(" · methods all but TRACE/TRACK"),
        "{}",
        page.body
    );
}

#[tokio::test]
async fn the_approval_page_shows_a_proposed_services_rate_limit() {
    let h = harness();
    h.set_credential("STRIPE_KEY", "sk_live_human");
    crate::testing::add_stripe_service(h.store());
    let (id, link) = h.propose(json!({
        "services": [{"name": "stripe", "host": "api.stripe.com",
                      "rate_limit": {"requests": 10, "per": "second"},
                      "auth": {"type": "bearer", "token": "STRIPE_KEY"}}]
    }));
    let token = h.ui_session(OWNER);
    let cookie = session_cookie(&token);
    let page = h
        .get(&format!("/approve/{id}?token={link}"), Some(&cookie))
        .await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert!(
        page.body.contains("<code>10/s</code> per agent"),
        "{}",
        page.body
    );
    // The diff: no limit today, 10/s once approved.
    assert!(page.body.contains(" · rate limit none"), "{}", page.body);
}

#[tokio::test]
async fn the_approval_and_services_pages_show_substitutions_and_redaction_never_values() {
    let h = harness();
    h.set_credential("TELEGRAM_BOT_TOKEN", "123456:bot-secret");
    let (id, link) = h.propose(json!({
        "services": [{"name": "telegram", "catalog": "telegram", "redact_responses": false}]
    }));
    let token = h.ui_session(OWNER);
    let cookie = session_cookie(&token);
    let page = h
        .get(&format!("/approve/{id}?token={link}"), Some(&cookie))
        .await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    let shown = "<code class=\"placeholder\">__TELEGRAM_BOT_TOKEN__</code> ← <code class=\"key\">TELEGRAM_BOT_TOKEN</code> in path";
    assert!(page.body.contains(shown), "{}", page.body);
    assert!(
        page.body.contains("<strong>not redacted</strong>"),
        "{}",
        page.body
    );
    // The diff names the substitution's key among the service's keys.
    assert!(
        page.body
            .contains(" · substitutions <code class=\"placeholder\">"),
        "{}",
        page.body
    );
    assert!(!page.body.contains("bot-secret"), "{}", page.body);

    let service: agent_vault_rules::Service = serde_json::from_value(json!({
        "name": "telegram", "host": "api.telegram.org", "auth": {"type": "passthrough"},
        "substitutions": [{"key": "TELEGRAM_BOT_TOKEN", "placeholder": "__TELEGRAM_BOT_TOKEN__", "in": ["path", "query"]}]
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    h.store()
        .add_service(&crate::testing::owner(), "default", service)
        .unwrap_or_else(|e| panic!("{e}"));
    let services = h.get("/ui/vaults/default/services", Some(&cookie)).await;
    assert_eq!(services.status, StatusCode::OK, "{}", services.body);
    assert!(
        services.body.contains("<code class=\"placeholder\">__TELEGRAM_BOT_TOKEN__</code> ← <code class=\"key\">TELEGRAM_BOT_TOKEN</code> in path, query"),
        "{}",
        services.body
    );
    assert!(
        services.body.contains("<td>redacted</td>"),
        "{}",
        services.body
    );
    // The key comes from the substitution: the credentials column names it.
    assert!(
        services
            .body
            .contains("<td><code class=\"key\">TELEGRAM_BOT_TOKEN</code> </td>"),
        "{}",
        services.body
    );
    assert!(!services.body.contains("bot-secret"));
}

#[tokio::test]
async fn the_approval_and_services_pages_show_an_h2c_upstreams_protocol() {
    let h = harness();
    let (id, link) = h.propose(json!({
        "services": [{"name": "grpc", "host": "grpc.example.com:50051", "upstream_tls": false,
                      "upstream_h2c": true, "auth": {"type": "passthrough"}}]
    }));
    // Before login, the proposal's services table.
    let path = format!("/approve/{id}?token={link}");
    let page = h.get(&path, None).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert!(
        page.body.contains("<td>no (plain HTTP/2, h2c)</td>"),
        "{}",
        page.body
    );
    // A reviewer's diff names the protocol next to TLS.
    let token = h.ui_session(OWNER);
    let cookie = session_cookie(&token);
    let page = h.get(&path, Some(&cookie)).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert!(
        page.body
            .contains(" · TLS <strong>off</strong> · HTTP/2 (h2c)"),
        "{}",
        page.body
    );

    for service in [
        json!({"name": "plain", "host": "plain.example.com", "upstream_tls": false,
               "auth": {"type": "passthrough"}}),
        json!({"name": "grpc", "host": "grpc.example.com:50051", "upstream_tls": false,
               "upstream_h2c": true, "auth": {"type": "passthrough"}}),
    ] {
        let service: agent_vault_rules::Service =
            serde_json::from_value(service).unwrap_or_else(|e| panic!("{e}"));
        h.store()
            .add_service(&crate::testing::owner(), "default", service)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let services = h.get("/ui/vaults/default/services", Some(&cookie)).await;
    assert_eq!(services.status, StatusCode::OK, "{}", services.body);
    assert!(
        services.body.contains("<td>no (plain HTTP/2, h2c)</td>"),
        "{}",
        services.body
    );
    assert!(
        services.body.contains("<td>no (plain HTTP)</td>"),
        "{}",
        services.body
    );
}
