//! Every configuration default, written once.
//!
//! Each duration setting has its sane range beside it (`<NAME>_SPAN`): below
//! it a role spins or answers nothing in time, above it a deadline overflows
//! the clock or a hold outlives every window. The flag parses through it
//! ([`Span::parser`]), so an absurd value is refused before anything starts.
//!
//! `couponctl`'s flags show and use these (`default_value_t`), the library's
//! `Default`s and `AppConfig::local` start from them, the test harness takes
//! its fallbacks from them, and the Makefile reads the connection URLs from
//! this file. To change a default, change it here.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use coupon_domain::quota::compact_duration;
use coupon_domain::QuotaWindow;

// Connections (the local services `make up` starts).
pub const DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/coupons";
pub const REDIS_URL: &str = "redis://127.0.0.1:6379";
pub const KAFKA_BROKERS: &str = "127.0.0.1:9092";
// Postgres under Patroni (`make ha-up`): HAProxy's write port (the leader)
// and read port (the replicas, the leader when none is up). Point
// DATABASE_URL and DATABASE_READ_URL at them to run on the HA cluster.
pub const HA_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5440/coupons";
pub const HA_DATABASE_READ_URL: &str = "postgres://postgres@127.0.0.1:5439/coupons";
pub const TOPIC_PREFIX: &str = "coupons";
pub const HTTP_ADDR: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080));

// The history store (`HISTORY_STORE`): `postgres` (the partitioned
// `coupon_history` table) or `cassandra` (the node `make cassandra-up` starts).
pub const HISTORY_STORE: &str = "postgres";
pub const CASSANDRA_NODES: &str = "127.0.0.1:9042";
pub const CASSANDRA_KEYSPACE: &str = "coupons";
/// The keyspace's replication when the process creates it (a CQL map):
/// one copy on the local node; a cluster uses NetworkTopologyStrategy with
/// 3 per data centre.
pub const CASSANDRA_REPLICATION: &str = "{'class': 'SimpleStrategy', 'replication_factor': 1}";
/// Consistency of the history's writes and reads: a quorum of the local
/// data centre's replicas, so a read sees every acknowledged write and one
/// replica of three may be down.
pub const CASSANDRA_CONSISTENCY: &str = "local_quorum";
/// Writes (single-partition batches) in flight at once per history batch:
/// with the commit log fsynced before an acknowledgement, the writes in
/// flight share the fsyncs (measured: 2,779 rows/s at 32, 5,294 at 128).
pub const CASSANDRA_CONCURRENCY: usize = 128;
pub const CASSANDRA_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
pub const CASSANDRA_REQUEST_TIMEOUT_SPAN: Span =
    Span::new(Duration::from_millis(100), Duration::from_secs(120));

// The rules.
pub const HOLD_TTL: Duration = Duration::from_secs(300);
pub const HOLD_TTL_SPAN: Span = Span::new(Duration::from_secs(1), DAY);
pub const QUOTA_WINDOW: QuotaWindow = QuotaWindow::DAY;
/// The zone whose calendar days a window of whole days follows (`QUOTA_TZ`,
/// an IANA name): the shop's day, and so `Retry-After`'s next midnight.
pub const QUOTA_TZ: coupon_domain::Tz = coupon_domain::Tz::UTC;
pub const QUOTA_WINDOW_SPAN: Span = Span::new(Duration::from_secs(60), days(366));
pub const HOLD_GRACE: Duration = Duration::from_secs(5);
pub const HOLD_GRACE_SPAN: Span = Span::new(Duration::ZERO, Duration::from_secs(600));
pub const SOLD_OUT_MARK_TTL: Duration = Duration::from_secs(10);

