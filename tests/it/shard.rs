//! The claim path split over two databases by claims partition (README
//! "Sharding"; the bench's sharding rows measure it on two servers): each
//! shard decides its own users' claims with nothing but its own rows, every
//! user's quota slot, decision and hold land on the user's shard only, and a
//! redelivery of every batch grants nothing more.

use std::collections::HashSet;

use coupon_consumers::Context;
use coupon_domain::shard::{shard_of_user, slices};
use coupon_domain::Category;
use coupon_platform::store::stats;
use couponctl::dev::bench::shard::{decide_on_each, release_slice, split_claims};

use crate::harness::TestEnv;

const USERS: usize = 400;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_split_by_partition_decide_on_their_users_shard_alone() {
    // Two databases, the shards; the system's broker, Redis and policy are
    // the first one's.
    let (first, second) = (TestEnv::new().await, TestEnv::new().await);
    let config = first.config();
    let context = couponctl::app::connect(&config).await.expect("connect");
    let contexts = vec![
        context.clone(),
        Context {
            pool: second.pool.clone(),
            ..context.clone()
        },
    ];
    let shards = [&first, &second];
    let partitions = config.partitions as u32;
    let category = Category::parse("Sharded").expect("category");
    for (n, (shard, slice)) in shards.iter().zip(slices(USERS as u32 + 40, 2)).enumerate() {
        release_slice(&shard.pool, &category, slice, n as u16 + 1)
            .await
            .expect("release a slice");
    }
    let users: Vec<String> = (0..USERS).map(|i| format!("it-shard-{i}")).collect();
    let by_shard = split_claims(&context, &users, category, partitions, 2);
    let own: Vec<usize> = by_shard.iter().map(Vec::len).collect();
    assert!(
        own.iter().all(|&n| n > USERS / 4),
        "the users split about evenly: {own:?}"
    );

    decide_on_each(&contexts, by_shard.clone(), 64)
        .await
        .expect("decide");
    // Every batch redelivered: answered from the stored decisions.
    decide_on_each(&contexts, by_shard, 64)
        .await
        .expect("decide again");

    let mut seen = HashSet::new();
    for (n, shard) in shards.iter().enumerate() {
        let stored = stats::users_with_rows(&shard.pool)
            .await
            .expect("the shard's users");
        for user in &stored {
            assert_eq!(
                shard_of_user(user, partitions, 2),
                n as u32,
                "shard {n} stores a row of {user}, another shard's user"
            );
            assert!(seen.insert(user.clone()), "{user} has rows on two shards");
        }
        assert_eq!(
            stored.len(),
            own[n],
            "every user of shard {n} has rows there"
        );
        assert_eq!(
            shard.count("SELECT count(*) FROM quota_grants").await,
            own[n] as i64,
            "one quota slot per user of shard {n}, after the redelivery too"
        );
        assert_eq!(
            shard
                .count("SELECT count(*) FROM coupons WHERE status = 'held'")
                .await,
            own[n] as i64,
            "every claim of shard {n} won a coupon of its slice"
        );
    }
    assert_eq!(seen.len(), USERS);
}
