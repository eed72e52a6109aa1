//! The HTTP shell shared by the management API, the browser UI, `/metrics` and the
//! data-plane socket: the application state, the extractors (who is calling, JSON
//! bodies with a size limit), and running store operations off the async workers.
//! Route tables live with their handlers (`api`, `ui`, `dataplane`, `metrics`);
//! `server::app` assembles the TCP listener's.

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use serde::de::DeserializeOwned;

use crate::access::Principal;
use crate::error::{Error, Result};
use crate::leaves::Leaves;
use crate::store::Store;
use crate::users::LoginLimiter;

/// Largest request body the API reads.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// What every handler of the TCP listener (the management API, the UI, `/metrics`)
/// shares. The data-plane socket has its own state
/// ([`crate::dataplane::DataplaneState`]): it cannot even see the login limiter.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<Store>,
    pub limiter: Arc<LoginLimiter>,
    /// The proxy CA and its leaf certificates (`/v1/ca`, `ca rotate`), shared with
    /// the SDS server.
    pub leaves: Arc<Leaves>,
    /// Base URL for links shown to humans (approval links).
    pub public_url: String,
}

impl AppState {
    pub fn new(store: Arc<Store>, leaves: Arc<Leaves>, public_url: &str) -> AppState {
        AppState {
            store,
            limiter: Arc::new(LoginLimiter::default()),
            leaves,
            public_url: public_url.trim_end_matches('/').to_string(),
        }
    }
}

/// Runs a store operation on the blocking pool.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::internal(format!("task failed: {e}")))?
}

/// A JSON body: `Content-Type: application/json`, at most [`MAX_BODY_BYTES`], unknown
/// fields refused by the types. The content type matters: a page on another origin
/// can POST `text/plain` without a CORS preflight, never `application/json`.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = Error;

    async fn from_request(req: Request, _state: &S) -> Result<Self> {
        let bytes = json_bytes(req).await?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Like [`JsonBody`], and an empty body is `T::default()` (`POST …/reject` needs none);
/// a body that is not empty needs the JSON content type.
pub struct OptionalJsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for OptionalJsonBody<T> {
    type Rejection = Error;

    async fn from_request(req: Request, _state: &S) -> Result<Self> {
        let declared = is_json(req.headers());
        let bytes = read_body(req).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJsonBody(T::default()));
        }
        if !declared {
            return Err(not_json());
        }
        parse_json(&bytes).map(OptionalJsonBody)
    }
}

/// Whether the request says its body is JSON (`application/json`, any parameters).
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

fn not_json() -> Error {
    Error::UnsupportedMediaType("send the body as JSON with Content-Type: application/json".into())
}

async fn json_bytes(req: Request) -> Result<axum::body::Bytes> {
    if !is_json(req.headers()) {
        return Err(not_json());
    }
    read_body(req).await
}

async fn read_body(req: Request) -> Result<axum::body::Bytes> {
    axum::body::to_bytes(req.into_body(), MAX_BODY_BYTES)
        .await
        .map_err(|_| Error::PayloadTooLarge(MAX_BODY_BYTES))
}

/// How serde ends its message for an unknown substitution surface.
const SURFACES_EXPECTED: &str = "expected one of `path`, `query`, `header`, `body`";

/// Parses a request body, telling malformed JSON from a well-formed wrong shape.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| {
        // serde reports the first type mismatch of a truncated document as a shape
        // error; a second, shape-free pass tells malformed JSON apart.
        let well_formed = serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok();
        if e.classify() == serde_json::error::Category::Data && well_formed {
            if e.to_string().contains(SURFACES_EXPECTED) {
                // serde refuses a substitution's unknown surface before validation can
                // name it: the same code as every other bad substitution.
                return Error::bad_request(
                    "invalid_substitution",
                    format!("invalid substitution: \"in\" names path, query, header or body: {e}"),
                );
            }
            Error::bad_request("invalid_request", format!("invalid request body: {e}"))
        } else {
            Error::bad_request("invalid_json", format!("malformed JSON: {e}"))
        }
    })
}

