//! The flash sale in this process: every user claims once through HTTP,
//! sent by the bench's generator, while the process's memory is sampled and
//! each answer lands on the timeline of the plot. The scale rows run it
//! alone at several numbers of users.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures::stream::{self, StreamExt};
use sqlx::PgPool;

use coupon_domain::Category;
use coupon_platform::store;

use super::release::release;
use super::{
    grant_path, plot, profile, profiled, BenchOptions, Latencies, Row, Scenario, UnderTest,
};
use crate::app::AppConfig;

async fn flash_sale(
    http: &reqwest::Client,
    base: &str,
    pool: &PgPool,
    options: &BenchOptions,
) -> anyhow::Result<Row> {
    let urls =
        (0..options.users).map(|i| format!("{base}/api/v1/coupon?id=fan-{i}&category=Flash"));
    let memory = profile::MemorySampler::start(Duration::from_millis(500));
    let started = Instant::now();
    let mut timeline = plot::Timeline::new(started, options.users);
    let latencies = load(
        http,
        urls,
        options.concurrency,
        |s| s == 200 || s == 404,
        Some(&mut timeline),
    )
    .await?;
    let seconds = started.elapsed().as_secs_f64();
    let memory = memory.finish().await;
    let (granted, distinct_holders) =
        store::coupons::held_in_category(pool, &Category::parse("Flash")?).await?;
    // A claim answered sold out from the cache is decided on the log after
    // its answer: give the processor a moment to record the last of them.
    let deadline = Instant::now() + Duration::from_secs(60);
    let decisions: i64 = loop {
        let decisions = store::decisions::claim_decisions_of_users_like(pool, "fan-").await?;
        if decisions >= options.users as i64 || Instant::now() > deadline {
            break decisions;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The figure is claims *decided* per second: until the last decision
    // is stored, not only answered.
    let answered_in = seconds;
    let seconds = started.elapsed().as_secs_f64();
    let mut plotted = String::new();
    if let Some(path) = &options.plot {
        let title = format!(
            "flash sale: {} users, {} coupons, {} in flight, answers/s and latency per second",
            options.users, options.coupons, options.concurrency
        );
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(path, plot::svg(&title, &timeline.seconds()))
            .with_context(|| format!("writing the plot to {}", path.display()))?;
        plotted = format!("; plot in {}", path.display());
    }
    let expected = options.users.min(options.coupons as usize) as i64;
    if granted != expected || distinct_holders != granted || decisions != options.users as i64 {
        bail!("flash sale broke an invariant: {granted} held (expected {expected}), {distinct_holders} holders, {decisions} decisions");
    }
    Ok(Row {
        kind: Scenario::FlashSale,
        memory: Some(memory.clone()),
        open_loop: None,
        scenario: format!(
            "flash sale: {} users, {} coupons, HTTP",
            options.users, options.coupons
        ),
        operations: latencies.len() as u64,
        seconds,
        latencies: Latencies::of(latencies),
        note: format!(
            "{granted} granted to {distinct_holders} users, 0 double allocations, 0 lost; all answered in {answered_in:.1} s, all decided in {seconds:.1} s; {memory}{plotted}"
        ),
    })
}

/// GETs every URL, `concurrency` at a time, and returns each latency; fails
/// on an unexpected status. The URLs are made as they are sent and the
/// latencies land in one vector reserved up front, so the generator's own
/// memory stays 16 bytes per answer and does not blur the system's memory
/// figure.
pub(super) async fn load(
    http: &reqwest::Client,
    urls: impl ExactSizeIterator<Item = String>,
    concurrency: usize,
    ok: impl Fn(u16) -> bool + Copy,
    mut timeline: Option<&mut plot::Timeline>,
) -> anyhow::Result<Vec<Duration>> {
    let total = urls.len();
    let bar = indicatif::ProgressBar::new(total as u64);
    let mut answers = stream::iter(urls)
        .map(|url| {
            let bar = bar.clone();
            async move {
                let sent = Instant::now();
                let response = http.get(&url).send().await?;
                let status = response.status().as_u16();
                let _ = response.bytes().await;
                bar.inc(1);
                if !ok(status) {
                    bail!("{url} answered {status}");
                }
                Ok(sent.elapsed())
            }
        })
        .buffer_unordered(concurrency);
    let mut latencies = plot::touched_buffer(total);
    while let Some(answer) = answers.next().await {
        let latency = answer?;
        if let Some(timeline) = timeline.as_deref_mut() {
            timeline.record(latency);
        }
        latencies.push(latency);
    }
    bar.finish_and_clear();
    Ok(latencies)
}

/// Releases the flash sale's coupons, then runs it on the generator's
/// threads (`on_generator`), with the machine's CPU and the claim
/// processor's batches meanwhile in its note.
pub(super) async fn released_and_run(
    config: &AppConfig,
    options: &BenchOptions,
    pool: &PgPool,
    http: &reqwest::Client,
    base: &str,
    on_generator: &tokio::runtime::Handle,
) -> anyhow::Result<Row> {
    release(config, pool, "Flash", options.coupons).await?;
    let (http, base, pool, options) =
        (http.clone(), base.to_owned(), pool.clone(), options.clone());
    profiled(grant_path::noted(async {
        on_generator
            .spawn(async move { flash_sale(&http, &base, &pool, &options).await })
            .await?
    }))
    .await
    .context("the flash sale")
}

/// A scale row: the flash sale alone, with `options.users` users, as in
/// the full run (every role in this process, the same generator).
pub(super) async fn scale_row(config: &AppConfig, options: &BenchOptions) -> anyhow::Result<Row> {
    let UnderTest {
        token,
        running,
        pool,
        base,
        http,
        generator,
        on_generator,
    } = UnderTest::start(config, options).await?;
    let flash = released_and_run(config, options, &pool, &http, &base, &on_generator).await;
    drop(generator);
    token.cancel();
    running.wait().await?;
    let mut flash = flash?;
    flash.kind = Scenario::Scale;
    Ok(flash)
}
