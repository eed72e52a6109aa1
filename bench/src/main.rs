//! `agent-vault-bench`: the benchmark of DESIGN.md §12, run by `./dev bench`.
//!
//! On loopback only: a minimal upstream (in this process), control planes (the release
//! `agent-vault server`, one per variant that talks to one, so each counts only its own
//! variant's calls), and one Envoy per variant from the same binary with
//! `--concurrency 2`. The plain-request variants are driven by `wrk` with the same
//! requests, the HTTPS interception pair (h, j) by this program's own HTTPS agents
//! (`https`: CONNECT, then TLS inside the tunnel), the gRPC pair (k, l) by its own
//! unary calls over h2c (`grpc`), at 1 and 16 connections, all alternating over rounds
//! (each round starts at a different variant); medians are reported. Then the control
//! plane alone, the 10k × 1k snapshot, Envoy's memory, the first handshakes to new
//! hosts, and propagation of revocations under load: on one node with and without the
//! snapshot long-poll, and across two control planes on one PostgreSQL database (a
//! server of the bench's own), one Envoy each. Prints one table and writes
//! `BENCHMARKS.md`.
//!
//! ```text
//! agent-vault-bench --envoy PATH --agent-vault PATH --filter-wasm PATH --noop-wasm PATH
//!     [--rounds 12] [--duration 2] [--events 50] [--pg-events 50] [--handshakes 200]
//!     [--grpc-streams 1] [--out BENCHMARKS.md] [--command TEXT]
//! ```

mod controlplane;
mod envoy;
mod features;
mod grpc;
mod https;
mod load;
mod procs;
mod propagation;
mod report;
mod seed;
mod steady;
mod upstream;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agent_vault_testkit::http;
use controlplane::{ControlPlane, Counts};
use envoy::{Envoy, Inputs, Variant};
use load::Run;
use upstream::{SeenCounts, Upstream};

pub struct Args {
    pub envoy: PathBuf,
    pub agent_vault: PathBuf,
    pub filter_wasm: PathBuf,
    pub noop_wasm: PathBuf,
    pub rounds: usize,
    pub duration: Duration,
    pub connections: Vec<usize>,
    pub events: usize,
    /// Revocations timed on (p), the filter with plain polling (0: none).
    pub poll_events: usize,
    /// Revocations timed across two control planes on PostgreSQL (0: none).
    pub pg_events: usize,
    /// New host names whose first handshake is timed (0: none).
    pub handshakes: usize,
    pub cp_duration: Duration,
    pub big_services: usize,
    pub big_agents: usize,
    pub out: Option<PathBuf>,
    pub command: String,
    /// Variants to run (letters); all by default. For quick comparisons while
    /// optimizing; the committed numbers come from a full run.
    pub variants: Vec<Variant>,
    pub skip_cp_alone: bool,
    /// Skip the PostgreSQL measurements (the 10k × 1k control plane on a database, and
    /// propagation across two control planes on one).
    pub skip_postgres: bool,
    /// Keep the work directory (configs, Envoy logs) after a successful run.
    pub keep_workdir: bool,
    /// Adds variant (x): this build of the filter, alternated with the others.
    pub candidate_wasm: Option<PathBuf>,
    /// (x)'s request log: through Envoy's access log (`true`, as shipped) or posted
    /// by the filter with the previous configuration (`--candidate-request-log post`).
    pub candidate_access_log: bool,
    /// `--candidate-request-log state_only`: (x) sets the state, Envoy logs nothing.
    pub candidate_state_only: bool,
    /// Rounds of the body features' pairs ([`features`]; 0: skipped).
    pub feature_rounds: usize,
    /// Seconds of steady load on (e) with the default TTL ([`steady`]; 0: skipped).
    pub steady_secs: u64,
    /// Concurrent gRPC calls on each connection of (k) and (l).
    pub grpc_streams: usize,
}

const USAGE: &str =
    "usage: agent-vault-bench --envoy PATH --agent-vault PATH --filter-wasm PATH --noop-wasm PATH
    [--rounds N]            rounds of every variant at every connection count (12)
    [--duration SECS]       each measured run (2)
    [--connections 1,16]    connection counts
    [--variants abcdefghijklp] only these variants (all by default); the committed numbers come
                            from a full run: (a) no filter, (b) no-op wasm, (i) no-op wasm adding
                            the route header, (c) credential_injector, (d) ext_authz, (e) our
                            filter warm, (p) the same without the snapshot long-poll, (f) cache
                            off, (g) 10k x 1k, (h) HTTPS agents through the forward proxy
                            without the filter, (j) the same with it, (k) gRPC unary calls over
                            h2c without the filter, (l) the same with it, warm
    [--grpc-streams N]      concurrent gRPC calls on each of (k)'s and (l)'s connections (1: as
                            many calls in flight as wrk has requests)
    [--events N]            revocations timed for propagation, on (e) (50; 0: none)
    [--poll-events N]       the same on (p), the filter without its long-poll, for comparison, when
                            (p) is among the variants (20; 0: none)
    [--pg-events N]         the same across two control planes on one PostgreSQL database, one
                            Envoy each, changes through the first: N idle, then N under load
                            (50; 0: none)
    [--handshakes N]        first handshakes to new host names, on (j) (200; 0: none)
    [--cp-duration SECS]    each run of the control plane alone (3)
    [--skip-cp-alone]
    [--skip-postgres]       no PostgreSQL measurements (the 10k x 1k control plane on a database,
                            propagation across two control planes)
    [--big-services N] [--big-agents N]   the big control plane (10000, 1000)
    [--candidate-wasm PATH] adds variant (x): this build of the filter, alternated with the others
    [--candidate-request-log post|access_log|state_only]  (x)'s request log: post (the default,
                            as shipped: no access log, no request_log field, so a build from before
                            the field runs too), access_log: through Envoy's gRPC access log
                            (request_log access_log), or state_only: request_log access_log without
                            Envoy's access log (what setting the filter state costs alone)
    [--feature-rounds N]    rounds of the body features (substitution, redaction; 6; 0: none)
    [--steady-secs N]       steady load on (e) with the default TTL, counting the requests that
                            wait on a credential fetch (300; 0: none)
    [--out FILE|-]          where the Markdown goes (BENCHMARKS.md; -: nowhere)
    [--command TEXT]        the command shown in it
    [--keep-workdir]        keep the generated configs and logs";

