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
