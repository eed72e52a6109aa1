//! The proxy-wasm skin, compiled for wasm32 only: each of Envoy's callbacks is handed
//! to [`crate::driver`] with [`ProxyWasmHost`] (`host.rs`), Envoy's implementation of
//! [`crate::host::Host`]. Nothing here decides anything; the state machine and its
//! tests live in the driver.
//!
//! The driver keeps the worker borrowed across host calls. That is sound because
//! Envoy defers a reply, a resume or a failed callout's answer until the current
//! callback returns, so nothing re-enters the VM while the worker is borrowed.

mod host;
mod stats;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

use crate::driver::{self, Flow};

use host::ProxyWasmHost;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    // After set_log_level, which installs the SDK's own hook: ours names the filter.
    std::panic::set_hook(Box::new(|info| {
        let _ = proxy_wasm::hostcalls::log(
            LogLevel::Critical,
            &format!("agent-vault-filter: panic (this worker's VM is now unusable): {info}"),
        );
    }));
    proxy_wasm::set_root_context(|context_id| Box::new(Root(driver::Root::new(context_id))));
}}

struct Root(driver::Root);

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        self.0
            .on_call_response(&mut ProxyWasmHost, token_id, num_headers, body_size);
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        true
    }

    fn on_configure(&mut self, plugin_configuration_size: usize) -> bool {
        let bytes = host::plugin_configuration(plugin_configuration_size);
        self.0.configure(&mut ProxyWasmHost, &bytes)
    }

    fn on_tick(&mut self) {
        self.0.on_tick(&mut ProxyWasmHost);
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Never `None`: the SDK panics on it. Without a worker, requests get 503.
        Some(Box::new(Http(self.0.new_request(context_id))))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Dropped when Envoy deletes the context, which tells the worker (see
/// [`driver::Http`]).
struct Http(driver::Http);

impl Context for Http {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        self.0
            .on_call_response(&mut ProxyWasmHost, token_id, num_headers, body_size);
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        match self.0.on_request_headers(&mut ProxyWasmHost) {
            Flow::Continue => Action::Continue,
            Flow::Pause => Action::Pause,
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        // Pause here is StopIterationAndBuffer (only for a request not forwarded).
        match self
            .0
            .on_request_body(&mut ProxyWasmHost, body_size, end_of_stream)
        {
            Flow::Continue => Action::Continue,
            Flow::Pause => Action::Pause,
        }
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        match self.0.on_request_trailers(&mut ProxyWasmHost) {
            Flow::Continue => Action::Continue,
            Flow::Pause => Action::Pause,
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        // For the request log: one header, in a callback Envoy makes anyway; for a
        // redacting request, every header (crate::redact).
        match self
            .0
            .on_response_headers(&mut ProxyWasmHost, end_of_stream)
        {
            Flow::Continue => Action::Continue,
            Flow::Pause => Action::Pause,
        }
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        // Each chunk goes on at once (redacted): a stream keeps flowing.
        self.0
            .on_response_body(&mut ProxyWasmHost, body_size, end_of_stream);
        Action::Continue
    }

    fn on_log(&mut self) {
        self.0.on_log(&mut ProxyWasmHost);
    }
}
