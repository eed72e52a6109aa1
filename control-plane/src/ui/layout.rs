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

/// A unix time in seconds as `YYYY-MM-DD HH:MM UTC`.
pub fn time_secs(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rest = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rest / 3600,
        (rest % 3600) / 60
    )
}

/// A unix time in milliseconds as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn time_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rest = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        (rest % 3600) / 60,
        rest % 60
    )
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_formatted_in_utc() {
        assert_eq!(time_secs(0), "1970-01-01 00:00 UTC");
        assert_eq!(time_secs(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(time_ms(1_700_000_000_123), "2023-11-14 22:13:20 UTC");
    }
}
