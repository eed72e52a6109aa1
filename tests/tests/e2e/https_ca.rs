//! HTTPS interception, the control plane's side (DESIGN.md §3, §4): the proxy CA, the
//! SDS socket Envoy fetches leaf certificates from, and the environment the CLI
//! prints for agents. Against the real `agent-vault` binary, with a real gRPC client
//! that speaks delta xDS over the Unix socket the way Envoy's on-demand certificate
//! selector does: it subscribes to secrets named after the SNI.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{secret, Secret};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use prost::Message;
use tokio::sync::mpsc;

use agent_vault_testkit::control_plane::{
    binary, bytes_on_disk, shell_exports, Cli, Server, ServerOptions,
};
use agent_vault_testkit::process::{die_with_parent, rss_kib, stop_gracefully};

const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

fn start(extra: &[&str]) -> Server {
    let mut extra_args = vec!["--allow-private-upstreams".to_string()];
    extra_args.extend(extra.iter().map(|a| a.to_string()));
    Server::start_with(ServerOptions {
        extra_args,
        ..ServerOptions::default()
    })
}

/// The owner's CLI, logged in, with the rules `*.example.com` and `api.example.org`.
fn owner_with_rules(server: &Server) -> Cli {
    let cli = server.cli();
    cli.register_and_login("owner@example.com", "owner-password");
    for (name, host) in [("wild", "*.example.com"), ("exact", "api.example.org/v1/*")] {
        cli.run(&[
            "vault",
            "service",
            "add",
            "--name",
            name,
            "--host",
            host,
            "--auth-type",
            "passthrough",
        ])
        .ok();
    }
    cli
}

/// `GET /v1/ca`, without a login.
fn ca_pem(server: &Server) -> String {
    let response = reqwest::blocking::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("{}/v1/ca", server.url()))
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    response.text().unwrap()
}

fn der_of(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// Whether the first certificate of `chain` chains to `ca_pem` and is valid for
/// `name` at `at` (unix seconds).
fn verifies(ca_pem: &str, chain: &str, name: &str, at: u64) -> Result<(), String> {
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    let ca = CertificateDer::from(der_of(ca_pem));
    let anchor = webpki::anchor_from_trusted_cert(&ca).map_err(|e| e.to_string())?;
    let leaf = CertificateDer::from(der_of(chain));
    let cert = webpki::EndEntityCert::try_from(&leaf).map_err(|e| e.to_string())?;
    cert.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &[anchor],
        &[],
        UnixTime::since_unix_epoch(Duration::from_secs(at)),
        webpki::KeyUsage::server_auth(),
        None,
        None,
    )
    .map_err(|e| e.to_string())?;
    let name = ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
    cert.verify_is_valid_for_subject_name(&name)
        .map_err(|e| e.to_string())
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A certificate Envoy received: its version, chain and key (PEM).
#[derive(Debug, Clone)]
struct Received {
    version: String,
    chain: String,
    key: String,
}

/// One delta SDS stream over the server's SDS socket, as Envoy opens it.
struct Envoy {
    runtime: tokio::runtime::Runtime,
    requests: mpsc::Sender<DeltaDiscoveryRequest>,
    responses: tonic::Streaming<DeltaDiscoveryResponse>,
}

impl Envoy {
    fn connect(socket: &Path) -> Envoy {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let path = socket.to_path_buf();
        let (requests, rx) = mpsc::channel(16);
        let responses = runtime.block_on(async move {
            let channel = tonic::transport::Endpoint::from_static("http://sds.invalid")
                .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                    }
                }))
                .await
                .expect("connect to the SDS socket");
            SecretDiscoveryServiceClient::new(channel)
                .delta_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .expect("a DeltaSecrets stream")
                .into_inner()
        });
        Envoy {
            runtime,
            requests,
            responses,
        }
    }

    fn subscribe(&self, names: &[&str]) {
        let request = DeltaDiscoveryRequest {
            type_url: SECRET_TYPE.into(),
            resource_names_subscribe: names.iter().map(|n| n.to_string()).collect(),
            ..Default::default()
        };
        self.runtime
            .block_on(self.requests.send(request))
            .expect("the stream is open");
    }

    fn ack(&self, nonce: &str) {
        let request = DeltaDiscoveryRequest {
            type_url: SECRET_TYPE.into(),
            response_nonce: nonce.into(),
            ..Default::default()
        };
        self.runtime
            .block_on(self.requests.send(request))
            .expect("the stream is open");
    }

    /// The next response within `wait`, or `None`.
    fn next(&mut self, wait: Duration) -> Option<DeltaDiscoveryResponse> {
        let responses = &mut self.responses;
        self.runtime
            .block_on(async { tokio::time::timeout(wait, responses.message()).await })
            .ok()
            .map(|message| message.expect("no gRPC error").expect("the stream is open"))
    }

    /// Responses (each ACKed) until `count` names were answered: the certificates by
    /// name, and the removed names.
    fn answers(&mut self, count: usize) -> (BTreeMap<String, Received>, Vec<String>) {
        let (mut served, mut removed) = (BTreeMap::new(), Vec::new());
        while served.len() + removed.len() < count {
            let answer = self
                .next(Duration::from_secs(30))
                .expect("answers within 30 s");
            self.ack(&answer.nonce);
            removed.extend(answer.removed_resources.clone());
            for resource in answer.resources {
                served.insert(resource.name.clone(), received(&resource));
            }
        }
        (served, removed)
    }
}

