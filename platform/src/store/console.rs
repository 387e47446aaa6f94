//! The reads behind the web console's routes (`/api/v1/batches`,
//! `/api/v1/analytics/*`), in one place: the HTTP handlers only parse,
//! call these and shape the answer.
//!
//! Every number comes straight from Postgres with one query, so what the
//! console shows is what an operator gets from `psql` with the same query
//! (the browser test compares them). The pool per category is
//! `coupon_platform::store::stats::pool_by_category`, the query `couponctl status`
//! runs, and the blacklist is `coupon_producers::blacklist`: neither is repeated here.
//!
//! The analytics read `coupon_history` (the history sink), bounded by time
//! on `occurred_at` so that Postgres prunes the months outside the range.
//! With the history in Cassandra (`HISTORY_STORE=cassandra`) the gateway
//! reads the range's rows from its time table and counts them here with
//! [`claims_per_bucket_of`] and [`funnel_of`], the same counts as the SQL
//! (the console test's numbers hold for either store).

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

pub use crate::store::history::HistoryEntry;

/// One batch as projected so far: its coupons by status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRow {
    pub batch_id: Uuid,
    pub employee_id: String,
    pub category: String,
    /// Coupons of the batch stored by the projector.
    pub projected: i64,
    pub available: i64,
    pub held: i64,
    pub redeemed: i64,
    /// When its first coupon was generated.
    pub generated_at: DateTime<Utc>,
}

/// Which batches to list.
#[derive(Debug, Clone, Default)]
pub struct BatchFilter {
    pub employee: Option<String>,
    pub batch_id: Option<Uuid>,
    pub limit: i64,
}

/// The most recent batches (newest first), as far as they are projected:
/// a batch appears with its first stored coupon.
pub async fn batches(pool: &PgPool, filter: &BatchFilter) -> Result<Vec<BatchRow>, sqlx::Error> {
    sqlx::query_as!(
        BatchRow,
        r#"SELECT batch_id, employee_id, category,
                count(*) AS "projected!",
                count(*) FILTER (WHERE status = 'available') AS "available!",
                count(*) FILTER (WHERE status = 'held') AS "held!",
                count(*) FILTER (WHERE status = 'redeemed') AS "redeemed!",
                min(generated_at) AS "generated_at!"
           FROM coupons
          WHERE ($1::text IS NULL OR employee_id = $1)
            AND ($2::uuid IS NULL OR batch_id = $2)
          GROUP BY batch_id, employee_id, category
          ORDER BY min(generated_at) DESC, batch_id
          LIMIT $3"#,
        filter.employee.as_deref(),
        filter.batch_id,
        filter.limit
    )
    .fetch_all(pool)
    .await
}

/// Claim decisions of one bucket, by outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimBucket {
    pub bucket_start: DateTime<Utc>,
    pub granted: i64,
    pub sold_out: i64,
    pub rate_limited: i64,
    pub blacklisted: i64,
    /// Invalid requests and anything else.
    pub other: i64,
}

/// Claim decisions recorded in the history in `[since, until]`, counted per
/// bucket of `bucket_seconds` (aligned to the Unix epoch), buckets without
/// any decision left out. A grant is a `granted` row; a refusal is a
/// `rejected` row carrying the claim's `reason` (a refused purchase carries
/// an `outcome` instead, and is not a claim). Repeated grants (the same
/// hold returned again) are not in the history, so not counted.
pub async fn claims_per_bucket(
    pool: &PgPool,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
    bucket_seconds: i64,
) -> Result<Vec<ClaimBucket>, sqlx::Error> {
    sqlx::query_as!(
        ClaimBucket,
        r#"SELECT to_timestamp(floor(extract(epoch FROM occurred_at) / $3::float8) * $3::float8)
                    AS "bucket_start!",
                count(*) FILTER (WHERE kind = 'granted') AS "granted!",
                count(*) FILTER (WHERE kind = 'rejected' AND detail->>'reason' = 'sold_out') AS "sold_out!",
                count(*) FILTER (WHERE kind = 'rejected' AND detail->>'reason' = 'rate_limited') AS "rate_limited!",
                count(*) FILTER (WHERE kind = 'rejected' AND detail->>'reason' = 'blacklisted') AS "blacklisted!",
                count(*) FILTER (WHERE kind = 'rejected'
                                   AND detail->>'reason' NOT IN ('sold_out', 'rate_limited', 'blacklisted')) AS "other!"
           FROM coupon_history
          WHERE occurred_at >= $1 AND occurred_at <= $2
            AND (kind = 'granted' OR (kind = 'rejected' AND detail ? 'reason'))
          GROUP BY 1
          ORDER BY 1"#,
        since,
        until,
        bucket_seconds as f64
    )
    .fetch_all(pool)
    .await
}

