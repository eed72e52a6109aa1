//! One Envoy per variant, all from the same binary with `--concurrency 2`. The plain
//! request variants (a–g, i, x) share one listener, HTTP connection manager, router and
//! static upstream cluster; only the HTTP filters (and what they need) differ. The gRPC
//! pair (k, l) has the same listener, and its upstream cluster speaks HTTP/2 (h2c, prior
//! knowledge): (k) as (a), (l) as (e) with the filter's `h2c` route. The
//! HTTPS interception pair (h, j) runs the shipped `envoy/forward-proxy.yaml` itself
//! (CONNECT, the internal listener that terminates the tunnel's TLS with certificates
//! from the control plane's SDS, the dynamic forward proxy and the destination check):
//! (j) as shipped, (h) with the filter taken out of both listeners.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agent_vault_testkit::http;
use agent_vault_testkit::net::free_port;
use agent_vault_testkit::process::tail;

use crate::procs::Proc;

pub const WORKERS: usize = 2;

/// The variants of DESIGN.md §12 (and the filter with the big snapshot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// (a) no filter.
    Plain,
    /// (b) a wasm filter that does nothing.
    NoopWasm,
    /// (i) the same no-op module configured to add one request header, the route
    /// marker, behind the route config our filter needs: the least any wasm filter
    /// that injects a header and is routed fail-closed pays. A reference point for (e).
    NoopAddHeader,
    /// (c) Envoy's `credential_injector`, static header from file-based SDS.
    CredentialInjector,
    /// (d) `ext_authz` (HTTP) to the control plane on every request.
    ExtAuthz,
    /// (e) our filter, warm cache.
    FilterWarm,
    /// (f) our filter, `credential_cache_ttl_ms: 0`.
    FilterNoCache,
    /// (g) our filter, warm cache, control plane with 10k services × 1k agents.
    FilterBig,
    /// (h) HTTPS agents: Envoy terminating the tunnel's TLS (certificates from the
    /// control plane's SDS), no filter: `envoy/forward-proxy.yaml` without the wasm
    /// filter on either listener, every CONNECT and request routed.
    HttpsPlain,
    /// (j) HTTPS agents through `envoy/forward-proxy.yaml` as shipped: our filter
    /// authenticates the CONNECT and injects into the requests inside, warm cache.
    HttpsFilter,
    /// (x) another build of our filter (`--candidate-wasm`), warm cache: to compare a
    /// change against the current build within one run.
    Candidate,
    /// (p) our filter, warm cache, with the snapshot long-poll off
    /// (`snapshot_wait_ms: 0`, plain polling every second): in the load rounds beside
    /// (e), for what the long-poll costs the hit path and memory, and for the
    /// propagation comparison.
    FilterPolling,
    /// (k) gRPC unary calls over h2c through Envoy, no filter: (a) for gRPC, with an
    /// HTTP/2 upstream cluster.
    GrpcPlain,
    /// (l) gRPC unary calls over h2c through our filter, warm cache: (e) for gRPC, its
    /// service an h2c upstream (`upstream_h2c`), routed on the filter's `h2c` marker.
    GrpcFilter,
}

impl Variant {
    pub const ALL: [Variant; 13] = [
        Variant::Plain,
        Variant::NoopWasm,
        Variant::NoopAddHeader,
        Variant::CredentialInjector,
        Variant::ExtAuthz,
        Variant::FilterWarm,
        Variant::FilterPolling,
        Variant::FilterNoCache,
        Variant::FilterBig,
        Variant::HttpsPlain,
        Variant::HttpsFilter,
        Variant::GrpcPlain,
        Variant::GrpcFilter,
    ];

