//! What an agent sees when the proxy refuses a request (DESIGN.md §6): one place maps
//! each error code to its status and builds the JSON body `{"error", "message", ...}`.
//! The filter sends these itself; the control plane's `ext_authz` check answers with
//! the same rejects, so both data paths speak one contract.
//!
//! Messages name agents, vaults, services, hosts and credential *keys*; they never
//! contain a credential value or the agent token.

use crate::auth::RenderError;
use crate::names::validate_vault_name;
use crate::wire::SUPPORTED_AUTH_TYPES;
use std::borrow::Cow;

use serde_json::{json, Value};

/// Header set on every response the proxy produces itself.
pub const ERROR_HEADER: &str = "x-agent-vault-error";
/// `Proxy-Authenticate` challenge of a 407.
pub const PROXY_AUTHENTICATE: &str = "Basic realm=\"agent-vault\"";
/// Where agents propose a new service.
pub const PROPOSAL_ENDPOINT: &str = "POST /v1/proposals";
/// The `Allow` header of a 405: the methods the proxy forwards.
pub const ALLOWED_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

/// The error codes the filter answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// 405: `CONNECT` where no tunnel can be opened: inside an intercepted tunnel, or
    /// through a listener that does not intercept (`envoy/sidecar.yaml`).
    ConnectNotSupported,
    /// 405: `TRACE` or `TRACK`, which make upstreams echo the injected credential.
    MethodNotAllowed,
    /// 407: no or malformed proxy credential.
    ProxyAuthRequired,
    /// 407: unknown, revoked or expired token.
    InvalidToken,
    /// 400: several vaults and none named.
    VaultRequired,
    /// 400: no usable `:authority`.
    InvalidRequest,
    /// 403: vault not granted, or no service matches (policy `deny`).
    Forbidden,
    /// 403: the matched service is disabled.
    ServiceDisabled,
    /// 502: the matched service's auth rule does not compile.
    InvalidService,
    /// 502: a referenced credential is not set.
    CredentialNotFound,
    /// 502: a credential value cannot go into a header.
    InvalidCredentialValue,
    /// 503: no rules yet, or the control plane did not answer.
    ControlPlaneUnavailable,
    /// 429: the agent reached too many different hosts through wildcard services or
    /// the `passthrough` policy in a short time (each takes room in Envoy's DNS cache).
    TooManyHosts,
    /// 403: the destination resolves to a loopback, link-local or private address.
    /// Envoy answers it (its RBAC filter, after the DNS lookup), not the filter; the
    /// bootstraps' `local_reply_config` writes [`destination_forbidden`]'s body.
    DestinationForbidden,
    /// 421: inside an intercepted tunnel, a request whose `:authority` (or the TLS
    /// SNI of its connection) names another host than the tunnel's `CONNECT`.
    TunnelHostMismatch,
    /// 403: the matched service lists its `methods`, and the request's is not one of
    /// them (never forwarded, no credential fetched).
    MethodNotAllowedForService,
    /// 429: the agent used up the matched service's `rate_limit` in the current
    /// window (counted per agent token and service, across connections and tunnels);
    /// `Retry-After` says when the window ends. Never forwarded, nothing fetched.
    RateLimited,
    /// 413: a request to a service with a `body` substitution has a body larger than
    /// the filter buffers for it (`max_substitution_body_bytes`).
    RequestBodyTooLarge,
    /// 415: a request to a service with a `body` substitution holds a placeholder in a
    /// body that is neither JSON nor form-encoded (or a JSON body that is not UTF-8).
    UnsupportedSubstitutionBody,
    /// 502: the service redacts responses and the upstream's response is compressed
    /// with an encoding the filter cannot decode (anything but gzip and deflate), so
    /// it cannot be scanned for the injected credential; it is never passed on.
    ResponseNotRedactable,
}

impl ErrorCode {
    /// Every code, in declaration order.
    pub const ALL: [ErrorCode; 20] = [
        ErrorCode::ConnectNotSupported,
        ErrorCode::MethodNotAllowed,
        ErrorCode::ProxyAuthRequired,
        ErrorCode::InvalidToken,
        ErrorCode::VaultRequired,
        ErrorCode::InvalidRequest,
        ErrorCode::Forbidden,
        ErrorCode::ServiceDisabled,
        ErrorCode::InvalidService,
        ErrorCode::CredentialNotFound,
        ErrorCode::InvalidCredentialValue,
        ErrorCode::ControlPlaneUnavailable,
        ErrorCode::TooManyHosts,
        ErrorCode::DestinationForbidden,
        ErrorCode::TunnelHostMismatch,
        ErrorCode::MethodNotAllowedForService,
        ErrorCode::RateLimited,
        ErrorCode::RequestBodyTooLarge,
        ErrorCode::UnsupportedSubstitutionBody,
        ErrorCode::ResponseNotRedactable,
    ];

    /// The position of this code in [`ErrorCode::ALL`]. Exhaustive, so a new code
    /// cannot be added without its place (the filter keeps one counter per code).
    pub fn index(self) -> usize {
        match self {
            ErrorCode::ConnectNotSupported => 0,
            ErrorCode::MethodNotAllowed => 1,
            ErrorCode::ProxyAuthRequired => 2,
            ErrorCode::InvalidToken => 3,
            ErrorCode::VaultRequired => 4,
            ErrorCode::InvalidRequest => 5,
            ErrorCode::Forbidden => 6,
            ErrorCode::ServiceDisabled => 7,
            ErrorCode::InvalidService => 8,
            ErrorCode::CredentialNotFound => 9,
            ErrorCode::InvalidCredentialValue => 10,
            ErrorCode::ControlPlaneUnavailable => 11,
            ErrorCode::TooManyHosts => 12,
            ErrorCode::DestinationForbidden => 13,
            ErrorCode::TunnelHostMismatch => 14,
            ErrorCode::MethodNotAllowedForService => 15,
            ErrorCode::RateLimited => 16,
            ErrorCode::RequestBodyTooLarge => 17,
            ErrorCode::UnsupportedSubstitutionBody => 18,
            ErrorCode::ResponseNotRedactable => 19,
        }
    }

