//! The baselines that bound the claim path, measured in the same run: a
//! request/reply echo through the broker (two broker hops, the floor of any
//! claim), `/healthz` driven by the bench's generator and by `wrk`, and the
//! allocation statement alone, one claim and then 500 per transaction.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use coupon_domain::{Category, UserId};
use coupon_platform::kafka::{ensure_topics, Publisher, TopicSpec};
use coupon_platform::store;

use super::flash::load;
use super::{profile, profiled, wrk, Latencies, Row, Scenario};
use crate::app::AppConfig;

/// Two broker hops with the claim path's client settings: the client
/// publishes a request, an echo service consumes it and publishes a reply,
/// the client consumes the reply.
pub(super) async fn echo(
    config: &AppConfig,
    requests: usize,
    concurrency: usize,
) -> anyhow::Result<Row> {
    let requests_topic = format!("{}.bench-echo-requests", config.topic_prefix);
    let replies_topic = format!("{}.bench-echo-replies", config.topic_prefix);
    let specs: Vec<TopicSpec> = [&requests_topic, &replies_topic]
        .iter()
        .map(|name| TopicSpec {
            name: (*name).clone(),
            partitions: config.partitions,
            replication: config.replication,
            configs: Vec::new(),
        })
        .collect();
    ensure_topics(&config.kafka, &specs).await?;
    let publisher = Publisher::new(&config.kafka, "bench-echo")?;
    let echo_in = assigned_consumer(config, &requests_topic).await?;
    let replies_in = assigned_consumer(config, &replies_topic).await?;
    let stop = CancellationToken::new();

    let echo_publisher = publisher.clone();
    let echo_topic = replies_topic.clone();
    let echo_stop = stop.clone();
    let echo_task = tokio::spawn(async move {
        loop {
            let message = tokio::select! {
                _ = echo_stop.cancelled() => break,
                m = echo_in.recv() => m,
            };
            if let Ok(message) = message {
                let payload = message.payload().unwrap_or_default().to_vec();
                let key = message.key().unwrap_or_default().to_vec();
                let publisher = echo_publisher.clone();
                let topic = echo_topic.clone();
                tokio::spawn(
                    async move { publisher.send_bytes(&topic, Some(&key), &payload).await },
                );
            }
        }
    });
    let waiters: Arc<Mutex<HashMap<Vec<u8>, oneshot::Sender<()>>>> = Arc::default();
    let reply_waiters = waiters.clone();
    let reply_stop = stop.clone();
    let reply_task = tokio::spawn(async move {
        loop {
            let message = tokio::select! {
                _ = reply_stop.cancelled() => break,
                m = replies_in.recv() => m,
            };
            if let Ok(message) = message {
                let id = message.payload().unwrap_or_default().to_vec();
                let sender = reply_waiters.lock().ok().and_then(|mut w| w.remove(&id));
                if let Some(sender) = sender {
                    let _ = sender.send(());
                }
            }
        }
    });

    let started = Instant::now();
    let latencies: Vec<Duration> = stream::iter(0..requests)
        .map(|i| {
            let publisher = publisher.clone();
            let waiters = waiters.clone();
            let topic = requests_topic.clone();
            async move {
                let id = format!("echo-{i}").into_bytes();
                let (tx, rx) = oneshot::channel();
                if let Ok(mut w) = waiters.lock() {
                    w.insert(id.clone(), tx);
                }
                let sent = Instant::now();
                publisher.send_bytes(&topic, Some(&id), &id).await.ok()?;
                tokio::time::timeout(Duration::from_secs(30), rx)
                    .await
                    .ok()?
                    .ok()?;
                Some(sent.elapsed())
            }
        })
        .buffer_unordered(concurrency)
        .filter_map(|latency| async move { latency })
        .collect()
        .await;
    let seconds = started.elapsed().as_secs_f64();
    stop.cancel();
    let _ = echo_task.await;
    let _ = reply_task.await;
    let lost = requests - latencies.len();
    Ok(Row {
        kind: Scenario::Echo,
        memory: None,
        open_loop: None,
        scenario: "baseline: broker request/reply echo".into(),
        operations: latencies.len() as u64,
        seconds,
        latencies: Latencies::of(latencies),
        note: format!(
            "2 broker hops, {}ms fetch wait, {lost} lost",
            config.fast_fetch_wait_ms
        ),
    })
}

