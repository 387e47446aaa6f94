//! The consumers: each projects one kind of event into Postgres (and Redis),
//! and some publish a decision in turn.
//!
//! | role        | reads                         | writes                                   |
//! |-------------|-------------------------------|------------------------------------------|
//! | `coupons`   | `created`                     | `coupons` rows                           |
//! | `claims`    | `claims`                      | holds, quota, `claim-results`            |
//! | `purchases` | `purchases`                   | redemptions, `purchase-results`          |
//! | `expiry`    | `expirations` (+ the sweeper) | released holds, history                  |
//! | `history`   | `created`, `*-results`        | `coupon_history`, or Cassandra           |
//! | `profiles`  | `users`                       | `users` profiles (name, dob, location)   |
//!
//! Every role has the same shape: a `Handler` implementing
//! [`coupon_platform::kafka::RoleHandler`] (its role, from
//! `coupon_schemas::Role`, which owns the topics it reads), whose `handle`
//! calls the module's `handle_batch` (one batch, callable from tests); one
//! [`run`] drives any of them. Module docs state each one's delivery
//! guarantee; all of them store offsets only after the batch is durable.

use std::time::Duration;

use sqlx::PgPool;

use tokio_util::sync::CancellationToken;

use coupon_domain::QuotaWindow;
use coupon_platform::kafka::consumer::{BatchError, DeadLetters};
use coupon_platform::kafka::role;
use coupon_platform::kafka::{Publisher, Record};
use coupon_platform::redis::Cache;
use coupon_platform::{KafkaSettings, Topics};

pub use coupon_platform::kafka::PollSettings;
pub use coupon_schemas::Role;

pub mod claims;
pub mod coupons;
pub mod created;
pub mod expiry;
pub mod history;
pub mod profiles;
pub mod purchases;
pub mod restore;

/// Coupons became available (after the commit that made them so): voids
/// every sold-out mark in Redis (`coupon_domain::sold_out`). Redis trouble
/// costs speed only: a mark it leaves standing expires within
/// `Policy::sold_out_mark_ttl`, and the gateway falls back to asking the
/// claim processor whenever it cannot read Redis.
pub async fn supply_changed(ctx: &Context) {
    if let Err(error) = ctx.cache.supply_changed().await {
        metrics::counter!("coupon_supply_signal_failures_total").increment(1);
        tracing::warn!(%error, "could not void the sold-out marks in Redis");
    }
}

/// The rules a deployment runs with.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub hold_ttl: Duration,
    pub quota_window: QuotaWindow,
    /// How far a request's broker time may lie behind the database's clock
    /// and still count (see [`coupon_domain::clock`]): a purchase accepted
    /// before its hold's deadline is honoured if decided within this long
    /// after it, and holds are released this long after their deadline.
    pub hold_grace: Duration,
    /// How long a sold-out mark lives at most (see `coupon_domain::sold_out`).
    /// Every supply voids the marks at once; this bounds only the case that
    /// cannot: a supply whose Redis write was lost (Redis unreachable then).
    pub sold_out_mark_ttl: Duration,
    /// How long after a claim a client's retry under its request id is
    /// still recognised (`REQUEST_ID_HORIZON`; redeliveries always are).
    pub request_id_horizon: Duration,
}

impl Default for Policy {
    /// The defaults of `coupon_platform::settings`.
    fn default() -> Self {
        use coupon_platform::settings;
        Self {
            hold_ttl: settings::HOLD_TTL,
            quota_window: settings::QUOTA_WINDOW,
            hold_grace: settings::HOLD_GRACE,
            sold_out_mark_ttl: settings::SOLD_OUT_MARK_TTL,
            request_id_horizon: settings::REQUEST_ID_HORIZON,
        }
    }
}

/// What every consumer needs: the stores, the producer and the rules.
#[derive(Clone)]
pub struct Context {
    pub pool: PgPool,
    pub cache: Cache,
    pub publisher: Publisher,
    pub topics: Topics,
    pub kafka: KafkaSettings,
    pub policy: Policy,
    /// What this process knows of the Redis mirror (`restore`).
    pub mirror: restore::MirrorState,
    /// Where the history is kept (`HISTORY_STORE`), see [`history`].
    pub history: history::HistoryConfig,
}

impl Context {
    pub fn dead_letters(&self, role: Role) -> DeadLetters {
        DeadLetters::new(
            self.publisher.clone(),
            self.topics.dead_letter(),
            role.name(),
        )
    }
}

