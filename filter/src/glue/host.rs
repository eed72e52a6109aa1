//! Thin wrappers over the proxy-wasm host calls the filter makes.
//!
//! The SDK's `hostcalls` panic (trap the VM) on any status they do not expect, and
//! `get_map_value` unwraps UTF-8. So: header values are read as bytes and converted
//! here; response headers of a callout are read only when Envoy says there are some
//! (a reset callout has no header map, and reading it would trap); every other status
//! is turned into a `Result` or ignored where ignoring is safe.

use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType, Status};

use agent_vault_rules::{CONTROL_PLANE_HEADER, CREDENTIALS_PATH, LOGS_PATH};

use crate::config::Config;
use crate::decide::Forward;
use crate::header_map::HeaderMap;
use agent_vault_rules::reply::Reject;

/// Writes one line to Envoy's log.
pub fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, &format!("agent-vault-filter: {message}"));
}

/// Unix milliseconds from the host clock (0 if the host cannot tell).
pub fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
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
}

/// Every request header of the current context, in one host call (see
/// [`HeaderMap`]); empty if the host cannot give them.
pub fn request_headers() -> HeaderMap {
    header_map(MapType::HttpRequestHeaders)
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
/// those headers as read by [`request_headers`]: only headers that are present are
/// removed (each removal is a host call). An empty `known` (a request always has
/// pseudo-headers, so the host could not give them) removes every one blindly: the
/// agent's credential must never reach an upstream.
pub fn apply_forward(config: &Config, forward: &Forward, known: &HeaderMap) {
    let present = |name: &str| known.is_empty() || known.contains(name);
    // Envoy stores header names lowercase, so removing by lowercase name removes the
    // header whatever case the agent sent it in (all occurrences).
    let fixed = ["proxy-authorization", "x-vault", config.tls_header.as_str()];
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
    let tls = if forward.upstream_tls { "tls" } else { "plain" };
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

/// Sends the filter's own response on the current context.
pub fn send_reject(reject: &Reject) {
    let _ = hostcalls::send_http_response(
        u32::from(reject.status()),
        reject.headers(),
        Some(reject.body.as_bytes()),
    );
}

/// Resumes the current context's paused request.
pub fn resume() {
    let _ = hostcalls::resume_http_request();
}

/// Makes `context_id` the context later host calls act on. `false` if Envoy no longer
/// knows it (the request is gone).
pub fn switch_to(context_id: u32) -> bool {
    hostcalls::set_effective_context(context_id).is_ok()
}

fn dispatch(
    config: &Config,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    extra: Option<(&str, &str)>,
) -> Result<u32, Status> {
    let mut headers = vec![
        (":method", method),
        (":path", path),
        (":authority", config.authority.as_str()),
    ];
    if body.is_some() {
        headers.push(("content-type", "application/json"));
    }
    headers.extend(extra);
    hostcalls::dispatch_http_call(
        &config.cluster,
        headers,
        body,
        vec![],
        Duration::from_millis(config.callout_timeout_ms),
    )
}

/// `POST` a credentials request to the control plane.
pub fn dispatch_credentials(config: &Config, body: &[u8]) -> Result<u32, Status> {
    dispatch(config, "POST", CREDENTIALS_PATH, Some(body), None)
}

/// `GET` the snapshot with the poller's headers.
pub fn dispatch_poll(config: &Config, headers: &[(&'static str, String)]) -> Result<u32, Status> {
    let pairs: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    hostcalls::dispatch_http_call(
        &config.cluster,
        pairs,
        None,
        vec![],
        Duration::from_millis(config.callout_timeout_ms),
    )
}

/// `POST` a request-log batch; the answer is ignored (fire and forget).
pub fn post_logs(config: &Config, body: &[u8]) {
    if let Err(status) = dispatch(config, "POST", LOGS_PATH, Some(body), None) {
        log(
            LogLevel::Debug,
            &format!(
                "could not send the request log to cluster {:?} ({status:?}); records dropped",
                config.cluster
            ),
        );
    }
}

/// The answer to a callout, read in `on_http_call_response`.
pub struct CallResponse {
    /// `:status`, if any.
    pub status: Option<u16>,
    /// Whether the control plane's marker header is present.
    pub from_control_plane: bool,
    /// The body.
    pub body: Vec<u8>,
}

/// Reads the answer being delivered. With no headers (Envoy reset the callout) there
/// is no header map to read: status `None`.
pub fn call_response(num_headers: usize, body_size: usize) -> CallResponse {
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

/// The `:status` of the current context's response headers (`None` if absent).
pub fn response_status() -> Option<u16> {
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

/// Sets the root context's tick period.
pub fn set_tick_period(period_ms: u64) {
    let _ = hostcalls::set_tick_period(Duration::from_millis(period_ms));
}
