//! The benchmark's variant (b): Envoy's wasm filter with a module that does nothing.
//!
//! Every request still pays what any proxy-wasm filter pays: the VM calls for context
//! creation, request and response headers, log and delete. Each HTTP context answers
//! `Continue` (the SDK's defaults) and touches no header. Built for
//! `wasm32-unknown-unknown` with the workspace's release profile, like the real filter.
//! On any other target the crate is empty.

#![cfg(target_arch = "wasm32")]

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| Box::new(NoopRoot));
}}

struct NoopRoot;

impl Context for NoopRoot {}

impl RootContext for NoopRoot {
    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Noop))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Noop;

impl Context for Noop {}

impl HttpContext for Noop {}
