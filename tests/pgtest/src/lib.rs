//! A real PostgreSQL server for tests, started by the test itself: no Docker, no
//! system service, nothing left behind.
//!
//! [`Cluster::start`] runs Debian's `postgresql` binaries (`/usr/lib/postgresql/<major>/bin`,
//! the highest major present; `AGENT_VAULT_PG_BINDIR` overrides) — `initdb` into a temp
//! dir, then `pg_ctl start` — with the server listening ONLY on a Unix socket in that
//! temp dir (`listen_addresses = ''`), trust authentication on the socket, and
//! `fsync = on`: the durability tests (kill -9 of a control plane, PostgreSQL restarted
//! under load) depend on the server keeping what it acknowledged. Only `initdb` runs
//! with `--no-sync`: losing a fresh cluster to a power cut is harmless.
//!
//! PostgreSQL refuses to run as root. As root (CI), the server runs as the `postgres`
//! user Debian's package creates, and the temp dirs are given to it; as anyone else,
//! as that user. Clients (`psql`, `createdb`, the control planes under test) connect as
//! whoever they are: the socket is open to every local user, and the database role is
//! always `postgres`.
//!
//! [`shared`] is one cluster per test process, started on first use and stopped at the
//! process's exit (an `atexit` handler: the test harness leaves through `exit`). Each
//! test makes its own database there ([`Cluster::fresh_database`]). A test that stops,
//! kills or restarts the server starts a [`Cluster`] of its own instead.
//!
//! Nothing outlives the test process: pg_ctl detaches the server from the process
//! group (a Ctrl-C of the run never reaches it), so each cluster has a watchdog shell
//! that stops it and removes its dir once the test process is gone, however it ended
//! (SIGKILL included).

use std::ffi::CString;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// Where Debian's packages put each major version's server binaries.
const DEBIAN_ROOT: &str = "/usr/lib/postgresql";
/// A directory with `initdb`, `pg_ctl`, `psql` and `createdb`, instead of Debian's.
pub const BINDIR_ENV: &str = "AGENT_VAULT_PG_BINDIR";
/// The database role every URL names (initdb's superuser).
pub const ROLE: &str = "postgres";
/// The port only names the socket file (`.s.PGSQL.5432`): no TCP listener is opened.
const PORT: u16 = 5432;
/// Seconds `pg_ctl` waits for a start or a stop.
const PG_CTL_WAIT_SECS: &str = "60";

const NOT_INSTALLED: &str = "PostgreSQL is not installed: ./dev test installs Debian's \
     postgresql package (apt-get install postgresql), or set AGENT_VAULT_PG_BINDIR to a \
     directory holding initdb, pg_ctl, psql and createdb";

/// A PostgreSQL server of one test (or one test process, [`shared`]): its data dir,
/// socket dir and log in one temp dir. Dropping it stops the server at once
/// (`pg_ctl stop -m immediate`) and removes the dir.
pub struct Cluster {
    bindir: PathBuf,
    /// Owned by the server's user; the socket dir, the data dir and the log are in it.
    root: tempfile::TempDir,
    data: PathBuf,
    socket_dir: PathBuf,
    log: PathBuf,
    /// The server's uid and gid when it is not the current user (root runs it as
    /// `postgres`).
    server_user: Option<(u32, u32)>,
    databases: AtomicU64,
    /// Stops the server and removes the dir if this process dies without doing it
    /// (SIGKILL, a test run's timeout): see [`Cluster::watchdog`].
    watchdog: Mutex<Option<Child>>,
}

impl Cluster {
    /// `initdb` into a new temp dir, then starts the server; returns once it accepts
    /// connections. Panics with what is missing or what PostgreSQL said.
    pub fn start() -> Cluster {
        let bindir = bindir();
        let server_user = server_user();
        let root = tempfile::Builder::new()
            .prefix("pg")
            .tempdir_in(temp_base(server_user.is_some()))
            .expect("create the PostgreSQL temp dir");
        // Searchable by everyone, so clients of any user reach the socket; the data dir
        // inside is initdb's own (0700).
        set_mode(root.path(), 0o755);
        let socket_dir = root.path().join("sock");
        std::fs::create_dir(&socket_dir).expect("create the socket dir");
        set_mode(&socket_dir, 0o755);
        if let Some((uid, gid)) = server_user {
            for dir in [root.path(), socket_dir.as_path()] {
                std::os::unix::fs::chown(dir, Some(uid), Some(gid))
                    .unwrap_or_else(|e| panic!("give {} to the postgres user: {e}", dir.display()));
            }
        }
        let socket_file = socket_dir.join(format!(".s.PGSQL.{PORT}"));
        assert!(
            socket_file.as_os_str().len() < 108,
            "the PostgreSQL socket path {} is longer than a Unix socket path may be: \
             set TMPDIR to a shorter directory",
            socket_file.display()
        );
        let cluster = Cluster {
            data: root.path().join("data"),
            log: root.path().join("postgresql.log"),
            bindir,
            root,
            socket_dir,
            server_user,
            databases: AtomicU64::new(0),
            watchdog: Mutex::new(None),
        };
        *cluster.watchdog.lock().unwrap() = Some(cluster.watchdog());
        cluster.initdb();
        cluster.start_again();
        cluster
    }

