//! A record decoded with the message its topic carries, its time, and its
//! JSON line.

use coupon_platform::kafka::{decode, decode_value, DecodeError, Record};
use coupon_schemas::{
    BlacklistChanged, ClaimDecided, ClaimRequested, CouponsCreated, DeadLetter, Envelope,
    PurchaseDecided, PurchaseRequested,
};

use crate::jsonl::{self, RawRecord};

/// One of the topics (the catalogue's).
pub use coupon_schemas::TopicKind;

/// A decoded record: the message its topic carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Created(CouponsCreated),
    ClaimRequested(ClaimRequested),
    ClaimDecided(ClaimDecided),
    PurchaseRequested(PurchaseRequested),
    PurchaseDecided(PurchaseDecided),
    HoldExpired(coupon_schemas::HoldExpired),
    DeadLetter(DeadLetter),
    BlacklistChanged(BlacklistChanged),
}

/// Decodes `record` as the message type of `kind`, checking its envelope as
/// the consumers do.
pub fn decode_event(kind: TopicKind, record: &Record) -> Result<Event, DecodeError> {
    Ok(match kind {
        TopicKind::Created => Event::Created(decode(record)?),
        TopicKind::Claims => Event::ClaimRequested(decode(record)?),
        TopicKind::ClaimResults => Event::ClaimDecided(decode(record)?),
        TopicKind::Purchases => Event::PurchaseRequested(decode(record)?),
        TopicKind::PurchaseResults => Event::PurchaseDecided(decode(record)?),
        TopicKind::Expirations => Event::HoldExpired(decode(record)?),
        TopicKind::DeadLetter => Event::DeadLetter(decode(record)?),
        TopicKind::Blacklist => Event::BlacklistChanged(decode(record)?),
    })
}

impl Event {
    pub fn envelope(&self) -> Option<&Envelope> {
        match self {
            Event::Created(e) => e.envelope.as_ref(),
            Event::ClaimRequested(e) => e.envelope.as_ref(),
            Event::ClaimDecided(e) => e.envelope.as_ref(),
            Event::PurchaseRequested(e) => e.envelope.as_ref(),
            Event::PurchaseDecided(e) => e.envelope.as_ref(),
            Event::HoldExpired(e) => e.envelope.as_ref(),
            Event::DeadLetter(e) => e.envelope.as_ref(),
            Event::BlacklistChanged(e) => e.envelope.as_ref(),
        }
    }
}

/// Decodes a record's value, borrowed, as the message type of `kind` (see
/// [`decode_event`]).
pub fn decode_event_value(kind: TopicKind, value: Option<&[u8]>) -> Result<Event, DecodeError> {
    Ok(match kind {
        TopicKind::Created => Event::Created(decode_value(value)?),
        TopicKind::Claims => Event::ClaimRequested(decode_value(value)?),
        TopicKind::ClaimResults => Event::ClaimDecided(decode_value(value)?),
        TopicKind::Purchases => Event::PurchaseRequested(decode_value(value)?),
        TopicKind::PurchaseResults => Event::PurchaseDecided(decode_value(value)?),
        TopicKind::Expirations => Event::HoldExpired(decode_value(value)?),
        TopicKind::DeadLetter => Event::DeadLetter(decode_value(value)?),
        TopicKind::Blacklist => Event::BlacklistChanged(decode_value(value)?),
    })
}

impl Event {
    pub(super) fn take_envelope(self) -> Option<Envelope> {
        match self {
            Event::Created(e) => e.envelope,
            Event::ClaimRequested(e) => e.envelope,
            Event::ClaimDecided(e) => e.envelope,
            Event::PurchaseRequested(e) => e.envelope,
            Event::PurchaseDecided(e) => e.envelope,
            Event::HoldExpired(e) => e.envelope,
            Event::DeadLetter(e) => e.envelope,
            Event::BlacklistChanged(e) => e.envelope,
        }
    }
}

/// When a record happened: its Kafka timestamp, else its envelope's time.
pub fn record_time_ms(record: &Record, event: Option<&Event>) -> Option<i64> {
    time_ms(record.timestamp_ms, event)
}

pub(super) fn time_ms(timestamp_ms: Option<i64>, event: Option<&Event>) -> Option<i64> {
    timestamp_ms.filter(|t| *t >= 0).or_else(|| {
        event
            .and_then(Event::envelope)
            .map(|e| e.occurred_at_ms)
            .filter(|t| *t > 0)
    })
}

/// One JSON line for a record (without the trailing newline): see
/// [`crate::jsonl`] for the format.
pub fn json_line(
    kind: TopicKind,
    record: &Record,
    decoded: &Result<Event, DecodeError>,
) -> Vec<u8> {
    let mut out = Vec::new();
    let raw = RawRecord {
        topic: &record.topic,
        partition: record.partition,
        offset: record.offset,
        key: record.key.as_deref(),
        value: record.value.as_deref(),
        timestamp_ms: record.timestamp_ms,
    };
    jsonl::write_line(&mut out, kind, &raw, decoded);
    out
}
