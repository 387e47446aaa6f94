//! Rebuild: project the log into a fresh database.
//!
//! The rebuild applies *outcomes*, never re-decides requests (a decision
//! depends on the time it was taken and on the state then):
//!
//! | topic              | effect                                                         |
//! |--------------------|----------------------------------------------------------------|
//! | `created`          | `coupons` rows, `available`                                    |
//! | `claim-results`    | granted (not `repeated`): coupon `held` by the user until `expires_at`, `hold_id` = request id; `users.last_coupon_at` |
//! | `purchase-results` | redeemed (not `repeated`): coupon `redeemed`, `redeemed_at`, `redeemed_order_id`; cancelled (not `repeated`): the coupon to the `coupon_status` it carries, the order's cancellation stored |
//! | `expirations`      | `HoldExpired`: the coupon back to `available` (or `expired` when the event says its campaign had ended by the deadline), only if still held under that `hold_id`; `CouponExpired`: an available coupon `expired` |
//! | `blacklist`        | the user's blacklist entry (`users.blacklisted*`), as the change left it |
//! | `users`            | the user's profile (`users.name`, `dob`, `location`): the latest by `updated_at`, as the profiles processor keeps it |
//!
//! Beyond the coupons, everything that decides a later request is restored,
//! so a rebuilt database put live answers as the old one would:
//!
//! - every stored claim decision (`claim_decisions`: each decided claim but
//!   `invalid` ones, which are never stored), so a redelivered claim gets the
//!   same decision (same event id) instead of a new one;
//! - a quota slot (`quota_grants`) per fresh grant, in the window its decision
//!   time falls in (the deployment's `QUOTA_WINDOW`), so today's winners are
//!   refused a second coupon;
//! - every stored purchase decision (`purchase_decisions`: not `repeated`, not
//!   `invalid`), so a redelivered order gets the same answer;
//! - the blacklist: each user's last `BlacklistChanged` in log order (one
//!   user's changes share a partition; the event carries the entry after the
//!   change, so nothing is re-decided).
//!
//! Everything the log holds is restored, retention or not: the log's days
//! get their day (and month) partitions before the writes
//! (`coupon_platform::db::partitions_covering`), so a rebuilt database put
//! live has its old days where retention drops them.
//!
//! Events are applied in their causal order. The base is one deterministic
//! global order: envelope `occurred_at_ms`, then topic (created <
//! claim-results < purchase-results < expirations < blacklist), then
//! partition and offset. Time order alone is not causal order: event times
//! come from different clocks (the release tool's host, the broker's
//! timestamps of requests, bounded by the database's clock), and the live
//! database serialised what touches one coupon by its row lock, not by those
//! times. So an event that cannot have happened yet in the state rebuilt so
//! far waits for the event it needs, and is applied right after it:
//!
//! - a grant waits for its coupon to exist and for any other holder's hold
//!   to end (a coupon is granted only while available);
//! - a redemption waits for its coupon to be held by its buyer (a purchase
//!   sent before its grant and decided after it, logged by a version that
//!   dated it at its request);
//! - a release waits for the grant of the hold it names.
//!
//! What still waits when the log ends is applied then, in time order, and
//! reported as an anomaly as before. An event republished under the same
//! event id (e.g. a decision published again after a redelivery) is applied
//! once. Every event also yields its
//! `coupon_history` rows (the history sink's own, [`history::rows_of`]'s,
//! plus a `released` row per released hold, dated at the hold's deadline).
//!
//! The state is computed in memory, then written in bulk into the fresh
//! database, as a pipeline on the machine's two cores. Each record is
//! decoded once, while the log is read, by a decoder thread per core beside
//! the reading thread ([`read_outcomes`]): the event, its time and its
//! history rows, which depend on the event alone; the apply, one thread
//! (the state is one), then only looks events up and changes state. The
//! apply cannot start before the read ends: the causal order needs the
//! whole log (an event may wait for one read after it). The plain indexes of
//! the big tables are dropped first and built once at the end (`CREATE
//! INDEX` sorts; a row-by-row load walks each tree per row), the history
//! rows and the claim decisions go to writer tasks (binary `COPY`s of
//! 20,000 and 50,000) while the events are applied (a stored decision never
//! changes: the first for a request id stands), and at the end come the
//! coupons (the projector's [`coupons::insert_coupons`]), their final holds
//! and redemptions, users, quota slots and purchase decisions. A `COPY` that
//! Postgres refuses falls back to the live consumers' own `INSERT ... ON
//! CONFLICT DO NOTHING`.
//!
//! `projection` holds the in-memory state and its rules (pure, property
//! tested against a simulation of the live system), `state` the rows it
//! builds and the order it reads the log in; `write` writes a finished
//! projection in bulk; this file reads the log and drives both.

