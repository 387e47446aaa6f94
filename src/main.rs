//! `couponctl`: every process and tool of the coupon system in one binary.
//! This file only parses flags (with environment fallbacks) and wires the
//! library together; see `couponctl --help`.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use coupon_consumers::Policy;
use coupon_domain::{Category, EmployeeId, QuotaWindow, UserId};
use coupon_platform::kafka::consumer::Assignment;
use coupon_platform::kafka::GroupProtocol;
use coupon_platform::{reach, KafkaSettings};
use coupon_producers::gateway::{GatewayConfig, Secret};
use couponctl::app::{self, AppConfig, Role};
use couponctl::replay::{self, ReplayOptions, StartAt, TopicKind};
use couponctl::{audit, history, rebuild};

#[derive(Parser, Debug)]
#[command(name = "couponctl", version, about = "Coupon system: gateway, consumers and tools", long_about = None)]
struct Cli {
    #[command(flatten)]
    connections: Connections,

    /// Log format.
    #[arg(long, global = true, env = "LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Args, Debug, Clone)]
struct Connections {
    /// Postgres connection URL.
    #[arg(
        long,
        global = true,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/coupons"
    )]
    database_url: String,
    /// Redis connection URL.
    #[arg(
        long,
        global = true,
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    redis_url: String,
    /// Kafka bootstrap servers, comma separated.
    #[arg(
        long,
        global = true,
        env = "KAFKA_BROKERS",
        default_value = "127.0.0.1:9092"
    )]
    kafka_brokers: String,
    /// Prefix of every topic (`<prefix>.claims`, ...) and consumer group.
    #[arg(
        long,
        global = true,
        env = "COUPON_TOPIC_PREFIX",
        default_value = "coupons"
    )]
    topic_prefix: String,
    /// Prefix of every Redis key [default: the topic prefix].
    #[arg(long, global = true, env = "COUPON_REDIS_PREFIX")]
    redis_prefix: Option<String>,
    /// Turn off the idempotent producer (for brokers without InitProducerId).
    #[arg(long, global = true, env = "KAFKA_NO_IDEMPOTENCE")]
    kafka_no_idempotence: bool,
    /// Extra librdkafka properties, `key=value,key=value` (e.g. security.protocol=SSL).
    #[arg(long, global = true, env = "KAFKA_EXTRA", value_parser = parse_kafka_extra, default_value = "")]
    kafka_extra: KafkaExtra,
    /// Consumer-group protocol: `classic` (cooperative-sticky, any broker) or
    /// `consumer` (KIP-848, Kafka 4.0+).
    #[arg(
        long,
        global = true,
        env = "KAFKA_GROUP_PROTOCOL",
        default_value = "classic"
    )]
    kafka_group_protocol: GroupProtocol,
    /// Replicas of topics this process creates [default: the broker's
    /// default.replication.factor].
    #[arg(long, global = true, env = "TOPIC_REPLICATION", value_parser = clap::value_parser!(i32).range(1..))]
    topic_replication: Option<i32>,
}

#[derive(Debug, Clone, Default)]
struct KafkaExtra(Vec<(String, String)>);

fn parse_kafka_extra(raw: &str) -> Result<KafkaExtra, String> {
    raw.split(',')
        .filter(|pair| !pair.trim().is_empty())
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .ok_or_else(|| format!("{pair:?} is not key=value"))
        })
        .collect::<Result<_, _>>()
        .map(KafkaExtra)
}