    pub fn letter(self) -> &'static str {
        match self {
            Variant::Plain => "a",
            Variant::NoopWasm => "b",
            Variant::CredentialInjector => "c",
            Variant::ExtAuthz => "d",
            Variant::FilterWarm => "e",
            Variant::FilterNoCache => "f",
            Variant::FilterBig => "g",
            Variant::HttpsPlain => "h",
            Variant::NoopAddHeader => "i",
            Variant::HttpsFilter => "j",
            Variant::Candidate => "x",
            Variant::FilterPolling => "p",
            Variant::GrpcPlain => "k",
            Variant::GrpcFilter => "l",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Variant::Plain => "Envoy, no filter",
            Variant::NoopWasm => "Envoy + wasm filter that does nothing",
            Variant::CredentialInjector => "Envoy credential_injector (static, SDS file)",
            Variant::ExtAuthz => "Envoy ext_authz → control plane, every request",
            Variant::FilterWarm => "Agent Vault filter, warm cache",
            Variant::FilterNoCache => "Agent Vault filter, cache off (ttl 0)",
            Variant::FilterBig => "Agent Vault filter, warm, 10k svc × 1k agents",
            Variant::Candidate => "candidate filter build, warm cache",
            Variant::FilterPolling => "Agent Vault filter, warm cache, no long-poll (1 s poll)",
            Variant::NoopAddHeader => "wasm filter that only adds the route header",
            Variant::HttpsPlain => "HTTPS agents: Envoy decrypting the tunnel, no filter",
            Variant::HttpsFilter => "HTTPS agents: Agent Vault filter in the tunnel, warm",
            Variant::GrpcPlain => "gRPC unary (h2c): Envoy, no filter",
            Variant::GrpcFilter => "gRPC unary (h2c): Agent Vault filter, warm",
        }
    }

    /// Whether its load is HTTPS agents (CONNECT, then TLS inside the tunnel) rather
    /// than wrk's plain requests.
    pub fn https(self) -> bool {
        matches!(self, Variant::HttpsPlain | Variant::HttpsFilter)
    }

    /// Whether its load is gRPC unary calls over h2c ([`crate::grpc`]) rather than
    /// wrk's plain requests.
    pub fn grpc(self) -> bool {
        matches!(self, Variant::GrpcPlain | Variant::GrpcFilter)
    }

    /// Whether it has a control plane of its own: (h) for its certificates only.
    pub fn has_control_plane(self) -> bool {
        self.needs_agent() || self == Variant::HttpsPlain
    }

    /// Whether requests must carry the agent's proxy credential.
    pub fn needs_agent(self) -> bool {
        matches!(
            self,
            Variant::ExtAuthz
                | Variant::FilterWarm
                | Variant::FilterNoCache
                | Variant::FilterBig
                | Variant::HttpsFilter
                | Variant::Candidate
                | Variant::FilterPolling
                | Variant::GrpcFilter
        )
    }

    /// Whether the upstream must see the injected credential.
    pub fn injects(self) -> bool {
        !matches!(
            self,
            Variant::Plain
                | Variant::NoopWasm
                | Variant::NoopAddHeader
                | Variant::HttpsPlain
                | Variant::GrpcPlain
        )
    }
}

/// What the configs point at.
pub struct Inputs<'a> {
    pub upstream_port: u16,
    pub filter_wasm: &'a Path,
    pub noop_wasm: &'a Path,
    /// Variant (x)'s filter.
    pub candidate_wasm: Option<&'a Path>,
    /// Whether (x) runs the request log as shipped (Envoy's gRPC access log,
    /// `request_log: "access_log"`); `false` (`--candidate-request-log post`) gives it
    /// the previous configuration (no access log, no `request_log` field), which a
    /// build from before the field accepts.
    pub candidate_access_log: bool,
    /// (x) with `request_log: "access_log"` but no access log in its Envoy
    /// (`--candidate-request-log state_only`): what setting the filter state costs
    /// alone, for the analysis; nothing is logged.
    pub candidate_state_only: bool,
    /// The control plane's socket for this variant (d, e, f, h, j: small; g: big).
    pub socket: &'a Path,
    /// Its SDS socket, and the PEM file of its proxy CA (h, j).
    pub sds_socket: &'a Path,
    pub proxy_ca: &'a Path,
    /// Where the variant's files (config, SDS secret, log) go.
    pub dir: &'a Path,
    /// The static credential header value for (c).
    pub static_credential: &'a str,
}

const ROUTER: &str = r#"
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
              suppress_envoy_headers: true"#;

/// The header our filter sets for the route (its default `tls_header`).
const ROUTE_HEADER: &str = "x-agent-vault-upstream";
/// The header it sets on a CONNECT it lets into the decrypting listener: the tunnel's
/// identity. The shipped config drops an agent's own before any filter, as the bench's.
const TUNNEL_HEADER: &str = "x-agent-vault-tunnel";

/// Envoy's wasm filter running `wasm` in its own VM `name`, with an optional plugin
/// configuration (a string).
fn wasm_filter(name: &str, wasm: &Path, configuration: Option<&str>) -> String {
    let configuration = configuration.map_or(String::new(), |value| {
        format!(
            r#"
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: '{value}'"#
        )
    });
    format!(
        r#"
          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: {name}
                vm_config:
                  vm_id: {name}
                  runtime: envoy.wasm.runtime.v8
                  code: {{local: {{filename: {wasm}}}}}{configuration}
                fail_open: false"#,
        wasm = wasm.display()
    )
}

/// The no-op module; with `add`, a `name: value` header it adds to every request.
fn noop_filter(wasm: &Path, add: Option<&str>) -> String {
    wasm_filter("noop", wasm, add)
}

/// Our filter with the snapshot long-poll off: plain polling every second.
fn agent_vault_filter_polling(wasm: &Path) -> String {
    wasm_filter(
        "agent_vault",
        wasm,
        Some(
            r#"{"cluster": "agent_vault_control_plane", "authority": "agent-vault", "snapshot_poll_ms": 1000, "credential_cache_ttl_ms": 60000, "callout_timeout_ms": 2000, "snapshot_wait_ms": 0}"#,
        ),
    )
}

/// Our filter; with `access_log`, its request log goes through Envoy's access log as
/// shipped, else it posts it (the previous configuration: no `request_log` field).
fn agent_vault_filter(wasm: &Path, ttl_ms: u64, access_log: bool) -> String {
    let request_log = if access_log {
        r#", "request_log": "access_log""#
    } else {
        ""
    };
    wasm_filter(
        "agent_vault",
        wasm,
        Some(&format!(
            r#"{{"cluster": "agent_vault_control_plane", "authority": "agent-vault", "snapshot_poll_ms": 1000, "credential_cache_ttl_ms": {ttl_ms}, "callout_timeout_ms": 2000{request_log}}}"#
        )),
    )
}

