//! Host patterns of services, and matching a request's authority and path to them.
//!
//! A service's `host` is `api.stripe.com` or `*.github.com` (the `*` is exactly one
//! label), with an optional `:port` and an optional path suffix: `/v1/*` or `/v1*`
//! match a path prefix, `/v1/charges` matches that path exactly.
//!
//! Patterns are refused when they would send a credential somewhere a human did not
//! clearly mean: schemes, userinfo, query strings, IP literals, `localhost`,
//! single-label and internal names (the last three are allowed with
//! [`ValidationOptions::allow_private_upstreams`], which tests use for loopback
//! upstreams), and wildcards over a public suffix such as `*.com`, `*.co.uk` or
//! `*.herokuapp.com`: whether a name is one comes from the Public Suffix List, its
//! ICANN and PRIVATE sections (the `psl` crate), with or without that option.
//!
//! Matching priority (DESIGN.md §5): exact host over wildcard, then a specific port
//! over any port, then the longest literal path prefix (an exact path beats a prefix of
//! the same length, no path counts as length 0), then declaration order.
//! [`ServiceMatcher`] indexes exact hosts and wildcard parents in hash maps so that a
//! lookup costs O(candidates for that host), not O(services).
//!
//! Paths are compared literally, after the query string and fragment are cut off. A
//! request path with `.`/`..` segments (also percent-encoded, separated by `\`, or
//! carrying a `;` parameter) never matches a pattern that has a path: the upstream
//! could resolve it to a path outside the approved prefix while the credential is
//! injected. Such a request falls through to a service without a path, or to no
//! service (fail closed).

use std::borrow::Cow;
use std::cell::Cell;
use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::auth::CompiledAuth;
use crate::error::RuleError;
use crate::service::Service;

/// Longest host name (RFC 1035), without a trailing dot.
const MAX_HOST_LEN: usize = 253;
/// Longest DNS label.
const MAX_LABEL_LEN: usize = 63;
/// Longest path in a pattern.
const MAX_PATH_LEN: usize = 1024;
/// The only port a plain-HTTP service without a port in its pattern matches.
const PLAIN_HTTP_PORT: u16 = crate::reply::DEFAULT_PORT;

/// Names that only resolve inside a private network. `localhost` and its subdomains
/// resolve to loopback.
const INTERNAL_SUFFIXES: [&str; 7] = [
    "localhost",
    "local",
    "internal",
    "lan",
    "home.arpa",
    "corp",
    "intranet",
];

#[cfg(feature = "public-suffix")]
/// Domains whose every subdomain resolves to the IP address written in it
/// (`10.0.0.5.nip.io`): a wildcard over one covers every address, the attacker's
/// included. They are not on the Public Suffix List, so they are named here.
const WILDCARD_DNS_SERVICES: [&str; 7] = [
    "nip.io",
    "sslip.io",
    "xip.io",
    "traefik.me",
    "lvh.me",
    "localtest.me",
    "vcap.me",
];

const PRIVATE: &str = "a private or internal address";
const IP_LITERAL: &str = "an IP address literal";

/// Settings that change what validation accepts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ValidationOptions {
    /// Accept IPv4 and bracketed IPv6 literals, `localhost`, single-label and internal
    /// names as service hosts (`--allow-private-upstreams`; tests use it for their
    /// loopback upstreams, production never needs it).
    pub allow_private_upstreams: bool,
}

/// The path part of a [`HostPattern`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PathPattern {
    /// The literal path, starting with `/`, without the trailing `*` of a prefix.
    pub prefix: String,
    /// `true`: the request path must equal `prefix`; `false`: it must start with it.
    pub exact: bool,
}

/// A parsed, canonical service host pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPattern {
    /// `*.` pattern: matches exactly one label in front of `host`.
    pub wildcard: bool,
    /// Lowercase host without the `*.` and without a trailing dot; IPv6 literals are
    /// kept in brackets (`[::1]`).
    pub host: String,
    /// Only this port matches; `None` matches any port.
    pub port: Option<u16>,
    /// Only these paths match; `None` matches any path.
    pub path: Option<PathPattern>,
}

/// How well a pattern matched: compared lexicographically, greater is better.
/// (specific port, literal path length, exact path)
type Rank = (bool, usize, bool);

impl HostPattern {
    /// Parses and validates a service's `host`.
    pub fn parse(input: &str, options: &ValidationOptions) -> Result<HostPattern, RuleError> {
        let invalid = |reason: &str| RuleError::InvalidHost {
            host: input.to_owned(),
            reason: reason.to_owned(),
        };
        if input.is_empty() {
            return Err(invalid(
                "the host is empty; write a host such as api.stripe.com",
            ));
        }
        if input.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(invalid("hosts contain no spaces or control characters"));
        }
        if input.contains("://") {
            return Err(invalid(
                "write the host without a scheme, e.g. api.stripe.com rather than \
                 https://api.stripe.com (upstream_tls chooses HTTPS)",
            ));
        }
        if input.contains('@') {
            return Err(invalid(
                "user names and passwords do not belong in a host; put credentials in the \
                 service's auth",
            ));
        }
        if input.contains(['?', '#']) {
            return Err(invalid(
                "query strings and fragments are not allowed; end a path with * to match \
                 a prefix",
            ));
        }
        if !input.is_ascii() {
            return Err(invalid(
                "hosts are ASCII; write internationalised names in their xn-- form",
            ));
        }

        let (authority, path) = match input.find('/') {
            Some(slash) => (
                input.get(..slash).unwrap_or_default(),
                input
                    .get(slash..)
                    .map(|p| parse_path(input, p))
                    .transpose()?,
            ),
            None => (input, None),
        };

        let (host, port, bracketed) = split_pattern_authority(input, authority, options)?;
        let (wildcard, host) = if bracketed {
            (false, parse_ipv6_host(input, host, options)?)
        } else {
            parse_name_host(input, host, options)?
        };
        Ok(HostPattern {
            wildcard,
            host,
            port,
            path,
        })
    }

    /// Whether a request to `host:port` with request path `path` (query string and
    /// fragment allowed; they are ignored) matches this pattern. `host` is compared
    /// case-insensitively, with one trailing dot ignored.
    pub fn matches(&self, host: &str, port: u16, path: &str) -> bool {
        self.matches_host(host) && self.rank(port, &RequestPath::new(path)).is_some()
    }

    fn matches_host(&self, host: &str) -> bool {
        let host = host.strip_suffix('.').unwrap_or(host);
        if !self.wildcard {
            return host.eq_ignore_ascii_case(&self.host);
        }
        match host.split_once('.') {
            Some((label, parent)) => !label.is_empty() && parent.eq_ignore_ascii_case(&self.host),
            None => false,
        }
    }

    /// `None` when the port or path does not match (the host is checked elsewhere).
    fn rank(&self, port: u16, request: &RequestPath<'_>) -> Option<Rank> {
        if self.port.is_some_and(|p| p != port) {
            return None;
        }
        let (len, exact) = match &self.path {
            None => (0, false),
            Some(pattern) => {
                let hit = if pattern.exact {
                    request.path == pattern.prefix
                } else {
                    request.path.starts_with(pattern.prefix.as_str())
                };
                if !hit || request.has_dot_segments() {
                    return None;
                }
                (pattern.prefix.len(), pattern.exact)
            }
        };
        Some((self.port.is_some(), len, exact))
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            f.write_str("*.")?;
        }
        f.write_str(&self.host)?;
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        if let Some(path) = &self.path {
            f.write_str(&path.prefix)?;
            if !path.exact {
                f.write_str("*")?;
            }
        }
        Ok(())
    }
}

