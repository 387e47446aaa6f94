//! `couponctl bench`: the benchmark suite (`make bench`).
//!
//! Everything runs on this machine in this process: the system under test
//! (every role, as `couponctl run`), the load generator, and the baselines
//! that bound it, measured in the same run so the ratios survive a noisy
//! machine. The system starts from empty state: a fresh database and fresh
//! topic and Redis prefixes, dropped at the end.
//!
//! Scenarios: a bare request/reply echo through the broker (the floor of any
//! claim: two broker hops), a bare HTTP handler doing `SELECT 1`, the
//! allocation statement alone and batched, the flash sale through HTTP, a
//! 100,000-coupon release, and replaying the topics to JSON lines and Parquet.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
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

use crate::app::{self, AppConfig, Role};
use steady::{steady_rates, SteadyLoad};

mod as_run;
mod grant_path;
mod plot;
pub mod profile;
pub mod shard;
mod steady;
mod targets;
mod vegeta;
mod wrk;

pub use targets::render_targets;

/// Claims in each sharding row (fewer when the flash sale is smaller).
const SHARD_CLAIMS: usize = 100_000;

/// The scale rows' users for each coupon, as in the full flash sale
/// (10,000 coupons for 1,000,000 users).
const SCALE_USERS_PER_COUPON: usize = 100;

/// The rate of the latency target (claims/s, open loop).
const STEADY_TARGET_RATE: f64 = 5_000.0;

#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Distinct users in the flash sale.
    pub users: usize,
    /// Coupons in the flash sale's pool.
    pub coupons: u32,
    /// Coupons in the release scenario.
    pub release: u32,
    /// HTTP requests in flight at once.
    pub concurrency: usize,
    /// How long the steady day runs.
    pub steady: Duration,
    /// Where to write the flash sale's plot over time (SVG), if anywhere.
    pub plot: Option<std::path::PathBuf>,
    /// The Postgres servers of the sharding rows (`make shard-up`); with
    /// fewer than two the rows are left out.
    pub shard_urls: Vec<String>,
    /// Only the rows of `couponctl run` driven by `wrk` ([`as_run`]).
    pub as_run_only: bool,
    /// The scale rows: only the flash sale, once for each of these numbers
    /// of users, each in a fresh database with fresh topics, with a coupon
    /// for one user in a hundred.
    pub scale: Vec<usize>,
}

impl BenchOptions {
    pub fn quick() -> Self {
        Self {
            users: 20_000,
            coupons: 10_000,
            release: 100_000,
            concurrency: 128,
            steady: Duration::from_secs(10),
            plot: None,
            shard_urls: Vec::new(),
            as_run_only: false,
            scale: Vec::new(),
        }
    }

    pub fn full() -> Self {
        Self {
            users: 1_000_000,
            steady: Duration::from_secs(60),
            ..Self::quick()
        }
    }
}

/// What a row measured, so the targets table can find its figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    Echo,
    Healthz,
    Release,
    Allocation,
    FlashSale,
    /// The latency target's load: 5,000 claims/s, one in ten winning.
    SteadySale,
    /// Half the claims winning, at the rate the grant path sustains.
    SteadyDay,
    /// `couponctl replay` to JSON lines.
    Replay,
    /// `couponctl replay` to Parquet.
    ReplayParquet,
    Rebuild,
    /// The claim processor on one Postgres server, then on two shards.
    Sharding,
    /// The flash sale alone at one of several numbers of users (`BENCH_SCALE`).
    Scale,
    /// `/healthz` driven by `wrk`, when it is installed: the check that our
    /// generator is not what bounds the HTTP rows.
    Wrk,
    /// `couponctl run` in its own process as the README starts it, claims
    /// driven by `wrk` from outside (see `as_run`).
    AsRunClaims,
    /// `/healthz` of that same process, driven by `wrk`.
    AsRunHealthz,
    /// That process under the steady sale's load, sent by `vegeta` (open
    /// loop) from outside.
    AsRunSteadySale,
    /// That process under the steady day's load, sent by `vegeta`.
    AsRunSteadyDay,
    /// That process granting as fast as it can: `wrk` (closed loop), every
    /// claim finding a coupon. The capacity the overload row doubles.
    AsRunGrants,
    /// That process sent twice its grant capacity by `vegeta`.
    AsRunOverload,
}

