//! Bulk inserts with `COPY ... FROM STDIN (FORMAT binary)`.
//!
//! Why: the release writes a `coupons` row and a history row per coupon, and
//! Postgres is what bounds it (#16). `COPY` skips the statement's per-row
//! executor work and the speculative insertion `ON CONFLICT` needs, and the
//! binary format skips parsing text. `COPY` cannot skip rows that already
//! exist, though: a redelivered batch makes it fail with a unique violation,
//! and nothing of it is written (a statement is atomic). So callers use
//! [`copy_in`] as a fast path and, when Postgres refuses it, run their
//! `INSERT ... ON CONFLICT DO NOTHING` statement over the same rows; that
//! statement alone decides what a redelivery or a bad value does, exactly as
//! before.
//!
//! The encoder is plain code without I/O (unit tested below); [`copy_in`] is
//! the thin adapter.
//!
//! The `COPY` statements are the only SQL not compile-checked: sqlx's
//! `query!` cannot describe a `COPY` (it is not a prepared statement), so
//! they stay plain text (`COPY_COUPONS` in `store::coupons`, `COPY_HISTORY`
//! in `store::history`, `COPY_CLAIM_DECISIONS` in `store::claims`). The
//! `INSERT` each falls back to is checked.

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// Microseconds from the Unix epoch to Postgres' epoch (2000-01-01 UTC).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// The rows of one binary `COPY`, encoded field by field in table order.
#[derive(Debug)]
pub struct BinaryRows {
    buf: Vec<u8>,
    fields: i16,
    rows: u64,
}

impl BinaryRows {
    /// An empty body for rows of `fields` columns; `bytes_hint` sizes the buffer.
    pub fn new(fields: i16, bytes_hint: usize) -> Self {
        let mut buf = Vec::with_capacity(19 + bytes_hint + 2);
        buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        buf.extend_from_slice(&0i32.to_be_bytes()); // flags: no OIDs
        buf.extend_from_slice(&0i32.to_be_bytes()); // no header extension
        Self {
            buf,
            fields,
            rows: 0,
        }
    }

    /// Starts a row; the caller then writes exactly `fields` values.
    pub fn row(&mut self) -> &mut Self {
        self.buf.extend_from_slice(&self.fields.to_be_bytes());
        self.rows += 1;
        self
    }

    fn field(&mut self, bytes: &[u8]) -> &mut Self {
        // A field longer than 2 GiB cannot be a coupon or history value;
        // saturating makes Postgres refuse the COPY, and the caller's
        // statement then reports the value.
        let len = i32::try_from(bytes.len()).unwrap_or(i32::MAX);
        self.buf.extend_from_slice(&len.to_be_bytes());
        self.buf.extend_from_slice(bytes);
        self
    }

    pub fn null(&mut self) -> &mut Self {
        self.buf.extend_from_slice(&(-1i32).to_be_bytes());
        self
    }

    /// `text` (UTF-8; Postgres refuses a NUL as it does in any statement).
    pub fn text(&mut self, value: &str) -> &mut Self {
        self.field(value.as_bytes())
    }

    pub fn text_or_null(&mut self, value: Option<&str>) -> &mut Self {
        match value {
            Some(value) => self.text(value),
            None => self.null(),
        }
    }

    pub fn int4(&mut self, value: i32) -> &mut Self {
        self.field(&value.to_be_bytes())
    }

    pub fn int8(&mut self, value: i64) -> &mut Self {
        self.field(&value.to_be_bytes())
    }

    pub fn uuid(&mut self, value: &Uuid) -> &mut Self {
        self.field(value.as_bytes())
    }

    /// `timestamptz`: microseconds since 2000-01-01 UTC.
    pub fn timestamptz(&mut self, value: &DateTime<Utc>) -> &mut Self {
        let us = value.timestamp_micros().saturating_sub(PG_EPOCH_OFFSET_US);
        self.field(&us.to_be_bytes())
    }

