//! The vaults the benchmark runs against.
//!
//! Small (10 services × 10 agents): `bench` (the load's service: `localhost:<upstream>`,
//! plain HTTP, bearer `BENCH_TOKEN`; for the gRPC pair's (l), plain HTTP/2:
//! `upstream_h2c`), `probe` (`127.0.0.1:<upstream>`, bearer
//! `PROBE_KEY`, for the credential-delete propagation probe), 8 more; agents
//! `bench-0` … `bench-8` and `prober`. The HTTPS pair's (h, j) adds `new-hosts`, the
//! wildcard `*.bench.test`, so that the control plane mints a certificate for any name
//! under it: the first handshakes to new hosts. `.test` is reserved (RFC 6761) and never
//! resolves; nothing connects to those names.
//!
//! Big (10k services × 1k agents), seeded fast: the 10k services in one
//! `PUT /v1/vaults/default/services` (a mix of exact hosts, wildcards, ports, path
//! prefixes and auth types, all on `BENCH_TOKEN`), then 1k agents.

use serde_json::{json, Value};

use crate::controlplane::ControlPlane;

/// What a seeded control plane holds that the benchmark needs.
pub struct Seeded {
    /// `bench-0`'s token: the load's agent.
    pub agent_token: String,
    /// `prober`'s token (small only).
    pub prober_token: Option<String>,
    pub services: usize,
    pub agents: usize,
}

pub const LOAD_KEY: &str = "BENCH_TOKEN";
/// The parent of the HTTPS pair's wildcard service.
pub const NEW_HOSTS_DOMAIN: &str = "bench.test";
pub const PROBE_KEY: &str = "PROBE_KEY";

fn service(name: &str, host: &str, key: &str) -> Value {
    json!({"name": name, "host": host, "auth": {"type": "bearer", "token": key}, "upstream_tls": false})
}

/// A filler service `i`: compact, so 10k of them fit in one request (≤ 1 MiB).
fn filler(i: usize) -> Value {
    let name = format!("s{i}");
    let key = LOAD_KEY;
    match i % 10 {
        0 => {
            json!({"name": name, "host": format!("*.w{i}.example.com"), "auth": {"type": "bearer", "token": key}})
        }
        1 => {
            json!({"name": name, "host": format!("p{i}.example.com/v1/*"), "auth": {"type": "api-key", "key": key}})
        }
        2 => {
            json!({"name": name, "host": format!("h{i}.example.com:8443"), "auth": {"type": "basic", "username": key, "password": key}})
        }
        3 => {
            json!({"name": name, "host": format!("c{i}.example.com"), "auth": {"type": "custom", "headers": {"x-t": format!("t {{{{ {key} }}}}")}}})
        }
        _ => {
            json!({"name": name, "host": format!("h{i}.example.com"), "auth": {"type": "bearer", "token": key}})
        }
    }
}

pub fn small(cp: &ControlPlane, upstream_port: u16, secret: &str) -> Result<Seeded, String> {
    let bench = service("bench", &format!("localhost:{upstream_port}"), LOAD_KEY);
    small_with(cp, upstream_port, secret, bench, Vec::new())
}

/// [`small`] with the load's service an h2c upstream (`upstream_h2c`): the gRPC calls'.
pub fn grpc(cp: &ControlPlane, upstream_port: u16, secret: &str) -> Result<Seeded, String> {
    let mut bench = service("bench", &format!("localhost:{upstream_port}"), LOAD_KEY);
    bench["upstream_h2c"] = true.into();
    small_with(cp, upstream_port, secret, bench, Vec::new())
}

/// [`small`] and the wildcard service of the first handshakes.
pub fn https(cp: &ControlPlane, upstream_port: u16, secret: &str) -> Result<Seeded, String> {
    let bench = service("bench", &format!("localhost:{upstream_port}"), LOAD_KEY);
    let wildcard = service("new-hosts", &format!("*.{NEW_HOSTS_DOMAIN}"), LOAD_KEY);
    small_with(cp, upstream_port, secret, bench, vec![wildcard])
}

fn small_with(
    cp: &ControlPlane,
    upstream_port: u16,
    secret: &str,
    bench: Value,
    extra: Vec<Value>,
) -> Result<Seeded, String> {
    cp.set_credential(LOAD_KEY, secret)?;
    cp.set_credential(PROBE_KEY, "sk_probe_value")?;
    let mut services = vec![
        bench,
        service("probe", &format!("127.0.0.1:{upstream_port}"), PROBE_KEY),
    ];
    services.extend((2..10).map(filler));
    services.extend(extra);
    cp.replace_services(&services)?;
    let agent_token = cp.create_agent("bench-0")?;
    for i in 1..9 {
        cp.create_agent(&format!("bench-{i}"))?;
    }
    let prober_token = cp.create_agent("prober")?;
    Ok(Seeded {
        agent_token,
        prober_token: Some(prober_token),
        services: services.len(),
        agents: 10,
    })
}

pub fn big(
    cp: &ControlPlane,
    upstream_port: u16,
    secret: &str,
    services: usize,
    agents: usize,
) -> Result<Seeded, String> {
    cp.set_credential(LOAD_KEY, secret)?;
    let mut list = vec![service(
        "bench",
        &format!("localhost:{upstream_port}"),
        LOAD_KEY,
    )];
    list.extend((1..services).map(filler));
    let size = json!({"services": list}).to_string().len();
    if size > 1024 * 1024 {
        return Err(format!(
            "the {services} services are {size} bytes: over the API's 1 MiB body limit"
        ));
    }
    cp.replace_services(&list)?;
    let agent_token = cp.create_agent("bench-0")?;
    // Agents one by one (each is a durable write); a few clients in parallel.
    let per = agents.div_ceil(4);
    std::thread::scope(|scope| -> Result<(), String> {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                scope.spawn(move || -> Result<(), String> {
                    for i in (1 + t * per)..(1 + (t + 1) * per).min(agents) {
                        cp.create_agent(&format!("bench-{i}"))?;
                    }
                    Ok(())
                })
            })
            .collect();
        for handle in handles {
            handle.join().map_err(|_| "seeding thread panicked")??;
        }
        Ok(())
    })?;
    Ok(Seeded {
        agent_token,
        prober_token: None,
        services: list.len(),
        agents,
    })
}