impl Scenario {
    /// Whether the row ran `couponctl run` in a process of its own, with
    /// the default logging, rather than in the bench's process.
    pub fn runs_as_users_run(self) -> bool {
        matches!(
            self,
            Self::AsRunClaims
                | Self::AsRunHealthz
                | Self::AsRunSteadySale
                | Self::AsRunSteadyDay
                | Self::AsRunGrants
                | Self::AsRunOverload
        )
    }
}

/// One row of the results table.
#[derive(Debug, Clone)]
pub struct Row {
    pub kind: Scenario,
    pub scenario: String,
    pub operations: u64,
    pub seconds: f64,
    pub latencies: Option<Latencies>,
    pub note: String,
    /// The process's memory while the row ran (the flash sale samples it).
    pub memory: Option<profile::MemoryProfile>,
    /// The figures of an open-loop row driven from outside, which its
    /// targets are judged on.
    pub open_loop: Option<as_run::OpenLoop>,
}

#[derive(Debug, Clone, Copy)]
pub struct Latencies {
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Latencies {
    /// `p50 … / p99 … ms` of `latencies`, or `-` when there were none.
    fn brief(latencies: Option<Self>) -> String {
        latencies.map_or("-".to_owned(), |l| {
            format!(
                "p50 {:.1} / p99 {:.1} ms",
                l.p50.as_secs_f64() * 1e3,
                l.p99.as_secs_f64() * 1e3
            )
        })
    }

    fn of(mut samples: Vec<Duration>) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Some(Self {
            p50: at(0.50),
            p99: at(0.99),
            max: samples[samples.len() - 1],
        })
    }
}

impl Row {
    pub fn throughput(&self) -> f64 {
        self.operations as f64 / self.seconds.max(1e-9)
    }
}

/// Runs every scenario and returns the table rows, baselines first.
pub async fn run(base: AppConfig, options: BenchOptions) -> anyhow::Result<Vec<Row>> {
    // Before the scratch database exists, so a missing service leaves nothing behind.
    app::check_services(&base).await?;
    if options.as_run_only {
        return as_run::as_run(&base, options.coupons, options.concurrency.max(256)).await;
    }
    if !options.scale.is_empty() {
        let mut rows = Vec::new();
        for &users in &options.scale {
            eprintln!("bench: scale, the flash sale with {users} users");
            // One user in a hundred wins at every size, so each run has the
            // same mix (the grant path's share of the work) and only the
            // number of users grows.
            let options = BenchOptions {
                users,
                coupons: u32::try_from(users / SCALE_USERS_PER_COUPON)
                    .unwrap_or(u32::MAX)
                    .max(1),
                plot: None,
                ..options.clone()
            };
            rows.extend(in_scratch(&base, &options).await?);
        }
        return Ok(rows);
    }
    in_scratch(&base, &options).await
}

/// The scenarios against a fresh database, topic and Redis prefixes, all
/// dropped after.
async fn in_scratch(base: &AppConfig, options: &BenchOptions) -> anyhow::Result<Vec<Row>> {
    let stamp = chrono::Utc::now().format("%Y%m%d%H%M%S").to_string();
    let scratch =
        app::ScratchDatabase::create(&base.database_url, &format!("coupons_bench_{stamp}")).await?;
    let mut config = base.clone();
    config.database_url = scratch.url.clone();
    config.topic_prefix = format!("bench{stamp}");
    config.redis_prefix = config.topic_prefix.clone();
    config.http_addr = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    config.gateway.admin_token = Some(uuid::Uuid::new_v4().to_string().into());
    // As wherever the storefront is not open: every claim carries the token
    // (and pays for its check and the flood check).
    config.gateway.api_token = Some(uuid::Uuid::new_v4().to_string().into());
    config.gateway.reply_timeout = Duration::from_secs(60);
    config.gateway.max_in_flight = 1 << 20;
    config.gateway.max_waiting = 1 << 20;
    config.db_max_connections = 16;

    let result = scenarios(&config, options).await;
    scratch.drop_now().await?;
    forget_run(&config).await;
    result
}

