//! Every HTTP error is JSON: `{"error": "<code>", "message": "..."}`.
//!
//! The codes are an enum ([`ErrorCode`]) rather than strings so that the
//! OpenAPI document lists exactly the codes the gateway can send.

use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

/// The machine-readable reason of an error answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: the request is malformed or names an id that is not valid.
    InvalidRequest,
    /// 400: any other client error the router produced on its own.
    BadRequest,
    /// 401: a bearer token is missing or wrong.
    Unauthorized,
    /// 403: the user is blacklisted (manually, or for flooding the gateway).
    Blacklisted,
    /// 403: refused for another reason.
    Forbidden,
    /// 403: a release names another employee than the caller's credential.
    EmployeeMismatch,
    /// 404: no route has this path.
    NotFound,
    /// 404: no coupon is available right now (to this user: campaigns with
    /// eligibility rules are only for users whose profile meets them).
    SoldOut,
    /// 404: no coupon has this code.
    UnknownCoupon,
    /// 404: no campaign has this id (a campaign's id is its batch id).
    UnknownCampaign,
    /// 404: no purchase redeemed a coupon under this order id.
    UnknownOrder,
    /// 405: the path exists but not with this method.
    MethodNotAllowed,
    /// 409: the hold ended before the purchase.
    HoldExpired,
    /// 409: the coupon is not held by this user.
    NotHolder,
    /// 409: the coupon was already redeemed.
    AlreadyRedeemed,
    /// 409: the x-request-id is another user's request; send a new one.
    RequestIdConflict,
    /// 409: the order_id is another user's order.
    OrderIdConflict,
    /// 409: a release with this `Idempotency-Key` is still being published;
    /// repeat it (same key, same body) after `Retry-After` for its answer.
    IdempotencyKeyInProgress,
    /// 422: this `Idempotency-Key` was used for a release with another body.
    IdempotencyKeyReused,
    /// 422: a campaign field of a release is out of range (a percent of 0
    /// or over 100, an unknown currency, a window that ends before it
    /// starts); nothing was released.
    InvalidCampaign,
    /// 422: a profile field is out of range (a date of birth in the future,
    /// a name too long); nothing was published.
    InvalidProfile,
    /// 409: the order total is under the coupon's campaign minimum (or no
    /// order total was sent for a campaign with a minimum).
    OrderBelowMinimum,
    /// 409: the order total is in another currency than the campaign's.
    CurrencyMismatch,
    /// 409: the coupon's campaign takes a percent off: send `order_total`.
    OrderTotalRequired,
    /// 413: the body is larger than 64 KiB.
    PayloadTooLarge,
    /// 414: the URI is too long.
    UriTooLong,
    /// 415: the body is not `application/json`.
    UnsupportedMediaType,
    /// 429: one coupon per user per quota window; see `Retry-After`.
    RateLimited,
    /// 429: too many requests from this client address (storefront routes
    /// open without COUPON_API_TOKEN); not the quota. See `Retry-After`.
    AddressLimited,
    /// 503: a store or the broker is not available (the message says whether
    /// retrying is safe).
    Unavailable,
    /// 503: the gateway sheds load (too many requests in flight or waiting
    /// for a decision); see `Retry-After`.
    Overloaded,
    /// 504: no decision in time; the request may still complete and retrying is safe.
    Timeout,
    /// 500: a bug.
    Internal,
}

/// The body of every error answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorCode,
    /// For people: what went wrong and what to do.
    pub message: String,
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
    pub retry_after_secs: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after_secs: None,
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::InvalidRequest, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, message)
    }

    /// `503` with `Retry-After: 1`. The message is for the client: never
    /// an internal error's text (log that instead).
    pub fn unavailable(message: impl Into<String>) -> Self {
        let mut error = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            message,
        );
        error.retry_after_secs = Some(1);
        error
    }

    /// `503` because the gateway is at one of its limits (requests in
    /// flight, waiting requests): shed rather than queued.
    pub fn overloaded(what: impl std::fmt::Display) -> Self {
        let mut error = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Overloaded,
            format!("the gateway is overloaded ({what}); retry later"),
        );
        error.retry_after_secs = Some(1);
        error
    }

    pub fn timeout() -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            ErrorCode::Timeout,
            "no decision in time; the request may still complete and retrying is safe",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(ErrorBody {
                error: self.code,
                message: self.message,
            }),
        )
            .into_response();
        if let Some(secs) = self.retry_after_secs {
            if let Ok(value) = HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        response
    }
}

/// The error code for an answer the router or an extractor produced on its
/// own, by status.
fn code_for(status: StatusCode) -> ErrorCode {
    match status.as_u16() {
        400 | 422 => ErrorCode::InvalidRequest,
        401 => ErrorCode::Unauthorized,
        403 => ErrorCode::Forbidden,
        404 => ErrorCode::NotFound,
        405 => ErrorCode::MethodNotAllowed,
        408 | 504 => ErrorCode::Timeout,
        413 => ErrorCode::PayloadTooLarge,
        414 => ErrorCode::UriTooLong,
        415 => ErrorCode::UnsupportedMediaType,
        429 => ErrorCode::RateLimited,
        503 => ErrorCode::Unavailable,
        400..=499 => ErrorCode::BadRequest,
        _ => ErrorCode::Internal,
    }
}

/// Rewrites error answers that are not JSON into the JSON error shape.
///
/// The handlers answer with [`ApiError`], but some answers never reach a
/// handler: axum's own 405 (empty body), path rejections (plain text) and
/// whatever a future layer adds. Clients should see one error format.
pub async fn json_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 4096)
        .await
        .map(|bytes| String::from_utf8_lossy(&bytes).trim().to_owned())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text
    };
    let mut rewritten = ApiError::new(status, code_for(status), message).into_response();
    // Keep what the original said besides its body (e.g. `Allow` on a 405).
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            rewritten.headers_mut().append(name, value.clone());
        }
    }
    rewritten
}