fn received(resource: &envoy_types::pb::envoy::service::discovery::v3::Resource) -> Received {
    let any = resource.resource.as_ref().expect("a body");
    assert_eq!(any.type_url, SECRET_TYPE);
    let secret = Secret::decode(any.value.as_slice()).expect("a Secret");
    assert_eq!(
        secret.name, resource.name,
        "the secret is named as Envoy asked"
    );
    let Some(secret::Type::TlsCertificate(tls)) = secret.r#type else {
        panic!("not a TLS certificate");
    };
    let inline = |source: Option<envoy_types::pb::envoy::config::core::v3::DataSource>| match source
        .and_then(|s| s.specifier)
    {
        Some(Specifier::InlineBytes(bytes)) => String::from_utf8(bytes).unwrap(),
        other => panic!("not inline bytes: {other:?}"),
    };
    Received {
        version: resource.version.clone(),
        chain: inline(tls.certificate_chain),
        key: inline(tls.private_key),
    }
}

#[test]
fn the_sds_socket_serves_hosts_a_rule_could_match_and_pushes_renewals_before_expiry() {
    let server = start(&["--leaf-ttl-secs", "6"]);
    owner_with_rules(&server);
    let ca = ca_pem(&server);
    let socket = server.sds_socket();
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode, 0o600,
        "the SDS socket is private like the data-plane one"
    );

    let mut envoy = Envoy::connect(&socket);
    let asked = [
        "Gist.Example.com",
        "api.example.org",
        "evil.example.net",
        "a.b.example.com",
        "127.0.0.1",
    ];
    envoy.subscribe(&asked);
    let first_at = Instant::now();
    let first_secs = now_secs();
    let (served, mut removed) = envoy.answers(asked.len());
    removed.sort();
    assert_eq!(
        removed,
        ["127.0.0.1", "a.b.example.com", "evil.example.net"]
    );
    assert_eq!(
        served.keys().collect::<Vec<_>>(),
        ["Gist.Example.com", "api.example.org"]
    );
    for (name, leaf) in &served {
        let host = name.to_ascii_lowercase();
        verifies(&ca, &leaf.chain, &host, first_secs).unwrap();
        assert!(verifies(&ca, &leaf.chain, "evil.example.net", first_secs).is_err());
        assert!(leaf.key.contains("PRIVATE KEY"));
    }

    // An ACK gets no answer; the renewal arrives unasked at two thirds of the 6 s,
    // before the first certificates expire.
    let renewed = envoy
        .next(Duration::from_secs(15))
        .expect("a renewal pushed");
    let pushed_after = first_at.elapsed();
    assert!(
        pushed_after < Duration::from_secs(6),
        "pushed {pushed_after:?} after the first: too late for a 6 s certificate"
    );
    assert!(pushed_after >= Duration::from_secs(3), "{pushed_after:?}");
    assert_eq!(renewed.resources.len(), 2, "{renewed:?}");
    let later = first_secs + 8;
    for resource in &renewed.resources {
        let new = received(resource);
        let old = &served[&resource.name];
        assert_ne!(new.version, old.version);
        let host = resource.name.to_ascii_lowercase();
        assert!(
            verifies(&ca, &old.chain, &host, later).is_err(),
            "the old one expired"
        );
        verifies(&ca, &new.chain, &host, first_secs + 6).unwrap();
    }
}

