//! Writing a finished projection into the target database, in bulk.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use coupon_domain::CouponStatus;

use super::{ClaimDecisionRow, CouponState, Projection, PurchaseDecisionRow, QuotaGrant};

pub(super) async fn write_states(
    target: &PgPool,
    projection: &Projection,
) -> Result<(), sqlx::Error> {
    let changed: Vec<&CouponState> = projection
        .coupons()
        .filter(|c| c.status != CouponStatus::Available)
        .collect();
    for chunk in changed.chunks(20_000) {
        let codes: Vec<String> = chunk.iter().map(|c| c.coupon.code.to_string()).collect();
        let statuses: Vec<CouponStatus> = chunk.iter().map(|c| c.status).collect();
        let holders: Vec<Option<&str>> =
            chunk.iter().map(|c| c.holder_user_id.as_deref()).collect();
        let holds: Vec<Option<&str>> = chunk.iter().map(|c| c.hold_id.as_deref()).collect();
        let until: Vec<Option<DateTime<Utc>>> = chunk.iter().map(|c| c.held_until).collect();
        let redeemed: Vec<Option<DateTime<Utc>>> = chunk.iter().map(|c| c.redeemed_at).collect();
        let orders: Vec<Option<&str>> = chunk
            .iter()
            .map(|c| c.redeemed_order_id.as_deref())
            .collect();
        sqlx::query!(
            "UPDATE coupons c
             SET status = u.status, holder_user_id = u.holder, hold_id = u.hold_id,
                 held_until = u.held_until, redeemed_at = u.redeemed_at,
                 redeemed_order_id = u.order_id
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[],
                         $6::timestamptz[], $7::text[])
                  AS u(code, status, holder, hold_id, held_until, redeemed_at, order_id)
             WHERE c.code = u.code",
            &codes,
            // Stored as text through the domain enum's sqlx::Type.
            &statuses as _,
            &holders as _,
            &holds as _,
            &until as _,
            &redeemed as _,
            &orders as _,
        )
        .execute(target)
        .await?;
    }
    Ok(())
}

/// Rows are written in statements of at most this many.
const WRITE_CHUNK: usize = 20_000;

pub(super) async fn write_users(
    target: &PgPool,
    projection: &Projection,
) -> Result<u64, sqlx::Error> {
    let users = projection.user_ids();
    let mut written = 0;
    for chunk in users.chunks(WRITE_CHUNK) {
        let blacklist = |id: &String| projection.blacklist.get(id);
        let ids: Vec<&str> = chunk.iter().map(|u| u.as_str()).collect();
        let at: Vec<Option<DateTime<Utc>>> = chunk
            .iter()
            .map(|u| projection.users.get(*u).copied())
            .collect();
        let on: Vec<bool> = chunk
            .iter()
            .map(|u| blacklist(u).is_some_and(|b| b.blacklisted))
            .collect();
        let until: Vec<Option<DateTime<Utc>>> = chunk
            .iter()
            .map(|u| blacklist(u).and_then(|b| b.until))
            .collect();
        let reason: Vec<Option<&str>> = chunk
            .iter()
            .map(|u| blacklist(u).and_then(|b| b.reason.as_deref()))
            .collect();
        let since: Vec<Option<DateTime<Utc>>> = chunk
            .iter()
            .map(|u| blacklist(u).and_then(|b| b.at))
            .collect();
        written += sqlx::query!(
            "INSERT INTO users (user_id, last_coupon_at, blacklisted, blacklisted_until,
                                blacklist_reason, blacklisted_at)
             SELECT * FROM UNNEST($1::text[], $2::timestamptz[], $3::bool[], $4::timestamptz[],
                                  $5::text[], $6::timestamptz[])
             ON CONFLICT (user_id) DO UPDATE SET
                last_coupon_at = EXCLUDED.last_coupon_at, blacklisted = EXCLUDED.blacklisted,
                blacklisted_until = EXCLUDED.blacklisted_until,
                blacklist_reason = EXCLUDED.blacklist_reason,
                blacklisted_at = EXCLUDED.blacklisted_at",
            &ids as _,
            &at as _,
            &on,
            &until as _,
            &reason as _,
            &since as _,
        )
        .execute(target)
        .await?
        .rows_affected();
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
        let users: Vec<&str> = chunk.iter().map(|g| g.user_id.as_str()).collect();
        let windows: Vec<DateTime<Utc>> = chunk.iter().map(|g| g.window_start).collect();
        let requests: Vec<&str> = chunk.iter().map(|g| g.request_id.as_str()).collect();
        let at: Vec<DateTime<Utc>> = chunk.iter().map(|g| g.granted_at).collect();
        written += sqlx::query!(
            "INSERT INTO quota_grants (user_id, window_start, request_id, granted_at)
             SELECT * FROM UNNEST($1::text[], $2::timestamptz[], $3::text[], $4::timestamptz[])",
            &users as _,
            &windows,
            &requests as _,
            &at,
        )
        .execute(target)
        .await?
        .rows_affected();
    }
    Ok(written)
}

/// Writes the stored claim decisions with the claim processor's own insert,
/// so the rebuilt rows are the rows the processor writes.
pub(super) async fn write_claim_decisions(
    target: &PgPool,
    projection: &Projection,
) -> Result<u64, sqlx::Error> {
    let rows: Vec<ClaimDecisionRow> = projection.claim_decisions.values().cloned().collect();
    let mut conn = target.acquire().await?;
    let mut written = 0;
    for chunk in rows.chunks(WRITE_CHUNK) {
        written += coupon_consumers::claims::insert_decisions(&mut conn, chunk).await?;
    }
    Ok(written)
}

pub(super) async fn write_purchase_decisions(
    target: &PgPool,
    projection: &Projection,
) -> Result<u64, sqlx::Error> {
    let rows: Vec<&PurchaseDecisionRow> = projection.purchase_decisions.values().collect();
    let mut written = 0;
    for chunk in rows.chunks(WRITE_CHUNK) {
        let text = |f: fn(&PurchaseDecisionRow) -> &str| -> Vec<&str> {
            chunk.iter().map(|r| f(r)).collect()
        };
        written +=
            sqlx::query!(
            "INSERT INTO purchase_decisions (order_id, request_id, event_id, user_id, coupon_code,
                                             outcome, decided_at)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::uuid[], $4::text[], $5::text[],
                                  $6::text[], $7::timestamptz[])",
            text(|r| r.order_id.as_str()) as _,
            text(|r| r.request_id.as_str()) as _,
            &chunk.iter().map(|r| r.event_id).collect::<Vec<Uuid>>(),
            text(|r| r.user_id.as_str()) as _,
            text(|r| r.coupon_code.as_str()) as _,
            // Stored as text through the domain enum's sqlx::Type.
            chunk.iter().map(|r| r.outcome).collect::<Vec<_>>() as _,
            &chunk.iter().map(|r| r.decided_at).collect::<Vec<DateTime<Utc>>>(),
        )
            .execute(target)
            .await?
            .rows_affected();
    }
    Ok(written)
}
