//! The deployment configs under `envoy/`: every Envoy bootstrap template renders and
//! passes `envoy --mode validate` with the real filter, keeps the fail-closed routing
//! shape the filter relies on, and the Istio examples parse with the expected kinds and
//! pin the module by sha256. `envoy/compose/envoy.yaml` is not a template but the
//! forward proxy rendered for the Envoy container: `deployment.rs` checks it (in sync
//! with the template, validated with the paths docker-compose.yml mounts, and run).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

use agent_vault_testkit::control_plane::files_under;
use agent_vault_testkit::envoy::{
    envoy_dir, filter_wasm, placeholders, render, validate, workspace_root,
};
use agent_vault_testkit::upstream::TestCa;

/// Every `.yaml` under `envoy/`, recursively, sorted.
fn yaml_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = files_under(&envoy_dir())
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    files
}

/// A Kubernetes resource file (Istio) rather than an Envoy bootstrap.
fn is_kubernetes(text: &str) -> bool {
    text.lines().any(|l| l.starts_with("apiVersion:"))
}

fn bootstrap_templates() -> Vec<PathBuf> {
    let rendered = envoy_dir().join("compose");
    let files: Vec<PathBuf> = yaml_files()
        .into_iter()
        .filter(|p| !p.starts_with(&rendered))
        .filter(|p| !is_kubernetes(&std::fs::read_to_string(p).unwrap()))
        .collect();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for expected in ["forward-proxy.yaml", "sidecar.yaml"] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} in {names:?}"
        );
    }
    files
}

/// Placeholder values for validation: real files where Envoy reads them (the filter,
/// a CA bundle), a socket path that need not exist.
struct Dummy {
    dir: tempfile::TempDir,
    vars: Vec<(String, String)>,
}

fn dummy_vars() -> Dummy {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("validate").write_pem(&dir.path().join("ca.pem"));
    let vars = [
        ("LISTEN_ADDRESS", "127.0.0.1".to_string()),
        ("LISTEN_PORT", "10000".to_string()),
        (
            "ADMIN_SOCKET",
            dir.path().join("admin.sock").display().to_string(),
        ),
        (
            "ALLOWED_PRIVATE_UPSTREAMS",
            xtask::allowed_upstreams(&["127.0.0.1/32:18080", "[fd00::/8]:*"]).unwrap(),
        ),
        (
            "SOCKET_PATH",
            dir.path().join("no-such.sock").display().to_string(),
        ),
        (
            "SDS_SOCKET",
            dir.path().join("no-such-sds.sock").display().to_string(),
        ),
        ("WASM_PATH", filter_wasm().display().to_string()),
        ("CA_BUNDLE", ca.display().to_string()),
        ("SNAPSHOT_POLL_MS", "1000".to_string()),
        ("CREDENTIAL_CACHE_TTL_MS", "60000".to_string()),
        ("CALLOUT_TIMEOUT_MS", "2000".to_string()),
        ("UPSTREAM_HOST", "api.example.com".to_string()),
        ("UPSTREAM_PORT", "443".to_string()),
    ]
    .into_iter()
    .map(|(n, v)| (n.to_string(), v))
    .collect();
    Dummy { dir, vars }
}

fn with_var(vars: &[(String, String)], name: &str, value: &str) -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = vars.iter().filter(|(n, _)| n != name).cloned().collect();
    vars.push((name.to_string(), value.to_string()));
    vars
}

fn render_to(dir: &Path, template: &Path, vars: &[(String, String)]) -> PathBuf {
    let text = std::fs::read_to_string(template).unwrap();
    let out = dir.join(template.file_name().unwrap());
    std::fs::write(&out, render(&text, vars)).unwrap();
    out
}

#[test]
fn every_envoy_bootstrap_passes_envoy_validate_with_the_real_filter() {
    let dummy = dummy_vars();
    for template in bootstrap_templates() {
        let text = std::fs::read_to_string(&template).unwrap();
        let unknown: Vec<&str> = placeholders(&text)
            .into_iter()
            .filter(|name| !dummy.vars.iter().any(|(n, _)| n == name))
            .collect();
        assert!(
            unknown.is_empty(),
            "{}: placeholders this test does not know (add them to dummy_vars and the README): {unknown:?}",
            template.display()
        );
        let rendered = render_to(dummy.dir.path(), &template, &dummy.vars);
        let rendered_text = std::fs::read_to_string(&rendered).unwrap();
        assert!(
            !rendered_text.contains("${"),
            "{}: something like a placeholder the renderer does not fill (names are [A-Z0-9_]+)",
            template.display()
        );
        let (ok, output) = validate(&rendered);
        assert!(ok, "{} fails validation:\n{output}", template.display());
        assert!(output.contains("OK"), "{output}");
    }
}

