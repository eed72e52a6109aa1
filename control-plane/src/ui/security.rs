//! What keeps the UI safe to open in a browser that also visits other sites:
//! security headers on every response, the session cookie, CSRF tokens, form bodies
//! and the `next` check that prevents open redirects.
//!
//! Sessions: the cookie holds a UI session token (`av_ui_…`), which the JSON API
//! never accepts, so a cookie that reaches another server on the same host (browsers
//! send a host's cookies to all its ports) is no bearer token. Such a server can
//! still show pages as the human, so every action that reveals a value or decides a
//! proposal asks for the password again ([`confirm_password`]). Served over https
//! (the public URL says so), the cookies are `__Host-` and `Secure`: a browser then
//! sends them only to this origin over TLS, never to a plain-HTTP port.
//!
//! CSRF: every state-changing form carries a token. With a session it is derived from
//! the session token (`hex(sha256("csrf" + token))`), so it needs no storage and dies
//! with the session; before a session exists (the login forms) it is a double-submit
//! cookie `av_csrf` (SameSite=Strict, HttpOnly) whose value the form repeats. Tokens
//! are compared in constant time. The SameSite=Strict cookies are a second wall: a
//! cross-site POST carries neither the session nor the CSRF cookie.

use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Redirect, Response};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::layout;
use crate::access::Principal;
use crate::crypto::sha256_hex;
use crate::http::{blocking, AppState};

/// No scripts, no frames, forms only to this origin, styles only from our file.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";
/// The session cookie over plain HTTP.
pub const SESSION_COOKIE: &str = "av_session";
/// The session cookie over https: bound to this origin, sent only over TLS.
pub const SECURE_SESSION_COOKIE: &str = "__Host-av_session";
/// The double-submit cookie of the forms shown before a session exists.
pub const CSRF_COOKIE: &str = "av_csrf";
/// [`CSRF_COOKIE`] over https.
pub const SECURE_CSRF_COOKIE: &str = "__Host-av_csrf";
/// The form field that carries the password an action is confirmed with.
pub const CONFIRM_FIELD: &str = "confirm_password";
/// The hidden form field every state-changing form carries.
pub const CSRF_FIELD: &str = "csrf";
/// Largest form body the UI reads (ten slots of 64 KiB values fit).
const MAX_FORM_BYTES: usize = 1024 * 1024;
/// Longest `next` path accepted.
const MAX_NEXT_LEN: usize = 2048;

/// Adds the security headers to every UI response.
pub async fn add_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    let fixed = [
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        // The approval token is in the page's URL: never send it anywhere else.
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        // Pages may hold revealed values or typed secrets: never keep them.
        (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
    ];
    for (name, value) in fixed {
        headers.insert(name, value);
    }
    response
}

/// A logged-in user (agent tokens never count as a UI session).
pub struct Session {
    pub token: String,
    pub principal: Principal,
    pub email: String,
}

impl Session {
    /// The CSRF token of this session's forms.
    pub fn csrf(&self) -> String {
        csrf_for_session(&self.token)
    }
}

pub fn csrf_for_session(session_token: &str) -> String {
    sha256_hex(format!("csrf{session_token}").as_bytes())
}

/// Constant-time equality of two tokens (different lengths are simply unequal).
pub fn tokens_match(expected: &str, given: &str) -> bool {
    expected.len() == given.len() && bool::from(expected.as_bytes().ct_eq(given.as_bytes()))
}

pub use crate::http::cookie;

/// The session of the session cookie, if it is a live UI session.
pub async fn current_session(state: &AppState, headers: &HeaderMap) -> Option<Session> {
    let token = cookie(headers, cookie_names(state).0).filter(|t| !t.is_empty())?;
    let store = state.store.clone();
    let lookup = token.clone();
    match blocking(move || store.authenticate_ui(&lookup)).await {
        Ok(Some(principal @ Principal::User { .. })) => {
            let Principal::User { email, .. } = &principal else {
                return None;
            };
            let email = email.clone();
            Some(Session {
                token,
                principal,
                email,
            })
        }
        _ => None,
    }
}

/// Checks the password a form confirms its action with (the [`CONFIRM_FIELD`]) for
/// the session's user. `Err` is what to tell the human; nothing was done.
pub async fn confirm_password(
    state: &AppState,
    session: &Session,
    form: &Form,
) -> Result<(), String> {
    let password = Zeroizing::new(form.text(CONFIRM_FIELD).to_string());
    if password.is_empty() {
        return Err("Nothing was changed: confirm with your password.".to_string());
    }
    let store = state.store.clone();
    let limiter = state.limiter.clone();
    let email = session.email.clone();
    match blocking(move || store.check_password(&limiter, &email, &password)).await {
        Ok(_) => Ok(()),
        Err(
            crate::error::Error::RateLimited(message) | crate::error::Error::TooMany(_, message),
        ) => Err(message),
        Err(crate::error::Error::Internal(detail)) => {
            tracing::error!(%detail, "checking a password failed");
            Err("Nothing was changed: internal error; see the server log.".to_string())
        }
        Err(_) => Err("Nothing was changed: that is not your password.".to_string()),
    }
}

