//! The sustained scenario: a fixed rate of mixed traffic (claims,
//! purchases, expirations) with memory and consumer lag sampled, which must
//! not grow.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::Mutex;

use couponctl::dev::bench::profile::{self, MemoryProfile};

use crate::harness::{free_port, release, Child, TestEnv};
use crate::profile::Profile;
use crate::score::{claim, guarded, score, Row, CLIENT_PATIENCE};

pub async fn sustained(profile: &Profile) -> Row {
    let profile = profile.clone();
    guarded("sustained mixed load", sustained_load(profile)).await
}

/// Memory and lag, sampled once a second while the load runs.
#[derive(Default)]
struct Samples {
    rss_kib: Vec<u64>,
    lag: Vec<i64>,
}

async fn sustained_load(profile: Profile) -> Row {
    let env = TestEnv::new().await;
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    // A short hold, so that expirations return coupons to the pool while
    // the load runs: claims, purchases and expirations all mix.
    let mut run = Child::spawn_with(&env, &["run"], port, "run", |command| {
        command.env("HOLD_TTL", "3s");
    });
    run.wait_healthy(&base, Duration::from_secs(60)).await;
    let total = (profile.rate as f64 * profile.sustained.as_secs_f64()) as usize;
    let issued = (total / 4).max(50) as u32;
    release(&env, "Steady", issued).await;

    let samples = Arc::new(Mutex::new(Samples::default()));
    let stop = tokio_util::sync::CancellationToken::new();
    let sampler = {
        let (samples, stop, pid) = (samples.clone(), stop.clone(), run.pid());
        let (kafka, group, topic) = (
            env.kafka.clone(),
            env.topics.group(couponctl::app::Role::Claims),
            env.topics.claims(),
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            while !stop.is_cancelled() {
                tick.tick().await;
                let rss = pid.and_then(profile::rss_kib);
                let (k, g, t) = (kafka.clone(), group.clone(), topic.clone());
                let lag = tokio::task::spawn_blocking(move || {
                    coupon_platform::kafka::lag::group_lag(&k, &g, &[t])
                        .map(|lags| lags.iter().map(|p| p.lag).sum::<i64>())
                })
                .await;
                let mut samples = samples.lock().await;
                samples.rss_kib.extend(rss);
                if let Ok(Ok(lag)) = lag {
                    samples.lag.push(lag);
                }
            }
        })
    };

    let http = TestEnv::http_client();
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let redeemed_answers = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::with_capacity(total);
    let mut pace = tokio::time::interval(Duration::from_secs_f64(1.0 / profile.rate as f64));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for i in 0..total {
        pace.tick().await;
        let (http, base) = (http.clone(), base.clone());
        let (latencies, redeemed) = (latencies.clone(), redeemed_answers.clone());
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let answer = claim(
                &http,
                &base,
                format!("steady-{i}"),
                format!("steady-req-{i}"),
            )
            .await;
            latencies.lock().await.push(started.elapsed());
            // Two in five winners buy at once; the rest let the hold expire.
            if let Some((200, body)) = &answer.answer {
                if i % 5 < 2 {
                    if let Some(code) = body["coupon_code"].as_str() {
                        if purchase(&http, &base, &answer.user, code, &format!("order-{i}")).await {
                            redeemed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                }
            }
            answer
        }));
    }
    let mut answers = Vec::with_capacity(total);
    for task in tasks {
        answers.push(task.await.expect("a client task"));
    }
    stop.cancel();
    let _ = sampler.await;

    let mut row = score(&env, "sustained mixed load", i64::from(issued), &answers).await;
    let redeemed_answers = redeemed_answers.load(std::sync::atomic::Ordering::SeqCst) as i64;
    let redeemed = env.status_counts().await.redeemed;
    if redeemed != redeemed_answers {
        row.violations += 1;
        row.notes.push(format!(
            "{redeemed_answers} purchases answered 200 but {redeemed} coupons redeemed"
        ));
    }
    let expired = env
        .count("SELECT count(*) FROM coupon_history WHERE kind = 'released'")
        .await;
    let samples = samples.lock().await;
    let mut latencies = latencies.lock().await.clone();
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q) as usize];
    row.notes.push(format!(
        "{} claims at {}/s for {} s: p50 {} ms, p99 {} ms; {redeemed} redeemed, {expired} holds expired",
        latencies.len(),
        profile.rate,
        profile.sustained.as_secs(),
        at(0.5).as_millis(),
        at(0.99).as_millis()
    ));
    row.violations += judge_memory(&samples.rss_kib, &mut row.notes);
    row.violations += judge_lag(&samples.lag, profile.rate, &mut row.notes);
    run.assert_alive();
    row
}

fn median<T: Copy + Ord>(values: &[T]) -> Option<T> {
    let mut sorted = values.to_vec();
    sorted.sort();
    sorted.get(sorted.len() / 2).copied()
}

/// Memory must not grow once warmed up: the median of the last quarter of
/// the run may exceed the second quarter's by 25% + 16 MiB at most (caches
/// and allocator slack), not more.
fn judge_memory(rss_kib: &[u64], notes: &mut Vec<String>) -> usize {
    let profile = MemoryProfile {
        rss_kib: rss_kib.to_vec(),
    };
    let Some((warm, late)) = profile.warm_and_end() else {
        notes.push(format!("only {} memory samples", rss_kib.len()));
        return 1;
    };
    notes.push(profile.to_string());
    usize::from(late > warm + warm / 4 + 16 * 1024)
}

/// Lag must not grow: the second half's median may not exceed the first
/// half's by more than one second of traffic.
fn judge_lag(lag: &[i64], rate: u32, notes: &mut Vec<String>) -> usize {
    let half = lag.len() / 2;
    let (Some(first), Some(second)) = (median(&lag[..half]), median(&lag[half..])) else {
        notes.push(format!("only {} lag samples", lag.len()));
        return 1;
    };
    notes.push(format!(
        "claims lag median {first} then {second}, max {}",
        lag.iter().max().copied().unwrap_or(0)
    ));
    usize::from(second > first + i64::from(rate))
}

/// Buys `code`, retrying through outages on the same order id. True when
/// the answer was 200 (redeemed).
async fn purchase(http: &reqwest::Client, base: &str, user: &str, code: &str, order: &str) -> bool {
    let deadline = Instant::now() + CLIENT_PATIENCE;
    loop {
        let attempt = http
            .post(format!("{base}/api/v1/purchase"))
            .json(&json!({"user_id": user, "coupon_code": code, "order_id": order}))
            .send()
            .await;
        match attempt {
            Ok(response) if !matches!(response.status().as_u16(), 502..=504) => {
                return response.status() == 200
            }
            _ if Instant::now() >= deadline => return false,
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
