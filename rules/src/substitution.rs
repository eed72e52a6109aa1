//! Placeholder substitution: for APIs that want the secret somewhere other than an
//! auth header (a Telegram bot token in the path, `?api_key=` in the query, a header
//! the agent builds, a field of a JSON or form body). A service declares
//! `substitutions: [{"key", "placeholder", "in": ["path"|"query"|"header"|"body"]}]`;
//! the agent writes the placeholder (`__TELEGRAM_TOKEN__`) and the filter replaces it
//! on the way out, on the declared surfaces only: anywhere else the placeholder passes
//! literally.
//!
//! This module holds what both sides need and what can be tested without Envoy: the
//! declaration and its validation (the control plane refuses a bad one), and the pure
//! functions that write a value into each surface with that surface's encoding (the
//! filter calls them). A value is always encoded for where it lands, so a secret
//! holding `/`, `&`, `"` or a newline can neither change the request's structure nor
//! inject a header.

use serde::{Deserialize, Serialize};

use crate::error::RuleError;
use crate::names::validate_credential_key;

/// Shortest placeholder: long enough not to occur by accident.
pub const MIN_PLACEHOLDER_LEN: usize = 8;
/// Longest placeholder.
pub const MAX_PLACEHOLDER_LEN: usize = 64;
/// Substitutions one service may declare.
pub const MAX_SUBSTITUTIONS: usize = 16;

/// Where in a request a placeholder is replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Surface {
    /// The URL path (before `?`); the value is percent-encoded as a path segment.
    Path,
    /// The query string (after `?`); the value is percent-encoded as a component.
    Query,
    /// Request header values; a value with a control character is refused.
    Header,
    /// A JSON (string-escaped) or form-encoded (`application/x-www-form-urlencoded`) body.
    Body,
}

/// One declared substitution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Substitution {
    /// The credential key whose value replaces the placeholder.
    pub key: String,
    /// What the agent writes, e.g. `__TELEGRAM_TOKEN__`: `A-Z`, `0-9` and `_`, starting
    /// and ending with `__`, [`MIN_PLACEHOLDER_LEN`]–[`MAX_PLACEHOLDER_LEN`] characters.
    pub placeholder: String,
    /// The surfaces it is replaced on (at least one, each once).
    #[serde(rename = "in")]
    pub surfaces: Vec<Surface>,
}

impl Surface {
    /// As JSON (and the CLI's `--substitute`) names it.
    pub fn as_str(self) -> &'static str {
        match self {
            Surface::Path => "path",
            Surface::Query => "query",
            Surface::Header => "header",
            Surface::Body => "body",
        }
    }
}

impl Substitution {
    /// Whether it applies on `surface`.
    pub fn applies_to(&self, surface: Surface) -> bool {
        self.surfaces.contains(&surface)
    }
}

fn invalid(placeholder: &str, reason: impl Into<String>) -> RuleError {
    RuleError::InvalidSubstitution {
        placeholder: placeholder.to_owned(),
        reason: reason.into(),
    }
}

/// Checks one placeholder's form.
fn validate_placeholder(placeholder: &str) -> Result<(), RuleError> {
    let len = placeholder.len();
    if !(MIN_PLACEHOLDER_LEN..=MAX_PLACEHOLDER_LEN).contains(&len) {
        return Err(invalid(
            placeholder,
            format!("a placeholder has {MIN_PLACEHOLDER_LEN} to {MAX_PLACEHOLDER_LEN} characters"),
        ));
    }
    if !placeholder
        .bytes()
        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(invalid(
            placeholder,
            "a placeholder holds only A-Z, 0-9 and _ (it must survive URL and JSON unchanged)",
        ));
    }
    let inner = placeholder
        .strip_prefix("__")
        .and_then(|rest| rest.strip_suffix("__"));
    match inner {
        Some(inner) if inner.bytes().any(|b| b != b'_') => Ok(()),
        _ => Err(invalid(
            placeholder,
            "a placeholder starts and ends with __ and names something in between, e.g. __TELEGRAM_TOKEN__",
        )),
    }
}

