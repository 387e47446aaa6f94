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
//! the dead-letter topic with its reason, and the batch moves on. A record
//! that decodes but fails every time it is handled (a value Postgres refuses,
//! say) must not stall its partition either: handlers tell transient failures
//! from permanent ones ([`BatchError`]), and the loop isolates the record
//! behind a permanent one and sets it aside ([`settle`]).

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
fn check_envelope_field(field: &'static str, value: &str, max: usize) -> Result<(), DecodeError> {
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
        // A processor that lags (the claim processor behind a flash sale's
        // sold-out answers) would otherwise prefetch up to librdkafka's
        // 64 MiB; 16 MiB is still hundreds of batches ahead.
        .set("queued.max.messages.kbytes", "16384")
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
                // A killed instance's partitions move after 6 s, Kafka's
                // smallest default session (group.min.session.timeout.ms).
                .set("session.timeout.ms", "6000")
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

/// A boxed error that keeps its source chain.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a batch handler failed, which decides what the loop does next.
///
/// The distinction is *whose fault* the failure is. The environment's
/// (Postgres or the broker unreachable, a timeout, a serialization
/// conflict): the same batch succeeds later, so it is retried as it is, for
/// as long as it takes. The batch's (a value Postgres refuses, a constraint
/// a record violates every time): retrying the same batch would fail
/// forever and stall its partitions, so the loop finds the record that
/// causes it and sets that record aside.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("transient failure")]
    Transient(#[source] BoxError),
    #[error("permanent failure")]
    Permanent(#[source] BoxError),
}

impl BatchError {
    pub fn transient(error: impl Into<BoxError>) -> Self {
        Self::Transient(error.into())
    }

    pub fn permanent(error: impl Into<BoxError>) -> Self {
        Self::Permanent(error.into())
    }

    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::Permanent(_))
    }

    /// The failure and every cause, on one line: for logs and dead letters.
    pub fn report(&self) -> String {
        let mut text = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(error) = cause {
            let message = error.to_string();
            // Wrappers often repeat their source's message; say it once.
            if !text.ends_with(&message) {
                text.push_str(": ");
                text.push_str(&message);
            }
            cause = error.source();
        }
        text
    }
}

impl From<PublishError> for BatchError {
    /// The broker did not confirm: it is down, slow or electing a leader,
    /// and the same send succeeds later. Unless the broker (or the client's
    /// own check) refused the record itself: then no retry can succeed and
    /// the batch loop must isolate the record ([`PublishError::is_permanent`]).
    fn from(error: PublishError) -> Self {
        if error.is_permanent() {
            Self::permanent(error)
        } else {
            Self::transient(error)
        }
    }
}

impl From<sqlx::Error> for BatchError {
    fn from(error: sqlx::Error) -> Self {
        if crate::db::is_permanent(&error) {
            Self::permanent(error)
        } else {
            Self::transient(error)
        }
    }
}

/// How the loop retries.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// The first pause after a failure; it doubles up to `max_backoff`.
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    /// How often one record alone must fail permanently before it is set
    /// aside. More than once: a conflict with another processor (a unique
    /// key taken meanwhile during a rebalance) is reported as a constraint
    /// violation but resolves on the next attempt, which reads the winner.
    pub isolated_attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            first_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
            isolated_attempts: 3,
        }
    }
}

/// How a batch ended in [`settle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Every record is done: handled, or set aside.
    Done,
    /// Shutdown came while a failure was being retried: the batch must not
    /// be marked done (it is redelivered to whoever runs next).
    Stopped,
}

/// Sleeps `backoff` unless `shutdown` comes first (then `true`).
async fn pause(backoff: Duration, shutdown: &mut (impl Future<Output = ()> + Unpin)) -> bool {
    tokio::select! {
        _ = shutdown => true,
        _ = tokio::time::sleep(backoff) => false,
    }
}

