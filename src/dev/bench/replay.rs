//! The analyst's rows: `couponctl replay` of the log to JSON lines and to
//! Parquet, and `couponctl replay --rebuild` of it into a fresh database,
//! run once the claims and releases of the other rows are on the log.

use super::{Row, Scenario};
use crate::app::{self, AppConfig};

/// `couponctl replay` of the claim path and the release (created, claims,
/// claim-results) as an analyst runs it: every record decoded and written
/// out, as JSON lines (to a writer that drops them, so no disk is measured)
/// or as a Parquet file (in the temporary directory, removed after).
pub(super) async fn replay(config: &AppConfig, parquet: bool) -> anyhow::Result<Row> {
    use coupon_analyst::replay::{self, JsonLines, ReplayOptions, TopicKind};
    let topics = config.topics();
    let kafka = config.kafka.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<Row> {
        let options = ReplayOptions {
            kinds: vec![
                TopicKind::Created,
                TopicKind::Claims,
                TopicKind::ClaimResults,
            ],
            ..ReplayOptions::default()
        };
        let bar = indicatif::ProgressBar::hidden();
        let (summary, format) = if parquet {
            let path = std::env::temp_dir().join(format!(
                "couponctl-bench-replay-{}.parquet",
                uuid::Uuid::new_v4().simple()
            ));
            let summary =
                coupon_analyst::parquet_export::ParquetSink::create(&path).and_then(|mut sink| {
                    replay::replay_into(&kafka, &topics, &options, &mut sink, &bar)
                });
            let _ = std::fs::remove_file(&path);
            (summary?, "Parquet")
        } else {
            let mut out = std::io::sink();
            let summary =
                replay::replay_into(&kafka, &topics, &options, &mut JsonLines(&mut out), &bar)?;
            (summary, "JSON lines")
        };
        Ok(Row {
            kind: if parquet {
                Scenario::ReplayParquet
            } else {
                Scenario::Replay
            },
            memory: None,
            open_loop: None,
            scenario: format!("replay: created + claims + claim-results to {format}"),
            operations: summary.read,
            seconds: summary.seconds,
            latencies: None,
            note: "records read, decoded and written".into(),
        })
    })
    .await?
}

/// `couponctl replay --rebuild` of the whole log into a scratch database.
pub(super) async fn rebuild(config: &AppConfig) -> anyhow::Result<Row> {
    let stamp = chrono::Utc::now().format("%Y%m%d%H%M%S").to_string();
    let scratch = app::ScratchDatabase::create(
        &config.database_url,
        &format!("coupons_bench_rebuild_{stamp}"),
    )
    .await?;
    let pool = coupon_platform::db::connect(&scratch.url, 4).await?;
    let stats = coupon_analyst::rebuild::rebuild(
        &config.kafka,
        &config.topics(),
        config.policy.quota_window,
        &pool,
        indicatif::ProgressBar::hidden(),
    )
    .await;
    pool.close().await;
    scratch.drop_now().await?;
    let stats = stats?;
    Ok(Row {
        kind: Scenario::Rebuild,
        memory: None,
        open_loop: None,
        scenario: "rebuild: the log into a fresh database".into(),
        operations: stats.events,
        seconds: stats.seconds(),
        latencies: None,
        note: format!(
            "outcome events; {} coupons, {} history rows written",
            stats.coupons, stats.history_rows
        ),
    })
}
