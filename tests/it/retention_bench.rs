//! Day 1 and day 30 measured (issue #27, item 4): every other run starts on
//! an empty database, so what a month of decisions does to the claim path
//! was never seen. This bench measures the claim processor's statements on
//! a batch (the stored decisions looked up, the users' states read, the new
//! decisions inserted: one transaction of 2,000 new claims, as a full
//! batch) on the empty database of day 1, then loads 29 more days of
//! decisions, quota slots and history with binary `COPY`s into their day
//! partitions and vacuums them (the loader, `couponctl::dev::load::load_month`,
//! as the as-run bench's day 30), and measures the same batches on day 30; then the same lookup unbounded (every partition, as it would be
//! without `REQUEST_ID_HORIZON`), and one retention round dropping the
//! oldest day.
//!
//! A measurement, not a check: `cargo test` skips it and `make bench` runs
//! it (`-- --ignored`, release build). It still checks what it measures: the
//! loaded rows are counted, and day 30's lookups find yesterday's ids.
//!
//! `RETENTION_BENCH_PER_DAY` claims a day (200,000 by default, a fifth of
//! the seed's million: 30 days of it take ~4 GB with the history; the
//! seed's volume takes ~20 GB), one in a hundred granted (a quota slot and
//! a held coupon's decision), each with its history row.

use std::time::{Duration, Instant};

use chrono::{DateTime, Days, Utc};

use coupon_domain::{RequestId, UserId};
use coupon_platform::store::claims::{self, ClaimDecisionRecord};
use coupon_platform::store::retention::{self, Retention};
use couponctl::dev::load::{decision, load_month, midnight};

use crate::harness::TestEnv;

/// Claims of a measured batch (`MAX_BATCH`).
const BATCH: usize = 2_000;
/// Batches measured on each day.
const BATCHES: usize = 20;
/// One batch of the claim processor's statements: `BATCH` new claims of
/// existing users, looked up from `since`, their states read, their
/// decisions inserted, in one transaction. Returns its time and how many
/// stored decisions the lookup found.
async fn batch(
    pool: &sqlx::PgPool,
    requests: &[RequestId],
    users: &[UserId],
    since: DateTime<Utc>,
    insert: bool,
) -> (Duration, usize) {
    let now = Utc::now();
    let started = Instant::now();
    let mut tx = pool.begin().await.unwrap();
    let ids: Vec<&RequestId> = requests.iter().collect();
    let found = claims::find_decisions(&mut tx, &ids, since).await.unwrap();
    let user_ids: Vec<&UserId> = users.iter().collect();
    let window = midnight(now.date_naive());
    let states = claims::user_states(&mut tx, &user_ids, window)
        .await
        .unwrap();
    assert_eq!(states.len(), users.len());
    if insert {
        let decisions: Vec<ClaimDecisionRecord> = requests
            .iter()
            .zip(users)
            .map(|(r, u)| {
                decision(r.as_str().to_owned(), u.as_str().to_owned(), now, false).unwrap()
            })
            .collect();
        let inserted = claims::insert_decisions(&mut tx, &decisions).await.unwrap();
        assert_eq!(inserted as usize, decisions.len());
    }
    tx.commit().await.unwrap();
    (started.elapsed(), found.len())
}

struct Measured {
    p50_ms: f64,
    p99_ms: f64,
    claims_per_s: f64,
}

