//! Request/reply over Kafka: the gateway publishes a request and waits for
//! the decision with the same request id on the results topics.
//!
//! Each gateway instance reads *every* partition of `claim-results` and
//! `purchase-results` (plain assignment, no consumer group, no commits),
//! starting at the end as it was when the gateway started, and hands each
//! decision to the waiter registered under its request id; decisions for
//! other instances' requests are skipped. That keeps several gateways
//! independent with no routing. The start position is fixed before the
//! gateway accepts requests, so no reply can slip past unseen.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::oneshot;

use coupon_platform::kafka::{decode, Record};
use coupon_platform::{KafkaSettings, Topics};
use coupon_schemas::{ClaimDecided, PurchaseDecided};

type Waiters<T> = Mutex<HashMap<String, oneshot::Sender<T>>>;

/// Waiters by request id.
#[derive(Default)]
pub struct Replies {
    claims: Waiters<ClaimDecided>,
    purchases: Waiters<PurchaseDecided>,
}

/// Removes the waiter when the request is answered, times out or is dropped.
pub struct Pending<'a, T> {
    waiters: &'a Waiters<T>,
    request_id: String,
    receiver: Option<oneshot::Receiver<T>>,
}

impl<T> Pending<'_, T> {
    /// Waits for the decision; `None` on timeout.
    pub async fn wait(mut self, timeout: Duration) -> Option<T> {
        let receiver = self.receiver.take()?;
        tokio::time::timeout(timeout, receiver).await.ok()?.ok()
    }
}

impl<T> Drop for Pending<'_, T> {
    fn drop(&mut self) {
        if let Ok(mut waiters) = self.waiters.lock() {
            waiters.remove(&self.request_id);
        }
    }
}

fn register<'a, T>(waiters: &'a Waiters<T>, request_id: &str) -> Pending<'a, T> {
    let (sender, receiver) = oneshot::channel();
    if let Ok(mut map) = waiters.lock() {
        map.insert(request_id.to_owned(), sender);
    }
    Pending {
        waiters,
        request_id: request_id.to_owned(),
        receiver: Some(receiver),
    }
}

fn deliver<T>(waiters: &Waiters<T>, request_id: &str, value: T) {
    let sender = waiters
        .lock()
        .ok()
        .and_then(|mut map| map.remove(request_id));
    if let Some(sender) = sender {
        let _ = sender.send(value);
    }
}

impl Replies {
    pub fn expect_claim(&self, request_id: &str) -> Pending<'_, ClaimDecided> {
        register(&self.claims, request_id)
    }

    pub fn expect_purchase(&self, request_id: &str) -> Pending<'_, PurchaseDecided> {
        register(&self.purchases, request_id)
    }

    pub fn waiting(&self) -> usize {
        self.claims.lock().map(|m| m.len()).unwrap_or(0)
            + self.purchases.lock().map(|m| m.len()).unwrap_or(0)
    }
}

/// Creates the results consumer, positioned at the current end of every
/// partition of both results topics.
pub async fn results_consumer(
    kafka: &KafkaSettings,
    topics: &Topics,
    fetch_wait_max_ms: u32,
) -> Result<StreamConsumer, KafkaError> {
    let mut config = kafka.client_config();
    config
        .set(
            "group.id",
            format!(
                "{}.gateway-{}",
                topics.prefix(),
                uuid::Uuid::new_v4().simple()
            ),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("fetch.wait.max.ms", fetch_wait_max_ms.to_string())
        .set("enable.partition.eof", "false");
    let consumer: StreamConsumer = config.create()?;
    let names = [topics.claim_results(), topics.purchase_results()];
    // Metadata and watermark look-ups block; keep them off the async workers.
    let consumer = tokio::task::spawn_blocking(move || -> Result<StreamConsumer, KafkaError> {
        let mut assignment = TopicPartitionList::new();
        for topic in &names {
            let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
            for t in metadata.topics() {
                if let Some(error) = t.error() {
                    return Err(KafkaError::MetadataFetch(error.into()));
                }
                for partition in t.partitions() {
                    let (_, high) = consumer.fetch_watermarks(
                        topic,
                        partition.id(),
                        Duration::from_secs(10),
                    )?;
                    assignment.add_partition_offset(topic, partition.id(), Offset::Offset(high))?;
                }
            }
        }
        consumer.assign(&assignment)?;
        Ok(consumer)
    })
    .await
    .map_err(|_| KafkaError::Canceled)??;
    Ok(consumer)
}

/// Delivers decisions to waiters until shutdown.
pub async fn dispatch(
    consumer: StreamConsumer,
    topics: Topics,
    replies: Arc<Replies>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let claim_results = topics.claim_results();
    loop {
        let message = tokio::select! {
            _ = &mut shutdown => break,
            message = consumer.recv() => message,
        };
        let record = match message {
            Ok(message) => Record::from_message(&message),
            Err(error) => {
                tracing::warn!(%error, "results consumer error");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if record.topic == claim_results {
            if let Ok(decision) = decode::<ClaimDecided>(&record) {
                let id = decision.request_id.clone();
                deliver(&replies.claims, &id, decision);
            }
        } else if let Ok(decision) = decode::<PurchaseDecided>(&record) {
            let id = decision.request_id.clone();
            deliver(&replies.purchases, &id, decision);
        }
    }
}