/// Splits `host[:port]` or `[v6][:port]`; the bool says the host was bracketed.
fn split_pattern_authority<'a>(
    input: &str,
    authority: &'a str,
    options: &ValidationOptions,
) -> Result<(&'a str, Option<u16>, bool), RuleError> {
    let invalid = |reason: &str| RuleError::InvalidHost {
        host: input.to_owned(),
        reason: reason.to_owned(),
    };
    let bad_port = || invalid("the port must be a number from 1 to 65535");

    if let Some(rest) = authority.strip_prefix('[') {
        let Some((inner, after)) = rest.split_once(']') else {
            return Err(invalid("an opening [ has no closing ]"));
        };
        let port = match after {
            "" => None,
            _ => Some(
                after
                    .strip_prefix(':')
                    .and_then(parse_port)
                    .ok_or_else(bad_port)?,
            ),
        };
        return Ok((inner, port, true));
    }
    match authority.split_once(':') {
        None => Ok((authority, None, false)),
        Some((host, port)) if !port.contains(':') => {
            Ok((host, Some(parse_port(port).ok_or_else(bad_port)?), false))
        }
        // More than one ':' outside brackets: a bare IPv6 address (or garbage).
        Some(_) => Err(match authority.parse::<Ipv6Addr>() {
            Ok(_) if options.allow_private_upstreams => invalid(
                "write IPv6 addresses in brackets, e.g. [::1]:8080, so the port is unambiguous",
            ),
            Ok(ip) => RuleError::PrivateHost {
                host: authority.to_owned(),
                what: classify_ip(&ip.to_canonical()),
            },
            Err(_) => invalid("a host has at most one ':', before the port"),
        }),
    }
}

/// `[...]` host of a pattern: only an IPv6 literal, only when private upstreams are
/// allowed. Returns the canonical bracketed form.
fn parse_ipv6_host(
    input: &str,
    inner: &str,
    options: &ValidationOptions,
) -> Result<String, RuleError> {
    let ip: Ipv6Addr = inner.parse().map_err(|_| RuleError::InvalidHost {
        host: input.to_owned(),
        reason: "brackets hold an IPv6 address, as in [::1]:8080".to_owned(),
    })?;
    if !options.allow_private_upstreams {
        return Err(RuleError::PrivateHost {
            host: format!("[{inner}]"),
            what: classify_ip(&ip.to_canonical()),
        });
    }
    Ok(format!("[{ip}]"))
}

/// A DNS name (possibly `*.`-prefixed) or IPv4 literal. Returns (wildcard, host).
fn parse_name_host(
    input: &str,
    raw: &str,
    options: &ValidationOptions,
) -> Result<(bool, String), RuleError> {
    let invalid = |reason: String| RuleError::InvalidHost {
        host: input.to_owned(),
        reason,
    };
    let allow = options.allow_private_upstreams;
    let private = |what: &'static str| RuleError::PrivateHost {
        host: raw.to_owned(),
        what,
    };

    let name = raw.strip_suffix('.').unwrap_or(raw).to_ascii_lowercase();
    let (wildcard, host) = match name.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, name.as_str()),
    };
    if host.contains('*') || (!wildcard && name.contains('*')) {
        return Err(invalid(
            "* may only stand for the whole first label, as in *.github.com".to_owned(),
        ));
    }
    if host.is_empty() {
        return Err(invalid(
            "the host is empty; write a host such as api.stripe.com".to_owned(),
        ));
    }
    if name.len() > MAX_HOST_LEN {
        return Err(invalid(format!(
            "a host name is at most {MAX_HOST_LEN} characters"
        )));
    }

    let last_label = host.rsplit('.').next().unwrap_or(host);
    if is_numeric_label(last_label) {
        if wildcard {
            return Err(invalid(
                "a wildcard covers a domain name, not an IP address".to_owned(),
            ));
        }
        // Resolvers read `127.1` or `0x7f.0.0.1` as IP addresses too; only the plain
        // dotted quad is accepted, and only when private upstreams are allowed.
        let Ok(ip) = host.parse::<Ipv4Addr>() else {
            return Err(invalid(
                "this looks like an IP address; write IPv4 addresses as four decimal \
                 numbers, e.g. 127.0.0.1"
                    .to_owned(),
            ));
        };
        if !allow {
            return Err(private(classify_ip(&IpAddr::V4(ip))));
        }
        return Ok((false, ip.to_string()));
    }

    for label in host.split('.') {
        check_label(label).map_err(&invalid)?;
    }

    let internal = is_internal_name(host);
    if !host.contains('.') {
        if wildcard {
            // `*.com` would send the credential to every .com host.
            if internal && allow {
                return Ok((true, host.to_owned()));
            }
            if internal {
                return Err(private(PRIVATE));
            }
            return Err(invalid(
                "a wildcard must cover a domain of at least two labels, e.g. \
                 *.github.com, not *.com"
                    .to_owned(),
            ));
        }
        if !allow {
            return Err(private(PRIVATE));
        }
    } else if internal && !allow {
        return Err(private(PRIVATE));
    } else if wildcard && !internal {
        #[cfg(feature = "public-suffix")]
        if let Some(section) = public_suffix(host) {
            return Err(invalid(format!(
                "a wildcard may not cover a public suffix: {host} is {section}, so \
                 *.{host} would send the credential to names that belong to anyone; name \
                 the host itself, e.g. myname.{host}"
            )));
        }
    }
    Ok((wildcard, host.to_owned()))
}

#[cfg(feature = "public-suffix")]
/// Whether `host` is itself a public suffix (a rule of the Public Suffix List, ICANN or
/// PRIVATE section, wildcard rules included), and what kind. The list is compiled into
/// the `psl` crate, so updating it is updating the crate.
fn public_suffix(host: &str) -> Option<&'static str> {
    if WILDCARD_DNS_SERVICES.contains(&host) {
        return Some(
            "a wildcard DNS service: every name under it resolves to the address it spells",
        );
    }
    let suffix = psl::suffix(host.as_bytes())?;
    if !suffix.is_known() || suffix.as_bytes() != host.as_bytes() {
        return None;
    }
    Some(match suffix.typ() {
        Some(psl::Type::Private) => {
            "on the Public Suffix List (private section: a platform whose subdomains \
             belong to different customers)"
        }
        _ => "on the Public Suffix List (a domain under which anyone can register names)",
    })
}

/// LDH rule: 1-63 letters, digits and hyphens, not starting or ending with a hyphen.
fn check_label(label: &str) -> Result<(), String> {
    if label.is_empty() {
        return Err("a host has no empty labels (no leading dot or '..')".to_owned());
    }
    if label.len() > MAX_LABEL_LEN {
        return Err(format!(
            "each dot-separated label is at most {MAX_LABEL_LEN} characters"
        ));
    }
    if !label
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(format!(
            "label {label:?} may only hold letters, digits and hyphens"
        ));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(format!(
            "label {label:?} may not start or end with a hyphen"
        ));
    }
    Ok(())
}

/// All digits, or `0x` + hex digits: what URL parsers and resolvers treat as IPv4.
fn is_numeric_label(label: &str) -> bool {
    let hex = label
        .strip_prefix("0x")
        .or_else(|| label.strip_prefix("0X"));
    match hex {
        Some(digits) => digits.bytes().all(|b| b.is_ascii_hexdigit()),
        None => !label.is_empty() && label.bytes().all(|b| b.is_ascii_digit()),
    }
}

fn is_internal_name(host: &str) -> bool {
    INTERNAL_SUFFIXES.iter().any(|suffix| {
        host == *suffix
            || host
                .strip_suffix(suffix)
                .is_some_and(|head| head.ends_with('.'))
    })
}

fn classify_ip(ip: &IpAddr) -> &'static str {
    let internal = match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
        }
        IpAddr::V6(v6) => {
            let first = v6.segments().first().copied().unwrap_or_default();
            v6.is_loopback()
                || v6.is_unspecified()
                || first & 0xfe00 == 0xfc00
                || first & 0xffc0 == 0xfe80
        }
    };
    if internal {
        PRIVATE
    } else {
        IP_LITERAL
    }
}

/// `/literal` or `/literal*`.
fn parse_path(input: &str, path: &str) -> Result<PathPattern, RuleError> {
    let invalid = |reason: &str| RuleError::InvalidHost {
        host: input.to_owned(),
        reason: reason.to_owned(),
    };
    if path.len() > MAX_PATH_LEN {
        return Err(invalid("a path is at most 1024 characters"));
    }
    let (prefix, exact) = match path.strip_suffix('*') {
        Some(prefix) => (prefix, false),
        None => (path, true),
    };
    if prefix.contains('*') {
        return Err(invalid(
            "* may only end a path, as in /v1/* (a prefix match)",
        ));
    }
    if prefix.contains('\\') {
        return Err(invalid("paths use / as separator, not \\"));
    }
    // In a prefix the last segment may be partial (`/.well-known*` has prefix `/.`).
    let mut segments: Vec<&str> = prefix.split('/').collect();
    if !exact {
        segments.pop();
    }
    if segments.iter().any(|s| *s == "." || *s == "..") {
        return Err(invalid("paths may not contain . or .. segments"));
    }
    Ok(PathPattern {
        prefix: prefix.to_owned(),
        exact,
    })
}

