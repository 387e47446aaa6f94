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

mod admission;
mod api;
pub mod auth;
pub mod console;
pub mod employees;
mod error;
pub mod openapi;
mod release;
pub mod replies;
mod responses;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::sync::Semaphore;
use tracing::Instrument as _;

use coupon_domain::sold_out::FastPath;
use coupon_domain::{Category, CouponCode, OrderId, RequestedCode, UserId};
use coupon_platform::kafka::Publisher;
use coupon_platform::redis::Cache;
use coupon_platform::store;
use coupon_platform::time::from_ms;
use coupon_platform::Topics;
use coupon_schemas::{
    ClaimDecided, ClaimOutcome, ClaimRequested, PurchaseDecided, PurchaseOutcome, PurchaseRequested,
};

pub use api::*;
pub use auth::Secret;
pub use employees::{AdminCaller, Credential, EmployeeAuth};
pub use error::{ApiError, ErrorBody, ErrorCode};
pub use replies::Replies;

use admission::Audience;
use auth::{AddressLimiter, Caller, ClientAddr};

/// Largest batch one HTTP call may release (the CLI goes higher).
pub const MAX_HTTP_ISSUE: u32 = 100_000;

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// When set, storefront routes require `Authorization: Bearer <token>`.
    /// Without it they are open, which [`GatewayConfig::check_exposure`]
    /// allows on a loopback address only (or when
    /// `insecure_open_storefront` says so).
    pub api_token: Option<Secret>,
    /// The shared operator token (legacy, development): admits to the admin
    /// routes as [`AdminCaller::SharedToken`], whose releases name their
    /// employee in the body.
    pub admin_token: Option<Secret>,
    /// The per-employee credentials (a token file, OIDC). With neither
    /// these nor `admin_token`, the admin routes are closed.
    pub employees: EmployeeAuth,
    /// Serve open storefront routes (no `api_token`) on a non-loopback
    /// address anyway.
    pub insecure_open_storefront: bool,
    /// How long a claim or purchase may take, from the handler's start:
    /// publishing the event and waiting for its decision.
    pub reply_timeout: Duration,
    /// Deadline of a whole request (body read included); never shorter
    /// than `reply_timeout` (see [`GatewayConfig::request_deadline`]).
    pub request_timeout: Duration,
    /// A client must send a request's headers within this; it also closes
    /// idle keep-alive connections.
    pub header_read_timeout: Duration,
    /// A client must send a request's body within this once its headers
    /// are in (`408` past it); the body is read before the request takes
    /// one of the `max_in_flight` slots.
    pub body_read_timeout: Duration,
    /// Requests handled at once; beyond, `503` with `Retry-After`.
    pub max_in_flight: usize,
    /// Requests waiting for a decision at once; beyond, `503`.
    pub max_waiting: usize,
    /// Open connections; beyond, new ones are closed at once.
    pub max_connections: usize,
    /// Requests per second per client address when the storefront routes
    /// are open (no `api_token`); beyond, `429`.
    pub address_limit_per_sec: u64,
    /// Count loopback clients against `address_limit_per_sec` too. Off by
    /// default: a local load test or a proxy on the same host is not what
    /// the limit is for (the open storefront serves loopback only unless
    /// told otherwise, so off, the limit bites only with
    /// `insecure_open_storefront`).
    pub address_limit_loopback: bool,
    /// Claims per second per user beyond which the user is blocked (with
    /// `api_token` only: open routes never block the users they name).
    pub flood_limit_per_sec: u64,
    pub flood_block: Duration,
    pub datacenter_id: u16,
}

impl Default for GatewayConfig {
    /// The defaults of `coupon_platform::settings`.
    fn default() -> Self {
        use coupon_platform::settings;
        Self {
            api_token: None,
            admin_token: None,
            employees: EmployeeAuth::default(),
            insecure_open_storefront: false,
            reply_timeout: settings::REPLY_TIMEOUT,
            request_timeout: settings::REQUEST_TIMEOUT,
            header_read_timeout: settings::HEADER_READ_TIMEOUT,
            body_read_timeout: settings::BODY_READ_TIMEOUT,
            max_in_flight: settings::MAX_IN_FLIGHT as usize,
            max_waiting: settings::MAX_WAITING_REPLIES as usize,
            max_connections: settings::MAX_CONNECTIONS as usize,
            address_limit_per_sec: settings::ADDRESS_LIMIT,
            address_limit_loopback: false,
            flood_limit_per_sec: settings::FLOOD_LIMIT,
            flood_block: settings::FLOOD_BLOCK,
            datacenter_id: 0,
        }
    }
}

