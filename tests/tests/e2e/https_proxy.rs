//! HTTPS agents (`HTTPS_PROXY`) end to end: real clients (curl, Python `requests`) and a
//! byte-by-byte one (`https_agent`) send `CONNECT` through the real Envoy with the
//! built filter; Envoy decrypts the tunnel and the requests inside reach a loopback TLS
//! echo upstream with the credential injected, as the agent proven on the `CONNECT`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{json, Value};

use agent_vault_testkit::control_plane::{shell_exports, ServerOptions};
use agent_vault_testkit::envoy::workspace_root;
use agent_vault_testkit::http::proxy_basic;
use agent_vault_testkit::http::RawResponse;
use agent_vault_testkit::https_agent::{connect, HttpsTunnel, TlsOptions, TunnelError};
use agent_vault_testkit::process::rss_kib;
use agent_vault_testkit::stack::{wait_for, Stack};
use agent_vault_testkit::upstream::{Echo, TestCa};

/// Long enough for the filter's first snapshot poll (on start, then every 1 s).
const FIRST_SNAPSHOT: Duration = Duration::from_secs(5);
/// A change reaches every worker's filter within one poll (1 s); with a margin.
const PROPAGATION: Duration = Duration::from_secs(5);

/// The system with an HTTPS echo upstream on loopback, reached as `localhost:<port>`
/// (SNI needs a name) and allowed by Envoy's destination check by exactly its address
/// and port; a service `echo` of vault `default` for it, injecting `ECHO_TOKEN`. The
/// tunnels' certificates are the control plane's: minted by its CA for the SNI and
/// served to Envoy over its SDS socket, as in production.
struct Https {
    stack: Stack,
    echo: Echo,
    /// The CA agents trust for the proxy's certificates: the control plane's
    /// `<data-dir>/ca.pem`.
    proxy_ca: PathBuf,
}

impl Https {
    fn start() -> Https {
        Https::start_with(ServerOptions::default())
    }

    fn start_with(server: ServerOptions) -> Https {
        let upstream_ca = TestCa::new("upstream test CA");
        let echo = Echo::tls(&upstream_ca);
        let allowed = format!("127.0.0.1/32:{}", echo.port);
        let stack = Stack::start_with_ca(server, upstream_ca, |options| {
            options.allow_private_upstreams(&[&allowed])
        });
        let proxy_ca = stack.server.proxy_ca();
        Https {
            stack,
            echo,
            proxy_ca,
        }
    }

    /// Adds the `echo` service (bearer `ECHO_TOKEN` = `secret`) to `vault`.
    fn add_echo_service(&self, vault: &str, secret: &str) {
        self.stack.set_credential(vault, "ECHO_TOKEN", secret);
        self.stack.add_service(
            vault,
            json!({"name": "echo", "host": self.echo.authority(),
                   "auth": {"type": "bearer", "token": "ECHO_TOKEN"}}),
        );
    }

    fn proxy_ca_pem(&self) -> String {
        std::fs::read_to_string(&self.proxy_ca).unwrap()
    }

    /// `https://localhost:<echo port><path>`.
    fn url(&self, path: &str) -> String {
        format!("https://{}{}", self.echo.authority(), path)
    }

    /// `http://token:vault@127.0.0.1:<proxy port>`.
    fn proxy_url(&self, token: &str, vault: &str) -> String {
        format!("http://{token}:{vault}@127.0.0.1:{}", self.stack.envoy.port)
    }

    /// A tunnel to the echo as `token` in `vault`, TLS with SNI `localhost`.
    fn tunnel(&self, token: &str, vault: &str) -> Result<HttpsTunnel, TunnelError> {
        let auth = proxy_basic(token, vault);
        HttpsTunnel::open(
            self.stack.envoy.port,
            &self.echo.authority(),
            &[("Proxy-Authorization", &auth)],
            &TlsOptions::new("localhost", &self.proxy_ca_pem()),
        )
    }
}

/// What curl printed: its exit code, the body, the status (`-w`) and its stderr.
pub(crate) struct CurlOutput {
    pub(crate) code: i32,
    pub(crate) status: u16,
    pub(crate) body: String,
    pub(crate) stderr: String,
}

impl CurlOutput {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!(
                "curl's body is not JSON ({e}): {} {}",
                self.body, self.stderr
            )
        })
    }
}