/// The funnel of one batch: what became of its coupons in the range, one
/// count per history kind that a coupon goes through after its creation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunnelRow {
    pub batch_id: Uuid,
    pub employee_id: String,
    pub category: String,
    /// Holds given (`granted` rows).
    pub granted: i64,
    /// Purchases (`redeemed`).
    pub redeemed: i64,
    /// Holds that ended unbought, the coupon back in the pool (`released`).
    pub released: i64,
    /// Orders cancelled, the coupon given back (`cancelled`).
    pub cancelled: i64,
    /// Coupons out of the pool for good at their campaign's end (`expired`).
    pub expired: i64,
}

/// The history kinds a funnel counts, in the order of [`FunnelRow`].
pub const FUNNEL_KINDS: [&str; 5] = ["granted", "redeemed", "released", "cancelled", "expired"];

/// The funnel per batch over `[since, until]` (batches with none of
/// [`FUNNEL_KINDS`] in the range are left out), by category then batch;
/// with `batches`, only those.
pub async fn funnel(
    pool: &PgPool,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
    batches: Option<&[Uuid]>,
) -> Result<Vec<FunnelRow>, sqlx::Error> {
    sqlx::query_as!(
        FunnelRow,
        r#"SELECT c.batch_id, c.employee_id, c.category,
                count(*) FILTER (WHERE h.kind = 'granted') AS "granted!",
                count(*) FILTER (WHERE h.kind = 'redeemed') AS "redeemed!",
                count(*) FILTER (WHERE h.kind = 'released') AS "released!",
                count(*) FILTER (WHERE h.kind = 'cancelled') AS "cancelled!",
                count(*) FILTER (WHERE h.kind = 'expired') AS "expired!"
           FROM coupon_history h
           JOIN coupons c ON c.code = h.coupon_code
          WHERE h.occurred_at >= $1 AND h.occurred_at <= $2
            AND h.kind = ANY($3)
            AND ($4::uuid[] IS NULL OR c.batch_id = ANY($4))
          GROUP BY c.batch_id, c.employee_id, c.category
          ORDER BY c.category, min(c.generated_at), c.batch_id"#,
        since,
        until,
        &FUNNEL_KINDS.map(String::from)[..],
        batches
    )
    .fetch_all(pool)
    .await
}

/// One campaign as the console lists it: its terms as stored (read back
/// as the claim path reads them, [`crate::store::campaigns`]), and its
/// coupons by status now.
#[derive(Debug, Clone)]
pub struct CampaignListing {
    pub batch_id: Uuid,
    /// The batch's (absent until its first coupon is projected).
    pub category: Option<String>,
    pub employee_id: Option<String>,
    pub campaign: coupon_domain::Campaign,
    pub created_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    pub ended_by: Option<String>,
    pub issued: i64,
    pub available: i64,
    pub held: i64,
    pub redeemed: i64,
    pub expired: i64,
}

/// [`CampaignListing`] as the query returns it.
struct ListingRow {
    batch_id: Uuid,
    name: Option<String>,
    category: Option<String>,
    employee_id: Option<String>,
    percent_off: Option<i16>,
    amount_off: Option<i64>,
    amount_currency: Option<String>,
    min_order_amount: Option<i64>,
    min_order_currency: Option<String>,
    valid_from: Option<DateTime<Utc>>,
    valid_until: Option<DateTime<Utc>>,
    locations: Vec<String>,
    min_age: Option<i32>,
    created_at: DateTime<Utc>,
    ended_at: Option<DateTime<Utc>>,
    ended_by: Option<String>,
    issued: i64,
    available: i64,
    held: i64,
    redeemed: i64,
    expired: i64,
}

impl ListingRow {
    fn listing(self) -> Result<CampaignListing, sqlx::Error> {
        let campaign = crate::store::campaigns::CampaignRow {
            name: self.name,
            percent_off: self.percent_off,
            amount_off: self.amount_off,
            amount_currency: self.amount_currency,
            min_order_amount: self.min_order_amount,
            min_order_currency: self.min_order_currency,
            valid_from: self.valid_from,
            valid_until: self.valid_until,
            locations: self.locations,
            min_age: self.min_age,
        }
        .campaign()?;
        Ok(CampaignListing {
            batch_id: self.batch_id,
            category: self.category,
            employee_id: self.employee_id,
            campaign,
            created_at: self.created_at,
            ended_at: self.ended_at,
            ended_by: self.ended_by,
            issued: self.issued,
            available: self.available,
            held: self.held,
            redeemed: self.redeemed,
            expired: self.expired,
        })
    }
}

