//! Property tests of the parsers an agent (or a proposal) feeds: the proxy credential,
//! request authorities, host patterns and the service matcher.
//!
//! Each property runs `PROPTEST_CASES` cases (proptest's default, 256, in
//! `./dev test`); for a long run raise it by hand (README, "Fuzzing"). A failure is
//! shrunk and its seed saved in `rules/proptest-regressions/properties.txt`, which is
//! committed so that every later run replays it first.
//!
//! Hosts are drawn from a few short labels under `example.com` and `example.org`
//! (never a public suffix), so that random service lists often name the same host,
//! its wildcard parent, the same port or overlapping paths: that is where the
//! priority rules decide. All generated services use TLS (the default), whose
//! pattern without a port matches any port.

use agent_vault_rules::proxy_auth::{
    parse, x_vault, ProxyAuthError, ProxyCredential, DECODE_BUFFER_LEN, MAX_HEADER_LEN,
};
use agent_vault_rules::{
    normalize_authority, HostPattern, Service, ServiceMatcher, ValidationOptions,
};
use base64::Engine as _;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::FileFailurePersistence;
use serde_json::json;

const STRICT: ValidationOptions = ValidationOptions {
    allow_private_upstreams: false,
};
const ALLOW_PRIVATE: ValidationOptions = ValidationOptions {
    allow_private_upstreams: true,
};

/// proptest's defaults (`PROPTEST_CASES` and the rest read from the environment),
/// with failures saved where the module doc says: proptest's own default only finds a
/// place for tests under `src/`.
fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/properties.txt",
        ))),
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------------

/// Any string, with the odd characters (controls, surrogate-adjacent, huge code
/// points) that `any::<char>()` favours.
fn any_text(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), 0..max).prop_map(String::from_iter)
}