/// The cluster (x)'s access log sends to.
const GRPC_CLUSTER: &str = "agent_vault_grpc";

/// The cluster of (x)'s access log ([`xtask::request_access_log`]), on `socket`.
fn grpc_cluster(socket: &Path) -> String {
    format!(
        r#"
  - name: {GRPC_CLUSTER}
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {{}}
    load_assignment:
      cluster_name: {GRPC_CLUSTER}
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              pipe: {{path: {socket}}}"#,
        socket = socket.display()
    )
}

/// The route config: everything to the upstream; for our filter (`marker`: the
/// routing header's value it sets for the bench's service, `plain` or `h2c`), the
/// production fail-closed shape of `envoy/forward-proxy.yaml` (route only what the
/// filter marked, drop the marker before routing and before the request leaves).
fn routes(marker: Option<&str>) -> String {
    let Some(marker) = marker else {
        return r#"
          route_config:
            name: bench
            virtual_hosts:
            - name: any
              domains: ["*"]
              routes:
              - match: {prefix: /}
                route: {cluster: upstream, timeout: 30s}"#
            .to_string();
    };
    format!(
        r#"
          early_header_mutation_extensions:
          - name: envoy.http.early_header_mutation.header_mutation
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation
              mutations:
              - remove: {ROUTE_HEADER}
              - remove: {TUNNEL_HEADER}
              - remove_on_match: {{key_matcher: {{prefix: x-envoy-}}}}
              - remove: x-forwarded-host
              - remove: x-forwarded-server
              - remove: x-forwarded-prefix
              - remove: x-original-host
              - remove: x-original-url
              - remove: x-rewrite-url
              - remove: x-http-method-override
              - remove: x-http-method
              - remove: x-method-override
          route_config:
            name: bench
            request_headers_to_remove: [{ROUTE_HEADER}, {TUNNEL_HEADER}]
            virtual_hosts:
            - name: any
              domains: ["*"]
              routes:
              - match:
                  prefix: /
                  headers:
                  - name: {ROUTE_HEADER}
                    string_match: {{exact: {marker}}}
                route: {{cluster: upstream, timeout: 30s}}
              - match: {{prefix: /}}
                direct_response:
                  status: 403
                  body: {{inline_string: '{{"error":"forbidden"}}'}}"#
    )
}

