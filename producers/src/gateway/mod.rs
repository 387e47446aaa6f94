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

mod error;
pub mod replies;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::json;
use sqlx::PgPool;

use coupon_domain::{Category, CouponCode, EmployeeId, OrderId, UserId};
use coupon_platform::kafka::Publisher;
use coupon_platform::redis::Cache;
use coupon_platform::time::from_ms;
use coupon_platform::Topics;
use coupon_schemas::{
    ClaimDecided, ClaimOutcome, ClaimRequested, PurchaseDecided, PurchaseOutcome, PurchaseRequested,
};

pub use error::ApiError;
pub use replies::Replies;

use crate::issue::{self, IssueRequest};

/// Largest batch one HTTP call may release (the CLI goes higher).
pub const MAX_HTTP_ISSUE: u32 = 100_000;

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// When set, storefront routes require `Authorization: Bearer <token>`.
    pub api_token: Option<String>,
    /// Admin routes require it; with none set they are closed.
    pub admin_token: Option<String>,
    pub reply_timeout: Duration,
    /// Requests per second per user beyond which the user is blocked.
    pub flood_limit_per_sec: u64,
    pub flood_block: Duration,
    pub datacenter_id: u16,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            api_token: None,
            admin_token: None,
            reply_timeout: Duration::from_secs(5),
            flood_limit_per_sec: 20,
            flood_block: Duration::from_secs(600),
            datacenter_id: 0,
        }
    }
}

pub struct GatewayState {
    pub pool: PgPool,
    pub cache: Cache,
    pub publisher: Publisher,
    pub topics: Topics,
    pub replies: Arc<Replies>,
    pub config: GatewayConfig,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
}

pub fn router(state: Arc<GatewayState>) -> Router {
    Router::new()
        .route("/api/v1/coupon", get(claim).post(create_coupons))
        .route("/api/v1/coupon/{code}", get(coupon_status))
        .route("/api/v1/purchase", axum::routing::post(purchase))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .layer(DefaultBodyLimit::max(64 * 1024))
        .layer(axum::middleware::from_fn(error::json_errors))
        .layer(axum::middleware::from_fn(observe))
        .with_state(state)
}

/// Serves until `shutdown` resolves, then finishes in-flight requests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<GatewayState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn observe(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("coupon_http_requests_total", "method" => method.to_string(), "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("coupon_http_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// Compares in time independent of where the strings differ.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn check_api_token(state: &GatewayState, headers: &HeaderMap) -> Result<(), ApiError> {
    match &state.config.api_token {
        None => Ok(()),
        Some(expected) => match bearer(headers) {
            Some(given) if same_secret(given, expected) => Ok(()),
            Some(_) => Err(ApiError::unauthorized("wrong API token")),
            None => Err(ApiError::unauthorized(
                "missing 'Authorization: Bearer <COUPON_API_TOKEN>'",
            )),
        },
    }
}

fn check_admin_token(state: &GatewayState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = &state.config.admin_token else {
        return Err(ApiError::unauthorized(
            "admin routes are closed: the server has no COUPON_ADMIN_TOKEN",
        ));
    };
    match bearer(headers) {
        Some(given) if same_secret(given, expected) => Ok(()),
        Some(_) => Err(ApiError::unauthorized("wrong admin token")),
        None => Err(ApiError::unauthorized(
            "missing 'Authorization: Bearer <COUPON_ADMIN_TOKEN>'",
        )),
    }
}

fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 64 && v.chars().all(|c| c.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

fn rfc3339(ms: i64) -> Option<String> {
    from_ms(ms).map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

#[derive(Debug, Deserialize)]
struct ClaimQuery {
    id: Option<String>,
    category: Option<String>,
}

/// Flood control: more than `flood_limit_per_sec` claims in one second from
/// one user blocks that user for `flood_block` (Redis for the fast check,
/// Postgres so the claim processor refuses too). Redis trouble disables the
/// check rather than the API.
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
            "blacklisted",
            "this user is temporarily blocked for flooding",
        ));
    }
    let Ok(count) = state.cache.count_request(user.as_str()).await else {
        return Ok(());
    };
    if count > state.config.flood_limit_per_sec {
        let block = state.config.flood_block;
        let _ = state.cache.block(user.as_str(), block).await;
        let until =
            Utc::now() + chrono::Duration::from_std(block).unwrap_or(chrono::Duration::minutes(10));
        if let Err(error) = crate::blacklist::add(
            &state.pool,
            user.as_str(),
            Some(until),
            "flooding the gateway",
        )
        .await
        {
            tracing::warn!(%error, "could not record automatic blacklisting");
        }
        metrics::counter!("coupon_flood_blocks_total").increment(1);
        tracing::warn!(user = %user, count, "user blocked for flooding");
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "blacklisted",
            "too many requests: this user is temporarily blocked",
        ));
    }
    Ok(())
}