    /// The stable `error` string.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::ConnectNotSupported => "connect_not_supported",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::ProxyAuthRequired => "proxy_auth_required",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::VaultRequired => "vault_required",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::ServiceDisabled => "service_disabled",
            ErrorCode::InvalidService => "invalid_service",
            ErrorCode::CredentialNotFound => "credential_not_found",
            ErrorCode::InvalidCredentialValue => "invalid_credential_value",
            ErrorCode::ControlPlaneUnavailable => "control_plane_unavailable",
            ErrorCode::TooManyHosts => "too_many_hosts",
            ErrorCode::DestinationForbidden => "destination_forbidden",
            ErrorCode::TunnelHostMismatch => "tunnel_host_mismatch",
            ErrorCode::MethodNotAllowedForService => "method_not_allowed_for_service",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::RequestBodyTooLarge => "request_body_too_large",
            ErrorCode::UnsupportedSubstitutionBody => "unsupported_substitution_body",
            ErrorCode::ResponseNotRedactable => "response_not_redactable",
        }
    }

    /// The HTTP status.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::ConnectNotSupported | ErrorCode::MethodNotAllowed => 405,
            ErrorCode::ProxyAuthRequired | ErrorCode::InvalidToken => 407,
            ErrorCode::VaultRequired | ErrorCode::InvalidRequest => 400,
            ErrorCode::Forbidden
            | ErrorCode::ServiceDisabled
            | ErrorCode::DestinationForbidden
            | ErrorCode::MethodNotAllowedForService => 403,
            ErrorCode::InvalidService
            | ErrorCode::CredentialNotFound
            | ErrorCode::InvalidCredentialValue
            | ErrorCode::ResponseNotRedactable => 502,
            ErrorCode::ControlPlaneUnavailable => 503,
            ErrorCode::TooManyHosts | ErrorCode::RateLimited => 429,
            // RFC 9110 §15.5.20: this connection cannot answer for that host; a client
            // may retry on a connection (a tunnel) of its own.
            ErrorCode::TunnelHostMismatch => 421,
            ErrorCode::RequestBodyTooLarge => 413,
            ErrorCode::UnsupportedSubstitutionBody => 415,
        }
    }

    /// The gRPC status a gRPC client gets for this refusal
    /// (<https://grpc.github.io/grpc/core/md_doc_statuscodes.html>): what a caller can
    /// do about it, where Envoy's own HTTP-to-gRPC mapping would say `UNKNOWN` for a
    /// 407 or `INTERNAL` for a 400.
    pub fn grpc_status(self) -> GrpcStatus {
        match self {
            ErrorCode::ProxyAuthRequired | ErrorCode::InvalidToken => GrpcStatus::Unauthenticated,
            ErrorCode::Forbidden
            | ErrorCode::ServiceDisabled
            | ErrorCode::DestinationForbidden
            | ErrorCode::MethodNotAllowedForService => GrpcStatus::PermissionDenied,
            ErrorCode::ControlPlaneUnavailable => GrpcStatus::Unavailable,
            ErrorCode::TooManyHosts | ErrorCode::RateLimited | ErrorCode::RequestBodyTooLarge => {
                GrpcStatus::ResourceExhausted
            }
            ErrorCode::VaultRequired
            | ErrorCode::InvalidRequest
            | ErrorCode::TunnelHostMismatch
            | ErrorCode::UnsupportedSubstitutionBody => GrpcStatus::InvalidArgument,
            ErrorCode::InvalidService
            | ErrorCode::CredentialNotFound
            | ErrorCode::InvalidCredentialValue => GrpcStatus::FailedPrecondition,
            ErrorCode::ConnectNotSupported | ErrorCode::MethodNotAllowed => {
                GrpcStatus::Unimplemented
            }
            ErrorCode::ResponseNotRedactable => GrpcStatus::Internal,
        }
    }
}

/// The gRPC status codes a refusal maps to ([`ErrorCode::grpc_status`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum GrpcStatus {
    /// 3
    InvalidArgument = 3,
    /// 7
    PermissionDenied = 7,
    /// 8
    ResourceExhausted = 8,
    /// 9
    FailedPrecondition = 9,
    /// 12
    Unimplemented = 12,
    /// 13
    Internal = 13,
    /// 14
    Unavailable = 14,
    /// 16
    Unauthenticated = 16,
}

impl GrpcStatus {
    /// The number on the wire (`grpc-status`).
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// Whether a request is a gRPC call: its `content-type` is `application/grpc`, alone or
/// with a `+format` or `;parameters` (gRPC over HTTP/2, "Requests").
pub fn is_grpc(content_type: Option<&str>) -> bool {
    let Some(value) = content_type else {
        return false;
    };
    let value = value.trim_start().as_bytes();
    const GRPC: &[u8] = b"application/grpc";
    value.len() >= GRPC.len()
        && value[..GRPC.len()].eq_ignore_ascii_case(GRPC)
        && matches!(value.get(GRPC.len()), None | Some(b'+' | b';' | b' '))
}

/// A response the filter sends instead of forwarding the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    /// Error code (also the log record's `error`).
    pub code: ErrorCode,
    /// The body's `message`: also a gRPC caller's `grpc-message`.
    pub message: String,
    /// JSON body.
    pub body: String,
    /// Headers besides `content-type` and [`ERROR_HEADER`].
    pub extra_headers: Vec<(&'static str, Cow<'static, str>)>,
}

