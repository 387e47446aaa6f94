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

use std::time::Duration;

use anyhow::{bail, Context as _};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::app::{self, AppConfig, Role};
use baselines::{allocation_baselines, echo, http_baselines};
use flash::scale_row;
use release::release;
use replay::{rebuild, replay};
use steady::{steady_rates, SteadyLoad};

mod as_run;
mod baselines;
mod flash;
mod grant_path;
mod plot;
pub mod profile;
mod release;
mod replay;
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
    /// Claims a day in the 29 days loaded before the day-30 rows of
    /// `couponctl run` (0 leaves those rows out).
    pub day30_per_day: usize,
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
            day30_per_day: 4_000,
        }
    }

    pub fn full() -> Self {
        Self {
            users: 1_000_000,
            steady: Duration::from_secs(60),
            // A fifth of the seed's million a day, as the retention bench:
            // 29 days of it are about 4 GB with the history.
            day30_per_day: 200_000,
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
    /// The flash sale by `wrk` again, after a month of decisions, quota
    /// slots and history was loaded into that process's database.
    AsRunClaimsDay30,
    /// The steady sale by `vegeta` again, on that month.
    AsRunSteadySaleDay30,
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
                | Self::AsRunClaimsDay30
                | Self::AsRunSteadySaleDay30
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
        return as_run::as_run(
            &base,
            options.coupons,
            options.concurrency.max(256),
            options.day30_per_day,
        )
        .await;
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
        as_run::as_run(
            config,
            options.coupons,
            options.concurrency.max(256),
            options.day30_per_day,
        )
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
    let flash =
        flash::released_and_run(config, options, &pool, &http, &base, &on_generator).await?;
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