#[test]
fn validation_is_not_vacuous_it_loads_the_filter_and_the_ca_bundle() {
    let dummy = dummy_vars();
    let template = envoy_dir().join("forward-proxy.yaml");
    let cases = [
        (
            "WASM_PATH",
            "/nonexistent/agent_vault_filter.wasm",
            "wasm file missing",
        ),
        ("CA_BUNDLE", "/nonexistent/ca.pem", "CA bundle missing"),
        // The filter's on_configure runs in validate mode: a plugin configuration it
        // cannot parse stops Envoy from loading (fail closed at load time).
        (
            "CALLOUT_TIMEOUT_MS",
            "\"soon\"",
            "invalid plugin configuration",
        ),
    ];
    for (name, value, what) in cases {
        let dir = tempfile::tempdir().unwrap();
        let rendered = render_to(dir.path(), &template, &with_var(&dummy.vars, name, value));
        let (ok, output) = validate(&rendered);
        assert!(!ok, "{what}: validation should fail, got:\n{output}");
    }
}

#[test]
fn the_readme_one_liner_renders_exactly_like_the_renderer_dev_and_the_tests_use() {
    let dummy = dummy_vars();
    let script = r#"import os,re,sys; sys.stdout.write(re.sub(r"\$\{([A-Z0-9_]+)\}", lambda m: os.environ[m.group(1)], open(sys.argv[1]).read()))"#;
    let readme = std::fs::read_to_string(envoy_dir().join("README.md")).unwrap();
    assert!(
        readme.contains(script),
        "envoy/README.md shows the renderer this test runs"
    );
    for template in bootstrap_templates() {
        let out = Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(&template)
            .envs(dummy.vars.iter().map(|(n, v)| (n.as_str(), v.as_str())))
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(&template).unwrap();
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            render(&text, &dummy.vars),
            "{}",
            template.display()
        );
    }
}

fn yaml_to_json(text: &str) -> Value {
    let value: serde_yaml::Value = serde_yaml::from_str(text).expect("YAML");
    serde_json::to_value(value).expect("YAML as JSON")
}

/// Every HTTP connection manager of a bootstrap: the agents' listener's first, then
/// the decrypting internal listener's, if any.
fn hcms(bootstrap: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    for listener in bootstrap["static_resources"]["listeners"]
        .as_array()
        .unwrap()
    {
        for chain in listener["filter_chains"].as_array().unwrap() {
            for filter in chain["filters"].as_array().unwrap() {
                if filter["name"] == "envoy.filters.network.http_connection_manager" {
                    out.push(filter["typed_config"].clone());
                }
            }
        }
    }
    out
}

fn cluster<'a>(bootstrap: &'a Value, name: &str) -> &'a Value {
    bootstrap["static_resources"]["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("cluster {name}"))
}

fn has_tls(cluster: &Value) -> bool {
    cluster["transport_socket"]["name"] == "envoy.transport_sockets.tls"
}

