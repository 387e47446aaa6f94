//! WAL positions: how far a replica has replayed the primary's writes.

use sqlx::PgPool;

/// The primary's current WAL position (`pg_lsn` as text).
pub async fn wal_position(primary: &PgPool) -> Result<String, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(primary)
        .await
}

/// Whether `replica` has replayed the WAL up to `lsn` (a server that is not
/// in recovery, the primary itself, has).
pub async fn replayed_up_to(replica: &PgPool, lsn: &str) -> Result<bool, sqlx::Error> {
    let replayed: Option<bool> = sqlx::query_scalar(
        "SELECT CASE WHEN pg_is_in_recovery()
                     THEN pg_last_wal_replay_lsn() >= $1::pg_lsn ELSE true END",
    )
    .bind(lsn)
    .fetch_one(replica)
    .await?;
    Ok(replayed == Some(true))
}