#[derive(Args, Debug, Clone)]
struct ServeArgs {
    /// Address of the HTTP gateway (port 0 picks a free port).
    #[arg(long, env = "HTTP_ADDR", default_value = "127.0.0.1:8080")]
    http_addr: SocketAddr,
    /// How long a granted coupon is held for its user (e.g. 5m, 30s).
    #[arg(long, env = "HOLD_TTL", default_value = "5m", value_parser = humantime::parse_duration)]
    hold_ttl: Duration,
    /// The quota window: one coupon per user per window, aligned to UTC (1d = calendar day).
    #[arg(long, env = "QUOTA_WINDOW", default_value = "1d", value_parser = parse_window)]
    quota_window: QuotaWindow,
    /// How late a request may be decided and still be judged at the time the
    /// broker accepted it; holds are released this long after their deadline.
    #[arg(long, env = "HOLD_GRACE", default_value = "5s", value_parser = humantime::parse_duration)]
    hold_grace: Duration,
    /// Bearer token for admin routes (POST /api/v1/coupon, coupon holders):
    /// from the environment (COUPON_ADMIN_TOKEN), never from argv, which
    /// every local user can read. Unset closes the admin routes.
    #[arg(skip = secret_from_env("COUPON_ADMIN_TOKEN"))]
    admin_token: Option<Secret>,
    /// A file holding the admin bearer token (instead of COUPON_ADMIN_TOKEN).
    #[arg(long, env = "COUPON_ADMIN_TOKEN_FILE", value_parser = secret_from_file)]
    admin_token_file: Option<Secret>,
    /// Bearer token for the storefront routes, from the environment
    /// (COUPON_API_TOKEN), never from argv. Unset leaves them open, which
    /// only a loopback HTTP_ADDR allows.
    #[arg(skip = secret_from_env("COUPON_API_TOKEN"))]
    api_token: Option<Secret>,
    /// A file holding the storefront bearer token (instead of COUPON_API_TOKEN).
    #[arg(long, env = "COUPON_API_TOKEN_FILE", value_parser = secret_from_file)]
    api_token_file: Option<Secret>,
    /// Serve the storefront routes without COUPON_API_TOKEN on a non-loopback
    /// HTTP_ADDR: anyone who reaches it can claim and buy under any user id.
    #[arg(long, env = "COUPON_INSECURE_OPEN_STOREFRONT")]
    insecure_open_storefront: bool,
    /// How long the gateway waits for a decision (publishing included)
    /// before answering 504.
    #[arg(long, env = "REPLY_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    reply_timeout: Duration,
    /// Deadline of a whole HTTP request, body included (never shorter than
    /// REPLY_TIMEOUT + 1s); past it, 504.
    #[arg(long, env = "REQUEST_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    request_timeout: Duration,
    /// A client must send a request's headers within this; idle keep-alive
    /// connections are closed after it too.
    #[arg(long, env = "HEADER_READ_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    header_read_timeout: Duration,
    /// HTTP requests handled at once; beyond, 503 with Retry-After.
    #[arg(long, env = "MAX_IN_FLIGHT", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    max_in_flight: u32,
    /// Requests waiting for their decision at once; beyond, 503 with Retry-After.
    #[arg(long, env = "MAX_WAITING_REPLIES", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    max_waiting_replies: u32,
    /// Open HTTP connections; beyond, new ones are closed at once.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// Without COUPON_API_TOKEN: requests per second per client address
    /// beyond which the gateway answers 429.
    #[arg(long, env = "ADDRESS_LIMIT", default_value_t = 1000)]
    address_limit: u64,
    /// With COUPON_API_TOKEN: claims per second per user beyond which the
    /// user is blocked (blacklisted for FLOOD_BLOCK).
    #[arg(long, env = "FLOOD_LIMIT", default_value_t = 20)]
    flood_limit: u64,
    /// How long a flooding user stays blocked.
    #[arg(long, env = "FLOOD_BLOCK", default_value = "10m", value_parser = humantime::parse_duration)]
    flood_block: Duration,
    /// Partitions of topics created at start-up.
    #[arg(long, env = "TOPIC_PARTITIONS", default_value_t = 4)]
    partitions: i32,
    /// Broker long-poll (ms) for claims, purchases and gateway replies. Kafka
    /// answers as soon as a record arrives, so this bounds idle polling only.
    #[arg(long, env = "FAST_FETCH_WAIT_MS", default_value_t = 100)]
    fast_fetch_wait_ms: u32,
    /// Broker long-poll (ms) for coupons, expiry and history.
    #[arg(long, env = "SLOW_FETCH_WAIT_MS", default_value_t = 500)]
    slow_fetch_wait_ms: u32,
    /// Largest batch a consumer processes in one transaction.
    #[arg(long, env = "MAX_BATCH", default_value_t = 500)]
    max_batch: usize,
    /// How instances of a role share partitions: `group` (Kafka's consumer
    /// groups: run any number, partitions move as instances come and go) or a
    /// static share `INDEX/COUNT` (e.g. 0/2 and 1/2; no rebalancing).
    #[arg(long, env = "CONSUMER_INSTANCE", default_value = "group", value_parser = parse_assignment)]
    instance: Assignment,
    /// How often the expiry sweeper looks for overdue holds.
    #[arg(long, env = "SWEEP_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    sweep_interval: Duration,
    /// Postgres connections per process.
    #[arg(long, env = "DB_MAX_CONNECTIONS", default_value_t = 10)]
    db_max_connections: u32,
    /// Snowflake datacenter id (0-31) for coupons created through HTTP.
    #[arg(long, env = "COUPON_DATACENTER_ID", default_value_t = 0)]
    datacenter_id: u16,
    /// How often the metrics that need a query (pool, holds, consumer lag) are refreshed.
    #[arg(long, env = "METRICS_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    metrics_interval: Duration,
    /// Without the gateway (`consume`): serve GET /metrics on this address.
    #[arg(long, env = "METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
}

/// A token from the environment variable `name` (`None` when unset or empty).
fn secret_from_env(name: &str) -> Option<Secret> {
    std::env::var(name).ok().and_then(Secret::new)
}