/// Checks a service's substitutions: each key a credential key, each placeholder
/// well-formed, each surface list non-empty without repeats, at most
/// [`MAX_SUBSTITUTIONS`], and no placeholder equal to or inside another (the order of
/// replacement would then change the result).
pub fn validate_substitutions(substitutions: &[Substitution]) -> Result<(), RuleError> {
    if substitutions.len() > MAX_SUBSTITUTIONS {
        return Err(invalid(
            "",
            format!("a service declares at most {MAX_SUBSTITUTIONS} substitutions"),
        ));
    }
    for (index, substitution) in substitutions.iter().enumerate() {
        validate_credential_key(&substitution.key)
            .map_err(|e| invalid(&substitution.placeholder, format!("its key: {e}")))?;
        validate_placeholder(&substitution.placeholder)?;
        let surfaces = &substitution.surfaces;
        if surfaces.is_empty() {
            return Err(invalid(
                &substitution.placeholder,
                "\"in\" names at least one of path, query, header, body",
            ));
        }
        for (at, surface) in surfaces.iter().enumerate() {
            if surfaces.iter().skip(at + 1).any(|other| other == surface) {
                return Err(invalid(
                    &substitution.placeholder,
                    format!("\"in\" lists {surface:?} twice").to_lowercase(),
                ));
            }
        }
        for other in substitutions.iter().skip(index + 1) {
            let (a, b) = (&substitution.placeholder, &other.placeholder);
            if a.contains(b.as_str()) || b.contains(a.as_str()) {
                return Err(invalid(
                    a,
                    format!("collides with placeholder {b:?}: no placeholder may equal or contain another"),
                ));
            }
        }
    }
    Ok(())
}

/// Why a value could not be written into a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubstitutionError {
    /// A header value would hold a control character (CR, LF, NUL, ...): refused, as it
    /// could end the header and start another.
    UnsafeHeaderValue {
        /// The key whose value it is.
        key: String,
    },
    /// The body's content type is neither JSON nor form-encoded.
    UnsupportedBody {
        /// The content type as sent (empty when absent).
        content_type: String,
    },
    /// A JSON body is not UTF-8.
    BodyNotUtf8,
}

/// Percent-encodes every byte of `value` but the unreserved ones (`A-Z a-z 0-9 - . _ ~`)
/// and `:` and `@`, which RFC 3986 allows as they are in a path segment and in a query
/// (a Telegram bot token, `123456:ABC…`, arrives as written): safe in a path segment
/// and in a query component alike.
pub fn percent_encode(value: &str) -> String {
    encode_bytes(value, false)
}

/// `application/x-www-form-urlencoded`: every byte but the unreserved ones encoded, a
/// space as `+`.
pub fn form_encode(value: &str) -> String {
    encode_bytes(value, true)
}

fn encode_bytes(value: &str, form: bool) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(char::from(byte));
            }
            b':' | b'@' if !form => out.push(char::from(byte)),
            b' ' if form => out.push('+'),
            _ => {
                out.push('%');
                out.push(char::from(HEX[usize::from(byte >> 4)]));
                out.push(char::from(HEX[usize::from(byte & 0x0f)]));
            }
        }
    }
    out
}

/// `value` escaped for the inside of a JSON string (no quotes added).
pub fn json_escape(value: &str) -> String {
    let quoted = serde_json::Value::String(value.to_owned()).to_string();
    quoted
        .strip_prefix('"')
        .and_then(|rest| rest.strip_suffix('"'))
        .map_or(quoted.clone(), str::to_owned)
}

/// Replaces every occurrence of `placeholder` in `text` with `replacement`; returns the
/// new text and how many were replaced.
pub fn replace_counted(text: &str, placeholder: &str, replacement: &str) -> (String, usize) {
    let count = text.matches(placeholder).count();
    if count == 0 {
        return (text.to_owned(), 0);
    }
    (text.replace(placeholder, replacement), count)
}

