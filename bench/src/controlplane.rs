//! A control plane for the benchmark: the release `agent-vault server` on a free
//! loopback port with its own data dir, data-plane and SDS sockets and proxy CA, an
//! owner session, and the management API calls that seed and change it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use agent_vault_rules::{DataplaneCounts, STATS_PATH};
use agent_vault_testkit::http::{self, Conn};
use agent_vault_testkit::process::announced_address;

use crate::procs::Proc;

pub struct ControlPlane {
    pub proc: Proc,
    pub port: u16,
    pub socket: PathBuf,
    /// The SDS socket (the default, beside the data-plane socket): certificates for
    /// the tunnels of HTTPS agents.
    pub sds_socket: PathBuf,
    /// The proxy CA's certificate (PEM), which HTTPS agents trust.
    pub proxy_ca: PathBuf,
    token: String,
}

/// New host names that get a certificate per hour: far more than the benchmark's first
/// handshakes ask for (the server's default is 1000).
pub const LEAF_NAMES_PER_HOUR: u32 = 100_000;

/// Requests counted by the control plane (`GET /v1/dataplane/stats`).
pub type Counts = DataplaneCounts;

/// Where a control plane keeps its data.
#[derive(Clone, Copy)]
pub enum Store<'a> {
    /// sled in its own data dir (the default).
    Sled,
    /// A PostgreSQL database (URL). `key_from`: the data dir of a control plane already
    /// on that database, whose key file this one needs to unwrap the same data key.
    Postgres {
        url: &'a str,
        key_from: Option<&'a Path>,
    },
}

impl ControlPlane {
    pub fn start(binary: &Path, dir: &Path, name: &str) -> Result<ControlPlane, String> {
        ControlPlane::start_on(binary, dir, name, Store::Sled)
    }

    /// The data dir of this control plane (its key file, tokens and proxy CA).
    pub fn data_dir(&self) -> &Path {
        self.proxy_ca.parent().unwrap_or(Path::new("."))
    }

    pub fn start_on(
        binary: &Path,
        dir: &Path,
        name: &str,
        store: Store,
    ) -> Result<ControlPlane, String> {
        let dir = dir.join(name);
        let data = dir.join("data");
        if let Store::Postgres {
            key_from: Some(from),
            ..
        } = store
        {
            std::fs::create_dir_all(&data).map_err(|e| e.to_string())?;
            std::fs::copy(from.join("master.key"), data.join("master.key"))
                .map_err(|e| format!("{name}: copying the key file: {e}"))?;
        }
        let socket = dir.join("run").join("dataplane.sock");
        let home = dir.join("home");
        std::fs::create_dir_all(&home).map_err(|e| e.to_string())?;
        let log = std::fs::File::create(dir.join("server.log")).map_err(|e| e.to_string())?;
        let mut command = Command::new(binary);
        command
            .arg("server")
            .args(["--port", "0", "--allow-private-upstreams"])
            .args(["--leaf-names-per-hour", &LEAF_NAMES_PER_HOUR.to_string()])
            .arg("--data-dir")
            .arg(&data)
            .arg("--socket")
            .arg(&socket)
            .env("HOME", &home)
            .env("AGENT_VAULT_LOG", "warn")
            .env_remove("AGENT_VAULT_MASTER_PASSWORD")
            .env(
                "AGENT_VAULT_STORE",
                match store {
                    Store::Sled => "sled",
                    Store::Postgres { url, .. } => url,
                },
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        let mut proc = Proc::spawn(&format!("control plane {name}"), command)?;
        let child = proc.child_mut().ok_or("no child")?;
        let addr = announced_address(child, Duration::from_secs(60)).ok_or_else(|| {
            format!(
                "{name}: no listening line; see {}",
                dir.join("server.log").display()
            )
        })?;
        let port = addr
            .strip_prefix("127.0.0.1:")
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| format!("{name}: cannot read the port from {addr:?}"))?;
        let mut cp = ControlPlane {
            proc,
            port,
            sds_socket: socket.with_file_name("sds.sock"),
            socket,
            proxy_ca: data.join("ca.pem"),
            token: String::new(),
        };
        // The first registration needs the token the server wrote into its data dir; a
        // second control plane on a database that has its owner writes none.
        let bootstrap = std::fs::read_to_string(data.join("bootstrap-token")).ok();
        cp.token = cp.owner_token(bootstrap.as_deref().map(str::trim))?;
        Ok(cp)
    }

