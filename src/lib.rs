//! `couponctl`'s library half: [`app`] assembles the components of one
//! process (gateway and/or consumers) from a plain [`app::AppConfig`], so the
//! binary only parses flags and tests can start a whole system in-process
//! with a shutdown token.

pub mod app;
pub mod bench;
pub mod demo;
pub mod status;
