//! The live and rebuilt rows the audit compares, read through the store and
//! reduced to what decides a later request.

use std::collections::HashMap;

use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::PgPool;

use coupon_domain::{
    Category, ClaimOutcomeKind, CouponCode, CouponStatus, OrderId, PurchaseOutcome, RequestId,
    UserId,
};
use coupon_platform::store;

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub(super) struct CouponRow {
    pub(super) code: String,
    pub(super) status: CouponStatus,
    pub(super) holder_user_id: Option<String>,
    pub(super) redeemed_order_id: Option<String>,
}

impl CouponRow {
    pub(super) fn describe(&self) -> String {
        format!(
            "{} holder={} order={}",
            self.status,
            self.holder_user_id.as_deref().unwrap_or("-"),
            self.redeemed_order_id.as_deref().unwrap_or("-")
        )
    }
}

/// Whether two coupons agree on what the audit checks.
pub(super) fn same_coupon(live: &CouponRow, log: &CouponRow) -> bool {
    live.status == log.status
        && (live.status == CouponStatus::Available || live.holder_user_id == log.holder_user_id)
        && (live.status != CouponStatus::Redeemed
            || live.redeemed_order_id == log.redeemed_order_id)
}

pub(super) async fn coupons_of(pool: &PgPool) -> Result<HashMap<String, CouponRow>, sqlx::Error> {
    Ok(store::coupons::outcomes(pool)
        .await?
        .into_iter()
        .map(|c| {
            let row = CouponRow {
                code: c.code.to_string(),
                status: c.status,
                holder_user_id: c.holder_user_id.map(UserId::into_string),
                redeemed_order_id: c.redeemed_order_id.map(OrderId::into_string),
            };
            (row.code.clone(), row)
        })
        .collect())
}

/// Users with a `last_coupon_at`, in milliseconds.
pub(super) async fn users_of(pool: &PgPool) -> Result<HashMap<String, i64>, sqlx::Error> {
    Ok(store::users::last_coupon_times(pool)
        .await?
        .into_iter()
        .map(|(user, at)| (user.into_string(), at.timestamp_millis()))
        .collect())
}

pub(super) fn time_ms(ms: Option<&i64>) -> String {
    ms.and_then(|ms| coupon_platform::time::from_ms(*ms))
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_else(|| "-".into())
}

/// A quota slot: who took it, when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct QuotaRow {
    pub(super) request_id: String,
    pub(super) granted_at_ms: i64,
}

/// Quota slots by (user, window start in milliseconds).
pub(super) async fn quota_of(
    pool: &PgPool,
) -> Result<HashMap<(String, i64), QuotaRow>, sqlx::Error> {
    Ok(store::decisions::quota_grants(pool)
        .await?
        .into_iter()
        .map(|g| {
            let row = QuotaRow {
                request_id: g.request_id.into_string(),
                granted_at_ms: g.granted_at.timestamp_millis(),
            };
            (
                (g.user_id.into_string(), g.window_start.timestamp_millis()),
                row,
            )
        })
        .collect())
}

/// A stored claim decision, times in milliseconds (what its event carries).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ComparedClaimDecision {
    pub(super) event_id: uuid::Uuid,
    pub(super) user_id: UserId,
    pub(super) outcome: ClaimOutcomeKind,
    pub(super) coupon_code: Option<CouponCode>,
    pub(super) category: Option<Category>,
    pub(super) expires_at_ms: Option<i64>,
    pub(super) repeated: bool,
    pub(super) retry_at_ms: Option<i64>,
    pub(super) blacklisted_until_ms: Option<i64>,
    pub(super) decided_at_ms: i64,
}

impl ComparedClaimDecision {
    pub(super) fn describe(&self) -> String {
        let mut text = self.outcome.to_string();
        if let Some(code) = &self.coupon_code {
            text.push_str(&format!(" coupon={code}"));
        }
        if self.repeated {
            text.push_str(" repeated");
        }
        if let Some(at) = self.retry_at_ms {
            text.push_str(&format!(" retry_at={}", time_ms(Some(&at))));
        }
        text.push_str(&format!(
            " at={} event={}",
            time_ms(Some(&self.decided_at_ms)),
            self.event_id
        ));
        text
    }
}