/// The bootstrap of `variant` listening on `port` with admin on the Unix socket
/// `admin_socket` (as the shipped configs have it: never on TCP).
pub fn config(
    variant: Variant,
    port: u16,
    admin_socket: &Path,
    inputs: &Inputs<'_>,
) -> Result<String, String> {
    if variant.https() {
        return forward_proxy(variant, port, admin_socket, inputs);
    }
    let mut filters = String::new();
    let marker = match variant {
        Variant::NoopAddHeader
        | Variant::FilterWarm
        | Variant::FilterNoCache
        | Variant::FilterBig
        | Variant::Candidate
        | Variant::FilterPolling => Some("plain"),
        Variant::GrpcFilter => Some("h2c"),
        _ => None,
    };
    match variant {
        Variant::Plain | Variant::HttpsPlain | Variant::HttpsFilter | Variant::GrpcPlain => {}
        Variant::NoopWasm => filters.push_str(&noop_filter(inputs.noop_wasm, None)),
        Variant::NoopAddHeader => filters.push_str(&noop_filter(
            inputs.noop_wasm,
            Some(&format!("{ROUTE_HEADER}: plain")),
        )),
        Variant::CredentialInjector => {
            let secret = inputs.dir.join("credential-sds.yaml");
            std::fs::write(
                &secret,
                format!(
                    "resources:\n- \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret\n  name: bench_credential\n  generic_secret:\n    secret:\n      inline_string: \"{}\"\n",
                    inputs.static_credential
                ),
            )
            .map_err(|e| e.to_string())?;
            filters.push_str(&format!(
                r#"
          - name: envoy.filters.http.credential_injector
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.credential_injector.v3.CredentialInjector
              overwrite: true
              credential:
                name: envoy.http.injected_credentials.generic
                typed_config:
                  "@type": type.googleapis.com/envoy.extensions.http.injected_credentials.generic.v3.Generic
                  header: Authorization
                  credential:
                    name: bench_credential
                    sds_config:
                      path_config_source: {{path: {}}}"#,
                secret.display()
            ));
        }
        Variant::ExtAuthz => filters.push_str(
            r#"
          - name: envoy.filters.http.ext_authz
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
              transport_api_version: V3
              failure_mode_allow: false
              http_service:
                server_uri: {uri: "http://agent-vault", cluster: agent_vault_control_plane, timeout: 2s}
                path_prefix: /v1/dataplane/ext_authz
                authorization_request:
                  allowed_headers:
                    patterns: [{exact: proxy-authorization}, {exact: x-vault}]
                authorization_response:
                  allowed_upstream_headers:
                    patterns: [{exact: authorization}]"#,
        ),
        Variant::FilterWarm | Variant::FilterBig | Variant::GrpcFilter => {
            filters.push_str(&agent_vault_filter(inputs.filter_wasm, 60_000, false))
        }
        Variant::Candidate => filters.push_str(&agent_vault_filter(
            inputs.candidate_wasm.unwrap_or(inputs.filter_wasm),
            60_000,
            inputs.candidate_access_log,
        )),
        Variant::FilterNoCache => {
            filters.push_str(&agent_vault_filter(inputs.filter_wasm, 0, false))
        }
        Variant::FilterPolling => {
            filters.push_str(&agent_vault_filter_polling(inputs.filter_wasm))
        }
    }
    filters.push_str(ROUTER);
    // Our variants post their request log, as shipped; only (x) may use Envoy's.
    let access_log = variant == Variant::Candidate
        && inputs.candidate_access_log
        && !inputs.candidate_state_only;
    let (access_log, grpc_cluster) = if access_log {
        (
            format!(
                "\n          access_log: {}",
                xtask::request_access_log(GRPC_CLUSTER)
            ),
            grpc_cluster(inputs.sds_socket),
        )
    } else {
        (String::new(), String::new())
    };
    let control_plane_cluster = if matches!(
        variant,
        Variant::Plain
            | Variant::NoopWasm
            | Variant::NoopAddHeader
            | Variant::CredentialInjector
            | Variant::GrpcPlain
    ) {
        String::new()
    } else {
        format!(
            r#"
  - name: agent_vault_control_plane
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: agent_vault_control_plane
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              pipe: {{path: {}}}"#,
            inputs.socket.display()
        )
    };
    // The gRPC pair's upstream speaks HTTP/2 only (h2c, prior knowledge), as the
    // shipped `dfp_h2c` cluster is set up.
    let upstream_protocol = if variant.grpc() {
        r#"
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {}"#
    } else {
        ""
    };
    Ok(format!(
        r#"# Generated by agent-vault-bench: variant ({letter}) {describe}.
node: {{id: bench-{letter}, cluster: agent-vault-bench}}
admin:
  address:
    pipe: {{path: {admin_socket}, mode: 0600}}
static_resources:
  listeners:
  - name: bench
    address:
      socket_address: {{address: 127.0.0.1, port_value: {port}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          codec_type: AUTO
          normalize_path: true{access_log}{routes}
          http_filters:{filters}
  clusters:
  - name: upstream
    type: STATIC
    connect_timeout: 1s{upstream_protocol}
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{address: 127.0.0.1, port_value: {upstream}}}{control_plane_cluster}{grpc_cluster}
"#,
        letter = variant.letter(),
        describe = variant.describe(),
        routes = routes(marker),
        upstream = inputs.upstream_port,
        admin_socket = admin_socket.display(),
    ))
}

/// The shipped forward proxy, as built into this binary.
const FORWARD_PROXY: &str = include_str!("../../envoy/forward-proxy.yaml");

/// (h) and (j): `envoy/forward-proxy.yaml` rendered with the production defaults (poll
/// 1 s, cache 60 s), the control plane's sockets, and the upstream's address and port
/// as the only private destination allowed; for (h), [`without_filter`].
fn forward_proxy(
    variant: Variant,
    port: u16,
    admin_socket: &Path,
    inputs: &Inputs<'_>,
) -> Result<String, String> {
    let rendered = render_forward_proxy(port, admin_socket, inputs)?;
    let config = match variant {
        Variant::HttpsPlain => without_filter(&rendered)?,
        _ => rendered,
    };
    Ok(format!(
        "# Generated by agent-vault-bench: variant ({}) {}.\n{config}",
        variant.letter(),
        variant.describe()
    ))
}

fn render_forward_proxy(
    port: u16,
    admin_socket: &Path,
    inputs: &Inputs<'_>,
) -> Result<String, String> {
    let allowed = xtask::allowed_upstreams(&[format!("127.0.0.1/32:{}", inputs.upstream_port)])?;
    let values = [
        ("LISTEN_ADDRESS", "127.0.0.1".to_string()),
        ("LISTEN_PORT", port.to_string()),
        ("ADMIN_SOCKET", admin_socket.display().to_string()),
        ("ALLOWED_PRIVATE_UPSTREAMS", allowed),
        ("SOCKET_PATH", inputs.socket.display().to_string()),
        ("SDS_SOCKET", inputs.sds_socket.display().to_string()),
        ("WASM_PATH", inputs.filter_wasm.display().to_string()),
        // Only TLS upstreams use it, and the benchmark's upstream is plain HTTP; any
        // valid bundle will do.
        ("CA_BUNDLE", inputs.proxy_ca.display().to_string()),
        ("SNAPSHOT_POLL_MS", "1000".to_string()),
        ("CREDENTIAL_CACHE_TTL_MS", "60000".to_string()),
        ("CALLOUT_TIMEOUT_MS", "2000".to_string()),
    ];
    xtask::render(FORWARD_PROXY, |name| {
        values
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.clone())
    })
    .map_err(|missing| format!("envoy/forward-proxy.yaml: {missing}"))
}

