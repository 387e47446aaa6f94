//! Retention (issue #27 item 4): decisions, quota slots and history leave
//! by partition once they are older than their window plus the retention;
//! a request retried after its decision left is decided afresh; the audit
//! (a rebuild from the log, which keeps everything) does not count what
//! retention dropped as differences.
//!
//! Waiting five weeks is not an option: the upkeep runs on a clock the test
//! moves forward, as a process would see it on a later day.

use std::time::Duration;

use chrono::{DateTime, Datelike as _, Days, NaiveDate, TimeZone as _, Utc};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use coupon_platform::store::retention::{self, Retention};
use couponctl::app::Role;

use crate::harness::{eventually, release, App, TestEnv};

const DAY: Duration = Duration::from_secs(86_400);

fn midnight(day: NaiveDate) -> DateTime<Utc> {
    Utc.from_utc_datetime(&day.and_hms_opt(0, 0, 0).unwrap())
}

async fn exists(env: &TestEnv, table: &str) -> bool {
    sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(table)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

/// A claim decision of `request_id` at `at`, straight into the table.
async fn decision(env: &TestEnv, request_id: &str, at: DateTime<Utc>) {
    sqlx::query(
        "INSERT INTO claim_decisions (request_id, event_id, user_id, outcome, decided_at)
         VALUES ($1, gen_random_uuid(), 'u', 'sold_out', $2)",
    )
    .bind(request_id)
    .bind(at)
    .execute(&env.pool)
    .await
    .unwrap();
}

async fn quota(env: &TestEnv, user: &str, window: DateTime<Utc>) {
    sqlx::query(
        "INSERT INTO quota_grants (user_id, window_start, request_id, granted_at)
         VALUES ($1, $2, 'r', $2)",
    )
    .bind(user)
    .bind(window)
    .execute(&env.pool)
    .await
    .unwrap();
}

async fn partition_of(env: &TestEnv, table: &str, key: &str, value: &str) -> Option<String> {
    sqlx::query_scalar(&format!(
        "SELECT tableoid::regclass::text FROM {table} WHERE {key} = $1"
    ))
    .bind(value)
    .fetch_optional(&env.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn expired_partitions_are_dropped_and_the_current_ones_kept() {
    let env = TestEnv::new().await;
    let today = Utc::now().date_naive();
    let day = |n: u64| today.checked_add_days(Days::new(n)).unwrap();
    let name = |table: &str, d: NaiveDate| format!("{table}_{}", d.format("%Y_%m_%d"));
    // Start-up made yesterday's partitions to a week ahead.
    for d in [today.pred_opt().unwrap(), today, day(7)] {
        assert!(exists(&env, &name("claim_decisions", d)).await);
        assert!(exists(&env, &name("quota_grants", d)).await);
    }
    decision(&env, "today", midnight(today) + chrono::Duration::hours(12)).await;
    decision(&env, "day-5", midnight(day(5))).await;
    quota(&env, "day-3", midnight(day(3))).await;
    quota(&env, "day-4", midnight(day(4))).await;
    assert_eq!(
        partition_of(&env, "claim_decisions", "request_id", "day-5").await,
        Some(name("claim_decisions", day(5)))
    );

    // Forty days on, keeping decisions 35 days: the cutoff lies in day 5,
    // so days up to 4 go (their last row is older than 35 days) and day 5
    // stays; quota slots are kept one window (a day) longer; the history
    // kept 40 days loses last month's partition, not this month's.
    let later = Utc::now() + chrono::Duration::days(40);
    let keep = Retention {
        decisions: 35 * DAY,
        history: Some(40 * DAY),
    };
    let stop = CancellationToken::new();
    let task = {
        let (pool, stop) = (env.pool.clone(), stop.clone());
        tokio::spawn(async move {
            couponctl::upkeep::drop_expired(
                &pool,
                Duration::from_millis(50),
                keep,
                DAY,
                move || later,
                stop,
            )
            .await
        })
    };
    // The history is the round's last table: its floor is set once the
    // round is done.
    eventually(
        "a round of the upkeep done",
        Duration::from_secs(30),
        || async {
            retention::floors(&env.pool)
                .await
                .unwrap()
                .history
                .is_some()
        },
    )
    .await;
    stop.cancel();
    task.await.unwrap();

    for gone in [today.pred_opt().unwrap(), today, day(4)] {
        assert!(
            !exists(&env, &name("claim_decisions", gone)).await,
            "{gone}"
        );
    }
    assert!(exists(&env, &name("claim_decisions", day(5))).await);
    assert!(!exists(&env, &name("quota_grants", day(3))).await);
    assert!(exists(&env, &name("quota_grants", day(4))).await);
    assert!(exists(&env, "claim_decisions_default").await);
    assert!(exists(&env, "quota_grants_default").await);
    assert_eq!(
        partition_of(&env, "claim_decisions", "request_id", "today").await,
        None
    );
    assert!(partition_of(&env, "claim_decisions", "request_id", "day-5")
        .await
        .is_some());
    assert_eq!(
        partition_of(&env, "quota_grants", "user_id", "day-3").await,
        None
    );
    assert!(partition_of(&env, "quota_grants", "user_id", "day-4")
        .await
        .is_some());

    let this_month = today.with_day0(0).unwrap();
    let last_month = this_month.pred_opt().unwrap().with_day0(0).unwrap();
    let month = |d: NaiveDate| format!("coupon_history_{}", d.format("%Y_%m"));
    assert!(!exists(&env, &month(last_month)).await);
    assert!(exists(&env, &month(this_month)).await);

    // Where the kept rows begin, for the audit.
    let floors = retention::floors(&env.pool).await.unwrap();
    assert_eq!(floors.decisions, Some(midnight(day(5))));
    assert_eq!(floors.quota, Some(midnight(day(4))));
    assert_eq!(floors.history, Some(midnight(this_month)));

    // Another round at the same time drops nothing more.
    let again = retention::drop_expired(&env.pool, &keep.cutoffs(later, DAY))
        .await
        .unwrap();
    assert!(again.is_empty(), "{again:?}");
}

async fn claim_as(app: &App, user: &str, request_id: &str) -> (u16, Value) {
    let response = TestEnv::http_client()
        .get(app.url(&format!("/api/v1/coupon?id={user}")))
        .header("x-request-id", request_id)
        .send()
        .await
        .expect("claim");
    (
        response.status().as_u16(),
        response.json().await.unwrap_or(Value::Null),
    )
}

/// Drops every decision and quota partition there is, and the history's
/// months up to next month's, as an upkeep running a hundred days from now
/// would: everything the test did today is past its retention.
async fn a_hundred_days_later(env: &TestEnv) {
    let keep = Retention {
        decisions: 35 * DAY,
        history: Some(31 * DAY),
    };
    let later = Utc::now() + chrono::Duration::days(100);
    let dropped = retention::drop_expired(&env.pool, &keep.cutoffs(later, DAY))
        .await
        .unwrap();
    assert!(!dropped.decisions.is_empty() && !dropped.history.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_retried_after_its_decision_was_dropped_is_decided_afresh() {
    let env = TestEnv::new().await;
    let app = env.start(&Role::ALL, |_| {}).await;
    release(&env, "Shoes", 2).await;
    let (status, first) = claim_as(&app, "ann", "ann-1").await;
    assert_eq!(status, 200, "{first}");
    let code = first["coupon_code"].as_str().unwrap().to_owned();
    // Within the retention the retry gets the stored decision: the same
    // answer, under the same event.
    let (status, retry) = claim_as(&app, "ann", "ann-1").await;
    assert_eq!((status, &retry), (200, &first));
    let stored = "SELECT count(*) FROM claim_decisions WHERE request_id = 'ann-1'";
    assert_eq!(env.count(stored).await, 1);

    a_hundred_days_later(&env).await;
    assert_eq!(env.count(stored).await, 0, "the decision is gone");

    // Past the horizon the id is new: decided again by today's rules. Ann
    // still holds her coupon (the coupons are never dropped), so she is
    // answered with it again (a repeat), never given a second one.
    let (status, again) = claim_as(&app, "ann", "ann-1").await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["coupon_code"].as_str(), Some(code.as_str()));
    assert_eq!(env.count(stored).await, 1, "a new decision is stored");
    assert_eq!(
        env.count("SELECT count(*) FROM coupons WHERE holder_user_id = 'ann'")
            .await,
        1
    );
    // Stored in the default partition: its day's partition was dropped.
    assert_eq!(
        partition_of(&env, "claim_decisions", "request_id", "ann-1").await,
        Some("claim_decisions_default".into())
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_still_agrees_after_retention_dropped_what_the_log_keeps() {
    let env = TestEnv::new().await;
    let app = env.start(&Role::ALL, |_| {}).await;
    release(&env, "Shoes", 1).await;
    for user in ["ann", "bob"] {
        let (status, body) = claim_as(&app, user, &format!("{user}-1")).await;
        assert!(status == 200 || status == 404, "{status} {body}");
    }
    env.wait_every_role_caught_up(Duration::from_secs(20)).await;
    app.stop().await;

    let audit = || async {
        let output = tokio::process::Command::from(env.couponctl())
            .arg("audit")
            .output()
            .await
            .expect("run couponctl audit");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        );
        eprintln!("couponctl audit: {}", stderr.trim());
        (output.status.code(), stdout, stderr)
    };
    let (code, before, _) = audit().await;
    assert_eq!(code, Some(0), "{before}");
    assert!(before.contains("2 claim decisions"), "{before}");

    a_hundred_days_later(&env).await;
    assert_eq!(env.count("SELECT count(*) FROM claim_decisions").await, 0);
    assert_eq!(env.count("SELECT count(*) FROM quota_grants").await, 0);
    assert_eq!(env.count("SELECT count(*) FROM coupon_history").await, 0);

    // The rebuild restores all of it from the log; the audit leaves out
    // what is older than the live floors instead of calling it missing.
    let (code, after, stderr) = audit().await;
    assert_eq!(code, Some(0), "{after}\n{stderr}");
    assert!(
        after.contains("0 quota grants, 0 claim decisions")
            && after.contains(" 0 history rows checked"),
        "{after}"
    );
    assert!(
        stderr.contains("older than the live database keeps"),
        "{stderr}"
    );
}

/// The retention migration turns a database that already holds decisions
/// and quota slots into the partitioned one: every row is there after it,
/// each in its day's partition (an old one in the default partition), and
/// the lookups keep their answers.
#[tokio::test]
async fn the_migration_moves_existing_rows_into_day_partitions() {
    let server = crate::harness::database_url();
    let admin = sqlx::PgPool::connect(&server).await.unwrap();
    let name = TestEnv::fresh_name();
    coupon_platform::db::create_database(&admin, &name)
        .await
        .unwrap();
    let options: sqlx::postgres::PgConnectOptions = server.parse().unwrap();
    let pool = sqlx::PgPool::connect_with(options.database(&name))
        .await
        .unwrap();

    // The migrations before this one, from a directory of their own.
    let before = std::env::temp_dir().join(format!("{name}_migrations"));
    std::fs::create_dir_all(&before).unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    for entry in std::fs::read_dir(&root).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        if file.as_str() < "20261206000003" {
            std::fs::copy(&path, before.join(&file)).unwrap();
        }
    }
    sqlx::migrate::Migrator::new(before.as_path())
        .await
        .unwrap()
        .run(&pool)
        .await
        .unwrap();
    std::fs::remove_dir_all(&before).unwrap();
    let partitioned =
        "SELECT count(*) FROM pg_partitioned_table p JOIN pg_class c ON c.oid = p.partrelid \
                       WHERE c.relname IN ('claim_decisions', 'quota_grants')";
    let count = |sql: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(count(partitioned).await, 0);
    let now = Utc::now();
    for (request, at) in [
        ("now", now),
        ("three-days-ago", now - chrono::Duration::days(3)),
        ("two-years-ago", now - chrono::Duration::days(730)),
    ] {
        sqlx::query(
            "INSERT INTO claim_decisions (request_id, event_id, user_id, outcome, decided_at)
             VALUES ($1, gen_random_uuid(), $1, 'sold_out', $2)",
        )
        .bind(request)
        .bind(at)
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO quota_grants (user_id, window_start, request_id, granted_at)
             VALUES ($1, date_trunc('day', $2::timestamptz, 'UTC'), $1, $2)",
        )
        .bind(request)
        .bind(at)
        .execute(&pool)
        .await
        .unwrap();
    }

    coupon_platform::db::migrate(&pool).await.unwrap();
    assert_eq!(count(partitioned).await, 2);
    assert_eq!(count("SELECT count(*) FROM claim_decisions").await, 3);
    assert_eq!(count("SELECT count(*) FROM quota_grants").await, 3);
    let partition = |table: &'static str, key: &'static str, value: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(&format!(
                "SELECT tableoid::regclass::text FROM {table} WHERE {key} = $1"
            ))
            .bind(value)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let day = |days: i64| {
        (now - chrono::Duration::days(days))
            .format("%Y_%m_%d")
            .to_string()
    };
    assert_eq!(
        partition("claim_decisions", "request_id", "three-days-ago").await,
        format!("claim_decisions_{}", day(3))
    );
    assert_eq!(
        partition("quota_grants", "user_id", "now").await,
        format!("quota_grants_{}", day(0))
    );
    assert_eq!(
        partition("claim_decisions", "request_id", "two-years-ago").await,
        "claim_decisions_default",
        "older than 400 days: the default partition"
    );
    // The claim processor's lookup finds them as before.
    let mut conn = pool.acquire().await.unwrap();
    let ids: Vec<coupon_domain::RequestId> = ["now", "three-days-ago"]
        .iter()
        .map(|id| coupon_domain::RequestId::parse(*id).unwrap())
        .collect();
    let found = coupon_platform::store::claims::find_decisions(
        &mut conn,
        &ids.iter().collect::<Vec<_>>(),
        now - chrono::Duration::days(5),
    )
    .await
    .unwrap();
    assert_eq!(found.len(), 2);
    drop(conn);
    pool.close().await;
    coupon_platform::db::drop_database(&admin, &name)
        .await
        .unwrap();
}

/// A rebuild makes the partitions of its log's days before it writes, so a
/// rebuilt database put live has its old days where retention drops them;
/// a log spanning years gets at most 400 days of them.
#[tokio::test]
async fn a_rebuilds_days_get_partitions_of_their_own() {
    let env = TestEnv::new().await;
    let now = Utc::now();
    let name = |table: &str, days: i64| {
        format!(
            "{table}_{}",
            (now - chrono::Duration::days(days)).format("%Y_%m_%d")
        )
    };
    assert!(!exists(&env, &name("claim_decisions", 10)).await);
    coupon_platform::db::partitions_covering(&env.pool, now - chrono::Duration::days(10), now)
        .await
        .unwrap();
    for days in [0, 10, 11] {
        assert!(exists(&env, &name("claim_decisions", days)).await, "{days}");
        assert!(exists(&env, &name("quota_grants", days)).await, "{days}");
    }
    let month = (now - chrono::Duration::days(11)).format("coupon_history_%Y_%m");
    assert!(exists(&env, &month.to_string()).await);

    coupon_platform::db::partitions_covering(&env.pool, now - chrono::Duration::days(5_000), now)
        .await
        .unwrap();
    assert!(exists(&env, &name("claim_decisions", 400)).await);
    assert!(!exists(&env, &name("claim_decisions", 401)).await);
}

/// The day's decision partition fills from empty in minutes; the upkeep's
/// statistics round analyzes it once a fifth of it (a thousand rows at
/// least) changed since its last analyze (`store::statistics`), so a
/// connection's cached plan of the request-id look-up does not keep
/// seq-scanning it (4.7 s a batch at half a million rows, measured).
/// Autovacuum is off for the partition here: only the round can analyze it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_statistics_round_analyzes_a_filling_decision_partition() {
    let env = TestEnv::new().await;
    let today = Utc::now().date_naive();
    let partition = format!("claim_decisions_{}", today.format("%Y_%m_%d"));
    sqlx::query(&format!(
        "ALTER TABLE {partition} SET (autovacuum_enabled = false)"
    ))
    .execute(&env.pool)
    .await
    .unwrap();
    let reltuples = || async {
        sqlx::query_scalar::<_, f64>("SELECT reltuples::float8 FROM pg_class WHERE relname = $1")
            .bind(&partition)
            .fetch_one(&env.pool)
            .await
            .unwrap()
    };
    let insert = |from: i32, to: i32| {
        let pool = env.pool.clone();
        let at = midnight(today) + chrono::Duration::hours(1);
        async move {
            sqlx::query(
                "INSERT INTO claim_decisions (request_id, event_id, user_id, outcome, decided_at)
                 SELECT 'r-' || i, gen_random_uuid(), 'u-' || i, 'sold_out', $3
                 FROM generate_series($1::int, $2::int) AS i",
            )
            .bind(from)
            .bind(to)
            .bind(at)
            .execute(&pool)
            .await
            .unwrap();
        }
    };

    // Below a thousand changed rows: nothing to do.
    insert(1, 500).await;
    let analyzed = eventually_refreshed(&env, &partition, Duration::from_secs(2)).await;
    assert!(!analyzed, "500 rows analyzed");
    assert!(reltuples().await < 0.0);

    insert(501, 5_000).await;
    assert!(
        eventually_refreshed(&env, &partition, Duration::from_secs(30)).await,
        "5,000 new rows never analyzed"
    );
    assert!(reltuples().await >= 4_500.0, "{}", reltuples().await);
    // Fresh now: the next round leaves it.
    let again = coupon_platform::store::statistics::refresh_stale(&env.pool)
        .await
        .unwrap();
    assert!(!again.contains(&partition), "{again:?}");
}

/// Runs the statistics round until it analyzes `table` (true) or `within`
/// passes (false). Postgres counts a transaction's changes for the
/// statistics once it ends, with a short delay, hence the retries.
async fn eventually_refreshed(env: &TestEnv, table: &str, within: Duration) -> bool {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        let analyzed = coupon_platform::store::statistics::refresh_stale(&env.pool)
            .await
            .unwrap();
        if analyzed.iter().any(|t| t == table) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}
