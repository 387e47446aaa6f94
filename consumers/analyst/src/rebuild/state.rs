//! The rebuilt rows, as the live tables hold them, and the log records in
//! the order the projection applies them.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use coupon_consumers::coupons::NewCoupon;
use coupon_domain::{
    Category, ClaimOutcomeKind, CouponCode, CouponStatus, OrderId, RequestId, UserId,
};
use coupon_platform::kafka::Record;
use coupon_platform::time::from_ms;
use coupon_schemas::{
    BlacklistChanged, ClaimDecided, ClaimOutcome, PurchaseDecided, PurchaseOutcome,
};

use coupon_consumers::history::{self, HistoryRow};

use crate::replay::{decode_event, TopicEvent, TopicKind};

pub(super) fn topic_rank(kind: TopicKind) -> u8 {
    match kind {
        TopicKind::Created => 0,
        TopicKind::ClaimResults => 1,
        TopicKind::PurchaseResults => 2,
        TopicKind::Expirations => 3,
        TopicKind::Blacklist => 4,
        TopicKind::Users => 5,
        _ => 6,
    }
}

/// One outcome record, decoded once: the key it is applied in, the event,
/// and the history rows the history sink makes of it.
#[derive(Debug, Clone)]
pub struct LogRecord {
    pub kind: TopicKind,
    pub occurred_at_ms: i64,
    /// Where the record is in the log (its bytes too, unless the reader
    /// dropped them: see [`LogRecord::without_bytes`]).
    pub record: Record,
    /// The record decoded as its topic's message.
    pub event: TopicEvent,
    /// Its `coupon_history` rows, the history sink's own
    /// ([`history::rows_of_topic_event`]; none for a topic the sink does
    /// not read), or why the sink refuses it. Made with the decoding, so
    /// the rebuild's readers make them in parallel, before the apply.
    pub history: Result<Vec<HistoryRow>, String>,
}

impl LogRecord {
    /// Decodes the record, once; `None` for a record that cannot be
    /// decoded (the live consumers dead-lettered it too).
    pub fn new(kind: TopicKind, record: Record) -> Option<Self> {
        let event = decode_event(kind, &record).ok()?;
        let occurred_at_ms = event.envelope().map(|e| e.occurred_at_ms)?;
        let history = history::rows_of_topic_event(&event).unwrap_or_else(|| Ok(Vec::new()));
        Some(Self {
            kind,
            occurred_at_ms,
            record,
            event,
            history,
        })
    }

    /// The same without the record's key and value: the projection reads
    /// only the decoded event and where the record is, so the rebuild's
    /// readers free the bytes as they decode.
    pub fn without_bytes(mut self) -> Self {
        self.record.key = None;
        self.record.value = None;
        self
    }

    pub(super) fn order_key(&self) -> (i64, u8, &str, i32, i64) {
        (
            self.occurred_at_ms,
            topic_rank(self.kind),
            &self.record.topic,
            self.record.partition,
            self.record.offset,
        )
    }
}

/// Sorts records into the order they are applied in.
pub fn sort(records: &mut [LogRecord]) {
    records.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
}

/// A coupon as the log says it is.
#[derive(Debug, Clone, PartialEq)]
pub struct CouponState {
    pub coupon: NewCoupon,
    pub status: CouponStatus,
    pub holder_user_id: Option<String>,
    pub hold_id: Option<String>,
    pub held_until: Option<DateTime<Utc>>,
    pub redeemed_at: Option<DateTime<Utc>>,
    pub redeemed_order_id: Option<String>,
}

/// A stored claim decision (a `claim_decisions` row) as the log says it is:
/// the claim processor's own row type.
pub use coupon_consumers::claims::ClaimDecisionRecord;