    /// A shell, in a process group of its own (a Ctrl-C of the test run does not reach
    /// it, nor the server: pg_ctl detaches it), that waits for end-of-file on its stdin,
    /// a pipe whose other end only this process holds (close-on-exec, so no other
    /// child inherits it). However this process ends, the pipe closes; the shell then
    /// stops the server at once and removes the temp dir. Dropping the cluster closes
    /// it too, after stopping the server itself.
    fn watchdog(&self) -> Child {
        let script = r#"read -r _ || :
"$0" stop -D "$1" -m immediate -w >/dev/null 2>&1
rm -rf "$2""#;
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(script)
            .arg(self.bindir.join("pg_ctl"))
            .arg(&self.data)
            .arg(self.root.path())
            .current_dir(self.root.path())
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        if let Some((uid, gid)) = self.server_user {
            cmd.uid(uid).gid(gid);
        }
        cmd.spawn()
            .unwrap_or_else(|e| panic!("start the PostgreSQL watchdog (/bin/sh): {e}"))
    }

    /// Closes the watchdog's pipe and waits for it: the server is stopped and the dir
    /// removed when this returns.
    fn release_watchdog(&self) {
        let child = self.watchdog.lock().ok().and_then(|mut w| w.take());
        if let Some(mut child) = child {
            drop(child.stdin.take());
            let _ = child.wait();
        }
    }

    fn initdb(&self) {
        let out = self
            .server_command("initdb")
            .arg("-D")
            .arg(&self.data)
            .args(["-U", ROLE, "--auth=trust", "--encoding=UTF8", "--locale=C"])
            // Only initdb skips fsync: the running server keeps fsync on.
            .arg("--no-sync")
            .output()
            .unwrap_or_else(|e| panic!("run initdb: {e}"));
        check("initdb", &out);
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(self.data.join("postgresql.conf"))
            .expect("open postgresql.conf");
        let socket = self.socket_dir.display().to_string().replace('\'', "''");
        // Several control planes per test, each with a pool, and tests in parallel.
        let settings = format!(
            "\n# agent-vault-pgtest\n\
             listen_addresses = ''\n\
             port = {PORT}\n\
             unix_socket_directories = '{socket}'\n\
             unix_socket_permissions = 0777\n\
             fsync = on\n\
             synchronous_commit = on\n\
             full_page_writes = on\n\
             max_connections = 300\n\
             shared_buffers = 64MB\n\
             logging_collector = off\n"
        );
        conf.write_all(settings.as_bytes())
            .expect("write postgresql.conf");
    }

    /// Starts the server again on the same data dir and socket, after [`Cluster::stop`]
    /// or [`Cluster::kill`] (crash recovery runs first after a kill); returns once it
    /// accepts connections.
    pub fn start_again(&self) {
        let out = self
            .server_command("pg_ctl")
            .arg("start")
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-w", "-t", PG_CTL_WAIT_SECS])
            .output()
            .unwrap_or_else(|e| panic!("run pg_ctl start: {e}"));
        if !out.status.success() {
            panic!(
                "PostgreSQL did not start: {}\n--- its log ---\n{}",
                output_text(&out),
                self.log_text()
            );
        }
    }

    /// A clean shutdown (`pg_ctl stop -m fast`): open connections are closed, and the
    /// socket is gone until [`Cluster::start_again`].
    pub fn stop(&self) {
        self.pg_ctl_stop("fast");
    }

    /// Stops the server at once (`pg_ctl stop -m immediate`: every server process
    /// quits without a checkpoint, as in a crash; the next start recovers from the WAL).
    pub fn kill(&self) {
        self.pg_ctl_stop("immediate");
    }

    /// [`Cluster::stop`], then [`Cluster::start_again`].
    pub fn restart(&self) {
        self.stop();
        self.start_again();
    }

