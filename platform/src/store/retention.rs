//! Retention: how rows leave `claim_decisions`, `quota_grants` and
//! `coupon_history`, and where the live database's kept rows begin.
//!
//! The three tables are range-partitioned by time (decisions and quota by
//! UTC day, the history by month; `migrations/20261206000003_retention.sql`),
//! so rows leave a whole partition at a time by `DROP TABLE`: no DELETE, no
//! scan, no vacuum debt, at a cost that does not grow with the rows. A
//! partition goes once every row it can hold is older than its window plus
//! the retention: a decision `DECISION_RETENTION` after it was decided, a
//! quota slot `DECISION_RETENTION` after its window ended (the quota rule
//! only reads the current window), a history month `HISTORY_RETENTION`
//! after it ended (unset: kept for ever). The default partitions are never
//! dropped.
//!
//! Each drop raises the table's floor in `retention_floors` in the same
//! statement: the audit compares the live database with the log from there
//! on, since the log (kept for ever) still holds what retention removed.

use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::PgPool;

/// How long rows are kept (`DECISION_RETENTION`, `HISTORY_RETENTION`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// A claim decision after it was decided; a quota slot after its window ended.
    pub decisions: Duration,
    /// A history row after it occurred (`None`: kept for ever).
    pub history: Option<Duration>,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            decisions: crate::settings::DECISION_RETENTION,
            history: None,
        }
    }
}

/// The times before which rows may leave, per table: a partition whose
/// upper bound is at or before its cutoff is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cutoffs {
    pub decisions: DateTime<Utc>,
    pub quota: DateTime<Utc>,
    pub history: Option<DateTime<Utc>>,
}

impl Retention {
    /// The cutoffs at `now` for quota windows `quota_window` long: a slot's
    /// window starts at most one window before it ends.
    pub fn cutoffs(&self, now: DateTime<Utc>, quota_window: Duration) -> Cutoffs {
        let decisions = before(now, self.decisions);
        Cutoffs {
            decisions,
            quota: before(decisions, quota_window),
            history: self.history.map(|keep| before(now, keep)),
        }
    }
}

/// `at` less `span`; the Unix epoch when that underflows or is earlier
/// (Postgres' `timestamptz` cannot take chrono's earliest time, and no
/// partition ends before 1970).
fn before(at: DateTime<Utc>, span: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(span)
        .ok()
        .and_then(|span| at.checked_sub_signed(span))
        .map_or(DateTime::<Utc>::UNIX_EPOCH, |t| {
            t.max(DateTime::<Utc>::UNIX_EPOCH)
        })
}

/// The partitions one round of [`drop_expired`] dropped, by table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dropped {
    pub decisions: Vec<String>,
    pub quota: Vec<String>,
    pub history: Vec<String>,
}

impl Dropped {
    pub fn is_empty(&self) -> bool {
        self.decisions.is_empty() && self.quota.is_empty() && self.history.is_empty()
    }
}

/// Creates the daily partitions of `claim_decisions` and `quota_grants` for
/// the UTC days from `from` on, `days` of them (those missing); returns how
/// many it made.
pub async fn decision_partitions(
    pool: &PgPool,
    from: NaiveDate,
    days: i32,
) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT ensure_decision_partitions($1, $2) AS "made!""#,
        from,
        days
    )
    .fetch_one(pool)
    .await
}

/// Drops the partitions past their retention at `cutoffs` (one statement
/// per table, each raising that table's floor).
pub async fn drop_expired(pool: &PgPool, cutoffs: &Cutoffs) -> Result<Dropped, sqlx::Error> {
    let mut dropped = Dropped {
        decisions: drop_before(pool, "claim_decisions", cutoffs.decisions).await?,
        quota: drop_before(pool, "quota_grants", cutoffs.quota).await?,
        history: Vec::new(),
    };
    if let Some(cutoff) = cutoffs.history {
        dropped.history = drop_before(pool, "coupon_history", cutoff).await?;
    }
    Ok(dropped)
}

async fn drop_before(
    pool: &PgPool,
    table: &str,
    cutoff: DateTime<Utc>,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT name AS "name!" FROM drop_partitions_before($1, $2) AS name"#,
        table,
        cutoff
    )
    .fetch_all(pool)
    .await
}

/// Where the kept rows of each table begin (`None`: nothing was dropped).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Floors {
    pub decisions: Option<DateTime<Utc>>,
    pub quota: Option<DateTime<Utc>>,
    pub history: Option<DateTime<Utc>>,
}

/// The floors retention left in `pool`'s database.
pub async fn floors(pool: &PgPool) -> Result<Floors, sqlx::Error> {
    let rows = sqlx::query!("SELECT table_name, kept_from FROM retention_floors")
        .fetch_all(pool)
        .await?;
    let mut floors = Floors::default();
    for row in rows {
        match row.table_name.as_str() {
            "claim_decisions" => floors.decisions = Some(row.kept_from),
            "quota_grants" => floors.quota = Some(row.kept_from),
            "coupon_history" => floors.history = Some(row.kept_from),
            _ => {}
        }
    }
    Ok(floors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn quota_slots_are_kept_a_window_longer_than_decisions() {
        let now = Utc.with_ymd_and_hms(2026, 12, 6, 12, 0, 0).unwrap();
        let retention = Retention {
            decisions: 35 * DAY,
            history: None,
        };
        let cut = retention.cutoffs(now, DAY);
        assert_eq!(
            cut.decisions,
            Utc.with_ymd_and_hms(2026, 11, 1, 12, 0, 0).unwrap()
        );
        assert_eq!(
            cut.quota,
            Utc.with_ymd_and_hms(2026, 10, 31, 12, 0, 0).unwrap()
        );
        assert_eq!(cut.history, None);
        let keep_a_year = Retention {
            history: Some(365 * DAY),
            ..retention
        };
        assert_eq!(
            keep_a_year.cutoffs(now, DAY).history,
            Some(Utc.with_ymd_and_hms(2025, 12, 6, 12, 0, 0).unwrap())
        );
    }

    #[test]
    fn an_absurd_span_keeps_everything_rather_than_overflow_postgres() {
        let now = Utc.with_ymd_and_hms(2026, 12, 6, 0, 0, 0).unwrap();
        let forever = Retention {
            decisions: Duration::MAX,
            history: Some(Duration::MAX),
        };
        let cut = forever.cutoffs(now, DAY);
        assert_eq!(cut.decisions, DateTime::<Utc>::UNIX_EPOCH);
        assert_eq!(cut.history, Some(DateTime::<Utc>::UNIX_EPOCH));
    }
}