/// The `limit` newest campaigns (by when their terms were stored), each
/// with its coupons counted by status through `coupons_batch`: the listing
/// is limited first, so a page costs its own campaigns' coupons, not every
/// campaign's. A row the campaign rules refuse (edited by hand) is a
/// decode error, as on the claim path.
pub async fn campaigns(pool: &PgPool, limit: i64) -> Result<Vec<CampaignListing>, sqlx::Error> {
    sqlx::query_as!(
        ListingRow,
        r#"SELECT k.batch_id AS "batch_id!", k.name, s.category, s.employee_id,
                  k.percent_off, k.amount_off, k.amount_currency,
                  k.min_order_amount, k.min_order_currency, k.valid_from, k.valid_until,
                  k.locations AS "locations!", k.min_age, k.created_at AS "created_at!",
                  k.ended_at, k.ended_by,
                  s.issued AS "issued!", s.available AS "available!", s.held AS "held!",
                  s.redeemed AS "redeemed!", s.expired AS "expired!"
             FROM (SELECT * FROM campaigns ORDER BY created_at DESC, batch_id LIMIT $1) k
             CROSS JOIN LATERAL (
                 SELECT min(c.category) AS category, min(c.employee_id) AS employee_id,
                        count(c.code) AS issued,
                        count(*) FILTER (WHERE c.status = 'available') AS available,
                        count(*) FILTER (WHERE c.status = 'held') AS held,
                        count(*) FILTER (WHERE c.status = 'redeemed') AS redeemed,
                        count(*) FILTER (WHERE c.status = 'expired') AS expired
                   FROM coupons c WHERE c.batch_id = k.batch_id) s
            ORDER BY k.created_at DESC, k.batch_id"#,
        limit
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(ListingRow::listing)
    .collect()
}

/// [`claims_per_bucket`] over history rows already read (from Cassandra):
/// the same buckets and counts, without I/O.
pub fn claims_per_bucket_of(
    rows: &[crate::store::history::HistoryEntry],
    bucket_seconds: i64,
) -> Vec<ClaimBucket> {
    use std::collections::BTreeMap;
    let width_ms = bucket_seconds.max(1) * 1_000;
    let mut buckets: BTreeMap<i64, ClaimBucket> = BTreeMap::new();
    for row in rows {
        let reason = row
            .detail
            .as_ref()
            .and_then(|d| d.get("reason"))
            .map(|r| r.as_str().unwrap_or_default());
        let outcome = match (row.kind.as_str(), reason) {
            ("granted", _) => 0,
            ("rejected", Some("sold_out")) => 1,
            ("rejected", Some("rate_limited")) => 2,
            ("rejected", Some("blacklisted")) => 3,
            ("rejected", Some(_)) => 4,
            _ => continue,
        };
        let start_ms = row.occurred_at.timestamp_millis().div_euclid(width_ms) * width_ms;
        let bucket = buckets.entry(start_ms).or_insert_with(|| ClaimBucket {
            bucket_start: DateTime::from_timestamp_millis(start_ms).unwrap_or_default(),
            granted: 0,
            sold_out: 0,
            rate_limited: 0,
            blacklisted: 0,
            other: 0,
        });
        match outcome {
            0 => bucket.granted += 1,
            1 => bucket.sold_out += 1,
            2 => bucket.rate_limited += 1,
            3 => bucket.blacklisted += 1,
            _ => bucket.other += 1,
        }
    }
    buckets.into_values().collect()
}

/// The batch a coupon belongs to, for [`funnel_of`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CouponBatch {
    pub code: String,
    pub batch_id: Uuid,
    pub employee_id: String,
    pub category: String,
    pub generated_at: DateTime<Utc>,
}

/// The batches of `codes` (those that are projected).
pub async fn coupon_batches(
    pool: &PgPool,
    codes: &[String],
) -> Result<Vec<CouponBatch>, sqlx::Error> {
    sqlx::query_as!(
        CouponBatch,
        "SELECT code, batch_id, employee_id, category, generated_at FROM coupons WHERE code = ANY($1)",
        codes
    )
    .fetch_all(pool)
    .await
}

