//! The claim processor's SQL (`coupon_consumers::claims`). Each statement is
//! one atomic step; the batch
//! transaction around them makes a batch all-or-nothing. Every statement
//! works on the whole batch at once (stored decisions, user states, grants,
//! new decisions), so a batch costs a handful of round trips whatever its
//! size, and a sold-out answer none of its own.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use coupon_domain::claim::{ActiveHold, Allocation, ClaimOutcomeKind, UserClaimState};
use coupon_domain::{Category, CouponCode, RequestId, UserId};

/// A stored claim decision: the store's `claim_decisions` row.
pub use super::decisions::ClaimDecisionRecord;

/// The decisions already stored for any of `request_ids` (redeliveries and
/// client retries) decided at `since` or later, in one round trip for the
/// whole batch. `claim_decisions` is partitioned by day of `decided_at`: the
/// lookup probes each day's unique index on `request_id` from `since`'s day
/// on, so it costs a probe per day it reaches back (the claim processor
/// reaches back `REQUEST_ID_HORIZON` before its records' time: the dedup
/// horizon; see the retention migration).
pub async fn find_decisions(
    conn: &mut PgConnection,
    request_ids: &[&RequestId],
    since: DateTime<Utc>,
) -> Result<HashMap<RequestId, ClaimDecisionRecord>, sqlx::Error> {
    let request_ids: Vec<RequestId> = request_ids.iter().map(|id| (*id).clone()).collect();
    let found = sqlx::query_as!(
        ClaimDecisionRecord,
        r#"SELECT request_id AS "request_id: RequestId", event_id, user_id AS "user_id: UserId",
                  outcome AS "outcome: ClaimOutcomeKind",
                  coupon_code AS "coupon_code: CouponCode", category AS "category: Category",
                  expires_at, repeated, retry_at, blacklisted_until, decided_at
           FROM claim_decisions WHERE request_id = ANY($1) AND decided_at >= $2"#,
        &request_ids as &[RequestId],
        since
    )
    .fetch_all(conn)
    .await?;
    Ok(found
        .into_iter()
        .map(|d| (d.request_id.clone(), d))
        .collect())
}

/// Stores the batch's new decisions in one statement. Returns how many were
/// inserted: fewer than given means another processor decided some of these
/// requests meanwhile (a rebalance), and the batch must be tried again:
/// `ON CONFLICT DO NOTHING` arbitrates on every unique index of the day's
/// partition the row goes to, its `request_id` one included. (The
/// batch itself never holds two decisions for one request id: the claim
/// processor answers a second user's claim under a used id `invalid`.)
pub async fn insert_decisions(
    conn: &mut PgConnection,
    decisions: &[ClaimDecisionRecord],
) -> Result<u64, sqlx::Error> {
    if decisions.is_empty() {
        return Ok(0);
    }
    let time =
        |f: fn(&ClaimDecisionRecord) -> Option<DateTime<Utc>>| -> Vec<Option<DateTime<Utc>>> {
            decisions.iter().map(f).collect()
        };
    let result = sqlx::query!(
        "INSERT INTO claim_decisions (request_id, event_id, user_id, outcome, coupon_code, category,
                                      expires_at, repeated, retry_at, blacklisted_until, decided_at)
         SELECT * FROM UNNEST($1::text[], $2::uuid[], $3::text[], $4::text[], $5::text[],
                              $6::text[], $7::timestamptz[], $8::bool[], $9::timestamptz[],
                              $10::timestamptz[], $11::timestamptz[])
         ON CONFLICT DO NOTHING",
        // Ids, codes and the outcome are stored as text through their
        // domain types' sqlx::Type.
        &decisions.iter().map(|d| &d.request_id).collect::<Vec<_>>() as &[&RequestId],
        &decisions.iter().map(|d| d.event_id).collect::<Vec<Uuid>>(),
        &decisions.iter().map(|d| &d.user_id).collect::<Vec<_>>() as &[&UserId],
        decisions.iter().map(|d| d.outcome).collect::<Vec<_>>() as _,
        decisions.iter().map(|d| d.coupon_code).collect::<Vec<_>>() as _,
        decisions.iter().map(|d| d.category.as_ref()).collect::<Vec<_>>() as _,
        time(|d| d.expires_at) as _,
        &decisions.iter().map(|d| d.repeated).collect::<Vec<bool>>(),
        time(|d| d.retry_at) as _,
        time(|d| d.blacklisted_until) as _,
        &decisions.iter().map(|d| d.decided_at).collect::<Vec<DateTime<Utc>>>(),
    )
    .execute(conn)
    .await?;
    Ok(result.rows_affected())
}

