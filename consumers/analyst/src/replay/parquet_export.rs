//! Parquet output for `couponctl replay --format parquet`: the same records
//! as the JSON lines, in columns, for exports too large to scan as text.
//!
//! The envelope's fields get columns of their own (analysts filter on them);
//! the payload stays a JSON string, since each topic carries a different
//! message (the very bytes of the JSON line's payload). Rows are buffered
//! and written in row groups of 65,536.
//!
//! Why it is shaped this way: a replay hands over hundreds of thousands of
//! records a second. Each text column of a row group is one buffer (the
//! values are slices of it, not a string each). Full row groups are encoded
//! and compressed by two threads at once, each into column chunks in memory,
//! and a third appends the chunks to the file in the order the groups were
//! filled: with one encoding thread, that thread (a third of the replay's
//! CPU) was what the whole replay waited for. Offsets, event ids and payloads
//! skip the dictionary (their values hardly repeat, so it was built and
//! thrown away) and the payload skips min/max statistics; values and schema
//! are as before.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use parquet::basic::Compression;
use parquet::column::writer::{get_column_writer, get_typed_column_writer, ColumnCloseResult};
use parquet::data_type::{ByteArray, ByteArrayType, DataType, Int32Type, Int64Type};
use parquet::file::properties::{EnabledStatistics, WriterProperties, WriterPropertiesPtr};
use parquet::file::writer::{SerializedFileWriter, SerializedPageWriter, TrackedWrite};
use parquet::schema::parser::parse_message_type;
use parquet::schema::types::{ColumnDescPtr, ColumnPath, SchemaDescPtr, SchemaDescriptor};

use crate::replay::{Line, Sink};

const SCHEMA: &str = "
message coupon_event {
    REQUIRED BYTE_ARRAY topic (UTF8);
    REQUIRED INT32 partition;
    REQUIRED INT64 offset;
    OPTIONAL INT64 timestamp_ms;
    OPTIONAL BYTE_ARRAY key (UTF8);
    OPTIONAL BYTE_ARRAY event_type (UTF8);
    OPTIONAL BYTE_ARRAY event_id (UTF8);
    OPTIONAL INT64 occurred_at_ms;
    OPTIONAL BYTE_ARRAY payload_json (UTF8);
    OPTIONAL BYTE_ARRAY error (UTF8);
}";

const ROW_GROUP: usize = 65_536;

/// One optional text column of a row group: the values back to back.
#[derive(Default)]
struct Text {
    bytes: Vec<u8>,
    spans: Vec<Option<(usize, usize)>>,
}

impl Text {
    fn push(&mut self, value: Option<&[u8]>) {
        self.spans.push(value.map(|v| {
            let start = self.bytes.len();
            self.bytes.extend_from_slice(v);
            (start, self.bytes.len())
        }));
    }

    fn levels(&self) -> Vec<i16> {
        self.spans.iter().map(|v| i16::from(v.is_some())).collect()
    }

    /// The present values, as slices of one shared buffer.
    fn values(self) -> Vec<ByteArray> {
        let bytes = Bytes::from(self.bytes);
        self.spans
            .into_iter()
            .flatten()
            .map(|(start, end)| ByteArray::from(bytes.slice(start..end)))
            .collect()
    }
}

#[derive(Default)]
struct Columns {
    rows: usize,
    topic: Text,
    partition: Vec<i32>,
    offset: Vec<i64>,
    timestamp_ms: Vec<Option<i64>>,
    key: Text,
    event_type: Text,
    event_id: Text,
    occurred_at_ms: Vec<Option<i64>>,
    payload_json: Text,
    error: Text,
}

impl Text {
    fn with_capacity_of(&self) -> Self {
        Self {
            bytes: Vec::with_capacity(self.bytes.len()),
            spans: Vec::with_capacity(self.spans.len()),
        }
    }
}

impl Columns {
    fn with_capacity_of(&self) -> Self {
        let rows = self.rows;
        Self {
            rows: 0,
            topic: self.topic.with_capacity_of(),
            partition: Vec::with_capacity(rows),
            offset: Vec::with_capacity(rows),
            timestamp_ms: Vec::with_capacity(rows),
            key: self.key.with_capacity_of(),
            event_type: self.event_type.with_capacity_of(),
            event_id: self.event_id.with_capacity_of(),
            occurred_at_ms: Vec::with_capacity(rows),
            payload_json: self.payload_json.with_capacity_of(),
            error: self.error.with_capacity_of(),
        }
    }
}

