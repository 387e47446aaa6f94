//! Analyst replay: read topics from the log, decode every record with the
//! message type its topic carries, and write them out as JSON lines.
//!
//! The reader never touches the live consumer groups: it uses plain
//! partition assignment (`assign`, never `subscribe`) under a fresh group id,
//! with `enable.auto.commit=false`, and never commits. It reads each
//! partition from its start offset up to the end the partition had when the
//! replay started (the high watermark snapshot), so a replay of a busy topic
//! terminates.
//!
//! Time filters (`--since`, `--until`) are applied to the record timestamp
//! (or the envelope's `occurred_at_ms` when the record has none) while
//! reading from the start offset: the local broker's timestamp lookups
//! (`offsets_for_times`) are unreliable, and a scan is correct everywhere.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::{IsTerminal as _, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::{Offset, TopicPartitionList};

use coupon_platform::kafka::{decode, decode_value, DecodeError, Record};
use coupon_platform::{KafkaSettings, Topics};
use coupon_schemas::{
    BlacklistChanged, ClaimDecided, ClaimRequested, CouponsCreated, DeadLetter, Envelope,
    PurchaseDecided, PurchaseRequested,
};

use crate::jsonl::{self, PayloadSpan, RawRecord};

/// How long a read may go without a single record before it is declared stuck.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Broker long-poll of the replay reader.
const FETCH_WAIT_MS: &str = "50";
/// `--until`: a partition is left once a record is this much newer than the
/// bound (records in between are filtered), so producers with slightly
/// skewed clocks sharing a partition lose nothing.
const UNTIL_GRACE_MS: i64 = 60_000;

/// One of the topics (the catalogue's).
pub use coupon_schemas::TopicKind;

/// A decoded record: the message its topic carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Created(CouponsCreated),
    ClaimRequested(ClaimRequested),
    ClaimDecided(ClaimDecided),
    PurchaseRequested(PurchaseRequested),
    PurchaseDecided(PurchaseDecided),
    HoldExpired(coupon_schemas::HoldExpired),
    DeadLetter(DeadLetter),
    BlacklistChanged(BlacklistChanged),
}

/// Decodes `record` as the message type of `kind`, checking its envelope as
/// the consumers do.
pub fn decode_event(kind: TopicKind, record: &Record) -> Result<Event, DecodeError> {
    Ok(match kind {
        TopicKind::Created => Event::Created(decode(record)?),
        TopicKind::Claims => Event::ClaimRequested(decode(record)?),
        TopicKind::ClaimResults => Event::ClaimDecided(decode(record)?),
        TopicKind::Purchases => Event::PurchaseRequested(decode(record)?),
        TopicKind::PurchaseResults => Event::PurchaseDecided(decode(record)?),
        TopicKind::Expirations => Event::HoldExpired(decode(record)?),
        TopicKind::DeadLetter => Event::DeadLetter(decode(record)?),
        TopicKind::Blacklist => Event::BlacklistChanged(decode(record)?),
    })
}

impl Event {
    pub fn envelope(&self) -> Option<&Envelope> {
        match self {
            Event::Created(e) => e.envelope.as_ref(),
            Event::ClaimRequested(e) => e.envelope.as_ref(),
            Event::ClaimDecided(e) => e.envelope.as_ref(),
            Event::PurchaseRequested(e) => e.envelope.as_ref(),
            Event::PurchaseDecided(e) => e.envelope.as_ref(),
            Event::HoldExpired(e) => e.envelope.as_ref(),
            Event::DeadLetter(e) => e.envelope.as_ref(),
            Event::BlacklistChanged(e) => e.envelope.as_ref(),
        }
    }
}

/// Decodes a record's value, borrowed, as the message type of `kind` (see
/// [`decode_event`]).
pub fn decode_event_value(kind: TopicKind, value: Option<&[u8]>) -> Result<Event, DecodeError> {
    Ok(match kind {
        TopicKind::Created => Event::Created(decode_value(value)?),
        TopicKind::Claims => Event::ClaimRequested(decode_value(value)?),
        TopicKind::ClaimResults => Event::ClaimDecided(decode_value(value)?),
        TopicKind::Purchases => Event::PurchaseRequested(decode_value(value)?),
        TopicKind::PurchaseResults => Event::PurchaseDecided(decode_value(value)?),
        TopicKind::Expirations => Event::HoldExpired(decode_value(value)?),
        TopicKind::DeadLetter => Event::DeadLetter(decode_value(value)?),
        TopicKind::Blacklist => Event::BlacklistChanged(decode_value(value)?),
    })
}

impl Event {
    fn take_envelope(self) -> Option<Envelope> {
        match self {
            Event::Created(e) => e.envelope,
            Event::ClaimRequested(e) => e.envelope,
            Event::ClaimDecided(e) => e.envelope,
            Event::PurchaseRequested(e) => e.envelope,
            Event::PurchaseDecided(e) => e.envelope,
            Event::HoldExpired(e) => e.envelope,
            Event::DeadLetter(e) => e.envelope,
            Event::BlacklistChanged(e) => e.envelope,
        }
    }
}

/// When a record happened: its Kafka timestamp, else its envelope's time.
pub fn record_time_ms(record: &Record, event: Option<&Event>) -> Option<i64> {
    time_ms(record.timestamp_ms, event)
}

