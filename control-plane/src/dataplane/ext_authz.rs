//! `ext_authz` (any method under [`EXT_AUTHZ_PATH`]): the "no wasm filter"
//! alternative that asks this server on every request (the benchmark's variant d).
//! It does what the filter does — agent token, vault, service match, credential —
//! with the same rules crate, and answers 200 with the rendered auth headers (for
//! `allowed_upstream_headers`) and `x-envoy-auth-headers-to-remove:
//! proxy-authorization, x-vault`, or the filter's refusal. It hands out no more than
//! the credentials route already does to a socket peer (less: it needs the raw agent
//! token, not its hash), so the socket's trust boundary (DESIGN.md §4: owner-only,
//! `SO_PEERCRED`) covers it; it is never on TCP.

use agent_vault_rules::proxy_auth::{self, DECODE_BUFFER_LEN};
use agent_vault_rules::reply::{self, Reject};
use agent_vault_rules::{normalize_authority, ServiceMatcher, UnmatchedHostPolicy};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use zeroize::Zeroizing;

use super::{bump, DataplaneState};
use crate::error::Error;
use crate::http::blocking;
use crate::store::Store;

/// Prefix of the check route (Envoy appends the original path).
pub const EXT_AUTHZ_PATH: &str = "/v1/dataplane/ext_authz";

/// What an `ext_authz` check sees of the original request.
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckRequest<'a> {
    /// The original `:method` (Envoy's HTTP check request keeps it).
    pub method: &'a str,
    pub proxy_authorization: Option<&'a str>,
    pub x_vault: Option<&'a str>,
    /// The original `:authority` (Envoy sends it as the check request's `Host`).
    pub authority: Option<&'a str>,
    /// The original path (after the route prefix).
    pub path: &'a str,
}

/// The decision: the headers to inject, or the refusal the filter would send (the
/// same parser and rejects, from `agent-vault-rules`). One request, no cache: every
/// check reads the agent, the vault's services and the credential values from the
/// store and decrypts them.
pub fn decide(
    store: &Store,
    request: &CheckRequest<'_>,
) -> std::result::Result<Vec<(String, String)>, Reject> {
    let internal = |e: Error| {
        tracing::error!(error = %e, "ext_authz check failed");
        reply::control_plane_unavailable("the control plane could not answer")
    };
    // The decoded Basic credentials hold the token: wiped when dropped.
    let mut buffer = Zeroizing::new([0u8; DECODE_BUFFER_LEN]);
    let credential = proxy_auth::parse(request.proxy_authorization, &mut buffer)
        .map_err(|error| reply::proxy_auth_required(error.reason()))?;
    let hash = crate::crypto::sha256_hex(credential.token.as_bytes());
    let now = store.now_secs();
    let agent = store
        .agent_by_token_hash(&hash)
        .map_err(internal)?
        .filter(|agent| agent.expires_at.is_none_or(|at| at > now))
        .ok_or_else(reply::invalid_token)?;
    let named_vault = credential
        .vault
        .or_else(|| proxy_auth::x_vault(request.x_vault));
    let grants: Vec<&str> = agent.vaults.iter().map(|g| g.vault.as_str()).collect();
    let vault_name = reply::choose_vault(&agent.name, &grants, named_vault)?;
    let vault = store
        .vault(vault_name)
        .map_err(internal)?
        .ok_or_else(|| reply::vault_forbidden(&agent.name, Some(vault_name)))?;
    let Some((host, port)) = request
        .authority
        .and_then(|a| normalize_authority(a, reply::DEFAULT_PORT))
    else {
        return Err(reply::invalid_request());
    };
    let services = store.services_of(&vault.id).map_err(internal)?;
    let matcher = ServiceMatcher::new(&services);
    let Some(index) = matcher.find(&host, port, request.path) else {
        return match vault.unmatched_host_policy {
            UnmatchedHostPolicy::Passthrough => Ok(Vec::new()),
            UnmatchedHostPolicy::Deny => Err(reply::no_service(&vault.name, &host, port)),
        };
    };
    let (Some(service), Some(auth)) = (services.get(index), matcher.auth(index)) else {
        return Err(reply::invalid_service(&vault.name, "", "not indexed"));
    };
    if !service.enabled {
        return Err(reply::service_disabled(&vault.name, &service.name));
    }
    if !service.allows_method(request.method) {
        return Err(reply::method_not_allowed_for_service(
            &vault.name,
            &service.name,
            request.method,
            service.methods.as_deref().unwrap_or_default(),
        ));
    }
    if !service.substitutions.is_empty() {
        return Err(substitutions_unsupported(&vault.name, &service.name));
    }
    let auth = auth
        .as_ref()
        .map_err(|e| reply::invalid_service(&vault.name, &service.name, &e.to_string()))?;
    let (values, _missing) = store
        .resolve_credentials(&vault.id, auth.keys())
        .map_err(internal)?;
    auth.render(|key| values.get(key).map(|v| v.expose()))
        .map_err(|error| reply::render_failed(&vault.name, &service.name, &error))
}

