//! Logging in and out of the UI.
//!
//! The login form is also embedded in the approval page (inline login); it posts to
//! the same route with a `next` path, and a successful login goes back there. `next`
//! is checked by [`safe_next`]: only paths of this site, so the login page cannot be
//! used to send someone elsewhere.

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{html, Markup};
use serde::Deserialize;

use super::layout::{page, respond};
use super::security::{
    clear_session_cookie, csrf_ok, csrf_refused, current_session, is_https, login_csrf,
    login_csrf_ok, safe_next, session_cookie, Form, CSRF_FIELD,
};
use crate::error::Error;
use crate::http::{blocking, AppState};

#[derive(Deserialize)]
pub struct LoginQuery {
    next: Option<String>,
}

/// The login form: posts to `/ui/login` and returns to `next` when it is safe.
pub fn login_form(csrf: &str, next: Option<&str>, email: &str, error: Option<&str>) -> Markup {
    html! {
        form.login method="post" action="/ui/login" {
            input type="hidden" name=(CSRF_FIELD) value=(csrf);
            @if let Some(next) = next.and_then(safe_next) {
                input type="hidden" name="next" value=(next);
            }
            @if let Some(error) = error {
                p.error role="alert" { (error) }
            }
            label for="email" { "Email" }
            input #email type="email" name="email" value=(email) autocomplete="username" required;
            label for="password" { "Password" }
            input #password type="password" name="password" autocomplete="current-password" required;
            button.primary type="submit" { "Log in" }
        }
    }
}

fn login_page_response(
    state: &AppState,
    status: StatusCode,
    csrf: &str,
    set_cookie: Option<HeaderValue>,
    next: Option<&str>,
    email: &str,
    error: Option<&str>,
) -> Response {
    let body = html! {
        section.card.narrow {
            h1 { "Log in" }
            @if !is_https(state) {
                p.notice.plain-http {
                    "This page is served over plain HTTP: your browser also sends its login \
                     cookie to other servers on this host, such as one an agent runs. Those \
                     cannot reveal a value or decide a proposal (both ask for your password \
                     again), but do not open links agents give you in this browser while \
                     logged in. The operator can serve it over https (--tls-cert)."
                }
            }
            (login_form(csrf, next, email, error))
        }
    };
    let mut response = respond(status, page("Log in", None, body));
    if let Some(cookie) = set_cookie {
        response.headers_mut().append(header::SET_COOKIE, cookie);
    }
    response
}

pub async fn login_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<LoginQuery>,
) -> Response {
    let next = query.next.as_deref().and_then(safe_next);
    if current_session(&state, &headers).await.is_some() {
        return Redirect::to(next.unwrap_or("/ui")).into_response();
    }
    let (csrf, set_cookie) = login_csrf(&state, &headers);
    login_page_response(&state, StatusCode::OK, &csrf, set_cookie, next, "", None)
}

pub async fn login(State(state): State<AppState>, headers: HeaderMap, form: Form) -> Response {
    if !login_csrf_ok(&state, &headers, &form) {
        return csrf_refused();
    }
    let email = form.text("email").to_string();
    let password = zeroize::Zeroizing::new(form.text("password").to_string());
    let next = safe_next(form.text("next")).map(str::to_string);
    let store = state.store.clone();
    let limiter = state.limiter.clone();
    let login_email = email.clone();
    let result = blocking(move || store.login_ui(&limiter, &login_email, &password)).await;
    match result {
        Ok(logged_in) => {
            let max_age = logged_in.expires_at - state.store.now_secs();
            let cookie = session_cookie(&state, &logged_in.token, max_age);
            let mut response = Redirect::to(next.as_deref().unwrap_or("/ui")).into_response();
            response.headers_mut().append(header::SET_COOKIE, cookie);
            response
        }
        Err(error) => {
            let (status, message) = match &error {
                Error::InvalidCredentials(_) | Error::Unauthorized(_) => (
                    StatusCode::UNAUTHORIZED,
                    "Invalid email or password.".to_string(),
                ),
                Error::RateLimited(message) => (StatusCode::TOO_MANY_REQUESTS, message.clone()),
                Error::Internal(detail) => {
                    tracing::error!(%detail, "login failed");
                    (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "Login failed; see the server log.".to_string(),
                    )
                }
                other => (other.status(), other.to_string()),
            };
            let (csrf, set_cookie) = login_csrf(&state, &headers);
            login_page_response(
                &state,
                status,
                &csrf,
                set_cookie,
                next.as_deref(),
                &email,
                Some(&message),
            )
        }
    }
}

pub async fn logout(State(state): State<AppState>, headers: HeaderMap, form: Form) -> Response {
    let Some(session) = current_session(&state, &headers).await else {
        return Redirect::to("/ui/login").into_response();
    };
    if !csrf_ok(&session, &form) {
        return csrf_refused();
    }
    let store = state.store.clone();
    let token = session.token.clone();
    if let Err(error) = blocking(move || store.logout(&token)).await {
        return super::layout::store_error_page(error, Some(&session));
    }
    let mut response = Redirect::to("/ui/login").into_response();
    response
        .headers_mut()
        .append(header::SET_COOKIE, clear_session_cookie(&state));
    response
}
