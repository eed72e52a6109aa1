//! A stand-in control plane for the tests of what the filter does when the real one
//! misbehaves (DESIGN.md §4): it serves a snapshot (with ETag and 304s), answers
//! credential fetches as told (garbage, errors, slowly) and accepts request logs, on
//! its own Unix socket. [`fake_stack`] puts Envoy with the built filter in front of it.

use std::io::{BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::control_plane::{socket_request, Server};
use crate::envoy::{Envoy, EnvoyOptions};
use crate::http::{proxy_basic, read_request, HttpResponse};
use crate::net::{serve_loopback, Serving};
use crate::upstream::{Echo, TestCa};

/// A stand-in control plane on its own Unix socket; stopped when dropped.
pub struct FakeControlPlane {
    // Before `_dir`: stopping connects to the socket, which goes with the dir.
    _serving: Serving,
    _dir: tempfile::TempDir,
    pub socket: PathBuf,
    state: Arc<Mutex<FakeState>>,
}

/// How the fake answers `POST /v1/dataplane/credentials`.
#[derive(Clone)]
pub enum Credentials {
    /// This status and body (with the control plane's marker header).
    Answer(u16, String),
    /// Waits this long, then answers `200` with this body.
    Slow(Duration, String),
}

struct FakeState {
    etag: String,
    snapshot: Vec<u8>,
    credentials: Credentials,
    /// 200 answers with the current snapshot body, since it was set.
    snapshots_served: usize,
    credential_calls: usize,
}

impl FakeControlPlane {
    /// Serves `snapshot` with ETag `etag` (quoted, as the real one sends it).
    pub fn start(etag: &str, snapshot: Vec<u8>, credentials: Credentials) -> FakeControlPlane {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("fake.sock");
        let listener = UnixListener::bind(&socket).expect("bind fake socket");
        let state = Arc::new(Mutex::new(FakeState {
            etag: etag.to_string(),
            snapshot,
            credentials,
            snapshots_served: 0,
            credential_calls: 0,
        }));
        let serving = {
            let state = state.clone();
            serve_loopback(listener, move |stream| {
                let _ = serve_fake(stream, &state);
            })
        };
        FakeControlPlane {
            _serving: serving,
            _dir: dir,
            socket,
            state,
        }
    }

    pub fn set_credentials(&self, credentials: Credentials) {
        self.state.lock().unwrap().credentials = credentials;
    }

    /// Serves `body` from now on, with ETag `etag`.
    pub fn set_snapshot(&self, etag: &str, body: Vec<u8>) {
        let mut state = self.state.lock().unwrap();
        state.etag = etag.to_string();
        state.snapshot = body;
        state.snapshots_served = 0;
    }

    /// `200` answers with the current snapshot since it was set.
    pub fn snapshots_served(&self) -> usize {
        self.state.lock().unwrap().snapshots_served
    }

    pub fn credential_calls(&self) -> usize {
        self.state.lock().unwrap().credential_calls
    }
}

fn serve_fake(stream: UnixStream, state: &Mutex<FakeState>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    while let Some(request) = read_request(&mut reader)? {
        let (method, path) = (request.method.as_str(), request.path.as_str());
        // The filter's long-poll (`?wait_ms=N`) is answered at once, as a control
        // plane that does not hold them would: the filter then polls periodically.
        let path = path.split_once('?').map_or(path, |(path, _)| path);
        let (status, etag, payload) = match (method, path) {
            ("GET", "/v1/dataplane/snapshot") => {
                let mut state = state.lock().unwrap();
                if request.header("if-none-match") == Some(state.etag.as_str()) {
                    (304, Some(state.etag.clone()), Vec::new())
                } else {
                    state.snapshots_served += 1;
                    (200, Some(state.etag.clone()), state.snapshot.clone())
                }
            }
            ("POST", "/v1/dataplane/credentials") => {
                let credentials = {
                    let mut state = state.lock().unwrap();
                    state.credential_calls += 1;
                    state.credentials.clone()
                };
                match credentials {
                    Credentials::Answer(status, text) => (status, None, text.into_bytes()),
                    Credentials::Slow(delay, text) => {
                        std::thread::sleep(delay);
                        (200, None, text.into_bytes())
                    }
                }
            }
            ("POST", "/v1/dataplane/logs") => (204, None, Vec::new()),
            _ => (404, None, b"{\"error\":\"not_found\"}".to_vec()),
        };
        let mut response = format!(
            "HTTP/1.1 {status} Fake\r\nx-agent-vault-control-plane: 1\r\n\
             content-type: application/json\r\n"
        );
        if let Some(etag) = etag {
            response.push_str(&format!("etag: {etag}\r\n"));
        }
        if status != 204 && status != 304 {
            response.push_str(&format!("content-length: {}\r\n", payload.len()));
        }
        response.push_str("\r\n");
        let stream = reader.get_mut();
        stream.write_all(response.as_bytes())?;
        stream.write_all(&payload)?;
        stream.flush()?;
    }
    Ok(())
}

/// A real snapshot (one bearer service `echo` on `echo`'s port, key `FAKE_KEY`, one
/// agent), read from a real control plane's socket: (version, body, agent token).
fn real_snapshot(echo: &Echo) -> (String, Value, String) {
    let server = Server::start();
    let api = server.api(Some(&server.owner_token()));
    let (status, body) = api.post(
        "/v1/vaults/default/credentials",
        &json!({"credentials": {"FAKE_KEY": "real-server-value"}}),
    );
    assert_eq!(status, 200, "{body}");
    let (status, body) = api.post(
        "/v1/vaults/default/services",
        // Not redacting: the tests read the injected value back from the echo.
        &json!({"name": "echo", "host": echo.authority(), "upstream_tls": false,
                "redact_responses": false,
                "auth": {"type": "bearer", "token": "FAKE_KEY"}}),
    );
    assert_eq!(status, 201, "{body}");
    let (status, body) = api.post(
        "/v1/agents",
        &json!({"name": "faked", "vaults": [{"vault": "default"}]}),
    );
    assert_eq!(status, 201, "{body}");
    let token = body["token"].as_str().expect("token").to_string();
    let answer = socket_request(
        &server.socket(),
        "GET /v1/dataplane/snapshot HTTP/1.1\r\nHost: agent-vault\r\nConnection: close\r\n\r\n",
    )
    .expect("snapshot");
    let (_, json_body) = answer.split_once("\r\n\r\n").expect("a body");
    let snapshot: Value = serde_json::from_str(json_body).expect("snapshot JSON");
    let version = snapshot["version"].as_str().expect("version").to_string();
    (version, snapshot, token)
}

/// The fake's answer to a credential fetch for `FAKE_KEY`: `fake-cp-secret`.
pub const GOOD_VALUES: &str = r#"{"values":{"FAKE_KEY":"fake-cp-secret"},"missing":[]}"#;

/// An echo upstream, the fake control plane serving a real snapshot for it (service
/// `echo`, bearer `FAKE_KEY`, one agent), and Envoy with the built filter on the fake's
/// socket: fast polls (200 ms), no credential cache (every request fetches), a short
/// callout timeout (500 ms). Nothing is warmed up: the test waits for what it needs.
pub struct FakeStack {
    pub envoy: Envoy,
    _dir: tempfile::TempDir,
    pub fake: FakeControlPlane,
    /// The snapshot the fake serves at first.
    pub snapshot: Value,
    /// The agent's token, and its `Proxy-Authorization` for the `default` vault.
    pub token: String,
    pub auth: String,
    pub echo: Echo,
}

/// See [`FakeStack`]; `credentials` is how the fake answers fetches at first.
pub fn fake_stack(credentials: Credentials) -> FakeStack {
    let echo = Echo::plain();
    let (version, snapshot, token) = real_snapshot(&echo);
    let fake = FakeControlPlane::start(
        &format!("\"{version}\""),
        snapshot.to_string().into_bytes(),
        credentials,
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_bundle = TestCa::new("fake cp test").write_pem(&dir.path().join("ca.pem"));
    let envoy = Envoy::start(EnvoyOptions {
        snapshot_poll_ms: 200,
        credential_cache_ttl_ms: 0,
        callout_timeout_ms: 500,
        ..EnvoyOptions::forward_proxy(&fake.socket, &ca_bundle)
    });
    let auth = proxy_basic(&token, "default");
    FakeStack {
        envoy,
        _dir: dir,
        fake,
        snapshot,
        token,
        auth,
        echo,
    }
}

impl FakeStack {
    /// `GET` the echo's `path` through Envoy as the agent.
    pub fn get(&self, path: &str) -> HttpResponse {
        self.envoy.get(
            &self.echo.url(path),
            &[("Proxy-Authorization", self.auth.as_str())],
        )
    }
}
