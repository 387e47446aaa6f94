//! Releasing coupons: the release row (a batch issued and watched until it
//! is projected into `coupons` and the history), and the supply the flash
//! sale and the steady rows claim from.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use sqlx::PgPool;

use coupon_domain::Category;
use coupon_platform::kafka::Publisher;
use coupon_platform::store;

use super::{Row, Scenario};
use crate::app::AppConfig;

pub(super) async fn release(
    config: &AppConfig,
    pool: &PgPool,
    category: &str,
    count: u32,
) -> anyhow::Result<Row> {
    let publisher = Publisher::new(&config.kafka, "bench-release")?;
    let started = Instant::now();
    let batch = issue(config, pool, &publisher, category, count).await?;
    let published = started.elapsed();
    // Projected into `coupons` and into the history. A batch is one
    // partition, which the projector and the history sink each write in
    // order, so the last coupon in a table means the batch is: watch for it
    // with a look-up by key (counting the category while it fills cost
    // Postgres more than a tenth of a core), then count once to be sure.
    let last = *batch.codes.last().context("an empty release")?;
    let last_text = last.to_string();
    let category = Category::parse(category)?;
    let (mut in_coupons, mut in_history) = (None, None);
    loop {
        if in_coupons.is_none() && store::coupons::find(pool, last).await?.is_some() {
            in_coupons = Some(started.elapsed());
        }
        if in_history.is_none()
            && !store::history::entries(pool, None, Some(&last_text), None, None)
                .await?
                .is_empty()
        {
            in_history = Some(started.elapsed());
        }
        if in_coupons.is_some() && in_history.is_some() {
            let projected = store::coupons::count_in_category(pool, &category).await?;
            if projected == i64::from(count) {
                break;
            }
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("release not projected after 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let at = |d: Option<Duration>| d.map_or(0.0, |d| d.as_secs_f64());
    Ok(Row {
        kind: Scenario::Release,
        memory: None,
        open_loop: None,
        scenario: format!("release: issue {count} until projected"),
        operations: u64::from(count),
        seconds,
        latencies: None,
        note: format!(
            "published in {:.2}s, in coupons at {:.2}s, in the history at {:.2}s",
            published.as_secs_f64(),
            at(in_coupons),
            at(in_history)
        ),
    })
}

/// Publishes a release of `count` coupons without waiting for it to be
/// projected (the steady sale's supply, which claims race).
pub(super) async fn issue(
    config: &AppConfig,
    pool: &PgPool,
    publisher: &Publisher,
    category: &str,
    count: u32,
) -> anyhow::Result<coupon_producers::issue::IssuedBatch> {
    let request = coupon_producers::issue::IssueRequest {
        employee: coupon_domain::EmployeeId::parse("bench")?,
        category: coupon_domain::Category::parse(category)?,
        count,
        campaign: None,
    };
    Ok(
        coupon_producers::issue::issue(pool, publisher, &config.topics(), 2, &request, |_| {})
            .await?,
    )
}