async fn claim(
    State(state): State<Arc<GatewayState>>,
    headers: HeaderMap,
    query: Result<Query<ClaimQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    check_api_token(&state, &headers)?;
    let Query(query) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let user = UserId::parse(query.id.unwrap_or_default())
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    let category = match query.category.as_deref() {
        None | Some("") => None,
        Some(raw) => Some(Category::parse(raw).map_err(|e| ApiError::invalid(e.to_string()))?),
    };
    flood_check(&state, &user).await?;
    let request_id = request_id(&headers);
    let event = ClaimRequested {
        envelope: Some(state.publisher.envelope::<ClaimRequested>(&request_id)),
        request_id: request_id.clone(),
        user_id: user.to_string(),
        category: category.map(Category::into_string).unwrap_or_default(),
    };
    let pending = state.replies.expect_claim(&request_id);
    let decision = publish_and_wait(
        &state,
        &state.topics.claims(),
        &user,
        &event,
        pending,
        "claim",
    )
    .await?;
    if decision.user_id != user.as_str() {
        // The client's request id was used before, by another user: the
        // stored decision is that user's and must not be shown to this one.
        return Err(ApiError::invalid(
            "this x-request-id was already used for another user; send a new one",
        ));
    }
    Ok(claim_response(&decision, &request_id))
}

/// Request/reply over Kafka: publishes `event` keyed by the user, then waits
/// for its decision. `pending` is registered before publishing, so a fast
/// decision cannot arrive unseen. A failed publish is `503`, no decision in
/// `reply_timeout` is `504`.
async fn publish_and_wait<E: coupon_schemas::Event, R>(
    state: &GatewayState,
    topic: &str,
    user: &UserId,
    event: &E,
    pending: replies::Pending<'_, R>,
    what: &str,
) -> Result<R, ApiError> {
    state
        .publisher
        .send(topic, user.as_str(), event)
        .await
        .map_err(|e| ApiError::unavailable(format!("could not publish the {what}: {e}")))?;
    pending
        .wait(state.config.reply_timeout)
        .await
        .ok_or_else(ApiError::timeout)
}

fn claim_response(decision: &ClaimDecided, request_id: &str) -> Response {
    let outcome = ClaimOutcome::try_from(decision.outcome).unwrap_or(ClaimOutcome::Unspecified);
    let mut response = match outcome {
        ClaimOutcome::Granted => (
            StatusCode::OK,
            Json(json!({
                "coupon_code": decision.coupon_code,
                "category": decision.category,
                "user_id": decision.user_id,
                "expires_at": rfc3339(decision.expires_at_ms),
            })),
        )
            .into_response(),
        ClaimOutcome::RateLimited => {
            let now = Utc::now().timestamp_millis();
            let secs = ((decision.retry_at_ms - now).max(1) as u64).div_ceil(1000);
            let mut error = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
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
            "blacklisted",
            "this user may not claim coupons",
        )
        .into_response(),
        ClaimOutcome::SoldOut => ApiError::new(
            StatusCode::NOT_FOUND,
            "sold_out",
            "no coupon is available right now",
        )
        .into_response(),
        ClaimOutcome::Invalid | ClaimOutcome::Unspecified => {
            ApiError::invalid(decision.reason.clone()).into_response()
        }
    };
    if let Ok(value) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

#[derive(Debug, Deserialize)]
struct PurchaseBody {
    user_id: String,
    coupon_code: String,
    order_id: String,
}

async fn purchase(
    State(state): State<Arc<GatewayState>>,
    headers: HeaderMap,
    body: Result<Json<PurchaseBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    check_api_token(&state, &headers)?;
    let Json(body) = body.map_err(json_rejection)?;
    let user = UserId::parse(body.user_id).map_err(|e| ApiError::invalid(e.to_string()))?;
    let order = OrderId::parse(body.order_id).map_err(|e| ApiError::invalid(e.to_string()))?;
    if body.coupon_code.is_empty() || body.coupon_code.len() > 64 {
        return Err(ApiError::invalid("coupon code must be 1 to 64 bytes"));
    }
    if body.coupon_code.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "coupon code must not contain control characters",
        ));
    }
    let request_id = request_id(&headers);
    let event = PurchaseRequested {
        envelope: Some(state.publisher.envelope::<PurchaseRequested>(&request_id)),
        request_id: request_id.clone(),
        user_id: user.to_string(),
        coupon_code: body.coupon_code,
        order_id: order.to_string(),
    };
    let pending = state.replies.expect_purchase(&request_id);
    let decision = publish_and_wait(
        &state,
        &state.topics.purchases(),
        &user,
        &event,
        pending,
        "purchase",
    )
    .await?;
    if decision.user_id != user.as_str() {
        // Purchases are idempotent on order_id: the stored answer for this
        // order is another user's and must not be shown to this one.
        return Err(ApiError::invalid(
            "this order_id was already used by another user",
        ));
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
            Json(json!({
                "status": "redeemed",
                "coupon_code": decision.coupon_code,
                "order_id": decision.order_id,
                "redeemed_at": rfc3339(decision.redeemed_at_ms),
            })),
        )
            .into_response(),
        PurchaseOutcome::HoldExpired => conflict(
            "hold_expired",
            "the hold on this coupon ended before the purchase",
        ),
        PurchaseOutcome::NotHolder => {
            conflict("not_holder", "this coupon is not held by this user")
        }
        PurchaseOutcome::AlreadyRedeemed => {
            conflict("already_redeemed", "this coupon was already redeemed")
        }
        PurchaseOutcome::UnknownCoupon => ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_coupon",
            "no coupon has this code",
        )
        .into_response(),
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
            "payload_too_large",
            "request body is larger than 64 KiB",
        );
    }
    if status == StatusCode::UNSUPPORTED_MEDIA_TYPE {
        return ApiError::new(
            status,
            "unsupported_media_type",
            "send 'Content-Type: application/json'",
        );
    }
    ApiError::invalid(rejection.body_text())
}

