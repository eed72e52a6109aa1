//! The rules snapshot, compiled once per poll for per-request lookups.
//!
//! A [`Snapshot`] arrives as JSON when its version changes; [`CompiledSnapshot::new`]
//! indexes agents by token hash and vaults by name, and builds each vault's
//! [`ServiceMatcher`] (patterns parsed, auth blocks compiled). Names are `Rc<str>` so a
//! request can keep them for its log record without copying. Requests that wait for a
//! credential hold an `Rc` of the snapshot they were decided against, so a new
//! snapshot never pulls the rules out from under them.

use std::collections::HashMap;
use std::rc::Rc;

use agent_vault_rules::substitution::Substitution;
use agent_vault_rules::{
    HostPattern, RateLimit, ServiceMatcher, Snapshot, UnmatchedHostPolicy, ValidationOptions,
};
use sha2::{Digest, Sha256};

use crate::decide::Upstream;

/// An agent that may use the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agent {
    /// Agent name.
    pub name: Rc<str>,
    /// Its token's hash (lowercase hex), the key it is found by.
    pub token_sha256: Rc<str>,
    /// Vaults the agent was granted, in grant order.
    pub vaults: Vec<Rc<str>>,
    /// Unix seconds from which the token is refused.
    pub expires_at: Option<i64>,
}

impl Agent {
    /// Whether the token is past its expiry at `now_ms` (the control plane refuses it
    /// from `expires_at` on, too).
    pub fn expired(&self, now_ms: u64) -> bool {
        let now_secs = i64::try_from(now_ms / 1000).unwrap_or(i64::MAX);
        self.expires_at.is_some_and(|at| now_secs >= at)
    }
}

/// What the request path needs of a service besides its matcher entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfo {
    /// Service name.
    pub name: Rc<str>,
    /// A disabled service matches and is refused.
    pub enabled: bool,
    /// How Envoy speaks to the upstream.
    pub upstream: Upstream,
    /// The methods the service forwards; `None`: all but TRACE/TRACK.
    pub methods: Option<Box<[Box<str>]>>,
    /// Requests per agent token and window; `None`: no limit.
    pub rate_limit: Option<RateLimit>,
    /// Its placeholders (usually none).
    pub substitutions: Rc<[Substitution]>,
    /// Whether its responses are redacted ([`agent_vault_rules::Service::redacts_responses`]).
    pub redact: bool,
    /// Every credential key it needs, auth and substitutions, sorted and deduplicated.
    pub keys: Box<[String]>,
}

/// One vault's rules.
#[derive(Debug)]
pub struct CompiledVault {
    /// Vault name.
    pub name: Rc<str>,
    /// What to do with requests no service matches.
    pub policy: UnmatchedHostPolicy,
    /// Services in declaration order (same indices as the matcher).
    pub services: Vec<ServiceInfo>,
    /// Host/port/path lookup and compiled auth blocks.
    pub matcher: ServiceMatcher,
    /// Hosts whose HTTPS tunnels go through untouched (a short list, looked at for a
    /// `CONNECT` only). Entries that do not parse are dropped: they match nothing.
    pub passthrough_hosts: Vec<HostPattern>,
    /// Per agent over all its services (`None`: no vault-wide limit).
    pub rate_limit: Option<RateLimit>,
}

/// A snapshot ready for lookups.
#[derive(Debug)]
pub struct CompiledSnapshot {
    /// The control plane's version (sent back in `If-None-Match`).
    pub version: String,
    /// By token hash: the key is the agent's own `token_sha256`.
    agents: HashMap<Rc<str>, Agent>,
    vaults: HashMap<String, CompiledVault>,
}