#[test]
fn ca_rotate_is_the_owners_and_pushes_certificates_from_the_new_ca() {
    let server = start(&[]);
    let owner = owner_with_rules(&server);
    let old_ca = ca_pem(&server);
    assert_eq!(owner.run(&["ca", "cert"]).ok().stdout, old_ca);
    let mut envoy = Envoy::connect(&server.sds_socket());
    envoy.subscribe(&["a.example.com"]);
    let (before, _) = envoy.answers(1);

    // Nobody but the owner rotates it, and a refusal changes nothing.
    let member = server.user_joins_by_invite(
        &owner,
        ("member@example.com", "member-password"),
        "admin",
        "default",
    );
    let refused = member.run(&["ca", "rotate"]).fails();
    assert!(
        refused
            .stderr
            .contains("only the owner can rotate the proxy CA"),
        "{}",
        refused.stderr
    );
    let token = owner
        .run(&["agent", "create", "bot", "--vault", "default"])
        .ok()
        .stdout
        .trim()
        .to_string();
    let refused = owner.with_token(&token).run(&["ca", "rotate"]).fails();
    assert!(
        refused.stderr.contains("only the owner"),
        "{}",
        refused.stderr
    );
    assert_eq!(ca_pem(&server), old_ca);
    assert!(envoy.next(Duration::from_millis(300)).is_none());

    let rotated = owner.run(&["ca", "rotate"]).ok();
    assert!(
        rotated.stdout.contains("generation 2") && rotated.stdout.contains("re-minted 1"),
        "{}",
        rotated.stdout
    );
    assert!(rotated.stderr.contains("agent env"), "{}", rotated.stderr);
    let new_ca = ca_pem(&server);
    assert_ne!(new_ca, old_ca);
    let on_disk = std::fs::read_to_string(server.data_dir().join("ca.pem")).unwrap();
    assert_eq!(on_disk, new_ca, "<data-dir>/ca.pem follows the rotation");

    let pushed = envoy
        .next(Duration::from_secs(10))
        .expect("the rotation pushed");
    assert_eq!(pushed.resources.len(), 1);
    let after = received(&pushed.resources[0]);
    assert_ne!(after.version, before["a.example.com"].version);
    verifies(&new_ca, &after.chain, "a.example.com", now_secs()).unwrap();
    assert!(verifies(&old_ca, &after.chain, "a.example.com", now_secs()).is_err());
}

#[test]
fn one_client_asking_for_thousands_of_names_holds_no_more_than_the_budget() {
    let server = start(&["--leaf-names-per-hour", "1000"]);
    owner_with_rules(&server);
    let pid = server.pid().unwrap();
    let mut envoy = Envoy::connect(&server.sds_socket());
    let names: Vec<String> = (0..1200).map(|i| format!("n{i}.example.com")).collect();
    envoy.subscribe(&names.iter().map(String::as_str).collect::<Vec<_>>());
    let (served, removed) = envoy.answers(names.len());
    assert_eq!((served.len(), removed.len()), (1000, 200));
    assert_eq!(
        server.metric("agent_vault_leaf_certificates_held "),
        Some(1000.0)
    );
    let rss_before = rss_kib(pid);

    // Five thousand more names, on this stream and on a second one: all refused, and
    // neither the certificates held nor the server's memory grow with them.
    let mut other = Envoy::connect(&server.sds_socket());
    let more: Vec<String> = (0..5000).map(|i| format!("m{i}.example.com")).collect();
    let refs: Vec<&str> = more.iter().map(String::as_str).collect();
    envoy.subscribe(&refs[..2500]);
    other.subscribe(&refs[2500..]);
    let (served_a, removed_a) = envoy.answers(2500);
    let (served_b, removed_b) = other.answers(2500);
    assert!(served_a.is_empty() && served_b.is_empty());
    assert_eq!(removed_a.len() + removed_b.len(), 5000);
    assert_eq!(
        server.metric("agent_vault_leaf_certificates_held "),
        Some(1000.0)
    );
    assert_eq!(
        server.metric("agent_vault_leaf_certificate_refusals_total{reason=\"budget_spent\"} "),
        Some(5200.0)
    );
    let grown = rss_kib(pid).saturating_sub(rss_before);
    assert!(grown < 16 * 1024, "the server grew by {grown} KiB");
    assert!(
        server
            .logs()
            .contains("budget of new certificate names is spent"),
        "{}",
        server.logs()
    );
}

