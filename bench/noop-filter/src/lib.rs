//! The benchmark's variants (b) and (i): Envoy's wasm filter with a module that does
//! (almost) nothing.
//!
//! (b), no plugin configuration: every request still pays what any proxy-wasm filter
//! pays, the VM calls for context creation, request and response headers, log and
//! delete. Each HTTP context answers `Continue` (the SDK's defaults) and touches no
//! header.
//!
//! (i), plugin configuration `name: value`: each request also gets that header added,
//! one host call, the least a filter that injects anything does. The benchmark gives
//! it our filter's route marker and route config, so (i) is the floor of any wasm
//! filter that injects a header and is routed fail-closed.
//!
//! Built for `wasm32-unknown-unknown` with the workspace's release profile, like the
//! real filter. On any other target the crate is empty.

#![cfg(target_arch = "wasm32")]

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| Box::new(NoopRoot { add: None }));
}}

struct NoopRoot {
    /// The header (i) adds to every request.
    add: Option<Rc<(String, String)>>,
}

impl Context for NoopRoot {}

impl RootContext for NoopRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let configuration = self.get_plugin_configuration().unwrap_or_default();
        let text = String::from_utf8_lossy(&configuration);
        self.add = text
            .split_once(':')
            .map(|(name, value)| Rc::new((name.trim().to_owned(), value.trim().to_owned())));
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Noop {
            add: self.add.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Noop {
    add: Option<Rc<(String, String)>>,
}

impl Context for Noop {}

impl HttpContext for Noop {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(header) = &self.add {
            self.add_http_request_header(&header.0, &header.1);
        }
        Action::Continue
    }
}
