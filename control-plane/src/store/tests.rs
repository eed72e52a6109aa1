use super::*;
use crate::clock::SystemClock;
use std::sync::Arc;

#[test]
fn a_store_with_a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::testing::open_store(dir.path(), None, Arc::new(SystemClock), false).unwrap();
    store
        .write(|tx| {
            tx.meta
                .insert(META_SCHEMA, (SCHEMA_VERSION + 1).to_be_bytes())
        })
        .unwrap();
    drop(store);
    let err = crate::testing::reopen(dir.path())
        .err()
        .expect("newer schema refused");
    assert!(matches!(err, OpenError::NewerSchema { .. }), "{err}");
    assert!(err.to_string().contains("upgrade agent-vault"));
}

#[test]
fn rule_writes_bump_the_snapshot_version_and_others_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::testing::open_store(dir.path(), None, Arc::new(SystemClock), false).unwrap();
    let v0 = store.snapshot_version().unwrap();
    store.write(|_| Ok(())).unwrap();
    assert_eq!(store.snapshot_version().unwrap(), v0);
    store.write_published(|_| Ok(())).unwrap();
    assert_eq!(store.snapshot_version().unwrap(), v0 + 1);
}

/// Several control planes on one PostgreSQL database: what only a shared store has.
/// These always run on PostgreSQL (whatever `AGENT_VAULT_TEST_STORE` says).
mod shared {
    use super::*;
    use crate::testing::{owner, secrets};
    use std::time::{Duration, Instant};

    /// Two stores (two control planes' worth: each its own data dir) on one fresh
    /// database; the second has the first's key file, as operators copy it.
    fn two_on(url: &str) -> (tempfile::TempDir, Store, tempfile::TempDir, Store) {
        let location = StoreLocation::Postgres(url.to_string());
        let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a =
            Store::open_at(&location, dir_a.path(), None, Arc::new(SystemClock), false).unwrap();
        std::fs::copy(dir_a.path().join(KEY_FILE), dir_b.path().join(KEY_FILE)).unwrap();
        let b =
            Store::open_at(&location, dir_b.path(), None, Arc::new(SystemClock), false).unwrap();
        (dir_a, a, dir_b, b)
    }

    fn two() -> (tempfile::TempDir, Store, tempfile::TempDir, Store) {
        two_on(&agent_vault_pgtest::shared().fresh_database("shared"))
    }

    fn value(store: &Store, key: &str) -> Option<String> {
        let vault = store.vault("default").unwrap().unwrap();
        let (values, _) = store
            .resolve_credentials(&vault.id, &[key.to_string()])
            .unwrap();
        values.get(key).map(|v| v.expose().to_string())
    }

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(Instant::now() < deadline, "{what} within 5 s");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_write_through_one_control_plane_wakes_the_others_version_watch() {
        let (_a_dir, a, _b_dir, b) = two();
        let before = *b.watch_version().borrow();
        a.set_credentials(&owner(), "default", &secrets(&[("K", "value-1")]))
            .unwrap();
        let committed = a.snapshot_version().unwrap();
        assert!(committed > before);
        // From NOTIFY (or the 1 s version poll): B never reads the row itself here.
        wait_for("B's watch sees A's version", || {
            *b.watch_version().borrow() >= committed
        });
        assert_eq!(value(&b, "K").as_deref(), Some("value-1"));
    }

    #[test]
    fn a_second_control_plane_with_another_key_file_is_refused() {
        let url = agent_vault_pgtest::shared().fresh_database("otherkey");
        let location = StoreLocation::Postgres(url);
        let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let _a =
            Store::open_at(&location, dir_a.path(), None, Arc::new(SystemClock), false).unwrap();
        // No key file in B's data dir: the wrapped data key is there, B cannot open it.
        let err = Store::open_at(&location, dir_b.path(), None, Arc::new(SystemClock), false)
            .err()
            .expect("refused");
        assert!(matches!(err, OpenError::KeyFile(..)), "{err}");
        // With a password while the store is passwordless: refused too.
        let err = Store::open_at(
            &location,
            dir_b.path(),
            Some("a password"),
            Arc::new(SystemClock),
            false,
        )
        .err()
        .expect("refused");
        assert!(matches!(err, OpenError::PasswordlessStore(..)), "{err}");
    }

