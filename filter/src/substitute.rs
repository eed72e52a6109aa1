//! Placeholder substitution in a forwarded request (request side only; what the
//! response does is another module's business).
//!
//! A service may declare `substitutions` ([`agent_vault_rules::substitution`]): the
//! agent writes a placeholder, the filter writes the key's value in its place on the
//! declared surfaces, each with that surface's encoding, and nowhere else.
//!
//! - Path, query and headers: when the request's headers are forwarded (a cache hit,
//!   or after a fetch), [`plan`] works out the header edits from the headers the
//!   driver already read; the host applies them with the forward. Pseudo-headers other
//!   than `:path`, the headers the filter itself removes or sets, and the framing
//!   headers are never substituted in.
//! - Body: for a service with a `body` substitution, the request's body is taken into
//!   the VM chunk by chunk (up to
//!   [`crate::config::Config::max_substitution_body_bytes`], else 413), substituted
//!   whole by content type ([`substitute_body`]) and sent on as the last chunk (see
//!   [`crate::driver::Http::on_request_body`]). Its length changes, so a
//!   `content-length` is removed when the headers are forwarded and Envoy sends the
//!   body upstream chunked.
//!
//! Until a request's headers are forwarded its [`BodyPlan`] is [`BodyPlan::Hold`]: no
//! body callback ever lets a request that waits for a credential (or was refused)
//! continue.

use agent_vault_rules::reply::{self, Reject};
use agent_vault_rules::substitution::{self, Filled, SubstitutionError, Surface};

use crate::config::Config;
use crate::decide::{Forward, Secrets};
use crate::header_map::HeaderMap;
use crate::tunnel::TUNNEL_HEADER;

/// What a request's body callbacks do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum BodyPlan {
    /// The headers are not forwarded (the request waits for a credential fetch, or was
    /// refused): the body never continues.
    #[default]
    Hold,
    /// Forwarded; the body passes as it comes.
    Pass,
    /// Forwarded to a service with a `body` substitution: the body is buffered whole,
    /// then substituted.
    Substitute {
        /// The request's `content-type` (empty when absent).
        content_type: String,
        /// The largest body buffered.
        limit: u64,
        /// The service's name, for the refusals.
        service: String,
    },
}

/// What substitution changes in a request's headers, and how its body is handled.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Edits {
    /// Headers to replace, each with all its new values (none: remove it), in order.
    /// `:path` is one of them when the path or query changed.
    pub headers: Vec<(String, Vec<String>)>,
    /// What the body callbacks do.
    pub body: BodyPlan,
}

/// Whom a refusal names.
#[derive(Debug, Clone, Copy)]
pub struct Names<'a> {
    /// The vault.
    pub vault: &'a str,
    /// The service.
    pub service: &'a str,
}

/// The substitutions of `secrets` with their values.
fn filled(secrets: &Secrets) -> Vec<Filled<'_>> {
    secrets
        .substitutions
        .iter()
        .map(|(substitution, value)| (substitution, value.expose()))
        .collect()
}

/// Headers never substituted in: those the filter removes or sets, and the framing.
fn is_managed(name: &str, config: &Config, forward: &Forward) -> bool {
    name.starts_with(':')
        || matches!(
            name,
            "proxy-authorization" | "x-vault" | "content-length" | "transfer-encoding" | "host"
        )
        || name == TUNNEL_HEADER
        || name == config.tls_header
        || forward.inject.iter().any(|(injected, _)| injected == name)
}