/// Most hosts in a vault's passthrough list.
pub const MAX_PASSTHROUGH_HOSTS: usize = 100;

/// Parses an entry of a vault's passthrough list (HTTPS tunnels that are not
/// decrypted): a host pattern as for services (`api.example.com`, `*.example.com`,
/// optional `:port`, the same refusals of private names and public-suffix
/// wildcards), without a path: a tunnel that is not decrypted has no paths to match.
pub fn parse_passthrough_host(
    input: &str,
    options: &ValidationOptions,
) -> Result<HostPattern, RuleError> {
    let pattern = HostPattern::parse(input, options)?;
    if pattern.path.is_some() {
        return Err(RuleError::InvalidHost {
            host: input.to_owned(),
            reason: "a passthrough host has no path: the tunnel is not decrypted, so the \
                     proxy never sees one; write the host and optionally its port"
                .to_owned(),
        });
    }
    Ok(pattern)
}

impl HostPattern {
    /// Whether some `host:port` could match both patterns (paths aside): the same
    /// exact host, a host one label under the other's wildcard, or the same wildcard;
    /// ports equal or either open. A plain service's implied port 80 is not taken into
    /// account: this errs towards saying they overlap.
    pub fn overlaps(&self, other: &HostPattern) -> bool {
        let ports = match (self.port, other.port) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        let one_label_under = |host: &str, parent: &str| {
            host.split_once('.')
                .is_some_and(|(label, rest)| !label.is_empty() && rest == parent)
        };
        let hosts = match (self.wildcard, other.wildcard) {
            (false, false) | (true, true) => self.host == other.host,
            (true, false) => one_label_under(&other.host, &self.host),
            (false, true) => one_label_under(&self.host, &other.host),
        };
        ports && hosts
    }

    /// Whether a tunnel to `host:port` (as from [`normalize_authority`]) matches this
    /// pattern, its path aside.
    pub fn matches_tunnel(&self, host: &str, port: u16) -> bool {
        self.matches_host(host) && self.port.is_none_or(|p| p == port)
    }
}

/// Port in a pattern or authority: 1 to 5 ASCII digits, 1..=65535.
fn parse_port(digits: &str) -> Option<u16> {
    if digits.is_empty() || digits.len() > 5 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    match digits.parse::<u16>() {
        Ok(0) | Err(_) => None,
        Ok(port) => Some(port),
    }
}

/// Splits a request's `:authority` into a lowercase host (trailing dot stripped, IPv6
/// kept in brackets in canonical form) and a port (`default_port` when absent).
/// `None` for an empty or malformed authority, which then matches no service.
pub fn normalize_authority(authority: &str, default_port: u16) -> Option<(String, u16)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (inner, after) = rest.split_once(']')?;
        let ip: Ipv6Addr = inner.parse().ok()?;
        let port = match after {
            "" => default_port,
            _ => parse_port(after.strip_prefix(':')?)?,
        };
        return Some((format!("[{ip}]"), port));
    }
    let (host, port) = match authority.split_once(':') {
        None => (authority, default_port),
        Some((host, port)) => (host, parse_port(port)?),
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    let valid = !host.is_empty()
        && host.len() <= MAX_HOST_LEN
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= MAX_LABEL_LEN
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    valid.then(|| (host.to_ascii_lowercase(), port))
}

/// A request path as matched: query string and fragment cut off, `""` read as `/`.
/// Whether it has dot segments is worked out once, and only if a pattern with a path
/// is a candidate.
struct RequestPath<'a> {
    path: &'a str,
    dot_segments: Cell<Option<bool>>,
}

impl<'a> RequestPath<'a> {
    fn new(raw: &'a str) -> Self {
        let path = match raw.find(['?', '#']) {
            Some(end) => raw.get(..end).unwrap_or_default(),
            None => raw,
        };
        RequestPath {
            path: if path.is_empty() { "/" } else { path },
            dot_segments: Cell::new(None),
        }
    }

    fn has_dot_segments(&self) -> bool {
        if let Some(known) = self.dot_segments.get() {
            return known;
        }
        let found = has_dot_segments(self.path);
        self.dot_segments.set(Some(found));
        found
    }
}

/// `.` or `..` segments, also written `%2e`, also between `\` or `%2f`/`%5c`, which
/// some upstreams decode or treat as separators, also with a path parameter (`..;x`,
/// `;` also as `%3b`), which servlet containers drop before resolving the segment;
/// and all of these encoded again (`%252e`, any number of times), for upstreams or
/// frameworks that decode twice.
fn has_dot_segments(path: &str) -> bool {
    if !path.contains('.') && !path.contains('%') {
        return false;
    }
    let mut decoded = path.to_ascii_lowercase();
    // Each pass shortens the path, so this ends.
    while decoded.contains("%25") {
        decoded = decoded.replace("%25", "%");
    }
    let decoded = decoded
        .replace("%2e", ".")
        .replace("%2f", "/")
        .replace("%5c", "/")
        .replace("%3b", ";")
        .replace('\\', "/");
    decoded
        .split('/')
        .map(|segment| segment.split(';').next().unwrap_or(segment))
        .any(|s| s == "." || s == "..")
}

/// Finds the service of a vault that a request goes to.
///
/// Built once per snapshot from the vault's services: patterns are parsed and auth
/// blocks compiled up front, so a lookup only hashes the host and ranks the few
/// services that name it. A service whose host does not parse (the control plane
/// validated it, so this means a newer or broken snapshot) never matches; a service
/// whose auth does not compile still matches, and [`ServiceMatcher::auth`] returns the
/// error so the caller fails closed. Disabled services match too: the caller answers
/// `service_disabled`.
#[derive(Debug, Clone, Default)]
pub struct ServiceMatcher {
    patterns: Vec<Option<HostPattern>>,
    /// The one port a request must have when the pattern names none: 80 for plain
    /// services, `None` (any) for TLS ones.
    implied_ports: Vec<Option<u16>>,
    auths: Vec<Result<CompiledAuth, RuleError>>,
    /// Exact host → indices of services naming it, in declaration order.
    exact: HashMap<String, Vec<usize>>,
    /// Wildcard parent (`github.com` for `*.github.com`) → indices, declaration order.
    wildcard: HashMap<String, Vec<usize>>,
}

impl ServiceMatcher {
    /// Indexes `services` (one vault's, in declaration order).
    pub fn new(services: &[Service]) -> ServiceMatcher {
        let mut matcher = ServiceMatcher::with_capacity(services.len());
        for service in services {
            matcher.push(service);
        }
        matcher.shrink_to_fit();
        matcher
    }

    /// An empty matcher with room for `services` services.
    pub fn with_capacity(services: usize) -> ServiceMatcher {
        ServiceMatcher {
            patterns: Vec::with_capacity(services),
            implied_ports: Vec::with_capacity(services),
            auths: Vec::with_capacity(services),
            exact: HashMap::new(),
            wildcard: HashMap::new(),
        }
    }

    /// Indexes the next service in declaration order (its index is the number indexed
    /// before it). Lets a caller index services as it consumes them, so the parsed
    /// services and the matcher never have to be in memory whole at the same time.
    pub fn push(&mut self, service: &Service) {
        // The control plane already applied its own options; accept whatever it did.
        let options = ValidationOptions {
            allow_private_upstreams: true,
        };
        let index = self.patterns.len();
        let pattern = HostPattern::parse(&service.host, &options).ok();
        if let Some(pattern) = &pattern {
            let map = if pattern.wildcard {
                &mut self.wildcard
            } else {
                &mut self.exact
            };
            map.entry(pattern.host.clone()).or_default().push(index);
        }
        let implied_port = pattern
            .as_ref()
            .is_some_and(|p| p.port.is_none() && !service.upstream_tls)
            .then_some(PLAIN_HTTP_PORT);
        self.patterns.push(pattern);
        self.implied_ports.push(implied_port);
        self.auths.push(CompiledAuth::compile(&service.auth));
    }

