//! Propagation: how long a revocation takes to reach the data path, under load.
//!
//! The probe holds one keep-alive connection to each worker of each Envoy (found from
//! the listener's per-worker connection counters, before the load starts), so "every
//! worker refuses" is observed, not assumed. Events alternate:
//! - agent revoke: a fresh agent is created and seen working on every worker, then
//!   `DELETE /v1/agents/{name}`; the change is seen when a request gets 407;
//! - credential delete: `PROBE_KEY` is set and seen working (cache warm) on every
//!   worker, then deleted; the change is seen when a request gets 502.
//!
//! Times are from the API's acknowledgement (its response read by the benchmark) to
//! the first refused response on any worker, and on every worker (of every Envoy, and
//! of each Envoy on its own). The filter's snapshot long-poll (on by default) delivers
//! the change; (p) measures the same with it off, on plain 1 s polling. With two
//! control planes on one PostgreSQL database, each Envoy talks to its own control
//! plane and the changes go through the first: the second learns of them from the
//! database's NOTIFY.

use std::time::{Duration, Instant};

use agent_vault_testkit::http::{proxy_basic, Conn, TcpConn};

use crate::controlplane::ControlPlane;
use crate::envoy::{Envoy, WORKERS};
use crate::seed::PROBE_KEY;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    AgentRevoke,
    CredentialDelete,
}

#[derive(Debug, Clone)]
pub struct Event {
    pub kind: Kind,
    /// Until the first refused response (any worker); `None`: not within the timeout.
    pub first_ms: Option<f64>,
    /// Until every worker refused.
    pub all_ms: Option<f64>,
    /// A refusal with another status than expected (407 / 502).
    pub unexpected: Option<u16>,
    /// Until every worker of each Envoy refused, in the order the Envoys were given.
    pub all_ms_by_envoy: Vec<Option<f64>>,
}

/// When the probe saw a change (ms after the acknowledgement).
struct Seen {
    first_ms: Option<f64>,
    all_ms: Option<f64>,
    unexpected: Option<u16>,
    all_ms_by_envoy: Vec<Option<f64>>,
}

impl Seen {
    fn event(self, kind: Kind) -> Event {
        Event {
            kind,
            first_ms: self.first_ms,
            all_ms: self.all_ms,
            unexpected: self.unexpected,
            all_ms_by_envoy: self.all_ms_by_envoy,
        }
    }
}

struct Probe {
    conns: Vec<TcpConn>,
    /// For each connection, the index of its Envoy.
    envoy_of: Vec<usize>,
    envoys: usize,
}

/// The latest of `times`, if every one is there.
fn latest(times: impl IntoIterator<Item = Option<f64>>) -> Option<f64> {
    times
        .into_iter()
        .try_fold(f64::NEG_INFINITY, |max, t| t.map(|t| max.max(t)))
        .filter(|t| t.is_finite())
}

impl Probe {
    /// One connection per worker, found while the listener is otherwise idle.
    fn pin(envoy: &Envoy, host: &str, auth: &str) -> Result<Probe, String> {
        let mut slots: Vec<Option<TcpConn>> = (0..WORKERS).map(|_| None).collect();
        for _ in 0..64 {
            if slots.iter().all(Option::is_some) {
                break;
            }
            let before = envoy.worker_connections();
            let mut conn = Conn::tcp(envoy.port).map_err(|e| e.to_string())?;
            conn.request(
                "GET",
                "/probe",
                &[("Host", host), ("Proxy-Authorization", auth)],
                None,
            )
            .map_err(|e| e.to_string())?;
            let after = envoy.worker_connections();
            let grown: Vec<usize> = (0..WORKERS)
                .filter(|&w| after.get(w) > before.get(w))
                .collect();
            if let [worker] = grown.as_slice() {
                if slots[*worker].is_none() {
                    slots[*worker] = Some(conn);
                }
            }
        }
        let conns: Vec<TcpConn> = slots.into_iter().flatten().collect();
        if conns.len() != WORKERS {
            return Err(format!(
                "could not get a connection on each of the {WORKERS} workers"
            ));
        }
        Ok(Probe {
            envoy_of: vec![0; conns.len()],
            conns,
            envoys: 1,
        })
    }

    /// One connection per worker of each Envoy.
    fn pin_all(envoys: &[&Envoy], host: &str, auth: &str) -> Result<Probe, String> {
        let mut all = Probe {
            conns: Vec::new(),
            envoy_of: Vec::new(),
            envoys: envoys.len(),
        };
        for (i, envoy) in envoys.iter().enumerate() {
            let probe = Probe::pin(envoy, host, auth)
                .map_err(|e| format!("Envoy {} of {}: {e}", i + 1, envoys.len()))?;
            all.envoy_of.extend(probe.conns.iter().map(|_| i));
            all.conns.extend(probe.conns);
        }
        Ok(all)
    }

