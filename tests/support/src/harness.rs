//! Test isolation: every test gets its own Postgres database, topic prefix
//! and Redis key prefix, and an in-process system on port 0. Nothing is
//! shared between tests but the servers, so tests run in parallel and in any
//! order, and leftovers of earlier runs cannot leak in.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, PgPool};
use tokio_util::sync::CancellationToken;

use coupon_domain::QuotaWindow;
use coupon_platform::kafka::Record;
use coupon_platform::{settings, KafkaSettings, Topics};
use couponctl::app::{self, AppConfig, Role, Running};

pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| settings::DATABASE_URL.into())
}

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| settings::REDIS_URL.into())
}

pub fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| settings::KAFKA_BROKERS.into())
}

/// The profile's folder of the target dir (`target/debug`): a test binary
/// runs from its `deps/` (cargo's layout), and cargo builds the package's
/// binaries before its integration tests. This crate is a library, so it
/// cannot name them at compile time as a test can (`CARGO_BIN_EXE_*`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let deps = exe.parent().expect("the test binary's folder");
    deps.parent().unwrap_or(deps).to_path_buf()
}

/// The `couponctl` binary of this build (`COUPONCTL_BIN` overrides).
pub fn couponctl_binary() -> PathBuf {
    std::env::var_os("COUPONCTL_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| profile_dir().join("couponctl"))
}

/// `target/tmp`, where the children's logs stay after a run.
pub fn target_tmp_dir() -> PathBuf {
    let dir = profile_dir()
        .parent()
        .map(|t| t.join("tmp"))
        .unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&dir).expect("target/tmp");
    dir
}

pub struct TestEnv {
    pub name: String,
    pub database_url: String,
    pub pool: PgPool,
    pub topics: Topics,
    pub kafka: KafkaSettings,
}

/// The `postgres` database of the server `url` names.
async fn admin_pool_at(url: &str) -> PgPool {
    let options: PgConnectOptions = url.parse().expect("DATABASE_URL");
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options.database("postgres"))
        .await
        .expect("connect to Postgres (is `make up` done?)")
}

/// Drops databases left by test runs that died more than an hour ago.
async fn sweep_leftovers(admin: &PgPool) {
    let names: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'it\\_%'")
            .fetch_all(admin)
            .await
            .unwrap_or_default();
    for name in names {
        if left_over(&name) {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .execute(admin)
                .await;
        }
    }
}

impl TestEnv {
    pub async fn new() -> Self {
        Self::on_brokers(brokers()).await
    }

    /// A test environment whose topics live on the brokers at `brokers` (the
    /// 3-node cluster of the fault-injection run), created with the
    /// brokers' default replication factor.
    pub async fn on_brokers(brokers: String) -> Self {
        Self::on_server(&database_url(), brokers).await
    }

    /// A test environment whose database lives on the Postgres server of
    /// `server_url` (the HA cluster's write port in the fault-injection run)
    /// and whose topics live on `brokers`.
    pub async fn on_server(server_url: &str, brokers: String) -> Self {
        Self::named(Self::fresh_name(), server_url, KafkaSettings::new(brokers)).await
    }

    /// A fresh name for a test's database and topic prefix.
    pub fn fresh_name() -> String {
        format!(
            "it_{}_{}",
            chrono::Utc::now().timestamp(),
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        )
    }

