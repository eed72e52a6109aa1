//! How many different hosts one agent may reach through names no service spells out,
//! per worker and per minute.
//!
//! A wildcard service (`*.example.com`) or a vault whose unmatched-host policy is
//! `passthrough` lets an agent choose any number of host names, and each new name takes
//! a slot in Envoy's DNS cache, which every agent shares. The security review (M7)
//! filled the cache with 1030 requests to `fillN.invalid` in two seconds, after which
//! another agent's approved host got `503 DNS cache overflow`. So such hosts are
//! counted per agent, and past [`MAX_OPEN_HOSTS`] different ones in a window the
//! request is refused (429 `too_many_hosts`) before Envoy resolves anything. Hosts a
//! service names exactly are bounded by the rules a human approved and are not counted,
//! so the cached path of an ordinary service does no work here.
//!
//! Each worker counts for itself (every worker has its own VM), so an agent can reach
//! up to the limit times the number of workers; the bootstraps size the DNS cache far
//! above that. Windows are fixed (they restart on the first request after one ends),
//! which is enough to bound the rate; the cache's `host_ttl` frees the names later. The
//! map holds only authenticated agents' names, so it is as small as the agent list.

use std::collections::{HashMap, HashSet};
use std::rc::Rc;

/// Different open hosts one agent may reach on one worker in one window.
pub const MAX_OPEN_HOSTS: usize = 100;
/// The window, in milliseconds.
pub const WINDOW_MS: u64 = 60_000;

/// Per agent: the open hosts it reached in its current window.
#[derive(Debug, Default)]
pub struct HostBudget {
    agents: HashMap<Rc<str>, Window>,
}

#[derive(Debug)]
struct Window {
    started_ms: u64,
    hosts: HashSet<String>,
}

impl HostBudget {
    /// Whether `agent` may send a request to the open host `host` at `now_ms`; a host
    /// it already reached in this window is always fine, a new one is counted.
    pub fn admit(&mut self, agent: &Rc<str>, host: &str, now_ms: u64) -> bool {
        let window = match self.agents.get_mut(&**agent) {
            Some(window) => window,
            None => self.agents.entry(Rc::clone(agent)).or_insert(Window {
                started_ms: now_ms,
                hosts: HashSet::new(),
            }),
        };
        if now_ms.saturating_sub(window.started_ms) >= WINDOW_MS {
            window.started_ms = now_ms;
            window.hosts.clear();
        }
        if window.hosts.contains(host) {
            return true;
        }
        if window.hosts.len() >= MAX_OPEN_HOSTS {
            return false;
        }
        window.hosts.insert(host.to_owned());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_reaches_at_most_the_limit_of_new_hosts_per_window_and_repeats_are_free() {
        let mut budget = HostBudget::default();
        let agent: Rc<str> = Rc::from("roamer");
        for i in 0..MAX_OPEN_HOSTS {
            assert!(budget.admit(&agent, &format!("h{i}.invalid"), 1_000), "{i}");
        }
        assert!(!budget.admit(&agent, "one-more.invalid", 1_001));
        assert!(
            budget.admit(&agent, "h7.invalid", 1_002),
            "a host it already reached"
        );
        // Another agent has a budget of its own.
        let other: Rc<str> = Rc::from("other");
        assert!(budget.admit(&other, "one-more.invalid", 1_003));
        // The next window starts afresh.
        assert!(budget.admit(&agent, "one-more.invalid", 1_000 + WINDOW_MS));
        assert!(budget.admit(&agent, "h8.invalid", 1_000 + WINDOW_MS));
    }
}