    fn pg_ctl_stop(&self, mode: &str) {
        if !self.is_running() {
            return;
        }
        let out = self
            .server_command("pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", mode, "-w", "-t", PG_CTL_WAIT_SECS])
            .output()
            .unwrap_or_else(|e| panic!("run pg_ctl stop: {e}"));
        check(&format!("pg_ctl stop -m {mode}"), &out);
    }

    /// Whether the server is up (`pg_ctl status`).
    pub fn is_running(&self) -> bool {
        self.server_command("pg_ctl")
            .arg("status")
            .arg("-D")
            .arg(&self.data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// The postmaster's PID while the server runs (first line of `postmaster.pid`).
    pub fn server_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// A URL tokio-postgres and libpq accept for database `db` on this server's socket:
    /// `postgres://postgres@/DB?host=/SOCKET/DIR`.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://{ROLE}@/{}?host={}",
            percent_encode(db),
            percent_encode(&self.socket_dir.display().to_string())
        )
    }

    /// Creates database `name` (letters, digits and `_`, starting with a letter or
    /// `_`, at most 63 bytes) and returns its [`Cluster::url`]. Panics if it exists.
    pub fn create_database(&self, name: &str) -> String {
        assert!(
            valid_database_name(name),
            "database name {name:?}: use lower-case letters, digits and _, starting with \
             a letter or _, at most 63 bytes"
        );
        let out = self
            .client_command("createdb")
            .args(["-h"])
            .arg(&self.socket_dir)
            .args(["-p", &PORT.to_string(), "-U", ROLE, name])
            .output()
            .unwrap_or_else(|e| panic!("run createdb: {e}"));
        check(&format!("createdb {name}"), &out);
        self.url(name)
    }

    /// A new database with a name no other caller of this cluster gets
    /// (`PREFIX_N`, the prefix cleaned up to what [`Cluster::create_database`] takes);
    /// returns its URL.
    pub fn fresh_database(&self, prefix: &str) -> String {
        let n = self.databases.fetch_add(1, Ordering::Relaxed);
        let mut clean: String = prefix
            .chars()
            .map(|c| match c.to_ascii_lowercase() {
                c @ ('a'..='z' | '0'..='9' | '_') => c,
                _ => '_',
            })
            .collect();
        if !clean.starts_with(|c: char| c.is_ascii_lowercase() || c == '_') {
            clean.insert(0, 'd');
        }
        let suffix = format!("_{n}");
        clean.truncate(63 - suffix.len());
        self.create_database(&format!("{clean}{suffix}"))
    }

    /// Runs `sql` with `psql` on database `db` and returns its rows, unaligned
    /// (`|` between columns, one row a line), without headers. Panics on an SQL error.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = self.try_psql(db, sql);
        match out {
            Ok(rows) => rows,
            Err(e) => panic!("psql -c {sql:?} on {db}: {e}"),
        }
    }

    /// [`Cluster::psql`], with PostgreSQL's complaint as the error (a stopped server:
    /// no such socket).
    pub fn try_psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let out = self
            .client_command("psql")
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(self.url(db))
            .args(["-c", sql])
            .output()
            .map_err(|e| format!("run psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
        } else {
            Err(output_text(&out))
        }
    }

    /// The directory of the server's socket (`host=` of the URLs).
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The server's data dir (`PGDATA`).
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The server binaries' directory.
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// What the server logged so far, for failure messages.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A server binary, run as the server's user, in the cluster's dir (PostgreSQL's
    /// tools complain when they cannot read their working directory), with none of the
    /// caller's PG* variables.
    fn server_command(&self, program: &str) -> Command {
        let mut cmd = self.client_command(program);
        cmd.env("HOME", self.root.path());
        if let Some((uid, gid)) = self.server_user {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    /// A client binary, run as the current user.
    fn client_command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bindir.join(program));
        cmd.current_dir(self.root.path())
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("LC_ALL", "C")
            .stdin(Stdio::null());
        cmd
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            eprintln!("--- PostgreSQL log (tail) ---\n{}", tail.join("\n"));
        }
        self.release_watchdog();
    }
}

static SHARED: OnceLock<Cluster> = OnceLock::new();

/// One cluster for the whole test process: started on first use, stopped (and its
/// temp dir removed) when the process exits. Each test takes its own database
/// ([`Cluster::fresh_database`]) and never stops the server.
pub fn shared() -> &'static Cluster {
    SHARED.get_or_init(|| {
        let cluster = Cluster::start();
        // SAFETY: registering a plain `extern "C" fn` that catches its own panics.
        let registered = unsafe { libc::atexit(stop_shared) };
        assert_eq!(registered, 0, "register the PostgreSQL cleanup at exit");
        cluster
    })
}

