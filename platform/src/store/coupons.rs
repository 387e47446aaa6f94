//! The `coupons` table: one row per issued coupon, its status and hold.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use uuid::Uuid;

use coupon_domain::purchase::CouponView;
use coupon_domain::{Category, CouponCode, CouponStatus, EmployeeId, OrderId, UserId};

/// One coupon as the gateway shows it (`GET /api/v1/coupon/<code>`).
#[derive(Debug, Clone, PartialEq)]
pub struct CouponRecord {
    pub code: CouponCode,
    pub category: Category,
    pub status: CouponStatus,
    pub holder_user_id: Option<UserId>,
    pub held_until: Option<DateTime<Utc>>,
    pub redeemed_at: Option<DateTime<Utc>>,
}

/// The coupon with this code.
pub async fn find(pool: &PgPool, code: CouponCode) -> Result<Option<CouponRecord>, sqlx::Error> {
    sqlx::query_as!(
        CouponRecord,
        r#"SELECT code AS "code: CouponCode", category AS "category: Category",
                  status AS "status: CouponStatus", holder_user_id AS "holder_user_id: UserId",
                  held_until, redeemed_at
           FROM coupons WHERE code = $1"#,
        code as CouponCode
    )
    .fetch_optional(pool)
    .await
}

/// Where a coupon ended up: what the audit compares with the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CouponOutcome {
    pub code: CouponCode,
    pub status: CouponStatus,
    pub holder_user_id: Option<UserId>,
    pub redeemed_order_id: Option<OrderId>,
}