/// Connects to `socket` as uid/gid 65534 (nobody), sends an HTTP/2 preface and an
/// empty SETTINGS frame, and reports what came back.
fn http2_as_nobody(socket: &Path) -> String {
    let script = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("connect-error", e.errno); sys.exit(0)
s.settimeout(5)
try:
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    data = s.recv(65536)
except OSError as e:
    print("error", e.errno); sys.exit(0)
print("answer" if data else "closed")
"#;
    let python = if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    let output = Command::new(python)
        .args(["-c", script])
        .arg(socket)
        .uid(65534)
        .gid(65534)
        .output()
        .expect("python3 as nobody");
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// The first bytes the server sends to this process after an HTTP/2 preface.
fn http2_as_this_user(socket: &Path) -> Vec<u8> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .unwrap();
    let mut buf = [0u8; 64];
    let n = stream.read(&mut buf).unwrap_or(0);
    buf[..n].to_vec()
}

#[test]
fn only_an_allowed_peer_can_talk_to_the_sds_socket() {
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    assert_eq!(
        uid, 0,
        "this test switches to another uid and must run as root"
    );
    let server = start(&[]);
    let socket = server.sds_socket();
    // The directory and the socket's modes keep others out...
    let outcome = http2_as_nobody(&socket);
    assert!(outcome.starts_with("connect-error"), "{outcome}");
    // ...and with them opened up, SO_PEERCRED still does.
    let dir = socket.parent().unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o777)).unwrap();
    let outcome = http2_as_nobody(&socket);
    assert!(
        outcome == "closed" || outcome.starts_with("error"),
        "a disallowed peer got: {outcome}"
    );
    let logs = server.logs();
    assert!(
        logs.contains("not allowed") && logs.contains("SDS"),
        "the refusal is logged: {logs}"
    );
    // This process's user is answered with the server's SETTINGS frame.
    let answer = http2_as_this_user(&socket);
    assert!(answer.len() >= 9 && answer[3] == 0x04, "{answer:?}");
}

/// The DER prefix of every P-256 PKCS#8 private key (version 0, id-ecPublicKey,
/// prime256v1), and its base64 as PEM begins with it.
const P256_PKCS8_PREFIX: &[u8] = &[
    0x02, 0x01, 0x00, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08,
    0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
];
const P256_PKCS8_PEM_PREFIX: &str = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEH";

#[test]
fn the_ca_key_is_never_on_disk_in_plaintext_and_survives_rotations_and_restarts() {
    let mut server = start(&[]);
    let owner = owner_with_rules(&server);
    let ca = ca_pem(&server);
    let on_disk = server.data_dir().join("ca.pem");
    assert_eq!(std::fs::read_to_string(&on_disk).unwrap(), ca);
    let mode = std::fs::metadata(&on_disk).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644, "the certificate is public");

    // master-key rotate re-seals the key; the same CA signs after a restart.
    owner.run(&["master-key", "rotate"]).ok();
    server.restart();
    assert_eq!(ca_pem(&server), ca, "the CA outlives a restart");
    let mut envoy = Envoy::connect(&server.sds_socket());
    envoy.subscribe(&["a.example.com"]);
    let (served, _) = envoy.answers(1);
    verifies(
        &ca,
        &served["a.example.com"].chain,
        "a.example.com",
        now_secs(),
    )
    .unwrap();
    drop(envoy);
    server.stop();

    let dir = server.dir.path();
    for needle in [
        P256_PKCS8_PREFIX,
        P256_PKCS8_PEM_PREFIX.as_bytes(),
        b"PRIVATE KEY".as_slice(),
    ] {
        let found = bytes_on_disk(dir, needle);
        assert!(found.is_empty(), "a private key in plaintext in {found:?}");
    }
}

