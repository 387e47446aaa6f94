//! What several commands share: how to reach the services ([`Connections`],
//! global flags) and how a serving process is configured ([`ServeArgs`]),
//! with the parsers of their values. Every flag has an environment fallback.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Args, Parser};

use coupon_analyst::history::HistorySource;
use coupon_consumers::history::{HistoryConfig, HistoryStore};
use coupon_consumers::Policy;
use coupon_domain::QuotaWindow;
use coupon_platform::cassandra::{CassandraHistory, CassandraSettings};
use coupon_platform::kafka::consumer::Assignment;
use coupon_platform::kafka::GroupProtocol;
use coupon_platform::settings::{self, Flag};
use coupon_platform::{reach, KafkaSettings};
use coupon_producers::gateway::employees::{EmployeeTokens, OidcSettings, OidcVerifier};
use coupon_producers::gateway::{EmployeeAuth, GatewayConfig, Secret};
use couponctl::app::{self, AppConfig, Role};

mod retention;
pub use retention::RetentionArgs;

#[derive(Args, Debug, Clone)]
pub struct Connections {
    /// Postgres connection URL.
    #[arg(
        long,
        global = true,
        env = "DATABASE_URL",
        default_value = settings::DATABASE_URL
    )]
    pub database_url: String,
    /// Postgres for what only reads: the coupon status route, the console's
    /// analytics, `history` and `audit` (replicas: `make ha-up` serves them
    /// on 127.0.0.1:5439) [default: DATABASE_URL].
    #[arg(long, global = true, env = "DATABASE_READ_URL")]
    pub database_read_url: Option<String>,
    /// Redis connection URL.
    #[arg(
        long,
        global = true,
        env = "REDIS_URL",
        default_value = settings::REDIS_URL
    )]
    pub redis_url: String,
    /// Kafka bootstrap servers, comma separated.
    #[arg(
        long,
        global = true,
        env = "KAFKA_BROKERS",
        default_value = settings::KAFKA_BROKERS
    )]
    pub kafka_brokers: String,
    /// Prefix of every topic (`<prefix>.claims`, ...) and consumer group.
    #[arg(
        long,
        global = true,
        env = "COUPON_TOPIC_PREFIX",
        default_value = settings::TOPIC_PREFIX
    )]
    pub topic_prefix: String,
    /// Prefix of every Redis key [default: the topic prefix].
    #[arg(long, global = true, env = "COUPON_REDIS_PREFIX")]
    pub redis_prefix: Option<String>,
    /// Turn off the idempotent producer (for brokers without InitProducerId).
    #[arg(long, global = true, env = "KAFKA_NO_IDEMPOTENCE")]
    pub kafka_no_idempotence: bool,
    /// Extra librdkafka properties, `key=value,key=value` (e.g. security.protocol=SSL).
    #[arg(long, global = true, env = "KAFKA_EXTRA", value_parser = parse_kafka_extra, default_value = "")]
    pub kafka_extra: KafkaExtra,
    /// Consumer-group protocol: `classic` (cooperative-sticky, any broker) or
    /// `consumer` (KIP-848, Kafka 4.0+).
    #[arg(
        long,
        global = true,
        env = "KAFKA_GROUP_PROTOCOL",
        default_value = "classic"
    )]
    pub kafka_group_protocol: GroupProtocol,
    /// Replicas of topics this process creates [default: the broker's
    /// default.replication.factor].
    #[arg(long, global = true, env = "TOPIC_REPLICATION", value_parser = clap::value_parser!(i32).range(1..))]
    pub topic_replication: Option<i32>,
    /// `retention.ms` of the topics this process creates (and that
    /// `couponctl topics` sets on existing ones): -1 keeps records for ever,
    /// which replay, rebuild and audit need; a finite value makes them
    /// refuse a log whose beginning is gone.
    #[arg(long, global = true, env = "LOG_RETENTION_MS", default_value_t = settings::LOG_RETENTION_MS, allow_hyphen_values = true, value_parser = clap::value_parser!(i64).range(-1..))]
    pub log_retention_ms: i64,
    /// Where the history is kept: `postgres` (the `coupon_history` table) or
    /// `cassandra` (CASSANDRA_NODES). The history role writes it, and
    /// `history`, the console and `audit` read it.
    #[arg(long, global = true, env = "HISTORY_STORE", default_value = settings::HISTORY_STORE)]
    pub history_store: HistoryStore,
    /// Cassandra contact points, `host:port`, comma separated.
    #[arg(long, global = true, env = "CASSANDRA_NODES", default_value = settings::CASSANDRA_NODES, value_parser = parse_nodes)]
    pub cassandra_nodes: String,
    /// The Cassandra keyspace of the history (created at start-up if missing).
    #[arg(long, global = true, env = "CASSANDRA_KEYSPACE", default_value = settings::CASSANDRA_KEYSPACE, value_parser = parse_keyspace)]
    pub cassandra_keyspace: String,
    /// Cassandra user (PasswordAuthenticator) [default: none].
    #[arg(long, global = true, env = "CASSANDRA_USERNAME")]
    pub cassandra_username: Option<String>,
    /// Cassandra password.
    #[arg(
        long,
        global = true,
        env = "CASSANDRA_PASSWORD",
        hide_env_values = true
    )]
    pub cassandra_password: Option<String>,
    /// Connect to Cassandra with TLS, trusting the CA certificates of this
    /// PEM file [default: no TLS].
    #[arg(long, global = true, env = "CASSANDRA_TLS_CA")]
    pub cassandra_tls_ca: Option<PathBuf>,
    /// The replication the keyspace is created with when missing (a CQL map).
    #[arg(long, global = true, env = "CASSANDRA_REPLICATION", default_value = settings::CASSANDRA_REPLICATION)]
    pub cassandra_replication: String,
    /// Consistency level of the history's writes and reads.
    #[arg(long, global = true, env = "CASSANDRA_CONSISTENCY", default_value = settings::CASSANDRA_CONSISTENCY, value_parser = coupon_platform::cassandra::parse_consistency)]
    pub cassandra_consistency: coupon_platform::cassandra::Consistency,
    /// Writes to Cassandra in flight at once (single-partition batches).
    #[arg(long, global = true, env = "CASSANDRA_CONCURRENCY", default_value_t = settings::CASSANDRA_CONCURRENCY, value_parser = parse_concurrency)]
    pub cassandra_concurrency: usize,
}

