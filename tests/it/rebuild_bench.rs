//! The rebuild measured (issue #27, item 5): a flash sale's log, made by
//! the generator this bench owns and published onto the test's topics, is
//! rebuilt into a fresh database by `coupon_analyst::rebuild::rebuild`, as
//! `couponctl replay --rebuild` does; the rate, each phase's share, and the
//! raw broker read of the same records (the baseline) are printed. A
//! measurement, not a check: `cargo test` skips it and `make bench` runs it
//! (`-- --ignored`, release build). The rebuilt state is checked, so a fast
//! wrong rebuild fails.
//!
//! The log (`REBUILD_BENCH_USERS` users, 1,000,000 by default; 10,000
//! coupons): a release, one claim decision per user (the first 10,000
//! granted, the rest sold out), half the grants bought and the other half
//! expired, as the flash sale of the bench leaves it.

use std::time::Instant;

use chrono::Utc;

use coupon_analyst::rebuild::{self, OUTCOME_TOPICS};
use coupon_analyst::replay::{PartitionRange, Reader, StartAt};
use coupon_domain::QuotaWindow;
use coupon_platform::kafka::Publisher;
use coupon_schemas::{
    ClaimDecided, ClaimOutcome, CouponsCreated, HoldExpired, PurchaseDecided, PurchaseOutcome,
};

use crate::harness::TestEnv;

const COUPONS: usize = 10_000;

fn envelope<E: coupon_schemas::Event>(at: i64) -> Option<coupon_schemas::Envelope> {
    Some(coupon_schemas::new_envelope::<E>(
        uuid::Uuid::new_v4().to_string(),
        at,
        "bench-rebuild",
        "",
    ))
}