/// A token from a file (surrounding whitespace, e.g. the final newline, is
/// not part of it).
fn secret_from_file(path: &str) -> Result<Secret, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    Secret::new(text).ok_or_else(|| format!("{path} is empty"))
}

impl ServeArgs {
    /// A token comes from the environment or from a file, not both.
    fn check_tokens(&self) -> anyhow::Result<()> {
        if self.api_token.is_some() && self.api_token_file.is_some() {
            anyhow::bail!("set COUPON_API_TOKEN or COUPON_API_TOKEN_FILE, not both");
        }
        if self.admin_token.is_some() && self.admin_token_file.is_some() {
            anyhow::bail!("set COUPON_ADMIN_TOKEN or COUPON_ADMIN_TOKEN_FILE, not both");
        }
        Ok(())
    }
}

fn parse_assignment(raw: &str) -> Result<Assignment, String> {
    if raw == "group" {
        return Ok(Assignment::Group);
    }
    let (index, count) = raw
        .split_once('/')
        .ok_or_else(|| format!("{raw:?} is not INDEX/COUNT or 'group'"))?;
    let index: u32 = index
        .parse()
        .map_err(|_| format!("bad instance index {index:?}"))?;
    let count: u32 = count
        .parse()
        .map_err(|_| format!("bad instance count {count:?}"))?;
    if count == 0 || index >= count {
        return Err(format!(
            "instance index must be below the count (got {index}/{count})"
        ));
    }
    Ok(Assignment::Static { index, count })
}

fn parse_window(raw: &str) -> Result<QuotaWindow, String> {
    let duration = humantime::parse_duration(raw).map_err(|e| e.to_string())?;
    QuotaWindow::new(duration).map_err(|e| e.to_string())
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Gateway plus every consumer in one process (the embedded default).
    #[command(after_help = "Example:\n  COUPON_ADMIN_TOKEN=secret couponctl run --hold-ttl 30s")]
    Run(ServeArgs),
    /// Only the HTTP gateway (run several behind a load balancer).
    #[command(after_help = "Example:\n  couponctl gateway --http-addr 0.0.0.0:8080")]
    Gateway(ServeArgs),
    /// One or more consumer roles; run more instances to scale out.
    #[command(
        after_help = "Example:\n  couponctl consume claims purchases --metrics-addr 127.0.0.1:9100"
    )]
    Consume {
        #[arg(required = true, value_enum)]
        roles: Vec<ConsumerRole>,
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// Release a batch of new coupons (employee tool).
    #[command(
        after_help = "Example:\n  couponctl issue --employee e1 --category Electronics --count 10000"
    )]
    Issue {
        /// The employee releasing the batch.
        #[arg(long)]
        employee: String,
        /// The coupons' category.
        #[arg(long)]
        category: String,
        /// How many coupons (1 to 1,000,000).
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Snowflake datacenter id (0-31).
        #[arg(long, env = "COUPON_DATACENTER_ID", default_value_t = 0)]
        datacenter_id: u16,
        /// Print every code (one per line) after the summary.
        #[arg(long)]
        print_codes: bool,
        /// Partitions of topics created if missing.
        #[arg(long, env = "TOPIC_PARTITIONS", default_value_t = 4)]
        partitions: i32,
    },
    /// Create the topics that are missing, then list them.
    #[command(after_help = "Example:\n  couponctl topics --partitions 8")]
    Topics {
        #[arg(long, env = "TOPIC_PARTITIONS", default_value_t = 4)]
        partitions: i32,
    },
    /// Apply database migrations.
    #[command(
        after_help = "Example:\n  DATABASE_URL=postgres://postgres@127.0.0.1:5432/coupons couponctl migrate"
    )]
    Migrate,
    /// Manage the blacklist.
    #[command(
        subcommand,
        after_help = "Examples:\n  couponctl blacklist add user-42 --for 24h --reason 'chargeback fraud'\n  couponctl blacklist list\n  couponctl blacklist remove user-42"
    )]
    Blacklist(BlacklistCommand),
    /// Manage the Redis copy of holds.
    #[command(subcommand, after_help = "Example:\n  couponctl holds rebuild")]
    Holds(HoldsCommand),
    /// Pool per category, overdue holds, consumer lag and service health.
    #[command(after_help = "Example:\n  couponctl status")]
    Status,
    /// Run the benchmarks against a fresh database (BENCH_QUICK=1 for a short run).
    #[command(after_help = "Example:\n  BENCH_QUICK=1 couponctl bench")]
    Bench {
        /// A short run (20,000 users) instead of the full 1,000,000.
        #[arg(long, env = "BENCH_QUICK", value_parser = clap::builder::FalseyValueParser::new())]
        quick: bool,
        /// Override the number of flash-sale users.
        #[arg(long, env = "BENCH_USERS")]
        users: Option<usize>,
        /// HTTP requests in flight at once.
        #[arg(long, env = "BENCH_CONCURRENCY", default_value_t = 128)]
        concurrency: usize,
        /// Where to write the flash sale over time (SVG: answers/s, p50, p99).
        #[arg(
            long,
            env = "BENCH_PLOT",
            default_value = "target/bench/flash-sale.svg"
        )]
        plot: PathBuf,
    },
    /// Run the whole system on a fresh database and play a flash sale through it.
    #[command(after_help = "Example:\n  couponctl demo --users 2000 --hold 5s")]
    Demo {
        /// Simulated users in the burst.
        #[arg(long, default_value_t = 1_000)]
        users: usize,
        /// Electronics coupons released.
        #[arg(long, default_value_t = 300)]
        electronics: u32,
        /// Books coupons released.
        #[arg(long, default_value_t = 200)]
        books: u32,
        /// The demo's hold, short so expirations happen while you watch.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        hold: Duration,
        /// Keep the demo database instead of dropping it.
        #[arg(long)]
        keep: bool,
    },
    /// Read topics from the start (or an offset, or a time) and write every
    /// event as a JSON line; or rebuild the projections into a fresh database.
    #[command(after_help = "Examples:
  couponctl replay --topic claims,claim-results --since 2026-11-25T00:00:00Z --output claims.jsonl
  couponctl replay --offset 1000 | jq -c 'select(.payload.outcome == \"CLAIM_OUTCOME_GRANTED\")'
  couponctl replay --rebuild postgres://postgres@127.0.0.1:5432/coupons_rebuilt

