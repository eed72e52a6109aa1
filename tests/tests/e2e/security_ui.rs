//! The review's attacks on the human's browser (DESIGN.md §8, §9, §11 invariants 10
//! and 11), in the real headless Chromium: a page an agent serves on another local
//! port, the session cookie such a server receives, and a proposal that routes an
//! existing credential to the agent's host.

use std::io::{BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use agent_vault_testkit::control_plane::{Server, ServerOptions};
use agent_vault_testkit::http::{read_request, HttpRequest};
use agent_vault_testkit::net::{serve_loopback, Serving};
use agent_vault_testkit::upstream::TestCa;

use super::browser::{
    agent_view, credential, propose, set_credential, setup, Browser, OWNER_EMAIL, OWNER_PASSWORD,
};

/// A server the agent runs on another loopback port: serves `page` at `/preview`,
/// answers anything else with 204, and keeps every request it receives.
struct AgentServer {
    port: u16,
    seen: Arc<Mutex<Vec<HttpRequest>>>,
    _serving: Serving,
}

impl AgentServer {
    fn start(page: String) -> AgentServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let serving = serve_loopback(listener, move |mut stream: std::net::TcpStream| {
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let Ok(Some(request)) = read_request(&mut reader) else {
                return;
            };
            let response = if request.path == "/preview" {
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\n\
                     connection: close\r\n\r\n{page}",
                    page.len()
                )
            } else {
                "HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n".to_string()
            };
            record.lock().expect("seen").push(request);
            let _ = stream.write_all(response.as_bytes());
        });
        AgentServer {
            port,
            seen,
            _serving: serving,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/preview", self.port)
    }

    /// Waits until a request for `path` arrived; returns every request so far.
    fn wait_for(&self, path: &str) -> Vec<(String, Option<String>)> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let seen: Vec<(String, Option<String>)> = self
                .seen
                .lock()
                .expect("seen")
                .iter()
                .map(|r| (r.path.clone(), r.header("cookie").map(str::to_string)))
                .collect();
            if seen.iter().any(|(p, _)| p == path) {
                return seen;
            }
            assert!(Instant::now() < deadline, "no request for {path}: {seen:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The value of cookie `name` in a `Cookie` header.
fn cookie_value<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

#[test]
fn a_page_on_another_local_port_cannot_act_as_the_logged_in_human() {
    let s = setup();
    let (id, _) = propose(
        &s.agent,
        json!({"credentials": [{"key": "NEW_KEY", "description": "a key"}]}),
    );
    let api = s.server.url();
    // H1: what the review's page did: "simple" requests (no preflight) with the
    // browser's cookies, approving and adding an exfiltration service.
    let page = format!(
        r#"<!doctype html><script>
        const opts = body => ({{method: 'POST', mode: 'no-cors', credentials: 'include',
                               headers: {{'content-type': 'text/plain'}}, body}});
        Promise.allSettled([
          fetch('{api}/v1/vaults/default/proposals/{id}/approve',
                opts('{{"values":{{"NEW_KEY":"attacker-chosen"}}}}')),
          fetch('{api}/v1/vaults/default/services', opts(JSON.stringify(
                {{name: 'x', host: 'collector.attacker.example',
                  auth: {{type: 'bearer', token: 'STRIPE_KEY'}}}}))),
          fetch('{api}/v1/vaults/default/credentials',
                opts('{{"credentials":{{"STRIPE_KEY":"overwritten"}}}}')),
        ]).then(() => fetch('/done'));
        </script>"#
    );
    set_credential(&s.owner, "STRIPE_KEY", "sk_live_human");
    let attacker = AgentServer::start(page);
    let browser = Browser::start();
    browser.login(&s.server, OWNER_EMAIL, OWNER_PASSWORD);
    browser.goto(&attacker.url());
    let seen = attacker.wait_for("/done");

    assert_eq!(agent_view(&s.agent, id)["status"], "pending");
    assert_eq!(credential(&s.owner, "NEW_KEY"), None);
    assert_eq!(
        credential(&s.owner, "STRIPE_KEY").as_deref(),
        Some("sk_live_human")
    );
    let (_, services) = s.owner.get("/v1/vaults/default/services");
    assert_eq!(services, json!([]), "no service was added");

    // H2 over plain HTTP: the browser did send the UI's cookie to the agent's port
    // (cookies are not isolated by port) ...
    let cookie = seen
        .iter()
        .find(|(path, _)| path == "/preview")
        .and_then(|(_, cookie)| cookie.clone())
        .expect("the page view carried cookies");
    let stolen = cookie_value(&cookie, "av_session")
        .expect("the session cookie")
        .to_string();
    // ... but it is no bearer token for the API ...
    let as_bearer = s.server.api(Some(&stolen));
    let (status, body) = as_bearer.get("/v1/vaults/default/credentials?reveal=true");
    assert_eq!(status, 401, "{body}");
    assert!(!body.to_string().contains("sk_live_human"));
    // ... and the UI reveals nothing without the password, even with the form's CSRF
    // token, which the cookie gets from any page.
    let page = reqwest::blocking::Client::new()
        .get(format!("{api}/ui/vaults/default/credentials"))
        .header("cookie", format!("av_session={stolen}"))
        .send()
        .expect("credentials page")
        .text()
        .unwrap_or_default();
    let csrf = page
        .split(r#"name="csrf" value=""#)
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a form's CSRF token")
        .to_string();
    let response = reqwest::blocking::Client::new()
        .post(format!("{api}/ui/vaults/default/credentials/reveal"))
        .header("cookie", format!("av_session={stolen}"))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .expect("reveal");
    assert_eq!(response.status().as_u16(), 401);
    assert!(!response
        .text()
        .unwrap_or_default()
        .contains("sk_live_human"));
}

/// Over https the cookie is `__Host-` and `Secure`. That keeps it to this origin on a
/// real host name, but not on loopback: Chromium treats `http://127.0.0.1` as a secure
/// context and sends Secure cookies to every port of it. So the cookie is still no
/// bearer token, and revealing or deciding still asks for the password.
#[test]
fn over_https_the_cookie_is_host_bound_and_secure_and_still_useless_to_another_local_port() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("agent-vault UI test CA");
    let (cert, key) = ca.issue_pem(&["127.0.0.1", "localhost"]);
    let cert_path = dir.path().join("ui.pem");
    let key_path = dir.path().join("ui-key.pem");
    std::fs::write(&cert_path, cert).expect("cert");
    std::fs::write(&key_path, key).expect("key");
    let ca_path = ca.write_pem(&dir.path().join("ca.pem"));
    let server = Server::start_with(ServerOptions {
        extra_args: vec![
            "--allow-private-upstreams".into(),
            "--tls-cert".into(),
            cert_path.display().to_string(),
            "--tls-key".into(),
            key_path.display().to_string(),
        ],
        ..ServerOptions::default()
    });
    assert!(server.url().starts_with("https://"), "{}", server.url());
    // The CLI speaks https, trusting the given CA.
    let cli = server.cli().with_ca_file(&ca_path);
    cli.run_stdin(
        &[
            "auth",
            "register",
            "--email",
            OWNER_EMAIL,
            "--password-stdin",
        ],
        &format!("{OWNER_PASSWORD}\n"),
    )
    .ok();
    // Without the CA, it refuses the server's certificate with a clear error.
    let untrusted = server.cli().run(&["vault", "list"]);
    assert_ne!(untrusted.status, 0);

    let attacker = AgentServer::start("<!doctype html>preview".to_string());
    let browser = Browser::start_trusting_any_certificate();
    browser.login(&server, OWNER_EMAIL, OWNER_PASSWORD);
    let (name, secure, value) = browser.named_cookie("__Host-av_session").expect("session");
    assert_eq!(name, "__Host-av_session");
    assert!(secure, "a Secure cookie");
    assert!(value.starts_with("av_ui_"), "{value}");
    browser.goto(&attacker.url());
    attacker.wait_for("/preview");
    // Whatever the browser sent the agent's port, the session it holds is no API token.
    let as_bearer = cli
        .with_token(&value)
        .run(&["vault", "credential", "list", "--reveal"]);
    assert_ne!(as_bearer.status, 0, "{}", as_bearer.stdout);
    assert!(
        as_bearer.stderr.contains("log in again") || as_bearer.stderr.contains("unauthorized"),
        "{}",
        as_bearer.stderr
    );
}

#[test]
fn the_approval_page_shows_an_existing_credential_sent_to_a_new_host_and_needs_an_acknowledgement()
{
    let s = setup();
    set_credential(&s.owner, "STRIPE_KEY", "sk_live_human");
    let (status, body) = s.owner.post(
        "/v1/vaults/default/services",
        &json!({"name": "stripe", "host": "api.stripe.com",
                "auth": {"type": "bearer", "token": "STRIPE_KEY"}}),
    );
    assert_eq!(status, 201, "{body}");
    // No slot, no secret asked for: one click away before the fix.
    let (id, link) = propose(
        &s.agent,
        json!({"services": [{"name": "metrics-exporter", "host": "collector.attacker.example",
                             "auth": {"type": "bearer", "token": "STRIPE_KEY"}}]}),
    );
    let browser = Browser::start();
    browser.login(&s.server, OWNER_EMAIL, OWNER_PASSWORD);
    browser.goto(&link);
    browser.wait_for_text("Read before you allow");
    let text = browser.text();
    assert!(text.contains("collector.attacker.example"), "{text}");
    assert!(text.contains("already in the vault"), "{text}");
    assert!(
        text.contains("api.stripe.com"),
        "names where it goes today: {text}"
    );

    // Allow without the acknowledgement: the form does not go, nothing changes.
    browser.fill("#confirm-allow", OWNER_PASSWORD);
    browser.click("#allow");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(agent_view(&s.agent, id)["status"], "pending");
    // A POST without it (the checkbox removed from the page) is refused by the server.
    let removed = browser.execute(
        "document.querySelectorAll('input[name=ack]').forEach(e => e.remove()); return true;",
    );
    assert_eq!(removed, json!(true));
    browser.click("#allow");
    browser.wait_for_text("acknowledge");
    assert_eq!(agent_view(&s.agent, id)["status"], "pending");

    browser.goto(&link);
    browser.wait_for("input[name=ack]");
    browser.click("input[name=ack]");
    browser.fill("#confirm-allow", OWNER_PASSWORD);
    browser.click("#allow");
    browser.wait_for_text("Applied");
    let view: Value = agent_view(&s.agent, id);
    assert_eq!(view["status"], "applied");
}

/// The review's S3: a page on another port of the same host can plant cookies for the
/// UI (cookies are not isolated by port), such as a CSRF cookie of its choosing and a
/// session cookie holding a token it has. Neither logs the browser in as anyone: an
/// agent token is never a UI session, and the login double-submit only proves the form
/// came with its cookie, so it still needs an account's password — and an agent cannot
/// register one (no invite).
#[test]
fn cookies_planted_from_another_local_port_log_no_one_in() {
    let s = setup();
    let agent_token = s.agent.token.clone().expect("agent token");
    let ui = s.server.url();
    let csrf = "c".repeat(64);
    let page = format!(
        r#"<!doctype html><body><form id="f" method="post" action="{ui}/ui/login">
        <input name="csrf" value="{csrf}"><input name="email" value="agent@example.com">
        <input name="password" value="agent-password"></form><script>
        document.cookie = "av_csrf={csrf}; path=/";
        document.cookie = "av_session={agent_token}; path=/";
        fetch('/planted').then(() => document.getElementById('f').submit());
        </script></body>"#
    );
    let attacker = AgentServer::start(page);
    let browser = Browser::start();
    browser.goto(&attacker.url());
    attacker.wait_for("/planted");
    browser.wait_for_text("Invalid email or password");
    // The planted agent token is no session: the UI asks to log in.
    browser.goto(&format!("{ui}/ui"));
    browser.wait_for("form.login");
    assert!(!browser.text().contains("Vaults"), "{}", browser.text());
    // And an agent cannot make itself an account to log the human into.
    let (status, _) = s.server.api(None).post(
        "/v1/auth/register",
        &json!({"email": "agent@example.com", "password": "agent-password"}),
    );
    assert_eq!(status, 403);
}
