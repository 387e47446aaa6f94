//! `GET /api/v1/coupon/{code}`: one coupon's state, read from the read pool.

use std::sync::Arc;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};

use coupon_domain::{CouponCode, UserId};
use coupon_platform::store;

use super::api::{CouponState, CouponStatus};
use super::auth::{Caller, ClientAddr};
use super::responses;
use super::storefront_caller;
use super::GatewayState;
use super::{ApiError, ErrorBody, ErrorCode};

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
pub(super) async fn coupon_status(
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
