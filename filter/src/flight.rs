//! Credential fetches in flight on one worker, and how their answers finish the
//! requests waiting for them.
//!
//! **Single flight.** Concurrent misses for the same `(agent, vault, keys)` make one
//! callout: the first request starts it, later ones join its waiter list, and the
//! answer finishes them all. The agent's token hash is part of the key because the
//! control plane re-checks *that* agent's grant: sharing one agent's answer (a 403
//! above all) with another agent would be wrong both ways. Different agents of the
//! same vault still share the cache once values arrive.
//!
//! **Who receives the answer.** Envoy owns every callout in the plugin's root context,
//! but the Rust SDK delivers the answer to the context that was running when it was
//! dispatched: the request that started the fetch (its *owner*). If that request goes
//! away first (its client disconnected), the SDK drops the answer, so the flight is
//! marked orphaned and the root context dispatches it again on its next tick; other
//! waiters keep waiting. A flight that gets no answer at all within the callout
//! timeout plus a grace period fails its waiters with 503 (Envoy always answers, with
//! its own 504 when the socket is slow: this is a backstop).
//!
//! **Background refreshes.** A cache hit near the end of an entry's TTL asks for a
//! refresh ([`crate::cache`], "Refresh-ahead"): a flight with no waiters, marked
//! `refresh`, that the root context dispatches on its next tick (like an orphan: an
//! answer delivered to the root is never dropped, while the request that asked is
//! usually gone before the control plane answers). One per `(agent, vault, keys)` at
//! a time, as for any flight. A refresh flight stays when no request waits on it; a
//! miss for the same keys joins it (and dispatches it itself if the root has not yet).
//! Its answer is cached like any other, under the same version rule.
//!
//! **Waiters that are gone.** A waiter holds a `Weak` reference to its request's log
//! state; when the request context is deleted, the upgrade fails and the waiter is
//! skipped (the driver also skips waiters whose context Envoy no longer knows).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::{Rc, Weak};

use agent_vault_rules::{CredentialsRequest, CredentialsResponse};

use crate::cache::{wipe, Secret};
use crate::decide::{Decision, FetchPlan};
use crate::request_log::RequestLog;
use agent_vault_rules::reply;

/// Extra time after the callout timeout before a flight is given up on.
pub const GRACE_MS: u64 = 1000;

/// The identity of a fetch: who asks, in which vault, for which keys (sorted).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FlightKey {
    /// Agent token hash.
    pub token_sha256: String,
    /// Vault name.
    pub vault: Rc<str>,
    /// Keys, sorted and deduplicated.
    pub keys: Vec<String>,
}

impl FlightKey {
    /// The key of a plan.
    pub fn of(plan: &FetchPlan) -> FlightKey {
        FlightKey {
            token_sha256: plan.token_sha256.clone(),
            vault: Rc::clone(&plan.vault),
            keys: plan.keys().to_vec(),
        }
    }

    /// The JSON body of the `POST` to the control plane.
    pub fn request_body(&self) -> Vec<u8> {
        let request = CredentialsRequest {
            token_sha256: self.token_sha256.clone(),
            vault: self.vault.to_string(),
            keys: self.keys.clone(),
        };
        serde_json::to_vec(&request).unwrap_or_default()
    }
}

/// A request paused until a fetch answers.
#[derive(Debug)]
pub struct Waiter {
    /// Envoy's id of the request's HTTP context.
    pub context_id: u32,
    /// How to finish it.
    pub plan: FetchPlan,
    /// The request's log state; dead once the request context is deleted.
    pub log: Weak<RefCell<RequestLog>>,
}

#[derive(Debug)]
struct Flight {
    /// Callout token; `None` while orphaned (waiting for the root to re-dispatch).
    token: Option<u32>,
    /// Context whose SDK dispatcher receives the answer.
    owner: u32,
    /// Snapshot version when dispatched: values are cached only if it still holds.
    version: String,
    started_ms: u64,
    waiters: Vec<Waiter>,
    /// A background refresh: kept (and dispatched by the root) with no waiters.
    refresh: bool,
}

/// What [`Flights::join`] wants the caller to do.
#[derive(Debug, PartialEq, Eq)]
pub enum Join {
    /// Another request already asked; pause and wait.
    Joined,
    /// Dispatch a callout with this body, then report it with [`Flights::dispatched`]
    /// (or [`Flights::dispatch_failed`]).
    Dispatch(FlightKey, Vec<u8>),
}

