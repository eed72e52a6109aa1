//! The identity an HTTPS agent proved on its `CONNECT`, carried inside Envoy to the
//! requests it then sends through the tunnel (DESIGN.md §3, §11 invariant 13).
//!
//! Envoy decrypts an HTTPS agent's tunnel in an internal listener, where a second
//! instance of this filter ([`crate::config::Mode::Tunnel`]) sees the requests. Those
//! requests carry no proxy credential (clients send it on the `CONNECT` only), and any
//! header in them is the agent's to choose, so the identity must come from Envoy:
//!
//! 1. The filter on the agents' listener authenticates the `CONNECT` as it would any
//!    request, and sets [`TUNNEL_HEADER`] on it to a [`TunnelIdentity`]: the agent's
//!    token hash, the vault it chose, and the `CONNECT`'s host and port. An agent
//!    cannot send that header itself: the bootstrap removes it from every request
//!    before any filter runs, as it does the routing header.
//! 2. Envoy's `set_filter_state` filter turns the header into the filter-state object
//!    [`TUNNEL_STATE`], shared with the upstream connection (`shared_with_upstream`),
//!    which is the internal listener's: the object crosses into the tunnel's
//!    connection, where no request inside the tunnel can reach or replace it.
//! 3. The filter inside the tunnel reads it (`get_property`) for every request and
//!    re-checks the agent against the snapshot in use, so a revoke or a rotated token
//!    ends an open tunnel's access within one poll; and it refuses a request whose
//!    `:authority` or TLS SNI is another host than the `CONNECT`'s.
//!
//! The value is not secret (a SHA-256 of the token, as in the snapshot), and it never
//! leaves Envoy: a terminated `CONNECT` sends no headers upstream.

use agent_vault_rules::normalize_authority;
use agent_vault_rules::reply::TLS_PORT;

/// The request header, on a `CONNECT` the filter lets through, that carries the
/// tunnel's [`TunnelIdentity`] to Envoy's `set_filter_state` filter. Removed from what
/// agents send before any filter runs (`envoy/forward-proxy.yaml`).
pub const TUNNEL_HEADER: &str = "x-agent-vault-tunnel";

/// The filter-state object that holds the [`TunnelIdentity`] on the tunnel's
/// connection (read as the property `filter_state.<this>`).
pub const TUNNEL_STATE: &str = "agent_vault.tunnel";

/// Marks the format of [`TunnelIdentity::encode`], so that a change of format is
/// refused rather than misread.
const FORMAT: &str = "v1";

/// Who opened a tunnel, and to where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelIdentity {
    /// Lowercase hex SHA-256 of the agent token proven on the `CONNECT`.
    pub token_sha256: String,
    /// The vault the `CONNECT` was authorised in.
    pub vault: String,
    /// The `CONNECT`'s host, normalised (lowercase, no trailing dot).
    pub host: String,
    /// The `CONNECT`'s port.
    pub port: u16,
}

impl TunnelIdentity {
    /// `v1 <token_sha256> <vault> <host> <port>`: none of the parts can hold a space
    /// (hex, a vault name, a normalised host, digits).
    pub fn encode(&self) -> String {
        format!(
            "{FORMAT} {} {} {} {}",
            self.token_sha256, self.vault, self.host, self.port
        )
    }

    /// Reads [`TunnelIdentity::encode`]'s output; `None` for anything else, which the
    /// filter refuses (fail closed).
    pub fn parse(text: &str) -> Option<TunnelIdentity> {
        let mut parts = text.split(' ');
        let (Some(FORMAT), Some(hash), Some(vault), Some(host), Some(port), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return None;
        };
        let hex = hash.len() == 64
            && hash
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hex || vault.is_empty() {
            return None;
        }
        let port: u16 = port.parse().ok().filter(|p| *p > 0)?;
        // The host must be one the filter itself would have produced.
        let (normal, _) = normalize_authority(host, TLS_PORT)?;
        if normal != host {
            return None;
        }
        Some(TunnelIdentity {
            token_sha256: hash.to_owned(),
            vault: vault.to_owned(),
            host: host.to_owned(),
            port,
        })
    }

    /// `host:port`, for messages.
    pub fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Whether a TLS SNI names `host` (a normalised host): case and one trailing dot do
/// not matter. No SNI never does.
pub fn sni_names(sni: Option<&str>, host: &str) -> bool {
    sni.is_some_and(|sni| {
        let sni = sni.strip_suffix('.').unwrap_or(sni);
        sni.eq_ignore_ascii_case(host)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> TunnelIdentity {
        TunnelIdentity {
            token_sha256: "ab".repeat(32),
            vault: "default".into(),
            host: "api.example.com".into(),
            port: 443,
        }
    }

    #[test]
    fn an_identity_reads_back_as_written() {
        let written = identity().encode();
        assert_eq!(
            written,
            format!("v1 {} default api.example.com 443", "ab".repeat(32))
        );
        assert_eq!(TunnelIdentity::parse(&written), Some(identity()));
        let v6 = TunnelIdentity {
            host: "[::1]".into(),
            port: 8443,
            ..identity()
        };
        assert_eq!(TunnelIdentity::parse(&v6.encode()), Some(v6));
    }

    #[test]
    fn anything_but_a_well_formed_identity_is_refused() {
        let hash = "ab".repeat(32);
        #[rustfmt::skip]
        let cases: Vec<(&str, String)> = vec![
            ("empty", String::new()),
            ("Envoy's placeholder for a missing value", "-".into()),
            ("another format", format!("v2 {hash} default api.example.com 443")),
            ("a part missing", format!("v1 {hash} default api.example.com")),
            ("a part too many", format!("v1 {hash} default api.example.com 443 x")),
            ("a short hash", format!("v1 {} default api.example.com 443", "ab".repeat(31))),
            ("an uppercase hash", format!("v1 {} default api.example.com 443", "AB".repeat(32))),
            ("a token instead of its hash", "v1 av_agt_secret default api.example.com 443".into()),
            ("no vault", format!("v1 {hash}  api.example.com 443")),
            ("port 0", format!("v1 {hash} default api.example.com 0")),
            ("a port too large", format!("v1 {hash} default api.example.com 65536")),
            ("an uppercase host", format!("v1 {hash} default API.example.com 443")),
            ("a host with a port", format!("v1 {hash} default api.example.com:443 443")),
            ("a host with a path", format!("v1 {hash} default api.example.com/x 443")),
            ("two spaces", format!("v1  {hash} default api.example.com 443")),
        ];
        for (behaviour, text) in cases {
            assert_eq!(TunnelIdentity::parse(&text), None, "{behaviour}");
        }
    }

    #[test]
    fn the_sni_must_name_the_tunnels_host() {
        assert!(sni_names(Some("api.example.com"), "api.example.com"));
        assert!(sni_names(Some("API.Example.com."), "api.example.com"));
        assert!(!sni_names(Some("evil.example.com"), "api.example.com"));
        assert!(!sni_names(Some("api.example.com.evil"), "api.example.com"));
        assert!(!sni_names(Some(""), "api.example.com"));
        assert!(!sni_names(None, "api.example.com"));
    }
}
