//! Rows as Cassandra stores them: the hour and shard buckets of the time
//! table, a [`HistoryRow`] bound to the inserts, and a read row back as a
//! [`HistoryEntry`].

use chrono::{DateTime, TimeZone, Timelike, Utc};
use scylla::statement::prepared::PreparedStatement;
use uuid::Uuid;

use super::TIME_SHARDS;
use crate::store::history::{HistoryEntry, HistoryRow};

/// The earliest and latest times a CQL `timestamp` bound takes here.
pub(super) fn epoch_min() -> DateTime<Utc> {
    Utc.timestamp_millis_opt(0).single().unwrap_or_default()
}

pub(super) fn epoch_max() -> DateTime<Utc> {
    // Year 9999: later than any event, within what Cassandra stores.
    Utc.timestamp_millis_opt(253_402_300_799_000)
        .single()
        .unwrap_or_default()
}

pub(super) fn entry(row: StoredRow) -> HistoryEntry {
    let (occurred_at, _, _, coupon_code, user_id, kind, detail) = row;
    HistoryEntry {
        occurred_at,
        kind,
        coupon_code,
        user_id,
        detail: detail.and_then(|d| serde_json::from_str(&d).ok()),
    }
}

/// The hour bucket of a time (its partition in `history_by_time`).
pub fn hour_of(at: DateTime<Utc>) -> DateTime<Utc> {
    at.with_nanosecond(0)
        .and_then(|t| t.with_second(0))
        .and_then(|t| t.with_minute(0))
        .unwrap_or(at)
}

/// The shard of an event in its hour: every row of one event (a release's
/// 1,000 coupons) shares it, so they batch together.
pub fn shard_of(event_id: &Uuid) -> i8 {
    (event_id.as_u128() % TIME_SHARDS as u128) as i8
}

#[derive(Clone, Copy)]
pub(super) enum Table {
    /// `history_by_user`, `history_by_coupon`: the row's columns.
    Plain,
    /// `history_by_time`: also `hour` and `shard`.
    Time,
}

pub(super) type Job<'a> = (&'a PreparedStatement, Table, Vec<&'a Stored<'a>>);

/// A row as bound to the inserts.
pub(super) struct Stored<'a> {
    pub(super) occurred_at: DateTime<Utc>,
    pub(super) event_id: Uuid,
    pub(super) item: i32,
    pub(super) coupon_code: Option<&'a str>,
    pub(super) user_id: Option<&'a str>,
    pub(super) kind: &'static str,
    pub(super) detail: String,
    pub(super) hour: DateTime<Utc>,
    pub(super) shard: i8,
    /// The write timestamp (microseconds): the row's own time, so a
    /// rewrite is the same cell version.
    pub(super) written_at: i64,
}

type PlainValues<'a> = (
    DateTime<Utc>,
    Uuid,
    i32,
    Option<&'a str>,
    Option<&'a str>,
    &'a str,
    &'a str,
    i64,
);
type TimedValues<'a> = (
    DateTime<Utc>,
    Uuid,
    i32,
    Option<&'a str>,
    Option<&'a str>,
    &'a str,
    &'a str,
    DateTime<Utc>,
    i8,
    i64,
);

impl<'a> Stored<'a> {
    pub(super) fn of(row: &'a HistoryRow) -> Self {
        Self {
            occurred_at: row.occurred_at,
            event_id: row.event_id,
            item: row.item,
            coupon_code: row.coupon_code.as_deref(),
            user_id: row.user_id.as_deref(),
            kind: row.kind.as_str(),
            detail: row.detail.to_string(),
            hour: hour_of(row.occurred_at),
            shard: shard_of(&row.event_id),
            written_at: row.occurred_at.timestamp_micros(),
        }
    }

    pub(super) fn plain(&self) -> PlainValues<'_> {
        (
            self.occurred_at,
            self.event_id,
            self.item,
            self.coupon_code,
            self.user_id,
            self.kind,
            &self.detail,
            self.written_at,
        )
    }

    pub(super) fn timed(&self) -> TimedValues<'_> {
        (
            self.occurred_at,
            self.event_id,
            self.item,
            self.coupon_code,
            self.user_id,
            self.kind,
            &self.detail,
            self.hour,
            self.shard,
            self.written_at,
        )
    }
}

/// One stored row as read: the columns of `store::COLUMNS`.
pub(super) type StoredRow = (
    DateTime<Utc>,
    Uuid,
    i32,
    Option<String>,
    Option<String>,
    String,
    Option<String>,
);