#[derive(Debug, Clone, Default)]
pub struct KafkaExtra(Vec<(String, String)>);

fn parse_nodes(raw: &str) -> Result<String, String> {
    if coupon_platform::cassandra::split_nodes(raw).is_empty() {
        return Err("no Cassandra node: host:port, comma separated".into());
    }
    Ok(raw.to_owned())
}

fn parse_concurrency(raw: &str) -> Result<usize, String> {
    match raw.parse::<usize>() {
        Ok(n @ 1..=1024) => Ok(n),
        _ => Err(format!("{raw:?}: must be a number from 1 to 1024")),
    }
}

fn parse_keyspace(raw: &str) -> Result<String, String> {
    coupon_platform::cassandra::check_keyspace(raw).map(|()| raw.to_owned())
}

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
pub struct ServeArgs {
    /// Address of the HTTP gateway (port 0 picks a free port).
    #[arg(long, env = "HTTP_ADDR", default_value_t = settings::HTTP_ADDR)]
    pub http_addr: SocketAddr,
    /// How long a granted coupon is held for its user (e.g. 5m, 30s).
    #[arg(long, env = "HOLD_TTL", default_value_t = Flag(settings::HOLD_TTL), value_parser = settings::HOLD_TTL_SPAN.parser())]
    pub hold_ttl: Flag,
    /// The quota window: one coupon per user per window (1d = the calendar day in QUOTA_TZ; shorter windows aligned to UTC).
    #[arg(long, env = "QUOTA_WINDOW", default_value_t = settings::QUOTA_WINDOW, value_parser = parse_window)]
    pub quota_window: QuotaWindow,
    /// The shop's time zone (IANA name, e.g. Europe/Berlin, Asia/Kolkata):
    /// windows of whole days are its calendar days, DST included.
    #[arg(long, env = "QUOTA_TZ", default_value_t = settings::QUOTA_TZ, value_parser = parse_zone)]
    pub quota_tz: coupon_domain::Tz,
    /// How late a request may be decided and still be judged at the time the
    /// broker accepted it; holds are released this long after their deadline.
    #[arg(long, env = "HOLD_GRACE", default_value_t = Flag(settings::HOLD_GRACE), value_parser = settings::HOLD_GRACE_SPAN.parser())]
    pub hold_grace: Flag,
    /// DECISION_RETENTION, REQUEST_ID_HORIZON, HISTORY_RETENTION.
    #[command(flatten)]
    pub retention: RetentionArgs,
    /// Bearer token for admin routes (POST /api/v1/coupon, coupon holders):
    /// from the environment (COUPON_ADMIN_TOKEN), never from argv, which
    /// every local user can read. Unset closes the admin routes.
    #[arg(skip = secret_from_env("COUPON_ADMIN_TOKEN"))]
    pub admin_token: Option<Secret>,
    /// A file holding the admin bearer token (instead of COUPON_ADMIN_TOKEN).
    #[arg(long, env = "COUPON_ADMIN_TOKEN_FILE", value_parser = secret_from_file)]
    pub admin_token_file: Option<Secret>,
    /// Bearer token for the storefront routes, from the environment
    /// (COUPON_API_TOKEN), never from argv. Unset leaves them open, which
    /// only a loopback HTTP_ADDR allows.
    /// Per-employee admin tokens: a file of `employee_id sha256:<hex>` (or
    /// `employee_id token`) lines.
    #[arg(long, env = "COUPON_EMPLOYEE_TOKENS")]
    pub employee_tokens: Option<PathBuf>,
    /// The identity provider's public keys (a JWKS file) that employees'
    /// OIDC bearer tokens are verified against.
    #[arg(long, env = "COUPON_OIDC_JWKS")]
    pub oidc_jwks: Option<PathBuf>,
    /// The `iss` employees' OIDC tokens must carry (with COUPON_OIDC_JWKS).
    #[arg(long, env = "COUPON_OIDC_ISSUER")]
    pub oidc_issuer: Option<String>,
    /// The `aud` employees' OIDC tokens must include (with COUPON_OIDC_JWKS).
    #[arg(long, env = "COUPON_OIDC_AUDIENCE")]
    pub oidc_audience: Option<String>,
    /// The OIDC claim that names the employee.
    #[arg(long, env = "COUPON_OIDC_EMPLOYEE_CLAIM", default_value = settings::OIDC_EMPLOYEE_CLAIM)]
    pub oidc_employee_claim: String,
    #[arg(skip = secret_from_env("COUPON_API_TOKEN"))]
    pub api_token: Option<Secret>,
    /// A file holding the storefront bearer token (instead of COUPON_API_TOKEN).
    #[arg(long, env = "COUPON_API_TOKEN_FILE", value_parser = secret_from_file)]
    pub api_token_file: Option<Secret>,
    /// Serve the storefront routes without COUPON_API_TOKEN on a non-loopback
    /// HTTP_ADDR: anyone who reaches it can claim and buy under any user id.
    #[arg(long, env = "COUPON_INSECURE_OPEN_STOREFRONT")]
    pub insecure_open_storefront: bool,
    /// How long the gateway waits for a decision (publishing included)
    /// before answering 504.
    #[arg(long, env = "REPLY_TIMEOUT", default_value_t = Flag(settings::REPLY_TIMEOUT), value_parser = settings::REPLY_TIMEOUT_SPAN.parser())]
    pub reply_timeout: Flag,
    /// Deadline of a whole HTTP request, body included (never shorter than
    /// REPLY_TIMEOUT + 1s); past it, 504.
    #[arg(long, env = "REQUEST_TIMEOUT", default_value_t = Flag(settings::REQUEST_TIMEOUT), value_parser = settings::REQUEST_TIMEOUT_SPAN.parser())]
    pub request_timeout: Flag,
    /// A client must send a request's headers within this; idle keep-alive
    /// connections are closed after it too.
    #[arg(long, env = "HEADER_READ_TIMEOUT", default_value_t = Flag(settings::HEADER_READ_TIMEOUT), value_parser = settings::HEADER_READ_TIMEOUT_SPAN.parser())]
    pub header_read_timeout: Flag,
    /// A client must send a request's body within this once its headers are
    /// in; past it, 408. The body is read before the request takes a slot.
    #[arg(long, env = "BODY_READ_TIMEOUT", default_value_t = Flag(settings::BODY_READ_TIMEOUT), value_parser = settings::BODY_READ_TIMEOUT_SPAN.parser())]
    pub body_read_timeout: Flag,
    /// HTTP requests handled at once; beyond, 503 with Retry-After.
    #[arg(long, env = "MAX_IN_FLIGHT", default_value_t = settings::MAX_IN_FLIGHT, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight: u32,
    /// Requests waiting for their decision at once; beyond, 503 with Retry-After.
    #[arg(long, env = "MAX_WAITING_REPLIES", default_value_t = settings::MAX_WAITING_REPLIES, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_waiting_replies: u32,
    /// Open HTTP connections; beyond, new ones are closed at once.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = settings::MAX_CONNECTIONS, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Without COUPON_API_TOKEN: requests per second per client address
    /// beyond which the gateway answers 429.
    #[arg(long, env = "ADDRESS_LIMIT", default_value_t = settings::ADDRESS_LIMIT)]
    pub address_limit: u64,
    /// With COUPON_API_TOKEN: claims per second per user beyond which the
    /// user is blocked (blacklisted for FLOOD_BLOCK).
    #[arg(long, env = "FLOOD_LIMIT", default_value_t = settings::FLOOD_LIMIT)]
    pub flood_limit: u64,
    /// How long a flooding user stays blocked.
    #[arg(long, env = "FLOOD_BLOCK", default_value_t = Flag(settings::FLOOD_BLOCK), value_parser = settings::FLOOD_BLOCK_SPAN.parser())]
    pub flood_block: Flag,
    /// Partitions of topics created at start-up.
    #[arg(long, env = "TOPIC_PARTITIONS", default_value_t = settings::TOPIC_PARTITIONS)]
    pub partitions: i32,
    /// Broker long-poll (ms) for claims, purchases and gateway replies. Kafka
    /// answers as soon as a record arrives, so this bounds idle polling only.
    #[arg(long, env = "FAST_FETCH_WAIT_MS", default_value_t = settings::FAST_FETCH_WAIT_MS)]
    pub fast_fetch_wait_ms: u32,
    /// Broker long-poll (ms) for coupons, expiry and history.
    #[arg(long, env = "SLOW_FETCH_WAIT_MS", default_value_t = settings::SLOW_FETCH_WAIT_MS)]
    pub slow_fetch_wait_ms: u32,
    /// Largest batch a consumer processes in one transaction.
    #[arg(long, env = "MAX_BATCH", default_value_t = settings::MAX_BATCH)]
    pub max_batch: usize,
    /// Claim processors in this process, each a member of the claims
    /// consumer group with its own partitions (`group` assignment only: a
    /// static share runs one).
    #[arg(long, env = "CLAIM_PROCESSORS", default_value_t = settings::CLAIM_PROCESSORS)]
    pub claim_processors: usize,
    /// How instances of a role share partitions: `group` (Kafka's consumer
    /// groups: run any number, partitions move as instances come and go) or a
    /// static share `INDEX/COUNT` (e.g. 0/2 and 1/2; no rebalancing).
    #[arg(long, env = "CONSUMER_INSTANCE", default_value = "group", value_parser = parse_assignment)]
    pub instance: Assignment,
    /// How often the expiry sweeper looks for overdue holds.
    #[arg(long, env = "SWEEP_INTERVAL", default_value_t = Flag(settings::SWEEP_INTERVAL), value_parser = settings::SWEEP_INTERVAL_SPAN.parser())]
    pub sweep_interval: Flag,
    /// How often a gateway lifts blacklist entries whose end has passed and
    /// publishes blacklist changes still waiting for the log.
    #[arg(long, env = "BLACKLIST_UPKEEP_INTERVAL", default_value_t = Flag(settings::BLACKLIST_UPKEEP_INTERVAL), value_parser = settings::BLACKLIST_UPKEEP_INTERVAL_SPAN.parser())]
    pub blacklist_upkeep_interval: Flag,
    /// Postgres connections per process.
    #[arg(long, env = "DB_MAX_CONNECTIONS", default_value_t = settings::DB_MAX_CONNECTIONS)]
    pub db_max_connections: u32,
    /// Snowflake datacenter id (0-31) for coupons created through HTTP.
    #[arg(long, env = "COUPON_DATACENTER_ID", default_value_t = 0)]
    pub datacenter_id: u16,
    /// How often the metrics that need a query (pool, holds, consumer lag) are refreshed.
    #[arg(long, env = "METRICS_INTERVAL", default_value_t = Flag(settings::METRICS_INTERVAL), value_parser = settings::METRICS_INTERVAL_SPAN.parser())]
    pub metrics_interval: Flag,
    /// Without the gateway (`consume`): serve GET /metrics on this address.
    #[arg(long, env = "METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
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
    /// Every setting is checked before anything starts: each duration by its
    /// flag's parser (its `settings::*_SPAN`), the rules between settings
    /// here; each refusal names the setting, its value and what it may be,
    /// in one line.
    pub fn check(&self, roles: &[Role]) -> anyhow::Result<()> {
        if self.hold_ttl.0 >= self.quota_window.length() {
            anyhow::bail!(
                "HOLD_TTL={} must be shorter than QUOTA_WINDOW={}: a hold that outlives \
                 its window lets a user hold a coupon into the next one",
                self.hold_ttl,
                Flag(self.quota_window.length())
            );
        }
        self.retention.check()?;
        if roles.contains(&Role::Gateway) {
            self.check_tokens()?;
            self.employee_auth()?;
        }
        Ok(())
    }