    /// A test environment named `name` whose topics are made through
    /// `kafka` (its brokers and credentials: the SASL broker's operator in
    /// `acl.rs`), who also cleans them up.
    pub async fn named(name: String, server_url: &str, kafka: KafkaSettings) -> Self {
        let admin = admin_pool_at(server_url).await;
        sweep_leftovers(&admin).await;
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&admin)
            .await
            .expect("create test database");
        admin.close().await;
        let options: PgConnectOptions = server_url.parse().expect("DATABASE_URL");
        let options = options.database(&name);
        let database_url = options.to_url_lossy().to_string();
        let pool = coupon_platform::db::connect(&database_url, 5)
            .await
            .expect("connect test database");
        coupon_platform::db::migrate(&pool).await.expect("migrate");
        let topics = Topics::new(&name);
        app::create_topics(
            &kafka,
            &topics,
            2,
            None,
            coupon_platform::settings::LOG_RETENTION_MS,
        )
        .await
        .expect("create topics");
        Self {
            name,
            database_url,
            pool,
            topics,
            kafka,
        }
    }

    /// The configuration of a system under test: isolated names, port 0,
    /// short polls, generous reply timeout (2 cores under load).
    pub fn config(&self) -> AppConfig {
        let mut config = AppConfig::local(&self.name);
        config.database_url = self.database_url.clone();
        config.redis_url = redis_url();
        config.kafka = self.kafka.clone();
        config.http_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        config.partitions = 2;
        config.slow_fetch_wait_ms = 50;
        config.sweep_interval = Duration::from_millis(250);
        config.gateway.reply_timeout = Duration::from_secs(30);
        config.gateway.admin_token = Some("admin-secret".into());
        config.gateway.flood_limit_per_sec = 1_000_000;
        config.gateway.address_limit_per_sec = 1_000_000;
        config.producer_name = format!("test@{}", self.name);
        config
    }

    pub async fn start(&self, roles: &[Role], tweak: impl FnOnce(&mut AppConfig)) -> App {
        let mut config = self.config();
        tweak(&mut config);
        let token = CancellationToken::new();
        let running = app::start(config, roles, token.clone())
            .await
            .expect("start system");
        App {
            http: running.http_addr,
            running: Some(running),
            token,
        }
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(&self.pool)
            .await
            .expect(sql)
    }

    pub async fn status_counts(&self) -> StatusCounts {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, count(*) FROM coupons GROUP BY status")
                .fetch_all(&self.pool)
                .await
                .expect("status counts");
        let mut counts = StatusCounts::default();
        for (status, n) in rows {
            match status.as_str() {
                "available" => counts.available = n,
                "held" => counts.held = n,
                "redeemed" => counts.redeemed = n,
                "expired" => counts.expired = n,
                other => panic!("unexpected status {other}"),
            }
        }
        counts
    }

    /// Reads every record of `topic` from the beginning up to its current end.
    pub async fn read_topic(&self, topic: &str) -> Vec<Record> {
        let kafka = self.kafka.clone();
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || read_all(&kafka, &topic))
            .await
            .expect("reader")
    }

    /// Waits until `group` has committed offsets at the end of every partition
    /// of `topic`: everything published so far has been processed.
    pub async fn wait_caught_up(&self, role: &str, topic: &str, within: Duration) {
        let kafka = self.kafka.clone();
        let group = self.topics.group(role.parse().expect("a role name"));
        let topic = topic.to_owned();
        let deadline = Instant::now() + within;
        loop {
            let (k, g, t) = (kafka.clone(), group.clone(), topic.clone());
            let lag = tokio::task::spawn_blocking(move || lag(&k, &g, &t))
                .await
                .expect("lag");
            if lag == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{group} still lags {lag} on {topic} after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// [`TestEnv::wait_caught_up`] for every consumer role on every topic
    /// it reads (the catalogue's).
    pub async fn wait_every_role_caught_up(&self, within: Duration) {
        for role in Role::CONSUMERS {
            for kind in role.topics() {
                self.wait_caught_up(role.name(), &self.topics.of(*kind), within)
                    .await;
            }
        }
    }

    /// The log rebuilt by the real `couponctl replay --rebuild` into a fresh
    /// database of its own, `<this test's>_<suffix>` (swept with the test's
    /// leftovers should the test die first). Fails the test if the rebuild
    /// fails.
    pub async fn rebuild_into(&self, suffix: &str) -> Rebuilt {
        let name = format!("{}_{suffix}", self.name);
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&self.pool)
            .await
            .expect("create the rebuild's database");
        let url = self.database_url.replace(&self.name, &name);
        let mut command = self.couponctl();
        command.args(["replay", "--rebuild", &url]);
        let output = tokio::task::spawn_blocking(move || command.output())
            .await
            .expect("the rebuild's thread")
            .expect("run couponctl replay --rebuild");
        assert!(
            output.status.success(),
            "couponctl replay --rebuild: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Rebuilt {
            name,
            url,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            server: self.pool.clone(),
        }
    }

    /// The real `couponctl` binary, pointed at this test's database, topic
    /// prefix, Redis and broker.
    pub fn couponctl(&self) -> std::process::Command {
        let mut command = std::process::Command::new(couponctl_binary());
        command
            .env("DATABASE_URL", &self.database_url)
            .env("COUPON_TOPIC_PREFIX", &self.name)
            .env("REDIS_URL", redis_url())
            .env("KAFKA_BROKERS", &self.kafka.brokers)
            .env("TOPIC_PARTITIONS", "2")
            .env_remove("RUST_LOG");
        command
    }

    pub fn http_client() -> reqwest::Client {
        reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .timeout(Duration::from_secs(60))
            .build()
            .expect("http client")
    }
}

