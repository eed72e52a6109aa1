//! End-to-end regression tests of the security review's findings on the control
//! plane's authentication, store and limits (DESIGN.md §11.5, 6, 8, 12): each test
//! reproduces an attack as the review describes it against the real `agent-vault
//! server` and shows that it no longer works.

use std::time::Duration;

use serde_json::{json, Value};

use agent_vault_testkit::control_plane::{Api, Server};

const OWNER: &str = "owner@example.com";
const OWNER_PASSWORD: &str = "owner-password";

/// Raw HTTP without a token, with a timeout so a wedged server fails the test.
fn anonymous(server: &Server) -> Api {
    Api {
        base: server.url(),
        token: None,
        client: reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("http client"),
    }
}

/// A server whose owner registered and logged in with the CLI, as the human does.
fn server_with_owner() -> Server {
    let server = Server::start();
    server.cli().register_and_login(OWNER, OWNER_PASSWORD);
    server
}

/// A line of `/proc/<pid>/status` in kB (`VmHWM`: the peak resident set size).
fn proc_status_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {status}"))
}

// ------------------------------------------------------------------ M5, M6

#[test]
fn parallel_anonymous_registrations_and_logins_keep_the_servers_memory_bounded() {
    let server = server_with_owner();
    let pid = server.pid().expect("running");
    let before_kb = proc_status_kb(pid, "VmHWM");
    // The review: 64 such requests took the server from 166 MB to 2.6 GB. Here 32
    // registrations (unknown emails, no invite) and 32 logins (unknown emails and
    // the owner's with a wrong password), all at once.
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let requests: Vec<_> = (0..64)
            .map(|i| {
                let api = anonymous(&server);
                scope.spawn(move || {
                    let (status, _) = if i % 2 == 0 {
                        api.post(
                            "/v1/auth/register",
                            &json!({"email": format!("x{i}@e.com"), "password": "aaaaaaaaaa"}),
                        )
                    } else {
                        let email = if i % 4 == 1 {
                            OWNER.to_string()
                        } else {
                            format!("y{i}@e.com")
                        };
                        api.post(
                            "/v1/auth/login",
                            &json!({"email": email, "password": "wrong-password"}),
                        )
                    };
                    status
                })
            })
            .collect();
        requests.into_iter().map(|r| r.join().unwrap()).collect()
    });
    for status in &statuses {
        assert!([401, 403, 429].contains(status), "{statuses:?}");
    }
    let peak_kb = proc_status_kb(pid, "VmHWM");
    eprintln!("peak RSS: {before_kb} kB before, {peak_kb} kB after");
    assert!(
        peak_kb < 256 * 1024,
        "the server's peak RSS reached {peak_kb} kB (from {before_kb} kB)"
    );
    // And it still serves the owner.
    let (status, body) = anonymous(&server).get("/health");
    assert_eq!(status, 200, "{body}");
}

#[test]
fn failed_logins_for_the_owners_email_never_lock_the_owner_out() {
    let server = server_with_owner();
    let api = anonymous(&server);
    // What an agent can do: fail logins for the owner's email, over and over.
    let mut refusals = Vec::new();
    for _ in 0..8 {
        let (status, body) = api.post(
            "/v1/auth/login",
            &json!({"email": OWNER, "password": "not-the-password"}),
        );
        refusals.push((status, body["error"].clone()));
    }
    assert_eq!(
        refusals[0],
        (401, json!("invalid_credentials")),
        "{refusals:?}"
    );
    assert_eq!(refusals[7], (429, json!("rate_limited")), "{refusals:?}");

    // The owner, on the server's machine as the server's user, logs in at once.
    let owner = server.cli();
    owner
        .run_stdin(
            &["auth", "login", "--email", OWNER, "--password-stdin"],
            &format!("{OWNER_PASSWORD}\n"),
        )
        .ok();
    let whoami = owner.run(&["auth", "whoami"]).ok();
    assert!(whoami.stdout.contains(OWNER), "{}", whoami.stdout);

    // Logins without the local proof wait, and say for how long.
    let (status, body) = api.post(
        "/v1/auth/login",
        &json!({"email": OWNER, "password": OWNER_PASSWORD}),
    );
    assert_eq!(status, 429, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("try again in"),
        "{body}"
    );
    // A bounded wait: the first delays are seconds, not the old 15-minute lock.
    std::thread::sleep(Duration::from_secs(9));
    let (status, body) = api.post(
        "/v1/auth/login",
        &json!({"email": OWNER, "password": OWNER_PASSWORD}),
    );
    assert_eq!(status, 200, "{body}");
}