/// Upper-cases the ASCII letters of `text` whose position has its bit set in `mask`.
fn shout(text: &str, mask: u64) -> String {
    text.chars()
        .enumerate()
        .map(|(i, c)| {
            if mask >> (i % 64) & 1 == 1 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect()
}

const LABELS: &[&str] = &["a", "b", "api", "x-1"];
const BASES: &[&str] = &["example.com", "example.org"];

fn label() -> impl Strategy<Value = String> {
    select(LABELS).prop_map(str::to_owned)
}

/// A domain a wildcard may cover: a base, or one label under it.
fn domain() -> impl Strategy<Value = String> {
    (prop::option::of(label()), select(BASES)).prop_map(|(label, base)| match label {
        Some(label) => format!("{label}.{base}"),
        None => base.to_owned(),
    })
}

/// A request host: a base with zero to two labels in front.
fn request_host() -> impl Strategy<Value = String> {
    (prop::collection::vec(label(), 0..=2), select(BASES)).prop_map(|(labels, base)| {
        let mut host = labels.join(".");
        if !host.is_empty() {
            host.push('.');
        }
        host.push_str(base);
        host
    })
}

const PORTS: &[u16] = &[443, 8443];
const PATH_PREFIXES: &[&str] = &["/", "/v1", "/v1/", "/v1/charges", "/v1/charges/", "/v2"];
const REQUEST_PATHS: &[&str] = &[
    "",
    "/",
    "/v1",
    "/v1/",
    "/v1x",
    "/v1/charges",
    "/v1/charges/ch_1",
    "/v1/charges?limit=3",
    "/v1/refunds",
    "/v2/x",
    "/v1/../admin",
    "/v1/%2e%2E/admin",
];

/// A service host pattern from the small alphabets: `[*.]domain[.][:port][/path[*]]`,
/// in random case.
fn pattern_text() -> impl Strategy<Value = String> {
    pattern_text_with(prop::option::of((select(PATH_PREFIXES), any::<bool>())))
}

/// The same, always with a path.
fn pattern_text_with_path() -> impl Strategy<Value = String> {
    pattern_text_with((select(PATH_PREFIXES), any::<bool>()).prop_map(Some))
}

/// `path` is the literal path and whether it is a prefix (ends with `*`).
fn pattern_text_with(
    path: impl Strategy<Value = Option<(&'static str, bool)>>,
) -> impl Strategy<Value = String> {
    (
        any::<bool>(),
        domain(),
        any::<bool>(),
        prop::option::of(select(PORTS)),
        path,
        any::<u64>(),
    )
        .prop_map(|(wildcard, domain, dot, port, path, mask)| {
            let mut text = shout(&domain, mask);
            if wildcard {
                text.insert_str(0, "*.");
            }
            if dot {
                text.push('.');
            }
            if let Some(port) = port {
                text.push_str(&format!(":{port}"));
            }
            if let Some((prefix, is_prefix)) = path {
                text.push_str(prefix);
                if is_prefix {
                    text.push('*');
                }
            }
            text
        })
}

/// Strings shaped like host patterns but from a wider alphabet: brackets, IP
/// literals, odd ports, stars and dots in odd places, internal names.
fn pattern_like() -> impl Strategy<Value = String> {
    let host = prop_oneof![
        "[a-zA-Z0-9*-]{0,6}(\\.[a-zA-Z0-9*-]{0,6}){0,3}\\.?",
        "(\\*\\.)?(localhost|corp|home\\.arpa|internal|lan)",
        "[0-9]{1,3}(\\.[0-9]{1,3}){0,3}|0x[0-9a-f]{1,8}",
        "\\[[0-9a-fA-F:.]{0,20}\\]",
        "[0-9a-f:]{2,16}",
    ];
    let port = prop::option::of("[0-9]{0,6}|[a-z]{1,3}");
    let path = prop::option::of("/[a-zA-Z0-9/._%*~\\\\-]{0,12}");
    (host, port, path).prop_map(|(host, port, path)| {
        let mut text = host;
        if let Some(port) = port {
            text.push(':');
            text.push_str(&port);
        }
        if let Some(path) = path {
            text.push_str(&path);
        }
        text
    })
}

/// Strings shaped like request authorities: `host[.][:port]` or `[v6][:port]`, with
/// the occasional stray character.
fn authority_like() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9_-]{0,8}(\\.[a-zA-Z0-9_-]{0,8}){0,3}\\.{0,2}(:[0-9]{0,6})?",
        "\\[[0-9a-fA-F:.]{0,24}\\](:[0-9]{0,6})?",
        // Printable ASCII but `/`, which would start a pattern's path.
        "[ -.0-~]{0,24}",
    ]
}

/// A passthrough service named after its position.
fn service(index: usize, host: &str) -> Service {
    // Built from JSON so that fields added to `Service` later take their defaults.
    serde_json::from_value(json!({
        "name": format!("s{index}"),
        "host": host,
        "auth": {"type": "passthrough"},
    }))
    .unwrap_or_else(|e| panic!("service {host:?}: {e}"))
}

fn services(hosts: &[String]) -> Vec<Service> {
    hosts
        .iter()
        .enumerate()
        .map(|(i, host)| service(i, host))
        .collect()
}

fn find(hosts: &[String], host: &str, port: u16, path: &str) -> Option<usize> {
    ServiceMatcher::new(&services(hosts)).find(host, port, path)
}

/// The priority rules of DESIGN.md §5 written out as a linear scan over the patterns:
/// among the services whose pattern matches, an exact host beats a wildcard, then a
/// specific port beats any port, then the longer literal path (an exact path beats a
/// prefix of the same length), then the earlier declaration.
fn expected_service(hosts: &[String], host: &str, port: u16, path: &str) -> Option<usize> {
    let mut best: Option<((bool, bool, usize, bool), usize)> = None;
    for (index, text) in hosts.iter().enumerate() {
        let Ok(pattern) = HostPattern::parse(text, &ALLOW_PRIVATE) else {
            continue;
        };
        if !pattern.matches(host, port, path) {
            continue;
        }
        let rank = (
            !pattern.wildcard,
            pattern.port.is_some(),
            pattern.path.as_ref().map_or(0, |p| p.prefix.len()),
            pattern.path.as_ref().is_some_and(|p| p.exact),
        );
        if best.is_none_or(|(best_rank, _)| rank > best_rank) {
            best = Some((rank, index));
        }
    }
    best.map(|(_, index)| index)
}