fn usage() -> ! {
    eprintln!("{USAGE}");
    std::process::exit(2);
}

fn parse_args() -> Args {
    let mut args = Args {
        envoy: PathBuf::new(),
        agent_vault: PathBuf::new(),
        filter_wasm: PathBuf::new(),
        noop_wasm: PathBuf::new(),
        rounds: 12,
        duration: Duration::from_secs(2),
        connections: vec![1, 16],
        events: 50,
        poll_events: 20,
        pg_events: 50,
        handshakes: 200,
        cp_duration: Duration::from_secs(3),
        big_services: 10_000,
        big_agents: 1_000,
        out: Some(PathBuf::from("BENCHMARKS.md")),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        variants: Variant::ALL.to_vec(),
        skip_cp_alone: false,
        skip_postgres: false,
        keep_workdir: false,
        candidate_wasm: None,
        candidate_access_log: false,
        candidate_state_only: false,
        feature_rounds: 6,
        steady_secs: 300,
        grpc_streams: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        let number = |v: String| v.parse::<usize>().unwrap_or_else(|_| usage());
        match flag.as_str() {
            "--envoy" => args.envoy = value().into(),
            "--agent-vault" => args.agent_vault = value().into(),
            "--filter-wasm" => args.filter_wasm = value().into(),
            "--noop-wasm" => args.noop_wasm = value().into(),
            "--rounds" => args.rounds = number(value()).max(1),
            "--duration" => args.duration = Duration::from_secs(number(value()).max(1) as u64),
            "--cp-duration" => {
                args.cp_duration = Duration::from_secs(number(value()).max(1) as u64)
            }
            "--connections" => {
                args.connections = value()
                    .split(',')
                    .map(|c| number(c.trim().to_string()))
                    .collect()
            }
            "--events" => args.events = number(value()),
            "--poll-events" => args.poll_events = number(value()),
            "--pg-events" => args.pg_events = number(value()),
            "--handshakes" => args.handshakes = number(value()),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "--big-services" => args.big_services = number(value()).max(1),
            "--big-agents" => args.big_agents = number(value()).max(1),
            "--out" => {
                let v = value();
                args.out = (v != "-").then(|| v.into());
            }
            "--command" => args.command = value(),
            "--variants" => {
                let letters = value();
                args.variants = Variant::ALL
                    .into_iter()
                    .filter(|v| letters.contains(v.letter()))
                    .collect();
            }
            "--skip-cp-alone" => args.skip_cp_alone = true,
            "--skip-postgres" => args.skip_postgres = true,
            "--keep-workdir" => args.keep_workdir = true,
            "--candidate-wasm" => args.candidate_wasm = Some(value().into()),
            "--candidate-request-log" => {
                args.candidate_access_log = match value().as_str() {
                    "access_log" => true,
                    "post" => false,
                    "state_only" => {
                        args.candidate_state_only = true;
                        true
                    }
                    other => {
                        eprintln!(
                            "agent-vault-bench: --candidate-request-log is access_log, post or state_only, not {other:?}"
                        );
                        usage()
                    }
                }
            }
            "--feature-rounds" => args.feature_rounds = number(value()),
            "--steady-secs" => args.steady_secs = number(value()) as u64,
            "--grpc-streams" => args.grpc_streams = number(value()).max(1),
            _ => usage(),
        }
    }
    if args.candidate_wasm.is_some() {
        args.variants.push(Variant::Candidate);
    }
    for (what, path) in [
        ("--envoy", &args.envoy),
        ("--agent-vault", &args.agent_vault),
        ("--filter-wasm", &args.filter_wasm),
        ("--noop-wasm", &args.noop_wasm),
    ] {
        if !path.is_file() {
            eprintln!("agent-vault-bench: {what} {} is not a file", path.display());
            usage();
        }
    }
    args
}

/// Requests each HTTPS connection sends before a measured window.
pub const HTTPS_WARMUP_REQUESTS: usize = 20;
/// Calls each gRPC connection makes before a measured window.
pub const GRPC_WARMUP_CALLS: usize = 20;

fn log(message: &str) {
    eprintln!("bench: {message}");
}

/// One measured load run of one variant.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub variant: Variant,
    pub connections: usize,
    pub round: usize,
    pub run: Run,
    pub cp: Counts,
    pub upstream: SeenCounts,
    /// Envoy CPU time per request, µs.
    pub envoy_cpu_us: f64,
    /// Control plane CPU time per request, µs (0 without a control plane).
    pub cp_cpu_us: f64,
}

