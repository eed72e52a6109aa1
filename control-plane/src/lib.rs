//! Agent Vault's control plane: the encrypted credential store, the management API,
//! the data-plane socket Envoy's filter talks to, and the `agent-vault` CLI.
//!
//! | concept | module |
//! |---|---|
//! | sled trees, transactions, durability, the wrapped data key | [`store`] |
//! | AES-256-GCM sealing, Argon2id, token hashing | [`crypto`] |
//! | users, sessions, invites, vault membership | [`users`] |
//! | vaults and who may act on them | [`vaults`] |
//! | credential values | [`credentials`] |
//! | service rules (validated by `agent-vault-rules`) | [`services`] |
//! | agents and their tokens | [`agents`] |
//! | proposals: agents ask, humans approve or reject | [`proposals`] |
//! | the request log and its retention | [`logs`] |
//! | the management HTTP API (TCP) | [`api`] |
//! | the browser UI: login, approval page, vault pages | [`ui`] |
//! | the data-plane protocol (Unix socket only) | [`dataplane`] |
//! | `/metrics` for operators (Prometheus text) | [`metrics`] |
//! | listeners, socket permissions, startup | [`server`] |
//! | the `agent-vault` command line | [`cli`] |
//! | errors → HTTP status and code | [`error`] |

pub mod agents;
pub mod api;
pub mod cli;
pub mod clock;
pub mod credentials;
pub mod crypto;
pub mod dataplane;
pub mod error;
pub mod logs;
pub mod metrics;
pub mod proposals;
pub mod server;
mod server_args;
pub mod services;
pub mod store;
pub mod ui;
pub mod users;
pub mod vaults;