    /// Gives back the room the indexes grew into but do not use.
    pub fn shrink_to_fit(&mut self) {
        self.patterns.shrink_to_fit();
        self.implied_ports.shrink_to_fit();
        self.auths.shrink_to_fit();
        self.exact.shrink_to_fit();
        self.wildcard.shrink_to_fit();
    }

    /// Index of the service a request to `host:port` with path `path` goes to, by the
    /// priority rules of DESIGN.md §5. `host` as from [`normalize_authority`] (it is
    /// lowercased here anyway); `path` may carry a query string.
    pub fn find(&self, host: &str, port: u16, path: &str) -> Option<usize> {
        let host = lookup_host(host);
        let request = RequestPath::new(path);
        if let Some(best) = self.best(self.exact.get(host.as_ref()), port, &request) {
            return Some(best);
        }
        let (label, parent) = host.split_once('.')?;
        if label.is_empty() {
            return None;
        }
        self.best(self.wildcard.get(parent), port, &request)
    }

    /// Index of the service that could serve requests inside a tunnel to `host:port`
    /// (an HTTPS agent's `CONNECT`): the best match by host and port as [`Self::find`]
    /// ranks them, whatever the service's path, since the tunnel carries requests for
    /// any path and each is matched on its own once decrypted. `None`: no service of
    /// the vault names this host on this port.
    pub fn find_for_tunnel(&self, host: &str, port: u16) -> Option<usize> {
        let host = lookup_host(host);
        if let Some(best) = self.best_by_port(self.exact.get(host.as_ref()), port) {
            return Some(best);
        }
        let (label, parent) = host.split_once('.')?;
        if label.is_empty() {
            return None;
        }
        self.best_by_port(self.wildcard.get(parent), port)
    }

    /// The parsed pattern of service `index` (`None` if out of range or unparseable).
    pub fn pattern(&self, index: usize) -> Option<&HostPattern> {
        self.patterns.get(index).and_then(Option::as_ref)
    }

    /// The compiled auth of service `index` (`None` if out of range).
    pub fn auth(&self, index: usize) -> Option<&Result<CompiledAuth, RuleError>> {
        self.auths.get(index)
    }

    /// Number of services indexed (including any whose host did not parse).
    pub fn len(&self) -> usize {
        self.patterns.len()
    }

    /// Whether no services were indexed.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// The first candidate that takes `port`, preferring one that names the port.
    fn best_by_port(&self, candidates: Option<&Vec<usize>>, port: u16) -> Option<usize> {
        let mut best: Option<(bool, usize)> = None;
        for &index in candidates? {
            if self.port_refused(index, port) {
                continue;
            }
            let Some(pattern) = self.pattern(index) else {
                continue;
            };
            if pattern.port.is_some_and(|p| p != port) {
                continue;
            }
            let specific = pattern.port.is_some();
            if best.is_none_or(|(best_specific, _)| specific && !best_specific) {
                best = Some((specific, index));
            }
        }
        best.map(|(_, index)| index)
    }

    /// Whether service `index` names no port and is plain HTTP, so it takes port 80
    /// only, and `port` is another.
    fn port_refused(&self, index: usize, port: u16) -> bool {
        self.implied_ports
            .get(index)
            .copied()
            .flatten()
            .is_some_and(|only| only != port)
    }

    fn best(
        &self,
        candidates: Option<&Vec<usize>>,
        port: u16,
        request: &RequestPath<'_>,
    ) -> Option<usize> {
        let mut best: Option<(Rank, usize)> = None;
        for &index in candidates? {
            if self.port_refused(index, port) {
                continue;
            }
            let Some(rank) = self.pattern(index).and_then(|p| p.rank(port, request)) else {
                continue;
            };
            // Candidates are in declaration order: only a strictly better rank wins.
            if best.is_none_or(|(best_rank, _)| rank > best_rank) {
                best = Some((rank, index));
            }
        }
        best.map(|(_, index)| index)
    }
}