// Retention (`coupon_platform::store::retention`): rows leave by partition.
/// How long a claim decision is kept after it was decided, and a quota slot
/// after its window ended: also how long a retried request id is recognised
/// (the dedup horizon). Five weeks: a month's disputes, and a retry's
/// answer, look the decision up.
pub const DECISION_RETENTION: Duration = days(35);
/// At least two days: longer than any hold and its grace (`HOLD_TTL_SPAN`
/// and `HOLD_GRACE_SPAN` end at a day and ten minutes), since a purchase
/// reads its hold's claim decision; at most ten years.
pub const DECISION_RETENTION_SPAN: Span = Span::new(days(2), days(3_660));
/// How long after a claim a client's retry under the same request id is
/// recognised and answered with the stored decision (at least this long,
/// and always within the claim's UTC day; a redelivered record always is):
/// the claim processor looks a batch's request ids up this far before its
/// records' time, so each lookup probes this many days' partitions, not
/// every day `DECISION_RETENTION` keeps.
pub const REQUEST_ID_HORIZON: Duration = DAY;
/// At least an hour (a storefront's retries), at most a year; and no
/// longer than `DECISION_RETENTION` (`ServeArgs::check`).
pub const REQUEST_ID_HORIZON_SPAN: Span = Span::new(HOUR, days(366));
/// `HISTORY_RETENTION` has no default: the history is kept for ever unless it
/// is set. Set, whole months leave once they ended that long ago.
pub const HISTORY_RETENTION_SPAN: Span = Span::new(days(31), days(36_600));
/// How often a process creates the coming partitions and drops the expired ones.
pub const PARTITION_UPKEEP_INTERVAL: Duration = HOUR;

// Topics and consumers.
pub const TOPIC_PARTITIONS: i32 = 4;
/// `retention.ms` of every topic: -1, for ever (the log is the truth that
/// replay, rebuild and audit read).
pub const LOG_RETENTION_MS: i64 = -1;
pub const FAST_FETCH_WAIT_MS: u32 = 100;
pub const SLOW_FETCH_WAIT_MS: u32 = 500;
pub const MAX_BATCH: usize = 2_000;
/// Claim processors per process (consumers of the claims group): batches of
/// different partitions are decided side by side.
pub const CLAIM_PROCESSORS: usize = 1;
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
pub const SWEEP_INTERVAL_SPAN: Span = Span::new(Duration::from_millis(10), Duration::from_secs(60));
pub const DB_MAX_CONNECTIONS: u32 = 10;
pub const METRICS_INTERVAL: Duration = Duration::from_secs(5);
pub const METRICS_INTERVAL_SPAN: Span = Span::new(Duration::from_millis(100), HOUR);
/// How often a gateway's process lifts the blacklist entries whose end has
/// passed and publishes the blacklist changes still waiting for the log.
pub const BLACKLIST_UPKEEP_INTERVAL: Duration = Duration::from_secs(10);
pub const BLACKLIST_UPKEEP_INTERVAL_SPAN: Span = Span::new(Duration::from_millis(100), HOUR);

// The gateway.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
pub const REPLY_TIMEOUT_SPAN: Span =
    Span::new(Duration::from_millis(100), Duration::from_secs(300));
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
pub const REQUEST_TIMEOUT_SPAN: Span =
    Span::new(Duration::from_millis(100), Duration::from_secs(600));
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
pub const HEADER_READ_TIMEOUT_SPAN: Span =
    Span::new(Duration::from_millis(100), Duration::from_secs(300));
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(5);
pub const BODY_READ_TIMEOUT_SPAN: Span =
    Span::new(Duration::from_millis(100), Duration::from_secs(300));
pub const MAX_IN_FLIGHT: u32 = 1024;
pub const MAX_WAITING_REPLIES: u32 = 1024;
pub const MAX_CONNECTIONS: u32 = 4096;
pub const ADDRESS_LIMIT: u64 = 1000;
pub const FLOOD_LIMIT: u64 = 20;
pub const FLOOD_BLOCK: Duration = Duration::from_secs(600);
pub const FLOOD_BLOCK_SPAN: Span = Span::new(Duration::from_secs(1), days(30));
/// The claim of an employee's OIDC token that names the employee.
pub const OIDC_EMPLOYEE_CLAIM: &str = "sub";
/// Clock skew allowed on an OIDC token's `exp` and `nbf`.
pub const OIDC_LEEWAY: Duration = Duration::from_secs(30);

