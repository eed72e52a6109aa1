//! Response redaction end to end (`filter/src/redact.rs`), through the real Envoy with
//! the built filter: an upstream that echoes the injected credential back (raw,
//! base64, URL-encoded, JSON-escaped, split across two body chunks, gzip-compressed,
//! in a response header) never shows it to the agent; a `br` response is refused with
//! the JSON 502; a service with `redact_responses: false` passes the echo; the
//! redactions are counted in Envoy's stats and the request log. Once more inside an
//! HTTPS tunnel.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Value};

use agent_vault_rules::substitution::percent_encode;
use agent_vault_testkit::control_plane::ServerOptions;
use agent_vault_testkit::http::{proxy_basic, unmasked, HttpRequest, HttpResponse};
use agent_vault_testkit::stack::{eventually, wait_for, Stack};
use agent_vault_testkit::upstream::{chunk, Echo, Scripted, TestCa};

/// Long enough for the filter's first snapshot poll (on start, then every 1 s).
const FIRST_SNAPSHOT: Duration = Duration::from_secs(5);
/// The stats and the request log reach Envoy and the control plane on the workers'
/// ticks (about a second); with a margin.
const FLUSHED: Duration = Duration::from_secs(15);

/// A secret with characters every encoding changes (`/`, `+`, a space).
const SECRET: &str = "sk_live_redact/0123456789+abc def";

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).expect("gzip");
    encoder.finish().expect("gzip")
}

