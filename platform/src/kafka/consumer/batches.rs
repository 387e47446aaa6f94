//! The batch loop: handle, retry what is transient, isolate and set aside
//! what fails every time, store offsets only after the work is durable.

use std::future::Future;
use std::time::Duration;

use futures::future::{try_join_all, BoxFuture};

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

/// What a handled batch still waits for before it is done: the broker's
/// acknowledgement of the events its handler published.
///
/// A handler that publishes can return these instead of awaiting them, so
/// that [`run_batches`] decides the next batch while the broker confirms
/// this one's (the claim processor: the confirmation was a third of each
/// batch's time, spent idle). The loop still stores a batch's offsets only
/// once its confirmations resolved, and in the order the batches came.
#[must_use = "a batch is done only once its confirmations resolve"]
#[derive(Default)]
pub struct Confirmations(Vec<BoxFuture<'static, Result<(), BatchError>>>);

impl Confirmations {
    /// Nothing outstanding: the batch is done when its handler returns.
    pub fn none() -> Self {
        Self::default()
    }

    /// One outstanding confirmation.
    pub fn of(confirmation: impl Future<Output = Result<(), BatchError>> + Send + 'static) -> Self {
        Self(vec![Box::pin(confirmation)])
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn extend(&mut self, other: Confirmations) {
        self.0.extend(other.0);
    }

    /// Waits for every confirmation; the first failure is the result.
    pub async fn confirmed(self) -> Result<(), BatchError> {
        try_join_all(self.0).await.map(|_| ())
    }
}

impl From<()> for Confirmations {
    fn from((): ()) -> Self {
        Self::none()
    }
}

/// Where [`run_batches`] gets its batches and marks them done: the group
/// consumer, or a fake in the loop's tests.
pub trait BatchSource {
    /// Waits for at least one record, then takes what else is at hand, up
    /// to `max`.
    fn next(&self, max: usize) -> impl Future<Output = Result<Vec<Record>, KafkaError>>;
    /// Marks `batch` done: the next commit resumes after it.
    fn store(&self, batch: &[Record]) -> Result<(), KafkaError>;
    /// Commits what is stored (graceful shutdown).
    fn commit(&self, name: &str);
}

impl BatchSource for RoleConsumer {
    fn next(&self, max: usize) -> impl Future<Output = Result<Vec<Record>, KafkaError>> {
        next_batch(self, max)
    }

    fn store(&self, batch: &[Record]) -> Result<(), KafkaError> {
        store_offsets(self, batch)
    }

    fn commit(&self, name: &str) {
        commit_on_shutdown(name, self)
    }
}

/// A batch handled whose confirmations are outstanding.
struct InFlight {
    batch: Vec<Record>,
    confirming: BoxFuture<'static, Result<(), BatchError>>,
}

/// What the loop waits for next.
enum Next {
    Shutdown,
    Confirmed(Result<(), BatchError>),
    Batch(Result<Vec<Record>, KafkaError>),
}

/// The in-flight batch's confirmation, or never when there is none.
async fn confirmation_of(in_flight: &mut Option<InFlight>) -> Result<(), BatchError> {
    match in_flight {
        Some(in_flight) => in_flight.confirming.as_mut().await,
        None => std::future::pending().await,
    }
}

/// Runs `handle` on batches until `shutdown` resolves; see [`settle`] for
/// what a failure does. A batch's offsets are stored once every record in
/// it is done and the [`Confirmations`] its handler returned resolved; the
/// next batch is handled while they are outstanding (at most one batch is),
/// and offsets are stored in the order the batches came. A confirmation that
/// fails has its batch handled again (the handlers are idempotent: it
/// publishes the same events), this time awaited, before anything after it
/// is stored. Shutdown waits for the batch in hand and its confirmations,
/// then commits.
pub async fn run_batches<S, H, HFut, R, RFut>(
    name: &str,
    source: S,
    max_batch: usize,
    mut handle: H,
    mut reject: R,
    shutdown: impl Future<Output = ()>,
) where
    S: BatchSource,
    H: FnMut(Vec<Record>) -> HFut,
    HFut: Future<Output = Result<Confirmations, BatchError>>,
    R: FnMut(Record, String) -> RFut,
    RFut: Future<Output = Result<(), BatchError>>,
{
    tokio::pin!(shutdown);
    let policy = RetryPolicy::default();
    let mut in_flight: Option<InFlight> = None;
    loop {
        let next = tokio::select! {
            biased;
            _ = &mut shutdown => Next::Shutdown,
            confirmed = confirmation_of(&mut in_flight) => Next::Confirmed(confirmed),
            batch = source.next(max_batch) => Next::Batch(batch),
        };
        // The batch confirmed before (alone, or while this one was handled),
        // and this one, handled, with its confirmations.
        let (previous, handled) = match next {
            Next::Shutdown => break,
            Next::Confirmed(confirmed) => (
                in_flight
                    .take()
                    .map(|InFlight { batch, .. }| (batch, confirmed)),
                None,
            ),
            Next::Batch(Err(error)) => {
                tracing::warn!(consumer = name, %error, "consumer error");
                metrics::counter!("coupon_consumer_errors_total", "consumer" => name.to_owned())
                    .increment(1);
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Next::Batch(Ok(batch)) => {
                let outstanding = std::sync::Mutex::new(Confirmations::none());
                let (outstanding_of_parts, handler) = (&outstanding, &mut handle);
                let mut collecting = move |records: Vec<Record>| {
                    let handled = handler(records);
                    async move {
                        let confirmations = handled.await?;
                        if let Ok(mut outstanding) = outstanding_of_parts.lock() {
                            outstanding.extend(confirmations);
                        }
                        Ok(())
                    }
                };
                let settling = settle(
                    name,
                    batch.clone(),
                    &policy,
                    &mut collecting,
                    &mut reject,
                    &mut shutdown,
                );
                let (settled, previous) = match in_flight.take() {
                    Some(InFlight {
                        batch: previous,
                        confirming,
                    }) => {
                        let (settled, confirmed) = futures::join!(settling, confirming);
                        (settled, Some((previous, confirmed)))
                    }
                    None => (settling.await, None),
                };
                let confirmations = outstanding.into_inner().unwrap_or_default();
                (previous, Some((batch, settled, confirmations)))
            }
        };
        if let Some((previous, confirmed)) = previous {
            let finished = finish(
                name,
                &source,
                previous,
                confirmed,
                &policy,
                &mut handle,
                &mut reject,
                &mut shutdown,
            )
            .await;
            if finished == Settled::Stopped {
                source.commit(name);
                return;
            }
        }
        let Some((batch, settled, confirmations)) = handled else {
            continue;
        };
        if settled == Settled::Stopped {
            // Not stored: the batch is redelivered to whoever runs next.
            source.commit(name);
            return;
        }
        if confirmations.is_empty() {
            mark_done(name, &source, &batch);
        } else {
            in_flight = Some(InFlight {
                batch,
                confirming: Box::pin(confirmations.confirmed()),
            });
        }
    }
    if let Some(InFlight { batch, confirming }) = in_flight {
        // Shutdown: no retries; an unconfirmed batch is redelivered.
        match confirming.await {
            Ok(()) => mark_done(name, &source, &batch),
            Err(error) => {
                tracing::warn!(consumer = name, error = %error.report(), "a batch's events were not confirmed before shutdown; it will be redelivered")
            }
        }
    }
    source.commit(name);
}

/// Stores a batch's offsets once its confirmations resolved with `confirmed`;
/// if they failed, handles the batch again, awaiting its confirmations this
/// time (retried and isolated as [`settle`] does), then stores them.
#[allow(clippy::too_many_arguments)]
async fn finish<S, H, HFut, R, RFut>(
    name: &str,
    source: &S,
    batch: Vec<Record>,
    confirmed: Result<(), BatchError>,
    policy: &RetryPolicy,
    handle: &mut H,
    reject: &mut R,
    shutdown: &mut (impl Future<Output = ()> + Unpin),
) -> Settled
where
    S: BatchSource,
    H: FnMut(Vec<Record>) -> HFut,
    HFut: Future<Output = Result<Confirmations, BatchError>>,
    R: FnMut(Record, String) -> RFut,
    RFut: Future<Output = Result<(), BatchError>>,
{
    if let Err(error) = confirmed {
        tracing::warn!(consumer = name, error = %error.report(), records = batch.len(), "the broker did not confirm a batch's events; handling it again");
        metrics::counter!("coupon_batch_retries_total", "consumer" => name.to_owned()).increment(1);
        let mut confirming = |records: Vec<Record>| {
            let handled = handle(records);
            async move { handled.await?.confirmed().await }
        };
        let settled = settle(
            name,
            batch.clone(),
            policy,
            &mut confirming,
            reject,
            shutdown,
        )
        .await;
        if settled == Settled::Stopped {
            return settled;
        }
    }
    mark_done(name, source, &batch);
    Settled::Done
}

/// Stores a batch's offsets and counts its records.
fn mark_done(name: &str, source: &impl BatchSource, batch: &[Record]) {
    metrics::counter!("coupon_records_processed_total", "consumer" => name.to_owned())
        .increment(batch.len() as u64);
    if let Err(error) = source.store(batch) {
        // Happens when the partition was revoked meanwhile: its new owner
        // reprocesses the batch, which is harmless.
        tracing::debug!(consumer = name, %error, "could not store offsets");
    }
}

pub(super) fn commit_on_shutdown(name: &str, consumer: &RoleConsumer) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => tracing::info!(consumer = name, "offsets committed at shutdown"),
        Err(KafkaError::ConsumerCommit(rdkafka::error::RDKafkaErrorCode::NoOffset)) => {}
        Err(error) => tracing::warn!(consumer = name, %error, "final commit failed"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, VecDeque};
    use std::sync::{Arc, Mutex};

    use tokio::sync::oneshot;

    use super::*;

    /// The batches a fake source hands out, what each handling of a batch
    /// returns as its confirmation, and the log of what happened.
    #[derive(Default)]
    struct Script {
        batches: VecDeque<Vec<Record>>,
        confirmations: HashMap<String, VecDeque<Confirmations>>,
        log: Vec<String>,
    }

    #[derive(Clone, Default)]
    struct Fake(Arc<Mutex<Script>>);

    impl Fake {
        fn with_batches(labels: &[&str]) -> Self {
            let fake = Fake::default();
            for (offset, label) in labels.iter().enumerate() {
                fake.0.lock().unwrap().batches.push_back(vec![Record {
                    topic: "t".into(),
                    partition: 0,
                    offset: offset as i64,
                    key: None,
                    value: Some(label.as_bytes().to_vec()),
                    timestamp_ms: None,
                }]);
            }
            fake
        }

        /// The next handling of batch `label` returns a confirmation that
        /// resolves when the returned sender says so.
        fn gate(&self, label: &str) -> oneshot::Sender<Result<(), BatchError>> {
            let (tx, rx) = oneshot::channel();
            let confirmation = Confirmations::of(async move {
                rx.await
                    .unwrap_or_else(|_| Err(BatchError::transient("gate dropped")))
            });
            self.0
                .lock()
                .unwrap()
                .confirmations
                .entry(label.to_owned())
                .or_default()
                .push_back(confirmation);
            tx
        }

        fn log(&self) -> Vec<String> {
            self.0.lock().unwrap().log.clone()
        }

        async fn until(&self, entry: &str) {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while !self.log().iter().any(|e| e == entry) {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no {entry:?} in {:?}",
                    self.log()
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }

        fn run(&self, shutdown: oneshot::Receiver<()>) -> tokio::task::JoinHandle<()> {
            let fake = self.clone();
            tokio::spawn(async move {
                let source = fake.clone();
                let handle = move |records: Vec<Record>| {
                    let fake = fake.clone();
                    async move {
                        let label = label_of(&records);
                        let mut script = fake.0.lock().unwrap();
                        script.log.push(format!("handle {label}"));
                        let confirmation = script
                            .confirmations
                            .get_mut(&label)
                            .and_then(VecDeque::pop_front)
                            .unwrap_or_default();
                        Ok(confirmation)
                    }
                };
                let reject = |_: Record, _: String| async { Ok(()) };
                run_batches("test", source, 10, handle, reject, async {
                    let _ = shutdown.await;
                })
                .await;
            })
        }
    }

    fn label_of(records: &[Record]) -> String {
        records
            .iter()
            .filter_map(|r| r.value.as_deref())
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect::<Vec<_>>()
            .join(",")
    }

    impl BatchSource for Fake {
        async fn next(&self, _max: usize) -> Result<Vec<Record>, KafkaError> {
            let batch = self.0.lock().unwrap().batches.pop_front();
            match batch {
                Some(batch) => Ok(batch),
                None => std::future::pending().await,
            }
        }

        fn store(&self, batch: &[Record]) -> Result<(), KafkaError> {
            let entry = format!("store {}", label_of(batch));
            self.0.lock().unwrap().log.push(entry);
            Ok(())
        }

        fn commit(&self, _name: &str) {
            self.0.lock().unwrap().log.push("commit".into());
        }
    }

    #[tokio::test]
    async fn the_next_batch_is_handled_while_one_is_confirmed_and_offsets_are_stored_in_order() {
        let fake = Fake::with_batches(&["a", "b"]);
        let confirm_a = fake.gate("a");
        let confirm_b = fake.gate("b");
        let (stop, shutdown) = oneshot::channel();
        let running = fake.run(shutdown);
        fake.until("handle b").await;
        assert_eq!(
            fake.log(),
            ["handle a", "handle b"],
            "nothing stored unconfirmed"
        );
        // b is confirmed first, but a came first: nothing is stored until a is.
        confirm_b.send(Ok(())).unwrap();
        tokio::task::yield_now().await;
        assert!(!fake.log().iter().any(|e| e.starts_with("store")));
        confirm_a.send(Ok(())).unwrap();
        fake.until("store b").await;
        stop.send(()).unwrap();
        running.await.unwrap();
        assert_eq!(
            fake.log(),
            ["handle a", "handle b", "store a", "store b", "commit"]
        );
    }

    #[tokio::test]
    async fn a_failed_confirmation_handles_its_batch_again_before_anything_later_is_stored() {
        let fake = Fake::with_batches(&["a", "b"]);
        let confirm_a = fake.gate("a");
        let (stop, shutdown) = oneshot::channel();
        let running = fake.run(shutdown);
        fake.until("handle b").await;
        confirm_a
            .send(Err(BatchError::transient("message timed out")))
            .unwrap();
        fake.until("store b").await;
        stop.send(()).unwrap();
        running.await.unwrap();
        assert_eq!(
            fake.log(),
            ["handle a", "handle b", "handle a", "store a", "store b", "commit"]
        );
    }

    #[tokio::test]
    async fn shutdown_waits_for_the_batch_in_flight_and_stores_it_once_confirmed() {
        let fake = Fake::with_batches(&["a"]);
        let confirm_a = fake.gate("a");
        let (stop, shutdown) = oneshot::channel();
        let running = fake.run(shutdown);
        fake.until("handle a").await;
        stop.send(()).unwrap();
        tokio::task::yield_now().await;
        assert_eq!(
            fake.log(),
            ["handle a"],
            "not committed before its confirmation"
        );
        confirm_a.send(Ok(())).unwrap();
        running.await.unwrap();
        assert_eq!(fake.log(), ["handle a", "store a", "commit"]);
    }

    #[tokio::test]
    async fn a_batch_that_is_not_confirmed_by_shutdown_is_left_for_redelivery() {
        let fake = Fake::with_batches(&["a"]);
        let confirm_a = fake.gate("a");
        let (stop, shutdown) = oneshot::channel();
        let running = fake.run(shutdown);
        fake.until("handle a").await;
        stop.send(()).unwrap();
        confirm_a
            .send(Err(BatchError::transient("broker gone")))
            .unwrap();
        running.await.unwrap();
        assert_eq!(fake.log(), ["handle a", "commit"]);
    }
}
