//! Placeholder substitution (issue 13), through the real Envoy with loopback echo
//! upstreams that report what they received: a service's `substitutions` replace the
//! agent's placeholders on the declared surfaces only (path, query, header, JSON and
//! form bodies, chunked or not), plain and inside HTTPS tunnels; a body too large to
//! buffer is a JSON 413 (declared or streamed), a placeholder in a body of another
//! type a JSON 415, an unset key a 502, a value with a line break for a header a 502;
//! the request log keeps the placeholder. Bad declarations are a 400 from the API.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use agent_vault_testkit::control_plane::{Server, ServerOptions};
use agent_vault_testkit::http::{proxy_basic, HttpResponse, RawResponse};
use agent_vault_testkit::https_agent::{HttpsTunnel, TlsOptions};
use agent_vault_testkit::net::{serve_loopback, Serving};
use agent_vault_testkit::stack::{on_every_worker, wait_for, Stack};
use agent_vault_testkit::upstream::{Echo, TestCa};

/// Both workers load their first snapshot (and a change) within this.
const SNAPSHOT: Duration = Duration::from_secs(15);

/// The filter's default `max_substitution_body_bytes`.
const BODY_BOUND: usize = 4 * 1024 * 1024;

const AUTH_SECRET: &str = "sk_live_subst_auth_1a2b3c";
/// Holds what a path would split on.
const TG_TOKEN: &str = "123456:AAH/x y";
/// Holds what a query would split on.
const API_KEY: &str = "k&v=1";
const HDR_KEY: &str = "hdr-secret-9f8e7d";
/// Holds what JSON and forms escape.
const BODY_SECRET: &str = "p\"a ss&w\\";

/// The service's substitutions: one placeholder per surface.
fn substitutions() -> Value {
    json!([
        {"key": "TG_TOKEN", "placeholder": "__TG_TOKEN__", "in": ["path"]},
        {"key": "API_KEY", "placeholder": "__API_KEY__", "in": ["query"]},
        {"key": "HDR_KEY", "placeholder": "__HDR_KEY__", "in": ["header"]},
        {"key": "BODY_SECRET", "placeholder": "__BODY_SECRET__", "in": ["body"]},
    ])
}

/// Sets the credentials and adds service `subst` for `host` with [`substitutions`];
/// response redaction off, so the echo can show what the upstream received.
fn add_substituting_service(stack: &Stack, host: &str, upstream_tls: bool) {
    for (key, value) in [
        ("ECHO_TOKEN", AUTH_SECRET),
        ("TG_TOKEN", TG_TOKEN),
        ("API_KEY", API_KEY),
        ("HDR_KEY", HDR_KEY),
        ("BODY_SECRET", BODY_SECRET),
    ] {
        stack.set_credential("default", key, value);
    }
    stack.add_service(
        "default",
        json!({"name": "subst", "host": host, "upstream_tls": upstream_tls,
               "auth": {"type": "bearer", "token": "ECHO_TOKEN"},
               "redact_responses": false, "substitutions": substitutions()}),
    );
}

/// An upstream that never answers and records every byte each connection sent until
/// it closed: what an upstream saw of a request the proxy refused after forwarding its
/// headers (the echo would take a cut chunked body for a whole one).
/// What one connection sent, and whether it closed.
type Recorded = Arc<Mutex<(Vec<u8>, bool)>>;

struct Recorder {
    port: u16,
    connections: Arc<Mutex<Vec<Recorded>>>,
    _serving: Serving,
}

impl Recorder {
    fn start() -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the recorder");
        let port = listener.local_addr().expect("recorder addr").port();
        let connections: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let serving = {
            let connections = connections.clone();
            serve_loopback(listener, move |mut stream: TcpStream| {
                let record: Recorded = Arc::default();
                connections.lock().unwrap().push(record.clone());
                let _ = stream.set_read_timeout(Some(Duration::from_secs(20)));
                let mut buf = [0u8; 64 * 1024];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    record.lock().unwrap().0.extend_from_slice(&buf[..n]);
                }
                record.lock().unwrap().1 = true;
            })
        };
        Recorder {
            port,
            connections,
            _serving: serving,
        }
    }

    fn authority(&self) -> String {
        format!("localhost:{}", self.port)
    }

    fn url(&self, path: &str) -> String {
        format!("http://localhost:{}{}", self.port, path)
    }

    /// What each connection sent, once every one of them closed (20 s at most).
    fn closed_connections(&self) -> Vec<Vec<u8>> {
        wait_for(Duration::from_secs(20), || {
            let connections = self.connections.lock().unwrap();
            connections.iter().all(|c| c.lock().unwrap().1).then(|| {
                connections
                    .iter()
                    .map(|c| c.lock().unwrap().0.clone())
                    .collect()
            })
        })
        .expect("the proxy closed its connections to the upstream")
    }
}

