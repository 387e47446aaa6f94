//! `couponctl status`: what an operator looks at first — the pool per
//! category, active holds, each consumer group's lag, and whether the
//! services answer.
//!
//! The numbers come from the same queries as the `/metrics` gauges
//! (`coupon_platform::store::stats`, `coupon_platform::kafka::lag`), so the two
//! never disagree about what "lag" or "available" means.

use std::fmt::Write as _;

use anyhow::Context as _;

use coupon_platform::kafka::lag::group_lag;
use coupon_platform::reach;
use coupon_platform::store::stats;
use coupon_schemas::Role;

use crate::app::AppConfig;

pub async fn report(config: &AppConfig) -> anyhow::Result<String> {
    let mut out = String::new();
    reach::postgres(&config.database_url).await?;
    reach::kafka(&config.kafka.brokers).await?;
    let pool = coupon_platform::db::connect(&config.database_url, 2)
        .await
        .with_context(|| {
            format!(
                "connecting to Postgres at {}",
                crate::app::redact(&config.database_url)
            )
        })?;
    let categories = stats::pool_by_category(&pool)
        .await
        .context("reading coupons (run `couponctl migrate`?)")?;
    writeln!(
        out,
        "{:<24} {:>10} {:>10} {:>10} {:>10}",
        "category", "available", "held", "redeemed", "expired"
    )?;
    for c in &categories {
        writeln!(
            out,
            "{:<24} {:>10} {:>10} {:>10} {:>10}",
            c.category, c.available, c.held, c.redeemed, c.expired
        )?;
    }
    let overdue = stats::overdue_holds(&pool).await?;
    writeln!(out, "overdue holds awaiting release: {overdue}")?;

    let redis =
        match coupon_platform::redis::Cache::connect(&config.redis_url, &config.redis_prefix).await
        {
            Ok(cache) => cache.ping().await.is_ok(),
            Err(_) => false,
        };
    writeln!(
        out,
        "postgres: ok   redis: {}",
        if redis { "ok" } else { "unreachable" }
    )?;

    let topics = config.topics();
    let kafka = config.kafka.clone();
    let lags = tokio::task::spawn_blocking(move || {
        Role::CONSUMERS
            .into_iter()
            .map(|role| {
                let names = topics.read_by(role);
                (role.name(), group_lag(&kafka, &topics.group(role), &names))
            })
            .collect::<Vec<_>>()
    })
    .await?;
    writeln!(out, "consumer lag (records published, not yet processed):")?;
    for (role, lag) in lags {
        match lag {
            Ok(partitions) => {
                let total: i64 = partitions.iter().map(|p| p.lag).sum();
                writeln!(out, "  {role:<10} {total}")?;
            }
            Err(error) => writeln!(
                out,
                "  {role:<10} unknown: {error} (broker at {})",
                config.kafka.brokers
            )?,
        }
    }
    Ok(out)
}
