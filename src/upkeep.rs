//! The upkeep a serving process runs beside its roles, each round on a
//! timer until shutdown: the partitions ahead of time (the history's, the
//! decisions' and quota's), the partitions past their retention dropped,
//! the claim path's tables analyzed when their statistics fall behind
//! (`coupon_platform::store::statistics`), and the blacklist's expired
//! entries and waiting changes.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use coupon_consumers::Context;
use coupon_platform::store::retention::{self, Retention};

/// Creates the history partitions of the month `today()` falls in and the
/// next two, and the decision and quota partitions of the coming week,
/// every `every` ([`coupon_platform::db::partitions_ahead_from`]),
/// until `stop`: a process running for months never lets a month's rows
/// settle in the default partition (where they would stay: a partition
/// cannot be made for a month the default partition holds rows of).
pub async fn partitions_ahead(
    pool: &sqlx::PgPool,
    every: Duration,
    today: impl Fn() -> chrono::NaiveDate,
    stop: CancellationToken,
) {
    every_until(every, &stop, || async {
        if let Err(error) = coupon_platform::db::partitions_ahead_from(pool, today()).await {
            tracing::warn!(%error, "could not create the coming history partitions");
        }
    })
    .await;
}

/// How often the claim path's statistics are checked: a day's partition
/// fills from empty at up to ten thousand rows a second, and a plan made
/// while it was small stays until it is analyzed.
const STATISTICS_INTERVAL: Duration = Duration::from_secs(10);

/// Spawns, into `tasks`, the partitions' upkeep of a process running the
/// history sink or the claim processor: [`partitions_ahead`] and
/// [`drop_expired`], every `settings::PARTITION_UPKEEP_INTERVAL`, and
/// [`refresh_statistics`] every ten seconds.
pub fn spawn_partition_upkeep(
    tasks: &mut tokio::task::JoinSet<anyhow::Result<()>>,
    pool: &sqlx::PgPool,
    retention: Retention,
    quota_window: Duration,
    stop: &CancellationToken,
) {
    let every = coupon_platform::settings::PARTITION_UPKEEP_INTERVAL;
    let (pool, stop) = (pool.clone(), stop.clone());
    tasks.spawn(async move {
        let today = || chrono::Utc::now().date_naive();
        tokio::join!(
            partitions_ahead(&pool, every, today, stop.clone()),
            drop_expired(
                &pool,
                every,
                retention,
                quota_window,
                chrono::Utc::now,
                stop.clone()
            ),
            refresh_statistics(&pool, STATISTICS_INTERVAL, stop.clone()),
        );
        Ok(())
    });
}

/// Drops the partitions of decisions, quota slots and history whose rows
/// are all past `retention` at `now()` every `every`
/// ([`coupon_platform::store::retention`]), until `stop`. Several processes
/// may run it: a partition one of them dropped is gone for the others.
pub async fn drop_expired(
    pool: &sqlx::PgPool,
    every: Duration,
    retention: Retention,
    quota_window: Duration,
    now: impl Fn() -> chrono::DateTime<chrono::Utc>,
    stop: CancellationToken,
) {
    every_until(every, &stop, || async {
        let cutoffs = retention.cutoffs(now(), quota_window);
        match retention::drop_expired(pool, &cutoffs).await {
            Ok(dropped) if !dropped.is_empty() => tracing::info!(
                decisions = ?dropped.decisions,
                quota = ?dropped.quota,
                history = ?dropped.history,
                "retention: expired partitions dropped"
            ),
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(%error, "could not drop the expired partitions; trying again later")
            }
        }
    })
    .await;
}

/// Analyzes the claim path's tables and partitions whose statistics fell
/// behind ([`coupon_platform::store::statistics::refresh_stale`]) every
/// `every`, until `stop`.
pub async fn refresh_statistics(pool: &sqlx::PgPool, every: Duration, stop: CancellationToken) {
    every_until(every, &stop, || async {
        match coupon_platform::store::statistics::refresh_stale(pool).await {
            Ok(analyzed) if !analyzed.is_empty() => {
                metrics::counter!("coupon_tables_analyzed_total").increment(analyzed.len() as u64);
                tracing::debug!(?analyzed, "statistics refreshed");
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "could not refresh the claim path's statistics"),
        }
    })
    .await;
}

/// Runs [`coupon_producers::blacklist::Blacklist::upkeep`] every `every`
/// until `stop`; a failed round is logged and tried again at the next.
pub async fn blacklist_upkeep(ctx: &Context, every: Duration, stop: CancellationToken) {
    let blacklist = coupon_producers::blacklist::Blacklist {
        pool: &ctx.pool,
        publisher: &ctx.publisher,
        topics: &ctx.topics,
    };
    every_until(every, &stop, || async {
        match blacklist.upkeep().await {
            Ok(done) if done.lifted + done.published > 0 => tracing::info!(
                lifted = done.lifted,
                published = done.published,
                "blacklist upkeep: expired entries lifted, waiting changes published"
            ),
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "blacklist upkeep failed; trying again later"),
        }
    })
    .await;
}

/// Runs `round` at once and then every `every` (a slow round delays the
/// next rather than piling rounds up) until `stop`, which also ends a round
/// in progress.
async fn every_until<F, Fut>(every: Duration, stop: &CancellationToken, mut round: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = round() => {}
        }
    }
}