/// curl through the proxy, as an agent runs it: `--proxy http://TOKEN:vault@proxy`,
/// `--cacert <the proxy's CA>`, plus `args`. No proxy variable from the test's
/// environment applies (`NO_PROXY=localhost` would bypass the proxy).
pub(crate) fn curl(proxy_url: &str, ca: &Path, args: &[&str]) -> CurlOutput {
    const STATUS_MARK: &str = "\n--status--";
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "--proxy", proxy_url, "--cacert"])
        .arg(ca)
        .args(["-w", &format!("{STATUS_MARK}%{{http_code}}")])
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .output()
        .expect("run curl");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = stdout.rsplit_once(STATUS_MARK).unwrap_or((&stdout, "0"));
    CurlOutput {
        code: out.status.code().unwrap_or(-1),
        status: status.trim().parse().unwrap_or(0),
        body: body.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn curl_over_https_gets_the_credential_injected_over_http1_and_http2_and_never_sends_the_token() {
    let https = Https::start();
    let secret = "sk_test_https_0123456789";
    https.add_echo_service("default", secret);
    let token = https.stack.create_agent("curl-agent", &["default"]);
    let proxy = https.proxy_url(&token, "default");

    for version in ["--http1.1", "--http2"] {
        let url = https.url("/v1/charges?limit=1");
        let mut last = None;
        let ok = wait_for(FIRST_SNAPSHOT, || {
            let out = curl(&proxy, &https.proxy_ca, &[version, &url]);
            let done = out.status == 200;
            last = Some(out);
            done.then_some(())
        });
        let out = last.unwrap();
        assert!(
            ok.is_some(),
            "{version}: curl {} {} {} {}\n{}",
            out.code,
            out.status,
            out.body,
            out.stderr,
            https.stack.envoy.log_tail(30)
        );
        let seen = out.json();
        assert_eq!(seen["path"], "/v1/charges?limit=1", "{version}");
        assert_eq!(seen["tls"], true, "Envoy originated TLS upstream");
        assert_eq!(seen["sni"], "localhost");
        let headers = &seen["headers"];
        assert_eq!(
            headers["authorization"],
            format!("Bearer {secret}"),
            "{version}"
        );
        assert!(headers.get("proxy-authorization").is_none(), "{headers}");
        assert!(headers.get("x-agent-vault-upstream").is_none(), "{headers}");
        assert!(headers.get("x-agent-vault-tunnel").is_none(), "{headers}");
        let all = seen["header_list"].to_string();
        assert!(!all.contains(&token), "agent token leaked upstream: {all}");
    }
}

/// What Python `requests` got: `{"status", "body"}` or `{"error"}` (the exception).
fn python_requests(url: &str, https_proxy: &str, ca: &Path) -> Value {
    const SCRIPT: &str = r#"
import json, sys
import requests
try:
    r = requests.get(sys.argv[1], timeout=20)
    print(json.dumps({"status": r.status_code, "body": r.text}))
except Exception as e:
    print(json.dumps({"error": repr(e)}))
"#;
    let python = workspace_root().join(".venv/bin/python3");
    assert!(
        python.exists(),
        "{} is missing: run ./dev test, which installs Python requests there",
        python.display()
    );
    let out = Command::new(python)
        .args(["-c", SCRIPT, url])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HTTPS_PROXY", https_proxy)
        .env("REQUESTS_CA_BUNDLE", ca)
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "python printed no JSON ({e}): {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The body of an answer as JSON.
fn json_of(response: &RawResponse) -> Value {
    serde_json::from_slice(&response.body).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {} {:?} {}",
            response.status,
            response.headers,
            response.text()
        )
    })
}

/// Asserts `response` is the filter's own JSON refusal with `status` and `code`.
#[track_caller]
fn assert_refused(response: &RawResponse, status: u16, code: &str) -> Value {
    assert_eq!(response.status, status, "{}", response.text());
    assert_eq!(response.header("x-agent-vault-error"), Some("true"));
    assert!(response
        .header("content-type")
        .is_some_and(|c| c.starts_with("application/json")));
    let body = json_of(response);
    assert_eq!(body["error"], code, "{body}");
    body
}

/// Waits until a tunnel as `token` in `vault` works (the snapshot with the agent has
/// reached the filter), and returns it.
fn ready_tunnel(https: &Https, token: &str, vault: &str) -> HttpsTunnel {
    let mut last = String::new();
    let tunnel = wait_for(FIRST_SNAPSHOT, || match https.tunnel(token, vault) {
        Ok(mut tunnel) => match tunnel.get("/ready", &[]) {
            Ok(r) if r.status == 200 => Some(tunnel),
            Ok(r) => {
                last = format!("{} {}", r.status, r.text());
                None
            }
            Err(e) => {
                last = e.to_string();
                None
            }
        },
        Err(e) => {
            last = format!("{e:?}");
            None
        }
    });
    tunnel.unwrap_or_else(|| {
        panic!(
            "no working tunnel: {last}\n{}",
            https.stack.envoy.log_tail(30)
        )
    })
}

#[test]
fn python_requests_with_https_proxy_and_requests_ca_bundle_gets_the_credential_injected() {
    let https = Https::start();
    let secret = "sk_test_python_0123456789";
    https.add_echo_service("default", secret);
    let token = https.stack.create_agent("python-agent", &["default"]);
    let mut last = Value::Null;
    let ok = wait_for(FIRST_SNAPSHOT, || {
        last = python_requests(
            &https.url("/v1/items"),
            &https.proxy_url(&token, "default"),
            &https.proxy_ca,
        );
        (last["status"] == 200).then_some(())
    });
    assert!(ok.is_some(), "{last}\n{}", https.stack.envoy.log_tail(30));
    let seen: Value = serde_json::from_str(last["body"].as_str().unwrap()).unwrap();
    assert_eq!(seen["headers"]["authorization"], format!("Bearer {secret}"));
    assert!(seen["headers"].get("proxy-authorization").is_none());
    assert!(!seen["header_list"].to_string().contains(&token));
}

