//! `couponctl`'s library half: it wires the crates of the workspace into
//! processes and tools.
//!
//! # Layout
//!
//! The workspace's crates, from the rules outwards, and what lives in each
//! are one table in `DEVELOPING.md` (section *Layout*): `domain`, `schemas`,
//! `platform`, `producers`, `consumers`, `consumers/analyst`, and this crate,
//! the `couponctl` binary and what it wires.
//!
//! In this crate:
//! - [`app`] assembles the roles of one process (gateway and/or consumers)
//!   from a plain [`app::AppConfig`], so the binary only parses flags and
//!   tests can start a whole system in-process with a shutdown token;
//! - [`gauges`] and [`status`] are the operators' view (metrics refreshed
//!   by a task, `couponctl status`);
//! - [`dev`] holds the benchmarks and the demo, which run the product but
//!   are not part of it;
//! - [`memory`] says how the process takes memory (the allocator);
//! - `src/main.rs` parses the shared flags and `src/cmd/` holds one file per
//!   subcommand, gathered by one `enum Command`.

pub mod app;
pub mod console_export;
pub mod dev;
pub mod gauges;
pub mod memory;
pub mod status;
pub mod upkeep;
