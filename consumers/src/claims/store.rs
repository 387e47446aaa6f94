//! The claim processor's SQL. Each statement is one atomic step; the batch
//! transaction around them makes a batch all-or-nothing.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use coupon_domain::claim::{ActiveHold, UserClaimState};

use super::Claim;

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct StoredDecision {
    pub request_id: String,
    pub event_id: Uuid,
    pub user_id: String,
    pub outcome: String,
    pub coupon_code: Option<String>,
    pub category: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub repeated: bool,
    pub retry_at: Option<DateTime<Utc>>,
    pub blacklisted_until: Option<DateTime<Utc>>,
    pub decided_at: DateTime<Utc>,
}

pub async fn find_decision(
    conn: &mut PgConnection,
    request_id: &str,
) -> Result<Option<StoredDecision>, sqlx::Error> {
    sqlx::query_as(
        "SELECT request_id, event_id, user_id, outcome, coupon_code, category, expires_at,
                repeated, retry_at, blacklisted_until, decided_at
         FROM claim_decisions WHERE request_id = $1",
    )
    .bind(request_id)
    .fetch_optional(conn)
    .await
}

pub async fn insert_decision(
    conn: &mut PgConnection,
    d: &StoredDecision,
) -> Result<bool, sqlx::Error> {
    let result = sqlx::query(
        "INSERT INTO claim_decisions (request_id, event_id, user_id, outcome, coupon_code, category,
                                      expires_at, repeated, retry_at, blacklisted_until, decided_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
         ON CONFLICT (request_id) DO NOTHING",
    )
    .bind(&d.request_id)
    .bind(d.event_id)
    .bind(&d.user_id)
    .bind(&d.outcome)
    .bind(&d.coupon_code)
    .bind(&d.category)
    .bind(d.expires_at)
    .bind(d.repeated)
    .bind(d.retry_at)
    .bind(d.blacklisted_until)
    .bind(d.decided_at)
    .execute(conn)
    .await?;
    Ok(result.rows_affected() == 1)
}

#[derive(sqlx::FromRow)]
struct StateRow {
    blacklisted: Option<bool>,
    blacklisted_until: Option<DateTime<Utc>>,
    hold_code: Option<String>,
    hold_category: Option<String>,
    hold_until: Option<DateTime<Utc>>,
    granted_in_window: bool,
}

/// Everything the rules need about a user, in one round trip.
pub async fn user_state(
    conn: &mut PgConnection,
    user_id: &str,
    window_start: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<UserClaimState, sqlx::Error> {
    let row: StateRow = sqlx::query_as(
        "SELECT u.blacklisted, u.blacklisted_until,
                h.code AS hold_code, h.category AS hold_category, h.held_until AS hold_until,
                EXISTS (SELECT 1 FROM quota_grants q
                        WHERE q.user_id = $1 AND q.window_start = $2) AS granted_in_window
         FROM (SELECT 1) AS one
         LEFT JOIN users u ON u.user_id = $1
         LEFT JOIN LATERAL (
             SELECT code, category, held_until FROM coupons
             WHERE holder_user_id = $1 AND status = 'held' AND held_until > $3
             ORDER BY held_until DESC LIMIT 1) h ON true",
    )
    .bind(user_id)
    .bind(window_start)
    .bind(now)
    .fetch_one(conn)
    .await?;
    let blacklisted = row
        .blacklisted
        .unwrap_or(false)
        .then_some(row.blacklisted_until);
    let active_hold = match (row.hold_code, row.hold_category, row.hold_until) {
        (Some(code), Some(category), Some(expires_at)) => Some(ActiveHold {
            code,
            category,
            expires_at,
        }),
        _ => None,
    };
    Ok(UserClaimState {
        blacklisted,
        active_hold,
        granted_in_window: row.granted_in_window,
    })
}

/// Takes the user's slot for this window. `false`: already taken.
pub async fn take_quota(
    conn: &mut PgConnection,
    claim: &Claim,
    window_start: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<bool, sqlx::Error> {
    let result = sqlx::query(
        "INSERT INTO quota_grants (user_id, window_start, request_id, granted_at)
         VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
    )
    .bind(claim.user_id.as_str())
    .bind(window_start)
    .bind(&claim.request_id)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(result.rows_affected() == 1)
}

pub async fn give_back_quota(
    conn: &mut PgConnection,
    user_id: &str,
    window_start: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM quota_grants WHERE user_id = $1 AND window_start = $2")
        .bind(user_id)
        .bind(window_start)
        .execute(conn)
        .await?;
    Ok(())
}

/// Holds the oldest available coupon (of the category, if given) for the
/// user. Rows locked by another transaction are skipped, never waited on, so
/// concurrent processors take different coupons.
pub async fn allocate(
    conn: &mut PgConnection,
    claim: &Claim,
    hold_until: DateTime<Utc>,
) -> Result<Option<(String, String)>, sqlx::Error> {
    sqlx::query_as(
        // The pick is a materialized CTE: evaluated exactly once. (As a
        // subquery in FROM, the planner may rescan it per row and hold
        // several coupons for one user.)
        "WITH pick AS MATERIALIZED (
             SELECT code FROM coupons
             WHERE status = 'available' AND ($4::text IS NULL OR category = $4)
             ORDER BY id LIMIT 1
             FOR UPDATE SKIP LOCKED)
         UPDATE coupons c
         SET status = 'held', holder_user_id = $1, hold_id = $2, held_until = $3
         FROM pick
         WHERE c.code = pick.code AND c.status = 'available'
         RETURNING c.code, c.category",
    )
    .bind(claim.user_id.as_str())
    .bind(&claim.request_id)
    .bind(hold_until)
    .bind(claim.category.as_ref().map(|c| c.as_str()))
    .fetch_optional(conn)
    .await
}

pub async fn record_grant(
    conn: &mut PgConnection,
    user_id: &str,
    now: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO users (user_id, last_coupon_at) VALUES ($1, $2)
         ON CONFLICT (user_id) DO UPDATE SET last_coupon_at = EXCLUDED.last_coupon_at",
    )
    .bind(user_id)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(())
}