#[test]
fn a_connect_without_or_with_a_bad_token_is_407_with_the_challenge() {
    let https = Https::start();
    https.add_echo_service("default", "sk_never");
    let authority = https.echo.authority();
    let bad = proxy_basic(
        "av_agt_0000000000000000000000000000000000000000000000000000000000000000",
        "default",
    );
    for (behaviour, headers, code) in [
        ("no credential", vec![], "proxy_auth_required"),
        (
            "an unknown token",
            vec![("Proxy-Authorization", bad.as_str())],
            "invalid_token",
        ),
    ] {
        let (response, tunnel) = connect(https.stack.envoy.port, &authority, &headers).unwrap();
        assert!(tunnel.is_none(), "{behaviour}");
        assert_refused(&response, 407, code);
        assert_eq!(
            response.header("proxy-authenticate"),
            Some("Basic realm=\"agent-vault\""),
            "{behaviour}"
        );
    }
    // What a real client shows: curl fails the CONNECT with its status.
    let out = curl(
        &format!("http://127.0.0.1:{}", https.stack.envoy.port),
        &https.proxy_ca,
        &[&https.url("/")],
    );
    assert_eq!(out.code, 56, "{}", out.stderr);
    assert!(
        out.stderr.contains("CONNECT tunnel failed, response 407"),
        "{}",
        out.stderr
    );
    assert!(https.echo.received().is_empty());
}

