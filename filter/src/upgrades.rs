//! Upgraded streams (WebSocket) open through one worker, and closing those whose agent
//! lost its access.
//!
//! A WebSocket is an ordinary request until Envoy's `101 Switching Protocols`: the
//! filter authenticates, matches and injects its upgrade request like any other. After
//! the `101` the stream carries frames for as long as both ends like, with no further
//! request for the filter to check, so a revoke would never reach it. Each worker keeps
//! the upgraded streams it let through, with the agent (token hash), vault and service
//! they were let through for; whenever a snapshot is installed (the long-poll brings a
//! change within milliseconds) and on every tick (for tokens that expire), the root
//! re-checks them and resets the stream of each one that would now be refused: the
//! agent revoked, its token rotated or expired, the vault no longer granted, the
//! service gone or disabled.

use std::rc::Rc;

use crate::snapshot::CompiledSnapshot;

/// One upgraded stream and what it was let through for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenUpgrade {
    /// Its HTTP context.
    pub context_id: u32,
    /// The agent's token hash.
    pub token_sha256: Rc<str>,
    /// The vault it was authorised in.
    pub vault: Rc<str>,
    /// The service it matched; `None` when none did (the vault's `passthrough`
    /// policy): then the agent and the vault are re-checked.
    pub service: Option<Rc<str>>,
}

impl OpenUpgrade {
    /// Whether `snapshot` at `now_ms` still lets this stream through.
    fn allowed(&self, snapshot: &CompiledSnapshot, now_ms: u64) -> bool {
        let Some(agent) = snapshot.agent(&self.token_sha256) else {
            return false;
        };
        if agent.expired(now_ms) || !agent.vaults.contains(&self.vault) {
            return false;
        }
        let Some(vault) = snapshot.vault(&self.vault) else {
            return false;
        };
        let Some(name) = &self.service else {
            return true;
        };
        vault
            .services
            .iter()
            .any(|service| service.name == *name && service.enabled)
    }
}

/// The upgraded streams of one worker (few: each is a long-lived connection).
#[derive(Debug, Default)]
pub struct OpenUpgrades {
    open: Vec<OpenUpgrade>,
}

impl OpenUpgrades {
    /// A stream was upgraded.
    pub fn opened(&mut self, upgrade: OpenUpgrade) {
        self.open
            .retain(|open| open.context_id != upgrade.context_id);
        self.open.push(upgrade);
    }

    /// Stream `context_id` ended.
    pub fn gone(&mut self, context_id: u32) {
        self.open.retain(|open| open.context_id != context_id);
    }

    /// The streams `snapshot` no longer allows at `now_ms`, forgotten here: the caller
    /// resets them. Without a snapshot, none (nothing is known to have changed).
    pub fn revoked(&mut self, snapshot: Option<&CompiledSnapshot>, now_ms: u64) -> Vec<u32> {
        let Some(snapshot) = snapshot else {
            return Vec::new();
        };
        if self.open.is_empty() {
            return Vec::new();
        }
        let mut revoked = Vec::new();
        self.open.retain(|open| {
            let keep = open.allowed(snapshot, now_ms);
            if !keep {
                revoked.push(open.context_id);
            }
            keep
        });
        revoked
    }
}
