//! Durability, encryption at rest, the master key and the data-plane socket's trust
//! boundary, tested against the real `agent-vault` binary.
//!
//! What holds for every store runs on both backends, with one body each: sled in the
//! data dir, and PostgreSQL (`--store`, a database of its own on the test process's
//! server, [`Backend`]); the `_on_sled` and `_on_postgres` tests call the same
//! function.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use agent_vault_testkit::control_plane::{
    binary, bytes_on_disk, socket_request, Backend, Server, ServerOptions,
};

fn set(server: &Server, token: &str, key: &str, value: &str) {
    let (status, body) = server.api(Some(token)).post(
        "/v1/vaults/default/credentials",
        &json!({"credentials": {key: value}}),
    );
    assert_eq!(status, 200, "set {key}: {body}");
}

fn get(server: &Server, token: &str, key: &str) -> (u16, Value) {
    server
        .api(Some(token))
        .get(&format!("/v1/vaults/default/credentials/{key}"))
}

/// One `#[test]` per backend, each running `body` on it.
macro_rules! on_both_backends {
    ($body:ident: $sled:ident, $postgres:ident) => {
        #[test]
        fn $sled() {
            $body(Backend::Sled);
        }

        #[test]
        fn $postgres() {
            $body(Backend::Postgres);
        }
    };
}

on_both_backends!(secret_bytes_appear_in_no_file_under_the_data_dir_or_the_log:
    secret_bytes_appear_in_no_file_under_the_data_dir_or_the_log_on_sled,
    secret_bytes_appear_in_no_file_under_the_data_dir_or_the_log_on_postgres);

