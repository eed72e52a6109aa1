//! HTTP/1.1 as the tests and the benchmark speak it, on raw sockets: exactly the bytes
//! a test means to send (malformed requests included) and exactly what came back.
//!
//! - [`http_request`] / [`raw_request`]: one request on a new connection, read until
//!   the peer closes; never fails ([`HttpResponse::status`] 0 says nothing came back).
//! - [`Conn`]: a keep-alive connection over TCP or a Unix socket, for loops that time
//!   each request (the benchmark).
//! - [`read_request`]: the server side, for the kit's in-process upstreams and fake
//!   control plane.

use std::io::{BufRead, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use base64::Engine;
use serde_json::Value;

mod conn;

pub use conn::{tcp_once, unix_once, Conn, RawResponse, Stream, TcpConn, UnixConn};

/// The first value of header `name` (any case) in `headers` (names as sent, in order).
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// `Basic base64(token:vault)` for `Proxy-Authorization`; an empty `vault` gives
/// `token:`, what curl sends for `http://token@proxy`.
pub fn proxy_basic(token: &str, vault: &str) -> String {
    let pair = format!("{token}:{vault}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    )
}

/// One HTTP response as the client received it.
#[derive(Clone, Debug)]
pub struct HttpResponse {
    /// 0 when no response arrived (the error is in `body`).
    pub status: u16,
    /// In order, names as sent.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// The first header with this name (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!(
                "response is not JSON ({e}): {} {:?} {}",
                self.status, self.headers, self.body
            )
        })
    }

    /// The echo upstream's record of the request (asserts a 2xx from the echo).
    #[track_caller]
    pub fn echoed(&self) -> Value {
        assert!(
            (200..300).contains(&self.status) && self.header("x-agent-vault-error").is_none(),
            "expected the upstream's echo, got {} {:?} {}",
            self.status,
            self.headers,
            self.body
        );
        self.json()
    }
}

/// `GET url` through the proxy on `proxy_port` (absolute-form request line, `Host` from
/// the URL unless given, `Connection: close`), with exactly these extra headers.
pub fn proxy_get(proxy_port: u16, url: &str, headers: &[(&str, &str)]) -> HttpResponse {
    proxy_request(proxy_port, "GET", url, headers, None)
}

