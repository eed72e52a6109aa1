//! How a service injects credentials: the `auth` block and header rendering.
//!
//! [`Auth`] is the JSON model of DESIGN.md §5 (`bearer`, `basic`, `api-key`, `custom`,
//! `passthrough`). It names credential *keys*, never values. [`CompiledAuth`] is the
//! validated form the filter keeps per service: header names lowercased and custom
//! templates split into literal text and keys once, so rendering on the request path is
//! lookups and string concatenation.
//!
//! Header injection must be impossible: literal text in an auth block may not hold
//! control characters, and a credential value holding CR, LF or NUL is refused at
//! render time ([`RenderError::InvalidValue`]) rather than sent.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::error::{quoted, RuleError};
use crate::names::validate_credential_key;

/// Most headers a `custom` auth may set.
pub const MAX_CUSTOM_HEADERS: usize = 16;

/// Headers a service may never set: they frame the request or belong to the proxy.
const FORBIDDEN_HEADERS: [&str; 8] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "proxy-authorization",
    "te",
    "upgrade",
    "keep-alive",
];

/// A service's auth block: which credential keys go into which headers.
///
/// Unknown fields are refused (`Passthrough` is a struct variant for that reason: serde
/// ignores extra fields of a unit variant in an internally tagged enum).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Auth {
    /// `Authorization: Bearer <token>`.
    Bearer {
        /// Key of the token.
        token: String,
    },
    /// `Authorization: Basic base64(<username>:<password>)`.
    Basic {
        /// Key of the user name.
        username: String,
        /// Key of the password.
        password: String,
    },
    /// `<header>: <prefix><key>`.
    ApiKey {
        /// Key of the API key.
        key: String,
        /// Header to set (default `x-api-key`).
        #[serde(default = "default_api_key_header")]
        header: String,
        /// Literal text in front of the value (default empty).
        #[serde(default)]
        prefix: String,
    },
    /// Each header rendered from a template: literal text with `{{ KEY }}` placeholders.
    Custom {
        /// Header name → template.
        headers: BTreeMap<String, String>,
    },
    /// Allow the host, inject nothing.
    Passthrough {},
}

fn default_api_key_header() -> String {
    "x-api-key".to_owned()
}

impl Auth {
    /// The `type` tag: `bearer`, `basic`, `api-key`, `custom` or `passthrough`.
    pub fn type_name(&self) -> &'static str {
        match self {
            Auth::Bearer { .. } => "bearer",
            Auth::Basic { .. } => "basic",
            Auth::ApiKey { .. } => "api-key",
            Auth::Custom { .. } => "custom",
            Auth::Passthrough {} => "passthrough",
        }
    }

    /// Credential keys this auth reads, sorted and deduplicated (also for an invalid
    /// block: whatever it names).
    pub fn referenced_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .keys_as_written()
            .into_iter()
            .map(str::to_owned)
            .collect();
        keys.sort();
        keys
    }

    /// Credential keys this auth reads, each once, in the order the block names them
    /// (a Basic user name before its password; custom headers by name, then each
    /// template left to right): what a person reading the rule expects to see.
    pub fn keys_as_written(&self) -> Vec<&str> {
        let named: Vec<&str> = match self {
            Auth::Bearer { token } => vec![token],
            Auth::Basic { username, password } => vec![username, password],
            Auth::ApiKey { key, .. } => vec![key],
            Auth::Custom { headers } => headers
                .values()
                .flat_map(|template| placeholder_keys(template))
                .collect(),
            Auth::Passthrough {} => Vec::new(),
        };
        let mut keys = Vec::with_capacity(named.len());
        for key in named {
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        keys
    }

    /// Lowercased names of the headers this auth sets, sorted and deduplicated: the
    /// filter removes any agent-supplied header of these names, whatever its case.
    pub fn header_names(&self) -> Vec<String> {
        let mut names: Vec<String> = match self {
            Auth::Bearer { .. } | Auth::Basic { .. } => vec!["authorization".to_owned()],
            Auth::ApiKey { header, .. } => vec![header.to_ascii_lowercase()],
            Auth::Custom { headers } => headers.keys().map(|h| h.to_ascii_lowercase()).collect(),
            Auth::Passthrough {} => Vec::new(),
        };
        names.sort();
        names.dedup();
        names
    }

    /// Checks keys, header names, templates and prefixes.
    pub fn validate(&self) -> Result<(), RuleError> {
        CompiledAuth::compile(self).map(|_| ())
    }

    /// Renders the headers to inject, looking credential values up by key. For many
    /// requests, compile once with [`CompiledAuth::compile`] and render that instead.
    pub fn render<'v, F>(&self, lookup: F) -> Result<Vec<(String, String)>, RenderError>
    where
        F: Fn(&str) -> Option<&'v str>,
    {
        CompiledAuth::compile(self)
            .map_err(RenderError::InvalidAuth)?
            .render(lookup)
    }
}