/// Runs `handle` on `batch` until every record is done.
///
/// - A transient failure retries the same records with backoff, forever:
///   an outage delays work but loses none.
/// - A permanent failure splits the records in two halves, handled one after
///   the other (so each partition keeps its order), down to the one record
///   that fails on its own. That record gets `policy.isolated_attempts`
///   tries, then `reject` sets it aside (the dead-letter topic, and an
///   answer to its requester) with the failure as its reason, and the rest
///   of the batch goes on. No content can stall a partition.
///
/// Records handled before a later part fails stay handled; the handlers are
/// idempotent, so a redelivery after a stop changes nothing.
pub async fn settle<H, HFut, R, RFut>(
    name: &str,
    batch: Vec<Record>,
    policy: &RetryPolicy,
    handle: &mut H,
    reject: &mut R,
    shutdown: &mut (impl Future<Output = ()> + Unpin),
) -> Settled
where
    H: FnMut(Vec<Record>) -> HFut,
    HFut: Future<Output = Result<(), BatchError>>,
    R: FnMut(Record, String) -> RFut,
    RFut: Future<Output = Result<(), BatchError>>,
{
    let mut parts = std::collections::VecDeque::from([batch]);
    while let Some(mut part) = parts.pop_front() {
        let mut backoff = policy.first_backoff;
        let mut permanent = 0;
        loop {
            let error = match handle(part.clone()).await {
                Ok(()) => break,
                Err(error) => error,
            };
            let reason = error.report();
            if error.is_permanent() {
                if part.len() > 1 {
                    tracing::warn!(consumer = name, records = part.len(), %reason, "batch failed permanently; splitting it to find the record");
                    metrics::counter!("coupon_batch_splits_total", "consumer" => name.to_owned())
                        .increment(1);
                    let second = part.split_off(part.len() / 2);
                    parts.push_front(second);
                    parts.push_front(part);
                    break;
                }
                permanent += 1;
                if permanent >= policy.isolated_attempts {
                    let Some(record) = part.pop() else { break };
                    if set_aside(name, record, reason, policy, reject, shutdown).await {
                        return Settled::Stopped;
                    }
                    break;
                }
            }
            tracing::warn!(consumer = name, %reason, retry_in = ?backoff, "batch failed; retrying");
            metrics::counter!("coupon_batch_retries_total", "consumer" => name.to_owned())
                .increment(1);
            if pause(backoff, shutdown).await {
                return Settled::Stopped;
            }
            backoff = (backoff * 2).min(policy.max_backoff);
        }
    }
    Settled::Done
}

/// Hands a record that fails on its own to `reject`; `true` if shutdown
/// came first. Rejecting publishes, so its own failures are retried; a
/// permanent one gives the record up with an error in the log rather than
/// stall the partition.
async fn set_aside<R, RFut>(
    name: &str,
    record: Record,
    reason: String,
    policy: &RetryPolicy,
    reject: &mut R,
    shutdown: &mut (impl Future<Output = ()> + Unpin),
) -> bool
where
    R: FnMut(Record, String) -> RFut,
    RFut: Future<Output = Result<(), BatchError>>,
{
    tracing::warn!(consumer = name, topic = %record.topic, partition = record.partition, offset = record.offset, %reason, "record fails on its own; setting it aside");
    metrics::counter!("coupon_records_set_aside_total", "consumer" => name.to_owned()).increment(1);
    let mut backoff = policy.first_backoff;
    loop {
        match reject(record.clone(), reason.clone()).await {
            Ok(()) => return false,
            Err(error) if error.is_permanent() => {
                tracing::error!(consumer = name, topic = %record.topic, partition = record.partition, offset = record.offset, error = %error.report(), "could not set the record aside; skipping it");
                return false;
            }
            Err(error) => {
                tracing::warn!(consumer = name, error = %error.report(), retry_in = ?backoff, "setting a record aside failed; retrying");
                if pause(backoff, shutdown).await {
                    return true;
                }
                backoff = (backoff * 2).min(policy.max_backoff);
            }
        }
    }
}

