//! Releasing a batch of coupons: generate Snowflake codes on a leased machine
//! id, then publish them as `CouponsCreated` events in chunks of 1,000.
//!
//! The batch id keys every chunk, so a batch stays on one partition in order.
//! Publishing is at least once; the projector and the history sink
//! deduplicate by coupon code and event id (a chunk's event id and time are
//! derived from its batch and index, [`batch_events_at`]), so publishing a
//! chunk twice adds nothing.
//!
//! # Idempotent releases ([`release`] with an [`IdempotencyKey`])
//!
//! The batch (id, body, every code) is stored in Postgres (`releases`)
//! *before* anything is published, then published under the row's lock and
//! marked published. So:
//!
//! - a repeat with the same key and body (the campaign's fields included)
//!   answers the stored batch (same batch id, same codes) and mints nothing;
//!   with another body it is refused
//!   ([`IssueError::KeyReused`]);
//! - a repeat while the first is still publishing waits for the row lock (at
//!   most `lock_wait`, then [`IssueError::InProgress`]) and then answers the
//!   batch the first one published;
//! - a release cut mid-way (the client gone, a broker error, the process
//!   killed: its row lock ends with its connection) is completed by the next
//!   repeat with the key, which publishes the stored codes again: the coupons
//!   are exactly the stored ones, never a second batch.
//!
//! Without a key nothing is stored: the batch is generated and published at
//! once. The gateway runs it in a task of its own, so a client that goes
//! away does not cut it; but if the *process* dies mid-publish, the chunks
//! already on the log stay (those coupons are claimable) and the rest never
//! appear, and a repeat releases a new batch. Send a key whenever a partial
//! or doubled release matters.

use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

use chrono::{DateTime, Utc};

use coupon_domain::snowflake::SnowflakeId;
use coupon_domain::{Campaign, Category, CouponCode, EmployeeId};
use coupon_platform::kafka::{PublishError, Publisher};
use coupon_platform::store::releases::{self, StoredRelease};
use coupon_platform::Topics;
use coupon_schemas::{new_envelope, Campaign as WireCampaign, CouponsCreated};

use crate::keygen::{self, KeygenError};

/// Coupons per `CouponsCreated` event.
pub const CHUNK: usize = 1_000;
/// Chunks published (and confirmed) between progress reports.
const CHUNKS_PER_STEP: usize = 10;
/// The largest batch one call releases.
pub const MAX_COUNT: u32 = 1_000_000;

#[derive(Debug, Clone)]
pub struct IssueRequest {
    pub employee: EmployeeId,
    pub category: Category,
    pub count: u32,
    /// The batch's campaign, carried by every chunk (`None`: none).
    pub campaign: Option<Campaign>,
}

impl IssueRequest {
    /// The campaign as the events carry it, encoded: what an idempotent
    /// release stores and a repeat must match.
    fn encoded_campaign(&self) -> Option<Vec<u8>> {
        self.campaign
            .as_ref()
            .map(|c| prost::Message::encode_to_vec(&WireCampaign::from(c)))
    }
}

#[derive(Debug, Clone)]
pub struct IssuedBatch {
    pub batch_id: Uuid,
    pub codes: Vec<CouponCode>,
    /// This call answered a batch an earlier call with the same idempotency
    /// key stored (and published or completed it); nothing new was minted.
    pub repeated: bool,
}

/// The longest idempotency key.
pub const MAX_KEY_LEN: usize = 128;

/// The client's name for one release (`Idempotency-Key`,
/// `couponctl issue --idempotency-key`): 1 to [`MAX_KEY_LEN`] visible ASCII
/// characters (`!` to `~`, no spaces).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an idempotency key must be 1 to {MAX_KEY_LEN} visible ASCII characters ('!' to '~', no spaces)")]
pub struct BadIdempotencyKey;

