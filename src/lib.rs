//! `couponctl`'s library half: it wires the crates of the workspace into
//! processes and tools.
//!
//! # Layout
//!
//! The workspace, from the rules outwards (see DEVELOPING.md):
//!
//! | crate / folder          | what it holds                                                  |
//! |-------------------------|----------------------------------------------------------------|
//! | `domain/`               | the coupon rules, no I/O (claims, purchases, quota, ids, codes) |
//! | `schemas/`              | the protobuf events, the topic catalogue and the roles          |
//! | `platform/`             | thin adapters: Kafka, Postgres, Redis, metrics; the consumer loop |
//! | `producers/`            | what publishes events: the HTTP gateway, the release tool        |
//! | `consumers/`            | the consumer roles (coupons, claims, purchases, expiry, history) |
//! | `consumers/analyst/`    | the analysts' tools: replay, rebuild, audit, history queries    |
//! | `src/` (this crate)     | the `couponctl` binary and what it wires                        |
//!
//! In this crate:
//! - [`app`] assembles the roles of one process (gateway and/or consumers)
//!   from a plain [`app::AppConfig`], so the binary only parses flags and
//!   tests can start a whole system in-process with a shutdown token;
//! - [`gauges`] and [`status`] are the operators' view (metrics refreshed
//!   by a task, `couponctl status`);
//! - [`dev`] holds the benchmarks and the demo, which run the product but
//!   are not part of it;
//! - `src/main.rs` parses the shared flags and `src/cmd/` holds one file per
//!   subcommand, gathered by one `enum Command`.

pub mod app;
pub mod console_export;
pub mod dev;
pub mod gauges;
pub mod status;
