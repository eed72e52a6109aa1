//! The body features of issue 13, each measured against the same request without it:
//! a request whose JSON body has a placeholder the filter replaces (substitution), and
//! a response the filter scans for the injected value (redaction), at 1 KiB and 1 MiB.
//!
//! One Envoy with our filter (warm cache, as (e)), its own control plane and its own
//! upstream ([`BodyUpstream`]), and three services on the upstream told apart by path:
//! `/plain/*` (bearer, redaction off: the baseline), `/subst/*` (the same, plus a body
//! substitution of `__BENCH_TOKEN__`) and `/redact/*` (bearer, redaction on, the
//! default). A pair compares the two services with the same request, so the only
//! difference is the feature. The pairs' runs alternate over rounds like the variants'.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agent_vault_testkit::http;
use serde_json::json;

use crate::controlplane::ControlPlane;
use crate::envoy::{Envoy, Variant};
use crate::load::{self, Run};
use crate::upstream::read_head;
use crate::{log, procs, report, seed, Args};

/// The placeholder the substituting service declares.
pub const PLACEHOLDER: &str = "__BENCH_TOKEN__";
/// What the filter writes in place of a redacted value (checked, not measured).
const REDACTED_MARK: &str = "[REDACTED]";

/// What a pair measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    /// A `POST` with a JSON body of `size` bytes holding the placeholder once.
    Substitution,
    /// A `GET` answered with `size` bytes holding the injected value once.
    Redaction,
}

/// One pair: the request with and without the feature.
#[derive(Debug, Clone, Copy)]
pub struct Pair {
    pub feature: Feature,
    pub size: usize,
}

impl Pair {
    pub const ALL: [Pair; 4] = [
        Pair {
            feature: Feature::Substitution,
            size: 1024,
        },
        Pair {
            feature: Feature::Substitution,
            size: 1024 * 1024,
        },
        Pair {
            feature: Feature::Redaction,
            size: 1024,
        },
        Pair {
            feature: Feature::Redaction,
            size: 1024 * 1024,
        },
    ];

    pub fn describe(self) -> String {
        let size = if self.size >= 1024 * 1024 {
            format!("{} MiB", self.size / (1024 * 1024))
        } else {
            format!("{} KiB", self.size / 1024)
        };
        match self.feature {
            Feature::Substitution => format!("body substitution, {size} JSON request body"),
            Feature::Redaction => format!("response redaction, {size} response body"),
        }
    }

    /// The request path with (`true`) or without the feature.
    fn path(self, with: bool) -> String {
        match (self.feature, with) {
            (Feature::Substitution, true) => "/subst/upload".into(),
            (Feature::Substitution, false) => "/plain/upload".into(),
            (Feature::Redaction, true) => format!("/redact/bytes/{}", self.size),
            (Feature::Redaction, false) => format!("/plain/bytes/{}", self.size),
        }
    }
}

/// One measured run of one side of a pair.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub pair: usize,
    pub with: bool,
    pub connections: usize,
    pub round: usize,
    pub run: Run,
    pub envoy_cpu_us: f64,
}

/// Everything the report needs.
#[derive(Debug, Default)]
pub struct Results {
    pub samples: Vec<Sample>,
    pub rounds: usize,
    pub connections: Vec<usize>,
}

