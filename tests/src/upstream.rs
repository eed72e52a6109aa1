//! Echo upstreams for the end-to-end tests: a plain-HTTP and a TLS server on loopback
//! that answer every request with JSON describing exactly what they received, and a
//! test CA (made with `rcgen`) whose bundle Envoy is given to verify the TLS one.
//!
//! The echo body is `{"method", "path", "headers": {lowercase name: value},
//! "header_list": [[name, value], ...], "body", "tls", "sni"}`. Repeated headers are
//! joined with ", " in `headers`; `header_list` keeps every line as received.
//! A path starting with `/status/NNN` is answered with status NNN (same JSON body).

use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{json, Map, Value};

use crate::http::{read_request, HttpRequest};
use crate::net::{serve_loopback, Serving};

/// A certificate authority made for one test; its PEM goes into Envoy's CA bundle.
pub struct TestCa {
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("ca key");
        let cert = params.self_signed(&key).expect("self-signed ca");
        TestCa {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// Writes the CA certificate (PEM) to `path` and returns the path.
    pub fn write_pem(&self, path: &Path) -> PathBuf {
        std::fs::write(path, &self.cert_pem).expect("write ca pem");
        path.to_path_buf()
    }

    /// [`TestCa::issue`] as PEM: (certificate, PKCS#8 private key), for a server that
    /// reads files (`agent-vault server --tls-cert --tls-key`).
    pub fn issue_pem(&self, names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let params = CertificateParams::new(names).expect("leaf params");
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        (cert.pem(), key.serialize_pem())
    }

    /// A TLS server's configuration for a loopback upstream: a leaf for `localhost`
    /// and `127.0.0.1` from this CA, offering exactly the ALPN protocols `alpn`.
    pub fn server_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        let (chain, key) = self.issue(&["localhost", "127.0.0.1"]);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("tls versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server cert");
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// A leaf certificate for `names` (DNS names or IP literals), signed by this CA:
    /// the DER chain (leaf only) and the PKCS#8 private key.
    pub fn issue(&self, names: &[&str]) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("leaf params");
        params
            .distinguished_name
            .push(DnType::CommonName, "agent-vault test upstream");
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        (
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }
}

/// One running echo server on 127.0.0.1; stopped when dropped.
pub struct Echo {
    pub port: u16,
    pub tls: bool,
    received: Arc<Mutex<Vec<Value>>>,
    _serving: Serving,
}

impl Echo {
    /// A plain-HTTP echo server.
    pub fn plain() -> Echo {
        Echo::start(None)
    }

    /// A TLS echo server with a certificate for `localhost` and `127.0.0.1` from `ca`.
    pub fn tls(ca: &TestCa) -> Echo {
        Echo::start(Some(ca.server_config(&[b"http/1.1"])))
    }

    fn start(tls: Option<Arc<rustls::ServerConfig>>) -> Echo {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind echo");
        let port = listener.local_addr().expect("echo addr").port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let is_tls = tls.is_some();
        let serving = {
            let received = received.clone();
            serve_loopback(listener, move |stream| {
                serve_connection(stream, tls.clone(), received.clone())
            })
        };
        Echo {
            port,
            tls: is_tls,
            received,
            _serving: serving,
        }
    }

    /// `localhost:<port>`: the host a service rule names for this upstream.
    pub fn authority(&self) -> String {
        format!("localhost:{}", self.port)
    }

    /// `http://localhost:<port><path>`: what an agent sends through the proxy (also for
    /// the TLS server: Envoy originates the TLS).
    pub fn url(&self, path: &str) -> String {
        format!("http://localhost:{}{}", self.port, path)
    }

    /// Every request received so far, oldest first (the echoed JSON).
    pub fn received(&self) -> Vec<Value> {
        self.received.lock().expect("received").clone()
    }

