//! What the filter does on each of Envoy's callbacks, over any [`Host`]: the whole
//! per-request state machine, unit-tested on the host with a recording fake host
//! (`host/fake.rs`). The proxy-wasm contexts (`glue`) hand every callback over to a
//! [`Root`] or an [`Http`].
//!
//! One [`Root`] per worker VM owns the [`Worker`] (shared with every [`Http`] through
//! `Rc<RefCell<..>>`), polls the snapshot and flushes the request log on its tick. Each
//! request gets an [`Http`]; a request that needs a credential fetch is paused, and
//! whichever context receives the answer (the request that dispatched it, or the root
//! for a re-dispatched orphan, see [`crate::flight`]) finishes every waiter: it makes
//! the waiter's context current, then injects and resumes, or sends the error, and
//! finally makes its own context current again.
//!
//! Each callback borrows the worker once and keeps it across its host calls: nothing
//! re-enters (see [`crate::host`]). Were a borrow ever refused, a new request gets 503
//! and any other callback does nothing, as no request may pass unchecked.

use std::cell::RefCell;
use std::rc::Rc;

use agent_vault_rules::reply::{self, ErrorCode, Reject};

use crate::config::{Config, Mode, RequestLogMode};
use crate::decide::{Decision, FetchPlan, Forward, Request, Tunnelled};
use crate::flight::{Answer, Completion, Join, Waiter, GRACE_MS};
use crate::header_map::HeaderMap;
use crate::host::{Host, LogLevel, Stat};
use crate::redact::{self, GrpcFraming, Inflater, Patterns, Redactor};
use crate::request_log::RequestLog;
use crate::stats::Callout;
use crate::substitute::{self, BodyPlan};
use crate::upgrades::OpenUpgrade;
use crate::worker::{PollOutcome, Worker};

/// How Envoy's response details start when its RBAC filter (the destination check of
/// the bootstraps) refused a request.
const DESTINATION_CHECK_DETAILS: &str = "rbac_access_denied";

type SharedWorker = Rc<RefCell<Worker>>;

/// What Envoy does with a request once its headers callback returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Pass it on.
    Continue,
    /// Hold it: the filter answered it, or resumes it later.
    Pause,
}

/// The root context of a worker VM.
#[derive(Debug)]
pub struct Root {
    id: u32,
    worker: Option<SharedWorker>,
    /// From the configuration: whether requests come through a decrypted tunnel.
    mode: Mode,
    /// The tick period last set on the host (0: none yet).
    tick_ms: u64,
    /// From the configuration: how the request log leaves the VM.
    request_log: RequestLogMode,
}

impl Root {
    /// Envoy's root context `id`, not configured yet.
    pub fn new(id: u32) -> Root {
        Root {
            id,
            worker: None,
            mode: Mode::Proxy,
            tick_ms: 0,
            request_log: RequestLogMode::Post,
        }
    }

    /// `on_configure`: starts the worker and its first poll. `false` when the
    /// configuration is refused (Envoy then rejects the filter: fail closed).
    pub fn configure(&mut self, host: &mut impl Host, configuration: &[u8]) -> bool {
        let config = match Config::parse(configuration) {
            Ok(config) => config,
            Err(error) => {
                host.log(LogLevel::Error, &error.to_string());
                return false;
            }
        };
        host.define_stats();
        self.mode = config.mode;
        self.request_log = config.request_log;
        let now = host.now_ms();
        let mut worker = Worker::new(config, now);
        poll(host, &mut worker, now);
        update_tick(host, &mut self.tick_ms, &worker);
        self.worker = Some(Rc::new(RefCell::new(worker)));
        true
    }

    /// `on_tick`: fails flights that got no answer in time, re-dispatches orphaned
    /// ones, polls the snapshot, posts the request log and flushes the stats when due.
    pub fn on_tick(&mut self, host: &mut impl Host) {
        let Some(shared) = &self.worker else {
            return;
        };
        let now = host.now_ms();
        let Ok(mut worker) = shared.try_borrow_mut() else {
            return;
        };
        let expired = worker.housekeeping(now);
        if !expired.is_empty() {
            host.log(
                LogLevel::Warn,
                &format!(
                    "{} request(s) got no credential answer in time; answered 503",
                    expired.len()
                ),
            );
            apply_completions(host, self.id, worker.config(), expired);
        }
        redispatch_orphans(host, self.id, &mut worker, now);
        poll(host, &mut worker, now);
        if let Some(body) = worker.logs_due(now) {
            post_logs(host, worker.config(), &body);
        }
        host.flush_stats(worker.config().callout_timeout_ms.saturating_add(GRACE_MS));
        update_tick(host, &mut self.tick_ms, &worker);
        let revoked = worker.revoked_upgrades(now);
        drop(worker);
        reset_upgrades(host, self.id, &revoked);
    }

    /// `on_http_call_response` of the root: a poll answer, or the answer to a fetch
    /// the root re-dispatched.
    pub fn on_call_response(
        &mut self,
        host: &mut impl Host,
        token: u32,
        num_headers: usize,
        body_size: usize,
    ) {
        let Some(shared) = &self.worker else {
            return;
        };
        let Ok(mut worker) = shared.try_borrow_mut() else {
            return;
        };
        on_call_response(host, self.id, &mut worker, token, num_headers, body_size);
        // A poll answered: the next long-poll goes out at once (the answer's own
        // callback, so one is always outstanding).
        let now = host.now_ms();
        long_poll(host, &mut worker, now);
        update_tick(host, &mut self.tick_ms, &worker);
        // A new snapshot: open WebSockets whose agent lost access end now.
        let revoked = worker.revoked_upgrades(now);
        drop(worker);
        reset_upgrades(host, self.id, &revoked);
    }

    /// The state of a new request in HTTP context `context_id`. Without a worker (not
    /// configured), its requests get 503.
    pub fn new_request(&self, context_id: u32) -> Http {
        Http {
            id: context_id,
            worker: self.worker.clone(),
            mode: self.mode,
            log: Rc::new(RefCell::new(RequestLog {
                access_log: self.request_log == RequestLogMode::AccessLog,
                ..RequestLog::default()
            })),
            waiting: false,
            upgraded: false,
            body: Vec::new(),
            response: None,
        }
    }
}

/// Stream `id` was upgraded: the worker keeps it, to reset it if its agent loses
/// access ([`crate::upgrades`]); `true` when kept. A stream the filter did not
/// authenticate (none gets that far) is not.
fn keep_upgrade(
    host: &mut impl Host,
    id: u32,
    worker: Option<&SharedWorker>,
    log: &RequestLog,
) -> bool {
    let (Some(shared), Some(token_sha256), Some(vault)) = (worker, &log.token_sha256, &log.vault)
    else {
        return false;
    };
    let Ok(mut worker) = shared.try_borrow_mut() else {
        return false;
    };
    worker.upgrade_opened(OpenUpgrade {
        context_id: id,
        token_sha256: Rc::clone(token_sha256),
        vault: Rc::clone(vault),
        service: log.service.clone(),
    });
    host.stat(Stat::UpgradeOpened);
    true
}

/// Resets the upgraded streams `revoked` (their agent lost access), from the root's
/// callback `root_id`, with the worker not borrowed: the reset may end the stream's
/// context at once. A stream Envoy no longer knows is skipped.
fn reset_upgrades(host: &mut impl Host, root_id: u32, revoked: &[u32]) {
    if revoked.is_empty() {
        return;
    }
    let mut reset = 0usize;
    for &context_id in revoked {
        if host.switch_to(context_id) {
            host.reset_stream();
            host.stat(Stat::UpgradeRevoked);
            reset += 1;
        }
    }
    let _ = host.switch_to(root_id);
    host.log(
        LogLevel::Info,
        &format!("{reset} upgraded stream(s) (WebSocket) reset: their agent lost access to them"),
    );
}

/// An HTTP context: one request through the filter.
#[derive(Debug)]
pub struct Http {
    id: u32,
    worker: Option<SharedWorker>,
    mode: Mode,
    /// Shared with a [`Waiter`] (weakly) while the request waits for a fetch.
    log: Rc<RefCell<RequestLog>>,
    /// Joined a fetch at some point: tell the worker when this request goes away.
    waiting: bool,
    /// Upgraded (WebSocket): the worker re-checks it on every snapshot
    /// ([`crate::upgrades`]) until it goes away.
    upgraded: bool,
    /// Request-side substitution: the body taken so far, for a service that
    /// substitutes in bodies (see [`Http::on_request_body`]).
    body: Vec<u8>,
    /// The response body's redaction, for a request whose service redacts.
    response: Option<ResponseBody>,
}

impl Http {
    /// `on_http_request_headers`: decides the request and refuses it, forwards it, or
    /// pauses it for a fetch. A cache hit (the hot path) asks the host for the time,
    /// the headers (once) and the forward, nothing else; inside a decrypted tunnel,
    /// also what Envoy knows of the tunnel.
    pub fn on_request_headers(&mut self, host: &mut impl Host) -> Flow {
        let now = host.now_ms();
        // Zeroed when dropped: it holds the agent's token.
        let headers = host.request_headers();
        let tunnel = match self.mode {
            Mode::Proxy => None,
            Mode::Tunnel => Some(host.tunnel()),
        };
        let method = headers.get(":method").unwrap_or_default();
        let path = headers.get(":path").unwrap_or_default();

        let Some(shared) = &self.worker else {
            return refuse(
                host,
                &self.log,
                &reply::control_plane_unavailable("the filter is not configured"),
            );
        };
        let mut worker = shared.try_borrow_mut();
        let decision = {
            let request = Request {
                method,
                authority: headers.get(":authority"),
                path,
                proxy_authorization: headers.get("proxy-authorization"),
                x_vault: headers.get("x-vault"),
                tunnel: tunnel.as_ref().map(|tunnel| Tunnelled {
                    identity: tunnel.identity.as_deref(),
                    sni: tunnel.sni.as_deref(),
                    tls: tunnel.tls,
                }),
            };
            match (worker.as_mut(), self.log.try_borrow_mut()) {
                (Ok(w), Ok(mut log)) => Some(w.decide(&request, now, &mut log, host)),
                _ => None,
            }
        };
        if let Ok(mut log) = self.log.try_borrow_mut() {
            log.start(now, method, path);
        }
        let (Some(decision), Ok(mut worker)) = (decision, worker) else {
            return refuse(host, &self.log, &reply::control_plane_unavailable("busy"));
        };
        match decision {
            Decision::Reject(reject) => refuse(host, &self.log, &reject),
            Decision::Forward(forward) => {
                if forward_request(host, worker.config(), &self.log, &forward, &headers, true) {
                    Flow::Continue
                } else {
                    Flow::Pause
                }
            }
            Decision::Fetch(plan) => {
                host.stat(Stat::CacheMiss);
                self.waiting = true;
                // Set now, so a request whose client leaves before the answer is
                // logged too; the answer sets it again only if it refuses.
                publish_log(host, &self.log);
                fetch(host, self.id, &self.log, &mut worker, plan, now);
                Flow::Pause
            }
        }
    }

    /// `on_http_response_headers`: keeps the status for the request log. A 403 for a
    /// request the filter let through may be Envoy's destination check refusing the
    /// address the host resolved to (`envoy/README.md`, "Destinations"): Envoy's
    /// response details tell, and the log and the stats then say
    /// `destination_forbidden`. Only 403s pay for that second host call.
    ///
    /// For a request whose service redacts responses ([`crate::redact`]), the headers
    /// are read in one call instead, redacted, and the body's redaction is set up:
    /// `Pause` when the response is refused (its compression cannot be decoded).
    pub fn on_response_headers(&mut self, host: &mut impl Host, end_of_stream: bool) -> Flow {
        let Ok(mut log) = self.log.try_borrow_mut() else {
            return Flow::Continue;
        };
        let patterns = log
            .secrets
            .as_ref()
            .and_then(|secrets| secrets.patterns.clone());
        let headers = patterns.as_ref().map(|_| host.response_headers());
        log.response_status = match &headers {
            Some(headers) => headers
                .get(":status")
                .and_then(|s| s.trim().parse::<u16>().ok())
                .filter(|code| *code > 0),
            None => host.response_status(),
        };
        if log.response_status == Some(101) {
            // Frames follow, not a body: they pass untouched, never held for a scan.
            self.upgraded = keep_upgrade(host, self.id, self.worker.as_ref(), &log);
            return Flow::Continue;
        }
        if log.response_status == Some(403)
            && log.error.is_none()
            && host
                .response_code_details()
                .starts_with(DESTINATION_CHECK_DETAILS)
        {
            log.error = Some(ErrorCode::DestinationForbidden);
            host.stat(Stat::Denied(ErrorCode::DestinationForbidden));
            publish(host, &log);
        }
        let (Some(patterns), Some(headers)) = (patterns, headers) else {
            return Flow::Continue;
        };
        let (flow, body) =
            redact_response_headers(host, &mut log, patterns, &headers, end_of_stream);
        self.response = body;
        flow
    }

    /// `on_http_response_body`: for a redacting request, replaces the chunk with its
    /// redaction (inflated first when the response was compressed); the last bytes are
    /// held back until the next chunk, and given out at `end_of_stream`. Every other
    /// request: nothing, no host call.
    ///
    /// A body followed by trailers never gets `end_of_stream`: its held-back tail is
    /// dropped, never passed on unscanned (nothing is written from the trailers
    /// callback). Trailers come with HTTP/2 upstreams, and there mostly with gRPC,
    /// whose responses are given out whole at each message's end ([`GrpcFraming`]), so
    /// nothing is held when the trailers come. An upgraded stream's frames are never
    /// redacted (see [`Http::on_response_headers`]).
    pub fn on_response_body(&mut self, host: &mut impl Host, size: usize, end_of_stream: bool) {
        let Some(body) = &mut self.response else {
            return;
        };
        let redactions = body.next_chunk(host, size, end_of_stream);
        if redactions > 0 {
            host.stat(Stat::Redacted(redactions));
            if let Ok(mut log) = self.log.try_borrow_mut() {
                log.redactions = log.redactions.saturating_add(redactions);
                publish(host, &log);
            }
        }
    }

    /// `on_log`: adds the request's record to the batch, and posts the batch if full.
    /// With `request_log: "access_log"`: nothing (Envoy's access log has it all).
    pub fn on_log(&mut self, host: &mut impl Host) {
        let Some(shared) = &self.worker else {
            return;
        };
        let Ok(log) = self.log.try_borrow() else {
            return;
        };
        if log.access_log {
            return;
        }
        let now = host.now_ms();
        let Some(record) = log.record(now) else {
            return;
        };
        let Ok(mut worker) = shared.try_borrow_mut() else {
            return;
        };
        if let Some(body) = worker.log(&record, now) {
            post_logs(host, worker.config(), &body);
        }
    }

    /// `on_http_call_response` of this request: the answer to the fetch it
    /// dispatched.
    pub fn on_call_response(
        &mut self,
        host: &mut impl Host,
        token: u32,
        num_headers: usize,
        body_size: usize,
    ) {
        let Some(shared) = &self.worker else {
            return;
        };
        let Ok(mut worker) = shared.try_borrow_mut() else {
            return;
        };
        on_call_response(host, self.id, &mut worker, token, num_headers, body_size);
    }
}

