//! The `snowflake_leases` table: which process holds which (datacenter,
//! machine) pair of the Snowflake ids, until when, and the last millisecond
//! it used (so the next holder never goes back in time).

use std::time::Duration;

use sqlx::PgPool;

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Takes a free (or expired) machine id of `datacenter` for `owner` until
/// `ttl` from now, trying the ids from `start` on; returns the machine id
/// and the last millisecond its previous holder used, or `None` when every
/// id was taken (or a concurrent leaser won the race).
pub async fn take(
    pool: &PgPool,
    datacenter: i16,
    owner: &str,
    ttl: Duration,
    start: i32,
) -> Result<Option<(i16, i64)>, sqlx::Error> {
    let row = sqlx::query!(
        "INSERT INTO snowflake_leases (datacenter_id, machine_id, owner, expires_at)
         SELECT $1, m, $2, now() + $3::bigint * interval '1 millisecond'
         FROM generate_series(0, 31) AS m
         WHERE NOT EXISTS (SELECT 1 FROM snowflake_leases l
                           WHERE l.datacenter_id = $1 AND l.machine_id = m AND l.expires_at > now())
         ORDER BY (m + $4::int) % 32 LIMIT 1
         ON CONFLICT (datacenter_id, machine_id) DO UPDATE
            SET owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at
            WHERE snowflake_leases.expires_at <= now()
         RETURNING machine_id, last_ms",
        datacenter,
        owner,
        millis(ttl),
        start
    )
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| (r.machine_id, r.last_ms)))
}

/// Whether `datacenter` has a machine id no live lease holds.
pub async fn any_free(pool: &PgPool, datacenter: i16) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT count(*) < 32 AS "free!" FROM snowflake_leases
           WHERE datacenter_id = $1 AND expires_at > now()"#,
        datacenter
    )
    .fetch_one(pool)
    .await
}

/// Extends `owner`'s lease by `ttl` from now, recording `last_ms`; `false`
/// when `owner` no longer holds it.
pub async fn renew(
    pool: &PgPool,
    datacenter: i16,
    machine: i16,
    owner: &str,
    ttl: Duration,
    last_ms: i64,
) -> Result<bool, sqlx::Error> {
    let updated = sqlx::query!(
        "UPDATE snowflake_leases SET expires_at = now() + $4::bigint * interval '1 millisecond', last_ms = $5
         WHERE datacenter_id = $1 AND machine_id = $2 AND owner = $3",
        datacenter,
        machine,
        owner,
        millis(ttl),
        last_ms
    )
    .execute(pool)
    .await?
    .rows_affected();
    Ok(updated > 0)
}

/// Gives `owner`'s lease back, recording the last millisecond used.
pub async fn release(
    pool: &PgPool,
    datacenter: i16,
    machine: i16,
    owner: &str,
    last_ms: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE snowflake_leases SET expires_at = now(), last_ms = GREATEST(last_ms, $4)
         WHERE datacenter_id = $1 AND machine_id = $2 AND owner = $3",
        datacenter,
        machine,
        owner,
        last_ms
    )
    .execute(pool)
    .await?;
    Ok(())
}