mod projection;
mod state;
mod write;

pub use projection::*;
pub use state::*;
use write::{write_profiles, write_purchase_decisions, write_quota, write_states, write_users};

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use sqlx::PgPool;

use coupon_consumers::coupons::{self, NewCoupon};
use coupon_consumers::history::{self, HistoryRow};
use coupon_domain::{CouponStatus, QuotaWindow};
use coupon_platform::kafka::Record;
use coupon_platform::{store, KafkaSettings, Topics};

use crate::replay::{PartitionRange, Reader, StartAt, TopicKind};

/// The topics whose events change projected state, in tie-break order.
pub const OUTCOME_TOPICS: [TopicKind; 6] = [
    TopicKind::Created,
    TopicKind::ClaimResults,
    TopicKind::PurchaseResults,
    TopicKind::Expirations,
    TopicKind::Blacklist,
    TopicKind::Users,
];

/// History rows are written in chunks of this many (one `COPY` each).
const HISTORY_CHUNK: usize = 20_000;
/// Claim decisions likewise.
const DECISION_CHUNK: usize = 50_000;
/// Sessions copying history rows side by side, at most (the pool keeps one
/// connection for the claim decisions).
const HISTORY_WRITERS: u32 = 2;
/// The log is decoded by a thread per core, up to this many.
const MAX_DECODERS: usize = 4;
/// Records handed to a decoder at a time, and batches queued per decoder.
const DECODE_BATCH: usize = 4_096;
const DECODE_QUEUE: usize = 4;
/// The tables whose plain indexes are built after the load.
const BULK_TABLES: [&str; 4] = ["coupon_history", "claim_decisions", "coupons", "users"];
/// What a rebuild did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RebuildStats {
    /// Outcome events applied.
    pub events: u64,
    /// Records that could not be decoded (skipped, as the live consumers did).
    pub undecodable: u64,
    /// Republished events (an id already applied), skipped.
    pub duplicates: u64,
    /// Events applied after the event they waited for rather than at their
    /// time (see the module doc).
    pub reordered: u64,
    pub coupons: u64,
    pub available: u64,
    pub held: u64,
    pub redeemed: u64,
    /// Coupons whose campaign ended (`expired`).
    pub expired: u64,
    pub users: u64,
    /// Quota slots (`quota_grants` rows).
    pub quota_grants: u64,
    /// Stored decisions (`claim_decisions` and `purchase_decisions` rows).
    pub claim_decisions: u64,
    pub purchase_decisions: u64,
    /// Users blacklisted at the end of the log (expired entries included).
    pub blacklisted: u64,
    pub history_rows: u64,
    pub anomalies: u64,
    pub anomaly_examples: Vec<String>,
    /// Reading the log.
    pub read_seconds: f64,
    /// Applying and writing.
    pub write_seconds: f64,
    /// Of the apply, the time it waited for the writers (Postgres behind).
    pub apply_waited_seconds: f64,
    /// Where the applying and writing went: each phase and its seconds.
    pub phases: Vec<(&'static str, f64)>,
}

impl RebuildStats {
    pub fn seconds(&self) -> f64 {
        self.read_seconds + self.write_seconds
    }

    /// Events per second, reading and writing included.
    pub fn rate(&self) -> f64 {
        self.events as f64 / self.seconds().max(1e-9)
    }

    /// Records phase `name` as ending now, since `mark`; `mark` moves on.
    fn lap(&mut self, name: &'static str, mark: &mut Instant) {
        let now = Instant::now();
        self.phases.push((name, (now - *mark).as_secs_f64()));
        *mark = now;
    }
}

impl fmt::Display for RebuildStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rebuilt from {} events in {:.2}s ({:.0} events/s; read {:.2}s, applied and written {:.2}s): \
             {} coupons ({} available, {} held, {} redeemed, {} expired), {} users ({} blacklisted), \
             {} quota grants, {} claim decisions, {} purchase decisions, {} history rows",
            self.events,
            self.seconds(),
            self.rate(),
            self.read_seconds,
            self.write_seconds,
            self.coupons,
            self.available,
            self.held,
            self.redeemed,
            self.expired,
            self.users,
            self.blacklisted,
            self.quota_grants,
            self.claim_decisions,
            self.purchase_decisions,
            self.history_rows,
        )?;
        if self.undecodable > 0 {
            write!(f, "; {} undecodable records skipped", self.undecodable)?;
        }
        if self.duplicates > 0 {
            write!(f, "; {} republished events applied once", self.duplicates)?;
        }
        if self.reordered > 0 {
            write!(
                f,
                "; {} events applied after the event they waited for",
                self.reordered
            )?;
        }
        if self.anomalies > 0 {
            write!(
                f,
                "; {} outcomes did not fit the rebuilt state",
                self.anomalies
            )?;
        }
        Ok(())
    }
}

