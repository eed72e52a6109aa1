//! The proxy-wasm contexts: they read what the host gives, call the worker's logic,
//! and carry out its decisions. Compiled for wasm32 only.
//!
//! One root context per worker VM owns the [`Worker`] (shared with every HTTP context
//! through `Rc<RefCell<..>>`), polls the snapshot and flushes the request log on its
//! tick. Each request gets an HTTP context; a request that needs a credential fetch is
//! paused, and whichever context receives the answer (the request that dispatched it,
//! or the root for a re-dispatched orphan, see [`crate::flight`]) finishes every
//! waiter: `set_effective_context(waiter)`, then inject + resume, or send the error.
//! Envoy defers those actions until the current callback returns, so nothing re-enters
//! the VM while the worker is borrowed.

mod host;
mod stats;

use std::cell::RefCell;
use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

use crate::config::Config;
use crate::decide::{Decision, Request};
use crate::flight::{Answer, Completion, Join, Waiter};
use crate::request_log::RequestLog;
use crate::stats::Callout;
use crate::worker::{PollOutcome, Worker};
use agent_vault_rules::reply::{self, Reject};

use host::{log, now_ms};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    // After set_log_level, which installs the SDK's own hook: ours names the filter.
    std::panic::set_hook(Box::new(|info| {
        let _ = proxy_wasm::hostcalls::log(
            LogLevel::Critical,
            &format!("agent-vault-filter: panic (this worker's VM is now unusable): {info}"),
        );
    }));
    proxy_wasm::set_root_context(|context_id| Box::new(Root::new(context_id)));
}}

type SharedWorker = Rc<RefCell<Worker>>;

struct Root {
    id: u32,
    worker: Option<SharedWorker>,
    tick_ms: u64,
}

impl Root {
    fn new(id: u32) -> Root {
        Root {
            id,
            worker: None,
            tick_ms: 0,
        }
    }

    fn update_tick(&mut self, worker: &SharedWorker) {
        let Ok(period) = worker.try_borrow().map(|w| w.tick_period_ms()) else {
            return;
        };
        if period != self.tick_ms {
            host::set_tick_period(period);
            self.tick_ms = period;
        }
    }

    fn poll(&self, worker: &SharedWorker, config: &Config, now: u64) {
        let Some(headers) = worker
            .try_borrow_mut()
            .ok()
            .and_then(|mut w| w.poll_due(now))
        else {
            return;
        };
        let result = host::dispatch_poll(config, &headers);
        stats::callout_sent(Callout::Poll, &result);
        if let Err(status) = result {
            log(
                LogLevel::Debug,
                &format!(
                    "cannot poll the snapshot through cluster {:?} ({status:?})",
                    config.cluster
                ),
            );
        }
        if let Ok(mut w) = worker.try_borrow_mut() {
            w.poll_dispatched(result.ok(), now);
        }
    }

