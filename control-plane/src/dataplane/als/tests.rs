use std::collections::HashMap;

use envoy_types::pb::envoy::data::accesslog::v3::{
    AccessLogCommon, HttpRequestProperties, HttpResponseProperties,
};
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::HttpAccessLogEntries;
use envoy_types::pb::google::protobuf::{Timestamp, UInt32Value};

use super::*;

const STATE: &str = "1\tclaude\tdefault\tstripe\tapi.stripe.com\t\t2\t\t";

fn bytes_any(text: &str) -> Any {
    Any {
        type_url: "type.googleapis.com/google.protobuf.BytesValue".to_owned(),
        value: BytesValue {
            value: text.as_bytes().to_vec(),
        }
        .encode_to_vec(),
    }
}

fn entry(state: Option<Any>, method: RequestMethod, path: &str, status: u32) -> HttpAccessLogEntry {
    let mut objects = HashMap::new();
    if let Some(state) = state {
        objects.insert(LOG_STATE_FILTER_STATE.to_owned(), state);
    }
    HttpAccessLogEntry {
        common_properties: Some(AccessLogCommon {
            start_time: Some(Timestamp {
                seconds: 1_700_000_000,
                nanos: 123_456_789,
            }),
            time_to_last_downstream_tx_byte: Some(Duration {
                seconds: 1,
                nanos: 42_900_000,
            }),
            duration: Some(Duration {
                seconds: 9,
                nanos: 0,
            }),
            filter_state_objects: objects,
            ..AccessLogCommon::default()
        }),
        request: Some(HttpRequestProperties {
            request_method: method as i32,
            path: path.to_owned(),
            ..HttpRequestProperties::default()
        }),
        response: Some(HttpResponseProperties {
            response_code: Some(UInt32Value { value: status }),
            ..HttpResponseProperties::default()
        }),
        ..HttpAccessLogEntry::default()
    }
}

#[test]
fn an_entry_with_the_filters_state_is_the_record_the_filter_would_post() {
    let record = record(&entry(
        Some(bytes_any(STATE)),
        RequestMethod::Post,
        "/v1/charges?api_key=sk_live_secret#frag",
        201,
    ));
    assert_eq!(
        record,
        Ok(LogRecord {
            ts: 1_700_000_000_123,
            agent: "claude".into(),
            vault: "default".into(),
            method: "POST".into(),
            host: "api.stripe.com".into(),
            path: "/v1/charges".into(),
            service: Some("stripe".into()),
            status: 201,
            latency_ms: 1042,
            error: None,
            redactions: 2,
        })
    );
}

#[test]
fn a_path_the_filter_rewrote_is_the_agents_from_the_state_never_envoys() {
    let state = STATE.replace("\t2\t\t", "\t2\t\t/bot__TOKEN__/send");
    let record = record(&entry(
        Some(bytes_any(&state)),
        RequestMethod::Get,
        "/bot123456:SECRET/send?q=1",
        200,
    ))
    .unwrap();
    assert_eq!(record.path, "/bot__TOKEN__/send");
}

#[test]
fn the_method_is_envoys_unless_the_state_names_one_envoy_cannot() {
    let cases = [
        (RequestMethod::Get, STATE.to_owned(), "GET"),
        (RequestMethod::Connect, STATE.to_owned(), "CONNECT"),
        (RequestMethod::Patch, STATE.to_owned(), "PATCH"),
        (RequestMethod::MethodUnspecified, STATE.to_owned(), ""),
        (
            RequestMethod::MethodUnspecified,
            STATE.replace("\t2\t\t", "\t2\tPROPFIND\t"),
            "PROPFIND",
        ),
    ];
    for (method, state, expected) in cases {
        let record = record(&entry(Some(bytes_any(&state)), method, "/", 200)).unwrap();
        assert_eq!(record.method, expected, "{method:?}");
    }
}

#[test]
fn without_a_last_byte_the_latency_is_the_streams_duration_and_without_a_response_the_status_0() {
    let mut entry = entry(Some(bytes_any(STATE)), RequestMethod::Get, "/", 200);
    if let Some(common) = entry.common_properties.as_mut() {
        common.time_to_last_downstream_tx_byte = None;
    }
    entry.response = None;
    let record = record(&entry).unwrap();
    assert_eq!((record.latency_ms, record.status), (9000, 0));
}

