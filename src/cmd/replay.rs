//! `couponctl replay`: topics to JSON lines or Parquet, or the log rebuilt
//! into a fresh database.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use clap::{Args, ValueEnum};

use coupon_analyst::rebuild;
use coupon_analyst::replay::{self, ReplayOptions, StartAt, TopicKind};
use coupon_domain::QuotaWindow;
use coupon_platform::reach;
use couponctl::app;

use coupon_platform::settings::{self, Flag};

use super::args::{parse_window, parse_zone, Connections};

#[derive(Args, Debug)]
pub struct ReplayArgs {
    /// Topics to read, by short name, comma separated [default: all eight:
    /// created, claims, claim-results, purchases, purchase-results,
    /// expirations, dead-letter, blacklist].
    #[arg(long = "topic", value_name = "TOPICS", value_delimiter = ',', value_parser = replay::parse_kind)]
    pub topics: Vec<TopicKind>,
    /// Start at this offset in every partition [default: the beginning].
    #[arg(long, value_parser = clap::value_parser!(i64).range(0..))]
    pub offset: Option<i64>,
    /// Only records at or after this time (RFC 3339). Partitions are read from
    /// the start and filtered on the record time (or the event's time).
    #[arg(long, value_parser = replay::parse_time)]
    pub since: Option<DateTime<Utc>>,
    /// Only records at or before this time (RFC 3339). A partition is left
    /// at its first record more than a minute past it.
    #[arg(long, value_parser = replay::parse_time)]
    pub until: Option<DateTime<Utc>>,
    /// Write the records to this file [default: stdout].
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// `jsonl` (one JSON object per line) or `parquet` (columns; needs --output)
    /// [default: parquet when --output ends in .parquet, else jsonl].
    #[arg(long, value_enum)]
    pub format: Option<ReplayFormat>,
    /// Instead of JSON lines, project the log into this fresh database: it is
    /// migrated first, and refused if it already has coupons.
    #[arg(long, value_name = "DATABASE_URL", conflicts_with_all = ["topics", "offset", "since", "until", "output"])]
    pub rebuild: Option<String>,
    /// With --rebuild: the quota window the claim processors ran with (quota
    /// slots are named by their window's start).
    #[arg(long, env = "QUOTA_WINDOW", default_value_t = settings::QUOTA_WINDOW, value_parser = parse_window)]
    pub quota_window: QuotaWindow,
    /// The shop's time zone (IANA name, e.g. Europe/Berlin, Asia/Kolkata):
    /// windows of whole days are its calendar days, DST included.
    #[arg(long, env = "QUOTA_TZ", default_value_t = settings::QUOTA_TZ, value_parser = parse_zone)]
    pub quota_tz: coupon_domain::Tz,
    /// How late a request may be decided and still be judged at the time the
    /// broker accepted it; holds are released this long after their deadline.
    #[arg(long, env = "HOLD_GRACE", default_value_t = Flag(settings::HOLD_GRACE), value_parser = settings::HOLD_GRACE_SPAN.parser())]
    pub hold_grace: Flag,
}

#[derive(Copy, Clone, Debug, ValueEnum, PartialEq, Eq)]
pub enum ReplayFormat {
    Jsonl,
    Parquet,
}

pub async fn run(conn: &Connections, args: ReplayArgs) -> anyhow::Result<()> {
    let topics = coupon_platform::Topics::new(&conn.topic_prefix);
    let kafka = conn.kafka();
    reach::kafka(&kafka.brokers).await?;
    if let Some(url) = args.rebuild {
        reach::postgres(&url).await?;
        let target = coupon_platform::db::connect(&url, 4)
            .await
            .with_context(|| {
                format!(
                    "connecting to the rebuild database at {}",
                    app::redact(&url)
                )
            })?;
        let bar = replay::progress_bar(0, "reading the log");
        let stats = rebuild::rebuild(
            &kafka,
            &topics,
            args.quota_window.in_zone(args.quota_tz),
            &target,
            bar,
        )
        .await?;
        target.close().await;
        for example in &stats.anomaly_examples {
            eprintln!("warning: {example}");
        }
        println!("{stats}");
        return Ok(());
    }
    let options = ReplayOptions {
        kinds: args.topics,
        start: args.offset.map(StartAt::Offset).unwrap_or_default(),
        since: args.since,
        until: args.until,
    };
    let output = args.output;
    let parquet = match args.format {
        Some(format) => format == ReplayFormat::Parquet,
        None => output
            .as_ref()
            .is_some_and(|p| p.extension().is_some_and(|e| e == "parquet")),
    };
    if parquet && output.is_none() {
        anyhow::bail!("--format parquet needs --output FILE");
    }
    let summary = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let bar = replay::progress_bar(0, "replaying");
        if let (true, Some(path)) = (parquet, &output) {
            let mut sink = coupon_analyst::parquet_export::ParquetSink::create(path)?;
            let summary = replay::replay_into(&kafka, &topics, &options, &mut sink, &bar);
            bar.finish_and_clear();
            return summary;
        }
        // Big writes: a replay writes hundreds of megabytes a minute.
        const OUT_BUFFER: usize = 1 << 20;
        let mut out: Box<dyn std::io::Write> = match &output {
            Some(path) => Box::new(std::io::BufWriter::with_capacity(
                OUT_BUFFER,
                std::fs::File::create(path)
                    .with_context(|| format!("creating {}", path.display()))?,
            )),
            None => Box::new(std::io::BufWriter::with_capacity(
                OUT_BUFFER,
                std::io::stdout().lock(),
            )),
        };
        let summary = replay::replay_json(&kafka, &topics, &options, &mut *out, &bar);
        bar.finish_and_clear();
        out.flush().context("writing the output")?;
        summary
    })
    .await
    .context("the replay stopped")??;
    eprintln!("{summary}");
    Ok(())
}
