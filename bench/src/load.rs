//! Load: `wrk` (Debian's) through Envoy, and an in-process closed-loop client for the
//! control plane's socket.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_vault_testkit::http::Conn;

/// One load run's result.
#[derive(Debug, Clone, Copy, Default)]
pub struct Run {
    pub requests: u64,
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub non_2xx: u64,
    pub socket_errors: u64,
}

impl Run {
    /// A run of `elapsed_s` seconds from every request's latency (µs, any order).
    pub fn of_latencies(
        mut all: Vec<u32>,
        elapsed_s: f64,
        non_2xx: u64,
        socket_errors: u64,
    ) -> Run {
        all.sort_unstable();
        Run {
            requests: all.len() as u64,
            rps: all.len() as f64 / elapsed_s,
            p50_us: percentile(&all, 0.50),
            p99_us: percentile(&all, 0.99),
            non_2xx,
            socket_errors,
        }
    }
}

/// What wrk sends.
pub struct Target<'a> {
    pub port: u16,
    pub path: &'a str,
    pub headers: &'a [(String, String)],
}

/// Runs wrk with `connections` connections (one thread) for `duration`.
pub fn wrk(target: &Target<'_>, connections: usize, duration: Duration) -> Result<Run, String> {
    wrk_script(target, connections, duration, None)
}

/// [`wrk`] with a Lua script (`-s`), e.g. one that sets a method and a body.
pub fn wrk_script(
    target: &Target<'_>,
    connections: usize,
    duration: Duration,
    script: Option<&Path>,
) -> Result<Run, String> {
    let mut command = Command::new("wrk");
    if let Some(script) = script {
        command.arg("-s").arg(script);
    }
    command
        .args(["-t", "1", "-c", &connections.to_string()])
        .args(["-d", &format!("{}s", duration.as_secs().max(1))])
        .args(["--timeout", "5s", "--latency"]);
    for (name, value) in target.headers {
        command.arg("-H").arg(format!("{name}: {value}"));
    }
    command
        .arg(format!("http://127.0.0.1:{}{}", target.port, target.path))
        .stdin(Stdio::null());
    let output = command
        .output()
        .map_err(|e| format!("cannot run wrk: {e}"))?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        return Err(format!(
            "wrk failed: {}\n{text}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    parse_wrk(&text).ok_or_else(|| format!("cannot read wrk's output:\n{text}"))
}

/// Starts wrk in the background (for load during the propagation test).
pub fn wrk_background(
    target: &Target<'_>,
    connections: usize,
    duration: Duration,
) -> Result<crate::procs::Proc, String> {
    let mut command = Command::new("wrk");
    command
        .args(["-t", "1", "-c", &connections.to_string()])
        .args(["-d", &format!("{}s", duration.as_secs().max(1))]);
    for (name, value) in target.headers {
        command.arg("-H").arg(format!("{name}: {value}"));
    }
    command
        .arg(format!("http://127.0.0.1:{}{}", target.port, target.path))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    crate::procs::Proc::spawn("wrk", command)
}

fn duration_us(text: &str) -> Option<f64> {
    let text = text.trim();
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor = match unit {
        "us" => 1.0,
        "ms" => 1000.0,
        "s" => 1_000_000.0,
        "m" => 60_000_000.0,
        _ => return None,
    };
    Some(number * factor)
}

pub fn parse_wrk(text: &str) -> Option<Run> {
    let mut run = Run::default();
    let mut seen_rps = false;
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("50%") {
            run.p50_us = duration_us(rest)?;
        } else if let Some(rest) = line.strip_prefix("99%") {
            run.p99_us = duration_us(rest)?;
        } else if let Some(rest) = line.strip_prefix("Requests/sec:") {
            run.rps = rest.trim().parse().ok()?;
            seen_rps = true;
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            run.non_2xx = rest.trim().parse().ok()?;
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            run.socket_errors = rest
                .split(',')
                .filter_map(|part| part.split_whitespace().last())
                .filter_map(|n| n.parse::<u64>().ok())
                .sum();
        } else if line.contains(" requests in ") {
            run.requests = line.split_whitespace().next()?.parse().ok()?;
        }
    }
    seen_rps.then_some(run)
}

/// One request the socket loop repeats, and the status it expects.
#[derive(Debug, Clone)]
pub struct SocketRequest {
    pub method: &'static str,
    pub path: &'static str,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
    pub expect: u16,
}

/// A closed loop of `clients` keep-alive connections to the control plane's socket,
/// each sending `request` for `duration`.
pub fn socket_loop(
    socket: &Path,
    clients: usize,
    duration: Duration,
    request: &SocketRequest,
) -> Result<Run, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut threads = Vec::new();
    for _ in 0..clients {
        let socket = socket.to_path_buf();
        let stop = stop.clone();
        let SocketRequest {
            method,
            path,
            headers,
            body,
            expect,
        } = request.clone();
        threads.push(std::thread::spawn(
            move || -> Result<(Vec<u32>, u64), String> {
                let mut conn = Conn::unix(&socket).map_err(|e| e.to_string())?;
                let pairs: Vec<(&str, &str)> = headers
                    .iter()
                    .map(|(n, v)| (n.as_str(), v.as_str()))
                    .collect();
                let mut latencies = Vec::with_capacity(100_000);
                let mut wrong = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    let response = conn
                        .request(method, path, &pairs, body.as_deref())
                        .map_err(|e| e.to_string())?;
                    latencies.push(u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX));
                    if response.status != expect {
                        wrong += 1;
                    }
                }
                Ok((latencies, wrong))
            },
        ));
    }
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    let mut all = Vec::new();
    let mut wrong = 0;
    for thread in threads {
        let (latencies, w) = thread.join().map_err(|_| "client thread panicked")??;
        all.extend(latencies);
        wrong += w;
    }
    Ok(Run::of_latencies(all, elapsed, wrong, 0))
}

/// The `q` quantile of sorted values (nearest rank).
pub fn percentile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    f64::from(sorted[rank - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_output() {
        let text = "Running 5s test @ http://127.0.0.1:1/\n  1 threads and 16 connections\n  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency     1.20ms  300.00us   9.00ms   90.00%\n  Latency Distribution\n     50%  812.00us\n     75%    1.00ms\n     90%    1.50ms\n     99%    2.31ms\n  100000 requests in 5.00s, 10.00MB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\n  Non-2xx or 3xx responses: 7\nRequests/sec:  20000.50\nTransfer/sec:      2.00MB\n";
        let run = parse_wrk(text).unwrap();
        assert_eq!(run.requests, 100_000);
        assert!((run.rps - 20000.5).abs() < 1e-9);
        assert!((run.p50_us - 812.0).abs() < 1e-9);
        assert!((run.p99_us - 2310.0).abs() < 1e-9);
        assert_eq!(run.non_2xx, 7);
        assert_eq!(run.socket_errors, 3);
    }
}