    /// The per-employee credentials: the token file and the OIDC verifier,
    /// read and checked (one line naming the setting when they cannot be
    /// used). Also refuses a storefront or admin token that is an
    /// employee's too: one token, one identity.
    pub fn employee_auth(&self) -> anyhow::Result<EmployeeAuth> {
        let mut auth = EmployeeAuth::default();
        if let Some(path) = &self.employee_tokens {
            let tokens = EmployeeTokens::from_file(path)
                .map_err(|e| anyhow::anyhow!("COUPON_EMPLOYEE_TOKENS: {e}"))?;
            let api = self.api_token_file.as_ref().or(self.api_token.as_ref());
            if let Some(holder) = api.and_then(|api| tokens.holder_of(api)) {
                anyhow::bail!(
                    "COUPON_API_TOKEN is employee {holder}'s token in COUPON_EMPLOYEE_TOKENS: \
                     the storefront's token must not open the admin routes"
                );
            }
            let admin = self.admin_token_file.as_ref().or(self.admin_token.as_ref());
            if let Some(holder) = admin.and_then(|admin| tokens.holder_of(admin)) {
                anyhow::bail!(
                    "COUPON_ADMIN_TOKEN is employee {holder}'s token in COUPON_EMPLOYEE_TOKENS: \
                     the shared token and an employee's must differ"
                );
            }
            auth.tokens = Some(Arc::new(tokens));
        }
        match (&self.oidc_jwks, &self.oidc_issuer, &self.oidc_audience) {
            (None, None, None) => {}
            (None, _, _) => anyhow::bail!(
                "COUPON_OIDC_ISSUER and COUPON_OIDC_AUDIENCE need COUPON_OIDC_JWKS (the keys \
                 the tokens are verified against)"
            ),
            (Some(_), None, _) | (Some(_), _, None) => anyhow::bail!(
                "COUPON_OIDC_JWKS needs COUPON_OIDC_ISSUER and COUPON_OIDC_AUDIENCE: a token \
                 of another issuer or for another service must not be accepted"
            ),
            (Some(jwks), Some(issuer), Some(audience)) => {
                let claim = self.oidc_employee_claim.trim();
                if claim.is_empty() {
                    anyhow::bail!("COUPON_OIDC_EMPLOYEE_CLAIM is empty");
                }
                let verifier = OidcVerifier::from_jwks_file(
                    jwks,
                    OidcSettings {
                        issuer: issuer.clone(),
                        audience: audience.clone(),
                        employee_claim: claim.to_owned(),
                        leeway: settings::OIDC_LEEWAY,
                    },
                )
                .map_err(|e| anyhow::anyhow!("COUPON_OIDC_JWKS: {e}"))?;
                auth.oidc = Some(Arc::new(verifier));
            }
        }
        Ok(auth)
    }