/// `BATCHES` batches of new claims (`label` names their request ids).
async fn measure(pool: &sqlx::PgPool, label: &str, since: DateTime<Utc>, insert: bool) -> Measured {
    let mut times = Vec::with_capacity(BATCHES);
    for b in 0..BATCHES {
        let requests: Vec<RequestId> = (0..BATCH)
            .map(|i| RequestId::parse(format!("{label}-{b}-{i}")).unwrap())
            .collect();
        let users: Vec<UserId> = (0..BATCH)
            .map(|i| UserId::parse(format!("u{}", b * BATCH + i)).unwrap())
            .collect();
        let (took, found) = batch(pool, &requests, &users, since, insert).await;
        assert_eq!(found, 0, "new request ids");
        times.push(took);
    }
    times.sort();
    let total: Duration = times.iter().sum();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3;
    Measured {
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        claims_per_s: (BATCHES * BATCH) as f64 / total.as_secs_f64(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: make bench runs it"]
async fn the_claim_batch_on_day_1_and_day_30() {
    couponctl::memory::without_huge_pages();
    let per_day: usize = std::env::var("RETENTION_BENCH_PER_DAY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let env = TestEnv::new().await;
    let pool = &env.pool;
    let today = Utc::now().date_naive();
    let horizon_since =
        |now: DateTime<Utc>| midnight((now - chrono::Duration::days(1)).date_naive());

    let day1 = measure(pool, "day1", horizon_since(Utc::now()), true).await;

    // Days 1 to 29 before today, each in its partition, then vacuumed,
    // analyzed and checkpointed, as the as-run bench's day 30 loads them.
    let loaded = load_month(pool, today, 29, per_day).await.unwrap();
    let (rows, load_seconds) = (loaded.rows, loaded.seconds);
    let first = today.checked_sub_days(Days::new(29)).unwrap();
    let granted = 29 * per_day.div_ceil(100) as i64;
    assert_eq!(
        env.count("SELECT count(*) FROM claim_decisions").await,
        29 * per_day as i64 + (BATCHES * BATCH) as i64
    );
    assert_eq!(
        env.count("SELECT count(*) FROM quota_grants").await,
        granted
    );
    assert_eq!(rows as i64, 2 * 29 * per_day as i64 + granted);

    let day30 = measure(pool, "day30", horizon_since(Utc::now()), true).await;
    let unbounded = measure(pool, "unbounded", DateTime::<Utc>::UNIX_EPOCH, false).await;
    // Yesterday's ids are found within the horizon: a retry is recognised.
    let yesterday = today.pred_opt().unwrap().format("%Y%m%d");
    let ids: Vec<RequestId> = (0..BATCH)
        .map(|i| RequestId::parse(format!("d{yesterday}-{i}")).unwrap())
        .collect();
    let users: Vec<UserId> = (0..BATCH)
        .map(|i| UserId::parse(format!("u{i}")).unwrap())
        .collect();
    let (_, found) = batch(pool, &ids, &users, horizon_since(Utc::now()), false).await;
    assert_eq!(found, BATCH.min(per_day));

    // One retention round with the default retention, on a clock 36 days
    // after the first loaded day: that day goes.
    let keep = Retention::default();
    let later = midnight(first) + chrono::Duration::days(36) + chrono::Duration::hours(1);
    let started = Instant::now();
    let dropped = retention::drop_expired(pool, &keep.cutoffs(later, Duration::from_secs(86_400)))
        .await
        .unwrap();
    let drop_ms = started.elapsed().as_secs_f64() * 1e3;
    assert_eq!(dropped.decisions.len(), 1, "{dropped:?}");

    let line = |label: &str, m: &Measured| {
        println!(
            "| {label} | {:.0} | {:.1} | {:.1} |",
            m.claims_per_s, m.p50_ms, m.p99_ms
        )
    };
    println!(
        "\nretention bench: {per_day} claims a day, batches of {BATCH} new claims ({BATCHES} each)"
    );
    println!("| the claim batch's statements | claims/s | p50 ms | p99 ms |\n|---|---|---|---|");
    line("day 1 (empty database)", &day1);
    line(
        &format!("day 30 ({} claim decisions)", 29 * per_day),
        &day30,
    );
    line(
        "day 30, lookup over every partition (no insert)",
        &unbounded,
    );
    println!(
        "loader: {rows} rows (decisions, quota slots, history) in {load_seconds:.1}s, {:.0} rows/s by COPY; \
         a retention round dropping a day: {drop_ms:.0} ms",
        rows as f64 / load_seconds
    );
}