/// Why headers could not be rendered. No variant carries a credential value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// The vault has no credential with this key.
    #[error("credential {} is not set in this vault", quoted(.0))]
    Missing(String),
    /// The credential's value cannot go into a header: it holds CR, LF or NUL (or, for
    /// a Basic user name, a ':').
    #[error(
        "credential {} has a value that cannot be sent in an HTTP header (it contains CR, LF \
         or NUL, or ':' in a Basic user name)",
        quoted(.0)
    )]
    InvalidValue(String),
    /// The auth block itself is invalid.
    #[error(transparent)]
    InvalidAuth(RuleError),
}

impl RenderError {
    /// Stable machine-readable code (`credential_not_found`, ...).
    pub fn code(&self) -> &'static str {
        match self {
            RenderError::Missing(_) => "credential_not_found",
            RenderError::InvalidValue(_) => "invalid_credential_value",
            RenderError::InvalidAuth(error) => error.code(),
        }
    }
}

/// A validated auth block, ready to render on the request path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledAuth {
    type_name: &'static str,
    headers: Vec<CompiledHeader>,
    keys: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct CompiledHeader {
    /// Lowercase.
    name: String,
    value: HeaderValue,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HeaderValue {
    Template(Vec<Segment>),
    Basic { username: String, password: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Key(String),
}

impl CompiledAuth {
    /// Validates `auth` and pre-parses its templates.
    pub fn compile(auth: &Auth) -> Result<CompiledAuth, RuleError> {
        let headers = match auth {
            Auth::Bearer { token } => {
                validate_credential_key(token)?;
                vec![CompiledHeader {
                    name: "authorization".to_owned(),
                    value: HeaderValue::Template(vec![
                        Segment::Literal("Bearer ".to_owned()),
                        Segment::Key(token.clone()),
                    ]),
                }]
            }
            Auth::Basic { username, password } => {
                validate_credential_key(username)?;
                validate_credential_key(password)?;
                vec![CompiledHeader {
                    name: "authorization".to_owned(),
                    value: HeaderValue::Basic {
                        username: username.clone(),
                        password: password.clone(),
                    },
                }]
            }
            Auth::ApiKey {
                key,
                header,
                prefix,
            } => {
                validate_credential_key(key)?;
                let name = validate_header_name(header)?;
                check_literal(prefix).map_err(|what| {
                    RuleError::invalid_auth(format!(
                        "the api-key prefix {} contains {what}",
                        quoted(prefix)
                    ))
                })?;
                let mut segments = Vec::with_capacity(2);
                if !prefix.is_empty() {
                    segments.push(Segment::Literal(prefix.clone()));
                }
                segments.push(Segment::Key(key.clone()));
                vec![CompiledHeader {
                    name,
                    value: HeaderValue::Template(segments),
                }]
            }
            Auth::Custom { headers } => {
                if headers.is_empty() || headers.len() > MAX_CUSTOM_HEADERS {
                    return Err(RuleError::invalid_auth(format!(
                        "a custom auth sets 1 to {MAX_CUSTOM_HEADERS} headers, not {}",
                        headers.len()
                    )));
                }
                let mut compiled: Vec<CompiledHeader> = Vec::with_capacity(headers.len());
                for (header, template) in headers {
                    let name = validate_header_name(header)?;
                    if compiled.iter().any(|h| h.name == name) {
                        return Err(RuleError::invalid_auth(format!(
                            "header {} is set twice (header names are case-insensitive)",
                            quoted(header)
                        )));
                    }
                    let segments = parse_template(header, template)?;
                    compiled.push(CompiledHeader {
                        name,
                        value: HeaderValue::Template(segments),
                    });
                }
                compiled
            }
            Auth::Passthrough {} => Vec::new(),
        };
        Ok(CompiledAuth {
            type_name: auth.type_name(),
            headers,
            keys: auth.referenced_keys(),
        })
    }

    /// The `type` of the auth this was compiled from.
    pub fn type_name(&self) -> &'static str {
        self.type_name
    }

    /// Credential keys needed to render, sorted and deduplicated.
    pub fn keys(&self) -> &[String] {
        &self.keys
    }

    /// Lowercase names of the headers [`CompiledAuth::render`] sets.
    pub fn header_names(&self) -> impl Iterator<Item = &str> {
        self.headers.iter().map(|h| h.name.as_str())
    }

    /// The headers to inject (lowercase names), values looked up by key.
    pub fn render<'v, F>(&self, lookup: F) -> Result<Vec<(String, String)>, RenderError>
    where
        F: Fn(&str) -> Option<&'v str>,
    {
        let value = |key: &str| -> Result<&'v str, RenderError> {
            let value = lookup(key).ok_or_else(|| RenderError::Missing(key.to_owned()))?;
            if value.contains(['\r', '\n', '\0']) {
                return Err(RenderError::InvalidValue(key.to_owned()));
            }
            Ok(value)
        };
        let mut rendered = Vec::with_capacity(self.headers.len());
        for header in &self.headers {
            let text = match &header.value {
                HeaderValue::Template(segments) => {
                    let mut text = String::new();
                    for segment in segments {
                        match segment {
                            Segment::Literal(literal) => text.push_str(literal),
                            Segment::Key(key) => text.push_str(value(key)?),
                        }
                    }
                    text
                }
                HeaderValue::Basic { username, password } => {
                    let user = value(username)?;
                    // RFC 7617: the user-id cannot contain ':'; the upstream would split
                    // it in the wrong place.
                    if user.contains(':') {
                        return Err(RenderError::InvalidValue(username.clone()));
                    }
                    let pass = value(password)?;
                    let encoded =
                        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
                    format!("Basic {encoded}")
                }
            };
            rendered.push((header.name.clone(), text));
        }
        Ok(rendered)
    }
}