/// A finished waiter: apply `decision` to context `context_id`.
#[derive(Debug)]
pub struct Completion {
    /// The waiting request's context.
    pub context_id: u32,
    /// Forward (then resume) or refuse.
    pub decision: Decision,
    /// The waiting request's log state (where its substitution plan is kept, and a
    /// refusal made while applying the decision is recorded).
    pub log: Weak<RefCell<RequestLog>>,
}

/// A flight that got its answer.
#[derive(Debug)]
pub struct Answered {
    /// What was fetched.
    pub key: FlightKey,
    /// Snapshot version when it was dispatched.
    pub version: String,
    /// Its waiters, finished.
    pub completions: Vec<Completion>,
    /// It was a background refresh (it may have had waiters too).
    pub refresh: bool,
}

/// The control plane's answer to a credential fetch, classified.
#[derive(Debug)]
pub enum Answer {
    /// 200 from the control plane: values, and keys the vault does not have.
    Values {
        /// Key → value.
        values: BTreeMap<String, Secret>,
        /// Keys with no credential.
        missing: Vec<String>,
    },
    /// 403 from the control plane: the agent is unknown, revoked, expired or has no
    /// grant on the vault any more.
    Forbidden,
    /// No answer from the control plane itself (Envoy's 503/504), another status, or
    /// a body that does not parse.
    Unavailable(String),
}

impl Answer {
    /// Classifies a callout response. `from_control_plane`: the reply carries
    /// [`agent_vault_rules::CONTROL_PLANE_HEADER`]. The body is wiped after parsing.
    pub fn classify(status: Option<u16>, from_control_plane: bool, body: Vec<u8>) -> Answer {
        let answer = match (from_control_plane, status) {
            (false, Some(status)) => Answer::Unavailable(format!(
                "no answer from the control plane (Envoy replied {status})"
            )),
            (false, None) => Answer::Unavailable("no answer from the control plane".to_owned()),
            (true, Some(200)) => match serde_json::from_slice::<CredentialsResponse>(&body) {
                Ok(response) => Answer::Values {
                    missing: response.missing.clone(),
                    values: into_secrets(response),
                },
                Err(_) => Answer::Unavailable(
                    "the control plane sent a credentials answer that does not parse".to_owned(),
                ),
            },
            (true, Some(403)) => Answer::Forbidden,
            (true, Some(status)) => Answer::Unavailable(format!(
                "the control plane answered {status} to a credentials request"
            )),
            (true, None) => Answer::Unavailable("the control plane sent no status".to_owned()),
        };
        wipe(body);
        answer
    }
}

fn into_secrets(response: CredentialsResponse) -> BTreeMap<String, Secret> {
    response
        .values
        .into_iter()
        .map(|(key, value)| (key, Secret::new(value)))
        .collect()
}

/// Every fetch in flight on a worker.
#[derive(Debug, Default)]
pub struct Flights {
    by_key: HashMap<FlightKey, Flight>,
    by_token: HashMap<u32, FlightKey>,
}

impl Flights {
    /// Adds a waiter to the flight for its plan, creating the flight if needed.
    pub fn join(&mut self, waiter: Waiter, version: &str, now_ms: u64) -> Join {
        let key = FlightKey::of(&waiter.plan);
        if let Some(flight) = self.by_key.get_mut(&key) {
            flight.waiters.push(waiter);
            if flight.refresh && flight.token.is_none() {
                // A refresh the root has not dispatched yet: this request does not
                // wait for the root's tick.
                let body = key.request_body();
                return Join::Dispatch(key, body);
            }
            return Join::Joined;
        }
        let body = key.request_body();
        let owner = waiter.context_id;
        self.by_key.insert(
            key.clone(),
            Flight {
                token: None,
                owner,
                version: version.to_owned(),
                started_ms: now_ms,
                waiters: vec![waiter],
                refresh: false,
            },
        );
        Join::Dispatch(key, body)
    }

