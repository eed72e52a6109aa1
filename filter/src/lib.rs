//! Agent Vault's proxy-wasm filter for Envoy (DESIGN.md §3, §4, §6).
//!
//! Agents send plain `http://` requests through Envoy with their agent token as proxy
//! credential, or (HTTPS agents) a `CONNECT` that Envoy decrypts, each request inside
//! going through a second instance of the filter with the identity the `CONNECT`
//! proved. Per request, the filter authenticates the agent against the rules
//! snapshot it polls from the control plane, matches the request to one of the vault's
//! services, and injects that service's credentials — from its per-worker cache, or
//! fetched from the control plane over the Unix-socket cluster while the request is
//! paused. Every failure fails closed with the JSON error of DESIGN.md §6.
//!
//! | concept                                         | module           |
//! |-------------------------------------------------|------------------|
//! | plugin configuration                            | [`config`]       |
//! | the request headers, read in one host call      | [`header_map`]   |
//! | the rules snapshot, compiled for lookups        | [`snapshot`]     |
//! | the per-worker credential cache                 | [`cache`]        |
//! | deciding a request (refuse / forward / fetch)   | [`decide`]       |
//! | new hosts per agent through wildcards/passthrough | [`host_budget`] |
//! | single-flight fetches and their answers         | [`flight`]       |
//! | request-log records and batches                 | [`request_log`]  |
//! | placeholder substitution in requests            | [`substitute`]   |
//! | one worker's state, polling and timers          | [`worker`]       |
//! | the Envoy stats operators watch                 | [`stats`]        |
//! | an HTTPS agent's identity, carried into its tunnel | [`tunnel`]     |
//! | what the filter asks of Envoy (a trait)         | [`host`]         |
//! | the callbacks: the per-request state machine    | [`driver`]       |
//! | Envoy's host and contexts (wasm32 only)         | `glue`           |
//!
//! The agent's `Proxy-Authorization` parser and the filter's own responses (the error
//! codes of DESIGN.md §6) are the wire contract, shared with the control plane:
//! [`agent_vault_rules::proxy_auth`] and [`agent_vault_rules::reply`].
//!
//! Everything but `glue` is plain Rust, unit-tested on the host with time passed in
//! as unix milliseconds. The [`driver`] runs every callback against the [`host::Host`]
//! trait, so its tests drive whole requests through a recording fake host; `glue` is
//! the thin proxy-wasm skin: Envoy's implementation of the trait, and contexts that
//! hand each callback to the driver.

#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]
#![warn(missing_docs)]

pub mod cache;
pub mod config;
pub mod decide;
pub mod driver;
pub mod flight;
pub mod header_map;
pub mod host;
pub mod host_budget;
pub mod rate_limit;
pub mod redact;
pub mod request_log;
pub mod snapshot;
pub mod stats;
pub mod substitute;
pub mod tunnel;
pub mod upgrades;
pub mod worker;

#[cfg(target_arch = "wasm32")]
mod glue;
