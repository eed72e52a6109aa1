//! The project's tasks that both `./dev` and the Rust tests need, so they exist once.
//!
//! Rendering the templates under `envoy/` (DESIGN.md §10), and the value of their
//! `ALLOWED_PRIVATE_UPSTREAMS` placeholder ([`allowed_upstreams`]). Rendering: every
//! placeholder `${NAME}` (`NAME` is `[A-Z0-9_]+`) is replaced by a value, and a template
//! with a placeholder that has no value is refused rather than rendered half-filled:
//! Envoy would otherwise start on a listener or socket path nobody chose.
//!
//! Anything else that looks like a placeholder (`${lower}`, `${}`, a `$` alone) is
//! text and left as it is. Substitution is one pass: a value that itself contains
//! `${NAME}` is not expanded again.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;

/// The names of every placeholder in `template`, sorted, each once.
pub fn placeholders(template: &str) -> BTreeSet<&str> {
    let mut names = BTreeSet::new();
    let mut rest = template;
    while let Some((_, name, after)) = next_placeholder(rest) {
        names.insert(name);
        rest = after;
    }
    names
}

/// Placeholders of a template that have no value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing(pub Vec<String>);

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "missing template variables: {}", self.0.join(", "))
    }
}

impl std::error::Error for Missing {}

/// `template` with every placeholder replaced by `value(NAME)`; `Err` lists (sorted)
/// every name `value` has no value for, and nothing is rendered.
pub fn render(template: &str, value: impl Fn(&str) -> Option<String>) -> Result<String, Missing> {
    let missing: Vec<String> = placeholders(template)
        .into_iter()
        .filter(|name| value(name).is_none())
        .map(str::to_string)
        .collect();
    if !missing.is_empty() {
        return Err(Missing(missing));
    }
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some((before, name, after)) = next_placeholder(rest) {
        out.push_str(before);
        out.push_str(&value(name).unwrap_or_default());
        rest = after;
    }
    out.push_str(rest);
    Ok(out)
}

/// The value of an HTTP connection manager's `access_log` that sends the filter's
/// request log through Envoy's gRPC access log (the filter's
/// `"request_log": "access_log"`, envoy/README.md) to `cluster`, the control plane's
/// gRPC socket: one line of YAML flow style, so it can follow `access_log: ` at any
/// indentation. At most 256 KiB or 1 s of entries is held in Envoy.
pub fn request_access_log(cluster: &str) -> String {
    format!(
        "[{{name: envoy.access_loggers.http_grpc, typed_config: {{\"@type\": \
         type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig, \
         common_config: {{log_name: agent_vault, transport_api_version: V3, \
         grpc_service: {{envoy_grpc: {{cluster_name: {cluster}}}}}, \
         filter_state_objects_to_log: [wasm.agent_vault_log], buffer_flush_interval: 1s, \
         buffer_size_bytes: 262144}}}}}}]"
    )
}

/// The value of the forward-proxy template's `ALLOWED_PRIVATE_UPSTREAMS`: the private
/// destinations Envoy may still connect to, each `ADDRESS[/PREFIX]:PORT` or
/// `ADDRESS[/PREFIX]:*` (any port), IPv6 in brackets (`[fd00::/8]:443`). Empty for no
/// entry, which is what production configs use. Each entry becomes one RBAC
/// `UpstreamIpPortMatcher` permission followed by `, ` (the template closes the list).
pub fn allowed_upstreams<S: AsRef<str>>(entries: &[S]) -> Result<String, String> {
    let mut out = String::new();
    for entry in entries {
        let entry = entry.as_ref();
        let bad = |why: &str| {
            format!(
                "allowed upstream {entry:?}: {why}; write ADDRESS[/PREFIX]:PORT or \
                 ADDRESS[/PREFIX]:* (IPv6 in brackets), e.g. 127.0.0.1/32:18080"
            )
        };
        let (cidr, port) = match entry.strip_prefix('[') {
            Some(rest) => {
                let (inner, after) = rest.split_once(']').ok_or_else(|| bad("no closing ]"))?;
                (
                    inner,
                    after.strip_prefix(':').ok_or_else(|| bad("no port"))?,
                )
            }
            None => entry.rsplit_once(':').ok_or_else(|| bad("no port"))?,
        };
        let (address, prefix) = match cidr.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (cidr, None),
        };
        let ip: IpAddr = address.parse().map_err(|_| bad("not an IP address"))?;
        if ip.is_ipv6() && !entry.starts_with('[') {
            return Err(bad("IPv6 addresses go in brackets"));
        }
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix_len: u8 = match prefix {
            None => max,
            Some(digits) => digits
                .parse()
                .ok()
                .filter(|len| *len <= max)
                .ok_or_else(|| bad("the prefix length is out of range"))?,
        };
        let port_range = match port {
            "*" => String::new(),
            digits => {
                let port: u16 = digits
                    .parse()
                    .ok()
                    .filter(|port| *port > 0)
                    .ok_or_else(|| bad("the port is not 1 to 65535 or *"))?;
                // Envoy's range is inclusive at both ends here (measured on 1.40).
                format!(", upstream_port_range: {{start: {port}, end: {port}}}")
            }
        };
        out.push_str(&format!(
            "{{matcher: {{name: allowed-private-upstream, typed_config: {{\"@type\": \
             type.googleapis.com/envoy.extensions.rbac.matchers.upstream_ip_port.v3.UpstreamIpPortMatcher, \
             upstream_ip: {{address_prefix: \"{ip}\", prefix_len: {prefix_len}}}{port_range}}}}}}}, "
        ));
    }
    Ok(out)
}

