//! HTTP/2, gRPC and WebSocket through the proxy, end to end (issue 16): the real Envoy
//! with the built filter and real clients and servers on loopback.
//!
//! - TLS upstreams speak what they offer by ALPN: one that speaks only HTTP/2 and one
//!   that speaks only HTTP/1.1, from the same kind of service rule.
//! - gRPC (Python `grpcio`, `scripts/grpc_echo.py`): unary and server-streaming calls,
//!   the credential checked by the server; over h2c on the proxy's port to a plain h2c
//!   upstream (`upstream_h2c`), and over TLS inside a `CONNECT` tunnel (`https_proxy`)
//!   to a TLS upstream; refusals read by the client as gRPC statuses.
//! - WebSocket (`tungstenite`): the upgrade authenticated and injected (`ws://` through
//!   the proxy, `wss://` inside a tunnel), frames round-trip untouched, 407 before any
//!   upgrade, and a revoked agent's open WebSocket closed.

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use tungstenite::{ClientRequestBuilder, Message};

use agent_vault_testkit::control_plane::ServerOptions;
use agent_vault_testkit::envoy::workspace_root;
use agent_vault_testkit::http::{proxy_basic, Stream};
use agent_vault_testkit::https_agent::{connect, HttpsTunnel, TlsOptions};
use agent_vault_testkit::net::{serve_loopback, Serving};
use agent_vault_testkit::process::die_with_parent;
use agent_vault_testkit::stack::{wait_for, Stack};
use agent_vault_testkit::upstream::{Echo, TestCa};

use crate::https_proxy::curl;

/// Long enough for the filter's first snapshot poll.
const FIRST_SNAPSHOT: Duration = Duration::from_secs(5);
/// How long a change may take to reach every worker (the long-poll brings it in
/// milliseconds; the margin is for a loaded test machine).
const PROPAGATION: Duration = Duration::from_secs(5);

/// The credential every service here injects, as `authorization: Bearer <it>`.
const SECRET: &str = "sk-protocols-0123456789";

/// A stack whose Envoy may reach exactly `ports` on 127.0.0.1, with the upstream CA
/// `ca`, an agent `agent` of vault `default` and `SECRET` as its credential `TOKEN`.
struct System {
    stack: Stack,
    token: String,
}

impl System {
    fn start(ca: TestCa, ports: &[u16]) -> System {
        let allowed: Vec<String> = ports.iter().map(|p| format!("127.0.0.1/32:{p}")).collect();
        let stack = Stack::start_with_ca(ServerOptions::default(), ca, |options| {
            let allowed: Vec<&str> = allowed.iter().map(String::as_str).collect();
            options.allow_private_upstreams(&allowed)
        });
        stack.set_credential("default", "TOKEN", SECRET);
        let token = stack.create_agent("agent", &["default"]);
        System { stack, token }
    }

    /// A bearer service `name` for `host`, plus `extra` fields.
    fn add_service(&self, name: &str, host: &str, extra: Value) {
        let mut service = json!({"name": name, "host": host,
                                 "auth": {"type": "bearer", "token": "TOKEN"}});
        if let (Some(service), Value::Object(extra)) = (service.as_object_mut(), extra) {
            service.extend(extra);
        }
        self.stack.add_service("default", service);
    }

    fn proxy_auth(&self) -> String {
        proxy_basic(&self.token, "default")
    }

    /// `http://token:default@127.0.0.1:<proxy port>`.
    fn proxy_url(&self) -> String {
        format!(
            "http://{}:default@127.0.0.1:{}",
            self.token, self.stack.envoy.port
        )
    }

    fn proxy_ca(&self) -> PathBuf {
        self.stack.server.proxy_ca()
    }
}

// --- TLS upstreams by ALPN ------------------------------------------------------------

/// A TLS upstream that speaks only HTTP/2 (ALPN `h2` and nothing else), answering
/// every request with the JSON of what it received.
struct H2Echo {
    port: u16,
    received: Arc<Mutex<Vec<Value>>>,
    _runtime: tokio::runtime::Runtime,
}

