//! The history stores measured (issue #29, item 5). These are measurements,
//! not checks, so `cargo test` skips them and `make bench` runs them
//! (`-- --ignored`, release build, one at a time), each against a database
//! and a Cassandra keyspace of its own on the shared services:
//!
//! - [`history_write_rate`]: the same rows appended by the sink's own
//!   writers, in the sink's chunks, to Postgres (`append_bulk`, binary
//!   `COPY`) and to Cassandra (`CassandraHistory::append`, three tables),
//!   one store after the other on the same machine: rows per second and
//!   the CPU each store's processes and the writer used.
//! - [`history_read_latency`]: a history of `HISTORY_BENCH_READ_ROWS` rows
//!   (10,000,000 by default) loaded into both stores by [`SeedHistory`], the
//!   generator this bench owns, then read by user and by coupon as
//!   `couponctl history` reads them: the latency of each read, one at a
//!   time. A read is only timed if both stores answer the same rows.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::json;

use coupon_domain::HistoryKind;
use coupon_platform::cassandra::{CassandraHistory, CassandraSettings};
use coupon_platform::store::history::{self, HistoryRow};
use coupon_test_support::cassandra;

use crate::harness::TestEnv;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The test's keyspace on the shared node, with the bench's timeout and,
/// if set, `CASSANDRA_CONCURRENCY`.
async fn bench_store(env: &TestEnv) -> (CassandraSettings, CassandraHistory) {
    let mut settings = cassandra::settings_for(env, &cassandra::nodes());
    settings.request_timeout = Duration::from_secs(10);
    if let Some(concurrency) = std::env::var("CASSANDRA_CONCURRENCY")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        settings.concurrency = concurrency;
    }
    let store = cassandra::connect(&settings, Duration::from_secs(30)).await;
    (settings, store)
}

/// The processes of each store, for their CPU time: Postgres by name, the
/// Cassandra node by its state directory (`HISTORY_BENCH_NODE_DIR`, default
/// the shared node's `.state/cassandra`).
fn store_pids() -> (Vec<u32>, Vec<u32>) {
    let node_dir = std::env::var("HISTORY_BENCH_NODE_DIR")
        .unwrap_or_else(|_| format!("{}/.state/cassandra", env!("CARGO_MANIFEST_DIR")));
    let cassandra_pids = pids_of(&format!("-Dcassandra.storagedir={node_dir}"));
    assert!(
        !cassandra_pids.is_empty(),
        "no Cassandra process with state in {node_dir}"
    );
    (pids_of("postgres"), cassandra_pids)
}

/// Starts a measurement of `pids` (a store) and this process (the writer);
/// the returned closure prints rows/s and the CPU share of each.
fn measure(label: &'static str, pids: Vec<u32>) -> impl Fn(usize) {
    let me = [std::process::id()];
    let (cpu_store, cpu_me, at) = (cpu_seconds(&pids), cpu_seconds(&me), Instant::now());
    move |rows: usize| {
        let wall = at.elapsed().as_secs_f64();
        let store = cpu_seconds(&pids) - cpu_store;
        let writer = cpu_seconds(&me) - cpu_me;
        eprintln!(
            "{label}: {rows} rows in {wall:.2} s = {:.0} rows/s; CPU: store {store:.1} s ({:.0}% of 2 cores), writer {writer:.1} s ({:.0}%)",
            rows as f64 / wall,
            100.0 * store / wall / 2.0,
            100.0 * writer / wall / 2.0
        );
    }
}

/// The sink's shape: a release's `HISTORY_BENCH_ROWS` (100,000) `created`
/// rows in events of 1,000, then as many claim decisions of distinct users.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn history_write_rate() {
    couponctl::memory::without_huge_pages();
    let env = TestEnv::new().await;
    let (_, store) = bench_store(&env).await;
    let n = env_usize("HISTORY_BENCH_ROWS", 100_000);
    let start = Utc::now();
    let mut rows = Vec::with_capacity(2 * n);
    for event in 0..n / 1_000 {
        let event_id = uuid::Uuid::new_v4();
        for item in 0..1_000 {
            rows.push(HistoryRow {
                occurred_at: start + chrono::Duration::milliseconds(event as i64),
                event_id,
                item,
                coupon_code: Some(format!("C{:012}", event * 1_000 + item as usize)),
                user_id: None,
                kind: HistoryKind::Created,
                detail: json!({"batch_id": event_id, "employee_id": "e-bench", "category": "Bench"}),
            });
        }
    }
    for i in 0..n {
        rows.push(HistoryRow {
            occurred_at: start + chrono::Duration::milliseconds(1_000 + i as i64 / 10),
            event_id: uuid::Uuid::new_v4(),
            item: 0,
            coupon_code: Some(format!("C{i:012}")),
            user_id: Some(format!("user-{i}")),
            kind: HistoryKind::Granted,
            detail: json!({"request_id": format!("req-{i}"), "category": "Bench", "expires_at_ms": 0}),
        });
    }
    let (postgres, cassandra_pids) = store_pids();
    let done = measure("write postgres (COPY into coupon_history)", postgres);
    for chunk in rows.chunks(20_000) {
        history::append_bulk(&env.pool, chunk)
            .await
            .expect("postgres");
    }
    done(rows.len());
    let done = measure(
        "write cassandra (3 tables, unlogged single-partition batches)",
        cassandra_pids,
    );
    for chunk in rows.chunks(20_000) {
        store.append(chunk).await.expect("cassandra");
    }
    done(rows.len());
    store.drop_keyspace().await.expect("drop the keyspace");
}

