//! The history sink: an append-only record of every state change, for
//! analysts to query by user, coupon and time.
//!
//! Reads `created`, `claim-results` and `purchase-results` in its own consumer
//! group, so it can lag or be rebuilt without touching the processors.
//! Releases are written by the roles that release (the expiry consumer, and
//! the claim processor when a grant finds the user's overdue hold) in the
//! same transaction as the release itself: only that transaction knows
//! whether the release happened, and when.
//!
//! Where the rows go is `HISTORY_STORE`:
//! - `postgres` (the default): the partitioned `coupon_history` table, the
//!   releases inside their own transactions.
//! - `cassandra`: Apache Cassandra (`coupon_platform::cassandra`: a table by
//!   user, one by coupon, one by time bucket). This role writes the rows of
//!   its topics there. The releases go, in their transactions, to
//!   `history_outbox` in Postgres (a transactional outbox) instead of
//!   `coupon_history`, and this role forwards them ([`forward_releases`]):
//!   it takes queued rows under a row lock, writes them to Cassandra, and
//!   deletes them in the same Postgres transaction once Cassandra has
//!   acknowledged them. Why not build the release rows from the
//!   `expirations` topic: an expiry event is a request, not a fact (a
//!   purchase may have won the race, several sweepers announce the same
//!   hold), its time is not the release's, and a release by the next grant
//!   has no event at all; and publishing a release event after the commit
//!   would lose it to a crash between the two. The outbox costs the
//!   releasing transaction what the `coupon_history` insert cost before.
//!
//! In Cassandra mode this role is the only one that talks to Cassandra: it
//! connects (retrying with backoff while Cassandra is down) before it
//! consumes, and a failed write is a transient batch failure that the batch
//! loop retries with backoff, for as long as it takes. Its lag grows,
//! nothing is lost, and no other role waits for it: the claim path never
//! touches Cassandra.
//!
//! Delivery guarantee: at least once, effect exactly once. Each row's key is
//! `(occurred_at, event_id, item)`, all taken from the event, so a replay
//! inserts nothing new (Postgres: `ON CONFLICT DO NOTHING`; Cassandra: the
//! same primary key and the same write timestamp, an identical rewrite).
//! That is why every event carries a stable id *and time*, including
//! decisions that are never stored (invalid requests): a redelivery must
//! produce the very same key. Offsets are stored only after the batch's
//! writes were acknowledged (Postgres committed, or every Cassandra write
//! acknowledged at the configured consistency); an outbox row is deleted
//! only after the same.
//!
//! A result record from a foreign producer may carry what Postgres refuses
//! (a NUL in an id): the insert fails permanently, the batch loop isolates
//! that record and dead-letters it, and the sink goes on.

use std::time::Duration;

use coupon_platform::cassandra::{CassandraError, CassandraHistory, CassandraSettings};
pub use coupon_platform::store::history::HistoryStore;
use tokio_util::sync::CancellationToken;

use chrono::{DateTime, Utc};
use serde_json::json;
use uuid::Uuid;

use coupon_domain::HistoryKind;
use coupon_platform::kafka::consumer::BatchError;
use coupon_platform::kafka::role::{self, Decoded, RoleEvent};
use coupon_platform::kafka::{decode, DecodeError, Record};
use coupon_platform::time::from_ms;
use coupon_platform::Topics;
use coupon_schemas::catalogue::{TopicEvent, TopicKind};
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
        HistoryEvent::Created(event) => created_rows(event),
        HistoryEvent::ClaimDecided(event) => claim_rows(event),
        HistoryEvent::PurchaseDecided(event) => purchase_rows(event),
    }
}

/// The history rows of a record already decoded as its topic's message
/// (the rebuild decodes each record once, then takes these from it): those
/// [`rows_of`] makes of the record; `None` for a message of a topic this
/// role does not read.
pub fn rows_of_topic_event(event: &TopicEvent) -> Option<Result<Vec<HistoryRow>, String>> {
    match event {
        TopicEvent::Created(event) => Some(created_rows(event)),
        TopicEvent::ClaimDecided(event) => Some(claim_rows(event)),
        TopicEvent::PurchaseDecided(event) => Some(purchase_rows(event)),
        _ => None,
    }
}

