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
//!
//! `event` decodes a record by its topic, `reader` reads the partitions,
//! `pipeline` runs the read-decode-write stages, `jsonl` and `parquet_export`
//! are the two sinks; this file holds the options, the summary and the entry
//! points.

mod event;
pub mod jsonl;
pub mod parquet_export;
mod pipeline;
mod reader;

pub use event::*;
pub use pipeline::*;
pub use reader::*;

use std::fmt;
use std::io::{IsTerminal as _, Write};
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, Utc};

use coupon_platform::{KafkaSettings, Topics};
use coupon_schemas::Envelope;

/// How long a read may go without a single record before it is declared stuck.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Broker long-poll of the replay reader.
const FETCH_WAIT_MS: &str = "50";
/// `--until`: a partition is left once a record is this much newer than the
/// bound (records in between are filtered), so producers with slightly
/// skewed clocks sharing a partition lose nothing.
const UNTIL_GRACE_MS: i64 = 60_000;

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
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;

    use base64::Engine as _;
    use coupon_platform::kafka::{DecodeError, Record};
    use coupon_schemas::ClaimOutcome;
    use coupon_schemas::{ClaimDecided, ClaimRequested, CouponsCreated, DeadLetter};
    use prost::Message as _;
    use serde_json::Value;

    fn line_value(
        kind: TopicKind,
        record: &Record,
        decoded: &Result<TopicEvent, DecodeError>,
    ) -> Value {
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
        let event = TopicEvent::ClaimRequested(ClaimRequested {
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