fn time_ms(timestamp_ms: Option<i64>, event: Option<&Event>) -> Option<i64> {
    timestamp_ms.filter(|t| *t >= 0).or_else(|| {
        event
            .and_then(Event::envelope)
            .map(|e| e.occurred_at_ms)
            .filter(|t| *t > 0)
    })
}

/// One JSON line for a record (without the trailing newline): see
/// [`crate::jsonl`] for the format.
pub fn json_line(
    kind: TopicKind,
    record: &Record,
    decoded: &Result<Event, DecodeError>,
) -> Vec<u8> {
    let mut out = Vec::new();
    let raw = RawRecord {
        topic: &record.topic,
        partition: record.partition,
        offset: record.offset,
        key: record.key.as_deref(),
        value: record.value.as_deref(),
        timestamp_ms: record.timestamp_ms,
    };
    jsonl::write_line(&mut out, kind, &raw, decoded);
    out
}

/// Where each partition's read starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartAt {
    /// The partition's first retained offset.
    #[default]
    Beginning,
    /// This offset in every partition (clamped to what is retained).
    Offset(i64),
}

/// The records `[start, end)` of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionRange {
    pub kind: TopicKind,
    pub topic: String,
    pub partition: i32,
    pub start: i64,
    pub end: i64,
}

impl PartitionRange {
    pub fn len(&self) -> u64 {
        (self.end - self.start).max(0) as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the read callback wants next from a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Stop reading this partition (the rest of its range is skipped).
    StopPartition,
}

/// A consumer outside every consumer group's life: it only ever `assign`s,
/// and never commits.
pub struct Reader {
    consumer: BaseConsumer,
}

impl Reader {
    pub fn new(kafka: &KafkaSettings) -> anyhow::Result<Self> {
        let mut config = kafka.client_config();
        config
            .set(
                "group.id",
                format!("couponctl-replay-{}", uuid::Uuid::new_v4().simple()),
            )
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", FETCH_WAIT_MS)
            // A replay reads whole logs: fetch big and keep a deep local
            // queue, so the broker round trips overlap the encoding instead
            // of stalling it (librdkafka's defaults, 1 MiB per partition and
            // fetch, suit a consumer that keeps up with a live topic).
            .set("max.partition.fetch.bytes", "16777216")
            .set("fetch.max.bytes", "67108864")
            .set("queued.min.messages", "1000000");
        let consumer: BaseConsumer = config
            .create()
            .with_context(|| format!("creating a Kafka reader for {}", kafka.brokers))?;
        Ok(Self { consumer })
    }

    /// The partition ids of `topic`.
    pub fn partitions(&self, topic: &str) -> anyhow::Result<Vec<i32>> {
        partitions_of(&self.consumer, topic)
    }

    /// `(low, high)` watermarks of one partition.
    pub fn watermarks(&self, topic: &str, partition: i32) -> anyhow::Result<(i64, i64)> {
        self.consumer
            .fetch_watermarks(topic, partition, Duration::from_secs(10))
            .with_context(|| format!("reading the watermarks of {topic}[{partition}]"))
    }

    /// Refuses a log whose beginning is gone: a partition of `kinds` whose
    /// first offset is past 0 lost records to retention (or a
    /// delete-records), and `what` (a rebuild, an audit) would otherwise
    /// report that loss as differences, or build a database without it.
    pub fn ensure_whole(
        &self,
        topics: &Topics,
        kinds: &[TopicKind],
        what: &str,
    ) -> anyhow::Result<()> {
        let mut cut = Vec::new();
        for &kind in kinds {
            let topic = topics.of(kind);
            for partition in self.partitions(&topic)? {
                let (low, _) = self.watermarks(&topic, partition)?;
                if low > 0 {
                    cut.push(format!("{topic}[{partition}] starts at offset {low}"));
                }
            }
        }
        if cut.is_empty() {
            return Ok(());
        }
        anyhow::bail!(
            "{what} needs the whole log, but its beginning was deleted ({}): the topics \
             keep records for retention.ms only (LOG_RETENTION_MS=-1, the default for \
             topics this system creates, keeps them; `couponctl topics` sets it on \
             existing ones)",
            cut.join(", ")
        )
    }

    /// The ranges to read for `kinds`: from `start` to each partition's
    /// current end (the high watermark snapshot).
    pub fn plan(
        &self,
        topics: &Topics,
        kinds: &[TopicKind],
        start: StartAt,
    ) -> anyhow::Result<Vec<PartitionRange>> {
        let mut ranges = Vec::new();
        for &kind in kinds {
            let topic = topics.of(kind);
            for partition in self.partitions(&topic)? {
                let (low, high) = self.watermarks(&topic, partition)?;
                let from = match start {
                    StartAt::Beginning => low,
                    StartAt::Offset(offset) => offset.max(low),
                };
                ranges.push(PartitionRange {
                    kind,
                    topic: topic.clone(),
                    partition,
                    start: from,
                    end: high,
                });
            }
        }
        Ok(ranges)
    }

    /// Reads every range, calling `each` for every record in order within its
    /// partition, and returns when every range is done.
    pub fn read(
        &self,
        ranges: &[PartitionRange],
        mut each: impl FnMut(TopicKind, Record) -> anyhow::Result<Flow>,
    ) -> anyhow::Result<u64> {
        self.read_raw(ranges, |range, message| {
            each(ranges[range].kind, Record::from_message(message))
        })
    }