impl Results {
    fn side(&self, pair: usize, with: bool, connections: usize) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| s.pair == pair && s.with == with && s.connections == connections)
            .collect()
    }

    /// Median of per-round ratios (with / without) of `f`.
    fn ratio(&self, pair: usize, connections: usize, f: impl Fn(&Sample) -> f64) -> f64 {
        let with = self.side(pair, true, connections);
        let without = self.side(pair, false, connections);
        let ratios: Vec<f64> = with
            .iter()
            .filter_map(|w| {
                let base = without.iter().find(|b| b.round == w.round)?;
                (f(base) > 0.0).then(|| f(w) / f(base))
            })
            .collect();
        report::median(&ratios)
    }

    fn median(
        &self,
        pair: usize,
        with: bool,
        connections: usize,
        f: impl Fn(&Sample) -> f64,
    ) -> f64 {
        let values: Vec<f64> = self
            .side(pair, with, connections)
            .into_iter()
            .map(f)
            .collect();
        report::median(&values)
    }

    /// The Markdown section.
    pub fn markdown(&self) -> String {
        let mut md = String::from(
            "| feature | conns | req/s without | req/s with | ×(without) | p50 µs without / with | p99 µs without / with | Envoy CPU µs/req without / with | non-2xx |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for (index, pair) in Pair::ALL.iter().enumerate() {
            for &connections in &self.connections {
                let errors: u64 = self
                    .samples
                    .iter()
                    .filter(|s| s.pair == index && s.connections == connections)
                    .map(|s| s.run.non_2xx + s.run.socket_errors)
                    .sum();
                md.push_str(&format!(
                    "| {} | {connections} | {:.0} | {:.0} | {:.2} | {:.0} / {:.0} | {:.0} / {:.0} | {:.1} / {:.1} | {errors} |\n",
                    pair.describe(),
                    self.median(index, false, connections, |s| s.run.rps),
                    self.median(index, true, connections, |s| s.run.rps),
                    self.ratio(index, connections, |s| s.run.rps),
                    self.median(index, false, connections, |s| s.run.p50_us),
                    self.median(index, true, connections, |s| s.run.p50_us),
                    self.median(index, false, connections, |s| s.run.p99_us),
                    self.median(index, true, connections, |s| s.run.p99_us),
                    self.median(index, false, connections, |s| s.envoy_cpu_us),
                    self.median(index, true, connections, |s| s.envoy_cpu_us),
                ));
            }
        }
        md
    }
}

