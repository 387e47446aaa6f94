//! The `users` table: the blacklist and the time of each user's last coupon;
//! and `blacklist_outbox`, the blacklist changes committed but not yet on the
//! log (`coupon_producers::blacklist` says why).

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use coupon_domain::UserId;

/// Users blacklisted right now (by the database's clock).
pub async fn blacklisted_now(pool: &PgPool) -> Result<Vec<UserId>, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT user_id AS "user_id: UserId" FROM users
         WHERE blacklisted AND (blacklisted_until IS NULL OR blacklisted_until > now())"#
    )
    .fetch_all(pool)
    .await
}

/// Every user's `last_coupon_at`, where set.
pub async fn last_coupon_times(pool: &PgPool) -> Result<Vec<(UserId, DateTime<Utc>)>, sqlx::Error> {
    let rows = sqlx::query!(
        r#"SELECT user_id AS "user_id: UserId", last_coupon_at AS "last_coupon_at!"
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
    pub user_id: UserId,
    pub blacklisted: bool,
    pub blacklisted_until: Option<DateTime<Utc>>,
    pub blacklist_reason: Option<String>,
    pub blacklisted_at: Option<DateTime<Utc>>,
}

/// Users whose blacklist columns are not all empty.
pub async fn blacklist_columns(pool: &PgPool) -> Result<Vec<BlacklistColumns>, sqlx::Error> {
    sqlx::query_as!(
        BlacklistColumns,
        r#"SELECT user_id AS "user_id: UserId", blacklisted, blacklisted_until, blacklist_reason,
                  blacklisted_at
           FROM users
           WHERE blacklisted OR blacklisted_until IS NOT NULL OR blacklist_reason IS NOT NULL
              OR blacklisted_at IS NOT NULL"#
    )
    .fetch_all(pool)
    .await
}

/// A user's blacklist entry.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BlacklistEntry {
    pub user_id: UserId,
    /// `None`: until removed.
    pub blacklisted_until: Option<DateTime<Utc>>,
    pub blacklist_reason: Option<String>,
    pub blacklisted_at: Option<DateTime<Utc>>,
}

/// Blacklists `user_id` until `until` (`None`: until removed). A current
/// entry is extended, never shortened; with `keep_current`, a current entry
/// is left as it is and `None` is returned (an automatic block of a user an
/// operator already blacklisted).
pub async fn blacklist(
    conn: &mut sqlx::PgConnection,
    user_id: &UserId,
    until: Option<DateTime<Utc>>,
    reason: &str,
    keep_current: bool,
) -> Result<Option<BlacklistEntry>, sqlx::Error> {
    sqlx::query_as!(
        BlacklistEntry,
        r#"INSERT INTO users (user_id, blacklisted, blacklisted_until, blacklist_reason, blacklisted_at)
         VALUES ($1, true, $2, $3, now())
         ON CONFLICT (user_id) DO UPDATE SET
            blacklisted = true,
            blacklisted_until = CASE
                WHEN users.blacklisted AND users.blacklisted_until > now() AND EXCLUDED.blacklisted_until IS NOT NULL
                    THEN GREATEST(users.blacklisted_until, EXCLUDED.blacklisted_until)
                WHEN users.blacklisted AND users.blacklisted_until IS NULL THEN NULL
                ELSE EXCLUDED.blacklisted_until END,
            blacklist_reason = EXCLUDED.blacklist_reason,
            blacklisted_at = now()
         WHERE NOT $4 OR NOT (users.blacklisted
             AND (users.blacklisted_until IS NULL OR users.blacklisted_until > now()))
         RETURNING user_id AS "user_id: UserId", blacklisted_until, blacklist_reason, blacklisted_at"#,
        user_id as &UserId,
        until,
        reason,
        keep_current
    )
    .fetch_optional(conn)
    .await
}

/// `user_id`'s blacklist columns as they are.
pub async fn blacklist_entry(
    conn: &mut sqlx::PgConnection,
    user_id: &UserId,
) -> Result<BlacklistEntry, sqlx::Error> {
    sqlx::query_as!(
        BlacklistEntry,
        r#"SELECT user_id AS "user_id: UserId", blacklisted_until, blacklist_reason, blacklisted_at
           FROM users WHERE user_id = $1"#,
        user_id as &UserId
    )
    .fetch_one(conn)
    .await
}