Each line: topic, topic_kind, partition, offset, timestamp_ms, key, envelope and
payload (the message without its envelope, enums by name, bytes in base64); a
record that does not decode has error and value_base64 instead. The replay reads
with its own group id and plain partition assignment, never commits, and stops at
the end each partition had when it started.")]
    Replay(ReplayArgs),
    /// Rebuild the state from the log into a scratch database and report every
    /// difference from the live database (exit code 1 if there is any).
    #[command(after_help = "Example:
  couponctl audit && echo 'the database matches the log'

Only records below the live consumer groups' committed offsets count; coupons and
users named by later records (still in flight) are left out. The scratch database
audit_<random> is created on the DATABASE_URL server and dropped afterwards.")]
    Audit(AuditArgs),
    /// Every history row of a user or a coupon, in time order.
    #[command(after_help = "Examples:
  couponctl history --user user-42
  couponctl history --coupon 0CKD3QF2R5T00 --since 2026-11-25T00:00:00Z --until 2026-11-26T00:00:00Z

One line per row, tab separated: time, kind, coupon, user, detail (JSON).")]
    History(HistoryArgs),
}

#[derive(Args, Debug)]
struct ReplayArgs {
    /// Topics to read, by short name, comma separated [default: all eight:
    /// created, claims, claim-results, purchases, purchase-results,
    /// expirations, dead-letter, blacklist].
    #[arg(long = "topic", value_name = "TOPICS", value_delimiter = ',', value_parser = replay::parse_kind)]
    topics: Vec<TopicKind>,
    /// Start at this offset in every partition [default: the beginning].
    #[arg(long, value_parser = clap::value_parser!(i64).range(0..))]
    offset: Option<i64>,
    /// Only records at or after this time (RFC 3339). Partitions are read from
    /// the start and filtered on the record time (or the event's time).
    #[arg(long, value_parser = replay::parse_time)]
    since: Option<DateTime<Utc>>,
    /// Only records at or before this time (RFC 3339). A partition is left
    /// at its first record more than a minute past it.
    #[arg(long, value_parser = replay::parse_time)]
    until: Option<DateTime<Utc>>,
    /// Write the records to this file [default: stdout].
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// `jsonl` (one JSON object per line) or `parquet` (columns; needs --output)
    /// [default: parquet when --output ends in .parquet, else jsonl].
    #[arg(long, value_enum)]
    format: Option<ReplayFormat>,
    /// Instead of JSON lines, project the log into this fresh database: it is
    /// migrated first, and refused if it already has coupons.
    #[arg(long, value_name = "DATABASE_URL", conflicts_with_all = ["topics", "offset", "since", "until", "output"])]
    rebuild: Option<String>,
    /// With --rebuild: the quota window the claim processors ran with (quota
    /// slots are named by their window's start).
    #[arg(long, env = "QUOTA_WINDOW", default_value = "1d", value_parser = parse_window)]
    quota_window: QuotaWindow,
    /// How late a request may be decided and still be judged at the time the
    /// broker accepted it; holds are released this long after their deadline.
    #[arg(long, env = "HOLD_GRACE", default_value = "5s", value_parser = humantime::parse_duration)]
    hold_grace: Duration,
}

