//! Developer tooling that runs the product but is not part of it: the
//! benchmarks (`couponctl bench`, `make bench`) and the demo (`couponctl
//! demo`, `make demo`). Each starts the whole system in-process on a scratch
//! database through [`crate::app`], as the integration tests do. [`load`]
//! fills a database with past days for the day-30 measurements.

pub mod bench;
pub mod demo;
pub mod load;
