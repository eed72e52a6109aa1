//! The agent's proxy credential, from `Proxy-Authorization`.
//!
//! `HTTP_PROXY=http://<token>:<vault>@proxy` makes clients send
//! `Basic base64(<token>:<vault>)` (the vault part may be empty); agents can also send
//! `Bearer <token>` and name the vault with an `X-Vault` header. The token is never
//! copied, logged or echoed: the caller hashes it and forgets it. The filter and the
//! control plane's `ext_authz` check both parse with [`parse`].

use base64::Engine as _;

/// Longest `Proxy-Authorization` value accepted (an agent token is 71 characters).
pub const MAX_HEADER_LEN: usize = 4096;

/// Decoded Basic credentials fit in this buffer: base64 of [`MAX_HEADER_LEN`] bytes.
pub const DECODE_BUFFER_LEN: usize = MAX_HEADER_LEN / 4 * 3;

/// A parsed proxy credential, borrowing from the header or the decode buffer.
#[derive(PartialEq, Eq)]
pub struct ProxyCredential<'a> {
    /// The agent token (never printed: see the `Debug` impl).
    pub token: &'a str,
    /// The vault named in the credential, if any.
    pub vault: Option<&'a str>,
}

impl std::fmt::Debug for ProxyCredential<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyCredential")
            .field("token", &"<redacted>")
            .field("vault", &self.vault)
            .finish()
    }
}

/// Why a `Proxy-Authorization` header was refused. Messages describe the shape, never
/// the content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyAuthError {
    /// No `Proxy-Authorization` header.
    Missing,
    /// Over [`MAX_HEADER_LEN`] bytes.
    TooLong,
    /// Not `Basic ...` or `Bearer ...`.
    UnsupportedScheme,
    /// The Basic payload is not valid base64.
    BadBase64,
    /// The decoded Basic payload is not UTF-8.
    NotUtf8,
    /// The decoded Basic payload has no `:`.
    NoColon,
    /// The token is empty or holds whitespace.
    BadToken,
}

impl ProxyAuthError {
    /// What is wrong, for the 407 message.
    pub fn reason(self) -> &'static str {
        match self {
            ProxyAuthError::Missing => "no Proxy-Authorization header",
            ProxyAuthError::TooLong => "the Proxy-Authorization header is too long",
            ProxyAuthError::UnsupportedScheme => {
                "the Proxy-Authorization scheme is neither Basic nor Bearer"
            }
            ProxyAuthError::BadBase64 => "the Basic credentials are not valid base64",
            ProxyAuthError::NotUtf8 => "the Basic credentials are not UTF-8",
            ProxyAuthError::NoColon => "the Basic credentials have no ':' after the token",
            ProxyAuthError::BadToken => "the agent token is empty or malformed",
        }
    }
}

/// Parses a `Proxy-Authorization` value. Basic payloads are decoded into `buffer`, so
/// the hot path allocates nothing.
pub fn parse<'a>(
    header: Option<&'a str>,
    buffer: &'a mut [u8; DECODE_BUFFER_LEN],
) -> Result<ProxyCredential<'a>, ProxyAuthError> {
    let header = header.ok_or(ProxyAuthError::Missing)?;
    if header.len() > MAX_HEADER_LEN {
        return Err(ProxyAuthError::TooLong);
    }
    let header = header.trim_matches([' ', '\t']);
    let (scheme, rest) = header
        .split_once([' ', '\t'])
        .ok_or(ProxyAuthError::UnsupportedScheme)?;
    let param = rest.trim_matches([' ', '\t']);
    if scheme.eq_ignore_ascii_case("basic") {
        let len = base64::engine::general_purpose::STANDARD
            .decode_slice(param, buffer)
            .map_err(|_| ProxyAuthError::BadBase64)?;
        let decoded = buffer.get(..len).ok_or(ProxyAuthError::BadBase64)?;
        let text = std::str::from_utf8(decoded).map_err(|_| ProxyAuthError::NotUtf8)?;
        let (token, vault) = text.split_once(':').ok_or(ProxyAuthError::NoColon)?;
        Ok(ProxyCredential {
            token: checked_token(token)?,
            vault: Some(vault).filter(|v| !v.is_empty()),
        })
    } else if scheme.eq_ignore_ascii_case("bearer") {
        Ok(ProxyCredential {
            token: checked_token(param)?,
            vault: None,
        })
    } else {
        Err(ProxyAuthError::UnsupportedScheme)
    }
}

/// The vault named by an `X-Vault` header (for `Bearer` credentials, which cannot
/// name one): trimmed, `None` when absent or blank.
pub fn x_vault(header: Option<&str>) -> Option<&str> {
    header
        .map(|v| v.trim_matches([' ', '\t']))
        .filter(|v| !v.is_empty())
}