/// A database the log was rebuilt into ([`TestEnv::rebuild_into`]).
pub struct Rebuilt {
    pub name: String,
    pub url: String,
    /// What `couponctl replay --rebuild` printed.
    pub stdout: String,
    /// A pool on the same server, to drop the database by.
    server: PgPool,
}

impl Rebuilt {
    /// A pool of `connections` on the rebuilt database.
    pub async fn connect(&self, connections: u32) -> PgPool {
        coupon_platform::db::connect(&self.url, connections)
            .await
            .expect("connect to the rebuilt database")
    }

    /// Drops the rebuilt database (its connections too).
    pub async fn drop_database(self) {
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            self.name
        ))
        .execute(&self.server)
        .await
        .expect("drop the rebuilt database");
    }
}

/// Whether a test's database or topic prefix `it_<unix seconds>_<id>` was
/// made more than an hour ago (by a run that died before it cleaned up).
fn left_over(name: &str) -> bool {
    let cutoff = chrono::Utc::now().timestamp() - 3600;
    name.strip_prefix("it_")
        .and_then(|rest| rest.split('_').next())
        .and_then(|born| born.parse::<i64>().ok())
        .is_some_and(|born| born < cutoff)
}

/// Deletes the topics whose name `doomed` picks. Best effort: a topic that
/// stays behind only costs the broker a little disk.
async fn delete_topics(kafka: &KafkaSettings, doomed: impl Fn(&str) -> bool) {
    let _ = coupon_platform::kafka::admin::delete_topics_where(kafka, doomed).await;
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        // Best effort, off the runtime: drop the database and this test's
        // topics, and those of test runs that died an hour ago or more.
        let name = self.name.clone();
        let kafka = self.kafka.clone();
        let server = self.database_url.clone();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let admin = admin_pool_at(&server).await;
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .execute(&admin)
                    .await;
                let own = format!("{name}.");
                delete_topics(&kafka, |topic| {
                    topic.starts_with(&own) || left_over(topic.split('.').next().unwrap_or(""))
                })
                .await;
            });
        })
        .join();
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StatusCounts {
    pub available: i64,
    pub held: i64,
    pub redeemed: i64,
    /// Out of the pool for good: their campaign ended.
    pub expired: i64,
}

impl StatusCounts {
    pub fn total(self) -> i64 {
        self.available + self.held + self.redeemed + self.expired
    }
}

pub struct App {
    pub http: Option<SocketAddr>,
    pub running: Option<Running>,
    pub token: CancellationToken,
}

impl App {
    pub fn url(&self, path: &str) -> String {
        format!(
            "http://{}{path}",
            self.http.expect("this app has no gateway")
        )
    }

