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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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

/// One waiting request: its number, the order it buys (empty for a claim)
/// and where its decision goes.
struct Waiter<T> {
    id: u64,
    order_id: String,
    sender: oneshot::Sender<T>,
}

/// The waiters under one key.
type Waiters<T> = Mutex<HashMap<Key, Vec<Waiter<T>>>>;

/// Waiters by request id and user, at most `limit` at a time.
pub struct Replies {
    claims: Waiters<ClaimDecided>,
    purchases: Waiters<PurchaseDecided>,
    next_waiter: AtomicU64,
    waiting: AtomicUsize,
    limit: usize,
}

impl Default for Replies {
    /// Without a limit (tests); the gateway uses [`Replies::bounded`].
    fn default() -> Self {
        Self::bounded(usize::MAX)
    }
}

/// The table of waiting requests is full: answer `503` rather than queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0} requests are already waiting for their decision")]
pub struct Full(pub usize);

/// Removes the waiter when the request is answered, times out or is dropped.
pub struct Pending<'a, T> {
    waiters: &'a Waiters<T>,
    waiting: &'a AtomicUsize,
    key: Key,
    waiter: u64,
    receiver: Option<oneshot::Receiver<T>>,
}

impl<T> Pending<'_, T> {
    /// Waits for the decision; `None` on timeout.
    pub async fn wait(self, timeout: Duration) -> Option<T> {
        self.wait_until(tokio::time::Instant::now() + timeout).await
    }

    /// Waits for the decision until `deadline`; `None` when it passed.
    pub async fn wait_until(mut self, deadline: tokio::time::Instant) -> Option<T> {
        let receiver = self.receiver.take()?;
        tokio::time::timeout_at(deadline, receiver).await.ok()?.ok()
    }
}

impl<T> Drop for Pending<'_, T> {
    fn drop(&mut self) {
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        // Only this waiter: another request under the same key may still wait.
        if let Ok(mut waiters) = self.waiters.lock() {
            if let Some(list) = waiters.get_mut(&self.key) {
                list.retain(|waiter| waiter.id != self.waiter);
                if list.is_empty() {
                    waiters.remove(&self.key);
                }
            }
        }
    }
}

/// Hands `value` to the waiters of `user_id`'s request `request_id` that
/// buy `order_id` (empty for a claim): two purchases of different orders
/// under one request id each get their own answer, refusals included (they
/// name the order they refuse), and an answer naming no order reaches no
/// purchase.
fn deliver<T: Clone>(
    waiters: &Waiters<T>,
    request_id: &str,
    user_id: &str,
    order_id: &str,
    value: T,
) {
    let key = (request_id.to_owned(), user_id.to_owned());
    let mut ready = Vec::new();
    if let Ok(mut map) = waiters.lock() {
        if let Some(list) = map.get_mut(&key) {
            let (matching, others): (Vec<_>, Vec<_>) = std::mem::take(list)
                .into_iter()
                .partition(|waiter| waiter.order_id == order_id);
            ready = matching;
            *list = others;
            if list.is_empty() {
                map.remove(&key);
            }
        }
    }
    for waiter in ready {
        let _ = waiter.sender.send(value.clone());
    }
}

impl Replies {
    /// A table that holds at most `limit` waiting requests.
    pub fn bounded(limit: usize) -> Self {
        Self {
            claims: Mutex::default(),
            purchases: Mutex::default(),
            next_waiter: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
            limit,
        }
    }

    fn register<'a, T>(
        &'a self,
        waiters: &'a Waiters<T>,
        request_id: &str,
        user_id: &str,
        order_id: &str,
    ) -> Result<Pending<'a, T>, Full> {
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= self.limit {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(Full(self.limit));
        }
        let id = self.next_waiter.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = oneshot::channel();
        let key = (request_id.to_owned(), user_id.to_owned());
        if let Ok(mut map) = waiters.lock() {
            map.entry(key.clone()).or_default().push(Waiter {
                id,
                order_id: order_id.to_owned(),
                sender,
            });
        }
        Ok(Pending {
            waiters,
            waiting: &self.waiting,
            key,
            waiter: id,
            receiver: Some(receiver),
        })
    }

    /// Registers before publishing: the decision for `user_id`'s claim
    /// `request_id` goes to this waiter.
    pub fn expect_claim(
        &self,
        request_id: &str,
        user_id: &str,
    ) -> Result<Pending<'_, ClaimDecided>, Full> {
        self.register(&self.claims, request_id, user_id, "")
    }

    /// Registers before publishing: the decision for `user_id`'s purchase of
    /// `order_id` under `request_id` goes to this waiter.
    pub fn expect_purchase(
        &self,
        request_id: &str,
        user_id: &str,
        order_id: &str,
    ) -> Result<Pending<'_, PurchaseDecided>, Full> {
        self.register(&self.purchases, request_id, user_id, order_id)
    }

    /// Requests waiting for their decision.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }
}

/// How long the gateway waits at start for its results topics to have
/// leaders.
const TOPIC_READY_WAIT: Duration = Duration::from_secs(30);