/// Lifts `user_id`'s blacklisting; `false` when there was none.
pub async fn lift_blacklist(
    conn: &mut sqlx::PgConnection,
    user_id: &UserId,
) -> Result<bool, sqlx::Error> {
    let lifted = sqlx::query!(
        "UPDATE users SET blacklisted = false, blacklisted_until = NULL, blacklist_reason = NULL,
                          blacklisted_at = NULL
         WHERE user_id = $1 AND blacklisted",
        user_id as &UserId
    )
    .execute(conn)
    .await?
    .rows_affected();
    Ok(lifted > 0)
}

/// Current entries (expired ones are left out), by user id.
pub async fn blacklist_entries(pool: &PgPool) -> Result<Vec<BlacklistEntry>, sqlx::Error> {
    sqlx::query_as!(
        BlacklistEntry,
        r#"SELECT user_id AS "user_id: UserId", blacklisted_until, blacklist_reason, blacklisted_at
           FROM users
           WHERE blacklisted AND (blacklisted_until IS NULL OR blacklisted_until > now())
           ORDER BY user_id"#
    )
    .fetch_all(pool)
    .await
}

/// A committed blacklist change waiting for the log: its `BlacklistChanged`,
/// encoded with its envelope (the event id is fixed when it is written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    pub seq: i64,
    pub event_id: uuid::Uuid,
    pub user_id: UserId,
    pub payload: Vec<u8>,
}

/// Writes a change's event into the outbox, in the change's transaction.
pub async fn outbox_add(
    conn: &mut sqlx::PgConnection,
    event_id: uuid::Uuid,
    user_id: &UserId,
    payload: &[u8],
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "INSERT INTO blacklist_outbox (event_id, user_id, payload) VALUES ($1, $2, $3)",
        event_id,
        user_id as &UserId,
        payload
    )
    .execute(conn)
    .await
    .map(|_| ())
}

/// Up to `limit` changes waiting for the log (only `user_id`'s, when given),
/// oldest first, locked until the transaction ends: a second relay waits for
/// them and then finds them gone, and never publishes a later change of a
/// user before an earlier one.
pub async fn outbox_pending(
    conn: &mut sqlx::PgConnection,
    user_id: Option<&UserId>,
    limit: i64,
) -> Result<Vec<OutboxRow>, sqlx::Error> {
    sqlx::query_as!(
        OutboxRow,
        r#"SELECT seq, event_id, user_id AS "user_id: UserId", payload FROM blacklist_outbox
           WHERE $1::text IS NULL OR user_id = $1
           ORDER BY seq LIMIT $2 FOR UPDATE"#,
        user_id as Option<&UserId>,
        limit
    )
    .fetch_all(conn)
    .await
}

/// Removes changes that are on the log.
pub async fn outbox_done(conn: &mut sqlx::PgConnection, seqs: &[i64]) -> Result<(), sqlx::Error> {
    sqlx::query!("DELETE FROM blacklist_outbox WHERE seq = ANY($1)", seqs)
        .execute(conn)
        .await
        .map(|_| ())
}

/// How many changes wait for the log.
pub async fn outbox_len(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM blacklist_outbox"#)
        .fetch_one(pool)
        .await
}

/// Lifts up to `limit` entries whose end has passed (by the database's
/// clock) and returns their users. Rows another transaction holds are
/// skipped (a change of that user decides them); an entry extended in the
/// meantime is left, as the end is checked again on the locked row.
pub async fn lift_expired(
    conn: &mut sqlx::PgConnection,
    limit: i64,
) -> Result<Vec<UserId>, sqlx::Error> {
    sqlx::query_scalar!(
        r#"UPDATE users SET blacklisted = false, blacklisted_until = NULL,
                            blacklist_reason = NULL, blacklisted_at = NULL
           WHERE user_id IN (
               SELECT user_id FROM users
               WHERE blacklisted AND blacklisted_until IS NOT NULL AND blacklisted_until <= now()
               ORDER BY blacklisted_until LIMIT $1 FOR UPDATE SKIP LOCKED)
             AND blacklisted AND blacklisted_until <= now()
           RETURNING user_id AS "user_id: UserId""#,
        limit
    )
    .fetch_all(conn)
    .await
}