/// A history of the seed's shape over 30 days, generated in chunks: every
/// user claims `CLAIMS_PER_USER` times (days apart), each claim is a
/// `granted` row and then a `released` row (the hold ran out) or, for a
/// coupon's last claim, a `redeemed` row; every coupon also has its
/// `created` row. So a user's partition holds 10 rows and a coupon's about
/// `2 * claims / coupons + 1` (the claims fill the coupons in order: the
/// last few are never claimed), as a month of the seed's volume would.
///
/// A chunk is the rows of consecutive users (and so, the claims being
/// numbered by user, of consecutive coupons): each store receives it as the
/// sink would receive a large batch.
struct SeedHistory {
    start: DateTime<Utc>,
    users: usize,
    coupons: usize,
    claims_per_coupon: usize,
}

impl SeedHistory {
    const CLAIMS_PER_USER: usize = 5;
    const USERS_PER_CHUNK: usize = 10_000;

    /// About `rows` rows (claim rows, two per claim, plus the coupons'),
    /// over at most `coupons` coupons.
    fn new(rows: usize, coupons: usize) -> Self {
        let users = (rows / (2 * Self::CLAIMS_PER_USER)).max(1);
        let claims = users * Self::CLAIMS_PER_USER;
        let coupons = coupons.clamp(1, claims);
        SeedHistory {
            // Cassandra keeps milliseconds: so that both stores answer
            // the same times.
            start: DateTime::from_timestamp_millis(Utc::now().timestamp_millis())
                .unwrap_or_else(Utc::now),
            users,
            coupons,
            claims_per_coupon: claims.div_ceil(coupons),
        }
    }

    fn user(u: usize) -> String {
        format!("user-{u}")
    }

    fn coupon(c: usize) -> String {
        format!("C{c:012}")
    }

    fn chunks(&self) -> usize {
        self.users.div_ceil(Self::USERS_PER_CHUNK)
    }

    /// The rows of chunk `index`; the first also carries every coupon's
    /// `created` row.
    fn chunk(&self, index: usize) -> Vec<HistoryRow> {
        let mut rows = Vec::new();
        if index == 0 {
            for c in 0..self.coupons {
                rows.push(HistoryRow {
                    occurred_at: self.start,
                    event_id: uuid::Uuid::from_u128(1 << 64 | (c / 1_000) as u128),
                    item: (c % 1_000) as i32,
                    coupon_code: Some(Self::coupon(c)),
                    user_id: None,
                    kind: HistoryKind::Created,
                    detail: json!({"employee_id": "e-bench", "category": "Bench"}),
                });
            }
        }
        let users =
            index * Self::USERS_PER_CHUNK..((index + 1) * Self::USERS_PER_CHUNK).min(self.users);
        for u in users {
            for k in 0..Self::CLAIMS_PER_USER {
                let claim = u * Self::CLAIMS_PER_USER + k;
                let coupon = claim / self.claims_per_coupon;
                let last = (claim + 1) % self.claims_per_coupon == 0
                    || claim + 1 == self.users * Self::CLAIMS_PER_USER;
                let day = (k * 6 + u % 6) as i64;
                let at = self.start
                    + chrono::Duration::days(day)
                    + chrono::Duration::seconds(60 + ((u * 7_919) % 86_000) as i64);
                let (user, code) = (Some(Self::user(u)), Some(Self::coupon(coupon)));
                rows.push(HistoryRow {
                    occurred_at: at,
                    event_id: uuid::Uuid::from_u128(2 << 64 | claim as u128),
                    item: 0,
                    coupon_code: code.clone(),
                    user_id: user.clone(),
                    kind: HistoryKind::Granted,
                    detail: json!({"request_id": format!("req-{claim}"), "category": "Bench"}),
                });
                let (kind, after) = if last {
                    (HistoryKind::Redeemed, 60)
                } else {
                    (HistoryKind::Released, 300)
                };
                rows.push(HistoryRow {
                    occurred_at: at + chrono::Duration::seconds(after),
                    event_id: uuid::Uuid::from_u128(3 << 64 | claim as u128),
                    item: 0,
                    coupon_code: code,
                    user_id: user,
                    kind,
                    detail: json!({}),
                });
            }
        }
        rows
    }
}

