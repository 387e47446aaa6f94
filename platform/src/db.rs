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
    partitions_ahead(pool).await?;
    Ok(())
}

/// Creates the history partitions of this month and the next two, and the
/// decision and quota partitions of yesterday to a week ahead, if they are
/// missing (the processes of the history sink and the claim processor
/// repeat it while running).
pub async fn partitions_ahead(pool: &PgPool) -> Result<(), sqlx::Error> {
    partitions_ahead_from(pool, chrono::Utc::now().date_naive()).await
}

/// [`partitions_ahead`] as it runs on `today` (UTC): the history partitions
/// of `today`'s month and the next two; the daily decision and quota
/// partitions from the day before `today` (a claim is judged up to its
/// grace in the past) to a week after it.
pub async fn partitions_ahead_from(
    pool: &PgPool,
    today: chrono::NaiveDate,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT ensure_history_partitions($1, 3)")
        .bind(today)
        .execute(pool)
        .await?;
    let yesterday = today.pred_opt().unwrap_or(today);
    crate::store::retention::decision_partitions(pool, yesterday, DAYS_AHEAD + 2).await?;
    Ok(())
}

/// Makes the partitions the rows of a log from `first` to `last` go to, in
/// a fresh database a rebuild writes into: the daily decision and quota
/// partitions of those days (and the day before: a quota window starts up
/// to a window before its grant) and the history's months, so that a
/// rebuilt database put live has its old days in partitions retention
/// drops, not in the default ones. At most the last [`REBUILT_DAYS`] days
/// before `last` get partitions of their own; older rows (a log spanning
/// years, a producer's clock far off) go to the default partitions.
pub async fn partitions_covering(
    pool: &PgPool,
    first: chrono::DateTime<chrono::Utc>,
    last: chrono::DateTime<chrono::Utc>,
) -> Result<(), sqlx::Error> {
    use chrono::Datelike as _;
    let last_day = last.date_naive();
    let earliest = last_day - chrono::Days::new(REBUILT_DAYS);
    let from = (first.date_naive() - chrono::Days::new(1)).clamp(earliest, last_day);
    let days = (last_day - from).num_days() + 1;
    crate::store::retention::decision_partitions(pool, from, days as i32).await?;
    let months = (last_day.year() * 12 + last_day.month0() as i32)
        - (from.year() * 12 + from.month0() as i32)
        + 1;
    sqlx::query("SELECT ensure_history_partitions($1, $2)")
        .bind(from)
        .bind(months)
        .execute(pool)
        .await?;
    Ok(())
}

/// How far back before its last record a rebuilt log's days get partitions.
const REBUILT_DAYS: u64 = 400;

/// How many days ahead the decision and quota partitions are made: an
/// upkeep that stops for less than this leaves no day's rows in the
/// default partition.
const DAYS_AHEAD: i32 = 7;

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

/// Whether `error` is what a Postgres failover looks like to a client (the
/// leader crashed, was demoted or is being switched over, and HAProxy moves
/// the write port to the new leader): the connection was refused, reset or
/// cut (`Io`, a protocol message cut short, a pool whose connections all
/// failed), or the server said so: `25006` read_only_sql_transaction (a
/// write reached a member that is, or just became, a replica), `57P01`
/// admin_shutdown, `57P02` crash_shutdown, `57P03` cannot_connect_now (a
/// member starting or in recovery), or any connection exception (class
/// `08`). All of them are transient ([`is_permanent`] is false): the batch
/// loop retries the batch with backoff, and a batch re-run on the new leader
/// decides nothing twice (decisions are stored by request id, in the same
/// transaction as their effects). With synchronous replication a commit the
/// client saw succeed is on the standby Patroni promotes; a commit whose
/// answer was lost with the connection either is there too (the re-run finds
/// its decision) or is not (the re-run decides it for the first time).
pub fn is_failover(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            matches!(code.as_ref(), "25006" | "57P01" | "57P02" | "57P03") || code.starts_with("08")
        }),
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) | sqlx::Error::PoolTimedOut => true,
        sqlx::Error::Tls(_) => true,
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

    /// A server error with a SQLSTATE, as Postgres sends one.
    #[derive(Debug)]
    struct ServerError(&'static str);

    impl std::fmt::Display for ServerError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "SQLSTATE {}", self.0)
        }
    }

    impl std::error::Error for ServerError {}

    impl sqlx::error::DatabaseError for ServerError {
        fn message(&self) -> &str {
            "server error"
        }
        fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
            Some(self.0.into())
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    fn server(code: &'static str) -> sqlx::Error {
        sqlx::Error::Database(Box::new(ServerError(code)))
    }

    fn io(kind: std::io::ErrorKind) -> sqlx::Error {
        sqlx::Error::Io(std::io::Error::from(kind))
    }

    #[test]
    fn what_a_failover_produces_is_transient() {
        let failover = [
            io(std::io::ErrorKind::ConnectionRefused),
            io(std::io::ErrorKind::ConnectionReset),
            io(std::io::ErrorKind::ConnectionAborted),
            io(std::io::ErrorKind::UnexpectedEof),
            io(std::io::ErrorKind::BrokenPipe),
            sqlx::Error::Protocol("unexpected end of message".into()),
            sqlx::Error::PoolTimedOut,
            // read_only_sql_transaction: a write on a member that is a replica now.
            server("25006"),
            // admin_shutdown (fast shutdown: switchover, demotion), crash_shutdown,
            // cannot_connect_now (starting up, in recovery).
            server("57P01"),
            server("57P02"),
            server("57P03"),
            // connection_exception and its subclasses.
            server("08000"),
            server("08003"),
            server("08006"),
            server("08001"),
            server("08004"),
        ];
        for error in &failover {
            assert!(is_failover(error), "{error:?} is a failover");
            assert!(!is_permanent(error), "{error:?} must be retried");
        }
    }

    #[test]
    fn conflicts_are_transient_and_bad_values_permanent_but_neither_is_a_failover() {
        for code in ["40001", "40P01", "55P03", "57014"] {
            assert!(!is_permanent(&server(code)), "{code} is retried");
            assert!(!is_failover(&server(code)), "{code} is no failover");
        }
        for code in ["22001", "22P02", "23505", "23503", "54000"] {
            assert!(is_permanent(&server(code)), "{code} fails again");
            assert!(!is_failover(&server(code)), "{code} is no failover");
        }
        assert!(is_permanent(&sqlx::Error::Decode("bad".into())));
        assert!(!is_failover(&sqlx::Error::RowNotFound));
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