/// The `atexit` handler of [`shared`]: a static is never dropped, so the server is
/// stopped and its dir removed here.
extern "C" fn stop_shared() {
    let _ = std::panic::catch_unwind(|| {
        if let Some(cluster) = SHARED.get() {
            cluster.release_watchdog();
        }
    });
}

/// The server binaries: `$AGENT_VAULT_PG_BINDIR`, else Debian's highest major version.
pub fn bindir() -> PathBuf {
    if let Some(dir) = std::env::var_os(BINDIR_ENV) {
        let dir = PathBuf::from(dir);
        assert!(
            dir.join("initdb").is_file(),
            "{BINDIR_ENV}={} has no initdb",
            dir.display()
        );
        return dir;
    }
    let mut versions: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir(DEBIAN_ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version: Vec<u32> = name
                .split('.')
                .map(|n| n.parse().ok())
                .collect::<Option<_>>()?;
            let bin = entry.path().join("bin");
            ["initdb", "pg_ctl", "postgres", "psql", "createdb"]
                .iter()
                .all(|p| bin.join(p).is_file())
                .then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .unwrap_or_else(|| panic!("{NOT_INSTALLED} (no {DEBIAN_ROOT}/<version>/bin/initdb)"))
}

/// Whom the server runs as, when not the current user: root runs it as `postgres`.
fn server_user() -> Option<(u32, u32)> {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        return None;
    }
    let name = CString::new(ROLE).unwrap();
    // SAFETY: getpwnam reads a static buffer; the fields are copied out at once, and
    // no other thread of a test calls getpwnam for another name meanwhile in practice
    // (the worst case is a wrong lookup, caught by initdb failing).
    let entry = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(
        !entry.is_null(),
        "PostgreSQL refuses to run as root, and there is no `postgres` user to run it as: \
         Debian's postgresql package creates it ({NOT_INSTALLED})"
    );
    // SAFETY: non-null, points to getpwnam's passwd record.
    let (uid, gid) = unsafe { ((*entry).pw_uid, (*entry).pw_gid) };
    Some((uid, gid))
}

