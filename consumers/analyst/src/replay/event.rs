//! A record decoded with the message its topic carries, its time, and its
//! JSON line.

use coupon_platform::kafka::{DecodeError, Record};

use crate::jsonl::{self, RawRecord};

/// One of the topics (the catalogue's).
pub use coupon_schemas::TopicKind;

/// A decoded record: the message its topic carries (the catalogue's map).
pub use coupon_schemas::TopicEvent;

/// Decodes `record` as the message type of `kind`, checking its envelope as
/// the consumers do.
pub fn decode_event(kind: TopicKind, record: &Record) -> Result<TopicEvent, DecodeError> {
    decode_event_value(kind, record.value.as_deref())
}

/// Decodes a record's value, borrowed, as the message type of `kind` (see
/// [`decode_event`]), through the catalogue's map ([`TopicKind::decode`]).
pub fn decode_event_value(
    kind: TopicKind,
    value: Option<&[u8]>,
) -> Result<TopicEvent, DecodeError> {
    coupon_platform::kafka::decode_topic(kind, value)
}

/// When a record happened: its Kafka timestamp, else its envelope's time.
pub fn record_time_ms(record: &Record, event: Option<&TopicEvent>) -> Option<i64> {
    time_ms(record.timestamp_ms, event)
}

pub(super) fn time_ms(timestamp_ms: Option<i64>, event: Option<&TopicEvent>) -> Option<i64> {
    timestamp_ms.filter(|t| *t >= 0).or_else(|| {
        event
            .and_then(TopicEvent::envelope)
            .map(|e| e.occurred_at_ms)
            .filter(|t| *t > 0)
    })
}

/// One JSON line for a record (without the trailing newline): see
/// [`crate::jsonl`] for the format.
pub fn json_line(
    kind: TopicKind,
    record: &Record,
    decoded: &Result<TopicEvent, DecodeError>,
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
