//! The replay's three stages: the caller's thread reads batches, workers
//! decode, filter and encode them, and the caller hands them to the sink in
//! the order they were read.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context as _};
use rdkafka::message::{BorrowedMessage, Message as _};

use coupon_platform::{KafkaSettings, Topics};
use coupon_schemas::Envelope;

use crate::jsonl::{self, PayloadSpan, RawRecord};

use super::{
    decode_event_value, time_ms, Flow, Line, PartitionRange, Reader, ReplayOptions, ReplaySummary,
    Sink, TopicEvent, TopicKind, UNTIL_GRACE_MS,
};

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
pub(super) struct TimeFilter {
    pub(super) since_ms: Option<i64>,
    pub(super) until_ms: Option<i64>,
}

/// What becomes of one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    Write,
    /// Outside the time range.
    Skip,
    /// Past `--until` by more than the grace: neither this record nor the
    /// rest of its partition is written.
    Stop,
}

impl TimeFilter {
    pub(super) fn verdict(&self, timestamp_ms: Option<i64>, event: Option<&TopicEvent>) -> Verdict {
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
pub(super) struct RawBatch {
    bytes: Vec<u8>,
    records: Vec<RawMeta>,
}

#[derive(Debug)]
pub(super) struct RawMeta {
    /// Index of the record's range.
    range: usize,
    offset: i64,
    timestamp_ms: Option<i64>,
    key: Option<std::ops::Range<usize>>,
    value: Option<std::ops::Range<usize>>,
}

impl RawBatch {
    pub(super) fn push(&mut self, range: usize, message: &BorrowedMessage<'_>) {
        self.push_parts(
            range,
            message.offset(),
            message.timestamp().to_millis(),
            message.key(),
            message.payload(),
        );
    }

    pub(super) fn push_parts(
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

    pub(super) fn record<'a>(
        &'a self,
        ranges: &'a [PartitionRange],
        meta: &RawMeta,
    ) -> RawRecord<'a> {
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
pub(super) struct EncodedBatch {
    raw: RawBatch,
    out: Vec<u8>,
    records: Vec<Encoded>,
}

pub(super) struct Encoded {
    verdict: Verdict,
    undecodable: bool,
    /// Where this record's line ends in `out` (it starts where the
    /// previous one ended).
    end: usize,
    payload: PayloadSpan,
    /// For a sink that asks for [`Sink::columns`].
    columns: Option<Box<Columns>>,
}

pub(super) struct Columns {
    envelope: Option<Envelope>,
    error: Option<String>,
}

pub(super) fn encode_batch(
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
pub(super) fn pipeline(
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
            .spawn_scoped(scope, move || {
                read_batches(reader, ranges, stopped, &slot_rx, &work_tx)
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

/// The reader: records into batches of [`BATCH`] records or [`BATCH_BYTES`],
/// each sent to the encoders once the writer has a free slot for it;
/// partitions the writer left are left here too.
fn read_batches(
    reader: &Reader,
    ranges: &[PartitionRange],
    stopped: &[AtomicBool],
    slot_rx: &mpsc::Receiver<()>,
    work_tx: &mpsc::SyncSender<(u64, RawBatch)>,
) -> anyhow::Result<()> {
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
}

/// The writer: batches back in the order they were read, each record
/// handed to the sink (or dropped, if its partition was left).
pub(super) fn write_in_order(
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
