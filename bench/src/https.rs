//! HTTPS agents, for the interception pair (h, j) and the first handshake to a new
//! host: wrk cannot `CONNECT`, so this is their load generator.
//!
//! An agent here does what an SDK behind `HTTPS_PROXY` does: `CONNECT host:port` to
//! Envoy with its proxy credential, TLS inside the tunnel (rustls, trusting only the
//! control plane's proxy CA, SNI the `CONNECT`'s host, no session resumption: Envoy's
//! on-demand certificates forbid it), then keep-alive HTTP/1.1 requests.
//!
//! The load is a closed loop, one thread per connection. [`Load::open`] opens every
//! tunnel and sends each a few warm-up requests, then the threads wait; only
//! [`Load::run`] starts the clock, so tunnel setup never counts in a measured window
//! (and the caller reads CPU and counters between the two).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Barrier};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use agent_vault_testkit::http::{Conn, Stream};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::load::Run;

/// TLS inside a tunnel.
pub struct Tls(rustls::StreamOwned<rustls::ClientConnection, TcpStream>);

impl Read for Tls {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Tls {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl Stream for Tls {}

/// How long the two steps of opening a tunnel took.
#[derive(Debug, Clone, Copy)]
pub struct Opened {
    /// TCP connect and the `CONNECT` exchange (the filter authenticates it in (j)).
    pub connect: Duration,
    /// The TLS handshake inside the tunnel, from the ClientHello to the client's
    /// Finished (certificate verification included).
    pub handshake: Duration,
}

/// An HTTPS agent: where it connects, as whom, and what it trusts.
#[derive(Clone)]
pub struct Agent {
    pub proxy_port: u16,
    /// `host:port` of the `CONNECT`; the `Host` of the requests inside.
    pub authority: String,
    /// The `Proxy-Authorization` value of the `CONNECT`.
    pub proxy_authorization: String,
    tls: Arc<rustls::ClientConfig>,
}

impl Agent {
    /// `ca_pem`: the proxy CA (the control plane's `ca.pem`).
    pub fn new(
        proxy_port: u16,
        authority: &str,
        proxy_authorization: &str,
        ca_pem: &str,
    ) -> Result<Agent, String> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            let cert = cert.map_err(|e| format!("the proxy CA PEM: {e}"))?;
            roots.add(cert).map_err(|e| format!("the proxy CA: {e}"))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        // Every handshake a full one, as a new agent process makes it (Envoy issues no
        // tickets here anyway).
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Agent {
            proxy_port,
            authority: authority.to_string(),
            proxy_authorization: proxy_authorization.to_string(),
            tls: Arc::new(config),
        })
    }

    /// The host of [`Agent::authority`]: the SNI real clients send.
    pub fn host(&self) -> &str {
        self.authority
            .rsplit_once(':')
            .map_or(self.authority.as_str(), |(host, _)| host)
    }

    /// `CONNECT`, then TLS with `sni`: the decrypted connection, and how long each step
    /// took.
    pub fn open(&self, sni: &str) -> Result<(Conn<Tls>, Opened), String> {
        let start = Instant::now();
        let mut conn = Conn::tcp(self.proxy_port).map_err(|e| format!("connect: {e}"))?;
        let response = conn
            .request(
                "CONNECT",
                &self.authority,
                &[
                    ("Host", &self.authority),
                    ("Proxy-Authorization", &self.proxy_authorization),
                ],
                None,
            )
            .map_err(|e| format!("CONNECT {}: {e}", self.authority))?;
        if response.status != 200 {
            return Err(format!(
                "CONNECT {}: {} {}",
                self.authority,
                response.status,
                response.text()
            ));
        }
        let connect = start.elapsed();
        let (stream, buffered) = conn.into_parts();
        if !buffered.is_empty() {
            return Err("the proxy sent data after its CONNECT answer".into());
        }
        let name = ServerName::try_from(sni.to_string()).map_err(|e| format!("{sni}: {e}"))?;
        let client = rustls::ClientConnection::new(self.tls.clone(), name)
            .map_err(|e| format!("TLS client: {e}"))?;
        let mut tls = rustls::StreamOwned::new(client, stream);
        let start = Instant::now();
        while tls.conn.is_handshaking() {
            tls.conn
                .complete_io(&mut tls.sock)
                .map_err(|e| format!("TLS handshake with SNI {sni}: {e}"))?;
        }
        let handshake = start.elapsed();
        Ok((
            Conn::over(Tls(tls), &self.authority),
            Opened { connect, handshake },
        ))
    }
}

/// What one connection's thread measured.
struct Measured {
    latencies_us: Vec<u32>,
    non_2xx: u64,
    errors: u64,
}

/// `connections` open tunnels, warmed up, waiting for [`Load::run`].
pub struct Load {
    threads: Vec<JoinHandle<Measured>>,
    start: Arc<Barrier>,
    stop: Arc<AtomicBool>,
}

