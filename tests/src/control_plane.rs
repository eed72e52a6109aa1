//! The real `agent-vault` binary as server and CLI (DESIGN.md §7, §8): each server on
//! port 0 with its own data dir, socket and HOME; each CLI user with a HOME of their
//! own, as on separate machines.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::process::{announced_address, stop_gracefully};

/// The built `agent-vault` binary next to this test's executable.
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> → target/<profile>/agent-vault
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("agent-vault");
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build --workspace --bins, or ./dev test)",
        bin.display()
    );
    bin
}

#[derive(Clone, Debug)]
pub struct ServerOptions {
    pub password: Option<String>,
    pub extra_args: Vec<String>,
    /// `--store`: `None` is the default (sled in the data dir), else a PostgreSQL URL
    /// ([`Backend::options`]).
    pub store: Option<String>,
    /// A `master.key` copied into the data dir before the first start: the key file of
    /// another control plane on the same store, which a passwordless store needs on
    /// every node ([`Server::join`]).
    pub key_file: Option<PathBuf>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            password: None,
            extra_args: vec!["--allow-private-upstreams".into()],
            store: None,
            key_file: None,
        }
    }
}

/// Where a server keeps its data: the tests that hold for every store run once per
/// backend, with the same body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// sled in the server's data dir (the default).
    Sled,
    /// A new database on the test process's PostgreSQL ([`agent_vault_pgtest::shared`]).
    Postgres,
}

impl Backend {
    /// The default options on this backend; `name` names the PostgreSQL database
    /// (made unique).
    pub fn options(self, name: &str) -> ServerOptions {
        ServerOptions {
            store: self.store(name),
            ..ServerOptions::default()
        }
    }

    /// The `--store` value: `None` for sled, else a fresh database's URL.
    pub fn store(self, name: &str) -> Option<String> {
        match self {
            Backend::Sled => None,
            Backend::Postgres => Some(agent_vault_pgtest::shared().fresh_database(name)),
        }
    }
}

/// A running server; killed when dropped.
pub struct Server {
    pub dir: tempfile::TempDir,
    pub addr: String,
    child: Option<Child>,
    options: ServerOptions,
    log_index: usize,
}

impl Server {
    pub fn start() -> Server {
        Server::start_with(ServerOptions::default())
    }

    pub fn start_with(options: ServerOptions) -> Server {
        Server::try_start_with(options).unwrap_or_else(|log| panic!("server starts: {log}"))
    }

