//! The rebuild's bulk writes (`coupon_analyst::rebuild`): a projection
//! computed in memory, written in columns, one statement per chunk. The
//! rebuild writes into a fresh database it migrated itself, so these are
//! inserts and one update of the coupons just inserted, never merges with
//! live traffic.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use uuid::Uuid;

use coupon_domain::{CouponStatus, PurchaseOutcome};

/// The final state of coupons that are no longer available, in columns of
/// one length (one entry per coupon).
#[derive(Debug, Default)]
pub struct CouponStates<'a> {
    pub codes: Vec<String>,
    pub statuses: Vec<CouponStatus>,
    pub holders: Vec<Option<&'a str>>,
    pub holds: Vec<Option<&'a str>>,
    pub held_until: Vec<Option<DateTime<Utc>>>,
    pub redeemed_at: Vec<Option<DateTime<Utc>>>,
    pub orders: Vec<Option<&'a str>>,
}

/// Sets the coupons of `states` to their final state.
pub async fn update_coupon_states(
    pool: &PgPool,
    states: &CouponStates<'_>,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query!(
        "UPDATE coupons c
             SET status = u.status, holder_user_id = u.holder, hold_id = u.hold_id,
                 held_until = u.held_until, redeemed_at = u.redeemed_at,
                 redeemed_order_id = u.order_id
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[],
                         $6::timestamptz[], $7::text[])
                  AS u(code, status, holder, hold_id, held_until, redeemed_at, order_id)
             WHERE c.code = u.code",
        &states.codes,
        // Stored as text through the domain enum's sqlx::Type.
        &states.statuses as _,
        &states.holders as _,
        &states.holds as _,
        &states.held_until as _,
        &states.redeemed_at as _,
        &states.orders as _,
    )
    .execute(pool)
    .await?
    .rows_affected())
}

/// `users` rows in columns: the last coupon's time and the blacklist.
#[derive(Debug, Default)]
pub struct UserRows<'a> {
    pub ids: Vec<&'a str>,
    pub last_coupon_at: Vec<Option<DateTime<Utc>>>,
    pub blacklisted: Vec<bool>,
    pub blacklisted_until: Vec<Option<DateTime<Utc>>>,
    pub reasons: Vec<Option<&'a str>>,
    pub blacklisted_at: Vec<Option<DateTime<Utc>>>,
}

/// Writes `users` rows (a user written twice keeps the later columns).
pub async fn upsert_users(pool: &PgPool, users: &UserRows<'_>) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query!(
        "INSERT INTO users (user_id, last_coupon_at, blacklisted, blacklisted_until,
                                blacklist_reason, blacklisted_at)
             SELECT * FROM UNNEST($1::text[], $2::timestamptz[], $3::bool[], $4::timestamptz[],
                                  $5::text[], $6::timestamptz[])
             ON CONFLICT (user_id) DO UPDATE SET
                last_coupon_at = EXCLUDED.last_coupon_at, blacklisted = EXCLUDED.blacklisted,
                blacklisted_until = EXCLUDED.blacklisted_until,
                blacklist_reason = EXCLUDED.blacklist_reason,
                blacklisted_at = EXCLUDED.blacklisted_at",
        &users.ids as _,
        &users.last_coupon_at as _,
        &users.blacklisted,
        &users.blacklisted_until as _,
        &users.reasons as _,
        &users.blacklisted_at as _,
    )
    .execute(pool)
    .await?
    .rows_affected())
}

/// `quota_grants` rows in columns.
#[derive(Debug, Default)]
pub struct QuotaRows<'a> {
    pub users: Vec<&'a str>,
    pub windows: Vec<DateTime<Utc>>,
    pub requests: Vec<&'a str>,
    pub granted_at: Vec<DateTime<Utc>>,
}

pub async fn insert_quota_grants(pool: &PgPool, rows: &QuotaRows<'_>) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query!(
        "INSERT INTO quota_grants (user_id, window_start, request_id, granted_at)
             SELECT * FROM UNNEST($1::text[], $2::timestamptz[], $3::text[], $4::timestamptz[])",
        &rows.users as _,
        &rows.windows,
        &rows.requests as _,
        &rows.granted_at,
    )
    .execute(pool)
    .await?
    .rows_affected())
}

/// `purchase_decisions` rows in columns.
#[derive(Debug, Default)]
pub struct PurchaseRows<'a> {
    pub orders: Vec<&'a str>,
    pub requests: Vec<&'a str>,
    pub event_ids: Vec<Uuid>,
    pub users: Vec<&'a str>,
    pub codes: Vec<&'a str>,
    pub outcomes: Vec<PurchaseOutcome>,
    pub decided_at: Vec<DateTime<Utc>>,
}

pub async fn insert_purchase_decisions(
    pool: &PgPool,
    rows: &PurchaseRows<'_>,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query!(
        "INSERT INTO purchase_decisions (order_id, request_id, event_id, user_id, coupon_code,
                                             outcome, decided_at)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::uuid[], $4::text[], $5::text[],
                                  $6::text[], $7::timestamptz[])",
        &rows.orders as _,
        &rows.requests as _,
        &rows.event_ids,
        &rows.users as _,
        &rows.codes as _,
        // Stored as text through the domain enum's sqlx::Type.
        &rows.outcomes as _,
        &rows.decided_at,
    )
    .execute(pool)
    .await?
    .rows_affected())
}

/// Drops the plain (non-unique) indexes of `tables` in a fresh database, so
/// that a bulk load writes rows only and each index is built once after it
/// ([`create_indexes`]: `CREATE INDEX` sorts the rows, where a row-by-row
/// load walks the tree per row). Returns their definitions. Unique indexes
/// and primary keys stay: they guard what the rows must not break (one hold
/// per user, one decision per request). A partitioned table's index is
/// dropped and made again on the parent, which covers its partitions.
pub async fn drop_plain_indexes(
    pool: &PgPool,
    tables: &[&str],
) -> Result<Vec<String>, sqlx::Error> {
    let tables: Vec<String> = tables.iter().map(|t| (*t).to_owned()).collect();
    // Catalog reads and DDL: not compile-checked (names come from the catalog).
    let indexes: Vec<(String, String)> = sqlx::query_as(
        "SELECT i.relname::text, pg_get_indexdef(i.oid)
           FROM pg_index x
           JOIN pg_class i ON i.oid = x.indexrelid
           JOIN pg_class t ON t.oid = x.indrelid
          WHERE t.relname = ANY($1) AND t.relnamespace = current_schema()::regnamespace
            AND NOT x.indisunique AND NOT x.indisprimary
            AND NOT EXISTS (SELECT 1 FROM pg_inherits h WHERE h.inhrelid = i.oid)
          ORDER BY 1",
    )
    .bind(&tables)
    .fetch_all(pool)
    .await?;
    for (name, _) in &indexes {
        sqlx::query(&format!("DROP INDEX \"{}\"", name.replace('"', "\"\"")))
            .execute(pool)
            .await?;
    }
    Ok(indexes
        .into_iter()
        .map(|(_, definition)| definition)
        .collect())
}

/// Makes again the indexes [`drop_plain_indexes`] dropped.
pub async fn create_indexes(pool: &PgPool, definitions: &[String]) -> Result<(), sqlx::Error> {
    for definition in definitions {
        sqlx::query(definition).execute(pool).await?;
    }
    Ok(())
}
