//! Group consumers and the batch loop every projector and processor runs.
//!
//! Delivery guarantee: **at least once, effects exactly once.** A batch's
//! offsets are stored only after its handler returned `Ok`, i.e. after the
//! work is durable in Postgres and any follow-up events were acknowledged by
//! the broker. A crash before that redelivers the batch; the handlers are
//! idempotent (natural keys, stored decisions), so redelivery changes nothing.
//! Stored offsets are committed by librdkafka every 500 ms, on rebalance
//! (revoked partitions) and synchronously on graceful shutdown.
//!
//! A record that cannot be decoded is never retried: the handler sends it to
//! the dead-letter topic with its reason, and the batch moves on.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use futures::FutureExt;
use prost::Message as _;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use coupon_schemas::{DeadLetter, Event};

use super::producer::{PublishError, Publisher};
use super::{GroupProtocol, KafkaSettings};

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
}

/// Envelope times outside 2000-01-01..2100-01-01 (UTC) are refused. No event
/// of this system is that old or that new (Snowflake ids end in 2093), and
/// beyond it the stores disagree on what a time is (Postgres stops at 4713 BC,
/// chrono at ±262,143): an absurd time must be refused here, deterministically,
/// not fail an insert later and stall the consumer.
pub const EVENT_TIME_RANGE_MS: std::ops::Range<i64> = 946_684_800_000..4_102_444_800_000;

/// Decodes a record as event `E` and checks its envelope.
pub fn decode<E: Event>(record: &Record) -> Result<E, DecodeError> {
    let bytes = record.value.as_deref().ok_or(DecodeError::Empty)?;
    let event = E::decode(bytes).map_err(|e| DecodeError::Protobuf {
        expected: E::TYPE_NAME,
        detail: e.to_string(),
    })?;
    let envelope = event.envelope().ok_or(DecodeError::NoEnvelope)?;
    if envelope.event_type != E::TYPE_NAME {
        return Err(DecodeError::WrongType {
            expected: E::TYPE_NAME,
            found: envelope.event_type.clone(),
        });
    }
    if envelope.schema_version == 0 || envelope.schema_version > coupon_schemas::SCHEMA_VERSION {
        return Err(DecodeError::UnsupportedVersion(envelope.schema_version));
    }
    if envelope.event_id.is_empty() {
        return Err(DecodeError::NoEventId);
    }
    if !EVENT_TIME_RANGE_MS.contains(&envelope.occurred_at_ms) {
        return Err(DecodeError::TimeOutOfRange(envelope.occurred_at_ms));
    }
    Ok(event)
}

/// The most of a refused record's value a dead letter carries. A dead letter
/// must fit the topic's record size limit (1 MB by default on Kafka): one that
/// does not fit would fail forever and wedge the consumer on the very record
/// it is trying to set aside. The size of the original is kept.
pub const MAX_DEAD_LETTER_VALUE: usize = 256 * 1024;
/// The same for the original key and for the reason (which may quote input).
pub const MAX_DEAD_LETTER_KEY: usize = 1024;
pub const MAX_DEAD_LETTER_REASON: usize = 4096;

/// The first `max` bytes of `text`, cut at a character boundary.
fn truncate_str(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
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
            envelope: Some(self.publisher.envelope::<DeadLetter>("")),
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

/// How partitions are shared between the instances of one role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Assignment {
    /// Kafka's consumer groups (the default): every instance of a role joins
    /// the role's group and the broker moves partitions when an instance
    /// joins, leaves or dies, so instances come and go freely.
    Group,
    /// Instance `index` of `count` takes the partitions `p` with
    /// `p % count == index`; offsets are still committed to the group. No
    /// rebalancing: a dead instance's partitions wait for it to restart. For
    /// brokers whose group coordination cannot be trusted, or for pinning
    /// work to instances under a supervisor that restarts them by index.
    Static { index: u32, count: u32 },
}

impl Assignment {
    /// One instance that reads every partition without a group protocol.
    pub const SOLE: Assignment = Assignment::Static { index: 0, count: 1 };

    /// Whether this instance owns `partition`.
    pub fn owns(self, partition: i32) -> bool {
        match self {
            Assignment::Static { index, count } => {
                count > 0 && partition >= 0 && (partition as u32) % count == index
            }
            Assignment::Group => true,
        }
    }
}

/// How one role consumes.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    pub group_id: String,
    pub topics: Vec<String>,
    /// The broker holds an empty fetch at most this long. Kafka answers a
    /// long-poll as soon as data arrives, so this bounds idle wake-ups, not
    /// the latency of a hop.
    pub fetch_wait_max_ms: u32,
    pub max_batch: usize,
    pub assignment: Assignment,
}

/// A role's consumer: a stream consumer that logs its group's partition moves.
pub type RoleConsumer = StreamConsumer<RebalanceLog>;