/// Request-side substitution: the request body.
impl Http {
    /// `on_http_request_body` (`chunk_size`: the size of the chunk being delivered).
    ///
    /// A request whose headers are not forwarded (waiting for a credential, or
    /// refused) is held, whatever the body: continuing would send it without its
    /// credential. A forwarded request's body passes, unless its service substitutes
    /// in bodies: then each chunk is taken into the VM and an empty one passes on (the
    /// body is never left in Envoy's buffer, which a filter after this one flushes
    /// upstream when it resumes, e.g. after its DNS lookup); at the end of the body
    /// the whole is substituted and passes on as the last chunk. Past the bound: 413,
    /// and the upstream saw the headers and no byte of the body.
    pub fn on_request_body(
        &mut self,
        host: &mut impl Host,
        chunk_size: usize,
        end_of_stream: bool,
    ) -> Flow {
        let (limit, service) = {
            let Ok(log) = self.log.try_borrow() else {
                return Flow::Pause;
            };
            match &log.body {
                BodyPlan::Hold => return Flow::Pause,
                BodyPlan::Pass => return Flow::Continue,
                BodyPlan::Substitute { limit, service, .. } => (*limit, service.clone()),
            }
        };
        let taken = self.body.len().saturating_add(chunk_size);
        if u64::try_from(taken).unwrap_or(u64::MAX) > limit {
            let reject = reply::request_body_too_large(&service, limit, None);
            return self.refuse_body(host, &reject);
        }
        let drained_before = !self.body.is_empty();
        if chunk_size > 0 {
            let chunk = host.request_body(chunk_size);
            self.body.extend_from_slice(&chunk);
            crate::cache::wipe(chunk);
        }
        if !end_of_stream {
            if chunk_size > 0 {
                host.replace_request_body(chunk_size, &[]);
            }
            return Flow::Continue;
        }
        let whole = std::mem::take(&mut self.body);
        let substituted = {
            let Ok(log) = self.log.try_borrow() else {
                return Flow::Pause;
            };
            let (BodyPlan::Substitute { content_type, .. }, Some(secrets)) =
                (&log.body, &log.secrets)
            else {
                return Flow::Pause;
            };
            substitute::substitute_body(secrets, &whole, content_type, &service)
        };
        let flow = match substituted {
            Ok(Some(new_body)) => {
                host.replace_request_body(chunk_size, &new_body);
                crate::cache::wipe(new_body);
                Flow::Continue
            }
            Ok(None) => {
                // Unchanged: the chunks taken before go back in front of this one.
                if drained_before {
                    host.replace_request_body(chunk_size, &whole);
                }
                Flow::Continue
            }
            Err(reject) => self.refuse_body(host, &reject),
        };
        crate::cache::wipe(whole);
        flow
    }

    /// `on_http_request_trailers`: held while the request is not forwarded; refused
    /// (415) for a service that substitutes in bodies, as the body it holds could no
    /// longer be sent before the trailers; else passed.
    pub fn on_request_trailers(&mut self, host: &mut impl Host) -> Flow {
        let service = {
            let Ok(log) = self.log.try_borrow() else {
                return Flow::Pause;
            };
            match &log.body {
                BodyPlan::Hold => return Flow::Pause,
                BodyPlan::Pass => return Flow::Continue,
                BodyPlan::Substitute { service, .. } => service.clone(),
            }
        };
        self.refuse_body(host, &reply::substitution_body_with_trailers(&service))
    }

    /// Refuses a request from a body callback; its later body callbacks hold.
    fn refuse_body(&mut self, host: &mut impl Host, reject: &Reject) -> Flow {
        crate::cache::wipe(std::mem::take(&mut self.body));
        if let Ok(mut log) = self.log.try_borrow_mut() {
            log.body = BodyPlan::Hold;
        }
        refuse(host, &self.log, reject)
    }
}

impl Drop for Http {
    /// Envoy deleted the context (the request finished or its client went away).
    fn drop(&mut self) {
        if !self.waiting && !self.upgraded {
            return;
        }
        if let Some(Ok(mut worker)) = self.worker.as_ref().map(|w| w.try_borrow_mut()) {
            if self.waiting {
                worker.context_gone(self.id);
            }
            if self.upgraded {
                worker.upgrade_gone(self.id);
            }
        }
    }
}

/// Forwards the current request: plans its substitutions (a refusal is answered
/// instead, and `false` returned), keeps what its body and response need in `log`,
/// then carries out the forward and the header edits.
fn forward_request(
    host: &mut impl Host,
    config: &Config,
    log: &RefCell<RequestLog>,
    forward: &Forward,
    known: &HeaderMap,
    from_cache: bool,
) -> bool {
    let planned = match log.try_borrow() {
        Ok(entry) => substitute::plan(
            config,
            forward,
            known,
            substitute::Names {
                vault: entry.vault.as_deref().unwrap_or_default(),
                service: entry.service.as_deref().unwrap_or_default(),
            },
        ),
        Err(_) => Err(reply::control_plane_unavailable("busy")),
    };
    let edits = match planned {
        Ok(edits) => edits,
        Err(reject) => {
            refuse(host, log, &reject);
            return false;
        }
    };
    host.stat(Stat::Forwarded {
        forward,
        from_cache,
    });
    if let Ok(mut entry) = log.try_borrow_mut() {
        entry.secrets.clone_from(&forward.secrets);
        entry.body = edits.body;
        // Envoy would log the rewritten path, placeholder values in it: the state
        // carries the agent's.
        let rewrites_path = edits.headers.iter().any(|(name, _)| name == ":path");
        if entry.access_log && rewrites_path {
            let path = agent_vault_rules::loggable_path(known.get(":path").unwrap_or_default());
            entry.path = path.to_owned();
        }
        // A hit sets the state here, once; a paused request set it when it paused,
        // and again now only if the path must be added.
        if from_cache || rewrites_path {
            publish(host, &entry);
        }
    }
    host.apply_forward(config, forward, known);
    if !edits.headers.is_empty() {
        host.edit_request_headers(&edits.headers);
    }
    restrict_accept_encoding(host, forward, known);
    true
}

/// For a redacting request (its service redacts, and a secret is long enough to):
/// cuts the agent's `accept-encoding` to what [`crate::redact`] can decode, so that a
/// well-behaved upstream never answers with an encoding the filter must refuse. One
/// host call, only when the header has to change; none for other requests.
fn restrict_accept_encoding(
    host: &mut impl Host,
    forward: &Forward,
    headers: &crate::header_map::HeaderMap,
) {
    let redacting = forward
        .secrets
        .as_ref()
        .is_some_and(|secrets| !secrets.redact.is_empty());
    if !redacting {
        return;
    }
    if let Some(value) = redact::decodable_accept_encoding(headers.get("accept-encoding")) {
        host.set_request_header("accept-encoding", &value);
    }
}

/// Redacts a response's headers (one host call per header that changes) and says
/// how its body will be redacted: refuses the response (502
/// `response_not_redactable`, `Pause`) when a body follows, compressed in a way the
/// filter cannot decode, as it could not be scanned. When a body follows, its
/// `content-length` goes (the redacted body's length differs), and its
/// `content-encoding` too when the filter inflates it (the agent gets it plain).
fn redact_response_headers(
    host: &mut impl Host,
    log: &mut RequestLog,
    patterns: Patterns,
    headers: &crate::header_map::HeaderMap,
    end_of_stream: bool,
) -> (Flow, Option<ResponseBody>) {
    // Without a body (HEAD, 304, end of stream on the headers) the encoding does not
    // matter: nothing is decoded.
    let encoding = headers.get("content-encoding").filter(|_| !end_of_stream);
    let compression = match redact::compression(encoding) {
        Ok(compression) => compression,
        Err(encoding) => {
            let reject = reply::response_not_redactable(
                log.vault.as_deref().unwrap_or_default(),
                log.service.as_deref().unwrap_or_default(),
                &encoding,
            );
            log.error = Some(reject.code);
            log.response_status = Some(reject.status());
            host.stat(Stat::Denied(reject.code));
            publish(host, log);
            host.send_reject(&reject);
            return (Flow::Pause, Some(ResponseBody::Dropped));
        }
    };
    let mut redactions = 0u64;
    let mut changed: Vec<&[u8]> = Vec::new();
    for (name, value) in headers.pairs() {
        if name.starts_with(b":") || changed.contains(&name) {
            continue;
        }
        if patterns.redact(value).is_some() {
            changed.push(name);
        }
    }
    for name in changed {
        let values: Vec<Vec<u8>> = headers
            .pairs()
            .filter(|(n, _)| *n == name)
            .map(|(_, value)| match patterns.redact(value) {
                Some((redacted, count)) => {
                    redactions += count as u64;
                    redacted
                }
                None => value.to_vec(),
            })
            .collect();
        if let Ok(name) = std::str::from_utf8(name) {
            host.set_response_header(name, &values);
        }
    }
    if redactions > 0 {
        host.stat(Stat::Redacted(redactions));
        log.redactions = log.redactions.saturating_add(redactions);
        publish(host, log);
    }
    if end_of_stream {
        return (Flow::Continue, None);
    }
    // Masks keep the length; an inflated body's differs.
    if compression.is_some() {
        if headers.contains("content-length") {
            host.set_response_header("content-length", &[]);
        }
        host.set_response_header("content-encoding", &[]);
    }
    (
        Flow::Continue,
        Some(ResponseBody::Redacting {
            inflater: compression.map(|c| Box::new(Inflater::new(c))),
            redactor: Redactor::new(patterns),
            grpc: reply::is_grpc(headers.get("content-type")).then(GrpcFraming::default),
        }),
    )
}

/// A redacting request's response body, chunk by chunk.
#[derive(Debug)]
enum ResponseBody {
    /// Redacted as it passes, inflated first when compressed.
    Redacting {
        inflater: Option<Box<Inflater>>,
        redactor: Redactor,
        /// A gRPC response: everything is given out at each message's end.
        grpc: Option<GrpcFraming>,
    },
    /// Never passed on: the response was refused, or could not be inflated.
    Dropped,
}

impl ResponseBody {
    /// Replaces the current chunk (`size` bytes) with what may be given out; returns
    /// the redactions made.
    fn next_chunk(&mut self, host: &mut impl Host, size: usize, end_of_stream: bool) -> u64 {
        let ResponseBody::Redacting {
            inflater,
            redactor,
            grpc,
        } = self
        else {
            if size > 0 {
                host.set_response_body(size, &[]);
            }
            return 0;
        };
        // What the upstream sent may hold a secret: wiped once used (best effort).
        let chunk = host.response_body(size);
        let plain = match inflater.as_mut().map(|i| i.push(&chunk, end_of_stream)) {
            None => chunk,
            Some(Ok(plain)) => {
                crate::cache::wipe(chunk);
                plain
            }
            Some(Err(undecodable)) => {
                host.log(
                    LogLevel::Warn,
                    &format!(
                        "a redacting response's compressed body cannot be inflated ({}); \
                         its stream is reset",
                        undecodable.0
                    ),
                );
                crate::cache::wipe(chunk);
                host.set_response_body(size, &[]);
                host.reset_stream();
                *self = ResponseBody::Dropped;
                return 0;
            }
        };
        let before = redactor.count();
        let mut out = redactor.push(&plain);
        let message_end = grpc
            .as_mut()
            .is_some_and(|framing| framing.at_message_end_after(&plain));
        if end_of_stream || message_end {
            out.extend(redactor.finish());
        }
        // The common case, a body that arrives whole and holds no secret: the chunk
        // goes on as it is, without writing it back.
        if inflater.is_some() || out != plain {
            host.set_response_body(size, &out);
        }
        crate::cache::wipe(plain);
        (redactor.count() - before) as u64
    }
}

/// Answers the current request with `reject`.
fn refuse(host: &mut impl Host, log: &RefCell<RequestLog>, reject: &Reject) -> Flow {
    host.stat(Stat::Denied(reject.code));
    if let Ok(mut log) = log.try_borrow_mut() {
        log.error = Some(reject.code);
        publish(host, &log);
    }
    host.send_reject(reject);
    Flow::Pause
}

/// `request_log: "access_log"`: sets the request's log state (one host call), for
/// Envoy's access log. A request not started (never decided) is not logged, as in
/// `post` mode.
fn publish(host: &mut impl Host, log: &RequestLog) {
    if log.access_log && log.started_ms.is_some() {
        host.set_property(
            agent_vault_rules::LOG_STATE_PROPERTY,
            log.state().encode().as_bytes(),
        );
    }
}

/// [`publish`] for a shared log.
fn publish_log(host: &mut impl Host, log: &RefCell<RequestLog>) {
    if let Ok(log) = log.try_borrow() {
        publish(host, &log);
    }
}

/// Request `id` waits for `plan`'s credentials: it joins the flight for them, or
/// dispatches one from its own context (then the answer comes back to it). A dispatch
/// the host refuses fails the flight's waiters at once.
fn fetch(
    host: &mut impl Host,
    id: u32,
    log: &Rc<RefCell<RequestLog>>,
    worker: &mut Worker,
    plan: FetchPlan,
    now: u64,
) {
    let waiter = Waiter {
        context_id: id,
        plan,
        log: Rc::downgrade(log),
    };
    let Join::Dispatch(key, body) = worker.join_fetch(waiter, now) else {
        return;
    };
    let sent = host.dispatch_credentials(worker.config(), &body);
    host.stat(Stat::CalloutSent {
        kind: Callout::Fetch,
        token: sent.as_ref().ok().copied(),
    });
    match sent {
        Ok(token) => worker.fetch_dispatched(&key, token, id, now),
        Err(refused) => {
            host.log(
                LogLevel::Warn,
                &format!(
                    "cannot dispatch a credential fetch to cluster {:?} ({refused})",
                    worker.config().cluster
                ),
            );
            let completions =
                worker.fetch_failed(&key, "the control plane cluster is not reachable");
            apply_completions(host, id, worker.config(), completions);
        }
    }
}

/// Dispatches every orphaned flight again from the root, whose answers are never
/// dropped (see [`crate::flight`]), and every background refresh not sent yet.
fn redispatch_orphans(host: &mut impl Host, root_id: u32, worker: &mut Worker, now: u64) {
    for (key, body) in worker.orphans() {
        let sent = host.dispatch_credentials(worker.config(), &body);
        host.stat(Stat::CalloutSent {
            kind: Callout::Fetch,
            token: sent.as_ref().ok().copied(),
        });
        // A background refresh (refresh-ahead, crate::cache) rather than an orphan.
        if sent.is_ok() && worker.is_refresh(&key) {
            host.stat(Stat::CacheRefresh);
        }
        match sent {
            Ok(token) => worker.fetch_dispatched(&key, token, root_id, now),
            Err(refused) => {
                let completions = worker.fetch_failed(
                    &key,
                    &format!("cannot reach the control plane cluster ({refused})"),
                );
                apply_completions(host, root_id, worker.config(), completions);
            }
        }
    }
}

/// What a failed long-poll's log line says after the reason.
fn long_poll_failed(config: &Config, reason: &str) -> String {
    format!(
        "{reason} (to the long-poll; polling every {} ms until a poll succeeds)",
        config.snapshot_poll_ms
    )
}

/// Dispatches the snapshot long-poll if one may go out now (right after a usable
/// answer: see [`Worker::long_poll_due`]). A refusal is logged like a refused poll,
/// and the periodic poll takes over.
fn long_poll(host: &mut impl Host, worker: &mut Worker, now: u64) {
    let Some(headers) = worker.long_poll_due() else {
        return;
    };
    let sent = host.dispatch_poll(worker.config(), &headers, worker.long_poll_timeout_ms());
    host.stat(Stat::LongPollSent { sent: sent.is_ok() });
    if let Err(refused) = &sent {
        host.log(
            LogLevel::Debug,
            &format!(
                "cannot send the snapshot long-poll through cluster {:?} ({refused}); \
                 polling every {} ms",
                worker.config().cluster,
                worker.config().snapshot_poll_ms
            ),
        );
    }
    worker.long_poll_dispatched(sent.ok(), now);
}

/// Dispatches a snapshot poll if one is due.
fn poll(host: &mut impl Host, worker: &mut Worker, now: u64) {
    let Some(headers) = worker.poll_due(now) else {
        return;
    };
    let sent = host.dispatch_poll(
        worker.config(),
        &headers,
        worker.config().callout_timeout_ms,
    );
    host.stat(Stat::CalloutSent {
        kind: Callout::Poll,
        token: sent.as_ref().ok().copied(),
    });
    if let Err(refused) = &sent {
        host.log(
            LogLevel::Debug,
            &format!(
                "cannot poll the snapshot through cluster {:?} ({refused})",
                worker.config().cluster
            ),
        );
    }
    worker.poll_dispatched(sent.ok(), now);
}

fn post_logs(host: &mut impl Host, config: &Config, body: &[u8]) {
    if let Err(refused) = host.post_logs(config, body) {
        host.log(
            LogLevel::Debug,
            &format!(
                "could not send the request log to cluster {:?} ({refused}); records dropped",
                config.cluster
            ),
        );
    }
}

/// Asks the host for the root's tick period when the worker wants another one.
fn update_tick(host: &mut impl Host, tick_ms: &mut u64, worker: &Worker) {
    let period = worker.tick_period_ms();
    if period != *tick_ms {
        host.set_tick_period(period);
        *tick_ms = period;
    }
}

