//! Expiry: every hold ends, and so does every campaign. Postgres is the
//! authority — `held_until` and a campaign's end are durable — and this
//! module turns overdue holds back into available coupons and the
//! available coupons of ended campaigns into `expired` ones.
//!
//! Two halves:
//! - the **sweeper** scans `coupons` for holds past their deadline and
//!   publishes a `HoldExpired` event for each (keyed by coupon code), and for
//!   available coupons whose campaign has ended (its `valid_until` passed, or
//!   an employee ended it early) and publishes a `CouponExpired` for each, on
//!   the same topic. It keeps no state that matters: after a restart, a
//!   Redis flush or a long outage it finds every overdue hold and ended
//!   campaign again on its next scan. Several sweepers may run; duplicates
//!   are harmless because
//! - the **expirations consumer** releases a coupon only if it is still held
//!   under the very hold the event names (`hold_id`) and the deadline has
//!   passed, and expires one only if it is still available and its campaign
//!   has ended. A purchase that won the race has already made it
//!   `redeemed`, a claim judged before the end has made it `held` (that hold
//!   keeps its deadline), so the change does nothing. A hold whose campaign
//!   had ended by its deadline ends in `expired`, not `available`
//!   (`coupon_domain::lifecycle::after_hold`, decided in the release
//!   statement; the event carries the end for the rebuild). Each change and
//!   its history row commit together (the row goes to `coupon_history`, or
//!   to `history_outbox` when the history is in Cassandra: see
//!   `crate::history`). A coupon expires once ever, under an event id
//!   derived from its code, so a redelivered or re-announced `CouponExpired`
//!   adds no second row.
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

use coupon_domain::lifecycle::{after_hold, campaign_expiry_event_id, release_event_id};
use coupon_domain::{CouponCode, CouponStatus, RequestId};
use coupon_platform::kafka::consumer::BatchError;
use coupon_platform::kafka::{decode_topic, DecodeError, Record};
use coupon_platform::redis::EndedHold;
use coupon_platform::store::coupons;
use coupon_platform::time::{from_ms, to_ms};
use coupon_platform::Topics;
use coupon_schemas::{CampaignEnded, CouponExpired, HoldExpired, TopicEvent, TopicKind};

use coupon_platform::kafka::role::{self, dead_letter_all, Decoded, RoleEvent};
use coupon_platform::store::history::{append_in_tx, HistoryRow, HoldRelease, ReleasedBy};

use crate::{Context, Role};

pub const ROLE: Role = Role::Expiry;

pub use coupon_platform::store::coupons::{overdue_holds, OverdueHold};

/// What the expirations topic carries: a hold's end, or a campaign's end
/// for one available coupon (told apart by the envelope's `event_type`).
#[derive(Debug, Clone, PartialEq)]
pub enum ExpiryEvent {
    Hold(HoldExpired),
    Campaign(CouponExpired),
    /// An early end, as the sweeper published it (for the log's readers).
    Ended(CampaignEnded),
}

impl RoleEvent for ExpiryEvent {
    fn decode(_: &Topics, record: &Record) -> Result<Self, DecodeError> {
        match decode_topic(TopicKind::Expirations, record.value.as_deref())? {
            TopicEvent::HoldExpired(e) => Ok(Self::Hold(e)),
            TopicEvent::CouponExpired(e) => Ok(Self::Campaign(e)),
            TopicEvent::CampaignEnded(e) => Ok(Self::Ended(e)),
            _ => Err(DecodeError::NotRead {
                role: "expiry",
                topic: record.topic.clone(),
            }),
        }
    }
}

/// One sweep: publishes expiry events for overdue holds, and for available
/// coupons of ended campaigns, not announced in the last `quiet` period.
/// Returns how many it published.
pub async fn sweep_once(
    ctx: &Context,
    announced: &mut HashMap<String, Instant>,
    quiet: Duration,
) -> Result<usize, BatchError> {
    announced.retain(|_, at| at.elapsed() < quiet);
    let ends = publish_ends(ctx).await?;
    let holds = sweep_holds(ctx, announced).await?;
    let ended = sweep_campaigns(ctx, announced).await?;
    Ok(ends + holds + ended)
}

/// The event id of a campaign's early end: one per campaign ever.
pub fn campaign_end_event_id(batch_id: &Uuid) -> Uuid {
    Uuid::new_v5(
        &Uuid::NAMESPACE_OID,
        format!("campaign-ended:{batch_id}").as_bytes(),
    )
}

