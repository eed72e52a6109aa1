//! The test kit: what the end-to-end tests (`tests/e2e/`) start and talk to, and the
//! process and HTTP helpers the benchmark (`bench/`) shares with them.
//!
//! | concept | module |
//! |---|---|
//! | child processes: tied to the test, stopped by PID, their announced address | [`process`] |
//! | HTTP/1.1 on raw sockets: one-shot requests, keep-alive connections, reading a request | [`http`] |
//! | loopback: free ports, an accept loop for in-process servers | [`net`] |
//! | the `agent-vault` binary as server and CLI, the management API, its store (sled, or a PostgreSQL database shared by several nodes) | `control_plane` |
//! | Envoy with the built filter, its templates rendered and validated | `envoy` |
//! | the whole system at once (one node, or several on one database), and waiting for a change to reach every worker | `stack` |
//! | echo upstreams (plain and TLS) and a test CA | `upstream` |
//! | an HTTPS agent's tunnel, byte by byte: CONNECT, TLS with any SNI, any `Host` | `https_agent` |
//! | a control plane that misbehaves on purpose | `fake_control_plane` |
//!
//! The last six need the `e2e` feature (on by default): an HTTP client, TLS and temp
//! dirs, which the benchmark's release build does without.

pub mod http;
pub mod net;
pub mod process;

#[cfg(feature = "e2e")]
pub mod control_plane;
#[cfg(feature = "e2e")]
pub mod envoy;
#[cfg(feature = "e2e")]
pub mod fake_control_plane;
#[cfg(feature = "e2e")]
pub mod https_agent;
#[cfg(feature = "e2e")]
pub mod stack;
#[cfg(feature = "e2e")]
pub mod upstream;
