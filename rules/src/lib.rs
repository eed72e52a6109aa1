//! Agent Vault's service rules: the one source of truth shared by the proxy-wasm filter
//! (to match requests and inject credentials) and the control plane (to validate and
//! publish rules). Pure Rust, no I/O; it builds for the host and for
//! `wasm32-unknown-unknown`.
//!
//! | concept (DESIGN.md)                                      | module         |
//! |----------------------------------------------------------|----------------|
//! | vault, credential key, service and agent names           | [`names`]      |
//! | host patterns and matching requests to services          | [`host`]       |
//! | auth types and header rendering                          | [`auth`]       |
//! | services and the unmatched-host policy                   | [`service`]    |
//! | placeholders replaced by a credential in path, query, header, body | [`substitution`] |
//! | data-plane protocol (snapshot, credentials, logs)        | [`wire`]       |
//! | the request log's filter state (Envoy's access log)      | [`log_state`]  |
//! | the agent's proxy credential (`Proxy-Authorization`)     | [`proxy_auth`] |
//! | what an agent sees when refused: codes, statuses, bodies | [`reply`]      |
//! | validation errors and their stable codes                 | [`error`]      |
//!
//! The filter's hot path: build a [`ServiceMatcher`] per vault when a snapshot
//! arrives, then per request [`normalize_authority`] → [`ServiceMatcher::find`] →
//! [`ServiceMatcher::auth`] → [`CompiledAuth::render`].

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;
pub mod error;
pub mod host;
pub mod log_state;
pub mod names;
pub mod proxy_auth;
pub mod reply;
pub mod service;
pub mod substitution;
pub mod wire;

pub use auth::{Auth, CompiledAuth, RenderError};
pub use error::RuleError;
pub use host::{
    normalize_authority, parse_passthrough_host, HostPattern, PathPattern, ServiceMatcher,
    ValidationOptions, MAX_PASSTHROUGH_HOSTS,
};
pub use log_state::{
    envoy_names_method, LogState, LogStateError, LOG_STATE_FILTER_STATE, LOG_STATE_PROPERTY,
    LOG_STATE_VERSION,
};
pub use names::{
    validate_agent_name, validate_credential_key, validate_service_name, validate_vault_name,
};
pub use service::{
    method_allowed, validate_methods, validate_services, RateLimit, RatePeriod, Service,
    UnmatchedHostPolicy, MAX_RATE_LIMIT_REQUESTS,
};
pub use wire::{
    loggable_path, truncated, CredentialsRequest, CredentialsResponse, DataplaneCounts, Grant,
    LogRecord, Role, Snapshot, SnapshotAgent, SnapshotVault, CONTROL_PLANE_HEADER,
    CREDENTIALS_PATH, LOGS_PATH, MAX_LOG_BATCH_RECORDS, MAX_LOG_ERROR, MAX_LOG_HOST,
    MAX_LOG_METHOD, MAX_LOG_NAME, MAX_LOG_PATH, SNAPSHOT_PATH, STATS_PATH, SUPPORTED_AUTH_TYPES,
};
pub use wire::{MAX_SNAPSHOT_WAIT_MS, SNAPSHOT_WAIT_PARAM};
