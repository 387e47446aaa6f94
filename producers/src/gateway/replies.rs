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
//!
//! Waiters are keyed by request id *and* user: the request id is the
//! client's (`x-request-id`), so two users may send the same one at the same
//! moment, and each must get the decision addressed to them (the claim
//! processor answers the second user `invalid`, never with the first one's
//! decision). Several waiters under one key (a client retrying a request
//! that is still pending) all get the decision.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::oneshot;

use coupon_platform::kafka::{decode, Record};
use coupon_platform::{KafkaSettings, Topics};
use coupon_schemas::{ClaimDecided, PurchaseDecided};

/// A request id and the user the request was sent for.
type Key = (String, String);

/// The waiters under one key, each with its own number.
type Waiters<T> = Mutex<HashMap<Key, Vec<(u64, oneshot::Sender<T>)>>>;

/// Waiters by request id and user.
#[derive(Default)]
pub struct Replies {
    claims: Waiters<ClaimDecided>,
    purchases: Waiters<PurchaseDecided>,
    next_waiter: AtomicU64,
}

/// Removes the waiter when the request is answered, times out or is dropped.
pub struct Pending<'a, T> {
    waiters: &'a Waiters<T>,
    key: Key,
    waiter: u64,
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
        // Only this waiter: another request under the same key may still wait.
        if let Ok(mut waiters) = self.waiters.lock() {
            if let Some(list) = waiters.get_mut(&self.key) {
                list.retain(|(waiter, _)| *waiter != self.waiter);
                if list.is_empty() {
                    waiters.remove(&self.key);
                }
            }
        }
    }
}

fn register<'a, T>(
    waiters: &'a Waiters<T>,
    waiter: u64,
    request_id: &str,
    user_id: &str,
) -> Pending<'a, T> {
    let (sender, receiver) = oneshot::channel();
    let key = (request_id.to_owned(), user_id.to_owned());
    if let Ok(mut map) = waiters.lock() {
        map.entry(key.clone()).or_default().push((waiter, sender));
    }
    Pending {
        waiters,
        key,
        waiter,
        receiver: Some(receiver),
    }
}

fn deliver<T: Clone>(waiters: &Waiters<T>, request_id: &str, user_id: &str, value: T) {
    let key = (request_id.to_owned(), user_id.to_owned());
    let senders = waiters
        .lock()
        .ok()
        .and_then(|mut map| map.remove(&key))
        .unwrap_or_default();
    for (_, sender) in senders {
        let _ = sender.send(value.clone());
    }
}

impl Replies {
    /// Registers before publishing: the decision for `user_id`'s claim
    /// `request_id` goes to this waiter.
    pub fn expect_claim(&self, request_id: &str, user_id: &str) -> Pending<'_, ClaimDecided> {
        let waiter = self.next_waiter.fetch_add(1, Ordering::Relaxed);
        register(&self.claims, waiter, request_id, user_id)
    }

    pub fn expect_purchase(&self, request_id: &str, user_id: &str) -> Pending<'_, PurchaseDecided> {
        let waiter = self.next_waiter.fetch_add(1, Ordering::Relaxed);
        register(&self.purchases, waiter, request_id, user_id)
    }

    pub fn waiting(&self) -> usize {
        fn count<T>(waiters: &Waiters<T>) -> usize {
            waiters
                .lock()
                .map(|map| map.values().map(Vec::len).sum())
                .unwrap_or(0)
        }
        count(&self.claims) + count(&self.purchases)
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
                let (id, user) = (decision.request_id.clone(), decision.user_id.clone());
                deliver(&replies.claims, &id, &user, decision);
            }
        } else if let Ok(decision) = decode::<PurchaseDecided>(&record) {
            let (id, user) = (decision.request_id.clone(), decision.user_id.clone());
            deliver(&replies.purchases, &id, &user, decision);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decided(request_id: &str, user_id: &str) -> ClaimDecided {
        ClaimDecided {
            request_id: request_id.into(),
            user_id: user_id.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn two_users_with_one_request_id_each_get_their_own_decision() {
        let replies = Replies::default();
        let first = replies.expect_claim("same-id", "alice");
        let second = replies.expect_claim("same-id", "bob");
        deliver(&replies.claims, "same-id", "bob", decided("same-id", "bob"));
        deliver(
            &replies.claims,
            "same-id",
            "alice",
            decided("same-id", "alice"),
        );
        let wait = Duration::from_secs(5);
        assert_eq!(
            second.wait(wait).await.map(|d| d.user_id),
            Some("bob".into())
        );
        assert_eq!(
            first.wait(wait).await.map(|d| d.user_id),
            Some("alice".into())
        );
        assert_eq!(replies.waiting(), 0);
    }

    #[tokio::test]
    async fn a_retry_while_pending_does_not_orphan_the_first_request() {
        let replies = Replies::default();
        let first = replies.expect_claim("retry", "alice");
        let second = replies.expect_claim("retry", "alice");
        drop(second);
        assert_eq!(replies.waiting(), 1, "dropping one waiter keeps the other");
        deliver(&replies.claims, "retry", "alice", decided("retry", "alice"));
        assert!(first.wait(Duration::from_secs(5)).await.is_some());
    }
}
