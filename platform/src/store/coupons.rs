//! The `coupons` table: one row per issued coupon, its status and hold.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use coupon_domain::purchase::CouponView;
use coupon_domain::CouponStatus;

/// One coupon as the gateway shows it (`GET /api/v1/coupon/<code>`).
#[derive(Debug, Clone, PartialEq)]
pub struct CouponRecord {
    pub code: String,
    pub category: String,
    pub status: CouponStatus,
    pub holder_user_id: Option<String>,
    pub held_until: Option<DateTime<Utc>>,
    pub redeemed_at: Option<DateTime<Utc>>,
}

/// The coupon with this (canonical) code.
pub async fn find(pool: &PgPool, code: &str) -> Result<Option<CouponRecord>, sqlx::Error> {
    sqlx::query_as!(
        CouponRecord,
        r#"SELECT code, category, status AS "status: CouponStatus", holder_user_id,
                  held_until, redeemed_at
           FROM coupons WHERE code = $1"#,
        code
    )
    .fetch_optional(pool)
    .await
}

/// Where a coupon ended up: what the audit compares with the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CouponOutcome {
    pub code: String,
    pub status: CouponStatus,
    pub holder_user_id: Option<String>,
    pub redeemed_order_id: Option<String>,
}

/// Every coupon's outcome.
pub async fn outcomes(pool: &PgPool) -> Result<Vec<CouponOutcome>, sqlx::Error> {
    sqlx::query_as!(
        CouponOutcome,
        r#"SELECT code, status AS "status: CouponStatus", holder_user_id, redeemed_order_id
           FROM coupons"#
    )
    .fetch_all(pool)
    .await
}

/// The coupon as the purchase rules see it, locked (`FOR UPDATE`) until
/// the transaction ends, so a purchase and the expiry of the same hold are
/// serialised.
pub async fn lock_for_purchase(
    conn: &mut sqlx::PgConnection,
    code: &str,
) -> Result<Option<CouponView>, sqlx::Error> {
    sqlx::query_as!(
        CouponView,
        r#"SELECT status AS "status: CouponStatus", holder_user_id, held_until
           FROM coupons WHERE code = $1 FOR UPDATE"#,
        code
    )
    .fetch_optional(conn)
    .await
}

/// Marks a held coupon redeemed by `order_id` at `at`.
pub async fn redeem(
    conn: &mut sqlx::PgConnection,
    code: &str,
    at: DateTime<Utc>,
    order_id: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE coupons SET status = 'redeemed', redeemed_at = $2, redeemed_order_id = $3
         WHERE code = $1 AND status = 'held'",
        code,
        at,
        order_id
    )
    .execute(conn)
    .await?;
    Ok(())
}