const HOUR: Duration = Duration::from_secs(3_600);
const DAY: Duration = Duration::from_secs(86_400);

const fn days(n: u64) -> Duration {
    Duration::from_secs(n * 86_400)
}

/// The range a duration setting may take, bounds included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub min: Duration,
    pub max: Duration,
}

impl Span {
    pub const fn new(min: Duration, max: Duration) -> Self {
        Self { min, max }
    }

    /// `value` if it lies in the span, else why not, in words an operator
    /// can act on (`must be between 1s and 1d`).
    pub fn check(self, value: Duration) -> Result<Duration, String> {
        if value < self.min || value > self.max {
            return Err(format!(
                "must be between {} and {}",
                Flag(self.min),
                Flag(self.max)
            ));
        }
        Ok(value)
    }

    /// A flag's value parser: a duration (`5m`, `30s`) within the span.
    pub fn parser(self) -> impl Fn(&str) -> Result<Flag, String> + Clone + Send + Sync + 'static {
        move |raw| {
            let value = humantime::parse_duration(raw).map_err(|e| e.to_string())?;
            self.check(value).map(Flag)
        }
    }
}

/// A duration flag: parsed by `humantime` (`5m`, `30s`), shown as
/// [`compact_duration`] writes it, so `--help` prints a default as the
/// operator would type it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flag(pub Duration);

impl std::fmt::Display for Flag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&compact_duration(self.0))
    }
}

impl std::str::FromStr for Flag {
    type Err = humantime::DurationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        humantime::parse_duration(s).map(Flag)
    }
}

impl From<Flag> for Duration {
    fn from(flag: Flag) -> Self {
        flag.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duration_defaults_read_back_as_written() {
        for d in [
            HOLD_TTL,
            HOLD_GRACE,
            REPLY_TIMEOUT,
            FLOOD_BLOCK,
            METRICS_INTERVAL,
        ] {
            assert_eq!(Flag(d).to_string().parse::<Flag>().unwrap(), Flag(d));
        }
        assert_eq!(Flag(HOLD_TTL).to_string(), "5m");
        assert_eq!(HTTP_ADDR.to_string(), "127.0.0.1:8080");
    }

    #[test]
    fn every_default_lies_in_its_span() {
        for (default, span) in [
            (HOLD_TTL, HOLD_TTL_SPAN),
            (HOLD_GRACE, HOLD_GRACE_SPAN),
            (QUOTA_WINDOW.length(), QUOTA_WINDOW_SPAN),
            (SWEEP_INTERVAL, SWEEP_INTERVAL_SPAN),
            (METRICS_INTERVAL, METRICS_INTERVAL_SPAN),
            (BLACKLIST_UPKEEP_INTERVAL, BLACKLIST_UPKEEP_INTERVAL_SPAN),
            (REPLY_TIMEOUT, REPLY_TIMEOUT_SPAN),
            (REQUEST_TIMEOUT, REQUEST_TIMEOUT_SPAN),
            (HEADER_READ_TIMEOUT, HEADER_READ_TIMEOUT_SPAN),
            (BODY_READ_TIMEOUT, BODY_READ_TIMEOUT_SPAN),
            (FLOOD_BLOCK, FLOOD_BLOCK_SPAN),
            (DECISION_RETENTION, DECISION_RETENTION_SPAN),
            (REQUEST_ID_HORIZON, REQUEST_ID_HORIZON_SPAN),
        ] {
            assert_eq!(span.check(default), Ok(default), "{}", Flag(default));
            let parsed = span.parser()(&Flag(default).to_string());
            assert_eq!(parsed, Ok(Flag(default)));
        }
    }

    #[test]
    fn a_value_outside_its_span_is_refused_with_the_bounds() {
        let parse = HOLD_TTL_SPAN.parser();
        assert_eq!(parse("0s"), Err("must be between 1s and 1d".to_owned()));
        assert_eq!(parse("2d"), Err("must be between 1s and 1d".to_owned()));
        assert_eq!(parse("1d"), Ok(Flag(DAY)));
        assert!(parse("soon").is_err_and(|e| !e.is_empty()));
    }
}