/// Runs the pairs: `rounds` rounds × pairs × both sides × `connections`.
pub fn run(
    args: &Args,
    workdir: &Path,
    secret: &str,
    rounds: usize,
    checks: &mut Vec<String>,
) -> Result<Results, String> {
    let dir = workdir.join("features");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let upstream = BodyUpstream::start(secret).map_err(|e| e.to_string())?;
    let cp = ControlPlane::start(&args.agent_vault, &dir, "cp-features")?;
    cp.set_credential(seed::LOAD_KEY, secret)?;
    let bearer = json!({"type": "bearer", "token": seed::LOAD_KEY});
    let host = |prefix: &str| format!("localhost:{}/{prefix}/*", upstream.port);
    cp.replace_services(&[
        json!({"name": "plain", "host": host("plain"), "auth": bearer, "upstream_tls": false,
               "redact_responses": false}),
        json!({"name": "subst", "host": host("subst"), "auth": bearer, "upstream_tls": false,
               "redact_responses": false,
               "substitutions": [{"key": seed::LOAD_KEY, "placeholder": PLACEHOLDER, "in": ["body"]}]}),
        json!({"name": "redact", "host": host("redact"), "auth": bearer, "upstream_tls": false}),
    ])?;
    let token = cp.create_agent("features")?;
    cp.wait_socket()?;
    let inputs = crate::envoy_inputs(args, &cp, upstream.port, &dir, "unused");
    let envoy = Envoy::start(&args.envoy, Variant::FilterWarm, &inputs)?;
    let headers = vec![
        ("Host".to_string(), format!("localhost:{}", upstream.port)),
        (
            "Proxy-Authorization".to_string(),
            http::proxy_basic(&token, "default"),
        ),
    ];

    // The bodies, and one wrk script per body (wrk sends a body only from a script).
    let mut scripts: Vec<Option<PathBuf>> = Vec::new();
    let mut bodies: Vec<Option<Vec<u8>>> = Vec::new();
    for (index, pair) in Pair::ALL.iter().enumerate() {
        if pair.feature == Feature::Substitution {
            let body = json_body(pair.size);
            let body_path = dir.join(format!("body-{index}.json"));
            std::fs::write(&body_path, &body).map_err(|e| e.to_string())?;
            let script = dir.join(format!("post-{index}.lua"));
            std::fs::write(
                &script,
                format!(
                    "local f = io.open(\"{}\", \"rb\")\nwrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.body = f:read(\"*a\")\nf:close()\n",
                    body_path.display()
                ),
            )
            .map_err(|e| e.to_string())?;
            scripts.push(Some(script));
            bodies.push(Some(body));
        } else {
            scripts.push(None);
            bodies.push(None);
        }
    }

    // Ready, and each feature does what it says (checked once, outside the clock).
    verify(&envoy, &upstream, &headers, &bodies, secret)?;

    let tck = crate::clk_tck();
    let mut results = Results {
        rounds,
        connections: args.connections.clone(),
        ..Results::default()
    };
    let sides: Vec<(usize, bool)> = (0..Pair::ALL.len())
        .flat_map(|pair| [(pair, false), (pair, true)])
        .collect();
    log(&format!(
        "body features: {rounds} rounds × {} runs × {:?} connections × {} s",
        sides.len(),
        args.connections,
        args.duration.as_secs()
    ));
    for &(pair, with) in &sides {
        let path = Pair::ALL[pair].path(with);
        let target = load::Target {
            port: envoy.port,
            path: &path,
            headers: &headers,
        };
        load::wrk_script(&target, 4, Duration::from_secs(1), scripts[pair].as_deref())?;
    }
    for round in 0..rounds {
        for &connections in &args.connections {
            for k in 0..sides.len() {
                let (pair, with) = sides[(k + round) % sides.len()];
                let path = Pair::ALL[pair].path(with);
                let target = load::Target {
                    port: envoy.port,
                    path: &path,
                    headers: &headers,
                };
                let before = upstream.counts();
                let cpu = procs::cpu_ticks(envoy.proc.pid()).unwrap_or(0);
                let run = load::wrk_script(
                    &target,
                    connections,
                    args.duration,
                    scripts[pair].as_deref(),
                )?;
                let cpu = procs::cpu_ticks(envoy.proc.pid())
                    .unwrap_or(0)
                    .saturating_sub(cpu);
                let seen = upstream.counts().since(before);
                let envoy_cpu_us = if run.requests == 0 {
                    0.0
                } else {
                    cpu as f64 / tck * 1e6 / run.requests as f64
                };
                log(&format!(
                    "features round {} [{}{}] c={connections:>2}: {:>8.0} req/s  p50 {:>7.1} µs  non-2xx {}  envoy cpu {envoy_cpu_us:.1} µs/req",
                    round + 1,
                    Pair::ALL[pair].describe(),
                    if with { "" } else { ", without" },
                    run.rps,
                    run.p50_us,
                    run.non_2xx + run.socket_errors,
                ));
                if Pair::ALL[pair].feature == Feature::Substitution {
                    // Of the bodies (a run's window may also see a bodiless request
                    // of the run before).
                    let (want_secret, want_placeholder) = if with {
                        (seen.bodies, 0)
                    } else {
                        (0, seen.bodies)
                    };
                    // A request still in flight when one run ends is counted in the
                    // next: a few per connection either way.
                    let slack = 2 * connections as u64;
                    if seen.body_with_secret.abs_diff(want_secret) > slack
                        || seen.body_with_placeholder.abs_diff(want_placeholder) > slack
                    {
                        checks.push(format!(
                            "features round {} [{}{}] c={connections}: of {} bodies, {} held the value and {} the placeholder",
                            round + 1,
                            Pair::ALL[pair].describe(),
                            if with { "" } else { ", without" },
                            seen.bodies,
                            seen.body_with_secret,
                            seen.body_with_placeholder
                        ));
                    }
                }
                results.samples.push(Sample {
                    pair,
                    with,
                    connections,
                    round,
                    run,
                    envoy_cpu_us,
                });
            }
        }
    }
    Ok(results)
}

