//! The `users` table: the blacklist and the time of each user's last coupon.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

/// Users blacklisted right now (by the database's clock).
pub async fn blacklisted_now(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar!(
        "SELECT user_id FROM users
         WHERE blacklisted AND (blacklisted_until IS NULL OR blacklisted_until > now())"
    )
    .fetch_all(pool)
    .await
}

/// Every user's `last_coupon_at`, where set.
pub async fn last_coupon_times(pool: &PgPool) -> Result<Vec<(String, DateTime<Utc>)>, sqlx::Error> {
    let rows = sqlx::query!(
        r#"SELECT user_id, last_coupon_at AS "last_coupon_at!"
           FROM users WHERE last_coupon_at IS NOT NULL"#
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.user_id, r.last_coupon_at))
        .collect())
}

/// A user's blacklist columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlacklistColumns {
    pub user_id: String,
    pub blacklisted: bool,
    pub blacklisted_until: Option<DateTime<Utc>>,
    pub blacklist_reason: Option<String>,
    pub blacklisted_at: Option<DateTime<Utc>>,
}

/// Users whose blacklist columns are not all empty.
pub async fn blacklist_columns(pool: &PgPool) -> Result<Vec<BlacklistColumns>, sqlx::Error> {
    sqlx::query_as!(
        BlacklistColumns,
        "SELECT user_id, blacklisted, blacklisted_until, blacklist_reason, blacklisted_at
         FROM users
         WHERE blacklisted OR blacklisted_until IS NOT NULL OR blacklist_reason IS NOT NULL
            OR blacklisted_at IS NOT NULL"
    )
    .fetch_all(pool)
    .await
}