/// The first placeholder in `text`: (the text before it, its name, the text after it).
fn next_placeholder(text: &str) -> Option<(&str, &str, &str)> {
    let mut from = 0;
    while let Some(found) = text[from..].find("${") {
        let start = from + found;
        let name_start = start + 2;
        let name_len = text[name_start..]
            .bytes()
            .take_while(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || *b == b'_')
            .count();
        let name_end = name_start + name_len;
        if name_len > 0 && text[name_end..].starts_with('}') {
            return Some((
                &text[..start],
                &text[name_start..name_end],
                &text[name_end + 1..],
            ));
        }
        // Not a placeholder: look again from the next character, as a regex would.
        from = start + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn every_placeholder_is_replaced_by_its_value() {
        let rendered = render(
            "listen ${ADDR}:${PORT_1}, admin ${PORT_1}\n",
            values(&[("ADDR", "127.0.0.1"), ("PORT_1", "10000")]),
        );
        assert_eq!(rendered.unwrap(), "listen 127.0.0.1:10000, admin 10000\n");
    }

    #[test]
    fn a_template_with_placeholders_that_have_no_value_is_refused_naming_each_once() {
        let err = render("${B} ${A} ${B} ${C}", values(&[("C", "c")])).unwrap_err();
        assert_eq!(err, Missing(vec!["A".into(), "B".into()]));
        assert_eq!(err.to_string(), "missing template variables: A, B");
    }

    #[test]
    fn values_for_names_the_template_does_not_use_are_ignored() {
        let rendered = render("plain text", values(&[("UNUSED", "x")]));
        assert_eq!(rendered.unwrap(), "plain text");
    }

    #[test]
    fn only_uppercase_digit_and_underscore_names_are_placeholders() {
        let text = "${lower} ${} ${A-B} $A ${ A} ${A}";
        assert_eq!(placeholders(text), BTreeSet::from(["A"]));
        assert_eq!(
            render(text, values(&[("A", "v")])).unwrap(),
            "${lower} ${} ${A-B} $A ${ A} v"
        );
    }

    #[test]
    fn a_placeholder_right_after_an_unfinished_one_is_still_found() {
        assert_eq!(
            render("$${A} ${${A}}", values(&[("A", "v")])).unwrap(),
            "$v ${v}"
        );
    }

    #[test]
    fn a_value_containing_a_placeholder_is_not_expanded_again() {
        let rendered = render("${A} ${B}", values(&[("A", "${B}"), ("B", "b")]));
        assert_eq!(rendered.unwrap(), "${B} b");
    }

    #[test]
    fn allowed_upstreams_become_one_rbac_permission_each() {
        assert_eq!(allowed_upstreams::<&str>(&[]).unwrap(), "");
        let one = allowed_upstreams(&["127.0.0.1/32:18080"]).unwrap();
        assert!(one.ends_with("}}}, "), "{one}");
        assert!(
            one.contains("upstream_ip: {address_prefix: \"127.0.0.1\", prefix_len: 32}"),
            "{one}"
        );
        assert!(
            one.contains("upstream_port_range: {start: 18080, end: 18080}"),
            "{one}"
        );
        let any_port = allowed_upstreams(&["10.0.0.0/8:*"]).unwrap();
        assert!(!any_port.contains("upstream_port_range"), "{any_port}");
        let v6 = allowed_upstreams(&["[fd00::/8]:443", "192.168.1.5:80"]).unwrap();
        assert!(v6.contains("\"fd00::\", prefix_len: 8"), "{v6}");
        assert!(v6.contains("\"192.168.1.5\", prefix_len: 32"), "{v6}");
        assert_eq!(v6.matches("{matcher:").count(), 2);
    }

    #[test]
    fn malformed_allowed_upstreams_are_refused_naming_the_entry() {
        for entry in [
            "127.0.0.1",
            "127.0.0.1/33:80",
            "127.0.0.1:0",
            "127.0.0.1:65536",
            "localhost:80",
            "fd00::1:80",
            "[fd00::/129]:80",
            "[fd00::1:80",
        ] {
            let error = allowed_upstreams(&[entry]).unwrap_err();
            assert!(error.contains(entry), "{error}");
        }
    }

    #[test]
    fn multibyte_text_around_placeholders_is_kept() {
        let rendered = render("é ${A} → ${B}ü", values(&[("A", "α"), ("B", "β")]));
        assert_eq!(rendered.unwrap(), "é α → βü");
    }
}