pub struct ParquetSink {
    /// Full row groups, numbered in order, to the encoding threads.
    groups: Option<mpsc::SyncSender<(u64, Columns)>>,
    /// The thread that puts the encoded row groups into the file in order.
    writing: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
    rows: Columns,
    next_group: u64,
}

/// Threads encoding row groups at once. Two, so the encoding (the
/// dictionaries, the pages, snappy: most of a Parquet replay's CPU) is not
/// the one thread that every record waits for on a two-core machine.
const ENCODERS: usize = 2;

/// One column of a row group, encoded and compressed in memory.
struct Chunk {
    bytes: Bytes,
    close: ColumnCloseResult,
}

impl ParquetSink {
    pub fn create(path: &Path) -> anyhow::Result<Self> {
        let schema = Arc::new(parse_message_type(SCHEMA).context("the Parquet schema")?);
        let descriptor: SchemaDescPtr = Arc::new(SchemaDescriptor::new(schema.clone()));
        let properties = Arc::new(properties());
        let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let mut writer = SerializedFileWriter::new(file, schema, properties.clone())
            .context("starting the Parquet file")?;
        // One group queued while each encoder has one: the memory stays at
        // a few row groups.
        let (groups, queue) = mpsc::sync_channel::<(u64, Columns)>(1);
        let queue = Arc::new(Mutex::new(queue));
        let (done_tx, done) = mpsc::channel::<(u64, parquet::errors::Result<Vec<Chunk>>)>();
        let mut encoders = Vec::with_capacity(ENCODERS);
        for n in 0..ENCODERS {
            let (queue, done_tx) = (queue.clone(), done_tx.clone());
            let (descriptor, properties) = (descriptor.clone(), properties.clone());
            let encoder = std::thread::Builder::new()
                .name(format!("replay-parquet-{n}"))
                .spawn(move || loop {
                    // The queue is dropped with the last encoder, so the sink
                    // sees a writer that stopped.
                    let job = match queue.lock() {
                        Ok(queue) => queue.recv(),
                        Err(_) => return,
                    };
                    let Ok((seq, rows)) = job else { return };
                    let chunks = encode_row_group(&descriptor, &properties, rows);
                    if done_tx.send((seq, chunks)).is_err() {
                        return;
                    }
                })
                .context("starting a Parquet encoder")?;
            encoders.push(encoder);
        }
        drop((queue, done_tx));
        let writing = std::thread::Builder::new()
            .name("replay-parquet".into())
            .spawn(move || -> anyhow::Result<()> {
                // Row groups come back in any order; the file gets them in
                // the order they were filled.
                let mut pending = BTreeMap::new();
                let mut next = 0u64;
                for (seq, chunks) in done {
                    pending.insert(seq, chunks.context("encoding a Parquet row group")?);
                    while let Some(chunks) = pending.remove(&next) {
                        append_row_group(&mut writer, chunks)?;
                        next += 1;
                    }
                }
                for encoder in encoders {
                    encoder
                        .join()
                        .map_err(|_| anyhow::anyhow!("a Parquet encoder panicked"))?;
                }
                if !pending.is_empty() {
                    bail!("a Parquet row group was lost");
                }
                writer.close().context("closing the Parquet file")?;
                Ok(())
            })
            .context("starting the Parquet writer")?;
        Ok(Self {
            groups: Some(groups),
            writing: Some(writing),
            rows: Columns::default(),
            next_group: 0,
        })
    }

    fn flush_row_group(&mut self) -> anyhow::Result<()> {
        if self.rows.rows == 0 {
            return Ok(());
        }
        // The next group is about as large as this one: reserving it now
        // saves growing every buffer from empty (copies and page faults).
        let next = self.rows.with_capacity_of();
        let rows = std::mem::replace(&mut self.rows, next);
        let seq = self.next_group;
        self.next_group += 1;
        let sent = self
            .groups
            .as_ref()
            .is_some_and(|groups| groups.send((seq, rows)).is_ok());
        if !sent {
            // The writer stopped: its error says why.
            return self.join();
        }
        Ok(())
    }

