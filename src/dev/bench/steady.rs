//! The steady rows: claims at a fixed rate, open loop (a slow answer does
//! not slow the arrivals down), on a sale that goes on (a tenth win, coupons
//! released every second) and on a day with coupons to spare (half win).
//! These are the latency figures a storefront sees between flash sales.

use std::time::{Duration, Instant};

use anyhow::bail;
use sqlx::PgPool;

use coupon_platform::kafka::Publisher;

use super::release::{issue, release};
use super::{Latencies, Row, Scenario, STEADY_TARGET_RATE};
use crate::app::AppConfig;

/// The steady rows' mixes and rates. The latency target: 5,000 claims/s,
/// open loop, on a sale that goes on: one claim in ten wins, with coupons
/// released every second. Half the claims winning is the grant path's own
/// figure. An open load above capacity only measures the queue, so it runs
/// at half the rate the batched allocation statement alone sustains: its
/// grants then take a quarter of that, the rest going to what a grant costs
/// beyond the statement (two broker hops, the batch, the purchase). At most
/// half the flash sale's rate, at most the target rate.
pub(super) fn steady_rates(rows: &[Row], flash_rate: f64) -> Vec<(Mix, f64)> {
    let allocation = rows
        .iter()
        .rev()
        .find(|r| r.kind == Scenario::Allocation)
        .map_or(STEADY_TARGET_RATE, Row::throughput);
    vec![
        (Mix::SALE, STEADY_TARGET_RATE),
        (
            Mix::DAY,
            STEADY_TARGET_RATE
                .min(flash_rate / 2.0)
                .min(allocation / 2.0),
        ),
    ]
}

/// One steady row's load, owned, so it can run on the generator's runtime.
pub(super) struct SteadyLoad {
    pub(super) http: reqwest::Client,
    pub(super) base: String,
    pub(super) config: AppConfig,
    pub(super) pool: sqlx::PgPool,
    pub(super) rate: f64,
    pub(super) duration: Duration,
    pub(super) mix: Mix,
}

impl SteadyLoad {
    pub(super) async fn run(self) -> anyhow::Result<Row> {
        steady_day(
            &self.http,
            &self.base,
            &self.config,
            &self.pool,
            self.rate,
            self.duration,
            self.mix,
        )
        .await
    }
}

/// The mix of an open-loop load: who wins and how the coupons come.
#[derive(Debug, Clone, Copy)]
pub(super) struct Mix {
    kind: Scenario,
    pub(super) label: &'static str,
    category: &'static str,
    /// One claim in `win_one_in` finds a coupon.
    win_one_in: u32,
    /// Coupons are released every second (a sale that goes on) rather than
    /// all before the first claim.
    every_second: bool,
}

impl Mix {
    /// A sale that goes on: a tenth of the claims win, the rest are sold
    /// out, and the coupons of each second are released during it, so the
    /// sold-out marks are voided and set again all the time.
    const SALE: Mix = Mix {
        kind: Scenario::SteadySale,
        label: "steady sale",
        category: "Sale",
        win_one_in: 10,
        every_second: true,
    };
    /// A day with coupons to spare for half the claims, all released first.
    const DAY: Mix = Mix {
        kind: Scenario::SteadyDay,
        label: "steady day",
        category: "Steady",
        win_one_in: 2,
        every_second: false,
    };
}

