//! After a batch commits: its holds and used quotas mirrored to Redis, the
//! holds it released removed, and the pools it found empty marked sold out
//! (`coupon_domain::sold_out`). Redis is a cache: a failure costs speed only.

use chrono::{DateTime, Utc};

use coupon_domain::claim::{ClaimOutcomeKind, PoolKnowledge};
use coupon_domain::Category;
use coupon_platform::redis::{CachedHold, EndedHold};

use crate::Context;

use super::{BatchView, Claim, ClaimDecisionRecord};

/// After the commit: Redis loses the holds the batch released and mirrors
/// its new holds and quotas, then the pools it found empty are marked sold
/// out. Redis is a cache, so a failure here only costs speed.
pub(super) async fn mirror_batch(
    ctx: &Context,
    view: &BatchView,
    fresh: &[ClaimDecisionRecord],
    supply: Option<String>,
    claims: &[Claim],
) {
    let ended: Vec<EndedHold> = view
        .released
        .iter()
        .map(|r| EndedHold {
            code: r.code,
            user: r.user_id.clone(),
        })
        .collect();
    if let Err(error) = ctx.cache.remove_holds(&ended).await {
        tracing::warn!(%error, "could not delete released holds from Redis");
    }
    metrics::counter!("coupon_holds_released_total").increment(ended.len() as u64);
    // Released holds are supply (a coupon of another category than the one
    // its user claims now stays available): void the marks first.
    if !ended.is_empty() {
        crate::supply_changed(ctx).await;
    }
    // Before any mark: the gateway reads a missing hold or quota key as "may
    // be told sold out", so a winner's keys must be there first.
    if mirror_users(ctx, fresh).await {
        if let Some(version) = supply {
            // The pools were judged empty at the batch's claim times.
            let judged = claims.iter().map(|claim| claim.at).min();
            mark_sold_out(ctx, &view.pool, &version, judged).await;
        }
        rearm_sold_out(ctx, claims).await;
    }
}

/// Mirrors the holds and used quotas of a batch's new decisions to Redis;
/// `false` if that failed. The gateway's sold-out answer reads their
/// absence, so a write that fails forgets the supply version too: sold-out
/// answers stop until a restore has refilled the cache (`crate::restore`);
/// this process writes no mark until the version is deleted.
pub(super) async fn mirror_users(ctx: &Context, fresh: &[ClaimDecisionRecord]) -> bool {
    let mut new_holds = Vec::new();
    let mut quota_used = Vec::new();
    for decision in fresh {
        match decision.outcome {
            ClaimOutcomeKind::Granted if !decision.repeated => quota_used.push((
                decision.user_id.clone(),
                ctx.policy.quota_window.end_of(decision.decided_at),
            )),
            ClaimOutcomeKind::RateLimited => {
                if let Some(retry_at) = decision.retry_at {
                    quota_used.push((decision.user_id.clone(), retry_at));
                }
            }
            _ => {}
        }
        if decision.outcome == ClaimOutcomeKind::Granted && !decision.repeated {
            if let (Some(code), Some(category), Some(expires_at)) = (
                &decision.coupon_code,
                &decision.category,
                decision.expires_at,
            ) {
                new_holds.push(CachedHold {
                    code: *code,
                    user_id: decision.user_id.clone(),
                    category: category.clone(),
                    expires_at,
                });
            }
        }
    }
    let written = ctx
        .cache
        .put_holds_and_quota_used(&new_holds, &quota_used)
        .await;
    let Err(error) = written else {
        return true;
    };
    tracing::warn!(%error, holds = new_holds.len(), users = quota_used.len(),
        "could not mirror holds and used quotas to Redis; sold-out answers stop until it is refilled");
    crate::restore::forget_supply(ctx);
    false
}