/// A stack whose Envoy may reach exactly this plain echo upstream and the recorder,
/// with the service for each (`subst`, `recorded`) and an agent whose requests work
/// on every worker; returns the agent's token. `credential_cache_ttl_ms` 0: every
/// request waits for a credential fetch, its body arriving while it is paused.
fn plain_stack(echo: &Echo, recorder: &Recorder, credential_cache_ttl_ms: u64) -> (Stack, String) {
    let allowed = format!("127.0.0.1/32:{}", echo.port);
    let recorded = format!("127.0.0.1/32:{}", recorder.port);
    let stack = Stack::start_with(ServerOptions::default(), |mut options| {
        options.credential_cache_ttl_ms = credential_cache_ttl_ms;
        options.allow_private_upstreams(&[&allowed, &recorded])
    });
    add_substituting_service(&stack, &echo.authority(), false);
    stack.add_service(
        "default",
        json!({"name": "recorded", "host": recorder.authority(), "upstream_tls": false,
               "auth": {"type": "bearer", "token": "ECHO_TOKEN"},
               "redact_responses": false, "substitutions": substitutions()}),
    );
    let token = stack.create_agent("substituter", &["default"]);
    on_every_worker(
        &stack.envoy,
        SNAPSHOT,
        4,
        || stack.get_as(&token, "default", &echo.url("/ready"), &[]),
        |r| r.status == 200,
    );
    echo.clear();
    (stack, token)
}

/// Sends a request head and then its body pieces (from another thread, a pause
/// between pieces so Envoy sees several) to the proxy, and reads the response until
/// the proxy closes: a refusal Envoy sends before it read the whole body is still
/// read.
fn exchange(port: u16, head: &str, pieces: Vec<Vec<u8>>) -> HttpResponse {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to Envoy");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    stream.write_all(head.as_bytes()).expect("write the head");
    let mut writer = stream.try_clone().expect("clone the stream");
    let writing = std::thread::spawn(move || {
        for piece in pieces {
            if writer.write_all(&piece).is_err() {
                return;
            }
            let _ = writer.flush();
            std::thread::sleep(Duration::from_millis(30));
        }
    });
    let mut data = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => data.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    let _ = writing.join();
    parse(&data)
}

/// One HTTP/1.1 response with a `content-length` body.
fn parse(data: &[u8]) -> HttpResponse {
    let text = String::from_utf8_lossy(data).into_owned();
    let Some((head, rest)) = text.split_once("\r\n\r\n") else {
        return HttpResponse {
            status: 0,
            headers: Vec::new(),
            body: format!("no response: {text:?}"),
        };
    };
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let length = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(rest.len());
    HttpResponse {
        status,
        headers,
        body: rest.get(..length).unwrap_or(rest).to_owned(),
    }
}

/// The head of a request through the proxy as `token`, closing the connection after.
fn head(method: &str, url: &str, token: &str, headers: &[(&str, &str)]) -> String {
    let host = url
        .split_once("://")
        .map(|(_, rest)| rest.split('/').next().unwrap_or(rest))
        .unwrap_or_default();
    let mut head = format!(
        "{method} {url} HTTP/1.1\r\nHost: {host}\r\nProxy-Authorization: {}\r\nConnection: close\r\n",
        proxy_basic(token, "default")
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    head
}

/// `pieces` as chunks of a chunked body, with its last chunk.
fn chunked(pieces: &[&[u8]]) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = pieces
        .iter()
        .map(|piece| {
            let mut chunk = format!("{:x}\r\n", piece.len()).into_bytes();
            chunk.extend_from_slice(piece);
            chunk.extend_from_slice(b"\r\n");
            chunk
        })
        .collect();
    out.push(b"0\r\n\r\n".to_vec());
    out
}