/// Serving open storefront routes on an address others can reach.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "refusing to serve the storefront routes without COUPON_API_TOKEN on {0}, which is not a \
     loopback address: set COUPON_API_TOKEN (or COUPON_API_TOKEN_FILE), bind HTTP_ADDR to \
     127.0.0.1, or pass --insecure-open-storefront"
)]
pub struct Exposed(pub SocketAddr);

impl GatewayConfig {
    /// Open storefront routes (no `api_token`) only on a loopback address,
    /// unless `insecure_open_storefront` is set.
    pub fn check_exposure(&self, addr: SocketAddr) -> Result<(), Exposed> {
        if self.api_token.is_some() || self.insecure_open_storefront || addr.ip().is_loopback() {
            Ok(())
        } else {
            Err(Exposed(addr))
        }
    }

    /// Whether any admin credential is configured.
    pub fn admin_routes_open(&self) -> bool {
        self.admin_token.is_some() || !self.employees.is_empty()
    }

    /// The deadline of a whole request: `request_timeout`, but never
    /// shorter than the reply wait plus a second to answer.
    pub fn request_deadline(&self) -> Duration {
        self.request_timeout
            .max(self.reply_timeout + Duration::from_secs(1))
    }
}

pub struct GatewayState {
    pub pool: PgPool,
    /// What the read-only routes read (coupon status, the console's
    /// analytics): replicas when DATABASE_READ_URL is set, else `pool`.
    pub read_pool: PgPool,
    pub cache: Cache,
    pub publisher: Publisher,
    pub topics: Topics,
    pub replies: Arc<Replies>,
    pub config: GatewayConfig,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    in_flight: Arc<Semaphore>,
    addresses: AddressLimiter,
    /// The users blacklisted now, as read from Postgres at most
    /// [`BLACKLIST_REFRESH`] ago; `None` until read (or while Postgres does
    /// not answer), when no claim takes the sold-out fast path.
    blacklisted: std::sync::RwLock<Option<Arc<std::collections::HashSet<String>>>>,
    /// What `GET /api/v1/analytics/export` reads the log with (none: that
    /// route answers `503`); the binary provides it ([`GatewayState::with_exporter`]).
    exporter: Option<Arc<dyn console::Exporter>>,
    /// This gateway's downloads: how many run, what they produced.
    pub exports: Arc<console::ExportStats>,
}

/// How often a gateway rereads the blacklist for the sold-out fast path: a
/// user blacklisted within this long may still be told `sold_out` (never
/// given a coupon) instead of `403`.
pub const BLACKLIST_REFRESH: Duration = Duration::from_secs(1);

impl GatewayState {
    /// `replies` should be [`Replies::bounded`] by `config.max_waiting`.
    pub fn new(
        pool: PgPool,
        cache: Cache,
        publisher: Publisher,
        topics: Topics,
        replies: Arc<Replies>,
        config: GatewayConfig,
        metrics: metrics_exporter_prometheus::PrometheusHandle,
    ) -> Self {
        Self {
            in_flight: Arc::new(Semaphore::new(config.max_in_flight.max(1))),
            addresses: AddressLimiter::new(config.address_limit_per_sec),
            blacklisted: std::sync::RwLock::new(None),
            exporter: None,
            exports: Arc::default(),
            read_pool: pool.clone(),
            pool,
            cache,
            publisher,
            topics,
            replies,
            config,
            metrics,
        }
    }

    /// Reads the read-only routes from `pool` (replicas).
    pub fn with_read_pool(mut self, pool: PgPool) -> Self {
        self.read_pool = pool;
        self
    }

    /// Lets the console download ranges of the log with `exporter`.
    pub fn with_exporter(mut self, exporter: Arc<dyn console::Exporter>) -> Self {
        self.exporter = Some(exporter);
        self
    }

    /// Whether `user` may be blacklisted: true when on the list last read,
    /// and when no list could be read.
    fn maybe_blacklisted(&self, user: &str) -> bool {
        match self.blacklisted.read() {
            Ok(list) => list.as_ref().is_none_or(|users| users.contains(user)),
            Err(_) => true,
        }
    }

