//! Analysts' view of the history sink: every `coupon_history` row of a user
//! or a coupon, in time order.
//!
//! The table is partitioned by month on `occurred_at`; the time bounds are
//! plain comparisons on that column, so Postgres prunes the months outside
//! them, and the `(user_id, occurred_at)` / `(coupon_code, occurred_at)`
//! indexes serve the rest.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use coupon_domain::CouponCode;
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

/// The rows matching `filter`, oldest first (ties in the order they were
/// written by one event).
pub async fn query(
    pool: &PgPool,
    filter: &HistoryFilter,
) -> Result<Vec<HistoryEntry>, sqlx::Error> {
    // Codes are accepted as people type them (lower case, I/L for 1, O for 0).
    let coupon = filter.coupon.as_deref().map(|raw| {
        CouponCode::parse(raw)
            .map(|c| c.to_string())
            .unwrap_or_else(|_| raw.to_owned())
    });
    store::history::entries(
        pool,
        filter.user.as_deref(),
        coupon.as_deref(),
        filter.since,
        filter.until,
    )
    .await
}