#[test]
fn entries_without_the_state_or_with_a_bad_one_are_skipped_with_the_reason() {
    let string_any = Any {
        type_url: "type.googleapis.com/google.protobuf.StringValue".to_owned(),
        value: StringValue {
            value: STATE.to_owned(),
        }
        .encode_to_vec(),
    };
    assert!(record(&entry(Some(string_any), RequestMethod::Get, "/", 200)).is_ok());
    let cases = [
        (None, Skipped::NoState),
        (
            Some(bytes_any("2\ta")),
            Skipped::Invalid(
                "request-log state of version \"2\"; this control plane reads version 1".into(),
            ),
        ),
        (
            Some(Any {
                type_url: "type.googleapis.com/google.protobuf.Struct".into(),
                value: vec![],
            }),
            Skipped::Invalid(
                "filter state of type \"type.googleapis.com/google.protobuf.Struct\", not bytes"
                    .into(),
            ),
        ),
        (
            Some(Any {
                type_url: "type.googleapis.com/google.protobuf.BytesValue".into(),
                value: vec![0xff, 0xff],
            }),
            Skipped::Invalid(String::new()),
        ),
    ];
    for (state, expected) in cases {
        let got = record(&entry(state, RequestMethod::Get, "/", 200));
        match (&got, &expected) {
            (Err(Skipped::Invalid(reason)), Skipped::Invalid(want)) if want.is_empty() => {
                assert!(
                    reason.starts_with("a BytesValue that does not decode"),
                    "{reason}"
                )
            }
            _ => assert_eq!(got, Err(expected)),
        }
    }
    let without_common = HttpAccessLogEntry::default();
    assert_eq!(record(&without_common), Err(Skipped::NoState));
}

#[test]
fn a_message_gives_its_records_and_counts_the_skipped() {
    let message = StreamAccessLogsMessage {
        identifier: None,
        log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries {
            log_entry: vec![
                entry(Some(bytes_any(STATE)), RequestMethod::Get, "/a?q=1", 200),
                entry(None, RequestMethod::Get, "/b", 403),
                entry(Some(bytes_any(STATE)), RequestMethod::Get, "/c", 200),
            ],
        })),
    };
    let (records, skipped) = records(&message);
    let paths: Vec<&str> = records.iter().map(|r| r.path.as_str()).collect();
    assert_eq!((paths, skipped), (vec!["/a", "/c"], 1));
}

#[tokio::test]
async fn a_message_is_stored_through_the_request_log_and_counted() {
    let (_dir, state, _token) = crate::dataplane::tests::seeded();
    let service = AccessLogs {
        state: state.clone(),
    };
    let message = StreamAccessLogsMessage {
        identifier: None,
        log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries {
            log_entry: vec![
                entry(Some(bytes_any(STATE)), RequestMethod::Get, "/a?q=1", 200),
                entry(None, RequestMethod::Get, "/b", 403),
                entry(
                    Some(bytes_any("1\tclaude\tno-such-vault\t\th\t\t\t\t")),
                    RequestMethod::Get,
                    "/c",
                    200,
                ),
            ],
        })),
    };
    // Recent, or retention would drop it.
    let mut message = message;
    if let Some(LogEntries::HttpLogs(http)) = message.log_entries.as_mut() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        for entry in &mut http.log_entry {
            if let Some(common) = entry.common_properties.as_mut() {
                common.start_time = Some(Timestamp {
                    seconds: now.as_secs() as i64,
                    nanos: 0,
                });
            }
        }
    }
    assert_eq!(
        service.ingest(&message).await,
        1,
        "an unknown vault's record is dropped"
    );
    let counts = state.stats.counts();
    assert_eq!((counts.als_records, counts.als_skipped), (2, 1));
    let page = state
        .store
        .read_logs(&crate::testing::owner(), "default", None, 10)
        .unwrap();
    let paths: Vec<&str> = page
        .records
        .iter()
        .map(|r| r.record.path.as_str())
        .collect();
    assert_eq!(paths, ["/a"]);
}
