//! The test kit: what the end-to-end tests (`tests/e2e/`) start and talk to.

#[cfg(feature = "e2e")]
pub mod control_plane;
#[cfg(feature = "e2e")]
pub mod envoy;
#[cfg(feature = "e2e")]
pub mod stack;
#[cfg(feature = "e2e")]
pub mod upstream;