/// [`insert_decisions`] for many decisions at once, as a rebuild writes
/// them: one binary `COPY` per call, falling back to the insert (which skips
/// the decisions already there) when Postgres refuses it.
pub async fn copy_decisions(
    pool: &sqlx::PgPool,
    decisions: &[ClaimDecisionRecord],
) -> Result<u64, sqlx::Error> {
    use crate::pgcopy::{copy_in, refused, BinaryRows};
    if decisions.is_empty() {
        return Ok(0);
    }
    let mut body = BinaryRows::new(11, decisions.len() * 120);
    for d in decisions {
        body.row()
            .text(d.request_id.as_str())
            .uuid(&d.event_id)
            .text(d.user_id.as_str())
            .text(d.outcome.as_str())
            .text_or_null(d.coupon_code.map(|c| c.to_string()).as_deref())
            .text_or_null(d.category.as_ref().map(|c| c.as_str()))
            .timestamptz_or_null(d.expires_at.as_ref())
            .boolean(d.repeated)
            .timestamptz_or_null(d.retry_at.as_ref())
            .timestamptz_or_null(d.blacklisted_until.as_ref())
            .timestamptz(&d.decided_at);
    }
    match copy_in(pool, COPY_CLAIM_DECISIONS, body).await {
        Ok(written) => Ok(written),
        Err(error) if refused(&error) => {
            tracing::debug!(%error, "COPY refused; inserting what is new");
            let mut conn = pool.acquire().await?;
            insert_decisions(&mut conn, decisions).await
        }
        Err(error) => Err(error),
    }
}

const COPY_CLAIM_DECISIONS: &str = "COPY claim_decisions (request_id, event_id, user_id, outcome, coupon_code, category, expires_at, repeated, retry_at, blacklisted_until, decided_at) FROM STDIN (FORMAT binary)";

struct StateRow {
    user_id: UserId,
    blacklisted: Option<bool>,
    blacklisted_until: Option<DateTime<Utc>>,
    hold_code: Option<CouponCode>,
    hold_category: Option<Category>,
    hold_until: Option<DateTime<Utc>>,
    last_grant_window: Option<DateTime<Utc>>,
}

