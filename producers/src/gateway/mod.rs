//! The HTTP gateway: the seed's API on top of the event pipeline.
//!
//! A claim or purchase becomes an event keyed by user id; the handler then
//! waits (bounded by `reply_timeout`) for the decision on the results topic
//! and answers with it. A timeout is `504`: the request may still be decided,
//! and because a repeated claim returns the same hold and purchases are
//! idempotent on `order_id`, retrying is safe.
//!
//! The gateway holds no coupon state, so any number of instances can run side
//! by side behind a load balancer.
//!
//! Sold out is answered at the speed of a cache read: when the claim's pool is
//! marked sold out in Redis as of the current supply version and the user
//! neither holds a coupon nor is blocked (`coupon_domain::sold_out`), the claim
//! is answered `404` at once and published flagged `answered_sold_out`, which
//! the claim processor honours. The marks are read per claim rather than kept
//! as a local copy: the user's hold must be read per claim anyway (a holder
//! gets the coupon back, never `sold_out`), so a copy would save no round trip
//! and would only add staleness and disagreement between instances.
//!
//! Every route is in one table ([`routes`]): the router is built from it and
//! the OpenAPI document ([`openapi`], served at `/api/v1/openapi.json`) is
//! checked against it by the integration tests. The request id (the client's
//! `x-request-id` or a generated one) is the `request_id` field of the
//! handler's log span, the events' correlation id and the consumers'
//! `request_id` log field, so one `grep` follows a request end to end.
//!
//! One file per concern: `config` (limits, credentials, the exposure check),
//! `state` (what handlers share), `routes` (the table, the router and the
//! handlers), `server` (connections, shutdown, the request metrics),
//! `admission` (who may call what, before a body is read), `flood`,
//! `routes/` (one file per storefront, admin or operational route: `claim`,
//! `purchase`, `release`, `status`, `health`), `console/` (the web console
//! and its admin routes); this file keeps what those handlers share (request
//! ids, tracing, publish-and-wait, errors).

mod admission;
mod api;
pub mod auth;
mod config;
pub mod console;
pub mod employees;
mod error;
mod flood;
pub mod openapi;
pub mod replies;
mod responses;
mod routes;
mod server;
mod state;

use std::future::Future;

use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use tracing::Instrument as _;

use coupon_domain::UserId;
use coupon_platform::time::from_ms;

pub use api::*;
pub use auth::Secret;
pub use config::{Exposed, GatewayConfig, MAX_HTTP_ISSUE};
pub use employees::{AdminCaller, Credential, EmployeeAuth};
pub use error::{ApiError, ErrorBody, ErrorCode};
pub use replies::Replies;
pub use routes::{router, routes, Route, Verb};
pub use server::{local_addr, serve, serve_metrics};
pub use state::{GatewayState, BLACKLIST_REFRESH};

use auth::{Caller, ClientAddr};

/// Who may call a storefront route, as admission found it from the token:
/// with COUPON_API_TOKEN set, its bearer (or an admin's); without, anyone
/// ([`Caller::Open`]), limited here per client address.
fn storefront_caller(
    state: &GatewayState,
    caller: Caller,
    client: ClientAddr,
) -> Result<Caller, ApiError> {
    if caller == Caller::Open {
        let second = Utc::now().timestamp();
        // Loopback callers are this machine's own (a local load test, a
        // proxy on the host): the limit is for the addresses of others.
        let local =
            !state.config.address_limit_loopback && client.0.is_some_and(|ip| ip.is_loopback());
        if !local && !state.addresses.allow(client.0, second) {
            metrics::counter!("coupon_http_shed_total", "reason" => "address").increment(1);
            let mut error = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::AddressLimited,
                "too many requests from this address; slow down",
            );
            error.retry_after_secs = Some(1);
            return Err(error);
        }
    }
    Ok(caller)
}

/// The request id: the client's `x-request-id` when it sent a usable one,
/// else one generated here.
fn request_id(headers: &HeaderMap) -> String {
    client_request_id(headers).unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// The client's own `x-request-id` (1-64 visible ASCII characters), if any.
fn client_request_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 64 && v.chars().all(|c| c.is_ascii_graphic()))
        .map(str::to_owned)
}

fn rfc3339(ms: i64) -> Option<String> {
    from_ms(ms).map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

/// Runs a claim or purchase handler inside a span carrying its request id,
/// logs the answer, and echoes the id in the `x-request-id` header of every
/// answer (errors too), so a client can quote it.
async fn traced(
    what: &'static str,
    request_id: &str,
    handler: impl Future<Output = Result<Response, ApiError>>,
) -> Response {
    let span = tracing::info_span!("http", request_id = %request_id, route = what);
    async move {
        let mut response = handler.await.unwrap_or_else(IntoResponse::into_response);
        if let Ok(value) = HeaderValue::from_str(request_id) {
            response.headers_mut().insert("x-request-id", value);
        }
        tracing::info!(status = response.status().as_u16(), "{what} answered");
        response
    }
    .instrument(span)
    .await
}

fn waiting_full(full: replies::Full) -> ApiError {
    metrics::counter!("coupon_http_shed_total", "reason" => "waiting").increment(1);
    ApiError::overloaded(full.to_string())
}

/// Request/reply over Kafka: publishes `event` keyed by the user, then waits
/// for its decision. `pending` is registered before publishing, so a fast
/// decision cannot arrive unseen. Publishing and waiting share one
/// `deadline` (a broker that does not acknowledge cannot hold the request
/// longer): past it, `504`. A failed publish is `503`.
async fn publish_and_wait<E: coupon_schemas::Event, R>(
    state: &GatewayState,
    topic: &str,
    user: &UserId,
    event: &E,
    pending: replies::Pending<'_, R>,
    deadline: tokio::time::Instant,
    what: &str,
) -> Result<R, ApiError> {
    match tokio::time::timeout_at(deadline, state.publisher.send(topic, user.as_str(), event)).await
    {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => {
            tracing::warn!(%error, "could not publish the {what}");
            return Err(ApiError::unavailable(format!(
                "could not publish the {what}; retrying is safe"
            )));
        }
        Err(_) => {
            tracing::warn!("the broker did not acknowledge the {what} in time");
            return Err(ApiError::timeout());
        }
    }
    pending
        .wait_until(deadline)
        .await
        .ok_or_else(ApiError::timeout)
}

/// A request id that is another user's request: decided for that user,
/// never shown to this one.
fn request_id_conflict() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        ErrorCode::RequestIdConflict,
        "this x-request-id was already used for another user; send a new one",
    )
}

/// An order id that is another user's order.
fn order_id_conflict() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        ErrorCode::OrderIdConflict,
        "this order_id was already used by another user",
    )
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    let status = rejection.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::new(
            status,
            ErrorCode::PayloadTooLarge,
            "request body is larger than 64 KiB",
        );
    }
    if status == StatusCode::UNSUPPORTED_MEDIA_TYPE {
        return ApiError::new(
            status,
            ErrorCode::UnsupportedMediaType,
            "send 'Content-Type: application/json'",
        );
    }
    ApiError::invalid(rejection.body_text())
}
