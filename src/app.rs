//! Wires one process: which roles it runs, with which stores and settings.
//!
//! `couponctl run` starts every role here in one process (the embedded
//! default); `couponctl gateway` and `couponctl consume <role>` start one
//! role each, to scale out. Every role stops when the shutdown token is
//! cancelled: consumers finish their batch and commit, the gateway finishes
//! in-flight requests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use coupon_consumers::history::HistoryConfig;
use coupon_consumers::{Context, Policy, PollSettings, RoleSpec};
use coupon_platform::kafka::consumer::Assignment;
use coupon_platform::kafka::{ensure_topics, Publisher, TopicSpec};
use coupon_platform::redis::Cache;
use coupon_platform::store::retention::Retention;
use coupon_platform::{reach, settings};
use coupon_platform::{KafkaSettings, Topics};
use coupon_producers::gateway::{self, GatewayConfig, GatewayState, Replies};

use crate::gauges::{self, Gauges};
use crate::upkeep::{blacklist_upkeep, spawn_partition_upkeep};

/// One role a process can run (defined with its topics in the catalogue).
pub use coupon_schemas::Role;

/// Everything a process needs, already parsed.
#[derive(Debug, Clone)]
pub struct AppConfig {
    pub database_url: String,
    /// Where the read-only routes read (the coupon status route, the
    /// console's analytics): replicas; `None` reads from `database_url`.
    pub database_read_url: Option<String>,
    pub redis_url: String,
    pub kafka: KafkaSettings,
    pub topic_prefix: String,
    /// Prefix of every Redis key (defaults to the topic prefix).
    pub redis_prefix: String,
    pub http_addr: SocketAddr,
    pub policy: Policy,
    pub gateway: GatewayConfig,
    /// Partitions of topics created at start-up.
    pub partitions: i32,
    /// Replicas of topics created at start-up (`None`: the broker's default).
    pub replication: Option<i32>,
    /// `retention.ms` of every topic (`LOG_RETENTION_MS`; -1 keeps records
    /// for ever, as replay, rebuild and audit need).
    pub retention_ms: i64,
    /// Broker long-poll on the latency-sensitive path (claims, purchases, replies).
    pub fast_fetch_wait_ms: u32,
    /// Broker long-poll for coupons, expiry and history.
    pub slow_fetch_wait_ms: u32,
    pub max_batch: usize,
    /// Claim processors in this process (with `Assignment::Group`).
    pub claim_processors: usize,
    /// How this instance shares partitions with other instances of its roles.
    pub assignment: Assignment,
    pub sweep_interval: Duration,
    /// How often a process with the gateway lifts expired blacklist entries
    /// and publishes the blacklist changes waiting for the log.
    pub blacklist_upkeep_interval: Duration,
    pub db_max_connections: u32,
    /// Written into every event's envelope.
    pub producer_name: String,
    /// How often the gauges that need a query (pool, holds, lag) are refreshed.
    pub metrics_interval: Duration,
    /// Where a process without the gateway serves `GET /metrics` (none: not served).
    pub metrics_addr: Option<SocketAddr>,
    /// Where the history is kept (`HISTORY_STORE`, the Cassandra settings).
    pub history: HistoryConfig,
    /// How long decisions, quota slots and history rows are kept.
    pub retention: Retention,
}

impl AppConfig {
    /// Settings for the local services, as `make up` starts them.
    pub fn local(topic_prefix: &str) -> Self {
        Self {
            database_url: settings::DATABASE_URL.into(),
            database_read_url: None,
            redis_url: settings::REDIS_URL.into(),
            kafka: KafkaSettings::new(settings::KAFKA_BROKERS),
            topic_prefix: topic_prefix.into(),
            redis_prefix: topic_prefix.into(),
            http_addr: settings::HTTP_ADDR,
            policy: Policy::default(),
            gateway: GatewayConfig::default(),
            partitions: settings::TOPIC_PARTITIONS,
            replication: None,
            retention_ms: coupon_platform::settings::LOG_RETENTION_MS,
            fast_fetch_wait_ms: settings::FAST_FETCH_WAIT_MS,
            slow_fetch_wait_ms: settings::SLOW_FETCH_WAIT_MS,
            max_batch: settings::MAX_BATCH,
            claim_processors: settings::CLAIM_PROCESSORS,
            assignment: Assignment::Group,
            sweep_interval: settings::SWEEP_INTERVAL,
            blacklist_upkeep_interval: settings::BLACKLIST_UPKEEP_INTERVAL,
            db_max_connections: settings::DB_MAX_CONNECTIONS,
            producer_name: "couponctl".into(),
            metrics_interval: settings::METRICS_INTERVAL,
            metrics_addr: None,
            history: HistoryConfig::default(),
            retention: Retention::default(),
        }
    }

