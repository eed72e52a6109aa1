#![cfg(target_arch = "wasm32")]
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, MapType};
use std::cell::Cell;
thread_local! { static N: Cell<u32> = Cell::new(0); static M: Cell<u32> = Cell::new(0); }
proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| Box::new(NoopRoot));
}}
struct NoopRoot;
impl Context for NoopRoot {}
impl RootContext for NoopRoot {
    fn on_configure(&mut self, size: usize) -> bool {
        if let Ok(Some(b)) = proxy_wasm::hostcalls::get_buffer(proxy_wasm::types::BufferType::PluginConfiguration, 0, size) {
            let s = String::from_utf8_lossy(&b).to_string();
            let mut it = s.split(',');
            N.with(|n| n.set(it.next().and_then(|x| x.trim().parse().ok()).unwrap_or(0)));
            M.with(|n| n.set(it.next().and_then(|x| x.trim().parse().ok()).unwrap_or(0)));
        }
        true
    }
    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> { Some(Box::new(Noop)) }
    fn get_type(&self) -> Option<ContextType> { Some(ContextType::HttpContext) }
}
struct Noop;
impl Context for Noop {}
impl HttpContext for Noop {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let n = N.with(|n| n.get());
        let m = M.with(|n| n.get());
        for _ in 0..n { let _ = proxy_wasm::hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, ":path"); }
        for _ in 0..m { let _ = proxy_wasm::hostcalls::remove_map_value(MapType::HttpRequestHeaders, "x-nothing-here"); }
        Action::Continue
    }
}
