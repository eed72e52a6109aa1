//! The browser UI: server-rendered pages for the humans who approve proposals and
//! look after a vault (DESIGN.md §9).
//!
//! Every page is rendered on the server with `maud`, which HTML-escapes everything it
//! interpolates; the only client-side asset is one stylesheet, and there is no
//! JavaScript at all, so the Content-Security-Policy can forbid scripts outright.
//!
//! | page group | module |
//! |---|---|
//! | security headers, CSRF tokens, cookies, form bodies, the `next` check | [`security`] |
//! | the page shell, error pages, formatting helpers | [`layout`] |
//! | login and logout | [`auth`] |
//! | the vault list and a vault's proposals, services, credentials, agents, log | [`vaults`] |
//! | a proposal's review: the approval link page and the vault's proposal page | [`approve`] |
//!
//! The UI talks to the same [`Store`](crate::store::Store) functions as the JSON API,
//! with the same [`Principal`](crate::access::Principal), so the UI can never do more
//! than the API would let the same user do. The session is the `av_session` cookie
//! (HttpOnly, SameSite=Strict); agent tokens are never accepted as a UI session.

mod approve;
mod auth;
mod layout;
mod security;
mod vaults;

#[cfg(test)]
mod tests;

use axum::routing::{get, post};
use axum::Router;

use crate::http::AppState;

/// The UI's routes, merged beside the API's by [`crate::server::app`]; every response carries the
/// security headers of [`security::add_headers`].
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/ui/static/style.css", get(layout::stylesheet))
        .route("/ui/login", get(auth::login_page).post(auth::login))
        .route("/ui/logout", post(auth::logout))
        .route("/ui", get(vaults::vault_list))
        .route("/ui/", get(vaults::vault_list))
        .route("/ui/vaults/{vault}", get(vaults::proposals))
        .route(
            "/ui/vaults/{vault}/proposals/{id}",
            get(approve::vault_proposal),
        )
        .route(
            "/ui/vaults/{vault}/proposals/{id}/{decision}",
            post(approve::vault_decision),
        )
        .route("/ui/vaults/{vault}/services", get(vaults::services))
        .route("/ui/vaults/{vault}/credentials", get(vaults::credentials))
        .route(
            "/ui/vaults/{vault}/credentials/reveal",
            post(vaults::reveal_credentials),
        )
        .route("/ui/vaults/{vault}/agents", get(vaults::agents))
        .route("/ui/vaults/{vault}/logs", get(vaults::request_log))
        .route("/approve/{id}", get(approve::link_page))
        .route("/approve/{id}/{decision}", post(approve::link_decision))
        .route(
            "/ui/{*rest}",
            get(layout::not_found).post(layout::not_found),
        )
        .layer(axum::middleware::map_response(security::add_headers))
}
