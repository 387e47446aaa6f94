//! One shape for every consumer role: a [`RoleHandler`] says which role it
//! is (its group and topics come from `coupon_schemas::catalogue`), handles
//! a batch and sets aside a record that fails on its own; [`run`] is the one
//! loop that drives any of them. [`split`] and [`dead_letter_all`] are the
//! decode → validate → dead-letter steps every handler starts and ends with.

use std::future::Future;

use rdkafka::error::KafkaError;

use coupon_schemas::{Event, Role};

use super::consumer::{
    decode, group_consumer, run_batches, Assignment, BatchError, ConsumerSettings, DeadLetters,
    Record,
};
use super::{KafkaSettings, Topics};

/// Poll settings of one role.
#[derive(Debug, Clone, Copy)]
pub struct PollSettings {
    pub fetch_wait_max_ms: u32,
    pub max_batch: usize,
    pub assignment: Assignment,
}

/// A consumer role: what it does with a batch of its topics' records.
///
/// `handle` decides and writes a batch atomically and stores nothing on
/// failure (the batch loop retries or isolates records, see
/// [`super::consumer::settle`]); `reject` sets aside one record that keeps
/// failing on its own (dead-letter it, and answer its requester if any).
pub trait RoleHandler: Send + Sync {
    /// The role: its consumer group is `<prefix>.<name>-processor` and it
    /// reads `ROLE.topics()`.
    const ROLE: Role;

    fn handle(&self, batch: Vec<Record>) -> impl Future<Output = Result<(), BatchError>> + Send;

    fn reject(
        &self,
        record: Record,
        reason: String,
    ) -> impl Future<Output = Result<(), BatchError>> + Send;
}

/// Runs `handler`'s batch loop with its own group consumer until `shutdown`.
pub async fn run<H: RoleHandler>(
    handler: &H,
    kafka: &KafkaSettings,
    topics: &Topics,
    poll: PollSettings,
    shutdown: impl Future<Output = ()>,
) -> Result<(), KafkaError> {
    let role = H::ROLE;
    let settings = ConsumerSettings {
        group_id: topics.group(role),
        topics: topics.read_by(role),
        fetch_wait_max_ms: poll.fetch_wait_max_ms,
        max_batch: poll.max_batch,
        assignment: poll.assignment,
    };
    let kafka = kafka.clone();
    let create = settings.clone();
    let consumer = tokio::task::spawn_blocking(move || group_consumer(&kafka, &create))
        .await
        .map_err(|_| KafkaError::Canceled)??;
    let name = role.name();
    tracing::info!(role = name, group = %settings.group_id, topics = ?settings.topics, assignment = ?settings.assignment, "consumer started");
    run_batches(
        name,
        consumer,
        poll.max_batch,
        |batch| handler.handle(batch),
        |record, reason| handler.reject(record, reason),
        shutdown,
    )
    .await;
    tracing::info!(role = name, "consumer stopped");
    Ok(())
}

/// A batch sorted into the records that decoded and validated (with what
/// `validate` made of them) and those refused (with the reason).
pub struct Split<'a, T> {
    pub accepted: Vec<(&'a Record, T)>,
    pub refused: Vec<(&'a Record, String)>,
}

/// Decodes every record of `batch` as `E` and validates it. An undecodable
/// record is refused with the decode error; `validate` refuses the others.
pub fn split<'a, E: Event, T>(
    batch: &'a [Record],
    mut validate: impl FnMut(&'a Record, E) -> Result<T, String>,
) -> Split<'a, T> {
    let mut accepted = Vec::with_capacity(batch.len());
    let mut refused = Vec::new();
    for record in batch {
        match decode::<E>(record)
            .map_err(|e| e.to_string())
            .and_then(|event| validate(record, event))
        {
            Ok(item) => accepted.push((record, item)),
            Err(reason) => refused.push((record, reason)),
        }
    }
    Split { accepted, refused }
}

/// Sends every refused record of a batch to the dead-letter topic.
pub async fn dead_letter_all(
    letters: &DeadLetters,
    refused: &[(&Record, String)],
) -> Result<(), BatchError> {
    for (record, reason) in refused {
        letters.send(record, reason).await?;
    }
    Ok(())
}
