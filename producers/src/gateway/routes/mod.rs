//! The route table: every route with its audience and handler. The router
//! is built from it alone, and the OpenAPI document is checked against it.
//!
//! One file per storefront, admin or operational route, each with its
//! handler, the answers it gives (its error cases) and their unit tests:
//! `claim` (`GET /api/v1/coupon`), `purchase` (`POST /api/v1/purchase`),
//! `release` (`POST /api/v1/coupon`), `profile` (`PUT /api/v1/users/{id}`),
//! `status` (`GET /api/v1/coupon/{code}`),
//! `health` (`/healthz`, `/metrics`, the OpenAPI document), `campaign_end`
//! (`DELETE /api/v1/campaigns/{id}`), `cancel`
//! (`POST /api/v1/purchase/{order_id}/cancel`). The console's
//! routes are in `console/`, by page.

pub(super) mod campaign_end;
pub(super) mod cancel;
pub(super) mod claim;
pub(super) mod health;
pub(super) mod profile;
pub(super) mod purchase;
pub(super) mod release;
pub(super) mod status;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::{MethodFilter, MethodRouter};
use axum::Router;

use crate::gateway::admission::{self, Audience};
use crate::gateway::server::observe;
use crate::gateway::{console, error, ApiError, ErrorCode, GatewayState};

/// The HTTP methods the gateway routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verb {
    Get,
    Post,
    Put,
    Delete,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "GET",
            Verb::Post => "POST",
            Verb::Put => "PUT",
            Verb::Delete => "DELETE",
        }
    }

    fn method(self) -> axum::http::Method {
        match self {
            Verb::Get => axum::http::Method::GET,
            Verb::Post => axum::http::Method::POST,
            Verb::Put => axum::http::Method::PUT,
            Verb::Delete => axum::http::Method::DELETE,
        }
    }

    fn filter(self) -> MethodFilter {
        match self {
            Verb::Get => MethodFilter::GET,
            Verb::Post => MethodFilter::POST,
            Verb::Put => MethodFilter::PUT,
            Verb::Delete => MethodFilter::DELETE,
        }
    }
}

/// One route: a method on a path (in OpenAPI/axum syntax, `{param}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Route {
    pub verb: Verb,
    pub path: &'static str,
}

type Endpoint = MethodRouter<Arc<GatewayState>>;

/// A table row: the route, who it is for, and its handler, bound to exactly
/// that method.
fn route<H, T>(verb: Verb, path: &'static str, audience: Audience, handler: H) -> Row
where
    H: axum::handler::Handler<T, Arc<GatewayState>>,
    T: 'static,
{
    (
        Route { verb, path },
        audience,
        axum::routing::on(verb.filter(), handler),
    )
}

type Row = (Route, Audience, Endpoint);

/// Every route the gateway serves. [`router`] is built from this table alone,
/// so a route cannot be served without being listed here, and the OpenAPI
/// test fails when this list and the published document differ. The
/// audience decides what a request must carry before its body is read
/// ([`admission`]).
fn route_table() -> Vec<Row> {
    use Audience::{Admin, Public, Storefront};
    vec![
        route(Verb::Get, "/api/v1/coupon", Storefront, claim::claim),
        route(Verb::Post, "/api/v1/coupon", Admin, release::create_coupons),
        route(
            Verb::Get,
            "/api/v1/coupon/{code}",
            Storefront,
            status::coupon_status,
        ),
        route(
            Verb::Post,
            "/api/v1/purchase",
            Storefront,
            purchase::purchase,
        ),
        route(
            Verb::Post,
            "/api/v1/purchase/{order_id}/cancel",
            Storefront,
            cancel::cancel_order,
        ),
        route(
            Verb::Delete,
            "/api/v1/campaigns/{id}",
            Admin,
            campaign_end::end_campaign,
        ),
        route(
            Verb::Put,
            "/api/v1/users/{id}",
            Storefront,
            profile::put_profile,
        ),
        route(
            Verb::Get,
            "/api/v1/openapi.json",
            Public,
            health::openapi_json,
        ),
        route(Verb::Get, "/healthz", Public, health::healthz),
        route(Verb::Get, "/metrics", Public, health::metrics_text),
        // The web console and the admin routes it calls.
        route(Verb::Get, "/console", Public, console::console_page),
        route(
            Verb::Get,
            "/console/console.js",
            Public,
            console::console_script,
        ),
        route(Verb::Get, "/api/v1/pool", Admin, console::pool),
        route(Verb::Get, "/api/v1/batches", Admin, console::batches),
        route(Verb::Get, "/api/v1/campaigns", Admin, console::campaigns),
        route(
            Verb::Get,
            "/api/v1/blacklist",
            Admin,
            console::blacklist_list,
        ),
        route(
            Verb::Post,
            "/api/v1/blacklist",
            Admin,
            console::blacklist_add,
        ),
        route(
            Verb::Delete,
            "/api/v1/blacklist",
            Admin,
            console::blacklist_remove,
        ),
        route(
            Verb::Get,
            "/api/v1/analytics/claims",
            Admin,
            console::analytics_claims,
        ),
        route(
            Verb::Get,
            "/api/v1/analytics/funnel",
            Admin,
            console::analytics_funnel,
        ),
        route(
            Verb::Get,
            "/api/v1/analytics/export",
            Admin,
            console::analytics_export,
        ),
    ]
}

/// The routes of [`router`], for tests and tools.
pub fn routes() -> Vec<Route> {
    route_table()
        .into_iter()
        .map(|(route, _, _)| route)
        .collect()
}

pub fn router(state: Arc<GatewayState>) -> Router {
    let mut router = Router::new();
    let mut audiences = Vec::new();
    for (route, audience, endpoint) in route_table() {
        audiences.push((route.verb.method(), route.path, audience));
        router = router.route(route.path, endpoint);
    }
    let admission = Arc::new(admission::Admission::new(state.clone(), audiences));
    router
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, "no such route")
        })
        .layer(DefaultBodyLimit::max(admission::MAX_BODY))
        .layer(axum::middleware::from_fn(error::json_errors))
        .layer(axum::middleware::from_fn_with_state(
            admission,
            admission::admit,
        ))
        .layer(axum::middleware::from_fn(observe))
        .with_state(state)
}

#[cfg(test)]
pub(super) mod tests {
    /// The JSON body of an answer.
    pub(in crate::gateway) async fn body_of(
        response: axum::response::Response,
    ) -> serde_json::Value {
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .expect("body");
        serde_json::from_slice(&bytes).expect("a JSON body")
    }
}
