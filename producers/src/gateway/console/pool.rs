//! `GET /api/v1/pool`: the coupons of every category by status.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::super::responses;
use super::super::{AdminCaller, ApiError, GatewayState};
use super::store_unavailable;

/// The coupons of one category by status.
#[derive(Debug, Serialize, ToSchema)]
pub struct CategoryPool {
    #[schema(example = "Electronics")]
    pub category: String,
    pub available: i64,
    pub held: i64,
    pub redeemed: i64,
    /// Out of the pool for good: their campaign ended.
    pub expired: i64,
    /// available + held + redeemed + expired.
    pub issued: i64,
}

/// The pool per category and in total.
#[derive(Debug, Serialize, ToSchema)]
pub struct PoolAnswer {
    pub categories: Vec<CategoryPool>,
    pub available: i64,
    pub held: i64,
    pub redeemed: i64,
    pub expired: i64,
    pub issued: i64,
}

/// The pool per category: coupons available, held, redeemed and expired.
///
/// The numbers of `couponctl status` (the same query), as Postgres has them
/// now: coupons published but not yet projected are not counted.
#[utoipa::path(
    get,
    path = "/api/v1/pool",
    tag = "console",
    responses(
        (status = 200, description = "Every category with its coupons by status.", body = PoolAnswer),
        responses::AdminUnauthorized,
        responses::StoreUnavailable,
    ),
    security(("admin_token" = []))
)]
pub(crate) async fn pool(
    State(state): State<Arc<GatewayState>>,
    _caller: AdminCaller,
) -> Result<Json<PoolAnswer>, ApiError> {
    let rows = coupon_platform::store::stats::pool_by_category(&state.pool)
        .await
        .map_err(store_unavailable)?;
    let categories: Vec<CategoryPool> = rows
        .into_iter()
        .map(|c| CategoryPool {
            issued: c.available + c.held + c.redeemed + c.expired,
            category: c.category,
            available: c.available,
            held: c.held,
            redeemed: c.redeemed,
            expired: c.expired,
        })
        .collect();
    let sum = |f: fn(&CategoryPool) -> i64| categories.iter().map(f).sum::<i64>();
    Ok(Json(PoolAnswer {
        available: sum(|c| c.available),
        held: sum(|c| c.held),
        redeemed: sum(|c| c.redeemed),
        expired: sum(|c| c.expired),
        issued: sum(|c| c.issued),
        categories,
    }))
}