fn response(status: &str, headers: &[(&str, String)], body: &[u8]) -> Vec<u8> {
    let mut head = format!("HTTP/1.1 {status}\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!(
        "content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    ));
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    out
}

/// The upstream's answer to `request`: the `authorization` it got, echoed as the
/// path asks.
fn echo_back(request: &HttpRequest) -> Vec<Vec<u8>> {
    let auth = request.header("authorization").unwrap_or("none").to_owned();
    let json_type = [("content-type", "application/json".to_owned())];
    let raw = format!("{{\"authorization\":\"{auth}\"}}");
    match request.path.as_str() {
        "/raw" => vec![response("200 OK", &json_type, raw.as_bytes())],
        "/base64" => vec![response("200 OK", &[], STANDARD.encode(&auth).as_bytes())],
        "/url" => vec![response(
            "200 OK",
            &[],
            format!("next=/login?token={}", percent_encode(&auth)).as_bytes(),
        )],
        "/json" => {
            let escaped = serde_json::to_string(&auth)
                .expect("json")
                .replace('/', "\\/");
            vec![response(
                "200 OK",
                &json_type,
                format!("{{\"seen\":{escaped}}}").as_bytes(),
            )]
        }
        "/split" => {
            let (first, second) = raw.as_bytes().split_at(raw.find("live").expect("live") + 2);
            let mut head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                             transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
                .to_vec();
            head.extend(chunk(first));
            let mut tail = chunk(second);
            tail.extend_from_slice(b"0\r\n\r\n");
            vec![head, tail]
        }
        // Trailers after the body: Envoy's HTTP/1 codec drops them (the shipped
        // bootstraps' upstreams are HTTP/1.1, without `enable_trailers`), so the
        // body's end reaches the filter as its end of stream, and the held-back tail
        // is given out.
        "/trailers" => {
            let mut all = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\
                            trailer: x-checksum\r\nconnection: close\r\n\r\n"
                .to_vec();
            all.extend(chunk(raw.as_bytes()));
            all.extend_from_slice(b"0\r\nx-checksum: 1\r\n\r\n");
            vec![all]
        }
        "/gzip" => vec![response(
            "200 OK",
            &[
                ("content-encoding", "gzip".to_owned()),
                ("content-type", "application/json".to_owned()),
            ],
            &gzip(raw.as_bytes()),
        )],
        "/header" => vec![response(
            "200 OK",
            &[("x-echo", auth.clone()), ("x-other", "plain".to_owned())],
            b"ok",
        )],
        // A misbehaving upstream: brotli whatever the request asked for.
        "/br" => vec![response(
            "200 OK",
            &[("content-encoding", "br".to_owned())],
            raw.as_bytes(),
        )],
        "/accept" => vec![response(
            "200 OK",
            &[],
            request
                .header("accept-encoding")
                .unwrap_or("none")
                .as_bytes(),
        )],
        _ => vec![response("404 Not Found", &[], b"")],
    }
}

/// Every form of the secret an echo above uses.
fn forms() -> Vec<String> {
    let auth = format!("Bearer {SECRET}");
    vec![
        SECRET.to_owned(),
        "0123456789".to_owned(),
        STANDARD.encode(&auth).trim_end_matches('=').to_owned(),
        percent_encode(&auth),
        auth.replace('/', "\\/"),
    ]
}

#[track_caller]
fn assert_no_secret(what: &str, response: &HttpResponse) {
    let all = format!("{:?} {}", response.headers, response.body);
    for form in forms() {
        assert!(
            !all.contains(&form),
            "{what}: {form} reached the agent: {all}"
        );
    }
}

#[test]
fn an_upstream_echoing_the_credential_in_any_common_form_never_shows_it_to_the_agent() {
    let stack = Stack::start();
    let redacting = Scripted::start(echo_back);
    let open = Scripted::start(echo_back);
    stack.set_credential("default", "ECHO_TOKEN", SECRET);
    // Redaction is on unless turned off: no field.
    stack.add_service_as_is(
        "default",
        json!({"name": "redacting", "host": redacting.authority(), "upstream_tls": false,
               "auth": {"type": "bearer", "token": "ECHO_TOKEN"}}),
    );
    stack.add_service(
        "default",
        json!({"name": "open", "host": open.authority(), "upstream_tls": false,
               "redact_responses": false,
               "auth": {"type": "bearer", "token": "ECHO_TOKEN"}}),
    );
    let token = stack.create_agent("echoer", &["default"]);
    let get = |url: &str, headers: &[(&str, &str)]| stack.get_as(&token, "default", url, headers);

    // The service that does not redact: the echo reaches the agent (so the checks
    // below can fail).
    let raw = eventually(
        &stack.envoy,
        FIRST_SNAPSHOT,
        || get(&open.url("/raw"), &[]),
        |r| r.status == 200,
    );
    assert!(raw.body.contains(SECRET), "{}", raw.body);

    let raw = eventually(
        &stack.envoy,
        FIRST_SNAPSHOT,
        || get(&redacting.url("/raw"), &[]),
        |r| r.status == 200,
    );
    assert_eq!(
        unmasked(raw.json()["authorization"].as_str().unwrap_or_default()),
        "[REDACTED]",
        "{}",
        raw.body
    );
    assert_no_secret("raw", &raw);

    // The padding of a base64 echo is left (the unpadded form is what is matched).
    let padding: String = STANDARD
        .encode(format!("Bearer {SECRET}"))
        .chars()
        .filter(|c| *c == '=')
        .collect();
    // (path, the agent's accept-encoding, what the agent gets)
    let cases = [
        ("/base64", "", format!("[REDACTED]{padding}")),
        ("/url", "", "next=/login?token=[REDACTED]".to_owned()),
        ("/json", "", "{\"seen\":\"[REDACTED]\"}".to_owned()),
        (
            "/split",
            "",
            "{\"authorization\":\"[REDACTED]\"}".to_owned(),
        ),
        (
            "/trailers",
            "",
            "{\"authorization\":\"[REDACTED]\"}".to_owned(),
        ),
        (
            "/gzip",
            "gzip",
            "{\"authorization\":\"[REDACTED]\"}".to_owned(),
        ),
        ("/header", "", "ok".to_owned()),
    ];
    for (path, accept, expected) in cases {
        let headers: Vec<(&str, &str)> = if accept.is_empty() {
            vec![]
        } else {
            vec![("accept-encoding", accept)]
        };
        let answer = get(&redacting.url(path), &headers);
        assert_eq!(
            answer.status, 200,
            "{path}: {} {}",
            answer.status, answer.body
        );
        assert_eq!(unmasked(&answer.body), expected, "{path}");
        assert_no_secret(path, &answer);
        if path == "/gzip" {
            assert_eq!(
                answer.header("content-encoding"),
                None,
                "inflated for the agent"
            );
        }
        if path == "/header" {
            assert_eq!(
                answer.header("x-echo").map(unmasked).as_deref(),
                Some("[REDACTED]")
            );
            assert_eq!(answer.header("x-other"), Some("plain"));
        }
    }

    // The agent's accept-encoding is cut to what the filter can decode.
    let accept = get(
        &redacting.url("/accept"),
        &[("accept-encoding", "gzip, br, zstd")],
    );
    assert_eq!(accept.body, "gzip");
    let accept = get(
        &open.url("/accept"),
        &[("accept-encoding", "gzip, br, zstd")],
    );
    assert_eq!(
        accept.body, "gzip, br, zstd",
        "not for a service that does not redact"
    );

    // An encoding the filter cannot decode: the JSON 502, never the body.
    let br = get(&redacting.url("/br"), &[]);
    assert_eq!(br.status, 502, "{}", br.body);
    assert_eq!(br.header("x-agent-vault-error"), Some("true"));
    let body = br.json();
    assert_eq!(body["error"], "response_not_redactable");
    assert_eq!(body["content_encoding"], "br");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("redact_responses"),
        "{body}"
    );
    assert_no_secret("br", &br);

    // Counted: raw, base64, url, json, split, trailers, gzip, header: 1 each.
    let counted = wait_for(FLUSHED, || {
        let n = stack
            .envoy
            .filter_stats()
            .get("agent_vault.responses.redactions")
            .copied()
            .unwrap_or(0);
        (n >= 8).then_some(n)
    });
    assert_eq!(counted, Some(8), "{:?}", stack.envoy.filter_stats());
    assert!(
        stack
            .envoy
            .filter_stats()
            .get("agent_vault.requests.denied.response_not_redactable")
            .is_some_and(|n| *n >= 1),
        "{:?}",
        stack.envoy.filter_stats()
    );

    // The request log says how many, and the 502.
    let logged = wait_for(FLUSHED, || {
        let log = stack.request_log("default");
        let find = |path: &str| {
            log.iter()
                .find(|r| r["path"] == path && r["service"] == "redacting")
                .cloned()
        };
        Some((
            find("/raw")?,
            find("/split")?,
            find("/br")?,
            find("/accept")?,
        ))
    });
    let (raw, split, br, accept) = logged.expect("the requests are logged");
    assert_eq!(raw["redactions"], 1, "{raw}");
    assert_eq!(split["redactions"], 1, "{split}");
    assert_eq!(br["status"], 502, "{br}");
    assert_eq!(br["error"], "response_not_redactable", "{br}");
    assert!(accept.get("redactions").is_none(), "none: omitted {accept}");
}