    /// Rereads the blacklist every [`BLACKLIST_REFRESH`] while the gateway
    /// runs (until the state is dropped).
    async fn refresh_blacklist(state: std::sync::Weak<GatewayState>) {
        let mut tick = tokio::time::interval(BLACKLIST_REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(state) = state.upgrade() else { return };
            let read = store::users::blacklisted_now(&state.pool).await;
            let list = match read {
                Ok(users) => Some(Arc::new(
                    users.into_iter().map(UserId::into_string).collect(),
                )),
                Err(error) => {
                    tracing::debug!(%error, "cannot read the blacklist; no sold-out fast path");
                    None
                }
            };
            let stored = match state.blacklisted.write() {
                Ok(mut slot) => {
                    *slot = list;
                    true
                }
                Err(_) => false,
            };
            if !stored {
                return;
            }
        }
    }

    /// Requests being handled now.
    pub fn in_flight(&self) -> usize {
        self.config
            .max_in_flight
            .max(1)
            .saturating_sub(self.in_flight.available_permits())
    }
}

/// The HTTP methods the gateway routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verb {
    Get,
    Post,
    Delete,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "GET",
            Verb::Post => "POST",
            Verb::Delete => "DELETE",
        }
    }

    fn method(self) -> axum::http::Method {
        match self {
            Verb::Get => axum::http::Method::GET,
            Verb::Post => axum::http::Method::POST,
            Verb::Delete => axum::http::Method::DELETE,
        }
    }

    fn filter(self) -> MethodFilter {
        match self {
            Verb::Get => MethodFilter::GET,
            Verb::Post => MethodFilter::POST,
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
        route(Verb::Get, "/api/v1/coupon", Storefront, claim),
        route(Verb::Post, "/api/v1/coupon", Admin, release::create_coupons),
        route(
            Verb::Get,
            "/api/v1/coupon/{code}",
            Storefront,
            coupon_status,
        ),
        route(Verb::Post, "/api/v1/purchase", Storefront, purchase),
        route(Verb::Get, "/api/v1/openapi.json", Public, openapi_json),
        route(Verb::Get, "/healthz", Public, healthz),
        route(Verb::Get, "/metrics", Public, metrics_text),
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

/// Serves until `shutdown` resolves, then finishes in-flight requests.
///
/// Each connection must send a request's headers within
/// `header_read_timeout` (which also ends idle keep-alive connections);
/// beyond `max_connections` open connections, new ones are closed at once.
/// The peer's address goes on every request ([`ClientAddr`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<GatewayState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::Service as _;

    tokio::spawn(GatewayState::refresh_blacklist(Arc::downgrade(&state)));
    let connections = Arc::new(Semaphore::new(state.config.max_connections.max(1)));
    let drain = state.config.request_deadline() + Duration::from_secs(1);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(state.config.header_read_timeout);
    let app = router(state);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: let some close.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            metrics::counter!("coupon_http_connections_refused_total").increment(1);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<_>| {
            request.extensions_mut().insert(auth::Peer(peer));
            app.clone().call(request)
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    // In-flight requests end by their deadline; idle connections at once.
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after {drain:?}; closing them");
    }
    Ok(())
}

/// The `method` label: one of a fixed set, so no request can add a series.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// The `status` label: the status if it is one the gateway sends, else its
/// class (`4xx`, `5xx`).
fn status_label(status: StatusCode) -> &'static str {
    const SENT: [&str; 17] = [
        "200", "202", "400", "401", "403", "404", "405", "408", "409", "413", "414", "415", "422",
        "429", "500", "503", "504",
    ];
    let code = status.as_str();
    SENT.into_iter()
        .find(|sent| *sent == code)
        .unwrap_or(match status.as_u16() / 100 {
            1 => "1xx",
            2 => "2xx",
            3 => "3xx",
            4 => "4xx",
            _ => "5xx",
        })
}

