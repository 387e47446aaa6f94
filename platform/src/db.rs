//! Postgres: the pool and the migrations.
//!
//! Postgres is the authority for coupon state, holds (with their durable
//! deadlines), quota and decisions. Every consumer writes to it in one
//! transaction per batch, keyed so that a redelivered batch changes nothing.

use std::time::Duration;

use sqlx::migrate::{MigrateError, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid database url: {0}")]
    BadUrl(sqlx::Error),
    #[error("cannot connect to Postgres: {0}")]
    Connect(sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] MigrateError),
    #[error("postgres: {0}")]
    Query(#[from] sqlx::Error),
}

/// A pool that waits at most 5 s for a connection, so an outage surfaces as
/// an error (and a retried batch) rather than a hang.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, DbError> {
    let options: PgConnectOptions = url.parse().map_err(DbError::BadUrl)?;
    let options = options
        .log_statements(log::LevelFilter::Trace)
        .log_slow_statements(log::LevelFilter::Debug, Duration::from_millis(500));
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await
        .map_err(DbError::Connect)
}

/// Applies pending migrations (safe to run concurrently: sqlx takes an
/// advisory lock) and makes sure history partitions exist ahead of time.
pub async fn migrate(pool: &PgPool) -> Result<(), DbError> {
    MIGRATOR.run(pool).await?;
    sqlx::query("SELECT ensure_history_partitions(now()::date, 3)")
        .execute(pool)
        .await?;
    Ok(())
}

/// Whether a failed statement failed because of the values it was given,
/// so that running it again with the same values fails again: data
/// exceptions (class 22: a NUL in text, a number or time out of range),
/// integrity constraint violations (class 23) and program limits a value
/// exceeds (class 54: an index row too large), and values that cannot be
/// encoded or decoded. Everything else (connections, timeouts, deadlocks,
/// serialization conflicts, shutdowns, and schema mismatches after a bad
/// deploy, which a fix of the deployment cures) is transient.
pub fn is_permanent(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| matches!(code.get(..2), Some("22" | "23" | "54"))),
        sqlx::Error::Encode(_) | sqlx::Error::Decode(_) | sqlx::Error::ColumnDecode { .. } => true,
        _ => false,
    }
}

/// Creates the database `name` on `admin`'s server (scratch databases of
/// the audit, the demo and the benchmarks; the role needs CREATEDB).
pub async fn create_database(admin: &PgPool, name: &str) -> Result<(), sqlx::Error> {
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(admin)
        .await
        .map(|_| ())
}

/// Drops the database `name` at once, closing its connections.
pub async fn drop_database(admin: &PgPool, name: &str) -> Result<(), sqlx::Error> {
    sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .execute(admin)
        .await
        .map(|_| ())
}

/// Drops the database `name` once its last connection is gone (a closed pool
/// may still be finishing a connection's release), forcing it after a while.
pub async fn drop_database_when_idle(admin: &PgPool, name: &str) -> Result<(), sqlx::Error> {
    let plain = format!("DROP DATABASE IF EXISTS \"{name}\"");
    for _ in 0..20 {
        match sqlx::query(&plain).execute(admin).await {
            Ok(_) => return Ok(()),
            // 55006: object_in_use (another session is still connected).
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55006") => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e),
        }
    }
    drop_database(admin, name).await
}

/// Hides the password in a connection URL for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &credentials[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
