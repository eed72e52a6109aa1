//! [`ProxyWasmHost`]: the filter's [`Host`] calls, made on Envoy through proxy-wasm.
//!
//! The SDK's `hostcalls` panic (trap the VM) on any status they do not expect, and
//! `get_map_value` unwraps UTF-8. So: header values are read as bytes and converted
//! here; response headers of a callout are read only when Envoy says there are some
//! (a reset callout has no header map, and reading it would trap); every other status
//! is turned into a `Result` or ignored where ignoring is safe.

use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, GrpcStatusCode, MapType, Status, StreamType};

use agent_vault_rules::{CONTROL_PLANE_HEADER, CREDENTIALS_PATH, LOGS_PATH};

use super::stats;
use crate::config::Config;
use crate::decide::{Forward, Route};
use crate::header_map::HeaderMap;
use crate::host::{CallResponse, Host, LogLevel, Refused, Stat, TunnelInfo};
use crate::rate_limit::{SetError, SharedStore};
use crate::stats::Counter;
use crate::tunnel::{TUNNEL_HEADER, TUNNEL_STATE};
use agent_vault_rules::reply::{self, GrpcStatus, Reject};

/// Envoy, as the host of the current callback. No state: the host keeps it.
pub struct ProxyWasmHost;

impl SharedStore for ProxyWasmHost {
    fn shared_get(&mut self, key: &str) -> (Option<Vec<u8>>, u32) {
        match hostcalls::get_shared_data(key) {
            Ok((value, cas)) => (value, cas.unwrap_or(0)),
            Err(_) => (None, 0),
        }
    }

    fn shared_set(&mut self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError> {
        let cas = (cas != 0).then_some(cas);
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(SetError::CasMismatch),
            Err(status) => Err(SetError::Refused(format!("{status:?}"))),
        }
    }
}

