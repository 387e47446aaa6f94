//! One shape for every consumer role: a [`RoleHandler`] says which role it
//! is (its group and topics come from `coupon_schemas::catalogue`) and what
//! event its topics carry ([`RoleHandler::Event`]), handles a batch of
//! decoded events and sets aside a record that fails on its own; [`run`] is
//! the one loop that drives any of them. The loop decodes every record
//! (by the catalogue: the message of the record's topic), hands the
//! decoded ones to `handle` and, once `handle` has returned, sets aside
//! the undecodable ones with `reject` (the dead-letter topic); offsets are
//! stored only after both. [`split`] and [`dead_letter_all`] are the
//! validate → dead-letter steps a handler does with what it was given.

use std::future::Future;

use rdkafka::error::KafkaError;

use coupon_schemas::{Event, Role};

pub use super::consumer::DecodeError;

use super::consumer::{
    decode, group_consumer, run_batches, Assignment, BatchError, Confirmations, ConsumerSettings,
    DeadLetters, Record,
};
use super::{KafkaSettings, Topics};

/// Poll settings of one role.
#[derive(Debug, Clone, Copy)]
pub struct PollSettings {
    pub fetch_wait_max_ms: u32,
    pub max_batch: usize,
    pub assignment: Assignment,
}

/// What a role's records decode to: the protobuf message of its topic for a
/// role that reads one topic (every [`Event`] is one), an enum over its
/// topics' messages for a role that reads several (the history sink).
pub trait RoleEvent: Sized + Send + Sync {
    /// Decodes `record` as the message of its topic (`topics` names the
    /// topics of this deployment); an error is the reason it is refused.
    fn decode(topics: &Topics, record: &Record) -> Result<Self, DecodeError>;
}

impl<E: Event + Send + Sync> RoleEvent for E {
    fn decode(_: &Topics, record: &Record) -> Result<Self, DecodeError> {
        decode::<E>(record)
    }
}

/// One decoded record: the record (its topic, key, offset and time) and
/// what it carried.
pub type Decoded<E> = (Record, E);

/// A consumer role: what it does with a batch of its topics' events.
///
/// `handle` decides and writes a batch atomically and stores nothing on
/// failure (the batch loop retries or isolates records, see
/// [`super::consumer::settle`]); it may leave the broker's acknowledgement
/// of what it published outstanding ([`Confirmations`]), and the loop stores
/// the batch's offsets once they resolve; `reject` sets aside one record that keeps
/// failing on its own, or does not decode (dead-letter it, and answer its
/// requester if any).
pub trait RoleHandler: Send + Sync {
    /// The role: its consumer group is `<prefix>.<name>-processor` and it
    /// reads `ROLE.topics()`.
    const ROLE: Role;

    /// What its topics carry (see `coupon_schemas::catalogue`).
    type Event: RoleEvent;

    /// The batch's records that decoded, in order.
    fn handle(
        &self,
        batch: Vec<Decoded<Self::Event>>,
    ) -> impl Future<Output = Result<Confirmations, BatchError>> + Send;

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
        |batch| handle_records(handler, topics, batch),
        |record, reason| handler.reject(record, reason),
        shutdown,
    )
    .await;
    tracing::info!(role = name, "consumer stopped");
    Ok(())
}

/// Decodes `batch`, has `handler` handle what decoded, then sets aside
/// what did not (after the batch's effects, as a handler's own refusals:
/// a retried batch sets nothing aside twice). The loop stores the offsets
/// only once this returns `Ok` and the confirmations it returns resolved.
pub async fn handle_records<H: RoleHandler>(
    handler: &H,
    topics: &Topics,
    batch: Vec<Record>,
) -> Result<Confirmations, BatchError> {
    let mut decoded = Vec::with_capacity(batch.len());
    let mut refused = Vec::new();
    for record in batch {
        match H::Event::decode(topics, &record) {
            Ok(event) => decoded.push((record, event)),
            Err(error) => refused.push((record, error.to_string())),
        }
    }
    let confirmations = handler.handle(decoded).await?;
    for (record, reason) in refused {
        handler.reject(record, reason).await?;
    }
    Ok(confirmations)
}

/// A batch sorted into the records that decoded and validated (with what
/// `validate` made of them) and those refused (with the reason).
pub struct Split<'a, T> {
    pub accepted: Vec<(&'a Record, T)>,
    pub refused: Vec<(&'a Record, String)>,
}

/// Validates every decoded event of `batch`; `validate` refuses some.
pub fn split<'a, E, T>(
    batch: &'a [Decoded<E>],
    mut validate: impl FnMut(&'a Record, &'a E) -> Result<T, String>,
) -> Split<'a, T> {
    let mut accepted = Vec::with_capacity(batch.len());
    let mut refused = Vec::new();
    for (record, event) in batch {
        match validate(record, event) {
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
