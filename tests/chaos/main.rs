//! Fault injection under load: `make chaos` runs the long version, and
//! `make test` the quick one (this binary, through `cargo test`).
//!
//! Each scenario starts the real `couponctl` as separate processes (a
//! gateway and the consumers), fires a burst of claims through HTTP with
//! clients that retry as a storefront does (same request id, so retries are
//! safe), and breaks something a third of the way in: `kill -9` of the
//! consumers or of the gateway, a broker crash, a Postgres or Redis restart;
//! and on a 3-node Kafka cluster (replication factor 3, min.insync.replicas
//! 2, started here with `infra/local/cluster.sh`), `kill -9` of the claims
//! partitions' leader or of a follower, and a broker's controlled restart;
//! and on Postgres under Patroni (`infra/local/ha.sh`, started here), the
//! leader's failover (`ha.rs`: kill -9 of its postmaster in the quick run; a
//! frozen leader, a switchover and a lost leader rejoining in the long one);
//! and with the history in Cassandra, `kill -9` of Cassandra (`cassandra.rs`,
//! scored on the history too: no row lost or duplicated).
//! Then it checks, from the event log and the database, that every request
//! got exactly one decision, that every HTTP answer is the decision the
//! database holds, and that the spec's invariants hold. A last scenario holds
//! a fixed rate of mixed traffic and samples memory and consumer lag.
//!
//! Why a binary of its own with its own `main`: the scenarios restart the
//! shared broker, Postgres and Redis, so they must not overlap other tests.
//! Cargo runs test binaries one after another, and this one runs its
//! scenarios one at a time. And it prints one table, which is the point of
//! `make chaos`: scenario, requests, decisions, lost, duplicated, invariant
//! violations, recovery time. Any non-zero count fails the run.

use coupon_test_support::{harness, processes};

mod burst;
mod cassandra;
mod ha;
mod profile;
mod score;
mod sustained;
mod system;

use std::process::ExitCode;
use std::time::Duration;

use burst::Fault;
use profile::Profile;
use score::Row;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo test <filter>` hands the filter to every test binary; run only
    // when it would select this one.
    if args.iter().any(|a| a == "--list") {
        return ExitCode::SUCCESS;
    }
    if let Some(filter) = args.iter().find(|a| !a.starts_with('-')) {
        if !"chaos".contains(filter.as_str()) {
            return ExitCode::SUCCESS;
        }
    }
    let long = args.iter().any(|a| a == "--long") || std::env::var_os("CHAOS_LONG").is_some();
    let profile = if long {
        Profile::long()
    } else {
        Profile::quick()
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("chaos: cannot start a runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "chaos ({}): {} users per burst, sustained load {}/s for {:?}",
        if long { "long" } else { "quick" },
        profile.users,
        profile.rate,
        profile.sustained
    );
    // CHAOS_ONLY=<words>: only the scenarios whose name contains them (to
    // rerun one while working on it).
    let only = std::env::var("CHAOS_ONLY").unwrap_or_default();
    let chosen = |name: &str| name.contains(only.as_str());
    let mut rows = Vec::new();
    for fault in Fault::ALL.into_iter().filter(|f| chosen(f.name())) {
        eprintln!("chaos: {} ...", fault.name());
        let row = runtime.block_on(burst::burst_with_fault(fault, &profile));
        eprintln!("chaos: {}", row.summary());
        rows.push(row);
    }
    // The history store (HISTORY_STORE=cassandra) killed mid-burst, on a
    // Cassandra node of the scenario's own.
    if chosen(cassandra::NAME) {
        eprintln!("chaos: {} ...", cassandra::NAME);
        let row = runtime.block_on(cassandra::burst_with_cassandra_kill(&profile));
        eprintln!("chaos: {}", row.summary());
        rows.push(row);
    }
    // The quick run kills the leader, the most disruptive of the three.
    let cluster_faults: Vec<Fault> = Fault::CLUSTER[..if long { 3 } else { 1 }]
        .iter()
        .copied()
        .filter(|f| chosen(f.name()))
        .collect();
    let cluster = if cluster_faults.is_empty() {
        Ok(String::new())
    } else {
        eprintln!("chaos: starting the 3-node cluster ...");
        runtime.block_on(burst::cluster(&["up"]))
    };
    match cluster {
        Ok(started) => {
            eprintln!("chaos: {started}");
            for fault in cluster_faults {
                eprintln!("chaos: {} ...", fault.name());
                let row = runtime.block_on(burst::burst_with_fault(fault, &profile));
                eprintln!("chaos: {}", row.summary());
                rows.push(row);
            }
        }
        Err(error) => rows.push(Row {
            scenario: "3-node cluster".into(),
            error: Some(error),
            ..Default::default()
        }),
    }
    if let Err(error) = runtime.block_on(burst::cluster(&["down"])) {
        eprintln!("chaos: {error}");
    }
    // Postgres under Patroni (infra/local/ha.sh, started here): the quick
    // run kills the leader's postmaster; the long one also freezes the
    // leader, switches over and loses the leader's machine. The negative
    // control runs only with CHAOS_HA_NEGATIVE=1.
    let negative = std::env::var_os("CHAOS_HA_NEGATIVE").is_some();
    let ha_faults: Vec<ha::HaFault> = ha::HaFault::ALL[..if long { 4 } else { 1 }]
        .iter()
        .copied()
        .chain(negative.then_some(ha::HaFault::AsyncLaggingStandby))
        .filter(|f| chosen(f.name()))
        .collect();
    if !ha_faults.is_empty() {
        eprintln!("chaos: starting Postgres under Patroni (make ha-up) ...");
        match runtime.block_on(ha::ha(&["up"])) {
            Ok(started) => {
                eprintln!("chaos: {}", started.lines().last().unwrap_or_default());
                for fault in ha_faults {
                    eprintln!("chaos: {} ...", fault.name());
                    let row = runtime.block_on(ha::burst_with_fault(fault, &profile));
                    eprintln!("chaos: {}", row.summary());
                    rows.push(row);
                }
            }
            Err(error) => rows.push(Row {
                scenario: "Patroni cluster".into(),
                error: Some(error),
                ..Default::default()
            }),
        }
        // CHAOS_HA_KEEP=1 leaves it running for a look.
        if std::env::var_os("CHAOS_HA_KEEP").is_none() {
            if let Err(error) = runtime.block_on(ha::ha(&["down"])) {
                eprintln!("chaos: {error}");
            }
        }
    }
    if chosen("sustained mixed load") {
        eprintln!("chaos: sustained load ...");
        let row = runtime.block_on(sustained::sustained(&profile));
        eprintln!("chaos: {}", row.summary());
        rows.push(row);
    }
    runtime.shutdown_timeout(Duration::from_secs(5));

    println!("{}", score::render(&rows));
    if rows.iter().all(Row::clean) {
        println!("chaos: {} scenarios, 0 failed", rows.len());
        ExitCode::SUCCESS
    } else {
        let failed = rows.iter().filter(|r| !r.clean()).count();
        println!("chaos: {} scenarios, {failed} failed", rows.len());
        ExitCode::FAILURE
    }
}
