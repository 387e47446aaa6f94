//! Redis lost while serving: no answer changes (Postgres decides; Redis is
//! a cache of holds and sold-out marks) and holds still expire.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::stream::{self, StreamExt};
use serde_json::Value;

use coupon_platform::redis::Cache;
use couponctl::app::Role;

use coupon_test_support::harness::{assert_invariants, eventually, redis_url, release, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_loss_while_serving_changes_no_answer_and_holds_still_expire() {
    let env = TestEnv::new().await;
    let hold_ttl = Duration::from_secs(3);
    let app = env
        .start(
            &[
                Role::Gateway,
                Role::Coupons,
                Role::Claims,
                Role::Purchases,
                Role::Expiry,
            ],
            |c| c.policy.hold_ttl = hold_ttl,
        )
        .await;
    let codes: HashSet<String> = release(&env, "Volatile", 40).await.into_iter().collect();
    let cache = Cache::connect(&redis_url(), &env.name)
        .await
        .expect("redis");
    let http = TestEnv::http_client();

    // Wipes this test's keys over and over while `round` runs.
    async fn with_redis_loss<T>(
        cache: &Cache,
        round: impl std::future::Future<Output = T>,
    ) -> (T, u64, u32) {
        let stop = tokio_util::sync::CancellationToken::new();
        let wiper = {
            let (cache, stop) = (cache.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut deleted, mut wipes) = (0u64, 0u32);
                while !stop.is_cancelled() {
                    deleted += cache.clear().await.expect("clear redis");
                    wipes += 1;
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                    }
                }
                (deleted, wipes)
            })
        };
        let result = round.await;
        stop.cancel();
        let (deleted, wipes) = wiper.await.expect("wiper");
        (result, deleted, wipes)
    }
    let claim_round = |users: Vec<String>| {
        let http = http.clone();
        let app = &app;
        async move {
            stream::iter(users)
                .map(|user| {
                    let http = http.clone();
                    let url = app.url(&format!("/api/v1/coupon?id={user}"));
                    async move {
                        let response = http.get(url).send().await.expect("claim");
                        let status = response.status().as_u16();
                        (
                            user,
                            status,
                            response.json::<Value>().await.unwrap_or(Value::Null),
                        )
                    }
                })
                .buffer_unordered(16)
                .collect::<Vec<_>>()
                .await
        }
    };

    let users: Vec<String> = (0..100).map(|i| format!("volatile-{i}")).collect();
    let (results, deleted, wipes) = with_redis_loss(&cache, claim_round(users)).await;
    let winners: HashMap<String, String> = results
        .iter()
        .filter(|(_, s, _)| *s == 200)
        .map(|(u, _, b)| {
            (
                u.clone(),
                b["coupon_code"].as_str().expect("code").to_owned(),
            )
        })
        .collect();
    assert!(
        results
            .iter()
            .all(|(_, s, b)| *s == 200 || (*s == 404 && b["error"] == "sold_out")),
        "only grants and sold out"
    );
    assert_eq!(winners.len(), 40);
    assert_eq!(winners.values().collect::<HashSet<_>>().len(), 40);
    assert!(winners.values().all(|c| codes.contains(c)));

    // Winners asking again with Redis empty get their hold back from Postgres.
    cache.clear().await.expect("clear");
    let some: Vec<String> = winners.keys().take(10).cloned().collect();
    for (user, status, body) in claim_round(some).await {
        assert_eq!(status, 200, "{user}: {body}");
        assert_eq!(body["coupon_code"].as_str(), Some(winners[&user].as_str()));
    }
    assert_invariants(&env, 40).await;

    // Every hold still ends: Postgres deadlines, not Redis TTLs, drive expiry.
    cache.clear().await.expect("clear");
    let last_deadline: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT max(held_until) FROM coupons WHERE status = 'held'")
            .fetch_one(&env.pool)
            .await
            .expect("deadline");
    eventually(
        "every hold is released after its deadline",
        hold_ttl + Duration::from_secs(15),
        || async { env.status_counts().await.available == 40 },
    )
    .await;
    let lag = chrono::Utc::now() - last_deadline;

    // The released coupons go to new users, Redis wiped all along; the first
    // winners' quota stays used.
    let mut users: Vec<String> = (0..40).map(|i| format!("second-{i}")).collect();
    users.extend(winners.keys().take(5).cloned());
    let (results, more_deleted, more_wipes) = with_redis_loss(&cache, claim_round(users)).await;
    let second_winners = results
        .iter()
        .filter(|(u, s, _)| u.starts_with("second-") && *s == 200)
        .count();
    assert_eq!(second_winners, 40);
    for (user, status, body) in &results {
        if !user.starts_with("second-") {
            assert_eq!(*status, 429, "{user}: {body}");
            assert_eq!(body["error"], "rate_limited");
        }
    }
    assert_eq!(env.status_counts().await.held, 40);
    assert_invariants(&env, 40).await;
    eprintln!(
        "redis wiped {} times ({} keys) during the claims; last hold released {} ms after its deadline",
        wipes + more_wipes,
        deleted + more_deleted,
        lag.num_milliseconds()
    );
    app.stop().await;
}