impl Reject {
    /// A reject with `{"error": code, "message": message}`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Reject {
        Reject::with_fields(code, message, serde_json::Map::new())
    }

    /// A reject whose body carries more fields after `error` and `message`.
    pub fn with_fields(
        code: ErrorCode,
        message: impl Into<String>,
        fields: serde_json::Map<String, Value>,
    ) -> Reject {
        let message = message.into();
        let mut body = serde_json::Map::with_capacity(2 + fields.len());
        body.insert("error".to_owned(), Value::from(code.as_str()));
        body.insert("message".to_owned(), Value::from(message.as_str()));
        body.extend(fields);
        let extra_headers = match code {
            // RFC 9110 §15.5.8: a 407 carries a challenge, so clients know to send
            // proxy credentials.
            ErrorCode::ProxyAuthRequired | ErrorCode::InvalidToken => {
                vec![("proxy-authenticate", Cow::Borrowed(PROXY_AUTHENTICATE))]
            }
            ErrorCode::ConnectNotSupported | ErrorCode::MethodNotAllowed => {
                vec![("allow", Cow::Borrowed(ALLOWED_METHODS))]
            }
            _ => Vec::new(),
        };
        Reject {
            code,
            message,
            body: Value::Object(body).to_string(),
            extra_headers,
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> u16 {
        self.code.status()
    }

    /// Every header of the response, in order.
    pub fn headers(&self) -> Vec<(&'static str, &str)> {
        let mut headers = vec![
            ("content-type", "application/json"),
            (ERROR_HEADER, "true"),
            ("cache-control", "no-store"),
        ];
        headers.extend(
            self.extra_headers
                .iter()
                .map(|(name, value)| (*name, value.as_ref())),
        );
        headers
    }

    /// The headers of the refusal of a gRPC call, besides what Envoy sets for it.
    ///
    /// Envoy answers a gRPC call's local reply "trailers-only", as gRPC clients expect:
    /// `:status` 200, `content-type: application/grpc`, `grpc-status` (here
    /// [`ErrorCode::grpc_status`]) and `grpc-message` (here [`Reject::message`]), and
    /// no body. What the JSON body would have said goes in headers the client reads
    /// with the trailing metadata: [`ERROR_HEADER`], [`ERROR_CODE_HEADER`] (the body's
    /// `error`) and [`STATUS_HEADER`] (the HTTP status of DESIGN.md §6), plus the
    /// refusal's own headers (`retry-after`, ...).
    pub fn grpc_headers(&self) -> Vec<(&'static str, Cow<'_, str>)> {
        let mut headers = vec![
            (ERROR_HEADER, Cow::Borrowed("true")),
            (ERROR_CODE_HEADER, Cow::Borrowed(self.code.as_str())),
            (STATUS_HEADER, Cow::Owned(self.status().to_string())),
        ];
        headers.extend(
            self.extra_headers
                .iter()
                .map(|(name, value)| (*name, Cow::Borrowed(value.as_ref()))),
        );
        headers
    }
}

/// On a refused gRPC call: the `error` code its JSON body would have had.
pub const ERROR_CODE_HEADER: &str = "x-agent-vault-error-code";

/// On a refused gRPC call: the HTTP status of DESIGN.md §6 that Envoy's trailers-only
/// reply (`:status` 200) cannot carry.
pub const STATUS_HEADER: &str = "x-agent-vault-status";

/// Shortens what an agent sent before quoting it back: one line, at most 64 chars.
pub fn quote(text: &str) -> String {
    let mut short: String = text.chars().take(64).collect();
    if short.len() < text.len() {
        short.push('…');
    }
    format!("{short:?}")
}

/// `CONNECT` inside an intercepted tunnel → 405: the tunnel already goes to one host,
/// and its requests are decrypted and forwarded one by one.
pub fn connect_not_supported() -> Reject {
    Reject::new(
        ErrorCode::ConnectNotSupported,
        "CONNECT inside a tunnel is not supported: send the requests themselves through \
         the tunnel, and open another tunnel (CONNECT to the proxy) for another host",
    )
}

/// Inside an intercepted tunnel, the request's `what` (`:authority`, or the TLS SNI)
/// names `got`, not the host the tunnel's `CONNECT` was authorised for → 421.
pub fn tunnel_host_mismatch(what: &str, got: &str, tunnel: &str) -> Reject {
    let mut fields = serde_json::Map::new();
    fields.insert("host".to_owned(), Value::from(tunnel));
    Reject::with_fields(
        ErrorCode::TunnelHostMismatch,
        format!(
            "this tunnel was opened (CONNECT) for {tunnel}, and the request's {what} names \
             {}: a tunnel carries requests for its own host only; open one for each host, \
             as HTTPS_PROXY clients do",
            quote(got)
        ),
        fields,
    )
}

/// Inside an intercepted tunnel, Envoy handed the filter no identity proven on the
/// tunnel's `CONNECT` (a configuration error: see `envoy/forward-proxy.yaml`) → 407,
/// as for a request without a proxy credential. Nothing sent inside the tunnel can
/// stand in for it.
pub fn tunnel_without_identity() -> Reject {
    Reject::new(
        ErrorCode::ProxyAuthRequired,
        "this tunnel carries no agent identity proven on its CONNECT, and nothing sent \
         inside a tunnel can prove one: the proxy's configuration is broken; tell its \
         operator",
    )
}

/// Whether the proxy refuses `method` whatever the service: `TRACE` and `TRACK` (any
/// case) ask the upstream, or any middlebox on the way, to echo the request back, and
/// the request carries the injected credential.
pub fn is_refused_method(method: &str) -> bool {
    method.len() == 5
        && (method.eq_ignore_ascii_case("TRACE") || method.eq_ignore_ascii_case("TRACK"))
}

/// `TRACE` / `TRACK` → 405.
pub fn method_not_allowed(method: &str) -> Reject {
    Reject::new(
        ErrorCode::MethodNotAllowed,
        format!(
            "{} is not forwarded: an upstream that implements it echoes the request back, \
             injected credentials included; the proxy forwards {ALLOWED_METHODS}",
            quote(method)
        ),
    )
}

/// The agent reached more than `limit` different hosts through wildcard services or the
/// `passthrough` policy within `window_s` seconds → 429.
pub fn too_many_hosts(agent: &str, limit: usize, window_s: u64) -> Reject {
    Reject::new(
        ErrorCode::TooManyHosts,
        format!(
            "agent {agent:?} sent requests to more than {limit} different hosts through \
             wildcard services or the passthrough policy within {window_s} s; retry later, \
             or propose a service for each host you need"
        ),
    )
}

/// The message of [`destination_forbidden`], without the host. Envoy, not the filter,
/// answers these (see [`ErrorCode::DestinationForbidden`]); the bootstraps under
/// `envoy/` carry the same text, and a test keeps them in step.
pub const DESTINATION_FORBIDDEN_MESSAGE: &str = "the proxy does not connect to loopback, \
     link-local (cloud metadata), private or other internal addresses, and this host \
     resolves to one; ask the operator to allow it in Envoy's ALLOWED_PRIVATE_UPSTREAMS \
     if it is a trusted internal service";

/// The destination resolved to an address the proxy never connects to → 403.
pub fn destination_forbidden() -> Reject {
    Reject::new(
        ErrorCode::DestinationForbidden,
        DESTINATION_FORBIDDEN_MESSAGE,
    )
}

/// Missing or malformed proxy credential → 407.
pub fn proxy_auth_required(reason: &str) -> Reject {
    Reject::new(
        ErrorCode::ProxyAuthRequired,
        format!(
            "proxy credentials required ({reason}): send Proxy-Authorization: Basic \
             base64(<agent-token>:<vault>), e.g. HTTP_PROXY=http://<agent-token>:<vault>@<proxy>, \
             or Proxy-Authorization: Bearer <agent-token>"
        ),
    )
}

/// Unknown, revoked or expired token → 407.
pub fn invalid_token() -> Reject {
    Reject::new(
        ErrorCode::InvalidToken,
        "the agent token is unknown, revoked or expired",
    )
}

/// No rules yet, or no answer from the control plane → 503.
pub fn control_plane_unavailable(detail: &str) -> Reject {
    Reject::new(
        ErrorCode::ControlPlaneUnavailable,
        format!("the Agent Vault control plane is unavailable ({detail}); retry shortly"),
    )
}

/// Several vaults, none named → 400.
pub fn vault_required<V: AsRef<str>>(agent: &str, vaults: &[V]) -> Reject {
    let names: Vec<&str> = vaults.iter().map(AsRef::as_ref).collect();
    Reject::new(
        ErrorCode::VaultRequired,
        format!(
            "agent {agent:?} can use several vaults ({}); name one in the proxy URL, \
             http://<agent-token>:<vault>@<proxy>, or with the header X-Vault: <vault>",
            names.join(", ")
        ),
    )
}

/// Vault named but not granted (or unknown) → 403. `vault` is `None` when what the
/// agent sent is not even a vault name: it is not echoed (it could be a swapped token).
pub fn vault_forbidden(agent: &str, vault: Option<&str>) -> Reject {
    let message = match vault {
        Some(vault) => format!("agent {agent:?} has no access to vault {}", quote(vault)),
        None => format!(
            "agent {agent:?} named a vault that does not exist (vault names are lowercase \
             letters, digits and hyphens); the proxy URL is http://<agent-token>:<vault>@<proxy>"
        ),
    };
    Reject::new(ErrorCode::Forbidden, message)
}

/// The agent has no vault at all → 403.
pub fn no_vault(agent: &str) -> Reject {
    Reject::new(
        ErrorCode::Forbidden,
        format!("agent {agent:?} has no access to any vault"),
    )
}

/// No usable `:authority` → 400.
pub fn invalid_request() -> Reject {
    Reject::new(
        ErrorCode::InvalidRequest,
        "the request has no valid host: send an absolute http:// URL through the proxy",
    )
}

/// Port assumed when a plain request's `:authority` names none (agents send `http://`).
pub const DEFAULT_PORT: u16 = 80;
/// Port assumed when an HTTPS agent's `CONNECT`, or a request inside its tunnel, names
/// none (`https://`).
pub const TLS_PORT: u16 = 443;

/// No service of `vault` matches `host:port` (policy `deny`) → 403 with a proposal
/// hint naming the host, and the port when it is not [`DEFAULT_PORT`].
pub fn no_service(vault: &str, host: &str, port: u16) -> Reject {
    no_service_on(vault, host, port, DEFAULT_PORT)
}

/// An HTTPS agent's `CONNECT host:port`, and no service of `vault` names that host on
/// that port (policy `deny`) → 403 with a proposal hint naming the host, and the port
/// when it is not [`TLS_PORT`]: a service with upstream TLS and no port (the usual
/// form) takes it. The hint is in the body of the `CONNECT`'s answer; clients show the
/// status (see `envoy/README.md`, "HTTPS agents").
pub fn no_service_for_tunnel(vault: &str, host: &str, port: u16) -> Reject {
    no_service_on(vault, host, port, TLS_PORT)
}

fn no_service_on(vault: &str, host: &str, port: u16, default_port: u16) -> Reject {
    let host = if port == default_port {
        host.to_owned()
    } else {
        format!("{host}:{port}")
    };
    let mut fields = serde_json::Map::new();
    fields.insert(
        "proposal_hint".to_owned(),
        json!({
            "host": host,
            "endpoint": PROPOSAL_ENDPOINT,
            "supported_auth_types": SUPPORTED_AUTH_TYPES,
        }),
    );
    Reject::with_fields(
        ErrorCode::Forbidden,
        format!(
            "no service of vault {vault:?} matches {host}; propose one with \
             {PROPOSAL_ENDPOINT} and a human approves it"
        ),
        fields,
    )
}

/// The matched service is disabled → 403.
pub fn service_disabled(vault: &str, service: &str) -> Reject {
    Reject::new(
        ErrorCode::ServiceDisabled,
        format!("service {service:?} of vault {vault:?} is disabled"),
    )
}

/// The matched service lists the methods it forwards, and `method` is not one of them
/// → 403, naming the service, the method and the allowed list (`allowed_methods`).
pub fn method_not_allowed_for_service<S: AsRef<str>>(
    vault: &str,
    service: &str,
    method: &str,
    allowed: &[S],
) -> Reject {
    let allowed: Vec<&str> = allowed.iter().map(AsRef::as_ref).collect();
    let mut fields = serde_json::Map::new();
    fields.insert("service".to_owned(), Value::from(service));
    fields.insert("method".to_owned(), Value::from(quote_raw(method)));
    fields.insert("allowed_methods".to_owned(), json!(allowed));
    Reject::with_fields(
        ErrorCode::MethodNotAllowedForService,
        format!(
            "service {service:?} of vault {vault:?} forwards only {}; {} is refused and \
             gets no credential (methods are case-sensitive); a human can change the \
             service's methods, or approve a proposal that does",
            allowed.join(", "),
            quote(method)
        ),
        fields,
    )
}

/// The agent used up the matched service's rate limit (`requests` per `per`) in the
/// current window → 429 with `Retry-After: retry_after_s` (at least 1), naming the
/// service, the limit and `retry_after` (seconds). The count is kept per agent token
/// and service, across connections and tunnels.
pub fn rate_limited(
    vault: &str,
    service: &str,
    requests: u32,
    per: &str,
    retry_after_s: u64,
) -> Reject {
    let retry_after_s = retry_after_s.max(1);
    over_limit(
        ("service", service),
        format!(
            "service {service:?} of vault {vault:?} allows {requests} requests per {per} \
             for each agent, and this agent used them up; retry in {retry_after_s} s \
             (new connections or tunnels share the same count)"
        ),
        (requests, per),
        retry_after_s,
    )
}

/// The agent used up its vault's rate limit (`requests` per `per`, over all the
/// vault's services together) → 429 `rate_limited` with `Retry-After`, as
/// [`rate_limited`] but naming the vault's limit (`"scope": "vault"`).
pub fn vault_rate_limited(vault: &str, requests: u32, per: &str, retry_after_s: u64) -> Reject {
    let retry_after_s = retry_after_s.max(1);
    over_limit(
        ("scope", "vault"),
        format!(
            "vault {vault:?} allows {requests} requests per {per} for each agent over all \
             its services, and this agent used them up; retry in {retry_after_s} s \
             (new connections or tunnels share the same count)"
        ),
        (requests, per),
        retry_after_s,
    )
}

/// The 429 of both limits: `whose` names the limit, then `limit` and `retry_after`,
/// and the `Retry-After` header.
fn over_limit(
    (name, value): (&str, &str),
    message: String,
    (requests, per): (u32, &str),
    retry_after_s: u64,
) -> Reject {
    let mut fields = serde_json::Map::new();
    fields.insert(name.to_owned(), Value::from(value));
    fields.insert(
        "limit".to_owned(),
        json!({"requests": requests, "per": per}),
    );
    fields.insert("retry_after".to_owned(), Value::from(retry_after_s));
    let mut reject = Reject::with_fields(ErrorCode::RateLimited, message, fields);
    reject
        .extra_headers
        .push(("retry-after", Cow::Owned(retry_after_s.to_string())));
    reject
}

/// The service redacts responses, and the upstream compressed its response with
/// `encoding`, which the filter cannot decode to scan it → 502 (the response is
/// dropped, never passed on unscanned), naming the encoding and the ways out.
pub fn response_not_redactable(vault: &str, service: &str, encoding: &str) -> Reject {
    let mut fields = serde_json::Map::new();
    fields.insert("service".to_owned(), Value::from(service));
    fields.insert(
        "content_encoding".to_owned(),
        Value::from(quote_raw(encoding)),
    );
    Reject::with_fields(
        ErrorCode::ResponseNotRedactable,
        format!(
            "service {service:?} of vault {vault:?} redacts credentials from responses, \
             and the upstream answered with content-encoding {}, which the proxy cannot \
             decode to scan; ask for an uncompressed, gzip or deflate response \
             (accept-encoding: gzip, deflate, identity), or have the service's \
             redact_responses turned off",
            quote(encoding)
        ),
        fields,
    )
}

/// What an agent sent, cut to 64 characters (no quotes added).
fn quote_raw(text: &str) -> String {
    let mut short: String = text.chars().take(64).collect();
    if short.len() < text.len() {
        short.push('…');
    }
    short
}

/// The matched service's auth rule does not compile → 502 (never forwarded).
pub fn invalid_service(vault: &str, service: &str, reason: &str) -> Reject {
    Reject::new(
        ErrorCode::InvalidService,
        format!("service {service:?} of vault {vault:?} has an invalid auth rule ({reason}); requests to it are refused until it is fixed"),
    )
}

/// A referenced credential is not set → 502, naming the key.
pub fn credential_not_found(vault: &str, key: &str) -> Reject {
    let mut fields = serde_json::Map::new();
    fields.insert("key".to_owned(), Value::from(key));
    Reject::with_fields(
        ErrorCode::CredentialNotFound,
        format!("credential {key:?} is not set in vault {vault:?}"),
        fields,
    )
}

/// Why a service's headers could not be rendered → 502: a missing credential, a
/// value that cannot go into a header, or a broken auth rule.
pub fn render_failed(vault: &str, service: &str, error: &RenderError) -> Reject {
    match error {
        RenderError::Missing(key) => credential_not_found(vault, key),
        RenderError::InvalidValue(key) => invalid_credential_value(vault, key),
        RenderError::InvalidAuth(error) => invalid_service(vault, service, &error.to_string()),
    }
}

/// Which vault a request of `agent` is for (DESIGN.md §3): the one it named (the proxy
/// credential's, else `X-Vault`) if it is granted; else its only vault. `grants` are
/// the names of the vaults the agent may use.
pub fn choose_vault<'a, G: AsRef<str>>(
    agent: &str,
    grants: &'a [G],
    named: Option<&str>,
) -> Result<&'a str, Reject> {
    match named {
        Some(name) => grants
            .iter()
            .map(AsRef::as_ref)
            .find(|granted| *granted == name)
            .ok_or_else(|| {
                // Not echoed unless it is a vault name: it could be a swapped token.
                let shown = validate_vault_name(name).is_ok().then_some(name);
                vault_forbidden(agent, shown)
            }),
        None => match grants {
            [only] => Ok(only.as_ref()),
            [] => Err(no_vault(agent)),
            several => Err(vault_required(agent, several)),
        },
    }
}