/// Every coupon's outcome.
pub async fn outcomes(pool: &PgPool) -> Result<Vec<CouponOutcome>, sqlx::Error> {
    sqlx::query_as!(
        CouponOutcome,
        r#"SELECT code AS "code: CouponCode", status AS "status: CouponStatus",
                  holder_user_id AS "holder_user_id: UserId",
                  redeemed_order_id AS "redeemed_order_id: OrderId"
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
    code: CouponCode,
) -> Result<Option<CouponView>, sqlx::Error> {
    sqlx::query_as!(
        CouponView,
        r#"SELECT c.status AS "status: CouponStatus",
                  c.holder_user_id AS "holder_user_id: UserId",
                  c.held_until, d.decided_at AS "held_since?"
           FROM coupons c LEFT JOIN claim_decisions d ON d.request_id = c.hold_id
           WHERE c.code = $1 FOR UPDATE OF c"#,
        code as CouponCode
    )
    .fetch_optional(conn)
    .await
}

/// Marks a held coupon redeemed by `order_id` at `at`.
pub async fn redeem(
    conn: &mut sqlx::PgConnection,
    code: CouponCode,
    at: DateTime<Utc>,
    order_id: &OrderId,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE coupons SET status = 'redeemed', redeemed_at = $2, redeemed_order_id = $3
         WHERE code = $1 AND status = 'held'",
        code as CouponCode,
        at,
        order_id as &OrderId
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Undoes the redemption of `code` by `order_id` (its order was
/// cancelled): the coupon goes to `to` (`available`, or `expired` after its
/// campaign's end) with no holder. `false` when it is not redeemed by that
/// order.
pub async fn cancel_redemption(
    conn: &mut sqlx::PgConnection,
    code: CouponCode,
    order_id: &OrderId,
    to: CouponStatus,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query!(
        "UPDATE coupons SET status = $3, holder_user_id = NULL, hold_id = NULL,
                held_until = NULL, redeemed_at = NULL, redeemed_order_id = NULL
         WHERE code = $1 AND status = 'redeemed' AND redeemed_order_id = $2",
        code as CouponCode,
        order_id as &OrderId,
        to as CouponStatus
    )
    .execute(conn)
    .await?
    .rows_affected();
    Ok(done == 1)
}

/// A hold past its deadline that nothing released yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverdueHold {
    pub code: CouponCode,
    pub holder_user_id: UserId,
    pub hold_id: String,
    pub held_until: DateTime<Utc>,
    /// When its campaign ends or ended (`coupon_domain::lifecycle::campaign_end`;
    /// `None`: no campaign, or one without an end).
    pub campaign_end: Option<DateTime<Utc>>,
}

/// Holds whose deadline passed more than `grace` ago by the database's
/// clock, oldest first, at most `limit`.
pub async fn overdue_holds(
    pool: &PgPool,
    grace: std::time::Duration,
    limit: i64,
) -> Result<Vec<OverdueHold>, sqlx::Error> {
    // A held row has its holder, hold and deadline (CHECK constraints).
    sqlx::query_as!(
        OverdueHold,
        r#"SELECT code AS "code: CouponCode", holder_user_id AS "holder_user_id!: UserId",
                  hold_id AS "hold_id!",
                  held_until AS "held_until!",
                  (SELECT LEAST(k.valid_until, k.ended_at) FROM campaigns k
                   WHERE k.batch_id = c.batch_id) AS "campaign_end?"
           FROM coupons c
           WHERE status = 'held' AND held_until <= now() - $1::interval
           ORDER BY held_until LIMIT $2"#,
        interval(grace),
        limit
    )
    .fetch_all(pool)
    .await
}

/// `d` as a Postgres interval (whole microseconds).
fn interval(d: std::time::Duration) -> sqlx::postgres::types::PgInterval {
    sqlx::postgres::types::PgInterval {
        months: 0,
        days: 0,
        microseconds: i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
    }
}

/// A hold a release ended: the coupon, its former holder and deadline, and
/// where the coupon went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleasedHold {
    pub code: CouponCode,
    pub holder_user_id: UserId,
    pub held_until: DateTime<Utc>,
    pub status: CouponStatus,
    /// The campaign's end when it came by the deadline (the coupon expired).
    pub campaign_ended_at: Option<DateTime<Utc>>,
}

/// Ends the hold of `code` if it is still held under `hold_id` with a
/// deadline at or before `deadline`; `None` when it is not (a purchase or
/// another release came first). The coupon becomes available again, or
/// `expired` when its campaign had ended by the hold's deadline (the SQL
/// form of `coupon_domain::lifecycle::after_hold`).
pub async fn release_hold(
    conn: &mut sqlx::PgConnection,
    code: CouponCode,
    hold_id: &str,
    deadline: DateTime<Utc>,
) -> Result<Option<ReleasedHold>, sqlx::Error> {
    sqlx::query_as!(
        ReleasedHold,
        r#"UPDATE coupons c
           SET status = CASE WHEN old.ended_at <= old.held_until THEN 'expired'
                             ELSE 'available' END,
               holder_user_id = NULL, hold_id = NULL, held_until = NULL
           FROM (SELECT h.code, h.holder_user_id, h.held_until,
                        (SELECT LEAST(k.valid_until, k.ended_at) FROM campaigns k
                         WHERE k.batch_id = h.batch_id) AS ended_at
                 FROM coupons h
                 WHERE h.code = $1 AND h.status = 'held' AND h.hold_id = $2 AND h.held_until <= $3
                 FOR UPDATE OF h) AS old
           WHERE c.code = old.code
           RETURNING c.code AS "code: CouponCode", old.holder_user_id AS "holder_user_id!: UserId",
                     old.held_until AS "held_until!", c.status AS "status: CouponStatus",
                     (CASE WHEN old.ended_at <= old.held_until THEN old.ended_at END)
                        AS "campaign_ended_at?""#,
        code as CouponCode,
        hold_id,
        deadline
    )
    .fetch_optional(conn)
    .await
}

/// An available coupon whose campaign has ended, not yet `expired`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndedCoupon {
    pub code: CouponCode,
    pub batch_id: Uuid,
    pub ended_at: DateTime<Utc>,
    /// The database's time of the scan.
    pub swept_at: DateTime<Utc>,
}

/// Available coupons whose campaign has ended by the database's clock
/// (its `valid_until`, or an early end), oldest first, at most `limit`:
/// what the expiry sweeper announces as `CouponExpired`.
///
/// The sweeper asks every second. The statement walks the available coupons
/// in id order until it finds those of ended campaigns, so with none ended
/// it walks them all (112 ms with 234,000 available, measured: a tenth of a
/// core, growing with the pool); a look at the small `campaigns` table
/// first answers that common case (plain batches, or no campaign over yet).
pub async fn ended_available(pool: &PgPool, limit: i64) -> Result<Vec<EndedCoupon>, sqlx::Error> {
    let any_ended = sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM campaigns k
                          WHERE LEAST(k.valid_until, k.ended_at) <= now()) AS "any!""#
    )
    .fetch_one(pool)
    .await?;
    if !any_ended {
        return Ok(Vec::new());
    }
    sqlx::query_as!(
        EndedCoupon,
        r#"SELECT c.code AS "code: CouponCode", c.batch_id,
                  LEAST(k.valid_until, k.ended_at) AS "ended_at!", now() AS "swept_at!"
           FROM campaigns k JOIN coupons c ON c.batch_id = k.batch_id
           WHERE c.status = 'available' AND LEAST(k.valid_until, k.ended_at) <= now()
           ORDER BY c.id LIMIT $1"#,
        limit
    )
    .fetch_all(pool)
    .await
}

