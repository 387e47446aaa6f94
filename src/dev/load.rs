//! The loader of past days (issue #27 item 4): a whole day's claim
//! decisions, quota slots and history rows, written by binary `COPY` into
//! the day's partitions, so that a bench measures day 30 without living
//! through 29 days. `make bench` loads the database of its `couponctl run`
//! with it before the day-30 rows; `tests/it/retention_bench.rs` measures
//! the claim batch's statements over it.

use anyhow::Context as _;
use chrono::{DateTime, Days, NaiveDate, NaiveTime, TimeZone as _, Utc};
use uuid::Uuid;

use coupon_domain::claim::ClaimOutcomeKind;
use coupon_domain::{Category, HistoryKind, RequestId, UserId};
use coupon_platform::pgcopy::{copy_in, BinaryRows};
use coupon_platform::store::claims::{self, ClaimDecisionRecord};
use coupon_platform::store::history::{append_bulk, HistoryRow};
use coupon_platform::store::retention;

/// Rows per `COPY`.
const CHUNK: usize = 50_000;
const DAY_MS: i64 = 86_400_000;

/// The start of `day`, UTC.
pub fn midnight(day: NaiveDate) -> DateTime<Utc> {
    Utc.from_utc_datetime(&day.and_time(NaiveTime::MIN))
}

/// The stored decision of `user`'s claim `request` at `at`: granted (a
/// coupon of the category `Bench`, held five minutes) or sold out.
pub fn decision(
    request: String,
    user: String,
    at: DateTime<Utc>,
    granted: bool,
) -> anyhow::Result<ClaimDecisionRecord> {
    let category = if granted {
        Some(Category::parse("Bench")?)
    } else {
        None
    };
    Ok(ClaimDecisionRecord {
        request_id: RequestId::parse(request)?,
        event_id: Uuid::new_v4(),
        user_id: UserId::parse(user)?,
        outcome: if granted {
            ClaimOutcomeKind::Granted
        } else {
            ClaimOutcomeKind::SoldOut
        },
        coupon_code: None,
        category,
        expires_at: granted.then(|| at + chrono::Duration::minutes(5)),
        repeated: false,
        retry_at: None,
        blacklisted_until: None,
        decided_at: at,
    })
}

/// Loads `per_day` claims decided on `day`, spread over it: their
/// decisions (request ids `d<day>-<i>`, users `u<i>`), a quota slot for
/// each hundredth (granted), and a history row each, by binary `COPY`,
/// `CHUNK` rows at a time. The day's partitions must exist. Returns the
/// rows written.
pub async fn load_day(pool: &sqlx::PgPool, day: NaiveDate, per_day: usize) -> anyhow::Result<u64> {
    let start = midnight(day);
    let step = DAY_MS / per_day.max(1) as i64;
    let tag = day.format("%Y%m%d");
    let mut written = 0;
    for first in (0..per_day).step_by(CHUNK) {
        let range = first..(first + CHUNK).min(per_day);
        let at = |i: usize| start + chrono::Duration::milliseconds(i as i64 * step);
        let decisions = range
            .clone()
            .map(|i| decision(format!("d{tag}-{i}"), format!("u{i}"), at(i), i % 100 == 0))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut quota = BinaryRows::new(4, CHUNK / 100 * 60);
        for d in decisions
            .iter()
            .filter(|d| d.outcome == ClaimOutcomeKind::Granted)
        {
            quota
                .row()
                .text(d.user_id.as_str())
                .timestamptz(&start)
                .text(d.request_id.as_str())
                .timestamptz(&d.decided_at);
        }
        let history: Vec<HistoryRow> = decisions
            .iter()
            .map(|d| HistoryRow {
                occurred_at: d.decided_at,
                event_id: d.event_id,
                item: 0,
                coupon_code: None,
                user_id: Some(d.user_id.as_str().to_owned()),
                kind: if d.outcome == ClaimOutcomeKind::Granted {
                    HistoryKind::Granted
                } else {
                    HistoryKind::Rejected
                },
                detail: serde_json::json!({"request_id": d.request_id.as_str()}),
            })
            .collect();
        let (d, q, h) = tokio::join!(
            claims::copy_decisions(pool, &decisions),
            copy_in(
                pool,
                "COPY quota_grants (user_id, window_start, request_id, granted_at) \
                 FROM STDIN (FORMAT binary)",
                quota,
            ),
            append_bulk(pool, &history),
        );
        written += d.context("copying claim decisions")?
            + q.context("copying quota slots")?
            + h.context("copying history rows")?;
    }
    Ok(written)
}

/// What [`load_month`] wrote.
#[derive(Debug, Clone, Copy)]
pub struct Loaded {
    pub days: u32,
    pub rows: u64,
    /// The `COPY`s' time.
    pub seconds: f64,
    /// The vacuum, analyze and checkpoint after them.
    pub settled_seconds: f64,
}

/// Loads the `days` days before `today` ([`load_day`], their partitions
/// made first), then vacuums and analyzes the tables and checkpoints, as a
/// database that lived through those days would be: otherwise autovacuum's
/// vacuum of millions of new rows and the checkpoint's flush of them run
/// during the rows measured next and bill them.
pub async fn load_month(
    pool: &sqlx::PgPool,
    today: NaiveDate,
    days: u32,
    per_day: usize,
) -> anyhow::Result<Loaded> {
    let first = today
        .checked_sub_days(Days::new(days.into()))
        .context("a first day before the calendar")?;
    retention::decision_partitions(pool, first, days as i32 + 1)
        .await
        .context("making the days' partitions")?;
    let started = std::time::Instant::now();
    let mut rows = 0;
    for n in 0..days {
        let day = first
            .checked_add_days(Days::new(n.into()))
            .context("a day past the calendar")?;
        rows += load_day(pool, day, per_day)
            .await
            .with_context(|| format!("loading {day}"))?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let settling = std::time::Instant::now();
    sqlx::query("VACUUM (ANALYZE) claim_decisions, quota_grants, coupon_history")
        .execute(pool)
        .await
        .context("vacuuming the loaded tables")?;
    // The gigabytes just written are dirty pages the next checkpoint would
    // flush during whatever runs next; a role without the right to
    // checkpoint leaves that to Postgres.
    if let Err(error) = sqlx::query("CHECKPOINT").execute(pool).await {
        tracing::warn!(%error, "could not checkpoint after loading the month");
    }
    Ok(Loaded {
        days,
        rows,
        seconds,
        settled_seconds: settling.elapsed().as_secs_f64(),
    })
}