/// An id of an invalid request as its answer repeats it (the answer is
/// keyed by the user id, a waiting purchase is matched by its order id, and
/// the history stores both): bounded, and without control characters,
/// because a NUL reaching Postgres fails the history sink's batch on every
/// retry.
pub(crate) fn echoed_id(raw: &str) -> String {
    raw.chars().filter(|c| !c.is_control()).take(128).collect()
}

/// The id a request's log lines share from HTTP to decision: the gateway's
/// `x-request-id` travels as the envelope's correlation id (and is also the
/// request id); a request published straight to Kafka may carry only its own
/// request id.
pub(crate) fn log_request_id<'a>(correlation_id: &'a str, request_id: &'a str) -> &'a str {
    if correlation_id.is_empty() {
        request_id
    } else {
        correlation_id
    }
}

/// One decision of a batch, for the log: `grep <request id>` on the logs
/// follows a claim or purchase from the gateway to its decision. At `debug`:
/// the default level writes one line per request, the gateway's answer.
pub(crate) struct Decided {
    pub request_id: String,
    pub user_id: String,
    pub outcome: &'static str,
    pub coupon_code: Option<String>,
    /// The request was decided before (a redelivery or a client's retry):
    /// this is the stored decision again.
    pub redelivered: bool,
    /// Why an invalid request was refused.
    pub reason: Option<String>,
}

impl Decided {
    pub fn log(&self, kind: &'static str) {
        tracing::debug!(
            request_id = %self.request_id,
            user = %self.user_id,
            outcome = %self.outcome,
            coupon = self.coupon_code.as_deref().unwrap_or(""),
            redelivered = self.redelivered,
            reason = self.reason.as_deref().unwrap_or(""),
            "{kind} decided"
        );
    }
}

/// Declares a role module's `Handler` and its
/// [`coupon_platform::kafka::RoleHandler`] implementation, the same for every
/// role: its `Event` is the given type, `handle` is the module's
/// `handle_events` (the batch's decoded events); `reject` sends the record
/// to the dead-letter topic, or, with `answers`, calls the module's own
/// `reject` (which also answers the requester, so a gateway waiting for the
/// decision does not time out). Also declares the module's `handle_batch`:
/// one batch of raw records through the shared decode → handle →
/// dead-letter step, as the consumer loop runs it (the tests drive it).
#[macro_export]
#[doc(hidden)]
macro_rules! role_handler {
    ($role:expr, $event:ty) => {
        $crate::role_handler!(@impl $role, $event, |ctx, record, reason| $crate::dead_letter_one(ctx, $role, record, reason));
    };
    ($role:expr, $event:ty, answers) => {
        $crate::role_handler!(@impl $role, $event, |ctx, record, reason| reject(ctx, record, reason));
    };
    (@impl $role:expr, $event:ty, |$ctx:ident, $record:ident, $reason:ident| $reject:expr) => {
        /// This role, as the batch loop drives it.
        pub struct Handler(pub $crate::Context);

        impl coupon_platform::kafka::RoleHandler for Handler {
            const ROLE: $crate::Role = $role;
            type Event = $event;

            async fn handle(
                &self,
                batch: Vec<coupon_platform::kafka::role::Decoded<$event>>,
            ) -> Result<
                coupon_platform::kafka::consumer::Confirmations,
                coupon_platform::kafka::consumer::BatchError,
            > {
                handle_events(&self.0, &batch).await.map(Into::into)
            }

            async fn reject(
                &self,
                record: coupon_platform::kafka::Record,
                reason: String,
            ) -> Result<(), coupon_platform::kafka::consumer::BatchError> {
                let ($ctx, $record, $reason) = (&self.0, &record, reason.as_str());
                $reject.await
            }
        }

        /// One batch of records as the consumer loop handles it: decoded,
        /// handled, the undecodable ones set aside, what it published
        /// confirmed.
        pub async fn handle_batch(
            ctx: &$crate::Context,
            batch: &[coupon_platform::kafka::Record],
        ) -> Result<(), coupon_platform::kafka::consumer::BatchError> {
            coupon_platform::kafka::role::handle_records(
                &Handler(ctx.clone()),
                &ctx.topics,
                batch.to_vec(),
            )
            .await?
            .confirmed()
            .await
        }
    };
}