/// Each partition of `topic` with its high watermark.
fn partition_ends(consumer: &StreamConsumer, topic: &str) -> Result<Vec<(i32, i64)>, KafkaError> {
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut ends = Vec::new();
    for t in metadata.topics() {
        if let Some(error) = t.error() {
            return Err(KafkaError::MetadataFetch(error.into()));
        }
        for partition in t.partitions() {
            let (_, high) =
                consumer.fetch_watermarks(topic, partition.id(), Duration::from_secs(10))?;
            ends.push((partition.id(), high));
        }
    }
    if ends.is_empty() {
        return Err(KafkaError::MetadataFetch(
            rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition,
        ));
    }
    Ok(ends)
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
    let names = topics.read_by(coupon_schemas::Role::Gateway);
    // Metadata and watermark look-ups block; keep them off the async workers.
    let consumer = tokio::task::spawn_blocking(move || -> Result<StreamConsumer, KafkaError> {
        // Topics created a moment ago (a fresh prefix) may have no leader
        // yet: the broker answers UnknownTopicOrPartition or
        // NotLeaderForPartition for a while, so the look-up is retried
        // until TOPIC_READY_WAIT has passed.
        let deadline = std::time::Instant::now() + TOPIC_READY_WAIT;
        let mut assignment = TopicPartitionList::new();
        for topic in &names {
            let ends = loop {
                match partition_ends(&consumer, topic) {
                    Ok(ends) => break ends,
                    Err(error) if std::time::Instant::now() < deadline => {
                        tracing::debug!(%error, topic = %topic, "results topic not ready; retrying");
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    Err(error) => return Err(error),
                }
            };
            for (partition, high) in ends {
                assignment.add_partition_offset(topic, partition, Offset::Offset(high))?;
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
                deliver(&replies.claims, &id, &user, "", decision);
            }
        } else if let Ok(decision) = decode::<PurchaseDecided>(&record) {
            let (id, user, order) = (
                decision.request_id.clone(),
                decision.user_id.clone(),
                decision.order_id.clone(),
            );
            deliver(&replies.purchases, &id, &user, &order, decision);
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
        let first = replies.expect_claim("same-id", "alice").unwrap();
        let second = replies.expect_claim("same-id", "bob").unwrap();
        deliver(
            &replies.claims,
            "same-id",
            "bob",
            "",
            decided("same-id", "bob"),
        );
        deliver(
            &replies.claims,
            "same-id",
            "alice",
            "",
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
        let first = replies.expect_claim("retry", "alice").unwrap();
        let second = replies.expect_claim("retry", "alice").unwrap();
        drop(second);
        assert_eq!(replies.waiting(), 1, "dropping one waiter keeps the other");
        deliver(
            &replies.claims,
            "retry",
            "alice",
            "",
            decided("retry", "alice"),
        );
        assert!(first.wait(Duration::from_secs(5)).await.is_some());
    }

    #[tokio::test]
    async fn a_retry_while_pending_gets_the_same_decision() {
        let replies = Replies::default();
        let first = replies.expect_claim("again", "alice").unwrap();
        let second = replies.expect_claim("again", "alice").unwrap();
        deliver(
            &replies.claims,
            "again",
            "alice",
            "",
            decided("again", "alice"),
        );
        let wait = Duration::from_secs(5);
        assert!(first.wait(wait).await.is_some());
        assert!(second.wait(wait).await.is_some(), "no spurious timeout");
        assert_eq!(replies.waiting(), 0);
    }

    #[tokio::test]
    async fn purchases_of_two_orders_under_one_request_id_get_their_own_answer() {
        let replies = Replies::default();
        let one = replies.expect_purchase("p", "alice", "order-1").unwrap();
        let two = replies.expect_purchase("p", "alice", "order-2").unwrap();
        let decided = |order: &str| PurchaseDecided {
            request_id: "p".into(),
            user_id: "alice".into(),
            order_id: order.into(),
            ..Default::default()
        };
        deliver(
            &replies.purchases,
            "p",
            "alice",
            "order-2",
            decided("order-2"),
        );
        deliver(
            &replies.purchases,
            "p",
            "alice",
            "order-1",
            decided("order-1"),
        );
        let wait = Duration::from_secs(5);
        assert_eq!(
            two.wait(wait).await.map(|d| d.order_id),
            Some("order-2".into())
        );
        assert_eq!(
            one.wait(wait).await.map(|d| d.order_id),
            Some("order-1".into())
        );
    }

    /// Issue #24, item 4: a refusal reaches only the request it refuses.
    /// Before, an answer naming no order (the processor's `invalid` and
    /// `conflict` answers named none) went to every purchase waiting under
    /// the request id, so one user's second order got the first's refusal.
    #[tokio::test]
    async fn a_refusal_reaches_only_the_order_it_refuses() {
        let replies = Replies::default();
        let taken = replies.expect_purchase("p", "bob", "order-taken").unwrap();
        let own = replies.expect_purchase("p", "bob", "order-own").unwrap();
        let refused = PurchaseDecided {
            request_id: "p".into(),
            user_id: "bob".into(),
            order_id: "order-taken".into(),
            outcome: coupon_schemas::PurchaseOutcome::Conflict as i32,
            ..Default::default()
        };
        deliver(&replies.purchases, "p", "bob", "order-taken", refused);
        // An answer that names no order is no purchase's.
        deliver(
            &replies.purchases,
            "p",
            "bob",
            "",
            PurchaseDecided::default(),
        );
        let wait = Duration::from_millis(200);
        assert_eq!(
            taken.wait(wait).await.map(|d| d.outcome),
            Some(coupon_schemas::PurchaseOutcome::Conflict as i32)
        );
        assert!(own.wait(wait).await.is_none(), "order-own is still waiting");
    }

    #[test]
    fn the_table_is_bounded_and_frees_its_places() {
        let replies = Replies::bounded(2);
        let a = replies.expect_claim("a", "u").unwrap();
        let _b = replies.expect_purchase("b", "u", "o").unwrap();
        assert_eq!(replies.expect_claim("c", "u").err(), Some(Full(2)));
        assert_eq!(replies.waiting(), 2);
        drop(a);
        assert_eq!(replies.waiting(), 1);
        assert!(replies.expect_claim("c", "u").is_ok());
    }
}
