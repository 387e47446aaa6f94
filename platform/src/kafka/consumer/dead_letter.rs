//! Setting a record aside on the dead-letter topic, bounded so that the dead
//! letter itself always fits the topic.

use prost::Message as _;

use coupon_schemas::DeadLetter;

use super::super::producer::{PublishError, Publisher};

use super::{Record, EVENT_TIME_RANGE_MS};

/// The most of a refused record's value a dead letter carries. A dead letter
/// must fit the topic's record size limit (1 MB by default on Kafka): one that
/// does not fit would fail forever and wedge the consumer on the very record
/// it is trying to set aside. The size of the original is kept.
pub const MAX_DEAD_LETTER_VALUE: usize = 256 * 1024;
/// The same for the original key and for the reason (which may quote input).
pub const MAX_DEAD_LETTER_KEY: usize = 1024;
pub const MAX_DEAD_LETTER_REASON: usize = 4096;

/// The first `max` bytes of `text`, cut at a character boundary.
pub(super) fn truncate_str(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The event id of the dead letter `consumer` writes for `record`: derived
/// from where the record sits in the log, so a redelivered batch repeats
/// the same dead letter (same id, same time) instead of adding another.
pub fn dead_letter_id(consumer: &str, record: &Record) -> uuid::Uuid {
    uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_OID,
        format!(
            "dead-letter:{consumer}:{}:{}:{}",
            record.topic, record.partition, record.offset
        )
        .as_bytes(),
    )
}

/// A time for something derived from `record` that is the same on every
/// delivery: the record's broker timestamp, else `fallback_ms` (e.g. the
/// event's own time), else the current time (a record without a timestamp
/// exists only in tests and pre-0.10 logs).
pub fn stable_time_ms(record: &Record, fallback_ms: Option<i64>) -> i64 {
    record
        .timestamp_ms
        .filter(|ms| EVENT_TIME_RANGE_MS.contains(ms))
        .or(fallback_ms.filter(|ms| EVENT_TIME_RANGE_MS.contains(ms)))
        .unwrap_or_else(crate::time::now_ms)
}

/// Sends refused records to `<prefix>.dead-letter`, with the reason, the
/// original bytes and where they came from.
#[derive(Clone)]
pub struct DeadLetters {
    publisher: Publisher,
    topic: String,
    consumer: String,
}

impl DeadLetters {
    pub fn new(publisher: Publisher, topic: String, consumer: &str) -> Self {
        Self {
            publisher,
            topic,
            consumer: consumer.to_owned(),
        }
    }

    /// The dead letter for `record`; oversized originals are truncated (and
    /// flagged as such) so that the letter always fits the topic.
    pub fn letter(&self, record: &Record, reason: &str) -> DeadLetter {
        let key = record.key.as_deref().unwrap_or_default();
        let value = record.value.as_deref().unwrap_or_default();
        let truncated = key.len() > MAX_DEAD_LETTER_KEY || value.len() > MAX_DEAD_LETTER_VALUE;
        let mut reason = truncate_str(reason, MAX_DEAD_LETTER_REASON).to_owned();
        if truncated {
            reason.push_str(&format!(
                " (original truncated: key {} bytes, value {} bytes)",
                key.len(),
                value.len()
            ));
        }
        DeadLetter {
            envelope: Some(coupon_schemas::new_envelope::<DeadLetter>(
                dead_letter_id(&self.consumer, record).to_string(),
                stable_time_ms(record, None),
                self.publisher.name(),
                "",
            )),
            source_topic: record.topic.clone(),
            source_partition: record.partition,
            source_offset: record.offset,
            original_key: key[..key.len().min(MAX_DEAD_LETTER_KEY)].to_vec(),
            original_value: value[..value.len().min(MAX_DEAD_LETTER_VALUE)].to_vec(),
            reason,
            consumer: self.consumer.clone(),
            original_size: value.len() as u64,
            original_truncated: truncated,
        }
    }

    pub async fn send(&self, record: &Record, reason: &str) -> Result<(), PublishError> {
        metrics::counter!("coupon_dead_letters_total", "consumer" => self.consumer.clone())
            .increment(1);
        let letter = self.letter(record, reason);
        tracing::warn!(
            consumer = %self.consumer,
            topic = %record.topic,
            partition = record.partition,
            offset = record.offset,
            reason = %letter.reason,
            "dead-lettering a record"
        );
        self.publisher
            .send_bytes(
                &self.topic,
                Some(&letter.original_key),
                &letter.encode_to_vec(),
            )
            .await
            .map(|_| ())
    }
}