    /// A cache hit asks for a background refresh of `key` under snapshot `version`:
    /// `true` if a refresh flight was added (the root dispatches it, see
    /// [`Flights::orphans`]); `false` if a fetch of the same keys is already in flight.
    pub fn refresh(&mut self, key: FlightKey, version: &str, now_ms: u64) -> bool {
        if self.by_key.contains_key(&key) {
            return false;
        }
        self.by_key.insert(
            key,
            Flight {
                token: None,
                owner: 0,
                version: version.to_owned(),
                started_ms: now_ms,
                waiters: Vec::new(),
                refresh: true,
            },
        );
        true
    }

    /// The snapshot version changed: refreshes nobody waits on are dropped (their
    /// answers, made under the old version, would not be cached anyway); an answer
    /// already on its way is then not this worker's any more and is ignored.
    pub fn drop_refreshes(&mut self) {
        let by_token = &mut self.by_token;
        self.by_key.retain(|_, flight| {
            let keep = !flight.refresh || !flight.waiters.is_empty();
            if !keep {
                if let Some(token) = flight.token {
                    by_token.remove(&token);
                }
            }
            keep
        });
    }

    /// The callout for `key` was dispatched from context `owner` with `token`.
    pub fn dispatched(&mut self, key: &FlightKey, token: u32, owner: u32, now_ms: u64) {
        if let Some(flight) = self.by_key.get_mut(key) {
            if let Some(old) = flight.token.replace(token) {
                self.by_token.remove(&old);
            }
            flight.owner = owner;
            flight.started_ms = now_ms;
            self.by_token.insert(token, key.clone());
        }
    }

    /// The callout for `key` could not be dispatched: its waiters get 503.
    pub fn dispatch_failed(&mut self, key: &FlightKey, reason: &str) -> Vec<Completion> {
        match self.by_key.remove(key) {
            Some(flight) => {
                if let Some(token) = flight.token {
                    self.by_token.remove(&token);
                }
                fail(flight.waiters, reason)
            }
            None => Vec::new(),
        }
    }

    /// Whether the flight for `key` is a background refresh.
    pub fn is_refresh(&self, key: &FlightKey) -> bool {
        self.by_key.get(key).is_some_and(|flight| flight.refresh)
    }

    /// Whether `token` is a background refresh no request waits on.
    pub fn is_unwaited_refresh(&self, token: u32) -> bool {
        self.by_token
            .get(&token)
            .and_then(|key| self.by_key.get(key))
            .is_some_and(|flight| flight.refresh && flight.waiters.is_empty())
    }

    /// Whether `token` is a credential fetch of this worker.
    pub fn owns(&self, token: u32) -> bool {
        self.by_token.contains_key(&token)
    }

    /// Finishes every waiter of the flight answered by `token`; `None` for an unknown
    /// token.
    pub fn answer(&mut self, token: u32, answer: &Answer) -> Option<Answered> {
        let key = self.by_token.remove(&token)?;
        let flight = self.by_key.remove(&key)?;
        let completions = match answer {
            Answer::Values { values, missing } => {
                let lookup = |k: &str| values.get(k).map(Secret::expose);
                finish_each(flight.waiters, |plan| plan.finish(lookup, missing))
            }
            Answer::Forbidden => {
                finish_each(flight.waiters, |_| Decision::Reject(reply::invalid_token()))
            }
            Answer::Unavailable(reason) => fail(flight.waiters, reason),
        };
        Some(Answered {
            key,
            version: flight.version,
            completions,
            refresh: flight.refresh,
        })
    }

    /// The request in context `context_id` is gone: stop waiting for it. If it owned
    /// a flight others still wait on, the flight becomes orphaned (see module doc).
    pub fn context_gone(&mut self, context_id: u32) {
        let mut emptied = Vec::new();
        for (key, flight) in &mut self.by_key {
            flight.waiters.retain(|w| w.context_id != context_id);
            if flight.owner == context_id {
                if let Some(token) = flight.token.take() {
                    self.by_token.remove(&token);
                }
            }
            if flight.waiters.is_empty() && !flight.refresh {
                emptied.push(key.clone());
            }
        }
        for key in emptied {
            if let Some(flight) = self.by_key.remove(&key) {
                if let Some(token) = flight.token {
                    self.by_token.remove(&token);
                }
            }
        }
    }