#[test]
fn registration_without_a_valid_invite_does_not_tell_whether_an_email_exists() {
    let server = server_with_owner();
    let api = anonymous(&server);
    for invite in [None, Some("av_inv_0123")] {
        let answers: Vec<(u16, Value)> = [OWNER, "nobody@example.com"]
            .into_iter()
            .map(|email| {
                let mut body = json!({"email": email, "password": "some-password"});
                if let Some(invite) = invite {
                    body["invite"] = json!(invite);
                }
                api.post("/v1/auth/register", &body)
            })
            .collect();
        assert_eq!(answers[0], answers[1], "invite {invite:?}");
        assert_eq!(answers[0].0, 403, "{answers:?}");
    }
}

// ------------------------------------------------------------------ L3

#[test]
fn a_fresh_install_is_claimed_only_with_the_bootstrap_token_and_only_once() {
    use std::os::unix::fs::PermissionsExt;
    let server = Server::start();
    let api = anonymous(&server);
    let file = server.data_dir().join("bootstrap-token");
    let mode = std::fs::metadata(&file)
        .expect("token file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "only the server's user reads it");
    assert!(
        server.logs().contains("bootstrap-token"),
        "{}",
        server.logs()
    );

    // The review's attack: anyone local (or a rebinding page) registers first.
    let agent = json!({"email": "agent@x", "password": "aaaaaaaaaa"});
    let (status, body) = api.post("/v1/auth/register", &agent);
    assert_eq!(
        (status, &body["error"]),
        (403, &json!("bootstrap_token_required"))
    );
    let mut guessed = agent.clone();
    guessed["bootstrap_token"] = json!("av_boot_0000");
    let (status, body) = api.post("/v1/auth/register", &guessed);
    assert_eq!(
        (status, &body["error"]),
        (403, &json!("invalid_bootstrap_token"))
    );
    // Another OS user's CLI cannot read the data dir, and says what is missing.
    let other = server.other_cli("agent");
    let out = other
        .run_stdin(
            &["auth", "register", "--email", "agent@x", "--password-stdin"],
            "aaaaaaaaaa\n",
        )
        .fails();
    assert!(out.stderr.contains("bootstrap"), "{}", out.stderr);

    // The human, as the server's user: the seed's command, nothing more.
    let token = server.bootstrap_token().expect("token");
    let owner = server.cli();
    let out = owner
        .run_stdin(
            &["auth", "register", "--email", OWNER, "--password-stdin"],
            &format!("{OWNER_PASSWORD}\n"),
        )
        .ok();
    assert!(out.stdout.contains("as the owner"), "{}", out.stdout);
    assert!(!file.exists(), "the token is used up");
    let mut late = agent.clone();
    late["bootstrap_token"] = json!(token);
    let (status, body) = api.post("/v1/auth/register", &late);
    assert_eq!((status, &body["error"]), (403, &json!("invite_required")));
    // A restart with an owner writes no new token.
    let mut server = server;
    server.restart();
    assert_eq!(server.bootstrap_token(), None);
}

#[test]
fn requests_for_a_host_that_is_not_this_server_are_refused() {
    let server = Server::start();
    let api = anonymous(&server);
    let port = server.addr.rsplit(':').next().unwrap().to_string();
    let evil = format!("evil.example:{port}");
    for path in ["/health", "/v1/auth/whoami", "/ui/login"] {
        let (status, body) = api.get_with(path, &[("host", &evil)]);
        assert_eq!(status, 421, "{path}: {body}");
        assert_eq!(body["error"], "host_not_allowed", "{path}");
    }
    // The DNS-rebinding registration of the review gets nowhere either.
    let response = api
        .client
        .post(format!("{}/v1/auth/register", server.url()))
        .header("host", &evil)
        .header("content-type", "application/json")
        .body(r#"{"email":"agent@x","password":"aaaaaaaaaa"}"#)
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 421);
    for host in [format!("localhost:{port}"), format!("127.0.0.1:{port}")] {
        let (status, body) = api.get_with("/health", &[("host", &host)]);
        assert_eq!(status, 200, "{host}: {body}");
    }
}