    /// A token comes from the environment or from a file, not both, and the
    /// storefront's is never the admin's (a storefront holding it could
    /// release coupons and read holders).
    pub fn check_tokens(&self) -> anyhow::Result<()> {
        if self.api_token.is_some() && self.api_token_file.is_some() {
            anyhow::bail!("set COUPON_API_TOKEN or COUPON_API_TOKEN_FILE, not both");
        }
        if self.admin_token.is_some() && self.admin_token_file.is_some() {
            anyhow::bail!("set COUPON_ADMIN_TOKEN or COUPON_ADMIN_TOKEN_FILE, not both");
        }
        let api = self.api_token_file.as_ref().or(self.api_token.as_ref());
        let admin = self.admin_token_file.as_ref().or(self.admin_token.as_ref());
        if let (Some(api), Some(admin)) = (api, admin) {
            if admin.matches(api.expose()) {
                anyhow::bail!(
                    "COUPON_API_TOKEN and COUPON_ADMIN_TOKEN are the same: the storefront's \
                     token must not open the admin routes"
                );
            }
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

/// A consumer role by name (the catalogue's `Role::CONSUMERS`).
pub fn consumer_role() -> impl clap::builder::TypedValueParser<Value = Role> {
    use clap::builder::TypedValueParser as _;
    let names = Role::CONSUMERS.map(Role::name);
    clap::builder::PossibleValuesParser::new(names).try_map(|name| name.parse::<Role>())
}

/// An IANA zone name (`QUOTA_TZ`); anything else is refused in one line.
pub fn parse_zone(raw: &str) -> Result<coupon_domain::Tz, String> {
    coupon_domain::quota::parse_zone(raw).map_err(|e| e.to_string())
}

pub fn parse_window(raw: &str) -> Result<QuotaWindow, String> {
    let duration = humantime::parse_duration(raw).map_err(|e| e.to_string())?;
    let duration = settings::QUOTA_WINDOW_SPAN.check(duration)?;
    QuotaWindow::new(duration).map_err(|e| e.to_string())
}

impl Connections {
    pub fn kafka(&self) -> KafkaSettings {
        let mut kafka = KafkaSettings::new(&self.kafka_brokers);
        kafka.idempotent_producer = !self.kafka_no_idempotence;
        kafka.extra = self.kafka_extra.0.clone();
        kafka.group_protocol = self.kafka_group_protocol;
        kafka
    }

    /// Where the history is kept, as the flags say.
    pub fn history(&self) -> HistoryConfig {
        match self.history_store {
            HistoryStore::Postgres => HistoryConfig::default(),
            HistoryStore::Cassandra => HistoryConfig::cassandra(self.cassandra()),
        }
    }

    /// How to reach Cassandra, as the flags say.
    pub fn cassandra(&self) -> CassandraSettings {
        let mut settings = CassandraSettings::new(&self.cassandra_nodes, &self.cassandra_keyspace);
        settings.username = self.cassandra_username.clone();
        settings.password = self.cassandra_password.clone();
        settings.tls_ca = self.cassandra_tls_ca.clone();
        settings.replication = self.cassandra_replication.clone();
        settings.consistency = self.cassandra_consistency;
        settings.concurrency = self.cassandra_concurrency;
        settings
    }

    pub fn app_config(&self, serve: &ServeArgs) -> AppConfig {
        let mut config = AppConfig::local(&self.topic_prefix);
        config.history = self.history();
        config.database_url = self.database_url.clone();
        config.database_read_url = self.database_read_url.clone();
        config.redis_url = self.redis_url.clone();
        config.kafka = self.kafka();
        config.redis_prefix = self
            .redis_prefix
            .clone()
            .unwrap_or_else(|| self.topic_prefix.clone());
        config.http_addr = serve.http_addr;
        config.policy = Policy {
            hold_ttl: serve.hold_ttl.0,
            quota_window: serve.quota_window.in_zone(serve.quota_tz),
            hold_grace: serve.hold_grace.0,
            request_id_horizon: serve.retention.request_id_horizon.0,
            ..Policy::default()
        };
        config.gateway = GatewayConfig {
            api_token: serve.api_token_file.clone().or(serve.api_token.clone()),
            admin_token: serve.admin_token_file.clone().or(serve.admin_token.clone()),
            // Read by `serve`, after `ServeArgs::check` (files are read once
            // the settings are known good).
            employees: EmployeeAuth::default(),
            insecure_open_storefront: serve.insecure_open_storefront,
            reply_timeout: serve.reply_timeout.0,
            request_timeout: serve.request_timeout.0,
            header_read_timeout: serve.header_read_timeout.0,
            body_read_timeout: serve.body_read_timeout.0,
            max_in_flight: serve.max_in_flight as usize,
            max_waiting: serve.max_waiting_replies as usize,
            max_connections: serve.max_connections as usize,
            address_limit_per_sec: serve.address_limit,
            address_limit_loopback: false,
            flood_limit_per_sec: serve.flood_limit,
            flood_block: serve.flood_block.0,
            datacenter_id: serve.datacenter_id,
        };
        config.partitions = serve.partitions;
        config.replication = self.topic_replication;
        config.retention_ms = self.log_retention_ms;
        config.fast_fetch_wait_ms = serve.fast_fetch_wait_ms;
        config.slow_fetch_wait_ms = serve.slow_fetch_wait_ms;
        config.max_batch = serve.max_batch.max(1);
        config.claim_processors = serve.claim_processors.max(1);
        config.assignment = serve.instance;
        config.sweep_interval = serve.sweep_interval.0;
        config.blacklist_upkeep_interval = serve.blacklist_upkeep_interval.0;
        config.retention = serve.retention.retention();
        config.db_max_connections = serve.db_max_connections.max(2);
        config.producer_name = format!("couponctl@{}", std::process::id());
        config.metrics_interval = serve.metrics_interval.0;
        config.metrics_addr = serve.metrics_addr;
        config
    }
}

pub fn default_serve_args() -> ServeArgs {
    #[derive(Parser)]
    struct Defaults {
        #[command(flatten)]
        serve: ServeArgs,
    }
    Defaults::parse_from(["couponctl"]).serve
}

pub async fn database(conn: &Connections) -> anyhow::Result<sqlx::PgPool> {
    connect_to(&conn.database_url).await
}

/// The pool of a tool that only reads: DATABASE_READ_URL (replicas, whose
/// answers may lag the leader by their replay delay), else DATABASE_URL.
pub async fn read_database(conn: &Connections) -> anyhow::Result<sqlx::PgPool> {
    connect_to(
        conn.database_read_url
            .as_deref()
            .unwrap_or(&conn.database_url),
    )
    .await
}

/// Where a tool reads the history: Postgres (DATABASE_READ_URL, else
/// DATABASE_URL) or, with HISTORY_STORE=cassandra, Cassandra (one attempt:
/// a tool fails with one line rather than wait for an outage to end).
pub async fn history_source(conn: &Connections) -> anyhow::Result<HistorySource> {
    Ok(match conn.history_store {
        HistoryStore::Postgres => HistorySource::Postgres(read_database(conn).await?),
        HistoryStore::Cassandra => {
            let settings = conn.cassandra();
            let store = CassandraHistory::connect(&settings).await.with_context(|| {
                format!(
                    "reaching the history in Cassandra at {} (is it running? `make cassandra-up` starts the local one)",
                    settings.nodes.join(",")
                )
            })?;
            HistorySource::Cassandra(store)
        }
    })
}

async fn connect_to(url: &str) -> anyhow::Result<sqlx::PgPool> {
    reach::postgres(url).await?;
    coupon_platform::db::connect(url, 4)
        .await
        .with_context(|| format!("connecting to Postgres at {}", app::redact(url)))
}
