//! An HTTPS agent through the proxy, spelled out: a `CONNECT` with exactly the headers a
//! test chooses, then TLS inside the tunnel with exactly the SNI it chooses, then
//! HTTP/1.1 requests (keep-alive) with exactly the `Host` it chooses. Real clients
//! (curl, Python `requests`) always send the `CONNECT`'s host as SNI and `Host`; the
//! tests that check what happens when they differ, or when a tunnel outlives a revoke,
//! need this.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::http::{Conn, RawResponse, Stream};

/// TLS to the proxy's decrypting listener, inside a tunnel.
pub struct TlsInTunnel(rustls::StreamOwned<rustls::ClientConnection, TcpStream>);

impl Read for TlsInTunnel {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for TlsInTunnel {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl Stream for TlsInTunnel {}

/// Sends `CONNECT authority` with `headers` to the proxy on 127.0.0.1:`proxy_port`:
/// the answer, and the connection (the tunnel) when it is a 2xx.
pub fn connect(
    proxy_port: u16,
    authority: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<(RawResponse, Option<TcpStream>)> {
    let mut conn = Conn::tcp(proxy_port)?;
    let mut all = vec![("Host", authority)];
    all.extend_from_slice(headers);
    let response = conn.request("CONNECT", authority, &all, None)?;
    if !(200..300).contains(&response.status) {
        return Ok((response, None));
    }
    let (stream, buffered) = conn.into_parts();
    if !buffered.is_empty() {
        return Err(std::io::Error::other(
            "the proxy sent data after its CONNECT answer before the client spoke",
        ));
    }
    Ok((response, Some(stream)))
}

/// How the client inside the tunnel starts TLS.
#[derive(Clone, Debug)]
pub struct TlsOptions {
    /// The server name it sends (SNI) and checks the certificate against; `None`
    /// sends no SNI (and checks the certificate against `localhost`).
    pub sni: Option<String>,
    /// The CA it trusts (PEM): the proxy's.
    pub ca_pem: String,
    /// ALPN protocols offered.
    pub alpn: Vec<Vec<u8>>,
}

impl TlsOptions {
    pub fn new(sni: &str, ca_pem: &str) -> TlsOptions {
        TlsOptions {
            sni: Some(sni.to_string()),
            ca_pem: ca_pem.to_string(),
            alpn: vec![b"http/1.1".to_vec()],
        }
    }
}

/// An open, decrypted tunnel: HTTP/1.1 requests to the tunnel's host, one after the
/// other on one connection.
pub struct HttpsTunnel {
    conn: Conn<TlsInTunnel>,
    /// The certificate the proxy showed (DER), which the client verified.
    certificate: Vec<u8>,
}

/// Why a tunnel did not open.
#[derive(Debug)]
pub enum TunnelError {
    /// The proxy refused the `CONNECT`.
    Refused(RawResponse),
    /// The TLS handshake inside the tunnel failed (the text says how).
    Tls(String),
    /// The connection failed.
    Io(std::io::Error),
}

impl HttpsTunnel {
    /// `CONNECT authority` (with `connect_headers`, e.g. `Proxy-Authorization`), then
    /// TLS inside. Requests name `authority` in `Host` unless they say otherwise.
    pub fn open(
        proxy_port: u16,
        authority: &str,
        connect_headers: &[(&str, &str)],
        tls: &TlsOptions,
    ) -> Result<HttpsTunnel, TunnelError> {
        let (response, stream) =
            connect(proxy_port, authority, connect_headers).map_err(TunnelError::Io)?;
        let Some(stream) = stream else {
            return Err(TunnelError::Refused(response));
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(TunnelError::Io)?;
        let connection = client_connection(tls).map_err(TunnelError::Tls)?;
        let mut tls_stream = rustls::StreamOwned::new(connection, stream);
        while tls_stream.conn.is_handshaking() {
            if let Err(error) = tls_stream.conn.complete_io(&mut tls_stream.sock) {
                return Err(TunnelError::Tls(error.to_string()));
            }
        }
        let certificate = tls_stream
            .conn
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|leaf| leaf.to_vec())
            .unwrap_or_default();
        Ok(HttpsTunnel {
            conn: Conn::over(TlsInTunnel(tls_stream), authority),
            certificate,
        })
    }

    /// The decrypted stream itself, for a protocol of the test's own (WebSocket).
    pub fn into_stream(self) -> TlsInTunnel {
        self.conn.into_parts().0
    }

    /// The leaf certificate the proxy showed for the tunnel (DER).
    pub fn certificate(&self) -> &[u8] {
        &self.certificate
    }

    /// One request on the tunnel's connection.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> std::io::Result<RawResponse> {
        self.conn.request(method, path, headers, body)
    }

    /// A request written exactly as `bytes` on the tunnel's connection.
    pub fn request_raw(&mut self, bytes: &[u8]) -> std::io::Result<RawResponse> {
        self.conn.request_raw(bytes)
    }

    /// `GET path`.
    pub fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> std::io::Result<RawResponse> {
        self.request("GET", path, headers, None)
    }
}

fn client_connection(options: &TlsOptions) -> Result<rustls::ClientConnection, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(options.ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| format!("the CA PEM: {e}"))?;
        roots.add(cert).map_err(|e| format!("the CA: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = options.alpn.clone();
    config.enable_sni = options.sni.is_some();
    let name = options
        .sni
        .clone()
        .unwrap_or_else(|| "localhost".to_string());
    let server_name = ServerName::try_from(name).map_err(|e| e.to_string())?;
    rustls::ClientConnection::new(Arc::new(config), server_name).map_err(|e| e.to_string())
}
