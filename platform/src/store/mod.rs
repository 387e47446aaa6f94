//! Persistence: one module per table family, so a newcomer finds every
//! statement on a table in one place and no SQL sits in an HTTP handler or a
//! tool.
//!
//! | module        | tables                                              |
//! |---------------|-----------------------------------------------------|
//! | [`coupons`]   | `coupons`                                           |
//! | [`users`]     | `users` (the blacklist, `last_coupon_at`)           |
//! | [`decisions`] | `claim_decisions`, `purchase_decisions`, `quota_grants` |
//! | [`history`]   | `coupon_history` (the sink's appends, the analysts' reads) |
//! | [`leases`]    | `snowflake_leases` (machine ids of the Snowflake ids) |
//! | [`console`]   | the web console's reads of `coupons` (batches) and `coupon_history` (analytics) |
//!
//! The statements here are compile-checked (`sqlx::query!`, `query_as!`)
//! against the migrations: their offline data is committed in `.sqlx/`, and
//! builds read it (`SQLX_OFFLINE=true` in `.cargo/config.toml`), so building
//! needs no database. After changing a query or a migration, `make sqlx`
//! regenerates `.sqlx/` against a fresh migrated database.
//!
//! Here: the coupon projector's bulk insert, the purchase processor's and
//! the expiry's statements, the blacklist, the machine-id leases, the
//! history sink's appends and the
//! analysts' history query, the gateway's reads, the audit's and the
//! benchmarks'. Compile-checked too, in modules of their own: the claim
//! processor's batch statements (`consumers/src/claims/store.rs`) and the
//! counts of `coupon_platform::stats`. Not yet compile-checked: the bulk
//! inserts of the coupon projector (`insert_coupons`) and of the history sink
//! (`append`, their COPY fast paths included), the rebuild's bulk writes and
//! the console's reads; they still use unchecked
//! `sqlx::query`.

pub mod console;
pub mod coupons;
pub mod decisions;
pub mod history;
pub mod leases;
pub mod users;

/// Whether Postgres answers a trivial statement (the health check).
pub async fn ping(pool: &sqlx::PgPool) -> bool {
    sqlx::query!("SELECT 1 AS one")
        .fetch_one(pool)
        .await
        .is_ok()
}
