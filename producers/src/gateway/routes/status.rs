//! `GET /api/v1/coupon/{code}`: one coupon's state, read from the read pool.

use std::sync::Arc;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};

use coupon_domain::{Campaign, CouponCode, UserId};
use coupon_platform::store;

use crate::gateway::api::{CouponState, CouponStatus, DiscountBody, MoneyBody};
use crate::gateway::auth::{Caller, ClientAddr};
use crate::gateway::responses;
use crate::gateway::storefront_caller;
use crate::gateway::GatewayState;
use crate::gateway::{ApiError, ErrorBody, ErrorCode};

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
        responses::AddressLimited,
        responses::StoreUnavailable,
    ),
    security((), ("api_token" = []), ("admin_token" = []))
)]
pub(in crate::gateway) async fn coupon_status(
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
    let campaign = store::campaigns::of_coupon(&state.read_pool, code)
        .await
        .map_err(|error| {
            tracing::warn!(%error, "reading a coupon's campaign failed");
            ApiError::unavailable("the coupon store is not available; retrying is safe")
        })?;
    Ok(Json(coupon_status_of(
        row,
        campaign.as_ref(),
        caller == Caller::Admin,
    ))
    .into_response())
}

/// The answer for a coupon as the store has it: the deadline only while it
/// is held, and its holder only for an admin caller (codes are sequential,
/// so anyone could otherwise list who holds what), with its campaign's
/// terms when its batch has one.
fn coupon_status_of(
    row: store::coupons::CouponRecord,
    campaign: Option<&Campaign>,
    admin: bool,
) -> CouponStatus {
    let status = CouponState::from(row.status);
    let millis = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let wire = campaign.map(coupon_schemas::Campaign::from);
    CouponStatus {
        campaign: campaign.and_then(|c| c.name()).map(str::to_owned),
        discount: wire.as_ref().and_then(DiscountBody::of),
        min_order: wire
            .as_ref()
            .and_then(|c| c.min_order.as_ref())
            .map(MoneyBody::from),
        valid_from: campaign.and_then(Campaign::valid_from).map(millis),
        valid_until: campaign.and_then(Campaign::valid_until).map(millis),
        locations: campaign.map(|c| c.locations().to_vec()).unwrap_or_default(),
        min_age: campaign.and_then(Campaign::min_age),
        coupon_code: row.code.to_string(),
        category: row.category.into_string(),
        expires_at: if matches!(status, CouponState::Held) {
            row.held_until.map(millis)
        } else {
            None
        },
        status,
        holder: if admin {
            row.holder_user_id.map(UserId::into_string)
        } else {
            None
        },
        redeemed_at: row.redeemed_at.map(millis),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coupon_domain::{Category, CouponStatus as Lifecycle};

    fn held() -> store::coupons::CouponRecord {
        store::coupons::CouponRecord {
            code: CouponCode::parse("0AN35HST00000").expect("a code"),
            category: Category::parse("Electronics").expect("a category"),
            status: Lifecycle::Held,
            holder_user_id: Some(UserId::parse("u1").expect("an id")),
            held_until: DateTime::from_timestamp_millis(1_780_000_000_000),
            redeemed_at: None,
        }
    }

    #[test]
    fn the_holder_is_shown_to_admins_only() {
        assert_eq!(
            coupon_status_of(held(), None, true).holder.as_deref(),
            Some("u1")
        );
        assert_eq!(coupon_status_of(held(), None, false).holder, None);
    }

    #[test]
    fn a_held_coupon_says_until_when() {
        let answer = coupon_status_of(held(), None, false);
        assert!(matches!(answer.status, CouponState::Held));
        assert_eq!(
            answer.expires_at.as_deref(),
            Some("2026-05-28T20:26:40.000Z")
        );
        assert_eq!(answer.coupon_code, "0AN35HST00000");
    }

    #[test]
    fn a_deadline_left_on_a_coupon_no_longer_held_is_not_shown() {
        let mut row = held();
        row.status = Lifecycle::Redeemed;
        row.redeemed_at = DateTime::from_timestamp_millis(1_780_000_100_000);
        let answer = coupon_status_of(row, None, true);
        assert_eq!(answer.expires_at, None);
        assert_eq!(
            answer.redeemed_at.as_deref(),
            Some("2026-05-28T20:28:20.000Z")
        );
    }
}