/// Publishes the flash sale's outcomes; returns how many events.
async fn publish_flash_sale(env: &TestEnv, users: usize) -> usize {
    let publisher = Publisher::new(&env.kafka, "bench-rebuild").expect("publisher");
    let t0 = Utc::now().timestamp_millis() - 3_600_000;
    let base = ((t0 as u64 - coupon_domain::snowflake::EPOCH_MS) << 22) as i64;
    let ids: Vec<i64> = (0..COUPONS as i64).map(|i| base + i).collect();
    let code = |i: usize| {
        coupon_domain::CouponCode::from_id(
            coupon_domain::SnowflakeId::from_raw(ids[i] as u64).expect("id"),
        )
        .to_string()
    };
    let created: Vec<(String, CouponsCreated)> = ids
        .chunks(1_000)
        .enumerate()
        .map(|(n, chunk)| {
            let batch = uuid::Uuid::new_v4().to_string();
            let event = CouponsCreated {
                envelope: envelope::<CouponsCreated>(t0),
                batch_id: batch.clone(),
                employee_id: "e-bench".into(),
                category: "Sale".into(),
                coupon_ids: chunk.to_vec(),
                chunk_index: n as u32,
                chunk_count: COUPONS.div_ceil(1_000) as u32,
                campaign: None,
            };
            (batch, event)
        })
        .collect();
    publisher
        .send_all(&env.topics.created(), &created)
        .await
        .expect("created");
    let decided_at = |i: usize| t0 + 1_000 + (i / 100) as i64;
    for part in (0..users).collect::<Vec<_>>().chunks(100_000) {
        let decisions: Vec<(String, ClaimDecided)> = part
            .iter()
            .map(|&i| {
                let user = format!("user-{i}");
                let granted = i < COUPONS;
                let event = ClaimDecided {
                    envelope: envelope::<ClaimDecided>(decided_at(i)),
                    request_id: format!("r-{i}"),
                    user_id: user.clone(),
                    outcome: if granted {
                        ClaimOutcome::Granted
                    } else {
                        ClaimOutcome::SoldOut
                    } as i32,
                    coupon_code: if granted { code(i) } else { String::new() },
                    category: "Sale".into(),
                    expires_at_ms: if granted { decided_at(i) + 300_000 } else { 0 },
                    ..Default::default()
                };
                (user, event)
            })
            .collect();
        publisher
            .send_all(&env.topics.claim_results(), &decisions)
            .await
            .expect("claim results");
    }
    let grants = COUPONS.min(users);
    let bought: Vec<(String, PurchaseDecided)> = (0..grants)
        .step_by(2)
        .map(|i| {
            let at = decided_at(i) + 30_000;
            let event = PurchaseDecided {
                envelope: envelope::<PurchaseDecided>(at),
                request_id: format!("p-{i}"),
                user_id: format!("user-{i}"),
                coupon_code: code(i),
                order_id: format!("o-{i}"),
                outcome: PurchaseOutcome::Redeemed as i32,
                redeemed_at_ms: at,
                ..Default::default()
            };
            (format!("user-{i}"), event)
        })
        .collect();
    publisher
        .send_all(&env.topics.purchase_results(), &bought)
        .await
        .expect("purchase results");
    let expired: Vec<(String, HoldExpired)> = (1..grants)
        .step_by(2)
        .map(|i| {
            let at = decided_at(i) + 300_000;
            let event = HoldExpired {
                envelope: envelope::<HoldExpired>(at),
                coupon_code: code(i),
                user_id: format!("user-{i}"),
                hold_id: format!("r-{i}"),
                held_until_ms: at,
                campaign_ended_at_ms: 0,
            };
            (code(i), event)
        })
        .collect();
    publisher
        .send_all(&env.topics.expirations(), &expired)
        .await
        .expect("expirations");
    created.len() + users + bought.len() + expired.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn rebuild_rate() {
    couponctl::memory::without_huge_pages();
    let env = TestEnv::new().await;
    let users: usize = std::env::var("REBUILD_BENCH_USERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let at = Instant::now();
    let events = publish_flash_sale(&env, users).await;
    eprintln!(
        "published {events} events in {:.1} s",
        at.elapsed().as_secs_f64()
    );

    // The baseline: the same records read raw from the broker.
    let (kafka, topics) = (env.kafka.clone(), env.topics.clone());
    let read = tokio::task::spawn_blocking(move || {
        let reader = Reader::new(&kafka).expect("reader");
        let ranges = reader
            .plan(&topics, &OUTCOME_TOPICS, StartAt::Beginning)
            .expect("plan");
        let at = Instant::now();
        let mut n = 0u64;
        reader
            .read(&ranges, |_, _| {
                n += 1;
                Ok(coupon_analyst::replay::Flow::Continue)
            })
            .expect("read");
        let total: u64 = ranges.iter().map(PartitionRange::len).sum();
        assert_eq!(n, total);
        (n, at.elapsed().as_secs_f64())
    })
    .await
    .expect("read");
    eprintln!(
        "baseline: the broker read {} records in {:.2} s = {:.0} records/s",
        read.0,
        read.1,
        read.0 as f64 / read.1
    );

    let stats = rebuild::rebuild(
        &env.kafka,
        &env.topics,
        QuotaWindow::DAY,
        &env.pool,
        indicatif::ProgressBar::hidden(),
    )
    .await
    .expect("rebuild");
    eprintln!("{stats}");
    eprintln!("  read the log: {:.2} s", stats.read_seconds);
    for (phase, seconds) in &stats.phases {
        eprintln!("  {phase}: {seconds:.2} s");
    }
    eprintln!(
        "  (of the apply, waiting for the writers: {:.2} s)",
        stats.apply_waited_seconds
    );
    eprintln!(
        "rebuild: {} events in {:.2} s = {:.0} events/s ({:.2}x the raw read)",
        stats.events,
        stats.seconds(),
        stats.rate(),
        stats.rate() / (read.0 as f64 / read.1)
    );
    assert_eq!(stats.events as usize, events);
    let grants = COUPONS.min(users) as u64;
    assert_eq!(
        (stats.coupons, stats.redeemed, stats.held),
        (COUPONS as u64, grants.div_ceil(2), 0)
    );
    assert_eq!(stats.claim_decisions as usize, users);
}