/// Control plane alone, at one size.
#[derive(Debug, Clone, Default)]
pub struct CpAlone {
    pub services: usize,
    pub agents: usize,
    pub fetch: Vec<(usize, Run)>,
    pub not_modified: Vec<(usize, Run)>,
    /// Server-side build (read the store + serialize), median, ms.
    pub build_ms: f64,
    /// Client-side first GET after a change (build + transfer), median, ms.
    pub cold_get_ms: f64,
    /// Client-side GET of the cached snapshot (200, no If-None-Match), median, ms.
    pub warm_get_ms: f64,
    pub bytes: u64,
    pub seed_secs: f64,
}

/// Memory of the Envoys after the runs.
#[derive(Debug, Clone, Default)]
pub struct Memory {
    pub rss_kib: BTreeMap<&'static str, u64>,
    /// Snapshot polls per second seen by the big control plane (= VMs that poll).
    pub polling_vms: f64,
    /// (x)'s request log through Envoy's gRPC access log, after the runs: entries
    /// Envoy wrote and dropped (`access_logs.grpc_access_log.logs_written` /
    /// `logs_dropped`), and records its control plane received (`als_records`).
    pub request_log: Option<(u64, u64, u64)>,
}

/// Propagation across two control planes on one PostgreSQL database.
pub struct PgPropagation {
    /// With nothing else going on.
    pub idle: Vec<propagation::Event>,
    /// Under load on both Envoys.
    pub loaded: Vec<propagation::Event>,
    /// Callouts of both Envoys to their control planes that timed out under load
    /// (Envoy's `upstream_rq_timeout` of the control-plane cluster).
    pub callout_timeouts: u64,
    /// Request-log records and batches both control planes took in under load.
    pub log_records: u64,
    pub log_posts: u64,
}

