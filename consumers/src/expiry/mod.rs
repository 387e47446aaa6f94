//! Expiry: every hold ends. Postgres is the authority — `held_until` is a
//! durable deadline — and this module turns overdue holds back into
//! available coupons.
//!
//! Two halves:
//! - the **sweeper** scans `coupons` for holds past their deadline and
//!   publishes a `HoldExpired` event for each (keyed by coupon code). It keeps
//!   no state that matters: after a restart, a Redis flush or a long outage it
//!   finds every overdue hold again on its next scan. Several sweepers may run;
//!   duplicates are harmless because
//! - the **expirations consumer** releases a coupon only if it is still held
//!   under the very hold the event names (`hold_id`) and the deadline has
//!   passed. A purchase that won the race has already made it `redeemed`, so
//!   the release does nothing. The release and its history row commit together
//!   (the row goes to `coupon_history`, or to `history_outbox` when the history
//!   is in Cassandra: see `crate::history`).
//!
//! "Passed" is judged on the database's clock, never a host's: a hold is
//! overdue once `held_until + grace <= now()` in Postgres. So a sweeper on a
//! host whose clock runs ahead releases nothing early, and a purchase the
//! broker accepted before the deadline still finds its hold if its consumer
//! is late by less than the grace (see `coupon_domain::clock`).
//!
//! Delivery guarantee: at least once, effect exactly once (the conditional
//! release); offsets are stored after commit.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use uuid::Uuid;

use coupon_domain::lifecycle::release_event_id;
use coupon_domain::{CouponCode, RequestId};
use coupon_platform::kafka::consumer::BatchError;
use coupon_platform::redis::EndedHold;
use coupon_platform::store::coupons;
use coupon_platform::time::to_ms;
use coupon_schemas::HoldExpired;

use coupon_platform::kafka::role::{self, dead_letter_all, Decoded};
use coupon_platform::store::history::{append_in_tx, HistoryRow, HoldRelease, ReleasedBy};

use crate::{Context, Role};

pub const ROLE: Role = Role::Expiry;

pub use coupon_platform::store::coupons::{overdue_holds, OverdueHold};

/// One sweep: publishes expiry events for overdue holds not announced in the
/// last `quiet` period. Returns how many it published.
pub async fn sweep_once(
    ctx: &Context,
    announced: &mut HashMap<String, Instant>,
    quiet: Duration,
) -> Result<usize, BatchError> {
    let overdue = overdue_holds(&ctx.pool, ctx.policy.hold_grace, 5_000).await?;
    announced.retain(|_, at| at.elapsed() < quiet);
    let fresh: Vec<&OverdueHold> = overdue
        .iter()
        .filter(|h| !announced.contains_key(&h.hold_id))
        .collect();
    if fresh.is_empty() {
        return Ok(0);
    }
    let events: Vec<(String, HoldExpired)> = fresh
        .iter()
        .map(|hold| {
            let envelope = coupon_schemas::new_envelope::<HoldExpired>(
                release_event_id(&hold.hold_id, &hold.code.to_string()).to_string(),
                to_ms(hold.held_until),
                ctx.publisher.name(),
                &hold.hold_id,
            );
            (
                hold.code.to_string(),
                HoldExpired {
                    envelope: Some(envelope),
                    coupon_code: hold.code.to_string(),
                    user_id: hold.holder_user_id.to_string(),
                    hold_id: hold.hold_id.clone(),
                    held_until_ms: to_ms(hold.held_until),
                },
            )
        })
        .collect();
    ctx.publisher
        .send_all(&ctx.topics.expirations(), &events)
        .await?;
    let now = Instant::now();
    for hold in &fresh {
        announced.insert(hold.hold_id.clone(), now);
    }
    metrics::counter!("coupon_expiry_events_published_total").increment(fresh.len() as u64);
    Ok(fresh.len())
}

/// Sweeps every `interval` until shutdown.
pub async fn run_sweeper(
    ctx: Context,
    interval: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut announced = HashMap::new();
    // Re-announce a hold that is still held after this long (its event may
    // have been lost with a crashed consumer's uncommitted batch).
    let quiet = (interval * 10).max(Duration::from_secs(5));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = ticker.tick() => {}
        }
        if let Err(error) = sweep_once(&ctx, &mut announced, quiet).await {
            tracing::warn!(error = %error.report(), "expiry sweep failed; will retry");
        }
    }
}

/// A release an expiry event asks for, validated.
#[derive(Debug, PartialEq)]
struct Release {
    event_id: Uuid,
    code: CouponCode,
    hold_id: String,
}

