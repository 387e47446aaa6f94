//! `couponctl status`: what an operator looks at first — the pool per
//! category, active holds, each consumer group's lag, and whether the
//! services answer.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use coupon_platform::{KafkaSettings, Topics};

use crate::app::AppConfig;

/// Which topics each role's group reads.
fn role_topics(topics: &Topics) -> Vec<(&'static str, Vec<String>)> {
    vec![
        ("coupons", vec![topics.created()]),
        ("claims", vec![topics.claims()]),
        ("purchases", vec![topics.purchases()]),
        ("expiry", vec![topics.expirations()]),
        (
            "history",
            vec![
                topics.created(),
                topics.claim_results(),
                topics.purchase_results(),
            ],
        ),
    ]
}

/// Records published but not yet committed by `group`, per topic.
pub fn group_lag(
    kafka: &KafkaSettings,
    group: &str,
    topics: &[String],
) -> anyhow::Result<Vec<(String, i64)>> {
    let mut config = kafka.client_config();
    config
        .set("group.id", group)
        .set("enable.auto.commit", "false");
    let consumer: BaseConsumer = config.create()?;
    let mut lags = Vec::new();
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        let mut tpl = TopicPartitionList::new();
        for p in &partitions {
            tpl.add_partition(topic, *p);
        }
        let committed = consumer.committed_offsets(tpl, Duration::from_secs(5))?;
        let mut lag = 0;
        for p in partitions {
            let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(5))?;
            let at = match committed.find_partition(topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => low,
            };
            lag += (high - at).max(0);
        }
        lags.push((topic.clone(), lag));
    }
    Ok(lags)
}

pub async fn report(config: &AppConfig) -> anyhow::Result<String> {
    let mut out = String::new();
    let pool = coupon_platform::db::connect(&config.database_url, 2)
        .await
        .with_context(|| {
            format!(
                "connecting to Postgres at {}",
                crate::app::redact(&config.database_url)
            )
        })?;
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT category, status, count(*) FROM coupons GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .fetch_all(&pool)
    .await
    .context("reading coupons (run `couponctl migrate`?)")?;
    writeln!(
        out,
        "{:<24} {:>10} {:>10} {:>10}",
        "category", "available", "held", "redeemed"
    )?;
    let mut categories: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    categories.dedup();
    for category in categories {
        let get = |status: &str| {
            rows.iter()
                .find(|r| r.0 == category && r.1 == status)
                .map(|r| r.2)
                .unwrap_or(0)
        };
        writeln!(
            out,
            "{category:<24} {:>10} {:>10} {:>10}",
            get("available"),
            get("held"),
            get("redeemed")
        )?;
    }
    let overdue: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM coupons WHERE status = 'held' AND held_until <= now()",
    )
    .fetch_one(&pool)
    .await?;
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
        role_topics(&topics)
            .into_iter()
            .map(|(role, names)| (role, group_lag(&kafka, &topics.group(role), &names)))
            .collect::<Vec<_>>()
    })
    .await?;
    writeln!(out, "consumer lag (records published, not yet processed):")?;
    for (role, lag) in lags {
        match lag {
            Ok(per_topic) => {
                let total: i64 = per_topic.iter().map(|(_, l)| l).sum();
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