/// On PostgreSQL, also in no file of the database server (its tables, its WAL) nor
/// its log.
fn secret_bytes_appear_in_no_file_under_the_data_dir_or_the_log(backend: Backend) {
    for password in [None, Some("correct-horse-battery")] {
        let mut server = Server::start_with(ServerOptions {
            password: password.map(str::to_string),
            ..backend.options("secret_bytes")
        });
        let token = server.owner_token();
        let secret = "sk_live_DISTINCTIVE_0123456789abcdef";
        set(&server, &token, "STRIPE_KEY", secret);
        set(&server, &token, "STRIPE_KEY", &format!("{secret}-v2"));
        let (status, _) = get(&server, &token, "STRIPE_KEY");
        assert_eq!(status, 200);
        server.stop();
        let mut dirs = vec![server.data_dir()];
        if backend == Backend::Postgres {
            let cluster = agent_vault_pgtest::shared();
            // What the server wrote is on disk once it acknowledged it (the WAL).
            dirs.push(cluster.data_dir().to_path_buf());
            // The search would see a value stored as is: the key's name is there.
            assert!(
                !bytes_on_disk(cluster.data_dir(), b"STRIPE_KEY").is_empty(),
                "the database's files hold what the server wrote"
            );
            assert!(
                !cluster.log_text().contains(secret),
                "secret in PostgreSQL's log"
            );
        }
        for dir in &dirs {
            let found = bytes_on_disk(dir, secret.as_bytes());
            assert!(found.is_empty(), "secret found on disk in {found:?}");
        }
        assert!(!server.logs().contains(secret), "secret in the server log");
        if let Some(password) = password {
            for dir in &dirs {
                let found = bytes_on_disk(dir, password.as_bytes());
                assert!(found.is_empty(), "master password on disk in {found:?}");
            }
            assert!(
                !server.data_dir().join("master.key").exists(),
                "no key file with a password"
            );
        } else {
            let mode = std::fs::metadata(server.data_dir().join("master.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "key file is private");
            assert!(server.logs().contains("passwordless"), "announced at start");
        }
    }
}

on_both_backends!(a_wrong_or_missing_master_password_is_refused_and_the_right_one_opens:
    a_wrong_or_missing_master_password_is_refused_and_the_right_one_opens_on_sled,
    a_wrong_or_missing_master_password_is_refused_and_the_right_one_opens_on_postgres);

fn a_wrong_or_missing_master_password_is_refused_and_the_right_one_opens(backend: Backend) {
    let mut server = Server::start_with(ServerOptions {
        password: Some("correct-horse-battery".into()),
        ..backend.options("wrong_password")
    });
    let token = server.owner_token();
    set(&server, &token, "A", "value-a");

    server.set_password(Some("wrong-horse-battery"));
    let err = server
        .try_restart()
        .expect_err("wrong password must not start");
    assert!(err.contains("wrong master password"), "{err}");

    server.set_password(None);
    let err = server
        .try_restart()
        .expect_err("missing password must not start");
    assert!(err.contains("protected by a master password"), "{err}");

    server.set_password(Some("correct-horse-battery"));
    server.restart();
    let (status, body) = get(&server, &token, "A");
    assert_eq!((status, body["value"].as_str()), (200, Some("value-a")));
}

on_both_backends!(kill_9_during_a_burst_of_sets_loses_no_acknowledged_write:
    kill_9_during_a_burst_of_sets_loses_no_acknowledged_write_on_sled,
    kill_9_during_a_burst_of_sets_loses_no_acknowledged_write_on_postgres);

/// On PostgreSQL, another control plane on the same database reads them too, without
/// the killed one running.
fn kill_9_during_a_burst_of_sets_loses_no_acknowledged_write(backend: Backend) {
    let mut server = Server::start_with(backend.options("kill_9_burst"));
    let token = server.owner_token();
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let url = server.url();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (acked, stop, url, token) =
                (acked.clone(), stop.clone(), url.clone(), token.clone());
            std::thread::spawn(move || {
                let client = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .unwrap();
                for i in 0.. {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let key = format!("K_{w}_{i}");
                    let value = format!("v-{w}-{i}");
                    let sent = client
                        .post(format!("{url}/v1/vaults/default/credentials"))
                        .bearer_auth(&token)
                        .json(&json!({"credentials": {&key: &value}}))
                        .send();
                    match sent {
                        Ok(resp) if resp.status() == 200 => {
                            acked.lock().unwrap().push((key, value))
                        }
                        _ => break, // the server is gone: this write was never acknowledged
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    server.kill9();
    stop.store(true, Ordering::SeqCst);
    for writer in writers {
        writer.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 20,
        "the burst wrote something: {}",
        acked.len()
    );

    let stored = |server: &Server| {
        let (status, listed) = server
            .api(Some(&token))
            .get("/v1/vaults/default/credentials?reveal=true");
        assert_eq!(status, 200, "{listed}");
        listed
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["key"].as_str().unwrap().to_string(),
                    c["value"].as_str().unwrap().to_string(),
                )
            })
            .collect::<std::collections::HashMap<String, String>>()
    };
    let mut readers = Vec::new();
    if backend == Backend::Postgres {
        readers.push(server.join());
    }
    server.restart();
    readers.push(server);
    for reader in &readers {
        let stored = stored(reader);
        for (key, value) in &acked {
            assert_eq!(
                stored.get(key),
                Some(value),
                "acknowledged {key} lost after kill -9 ({} written)",
                acked.len()
            );
        }
    }
}

on_both_backends!(values_survive_restart_and_master_key_rotation:
    values_survive_restart_and_master_key_rotation_on_sled,
    values_survive_restart_and_master_key_rotation_on_postgres);

fn values_survive_restart_and_master_key_rotation(backend: Backend) {
    let mut server = Server::start_with(backend.options("key_rotation"));
    let token = server.owner_token();
    for i in 0..5 {
        set(&server, &token, &format!("KEY_{i}"), &format!("value-{i}"));
    }
    let api = server.api(Some(&token));
    let (status, body) = api.post("/v1/master-key/rotate", &json!({}));
    assert_eq!(
        (status, body["reencrypted"].as_u64()),
        (200, Some(5)),
        "{body}"
    );
    for i in 0..5 {
        let (_, body) = get(&server, &token, &format!("KEY_{i}"));
        assert_eq!(body["value"], format!("value-{i}"));
    }
    server.restart();
    for i in 0..5 {
        let (_, body) = get(&server, &token, &format!("KEY_{i}"));
        assert_eq!(body["value"], format!("value-{i}"));
    }
}

on_both_backends!(master_password_change_rewraps_and_is_needed_from_then_on:
    master_password_change_rewraps_and_is_needed_from_then_on_on_sled,
    master_password_change_rewraps_and_is_needed_from_then_on_on_postgres);

fn master_password_change_rewraps_and_is_needed_from_then_on(backend: Backend) {
    let mut server = Server::start_with(backend.options("password_change"));
    let token = server.owner_token();
    set(&server, &token, "A", "value-a");
    let api = server.api(Some(&token));

    let (status, body) = api.post(
        "/v1/master-password",
        &json!({"current": "not-the-password", "new": "new-master-pass"}),
    );
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_credentials")),
        "{body}"
    );
    let (status, body) = api.post(
        "/v1/master-password",
        &json!({"current": null, "new": "short"}),
    );
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("weak_password"))
    );

    let (status, body) = api.post(
        "/v1/master-password",
        &json!({"current": null, "new": "new-master-pass"}),
    );
    assert_eq!(status, 204, "{body}");
    assert!(!server.data_dir().join("master.key").exists());

    server.set_password(None);
    assert!(server.try_restart().is_err(), "now a password is required");
    server.set_password(Some("new-master-pass"));
    server.restart();
    let (_, body) = get(&server, &token, "A");
    assert_eq!(body["value"], "value-a");

    // Without a session nobody can rotate the key.
    let (status, _) = server.api(None).post("/v1/master-key/rotate", &json!({}));
    assert_eq!(status, 401);
}