async fn observe(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let started = Instant::now();
    let method = method_label(request.method());
    // Matched paths come from the route table: a closed set.
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let response = next.run(request).await;
    let status = status_label(response.status());
    metrics::counter!("coupon_http_requests_total", "method" => method, "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("coupon_http_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

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

/// Flood control: more than `flood_limit_per_sec` claims in one second from
/// one user blocks that user for `flood_block` (Redis for the fast check,
/// Postgres so the claim processor refuses too, and the blacklist topic so a
/// rebuilt database does). Redis trouble disables the check rather than the
/// API.
async fn flood_check(state: &GatewayState, user: &UserId) -> Result<(), ApiError> {
    let blocked = match state.cache.is_blocked(user.as_str()).await {
        Ok(blocked) => blocked,
        Err(error) => {
            tracing::debug!(%error, "flood check skipped");
            return Ok(());
        }
    };
    if blocked {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Blacklisted,
            "this user is temporarily blocked for flooding",
        ));
    }
    let Ok(count) = state.cache.count_request(user.as_str()).await else {
        return Ok(());
    };
    if count > state.config.flood_limit_per_sec {
        let block = state.config.flood_block;
        let _ = state.cache.block(user.as_str(), block).await;
        let until = Utc::now() + coupon_domain::clock::span(block);
        let blacklist = crate::blacklist::Blacklist {
            pool: &state.pool,
            publisher: &state.publisher,
            topics: &state.topics,
        };
        if let Err(error) = blacklist
            .add(
                user,
                Some(until),
                "flooding the gateway",
                crate::blacklist::Source::Automatic,
            )
            .await
        {
            tracing::warn!(%error, "could not record automatic blacklisting");
        }
        metrics::counter!("coupon_flood_blocks_total").increment(1);
        tracing::warn!(user = %user, count, "user blocked for flooding");
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Blacklisted,
            "too many requests: this user is temporarily blocked",
        ));
    }
    Ok(())
}

/// Claim a coupon.
///
/// Publishes a claim event and waits for its decision. A repeated claim while
/// the user's hold lasts returns the same coupon; after the hold ended
/// (bought or expired) the user waits for the next quota window.
#[utoipa::path(
    get,
    path = "/api/v1/coupon",
    tag = "storefront",
    params(
        ClaimQuery,
        ("x-request-id" = Option<String>, Header,
            description = "Your id for this request (1-64 visible ASCII characters); generated when absent. Echoed in the answer's x-request-id header; retrying with the same id returns the same decision.")
    ),
    responses(
        (status = 200, description = "Granted: the coupon is held for this user until `expires_at`.",
            body = ClaimGranted,
            headers(("x-request-id" = String, description = "The request id"))),
        (status = 400, description = "Invalid user id or category.",
            body = ErrorBody, example = json!({"error": "invalid_request", "message": "user_id must not be empty"})),
        responses::ApiUnauthorized,
        (status = 403, description = "The user is blacklisted (manually, or for flooding the gateway).",
            body = ErrorBody, example = json!({"error": "blacklisted", "message": "this user may not claim coupons"})),
        (status = 404, description = "No coupon (of the category) is available.",
            body = ErrorBody, example = json!({"error": "sold_out", "message": "no coupon is available right now"})),
        (status = 409, description = "The x-request-id was already used for another user's claim: nothing was decided for this one; send a new request id.",
            body = ErrorBody, example = json!({"error": "request_id_conflict", "message": "this x-request-id was already used for another user; send a new one"})),
        (status = 429, description = "`rate_limited`: the user already had a coupon in this quota window (`Retry-After`: seconds until the next window). `address_limited`: on a gateway without COUPON_API_TOKEN, too many requests from one non-loopback client address.",
            headers(("Retry-After" = u64, description = "Seconds until the next quota window, or until the address may send again")),
            body = ErrorBody,
            examples(
                ("rate_limited" = (summary = "the quota: one coupon per user per window", value = json!({"error": "rate_limited", "message": "one coupon per user per quota window; try again after 2026-11-26T00:00:00.000Z"}))),
                ("address_limited" = (summary = "too many requests from this address", value = json!({"error": "address_limited", "message": "too many requests from this address; slow down"})))
            )),
        (status = 503, description = "The claim could not be published, or the gateway is at its limit of requests in flight or waiting; retrying is safe.",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying")),
            body = ErrorBody, example = json!({"error": "unavailable", "message": "could not publish the claim"})),
        (status = 504, description = "No decision within REPLY_TIMEOUT (publishing included); the claim may still complete and retrying (same x-request-id) is safe.",
            body = ErrorBody, example = json!({"error": "timeout", "message": "no decision in time; the request may still complete and retrying is safe"})),
    ),
    security((), ("api_token" = []))
)]
async fn claim(
    State(state): State<Arc<GatewayState>>,
    client: ClientAddr,
    caller: Caller,
    headers: HeaderMap,
    query: Result<Query<ClaimQuery>, QueryRejection>,
) -> Response {
    let chosen = client_request_id(&headers);
    let ours = chosen.is_none();
    let request_id = chosen.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    traced(
        "claim",
        &request_id,
        claim_inner(&state, client, caller, query, &request_id, ours),
    )
    .await
}