/// A JSON body of exactly `size` bytes holding [`PLACEHOLDER`] once.
fn json_body(size: usize) -> Vec<u8> {
    let head = format!("{{\"text\":\"{PLACEHOLDER}\",\"pad\":\"");
    let tail = "\"}";
    let pad = size.saturating_sub(head.len() + tail.len());
    let mut body = head.into_bytes();
    body.extend(std::iter::repeat_n(b'x', pad));
    body.extend_from_slice(tail.as_bytes());
    body
}

/// Waits until the filter has its snapshot, then checks each feature once: the
/// upstream sees the value in a substituted body (the placeholder in the baseline's),
/// and the agent never sees the value in a redacted response (it does in the
/// baseline's).
fn verify(
    envoy: &Envoy,
    upstream: &BodyUpstream,
    headers: &[(String, String)],
    bodies: &[Option<Vec<u8>>],
    secret: &str,
) -> Result<(), String> {
    let pairs: Vec<(&str, &str)> = headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let response = http::tcp_once(envoy.port, "GET", "/plain/bytes/16", &pairs, None);
        match response {
            Ok(r) if r.status == 200 => break,
            Ok(r) if std::time::Instant::now() > deadline => {
                return Err(format!("features Envoy answers {} {}", r.status, r.text()));
            }
            Err(e) if std::time::Instant::now() > deadline => {
                return Err(format!("features Envoy: {e}"));
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    let json = [("Content-Type", "application/json")];
    for (index, pair) in Pair::ALL.iter().enumerate() {
        for with in [false, true] {
            let path = pair.path(with);
            let mut request_headers = pairs.clone();
            let response = match (&bodies[index], pair.feature) {
                (Some(body), Feature::Substitution) => {
                    request_headers.extend(json);
                    let before = upstream.counts();
                    let response =
                        http::tcp_once(envoy.port, "POST", &path, &request_headers, Some(body))
                            .map_err(|e| format!("{}: {e}", pair.describe()))?;
                    let seen = upstream.counts().since(before);
                    let expected = if with { (1, 0) } else { (0, 1) };
                    if (seen.body_with_secret, seen.body_with_placeholder) != expected {
                        return Err(format!(
                            "{}{}: the upstream saw the value {} time(s) and the placeholder {} time(s)",
                            pair.describe(),
                            if with { "" } else { " (without)" },
                            seen.body_with_secret,
                            seen.body_with_placeholder
                        ));
                    }
                    response
                }
                _ => http::tcp_once(envoy.port, "GET", &path, &request_headers, None)
                    .map_err(|e| format!("{}: {e}", pair.describe()))?,
            };
            if response.status != 200 {
                return Err(format!(
                    "{}{}: {} {}",
                    pair.describe(),
                    if with { "" } else { " (without)" },
                    response.status,
                    response.text()
                ));
            }
            if pair.feature == Feature::Redaction {
                let body = String::from_utf8_lossy(&response.body);
                let leaked = body.contains(secret);
                if with == leaked || (with && !body.contains(REDACTED_MARK)) {
                    return Err(format!(
                        "{}{}: the value {} the agent",
                        pair.describe(),
                        if with { "" } else { " (without)" },
                        if leaked { "reached" } else { "did not reach" }
                    ));
                }
            }
        }
    }
    Ok(())
}

/// What [`BodyUpstream`] saw.
#[derive(Debug, Clone, Copy, Default)]
pub struct Seen {
    pub requests: u64,
    /// Requests with a body.
    pub bodies: u64,
    /// Request bodies holding the credential's value.
    pub body_with_secret: u64,
    /// Request bodies still holding [`PLACEHOLDER`].
    pub body_with_placeholder: u64,
}

impl Seen {
    fn since(self, before: Seen) -> Seen {
        Seen {
            requests: self.requests - before.requests,
            bodies: self.bodies - before.bodies,
            body_with_secret: self.body_with_secret - before.body_with_secret,
            body_with_placeholder: self.body_with_placeholder - before.body_with_placeholder,
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    bodies: AtomicU64,
    body_with_secret: AtomicU64,
    body_with_placeholder: AtomicU64,
}

/// An HTTP/1.1 upstream on loopback that reads request bodies (`Content-Length` or
/// chunked: a substituted body arrives chunked) and looks into them, and answers
/// `GET …/bytes/N` with N bytes holding the credential's value once (what an echo
/// does), anything else with `ok`.
pub struct BodyUpstream {
    pub port: u16,
    counters: Arc<Counters>,
}

impl BodyUpstream {
    pub fn start(secret: &str) -> std::io::Result<BodyUpstream> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let counters = Arc::new(Counters::default());
        let shared = counters.clone();
        let secret = secret.to_owned();
        std::thread::Builder::new()
            .name("body-upstream-accept".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    let counters = shared.clone();
                    let secret = secret.clone();
                    let _ = std::thread::Builder::new()
                        .name("body-upstream-conn".into())
                        .spawn(move || serve(stream, &counters, &secret));
                }
            })?;
        Ok(BodyUpstream { port, counters })
    }

    pub fn counts(&self) -> Seen {
        Seen {
            requests: self.counters.requests.load(Ordering::Relaxed),
            bodies: self.counters.bodies.load(Ordering::Relaxed),
            body_with_secret: self.counters.body_with_secret.load(Ordering::Relaxed),
            body_with_placeholder: self.counters.body_with_placeholder.load(Ordering::Relaxed),
        }
    }
}

fn serve(stream: TcpStream, counters: &Counters, secret: &str) {
    let _ = stream.set_nodelay(true);
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    let (mut line, mut path) = (String::new(), String::new());
    // The response bodies, made once per size.
    let mut responses: Vec<(usize, Vec<u8>)> = Vec::new();
    loop {
        let mut content_length = 0usize;
        let mut chunked = false;
        let complete = read_head(&mut reader, &mut line, &mut path, |name, value, _| {
            if name.eq_ignore_ascii_case("content-length") {
                content_length = value.parse().unwrap_or(0);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.eq_ignore_ascii_case("chunked");
            }
        });
        if !complete {
            return;
        }
        let body = if chunked {
            match read_chunked(&mut reader) {
                Some(body) => body,
                None => return,
            }
        } else {
            let mut body = vec![0u8; content_length];
            if reader.read_exact(&mut body).is_err() {
                return;
            }
            body
        };
        counters.requests.fetch_add(1, Ordering::Relaxed);
        if !body.is_empty() {
            counters.bodies.fetch_add(1, Ordering::Relaxed);
            if contains(&body, secret.as_bytes()) {
                counters.body_with_secret.fetch_add(1, Ordering::Relaxed);
            }
            if contains(&body, PLACEHOLDER.as_bytes()) {
                counters
                    .body_with_placeholder
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        let size = path
            .rsplit_once("/bytes/")
            .and_then(|(_, n)| n.parse::<usize>().ok());
        let written = match size {
            Some(size) => {
                if !responses.iter().any(|(s, _)| *s == size) {
                    responses.push((size, echo_response(size, secret)));
                }
                let bytes = responses
                    .iter()
                    .find(|(s, _)| *s == size)
                    .map(|(_, r)| r.as_slice())
                    .unwrap_or_default();
                writer.write_all(bytes)
            }
            None => writer.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok",
            ),
        };
        if written.is_err() {
            return;
        }
    }
}

/// A response of `size` body bytes with `secret` once in the middle.
fn echo_response(size: usize, secret: &str) -> Vec<u8> {
    let mut body = vec![b'x'; size.max(secret.len())];
    let at = (body.len() - secret.len()) / 2;
    body[at..at + secret.len()].copy_from_slice(secret.as_bytes());
    let mut response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    response.extend_from_slice(&body);
    response
}

fn read_chunked(reader: &mut impl BufRead) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        reader.read_line(&mut line).ok()?;
        let size = usize::from_str_radix(line.trim().split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            // Trailers, up to the empty line.
            loop {
                line.clear();
                if reader.read_line(&mut line).ok()? == 0 || line.trim_end().is_empty() {
                    return Some(body);
                }
            }
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..]).ok()?;
        line.clear();
        reader.read_line(&mut line).ok()?;
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}
