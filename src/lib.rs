//! `couponctl`'s library half: [`app`] assembles the components of one
//! process (gateway and/or consumers) from a plain [`app::AppConfig`], so the
//! binary only parses flags and tests can start a whole system in-process
//! with a shutdown token. [`replay`] reads topics for analysts
//! (topics to JSON lines).

pub mod app;
pub mod replay;