// ---------------------------------------------------------------------------------
// The proxy credential
// ---------------------------------------------------------------------------------

type Parsed = Result<(String, Option<String>), ProxyAuthError>;

fn parse_owned(header: Option<&str>) -> Parsed {
    let mut buffer = [0u8; DECODE_BUFFER_LEN];
    parse(header, &mut buffer).map(|c| (c.token.to_owned(), c.vault.map(str::to_owned)))
}

fn b64(bytes: impl AsRef<[u8]>) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// `Basic` or `Bearer` in random case, or another word.
fn scheme() -> impl Strategy<Value = String> {
    (
        select(&["basic", "bearer", "digest", "negotiate", "", "basicx"][..]),
        any::<u64>(),
    )
        .prop_map(|(scheme, mask)| shout(scheme, mask))
}

/// Spaces and tabs, as clients put around the scheme and the credentials.
fn blanks(min: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(select(&[' ', '\t'][..]), min..=min + 3).prop_map(String::from_iter)
}

/// A token of characters `parse` accepts (no whitespace, no control character, no
/// `:`, which ends a Basic token): agent tokens and any Unicode.
fn clean_token() -> impl Strategy<Value = String> {
    prop_oneof!["av_agt_[0-9a-f]{64}", "[^\\s\\p{Cc}:]{1,40}",]
}

/// Headers of every shape: arbitrary text, scheme + arbitrary payload, scheme +
/// base64 of arbitrary bytes (any length up to past the limit), and huge ones, of
/// ASCII or of any characters.
fn header() -> impl Strategy<Value = String> {
    prop_oneof![
        any_text(64),
        (blanks(0), scheme(), blanks(1), any_text(64), blanks(0))
            .prop_map(|(a, s, b, p, c)| format!("{a}{s}{b}{p}{c}")),
        (
            scheme(),
            blanks(1),
            prop::collection::vec(any::<u8>(), 0..96)
        )
            .prop_map(|(s, b, bytes)| format!("{s}{b}{}", b64(bytes))),
        (scheme(), blanks(1), 3000usize..3200, any::<u8>())
            .prop_map(|(s, b, len, byte)| { format!("{s}{b}{}", b64(vec![byte; len])) }),
        (
            scheme(),
            blanks(1),
            MAX_HEADER_LEN - 16..MAX_HEADER_LEN + 16
        )
            .prop_map(|(s, b, len)| format!("{s}{b}{}", "A".repeat(len))),
        // About the limit in bytes, in characters of one to four bytes.
        (
            scheme(),
            blanks(1),
            prop::collection::vec(any::<char>(), 1000..1400)
        )
            .prop_map(|(s, b, chars)| format!("{s}{b}{}", String::from_iter(chars))),
    ]
}

