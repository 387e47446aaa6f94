//! Integration tests against the real Postgres, Redis and Kafka-compatible
//! broker (`make up`). One binary, so the suite links once.

use coupon_test_support::harness;

/// The product's allocator (`src/main.rs`, `couponctl::memory`): the
/// measurements that live here (`make bench` runs the ignored ones) and the
/// services these tests start in-process allocate as `couponctl` does; the
/// measurements also turn huge pages off first, as `couponctl` does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod acl;
mod blacklist;
mod campaign_end;
mod campaigns;
mod cassandra_history;
mod causal;
mod claims;
mod cli;
mod clocks;
mod console;
mod console_load;
mod demo;
mod edge;
mod history_bench;
mod history_partitions;
mod identity;
mod invariants;
mod observability;
mod openapi;
mod partitioner;
mod poison;
mod profiles;
mod purchases;
mod rebuild_bench;
mod release;
mod replay;
mod retention;
mod retention_bench;
mod shard;
mod sold_out;
mod tls;
