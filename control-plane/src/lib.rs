//! Agent Vault's control plane: the encrypted credential store, the management API,
//! the data-plane socket Envoy's filter talks to, and the `agent-vault` CLI.
//!
//! The modules from the bottom up: each uses only modules listed above it (tests
//! aside), so the list is also a reading order.
//!
//! | layer | concept | module |
//! |---|---|---|
//! | base | AES-256-GCM sealing, Argon2id, tokens and their prefixes | [`crypto`] |
//! | | errors → HTTP status and code | [`error`] |
//! | | time, and how it is shown | [`clock`] |
//! | storage | the storage boundary (ordered trees, transactions) on sled or PostgreSQL, durability, change notifications, the wrapped data key | [`store`] |
//! | access | vaults, principals, roles: who may act on which vault | [`access`] |
//! | concepts | agents and their tokens | [`agents`] |
//! | | credential values | [`credentials`] |
//! | | users, sessions, invites, vault members | [`users`] |
//! | | service rules (validated by `agent-vault-rules`) | [`services`] |
//! | | built-in service templates for common APIs | [`catalog`] |
//! | | proposals: agents ask, humans approve or reject | [`proposals`] |
//! | | the request log and its retention | [`logs`] |
//! | | the proxy CA of HTTPS interception, and the leaves it signs | [`ca`] |
//! | across concepts | a vault's life (deleting one cascades) | [`vaults`] |
//! | | rotating the data key (re-seals every value) | [`master_key`] |
//! | | the rules snapshot the data plane polls | [`snapshot`] |
//! | | leaf certificates for intercepted hosts: which names, minting, renewal, bounds | [`leaves`] |
//! | HTTP shell | state, extractors, the blocking pool | [`http`] |
//! | HTTP routes | the management API (TCP) | [`api`] |
//! | | the browser UI: login, approval page, vault pages | [`ui`] |
//! | | the data-plane protocol and `ext_authz` (Unix socket only) | [`dataplane`] |
//! | | SDS: the leaf certificates Envoy asks for (delta xDS, gRPC, Unix socket only) | [`sds`] |
//! | | `/metrics` for operators (Prometheus text) | [`metrics`] |
//! | process | HTTPS for the TCP listener | [`tls`] |
//! | | listeners, socket permissions, the app, startup | [`server`] |
//! | | the `agent-vault` command line (an HTTP client of [`api`]) | [`cli`] |
//!
//! Test fixtures shared by every module's unit tests are in `testing` (tests only).

pub mod access;
pub mod agents;
pub mod api;
pub mod ca;
pub mod catalog;
pub mod cli;
pub mod clock;
pub mod credentials;
pub mod crypto;
pub mod dataplane;
pub mod error;
pub mod http;
pub mod leaves;
pub mod logs;
pub mod master_key;
pub mod metrics;
pub mod proposals;
pub mod sds;
pub mod server;
pub mod services;
pub mod snapshot;
pub mod store;
pub mod tls;
pub mod ui;
pub mod users;
pub mod vaults;

#[cfg(test)]
mod layering;
#[cfg(test)]
mod testing;