    /// Waits for the writer to finish what it was given.
    fn join(&mut self) -> anyhow::Result<()> {
        self.groups = None;
        match self.writing.take() {
            Some(writing) => writing
                .join()
                .map_err(|_| anyhow::anyhow!("the Parquet writer panicked"))?,
            None => bail!("the Parquet file is already closed"),
        }
    }
}

/// Snappy, as always. No dictionary for the columns whose values hardly
/// repeat (offsets, event ids, payloads): building one costs a hash of every
/// value and is thrown away when it grows past its page. No min/max
/// statistics for the payload: a JSON string's order tells a reader nothing.
/// Neither changes a value or the schema.
fn properties() -> WriterProperties {
    let column = |name: &str| ColumnPath::from(name);
    WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_column_dictionary_enabled(column("offset"), false)
        .set_column_dictionary_enabled(column("event_id"), false)
        .set_column_dictionary_enabled(column("payload_json"), false)
        .set_column_statistics_enabled(column("payload_json"), EnabledStatistics::None)
        .build()
}

fn append_row_group(
    writer: &mut SerializedFileWriter<File>,
    chunks: Vec<Chunk>,
) -> anyhow::Result<()> {
    let mut group = writer.next_row_group()?;
    for chunk in chunks {
        group.append_column(&chunk.bytes, chunk.close)?;
    }
    group.close()?;
    Ok(())
}

/// Encodes and compresses one row group, a column at a time, into memory.
fn encode_row_group(
    schema: &SchemaDescPtr,
    properties: &WriterPropertiesPtr,
    rows: Columns,
) -> parquet::errors::Result<Vec<Chunk>> {
    let Columns {
        rows: _,
        topic,
        partition,
        offset,
        timestamp_ms,
        key,
        event_type,
        event_id,
        occurred_at_ms,
        payload_json,
        error,
    } = rows;
    let column = |index: usize| schema.column(index);
    let text = |index: usize, values: Text| {
        let levels = values.levels();
        chunk::<ByteArrayType>(column(index), properties, &values.values(), Some(&levels))
    };
    let optional_i64 = |index: usize, values: &[Option<i64>]| {
        let present: Vec<i64> = values.iter().flatten().copied().collect();
        chunk::<Int64Type>(column(index), properties, &present, Some(&levels(values)))
    };
    Ok(vec![
        chunk::<ByteArrayType>(column(0), properties, &topic.values(), None)?,
        chunk::<Int32Type>(column(1), properties, &partition, None)?,
        chunk::<Int64Type>(column(2), properties, &offset, None)?,
        optional_i64(3, &timestamp_ms)?,
        text(4, key)?,
        text(5, event_type)?,
        text(6, event_id)?,
        optional_i64(7, &occurred_at_ms)?,
        text(8, payload_json)?,
        text(9, error)?,
    ])
}

/// One column chunk, written to a buffer of its own (the file writer copies
/// it in, with its offsets moved to where it lands).
fn chunk<T: DataType>(
    descriptor: ColumnDescPtr,
    properties: &WriterPropertiesPtr,
    values: &[T::T],
    levels: Option<&[i16]>,
) -> parquet::errors::Result<Chunk> {
    let mut buffer = TrackedWrite::new(Vec::new());
    let close = {
        let pages = SerializedPageWriter::new(&mut buffer);
        let mut writer = get_typed_column_writer::<T>(get_column_writer(
            descriptor,
            properties.clone(),
            Box::new(pages),
        ));
        writer.write_batch(values, levels, None)?;
        writer.close()?
    };
    Ok(Chunk {
        bytes: Bytes::from(buffer.into_inner()?),
        close,
    })
}

fn levels<T>(values: &[Option<T>]) -> Vec<i16> {
    values.iter().map(|v| i16::from(v.is_some())).collect()
}

