//! The history compared with the log: every row the history sink has
//! written, by the log, is in the store the history is kept in
//! (`HISTORY_STORE`: `coupon_history` in Postgres, or Cassandra's time
//! table).
//!
//! The cut is the history role's own committed offsets on the topics it
//! reads (`<prefix>.history-processor`): it commits a batch only after the
//! store acknowledged its rows, so every row of a record below its offset
//! must be there, with the same key (`event_id`, `item`), whatever
//! redelivery or outage happened. Rows of records at or after the offset
//! may or may not be written yet: they are counted as skipped.
//!
//! What is checked is that nothing is missing. Releases are not: their rows
//! are written by the releasing transactions (or their outbox), not from a
//! record of these topics, and the coupons' state the audit compares is
//! where a lost release would show. A row in the store that the log does not
//! name is not an error either: the store has no duplicates by construction
//! (the key is its primary key in both stores).
//!
//! Rows older than the months `HISTORY_RETENTION` dropped from
//! `coupon_history` (before its floor in `retention_floors`, read after the
//! store) are on the log but gone by design: they are counted as beyond
//! retention, not missing. (Cassandra's history has no such floor.)

use std::collections::{HashMap, HashSet};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use coupon_platform::store::history::HistoryRow;
use coupon_platform::{KafkaSettings, Topics};
use coupon_schemas::Role;

use crate::history::{keys_between, HistorySource};
use crate::replay::{committed_offsets, TopicKind};

use super::cut_log::CutLog;

/// At most this many missing rows are listed one by one; the rest are
/// counted in one line.
const LISTED: usize = 20;

/// The history role's committed offset per (topic, partition); a partition
/// it never committed on is absent (nothing there is known to be written).
pub(super) type HistoryCut = HashMap<(TopicKind, i32), i64>;

/// Reads the history role's committed offsets. Blocking.
pub(super) fn history_cut(kafka: &KafkaSettings, topics: &Topics) -> anyhow::Result<HistoryCut> {
    let group = topics.group(Role::History);
    let mut cut = HistoryCut::new();
    for &kind in Role::History.topics() {
        for (partition, offset) in committed_offsets(kafka, &group, &topics.of(kind))? {
            if let Some(offset) = offset {
                cut.insert((kind, partition), offset);
            }
        }
    }
    Ok(cut)
}

/// The rows the log says the history holds, and how many it may not yet.
#[derive(Debug, Default)]
pub(super) struct ExpectedHistory {
    rows: Vec<HistoryRow>,
    in_flight: usize,
}

/// The history rows of the log's records below the history role's cut
/// (records the sink refuses, which it dead-letters, have none).
pub(super) fn expected_history(log: &CutLog) -> ExpectedHistory {
    let mut expected = ExpectedHistory::default();
    for outcome in &log.outcomes {
        if !Role::History.topics().contains(&outcome.kind) {
            continue;
        }
        // The sink's own rows, made when the record was decoded.
        let Ok(rows) = &outcome.history else {
            continue;
        };
        let written = log
            .history_cut
            .get(&(outcome.kind, outcome.record.partition))
            .is_some_and(|cut| outcome.record.offset < *cut);
        if written {
            expected.rows.extend(rows.iter().cloned());
        } else {
            expected.in_flight += rows.len();
        }
    }
    expected
}

/// What the history check found.
#[derive(Debug, Default)]
pub(super) struct HistoryCheck {
    /// One line per missing row (the first [`LISTED`]), then a count.
    pub(super) missing: Vec<String>,
    pub(super) checked: usize,
    pub(super) in_flight: usize,
    /// Rows older than what retention kept in `coupon_history`.
    pub(super) beyond_retention: usize,
}

/// Looks every expected row up in `source`.
pub(super) async fn compare_history(
    source: &HistorySource,
    expected: ExpectedHistory,
) -> anyhow::Result<HistoryCheck> {
    let mut check = HistoryCheck {
        in_flight: expected.in_flight,
        ..HistoryCheck::default()
    };
    let times = expected.rows.iter().map(|r| r.occurred_at);
    let (Some(since), Some(until)) = (times.clone().min(), times.max()) else {
        return Ok(check);
    };
    let stored: HashSet<(Uuid, i32)> = keys_between(source, since, until)
        .await
        .context("reading the history store")?
        .into_iter()
        .collect();
    let floor = match source {
        HistorySource::Postgres(pool) => {
            coupon_platform::store::retention::floors(pool)
                .await
                .context("reading the retention floors")?
                .history
        }
        HistorySource::Cassandra(_) => None,
    };
    let (kept, dropped): (Vec<&HistoryRow>, Vec<&HistoryRow>) = expected
        .rows
        .iter()
        .partition(|r| floor.is_none_or(|floor| r.occurred_at >= floor));
    check.beyond_retention = dropped.len();
    let missing: Vec<&HistoryRow> = kept
        .iter()
        .copied()
        .filter(|r| !stored.contains(&(r.event_id, r.item)))
        .collect();
    check.checked = kept.len();
    for row in missing.iter().take(LISTED) {
        check.missing.push(format!(
            "history: the {} row of event {} item {} ({}{}at {}) is on the log but missing from the history store",
            row.kind.as_str(),
            row.event_id,
            row.item,
            row.coupon_code
                .as_deref()
                .map(|c| format!("coupon {c}, "))
                .unwrap_or_default(),
            row.user_id
                .as_deref()
                .map(|u| format!("user {u}, "))
                .unwrap_or_default(),
            time(row.occurred_at),
        ));
    }
    if missing.len() > LISTED {
        check.missing.push(format!(
            "history: {} more rows on the log are missing from the history store",
            missing.len() - LISTED
        ));
    }
    Ok(check)
}

fn time(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