fn checked_token(token: &str) -> Result<&str, ProxyAuthError> {
    if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ProxyAuthError::BadToken);
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(text: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(text)
    }

    type Parsed = Result<(String, Option<String>), ProxyAuthError>;

    fn run(header: Option<&str>) -> Parsed {
        let mut buffer = [0u8; DECODE_BUFFER_LEN];
        parse(header, &mut buffer).map(|c| (c.token.to_owned(), c.vault.map(str::to_owned)))
    }

    #[test]
    fn parsing() {
        let ok =
            |token: &str, vault: Option<&str>| Ok((token.to_owned(), vault.map(str::to_owned)));
        let token = format!("av_agt_{}", "ab".repeat(32));
        let huge_basic = format!("Basic {}", b64(&format!("{}:v", "t".repeat(3100))));
        let big_but_fine = format!("Basic {}", b64(&format!("{}:v", "t".repeat(2900))));
        let non_utf8 = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode([0xff, 0xfe, b':', b'v'])
        );
        // (behaviour, header, expected)
        type Case<'a> = (&'a str, Option<String>, Parsed);
        #[rustfmt::skip]
        let cases: Vec<Case<'_>> = vec![
            ("basic with a vault", Some(format!("Basic {}", b64(&format!("{token}:my-vault")))), ok(&token, Some("my-vault"))),
            ("basic with an empty vault", Some(format!("Basic {}", b64(&format!("{token}:")))), ok(&token, None)),
            ("basic scheme in any case", Some(format!("bAsIc {}", b64("tok:v1"))), ok("tok", Some("v1"))),
            ("basic with extra spaces", Some(format!("  Basic   {}  ", b64("tok:v1"))), ok("tok", Some("v1"))),
            ("basic vault keeps later colons", Some(format!("Basic {}", b64("tok:a:b"))), ok("tok", Some("a:b"))),
            ("bearer", Some(format!("Bearer {token}")), ok(&token, None)),
            ("bearer in lower case", Some("bearer tok".to_owned()), ok("tok", None)),
            ("missing", None, Err(ProxyAuthError::Missing)),
            ("empty", Some(String::new()), Err(ProxyAuthError::UnsupportedScheme)),
            ("scheme only", Some("Basic".to_owned()), Err(ProxyAuthError::UnsupportedScheme)),
            ("unknown scheme", Some("Digest abc".to_owned()), Err(ProxyAuthError::UnsupportedScheme)),
            ("bad base64", Some("Basic !!!notbase64".to_owned()), Err(ProxyAuthError::BadBase64)),
            ("empty basic payload", Some("Basic ".to_owned()), Err(ProxyAuthError::UnsupportedScheme)),
            ("basic without a colon", Some(format!("Basic {}", b64("tokenonly"))), Err(ProxyAuthError::NoColon)),
            ("basic not utf-8", Some(non_utf8), Err(ProxyAuthError::NotUtf8)),
            ("basic with an empty token", Some(format!("Basic {}", b64(":vault"))), Err(ProxyAuthError::BadToken)),
            ("basic token with a space", Some(format!("Basic {}", b64("a b:vault"))), Err(ProxyAuthError::BadToken)),
            ("basic token with a newline", Some(format!("Basic {}", b64("a\nb:vault"))), Err(ProxyAuthError::BadToken)),
            ("bearer with an empty token", Some("Bearer    ".to_owned()), Err(ProxyAuthError::UnsupportedScheme)),
            ("bearer with two words", Some("Bearer a b".to_owned()), Err(ProxyAuthError::BadToken)),
            ("huge header", Some(huge_basic), Err(ProxyAuthError::TooLong)),
            ("huge bearer", Some(format!("Bearer {}", "x".repeat(5000))), Err(ProxyAuthError::TooLong)),
            ("large but within the limit", Some(big_but_fine), ok(&"t".repeat(2900), Some("v"))),
        ];
        for (behaviour, header, expected) in cases {
            assert_eq!(run(header.as_deref()), expected, "{behaviour}");
        }
    }

    #[test]
    fn x_vault_is_trimmed_and_blank_is_none() {
        assert_eq!(x_vault(Some(" my-vault\t")), Some("my-vault"));
        assert_eq!(x_vault(Some("  ")), None);
        assert_eq!(x_vault(None), None);
    }

    #[test]
    fn debug_never_shows_the_token() {
        let mut buffer = [0u8; DECODE_BUFFER_LEN];
        let header = "Bearer av_agt_secret";
        let credential = parse(Some(header), &mut buffer);
        let debug = format!("{credential:?}");
        assert!(!debug.contains("av_agt_secret"), "{debug}");
        assert!(debug.contains("<redacted>"), "{debug}");
    }

    #[test]
    fn reasons_never_carry_content() {
        for error in [
            ProxyAuthError::Missing,
            ProxyAuthError::TooLong,
            ProxyAuthError::UnsupportedScheme,
            ProxyAuthError::BadBase64,
            ProxyAuthError::NotUtf8,
            ProxyAuthError::NoColon,
            ProxyAuthError::BadToken,
        ] {
            assert!(!error.reason().is_empty());
        }
    }
}