    fn owner_token(&self, bootstrap_token: Option<&str>) -> Result<String, String> {
        let creds = json!({"email": "bench@example.com", "password": "bench-password-1"});
        if let Some(bootstrap_token) = bootstrap_token {
            let mut register = creds.clone();
            register["bootstrap_token"] = json!(bootstrap_token);
            let (status, body) =
                self.call_as(None, "POST", "/v1/auth/register", Some(&register))?;
            if status != 201 {
                return Err(format!("register: {status} {body}"));
            }
        }
        let (status, body) = self.call_as(None, "POST", "/v1/auth/login", Some(&creds))?;
        body["token"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("login: {status} {body}"))
    }

    fn call_as(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), String> {
        let bearer = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![
            ("Content-Type", "application/json"),
            ("Connection", "close"),
        ];
        if let Some(b) = &bearer {
            headers.push(("Authorization", b.as_str()));
        }
        let bytes = body.map(|b| b.to_string().into_bytes());
        let response = http::tcp_once(self.port, method, path, &headers, bytes.as_deref())
            .map_err(|e| format!("{method} {path}: {e}"))?;
        Ok((response.status, response.json()))
    }

    /// A management API call as the owner; `Err` unless the status is `expect`.
    pub fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        expect: u16,
    ) -> Result<Value, String> {
        let (status, value) = self.call_as(Some(&self.token), method, path, body)?;
        if status != expect {
            return Err(format!(
                "{method} {path}: expected {expect}, got {status} {value}"
            ));
        }
        Ok(value)
    }

    pub fn set_credential(&self, key: &str, value: &str) -> Result<(), String> {
        self.api(
            "POST",
            "/v1/vaults/default/credentials",
            Some(&json!({"credentials": {key: value}})),
            200,
        )
        .map(drop)
    }

    pub fn delete_credential(&self, key: &str) -> Result<(), String> {
        self.api(
            "POST",
            "/v1/vaults/default/credentials/delete",
            Some(&json!({"keys": [key]})),
            200,
        )
        .map(drop)
    }

    pub fn replace_services(&self, services: &[Value]) -> Result<(), String> {
        self.api(
            "PUT",
            "/v1/vaults/default/services",
            Some(&json!({"services": services})),
            200,
        )
        .map(drop)
    }

    /// Creates an agent on `default`; returns its token.
    pub fn create_agent(&self, name: &str) -> Result<String, String> {
        let body = self.api(
            "POST",
            "/v1/agents",
            Some(&json!({"name": name, "vaults": [{"vault": "default"}]})),
            201,
        )?;
        body["token"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("create agent {name}: no token in {body}"))
    }

    pub fn revoke_agent(&self, name: &str) -> Result<(), String> {
        self.api("DELETE", &format!("/v1/agents/{name}"), None, 204)
            .map(drop)
    }

    /// The data-plane counters, over the socket.
    pub fn counts(&self) -> Counts {
        http::unix_once(
            &self.socket,
            "GET",
            STATS_PATH,
            &[("Connection", "close")],
            None,
        )
        .ok()
        .and_then(|r| serde_json::from_value(r.json()).ok())
        .unwrap_or_default()
    }

    /// A keep-alive connection to the data-plane socket.
    pub fn socket_conn(&self) -> std::io::Result<http::UnixConn> {
        Conn::unix(&self.socket)
    }

    /// Waits until the socket answers.
    pub fn wait_socket(&self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if http::unix_once(
                &self.socket,
                "GET",
                STATS_PATH,
                &[("Connection", "close")],
                None,
            )
            .is_ok_and(|r| r.status == 200)
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "the data-plane socket {} does not answer",
            self.socket.display()
        ))
    }
}