/// Deletes the run's topics and Redis keys: with its database gone they
/// are of no use, and a broker keeping every run's partitions (a full run
/// writes gigabytes) takes minutes to start. Best effort.
pub(super) async fn forget_run(config: &AppConfig) {
    let own = format!("{}.", config.topic_prefix);
    match coupon_platform::kafka::admin::delete_topics_where(&config.kafka, |name| {
        name.starts_with(&own)
    })
    .await
    {
        Ok(deleted) => eprintln!("bench: deleted the run's {deleted} topics"),
        Err(error) => eprintln!("bench: the run's topics stay on the broker: {error}"),
    }
    if let Ok(cache) =
        coupon_platform::redis::Cache::connect(&config.redis_url, &config.redis_prefix).await
    {
        let _ = cache.clear().await;
    }
}

async fn scenarios(config: &AppConfig, options: &BenchOptions) -> anyhow::Result<Vec<Row>> {
    if !options.scale.is_empty() {
        return scale_row(config, options).await.map(|row| vec![row]);
    }
    let mut rows = Vec::new();
    eprintln!("bench: baselines");
    rows.push(
        profiled(echo(config, 20_000, options.concurrency))
            .await
            .context("the broker echo baseline")?,
    );

    eprintln!("bench: couponctl run as users run it, driven by wrk");
    rows.extend(
        as_run::as_run(config, options.coupons, options.concurrency.max(256))
            .await
            .context("the rows of couponctl run driven by wrk")?,
    );

    let UnderTest {
        token,
        running,
        pool,
        base,
        http,
        generator,
        on_generator,
    } = UnderTest::start(config, options).await?;
    rows.extend(http_baselines(&on_generator, &http, &base, options.concurrency).await?);

    eprintln!("bench: release of {} coupons", options.release);
    rows.push(
        profiled(release(config, &pool, "Release", options.release))
            .await
            .context("the release")?,
    );
    rows.extend(allocation_baselines(&pool).await?);

    eprintln!(
        "bench: flash sale, {} users for {} coupons",
        options.users, options.coupons
    );
    release(config, &pool, "Flash", options.coupons).await?;
    let (gen_http, gen_base, gen_pool, gen_options) =
        (http.clone(), base.clone(), pool.clone(), options.clone());
    let flash = profiled(grant_path::noted(async {
        on_generator
            .spawn(async move { flash_sale(&gen_http, &gen_base, &gen_pool, &gen_options).await })
            .await?
    }))
    .await
    .context("the flash sale")?;
    let steady = steady_rates(&rows, flash.throughput());
    rows.push(flash);
    for (mix, rate) in steady {
        eprintln!("bench: {} at {rate:.0} claims/s", mix.label);
        let steady = SteadyLoad {
            http: http.clone(),
            base: base.clone(),
            config: config.clone(),
            pool: pool.clone(),
            rate,
            duration: options.steady,
            mix,
        };
        rows.push(
            profiled(grant_path::noted(async {
                on_generator.spawn(steady.run()).await?
            }))
            .await?,
        );
    }
    drop(generator);

    rows.extend(sharding_rows(config, &running.context, options).await?);
    eprintln!("bench: replay");
    rows.push(profiled(replay(config, false)).await?);
    rows.push(profiled(replay(config, true)).await?);
    token.cancel();
    running.wait().await?;
    eprintln!("bench: rebuild");
    rows.push(rebuild(config).await?);
    Ok(rows)
}

/// Every role of `couponctl run` in this process, and what drives it: the
/// storefront's client and the HTTP load generator, which runs on threads
/// of its own (named `bench-gen`) so each row can say how much of the
/// machine it took.
struct UnderTest {
    token: CancellationToken,
    running: app::Running,
    pool: PgPool,
    base: String,
    http: reqwest::Client,
    generator: Generator,
    on_generator: tokio::runtime::Handle,
}