/// Makes `code` `expired` if it is still available and its campaign has
/// ended by the database's clock; `false` when not (a claim took it before
/// the end, or it expired already: a redelivery).
pub async fn expire_available(
    conn: &mut sqlx::PgConnection,
    code: CouponCode,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query!(
        "UPDATE coupons c SET status = 'expired'
         WHERE c.code = $1 AND c.status = 'available'
           AND EXISTS (SELECT 1 FROM campaigns k WHERE k.batch_id = c.batch_id
                       AND LEAST(k.valid_until, k.ended_at) <= now())",
        code as CouponCode
    )
    .execute(conn)
    .await?
    .rows_affected();
    Ok(done > 0)
}

/// A live hold, as Redis mirrors it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveHold {
    pub code: CouponCode,
    pub holder_user_id: UserId,
    pub category: Category,
    pub held_until: DateTime<Utc>,
}

/// Every hold whose deadline has not passed.
pub async fn live_holds(pool: &PgPool) -> Result<Vec<LiveHold>, sqlx::Error> {
    sqlx::query_as!(
        LiveHold,
        r#"SELECT code AS "code: CouponCode", holder_user_id AS "holder_user_id!: UserId",
                  category AS "category: Category", held_until AS "held_until!"
           FROM coupons WHERE status = 'held' AND held_until > now()"#
    )
    .fetch_all(pool)
    .await
}

/// Whether any coupon of `category` (`None`: of any category) is available
/// and claimable: outside a campaign, or inside its window from `earliest`
/// to `latest` (`None`: the database's `now()`), as [`super::claims::grant`]
/// takes them. One probe of a partial index: the claim processor asks it to
/// keep a sold-out mark alive while claims still arrive for an empty pool,
/// and, in its batch's transaction, whether an allocation that came up short
/// skipped rows other transactions hold locked (a plain read does not wait
/// for row locks and still sees such rows as available).
pub async fn any_available<'e>(
    pool: impl sqlx::PgExecutor<'e>,
    category: Option<&Category>,
    earliest: Option<DateTime<Utc>>,
    latest: Option<DateTime<Utc>>,
    excluded: &[uuid::Uuid],
) -> Result<bool, sqlx::Error> {
    // Two statements, so that each probes its own partial index. `excluded`:
    // the campaigns the asking users may not have (eligibility).
    match category {
        Some(category) => {
            sqlx::query_scalar!(
                r#"SELECT EXISTS (SELECT 1 FROM coupons c
                                   WHERE status = 'available' AND category = $1
                                     AND NOT (c.batch_id = ANY($4::uuid[]))
                                     AND NOT EXISTS (
                                         SELECT 1 FROM campaigns k WHERE k.batch_id = c.batch_id
                                         AND (k.valid_from > COALESCE($2, now())
                                              OR k.valid_until <= COALESCE($3, now())
                                              OR k.ended_at IS NOT NULL)))
                   AS "any!""#,
                category as &Category,
                earliest,
                latest,
                excluded
            )
            .fetch_one(pool)
            .await
        }
        None => {
            sqlx::query_scalar!(
                r#"SELECT EXISTS (SELECT 1 FROM coupons c
                                   WHERE status = 'available'
                                     AND NOT (c.batch_id = ANY($3::uuid[]))
                                     AND NOT EXISTS (
                                         SELECT 1 FROM campaigns k WHERE k.batch_id = c.batch_id
                                         AND (k.valid_from > COALESCE($1, now())
                                              OR k.valid_until <= COALESCE($2, now())
                                              OR k.ended_at IS NOT NULL)))
                   AS "any!""#,
                earliest,
                latest,
                excluded
            )
            .fetch_one(pool)
            .await
        }
    }
}

/// Coupons of `category` (the benchmarks wait for a release's projection).
pub async fn count_in_category(pool: &PgPool, category: &Category) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT count(*) AS "n!" FROM coupons WHERE category = $1"#,
        category as &Category
    )
    .fetch_one(pool)
    .await
}

