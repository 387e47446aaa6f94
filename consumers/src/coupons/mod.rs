//! The coupon projector: `coupons.created` → `coupons` rows, `available`.
//!
//! Delivery guarantee: at least once, effect exactly once. Rows are written
//! with a binary `COPY` (the release's speed is Postgres' insert cost); a
//! replayed or redelivered batch makes the `COPY` fail as a whole, and the same
//! rows then go through `INSERT ... ON CONFLICT DO NOTHING` on the code, which
//! adds nothing that exists. Offsets are stored after the write commits.
//!
//! A batch's campaign (every chunk carries it) is stored once per batch in
//! `campaigns`, before the coupons, and `ON CONFLICT DO NOTHING`: a
//! redelivered chunk adds nothing there either.

use coupon_platform::kafka::consumer::BatchError;
use coupon_schemas::CouponsCreated;

use coupon_platform::kafka::role::{self, dead_letter_all, Decoded};

use crate::{Context, Role};

pub const ROLE: Role = Role::Coupons;

pub use crate::created::{campaign_of, coupons_of};
pub use coupon_platform::store::coupons::{insert_coupons, NewCoupon};

use coupon_domain::Campaign;
use coupon_platform::store;
use uuid::Uuid;

pub async fn handle_events(
    ctx: &Context,
    batch: &[Decoded<CouponsCreated>],
) -> Result<(), BatchError> {
    let split = role::split(batch, |_, event| {
        Ok::<_, String>((campaign_of(event)?, coupons_of(event)?))
    });
    // A batch's campaign first: its coupons are never seen without their
    // window. Written once per batch (every chunk carries it).
    let mut campaigns: Vec<(Uuid, Campaign)> = Vec::new();
    for (campaign, coupons) in split.accepted.iter().map(|(_, accepted)| accepted) {
        if let (Some(campaign), Some(first)) = (campaign, coupons.first()) {
            if !campaigns.iter().any(|(batch, _)| *batch == first.batch_id) {
                campaigns.push((first.batch_id, campaign.clone()));
            }
        }
    }
    if !campaigns.is_empty() {
        let mut conn = ctx.pool.acquire().await?;
        for (batch_id, campaign) in &campaigns {
            store::campaigns::insert(&mut conn, *batch_id, campaign).await?;
        }
    }
    let coupons: Vec<NewCoupon> = split
        .accepted
        .into_iter()
        .flat_map(|(_, (_, coupons))| coupons)
        .collect();
    let inserted = insert_coupons(&ctx.pool, &coupons).await?;
    metrics::counter!("coupon_coupons_projected_total").increment(inserted);
    // New coupons void every sold-out mark (`coupon_domain::sold_out`), after
    // the insert committed. Should Redis not take it, a mark left standing
    // hides them from claims until it expires (`Policy::sold_out_mark_ttl`).
    if inserted > 0 {
        // Before the marks are voided, so the claims they let through are
        // planned on statistics that know of the new coupons.
        match store::statistics::refresh_coupons_after_insert(&ctx.pool, inserted).await {
            Ok(analyzed) => {
                if analyzed {
                    metrics::counter!("coupon_coupons_analyzed_total").increment(1);
                }
            }
            Err(error) => tracing::warn!(
                %error,
                "could not refresh the coupons table's statistics after a release (autovacuum will)"
            ),
        }
        crate::supply_changed(ctx).await;
    }
    dead_letter_all(&ctx.dead_letters(ROLE), &split.refused).await
}

crate::role_handler!(ROLE, CouponsCreated);