impl IdempotencyKey {
    pub fn parse(raw: &str) -> Result<Self, BadIdempotencyKey> {
        if raw.is_empty() || raw.len() > MAX_KEY_LEN || !raw.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(BadIdempotencyKey);
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("count must be between 1 and {MAX_COUNT} (got {0})")]
    BadCount(u32),
    #[error(transparent)]
    Keygen(#[from] KeygenError),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("the release store failed: {0}")]
    Store(#[from] sqlx::Error),
    /// The key names an earlier release with another body.
    #[error(
        "idempotency key {key:?} was already used for another release ({count} {category} \
         coupons by employee {employee}, {campaign}); a new release needs a new key"
    )]
    KeyReused {
        key: String,
        employee: EmployeeId,
        category: Category,
        count: i32,
        /// Whether the stored release had a campaign (its fields are part
        /// of the body a repeat must match).
        campaign: &'static str,
    },
    /// Another call is publishing the release of this key and did not end
    /// within the wait.
    #[error("the release with idempotency key {0:?} is still being published; repeat the request (same key, same body) in a moment for its answer")]
    InProgress(String),
    /// A stored coupon id is not a Snowflake id (the row was edited).
    #[error("the release stored under idempotency key {0:?} holds an invalid coupon id")]
    Corrupt(String),
}

/// Builds the chunked events of a batch, stamped now (pure; also used by
/// tests to republish a batch).
pub fn batch_events(
    publisher: &Publisher,
    batch_id: Uuid,
    request: &IssueRequest,
    codes: &[CouponCode],
) -> Vec<(String, CouponsCreated)> {
    batch_events_at(publisher, batch_id, request, codes, Utc::now())
}

/// The event id of chunk `index` of `batch_id`: the same whenever the batch
/// is published again, so the history sink records each chunk once.
pub fn chunk_event_id(batch_id: Uuid, index: usize) -> Uuid {
    Uuid::new_v5(&batch_id, format!("chunk-{index}").as_bytes())
}

/// The chunked events of a batch made at `made_at`: each chunk's envelope
/// (event id, time) depends on the batch and the chunk alone, so a batch
/// published again is the same events.
pub fn batch_events_at(
    publisher: &Publisher,
    batch_id: Uuid,
    request: &IssueRequest,
    codes: &[CouponCode],
    made_at: DateTime<Utc>,
) -> Vec<(String, CouponsCreated)> {
    let chunk_count = codes.len().div_ceil(CHUNK) as u32;
    let campaign = request.campaign.as_ref().map(WireCampaign::from);
    codes
        .chunks(CHUNK)
        .enumerate()
        .map(|(index, chunk)| {
            let event = CouponsCreated {
                envelope: Some(new_envelope::<CouponsCreated>(
                    chunk_event_id(batch_id, index).to_string(),
                    made_at.timestamp_millis(),
                    publisher.name(),
                    &batch_id.to_string(),
                )),
                batch_id: batch_id.to_string(),
                employee_id: request.employee.to_string(),
                category: request.category.to_string(),
                coupon_ids: chunk.iter().map(|c| c.id().as_i64()).collect(),
                chunk_index: index as u32,
                chunk_count,
                campaign: campaign.clone(),
            };
            (batch_id.to_string(), event)
        })
        .collect()
}

/// Generates and publishes a batch (no idempotency key: see the module
/// comment for what a process dying mid-publish leaves); `progress` is
/// called with the number of coupons confirmed by the broker so far.
pub async fn issue(
    pool: &PgPool,
    publisher: &Publisher,
    topics: &Topics,
    datacenter: u16,
    request: &IssueRequest,
    mut progress: impl FnMut(u64),
) -> Result<IssuedBatch, IssueError> {
    check_count(request.count)?;
    let codes = generate(pool, datacenter, request.count).await?;
    let batch_id = Uuid::new_v4();
    publish(
        publisher,
        topics,
        batch_id,
        request,
        &codes,
        Utc::now(),
        &mut progress,
    )
    .await?;
    metrics::counter!("coupon_coupons_issued_total").increment(codes.len() as u64);
    tracing::info!(%batch_id, employee = %request.employee, category = %request.category, count = codes.len(), "batch issued");
    Ok(IssuedBatch {
        batch_id,
        codes,
        repeated: false,
    })
}