/// A service with `substitutions` → 502 `invalid_service`, never forwarded: an
/// `ext_authz` answer can only add headers, so it could not write a placeholder's value
/// into the path, query or body, and forwarding the placeholder instead would send the
/// upstream a request the service's rule does not describe. Fail closed, and say why.
fn substitutions_unsupported(vault: &str, service: &str) -> Reject {
    Reject::new(
        reply::ErrorCode::InvalidService,
        format!(
            "service {service:?} of vault {vault:?} declares substitutions, which the ext_authz check cannot perform (it can only add headers); requests to it are refused here: send them through the proxy with the agent-vault filter"
        ),
    )
}

/// The route: Envoy's `ext_authz` HTTP service sends the original request's headers
/// and path here.
pub async fn check(
    State(state): State<DataplaneState>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Response {
    bump(&state.stats.ext_authz, 1);
    let text = |name: header::HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let proxy_authorization = text(header::PROXY_AUTHORIZATION);
    let x_vault = text(header::HeaderName::from_static("x-vault"));
    let authority = text(header::HOST).or_else(|| uri.authority().map(|a| a.to_string()));
    let path = uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .strip_prefix(EXT_AUTHZ_PATH)
        .filter(|p| !p.is_empty())
        .unwrap_or("/")
        .to_string();
    let store = state.store.clone();
    let decision = blocking(move || {
        Ok(decide(
            &store,
            &CheckRequest {
                proxy_authorization: proxy_authorization.as_deref(),
                method: method.as_str(),
                x_vault: x_vault.as_deref(),
                authority: authority.as_deref(),
                path: &path,
            },
        ))
    })
    .await;
    let decision = match decision {
        Ok(decision) => decision,
        Err(error) => return error.into_response(),
    };
    match decision {
        Ok(inject) => {
            let mut response = StatusCode::OK.into_response();
            let out = response.headers_mut();
            for (name, value) in inject {
                if let (Ok(name), Ok(value)) = (
                    header::HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(&value),
                ) {
                    out.append(name, value);
                }
            }
            out.insert(
                "x-envoy-auth-headers-to-remove",
                HeaderValue::from_static("proxy-authorization, x-vault"),
            );
            response
        }
        Err(reject) => {
            let status =
                StatusCode::from_u16(reject.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let headers: Vec<(&'static str, HeaderValue)> = reject
                .headers()
                .into_iter()
                .filter_map(|(name, value)| Some((name, HeaderValue::from_str(value).ok()?)))
                .collect();
            let mut response = (status, reject.body).into_response();
            for (name, value) in headers {
                response.headers_mut().insert(name, value);
            }
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::tests::{seeded, send};
    use crate::dataplane::{DataplaneCounts, STATS_PATH};
    use crate::testing::owner;
    use agent_vault_rules::CONTROL_PLANE_HEADER;
    use axum::body::Body;
    use axum::http::Request;
    use base64::Engine as _;

    fn check_request(host: &str, proxy_authorization: Option<&str>) -> Request<Body> {
        let mut request =
            Request::get(format!("{EXT_AUTHZ_PATH}/v1/charges?limit=1")).header(header::HOST, host);
        if let Some(value) = proxy_authorization {
            request = request.header(header::PROXY_AUTHORIZATION, value);
        }
        request.body(Body::empty()).unwrap()
    }

    fn basic(token: &str, vault: &str) -> String {
        let pair = format!("{token}:{vault}");
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        )
    }

    #[tokio::test]
    async fn ext_authz_check_injects_the_credential_or_refuses() {
        let (_dir, state, token) = seeded();

        let (status, headers, _) = send(
            &state,
            check_request("api.example.com", Some(&basic(&token, ""))),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["authorization"], "Bearer sk_live_1");
        assert_eq!(
            headers["x-envoy-auth-headers-to-remove"],
            "proxy-authorization, x-vault"
        );
        assert_eq!(headers[CONTROL_PLANE_HEADER], "1");

        let bearer = format!("Bearer {token}");
        #[rustfmt::skip]
        let refusals: &[(&str, Option<&str>, StatusCode, &str)] = &[
            ("no proxy credential", None, StatusCode::PROXY_AUTHENTICATION_REQUIRED, "proxy_auth_required"),
            ("unknown token", Some("Bearer av_agt_nope"), StatusCode::PROXY_AUTHENTICATION_REQUIRED, "invalid_token"),
            ("host of no service", Some(bearer.as_str()), StatusCode::FORBIDDEN, "forbidden"),
        ];
        for (behaviour, credential, expected, code) in refusals {
            let host = if *behaviour == "host of no service" {
                "other.example.com"
            } else {
                "api.example.com"
            };
            let (status, headers, body) = send(&state, check_request(host, *credential)).await;
            assert_eq!(status, *expected, "{behaviour}");
            assert!(headers.get("authorization").is_none(), "{behaviour}");
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(body["error"], *code, "{behaviour}");
            assert!(!body.to_string().contains("sk_live_1"), "{behaviour}");
        }

        // A deleted credential is seen on the next check: nothing is cached.
        state
            .store
            .delete_credentials(&owner(), "default", &["API_TOKEN".to_string()])
            .unwrap_or_else(|e| panic!("delete: {e}"));
        let (status, _, body) = send(&state, check_request("api.example.com", Some(&bearer))).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{body:?}");

        let (status, _, body) = send(
            &state,
            Request::get(STATS_PATH).body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let counts: DataplaneCounts = serde_json::from_slice(&body).unwrap();
        assert_eq!(counts.ext_authz, 5);
        assert_eq!(counts.credentials, 0);
    }

    #[tokio::test]
    async fn ext_authz_refuses_a_method_the_service_does_not_list() {
        let (_dir, state, token) = seeded();
        state
            .store
            .add_service(
                &owner(),
                "default",
                agent_vault_rules::Service {
                    name: "ro".into(),
                    host: "ro.example.com".into(),
                    enabled: true,
                    auth: agent_vault_rules::Auth::Bearer {
                        token: "API_TOKEN".into(),
                    },
                    upstream_tls: true,
                    methods: Some(vec!["GET".into()]),
                    rate_limit: None,
                    substitutions: Vec::new(),
                    redact_responses: None,
                    upstream_h2c: false,
                },
            )
            .unwrap_or_else(|e| panic!("add: {e}"));
        let credential = basic(&token, "");
        let (status, headers, _) =
            send(&state, check_request("ro.example.com", Some(&credential))).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["authorization"], "Bearer sk_live_1");
        let post = Request::post(format!("{EXT_AUTHZ_PATH}/v1/charges"))
            .header(header::HOST, "ro.example.com")
            .header(header::PROXY_AUTHORIZATION, credential.as_str())
            .body(Body::empty())
            .unwrap();
        let (status, headers, body) = send(&state, post).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(headers.get("authorization").is_none());
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"], "method_not_allowed_for_service");
        assert_eq!(body["allowed_methods"], serde_json::json!(["GET"]));
        assert!(!body.to_string().contains("sk_live_1"));
    }

    #[tokio::test]
    async fn ext_authz_refuses_a_service_with_substitutions_and_injects_nothing() {
        let (_dir, state, token) = seeded();
        let service: agent_vault_rules::Service = serde_json::from_value(serde_json::json!({
            "name": "telegram", "host": "api.telegram.org",
            "auth": {"type": "bearer", "token": "API_TOKEN"},
            "substitutions": [{"key": "API_TOKEN", "placeholder": "__API_TOKEN__", "in": ["path"]}]
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        state
            .store
            .add_service(&owner(), "default", service)
            .unwrap_or_else(|e| panic!("add: {e}"));
        let request = Request::get(format!("{EXT_AUTHZ_PATH}/bot__API_TOKEN__/getMe"))
            .header(header::HOST, "api.telegram.org")
            .header(header::PROXY_AUTHORIZATION, basic(&token, ""))
            .body(Body::empty())
            .unwrap();
        let (status, headers, body) = send(&state, request).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert!(headers.get("authorization").is_none());
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"], "invalid_service");
        let message = body["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("\"telegram\"") && message.contains("substitutions"),
            "{message}"
        );
        assert!(message.contains("can only add headers"), "{message}");
        assert!(!body.to_string().contains("sk_live_1"));
        // The vault's other service is unaffected.
        let (status, headers, _) = send(
            &state,
            check_request("api.example.com", Some(&basic(&token, ""))),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["authorization"], "Bearer sk_live_1");
    }
}
