//! The decisions: `claim_decisions` (one per claim request id),
//! `purchase_decisions` (one per order) and `quota_grants` (one per user and
//! quota window). The processors write them in their batch transactions
//! ([`super::claims`], `consumers/src/purchases`); these are
//! the reads of the whole tables the audit compares with the log.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use coupon_domain::{
    Category, ClaimOutcomeKind, CouponCode, CouponStatus, OrderId, PurchaseOutcome, RequestId,
    UserId,
};

/// A `quota_grants` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaGrant {
    pub user_id: UserId,
    pub window_start: DateTime<Utc>,
    pub request_id: RequestId,
    pub granted_at: DateTime<Utc>,
}

pub async fn quota_grants(pool: &PgPool) -> Result<Vec<QuotaGrant>, sqlx::Error> {
    sqlx::query_as!(
        QuotaGrant,
        r#"SELECT user_id AS "user_id: UserId", window_start,
                  request_id AS "request_id: RequestId", granted_at
           FROM quota_grants"#
    )
    .fetch_all(pool)
    .await
}

/// The users whose quota of the window that starts at `window_start` is
/// used: what the Redis cache is refilled with after a loss.
pub async fn quota_users(
    pool: &PgPool,
    window_start: DateTime<Utc>,
) -> Result<Vec<UserId>, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT user_id AS "user_id: UserId" FROM quota_grants WHERE window_start = $1"#,
        window_start
    )
    .fetch_all(pool)
    .await
}

/// A `claim_decisions` row. The code and category are those of a granted
/// coupon (`None` for every other outcome).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ClaimDecisionRecord {
    pub request_id: RequestId,
    pub event_id: Uuid,
    pub user_id: UserId,
    pub outcome: ClaimOutcomeKind,
    pub coupon_code: Option<CouponCode>,
    pub category: Option<Category>,
    pub expires_at: Option<DateTime<Utc>>,
    pub repeated: bool,
    pub retry_at: Option<DateTime<Utc>>,
    pub blacklisted_until: Option<DateTime<Utc>>,
    pub decided_at: DateTime<Utc>,
}

pub async fn claim_decisions(pool: &PgPool) -> Result<Vec<ClaimDecisionRecord>, sqlx::Error> {
    sqlx::query_as!(
        ClaimDecisionRecord,
        r#"SELECT request_id AS "request_id: RequestId", event_id, user_id AS "user_id: UserId",
                  outcome AS "outcome: ClaimOutcomeKind",
                  coupon_code AS "coupon_code: CouponCode", category AS "category: Category",
                  expires_at, repeated, retry_at, blacklisted_until, decided_at
           FROM claim_decisions"#
    )
    .fetch_all(pool)
    .await
}

/// A `purchase_decisions` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurchaseDecisionRecord {
    pub order_id: OrderId,
    pub request_id: RequestId,
    pub event_id: Uuid,
    pub user_id: UserId,
    /// The code as the request gave it, canonical when it was a valid code
    /// (an `unknown_coupon` answer keeps what was asked for).
    pub coupon_code: String,
    pub outcome: PurchaseOutcome,
    pub decided_at: DateTime<Utc>,
    /// The order total the purchase sent (minor units and currency), if any.
    pub order_total_amount: Option<i64>,
    pub order_total_currency: Option<String>,
    /// Redeemed: what the coupon's campaign took off, if anything.
    pub discount_amount: Option<i64>,
    pub discount_currency: Option<String>,
}

pub async fn purchase_decisions(pool: &PgPool) -> Result<Vec<PurchaseDecisionRecord>, sqlx::Error> {
    sqlx::query_as!(
        PurchaseDecisionRecord,
        r#"SELECT order_id AS "order_id: OrderId", request_id AS "request_id: RequestId",
                  event_id, user_id AS "user_id: UserId", coupon_code,
                  outcome AS "outcome: PurchaseOutcome", decided_at, order_total_amount,
                  order_total_currency, discount_amount, discount_currency
           FROM purchase_decisions"#
    )
    .fetch_all(pool)
    .await
}

