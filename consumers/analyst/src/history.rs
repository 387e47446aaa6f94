//! Analysts' view of the history sink: every `coupon_history` row of a user
//! or a coupon, in time order.
//!
//! The table is partitioned by month on `occurred_at`; the time bounds are
//! plain comparisons on that column, so Postgres prunes the months outside
//! them, and the `(user_id, occurred_at)` / `(coupon_code, occurred_at)`
//! indexes serve the rest.

use std::fmt;

use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::PgPool;

use coupon_domain::CouponCode;

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

/// One history row.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct HistoryEntry {
    pub occurred_at: DateTime<Utc>,
    pub kind: String,
    pub coupon_code: Option<String>,
    pub user_id: Option<String>,
    pub detail: Option<serde_json::Value>,
}

impl fmt::Display for HistoryEntry {
    /// `time  kind  coupon  user  detail`, tab separated; `-` for none.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let detail = self
            .detail
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_else(|| "{}".into());
        write!(
            f,
            "{}\t{}\t{}\t{}\t{}",
            self.occurred_at
                .to_rfc3339_opts(SecondsFormat::Millis, true),
            self.kind,
            self.coupon_code.as_deref().unwrap_or("-"),
            self.user_id.as_deref().unwrap_or("-"),
            detail
        )
    }
}

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
    sqlx::query_as(
        "SELECT occurred_at, kind, coupon_code, user_id, detail FROM coupon_history
         WHERE ($1::text IS NULL OR user_id = $1)
           AND ($2::text IS NULL OR coupon_code = $2)
           AND occurred_at >= COALESCE($3::timestamptz, '-infinity')
           AND occurred_at <= COALESCE($4::timestamptz, 'infinity')
         ORDER BY occurred_at, event_id, item",
    )
    .bind(filter.user.as_deref())
    .bind(coupon)
    .bind(filter.since)
    .bind(filter.until)
    .fetch_all(pool)
    .await
}