async fn claim_inner(
    state: &GatewayState,
    client: ClientAddr,
    caller: Caller,
    query: Result<Query<ClaimQuery>, QueryRejection>,
    request_id: &str,
    id_is_ours: bool,
) -> Result<Response, ApiError> {
    let deadline = tokio::time::Instant::now() + state.config.reply_timeout;
    let caller = storefront_caller(state, caller, client)?;
    let Query(query) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let user = UserId::parse(query.id.unwrap_or_default())
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    let category = match query.category.as_deref() {
        None | Some("") => None,
        Some(raw) => Some(Category::parse(raw).map_err(|e| ApiError::invalid(e.to_string()))?),
    };
    tracing::debug!(user = %user, category = category.as_ref().map_or("", |c| c.as_str()), "claim received");
    if caller != Caller::Open {
        // Only an authenticated storefront vouches for the user ids it
        // sends: without a token, anyone could name a victim's id and get
        // the victim blocked.
        flood_check(state, &user).await?;
    }
    // One request id, one answer on every path: an id the client chose may
    // be in flight on the broker path already (a retry, a second tab, a
    // copy with another category or user), so only an id generated here,
    // which no other request can carry, is answered from the cache.
    let fast = if id_is_ours {
        sold_out_fast_path(state, &user, category.as_ref()).await
    } else {
        FastPath::Ask
    };
    let event = ClaimRequested {
        envelope: Some(state.publisher.envelope::<ClaimRequested>(request_id)),
        request_id: request_id.to_owned(),
        user_id: user.to_string(),
        category: category.map(Category::into_string).unwrap_or_default(),
        answered_sold_out: fast == FastPath::SoldOut,
    };
    if fast == FastPath::SoldOut {
        return answer_sold_out(state, &user, &event, deadline).await;
    }
    let pending = state
        .replies
        .expect_claim(request_id, user.as_str())
        .map_err(waiting_full)?;
    let decision = publish_and_wait(
        state,
        &state.topics.claims(),
        &user,
        &event,
        pending,
        deadline,
        "claim",
    )
    .await?;
    if decision.user_id != user.as_str() {
        // The client's request id was used before, by another user: the
        // stored decision is that user's and must not be shown to this one.
        return Err(request_id_conflict());
    }
    Ok(claim_response(&decision))
}

/// Whether this claim may be answered `sold_out` by the gateway itself
/// (`coupon_domain::sold_out`): its pool is marked sold out as of the
/// current supply, and the user neither holds a coupon, nor is blocked or
/// blacklisted, nor has used the quota. One Redis round trip and a look at
/// the blacklist read every second; when either is unknown, the claim takes
/// the normal path.
async fn sold_out_fast_path(
    state: &GatewayState,
    user: &UserId,
    category: Option<&Category>,
) -> FastPath {
    if state.maybe_blacklisted(user.as_str()) {
        return FastPath::Ask;
    }
    match state
        .cache
        .fast_path_facts(user.as_str(), category.map(Category::as_str))
        .await
    {
        Ok(facts) => coupon_domain::sold_out::fast_path(&facts),
        Err(error) => {
            tracing::debug!(%error, "sold-out marks unreadable; asking the claim processor");
            FastPath::Ask
        }
    }
}