#[derive(Args, Debug)]
struct AuditArgs {
    /// The quota window the claim processors run with (quota slots are named
    /// by their window's start).
    #[arg(long, env = "QUOTA_WINDOW", default_value = "1d", value_parser = parse_window)]
    quota_window: QuotaWindow,
    /// How late a request may be decided and still be judged at the time the
    /// broker accepted it; holds are released this long after their deadline.
    #[arg(long, env = "HOLD_GRACE", default_value = "5s", value_parser = humantime::parse_duration)]
    hold_grace: Duration,
}

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("subject").required(true).multiple(true).args(["user", "coupon"])))]
struct HistoryArgs {
    /// The user whose history to show.
    #[arg(long)]
    user: Option<String>,
    /// The coupon (code) whose history to show.
    #[arg(long)]
    coupon: Option<String>,
    /// Only rows at or after this time (RFC 3339).
    #[arg(long, value_parser = replay::parse_time)]
    since: Option<DateTime<Utc>>,
    /// Only rows at or before this time (RFC 3339).
    #[arg(long, value_parser = replay::parse_time)]
    until: Option<DateTime<Utc>>,
}

#[derive(Copy, Clone, Debug, ValueEnum, PartialEq, Eq)]
enum ReplayFormat {
    Jsonl,
    Parquet,
}

#[derive(Copy, Clone, Debug, ValueEnum, PartialEq, Eq)]
enum ConsumerRole {
    Coupons,
    Claims,
    Purchases,
    Expiry,
    History,
}

impl From<ConsumerRole> for Role {
    fn from(role: ConsumerRole) -> Self {
        match role {
            ConsumerRole::Coupons => Role::Coupons,
            ConsumerRole::Claims => Role::Claims,
            ConsumerRole::Purchases => Role::Purchases,
            ConsumerRole::Expiry => Role::Expiry,
            ConsumerRole::History => Role::History,
        }
    }
}

#[derive(Subcommand, Debug)]
enum BlacklistCommand {
    /// Blacklist a user (indefinitely unless --for is given).
    #[command(
        after_help = "Example:\n  couponctl blacklist add user-42 --for 24h --reason 'chargeback fraud'"
    )]
    Add {
        user: String,
        /// How long, e.g. 24h; omitted: until removed.
        #[arg(long = "for", value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
        #[arg(long, default_value = "manual")]
        reason: String,
    },
    /// Lift a user's blacklisting.
    #[command(after_help = "Example:\n  couponctl blacklist remove user-42")]
    Remove { user: String },
    /// List blacklisted users.
    #[command(after_help = "Example:\n  couponctl blacklist list")]
    List,
}

#[derive(Subcommand, Debug)]
enum HoldsCommand {
    /// Rewrite every live hold from Postgres into Redis.
    #[command(
        after_help = "Example:\n  couponctl holds rebuild   # after Redis lost its data; every start does it too"
    )]
    Rebuild,
}

impl Connections {
    fn kafka(&self) -> KafkaSettings {
        let mut kafka = KafkaSettings::new(&self.kafka_brokers);
        kafka.idempotent_producer = !self.kafka_no_idempotence;
        kafka.extra = self.kafka_extra.0.clone();
        kafka.group_protocol = self.kafka_group_protocol;
        kafka
    }

    fn app_config(&self, serve: &ServeArgs) -> AppConfig {
        let mut config = AppConfig::local(&self.topic_prefix);
        config.database_url = self.database_url.clone();
        config.redis_url = self.redis_url.clone();
        config.kafka = self.kafka();
        config.redis_prefix = self
            .redis_prefix
            .clone()
            .unwrap_or_else(|| self.topic_prefix.clone());
        config.http_addr = serve.http_addr;
        config.policy = Policy {
            hold_ttl: serve.hold_ttl,
            quota_window: serve.quota_window,
            hold_grace: serve.hold_grace,
            ..Policy::default()
        };
        config.gateway = GatewayConfig {
            api_token: serve.api_token_file.clone().or(serve.api_token.clone()),
            admin_token: serve.admin_token_file.clone().or(serve.admin_token.clone()),
            insecure_open_storefront: serve.insecure_open_storefront,
            reply_timeout: serve.reply_timeout,
            request_timeout: serve.request_timeout,
            header_read_timeout: serve.header_read_timeout,
            max_in_flight: serve.max_in_flight as usize,
            max_waiting: serve.max_waiting_replies as usize,
            max_connections: serve.max_connections as usize,
            address_limit_per_sec: serve.address_limit,
            flood_limit_per_sec: serve.flood_limit,
            flood_block: serve.flood_block,
            datacenter_id: serve.datacenter_id,
        };
        config.partitions = serve.partitions;
        config.replication = self.topic_replication;
        config.fast_fetch_wait_ms = serve.fast_fetch_wait_ms;
        config.slow_fetch_wait_ms = serve.slow_fetch_wait_ms;
        config.max_batch = serve.max_batch.max(1);
        config.assignment = serve.instance;
        config.sweep_interval = serve.sweep_interval;
        config.db_max_connections = serve.db_max_connections.max(2);
        config.producer_name = format!("couponctl@{}", std::process::id());
        config.metrics_interval = serve.metrics_interval.max(Duration::from_millis(100));
        config.metrics_addr = serve.metrics_addr;
        config
    }
}