proptest! {
    #![proptest_config(config())]

    /// Whatever the header, `parse` returns; anything it accepts has a non-empty token
    /// without whitespace or control characters, a vault that is absent or non-empty,
    /// and came from a header within the limit.
    #[test]
    fn the_proxy_credential_parser_never_panics_and_accepts_only_clean_tokens(
        header in prop::option::of(header())
    ) {
        let parsed = parse_owned(header.as_deref());
        if let Some(header) = &header {
            if header.len() > MAX_HEADER_LEN {
                prop_assert_eq!(&parsed, &Err(ProxyAuthError::TooLong));
            }
        } else {
            prop_assert_eq!(&parsed, &Err(ProxyAuthError::Missing));
        }
        if let Ok((token, vault)) = &parsed {
            prop_assert!(!token.is_empty());
            prop_assert!(!token.chars().any(|c| c.is_whitespace() || c.is_control()));
            prop_assert!(vault.as_ref().is_none_or(|v| !v.is_empty()));
        }
    }

    /// `Basic base64(token:vault)` gives back exactly that token and vault (an empty
    /// vault is none), whatever the scheme's case and the blanks around it, unless the
    /// header is over the limit, which is `TooLong`.
    #[test]
    fn basic_credentials_round_trip_or_are_too_long(
        token in clean_token(),
        vault in prop_oneof![any_text(40), "[a-z0-9-]{2900,3100}"],
        scheme in any::<u64>().prop_map(|mask| shout("basic", mask)),
        before in blanks(0),
        between in blanks(1),
        after in blanks(0),
    ) {
        let header = format!("{before}{scheme}{between}{}{after}", b64(format!("{token}:{vault}")));
        let expected = if header.len() > MAX_HEADER_LEN {
            Err(ProxyAuthError::TooLong)
        } else {
            Ok((token, Some(vault).filter(|v| !v.is_empty())))
        };
        prop_assert_eq!(parse_owned(Some(&header)), expected);
    }

    /// `Bearer token` gives back exactly that token and no vault.
    #[test]
    fn bearer_credentials_round_trip(
        token in prop_oneof![clean_token(), "[^\\s\\p{Cc}]{1,40}"],
        scheme in any::<u64>().prop_map(|mask| shout("bearer", mask)),
        between in blanks(1),
        after in blanks(0),
    ) {
        let header = format!("{scheme}{between}{token}{after}");
        prop_assert_eq!(parse_owned(Some(&header)), Ok((token, None)));
    }

    /// A token with a whitespace or control character anywhere inside is refused, in
    /// either scheme.
    #[test]
    fn tokens_with_whitespace_or_control_characters_are_refused(
        head in "[^\\s\\p{Cc}:]{1,20}",
        bad in prop_oneof!["\\s", "\\p{Cc}"],
        tail in "[^\\s\\p{Cc}:]{1,20}",
        vault in "[a-z0-9-]{0,20}",
    ) {
        let token = format!("{head}{bad}{tail}");
        let basic = format!("Basic {}", b64(format!("{token}:{vault}")));
        prop_assert_eq!(parse_owned(Some(&basic)), Err(ProxyAuthError::BadToken));
        let bearer = format!("Bearer {token}");
        prop_assert_eq!(parse_owned(Some(&bearer)), Err(ProxyAuthError::BadToken));
    }

    /// The `Debug` output of a parsed credential does not depend on the token: it is
    /// the same as with any other token, and never holds an agent token.
    #[test]
    fn the_debug_output_never_depends_on_the_token(
        token in clean_token(),
        vault in "[a-z0-9-]{0,20}",
        bearer in any::<bool>(),
    ) {
        let header = if bearer {
            format!("Bearer {token}")
        } else {
            format!("Basic {}", b64(format!("{token}:{vault}")))
        };
        let mut buffer = [0u8; DECODE_BUFFER_LEN];
        let parsed = parse(Some(&header), &mut buffer);
        let debug = format!("{parsed:?}");
        let credential = parsed.map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
        let other = ProxyCredential { token: "other", vault: credential.vault };
        prop_assert_eq!(format!("{credential:?}"), format!("{other:?}"));
        if token.starts_with("av_agt_") {
            prop_assert!(!debug.contains(&token), "{}", debug);
        }
    }

    /// `X-Vault` is trimmed of spaces and tabs; blank or absent is none.
    #[test]
    fn x_vault_is_the_trimmed_header_or_none(header in prop::option::of(any_text(40))) {
        let expected = header
            .as_deref()
            .map(|h| h.trim_matches([' ', '\t']))
            .filter(|h| !h.is_empty());
        prop_assert_eq!(x_vault(header.as_deref()), expected);
    }
}