#[track_caller]
fn assert_refused(response: &HttpResponse, status: u16, code: &str) -> Value {
    assert_eq!(
        (response.status, response.header("x-agent-vault-error")),
        (status, Some("true")),
        "{:?} {}",
        response.headers,
        response.body
    );
    let body = response.json();
    assert_eq!(body["error"], code, "{body}");
    body
}

/// A request refused from its body (415, a streamed 413) had its headers forwarded
/// already: the upstream saw them and then the connection closed, with no byte of
/// the body (`marker`) and no end of the chunked body, so it cannot take the request
/// for a whole one. `streamed`: the body took long enough that the upstream
/// connection was surely opened (a quick refusal may come before it is).
#[track_caller]
fn assert_cut_off(recorder: &Recorder, marker: &[u8], streamed: bool) {
    let connections = recorder.closed_connections();
    if streamed {
        let heads = connections
            .iter()
            .filter(|sent| sent.starts_with(b"POST "))
            .count();
        assert_eq!(heads, 1, "the upstream saw no request head");
    }
    for sent in connections {
        let text = String::from_utf8_lossy(&sent);
        assert!(
            !sent.windows(marker.len()).any(|w| w == marker),
            "the body reached the upstream ({} bytes): {}",
            sent.len(),
            text.chars().take(600).collect::<String>()
        );
        assert!(
            !sent.ends_with(b"0\r\n\r\n"),
            "a whole (empty) body: {text}"
        );
    }
}