fn init_logging(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    // The demo and the benchmarks print their own progress; the services'
    // start/stop lines would drown it (RUST_LOG still overrides).
    let default_filter = match cli.command {
        Command::Demo { .. } | Command::Bench { .. } => "warn",
        _ => "info,rdkafka=warn,sqlx=warn",
    };
    init_logging(cli.log_format, default_filter);
    if let Err(error) = dispatch(cli).await {
        eprintln!("error: {}", one_line(&error));
        std::process::exit(1);
    }
}

/// The error as one line: the error and its causes, or, when a service could
/// not be reached at all, just that (the causes of an unstarted service are
/// noise: the fix is to start it).
fn one_line(error: &anyhow::Error) -> String {
    match error
        .chain()
        .find_map(|cause| cause.downcast_ref::<reach::Unreachable>())
    {
        Some(unreachable) => unreachable.to_string(),
        None => format!("{error:#}"),
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let conn = cli.connections;
    match cli.command {
        Command::Run(serve) => {
            serve.check_tokens()?;
            serve_roles(conn.app_config(&serve), &Role::ALL).await
        }
        Command::Gateway(serve) => {
            serve.check_tokens()?;
            serve_roles(conn.app_config(&serve), &[Role::Gateway]).await
        }
        Command::Consume { roles, serve } => {
            let roles: Vec<Role> = roles.into_iter().map(Role::from).collect();
            serve_roles(conn.app_config(&serve), &roles).await
        }
        Command::Issue {
            employee,
            category,
            count,
            datacenter_id,
            print_codes,
            partitions,
        } => {
            issue(
                &conn,
                employee,
                category,
                count,
                datacenter_id,
                print_codes,
                partitions,
            )
            .await
        }
        Command::Topics { partitions } => {
            let topics = coupon_platform::Topics::new(&conn.topic_prefix);
            let created =
                app::create_topics(&conn.kafka(), &topics, partitions, conn.topic_replication)
                    .await?;
            for name in topics.all() {
                let note = if created.contains(&name) {
                    "created"
                } else {
                    "exists"
                };
                println!("{name}\t{note}");
            }
            Ok(())
        }
        Command::Migrate => {
            let pool = database(&conn).await?;
            coupon_platform::db::migrate(&pool)
                .await
                .context("applying migrations")?;
            println!("migrations applied");
            Ok(())
        }
        Command::Blacklist(command) => blacklist(&conn, command).await,
        Command::Demo {
            users,
            electronics,
            books,
            hold,
            keep,
        } => {
            let config = conn.app_config(&default_serve_args());
            let options = couponctl::demo::DemoOptions {
                users,
                electronics,
                books,
                hold_ttl: hold,
                keep,
            };
            let started = std::time::Instant::now();
            let summary = couponctl::demo::run(config, options).await?;
            println!("{summary}");
            match &summary.database_url {
                Some(url) => println!("kept the demo database: {url}"),
                None => println!(
                    "cleaned up: demo database dropped, Redis keys removed (its topics stay on the broker; `make clean-state` wipes broker data)"
                ),
            }
            println!("demo finished in {:.1}s", started.elapsed().as_secs_f64());
            Ok(())
        }
        Command::Status => {
            let config = conn.app_config(&default_serve_args());
            print!("{}", couponctl::status::report(&config).await?);
            Ok(())
        }
        Command::Bench {
            quick,
            users,
            concurrency,
            plot,
        } => {
            let config = conn.app_config(&default_serve_args());
            let mut options = if quick {
                couponctl::bench::BenchOptions::quick()
            } else {
                couponctl::bench::BenchOptions::full()
            };
            if let Some(users) = users {
                options.users = users;
            }
            options.concurrency = concurrency.max(1);
            options.plot = Some(plot);
            let rows = couponctl::bench::run(config, options).await?;
            println!("{}", couponctl::bench::render(&rows));
            println!("{}", couponctl::bench::render_targets(&rows));
            Ok(())
        }
        Command::Holds(HoldsCommand::Rebuild) => {
            let config = conn.app_config(&default_serve_args());
            let ctx = app::connect(&config).await?;
            let holds = coupon_consumers::expiry::rebuild_cache(&ctx).await?;
            println!("{holds} live holds written to Redis");
            Ok(())
        }
        Command::Replay(args) => replay(&conn, args).await,
        Command::Audit(args) => audit(&conn, args).await,
        Command::History(args) => history(&conn, args).await,
    }
}

async fn replay(conn: &Connections, args: ReplayArgs) -> anyhow::Result<()> {
    let topics = coupon_platform::Topics::new(&conn.topic_prefix);
    let kafka = conn.kafka();
    reach::kafka(&kafka.brokers).await?;
    if let Some(url) = args.rebuild {
        reach::postgres(&url).await?;
        let target = coupon_platform::db::connect(&url, 4)
            .await
            .with_context(|| {
                format!(
                    "connecting to the rebuild database at {}",
                    app::redact(&url)
                )
            })?;
        let bar = replay::progress_bar(0, "reading the log");
        let stats = rebuild::rebuild(&kafka, &topics, args.quota_window, &target, bar).await?;
        target.close().await;
        for example in &stats.anomaly_examples {
            eprintln!("warning: {example}");
        }
        println!("{stats}");
        return Ok(());
    }
    let options = ReplayOptions {
        kinds: args.topics,
        start: args.offset.map(StartAt::Offset).unwrap_or_default(),
        since: args.since,
        until: args.until,
    };
    let output = args.output;
    let parquet = match args.format {
        Some(format) => format == ReplayFormat::Parquet,
        None => output
            .as_ref()
            .is_some_and(|p| p.extension().is_some_and(|e| e == "parquet")),
    };
    if parquet && output.is_none() {
        anyhow::bail!("--format parquet needs --output FILE");
    }
    let summary = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let bar = replay::progress_bar(0, "replaying");
        if let (true, Some(path)) = (parquet, &output) {
            let mut sink = couponctl::parquet_export::ParquetSink::create(path)?;
            let summary = replay::replay_into(&kafka, &topics, &options, &mut sink, &bar);
            bar.finish_and_clear();
            return summary;
        }
        let mut out: Box<dyn std::io::Write> = match &output {
            Some(path) => Box::new(std::io::BufWriter::new(
                std::fs::File::create(path)
                    .with_context(|| format!("creating {}", path.display()))?,
            )),
            None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
        };
        let summary = replay::replay_json(&kafka, &topics, &options, &mut *out, &bar);
        bar.finish_and_clear();
        out.flush().context("writing the output")?;
        summary
    })
    .await
    .context("the replay stopped")??;
    eprintln!("{summary}");
    Ok(())
}

