//! The analysts' tools. They read the log the consumer roles read, but
//! outside any consumer group and without touching the live state:
//!
//! - [`replay`]: topics to JSON lines (or Parquet through
//!   [`parquet_export`]), from the start, an offset or a time, each line
//!   written by [`jsonl`];
//! - [`rebuild`]: the outcome topics projected into a fresh database;
//! - [`audit`]: that rebuild compared with the live database;
//! - [`history`]: the history sink's rows by user, coupon and time.
//!
//! `couponctl replay`, `audit` and `history` are thin commands over these.

pub mod audit;
pub mod history;
pub use replay::jsonl;
pub use replay::parquet_export;
pub mod rebuild;
pub mod replay;
