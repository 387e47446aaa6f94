//! Comparing the rebuilt database with the live one, key by key.

use std::collections::{BTreeSet, HashMap, HashSet};

use anyhow::Context as _;
use sqlx::PgPool;

use coupon_domain::RequestId;
use coupon_platform::store;

use super::cut_log::CutLog;
use super::rows::{
    blacklist_of, claim_decisions_of, coupons_of, purchase_decisions_of, quota_of, same_coupon,
    time_ms, users_of, BlacklistRow, ComparedClaimDecision, ComparedPurchaseDecision,
};
use super::AuditReport;

/// One line for a key that differs between live and log (`None`: the same).
pub(super) fn difference<V: PartialEq>(
    what: &str,
    live: Option<&V>,
    log: Option<&V>,
    describe: impl Fn(&V) -> String,
) -> Option<String> {
    match (live, log) {
        (Some(l), Some(r)) if l == r => None,
        (Some(l), Some(r)) => Some(format!(
            "{what}: live {}, log says {}",
            describe(l),
            describe(r)
        )),
        (Some(l), None) => Some(format!("{what}: live {}, not on the log", describe(l))),
        (None, Some(r)) => Some(format!(
            "{what}: missing from the live database, log says {}",
            describe(r)
        )),
        (None, None) => None,
    }
}

/// Compares quota slots, stored decisions and blacklist entries: what
/// decides a later request. `blacklist_before` is the live blacklist as read
/// before the log.
pub(super) async fn compare_decisions(
    live: &PgPool,
    rebuilt: &PgPool,
    log: &CutLog,
    blacklist_before: &HashMap<String, BlacklistRow>,
    report: &mut AuditReport,
) -> anyhow::Result<()> {
    compare_quota(live, rebuilt, log, report).await?;
    compare_claim_decisions(live, rebuilt, log, report).await?;
    compare_purchase_decisions(live, rebuilt, log, report).await?;
    compare_blacklist(live, rebuilt, blacklist_before, report).await
}

/// Quota slots, by user and window.
async fn compare_quota(
    live: &PgPool,
    rebuilt: &PgPool,
    log: &CutLog,
    report: &mut AuditReport,
) -> anyhow::Result<()> {
    let in_flight = |user: &str| log.skip_users.contains(user);
    let live_quota = quota_of(live).await.context("reading the live quota")?;
    let log_quota = quota_of(rebuilt)
        .await
        .context("reading the rebuilt quota")?;
    let floor = floor_ms(live, |f| f.quota).await?;
    let keys: BTreeSet<&(String, i64)> = live_quota.keys().chain(log_quota.keys()).collect();
    for key in keys {
        let (user, window) = key;
        if *window < floor {
            report.beyond_retention += 1;
            continue;
        }
        if in_flight(user) {
            report.decisions_skipped += 1;
            continue;
        }
        report.quota_checked += 1;
        let what = format!(
            "quota of {user} in the window from {}",
            time_ms(Some(window))
        );
        report.differences.extend(difference(
            &what,
            live_quota.get(key),
            log_quota.get(key),
            |q| {
                format!(
                    "taken by request {} at {}",
                    q.request_id,
                    time_ms(Some(&q.granted_at_ms))
                )
            },
        ));
    }
    Ok(())
}

/// Stored claim decisions, by request id.
async fn compare_claim_decisions(
    live: &PgPool,
    rebuilt: &PgPool,
    log: &CutLog,
    report: &mut AuditReport,
) -> anyhow::Result<()> {
    let in_flight = |user: &str| log.skip_users.contains(user);
    let live_claims = claim_decisions_of(live)
        .await
        .context("reading the live claim decisions")?;
    let log_claims = claim_decisions_of(rebuilt)
        .await
        .context("reading the rebuilt claim decisions")?;
    let floor = floor_ms(live, |f| f.decisions).await?;
    let requests: BTreeSet<&RequestId> = live_claims.keys().chain(log_claims.keys()).collect();
    for request in requests {
        let (l, r) = (live_claims.get(request), log_claims.get(request));
        if l.or(r).is_some_and(|d| d.decided_at_ms < floor) {
            report.beyond_retention += 1;
            continue;
        }
        let user = l.or(r).map(|d| d.user_id.as_str()).unwrap_or_default();
        if in_flight(user) || log.pending_claims.contains(request.as_str()) {
            report.decisions_skipped += 1;
            continue;
        }
        report.claim_decisions_checked += 1;
        let what = format!("claim decision {request} (user {user})");
        report
            .differences
            .extend(difference(&what, l, r, ComparedClaimDecision::describe));
    }
    Ok(())
}

/// Where `which` table's kept rows begin in the live database, in
/// milliseconds (`i64::MIN`: nothing dropped). Read after the live rows: a
/// drop in between only raises it.
async fn floor_ms(
    live: &PgPool,
    which: impl Fn(&store::retention::Floors) -> Option<chrono::DateTime<chrono::Utc>>,
) -> anyhow::Result<i64> {
    let floors = store::retention::floors(live)
        .await
        .context("reading the live retention floors")?;
    Ok(which(&floors).map_or(i64::MIN, |at| at.timestamp_millis()))
}