/// Publishes a `CampaignEnded` for each early end not on the log yet, and
/// marks them published once the broker confirmed them (a crash between
/// publishes it again, under the same event id).
async fn publish_ends(ctx: &Context) -> Result<usize, BatchError> {
    let ends = coupon_platform::store::campaigns::unpublished_ends(&ctx.pool, 100).await?;
    if ends.is_empty() {
        return Ok(0);
    }
    let events: Vec<(String, CampaignEnded)> = ends
        .iter()
        .map(|end| {
            let batch_id = end.batch_id.to_string();
            let envelope = coupon_schemas::new_envelope::<CampaignEnded>(
                campaign_end_event_id(&end.batch_id).to_string(),
                to_ms(end.ended_at),
                ctx.publisher.name(),
                &batch_id,
            );
            (
                batch_id.clone(),
                CampaignEnded {
                    envelope: Some(envelope),
                    batch_id,
                    ended_at_ms: to_ms(end.ended_at),
                    ended_by: end.ended_by.clone().unwrap_or_default(),
                },
            )
        })
        .collect();
    ctx.publisher
        .send_all(&ctx.topics.expirations(), &events)
        .await?;
    let batches: Vec<Uuid> = ends.iter().map(|e| e.batch_id).collect();
    coupon_platform::store::campaigns::mark_ends_published(&ctx.pool, &batches).await?;
    Ok(events.len())
}

/// Publishes a `CouponExpired` for each available coupon whose campaign
/// has ended (by the database's clock) not announced lately.
async fn sweep_campaigns(
    ctx: &Context,
    announced: &mut HashMap<String, Instant>,
) -> Result<usize, BatchError> {
    let ended = coupons::ended_available(&ctx.pool, 5_000).await?;
    let fresh: Vec<(String, &coupons::EndedCoupon)> = ended
        .iter()
        .map(|c| (format!("campaign-end:{}", c.code), c))
        .filter(|(key, _)| !announced.contains_key(key))
        .collect();
    if fresh.is_empty() {
        return Ok(0);
    }
    let events: Vec<(String, CouponExpired)> = fresh
        .iter()
        .map(|(_, coupon)| {
            let code = coupon.code.to_string();
            let envelope = coupon_schemas::new_envelope::<CouponExpired>(
                campaign_expiry_event_id(&code).to_string(),
                // The sweep's time: after whatever made the coupon available
                // (the rebuild applies events in this time's order).
                to_ms(coupon.swept_at),
                ctx.publisher.name(),
                &coupon.batch_id.to_string(),
            );
            (
                code.clone(),
                CouponExpired {
                    envelope: Some(envelope),
                    coupon_code: code,
                    batch_id: coupon.batch_id.to_string(),
                    campaign_ended_at_ms: to_ms(coupon.ended_at),
                },
            )
        })
        .collect();
    ctx.publisher
        .send_all(&ctx.topics.expirations(), &events)
        .await?;
    let now = Instant::now();
    for (key, _) in fresh.iter() {
        announced.insert(key.clone(), now);
    }
    metrics::counter!("coupon_campaign_expiry_events_published_total")
        .increment(events.len() as u64);
    Ok(events.len())
}