/// The sold-out fast path: the claim goes on the log flagged
/// `answered_sold_out` (the claim processor records `sold_out` for it and
/// never allocates it a coupon) and is answered `404` once the broker has
/// the record, without waiting for the decision. Every answer is on the
/// log: a broker outage or a `kill -9` of the gateway can cost the answer
/// (`503`/`504`, and retrying is safe), never leave an answered claim
/// without its record. The wait is one produce round trip, not the
/// processor's batch.
async fn answer_sold_out(
    state: &GatewayState,
    user: &UserId,
    event: &ClaimRequested,
    deadline: tokio::time::Instant,
) -> Result<Response, ApiError> {
    let topic = state.topics.claims();
    let delivery = state
        .publisher
        .enqueue_event(&topic, user.as_str(), event)
        .await
        .map_err(|error| {
            tracing::warn!(%error, "could not publish the sold-out claim");
            ApiError::unavailable("could not publish the claim; retrying is safe")
        })?;
    match tokio::time::timeout_at(deadline, delivery).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => {
            metrics::counter!("coupon_claims_sold_out_fast_lost_total").increment(1);
            tracing::warn!(%error, "a sold-out claim was not delivered to the log; not answered");
            return Err(ApiError::unavailable(
                "could not publish the claim; retrying is safe",
            ));
        }
        Err(_) => {
            tracing::warn!("the broker did not acknowledge the sold-out claim in time");
            return Err(ApiError::timeout());
        }
    }
    metrics::counter!("coupon_claims_sold_out_fast_total").increment(1);
    Ok(ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::SoldOut,
        "no coupon is available right now",
    )
    .into_response())
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

fn claim_response(decision: &ClaimDecided) -> Response {
    let outcome = ClaimOutcome::try_from(decision.outcome).unwrap_or(ClaimOutcome::Unspecified);
    match outcome {
        ClaimOutcome::Granted => (
            StatusCode::OK,
            Json(ClaimGranted {
                coupon_code: decision.coupon_code.clone(),
                category: decision.category.clone(),
                user_id: decision.user_id.clone(),
                expires_at: rfc3339(decision.expires_at_ms),
            }),
        )
            .into_response(),
        ClaimOutcome::RateLimited => {
            let now = Utc::now().timestamp_millis();
            let secs = ((decision.retry_at_ms - now).max(1) as u64).div_ceil(1000);
            let mut error = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::RateLimited,
                format!(
                    "one coupon per user per quota window; try again after {}",
                    rfc3339(decision.retry_at_ms).unwrap_or_default()
                ),
            );
            error.retry_after_secs = Some(secs);
            error.into_response()
        }
        ClaimOutcome::Blacklisted => ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Blacklisted,
            "this user may not claim coupons",
        )
        .into_response(),
        ClaimOutcome::SoldOut => ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::SoldOut,
            "no coupon is available right now",
        )
        .into_response(),
        ClaimOutcome::Conflict => request_id_conflict().into_response(),
        ClaimOutcome::Invalid | ClaimOutcome::Unspecified => {
            ApiError::invalid(decision.reason.clone()).into_response()
        }
    }
}

/// Buy a held coupon.
///
/// Redeems the coupon if this user holds it and the hold has not ended.
/// Idempotent on `order_id`: the same order again gets the same answer.
#[utoipa::path(
    post,
    path = "/api/v1/purchase",
    tag = "storefront",
    params(
        ("x-request-id" = Option<String>, Header,
            description = "Your id for this request; generated when absent, echoed in the answer's x-request-id header.")
    ),
    request_body = PurchaseBody,
    responses(
        (status = 200, description = "Redeemed.", body = PurchaseRedeemed),
        (status = 400, description = "Invalid ids.",
            body = ErrorBody, example = json!({"error": "invalid_request", "message": "order_id must not be empty"})),
        responses::ApiUnauthorized,
        (status = 404, description = "No coupon has this code.",
            body = ErrorBody, example = json!({"error": "unknown_coupon", "message": "no coupon has this code"})),
        (status = 409, description = "The coupon cannot be bought by this user now.", body = ErrorBody,
            examples(
                ("hold_expired" = (summary = "the hold ended before the purchase", value = json!({"error": "hold_expired", "message": "the hold on this coupon ended before the purchase"}))),
                ("not_holder" = (summary = "another user holds it, or nobody", value = json!({"error": "not_holder", "message": "this coupon is not held by this user"}))),
                ("already_redeemed" = (summary = "bought before", value = json!({"error": "already_redeemed", "message": "this coupon was already redeemed"}))),
                ("order_id_conflict" = (summary = "the order_id is another user's order", value = json!({"error": "order_id_conflict", "message": "this order_id was already used by another user"})))
            )),
        responses::BodyRefused,
        (status = 429, description = "On a gateway without COUPON_API_TOKEN: too many requests from this address.",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying")),
            body = ErrorBody, example = json!({"error": "address_limited", "message": "too many requests from this address; slow down"})),
        (status = 503, description = "The purchase could not be published, or the gateway is at its limit of requests in flight or waiting; retrying is safe.",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying")),
            body = ErrorBody, example = json!({"error": "unavailable", "message": "could not publish the purchase"})),
        (status = 504, description = "No decision within REPLY_TIMEOUT (publishing included); retrying (same order_id) is safe.",
            body = ErrorBody, example = json!({"error": "timeout", "message": "no decision in time; the request may still complete and retrying is safe"})),
    ),
    security((), ("api_token" = []))
)]
async fn purchase(
    State(state): State<Arc<GatewayState>>,
    client: ClientAddr,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Json<PurchaseBody>, JsonRejection>,
) -> Response {
    let request_id = request_id(&headers);
    traced(
        "purchase",
        &request_id,
        purchase_inner(&state, client, caller, body, &request_id),
    )
    .await
}