impl Sink for ParquetSink {
    fn write(&mut self, line: &Line<'_>) -> anyhow::Result<()> {
        let rows = &mut self.rows;
        rows.rows += 1;
        rows.topic.push(Some(line.topic.as_bytes()));
        rows.partition.push(line.partition);
        rows.offset.push(line.offset);
        rows.timestamp_ms.push(line.timestamp_ms);
        rows.key.push(line.key.map(str::as_bytes));
        let envelope = line.envelope;
        rows.event_type
            .push(envelope.map(|e| e.event_type.as_bytes()));
        rows.event_id.push(envelope.map(|e| e.event_id.as_bytes()));
        rows.occurred_at_ms.push(envelope.map(|e| e.occurred_at_ms));
        rows.payload_json.push(line.payload_json);
        rows.error.push(line.error.map(str::as_bytes));
        if rows.rows >= ROW_GROUP {
            self.flush_row_group()?;
        }
        Ok(())
    }

    fn columns(&self) -> bool {
        true
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        self.flush_row_group()?;
        self.join()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coupon_schemas::Envelope;
    use parquet::file::reader::{FileReader as _, SerializedFileReader};
    use parquet::record::RowAccessor as _;

    /// Row `i` of the test file: every optional column absent now and then.
    struct Row {
        topic: &'static str,
        key: Option<String>,
        timestamp_ms: Option<i64>,
        envelope: Option<Envelope>,
        payload: Option<String>,
        error: Option<&'static str>,
    }

    fn row(i: i64) -> Row {
        let envelope = (i % 11 != 0).then(|| Envelope {
            event_id: format!("event-{i}"),
            event_type: if i % 2 == 0 {
                "claim.requested"
            } else {
                "claim.decided"
            }
            .into(),
            occurred_at_ms: 1_700_000_000_000 + i,
            ..Envelope::default()
        });
        Row {
            topic: if i % 3 == 0 { "t.created" } else { "t.claims" },
            key: (i % 5 != 0).then(|| format!("user-{}", i % 1_000)),
            timestamp_ms: (i % 7 != 0).then_some(1_700_000_000_000 + i / 4),
            payload: envelope.as_ref().map(|_| format!("{{\"n\":{i}}}")),
            error: envelope.is_none().then_some("not a claim"),
            envelope,
        }
    }

    #[test]
    fn rows_come_back_in_order_with_every_value_across_row_groups() {
        // Three row groups, encoded by different threads.
        let count = 2 * ROW_GROUP as i64 + 1_234;
        let dir = std::env::temp_dir().join(format!("parquet-export-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("rows.parquet");
        let mut sink = ParquetSink::create(&path).unwrap();
        for i in 0..count {
            let row = row(i);
            sink.write(&Line {
                topic: row.topic,
                partition: (i % 4) as i32,
                offset: i,
                timestamp_ms: row.timestamp_ms,
                key: row.key.as_deref(),
                json: b"",
                payload_json: row.payload.as_deref().map(str::as_bytes),
                envelope: row.envelope.as_ref(),
                error: row.error,
            })
            .unwrap();
        }
        sink.finish().unwrap();

        let reader = SerializedFileReader::new(File::open(&path).unwrap()).unwrap();
        assert_eq!(reader.metadata().num_row_groups(), 3);
        let mut read = 0;
        for (i, got) in reader.get_row_iter(None).unwrap().enumerate() {
            let got = got.unwrap();
            let i = i as i64;
            let want = row(i);
            assert_eq!(got.get_string(0).unwrap(), want.topic);
            assert_eq!(got.get_int(1).unwrap(), (i % 4) as i32);
            assert_eq!(got.get_long(2).unwrap(), i);
            assert_eq!(got.get_long(3).ok(), want.timestamp_ms);
            assert_eq!(got.get_string(4).ok(), want.key.as_ref());
            let envelope = want.envelope.as_ref();
            assert_eq!(
                got.get_string(5).ok().map(String::as_str),
                envelope.map(|e| e.event_type.as_str())
            );
            assert_eq!(
                got.get_string(6).ok(),
                envelope.map(|e| &e.event_id),
                "row {i}"
            );
            assert_eq!(got.get_long(7).ok(), envelope.map(|e| e.occurred_at_ms));
            assert_eq!(got.get_string(8).ok(), want.payload.as_ref());
            assert_eq!(
                got.get_string(9).ok().map(String::as_str),
                want.error,
                "row {i}"
            );
            read += 1;
        }
        assert_eq!(read, count);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