/// `export NAME='value'` lines as a map.
fn token_of(vars: &BTreeMap<String, String>) -> String {
    let url = &vars["HTTPS_PROXY"];
    let rest = url.strip_prefix("http://").unwrap();
    rest.split(':').next().unwrap().to_string()
}

#[test]
fn agent_env_prints_the_lines_an_agent_needs_with_the_token_never_on_argv() {
    let server = start(&[]);
    let owner = owner_with_rules(&server);
    let work = tempfile::tempdir().unwrap();
    let bundle = work.path().join("agent").join("ca-bundle.pem");
    let bundle_arg = bundle.to_str().unwrap();

    let created = owner
        .run(&[
            "agent", "create", "bot", "--vault", "default", "--env", "--ca-out", bundle_arg,
        ])
        .ok();
    let vars = shell_exports(&created.stdout);
    let token = token_of(&vars);
    assert!(token.starts_with("av_agt_") && token.len() == 71, "{token}");
    let proxy = format!("http://{token}:default@127.0.0.1:10000");
    let host = server.addr.split(':').next().unwrap().to_string();
    let path = bundle.display().to_string();
    #[rustfmt::skip]
    let expected: BTreeMap<String, String> = [
        ("HTTPS_PROXY", &proxy), ("https_proxy", &proxy),
        ("HTTP_PROXY", &proxy), ("http_proxy", &proxy),
        ("NO_PROXY", &host), ("no_proxy", &host),
        ("SSL_CERT_FILE", &path), ("REQUESTS_CA_BUNDLE", &path),
        ("NODE_EXTRA_CA_CERTS", &path), ("CURL_CA_BUNDLE", &path),
        ("GIT_SSL_CAINFO", &path),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.clone()))
    .collect();
    assert_eq!(vars, expected);
    assert!(
        created.stderr.contains("shown this once"),
        "{}",
        created.stderr
    );

    // The bundle: the proxy CA first, then the system's roots; readable by everyone.
    let text = std::fs::read_to_string(&bundle).unwrap();
    let ca = ca_pem(&server);
    assert!(text.find(ca.trim()).is_some_and(|at| at < 100), "{text}");
    if Path::new("/etc/ssl/certs/ca-certificates.crt").exists() {
        assert!(text.matches("BEGIN CERTIFICATE").count() > 10);
    }
    let mode = std::fs::metadata(&bundle).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644);

    // Later, from the token on stdin: the same lines.
    let again = owner.run_stdin(
        &["agent", "env", "bot", "--ca-out", bundle_arg],
        &format!("{token}\n"),
    );
    assert_eq!(shell_exports(&again.ok().stdout), expected);
    // Another proxy address, and JSON.
    let json = owner
        .run_stdin(
            &[
                "agent",
                "env",
                "bot",
                "--ca-out",
                bundle_arg,
                "--proxy",
                "http://10.0.0.7:3128",
                "--json",
            ],
            &format!("{token}\n"),
        )
        .ok()
        .json();
    assert_eq!(
        json["HTTPS_PROXY"],
        format!("http://{token}:default@10.0.0.7:3128")
    );

    // Every mistake is one clear line, and nothing is printed to stdout.
    let cases: [(&[&str], String, &str); 5] = [
        (
            &["agent", "env", "other"],
            format!("{token}\n"),
            "belongs to agent bot, not other",
        ),
        (
            &["agent", "env", "bot"],
            "sk_live_not_a_token\n".into(),
            "not an agent token",
        ),
        (&["agent", "env", "bot"], String::new(), "no token on stdin"),
        (
            &["agent", "env", "bot", "--vault", "nope"],
            format!("{token}\n"),
            "no access to vault \"nope\"",
        ),
        (
            &["agent", "env", "bot", "--proxy", "https://127.0.0.1:10000"],
            format!("{token}\n"),
            "expected Envoy's address",
        ),
    ];
    for (args, stdin, message) in cases {
        let failed = owner.run_stdin(args, &stdin).fails();
        assert!(
            failed.stderr.contains(message),
            "{args:?}: {}",
            failed.stderr
        );
        assert!(failed.stdout.is_empty(), "{args:?}: {}", failed.stdout);
    }
    // A bad --proxy on create is refused before the agent exists.
    let refused = owner
        .run(&["agent", "create", "bot2", "--env", "--proxy", "10000"])
        .fails();
    assert!(refused.stderr.contains("--proxy"), "{}", refused.stderr);
    assert!(!owner.run(&["agent", "list"]).ok().stdout.contains("bot2"));

    // Rotation with --env: new lines; the old token is no longer accepted.
    let rotated = owner
        .run(&["agent", "rotate", "bot", "--env", "--ca-out", bundle_arg])
        .ok();
    let new_token = token_of(&shell_exports(&rotated.stdout));
    assert_ne!(new_token, token);
    let stale = owner
        .run_stdin(&["agent", "env", "bot"], &format!("{token}\n"))
        .fails();
    assert!(
        stale.stderr.contains("does not accept this token"),
        "{}",
        stale.stderr
    );
}