impl UnderTest {
    async fn start(config: &AppConfig, options: &BenchOptions) -> anyhow::Result<Self> {
        let token = CancellationToken::new();
        let running = app::start(config.clone(), &Role::ALL, token.clone()).await?;
        let pool = running.context.pool.clone();
        let base = format!("http://{}", running.http_addr.context("no gateway")?);
        let http = storefront_client(config, options.concurrency)?;
        let generator = Generator::start()?;
        let on_generator = generator.handle().context("the load generator")?;
        Ok(Self {
            token,
            running,
            pool,
            base,
            http,
            generator,
            on_generator,
        })
    }
}

/// A scale row: the flash sale alone, with `options.users` users, as in
/// the full run (every role in this process, the same generator).
async fn scale_row(config: &AppConfig, options: &BenchOptions) -> anyhow::Result<Row> {
    let UnderTest {
        token,
        running,
        pool,
        base,
        http,
        generator,
        on_generator,
    } = UnderTest::start(config, options).await?;
    release(config, &pool, "Flash", options.coupons).await?;
    let (gen_pool, gen_options) = (pool.clone(), options.clone());
    let flash = profiled(async {
        on_generator
            .spawn(async move { flash_sale(&http, &base, &gen_pool, &gen_options).await })
            .await?
    })
    .await
    .context("the flash sale");
    drop(generator);
    token.cancel();
    running.wait().await?;
    let mut flash = flash?;
    flash.kind = Scenario::Scale;
    Ok(flash)
}

/// `/healthz` driven by the bench's own generator and by `wrk`: what the
/// HTTP path costs before any claim, and proof the generator is not the
/// bound.
async fn http_baselines(
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

/// The HTTP client of the load: the storefront's token on every request,
/// as a storefront sends it.
fn storefront_client(config: &AppConfig, concurrency: usize) -> anyhow::Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = &config.gateway.api_token {
        let bearer = format!("Bearer {}", token.expose());
        headers.insert(
            reqwest::header::AUTHORIZATION,
            reqwest::header::HeaderValue::from_str(&bearer).context("the storefront token")?,
        );
    }
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .timeout(Duration::from_secs(120))
        .default_headers(headers)
        .build()?)
}

/// The sharding rows, when BENCH_SHARD_URLS names two servers or more.
async fn sharding_rows(
    config: &AppConfig,
    context: &coupon_consumers::Context,
    options: &BenchOptions,
) -> anyhow::Result<Vec<Row>> {
    if options.shard_urls.len() < 2 {
        eprintln!("bench: no sharding rows (BENCH_SHARD_URLS names fewer than two servers)");
        return Ok(Vec::new());
    }
    let claims = options.users.min(SHARD_CLAIMS);
    eprintln!(
        "bench: sharding, {claims} claims on 1 then {} Postgres servers",
        options.shard_urls.len()
    );
    shard::sharding(config, context, &options.shard_urls, claims)
        .await
        .context("the sharding rows")
}

/// The load generator's runtime, shut down without blocking when dropped:
/// a step that fails (its `?`) drops it inside async code, where dropping a
/// runtime the ordinary way panics and would hide the step's own error.
struct Generator(Option<tokio::runtime::Runtime>);