    #[test]
    fn a_data_key_rotated_through_one_control_plane_is_taken_by_the_other() {
        let (_a_dir, a, _b_dir, b) = two();
        a.set_credentials(&owner(), "default", &secrets(&[("K", "before")]))
            .unwrap();
        assert_eq!(value(&b, "K").as_deref(), Some("before"));
        assert_eq!(a.rotate_data_key().unwrap(), 1);
        // B still holds the old key until the change reaches it; a write it makes
        // meanwhile is refused (it would seal with the old key), never stored.
        let mut refused = 0;
        wait_for("B writes with the new key", || {
            match b.set_credentials(&owner(), "default", &secrets(&[("L", "from-b")])) {
                Ok(_) => true,
                Err(error) => {
                    assert_eq!(error.code(), "store_unavailable", "{error}");
                    refused += 1;
                    false
                }
            }
        });
        // Whatever B wrote, both read it with the one current key.
        for store in [&a, &b] {
            assert_eq!(value(store, "K").as_deref(), Some("before"));
            assert_eq!(value(store, "L").as_deref(), Some("from-b"));
        }
        eprintln!("B's writes refused while the rotation reached it: {refused}");
    }

    #[test]
    fn a_master_password_changed_elsewhere_stops_this_one_from_rewrapping() {
        let (_a_dir, a, _b_dir, b) = two();
        a.change_master_password(None, Some("a new master password"))
            .unwrap();
        // B's key-encryption key is the old one: rewrapping with it would lock A's
        // password out.
        let err = b.rotate_data_key().unwrap_err();
        assert_eq!(err.code(), "master_key_changed", "{err}");
        let err = b.change_master_password(None, Some("other")).unwrap_err();
        assert_eq!(err.code(), "master_key_changed", "{err}");
        // B still serves what it can open: the data key did not change.
        a.set_credentials(&owner(), "default", &secrets(&[("K", "v")]))
            .unwrap();
        assert_eq!(value(&b, "K").as_deref(), Some("v"));
    }

    #[test]
    fn concurrent_writes_through_two_control_planes_all_land() {
        let (_a_dir, a, _b_dir, b) = two();
        std::thread::scope(|scope| {
            for (name, store) in [("a", &a), ("b", &b)] {
                scope.spawn(move || {
                    for i in 0..20 {
                        let key = format!("{}_{i}", name.to_uppercase());
                        store
                            .set_credentials(&owner(), "default", &secrets(&[(&key, "v")]))
                            .unwrap();
                    }
                });
            }
        });
        let listed = a.list_credentials(&owner(), "default", false).unwrap();
        assert_eq!(listed.len(), 40, "{listed:?}");
        // Every write bumped the version once, whichever control plane made it.
        assert!(a.snapshot_version().unwrap() >= 40);
    }

    #[test]
    fn a_database_that_goes_away_is_503_and_the_store_recovers_when_it_is_back() {
        let cluster = agent_vault_pgtest::Cluster::start();
        let url = cluster.create_database("comeback");
        let (_a_dir, a, _b_dir, b) = two_on(&url);
        a.set_credentials(&owner(), "default", &secrets(&[("K", "v1")]))
            .unwrap();
        cluster.stop();
        let err = a
            .set_credentials(&owner(), "default", &secrets(&[("K", "v2")]))
            .unwrap_err();
        assert_eq!(err.code(), "store_unavailable", "{err}");
        assert_eq!(err.status(), axum::http::StatusCode::SERVICE_UNAVAILABLE);
        let vault_read = b.vault("default").unwrap_err();
        assert_eq!(vault_read.code(), "store_unavailable");
        cluster.start_again();
        // The pools drop their broken connections and open new ones: no restart.
        wait_for("A writes again", || {
            a.set_credentials(&owner(), "default", &secrets(&[("K", "v3")]))
                .is_ok()
        });
        wait_for("B reads again", || b.vault("default").is_ok());
        assert_eq!(value(&b, "K").as_deref(), Some("v3"));
        // And B's listener is back: it hears A's next write.
        a.set_credentials(&owner(), "default", &secrets(&[("K", "v4")]))
            .unwrap();
        let committed = a.snapshot_version().unwrap();
        wait_for("B hears A again", || {
            *b.watch_version().borrow() >= committed
        });
    }