impl H2Echo {
    fn start(ca: &TestCa) -> H2Echo {
        let acceptor = tokio_rustls::TlsAcceptor::from(ca.server_config(&[b"h2"]));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let seen = received.clone();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, seen) = (acceptor.clone(), seen.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Ok(mut connection) = h2::server::handshake(tls).await else {
                        return;
                    };
                    while let Some(Ok((request, mut respond))) = connection.accept().await {
                        let mut headers = Map::new();
                        for (name, value) in request.headers() {
                            let value = value.to_str().unwrap_or_default();
                            headers.insert(name.as_str().to_owned(), Value::from(value));
                        }
                        let echo = json!({
                            "method": request.method().as_str(),
                            "path": request.uri().path(),
                            "headers": headers,
                            "version": format!("{:?}", request.version()),
                        });
                        seen.lock().expect("received").push(echo.clone());
                        let response = http::Response::builder()
                            .status(200)
                            .header("content-type", "application/json")
                            .body(())
                            .expect("a response");
                        if let Ok(mut body) = respond.send_response(response, false) {
                            let _ = body.send_data(bytes::Bytes::from(echo.to_string()), true);
                        }
                    }
                });
            }
        });
        H2Echo {
            port,
            received,
            _runtime: runtime,
        }
    }

    fn received(&self) -> Vec<Value> {
        self.received.lock().expect("received").clone()
    }
}

#[test]
fn tls_upstreams_get_http2_or_http1_as_they_offer_by_alpn_from_the_same_kind_of_rule() {
    let ca = TestCa::new("upstream test CA");
    let h1 = Echo::tls(&ca);
    let h2 = H2Echo::start(&ca);
    let system = System::start(ca, &[h1.port, h2.port]);
    system.add_service("h1", &h1.authority(), json!({}));
    system.add_service("h2", &format!("localhost:{}", h2.port), json!({}));
    let auth = system.proxy_auth();
    let bearer = format!("Bearer {SECRET}");

    // A plain-HTTP agent (HTTP_PROXY): Envoy originates TLS and speaks what ALPN chose.
    let to_h2 = format!("http://localhost:{}/v1/ping", h2.port);
    let response = wait_for(FIRST_SNAPSHOT, || {
        let response = system
            .stack
            .envoy
            .get(&to_h2, &[("Proxy-Authorization", &auth)]);
        (response.status == 200).then_some(response)
    })
    .unwrap_or_else(|| {
        panic!(
            "the h2-only upstream answers\n{}",
            system.stack.envoy.log_tail(30)
        )
    });
    let seen: Value = serde_json::from_str(&response.body).expect("json");
    assert_eq!(seen["version"], "HTTP/2.0", "{seen}");
    assert_eq!(seen["headers"]["authorization"], bearer.as_str());
    assert!(
        seen["headers"].get("proxy-authorization").is_none(),
        "{seen}"
    );

    let response = system
        .stack
        .envoy
        .get(&h1.url("/v1/ping"), &[("Proxy-Authorization", &auth)]);
    assert_eq!(response.status, 200, "{}", response.body);
    let seen = h1
        .received()
        .pop()
        .expect("the http/1.1 upstream got the request");
    assert_eq!(seen["headers"]["authorization"], bearer.as_str());
    assert_eq!(seen["tls"], true);

    // An HTTPS agent (CONNECT), HTTP/2 inside the tunnel: the same to both.
    let ca_file = system.proxy_ca();
    for (url, expect_h2) in [
        (
            format!("https://localhost:{}/v2/over-tunnel", h2.port),
            true,
        ),
        (
            format!("https://localhost:{}/v2/over-tunnel", h1.port),
            false,
        ),
    ] {
        let out = curl(&system.proxy_url(), &ca_file, &["--http2", &url]);
        assert_eq!((out.code, out.status), (0, 200), "{url}: {}", out.stderr);
        let seen = out.json();
        assert_eq!(seen["headers"]["authorization"], bearer.as_str(), "{seen}");
        assert_eq!(seen["path"], "/v2/over-tunnel");
        assert_eq!(seen.get("version").is_some(), expect_h2, "{seen}");
    }
    assert_eq!(h2.received().len(), 2);
}

// --- gRPC -------------------------------------------------------------------------------

fn python() -> PathBuf {
    workspace_root().join(".venv/bin/python3")
}

fn grpc_script() -> PathBuf {
    workspace_root().join("scripts/grpc_echo.py")
}