/// Loads the generated history into both stores, then reads `samples`
/// users and as many coupons, evenly spread, one read at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn history_read_latency() {
    couponctl::memory::without_huge_pages();
    let env = TestEnv::new().await;
    let (_, store) = bench_store(&env).await;
    let seed = SeedHistory::new(
        env_usize("HISTORY_BENCH_READ_ROWS", 10_000_000),
        env_usize("HISTORY_BENCH_COUPONS", 300_000),
    );
    let samples = env_usize("HISTORY_BENCH_READS", 1_000);
    let (postgres, cassandra_pids) = store_pids();

    let mut loaded = 0;
    let done = measure("load postgres (COPY, the generator's chunks)", postgres);
    for index in 0..seed.chunks() {
        let rows = seed.chunk(index);
        loaded += rows.len();
        for part in rows.chunks(20_000) {
            history::append_bulk(&env.pool, part)
                .await
                .expect("postgres");
        }
        progress("postgres", index, seed.chunks(), loaded);
    }
    sqlx::query("ANALYZE coupon_history")
        .execute(&env.pool)
        .await
        .expect("analyze");
    done(loaded);

    let mut loaded = 0;
    let done = measure(
        "load cassandra (3 tables, the generator's chunks)",
        cassandra_pids,
    );
    for index in 0..seed.chunks() {
        let rows = seed.chunk(index);
        loaded += rows.len();
        store.append(&rows).await.expect("cassandra");
        progress("cassandra", index, seed.chunks(), loaded);
    }
    done(loaded);
    eprintln!(
        "history of {loaded} rows: {} users of 10 rows, {} coupons of about {} rows",
        seed.users,
        seed.coupons,
        2 * seed.claims_per_coupon + 1
    );

    let mut latencies: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    let mut timed =
        |what: &'static str, at: Instant| latencies.entry(what).or_default().push(at.elapsed());
    for s in 0..samples {
        let user = SeedHistory::user(s * seed.users / samples);
        let at = Instant::now();
        let in_postgres = history::entries(&env.pool, Some(&user), None, None, None)
            .await
            .expect("postgres by user");
        timed("postgres by user", at);
        let at = Instant::now();
        let in_cassandra = store
            .entries(Some(&user), None, None, None)
            .await
            .expect("cassandra by user");
        timed("cassandra by user", at);
        assert_eq!(
            in_postgres.len(),
            2 * SeedHistory::CLAIMS_PER_USER,
            "{user}"
        );
        assert_eq!(in_postgres, in_cassandra, "{user}");

        let code = SeedHistory::coupon(s * seed.coupons / samples);
        let at = Instant::now();
        let in_postgres = history::entries(&env.pool, None, Some(&code), None, None)
            .await
            .expect("postgres by coupon");
        timed("postgres by coupon", at);
        let at = Instant::now();
        let in_cassandra = store
            .entries(None, Some(&code), None, None)
            .await
            .expect("cassandra by coupon");
        timed("cassandra by coupon", at);
        // Its `created` row at least (the last few coupons are never claimed).
        assert!(!in_postgres.is_empty(), "{code}");
        assert_eq!(in_postgres, in_cassandra, "{code}");
    }
    for (what, mut all) in latencies {
        all.sort();
        eprintln!(
            "read {what} over {loaded} rows: p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms ({} reads)",
            percentile(&all, 0.5).as_secs_f64() * 1e3,
            percentile(&all, 0.95).as_secs_f64() * 1e3,
            percentile(&all, 0.99).as_secs_f64() * 1e3,
            all.len()
        );
    }
    store.drop_keyspace().await.expect("drop the keyspace");
}

/// One line per tenth of the load.
fn progress(store: &str, index: usize, chunks: usize, loaded: usize) {
    let tenth = chunks.div_ceil(10).max(1);
    if (index + 1) % tenth == 0 || index + 1 == chunks {
        eprintln!("  {store}: {loaded} rows ({}/{chunks} chunks)", index + 1);
    }
}

/// CPU seconds (user + system) used so far by the processes `pids`.
fn cpu_seconds(pids: &[u32]) -> f64 {
    use couponctl::dev::bench::profile::process_ticks;
    // clock ticks per second: 100 on Linux.
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| Some(process_ticks(&stat)?.1 as f64 / 100.0))
        .sum()
}

/// The pids whose command line contains `needle`.
fn pids_of(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(needle))
                .unwrap_or(false)
        })
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}