/// Stored purchase decisions, by order id.
async fn compare_purchase_decisions(
    live: &PgPool,
    rebuilt: &PgPool,
    log: &CutLog,
    report: &mut AuditReport,
) -> anyhow::Result<()> {
    let in_flight = |user: &str| log.skip_users.contains(user);
    let live_purchases = purchase_decisions_of(live)
        .await
        .context("reading the live purchase decisions")?;
    let log_purchases = purchase_decisions_of(rebuilt)
        .await
        .context("reading the rebuilt purchase decisions")?;
    let orders: BTreeSet<&String> = live_purchases.keys().chain(log_purchases.keys()).collect();
    for order in orders {
        let (l, r) = (live_purchases.get(order), log_purchases.get(order));
        let user = l.or(r).map(|d| d.user_id.as_str()).unwrap_or_default();
        if in_flight(user) {
            report.decisions_skipped += 1;
            continue;
        }
        report.purchase_decisions_checked += 1;
        let what = format!("purchase decision for order {order} (user {user})");
        report
            .differences
            .extend(difference(&what, l, r, ComparedPurchaseDecision::describe));
    }
    Ok(())
}

/// Blacklist entries that did not change while the audit read the log.
async fn compare_blacklist(
    live: &PgPool,
    rebuilt: &PgPool,
    blacklist_before: &HashMap<String, BlacklistRow>,
    report: &mut AuditReport,
) -> anyhow::Result<()> {
    let live_blacklist = blacklist_of(live)
        .await
        .context("reading the live blacklist")?;
    let log_blacklist = blacklist_of(rebuilt)
        .await
        .context("reading the rebuilt blacklist")?;
    let users: BTreeSet<&String> = live_blacklist
        .keys()
        .chain(log_blacklist.keys())
        .chain(blacklist_before.keys())
        .collect();
    // Read after the log: a change committed but still waiting in the
    // outbox is not on the log yet, and is left out like one that changed.
    let pending: HashSet<String> = store::users::blacklist_pending_users(live)
        .await
        .context("reading the blacklist changes not yet on the log")?
        .into_iter()
        .collect();
    let none = BlacklistRow::default();
    for user in users {
        let now = live_blacklist.get(user).unwrap_or(&none);
        if blacklist_before.get(user).unwrap_or(&none) != now || pending.contains(user.as_str()) {
            report.blacklist_skipped += 1;
            continue;
        }
        report.blacklist_checked += 1;
        let logged = log_blacklist.get(user).unwrap_or(&none);
        report.differences.extend(difference(
            &format!("blacklist of user {user}"),
            Some(now),
            Some(logged),
            BlacklistRow::describe,
        ));
    }
    Ok(())
}

/// Compares the live database with the rebuilt one.
pub(super) async fn compare(
    live: &PgPool,
    rebuilt: &PgPool,
    log: &mut CutLog,
    blacklist_before: &HashMap<String, BlacklistRow>,
    report: &mut AuditReport,
) -> anyhow::Result<()> {
    let live_coupons = coupons_of(live).await.context("reading the live coupons")?;
    let log_coupons = coupons_of(rebuilt)
        .await
        .context("reading the rebuilt coupons")?;
    // A user still in flight may hold a coupon whose decision is not published yet.
    for row in live_coupons.values().chain(log_coupons.values()) {
        if row
            .holder_user_id
            .as_ref()
            .is_some_and(|u| log.skip_users.contains(u))
        {
            log.skip_coupons.insert(row.code.clone());
        }
    }
    let codes: BTreeSet<&String> = live_coupons.keys().chain(log_coupons.keys()).collect();
    for code in codes {
        if log.skip_coupons.contains(code.as_str()) {
            report.coupons_skipped += 1;
            continue;
        }
        report.coupons_checked += 1;
        let line = match (live_coupons.get(code), log_coupons.get(code)) {
            (Some(l), Some(r)) if same_coupon(l, r) => None,
            (Some(l), Some(r)) => Some(format!(
                "coupon {code}: live {}, log says {}",
                l.describe(),
                r.describe()
            )),
            (Some(l), None) => Some(format!(
                "coupon {code}: live {}, but the log never created it",
                l.describe()
            )),
            (None, Some(r)) => Some(format!(
                "coupon {code}: missing from the live database, log says {}",
                r.describe()
            )),
            (None, None) => None,
        };
        report.differences.extend(line);
    }

    let live_users = users_of(live).await.context("reading the live users")?;
    let log_users = users_of(rebuilt)
        .await
        .context("reading the rebuilt users")?;
    let users: BTreeSet<&String> = live_users.keys().chain(log_users.keys()).collect();
    for user in users {
        if log.skip_users.contains(user.as_str()) {
            report.users_skipped += 1;
            continue;
        }
        report.users_checked += 1;
        let (l, r) = (live_users.get(user), log_users.get(user));
        if l != r {
            report.differences.push(format!(
                "user {user}: live last_coupon_at={}, log says {}",
                time_ms(l),
                time_ms(r)
            ));
        }
    }
    compare_decisions(live, rebuilt, log, blacklist_before, report).await
}
