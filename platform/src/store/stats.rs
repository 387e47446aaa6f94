//! Read-only counts of the coupon state, shared by `couponctl status`, the
//! metrics gauges and the demo, so all report the same numbers from the same
//! queries.
//!
//! [`pool_by_category`] reads every coupon (for `status`, and once when a
//! process starts). The others read only the partial indexes on available
//! and held coupons, so their cost follows the live pool and the holds, not
//! the years of redeemed coupons: cheap enough to run every few seconds.

use sqlx::PgPool;

/// Coupons of one category by status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CategoryPool {
    pub category: String,
    pub available: i64,
    pub held: i64,
    pub redeemed: i64,
    /// Out of the pool for good: their campaign ended.
    pub expired: i64,
}

/// Every category with its coupons by status, ordered by category.
pub async fn pool_by_category(pool: &PgPool) -> Result<Vec<CategoryPool>, sqlx::Error> {
    sqlx::query_as!(
        CategoryPool,
        r#"SELECT category,
                  count(*) FILTER (WHERE status = 'available') AS "available!",
                  count(*) FILTER (WHERE status = 'held') AS "held!",
                  count(*) FILTER (WHERE status = 'redeemed') AS "redeemed!",
                  count(*) FILTER (WHERE status = 'expired') AS "expired!"
             FROM coupons GROUP BY category ORDER BY category"#
    )
    .fetch_all(pool)
    .await
}

/// Available coupons per category (categories with none are absent).
pub async fn available_by_category(pool: &PgPool) -> Result<Vec<(String, i64)>, sqlx::Error> {
    let rows = sqlx::query!(
        r#"SELECT category, count(*) AS "available!" FROM coupons WHERE status = 'available'
            GROUP BY category ORDER BY category"#
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.category, r.available))
        .collect())
}

/// Coupons held right now (including overdue holds not released yet).
pub async fn active_holds(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(r#"SELECT count(*) AS "held!" FROM coupons WHERE status = 'held'"#)
        .fetch_one(pool)
        .await
}

/// Holds past their deadline that the sweeper has not released yet (a few
/// for a second at most while the expiry role runs).
pub async fn overdue_holds(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT count(*) AS "overdue!" FROM coupons WHERE status = 'held' AND held_until <= now()"#
    )
    .fetch_one(pool)
    .await
}

/// Coupons by status, over every category.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatusCounts {
    pub available: i64,
    pub held: i64,
    pub redeemed: i64,
}

impl StatusCounts {
    /// Every coupon there is: no status change creates or loses one.
    pub fn total(&self) -> i64 {
        self.available + self.held + self.redeemed
    }
}

/// Coupons by status (reads every coupon: for checks, not for a gauge).
pub async fn status_counts(pool: &PgPool) -> Result<StatusCounts, sqlx::Error> {
    sqlx::query_as!(
        StatusCounts,
        r#"SELECT count(*) FILTER (WHERE status = 'available') AS "available!",
                  count(*) FILTER (WHERE status = 'held') AS "held!",
                  count(*) FILTER (WHERE status = 'redeemed') AS "redeemed!"
             FROM coupons"#
    )
    .fetch_one(pool)
    .await
}

/// Claims decided `granted` the first time (a repeated request that got
/// its earlier grant back is not a new grant).
pub async fn first_grants(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT count(*) AS "granted!" FROM claim_decisions
            WHERE outcome = 'granted' AND NOT repeated"#
    )
    .fetch_one(pool)
    .await
}

/// Breaches of the spec's two allocation invariants.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AllocationBreaches {
    /// Users holding more than one coupon at once.
    pub users_holding_twice: i64,
    /// Users granted more than once in one quota window.
    pub users_granted_twice: i64,
}

pub async fn allocation_breaches(pool: &PgPool) -> Result<AllocationBreaches, sqlx::Error> {
    sqlx::query_as!(
        AllocationBreaches,
        r#"SELECT
             (SELECT count(*) FROM (SELECT holder_user_id FROM coupons WHERE status = 'held'
                GROUP BY 1 HAVING count(*) > 1) d) AS "users_holding_twice!",
             (SELECT count(*) FROM (SELECT user_id FROM quota_grants
                GROUP BY user_id, window_start HAVING count(*) > 1) d) AS "users_granted_twice!""#
    )
    .fetch_one(pool)
    .await
}

/// Whether the database holds any coupon or decision (a rebuild writes only
/// into one that holds none).
pub async fn holds_any_state(pool: &PgPool) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM coupons) OR EXISTS (SELECT 1 FROM quota_grants)
             OR EXISTS (SELECT 1 FROM claim_decisions) OR EXISTS (SELECT 1 FROM purchase_decisions)
             AS "has_rows!""#
    )
    .fetch_one(pool)
    .await
}

/// Every user with a row in this database: a user, a quota slot, a claim
/// decision or a held coupon (to check that a shard stores only its own).
pub async fn users_with_rows(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT user_id FROM users UNION SELECT user_id FROM quota_grants \
         UNION SELECT user_id FROM claim_decisions \
         UNION SELECT holder_user_id FROM coupons WHERE holder_user_id IS NOT NULL",
    )
    .fetch_all(pool)
    .await
}

/// Counts this database's statements in `pg_stat_statements` from now on;
/// fails where the server does not load the module.
pub async fn track_statements(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(pool)
        .await
        .map(drop)
}

/// Forgets the statements `pg_stat_statements` counted (on the whole
/// server); fails where the server does not load it.
pub async fn reset_statements(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_stat_statements_reset()")
        .execute(pool)
        .await
        .map(drop)
}

/// The statements this database ran since [`reset_statements`], as
/// (calls, normalized text), most called first; fails where the server does
/// not load `pg_stat_statements`.
pub async fn statements_run(pool: &PgPool) -> Result<Vec<(i64, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT calls, query FROM pg_stat_statements \
         WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND query NOT ILIKE '%pg_stat_statements%' \
         ORDER BY calls DESC, query",
    )
    .fetch_all(pool)
    .await
}