/// Works out what `forward`'s substitutions change in the request whose headers are
/// `known`: the new `:path`, the header values, and the body's handling. A value that
/// cannot go into a header → 502 `invalid_credential_value`; a declared
/// `content-length` over the bound of a body substitution → 413.
pub fn plan(
    config: &Config,
    forward: &Forward,
    known: &HeaderMap,
    names: Names<'_>,
) -> Result<Edits, Reject> {
    let Some(secrets) = forward
        .secrets
        .as_ref()
        .filter(|secrets| !secrets.substitutions.is_empty())
    else {
        return Ok(Edits {
            headers: Vec::new(),
            body: BodyPlan::Pass,
        });
    };
    let filled = filled(secrets);
    let declares = |surface: Surface| filled.iter().any(|(s, _)| s.applies_to(surface));
    let mut edits = Edits {
        headers: Vec::new(),
        body: BodyPlan::Pass,
    };
    if declares(Surface::Path) || declares(Surface::Query) {
        if let Some(path) = known.get(":path") {
            let (new_path, count) = substitution::substitute_path_and_query(path, &filled);
            if count > 0 {
                edits.headers.push((":path".to_owned(), vec![new_path]));
            }
        }
    }
    if declares(Surface::Header) {
        header_edits(config, forward, known, &filled, names, &mut edits.headers)?;
    }
    if declares(Surface::Body) && !carries_messages(known) {
        let limit = config.max_substitution_body_bytes;
        let declared = known
            .get("content-length")
            .and_then(|length| length.trim().parse::<u64>().ok());
        if let Some(length) = declared {
            if length > limit {
                return Err(reply::request_body_too_large(
                    names.service,
                    limit,
                    Some(length),
                ));
            }
            if length > 0 {
                // The substituted body has another length: Envoy sends it chunked.
                edits
                    .headers
                    .push(("content-length".to_owned(), Vec::new()));
            }
        }
        edits.body = BodyPlan::Substitute {
            content_type: known.get("content-type").unwrap_or_default().to_owned(),
            limit,
            service: names.service.to_owned(),
        };
    }
    Ok(edits)
}

/// Whether what follows the request's headers is a stream of messages rather than a
/// body to substitute in: a WebSocket's frames (an upgrade) or a gRPC call's
/// length-prefixed messages (binary, and streamed: buffering them to the end would stall
/// a streaming call). They pass untouched, placeholders included, as on an undeclared
/// surface.
fn carries_messages(known: &HeaderMap) -> bool {
    known.contains("upgrade") || agent_vault_rules::reply::is_grpc(known.get("content-type"))
}

