//! The test harness both suites share: `tests/it` (one binary, tests in
//! parallel) and `tests/chaos` (fault injection that restarts services).
//!
//! `harness` isolates a test (its own database, topic prefix and Redis key
//! prefix, an in-process system on port 0) and starts `couponctl` as child
//! processes; `processes` holds the storefront-like clients and the waits
//! with a deadline that the process-level tests use.

pub mod cassandra;
pub mod harness;
pub mod processes;
