//! Test fixtures shared by the unit tests of every module: a store in a temporary
//! directory (with a clock the test controls), the principals tests act as, and an
//! in-process client of the whole TCP app ([`Harness`]: API and UI through
//! `tower::ServiceExt::oneshot`, no socket).

use std::collections::BTreeMap;
use std::sync::Arc;

use agent_vault_rules::{Grant, Role};
use axum::body::Body;
use axum::http::{header, HeaderMap, Request, StatusCode};
use tower::ServiceExt;

use crate::access::{Principal, VaultRole};
use crate::clock::{ManualClock, SharedClock, SystemClock};
use crate::credentials::Secret;
use crate::http::AppState;
use crate::store::{Store, StoreLocation};
use crate::users::LoginLimiter;

/// The manual clock's start: 2023-11-14 22:13:20 UTC.
pub const T0_MS: i64 = 1_700_000_000_000;
pub const OWNER: &str = "owner@example.com";
pub const MEMBER: &str = "member@example.com";
pub const OUTSIDER: &str = "outsider@example.com";
pub const PASSWORD: &str = "correct-horse";

/// The TCP app's state for `store`, with its proxy CA and default leaf limits.
pub fn app_state(store: Arc<Store>, public_url: &str) -> AppState {
    let leaves = crate::leaves::Leaves::open(store.clone(), Default::default()).unwrap();
    AppState::new(store, leaves, public_url)
}

/// Set to `postgres` to run the unit tests on PostgreSQL (`./dev test` runs them once
/// on each backend): one server per test process, a database per store.
pub const TEST_STORE_ENV: &str = "AGENT_VAULT_TEST_STORE";
/// The file in a test store's data dir that names its database.
const TEST_DATABASE_FILE: &str = "test-database-url";

/// Where the store of the data dir `dir` is, on the backend under test.
pub fn test_location(dir: &std::path::Path) -> StoreLocation {
    match std::env::var(TEST_STORE_ENV).as_deref() {
        Ok("postgres") => {
            let file = dir.join(TEST_DATABASE_FILE);
            let url = match std::fs::read_to_string(&file) {
                Ok(url) => url,
                Err(_) => {
                    let url = agent_vault_pgtest::shared().fresh_database("unit");
                    std::fs::write(&file, &url).unwrap();
                    url
                }
            };
            StoreLocation::Postgres(url)
        }
        Ok("sled") | Err(_) => StoreLocation::Sled(None),
        Ok(other) => panic!("{TEST_STORE_ENV}={other}: give sled or postgres"),
    }
}

/// Opens the store of `dir` on the backend under test.
pub fn open_store(
    dir: &std::path::Path,
    password: Option<&str>,
    clock: SharedClock,
    allow_private_upstreams: bool,
) -> Result<Store, crate::store::OpenError> {
    let location = test_location(dir);
    Store::open_at(&location, dir, password, clock, allow_private_upstreams)
}

/// A store in a fresh temporary directory (removed with the returned guard), on the
/// backend under test.
pub fn temp_store(clock: SharedClock, allow_private_upstreams: bool) -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path(), None, clock, allow_private_upstreams).unwrap();
    (dir, store)
}

/// The bootstrap token `store` wrote into its data dir (while it has no owner).
/// Opens the store in `dir` again after the test dropped its handle. sled lets go of
/// its file lock only once its background threads have dropped their references too,
/// which can be a moment after the last handle is dropped: a lock refusal is retried
/// for up to 5 s (any other error, or a lock still held then, is returned).
pub fn reopen(dir: &std::path::Path) -> Result<Store, crate::store::OpenError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match open_store(dir, None, Arc::new(crate::clock::SystemClock), false) {
            Err(error)
                if error.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

pub fn bootstrap_token(store: &Store) -> String {
    let file = store.data_dir().join(crate::users::BOOTSTRAP_TOKEN_FILE);
    std::fs::read_to_string(file).unwrap().trim().to_string()
}

/// Registers the owner, with the bootstrap token as the server's own user would.
pub fn register_owner(store: &Store, email: &str, password: &str) {
    let token = bootstrap_token(store);
    store.register(email, password, None, Some(&token)).unwrap();
}

/// [`temp_store`] on the system clock, refusing private upstreams like production.
pub fn system_store() -> (tempfile::TempDir, Store) {
    temp_store(Arc::new(SystemClock), false)
}

/// The owner, as every store operation sees it (admin of every vault).
pub fn owner() -> Principal {
    user(OWNER, true)
}

/// A user who is not the owner: what it may do depends on its vault roles.
pub fn member(email: &str) -> Principal {
    user(email, false)
}

fn user(email: &str, owner: bool) -> Principal {
    Principal::User {
        email: email.into(),
        owner,
    }
}

/// Credential entries for `set_credentials`.
pub fn secrets(pairs: &[(&str, &str)]) -> BTreeMap<String, Secret> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), Secret::new((*v).to_string())))
        .collect()
}