    pub fn topics(&self) -> Topics {
        Topics::new(&self.topic_prefix)
    }
}

/// A started process. Dropping it does not stop it: cancel the token, then
/// [`Running::wait`].
pub struct Running {
    pub http_addr: Option<SocketAddr>,
    pub context: Context,
    /// The gateway's downloads (none without the gateway).
    pub exports: Option<Arc<gateway::console::ExportStats>>,
    tasks: JoinSet<anyhow::Result<()>>,
    shutdown: CancellationToken,
}

impl Running {
    /// Waits until every role has stopped; the first failure is returned.
    /// A role that stops before shutdown was asked for stops all the others
    /// ([`supervise`]): the process never serves with half its roles.
    pub async fn wait(self) -> anyhow::Result<()> {
        let result = supervise(self.tasks, &self.shutdown).await;
        self.context.publisher.flush(Duration::from_secs(5));
        result
    }
}

/// Joins every task. The first one to end while `shutdown` is not yet
/// cancelled (with an error, a panic, or not at all) is a role that died:
/// `shutdown` is cancelled so that the others stop too (a gateway without
/// its claim processor would answer every claim `504`, a processor without
/// its gateway would hold partitions for nobody), and its failure is
/// returned, which makes the process exit non-zero for its supervisor to
/// restart it.
pub async fn supervise(
    mut tasks: JoinSet<anyhow::Result<()>>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let mut first_error = None;
    while let Some(result) = tasks.join_next().await {
        let outcome = result.map_err(anyhow::Error::from).and_then(|r| r);
        if !shutdown.is_cancelled() {
            let error = outcome
                .err()
                .unwrap_or_else(|| anyhow::anyhow!("a role stopped on its own"));
            tracing::error!(error = %format!("{error:#}"), "a role stopped; stopping every role of this process");
            first_error.get_or_insert(error);
            shutdown.cancel();
        } else if let Err(error) = outcome {
            first_error.get_or_insert(error);
        }
    }
    match first_error {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// Fails in seconds, with one line ([`reach::Unreachable`]), when Postgres,
/// Redis or the broker is not there, instead of inside clients built to wait
/// out an outage.
pub async fn check_services(config: &AppConfig) -> anyhow::Result<()> {
    reach::postgres(&config.database_url).await?;
    reach::redis(&config.redis_url).await?;
    reach::kafka(&config.kafka.brokers).await?;
    Ok(())
}

/// Connects to the stores, applies migrations, creates topics.
pub async fn connect(config: &AppConfig) -> anyhow::Result<Context> {
    check_services(config).await?;
    let pool = coupon_platform::db::connect(&config.database_url, config.db_max_connections)
        .await
        .with_context(|| format!("connecting to Postgres at {}", redact(&config.database_url)))?;
    coupon_platform::db::migrate(&pool)
        .await
        .context("applying migrations")?;
    let cache = Cache::connect(&config.redis_url, &config.redis_prefix)
        .await
        .with_context(|| format!("connecting to Redis at {}", redact(&config.redis_url)))?;
    let topics = config.topics();
    create_topics(
        &config.kafka,
        &topics,
        config.partitions,
        config.replication,
        config.retention_ms,
    )
    .await?;
    let publisher = Publisher::new(&config.kafka, &config.producer_name)?;
    Ok(Context {
        pool,
        cache,
        publisher,
        topics,
        kafka: config.kafka.clone(),
        policy: config.policy,
        mirror: Default::default(),
        history: config.history.clone(),
    })
}

/// Creates the spec's topics that are missing.
pub async fn create_topics(
    kafka: &KafkaSettings,
    topics: &Topics,
    partitions: i32,
    replication: Option<i32>,
    retention_ms: i64,
) -> anyhow::Result<Vec<String>> {
    reach::kafka(&kafka.brokers).await?;
    let specs: Vec<TopicSpec> = topics
        .all()
        .into_iter()
        .map(|name| TopicSpec {
            configs: topic_configs(topics, &name, retention_ms),
            name,
            partitions,
            replication,
        })
        .collect();
    let created = ensure_topics(kafka, &specs).await.with_context(|| {
        format!(
            "creating topics on the broker at {} (is it running? `make up` starts the local one)",
            kafka.brokers
        )
    })?;
    for (topic, kept) in retention_mismatches(kafka, topics, retention_ms).await? {
        tracing::warn!(
            topic = %topic,
            retention_ms = kept.as_deref().unwrap_or("the broker's default"),
            wanted = retention_ms,
            "this topic deletes records that replay, rebuild and audit need \
             (LOG_RETENTION_MS); `couponctl topics` sets it"
        );
    }
    Ok(created)
}

/// The topics whose `retention.ms` is not `retention_ms`, with what they
/// keep: topics created before the setting, or by hand.
pub async fn retention_mismatches(
    kafka: &KafkaSettings,
    topics: &Topics,
    retention_ms: i64,
) -> anyhow::Result<Vec<(String, Option<String>)>> {
    let names = topics.all();
    let kept = coupon_platform::kafka::admin::topic_config(kafka, &names, RETENTION)
        .await
        .context("reading the topics' retention")?;
    let wanted = retention_ms.to_string();
    Ok(kept
        .into_iter()
        .filter(|(_, value)| value.as_deref() != Some(wanted.as_str()))
        .collect())
}

const RETENTION: &str = "retention.ms";

/// The configs a topic is created with. Every topic keeps its records for
/// `retention_ms` (`LOG_RETENTION_MS`, default -1: for ever): the log is
/// what `replay`, `rebuild` and `audit` treat as the whole truth, and a
/// broker's default (7 days) would delete the batches a rebuild needs. The
/// request topics (claims and purchases) stamp each record with the time
/// the broker appended it (`LogAppendTime`): the processors judge a request
/// at that time (`coupon_domain::clock`), so no producer may set it.
pub fn topic_configs(topics: &Topics, name: &str, retention_ms: i64) -> Vec<(String, String)> {
    let mut configs = vec![(RETENTION.to_owned(), retention_ms.to_string())];
    if topics.kind_of(name).is_some_and(|k| k.broker_timestamped()) {
        configs.push(("message.timestamp.type".into(), "LogAppendTime".into()));
    }
    configs
}

/// Connections of the gateway's pool for reads (the status route, the
/// console) when they go to the primary.
const READ_POOL_CONNECTIONS: u32 = 4;

/// Starts `roles`; they run until `shutdown` is cancelled.
pub async fn start(
    config: AppConfig,
    roles: &[Role],
    shutdown: CancellationToken,
) -> anyhow::Result<Running> {
    if roles.is_empty() {
        bail!("no roles to run");
    }
    let serves_http = roles.contains(&Role::Gateway);
    if serves_http {
        config.gateway.check_exposure(config.http_addr)?;
    }
    // The recorder first, so no role records into the void before it exists.
    let metrics = coupon_platform::metrics::prometheus();
    let ctx = connect(&config).await?;
    let mut tasks = JoinSet::new();
    let consumers: Vec<(Role, RoleSpec)> = roles
        .iter()
        .filter_map(|&role| coupon_consumers::spec(role).map(|spec| (role, spec)))
        .collect();
    spawn_gauges(&config, &ctx, &consumers, &mut tasks, &shutdown)?;
    if consumers.iter().any(|(_, spec)| spec.restores_cache) {
        // Redis is a cache of Postgres: refill it before deciding anything.
        match coupon_consumers::restore::restore(&ctx).await {
            Ok(restored) => restored.log(),
            Err(error) => {
                tracing::warn!(%error, "could not refill Redis; continuing without the cache")
            }
        }
    }
    // The history sink's and the claim processor's tables are partitioned.
    if consumers
        .iter()
        .any(|(role, spec)| spec.writes_history || *role == Role::Claims)
    {
        let window = config.policy.quota_window.length();
        spawn_partition_upkeep(&mut tasks, &ctx.pool, config.retention, window, &shutdown);
    }
    spawn_consumers(&config, &ctx, &consumers, &mut tasks, &shutdown);
    let (http_addr, exports) = if serves_http {
        let (addr, exports) = start_gateway(&config, &ctx, metrics, &mut tasks, &shutdown).await?;
        (Some(addr), Some(exports))
    } else if let Some(metrics_addr) = config.metrics_addr {
        let listener = tokio::net::TcpListener::bind(metrics_addr)
            .await
            .with_context(|| format!("binding the metrics listener on {metrics_addr}"))?;
        let addr = listener.local_addr()?;
        let stop = shutdown.clone();
        tasks.spawn(async move { axum_serve_metrics(listener, metrics, stop).await });
        tracing::info!(%addr, "serving /metrics");
        (Some(addr), None)
    } else {
        (None, None)
    };
    Ok(Running {
        http_addr,
        context: ctx,
        exports,
        tasks,
        shutdown,
    })
}

/// The gauges of this process's consumer roles, refreshed every
/// `metrics_interval` until `shutdown`.
fn spawn_gauges(
    config: &AppConfig,
    ctx: &Context,
    consumers: &[(Role, RoleSpec)],
    tasks: &mut JoinSet<anyhow::Result<()>>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let roles: Vec<Role> = consumers.iter().map(|(role, _)| *role).collect();
    gauges::register(&roles);
    let refresher = Gauges::new(ctx.pool.clone(), &config.kafka, &ctx.topics, &roles)
        .context("creating the consumer-lag probes")?;
    let (interval, stop) = (config.metrics_interval, shutdown.clone());
    tasks.spawn(async move {
        refresher.run(interval, stop).await;
        Ok(())
    });
    Ok(())
}

/// Every consumer role, each as its spec says: polled fast when clients wait
/// for it, as `claim_processors` instances when it scales out (in a group:
/// a static share names its partitions, which a second instance would only
/// repeat).
fn spawn_consumers(
    config: &AppConfig,
    ctx: &Context,
    consumers: &[(Role, RoleSpec)],
    tasks: &mut JoinSet<anyhow::Result<()>>,
    shutdown: &CancellationToken,
) {
    let fast = PollSettings {
        fetch_wait_max_ms: config.fast_fetch_wait_ms,
        max_batch: config.max_batch,
        assignment: config.assignment,
    };
    let slow = PollSettings {
        fetch_wait_max_ms: config.slow_fetch_wait_ms,
        max_batch: config.max_batch.max(1_000),
        assignment: config.assignment,
    };
    for &(role, spec) in consumers {
        let instances = if spec.scales_out && config.assignment == Assignment::Group {
            config.claim_processors.max(1)
        } else {
            1
        };
        let poll = if spec.answers_clients { fast } else { slow };
        for _ in 0..instances {
            let (ctx, stop, interval) = (ctx.clone(), shutdown.clone(), config.sweep_interval);
            tasks.spawn(async move {
                coupon_consumers::run(role, ctx, poll, interval, stop)
                    .await
                    .with_context(|| format!("the {role} consumer stopped"))
            });
        }
    }
}

/// The gateway: the blacklist upkeep, the replies it waits for, and the HTTP
/// server; returns the address it listens on and its downloads' counters.
async fn start_gateway(
    config: &AppConfig,
    ctx: &Context,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    tasks: &mut JoinSet<anyhow::Result<()>>,
    shutdown: &CancellationToken,
) -> anyhow::Result<(SocketAddr, Arc<gateway::console::ExportStats>)> {
    // The gateways change the blacklist: they also lift the expired entries
    // and publish the changes a failed publish left waiting (several
    // gateways doing it at once wait for each other's rows).
    let (upkeep_ctx, stop, every) = (
        ctx.clone(),
        shutdown.clone(),
        config.blacklist_upkeep_interval,
    );
    tasks.spawn(async move {
        blacklist_upkeep(&upkeep_ctx, every, stop).await;
        Ok(())
    });
    let replies = Arc::new(Replies::bounded(config.gateway.max_waiting.max(1)));
    let results =
        gateway::replies::results_consumer(&config.kafka, &ctx.topics, config.fast_fetch_wait_ms)
            .await
            .context("subscribing to the results topics")?;
    tasks.spawn(
        gateway::replies::dispatch(
            results,
            ctx.topics.clone(),
            replies.clone(),
            shutdown.clone().cancelled_owned(),
        )
        .map_ok(),
    );
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("binding HTTP on {}", config.http_addr))?;
    let addr = listener.local_addr()?;
    let mut state = GatewayState::new(
        ctx.pool.clone(),
        ctx.cache.clone(),
        ctx.publisher.clone(),
        ctx.topics.clone(),
        replies,
        config.gateway.clone(),
        metrics,
    )
    .with_read_pool(read_pool(config).await?)
    .with_exporter(Arc::new(crate::console_export::ReplayExporter {
        kafka: config.kafka.clone(),
        topics: ctx.topics.clone(),
    }));
    if let Some(settings) = config.history.cassandra.clone() {
        state = state.with_cassandra_history(settings);
    }
    let state = Arc::new(state);
    let exports = state.exports.clone();
    let stop = shutdown.clone();
    tasks.spawn(async move {
        gateway::serve(listener, state, stop.cancelled_owned())
            .await
            .context("HTTP server")
    });
    tracing::info!(%addr, "gateway listening");
    Ok((addr, exports))
}

/// What the gateway's read-only routes read: the replicas of
/// `DATABASE_READ_URL`, or a pool of its own on the same server, so the
/// console's scans and the status route can never take the connections the
/// consumers of this process decide coupons with.
async fn read_pool(config: &AppConfig) -> anyhow::Result<PgPool> {
    match config.database_read_url.as_deref() {
        Some(url) if url != config.database_url => {
            reach::postgres(url).await?;
            coupon_platform::db::connect(url, config.db_max_connections)
                .await
                .with_context(|| format!("connecting to Postgres at {}", redact(url)))
        }
        _ => coupon_platform::db::connect(&config.database_url, READ_POOL_CONNECTIONS)
            .await
            .with_context(|| format!("connecting to Postgres at {}", redact(&config.database_url))),
    }
}

async fn axum_serve_metrics(
    listener: tokio::net::TcpListener,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    gateway::serve_metrics(listener, metrics, shutdown.cancelled_owned())
        .await
        .context("metrics HTTP server")
}

trait MapOk: std::future::Future<Output = ()> + Sized {
    fn map_ok(self) -> impl std::future::Future<Output = anyhow::Result<()>> {
        async move {
            self.await;
            Ok(())
        }
    }
}

impl<F: std::future::Future<Output = ()>> MapOk for F {}

/// A throwaway database on the server of `database_url` (for the demo and
/// the benchmarks): created now, dropped by [`ScratchDatabase::drop_now`].
pub struct ScratchDatabase {
    admin: sqlx::PgPool,
    pub name: String,
    pub url: String,
}

impl ScratchDatabase {
    pub async fn create(database_url: &str, name: &str) -> anyhow::Result<Self> {
        use sqlx::ConnectOptions as _;
        let server: sqlx::postgres::PgConnectOptions =
            database_url.parse().context("DATABASE_URL")?;
        reach::postgres(database_url).await?;
        let admin = coupon_platform::db::connect(database_url, 2)
            .await
            .with_context(|| format!("connecting to Postgres at {}", redact(database_url)))?;
        coupon_platform::db::create_database(&admin, name)
            .await
            .with_context(|| format!("creating database {name}"))?;
        Ok(Self {
            admin,
            name: name.to_owned(),
            url: server.database(name).to_url_lossy().to_string(),
        })
    }

    pub async fn drop_now(self) -> anyhow::Result<()> {
        coupon_platform::db::drop_database(&self.admin, &self.name)
            .await
            .with_context(|| format!("dropping database {}", self.name))?;
        Ok(())
    }
}

/// Hides the password in a connection URL for messages.
pub use coupon_platform::db::redact;

#[cfg(test)]
mod tests {
    use super::*;

    /// A role that runs until it is asked to stop.
    async fn until_shutdown(stop: CancellationToken) -> anyhow::Result<()> {
        stop.cancelled().await;
        Ok(())
    }

    #[tokio::test]
    async fn a_role_that_dies_stops_the_others_and_fails_the_process() {
        let shutdown = CancellationToken::new();
        let mut tasks: JoinSet<anyhow::Result<()>> = JoinSet::new();
        // A role that runs until shutdown, and one that fails at once.
        tasks.spawn(until_shutdown(shutdown.clone()));
        tasks.spawn(async { anyhow::bail!("the claims consumer stopped: broken") });
        let result = tokio::time::timeout(Duration::from_secs(10), supervise(tasks, &shutdown))
            .await
            .expect("the surviving role was stopped");
        let error = result.expect_err("the process fails");
        assert!(format!("{error:#}").contains("broken"), "{error:#}");
        assert!(shutdown.is_cancelled());
    }

    #[tokio::test]
    async fn a_role_that_returns_early_counts_as_dead_and_a_clean_stop_is_ok() {
        let shutdown = CancellationToken::new();
        let mut tasks: JoinSet<anyhow::Result<()>> = JoinSet::new();
        tasks.spawn(async { Ok(()) });
        let error = supervise(tasks, &shutdown).await.expect_err("died");
        assert!(error.to_string().contains("stopped on its own"));

        let shutdown = CancellationToken::new();
        let mut tasks: JoinSet<anyhow::Result<()>> = JoinSet::new();
        tasks.spawn(until_shutdown(shutdown.clone()));
        shutdown.cancel();
        supervise(tasks, &shutdown).await.expect("a clean stop");
    }
}