/// Runs `handle` on batches until `shutdown` resolves; see [`settle`] for
/// what a failure does. A batch's offsets are stored once every record in
/// it is done. Shutdown waits for the batch in hand, then commits.
pub async fn run_batches<H, HFut, R, RFut>(
    name: &str,
    consumer: RoleConsumer,
    max_batch: usize,
    mut handle: H,
    mut reject: R,
    shutdown: impl Future<Output = ()>,
) where
    H: FnMut(Vec<Record>) -> HFut,
    HFut: Future<Output = Result<(), BatchError>>,
    R: FnMut(Record, String) -> RFut,
    RFut: Future<Output = Result<(), BatchError>>,
{
    tokio::pin!(shutdown);
    let policy = RetryPolicy::default();
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
        let settled = settle(
            name,
            batch.clone(),
            &policy,
            &mut handle,
            &mut reject,
            &mut shutdown,
        )
        .await;
        if settled == Settled::Stopped {
            // Not stored: the batch is redelivered to whoever runs next.
            commit_on_shutdown(name, &consumer);
            return;
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
            answered_sold_out: false,
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

    #[test]
    fn a_redelivered_record_gets_the_same_dead_letter() {
        let publisher = Publisher::new(&KafkaSettings::new("127.0.0.1:1"), "test").unwrap();
        let letters = DeadLetters::new(publisher, "t.dead-letter".into(), "claims");
        let mut poison = record(b"abc".to_vec(), b"k".to_vec());
        poison.timestamp_ms = Some(1_767_225_600_000);
        let first = letters.letter(&poison, "bad");
        let again = letters.letter(&poison, "bad");
        assert_eq!(first.envelope, again.envelope);
        let envelope = first.envelope.unwrap();
        assert_eq!(envelope.occurred_at_ms, 1_767_225_600_000);
        poison.offset += 1;
        assert_ne!(
            letters.letter(&poison, "bad").envelope.unwrap().event_id,
            envelope.event_id,
            "another record, another dead letter"
        );
    }

    /// A fake handler: records whose value starts with `poison` fail
    /// permanently, every time; `flaky` ones fail transiently on their
    /// first `flaky_failures` attempts; `conflict` ones fail permanently
    /// once (another processor won a race), then succeed.
    struct Fake {
        handled: Vec<Vec<u8>>,
        rejected: Vec<(Vec<u8>, String)>,
        calls: usize,
        flaky_failures: usize,
        conflicts_left: usize,
    }

    type Shared = std::sync::Arc<std::sync::Mutex<Fake>>;

    fn fake(flaky_failures: usize, conflicts_left: usize) -> Shared {
        std::sync::Arc::new(std::sync::Mutex::new(Fake {
            handled: Vec::new(),
            rejected: Vec::new(),
            calls: 0,
            flaky_failures,
            conflicts_left,
        }))
    }

    fn labelled(labels: &[&str]) -> Vec<Record> {
        labels
            .iter()
            .enumerate()
            .map(|(offset, label)| Record {
                topic: "t".into(),
                partition: 0,
                offset: offset as i64,
                key: None,
                value: Some(label.as_bytes().to_vec()),
                timestamp_ms: None,
            })
            .collect()
    }

    async fn run_fake(shared: &Shared, batch: Vec<Record>) -> Settled {
        let policy = RetryPolicy {
            first_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(2),
            isolated_attempts: 3,
        };
        let mut handle = |part: Vec<Record>| {
            let shared = shared.clone();
            async move {
                let mut fake = shared.lock().unwrap();
                fake.calls += 1;
                let values: Vec<Vec<u8>> = part.iter().filter_map(|r| r.value.clone()).collect();
                if values.iter().any(|v| v.starts_with(b"poison")) {
                    let nul = sqlx::Error::Protocol("invalid byte sequence 0x00".into());
                    return Err(BatchError::permanent(nul));
                }
                if values.iter().any(|v| v.starts_with(b"conflict")) && fake.conflicts_left > 0 {
                    fake.conflicts_left -= 1;
                    return Err(BatchError::permanent("decided concurrently"));
                }
                if values.iter().any(|v| v.starts_with(b"flaky")) && fake.flaky_failures > 0 {
                    fake.flaky_failures -= 1;
                    return Err(BatchError::transient("connection refused"));
                }
                fake.handled.extend(values);
                Ok(())
            }
        };
        let mut reject = |record: Record, reason: String| {
            let shared = shared.clone();
            async move {
                let mut fake = shared.lock().unwrap();
                fake.rejected
                    .push((record.value.unwrap_or_default(), reason));
                Ok(())
            }
        };
        let never = std::future::pending::<()>();
        settle(
            "test",
            batch,
            &policy,
            &mut handle,
            &mut reject,
            &mut std::pin::pin!(never),
        )
        .await
    }

    fn text(values: &[Vec<u8>]) -> Vec<String> {
        values
            .iter()
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect()
    }

    #[tokio::test]
    async fn a_poison_record_is_set_aside_and_the_rest_decided_in_order() {
        let shared = fake(0, 0);
        let batch = labelled(&["a", "b", "c", "poison", "d", "e", "f", "g"]);
        assert_eq!(run_fake(&shared, batch).await, Settled::Done);
        let fake = shared.lock().unwrap();
        assert_eq!(text(&fake.handled), ["a", "b", "c", "d", "e", "f", "g"]);
        assert_eq!(fake.rejected.len(), 1);
        assert_eq!(fake.rejected[0].0, b"poison");
        assert_eq!(
            fake.rejected[0].1,
            "permanent failure: encountered unexpected or invalid data: invalid byte sequence 0x00"
        );
    }

    #[tokio::test]
    async fn every_poison_record_of_a_batch_is_found() {
        let shared = fake(0, 0);
        let batch = labelled(&["poison1", "a", "poison2", "poison3", "b"]);
        assert_eq!(run_fake(&shared, batch).await, Settled::Done);
        let fake = shared.lock().unwrap();
        assert_eq!(text(&fake.handled), ["a", "b"]);
        let rejected: Vec<Vec<u8>> = fake.rejected.iter().map(|(v, _)| v.clone()).collect();
        assert_eq!(text(&rejected), ["poison1", "poison2", "poison3"]);
    }

    #[tokio::test]
    async fn a_transient_failure_retries_the_whole_batch_and_rejects_nothing() {
        let shared = fake(4, 0);
        let batch = labelled(&["a", "flaky", "b"]);
        assert_eq!(run_fake(&shared, batch).await, Settled::Done);
        let fake = shared.lock().unwrap();
        assert_eq!(text(&fake.handled), ["a", "flaky", "b"]);
        assert!(fake.rejected.is_empty());
        assert_eq!(fake.calls, 5, "four failures, then the same batch whole");
    }

    #[tokio::test]
    async fn a_conflict_that_resolves_on_the_next_attempt_is_not_set_aside() {
        let shared = fake(0, 2);
        let batch = labelled(&["conflict"]);
        assert_eq!(run_fake(&shared, batch).await, Settled::Done);
        let fake = shared.lock().unwrap();
        assert_eq!(text(&fake.handled), ["conflict"]);
        assert!(fake.rejected.is_empty());
    }

    #[tokio::test]
    async fn shutdown_during_retries_leaves_the_batch_undone() {
        let policy = RetryPolicy {
            first_backoff: Duration::from_secs(3600),
            ..RetryPolicy::default()
        };
        let mut handle =
            |_: Vec<Record>| async { Err::<(), _>(BatchError::transient("broker down")) };
        let mut reject = |_: Record, _: String| async { Ok(()) };
        let settled = settle(
            "test",
            labelled(&["a"]),
            &policy,
            &mut handle,
            &mut reject,
            &mut std::pin::pin!(async {}),
        )
        .await;
        assert_eq!(settled, Settled::Stopped);
    }

    #[test]
    fn values_postgres_refuses_are_permanent_and_outages_transient() {
        assert!(!crate::db::is_permanent(&sqlx::Error::PoolTimedOut));
        assert!(!crate::db::is_permanent(&sqlx::Error::Io(
            std::io::Error::from(std::io::ErrorKind::ConnectionRefused)
        )));
        assert!(crate::db::is_permanent(&sqlx::Error::Encode(
            "value too large".into()
        )));
        let error = BatchError::from(sqlx::Error::PoolTimedOut);
        assert!(!error.is_permanent());
    }
}
