//! Where a claim batch's time goes (issue #27 item 2): each step of
//! [`super::handle_events`] is timed into
//! `coupon_claim_batch_seconds{stage}`, and each batch's size and wait into
//! `coupon_claim_batch_claims` and `coupon_claim_batch_wait_seconds`.
//!
//! A grant's latency is the wait for its batch (the batches before it on the
//! one processor of its partitions) plus the batch's own steps, so these
//! three say which to shorten: fewer round trips per batch, or batches side
//! by side. The bench reads them around its open-loop rows (the stage means
//! per batch in each row's note); operators get the same series on
//! `/metrics`. The cost is an `Instant` per step and a histogram sample per
//! step and batch, nothing per claim.

use std::time::Instant;

/// The metric of a batch's steps, labelled `stage`.
pub const STAGE_SECONDS: &str = "coupon_claim_batch_seconds";
/// Claims (valid or not) per batch decided.
pub const BATCH_CLAIMS: &str = "coupon_claim_batch_claims";
/// From its oldest record's broker timestamp to the start of its decision:
/// the time the batch's first claim waited on the log and behind earlier
/// batches.
pub const BATCH_WAIT_SECONDS: &str = "coupon_claim_batch_wait_seconds";

/// The steps, in the order a batch goes through them. The last,
/// `confirm` (the broker's acknowledgement of the answers, from the end of
/// `publish`), runs while the next batch is decided: it is not part of the
/// processor's time per batch.
pub const STAGES: [&str; 10] = [
    "begin",
    "read",
    "supply",
    "eligibility",
    "grant",
    "write",
    "commit",
    "mirror",
    "publish",
    "confirm",
];

/// Times the consecutive steps of one batch.
pub struct Stages {
    last: Instant,
}

impl Stages {
    /// Starts timing a batch of `claims` records, the oldest written to the
    /// log at `oldest_ms` (broker time, Unix milliseconds).
    pub fn start(claims: usize, oldest_ms: Option<i64>) -> Self {
        metrics::histogram!(BATCH_CLAIMS).record(claims as f64);
        if let Some(oldest_ms) = oldest_ms {
            let waited_ms = chrono::Utc::now().timestamp_millis() - oldest_ms;
            metrics::histogram!(BATCH_WAIT_SECONDS).record(waited_ms.max(0) as f64 / 1_000.0);
        }
        Self {
            last: Instant::now(),
        }
    }

    /// Ends the step `stage` (one of [`STAGES`]): the time since the
    /// previous step ended.
    pub fn done(&mut self, stage: &'static str) {
        debug_assert!(STAGES.contains(&stage), "{stage}");
        let now = Instant::now();
        metrics::histogram!(STAGE_SECONDS, "stage" => stage)
            .record(now.duration_since(self.last).as_secs_f64());
        self.last = now;
    }
}

/// Awaits the broker's acknowledgement of a batch's answers, timed as the
/// step `confirm`.
pub async fn confirmed(
    confirming: impl std::future::Future<Output = Result<(), coupon_platform::kafka::PublishError>>,
) -> Result<(), coupon_platform::kafka::consumer::BatchError> {
    let started = Instant::now();
    confirming.await?;
    metrics::histogram!(STAGE_SECONDS, "stage" => "confirm")
        .record(started.elapsed().as_secs_f64());
    Ok(())
}