/// The decision stored for `order_id`, if any (the purchase processor, in
/// its batch transaction).
pub async fn find_purchase(
    conn: &mut sqlx::PgConnection,
    order_id: &OrderId,
) -> Result<Option<PurchaseDecisionRecord>, sqlx::Error> {
    sqlx::query_as!(
        PurchaseDecisionRecord,
        r#"SELECT order_id AS "order_id: OrderId", request_id AS "request_id: RequestId",
                  event_id, user_id AS "user_id: UserId", coupon_code,
                  outcome AS "outcome: PurchaseOutcome", decided_at, order_total_amount,
                  order_total_currency, discount_amount, discount_currency
           FROM purchase_decisions WHERE order_id = $1"#,
        order_id as &OrderId
    )
    .fetch_optional(conn)
    .await
}

/// A cancelled order, as stored with its purchase's decision.
#[derive(Debug, Clone, PartialEq)]
pub struct CancelRecord {
    pub cancelled_at: DateTime<Utc>,
    pub request_id: RequestId,
    pub event_id: Uuid,
    /// Where the coupon went: `available` or `expired`.
    pub coupon_status: CouponStatus,
}

/// The cancellation of `order_id`, if it was cancelled.
pub async fn find_cancel(
    conn: &mut sqlx::PgConnection,
    order_id: &OrderId,
) -> Result<Option<CancelRecord>, sqlx::Error> {
    sqlx::query_as!(
        CancelRecord,
        r#"SELECT cancelled_at AS "cancelled_at!", cancel_request_id AS "request_id!: RequestId",
                  cancel_event_id AS "event_id!", cancelled_to AS "coupon_status!: CouponStatus"
           FROM purchase_decisions
           WHERE order_id = $1 AND cancelled_at IS NOT NULL"#,
        order_id as &OrderId
    )
    .fetch_optional(conn)
    .await
}

/// Records the cancellation of `order_id` (once: `false` when it was
/// cancelled already).
pub async fn record_cancel(
    conn: &mut sqlx::PgConnection,
    order_id: &OrderId,
    cancel: &CancelRecord,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query!(
        "UPDATE purchase_decisions
            SET cancelled_at = $2, cancel_request_id = $3, cancel_event_id = $4, cancelled_to = $5
          WHERE order_id = $1 AND cancelled_at IS NULL",
        order_id as &OrderId,
        cancel.cancelled_at,
        &cancel.request_id as &RequestId,
        cancel.event_id,
        cancel.coupon_status as CouponStatus,
    )
    .execute(conn)
    .await?
    .rows_affected();
    Ok(done == 1)
}

/// Stores a purchase decision unless the order already has one; returns
/// whether it was stored (`false`: another processor decided it meanwhile).
pub async fn insert_purchase(
    conn: &mut sqlx::PgConnection,
    decision: &PurchaseDecisionRecord,
) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query!(
        "INSERT INTO purchase_decisions (order_id, request_id, event_id, user_id, coupon_code, outcome,
                                         decided_at, order_total_amount, order_total_currency,
                                         discount_amount, discount_currency)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT (order_id) DO NOTHING",
        &decision.order_id as &OrderId,
        &decision.request_id as &RequestId,
        decision.event_id,
        &decision.user_id as &UserId,
        decision.coupon_code,
        decision.outcome as PurchaseOutcome,
        decision.decided_at,
        decision.order_total_amount,
        decision.order_total_currency,
        decision.discount_amount,
        decision.discount_currency,
    )
    .execute(conn)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}

/// Whether `user_id` was ever granted `coupon_code` (so a late buyer hears
/// "your hold expired" rather than "not yours").
pub async fn was_granted(
    conn: &mut sqlx::PgConnection,
    user_id: &UserId,
    coupon_code: CouponCode,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM claim_decisions
                          WHERE user_id = $1 AND coupon_code = $2 AND outcome = 'granted')
           AS "granted!""#,
        user_id as &UserId,
        coupon_code as CouponCode
    )
    .fetch_one(conn)
    .await
}

/// Claim decisions of users whose id starts with `prefix` (the benchmarks'
/// simulated users).
pub async fn claim_decisions_of_users_like(
    pool: &PgPool,
    prefix: &str,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT count(*) AS "n!" FROM claim_decisions WHERE user_id LIKE $1 || '%'"#,
        prefix
    )
    .fetch_one(pool)
    .await
}
