//! The console's download (`GET /api/v1/analytics/export`): the analyst
//! replay ([`coupon_analyst::replay`]) of a time range, as JSON lines or Parquet
//! ([`coupon_analyst::parquet_export`]), handed to the gateway as its
//! [`Exporter`]. Nothing new is encoded here: a download is byte for byte
//! what `couponctl replay --since --until [--format parquet]` writes.

use chrono::{DateTime, Utc};

use coupon_platform::{KafkaSettings, Topics};
use coupon_producers::gateway::console::{ExportFormat, Exporter};

use coupon_analyst::parquet_export::ParquetSink;
use coupon_analyst::replay::{self, JsonLines, ReplayOptions};

/// Replays every topic of one deployment.
pub struct ReplayExporter {
    pub kafka: KafkaSettings,
    pub topics: Topics,
}

impl ReplayExporter {
    fn run(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        format: ExportFormat,
    ) -> anyhow::Result<Vec<u8>> {
        use anyhow::Context as _;
        let options = ReplayOptions {
            since: Some(since),
            until: Some(until),
            ..ReplayOptions::default()
        };
        let bar = indicatif::ProgressBar::hidden();
        match format {
            ExportFormat::Jsonl => {
                let mut out = Vec::new();
                replay::replay_into(
                    &self.kafka,
                    &self.topics,
                    &options,
                    &mut JsonLines(&mut out),
                    &bar,
                )?;
                Ok(out)
            }
            ExportFormat::Parquet => {
                // The Parquet writer wants a file; it is read back and removed.
                let path = std::env::temp_dir()
                    .join(format!("couponctl-export-{}.parquet", uuid::Uuid::new_v4()));
                let result = (|| {
                    let mut sink = ParquetSink::create(&path)?;
                    replay::replay_into(&self.kafka, &self.topics, &options, &mut sink, &bar)?;
                    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
                })();
                let _ = std::fs::remove_file(&path);
                result
            }
        }
    }
}

impl Exporter for ReplayExporter {
    fn export(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        format: ExportFormat,
    ) -> Result<Vec<u8>, String> {
        self.run(since, until, format)
            .map_err(|error| format!("{error:#}"))
    }
}
