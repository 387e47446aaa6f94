//! What every handler shares: the stores, the publisher, the replies it waits
//! for, the limits, and the blacklist as last read (for the sold-out fast path).

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::Semaphore;

use coupon_domain::UserId;
use coupon_platform::kafka::Publisher;
use coupon_platform::redis::Cache;
use coupon_platform::store;
use coupon_platform::Topics;

use super::auth::AddressLimiter;
use super::console;
use super::GatewayConfig;
use super::Replies;

pub struct GatewayState {
    pub pool: PgPool,
    /// What the read-only routes read (coupon status, the console's
    /// analytics): replicas when DATABASE_READ_URL is set, else `pool`.
    pub read_pool: PgPool,
    pub cache: Cache,
    pub publisher: Publisher,
    pub topics: Topics,
    pub replies: Arc<Replies>,
    pub config: GatewayConfig,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    pub(super) in_flight: Arc<Semaphore>,
    pub(super) addresses: AddressLimiter,
    /// The users blacklisted now, as read from Postgres at most
    /// [`BLACKLIST_REFRESH`] ago; `None` until read (or while Postgres does
    /// not answer), when no claim takes the sold-out fast path.
    pub(super) blacklisted: std::sync::RwLock<Option<Arc<std::collections::HashSet<String>>>>,
    /// What `GET /api/v1/analytics/export` reads the log with (none: that
    /// route answers `503`); the binary provides it ([`GatewayState::with_exporter`]).
    pub(super) exporter: Option<Arc<dyn console::Exporter>>,
    /// This gateway's downloads: how many run, what they produced.
    pub exports: Arc<console::ExportStats>,
    /// Where the console's analytics read the history when it is in
    /// Cassandra (`HISTORY_STORE=cassandra`; none: `coupon_history` in
    /// `read_pool`), reached on first use.
    pub history: Option<Arc<coupon_platform::cassandra::LazyCassandra>>,
}

/// How often a gateway rereads the blacklist for the sold-out fast path: a
/// user blacklisted within this long may still be told `sold_out` (never
/// given a coupon) instead of `403`.
pub const BLACKLIST_REFRESH: Duration = Duration::from_secs(1);

impl GatewayState {
    /// `replies` should be [`Replies::bounded`] by `config.max_waiting`.
    pub fn new(
        pool: PgPool,
        cache: Cache,
        publisher: Publisher,
        topics: Topics,
        replies: Arc<Replies>,
        config: GatewayConfig,
        metrics: metrics_exporter_prometheus::PrometheusHandle,
    ) -> Self {
        Self {
            in_flight: Arc::new(Semaphore::new(config.max_in_flight.max(1))),
            addresses: AddressLimiter::new(config.address_limit_per_sec),
            blacklisted: std::sync::RwLock::new(None),
            exporter: None,
            exports: Arc::default(),
            history: None,
            read_pool: pool.clone(),
            pool,
            cache,
            publisher,
            topics,
            replies,
            config,
            metrics,
        }
    }

    /// Reads the read-only routes from `pool` (replicas).
    pub fn with_read_pool(mut self, pool: PgPool) -> Self {
        self.read_pool = pool;
        self
    }

    /// Reads the console's analytics from the history in Cassandra.
    pub fn with_cassandra_history(
        mut self,
        settings: coupon_platform::cassandra::CassandraSettings,
    ) -> Self {
        self.history = Some(Arc::new(coupon_platform::cassandra::LazyCassandra::new(
            settings,
        )));
        self
    }

    /// Lets the console download ranges of the log with `exporter`.
    pub fn with_exporter(mut self, exporter: Arc<dyn console::Exporter>) -> Self {
        self.exporter = Some(exporter);
        self
    }

    /// Whether `user` may be blacklisted: true when on the list last read,
    /// and when no list could be read.
    pub(super) fn maybe_blacklisted(&self, user: &str) -> bool {
        match self.blacklisted.read() {
            Ok(list) => list.as_ref().is_none_or(|users| users.contains(user)),
            Err(_) => true,
        }
    }

    /// Rereads the blacklist every [`BLACKLIST_REFRESH`] while the gateway
    /// runs (until the state is dropped).
    pub(super) async fn refresh_blacklist(state: std::sync::Weak<GatewayState>) {
        let mut tick = tokio::time::interval(BLACKLIST_REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(state) = state.upgrade() else { return };
            let read = store::users::blacklisted_now(&state.pool).await;
            let list = match read {
                Ok(users) => Some(Arc::new(
                    users.into_iter().map(UserId::into_string).collect(),
                )),
                Err(error) => {
                    tracing::debug!(%error, "cannot read the blacklist; no sold-out fast path");
                    None
                }
            };
            let stored = match state.blacklisted.write() {
                Ok(mut slot) => {
                    *slot = list;
                    true
                }
                Err(_) => false,
            };
            if !stored {
                return;
            }
        }
    }

    /// Requests being handled now.
    pub fn in_flight(&self) -> usize {
        self.config
            .max_in_flight
            .max(1)
            .saturating_sub(self.in_flight.available_permits())
    }
}
