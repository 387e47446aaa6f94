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
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{Map, Value};

use coupon_platform::kafka::{decode, DecodeError, Record};
use coupon_platform::{KafkaSettings, Topics};
use coupon_schemas::{
    BlacklistChanged, ClaimDecided, ClaimOutcome, ClaimRequested, CouponsCreated, DeadLetter,
    Envelope, PurchaseDecided, PurchaseOutcome, PurchaseRequested,
};

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

    /// The envelope and the rest of the message as JSON. Enum fields are
    /// written as their protobuf names and bytes fields as base64 (as in the
    /// protobuf JSON mapping); field names stay snake_case.
    pub fn to_json(&self) -> Result<(Value, Value), serde_json::Error> {
        let mut value = match self {
            Event::Created(e) => serde_json::to_value(e)?,
            Event::ClaimRequested(e) => serde_json::to_value(e)?,
            Event::ClaimDecided(e) => serde_json::to_value(e)?,
            Event::PurchaseRequested(e) => serde_json::to_value(e)?,
            Event::PurchaseDecided(e) => serde_json::to_value(e)?,
            Event::HoldExpired(e) => serde_json::to_value(e)?,
            Event::DeadLetter(e) => serde_json::to_value(e)?,
            Event::BlacklistChanged(e) => serde_json::to_value(e)?,
        };
        let Some(fields) = value.as_object_mut() else {
            return Ok((Value::Null, value));
        };
        let envelope = fields.remove("envelope").unwrap_or(Value::Null);
        match self {
            Event::ClaimDecided(e) => {
                let name = ClaimOutcome::try_from(e.outcome)
                    .ok()
                    .map(|o| o.as_str_name());
                fields.insert("outcome".into(), enum_json(name, e.outcome));
            }
            Event::PurchaseDecided(e) => {
                let name = PurchaseOutcome::try_from(e.outcome)
                    .ok()
                    .map(|o| o.as_str_name());
                fields.insert("outcome".into(), enum_json(name, e.outcome));
            }
            Event::DeadLetter(e) => {
                fields.insert("original_key".into(), base64_json(&e.original_key));
                fields.insert("original_value".into(), base64_json(&e.original_value));
            }
            _ => {}
        }
        Ok((envelope, value))
    }
}

/// An enum value as its name; a value this schema does not know stays a number.
fn enum_json(name: Option<&'static str>, raw: i32) -> Value {
    match name {
        Some(name) => Value::String(name.to_owned()),
        None => Value::from(raw),
    }
}