    pub async fn stop(mut self) {
        self.token.cancel();
        if let Some(running) = self.running.take() {
            running.wait().await.expect("clean shutdown");
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// Polls `check` until it returns true or `within` passes (then panics with `what`).
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Like [`eventually`], for checks that say what is still wrong: the last
/// complaint is in the panic message.
pub async fn eventually_ok<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + within;
    loop {
        let complaint = match check().await {
            Ok(()) => return,
            Err(complaint) => complaint,
        };
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}; last: {complaint}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn reader(kafka: &KafkaSettings) -> BaseConsumer {
    let mut config = kafka.client_config();
    config
        .set(
            "group.id",
            format!("it-reader-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10");
    config.create().expect("reader consumer")
}

fn partitions(consumer: &BaseConsumer, topic: &str) -> Vec<i32> {
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    metadata.topics()[0]
        .partitions()
        .iter()
        .map(|p| p.id())
        .collect()
}

fn read_all(kafka: &KafkaSettings, topic: &str) -> Vec<Record> {
    let consumer = reader(kafka);
    let mut ends = std::collections::HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in partitions(&consumer, topic) {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .expect("watermarks");
        if high > low {
            ends.insert(p, high);
            tpl.add_partition_offset(topic, p, Offset::Offset(low))
                .expect("tpl");
        }
    }
    let mut records = Vec::new();
    if ends.is_empty() {
        return records;
    }
    consumer.assign(&tpl).expect("assign");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut done = std::collections::HashSet::new();
    while done.len() < ends.len() {
        assert!(Instant::now() < deadline, "reading {topic} timed out");
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            let message = message.expect("read");
            let record = Record::from_message(&message);
            if record.offset + 1 >= ends[&record.partition] {
                done.insert(record.partition);
            }
            if record.offset < ends[&record.partition] {
                records.push(record);
            }
        }
    }
    records
}

fn lag(kafka: &KafkaSettings, group: &str, topic: &str) -> i64 {
    coupon_platform::kafka::lag::group_lag(kafka, group, &[topic.to_owned()])
        .expect("lag")
        .iter()
        .map(|p| p.lag)
        .sum()
}

/// Releases `count` coupons of `category` (as `couponctl issue` does) and
/// waits until the projector has made them available.
pub async fn release(env: &TestEnv, category: &str, count: u32) -> Vec<String> {
    let publisher =
        coupon_platform::kafka::Publisher::new(&env.kafka, "test-issuer").expect("publisher");
    let request = coupon_producers::issue::IssueRequest {
        employee: coupon_domain::EmployeeId::parse("e-test").unwrap(),
        category: coupon_domain::Category::parse(category).unwrap(),
        count,
        campaign: None,
    };
    let batch =
        coupon_producers::issue::issue(&env.pool, &publisher, &env.topics, 1, &request, |_| {})
            .await
            .expect("issue");
    // This batch's own coupons, by code: a test may release one category
    // twice, and counting the category would then be done too early (the
    // earlier batch alone) or never (both batches in when first looked).
    let codes: Vec<String> = batch.codes.iter().map(ToString::to_string).collect();
    eventually(
        "released coupons are projected",
        Duration::from_secs(60),
        || async {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM coupons WHERE code = ANY($1)")
                .bind(&codes)
                .fetch_one(&env.pool)
                .await
                .expect("count the released coupons")
                == i64::from(count)
        },
    )
    .await;
    codes
}

/// The spec's invariants over the whole database, with the default quota
/// window (the UTC day); see [`invariant_violations_in`].
pub async fn invariant_violations(env: &TestEnv, issued: i64) -> Vec<(&'static str, i64)> {
    invariant_violations_in(env, issued, QuotaWindow::DAY).await
}

/// The spec's invariants over the whole database: one holder per coupon,
/// one grant per user per quota window, and conservation. Returns each
/// violated invariant with how many rows break it (empty when all hold).
///
/// Each is checked on the facts the processors record, not on a constraint
/// that enforces it (a check on the primary key of `quota_grants` could
/// never fail): the granted decisions and the coupons' holders. Windows are
/// computed from epoch seconds, as the processors align them, so the day is
/// the UTC day whatever the session's time zone.
pub async fn invariant_violations_in(
    env: &TestEnv,
    issued: i64,
    window: QuotaWindow,
) -> Vec<(&'static str, i64)> {
    let counts = env.status_counts().await;
    let mut violations = vec![(
        "available + held + redeemed + expired = issued",
        (counts.total() - issued).abs(),
    )];
    let secs = window.length().as_secs();
    // The start of the window holding `column`, in SQL: whole days of a
    // zone (`QUOTA_TZ`) are its calendar days, as Postgres' own tz database
    // counts them; anything else a fixed UTC-aligned length.
    let zone = window.zone();
    let window_of = |column: &str| {
        if zone != coupon_domain::Tz::UTC && secs % 86_400 == 0 {
            let days = secs / 86_400;
            format!(
                "((DATE '1970-01-01' + (floor((({column} AT TIME ZONE '{zone}')::date - DATE '1970-01-01') / {days}.0) * {days})::int)::timestamp AT TIME ZONE '{zone}')"
            )
        } else {
            format!("to_timestamp(floor(extract(epoch FROM {column}) / {secs}) * {secs})")
        }
    };
    let checks = [
        (
            // Every granted (non-repeated) decision is a new hold, judged
            // in the window of its own time.
            "one grant per user per quota window",
            format!(
                "SELECT count(*) FROM (SELECT user_id FROM claim_decisions
                  WHERE outcome = 'granted' AND NOT repeated
                  GROUP BY user_id, {} HAVING count(*) > 1) g",
                window_of("decided_at")
            ),
        ),
        (
            // ... and took the quota slot of that window.
            "every grant took its window's quota slot",
            format!(
                "SELECT count(*) FROM claim_decisions d
                  WHERE d.outcome = 'granted' AND NOT d.repeated AND NOT EXISTS (
                    SELECT 1 FROM quota_grants q
                     WHERE q.user_id = d.user_id AND q.request_id = d.request_id
                       AND q.window_start = {})",
                window_of("d.decided_at")
            ),
        ),
        (
            // No coupon is held or redeemed but under a grant to its holder:
            // the coupons' own facts agree with the decisions.
            "every held or redeemed coupon was granted to its holder",
            "SELECT count(*) FROM coupons c
              WHERE c.status IN ('held', 'redeemed') AND NOT EXISTS (
                SELECT 1 FROM claim_decisions d
                 WHERE d.request_id = c.hold_id AND d.user_id = c.holder_user_id
                   AND d.coupon_code = c.code AND d.outcome = 'granted')"
                .to_owned(),
        ),
        (
            // Every granted (non-repeated) decision names a different
            // coupon-hold: no coupon was handed to two users under one hold.
            // (A hold that ended in a purchase whose order was then
            // cancelled gave the coupon back before its deadline: the next
            // grant of it may fall in the same second.)
            "one holder per coupon",
            "SELECT count(*) FROM (SELECT coupon_code FROM claim_decisions d
              WHERE outcome = 'granted' AND NOT repeated
                AND NOT EXISTS (
                  SELECT 1 FROM purchase_decisions p
                   WHERE p.coupon_code = d.coupon_code AND p.user_id = d.user_id
                     AND p.cancelled_at IS NOT NULL)
              GROUP BY coupon_code, date_trunc('second', expires_at)
              HAVING count(DISTINCT user_id) > 1) s"
                .to_owned(),
        ),
        (
            "one held coupon per user",
            "SELECT count(*) FROM (SELECT holder_user_id FROM coupons WHERE status = 'held'
              GROUP BY 1 HAVING count(*) > 1) h"
                .to_owned(),
        ),
    ];
    for (invariant, sql) in checks {
        violations.push((invariant, env.count(&sql).await));
    }
    violations.retain(|(_, n)| *n != 0);
    violations
}

