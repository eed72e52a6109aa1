//! The request log through Envoy's gRPC access log (the filter's `request_log:
//! "access_log"`): an `envoy.service.accesslog.v3.AccessLogService` on the
//! peer-checked gRPC socket (beside SDS, [`crate::sds::serve`]).
//!
//! Envoy streams `HTTPAccessLogEntry`s; each carries the filter's state
//! ([`agent_vault_rules::LogState`]) in `common_properties.filter_state_objects`
//! under [`LOG_STATE_FILTER_STATE`], which Envoy packs as a `google.protobuf.BytesValue`
//! in an `Any`. Envoy knows the rest: the start time, the method, the path, the
//! status and the latency. [`record`] builds from both the very [`LogRecord`] the
//! filter posts in `post` mode, and each stream message is stored with one append
//! through the same [`crate::logs::RequestLog::append`] as `POST /v1/dataplane/logs`
//! (retention, `vault logs --follow` and the per-vault chunks alike).
//!
//! An entry without the state (a request the filter never saw: Envoy refused it
//! before the filter ran) or with one that does not decode is skipped and counted
//! (`als_skipped`); the records stored are counted in `als_records`.

use agent_vault_rules::{loggable_path, LogRecord, LogState, LOG_STATE_FILTER_STATE};
use envoy_types::pb::envoy::config::core::v3::RequestMethod;
use envoy_types::pb::envoy::data::accesslog::v3::HttpAccessLogEntry;
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_server::{
    AccessLogService, AccessLogServiceServer,
};
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::LogEntries;
use envoy_types::pb::envoy::service::accesslog::v3::{
    StreamAccessLogsMessage, StreamAccessLogsResponse,
};
use envoy_types::pb::google::protobuf::{Any, BytesValue, Duration, StringValue};
use prost::Message;

use super::{bump, DataplaneState};
use crate::http::blocking;

/// The service, for the gRPC socket's server.
pub fn service(state: DataplaneState) -> AccessLogServiceServer<AccessLogs> {
    AccessLogServiceServer::new(AccessLogs { state })
}

/// Stores the records of Envoy's access-log streams.
#[derive(Clone)]
pub struct AccessLogs {
    state: DataplaneState,
}

/// Why an entry gives no record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skipped {
    /// No filter state of ours: the filter did not log this request.
    NoState,
    /// A state that is not one: the reason.
    Invalid(String),
}

/// The filter state's text, from the `Any` Envoy packed it in.
fn state_text(any: &Any) -> Result<String, Skipped> {
    let bytes = if any.type_url.ends_with("/google.protobuf.BytesValue") {
        BytesValue::decode(any.value.as_slice())
            .map_err(|e| Skipped::Invalid(format!("a BytesValue that does not decode ({e})")))?
            .value
    } else if any.type_url.ends_with("/google.protobuf.StringValue") {
        StringValue::decode(any.value.as_slice())
            .map_err(|e| Skipped::Invalid(format!("a StringValue that does not decode ({e})")))?
            .value
            .into_bytes()
    } else {
        return Err(Skipped::Invalid(format!(
            "filter state of type {:?}, not bytes",
            agent_vault_rules::truncated(&any.type_url, 100)
        )));
    };
    String::from_utf8(bytes).map_err(|_| Skipped::Invalid("filter state not UTF-8".to_owned()))
}

fn millis(duration: &Duration) -> u64 {
    let seconds = u64::try_from(duration.seconds).unwrap_or(0);
    let nanos = u64::try_from(duration.nanos).unwrap_or(0);
    seconds
        .saturating_mul(1000)
        .saturating_add(nanos / 1_000_000)
}