    fn redispatch_orphans(&self, worker: &SharedWorker, config: &Config, now: u64) {
        let orphans = worker.try_borrow().map(|w| w.orphans()).unwrap_or_default();
        for (key, body) in orphans {
            let sent = host::dispatch_credentials(config, &body);
            stats::callout_sent(Callout::Fetch, &sent);
            let completions = match sent {
                Ok(token) => {
                    if let Ok(mut w) = worker.try_borrow_mut() {
                        w.fetch_dispatched(&key, token, self.id, now);
                    }
                    continue;
                }
                Err(status) => worker
                    .try_borrow_mut()
                    .map(|mut w| {
                        w.fetch_failed(
                            &key,
                            &format!("cannot reach the control plane cluster ({status:?})"),
                        )
                    })
                    .unwrap_or_default(),
            };
            apply_completions(self.id, config, completions);
        }
    }
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let Some(worker) = self.worker.clone() else {
            return;
        };
        on_call_response(self.id, &worker, token_id, num_headers, body_size);
        self.update_tick(&worker);
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        true
    }

    fn on_configure(&mut self, plugin_configuration_size: usize) -> bool {
        let bytes = host::plugin_configuration(plugin_configuration_size);
        let config = match Config::parse(&bytes) {
            Ok(config) => config,
            Err(error) => {
                // Envoy refuses the filter configuration: fail closed.
                log(LogLevel::Error, &error.to_string());
                return false;
            }
        };
        stats::define();
        let now = now_ms();
        let worker = Rc::new(RefCell::new(Worker::new(config.clone(), now)));
        self.poll(&worker, &config, now);
        self.update_tick(&worker);
        self.worker = Some(worker);
        true
    }

    fn on_tick(&mut self) {
        let Some(worker) = self.worker.clone() else {
            return;
        };
        let now = now_ms();
        let Ok(config) = worker.try_borrow().map(|w| Rc::clone(w.config())) else {
            return;
        };
        let expired = worker
            .try_borrow_mut()
            .map(|mut w| w.housekeeping(now))
            .unwrap_or_default();
        if !expired.is_empty() {
            log(
                LogLevel::Warn,
                &format!(
                    "{} request(s) got no credential answer in time; answered 503",
                    expired.len()
                ),
            );
            apply_completions(self.id, &config, expired);
        }
        self.redispatch_orphans(&worker, &config, now);
        self.poll(&worker, &config, now);
        let logs = worker
            .try_borrow_mut()
            .ok()
            .and_then(|mut w| w.logs_due(now));
        if let Some(body) = logs {
            host::post_logs(&config, &body);
        }
        stats::flush(
            config
                .callout_timeout_ms
                .saturating_add(crate::flight::GRACE_MS),
        );
        self.update_tick(&worker);
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Never `None`: the SDK panics on it. Without a worker, requests get 503.
        Some(Box::new(Http {
            id: context_id,
            worker: self.worker.clone(),
            log: Rc::new(RefCell::new(RequestLog::default())),
            waiting: false,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    id: u32,
    worker: Option<SharedWorker>,
    /// Shared with a [`Waiter`] (weakly) while the request waits for a fetch.
    log: Rc<RefCell<RequestLog>>,
    /// Joined a fetch at some point: tell the worker when this request goes away.
    waiting: bool,
}

impl Http {
    fn refuse(&mut self, reject: &Reject) -> Action {
        stats::denied(reject.code);
        if let Ok(mut log) = self.log.try_borrow_mut() {
            log.error = Some(reject.code);
        }
        host::send_reject(reject);
        Action::Pause
    }

    fn fetch(
        &mut self,
        worker: &SharedWorker,
        config: &Config,
        plan: crate::decide::FetchPlan,
        now: u64,
    ) -> Action {
        let waiter = Waiter {
            context_id: self.id,
            plan,
            log: Rc::downgrade(&self.log),
        };
        let joined = worker
            .try_borrow_mut()
            .map(|mut w| w.join_fetch(waiter, now));
        let (key, body) = match joined {
            Ok(Join::Joined) => {
                self.waiting = true;
                return Action::Pause;
            }
            Ok(Join::Dispatch(key, body)) => (key, body),
            Err(_) => return self.refuse(&reply::control_plane_unavailable("busy")),
        };
        self.waiting = true;
        let sent = host::dispatch_credentials(config, &body);
        stats::callout_sent(Callout::Fetch, &sent);
        match sent {
            Ok(token) => {
                if let Ok(mut w) = worker.try_borrow_mut() {
                    w.fetch_dispatched(&key, token, self.id, now);
                }
            }
            Err(status) => {
                log(
                    LogLevel::Warn,
                    &format!(
                        "cannot dispatch a credential fetch to cluster {:?} ({status:?})",
                        config.cluster
                    ),
                );
                let completions = worker
                    .try_borrow_mut()
                    .map(|mut w| w.fetch_failed(&key, "the control plane cluster is not reachable"))
                    .unwrap_or_default();
                apply_completions(self.id, config, completions);
            }
        }
        Action::Pause
    }
}

impl Context for Http {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        if let Some(worker) = self.worker.clone() {
            on_call_response(self.id, &worker, token_id, num_headers, body_size);
        }
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let now = now_ms();
        // One host call for every header (zeroed when dropped: it holds the token).
        let headers = host::request_headers();
        let method = headers.get(":method").unwrap_or_default();
        let path = headers.get(":path").unwrap_or_default();

        let Some(worker) = self.worker.clone() else {
            return self.refuse(&reply::control_plane_unavailable(
                "the filter is not configured",
            ));
        };
        let decision = {
            let request = Request {
                method,
                authority: headers.get(":authority"),
                path,
                proxy_authorization: headers.get("proxy-authorization"),
                x_vault: headers.get("x-vault"),
            };
            match (worker.try_borrow(), self.log.try_borrow_mut()) {
                (Ok(w), Ok(mut log)) => {
                    Some((w.decide(&request, now, &mut log), Rc::clone(w.config())))
                }
                _ => None,
            }
        };
        if let Ok(mut log) = self.log.try_borrow_mut() {
            log.start(now, method.to_owned(), path.to_owned());
        }
        let Some((decision, config)) = decision else {
            return self.refuse(&reply::control_plane_unavailable("busy"));
        };
        match decision {
            Decision::Reject(reject) => self.refuse(&reject),
            Decision::Forward(forward) => {
                stats::forwarded(&forward, true);
                host::apply_forward(&config, &forward, &headers);
                Action::Continue
            }
            Decision::Fetch(plan) => {
                stats::cache_miss();
                self.fetch(&worker, &config, plan, now)
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        // For the request log: one header, in a callback Envoy makes anyway.
        if let Ok(mut log) = self.log.try_borrow_mut() {
            log.response_status = host::response_status();
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        let Some(worker) = self.worker.clone() else {
            return;
        };
        let now = now_ms();
        let Ok(log) = self.log.try_borrow() else {
            return;
        };
        let Some(record) = log.record(now) else {
            return;
        };
        let Ok(mut w) = worker.try_borrow_mut() else {
            return;
        };
        let full = w.log(&record, now);
        let config = Rc::clone(w.config());
        drop(w);
        if let Some(body) = full {
            host::post_logs(&config, &body);
        }
    }
}

impl Drop for Http {
    fn drop(&mut self) {
        if self.waiting {
            if let Some(Ok(mut w)) = self.worker.as_ref().map(|w| w.try_borrow_mut()) {
                w.context_gone(self.id);
            }
        }
    }
}

/// Handles a callout answer delivered to context `own_id`: a snapshot poll or a
/// credential fetch of this worker (anything else, such as a log post, is ignored).
fn on_call_response(
    own_id: u32,
    worker: &SharedWorker,
    token: u32,
    num_headers: usize,
    body_size: usize,
) {
    let Ok((is_poll, is_fetch, failures, config)) = worker.try_borrow().map(|w| {
        (
            w.is_poll(token),
            w.is_fetch(token),
            w.poll_failures(),
            Rc::clone(w.config()),
        )
    }) else {
        return;
    };
    if !is_poll && !is_fetch {
        return;
    }
    let response = host::call_response(num_headers, body_size);
    let now = now_ms();
    if is_poll {
        let Ok(outcome) = worker.try_borrow_mut().map(|mut w| {
            w.on_poll_answer(
                token,
                response.status,
                response.from_control_plane,
                response.body,
            )
        }) else {
            return;
        };
        let usable = matches!(
            outcome,
            PollOutcome::Loaded { .. } | PollOutcome::NotModified
        );
        stats::callout_answered(token, usable);
        if let PollOutcome::Loaded { version, .. } = &outcome {
            stats::snapshot_loaded(version);
        }
        log_poll(outcome, failures);
        return;
    }
    let answer = Answer::classify(response.status, response.from_control_plane, response.body);
    stats::callout_answered(token, !matches!(answer, Answer::Unavailable(_)));
    if let Answer::Unavailable(reason) = &answer {
        log(
            LogLevel::Warn,
            &format!("credential fetch failed: {reason}; answering 503"),
        );
    }
    let completions = worker
        .try_borrow_mut()
        .ok()
        .and_then(|mut w| w.on_fetch_answer(token, answer, now))
        .unwrap_or_default();
    apply_completions(own_id, &config, completions);
}

/// Finishes waiting requests from the current callback, then switches back to
/// `own_id`. A waiter Envoy no longer knows is skipped.
fn apply_completions(own_id: u32, config: &Config, completions: Vec<Completion>) {
    if completions.is_empty() {
        return;
    }
    // The context host calls act on; switching is a host call, so it is skipped when
    // the waiter is the context the answer was delivered to (the common case).
    let mut current = own_id;
    for completion in completions {
        if completion.context_id != current {
            if !host::switch_to(completion.context_id) {
                log(
                    LogLevel::Debug,
                    "a request waiting for a credential is gone",
                );
                continue;
            }
            current = completion.context_id;
        }
        match completion.decision {
            Decision::Forward(forward) => {
                stats::forwarded(&forward, false);
                // This request's headers again, in one call: then only the headers
                // that are there are removed.
                let known = host::request_headers();
                host::apply_forward(config, &forward, &known);
                host::resume();
            }
            Decision::Reject(reject) => {
                stats::denied(reject.code);
                host::send_reject(&reject);
            }
            Decision::Fetch(_) => {
                let reject = reply::control_plane_unavailable("internal");
                stats::denied(reject.code);
                host::send_reject(&reject);
            }
        }
    }
    if current != own_id {
        let _ = host::switch_to(own_id);
    }
}

fn log_poll(outcome: PollOutcome, failures_before: u32) {
    let recovered = failures_before > 0;
    match outcome {
        PollOutcome::Loaded {
            version,
            first: true,
            counts: (vaults, agents),
            ..
        } => log(
            LogLevel::Info,
            &format!("loaded rules snapshot version {version} ({vaults} vaults, {agents} agents)"),
        ),
        PollOutcome::Loaded {
            version, changed, ..
        } => {
            let level = if recovered {
                LogLevel::Info
            } else {
                LogLevel::Debug
            };
            let what = if changed { "now using" } else { "reloaded" };
            log(level, &format!("{what} rules snapshot version {version}"));
        }
        PollOutcome::NotModified => {
            if recovered {
                log(
                    LogLevel::Info,
                    "the control plane answers again; rules unchanged",
                );
            }
        }
        PollOutcome::Invalid(reason) | PollOutcome::Unavailable(reason) => {
            let level = if failures_before == 0 {
                LogLevel::Warn
            } else {
                LogLevel::Debug
            };
            log(
                level,
                &format!("snapshot poll failed: {reason}; keeping the last good rules"),
            );
        }
        PollOutcome::Stale => {}
    }
}