/// Users with committed blacklist changes not yet on the log: an audit
/// leaves them out (the log will catch up with the live entry).
pub async fn blacklist_pending_users(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar!("SELECT DISTINCT user_id FROM blacklist_outbox")
        .fetch_all(pool)
        .await
}

/// A profile as the profiles processor projects it (`UserProfileUpdated`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileUpdate {
    pub user_id: UserId,
    pub profile: coupon_domain::Profile,
    pub updated_at: DateTime<Utc>,
    pub event_id: String,
}

/// Writes profiles, each only over an older one: the later `updated_at`
/// (then the larger event id) wins, so a redelivered, replayed or late
/// event changes nothing. One statement for the batch; `updates` must name
/// each user once (the caller keeps each user's latest). Returns the rows
/// written.
pub async fn upsert_profiles(
    conn: &mut sqlx::PgConnection,
    updates: &[ProfileUpdate],
) -> Result<u64, sqlx::Error> {
    if updates.is_empty() {
        return Ok(0);
    }
    let result = sqlx::query!(
        r#"INSERT INTO users (user_id, name, dob, location, profile_updated_at, profile_event_id)
           SELECT * FROM UNNEST($1::text[], $2::text[], $3::date[], $4::text[],
                                $5::timestamptz[], $6::text[])
           ON CONFLICT (user_id) DO UPDATE
           SET name = EXCLUDED.name, dob = EXCLUDED.dob, location = EXCLUDED.location,
               profile_updated_at = EXCLUDED.profile_updated_at,
               profile_event_id = EXCLUDED.profile_event_id
           WHERE users.profile_updated_at IS NULL
              OR (EXCLUDED.profile_updated_at, EXCLUDED.profile_event_id)
                 > (users.profile_updated_at, users.profile_event_id)"#,
        &updates.iter().map(|u| &u.user_id).collect::<Vec<_>>() as &[&UserId],
        updates
            .iter()
            .map(|u| u.profile.name.clone())
            .collect::<Vec<_>>() as _,
        updates.iter().map(|u| u.profile.dob).collect::<Vec<_>>() as _,
        updates
            .iter()
            .map(|u| u.profile.location.clone())
            .collect::<Vec<_>>() as _,
        &updates.iter().map(|u| u.updated_at).collect::<Vec<_>>(),
        &updates
            .iter()
            .map(|u| u.event_id.clone())
            .collect::<Vec<_>>(),
    )
    .execute(conn)
    .await?;
    Ok(result.rows_affected())
}

/// The profiles of `user_ids` that have one (the claim processor's
/// eligibility), in one round trip.
pub async fn profiles_of(
    conn: &mut sqlx::PgConnection,
    user_ids: &[&UserId],
) -> Result<std::collections::HashMap<UserId, coupon_domain::Profile>, sqlx::Error> {
    let rows = sqlx::query!(
        r#"SELECT user_id AS "user_id: UserId", name, dob, location FROM users
           WHERE user_id = ANY($1) AND profile_updated_at IS NOT NULL"#,
        user_ids as &[&UserId]
    )
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let profile = coupon_domain::Profile {
                name: r.name,
                dob: r.dob,
                location: r.location,
            };
            (r.user_id, profile)
        })
        .collect())
}

/// Every stored profile with its time and event id (the audit's and the
/// tests' view), by user id.
pub async fn all_profiles<'e>(
    pool: impl sqlx::PgExecutor<'e>,
) -> Result<Vec<ProfileUpdate>, sqlx::Error> {
    let rows = sqlx::query!(
        r#"SELECT user_id AS "user_id: UserId", name, dob, location,
                  profile_updated_at AS "updated_at!", profile_event_id AS "event_id!"
           FROM users WHERE profile_updated_at IS NOT NULL ORDER BY user_id"#
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| ProfileUpdate {
            user_id: r.user_id,
            profile: coupon_domain::Profile {
                name: r.name,
                dob: r.dob,
                location: r.location,
            },
            updated_at: r.updated_at,
            event_id: r.event_id,
        })
        .collect())
}
