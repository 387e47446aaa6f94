//! The reads behind the web console's routes (`/api/v1/batches`,
//! `/api/v1/analytics/*`), in one place: the HTTP handlers only parse,
//! call these and shape the answer.
//!
//! Every number comes straight from Postgres with one query, so what the
//! console shows is what an operator gets from `psql` with the same query
//! (the browser test compares them). The pool per category is
//! `coupon_platform::store::stats::pool_by_category`, the query `couponctl status`
//! runs, and the blacklist is `coupon_producers::blacklist`: neither is repeated here.
//!
//! The analytics read `coupon_history` (the history sink), bounded by time
//! on `occurred_at` so that Postgres prunes the months outside the range.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

/// One batch as projected so far: its coupons by status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRow {
    pub batch_id: Uuid,
    pub employee_id: String,
    pub category: String,
    /// Coupons of the batch stored by the projector.
    pub projected: i64,
    pub available: i64,
    pub held: i64,
    pub redeemed: i64,
    /// When its first coupon was generated.
    pub generated_at: DateTime<Utc>,
}

/// Which batches to list.
#[derive(Debug, Clone, Default)]
pub struct BatchFilter {
    pub employee: Option<String>,
    pub batch_id: Option<Uuid>,
    pub limit: i64,
}

/// The most recent batches (newest first), as far as they are projected:
/// a batch appears with its first stored coupon.
pub async fn batches(pool: &PgPool, filter: &BatchFilter) -> Result<Vec<BatchRow>, sqlx::Error> {
    sqlx::query_as!(
        BatchRow,
        r#"SELECT batch_id, employee_id, category,
                count(*) AS "projected!",
                count(*) FILTER (WHERE status = 'available') AS "available!",
                count(*) FILTER (WHERE status = 'held') AS "held!",
                count(*) FILTER (WHERE status = 'redeemed') AS "redeemed!",
                min(generated_at) AS "generated_at!"
           FROM coupons
          WHERE ($1::text IS NULL OR employee_id = $1)
            AND ($2::uuid IS NULL OR batch_id = $2)
          GROUP BY batch_id, employee_id, category
          ORDER BY min(generated_at) DESC, batch_id
          LIMIT $3"#,
        filter.employee.as_deref(),
        filter.batch_id,
        filter.limit
    )
    .fetch_all(pool)
    .await
}

/// Claim decisions of one bucket, by outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimBucket {
    pub bucket_start: DateTime<Utc>,
    pub granted: i64,
    pub sold_out: i64,
    pub rate_limited: i64,
    pub blacklisted: i64,
    /// Invalid requests and anything else.
    pub other: i64,
}

/// Claim decisions recorded in the history in `[since, until]`, counted per
/// bucket of `bucket_seconds` (aligned to the Unix epoch), buckets without
/// any decision left out. A grant is a `granted` row; a refusal is a
/// `rejected` row carrying the claim's `reason` (a refused purchase carries
/// an `outcome` instead, and is not a claim). Repeated grants (the same
/// hold returned again) are not in the history, so not counted.
pub async fn claims_per_bucket(
    pool: &PgPool,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
    bucket_seconds: i64,
) -> Result<Vec<ClaimBucket>, sqlx::Error> {
    sqlx::query_as!(
        ClaimBucket,
        r#"SELECT to_timestamp(floor(extract(epoch FROM occurred_at) / $3::float8) * $3::float8)
                    AS "bucket_start!",
                count(*) FILTER (WHERE kind = 'granted') AS "granted!",
                count(*) FILTER (WHERE kind = 'rejected' AND detail->>'reason' = 'sold_out') AS "sold_out!",
                count(*) FILTER (WHERE kind = 'rejected' AND detail->>'reason' = 'rate_limited') AS "rate_limited!",
                count(*) FILTER (WHERE kind = 'rejected' AND detail->>'reason' = 'blacklisted') AS "blacklisted!",
                count(*) FILTER (WHERE kind = 'rejected'
                                   AND detail->>'reason' NOT IN ('sold_out', 'rate_limited', 'blacklisted')) AS "other!"
           FROM coupon_history
          WHERE occurred_at >= $1 AND occurred_at <= $2
            AND (kind = 'granted' OR (kind = 'rejected' AND detail ? 'reason'))
          GROUP BY 1
          ORDER BY 1"#,
        since,
        until,
        bucket_seconds as f64
    )
    .fetch_all(pool)
    .await
}

/// The redemption funnel of one batch: holds granted on its coupons in the
/// range, and how many of the coupons were redeemed or released (the hold
/// expired) in the range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunnelRow {
    pub batch_id: Uuid,
    pub employee_id: String,
    pub category: String,
    pub granted: i64,
    pub redeemed: i64,
    pub expired: i64,
}

/// The funnel per batch over `[since, until]` (batches with no grant,
/// redemption or release in the range are left out), by category then
/// batch.
pub async fn funnel(
    pool: &PgPool,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<Vec<FunnelRow>, sqlx::Error> {
    sqlx::query_as!(
        FunnelRow,
        r#"SELECT c.batch_id, c.employee_id, c.category,
                count(*) FILTER (WHERE h.kind = 'granted') AS "granted!",
                count(*) FILTER (WHERE h.kind = 'redeemed') AS "redeemed!",
                count(*) FILTER (WHERE h.kind = 'released') AS "expired!"
           FROM coupon_history h
           JOIN coupons c ON c.code = h.coupon_code
          WHERE h.occurred_at >= $1 AND h.occurred_at <= $2
            AND h.kind IN ('granted', 'redeemed', 'released')
          GROUP BY c.batch_id, c.employee_id, c.category
          ORDER BY c.category, min(c.generated_at), c.batch_id"#,
        since,
        until
    )
    .fetch_all(pool)
    .await
}