/// The rendered forward proxy without our filter: the wasm filter removed from both
/// listeners (the agents' and the internal one that decrypts tunnels), and the routes
/// that wait for its routing header made unconditional: every CONNECT goes to the
/// decrypting listener, every request inside to the plain-HTTP forward proxy (the
/// benchmark's upstream is plain HTTP), as they do in (j) once the filter said so. The
/// rest, destination check included, is untouched. Written out as JSON (which YAML
/// reads), so no YAML quirk changes a value on the way.
pub fn without_filter(rendered: &str) -> Result<String, String> {
    let mut config: serde_json::Value =
        serde_yaml::from_str(rendered).map_err(|e| format!("envoy/forward-proxy.yaml: {e}"))?;
    let marker = |route: &serde_json::Value| -> Option<String> {
        route["match"]["headers"]
            .as_array()?
            .iter()
            .find(|h| h["name"] == ROUTE_HEADER)
            .and_then(|h| h["string_match"]["exact"].as_str())
            .map(str::to_string)
    };
    let (mut filters_removed, mut routes_opened) = (0, Vec::new());
    let listeners = config["static_resources"]["listeners"]
        .as_array_mut()
        .ok_or("no listeners")?;
    for listener in listeners {
        let Some(chains) = listener["filter_chains"].as_array_mut() else {
            continue;
        };
        for chain in chains {
            let Some(filters) = chain["filters"].as_array_mut() else {
                continue;
            };
            for filter in filters {
                let hcm = &mut filter["typed_config"];
                if let Some(http_filters) = hcm["http_filters"].as_array_mut() {
                    let before = http_filters.len();
                    http_filters.retain(|f| f["name"] != "envoy.filters.http.wasm");
                    filters_removed += before - http_filters.len();
                }
                // The request log is the filter's: without it, nothing to log.
                if let Some(hcm) = hcm.as_object_mut() {
                    hcm.remove("access_log");
                }
                let Some(hosts) = hcm["route_config"]["virtual_hosts"].as_array_mut() else {
                    continue;
                };
                for host in hosts {
                    let Some(routes) = host["routes"].as_array_mut() else {
                        continue;
                    };
                    // Only plain HTTP/1.1 requests here: no TLS, h2c or WebSocket route.
                    routes.retain(|r| {
                        !matches!(marker(r).as_deref(), Some("tls" | "opaque" | "h2c"))
                            && !upgrade_route(r)
                    });
                    for route in routes {
                        if let Some(kind) = marker(route) {
                            if let Some(m) = route["match"].as_object_mut() {
                                m.remove("headers");
                            }
                            routes_opened.push(kind);
                        }
                    }
                }
            }
        }
    }
    // Two listeners with the filter, the tunnels' one in two filter chains (TLS and
    // plain HTTP inside the CONNECT); the agents' one routes CONNECT to the tunnel and
    // requests to `plain`, each of the tunnel's chains requests to `plain`.
    if filters_removed != 3 || routes_opened != ["tunnel", "plain", "plain", "plain"] {
        return Err(format!(
            "envoy/forward-proxy.yaml is not shaped as the benchmark expects: removed {filters_removed} \
             wasm filters (expected 3), opened the routes {routes_opened:?} (expected tunnel, plain, \
             plain, plain)"
        ));
    }
    octal_modes(&mut config);
    serde_json::to_string_pretty(&config).map_err(|e| e.to_string())
}

/// Whether `route` is for upgrades only (WebSocket: it matches on `upgrade`).
fn upgrade_route(route: &serde_json::Value) -> bool {
    route["match"]["headers"]
        .as_array()
        .is_some_and(|headers| headers.iter().any(|h| h["name"] == "upgrade"))
}

/// Unix socket modes (`mode: 0600`) as the numbers Envoy reads them as: its YAML parser
/// takes a leading 0 for octal, serde_yaml keeps such a scalar as the string "0600",
/// which as JSON would be read as decimal 600.
fn octal_modes(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                let octal = value
                    .as_str()
                    .filter(|text| key == "mode" && text.starts_with('0'))
                    .and_then(|text| u32::from_str_radix(text, 8).ok());
                match octal {
                    Some(mode) => *value = mode.into(),
                    None => octal_modes(value),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(octal_modes),
        _ => {}
    }
}

pub struct Envoy {
    pub variant: Variant,
    pub proc: Proc,
    pub port: u16,
    pub admin_socket: PathBuf,
    pub log: PathBuf,
}