/// HTTP token (RFC 9110 `tchar`), not a pseudo-header, not a framing or proxy header.
/// Returns the lowercase name.
fn validate_header_name(name: &str) -> Result<String, RuleError> {
    if name.is_empty() {
        return Err(RuleError::invalid_auth("a header name is empty"));
    }
    if name.starts_with(':') {
        return Err(RuleError::invalid_auth(format!(
            "header {} is a pseudo-header; services set ordinary headers only",
            quoted(name)
        )));
    }
    let is_tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if !name.bytes().all(is_tchar) {
        return Err(RuleError::invalid_auth(format!(
            "header name {} is not a valid HTTP header name (letters, digits and \
             !#$%&'*+-.^_`|~ only)",
            quoted(name)
        )));
    }
    let lower = name.to_ascii_lowercase();
    if FORBIDDEN_HEADERS.contains(&lower.as_str()) {
        return Err(RuleError::invalid_auth(format!(
            "header {} is managed by the proxy and cannot be set by a service",
            quoted(name)
        )));
    }
    Ok(lower)
}

/// Literal header text: no control characters except tab. Returns what was found.
fn check_literal(text: &str) -> Result<(), &'static str> {
    if text.contains(['\r', '\n']) {
        Err("a line break")
    } else if text.chars().any(|c| c.is_control() && c != '\t') {
        Err("a control character")
    } else {
        Ok(())
    }
}

