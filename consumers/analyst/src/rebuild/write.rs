//! Writing a finished projection into the target database, in bulk, through
//! the store's column writes (`coupon_platform::store::rebuild`).

use coupon_domain::CouponStatus;
use coupon_platform::store::rebuild::{
    self as store, CouponStates, PurchaseRows, QuotaRows, UserRows,
};
use sqlx::PgPool;

use super::{CouponState, Projection, QuotaGrant, StoredPurchase};

/// Rows are written in statements of at most this many.
const WRITE_CHUNK: usize = 20_000;

pub(super) async fn write_states(
    target: &PgPool,
    projection: &Projection,
) -> Result<(), sqlx::Error> {
    let changed: Vec<&CouponState> = projection
        .coupons()
        .filter(|c| c.status != CouponStatus::Available)
        .collect();
    for chunk in changed.chunks(WRITE_CHUNK) {
        let states = CouponStates {
            codes: chunk.iter().map(|c| c.coupon.code.to_string()).collect(),
            statuses: chunk.iter().map(|c| c.status).collect(),
            holders: chunk.iter().map(|c| c.holder_user_id.as_deref()).collect(),
            holds: chunk.iter().map(|c| c.hold_id.as_deref()).collect(),
            held_until: chunk.iter().map(|c| c.held_until).collect(),
            redeemed_at: chunk.iter().map(|c| c.redeemed_at).collect(),
            orders: chunk
                .iter()
                .map(|c| c.redeemed_order_id.as_deref())
                .collect(),
        };
        store::update_coupon_states(target, &states).await?;
    }
    Ok(())
}

pub(super) async fn write_users(
    target: &PgPool,
    projection: &Projection,
) -> Result<u64, sqlx::Error> {
    let users = projection.user_ids();
    let mut written = 0;
    for chunk in users.chunks(WRITE_CHUNK) {
        let blacklist = |id: &String| projection.blacklist.get(id);
        let rows = UserRows {
            ids: chunk.iter().map(|u| u.as_str()).collect(),
            last_coupon_at: chunk
                .iter()
                .map(|u| projection.users.get(*u).copied())
                .collect(),
            blacklisted: chunk
                .iter()
                .map(|u| blacklist(u).is_some_and(|b| b.blacklisted))
                .collect(),
            blacklisted_until: chunk
                .iter()
                .map(|u| blacklist(u).and_then(|b| b.until))
                .collect(),
            reasons: chunk
                .iter()
                .map(|u| blacklist(u).and_then(|b| b.reason.as_deref()))
                .collect(),
            blacklisted_at: chunk
                .iter()
                .map(|u| blacklist(u).and_then(|b| b.at))
                .collect(),
        };
        written += store::upsert_users(target, &rows).await?;
    }
    Ok(written)
}

/// The users' latest profiles (after `write_users`: the upsert sets only
/// the profile columns).
pub(super) async fn write_profiles(
    target: &PgPool,
    projection: &Projection,
) -> Result<u64, sqlx::Error> {
    let all: Vec<_> = projection.profiles().into_iter().cloned().collect();
    let mut written = 0;
    let mut conn = target.acquire().await?;
    for chunk in all.chunks(WRITE_CHUNK) {
        written += coupon_platform::store::users::upsert_profiles(&mut conn, chunk).await?;
    }
    Ok(written)
}

pub(super) async fn write_quota(
    target: &PgPool,
    projection: &Projection,
) -> Result<u64, sqlx::Error> {
    let grants: Vec<&QuotaGrant> = projection.quota.values().collect();
    let mut written = 0;
    for chunk in grants.chunks(WRITE_CHUNK) {
        let rows = QuotaRows {
            users: chunk.iter().map(|g| g.user_id.as_str()).collect(),
            windows: chunk.iter().map(|g| g.window_start).collect(),
            requests: chunk.iter().map(|g| g.request_id.as_str()).collect(),
            granted_at: chunk.iter().map(|g| g.granted_at).collect(),
        };
        written += store::insert_quota_grants(target, &rows).await?;
    }
    Ok(written)
}

pub(super) async fn write_purchase_decisions(
    target: &PgPool,
    projection: &Projection,
) -> Result<u64, sqlx::Error> {
    let decisions: Vec<&StoredPurchase> = projection.purchase_decisions.values().collect();
    let mut written = 0;
    for chunk in decisions.chunks(WRITE_CHUNK) {
        let rows = PurchaseRows {
            orders: chunk.iter().map(|r| r.order_id.as_str()).collect(),
            requests: chunk.iter().map(|r| r.request_id.as_str()).collect(),
            event_ids: chunk.iter().map(|r| r.event_id).collect(),
            users: chunk.iter().map(|r| r.user_id.as_str()).collect(),
            codes: chunk.iter().map(|r| r.coupon_code.as_str()).collect(),
            outcomes: chunk.iter().map(|r| r.outcome).collect(),
            decided_at: chunk.iter().map(|r| r.decided_at).collect(),
        };
        written += store::insert_purchase_decisions(target, &rows).await?;
    }
    Ok(written)
}