    pub fn timestamptz_or_null(&mut self, value: Option<&DateTime<Utc>>) -> &mut Self {
        match value {
            Some(value) => self.timestamptz(value),
            None => self.null(),
        }
    }

    /// `boolean`: one byte.
    pub fn boolean(&mut self, value: bool) -> &mut Self {
        self.field(&[u8::from(value)])
    }

    /// `jsonb`: format version 1, then the JSON text.
    pub fn jsonb(&mut self, value: &serde_json::Value) -> &mut Self {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0, 0, 0, 0, 1]);
        // Writing JSON into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut self.buf, value);
        let len = (self.buf.len() - start - 4) as i32;
        self.buf[start..start + 4].copy_from_slice(&len.to_be_bytes());
        self
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// The complete body, trailer included.
    pub fn finish(mut self) -> Vec<u8> {
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
        self.buf
    }
}

/// Runs `statement` (a `COPY ... FROM STDIN (FORMAT binary)`) with `rows` on
/// one connection of `pool`; returns the rows written. An error from
/// Postgres (`sqlx::Error::Database`) means nothing was written: see the
/// module docs for what callers do then.
pub async fn copy_in(
    pool: &sqlx::PgPool,
    statement: &str,
    rows: BinaryRows,
) -> Result<u64, sqlx::Error> {
    use sqlx::postgres::PgPoolCopyExt;
    let mut copy = pool.copy_in_raw(statement).await?;
    copy.send(rows.finish()).await?;
    copy.finish().await
}

/// Whether `error` is Postgres refusing the data (a row already there, a bad
/// value), as opposed to not reaching Postgres at all.
pub fn refused(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(_))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_body_is_header_and_trailer() {
        let body = BinaryRows::new(2, 0).finish();
        assert_eq!(&body[..11], b"PGCOPY\n\xff\r\n\0");
        assert_eq!(&body[11..19], &[0; 8]);
        assert_eq!(&body[19..], &[0xff, 0xff]);
    }

    #[test]
    fn fields_are_length_prefixed_in_network_order() {
        let mut rows = BinaryRows::new(4, 0);
        rows.row()
            .text("ab")
            .int8(258)
            .null()
            .timestamptz(&DateTime::from_timestamp(946_684_800, 1_000).unwrap());
        assert_eq!(rows.rows(), 1);
        let body = rows.finish();
        let row = &body[19..body.len() - 2];
        let expected: Vec<u8> = [
            &4i16.to_be_bytes()[..],
            &2i32.to_be_bytes(),
            b"ab",
            &8i32.to_be_bytes(),
            &258i64.to_be_bytes(),
            &(-1i32).to_be_bytes(),
            &8i32.to_be_bytes(),
            &1i64.to_be_bytes(), // 1 µs after Postgres' epoch
        ]
        .concat();
        assert_eq!(row, expected.as_slice());
    }

    #[test]
    fn jsonb_carries_its_version_byte_inside_the_length() {
        let mut rows = BinaryRows::new(1, 0);
        rows.row().jsonb(&serde_json::json!({"a": 1}));
        let body = rows.finish();
        let field = &body[21..body.len() - 2];
        let len = i32::from_be_bytes(field[..4].try_into().unwrap()) as usize;
        assert_eq!(len, field.len() - 4);
        assert_eq!(field[4], 1);
        assert_eq!(&field[5..], br#"{"a":1}"#);
    }

    #[test]
    fn uuid_and_int4_are_raw_bytes() {
        let id = Uuid::from_u128(0x0102);
        let mut rows = BinaryRows::new(2, 0);
        rows.row().uuid(&id).int4(-2);
        let body = rows.finish();
        let row = &body[21..body.len() - 2];
        assert_eq!(&row[..4], &16i32.to_be_bytes());
        assert_eq!(&row[4..20], id.as_bytes());
        assert_eq!(&row[20..24], &4i32.to_be_bytes());
        assert_eq!(&row[24..], &(-2i32).to_be_bytes());
    }
}