/// The shape the filter contract relies on, checked on every bootstrap: the filter is
/// first and fail-closed, its config holds no secret, the control plane is a pipe, and
/// no route forwards a request that lacks the filter's routing header.
#[test]
fn every_bootstrap_routes_only_what_the_filter_let_through() {
    let dummy = dummy_vars();
    for template in bootstrap_templates() {
        let name = template.display().to_string();
        let text = render(&std::fs::read_to_string(&template).unwrap(), &dummy.vars);
        let bootstrap = yaml_to_json(&text);
        // Not on TCP, where any local process (agents included) could turn on debug
        // logging and read injected credentials from the log.
        assert!(
            bootstrap["admin"]["address"]["socket_address"].is_null()
                && bootstrap["admin"]["address"]["pipe"]["path"].is_string(),
            "{name}: admin on a Unix socket: {}",
            bootstrap["admin"]
        );
        assert!(
            text.contains("pipe: {path: ") && text.contains(", mode: 0600}"),
            "{name}: the admin socket is 0600"
        );
        let cp = cluster(&bootstrap, "agent_vault_control_plane");
        assert_eq!(cp["type"], "STATIC", "{name}");
        let endpoint = &cp["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"];
        assert!(
            endpoint["address"]["pipe"]["path"].is_string(),
            "{name}: control plane on a pipe"
        );

        let hcms = hcms(&bootstrap);
        assert!(!hcms.is_empty(), "{name}");
        for hcm in hcms {
            // CONNECT reaches the filter.
            assert!(
                hcm["upgrade_configs"]
                    .as_array()
                    .is_some_and(|u| u.iter().any(|c| c["upgrade_type"] == "CONNECT")),
                "{name}: upgrade_configs CONNECT"
            );
            // An agent cannot supply the routing header.
            let early = hcm["early_header_mutation_extensions"].to_string();
            assert!(
                early.contains("\"remove\":\"x-agent-vault-upstream\""),
                "{name}: {early}"
            );

            let filters = hcm["http_filters"].as_array().unwrap();
            let wasm = &filters[0];
            assert_eq!(
                wasm["name"], "envoy.filters.http.wasm",
                "{name}: filter first"
            );
            assert_eq!(
                filters.last().unwrap()["name"],
                "envoy.filters.http.router",
                "{name}"
            );
            let config = &wasm["typed_config"]["config"];
            assert_eq!(config["vm_config"]["runtime"], "envoy.wasm.runtime.v8");
            assert!(config["vm_config"]["code"]["local"]["filename"].is_string());
            assert_eq!(config["fail_open"], false, "{name}: fail closed");
            assert_eq!(
                config["configuration"]["@type"],
                "type.googleapis.com/google.protobuf.StringValue"
            );
            let plugin: Value =
                serde_json::from_str(config["configuration"]["value"].as_str().unwrap())
                    .expect("plugin configuration is JSON");
            // The decrypting listener's instance runs in tunnel mode; the agents'
            // listener's in the default (proxy) mode.
            let decrypting = hcm["stat_prefix"] == "agent_vault_tunnel";
            let mut expected = json!({"cluster": "agent_vault_control_plane",
                "authority": "agent-vault", "snapshot_poll_ms": 1000,
                "credential_cache_ttl_ms": 60000, "callout_timeout_ms": 2000});
            if decrypting {
                expected["mode"] = json!("tunnel");
            }
            assert_eq!(
                plugin, expected,
                "{name}: exactly the documented keys, no secrets"
            );
            // The filter posts its request log (the default): Envoy's access log,
            // which measured dearer (BENCHMARKS.md), is the operator's choice.
            assert!(hcm.get("access_log").is_none(), "{name}: no access log");
            assert!(
                early.contains("\"remove\":\"x-agent-vault-tunnel\"")
                    || !text.contains("x-agent-vault-tunnel"),
                "{name}: an agent cannot supply the tunnel identity: {early}"
            );

            let routes = &hcm["route_config"];
            assert!(
                routes["request_headers_to_remove"]
                    .as_array()
                    .is_some_and(|h| h.iter().any(|h| h == "x-agent-vault-upstream")),
                "{name}: the routing header never goes upstream"
            );
            let mut forwarding = 0;
            let mut connect_backstop = false;
            for vhost in routes["virtual_hosts"].as_array().unwrap() {
                for route in vhost["routes"].as_array().unwrap() {
                    let m = &route["match"];
                    if m.get("connect_matcher").is_some() {
                        let Some(target) = route["route"]["cluster"].as_str() else {
                            assert!(route.get("direct_response").is_some(), "{name}");
                            // The last CONNECT route fails closed.
                            connect_backstop = m.get("headers").is_none();
                            continue;
                        };
                        // A CONNECT is tunnelled only when the filter said so: into
                        // the decrypting internal listener, or untouched (the
                        // passthrough policy) through the destination check.
                        let value = m["headers"]
                            .as_array()
                            .and_then(|hs| {
                                hs.iter().find(|h| h["name"] == "x-agent-vault-upstream")
                            })
                            .and_then(|h| h["string_match"]["exact"].as_str());
                        assert!(!decrypting, "{name}: no tunnel inside a tunnel");
                        let checked =
                            route["typed_per_filter_config"]["envoy.filters.http.rbac"].is_null();
                        match value {
                            Some("tunnel") => {
                                assert_eq!(target, "agent_vault_tunnel", "{name}");
                                let internal = &cluster(&bootstrap, target)["load_assignment"]
                                    ["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"];
                                assert_eq!(
                                    internal["envoy_internal_address"]["server_listener_name"],
                                    "agent_vault_tunnel",
                                    "{name}"
                                );
                            }
                            Some("opaque") => {
                                assert_eq!(target, "dfp_opaque", "{name}");
                                assert!(!has_tls(cluster(&bootstrap, target)), "{name}");
                                assert!(
                                    checked,
                                    "{name}: an untouched tunnel's destination is checked"
                                );
                            }
                            other => panic!("{name}: CONNECT to {target} on {other:?}"),
                        }
                        continue;
                    }
                    let Some(target) = route["route"]["cluster"].as_str() else {
                        assert!(route.get("direct_response").is_some(), "{name}: {route}");
                        continue;
                    };
                    forwarding += 1;
                    let value = m["headers"]
                        .as_array()
                        .and_then(|hs| hs.iter().find(|h| h["name"] == "x-agent-vault-upstream"))
                        .and_then(|h| h["string_match"]["exact"].as_str())
                        .unwrap_or_else(|| {
                            panic!("{name}: route to {target} without the filter's header")
                        });
                    let tls = has_tls(cluster(&bootstrap, target));
                    assert_eq!(
                        tls,
                        value == "tls",
                        "{name}: x-agent-vault-upstream: {value} routes to {target}"
                    );
                    if tls {
                        let tls_config = &cluster(&bootstrap, target)["transport_socket"]
                            ["typed_config"]["common_tls_context"]["validation_context"];
                        assert!(
                            tls_config["trusted_ca"]["filename"].is_string(),
                            "{name}: {target} verifies certificates"
                        );
                    }
                }
            }
            assert!(forwarding > 0, "{name}");
            assert!(connect_backstop, "{name}: a connect_matcher route");
        }
    }
}