async fn audit(conn: &Connections, args: AuditArgs) -> anyhow::Result<()> {
    let topics = coupon_platform::Topics::new(&conn.topic_prefix);
    reach::kafka(&conn.kafka_brokers).await?;
    reach::postgres(&conn.database_url).await?;
    let bar = replay::progress_bar(0, "reading the log");
    let report = audit::audit(
        &conn.kafka(),
        &topics,
        args.quota_window,
        &conn.database_url,
        bar,
    )
    .await?;
    eprintln!("{}", report.rebuild);
    for example in &report.rebuild.anomaly_examples {
        eprintln!("warning: {example}");
    }
    if report.in_flight_records > 0 {
        eprintln!(
            "{} records still in flight: {} coupons and {} users left out",
            report.in_flight_records, report.coupons_skipped, report.users_skipped
        );
    }
    let mut stdout = std::io::stdout().lock();
    for line in &report.differences {
        writeln!(stdout, "{line}").context("writing the report")?;
    }
    if report.is_clean() {
        writeln!(stdout, "no differences ({})", report.checked()).context("writing the report")?;
        return Ok(());
    }
    let n = report.differences.len();
    anyhow::bail!("{n} difference{}", if n == 1 { "" } else { "s" })
}

async fn history(conn: &Connections, args: HistoryArgs) -> anyhow::Result<()> {
    let pool = database(conn).await?;
    let filter = history::HistoryFilter {
        user: args.user,
        coupon: args.coupon,
        since: args.since,
        until: args.until,
    };
    let rows = history::query(&pool, &filter)
        .await
        .context("reading coupon_history")?;
    if rows.is_empty() {
        eprintln!("no history rows");
    }
    let mut stdout = std::io::stdout().lock();
    for row in rows {
        writeln!(stdout, "{row}").context("writing the history")?;
    }
    Ok(())
}

fn default_serve_args() -> ServeArgs {
    #[derive(Parser)]
    struct Defaults {
        #[command(flatten)]
        serve: ServeArgs,
    }
    Defaults::parse_from(["couponctl"]).serve
}

async fn database(conn: &Connections) -> anyhow::Result<sqlx::PgPool> {
    reach::postgres(&conn.database_url).await?;
    coupon_platform::db::connect(&conn.database_url, 4)
        .await
        .with_context(|| {
            format!(
                "connecting to Postgres at {}",
                app::redact(&conn.database_url)
            )
        })
}

