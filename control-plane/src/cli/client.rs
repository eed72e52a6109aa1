//! The HTTP client of the control-plane API (`control-plane/API.md`).
//!
//! Every answer is JSON or empty; every failure becomes one line a human can act on:
//! the server's `message` for API errors, a hint to start the server when nothing
//! listens. The client never goes through `HTTP_PROXY`: an agent's environment points
//! that at Envoy, and the management API must be reached directly.
//!
//! Over https it trusts the system's roots plus, when given (`--ca-file`,
//! `AGENT_VAULT_CA_FILE`), the CA of a server whose certificate they do not cover.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use reqwest::blocking::{Client as HttpClient, RequestBuilder};
use reqwest::Method;
use serde_json::Value;

/// A failure answered by the server: `{"error": code, "message": text}` and its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    /// The stable error code (`vault_not_found`, `unauthorized`, …).
    pub code: String,
    pub message: String,
    /// What to do about it, when the CLI knows better than the server (a stale login).
    pub hint: Option<String>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, " ({hint})")?;
        }
        Ok(())
    }
}

impl std::error::Error for ApiError {}

impl ApiError {
    /// The `ApiError` in `err`'s chain, if the failure came from the server.
    pub fn find(err: &anyhow::Error) -> Option<&ApiError> {
        err.chain()
            .find_map(|cause| cause.downcast_ref::<ApiError>())
    }

    fn from_response(status: u16, body: &str) -> Self {
        let parsed: Option<Value> = serde_json::from_str(body).ok();
        let field = |name: &str| {
            parsed
                .as_ref()
                .and_then(|v| v.get(name))
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        let code = field("error").unwrap_or_else(|| format!("http_{status}"));
        let message = field("message")
            .or_else(|| field("error"))
            .unwrap_or_else(|| format!("the server answered HTTP {status}"));
        Self {
            status,
            code,
            message,
            hint: None,
        }
    }
}

/// Longest a single API call may take; `master-key rotate` re-encrypts every value.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A client bound to one server and (optionally) one bearer token.
pub struct Client {
    http: HttpClient,
    address: String,
    token: Option<String>,
    vault_header: Option<String>,
    /// Appended to a 401 `unauthorized` answer, e.g. how to log in again.
    unauthorized_hint: Option<String>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("address", &self.address)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("vault_header", &self.vault_header)
            .finish()
    }
}

impl Client {
    /// `address` is a normalized base URL (`http(s)://host:port`, no trailing slash);
    /// `ca_file` a PEM file of more certificates to trust for https.
    pub fn new(
        address: &str,
        token: Option<String>,
        ca_file: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let mut builder = HttpClient::builder()
            .no_proxy()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .https_only(address.starts_with("https://"))
            .user_agent(concat!("agent-vault-cli/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = ca_file {
            let pem = std::fs::read(path)
                .with_context(|| format!("cannot read the CA file {}", path.display()))?;
            let certificates = reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("{} holds no PEM certificate", path.display()))?;
            anyhow::ensure!(
                !certificates.is_empty(),
                "{} holds no PEM certificate",
                path.display()
            );
            for certificate in certificates {
                builder = builder.add_root_certificate(certificate);
            }
        }
        let http = builder.build().context("cannot set up the HTTP client")?;
        Ok(Self {
            http,
            address: address.to_owned(),
            token,
            vault_header: None,
            unauthorized_hint: None,
        })
    }

    /// Sends `X-Vault: vault` with every request (agent-facing routes such as `/discover`).
    pub fn with_vault_header(mut self, vault: Option<String>) -> Self {
        self.vault_header = vault;
        self
    }

    pub fn with_unauthorized_hint(mut self, hint: Option<String>) -> Self {
        self.unauthorized_hint = hint;
        self
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.send(Method::GET, path, None)
    }

