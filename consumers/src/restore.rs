//! Refilling Redis from Postgres: at start-up, after Redis lost its data,
//! and by `couponctl holds rebuild`.
//!
//! Redis mirrors two facts about users that Postgres owns: who holds a
//! coupon (with its deadline) and whose quota of the current window is used.
//! The gateway answers a claim `sold_out` by itself only when neither key
//! exists for the user, so a cache missing some of them would tell a holder
//! `sold_out` instead of giving the hold back, or a user past the quota
//! `sold_out` instead of `429`. That is why the supply version every
//! sold-out mark must carry is written only here, after both are refilled
//! (`coupon_platform::redis`): a Redis that restarted empty, or was flushed,
//! has no version and answers nothing sold out until a restore completes.
//!
//! The claim processor starts one in the background whenever it finds the
//! version missing ([`restore_in_background`]), at most one at a time per
//! process; claims meanwhile take the full path, so a loss costs speed only.
//! A restore that Redis is lost again in the middle of does not bring the
//! version back (its token went with the data), and the next one will.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;

use coupon_domain::{Category, UserId};
use coupon_platform::kafka::consumer::BatchError;
use coupon_platform::redis::CachedHold;
use coupon_platform::store::{coupons, decisions};

use crate::Context;

/// Writes per pipeline: large enough to be quick, small enough not to
/// hold Redis up for other clients.
const CHUNK: usize = 1_000;

/// What a restore wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    pub holds: usize,
    pub used_quotas: usize,
    /// Whether the supply version is set now (sold-out answers may resume):
    /// `false` when the cache was lost again during the restore.
    pub complete: bool,
}

impl Restored {
    /// The log line of a restore, at start-up or after a loss.
    pub fn log(&self) {
        tracing::info!(
            holds = self.holds,
            used_quotas = self.used_quotas,
            complete = self.complete,
            "Redis refilled from Postgres"
        );
    }
}

/// What this process knows about the cache that Redis cannot say itself.
#[derive(Debug, Clone, Default)]
pub struct MirrorState(Arc<MirrorFlags>);

#[derive(Debug, Default)]
struct MirrorFlags {
    /// A restore runs: none is started twice.
    restoring: AtomicBool,
    /// A hold or used quota of ours is missing from Redis and the supply
    /// version may still vouch for it: [`forget_supply`] is deleting the
    /// version, and until it has, this process writes no sold-out mark.
    forgetting: AtomicBool,
    /// Another write failed while the deletion was under way: delete again.
    again: AtomicBool,
    /// When this process last renewed each pool's sold-out mark (`None`:
    /// the whole pool), so that a mark is renewed as often as it needs
    /// (`coupon_domain::sold_out::renewal_due`), not by every batch.
    renewed: std::sync::Mutex<HashMap<Option<Category>, Instant>>,
}

impl MirrorState {
    /// Whether a hold or used quota of ours may be missing from a cache
    /// whose version still stands (no sold-out mark may be written).
    pub fn is_unmirrored(&self) -> bool {
        self.0.forgetting.load(Ordering::SeqCst)
    }

    /// The pools among `pools` whose marks are due for renewal now (see
    /// `coupon_domain::sold_out::renewal_due`), noted as renewed: the
    /// caller renews them (or finds them not empty) next. A renewal that
    /// then fails waits for the next due time: the mark may lapse, and the
    /// claims after it take the full path until an allocation marks the
    /// pool again (speed only, as for any Redis trouble).
    pub fn take_due_renewals<'a>(
        &self,
        pools: &[Option<&'a Category>],
        ttl: std::time::Duration,
    ) -> Vec<Option<&'a Category>> {
        let now = Instant::now();
        // A panic while the map was held leaves nothing half-written in it.
        let mut renewed = self.0.renewed.lock().unwrap_or_else(|e| e.into_inner());
        pools
            .iter()
            .copied()
            .filter(|pool| {
                let last = renewed
                    .get(&pool.cloned())
                    .map(|at| now.duration_since(*at));
                let due = coupon_domain::sold_out::renewal_due(last, ttl);
                if due {
                    renewed.insert(pool.cloned(), now);
                }
                due
            })
            .collect()
    }
}