/// A credential value holds CR, LF or NUL → 502, naming the key.
pub fn invalid_credential_value(vault: &str, key: &str) -> Reject {
    let mut fields = serde_json::Map::new();
    fields.insert("key".to_owned(), Value::from(key));
    Reject::with_fields(
        ErrorCode::InvalidCredentialValue,
        format!(
            "credential {key:?} of vault {vault:?} has a value that cannot be sent in an HTTP \
             header (it contains CR, LF or NUL, or ':' in a Basic user name)"
        ),
        fields,
    )
}

/// A request body a `body` substitution must buffer is larger than `limit` bytes →
/// 413 (`got`: its `content-length`, when it declared one).
pub fn request_body_too_large(service: &str, limit: u64, got: Option<u64>) -> Reject {
    let declared = got.map_or_else(String::new, |got| format!(" ({got} bytes declared)"));
    let mut fields = serde_json::Map::new();
    fields.insert("limit".to_owned(), Value::from(limit));
    Reject::with_fields(
        ErrorCode::RequestBodyTooLarge,
        format!(
            "the request body is larger than {limit} bytes{declared}: service {service:?} \
             substitutes placeholders in bodies, which the proxy must hold whole in memory, \
             up to that bound (max_substitution_body_bytes)"
        ),
        fields,
    )
}

