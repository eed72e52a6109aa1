//! The rules snapshot the data plane polls (DESIGN.md §4): every vault with its
//! services and every agent's token hash and grants, no secret. It is rebuilt only
//! when the store's version changed, and the serialized bytes are shared between
//! polls: with many Envoy workers polling every second, the common answer is a 304
//! that costs one atomic read and a string compare.

use std::sync::Mutex;
use std::time::Instant;

use agent_vault_rules::{Snapshot, SnapshotAgent, SnapshotVault};
use axum::body::Bytes;

use crate::access::VaultRecord;
use crate::error::Result;
use crate::store::{scan_json, Store};

/// The last snapshot built: its version and serialized JSON.
#[derive(Default)]
pub struct SnapshotCache(Mutex<Option<(u64, Bytes)>>);

impl Store {
    /// The data plane's view: vaults with their services, agents with their grants.
    /// No secrets: token hashes only, no credential values.
    pub fn build_snapshot(&self) -> Result<Snapshot> {
        let version = self.snapshot_version()?;
        let mut vaults = Vec::new();
        for (_, vault) in scan_json::<VaultRecord>(&self.trees.vaults, b"")? {
            vaults.push(SnapshotVault {
                services: self.services_of(&vault.id)?,
                name: vault.name,
                unmatched_host_policy: vault.unmatched_host_policy,
                passthrough_hosts: vault.passthrough_hosts,
                rate_limit: vault.rate_limit,
            });
        }
        let agents = self
            .all_agents()?
            .into_iter()
            .map(|agent| SnapshotAgent {
                token_sha256: agent.token_sha256,
                name: agent.name,
                vaults: agent.vaults,
                expires_at: agent.expires_at,
            })
            .collect();
        Ok(Snapshot {
            version: version.to_string(),
            vaults,
            agents,
        })
    }
}

impl SnapshotCache {
    /// The serialized snapshot of the store's current version with that version: the
    /// cached one when it is current, else built, cached, and reported to `built`
    /// (microseconds it took, bytes).
    pub fn current(&self, store: &Store, built: impl FnOnce(u64, usize)) -> Result<(u64, Bytes)> {
        let version = store.snapshot_version()?;
        let mut cached = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((v, bytes)) = cached.as_ref() {
            if *v == version {
                return Ok((*v, bytes.clone()));
            }
        }
        let started = Instant::now();
        let snapshot = store.build_snapshot()?;
        let built_version: u64 = snapshot.version.parse().unwrap_or(version);
        let bytes = Bytes::from(serde_json::to_vec(&snapshot)?);
        built(
            u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            bytes.len(),
        );
        *cached = Some((built_version, bytes.clone()));
        Ok((built_version, bytes))
    }
}