/// Logs every partition this instance takes or gives up, so an operator can
/// follow a rebalance (an instance joined, left or died) in the logs, and a
/// test can wait for one.
pub struct RebalanceLog {
    group: String,
}

impl ClientContext for RebalanceLog {}

impl ConsumerContext for RebalanceLog {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let list = |tpl: &TopicPartitionList| {
            tpl.elements()
                .iter()
                .map(|e| format!("{}[{}]", e.topic(), e.partition()))
                .collect::<Vec<_>>()
                .join(",")
        };
        match rebalance {
            Rebalance::Assign(tpl) => {
                metrics::counter!("coupon_consumer_rebalances_total", "change" => "assigned")
                    .increment(1);
                tracing::info!(group = %self.group, partitions = %list(tpl), "partitions assigned");
            }
            Rebalance::Revoke(tpl) => {
                metrics::counter!("coupon_consumer_rebalances_total", "change" => "revoked")
                    .increment(1);
                tracing::info!(group = %self.group, partitions = %list(tpl), "partitions revoked");
            }
            Rebalance::Error(error) => {
                tracing::warn!(group = %self.group, %error, "rebalance failed");
            }
        }
    }
}

/// Creates a consumer of `settings.topics` in `settings.group_id`, with its
/// partitions assigned as `settings.assignment` says. Blocks briefly for
/// metadata with static assignment (call it from a blocking-safe place).
pub fn group_consumer(
    kafka: &KafkaSettings,
    settings: &ConsumerSettings,
) -> Result<RoleConsumer, KafkaError> {
    let mut config = kafka.client_config();
    config
        .set("group.id", &settings.group_id)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "500")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", settings.fetch_wait_max_ms.to_string())
        .set("enable.partition.eof", "false");
    match kafka.group_protocol {
        // KIP-848: the broker computes assignments and owns the session
        // timeout (`group.consumer.session.timeout.ms`), so the classic
        // protocol's client-side settings are not allowed here.
        GroupProtocol::Consumer => {
            config.set("group.protocol", "consumer");
        }
        // Cooperative-sticky: a rebalance moves only the partitions that
        // change owner; the others keep being consumed meanwhile.
        GroupProtocol::Classic => {
            config
                .set("group.protocol", "classic")
                .set("partition.assignment.strategy", "cooperative-sticky")
                .set("session.timeout.ms", "10000")
                .set("heartbeat.interval.ms", "1000");
        }
    }
    let consumer: RoleConsumer = config.create_with_context(RebalanceLog {
        group: settings.group_id.clone(),
    })?;
    match settings.assignment {
        Assignment::Group => {
            let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
            consumer.subscribe(&topics)?;
        }
        Assignment::Static { .. } => {
            let mut tpl = TopicPartitionList::new();
            for topic in &settings.topics {
                let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
                for t in metadata.topics() {
                    if let Some(error) = t.error() {
                        return Err(KafkaError::MetadataFetch(error.into()));
                    }
                    for partition in t.partitions() {
                        if settings.assignment.owns(partition.id()) {
                            tpl.add_partition_offset(topic, partition.id(), Offset::Stored)?;
                        }
                    }
                }
            }
            consumer.assign(&tpl)?;
        }
    }
    Ok(consumer)
}

/// Waits for at least one record, then takes whatever else is already
/// fetched, up to `max`. Records keep their per-partition order.
pub async fn next_batch(consumer: &RoleConsumer, max: usize) -> Result<Vec<Record>, KafkaError> {
    let first = consumer.recv().await?;
    let mut batch = vec![Record::from_message(&first)];
    drop(first);
    while batch.len() < max {
        match consumer.recv().now_or_never() {
            Some(Ok(message)) => batch.push(Record::from_message(&message)),
            Some(Err(error)) => {
                tracing::warn!(%error, "consumer error while filling a batch");
                break;
            }
            None => break,
        }
    }
    Ok(batch)
}

/// Marks a batch as done: the next commit will resume after it.
pub fn store_offsets(consumer: &RoleConsumer, batch: &[Record]) -> Result<(), KafkaError> {
    let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for record in batch {
        let entry = next.entry((&record.topic, record.partition)).or_insert(0);
        *entry = (*entry).max(record.offset + 1);
    }
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in next {
        tpl.add_partition_offset(topic, partition, Offset::Offset(offset))?;
    }
    consumer.store_offsets(&tpl)
}

/// A handler failure that is worth retrying (database or broker down).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RetryableError(pub String);

impl RetryableError {
    pub fn new(error: impl std::fmt::Display) -> Self {
        Self(error.to_string())
    }
}