/// `scripts/grpc_echo.py serve`: a grpcio server on loopback that requires
/// `authorization: Bearer SECRET`; TLS with a certificate from `ca` when given.
struct GrpcServer {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl GrpcServer {
    fn start(ca: Option<&TestCa>) -> GrpcServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut command = Command::new(python());
        command
            .arg(grpc_script())
            .arg("serve")
            .env("EXPECTED_AUTHORIZATION", format!("Bearer {SECRET}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(ca) = ca {
            let (cert, key) = ca.issue_pem(&["localhost", "127.0.0.1"]);
            let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
            std::fs::write(&cert_path, cert).expect("write cert");
            std::fs::write(&key_path, key).expect("write key");
            command
                .arg("--cert")
                .arg(cert_path)
                .arg("--key")
                .arg(key_path);
        }
        let mut child = die_with_parent(&mut command)
            .spawn()
            .expect("start grpc_echo.py");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout");
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("the port");
        let port = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("a port, not {line:?}"));
        GrpcServer {
            port,
            child,
            _dir: dir,
        }
    }

    fn authority(&self) -> String {
        format!("localhost:{}", self.port)
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `scripts/grpc_echo.py call` with `args`, in a clean environment plus `env`: its
/// JSON line.
fn grpc_call(args: &[&str], env: &[(&str, &str)]) -> Value {
    let out = Command::new(python())
        .arg(grpc_script())
        .arg("call")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .output()
        .expect("run grpc_echo.py call");
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "grpc_echo.py call printed no JSON ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn grpc_over_h2c_reaches_an_h2c_upstream_with_the_credential_and_refusals_are_grpc_statuses() {
    let server = GrpcServer::start(None);
    let system = System::start(TestCa::new("upstream test CA"), &[server.port]);
    // Responses redacted, as by default: the echoed credential is masked inside the
    // gRPC message, whose framing stays right.
    system.stack.add_service_as_is(
        "default",
        json!({"name": "grpc", "host": server.authority(), "upstream_tls": false,
               "upstream_h2c": true, "auth": {"type": "bearer", "token": "TOKEN"}}),
    );
    let proxy = format!("127.0.0.1:{}", system.stack.envoy.port);
    let authority = server.authority();
    let auth = system.proxy_auth();
    // grpcio to the proxy's port over h2c, naming the upstream in :authority.
    let call = |extra: &[&str], auth: Option<&str>| {
        let mut args = vec![proxy.as_str(), "--no-proxy", "--authority", &authority];
        args.extend_from_slice(extra);
        if let Some(auth) = auth {
            args.extend(["--proxy-authorization", auth]);
        }
        grpc_call(&args, &[])
    };

    let unary = wait_for(FIRST_SNAPSHOT, || {
        let out = call(&["--unary"], Some(&auth));
        (out["ok"] == true).then_some(out)
    })
    .unwrap_or_else(|| {
        panic!(
            "{}\n{}",
            call(&["--unary"], Some(&auth)),
            system.stack.envoy.log_tail(30)
        )
    });
    // The server checked the credential (it fails the call otherwise); what it echoed
    // reached the agent masked, at the same length.
    let metadata = &unary["responses"][0]["metadata"];
    let echoed = metadata["authorization"].as_str().unwrap_or_default();
    assert_eq!(echoed.len(), format!("Bearer {SECRET}").len(), "{metadata}");
    assert!(
        echoed.starts_with("[REDACTED]") && !echoed.contains(SECRET),
        "{metadata}"
    );
    assert!(metadata.get("proxy-authorization").is_none(), "{metadata}");
    assert_eq!(unary["responses"][0]["request"], "hello");

    let stream = call(&["--stream", "5"], Some(&auth));
    assert_eq!(stream["ok"], true, "{stream}");
    let indexes: Vec<i64> = stream["responses"]
        .as_array()
        .map(|all| all.iter().filter_map(|r| r["i"].as_i64()).collect())
        .unwrap_or_default();
    assert_eq!(indexes, vec![0, 1, 2, 3, 4], "{stream}");

    // The same client with the proxy from http_proxy instead: grpcio sends a CONNECT
    // and speaks h2c inside it, which the proxy handles as a plain tunnel.
    let proxy_url = system.proxy_url();
    let tunnelled = grpc_call(&[&authority, "--unary"], &[("http_proxy", &proxy_url)]);
    assert_eq!(tunnelled["ok"], true, "{tunnelled}");
    let tunnelled = grpc_call(
        &[&authority, "--stream", "2"],
        &[("http_proxy", &proxy_url)],
    );
    assert_eq!(
        tunnelled["responses"].as_array().map(Vec::len),
        Some(2),
        "{tunnelled}"
    );

    // No proxy credential: UNAUTHENTICATED, with the JSON body's message and the
    // HTTP status of DESIGN.md §6 in the trailers.
    let refused = call(&["--unary"], None);
    assert_eq!(refused["ok"], false, "{refused}");
    assert_eq!(refused["code"], "UNAUTHENTICATED", "{refused}");
    assert!(
        refused["details"]
            .as_str()
            .is_some_and(|d| d.contains("Proxy-Authorization")),
        "{refused}"
    );
    assert_eq!(refused["trailing"]["x-agent-vault-status"], "407");
    assert_eq!(
        refused["trailing"]["x-agent-vault-error-code"],
        "proxy_auth_required"
    );
    assert_eq!(refused["trailing"]["x-agent-vault-error"], "true");

    // A bad token: UNAUTHENTICATED (invalid_token); the service disabled: PERMISSION_DENIED.
    let bad = call(
        &["--unary"],
        Some(&proxy_basic("av_not_a_token", "default")),
    );
    assert_eq!(bad["code"], "UNAUTHENTICATED", "{bad}");
    assert_eq!(bad["trailing"]["x-agent-vault-error-code"], "invalid_token");
    system.stack.set_service_enabled("default", "grpc", false);
    let disabled = wait_for(PROPAGATION, || {
        let out = call(&["--unary"], Some(&auth));
        (out["ok"] == false).then_some(out)
    })
    .expect("the disabled service is refused");
    assert_eq!(disabled["code"], "PERMISSION_DENIED", "{disabled}");
    assert_eq!(disabled["trailing"]["x-agent-vault-status"], "403");
    assert_eq!(
        disabled["trailing"]["x-agent-vault-error-code"],
        "service_disabled"
    );

    // Refused after the credential fetch (the call waited for the control plane):
    // the credential is gone, FAILED_PRECONDITION.
    system.stack.set_service_enabled("default", "grpc", true);
    system.stack.delete_credentials("default", &["TOKEN"]);
    let missing = wait_for(PROPAGATION, || {
        let out = call(&["--unary"], Some(&auth));
        (out["code"] == "FAILED_PRECONDITION").then_some(out)
    })
    .unwrap_or_else(|| panic!("{}", call(&["--unary"], Some(&auth))));
    assert_eq!(
        missing["trailing"]["x-agent-vault-error-code"],
        "credential_not_found"
    );
    assert!(
        missing["details"]
            .as_str()
            .is_some_and(|d| d.contains("TOKEN")),
        "{missing}"
    );
}

#[test]
fn grpc_over_tls_through_https_proxy_is_decrypted_checked_and_reaches_an_h2_upstream() {
    let ca = TestCa::new("upstream test CA");
    let server = GrpcServer::start(Some(&ca));
    let system = System::start(ca, &[server.port]);
    system.add_service("grpc", &server.authority(), json!({}));
    let proxy_url = system.proxy_url();
    let ca_file = system.proxy_ca();
    let ca_arg = ca_file.display().to_string();
    let authority = server.authority();
    // As an agent's SDK: a secure channel to the API's name, trusting the proxy's CA,
    // the proxy from https_proxy (grpcio sends a CONNECT with the URL's credentials).
    let call = |extra: &[&str], proxy: &str| {
        let mut args = vec![authority.as_str(), "--ca", &ca_arg];
        args.extend_from_slice(extra);
        grpc_call(&args, &[("https_proxy", proxy)])
    };
    let unary = wait_for(FIRST_SNAPSHOT, || {
        let out = call(&["--unary"], &proxy_url);
        (out["ok"] == true).then_some(out)
    })
    .unwrap_or_else(|| {
        panic!(
            "{}\n{}",
            call(&["--unary"], &proxy_url),
            system.stack.envoy.log_tail(30)
        )
    });
    assert_eq!(
        unary["responses"][0]["metadata"]["authorization"],
        format!("Bearer {SECRET}")
    );
    let stream = call(&["--stream", "3"], &proxy_url);
    assert_eq!(stream["ok"], true, "{stream}");
    assert_eq!(stream["responses"].as_array().map(Vec::len), Some(3));

    // Inside the tunnel, a call the service does not allow: PERMISSION_DENIED.
    let (status, body) = system.stack.api().put(
        "/v1/vaults/default/services",
        &json!({"services": [{"name": "grpc", "host": authority, "methods": ["GET"],
                              "auth": {"type": "bearer", "token": "TOKEN"}}]}),
    );
    assert_eq!(status, 200, "{body}");
    let refused = wait_for(PROPAGATION, || {
        let out = call(&["--unary"], &proxy_url);
        (out["ok"] == false).then_some(out)
    })
    .expect("a POST to a GET-only service is refused");
    assert_eq!(refused["code"], "PERMISSION_DENIED", "{refused}");
    assert_eq!(
        refused["trailing"]["x-agent-vault-error-code"],
        "method_not_allowed_for_service"
    );
}

// --- WebSocket ----------------------------------------------------------------------------

/// A WebSocket echo upstream (`tungstenite`), plain or TLS: records each upgrade
/// request's headers and sends every text or binary message back, and when each
/// connection ended.
struct WsEcho {
    port: u16,
    upgrades: Arc<Mutex<Vec<Map<String, Value>>>>,
    ended: Arc<Mutex<Vec<Instant>>>,
    _serving: Serving,
}

impl WsEcho {
    fn start(tls: Option<&TestCa>) -> WsEcho {
        let config = tls.map(|ca| ca.server_config(&[b"http/1.1"]));
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let upgrades = Arc::new(Mutex::new(Vec::new()));
        let ended = Arc::new(Mutex::new(Vec::new()));
        let (seen, ends) = (upgrades.clone(), ended.clone());
        let serving = serve_loopback(listener, move |stream: TcpStream| {
            match &config {
                None => echo_frames(stream, &seen),
                Some(config) => {
                    let Ok(conn) = rustls::ServerConnection::new(config.clone()) else {
                        return;
                    };
                    echo_frames(rustls::StreamOwned::new(conn, stream), &seen);
                }
            }
            ends.lock().expect("ended").push(Instant::now());
        });
        WsEcho {
            port,
            upgrades,
            ended,
            _serving: serving,
        }
    }

    fn authority(&self) -> String {
        format!("localhost:{}", self.port)
    }

    fn upgrades(&self) -> Vec<Map<String, Value>> {
        self.upgrades.lock().expect("upgrades").clone()
    }
}

/// Accepts the WebSocket handshake on `stream` (recording its headers), then echoes
/// messages until the peer goes.
// The handshake callback's `Result` is tungstenite's, large error variant included.
#[allow(clippy::result_large_err)]
fn echo_frames<S: std::io::Read + std::io::Write>(
    stream: S,
    seen: &Mutex<Vec<Map<String, Value>>>,
) {
    let record = |request: &tungstenite::handshake::server::Request,
                  response: tungstenite::handshake::server::Response| {
        let mut headers = Map::new();
        for (name, value) in request.headers() {
            let value = value.to_str().unwrap_or_default();
            headers.insert(name.as_str().to_owned(), Value::from(value));
        }
        headers.insert("(path)".to_owned(), Value::from(request.uri().path()));
        seen.lock().expect("upgrades").push(headers);
        Ok(response)
    };
    let Ok(mut socket) = tungstenite::accept_hdr(stream, record) else {
        return;
    };
    loop {
        match socket.read() {
            Ok(message) if message.is_text() || message.is_binary() => {
                if socket.send(message).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

/// A WebSocket handshake for `ws://authority/chat` on `stream` (the proxy's port, or a
/// tunnel), with `Proxy-Authorization: auth` when given: the open socket, or the
/// HTTP status the proxy refused it with.
fn open_websocket<S: Stream>(
    stream: S,
    authority: &str,
    auth: Option<&str>,
) -> Result<tungstenite::WebSocket<S>, u16> {
    let uri: http::Uri = format!("ws://{authority}/chat").parse().expect("a uri");
    let mut request = ClientRequestBuilder::new(uri);
    if let Some(auth) = auth {
        request = request.with_header("Proxy-Authorization", auth);
    }
    match tungstenite::client::client(request, stream) {
        Ok((socket, _)) => Ok(socket),
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(response))) => {
            Err(response.status().as_u16())
        }
        Err(error) => panic!("the WebSocket handshake failed: {error}"),
    }
}

/// Sends `text` and reads what comes back.
fn round_trip<S: Stream>(socket: &mut tungstenite::WebSocket<S>, text: &str) -> String {
    socket.send(Message::text(text)).expect("send a frame");
    loop {
        match socket.read().expect("read a frame") {
            Message::Text(echoed) => return echoed.to_string(),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn proxy_stream(system: &System) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", system.stack.envoy.port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    stream
}

#[test]
fn a_websocket_through_the_proxy_is_authenticated_injected_and_its_frames_pass_untouched() {
    let echo = WsEcho::start(None);
    let system = System::start(TestCa::new("upstream test CA"), &[echo.port]);
    system.add_service("ws", &echo.authority(), json!({"upstream_tls": false}));
    let auth = system.proxy_auth();

    // No proxy credential: 407 before any upgrade; the upstream sees nothing.
    let refused = wait_for(FIRST_SNAPSHOT, || {
        open_websocket(proxy_stream(&system), &echo.authority(), None)
            .err()
            .filter(|status| *status == 407)
    });
    assert_eq!(refused, Some(407));
    assert!(echo.upgrades().is_empty());

    let mut socket = wait_for(FIRST_SNAPSHOT, || {
        open_websocket(proxy_stream(&system), &echo.authority(), Some(&auth)).ok()
    })
    .unwrap_or_else(|| {
        panic!(
            "the upgrade goes through\n{}",
            system.stack.envoy.log_tail(30)
        )
    });
    let upgrade = echo.upgrades().pop().expect("the upstream saw the upgrade");
    assert_eq!(
        upgrade["authorization"],
        format!("Bearer {SECRET}").as_str()
    );
    assert!(upgrade.get("proxy-authorization").is_none(), "{upgrade:?}");
    assert_eq!(upgrade["(path)"], "/chat");
    // Frames, the secret's own text included, pass as they are: never redacted, never
    // held back.
    for text in ["hello", SECRET, &"x".repeat(70_000)] {
        assert_eq!(round_trip(&mut socket, text), text);
    }
    socket.close(None).expect("close");
    let _ = socket.flush();
}

#[test]
fn a_ws_websocket_inside_a_plain_connect_tunnel_is_checked_like_one_sent_to_the_port() {
    let echo = WsEcho::start(None);
    let system = System::start(TestCa::new("upstream test CA"), &[echo.port]);
    system.add_service("ws", &echo.authority(), json!({"upstream_tls": false}));
    let auth = system.proxy_auth();
    // As clients that tunnel even ws:// through a proxy: CONNECT, then plain HTTP.
    let tunnel = || {
        connect(
            system.stack.envoy.port,
            &echo.authority(),
            &[("Proxy-Authorization", &auth)],
        )
        .ok()
        .and_then(|(_, stream)| stream)
    };
    // The tunnel's filter (its own root context, so its own snapshot) may learn of the
    // new service a few milliseconds after the one that let the CONNECT through: wait for
    // the upgrade inside, not only for the tunnel.
    let mut socket = wait_for(FIRST_SNAPSHOT, || {
        open_websocket(tunnel()?, &echo.authority(), None).ok()
    })
    .unwrap_or_else(|| {
        panic!(
            "an upgrade inside a tunnel to the WebSocket's host\n{}",
            system.stack.envoy.log_tail(30)
        )
    });
    let upgrade = echo.upgrades().pop().expect("the upstream saw the upgrade");
    assert_eq!(
        upgrade["authorization"],
        format!("Bearer {SECRET}").as_str()
    );
    assert_eq!(
        round_trip(&mut socket, "over a plain tunnel"),
        "over a plain tunnel"
    );
    // Inside the tunnel only the CONNECT's host: another one is refused 421.
    let stream = tunnel().expect("a second tunnel");
    assert_eq!(
        open_websocket(stream, "localhost:1", None).err(),
        Some(421),
        "another host inside the tunnel"
    );
}

#[test]
fn a_websocket_inside_an_https_tunnel_is_checked_like_a_plain_one() {
    let ca = TestCa::new("upstream test CA");
    let echo = WsEcho::start(Some(&ca));
    let system = System::start(ca, &[echo.port]);
    system.add_service("ws", &echo.authority(), json!({}));
    let proxy_ca = std::fs::read_to_string(system.proxy_ca()).expect("the proxy CA");
    let auth = system.proxy_auth();
    // wss://: the upgrade inside the decrypted tunnel carries no proxy credential. As
    // above, wait for the upgrade inside, whose filter may see the service last.
    let mut socket = wait_for(FIRST_SNAPSHOT, || {
        let tunnel = HttpsTunnel::open(
            system.stack.envoy.port,
            &echo.authority(),
            &[("Proxy-Authorization", &auth)],
            &TlsOptions::new("localhost", &proxy_ca),
        )
        .ok()?;
        open_websocket(tunnel.into_stream(), &echo.authority(), None).ok()
    })
    .unwrap_or_else(|| {
        panic!(
            "an upgrade inside a TLS tunnel to the WebSocket's host\n{}",
            system.stack.envoy.log_tail(30)
        )
    });
    let upgrade = echo.upgrades().pop().expect("the upstream saw the upgrade");
    assert_eq!(
        upgrade["authorization"],
        format!("Bearer {SECRET}").as_str()
    );
    assert_eq!(round_trip(&mut socket, "over wss"), "over wss");
}

#[test]
fn a_revoked_agents_open_websocket_is_closed_within_the_propagation_target() {
    let echo = WsEcho::start(None);
    let system = System::start(TestCa::new("upstream test CA"), &[echo.port]);
    system.add_service("ws", &echo.authority(), json!({"upstream_tls": false}));
    let auth = system.proxy_auth();
    let mut socket = wait_for(FIRST_SNAPSHOT, || {
        open_websocket(proxy_stream(&system), &echo.authority(), Some(&auth)).ok()
    })
    .expect("the upgrade goes through");
    assert_eq!(round_trip(&mut socket, "before"), "before");
    // Another agent's socket stays open.
    let other = system.stack.create_agent("other", &["default"]);
    let other_auth = proxy_basic(&other, "default");
    let mut kept = wait_for(PROPAGATION, || {
        open_websocket(proxy_stream(&system), &echo.authority(), Some(&other_auth)).ok()
    })
    .expect("the other agent's upgrade goes through");

    let revoked_at = Instant::now();
    system.stack.revoke_agent("agent");
    // The filter resets the stream on the snapshot that drops the agent: the upstream's
    // connection ends then, and no frame passes after it. Idle, the agent's socket
    // learns of it from Envoy closing the connection, which Envoy delays by up to its
    // delayed_close_timeout (1 s) to let the peer close first.
    let upstream_closed = wait_for(PROPAGATION, || {
        echo.ended.lock().expect("ended").first().copied()
    })
    .map(|at| at.duration_since(revoked_at))
    .expect("the upstream's connection ends");
    let closed = loop {
        match socket.read() {
            Ok(Message::Close(_) | Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(message) => panic!("unexpected {message:?}"),
            Err(_) => break revoked_at.elapsed(),
        }
    };
    eprintln!(
        "the revoked agent's WebSocket: upstream closed {upstream_closed:?} and the agent's \
         connection {closed:?} after the revoke"
    );
    assert!(upstream_closed < PROPAGATION, "after {upstream_closed:?}");
    assert!(closed < PROPAGATION, "closed after {closed:?}");
    assert_eq!(round_trip(&mut kept, "still here"), "still here");
    // The counters trail by one tick of the filter.
    let counted = wait_for(PROPAGATION, || {
        let stats = system.stack.envoy.filter_stats();
        stats
            .iter()
            .find(|(name, _)| name.ends_with("upgrades.revoked"))
            .map(|(_, n)| *n)
            .filter(|n| *n > 0)
    });
    assert_eq!(counted, Some(1));
}
