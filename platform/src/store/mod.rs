//! Persistence: one module per table family, so a newcomer finds every
//! statement on a table in one place and no SQL sits in an HTTP handler or a
//! tool.
//!
//! | module        | tables                                              |
//! |---------------|-----------------------------------------------------|
//! | [`coupons`]   | `coupons`                                           |
//! | [`campaigns`] | `campaigns` (one row per batch with a campaign)     |
//! | [`claims`]    | the claim processor's batch: decisions, user states, overdue holds, grants |
//! | [`users`]     | `users` (the blacklist, `last_coupon_at`)           |
//! | [`decisions`] | `claim_decisions`, `purchase_decisions`, `quota_grants` |
//! | [`history`]   | `coupon_history` (the sink's appends, the analysts' reads), `history_outbox` (releases on their way to Cassandra) |
//! | [`leases`]    | `snowflake_leases` (machine ids of the Snowflake ids) |
//! | [`releases`]  | `releases` (batches released with an idempotency key) |
//! | [`stats`]     | counts of `coupons`, `coupon_history`, `claim_decisions`, `quota_grants` (`status`, the gauges, the demo) |
//! | [`console`]   | the web console's reads of `coupons` (batches) and `coupon_history` (analytics) |
//! | [`rebuild`]   | the rebuild's bulk writes of `coupons`, `users`, `quota_grants`, `purchase_decisions` |
//! | [`replication`] | WAL positions (the audit waits for a replica to catch up) |
//! | [`retention`] | the partitions of `claim_decisions`, `quota_grants` and `coupon_history`: made ahead, dropped when expired; `retention_floors` |
//!
//! The statements here are compile-checked (`sqlx::query!`, `query_as!`)
//! against the migrations: their offline data is committed in `.sqlx/`, and
//! builds read it (`SQLX_OFFLINE=true` in `.cargo/config.toml`), so building
//! needs no database. After changing a query or a migration, `make sqlx`
//! regenerates `.sqlx/` against a fresh migrated database.
//!
//! Every statement on the tables is here and compile-checked. Not checked: the binary `COPY` fast paths
//! (`crate::pgcopy`; sqlx cannot describe a `COPY`) and the DDL on scratch
//! databases (`crate::db`).
//!
//! Ids and codes are bound and read as their domain types (`UserId`,
//! `CouponCode`, `OrderId`, ...: text columns through their `sqlx::Type`,
//! with `"col: Type"` overrides in the statements), so an id parsed at the
//! boundary stays typed to the row.

pub mod campaigns;
pub mod claims;
pub mod console;
pub mod coupons;
pub mod decisions;
pub mod history;
pub mod leases;
pub mod rebuild;
pub mod releases;
pub mod replication;
pub mod retention;
pub mod statistics;
pub mod stats;
pub mod users;

/// The database's clock, read in a batch's transaction: `now()` is the
/// transaction's start, so every statement of the batch agrees on it.
pub async fn db_now(
    conn: &mut sqlx::PgConnection,
) -> Result<chrono::DateTime<chrono::Utc>, sqlx::Error> {
    sqlx::query_scalar!(r#"SELECT now() AS "now!""#)
        .fetch_one(conn)
        .await
}

/// Whether Postgres answers a trivial statement (the health check).
pub async fn ping(pool: &sqlx::PgPool) -> bool {
    sqlx::query!("SELECT 1 AS one")
        .fetch_one(pool)
        .await
        .is_ok()
}
