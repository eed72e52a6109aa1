//! The whole system for an end-to-end test: the control plane (`Server`), Envoy with
//! the built filter on the server's socket, and a test CA whose bundle Envoy trusts for
//! upstream TLS. Upstreams ([`crate::upstream::Echo`]) are started by the test.
//!
//! Envoy runs two workers and each has its own filter VM and its own snapshot, polled
//! every `snapshot_poll_ms`: after a rules change, one worker may answer with the new
//! rules while the other still answers with the old ones for up to one poll interval.
//! Wait for a change with [`eventually`] on each request that depends on it (or wait
//! one poll interval plus a margin), not on a single success; [`on_every_worker`] for a
//! state both workers must show (DESIGN.md §4, cache rules).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::control_plane::{Api, Server, ServerOptions};
use crate::envoy::{Envoy, EnvoyOptions};
use crate::http::{proxy_basic, HttpResponse};
use crate::upstream::TestCa;

pub struct Stack {
    pub server: Server,
    /// The owner's session token (admin of every vault).
    pub owner: String,
    /// The CA Envoy trusts for upstream TLS ([`crate::upstream::Echo::tls`] with it).
    pub ca: TestCa,
    pub ca_bundle: PathBuf,
    pub envoy: Envoy,
}

impl Stack {
    /// The control plane's data-plane counters (`GET /v1/dataplane/stats` on its
    /// socket).
    pub fn dataplane_stats(&self) -> Value {
        let answer = crate::control_plane::socket_request(
            &self.server.socket(),
            "GET /v1/dataplane/stats HTTP/1.1\r\nHost: agent-vault\r\nConnection: close\r\n\r\n",
        )
        .expect("the stats route answers");
        let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body);
        serde_json::from_str(body).unwrap_or_else(|e| panic!("stats: {e}: {answer}"))
    }

    /// Control plane + forward-proxy Envoy with the production filter settings.
    pub fn start() -> Stack {
        Stack::start_with(ServerOptions::default(), |options| options)
    }

    /// `configure` adjusts Envoy's options (template, timings, extra placeholders).
    pub fn start_with(
        server_options: ServerOptions,
        configure: impl FnOnce(EnvoyOptions) -> EnvoyOptions,
    ) -> Stack {
        Stack::start_with_ca(
            server_options,
            TestCa::new("agent-vault test CA"),
            configure,
        )
    }

    /// With a CA made beforehand (e.g. to start a TLS upstream whose port goes into
    /// Envoy's config).
    pub fn start_with_ca(
        server_options: ServerOptions,
        ca: TestCa,
        configure: impl FnOnce(EnvoyOptions) -> EnvoyOptions,
    ) -> Stack {
        let server = Server::start_with(server_options);
        let owner = server.owner_token();
        let ca_bundle = ca.write_pem(&server.dir.path().join("upstream-ca.pem"));
        Stack::on_server(server, owner, ca, ca_bundle, configure)
    }

    /// Another node on this stack's store: a control plane of its own
    /// ([`Server::join`]: the same master password or key file) and an Envoy on its
    /// socket, `configure`d like [`Stack::start_with`]. Its Envoy trusts both stacks'
    /// CAs; the owner is this stack's.
    pub fn join(&self, configure: impl FnOnce(EnvoyOptions) -> EnvoyOptions) -> Stack {
        let server = self.server.join();
        let owner = server.owner_token();
        let ca = TestCa::new("agent-vault test CA (joined node)");
        let ca_bundle = server.dir.path().join("upstream-ca.pem");
        std::fs::write(&ca_bundle, format!("{}{}", ca.cert_pem, self.ca.cert_pem))
            .expect("write the CA bundle");
        Stack::on_server(server, owner, ca, ca_bundle, configure)
    }

    /// Envoy on `server`'s socket, trusting `ca_bundle`.
    fn on_server(
        server: Server,
        owner: String,
        ca: TestCa,
        ca_bundle: PathBuf,
        configure: impl FnOnce(EnvoyOptions) -> EnvoyOptions,
    ) -> Stack {
        let mut options = EnvoyOptions::forward_proxy(&server.socket(), &ca_bundle);
        options.sds_socket = server.sds_socket();
        let envoy = Envoy::start(configure(options));
        Stack {
            server,
            owner,
            ca,
            ca_bundle,
            envoy,
        }
    }

    /// The management API as the owner.
    pub fn api(&self) -> Api {
        self.server.api(Some(&self.owner))
    }

    #[track_caller]
    pub fn set_credential(&self, vault: &str, key: &str, value: &str) {
        let (status, body) = self.api().post(
            &format!("/v1/vaults/{vault}/credentials"),
            &json!({"credentials": {key: value}}),
        );
        assert_eq!(status, 200, "set credential {key}: {body}");
    }

    /// Adds a service (the API's JSON shape: name, host, auth, upstream_tls, enabled).
    ///
    /// With `redact_responses: false` unless `service` says otherwise: most tests read
    /// the injected credential back from the echo upstream's answer, which response
    /// redaction (on by default) replaces. Redaction itself is tested in
    /// `tests/e2e/redaction.rs`, with [`Stack::add_service_as_is`].
    #[track_caller]
    pub fn add_service(&self, vault: &str, mut service: Value) {
        if let Some(fields) = service.as_object_mut() {
            fields
                .entry("redact_responses")
                .or_insert(Value::Bool(false));
        }
        self.add_service_as_is(vault, service);
    }

    /// Adds a service exactly as given (the API's defaults apply).
    #[track_caller]
    pub fn add_service_as_is(&self, vault: &str, service: Value) {
        let (status, body) = self
            .api()
            .post(&format!("/v1/vaults/{vault}/services"), &service);
        assert_eq!(status, 201, "add service {service}: {body}");
    }

    /// Creates an agent with the `proxy` role on `vaults`; returns its token.
    #[track_caller]
    pub fn create_agent(&self, name: &str, vaults: &[&str]) -> String {
        let grants: Vec<Value> = vaults.iter().map(|v| json!({"vault": v})).collect();
        let (status, body) = self
            .api()
            .post("/v1/agents", &json!({"name": name, "vaults": grants}));
        assert_eq!(status, 201, "create agent {name}: {body}");
        body["token"].as_str().expect("agent token").to_string()
    }

    /// Creates a vault (the owner becomes its admin).
    #[track_caller]
    pub fn create_vault(&self, name: &str) {
        let (status, body) = self.api().post("/v1/vaults", &json!({"name": name}));
        assert_eq!(status, 201, "create vault {name}: {body}");
    }

    /// Sets a vault's `unmatched_host_policy` (`deny` or `passthrough`).
    #[track_caller]
    pub fn set_unmatched_host_policy(&self, vault: &str, policy: &str) {
        let (status, body) = self.api().patch(
            &format!("/v1/vaults/{vault}"),
            &json!({"unmatched_host_policy": policy}),
        );
        assert_eq!(status, 200, "set policy of {vault} to {policy}: {body}");
    }

    /// Sets a vault's passthrough hosts: HTTPS tunnels Envoy does not decrypt.
    #[track_caller]
    pub fn set_passthrough_hosts(&self, vault: &str, hosts: &[&str]) -> (u16, Value) {
        self.api().patch(
            &format!("/v1/vaults/{vault}"),
            &json!({"passthrough_hosts": hosts}),
        )
    }

    /// Deletes credentials (all or nothing).
    #[track_caller]
    pub fn delete_credentials(&self, vault: &str, keys: &[&str]) {
        let (status, body) = self.api().post(
            &format!("/v1/vaults/{vault}/credentials/delete"),
            &json!({"keys": keys}),
        );
        assert_eq!(status, 200, "delete credentials {keys:?}: {body}");
    }

    /// Enables (`true`) or disables a service.
    #[track_caller]
    pub fn set_service_enabled(&self, vault: &str, service: &str, enabled: bool) {
        let action = if enabled { "enable" } else { "disable" };
        let (status, body) = self.api().post(
            &format!("/v1/vaults/{vault}/services/{service}/{action}"),
            &json!({}),
        );
        assert_eq!(status, 200, "{action} service {service}: {body}");
    }

    /// Revokes an agent.
    #[track_caller]
    pub fn revoke_agent(&self, name: &str) {
        let (status, body) = self.api().delete(&format!("/v1/agents/{name}"));
        assert_eq!(status, 204, "revoke agent {name}: {body}");
    }

    /// The newest request-log records of a vault (`GET /v1/vaults/{vault}/logs`).
    #[track_caller]
    pub fn request_log(&self, vault: &str) -> Vec<Value> {
        let (status, body) = self
            .api()
            .get(&format!("/v1/vaults/{vault}/logs?limit=1000"));
        assert_eq!(status, 200, "request log of {vault}: {body}");
        body["records"].as_array().cloned().unwrap_or_default()
    }

    /// `GET url` through Envoy as the agent (`Proxy-Authorization: Basic token:vault`),
    /// plus `headers`.
    pub fn get_as(
        &self,
        token: &str,
        vault: &str,
        url: &str,
        headers: &[(&str, &str)],
    ) -> HttpResponse {
        let auth = proxy_basic(token, vault);
        let mut all: Vec<(&str, &str)> = vec![("Proxy-Authorization", auth.as_str())];
        all.extend_from_slice(headers);
        self.envoy.get(url, &all)
    }
}