    /// [`Reader::read`] without copying the records: `each` gets the index
    /// of the record's range in `ranges` and the message, borrowed from the
    /// client's buffers.
    pub fn read_raw(
        &self,
        ranges: &[PartitionRange],
        mut each: impl FnMut(usize, &BorrowedMessage<'_>) -> anyhow::Result<Flow>,
    ) -> anyhow::Result<u64> {
        // Topic, then partition, to the range: looked up per record without
        // building an owned key.
        let mut index: HashMap<&str, HashMap<i32, usize>> = HashMap::new();
        let mut open = vec![false; ranges.len()];
        let mut left = 0usize;
        let mut tpl = TopicPartitionList::new();
        for (i, range) in ranges.iter().enumerate().filter(|(_, r)| !r.is_empty()) {
            if index
                .entry(range.topic.as_str())
                .or_default()
                .insert(range.partition, i)
                .is_some()
            {
                bail!(
                    "{}[{}] is planned twice in one read",
                    range.topic,
                    range.partition
                );
            }
            open[i] = true;
            left += 1;
            tpl.add_partition_offset(&range.topic, range.partition, Offset::Offset(range.start))
                .with_context(|| format!("assigning {}[{}]", range.topic, range.partition))?;
        }
        if left == 0 {
            return Ok(0);
        }
        self.consumer
            .assign(&tpl)
            .context("assigning the partitions to read")?;
        let mut read = 0u64;
        let mut last_progress = Instant::now();
        while left > 0 {
            match self.consumer.poll(Duration::from_millis(200)) {
                Some(Ok(message)) => {
                    last_progress = Instant::now();
                    let Some(&i) = index
                        .get(message.topic())
                        .and_then(|partitions| partitions.get(&message.partition()))
                    else {
                        continue;
                    };
                    if !open[i] {
                        continue;
                    }
                    let end = ranges[i].end;
                    if message.offset() >= end {
                        self.close(ranges, i, &mut open, &mut left)?;
                        continue;
                    }
                    let last = message.offset() + 1 >= end;
                    read += 1;
                    let flow = each(i, &message)?;
                    if last || flow == Flow::StopPartition {
                        self.close(ranges, i, &mut open, &mut left)?;
                    }
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, "error while reading; continuing");
                    self.check_stall(ranges, &open, last_progress)?;
                }
                None => {
                    // Records past the end may never come (e.g. a trailing
                    // control record): a position at the end closes the range.
                    let positions = self.consumer.position().context("reading positions")?;
                    for i in 0..ranges.len() {
                        let range = &ranges[i];
                        if open[i]
                            && matches!(
                                positions
                                    .find_partition(&range.topic, range.partition)
                                    .map(|e| e.offset()),
                                Some(Offset::Offset(at)) if at >= range.end
                            )
                        {
                            self.close(ranges, i, &mut open, &mut left)?;
                        }
                    }
                    self.check_stall(ranges, &open, last_progress)?;
                }
            }
        }
        Ok(read)
    }

    fn check_stall(
        &self,
        ranges: &[PartitionRange],
        open: &[bool],
        last_progress: Instant,
    ) -> anyhow::Result<()> {
        if !open.iter().any(|o| *o) || last_progress.elapsed() <= STALL_TIMEOUT {
            return Ok(());
        }
        let mut waiting: Vec<String> = ranges
            .iter()
            .zip(open)
            .filter(|(_, open)| **open)
            .map(|(r, _)| format!("{}[{}]", r.topic, r.partition))
            .collect();
        waiting.sort();
        bail!(
            "no record for {STALL_TIMEOUT:?} while still expecting some from {}",
            waiting.join(", ")
        )
    }

    fn close(
        &self,
        ranges: &[PartitionRange],
        i: usize,
        open: &mut [bool],
        left: &mut usize,
    ) -> anyhow::Result<()> {
        open[i] = false;
        *left -= 1;
        self.unassign(&ranges[i].topic, ranges[i].partition)
    }

    /// Stops fetching a finished partition (records already fetched for it
    /// are ignored).
    fn unassign(&self, topic: &str, partition: i32) -> anyhow::Result<()> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        self.consumer
            .pause(&tpl)
            .with_context(|| format!("pausing {topic}[{partition}]"))
    }
}

fn partitions_of(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<Vec<i32>> {
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .with_context(|| format!("reading the metadata of {topic}"))?;
    let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
        bail!("topic {topic} does not exist");
    };
    if let Some(error) = t.error() {
        bail!(
            "topic {topic} is not readable: {:?}",
            rdkafka::error::RDKafkaErrorCode::from(error)
        );
    }
    let mut ids: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
    if ids.is_empty() {
        bail!("topic {topic} does not exist (no partitions)");
    }
    ids.sort_unstable();
    Ok(ids)
}

