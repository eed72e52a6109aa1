//! The end-to-end tests: one binary (one link step), a module per area, against the
//! real `agent-vault` binary, real Envoy with the built filter and loopback upstreams,
//! started with the kit in `src/`. `./dev test` builds what they need; one area alone:
//! `cargo test -p agent-vault-testkit --test e2e proxy::`.

mod access_log;
mod browser;
mod catalog;
mod cli;
mod deployment;
mod envoy_configs;
mod https_ca;
mod https_proxy;
mod long_poll;
mod methods;
mod multinode;
mod proposals;
mod protocols;
mod proxy;
mod proxy_e2e;
mod rate_limits;
mod redaction;
mod refresh_ahead;
mod request_log;
mod security_api;
mod security_proxy;
mod security_ui;
mod store;
mod substitution;