/// A batch's rows: one per coupon it created.
fn created_rows(event: &CouponsCreated) -> Result<Vec<HistoryRow>, String> {
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

/// A claim decision's row (none for a repeated grant).
fn claim_rows(event: &ClaimDecided) -> Result<Vec<HistoryRow>, String> {
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

/// A purchase decision's row (none for a repeated answer).
fn purchase_rows(event: &PurchaseDecided) -> Result<Vec<HistoryRow>, String> {
    let keys = envelope_keys(event.envelope.as_ref())?;
    let outcome = PurchaseOutcome::of(event.outcome);
    // A repeated answer for an order decided before changes nothing.
    if event.repeated {
        return Ok(Vec::new());
    }
    let kind = match outcome {
        PurchaseOutcome::Redeemed => HistoryKind::Redeemed,
        PurchaseOutcome::Cancelled => HistoryKind::Cancelled,
        _ => HistoryKind::Rejected,
    };
    let mut detail = json!({"order_id": event.order_id, "request_id": event.request_id, "outcome": outcome.name()});
    if outcome == PurchaseOutcome::Cancelled {
        // Where the coupon went: back to the pool, or `expired`.
        detail["coupon_status"] = event.coupon_status.clone().into();
    }
    let row = decision_row(keys, &event.coupon_code, &event.user_id, kind, detail);
    Ok(vec![row])
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
        let added = match ctx.history.store() {
            HistoryStore::Postgres => append_bulk(&ctx.pool, chunk).await?,
            HistoryStore::Cassandra => ctx.history.connected()?.append(chunk).await?,
        };
        metrics::counter!("coupon_history_rows_total").increment(added);
    }
    dead_letter_all(&ctx.dead_letters(ROLE), &split.refused).await
}

/// Where the history is kept, as a process is configured.
#[derive(Debug, Clone, Default)]
pub struct HistoryConfig {
    /// How to reach Cassandra: the history is there when set, else in
    /// Postgres.
    pub cassandra: Option<CassandraSettings>,
    /// The connected store: the history role sets it once it reached
    /// Cassandra (no other role connects).
    pub connected: Option<CassandraHistory>,
}

impl HistoryConfig {
    /// The history in Cassandra, reached with `settings`.
    pub fn cassandra(settings: CassandraSettings) -> Self {
        Self {
            cassandra: Some(settings),
            connected: None,
        }
    }

    /// Which store the history is in.
    pub fn store(&self) -> HistoryStore {
        if self.cassandra.is_some() || self.connected.is_some() {
            HistoryStore::Cassandra
        } else {
            HistoryStore::Postgres
        }
    }

    /// The connected Cassandra store, or a transient failure (the batch is
    /// retried).
    pub fn connected(&self) -> Result<&CassandraHistory, BatchError> {
        self.connected
            .as_ref()
            .ok_or_else(|| BatchError::transient("the history role has not reached Cassandra yet"))
    }
}

/// Rows forwarded from the outbox per Postgres transaction.
const FORWARD_BATCH: i64 = 2_000;
/// How often the outbox is looked at when it was found empty.
const FORWARD_EVERY: Duration = Duration::from_millis(250);

/// Forwards queued release rows to Cassandra: one batch of at most
/// `limit`, taken under a row lock, written, acknowledged, deleted, committed.
/// Returns how many rows it forwarded.
pub async fn forward_releases(
    ctx: &Context,
    store: &CassandraHistory,
    limit: i64,
) -> Result<usize, BatchError> {
    use coupon_platform::store::history::{outbox_delete, outbox_take};
    let mut tx = ctx.pool.begin().await?;
    let taken = outbox_take(&mut tx, limit).await?;
    if taken.is_empty() {
        return Ok(0);
    }
    let (seqs, rows): (Vec<i64>, Vec<HistoryRow>) = taken.into_iter().unzip();
    store.append(&rows).await?;
    outbox_delete(&mut tx, &seqs).await?;
    tx.commit().await?;
    metrics::counter!("coupon_history_rows_total").increment(rows.len() as u64);
    Ok(rows.len())
}

/// Forwards the outbox until `shutdown`, retrying with backoff while
/// Postgres or Cassandra fails.
async fn run_forwarder(ctx: Context, store: CassandraHistory, shutdown: CancellationToken) {
    let mut backoff = FORWARD_EVERY;
    loop {
        let pause = match forward_releases(&ctx, &store, FORWARD_BATCH).await {
            Ok(n) if n as i64 == FORWARD_BATCH => Duration::ZERO,
            Ok(_) => {
                backoff = FORWARD_EVERY;
                FORWARD_EVERY
            }
            Err(error) => {
                tracing::warn!(error = %error.report(), "forwarding releases to Cassandra failed; will retry");
                backoff = (backoff * 2).min(Duration::from_secs(5));
                backoff
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Connects to Cassandra, retrying with backoff until it answers or
/// `shutdown` (then `Ok(None)`); settings no retry can fix (the TLS CA
/// file) are an error at once.
pub async fn connect_with_retry(
    settings: &CassandraSettings,
    shutdown: &CancellationToken,
) -> Result<Option<CassandraHistory>, CassandraError> {
    let mut backoff = Duration::from_millis(200);
    loop {
        match CassandraHistory::connect(settings).await {
            Ok(store) => {
                tracing::info!(keyspace = store.keyspace(), nodes = ?settings.nodes, "history store: Cassandra");
                return Ok(Some(store));
            }
            Err(error) if error.is_setup() => return Err(error),
            Err(error) => {
                let report =
                    coupon_platform::kafka::consumer::BatchError::transient(error).report();
                tracing::warn!(error = %report, ?backoff, "cannot reach Cassandra yet; the history waits (its lag grows)");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Runs the history role until `shutdown`: in Cassandra mode, reaches
/// Cassandra first and forwards the releases' outbox beside the consumer.
pub async fn run(
    mut ctx: Context,
    poll: coupon_platform::kafka::PollSettings,
    shutdown: CancellationToken,
) -> Result<(), rdkafka::error::KafkaError> {
    let mut forwarder = None;
    if ctx.history.store() == HistoryStore::Cassandra {
        if let (None, Some(settings)) = (&ctx.history.connected, ctx.history.cassandra.clone()) {
            match connect_with_retry(&settings, &shutdown).await {
                Ok(Some(store)) => ctx.history.connected = Some(store),
                Ok(None) => return Ok(()),
                Err(error) => {
                    // The role stops, and with it the process (its
                    // supervisor shows why): the settings must change.
                    tracing::error!(error = %BatchError::permanent(error).report(), "the history cannot use Cassandra with these settings");
                    return Err(rdkafka::error::KafkaError::Canceled);
                }
            }
        }
        if let Some(store) = ctx.history.connected.clone() {
            forwarder = Some(tokio::spawn(run_forwarder(
                ctx.clone(),
                store,
                shutdown.clone(),
            )));
        }
    }
    let (kafka, topics) = (ctx.kafka.clone(), ctx.topics.clone());
    let result = role::run(
        &Handler(ctx),
        &kafka,
        &topics,
        poll,
        shutdown.clone().cancelled_owned(),
    )
    .await;
    if let Some(forwarder) = forwarder {
        let _ = forwarder.await;
    }
    result
}

crate::role_handler!(ROLE, HistoryEvent);