/// Refuses a request whose `Host` is neither the public URL's host, a loopback name
/// (`localhost`, `*.localhost`) nor an IP address: 421 `host_not_allowed`.
///
/// Why: with DNS rebinding, a page on a name the attacker controls (`evil.example`)
/// gets that name to resolve to 127.0.0.1 and then talks to this port as its own
/// origin, with `Host: evil.example`. Nothing it can do needs a cookie before the
/// owner exists (registration), so the name is the one thing to check. An IP address
/// in `Host` is safe: the page's origin is then this server itself. A request with no
/// `Host` (not a browser) passes.
pub async fn check_host(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let presented = match request.uri().authority() {
        Some(authority) => Some(authority.as_str().to_owned()),
        None => request
            .headers()
            .get(header::HOST)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
    };
    match presented {
        Some(host) if !host_allowed(&host, &state.public_url) => {
            use axum::response::IntoResponse;
            Error::HostNotAllowed(format!(
                "this server does not answer for the host {:?}: use {} or a loopback address",
                host_name(&host),
                state.public_url
            ))
            .into_response()
        }
        _ => next.run(request).await,
    }
}

/// Whether `authority` (`host[:port]`) is one [`check_host`] lets through.
pub fn host_allowed(authority: &str, public_url: &str) -> bool {
    let host = host_name(authority);
    let public = public_url
        .split_once("://")
        .map_or(public_url, |(_, rest)| rest)
        .split(['/', '?', '#'])
        .next()
        .unwrap_or_default();
    host == "localhost"
        || host.ends_with(".localhost")
        || host.parse::<std::net::IpAddr>().is_ok()
        || (!host.is_empty() && host == host_name(public))
}

/// The host of `host[:port]` or `[v6][:port]`, lowercase, without a trailing dot.
fn host_name(authority: &str) -> String {
    let authority = authority.trim();
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority
            .rsplit_once(':')
            .map_or(authority, |(host, _)| host),
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// The authenticated caller.
pub struct Caller(pub Principal);

/// The `Authorization: Bearer` token. Never a cookie: a browser attaches cookies to
/// requests any page of the same site makes (other local ports included), so a
/// cookie-authenticated API could be driven by such a page (DESIGN.md §8).
pub fn presented_token(headers: &HeaderMap) -> Option<String> {
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
}

/// The value of cookie `name`, if the request carries it.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.trim().to_string())
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self> {
        let token = presented_token(&parts.headers).ok_or_else(|| {
            Error::Unauthorized("not logged in: send Authorization: Bearer <token>".into())
        })?;
        let store = state.store.clone();
        blocking(move || store.authenticate(&token))
            .await
            .map(Caller)
    }
}

#[cfg(test)]
mod tests {
    use super::host_allowed;

    #[test]
    fn hosts_are_the_public_urls_loopback_names_or_addresses() {
        let public = "https://vault.example.com";
        #[rustfmt::skip]
        let cases = [
            ("the public URL's host", "vault.example.com", true),
            ("with a port and another case", "Vault.Example.com:443", true),
            ("with a trailing dot", "vault.example.com.", true),
            ("localhost", "localhost:14321", true),
            ("a name under localhost", "ui.localhost:14321", true),
            ("an IPv4 address", "127.0.0.1:14321", true),
            ("another IPv4 address", "10.1.2.3:14321", true),
            ("an IPv6 address", "[::1]:14321", true),
            ("a rebinding name", "evil.example:14321", false),
            ("the public host as a suffix", "vault.example.com.evil.example", false),
            ("a public host's lookalike", "evilvault.example.com", false),
            ("nothing", "", false),
        ];
        for (behaviour, host, allowed) in cases {
            assert_eq!(host_allowed(host, public), allowed, "{behaviour}: {host}");
        }
        assert!(host_allowed("127.0.0.1:9", "http://127.0.0.1:14321"));
        assert!(!host_allowed("evil.example", "http://127.0.0.1:14321"));
    }
}
