//! `couponctl`'s library half: [`app`] assembles the components of one
//! process (gateway and/or consumers) from a plain [`app::AppConfig`], so the
//! binary only parses flags and tests can start a whole system in-process
//! with a shutdown token. The analysts' tools live beside it: [`replay`]
//! (topics to JSON lines), [`rebuild`] (the log into a fresh database),
//! [`audit`] (the log against the live database) and [`history`] (the
//! history sink by user or coupon).

pub mod app;
pub mod audit;
pub mod bench;
pub mod console_export;
pub mod demo;
pub mod gauges;
pub mod history;
pub mod parquet_export;
pub mod rebuild;
pub mod replay;
pub mod status;
