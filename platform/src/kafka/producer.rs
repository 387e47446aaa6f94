//! The producer: every send is confirmed by the broker before it counts.
//!
//! `acks=all` plus librdkafka's idempotent producer means a retried send is
//! not duplicated by the broker; callers still design their events to be
//! idempotent (stable event ids), because a process can die between a send
//! and recording that it happened.

use std::sync::Arc;
use std::time::Duration;

use futures::future::try_join_all;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};

use coupon_schemas::{new_envelope, Envelope, Event};

use super::KafkaSettings;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("cannot create a Kafka producer for {brokers}: {source}")]
    Create { brokers: String, source: KafkaError },
    #[error("publishing to {topic} failed: {source}")]
    Send { topic: String, source: KafkaError },
    #[error("the producer shut down before {topic} confirmed delivery")]
    Canceled { topic: String },
}

impl PublishError {
    /// Whether the record itself was refused (too large, malformed, a
    /// timestamp or value the broker will never take), so that sending it
    /// again can never succeed. Everything else (timeouts, a broker down or
    /// electing a leader, a full queue, missing permissions that an
    /// operator fixes) may succeed later.
    pub fn is_permanent(&self) -> bool {
        let Self::Send { source, .. } = self else {
            return false;
        };
        let code = match source {
            KafkaError::MessageProduction(code) => *code,
            _ => return false,
        };
        matches!(
            code,
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidRecord
                | RDKafkaErrorCode::MessageBatchTooLarge
                | RDKafkaErrorCode::InvalidTimestamp
                | RDKafkaErrorCode::InvalidArgument
        )
    }
}

/// librdkafka's partitioner for every producer of the system: keyed records
/// go to `murmur2(key) % partitions`, exactly where the Java client's default
/// partitioner puts them (librdkafka's own default hashes with CRC32), so a
/// storefront publishing claims with the Java client reaches the partition
/// our gateway publishes the same user's claims to. Records without a key go
/// to a random partition. Checked against Apache Kafka's `Utils.murmur2` by
/// `tests/it/partitioner.rs`.
pub const PARTITIONER: &str = "murmur2_random";

/// Where a record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    pub partition: i32,
    pub offset: i64,
}

/// A cheap-to-clone handle on one librdkafka producer.
#[derive(Clone)]
pub struct Publisher {
    producer: FutureProducer,
    name: Arc<str>,
}