/// Lowercase, one trailing dot stripped; borrows when nothing changes.
fn lookup_host(host: &str) -> Cow<'_, str> {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Auth;

    const STRICT: ValidationOptions = ValidationOptions {
        allow_private_upstreams: false,
    };
    const ALLOW_PRIVATE: ValidationOptions = ValidationOptions {
        allow_private_upstreams: true,
    };

    fn parse(s: &str) -> Result<HostPattern, RuleError> {
        HostPattern::parse(s, &STRICT)
    }

    /// (behaviour, input, canonical form, wildcard, host, port, path prefix and exact)
    type AcceptCase<'a> = (
        &'a str,
        &'a str,
        &'a str,
        bool,
        &'a str,
        Option<u16>,
        Option<(&'a str, bool)>,
    );

    #[test]
    fn accepted_forms_parse_to_canonical_patterns() {
        #[rustfmt::skip]
        let cases: &[AcceptCase<'_>] = &[
            ("plain host", "api.stripe.com", "api.stripe.com", false, "api.stripe.com", None, None),
            ("wildcard host", "*.github.com", "*.github.com", true, "github.com", None, None),
            ("host with port", "api.stripe.com:8443", "api.stripe.com:8443", false, "api.stripe.com", Some(8443), None),
            ("wildcard with port", "*.github.com:443", "*.github.com:443", true, "github.com", Some(443), None),
            ("prefix path with slash star", "api.stripe.com/v1/*", "api.stripe.com/v1/*", false, "api.stripe.com", None, Some(("/v1/", false))),
            ("prefix path with star", "api.stripe.com/v1*", "api.stripe.com/v1*", false, "api.stripe.com", None, Some(("/v1", false))),
            ("exact path", "api.stripe.com/v1/charges", "api.stripe.com/v1/charges", false, "api.stripe.com", None, Some(("/v1/charges", true))),
            ("port and path", "api.stripe.com:443/v1/*", "api.stripe.com:443/v1/*", false, "api.stripe.com", Some(443), Some(("/v1/", false))),
            ("wildcard with port and path", "*.github.com:8443/api/*", "*.github.com:8443/api/*", true, "github.com", Some(8443), Some(("/api/", false))),
            ("root prefix", "api.stripe.com/*", "api.stripe.com/*", false, "api.stripe.com", None, Some(("/", false))),
            ("partial dot segment in prefix", "example.com/.well-known*", "example.com/.well-known*", false, "example.com", None, Some(("/.well-known", false))),
            ("uppercase is lowercased", "API.Stripe.COM", "api.stripe.com", false, "api.stripe.com", None, None),
            ("path case is kept", "api.stripe.com/V1/Charges", "api.stripe.com/V1/Charges", false, "api.stripe.com", None, Some(("/V1/Charges", true))),
            ("trailing dot is stripped", "api.stripe.com.", "api.stripe.com", false, "api.stripe.com", None, None),
            ("trailing dot before port", "api.stripe.com.:443", "api.stripe.com:443", false, "api.stripe.com", Some(443), None),
            ("hyphens and digits in labels", "my-api2.example-1.io", "my-api2.example-1.io", false, "my-api2.example-1.io", None, None),
            ("max port", "api.stripe.com:65535", "api.stripe.com:65535", false, "api.stripe.com", Some(65535), None),
            ("min port", "api.stripe.com:1", "api.stripe.com:1", false, "api.stripe.com", Some(1), None),
            ("leading zeros in port normalised", "api.stripe.com:0443", "api.stripe.com:443", false, "api.stripe.com", Some(443), None),
            ("punycode", "xn--bcher-kva.example", "xn--bcher-kva.example", false, "xn--bcher-kva.example", None, None),
        ];
        for (behaviour, input, canonical, wildcard, host, port, path) in cases {
            let parsed = parse(input).unwrap_or_else(|e| panic!("{behaviour}: {e}"));
            assert_eq!(parsed.to_string(), *canonical, "{behaviour}");
            assert_eq!(parsed.wildcard, *wildcard, "{behaviour}");
            assert_eq!(parsed.host, *host, "{behaviour}");
            assert_eq!(parsed.port, *port, "{behaviour}");
            let expected_path = path.map(|(prefix, exact)| PathPattern {
                prefix: prefix.to_owned(),
                exact,
            });
            assert_eq!(parsed.path, expected_path, "{behaviour}");
            // The canonical form parses back to the same pattern.
            assert_eq!(
                parse(canonical).ok(),
                Some(parsed),
                "{behaviour}: round trip"
            );
        }
    }

    #[test]
    fn malformed_patterns_are_refused_with_or_without_the_option() {
        let long_label = format!("{}.com", "a".repeat(64));
        let long_host = format!("{}.com", vec!["a".repeat(60); 5].join("."));
        let long_path = format!("api.stripe.com/{}", "a".repeat(1100));
        #[rustfmt::skip]
        let cases: &[(&str, &str)] = &[
            ("empty", ""),
            ("https scheme", "https://api.stripe.com"),
            ("http scheme", "http://api.stripe.com/v1"),
            ("userinfo", "user:pass@api.stripe.com"),
            ("userinfo without password", "user@api.stripe.com"),
            ("query string", "api.stripe.com/v1?x=1"),
            ("query without path", "api.stripe.com?x=1"),
            ("fragment", "api.stripe.com/v1#top"),
            ("leading whitespace", " api.stripe.com"),
            ("inner whitespace", "api .stripe.com"),
            ("trailing newline", "api.stripe.com\n"),
            ("tab", "api.stripe.com\t"),
            ("non-ascii", "bücher.example"),
            ("star inside a label", "api*.github.com"),
            ("star as a later label", "api.*.github.com"),
            ("star at the end", "api.github.*"),
            ("double star", "*.*.github.com"),
            ("bare star", "*"),
            ("star with empty rest", "*."),
            ("star without dot", "*github.com"),
            ("star in the port", "api.github.com:*"),
            ("star in middle of path", "api.stripe.com/v1/*/charges"),
            ("two stars in path", "api.stripe.com/v1/**"),
            ("dot dot in path", "api.stripe.com/v1/../admin"),
            ("dot segment in path", "api.stripe.com/./v1"),
            ("dot dot at end of exact path", "api.stripe.com/v1/.."),
            ("backslash in path", "api.stripe.com/v1\\x"),
            ("path too long", &long_path),
            ("port zero", "api.stripe.com:0"),
            ("port too large", "api.stripe.com:65536"),
            ("port not a number", "api.stripe.com:https"),
            ("empty port", "api.stripe.com:"),
            ("signed port", "api.stripe.com:+443"),
            ("two ports", "api.stripe.com:443:444"),
            ("empty label", "api..stripe.com"),
            ("leading dot", ".stripe.com"),
            ("two trailing dots", "api.stripe.com.."),
            ("label starting with hyphen", "-api.stripe.com"),
            ("label ending with hyphen", "api-.stripe.com"),
            ("underscore in label", "api_v1.stripe.com"),
            ("label longer than 63", &long_label),
            ("host longer than 253", &long_host),
            ("only a port", ":443"),
            ("only a path", "/v1/*"),
            ("wildcard over a public suffix", "*.com"),
            ("wildcard over an ip", "*.0.0.1"),
            ("numeric non-dotted-quad ip", "127.1"),
            ("hex ip", "0x7f.0.0.1"),
            ("ipv4 with leading zeros", "127.000.000.001"),
            ("unclosed bracket", "[::1"),
            ("brackets without ipv6", "[example.com]"),
            ("garbage after brackets", "[::1]x"),
            ("semicolon", "api.stripe.com;x"),
            ("comma", "a.com,b.com"),
        ];
        for (behaviour, input) in cases {
            for options in [STRICT, ALLOW_PRIVATE] {
                match HostPattern::parse(input, &options) {
                    Ok(pattern) => panic!("{behaviour}: {input:?} accepted as {pattern}"),
                    Err(error) => {
                        assert_eq!(error.code(), "invalid_host", "{behaviour}: {error}");
                        assert!(!error.to_string().contains('\n'), "{behaviour}");
                    }
                }
            }
        }
    }

    #[test]
    fn private_and_internal_hosts_need_the_allow_option() {
        // (behaviour, input, canonical form with the option)
        #[rustfmt::skip]
        let cases: &[(&str, &str, &str)] = &[
            ("loopback ipv4", "127.0.0.1", "127.0.0.1"),
            ("loopback ipv4 with port and path", "127.0.0.1:8080/v1/*", "127.0.0.1:8080/v1/*"),
            ("private ipv4", "10.1.2.3", "10.1.2.3"),
            ("public ipv4 literal", "8.8.8.8", "8.8.8.8"),
            ("link-local metadata address", "169.254.169.254", "169.254.169.254"),
            ("localhost", "localhost", "localhost"),
            ("localhost with port", "localhost:9000", "localhost:9000"),
            ("uppercase localhost with trailing dot", "LOCALHOST.", "localhost"),
            ("subdomain of localhost", "api.localhost", "api.localhost"),
            ("wildcard under localhost", "*.localhost", "*.localhost"),
            ("single-label name", "upstream", "upstream"),
            ("single-label name with port", "upstream:8080", "upstream:8080"),
            ("dot local", "printer.local", "printer.local"),
            ("dot internal", "metadata.google.internal", "metadata.google.internal"),
            ("dot lan", "nas.lan", "nas.lan"),
            ("dot home arpa", "router.home.arpa", "router.home.arpa"),
            ("dot corp", "wiki.corp", "wiki.corp"),
            ("dot intranet", "hr.intranet", "hr.intranet"),
            ("wildcard under an internal suffix", "*.svc.internal", "*.svc.internal"),
            ("bracketed ipv6 loopback", "[::1]", "[::1]"),
            ("bracketed ipv6 with port", "[::1]:8080", "[::1]:8080"),
            ("bracketed ipv6 canonicalised", "[0:0::1]:8080/x*", "[::1]:8080/x*"),
        ];
        for (behaviour, input, canonical) in cases {
            let error = parse(input).err();
            let code = error.as_ref().map(RuleError::code);
            assert_eq!(code, Some("private_host"), "{behaviour}: {error:?}");
            let message = error.map(|e| e.to_string()).unwrap_or_default();
            assert!(
                message.contains("--allow-private-upstreams"),
                "{behaviour}: {message}"
            );

            let allowed = HostPattern::parse(input, &ALLOW_PRIVATE);
            let shown = allowed.as_ref().map(ToString::to_string);
            assert_eq!(
                shown.ok().as_deref(),
                Some(*canonical),
                "{behaviour}: {allowed:?}"
            );
        }
    }

    #[test]
    fn private_host_message_names_the_setting() {
        let message = parse("127.0.0.1").err().map(|e| e.to_string());
        assert_eq!(
            message.as_deref(),
            Some(
                "host \"127.0.0.1\" is a private or internal address; the server refuses it \
                 unless started with --allow-private-upstreams"
            )
        );
        let message = parse("8.8.8.8:53").err().map(|e| e.to_string());
        assert_eq!(
            message.as_deref(),
            Some(
                "host \"8.8.8.8\" is an IP address literal; the server refuses it unless \
                 started with --allow-private-upstreams"
            )
        );
    }

    #[test]
    fn bare_ipv6_is_refused_and_must_be_bracketed_with_the_option() {
        assert_eq!(parse("::1").err().map(|e| e.code()), Some("private_host"));
        let with_port = parse("fe80::1:8080").err().map(|e| e.code());
        assert_eq!(with_port, Some("private_host"));
        // With the option an address must still be bracketed to tell it from a port.
        let with_option = HostPattern::parse("::1", &ALLOW_PRIVATE).err();
        assert_eq!(with_option.map(|e| e.code()), Some("invalid_host"));
    }

    #[test]
    fn public_lookalikes_of_internal_names_are_fine() {
        #[rustfmt::skip]
        let inputs = ["localhost.example.com", "corp.example.com", "internal.io", "mylan.com", "local.dev"];
        for input in inputs {
            assert!(parse(input).is_ok(), "{input}");
        }
    }

    /// (behaviour, pattern, the suffix the error names or `None` if accepted)
    type SuffixCase<'a> = (&'a str, &'a str, Option<&'a str>);

    #[cfg(feature = "public-suffix")]
    #[test]
    fn wildcards_over_a_public_suffix_are_refused_naming_the_suffix() {
        #[rustfmt::skip]
        let cases: &[SuffixCase<'_>] = &[
            ("a two-label ICANN suffix", "*.co.uk", Some("co.uk")),
            ("another ICANN second-level suffix", "*.com.au", Some("com.au")),
            ("a private-section platform", "*.herokuapp.com", Some("herokuapp.com")),
            ("a private-section bucket host", "*.s3.amazonaws.com", Some("s3.amazonaws.com")),
            ("a tunnel service", "*.ngrok-free.app", Some("ngrok-free.app")),
            ("a wildcard DNS service", "*.nip.io", Some("nip.io")),
            ("another wildcard DNS service", "*.sslip.io", Some("sslip.io")),
            ("a GitHub Pages suffix", "*.github.io", Some("github.io")),
            ("a suffix under a wildcard rule of the list", "*.foo.ck", Some("foo.ck")),
            ("with a port and a path", "*.herokuapp.com:443/v1/*", Some("herokuapp.com")),
            ("in upper case with a trailing dot", "*.HerokuApp.COM.", Some("herokuapp.com")),
            ("a company domain", "*.github.com", None),
            ("an example domain", "*.example.com", None),
            ("one label below a private suffix", "*.myapp.herokuapp.com", None),
            ("under a ccTLD second level", "*.example.co.uk", None),
            ("an exact host that is a suffix", "herokuapp.com", None),
            ("an exact host under a suffix", "myapp.herokuapp.com", None),
        ];
        for options in [STRICT, ALLOW_PRIVATE] {
            for (behaviour, input, suffix) in cases {
                let parsed = HostPattern::parse(input, &options);
                match suffix {
                    None => assert!(parsed.is_ok(), "{behaviour}: {parsed:?}"),
                    Some(suffix) => {
                        let message = parsed.map(|p| p.to_string()).unwrap_err().to_string();
                        assert!(
                            message.contains(&format!("cover a public suffix: {suffix} is ")),
                            "{behaviour}: {message}"
                        );
                    }
                }
            }
        }
    }

    /// (behaviour, pattern, host, port, path, matches)
    type MatchCase<'a> = (&'a str, &'a str, &'a str, u16, &'a str, bool);

    #[test]
    fn matching_a_single_pattern() {
        #[rustfmt::skip]
        let cases: &[MatchCase<'_>] = &[
            ("exact host", "api.stripe.com", "api.stripe.com", 443, "/v1", true),
            ("exact host, other host", "api.stripe.com", "stripe.com", 443, "/", false),
            ("host is case-insensitive", "api.stripe.com", "API.Stripe.com", 80, "/", true),
            ("host trailing dot ignored", "api.stripe.com", "api.stripe.com.", 80, "/", true),
            ("no port matches any port", "api.stripe.com", "api.stripe.com", 8080, "/", true),
            ("port must be equal", "api.stripe.com:8443", "api.stripe.com", 443, "/", false),
            ("port equal", "api.stripe.com:8443", "api.stripe.com", 8443, "/", true),
            ("wildcard matches one label", "*.github.com", "api.github.com", 443, "/", true),
            ("wildcard does not match the parent", "*.github.com", "github.com", 443, "/", false),
            ("wildcard does not match two labels", "*.github.com", "a.b.github.com", 443, "/", false),
            ("wildcard does not match an empty label", "*.github.com", ".github.com", 443, "/", false),
            ("wildcard does not match a lookalike", "*.github.com", "api.evilgithub.com", 443, "/", false),
            ("wildcard is case-insensitive", "*.github.com", "API.GitHub.com", 443, "/", true),
            ("prefix path", "api.stripe.com/v1/*", "api.stripe.com", 443, "/v1/charges", true),
            ("prefix path, other path", "api.stripe.com/v1/*", "api.stripe.com", 443, "/v2/charges", false),
            ("prefix path without slash", "api.stripe.com/v1*", "api.stripe.com", 443, "/v1beta", true),
            ("prefix path is case-sensitive", "api.stripe.com/v1/*", "api.stripe.com", 443, "/V1/charges", false),
            ("prefix path ignores the query", "api.stripe.com/v1/*", "api.stripe.com", 443, "/v1/x?a=/v2", true),
            ("query cannot fake a prefix", "api.stripe.com/v1/*", "api.stripe.com", 443, "/v2?/v1/", false),
            ("exact path", "api.stripe.com/v1/charges", "api.stripe.com", 443, "/v1/charges", true),
            ("exact path ignores the query", "api.stripe.com/v1/charges", "api.stripe.com", 443, "/v1/charges?limit=3", true),
            ("exact path ignores the fragment", "api.stripe.com/v1/charges", "api.stripe.com", 443, "/v1/charges#x", true),
            ("exact path, longer path", "api.stripe.com/v1/charges", "api.stripe.com", 443, "/v1/charges/ch_1", false),
            ("exact root matches an empty path", "api.stripe.com/", "api.stripe.com", 443, "", true),
            ("no path matches any path", "api.stripe.com", "api.stripe.com", 443, "/anything/at/all", true),
            ("dot dot escapes the prefix", "api.stripe.com/v1/*", "api.stripe.com", 443, "/v1/../admin", false),
            ("encoded dot dot escapes the prefix", "api.stripe.com/v1/*", "api.stripe.com", 443, "/v1/%2E%2e/admin", false),
            ("dot dot with encoded slash", "api.stripe.com/v1/*", "api.stripe.com", 443, "/v1/..%2Fadmin", false),
            ("dot dot with backslash", "api.stripe.com/v1/*", "api.stripe.com", 443, "/v1/..\\admin", false),
            ("single dot segment", "api.stripe.com/v1/*", "api.stripe.com", 443, "/v1/./x", false),
            ("dots inside a segment are fine", "api.stripe.com/v1/*", "api.stripe.com", 443, "/v1/file..txt", true),
            ("encoded slash alone is fine", "api.stripe.com/v1/*", "api.stripe.com", 443, "/v1/group%2Fproject", true),
            ("dot dot without a path pattern", "api.stripe.com", "api.stripe.com", 443, "/v1/../admin", true),
        ];
        for (behaviour, pattern, host, port, path, expected) in cases {
            let pattern = parse(pattern).unwrap_or_else(|e| panic!("{behaviour}: {e}"));
            assert_eq!(pattern.matches(host, *port, path), *expected, "{behaviour}");
        }
    }

    #[test]
    fn path_parameters_do_not_hide_dot_segments() {
        // Found by rules/tests/properties.rs (`example.com/*` matched `/..;/`): Tomcat
        // and other servlet containers drop `;param` from a segment before resolving
        // it, so `/v1/..;/admin` reaches `/admin` with the credential injected.
        let pattern = parse("api.stripe.com/v1/*").unwrap_or_else(|e| panic!("{e}"));
        for path in [
            "/v1/..;/admin",
            "/v1/..;jsessionid=1/admin",
            "/v1/.;/x",
            "/v1/%2e%2e;/admin",
            "/v1/..%3B/admin",
        ] {
            assert!(!pattern.matches("api.stripe.com", 443, path), "{path}");
        }
        // A parameter on an ordinary segment changes nothing.
        assert!(pattern.matches("api.stripe.com", 443, "/v1/charges;x=1"));
    }

    /// (behaviour, authority, expected host and port with default port 80)
    type AuthorityCase<'a> = (&'a str, &'a str, Option<(&'a str, u16)>);

    #[test]
    fn authority_normalisation() {
        #[rustfmt::skip]
        let cases: &[AuthorityCase<'_>] = &[
            ("host alone takes the default port", "api.stripe.com", Some(("api.stripe.com", 80))),
            ("host with port", "api.stripe.com:8443", Some(("api.stripe.com", 8443))),
            ("uppercase is lowercased", "API.Stripe.COM:443", Some(("api.stripe.com", 443))),
            ("trailing dot is stripped", "api.stripe.com.", Some(("api.stripe.com", 80))),
            ("trailing dot before port", "api.stripe.com.:443", Some(("api.stripe.com", 443))),
            ("ipv4 with port", "127.0.0.1:9000", Some(("127.0.0.1", 9000))),
            ("ipv6 with port", "[::1]:8080", Some(("[::1]", 8080))),
            ("ipv6 without port", "[::1]", Some(("[::1]", 80))),
            ("ipv6 is canonicalised", "[0:0:0:0:0:0:0:1]:8080", Some(("[::1]", 8080))),
            ("ipv6 is lowercased", "[FE80::AB]", Some(("[fe80::ab]", 80))),
            ("single label", "upstream:8080", Some(("upstream", 8080))),
            ("underscore tolerated", "my_host.example.com", Some(("my_host.example.com", 80))),
            ("empty", "", None),
            ("only a dot", ".", None),
            ("only a port", ":443", None),
            ("empty port", "api.stripe.com:", None),
            ("port zero", "api.stripe.com:0", None),
            ("port too large", "api.stripe.com:70000", None),
            ("port not a number", "api.stripe.com:http", None),
            ("bare ipv6", "::1", None),
            ("unclosed bracket", "[::1", None),
            ("garbage in brackets", "[not-ip]:80", None),
            ("garbage after brackets", "[::1]80", None),
            ("userinfo", "user@api.stripe.com", None),
            ("space", "api stripe.com", None),
            ("empty label", "api..stripe.com", None),
            ("slash", "api.stripe.com/v1", None),
            ("two trailing dots", "api.stripe.com..", None),
        ];
        for (behaviour, authority, expected) in cases {
            let got = normalize_authority(authority, 80);
            let expected = expected.map(|(h, p)| (h.to_owned(), p));
            assert_eq!(got, expected, "{behaviour}");
        }
    }

    fn service(name: &str, host: &str) -> Service {
        Service {
            name: name.to_owned(),
            host: host.to_owned(),
            enabled: true,
            auth: Auth::Passthrough {},
            upstream_tls: true,
            methods: None,
            rate_limit: None,
            substitutions: Vec::new(),
            redact_responses: None,
            upstream_h2c: false,
        }
    }

    /// (behaviour, service hosts in declaration order, host, port, path, expected index)
    type PriorityCase<'a> = (&'a str, &'a [&'a str], &'a str, u16, &'a str, Option<usize>);

    #[test]
    fn matcher_priority_rules() {
        #[rustfmt::skip]
        let cases: &[PriorityCase<'_>] = &[
            ("exact beats wildcard even when declared later", &["*.github.com", "api.github.com"], "api.github.com", 443, "/", Some(1)),
            ("exact beats wildcard with a port and path", &["*.github.com:443/repos/*", "api.github.com"], "api.github.com", 443, "/repos/x", Some(1)),
            ("wildcard when the exact host does not match the port", &["*.github.com", "api.github.com:8443"], "api.github.com", 443, "/", Some(0)),
            ("wildcard when the exact host does not match the path", &["api.github.com/v3/*", "*.github.com"], "api.github.com", 443, "/graphql", Some(1)),
            ("specific port beats any port", &["api.stripe.com", "api.stripe.com:443"], "api.stripe.com", 443, "/", Some(1)),
            ("specific port beats a longer path", &["api.stripe.com/v1/*", "api.stripe.com:443"], "api.stripe.com", 443, "/v1/x", Some(1)),
            ("any port when the port differs", &["api.stripe.com:8443", "api.stripe.com"], "api.stripe.com", 443, "/", Some(1)),
            ("longest path prefix wins", &["api.stripe.com/v1/*", "api.stripe.com/v1/charges/*", "api.stripe.com"], "api.stripe.com", 443, "/v1/charges/ch_1", Some(1)),
            ("shorter prefix when the longer does not match", &["api.stripe.com/v1/*", "api.stripe.com/v1/charges/*"], "api.stripe.com", 443, "/v1/refunds", Some(0)),
            ("any path prefix beats no path", &["api.stripe.com", "api.stripe.com/*"], "api.stripe.com", 443, "/x", Some(1)),
            ("exact path beats same-length prefix", &["api.stripe.com/v1/charges*", "api.stripe.com/v1/charges"], "api.stripe.com", 443, "/v1/charges", Some(1)),
            ("prefix of same length when the path is longer", &["api.stripe.com/v1/charges*", "api.stripe.com/v1/charges"], "api.stripe.com", 443, "/v1/charges/x", Some(0)),
            ("longer exact path beats shorter prefix", &["api.stripe.com/v1*", "api.stripe.com/v1/charges"], "api.stripe.com", 443, "/v1/charges", Some(1)),
            ("declaration order breaks ties", &["api.stripe.com", "api.stripe.com"], "api.stripe.com", 443, "/", Some(0)),
            ("declaration order breaks ties of port and path", &["api.stripe.com:443/v1/*", "api.stripe.com:443/v1/*"], "api.stripe.com", 443, "/v1/x", Some(0)),
            ("first of equal wildcards wins", &["*.github.com", "*.GitHub.com"], "api.github.com", 443, "/", Some(0)),
            ("wildcard is exactly one label deep", &["*.github.com"], "a.b.github.com", 443, "/", None),
            ("wildcard does not cover its parent", &["*.github.com"], "github.com", 443, "/", None),
            ("nested wildcard matches one label under it", &["*.github.com", "*.api.github.com"], "v3.api.github.com", 443, "/", Some(1)),
            ("lookup host is case-insensitive", &["api.stripe.com"], "API.STRIPE.COM.", 443, "/", Some(0)),
            ("no service for an unknown host", &["api.stripe.com"], "api.openai.com", 443, "/", None),
            ("unparseable hosts are skipped", &["https://api.stripe.com", "api.stripe.com"], "api.stripe.com", 443, "/", Some(1)),
            ("loopback upstreams match", &["127.0.0.1:9000"], "127.0.0.1", 9000, "/", Some(0)),
            ("ipv6 upstreams match", &["[::1]:9000"], "[::1]", 9000, "/", Some(0)),
            ("dot segments never match a path pattern", &["api.stripe.com/v1/*", "api.stripe.com:443"], "api.stripe.com", 8443, "/v1/../admin", None),
            ("dot segments fall back to a service without a path", &["api.stripe.com/v1/*", "api.stripe.com"], "api.stripe.com", 443, "/v1/../admin", Some(1)),
            ("double-encoded dot segments never match a path pattern", &["api.stripe.com/v1/public/*"], "api.stripe.com", 443, "/v1/public/%252e%252e/admin", None),
            ("double-encoded slashes around dots never match", &["api.stripe.com/v1/public/*"], "api.stripe.com", 443, "/v1/public/..%252fadmin", None),
            ("triple-encoded dots never match", &["api.stripe.com/v1/public/*"], "api.stripe.com", 443, "/v1/public/%25252E%25252E/admin", None),
            ("an encoded percent sign alone is an ordinary path", &["api.stripe.com/v1/public/*"], "api.stripe.com", 443, "/v1/public/100%25", Some(0)),
        ];
        for (behaviour, hosts, host, port, path, expected) in cases {
            let services: Vec<Service> = hosts
                .iter()
                .enumerate()
                .map(|(i, h)| service(&format!("s{i}"), h))
                .collect();
            let matcher = ServiceMatcher::new(&services);
            assert_eq!(matcher.find(host, *port, path), *expected, "{behaviour}");
        }
    }

    /// (behaviour, (host pattern, upstream_tls) in declaration order, host, port,
    /// expected index)
    type PortCase<'a> = (&'a str, &'a [(&'a str, bool)], &'a str, u16, Option<usize>);

    #[test]
    fn a_plain_service_without_a_port_matches_only_port_80() {
        #[rustfmt::skip]
        let cases: &[PortCase<'_>] = &[
            ("plain on port 80", &[("internal.example", false)], "internal.example", 80, Some(0)),
            ("plain on another port gets no service", &[("internal.example", false)], "internal.example", 8080, None),
            ("plain on 443 gets no service", &[("internal.example", false)], "internal.example", 443, None),
            ("plain with an explicit port keeps it", &[("internal.example:8080", false)], "internal.example", 8080, Some(0)),
            ("plain with an explicit port refuses 80", &[("internal.example:8080", false)], "internal.example", 80, None),
            ("plain wildcard on port 80", &[("*.internal.example", false)], "a.internal.example", 80, Some(0)),
            ("plain wildcard on another port", &[("*.internal.example", false)], "a.internal.example", 9000, None),
            ("TLS without a port matches any port (the filter sends it to 443)", &[("api.example.com", true)], "api.example.com", 8080, Some(0)),
            ("another port falls through to a TLS rule of the host", &[("api.corp.example", false), ("*.corp.example", true)], "api.corp.example", 8080, Some(1)),
            ("an explicit port rule wins on its port", &[("internal.example", false), ("internal.example:9000", false)], "internal.example", 9000, Some(1)),
        ];
        for (behaviour, hosts, host, port, expected) in cases {
            let services: Vec<Service> = hosts
                .iter()
                .enumerate()
                .map(|(i, (h, tls))| Service {
                    upstream_tls: *tls,
                    ..service(&format!("s{i}"), h)
                })
                .collect();
            let matcher = ServiceMatcher::new(&services);
            assert_eq!(matcher.find(host, *port, "/"), *expected, "{behaviour}");
        }
    }

    /// (behaviour, (host pattern, upstream_tls) in declaration order, CONNECT host and
    /// port, expected index)
    type TunnelCase<'a> = (&'a str, &'a [(&'a str, bool)], &'a str, u16, Option<usize>);

    #[test]
    fn a_tunnel_is_matched_by_host_and_port_whatever_the_services_path() {
        #[rustfmt::skip]
        let cases: &[TunnelCase<'_>] = &[
            ("a TLS service without a port takes 443", &[("api.stripe.com", true)], "api.stripe.com", 443, Some(0)),
            ("a TLS service without a port takes any port", &[("api.stripe.com", true)], "api.stripe.com", 8443, Some(0)),
            ("a path-scoped service still lets the tunnel open", &[("api.stripe.com/v1/*", true)], "api.stripe.com", 443, Some(0)),
            ("a service naming another port does not", &[("api.stripe.com:8443", true)], "api.stripe.com", 443, None),
            ("a service naming the port wins over one that does not", &[("api.stripe.com", true), ("api.stripe.com:443/v1/*", true)], "api.stripe.com", 443, Some(1)),
            ("exact beats wildcard", &[("*.github.com", true), ("api.github.com/x", true)], "api.github.com", 443, Some(1)),
            ("a wildcard covers one label", &[("*.github.com", true)], "api.github.com", 443, Some(0)),
            ("a wildcard does not cover two labels", &[("*.github.com", true)], "a.b.github.com", 443, None),
            ("a wildcard does not cover its parent", &[("*.github.com", true)], "github.com", 443, None),
            ("a plain service without a port takes only 80", &[("internal.example", false)], "internal.example", 443, None),
            ("a plain service on 80 can be tunnelled to on 80", &[("internal.example", false)], "internal.example", 80, Some(0)),
            ("a plain service naming the port", &[("internal.example:8443", false)], "internal.example", 8443, Some(0)),
            ("the host is compared without case and trailing dot", &[("api.stripe.com", true)], "API.Stripe.com.", 443, Some(0)),
            ("declaration order breaks ties", &[("api.stripe.com/a", true), ("api.stripe.com/b", true)], "api.stripe.com", 443, Some(0)),
            ("no service for another host", &[("api.stripe.com", true)], "api.openai.com", 443, None),
        ];
        for (behaviour, hosts, host, port, expected) in cases {
            let services: Vec<Service> = hosts
                .iter()
                .enumerate()
                .map(|(i, (h, tls))| Service {
                    upstream_tls: *tls,
                    ..service(&format!("s{i}"), h)
                })
                .collect();
            let matcher = ServiceMatcher::new(&services);
            assert_eq!(
                matcher.find_for_tunnel(host, *port),
                *expected,
                "{behaviour}"
            );
        }
    }

    #[test]
    fn passthrough_hosts_are_service_hosts_without_a_path() {
        for good in [
            "pinned.example.com",
            "*.pinned.example.com",
            "pinned.example.com:8443",
        ] {
            assert!(parse_passthrough_host(good, &STRICT).is_ok(), "{good}");
        }
        // (behaviour, input, error code)
        #[rustfmt::skip]
        let refused: &[(&str, &str, &str)] = &[
            ("a path", "pinned.example.com/v1/*", "invalid_host"),
            ("a private name", "localhost:8443", "private_host"),
            ("an IP literal", "10.0.0.5", "private_host"),
            ("a wildcard over a public suffix", "*.com", "invalid_host"),
            ("a scheme", "https://pinned.example.com", "invalid_host"),
        ];
        for (behaviour, input, code) in refused {
            let error = parse_passthrough_host(input, &STRICT).err();
            assert_eq!(error.map(|e| e.code()), Some(*code), "{behaviour}");
        }
        assert!(parse_passthrough_host("localhost:8443", &ALLOW_PRIVATE).is_ok());
    }

    /// (behaviour, a, b, overlap)
    type OverlapCase<'a> = (&'a str, &'a str, &'a str, bool);

    #[test]
    fn patterns_overlap_when_some_host_and_port_matches_both() {
        #[rustfmt::skip]
        let cases: &[OverlapCase<'_>] = &[
            ("the same host", "api.example.com", "api.example.com", true),
            ("another host", "api.example.com", "web.example.com", false),
            ("the same host, any port and one port", "api.example.com", "api.example.com:8443", true),
            ("the same host on other ports", "api.example.com:443", "api.example.com:8443", false),
            ("a host under a wildcard", "*.example.com", "api.example.com", true),
            ("a wildcard over a host", "api.example.com", "*.example.com", true),
            ("the wildcard's parent", "*.example.com", "example.com", false),
            ("two labels under a wildcard", "*.example.com", "a.b.example.com", false),
            ("the same wildcard", "*.example.com", "*.example.com:443", true),
            ("nested wildcards", "*.example.com", "*.api.example.com", false),
            ("paths do not matter", "api.example.com/v1/*", "api.example.com", true),
        ];
        for (behaviour, a, b, expected) in cases {
            let (a, b) = (
                HostPattern::parse(a, &STRICT).unwrap(),
                HostPattern::parse(b, &STRICT).unwrap(),
            );
            assert_eq!(a.overlaps(&b), *expected, "{behaviour}");
            assert_eq!(b.overlaps(&a), *expected, "{behaviour} (the other way)");
        }
        let pinned = parse_passthrough_host("*.pinned.example.com:443", &STRICT).unwrap();
        assert!(pinned.matches_tunnel("app.pinned.example.com", 443));
        assert!(pinned.matches_tunnel("APP.pinned.example.com.", 443));
        assert!(!pinned.matches_tunnel("app.pinned.example.com", 8443));
        assert!(!pinned.matches_tunnel("pinned.example.com", 443));
    }

    #[test]
    fn matcher_finds_the_right_service_among_10k() {
        let mut services: Vec<Service> = (0..10_000)
            .map(|i| match i % 4 {
                0 => service(&format!("s{i}"), &format!("api{i}.example.com")),
                1 => service(&format!("s{i}"), &format!("*.tenant{i}.example.com")),
                2 => service(&format!("s{i}"), &format!("api{i}.example.com:8443/v1/*")),
                _ => service(&format!("s{i}"), "shared.example.com/v1/*"),
            })
            .collect();
        services.push(service("items", "shared.example.com/v1/items/*"));
        let matcher = ServiceMatcher::new(&services);
        assert_eq!(matcher.len(), 10_001);
        assert_eq!(matcher.find("api7776.example.com", 443, "/"), Some(7776));
        assert_eq!(
            matcher.find("x.tenant9997.example.com", 443, "/"),
            Some(9997)
        );
        assert_eq!(
            matcher.find("api5002.example.com", 8443, "/v1/x"),
            Some(5002)
        );
        assert_eq!(matcher.find("api5002.example.com", 443, "/v1/x"), None);
        assert_eq!(matcher.find("shared.example.com", 443, "/v1/a"), Some(3));
        let items = matcher.find("shared.example.com", 443, "/v1/items/1");
        assert_eq!(items, Some(10_000));
        assert_eq!(matcher.find("api10001.example.com", 443, "/"), None);
        // Every exact host finds itself.
        for i in (0..10_000).step_by(4) {
            let host = format!("api{i}.example.com");
            assert_eq!(matcher.find(&host, 80, "/"), Some(i), "{host}");
        }
    }

    #[test]
    fn matcher_exposes_patterns_and_compiled_auth() {
        let services = vec![service("a", "api.stripe.com"), service("b", "not a host")];
        let matcher = ServiceMatcher::new(&services);
        let shown = matcher.pattern(0).map(ToString::to_string);
        assert_eq!(shown.as_deref(), Some("api.stripe.com"));
        assert_eq!(matcher.pattern(1), None);
        assert_eq!(matcher.pattern(2), None);
        assert!(matches!(matcher.auth(0), Some(Ok(_))));
        assert!(matcher.auth(2).is_none());
        assert!(ServiceMatcher::new(&[]).is_empty());
    }
}