impl Host for ProxyWasmHost {
    fn now_ms(&mut self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    fn request_headers(&mut self) -> HeaderMap {
        header_map(MapType::HttpRequestHeaders)
    }

    fn tunnel(&mut self) -> TunnelInfo {
        let sni = property(&["connection", "requested_server_name"]);
        // Every TLS connection of the decrypting listener has an SNI (a handshake
        // without one gets no certificate), so only a tunnel without one pays for
        // the second read: TLS without an SNI, or plain HTTP.
        let tls = sni.is_some() || property(&["connection", "tls_version"]).is_some();
        TunnelInfo {
            identity: property(&["filter_state", TUNNEL_STATE]),
            sni,
            tls,
        }
    }

    fn response_status(&mut self) -> Option<u16> {
        response_status()
    }

    fn response_code_details(&mut self) -> String {
        hostcalls::get_property(vec!["response", "code_details"])
            .ok()
            .flatten()
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    fn call_response(&mut self, num_headers: usize, body_size: usize) -> CallResponse {
        call_response(num_headers, body_size)
    }

    fn apply_forward(&mut self, config: &Config, forward: &Forward, known: &HeaderMap) {
        apply_forward(config, forward, known);
    }

    fn send_reject(&mut self, reject: &Reject) {
        // Read only here (a refusal is rare), through the reader that cannot trap:
        // where Envoy has no request headers to give (it answers with a status the
        // SDK's single-value reader panics on), the reply is JSON.
        let request = header_map(MapType::HttpRequestHeaders);
        if reply::is_grpc(request.get("content-type")) {
            send_grpc_reject(reject);
            return;
        }
        let _ = hostcalls::send_http_response(
            u32::from(reject.status()),
            reject.headers(),
            Some(reject.body.as_bytes()),
        );
    }

    fn resume(&mut self) {
        let _ = hostcalls::resume_http_request();
    }

    fn switch_to(&mut self, context_id: u32) -> bool {
        hostcalls::set_effective_context(context_id).is_ok()
    }

    fn dispatch_credentials(&mut self, config: &Config, body: &[u8]) -> Result<u32, Refused> {
        dispatch(config, "POST", CREDENTIALS_PATH, Some(body)).map_err(refused)
    }

    fn dispatch_poll(
        &mut self,
        config: &Config,
        headers: &[(&'static str, String)],
        timeout_ms: u64,
    ) -> Result<u32, Refused> {
        let pairs: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        hostcalls::dispatch_http_call(
            &config.cluster,
            pairs,
            None,
            vec![],
            Duration::from_millis(timeout_ms),
        )
        .map_err(refused)
    }

    fn post_logs(&mut self, config: &Config, body: &[u8]) -> Result<(), Refused> {
        dispatch(config, "POST", LOGS_PATH, Some(body))
            .map(|_| ())
            .map_err(refused)
    }

    fn set_tick_period(&mut self, period_ms: u64) {
        let _ = hostcalls::set_tick_period(Duration::from_millis(period_ms));
    }

    fn log(&mut self, level: LogLevel, message: &str) {
        let level = match level {
            LogLevel::Debug => proxy_wasm::types::LogLevel::Debug,
            LogLevel::Info => proxy_wasm::types::LogLevel::Info,
            LogLevel::Warn => proxy_wasm::types::LogLevel::Warn,
            LogLevel::Error => proxy_wasm::types::LogLevel::Error,
        };
        let _ = hostcalls::log(level, &format!("agent-vault-filter: {message}"));
    }

    fn define_stats(&mut self) {
        stats::define();
    }

    fn stat(&mut self, event: Stat<'_>) {
        match event {
            Stat::Denied(code) => stats::denied(code),
            Stat::Forwarded {
                forward,
                from_cache,
            } => stats::forwarded(forward, from_cache),
            Stat::CacheMiss => stats::cache_miss(),
            Stat::CalloutSent { kind, token } => stats::callout_sent(kind, token),
            Stat::CalloutAnswered { token, usable } => stats::callout_answered(token, usable),
            Stat::SnapshotLoaded { version } => stats::snapshot_loaded(version),
            Stat::Redacted(n) => stats::redacted(n),
            Stat::LongPollSent { sent } => stats::long_poll_sent(sent),
            Stat::LongPollAnswered { usable } => stats::long_poll_answered(usable),
            Stat::CacheRefresh => stats::count(Counter::CacheRefresh),
            Stat::UpgradeOpened => stats::count(Counter::UpgradeOpened),
            Stat::UpgradeRevoked => stats::count(Counter::UpgradeRevoked),
        }
    }

    fn flush_stats(&mut self, max_callout_ms: u64) {
        stats::flush(max_callout_ms);
    }

    fn edit_request_headers(&mut self, edits: &[(String, Vec<String>)]) {
        edit_request_headers(edits);
    }

    fn request_body(&mut self, size: usize) -> Vec<u8> {
        body_bytes(BufferType::HttpRequestBody, size)
    }

    fn replace_request_body(&mut self, old_size: usize, body: &[u8]) {
        set_body_bytes(BufferType::HttpRequestBody, old_size, body);
    }
    fn set_request_header(&mut self, name: &str, value: &str) {
        let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value));
    }

    fn response_headers(&mut self) -> HeaderMap {
        header_map(MapType::HttpResponseHeaders)
    }

    fn set_response_header(&mut self, name: &str, values: &[Vec<u8>]) {
        let _ = hostcalls::remove_map_value(MapType::HttpResponseHeaders, name);
        for value in values {
            let _ = hostcalls::add_map_value_bytes(MapType::HttpResponseHeaders, name, value);
        }
    }

    fn response_body(&mut self, size: usize) -> Vec<u8> {
        body_bytes(BufferType::HttpResponseBody, size)
    }

    fn set_response_body(&mut self, size: usize, body: &[u8]) {
        set_body_bytes(BufferType::HttpResponseBody, size, body);
    }

    fn reset_stream(&mut self) {
        // SAFETY: a plain value.
        let _ = unsafe { proxy_close_stream(StreamType::HttpResponse as u32) };
    }

    fn set_property(&mut self, path: &str, value: &[u8]) {
        let _ = hostcalls::set_property(vec![path], Some(value));
    }
}

/// Refuses a gRPC call the way its client can read: Envoy turns the local reply into
/// a trailers-only response (`:status` 200, `grpc-status`, `grpc-message`), and the
/// rest of what the JSON body would say rides in headers ([`Reject::grpc_headers`]).
fn send_grpc_reject(reject: &Reject) {
    let status = match reject.code.grpc_status() {
        GrpcStatus::InvalidArgument => GrpcStatusCode::InvalidArgument,
        GrpcStatus::PermissionDenied => GrpcStatusCode::PermissionDenied,
        GrpcStatus::ResourceExhausted => GrpcStatusCode::ResourceExhausted,
        GrpcStatus::FailedPrecondition => GrpcStatusCode::FailedPrecondition,
        GrpcStatus::Unimplemented => GrpcStatusCode::Unimplemented,
        GrpcStatus::Internal => GrpcStatusCode::Internal,
        GrpcStatus::Unavailable => GrpcStatusCode::Unavailable,
        GrpcStatus::Unauthenticated => GrpcStatusCode::Unauthenticated,
    };
    let headers = reject.grpc_headers();
    let metadata: Vec<(&str, &[u8])> = headers
        .iter()
        .map(|(name, value)| (*name, value.as_bytes()))
        .collect();
    let _ = hostcalls::send_grpc_response(status, Some(&reject.message), metadata);
}

/// Replaces request headers (substitution): one value is set; several replace every
/// value in order; none removes the header.
fn edit_request_headers(edits: &[(String, Vec<String>)]) {
    for (name, values) in edits {
        match values.as_slice() {
            [] => {
                let _ = hostcalls::remove_map_value(MapType::HttpRequestHeaders, name);
            }
            [value] => {
                let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value));
            }
            several => {
                let _ = hostcalls::remove_map_value(MapType::HttpRequestHeaders, name);
                for value in several {
                    let _ = hostcalls::add_map_value(MapType::HttpRequestHeaders, name, value);
                }
            }
        }
    }
}