    /// Flights whose owner went away, and background refreshes not dispatched yet: the
    /// root dispatches each and reports it with [`Flights::dispatched`].
    pub fn orphans(&self) -> Vec<(FlightKey, Vec<u8>)> {
        self.by_key
            .iter()
            .filter(|(_, flight)| {
                flight.token.is_none() && (flight.refresh || !flight.waiters.is_empty())
            })
            .map(|(key, _)| (key.clone(), key.request_body()))
            .collect()
    }

    /// Fails flights older than `timeout_ms` + [`GRACE_MS`].
    pub fn expire(&mut self, now_ms: u64, timeout_ms: u64) -> Vec<Completion> {
        let deadline = timeout_ms.saturating_add(GRACE_MS);
        let expired: Vec<FlightKey> = self
            .by_key
            .iter()
            .filter(|(_, f)| now_ms.saturating_sub(f.started_ms) > deadline)
            .map(|(key, _)| key.clone())
            .collect();
        let mut completions = Vec::new();
        for key in expired {
            if let Some(flight) = self.by_key.remove(&key) {
                if let Some(token) = flight.token {
                    self.by_token.remove(&token);
                }
                completions.extend(fail(
                    flight.waiters,
                    "the control plane did not answer in time",
                ));
            }
        }
        completions
    }

