//! A keep-alive HTTP/1.1 client over TCP or the control plane's Unix socket: enough for
//! the management API (JSON), Envoy's admin, probes through the proxy and the
//! control-plane load loops. `Content-Length` or chunked bodies.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// A response as received. The body stays bytes: the benchmark times requests for
/// multi-megabyte snapshots, and decoding them would add to what it measures.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first header with this name (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        super::header(&self.headers, name)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; `Null` when it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Something a request can be written to and a response read from.
pub trait Stream: Read + Write {}
impl Stream for TcpStream {}
impl Stream for UnixStream {}

/// One keep-alive connection.
pub struct Conn<S: Stream> {
    reader: BufReader<S>,
    host: String,
}

pub type TcpConn = Conn<TcpStream>;
pub type UnixConn = Conn<UnixStream>;

impl Conn<TcpStream> {
    pub fn tcp(port: u16) -> std::io::Result<TcpConn> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Conn {
            reader: BufReader::with_capacity(64 * 1024, stream),
            host: format!("127.0.0.1:{port}"),
        })
    }
}

impl Conn<UnixStream> {
    pub fn unix(path: &Path) -> std::io::Result<UnixConn> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Conn {
            reader: BufReader::with_capacity(64 * 1024, stream),
            host: "agent-vault".into(),
        })
    }
}

impl<S: Stream> Conn<S> {
    /// A connection over `stream`, whose requests name `host` unless they say.
    pub fn over(stream: S, host: &str) -> Conn<S> {
        Conn {
            reader: BufReader::with_capacity(64 * 1024, stream),
            host: host.to_string(),
        }
    }

    /// The stream, and whatever was read from it beyond the last response.
    pub fn into_parts(self) -> (S, Vec<u8>) {
        let buffered = self.reader.buffer().to_vec();
        (self.reader.into_inner(), buffered)
    }

    /// Sends a request (a `Host` header is added unless given) and reads the answer.
    pub fn request(
        &mut self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> std::io::Result<RawResponse> {
        let mut head = format!("{method} {target} HTTP/1.1\r\n");
        if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
            head.push_str(&format!("Host: {}\r\n", self.host));
        }
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if let Some(body) = body {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        if let Some(body) = body {
            bytes.extend_from_slice(body);
        }
        self.reader.get_mut().write_all(&bytes)?;
        // A 2xx to CONNECT has no body: the tunnel starts after its head.
        let connect = method.eq_ignore_ascii_case("CONNECT");
        self.read_response(method == "HEAD", connect)
    }

    /// Sends `bytes` exactly as given (a whole request, e.g. with a chunked body the
    /// caller framed) and reads the answer.
    pub fn request_raw(&mut self, bytes: &[u8]) -> std::io::Result<RawResponse> {
        self.reader.get_mut().write_all(bytes)?;
        self.read_response(bytes.starts_with(b"HEAD "), false)
    }

    fn read_line(&mut self) -> std::io::Result<String> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        Ok(line.trim_end_matches(['\r', '\n']).to_string())
    }

    fn read_response(&mut self, head_only: bool, connect: bool) -> std::io::Result<RawResponse> {
        let status_line = self.read_line()?;
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(&format!("bad status line {status_line:?}")))?;
        let mut headers = Vec::new();
        loop {
            let line = self.read_line()?;
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                headers.push((name.trim().to_string(), value.trim().to_string()));
            }
        }
        let mut response = RawResponse {
            status,
            headers,
            body: Vec::new(),
        };
        if head_only
            || status == 204
            || status == 304
            || (100..200).contains(&status)
            || (connect && (200..300).contains(&status))
        {
            return Ok(response);
        }
        if let Some(length) = response.header("content-length") {
            let length: usize = length.parse().map_err(|_| bad("bad content-length"))?;
            response.body.resize(length, 0);
            self.reader.read_exact(&mut response.body)?;
        } else if response
            .header("transfer-encoding")
            .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
        {
            loop {
                let size = usize::from_str_radix(
                    self.read_line()?.split(';').next().unwrap_or("").trim(),
                    16,
                )
                .map_err(|_| bad("bad chunk size"))?;
                if size == 0 {
                    while !self.read_line()?.is_empty() {}
                    break;
                }
                let start = response.body.len();
                response.body.resize(start + size, 0);
                self.reader.read_exact(&mut response.body[start..])?;
                self.read_line()?;
            }
        } else {
            self.reader.read_to_end(&mut response.body)?;
        }
        Ok(response)
    }
}

fn bad(message: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, message.to_string())
}

/// One request on a new TCP connection to 127.0.0.1:`port`.
pub fn tcp_once(
    port: u16,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> std::io::Result<RawResponse> {
    Conn::tcp(port)?.request(method, target, headers, body)
}

/// One request on a new connection to the Unix socket at `path`.
pub fn unix_once(
    path: &Path,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> std::io::Result<RawResponse> {
    Conn::unix(path)?.request(method, target, headers, body)
}