impl Publisher {
    /// `name` goes into every envelope's `producer` field.
    pub fn new(settings: &KafkaSettings, name: &str) -> Result<Self, PublishError> {
        let mut config = settings.client_config();
        config
            .set("acks", "all")
            .set("partitioner", PARTITIONER)
            .set("linger.ms", "2")
            .set("batch.num.messages", "10000")
            .set("queue.buffering.max.messages", "1000000")
            .set("message.timeout.ms", "30000")
            .set(
                "enable.idempotence",
                if settings.idempotent_producer {
                    "true"
                } else {
                    "false"
                },
            );
        let producer = config.create().map_err(|source| PublishError::Create {
            brokers: settings.brokers.clone(),
            source,
        })?;
        Ok(Self {
            producer,
            name: name.into(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A fresh envelope for an event of type `E` produced by this process.
    pub fn envelope<E: Event>(&self, correlation_id: &str) -> Envelope {
        new_envelope::<E>(
            uuid::Uuid::new_v4().to_string(),
            crate::time::now_ms(),
            &self.name,
            correlation_id,
        )
    }

    /// Publishes one event and waits for the broker's acknowledgement.
    pub async fn send<E: Event>(
        &self,
        topic: &str,
        key: &str,
        event: &E,
    ) -> Result<Delivered, PublishError> {
        self.send_bytes(topic, Some(key.as_bytes()), &event.encode_to_vec())
            .await
    }

    /// Puts one event in the producer's queue and returns at once (no
    /// broker round trip); the returned future resolves with the broker's
    /// acknowledgement. The producer retries delivery on its own (it is
    /// idempotent), so a caller may answer before the acknowledgement and
    /// only log a final failure.
    pub async fn enqueue_event<E: Event>(
        &self,
        topic: &str,
        key: &str,
        event: &E,
    ) -> Result<impl std::future::Future<Output = Result<Delivered, PublishError>>, PublishError>
    {
        let future = self
            .enqueue(topic, Some(key.as_bytes()), &event.encode_to_vec())
            .await?;
        let topic = topic.to_owned();
        Ok(async move { Self::confirm(&topic, future).await })
    }

    /// Publishes many events, pipelined, and waits until all are acknowledged.
    /// On error some may have been delivered: callers retry the whole set and
    /// rely on consumers deduplicating by event id.
    pub async fn send_all<K: AsRef<str>, E: Event>(
        &self,
        topic: &str,
        events: &[(K, E)],
    ) -> Result<(), PublishError> {
        self.enqueue_all(topic, events).await?.await
    }

    /// Puts many events in the producer's queue, in order, and returns what
    /// waits until all are acknowledged: the caller can do other work while
    /// the broker confirms (the claim processor decides its next batch).
    /// Events enqueued later land after these on each partition (the
    /// idempotent producer keeps that order through its retries).
    pub async fn enqueue_all<K: AsRef<str>, E: Event>(
        &self,
        topic: &str,
        events: &[(K, E)],
    ) -> Result<
        impl std::future::Future<Output = Result<(), PublishError>> + Send + 'static,
        PublishError,
    > {
        let mut pending = Vec::with_capacity(events.len());
        for (key, event) in events {
            let payload = event.encode_to_vec();
            pending.push(
                self.enqueue(topic, Some(key.as_ref().as_bytes()), &payload)
                    .await?,
            );
        }
        let topic = topic.to_owned();
        Ok(async move {
            try_join_all(pending.into_iter().map(|f| Self::confirm(&topic, f))).await?;
            Ok(())
        })
    }

    /// Publishes raw bytes (dead letters keep the original bytes; tests use it
    /// to publish poison records).
    pub async fn send_bytes(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
    ) -> Result<Delivered, PublishError> {
        let future = self.enqueue(topic, key, payload).await?;
        Self::confirm(topic, future).await
    }

    async fn enqueue(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
    ) -> Result<DeliveryFuture, PublishError> {
        let mut record = FutureRecord::<[u8], [u8]>::to(topic).payload(payload);
        if let Some(key) = key {
            record = record.key(key);
        }
        loop {
            match self.producer.send_result(record) {
                Ok(future) => return Ok(future),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // The local queue is full: let librdkafka drain it a little.
                    record = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((source, _)) => {
                    return Err(PublishError::Send {
                        topic: topic.to_owned(),
                        source,
                    })
                }
            }
        }
    }

    async fn confirm(topic: &str, future: DeliveryFuture) -> Result<Delivered, PublishError> {
        match future.await {
            Ok(Ok(delivery)) => Ok(Delivered {
                partition: delivery.partition,
                offset: delivery.offset,
            }),
            Ok(Err((source, _))) => Err(PublishError::Send {
                topic: topic.to_owned(),
                source,
            }),
            Err(_) => Err(PublishError::Canceled {
                topic: topic.to_owned(),
            }),
        }
    }

    /// Waits for everything in flight to be delivered (used at shutdown).
    pub fn flush(&self, timeout: Duration) {
        let _ = self.producer.flush(timeout);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::consumer::BatchError;

    fn send_error(code: RDKafkaErrorCode) -> PublishError {
        PublishError::Send {
            topic: "t".into(),
            source: KafkaError::MessageProduction(code),
        }
    }

    #[test]
    fn a_record_the_broker_refuses_is_permanent_and_an_outage_is_not() {
        for code in [
            RDKafkaErrorCode::MessageSizeTooLarge,
            RDKafkaErrorCode::InvalidRecord,
            RDKafkaErrorCode::MessageBatchTooLarge,
        ] {
            assert!(send_error(code).is_permanent(), "{code:?}");
            assert!(BatchError::from(send_error(code)).is_permanent());
        }
        for code in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::NotLeaderForPartition,
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::QueueFull,
        ] {
            assert!(!send_error(code).is_permanent(), "{code:?}");
        }
        let canceled = PublishError::Canceled { topic: "t".into() };
        assert!(!canceled.is_permanent());
    }
}