/// Runs `handle` on batches until `shutdown` resolves.
///
/// A failed batch is retried with backoff (capped at 5 s) and its offsets are
/// not stored until it succeeds, so an outage of Postgres or the broker delays
/// work but loses none. Shutdown waits for the batch in hand, then commits.
pub async fn run_batches<H, Fut>(
    name: &str,
    consumer: RoleConsumer,
    max_batch: usize,
    mut handle: H,
    shutdown: impl Future<Output = ()>,
) where
    H: FnMut(Vec<Record>) -> Fut,
    Fut: Future<Output = Result<(), RetryableError>>,
{
    tokio::pin!(shutdown);
    loop {
        let batch = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            batch = next_batch(&consumer, max_batch) => batch,
        };
        let batch = match batch {
            Ok(batch) => batch,
            Err(error) => {
                tracing::warn!(consumer = name, %error, "consumer error");
                metrics::counter!("coupon_consumer_errors_total", "consumer" => name.to_owned())
                    .increment(1);
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let mut backoff = Duration::from_millis(50);
        loop {
            match handle(batch.clone()).await {
                Ok(()) => break,
                Err(error) => {
                    tracing::warn!(consumer = name, %error, retry_in = ?backoff, "batch failed; retrying");
                    metrics::counter!("coupon_batch_retries_total", "consumer" => name.to_owned())
                        .increment(1);
                    let stop = tokio::select! {
                        _ = &mut shutdown => true,
                        _ = tokio::time::sleep(backoff) => false,
                    };
                    if stop {
                        // Not stored: the batch is redelivered to whoever runs next.
                        commit_on_shutdown(name, &consumer);
                        return;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        metrics::counter!("coupon_records_processed_total", "consumer" => name.to_owned())
            .increment(batch.len() as u64);
        if let Err(error) = store_offsets(&consumer, &batch) {
            // Happens when the partition was revoked meanwhile: its new owner
            // reprocesses the batch, which is harmless.
            tracing::debug!(consumer = name, %error, "could not store offsets");
        }
    }
    commit_on_shutdown(name, &consumer);
}

fn commit_on_shutdown(name: &str, consumer: &RoleConsumer) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => tracing::info!(consumer = name, "offsets committed at shutdown"),
        Err(KafkaError::ConsumerCommit(rdkafka::error::RDKafkaErrorCode::NoOffset)) => {}
        Err(error) => tracing::warn!(consumer = name, %error, "final commit failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coupon_schemas::{new_envelope, ClaimRequested};

    fn record(value: Vec<u8>, key: Vec<u8>) -> Record {
        Record {
            topic: "t.claims".into(),
            partition: 1,
            offset: 42,
            key: Some(key),
            value: Some(value),
            timestamp_ms: None,
        }
    }

    fn claim_at(occurred_at_ms: i64) -> Vec<u8> {
        ClaimRequested {
            envelope: Some(new_envelope::<ClaimRequested>(
                "e1".into(),
                occurred_at_ms,
                "test",
                "",
            )),
            request_id: "r1".into(),
            user_id: "u1".into(),
            category: String::new(),
        }
        .encode_to_vec()
    }

    #[test]
    fn absurd_envelope_times_are_refused() {
        let now = crate::time::now_ms();
        assert!(decode::<ClaimRequested>(&record(claim_at(now), vec![])).is_ok());
        for ms in [
            0,
            -300_000_000_000_000,
            6_250_000_000_000_000,
            i64::MAX,
            i64::MIN,
        ] {
            assert_eq!(
                decode::<ClaimRequested>(&record(claim_at(ms), vec![])),
                Err(DecodeError::TimeOutOfRange(ms))
            );
        }
    }

    #[test]
    fn dead_letters_of_huge_records_are_truncated_to_fit() {
        let publisher = Publisher::new(&KafkaSettings::new("127.0.0.1:1"), "test").unwrap();
        let letters = DeadLetters::new(publisher, "t.dead-letter".into(), "claims");
        let small = letters.letter(&record(b"abc".to_vec(), b"k".to_vec()), "bad");
        assert_eq!(small.original_value, b"abc");
        assert_eq!(small.original_key, b"k");
        assert_eq!((small.original_size, small.original_truncated), (3, false));
        assert_eq!(small.reason, "bad");

        let value = vec![7u8; 1 << 20];
        let reason = "é".repeat(10_000);
        let huge = letters.letter(&record(value.clone(), vec![1u8; 5000]), &reason);
        assert!(huge.original_truncated);
        assert_eq!(huge.original_size, 1 << 20);
        assert_eq!(huge.original_value, value[..MAX_DEAD_LETTER_VALUE]);
        assert_eq!(huge.original_key.len(), MAX_DEAD_LETTER_KEY);
        assert!(huge
            .reason
            .ends_with("(original truncated: key 5000 bytes, value 1048576 bytes)"));
        assert!(huge.encode_to_vec().len() < 300 * 1024);
    }
}