/// [`funnel`] over history rows already read (from Cassandra) and the
/// batches of their coupons: the same rows in the same order, without I/O.
pub fn funnel_of(
    rows: &[crate::store::history::HistoryEntry],
    batches: &[CouponBatch],
) -> Vec<FunnelRow> {
    use std::collections::HashMap;
    let of: HashMap<&str, &CouponBatch> = batches.iter().map(|b| (b.code.as_str(), b)).collect();
    let mut funnel: HashMap<(Uuid, &str, &str), (FunnelRow, DateTime<Utc>)> = HashMap::new();
    for row in rows {
        let Some(batch) = row.coupon_code.as_deref().and_then(|c| of.get(c)) else {
            continue;
        };
        let (step, first) = funnel
            .entry((batch.batch_id, &batch.employee_id, &batch.category))
            .or_insert_with(|| {
                (
                    FunnelRow {
                        batch_id: batch.batch_id,
                        employee_id: batch.employee_id.clone(),
                        category: batch.category.clone(),
                        granted: 0,
                        redeemed: 0,
                        released: 0,
                        cancelled: 0,
                        expired: 0,
                    },
                    batch.generated_at,
                )
            });
        match row.kind.as_str() {
            "granted" => step.granted += 1,
            "redeemed" => step.redeemed += 1,
            "released" => step.released += 1,
            "cancelled" => step.cancelled += 1,
            "expired" => step.expired += 1,
            _ => continue,
        }
        *first = (*first).min(batch.generated_at);
    }
    let mut steps: Vec<(FunnelRow, DateTime<Utc>)> = funnel
        .into_values()
        .filter(|(s, _)| s.granted + s.redeemed + s.released + s.cancelled + s.expired > 0)
        .collect();
    steps.sort_by(|(a, at), (b, bt)| {
        (&a.category, at, a.batch_id).cmp(&(&b.category, bt, b.batch_id))
    });
    steps.into_iter().map(|(s, _)| s).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::history::HistoryEntry;

    fn row(secs: i64, kind: &str, code: Option<&str>, detail: serde_json::Value) -> HistoryEntry {
        HistoryEntry {
            occurred_at: DateTime::from_timestamp(secs, 0).unwrap(),
            kind: kind.into(),
            coupon_code: code.map(Into::into),
            user_id: None,
            detail: Some(detail),
        }
    }

    #[test]
    fn rows_are_counted_as_the_sql_counts_them() {
        let rows = vec![
            row(60, "granted", Some("A"), serde_json::json!({})),
            row(
                61,
                "rejected",
                None,
                serde_json::json!({"reason": "sold_out"}),
            ),
            row(
                130,
                "rejected",
                None,
                serde_json::json!({"reason": "invalid"}),
            ),
            // A refused purchase carries no reason: not a claim.
            row(
                131,
                "rejected",
                Some("A"),
                serde_json::json!({"outcome": "not_holder"}),
            ),
            row(132, "redeemed", Some("A"), serde_json::json!({})),
            row(133, "released", Some("B"), serde_json::json!({})),
            row(134, "created", Some("C"), serde_json::json!({})),
            row(135, "cancelled", Some("A"), serde_json::json!({})),
            row(136, "expired", Some("B"), serde_json::json!({})),
        ];
        let buckets = claims_per_bucket_of(&rows, 60);
        assert_eq!(buckets.len(), 2);
        assert_eq!((buckets[0].granted, buckets[0].sold_out), (1, 1));
        assert_eq!(buckets[0].bucket_start.timestamp(), 60);
        assert_eq!(
            (buckets[1].other, buckets[1].bucket_start.timestamp()),
            (1, 120)
        );

        let batch = |code: &str, category: &str, n: u128| CouponBatch {
            code: code.into(),
            batch_id: Uuid::from_u128(n),
            employee_id: "e".into(),
            category: category.into(),
            generated_at: DateTime::from_timestamp(n as i64, 0).unwrap(),
        };
        let batches = [
            batch("A", "Shoes", 2),
            batch("B", "Hats", 1),
            batch("C", "Hats", 3),
        ];
        let funnel = funnel_of(&rows, &batches);
        assert_eq!(
            funnel.len(),
            2,
            "the batch with only a creation is left out"
        );
        assert_eq!(funnel[0].category, "Hats");
        assert_eq!(
            (funnel[0].granted, funnel[0].released, funnel[0].expired),
            (0, 1, 1)
        );
        assert_eq!(
            (funnel[1].granted, funnel[1].redeemed, funnel[1].cancelled),
            (1, 1, 1)
        );
    }
}