/// Claims at a fixed rate, two in five winners buying at once: the latency
/// a storefront sees. The load is open: a slow answer does not slow the
/// arrivals down.
async fn steady_day(
    http: &reqwest::Client,
    base: &str,
    config: &AppConfig,
    pool: &PgPool,
    rate: f64,
    duration: Duration,
    mix: Mix,
) -> anyhow::Result<Row> {
    let rate = rate.max(1.0);
    let total = (rate * duration.as_secs_f64()) as usize;
    let coupons = (total as u32 / mix.win_one_in).max(1);
    let supplier = if mix.every_second {
        Some(supply_every_second(config, pool, rate, duration, mix)?)
    } else {
        release(config, pool, mix.category, coupons).await?;
        None
    };
    let mut pace = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..total {
        pace.tick().await;
        let (http, base) = (http.clone(), base.to_owned());
        clients.spawn(async move { steady_client(&http, &base, mix, i).await });
    }
    let mut latencies = Vec::with_capacity(total);
    // Winners and sold-out answers take different paths (the broker and
    // the processor's batch, or the sold-out mark): the note gives each.
    let (mut grants, mut sold_out) = (Vec::new(), Vec::new());
    let (mut purchases, mut shed) = (0, 0);
    while let Some(joined) = clients.join_next().await {
        match joined?? {
            Some((latency, won, bought)) => {
                latencies.push(latency);
                if won {
                    grants.push(latency);
                } else {
                    sold_out.push(latency);
                }
                purchases += usize::from(bought);
            }
            None => shed += 1,
        }
    }
    let granted = grants.len();
    let figures = |samples| Latencies::brief(Latencies::of(samples));
    let (grants, sold_out) = (figures(grants), figures(sold_out));
    let seconds = started.elapsed().as_secs_f64();
    if let Some(supplier) = supplier {
        supplier.await??;
    }
    Ok(Row {
        kind: mix.kind,
        memory: None,
        open_loop: None,
        scenario: format!("{}: {rate:.0} claims/s open loop, HTTP", mix.label),
        operations: latencies.len() as u64,
        seconds,
        latencies: Latencies::of(latencies),
        note: format!(
            "claim latency; {coupons} coupons {}; {granted} granted ({grants}), the rest sold out ({sold_out}); {purchases} bought at once; {shed} shed (connection refused or 503)",
            if mix.every_second { "released second by second" } else { "released first" }
        ),
    })
}

/// The steady sale's supply: a release every second, for the claims of
/// that second that win.
fn supply_every_second(
    config: &AppConfig,
    pool: &PgPool,
    rate: f64,
    duration: Duration,
    mix: Mix,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    let per_second = ((rate as u32) / mix.win_one_in).max(1);
    let seconds = duration.as_secs().max(1) as u32;
    let (config, pool) = (config.clone(), pool.clone());
    let publisher = Publisher::new(&config.kafka, "bench-supply")?;
    Ok(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        for _ in 0..seconds {
            tick.tick().await;
            issue(&config, &pool, &publisher, mix.category, per_second).await?;
        }
        anyhow::Ok(())
    }))
}

/// One user of the steady row: a claim, and for two winners in five a
/// purchase at once. `None` when the gateway shed the claim; else the
/// claim's latency, whether it won and whether it was bought.
async fn steady_client(
    http: &reqwest::Client,
    base: &str,
    mix: Mix,
    i: usize,
) -> anyhow::Result<Option<(Duration, bool, bool)>> {
    let user = format!("{}-{i}", mix.category.to_lowercase());
    let sent = Instant::now();
    // An open load beyond capacity meets the gateway's caps: a refused
    // connection or a 503 is counted as shed, not a failure.
    let Ok(response) = http
        .get(format!(
            "{base}/api/v1/coupon?id={user}&category={}",
            mix.category
        ))
        .send()
        .await
    else {
        return Ok(None);
    };
    let status = response.status().as_u16();
    if status == 503 {
        return Ok(None);
    }
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    let claimed = sent.elapsed();
    let mut bought = false;
    let won = body["coupon_code"].as_str();
    match (status, won) {
        (200, Some(code)) if i % 5 < 2 => {
            let order = serde_json::json!({
                "user_id": user, "coupon_code": code, "order_id": format!("{user}-order")
            });
            let answer = http
                .post(format!("{base}/api/v1/purchase"))
                .json(&order)
                .send()
                .await
                .map(|r| r.status().as_u16());
            match answer {
                Ok(200) => bought = true,
                // Shed by the caps: the hold simply expires.
                Err(_) | Ok(503) => {}
                Ok(other) => bail!("{user}'s purchase answered {other}"),
            }
        }
        (200 | 404, _) => {}
        _ => bail!("{user}'s claim answered {status}"),
    }
    Ok(Some((claimed, status == 200 && won.is_some(), bought)))
}
