//! Agents: a name, grants on vaults, and a token shown once and stored as SHA-256.
//! Revoke and rotate change the snapshot version, so the filter drops the old token
//! on its next poll.

use agent_vault_rules::{validate_agent_name, Grant};
use serde::{Deserialize, Serialize};

use crate::access::{vault_not_found, Principal};
use crate::crypto::{new_token, sha256_hex, AGENT_PREFIX};
use crate::error::{Error, Result};
use crate::store::{abort, get_json, put_json, read_json, scan_json, Store};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentRecord {
    pub name: String,
    pub token_sha256: String,
    pub vaults: Vec<Grant>,
    pub created_at: i64,
    pub expires_at: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AgentView {
    pub name: String,
    pub vaults: Vec<Grant>,
    pub created_at: i64,
    pub expires_at: Option<i64>,
}

/// The one answer that carries an agent token.
#[derive(Debug, Clone, Serialize)]
pub struct AgentCreated {
    pub name: String,
    pub token: String,
    pub vaults: Vec<Grant>,
}

impl From<&AgentRecord> for AgentView {
    fn from(agent: &AgentRecord) -> AgentView {
        AgentView {
            name: agent.name.clone(),
            vaults: agent.vaults.clone(),
            created_at: agent.created_at,
            expires_at: agent.expires_at,
        }
    }
}

fn agent_not_found(name: &str) -> Error {
    Error::not_found("agent_not_found", format!("agent \"{name}\" not found"))
}

impl Store {
    pub(crate) fn agent_by_token_hash(&self, hash: &str) -> Result<Option<AgentRecord>> {
        match self.trees.agent_tokens.get(hash.as_bytes())? {
            Some(name) => read_json(&self.trees.agents, name),
            None => Ok(None),
        }
    }

    pub(crate) fn all_agents(&self) -> Result<Vec<AgentRecord>> {
        Ok(scan_json::<AgentRecord>(&self.trees.agents, b"")?
            .into_iter()
            .map(|(_, agent)| agent)
            .collect())
    }

    pub(crate) fn agents_with_grant(&self, vault: &str) -> Result<Vec<AgentRecord>> {
        Ok(self
            .all_agents()?
            .into_iter()
            .filter(|agent| agent.vaults.iter().any(|g| g.vault == vault))
            .collect())
    }

    /// Only users manage agents, and only on vaults they administer.
    fn require_admin_of_all(&self, principal: &Principal, grants: &[Grant]) -> Result<()> {
        if matches!(principal, Principal::Agent { .. }) {
            return Err(Error::forbidden("agents cannot manage agents"));
        }
        for grant in grants {
            let (_, access) = self.access(principal, &grant.vault)?;
            access.require_admin()?;
        }
        Ok(())
    }

    pub fn create_agent(
        &self,
        principal: &Principal,
        name: &str,
        grants: Vec<Grant>,
        expires_at: Option<i64>,
    ) -> Result<AgentCreated> {
        validate_agent_name(name)?;
        if grants.is_empty() {
            return Err(Error::bad_request(
                "invalid_request",
                "an agent needs at least one vault (--vault V)",
            ));
        }
        let mut grants = grants;
        grants.sort_by(|a, b| a.vault.cmp(&b.vault));
        grants.dedup_by(|a, b| a.vault == b.vault);
        self.require_admin_of_all(principal, &grants)?;
        let token = new_token(AGENT_PREFIX);
        let record = AgentRecord {
            name: name.to_string(),
            token_sha256: sha256_hex(token.as_bytes()),
            vaults: grants.clone(),
            created_at: self.now_secs(),
            expires_at,
        };
        self.write_published(|tx| {
            if tx.agents.get(name)?.is_some() {
                return abort(Error::conflict(
                    "agent_exists",
                    format!(
                        "agent \"{name}\" already exists; rotate its token or pick another name"
                    ),
                ));
            }
            for grant in &record.vaults {
                if tx.vaults.get(grant.vault.as_bytes())?.is_none() {
                    return abort(vault_not_found(&grant.vault));
                }
            }
            put_json(tx.agents, name, &record)?;
            tx.agent_tokens
                .insert(record.token_sha256.as_bytes(), name.as_bytes())?;
            Ok(())
        })?;
        Ok(AgentCreated {
            name: name.to_string(),
            token,
            vaults: grants,
        })
    }

    /// Agents the caller may manage: every agent for the owner, else those with a
    /// grant on a vault the caller administers.
    pub fn list_agents(&self, principal: &Principal) -> Result<Vec<AgentView>> {
        if matches!(principal, Principal::Agent { .. }) {
            return Err(Error::forbidden("agents cannot list agents"));
        }
        Ok(self
            .all_agents()?
            .iter()
            .filter(|agent| {
                agent
                    .vaults
                    .iter()
                    .any(|grant| self.is_admin_of(principal, &grant.vault))
                    || matches!(principal, Principal::User { owner: true, .. })
            })
            .map(AgentView::from)
            .collect())
    }

    fn managed_agent(&self, principal: &Principal, name: &str) -> Result<AgentRecord> {
        let agent: AgentRecord =
            read_json(&self.trees.agents, name)?.ok_or_else(|| agent_not_found(name))?;
        if matches!(principal, Principal::User { owner: true, .. }) {
            return Ok(agent);
        }
        self.require_admin_of_all(principal, &agent.vaults)
            .map_err(|_| agent_not_found(name))?;
        Ok(agent)
    }

    pub fn revoke_agent(&self, principal: &Principal, name: &str) -> Result<()> {
        self.managed_agent(principal, name)?;
        self.write_published(|tx| {
            let Some(current) = get_json::<AgentRecord>(tx.agents, name)? else {
                return abort(agent_not_found(name));
            };
            tx.agents.remove(name)?;
            tx.agent_tokens.remove(current.token_sha256.as_bytes())?;
            Ok(())
        })
    }

    pub fn rotate_agent(&self, principal: &Principal, name: &str) -> Result<AgentCreated> {
        self.managed_agent(principal, name)?;
        let token = new_token(AGENT_PREFIX);
        let hash = sha256_hex(token.as_bytes());
        let agent = self.write_published(|tx| {
            let Some(mut agent) = get_json::<AgentRecord>(tx.agents, name)? else {
                return abort(agent_not_found(name));
            };
            tx.agent_tokens.remove(agent.token_sha256.as_bytes())?;
            agent.token_sha256 = hash.clone();
            tx.agent_tokens.insert(hash.as_bytes(), name.as_bytes())?;
            put_json(tx.agents, name, &agent)?;
            Ok(agent)
        })?;
        Ok(AgentCreated {
            name: agent.name,
            token,
            vaults: agent.vaults,
        })
    }
}
