//! Fault injection, the quick suite that runs beside other tests: `kill -9`
//! of our own processes in the middle of a burst, poison records on every
//! input topic, hostile HTTP input, and the loss of a Redis of the test's
//! own. Nothing here restarts a shared service (that is `tests/chaos/main.rs`,
//! which runs alone), so these are ordinary tests: each makes its own
//! database, topic prefix, Redis key prefix and port, and they run in
//! parallel and in any order. Every wait is a condition with a deadline,
//! never a fixed sleep.
//!
//! One file per fault family: `kill`, `poison`, `hostile_http`, `redis_loss`.

mod hostile_http;
mod kill;
mod poison;
mod redis_loss;