/// How often a failed deletion of the supply version is tried again.
const FORGET_RETRY: std::time::Duration = std::time::Duration::from_millis(200);

/// A hold or used quota could not be written to Redis: deletes the supply
/// version, so that no gateway answers `sold_out` from a cache that lacks
/// it (and a restore refills it). Redis failed a moment ago, so the
/// deletion is retried on its own task until Redis takes it: a stalled
/// Redis that comes back still has the version, and waiting for the next
/// batch would leave it standing for as long as no claim arrives.
pub fn forget_supply(ctx: &Context) {
    let flags = &ctx.mirror.0;
    flags.again.store(true, Ordering::SeqCst);
    if flags.forgetting.swap(true, Ordering::SeqCst) {
        return;
    }
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let flags = &ctx.mirror.0;
        loop {
            // A failure noted from here on is covered only by a later delete.
            flags.again.store(false, Ordering::SeqCst);
            if let Err(error) = ctx.cache.forget_supply().await {
                tracing::debug!(%error, "could not delete the supply version yet");
                flags.again.store(true, Ordering::SeqCst);
                tokio::time::sleep(FORGET_RETRY).await;
                continue;
            }
            if flags.again.load(Ordering::SeqCst) {
                continue;
            }
            flags.forgetting.store(false, Ordering::SeqCst);
            // A failure noted just now found this task still running.
            if !flags.again.load(Ordering::SeqCst) || flags.forgetting.swap(true, Ordering::SeqCst)
            {
                break;
            }
        }
    });
}

/// Refills every live hold and every used quota of the current window from
/// Postgres, then sets the supply version unless the cache was lost again
/// meanwhile. Idempotent; safe beside live traffic (a hold or quota written
/// by a decision meanwhile is written by its processor too).
pub async fn restore(ctx: &Context) -> Result<Restored, BatchError> {
    let token = ctx
        .cache
        .begin_restore()
        .await
        .map_err(BatchError::transient)?;
    let holds: Vec<CachedHold> = coupons::live_holds(&ctx.pool)
        .await?
        .into_iter()
        .map(|h| CachedHold {
            code: h.code,
            user_id: h.holder_user_id,
            category: h.category,
            expires_at: h.held_until,
        })
        .collect();
    let now = Utc::now();
    let window = ctx.policy.quota_window;
    let window_end = window.end_of(now);
    let used: Vec<(UserId, chrono::DateTime<Utc>)> =
        decisions::quota_users(&ctx.pool, window.start_of(now))
            .await?
            .into_iter()
            .map(|user| (user, window_end))
            .collect();
    for chunk in holds.chunks(CHUNK) {
        ctx.cache
            .put_holds(chunk)
            .await
            .map_err(BatchError::transient)?;
    }
    for chunk in used.chunks(CHUNK) {
        ctx.cache
            .put_quota_used(chunk)
            .await
            .map_err(BatchError::transient)?;
    }
    let complete = ctx
        .cache
        .finish_restore(&token)
        .await
        .map_err(BatchError::transient)?;
    Ok(Restored {
        holds: holds.len(),
        used_quotas: used.len(),
        complete,
    })
}

/// Starts [`restore`] on its own task unless this process runs one already.
pub fn restore_in_background(ctx: &Context) {
    if ctx.mirror.0.restoring.swap(true, Ordering::AcqRel) {
        return;
    }
    let ctx = ctx.clone();
    tokio::spawn(async move {
        match restore(&ctx).await {
            Ok(restored) => {
                metrics::counter!("coupon_cache_restores_total").increment(1);
                restored.log();
            }
            Err(error) => tracing::warn!(%error, "could not refill Redis from Postgres"),
        }
        ctx.mirror.0.restoring.store(false, Ordering::Release);
    });
}