impl Load {
    /// Opens `connections` tunnels as `agent` and sends `warmup` requests (`GET
    /// path`, each must be a 2xx) on each; returns when all are ready.
    pub fn open(
        agent: &Agent,
        connections: usize,
        path: &str,
        warmup: usize,
    ) -> Result<Load, String> {
        let start = Arc::new(Barrier::new(connections + 1));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let mut threads = Vec::with_capacity(connections);
        for _ in 0..connections {
            let agent = agent.clone();
            let path = path.to_string();
            let (start, stop, ready) = (start.clone(), stop.clone(), ready_tx.clone());
            threads.push(std::thread::spawn(move || {
                let mut measured = Measured {
                    latencies_us: Vec::new(),
                    non_2xx: 0,
                    errors: 0,
                };
                let setup = (|| -> Result<Conn<Tls>, String> {
                    let (mut conn, _) = agent.open(agent.host())?;
                    for _ in 0..warmup {
                        let response = conn
                            .request("GET", &path, &[], None)
                            .map_err(|e| format!("warm-up request: {e}"))?;
                        if !(200..300).contains(&response.status) {
                            return Err(format!(
                                "warm-up request: {} {}",
                                response.status,
                                response.text()
                            ));
                        }
                    }
                    Ok(conn)
                })();
                let _ = ready.send(setup.as_ref().map(drop).map_err(Clone::clone));
                start.wait();
                let Ok(mut conn) = setup else {
                    return measured;
                };
                measured.latencies_us.reserve(100_000);
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    match conn.request("GET", &path, &[], None) {
                        Ok(response) => {
                            measured.latencies_us.push(
                                u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX),
                            );
                            if !(200..300).contains(&response.status) {
                                measured.non_2xx += 1;
                            }
                        }
                        Err(_) => {
                            measured.errors += 1;
                            break;
                        }
                    }
                }
                measured
            }));
        }
        drop(ready_tx);
        let mut failure = None;
        for _ in 0..connections {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(error)) => failure = failure.or(Some(error)),
                Err(_) => failure = failure.or(Some("a load thread died".to_string())),
            }
        }
        let load = Load {
            threads,
            start,
            stop,
        };
        match failure {
            None => Ok(load),
            Some(error) => {
                load.stop.store(true, Ordering::Relaxed);
                load.start.wait();
                for thread in load.threads {
                    let _ = thread.join();
                }
                Err(error)
            }
        }
    }

    /// Starts the clock and the requests, stops them after `duration`.
    pub fn run(self, duration: Duration) -> Result<Run, String> {
        self.start.wait();
        let start = Instant::now();
        std::thread::sleep(duration);
        self.stop.store(true, Ordering::Relaxed);
        let elapsed = start.elapsed().as_secs_f64();
        let mut all = Vec::new();
        let (mut non_2xx, mut errors) = (0, 0);
        for thread in self.threads {
            let measured = thread.join().map_err(|_| "a load thread panicked")?;
            all.extend(measured.latencies_us);
            non_2xx += measured.non_2xx;
            errors += measured.errors;
        }
        Ok(Run::of_latencies(all, elapsed, non_2xx, errors))
    }
}

/// First handshakes to new host names, and the same names again.
#[derive(Debug, Clone, Default)]
pub struct Handshakes {
    /// The first tunnel to each name: Envoy had no certificate for it.
    pub first: Vec<Opened>,
    /// The second tunnel to each name, right after the first: served from Envoy.
    pub again: Vec<Opened>,
    /// Names whose first or second handshake failed, with the first error.
    pub failed: usize,
    pub first_error: Option<String>,
    pub names: usize,
    /// One name, as an example.
    pub example: String,
    /// Certificates Envoy asked its SDS server for meanwhile
    /// (`on_demand_secret.cert_requested`), if its stats said.
    pub envoy_cert_requests: Option<u64>,
}

/// For each of `names` new names under `domain`: a tunnel whose TLS asks for it (a
/// first handshake: Envoy asks the control plane, which mints and pushes a leaf),
/// then a second tunnel to the same name. The `CONNECT` stays `agent`'s own authority
/// (a loopback upstream): only the SNI varies, so nothing ever resolves or connects to
/// the names, and no request is sent inside (the filter would refuse a name other
/// than the `CONNECT`'s, after the handshake this measures).
pub fn first_handshakes(agent: &Agent, domain: &str, names: usize) -> Handshakes {
    const PAUSE: Duration = Duration::from_millis(10);
    let mut out = Handshakes {
        names,
        ..Handshakes::default()
    };
    for i in 0..names {
        // Envoy and its control plane are this run's own: every name is new to both.
        let name = format!("n{i}.{domain}");
        if i == 0 {
            out.example = name.clone();
        }
        // Each tunnel is closed (dropped) before the next opens, and each opens after a
        // pause: Envoy has finished with the previous one (its close, the certificate
        // it just received), so both opens of a name start from the same idle proxy.
        let open = || {
            std::thread::sleep(PAUSE);
            agent.open(&name)
        };
        let result = open().and_then(|(tunnel, first)| {
            drop(tunnel);
            open().map(|(_, again)| (first, again))
        });
        match result {
            Ok((first, again)) => {
                out.first.push(first);
                out.again.push(again);
            }
            Err(error) => {
                out.failed += 1;
                out.first_error.get_or_insert(error);
            }
        }
    }
    out
}