impl Envoy {
    pub fn start(binary: &Path, variant: Variant, inputs: &Inputs<'_>) -> Result<Envoy, String> {
        let mut last = String::new();
        for attempt in 0..3 {
            let port = free_port();
            let admin_socket = inputs
                .dir
                .join(format!("envoy-{}-admin.sock", variant.letter()));
            let config_path = inputs.dir.join(format!("envoy-{}.yaml", variant.letter()));
            std::fs::write(&config_path, config(variant, port, &admin_socket, inputs)?)
                .map_err(|e| e.to_string())?;
            let log = inputs.dir.join(format!("envoy-{}.log", variant.letter()));
            let out = std::fs::File::create(
                inputs
                    .dir
                    .join(format!("envoy-{}-{attempt}.out", variant.letter())),
            )
            .map_err(|e| e.to_string())?;
            let mut command = Command::new(binary);
            command
                .arg("-c")
                .arg(&config_path)
                .args([
                    "--concurrency",
                    &WORKERS.to_string(),
                    "--use-dynamic-base-id",
                ])
                .args(["-l", "warning"])
                .arg("--log-path")
                .arg(&log)
                .stdin(Stdio::null())
                .stdout(out.try_clone().map_err(|e| e.to_string())?)
                .stderr(out);
            let proc = Proc::spawn(&format!("envoy ({})", variant.letter()), command)?;
            let mut envoy = Envoy {
                variant,
                proc,
                port,
                admin_socket,
                log,
            };
            match envoy.wait_ready() {
                Ok(()) => return Ok(envoy),
                Err(e) => last = e,
            }
        }
        Err(format!(
            "Envoy ({}) did not start: {last}",
            variant.letter()
        ))
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.proc.exited() {
                return Err(format!(
                    "exited; log tail:\n{}",
                    tail(&std::fs::read_to_string(&self.log).unwrap_or_default(), 20)
                ));
            }
            if http::unix_once(
                &self.admin_socket,
                "GET",
                "/ready",
                &[("Connection", "close")],
                None,
            )
            .is_ok_and(|r| r.status == 200)
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err("not ready after 30 s".into())
    }

    /// Connections accepted by each worker so far (listener stats).
    pub fn worker_connections(&self) -> Vec<u64> {
        let Ok(response) = http::unix_once(
            &self.admin_socket,
            "GET",
            "/stats?filter=downstream_cx_total",
            &[("Connection", "close")],
            None,
        ) else {
            return Vec::new();
        };
        let prefix = format!("listener.127.0.0.1_{}.worker_", self.port);
        let mut counts = vec![0u64; WORKERS];
        for line in response.text().lines() {
            let Some(rest) = line.strip_prefix(&prefix) else {
                continue;
            };
            let Some((worker, value)) = rest.split_once(".downstream_cx_total: ") else {
                continue;
            };
            if let (Ok(w), Ok(v)) = (worker.parse::<usize>(), value.trim().parse::<u64>()) {
                if let Some(slot) = counts.get_mut(w) {
                    *slot = v;
                }
            }
        }
        counts
    }

    /// The sum of the counters whose name ends with `suffix` (`None` if there is none,
    /// or the admin API does not answer).
    pub fn counter_sum(&self, suffix: &str) -> Option<u64> {
        let response = http::unix_once(
            &self.admin_socket,
            "GET",
            "/stats",
            &[("Connection", "close")],
            None,
        )
        .ok()?;
        let values: Vec<u64> = response
            .text()
            .lines()
            .filter_map(|line| line.split_once(": "))
            .filter(|(name, _)| name.ends_with(suffix))
            .filter_map(|(_, value)| value.trim().parse().ok())
            .collect();
        (!values.is_empty()).then(|| values.iter().sum())
    }