fn spawn_server(args: &[&std::ffi::OsStr], dir: &Path) -> std::process::Child {
    let mut command = Command::new(binary());
    command
        .arg("server")
        .args(["--port", "0"])
        .args(args)
        .env_remove("AGENT_VAULT_MASTER_PASSWORD")
        .env("HOME", dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    die_with_parent(&mut command).spawn().unwrap()
}

#[test]
fn the_servers_interception_flags_are_checked_and_its_paths_announced() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let socket = tmp.path().join("run").join("dataplane.sock");
    let os = |p: &Path| p.as_os_str().to_owned();

    // Refused at start, with a message naming the flag.
    let shared = tmp.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let refused: [(Vec<std::ffi::OsString>, &str); 4] = [
        (
            vec!["--leaf-ttl-secs".into(), "1".into()],
            "--leaf-ttl-secs",
        ),
        (
            vec!["--leaf-names-per-hour".into(), "0".into()],
            "--leaf-names-per-hour",
        ),
        (
            vec!["--sds-socket".into(), os(&socket)],
            "--sds-socket and --socket name the same file",
        ),
        (
            vec!["--sds-socket".into(), os(&shared.join("sds.sock"))],
            "anyone could replace the SDS socket there; pass a --sds-socket path",
        ),
    ];
    for (extra, message) in refused {
        let mut args = vec![
            "--data-dir".into(),
            os(&data),
            "--socket".into(),
            os(&socket),
        ];
        args.extend(extra);
        let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        let child = spawn_server(&refs, tmp.path());
        let output = child.wait_with_output().unwrap();
        assert!(!output.status.success(), "{args:?} started");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }

    // Started: the first line names both sockets and the CA file.
    let sds: PathBuf = tmp.path().join("sds-run").join("sds.sock");
    let args = [
        "--data-dir".into(),
        os(&data),
        "--socket".into(),
        os(&socket),
        "--sds-socket".into(),
        os(&sds),
    ];
    let refs: Vec<&std::ffi::OsStr> = args
        .iter()
        .map(|a: &std::ffi::OsString| a.as_os_str())
        .collect();
    let mut child = spawn_server(&refs, tmp.path());
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert!(
        line.contains(&format!("SDS socket {}", sds.display())),
        "{line}"
    );
    assert!(
        line.contains(&format!("proxy CA {}", data.join("ca.pem").display())),
        "{line}"
    );
    assert!(sds.exists());
    stop_gracefully(child, Duration::from_secs(10));
    assert!(!sds.exists(), "the SDS socket is removed at a clean stop");
}