impl Generator {
    fn start() -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(profile::GENERATOR_THREAD)
            .enable_all()
            .build()
            .context("starting the load generator's runtime")?;
        Ok(Generator(Some(runtime)))
    }

    fn handle(&self) -> Option<tokio::runtime::Handle> {
        self.0.as_ref().map(|runtime| runtime.handle().clone())
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Runs an outside tool (`wrk`, `vegeta`) to its end: its output, `None`
/// when it is not installed, an error with its standard error when it fails.
async fn run_tool(
    command: &mut tokio::process::Command,
    tool: &str,
) -> anyhow::Result<Option<std::process::Output>> {
    let output = match command.output().await {
        Ok(output) => output,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error).with_context(|| format!("running {tool}")),
    };
    if !output.status.success() {
        bail!(
            "{tool} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(Some(output))
}

/// Runs one scenario and notes, in its row, where the machine's CPU went
/// while it ran (see [`profile`]).
async fn profiled(
    scenario: impl std::future::Future<Output = anyhow::Result<Row>>,
) -> anyhow::Result<Row> {
    let before = profile::CpuSample::now();
    let mut row = scenario.await?;
    if let Some(profile) = profile::since(before) {
        row.note = if row.note.is_empty() {
            profile
        } else {
            format!("{}; {profile}", row.note)
        };
    }
    Ok(row)
}

/// Two broker hops with the claim path's client settings: the client
/// publishes a request, an echo service consumes it and publishes a reply,
/// the client consumes the reply.
async fn echo(config: &AppConfig, requests: usize, concurrency: usize) -> anyhow::Result<Row> {
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
    Ok(Some(Row {
        kind: Scenario::Wrk,
        memory: None,
        open_loop: None,
        scenario: "baseline: /healthz driven by wrk".into(),
        operations: summary.requests,
        seconds: summary.requests as f64 / summary.per_second.max(1e-9),
        latencies: Some(Latencies {
            p50: summary.p50,
            p99: summary.p99,
            max: summary.max,
        }),
        note,
    }))
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

/// GETs every URL, `concurrency` at a time, and returns each latency; fails
/// on an unexpected status. The URLs are made as they are sent and the
/// latencies land in one vector reserved up front, so the generator's own
/// memory stays 16 bytes per answer and does not blur the system's memory
/// figure.
async fn load(
    http: &reqwest::Client,
    urls: impl ExactSizeIterator<Item = String>,
    concurrency: usize,
    ok: impl Fn(u16) -> bool + Copy,
    mut timeline: Option<&mut plot::Timeline>,
) -> anyhow::Result<Vec<Duration>> {
    let total = urls.len();
    let bar = indicatif::ProgressBar::new(total as u64);
    let mut answers = stream::iter(urls)
        .map(|url| {
            let bar = bar.clone();
            async move {
                let sent = Instant::now();
                let response = http.get(&url).send().await?;
                let status = response.status().as_u16();
                let _ = response.bytes().await;
                bar.inc(1);
                if !ok(status) {
                    bail!("{url} answered {status}");
                }
                Ok(sent.elapsed())
            }
        })
        .buffer_unordered(concurrency);
    let mut latencies = plot::touched_buffer(total);
    while let Some(answer) = answers.next().await {
        let latency = answer?;
        if let Some(timeline) = timeline.as_deref_mut() {
            timeline.record(latency);
        }
        latencies.push(latency);
    }
    bar.finish_and_clear();
    Ok(latencies)
}

async fn release(
    config: &AppConfig,
    pool: &PgPool,
    category: &str,
    count: u32,
) -> anyhow::Result<Row> {
    let publisher = Publisher::new(&config.kafka, "bench-release")?;
    let started = Instant::now();
    let batch = issue(config, pool, &publisher, category, count).await?;
    let published = started.elapsed();
    // Projected into `coupons` and into the history. A batch is one
    // partition, which the projector and the history sink each write in
    // order, so the last coupon in a table means the batch is: watch for it
    // with a look-up by key (counting the category while it fills cost
    // Postgres more than a tenth of a core), then count once to be sure.
    let last = *batch.codes.last().context("an empty release")?;
    let last_text = last.to_string();
    let category = Category::parse(category)?;
    let (mut in_coupons, mut in_history) = (None, None);
    loop {
        if in_coupons.is_none() && store::coupons::find(pool, last).await?.is_some() {
            in_coupons = Some(started.elapsed());
        }
        if in_history.is_none()
            && !store::history::entries(pool, None, Some(&last_text), None, None)
                .await?
                .is_empty()
        {
            in_history = Some(started.elapsed());
        }
        if in_coupons.is_some() && in_history.is_some() {
            let projected = store::coupons::count_in_category(pool, &category).await?;
            if projected == i64::from(count) {
                break;
            }
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("release not projected after 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let at = |d: Option<Duration>| d.map_or(0.0, |d| d.as_secs_f64());
    Ok(Row {
        kind: Scenario::Release,
        memory: None,
        open_loop: None,
        scenario: format!("release: issue {count} until projected"),
        operations: u64::from(count),
        seconds,
        latencies: None,
        note: format!(
            "published in {:.2}s, in coupons at {:.2}s, in the history at {:.2}s",
            published.as_secs_f64(),
            at(in_coupons),
            at(in_history)
        ),
    })
}

/// The allocation statement straight against Postgres: one claim per
/// transaction, then 500 per transaction (as the claim processor batches).
async fn allocation_baselines(pool: &PgPool) -> anyhow::Result<Vec<Row>> {
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

async fn flash_sale(
    http: &reqwest::Client,
    base: &str,
    pool: &PgPool,
    options: &BenchOptions,
) -> anyhow::Result<Row> {
    let urls =
        (0..options.users).map(|i| format!("{base}/api/v1/coupon?id=fan-{i}&category=Flash"));
    let memory = profile::MemorySampler::start(Duration::from_millis(500));
    let started = Instant::now();
    let mut timeline = plot::Timeline::new(started, options.users);
    let latencies = load(
        http,
        urls,
        options.concurrency,
        |s| s == 200 || s == 404,
        Some(&mut timeline),
    )
    .await?;
    let seconds = started.elapsed().as_secs_f64();
    let memory = memory.finish().await;
    let (granted, distinct_holders) =
        store::coupons::held_in_category(pool, &Category::parse("Flash")?).await?;
    // A claim answered sold out from the cache is decided on the log after
    // its answer: give the processor a moment to record the last of them.
    let deadline = Instant::now() + Duration::from_secs(60);
    let decisions: i64 = loop {
        let decisions = store::decisions::claim_decisions_of_users_like(pool, "fan-").await?;
        if decisions >= options.users as i64 || Instant::now() > deadline {
            break decisions;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The figure is claims *decided* per second: until the last decision
    // is stored, not only answered.
    let answered_in = seconds;
    let seconds = started.elapsed().as_secs_f64();
    let mut plotted = String::new();
    if let Some(path) = &options.plot {
        let title = format!(
            "flash sale: {} users, {} coupons, {} in flight, answers/s and latency per second",
            options.users, options.coupons, options.concurrency
        );
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(path, plot::svg(&title, &timeline.seconds()))
            .with_context(|| format!("writing the plot to {}", path.display()))?;
        plotted = format!("; plot in {}", path.display());
    }
    let expected = options.users.min(options.coupons as usize) as i64;
    if granted != expected || distinct_holders != granted || decisions != options.users as i64 {
        bail!("flash sale broke an invariant: {granted} held (expected {expected}), {distinct_holders} holders, {decisions} decisions");
    }
    Ok(Row {
        kind: Scenario::FlashSale,
        memory: Some(memory.clone()),
        open_loop: None,
        scenario: format!(
            "flash sale: {} users, {} coupons, HTTP",
            options.users, options.coupons
        ),
        operations: latencies.len() as u64,
        seconds,
        latencies: Latencies::of(latencies),
        note: format!(
            "{granted} granted to {distinct_holders} users, 0 double allocations, 0 lost; all answered in {answered_in:.1} s, all decided in {seconds:.1} s; {memory}{plotted}"
        ),
    })
}

/// Publishes a release of `count` coupons without waiting for it to be
/// projected (the steady sale's supply, which claims race).
async fn issue(
    config: &AppConfig,
    pool: &PgPool,
    publisher: &Publisher,
    category: &str,
    count: u32,
) -> anyhow::Result<coupon_producers::issue::IssuedBatch> {
    let request = coupon_producers::issue::IssueRequest {
        employee: coupon_domain::EmployeeId::parse("bench")?,
        category: coupon_domain::Category::parse(category)?,
        count,
        campaign: None,
    };
    Ok(
        coupon_producers::issue::issue(pool, publisher, &config.topics(), 2, &request, |_| {})
            .await?,
    )
}

/// `couponctl replay` of the claim path and the release (created, claims,
/// claim-results) as an analyst runs it: every record decoded and written
/// out, as JSON lines (to a writer that drops them, so no disk is measured)
/// or as a Parquet file (in the temporary directory, removed after).
async fn replay(config: &AppConfig, parquet: bool) -> anyhow::Result<Row> {
    use coupon_analyst::replay::{self, JsonLines, ReplayOptions, TopicKind};
    let topics = config.topics();
    let kafka = config.kafka.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<Row> {
        let options = ReplayOptions {
            kinds: vec![
                TopicKind::Created,
                TopicKind::Claims,
                TopicKind::ClaimResults,
            ],
            ..ReplayOptions::default()
        };
        let bar = indicatif::ProgressBar::hidden();
        let (summary, format) = if parquet {
            let path = std::env::temp_dir().join(format!(
                "couponctl-bench-replay-{}.parquet",
                uuid::Uuid::new_v4().simple()
            ));
            let summary =
                coupon_analyst::parquet_export::ParquetSink::create(&path).and_then(|mut sink| {
                    replay::replay_into(&kafka, &topics, &options, &mut sink, &bar)
                });
            let _ = std::fs::remove_file(&path);
            (summary?, "Parquet")
        } else {
            let mut out = std::io::sink();
            let summary =
                replay::replay_into(&kafka, &topics, &options, &mut JsonLines(&mut out), &bar)?;
            (summary, "JSON lines")
        };
        Ok(Row {
            kind: if parquet {
                Scenario::ReplayParquet
            } else {
                Scenario::Replay
            },
            memory: None,
            open_loop: None,
            scenario: format!("replay: created + claims + claim-results to {format}"),
            operations: summary.read,
            seconds: summary.seconds,
            latencies: None,
            note: "records read, decoded and written".into(),
        })
    })
    .await?
}

/// `couponctl replay --rebuild` of the whole log into a scratch database.
async fn rebuild(config: &AppConfig) -> anyhow::Result<Row> {
    let stamp = chrono::Utc::now().format("%Y%m%d%H%M%S").to_string();
    let scratch = app::ScratchDatabase::create(
        &config.database_url,
        &format!("coupons_bench_rebuild_{stamp}"),
    )
    .await?;
    let pool = coupon_platform::db::connect(&scratch.url, 4).await?;
    let stats = coupon_analyst::rebuild::rebuild(
        &config.kafka,
        &config.topics(),
        config.policy.quota_window,
        &pool,
        indicatif::ProgressBar::hidden(),
    )
    .await;
    pool.close().await;
    scratch.drop_now().await?;
    let stats = stats?;
    Ok(Row {
        kind: Scenario::Rebuild,
        memory: None,
        open_loop: None,
        scenario: "rebuild: the log into a fresh database".into(),
        operations: stats.events,
        seconds: stats.seconds(),
        latencies: None,
        note: format!(
            "outcome events; {} coupons, {} history rows written",
            stats.coupons, stats.history_rows
        ),
    })
}

/// The table, with each throughput as a ratio of the echo baseline.
pub fn render(rows: &[Row]) -> String {
    let echo = rows
        .iter()
        .find(|r| r.kind == Scenario::Echo)
        .map(Row::throughput);
    let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1000.0);
    let mut out = format!(
        "| {:<48} | {:>9} | {:>10} | {:>7} | {:>7} | {:>7} | {:>8} | {}\n|{}|\n",
        "scenario",
        "ops",
        "ops/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "vs echo",
        "note",
        "-".repeat(140)
    );
    for row in rows {
        let (p50, p99, max) = match row.latencies {
            Some(l) => (ms(l.p50), ms(l.p99), ms(l.max)),
            None => ("-".into(), "-".into(), "-".into()),
        };
        out.push_str(&format!(
            "| {:<48} | {:>9} | {:>10.0} | {:>7} | {:>7} | {:>7} | {:>8} | {}\n",
            row.scenario,
            row.operations,
            row.throughput(),
            p50,
            p99,
            max,
            echo.map_or("-".to_owned(), |echo| format!(
                "{:.2}x",
                row.throughput() / echo
            )),
            row.note
        ));
    }
    if rows.iter().any(|r| !r.kind.runs_as_users_run()) {
        out.push_str(
            "\nlogging: the rows marked default logging ran `couponctl run` in a process of its own, \
             as the README starts it; the other rows ran in this process at `warn` (the bench prints its own progress)\n",
        );
    }
    out
}