    pub fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.send(Method::POST, path, Some(body))
    }

    pub fn put(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.send(Method::PUT, path, Some(body))
    }

    pub fn patch(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.send(Method::PATCH, path, Some(body))
    }

    pub fn delete(&self, path: &str) -> anyhow::Result<Value> {
        self.send(Method::DELETE, path, None)
    }

    /// Sends one request; an empty success body (`204`) is `Value::Null`.
    pub fn send(&self, method: Method, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let text = self.send_text(method, path, body)?;
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).map_err(|_| {
            anyhow!(
                "{} answered {path} with something that is not JSON: is it an agent-vault server?",
                self.address
            )
        })
    }

    /// `GET path`, answered with text rather than JSON (`/v1/ca`'s PEM).
    pub fn get_text(&self, path: &str) -> anyhow::Result<String> {
        self.send_text(Method::GET, path, None)
    }

    /// Sends one request and returns the body of a success as it came.
    fn send_text(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<String> {
        let url = format!("{}{}", self.address, path);
        let mut request: RequestBuilder = self.http.request(method, &url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(vault) = &self.vault_header {
            request = request.header("X-Vault", vault);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().map_err(|err| self.transport_error(err))?;
        let status = response.status();
        let text = response.text().map_err(|err| self.transport_error(err))?;
        if !status.is_success() {
            let mut error = ApiError::from_response(status.as_u16(), &text);
            // Only a rejected token is fixed by logging in again; a wrong password
            // (`invalid_credentials`, also 401) is not.
            if status.as_u16() == 401 && error.code == "unauthorized" {
                error.hint.clone_from(&self.unauthorized_hint);
            }
            return Err(error.into());
        }
        Ok(text)
    }

    fn transport_error(&self, err: reqwest::Error) -> anyhow::Error {
        if err.is_connect() {
            anyhow!(
                "cannot reach the agent-vault server at {}: is it running? (agent-vault server)",
                self.address
            )
        } else if err.is_timeout() {
            anyhow!(
                "the agent-vault server at {} did not answer in time",
                self.address
            )
        } else {
            // reqwest's message names the URL; its causes say what went wrong.
            anyhow::Error::new(err.without_url())
                .context(format!("request to {} failed", self.address))
        }
    }
}

/// Builds an API path from segments, percent-encoding each one (emails contain `@`,
/// and a name must never be able to add a path segment).
pub fn api_path(segments: &[&str]) -> String {
    let mut path = String::new();
    for segment in segments {
        path.push('/');
        path.push_str(&encode_segment(segment));
    }
    path
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub fn encode_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(encode_segment("bob@example.com"), "bob%40example.com");
        assert_eq!(encode_segment("my-vault_1.x~"), "my-vault_1.x~");
        assert_eq!(encode_segment("a/b c"), "a%2Fb%20c");
        assert_eq!(encode_segment(".."), "..");
        assert_eq!(encode_segment("é"), "%C3%A9");
        assert_eq!(
            api_path(&["v1", "vaults", "v", "users", "a+b@x.io"]),
            "/v1/vaults/v/users/a%2Bb%40x.io"
        );
    }

    #[test]
    fn api_errors_use_the_server_message() {
        let err = ApiError::from_response(
            404,
            r#"{"error":"vault_not_found","message":"vault my-vault not found"}"#,
        );
        assert_eq!(err.code, "vault_not_found");
        assert_eq!(err.to_string(), "vault my-vault not found");
    }

    #[test]
    fn api_errors_without_a_json_body_name_the_status() {
        let err = ApiError::from_response(502, "<html>bad gateway</html>");
        assert_eq!(err.code, "http_502");
        assert_eq!(err.to_string(), "the server answered HTTP 502");
    }

    #[test]
    fn unauthorized_hint_is_appended() {
        let mut err = ApiError::from_response(
            401,
            r#"{"error":"unauthorized","message":"session expired"}"#,
        );
        err.hint = Some("run agent-vault auth login --email a@b.c".into());
        assert_eq!(
            err.to_string(),
            "session expired (run agent-vault auth login --email a@b.c)"
        );
    }

    #[test]
    fn connection_refused_says_to_start_the_server() {
        // Port 1 on loopback: nothing listens there in a test environment.
        let client = Client::new("http://127.0.0.1:1", None, None).unwrap();
        let err = client.get("/health").unwrap_err();
        assert_eq!(
            crate::cli::one_line(&err),
            "cannot reach the agent-vault server at http://127.0.0.1:1: is it running? (agent-vault server)"
        );
    }
}