/// Releases a batch: with `key`, idempotently (stored first, answered again
/// on a repeat, completed by a repeat when cut; a concurrent repeat waits at
/// most `lock_wait` for the first); without, as [`issue`].
#[allow(clippy::too_many_arguments)]
pub async fn release(
    pool: &PgPool,
    publisher: &Publisher,
    topics: &Topics,
    datacenter: u16,
    request: &IssueRequest,
    key: Option<&IdempotencyKey>,
    lock_wait: Duration,
    mut progress: impl FnMut(u64),
) -> Result<IssuedBatch, IssueError> {
    let Some(key) = key else {
        return issue(pool, publisher, topics, datacenter, request, progress).await;
    };
    check_count(request.count)?;
    let (stored, minted) = stored_or_minted(pool, datacenter, request, key).await?;
    check_same_request(&stored, request, key)?;
    let codes = stored_codes(&stored, key)?;
    let batch_id = stored.batch_id;
    let answer = |repeated| IssuedBatch {
        batch_id,
        codes: codes.clone(),
        repeated,
    };
    if stored.published_at.is_some() {
        progress(codes.len() as u64);
        return Ok(answer(true));
    }
    let mut tx = pool.begin().await?;
    let published_at = match releases::lock(&mut tx, key.as_str(), lock_wait).await {
        Ok(row) => row,
        Err(error) if releases::is_lock_timeout(&error) => {
            return Err(IssueError::InProgress(key.to_string()))
        }
        Err(error) => return Err(error.into()),
    };
    if matches!(published_at, Some(Some(_))) {
        // The holder we waited for published it.
        tx.rollback().await?;
        progress(codes.len() as u64);
        return Ok(answer(true));
    }
    // Ours to publish: first time, or completing a release that was cut.
    publish(
        publisher,
        topics,
        batch_id,
        request,
        &codes,
        stored.created_at,
        &mut progress,
    )
    .await?;
    releases::mark_published(&mut tx, key.as_str()).await?;
    tx.commit().await?;
    tracing::info!(%batch_id, %key, employee = %request.employee, category = %request.category,
        count = codes.len(), completed_earlier_release = !minted, "batch issued");
    Ok(answer(!minted))
}

/// The release stored under `key`, or a new one minted and stored (`true`);
/// when a concurrent call stored first, its release (these ids are never
/// used).
async fn stored_or_minted(
    pool: &PgPool,
    datacenter: u16,
    request: &IssueRequest,
    key: &IdempotencyKey,
) -> Result<(StoredRelease, bool), IssueError> {
    if let Some(stored) = releases::find(pool, key.as_str()).await? {
        return Ok((stored, false));
    }
    let codes = generate(pool, datacenter, request.count).await?;
    let fresh = StoredRelease {
        idempotency_key: key.as_str().to_owned(),
        batch_id: Uuid::new_v4(),
        employee_id: request.employee.clone(),
        category: request.category.clone(),
        count: i32::try_from(request.count).map_err(|_| IssueError::BadCount(request.count))?,
        coupon_ids: codes.iter().map(|c| c.id().as_i64()).collect(),
        campaign: request.encoded_campaign(),
        // Postgres keeps microseconds: stored and used as read back.
        created_at: DateTime::from_timestamp_millis(Utc::now().timestamp_millis())
            .unwrap_or_else(Utc::now),
        published_at: None,
    };
    if releases::insert(pool, &fresh).await? {
        // Counted once, when minted (whoever then publishes it).
        metrics::counter!("coupon_coupons_issued_total").increment(codes.len() as u64);
        return Ok((fresh, true));
    }
    let stored = releases::find(pool, key.as_str())
        .await?
        .ok_or_else(|| IssueError::InProgress(key.to_string()))?;
    Ok((stored, false))
}