// ---------------------------------------------------------------------------------
// Request authorities
// ---------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    /// Whatever the authority, normalisation returns; what it returns is lowercase,
    /// has no trailing dot and a non-zero port, and normalising it again (with its
    /// port, or without one) changes nothing.
    #[test]
    fn normalising_an_authority_never_panics_and_is_idempotent(
        authority in prop_oneof![any_text(40), authority_like()],
        default_port in any::<u16>(),
        other_default in 1u16..,
    ) {
        let Some((host, port)) = normalize_authority(&authority, default_port) else {
            return Ok(());
        };
        prop_assert_eq!(&host, &host.to_ascii_lowercase());
        prop_assert!(!host.ends_with('.'));
        // Port 0 can only be the default standing in for a missing port.
        if port == 0 {
            prop_assert_eq!(default_port, 0);
        } else {
            let again = normalize_authority(&format!("{host}:{port}"), other_default);
            prop_assert_eq!(again, Some((host.clone(), port)));
        }
        prop_assert_eq!(
            normalize_authority(&host, other_default),
            Some((host.clone(), other_default))
        );
    }

    /// Upper case and one trailing dot do not change what an authority normalises to.
    #[test]
    fn case_and_one_trailing_dot_do_not_change_normalisation(
        host in request_host(),
        mask in any::<u64>(),
        dot in any::<bool>(),
        port in prop::option::of(1u16..),
    ) {
        let mut authority = shout(&host, mask);
        if dot {
            authority.push('.');
        }
        if let Some(port) = port {
            authority.push_str(&format!(":{port}"));
        }
        prop_assert_eq!(
            normalize_authority(&authority, 443),
            Some((host, port.unwrap_or(443)))
        );
    }

    /// An authority or host pattern holding userinfo (`@`), `%`, a space or anything
    /// beyond ASCII is refused, wherever the character sits.
    #[test]
    fn authorities_with_userinfo_percent_spaces_or_non_ascii_are_refused(
        authority in prop_oneof![authority_like(), pattern_text()
            .prop_map(|p| p.split('/').next().unwrap_or_default().to_owned())],
        bad in prop_oneof!["[@% \\t\\n]", "[^\\x00-\\x7f]"],
        at in any::<prop::sample::Index>(),
    ) {
        let mut positions: Vec<usize> = authority.char_indices().map(|(i, _)| i).collect();
        positions.push(authority.len());
        let mut tainted = authority.clone();
        tainted.insert_str(*at.get(&positions), &bad);
        prop_assert_eq!(normalize_authority(&tainted, 443), None);
        prop_assert!(HostPattern::parse(&tainted, &ALLOW_PRIVATE).is_err());
        prop_assert!(HostPattern::parse(&tainted, &STRICT).is_err());
    }
}