/// A placeholder of a `body` substitution in a body whose content type is neither
/// JSON nor form-encoded → 415: the value's encoding would be a guess.
pub fn unsupported_substitution_body(service: &str, content_type: &str) -> Reject {
    let shown = if content_type.is_empty() {
        "no content-type".to_owned()
    } else {
        format!("content-type {}", quote(content_type))
    };
    Reject::new(
        ErrorCode::UnsupportedSubstitutionBody,
        format!(
            "service {service:?} substitutes placeholders in request bodies of type \
             application/json (or application/*+json) or application/x-www-form-urlencoded \
             only; this body has {shown} and holds a placeholder, so it was not sent"
        ),
    )
}

/// A placeholder of a `body` substitution in a JSON body that is not UTF-8 → 415.
pub fn substitution_body_not_utf8(service: &str) -> Reject {
    Reject::new(
        ErrorCode::UnsupportedSubstitutionBody,
        format!(
            "service {service:?} substitutes placeholders in request bodies, and this JSON \
             body holding a placeholder is not valid UTF-8, so it was not sent"
        ),
    )
}

/// A value a `header` substitution would write holds a control character → 502
/// `invalid_credential_value`, naming the key (nothing is sent).
pub fn unsafe_substituted_header(vault: &str, key: &str) -> Reject {
    let mut fields = serde_json::Map::new();
    fields.insert("key".to_owned(), Value::from(key));
    Reject::with_fields(
        ErrorCode::InvalidCredentialValue,
        format!(
            "credential {key:?} of vault {vault:?} has a value that cannot be substituted in \
             a request header (it contains a control character); the request was not sent"
        ),
        fields,
    )
}