    pub fn clear(&self) {
        self.received.lock().expect("received").clear();
    }
}

fn serve_connection(
    stream: TcpStream,
    tls: Option<Arc<rustls::ServerConfig>>,
    received: Arc<Mutex<Vec<Value>>>,
) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    let _ = stream.set_nodelay(true);
    match tls {
        None => {
            let _ = serve_http(&stream, false, None, &received);
            let _ = stream.shutdown(Shutdown::Both);
        }
        Some(config) => {
            let Ok(conn) = rustls::ServerConnection::new(config) else {
                return;
            };
            let mut tls_stream = rustls::StreamOwned::new(conn, stream);
            // Finish the handshake first so the SNI is known (a failed handshake, e.g.
            // a client that does not trust our CA, just ends the connection).
            while tls_stream.conn.is_handshaking() {
                if tls_stream.conn.complete_io(&mut tls_stream.sock).is_err() {
                    return;
                }
            }
            let sni = tls_stream.conn.server_name().map(str::to_string);
            let _ = serve_http(&mut tls_stream, true, sni, &received);
            tls_stream.conn.send_close_notify();
            let _ = tls_stream.flush();
        }
    }
}

/// Serves HTTP/1.1 requests on one connection until the peer closes or asks to.
fn serve_http<S: Read + Write>(
    stream: S,
    tls: bool,
    sni: Option<String>,
    received: &Mutex<Vec<Value>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    while let Some(request) = read_request(&mut reader)? {
        let close = request
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let HttpRequest {
            method,
            path,
            headers: header_list,
            body,
        } = request;

        let mut headers = Map::new();
        for (name, value) in &header_list {
            let key = name.to_ascii_lowercase();
            let joined = match headers.get(&key).and_then(Value::as_str) {
                Some(prev) => format!("{prev}, {value}"),
                None => value.clone(),
            };
            headers.insert(key, Value::String(joined));
        }
        let echo = json!({
            "method": method,
            "path": path,
            "headers": headers,
            "header_list": header_list
                .iter()
                .map(|(n, v)| json!([n, v]))
                .collect::<Vec<_>>(),
            "body": String::from_utf8_lossy(&body),
            "tls": tls,
            "sni": sni,
        });
        received.lock().expect("received").push(echo.clone());

        let status: u16 = path
            .strip_prefix("/status/")
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse().ok())
            .unwrap_or(200);
        let payload = echo.to_string();
        let response = format!(
            "HTTP/1.1 {status} Echo\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{}\r\n{payload}",
            payload.len(),
            if close { "connection: close\r\n" } else { "" },
        );
        let stream = reader.get_mut();
        stream.write_all(response.as_bytes())?;
        stream.flush()?;
        if close {
            return Ok(());
        }
    }
    Ok(())
}

/// A loopback HTTP/1.1 upstream whose answers a test writes: `answer` gets each request
/// and returns the raw response (status line, headers and body bytes) in parts, written
/// with a flush and a pause between them, so that they reach Envoy as separate reads
/// (a secret split across two body chunks). Every connection ends after one answer.
pub struct Scripted {
    pub port: u16,
    _serving: Serving,
}

/// The pause between the parts of a [`Scripted`] answer.
pub const SCRIPTED_PAUSE: Duration = Duration::from_millis(150);

impl Scripted {
    pub fn start(
        answer: impl Fn(&HttpRequest) -> Vec<Vec<u8>> + Send + Sync + 'static,
    ) -> Scripted {
        Scripted::start_with_pause(SCRIPTED_PAUSE, answer)
    }

    /// As [`Scripted::start`], with `pause` between the parts.
    pub fn start_with_pause(
        pause: Duration,
        answer: impl Fn(&HttpRequest) -> Vec<Vec<u8>> + Send + Sync + 'static,
    ) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind scripted upstream");
        let port = listener.local_addr().expect("scripted addr").port();
        let answer = Arc::new(answer);
        let serving = serve_loopback(listener, move |stream: TcpStream| {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
            let _ = stream.set_nodelay(true);
            let mut reader = BufReader::new(&stream);
            let Ok(Some(request)) = read_request(&mut reader) else {
                return;
            };
            let mut writer = &stream;
            let parts = answer(&request);
            let last = parts.len().saturating_sub(1);
            for (i, part) in parts.iter().enumerate() {
                if writer
                    .write_all(part)
                    .and_then(|()| writer.flush())
                    .is_err()
                {
                    return;
                }
                if i < last {
                    std::thread::sleep(pause);
                }
            }
            let _ = stream.shutdown(Shutdown::Both);
        });
        Scripted {
            port,
            _serving: serving,
        }
    }

    /// `localhost:<port>`: the host a service rule names for this upstream.
    pub fn authority(&self) -> String {
        format!("localhost:{}", self.port)
    }

    /// `http://localhost:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://localhost:{}{}", self.port, path)
    }
}

/// One chunk of a chunked body (`transfer-encoding: chunked`).
pub fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}
