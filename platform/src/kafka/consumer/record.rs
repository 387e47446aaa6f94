//! A consumed record, and decoding it into its event with the checks every
//! envelope must pass.

use rdkafka::message::Message;

use coupon_schemas::Event;

use super::dead_letter::truncate_str;

/// An owned Kafka record.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub timestamp_ms: Option<i64>,
}

impl Record {
    pub fn from_message(message: &impl Message) -> Self {
        Self {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            value: message.payload().map(<[u8]>::to_vec),
            timestamp_ms: message.timestamp().to_millis(),
        }
    }

    pub fn key_str(&self) -> Option<&str> {
        self.key
            .as_deref()
            .and_then(|k| std::str::from_utf8(k).ok())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record has no value")]
    Empty,
    #[error("value is not a valid protobuf {expected}: {detail}")]
    Protobuf {
        expected: &'static str,
        detail: String,
    },
    #[error("event has no envelope")]
    NoEnvelope,
    #[error("event type {found:?} on a topic that carries {expected}")]
    WrongType {
        expected: &'static str,
        found: String,
    },
    #[error("unsupported schema version {0}")]
    UnsupportedVersion(u32),
    #[error("event has no event id")]
    NoEventId,
    #[error("occurred_at_ms {0} is not a time between 2000 and 2100")]
    TimeOutOfRange(i64),
    /// A record of a topic the role does not read (its event names them).
    #[error("the {role} does not read topic {topic}")]
    NotRead { role: &'static str, topic: String },
    #[error("record of {size} bytes is larger than the {max} bytes a {expected} may have")]
    TooLarge {
        expected: &'static str,
        size: usize,
        max: usize,
    },
    #[error("envelope {field} is {len} bytes long; at most {max} are accepted")]
    EnvelopeFieldTooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
}

/// The most bytes each free-text envelope field may have. The gateway's
/// request ids (the correlation id) have at most 64 characters and event
/// ids are UUIDs; the bounds leave room for foreign producers' own schemes.
/// Every answer echoes the correlation id, so it must stay small.
pub const MAX_ENVELOPE_ID: usize = 128;
pub const MAX_ENVELOPE_PRODUCER: usize = 256;

/// Checks one envelope field against its bound. What the field holds is
/// the reader's business (a NUL that Postgres refuses fails one record,
/// which the batch loop isolates); only its size concerns everyone.
pub(super) fn check_envelope_field(
    field: &'static str,
    value: &str,
    max: usize,
) -> Result<(), DecodeError> {
    if value.len() > max {
        return Err(DecodeError::EnvelopeFieldTooLong {
            field,
            len: value.len(),
            max,
        });
    }
    Ok(())
}

/// Envelope times outside 2000-01-01..2100-01-01 (UTC) are refused. No event
/// of this system is that old or that new (Snowflake ids end in 2093), and
/// beyond it the stores disagree on what a time is (Postgres stops at 4713 BC,
/// chrono at ±262,143): an absurd time must be refused here, deterministically,
/// not fail an insert later and stall the consumer.
pub const EVENT_TIME_RANGE_MS: std::ops::Range<i64> = 946_684_800_000..4_102_444_800_000;

/// Decodes a record as event `E` and checks its envelope.
pub fn decode<E: Event>(record: &Record) -> Result<E, DecodeError> {
    decode_value(record.value.as_deref())
}

/// Decodes a record's value as the message of topic `kind` that its
/// envelope names (the catalogue's map, `TopicKind::decode`), with the
/// checks of [`decode_value`].
pub fn decode_topic(
    kind: coupon_schemas::TopicKind,
    value: Option<&[u8]>,
) -> Result<coupon_schemas::TopicEvent, DecodeError> {
    struct Checked<'a>(Option<&'a [u8]>);
    impl coupon_schemas::MessageDecoder for Checked<'_> {
        type Error = DecodeError;
        fn decode<E: Event>(self) -> Result<E, DecodeError> {
            decode_value(self.0)
        }
        fn value(&self) -> Option<&[u8]> {
            self.0
        }
    }
    kind.decode(Checked(value))
}

/// [`decode`] on a record's value, borrowed (the replay decodes records
/// without copying them out of the client's buffers).
pub fn decode_value<E: Event>(value: Option<&[u8]>) -> Result<E, DecodeError> {
    let bytes = value.ok_or(DecodeError::Empty)?;
    if bytes.len() > E::MAX_BYTES {
        return Err(DecodeError::TooLarge {
            expected: E::TYPE_NAME,
            size: bytes.len(),
            max: E::MAX_BYTES,
        });
    }
    let event = E::decode(bytes).map_err(|e| DecodeError::Protobuf {
        expected: E::TYPE_NAME,
        detail: e.to_string(),
    })?;
    let envelope = event.envelope().ok_or(DecodeError::NoEnvelope)?;
    if envelope.event_type != E::TYPE_NAME {
        return Err(DecodeError::WrongType {
            expected: E::TYPE_NAME,
            found: truncate_str(&envelope.event_type, 128).to_owned(),
        });
    }
    if envelope.schema_version == 0 || envelope.schema_version > coupon_schemas::SCHEMA_VERSION {
        return Err(DecodeError::UnsupportedVersion(envelope.schema_version));
    }
    if envelope.event_id.is_empty() {
        return Err(DecodeError::NoEventId);
    }
    check_envelope_field("event_id", &envelope.event_id, MAX_ENVELOPE_ID)?;
    check_envelope_field("correlation_id", &envelope.correlation_id, MAX_ENVELOPE_ID)?;
    check_envelope_field("producer", &envelope.producer, MAX_ENVELOPE_PRODUCER)?;
    if !EVENT_TIME_RANGE_MS.contains(&envelope.occurred_at_ms) {
        return Err(DecodeError::TimeOutOfRange(envelope.occurred_at_ms));
    }
    Ok(event)
}