/// Stored claim decisions by request id.
pub(super) async fn claim_decisions_of(
    pool: &PgPool,
) -> Result<HashMap<RequestId, ComparedClaimDecision>, sqlx::Error> {
    let ms = |t: Option<DateTime<Utc>>| t.map(|t| t.timestamp_millis());
    Ok(store::decisions::claim_decisions(pool)
        .await?
        .into_iter()
        .map(|r| {
            let row = ComparedClaimDecision {
                event_id: r.event_id,
                user_id: r.user_id,
                outcome: r.outcome,
                coupon_code: r.coupon_code,
                category: r.category,
                expires_at_ms: ms(r.expires_at),
                repeated: r.repeated,
                retry_at_ms: ms(r.retry_at),
                blacklisted_until_ms: ms(r.blacklisted_until),
                decided_at_ms: r.decided_at.timestamp_millis(),
            };
            (r.request_id, row)
        })
        .collect())
}

/// A stored purchase decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ComparedPurchaseDecision {
    pub(super) request_id: String,
    pub(super) event_id: uuid::Uuid,
    pub(super) user_id: String,
    pub(super) coupon_code: String,
    pub(super) outcome: PurchaseOutcome,
    pub(super) decided_at_ms: i64,
}

impl ComparedPurchaseDecision {
    pub(super) fn describe(&self) -> String {
        format!(
            "{} coupon={} request={} at={} event={}",
            self.outcome,
            self.coupon_code,
            self.request_id,
            time_ms(Some(&self.decided_at_ms)),
            self.event_id
        )
    }
}

/// Stored purchase decisions by order id.
pub(super) async fn purchase_decisions_of(
    pool: &PgPool,
) -> Result<HashMap<String, ComparedPurchaseDecision>, sqlx::Error> {
    Ok(store::decisions::purchase_decisions(pool)
        .await?
        .into_iter()
        .map(|r| {
            let row = ComparedPurchaseDecision {
                request_id: r.request_id.into_string(),
                event_id: r.event_id,
                user_id: r.user_id.into_string(),
                coupon_code: r.coupon_code,
                outcome: r.outcome,
                decided_at_ms: r.decided_at.timestamp_millis(),
            };
            (r.order_id.into_string(), row)
        })
        .collect())
}

/// A user's blacklist columns, times in milliseconds; no row reads as the
/// default (not blacklisted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct BlacklistRow {
    pub(super) blacklisted: bool,
    pub(super) until_ms: Option<i64>,
    pub(super) reason: Option<String>,
    pub(super) at_ms: Option<i64>,
}

impl BlacklistRow {
    pub(super) fn describe(&self) -> String {
        if !self.blacklisted && *self == BlacklistRow::default() {
            return "not blacklisted".into();
        }
        format!(
            "{} until={} reason={} since={}",
            if self.blacklisted {
                "blacklisted"
            } else {
                "lifted"
            },
            match self.until_ms {
                Some(ms) => time_ms(Some(&ms)),
                None => "removed".into(),
            },
            self.reason.as_deref().unwrap_or("-"),
            time_ms(self.at_ms.as_ref())
        )
    }
}

/// Users whose blacklist columns are not all empty.
pub(super) async fn blacklist_of(
    pool: &PgPool,
) -> Result<HashMap<String, BlacklistRow>, sqlx::Error> {
    Ok(store::users::blacklist_columns(pool)
        .await?
        .into_iter()
        .map(|u| {
            let row = BlacklistRow {
                blacklisted: u.blacklisted,
                until_ms: u.blacklisted_until.map(|t| t.timestamp_millis()),
                reason: u.blacklist_reason,
                at_ms: u.blacklisted_at.map(|t| t.timestamp_millis()),
            };
            (u.user_id.into_string(), row)
        })
        .collect())
}