/// Where the temp dir goes: `$TMPDIR` (or /tmp), unless the server runs as another
/// user who could not reach it (a root-only TMPDIR), then /tmp.
fn temp_base(other_user: bool) -> PathBuf {
    let base = std::env::temp_dir();
    if !other_user {
        return base;
    }
    let searchable = |dir: &Path| {
        std::fs::metadata(dir)
            .map(|m| m.permissions().mode() & 0o001 != 0)
            .unwrap_or(false)
    };
    match base.canonicalize() {
        Ok(real) if real.ancestors().all(searchable) => real,
        _ => PathBuf::from("/tmp"),
    }
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

fn valid_database_name(name: &str) -> bool {
    name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Percent-encodes everything but unreserved characters and `/` (a URL's path or
/// query value).
fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn output_text(out: &Output) -> String {
    format!(
        "{}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn check(what: &str, out: &Output) {
    assert!(out.status.success(), "{what} failed: {}", output_text(out));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The uid a process runs as (`/proc/PID/status`).
    fn uid_of(pid: u32) -> u32 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap()
    }

    #[test]
    fn a_cluster_starts_on_a_socket_only_serves_two_databases_restarts_and_dies() {
        let cluster = Cluster::start();
        let pid = cluster.server_pid().expect("a running server has a pid");
        // SAFETY: getuid has no preconditions.
        let me = unsafe { libc::getuid() };
        if me == 0 {
            let (uid, _) = server_user().unwrap();
            assert_ne!(uid, 0);
            assert_eq!(uid_of(pid), uid, "as root, the server runs as postgres");
        } else {
            assert_eq!(uid_of(pid), me);
        }
        assert_eq!(cluster.psql("postgres", "show listen_addresses"), "");
        assert_eq!(cluster.psql("postgres", "show fsync"), "on");
        assert_eq!(cluster.psql("postgres", "show synchronous_commit"), "on");
        assert!(cluster
            .socket_dir()
            .join(format!(".s.PGSQL.{PORT}"))
            .exists());

        let a = cluster.create_database("first_db");
        let b = cluster.create_database("second_db");
        assert_ne!(a, b);
        assert_eq!(cluster.psql("first_db", "select 1"), "1");
        cluster.psql(
            "first_db",
            "create table kept (n int); insert into kept values (7)",
        );
        assert_eq!(
            cluster.psql("second_db", "select current_database()"),
            "second_db"
        );
        let taken = std::panic::catch_unwind(|| cluster.create_database("first_db"));
        assert!(taken.is_err(), "a database name is taken once");

        cluster.restart();
        assert_ne!(cluster.server_pid(), Some(pid), "a new postmaster");
        assert_eq!(cluster.psql("first_db", "select n from kept"), "7");

        cluster.kill();
        assert!(!cluster.is_running());
        let down = cluster.try_psql("first_db", "select 1").unwrap_err();
        assert!(down.contains("No such file or directory"), "{down}");
        cluster.start_again();
        assert_eq!(
            cluster.psql("first_db", "select n from kept"),
            "7",
            "a committed row survives an immediate stop"
        );

        let data = cluster.data_dir().to_path_buf();
        drop(cluster);
        assert!(!data.exists(), "the temp dir is removed");
    }

    #[test]
    fn the_url_is_a_libpq_url_with_the_socket_dir_as_host() {
        let cluster = shared();
        let url = cluster.fresh_database("url test");
        let name = url
            .strip_prefix("postgres://postgres@/")
            .and_then(|rest| rest.split('?').next())
            .unwrap();
        assert!(name.starts_with("url_test_"), "{url}");
        assert!(
            url.ends_with(&format!("?host={}", cluster.socket_dir().display())),
            "{url}"
        );
        // psql (libpq) connects with it as given.
        let out = cluster
            .client_command("psql")
            .args([
                "-X",
                "-A",
                "-t",
                "-d",
                &url,
                "-c",
                "select current_database()",
            ])
            .output()
            .unwrap();
        check("psql", &out);
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), name);
    }

    #[test]
    fn the_shared_cluster_is_one_server_and_fresh_databases_never_collide() {
        let first = shared();
        let second = shared();
        assert!(std::ptr::eq(first, second));
        let names: std::collections::BTreeSet<String> =
            (0..3).map(|_| first.fresh_database("9 same")).collect();
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(names.iter().all(|u| u.contains("/d9_same_")), "{names:?}");
    }

    #[test]
    fn a_bad_database_name_is_refused_with_what_is_allowed() {
        for bad in ["", "Upper", "1st", "semi;colon", &"x".repeat(64)] {
            let err = std::panic::catch_unwind(|| shared().create_database(bad)).unwrap_err();
            let text = err.downcast_ref::<String>().cloned().unwrap_or_default();
            assert!(
                text.contains("lower-case letters, digits and _"),
                "{bad}: {text}"
            );
        }
    }

    const HOLD_ENV: &str = "AGENT_VAULT_PGTEST_HOLD";

    /// Not a test of its own: with AGENT_VAULT_PGTEST_HOLD set, the process the next
    /// test starts, which starts a cluster, prints it and waits to be killed.
    #[test]
    fn a_cluster_held_until_killed() {
        if std::env::var_os(HOLD_ENV).is_none() {
            return;
        }
        let cluster = Cluster::start();
        println!(
            "HELD {} {}",
            cluster.server_pid().unwrap(),
            cluster.data_dir().display()
        );
        std::thread::sleep(std::time::Duration::from_secs(120));
    }

    #[test]
    fn a_test_process_killed_with_sigkill_leaves_no_server_and_no_dir_behind() {
        use std::io::BufRead;
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "tests::a_cluster_held_until_killed",
                "--nocapture",
            ])
            .env(HOLD_ENV, "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let held = lines
            .by_ref()
            .map_while(Result::ok)
            .find_map(|l| l.strip_prefix("HELD ").map(str::to_string))
            .expect("the child started a cluster");
        let (pid, data) = held.split_once(' ').unwrap();
        let pid: u32 = pid.parse().unwrap();
        let data = PathBuf::from(data);
        assert!(Path::new(&format!("/proc/{pid}")).exists());
        child.kill().unwrap();
        child.wait().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while (Path::new(&format!("/proc/{pid}")).exists() || data.exists())
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "the postmaster {pid} outlived the killed test process"
        );
        assert!(
            !data.parent().unwrap().exists(),
            "{} outlived the killed test process",
            data.display()
        );
    }

    #[test]
    fn percent_encoding_keeps_paths_readable_and_escapes_the_rest() {
        assert_eq!(percent_encode("/tmp/pgX1/sock"), "/tmp/pgX1/sock");
        assert_eq!(percent_encode("a b&c=d?"), "a%20b%26c%3Dd%3F");
    }
}