/// Validates an expiry event. Anything else is refused: a NUL in a code or
/// hold id would fail the release query forever. The event's deadline is
/// not read: the database's decides.
fn release_of(event: &HoldExpired) -> Result<Release, String> {
    let event_id = event
        .envelope
        .as_ref()
        .map(|e| Uuid::parse_str(&e.event_id))
        .transpose()
        .map_err(|_| "event_id is not a UUID".to_owned())?
        .unwrap_or_default();
    let code = CouponCode::parse(&event.coupon_code).map_err(|e| format!("coupon_code: {e}"))?;
    RequestId::parse(event.hold_id.as_str()).map_err(|e| format!("hold_id: {e}"))?;
    Ok(Release {
        event_id,
        code,
        hold_id: event.hold_id.clone(),
    })
}

pub async fn handle_events(
    ctx: &Context,
    batch: &[Decoded<HoldExpired>],
) -> Result<(), BatchError> {
    let split = role::split(batch, |_, event| release_of(event));
    let mut released = Vec::new();
    let mut history = Vec::new();
    let mut tx = ctx.pool.begin().await?;
    let now = crate::db_now(&mut tx).await?;
    let grace = chrono::Duration::from_std(ctx.policy.hold_grace).unwrap_or_default();
    for (_, release) in &split.accepted {
        let row =
            coupons::release_hold(&mut tx, release.code, &release.hold_id, now - grace).await?;
        if let Some(coupons::ReleasedHold {
            code,
            holder_user_id: user_id,
            held_until,
        }) = row
        {
            history.push(HistoryRow::released(
                now,
                release.event_id,
                HoldRelease {
                    code: code.to_string(),
                    user: Some(user_id.to_string()),
                    hold_id: &release.hold_id,
                    held_until: Some(held_until),
                    by: ReleasedBy::Expiry,
                },
            ));
            released.push(EndedHold {
                code,
                user: user_id,
            });
        }
    }
    append_in_tx(&mut *tx, ctx.history.store(), &history).await?;
    tx.commit().await?;
    metrics::counter!("coupon_holds_released_total").increment(released.len() as u64);
    if let Err(error) = ctx.cache.remove_holds(&released).await {
        tracing::warn!(%error, "could not delete released holds from Redis");
    }
    // The released coupons are claimable again: void the sold-out marks.
    if !released.is_empty() {
        crate::supply_changed(ctx).await;
    }
    dead_letter_all(&ctx.dead_letters(ROLE), &split.refused).await
}

/// Runs the sweeper and the expirations consumer until shutdown.
pub async fn run(
    ctx: Context,
    poll: coupon_platform::kafka::PollSettings,
    sweep_interval: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), rdkafka::error::KafkaError> {
    let sweeper = tokio::spawn(run_sweeper(
        ctx.clone(),
        sweep_interval,
        shutdown.clone().cancelled_owned(),
    ));
    let (kafka, topics) = (ctx.kafka.clone(), ctx.topics.clone());
    let result = coupon_platform::kafka::role::run(
        &Handler(ctx),
        &kafka,
        &topics,
        poll,
        shutdown.cancelled_owned(),
    )
    .await;
    let _ = sweeper.await;
    result
}

crate::role_handler!(ROLE, HoldExpired);

#[cfg(test)]
mod tests {
    use super::*;

    fn event(code: &str, hold_id: &str, event_id: &str) -> HoldExpired {
        HoldExpired {
            envelope: Some(coupon_schemas::new_envelope::<HoldExpired>(
                event_id.into(),
                0,
                "test",
                "",
            )),
            coupon_code: code.into(),
            hold_id: hold_id.into(),
            ..Default::default()
        }
    }

    #[test]
    fn releases_name_the_canonical_code_and_refuse_what_postgres_would() {
        let code = CouponCode::from_id(coupon_domain::SnowflakeId::from_raw(1 << 40).unwrap());
        let id = release_event_id("h1", &code.to_string());
        let release = release_of(&event(
            &code.to_string().to_lowercase(),
            "h1",
            &id.to_string(),
        ));
        assert_eq!(
            release,
            Ok(Release {
                event_id: id,
                code,
                hold_id: "h1".into(),
            })
        );
        assert!(release_of(&event("not a code", "h1", &id.to_string())).is_err());
        assert!(release_of(&event(&code.to_string(), "h\0", &id.to_string())).is_err());
        assert!(release_of(&event(&code.to_string(), "h1", "nope")).is_err());
    }
}