/// The record of one entry, as the filter would have posted it (before
/// [`LogRecord::sanitized`], which the append applies to every record): the time the
/// request started, Envoy's method (unless the state names one Envoy cannot), the
/// host and names from the state, the path without query string (the state's when
/// the filter rewrote the request's), the status Envoy
/// sent, and the latency from the start to the last byte sent to the agent (the
/// filter measured from its headers callback to its log callback, which Envoy calls
/// right after that byte; without it, the stream's duration).
pub fn record(entry: &HttpAccessLogEntry) -> Result<LogRecord, Skipped> {
    let common = entry.common_properties.as_ref().ok_or(Skipped::NoState)?;
    let any = common
        .filter_state_objects
        .get(LOG_STATE_FILTER_STATE)
        .ok_or(Skipped::NoState)?;
    let state = LogState::decode(&state_text(any)?).map_err(|e| Skipped::Invalid(e.to_string()))?;
    let ts = common.start_time.as_ref().map_or(0, |start| {
        start
            .seconds
            .saturating_mul(1000)
            .saturating_add(i64::from(start.nanos / 1_000_000))
    });
    let latency_ms = common
        .time_to_last_downstream_tx_byte
        .as_ref()
        .or(common.duration.as_ref())
        .map_or(0, millis);
    let request = entry.request.as_ref();
    let envoy_path = request.map_or("", |r| r.path.as_str());
    let method = match state.method {
        Some(method) => method,
        None => match RequestMethod::try_from(request.map_or(0, |r| r.request_method)) {
            Ok(RequestMethod::MethodUnspecified) | Err(_) => String::new(),
            Ok(method) => method.as_str_name().to_owned(),
        },
    };
    let status = entry
        .response
        .as_ref()
        .and_then(|response| response.response_code)
        .map_or(0, |code| u16::try_from(code.value).unwrap_or(0));
    Ok(LogRecord {
        ts,
        agent: state.agent,
        vault: state.vault,
        method,
        host: state.host,
        // The agent's path when the filter rewrote it (Envoy's holds the values
        // substituted into it).
        path: loggable_path(state.path.as_deref().unwrap_or(envoy_path)).to_owned(),
        service: state.service,
        status,
        latency_ms,
        error: state.error,
        redactions: state.redactions,
    })
}

/// The records of one stream message, and how many entries were skipped.
pub fn records(message: &StreamAccessLogsMessage) -> (Vec<LogRecord>, u64) {
    let Some(LogEntries::HttpLogs(http)) = &message.log_entries else {
        return (Vec::new(), 0);
    };
    let mut records = Vec::with_capacity(http.log_entry.len());
    let mut skipped = 0;
    for entry in &http.log_entry {
        match record(entry) {
            Ok(record) => records.push(record),
            Err(_) => skipped += 1,
        }
    }
    (records, skipped)
}

impl AccessLogs {
    /// Stores one stream message's records (one append) and counts them; returns
    /// how many were stored (records of unknown vaults are dropped, as when posted).
    pub async fn ingest(&self, message: &StreamAccessLogsMessage) -> usize {
        let (mut records, skipped) = records(message);
        bump(&self.state.stats.als_skipped, skipped);
        bump(
            &self.state.stats.als_records,
            u64::try_from(records.len()).unwrap_or(u64::MAX),
        );
        let mut stored = 0;
        // A message is at most Envoy's buffer (bytes): the batch bound is a guard.
        while !records.is_empty() {
            let rest =
                records.split_off(records.len().min(agent_vault_rules::MAX_LOG_BATCH_RECORDS));
            let log = self.state.request_log.clone();
            match blocking(move || log.append(records)).await {
                Ok(n) => stored += n,
                Err(error) => tracing::warn!(
                    "could not store request-log records from Envoy's access log: {error}"
                ),
            }
            records = rest;
        }
        stored
    }
}

#[tonic::async_trait]
impl AccessLogService for AccessLogs {
    async fn stream_access_logs(
        &self,
        request: tonic::Request<tonic::Streaming<StreamAccessLogsMessage>>,
    ) -> Result<tonic::Response<StreamAccessLogsResponse>, tonic::Status> {
        let mut stream = request.into_inner();
        while let Some(message) = stream.message().await? {
            self.ingest(&message).await;
        }
        Ok(tonic::Response::new(StreamAccessLogsResponse {}))
    }
}

#[cfg(test)]
mod tests;