#[test]
fn the_socket_is_private_and_serves_only_the_data_plane() {
    let server = Server::start();
    let socket = server.socket();
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "socket file mode");
    let dir_mode = std::fs::metadata(socket.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o777, 0o700, "socket directory mode");

    let snapshot = socket_request(
        &socket,
        "GET /v1/dataplane/snapshot HTTP/1.1\r\nHost: cp\r\nConnection: close\r\n\r\n",
    )
    .expect("answer");
    assert!(snapshot.starts_with("HTTP/1.1 200"), "{snapshot}");
    assert!(snapshot
        .to_ascii_lowercase()
        .contains("x-agent-vault-control-plane"));

    // The management API never answers on the socket...
    let api = socket_request(
        &socket,
        "GET /v1/vaults HTTP/1.1\r\nHost: cp\r\nConnection: close\r\n\r\n",
    )
    .expect("answer");
    assert!(api.starts_with("HTTP/1.1 404"), "{api}");
    let health = socket_request(
        &socket,
        "GET /health HTTP/1.1\r\nHost: cp\r\nConnection: close\r\n\r\n",
    )
    .expect("answer");
    assert!(health.starts_with("HTTP/1.1 404"), "{health}");
    // ...and the data-plane routes never answer on TCP.
    let (status, _) = server.api(None).get("/v1/dataplane/snapshot");
    assert_eq!(status, 404);
    let (status, _) = server.api(None).post(
        "/v1/dataplane/credentials",
        &json!({"token_sha256": "00", "vault": "default", "keys": ["A"]}),
    );
    assert_eq!(status, 404);
}

#[test]
fn a_live_socket_is_refused_and_a_stale_one_replaced() {
    let mut first = Server::start();
    // A second server on the same socket must refuse to start.
    let output = std::process::Command::new(binary())
        .args(["server", "--port", "0", "--data-dir"])
        .arg(first.dir.path().join("other-data"))
        .arg("--socket")
        .arg(first.socket())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("already listening"), "{stderr}");

    // kill -9 leaves the socket file behind; the next start replaces it.
    first.kill9();
    assert!(first.socket().exists(), "stale socket left behind");
    first.restart();
    let answer = socket_request(
        &first.socket(),
        "GET /v1/dataplane/snapshot HTTP/1.1\r\nHost: cp\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.is_some_and(|a| a.starts_with("HTTP/1.1 200")));
}

/// Connects to `socket` as uid/gid 65534 (nobody) and reports what happened.
fn connect_as_nobody(socket: &std::path::Path) -> String {
    let script = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("connect-error", e.errno); sys.exit(0)
s.settimeout(5)
try:
    s.sendall(b"GET /v1/dataplane/snapshot HTTP/1.1\r\nHost: cp\r\nConnection: close\r\n\r\n")
except OSError as e:
    print("closed", e.errno); sys.exit(0)
data = b""
try:
    while True:
        chunk = s.recv(65536)
        if not chunk: break
        data += chunk
except OSError as e:
    print("recv-error", e.errno); sys.exit(0)
print("answer" if data else "closed", data[:12])
"#;
    let output = std::process::Command::new(system_python())
        .args(["-c", script])
        .arg(socket)
        .uid(65534)
        .gid(65534)
        .output()
        .expect("python3 as nobody");
    let stdout = String::from_utf8_lossy(&output.stdout).trim().to_string();
    assert!(
        !stdout.is_empty(),
        "python3 as nobody printed nothing (status {:?}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn only_an_allowed_peer_can_talk_to_the_socket() {
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    assert_eq!(
        uid, 0,
        "this test switches to another uid and must run as root (CI does)"
    );
    let server = Server::start();
    let socket = server.socket();
    // First line of defence: the directory and file modes keep others out.
    let outcome = connect_as_nobody(&socket);
    assert!(outcome.starts_with("connect-error"), "{outcome}");

    // Second line: even with the modes opened up, SO_PEERCRED refuses the peer.
    let dir = socket.parent().unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o777)).unwrap();
    let outcome = connect_as_nobody(&socket);
    assert!(
        outcome.starts_with("closed") || outcome.starts_with("recv-error"),
        "a disallowed peer got: {outcome}"
    );
    assert!(server.logs().contains("not allowed"), "refusal logged");
    // The allowed user still gets answers.
    let answer = socket_request(
        &socket,
        "GET /v1/dataplane/snapshot HTTP/1.1\r\nHost: cp\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.is_some_and(|a| a.starts_with("HTTP/1.1 200")));
}

/// A python3 that uid 65534 can run: Debian's, not a shim under root's home.
fn system_python() -> &'static str {
    if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}