#[test]
fn the_forward_proxy_uses_the_dynamic_forward_proxy_with_sni_and_san_checks() {
    let dummy = dummy_vars();
    let text = render(
        &std::fs::read_to_string(envoy_dir().join("forward-proxy.yaml")).unwrap(),
        &dummy.vars,
    );
    let bootstrap = yaml_to_json(&text);
    let listener = &bootstrap["static_resources"]["listeners"][0];
    assert_eq!(
        listener["address"]["socket_address"]["address"],
        "127.0.0.1"
    );
    let hcm = &hcms(&bootstrap)[0];
    let filters: Vec<&str> = hcm["http_filters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    // The destination check (RBAC) runs on the address the forward proxy resolved.
    assert_eq!(
        filters,
        [
            "envoy.filters.http.wasm",
            "envoy.filters.http.set_filter_state",
            "envoy.filters.http.dynamic_forward_proxy",
            "envoy.filters.http.rbac",
            "envoy.filters.http.router"
        ]
    );
    assert_eq!(
        hcm["http_filters"][2]["typed_config"]["save_upstream_address"],
        true
    );
    let dns = &hcm["http_filters"][2]["typed_config"]["dns_cache_config"];
    assert_eq!(dns["dns_lookup_family"], "V4_ONLY");
    for name in ["dfp_tls", "dfp_plain"] {
        let c = cluster(&bootstrap, name);
        assert_eq!(c["lb_policy"], "CLUSTER_PROVIDED");
        assert_eq!(
            c["cluster_type"]["name"],
            "envoy.clusters.dynamic_forward_proxy"
        );
        assert_eq!(
            c["cluster_type"]["typed_config"]["dns_cache_config"], *dns,
            "{name} shares the filter's DNS cache"
        );
    }
    let tls = cluster(&bootstrap, "dfp_tls");
    let options = &tls["typed_extension_protocol_options"]
        ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        ["upstream_http_protocol_options"];
    assert_eq!(options["auto_sni"], true);
    assert_eq!(options["auto_san_validation"], true);
    assert!(has_tls(tls));
    assert!(!has_tls(cluster(&bootstrap, "dfp_plain")));
}

/// HTTPS agents (DESIGN.md §3): the shape the filter's tunnel mode relies on. The
/// identity header becomes filter state shared with the upstream connection; the
/// tunnel goes only into the internal listener, which reads the SNI, terminates TLS
/// with the control plane's on-demand certificates, and runs the same filter in tunnel
/// mode, then the forward proxy, the destination check and the router, as outside.
#[test]
fn the_forward_proxy_decrypts_tunnels_with_on_demand_certificates_and_the_identity_proven_on_connect(
) {
    let dummy = dummy_vars();
    let text = render(
        &std::fs::read_to_string(envoy_dir().join("forward-proxy.yaml")).unwrap(),
        &dummy.vars,
    );
    let bootstrap = yaml_to_json(&text);
    assert_eq!(
        bootstrap["bootstrap_extensions"][0]["name"],
        "envoy.bootstrap.internal_listener"
    );
    let hcms = hcms(&bootstrap);
    assert_eq!(
        hcms.len(),
        3,
        "the agents' listener and the decrypting one's two chains"
    );
    let (outer, inner) = (&hcms[0], &hcms[1]);
    // Plain HTTP inside a CONNECT: the same HTTP handling, filter included.
    assert_eq!(
        hcms[2], *inner,
        "the plain tunnel chain handles HTTP as the TLS one"
    );

    let set_state = outer["http_filters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "envoy.filters.http.set_filter_state")
        .expect("set_filter_state on the agents' listener");
    let state = &set_state["typed_config"]["on_request_headers"][0];
    assert_eq!(state["object_key"], "agent_vault.tunnel");
    assert_eq!(state["shared_with_upstream"], "ONCE");
    assert_eq!(
        state["format_string"]["text_format_source"]["inline_string"],
        "%REQ(x-agent-vault-tunnel)%"
    );
    assert_eq!(state["skip_if_empty"], true);
    assert_eq!(
        outer["http_protocol_options"]["accept_http_10"], true,
        "Python's CONNECT is HTTP/1.0"
    );

    let listener = bootstrap["static_resources"]["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "agent_vault_tunnel")
        .expect("the decrypting listener");
    assert!(listener["internal_listener"].is_object(), "no socket");
    assert!(listener.get("address").is_none());
    assert_eq!(
        listener["listener_filters"][0]["name"], "envoy.filters.listener.tls_inspector",
        "the SNI reaches the filter"
    );
    let chains = listener["filter_chains"].as_array().unwrap();
    assert_eq!(chains[0]["filter_chain_match"]["transport_protocol"], "tls");
    assert!(
        chains[1].get("filter_chain_match").is_none()
            && chains[1].get("transport_socket").is_none(),
        "the other chain takes what is not TLS, undecrypted"
    );
    let tls = &listener["filter_chains"][0]["transport_socket"]["typed_config"];
    assert_eq!(tls["disable_stateless_session_resumption"], true);
    assert_eq!(tls["disable_stateful_session_resumption"], true);
    let common = &tls["common_tls_context"];
    assert_eq!(common["alpn_protocols"], json!(["h2", "http/1.1"]));
    assert!(
        common.get("tls_certificates").is_none(),
        "no static certificate"
    );
    let selector = &common["custom_tls_certificate_selector"];
    assert_eq!(
        selector["name"],
        "envoy.tls.certificate_selectors.on_demand_secret"
    );
    let selector = &selector["typed_config"];
    assert_eq!(
        selector["certificate_mapper"]["name"],
        "envoy.tls.certificate_mappers.sni"
    );
    let source = &selector["config_source"]["api_config_source"];
    assert_eq!(source["api_type"], "DELTA_GRPC");
    assert_eq!(
        source["grpc_services"][0]["envoy_grpc"]["cluster_name"],
        "agent_vault_sds"
    );
    let sds = cluster(&bootstrap, "agent_vault_sds");
    assert_eq!(
        sds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["pipe"]
            ["path"],
        dummy
            .vars
            .iter()
            .find(|(n, _)| n == "SDS_SOCKET")
            .unwrap()
            .1
            .as_str(),
        "SDS on the control plane's Unix socket, never TCP"
    );
    assert!(
        sds["typed_extension_protocol_options"]
            ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"]
            ["http2_protocol_options"]
            .is_object(),
        "gRPC needs HTTP/2"
    );
    let tunnel = cluster(&bootstrap, "agent_vault_tunnel");
    assert_eq!(
        tunnel["transport_socket"]["name"],
        "envoy.transport_sockets.internal_upstream"
    );

    let inner_filters: Vec<&str> = inner["http_filters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        inner_filters,
        [
            "envoy.filters.http.wasm",
            "envoy.filters.http.dynamic_forward_proxy",
            "envoy.filters.http.rbac",
            "envoy.filters.http.router"
        ]
    );
    assert_eq!(
        inner["http_filters"][0]["typed_config"]["config"]["vm_config"],
        outer["http_filters"][0]["typed_config"]["config"]["vm_config"],
        "the same VM"
    );
    // The same forward proxy (one DNS cache) and the same destination check.
    assert_eq!(inner["http_filters"][1], outer["http_filters"][2]);
    assert_eq!(inner["http_filters"][2], outer["http_filters"][3]);
    assert_eq!(inner["local_reply_config"], outer["local_reply_config"]);
    assert_eq!(
        inner["early_header_mutation_extensions"],
        outer["early_header_mutation_extensions"]
    );
}

/// The destination check (DESIGN.md §11.9): an RBAC filter after the forward proxy's
/// DNS lookup, allowing only public addresses and the operator's exceptions, whose
/// refusal is the JSON of `rules/src/reply.rs` (`destination_forbidden`).
#[test]
fn the_forward_proxy_refuses_every_private_range_on_the_resolved_address_with_the_contracts_json() {
    use agent_vault_rules::reply;
    let dummy = dummy_vars();
    let text = render(
        &std::fs::read_to_string(envoy_dir().join("forward-proxy.yaml")).unwrap(),
        &with_var(&dummy.vars, "ALLOWED_PRIVATE_UPSTREAMS", ""),
    );
    let bootstrap = yaml_to_json(&text);
    let hcm = &hcms(&bootstrap)[0];
    let rbac = hcm["http_filters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "envoy.filters.http.rbac")
        .expect("the RBAC filter");
    let rules = &rbac["typed_config"]["rules"];
    assert_eq!(
        rules["action"], "ALLOW",
        "an unknown address is refused too"
    );
    let public = rules["policies"]["public-addresses"].to_string();
    for (prefix, len) in [
        ("0.0.0.0", 8),
        ("10.0.0.0", 8),
        ("100.64.0.0", 10),
        ("127.0.0.0", 8),
        ("169.254.0.0", 16),
        ("172.16.0.0", 12),
        ("192.168.0.0", 16),
        ("::", 96),
        ("::ffff:0:0", 96),
        ("fc00::", 7),
        ("fe80::", 10),
    ] {
        assert!(
            public.contains(&format!(
                "\"upstream_ip\":{{\"address_prefix\":\"{prefix}\",\"prefix_len\":{len}}}"
            )),
            "{prefix}/{len} is refused: {public}"
        );
    }
    // With no exception, the second policy matches nothing.
    assert_eq!(
        rules["policies"]["allowed-private-upstreams"]["permissions"],
        json!([{"not_rule": {"any": true}}])
    );
    // Not on the fail-closed direct responses: they connect to nothing.
    for vhost in hcm["route_config"]["virtual_hosts"].as_array().unwrap() {
        for route in vhost["routes"].as_array().unwrap() {
            let per_route = &route["typed_per_filter_config"]["envoy.filters.http.rbac"];
            // ...nor on the tunnel into the decrypting listener: its requests are
            // checked inside, each on the address it resolves to.
            let into_the_decrypting_listener = route["route"]["cluster"] == "agent_vault_tunnel";
            assert_eq!(
                per_route.is_object(),
                route.get("direct_response").is_some() || into_the_decrypting_listener,
                "{route}"
            );
        }
    }
    let mapper = &hcm["local_reply_config"]["mappers"][0];
    assert_eq!(mapper["status_code"], 403);
    let body = &mapper["body_format_override"]["json_format"];
    let refused = reply::destination_forbidden();
    assert_eq!(body["error"], refused.code.as_str());
    assert_eq!(body["message"], reply::DESTINATION_FORBIDDEN_MESSAGE);
    assert_eq!(
        mapper["body_format_override"]["content_type"],
        "application/json"
    );
    let headers = mapper["headers_to_add"].to_string();
    assert!(headers.contains(reply::ERROR_HEADER), "{headers}");
}

/// Every YAML document in `path`, as JSON.
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            let value = <serde_yaml::Value as serde::Deserialize>::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            serde_json::to_value(value).unwrap()
        })
        .collect()
}

#[test]
fn the_istio_examples_parse_with_the_expected_kinds() {
    let istio = envoy_dir().join("istio");
    let plugin_docs = documents(&istio.join("wasmplugin.yaml"));
    assert_eq!(plugin_docs.len(), 1);
    let plugin = &plugin_docs[0];
    assert_eq!(plugin["apiVersion"], "extensions.istio.io/v1alpha1");
    assert_eq!(plugin["kind"], "WasmPlugin");
    assert_eq!(plugin["spec"]["failStrategy"], "FAIL_CLOSE");
    assert_eq!(plugin["spec"]["type"], "HTTP");
    // A template: `./dev istio-wasmplugin` fills in the module and its sha256.
    assert_eq!(plugin["spec"]["url"], "${WASM_URL}");
    assert_eq!(plugin["spec"]["sha256"], "${WASM_SHA256}");
    assert_eq!(
        plugin["spec"]["pluginConfig"],
        json!({"cluster": "agent_vault_control_plane", "authority": "agent-vault",
               "snapshot_poll_ms": 1000, "credential_cache_ttl_ms": 60000,
               "callout_timeout_ms": 2000})
    );

    let docs = documents(&istio.join("serviceentry.yaml"));
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    for kind in [
        "ServiceEntry",
        "Gateway",
        "VirtualService",
        "DestinationRule",
        "EnvoyFilter",
    ] {
        assert!(kinds.contains(&kind), "{kind} in {kinds:?}");
    }
    for doc in &docs {
        assert!(doc["apiVersion"].as_str().unwrap().contains("istio.io"));
        assert!(doc["metadata"]["name"].is_string());
    }
    let virtual_service = docs.iter().find(|d| d["kind"] == "VirtualService").unwrap();
    assert!(
        virtual_service
            .to_string()
            .contains("x-agent-vault-upstream"),
        "the VirtualService removes the filter's routing header"
    );
}

/// The cluster the Istio EnvoyFilter adds is a valid Envoy cluster: load it into a
/// minimal bootstrap and validate it.
#[test]
fn the_istio_envoyfilter_cluster_is_valid_envoy_config() {
    let docs = documents(&envoy_dir().join("istio").join("serviceentry.yaml"));
    let filter = docs.iter().find(|d| d["kind"] == "EnvoyFilter").unwrap();
    let patch = filter["spec"]["configPatches"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["applyTo"] == "CLUSTER")
        .expect("a CLUSTER patch");
    assert_eq!(patch["patch"]["operation"], "ADD");
    let cluster = patch["patch"]["value"].clone();
    assert_eq!(cluster["name"], "agent_vault_control_plane");
    let bootstrap = json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"clusters": [cluster]},
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("envoyfilter-cluster.json");
    std::fs::write(&path, bootstrap.to_string()).unwrap();
    let (ok, output) = validate(&path);
    assert!(ok, "{output}");
}

