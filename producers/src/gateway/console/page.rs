//! `GET /console` and its script: the page, embedded in the binary, served
//! with a policy that lets it load nothing but this origin.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};

const PAGE: &str = include_str!("index.html");
const SCRIPT: &str = include_str!("console.js");

/// Nothing but this origin: the page loads its script from here and talks
/// to this API only.
const CSP: &str = "default-src 'none'; script-src 'self'; connect-src 'self'; \
    style-src 'unsafe-inline'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

fn static_answer(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CSP),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        body,
    )
        .into_response()
}

/// The web console (employees, analysts, operators).
///
/// The page asks for the admin token (COUPON_ADMIN_TOKEN) and calls the
/// routes tagged `console` with it; loading the page itself needs no token.
#[utoipa::path(
    get,
    path = "/console",
    tag = "console",
    responses(
        (status = 200, description = "The console's HTML page.", body = String, content_type = "text/html"),
    )
)]
pub(crate) async fn console_page() -> Response {
    static_answer("text/html; charset=utf-8", PAGE)
}

/// The console's script (loaded by `/console`).
#[utoipa::path(
    get,
    path = "/console/console.js",
    tag = "console",
    responses(
        (status = 200, description = "JavaScript.", body = String, content_type = "text/javascript"),
    )
)]
pub(crate) async fn console_script() -> Response {
    static_answer("text/javascript; charset=utf-8", SCRIPT)
}