async fn purchase_inner(
    state: &GatewayState,
    client: ClientAddr,
    caller: Caller,
    body: Result<Json<PurchaseBody>, JsonRejection>,
    request_id: &str,
) -> Result<Response, ApiError> {
    let deadline = tokio::time::Instant::now() + state.config.reply_timeout;
    storefront_caller(state, caller, client)?;
    let Json(body) = body.map_err(json_rejection)?;
    let user = UserId::parse(body.user_id).map_err(|e| ApiError::invalid(e.to_string()))?;
    let order = OrderId::parse(body.order_id).map_err(|e| ApiError::invalid(e.to_string()))?;
    let coupon_code =
        RequestedCode::parse(body.coupon_code).map_err(|e| ApiError::invalid(e.to_string()))?;
    tracing::debug!(user = %user, order = %order, coupon = %coupon_code.as_str(), "purchase received");
    let event = PurchaseRequested {
        envelope: Some(state.publisher.envelope::<PurchaseRequested>(request_id)),
        request_id: request_id.to_owned(),
        user_id: user.to_string(),
        coupon_code: coupon_code.into_string(),
        order_id: order.to_string(),
    };
    let pending = state
        .replies
        .expect_purchase(request_id, user.as_str(), order.as_str())
        .map_err(waiting_full)?;
    let decision = publish_and_wait(
        state,
        &state.topics.purchases(),
        &user,
        &event,
        pending,
        deadline,
        "purchase",
    )
    .await?;
    if decision.user_id != user.as_str() {
        // Purchases are idempotent on order_id: the stored answer for this
        // order is another user's and must not be shown to this one.
        return Err(order_id_conflict());
    }
    Ok(purchase_response(&decision))
}

fn purchase_response(decision: &PurchaseDecided) -> Response {
    let outcome =
        PurchaseOutcome::try_from(decision.outcome).unwrap_or(PurchaseOutcome::Unspecified);
    let conflict =
        |code, message| ApiError::new(StatusCode::CONFLICT, code, message).into_response();
    match outcome {
        PurchaseOutcome::Redeemed => (
            StatusCode::OK,
            Json(PurchaseRedeemed {
                status: Redeemed::Redeemed,
                coupon_code: decision.coupon_code.clone(),
                order_id: decision.order_id.clone(),
                redeemed_at: rfc3339(decision.redeemed_at_ms),
            }),
        )
            .into_response(),
        PurchaseOutcome::HoldExpired => conflict(
            ErrorCode::HoldExpired,
            "the hold on this coupon ended before the purchase",
        ),
        PurchaseOutcome::NotHolder => {
            conflict(ErrorCode::NotHolder, "this coupon is not held by this user")
        }
        PurchaseOutcome::AlreadyRedeemed => conflict(
            ErrorCode::AlreadyRedeemed,
            "this coupon was already redeemed",
        ),
        PurchaseOutcome::UnknownCoupon => ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::UnknownCoupon,
            "no coupon has this code",
        )
        .into_response(),
        PurchaseOutcome::Conflict => order_id_conflict().into_response(),
        PurchaseOutcome::Invalid | PurchaseOutcome::Unspecified => {
            ApiError::invalid(decision.reason.clone()).into_response()
        }
    }
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

