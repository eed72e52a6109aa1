//! docker-compose.yml's `multinode` profile (two nodes over one PostgreSQL), through the
//! real `docker-compose --profile multinode config`: what the profile adds, that it
//! changes nothing of the single-node services, the isolation of each node's volumes,
//! and the store URL both control planes share, which a real PostgreSQL accepts (its
//! socket dir translated to a test cluster's).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

use super::{compose_config, ComposeConfig, TEST_PASSWORD};

const PROFILE: &str = "multinode";
const NODES: [(&str, &str); 2] = [
    ("control-plane-a", "envoy-a"),
    ("control-plane-b", "envoy-b"),
];

/// The compose model with the profile on, and the default one, of the same copy.
fn configs() -> (ComposeConfig, Value) {
    let mut compose = compose_config();
    let default = compose.json.clone();
    compose.json = super::run_compose_config_profile(compose.dir.path(), Some(PROFILE))
        .unwrap_or_else(|e| {
            panic!("docker-compose --profile {PROFILE} config refused docker-compose.yml:\n{e}")
        });
    (compose, default)
}

fn keys(value: &Value) -> BTreeSet<String> {
    value
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

/// The named volumes a service mounts: source → (target, read-only).
fn named_volumes(service: &Value) -> BTreeMap<String, (String, bool)> {
    service["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["type"] == "volume")
        .map(|v| {
            (
                v["source"].as_str().unwrap().to_string(),
                (
                    v["target"].as_str().unwrap().to_string(),
                    v["read_only"] == true,
                ),
            )
        })
        .collect()
}

/// `-c name=value` of the postgres command.
fn postgres_setting(command: &[Value], name: &str) -> Option<String> {
    command.windows(2).find_map(|pair| {
        (pair[0] == "-c")
            .then(|| pair[1].as_str()?.strip_prefix(&format!("{name}=")))
            .flatten()
            .map(str::to_string)
    })
}

/// A service with the fields a node may change removed, to compare with the
/// single-node one.
fn without(service: &Value, fields: &[&str]) -> Value {
    let mut service = service.clone();
    for field in fields {
        service.as_object_mut().unwrap().remove(*field);
    }
    service
}

#[test]
fn the_multinode_profile_adds_postgresql_and_two_isolated_nodes_and_changes_nothing_else() {
    let (compose, default) = configs();
    let json = &compose.json;

    // Added, and nothing of the single-node deployment changed.
    let services = keys(&json["services"]);
    let single = keys(&default["services"]);
    let added: BTreeSet<String> = services.difference(&single).cloned().collect();
    let want: BTreeSet<String> = ["postgres"]
        .into_iter()
        .chain(NODES.iter().flat_map(|(cp, envoy)| [*cp, *envoy]))
        .map(str::to_string)
        .collect();
    assert_eq!(added, want);
    for name in &single {
        assert_eq!(
            json["services"][name], default["services"][name],
            "the profile leaves {name} as it is"
        );
    }
    for (name, volume) in default["volumes"].as_object().unwrap() {
        assert_eq!(&json["volumes"][name], volume, "{name}");
    }

    // Every added service: only in the profile, loopback ports only, no privilege.
    let mut published = BTreeSet::new();
    for name in &services {
        let service = compose.service(name);
        if added.contains(name) {
            assert_eq!(service["profiles"], json!([PROFILE]), "{name}");
            assert_eq!(service["cap_drop"], json!(["ALL"]), "{name}");
            assert_eq!(
                service["security_opt"],
                json!(["no-new-privileges:true"]),
                "{name}"
            );
            assert!(service.get("privileged").is_none(), "{name}");
            assert!(service.get("network_mode").is_none(), "{name}");
            assert_eq!(service["restart"], "unless-stopped", "{name}");
            assert_eq!(service["healthcheck"]["test"][0], "CMD", "{name}");
            let (uid, _) = compose.user(name);
            assert_ne!(uid, 0, "{name} does not run as root");
        }
        for port in service["ports"].as_array().into_iter().flatten() {
            assert_eq!(port["host_ip"], "127.0.0.1", "{name} publishes {port}");
            let host_port = port["published"].as_str().unwrap().to_string();
            assert!(
                published.insert(host_port.clone()),
                "{name}: host port {host_port} is published twice (with the profile on, \
                 the single-node services run too)"
            );
        }
    }

    // PostgreSQL: on its socket only, in the volume it shares with the control planes.
    let postgres = compose.service("postgres");
    assert!(
        postgres.get("ports").is_none(),
        "the database is not published"
    );
    let command = postgres["command"].as_array().unwrap();
    assert_eq!(command[0], "postgres");
    assert_eq!(
        postgres_setting(command, "listen_addresses").as_deref(),
        Some(""),
        "no TCP listener: {command:?}"
    );
    let socket_dir =
        postgres_setting(command, "unix_socket_directories").expect("the socket dir is set");
    let postgres_volumes = named_volumes(postgres);
    let (socket_volume, _) = postgres_volumes
        .iter()
        .find(|(_, (target, _))| *target == socket_dir)
        .expect("the socket dir is a named volume");
    let probe: Vec<&str> = postgres["healthcheck"]["test"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(probe[1], "pg_isready");
    assert!(
        probe.windows(2).any(|w| w == ["-h", socket_dir.as_str()]),
        "the probe asks the socket: {probe:?}"
    );
    let environment = &postgres["environment"];
    let (db_user, db_name) = (
        environment["POSTGRES_USER"].as_str().unwrap(),
        environment["POSTGRES_DB"].as_str().unwrap(),
    );

    // The control planes: the single-node one's command, image and hardening, each with
    // its own data and socket volumes, one database and one master password.
    let single_cp = compose.service("control-plane");
    let mut stores = BTreeSet::new();
    let mut node_volumes = BTreeSet::new();
    for (cp_name, envoy_name) in NODES {
        let cp = compose.service(cp_name);
        let different = ["profiles", "environment", "ports", "volumes", "depends_on"];
        assert_eq!(
            without(cp, &different),
            without(single_cp, &different),
            "{cp_name} is the single-node control plane on another store"
        );
        assert_eq!(
            cp["depends_on"]["postgres"]["condition"], "service_healthy",
            "{cp_name}"
        );
        let env = &cp["environment"];
        assert_eq!(
            env["AGENT_VAULT_MASTER_PASSWORD"], TEST_PASSWORD,
            "{cp_name}: every node has the master password from .env"
        );
        let store = env["AGENT_VAULT_STORE"].as_str().unwrap();
        stores.insert(store.to_string());
        let public = env["AGENT_VAULT_PUBLIC_URL"].as_str().unwrap();
        assert_eq!(
            public,
            format!(
                "http://127.0.0.1:{}",
                cp["ports"][0]["published"].as_str().unwrap()
            ),
            "{cp_name}: approval links point at its own published port"
        );

        let volumes = named_volumes(cp);
        let (target, read_only) = &volumes[socket_volume];
        assert!(*read_only, "{cp_name} cannot replace the database's socket");
        assert_eq!(
            store,
            format!("postgres://{db_user}@/{db_name}?host={target}"),
            "{cp_name} connects to the database's socket"
        );
        let data = volumes
            .iter()
            .find(|(_, (t, _))| *t == compose.flag(cp_name, "--data-dir"))
            .map(|(source, _)| source.clone())
            .expect("a data volume");
        let socket = compose.flag(cp_name, "--socket");
        let run_dir = Path::new(&socket).parent().unwrap().to_str().unwrap();
        let run = volumes
            .iter()
            .find(|(_, (t, _))| t == run_dir)
            .map(|(source, _)| source.clone())
            .expect("a socket volume");
        for own in [&data, &run] {
            assert!(
                node_volumes.insert(own.clone()),
                "{own} belongs to one node only"
            );
            assert!(
                default["volumes"].get(own).is_none(),
                "{own} is not the single node's"
            );
        }

        // Its Envoy: the single-node Envoy, on this node's socket volume.
        let envoy = compose.service(envoy_name);
        let different = ["profiles", "ports", "volumes", "depends_on"];
        assert_eq!(
            without(envoy, &different),
            without(compose.service("envoy"), &different),
            "{envoy_name} is the single-node Envoy"
        );
        assert_eq!(
            envoy["depends_on"],
            json!({cp_name: {"condition": "service_healthy", "required": true}}),
            "{envoy_name} waits for its own control plane"
        );
        let envoy_volumes = named_volumes(envoy);
        assert_eq!(
            envoy_volumes,
            BTreeMap::from([(run.clone(), (run_dir.to_string(), true))]),
            "{envoy_name} mounts its node's socket volume alone, read-only"
        );
        let binds = |service: &Value| -> Vec<Value> {
            service["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|v| v["type"] == "bind")
                .cloned()
                .collect()
        };
        assert_eq!(
            binds(envoy),
            binds(compose.service("envoy")),
            "{envoy_name} loads the compose bootstrap and the built filter"
        );
    }
    assert_eq!(stores.len(), 1, "one database for every node: {stores:?}");

    // Only PostgreSQL and the control planes reach the database's socket.
    for name in &services {
        let mounts = named_volumes(compose.service(name));
        let allowed = name == "postgres" || NODES.iter().any(|(cp, _)| cp == name);
        assert_eq!(
            mounts.contains_key(socket_volume),
            allowed,
            "{name} and the database socket"
        );
    }
}

/// The URL both control planes get is one PostgreSQL accepts: with its socket dir
/// pointed at a real server's (the test cluster's), `psql` connects with it, as the
/// role and to the database the postgres service creates.
#[test]
fn the_multinode_store_url_connects_to_a_real_postgresql() {
    let (compose, _) = configs();
    let postgres = compose.service("postgres");
    let db_user = postgres["environment"]["POSTGRES_USER"].as_str().unwrap();
    let db_name = postgres["environment"]["POSTGRES_DB"].as_str().unwrap();
    let store = compose.service("control-plane-a")["environment"]["AGENT_VAULT_STORE"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, socket_dir) = store.split_once("?host=").expect("a socket dir");

    let cluster = agent_vault_pgtest::shared();
    cluster.psql("postgres", &format!("create role {db_user} login"));
    cluster.psql(
        "postgres",
        &format!("create database {db_name} owner {db_user}"),
    );
    let url = store.replace(
        &format!("?host={socket_dir}"),
        &format!("?host={}", cluster.socket_dir().display()),
    );
    let out = Command::new(agent_vault_pgtest::bindir().join("psql"))
        .args(["-X", "-A", "-t", "-d", &url])
        .args(["-c", "select current_user || ' ' || current_database()"])
        .env_clear()
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{db_user} {db_name}")
    );
}
