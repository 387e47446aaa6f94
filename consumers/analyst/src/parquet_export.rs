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
//! values are slices of it, not a string each), and the row groups are
//! encoded and compressed on a thread of their own while the next one fills.

use std::fs::File;
use std::path::Path;
use std::sync::{mpsc, Arc};

use anyhow::Context as _;
use bytes::Bytes;
use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType, Int32Type, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;

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

pub struct ParquetSink {
    /// Full row groups to the thread that encodes and writes them.
    groups: Option<mpsc::SyncSender<Columns>>,
    writing: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
    rows: Columns,
}

impl ParquetSink {
    pub fn create(path: &Path) -> anyhow::Result<Self> {
        let schema = Arc::new(parse_message_type(SCHEMA).context("the Parquet schema")?);
        let properties = Arc::new(
            WriterProperties::builder()
                .set_compression(Compression::SNAPPY)
                .build(),
        );
        let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let mut writer = SerializedFileWriter::new(file, schema, properties)
            .context("starting the Parquet file")?;
        // One group queued while one is written: the memory stays at about
        // three row groups.
        let (groups, queue) = mpsc::sync_channel::<Columns>(1);
        let writing = std::thread::Builder::new()
            .name("replay-parquet".into())
            .spawn(move || -> anyhow::Result<()> {
                for rows in queue {
                    write_row_group(&mut writer, rows)?;
                }
                writer.close().context("closing the Parquet file")?;
                Ok(())
            })
            .context("starting the Parquet writer")?;
        Ok(Self {
            groups: Some(groups),
            writing: Some(writing),
            rows: Columns::default(),
        })
    }

    fn flush_row_group(&mut self) -> anyhow::Result<()> {
        if self.rows.rows == 0 {
            return Ok(());
        }
        let rows = std::mem::take(&mut self.rows);
        let sent = self
            .groups
            .as_ref()
            .is_some_and(|groups| groups.send(rows).is_ok());
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
            None => anyhow::bail!("the Parquet file is already closed"),
        }
    }
}

fn write_row_group(writer: &mut SerializedFileWriter<File>, rows: Columns) -> anyhow::Result<()> {
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
    let mut texts = [key, event_type, event_id, payload_json, error].into_iter();
    let mut next_text = || texts.next().unwrap_or_default();
    let mut group = writer.next_row_group()?;
    let mut index = 0;
    let mut topic = Some(topic);
    while let Some(mut column) = group.next_column()? {
        match index {
            0 => {
                let values = topic.take().unwrap_or_default().values();
                column
                    .typed::<ByteArrayType>()
                    .write_batch(&values, None, None)?;
            }
            1 => {
                column
                    .typed::<Int32Type>()
                    .write_batch(&partition, None, None)?;
            }
            2 => {
                column
                    .typed::<Int64Type>()
                    .write_batch(&offset, None, None)?;
            }
            3 => write_optional_i64(column.typed::<Int64Type>(), &timestamp_ms)?,
            7 => write_optional_i64(column.typed::<Int64Type>(), &occurred_at_ms)?,
            // key, event_type, event_id, payload_json, error, in this order.
            _ => write_optional_text(column.typed::<ByteArrayType>(), next_text())?,
        }
        column.close()?;
        index += 1;
    }
    group.close()?;
    Ok(())
}

fn levels<T>(values: &[Option<T>]) -> Vec<i16> {
    values.iter().map(|v| i16::from(v.is_some())).collect()
}

fn write_optional_i64(
    writer: &mut parquet::column::writer::ColumnWriterImpl<'_, Int64Type>,
    values: &[Option<i64>],
) -> parquet::errors::Result<()> {
    let present: Vec<i64> = values.iter().flatten().copied().collect();
    writer
        .write_batch(&present, Some(&levels(values)), None)
        .map(|_| ())
}

fn write_optional_text(
    writer: &mut parquet::column::writer::ColumnWriterImpl<'_, ByteArrayType>,
    values: Text,
) -> parquet::errors::Result<()> {
    let levels = values.levels();
    writer
        .write_batch(&values.values(), Some(&levels), None)
        .map(|_| ())
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