/// A substitution with the value of its key.
pub type Filled<'a> = (&'a Substitution, &'a str);

/// Substitutes in a request's `:path` (path, then `?` and the query): the
/// placeholders declared for `path` in the path part, those for `query` in the query
/// part, each value percent-encoded. Returns the new `:path` and the count.
pub fn substitute_path_and_query(path_and_query: &str, filled: &[Filled<'_>]) -> (String, usize) {
    let (path, query) = match path_and_query.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path_and_query, None),
    };
    let mut total = 0;
    let mut path = path.to_owned();
    let mut query = query.map(str::to_owned);
    for (substitution, value) in filled {
        let encoded = percent_encode(value);
        if substitution.applies_to(Surface::Path) {
            let (next, count) = replace_counted(&path, &substitution.placeholder, &encoded);
            path = next;
            total += count;
        }
        if let (true, Some(text)) = (substitution.applies_to(Surface::Query), query.as_mut()) {
            let (next, count) = replace_counted(text, &substitution.placeholder, &encoded);
            *text = next;
            total += count;
        }
    }
    let whole = match query {
        Some(query) => format!("{path}?{query}"),
        None => path,
    };
    (whole, total)
}

/// Substitutes in one header value (the placeholders declared for `header`); a value
/// with a control character other than tab is refused.
pub fn substitute_header(
    header_value: &str,
    filled: &[Filled<'_>],
) -> Result<(String, usize), SubstitutionError> {
    let mut total = 0;
    let mut out = header_value.to_owned();
    for (substitution, value) in filled {
        if !substitution.applies_to(Surface::Header) || !out.contains(&substitution.placeholder) {
            continue;
        }
        if value.chars().any(|c| c.is_control() && c != '\t') {
            return Err(SubstitutionError::UnsafeHeaderValue {
                key: substitution.key.clone(),
            });
        }
        let (next, count) = replace_counted(&out, &substitution.placeholder, value);
        out = next;
        total += count;
    }
    Ok((out, total))
}

/// How a body is written, from its `content-type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// `application/json` or `application/*+json`: values JSON-string-escaped.
    Json,
    /// `application/x-www-form-urlencoded`: values form-encoded.
    Form,
}

impl BodyKind {
    /// The kind of a body with this `content-type` (parameters ignored), if it is one
    /// substitution handles.
    pub fn of(content_type: &str) -> Option<BodyKind> {
        let essence = content_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        if essence == "application/json"
            || (essence.starts_with("application/") && essence.ends_with("+json"))
        {
            Some(BodyKind::Json)
        } else if essence == "application/x-www-form-urlencoded" {
            Some(BodyKind::Form)
        } else {
            None
        }
    }
}