impl CompiledSnapshot {
    /// Indexes a snapshot. Duplicate agents or vaults (a broken snapshot): the first wins.
    pub fn new(snapshot: Snapshot) -> CompiledSnapshot {
        let mut vaults = HashMap::with_capacity(snapshot.vaults.len());
        for vault in snapshot.vaults {
            let name: Rc<str> = Rc::from(vault.name.as_str());
            // Each parsed service is dropped once indexed: a VM's memory never shrinks,
            // so the parsed and compiled forms of a large vault must not peak together.
            let mut services = Vec::with_capacity(vault.services.len());
            let mut matcher = ServiceMatcher::with_capacity(vault.services.len());
            for service in vault.services {
                matcher.push(&service);
                let keys = service.credential_keys().into_boxed_slice();
                let redact = service.redacts_responses();
                services.push(ServiceInfo {
                    name: Rc::from(service.name.as_str()),
                    enabled: service.enabled,
                    upstream: Upstream::of(&service),
                    methods: service
                        .methods
                        .map(|list| list.into_iter().map(String::into_boxed_str).collect()),
                    rate_limit: service.rate_limit,
                    substitutions: service.substitutions.into(),
                    redact,
                    keys,
                });
            }
            matcher.shrink_to_fit();
            // The control plane validated them with its own options.
            let options = ValidationOptions {
                allow_private_upstreams: true,
            };
            let passthrough_hosts = vault
                .passthrough_hosts
                .iter()
                .filter_map(|host| agent_vault_rules::parse_passthrough_host(host, &options).ok())
                .collect();
            vaults.entry(vault.name).or_insert(CompiledVault {
                name,
                policy: vault.unmatched_host_policy,
                services,
                matcher,
                passthrough_hosts,
                rate_limit: vault.rate_limit,
            });
        }
        let mut agents = HashMap::with_capacity(snapshot.agents.len());
        for agent in snapshot.agents {
            let grants = agent
                .vaults
                .iter()
                .map(|g| {
                    // Share the vault's name when it exists.
                    vaults
                        .get(&g.vault)
                        .map_or_else(|| Rc::from(g.vault.as_str()), |v| Rc::clone(&v.name))
                })
                .collect();
            let token_sha256: Rc<str> = Rc::from(agent.token_sha256.to_ascii_lowercase());
            agents.entry(Rc::clone(&token_sha256)).or_insert(Agent {
                name: Rc::from(agent.name.as_str()),
                token_sha256,
                vaults: grants,
                expires_at: agent.expires_at,
            });
        }
        CompiledSnapshot {
            version: snapshot.version,
            agents,
            vaults,
        }
    }

    /// The agent whose token hashes to `token_sha256` (lowercase hex).
    pub fn agent(&self, token_sha256: &str) -> Option<&Agent> {
        self.agents.get(token_sha256)
    }

    /// A vault by name.
    pub fn vault(&self, name: &str) -> Option<&CompiledVault> {
        self.vaults.get(name)
    }

    /// Number of vaults and agents, for logs.
    pub fn counts(&self) -> (usize, usize) {
        (self.vaults.len(), self.agents.len())
    }
}

/// Lowercase hex SHA-256 of an agent token, on the stack.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenHash([u8; 64]);

impl TokenHash {
    /// Hashes `token`.
    pub fn of(token: &str) -> TokenHash {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let digest = Sha256::digest(token.as_bytes());
        let mut out = [b'0'; 64];
        for (pair, byte) in out.chunks_exact_mut(2).zip(digest.iter()) {
            if let [high, low] = pair {
                *high = HEX.get(usize::from(byte >> 4)).copied().unwrap_or(b'0');
                *low = HEX.get(usize::from(byte & 0x0f)).copied().unwrap_or(b'0');
            }
        }
        TokenHash(out)
    }

    /// The hex string.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_vault_rules::{Auth, Grant, Role, Service, SnapshotAgent, SnapshotVault};

    #[test]
    fn token_hash_is_lowercase_hex_sha256() {
        assert_eq!(
            TokenHash::of("abc").as_str(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            TokenHash::of("").as_str(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn compiles_agents_and_vaults() {
        let snapshot = Snapshot {
            version: "7".into(),
            vaults: vec![SnapshotVault {
                name: "default".into(),
                unmatched_host_policy: UnmatchedHostPolicy::Passthrough,
                services: vec![Service {
                    name: "stripe".into(),
                    host: "api.stripe.com".into(),
                    enabled: false,
                    auth: Auth::Passthrough {},
                    upstream_tls: false,
                    methods: None,
                    rate_limit: None,
                    substitutions: Vec::new(),
                    redact_responses: None,
                    upstream_h2c: false,
                }],
                passthrough_hosts: vec![],
                rate_limit: None,
            }],
            agents: vec![SnapshotAgent {
                token_sha256: "AB".repeat(32),
                name: "claude".into(),
                vaults: vec![
                    Grant {
                        vault: "default".into(),
                        role: Role::Proxy,
                    },
                    Grant {
                        vault: "gone".into(),
                        role: Role::Proxy,
                    },
                ],
                expires_at: Some(1_000),
            }],
        };
        let compiled = CompiledSnapshot::new(snapshot);
        assert_eq!(compiled.version, "7");
        assert_eq!(compiled.counts(), (1, 1));
        let agent = compiled
            .agent(&"ab".repeat(32))
            .unwrap_or_else(|| panic!("agent by lowercase hash"));
        assert_eq!(&*agent.name, "claude");
        assert_eq!(
            agent.vaults.iter().map(|v| &**v).collect::<Vec<_>>(),
            ["default", "gone"]
        );
        assert!(!agent.expired(999_999));
        assert!(agent.expired(1_000_000));
        let vault = compiled.vault("default").unwrap_or_else(|| panic!("vault"));
        assert_eq!(vault.policy, UnmatchedHostPolicy::Passthrough);
        assert_eq!(vault.services.len(), 1);
        assert_eq!(vault.matcher.find("api.stripe.com", 80, "/"), Some(0));
        assert!(compiled.vault("gone").is_none());
    }
}
