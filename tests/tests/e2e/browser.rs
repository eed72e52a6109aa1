//! The browser UI in a real headless Chromium (Debian's `chromium`, driven through
//! `chromedriver` with the `fantoccini` WebDriver client): login, the approval page
//! with inline login, Allow and Deny, agent-supplied values, delete slots, invalid
//! links, CSRF refusal and the credentials page; and the whole flow through Envoy:
//! 403 with a proposal hint → proposal → approval in the browser → the agent's retried
//! request reaches the upstream with the credential.
//!
//! The server's clock cannot be moved from outside: the 24-hour link expiry and the
//! 7-day proposal expiry are tested at the handler level (control-plane `ui::tests`).
//! Everything runs on 127.0.0.1; each test has its own server, chromedriver and
//! browser profile.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

use agent_vault_testkit::control_plane::{Api, Server};
use agent_vault_testkit::net::free_port;
use agent_vault_testkit::stack::{eventually, Stack};
use agent_vault_testkit::upstream::Echo;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
pub(super) const OWNER_EMAIL: &str = "owner@example.com";
pub(super) const OWNER_PASSWORD: &str = "owner-password";
const MEMBER_EMAIL: &str = "member@example.com";
const MEMBER_PASSWORD: &str = "member-password";
/// How long to wait for a page to show what a step expects.
const PAGE_TIMEOUT: Duration = Duration::from_secs(15);

/// One browser at a time: each is a full Chromium, and the tests are short.
static ONE_BROWSER: Mutex<()> = Mutex::new(());

/// A headless Chromium behind its own chromedriver, driven synchronously (the tests
/// mix it with the blocking API client).
pub(super) struct Browser {
    runtime: tokio::runtime::Runtime,
    client: Option<Client>,
    driver: Child,
    _profile: tempfile::TempDir,
    _turn: std::sync::MutexGuard<'static, ()>,
}

impl Browser {
    pub(super) fn start() -> Browser {
        Browser::start_with(&[])
    }

    /// For a UI served with a test CA's certificate: Chromium accepts any certificate.
    pub(super) fn start_trusting_any_certificate() -> Browser {
        Browser::start_with(&["--ignore-certificate-errors"])
    }