/// Substitutes in a whole (buffered) request body: the placeholders declared for
/// `body`, each value encoded for the body's kind. A body of another content type that
/// holds a declared placeholder is refused (the value's encoding would be a guess); one
/// that holds none is left alone.
pub fn substitute_body(
    body: &[u8],
    content_type: &str,
    filled: &[Filled<'_>],
) -> Result<(Vec<u8>, usize), SubstitutionError> {
    let declared: Vec<&Filled<'_>> = filled
        .iter()
        .filter(|(s, _)| s.applies_to(Surface::Body))
        .collect();
    let present = |placeholder: &str| {
        body.windows(placeholder.len())
            .any(|window| window == placeholder.as_bytes())
    };
    if !declared.iter().any(|(s, _)| present(&s.placeholder)) {
        return Ok((body.to_vec(), 0));
    }
    let kind = BodyKind::of(content_type).ok_or_else(|| SubstitutionError::UnsupportedBody {
        content_type: content_type.to_owned(),
    })?;
    let mut text = String::from_utf8(body.to_vec()).map_err(|_| SubstitutionError::BodyNotUtf8)?;
    let mut total = 0;
    for (substitution, value) in declared {
        let encoded = match kind {
            BodyKind::Json => json_escape(value),
            BodyKind::Form => form_encode(value),
        };
        let (next, count) = replace_counted(&text, &substitution.placeholder, &encoded);
        text = next;
        total += count;
    }
    Ok((text.into_bytes(), total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(key: &str, placeholder: &str, surfaces: &[Surface]) -> Substitution {
        Substitution {
            key: key.into(),
            placeholder: placeholder.into(),
            surfaces: surfaces.to_vec(),
        }
    }

    #[test]
    fn the_declaration_reads_and_writes_the_issues_json() {
        let json = r#"{"key":"TELEGRAM_TOKEN","placeholder":"__TELEGRAM_TOKEN__","in":["path"]}"#;
        let parsed: Substitution = serde_json::from_str(json).unwrap();
        assert_eq!(
            parsed,
            sub("TELEGRAM_TOKEN", "__TELEGRAM_TOKEN__", &[Surface::Path])
        );
        assert_eq!(serde_json::to_string(&parsed).unwrap(), json);
        assert!(serde_json::from_str::<Substitution>(
            r#"{"key":"K","placeholder":"__KKKKKK__","in":["cookie"]}"#
        )
        .is_err());
        assert!(serde_json::from_str::<Substitution>(
            r#"{"key":"K","placeholder":"__KKKKKK__","in":["path"],"extra":1}"#
        )
        .is_err());
    }

    #[test]
    fn every_bad_declaration_is_refused_with_a_reason() {
        let ok = sub("TOKEN", "__TOKEN__", &[Surface::Path, Surface::Query]);
        assert_eq!(validate_substitutions(std::slice::from_ref(&ok)), Ok(()));
        #[rustfmt::skip]
        let cases: Vec<(&str, Vec<Substitution>, &str)> = vec![
            ("too short", vec![sub("T", "__AB__", &[Surface::Path])], "8 to 64"),
            ("too long", vec![sub("T", &format!("__{}__", "A".repeat(61)), &[Surface::Path])], "8 to 64"),
            ("lowercase", vec![sub("T", "__token__", &[Surface::Path])], "only A-Z"),
            ("a character URLs change", vec![sub("T", "__TO-KEN__", &[Surface::Path])], "only A-Z"),
            ("no leading __", vec![sub("T", "TOKEN_VALUE__", &[Surface::Path])], "starts and ends with __"),
            ("nothing between", vec![sub("T", "________", &[Surface::Path])], "names something"),
            ("no surface", vec![sub("T", "__TOKEN__", &[])], "at least one"),
            ("a surface twice", vec![sub("T", "__TOKEN__", &[Surface::Body, Surface::Body])], "body twice"),
            ("the same placeholder twice", vec![sub("A", "__TOKEN__", &[Surface::Path]), sub("B", "__TOKEN__", &[Surface::Query])], "collides"),
            ("one inside another", vec![sub("A", "__TOKEN__", &[Surface::Path]), sub("B", "__TOKEN__2__", &[Surface::Query])], "collides"),
            ("too many", (0..17).map(|i| sub("T", &format!("__TOKEN_{i:02}_X__"), &[Surface::Path])).collect(), "at most 16"),
        ];
        for (behaviour, substitutions, reason) in cases {
            let error = validate_substitutions(&substitutions).unwrap_err();
            assert_eq!(error.code(), "invalid_substitution", "{behaviour}");
            assert!(error.to_string().contains(reason), "{behaviour}: {error}");
        }
        // A bad key is the substitution's fault: its code, and the key rule in words.
        let bad_key =
            validate_substitutions(&[sub("bad-key", "__TOKEN__", &[Surface::Path])]).unwrap_err();
        assert_eq!(bad_key.code(), "invalid_substitution");
        assert!(bad_key.to_string().contains("\"bad-key\""), "{bad_key}");
    }

    #[test]
    fn values_are_encoded_for_where_they_land() {
        let value = "a/b?c&d=e f\"g\\h\ni%";
        assert_eq!(
            percent_encode(value),
            "a%2Fb%3Fc%26d%3De%20f%22g%5Ch%0Ai%25"
        );
        assert_eq!(form_encode(value), "a%2Fb%3Fc%26d%3De+f%22g%5Ch%0Ai%25");
        assert_eq!(json_escape(value), "a/b?c&d=e f\\\"g\\\\h\\ni%");
        assert_eq!(percent_encode("bot123:AAH-x_y.z~@"), "bot123:AAH-x_y.z~@");
        assert_eq!(form_encode("bot123:AAH@"), "bot123%3AAAH%40");
    }

    #[test]
    fn path_and_query_each_get_only_their_declared_placeholders() {
        let in_path = sub("TELEGRAM", "__TELEGRAM_TOKEN__", &[Surface::Path]);
        let in_query = sub("API_KEY", "__API_KEY_____", &[Surface::Query]);
        let filled = [(&in_path, "123:ABC/x"), (&in_query, "k&v")];
        let (out, count) = substitute_path_and_query(
            "/bot__TELEGRAM_TOKEN__/send?api_key=__API_KEY_____&echo=__TELEGRAM_TOKEN__",
            &filled,
        );
        assert_eq!(
            out,
            "/bot123:ABC%2Fx/send?api_key=k%26v&echo=__TELEGRAM_TOKEN__"
        );
        assert_eq!(count, 2);
        // A query placeholder in the path passes literally; no query at all is fine.
        let (out, count) = substitute_path_and_query("/v1/__API_KEY_____", &filled);
        assert_eq!((out.as_str(), count), ("/v1/__API_KEY_____", 0));
    }

    #[test]
    fn header_values_get_their_placeholders_and_never_a_line_break() {
        let header = sub("TOKEN", "__TOKEN__", &[Surface::Header]);
        let (out, count) =
            substitute_header("Token __TOKEN__, again __TOKEN__", &[(&header, "t1")]).unwrap();
        assert_eq!((out.as_str(), count), ("Token t1, again t1", 2));
        assert_eq!(
            substitute_header("Token __TOKEN__", &[(&header, "t1\r\nX-Evil: 1")]),
            Err(SubstitutionError::UnsafeHeaderValue {
                key: "TOKEN".into()
            })
        );
        // Not declared for headers: literal.
        let path_only = sub("TOKEN", "__TOKEN__", &[Surface::Path]);
        let (out, count) = substitute_header("__TOKEN__", &[(&path_only, "t1")]).unwrap();
        assert_eq!((out.as_str(), count), ("__TOKEN__", 0));
    }

    #[test]
    fn bodies_are_written_by_content_type_and_others_refused() {
        let body_sub = sub("SECRET", "__SECRET__", &[Surface::Body]);
        let filled = [(&body_sub, "p\"a ss&")];
        let (json, count) = substitute_body(
            br#"{"password":"__SECRET__","note":"__SECRET__"}"#,
            "application/json; charset=utf-8",
            &filled,
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(json.clone()).unwrap(),
            r#"{"password":"p\"a ss&","note":"p\"a ss&"}"#
        );
        assert_eq!(count, 2);
        let parsed: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(parsed["password"], "p\"a ss&");
        let (form, _) = substitute_body(
            b"user=me&pass=__SECRET__",
            "application/x-www-form-urlencoded",
            &filled,
        )
        .unwrap();
        assert_eq!(form, b"user=me&pass=p%22a+ss%26");
        assert_eq!(
            BodyKind::of("application/vnd.api+json"),
            Some(BodyKind::Json)
        );
        assert_eq!(
            substitute_body(b"__SECRET__", "text/plain", &filled),
            Err(SubstitutionError::UnsupportedBody {
                content_type: "text/plain".into()
            })
        );
        // No placeholder: any body passes untouched, whatever its type.
        let (same, count) = substitute_body(b"\xff\x00binary", "image/png", &filled).unwrap();
        assert_eq!((same.as_slice(), count), (&b"\xff\x00binary"[..], 0));
        assert_eq!(
            substitute_body(b"__SECRET__\xff", "application/json", &filled),
            Err(SubstitutionError::BodyNotUtf8)
        );
    }
}