/// The owner adds service `stripe` to `default`: `api.stripe.com`, bearer `STRIPE_KEY`
/// (which must be set first).
pub fn add_stripe_service(store: &Store) {
    let service = serde_json::from_value(serde_json::json!({
        "name": "stripe", "host": "api.stripe.com",
        "auth": {"type": "bearer", "token": "STRIPE_KEY"}
    }))
    .unwrap();
    store.add_service(&owner(), "default", service).unwrap();
}

/// Creates agent `name` with the proxy role on `vaults`; returns its token.
pub fn agent_on(store: &Store, name: &str, vaults: &[&str]) -> String {
    let grants = vaults
        .iter()
        .map(|vault| Grant {
            vault: (*vault).into(),
            role: Role::Proxy,
        })
        .collect();
    store
        .create_agent(&owner(), name, grants, None)
        .unwrap()
        .token
}

/// The whole TCP app over a temporary store on a manual clock: the owner (registered
/// with [`PASSWORD`]), a vault `other`, [`MEMBER`] a member of `default` and
/// [`OUTSIDER`] a member of `other` only (both registered by invite), and agent `bot`
/// on `default`.
pub struct Harness {
    _dir: tempfile::TempDir,
    pub state: AppState,
    pub clock: Arc<ManualClock>,
    pub agent: Principal,
    pub agent_token: String,
}

impl Harness {
    pub fn new() -> Harness {
        Harness::at("http://127.0.0.1:14321")
    }

    /// With `public_url` as the server's public URL (approval links, cookie flags).
    pub fn at(public_url: &str) -> Harness {
        let clock = ManualClock::new(T0_MS);
        let (dir, store) = temp_store(clock.clone(), true);
        register_owner(&store, OWNER, PASSWORD);
        store.create_vault(&owner(), "other").unwrap();
        for (email, vault) in [(MEMBER, "default"), (OUTSIDER, "other")] {
            let invite = store
                .add_member(&owner(), vault, email, VaultRole::Member)
                .unwrap()
                .invite
                .unwrap();
            store
                .register(email, PASSWORD, Some(&invite), None)
                .unwrap();
        }
        let agent_token = agent_on(&store, "bot", &["default"]);
        let agent = store.authenticate(&agent_token).unwrap();
        Harness {
            _dir: dir,
            state: app_state(Arc::new(store), public_url),
            clock,
            agent,
            agent_token,
        }
    }

    pub fn store(&self) -> &Store {
        &self.state.store
    }

    /// A fresh API session token of `email` (a bearer token).
    pub fn session(&self, email: &str) -> String {
        self.store()
            .login(&LoginLimiter::default(), email, PASSWORD)
            .unwrap()
            .token
    }

    /// A fresh UI session token of `email` (the cookie's value).
    pub fn ui_session(&self, email: &str) -> String {
        self.store()
            .login_ui(&LoginLimiter::default(), email, PASSWORD)
            .unwrap()
            .token
    }

    pub async fn send(&self, request: Request<Body>) -> Reply {
        let response = crate::server::app(self.state.clone(), Default::default())
            .oneshot(request)
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        Reply {
            status,
            headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }
}

/// A response, read whole.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn location(&self) -> &str {
        self.headers
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    pub fn set_cookies(&self) -> Vec<String> {
        self.headers
            .get_all(header::SET_COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    }

    pub fn cookie_value(&self, name: &str) -> Option<String> {
        self.set_cookies().iter().find_map(|c| {
            c.split(';')
                .next()
                .and_then(|pair| pair.split_once('='))
                .filter(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        })
    }

    /// The body as JSON (panics with the body when it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    /// The `error` code of a JSON error body.
    pub fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}
