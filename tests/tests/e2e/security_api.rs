//! End-to-end regression tests of the security review's findings on the control
//! plane's authentication, store and limits (DESIGN.md §11.5, 6, 8, 12): each test
//! reproduces an attack as the review describes it against the real `agent-vault
//! server` and shows that it no longer works.

use std::time::Duration;

use serde_json::{json, Value};

use agent_vault_testkit::control_plane::{socket_request, Api, Server};

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
    let held_back = std::time::Instant::now();

    // Logins without the local proof wait, even with the right password, and say for
    // how long.
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

    // And the wait is bounded: seconds after five failures, not the old 15-minute lock.
    std::thread::sleep(Duration::from_secs(6).saturating_sub(held_back.elapsed()));
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

// ------------------------------------------------------------------ L1

/// Posts request-log records on the data-plane socket, as Envoy's filter does.
fn post_log_records(server: &Server, records: &[Value]) {
    let body = Value::from(records.to_vec()).to_string();
    let mut request = format!(
        "POST /v1/dataplane/logs HTTP/1.1\r\nHost: cp\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body.as_bytes());
    let answer = socket_request(&server.socket(), request).expect("an answer on the socket");
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
}

fn log_record(path: &str, service: Option<&str>, status: u16, error: Option<&str>) -> Value {
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    json!({
        "ts": ts, "agent": "claude", "vault": "default", "method": "POST",
        "host": "api.stripe.com", "path": path, "service": service, "status": status,
        "latency_ms": 3, "error": error
    })
}

#[test]
fn an_agent_cannot_flush_the_audit_trail_with_refused_requests() {
    let server = server_with_owner();
    let token = server.owner_token();
    // What the agent did with the credential…
    let forwarded: Vec<Value> = (0..3)
        .map(|i| log_record(&format!("/v1/charges/{i}"), Some("stripe"), 200, None))
        .collect();
    post_log_records(&server, &forwarded);
    // …then 10,050 cheap refusals to push it out of the vault's 10,000 records.
    let refusal = |i: usize| log_record(&format!("/flood/{i}"), None, 403, Some("forbidden"));
    for start in (0..10_050).step_by(1000) {
        let batch: Vec<Value> = (start..(start + 1000).min(10_050)).map(refusal).collect();
        post_log_records(&server, &batch);
    }
    let (status, page) = server
        .api(Some(&token))
        .get("/v1/vaults/default/logs?after=0&limit=5");
    assert_eq!(status, 200, "{page}");
    let paths: Vec<&str> = page["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            "/v1/charges/0",
            "/v1/charges/1",
            "/v1/charges/2",
            "/flood/50",
            "/flood/51"
        ]
    );
}

// ------------------------------------------------------------------ L2, S4 (API half)

#[test]
fn a_connection_that_sends_half_its_headers_is_closed_after_the_header_timeout() {
    use std::io::{Read, Write};
    let server = Server::start();
    // The review's slowloris: half a request, then nothing (it stayed open 70 s).
    let mut stream = std::net::TcpStream::connect(&server.addr).unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let read = stream.read_to_end(&mut rest);
    let waited = started.elapsed();
    assert!(
        read.is_ok()
            || read
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "still open after {waited:?}: {read:?}"
    );
    assert!(waited < Duration::from_secs(20), "{waited:?}");
}

#[test]
fn hundreds_of_idle_connections_do_not_stop_a_new_clients_request() {
    let server = server_with_owner();
    let token = server.owner_token();
    let idle: Vec<std::net::TcpStream> = (0..300)
        .map(|_| std::net::TcpStream::connect(&server.addr).unwrap())
        .collect();
    let started = std::time::Instant::now();
    let (status, body) = server.api(Some(&token)).get("/v1/vaults");
    assert_eq!(status, 200, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    drop(idle);
}

#[test]
fn answers_that_carry_values_are_marked_no_store() {
    let server = server_with_owner();
    let token = server.owner_token();
    let api = server.api(Some(&token));
    let (status, body) = api.post(
        "/v1/vaults/default/credentials",
        &json!({"credentials": {"STRIPE_KEY": "sk_test_abc123"}}),
    );
    assert_eq!(status, 200, "{body}");
    for path in [
        "/v1/vaults/default/credentials?reveal=true",
        "/v1/vaults/default/credentials/STRIPE_KEY",
    ] {
        let response = api
            .client
            .get(format!("{}{path}", server.url()))
            .bearer_auth(&token)
            .send()
            .unwrap();
        assert_eq!(response.status().as_u16(), 200, "{path}");
        assert_eq!(
            response
                .headers()
                .get("cache-control")
                .map(|v| v.as_bytes()),
            Some(&b"no-store"[..]),
            "{path}"
        );
    }
}

// ------------------------------------------------------------------ L7

/// `agent-vault server` on port 0 with `args`; its stderr goes to `log`.
fn spawn_server(
    args: &[&std::ffi::OsStr],
    home: &std::path::Path,
    log: &std::path::Path,
) -> std::process::Child {
    use agent_vault_testkit::process::die_with_parent;
    let mut command = std::process::Command::new(agent_vault_testkit::control_plane::binary());
    command
        .arg("server")
        .args(["--port", "0"])
        .args(args)
        .env_remove("AGENT_VAULT_MASTER_PASSWORD")
        .env("HOME", home)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap());
    die_with_parent(&mut command)
        .spawn()
        .expect("spawn agent-vault server")
}

fn set_mode(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn mode_of(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn a_socket_in_a_shared_directory_is_refused_at_start_and_the_directory_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    // Like /tmp: everyone may create files there.
    let shared = tmp.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    set_mode(&shared, 0o1777);
    let (data, log) = (tmp.path().join("data"), tmp.path().join("server.log"));
    let socket = shared.join("dataplane.sock");
    let mut child = spawn_server(
        &[
            "--data-dir".as_ref(),
            data.as_os_str(),
            "--socket".as_ref(),
            socket.as_os_str(),
        ],
        tmp.path(),
        &log,
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "the server started");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(stderr.contains("is shared"), "{stderr}");
    assert_eq!(mode_of(&shared), 0o1777, "the shared directory was changed");
    assert!(!socket.exists());
}

#[test]
fn a_data_dir_others_can_enter_is_warned_about_at_start() {
    use agent_vault_testkit::process::{announced_address, stop_gracefully};
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    set_mode(&data, 0o755);
    let log = tmp.path().join("server.log");
    let socket = tmp.path().join("run").join("dataplane.sock");
    let mut child = spawn_server(
        &[
            "--data-dir".as_ref(),
            data.as_os_str(),
            "--socket".as_ref(),
            socket.as_os_str(),
        ],
        tmp.path(),
        &log,
    );
    let addr = announced_address(&mut child, Duration::from_secs(30));
    stop_gracefully(child, Duration::from_secs(10));
    assert!(addr.is_some(), "{}", std::fs::read_to_string(&log).unwrap());
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(
        stderr.contains("WARNING: the data dir") && stderr.contains("0755"),
        "{stderr}"
    );
    assert_eq!(
        mode_of(&data),
        0o755,
        "the operator's directory is not changed"
    );
    assert_eq!(
        mode_of(&tmp.path().join("run")),
        0o700,
        "a directory it creates is private"
    );
}