/// Trailers after a body a `body` substitution holds → 415: the substituted body
/// could not be sent before them.
pub fn substitution_body_with_trailers(service: &str) -> Reject {
    Reject::new(
        ErrorCode::UnsupportedSubstitutionBody,
        format!(
            "service {service:?} substitutes placeholders in request bodies, which the \
             proxy cannot do for a body followed by trailers; send it without trailers"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(reject: &Reject) -> Value {
        serde_json::from_str(&reject.body).unwrap_or_else(|e| panic!("{e}: {}", reject.body))
    }

    #[test]
    fn a_grpc_call_is_told_by_its_content_type() {
        for yes in [
            "application/grpc",
            "application/grpc+proto",
            "Application/GRPC+json",
            "application/grpc;charset=utf-8",
        ] {
            assert!(is_grpc(Some(yes)), "{yes}");
        }
        for no in [
            "application/grpc-web",
            "application/grpcx",
            "application/json",
            "",
        ] {
            assert!(!is_grpc(Some(no)), "{no}");
        }
        assert!(!is_grpc(None));
    }

    #[test]
    fn a_refused_grpc_call_gets_the_status_a_caller_can_act_on_and_the_http_status_in_a_header() {
        let cases = [
            (proxy_auth_required("x"), GrpcStatus::Unauthenticated, 16),
            (invalid_token(), GrpcStatus::Unauthenticated, 16),
            (no_service("v", "h", 80), GrpcStatus::PermissionDenied, 7),
            (service_disabled("v", "s"), GrpcStatus::PermissionDenied, 7),
            (destination_forbidden(), GrpcStatus::PermissionDenied, 7),
            (
                control_plane_unavailable("down"),
                GrpcStatus::Unavailable,
                14,
            ),
            (
                credential_not_found("v", "K"),
                GrpcStatus::FailedPrecondition,
                9,
            ),
            (
                vault_required::<&str>("a", &[]),
                GrpcStatus::InvalidArgument,
                3,
            ),
        ];
        for (reject, status, code) in cases {
            assert_eq!(reject.code.grpc_status(), status, "{reject:?}");
            assert_eq!(status.code(), code);
            let headers = reject.grpc_headers();
            let get = |name: &str| {
                headers
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| v.to_string())
            };
            assert_eq!(get(ERROR_HEADER).as_deref(), Some("true"));
            assert_eq!(
                get(ERROR_CODE_HEADER).as_deref(),
                Some(reject.code.as_str())
            );
            assert_eq!(get(STATUS_HEADER), Some(reject.status().to_string()));
            assert_eq!(body(&reject)["message"], reject.message.as_str());
        }
        // Every code maps to a status other than OK.
        for code in ErrorCode::ALL {
            assert_ne!(code.grpc_status().code(), 0, "{code:?}");
        }
    }

    #[test]
    fn codes_and_statuses_follow_the_design() {
        // (reject, status, code)
        let cases: Vec<(Reject, u16, &str)> = vec![
            (connect_not_supported(), 405, "connect_not_supported"),
            (method_not_allowed("TRACE"), 405, "method_not_allowed"),
            (destination_forbidden(), 403, "destination_forbidden"),
            (too_many_hosts("a", 100, 60), 429, "too_many_hosts"),
            (
                tunnel_host_mismatch("SNI", "b.example", "a.example:443"),
                421,
                "tunnel_host_mismatch",
            ),
            (tunnel_without_identity(), 407, "proxy_auth_required"),
            (no_service_for_tunnel("v", "h", 443), 403, "forbidden"),
            (proxy_auth_required("x"), 407, "proxy_auth_required"),
            (invalid_token(), 407, "invalid_token"),
            (vault_required::<&str>("a", &[]), 400, "vault_required"),
            (invalid_request(), 400, "invalid_request"),
            (vault_forbidden("a", Some("v")), 403, "forbidden"),
            (vault_forbidden("a", None), 403, "forbidden"),
            (no_service("v", "h", 80), 403, "forbidden"),
            (service_disabled("v", "s"), 403, "service_disabled"),
            (
                method_not_allowed_for_service("v", "s", "POST", &["GET"]),
                403,
                "method_not_allowed_for_service",
            ),
            (rate_limited("v", "s", 5, "minute", 3), 429, "rate_limited"),
            (
                response_not_redactable("v", "s", "br"),
                502,
                "response_not_redactable",
            ),
            (invalid_service("v", "s", "r"), 502, "invalid_service"),
            (credential_not_found("v", "K"), 502, "credential_not_found"),
            (
                invalid_credential_value("v", "K"),
                502,
                "invalid_credential_value",
            ),
            (
                control_plane_unavailable("d"),
                503,
                "control_plane_unavailable",
            ),
            (
                request_body_too_large("s", 10, Some(11)),
                413,
                "request_body_too_large",
            ),
            (
                unsupported_substitution_body("s", "text/plain"),
                415,
                "unsupported_substitution_body",
            ),
            (
                substitution_body_not_utf8("s"),
                415,
                "unsupported_substitution_body",
            ),
            (
                unsafe_substituted_header("v", "K"),
                502,
                "invalid_credential_value",
            ),
            (
                substitution_body_with_trailers("s"),
                415,
                "unsupported_substitution_body",
            ),
        ];
        for (reject, status, code) in cases {
            assert_eq!(reject.status(), status, "{code}");
            let body = body(&reject);
            assert_eq!(body["error"], code);
            assert!(
                body["message"].as_str().is_some_and(|m| !m.is_empty()),
                "{code}"
            );
            let headers = reject.headers();
            assert!(headers.contains(&("content-type", "application/json")));
            assert!(headers.contains(&(ERROR_HEADER, "true")));
            let challenges = headers
                .iter()
                .filter(|(n, _)| *n == "proxy-authenticate")
                .count();
            assert_eq!(challenges, usize::from(status == 407), "{code}");
        }
    }

    #[test]
    fn substitution_refusals_say_the_bound_and_the_content_type() {
        let too_large = body(&request_body_too_large("tg", 4096, Some(5000)));
        assert_eq!(too_large["limit"], 4096);
        let message = too_large["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("larger than 4096 bytes (5000 bytes declared)"),
            "{message}"
        );
        assert!(message.contains("max_substitution_body_bytes"), "{message}");
        let streamed = body(&request_body_too_large("tg", 4096, None));
        assert!(!streamed["message"]
            .as_str()
            .unwrap_or_default()
            .contains("declared"));
        let unsupported = body(&unsupported_substitution_body("tg", "text/plain"));
        let message = unsupported["message"].as_str().unwrap_or_default();
        assert!(message.contains("content-type \"text/plain\""), "{message}");
        let untyped = body(&unsupported_substitution_body("tg", ""));
        assert!(untyped["message"]
            .as_str()
            .unwrap_or_default()
            .contains("no content-type"));
    }

    #[test]
    fn every_code_is_listed_once_at_its_index() {
        for (position, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(code.index(), position, "{}", code.as_str());
        }
    }

    #[test]
    fn trace_and_track_are_refused_in_any_case_and_nothing_else_is() {
        for method in ["TRACE", "trace", "Trace", "TRACK", "track", "tRaCk"] {
            assert!(is_refused_method(method), "{method}");
        }
        for method in [
            "GET", "POST", "TRACES", "TRAC", "CONNECT", "PATCH", "", "XTRACE",
        ] {
            assert!(!is_refused_method(method), "{method}");
        }
        let refused = method_not_allowed("TRACE");
        assert!(refused.headers().contains(&("allow", ALLOWED_METHODS)));
        assert!(!ALLOWED_METHODS.contains("TRACE"));
    }

    #[test]
    fn a_method_refused_by_its_service_names_the_service_the_method_and_the_list() {
        let reject = method_not_allowed_for_service("v", "stripe", "POST", &["GET", "HEAD"]);
        let body = body(&reject);
        assert_eq!(body["error"], "method_not_allowed_for_service");
        assert_eq!(body["service"], "stripe");
        assert_eq!(body["method"], "POST");
        assert_eq!(body["allowed_methods"], json!(["GET", "HEAD"]));
        let message = body["message"].as_str().unwrap_or_default();
        assert!(message.contains("forwards only GET, HEAD"), "{message}");
        assert!(reject.headers().contains(&(ERROR_HEADER, "true")));
        let long = method_not_allowed_for_service("v", "s", &"X".repeat(500), &["GET"]);
        assert!(long.body.len() < 600, "{}", long.body);
    }

    #[test]
    fn rate_limited_names_the_limit_and_says_when_to_retry() {
        let reject = rate_limited("v", "stripe", 5, "minute", 42);
        let body = body(&reject);
        assert_eq!(body["error"], "rate_limited");
        assert_eq!(body["service"], "stripe");
        assert_eq!(body["limit"], json!({"requests": 5, "per": "minute"}));
        assert_eq!(body["retry_after"], 42);
        let headers = reject.headers();
        assert!(headers.contains(&("retry-after", "42")), "{headers:?}");
        assert!(headers.contains(&(ERROR_HEADER, "true")));
        let soon = rate_limited("v", "s", 1, "second", 0);
        assert!(soon.headers().contains(&("retry-after", "1")));
        assert!(soon.body.contains(r#""retry_after":1"#), "{}", soon.body);
    }

    #[test]
    fn a_response_not_redactable_names_the_encoding_and_the_ways_out() {
        let body = body(&response_not_redactable("v", "s", "br"));
        assert_eq!(body["content_encoding"], "br");
        assert_eq!(body["service"], "s");
        let message = body["message"].as_str().unwrap_or_default();
        for part in ["\"br\"", "gzip", "identity", "redact_responses"] {
            assert!(message.contains(part), "{part}: {message}");
        }
    }

    #[test]
    fn proxy_auth_required_has_the_challenge() {
        assert!(proxy_auth_required("x")
            .headers()
            .contains(&("proxy-authenticate", "Basic realm=\"agent-vault\"")));
    }

    #[test]
    fn proposal_hint_shape() {
        let body = body(&no_service("default", "api.example.com", 8443));
        assert_eq!(
            body["proposal_hint"],
            json!({
                "host": "api.example.com:8443",
                "endpoint": "POST /v1/proposals",
                "supported_auth_types": ["bearer", "basic", "api-key", "custom", "passthrough"],
            })
        );
        assert!(body.get("proposal_hint").is_some());
        assert!(vault_forbidden("a", Some("b"))
            .body
            .find("proposal_hint")
            .is_none());
    }

    #[test]
    fn a_tunnels_hint_names_the_port_only_when_it_is_not_443() {
        let hint_host = |port| {
            body(&no_service_for_tunnel("v", "h.example", port))["proposal_hint"]["host"].clone()
        };
        assert_eq!(hint_host(443), "h.example");
        assert_eq!(hint_host(8443), "h.example:8443");
    }

    #[test]
    fn a_tunnel_host_mismatch_names_the_tunnels_host_and_quotes_the_other() {
        let reject = tunnel_host_mismatch(":authority", "evil\r\nx", "api.example.com");
        let body = body(&reject);
        assert_eq!(body["host"], "api.example.com");
        let message = body["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("opened (CONNECT) for api.example.com"),
            "{message}"
        );
        assert!(message.contains("\"evil\\r\\nx\""), "{message}");
    }

    #[test]
    fn the_hint_names_the_port_only_when_it_is_not_80() {
        let hint_host =
            |port| body(&no_service("v", "h.example", port))["proposal_hint"]["host"].clone();
        assert_eq!(hint_host(80), "h.example");
        assert_eq!(hint_host(443), "h.example:443");
    }

    #[test]
    fn the_vault_is_the_named_grant_or_the_only_one() {
        fn code(result: Result<&str, Reject>) -> Result<&str, &'static str> {
            result.map_err(|r| r.code.as_str())
        }
        let one = ["alpha"];
        let two = ["alpha", "beta"];
        let none: [&str; 0] = [];
        type Chosen<'a> = Result<&'a str, &'static str>;
        #[rustfmt::skip]
        let cases: [(&str, Chosen<'_>, Chosen<'_>); 7] = [
            ("a named grant", code(choose_vault("a", &two, Some("beta"))), Ok("beta")),
            ("the only grant when none is named", code(choose_vault("a", &one, None)), Ok("alpha")),
            ("a named vault that is not granted", code(choose_vault("a", &one, Some("beta"))), Err("forbidden")),
            ("several grants and none named", code(choose_vault("a", &two, None)), Err("vault_required")),
            ("no grant at all", code(choose_vault("a", &none, None)), Err("forbidden")),
            ("no grant at all, one named", code(choose_vault("a", &none, Some("alpha"))), Err("forbidden")),
            ("a name that is no vault name", code(choose_vault("a", &one, Some("av_agt_x"))), Err("forbidden")),
        ];
        for (behaviour, got, expected) in cases {
            assert_eq!(got, expected, "{behaviour}");
        }
        let Err(refused) = choose_vault("a", &one, Some("av_agt_secret")) else {
            panic!("refused")
        };
        assert!(!refused.body.contains("av_agt_secret"), "{}", refused.body);
    }

    #[test]
    fn render_failures_name_the_key_never_a_value() {
        let missing = render_failed("v", "s", &RenderError::Missing("API_KEY".into()));
        assert_eq!(missing.code, ErrorCode::CredentialNotFound);
        assert_eq!(body(&missing)["key"], "API_KEY");
        let invalid = render_failed("v", "s", &RenderError::InvalidValue("API_KEY".into()));
        assert_eq!(invalid.code, ErrorCode::InvalidCredentialValue);
    }

    #[test]
    fn quoted_agent_input_is_short_and_one_line() {
        let quoted = quote(&format!("a\nb{}", "x".repeat(500)));
        assert!(!quoted.contains('\n'));
        assert!(quoted.chars().count() < 80, "{quoted}");
    }
}