/// Look up one coupon.
#[utoipa::path(
    get,
    path = "/api/v1/coupon/{code}",
    tag = "storefront",
    params(
        ("code" = String, Path, description = "The coupon code (Crockford base32; lower case, I/L for 1, O for 0 and hyphens are forgiven)", example = "0AN35HST00000")
    ),
    responses(
        (status = 200, description = "The coupon as Postgres has it. `holder` is shown to admin callers (COUPON_ADMIN_TOKEN) only, `null` to everyone else.", body = CouponStatus),
        (status = 400, description = "Not a coupon code.",
            body = ErrorBody, example = json!({"error": "invalid_request", "message": "not a coupon code"})),
        responses::ApiUnauthorized,
        (status = 404, description = "No coupon has this code.",
            body = ErrorBody, example = json!({"error": "unknown_coupon", "message": "no coupon has this code"})),
        (status = 429, description = "On a gateway without COUPON_API_TOKEN: too many requests from this address.",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying")),
            body = ErrorBody, example = json!({"error": "address_limited", "message": "too many requests from this address; slow down"})),
        responses::StoreUnavailable,
    ),
    security((), ("api_token" = []), ("admin_token" = []))
)]
async fn coupon_status(
    State(state): State<Arc<GatewayState>>,
    client: ClientAddr,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let caller = storefront_caller(&state, caller, client)?;
    let Path(raw) = path.map_err(|e| ApiError::invalid(e.body_text()))?;
    let code = CouponCode::parse(&raw).map_err(|e| ApiError::invalid(e.to_string()))?;
    let row = store::coupons::find(&state.read_pool, code)
        .await
        .map_err(|error| {
            tracing::warn!(%error, "reading a coupon failed");
            ApiError::unavailable("the coupon store is not available; retrying is safe")
        })?;
    let row = row.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::UnknownCoupon,
            "no coupon has this code",
        )
    })?;
    let status = CouponState::from(row.status);
    let millis = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    Ok(Json(CouponStatus {
        coupon_code: row.code.to_string(),
        category: row.category.into_string(),
        expires_at: if matches!(status, CouponState::Held) {
            row.held_until.map(millis)
        } else {
            None
        },
        status,
        // Who holds a coupon is for operators only: codes are sequential,
        // so anyone could otherwise list who holds what.
        holder: if caller == Caller::Admin {
            row.holder_user_id.map(UserId::into_string)
        } else {
            None
        },
        redeemed_at: row.redeemed_at.map(millis),
    })
    .into_response())
}

/// Liveness and readiness.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses(
        (status = 200, description = "Serving (`degraded`: Redis is down, answers stay correct).", body = Health),
        (status = 503, description = "Postgres is not available.", body = Health),
    )
)]
async fn healthz(State(state): State<Arc<GatewayState>>) -> Response {
    let postgres = store::ping(&state.pool).await;
    let redis = state.cache.ping().await.is_ok();
    // Redis is a cache: the service still answers correctly without it.
    let (status, health) = match (postgres, redis) {
        (true, true) => (StatusCode::OK, HealthState::Ok),
        (true, false) => (StatusCode::OK, HealthState::Degraded),
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, HealthState::Unavailable),
    };
    (
        status,
        Json(Health {
            status: health,
            postgres,
            redis,
            waiting_requests: state.replies.waiting(),
        }),
    )
        .into_response()
}

/// Prometheus metrics of this process.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (status = 200, description = "Prometheus text format (version 0.0.4).", body = String, content_type = "text/plain"),
    )
)]
async fn metrics_text(State(state): State<Arc<GatewayState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

/// This document.
#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    tag = "operations",
    responses(
        (status = 200, description = "The OpenAPI description of this API.", body = Object, content_type = "application/json"),
    )
)]
async fn openapi_json() -> Response {
    static DOCUMENT: LazyLock<serde_json::Value> = LazyLock::new(openapi::document_json);
    Json(&*DOCUMENT).into_response()
}

/// `GET /metrics` alone, for a process that runs consumers without the
/// gateway (`couponctl consume ... --metrics-addr`); not part of the API.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = Router::new().route(
        "/metrics",
        axum::routing::get(move || async move {
            (
                [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                metrics.render(),
            )
        }),
    );
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// The address a listener is bound to, for logs and tests.
pub fn local_addr(listener: &tokio::net::TcpListener) -> std::io::Result<SocketAddr> {
    listener.local_addr()
}