#[test]
fn a_redacted_event_stream_keeps_flowing_chunk_by_chunk() {
    const PAUSE: Duration = Duration::from_secs(3);
    let stack = Stack::start();
    // Two events, the second one only after a long pause.
    let sse = Scripted::start_with_pause(PAUSE, |request: &HttpRequest| {
        let auth = request.header("authorization").unwrap_or("none");
        let mut head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                         transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
            .to_vec();
        head.extend(chunk(
            format!("data: first event, quoting {auth}, and some padding after it\n\n").as_bytes(),
        ));
        let mut tail = chunk(b"data: second event\n\n");
        tail.extend_from_slice(b"0\r\n\r\n");
        vec![head, tail]
    });
    stack.set_credential("default", "ECHO_TOKEN", SECRET);
    stack.add_service_as_is(
        "default",
        json!({"name": "sse", "host": sse.authority(), "upstream_tls": false,
               "auth": {"type": "bearer", "token": "ECHO_TOKEN"}}),
    );
    let token = stack.create_agent("streamer", &["default"]);
    eventually(
        &stack.envoy,
        FIRST_SNAPSHOT,
        || stack.get_as(&token, "default", &sse.url("/warm"), &[]),
        |r| r.status == 200,
    );

    // Read the stream as it comes.
    let mut socket = TcpStream::connect(("127.0.0.1", stack.envoy.port)).expect("connect");
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nProxy-Authorization: {}\r\nConnection: close\r\n\r\n",
        sse.url("/events"),
        sse.authority(),
        proxy_basic(&token, "default")
    );
    socket.write_all(request.as_bytes()).expect("send");
    let started = Instant::now();
    let mut received = Vec::new();
    let mut first_at = None;
    while started.elapsed() < PAUSE * 3 {
        let mut buffer = [0u8; 4096];
        match socket.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => received.extend_from_slice(&buffer[..n]),
            Err(_) => {}
        }
        let text = String::from_utf8_lossy(&received);
        if first_at.is_none() && unmasked(&text).contains("first event, quoting [REDACTED]") {
            first_at = Some(started.elapsed());
        }
    }
    let text = String::from_utf8_lossy(&received).into_owned();
    let first_at = first_at.unwrap_or_else(|| panic!("no first event: {text}"));
    assert!(
        first_at < PAUSE,
        "the first event came after {first_at:?}, not before the upstream's pause ended"
    );
    assert!(text.contains("data: second event"), "{text}");
    assert!(!text.contains("0123456789"), "{text}");
}

#[test]
fn inside_an_https_tunnel_the_echoed_credential_is_redacted_too() {
    let upstream_ca = TestCa::new("upstream test CA");
    let echo = Echo::tls(&upstream_ca);
    let allowed = format!("127.0.0.1/32:{}", echo.port);
    let stack = Stack::start_with_ca(ServerOptions::default(), upstream_ca, |options| {
        options.allow_private_upstreams(&[&allowed])
    });
    stack.set_credential("default", "ECHO_TOKEN", SECRET);
    stack.add_service_as_is(
        "default",
        json!({"name": "echo", "host": echo.authority(),
               "auth": {"type": "bearer", "token": "ECHO_TOKEN"}}),
    );
    let token = stack.create_agent("tunneller", &["default"]);
    let proxy = format!("http://{token}:default@127.0.0.1:{}", stack.envoy.port);
    let url = format!("https://{}/v1/x", echo.authority());
    let answer = wait_for(FIRST_SNAPSHOT, || {
        let out = crate::https_proxy::curl(&proxy, &stack.server.proxy_ca(), &[&url]);
        let (status, body) = (out.status, out.body);
        (status == 200).then_some(body)
    });
    let body = answer.unwrap_or_else(|| panic!("{}", stack.envoy.log_tail(30)));
    let seen: Value = serde_json::from_str(&body).expect("the echo");
    assert_eq!(
        unmasked(
            seen["headers"]["authorization"]
                .as_str()
                .unwrap_or_default()
        ),
        "[REDACTED]",
        "{body}"
    );
    assert!(!body.contains("0123456789"), "{body}");
    // The upstream did get the credential.
    let received = echo.received();
    assert_eq!(
        received
            .last()
            .map(|r| r["headers"]["authorization"].clone()),
        Some(Value::from(format!("Bearer {SECRET}")))
    );
}