/// Handles a callout answer delivered to context `own_id`: a snapshot poll or a
/// credential fetch of this worker. Anything else (a log post's answer) is not even
/// read.
fn on_call_response(
    host: &mut impl Host,
    own_id: u32,
    worker: &mut Worker,
    token: u32,
    num_headers: usize,
    body_size: usize,
) {
    let is_poll = worker.is_poll(token);
    if !is_poll && !worker.is_fetch(token) {
        return;
    }
    let failures_before = worker.poll_failures();
    let response = host.call_response(num_headers, body_size);
    let now = host.now_ms();
    if is_poll {
        let long = worker.is_long_poll(token);
        let outcome = worker.on_poll_answer(
            token,
            response.status,
            response.from_control_plane,
            response.body,
            now,
        );
        let usable = matches!(
            outcome,
            PollOutcome::Loaded { .. } | PollOutcome::NotModified
        );
        if long {
            host.stat(Stat::LongPollAnswered { usable });
        } else {
            host.stat(Stat::CalloutAnswered { token, usable });
        }
        if let PollOutcome::Loaded { version, .. } = &outcome {
            host.stat(Stat::SnapshotLoaded { version });
        }
        let outcome = match outcome {
            PollOutcome::Invalid(reason) if long => {
                PollOutcome::Invalid(long_poll_failed(worker.config(), &reason))
            }
            PollOutcome::Unavailable(reason) if long => {
                PollOutcome::Unavailable(long_poll_failed(worker.config(), &reason))
            }
            outcome => outcome,
        };
        log_poll(host, outcome, failures_before);
        return;
    }
    let answer = Answer::classify(response.status, response.from_control_plane, response.body);
    let usable = !matches!(answer, Answer::Unavailable(_));
    host.stat(Stat::CalloutAnswered { token, usable });
    if let Answer::Unavailable(reason) = &answer {
        let message = if worker.is_refresh_token(token) {
            format!(
                "credential refresh failed: {reason}; the cached values stay until their \
                 ttl, then requests wait on a fetch"
            )
        } else {
            format!("credential fetch failed: {reason}; answering 503")
        };
        host.log(LogLevel::Warn, &message);
    }
    let completions = worker
        .on_fetch_answer(token, answer, now)
        .unwrap_or_default();
    apply_completions(host, own_id, worker.config(), completions);
}

/// Finishes waiting requests from the current callback, then makes `own_id` current
/// again. A waiter Envoy no longer knows is skipped.
fn apply_completions(
    host: &mut impl Host,
    own_id: u32,
    config: &Config,
    completions: Vec<Completion>,
) {
    if completions.is_empty() {
        return;
    }
    // Switching is a host call, so it is skipped when the waiter is the context the
    // answer was delivered to (the common case).
    let mut current = own_id;
    for completion in completions {
        if completion.context_id != current {
            if !host.switch_to(completion.context_id) {
                host.log(
                    LogLevel::Debug,
                    "a request waiting for a credential is gone",
                );
                continue;
            }
            current = completion.context_id;
        }
        match completion.decision {
            Decision::Forward(forward) => {
                // This request's headers again, in one call: then only the headers
                // that are there are removed.
                let known = host.request_headers();
                // Alive while Envoy knows the context (its `Http` holds it).
                let log = completion.log.upgrade().unwrap_or_default();
                if forward_request(host, config, &log, &forward, &known, false) {
                    host.resume();
                }
            }
            Decision::Reject(reject) => {
                host.stat(Stat::Denied(reject.code));
                // The flight wrote the error into the waiter's log.
                if let Some(log) = completion.log.upgrade() {
                    publish_log(host, &log);
                }
                host.send_reject(&reject);
            }
            Decision::Fetch(_) => {
                let reject = reply::control_plane_unavailable("internal");
                host.stat(Stat::Denied(reject.code));
                host.send_reject(&reject);
            }
        }
    }
    if current != own_id {
        let _ = host.switch_to(own_id);
    }
}