/// What is stored about each of `user_ids`, in one round trip for the
/// whole batch: the blacklist entry, the coupon the user holds (overdue or
/// not) and the newest window with a grant, if it starts at `since` or
/// later (`quota_grants` is partitioned by day of `window_start`: only the
/// days from `since` on are probed; an older window never counts against a
/// claim judged in `since`'s window or later). No clock is involved: the
/// rules judge these facts at each request's own time.
///
/// The held coupon is joined by its holder alone: a user holds at most one
/// (`coupons_one_hold_per_user`, unique), so no ordering is needed, and the
/// join is a look-up in that index whatever the statistics say. (With an
/// `ORDER BY held_until DESC LIMIT 1` the planner, believing held coupons
/// rare, walked `coupons_held_until` backwards through every held coupon for
/// each user who holds none: 21-23 ms of a 103-claim batch with 10,000
/// coupons held.)
pub async fn user_states(
    conn: &mut PgConnection,
    user_ids: &[&UserId],
    since: DateTime<Utc>,
) -> Result<HashMap<UserId, UserClaimState>, sqlx::Error> {
    let user_ids: Vec<UserId> = user_ids.iter().map(|id| (*id).clone()).collect();
    let rows = sqlx::query_as!(
        StateRow,
        r#"SELECT x.user_id AS "user_id!: UserId", u.blacklisted AS "blacklisted?",
                  u.blacklisted_until AS "blacklisted_until?",
                  h.code AS "hold_code?: CouponCode", h.category AS "hold_category?: Category",
                  h.held_until AS "hold_until?",
                  (SELECT max(q.window_start) FROM quota_grants q
                    WHERE q.user_id = x.user_id AND q.window_start >= $2) AS last_grant_window
           FROM (SELECT DISTINCT user_id FROM unnest($1::text[]) AS ids(user_id)) AS x
           LEFT JOIN users u ON u.user_id = x.user_id
           LEFT JOIN coupons h ON h.holder_user_id = x.user_id AND h.status = 'held'"#,
        &user_ids as &[UserId],
        since
    )
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let blacklisted = row
                .blacklisted
                .unwrap_or(false)
                .then_some(row.blacklisted_until);
            let hold = match (row.hold_code, row.hold_category, row.hold_until) {
                (Some(code), Some(category), Some(expires_at)) => Some(ActiveHold {
                    code,
                    category,
                    expires_at,
                }),
                _ => None,
            };
            let state = UserClaimState {
                blacklisted,
                hold,
                last_grant_window: row.last_grant_window,
            };
            (row.user_id, state)
        })
        .collect())
}

/// An overdue hold [`release_overdue`] ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Released {
    pub code: CouponCode,
    pub user_id: UserId,
    pub hold_id: String,
    pub held_until: DateTime<Utc>,
}

/// Releases the holds of the users of `claims` whose deadline has passed at
/// each claim's time, so that their grant cannot collide with a hold the
/// expiry has not released yet (`coupons_one_hold_per_user`). A separate
/// statement before the grant: a unique index is checked row by row, so the
/// release must be done before the grant's update starts. The row lock and
/// the conditions make it safe against the expiry and a purchase racing it:
/// whichever comes second finds the coupon no longer held under that hold.
pub async fn release_overdue(
    conn: &mut PgConnection,
    claims: &[Allocation],
) -> Result<Vec<Released>, sqlx::Error> {
    if claims.is_empty() {
        return Ok(Vec::new());
    }
    let users: Vec<&UserId> = claims.iter().map(|c| &c.user_id).collect();
    let at: Vec<DateTime<Utc>> = claims.iter().map(|c| c.at).collect();
    // The rows `old` returns are held ones: holder, hold and deadline are set.
    sqlx::query_as!(
        Released,
        r#"WITH want AS (
             SELECT * FROM unnest($1::text[], $2::timestamptz[]) AS w(user_id, at)),
         old AS MATERIALIZED (
             SELECT c.code, c.holder_user_id, c.hold_id, c.held_until
             FROM coupons c JOIN want ON c.holder_user_id = want.user_id
             WHERE c.status = 'held' AND c.held_until <= want.at
             FOR UPDATE OF c)
         UPDATE coupons c
         SET status = 'available', holder_user_id = NULL, hold_id = NULL, held_until = NULL
         FROM old
         WHERE c.code = old.code
         RETURNING old.code AS "code!: CouponCode", old.holder_user_id AS "user_id!: UserId",
                   old.hold_id AS "hold_id!", old.held_until AS "held_until!""#,
        &users as &[&UserId],
        &at
    )
    .fetch_all(conn)
    .await
}

/// A coupon held for a claim by [`grant`]. (A campaign ended early gives
/// nothing more from the moment its end commits, whatever the claim's
/// time; its natural end is judged at the claim's time, as its start.)
#[derive(Debug, Clone, PartialEq)]
pub struct Granted {
    pub request_id: RequestId,
    pub code: CouponCode,
    pub category: Category,
    pub held_until: DateTime<Utc>,
}