/// Any method through the proxy; see [`proxy_get`].
pub fn proxy_request(
    proxy_port: u16,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> HttpResponse {
    http_request(proxy_port, method, url, headers, body)
}

/// An HTTP/1.1 request to 127.0.0.1:`port` with `target` as the request target
/// (absolute-form `http://host/path` or origin-form `/path`).
pub fn http_request(
    port: u16,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> HttpResponse {
    let mut request = format!("{method} {target} HTTP/1.1\r\n");
    let has = |name: &str| headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
    if !has("host") {
        let host = target
            .split_once("://")
            .map(|(_, rest)| rest.split('/').next().unwrap_or(rest))
            .unwrap_or("127.0.0.1");
        request.push_str(&format!("Host: {host}\r\n"));
    }
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = body {
        if !has("content-length") && !has("transfer-encoding") {
            request.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
    }
    if !has("connection") {
        request.push_str("Connection: close\r\n");
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    if let Some(body) = body {
        bytes.extend_from_slice(body);
    }
    raw_request(port, &bytes)
}

/// Sends `bytes` as they are to 127.0.0.1:`port`, reads until the peer closes (or
/// 30 s pass), and parses one HTTP/1.1 response.
pub fn raw_request(port: u16, bytes: &[u8]) -> HttpResponse {
    let failed = |what: String| HttpResponse {
        status: 0,
        headers: Vec::new(),
        body: what,
    };
    let mut stream = match TcpStream::connect(("127.0.0.1", port)) {
        Ok(stream) => stream,
        Err(e) => return failed(format!("connect 127.0.0.1:{port}: {e}")),
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    if let Err(e) = stream.write_all(bytes) {
        return failed(format!("write: {e}"));
    }
    let mut data = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                data.extend_from_slice(&buf[..n]);
                if response_complete(&data) {
                    break;
                }
            }
            Err(e) => {
                if data.is_empty() {
                    return failed(format!("read: {e}"));
                }
                break;
            }
        }
    }
    parse_response(&data).unwrap_or_else(|| {
        failed(format!(
            "unparsable response: {:?}",
            String::from_utf8_lossy(&data)
        ))
    })
}

fn head_end(data: &[u8]) -> Option<usize> {
    data.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
}

/// Whether `data` holds a whole response with a known length (so a client that asked
/// for keep-alive need not wait for the close).
fn response_complete(data: &[u8]) -> bool {
    let Some(end) = head_end(data) else {
        return false;
    };
    let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    match length {
        Some(len) => data.len() >= end + len,
        None => {
            head.lines().any(|l| l.starts_with("transfer-encoding:"))
                && data[end..].ends_with(b"0\r\n\r\n")
        }
    }
}

fn parse_response(data: &[u8]) -> Option<HttpResponse> {
    let end = head_end(data)?;
    let head = String::from_utf8_lossy(&data[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let status: u16 = status_line.split_whitespace().nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let find = |name: &str| header(&headers, name).map(str::to_string);
    let rest = &data[end..];
    let body = if find("transfer-encoding")
        .map(|v| v.to_ascii_lowercase().contains("chunked"))
        .unwrap_or(false)
    {
        dechunk(rest)
    } else if let Some(len) = find("content-length").and_then(|v| v.parse::<usize>().ok()) {
        rest[..len.min(rest.len())].to_vec()
    } else {
        rest.to_vec()
    };
    Some(HttpResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = data.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or(0);
        data = &data[line_end + 2..];
        if size == 0 || data.len() < size {
            break;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[(size + 2).min(data.len())..];
    }
    out
}

/// One HTTP/1.1 request as a test server reads it: header names as sent (in order), the
/// body by `content-length` or chunked.
pub struct HttpRequest {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpRequest {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

/// Reads the next request on a connection; `None` when the peer closed it.
pub fn read_request<R: BufRead>(reader: &mut R) -> std::io::Result<Option<HttpRequest>> {
    let mut request_line = String::new();
    loop {
        request_line.clear();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(None);
        }
        if !request_line.trim_end().is_empty() {
            break;
        }
    }
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_string(), value.trim().to_string()));
        }
    }
    let mut request = HttpRequest {
        method,
        path,
        headers,
        body: Vec::new(),
    };
    let chunked = request
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    request.body = if chunked {
        read_chunked(reader)?
    } else {
        let len: usize = request
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        reader.read_exact(&mut body)?;
        body
    };
    Ok(Some(request))
}

fn read_chunked<R: BufRead>(reader: &mut R) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut size_line = String::new();
        reader.read_line(&mut size_line)?;
        let size_hex = size_line.trim().split(';').next().unwrap_or("0");
        let size = usize::from_str_radix(size_hex, 16).unwrap_or(0);
        if size == 0 {
            // Trailers, then the empty line.
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
                    return Ok(body);
                }
            }
        }
        let mut chunk = vec![0; size];
        reader.read_exact(&mut chunk)?;
        body.extend_from_slice(&chunk);
        let mut crlf = String::new();
        reader.read_line(&mut crlf)?;
    }
}

/// `text` with each redaction mask the filter writes (`[REDACTED]` padded with `*` to
/// the length of what it replaced; `[REDACT]` for 8–9 bytes) shortened to
/// `[REDACTED]`: what a test compares.
pub fn unmasked(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("[REDACT") {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        let head = ["[REDACTED]", "[REDACT]", "[REDACT"]
            .into_iter()
            .find(|head| after.starts_with(head))
            .unwrap_or("[REDACT");
        out.push_str("[REDACTED]");
        rest = after[head.len()..].trim_start_matches('*');
    }
    out.push_str(rest);
    out
}
