//! The batch loop: handle, retry what is transient, isolate and set aside
//! what fails every time, store offsets only after the work is durable.

use std::future::Future;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::KafkaError;

use super::super::producer::PublishError;

use super::{next_batch, store_offsets, Record, RoleConsumer};

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
pub(super) async fn pause(
    backoff: Duration,
    shutdown: &mut (impl Future<Output = ()> + Unpin),
) -> bool {
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
pub(super) async fn set_aside<R, RFut>(
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

pub(super) fn commit_on_shutdown(name: &str, consumer: &RoleConsumer) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => tracing::info!(consumer = name, "offsets committed at shutdown"),
        Err(KafkaError::ConsumerCommit(rdkafka::error::RDKafkaErrorCode::NoOffset)) => {}
        Err(error) => tracing::warn!(consumer = name, %error, "final commit failed"),
    }
}