/// The supply version now; `None` when Redis does not answer or has none.
/// Without one, Redis lost its data since the last restore: one is started
/// (in the background; claims take the full path meanwhile).
pub(super) async fn current_supply_version(ctx: &Context) -> Option<String> {
    if ctx.mirror.is_unmirrored() {
        return None;
    }
    match ctx.cache.supply_version().await {
        Ok(Some(version)) => Some(version),
        Ok(None) => {
            crate::restore::restore_in_background(ctx);
            None
        }
        Err(error) => {
            tracing::debug!(%error, "no supply version; marking nothing sold out");
            None
        }
    }
}

/// Marks the pools this batch found empty as sold out as of supply
/// `version` (read before the batch's allocations). Redis trouble costs
/// only speed: unmarked pools are decided here as before.
pub(super) async fn mark_sold_out(
    ctx: &Context,
    pool: &PoolKnowledge,
    version: &str,
    judged: Option<DateTime<Utc>>,
) {
    put_sold_out_marks(ctx, &pool.empty_pools(), version, judged).await;
}

/// Renews the sold-out marks that claims of this batch were answered from,
/// while their pools are still empty, when due (at most every quarter of
/// the mark's TTL: `coupon_domain::sold_out::renewal_due`; before, every
/// batch of a sale paid the four round trips). A mark's TTL is only a safety net (a
/// supply whose Redis write was lost); without renewal it would lapse in the
/// middle of a sale and send every claim in flight down the full path at
/// once, a p99 spike every TTL. As for any mark, the supply version is read
/// before Postgres is asked: a supply landing in between changes the version
/// and voids the renewed mark at once, and a supply whose Redis write was
/// lost shows in Postgres, so its pool is not renewed and lapses as before.
pub(super) async fn rearm_sold_out(ctx: &Context, claims: &[Claim]) {
    let mut pools: Vec<Option<&Category>> = claims
        .iter()
        .filter(|claim| claim.answered_sold_out)
        .map(|claim| claim.category.as_ref())
        .collect();
    pools.sort_unstable();
    pools.dedup();
    let pools = ctx
        .mirror
        .take_due_renewals(&pools, ctx.policy.sold_out_mark_ttl);
    if pools.is_empty() {
        return;
    }
    let Some(version) = current_supply_version(ctx).await else {
        return;
    };
    let mut empty = Vec::with_capacity(pools.len());
    for pool in pools {
        match coupon_platform::store::coupons::any_available(&ctx.pool, pool, None, None, &[]).await
        {
            Ok(false) => empty.push(pool),
            Ok(true) => {}
            Err(error) => {
                tracing::debug!(%error, "pool not readable; renewing no sold-out mark");
                return;
            }
        }
    }
    // Judged now (`any_available` reads the database's clock).
    put_sold_out_marks(ctx, &empty, &version, None).await;
}

/// Writes the sold-out marks of `pools` as of supply `version`, judged
/// empty at `judged` (`None`: the database's now), living at most until the
/// next campaign opens after that. Redis trouble costs only speed, so
/// it is logged, never returned.
pub(super) async fn put_sold_out_marks(
    ctx: &Context,
    pools: &[Option<&Category>],
    version: &str,
    judged: Option<DateTime<Utc>>,
) {
    if pools.is_empty() {
        return;
    }
    // A campaign opening later is supply no write announces: the mark must
    // be gone by then (`coupon_domain::sold_out::mark_ttl`). "Later" is after
    // the time the pools were judged empty: a campaign that opened since
    // then (a claim sent just before the opening, decided just after) is
    // already supply, and no mark is written.
    let until_opening =
        match coupon_platform::store::campaigns::until_next_opening(&ctx.pool, judged).await {
            Ok(left) => left,
            Err(error) => {
                tracing::debug!(%error, "next campaign opening not readable; marking nothing");
                return;
            }
        };
    let Some(ttl) = coupon_domain::sold_out::mark_ttl(ctx.policy.sold_out_mark_ttl, until_opening)
    else {
        return;
    };
    match ctx.cache.mark_sold_out(pools, version, ttl).await {
        Ok(()) => metrics::counter!("coupon_sold_out_marks_total").increment(pools.len() as u64),
        Err(error) => tracing::warn!(%error, "could not mark pools sold out in Redis"),
    }
}
