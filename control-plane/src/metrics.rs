//! `GET /metrics` on the TCP listener: the control plane's numbers in the Prometheus
//! text format (version 0.0.4), for operators' scrapers.
//!
//! | metric | type | what |
//! |---|---|---|
//! | `agent_vault_http_requests_total{route,method,status}` | counter | management API and UI requests, by route *template* (`/v1/vaults/{vault}/credentials`), never the concrete path |
//! | `agent_vault_dataplane_requests_total{request}` | counter | data-plane socket requests ([`crate::dataplane::DataplaneStats`]) |
//! | `agent_vault_dataplane_log_records_total` | counter | request-log records received from the filters |
//! | `agent_vault_dataplane_access_log_records_total` | counter | request-log records received through Envoy's gRPC access log ([`crate::dataplane::als`]) |
//! | `agent_vault_dataplane_access_log_skipped_total` | counter | access-log entries without the filter's state, not stored |
//! | `agent_vault_dataplane_long_polls_total` | counter | snapshot requests that asked to wait (long-polls; their answers also count as `snapshot_full` / `snapshot_not_modified`) |
//! | `agent_vault_dataplane_long_polls_held` | gauge | long-polls held right now (normally one per filter worker) |
//! | `agent_vault_store_size_bytes` | gauge | what the store takes on disk: sled's files, or PostgreSQL's table with its index |
//! | `agent_vault_proposals_pending` | gauge | proposals waiting for a human, all vaults |
//! | `agent_vault_snapshot_version` | gauge | the rules snapshot version (the filters' `agent_vault.snapshot.version` converges on it) |
//! | `agent_vault_snapshot_builds_total` | counter | snapshots built |
//! | `agent_vault_snapshot_last_build_seconds` | gauge | how long the last build took |
//! | `agent_vault_snapshot_last_bytes` | gauge | size of the last snapshot built |
//! | `agent_vault_leaf_certificates_held` | gauge | leaf certificates of HTTPS interception held for Envoy ([`crate::leaves`]) |
//! | `agent_vault_leaf_certificates_minted_total` | counter | leaf certificates minted (new names, renewals, CA rotations) |
//! | `agent_vault_leaf_certificate_refusals_total{reason}` | counter | certificate names Envoy was refused (told so on a stream): `not_a_host_name`, `no_rule`, `budget_spent`, `too_many_held`, `mint_failed` |
//! | `agent_vault_build_info{version}` | gauge | always 1 |
//!
//! No label carries a secret, a token, a user, an agent or a vault name: labels are
//! route templates, methods, status codes and fixed words, so their number is bounded.
//! Requests no route matched count as `route="unmatched"`. Like `/health`, the
//! endpoint needs no login: keep the listener on loopback or a private network.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use crate::dataplane::DataplaneStats;
use crate::error::Result;
use crate::http::blocking;
use crate::leaves::{LeafStats, Leaves, Refusal};
use crate::store::Store;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// Where the metrics are served (TCP only).
pub const METRICS_PATH: &str = "/metrics";
/// `Content-Type` of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Requests counted by (route template, method, status).
#[derive(Debug, Default)]
pub struct HttpMetrics(Mutex<BTreeMap<(String, &'static str, u16), u64>>);

impl HttpMetrics {
    /// Counts one answered request.
    pub fn record(&self, route: Option<&str>, method: &Method, status: StatusCode) {
        let key = (
            route.unwrap_or("unmatched").to_owned(),
            method_label(method),
            status.as_u16(),
        );
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *counts.entry(key).or_insert(0) += 1;
    }

    fn read(&self) -> Vec<((String, &'static str, u16), u64)> {
        let counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        counts.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
}

/// Methods outside this list share one label, so a client cannot grow the label set.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

#[derive(Clone)]
struct MetricsState {
    store: Arc<Store>,
    dataplane: Arc<DataplaneStats>,
    leaves: Arc<Leaves>,
    http: Arc<HttpMetrics>,
}

/// `api` (the management API and UI) plus `GET /metrics`, with every request counted.
pub fn instrument(
    api: Router,
    store: Arc<Store>,
    dataplane: Arc<DataplaneStats>,
    leaves: Arc<Leaves>,
) -> Router {
    let http = Arc::new(HttpMetrics::default());
    let metrics = Router::new()
        .route(METRICS_PATH, get(serve_metrics))
        .with_state(MetricsState {
            store,
            dataplane,
            leaves,
            http: http.clone(),
        });
    api.merge(metrics)
        .layer(axum::middleware::from_fn_with_state(http, count_request))
}

async fn count_request(
    State(http): State<Arc<HttpMetrics>>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_owned());
    let method = request.method().clone();
    let response = next.run(request).await;
    http.record(route.as_deref(), &method, response.status());
    response
}

async fn serve_metrics(State(state): State<MetricsState>) -> Result<Response> {
    let store = state.store.clone();
    let gauges = blocking(move || StoreGauges::read(&store)).await?;
    let dataplane = state.dataplane.counts();
    let leaves = state.leaves.stats();
    let body = render(&gauges, &dataplane, &leaves, &state.http.read());
    Ok(([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response())
}

/// What `/metrics` reads from the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreGauges {
    pub size_bytes: u64,
    pub proposals_pending: u64,
    pub snapshot_version: u64,
}

impl StoreGauges {
    /// Reads the gauges; never writes.
    pub fn read(store: &Store) -> Result<StoreGauges> {
        Ok(StoreGauges {
            size_bytes: store.size_on_disk(),
            proposals_pending: u64::try_from(store.pending_proposal_count()?).unwrap_or(u64::MAX),
            snapshot_version: store.snapshot_version()?,
        })
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The exposition text.
pub fn render(
    store: &StoreGauges,
    dataplane: &crate::dataplane::DataplaneCounts,
    leaves: &LeafStats,
    http: &[((String, &'static str, u16), u64)],
) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "agent_vault_build_info",
        "gauge",
        "The running agent-vault version (always 1).",
    );
    let _ = writeln!(
        out,
        "agent_vault_build_info{{version=\"{}\"}} 1",
        label(env!("CARGO_PKG_VERSION"))
    );

    family(
        &mut out,
        "agent_vault_http_requests_total",
        "counter",
        "Management API and UI requests by route template, method and status.",
    );
    for ((route, method, status), count) in http {
        let _ = writeln!(
            out,
            "agent_vault_http_requests_total{{route=\"{}\",method=\"{method}\",status=\"{status}\"}} {count}",
            label(route)
        );
    }

    family(
        &mut out,
        "agent_vault_dataplane_requests_total",
        "counter",
        "Data-plane socket requests from the Envoy filters, by request.",
    );
    for (request, count) in [
        ("snapshot_full", dataplane.snapshot_full),
        ("snapshot_not_modified", dataplane.snapshot_not_modified),
        ("credentials", dataplane.credentials),
        ("logs", dataplane.logs),
        ("ext_authz", dataplane.ext_authz),
    ] {
        let _ = writeln!(
            out,
            "agent_vault_dataplane_requests_total{{request=\"{request}\"}} {count}"
        );
    }
    family(
        &mut out,
        "agent_vault_dataplane_log_records_total",
        "counter",
        "Request-log records received from the Envoy filters.",
    );
    let _ = writeln!(
        out,
        "agent_vault_dataplane_log_records_total {}",
        dataplane.log_records
    );

    let gauges = [
        (
            "agent_vault_dataplane_access_log_records_total",
            "counter",
            "Request-log records received through Envoy's gRPC access log.",
            dataplane.als_records.to_string(),
        ),
        (
            "agent_vault_dataplane_access_log_skipped_total",
            "counter",
            "Access-log entries without the filter's state (not stored).",
            dataplane.als_skipped.to_string(),
        ),
        (
            "agent_vault_dataplane_long_polls_total",
            "counter",
            "Snapshot requests that asked to wait for a change (long-polls).",
            dataplane.long_polls.to_string(),
        ),
        (
            "agent_vault_dataplane_long_polls_held",
            "gauge",
            "Snapshot long-polls held right now, waiting for a change.",
            dataplane.long_polls_held.to_string(),
        ),
        (
            "agent_vault_store_size_bytes",
            "gauge",
            "Bytes the store takes on disk (sled's files, or the PostgreSQL table with its index).",
            store.size_bytes.to_string(),
        ),
        (
            "agent_vault_proposals_pending",
            "gauge",
            "Proposals waiting for a human decision, in every vault.",
            store.proposals_pending.to_string(),
        ),
        (
            "agent_vault_snapshot_version",
            "gauge",
            "Version of the rules snapshot the filters poll.",
            store.snapshot_version.to_string(),
        ),
        (
            "agent_vault_snapshot_builds_total",
            "counter",
            "Rules snapshots built (once per version asked for).",
            dataplane.snapshot_builds.to_string(),
        ),
        (
            "agent_vault_snapshot_last_build_seconds",
            "gauge",
            "How long building the last rules snapshot took.",
            seconds(dataplane.last_build_us),
        ),
        (
            "agent_vault_snapshot_last_bytes",
            "gauge",
            "Size of the last rules snapshot built.",
            dataplane.last_snapshot_bytes.to_string(),
        ),
    ];
    for (name, kind, help, value) in gauges {
        family(&mut out, name, kind, help);
        let _ = writeln!(out, "{name} {value}");
    }

    family(
        &mut out,
        "agent_vault_leaf_certificates_held",
        "gauge",
        "Leaf certificates of HTTPS interception held for Envoy.",
    );
    let _ = writeln!(out, "agent_vault_leaf_certificates_held {}", leaves.held);
    family(
        &mut out,
        "agent_vault_leaf_certificates_minted_total",
        "counter",
        "Leaf certificates minted: new names, renewals and CA rotations.",
    );
    let _ = writeln!(
        out,
        "agent_vault_leaf_certificates_minted_total {}",
        leaves.minted
    );
    family(
        &mut out,
        "agent_vault_leaf_certificate_refusals_total",
        "counter",
        "Certificate names Envoy was refused (told on an SDS stream), by reason.",
    );
    for (reason, count) in Refusal::ALL.iter().zip(leaves.refused) {
        let _ = writeln!(
            out,
            "agent_vault_leaf_certificate_refusals_total{{reason=\"{}\"}} {count}",
            reason.as_str()
        );
    }
    out
}

/// Microseconds as decimal seconds, without float rounding noise.
fn seconds(micros: u64) -> String {
    format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{SharedClock, SystemClock};
    use axum::body::Body;
    use tower::ServiceExt;

    fn store(dir: &std::path::Path) -> Store {
        let clock: SharedClock = Arc::new(SystemClock);
        crate::testing::open_store(dir, None, clock, true).expect("store")
    }

    fn app(dir: &std::path::Path) -> Router {
        let state = crate::testing::app_state(Arc::new(store(dir)), "http://127.0.0.1");
        crate::server::app(state, Arc::default())
    }

    async fn get_text(app: &Router, uri: &str) -> (StatusCode, String, String) {
        let response = app
            .clone()
            .oneshot(
                axum::http::Request::builder()
                    .uri(uri)
                    .body(Body::empty())
                    .expect("request"),
            )
            .await
            .expect("response");
        let status = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body");
        (
            status,
            content_type,
            String::from_utf8_lossy(&body).into_owned(),
        )
    }

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    }

    #[tokio::test]
    async fn counts_requests_by_route_template_never_by_concrete_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let app = app(dir.path());
        assert_eq!(get_text(&app, "/health").await.0, StatusCode::OK);
        assert_eq!(get_text(&app, "/health").await.0, StatusCode::OK);
        let (status, _, _) = get_text(&app, "/v1/vaults/secret-vault-name/credentials").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _, _) = get_text(&app, "/no/such/av_agt_0123").await;
        assert_eq!(status, StatusCode::NOT_FOUND);

        let (status, content_type, text) = get_text(&app, METRICS_PATH).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type, CONTENT_TYPE);
        assert_eq!(
            value(
                &text,
                r#"agent_vault_http_requests_total{route="/health",method="GET",status="200"}"#
            ),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            value(
                &text,
                r#"agent_vault_http_requests_total{route="/v1/vaults/{vault}/credentials",method="GET",status="401"}"#
            ),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            value(
                &text,
                r#"agent_vault_http_requests_total{route="unmatched",method="GET",status="404"}"#
            ),
            Some(1.0),
            "{text}"
        );
        assert!(!text.contains("secret-vault-name"), "{text}");
        assert!(!text.contains("av_agt_"), "{text}");
        assert_eq!(value(&text, "agent_vault_proposals_pending"), Some(0.0));
        assert!(value(&text, "agent_vault_store_size_bytes").unwrap_or(0.0) > 0.0);
        assert!(value(&text, "agent_vault_snapshot_version").is_some());
    }

    #[test]
    fn every_family_has_help_and_type_and_every_sample_a_family() {
        let text = render(
            &StoreGauges {
                size_bytes: 10,
                proposals_pending: 2,
                snapshot_version: 7,
            },
            &crate::dataplane::DataplaneCounts {
                last_build_us: 1_500_250,
                als_records: 42,
                ..Default::default()
            },
            &LeafStats {
                held: 4,
                minted: 9,
                refused: [1, 2, 3, 4, 5],
            },
            &[(("/v1/\"odd\"\\route".to_owned(), "GET", 200), 3)],
        );
        let mut declared = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.push(rest.split(' ').next().unwrap_or_default().to_owned());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let name = line.split(['{', ' ']).next().unwrap_or_default().to_owned();
            assert!(declared.contains(&name), "{name} without # TYPE");
            let sample = line.rsplit(' ').next().unwrap_or_default();
            assert!(sample.parse::<f64>().is_ok(), "{line}");
        }
        assert!(text.contains(r#"route="/v1/\"odd\"\\route""#), "{text}");
        assert_eq!(
            value(&text, "agent_vault_snapshot_last_build_seconds"),
            Some(1.50025)
        );
        assert_eq!(value(&text, "agent_vault_proposals_pending"), Some(2.0));
        assert_eq!(
            value(&text, "agent_vault_dataplane_access_log_records_total"),
            Some(42.0)
        );
        assert_eq!(value(&text, "agent_vault_snapshot_version"), Some(7.0));
        assert_eq!(
            value(&text, "agent_vault_leaf_certificates_held"),
            Some(4.0)
        );
        assert!(
            text.contains("agent_vault_leaf_certificate_refusals_total{reason=\"budget_spent\"} 3"),
            "{text}"
        );
    }

    #[test]
    fn unknown_methods_share_one_label() {
        let metrics = HttpMetrics::default();
        let odd = Method::from_bytes(b"BREW").expect("method");
        metrics.record(Some("/health"), &odd, StatusCode::METHOD_NOT_ALLOWED);
        metrics.record(None, &Method::GET, StatusCode::NOT_FOUND);
        let read = metrics.read();
        assert_eq!(read.len(), 2);
        assert!(read
            .iter()
            .any(|((route, method, _), _)| route == "/health" && *method == "other"));
        assert!(read
            .iter()
            .any(|((route, method, status), _)| route == "unmatched"
                && *method == "GET"
                && *status == 404));
    }
}
