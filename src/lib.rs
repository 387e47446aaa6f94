//! `couponctl`'s library half: [`app`] assembles the components of one
//! process (gateway and/or consumers) from a plain [`app::AppConfig`], so the
//! binary only parses flags and tests can start a whole system in-process
//! with a shutdown token. The analysts' tools live beside it: [`replay`]
//! (topics to JSON lines) and [`rebuild`] (the log into a fresh database).

pub mod app;
pub mod rebuild;
pub mod replay;