/// A key names one release: the same key with another body is refused.
fn check_same_request(
    stored: &StoredRelease,
    request: &IssueRequest,
    key: &IdempotencyKey,
) -> Result<(), IssueError> {
    if stored.employee_id != request.employee
        || stored.category != request.category
        || i64::from(stored.count) != i64::from(request.count)
        || stored.campaign != request.encoded_campaign()
    {
        return Err(IssueError::KeyReused {
            key: key.to_string(),
            employee: stored.employee_id.clone(),
            category: stored.category.clone(),
            count: stored.count,
            campaign: if stored.campaign.is_some() {
                "with a campaign"
            } else {
                "without a campaign"
            },
        });
    }
    Ok(())
}

/// The stored release's codes; a stored id that is no Snowflake id (an
/// edited row) is refused.
fn stored_codes(
    stored: &StoredRelease,
    key: &IdempotencyKey,
) -> Result<Vec<CouponCode>, IssueError> {
    stored
        .coupon_ids
        .iter()
        .map(|&id| {
            u64::try_from(id)
                .ok()
                .and_then(|raw| SnowflakeId::from_raw(raw).ok())
                .map(CouponCode::from_id)
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| IssueError::Corrupt(key.to_string()))
}

fn check_count(count: u32) -> Result<(), IssueError> {
    if count == 0 || count > MAX_COUNT {
        return Err(IssueError::BadCount(count));
    }
    Ok(())
}

/// `count` new codes from a leased machine id.
async fn generate(
    pool: &PgPool,
    datacenter: u16,
    count: u32,
) -> Result<Vec<CouponCode>, IssueError> {
    let mut generator = keygen::lease(pool, datacenter, Duration::from_secs(60)).await?;
    let generated = generator.generate(count as usize);
    // Give the machine id back whatever happened, recording the last ms used.
    generator.release().await?;
    Ok(generated
        .map_err(KeygenError::from)?
        .into_iter()
        .map(CouponCode::from_id)
        .collect())
}

/// Publishes every chunk of a batch, [`CHUNKS_PER_STEP`] at a time.
async fn publish(
    publisher: &Publisher,
    topics: &Topics,
    batch_id: Uuid,
    request: &IssueRequest,
    codes: &[CouponCode],
    made_at: DateTime<Utc>,
    progress: &mut impl FnMut(u64),
) -> Result<(), IssueError> {
    let events = batch_events_at(publisher, batch_id, request, codes, made_at);
    let topic = topics.created();
    let mut confirmed = 0u64;
    for step in events.chunks(CHUNKS_PER_STEP) {
        publisher.send_all(&topic, step).await?;
        confirmed += step
            .iter()
            .map(|(_, e)| e.coupon_ids.len() as u64)
            .sum::<u64>();
        progress(confirmed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_keys_are_visible_ascii() {
        for good in [
            "a",
            "release-2026-12-02",
            "~!#$%&'*+-.^_`|",
            &"k".repeat(128),
        ] {
            assert!(IdempotencyKey::parse(good).is_ok(), "{good:?}");
        }
        for bad in ["", " ", "a b", "a\tb", "é", "\u{7f}", &"k".repeat(129)] {
            assert_eq!(
                IdempotencyKey::parse(bad),
                Err(BadIdempotencyKey),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_chunk_keeps_its_event_id() {
        let batch = Uuid::new_v4();
        assert_eq!(chunk_event_id(batch, 3), chunk_event_id(batch, 3));
        assert_ne!(chunk_event_id(batch, 3), chunk_event_id(batch, 4));
        assert_ne!(chunk_event_id(batch, 0), chunk_event_id(Uuid::new_v4(), 0));
    }
}
