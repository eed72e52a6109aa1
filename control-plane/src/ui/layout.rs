//! The page shell every UI page shares, error pages, the stylesheet and small
//! formatting helpers.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use maud::{html, Markup, DOCTYPE};

use super::security::{Session, CSRF_FIELD};
use crate::error::Error;

const STYLESHEET: &str = include_str!("static/style.css");

pub async fn stylesheet() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        STYLESHEET,
    )
        .into_response()
}

/// A whole page: the header (with the user and a logout button when logged in) and
/// `body`.
pub fn page(title: &str, session: Option<&Session>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="referrer" content="no-referrer";
                title { (title) " · Agent Vault" }
                link rel="stylesheet" href="/ui/static/style.css";
            }
            body {
                header.top {
                    a.brand href="/ui" { "Agent Vault" }
                    @if let Some(session) = session {
                        div.who {
                            span.email { (session.email) }
                            form.inline method="post" action="/ui/logout" {
                                input type="hidden" name=(CSRF_FIELD) value=(session.csrf());
                                button.link type="submit" { "Log out" }
                            }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

/// An HTML response with `status`.
pub fn respond(status: StatusCode, markup: Markup) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        markup.into_string(),
    )
        .into_response()
}

pub fn error_page(
    status: StatusCode,
    title: &str,
    message: &str,
    session: Option<&Session>,
) -> Response {
    let body = html! {
        section.card.error-page {
            h1 { (title) }
            p { (message) }
            p { a href="/ui" { "Back to your vaults" } }
        }
    };
    respond(status, page(title, session, body))
}

/// Any other `/ui/…` path: an HTML 404 with the security headers (not the API's JSON).
pub async fn not_found() -> Response {
    error_page(
        StatusCode::NOT_FOUND,
        "Not found",
        "There is no such page.",
        None,
    )
}

/// The page for a store error (the same status the API would answer).
pub fn store_error_page(error: Error, session: Option<&Session>) -> Response {
    let title = match error.status() {
        StatusCode::NOT_FOUND => "Not found",
        StatusCode::FORBIDDEN => "Not allowed",
        StatusCode::CONFLICT => "Conflict",
        StatusCode::TOO_MANY_REQUESTS => "Too many requests",
        StatusCode::UNAUTHORIZED => "Not logged in",
        s if s.is_client_error() => "Request refused",
        _ => "Something went wrong",
    };
    let message = match &error {
        Error::Internal(detail) => {
            tracing::error!(%detail, "internal error in the UI");
            "internal error; see the server log".to_string()
        }
        other => other.to_string(),
    };
    error_page(error.status(), title, &message, session)
}