    fn start_with(extra_args: &[&str]) -> Browser {
        let turn = ONE_BROWSER.lock().unwrap_or_else(|p| p.into_inner());
        for binary in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(binary).exists(),
                "{binary} is missing: run ./dev test (it installs chromium and chromium-driver) \
                 or apt-get install -y chromium chromium-driver"
            );
        }
        let profile = tempfile::tempdir().expect("profile dir");
        let port = free_port();
        let log = std::fs::File::create(profile.path().join("chromedriver.log")).expect("log");
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start chromedriver");
        let mut browser = Browser {
            runtime: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("tokio runtime"),
            client: None,
            driver,
            _profile: profile,
            _turn: turn,
        };
        let webdriver = format!("http://127.0.0.1:{port}");
        wait_for_driver(&webdriver);
        let user_data = browser._profile.path().join("chromium");
        let mut args: Vec<String> = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            "--disable-sync",
            "--disable-dev-shm-usage",
        ]
        .into_iter()
        .chain(extra_args.iter().copied())
        .map(str::to_string)
        .collect();
        args.push(format!("--user-data-dir={}", user_data.display()));
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("browserName".into(), json!("chrome"));
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({"binary": CHROMIUM, "args": args}),
        );
        let client = browser.runtime.block_on(async {
            ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                .capabilities(capabilities)
                .connect(&webdriver)
                .await
        });
        browser.client = Some(client.expect("a Chromium session through chromedriver"));
        browser
    }

    fn client(&self) -> &Client {
        self.client.as_ref().expect("session")
    }

    pub(super) fn goto(&self, url: &str) {
        self.runtime
            .block_on(self.client().goto(url))
            .unwrap_or_else(|e| panic!("open {url}: {e}"));
    }

    fn url(&self) -> String {
        self.runtime
            .block_on(self.client().current_url())
            .expect("current url")
            .to_string()
    }

    fn source(&self) -> String {
        self.runtime
            .block_on(self.client().source())
            .expect("page source")
    }

    /// The visible text of the page (`None` while it is being replaced).
    fn try_text(&self) -> Option<String> {
        self.runtime
            .block_on(async { self.client().find(Locator::Css("body")).await?.text().await })
            .ok()
    }

    /// The visible text of the page.
    pub(super) fn text(&self) -> String {
        self.try_text().expect("page text")
    }

    pub(super) fn fill(&self, css: &str, value: &str) {
        self.runtime
            .block_on(async {
                let field = self.client().find(Locator::Css(css)).await?;
                field.clear().await?;
                field.send_keys(value).await
            })
            .unwrap_or_else(|e| panic!("fill {css}: {e}\n{}", self.source()));
    }

    pub(super) fn click(&self, css: &str) {
        self.runtime
            .block_on(async { self.client().find(Locator::Css(css)).await?.click().await })
            .unwrap_or_else(|e| panic!("click {css}: {e}\n{}", self.source()));
    }

    fn has(&self, css: &str) -> bool {
        self.runtime
            .block_on(self.client().find_all(Locator::Css(css)))
            .map(|found| !found.is_empty())
            .unwrap_or(false)
    }

    pub(super) fn execute(&self, script: &str) -> Value {
        self.runtime
            .block_on(self.client().execute(script, vec![]))
            .unwrap_or_else(|e| panic!("script failed: {e}"))
    }

    /// Waits until the page's text contains `needle`; panics with the page otherwise.
    /// (A page being replaced by the next one counts as "not yet".)
    #[track_caller]
    pub(super) fn wait_for_text(&self, needle: &str) {
        self.wait_until(&format!("text {needle:?}"), || {
            self.try_text().is_some_and(|text| text.contains(needle))
        });
    }

    /// Waits until the page has an element matching `css`.
    #[track_caller]
    pub(super) fn wait_for(&self, css: &str) {
        self.wait_until(&format!("an element {css}"), || self.has(css));
    }

    #[track_caller]
    fn wait_until(&self, what: &str, done: impl Fn() -> bool) {
        let start = Instant::now();
        while !done() {
            if start.elapsed() > PAGE_TIMEOUT {
                panic!(
                    "the page never showed {what}; at {}:\n{}",
                    self.url(),
                    self.try_text().unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The session cookie's value and flags as the browser stores them.
    fn session_cookie(&self) -> Option<(String, bool, String)> {
        let cookie = self
            .runtime
            .block_on(self.client().get_named_cookie("av_session"))
            .ok()?;
        Some((
            cookie.value().to_string(),
            cookie.http_only().unwrap_or(false),
            format!("{:?}", cookie.same_site()),
        ))
    }

    /// Cookie `name` as the browser stores it: (name, Secure, value).
    pub(super) fn named_cookie(&self, name: &str) -> Option<(String, bool, String)> {
        let cookie = self
            .runtime
            .block_on(self.client().get_named_cookie(name))
            .ok()?;
        Some((
            cookie.name().to_string(),
            cookie.secure().unwrap_or(false),
            cookie.value().to_string(),
        ))
    }

    /// Logs in on the login page and waits for the vault list.
    pub(super) fn login(&self, server: &Server, email: &str, password: &str) {
        self.goto(&format!("{}/ui/login", server.url()));
        self.fill("#email", email);
        self.fill("#password", password);
        self.click("form.login button[type=submit]");
        self.wait_for_text("Vaults");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            let _ = self.runtime.block_on(async {
                tokio::time::timeout(Duration::from_secs(10), client.close()).await
            });
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn wait_for_driver(webdriver: &str) {
    let client = reqwest::blocking::Client::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        let ready = client
            .get(format!("{webdriver}/status"))
            .timeout(Duration::from_secs(2))
            .send()
            .ok()
            .and_then(|r| r.json::<Value>().ok())
            .is_some_and(|status| status["value"]["ready"] == true);
        if ready {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("chromedriver did not become ready at {webdriver}");
}

/// A server with its owner, a member of `default` and an agent on `default`.
pub(super) struct Setup {
    pub(super) server: Server,
    pub(super) owner: Api,
    pub(super) agent: Api,
}

pub(super) fn setup() -> Setup {
    let server = Server::start();
    let owner_token = server.owner_token();
    let owner = server.api(Some(&owner_token));
    let (status, body) = owner.post(
        "/v1/vaults/default/users",
        &json!({"email": MEMBER_EMAIL, "role": "member"}),
    );
    assert_eq!(status, 201, "add member: {body}");
    let invite = body["invite"].as_str().expect("invite").to_string();
    let (status, body) = server.api(None).post(
        "/v1/auth/register",
        &json!({"email": MEMBER_EMAIL, "password": MEMBER_PASSWORD, "invite": invite}),
    );
    assert_eq!(status, 201, "register member: {body}");
    let agent_token = create_agent(&owner, "browser-bot");
    let agent = server.api(Some(&agent_token));
    Setup {
        server,
        owner,
        agent,
    }
}

fn create_agent(owner: &Api, name: &str) -> String {
    let (status, body) = owner.post(
        "/v1/agents",
        &json!({"name": name, "vaults": [{"vault": "default"}]}),
    );
    assert_eq!(status, 201, "create agent: {body}");
    body["token"].as_str().expect("agent token").to_string()
}

/// The agent posts a proposal; returns its id and approval URL.
pub(super) fn propose(agent: &Api, body: Value) -> (u64, String) {
    let (status, created) = agent.post("/v1/proposals", &body);
    assert_eq!(status, 201, "create proposal: {created}");
    (
        created["id"].as_u64().expect("id"),
        created["approval_url"]
            .as_str()
            .expect("approval_url")
            .to_string(),
    )
}

pub(super) fn credential(owner: &Api, key: &str) -> Option<String> {
    let (status, body) = owner.get(&format!("/v1/vaults/default/credentials/{key}"));
    (status == 200).then(|| body["value"].as_str().expect("value").to_string())
}

pub(super) fn set_credential(owner: &Api, key: &str, value: &str) {
    let (status, body) = owner.post(
        "/v1/vaults/default/credentials",
        &json!({"credentials": {key: value}}),
    );
    assert_eq!(status, 200, "set {key}: {body}");
}

pub(super) fn agent_view(agent: &Api, id: u64) -> Value {
    let (status, body) = agent.get(&format!("/v1/proposals/{id}"));
    assert_eq!(status, 200, "agent reads proposal {id}: {body}");
    body
}

#[test]
fn the_login_page_logs_in_with_a_strict_httponly_cookie_and_logs_out() {
    let s = setup();
    let browser = Browser::start();
    browser.goto(&format!("{}/ui/login", s.server.url()));
    browser.fill("#email", OWNER_EMAIL);
    browser.fill("#password", "wrong-password");
    browser.click("form.login button[type=submit]");
    browser.wait_for_text("Invalid email or password");
    assert!(browser.session_cookie().is_none());

    browser.fill("#password", OWNER_PASSWORD);
    browser.click("form.login button[type=submit]");
    browser.wait_for_text("Vaults");
    assert!(browser.url().ends_with("/ui"), "{}", browser.url());
    assert!(browser.has("a[href='/ui/vaults/default']"));
    let (token, http_only, same_site) = browser.session_cookie().expect("session cookie");
    // A UI session: the JSON API never takes it.
    assert!(token.starts_with("av_ui_"), "{token}");
    assert!(http_only, "the session cookie is HttpOnly");
    assert_eq!(same_site, "Some(Strict)");
    // Scripts cannot read it (the CSP forbids page scripts; WebDriver's run anyway).
    assert_eq!(browser.execute("return document.cookie"), json!(""));

    browser.click("header.top form button");
    browser.wait_for_text("Log in");
    assert!(browser.url().contains("/ui/login"), "{}", browser.url());
    let (status, _) = s.server.api(Some(&token)).get("/v1/auth/whoami");
    assert_eq!(status, 401, "logout ended the session");
}

#[test]
fn a_human_logs_in_on_the_approval_page_types_the_value_and_allows() {
    let s = setup();
    let secret = "sk_test_typed_in_chromium_42";
    let (id, link) = propose(
        &s.agent,
        json!({
            "services": [{"action": "set", "name": "stripe", "host": "api.stripe.com",
                          "auth": {"type": "bearer", "token": "STRIPE_KEY"}}],
            "credentials": [{"action": "set", "key": "STRIPE_KEY",
                             "description": "Stripe API key",
                             "obtain": "https://dashboard.stripe.com/apikeys",
                             "obtain_instructions": "Developers > API Keys > Reveal test key"}],
            "message": "Stripe access for invoices",
            "user_message": "I need to read invoices <script>alert(1)</script>"
        }),
    );
    let browser = Browser::start();
    browser.goto(&link);
    browser.wait_for_text("I need to read invoices <script>alert(1)</script>");
    let text = browser.text();
    assert!(
        text.contains("api.stripe.com") && text.contains("bearer"),
        "{text}"
    );
    assert!(text.contains("Stripe API key"));
    assert!(text.contains("Developers > API Keys > Reveal test key"));
    let obtain = "a[href='https://dashboard.stripe.com/apikeys'][target='_blank'][rel='noopener noreferrer']";
    assert!(browser.has(obtain), "{}", browser.source());
    assert!(
        !browser.has("input[name='value.STRIPE_KEY']"),
        "no secret field before login"
    );

    // Inline login, back to the same page.
    // A service change is an admin's to allow (DESIGN.md §5).
    browser.fill("#email", OWNER_EMAIL);
    browser.fill("#password", OWNER_PASSWORD);
    browser.click("form.login button[type=submit]");
    browser.wait_for("#allow");
    assert_eq!(browser.url(), link, "login returns to the approval page");
    assert!(browser.has("input[type=password][name='value.STRIPE_KEY']"));

    browser.fill("input[name='value.STRIPE_KEY']", secret);
    browser.fill("#confirm-allow", OWNER_PASSWORD);
    browser.click("#allow");
    browser.wait_for_text("Applied");
    assert!(browser.text().contains(OWNER_EMAIL));
    assert!(
        !browser.source().contains(secret),
        "the value is not on the page"
    );
    assert!(!browser.url().contains(secret));

    assert_eq!(credential(&s.owner, "STRIPE_KEY").as_deref(), Some(secret));
    let view = agent_view(&s.agent, id);
    assert_eq!(view["status"], "applied");
    assert!(!view.to_string().contains(secret));
    let (_, services) = s.owner.get("/v1/vaults/default/services");
    assert_eq!(services[0]["host"], "api.stripe.com", "{services}");
}

#[test]
fn deny_with_a_reason_is_what_the_agent_reads() {
    let s = setup();
    let (id, link) = propose(
        &s.agent,
        json!({"credentials": [{"action": "set", "key": "GITHUB_TOKEN",
                                "description": "GitHub token"}],
               "message": "GitHub access"}),
    );
    let browser = Browser::start();
    browser.login(&s.server, OWNER_EMAIL, OWNER_PASSWORD);
    browser.goto(&link);
    browser.wait_for_text("GitHub token");
    browser.fill("#reason", "use the read-only bot account instead");
    browser.fill("#confirm-deny", OWNER_PASSWORD);
    browser.click("#deny");
    browser.wait_for_text("Rejected");
    assert!(browser
        .text()
        .contains("use the read-only bot account instead"));
    let view = agent_view(&s.agent, id);
    assert_eq!(view["status"], "rejected");
    assert_eq!(
        view["review"]["reason"],
        "use the read-only bot account instead"
    );
    assert_eq!(credential(&s.owner, "GITHUB_TOKEN"), None);
}

#[test]
fn a_wrong_token_and_an_unknown_id_show_the_invalid_link_page() {
    let s = setup();
    let (id, link) = propose(
        &s.agent,
        json!({"credentials": [{"action": "set", "key": "SOME_KEY"}]}),
    );
    let token = link.split("token=").nth(1).expect("token in the link");
    let browser = Browser::start();
    let base = s.server.url();
    let zeros = "0".repeat(64);
    for url in [
        format!("{base}/approve/{id}?token=av_appr_{zeros}"),
        format!("{base}/approve/{}?token={token}", id + 100),
        format!("{base}/approve/{id}"),
    ] {
        browser.goto(&url);
        browser.wait_for_text("Invalid or expired link");
        assert!(!browser.has("form.allow"), "{url}");
    }
    // The real link still works.
    browser.goto(&link);
    browser.wait_for_text("Log in to decide");
}

#[test]
fn agent_supplied_values_are_accepted_or_overridden() {
    let s = setup();
    let (id, link) = propose(
        &s.agent,
        json!({
            "credentials": [
                {"action": "set", "key": "ACCEPTED_TOKEN", "description": "kept as the agent made it",
                 "value": "agent-made-accepted"},
                {"action": "set", "key": "OVERRIDDEN_TOKEN", "description": "replaced by the human",
                 "value": "agent-made-overridden"}
            ],
            "message": "tokens generated during setup"
        }),
    );
    let browser = Browser::start();
    browser.login(&s.server, MEMBER_EMAIL, MEMBER_PASSWORD);
    browser.goto(&link);
    browser.wait_for_text("provided by the agent");
    let source = browser.source();
    assert!(
        !source.contains("agent-made-accepted"),
        "agent values are never shown"
    );
    // Allow with neither box ticked nor a value typed: refused, nothing stored.
    browser.fill("#confirm-allow", MEMBER_PASSWORD);
    browser.click("#allow");
    browser.wait_for_text("Nothing was changed");
    assert_eq!(credential(&s.owner, "ACCEPTED_TOKEN"), None);

    browser.click("#accept-ACCEPTED_TOKEN");
    browser.fill("#value-OVERRIDDEN_TOKEN", "human-typed-override");
    browser.fill("#confirm-allow", MEMBER_PASSWORD);
    browser.click("#allow");
    browser.wait_for_text("Applied");
    assert_eq!(
        credential(&s.owner, "ACCEPTED_TOKEN").as_deref(),
        Some("agent-made-accepted")
    );
    assert_eq!(
        credential(&s.owner, "OVERRIDDEN_TOKEN").as_deref(),
        Some("human-typed-override")
    );
    assert_eq!(agent_view(&s.agent, id)["status"], "applied");
}

#[test]
fn a_member_reveals_the_agents_value_on_the_approval_page_then_accepts_it() {
    let s = setup();
    let (id, link) = propose(
        &s.agent,
        json!({
            "credentials": [
                {"action": "set", "key": "WEBHOOK_SECRET", "description": "generated by the agent",
                 "value": "whsec_agent_made_check_me"}
            ]
        }),
    );
    let browser = Browser::start();
    browser.login(&s.server, MEMBER_EMAIL, MEMBER_PASSWORD);
    browser.goto(&link);
    browser.wait_for_text("provided by the agent");
    assert!(!browser.source().contains("whsec_agent_made_check_me"));
    // One click with the password, like a credential reveal.
    browser.fill("#confirm-reveal", MEMBER_PASSWORD);
    browser.click("#reveal");
    browser.wait_for_text("whsec_agent_made_check_me");
    assert!(
        !browser.url().contains("whsec"),
        "the value is never in a URL"
    );
    assert_eq!(agent_view(&s.agent, id)["status"], "pending");
    assert!(
        !agent_view(&s.agent, id)
            .to_string()
            .contains("whsec_agent_made_check_me"),
        "the agent never reads it back"
    );
    // Checked: accept it.
    browser.click("#accept-WEBHOOK_SECRET");
    browser.fill("#confirm-allow", MEMBER_PASSWORD);
    browser.click("#allow");
    browser.wait_for_text("Applied");
    assert_eq!(
        credential(&s.owner, "WEBHOOK_SECRET").as_deref(),
        Some("whsec_agent_made_check_me")
    );
}

#[test]
fn a_delete_slot_removes_the_credential() {
    let s = setup();
    set_credential(&s.owner, "OLD_API_KEY", "old-value");
    set_credential(&s.owner, "KEPT_KEY", "kept-value");
    let (id, link) = propose(
        &s.agent,
        json!({"credentials": [{"action": "delete", "key": "OLD_API_KEY"}],
               "message": "Remove unused API key"}),
    );
    let browser = Browser::start();
    browser.login(&s.server, MEMBER_EMAIL, MEMBER_PASSWORD);
    browser.goto(&link);
    browser.wait_for_text("deletes the credential OLD_API_KEY");
    assert!(!browser.has("input[type=password][name^='value.']"));
    browser.fill("#confirm-allow", MEMBER_PASSWORD);
    browser.click("#allow");
    browser.wait_for_text("Applied");
    assert_eq!(credential(&s.owner, "OLD_API_KEY"), None);
    assert_eq!(
        credential(&s.owner, "KEPT_KEY").as_deref(),
        Some("kept-value")
    );
    assert_eq!(agent_view(&s.agent, id)["status"], "applied");
}

#[test]
fn a_decision_posted_without_the_csrf_token_is_refused_and_changes_nothing() {
    let s = setup();
    let (id, link) = propose(
        &s.agent,
        json!({"credentials": [{"action": "set", "key": "CSRF_KEY"}]}),
    );
    let browser = Browser::start();
    browser.login(&s.server, MEMBER_EMAIL, MEMBER_PASSWORD);
    browser.goto(&link);
    browser.wait_for("#allow");
    browser.fill("input[name='value.CSRF_KEY']", "value-without-token");
    // The crafted form: the same POST, its CSRF field removed.
    let removed = browser.execute(
        "const f = document.querySelector('form.allow input[name=csrf]'); f.remove(); return true;",
    );
    assert_eq!(removed, json!(true));
    browser.fill("#confirm-allow", MEMBER_PASSWORD);
    browser.click("#allow");
    browser.wait_for_text("Form refused");
    assert_eq!(credential(&s.owner, "CSRF_KEY"), None);
    assert_eq!(agent_view(&s.agent, id)["status"], "pending");

    // A plain HTTP POST with the browser's session cookie but no token: 403 too.
    let (session, _, _) = browser.session_cookie().expect("session cookie");
    let token = link.split("token=").nth(1).expect("token");
    let response = reqwest::blocking::Client::new()
        .post(format!("{}/approve/{id}/allow", s.server.url()))
        .header("cookie", format!("av_session={session}"))
        .form(&[("token", token), ("value.CSRF_KEY", "posted-without-token")])
        .send()
        .expect("post");
    assert_eq!(response.status().as_u16(), 403);
    assert_eq!(credential(&s.owner, "CSRF_KEY"), None);
    // With the page's own form, it goes through.
    browser.goto(&link);
    browser.wait_for("#allow");
    browser.fill("input[name='value.CSRF_KEY']", "value-with-token");
    browser.fill("#confirm-allow", MEMBER_PASSWORD);
    browser.click("#allow");
    browser.wait_for_text("Applied");
    assert_eq!(
        credential(&s.owner, "CSRF_KEY").as_deref(),
        Some("value-with-token")
    );
}

#[test]
fn the_credentials_page_masks_values_and_reveals_them_to_a_member() {
    let s = setup();
    set_credential(&s.owner, "STRIPE_KEY", "sk_live_shown_only_on_reveal");
    let browser = Browser::start();
    browser.login(&s.server, MEMBER_EMAIL, MEMBER_PASSWORD);
    browser.click("a[href='/ui/vaults/default']");
    browser.wait_for_text("Pending proposals");
    browser.click("nav.tabs a[href='/ui/vaults/default/credentials']");
    browser.wait_for_text("STRIPE_KEY");
    assert!(!browser.source().contains("sk_live_shown_only_on_reveal"));
    assert!(browser.text().contains("••••••••"));
    browser.fill("#confirm-password", MEMBER_PASSWORD);
    browser.click("form.inline button[type=submit]:not(.link)");
    browser.wait_for_text("sk_live_shown_only_on_reveal");
    assert!(
        !browser.url().contains("sk_live"),
        "the value is never in a URL"
    );
    // The other tabs render for a member as well.
    for (tab, expected) in [
        ("services", "no services yet"),
        ("agents", "Only admins"),
        ("logs", "No requests yet"),
    ] {
        browser.goto(&format!("{}/ui/vaults/default/{tab}", s.server.url()));
        browser.wait_for_text(expected);
    }
}

/// Long enough for the filter's first snapshot poll and a rules change to reach
/// every Envoy worker.
const SNAPSHOT: Duration = Duration::from_secs(10);

#[test]
fn through_envoy_a_hint_becomes_a_proposal_approved_in_the_browser_and_the_retry_is_injected() {
    let stack = Stack::start();
    let echo = Echo::plain();
    let agent_token = stack.create_agent("flow-bot", &["default"]);
    let agent = stack.server.api(Some(&agent_token));
    let url = echo.url("/v1/invoices");

    // 1. The host is unknown: 403 with a hint naming where to propose.
    let refused = eventually(
        &stack.envoy,
        SNAPSHOT,
        || stack.get_as(&agent_token, "default", &url, &[]),
        |r| r.status == 403,
    );
    let hint = refused.json();
    assert_eq!(hint["error"], "forbidden", "{hint}");
    assert_eq!(hint["proposal_hint"]["host"], echo.authority());
    assert_eq!(hint["proposal_hint"]["endpoint"], "POST /v1/proposals");

    // 2. The agent proposes the service and the slot.
    let (id, link) = propose(
        &agent,
        json!({
            "services": [{"action": "set", "name": "billing",
                          "host": hint["proposal_hint"]["host"],
                          "upstream_tls": false,
                          "auth": {"type": "bearer", "token": "BILLING_KEY"}}],
            "credentials": [{"action": "set", "key": "BILLING_KEY",
                             "description": "Billing API key"}],
            "message": "billing access",
            "user_message": "I need the invoices API."
        }),
    );

    // 3. A human opens the link, logs in inline, types the value, allows.
    let secret = "billing-secret-from-the-browser";
    let browser = Browser::start();
    browser.goto(&link);
    browser.wait_for_text("I need the invoices API.");
    browser.fill("#email", OWNER_EMAIL);
    browser.fill("#password", OWNER_PASSWORD);
    browser.click("form.login button[type=submit]");
    browser.wait_for("#allow");
    browser.fill("input[name='value.BILLING_KEY']", secret);
    // The loopback upstream is plain HTTP: the page warns that the credential would
    // cross the network unencrypted, and Allow needs that acknowledged.
    assert!(browser.text().contains("plain HTTP"), "{}", browser.text());
    browser.click("input[name=ack]");
    browser.fill("#confirm-allow", OWNER_PASSWORD);
    browser.click("#allow");
    browser.wait_for_text("Applied");
    assert_eq!(agent_view(&agent, id)["status"], "applied");

    // 4. The agent's retry reaches the upstream with the credential injected.
    let response = eventually(
        &stack.envoy,
        SNAPSHOT,
        || stack.get_as(&agent_token, "default", &url, &[]),
        |r| r.status == 200,
    );
    let seen = response.echoed();
    assert_eq!(seen["path"], "/v1/invoices");
    // The approved service redacts responses (the default): the agent sees the echo of
    // the credential redacted, the upstream got it.
    assert_eq!(
        agent_vault_testkit::http::unmasked(
            seen["headers"]["authorization"]
                .as_str()
                .unwrap_or_default()
        ),
        "[REDACTED]"
    );
    assert_eq!(
        echo.received()
            .last()
            .map(|seen| seen["headers"]["authorization"].clone()),
        Some(json!(format!("Bearer {secret}")))
    );
    assert!(!seen["header_list"].to_string().contains(&agent_token));
}