/// Logs a poll's outcome: the first failure and the recovery loudly, repeats quietly.
fn log_poll(host: &mut impl Host, outcome: PollOutcome, failures_before: u32) {
    let recovered = failures_before > 0;
    match outcome {
        PollOutcome::Loaded {
            version,
            first: true,
            counts: (vaults, agents),
            ..
        } => host.log(
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
            host.log(level, &format!("{what} rules snapshot version {version}"));
        }
        PollOutcome::NotModified => {
            if recovered {
                host.log(
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
            host.log(
                level,
                &format!("snapshot poll failed: {reason}; keeping the last good rules"),
            );
        }
        PollOutcome::Stale => {}
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::decide::tests::{basic, identity, ALICE, BOB, NOW_MS};
    use crate::host::fake::{Call, FakeHost};
    use crate::host::{CallResponse, TunnelInfo};
    use crate::snapshot::TokenHash;

    const ROOT: u32 = 1;
    /// The callout timeout of the default configuration.
    const TIMEOUT_MS: u64 = 2000;
    /// The first token a test's own callouts get (the first poll took the one before).
    const FIRST: u32 = FakeHost::FIRST_TOKEN + 1;

    /// One worker VM as Envoy runs it: its root context, the request contexts Envoy
    /// has not deleted, and the host.
    struct Vm {
        host: FakeHost,
        root: Root,
        requests: BTreeMap<u32, Http>,
    }

    impl Vm {
        /// Configured with `configuration`; its first poll not answered yet. Plain
        /// polling (`snapshot_wait_ms` 0) unless `configuration` sets the wait: the
        /// long-poll has tests of its own, the others count callouts without it.
        fn configured(configuration: &str) -> Vm {
            let mut fields: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(if configuration.trim().is_empty() {
                    "{}"
                } else {
                    configuration
                })
                .unwrap_or_else(|e| panic!("{configuration}: {e}"));
            fields
                .entry("snapshot_wait_ms")
                .or_insert(serde_json::Value::from(0));
            let configuration = serde_json::Value::Object(fields).to_string();
            let mut host = FakeHost::new(NOW_MS, ROOT);
            let mut root = Root::new(ROOT);
            assert!(root.configure(&mut host, configuration.as_bytes()));
            Vm {
                host,
                root,
                requests: BTreeMap::new(),
            }
        }

        /// Configured, with snapshot version 1 loaded; what the host saw so far is
        /// forgotten.
        fn running(configuration: &str) -> Vm {
            let mut vm = Vm::configured(configuration);
            vm.answer(ROOT, FakeHost::FIRST_TOKEN, snapshot("1"));
            vm.host.clear();
            vm
        }

        /// Request `id` from alice arrives: `GET path` on api.stripe.com, whose
        /// service needs `STRIPE_KEY`.
        fn request(&mut self, id: u32, path: &str) -> Flow {
            self.request_with(
                id,
                vec![
                    (":method", "GET".to_owned()),
                    (":authority", "api.stripe.com".to_owned()),
                    (":path", path.to_owned()),
                    ("proxy-authorization", basic(ALICE, "")),
                ],
            )
        }

        fn request_with(&mut self, id: u32, headers: Vec<(&'static str, String)>) -> Flow {
            self.host.headers.insert(id, headers);
            self.host.current = id;
            let mut http = self.root.new_request(id);
            let flow = http.on_request_headers(&mut self.host);
            self.requests.insert(id, http);
            flow
        }

        /// The answer to callout `token` reaches context `to`. The SDK drops it when
        /// Envoy has deleted that context.
        fn answer(&mut self, to: u32, token: u32, response: CallResponse) {
            let num_headers = usize::from(response.status.is_some());
            let body_size = response.body.len();
            self.host.current = to;
            self.host.response = Some(response);
            if to == ROOT {
                self.root
                    .on_call_response(&mut self.host, token, num_headers, body_size);
            } else if let Some(http) = self.requests.get_mut(&to) {
                http.on_call_response(&mut self.host, token, num_headers, body_size);
            }
        }

        fn tick(&mut self, now_ms: u64) {
            self.host.now_ms = now_ms;
            self.host.current = ROOT;
            self.root.on_tick(&mut self.host);
        }

        /// Response headers with `status` pass through request `id`, then it ends.
        fn finish(&mut self, id: u32, status: Option<u16>) {
            self.host.current = id;
            if let Some(status) = status {
                self.host.response_status.insert(id, status);
                self.host
                    .response_headers
                    .entry(id)
                    .or_default()
                    .push((":status", status.to_string()));
            }
            if let Some(http) = self.requests.get_mut(&id) {
                if status.is_some() {
                    http.on_response_headers(&mut self.host, true);
                }
                http.on_log(&mut self.host);
            }
            self.delete(id);
        }

        /// Envoy deletes context `id` (the request ended, or its client went away).
        fn delete(&mut self, id: u32) {
            self.host.gone.insert(id);
            self.requests.remove(&id);
        }

        /// The snapshot version the worker uses.
        fn root_version(&self) -> String {
            self.root
                .worker
                .as_ref()
                .map(|w| w.borrow().version().to_owned())
                .unwrap_or_default()
        }

        /// Takes what the host saw since the last call.
        fn calls(&mut self) -> Vec<Call> {
            self.host.stats.clear();
            self.host.logs.clear();
            std::mem::take(&mut self.host.calls)
        }
    }

    fn snapshot(version: &str) -> CallResponse {
        CallResponse {
            status: Some(200),
            from_control_plane: true,
            body: crate::worker::tests::body(version),
        }
    }

    fn control_plane(status: u16, body: &str) -> CallResponse {
        CallResponse {
            status: Some(status),
            from_control_plane: true,
            body: body.as_bytes().to_vec(),
        }
    }

    fn credentials(value: &str) -> CallResponse {
        control_plane(
            200,
            &format!(r#"{{"values":{{"STRIPE_KEY":"{value}"}},"missing":[]}}"#),
        )
    }

    /// Envoy's own answer when the control plane's socket is down.
    fn envoy_503() -> CallResponse {
        CallResponse {
            status: Some(503),
            from_control_plane: false,
            body: b"upstream connect error".to_vec(),
        }
    }

    fn read(context: u32) -> Call {
        Call::ReadRequestHeaders { context }
    }

    fn fetch_from(from: u32, token: Option<u32>) -> Call {
        Call::DispatchCredentials {
            from,
            keys: vec!["STRIPE_KEY".to_owned()],
            token,
        }
    }

    fn forward(context: u32, path: &str, value: &str) -> Call {
        Call::Forward {
            context,
            known_path: Some(path.to_owned()),
            inject: vec![("authorization".to_owned(), format!("Bearer {value}"))],
            route: "tls",
            tunnel: None,
        }
    }

    fn reject(context: u32, status: u16, code: &'static str) -> Call {
        Call::Reject {
            context,
            status,
            code,
        }
    }

    fn switch(context: u32) -> Call {
        Call::SwitchTo {
            context,
            known: true,
        }
    }

    fn resume(context: u32) -> Call {
        Call::Resume { context }
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn configuring_defines_the_stats_polls_at_once_and_ticks_fast_until_a_snapshot_arrives() {
        let mut vm = Vm::configured("");
        assert_eq!(
            vm.calls(),
            vec![
                Call::DefineStats,
                Call::DispatchPoll {
                    if_none_match: None,
                    token: Some(FakeHost::FIRST_TOKEN),
                },
                Call::SetTickPeriod(crate::worker::STARTUP_TICK_MS),
            ]
        );
        vm.answer(ROOT, FakeHost::FIRST_TOKEN, snapshot("1"));
        assert_eq!(
            vm.host.calls,
            vec![Call::ReadCallResponse, Call::SetTickPeriod(1000)],
            "a snapshot slows the tick to the poll period"
        );
        assert_eq!(
            vm.host.stats,
            strings(&["100 answered usable", "snapshot 1"])
        );
    }

    #[test]
    fn the_tick_period_is_set_only_when_the_worker_wants_another() {
        let mut vm = Vm::running(r#"{"snapshot_poll_ms": 1000, "log_flush_ms": 500}"#);
        vm.tick(NOW_MS + 100);
        assert_eq!(
            vm.calls(),
            vec![Call::FlushStats {
                max_callout_ms: TIMEOUT_MS + GRACE_MS
            }],
            "500 ms was set when the snapshot arrived"
        );
        let mut vm = Vm::configured("");
        vm.calls();
        vm.answer(ROOT, FakeHost::FIRST_TOKEN, envoy_503());
        assert_eq!(
            vm.calls(),
            vec![Call::ReadCallResponse],
            "still no snapshot: the startup period stays"
        );
    }

    #[test]
    fn a_configuration_that_does_not_parse_is_refused_and_logged() {
        let mut host = FakeHost::new(NOW_MS, ROOT);
        let mut root = Root::new(ROOT);
        assert!(!root.configure(&mut host, br#"{"snapshot_poll":1}"#));
        assert!(host.calls.is_empty(), "no poll, no stats: {:?}", host.calls);
        assert!(matches!(
            host.logs.as_slice(),
            [(LogLevel::Error, message)] if message.starts_with("invalid plugin configuration")
        ));
    }

    #[test]
    fn requests_get_503_while_the_filter_is_not_configured() {
        let mut host = FakeHost::new(NOW_MS, 2);
        let mut http = Root::new(ROOT).new_request(2);
        assert_eq!(http.on_request_headers(&mut host), Flow::Pause);
        assert_eq!(
            host.calls,
            vec![read(2), reject(2, 503, "control_plane_unavailable")]
        );
        assert_eq!(host.stats, strings(&["denied control_plane_unavailable"]));
    }

    #[test]
    fn a_cached_credential_is_injected_with_one_header_read_and_one_forward() {
        let mut vm = Vm::running("");
        vm.request(2, "/warm");
        vm.answer(2, FIRST, credentials("sk_1"));
        vm.calls();
        assert_eq!(vm.request(3, "/v1/charges"), Flow::Continue);
        assert_eq!(
            vm.host.calls,
            vec![read(3), forward(3, "/v1/charges", "sk_1")],
            "the hot path makes no other host call"
        );
        assert_eq!(vm.host.stats, strings(&["forwarded injected on arrival"]));
        assert!(vm.host.logs.is_empty());
    }

    #[test]
    fn a_refused_request_is_answered_from_its_own_context_and_paused() {
        let mut vm = Vm::running("");
        let flow = vm.request_with(
            2,
            vec![
                (":method", "GET".to_owned()),
                (":authority", "api.stripe.com".to_owned()),
                (":path", "/".to_owned()),
            ],
        );
        assert_eq!(flow, Flow::Pause);
        assert_eq!(
            vm.host.calls,
            vec![read(2), reject(2, 407, "proxy_auth_required")]
        );
        assert_eq!(vm.host.stats, strings(&["denied proxy_auth_required"]));
    }

    #[test]
    fn a_miss_pauses_the_request_and_its_own_answer_injects_and_resumes_it_without_switching() {
        let mut vm = Vm::running("");
        assert_eq!(vm.request(2, "/a"), Flow::Pause);
        assert_eq!(vm.host.calls, vec![read(2), fetch_from(2, Some(FIRST))]);
        assert_eq!(
            vm.host.stats,
            strings(&["cache miss", &format!("fetch {FIRST} sent")])
        );
        vm.calls();
        vm.answer(2, FIRST, credentials("sk_1"));
        assert_eq!(
            vm.host.calls,
            vec![
                Call::ReadCallResponse,
                read(2),
                forward(2, "/a", "sk_1"),
                resume(2),
            ]
        );
        assert_eq!(
            vm.host.stats,
            strings(&[
                &format!("{FIRST} answered usable"),
                "forwarded injected after a fetch"
            ])
        );
    }

    #[test]
    fn concurrent_misses_make_one_fetch_whose_answer_finishes_every_waiter_and_switches_back() {
        let mut vm = Vm::running("");
        vm.request(2, "/a");
        vm.calls();
        assert_eq!(vm.request(3, "/b"), Flow::Pause);
        assert_eq!(vm.request(4, "/c"), Flow::Pause);
        assert_eq!(vm.calls(), vec![read(3), read(4)], "they join, no callout");
        vm.answer(2, FIRST, credentials("sk_1"));
        assert_eq!(
            vm.calls(),
            vec![
                Call::ReadCallResponse,
                read(2),
                forward(2, "/a", "sk_1"),
                resume(2),
                switch(3),
                read(3),
                forward(3, "/b", "sk_1"),
                resume(3),
                switch(4),
                read(4),
                forward(4, "/c", "sk_1"),
                resume(4),
                switch(2),
            ]
        );
    }

    #[test]
    fn an_answer_for_a_gone_owner_is_fetched_again_by_the_root_and_finishes_the_other_waiters_and_switches_back(
    ) {
        let mut vm = Vm::running("");
        vm.request(2, "/a");
        vm.request(3, "/b");
        vm.request(4, "/c");
        vm.delete(2); // its client hung up: the SDK would drop the answer
        vm.answer(2, FIRST, credentials("too late"));
        vm.calls();
        vm.tick(NOW_MS + 100);
        assert_eq!(
            vm.calls(),
            vec![
                fetch_from(ROOT, Some(FIRST + 1)),
                Call::FlushStats {
                    max_callout_ms: TIMEOUT_MS + GRACE_MS
                },
            ],
            "the root re-dispatches the orphan"
        );
        vm.tick(NOW_MS + 200);
        assert!(
            !vm.calls().contains(&fetch_from(ROOT, Some(FIRST + 2))),
            "once"
        );
        vm.answer(ROOT, FIRST, credentials("stale"));
        assert_eq!(vm.calls(), vec![], "the old token is no fetch any more");
        vm.answer(ROOT, FIRST + 1, credentials("sk_1"));
        assert_eq!(
            vm.calls(),
            vec![
                Call::ReadCallResponse,
                switch(3),
                read(3),
                forward(3, "/b", "sk_1"),
                resume(3),
                switch(4),
                read(4),
                forward(4, "/c", "sk_1"),
                resume(4),
                switch(ROOT),
            ]
        );
    }

    #[test]
    fn a_fetch_whose_every_waiter_is_gone_is_dropped_and_not_fetched_again() {
        let mut vm = Vm::running("");
        vm.request(2, "/a");
        vm.delete(2);
        vm.calls();
        vm.tick(NOW_MS + 100);
        assert_eq!(
            vm.calls(),
            vec![Call::FlushStats {
                max_callout_ms: TIMEOUT_MS + GRACE_MS
            }]
        );
    }

    #[test]
    fn a_refused_dispatch_answers_the_request_503_at_once() {
        let mut vm = Vm::running("");
        vm.host.refuse_callouts = Some("BadArgument");
        assert_eq!(vm.request(2, "/a"), Flow::Pause);
        assert_eq!(
            vm.host.calls,
            vec![
                read(2),
                fetch_from(2, None),
                reject(2, 503, "control_plane_unavailable"),
            ]
        );
        assert_eq!(
            vm.host.logs,
            vec![(
                LogLevel::Warn,
                "cannot dispatch a credential fetch to cluster \"agent_vault_control_plane\" \
                 (BadArgument)"
                    .to_owned()
            )]
        );
        assert_eq!(
            vm.host.stats,
            strings(&[
                "cache miss",
                "fetch not sent",
                "denied control_plane_unavailable"
            ])
        );
        vm.host.refuse_callouts = None;
        vm.calls();
        vm.request(3, "/b");
        assert_eq!(
            vm.calls(),
            vec![read(3), fetch_from(3, Some(FIRST))],
            "the failed flight is gone: the next miss dispatches anew"
        );
    }

    #[test]
    fn a_failed_dispatch_answers_every_waiter_503_and_switches_back() {
        let mut vm = Vm::running("");
        vm.request(2, "/a");
        vm.request(3, "/b");
        vm.request(4, "/c");
        vm.delete(2);
        vm.calls();
        vm.host.refuse_callouts = Some("InternalFailure");
        vm.tick(NOW_MS + 100);
        assert_eq!(
            vm.calls(),
            vec![
                fetch_from(ROOT, None),
                switch(3),
                reject(3, 503, "control_plane_unavailable"),
                switch(4),
                reject(4, 503, "control_plane_unavailable"),
                switch(ROOT),
                Call::FlushStats {
                    max_callout_ms: TIMEOUT_MS + GRACE_MS
                },
            ]
        );
        vm.host.refuse_callouts = None;
        vm.finish(3, None);
        vm.tick(NOW_MS + 1000);
        let posted = vm.calls().into_iter().find_map(|call| match call {
            Call::PostLogs { records, .. } => Some(records),
            _ => None,
        });
        assert_eq!(
            posted,
            Some(strings(&["GET /b 503 control_plane_unavailable"])),
            "the waiter's log says why"
        );
    }

    #[test]
    fn a_completion_for_a_context_envoy_no_longer_knows_is_skipped() {
        let mut vm = Vm::running("");
        vm.request(2, "/a");
        vm.request(3, "/b");
        vm.request(4, "/c");
        vm.host.gone.insert(3); // deleted, but the SDK has not told the filter yet
        vm.calls();
        vm.answer(2, FIRST, credentials("sk_1"));
        assert_eq!(
            vm.host.calls,
            vec![
                Call::ReadCallResponse,
                read(2),
                forward(2, "/a", "sk_1"),
                resume(2),
                Call::SwitchTo {
                    context: 3,
                    known: false
                },
                switch(4),
                read(4),
                forward(4, "/c", "sk_1"),
                resume(4),
                switch(2),
            ]
        );
        assert_eq!(
            vm.host.logs,
            vec![(
                LogLevel::Debug,
                "a request waiting for a credential is gone".to_owned()
            )]
        );
    }

    #[test]
    fn a_poll_answer_is_not_treated_as_a_fetch() {
        let mut vm = Vm::running("");
        vm.request(2, "/a");
        vm.tick(NOW_MS + 1000);
        let poll = FIRST + 1;
        assert!(vm.calls().contains(&Call::DispatchPoll {
            if_none_match: Some("\"1\"".to_owned()),
            token: Some(poll),
        }));
        vm.answer(ROOT, poll, control_plane(304, ""));
        assert_eq!(
            vm.calls(),
            vec![Call::ReadCallResponse],
            "the waiting request is left alone"
        );
        vm.answer(2, FIRST, credentials("sk_1"));
        assert!(
            vm.calls().contains(&resume(2)),
            "its own answer finishes it"
        );
    }

    #[test]
    fn an_answer_that_is_neither_a_poll_nor_a_fetch_is_not_even_read() {
        let mut vm = Vm::running(r#"{"log_batch_max": 1}"#);
        vm.request(2, "/a");
        vm.answer(2, FIRST, credentials("sk_1"));
        vm.finish(2, Some(200));
        let log_post = vm.host.next_token() - 1;
        assert_eq!(
            vm.calls().last(),
            Some(&Call::PostLogs {
                records: strings(&["GET /a 200"]),
                sent: true
            })
        );
        vm.answer(ROOT, log_post, control_plane(204, ""));
        assert_eq!(vm.calls(), vec![]);
    }

    #[test]
    fn an_unusable_fetch_answer_is_logged_and_answers_every_waiter_503() {
        let mut vm = Vm::running("");
        vm.request(2, "/a");
        vm.request(3, "/b");
        vm.calls();
        vm.answer(2, FIRST, envoy_503());
        assert_eq!(
            vm.host.calls,
            vec![
                Call::ReadCallResponse,
                reject(2, 503, "control_plane_unavailable"),
                switch(3),
                reject(3, 503, "control_plane_unavailable"),
                switch(2),
            ]
        );
        assert_eq!(
            vm.host.logs,
            vec![(
                LogLevel::Warn,
                "credential fetch failed: no answer from the control plane (Envoy replied 503); \
                 answering 503"
                    .to_owned()
            )]
        );
        assert_eq!(
            vm.host.stats.first().map(String::as_str),
            Some(format!("{FIRST} answered unusable").as_str())
        );
    }

    #[test]
    fn a_403_from_the_control_plane_answers_every_waiter_407() {
        let mut vm = Vm::running("");
        vm.request(2, "/a");
        vm.request(3, "/b");
        vm.calls();
        vm.answer(2, FIRST, control_plane(403, r#"{"error":"forbidden"}"#));
        assert_eq!(
            vm.calls(),
            vec![
                Call::ReadCallResponse,
                reject(2, 407, "invalid_token"),
                switch(3),
                reject(3, 407, "invalid_token"),
                switch(2),
            ]
        );
    }

    #[test]
    fn flights_without_an_answer_in_time_are_answered_503_on_the_tick() {
        let mut vm = Vm::running("");
        vm.request(2, "/a");
        vm.request(3, "/b");
        vm.calls();
        vm.tick(NOW_MS + TIMEOUT_MS + GRACE_MS);
        assert!(
            !vm.host
                .calls
                .iter()
                .any(|c| matches!(c, Call::Reject { .. })),
            "not before the timeout and grace"
        );
        vm.calls();
        vm.tick(NOW_MS + TIMEOUT_MS + GRACE_MS + 1);
        assert_eq!(
            vm.host.logs.first(),
            Some(&(
                LogLevel::Warn,
                "2 request(s) got no credential answer in time; answered 503".to_owned()
            ))
        );
        let calls = vm.calls();
        assert_eq!(
            calls.get(..5),
            Some(
                &[
                    switch(2),
                    reject(2, 503, "control_plane_unavailable"),
                    switch(3),
                    reject(3, 503, "control_plane_unavailable"),
                    switch(ROOT),
                ][..]
            )
        );
    }

    #[test]
    fn the_request_log_is_posted_when_the_batch_is_full_or_on_the_tick_when_due() {
        let mut vm = Vm::running(r#"{"log_batch_max": 2}"#);
        let refused = |path: &str| {
            vec![
                (":method", "GET".to_owned()),
                (":authority", "api.stripe.com".to_owned()),
                (":path", path.to_owned()),
            ]
        };
        vm.request_with(2, refused("/a?key=secret"));
        vm.finish(2, None);
        vm.request_with(3, refused("/b"));
        vm.calls();
        vm.finish(3, Some(407));
        assert_eq!(
            vm.calls(),
            vec![
                Call::ReadResponseStatus { context: 3 },
                Call::PostLogs {
                    records: strings(&[
                        "GET /a 407 proxy_auth_required",
                        "GET /b 407 proxy_auth_required"
                    ]),
                    sent: true,
                }
            ],
            "full at two records; never a query string"
        );
        vm.request_with(4, refused("/c"));
        vm.finish(4, None);
        vm.tick(NOW_MS + 400);
        assert!(!vm
            .calls()
            .iter()
            .any(|c| matches!(c, Call::PostLogs { .. })));
        vm.host.refuse_callouts = Some("BadArgument");
        vm.tick(NOW_MS + 1000);
        assert!(vm.host.calls.contains(&Call::PostLogs {
            records: strings(&["GET /c 407 proxy_auth_required"]),
            sent: false,
        }));
        assert!(vm.host.logs.contains(&(
            LogLevel::Debug,
            "could not send the request log to cluster \"agent_vault_control_plane\" \
             (BadArgument); records dropped"
                .to_owned()
        )));
    }

    #[test]
    fn the_response_status_goes_into_the_request_log() {
        // Stripe's service redacts responses (the default), so the status comes with
        // every response header, in one read.
        let mut vm = Vm::running(r#"{"log_batch_max": 1}"#);
        vm.request(2, "/a");
        vm.answer(2, FIRST, credentials("sk_1"));
        vm.calls();
        vm.finish(2, Some(201));
        assert_eq!(
            vm.calls(),
            vec![
                Call::ReadResponseHeaders { context: 2 },
                Call::PostLogs {
                    records: strings(&["GET /a 201"]),
                    sent: true,
                },
            ]
        );
    }

    #[test]
    fn a_403_from_envoys_destination_check_is_logged_and_counted_as_destination_forbidden() {
        let mut vm = Vm::running(r#"{"log_batch_max": 1}"#);
        vm.request(2, "/a");
        vm.answer(2, FIRST, credentials("sk_1"));
        vm.calls();
        vm.host
            .response_code_details
            .insert(2, "rbac_access_denied_matched_policy[none]".into());
        vm.finish(2, Some(403));
        assert_eq!(vm.host.stats, strings(&["denied destination_forbidden"]));
        assert_eq!(
            vm.calls(),
            vec![
                Call::ReadResponseHeaders { context: 2 },
                Call::ReadResponseCodeDetails { context: 2 },
                Call::PostLogs {
                    records: strings(&["GET /a 403 destination_forbidden"]),
                    sent: true,
                },
            ]
        );
        // The upstream's own 403 is just a status.
        vm.request(3, "/b");
        vm.calls();
        vm.finish(3, Some(403));
        assert_eq!(
            vm.calls(),
            vec![
                Call::ReadResponseHeaders { context: 3 },
                Call::ReadResponseCodeDetails { context: 3 },
                Call::PostLogs {
                    records: strings(&["GET /b 403"]),
                    sent: true,
                },
            ]
        );
    }

    #[test]
    fn poll_outcomes_are_logged_loudly_once_and_quietly_while_they_repeat() {
        let mut vm = Vm::configured("");
        vm.answer(ROOT, FakeHost::FIRST_TOKEN, snapshot("1"));
        assert_eq!(
            vm.host.logs,
            vec![(
                LogLevel::Info,
                "loaded rules snapshot version 1 (1 vaults, 1 agents)".to_owned()
            )]
        );
        let garbage = control_plane(200, "{not json");
        // (behaviour, answer, expected log level and start of the line)
        type Case<'a> = (&'a str, CallResponse, Option<(LogLevel, &'a str)>);
        #[rustfmt::skip]
        let cases: Vec<Case<'_>> = vec![
            ("304 is routine", control_plane(304, ""), None),
            ("the first failure is a warning", envoy_503(), Some((LogLevel::Warn, "snapshot poll failed: no answer"))),
            ("a repeated failure is quiet", envoy_503(), Some((LogLevel::Debug, "snapshot poll failed: no answer"))),
            ("a 304 after failures is a recovery", control_plane(304, ""), Some((LogLevel::Info, "the control plane answers again"))),
            ("an invalid snapshot is a failure too", garbage, Some((LogLevel::Warn, "snapshot poll failed: the control plane sent a snapshot that does not parse"))),
            ("a new version after failures is a recovery", snapshot("2"), Some((LogLevel::Info, "now using rules snapshot version 2"))),
            ("the same version again is routine", snapshot("2"), Some((LogLevel::Debug, "reloaded rules snapshot version 2"))),
            ("a new version is routine", snapshot("3"), Some((LogLevel::Debug, "now using rules snapshot version 3"))),
        ];
        let mut now = NOW_MS;
        for (behaviour, answer, expected) in cases {
            now += 1000;
            vm.calls();
            vm.tick(now);
            let token = vm.host.next_token() - 1;
            assert!(
                matches!(vm.host.calls.first(), Some(Call::DispatchPoll { token: Some(t), .. }) if *t == token),
                "{behaviour}: polled"
            );
            vm.calls();
            vm.answer(ROOT, token, answer);
            let logged: Vec<(LogLevel, &str)> = vm
                .host
                .logs
                .iter()
                .map(|(level, line)| (*level, line.as_str()))
                .collect();
            match expected {
                None => assert_eq!(logged, vec![], "{behaviour}"),
                Some((level, start)) => assert!(
                    matches!(logged.as_slice(), [(l, line)] if *l == level && line.starts_with(start)),
                    "{behaviour}: {logged:?}"
                ),
            }
        }
    }

    #[test]
    fn a_poll_the_host_refuses_is_logged_quietly_and_tried_again_on_the_next_tick() {
        let mut vm = Vm::running("");
        vm.host.refuse_callouts = Some("BadArgument");
        vm.tick(NOW_MS + 1000);
        assert_eq!(
            vm.host.calls.first(),
            Some(&Call::DispatchPoll {
                if_none_match: Some("\"1\"".to_owned()),
                token: None
            })
        );
        assert_eq!(
            vm.host.logs,
            vec![(
                LogLevel::Debug,
                "cannot poll the snapshot through cluster \"agent_vault_control_plane\" \
                 (BadArgument)"
                    .to_owned()
            )]
        );
        assert_eq!(vm.host.stats, strings(&["poll not sent"]));
        vm.host.refuse_callouts = None;
        vm.calls();
        vm.tick(NOW_MS + 2000);
        assert!(matches!(
            vm.host.calls.first(),
            Some(Call::DispatchPoll { token: Some(_), .. })
        ));
    }

    // --- The snapshot long-poll -------------------------------------------------------

    const LONG_POLL: &str = r#"{"snapshot_wait_ms": 25000}"#;

    fn long_poll(if_none_match: &str, token: Option<u32>) -> Call {
        Call::DispatchLongPoll {
            path: "/v1/dataplane/snapshot?wait_ms=25000".to_owned(),
            if_none_match: Some(format!("\"{if_none_match}\"")),
            // The wait plus the callout timeout.
            timeout_ms: 27_000,
            token,
        }
    }

    /// The polls among the calls since the last look (plain and long).
    fn polls(vm: &mut Vm) -> Vec<Call> {
        vm.calls()
            .into_iter()
            .filter(|c| matches!(c, Call::DispatchPoll { .. } | Call::DispatchLongPoll { .. }))
            .collect()
    }

    #[test]
    fn the_long_poll_goes_out_with_the_first_snapshot_and_again_from_each_answer_and_no_tick_adds_a_poll(
    ) {
        let mut vm = Vm::configured(LONG_POLL);
        vm.calls();
        vm.answer(ROOT, FakeHost::FIRST_TOKEN, snapshot("1"));
        assert_eq!(polls(&mut vm), vec![long_poll("1", Some(FIRST))]);
        // Ticks go on (logs, stats) but send no poll while the long-poll is held, even
        // long past the callout timeout.
        for now in [NOW_MS + 1000, NOW_MS + 5000, NOW_MS + 26_000] {
            vm.tick(now);
            assert_eq!(polls(&mut vm), vec![], "at {now}");
        }
        // A change: the answer comes early, with the new version, and the next
        // long-poll (waiting on that version) goes out from the same callback.
        vm.host.now_ms = NOW_MS + 26_500;
        vm.answer(ROOT, FIRST, snapshot("2"));
        assert_eq!(polls(&mut vm), vec![long_poll("2", Some(FIRST + 1))]);
        assert_eq!(vm.root_version(), "2");
        // Nothing changed for the whole wait: 304, and the next one at once.
        vm.host.now_ms = NOW_MS + 51_500;
        vm.answer(ROOT, FIRST + 1, control_plane(304, ""));
        assert_eq!(polls(&mut vm), vec![long_poll("2", Some(FIRST + 2))]);
        assert!(vm.host.logs.is_empty(), "{:?}", vm.host.logs);
    }

    #[test]
    fn a_new_version_from_the_long_poll_drops_the_cached_credentials_at_once() {
        let mut vm = Vm::configured(LONG_POLL);
        vm.answer(ROOT, FakeHost::FIRST_TOKEN, snapshot("1"));
        vm.calls();
        // A fetch (token FIRST + 1) fills the cache.
        assert_eq!(vm.request(2, "/a"), Flow::Pause);
        vm.answer(2, FIRST + 1, credentials("sk_1"));
        vm.finish(2, Some(200));
        assert_eq!(vm.request(3, "/b"), Flow::Continue, "served from the cache");
        vm.finish(3, Some(200));
        vm.calls();
        vm.answer(ROOT, FIRST, snapshot("2"));
        assert_eq!(vm.request(4, "/c"), Flow::Pause, "the cache was dropped");
        assert!(vm
            .calls()
            .iter()
            .any(|c| matches!(c, Call::DispatchCredentials { from: 4, .. })));
    }

    #[test]
    fn a_failed_long_poll_falls_back_to_the_periodic_poll_whose_success_brings_it_back() {
        // (behaviour, answer to the long-poll, log line)
        let cases = [
            (
                "Envoy's 503 (socket down)",
                envoy_503(),
                "no answer from the control plane (Envoy replied 503)",
            ),
            (
                "Envoy's timeout: no headers",
                CallResponse::default(),
                "no status in the answer",
            ),
            (
                "the control plane's 500",
                control_plane(500, ""),
                "the control plane answered 500",
            ),
            (
                "a 400 (a wait it refuses)",
                control_plane(400, "{}"),
                "the control plane answered 400",
            ),
        ];
        for (behaviour, answer, reason) in cases {
            let mut vm = Vm::configured(r#"{"snapshot_wait_ms": 25000, "snapshot_poll_ms": 1000}"#);
            vm.answer(ROOT, FakeHost::FIRST_TOKEN, snapshot("1"));
            vm.calls();
            vm.host.now_ms = NOW_MS + 300;
            vm.answer(ROOT, FIRST, answer);
            assert!(
                vm.host
                    .logs
                    .iter()
                    .any(|(_, line)| line.contains(reason) && line.contains("long-poll")),
                "{behaviour}: {:?}",
                vm.host.logs
            );
            assert_eq!(polls(&mut vm), vec![], "{behaviour}: no long-poll at once");
            vm.answer(ROOT, FIRST, snapshot("1"));
            assert_eq!(
                polls(&mut vm),
                vec![],
                "{behaviour}: a late answer is stale"
            );
            vm.tick(NOW_MS + 1000);
            assert_eq!(
                polls(&mut vm),
                vec![Call::DispatchPoll {
                    if_none_match: Some("\"1\"".to_owned()),
                    token: Some(FIRST + 1)
                }],
                "{behaviour}: the periodic poll"
            );
            vm.tick(NOW_MS + 1500);
            assert_eq!(polls(&mut vm), vec![], "{behaviour}: one poll at a time");
            vm.host.now_ms = NOW_MS + 1600;
            vm.answer(ROOT, FIRST + 1, control_plane(304, ""));
            assert_eq!(
                polls(&mut vm),
                vec![long_poll("1", Some(FIRST + 2))],
                "{behaviour}: back to the long-poll"
            );
        }
        // The failure is logged once, loudly, saying what happens next.
        let mut vm = Vm::configured(LONG_POLL);
        vm.answer(ROOT, FakeHost::FIRST_TOKEN, snapshot("1"));
        vm.calls();
        vm.answer(ROOT, FIRST, envoy_503());
        assert_eq!(
            vm.host.logs,
            vec![(
                LogLevel::Warn,
                "snapshot poll failed: no answer from the control plane (Envoy replied 503) \
                 (to the long-poll; polling every 1000 ms until a poll succeeds); keeping \
                 the last good rules"
                    .to_owned()
            )]
        );
        assert_eq!(vm.host.stats, strings(&["long-poll answered unusable"]));
    }

    #[test]
    fn an_early_answer_without_news_does_not_send_the_next_long_poll_at_once() {
        // A control plane that does not hold long-polls (or is stopping) answers 304
        // at once: sending the next one from that answer would spin.
        for early in [control_plane(304, ""), snapshot("1")] {
            let mut vm = Vm::configured(LONG_POLL);
            vm.answer(ROOT, FakeHost::FIRST_TOKEN, snapshot("1"));
            vm.calls();
            vm.host.now_ms = NOW_MS + 5;
            vm.answer(ROOT, FIRST, early);
            assert_eq!(polls(&mut vm), vec![]);
            assert!(vm.host.logs.is_empty(), "not a failure: {:?}", vm.host.logs);
            vm.tick(NOW_MS + 1000);
            assert!(matches!(
                polls(&mut vm).as_slice(),
                [Call::DispatchPoll { token: Some(_), .. }]
            ));
        }
    }

    #[test]
    fn a_long_poll_the_host_refuses_falls_back_to_the_periodic_poll() {
        let mut vm = Vm::configured(LONG_POLL);
        vm.calls();
        vm.host.refuse_callouts = Some("BadArgument");
        vm.answer(ROOT, FakeHost::FIRST_TOKEN, snapshot("1"));
        assert!(vm.host.stats.contains(&"long-poll not sent".to_owned()));
        assert_eq!(
            vm.host.logs.last(),
            Some(&(
                LogLevel::Debug,
                "cannot send the snapshot long-poll through cluster \"agent_vault_control_plane\" \
                 (BadArgument); polling every 1000 ms"
                    .to_owned()
            ))
        );
        assert_eq!(polls(&mut vm), vec![long_poll("1", None)]);
        vm.host.refuse_callouts = None;
        vm.tick(NOW_MS + 1000);
        assert!(matches!(
            polls(&mut vm).as_slice(),
            [Call::DispatchPoll { token: Some(_), .. }]
        ));
    }

    #[test]
    fn an_unanswered_long_poll_frees_its_slot_after_the_wait_and_the_callout_timeout() {
        let mut vm = Vm::configured(LONG_POLL);
        vm.answer(ROOT, FakeHost::FIRST_TOKEN, snapshot("1"));
        vm.calls();
        vm.tick(NOW_MS + 27_000 + GRACE_MS);
        assert_eq!(polls(&mut vm), vec![]);
        vm.tick(NOW_MS + 27_000 + GRACE_MS + 1);
        assert!(matches!(
            polls(&mut vm).as_slice(),
            [Call::DispatchPoll { token: Some(_), .. }]
        ));
    }

    #[test]
    fn a_wait_of_0_is_plain_polling() {
        let mut vm = Vm::configured(r#"{"snapshot_wait_ms": 0}"#);
        vm.calls();
        vm.answer(ROOT, FakeHost::FIRST_TOKEN, snapshot("1"));
        assert_eq!(polls(&mut vm), vec![]);
        vm.tick(NOW_MS + 1000);
        assert_eq!(
            polls(&mut vm),
            vec![Call::DispatchPoll {
                if_none_match: Some("\"1\"".to_owned()),
                token: Some(FIRST)
            }]
        );
        vm.answer(ROOT, FIRST, control_plane(304, ""));
        assert_eq!(polls(&mut vm), vec![]);
    }

    #[test]
    fn the_default_configuration_long_polls() {
        let mut host = FakeHost::new(NOW_MS, ROOT);
        let mut root = Root::new(ROOT);
        assert!(root.configure(&mut host, b""));
        host.response = Some(snapshot("1"));
        root.on_call_response(&mut host, FakeHost::FIRST_TOKEN, 1, 1);
        assert!(host
            .calls
            .iter()
            .any(|c| matches!(c, Call::DispatchLongPoll { token: Some(_), .. })));
    }

    fn connect_as(token: &str, authority: &str) -> Vec<(&'static str, String)> {
        vec![
            (":method", "CONNECT".to_owned()),
            (":authority", authority.to_owned()),
            ("proxy-authorization", basic(token, "")),
        ]
    }

    /// A request inside a tunnel: `GET path` on api.stripe.com, with whatever proxy
    /// credential the agent adds inside.
    fn inside(path: &str, proxy_authorization: Option<String>) -> Vec<(&'static str, String)> {
        let mut headers = vec![
            (":method", "GET".to_owned()),
            (":authority", "api.stripe.com".to_owned()),
            (":path", path.to_owned()),
        ];
        headers.extend(proxy_authorization.map(|p| ("proxy-authorization", p)));
        headers
    }

    fn alices_tunnel() -> TunnelInfo {
        TunnelInfo {
            identity: Some(identity(ALICE, "default", "api.stripe.com", 443)),
            sni: Some("api.stripe.com".to_owned()),
            tls: true,
        }
    }

    #[test]
    fn a_connect_is_let_through_with_the_proven_identity_and_no_callout() {
        let mut vm = Vm::running("");
        let flow = vm.request_with(2, connect_as(ALICE, "api.stripe.com:443"));
        assert_eq!(flow, Flow::Continue);
        assert_eq!(
            vm.host.calls,
            vec![
                read(2),
                Call::Forward {
                    context: 2,
                    known_path: None,
                    inject: vec![],
                    route: "tunnel",
                    tunnel: Some(identity(ALICE, "default", "api.stripe.com", 443)),
                }
            ],
            "the agents' listener never reads a tunnel's state"
        );
        assert_eq!(vm.host.stats, strings(&["tunnel tunnel"]));
    }

    #[test]
    fn a_connect_for_a_host_no_service_names_is_refused_403() {
        let mut vm = Vm::running("");
        let flow = vm.request_with(2, connect_as(ALICE, "evil.example.org:443"));
        assert_eq!(flow, Flow::Pause);
        assert_eq!(vm.calls(), vec![read(2), reject(2, 403, "forbidden")]);
    }

    #[test]
    fn inside_a_tunnel_the_agent_is_the_one_envoy_carries_not_a_credential_sent_inside() {
        let mut vm = Vm::running(r#"{"mode":"tunnel"}"#);
        vm.host.tunnels.insert(2, alices_tunnel());
        let flow = vm.request_with(2, inside("/a", Some(basic(BOB, "default"))));
        assert_eq!(flow, Flow::Pause);
        assert_eq!(
            vm.calls(),
            vec![
                read(2),
                Call::ReadTunnel { context: 2 },
                fetch_from(2, Some(FIRST))
            ]
        );
        assert_eq!(
            vm.host.fetched_for,
            vec![TokenHash::of(ALICE).as_str().to_owned()],
            "alice's credentials, whatever the request says"
        );
        vm.answer(2, FIRST, credentials("sk_1"));
        assert_eq!(
            vm.calls(),
            vec![
                Call::ReadCallResponse,
                read(2),
                forward(2, "/a", "sk_1"),
                resume(2)
            ]
        );
    }

    #[test]
    fn inside_a_tunnel_without_an_identity_from_envoy_every_request_is_refused() {
        let mut vm = Vm::running(r#"{"mode":"tunnel"}"#);
        // A proxy credential inside the tunnel proves nothing.
        let flow = vm.request_with(2, inside("/a", Some(basic(ALICE, ""))));
        assert_eq!(flow, Flow::Pause);
        assert_eq!(
            vm.calls(),
            vec![
                read(2),
                Call::ReadTunnel { context: 2 },
                reject(2, 407, "proxy_auth_required")
            ]
        );
    }

    #[test]
    fn an_agent_revoked_while_its_tunnel_is_open_is_refused_on_its_next_request() {
        let mut vm = Vm::running(r#"{"mode":"tunnel"}"#);
        vm.host.tunnels.insert(2, alices_tunnel());
        vm.host.tunnels.insert(3, alices_tunnel());
        vm.host.tunnels.insert(4, alices_tunnel());
        vm.request_with(2, inside("/a", None));
        vm.answer(2, FIRST, credentials("sk_1"));
        vm.finish(2, Some(200));
        vm.calls();
        assert_eq!(
            vm.request_with(3, inside("/b", None)),
            Flow::Continue,
            "cached"
        );
        vm.finish(3, Some(200));
        // The next snapshot has no alice: revoked.
        let mut revoked = crate::worker::tests::snapshot("2");
        revoked.agents.clear();
        install(&mut vm, NOW_MS + 1000, revoked);
        vm.calls();
        assert_eq!(vm.request_with(4, inside("/c", None)), Flow::Pause);
        assert_eq!(
            vm.calls(),
            vec![
                read(4),
                Call::ReadTunnel { context: 4 },
                reject(4, 407, "invalid_token")
            ]
        );
    }

    #[test]
    fn inside_a_tunnel_another_host_is_refused_421_without_a_callout() {
        let mut vm = Vm::running(r#"{"mode":"tunnel"}"#);
        vm.host.tunnels.insert(2, alices_tunnel());
        let mut headers = inside("/a", None);
        headers[1].1 = "api.github.com".to_owned();
        vm.request_with(2, headers);
        assert_eq!(
            vm.calls(),
            vec![
                read(2),
                Call::ReadTunnel { context: 2 },
                reject(2, 421, "tunnel_host_mismatch")
            ]
        );
        vm.host.tunnels.insert(
            3,
            TunnelInfo {
                sni: Some("api.github.com".to_owned()),
                ..alices_tunnel()
            },
        );
        vm.request_with(3, inside("/a", None));
        assert_eq!(
            vm.calls(),
            vec![
                read(3),
                Call::ReadTunnel { context: 3 },
                reject(3, 421, "tunnel_host_mismatch")
            ]
        );
    }

    #[test]
    fn in_a_plain_tunnel_no_sni_is_needed_and_a_host_without_port_is_port_80() {
        let mut vm = Vm::running(r#"{"mode":"tunnel"}"#);
        // A CONNECT to api.stripe.com:80, plain HTTP inside: no TLS, so no SNI.
        let plain = TunnelInfo {
            identity: Some(identity(ALICE, "default", "api.stripe.com", 80)),
            sni: None,
            tls: false,
        };
        vm.host.tunnels.insert(2, plain.clone());
        vm.request_with(2, inside("/a", None));
        vm.answer(2, FIRST, credentials("sk_1"));
        let calls = vm.calls();
        assert!(
            calls.iter().any(|call| matches!(
                call,
                Call::Forward {
                    context: 2,
                    route: "tls",
                    ..
                }
            )),
            "the service's own upstream (TLS): {calls:?}"
        );
        // Another host, or the tunnel's host on another port: 421 as in a TLS tunnel.
        vm.host.tunnels.insert(3, plain.clone());
        let mut headers = inside("/a", None);
        headers[1].1 = "api.stripe.com:8080".to_owned();
        vm.request_with(3, headers);
        assert!(vm.calls().contains(&reject(3, 421, "tunnel_host_mismatch")));
        // TLS without an SNI: refused, the SNI chose the certificate.
        vm.host.tunnels.insert(4, TunnelInfo { tls: true, ..plain });
        vm.request_with(4, inside("/a", None));
        assert!(vm.calls().contains(&reject(4, 421, "tunnel_host_mismatch")));
    }

    /// The usual snapshot, with stripe forwarding `GET` only.
    fn get_only_vm(configuration: &str) -> Vm {
        let mut snapshot = crate::worker::tests::snapshot("1");
        snapshot.vaults[0].services[0].methods = Some(vec!["GET".to_owned()]);
        let mut vm = Vm::configured(configuration);
        vm.answer(
            ROOT,
            FakeHost::FIRST_TOKEN,
            CallResponse {
                status: Some(200),
                from_control_plane: true,
                body: serde_json::to_vec(&snapshot).unwrap_or_default(),
            },
        );
        vm.host.clear();
        vm
    }

    #[test]
    fn a_method_the_service_does_not_list_is_refused_403_without_a_fetch_plain_and_in_a_tunnel() {
        let mut vm = get_only_vm("");
        let flow = vm.request_with(
            2,
            vec![
                (":method", "POST".to_owned()),
                (":authority", "api.stripe.com".to_owned()),
                (":path", "/v1/charges".to_owned()),
                ("proxy-authorization", basic(ALICE, "")),
            ],
        );
        assert_eq!(flow, Flow::Pause);
        assert_eq!(
            vm.host.stats,
            strings(&["denied method_not_allowed_for_service"])
        );
        assert_eq!(
            vm.calls(),
            vec![read(2), reject(2, 403, "method_not_allowed_for_service")]
        );
        // GET, the listed method, is fetched as usual.
        vm.host.clear();
        vm.request(3, "/v1/charges");
        assert_eq!(vm.calls(), vec![read(3), fetch_from(3, Some(FIRST))]);

        let mut vm = get_only_vm(r#"{"mode":"tunnel"}"#);
        vm.host.tunnels.insert(2, alices_tunnel());
        let mut headers = inside("/a", None);
        headers[0].1 = "DELETE".to_owned();
        assert_eq!(vm.request_with(2, headers), Flow::Pause);
        assert_eq!(
            vm.calls(),
            vec![
                read(2),
                Call::ReadTunnel { context: 2 },
                reject(2, 403, "method_not_allowed_for_service")
            ]
        );
    }

    // --- Request-side substitution ------------------------------------------------

    use agent_vault_rules::substitution::{Substitution, Surface};

    /// Running, with stripe substituting `STRIPE_KEY` for `__STRIPE_KEY__` on
    /// `surfaces`.
    fn substituting_vm(configuration: &str, surfaces: &[Surface]) -> Vm {
        let mut snapshot = crate::worker::tests::snapshot("1");
        snapshot.vaults[0].services[0].substitutions = vec![Substitution {
            key: "STRIPE_KEY".to_owned(),
            placeholder: "__STRIPE_KEY__".to_owned(),
            surfaces: surfaces.to_vec(),
        }];
        let mut vm = Vm::configured(configuration);
        vm.answer(
            ROOT,
            FakeHost::FIRST_TOKEN,
            CallResponse {
                status: Some(200),
                from_control_plane: true,
                body: serde_json::to_vec(&snapshot).unwrap_or_default(),
            },
        );
        vm.host.clear();
        vm
    }

    /// Alice's request to stripe with `method`, `path` and more headers.
    fn to_stripe(
        method: &str,
        path: &str,
        more: &[(&'static str, &str)],
    ) -> Vec<(&'static str, String)> {
        let mut headers = vec![
            (":method", method.to_owned()),
            (":authority", "api.stripe.com".to_owned()),
            (":path", path.to_owned()),
            ("proxy-authorization", basic(ALICE, "")),
        ];
        headers.extend(more.iter().map(|(n, v)| (*n, (*v).to_owned())));
        headers
    }

    fn edit(pairs: &[(&str, &[&str])]) -> Call {
        Call::EditHeaders {
            context: 0,
            edits: pairs
                .iter()
                .map(|(n, vs)| {
                    (
                        (*n).to_owned(),
                        vs.iter().map(|v| (*v).to_owned()).collect(),
                    )
                })
                .collect(),
        }
    }

    fn edit_on(context: u32, pairs: &[(&str, &[&str])]) -> Call {
        match edit(pairs) {
            Call::EditHeaders { edits, .. } => Call::EditHeaders { context, edits },
            other => other,
        }
    }

    impl Vm {
        /// A body callback of request `id` delivering `body`.
        fn body(&mut self, id: u32, body: &[u8], end_of_stream: bool) -> Flow {
            self.host.current = id;
            self.host.bodies.insert(id, body.to_vec());
            let Some(http) = self.requests.get_mut(&id) else {
                return Flow::Continue;
            };
            http.on_request_body(&mut self.host, body.len(), end_of_stream)
        }
    }

    #[test]
    fn path_query_and_header_placeholders_are_replaced_after_a_fetch_and_from_the_cache() {
        let mut vm = substituting_vm(
            r#"{"log_batch_max": 1}"#,
            &[Surface::Path, Surface::Query, Surface::Header],
        );
        let path = "/bot__STRIPE_KEY__/send?k=__STRIPE_KEY__";
        vm.request_with(
            2,
            to_stripe("GET", path, &[("x-api-key", "Key __STRIPE_KEY__")]),
        );
        vm.calls();
        vm.answer(2, FIRST, credentials("sk/1 x"));
        let edits: &[(&str, &[&str])] = &[
            (":path", &["/botsk%2F1%20x/send?k=sk%2F1%20x"]),
            ("x-api-key", &["Key sk/1 x"]),
        ];
        assert_eq!(
            vm.calls(),
            vec![
                Call::ReadCallResponse,
                read(2),
                forward(2, path, "sk/1 x"),
                edit_on(2, edits),
                resume(2)
            ]
        );
        vm.finish(2, Some(200));
        let logged = vm.calls();
        assert!(
            logged.contains(&Call::PostLogs {
                records: strings(&["GET /bot__STRIPE_KEY__/send 200"]),
                sent: true
            }),
            "the log keeps the agent's placeholder, never the value: {logged:?}"
        );
        // The same from the cache, on arrival.
        let flow = vm.request_with(
            3,
            to_stripe("GET", path, &[("x-api-key", "Key __STRIPE_KEY__")]),
        );
        assert_eq!(flow, Flow::Continue);
        assert_eq!(
            vm.calls(),
            vec![read(3), forward(3, path, "sk/1 x"), edit_on(3, edits)]
        );
    }

    #[test]
    fn a_placeholder_on_an_undeclared_surface_passes_literally() {
        let mut vm = substituting_vm("", &[Surface::Query]);
        vm.request_with(
            2,
            to_stripe("GET", "/__STRIPE_KEY__", &[("x-api-key", "__STRIPE_KEY__")]),
        );
        vm.answer(2, FIRST, credentials("sk_1"));
        let calls = vm.calls();
        assert!(calls.contains(&resume(2)), "{calls:?}");
        assert!(
            !calls.iter().any(|c| matches!(c, Call::EditHeaders { .. })),
            "{calls:?}"
        );
    }

    #[test]
    fn a_value_that_cannot_go_into_a_header_is_refused_502_and_nothing_is_forwarded() {
        let mut vm = substituting_vm(r#"{"log_batch_max": 1}"#, &[Surface::Header]);
        vm.request_with(
            2,
            to_stripe("GET", "/a", &[("x-api-key", "__STRIPE_KEY__")]),
        );
        vm.calls();
        // A control character the auth header tolerates (it refuses CR, LF, NUL).
        vm.answer(2, FIRST, credentials(r"sk_1\u0007x-evil"));
        assert_eq!(
            vm.calls(),
            vec![
                Call::ReadCallResponse,
                read(2),
                reject(2, 502, "invalid_credential_value")
            ]
        );
        vm.finish(2, None);
        assert!(vm.calls().contains(&Call::PostLogs {
            records: strings(&["GET /a 502 invalid_credential_value"]),
            sent: true
        }));
        // From the cache likewise.
        let flow = vm.request_with(
            3,
            to_stripe("GET", "/b", &[("x-api-key", "__STRIPE_KEY__")]),
        );
        assert_eq!(flow, Flow::Pause);
        assert_eq!(
            vm.calls(),
            vec![read(3), reject(3, 502, "invalid_credential_value")]
        );
    }

    #[test]
    fn a_body_is_buffered_to_its_end_substituted_and_sent_without_its_old_length() {
        let mut vm = substituting_vm("", &[Surface::Body]);
        let json: &[(&'static str, &str)] = &[
            ("content-type", "application/json"),
            ("content-length", "26"),
        ];
        vm.request_with(2, to_stripe("POST", "/v1", json));
        vm.calls();
        vm.answer(2, FIRST, credentials(r#"s\"k"#));
        assert_eq!(
            vm.calls()[2..],
            [
                forward(2, "/v1", "s\"k"),
                edit_on(2, &[("content-length", &[])]),
                resume(2)
            ]
        );
        // Each chunk is taken into the VM and an empty one passes on; the last one
        // carries the whole body, substituted.
        assert_eq!(vm.body(2, br#"{"key":"__STR"#, false), Flow::Continue);
        assert_eq!(
            vm.calls(),
            vec![
                Call::ReadBody {
                    context: 2,
                    size: 13
                },
                Call::ReplaceBody {
                    context: 2,
                    body: String::new()
                }
            ]
        );
        assert_eq!(vm.body(2, br#"IPE_KEY__"}"#, true), Flow::Continue);
        assert_eq!(
            vm.calls(),
            vec![
                Call::ReadBody {
                    context: 2,
                    size: 11
                },
                Call::ReplaceBody {
                    context: 2,
                    body: r#"{"key":"s\"k"}"#.to_owned()
                }
            ]
        );
        // A form body from the cache; chunked, so no length to remove.
        let form: &[(&'static str, &str)] = &[
            ("content-type", "application/x-www-form-urlencoded"),
            ("transfer-encoding", "chunked"),
        ];
        assert_eq!(
            vm.request_with(3, to_stripe("POST", "/v1", form)),
            Flow::Continue
        );
        assert_eq!(vm.calls(), vec![read(3), forward(3, "/v1", "s\"k")]);
        assert_eq!(vm.body(3, b"a=1&k=__STRIPE_KEY__", true), Flow::Continue);
        assert_eq!(
            vm.calls()[1],
            Call::ReplaceBody {
                context: 3,
                body: "a=1&k=s%22k".to_owned()
            }
        );
        // No placeholder in one chunk: read, left alone; in several: put back whole.
        vm.request_with(4, to_stripe("POST", "/v1", form));
        vm.calls();
        assert_eq!(vm.body(4, b"a=1", true), Flow::Continue);
        assert_eq!(
            vm.calls(),
            vec![Call::ReadBody {
                context: 4,
                size: 3
            }]
        );
        vm.request_with(5, to_stripe("POST", "/v1", form));
        vm.body(5, b"a=1", false);
        vm.calls();
        assert_eq!(vm.body(5, b"&b=2", true), Flow::Continue);
        assert_eq!(
            vm.calls(),
            vec![
                Call::ReadBody {
                    context: 5,
                    size: 4
                },
                Call::ReplaceBody {
                    context: 5,
                    body: "a=1&b=2".to_owned()
                }
            ]
        );
    }

    #[test]
    fn a_body_over_the_bound_is_refused_413_by_its_length_or_while_it_streams() {
        let mut vm = substituting_vm(r#"{"max_substitution_body_bytes": 1024}"#, &[Surface::Body]);
        vm.request_with(2, to_stripe("POST", "/v1", &[("content-length", "1025")]));
        vm.calls();
        vm.answer(2, FIRST, credentials("sk_1"));
        assert_eq!(
            vm.calls(),
            vec![
                Call::ReadCallResponse,
                read(2),
                reject(2, 413, "request_body_too_large")
            ],
            "never forwarded, never resumed"
        );
        assert_eq!(
            vm.body(2, b"late", true),
            Flow::Pause,
            "a refused request holds"
        );
        // From the cache, declared.
        let flow = vm.request_with(3, to_stripe("POST", "/v1", &[("content-length", "5000")]));
        assert_eq!(flow, Flow::Pause);
        assert_eq!(
            vm.calls(),
            vec![read(3), reject(3, 413, "request_body_too_large")]
        );
        // Streamed: refused once the body taken passes the bound.
        let flow = vm.request_with(
            4,
            to_stripe("POST", "/v1", &[("transfer-encoding", "chunked")]),
        );
        assert_eq!(flow, Flow::Continue);
        vm.calls();
        assert_eq!(vm.body(4, &[b'a'; 1000], false), Flow::Continue);
        assert_eq!(vm.body(4, &[b'a'; 24], false), Flow::Continue);
        vm.calls();
        assert_eq!(vm.body(4, b"a", false), Flow::Pause);
        assert_eq!(vm.calls(), vec![reject(4, 413, "request_body_too_large")]);
        assert_eq!(vm.body(4, b"a", true), Flow::Pause);
        assert_eq!(vm.calls(), vec![], "nothing after the refusal");
    }

    #[test]
    fn a_placeholder_in_a_body_of_another_type_is_refused_415() {
        let mut vm = substituting_vm("", &[Surface::Body]);
        vm.request_with(
            2,
            to_stripe("POST", "/v1", &[("content-type", "text/plain")]),
        );
        vm.answer(2, FIRST, credentials("sk_1"));
        vm.calls();
        assert_eq!(vm.body(2, b"token __STRIPE_KEY__", true), Flow::Pause);
        assert_eq!(
            vm.calls(),
            vec![
                Call::ReadBody {
                    context: 2,
                    size: 20
                },
                reject(2, 415, "unsupported_substitution_body")
            ]
        );
    }

    #[test]
    fn trailers_after_a_body_to_substitute_in_are_refused_415_and_others_pass() {
        let mut vm = substituting_vm("", &[Surface::Body]);
        let json: &[(&'static str, &str)] = &[("content-type", "application/json")];
        vm.request_with(2, to_stripe("POST", "/v1", json));
        vm.host.current = 2;
        let flow = vm
            .requests
            .get_mut(&2)
            .map(|h| h.on_request_trailers(&mut vm.host));
        assert_eq!(flow, Some(Flow::Pause), "held while waiting");
        vm.answer(2, FIRST, credentials("sk_1"));
        vm.calls();
        assert_eq!(vm.body(2, b"{}", false), Flow::Continue);
        vm.calls();
        vm.host.current = 2;
        let flow = vm
            .requests
            .get_mut(&2)
            .map(|h| h.on_request_trailers(&mut vm.host));
        assert_eq!(flow, Some(Flow::Pause));
        assert_eq!(
            vm.calls(),
            vec![reject(2, 415, "unsupported_substitution_body")]
        );
        let mut vm = Vm::running("");
        vm.request_with(3, to_stripe("POST", "/v1", json));
        vm.answer(3, FIRST, credentials("sk_1"));
        vm.host.current = 3;
        let flow = vm
            .requests
            .get_mut(&3)
            .map(|h| h.on_request_trailers(&mut vm.host));
        assert_eq!(flow, Some(Flow::Continue));
    }

    #[test]
    fn a_request_waiting_for_its_credential_never_lets_its_body_through() {
        let mut vm = substituting_vm("", &[Surface::Body]);
        let json: &[(&'static str, &str)] = &[("content-type", "application/json")];
        assert_eq!(
            vm.request_with(2, to_stripe("POST", "/v1", json)),
            Flow::Pause
        );
        vm.calls();
        // Whatever Envoy hands over while the headers are paused: held, untouched.
        assert_eq!(
            vm.body(2, b"{\"k\":\"__STRIPE_KEY__\"}", false),
            Flow::Pause
        );
        assert_eq!(vm.body(2, b"{\"k\":\"__STRIPE_KEY__\"}", true), Flow::Pause);
        assert_eq!(vm.calls(), vec![]);
        // Refused (the control plane is down): still held.
        vm.answer(2, FIRST, envoy_503());
        vm.calls();
        assert_eq!(vm.body(2, b"{}", true), Flow::Pause);
        // A service without a body substitution: held while waiting, then passes.
        let mut vm = Vm::running("");
        vm.request_with(3, to_stripe("POST", "/v1", json));
        assert_eq!(vm.body(3, b"{}", false), Flow::Pause);
        vm.answer(3, FIRST, credentials("sk_1"));
        assert_eq!(vm.body(3, b"{}", true), Flow::Continue);
        // A request the filter refused on arrival holds too.
        vm.request_with(
            4,
            vec![(":method", "POST".to_owned()), (":path", "/".to_owned())],
        );
        assert_eq!(vm.body(4, b"x", true), Flow::Pause);
    }

    // Response redaction (crate::redact).

    const SECRET: &str = "sk_live_0123456789";

    /// Request 2 forwarded with `SECRET` (fetched), its response headers `headers`
    /// arrive (a body follows); the calls so far are forgotten.
    fn redacting(vm: &mut Vm, headers: Vec<(&'static str, String)>) -> Flow {
        vm.request(2, "/a");
        vm.answer(2, FIRST, credentials(SECRET));
        vm.calls();
        vm.host.current = 2;
        vm.host.response_headers.insert(2, headers);
        let flow = match vm.requests.get_mut(&2) {
            Some(http) => http.on_response_headers(&mut vm.host, false),
            None => Flow::Continue,
        };
        flow
    }

    /// A body chunk of request 2 passes; returns what the agent gets of it.
    fn chunk(vm: &mut Vm, data: &[u8], end: bool) -> Vec<u8> {
        vm.host.current = 2;
        vm.host.response_body.insert(2, data.to_vec());
        if let Some(http) = vm.requests.get_mut(&2) {
            http.on_response_body(&mut vm.host, data.len(), end);
        }
        vm.host.response_body.remove(&2).unwrap_or_default()
    }

    fn redactions(vm: &Vm, id: u32) -> u64 {
        vm.requests
            .get(&id)
            .map_or(0, |http| http.log.borrow().redactions)
    }

    #[test]
    fn a_redacting_response_has_its_headers_and_its_body_redacted_even_across_chunks() {
        let mut vm = Vm::running("");
        let flow = redacting(
            &mut vm,
            vec![
                (":status", "200".to_owned()),
                ("content-length", "40".to_owned()),
                ("x-echo", format!("Bearer {SECRET}")),
                ("x-echo", "plain".to_owned()),
                ("set-cookie", "s=1".to_owned()),
            ],
        );
        assert_eq!(flow, Flow::Continue);
        assert_eq!(
            vm.calls(),
            vec![
                Call::ReadResponseHeaders { context: 2 },
                Call::SetResponseHeader {
                    context: 2,
                    name: "x-echo".to_owned(),
                    values: strings(&[
                        &String::from_utf8_lossy(&redact::mask(7 + SECRET.len())),
                        "plain"
                    ]),
                },
            ],
            "one read; only the changed header is written (a mask keeps the length)"
        );
        let body = format!("{{\"auth\":\"Bearer {SECRET}\",\"key\":\"{SECRET}\"}}");
        let (first, second) = body.as_bytes().split_at(20);
        let mut out = chunk(&mut vm, first, false);
        out.extend(chunk(&mut vm, second, true));
        assert_eq!(out.len(), body.len());
        assert_eq!(
            redact::unmasked(&String::from_utf8_lossy(&out)),
            "{\"auth\":\"[REDACTED]\",\"key\":\"[REDACTED]\"}"
        );
        assert_eq!(redactions(&vm, 2), 3);
        vm.host.stats.clear();
        vm.finish(2, None);
    }

    #[test]
    fn a_redacting_response_chunk_that_cannot_begin_a_secret_is_read_once_and_not_written_back() {
        let mut vm = Vm::running("");
        redacting(&mut vm, vec![(":status", "200".to_owned())]);
        vm.calls();
        // Not the end of the body, but no tail of it can begin a secret: nothing held.
        assert_eq!(chunk(&mut vm, b"ok", false), b"ok");
        assert_eq!(vm.calls(), vec![Call::ReadResponseBody { context: 2 }]);
        assert_eq!(chunk(&mut vm, b"", true), b"");
        // A tail that may begin one waits for the next chunk.
        let held = format!("ok {}", &SECRET[..4]);
        assert_eq!(chunk(&mut vm, held.as_bytes(), false), b"ok ");
        assert_eq!(
            chunk(&mut vm, &SECRET.as_bytes()[4..], true).len(),
            SECRET.len()
        );
        assert_eq!(redactions(&vm, 2), 1);
        vm.host.stats.clear();
        vm.finish(2, None);
    }

    #[test]
    fn a_redacting_response_compressed_with_gzip_is_inflated_and_passed_on_plain() {
        use std::io::Write;
        let mut vm = Vm::running("");
        redacting(
            &mut vm,
            vec![
                (":status", "200".to_owned()),
                ("content-encoding", "gzip".to_owned()),
            ],
        );
        assert_eq!(
            vm.calls(),
            vec![
                Call::ReadResponseHeaders { context: 2 },
                Call::SetResponseHeader {
                    context: 2,
                    name: "content-encoding".to_owned(),
                    values: vec![],
                },
            ]
        );
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        let _ = gzip.write_all(format!("echo: {SECRET}").as_bytes());
        let compressed = gzip.finish().unwrap_or_default();
        let out = chunk(&mut vm, &compressed, true);
        assert_eq!(
            redact::unmasked(&String::from_utf8_lossy(&out)),
            "echo: [REDACTED]"
        );
        assert_eq!(vm.host.stats, strings(&["redacted 1"]));
        // A body that is not gzip at all is never passed on: the stream is reset.
        let mut vm = Vm::running("");
        redacting(
            &mut vm,
            vec![
                (":status", "200".to_owned()),
                ("content-encoding", "gzip".to_owned()),
            ],
        );
        vm.calls();
        let out = chunk(&mut vm, format!("not gzip {SECRET}").as_bytes(), false);
        assert!(out.is_empty());
        assert!(vm.calls().contains(&Call::ResetStream { context: 2 }));
        assert!(chunk(&mut vm, b"more", true).is_empty(), "nothing after");
    }

    #[test]
    fn a_redacting_response_in_an_encoding_the_filter_cannot_decode_is_refused_502() {
        let mut vm = Vm::running(r#"{"log_batch_max": 1}"#);
        let flow = redacting(
            &mut vm,
            vec![
                (":status", "200".to_owned()),
                ("content-encoding", "br".to_owned()),
            ],
        );
        assert_eq!(flow, Flow::Pause);
        assert_eq!(
            vm.calls(),
            vec![
                Call::ReadResponseHeaders { context: 2 },
                reject(2, 502, "response_not_redactable"),
            ]
        );
        assert!(
            chunk(&mut vm, SECRET.as_bytes(), true).is_empty(),
            "its body is never passed on"
        );
        vm.calls();
        if let Some(http) = vm.requests.get_mut(&2) {
            http.on_log(&mut vm.host);
        }
        assert_eq!(
            vm.calls(),
            vec![Call::PostLogs {
                records: strings(&["GET /a 502 response_not_redactable"]),
                sent: true,
            }]
        );
    }

    #[test]
    fn a_response_without_a_body_is_never_refused_for_its_encoding() {
        let mut vm = Vm::running("");
        vm.request(2, "/a");
        vm.answer(2, FIRST, credentials(SECRET));
        vm.calls();
        vm.host.current = 2;
        vm.host.response_headers.insert(
            2,
            vec![
                (":status", "200".to_owned()),
                ("content-encoding", "br".to_owned()),
                ("content-length", "12".to_owned()),
            ],
        );
        let flow = vm
            .requests
            .get_mut(&2)
            .map(|http| http.on_response_headers(&mut vm.host, true));
        assert_eq!(flow, Some(Flow::Continue));
        assert_eq!(
            vm.calls(),
            vec![Call::ReadResponseHeaders { context: 2 }],
            "headers only (a HEAD's): nothing to decode, content-length kept"
        );
    }

    #[test]
    fn a_redacting_request_asks_upstream_only_for_encodings_the_filter_decodes() {
        let mut vm = Vm::running("");
        let mut headers = vec![
            (":method", "GET".to_owned()),
            (":authority", "api.stripe.com".to_owned()),
            (":path", "/a".to_owned()),
            ("proxy-authorization", basic(ALICE, "")),
            ("accept-encoding", "gzip, deflate, br, zstd".to_owned()),
        ];
        vm.request_with(2, headers.clone());
        vm.calls();
        vm.answer(2, FIRST, credentials(SECRET));
        assert_eq!(
            vm.calls(),
            vec![
                Call::ReadCallResponse,
                read(2),
                forward(2, "/a", SECRET),
                Call::SetRequestHeader {
                    context: 2,
                    name: "accept-encoding".to_owned(),
                    value: "gzip, deflate".to_owned(),
                },
                resume(2),
            ]
        );
        // Cached: the same on arrival. An accept-encoding already decodable, or none,
        // costs no host call.
        headers[4].1 = "br".to_owned();
        vm.request_with(3, headers.clone());
        assert_eq!(
            vm.calls(),
            vec![
                read(3),
                forward(3, "/a", SECRET),
                Call::SetRequestHeader {
                    context: 3,
                    name: "accept-encoding".to_owned(),
                    value: "identity".to_owned(),
                },
            ]
        );
        headers[4].1 = "gzip".to_owned();
        vm.request_with(4, headers.clone());
        headers.pop();
        vm.request_with(5, headers);
        assert_eq!(
            vm.calls(),
            vec![
                read(4),
                forward(4, "/a", SECRET),
                read(5),
                forward(5, "/a", SECRET)
            ]
        );
    }

    #[test]
    fn a_service_that_does_not_redact_costs_its_responses_no_host_call() {
        let mut snapshot = crate::worker::tests::snapshot("1");
        snapshot.vaults[0].services[0].redact_responses = Some(false);
        let mut vm = Vm::configured("");
        vm.answer(
            ROOT,
            FakeHost::FIRST_TOKEN,
            CallResponse {
                status: Some(200),
                from_control_plane: true,
                body: serde_json::to_vec(&snapshot).unwrap_or_default(),
            },
        );
        vm.host.clear();
        vm.request(2, "/a");
        vm.answer(2, FIRST, credentials(SECRET));
        vm.calls();
        vm.host.current = 2;
        vm.host.response_status.insert(2, 200);
        if let Some(http) = vm.requests.get_mut(&2) {
            assert_eq!(
                http.on_response_headers(&mut vm.host, false),
                Flow::Continue
            );
        }
        let echo = format!("echo {SECRET}");
        assert_eq!(chunk(&mut vm, echo.as_bytes(), true), echo.as_bytes());
        assert_eq!(
            vm.calls(),
            vec![Call::ReadResponseStatus { context: 2 }],
            "the status alone, as before redaction existed; no body call"
        );
    }

    // --- Refresh-ahead (crate::cache) -------------------------------------------

    /// The credential fetches among `calls`: (from, token).
    fn fetches(calls: &[Call]) -> Vec<(u32, u32)> {
        calls
            .iter()
            .filter_map(|c| match c {
                Call::DispatchCredentials { from, token, .. } => Some((*from, (*token)?)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_hit_near_the_ttl_is_served_at_once_and_the_root_refreshes_the_entry_in_the_background() {
        let mut vm = Vm::running(r#"{"credential_cache_ttl_ms":1000}"#);
        vm.request(2, "/a");
        vm.answer(2, FIRST, credentials("sk_1"));
        vm.finish(2, Some(200));
        vm.calls();
        // Before the last 20 % of the TTL: a plain hit.
        vm.host.now_ms = NOW_MS + 700;
        assert_eq!(vm.request(3, "/b"), Flow::Continue);
        vm.tick(NOW_MS + 750);
        assert_eq!(fetches(&vm.calls()), vec![], "no refresh before the window");
        // In the window: served from the cache at once, no callout from the request.
        vm.host.now_ms = NOW_MS + 850;
        assert_eq!(vm.request(4, "/c"), Flow::Continue);
        assert_eq!(vm.request(5, "/d"), Flow::Continue);
        assert_eq!(
            vm.calls(),
            vec![
                read(4),
                forward(4, "/c", "sk_1"),
                read(5),
                forward(5, "/d", "sk_1")
            ]
        );
        vm.finish(4, Some(200));
        vm.finish(5, Some(200));
        // The root sends one refresh on its tick.
        vm.tick(NOW_MS + 900);
        assert!(vm.host.stats.contains(&"cache refresh".to_owned()));
        let sent = fetches(&vm.calls());
        let [refresh] = sent[..] else {
            panic!("one refresh: {sent:?}");
        };
        assert_eq!(
            refresh.0, ROOT,
            "from the root, whose answers are never dropped"
        );
        let refresh = refresh.1;
        vm.tick(NOW_MS + 950);
        assert_eq!(fetches(&vm.calls()), vec![], "one refresh at a time");
        // Its answer finishes nobody and replaces the entry, with a fresh fetched_at.
        vm.host.now_ms = NOW_MS + 960;
        vm.answer(ROOT, refresh, credentials("sk_2"));
        assert_eq!(vm.calls(), vec![Call::ReadCallResponse]);
        vm.host.now_ms = NOW_MS + 1500;
        assert_eq!(vm.request(6, "/e"), Flow::Continue, "past the first TTL");
        assert_eq!(vm.calls(), vec![read(6), forward(6, "/e", "sk_2")]);
    }

    #[test]
    fn a_failed_refresh_says_so_answers_nobody_and_keeps_the_entry() {
        let mut vm = Vm::running(r#"{"credential_cache_ttl_ms":1000}"#);
        vm.request(2, "/a");
        vm.answer(2, FIRST, credentials("sk_live_1"));
        vm.finish(2, Some(200));
        vm.host.now_ms = NOW_MS + 850;
        vm.request(3, "/b");
        vm.finish(3, Some(200));
        vm.calls();
        vm.tick(NOW_MS + 900);
        let [(ROOT, refresh)] = fetches(&vm.calls())[..] else {
            panic!("a refresh from the root");
        };
        vm.answer(ROOT, refresh, envoy_503());
        assert_eq!(
            vm.host.calls,
            vec![Call::ReadCallResponse],
            "nobody is answered"
        );
        let logs = format!("{:?}", vm.host.logs);
        assert!(logs.contains("credential refresh failed"), "{logs}");
        assert!(!logs.contains("sk_live_1"), "{logs}");
        vm.calls();
        vm.host.now_ms = NOW_MS + 990;
        assert_eq!(vm.request(4, "/c"), Flow::Continue, "the entry as it was");
        vm.host.now_ms = NOW_MS + 1000;
        assert_eq!(vm.request(5, "/d"), Flow::Pause, "until its ttl");
    }

    #[test]
    fn a_refresh_answered_after_a_version_change_is_not_cached() {
        let mut vm = Vm::running(r#"{"credential_cache_ttl_ms":1000}"#);
        vm.request(2, "/a");
        vm.answer(2, FIRST, credentials("sk_1"));
        vm.finish(2, Some(200));
        vm.host.now_ms = NOW_MS + 850;
        vm.request(3, "/b");
        vm.finish(3, Some(200));
        vm.calls();
        vm.tick(NOW_MS + 900);
        let calls = vm.calls();
        let sent = fetches(&calls);
        let [(ROOT, refresh)] = sent[..] else {
            panic!("a refresh from the root: {calls:?}");
        };
        let poll = calls
            .iter()
            .find_map(|c| match c {
                Call::DispatchPoll { token, .. } => *token,
                _ => None,
            })
            .unwrap_or_else(|| panic!("the tick polled: {calls:?}"));
        // A credential changed: version 2 arrives before the refresh's answer.
        vm.answer(ROOT, poll, snapshot("2"));
        assert_eq!(vm.root_version(), "2");
        vm.answer(ROOT, refresh, credentials("old"));
        vm.calls();
        vm.host.now_ms = NOW_MS + 910;
        assert_eq!(
            vm.request(4, "/c"),
            Flow::Pause,
            "the old answer was not cached"
        );
    }

    // The request log through Envoy's access log (`request_log: "access_log"`).

    const ACCESS_LOG: &str = r#"{"request_log": "access_log"}"#;

    fn log_state(context: u32, value: &str) -> Call {
        Call::SetProperty {
            context,
            path: "agent_vault_log".to_owned(),
            value: value.to_owned(),
        }
    }

    const STRIPE_STATE: &str = "1\talice\tdefault\tstripe\tapi.stripe.com\t\t\t\t";

    #[test]
    fn in_access_log_mode_a_cached_hit_sets_the_log_state_once_and_on_log_does_nothing() {
        let mut vm = Vm::running(ACCESS_LOG);
        vm.request(2, "/a");
        vm.answer(2, FIRST, credentials("sk_1"));
        vm.finish(2, Some(200));
        vm.calls();
        assert_eq!(vm.request(3, "/b?key=secret"), Flow::Continue);
        assert_eq!(
            vm.calls(),
            vec![
                read(3),
                log_state(3, STRIPE_STATE),
                forward(3, "/b?key=secret", "sk_1"),
            ],
            "one set_property"
        );
        let reads = vm.host.clock_reads;
        vm.finish(3, Some(200));
        assert_eq!(
            vm.calls(),
            vec![Call::ReadResponseHeaders { context: 3 }],
            "no record, no post"
        );
        assert_eq!(vm.host.clock_reads, reads, "on_log reads no clock");
        for now in [NOW_MS + 1000, NOW_MS + 5000] {
            vm.tick(now);
            assert!(
                !vm.calls()
                    .iter()
                    .any(|c| matches!(c, Call::PostLogs { .. })),
                "nothing batched"
            );
        }
        let worker = vm
            .root
            .worker
            .as_ref()
            .map(|w| w.borrow_mut().logs_due(u64::MAX));
        assert_eq!(worker, Some(None), "the batch stays empty");
    }

    #[test]
    fn in_access_log_mode_a_refusal_sets_the_state_with_its_error_before_the_reply() {
        let mut vm = Vm::running(ACCESS_LOG);
        vm.request_with(
            2,
            vec![
                (":method", "GET".to_owned()),
                (":authority", "api.stripe.com:443".to_owned()),
                (":path", "/a".to_owned()),
            ],
        );
        assert_eq!(
            vm.calls(),
            vec![
                read(2),
                // As the posted record: no host before the agent is known.
                log_state(2, "1\t\t\t\t\tproxy_auth_required\t\t\t"),
                reject(2, 407, "proxy_auth_required"),
            ]
        );
        vm.finish(2, None);
        assert_eq!(vm.calls(), vec![]);
        // A method Envoy's access log cannot name is in the state.
        vm.request_with(
            3,
            vec![
                (":method", "PROPFIND".to_owned()),
                (":authority", "api.stripe.com".to_owned()),
                (":path", "/a".to_owned()),
            ],
        );
        assert!(vm.calls().contains(&log_state(
            3,
            "1\t\t\t\t\tproxy_auth_required\t\tPROPFIND\t"
        )));
    }

    #[test]
    fn in_access_log_mode_a_paused_request_sets_the_state_when_paused_and_again_only_if_refused() {
        let mut vm = Vm::running(ACCESS_LOG);
        assert_eq!(vm.request(2, "/a"), Flow::Pause);
        assert_eq!(
            vm.calls(),
            vec![
                read(2),
                log_state(2, STRIPE_STATE),
                fetch_from(2, Some(FIRST)),
            ],
            "set before the fetch: a client that leaves meanwhile is logged too"
        );
        vm.request(3, "/b");
        vm.calls();
        vm.answer(2, FIRST, credentials("sk_1"));
        assert_eq!(
            vm.calls(),
            vec![
                Call::ReadCallResponse,
                read(2),
                forward(2, "/a", "sk_1"),
                resume(2),
                switch(3),
                read(3),
                forward(3, "/b", "sk_1"),
                resume(3),
                switch(2),
            ],
            "a forward changes nothing of the state"
        );
        // A failed fetch refuses its waiters: their state gets the error.
        vm.host.now_ms += 120_000;
        vm.request(4, "/c");
        vm.request(5, "/d");
        vm.calls();
        vm.answer(4, FIRST + 1, envoy_503());
        let unavailable =
            "1\talice\tdefault\tstripe\tapi.stripe.com\tcontrol_plane_unavailable\t\t\t";
        assert_eq!(
            vm.calls(),
            vec![
                Call::ReadCallResponse,
                log_state(4, unavailable),
                reject(4, 503, "control_plane_unavailable"),
                switch(5),
                log_state(5, unavailable),
                reject(5, 503, "control_plane_unavailable"),
                switch(4),
            ]
        );
    }

    #[test]
    fn in_access_log_mode_redactions_and_a_destination_refusal_set_the_state_again() {
        let mut vm = Vm::running(ACCESS_LOG);
        vm.request(2, "/a");
        vm.answer(2, FIRST, credentials("sk_live_abcdef123456"));
        vm.calls();
        vm.host.current = 2;
        vm.host.response_headers.insert(
            2,
            vec![
                (":status", "200".to_owned()),
                ("x-echo", "sk_live_abcdef123456".to_owned()),
            ],
        );
        let http = vm.requests.get_mut(&2).unwrap();
        http.on_response_headers(&mut vm.host, false);
        let calls = vm.calls();
        assert!(
            calls.contains(&log_state(
                2,
                "1\talice\tdefault\tstripe\tapi.stripe.com\t\t1\t\t"
            )),
            "{calls:?}"
        );
        vm.host.response_body.insert(
            2,
            b"key sk_live_abcdef123456 and sk_live_abcdef123456".to_vec(),
        );
        let http = vm.requests.get_mut(&2).unwrap();
        http.on_response_body(&mut vm.host, 50, true);
        let calls = vm.calls();
        assert!(
            calls.contains(&log_state(
                2,
                "1\talice\tdefault\tstripe\tapi.stripe.com\t\t3\t\t"
            )),
            "{calls:?}"
        );
        vm.finish(2, None);

        vm.request(3, "/b");
        vm.calls();
        vm.host
            .response_code_details
            .insert(3, "rbac_access_denied_matched_policy[none]".into());
        vm.finish(3, Some(403));
        assert_eq!(
            vm.calls(),
            vec![
                Call::ReadResponseHeaders { context: 3 },
                Call::ReadResponseCodeDetails { context: 3 },
                log_state(
                    3,
                    "1\talice\tdefault\tstripe\tapi.stripe.com\tdestination_forbidden\t\t\t"
                ),
            ]
        );
    }

    #[test]
    fn in_access_log_mode_a_path_with_a_substituted_placeholder_is_logged_as_the_agent_wrote_it() {
        let mut vm = substituting_vm(ACCESS_LOG, &[Surface::Path]);
        let agents = "1\talice\tdefault\tstripe\tapi.stripe.com\t\t\t\t/bot__STRIPE_KEY__/send";
        // Paused: set without the path, then again with it once the fetch answers.
        vm.request_with(
            2,
            to_stripe("GET", "/bot__STRIPE_KEY__/send?q=__STRIPE_KEY__", &[]),
        );
        vm.calls();
        vm.answer(2, FIRST, credentials("sk_1"));
        let calls = vm.calls();
        let states: Vec<&Call> = calls
            .iter()
            .filter(|c| matches!(c, Call::SetProperty { .. }))
            .collect();
        assert_eq!(states, vec![&log_state(2, agents)], "{calls:?}");
        // A hit: once, with the path.
        vm.finish(2, Some(200));
        vm.calls();
        vm.request_with(3, to_stripe("GET", "/bot__STRIPE_KEY__/send", &[]));
        let calls = vm.calls();
        let states: Vec<&Call> = calls
            .iter()
            .filter(|c| matches!(c, Call::SetProperty { .. }))
            .collect();
        assert_eq!(states, vec![&log_state(3, agents)], "{calls:?}");
        assert!(!format!("{calls:?}").contains("\\tsk_1"), "{calls:?}");
    }

    // --- gRPC, h2c upstreams, upgraded streams -------------------------------------

    /// A gRPC call from `token` (none: no proxy credential) to api.stripe.com.
    fn grpc_call(token: Option<&str>) -> Vec<(&'static str, String)> {
        let mut headers = vec![
            (":method", "POST".to_owned()),
            (":authority", "api.stripe.com".to_owned()),
            (":path", "/echo.Echo/Unary".to_owned()),
            ("content-type", "application/grpc".to_owned()),
            ("te", "trailers".to_owned()),
        ];
        if let Some(token) = token {
            headers.push(("proxy-authorization", basic(token, "")));
        }
        headers
    }

    /// The worker polls at `now` and gets `snapshot` (through the root).
    fn install(vm: &mut Vm, now: u64, snapshot: agent_vault_rules::Snapshot) {
        vm.tick(now);
        let poll = vm
            .host
            .calls
            .iter()
            .find_map(|call| match call {
                Call::DispatchPoll { token, .. } => *token,
                _ => None,
            })
            .unwrap_or_default();
        let body = serde_json::to_string(&snapshot).unwrap_or_default();
        vm.answer(ROOT, poll, control_plane(200, &body));
    }

    #[test]
    fn a_refused_grpc_call_gets_its_grpc_status_at_once_or_after_a_fetch() {
        let mut vm = Vm::running("");
        assert_eq!(vm.request_with(2, grpc_call(None)), Flow::Pause);
        let grpc_reject = |context, grpc_status, code| Call::GrpcReject {
            context,
            grpc_status,
            code,
        };
        let calls = vm.calls();
        assert!(
            calls.contains(&grpc_reject(2, 16, "proxy_auth_required")),
            "{calls:?}"
        );
        assert!(!calls.iter().any(|c| matches!(c, Call::Reject { .. })));
        vm.request_with(3, grpc_call(Some(ALICE)));
        vm.answer(
            3,
            FIRST,
            control_plane(200, r#"{"values":{},"missing":["STRIPE_KEY"]}"#),
        );
        let calls = vm.calls();
        assert!(
            calls.contains(&grpc_reject(3, 9, "credential_not_found")),
            "{calls:?}"
        );
        // The same refusal of a plain request stays JSON.
        vm.request(4, "/a");
        assert!(vm.calls().contains(&reject(4, 502, "credential_not_found")));
    }

    #[test]
    fn a_plain_h2c_service_is_routed_to_h2c_and_a_tls_one_to_tls() {
        let mut vm = Vm::running("");
        let mut h2c = crate::worker::tests::snapshot("2");
        h2c.vaults[0].services[0].upstream_tls = false;
        h2c.vaults[0].services[0].upstream_h2c = true;
        install(&mut vm, NOW_MS + 1000, h2c);
        vm.calls();
        vm.request_with(2, grpc_call(Some(ALICE)));
        // The poll took FIRST.
        vm.answer(2, FIRST + 1, credentials("sk_1"));
        let routes: Vec<&str> = vm
            .calls()
            .iter()
            .filter_map(|call| match call {
                Call::Forward { route, .. } => Some(*route),
                _ => None,
            })
            .collect();
        assert_eq!(routes, vec!["h2c"]);
        install(&mut vm, NOW_MS + 2000, crate::worker::tests::snapshot("3"));
        vm.calls();
        vm.request(3, "/a");
        vm.answer(3, FIRST + 3, credentials("sk_1"));
        let calls = vm.calls();
        assert!(
            calls
                .iter()
                .any(|call| matches!(call, Call::Forward { route: "tls", .. })),
            "{calls:?}"
        );
    }

    /// Alice's WebSocket upgrade request to api.stripe.com.
    fn websocket(path: &str) -> Vec<(&'static str, String)> {
        vec![
            (":method", "GET".to_owned()),
            (":authority", "api.stripe.com".to_owned()),
            (":path", path.to_owned()),
            ("upgrade", "websocket".to_owned()),
            ("connection", "upgrade".to_owned()),
            ("proxy-authorization", basic(ALICE, "")),
        ]
    }

    /// Request `id` gets its `101 Switching Protocols`.
    fn upgrade(vm: &mut Vm, id: u32) {
        vm.host.current = id;
        vm.host.response_status.insert(id, 101);
        vm.host
            .response_headers
            .insert(id, vec![(":status", "101".to_owned())]);
        if let Some(http) = vm.requests.get_mut(&id) {
            assert_eq!(
                http.on_response_headers(&mut vm.host, false),
                Flow::Continue
            );
        }
    }

    fn resets(calls: &[Call]) -> Vec<u32> {
        calls
            .iter()
            .filter_map(|call| match call {
                Call::ResetStream { context } => Some(*context),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn an_open_websocket_is_reset_by_the_snapshot_that_revokes_its_agent_and_not_before() {
        let mut vm = Vm::running("");
        vm.request_with(2, websocket("/a"));
        vm.answer(2, FIRST, credentials("sk_1"));
        upgrade(&mut vm, 2);
        assert_eq!(vm.request_with(3, websocket("/b")), Flow::Continue);
        upgrade(&mut vm, 3);
        assert_eq!(
            vm.host
                .stats
                .iter()
                .filter(|s| *s == "upgrade opened")
                .count(),
            2
        );
        // 3 closes by itself: forgotten.
        vm.delete(3);
        // A snapshot that still lets alice in: nothing is reset.
        install(&mut vm, NOW_MS + 1000, crate::worker::tests::snapshot("2"));
        assert_eq!(resets(&vm.calls()), Vec::<u32>::new());
        // The service disabled: 2 is reset, from the root, which is current again after.
        let mut disabled = crate::worker::tests::snapshot("3");
        disabled.vaults[0].services[0].enabled = false;
        install(&mut vm, NOW_MS + 2000, disabled);
        assert!(vm.host.stats.contains(&"upgrade revoked".to_owned()));
        let calls = vm.calls();
        assert_eq!(resets(&calls), vec![2], "{calls:?}");
        assert_eq!(vm.host.current, ROOT);
        let reset_at = calls
            .iter()
            .position(|c| *c == Call::ResetStream { context: 2 })
            .unwrap_or_default();
        assert_eq!(calls.get(reset_at - 1), Some(&switch(2)), "{calls:?}");
        assert_eq!(calls.get(reset_at + 1), Some(&switch(ROOT)), "{calls:?}");
        // Reset once: the next snapshot finds nothing more to do.
        let mut revoked = crate::worker::tests::snapshot("4");
        revoked.agents.clear();
        install(&mut vm, NOW_MS + 3000, revoked);
        assert_eq!(resets(&vm.calls()), Vec::<u32>::new());
    }

    #[test]
    fn an_open_websocket_of_an_agent_whose_token_expires_is_reset_on_the_tick() {
        let mut vm = Vm::running("");
        let mut expiring = crate::worker::tests::snapshot("2");
        let expires_s = i64::try_from((NOW_MS + 5000) / 1000).unwrap_or_default();
        expiring.agents[0].expires_at = Some(expires_s);
        install(&mut vm, NOW_MS + 1000, expiring);
        vm.request_with(2, websocket("/ws"));
        vm.answer(2, FIRST + 1, credentials("sk_1"));
        upgrade(&mut vm, 2);
        vm.calls();
        vm.tick(NOW_MS + 2000);
        assert_eq!(resets(&vm.calls()), Vec::<u32>::new());
        vm.tick(NOW_MS + 6000);
        assert_eq!(resets(&vm.calls()), vec![2]);
    }

    #[test]
    fn a_redacting_grpc_response_is_given_out_whole_at_each_message_end() {
        let mut vm = Vm::running("");
        redacting(
            &mut vm,
            vec![
                (":status", "200".to_owned()),
                ("content-type", "application/grpc".to_owned()),
            ],
        );
        let message = |payload: &[u8]| {
            let mut framed = vec![0u8];
            framed.extend_from_slice(&u32::try_from(payload.len()).unwrap_or(0).to_be_bytes());
            framed.extend_from_slice(payload);
            framed
        };
        // A message that ends with the start of the secret's prefix: nothing held.
        let first = message(b"ends with sk_");
        assert_eq!(chunk(&mut vm, &first, false), first);
        // A secret split across two chunks of one message: held, then masked.
        let second = message(format!("key {SECRET} end").as_bytes());
        let (a, b) = second.split_at(12);
        let mut out = chunk(&mut vm, a, false);
        out.extend(chunk(&mut vm, b, false));
        assert_eq!(out.len(), second.len());
        assert!(!String::from_utf8_lossy(&out).contains(SECRET));
        assert_eq!(out[..5], second[..5], "the framing is kept");
        assert_eq!(redactions(&vm, 2), 1);
    }

    #[test]
    fn a_websocket_response_is_neither_redacted_nor_held() {
        let mut vm = Vm::running("");
        vm.request(2, "/a");
        vm.answer(2, FIRST, credentials(SECRET));
        upgrade(&mut vm, 2);
        vm.calls();
        // An unmasked text frame from the upstream, holding the secret's prefix.
        let frame: &[u8] = b"\x81\x10sk_live_01234567";
        assert_eq!(chunk(&mut vm, frame, false), frame);
        assert!(!vm.calls().iter().any(|c| matches!(
            c,
            Call::SetResponseBody { .. } | Call::ReadResponseBody { .. }
        )),);
    }
}