/// The row the claim processor stored for the decision `event` (published
/// at `at`): `Ok(None)` for outcomes it never stores (`invalid`, unknown).
/// The inverse of the processor's `claims::event_of`.
pub fn claim_decision_row(
    event: &ClaimDecided,
    at: DateTime<Utc>,
) -> Result<Option<ClaimDecisionRecord>, String> {
    let Some(outcome) = ClaimOutcome::of(event.outcome).kind() else {
        return Ok(None);
    };
    let event_id = event_id_of(event.envelope.as_ref())?;
    let granted = outcome == ClaimOutcomeKind::Granted;
    let time = |ms: i64, applies: bool| {
        if applies && ms != 0 {
            from_ms(ms)
        } else {
            None
        }
    };
    let coupon_code = if granted {
        Some(CouponCode::parse(&event.coupon_code).map_err(|e| e.to_string())?)
    } else {
        None
    };
    let category = if granted {
        Some(Category::parse(event.category.as_str()).map_err(|e| e.to_string())?)
    } else {
        None
    };
    Ok(Some(ClaimDecisionRecord {
        request_id: RequestId::parse(event.request_id.as_str()).map_err(|e| e.to_string())?,
        event_id,
        user_id: UserId::parse(event.user_id.as_str()).map_err(|e| e.to_string())?,
        outcome,
        coupon_code,
        category,
        expires_at: time(event.expires_at_ms, granted),
        repeated: event.repeated,
        retry_at: time(event.retry_at_ms, outcome == ClaimOutcomeKind::RateLimited),
        blacklisted_until: time(
            event.blacklisted_until_ms,
            outcome == ClaimOutcomeKind::Blacklisted,
        ),
        decided_at: at,
    }))
}

/// A stored purchase decision (a `purchase_decisions` row): the purchase
/// processor's own row type.
pub use coupon_consumers::purchases::StoredPurchase;

/// The row the purchase processor stored for `event`: `Ok(None)` for
/// decisions it never stores (`repeated` answers to another request for a
/// decided order, `invalid`, unknown outcomes).
pub fn purchase_decision_row(
    event: &PurchaseDecided,
    at: DateTime<Utc>,
) -> Result<Option<StoredPurchase>, String> {
    let Some(outcome) = PurchaseOutcome::of(event.outcome).decision() else {
        return Ok(None);
    };
    if event.repeated {
        return Ok(None);
    }
    Ok(Some(StoredPurchase {
        repeated: false,
        order_id: OrderId::parse(event.order_id.as_str()).map_err(|e| e.to_string())?,
        request_id: RequestId::parse(event.request_id.as_str()).map_err(|e| e.to_string())?,
        event_id: event_id_of(event.envelope.as_ref())?,
        user_id: UserId::parse(event.user_id.as_str()).map_err(|e| e.to_string())?,
        coupon_code: event.coupon_code.clone(),
        outcome,
        decided_at: at,
        order_total: event
            .order_total
            .as_ref()
            .and_then(|m| m.to_domain("order_total").ok()),
        discount: event
            .discount_amount
            .as_ref()
            .and_then(|m| m.to_domain("discount_amount").ok()),
    }))
}

pub(super) fn event_id_of(envelope: Option<&coupon_schemas::Envelope>) -> Result<Uuid, String> {
    let raw = envelope.map(|e| e.event_id.as_str()).unwrap_or_default();
    Uuid::parse_str(raw).map_err(|_| format!("event id {raw:?} is not a UUID"))
}

/// A quota slot taken by a grant (a `quota_grants` row).
#[derive(Debug, Clone, PartialEq)]
pub struct QuotaGrant {
    pub user_id: String,
    pub window_start: DateTime<Utc>,
    pub request_id: String,
    pub granted_at: DateTime<Utc>,
}

/// A user's blacklist entry as the last change left it.
#[derive(Debug, Clone, PartialEq)]
pub struct BlacklistState {
    pub blacklisted: bool,
    /// `None` while blacklisted: until removed.
    pub until: Option<DateTime<Utc>>,
    pub reason: Option<String>,
    pub at: Option<DateTime<Utc>>,
    /// Where the change is in the log: (partition, offset, occurred_at_ms).
    position: (i32, i64, i64),
}

impl BlacklistState {
    pub(super) fn of(event: &BlacklistChanged, position: (i32, i64, i64)) -> Self {
        let on = event.blacklisted;
        Self {
            blacklisted: on,
            until: from_ms(event.blacklisted_until_ms)
                .filter(|_| on && event.blacklisted_until_ms != 0),
            reason: (on && !event.reason.is_empty()).then(|| event.reason.clone()),
            at: from_ms(event.blacklisted_at_ms).filter(|_| on && event.blacklisted_at_ms != 0),
            position,
        }
    }

    /// Whether this change comes after `other` for the same user: log order
    /// within a partition (one user's changes share one, by key), the event
    /// time across partitions (only after a topic was repartitioned).
    pub(super) fn follows(&self, other: &BlacklistState) -> bool {
        let ((p, o, t), (op, oo, ot)) = (self.position, other.position);
        if p == op {
            o > oo
        } else {
            t >= ot
        }
    }
}