// ---------------------------------------------------------------------------------
// Host patterns
// ---------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    /// Whatever the text, parsing a pattern returns; a pattern that validates prints as
    /// text that validates to the same pattern, under either setting.
    #[test]
    fn a_validated_pattern_round_trips_through_its_text(
        text in prop_oneof![any_text(40), pattern_text(), pattern_like()],
    ) {
        for options in [STRICT, ALLOW_PRIVATE] {
            if let Ok(pattern) = HostPattern::parse(&text, &options) {
                let shown = pattern.to_string();
                prop_assert_eq!(HostPattern::parse(&shown, &options), Ok(pattern.clone()));
                prop_assert_eq!(&pattern.host, &pattern.host.to_ascii_lowercase());
                prop_assert!(!pattern.host.ends_with('.'));
                prop_assert!(pattern.port != Some(0));
            }
        }
        // What the strict setting accepts, the permissive one accepts the same way.
        if let Ok(strict) = HostPattern::parse(&text, &STRICT) {
            prop_assert_eq!(HostPattern::parse(&text, &ALLOW_PRIVATE), Ok(strict));
        }
    }

    /// A validated service is reachable: its own host (through normalisation, or one
    /// label under a wildcard), on its port, at its path, finds it.
    #[test]
    fn a_validated_pattern_is_found_by_a_request_for_what_it_names(
        text in prop_oneof![pattern_text(), pattern_like()],
        under in label(),
        any_port in 1u16..,
    ) {
        let Ok(pattern) = HostPattern::parse(&text, &ALLOW_PRIVATE) else {
            return Ok(());
        };
        let port = pattern.port.unwrap_or(any_port);
        let host = if pattern.wildcard {
            format!("{under}.{}", pattern.host)
        } else {
            pattern.host.clone()
        };
        let path = match &pattern.path {
            None => "/anything".to_owned(),
            Some(path) if path.exact => path.prefix.clone(),
            Some(path) => format!("{}x", path.prefix),
        };
        // Paths with dot segments (also encoded) or backslashes never match by design.
        // (Not `prop_assume!`: its rejections are capped per run, and long runs would
        // hit the cap.)
        if path.contains(['.', '%', '\\']) {
            return Ok(());
        }
        let authority = format!("{host}:{port}");
        prop_assert_eq!(normalize_authority(&authority, 1), Some((host.clone(), port)));
        prop_assert!(pattern.matches(&host, port, &path));
        prop_assert_eq!(find(&[text], &host, port, &path), Some(0));
    }

    /// `*.d` matches `x.d` for exactly one more label, and never `a.b.d`, `d`, `xd`,
    /// `d.evil` or `x.d.evil`, in the pattern and in the matcher.
    #[test]
    fn a_wildcard_covers_exactly_one_more_label(
        domain in domain(),
        x in label(),
        y in label(),
        port in 1u16..,
    ) {
        let text = format!("*.{domain}");
        let pattern = HostPattern::parse(&text, &STRICT)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let hosts = [text];
        for (host, expected) in [
            (format!("{x}.{domain}"), true),
            (format!("{y}.{x}.{domain}"), false),
            (domain.clone(), false),
            (format!("{x}{domain}"), false),
            (format!("{domain}.evil"), false),
            (format!("{x}.{domain}.evil"), false),
            (format!(".{domain}"), false),
        ] {
            prop_assert_eq!(pattern.matches(&host, port, "/"), expected, "{}", host);
            prop_assert_eq!(find(&hosts, &host, port, "/").is_some(), expected, "{}", host);
        }
    }

    /// A path pattern never matches a request path with a `.` or `..` segment, plain or
    /// percent-encoded, whatever comes before it.
    #[test]
    fn dot_segments_never_match_a_path_pattern(
        text in pattern_text_with_path(),
        // Request paths without a query string: dots in a query are no path segments.
        head in select(&["", "/", "/v1", "/v1/", "/v1x", "/v1/charges", "/v2/x"][..]),
        // Plain, percent-encoded, and with a path parameter (`..;x`), which Java
        // servlet containers drop before resolving the segment.
        dots in select(&[
            "..", ".", "%2e%2e", "%2E.", ".%2e", "%2e", "..;", ".;", "..;jsessionid=1", "%2e%2e;",
            "..%3b", "..%3Bx",
        ][..]),
        separator in select(&["/", "\\", "%2f", "%5C"][..]),
        tail in "[a-z]{0,6}",
    ) {
        let pattern = HostPattern::parse(&text, &ALLOW_PRIVATE)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let host = pattern.host.clone();
        let port = pattern.port.unwrap_or(443);
        let prefix = pattern.path.as_ref().map(|p| p.prefix.clone()).unwrap_or_default();
        // `prefix/../tail`, `prefix..`-style partial segments aside: a whole segment.
        let slash = if prefix.ends_with('/') { "" } else { "/" };
        for path in [
            format!("{prefix}{slash}{dots}{separator}{tail}"),
            format!("{prefix}{slash}{dots}"),
            format!("{head}/{dots}{separator}{tail}"),
        ] {
            prop_assert!(!pattern.matches(&host, port, &path), "{} matched {}", text, path);
        }
    }
}