    /// Status on each worker's connection.
    fn statuses(&mut self, host: &str, auth: &str) -> Result<Vec<u16>, String> {
        let headers = [("Host", host), ("Proxy-Authorization", auth)];
        self.conns
            .iter_mut()
            .map(|c| {
                c.request("GET", "/probe", &headers, None)
                    .map(|r| r.status)
                    .map_err(|e| format!("probe connection: {e}"))
            })
            .collect()
    }

    fn wait_all_ok(&mut self, host: &str, auth: &str, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let statuses = self.statuses(host, auth)?;
            if statuses.iter().all(|s| *s == 200) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the probe never got 200 on every worker: {statuses:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// After `t0`, probes every worker until each refused (or `timeout`).
    fn until_refused(
        &mut self,
        host: &str,
        auth: &str,
        t0: Instant,
        expect: u16,
        timeout: Duration,
    ) -> Result<Seen, String> {
        let mut seen: Vec<Option<f64>> = vec![None; self.conns.len()];
        let mut unexpected = None;
        while seen.iter().any(Option::is_none) && t0.elapsed() < timeout {
            let statuses = self.statuses(host, auth)?;
            let at = t0.elapsed().as_secs_f64() * 1000.0;
            for (slot, status) in seen.iter_mut().zip(statuses) {
                if status != 200 && slot.is_none() {
                    *slot = Some(at);
                    if status != expect {
                        unexpected = Some(status);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let first = seen.iter().flatten().copied().reduce(f64::min);
        let all_ms_by_envoy = (0..self.envoys)
            .map(|e| {
                latest(
                    seen.iter()
                        .zip(&self.envoy_of)
                        .filter(|(_, of)| **of == e)
                        .map(|(t, _)| *t),
                )
            })
            .collect();
        Ok(Seen {
            first_ms: first,
            all_ms: latest(seen.iter().copied()),
            unexpected,
            all_ms_by_envoy,
        })
    }
}

/// Runs `events` revocations through `cp`'s API against `envoys` (our filter, warm
/// cache; each may talk to another control plane on the same database) while the loads
/// `start_load` starts keep the proxies busy; they are stopped at the end. The agents
/// it creates are named `{name}-{i}` (one control plane can serve several runs).
#[allow(clippy::too_many_arguments)]
pub fn run(
    envoys: &[&Envoy],
    cp: &ControlPlane,
    upstream_port: u16,
    prober_token: &str,
    name: &str,
    events: usize,
    start_load: impl FnOnce() -> Result<Vec<crate::procs::Proc>, String>,
) -> Result<Vec<Event>, String> {
    let load_host = format!("localhost:{upstream_port}");
    let probe_host = format!("127.0.0.1:{upstream_port}");
    let prober = proxy_basic(prober_token, "default");
    let mut probe = Probe::pin_all(envoys, &probe_host, &prober)?;
    let mut loads = start_load()?;
    std::thread::sleep(Duration::from_millis(500));
    let timeout = Duration::from_secs(5);
    let mut out = Vec::with_capacity(events);
    for i in 0..events {
        if loads.iter_mut().any(|load| load.exited()) {
            return Err("the background load stopped early".into());
        }
        let event = if i % 2 == 0 {
            let name = format!("{name}-{i}");
            let token = cp.create_agent(&name)?;
            let auth = proxy_basic(&token, "default");
            probe.wait_all_ok(&load_host, &auth, timeout)?;
            cp.revoke_agent(&name)?;
            let t0 = Instant::now();
            probe
                .until_refused(&load_host, &auth, t0, 407, timeout)?
                .event(Kind::AgentRevoke)
        } else {
            cp.set_credential(PROBE_KEY, &format!("sk_probe_{i}"))?;
            probe.wait_all_ok(&probe_host, &prober, timeout)?;
            cp.delete_credential(PROBE_KEY)?;
            let t0 = Instant::now();
            probe
                .until_refused(&probe_host, &prober, t0, 502, timeout)?
                .event(Kind::CredentialDelete)
        };
        out.push(event);
    }
    for load in &mut loads {
        load.stop(Duration::from_secs(2));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::latest;

    #[test]
    fn latest_is_the_maximum_only_when_every_time_is_there() {
        assert_eq!(latest([Some(3.0), Some(7.5), Some(1.0)]), Some(7.5));
        assert_eq!(latest([Some(3.0), None, Some(9.0)]), None);
        assert_eq!(latest(std::iter::empty()), None);
    }
}