/// The session, or a redirect to the login page that comes back to `uri`.
pub async fn require_session(
    state: &AppState,
    headers: &HeaderMap,
    uri: &Uri,
) -> Result<Session, Response> {
    match current_session(state, headers).await {
        Some(session) => Ok(session),
        None => Err(login_redirect(uri.path())),
    }
}

/// 303 to the login page with `next` set to `path` (a path of ours, never a URL).
pub fn login_redirect(path: &str) -> Response {
    let next = safe_next(path).unwrap_or("/ui");
    let encoded: String = form_urlencoded::byte_serialize(next.as_bytes()).collect();
    Redirect::to(&format!("/ui/login?next={encoded}")).into_response()
}

/// `next` if it is a path on this site the UI may return to after login, else
/// `None`. Only `/ui…` and `/approve/…` paths: no scheme, no host, no `//` or `\`
/// (which browsers treat as another host), no control characters or spaces.
pub fn safe_next(next: &str) -> Option<&str> {
    let allowed_prefix = next == "/ui" || next.starts_with("/ui/") || next.starts_with("/approve/");
    let clean = next.len() <= MAX_NEXT_LEN
        && !next.contains("//")
        && !next.contains('\\')
        && !next.chars().any(|c| c.is_control() || c.is_whitespace());
    (allowed_prefix && clean).then_some(next)
}

/// Whether the server is reached over https (as its public URL says).
pub fn is_https(state: &AppState) -> bool {
    state.public_url.starts_with("https://")
}

/// `Secure` over https.
fn secure_attr(state: &AppState) -> &'static str {
    if is_https(state) {
        "; Secure"
    } else {
        ""
    }
}

/// The (session, CSRF) cookie names: `__Host-` ones over https.
pub fn cookie_names(state: &AppState) -> (&'static str, &'static str) {
    if is_https(state) {
        (SECURE_SESSION_COOKIE, SECURE_CSRF_COOKIE)
    } else {
        (SESSION_COOKIE, CSRF_COOKIE)
    }
}

pub fn session_cookie(state: &AppState, token: &str, max_age_secs: i64) -> HeaderValue {
    let value = format!(
        "{}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{}",
        cookie_names(state).0,
        max_age_secs.max(0),
        secure_attr(state)
    );
    HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static(""))
}

pub fn clear_session_cookie(state: &AppState) -> HeaderValue {
    let value = format!(
        "{}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0{}",
        cookie_names(state).0,
        secure_attr(state)
    );
    HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The double-submit token for a login form: the request's `av_csrf` cookie when it
/// has a well-formed one, else a fresh one and the `Set-Cookie` that stores it.
pub fn login_csrf(state: &AppState, headers: &HeaderMap) -> (String, Option<HeaderValue>) {
    let name = cookie_names(state).1;
    if let Some(existing) =
        cookie(headers, name).filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return (existing, None);
    }
    let token = crate::crypto::new_token("");
    let value = format!(
        "{name}={token}; HttpOnly; SameSite=Strict; Path=/{}",
        secure_attr(state)
    );
    let header = HeaderValue::from_str(&value).ok();
    (token, header)
}

/// A URL-encoded form body. Values are wiped when the form is dropped: some are
/// secrets the human typed.
pub struct Form(Vec<(String, Zeroizing<String>)>);

impl Form {
    /// The first value of field `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// Every value of field `name` (a group of checkboxes).
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> {
        self.0
            .iter()
            .filter(move |(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// The value of `name`, or "" when absent.
    pub fn text(&self, name: &str) -> &str {
        self.get(name).unwrap_or("")
    }
}

impl<S: Send + Sync> FromRequest<S> for Form {
    type Rejection = Response;

    async fn from_request(req: Request, _state: &S) -> Result<Form, Response> {
        let bytes = axum::body::to_bytes(req.into_body(), MAX_FORM_BYTES)
            .await
            .map_err(|_| {
                layout::error_page(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "Form too large",
                    "The form was larger than this server accepts.",
                    None,
                )
            })?;
        let bytes = Zeroizing::new(bytes.to_vec());
        Ok(Form(
            form_urlencoded::parse(&bytes)
                .map(|(k, v)| (k.into_owned(), Zeroizing::new(v.into_owned())))
                .collect(),
        ))
    }
}

/// The 403 page for a form without a valid CSRF token.
pub fn csrf_refused() -> Response {
    layout::error_page(
        StatusCode::FORBIDDEN,
        "Form refused",
        "This form did not carry a valid security token (it may be from an old page or \
         another site). Nothing was changed. Reload the page and try again.",
        None,
    )
}

/// Whether a session form carries the session's CSRF token.
pub fn csrf_ok(session: &Session, form: &Form) -> bool {
    form.get(CSRF_FIELD)
        .is_some_and(|given| tokens_match(&session.csrf(), given))
}

/// Whether a login form's token equals its CSRF cookie.
pub fn login_csrf_ok(state: &AppState, headers: &HeaderMap, form: &Form) -> bool {
    match (cookie(headers, cookie_names(state).1), form.get(CSRF_FIELD)) {
        (Some(cookie), Some(given)) => cookie.len() == 64 && tokens_match(&cookie, given),
        _ => false,
    }
}
