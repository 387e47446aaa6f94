//! The claim processor's SQL. Each statement is one atomic step; the batch
//! transaction around them makes a batch all-or-nothing. What can be read or
//! written for the whole batch at once is (stored decisions, user states,
//! new decisions): a claim then costs round trips only when it takes a
//! coupon, and a sold-out answer none of its own.

use std::collections::HashMap;

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

/// The decisions already stored for any of `request_ids` (redeliveries and
/// client retries), in one round trip for the whole batch.
pub async fn find_decisions(
    conn: &mut PgConnection,
    request_ids: &[&str],
) -> Result<HashMap<String, StoredDecision>, sqlx::Error> {
    let found: Vec<StoredDecision> = sqlx::query_as(
        "SELECT request_id, event_id, user_id, outcome, coupon_code, category, expires_at,
                repeated, retry_at, blacklisted_until, decided_at
         FROM claim_decisions WHERE request_id = ANY($1)",
    )
    .bind(request_ids)
    .fetch_all(conn)
    .await?;
    Ok(found
        .into_iter()
        .map(|d| (d.request_id.clone(), d))
        .collect())
}

/// Stores the batch's new decisions in one statement. Returns how many were
/// inserted: fewer than given means another processor decided some of these
/// requests meanwhile (a rebalance), and the batch must be retried.
pub async fn insert_decisions(
    conn: &mut PgConnection,
    decisions: &[StoredDecision],
) -> Result<u64, sqlx::Error> {
    if decisions.is_empty() {
        return Ok(0);
    }
    let column = |f: fn(&StoredDecision) -> Option<String>| -> Vec<Option<String>> {
        decisions.iter().map(f).collect()
    };
    let time = |f: fn(&StoredDecision) -> Option<DateTime<Utc>>| -> Vec<Option<DateTime<Utc>>> {
        decisions.iter().map(f).collect()
    };
    let result = sqlx::query(
        "INSERT INTO claim_decisions (request_id, event_id, user_id, outcome, coupon_code, category,
                                      expires_at, repeated, retry_at, blacklisted_until, decided_at)
         SELECT * FROM UNNEST($1::text[], $2::uuid[], $3::text[], $4::text[], $5::text[],
                              $6::text[], $7::timestamptz[], $8::bool[], $9::timestamptz[],
                              $10::timestamptz[], $11::timestamptz[])
         ON CONFLICT (request_id) DO NOTHING",
    )
    .bind(column(|d| Some(d.request_id.clone())))
    .bind(decisions.iter().map(|d| d.event_id).collect::<Vec<Uuid>>())
    .bind(column(|d| Some(d.user_id.clone())))
    .bind(column(|d| Some(d.outcome.clone())))
    .bind(column(|d| d.coupon_code.clone()))
    .bind(column(|d| d.category.clone()))
    .bind(time(|d| d.expires_at))
    .bind(decisions.iter().map(|d| d.repeated).collect::<Vec<bool>>())
    .bind(time(|d| d.retry_at))
    .bind(time(|d| d.blacklisted_until))
    .bind(time(|d| Some(d.decided_at)))
    .execute(conn)
    .await?;
    Ok(result.rows_affected())
}

#[derive(sqlx::FromRow)]
struct StateRow {
    user_id: String,
    blacklisted: Option<bool>,
    blacklisted_until: Option<DateTime<Utc>>,
    hold_code: Option<String>,
    hold_category: Option<String>,
    hold_until: Option<DateTime<Utc>>,
    granted_in_window: bool,
}

/// Everything the rules need about each of `user_ids`, in one round trip
/// for the whole batch.
pub async fn user_states(
    conn: &mut PgConnection,
    user_ids: &[&str],
    window_start: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<HashMap<String, UserClaimState>, sqlx::Error> {
    let rows: Vec<StateRow> = sqlx::query_as(
        "SELECT x.user_id, u.blacklisted, u.blacklisted_until,
                h.code AS hold_code, h.category AS hold_category, h.held_until AS hold_until,
                EXISTS (SELECT 1 FROM quota_grants q
                        WHERE q.user_id = x.user_id AND q.window_start = $2) AS granted_in_window
         FROM (SELECT DISTINCT user_id FROM unnest($1::text[]) AS ids(user_id)) AS x
         LEFT JOIN users u ON u.user_id = x.user_id
         LEFT JOIN LATERAL (
             SELECT code, category, held_until FROM coupons
             WHERE holder_user_id = x.user_id AND status = 'held' AND held_until > $3
             ORDER BY held_until DESC LIMIT 1) h ON true",
    )
    .bind(user_ids)
    .bind(window_start)
    .bind(now)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| {
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
            let state = UserClaimState {
                blacklisted,
                active_hold,
                granted_in_window: row.granted_in_window,
            };
            (row.user_id, state)
        })
        .collect())
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