/// The header edits: every value of each header (not managed by the filter) that
/// holds a placeholder declared for headers. A header with a value that is not UTF-8
/// is left alone.
fn header_edits(
    config: &Config,
    forward: &Forward,
    known: &HeaderMap,
    filled: &[Filled<'_>],
    names: Names<'_>,
    edits: &mut Vec<(String, Vec<String>)>,
) -> Result<(), Reject> {
    let holds_placeholder = |value: &[u8]| {
        filled.iter().any(|(s, _)| {
            s.applies_to(Surface::Header)
                && value
                    .windows(s.placeholder.len())
                    .any(|window| window == s.placeholder.as_bytes())
        })
    };
    for (name, value) in known.iter() {
        let Ok(name) = std::str::from_utf8(name) else {
            continue;
        };
        if !holds_placeholder(value)
            || is_managed(name, config, forward)
            || edits.iter().any(|(done, _)| done == name)
        {
            continue;
        }
        let mut values = Vec::new();
        for value in known.all(name) {
            let Ok(value) = std::str::from_utf8(value) else {
                values.clear();
                break;
            };
            let (new_value, _) =
                substitution::substitute_header(value, filled).map_err(|error| match error {
                    SubstitutionError::UnsafeHeaderValue { key } => {
                        reply::unsafe_substituted_header(names.vault, &key)
                    }
                    // Not produced for headers.
                    _ => reply::invalid_service(names.vault, names.service, "substitution"),
                })?;
            values.push(new_value);
        }
        if !values.is_empty() {
            edits.push((name.to_owned(), values));
        }
    }
    Ok(())
}

/// Substitutes in a whole buffered body; `None` when it is unchanged. A placeholder in
/// a body of another type than JSON or form → 415.
pub fn substitute_body(
    secrets: &Secrets,
    body: &[u8],
    content_type: &str,
    service: &str,
) -> Result<Option<Vec<u8>>, Reject> {
    let filled = filled(secrets);
    match substitution::substitute_body(body, content_type, &filled) {
        Ok((_, 0)) => Ok(None),
        Ok((new_body, _)) => Ok(Some(new_body)),
        Err(SubstitutionError::BodyNotUtf8) => Err(reply::substitution_body_not_utf8(service)),
        Err(_) => Err(reply::unsupported_substitution_body(service, content_type)),
    }
}

#[cfg(test)]
mod tests {
    use std::rc::Rc;

    use agent_vault_rules::substitution::Substitution;

    use super::*;
    use crate::cache::Secret;
    use crate::decide::Route;
    use crate::header_map::serialize;

    const NAMES: Names<'static> = Names {
        vault: "default",
        service: "tg",
    };

    fn forward(substitutions: &[(&str, &[Surface], &str)]) -> Forward {
        Forward {
            inject: vec![("authorization".to_owned(), "Bearer x".to_owned())],
            route: Route::Tls,
            authority: None,
            open_host: false,
            secrets: Some(Rc::new(Secrets {
                substitutions: substitutions
                    .iter()
                    .map(|(placeholder, surfaces, value)| {
                        (
                            Substitution {
                                key: "KEY".to_owned(),
                                placeholder: (*placeholder).to_owned(),
                                surfaces: surfaces.to_vec(),
                            },
                            Secret::new((*value).to_owned()),
                        )
                    })
                    .collect(),
                redact: Vec::new(),
                patterns: None,
            })),
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let pairs: Vec<(&str, &[u8])> = pairs.iter().map(|(n, v)| (*n, v.as_bytes())).collect();
        HeaderMap::parse(serialize(&pairs))
    }

    fn edits(pairs: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
        pairs
            .iter()
            .map(|(name, values)| {
                (
                    (*name).to_owned(),
                    values.iter().map(|v| (*v).to_owned()).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn without_substitutions_nothing_changes_and_the_body_passes() {
        let mut plain = forward(&[]);
        let known = headers(&[(":path", "/a/__TOKEN__")]);
        assert_eq!(
            plan(&Config::default(), &plain, &known, NAMES),
            Ok(Edits::default_pass())
        );
        plain.secrets = None;
        assert_eq!(
            plan(&Config::default(), &plain, &known, NAMES),
            Ok(Edits::default_pass())
        );
    }

    #[test]
    fn each_surface_gets_only_its_placeholders_and_managed_headers_none() {
        let forward = forward(&[
            ("__IN_PATH__", &[Surface::Path], "a/b"),
            ("__IN_QUERY__", &[Surface::Query], "c&d"),
            ("__IN_HEADER__", &[Surface::Header], "e f"),
        ]);
        let known = headers(&[
            (":method", "GET"),
            (":authority", "api.example.com"),
            (
                ":path",
                "/x/__IN_PATH__/__IN_QUERY__?k=__IN_QUERY__&p=__IN_PATH__",
            ),
            ("x-api-key", "__IN_HEADER__"),
            ("x-other", "__IN_PATH__"),
            ("x-two", "one __IN_HEADER__"),
            ("x-two", "plain"),
            ("x-vault", "__IN_HEADER__"),
            ("authorization", "__IN_HEADER__"),
            ("x-agent-vault-upstream", "__IN_HEADER__"),
        ]);
        let planned = plan(&Config::default(), &forward, &known, NAMES).unwrap();
        assert_eq!(
            planned.headers,
            edits(&[
                (":path", &["/x/a%2Fb/__IN_QUERY__?k=c%26d&p=__IN_PATH__"]),
                ("x-api-key", &["e f"]),
                ("x-two", &["one e f", "plain"]),
            ])
        );
        assert_eq!(planned.body, BodyPlan::Pass);
    }

    #[test]
    fn a_header_value_with_a_line_break_is_refused_502_naming_the_key() {
        let forward = forward(&[("__IN_HEADER__", &[Surface::Header], "x\r\nEvil: 1")]);
        let known = headers(&[(":path", "/"), ("x-api-key", "__IN_HEADER__")]);
        let refused = plan(&Config::default(), &forward, &known, NAMES).unwrap_err();
        assert_eq!(refused.code.as_str(), "invalid_credential_value");
        assert!(refused.body.contains("\"KEY\""), "{}", refused.body);
        assert!(
            refused.body.contains("control character"),
            "{}",
            refused.body
        );
        assert!(!refused.body.contains("Evil"), "{}", refused.body);
        // Not sent in a header: nothing to refuse.
        let known = headers(&[(":path", "/__IN_HEADER__")]);
        assert!(plan(&Config::default(), &forward, &known, NAMES).is_ok());
    }

    #[test]
    fn a_body_substitution_buffers_drops_the_length_and_refuses_a_declared_oversize() {
        let forward = forward(&[("__IN_BODY__", &[Surface::Body], "v")]);
        let config = Config {
            max_substitution_body_bytes: 2048,
            ..Config::default()
        };
        let known = headers(&[
            (":path", "/__IN_BODY__"),
            ("content-type", "application/json"),
            ("content-length", "2048"),
        ]);
        let planned = plan(&config, &forward, &known, NAMES).unwrap();
        assert_eq!(planned.headers, edits(&[("content-length", &[])]));
        assert_eq!(
            planned.body,
            BodyPlan::Substitute {
                content_type: "application/json".to_owned(),
                limit: 2048,
                service: "tg".to_owned(),
            }
        );
        let known = headers(&[(":path", "/"), ("content-length", "2049")]);
        let refused = plan(&config, &forward, &known, NAMES).unwrap_err();
        assert_eq!(refused.status(), 413);
        assert!(refused.body.contains("2048 bytes (2049 bytes declared)"));
        // Chunked (no length) and empty bodies keep their framing.
        for known in [
            headers(&[(":path", "/"), ("transfer-encoding", "chunked")]),
            headers(&[(":path", "/"), ("content-length", "0")]),
        ] {
            let planned = plan(&config, &forward, &known, NAMES).unwrap();
            assert!(planned.headers.is_empty());
            assert!(matches!(planned.body, BodyPlan::Substitute { .. }));
        }
    }

    #[test]
    fn websocket_frames_and_grpc_messages_are_not_a_body_to_substitute_in() {
        let forward = forward(&[("__IN_BODY__", &[Surface::Body], "v")]);
        for known in [
            headers(&[(":path", "/ws"), ("upgrade", "websocket")]),
            headers(&[
                (":path", "/echo.Echo/Stream"),
                ("content-type", "application/grpc+proto"),
                ("content-length", "99999999"),
            ]),
        ] {
            let planned = plan(&Config::default(), &forward, &known, NAMES).unwrap();
            assert!(planned.headers.is_empty());
            assert_eq!(planned.body, BodyPlan::Pass);
        }
    }

    #[test]
    fn a_body_is_substituted_by_its_type_or_refused_415() {
        let forward = forward(&[("__IN_BODY__", &[Surface::Body], "p\"w")]);
        let secrets = forward.secrets.as_deref().unwrap();
        assert_eq!(
            substitute_body(secrets, br#"{"a":"__IN_BODY__"}"#, "application/json", "tg"),
            Ok(Some(br#"{"a":"p\"w"}"#.to_vec()))
        );
        assert_eq!(
            substitute_body(secrets, b"no placeholder", "text/plain", "tg"),
            Ok(None)
        );
        let refused = substitute_body(secrets, b"__IN_BODY__", "text/plain", "tg").unwrap_err();
        assert_eq!(
            (refused.status(), refused.code.as_str()),
            (415, "unsupported_substitution_body")
        );
        let refused =
            substitute_body(secrets, b"__IN_BODY__\xff", "application/json", "tg").unwrap_err();
        assert_eq!(refused.status(), 415);
    }

    impl Edits {
        fn default_pass() -> Edits {
            Edits {
                headers: Vec::new(),
                body: BodyPlan::Pass,
            }
        }
    }
}