// ---------------------------------------------------------------------------------
// The service matcher
// ---------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    /// The indexed matcher picks what the priority rules, applied service by service,
    /// pick: for random lists of overlapping services and random requests.
    #[test]
    fn the_matcher_follows_the_priority_rules(
        hosts in prop::collection::vec(pattern_text(), 1..12),
        host in request_host(),
        port in select(&[443u16, 8443, 80][..]),
        path in select(REQUEST_PATHS),
    ) {
        prop_assert_eq!(
            find(&hosts, &host, port, path),
            expected_service(&hosts, &host, port, path)
        );
    }

    /// Whatever the request, finding returns, and what it finds matches the request.
    #[test]
    fn finding_never_panics_and_finds_only_matching_services(
        hosts in prop::collection::vec(prop_oneof![pattern_text(), pattern_like()], 0..8),
        host in prop_oneof![any_text(24), request_host(), authority_like()],
        port in any::<u16>(),
        path in prop_oneof![any_text(24), select(REQUEST_PATHS).prop_map(str::to_owned)],
    ) {
        if let Some(index) = find(&hosts, &host, port, &path) {
            let pattern = HostPattern::parse(&hosts[index], &ALLOW_PRIVATE)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(pattern.matches(&host, port, &path));
        }
    }

    /// Upper case and one trailing dot in the request host do not change which
    /// service is found.
    #[test]
    fn case_and_one_trailing_dot_do_not_change_the_match(
        hosts in prop::collection::vec(pattern_text(), 1..8),
        host in request_host(),
        mask in any::<u64>(),
        port in select(&[443u16, 8443][..]),
        path in select(REQUEST_PATHS),
    ) {
        let found = find(&hosts, &host, port, path);
        prop_assert_eq!(find(&hosts, &shout(&host, mask), port, path), found);
        prop_assert_eq!(find(&hosts, &format!("{host}."), port, path), found);
        prop_assert_eq!(find(&hosts, &format!("{}.", shout(&host, mask)), port, path), found);
    }

    /// An exact host beats a wildcard over it, whichever comes first and whatever port
    /// and path the wildcard names.
    #[test]
    fn an_exact_host_beats_a_wildcard(
        domain in domain(),
        x in label(),
        port in select(PORTS),
        path in select(&["/v1/charges", "/v1/charges/ch_1"][..]),
        wildcard_port in any::<bool>(),
        wildcard_path in select(&["", "/*", "/v1*", "/v1/charges*"][..]),
        exact_first in any::<bool>(),
    ) {
        let wildcard = format!(
            "*.{domain}{}{wildcard_path}",
            if wildcard_port { format!(":{port}") } else { String::new() }
        );
        let exact = format!("{x}.{domain}");
        let (hosts, exact_index) = if exact_first {
            (vec![exact, wildcard], 0)
        } else {
            (vec![wildcard, exact], 1)
        };
        prop_assert_eq!(find(&hosts, &format!("{x}.{domain}"), port, path), Some(exact_index));
    }

    /// On the same host, a service naming the request's port beats one for any port,
    /// whichever comes first and however long a path the other names; on another port
    /// the any-port service is the one found.
    #[test]
    fn a_specific_port_beats_any_port(
        host in request_host(),
        port in select(PORTS),
        other_offset in 1u16..,
        any_port_path in select(&["", "/*", "/v1*", "/v1/charges*"][..]),
        port_first in any::<bool>(),
    ) {
        let other_port = match port.wrapping_add(other_offset) {
            0 => 1,
            other => other,
        };
        let specific = format!("{host}:{port}");
        let any_port = format!("{host}{any_port_path}");
        let (hosts, specific_index) = if port_first {
            (vec![specific, any_port], 0)
        } else {
            (vec![any_port, specific], 1)
        };
        prop_assert_eq!(find(&hosts, &host, port, "/v1/charges"), Some(specific_index));
        prop_assert_eq!(
            find(&hosts, &host, other_port, "/v1/charges"),
            Some(1 - specific_index)
        );
    }

    /// On the same host and port, the longer literal path prefix that matches wins,
    /// whichever comes first; a request only the shorter covers gets the shorter.
    #[test]
    fn a_longer_literal_path_prefix_beats_a_shorter_one(
        host in request_host(),
        short in "/[a-z]{0,3}",
        more in "[a-z/]{1,4}",
        rest in "[a-z]{0,4}",
        long_first in any::<bool>(),
    ) {
        let long = format!("{short}{more}");
        let (hosts, long_index) = if long_first {
            (vec![format!("{host}{long}*"), format!("{host}{short}*")], 0)
        } else {
            (vec![format!("{host}{short}*"), format!("{host}{long}*")], 1)
        };
        prop_assert_eq!(find(&hosts, &host, 443, &format!("{long}{rest}")), Some(long_index));
        // `short` + a character that cannot continue `long`.
        prop_assert_eq!(
            find(&hosts, &host, 443, &format!("{short}0")),
            Some(1 - long_index)
        );
    }

    /// Services that tie on every rule are decided by declaration order: the first
    /// one is found, however its host is cased or dotted.
    #[test]
    fn declaration_order_breaks_ties(
        text in pattern_text(),
        mask in any::<u64>(),
        others in prop::collection::vec(pattern_text(), 0..4),
        host in request_host(),
        port in select(&[443u16, 8443][..]),
        path in select(REQUEST_PATHS),
    ) {
        // The same pattern with its host cased differently (paths are case-sensitive).
        let twin = match text.split_once('/') {
            Some((authority, path)) => {
                format!("{}/{path}", shout(&authority.to_ascii_lowercase(), mask))
            }
            None => shout(&text.to_ascii_lowercase(), mask),
        };
        let mut hosts = others;
        let first = hosts.len();
        hosts.push(text);
        hosts.push(twin);
        let found = find(&hosts, &host, port, path);
        prop_assert_ne!(found, Some(first + 1), "the later twin was found");
    }
}