/// The echoed request's header lines with this name (any case).
fn header_lines(echoed: &Value, name: &str) -> Vec<String> {
    echoed["header_list"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|pair| {
            pair[0]
                .as_str()
                .is_some_and(|n| n.eq_ignore_ascii_case(name))
        })
        .map(|pair| pair[1].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// What the upstream received as the JSON body.
fn echoed_json_body(echoed: &Value) -> Value {
    let body = echoed["body"].as_str().unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[test]
fn plain_requests_get_each_placeholder_on_its_declared_surfaces_and_nowhere_else() {
    let echo = Echo::plain();
    let recorder = Recorder::start();
    let (stack, token) = plain_stack(&echo, &recorder, 60_000);

    // Path, query and header: each value encoded for where it lands; a placeholder
    // on a surface it is not declared for passes literally.
    let got = stack.get_as(
        &token,
        "default",
        &echo.url("/bot__TG_TOKEN__/send?k=__API_KEY__&p=__TG_TOKEN__&h=__HDR_KEY__"),
        &[
            ("X-Api-Key", "Key __HDR_KEY__"),
            ("X-Other", "__TG_TOKEN__"),
        ],
    );
    let seen = got.echoed();
    assert_eq!(
        seen["path"],
        "/bot123456:AAH%2Fx%20y/send?k=k%26v%3D1&p=__TG_TOKEN__&h=__HDR_KEY__"
    );
    assert_eq!(seen["headers"]["x-api-key"], format!("Key {HDR_KEY}"));
    assert_eq!(seen["headers"]["x-other"], "__TG_TOKEN__");
    assert_eq!(
        seen["headers"]["authorization"],
        format!("Bearer {AUTH_SECRET}")
    );

    // A JSON body with a content-length: substituted, string-escaped, sent chunked.
    let url = echo.url("/v1/login");
    let json_body = br#"{"password":"__BODY_SECRET__","note":"__TG_TOKEN__"}"#;
    let auth = proxy_basic(&token, "default");
    let posted = stack.envoy.request(
        "POST",
        &url,
        &[
            ("Proxy-Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        Some(json_body),
    );
    let seen = posted.echoed();
    let body = echoed_json_body(&seen);
    assert_eq!(body["password"], BODY_SECRET, "{seen}");
    assert_eq!(body["note"], "__TG_TOKEN__", "not declared for bodies");
    assert!(header_lines(&seen, "content-length").is_empty(), "{seen}");
    assert_eq!(header_lines(&seen, "transfer-encoding"), vec!["chunked"]);

    // A form body: form-encoded.
    let posted = stack.envoy.request(
        "POST",
        &url,
        &[
            ("Proxy-Authorization", &auth),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        Some(b"user=me&pass=__BODY_SECRET__"),
    );
    assert_eq!(
        posted.echoed()["body"],
        "user=me&pass=p%22a+ss%26w%5C",
        "{}",
        posted.body
    );

    // A chunked JSON body, the placeholder split across chunks.
    let sent = exchange(
        stack.envoy.port,
        &head(
            "POST",
            &url,
            &token,
            &[
                ("Content-Type", "application/json"),
                ("Transfer-Encoding", "chunked"),
            ],
        ),
        chunked(&[b"{\"password\":\"__BODY", b"_SECRET__\",", b"\"n\":1}"]),
    );
    let seen = sent.echoed();
    let body = echoed_json_body(&seen);
    assert_eq!(body, json!({"password": BODY_SECRET, "n": 1}), "{seen}");

    // A body of another type: passes untouched without a placeholder, 415 with one
    // (and nothing reaches the upstream whole).
    let plain = stack.envoy.request(
        "POST",
        &url,
        &[
            ("Proxy-Authorization", &auth),
            ("Content-Type", "text/plain"),
        ],
        Some(b"hello"),
    );
    assert_eq!(plain.echoed()["body"], "hello");
    let refused = stack.envoy.request(
        "POST",
        &recorder.url("/v1/login"),
        &[
            ("Proxy-Authorization", &auth),
            ("Content-Type", "text/plain"),
        ],
        Some(b"token=__BODY_SECRET__"),
    );
    let body = assert_refused(&refused, 415, "unsupported_substitution_body");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains("\"text/plain\""), "{message}");
    assert!(!refused.body.contains(BODY_SECRET), "{}", refused.body);
    assert_cut_off(&recorder, b"token=", false);

    // The request log keeps the path as the agent wrote it. Each Envoy worker posts
    // its own batch: wait for both records, which may come from different workers.
    let records = wait_for(SNAPSHOT, || {
        let records = stack.request_log("default");
        let refused = |r: &Value| r["error"] == "unsupported_substitution_body";
        (records.iter().any(|r| r["path"] == "/bot__TG_TOKEN__/send")
            && records.iter().any(refused))
        .then_some(records)
    })
    .unwrap_or_else(|| panic!("not logged: {:?}", stack.request_log("default")));
    let logged = serde_json::to_string(&records).unwrap();
    for secret in ["123456", "AAH", HDR_KEY, "k%26v"] {
        assert!(!logged.contains(secret), "{secret} in the log: {logged}");
    }
    assert!(
        records
            .iter()
            .any(|r| r["error"] == "unsupported_substitution_body" && r["status"] == 415),
        "{logged}"
    );
}

#[test]
fn a_body_too_large_to_substitute_in_is_a_json_413_declared_or_streamed_and_a_large_one_passes_even_while_paused(
) {
    let echo = Echo::plain();
    let recorder = Recorder::start();
    // Every request waits for its credential: its body arrives while it is paused.
    let (stack, token) = plain_stack(&echo, &recorder, 0);
    let url = echo.url("/v1/upload");

    // 2 MiB, above Envoy's buffer limit (the listener's default 1 MiB): the filter
    // takes the body into its VM chunk by chunk, so Envoy's limit never answers first.
    let mut large = b"{\"pad\":\"".to_vec();
    large.extend(std::iter::repeat_n(b'a', 2 * 1024 * 1024));
    large.extend_from_slice(b"\",\"key\":\"__BODY_SECRET__\"}");
    let auth = proxy_basic(&token, "default");
    let posted = stack.envoy.request(
        "POST",
        &url,
        &[
            ("Proxy-Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        Some(&large),
    );
    let body = echoed_json_body(&posted.echoed());
    assert_eq!(body["key"], BODY_SECRET);
    assert_eq!(body["pad"].as_str().map(str::len), Some(2 * 1024 * 1024));
    // Chunks streamed while the request waits for its credential: nothing passes
    // before it is forwarded, and the whole body is substituted.
    let sent = exchange(
        stack.envoy.port,
        &head(
            "POST",
            &url,
            &token,
            &[
                ("Content-Type", "application/json"),
                ("Transfer-Encoding", "chunked"),
            ],
        ),
        chunked(&[b"{\"k\":\"__BODY_SE", b"CRET__\"}"]),
    );
    assert_eq!(echoed_json_body(&sent.echoed()), json!({"k": BODY_SECRET}));
    echo.clear();

    // Declared: refused on its headers (the body need not even be sent).
    let declared = (BODY_BOUND + 1).to_string();
    let refused = exchange(
        stack.envoy.port,
        &head(
            "POST",
            &url,
            &token,
            &[
                ("Content-Type", "application/json"),
                ("Content-Length", &declared),
            ],
        ),
        Vec::new(),
    );
    let body = assert_refused(&refused, 413, "request_body_too_large");
    assert_eq!(body["limit"], BODY_BOUND, "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!(
            "larger than {BODY_BOUND} bytes ({declared} bytes declared)"
        )),
        "{message}"
    );

    // Streamed (chunked, no length): refused once the buffered body passes the bound.
    let piece = vec![b'a'; 256 * 1024];
    let pieces: Vec<&[u8]> = (0..(BODY_BOUND / piece.len() + 2))
        .map(|_| piece.as_slice())
        .collect();
    let refused = exchange(
        stack.envoy.port,
        &head(
            "POST",
            &recorder.url("/v1/upload"),
            &token,
            &[
                ("Content-Type", "application/json"),
                ("Transfer-Encoding", "chunked"),
            ],
        ),
        chunked(&pieces),
    );
    let body = assert_refused(&refused, 413, "request_body_too_large");
    assert!(
        !body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("declared"),
        "{body}"
    );
    assert_cut_off(&recorder, b"aaaa", true);
}

#[test]
fn a_substitution_key_missing_from_the_vault_is_502_credential_not_found() {
    let echo = Echo::plain();
    let recorder = Recorder::start();
    let (stack, token) = plain_stack(&echo, &recorder, 60_000);
    stack.delete_credentials("default", &["HDR_KEY"]);
    let response = on_every_worker(
        &stack.envoy,
        Duration::from_secs(90),
        4,
        || stack.get_as(&token, "default", &echo.url("/v1/x"), &[]),
        |r| r.status == 502,
    );
    let body = assert_refused(&response, 502, "credential_not_found");
    assert_eq!(body["key"], "HDR_KEY", "{body}");
}

#[test]
fn inside_an_https_tunnel_placeholders_are_replaced_too() {
    let upstream_ca = TestCa::new("upstream test CA");
    let echo = Echo::tls(&upstream_ca);
    let allowed = format!("127.0.0.1/32:{}", echo.port);
    let stack = Stack::start_with_ca(ServerOptions::default(), upstream_ca, |options| {
        options.allow_private_upstreams(&[&allowed])
    });
    let proxy_ca = std::fs::read_to_string(stack.server.proxy_ca()).unwrap();
    add_substituting_service(&stack, &echo.authority(), true);
    let token = stack.create_agent("tunneller", &["default"]);
    let auth = proxy_basic(&token, "default");
    let open = || {
        HttpsTunnel::open(
            stack.envoy.port,
            &echo.authority(),
            &[("Proxy-Authorization", &auth)],
            &TlsOptions::new("localhost", &proxy_ca),
        )
    };
    let mut last = String::new();
    let mut tunnel = wait_for(SNAPSHOT, || match open() {
        Ok(mut tunnel) => match tunnel.get("/ready", &[]) {
            Ok(r) if r.status == 200 => Some(tunnel),
            Ok(r) => {
                last = format!("{} {}", r.status, r.text());
                None
            }
            Err(e) => {
                last = e.to_string();
                None
            }
        },
        Err(e) => {
            last = format!("{e:?}");
            None
        }
    })
    .unwrap_or_else(|| panic!("no working tunnel: {last}\n{}", stack.envoy.log_tail(30)));

    let posted: RawResponse = tunnel
        .request(
            "POST",
            "/bot__TG_TOKEN__/send?k=__API_KEY__",
            &[
                ("Content-Type", "application/json"),
                ("X-Api-Key", "__HDR_KEY__"),
            ],
            Some(br#"{"password":"__BODY_SECRET__","h":"__HDR_KEY__"}"#),
        )
        .unwrap();
    assert_eq!(posted.status, 200, "{}", posted.text());
    let seen = posted.json();
    assert_eq!(seen["tls"], true);
    assert_eq!(seen["path"], "/bot123456:AAH%2Fx%20y/send?k=k%26v%3D1");
    assert_eq!(seen["headers"]["x-api-key"], HDR_KEY);
    let body = echoed_json_body(&seen);
    assert_eq!(body, json!({"password": BODY_SECRET, "h": "__HDR_KEY__"}));

    // A chunked form body, the placeholder split across chunks.
    let mut raw = format!(
        "POST /v1/form HTTP/1.1\r\nHost: {}\r\nContent-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n\r\n",
        echo.authority()
    )
    .into_bytes();
    for piece in chunked(&[b"a=1&k=__BODY", b"_SECRET__"]) {
        raw.extend_from_slice(&piece);
    }
    let posted = tunnel.request_raw(&raw).unwrap();
    assert_eq!(posted.status, 200, "{}", posted.text());
    assert_eq!(posted.json()["body"], "a=1&k=p%22a+ss%26w%5C");

    // A declared length over the bound: 413 on the headers, inside the tunnel too.
    let mut fresh = open().unwrap_or_else(|e| panic!("{e:?}"));
    let declared = (BODY_BOUND + 1).to_string();
    let refused = fresh
        .request(
            "POST",
            "/v1/upload",
            &[
                ("Content-Type", "application/json"),
                ("Content-Length", &declared),
            ],
            None,
        )
        .unwrap();
    assert_eq!(refused.status, 413, "{}", refused.text());
    assert_eq!(refused.header("x-agent-vault-error"), Some("true"));
    assert_eq!(refused.json()["error"], "request_body_too_large");
}

#[test]
fn the_api_refuses_an_invalid_substitution_with_a_clear_400() {
    let server = Server::start();
    let session = server.owner_token();
    let owner = server.api(Some(&session));
    let service = |substitutions: Value| {
        json!({"name": "tg", "host": "api.telegram.org", "auth": {"type": "passthrough"},
               "substitutions": substitutions})
    };
    let cases: [(&str, Value, &str); 3] = [
        (
            "lowercase placeholder",
            json!([{"key": "TG", "placeholder": "__tg_token__", "in": ["path"]}]),
            "only A-Z, 0-9 and _",
        ),
        (
            "no surface",
            json!([{"key": "TG", "placeholder": "__TG_TOKEN__", "in": []}]),
            "at least one",
        ),
        (
            "one inside another",
            json!([{"key": "A", "placeholder": "__TOKEN__", "in": ["path"]},
                   {"key": "B", "placeholder": "__TOKEN__2__", "in": ["query"]}]),
            "collides",
        ),
    ];
    for (behaviour, substitutions, says) in cases {
        let (status, body) = owner.post("/v1/vaults/default/services", &service(substitutions));
        assert_eq!(status, 400, "{behaviour}: {body}");
        assert_eq!(body["error"], "invalid_substitution", "{behaviour}: {body}");
        let message = body["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{behaviour}: {message}");
    }
    let (status, listed) = owner.get("/v1/vaults/default/services");
    assert_eq!(status, 200);
    assert!(!listed.to_string().contains("api.telegram.org"), "{listed}");
}

#[test]
fn a_value_with_a_line_break_is_never_written_into_a_header_and_is_encoded_in_a_path() {
    let echo = Echo::plain();
    let recorder = Recorder::start();
    // No cache: the new values are used at once.
    let (stack, token) = plain_stack(&echo, &recorder, 0);
    stack.set_credential("default", "HDR_KEY", "v\r\nX-Injected: 1");
    stack.set_credential("default", "TG_TOKEN", "t\r\nX-Injected: 2");
    let refused = stack.get_as(
        &token,
        "default",
        &echo.url("/v1/x"),
        &[("X-Api-Key", "__HDR_KEY__")],
    );
    let body = assert_refused(&refused, 502, "invalid_credential_value");
    assert_eq!(body["key"], "HDR_KEY", "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("control character"),
        "{body}"
    );
    assert!(!refused.body.contains("X-Injected"), "{}", refused.body);
    assert!(echo.received().is_empty(), "{:?}", echo.received());
    // In the path the same kind of value is percent-encoded, and no header appears.
    let got = stack.get_as(&token, "default", &echo.url("/bot__TG_TOKEN__/x"), &[]);
    let seen = got.echoed();
    assert_eq!(seen["path"], "/bott%0D%0AX-Injected:%202/x");
    assert!(header_lines(&seen, "x-injected").is_empty(), "{seen}");
}
