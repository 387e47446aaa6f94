//! The console's download (`GET /api/v1/analytics/export`): the analyst
//! replay ([`coupon_analyst::replay`]) of a time range, as JSON lines or Parquet
//! ([`coupon_analyst::parquet_export`]), handed to the gateway as its
//! [`Exporter`]. Nothing new is encoded here: a download is byte for byte
//! what `couponctl replay --since --until [--format parquet]` writes.
//!
//! A download is bounded in memory and stops when its client goes: the
//! lines go to the HTTP body in chunks through the gateway's bounded
//! channel ([`ExportOut`]), so a client that reads slowly makes the replay
//! wait (it holds a few batches of the log and a few chunks, whatever the
//! range), and a client that leaves makes the next chunk fail and the
//! replay stop at its next batch ([`Sink::closed`]), which closes its
//! consumer. A Parquet file can only be written whole (its footer indexes
//! the row groups): it is built in a temporary file, on disk, not in memory,
//! then sent from there in chunks; a client that leaves stops the build too.

use std::io::Read as _;

use chrono::{DateTime, Utc};

use coupon_platform::{KafkaSettings, Topics};
use coupon_producers::gateway::console::{ExportFormat, ExportOut, Exporter, EXPORT_CHUNK};

use coupon_analyst::parquet_export::ParquetSink;
use coupon_analyst::replay::{self, Line, ReplayOptions, Sink};

/// Replays every topic of one deployment.
pub struct ReplayExporter {
    pub kafka: KafkaSettings,
    pub topics: Topics,
}

/// JSON lines into the body, in chunks of [`EXPORT_CHUNK`].
struct BodyLines<'a> {
    out: &'a ExportOut,
    chunk: Vec<u8>,
}

impl BodyLines<'_> {
    fn flush(&mut self) -> anyhow::Result<()> {
        let chunk = std::mem::replace(&mut self.chunk, Vec::with_capacity(EXPORT_CHUNK));
        Ok(self.out.send(chunk)?)
    }
}

impl Sink for BodyLines<'_> {
    fn write(&mut self, line: &Line<'_>) -> anyhow::Result<()> {
        self.chunk.extend_from_slice(line.json);
        if self.chunk.len() >= EXPORT_CHUNK {
            self.flush()?;
        }
        Ok(())
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        self.flush()
    }

    fn closed(&self) -> bool {
        self.out.is_closed()
    }
}

/// The Parquet sink, stopped when the client leaves.
struct Watched<'a> {
    sink: ParquetSink,
    out: &'a ExportOut,
}

impl Sink for Watched<'_> {
    fn write(&mut self, line: &Line<'_>) -> anyhow::Result<()> {
        self.sink.write(line)
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        self.sink.finish()
    }

    fn columns(&self) -> bool {
        self.sink.columns()
    }

    fn closed(&self) -> bool {
        self.out.is_closed()
    }
}

impl ReplayExporter {
    fn run(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        format: ExportFormat,
        out: &ExportOut,
    ) -> anyhow::Result<()> {
        use anyhow::Context as _;
        let options = ReplayOptions {
            since: Some(since),
            until: Some(until),
            ..ReplayOptions::default()
        };
        let bar = indicatif::ProgressBar::hidden();
        match format {
            ExportFormat::Jsonl => {
                let mut sink = BodyLines {
                    out,
                    chunk: Vec::with_capacity(EXPORT_CHUNK),
                };
                replay::replay_into(&self.kafka, &self.topics, &options, &mut sink, &bar)?;
                Ok(())
            }
            ExportFormat::Parquet => {
                // The Parquet writer wants a file; it is sent from there and removed.
                let path = std::env::temp_dir()
                    .join(format!("couponctl-export-{}.parquet", uuid::Uuid::new_v4()));
                let result = (|| {
                    let mut sink = Watched {
                        sink: ParquetSink::create(&path)?,
                        out,
                    };
                    replay::replay_into(&self.kafka, &self.topics, &options, &mut sink, &bar)?;
                    let mut file = std::fs::File::open(&path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    loop {
                        let mut chunk = vec![0; EXPORT_CHUNK];
                        let n = file
                            .read(&mut chunk)
                            .with_context(|| format!("reading {}", path.display()))?;
                        if n == 0 {
                            return Ok(());
                        }
                        chunk.truncate(n);
                        out.send(chunk)?;
                    }
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
        out: &ExportOut,
    ) -> Result<(), String> {
        self.run(since, until, format, out)
            .map_err(|error| format!("{error:#}"))
    }
}
