//! Parquet output for `couponctl replay --format parquet`: the same records
//! as the JSON lines, in columns, for exports too large to scan as text.
//!
//! The envelope's fields get columns of their own (analysts filter on them);
//! the payload stays a JSON string, since each topic carries a different
//! message. Rows are buffered and written in row groups of 65,536.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
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

#[derive(Default)]
struct Columns {
    topic: Vec<ByteArray>,
    partition: Vec<i32>,
    offset: Vec<i64>,
    timestamp_ms: Vec<Option<i64>>,
    key: Vec<Option<String>>,
    event_type: Vec<Option<String>>,
    event_id: Vec<Option<String>>,
    occurred_at_ms: Vec<Option<i64>>,
    payload_json: Vec<Option<String>>,
    error: Vec<Option<String>>,
}

pub struct ParquetSink {
    writer: Option<SerializedFileWriter<File>>,
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
        let writer = SerializedFileWriter::new(file, schema, properties)
            .context("starting the Parquet file")?;
        Ok(Self {
            writer: Some(writer),
            rows: Columns::default(),
        })
    }

    fn flush_row_group(&mut self) -> anyhow::Result<()> {
        if self.rows.topic.is_empty() {
            return Ok(());
        }
        let rows = std::mem::take(&mut self.rows);
        let writer = self
            .writer
            .as_mut()
            .context("the Parquet file is already closed")?;
        let mut group = writer.next_row_group()?;
        let mut index = 0;
        while let Some(mut column) = group.next_column()? {
            match index {
                0 => {
                    column
                        .typed::<ByteArrayType>()
                        .write_batch(&rows.topic, None, None)?;
                }
                1 => {
                    column
                        .typed::<Int32Type>()
                        .write_batch(&rows.partition, None, None)?;
                }
                2 => {
                    column
                        .typed::<Int64Type>()
                        .write_batch(&rows.offset, None, None)?;
                }
                3 => write_optional_i64(column.typed::<Int64Type>(), &rows.timestamp_ms)?,
                4 => write_optional_text(column.typed::<ByteArrayType>(), &rows.key)?,
                5 => write_optional_text(column.typed::<ByteArrayType>(), &rows.event_type)?,
                6 => write_optional_text(column.typed::<ByteArrayType>(), &rows.event_id)?,
                7 => write_optional_i64(column.typed::<Int64Type>(), &rows.occurred_at_ms)?,
                8 => write_optional_text(column.typed::<ByteArrayType>(), &rows.payload_json)?,
                _ => write_optional_text(column.typed::<ByteArrayType>(), &rows.error)?,
            }
            column.close()?;
            index += 1;
        }
        group.close()?;
        Ok(())
    }
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
    values: &[Option<String>],
) -> parquet::errors::Result<()> {
    let present: Vec<ByteArray> = values
        .iter()
        .flatten()
        .map(|s| ByteArray::from(s.as_bytes().to_vec()))
        .collect();
    writer
        .write_batch(&present, Some(&levels(values)), None)
        .map(|_| ())
}

fn text(value: &str) -> Option<String> {
    Some(value.to_owned())
}

impl Sink for ParquetSink {
    fn write(&mut self, line: &Line<'_>) -> anyhow::Result<()> {
        let rows = &mut self.rows;
        rows.topic.push(ByteArray::from(line.topic.as_bytes().to_vec()));
        rows.partition.push(line.partition);
        rows.offset.push(line.offset);
        rows.timestamp_ms.push(line.timestamp_ms);
        rows.key.push(line.key.and_then(text));
        let envelope = line.envelope;
        rows.event_type
            .push(envelope.and_then(|e| text(&e.event_type)));
        rows.event_id.push(envelope.and_then(|e| text(&e.event_id)));
        rows.occurred_at_ms.push(envelope.map(|e| e.occurred_at_ms));
        rows.payload_json.push(
            line.payload_json
                .map(|p| String::from_utf8_lossy(p).into_owned()),
        );
        rows.error.push(line.error.and_then(text));
        if rows.topic.len() >= ROW_GROUP {
            self.flush_row_group()?;
        }
        Ok(())
    }

    fn columns(&self) -> bool {
        true
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        self.flush_row_group()?;
        if let Some(writer) = self.writer.take() {
            writer.close().context("closing the Parquet file")?;
        }
        Ok(())
    }
}