async fn assigned_consumer(config: &AppConfig, topic: &str) -> anyhow::Result<StreamConsumer> {
    let mut client = config.kafka.client_config();
    client
        .set(
            "group.id",
            format!(
                "{}.bench-{}",
                config.topic_prefix,
                uuid::Uuid::new_v4().simple()
            ),
        )
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", config.fast_fetch_wait_ms.to_string());
    let consumer: StreamConsumer = client.create()?;
    let topic = topic.to_owned();
    let partitions = config.partitions;
    tokio::task::spawn_blocking(move || -> anyhow::Result<StreamConsumer> {
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            let (_, high) = consumer.fetch_watermarks(&topic, p, Duration::from_secs(10))?;
            tpl.add_partition_offset(&topic, p, Offset::Offset(high))?;
        }
        consumer.assign(&tpl)?;
        Ok(consumer)
    })
    .await?
}

/// `/healthz` driven by the bench's own generator and by `wrk`: what the
/// HTTP path costs before any claim, and proof the generator is not the
/// bound.
pub(super) async fn http_baselines(
    on_generator: &tokio::runtime::Handle,
    http: &reqwest::Client,
    base: &str,
    concurrency: usize,
) -> anyhow::Result<Vec<Row>> {
    let (gen_http, gen_base) = (http.clone(), base.to_owned());
    let mut rows = vec![
        profiled(async {
            on_generator
                .spawn(
                    async move { http_baseline(&gen_http, &gen_base, 20_000, concurrency).await },
                )
                .await?
        })
        .await?,
    ];
    rows.extend(wrk_baseline(base, concurrency).await?);
    Ok(rows)
}

async fn http_baseline(
    http: &reqwest::Client,
    base: &str,
    requests: usize,
    concurrency: usize,
) -> anyhow::Result<Row> {
    let started = Instant::now();
    let latencies = load(
        http,
        (0..requests).map(|_| format!("{base}/healthz")),
        concurrency,
        |s| s == 200,
        None,
    )
    .await?;
    Ok(Row {
        kind: Scenario::Healthz,
        memory: None,
        open_loop: None,
        scenario: "baseline: HTTP handler, SELECT 1".into(),
        operations: latencies.len() as u64,
        seconds: started.elapsed().as_secs_f64(),
        latencies: Latencies::of(latencies),
        note: "GET /healthz (Postgres SELECT 1 + Redis PING)".into(),
    })
}

/// `wrk` on `/healthz` for 10 s with as many connections as our generator
/// keeps in flight; `None` when `wrk` is not installed (`make setup`
/// installs it). Its own CPU share is in the row's note (`wrk`).
async fn wrk_baseline(base: &str, concurrency: usize) -> anyhow::Result<Option<Row>> {
    let url = format!("{base}/healthz");
    let connections = concurrency.max(2);
    let before = profile::CpuSample::now();
    let Some(summary) = wrk::run(connections, 10, &[&url]).await? else {
        return Ok(None);
    };
    let mut note = format!("wrk -t2 -c{connections} -d10s; {} non-2xx", summary.non_2xx);
    if let Some(cpu) = profile::since(before) {
        note = format!("{note}; {cpu}");
    }
    Ok(Some(summary.row(
        Scenario::Wrk,
        "baseline: /healthz driven by wrk",
        note,
    )))
}

/// The allocation statement straight against Postgres: one claim per
/// transaction, then 500 per transaction (as the claim processor batches).
pub(super) async fn allocation_baselines(pool: &PgPool) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let release = Category::parse("Release")?;
    for (label, per_tx, total) in [
        (
            "single-row allocation, 1 per transaction",
            1usize,
            5_000usize,
        ),
        ("batched allocation, 500 per transaction", 500, 20_000),
    ] {
        let started = Instant::now();
        let mut done = 0;
        while done < total {
            let mut tx = pool.begin().await?;
            for _ in 0..per_tx {
                let holder = UserId::parse(format!("alloc-bench-{per_tx}-{done}"))?;
                store::coupons::hold_one(&mut tx, &release, &holder).await?;
                done += 1;
            }
            tx.commit().await?;
        }
        rows.push(Row {
            kind: Scenario::Allocation,
            memory: None,
            open_loop: None,
            scenario: format!("baseline: {label}"),
            operations: total as u64,
            seconds: started.elapsed().as_secs_f64(),
            latencies: None,
            note: "SKIP LOCKED pick + conditional update".into(),
        });
    }
    store::coupons::release_all_held(pool, &release).await?;
    Ok(rows)
}