/// The offsets `group` has committed on `topic`, per partition (`None`:
/// nothing committed). Uses a consumer with that group id that never
/// subscribes, assigns or commits, so the group is left exactly as it is.
pub fn committed_offsets(
    kafka: &KafkaSettings,
    group: &str,
    topic: &str,
) -> anyhow::Result<BTreeMap<i32, Option<i64>>> {
    let mut config = kafka.client_config();
    config
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    let consumer: BaseConsumer = config
        .create()
        .with_context(|| format!("creating a Kafka client for {}", kafka.brokers))?;
    let parts = partitions_of(&consumer, topic)?;
    let mut tpl = TopicPartitionList::new();
    for p in &parts {
        tpl.add_partition(topic, *p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .with_context(|| format!("reading the offsets {group} committed on {topic}"))?;
    Ok(parts
        .into_iter()
        .map(|p| {
            let offset = match committed.find_partition(topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) if o >= 0 => Some(o),
                _ => None,
            };
            (p, offset)
        })
        .collect())
}

/// A progress bar on stderr with records/s, drawn only when stderr is a terminal.
pub fn progress_bar(total: u64, what: &str) -> indicatif::ProgressBar {
    let target = if std::io::stderr().is_terminal() {
        indicatif::ProgressDrawTarget::stderr()
    } else {
        indicatif::ProgressDrawTarget::hidden()
    };
    let bar = indicatif::ProgressBar::with_draw_target(Some(total), target);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{spinner}} {what} [{{bar:40}}] {{pos}}/{{len}} records ({{rate}}, eta {{eta}})"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .with_key(
            "rate",
            |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.0} events/s", state.per_sec());
            },
        )
        .progress_chars("=> "),
    );
    bar
}

/// What to replay.
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    /// Empty: every topic of the spec.
    pub kinds: Vec<TopicKind>,
    pub start: StartAt,
    /// Only records at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only records at or before this time.
    pub until: Option<DateTime<Utc>>,
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplaySummary {
    /// Records read from the log (including filtered ones).
    pub read: u64,
    /// Records written out.
    pub written: u64,
    /// Written records that could not be decoded.
    pub undecodable: u64,
    pub seconds: f64,
}

impl ReplaySummary {
    pub fn rate(&self) -> f64 {
        self.read as f64 / self.seconds.max(1e-9)
    }
}

impl fmt::Display for ReplaySummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "replayed {} records ({} written, {} undecodable) in {:.2}s ({:.0} records/s)",
            self.read,
            self.written,
            self.undecodable,
            self.seconds,
            self.rate()
        )
    }
}

/// One replayed record as a [`Sink`] gets it.
#[derive(Debug, Clone, Copy)]
pub struct Line<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    /// The record's timestamp, if it has one.
    pub timestamp_ms: Option<i64>,
    /// The key as text; `None` when there is none or it is not UTF-8.
    pub key: Option<&'a str>,
    /// The JSON line, with its newline (see [`crate::jsonl`]). For a sink
    /// that asks for [`Sink::columns`], only the payload object (empty for
    /// an undecodable record): the line is not built.
    pub json: &'a [u8],
    /// The payload object of the JSON line; `None` for an undecodable record.
    pub payload_json: Option<&'a [u8]>,
    /// The decoded envelope; only given to a sink that asks for
    /// [`Sink::columns`].
    pub envelope: Option<&'a Envelope>,
    /// Why the record does not decode; only given to a sink that asks for
    /// [`Sink::columns`].
    pub error: Option<&'a str>,
}

/// Where replayed records go: JSON lines, or Parquet (`crate::parquet_export`).
pub trait Sink {
    /// One record, in the order of its partition.
    fn write(&mut self, line: &Line<'_>) -> anyhow::Result<()>;
    fn finish(&mut self) -> anyhow::Result<()>;
    /// Whether this sink reads [`Line::envelope`], [`Line::error`] and
    /// [`Line::payload_json`] instead of the JSON line (keeping them costs a
    /// little per record; the line is then not built).
    fn columns(&self) -> bool {
        false
    }
    /// Whether nobody reads the output any more (a download whose client
    /// left): the replay stops at its next batch instead of reading the
    /// rest of the log, even when none of it would be written.
    fn closed(&self) -> bool {
        false
    }
}

/// One JSON object per line.
pub struct JsonLines<'a>(pub &'a mut dyn Write);

impl Sink for JsonLines<'_> {
    fn write(&mut self, line: &Line<'_>) -> anyhow::Result<()> {
        self.0.write_all(line.json).context("writing the output")
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        self.0.flush().context("writing the output")
    }
}