/// Undoes `percent_encode`/`form_encode` (test only).
fn percent_decode(text: &str, plus_is_space: bool) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        match bytes[at] {
            b'%' => {
                let hex = std::str::from_utf8(&bytes[at + 1..at + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                at += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                at += 1;
            }
            byte => {
                out.push(byte);
                at += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

proptest! {
    #![proptest_config(config())]

    /// Whatever a secret holds, it lands in one path segment, one query value, one JSON
    /// string or one form field, and reads back exactly; the request's structure around
    /// it never changes.
    #[test]
    fn a_substituted_value_reads_back_exactly_and_never_changes_the_structure(value in "\\PC*") {
        use agent_vault_rules::substitution::*;
        let path_sub = Substitution { key: "K".into(), placeholder: "__PATH_VALUE__".into(), surfaces: vec![Surface::Path] };
        let query_sub = Substitution { key: "Q".into(), placeholder: "__QUERY_VALUE__".into(), surfaces: vec![Surface::Query, Surface::Body] };
        let filled = [(&path_sub, value.as_str()), (&query_sub, value.as_str())];
        let (out, count) = substitute_path_and_query("/a/__PATH_VALUE__/b?x=__QUERY_VALUE__&y=1", &filled);
        prop_assert_eq!(count, 2);
        let (path, query) = out.split_once('?').unwrap();
        let segments: Vec<&str> = path.split('/').collect();
        prop_assert_eq!(segments.len(), 4);
        prop_assert_eq!(percent_decode(segments[2], false), value.clone());
        let pairs: Vec<&str> = query.split('&').collect();
        prop_assert_eq!(pairs.len(), 2);
        prop_assert_eq!(percent_decode(pairs[0].strip_prefix("x=").unwrap(), false), value.clone());
        let (json, _) = substitute_body(br#"{"v":"__QUERY_VALUE__","w":1}"#, "application/json", &filled).unwrap();
        let parsed: serde_json::Value = serde_json::from_slice(&json).unwrap();
        prop_assert_eq!(parsed["v"].as_str().unwrap(), value.as_str());
        prop_assert_eq!(parsed["w"].as_i64(), Some(1));
        let (form, _) = substitute_body(b"v=__QUERY_VALUE__&w=1", "application/x-www-form-urlencoded", &filled).unwrap();
        let form = String::from_utf8(form).unwrap();
        let fields: Vec<&str> = form.split('&').collect();
        prop_assert_eq!(fields.len(), 2);
        prop_assert_eq!(percent_decode(fields[0].strip_prefix("v=").unwrap(), true), value);
    }
}