/// Migrates `target` and checks that it holds no coupons yet.
pub async fn prepare_target(target: &PgPool) -> anyhow::Result<()> {
    coupon_platform::db::migrate(target)
        .await
        .context("applying migrations to the rebuild database")?;
    let has_rows = coupon_platform::store::stats::holds_any_state(target)
        .await
        .context("checking the rebuild database is empty")?;
    if has_rows {
        bail!(
            "the rebuild database already has coupons or decisions; rebuild only into a fresh database"
        );
    }
    Ok(())
}

/// Reads `ranges` (outcome topics) into records ready to apply, in the
/// order they are applied in ([`sort`]); also returns how many records
/// could not be decoded. Blocking.
///
/// The reading thread only copies records out of the client; a decoder
/// thread per core decodes each once ([`LogRecord::new`]: the event, its
/// time, its history rows), frees its bytes, and sorts what it decoded when
/// the log ends; the sorted runs are then merged.
pub fn read_outcomes(
    reader: &Reader,
    ranges: &[PartitionRange],
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<(Vec<LogRecord>, u64)> {
    let decoders = std::thread::available_parallelism().map_or(2, |n| n.get().min(MAX_DECODERS));
    std::thread::scope(|scope| {
        let (mut to_decode, mut decoded) = (Vec::new(), Vec::new());
        for _ in 0..decoders {
            let (batches, to_decoder) = std::sync::mpsc::sync_channel(DECODE_QUEUE);
            to_decode.push(batches);
            decoded.push(scope.spawn(move || decode_sorted(to_decoder)));
        }
        let mut batch = Vec::with_capacity(DECODE_BATCH);
        let mut sent = 0usize;
        let mut hand_on = |batch: Vec<(TopicKind, Record)>| {
            bar.inc(batch.len() as u64);
            let decoder = &to_decode[sent % decoders];
            sent += 1;
            decoder
                .send(batch)
                .map_err(|_| anyhow::anyhow!("a decoder of the rebuild stopped"))
        };
        let read = reader.read(ranges, |kind, record| {
            batch.push((kind, record));
            if batch.len() == DECODE_BATCH {
                hand_on(std::mem::replace(
                    &mut batch,
                    Vec::with_capacity(DECODE_BATCH),
                ))?;
            }
            Ok(crate::replay::Flow::Continue)
        });
        let last = read.and_then(|_| hand_on(batch));
        drop(to_decode);
        let mut runs = Vec::new();
        let mut undecodable = 0;
        for decoder in decoded {
            let (run, refused) = decoder
                .join()
                .map_err(|_| anyhow::anyhow!("a decoder of the rebuild panicked"))?;
            runs.push(run);
            undecodable += refused;
        }
        last?;
        Ok((merge(runs), undecodable))
    })
}

/// Decodes the batches it receives until the reader is done; returns the
/// records sorted, and how many could not be decoded.
fn decode_sorted(
    batches: std::sync::mpsc::Receiver<Vec<(TopicKind, Record)>>,
) -> (Vec<LogRecord>, u64) {
    let mut records = Vec::new();
    let mut undecodable = 0;
    for batch in batches {
        for (kind, record) in batch {
            match LogRecord::new(kind, record) {
                Some(log) => records.push(log.without_bytes()),
                None => undecodable += 1,
            }
        }
    }
    sort(&mut records);
    (records, undecodable)
}

/// Merges sorted runs into one sorted vector.
fn merge(runs: Vec<Vec<LogRecord>>) -> Vec<LogRecord> {
    let mut all = Vec::with_capacity(runs.iter().map(Vec::len).sum());
    let mut runs: Vec<_> = runs.into_iter().map(Vec::into_iter).collect();
    loop {
        let first = runs
            .iter()
            .enumerate()
            .filter_map(|(i, run)| run.as_slice().first().map(|head| (i, head)))
            .min_by(|(_, a), (_, b)| a.order_key().cmp(&b.order_key()))
            .map(|(i, _)| i);
        let Some(i) = first else {
            return all;
        };
        all.extend(runs[i].next());
    }
}

/// Applies `records` in order and writes the result into `target` (already
/// prepared). Returns the statistics, without the read time.
pub async fn project(
    target: &PgPool,
    window: QuotaWindow,
    mut records: Vec<LogRecord>,
) -> anyhow::Result<(RebuildStats, Projection)> {
    let started = Instant::now();
    let mut mark = started;
    let mut stats = RebuildStats::default();
    sort(&mut records);
    stats.lap("sort", &mut mark);
    // The log's days get their partitions, so that what is restored lands
    // where retention drops it (`coupon_platform::store::retention`).
    let times = records.iter().map(|r| r.occurred_at_ms);
    if let (Some(first), Some(last)) = (times.clone().min(), times.max()) {
        let at = |ms: i64| chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default();
        coupon_platform::db::partitions_covering(target, at(first), at(last))
            .await
            .context("making the log's partitions")?;
    }
    let indexes = store::rebuild::drop_plain_indexes(target, &BULK_TABLES)
        .await
        .context("deferring the indexes")?;
    stats.lap("drop the indexes", &mut mark);

    // The history and the claim decisions are written while the events are
    // applied, by tasks of their own: the applying holds one core, Postgres
    // and the writers the rest. (A stored decision never changes: the
    // first for a request id stands.) The history, the heavier write (a
    // jsonb per row), is copied by two sessions side by side where the
    // pool has the connections.
    let (history_rows, to_write) = tokio::sync::mpsc::channel::<Vec<HistoryRow>>(4);
    let to_write = Arc::new(tokio::sync::Mutex::new(to_write));
    let sessions = target.options().get_max_connections().saturating_sub(1);
    let history_writers: Vec<_> = (0..sessions.clamp(1, HISTORY_WRITERS))
        .map(|_| tokio::spawn(write_history(target.clone(), to_write.clone())))
        .collect();
    drop(to_write);
    let (decisions, to_store) = tokio::sync::mpsc::channel::<Vec<ClaimDecisionRecord>>(2);
    let decision_writer = tokio::spawn(write_decisions(target.clone(), to_store));
    let mut projection = Projection::new(window);
    projection.reserve(records.len());
    let mut rows = Vec::new();
    // How long the apply waited for the writers (Postgres behind it).
    let mut waited = Duration::ZERO;
    for log in records {
        rows.extend(projection.offer(log));
        if rows.len() >= HISTORY_CHUNK {
            let at = Instant::now();
            let sent = history_rows.send(std::mem::take(&mut rows)).await;
            waited += at.elapsed();
            if sent.is_err() {
                break; // The writers failed: their error is below.
            }
        }
        if projection.new_claim_decision_count() >= DECISION_CHUNK {
            let at = Instant::now();
            let sent = decisions.send(projection.take_new_claim_decisions()).await;
            waited += at.elapsed();
            if sent.is_err() {
                break; // Likewise.
            }
        }
    }
    rows.extend(projection.finish());
    let _ = history_rows.send(rows).await;
    let _ = decisions.send(projection.take_new_claim_decisions()).await;
    drop((history_rows, decisions));
    stats.apply_waited_seconds = waited.as_secs_f64();
    stats.lap("apply", &mut mark);
    for writer in history_writers {
        stats.history_rows += writer
            .await
            .context("a history writer stopped")?
            .context("writing history rows")?;
    }
    stats.claim_decisions = decision_writer
        .await
        .context("the claim decision writer stopped")?
        .context("writing claim decisions")?;
    stats.lap(
        "history and claim decisions (the rest of their writes)",
        &mut mark,
    );

    write_the_rest(target, &projection, &mut stats).await?;
    stats.lap("coupons, users, quota and purchases", &mut mark);
    store::rebuild::create_indexes(target, &indexes)
        .await
        .context("building the indexes")?;
    stats.lap("build the indexes", &mut mark);
    stats.blacklisted = projection.blacklisted_count() as u64;
    for state in projection.coupons() {
        match state.status {
            CouponStatus::Available => stats.available += 1,
            CouponStatus::Held => stats.held += 1,
            CouponStatus::Redeemed => stats.redeemed += 1,
            CouponStatus::Expired => stats.expired += 1,
        }
    }
    stats.events = projection.applied;
    stats.duplicates = projection.duplicates;
    stats.reordered = projection.reordered;
    stats.anomalies = projection.anomalies;
    stats.anomaly_examples = projection.anomaly_examples.clone();
    stats.write_seconds = started.elapsed().as_secs_f64();
    Ok((stats, projection))
}

/// Writes the history rows it takes from `chunks` (shared with the other
/// history writers), one `COPY` each, until the sender is dropped; returns
/// how many.
async fn write_history(
    target: PgPool,
    chunks: Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Vec<HistoryRow>>>>,
) -> Result<u64, sqlx::Error> {
    let mut written = 0;
    loop {
        let next = chunks.lock().await.recv().await;
        let Some(rows) = next else {
            return Ok(written);
        };
        written += history::append_bulk(&target, &rows).await?;
    }
}

/// Writes the claim decisions it receives (`COPY`, falling back to the
/// claim processor's insert) until the sender is dropped; returns how many.
async fn write_decisions(
    target: PgPool,
    mut chunks: tokio::sync::mpsc::Receiver<Vec<ClaimDecisionRecord>>,
) -> Result<u64, sqlx::Error> {
    let mut written = 0;
    while let Some(decisions) = chunks.recv().await {
        written += store::claims::copy_decisions(&target, &decisions).await?;
    }
    Ok(written)
}

/// Campaigns (and their early ends), coupons, their final states, users,
/// quota slots, purchase decisions and cancellations, one after the other.
async fn write_the_rest(
    target: &PgPool,
    projection: &Projection,
    stats: &mut RebuildStats,
) -> anyhow::Result<()> {
    // The campaigns first, as the projector writes them.
    if !projection.campaigns.is_empty() {
        let mut conn = target.acquire().await.context("writing campaigns")?;
        for (batch_id, campaign) in &projection.campaigns {
            coupon_platform::store::campaigns::insert(&mut conn, *batch_id, campaign)
                .await
                .context("writing campaigns")?;
        }
        // Their early ends, as the log's expiries carry them.
        for (batch_id, (at, by)) in &projection.ended_early {
            coupon_platform::store::campaigns::set_ended_at(
                &mut conn,
                *batch_id,
                *at,
                by.as_deref(),
            )
            .await
            .context("writing campaigns' ends")?;
        }
    }
    let all: Vec<NewCoupon> = projection.coupons().map(|c| c.coupon.clone()).collect();
    stats.coupons = coupons::insert_coupons(target, &all)
        .await
        .context("writing coupons")?;
    write_states(target, projection)
        .await
        .context("writing holds and redemptions")?;
    stats.users = write_users(target, projection)
        .await
        .context("writing users")?;
    write_profiles(target, projection)
        .await
        .context("writing profiles")?;
    stats.quota_grants = write_quota(target, projection)
        .await
        .context("writing quota grants")?;
    stats.purchase_decisions = write_purchase_decisions(target, projection)
        .await
        .context("writing purchase decisions")?;
    // Cancelled orders, with their decisions (a repeat answers the same).
    if !projection.cancels.is_empty() {
        let mut conn = target.acquire().await.context("writing cancellations")?;
        for (order, cancel) in &projection.cancels {
            coupon_platform::store::decisions::record_cancel(&mut conn, order, cancel)
                .await
                .context("writing cancellations")?;
        }
    }
    Ok(())
}

/// `couponctl replay --rebuild`: the whole log (up to its current end) into
/// `target`, which must be a fresh database.
pub async fn rebuild(
    kafka: &KafkaSettings,
    topics: &Topics,
    window: QuotaWindow,
    target: &PgPool,
    bar: indicatif::ProgressBar,
) -> anyhow::Result<RebuildStats> {
    prepare_target(target).await?;
    let started = Instant::now();
    let (kafka, read_topics) = (kafka.clone(), topics.clone());
    let read_bar = bar.clone();
    let (records, undecodable) = tokio::task::spawn_blocking(move || {
        let reader = Reader::new(&kafka)?;
        reader.ensure_whole(&read_topics, &OUTCOME_TOPICS, "a rebuild")?;
        let ranges = reader.plan(&read_topics, &OUTCOME_TOPICS, StartAt::Beginning)?;
        read_bar.set_length(ranges.iter().map(PartitionRange::len).sum());
        read_outcomes(&reader, &ranges, &read_bar)
    })
    .await
    .context("the log reader stopped")??;
    bar.finish_and_clear();
    let read_seconds = started.elapsed().as_secs_f64();
    let (mut stats, _) = project(target, window, records).await?;
    stats.read_seconds = read_seconds;
    stats.undecodable = undecodable;
    Ok(stats)
}
