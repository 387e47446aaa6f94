//! The blacklist lives on `users` in Postgres, where the claim processor
//! checks it. Manual entries come from `couponctl blacklist`; automatic ones
//! from the gateway's flood control. An automatic entry never shortens a
//! manual one.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

#[derive(Debug, Clone, PartialEq, sqlx::FromRow, serde::Serialize)]
pub struct BlacklistEntry {
    pub user_id: String,
    /// `None`: until removed.
    pub blacklisted_until: Option<DateTime<Utc>>,
    pub blacklist_reason: Option<String>,
    pub blacklisted_at: Option<DateTime<Utc>>,
}

/// Blacklists a user until `until` (`None`: indefinitely), extending any
/// existing entry, never shortening it.
pub async fn add(
    pool: &PgPool,
    user_id: &str,
    until: Option<DateTime<Utc>>,
    reason: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO users (user_id, blacklisted, blacklisted_until, blacklist_reason, blacklisted_at)
         VALUES ($1, true, $2, $3, now())
         ON CONFLICT (user_id) DO UPDATE SET
            blacklisted = true,
            blacklisted_until = CASE
                WHEN users.blacklisted AND users.blacklisted_until > now() AND EXCLUDED.blacklisted_until IS NOT NULL
                    THEN GREATEST(users.blacklisted_until, EXCLUDED.blacklisted_until)
                WHEN users.blacklisted AND users.blacklisted_until IS NULL THEN NULL
                ELSE EXCLUDED.blacklisted_until END,
            blacklist_reason = EXCLUDED.blacklist_reason,
            blacklisted_at = now()",
    )
    .bind(user_id)
    .bind(until)
    .bind(reason)
    .execute(pool)
    .await?;
    Ok(())
}

/// Lifts a blacklisting. Returns whether the user was blacklisted.
pub async fn remove(pool: &PgPool, user_id: &str) -> Result<bool, sqlx::Error> {
    let result = sqlx::query(
        "UPDATE users SET blacklisted = false, blacklisted_until = NULL, blacklist_reason = NULL,
                          blacklisted_at = NULL
         WHERE user_id = $1 AND blacklisted",
    )
    .bind(user_id)
    .execute(pool)
    .await?;
    Ok(result.rows_affected() > 0)
}

/// Current entries (expired ones are left out).
pub async fn list(pool: &PgPool) -> Result<Vec<BlacklistEntry>, sqlx::Error> {
    sqlx::query_as(
        "SELECT user_id, blacklisted_until, blacklist_reason, blacklisted_at FROM users
         WHERE blacklisted AND (blacklisted_until IS NULL OR blacklisted_until > now())
         ORDER BY user_id",
    )
    .fetch_all(pool)
    .await
}