/// Grants coupons from one pool (`category`, or any when `None`) to
/// `claims`, in one statement: the oldest available coupons whose
/// campaign's window (if their batch has one) is open at every claim's
/// time go to the
/// earliest claims, each winner's quota slot is taken and its last grant
/// recorded (at the claim's own time). Claims left without a coupon
/// (the pool ran out) get no row and keep their quota: sold out does not
/// use it.
///
/// `excluded` are the campaigns (batch ids) these claims' users may not
/// have (`coupon_domain::profile::ineligible_batches`): the caller groups
/// claims whose users are refused the same ones.
///
/// The claims must be of distinct users, with their overdue holds released
/// ([`release_overdue`]). Rows locked by another transaction are skipped,
/// never waited on, so concurrent processors take different coupons. A
/// quota slot or a hold taken meanwhile by another processor (a rebalance)
/// is a unique violation, not a silent skip: the batch rolls back, and the
/// next attempt reads the slot as taken.
pub async fn grant(
    conn: &mut PgConnection,
    category: Option<&Category>,
    excluded: &[Uuid],
    claims: &[Allocation],
) -> Result<Vec<Granted>, sqlx::Error> {
    if claims.is_empty() {
        return Ok(Vec::new());
    }
    let users: Vec<&UserId> = claims.iter().map(|c| &c.user_id).collect();
    let requests: Vec<&RequestId> = claims.iter().map(|c| &c.request_id).collect();
    let windows: Vec<DateTime<Utc>> = claims.iter().map(|c| c.window_start).collect();
    let until: Vec<DateTime<Utc>> = claims.iter().map(|c| c.hold_until).collect();
    let at: Vec<DateTime<Utc>> = claims.iter().map(|c| c.at).collect();
    // A campaign's coupon is taken only if its window is open at every
    // claim's time (`coupon_domain::Campaign::is_open_at`).
    let earliest = at.iter().min().copied();
    let latest = at.iter().max().copied();
    sqlx::query_as!(
        Granted,
        // `pick` is a materialized CTE: evaluated exactly once. (Inlined, the
        // planner may rescan it and hold several coupons for one user.) Data-
        // modifying CTEs run whether or not they are referenced.
        r#"WITH want AS (
             SELECT user_id, request_id, window_start, hold_until, at, ord AS n
             FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[],
                         $7::timestamptz[])
                  WITH ORDINALITY AS w(user_id, request_id, window_start, hold_until, at, ord)),
         pick AS MATERIALIZED (
             SELECT code, row_number() OVER (ORDER BY id) AS n
             FROM (SELECT code, id FROM coupons c
                   WHERE status = 'available' AND ($5::text IS NULL OR category = $5)
                     AND NOT (c.batch_id = ANY($10::uuid[]))
                     AND NOT EXISTS (
                         SELECT 1 FROM campaigns k WHERE k.batch_id = c.batch_id
                         AND (k.valid_from > $8 OR k.valid_until <= $9
                              OR k.ended_at IS NOT NULL))
                   ORDER BY id LIMIT $6
                   FOR UPDATE OF c SKIP LOCKED) AS available),
         pair AS MATERIALIZED (
             SELECT want.*, pick.code FROM want JOIN pick USING (n)),
         quota AS (
             INSERT INTO quota_grants (user_id, window_start, request_id, granted_at)
             SELECT user_id, window_start, request_id, at FROM pair),
         last_grant AS (
             INSERT INTO users (user_id, last_coupon_at) SELECT user_id, at FROM pair
             ON CONFLICT (user_id) DO UPDATE SET last_coupon_at = EXCLUDED.last_coupon_at)
         UPDATE coupons c
         SET status = 'held', holder_user_id = pair.user_id, hold_id = pair.request_id,
             held_until = pair.hold_until
         FROM pair
         WHERE c.code = pair.code AND c.status = 'available'
         RETURNING pair.request_id AS "request_id!: RequestId", c.code AS "code: CouponCode",
                   c.category AS "category: Category",
                   c.held_until AS "held_until!""#,
        &users as &[&UserId],
        &requests as &[&RequestId],
        &windows,
        &until,
        category as Option<&Category>,
        claims.len() as i64,
        &at,
        earliest,
        latest,
        excluded
    )
    .fetch_all(conn)
    .await
}