    /// [`Server::start_with`], or what the server wrote before it exited without
    /// listening (e.g. a refused master password).
    pub fn try_start_with(options: ServerOptions) -> Result<Server, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        if let Some(key_file) = &options.key_file {
            let data = dir.path().join("data");
            std::fs::create_dir_all(&data).expect("data dir");
            std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700))
                .expect("data dir mode");
            let copy = data.join("master.key");
            std::fs::copy(key_file, &copy)
                .unwrap_or_else(|e| panic!("copy the key file {}: {e}", key_file.display()));
            std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o600))
                .expect("key file mode");
        }
        let mut server = Server {
            dir,
            addr: String::new(),
            child: None,
            options,
            log_index: 0,
        };
        server.spawn()?;
        Ok(server)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The options it was started with.
    pub fn options(&self) -> &ServerOptions {
        &self.options
    }

    /// Another control plane on this one's store (a node of its own: data dir, sockets
    /// and port), opened the same way: the same master password, or a copy of this
    /// one's key file when passwordless. Panics unless the store is shared (`--store`).
    pub fn join(&self) -> Server {
        Server::start_with(self.join_options())
    }

    /// The options [`Server::join`] starts the other node with.
    pub fn join_options(&self) -> ServerOptions {
        assert!(
            self.options.store.is_some(),
            "only a shared store (--store postgres://…) can have another control plane"
        );
        let key_file = self.data_dir().join("master.key");
        ServerOptions {
            key_file: (self.options.password.is_none() && key_file.exists()).then_some(key_file),
            ..self.options.clone()
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("run").join("dataplane.sock")
    }

    /// The SDS socket the server creates beside the data-plane socket: the
    /// certificates Envoy shows HTTPS agents.
    pub fn sds_socket(&self) -> PathBuf {
        self.socket().with_file_name("sds.sock")
    }

    /// The CA HTTPS agents trust (PEM), which the server writes in its data dir.
    pub fn proxy_ca(&self) -> PathBuf {
        self.data_dir().join("ca.pem")
    }

    pub fn home(&self) -> PathBuf {
        let home = self.dir.path().join("home");
        std::fs::create_dir_all(&home).expect("home");
        home
    }

    /// `https://` when the server serves TLS (`--tls-cert`), else `http://`.
    pub fn url(&self) -> String {
        let tls = self.options.extra_args.iter().any(|a| a == "--tls-cert");
        format!("{}://{}", if tls { "https" } else { "http" }, self.addr)
    }

    /// Everything the server wrote to stderr so far, across restarts.
    pub fn logs(&self) -> String {
        let mut all = String::new();
        for i in 0..=self.log_index {
            all.push_str(
                &std::fs::read_to_string(self.dir.path().join(format!("server-{i}.log")))
                    .unwrap_or_default(),
            );
        }
        all
    }

    /// Starts the process; returns the error text if it exits before listening.
    fn spawn(&mut self) -> Result<(), String> {
        let log_path = self
            .dir
            .path()
            .join(format!("server-{}.log", self.log_index));
        let log = std::fs::File::create(&log_path).expect("log file");
        let mut cmd = Command::new(binary());
        cmd.arg("server")
            .arg("--port")
            .arg("0")
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--socket")
            .arg(self.socket())
            .args(&self.options.extra_args)
            .args(self.options.store.iter().flat_map(|url| ["--store", url]))
            .env_remove("AGENT_VAULT_MASTER_PASSWORD")
            .env_remove("AGENT_VAULT_STORE")
            .env("HOME", self.home())
            .stdout(Stdio::piped())
            .stderr(log);
        if let Some(password) = &self.options.password {
            cmd.arg("--password-stdin").stdin(Stdio::piped());
            let _ = password;
        } else {
            cmd.stdin(Stdio::null());
        }
        let mut child = cmd.spawn().expect("spawn agent-vault server");
        if let Some(password) = &self.options.password {
            let mut stdin = child.stdin.take().expect("stdin");
            writeln!(stdin, "{password}").expect("write password");
        }
        match announced_address(&mut child, Duration::from_secs(30)) {
            Some(addr) => {
                self.addr = addr;
                self.child = Some(child);
                Ok(())
            }
            None => {
                let _ = child.kill();
                let _ = child.wait();
                Err(std::fs::read_to_string(&log_path).unwrap_or_default())
            }
        }
    }

    /// Stops the server with SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops with SIGTERM and waits (SIGKILL after 10 s).
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            stop_gracefully(child, Duration::from_secs(10));
        }
    }

    /// Starts again on the same data dir (a new port).
    pub fn restart(&mut self) {
        self.try_restart().expect("server restarts");
    }

    pub fn try_restart(&mut self) -> Result<(), String> {
        self.kill9();
        self.log_index += 1;
        self.spawn()
    }

    pub fn set_password(&mut self, password: Option<&str>) {
        self.options.password = password.map(str::to_string);
    }

    /// The CLI of the server's own OS user: it can read the server's data dir (the
    /// bootstrap and local login tokens), as the human who started it can.
    pub fn cli(&self) -> Cli {
        Cli {
            home: self.home(),
            addr: self.url(),
            token: None,
            ca_file: None,
            data_dir: Some(self.data_dir()),
        }
    }

    /// Another user's CLI against this server, with a HOME of its own (`home-<name>`)
    /// and no access to the server's data dir.
    pub fn other_cli(&self, name: &str) -> Cli {
        let home = self.dir.path().join(format!("home-{name}"));
        std::fs::create_dir_all(&home).expect("home");
        Cli {
            home,
            addr: self.url(),
            token: None,
            ca_file: None,
            data_dir: None,
        }
    }

    /// The value of the `/metrics` sample whose line starts with `line_start` (the
    /// metric's name and labels, then a space).
    pub fn metric(&self, line_start: &str) -> Option<f64> {
        let text = reqwest::blocking::Client::builder()
            .no_proxy()
            .build()
            .ok()?
            .get(format!("{}/metrics", self.url()))
            .send()
            .ok()?
            .text()
            .ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
    }

    /// The server's process id (while it runs).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The one-time token the first registration needs, from the server's data dir
    /// (`None` once the owner is registered).
    pub fn bootstrap_token(&self) -> Option<String> {
        std::fs::read_to_string(self.data_dir().join("bootstrap-token"))
            .ok()
            .map(|token| token.trim().to_string())
    }

    /// A second user joins (DESIGN.md §5, invites): `owner` invites `email` to `vault`
    /// as `role`, and they register with the invite and log in from their own HOME
    /// (named after the part of `email` before the `@`). Their CLI.
    #[track_caller]
    pub fn user_joins_by_invite(
        &self,
        owner: &Cli,
        (email, password): (&str, &str),
        role: &str,
        vault: &str,
    ) -> Cli {
        let invite = owner.invite(email, role, vault);
        let name = email.split('@').next().unwrap_or(email);
        let user = self.other_cli(name);
        user.run_stdin(
            &[
                "auth",
                "register",
                "--email",
                email,
                "--invite",
                &invite,
                "--password-stdin",
            ],
            &format!("{password}\n"),
        )
        .ok();
        user.login(email, password);
        user
    }

    pub fn api(&self, token: Option<&str>) -> Api {
        Api {
            base: self.url(),
            token: token.map(str::to_string),
            client: reqwest::blocking::Client::new(),
        }
    }

    /// Registers the owner through the API (with the bootstrap token, unless the owner
    /// exists already) and returns a session token.
    pub fn owner_token(&self) -> String {
        let api = self.api(None);
        if let Some(token) = self.bootstrap_token() {
            let (status, body) = api.post(
                "/v1/auth/register",
                &serde_json::json!({"email": "owner@example.com", "password": "owner-password",
                                    "bootstrap_token": token}),
            );
            assert_eq!(status, 201, "register owner: {body}");
        }
        let (status, body) = api.post(
            "/v1/auth/login",
            &serde_json::json!({"email": "owner@example.com", "password": "owner-password"}),
        );
        assert_eq!(status, 200, "login: {body}");
        body["token"].as_str().expect("token").to_string()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The variables of `export NAME='value'` lines (what `agent-vault agent env` and
/// `agent create --env` print); panics on any other line.
pub fn shell_exports(stdout: &str) -> std::collections::BTreeMap<String, String> {
    stdout
        .lines()
        .map(|line| {
            let rest = line
                .strip_prefix("export ")
                .unwrap_or_else(|| panic!("not an export line: {line}"));
            let (name, value) = rest.split_once('=').expect("NAME=value");
            let value = value
                .strip_prefix('\'')
                .and_then(|v| v.strip_suffix('\''))
                .unwrap_or_else(|| panic!("value not single-quoted: {line}"));
            (name.to_string(), value.to_string())
        })
        .collect()
}

/// The CLI with its own HOME, pointed at one server.
#[derive(Clone)]
pub struct Cli {
    pub home: PathBuf,
    pub addr: String,
    pub token: Option<String>,
    /// `AGENT_VAULT_CA_FILE`: the CA to trust for an https server.
    pub ca_file: Option<PathBuf>,
    /// The server's data dir when this CLI runs as the server's OS user
    /// (`AGENT_VAULT_DATA_DIR`): it then finds the server's bootstrap and local login
    /// tokens there.
    pub data_dir: Option<PathBuf>,
}

pub struct CliOutput {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    #[track_caller]
    pub fn ok(self) -> CliOutput {
        assert_eq!(
            self.status, 0,
            "command failed: stdout={} stderr={}",
            self.stdout, self.stderr
        );
        self
    }

    #[track_caller]
    pub fn fails(self) -> CliOutput {
        assert_ne!(
            self.status, 0,
            "command should fail: stdout={} stderr={}",
            self.stdout, self.stderr
        );
        assert!(
            !self.stderr.trim().is_empty(),
            "a failure says why on stderr"
        );
        self
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

impl Cli {
    /// Trusts the CA in `pem` for an https server (`--ca-file`).
    pub fn with_ca_file(&self, pem: &Path) -> Cli {
        Cli {
            ca_file: Some(pem.to_path_buf()),
            ..self.clone()
        }
    }

    pub fn with_token(&self, token: &str) -> Cli {
        Cli {
            token: Some(token.to_string()),
            ..self.clone()
        }
    }

    pub fn run(&self, args: &[&str]) -> CliOutput {
        self.run_stdin(args, "")
    }

    pub fn run_stdin(&self, args: &[&str], stdin: &str) -> CliOutput {
        let mut cmd = Command::new(binary());
        cmd.args(args)
            .env("HOME", &self.home)
            .env("AGENT_VAULT_ADDR", &self.addr)
            .env_remove("AGENT_VAULT_VAULT")
            .env_remove("AGENT_VAULT_TOKEN")
            .env_remove("AGENT_VAULT_BOOTSTRAP_TOKEN")
            .env_remove("XDG_DATA_HOME")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(token) = &self.token {
            cmd.env("AGENT_VAULT_TOKEN", token);
        }
        match &self.ca_file {
            Some(pem) => cmd.env("AGENT_VAULT_CA_FILE", pem),
            None => cmd.env_remove("AGENT_VAULT_CA_FILE"),
        };
        match &self.data_dir {
            Some(dir) => cmd.env("AGENT_VAULT_DATA_DIR", dir),
            None => cmd.env_remove("AGENT_VAULT_DATA_DIR"),
        };
        let mut child = cmd.spawn().expect("spawn cli");
        {
            let mut input = child.stdin.take().expect("stdin");
            let _ = input.write_all(stdin.as_bytes());
        }
        let Output {
            status,
            stdout,
            stderr,
        } = child.wait_with_output().expect("cli output");
        CliOutput {
            status: status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        }
    }

    /// Registers (first user = owner, with the bootstrap token the CLI reads from the
    /// data dir) and logs in, saving the session under HOME.
    pub fn register_and_login(&self, email: &str, password: &str) {
        self.run_stdin(
            &["auth", "register", "--email", email, "--password-stdin"],
            &format!("{password}\n"),
        )
        .ok();
        self.login(email, password);
    }

    pub fn login(&self, email: &str, password: &str) {
        self.run_stdin(
            &["auth", "login", "--email", email, "--password-stdin"],
            &format!("{password}\n"),
        )
        .ok();
    }

    /// Invites `email` to `vault` with `role` (`vault user add`); the invite token it
    /// printed on stdout.
    #[track_caller]
    pub fn invite(&self, email: &str, role: &str, vault: &str) -> String {
        let out = self
            .run(&[
                "vault", "user", "add", email, "--role", role, "--vault", vault,
            ])
            .ok();
        out.stdout
            .split_whitespace()
            .find(|word| word.starts_with("av_inv_"))
            .unwrap_or_else(|| panic!("no invite token in: {}", out.stdout))
            .to_string()
    }
}

/// Raw HTTP against the management API.
pub struct Api {
    pub base: String,
    pub token: Option<String>,
    pub client: reqwest::blocking::Client,
}

impl Api {
    fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let mut req = self
            .client
            .request(method, format!("{}{}", self.base, path));
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        if let Some(body) = body {
            req = req.header("content-type", "application/json").body(body);
        }
        let resp = req.send().expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().unwrap_or_default();
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        self.send(reqwest::Method::GET, path, None, &[])
    }

    pub fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> (u16, Value) {
        self.send(reqwest::Method::GET, path, None, headers)
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.send(
            reqwest::Method::POST,
            path,
            Some(body.to_string().into_bytes()),
            &[],
        )
    }

    pub fn post_raw(&self, path: &str, body: &[u8]) -> (u16, Value) {
        self.send(reqwest::Method::POST, path, Some(body.to_vec()), &[])
    }

    pub fn put(&self, path: &str, body: &Value) -> (u16, Value) {
        self.send(
            reqwest::Method::PUT,
            path,
            Some(body.to_string().into_bytes()),
            &[],
        )
    }

    pub fn patch(&self, path: &str, body: &Value) -> (u16, Value) {
        self.send(
            reqwest::Method::PATCH,
            path,
            Some(body.to_string().into_bytes()),
            &[],
        )
    }

    pub fn delete(&self, path: &str) -> (u16, Value) {
        self.send(reqwest::Method::DELETE, path, None, &[])
    }
}

/// Every regular file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.is_file() {
                out.push(path);
            }
        }
    }
    out
}

/// Whether `needle` occurs in any file under `dir`.
pub fn bytes_on_disk(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|path| {
            std::fs::read(path)
                .map(|data| data.windows(needle.len()).any(|w| w == needle))
                .unwrap_or(false)
        })
        .collect()
}

/// One raw HTTP/1.1 request over the data-plane socket (send `Connection: close`);
/// the whole answer, or `None` if the server hung up without one. A failed write is
/// not fatal: a server refusing an oversized body answers before reading all of it.
pub fn socket_request(path: &Path, request: impl AsRef<[u8]>) -> Option<String> {
    use std::io::Read;
    let mut stream = std::os::unix::net::UnixStream::connect(path).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .ok()?;
    let _ = stream.write_all(request.as_ref());
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    (!response.is_empty()).then(|| String::from_utf8_lossy(&response).into_owned())
}