/// Held coupons of `category`, and how many distinct users hold them.
pub async fn held_in_category(
    pool: &PgPool,
    category: &Category,
) -> Result<(i64, i64), sqlx::Error> {
    let row = sqlx::query!(
        r#"SELECT count(*) AS "held!", count(DISTINCT holder_user_id) AS "holders!"
           FROM coupons WHERE category = $1 AND status = 'held'"#,
        category as &Category
    )
    .fetch_one(pool)
    .await?;
    Ok((row.held, row.holders))
}

/// The allocation step alone, as the benchmarks' baseline measures it:
/// the oldest available coupon of `category`, held for `holder` for five
/// minutes (no quota, no decision).
pub async fn hold_one(
    conn: &mut sqlx::PgConnection,
    category: &Category,
    holder: &UserId,
) -> Result<Option<CouponCode>, sqlx::Error> {
    sqlx::query_scalar!(
        r#"WITH pick AS MATERIALIZED (
             SELECT code FROM coupons WHERE status = 'available' AND category = $2
             ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
         UPDATE coupons c SET status = 'held', holder_user_id = $1, hold_id = $1,
                held_until = now() + interval '5 minutes'
         FROM pick WHERE c.code = pick.code RETURNING c.code AS "code: CouponCode""#,
        holder as &UserId,
        category as &Category
    )
    .fetch_optional(conn)
    .await
}

/// Makes every held coupon of `category` available again (after a baseline).
pub async fn release_all_held(pool: &PgPool, category: &Category) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE coupons SET status = 'available', holder_user_id = NULL, hold_id = NULL,
                held_until = NULL
         WHERE category = $1 AND status = 'held'",
        category as &Category
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// One coupon ready to insert.
#[derive(Debug, Clone, PartialEq)]
pub struct NewCoupon {
    pub code: CouponCode,
    pub batch_id: Uuid,
    pub employee_id: EmployeeId,
    pub category: Category,
    pub generated_at: DateTime<Utc>,
}

/// Inserts coupons in one statement; returns how many were new.
pub async fn insert_coupons(
    pool: &sqlx::PgPool,
    coupons: &[NewCoupon],
) -> Result<u64, sqlx::Error> {
    if coupons.is_empty() {
        return Ok(0);
    }
    let mut inserted = 0;
    // Chunked to keep each statement's arrays moderate.
    for chunk in coupons.chunks(20_000) {
        // The fast path: a binary COPY. A redelivered chunk (a code already
        // there) makes Postgres refuse it whole, and the statement below,
        // which skips what exists, decides instead.
        match crate::pgcopy::copy_in(pool, COPY_COUPONS, copy_rows(chunk)).await {
            Ok(rows) => {
                inserted += rows;
                continue;
            }
            Err(error) if crate::pgcopy::refused(&error) => {
                tracing::debug!(%error, "COPY refused; inserting what is new");
            }
            Err(error) => return Err(error),
        }
        let codes: Vec<CouponCode> = chunk.iter().map(|c| c.code).collect();
        let ids: Vec<i64> = chunk.iter().map(|c| c.code.id().as_i64()).collect();
        let batches: Vec<Uuid> = chunk.iter().map(|c| c.batch_id).collect();
        let employees: Vec<EmployeeId> = chunk.iter().map(|c| c.employee_id.clone()).collect();
        let categories: Vec<Category> = chunk.iter().map(|c| c.category.clone()).collect();
        let generated: Vec<DateTime<Utc>> = chunk.iter().map(|c| c.generated_at).collect();
        inserted += sqlx::query!(
            "INSERT INTO coupons (code, id, batch_id, employee_id, category, generated_at)
             SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::uuid[], $4::text[], $5::text[], $6::timestamptz[])
             ON CONFLICT DO NOTHING",
            &codes as &[CouponCode],
            &ids,
            &batches,
            &employees as &[EmployeeId],
            &categories as &[Category],
            &generated,
        )
        .execute(pool)
        .await?
        .rows_affected();
    }
    Ok(inserted)
}

const COPY_COUPONS: &str = "COPY coupons (code, id, batch_id, employee_id, category, generated_at) FROM STDIN (FORMAT binary)";

fn copy_rows(coupons: &[NewCoupon]) -> crate::pgcopy::BinaryRows {
    let mut rows = crate::pgcopy::BinaryRows::new(6, coupons.len() * 110);
    for c in coupons {
        rows.row()
            .text(&c.code.to_string())
            .int8(c.code.id().as_i64())
            .uuid(&c.batch_id)
            .text(c.employee_id.as_str())
            .text(c.category.as_str())
            .timestamptz(&c.generated_at);
    }
    rows
}
