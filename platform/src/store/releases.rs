//! The `releases` table: the batches released with an idempotency key, each
//! stored (batch id, body, every coupon id) before any of it is published.
//!
//! A row whose `published_at` is null is a release not known to be wholly on
//! the log: whoever holds its row lock ([`lock`]) is publishing it, and
//! whoever takes the lock next (a repeat with the key) publishes the stored
//! codes again and marks it published ([`mark_published`]). Row locks end with
//! their transaction, so a process that dies mid-publish holds none.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use coupon_domain::{Category, EmployeeId};

/// One stored release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRelease {
    pub idempotency_key: String,
    pub batch_id: Uuid,
    pub employee_id: EmployeeId,
    pub category: Category,
    pub count: i32,
    /// The coupons' Snowflake ids, in the order they were generated.
    pub coupon_ids: Vec<i64>,
    /// The batch's campaign, as the events carry it (an encoded
    /// `coupons.v1.Campaign`); `None`: the batch has none.
    pub campaign: Option<Vec<u8>>,
    pub created_at: DateTime<Utc>,
    /// When every chunk was confirmed on the log; `None` until then.
    pub published_at: Option<DateTime<Utc>>,
}

/// The release stored under `key`, if any.
pub async fn find(pool: &PgPool, key: &str) -> Result<Option<StoredRelease>, sqlx::Error> {
    sqlx::query_as!(
        StoredRelease,
        r#"SELECT idempotency_key, batch_id, employee_id AS "employee_id: EmployeeId",
                  category AS "category: Category", count, coupon_ids, campaign, created_at,
                  published_at
           FROM releases WHERE idempotency_key = $1"#,
        key
    )
    .fetch_optional(pool)
    .await
}

/// Stores `release` unless a release has its key already; `true` when this
/// call stored it. Committed on return: the batch is durable before any of
/// it is published.
pub async fn insert(pool: &PgPool, release: &StoredRelease) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query!(
        "INSERT INTO releases (idempotency_key, batch_id, employee_id, category, count, coupon_ids,
                               created_at, campaign)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (idempotency_key) DO NOTHING",
        release.idempotency_key,
        release.batch_id,
        &release.employee_id as &EmployeeId,
        &release.category as &Category,
        release.count,
        &release.coupon_ids,
        release.created_at,
        release.campaign.as_deref()
    )
    .execute(pool)
    .await?
    .rows_affected();
    Ok(inserted > 0)
}

/// Takes the row lock of the release stored under `key` in `tx`, waiting at
/// most `wait` for another holder (past it: the database's
/// `lock_not_available` error, see [`is_lock_timeout`]); returns its
/// `published_at` (`None` inside: not wholly published yet), or `None` when
/// no release has the key.
pub async fn lock(
    tx: &mut Transaction<'_, Postgres>,
    key: &str,
    wait: Duration,
) -> Result<Option<Option<DateTime<Utc>>>, sqlx::Error> {
    let millis = format!("{}ms", wait.as_millis().max(1));
    sqlx::query_scalar!(
        "SELECT set_config('lock_timeout', $1, true)",
        millis.as_str()
    )
    .fetch_one(&mut **tx)
    .await?;
    let row = sqlx::query_scalar!(
        "SELECT published_at FROM releases WHERE idempotency_key = $1 FOR UPDATE",
        key
    )
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row)
}

/// Records that every chunk of the release under `key` is on the log.
pub async fn mark_published(
    tx: &mut Transaction<'_, Postgres>,
    key: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE releases SET published_at = now() WHERE idempotency_key = $1 AND published_at IS NULL",
        key
    )
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Whether `error` is a lock wait that ran out (`lock_timeout`, SQLSTATE
/// 55P03).
pub fn is_lock_timeout(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == "55P03")
}