#[test]
fn a_connect_to_a_host_no_rule_names_is_403_with_a_proposal_hint_and_clients_show_the_403() {
    let https = Https::start();
    https.add_echo_service("default", "sk_never");
    let token = https.stack.create_agent("curious", &["default"]);
    let auth = proxy_basic(&token, "default");
    let connect_unknown = || {
        connect(
            https.stack.envoy.port,
            "api.unknown-to-the-vault.example:443",
            &[("Proxy-Authorization", &auth)],
        )
        .unwrap()
        .0
    };
    let response = wait_for(FIRST_SNAPSHOT, || {
        let response = connect_unknown();
        (response.status != 407).then_some(response)
    })
    .unwrap_or_else(connect_unknown);
    let body = assert_refused(&response, 403, "forbidden");
    assert_eq!(
        body["proposal_hint"],
        json!({"host": "api.unknown-to-the-vault.example", "endpoint": "POST /v1/proposals",
               "supported_auth_types": ["bearer", "basic", "api-key", "custom", "passthrough"]}),
        "{body}"
    );
    // Another port of a host the vault knows is no service either: the hint names it.
    let (other_port, _) = connect(
        https.stack.envoy.port,
        &format!("localhost:{}", https.echo.port + 1),
        &[("Proxy-Authorization", &auth)],
    )
    .unwrap();
    let body = assert_refused(&other_port, 403, "forbidden");
    assert_eq!(
        body["proposal_hint"]["host"],
        format!("localhost:{}", https.echo.port + 1)
    );

    // curl shows the status of the refused CONNECT, not its body (-v shows the
    // headers, x-agent-vault-error among them).
    let proxy = https.proxy_url(&token, "default");
    let out = curl(
        &proxy,
        &https.proxy_ca,
        &["-v", "https://api.unknown-to-the-vault.example/v1/x"],
    );
    assert_eq!(out.code, 56, "{}", out.stderr);
    assert!(
        out.stderr.contains("CONNECT tunnel failed, response 403"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("< x-agent-vault-error: true"),
        "{}",
        out.stderr
    );
    // Python requests raises a ProxyError naming the status.
    let got = python_requests(
        "https://api.unknown-to-the-vault.example/v1/x",
        &proxy,
        &https.proxy_ca,
    );
    let error = got["error"].as_str().unwrap_or_default();
    assert!(error.contains("ProxyError"), "{got}");
    assert!(
        error.contains("Tunnel connection failed: 403 Forbidden"),
        "{got}"
    );
}

#[test]
fn inside_a_tunnel_a_disabled_service_is_403_a_deleted_credential_502_and_a_stopped_control_plane_503(
) {
    let mut https = Https::start();
    https.add_echo_service("default", "sk_test_inside");
    // A second service on the same host, whose credential no request has fetched yet:
    // with the control plane down, a request for it cannot be served from the cache.
    https
        .stack
        .set_credential("default", "FRESH_TOKEN", "sk_fresh");
    https.stack.add_service(
        "default",
        json!({"name": "fresh", "host": format!("{}/fresh/*", https.echo.authority()),
               "auth": {"type": "bearer", "token": "FRESH_TOKEN"}}),
    );
    let token = https.stack.create_agent("inside", &["default"]);
    let mut tunnel = ready_tunnel(&https, &token, "default");

    https.stack.set_service_enabled("default", "echo", false);
    let (disabled, _, ok) = until_raw(
        PROPAGATION,
        || tunnel.get("/v1/x", &[]),
        |r| r.status == 403,
    );
    assert!(ok, "{} {}", disabled.status, disabled.text());
    let body = assert_refused(&disabled, 403, "service_disabled");
    assert!(
        body["message"].as_str().unwrap().contains("\"echo\""),
        "{body}"
    );

    https.stack.set_service_enabled("default", "echo", true);
    https.stack.delete_credentials("default", &["ECHO_TOKEN"]);
    let (missing, _, ok) = until_raw(
        PROPAGATION,
        || tunnel.get("/v1/x", &[]),
        |r| r.status == 502,
    );
    assert!(ok, "{} {}", missing.status, missing.text());
    let body = assert_refused(&missing, 502, "credential_not_found");
    assert_eq!(body["key"], "ECHO_TOKEN");

    https.stack.server.stop();
    https.echo.clear();
    let down = tunnel.get("/fresh/x", &[]).unwrap();
    assert_refused(&down, 503, "control_plane_unavailable");
    assert!(https.echo.received().is_empty());
}

/// Repeats `request` on a tunnel every 100 ms until `done` or `timeout`: the last
/// answer, the time it took, and whether `done` held.
fn until_raw(
    timeout: Duration,
    mut request: impl FnMut() -> std::io::Result<RawResponse>,
    done: impl Fn(&RawResponse) -> bool,
) -> (RawResponse, Duration, bool) {
    let start = std::time::Instant::now();
    loop {
        let response = request().expect("the tunnel stays open");
        if done(&response) {
            return (response, start.elapsed(), true);
        }
        if start.elapsed() > timeout {
            return (response, start.elapsed(), false);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_tunnel_opened_before_a_revoke_stops_injecting_within_the_propagation_target() {
    let https = Https::start();
    https.add_echo_service("default", "sk_test_revoked");
    let token = https.stack.create_agent("doomed", &["default"]);
    let mut tunnel = ready_tunnel(&https, &token, "default");
    let before = tunnel.get("/before", &[]).unwrap();
    assert_eq!(
        json_of(&before)["headers"]["authorization"],
        "Bearer sk_test_revoked"
    );

    https.stack.revoke_agent("doomed");
    let (revoked, took, ok) = until_raw(
        PROPAGATION,
        || tunnel.get("/after", &[]),
        |r| r.status != 200,
    );
    assert!(
        ok,
        "still served {took:?} after the revoke: {}",
        revoked.text()
    );
    assert_refused(&revoked, 407, "invalid_token");
    // The same tunnel stays refused (every worker has the new rules by now).
    std::thread::sleep(Duration::from_millis(1500));
    https.echo.clear();
    for _ in 0..10 {
        let again = tunnel.get("/again", &[]).unwrap();
        assert_refused(&again, 407, "invalid_token");
    }
    assert!(https.echo.received().is_empty());
    eprintln!("a revoke reached an open tunnel in {took:?}");
}

#[test]
fn a_tunnel_authenticated_as_agent_a_never_gets_vault_bs_or_agent_bs_credential() {
    let https = Https::start();
    https.stack.create_vault("vault-a");
    https.stack.create_vault("vault-b");
    https.add_echo_service("vault-a", "sk_vault_a");
    https.add_echo_service("vault-b", "sk_vault_b");
    let a = https.stack.create_agent("agent-a", &["vault-a"]);
    let b = https.stack.create_agent("agent-b", &["vault-b"]);
    let mut tunnel = ready_tunnel(&https, &a, "vault-a");
    let _ = ready_tunnel(&https, &b, "vault-b");

    // Inside A's tunnel: B's proxy credential, B's vault named, and the identity
    // header of the filter itself, forged.
    let b_auth = proxy_basic(&b, "vault-b");
    let forged =
        "v1 0000000000000000000000000000000000000000000000000000000000000000 vault-b localhost 443";
    for headers in [
        vec![("Proxy-Authorization", b_auth.as_str())],
        vec![("X-Vault", "vault-b")],
        vec![("x-agent-vault-tunnel", forged)],
        vec![
            ("Proxy-Authorization", b_auth.as_str()),
            ("X-Vault", "vault-b"),
            ("x-agent-vault-tunnel", forged),
        ],
    ] {
        let seen = json_of(&tunnel.get("/v1/x", &headers).unwrap());
        assert_eq!(
            seen["headers"]["authorization"], "Bearer sk_vault_a",
            "{headers:?}"
        );
        assert!(
            seen["headers"].get("proxy-authorization").is_none(),
            "{seen}"
        );
        assert!(seen["headers"].get("x-vault").is_none(), "{seen}");
        assert!(
            seen["headers"].get("x-agent-vault-tunnel").is_none(),
            "{seen}"
        );
        assert!(!seen["header_list"].to_string().contains(&b), "{seen}");
    }

    // A cannot open a tunnel in B's vault.
    let a_in_b = proxy_basic(&a, "vault-b");
    let (refused, _) = connect(
        https.stack.envoy.port,
        &https.echo.authority(),
        &[("Proxy-Authorization", &a_in_b)],
    )
    .unwrap();
    assert_refused(&refused, 403, "forbidden");

    // A CONNECT carrying a forged identity header gets the identity it proves, A's.
    let a_auth = proxy_basic(&a, "vault-a");
    let b_identity = format!(
        "v1 {} vault-b {} {}",
        sha256_hex(&b),
        "localhost",
        https.echo.port
    );
    let mut forged_tunnel = HttpsTunnel::open(
        https.stack.envoy.port,
        &https.echo.authority(),
        &[
            ("Proxy-Authorization", &a_auth),
            ("x-agent-vault-tunnel", &b_identity),
        ],
        &TlsOptions::new("localhost", &https.proxy_ca_pem()),
    )
    .unwrap();
    let seen = json_of(&forged_tunnel.get("/v1/x", &[]).unwrap());
    assert_eq!(seen["headers"]["authorization"], "Bearer sk_vault_a");
    // Without a valid proxy credential the forged header opens nothing.
    let (refused, tunnel) = connect(
        https.stack.envoy.port,
        &https.echo.authority(),
        &[("x-agent-vault-tunnel", &b_identity)],
    )
    .unwrap();
    assert!(tunnel.is_none());
    assert_refused(&refused, 407, "proxy_auth_required");
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(text.as_bytes()))
}

#[test]
fn a_tls_server_name_other_than_the_connects_host_is_refused_421_and_one_no_rule_names_gets_no_certificate(
) {
    let https = Https::start();
    https.add_echo_service("default", "sk_never_sni");
    // `other.localhost` has a rule too, so the control plane mints it a certificate:
    // the handshake succeeds and the filter refuses the requests.
    https
        .stack
        .set_credential("default", "OTHER_TOKEN", "sk_other_sni");
    https.stack.add_service(
        "default",
        json!({"name": "other", "host": format!("other.localhost:{}", https.echo.port),
               "auth": {"type": "bearer", "token": "OTHER_TOKEN"}}),
    );
    let token = https.stack.create_agent("sni", &["default"]);
    let _ = ready_tunnel(&https, &token, "default");
    let auth = proxy_basic(&token, "default");
    let open = |sni: &str| {
        HttpsTunnel::open(
            https.stack.envoy.port,
            &https.echo.authority(),
            &[("Proxy-Authorization", &auth)],
            &TlsOptions::new(sni, &https.proxy_ca_pem()),
        )
    };
    let mut tunnel = wait_for(PROPAGATION, || open("other.localhost").ok())
        .expect("a certificate for other.localhost");
    https.echo.clear();
    let host = format!("other.localhost:{}", https.echo.port);
    for headers in [vec![], vec![("Host", host.as_str())]] {
        let response = tunnel.get("/v1/x", &headers).unwrap();
        let body = assert_refused(&response, 421, "tunnel_host_mismatch");
        assert_eq!(body["host"], https.echo.authority(), "{body}");
        assert!(body["message"].as_str().unwrap().contains("SNI"), "{body}");
    }
    // A name no rule of any vault matches gets no certificate: the handshake fails
    // (the control plane told Envoy the name is removed) and nothing reaches upstream.
    for sni in ["unknown.localhost", "evil.example.com"] {
        match open(sni) {
            Err(TunnelError::Tls(_)) => {}
            Err(other) => panic!("{sni}: {other:?}"),
            Ok(_) => panic!("{sni}: a certificate for a name no rule matches"),
        }
    }
    assert!(https.echo.received().is_empty());
}

#[test]
fn an_authority_other_than_the_connects_host_inside_the_tunnel_is_refused_421() {
    let https = Https::start();
    https.add_echo_service("default", "sk_never_host");
    // The other host has a rule too: the tunnel still carries only its own host.
    https
        .stack
        .set_credential("default", "OTHER_TOKEN", "sk_other");
    https.stack.add_service(
        "default",
        json!({"name": "other", "host": format!("other.localhost:{}", https.echo.port),
               "auth": {"type": "bearer", "token": "OTHER_TOKEN"}}),
    );
    let token = https.stack.create_agent("host", &["default"]);
    let mut tunnel = ready_tunnel(&https, &token, "default");
    https.echo.clear();
    let other = format!("other.localhost:{}", https.echo.port);
    let other_port = format!("localhost:{}", https.echo.port + 1);
    for host in [other.as_str(), other_port.as_str(), "localhost"] {
        let response = tunnel.get("/v1/x", &[("Host", host)]).unwrap();
        let body = assert_refused(&response, 421, "tunnel_host_mismatch");
        assert!(
            body["message"].as_str().unwrap().contains(":authority"),
            "{body}"
        );
    }
    assert!(https.echo.received().is_empty());
    // Its own host still works on the same tunnel.
    let own = tunnel.get("/v1/x", &[]).unwrap();
    assert_eq!(
        json_of(&own)["headers"]["authorization"],
        "Bearer sk_never_host"
    );
}

#[test]
fn plain_http_through_the_proxy_still_works_beside_https() {
    let https = Https::start();
    https.add_echo_service("default", "sk_plain_too");
    let token = https.stack.create_agent("both", &["default"]);
    let _ = ready_tunnel(&https, &token, "default");
    // http:// to the same TLS service: Envoy originates TLS, as before.
    let response = https
        .stack
        .get_as(&token, "default", &https.echo.url("/plain"), &[]);
    let seen = response.echoed();
    assert_eq!(seen["headers"]["authorization"], "Bearer sk_plain_too");
    assert_eq!(seen["tls"], true);
}

#[test]
fn under_the_passthrough_policy_an_unknown_host_is_tunnelled_untouched_and_its_destination_still_checked(
) {
    let https = Https::start();
    https.stack.create_vault("open");
    https.stack.set_unmatched_host_policy("open", "passthrough");
    let token = https.stack.create_agent("open-agent", &["open"]);
    let auth = proxy_basic(&token, "open");
    // Not decrypted: the client speaks TLS with the upstream itself, trusting the
    // upstream's own CA, and nothing is injected.
    let upstream_tls = TlsOptions::new("localhost", &https.stack.ca.cert_pem);
    let mut tunnel = wait_for(FIRST_SNAPSHOT, || {
        HttpsTunnel::open(
            https.stack.envoy.port,
            &https.echo.authority(),
            &[("Proxy-Authorization", &auth)],
            &upstream_tls,
        )
        .ok()
    })
    .unwrap_or_else(|| panic!("no untouched tunnel\n{}", https.stack.envoy.log_tail(30)));
    let seen = json_of(
        &tunnel
            .get("/v1/x", &[("Authorization", "Bearer agents-own")])
            .unwrap(),
    );
    assert_eq!(seen["headers"]["authorization"], "Bearer agents-own");
    assert!(
        seen["headers"].get("proxy-authorization").is_none(),
        "{seen}"
    );
    assert!(
        seen["headers"].get("x-forwarded-proto").is_none(),
        "not through Envoy's HTTP: {seen}"
    );

    // The control plane's API port is loopback and not allowed: refused on the CONNECT.
    let api_port = https
        .stack
        .server
        .addr
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let (refused, tunnel) = connect(
        https.stack.envoy.port,
        &format!("localhost:{api_port}"),
        &[("Proxy-Authorization", &auth)],
    )
    .unwrap();
    assert!(tunnel.is_none());
    assert_refused(&refused, 403, "destination_forbidden");
}

#[test]
fn a_passthrough_host_is_tunnelled_untouched_unless_a_service_injects_a_credential_for_it() {
    let https = Https::start();
    https.stack.create_vault("pinning");
    let token = https.stack.create_agent("pinning-agent", &["pinning"]);
    let auth = proxy_basic(&token, "pinning");
    let (status, body) = https
        .stack
        .set_passthrough_hosts("pinning", &[&https.echo.authority()]);
    assert_eq!(status, 200, "{body}");
    // A client that pins its upstream's certificate: it trusts the upstream's CA only.
    let pinned_tls = TlsOptions::new("localhost", &https.stack.ca.cert_pem);
    let mut tunnel = wait_for(FIRST_SNAPSHOT, || {
        HttpsTunnel::open(
            https.stack.envoy.port,
            &https.echo.authority(),
            &[("Proxy-Authorization", &auth)],
            &pinned_tls,
        )
        .ok()
    })
    .unwrap_or_else(|| panic!("no untouched tunnel\n{}", https.stack.envoy.log_tail(30)));
    let seen = json_of(&tunnel.get("/pinned", &[]).unwrap());
    assert!(seen["headers"].get("authorization").is_none(), "{seen}");
    assert!(seen["headers"].get("x-forwarded-proto").is_none(), "{seen}");
    drop(tunnel);

    // A service that injects a credential for that host cannot be added beside it
    // through the list... (the control plane refuses the list, below) and when one is
    // added after the list, the rule that injects wins: the tunnel is decrypted.
    https.add_echo_service("pinning", "sk_pinning");
    let (status, body) = https
        .stack
        .set_passthrough_hosts("pinning", &[&https.echo.authority()]);
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "passthrough_host_has_service");
    let decrypted = until_tunnel_decrypted(&https, &token, "pinning");
    assert_eq!(decrypted["headers"]["authorization"], "Bearer sk_pinning");

    // A passthrough host that resolves to a private address not allowed: refused.
    let api_port = https
        .stack
        .server
        .addr
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let api = format!("localhost:{api_port}");
    let (status, body) = https.stack.set_passthrough_hosts("pinning", &[&api]);
    assert_eq!(status, 200, "{body}");
    let refused = wait_for(PROPAGATION, || {
        let (response, _) = connect(
            https.stack.envoy.port,
            &api,
            &[("Proxy-Authorization", &auth)],
        )
        .unwrap();
        (response.status == 403 && json_of(&response)["error"] == "destination_forbidden")
            .then_some(response)
    });
    assert!(refused.is_some(), "{}", https.stack.envoy.log_tail(20));
}

/// Opens tunnels as `token` until one is decrypted (the proxy's certificate) and a
/// request inside reaches the echo: what the echo saw.
fn until_tunnel_decrypted(https: &Https, token: &str, vault: &str) -> Value {
    let mut last = String::new();
    wait_for(PROPAGATION, || match https.tunnel(token, vault) {
        Ok(mut tunnel) => match tunnel.get("/decrypted", &[]) {
            Ok(r) if r.status == 200 => Some(json_of(&r)),
            Ok(r) => {
                last = format!("{} {}", r.status, r.text());
                None
            }
            Err(e) => {
                last = e.to_string();
                None
            }
        },
        Err(e) => {
            last = format!("{e:?}");
            None
        }
    })
    .unwrap_or_else(|| {
        panic!(
            "never decrypted: {last}\n{}",
            https.stack.envoy.log_tail(30)
        )
    })
}

/// A Node HTTPS agent: `CONNECT` to the URL's host through `HTTPS_PROXY` (its user and
/// password as `Proxy-Authorization`), then Node's TLS (the default CAs plus
/// `NODE_EXTRA_CA_CERTS`) and an `https` GET inside; prints `{"status","body"}` or
/// `{"error"}`.
const NODE_AGENT: &str = r#"
const http = require('http'), https = require('https'), tls = require('tls');
const target = new URL(process.argv[1]);
const proxy = new URL(process.env.HTTPS_PROXY);
const port = target.port || 443;
const credential = decodeURIComponent(proxy.username) + ':' + decodeURIComponent(proxy.password);
const done = (answer) => { console.log(JSON.stringify(answer)); process.exit(0); };
const connect = http.request({
  host: proxy.hostname, port: proxy.port, method: 'CONNECT', path: `${target.hostname}:${port}`,
  headers: {'Proxy-Authorization': 'Basic ' + Buffer.from(credential).toString('base64')},
});
connect.on('connect', (answer, socket) => {
  if (answer.statusCode !== 200) return done({status: answer.statusCode});
  const request = https.request({
    host: target.hostname, port, path: target.pathname + target.search,
    createConnection: () => tls.connect({socket, servername: target.hostname}),
  }, (response) => {
    let body = '';
    response.on('data', (chunk) => body += chunk);
    response.on('end', () => done({status: response.statusCode, body}));
  });
  request.on('error', (e) => done({error: String(e)}));
  request.end();
});
connect.on('error', (e) => done({error: String(e)}));
connect.end();
"#;

/// Runs `program args` with exactly `vars` (and `PATH`) as its environment: an agent
/// configured only by what the CLI printed.
fn run_with_only(program: &Path, args: &[&str], vars: &BTreeMap<String, String>) -> Output {
    Command::new(program)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(vars)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()))
}