pub struct Results {
    pub samples: Vec<Sample>,
    pub cp_small: CpAlone,
    pub cp_big: CpAlone,
    /// The big control plane's store on PostgreSQL instead of sled (same seed).
    pub cp_big_postgres: Option<CpAlone>,
    pub memory: Memory,
    pub propagation: Vec<propagation::Event>,
    /// The same on (p): the filter without its long-poll.
    pub propagation_polling: Vec<propagation::Event>,
    /// Two control planes on one PostgreSQL database, one Envoy each (the (e)
    /// config); the changes go through the first (`None`: not run).
    pub propagation_postgres: Option<PgPropagation>,
    /// First handshakes to new hosts on (j).
    pub handshakes: Option<https::Handshakes>,
    pub started: Instant,
    pub load_before: String,
    pub load_after: String,
    pub envoy_version: String,
    pub checks: Vec<String>,
    /// The body features' pairs, if run.
    pub features: Option<features::Results>,
    /// Steady load on (e) with the default TTL, if run.
    pub steady: Option<steady::Steady>,
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut buf);
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn main() {
    let args = parse_args();
    match run(&args) {
        Ok(()) => {}
        Err(error) => {
            eprintln!("agent-vault-bench: {error}");
            std::process::exit(1);
        }
    }
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub(crate) fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

fn run(args: &Args) -> Result<(), String> {
    let started = Instant::now();
    let load_before = report::loadavg();
    let workdir = std::env::temp_dir().join(format!("agent-vault-bench-{}", std::process::id()));
    std::fs::create_dir_all(&workdir).map_err(|e| e.to_string())?;
    let result = run_in(args, &workdir, started, load_before);
    if result.is_ok() && !args.keep_workdir {
        let _ = std::fs::remove_dir_all(&workdir);
    } else {
        log(&format!("kept {} for inspection", workdir.display()));
    }
    result
}

fn run_in(
    args: &Args,
    workdir: &Path,
    started: Instant,
    load_before: String,
) -> Result<(), String> {
    let secret = format!("sk_bench_{}", random_hex(12));
    // One upstream per variant: a request still in flight when one run ends is never
    // counted in another variant's run.
    let mut upstreams: BTreeMap<&'static str, Upstream> = BTreeMap::new();
    for variant in Variant::ALL.into_iter().chain([Variant::Candidate]) {
        let credential = format!("authorization: Bearer {secret}");
        let upstream = if variant.grpc() {
            grpc::upstream(&credential)
        } else {
            Upstream::start(&credential)
        }
        .map_err(|e| e.to_string())?;
        upstreams.insert(variant.letter(), upstream);
    }
    let up = |letter: &str| upstreams[letter].port;
    let mut checks = Vec::new();

    // Control planes: one per variant that has one (d, e, f, p, x small; h, j small
    // with the wildcard of the first handshakes; l small with the load's service h2c;
    // g big).
    log("starting control planes and seeding (10 services × 10 agents; 10k × 1k)");
    let mut cps: BTreeMap<&'static str, ControlPlane> = BTreeMap::new();
    let mut seeded: BTreeMap<&'static str, seed::Seeded> = BTreeMap::new();
    let candidate = args.candidate_wasm.is_some().then_some("x");
    let polling = args
        .variants
        .contains(&Variant::FilterPolling)
        .then_some("p");
    for letter in ["d", "e", "f"].into_iter().chain(candidate).chain(polling) {
        let cp = ControlPlane::start(&args.agent_vault, workdir, &format!("cp-{letter}"))?;
        seeded.insert(letter, seed::small(&cp, up(letter), &secret)?);
        cps.insert(letter, cp);
    }
    for variant in [Variant::HttpsPlain, Variant::HttpsFilter] {
        if args.variants.contains(&variant) {
            let letter = variant.letter();
            let cp = ControlPlane::start(&args.agent_vault, workdir, &format!("cp-{letter}"))?;
            seeded.insert(letter, seed::https(&cp, up(letter), &secret)?);
            cps.insert(letter, cp);
        }
    }
    if args.variants.contains(&Variant::GrpcFilter) {
        let letter = Variant::GrpcFilter.letter();
        let cp = ControlPlane::start(&args.agent_vault, workdir, &format!("cp-{letter}"))?;
        seeded.insert(letter, seed::grpc(&cp, up(letter), &secret)?);
        cps.insert(letter, cp);
    }
    let big = ControlPlane::start(&args.agent_vault, workdir, "cp-g")?;
    let seed_start = Instant::now();
    seeded.insert(
        "g",
        seed::big(&big, up("g"), &secret, args.big_services, args.big_agents)?,
    );
    let big_seed_secs = seed_start.elapsed().as_secs_f64();
    log(&format!(
        "seeded {} services × {} agents in {big_seed_secs:.1} s",
        args.big_services, args.big_agents
    ));
    cps.insert("g", big);
    for cp in cps.values() {
        cp.wait_socket()?;
    }

    // The control plane alone (before any Envoy polls it).
    log("control plane alone: credential fetches, snapshot builds, the 304 path");
    let (cp_small, mut cp_big) = if args.skip_cp_alone {
        (CpAlone::default(), CpAlone::default())
    } else {
        (
            control_plane_alone(&cps["e"], &seeded["e"], args)?,
            control_plane_alone(&cps["g"], &seeded["g"], args)?,
        )
    };
    cp_big.seed_secs = big_seed_secs;

    // The same big control plane with its store on PostgreSQL (a server of the
    // bench's own, on a Unix socket), alone: fetches, snapshot builds, the 304 path.
    let postgres = if args.skip_postgres || args.skip_cp_alone {
        None
    } else {
        log("PostgreSQL: the 10k × 1k control plane on a database of its own, alone");
        let cluster = agent_vault_pgtest::Cluster::start();
        let url = cluster.create_database("bench_big");
        let store = controlplane::Store::Postgres {
            url: &url,
            key_from: None,
        };
        let cp = ControlPlane::start_on(&args.agent_vault, workdir, "cp-gp", store)?;
        let start = Instant::now();
        let seeded_pg = seed::big(&cp, up("g"), &secret, args.big_services, args.big_agents)?;
        let seed_secs = start.elapsed().as_secs_f64();
        cp.wait_socket()?;
        let mut alone = control_plane_alone(&cp, &seeded_pg, args)?;
        alone.seed_secs = seed_secs;
        drop(cp);
        drop(cluster);
        Some(alone)
    };

    // Envoys.
    log("starting one Envoy per variant");
    let static_credential = format!("Bearer {secret}");
    let mut envoys: Vec<Envoy> = Vec::new();
    for &variant in &args.variants {
        let cp = cps.get(variant.letter()).unwrap_or(&cps["e"]);
        let inputs = envoy_inputs(args, cp, up(variant.letter()), workdir, &static_credential);
        envoys.push(Envoy::start(&args.envoy, variant, &inputs)?);
    }
    // The HTTPS agents of (h) and (j): the load's agent, trusting the variant's proxy CA.
    let mut agents: BTreeMap<&'static str, https::Agent> = BTreeMap::new();
    for envoy in envoys.iter().filter(|e| e.variant.https()) {
        let letter = envoy.variant.letter();
        let cp = &cps[letter];
        let ca = std::fs::read_to_string(&cp.proxy_ca)
            .map_err(|e| format!("{}: {e}", cp.proxy_ca.display()))?;
        let agent = https::Agent::new(
            envoy.port,
            &format!("localhost:{}", up(letter)),
            &http::proxy_basic(&seeded[letter].agent_token, "default"),
            &ca,
        )?;
        agents.insert(letter, agent);
    }
    let token_for = |variant: Variant| {
        &seeded
            .get(variant.letter())
            .unwrap_or(&seeded["e"])
            .agent_token
    };
    let headers_for = |variant: Variant| -> Vec<(String, String)> {
        let token = token_for(variant);
        vec![
            ("Host".into(), format!("localhost:{}", up(variant.letter()))),
            (
                "Proxy-Authorization".into(),
                http::proxy_basic(token, "default"),
            ),
        ]
    };

    // The gRPC pair's calls: the same agent and `:authority` as the other variants'
    // requests.
    let call_for = |envoy: &Envoy| grpc::Call {
        proxy_port: envoy.port,
        authority: format!("localhost:{}", up(envoy.variant.letter())),
        proxy_authorization: http::proxy_basic(token_for(envoy.variant), "default"),
    };

    // Ready: every variant answers 200 (the filters have their snapshot), and the
    // upstream sees what it should.
    for envoy in &envoys {
        if envoy.variant.grpc() {
            grpc_ready(envoy, &call_for(envoy), &upstreams[envoy.variant.letter()])?;
            continue;
        }
        let headers = headers_for(envoy.variant);
        let pairs: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let upstream = &upstreams[envoy.variant.letter()];
            let before = upstream.counts();
            let response = match agents.get(envoy.variant.letter()) {
                // A tunnel (its certificate comes from the control plane on the first
                // handshake), one request inside.
                Some(agent) => agent
                    .open(agent.host())
                    .and_then(|(mut tunnel, _)| {
                        tunnel
                            .request("GET", "/bench", &[], None)
                            .map_err(|e| e.to_string())
                    })
                    .map_err(std::io::Error::other),
                None => http::tcp_once(envoy.port, "GET", "/bench", &pairs, None),
            };
            let seen = upstream.counts().since(before);
            match response {
                Ok(r) if r.status == 200 => {
                    if envoy.variant.injects() && seen.with_credential != 1 {
                        return Err(format!(
                            "variant ({}) did not inject the credential",
                            envoy.variant.letter()
                        ));
                    }
                    break;
                }
                Ok(r) if Instant::now() > deadline => {
                    return Err(format!(
                        "variant ({}) answers {} {}",
                        envoy.variant.letter(),
                        r.status,
                        r.text()
                    ));
                }
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("variant ({}): {e}", envoy.variant.letter()));
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
    log("warming up every variant (1 s each, not recorded)");
    for envoy in &envoys {
        match agents.get(envoy.variant.letter()) {
            Some(agent) => {
                https::Load::open(agent, 16, "/bench", HTTPS_WARMUP_REQUESTS)?
                    .run(Duration::from_secs(1))?;
            }
            None if envoy.variant.grpc() => {
                grpc::Load::open(&call_for(envoy), 16, args.grpc_streams, GRPC_WARMUP_CALLS)?
                    .run(Duration::from_secs(1))?;
            }
            None => {
                let headers = headers_for(envoy.variant);
                let target = load::Target {
                    port: envoy.port,
                    path: "/bench",
                    headers: &headers,
                };
                load::wrk(&target, 16, Duration::from_secs(1))?;
            }
        }
    }

    // The rounds.
    let total = args.rounds * envoys.len() * args.connections.len();
    log(&format!(
        "{} rounds × {} variants × {:?} connections × {} s = {total} runs",
        args.rounds,
        envoys.len(),
        args.connections,
        args.duration.as_secs()
    ));
    let tck = clk_tck();
    let mut samples = Vec::with_capacity(total);
    // Within a round, the runs of one connection count follow each other, so the
    // variants a ratio compares ran seconds apart (this machine's speed drifts).
    for round in 0..args.rounds {
        for &connections in &args.connections {
            for k in 0..envoys.len() {
                let envoy = &envoys[(k + round) % envoys.len()];
                let cp = cps.get(envoy.variant.letter());
                let headers = headers_for(envoy.variant);
                let target = load::Target {
                    port: envoy.port,
                    path: "/bench",
                    headers: &headers,
                };
                // HTTPS agents open and warm their tunnels before anything is read:
                // the window is the requests alone, as wrk's is.
                let tunnels = match agents.get(envoy.variant.letter()) {
                    Some(agent) => Some(https::Load::open(
                        agent,
                        connections,
                        "/bench",
                        HTTPS_WARMUP_REQUESTS,
                    )?),
                    None => None,
                };
                // So do the gRPC agents their connections.
                let calls = if envoy.variant.grpc() {
                    Some(grpc::Load::open(
                        &call_for(envoy),
                        connections,
                        args.grpc_streams,
                        GRPC_WARMUP_CALLS,
                    )?)
                } else {
                    None
                };
                let cp_before = cp.map(ControlPlane::counts).unwrap_or_default();
                let upstream = &upstreams[envoy.variant.letter()];
                let up_before = upstream.counts();
                let envoy_cpu = procs::cpu_ticks(envoy.proc.pid()).unwrap_or(0);
                let cp_cpu = cp.and_then(|c| procs::cpu_ticks(c.proc.pid())).unwrap_or(0);
                let run = match (tunnels, calls) {
                    (Some(tunnels), _) => tunnels.run(args.duration)?,
                    (None, Some(calls)) => calls.run(args.duration)?,
                    (None, None) => load::wrk(&target, connections, args.duration)?,
                };
                let envoy_cpu = procs::cpu_ticks(envoy.proc.pid()).unwrap_or(0) - envoy_cpu;
                let cp_cpu = cp
                    .and_then(|c| procs::cpu_ticks(c.proc.pid()))
                    .unwrap_or(0)
                    .saturating_sub(cp_cpu);
                let cp_counts = cp.map(|c| c.counts().since(cp_before)).unwrap_or_default();
                let seen = upstream.counts().since(up_before);
                let per_request = |ticks: u64| {
                    if run.requests == 0 {
                        0.0
                    } else {
                        ticks as f64 / tck * 1e6 / run.requests as f64
                    }
                };
                let sample = Sample {
                    variant: envoy.variant,
                    connections,
                    round,
                    run,
                    cp: cp_counts,
                    upstream: seen,
                    envoy_cpu_us: per_request(envoy_cpu),
                    cp_cpu_us: if cp.is_some() {
                        per_request(cp_cpu)
                    } else {
                        0.0
                    },
                };
                log(&format!(
                    "round {} ({}) c={connections:>2}: {:>8.0} req/s  p50 {:>7.1} µs  p99 {:>7.1} µs  non-2xx {}  cp calls {}  envoy cpu {:.1} µs/req",
                    round + 1,
                    envoy.variant.letter(),
                    run.rps,
                    run.p50_us,
                    run.p99_us,
                    run.non_2xx + run.socket_errors,
                    cp_counts.calls(),
                    sample.envoy_cpu_us,
                ));
                if envoy.variant.injects() && seen.with_credential != seen.requests {
                    checks.push(format!(
                        "({}) c={connections} round {}: the upstream saw the credential on {} of {} requests",
                        envoy.variant.letter(), round + 1, seen.with_credential, seen.requests
                    ));
                }
                if envoy.variant.needs_agent() && seen.with_proxy_authorization > 0 {
                    checks.push(format!(
                        "({}) c={connections} round {}: {} requests reached the upstream with the agent's Proxy-Authorization",
                        envoy.variant.letter(), round + 1, seen.with_proxy_authorization
                    ));
                }
                samples.push(sample);
            }
        }
    }

    // Memory: RSS of every Envoy now that the filters hold their snapshots; and how
    // many VMs poll the big control plane (each polls once a second).
    let mut memory = Memory::default();
    for envoy in &envoys {
        if let Some(kib) = procs::rss_kib(envoy.proc.pid()) {
            memory.rss_kib.insert(envoy.variant.letter(), kib);
        }
    }
    let polls_before = cps["g"].counts();
    std::thread::sleep(Duration::from_secs(4));
    // Longer than the access log's flush interval since the last run: every entry
    // of (e) has been sent.
    // (x) with its request log through Envoy's access log: nothing may be lost.
    let logging = args.candidate_access_log && !args.candidate_state_only;
    if let (true, Some(envoy), Some(cp)) = (
        logging,
        envoys.iter().find(|e| e.variant == Variant::Candidate),
        cps.get("x"),
    ) {
        let written = envoy
            .counter_sum("access_logs.grpc_access_log.logs_written")
            .unwrap_or(0);
        let dropped = envoy
            .counter_sum("access_logs.grpc_access_log.logs_dropped")
            .unwrap_or(0);
        let received = cp.counts().als_records;
        log(&format!(
            "(x) request log through Envoy's access log: {written} entries written, {dropped} dropped; \
             the control plane received {received} records"
        ));
        if dropped > 0 || received < written {
            checks.push(format!(
                "(x) request log: Envoy wrote {written} access-log entries and dropped {dropped}; \
                 the control plane received {received}"
            ));
        }
        memory.request_log = Some((written, dropped, received));
    }
    let counts = cps["g"].counts();
    let polls = counts.since(polls_before);
    // With the long-poll each VM holds one request; without it each polls once a second.
    memory.polling_vms = if counts.long_polls_held > 0 {
        counts.long_polls_held as f64
    } else {
        (polls.snapshot_full + polls.snapshot_not_modified) as f64 / 4.0
    };

    // Steady load on (e) with the default TTL, before propagation (whose changes drop
    // the caches): how many requests wait on a credential fetch.
    let mut steady = None;
    if let (true, Some(envoy)) = (
        args.steady_secs > 0,
        envoys.iter().find(|e| e.variant == Variant::FilterWarm),
    ) {
        log(&format!(
            "steady load on (e): wrk -c{} for {} s with the default TTL ({} s)",
            steady::CONNECTIONS,
            args.steady_secs,
            steady::TTL_MS / 1000
        ));
        let headers = headers_for(Variant::FilterWarm);
        let target = load::Target {
            port: envoy.port,
            path: "/bench",
            headers: &headers,
        };
        let result = steady::run(envoy, &cps["e"], &target, args.steady_secs)?;
        log(&format!(
            "steady load: {} requests, {:?} waited on a fetch, {:?} background refreshes, {} credential fetches at the control plane",
            result.requests, result.waited, result.refreshes, result.cp_fetches
        ));
        steady = Some(result);
    }

    // First handshakes to new hosts on (j), after the runs: every name makes Envoy ask
    // the control plane for a certificate it mints and pushes.
    let mut handshakes = None;
    if let (true, Some(agent), Some(envoy)) = (
        args.handshakes > 0,
        agents.get("j"),
        envoys.iter().find(|e| e.variant == Variant::HttpsFilter),
    ) {
        log(&format!(
            "first handshakes: {} new names under *.{}, each followed by a second handshake",
            args.handshakes,
            seed::NEW_HOSTS_DOMAIN
        ));
        let before = envoy.counter_sum("on_demand_secret.cert_requested");
        let mut result = https::first_handshakes(agent, seed::NEW_HOSTS_DOMAIN, args.handshakes);
        result.envoy_cert_requests = envoy
            .counter_sum("on_demand_secret.cert_requested")
            .zip(before)
            .map(|(after, before)| after.saturating_sub(before));
        if result.first.is_empty() {
            return Err(format!(
                "first handshakes: none worked: {}",
                result.first_error.unwrap_or_default()
            ));
        }
        if result.failed > 0 {
            checks.push(format!(
                "first handshakes: {} of {} names failed: {}",
                result.failed,
                result.names,
                result.first_error.clone().unwrap_or_default()
            ));
        }
        handshakes = Some(result);
    }

    // Propagation on one node, under load (`wrk -c4` as another agent): on (e), and
    // the same with the long-poll off on (p), each on its own control plane and
    // upstream.
    let one_node = |variant: Variant, probe: &str, events: usize| {
        let letter = variant.letter();
        let envoy = envoys
            .iter()
            .find(|e| e.variant == variant)
            .ok_or(format!("no ({letter})"))?;
        let headers = headers_for(variant);
        let prober = seeded[letter].prober_token.clone().ok_or("no prober")?;
        let budget = Duration::from_secs(events as u64 * 6 + 30);
        propagation::run(
            &[envoy],
            &cps[letter],
            up(letter),
            &prober,
            probe,
            events,
            || {
                let target = load::Target {
                    port: envoy.port,
                    path: "/bench",
                    headers: &headers,
                };
                Ok(vec![load::wrk_background(&target, 4, budget)?])
            },
        )
    };
    let mut propagation = Vec::new();
    if args.events > 0 && args.variants.contains(&Variant::FilterWarm) {
        log(&format!(
            "propagation: {} revocations under load on (e)",
            args.events
        ));
        propagation = one_node(Variant::FilterWarm, "probe", args.events)?;
    }
    let mut propagation_polling = Vec::new();
    if args.poll_events > 0 && args.variants.contains(&Variant::FilterPolling) {
        log(&format!(
            "propagation without the long-poll: {} revocations under load on (p)",
            args.poll_events
        ));
        propagation_polling = one_node(Variant::FilterPolling, "probe-polling", args.poll_events)?;
    }

    // Two control planes on one PostgreSQL database, one Envoy each (the (e) config,
    // with the long-poll); the changes go through the first.
    let propagation_postgres = if args.pg_events > 0 && !args.skip_postgres {
        propagation_across_postgres(args, workdir, &secret, &static_credential)?
    } else {
        None
    };

    let features = if args.feature_rounds > 0 {
        Some(features::run(
            args,
            workdir,
            &secret,
            args.feature_rounds,
            &mut checks,
        )?)
    } else {
        None
    };

    let results = Results {
        features,
        steady,
        samples,
        cp_small,
        cp_big,
        cp_big_postgres: postgres,
        memory,
        propagation,
        propagation_polling,
        propagation_postgres,
        handshakes,
        started,
        load_before,
        load_after: report::loadavg(),
        envoy_version: Envoy::version(&args.envoy),
        checks,
    };
    let (table, markdown) = report::render(args, &results);
    println!("{table}");
    if let Some(out) = &args.out {
        std::fs::write(out, markdown).map_err(|e| format!("write {}: {e}", out.display()))?;
        log(&format!("wrote {}", out.display()));
    }
    Ok(())
}

/// Waits until `envoy`, a gRPC variant, answers a call OK, and checks that the upstream
/// saw the credential on it when the variant injects one.
fn grpc_ready(envoy: &Envoy, call: &grpc::Call, upstream: &Upstream) -> Result<(), String> {
    let letter = envoy.variant.letter();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let before = upstream.counts();
        let outcome = grpc::call_once(call);
        let seen = upstream.counts().since(before);
        match outcome {
            Ok(outcome) if outcome.ok() => {
                if envoy.variant.injects() && seen.with_credential != 1 {
                    return Err(format!("variant ({letter}) did not inject the credential"));
                }
                return Ok(());
            }
            Ok(outcome) if Instant::now() > deadline => {
                return Err(format!(
                    "variant ({letter}) answers {} grpc-status {}",
                    outcome.status,
                    outcome.grpc_status.as_deref().unwrap_or("none")
                ));
            }
            Err(e) if Instant::now() > deadline => {
                return Err(format!("variant ({letter}): {e}"));
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Propagation across two control planes P1 and P2 on one PostgreSQL database (a
/// server of the bench's own), each with an Envoy of the (e) config: revocations
/// through P1's API, timed until every worker of both Envoys refuses; first with
/// nothing else going on, then under load on both (`wrk -c2` each: the one-node
/// measurement's four connections, shared).
fn propagation_across_postgres(
    args: &Args,
    workdir: &Path,
    secret: &str,
    static_credential: &str,
) -> Result<Option<PgPropagation>, String> {
    log(&format!(
        "propagation across two control planes on PostgreSQL: {} revocations idle, {} under load",
        args.pg_events, args.pg_events
    ));
    let upstream =
        Upstream::start(&format!("authorization: Bearer {secret}")).map_err(|e| e.to_string())?;
    let cluster = agent_vault_pgtest::Cluster::start();
    let url = cluster.create_database("bench_prop");
    let p1 = ControlPlane::start_on(
        &args.agent_vault,
        workdir,
        "cp-pg1",
        controlplane::Store::Postgres {
            url: &url,
            key_from: None,
        },
    )?;
    let seeded = seed::small(&p1, upstream.port, secret)?;
    let p2 = ControlPlane::start_on(
        &args.agent_vault,
        workdir,
        "cp-pg2",
        controlplane::Store::Postgres {
            url: &url,
            key_from: Some(p1.data_dir()),
        },
    )?;
    let mut envoys = Vec::new();
    for (name, cp) in [("pg1", &p1), ("pg2", &p2)] {
        cp.wait_socket()?;
        // A directory each: the two Envoys share a variant, hence their file names.
        let dir = workdir.join(name);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let inputs = envoy_inputs(args, cp, upstream.port, &dir, static_credential);
        envoys.push(Envoy::start(&args.envoy, Variant::FilterWarm, &inputs)?);
    }
    let host = format!("localhost:{}", upstream.port);
    let auth = http::proxy_basic(&seeded.agent_token, "default");
    let headers = vec![
        ("Host".to_string(), host.clone()),
        ("Proxy-Authorization".to_string(), auth.clone()),
    ];
    for (i, envoy) in envoys.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let before = upstream.counts();
            let response = http::tcp_once(
                envoy.port,
                "GET",
                "/bench",
                &[("Host", &host), ("Proxy-Authorization", &auth)],
                None,
            );
            match response {
                Ok(r) if r.status == 200 => {
                    if upstream.counts().since(before).with_credential != 1 {
                        return Err(format!(
                            "the Envoy of P{} did not inject the credential",
                            i + 1
                        ));
                    }
                    break;
                }
                Ok(r) if Instant::now() > deadline => {
                    return Err(format!(
                        "the Envoy of P{} answers {} {}",
                        i + 1,
                        r.status,
                        r.text()
                    ));
                }
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("the Envoy of P{}: {e}", i + 1));
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
    let prober = seeded.prober_token.clone().ok_or("no prober")?;
    let refs: Vec<&Envoy> = envoys.iter().collect();
    // First with nothing else going on: what the path itself takes.
    let idle = propagation::run(
        &refs,
        &p1,
        upstream.port,
        &prober,
        "probe-pg-idle",
        args.pg_events,
        || Ok(Vec::new()),
    )?;
    // Then under load on both Envoys, counting what the load costs the control planes.
    let budget = Duration::from_secs(args.pg_events as u64 * 6 + 30);
    let timeouts = |envoys: &[Envoy]| -> u64 {
        envoys
            .iter()
            .filter_map(|e| e.counter_sum("agent_vault_control_plane.upstream_rq_timeout"))
            .sum()
    };
    let (timeouts_before, p1_before, p2_before) = (timeouts(&envoys), p1.counts(), p2.counts());
    let loaded = propagation::run(
        &refs,
        &p1,
        upstream.port,
        &prober,
        "probe-pg",
        args.pg_events,
        || {
            envoys
                .iter()
                .map(|envoy| {
                    load::wrk_background(
                        &load::Target {
                            port: envoy.port,
                            path: "/bench",
                            headers: &headers,
                        },
                        2,
                        budget,
                    )
                })
                .collect()
        },
    )?;
    let (p1_took, p2_took) = (p1.counts().since(p1_before), p2.counts().since(p2_before));
    let result = PgPropagation {
        idle,
        loaded,
        callout_timeouts: timeouts(&envoys).saturating_sub(timeouts_before),
        log_records: p1_took.log_records + p2_took.log_records,
        log_posts: p1_took.logs + p2_took.logs,
    };
    drop(envoys);
    drop(p2);
    drop(p1);
    drop(cluster);
    Ok(Some(result))
}

/// Credential fetches, the 304 path and snapshot builds against one control plane.
/// What an Envoy of the bench points at: the filters of `args`, the sockets and proxy
/// CA of `cp`, an upstream port, and where its files go.
pub(crate) fn envoy_inputs<'a>(
    args: &'a Args,
    cp: &'a ControlPlane,
    upstream_port: u16,
    dir: &'a Path,
    static_credential: &'a str,
) -> Inputs<'a> {
    Inputs {
        upstream_port,
        filter_wasm: &args.filter_wasm,
        noop_wasm: &args.noop_wasm,
        candidate_wasm: args.candidate_wasm.as_deref(),
        candidate_access_log: args.candidate_access_log,
        candidate_state_only: args.candidate_state_only,
        socket: &cp.socket,
        sds_socket: &cp.sds_socket,
        proxy_ca: &cp.proxy_ca,
        dir,
        static_credential,
    }
}

fn control_plane_alone(
    cp: &ControlPlane,
    seeded: &seed::Seeded,
    args: &Args,
) -> Result<CpAlone, String> {
    let mut out = CpAlone {
        services: seeded.services,
        agents: seeded.agents,
        ..CpAlone::default()
    };
    let body = serde_json::json!({
        "token_sha256": sha256_hex(&seeded.agent_token),
        "vault": "default",
        "keys": [seed::LOAD_KEY],
    })
    .to_string()
    .into_bytes();
    let json = vec![("Content-Type".to_string(), "application/json".to_string())];
    let fetch = load::SocketRequest {
        method: "POST",
        path: "/v1/dataplane/credentials",
        headers: json,
        body: Some(body),
        expect: 200,
    };
    for clients in [1usize, 16] {
        let run = load::socket_loop(&cp.socket, clients, args.cp_duration, &fetch)?;
        out.fetch.push((clients, run));
    }
    // Snapshot builds: change something (a credential write bumps the version), then
    // the first GET builds; the server times the build, the client the whole GET.
    let mut builds = Vec::new();
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    let mut etag = String::new();
    for i in 0..7 {
        cp.set_credential("BENCH_BUMP", &format!("v{i}"))?;
        let mut conn = cp.socket_conn().map_err(|e| e.to_string())?;
        let t = Instant::now();
        let response = conn
            .request("GET", "/v1/dataplane/snapshot", &[], None)
            .map_err(|e| e.to_string())?;
        cold.push(t.elapsed().as_secs_f64() * 1000.0);
        if response.status != 200 {
            return Err(format!("snapshot: {}", response.status));
        }
        let t = Instant::now();
        let again = conn
            .request("GET", "/v1/dataplane/snapshot", &[], None)
            .map_err(|e| e.to_string())?;
        warm.push(t.elapsed().as_secs_f64() * 1000.0);
        etag = again.header("etag").unwrap_or_default().to_string();
        let counts = cp.counts();
        builds.push(counts.last_build_us as f64 / 1000.0);
        out.bytes = counts.last_snapshot_bytes;
    }
    out.build_ms = report::median(&builds);
    out.cold_get_ms = report::median(&cold);
    out.warm_get_ms = report::median(&warm);
    let not_modified = load::SocketRequest {
        method: "GET",
        path: "/v1/dataplane/snapshot",
        headers: vec![("If-None-Match".to_string(), etag)],
        body: None,
        expect: 304,
    };
    for clients in [1usize, 16] {
        let run = load::socket_loop(&cp.socket, clients, args.cp_duration, &not_modified)?;
        out.not_modified.push((clients, run));
    }
    Ok(out)
}