/// `literal {{ KEY }} literal`: spaces inside the braces are optional, placeholders
/// are optional, an unclosed `{{` or an empty or invalid key is an error.
fn parse_template(header: &str, template: &str) -> Result<Vec<Segment>, RuleError> {
    let context = || format!("the template for header {}", quoted(header));
    check_literal(template)
        .map_err(|what| RuleError::invalid_auth(format!("{} contains {what}", context())))?;
    let mut segments = Vec::new();
    let mut rest = template;
    while let Some((literal, after_open)) = rest.split_once("{{") {
        if !literal.is_empty() {
            segments.push(Segment::Literal(literal.to_owned()));
        }
        let Some((inner, after_close)) = after_open.split_once("}}") else {
            return Err(RuleError::invalid_auth(format!(
                "{} has an unclosed {{{{ (write placeholders as {{{{ KEY }}}})",
                context()
            )));
        };
        let key = inner.trim_matches([' ', '\t']);
        if key.is_empty() {
            return Err(RuleError::invalid_auth(format!(
                "{} has an empty {{{{ }}}} placeholder",
                context()
            )));
        }
        validate_credential_key(key)?;
        segments.push(Segment::Key(key.to_owned()));
        rest = after_close;
    }
    if !rest.is_empty() {
        segments.push(Segment::Literal(rest.to_owned()));
    }
    Ok(segments)
}