#[test]
fn an_agent_configured_only_by_the_lines_the_cli_prints_calls_an_https_api_through_envoy() {
    let https = Https::start();
    let secret = "sk_live_from_agent_env_0123456789";
    https.add_echo_service("default", secret);
    let cli = https.stack.server.cli();
    cli.login("owner@example.com", "owner-password");
    let bundle = https.stack.server.dir.path().join("agent").join("ca.pem");
    let proxy = format!("http://127.0.0.1:{}", https.stack.envoy.port);
    let created = cli
        .run(&[
            "agent",
            "create",
            "env-agent",
            "--vault",
            "default",
            "--env",
            "--proxy",
            &proxy,
            "--ca-out",
            bundle.to_str().unwrap(),
        ])
        .ok();
    let vars = shell_exports(&created.stdout);
    let url = https.url("/v1/customers?limit=3");

    // curl: HTTPS_PROXY (its token in the URL) and CURL_CA_BUNDLE, nothing on argv.
    let curl = PathBuf::from("curl");
    let mut last = String::new();
    let answered = wait_for(FIRST_SNAPSHOT, || {
        let out = run_with_only(&curl, &["-sS", "--max-time", "20", &url], &vars);
        last = format!(
            "{} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout)
            .ok()
            .filter(|seen| seen["path"] == "/v1/customers?limit=3")
    });
    let seen =
        answered.unwrap_or_else(|| panic!("curl: {last}\n{}", https.stack.envoy.log_tail(30)));
    assert_eq!(seen["headers"]["authorization"], format!("Bearer {secret}"));
    assert_eq!(seen["tls"], true);

    // Python requests: HTTPS_PROXY and REQUESTS_CA_BUNDLE.
    let python = workspace_root().join(".venv/bin/python3");
    let script = "import requests, sys; r = requests.get(sys.argv[1], timeout=20); \
                  print(r.status_code); print(r.text)";
    let out = run_with_only(&python, &["-c", script, &url], &vars);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (status, body) = stdout
        .split_once('\n')
        .unwrap_or_else(|| panic!("python: {stdout} {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(status, "200", "{body}");
    let seen: Value = serde_json::from_str(body.trim()).unwrap();
    assert_eq!(seen["headers"]["authorization"], format!("Bearer {secret}"));
    // Node: its own TLS stack, trusting NODE_EXTRA_CA_CERTS; the tunnel opened from
    // HTTPS_PROXY as the usual agent (https-proxy-agent) does, since Node's fetch reads
    // no proxy variable before Node 24.
    let node = run_with_only(&PathBuf::from("node"), &["-e", NODE_AGENT, &url], &vars);
    let printed: Value = serde_json::from_slice(&node.stdout).unwrap_or_else(|e| {
        panic!(
            "node printed no JSON ({e}): {} {}",
            String::from_utf8_lossy(&node.stdout),
            String::from_utf8_lossy(&node.stderr)
        )
    });
    assert_eq!(printed["status"], 200, "{printed}");
    let seen: Value = serde_json::from_str(printed["body"].as_str().unwrap()).unwrap();
    assert_eq!(seen["headers"]["authorization"], format!("Bearer {secret}"));

    let token = vars["HTTPS_PROXY"]
        .strip_prefix("http://")
        .and_then(|rest| rest.split(':').next())
        .unwrap();
    assert!(!seen["header_list"].to_string().contains(token));
}

#[test]
fn leaves_are_re_minted_and_pushed_to_envoy_before_they_expire() {
    // Six-second leaves, re-minted after four: over twenty seconds every handshake
    // (checked by rustls against the clock and the proxy CA) gets a valid one, and
    // Envoy shows several successive leaves without restarting anything.
    let https = Https::start_with(ServerOptions {
        extra_args: vec![
            "--allow-private-upstreams".into(),
            "--leaf-ttl-secs".into(),
            "6".into(),
        ],
        ..ServerOptions::default()
    });
    https.add_echo_service("default", "sk_renewed");
    let token = https.stack.create_agent("renewals", &["default"]);
    let _ = ready_tunnel(&https, &token, "default");
    let mut seen = Vec::<Vec<u8>>::new();
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < until {
        let mut tunnel = https.tunnel(&token, "default").unwrap_or_else(|e| {
            panic!(
                "a handshake failed (an expired or missing leaf?): {e:?}\n{}",
                https.stack.envoy.log_tail(20)
            )
        });
        let answer = tunnel.get("/v1/renewed", &[]).unwrap();
        assert_eq!(
            json_of(&answer)["headers"]["authorization"],
            "Bearer sk_renewed"
        );
        if seen.last().map(Vec::as_slice) != Some(tunnel.certificate()) {
            seen.push(tunnel.certificate().to_vec());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        seen.len() >= 4,
        "{} distinct leaves in 20 s of 6 s leaves",
        seen.len()
    );
}

#[test]
fn a_thousand_server_names_from_one_agent_leave_envoy_and_the_control_plane_bounded() {
    // A wildcard rule lets any `*.example.com` name have a certificate; the budget of
    // new names (50 an hour here) is what bounds them. One agent, one tunnel per name.
    let https = Https::start_with(ServerOptions {
        extra_args: vec![
            "--allow-private-upstreams".into(),
            "--leaf-names-per-hour".into(),
            "50".into(),
        ],
        ..ServerOptions::default()
    });
    https.add_echo_service("default", "sk_many_names");
    https.stack.add_service(
        "default",
        json!({"name": "wild", "host": "*.example.com", "auth": {"type": "passthrough"}}),
    );
    let token = https.stack.create_agent("names", &["default"]);
    let _ = ready_tunnel(&https, &token, "default");
    let auth = proxy_basic(&token, "default");
    let ca = https.proxy_ca_pem();
    let handshake = |name: &str| {
        HttpsTunnel::open(
            https.stack.envoy.port,
            &https.echo.authority(),
            &[("Proxy-Authorization", &auth)],
            &TlsOptions::new(name, &ca),
        )
        .is_ok()
    };
    let envoy = https.stack.envoy.pid().unwrap();
    let control_plane = https.stack.server.pid().unwrap();
    let mut rounds = Vec::new();
    for round in 0..4 {
        let served = (0..250)
            .filter(|i| handshake(&format!("n{round}-{i}.example.com")))
            .count();
        rounds.push((served, rss_kib(envoy), rss_kib(control_plane)));
    }
    let served: usize = rounds.iter().map(|r| r.0).sum();
    // `localhost` took one name of the budget; the wildcard the rest.
    assert_eq!(served, 49, "{rounds:?}");
    assert!(rounds[1..].iter().all(|r| r.0 == 0), "{rounds:?}");
    let held = https
        .stack
        .server
        .metric("agent_vault_leaf_certificates_held ");
    assert_eq!(held, Some(50.0));
    // Envoy holds a certificate only for names it was given one: the refused ones
    // leave nothing active behind.
    let stats = https
        .stack
        .envoy
        .admin_get("/stats?filter=on_demand_secret.cert_active");
    let active: Vec<u64> = stats
        .body
        .lines()
        .filter_map(|l| l.split_once("cert_active: ")?.1.trim().parse().ok())
        .collect();
    assert_eq!(active, [50], "{}", stats.body);
    // Memory: the last 750 names (all refused) add no more than noise. A certificate
    // kept per name (tens of KiB in Envoy) would add many MiB.
    let (first_envoy, first_cp) = (rounds[0].1, rounds[0].2);
    let (last_envoy, last_cp) = (rounds[3].1, rounds[3].2);
    let (envoy_grew, cp_grew) = (
        last_envoy.saturating_sub(first_envoy),
        last_cp.saturating_sub(first_cp),
    );
    assert!(
        envoy_grew < 4096 && cp_grew < 4096,
        "over 750 refused names Envoy grew {envoy_grew} KiB and the control plane \
         {cp_grew} KiB: {rounds:?}"
    );
}

#[test]
fn a_request_inside_a_tunnel_is_in_the_request_log_with_its_names_and_no_query_string() {
    let https = Https::start();
    https.add_echo_service("default", "sk_test_tunnel_log_0123");
    let token = https.stack.create_agent("tunnel-logger", &["default"]);
    let proxy = https.proxy_url(&token, "default");
    let url = https.url("/v1/tunnelled?api_key=SECRETQ");
    let ok = wait_for(FIRST_SNAPSHOT, || {
        (curl(&proxy, &https.proxy_ca, &["--http1.1", &url]).status == 200).then_some(())
    });
    assert!(ok.is_some(), "{}", https.stack.envoy.log_tail(30));
    let record = wait_for(PROPAGATION, || {
        https
            .stack
            .request_log("default")
            .into_iter()
            .find(|r| r["path"] == "/v1/tunnelled" && r["status"] == 200)
    })
    .unwrap_or_else(|| panic!("not logged: {:#?}", https.stack.request_log("default")));
    assert_eq!(record["agent"], "tunnel-logger", "{record}");
    assert_eq!(record["vault"], "default", "{record}");
    assert_eq!(record["service"], "echo", "{record}");
    assert_eq!(record["method"], "GET", "{record}");
    assert_eq!(record["host"], "localhost", "{record}");
    assert!(record["error"].is_null(), "{record}");
    // The tunnel's CONNECT is logged too, when the tunnel closes.
    let connect = wait_for(PROPAGATION, || {
        https
            .stack
            .request_log("default")
            .into_iter()
            .find(|r| r["method"] == "CONNECT")
    })
    .unwrap_or_else(|| panic!("no CONNECT: {:#?}", https.stack.request_log("default")));
    assert_eq!(connect["agent"], "tunnel-logger", "{connect}");
    assert_eq!(connect["host"], "localhost", "{connect}");
    let text = Value::from(https.stack.request_log("default")).to_string();
    assert!(!text.contains("SECRETQ"), "{text}");
}
