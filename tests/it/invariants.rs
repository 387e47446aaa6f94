//! The harness's invariants can fail (issue #14, item 6): they are checked
//! on the facts the processors record, and the daily quota on the UTC day
//! whatever the session's time zone.

use sqlx::postgres::PgConnectOptions;

use crate::harness::{invariant_violations, TestEnv};

/// Two grants to one user on one UTC day, seen from a session whose zone
/// puts them on two local days, and recorded under two different quota
/// slots (as a processor that computed windows wrongly would). Before, the
/// quota check grouped on the primary key of `quota_grants` (it could never
/// fail) and the daily check truncated to the session's day.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_grants_in_one_utc_day_are_a_violation_whatever_the_session_zone() {
    let mut env = TestEnv::new().await;
    // sqlx opens sessions in UTC; any other client (psql, a dashboard) may
    // not. Look at the same database from a session 14 hours ahead.
    let options: PgConnectOptions = env.database_url.parse().unwrap();
    env.pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .after_connect(|conn, _| {
            Box::pin(async move {
                sqlx::Executor::execute(conn, "SET TimeZone = 'Pacific/Kiritimati'").await?;
                Ok(())
            })
        })
        .connect_with(options)
        .await
        .unwrap();
    let zone: String = sqlx::query_scalar("SHOW timezone")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(
        zone, "Pacific/Kiritimati",
        "sessions are 14 hours ahead of UTC"
    );

    for (request_id, code, at, slot) in [
        (
            "r-morning",
            "C1",
            "2026-11-25T01:00:00Z",
            "2026-11-25T00:00:00Z",
        ),
        (
            "r-evening",
            "C2",
            "2026-11-25T20:00:00Z",
            "2026-11-25T10:00:00Z",
        ),
    ] {
        let at: chrono::DateTime<chrono::Utc> = at.parse().unwrap();
        let slot: chrono::DateTime<chrono::Utc> = slot.parse().unwrap();
        sqlx::query(
            "INSERT INTO claim_decisions (request_id, event_id, user_id, outcome, coupon_code,
                                          category, expires_at, decided_at)
             VALUES ($1, $2, 'greedy', 'granted', $3, 'x', $4, $5)",
        )
        .bind(request_id)
        .bind(uuid::Uuid::new_v4())
        .bind(code)
        .bind(at + chrono::Duration::minutes(5))
        .bind(at)
        .execute(&env.pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO quota_grants (user_id, window_start, request_id, granted_at)
             VALUES ('greedy', $1, $2, $3)",
        )
        .bind(slot)
        .bind(request_id)
        .bind(at)
        .execute(&env.pool)
        .await
        .unwrap();
    }
    let violations = invariant_violations(&env, 0).await;
    let names: Vec<&str> = violations.iter().map(|(name, _)| *name).collect();
    assert!(
        names.contains(&"one grant per user per quota window"),
        "{violations:?}"
    );
    assert!(
        names.contains(&"every grant took its window's quota slot"),
        "the evening grant's slot is not its window's: {violations:?}"
    );
}
