//! The demo's summary agrees with the database it ran on.

use std::time::Duration;

use couponctl::dev::demo::{self, DemoOptions};

use crate::harness::TestEnv;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_summary_matches_the_database() {
    let env = TestEnv::new().await;
    let options = DemoOptions {
        users: 300,
        electronics: 60,
        books: 40,
        hold_ttl: Duration::from_secs(2),
        keep: true,
    };
    let summary = demo::run(env.config(), options).await.expect("demo");
    let url = summary.database_url.clone().expect("kept database");
    let pool = coupon_platform::db::connect(&url, 2).await.unwrap();
    let count = |sql: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(summary.issued, 100);
    assert_eq!(summary.granted, 100, "300 users for 100 coupons");
    assert_eq!(summary.blacklisted, 1);
    assert_eq!(count("SELECT count(*) FROM coupons").await, summary.issued);
    assert_eq!(
        count("SELECT count(*) FROM coupons WHERE status = 'redeemed'").await,
        summary.redeemed
    );
    assert_eq!(summary.redeemed, 50, "every other winner buys");
    // The first wave's releases: the second wave's 2 s holds may run out
    // too before the demo stops, and those are not in its summary.
    assert_eq!(
        count(
            "SELECT count(*) FROM coupon_history WHERE kind = 'released' AND user_id LIKE 'user-%'"
        )
        .await,
        summary.expired
    );
    assert!(summary.expired >= 50, "the unbought holds expired");
    assert!(
        summary.regranted >= summary.expired,
        "every released coupon found a new holder"
    );
    assert_eq!(
        count("SELECT count(*) FROM claim_decisions WHERE outcome = 'granted' AND NOT repeated")
            .await,
        summary.db_granted
    );
    assert_eq!(summary.rate_limited, 20);
    let name = url
        .rsplit('/')
        .next()
        .unwrap()
        .split('?')
        .next()
        .unwrap()
        .to_owned();
    pool.close().await;
    sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .execute(&env.pool)
        .await
        .unwrap();
}
