//! Group consumers and the batch loop every projector and processor runs.
//!
//! Delivery guarantee: **at least once, effects exactly once.** A batch's
//! offsets are stored only after its handler returned `Ok` and the broker
//! acknowledged the follow-up events it published, i.e. after the work is
//! durable in Postgres and in the log. (A handler may leave those
//! acknowledgements outstanding, [`Confirmations`]: the loop handles the
//! next batch meanwhile, but stores offsets in order, each batch's only once
//! its own are in.) A crash before that redelivers the batch; the handlers are
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
//!
//! `record` decodes a record into its event, `dead_letter` sets one aside,
//! `batches` is the loop; this file makes the group consumer and its batches.

mod batches;
mod dead_letter;
mod record;

pub use batches::*;
pub use dead_letter::*;
pub use record::*;

use std::collections::BTreeMap;
use std::time::Duration;

use futures::FutureExt;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};

use super::{GroupProtocol, KafkaSettings};

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

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    use super::super::producer::Publisher;
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