/// Repeats `request` every 100 ms until `done` holds or `timeout` passes; returns the
/// last response and how long it took. For changes that reach the filter on its next
/// snapshot poll.
pub fn until(
    timeout: Duration,
    mut request: impl FnMut() -> HttpResponse,
    done: impl Fn(&HttpResponse) -> bool,
) -> (HttpResponse, Duration, bool) {
    let start = Instant::now();
    loop {
        let response = request();
        if done(&response) {
            return (response, start.elapsed(), true);
        }
        if start.elapsed() > timeout {
            return (response, start.elapsed(), false);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Like [`until`], but panics with the last response (and Envoy's log) on timeout.
#[track_caller]
pub fn eventually(
    envoy: &Envoy,
    timeout: Duration,
    request: impl FnMut() -> HttpResponse,
    done: impl Fn(&HttpResponse) -> bool,
) -> HttpResponse {
    let (response, elapsed, ok) = until(timeout, request, done);
    assert!(
        ok,
        "no expected response within {elapsed:?}; last: {} {:?} {}\n--- Envoy log (tail) ---\n{}",
        response.status,
        response.headers,
        response.body,
        envoy.log_tail(30)
    );
    response
}

/// Repeats `request` (every 25 ms) until `done` holds for a run of consecutive
/// responses that reached every Envoy worker (at least `min_streak` of them, and each
/// worker accepted at least one of the run's connections: see
/// [`Envoy::worker_connections`]). Each worker polls its own snapshot and keeps its own
/// credential cache, so this is how a test knows a change is visible everywhere.
/// Panics with the last response (and Envoy's log) on timeout; returns the last one.
#[track_caller]
pub fn on_every_worker(
    envoy: &Envoy,
    timeout: Duration,
    min_streak: usize,
    mut request: impl FnMut() -> HttpResponse,
    done: impl Fn(&HttpResponse) -> bool,
) -> HttpResponse {
    let start = Instant::now();
    let mut streak_start = envoy.worker_connections();
    let mut streak = 0usize;
    loop {
        let response = request();
        if done(&response) {
            streak += 1;
            if streak >= min_streak {
                let now = envoy.worker_connections();
                let every_worker = !now.is_empty()
                    && now.len() == streak_start.len()
                    && now.iter().zip(&streak_start).all(|(n, s)| n > s);
                if every_worker {
                    return response;
                }
            }
        } else {
            streak = 0;
            streak_start = envoy.worker_connections();
        }
        if start.elapsed() > timeout {
            panic!(
                "no run of {min_streak} expected responses on every worker within {:?}; \
                 last: {} {:?} {}\n--- Envoy log (tail) ---\n{}",
                start.elapsed(),
                response.status,
                response.headers,
                response.body,
                envoy.log_tail(30)
            );
        }
        std::thread::sleep(Duration::from_millis(25));
    }
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