/// The `reject` of roles whose records have no requester to answer: the
/// record goes to the dead-letter topic with the reason.
#[doc(hidden)]
pub async fn dead_letter_one(
    ctx: &Context,
    role: Role,
    record: &Record,
    reason: &str,
) -> Result<(), BatchError> {
    ctx.dead_letters(role).send(record, reason).await?;
    Ok(())
}

/// Publishes the `invalid` answer to a request being set aside. An answer
/// the broker refuses for good (it cannot be made to fit) is given up, so
/// that the record still reaches the dead-letter topic: its requester times
/// out instead of waiting on a partition that never moves again.
pub(crate) async fn answer_if_possible<E: coupon_schemas::Event>(
    ctx: &Context,
    topic: &str,
    answer: (String, E),
) -> Result<(), BatchError> {
    match ctx.publisher.send_all(topic, &[answer]).await {
        Ok(()) => Ok(()),
        Err(error) if error.is_permanent() => {
            tracing::error!(%error, "the answer to a record set aside cannot be published; dead-lettering it unanswered");
            Ok(())
        }
        Err(error) => Err(error.into()),
    }
}

/// The database's clock, read in the batch's transaction (see
/// [`coupon_platform::store::db_now`]).
pub(crate) use coupon_platform::store::db_now;

/// How a consumer role is run: what the binary reads to start it, instead
/// of matching on role names (a new role must say, or it does not compile).
#[derive(Debug, Clone, Copy)]
pub struct RoleSpec {
    /// A client waits for its answers: it polls with the short fetch wait
    /// (`FAST_FETCH_WAIT_MS`), the others with the long one.
    pub answers_clients: bool,
    /// Safe and useful as several instances in one process (batches of
    /// different partitions decided side by side).
    pub scales_out: bool,
    /// Reads the Redis mirror: the process refills it before starting.
    pub restores_cache: bool,
    /// Writes the history: the process keeps its monthly partitions ahead.
    pub writes_history: bool,
    /// The counter of the decisions it makes, by outcome: registered at zero
    /// for every outcome when the process starts, so a dashboard sees each
    /// series before its first decision.
    pub decisions: Option<DecisionCounter>,
}

/// A role's decision counter: its metric name and every outcome label.
#[derive(Debug, Clone, Copy)]
pub struct DecisionCounter {
    pub metric: &'static str,
    pub outcomes: fn() -> Vec<&'static str>,
}

/// The spec of `role`; `None` for the gateway, which consumes nothing.
pub fn spec(role: Role) -> Option<RoleSpec> {
    let base = RoleSpec {
        answers_clients: false,
        scales_out: false,
        restores_cache: false,
        writes_history: false,
        decisions: None,
    };
    match role {
        Role::Gateway => None,
        Role::Coupons => Some(base),
        Role::Claims => Some(RoleSpec {
            answers_clients: true,
            scales_out: true,
            restores_cache: true,
            decisions: Some(claims::DECISIONS),
            ..base
        }),
        Role::Purchases => Some(RoleSpec {
            answers_clients: true,
            decisions: Some(purchases::DECISIONS),
            ..base
        }),
        Role::Expiry => Some(RoleSpec {
            restores_cache: true,
            ..base
        }),
        Role::History => Some(RoleSpec {
            writes_history: true,
            ..base
        }),
        Role::Profiles => Some(base),
    }
}

/// Runs one consumer role until `shutdown` is cancelled (the expiry role
/// runs its sweeper beside its consumer).
pub async fn run(
    role: Role,
    ctx: Context,
    poll: PollSettings,
    sweep_interval: std::time::Duration,
    shutdown: CancellationToken,
) -> Result<(), rdkafka::error::KafkaError> {
    let (kafka, topics) = (ctx.kafka.clone(), ctx.topics.clone());
    let stop = shutdown.clone().cancelled_owned();
    match role {
        Role::Coupons => role::run(&coupons::Handler(ctx), &kafka, &topics, poll, stop).await,
        Role::Claims => role::run(&claims::Handler(ctx), &kafka, &topics, poll, stop).await,
        Role::Purchases => role::run(&purchases::Handler(ctx), &kafka, &topics, poll, stop).await,
        Role::History => history::run(ctx, poll, shutdown).await,
        Role::Profiles => role::run(&profiles::Handler(ctx), &kafka, &topics, poll, stop).await,
        Role::Expiry => expiry::run(ctx, poll, sweep_interval, shutdown).await,
        // The gateway is no consumer role: nothing to run here.
        Role::Gateway => Ok(()),
    }
}