fn base64_json(bytes: &[u8]) -> Value {
    Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// When a record happened: its Kafka timestamp, else its envelope's time.
pub fn record_time_ms(record: &Record, event: Option<&Event>) -> Option<i64> {
    record.timestamp_ms.filter(|t| *t >= 0).or_else(|| {
        event
            .and_then(Event::envelope)
            .map(|e| e.occurred_at_ms)
            .filter(|t| *t > 0)
    })
}

/// One JSON line for a record (without the trailing newline).
pub fn json_line(kind: TopicKind, record: &Record, decoded: &Result<Event, DecodeError>) -> Value {
    let mut line = Map::new();
    line.insert("topic".into(), Value::String(record.topic.clone()));
    line.insert("topic_kind".into(), Value::String(kind.short().to_owned()));
    line.insert("partition".into(), Value::from(record.partition));
    line.insert("offset".into(), Value::from(record.offset));
    line.insert(
        "timestamp_ms".into(),
        record
            .timestamp_ms
            .filter(|t| *t >= 0)
            .map(Value::from)
            .unwrap_or(Value::Null),
    );
    match record.key.as_deref() {
        None => {
            line.insert("key".into(), Value::Null);
        }
        Some(key) => match std::str::from_utf8(key) {
            Ok(text) => {
                line.insert("key".into(), Value::String(text.to_owned()));
            }
            Err(_) => {
                line.insert("key".into(), Value::Null);
                line.insert("key_base64".into(), base64_json(key));
            }
        },
    }
    let error = match decoded {
        Ok(event) => match event.to_json() {
            Ok((envelope, payload)) => {
                line.insert("envelope".into(), envelope);
                line.insert("payload".into(), payload);
                None
            }
            Err(error) => Some(format!("cannot write the event as JSON: {error}")),
        },
        Err(error) => Some(error.to_string()),
    };
    if let Some(error) = error {
        line.insert("error".into(), Value::String(error));
        line.insert(
            "value_base64".into(),
            record
                .value
                .as_deref()
                .map(base64_json)
                .unwrap_or(Value::Null),
        );
    }
    Value::Object(line)
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
        let mut open: HashMap<(String, i32), (TopicKind, i64)> = HashMap::new();
        let mut tpl = TopicPartitionList::new();
        for range in ranges.iter().filter(|r| !r.is_empty()) {
            if open
                .insert(
                    (range.topic.clone(), range.partition),
                    (range.kind, range.end),
                )
                .is_some()
            {
                bail!(
                    "{}[{}] is planned twice in one read",
                    range.topic,
                    range.partition
                );
            }
            tpl.add_partition_offset(&range.topic, range.partition, Offset::Offset(range.start))
                .with_context(|| format!("assigning {}[{}]", range.topic, range.partition))?;
        }
        if open.is_empty() {
            return Ok(0);
        }
        self.consumer
            .assign(&tpl)
            .context("assigning the partitions to read")?;
        let mut read = 0u64;
        let mut last_progress = Instant::now();
        while !open.is_empty() {
            match self.consumer.poll(Duration::from_millis(200)) {
                Some(Ok(message)) => {
                    last_progress = Instant::now();
                    let record = Record::from_message(&message);
                    drop(message);
                    let key = (record.topic.clone(), record.partition);
                    let Some(&(kind, end)) = open.get(&key) else {
                        continue;
                    };
                    if record.offset >= end {
                        open.remove(&key);
                        self.unassign(&key.0, key.1)?;
                        continue;
                    }
                    let last = record.offset + 1 >= end;
                    read += 1;
                    let flow = each(kind, record)?;
                    if last || flow == Flow::StopPartition {
                        open.remove(&key);
                        self.unassign(&key.0, key.1)?;
                    }
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, "error while reading; continuing");
                    self.check_stall(&open, last_progress)?;
                }
                None => {
                    // Records past the end may never come (e.g. a trailing
                    // control record): a position at the end closes the range.
                    let positions = self.consumer.position().context("reading positions")?;
                    let done: Vec<(String, i32)> = open
                        .iter()
                        .filter(|((topic, partition), (_, end))| {
                            matches!(
                                positions.find_partition(topic, *partition).map(|e| e.offset()),
                                Some(Offset::Offset(at)) if at >= *end
                            )
                        })
                        .map(|(key, _)| key.clone())
                        .collect();
                    for key in done {
                        open.remove(&key);
                        self.unassign(&key.0, key.1)?;
                    }
                    self.check_stall(&open, last_progress)?;
                }
            }
        }
        Ok(read)
    }

    fn check_stall(
        &self,
        open: &HashMap<(String, i32), (TopicKind, i64)>,
        last_progress: Instant,
    ) -> anyhow::Result<()> {
        if open.is_empty() || last_progress.elapsed() <= STALL_TIMEOUT {
            return Ok(());
        }
        let mut waiting: Vec<String> = open.keys().map(|(t, p)| format!("{t}[{p}]")).collect();
        waiting.sort();
        bail!(
            "no record for {STALL_TIMEOUT:?} while still expecting some from {}",
            waiting.join(", ")
        )
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

/// Where replayed records go: JSON lines, or Parquet (`crate::parquet_export`).
pub trait Sink {
    /// One record, as [`json_line`] shapes it.
    fn write(&mut self, line: &Value) -> anyhow::Result<()>;
    fn finish(&mut self) -> anyhow::Result<()>;
}

/// One JSON object per line.
pub struct JsonLines<'a>(pub &'a mut dyn Write);

impl Sink for JsonLines<'_> {
    fn write(&mut self, line: &Value) -> anyhow::Result<()> {
        serde_json::to_writer(&mut *self.0, line).context("writing the output")?;
        self.0.write_all(b"\n").context("writing the output")
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

/// Reads the chosen topics and hands every selected record to `sink`.
/// Blocking: call it from a blocking-safe place.
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
    let since_ms = options.since.map(|t| t.timestamp_millis());
    let until_ms = options.until.map(|t| t.timestamp_millis());
    let mut summary = ReplaySummary::default();
    summary.read = reader.read(&ranges, |kind, record| {
        bar.inc(1);
        let decoded = decode_event(kind, &record);
        if since_ms.is_some() || until_ms.is_some() {
            let Some(at) = record_time_ms(&record, decoded.as_ref().ok()) else {
                // A record with no time cannot be placed in a time range.
                return Ok(Flow::Continue);
            };
            if since_ms.is_some_and(|since| at < since) {
                return Ok(Flow::Continue);
            }
            if let Some(until) = until_ms {
                if at > until {
                    return Ok(if at > until.saturating_add(UNTIL_GRACE_MS) {
                        Flow::StopPartition
                    } else {
                        Flow::Continue
                    });
                }
            }
        }
        if decoded.is_err() {
            summary.undecodable += 1;
        }
        sink.write(&json_line(kind, &record, &decoded))?;
        summary.written += 1;
        Ok(Flow::Continue)
    })?;
    sink.finish()?;
    summary.seconds = started.elapsed().as_secs_f64();
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
    use prost::Message as _;

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
        let line = json_line(TopicKind::ClaimResults, &rec, &decoded);
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
        let line = json_line(TopicKind::Claims, &rec, &decoded);
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
                1,
                "t",
                "",
            )),
            original_value: vec![1, 2, 3],
            ..Default::default()
        };
        let (_, payload) = Event::DeadLetter(letter).to_json().unwrap();
        assert_eq!(payload["original_value"], "AQID");
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
}