// The body calls (substitution's and redaction's), imported directly with a plain
// `u32` status: the SDK's `get_buffer`, `set_buffer` and `reset_http_response` trap on
// a status they do not expect, and these run on every chunk of a body.
#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
    fn proxy_set_buffer_bytes(
        buffer_type: u32,
        start: usize,
        size: usize,
        buffer_data: *const u8,
        buffer_size: usize,
    ) -> u32;
    fn proxy_close_stream(stream_type: u32) -> u32;
}

/// Replaces the current body chunk (`size` bytes) of `buffer` with `body`.
fn set_body_bytes(buffer: BufferType, size: usize, body: &[u8]) {
    // SAFETY: `body` outlives the call; the host copies it.
    let _ = unsafe { proxy_set_buffer_bytes(buffer as u32, 0, size, body.as_ptr(), body.len()) };
}

/// The current body chunk of `buffer` (empty if the host cannot give it).
fn body_bytes(buffer: BufferType, size: usize) -> Vec<u8> {
    if size == 0 {
        return Vec::new();
    }
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut length: usize = 0;
    // SAFETY: the host writes a pointer and a size through the two out-parameters.
    let status = unsafe { proxy_get_buffer_bytes(buffer as u32, 0, size, &mut data, &mut length) };
    if status != Status::Ok as u32 || data.is_null() {
        return Vec::new();
    }
    // SAFETY: as in `header_map`: allocated by the SDK's exported allocator.
    unsafe { Vec::from_raw_parts(data, length, length) }
}

/// The host's status, named as the SDK names it (`BadArgument`, `NotFound`, ...).
fn refused(status: Status) -> Refused {
    Refused(format!("{status:?}"))
}

#[link(wasm_import_module = "env")]
extern "C" {
    // Imported directly (with a plain `u32` status) rather than through the SDK's
    // `get_map_bytes`, which unwraps each header name as UTF-8 (a trap).
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
    // Likewise rather than the SDK's `get_property`, which traps on an unexpected
    // status.
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
}

fn header_map(map: MapType) -> HeaderMap {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: the host writes a pointer and a size through the two out-parameters.
    let status = unsafe { proxy_get_header_map_pairs(map as u32, &mut data, &mut size) };
    if status != Status::Ok as u32 || data.is_null() {
        return HeaderMap::default();
    }
    // SAFETY: the host allocated `size` bytes through the SDK's exported allocator
    // (the Rust global allocator) and hands them over, as the SDK's own readers assume.
    let bytes = unsafe { Vec::from_raw_parts(data, size, size) };
    HeaderMap::parse(bytes)
}

