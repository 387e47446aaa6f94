//! The history's monthly partitions are made ahead while a process runs,
//! not only at start-up: a month's rows never settle in the default
//! partition of a process that runs for months (issue #24, item 13).

use std::time::Duration;

use chrono::{Datelike as _, Months, NaiveDate, TimeZone as _, Utc};
use tokio_util::sync::CancellationToken;

use crate::harness::{eventually, TestEnv};

/// The partition a history row at `at` is stored in.
async fn partition_of(env: &TestEnv, at: chrono::DateTime<Utc>) -> String {
    let event_id = uuid::Uuid::new_v4();
    sqlx::query(
        "INSERT INTO coupon_history (occurred_at, event_id, kind) VALUES ($1, $2, 'granted')",
    )
    .bind(at)
    .bind(event_id)
    .execute(&env.pool)
    .await
    .expect("a history row");
    sqlx::query_scalar("SELECT tableoid::regclass::text FROM coupon_history WHERE event_id = $1")
        .bind(event_id)
        .fetch_one(&env.pool)
        .await
        .expect("its partition")
}

#[tokio::test]
async fn the_coming_months_partitions_are_made_while_the_process_runs() {
    let env = TestEnv::new().await;
    let today = Utc::now().date_naive();
    // Four months on: past what start-up made (this month and the next two).
    let later = today.checked_add_months(Months::new(4)).unwrap();
    let first = NaiveDate::from_ymd_opt(later.year(), later.month(), 1).unwrap();
    let name = format!("coupon_history_{}", first.format("%Y_%m"));
    let exists = || async {
        sqlx::query_scalar::<_, bool>("SELECT to_regclass($1) IS NOT NULL")
            .bind(&name)
            .fetch_one(&env.pool)
            .await
            .unwrap()
    };
    assert!(!exists().await, "{name} is not made at start-up");

    // The process's task, on a clock that reads four months on.
    let stop = CancellationToken::new();
    let task = {
        let (pool, stop) = (env.pool.clone(), stop.clone());
        tokio::spawn(async move {
            couponctl::upkeep::partitions_ahead(
                &pool,
                Duration::from_millis(50),
                move || later,
                stop,
            )
            .await
        })
    };
    eventually(
        "the month's partition made",
        Duration::from_secs(30),
        exists,
    )
    .await;
    stop.cancel();
    task.await.unwrap();

    let at = Utc.from_utc_datetime(&first.and_hms_opt(12, 0, 0).unwrap());
    assert_eq!(
        partition_of(&env, at).await,
        name,
        "not the default partition"
    );
    let next = first.checked_add_months(Months::new(2)).unwrap();
    let at = Utc.from_utc_datetime(&next.and_hms_opt(0, 0, 0).unwrap());
    assert_eq!(
        partition_of(&env, at).await,
        format!("coupon_history_{}", next.format("%Y_%m")),
        "two months further are made too"
    );
}