/// Keys of the well-formed placeholders of a template, valid or not.
fn placeholder_keys(template: &str) -> Vec<&str> {
    let mut keys = Vec::new();
    let mut rest = template;
    while let Some((_, after_open)) = rest.split_once("{{") {
        let Some((inner, after_close)) = after_open.split_once("}}") else {
            break;
        };
        let key = inner.trim_matches([' ', '\t']);
        if !key.is_empty() {
            keys.push(key);
        }
        rest = after_close;
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn custom(pairs: &[(&str, &str)]) -> Auth {
        Auth::Custom {
            headers: pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    fn api_key(key: &str, header: &str, prefix: &str) -> Auth {
        Auth::ApiKey {
            key: key.to_owned(),
            header: header.to_owned(),
            prefix: prefix.to_owned(),
        }
    }

    fn bearer(key: &str) -> Auth {
        Auth::Bearer {
            token: key.to_owned(),
        }
    }

    fn basic(user: &str, pass: &str) -> Auth {
        Auth::Basic {
            username: user.to_owned(),
            password: pass.to_owned(),
        }
    }

    #[test]
    fn json_round_trips_exactly_as_designed() {
        // (type, JSON as in DESIGN.md §5, model)
        #[rustfmt::skip]
        let cases: Vec<(&str, &str, Auth)> = vec![
            ("bearer", r#"{"type":"bearer","token":"KEY"}"#, bearer("KEY")),
            ("basic", r#"{"type":"basic","username":"KEY","password":"KEY"}"#, basic("KEY", "KEY")),
            ("api-key", r#"{"type":"api-key","key":"KEY","header":"x-api-key","prefix":""}"#, api_key("KEY", "x-api-key", "")),
            ("custom", r#"{"type":"custom","headers":{"X-Token":"tok {{ KEY }}"}}"#, custom(&[("X-Token", "tok {{ KEY }}")])),
            ("passthrough", r#"{"type":"passthrough"}"#, Auth::Passthrough {}),
        ];
        for (type_name, json, model) in cases {
            let parsed: Auth =
                serde_json::from_str(json).unwrap_or_else(|e| panic!("{type_name}: {e}"));
            assert_eq!(parsed, model, "{type_name}");
            let serialized = serde_json::to_string(&model).ok();
            assert_eq!(serialized.as_deref(), Some(json), "{type_name}");
            assert_eq!(model.type_name(), type_name);
            assert!(model.validate().is_ok(), "{type_name}");
        }
    }

    #[test]
    fn api_key_header_and_prefix_have_defaults() {
        let parsed: Auth = serde_json::from_str(r#"{"type":"api-key","key":"OPENAI_KEY"}"#)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed, api_key("OPENAI_KEY", "x-api-key", ""));
    }

    #[test]
    fn bad_json_is_refused() {
        #[rustfmt::skip]
        let cases: &[(&str, &str)] = &[
            ("unknown field on bearer", r#"{"type":"bearer","token":"K","extra":1}"#),
            ("unknown field on basic", r#"{"type":"basic","username":"U","password":"P","realm":"x"}"#),
            ("unknown field on api-key", r#"{"type":"api-key","key":"K","headers":"x"}"#),
            ("unknown field on custom", r#"{"type":"custom","headers":{},"x":1}"#),
            ("unknown field on passthrough", r#"{"type":"passthrough","token":"K"}"#),
            ("unknown type", r#"{"type":"oauth2","token":"K"}"#),
            ("type in another case", r#"{"type":"Bearer","token":"K"}"#),
            ("snake case api key type", r#"{"type":"api_key","key":"K"}"#),
            ("missing type", r#"{"token":"K"}"#),
            ("missing token", r#"{"type":"bearer"}"#),
            ("missing password", r#"{"type":"basic","username":"U"}"#),
            ("token not a string", r#"{"type":"bearer","token":1}"#),
            ("custom headers not an object", r#"{"type":"custom","headers":["X"]}"#),
            ("duplicate type", r#"{"type":"bearer","token":"K","type":"basic"}"#),
        ];
        for (behaviour, json) in cases {
            let result = serde_json::from_str::<Auth>(json);
            assert!(result.is_err(), "{behaviour}: {result:?}");
        }
    }

    #[test]
    fn validation() {
        let seventeen: Vec<(String, String)> = (0..17)
            .map(|i| (format!("X-H{i}"), "v".to_owned()))
            .collect();
        let sixteen: Vec<(String, String)> = seventeen.iter().take(16).cloned().collect();
        let to_auth = |pairs: &[(String, String)]| Auth::Custom {
            headers: pairs.iter().cloned().collect(),
        };
        // (behaviour, auth, expected error code or None)
        #[rustfmt::skip]
        let cases: Vec<(&str, Auth, Option<&str>)> = vec![
            ("bearer with a valid key", bearer("STRIPE_KEY"), None),
            ("bearer with a lowercase key", bearer("stripe_key"), Some("invalid_key")),
            ("bearer with an empty key", bearer(""), Some("invalid_key")),
            ("basic with valid keys", basic("USER", "PASS"), None),
            ("basic with a bad password key", basic("USER", "pass"), Some("invalid_key")),
            ("api-key with a custom header and prefix", api_key("K", "X-Goog-Api-Key", "Token "), None),
            ("api-key may set authorization", api_key("K", "Authorization", "token "), None),
            ("api-key with a bad key", api_key("k", "x-api-key", ""), Some("invalid_key")),
            ("api-key with an empty header", api_key("K", "", ""), Some("invalid_auth")),
            ("api-key header with a space", api_key("K", "x api key", ""), Some("invalid_auth")),
            ("api-key header with a colon", api_key("K", "x-api-key:", ""), Some("invalid_auth")),
            ("api-key header non-ascii", api_key("K", "x-clé", ""), Some("invalid_auth")),
            ("api-key pseudo-header", api_key("K", ":authority", ""), Some("invalid_auth")),
            ("api-key host header", api_key("K", "Host", ""), Some("invalid_auth")),
            ("api-key content-length", api_key("K", "content-length", ""), Some("invalid_auth")),
            ("api-key transfer-encoding", api_key("K", "Transfer-Encoding", ""), Some("invalid_auth")),
            ("api-key connection", api_key("K", "connection", ""), Some("invalid_auth")),
            ("api-key proxy-authorization", api_key("K", "Proxy-Authorization", ""), Some("invalid_auth")),
            ("api-key te", api_key("K", "TE", ""), Some("invalid_auth")),
            ("api-key upgrade", api_key("K", "upgrade", ""), Some("invalid_auth")),
            ("api-key keep-alive", api_key("K", "Keep-Alive", ""), Some("invalid_auth")),
            ("api-key prefix with CR LF", api_key("K", "x-api-key", "a\r\nX-Evil: 1\r\n"), Some("invalid_auth")),
            ("api-key prefix with LF", api_key("K", "x-api-key", "a\nb"), Some("invalid_auth")),
            ("api-key prefix with NUL", api_key("K", "x-api-key", "a\0"), Some("invalid_auth")),
            ("api-key prefix with a tab", api_key("K", "x-api-key", "a\t"), None),
            ("custom with one header", custom(&[("X-Token", "tok {{ KEY }}")]), None),
            ("custom with no placeholder", custom(&[("X-Client", "agent-vault")]), None),
            ("custom with several placeholders", custom(&[("X-Sig", "{{A}}:{{ B }}/{{  C  }}")]), None),
            ("custom with sixteen headers", to_auth(&sixteen), None),
            ("custom with seventeen headers", to_auth(&seventeen), Some("invalid_auth")),
            ("custom with no headers", custom(&[]), Some("invalid_auth")),
            ("custom with a case-insensitive duplicate", custom(&[("X-Token", "a"), ("x-token", "b")]), Some("invalid_auth")),
            ("custom setting host", custom(&[("host", "evil.com")]), Some("invalid_auth")),
            ("custom with an invalid header name", custom(&[("X Token", "{{ K }}")]), Some("invalid_auth")),
            ("custom with an unclosed placeholder", custom(&[("X-Token", "tok {{ KEY")]), Some("invalid_auth")),
            ("custom with an unclosed second placeholder", custom(&[("X-Token", "{{ A }} {{ B }")]), Some("invalid_auth")),
            ("custom with an empty placeholder", custom(&[("X-Token", "tok {{ }}")]), Some("invalid_auth")),
            ("custom with an empty placeholder without spaces", custom(&[("X-Token", "{{}}")]), Some("invalid_auth")),
            ("custom with a lowercase key", custom(&[("X-Token", "{{ key }}")]), Some("invalid_key")),
            ("custom with a key holding a space", custom(&[("X-Token", "{{ A B }}")]), Some("invalid_key")),
            ("custom with a nested placeholder", custom(&[("X-Token", "{{ {{ A }} }}")]), Some("invalid_key")),
            ("custom with a line break", custom(&[("X-Token", "a\r\nX-Evil: 1")]), Some("invalid_auth")),
            ("custom with a control character", custom(&[("X-Token", "a\u{7f}")]), Some("invalid_auth")),
            ("custom with lone braces", custom(&[("X-Json", "{\"k\": \"{{ K }}\"} }}")]), None),
            ("passthrough", Auth::Passthrough {}, None),
        ];
        for (behaviour, auth, expected) in cases {
            let result = auth.validate();
            let code = result.as_ref().err().map(RuleError::code);
            assert_eq!(code, expected, "{behaviour}: {result:?}");
            if let Err(error) = result {
                assert!(!error.to_string().contains('\n'), "{behaviour}: {error}");
            }
        }
    }

    #[test]
    fn auth_error_messages_are_clear() {
        let unclosed = custom(&[("X-Token", "tok {{ KEY")]).validate();
        assert_eq!(
            unclosed.err().map(|e| e.to_string()).as_deref(),
            Some(
                "invalid auth: the template for header \"X-Token\" has an unclosed {{ \
                 (write placeholders as {{ KEY }})"
            )
        );
        let forbidden = api_key("K", "Host", "").validate();
        assert_eq!(
            forbidden.err().map(|e| e.to_string()).as_deref(),
            Some(
                "invalid auth: header \"Host\" is managed by the proxy and cannot be set by \
                 a service"
            )
        );
    }

    fn vault() -> HashMap<&'static str, &'static str> {
        HashMap::from([
            ("STRIPE_KEY", "sk_test_abc123"),
            ("USER", "aladdin"),
            ("PASS", "open sesame"),
            ("A", "1"),
            ("B", "2"),
            ("WITH_CR", "abc\rX-Evil: 1"),
            ("WITH_LF", "abc\nX-Evil: 1"),
            ("WITH_NUL", "abc\0"),
            ("WITH_COLON", "user:name"),
            ("TRAILING_NEWLINE", "sk_test\n"),
        ])
    }

    type Rendered = Result<Vec<(String, String)>, RenderError>;

    fn headers(list: &[(&str, &str)]) -> Rendered {
        Ok(list
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect())
    }

    fn missing(key: &str) -> Rendered {
        Err(RenderError::Missing(key.to_owned()))
    }

    fn bad_value(key: &str) -> Rendered {
        Err(RenderError::InvalidValue(key.to_owned()))
    }

    #[test]
    fn rendering() {
        let vault = vault();
        // (behaviour, auth, expected headers or error)
        #[rustfmt::skip]
        let cases: Vec<(&str, Auth, Rendered)> = vec![
            ("bearer", bearer("STRIPE_KEY"), headers(&[("authorization", "Bearer sk_test_abc123")])),
            ("basic", basic("USER", "PASS"), headers(&[("authorization", "Basic YWxhZGRpbjpvcGVuIHNlc2FtZQ==")])),
            ("api-key with default header", api_key("STRIPE_KEY", "x-api-key", ""), headers(&[("x-api-key", "sk_test_abc123")])),
            ("api-key header is lowercased", api_key("STRIPE_KEY", "X-Goog-Api-Key", "Token "), headers(&[("x-goog-api-key", "Token sk_test_abc123")])),
            ("custom template", custom(&[("X-Token", "tok {{ STRIPE_KEY }}")]), headers(&[("x-token", "tok sk_test_abc123")])),
            ("custom with several headers and placeholders", custom(&[("X-Sig", "{{A}}:{{ B }}!"), ("X-Client", "agent-vault")]), headers(&[("x-client", "agent-vault"), ("x-sig", "1:2!")])),
            ("custom repeated key", custom(&[("X-Two", "{{A}}{{A}}")]), headers(&[("x-two", "11")])),
            ("passthrough sets nothing", Auth::Passthrough {}, headers(&[])),
            ("bearer missing", bearer("NOPE"), missing("NOPE")),
            ("basic missing password", basic("USER", "NOPE"), missing("NOPE")),
            ("custom missing", custom(&[("X-T", "{{ NOPE }}")]), missing("NOPE")),
            ("bearer value with CR", bearer("WITH_CR"), bad_value("WITH_CR")),
            ("bearer value with LF", bearer("WITH_LF"), bad_value("WITH_LF")),
            ("bearer value with NUL", bearer("WITH_NUL"), bad_value("WITH_NUL")),
            ("bearer value with a trailing newline", bearer("TRAILING_NEWLINE"), bad_value("TRAILING_NEWLINE")),
            ("api-key value with LF", api_key("WITH_LF", "x-api-key", ""), bad_value("WITH_LF")),
            ("custom value with CR", custom(&[("X-T", "a {{ WITH_CR }}")]), bad_value("WITH_CR")),
            ("basic value with LF", basic("USER", "WITH_LF"), bad_value("WITH_LF")),
            ("basic user name with a colon", basic("WITH_COLON", "PASS"), bad_value("WITH_COLON")),
            ("basic password may hold a colon", basic("USER", "WITH_COLON"), headers(&[("authorization", "Basic YWxhZGRpbjp1c2VyOm5hbWU=")])),
        ];
        for (behaviour, auth, expected) in cases {
            let lookup = |key: &str| vault.get(key).copied();
            assert_eq!(auth.render(lookup), expected, "{behaviour}");
            let compiled =
                CompiledAuth::compile(&auth).unwrap_or_else(|e| panic!("{behaviour}: {e}"));
            assert_eq!(compiled.render(lookup), expected, "{behaviour}: compiled");
        }
    }

    #[test]
    fn rendering_an_invalid_auth_fails() {
        let result = custom(&[("X-Token", "{{ KEY")]).render(|_| Some("v"));
        let code = result.as_ref().err().map(RenderError::code);
        assert_eq!(code, Some("invalid_auth"));
    }

    #[test]
    fn render_errors_never_carry_values() {
        let vault = vault();
        let error = bearer("WITH_LF").render(|k| vault.get(k).copied()).err();
        let message = error.as_ref().map(ToString::to_string).unwrap_or_default();
        assert!(message.contains("\"WITH_LF\""), "{message}");
        assert!(!message.contains("abc"), "{message}");
        assert_eq!(error.map(|e| e.code()), Some("invalid_credential_value"));
        let missing = bearer("NOPE").render(|_| None).err();
        let code = missing.as_ref().map(RenderError::code);
        assert_eq!(code, Some("credential_not_found"));
        assert_eq!(
            missing.map(|e| e.to_string()).as_deref(),
            Some("credential \"NOPE\" is not set in this vault")
        );
    }

    #[test]
    fn keys_as_written_keep_the_order_of_the_rule_once_each() {
        #[rustfmt::skip]
        let cases: Vec<(&str, Auth, &[&str])> = vec![
            ("basic user name before password", basic("U", "P"), &["U", "P"]),
            ("basic same key twice once", basic("K", "K"), &["K"]),
            ("custom headers by name, templates left to right", custom(&[("X-B", "{{ Z }} {{A}}"), ("X-A", "{{ A }}")]), &["A", "Z"]),
            ("custom repeated key once", custom(&[("A", "{{ K1 }} {{K2}}"), ("B", "{{K1}}")]), &["K1", "K2"]),
            ("passthrough names none", Auth::Passthrough {}, &[]),
        ];
        for (behaviour, auth, keys) in cases {
            assert_eq!(auth.keys_as_written(), *keys, "{behaviour}");
        }
    }

    #[test]
    fn referenced_keys_and_header_names() {
        // (behaviour, auth, keys, header names)
        #[rustfmt::skip]
        let cases: Vec<(&str, Auth, &[&str], &[&str])> = vec![
            ("bearer", bearer("T"), &["T"], &["authorization"]),
            ("basic keys sorted", basic("U", "P"), &["P", "U"], &["authorization"]),
            ("basic same key twice is deduplicated", basic("K", "K"), &["K"], &["authorization"]),
            ("api-key header lowercased", api_key("K", "X-Api-Key", "p"), &["K"], &["x-api-key"]),
            ("custom", custom(&[("X-B", "{{ Z }} {{A}}"), ("X-A", "{{ A }}"), ("X-C", "plain")]), &["A", "Z"], &["x-a", "x-b", "x-c"]),
            ("custom with an unclosed placeholder keeps earlier keys", custom(&[("X", "{{ A }} {{ B")]), &["A"], &["x"]),
            ("passthrough", Auth::Passthrough {}, &[], &[]),
        ];
        for (behaviour, auth, keys, names) in cases {
            assert_eq!(auth.referenced_keys(), *keys, "{behaviour}");
            assert_eq!(auth.header_names(), *names, "{behaviour}");
            if let Ok(compiled) = CompiledAuth::compile(&auth) {
                assert_eq!(compiled.keys().to_vec(), *keys, "{behaviour}");
                let mut compiled_names: Vec<&str> = compiled.header_names().collect();
                compiled_names.sort_unstable();
                assert_eq!(compiled_names, *names, "{behaviour}");
                assert_eq!(compiled.type_name(), auth.type_name(), "{behaviour}");
            }
        }
    }

    #[test]
    fn templates_are_parsed_once_into_segments() {
        let segments = parse_template("X", "a {{B}} c {{  D  }}{{\tE\t}}");
        assert_eq!(
            segments,
            Ok(vec![
                Segment::Literal("a ".to_owned()),
                Segment::Key("B".to_owned()),
                Segment::Literal(" c ".to_owned()),
                Segment::Key("D".to_owned()),
                Segment::Key("E".to_owned()),
            ])
        );
        assert_eq!(parse_template("X", ""), Ok(vec![]));
    }
}