    pub fn version(binary: &Path) -> String {
        Command::new(binary)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
            .rsplit("version: ")
            .next()
            .unwrap_or_default()
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    fn yaml(text: &str) -> Value {
        serde_yaml::from_str(text).expect("YAML")
    }

    /// The first listener's HTTP connection manager.
    fn hcm(bootstrap: &Value) -> Value {
        bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
            ["typed_config"]
            .clone()
    }

    /// The HTTP filter `name`, its plugin configuration (a JSON string) parsed, so only
    /// what it says counts, not its spacing.
    fn http_filter(hcm: &Value, name: &str) -> Value {
        let mut filter = hcm["http_filters"]
            .as_array()
            .and_then(|filters| filters.iter().find(|f| f["name"] == name))
            .unwrap_or_else(|| panic!("no {name} in {hcm}"))
            .clone();
        let value = &mut filter["typed_config"]["config"]["configuration"]["value"];
        if let Some(text) = value.as_str() {
            *value = serde_json::from_str(text).expect("plugin configuration is JSON");
        }
        filter
    }

    fn routes(hcm: &Value) -> Vec<Value> {
        hcm["route_config"]["virtual_hosts"][0]["routes"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The `match` of every route that forwards to a cluster.
    fn forwarding_routes(hcm: &Value) -> Vec<Value> {
        routes(hcm)
            .into_iter()
            .filter(|r| r.get("route").is_some())
            .map(|r| r["match"].clone())
            .collect()
    }

    /// The benchmark writes its own bootstrap so that every variant shares one listener
    /// and upstream; what it measures for our filter is only worth something if the
    /// filter, its routing header and the router are set up as users get them.
    /// The inputs of the config tests: paths that exist nowhere, as Envoy is not run.
    fn test_inputs() -> Inputs<'static> {
        Inputs {
            upstream_port: 18080,
            filter_wasm: Path::new("/opt/agent_vault_filter.wasm"),
            noop_wasm: Path::new("/opt/noop.wasm"),
            candidate_wasm: None,
            candidate_access_log: false,
            candidate_state_only: false,
            socket: Path::new("/run/agent-vault/dataplane.sock"),
            sds_socket: Path::new("/run/agent-vault/sds.sock"),
            proxy_ca: Path::new("/var/lib/agent-vault/ca.pem"),
            dir: Path::new("/nonexistent"),
            static_credential: "unused",
        }
    }

    #[test]
    fn the_filter_variants_set_up_the_filter_and_its_routing_header_as_the_shipped_forward_proxy_does(
    ) {
        let template_path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../envoy/forward-proxy.yaml");
        let template = std::fs::read_to_string(&template_path).expect("the template");
        let inputs = test_inputs();
        let wasm = inputs.filter_wasm;
        for (variant, ttl_ms) in [
            (Variant::FilterWarm, "60000"),
            (Variant::FilterNoCache, "0"),
            (Variant::FilterBig, "60000"),
            (Variant::Candidate, "60000"),
        ] {
            let wasm_path = wasm.display().to_string();
            let values = [
                ("LISTEN_ADDRESS", "127.0.0.1"),
                ("LISTEN_PORT", "10000"),
                ("ADMIN_SOCKET", "/run/agent-vault-envoy/admin.sock"),
                ("ALLOWED_PRIVATE_UPSTREAMS", ""),
                ("SOCKET_PATH", "/run/agent-vault/dataplane.sock"),
                ("SDS_SOCKET", "/run/agent-vault/sds.sock"),
                ("WASM_PATH", wasm_path.as_str()),
                ("CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt"),
                ("SNAPSHOT_POLL_MS", "1000"),
                ("CREDENTIAL_CACHE_TTL_MS", ttl_ms),
                ("CALLOUT_TIMEOUT_MS", "2000"),
            ];
            let shipped = xtask::render(&template, |name| {
                values
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| v.to_string())
            })
            .expect("every placeholder has a value");
            let shipped = hcm(&yaml(&shipped));
            let bench = hcm(&yaml(
                &config(
                    variant,
                    10000,
                    Path::new("/run/agent-vault-envoy/admin.sock"),
                    &inputs,
                )
                .expect("config"),
            ));
            let letter = variant.letter();
            for name in ["envoy.filters.http.wasm", "envoy.filters.http.router"] {
                assert_eq!(
                    http_filter(&bench, name),
                    http_filter(&shipped, name),
                    "({letter}) {name}"
                );
            }
            let first_and_last = |hcm: &Value| {
                let filters = hcm["http_filters"].as_array().cloned().unwrap_or_default();
                (
                    filters.first().map(|f| f["name"].clone()),
                    filters.last().map(|f| f["name"].clone()),
                )
            };
            assert_eq!(
                first_and_last(&bench),
                first_and_last(&shipped),
                "({letter}) the filter first, the router last"
            );
            for key in ["early_header_mutation_extensions", "normalize_path"] {
                assert_eq!(bench[key], shipped[key], "({letter}) {key}");
            }
            // The request log posted by the filter, as shipped: no access log.
            assert!(bench.get("access_log").is_none(), "({letter}) access log");
            assert!(shipped.get("access_log").is_none(), "shipped access log");
            assert_eq!(
                bench["route_config"]["request_headers_to_remove"],
                shipped["route_config"]["request_headers_to_remove"],
                "({letter}) the routing header never goes upstream"
            );
            // Only what the filter marked `plain` is forwarded (the bench's upstream is
            // plain HTTP); everything else gets the fail-closed 403.
            let shipped_plain = forwarding_routes(&shipped)
                .into_iter()
                .find(|m| {
                    m["headers"][0]["string_match"]["exact"] == "plain"
                        && m["headers"].as_array().map(Vec::len) == Some(1)
                })
                .expect("the shipped plain route");
            assert_eq!(
                forwarding_routes(&bench),
                [shipped_plain],
                "({letter}) forwarded only with the filter's header"
            );
            for hcm in [&bench, &shipped] {
                assert_eq!(
                    routes(hcm)
                        .last()
                        .map(|r| r["direct_response"]["status"].clone()),
                    Some(Value::from(403)),
                    "({letter}) fail closed"
                );
            }
        }
    }

    /// The gRPC pair measures our filter on gRPC calls and nothing else: (k) is (a) and
    /// (l) is (e), each with its upstream cluster speaking HTTP/2 (prior knowledge), and
    /// (l) forwards only what the filter marked `h2c` (the bench's service is an h2c
    /// upstream), with everything else refused as in (e).
    #[test]
    fn the_grpc_pair_is_a_and_e_with_an_h2c_upstream_and_l_forwards_only_the_h2c_marker() {
        let inputs = test_inputs();
        let admin = Path::new("/run/agent-vault-envoy/admin.sock");
        let bootstrap =
            |variant: Variant| yaml(&config(variant, 10000, admin, &inputs).expect("config"));
        for (grpc, base) in [
            (Variant::GrpcPlain, Variant::Plain),
            (Variant::GrpcFilter, Variant::FilterWarm),
        ] {
            let (mut g, b) = (bootstrap(grpc), bootstrap(base));
            let letter = grpc.letter();
            let cluster = &mut g["static_resources"]["clusters"][0];
            assert_eq!(cluster["name"], "upstream", "({letter})");
            let options = cluster
                .as_object_mut()
                .and_then(|c| c.remove("typed_extension_protocol_options"))
                .unwrap_or_default();
            assert_eq!(
                options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
                    ["explicit_http_config"],
                serde_json::json!({"http2_protocol_options": {}}),
                "({letter}) HTTP/2 only to the upstream"
            );
            if grpc == Variant::GrpcFilter {
                let marker = &mut g["static_resources"]["listeners"][0]["filter_chains"][0]
                    ["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"][0]
                    ["match"]["headers"][0]["string_match"]["exact"];
                assert_eq!(*marker, "h2c", "({letter}) forwarded on the h2c marker");
                *marker = "plain".into();
            }
            g["node"] = b["node"].clone();
            assert_eq!(g, b, "({letter}) is ({}) otherwise", base.letter());
        }
    }

    /// The listeners' HTTP connection managers, in order.
    fn all_hcms(bootstrap: &Value) -> Vec<Value> {
        bootstrap["static_resources"]["listeners"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|l| l["filter_chains"].as_array().cloned().unwrap_or_default())
            .flat_map(|c| c["filters"].as_array().cloned().unwrap_or_default())
            .map(|f| f["typed_config"].clone())
            .collect()
    }

    /// (j) is the shipped forward proxy; (h) is the same without our filter, and the
    /// only other change is that its routes no longer wait for the filter's header:
    /// so the pair measures the filter in a tunnel and nothing else.
    #[test]
    fn the_https_pair_runs_the_shipped_forward_proxy_and_h_differs_only_by_the_filter() {
        let inputs = test_inputs();
        let admin = Path::new("/run/agent-vault-envoy/admin.sock");
        let j = config(Variant::HttpsFilter, 10000, admin, &inputs).expect("(j)");
        let h = config(Variant::HttpsPlain, 10000, admin, &inputs).expect("(h)");
        let rendered = render_forward_proxy(10000, admin, &inputs).expect("rendered");
        assert_eq!(
            j.split_once('\n').map(|(_, rest)| rest),
            Some(rendered.as_str()),
            "(j) is the template rendered, under a comment line"
        );
        let j = yaml(&j);
        let mut h = yaml(&h);
        assert_eq!(
            h["admin"]["address"]["pipe"]["mode"],
            Value::from(0o600),
            "the admin socket's mode, as Envoy reads the template's 0600"
        );
        // The filter is on both of (j)'s listeners and on none of (h)'s; the other
        // filters are the same, in the same order.
        let names = |hcm: &Value| -> Vec<String> {
            hcm["http_filters"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|f| f["name"].as_str().map(str::to_string))
                .collect()
        };
        let (j_hcms, h_hcms) = (all_hcms(&j), all_hcms(&h));
        assert_eq!(
            j_hcms.len(),
            3,
            "the agents' listener and the tunnel's two chains (TLS, plain)"
        );
        assert_eq!(h_hcms.len(), 3);
        assert_eq!(
            h_hcms[1], h_hcms[2],
            "the tunnel's chains handle HTTP alike"
        );
        for (jh, hh) in j_hcms.iter().zip(&h_hcms) {
            assert!(names(jh).contains(&"envoy.filters.http.wasm".to_string()));
            let without: Vec<String> = names(jh)
                .into_iter()
                .filter(|n| n != "envoy.filters.http.wasm")
                .collect();
            assert_eq!(names(hh), without);
        }
        // (h)'s forwarding routes: every CONNECT into the decrypting listener, every
        // request to the plain forward proxy; no header condition, nothing else.
        let forwarding = |hcm: &Value| -> Vec<(Value, Value)> {
            routes(hcm)
                .into_iter()
                .filter(|r| r.get("route").is_some())
                .map(|r| (r["match"].clone(), r["route"]["cluster"].clone()))
                .collect()
        };
        assert_eq!(
            forwarding(&h_hcms[0]),
            [
                (
                    serde_json::json!({"connect_matcher": {}}),
                    Value::from("agent_vault_tunnel")
                ),
                (serde_json::json!({"prefix": "/"}), Value::from("dfp_plain")),
            ]
        );
        assert_eq!(
            forwarding(&h_hcms[1]),
            [(serde_json::json!({"prefix": "/"}), Value::from("dfp_plain"))]
        );
        // Everything else is (j)'s: put (j)'s filters and routes into (h) and compare.
        // (listener, filter chain) of each connection manager, in all_hcms' order.
        let places = [(0, 0), (1, 0), (1, 1)];
        for (jh, (listener, chain)) in j_hcms.iter().zip(places) {
            let hcm = &mut h["static_resources"]["listeners"][listener]["filter_chains"][chain]
                ["filters"][0]["typed_config"];
            assert!(hcm.get("access_log").is_none(), "(h) logs nothing");
            hcm["http_filters"] = jh["http_filters"].clone();
            hcm["route_config"] = jh["route_config"].clone();
        }
        h["admin"] = j["admin"].clone();
        assert_eq!(h, j);
    }
}
