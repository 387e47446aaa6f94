//! The history sink: an append-only record of every state change, for
//! analysts to query by user, coupon and time.
//!
//! Reads `created`, `claim-results` and `purchase-results` in its own consumer
//! group, so it can lag or be rebuilt without touching the processors.
//! Releases are written by the expiry consumer in the same transaction as the
//! release itself (only it knows whether the release happened).
//!
//! Delivery guarantee: at least once, effect exactly once. Each row's key is
//! `(occurred_at, event_id, item)`, all taken from the event, so a replay
//! inserts nothing new (`ON CONFLICT DO NOTHING`). That is why every event
//! carries a stable id *and time*, including decisions that are never stored
//! (invalid requests): a redelivery must produce the very same key.
//!
//! A result record from a foreign producer may carry what Postgres refuses
//! (a NUL in an id): the insert fails permanently, the batch loop isolates
//! that record and dead-letters it, and the sink goes on.

use chrono::{DateTime, Utc};
use serde_json::json;
use uuid::Uuid;

use coupon_domain::HistoryKind;
use coupon_platform::kafka::consumer::BatchError;
use coupon_platform::kafka::role::{self, Decoded, RoleEvent};
use coupon_platform::kafka::{decode, DecodeError, Record};
use coupon_platform::time::from_ms;
use coupon_platform::Topics;
use coupon_schemas::catalogue::TopicKind;
use coupon_schemas::{
    ClaimDecided, ClaimOutcome, CouponsCreated, Envelope, PurchaseDecided, PurchaseOutcome,
};

use coupon_platform::kafka::role::dead_letter_all;

use crate::{Context, Role};

pub const ROLE: Role = Role::History;

pub use coupon_platform::store::history::{append, append_bulk, HistoryRow};

fn envelope_keys(envelope: Option<&Envelope>) -> Result<(Uuid, DateTime<Utc>), String> {
    let envelope = envelope.ok_or("event has no envelope")?;
    let event_id = Uuid::parse_str(&envelope.event_id).map_err(|e| format!("event_id: {e}"))?;
    let occurred_at =
        from_ms(envelope.occurred_at_ms).ok_or("occurred_at_ms is not a valid time")?;
    Ok((event_id, occurred_at))
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

/// What the history sink reads: the message of each of its topics
/// (`Role::History` in the catalogue).
#[derive(Debug, Clone, PartialEq)]
pub enum HistoryEvent {
    Created(CouponsCreated),
    ClaimDecided(ClaimDecided),
    PurchaseDecided(PurchaseDecided),
}

impl RoleEvent for HistoryEvent {
    fn decode(topics: &Topics, record: &Record) -> Result<Self, DecodeError> {
        match topics.kind_of(&record.topic) {
            Some(TopicKind::Created) => decode(record).map(Self::Created),
            Some(TopicKind::ClaimResults) => decode(record).map(Self::ClaimDecided),
            Some(TopicKind::PurchaseResults) => decode(record).map(Self::PurchaseDecided),
            _ => Err(DecodeError::NotRead {
                role: "history sink",
                topic: record.topic.clone(),
            }),
        }
    }
}

/// The one row of a claim's or a purchase's decision.
fn decision_row(
    (event_id, occurred_at): (Uuid, DateTime<Utc>),
    coupon_code: &str,
    user_id: &str,
    kind: HistoryKind,
    detail: serde_json::Value,
) -> HistoryRow {
    HistoryRow {
        occurred_at,
        event_id,
        item: 0,
        coupon_code: non_empty(coupon_code),
        user_id: non_empty(user_id),
        kind,
        detail,
    }
}

/// Turns one record into history rows, or a reason to dead-letter it.
pub fn rows_of(topics: &Topics, record: &Record) -> Result<Vec<HistoryRow>, String> {
    let event = HistoryEvent::decode(topics, record).map_err(|e| e.to_string())?;
    rows_of_event(&event)
}

/// The history rows of one event, or a reason to dead-letter it.
pub fn rows_of_event(event: &HistoryEvent) -> Result<Vec<HistoryRow>, String> {
    match event {
        HistoryEvent::Created(event) => {
            let (event_id, occurred_at) = envelope_keys(event.envelope.as_ref())?;
            let coupons = crate::created::coupons_of(event)?;
            Ok(coupons
                .into_iter()
                .enumerate()
                .map(|(item, coupon)| HistoryRow {
                    occurred_at,
                    event_id,
                    item: item as i32,
                    coupon_code: Some(coupon.code.to_string()),
                    user_id: None,
                    kind: HistoryKind::Created,
                    detail: json!({
                        "batch_id": event.batch_id,
                        "employee_id": event.employee_id,
                        "category": event.category,
                    }),
                })
                .collect())
        }
        HistoryEvent::ClaimDecided(event) => {
            let keys = envelope_keys(event.envelope.as_ref())?;
            let outcome = ClaimOutcome::of(event.outcome);
            // A repeated grant returns an existing hold: no state changed.
            if outcome == ClaimOutcome::Granted && event.repeated {
                return Ok(Vec::new());
            }
            let (kind, detail) = match outcome {
                ClaimOutcome::Granted => (
                    HistoryKind::Granted,
                    json!({"request_id": event.request_id, "category": event.category, "expires_at_ms": event.expires_at_ms}),
                ),
                other => (
                    HistoryKind::Rejected,
                    json!({"request_id": event.request_id, "reason": other.name(), "detail": event.reason}),
                ),
            };
            let row = decision_row(keys, &event.coupon_code, &event.user_id, kind, detail);
            Ok(vec![row])
        }
        HistoryEvent::PurchaseDecided(event) => {
            let keys = envelope_keys(event.envelope.as_ref())?;
            let outcome = PurchaseOutcome::of(event.outcome);
            // A repeated answer for an order decided before changes nothing.
            if event.repeated {
                return Ok(Vec::new());
            }
            let kind = if outcome == PurchaseOutcome::Redeemed {
                HistoryKind::Redeemed
            } else {
                HistoryKind::Rejected
            };
            let detail = json!({"order_id": event.order_id, "request_id": event.request_id, "outcome": outcome.name()});
            let row = decision_row(keys, &event.coupon_code, &event.user_id, kind, detail);
            Ok(vec![row])
        }
    }
}

pub async fn handle_events(
    ctx: &Context,
    batch: &[Decoded<HistoryEvent>],
) -> Result<(), BatchError> {
    let split = role::split(batch, |_, event| rows_of_event(event));
    let rows: Vec<HistoryRow> = split
        .accepted
        .into_iter()
        .flat_map(|(_, rows)| rows)
        .collect();
    for chunk in rows.chunks(20_000) {
        let added = append_bulk(&ctx.pool, chunk).await?;
        metrics::counter!("coupon_history_rows_total").increment(added);
    }
    dead_letter_all(&ctx.dead_letters(ROLE), &split.refused).await
}

crate::role_handler!(ROLE, HistoryEvent);