#[derive(Debug, Deserialize)]
struct CreateBody {
    id: String,
    category: String,
    count: Option<u32>,
}

async fn create_coupons(
    State(state): State<Arc<GatewayState>>,
    headers: HeaderMap,
    body: Result<Json<CreateBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    check_admin_token(&state, &headers)?;
    let Json(body) = body.map_err(json_rejection)?;
    let count = body.count.unwrap_or(1);
    if count == 0 || count > MAX_HTTP_ISSUE {
        return Err(ApiError::invalid(format!(
            "count must be between 1 and {MAX_HTTP_ISSUE} (use `couponctl issue` for more)"
        )));
    }
    let request = IssueRequest {
        employee: EmployeeId::parse(body.id).map_err(|e| ApiError::invalid(e.to_string()))?,
        category: Category::parse(body.category).map_err(|e| ApiError::invalid(e.to_string()))?,
        count,
    };
    let batch = issue::issue(
        &state.pool,
        &state.publisher,
        &state.topics,
        state.config.datacenter_id,
        &request,
        |_| {},
    )
    .await
    .map_err(|e| ApiError::unavailable(e.to_string()))?;
    let codes: Vec<String> = batch.codes.iter().map(ToString::to_string).collect();
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "batch_id": batch.batch_id,
            "employee_id": request.employee,
            "category": request.category,
            "count": codes.len(),
            "codes": codes,
        })),
    )
        .into_response())
}

#[derive(sqlx::FromRow)]
struct CouponRow {
    code: String,
    category: String,
    status: String,
    holder_user_id: Option<String>,
    held_until: Option<DateTime<Utc>>,
    redeemed_at: Option<DateTime<Utc>>,
}

async fn coupon_status(
    State(state): State<Arc<GatewayState>>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    check_api_token(&state, &headers)?;
    let Path(raw) = path.map_err(|e| ApiError::invalid(e.body_text()))?;
    let code = CouponCode::parse(&raw).map_err(|e| ApiError::invalid(e.to_string()))?;
    let row: Option<CouponRow> = sqlx::query_as(
        "SELECT code, category, status, holder_user_id, held_until, redeemed_at FROM coupons WHERE code = $1",
    )
    .bind(code.to_string())
    .fetch_optional(&state.pool)
    .await
    .map_err(|e| ApiError::unavailable(format!("database: {e}")))?;
    let row = row.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_coupon",
            "no coupon has this code",
        )
    })?;
    let millis = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    Ok(Json(json!({
        "coupon_code": row.code,
        "category": row.category,
        "status": row.status,
        "holder": row.holder_user_id,
        "expires_at": if row.status == "held" { row.held_until.map(millis) } else { None },
        "redeemed_at": row.redeemed_at.map(millis),
    }))
    .into_response())
}

async fn healthz(State(state): State<Arc<GatewayState>>) -> Response {
    let postgres = sqlx::query("SELECT 1").execute(&state.pool).await.is_ok();
    let redis = state.cache.ping().await.is_ok();
    // Redis is a cache: the service still answers correctly without it.
    let status = if postgres {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({
            "status": if postgres && redis { "ok" } else if postgres { "degraded" } else { "unavailable" },
            "postgres": postgres,
            "redis": redis,
            "waiting_requests": state.replies.waiting(),
        })),
    )
        .into_response()
}

async fn metrics_text(State(state): State<Arc<GatewayState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

/// The address a listener is bound to, for logs and tests.
pub fn local_addr(listener: &tokio::net::TcpListener) -> std::io::Result<SocketAddr> {
    listener.local_addr()
}