/// `./dev istio-wasmplugin URL [FILE|SHA256]`: the stdout of the task runner.
fn dev_istio_wasmplugin(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(workspace_root().join("dev"))
        .arg("istio-wasmplugin")
        .args(args)
        .output()
        .expect("run ./dev istio-wasmplugin");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn sha256_hex(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// The WasmPlugin operators apply pins the module: an http(s) URL with the sha256 of the
/// .wasm (by default the filter built here, or a given file), or an OCI image with its
/// digest. Istio refuses a module that does not match, and fails closed.
#[test]
fn the_istio_wasmplugin_pins_the_module_by_sha256() {
    let wasm = filter_wasm();
    let url = "https://downloads.example.com/agent-vault/0.1.0/agent_vault_filter.wasm";
    let wasm_arg = wasm.display().to_string();
    for args in [vec![url], vec![url, wasm_arg.as_str()]] {
        let (ok, stdout, stderr) = dev_istio_wasmplugin(&args);
        assert!(ok, "{stderr}");
        let plugin = yaml_to_json(&stdout);
        assert_eq!(plugin["kind"], "WasmPlugin");
        assert_eq!(plugin["spec"]["url"], url);
        assert_eq!(plugin["spec"]["sha256"], sha256_hex(&wasm), "{stdout}");
        assert_eq!(plugin["spec"]["failStrategy"], "FAIL_CLOSE");
        assert!(!stdout.contains("${"), "every placeholder filled: {stdout}");
    }

    let digest = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let oci = "oci://registry.example.com/agent-vault/filter:0.1.0";
    for given in [digest.to_string(), format!("sha256:{digest}")] {
        let (ok, stdout, stderr) = dev_istio_wasmplugin(&[oci, &given]);
        assert!(ok, "{stderr}");
        let plugin = yaml_to_json(&stdout);
        assert_eq!(plugin["spec"]["url"], oci);
        assert_eq!(plugin["spec"]["sha256"], digest, "hex digest, no prefix");
    }

    let (ok, _, stderr) = dev_istio_wasmplugin(&[url, "/nonexistent/agent_vault_filter.wasm"]);
    assert!(!ok, "a missing module is an error");
    assert!(stderr.contains("not found"), "{stderr}");
    let (ok, _, stderr) = dev_istio_wasmplugin(&[]);
    assert!(!ok && stderr.contains("usage"), "{stderr}");
}

/// The TLS-origination pair: the ServiceEntry declares the API's plain port (what agents
/// call, routed to the gateway) and its TLS port; the DestinationRule originates TLS on
/// exactly that TLS port with SNI and a name check; the gateway's route goes there.
#[test]
fn the_istio_serviceentry_and_destinationrule_originate_tls_together() {
    let docs = documents(&envoy_dir().join("istio").join("serviceentry.yaml"));
    let of_kind =
        |kind: &str| -> Vec<&Value> { docs.iter().filter(|d| d["kind"] == kind).collect() };
    let entries = of_kind("ServiceEntry");
    let rules = of_kind("DestinationRule");
    assert_eq!(entries.len(), 1);
    let entry = entries[0];
    assert_eq!(entry["spec"]["location"], "MESH_EXTERNAL");
    assert_eq!(entry["spec"]["resolution"], "DNS");
    let host = entry["spec"]["hosts"][0].as_str().unwrap();
    let ports = entry["spec"]["ports"].as_array().unwrap();
    let port = |protocol: &str| {
        ports
            .iter()
            .find(|p| p["protocol"] == protocol)
            .unwrap_or_else(|| panic!("a {protocol} port in {ports:?}"))
    };
    let (plain, tls) = (port("HTTP"), port("HTTPS"));
    assert!(
        plain.get("targetPort").is_none(),
        "the plain port is only routed to the gateway, never dialled as another port"
    );
    let tls_port = tls["number"].as_u64().unwrap();

    let rule = rules
        .iter()
        .find(|r| r["spec"]["host"] == host)
        .unwrap_or_else(|| panic!("a DestinationRule for {host}"));
    let settings = rule["spec"]["trafficPolicy"]["portLevelSettings"]
        .as_array()
        .unwrap();
    assert_eq!(settings.len(), 1, "TLS on one port only: {settings:?}");
    assert_eq!(settings[0]["port"]["number"].as_u64(), Some(tls_port));
    let tls_settings = &settings[0]["tls"];
    assert_eq!(
        tls_settings["mode"], "SIMPLE",
        "TLS originated, no client cert"
    );
    assert_eq!(tls_settings["sni"], host);
    assert_eq!(tls_settings["subjectAltNames"], json!([host]));

    // The gateway's route (after the filter) goes to the TLS port; the sidecars' route
    // goes to the gateway.
    let virtual_service = of_kind("VirtualService")[0];
    let routes = virtual_service["spec"]["http"].as_array().unwrap();
    let to_api: Vec<u64> = routes
        .iter()
        .flat_map(|r| r["route"].as_array().unwrap().iter())
        .filter(|d| d["destination"]["host"] == host)
        .map(|d| d["destination"]["port"]["number"].as_u64().unwrap())
        .collect();
    assert_eq!(to_api, [tls_port]);
    let gateway = of_kind("Gateway")[0];
    assert!(gateway["spec"]["servers"][0]["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|h| h == host));
}