    #[test]
    fn a_database_migrated_by_a_newer_agent_vault_is_refused() {
        let cluster = agent_vault_pgtest::shared();
        let url = cluster.fresh_database("newer");
        // `postgres://postgres@/<db>?host=<socket dir>`
        let db = url
            .split("@/")
            .nth(1)
            .unwrap()
            .split('?')
            .next()
            .unwrap()
            .to_string();
        let dir = tempfile::tempdir().unwrap();
        let location = StoreLocation::Postgres(url);
        drop(Store::open_at(&location, dir.path(), None, Arc::new(SystemClock), false).unwrap());
        cluster.psql(
            &db,
            "INSERT INTO agent_vault_migrations (version) VALUES (999)",
        );
        let err = Store::open_at(&location, dir.path(), None, Arc::new(SystemClock), false)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("upgrade agent-vault"), "{err}");
    }

    #[test]
    fn store_locations_parse_and_hide_passwords() {
        assert_eq!("sled".parse(), Ok(StoreLocation::Sled(None)));
        assert_eq!(
            "sled:/var/lib/av".parse(),
            Ok(StoreLocation::Sled(Some("/var/lib/av".into())))
        );
        assert!("sled:".parse::<StoreLocation>().is_err());
        let err = "mysql://x".parse::<StoreLocation>().unwrap_err();
        assert!(err.contains("postgres://"), "{err}");
        let pg: StoreLocation = "postgres://av:hunter22@db.internal/av?password=x&sslmode=disable"
            .parse()
            .unwrap();
        let shown = pg.describe(Path::new("/d"));
        assert!(
            !shown.contains("hunter22") && !shown.contains("=x&"),
            "{shown}"
        );
        assert!(shown.contains("av:***@db.internal/av"), "{shown}");
    }

    /// `sslmode=require` over TCP to a real server with TLS: the certificate is checked
    /// against `AGENT_VAULT_STORE_CA` (connects), a server the roots do not vouch for is
    /// refused, and roots that cannot be read are a clear error. One test, because the
    /// roots are in the process's environment.
    #[test]
    fn sslmode_require_checks_the_servers_certificate() {
        use std::io::Write;
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let cluster = agent_vault_pgtest::Cluster::start();
        cluster.create_database("tls");
        // A CA and a leaf for localhost, the server's key readable by its user only.
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        let data = cluster.data_dir();
        let server_user = std::fs::metadata(data).unwrap();
        for (name, pem) in [
            ("server.crt", leaf.pem()),
            ("server.key", leaf_key.serialize_pem()),
        ] {
            let path = data.join(name);
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)
                .unwrap();
            file.write_all(pem.as_bytes()).unwrap();
            std::os::unix::fs::chown(&path, Some(server_user.uid()), Some(server_user.gid()))
                .unwrap();
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap();
        writeln!(
            conf,
            "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n\
             listen_addresses = '127.0.0.1'\nport = {port}"
        )
        .unwrap();
        drop(conf);
        cluster.restart();

        let dir = tempfile::tempdir().unwrap();
        let open = |url: &str| {
            Store::open_at(
                &StoreLocation::Postgres(url.to_string()),
                dir.path(),
                None,
                Arc::new(SystemClock),
                false,
            )
        };
        let url = format!("postgres://postgres@localhost:{port}/tls?sslmode=require");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        std::env::set_var(postgres::STORE_CA_ENV, &ca_file);
        let store = open(&url).expect("TLS with the certificate checked");
        store
            .set_credentials(&owner(), "default", &secrets(&[("K", "over tls")]))
            .unwrap();
        assert_eq!(value(&store, "K").as_deref(), Some("over tls"));
        drop(store);

        // Roots that do not vouch for the server: refused, not connected anyway.
        let other_key = rcgen::KeyPair::generate().unwrap();
        let other = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&other_key)
            .unwrap();
        std::fs::write(&ca_file, other.pem()).unwrap();
        let err = open(&url).err().expect("an unknown issuer is refused");
        assert!(
            err.to_string().to_lowercase().contains("certificate"),
            "{err}"
        );

        std::env::set_var(postgres::STORE_CA_ENV, dir.path().join("missing.pem"));
        let err = open(&url).err().expect("unreadable roots are refused");
        std::env::remove_var(postgres::STORE_CA_ENV);
        let message = err.to_string();
        assert!(
            message.contains("AGENT_VAULT_STORE_CA=") && message.contains("missing.pem"),
            "{message}"
        );
    }
}