/// Publishes a `HoldExpired` for each overdue hold not announced lately.
async fn sweep_holds(
    ctx: &Context,
    announced: &mut HashMap<String, Instant>,
) -> Result<usize, BatchError> {
    let overdue = overdue_holds(&ctx.pool, ctx.policy.hold_grace, 5_000).await?;
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
                    // The same rule the release statement applies.
                    campaign_ended_at_ms: match after_hold(hold.campaign_end, hold.held_until) {
                        CouponStatus::Expired => hold.campaign_end.map(to_ms).unwrap_or(0),
                        _ => 0,
                    },
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

/// A campaign's end for one available coupon, validated.
#[derive(Debug, PartialEq)]
struct Expiry {
    event_id: Uuid,
    code: CouponCode,
    batch_id: String,
    ended_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Validates a `CouponExpired`: its code must be one, its event id the
/// coupon's own (so a foreign producer cannot give a coupon a second
/// expiry row). The campaign's end is not trusted: the database's decides.
fn expiry_of(event: &CouponExpired) -> Result<Expiry, String> {
    let code = CouponCode::parse(&event.coupon_code).map_err(|e| format!("coupon_code: {e}"))?;
    let event_id = campaign_expiry_event_id(&code.to_string());
    let given = event.envelope.as_ref().map(|e| e.event_id.as_str());
    if given != Some(event_id.to_string().as_str()) {
        return Err("event_id is not the coupon's campaign-end id".to_owned());
    }
    if event.batch_id.len() > 64 || event.batch_id.contains('\0') {
        return Err("batch_id is not a batch id".to_owned());
    }
    Ok(Expiry {
        event_id,
        code,
        batch_id: event.batch_id.clone(),
        ended_at: from_ms(event.campaign_ended_at_ms).filter(|_| event.campaign_ended_at_ms > 0),
    })
}

/// What one expirations record asks for, validated.
enum Change {
    Release(Release),
    Expire(Expiry),
    /// A campaign's early end, already in Postgres when it was published:
    /// recorded if missing (a database restored without it), else nothing.
    Ended {
        batch_id: Uuid,
        at: chrono::DateTime<chrono::Utc>,
        by: Option<String>,
    },
}

fn ended_of(event: &CampaignEnded) -> Result<Change, String> {
    let batch_id = Uuid::parse_str(&event.batch_id).map_err(|_| "batch_id is not a UUID")?;
    let at = from_ms(event.ended_at_ms)
        .filter(|_| event.ended_at_ms > 0)
        .ok_or("ended_at_ms is not a time")?;
    if event.ended_by.len() > 256 || event.ended_by.contains('\0') {
        return Err("ended_by is not an employee id".to_owned());
    }
    Ok(Change::Ended {
        batch_id,
        at,
        by: (!event.ended_by.is_empty()).then(|| event.ended_by.clone()),
    })
}

pub async fn handle_events(
    ctx: &Context,
    batch: &[Decoded<ExpiryEvent>],
) -> Result<(), BatchError> {
    let split = role::split(batch, |_, event| match event {
        ExpiryEvent::Hold(event) => release_of(event).map(Change::Release),
        ExpiryEvent::Campaign(event) => expiry_of(event).map(Change::Expire),
        ExpiryEvent::Ended(event) => ended_of(event),
    });
    let mut released = Vec::new();
    let mut history = Vec::new();
    let mut tx = ctx.pool.begin().await?;
    let now = crate::db_now(&mut tx).await?;
    let grace = chrono::Duration::from_std(ctx.policy.hold_grace).unwrap_or_default();
    let mut expired = 0u64;
    for (_, change) in &split.accepted {
        let release = match change {
            Change::Release(release) => release,
            Change::Ended { batch_id, at, by } => {
                coupon_platform::store::campaigns::set_ended_at(
                    &mut tx,
                    *batch_id,
                    *at,
                    by.as_deref(),
                )
                .await?;
                continue;
            }
            Change::Expire(expiry) => {
                if coupons::expire_available(&mut tx, expiry.code).await? {
                    expired += 1;
                    history.push(HistoryRow::campaign_expired(
                        now,
                        expiry.event_id,
                        expiry.code.to_string(),
                        &expiry.batch_id,
                        expiry.ended_at,
                    ));
                }
                continue;
            }
        };
        let row =
            coupons::release_hold(&mut tx, release.code, &release.hold_id, now - grace).await?;
        if let Some(coupons::ReleasedHold {
            code,
            holder_user_id: user_id,
            held_until,
            status,
            campaign_ended_at,
        }) = row
        {
            if status == CouponStatus::Expired {
                expired += 1;
            }
            history.push(HistoryRow::released(
                now,
                release.event_id,
                HoldRelease {
                    code: code.to_string(),
                    user: Some(user_id.to_string()),
                    hold_id: &release.hold_id,
                    held_until: Some(held_until),
                    by: ReleasedBy::Expiry,
                    campaign_ended_at,
                },
            ));
            released.push((
                EndedHold {
                    code,
                    user: user_id,
                },
                status,
            ));
        }
    }
    append_in_tx(&mut *tx, ctx.history.store(), &history).await?;
    tx.commit().await?;
    metrics::counter!("coupon_holds_released_total").increment(released.len() as u64);
    metrics::counter!("coupon_coupons_expired_total").increment(expired);
    let back_in_pool = released
        .iter()
        .any(|(_, status)| *status == CouponStatus::Available);
    let released: Vec<EndedHold> = released.into_iter().map(|(hold, _)| hold).collect();
    if let Err(error) = ctx.cache.remove_holds(&released).await {
        tracing::warn!(%error, "could not delete released holds from Redis");
    }
    // The released coupons are claimable again: void the sold-out marks.
    // (An expired coupon only leaves the pool: a mark stays true.)
    if back_in_pool {
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

crate::role_handler!(ROLE, ExpiryEvent);

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

    #[test]
    fn a_campaign_end_names_a_coupon_under_its_own_event_id() {
        let code = CouponCode::from_id(coupon_domain::SnowflakeId::from_raw(1 << 40).unwrap());
        let id = campaign_expiry_event_id(&code.to_string());
        let event = |event_id: String, coupon: String| CouponExpired {
            envelope: Some(coupon_schemas::new_envelope::<CouponExpired>(
                event_id, 0, "test", "",
            )),
            coupon_code: coupon,
            batch_id: "b".into(),
            campaign_ended_at_ms: 1_800_000_000_000,
        };
        let expiry = expiry_of(&event(id.to_string(), code.to_string().to_lowercase())).unwrap();
        assert_eq!(expiry.code, code);
        assert_eq!(expiry.event_id, id);
        assert!(expiry.ended_at.is_some());
        // Another id (a foreign producer's, or another coupon's) is refused.
        assert!(expiry_of(&event(Uuid::new_v4().to_string(), code.to_string())).is_err());
        assert!(expiry_of(&event(id.to_string(), "not a code".into())).is_err());
    }
}