async fn serve_roles(config: AppConfig, roles: &[Role]) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let running = app::start(config, roles, shutdown.clone()).await?;
    let names: Vec<&str> = roles.iter().map(|r| r.name()).collect();
    tracing::info!(roles = ?names, http = ?running.http_addr, "couponctl started; Ctrl-C to stop");
    let signal_token = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        signal_token.cancel();
    });
    running.wait().await
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn issue(
    conn: &Connections,
    employee: String,
    category: String,
    count: u32,
    datacenter_id: u16,
    print_codes: bool,
    partitions: i32,
) -> anyhow::Result<()> {
    let request = coupon_producers::issue::IssueRequest {
        employee: EmployeeId::parse(employee)?,
        category: Category::parse(category)?,
        count,
    };
    if count == 0 || count > coupon_producers::issue::MAX_COUNT {
        anyhow::bail!(
            "--count must be between 1 and {}",
            coupon_producers::issue::MAX_COUNT
        );
    }
    let pool = database(conn).await?;
    coupon_platform::db::migrate(&pool)
        .await
        .context("applying migrations")?;
    let kafka = conn.kafka();
    let topics = coupon_platform::Topics::new(&conn.topic_prefix);
    app::create_topics(&kafka, &topics, partitions, conn.topic_replication).await?;
    let publisher = coupon_platform::kafka::Publisher::new(
        &kafka,
        &format!("couponctl-issue@{}", std::process::id()),
    )?;
    let bar = indicatif::ProgressBar::new(u64::from(count));
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} publishing [{bar:40}] {pos}/{len} coupons ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let started = std::time::Instant::now();
    let batch = coupon_producers::issue::issue(
        &pool,
        &publisher,
        &topics,
        datacenter_id,
        &request,
        |done| bar.set_position(done),
    )
    .await
    .with_context(|| format!("publishing to {} at {}", topics.created(), kafka.brokers))?;
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "issued {} {} coupons as batch {} in {:.2}s ({:.0}/s); first {}, last {}",
        batch.codes.len(),
        request.category,
        batch.batch_id,
        secs,
        batch.codes.len() as f64 / secs.max(1e-9),
        batch
            .codes
            .first()
            .map(ToString::to_string)
            .unwrap_or_default(),
        batch
            .codes
            .last()
            .map(ToString::to_string)
            .unwrap_or_default(),
    );
    if print_codes {
        for code in &batch.codes {
            println!("{code}");
        }
    }
    Ok(())
}

/// A producer for blacklist changes, once the broker answers (a producer
/// made first would log every failed connection before the one-line error).
async fn blacklist_publisher(
    kafka: &KafkaSettings,
) -> anyhow::Result<coupon_platform::kafka::Publisher> {
    reach::kafka(&kafka.brokers).await?;
    Ok(coupon_platform::kafka::Publisher::new(
        kafka,
        &format!("couponctl-blacklist@{}", std::process::id()),
    )?)
}

async fn blacklist(conn: &Connections, command: BlacklistCommand) -> anyhow::Result<()> {
    let pool = database(conn).await?;
    coupon_platform::db::migrate(&pool)
        .await
        .context("applying migrations")?;
    // Every change goes on the log too, so a rebuild restores it.
    let kafka = conn.kafka();
    let topics = coupon_platform::Topics::new(&conn.topic_prefix);
    let manual = coupon_producers::blacklist::Source::Manual;
    match command {
        BlacklistCommand::Add {
            user,
            duration,
            reason,
        } => {
            let user = UserId::parse(user)?;
            let publisher = blacklist_publisher(&kafka).await?;
            let blacklist = coupon_producers::blacklist::Blacklist {
                pool: &pool,
                publisher: &publisher,
                topics: &topics,
            };
            let until = match duration {
                Some(d) => Some(
                    chrono::Utc::now()
                        + chrono::Duration::from_std(d).context("--for is too long")?,
                ),
                None => None,
            };
            let entry = blacklist.add(user.as_str(), until, &reason, manual).await?;
            match entry.blacklisted_until {
                Some(until) => println!("{user} blacklisted until {}", until.to_rfc3339()),
                None => println!("{user} blacklisted until removed"),
            }
        }
        BlacklistCommand::Remove { user } => {
            let user = UserId::parse(user)?;
            let publisher = blacklist_publisher(&kafka).await?;
            let blacklist = coupon_producers::blacklist::Blacklist {
                pool: &pool,
                publisher: &publisher,
                topics: &topics,
            };
            if blacklist.remove(user.as_str(), manual).await? {
                println!("{user} removed from the blacklist");
            } else {
                anyhow::bail!("{user} is not blacklisted");
            }
        }
        BlacklistCommand::List => {
            let entries = coupon_producers::blacklist::list(&pool).await?;
            if entries.is_empty() {
                println!("no blacklisted users");
            }
            for e in entries {
                let until = e
                    .blacklisted_until
                    .map(|t| t.to_rfc3339())
                    .unwrap_or_else(|| "until removed".into());
                println!(
                    "{}\t{}\t{}",
                    e.user_id,
                    until,
                    e.blacklist_reason.unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}