pub async fn assert_invariants(env: &TestEnv, issued: i64) {
    assert_invariants_in(env, issued, QuotaWindow::DAY).await;
}

pub async fn assert_invariants_in(env: &TestEnv, issued: i64, window: QuotaWindow) {
    let violations = invariant_violations_in(env, issued, window).await;
    assert!(
        violations.is_empty(),
        "invariants violated: {violations:?} ({:?})",
        env.status_counts().await
    );
}

/// `couponctl` arguments for one process running every consumer role.
pub const CONSUME_ALL: &[&str] = &[
    "consume",
    "coupons",
    "claims",
    "purchases",
    "expiry",
    "history",
];

/// A free port on 127.0.0.1 for a child's listener.
pub fn free_port() -> u16 {
    // Bound and released at once: the child binds it a moment later.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    listener.local_addr().expect("local addr").port()
}

/// A `couponctl` child process. Dropping it kills it (SIGKILL), so a failing
/// test leaves nothing running.
pub struct Child {
    process: tokio::process::Child,
    pub log: PathBuf,
    label: String,
}

impl Child {
    pub fn spawn(env: &TestEnv, args: &[&str], port: u16, label: &str) -> Self {
        Self::spawn_with(env, args, port, label, |_| {})
    }

    /// Like [`Child::spawn`], with `tweak` adjusting the command (more
    /// environment) before it starts.
    pub fn spawn_with(
        env: &TestEnv,
        args: &[&str],
        port: u16,
        label: &str,
        tweak: impl FnOnce(&mut std::process::Command),
    ) -> Self {
        // Kept after the run (in the target dir) for a look when a test fails.
        let log = target_tmp_dir().join(format!("{}-{label}.log", env.name));
        let file = std::fs::File::create(&log).expect("child log file");
        let mut command = env.couponctl();
        command
            .args(args)
            .env("HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("COUPON_ADMIN_TOKEN", "admin-secret")
            .env("HOLD_TTL", "60s")
            .env("REPLY_TIMEOUT", "2s")
            .env("FLOOD_LIMIT", "1000000")
            .env("ADDRESS_LIMIT", "1000000")
            .env("SLOW_FETCH_WAIT_MS", "50")
            .env("SWEEP_INTERVAL", "250ms")
            .env("RUST_LOG", "info,rdkafka=warn,sqlx=warn")
            .env_remove("COUPON_API_TOKEN")
            .env_remove("COUPON_REDIS_PREFIX")
            .env_remove("CONSUMER_INSTANCE")
            .env_remove("LOG_FORMAT")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file handle"))
            .stderr(file);
        tweak(&mut command);
        let process = tokio::process::Command::from(command)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn couponctl");
        Self {
            process,
            log,
            label: label.to_owned(),
        }
    }

    #[allow(dead_code)] // only the chaos binary samples memory
    pub fn pid(&self) -> Option<u32> {
        self.process.id()
    }

    /// Everything the child logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Fails early, with the child's log, if the child has died.
    pub fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.process.try_wait() {
            panic!(
                "couponctl {} exited with {status}:\n{}",
                self.label,
                self.log_tail()
            );
        }
    }

    pub async fn wait_healthy(&mut self, base: &str, within: Duration) {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("client");
        let deadline = Instant::now() + within;
        loop {
            self.assert_alive();
            if let Ok(response) = http.get(format!("{base}/healthz")).send().await {
                if response.status() == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "couponctl {} not healthy after {within:?}:\n{}",
                self.label,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `kill -9`: no shutdown hook runs, nothing is flushed or committed.
    pub async fn kill_9(mut self) {
        self.assert_alive();
        self.process.kill().await.expect("kill -9");
    }
}

/// A record of `topic` (partition 0) as a consumer receives it, with the
/// broker time `broker_ms`: for driving a role's `handle_batch` directly.
pub fn record_at(
    topic: String,
    offset: i64,
    key: &str,
    value: Vec<u8>,
    broker_ms: i64,
) -> coupon_platform::kafka::Record {
    coupon_platform::kafka::Record {
        topic,
        partition: 0,
        offset,
        key: Some(key.as_bytes().to_vec()),
        value: Some(value),
        timestamp_ms: Some(broker_ms),
    }
}
