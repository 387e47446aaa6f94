//! The metrics that need a query: the pool per category, active and overdue
//! holds, and each consumer group's lag per partition.
//!
//! One task per process refreshes them every `interval` (5 s by default)
//! rather than on every scrape, so any number of scrapers cost the database
//! and the broker nothing extra. The queries are the ones `couponctl status`
//! runs (`coupon_platform::store::stats`, `coupon_platform::kafka::lag`). Counters
//! (decisions by outcome, dead letters) are recorded where they happen; this
//! module only registers them at zero so that a dashboard sees every series
//! from the start.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use coupon_platform::kafka::lag::LagProbe;
use coupon_platform::store::stats;
use coupon_platform::{KafkaSettings, Topics};
use coupon_schemas::Role;

/// Describes the metrics and registers the counters of `roles` at zero.
pub fn register(roles: &[Role]) {
    metrics::describe_gauge!(
        "coupon_consumer_lag",
        "Records published to a partition and not yet committed by the consumer group"
    );
    metrics::describe_gauge!(
        "coupon_pool_available",
        "Coupons available to claim, per category"
    );
    metrics::describe_gauge!("coupon_holds_active", "Coupons held right now");
    metrics::describe_gauge!(
        "coupon_holds_overdue",
        "Holds past their deadline not released yet"
    );
    metrics::describe_counter!(
        "coupon_claim_decisions_total",
        "Claim decisions made (redelivered requests not counted again), by outcome"
    );
    metrics::describe_counter!(
        "coupon_purchase_decisions_total",
        "Purchase decisions made (repeated orders not counted again), by outcome"
    );
    metrics::describe_counter!(
        "coupon_dead_letters_total",
        "Records sent to the dead-letter topic, by consumer"
    );
    for role in roles {
        metrics::counter!("coupon_dead_letters_total", "consumer" => role.name()).absolute(0);
        let decisions = coupon_consumers::spec(*role).and_then(|spec| spec.decisions);
        if let Some(counter) = decisions {
            for outcome in (counter.outcomes)() {
                metrics::counter!(counter.metric, "outcome" => outcome).absolute(0);
            }
        }
    }
}

/// What the refresh task measures.
pub struct Gauges {
    pool: PgPool,
    /// One probe per consumer group of this process, with the group's topics.
    probes: Arc<Vec<(LagProbe, Vec<String>)>>,
    /// Every category seen, so one whose pool ran dry is set to 0 rather than
    /// left at its last value.
    categories: BTreeSet<String>,
    failing: bool,
}

impl Gauges {
    /// Gauges for a process running `roles` (consumer roles get a lag probe).
    pub fn new(
        pool: PgPool,
        kafka: &KafkaSettings,
        topics: &Topics,
        roles: &[Role],
    ) -> anyhow::Result<Self> {
        let mut probes = Vec::new();
        for role in roles.iter().filter(|r| r.is_consumer()) {
            let names = topics.read_by(*role);
            if !names.is_empty() {
                probes.push((LagProbe::new(kafka, &topics.group(*role))?, names));
            }
        }
        Ok(Self {
            pool,
            probes: Arc::new(probes),
            categories: BTreeSet::new(),
            failing: false,
        })
    }

    /// Reads everything once and sets the gauges.
    pub async fn refresh(&mut self) -> anyhow::Result<()> {
        if self.categories.is_empty() {
            // Once: every category, including those already sold out.
            for c in stats::pool_by_category(&self.pool).await? {
                self.categories.insert(c.category);
            }
        }
        let available = stats::available_by_category(&self.pool).await?;
        for (category, _) in &available {
            self.categories.insert(category.clone());
        }
        for category in &self.categories {
            let count = available
                .iter()
                .find(|(c, _)| c == category)
                .map_or(0, |(_, n)| *n);
            metrics::gauge!("coupon_pool_available", "category" => category.clone())
                .set(count as f64);
        }
        metrics::gauge!("coupon_holds_active").set(stats::active_holds(&self.pool).await? as f64);
        metrics::gauge!("coupon_holds_overdue").set(stats::overdue_holds(&self.pool).await? as f64);

        let probes = self.probes.clone();
        let lags = tokio::task::spawn_blocking(move || {
            probes
                .iter()
                .map(|(probe, topics)| (probe.group().to_owned(), probe.lag(topics)))
                .collect::<Vec<_>>()
        })
        .await?;
        for (group, lag) in lags {
            for p in lag? {
                metrics::gauge!(
                    "coupon_consumer_lag",
                    "group" => group.clone(),
                    "topic" => p.topic,
                    "partition" => p.partition.to_string()
                )
                .set(p.lag as f64);
            }
        }
        Ok(())
    }

    /// Refreshes every `interval` until `shutdown`. Failures are logged once
    /// per outage; the gauges keep their last values meanwhile.
    pub async fn run(mut self, interval: Duration, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            match self.refresh().await {
                Ok(()) => {
                    if self.failing {
                        tracing::info!("metrics gauges refreshed again");
                    }
                    self.failing = false;
                }
                Err(error) => {
                    if !self.failing {
                        tracing::warn!(error = %format!("{error:#}"), "could not refresh the metrics gauges");
                    }
                    self.failing = true;
                }
            }
        }
    }
}