/// Reads the chosen topics and writes one JSON object per line to `out`.
/// Blocking: call it from a blocking-safe place.
pub fn replay_json(
    kafka: &KafkaSettings,
    topics: &Topics,
    options: &ReplayOptions,
    out: &mut dyn Write,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<ReplaySummary> {
    replay_into(kafka, topics, options, &mut JsonLines(out), bar)
}

/// Records a reader hands to the encoders at once.
const BATCH: usize = 2_048;
/// Bytes of records a reader hands to the encoders at once, at most (a
/// batch of large records is cut sooner, so the batches in flight hold a
/// few MiB whatever the records).
const BATCH_BYTES: usize = 1 << 20;
/// Batches read but not yet written, at most (bounds the memory held when
/// the sink is slower than the reader).
const IN_FLIGHT_PER_WORKER: usize = 4;

/// Reads the chosen topics and hands every selected record to `sink`.
/// Blocking: call it from a blocking-safe place.
///
/// Three stages on threads of their own, so a replay uses every core: the
/// caller's thread reads the log into batches (copying each record once,
/// into the batch's buffer), worker threads decode, filter and encode a
/// batch each, and the caller's thread hands the batches to the sink in the
/// order they were read. The sink sees exactly what one thread doing it all
/// in turn would give it: each partition in log order, and partitions
/// interleaved as the client delivered them.
pub fn replay_into(
    kafka: &KafkaSettings,
    topics: &Topics,
    options: &ReplayOptions,
    sink: &mut dyn Sink,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<ReplaySummary> {
    if let (Some(since), Some(until)) = (options.since, options.until) {
        if until < since {
            bail!("--until ({until}) is before --since ({since})");
        }
    }
    let started = Instant::now();
    let mut kinds: Vec<TopicKind> = Vec::new();
    for kind in &options.kinds {
        if !kinds.contains(kind) {
            kinds.push(*kind);
        }
    }
    if kinds.is_empty() {
        kinds = TopicKind::ALL.to_vec();
    }
    let reader = Reader::new(kafka)?;
    let ranges = reader.plan(topics, &kinds, options.start)?;
    bar.set_length(ranges.iter().map(PartitionRange::len).sum());
    let filter = TimeFilter {
        since_ms: options.since.map(|t| t.timestamp_millis()),
        until_ms: options.until.map(|t| t.timestamp_millis()),
    };
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(1, 8);
    let mut summary = pipeline(&reader, &ranges, filter, workers, sink, bar)?;
    sink.finish()?;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// `--since`/`--until` on the record time.
#[derive(Debug, Clone, Copy, Default)]
struct TimeFilter {
    since_ms: Option<i64>,
    until_ms: Option<i64>,
}

/// What becomes of one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Write,
    /// Outside the time range.
    Skip,
    /// Past `--until` by more than the grace: neither this record nor the
    /// rest of its partition is written.
    Stop,
}

impl TimeFilter {
    fn verdict(&self, timestamp_ms: Option<i64>, event: Option<&Event>) -> Verdict {
        if self.since_ms.is_none() && self.until_ms.is_none() {
            return Verdict::Write;
        }
        let Some(at) = time_ms(timestamp_ms, event) else {
            // A record with no time cannot be placed in a time range.
            return Verdict::Skip;
        };
        if self.since_ms.is_some_and(|since| at < since) {
            return Verdict::Skip;
        }
        match self.until_ms {
            Some(until) if at > until.saturating_add(UNTIL_GRACE_MS) => Verdict::Stop,
            Some(until) if at > until => Verdict::Skip,
            _ => Verdict::Write,
        }
    }
}

/// Records as read, copied back to back into one buffer.
#[derive(Debug, Default)]
struct RawBatch {
    bytes: Vec<u8>,
    records: Vec<RawMeta>,
}

#[derive(Debug)]
struct RawMeta {
    /// Index of the record's range.
    range: usize,
    offset: i64,
    timestamp_ms: Option<i64>,
    key: Option<std::ops::Range<usize>>,
    value: Option<std::ops::Range<usize>>,
}

impl RawBatch {
    fn push(&mut self, range: usize, message: &BorrowedMessage<'_>) {
        self.push_parts(
            range,
            message.offset(),
            message.timestamp().to_millis(),
            message.key(),
            message.payload(),
        );
    }

    fn push_parts(
        &mut self,
        range: usize,
        offset: i64,
        timestamp_ms: Option<i64>,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) {
        let mut copy = |bytes: Option<&[u8]>| {
            bytes.map(|b| {
                let start = self.bytes.len();
                self.bytes.extend_from_slice(b);
                start..self.bytes.len()
            })
        };
        let key = copy(key);
        let value = copy(value);
        self.records.push(RawMeta {
            range,
            offset,
            timestamp_ms,
            key,
            value,
        });
    }

    fn record<'a>(&'a self, ranges: &'a [PartitionRange], meta: &RawMeta) -> RawRecord<'a> {
        let range = &ranges[meta.range];
        RawRecord {
            topic: &range.topic,
            partition: range.partition,
            offset: meta.offset,
            key: meta.key.clone().map(|r| &self.bytes[r]),
            value: meta.value.clone().map(|r| &self.bytes[r]),
            timestamp_ms: meta.timestamp_ms,
        }
    }
}

/// A batch decoded and encoded: its lines back to back in `out`.
struct EncodedBatch {
    raw: RawBatch,
    out: Vec<u8>,
    records: Vec<Encoded>,
}

struct Encoded {
    verdict: Verdict,
    undecodable: bool,
    /// Where this record's line ends in `out` (it starts where the
    /// previous one ended).
    end: usize,
    payload: PayloadSpan,
    /// For a sink that asks for [`Sink::columns`].
    columns: Option<Box<Columns>>,
}

struct Columns {
    envelope: Option<Envelope>,
    error: Option<String>,
}

fn encode_batch(
    ranges: &[PartitionRange],
    raw: RawBatch,
    filter: TimeFilter,
    columns: bool,
) -> EncodedBatch {
    let mut out = Vec::with_capacity(raw.bytes.len() * 2 + raw.records.len() * 160);
    let mut records = Vec::with_capacity(raw.records.len());
    for meta in &raw.records {
        let record = raw.record(ranges, meta);
        let kind = ranges[meta.range].kind;
        let decoded = decode_event_value(kind, record.value);
        let verdict = filter.verdict(record.timestamp_ms, decoded.as_ref().ok());
        let mut payload = None;
        if verdict == Verdict::Write {
            if columns {
                // A columnar sink takes the payload and the envelope, not
                // the line: building the rest of it was a third of the work.
                payload = jsonl::write_payload(&mut out, &decoded);
            } else {
                payload = jsonl::write_line(&mut out, kind, &record, &decoded);
                out.push(b'\n');
            }
        }
        let undecodable = decoded.is_err();
        let columns = (columns && verdict == Verdict::Write).then(|| {
            Box::new(match decoded {
                Ok(event) => Columns {
                    envelope: event.take_envelope(),
                    error: None,
                },
                Err(error) => Columns {
                    envelope: None,
                    error: Some(error.to_string()),
                },
            })
        });
        records.push(Encoded {
            verdict,
            undecodable,
            end: out.len(),
            payload,
            columns,
        });
    }
    EncodedBatch { raw, out, records }
}

/// The reader, the encoders and the writer (see [`replay_into`]).
fn pipeline(
    reader: &Reader,
    ranges: &[PartitionRange],
    filter: TimeFilter,
    workers: usize,
    sink: &mut dyn Sink,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<ReplaySummary> {
    let columns = sink.columns();
    // Partitions the writer has seen a record past `--until` in: the
    // reader leaves them, and their later records are dropped.
    let stopped: Vec<AtomicBool> = ranges.iter().map(|_| AtomicBool::new(false)).collect();
    let in_flight = workers * IN_FLIGHT_PER_WORKER;
    // A batch is read only with a free slot, so the queue to the encoders
    // never blocks the reader and the writer's reorder buffer stays small.
    let (slot_tx, slot_rx) = mpsc::sync_channel::<()>(in_flight);
    for _ in 0..in_flight {
        let _ = slot_tx.send(());
    }
    let (work_tx, work_rx) = mpsc::sync_channel::<(u64, RawBatch)>(in_flight);
    let work_rx = Mutex::new(work_rx);
    let (done_tx, done_rx) = mpsc::channel::<(u64, EncodedBatch)>();
    std::thread::scope(|scope| -> anyhow::Result<ReplaySummary> {
        for n in 0..workers {
            let (work_rx, done_tx) = (&work_rx, done_tx.clone());
            std::thread::Builder::new()
                .name(format!("replay-encode-{n}"))
                .spawn_scoped(scope, move || loop {
                    let job = match work_rx.lock() {
                        Ok(queue) => queue.recv(),
                        Err(_) => return,
                    };
                    let Ok((seq, raw)) = job else { return };
                    let batch = encode_batch(ranges, raw, filter, columns);
                    if done_tx.send((seq, batch)).is_err() {
                        return;
                    }
                })
                .context("starting an encoding thread")?;
        }
        drop(done_tx);
        let stopped = &stopped;
        let reading = std::thread::Builder::new()
            .name("replay-read".into())
            .spawn_scoped(scope, move || -> anyhow::Result<()> {
                let mut batch = RawBatch::default();
                let mut seq = 0u64;
                let mut send = |batch: RawBatch| -> anyhow::Result<()> {
                    slot_rx
                        .recv()
                        .map_err(|_| anyhow::anyhow!("the replay's writer stopped"))?;
                    work_tx
                        .send((seq, batch))
                        .map_err(|_| anyhow::anyhow!("the replay's encoders stopped"))?;
                    seq += 1;
                    Ok(())
                };
                reader.read_raw(ranges, |range, message| {
                    if stopped[range].load(Ordering::Relaxed) {
                        return Ok(Flow::StopPartition);
                    }
                    batch.push(range, message);
                    if batch.records.len() >= BATCH || batch.bytes.len() >= BATCH_BYTES {
                        send(std::mem::take(&mut batch))?;
                    }
                    Ok(Flow::Continue)
                })?;
                if !batch.records.is_empty() {
                    send(batch)?;
                }
                Ok(())
            })
            .context("starting the reading thread")?;
        let written = write_in_order(ranges, done_rx, slot_tx, stopped, sink, bar);
        let read = reading
            .join()
            .map_err(|_| anyhow::anyhow!("the replay's reader panicked"))?;
        // The writer's error first: it is why the reader stopped.
        let summary = written?;
        read?;
        Ok(summary)
    })
}

/// The writer: batches back in the order they were read, each record
/// handed to the sink (or dropped, if its partition was left).
fn write_in_order(
    ranges: &[PartitionRange],
    done: mpsc::Receiver<(u64, EncodedBatch)>,
    slots: mpsc::SyncSender<()>,
    stopped: &[AtomicBool],
    sink: &mut dyn Sink,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<ReplaySummary> {
    let mut summary = ReplaySummary::default();
    let mut pending: BTreeMap<u64, EncodedBatch> = BTreeMap::new();
    let mut next = 0u64;
    for (seq, batch) in done {
        if sink.closed() {
            bail!("the output was closed");
        }
        pending.insert(seq, batch);
        while let Some(batch) = pending.remove(&next) {
            next += 1;
            let mut start = 0;
            for (meta, encoded) in batch.raw.records.iter().zip(&batch.records) {
                let line = start..encoded.end;
                start = encoded.end;
                if stopped[meta.range].load(Ordering::Relaxed) {
                    continue;
                }
                summary.read += 1;
                match encoded.verdict {
                    Verdict::Skip => continue,
                    Verdict::Stop => {
                        stopped[meta.range].store(true, Ordering::Relaxed);
                        continue;
                    }
                    Verdict::Write => {}
                }
                let record = batch.raw.record(ranges, meta);
                let columns = encoded.columns.as_deref();
                sink.write(&Line {
                    topic: record.topic,
                    partition: record.partition,
                    offset: record.offset,
                    timestamp_ms: record.timestamp_ms.filter(|t| *t >= 0),
                    key: record.key.and_then(|k| std::str::from_utf8(k).ok()),
                    json: &batch.out[line],
                    payload_json: encoded.payload.clone().map(|p| &batch.out[p]),
                    envelope: columns.and_then(|c| c.envelope.as_ref()),
                    error: columns.and_then(|c| c.error.as_deref()),
                })?;
                summary.written += 1;
                summary.undecodable += u64::from(encoded.undecodable);
            }
            bar.inc(batch.records.len() as u64);
            // The reader may read one more batch.
            let _ = slots.send(());
        }
    }
    Ok(summary)
}

/// Parses an RFC 3339 time, e.g. `2026-11-25T00:00:00Z`.
pub fn parse_time(raw: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(raw.trim())
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("{raw:?} is not an RFC 3339 time like 2026-11-25T00:00:00Z: {e}"))
}

/// Parses a `--topic` list entry.
pub fn parse_kind(raw: &str) -> Result<TopicKind, String> {
    raw.parse()
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use coupon_schemas::ClaimOutcome;
    use prost::Message as _;
    use serde_json::Value;

    fn line_value(kind: TopicKind, record: &Record, decoded: &Result<Event, DecodeError>) -> Value {
        serde_json::from_slice(&json_line(kind, record, decoded)).unwrap()
    }

    fn record(topic: &str, value: Vec<u8>) -> Record {
        Record {
            topic: topic.into(),
            partition: 1,
            offset: 7,
            key: Some(b"user-1".to_vec()),
            value: Some(value),
            timestamp_ms: Some(1_000),
        }
    }

    #[test]
    fn topic_kinds_parse_by_short_name() {
        for kind in TopicKind::ALL {
            assert_eq!(kind.short().parse::<TopicKind>().unwrap(), kind);
        }
        assert!("bogus".parse::<TopicKind>().is_err());
        let topics = Topics::new("p");
        let names: Vec<String> = TopicKind::ALL.iter().map(|k| topics.of(*k)).collect();
        assert_eq!(names, topics.all());
    }

    #[test]
    fn enums_are_written_by_name_and_the_envelope_apart() {
        let event = ClaimDecided {
            envelope: Some(coupon_schemas::new_envelope::<ClaimDecided>(
                "e1".into(),
                1_795_564_800_000,
                "test",
                "c1",
            )),
            request_id: "r1".into(),
            user_id: "user-1".into(),
            outcome: ClaimOutcome::Granted as i32,
            coupon_code: "ABC".into(),
            expires_at_ms: 99,
            ..Default::default()
        };
        let rec = record("p.claim-results", event.encode_to_vec());
        let decoded = decode_event(TopicKind::ClaimResults, &rec);
        let line = line_value(TopicKind::ClaimResults, &rec, &decoded);
        assert_eq!(line["payload"]["outcome"], "CLAIM_OUTCOME_GRANTED");
        assert_eq!(line["payload"]["request_id"], "r1");
        assert_eq!(line["payload"]["expires_at_ms"], 99);
        assert!(line["payload"].get("envelope").is_none());
        assert_eq!(line["envelope"]["event_id"], "e1");
        assert_eq!(line["key"], "user-1");
        assert_eq!(line["offset"], 7);
        assert!(line.get("error").is_none());
    }

    #[test]
    fn undecodable_records_keep_their_bytes() {
        let rec = record("p.claims", vec![0xff, 0x00, 0x13]);
        let decoded = decode_event(TopicKind::Claims, &rec);
        let line = line_value(TopicKind::Claims, &rec, &decoded);
        assert!(line["error"].as_str().unwrap().contains("protobuf"));
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(line["value_base64"].as_str().unwrap())
            .unwrap();
        assert_eq!(bytes, vec![0xff, 0x00, 0x13]);
        // A message of another topic's type is refused, not misread.
        let created = CouponsCreated {
            envelope: Some(coupon_schemas::new_envelope::<CouponsCreated>(
                "e".into(),
                1,
                "t",
                "",
            )),
            ..Default::default()
        };
        let rec = record("p.claims", created.encode_to_vec());
        assert!(decode_event(TopicKind::Claims, &rec).is_err());
    }

    #[test]
    fn dead_letters_carry_base64_bytes() {
        let letter = DeadLetter {
            envelope: Some(coupon_schemas::new_envelope::<DeadLetter>(
                "e".into(),
                1_795_564_800_000,
                "t",
                "",
            )),
            original_value: vec![1, 2, 3],
            ..Default::default()
        };
        let rec = record("p.dead-letter", letter.encode_to_vec());
        let decoded = decode_event(TopicKind::DeadLetter, &rec);
        let line = line_value(TopicKind::DeadLetter, &rec, &decoded);
        assert_eq!(line["payload"]["original_value"], "AQID");
    }

    #[test]
    fn record_time_falls_back_to_the_envelope() {
        let mut rec = record("p.claims", Vec::new());
        assert_eq!(record_time_ms(&rec, None), Some(1_000));
        rec.timestamp_ms = None;
        let event = Event::ClaimRequested(ClaimRequested {
            envelope: Some(coupon_schemas::new_envelope::<ClaimRequested>(
                "e".into(),
                5_000,
                "t",
                "",
            )),
            ..Default::default()
        });
        assert_eq!(record_time_ms(&rec, Some(&event)), Some(5_000));
        assert_eq!(record_time_ms(&rec, None), None);
    }

    #[test]
    fn times_parse_as_rfc3339() {
        assert_eq!(
            parse_time("2026-11-25T00:00:00Z").unwrap().timestamp(),
            1_795_564_800
        );
        assert!(parse_time("yesterday").is_err());
    }

    /// (range, timestamp, key, value)
    type LogEntry = (usize, Option<i64>, Option<Vec<u8>>, Option<Vec<u8>>);

    /// The writer gets the batches back in any order and must give the sink
    /// exactly what one thread reading, decoding, filtering and writing each
    /// record in turn gave it (the code this pipeline replaced, below):
    /// the same bytes, in the same order, with the same counts, and nothing
    /// of a partition after its first record past `--until` and the grace.
    #[test]
    fn batches_are_written_in_read_order_and_a_partition_past_until_is_left() {
        let range = |kind: TopicKind, topic: &str, partition| PartitionRange {
            kind,
            topic: topic.into(),
            partition,
            start: 0,
            end: 1_000,
        };
        let ranges = vec![
            range(TopicKind::Claims, "p.claims", 0),
            range(TopicKind::Claims, "p.claims", 1),
            range(TopicKind::DeadLetter, "p.dead-letter", 0),
        ];
        let base = 1_795_564_800_000i64;
        let (since, until) = (base + 1_000, base + 100_000);
        let claim = |i: i64, at: i64| {
            ClaimRequested {
                envelope: Some(coupon_schemas::new_envelope::<ClaimRequested>(
                    format!("e{i}"),
                    at,
                    "t",
                    "",
                )),
                request_id: format!("r{i}"),
                user_id: format!("user-{i}"),
                ..Default::default()
            }
            .encode_to_vec()
        };
        let letter = |i: i64| {
            DeadLetter {
                envelope: Some(coupon_schemas::new_envelope::<DeadLetter>(
                    format!("d{i}"),
                    base + 2_000,
                    "t",
                    "",
                )),
                original_value: vec![0xff, i as u8],
                ..Default::default()
            }
            .encode_to_vec()
        };
        // (range, timestamp, key, value), in the order the client delivered them.
        let mut log: Vec<LogEntry> = Vec::new();
        for i in 0..200i64 {
            let at = match i {
                0..=9 => base + i,                 // before --since
                150 => until + UNTIL_GRACE_MS + 1, // partition 1 is left here
                140..=149 => until + 10,           // past --until, within the grace
                _ => base + 1_000 + i,
            };
            let partition = (i % 3) as usize;
            let (key, value) = match (partition, i % 7) {
                (2, _) => (Some(b"\xfe\xff".to_vec()), Some(letter(i))),
                (_, 0) => (Some(b"user".to_vec()), Some(b"\xff not protobuf".to_vec())),
                (_, 1) => (None, None),
                _ => (Some(format!("user-{i}").into_bytes()), Some(claim(i, at))),
            };
            // A record with no timestamp falls back to its envelope's time.
            let timestamp = (i % 5 != 0).then_some(at);
            let partition = if i == 150 { 1 } else { partition };
            log.push((partition, timestamp, key, value));
        }
        let record_of = |(range, ts, key, value): &LogEntry, offset: i64| Record {
            topic: ranges[*range].topic.clone(),
            partition: ranges[*range].partition,
            offset,
            key: key.clone(),
            value: value.clone(),
            timestamp_ms: *ts,
        };

        // The reference: one record at a time, as replay_into did it.
        let mut expected = Vec::new();
        let mut reference = ReplaySummary::default();
        let mut left = std::collections::HashSet::new();
        for (offset, entry) in log.iter().enumerate() {
            if left.contains(&entry.0) {
                continue;
            }
            let record = record_of(entry, offset as i64);
            let kind = ranges[entry.0].kind;
            reference.read += 1;
            let decoded = decode_event(kind, &record);
            let Some(at) = record_time_ms(&record, decoded.as_ref().ok()) else {
                continue;
            };
            if at < since {
                continue;
            }
            if at > until {
                if at > until + UNTIL_GRACE_MS {
                    left.insert(entry.0);
                }
                continue;
            }
            reference.undecodable += u64::from(decoded.is_err());
            expected.extend(json_line(kind, &record, &decoded));
            expected.push(b'\n');
            reference.written += 1;
        }
        assert!(left.contains(&1) && reference.undecodable > 0 && reference.written > 100);

        for batch_size in [1, 7, 64, 1_000] {
            let filter = TimeFilter {
                since_ms: Some(since),
                until_ms: Some(until),
            };
            let mut batches = Vec::new();
            for (n, chunk) in log.chunks(batch_size).enumerate() {
                let mut raw = RawBatch::default();
                for (i, (range, ts, key, value)) in chunk.iter().enumerate() {
                    let offset = (n * batch_size + i) as i64;
                    raw.push_parts(*range, offset, *ts, key.as_deref(), value.as_deref());
                }
                batches.push((n as u64, encode_batch(&ranges, raw, filter, false)));
            }
            // Finished out of order: last first, then the rest.
            batches.rotate_right(1);
            let (done_tx, done_rx) = mpsc::channel();
            for batch in batches {
                done_tx.send(batch).unwrap();
            }
            drop(done_tx);
            let (slot_tx, _slot_rx) = mpsc::sync_channel(log.len());
            let stopped: Vec<AtomicBool> = ranges.iter().map(|_| AtomicBool::new(false)).collect();
            let mut out = Vec::new();
            let summary = write_in_order(
                &ranges,
                done_rx,
                slot_tx,
                &stopped,
                &mut JsonLines(&mut out),
                &indicatif::ProgressBar::hidden(),
            )
            .unwrap();
            assert_eq!(
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&expected),
                "batches of {batch_size}"
            );
            assert_eq!(summary, reference, "batches of {batch_size}");
            assert!(stopped[1].load(Ordering::Relaxed));
        }
    }
}