    /// Number of flights.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Whether nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

fn fail(waiters: Vec<Waiter>, reason: &str) -> Vec<Completion> {
    finish_each(waiters, |_| {
        Decision::Reject(reply::control_plane_unavailable(reason))
    })
}

/// Decides each live waiter and records the outcome in its log; skips dead ones.
fn finish_each(waiters: Vec<Waiter>, decide: impl Fn(&FetchPlan) -> Decision) -> Vec<Completion> {
    let mut completions = Vec::with_capacity(waiters.len());
    for waiter in waiters {
        let Some(log) = waiter.log.upgrade() else {
            continue;
        };
        let decision = decide(&waiter.plan);
        if let Ok(mut log) = log.try_borrow_mut() {
            match &decision {
                Decision::Reject(reject) => log.error = Some(reject.code),
                Decision::Forward(forward) => log.secrets.clone_from(&forward.secrets),
                Decision::Fetch(_) => {}
            }
        }
        completions.push(Completion {
            context_id: waiter.context_id,
            decision,
            log: waiter.log,
        });
    }
    completions
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::CredentialCache;
    use crate::decide::tests::{basic, snapshot, ALICE, BOB, NOW_MS};
    use crate::decide::{decide, Request};
    use agent_vault_rules::reply::ErrorCode;

    /// A paused request: its context id, its log state (drop it: the request is gone)
    /// and its plan.
    fn miss(
        context_id: u32,
        token: &str,
        vault: &str,
        authority: &'static str,
    ) -> (Rc<RefCell<RequestLog>>, Waiter) {
        let auth = basic(token, vault);
        let request = Request {
            method: "GET",
            authority: Some(authority),
            path: "/",
            proxy_authorization: Some(&auth),
            x_vault: None,
            tunnel: None,
        };
        let log = Rc::new(RefCell::new(RequestLog::default()));
        let decision = decide(
            Some(&snapshot()),
            &CredentialCache::new(0),
            &request,
            NOW_MS,
            &mut log.borrow_mut(),
            &mut crate::rate_limit::MemoryStore::default(),
        );
        let Decision::Fetch(plan) = decision else {
            panic!("expected a fetch, got {decision:?}");
        };
        let waiter = Waiter {
            context_id,
            plan,
            log: Rc::downgrade(&log),
        };
        (log, waiter)
    }

    fn values(pairs: &[(&str, &str)], missing: &[&str]) -> Answer {
        Answer::Values {
            values: pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), Secret::new((*v).to_owned())))
                .collect(),
            missing: missing.iter().map(|k| (*k).to_owned()).collect(),
        }
    }

    fn completions_of(answered: Option<Answered>) -> Vec<Completion> {
        answered.map(|a| a.completions).unwrap_or_default()
    }

    fn summary(completions: &[Completion]) -> Vec<(u32, String)> {
        completions
            .iter()
            .map(|c| {
                let what = match &c.decision {
                    Decision::Forward(f) => format!("forward {:?}", f.inject),
                    Decision::Reject(r) => format!("{} {}", r.status(), r.code.as_str()),
                    Decision::Fetch(_) => "fetch".to_owned(),
                };
                (c.context_id, what)
            })
            .collect()
    }

    fn dispatch(flights: &mut Flights, join: Join, token: u32, owner: u32) -> FlightKey {
        match join {
            Join::Dispatch(key, body) => {
                let request: CredentialsRequest =
                    serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(request.vault, &*key.vault);
                assert_eq!(request.keys, key.keys);
                assert_eq!(request.token_sha256, key.token_sha256);
                flights.dispatched(&key, token, owner, NOW_MS);
                key
            }
            Join::Joined => panic!("expected a dispatch"),
        }
    }

    #[test]
    fn two_misses_make_one_fetch_and_both_resume() {
        let mut flights = Flights::default();
        let (_log1, w1) = miss(1, ALICE, "", "api.stripe.com");
        let (_log2, w2) = miss(2, ALICE, "", "api.stripe.com");
        let first = flights.join(w1, "1", NOW_MS);
        dispatch(&mut flights, first, 100, 1);
        assert_eq!(flights.join(w2, "1", NOW_MS), Join::Joined);
        assert_eq!(flights.len(), 1);
        assert!(flights.owns(100));
        let Answered {
            version,
            completions,
            key,
            refresh,
        } = flights
            .answer(100, &values(&[("STRIPE_KEY", "sk_1")], &[]))
            .unwrap_or_else(|| panic!("known token"));
        assert_eq!(version, "1");
        assert!(!refresh);
        assert_eq!(&*key.vault, "default");
        let forward = "forward [(\"authorization\", \"Bearer sk_1\")]".to_owned();
        assert_eq!(
            summary(&completions),
            vec![(1, forward.clone()), (2, forward)]
        );
        assert!(flights.is_empty());
        assert!(
            flights.answer(100, &Answer::Forbidden).is_none(),
            "answered once"
        );
    }

    #[test]
    fn different_keys_or_agents_fly_separately() {
        let mut flights = Flights::default();
        let (_a, stripe) = miss(1, ALICE, "", "api.stripe.com");
        let (_b, github) = miss(2, ALICE, "", "api.github.com");
        let (_c, bob) = miss(3, BOB, "default", "api.stripe.com");
        let (_d, same_keys_other_service) = miss(4, ALICE, "", "custom.example.com");
        assert!(matches!(
            flights.join(stripe, "1", NOW_MS),
            Join::Dispatch(..)
        ));
        assert!(matches!(
            flights.join(github, "1", NOW_MS),
            Join::Dispatch(..)
        ));
        assert!(matches!(flights.join(bob, "1", NOW_MS), Join::Dispatch(..)));
        // custom.example.com needs only STRIPE_KEY too: same fetch as stripe.
        assert_eq!(
            flights.join(same_keys_other_service, "1", NOW_MS),
            Join::Joined
        );
        assert_eq!(flights.len(), 3);
    }

    #[test]
    fn a_gone_waiter_is_skipped() {
        let mut flights = Flights::default();
        let (_log1, w1) = miss(1, ALICE, "", "api.stripe.com");
        let (log2, w2) = miss(2, ALICE, "", "api.stripe.com");
        let (_log3, w3) = miss(3, ALICE, "", "api.stripe.com");
        let first = flights.join(w1, "1", NOW_MS);
        dispatch(&mut flights, first, 7, 1);
        flights.join(w2, "1", NOW_MS);
        flights.join(w3, "1", NOW_MS);
        drop(log2); // request 2's context was deleted without telling us
        let completions = completions_of(flights.answer(7, &values(&[("STRIPE_KEY", "v")], &[])));
        let ids: Vec<u32> = completions.iter().map(|c| c.context_id).collect();
        assert_eq!(ids, vec![1, 3]);
    }

    #[test]
    fn a_waiter_that_leaves_is_removed_and_an_orphaned_flight_is_redispatched() {
        let mut flights = Flights::default();
        let (_log1, w1) = miss(1, ALICE, "", "api.stripe.com");
        let (_log2, w2) = miss(2, ALICE, "", "api.stripe.com");
        let first = flights.join(w1, "1", NOW_MS);
        let key = dispatch(&mut flights, first, 7, 1);
        flights.join(w2, "1", NOW_MS);
        assert!(flights.orphans().is_empty());
        // The owner leaves: its answer would be dropped by the SDK.
        flights.context_gone(1);
        assert!(!flights.owns(7));
        let orphans = flights.orphans();
        assert_eq!(orphans.len(), 1);
        assert_eq!(orphans.first().map(|(k, _)| k), Some(&key));
        // The root dispatches it again.
        flights.dispatched(&key, 8, 0, NOW_MS + 500);
        assert!(flights.orphans().is_empty());
        let completions = completions_of(flights.answer(8, &values(&[("STRIPE_KEY", "v")], &[])));
        assert_eq!(summary(&completions).len(), 1);
        assert_eq!(completions.first().map(|c| c.context_id), Some(2));
    }

    #[test]
    fn a_flight_with_no_waiters_left_is_dropped() {
        let mut flights = Flights::default();
        let (_log1, w1) = miss(1, ALICE, "", "api.stripe.com");
        let first = flights.join(w1, "1", NOW_MS);
        dispatch(&mut flights, first, 7, 1);
        flights.context_gone(1);
        assert!(flights.is_empty());
        assert!(flights.orphans().is_empty());
        assert!(!flights.owns(7));
    }

    #[test]
    fn a_refresh_flight_has_no_waiters_is_sent_by_the_root_and_outlives_requests() {
        let mut flights = Flights::default();
        let (_log1, w1) = miss(1, ALICE, "", "api.stripe.com");
        let key = FlightKey::of(&w1.plan);
        assert!(flights.refresh(key.clone(), "1", NOW_MS));
        assert!(!flights.refresh(key.clone(), "1", NOW_MS), "one at a time");
        assert!(flights.is_refresh(&key));
        // Requests ending do not drop it.
        flights.context_gone(1);
        flights.context_gone(2);
        assert_eq!(flights.len(), 1);
        assert_eq!(flights.orphans().len(), 1, "for the root to send");
        // A miss for the same keys before the root sent it: it sends it itself.
        let Join::Dispatch(joined, _) = flights.join(w1, "1", NOW_MS) else {
            panic!("the waiter dispatches the refresh");
        };
        assert_eq!(joined, key);
        flights.dispatched(&key, 7, 1, NOW_MS);
        assert!(flights.orphans().is_empty());
        // Its request goes away: the root sends it again, and it stays a refresh.
        flights.context_gone(1);
        assert_eq!(flights.orphans().len(), 1);
        flights.dispatched(&key, 8, 0, NOW_MS);
        let answered = flights.answer(8, &values(&[("STRIPE_KEY", "v")], &[]));
        let answered = answered.unwrap_or_else(|| panic!("answered"));
        assert!(answered.refresh && answered.completions.is_empty());
        assert!(flights.is_empty());
        // No refresh while a normal fetch of the same keys is in flight.
        let (_log2, w2) = miss(2, ALICE, "", "api.stripe.com");
        flights.join(w2, "1", NOW_MS);
        assert!(!flights.refresh(key.clone(), "1", NOW_MS));
        assert!(!flights.is_refresh(&key));
    }

    #[test]
    fn a_version_change_drops_the_refreshes_nobody_waits_on() {
        let mut flights = Flights::default();
        let (_log1, stripe) = miss(1, ALICE, "", "api.stripe.com");
        let (_log2, github) = miss(2, ALICE, "", "api.github.com");
        let (_log3, joiner) = miss(3, ALICE, "", "api.github.com");
        let sent = FlightKey::of(&stripe.plan);
        let joined = FlightKey::of(&github.plan);
        flights.refresh(sent.clone(), "1", NOW_MS);
        flights.dispatched(&sent, 7, 0, NOW_MS);
        flights.refresh(joined.clone(), "1", NOW_MS);
        flights.join(joiner, "1", NOW_MS);
        flights.drop_refreshes();
        assert!(!flights.owns(7), "its answer is ignored");
        assert_eq!(flights.len(), 1, "the one a request waits on stays");
        assert!(flights.is_refresh(&joined));
        drop(github);
    }

    #[test]
    fn answers_are_classified() {
        let ok = br#"{"values":{"STRIPE_KEY":"sk"},"missing":[]}"#.to_vec();
        // (behaviour, status, control-plane header, body, expected)
        type Case<'a> = (&'a str, Option<u16>, bool, Vec<u8>, &'a str);
        #[rustfmt::skip]
        let cases: Vec<Case<'_>> = vec![
            ("control plane 200", Some(200), true, ok.clone(), "values"),
            ("Envoy's synthesized 503 (socket down)", Some(503), false, b"upstream connect error".to_vec(), "unavailable"),
            ("Envoy's synthesized 504 (slow)", Some(504), false, b"upstream request timeout".to_vec(), "unavailable"),
            ("a 200 without the control-plane header", Some(200), false, ok.clone(), "unavailable"),
            ("control plane 403", Some(403), true, br#"{"error":"forbidden"}"#.to_vec(), "forbidden"),
            ("control plane 500", Some(500), true, b"{}".to_vec(), "unavailable"),
            ("garbage body", Some(200), true, b"<html>".to_vec(), "unavailable"),
            ("wrong json shape", Some(200), true, br#"{"values":[]}"#.to_vec(), "unavailable"),
            ("no status", None, true, ok, "unavailable"),
        ];
        for (behaviour, status, header, body, expected) in cases {
            let kind = match Answer::classify(status, header, body) {
                Answer::Values { .. } => "values",
                Answer::Forbidden => "forbidden",
                Answer::Unavailable(_) => "unavailable",
            };
            assert_eq!(kind, expected, "{behaviour}");
        }
    }

    #[test]
    fn answers_finish_waiters_with_the_designed_status() {
        // (behaviour, answer, expected outcome for a stripe waiter)
        let cases: Vec<(&str, Answer, &str)> = vec![
            (
                "values",
                values(&[("STRIPE_KEY", "sk")], &[]),
                "forward [(\"authorization\", \"Bearer sk\")]",
            ),
            (
                "missing key → 502",
                values(&[], &["STRIPE_KEY"]),
                "502 credential_not_found",
            ),
            (
                "key neither in values nor missing → 502",
                values(&[("OTHER", "x")], &[]),
                "502 credential_not_found",
            ),
            (
                "control plane 403 → 407",
                Answer::Forbidden,
                "407 invalid_token",
            ),
            (
                "no control plane → 503",
                Answer::Unavailable("down".into()),
                "503 control_plane_unavailable",
            ),
            (
                "value with LF → 502",
                values(&[("STRIPE_KEY", "a\nb")], &[]),
                "502 invalid_credential_value",
            ),
        ];
        for (behaviour, answer, expected) in cases {
            let mut flights = Flights::default();
            let (log, waiter) = miss(1, ALICE, "", "api.stripe.com");
            let first = flights.join(waiter, "1", NOW_MS);
            dispatch(&mut flights, first, 9, 1);
            let completions = completions_of(flights.answer(9, &answer));
            assert_eq!(
                summary(&completions),
                vec![(1, expected.to_owned())],
                "{behaviour}"
            );
            let logged = log.borrow().error.map(ErrorCode::as_str);
            let expected_code = expected
                .split(' ')
                .nth(1)
                .filter(|_| !expected.starts_with("forward"));
            assert_eq!(logged, expected_code, "{behaviour}");
        }
    }

    #[test]
    fn dispatch_failure_and_expiry_fail_waiters_with_503() {
        let mut flights = Flights::default();
        let (_log1, w1) = miss(1, ALICE, "", "api.stripe.com");
        let Join::Dispatch(key, _) = flights.join(w1, "1", NOW_MS) else {
            panic!("dispatch");
        };
        let completions = flights.dispatch_failed(&key, "no cluster");
        assert_eq!(
            summary(&completions),
            vec![(1, "503 control_plane_unavailable".to_owned())]
        );
        assert!(flights.is_empty());

        let (_log2, w2) = miss(2, ALICE, "", "api.stripe.com");
        let first = flights.join(w2, "1", NOW_MS);
        dispatch(&mut flights, first, 11, 2);
        assert!(flights.expire(NOW_MS + 2000 + GRACE_MS, 2000).is_empty());
        let completions = flights.expire(NOW_MS + 2001 + GRACE_MS, 2000);
        assert_eq!(
            summary(&completions),
            vec![(2, "503 control_plane_unavailable".to_owned())]
        );
        assert!(flights.is_empty() && !flights.owns(11));
    }
}