/// Carries out a [`Forward`] on the current context's request headers. `known` are
/// those headers as read by [`Host::request_headers`]: only headers that are present
/// are removed (each removal is a host call). An empty `known` (a request always has
/// pseudo-headers, so the host could not give them) removes every one blindly: the
/// agent's credential must never reach an upstream.
fn apply_forward(config: &Config, forward: &Forward, known: &HeaderMap) {
    let present = |name: &str| known.is_empty() || known.contains(name);
    // Envoy stores header names lowercase, so removing by lowercase name removes the
    // header whatever case the agent sent it in (all occurrences).
    let fixed = [
        "proxy-authorization",
        "x-vault",
        config.tls_header.as_str(),
        TUNNEL_HEADER,
    ];
    for name in fixed
        .into_iter()
        .chain(forward.inject.iter().map(|(name, _)| name.as_str()))
    {
        if present(name) {
            let _ = hostcalls::remove_map_value(MapType::HttpRequestHeaders, name);
        }
    }
    for (name, value) in &forward.inject {
        let _ = hostcalls::add_map_value(MapType::HttpRequestHeaders, name, value);
    }
    // Last, so that nothing (not even a service's custom header) can choose the route.
    // Removed above if the agent sent it, so adding leaves exactly one, unless a custom
    // header of the service has its name: then replace.
    if let Route::Tunnel(identity) = &forward.route {
        // For Envoy's set_filter_state filter, which makes it the tunnel connection's
        // filter state (crate::tunnel). Removed above if anything had set it.
        let _ = hostcalls::add_map_value(
            MapType::HttpRequestHeaders,
            TUNNEL_HEADER,
            &identity.encode(),
        );
    }
    let tls = forward.route.header_value();
    if forward
        .inject
        .iter()
        .any(|(name, _)| *name == config.tls_header)
    {
        let _ =
            hostcalls::set_map_value(MapType::HttpRequestHeaders, &config.tls_header, Some(tls));
    } else {
        let _ = hostcalls::add_map_value(MapType::HttpRequestHeaders, &config.tls_header, tls);
    }
    if let Some(authority) = &forward.authority {
        let _ =
            hostcalls::set_map_value(MapType::HttpRequestHeaders, ":authority", Some(authority));
    }
}

fn dispatch(config: &Config, method: &str, path: &str, body: Option<&[u8]>) -> Result<u32, Status> {
    let mut headers = vec![
        (":method", method),
        (":path", path),
        (":authority", config.authority.as_str()),
    ];
    if body.is_some() {
        headers.push(("content-type", "application/json"));
    }
    hostcalls::dispatch_http_call(
        &config.cluster,
        headers,
        body,
        vec![],
        Duration::from_millis(config.callout_timeout_ms),
    )
}

/// Reads the answer being delivered. With no headers (Envoy reset the callout) there
/// is no header map to read: status `None`.
fn call_response(num_headers: usize, body_size: usize) -> CallResponse {
    if num_headers == 0 {
        return CallResponse {
            status: None,
            from_control_plane: false,
            body: Vec::new(),
        };
    }
    // Both headers from one host call.
    let headers = header_map(MapType::HttpCallResponseHeaders);
    let status = headers
        .get(":status")
        .and_then(|s| s.trim().parse::<u16>().ok());
    let from_control_plane = headers.contains(CONTROL_PLANE_HEADER);
    let body = if body_size == 0 {
        Vec::new()
    } else {
        hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default()
    };
    CallResponse {
        status,
        from_control_plane,
        body,
    }
}

/// A property of the current context as text (`None`: absent, empty, or not UTF-8).
/// Read with the plain import (see `proxy_get_property`): the SDK's `get_property`
/// traps on a status it does not expect, and this runs on every request in a tunnel.
fn property(path: &[&str]) -> Option<String> {
    // The ABI's path: each part followed by a NUL.
    let mut serialized = Vec::with_capacity(path.iter().map(|p| p.len() + 1).sum());
    for part in path {
        serialized.extend_from_slice(part.as_bytes());
        serialized.push(0);
    }
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: the path outlives the call; the host writes a pointer and a size through
    // the two out-parameters.
    let status =
        unsafe { proxy_get_property(serialized.as_ptr(), serialized.len(), &mut data, &mut size) };
    if status != Status::Ok as u32 || data.is_null() {
        return None;
    }
    // SAFETY: as in `header_map`: the host allocated `size` bytes with the SDK's
    // exported allocator (the Rust global allocator) and hands them over.
    let bytes = unsafe { Vec::from_raw_parts(data, size, size) };
    String::from_utf8(bytes)
        .ok()
        .filter(|text| !text.is_empty())
}

/// The `:status` of the current context's response headers (`None` if absent).
fn response_status() -> Option<u16> {
    let bytes = hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, ":status")
        .ok()
        .flatten()?;
    std::str::from_utf8(&bytes)
        .ok()?
        .trim()
        .parse::<u16>()
        .ok()
        .filter(|code| *code > 0)
}

/// The plugin configuration bytes.
pub fn plugin_configuration(size: usize) -> Vec<u8> {
    if size == 0 {
        return Vec::new();
    }
    hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size)
        .ok()
        .flatten()
        .unwrap_or_default()
}
