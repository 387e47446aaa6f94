//! Analysts' view of the history sink: every history row of a user or a
//! coupon, in time order, from the store the history is kept in
//! (`HISTORY_STORE`).
//!
//! Postgres: the `coupon_history` table is partitioned by month on
//! `occurred_at`; the time bounds are plain comparisons on that column, so
//! Postgres prunes the months outside them, and the `(user_id,
//! occurred_at)` / `(coupon_code, occurred_at)` indexes serve the rest.
//! Cassandra: one partition of `history_by_user` or `history_by_coupon`,
//! its clustering order (time) bounded by the range
//! (`coupon_platform::cassandra`).

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use coupon_domain::CouponCode;
use coupon_platform::cassandra::{CassandraError, CassandraHistory};
use coupon_platform::store;

/// Which rows to show. At least one of `user` and `coupon` should be set.
#[derive(Debug, Clone, Default)]
pub struct HistoryFilter {
    pub user: Option<String>,
    pub coupon: Option<String>,
    /// Rows at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Rows at or before this time.
    pub until: Option<DateTime<Utc>>,
}

pub use coupon_platform::store::history::HistoryEntry;

/// Where the history is read.
#[derive(Debug, Clone)]
pub enum HistorySource {
    Postgres(PgPool),
    Cassandra(CassandraHistory),
}

#[derive(Debug, thiserror::Error)]
pub enum HistoryReadError {
    #[error("reading coupon_history in Postgres")]
    Postgres(#[from] sqlx::Error),
    #[error("reading the history in Cassandra")]
    Cassandra(#[from] CassandraError),
}

/// The rows matching `filter`, oldest first (ties in the order they were
/// written by one event).
pub async fn query(
    source: &HistorySource,
    filter: &HistoryFilter,
) -> Result<Vec<HistoryEntry>, HistoryReadError> {
    // Codes are accepted as people type them (lower case, I/L for 1, O for 0).
    let coupon = filter.coupon.as_deref().map(|raw| {
        CouponCode::parse(raw)
            .map(|c| c.to_string())
            .unwrap_or_else(|_| raw.to_owned())
    });
    let (user, coupon) = (filter.user.as_deref(), coupon.as_deref());
    Ok(match source {
        HistorySource::Postgres(pool) => {
            store::history::entries(pool, user, coupon, filter.since, filter.until).await?
        }
        HistorySource::Cassandra(store) => {
            store
                .entries(user, coupon, filter.since, filter.until)
                .await?
        }
    })
}

/// The keys (`event_id`, `item`) of every row between `since` and `until`
/// (inclusive), from the store the history is kept in (Cassandra: its time
/// table, one read per hour bucket and shard).
pub async fn keys_between(
    source: &HistorySource,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<Vec<(uuid::Uuid, i32)>, HistoryReadError> {
    Ok(match source {
        HistorySource::Postgres(pool) => store::history::keys_between(pool, since, until).await?,
        HistorySource::Cassandra(store) => store.keys_between(since, until).await?,
    })
}
