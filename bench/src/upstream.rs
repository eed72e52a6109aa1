//! The upstream every variant but the gRPC pair (k, l: `grpc`) routes to: a minimal
//! HTTP/1.1 server on loopback that answers `200 ok` to everything, with one thread per
//! (keep-alive) connection. It also counts what it saw, so the benchmark can check that
//! the variants that inject a credential did inject it and that no agent token reached
//! the upstream.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok";

/// What the upstream saw.
#[derive(Debug, Default)]
pub struct Seen {
    pub requests: AtomicU64,
    /// Requests carrying `authorization: Bearer <the benchmark's secret>`.
    pub with_credential: AtomicU64,
    /// Requests still carrying `proxy-authorization` (the agent's token).
    pub with_proxy_authorization: AtomicU64,
}

/// A reading of [`Seen`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SeenCounts {
    pub requests: u64,
    pub with_credential: u64,
    pub with_proxy_authorization: u64,
}

impl SeenCounts {
    pub fn since(self, before: SeenCounts) -> SeenCounts {
        SeenCounts {
            requests: self.requests - before.requests,
            with_credential: self.with_credential - before.with_credential,
            with_proxy_authorization: self.with_proxy_authorization
                - before.with_proxy_authorization,
        }
    }
}

pub struct Upstream {
    pub port: u16,
    pub seen: Arc<Seen>,
}

impl Upstream {
    /// Starts on a free loopback port; `credential_line` is the lowercase header line
    /// that proves injection (`authorization: bearer sk_...`).
    pub fn start(credential_line: &str) -> std::io::Result<Upstream> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let seen = Arc::new(Seen::default());
        let counters = seen.clone();
        let credential = credential_line.to_ascii_lowercase();
        std::thread::Builder::new()
            .name("upstream-accept".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    let counters = counters.clone();
                    let credential = credential.clone();
                    let _ = std::thread::Builder::new()
                        .name("upstream-conn".into())
                        .stack_size(64 * 1024)
                        .spawn(move || serve(stream, &counters, &credential));
                }
            })?;
        Ok(Upstream { port, seen })
    }

    pub fn counts(&self) -> SeenCounts {
        SeenCounts {
            requests: self.seen.requests.load(Ordering::Relaxed),
            with_credential: self.seen.with_credential.load(Ordering::Relaxed),
            with_proxy_authorization: self.seen.with_proxy_authorization.load(Ordering::Relaxed),
        }
    }
}

/// Reads one request's head from `reader`, through the reused `line`: the request
/// line's target into `target`, then each header to `header(name, trimmed value, whole
/// line)`, up to the empty line. `false` at the end of the stream or on an error.
pub fn read_head(
    reader: &mut impl BufRead,
    line: &mut String,
    target: &mut String,
    mut header: impl FnMut(&str, &str, &str),
) -> bool {
    line.clear();
    if !matches!(reader.read_line(line), Ok(n) if n > 0) {
        return false;
    }
    target.clear();
    target.push_str(line.split(' ').nth(1).unwrap_or("/"));
    loop {
        line.clear();
        if !matches!(reader.read_line(line), Ok(n) if n > 0) {
            return false;
        }
        let text = line.trim_end();
        if text.is_empty() {
            return true;
        }
        if let Some((name, value)) = text.split_once(':') {
            header(name, value.trim(), text);
        }
    }
}

fn serve(stream: TcpStream, seen: &Seen, credential: &str) {
    let _ = stream.set_nodelay(true);
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::with_capacity(16 * 1024, stream);
    let (mut line, mut target) = (String::new(), String::new());
    loop {
        let mut content_length = 0usize;
        let mut has_credential = false;
        let mut has_proxy_auth = false;
        let complete = read_head(
            &mut reader,
            &mut line,
            &mut target,
            |name, value, header| {
                if name.eq_ignore_ascii_case("content-length") {
                    content_length = value.parse().unwrap_or(0);
                } else if name.eq_ignore_ascii_case("authorization") {
                    has_credential = header.eq_ignore_ascii_case(credential);
                } else if name.eq_ignore_ascii_case("proxy-authorization") {
                    has_proxy_auth = true;
                }
            },
        );
        if !complete {
            return;
        }
        if content_length > 0 {
            let mut body = vec![0u8; content_length];
            if reader.read_exact(&mut body).is_err() {
                return;
            }
        }
        seen.requests.fetch_add(1, Ordering::Relaxed);
        if has_credential {
            seen.with_credential.fetch_add(1, Ordering::Relaxed);
        }
        if has_proxy_auth {
            seen.with_proxy_authorization
                .fetch_add(1, Ordering::Relaxed);
        }
        if writer.write_all(RESPONSE).is_err() {
            return;
        }
    }
}
