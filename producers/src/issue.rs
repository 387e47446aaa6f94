//! Releasing a batch of coupons: generate Snowflake codes on a leased machine
//! id, then publish them as `CouponsCreated` events in chunks of 1,000.
//!
//! The batch id keys every chunk, so a batch stays on one partition in order.
//! Publishing is at least once; the projector and the history sink
//! deduplicate by coupon code and event id, so publishing a chunk twice adds
//! nothing.

use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

use coupon_domain::{Category, CouponCode, EmployeeId};
use coupon_platform::kafka::{PublishError, Publisher};
use coupon_platform::Topics;
use coupon_schemas::CouponsCreated;

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
}

#[derive(Debug, Clone)]
pub struct IssuedBatch {
    pub batch_id: Uuid,
    pub codes: Vec<CouponCode>,
}

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("count must be between 1 and {MAX_COUNT} (got {0})")]
    BadCount(u32),
    #[error(transparent)]
    Keygen(#[from] KeygenError),
    #[error(transparent)]
    Publish(#[from] PublishError),
}

/// Builds the chunked events of a batch (pure; also used by tests to
/// republish a batch).
pub fn batch_events(
    publisher: &Publisher,
    batch_id: Uuid,
    request: &IssueRequest,
    codes: &[CouponCode],
) -> Vec<(String, CouponsCreated)> {
    let chunk_count = codes.len().div_ceil(CHUNK) as u32;
    codes
        .chunks(CHUNK)
        .enumerate()
        .map(|(index, chunk)| {
            let event = CouponsCreated {
                envelope: Some(publisher.envelope::<CouponsCreated>(&batch_id.to_string())),
                batch_id: batch_id.to_string(),
                employee_id: request.employee.to_string(),
                category: request.category.to_string(),
                coupon_ids: chunk.iter().map(|c| c.id().as_i64()).collect(),
                chunk_index: index as u32,
                chunk_count,
            };
            (batch_id.to_string(), event)
        })
        .collect()
}

/// Generates and publishes a batch; `progress` is called with the number of
/// coupons confirmed by the broker so far.
pub async fn issue(
    pool: &PgPool,
    publisher: &Publisher,
    topics: &Topics,
    datacenter: u16,
    request: &IssueRequest,
    mut progress: impl FnMut(u64),
) -> Result<IssuedBatch, IssueError> {
    if request.count == 0 || request.count > MAX_COUNT {
        return Err(IssueError::BadCount(request.count));
    }
    let mut generator = keygen::lease(pool, datacenter, Duration::from_secs(60)).await?;
    let generated = generator.generate(request.count as usize);
    // Give the machine id back whatever happened, recording the last ms used.
    generator.release().await?;
    let codes: Vec<CouponCode> = generated
        .map_err(KeygenError::from)?
        .into_iter()
        .map(CouponCode::from_id)
        .collect();
    let batch_id = Uuid::new_v4();
    let events = batch_events(publisher, batch_id, request, &codes);
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
    metrics::counter!("coupon_coupons_issued_total").increment(codes.len() as u64);
    tracing::info!(%batch_id, employee = %request.employee, category = %request.category, count = codes.len(), "batch issued");
    Ok(IssuedBatch { batch_id, codes })
}
