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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use chrono::Utc;

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

/// What this process knows about the cache that Redis cannot say itself.
#[derive(Debug, Clone, Default)]
pub struct MirrorState(Arc<MirrorFlags>);

#[derive(Debug, Default)]
struct MirrorFlags {
    /// A restore runs: none is started twice.
    restoring: AtomicBool,
    /// A hold or used quota of ours could not be written, and the supply
    /// version that vouches for the cache could not be deleted either
    /// (Redis stalled or unreachable): until it is, this process writes no
    /// sold-out mark, since a Redis that comes back still has the version.
    unmirrored: AtomicBool,
}

impl MirrorState {
    pub fn note_unmirrored(&self) {
        self.0.unmirrored.store(true, Ordering::Release);
    }

    pub fn is_unmirrored(&self) -> bool {
        self.0.unmirrored.load(Ordering::Acquire)
    }

    /// The supply version is gone: the cache no longer vouches for
    /// anything, so nothing of ours is missing from what it vouches for.
    pub fn note_version_gone(&self) {
        self.0.unmirrored.store(false, Ordering::Release);
    }
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
            code: h.code.to_string(),
            user_id: h.holder_user_id.into_string(),
            category: h.category.into_string(),
            expires_at: h.held_until,
        })
        .collect();
    let now = Utc::now();
    let window = ctx.policy.quota_window;
    let window_end = window.end_of(now);
    let used: Vec<(String, chrono::DateTime<Utc>)> =
        decisions::quota_users(&ctx.pool, window.start_of(now))
            .await?
            .into_iter()
            .map(|user| (user.into_string(), window_end))
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
                tracing::info!(
                    holds = restored.holds,
                    used_quotas = restored.used_quotas,
                    complete = restored.complete,
                    "Redis refilled from Postgres"
                );
            }
            Err(error) => tracing::warn!(%error, "could not refill Redis from Postgres"),
        }
        ctx.mirror.0.restoring.store(false, Ordering::Release);
    });
}
