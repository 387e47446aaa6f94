//! The `campaigns` table: one row per batch that has a campaign (never one
//! per coupon: a coupon finds its campaign by its `batch_id`).
//!
//! The projector stores a batch's campaign ([`insert`]) before its coupons,
//! so a coupon is never seen without its window; the claim statement
//! (`store::claims::grant`) and the pool probe (`store::coupons::any_available`)
//! join it to skip coupons outside their window. A row reads back through
//! [`Campaign::from_stored`]: a row it refuses (edited by hand) is a decode
//! error, never a campaign with rules nobody checked.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use coupon_domain::campaign::{CampaignFields, Discount};
use coupon_domain::{Campaign, CouponCode, Money};

/// A `campaigns` row, as stored.
#[derive(Debug, Clone)]
pub(crate) struct CampaignRow {
    pub(crate) name: Option<String>,
    pub(crate) percent_off: Option<i16>,
    pub(crate) amount_off: Option<i64>,
    pub(crate) amount_currency: Option<String>,
    pub(crate) min_order_amount: Option<i64>,
    pub(crate) min_order_currency: Option<String>,
    pub(crate) valid_from: Option<DateTime<Utc>>,
    pub(crate) valid_until: Option<DateTime<Utc>>,
    pub(crate) locations: Vec<String>,
    pub(crate) min_age: Option<i32>,
}

fn money(
    field: &'static str,
    amount: Option<i64>,
    currency: Option<&str>,
) -> Result<Option<Money>, sqlx::Error> {
    match (amount, currency) {
        (Some(amount), Some(currency)) => Money::parse(field, amount, currency, true)
            .map(Some)
            .map_err(|e| sqlx::Error::Decode(e.into())),
        _ => Ok(None),
    }
}

impl CampaignRow {
    pub(crate) fn campaign(self) -> Result<Campaign, sqlx::Error> {
        let discount = match (
            self.percent_off,
            money(
                "discount.amount_off",
                self.amount_off,
                self.amount_currency.as_deref(),
            )?,
        ) {
            (Some(p), _) => Some(
                Discount::parse(Some(i64::from(p)), None, None)
                    .map_err(|e| sqlx::Error::Decode(e.into()))?,
            ),
            (None, Some(off)) => Some(Discount::AmountOff(off)),
            (None, None) => None,
        };
        Campaign::from_stored(CampaignFields {
            name: self.name,
            discount,
            min_order: money(
                "min_order",
                self.min_order_amount,
                self.min_order_currency.as_deref(),
            )?,
            valid_from: self.valid_from,
            valid_until: self.valid_until,
            locations: self.locations,
            min_age: self.min_age.map(i64::from),
        })
        .map_err(|e| sqlx::Error::Decode(e.into()))
    }
}

/// Stores `campaign` as the campaign of `batch_id` unless the batch has one
/// already (a redelivered chunk): a batch's campaign is written once.
pub async fn insert(
    conn: &mut PgConnection,
    batch_id: Uuid,
    campaign: &Campaign,
) -> Result<bool, sqlx::Error> {
    let (percent_off, amount_off) = match campaign.discount() {
        Some(Discount::PercentOff(p)) => (Some(i16::from(p)), None),
        Some(Discount::AmountOff(m)) => (None, Some(m)),
        None => (None, None),
    };
    let min = campaign.min_order();
    let inserted = sqlx::query!(
        "INSERT INTO campaigns (batch_id, name, percent_off, amount_off, amount_currency,
                                min_order_amount, min_order_currency, valid_from, valid_until,
                                locations, min_age)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
         ON CONFLICT (batch_id) DO NOTHING",
        batch_id,
        campaign.name(),
        percent_off,
        amount_off.map(|m| m.amount),
        amount_off.map(|m| m.currency.to_string()),
        min.map(|m| m.amount),
        min.map(|m| m.currency.to_string()),
        campaign.valid_from(),
        campaign.valid_until(),
        campaign.locations(),
        campaign.min_age().map(|a| a as i32),
    )
    .execute(conn)
    .await?
    .rows_affected();
    Ok(inserted > 0)
}

/// The campaign of `batch_id`, if it has one.
pub async fn of_batch(
    conn: &mut PgConnection,
    batch_id: Uuid,
) -> Result<Option<Campaign>, sqlx::Error> {
    sqlx::query_as!(
        CampaignRow,
        r#"SELECT name, percent_off, amount_off, amount_currency, min_order_amount,
                  min_order_currency, valid_from, valid_until, locations, min_age
           FROM campaigns WHERE batch_id = $1"#,
        batch_id
    )
    .fetch_optional(conn)
    .await?
    .map(CampaignRow::campaign)
    .transpose()
}

/// The campaign of the coupon `code`, if its batch has one.
pub async fn of_coupon<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    code: CouponCode,
) -> Result<Option<Campaign>, sqlx::Error> {
    Ok(of_coupons(executor, &[code]).await?.remove(&code))
}

/// The campaigns of those of `codes` whose batch has one, in one round trip.
pub async fn of_coupons<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    codes: &[CouponCode],
) -> Result<HashMap<CouponCode, Campaign>, sqlx::Error> {
    if codes.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = sqlx::query!(
        r#"SELECT c.code AS "code: CouponCode", k.name, k.percent_off, k.amount_off,
                  k.amount_currency, k.min_order_amount, k.min_order_currency, k.valid_from,
                  k.valid_until, k.locations, k.min_age
           FROM coupons c JOIN campaigns k ON k.batch_id = c.batch_id
           WHERE c.code = ANY($1)"#,
        codes as &[CouponCode]
    )
    .fetch_all(executor)
    .await?;
    rows.into_iter()
        .map(|r| {
            let row = CampaignRow {
                name: r.name,
                percent_off: r.percent_off,
                amount_off: r.amount_off,
                amount_currency: r.amount_currency,
                min_order_amount: r.min_order_amount,
                min_order_currency: r.min_order_currency,
                valid_from: r.valid_from,
                valid_until: r.valid_until,
                locations: r.locations,
                min_age: r.min_age,
            };
            Ok((r.code, row.campaign()?))
        })
        .collect()
}

/// When the campaign of coupon `code` ends or ended
/// (`coupon_domain::lifecycle::campaign_end`), and the database's time now;
/// `None` as the end when it has no campaign or one without an end.
pub async fn end_of_coupon(
    conn: &mut PgConnection,
    code: CouponCode,
) -> Result<(Option<DateTime<Utc>>, DateTime<Utc>), sqlx::Error> {
    let row = sqlx::query!(
        r#"SELECT (SELECT LEAST(k.valid_until, k.ended_at) FROM coupons c
                    JOIN campaigns k ON k.batch_id = c.batch_id WHERE c.code = $1) AS "end?",
                  now() AS "now!""#,
        code as CouponCode
    )
    .fetch_one(conn)
    .await?;
    Ok((row.end, row.now))
}

/// A campaign's end, as an early end answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CampaignEnd {
    /// When it ended: the earlier of its `valid_until` and its early end.
    pub ended_at: DateTime<Utc>,
    /// Who ended it early (`None`: it ended by its window before that).
    pub ended_by: Option<String>,
}

/// Ends the campaign of `batch_id` now (the database's clock) on behalf of
/// `by`, unless it was ended early before: the first end stands, so a
/// repeat answers the same. `None`: the batch has no campaign. Claims give
/// none of its coupons once this commits (`store::claims::grant`); the
/// expiry sweeper then makes its available coupons `expired`.
pub async fn end_early(
    pool: &sqlx::PgPool,
    batch_id: Uuid,
    by: &str,
) -> Result<Option<CampaignEnd>, sqlx::Error> {
    // Two statements: a repeat racing the first waits for its row lock,
    // finds it ended and reads the end it wrote (a new snapshot).
    sqlx::query!(
        "UPDATE campaigns SET ended_at = clock_timestamp(), ended_by = $2
         WHERE batch_id = $1 AND ended_at IS NULL",
        batch_id,
        by
    )
    .execute(pool)
    .await?;
    let row = sqlx::query!(
        r#"SELECT LEAST(valid_until, ended_at) AS "ended_at!", ended_by,
                  COALESCE(valid_until < ended_at, false) AS "before_early_end!"
           FROM campaigns WHERE batch_id = $1"#,
        batch_id
    )
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| CampaignEnd {
        ended_at: r.ended_at,
        ended_by: (!r.before_early_end).then_some(r.ended_by).flatten(),
    }))
}

/// A campaign ended early whose end is not on the log yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpublishedEnd {
    pub batch_id: Uuid,
    pub ended_at: DateTime<Utc>,
    pub ended_by: Option<String>,
}

/// Early ends the expiry sweeper has not published yet, at most `limit`.
pub async fn unpublished_ends(
    pool: &sqlx::PgPool,
    limit: i64,
) -> Result<Vec<UnpublishedEnd>, sqlx::Error> {
    sqlx::query_as!(
        UnpublishedEnd,
        r#"SELECT batch_id, ended_at AS "ended_at!", ended_by FROM campaigns
           WHERE ended_at IS NOT NULL AND end_published_at IS NULL
           ORDER BY ended_at LIMIT $1"#,
        limit
    )
    .fetch_all(pool)
    .await
}

/// Marks the early ends of `batches` published (the broker confirmed them).
pub async fn mark_ends_published(pool: &sqlx::PgPool, batches: &[Uuid]) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE campaigns SET end_published_at = now()
         WHERE batch_id = ANY($1) AND end_published_at IS NULL",
        batches
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Records that the campaign of `batch_id` was ended early at `at` by
/// `by`, unless an end is recorded already: the rebuild, from the log's
/// `CampaignEnded` (and `CouponExpired`) events.
pub async fn set_ended_at(
    conn: &mut PgConnection,
    batch_id: Uuid,
    at: DateTime<Utc>,
    by: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE campaigns SET ended_at = $2, ended_by = $3, end_published_at = now()
         WHERE batch_id = $1 AND ended_at IS NULL",
        batch_id,
        at,
        by
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// How long from the database's `now()` until the first campaign opening
/// after `after` (`None`: after now), or `None` when none is to come; not
/// positive when that opening came between `after` and now. The claim
/// processor caps its sold-out marks at it (`coupon_domain::sold_out`): a
/// pool judged empty at `after` is no longer empty once it has passed.
pub async fn until_next_opening<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    after: Option<DateTime<Utc>>,
) -> Result<Option<chrono::Duration>, sqlx::Error> {
    let ms = sqlx::query_scalar!(
        r#"SELECT (EXTRACT(EPOCH FROM (min(valid_from) - now())) * 1000)::bigint AS "ms"
           FROM campaigns WHERE valid_from > COALESCE($1, now())"#,
        after
    )
    .fetch_one(executor)
    .await?;
    Ok(ms.map(chrono::Duration::milliseconds))
}

/// The campaigns with eligibility rules (locations, a minimum age) that
/// have not ended by `earliest` and still have an available coupon, by
/// batch: the claim processor leaves out, for each user, those whose rules
/// refuse the user's profile (`coupon_domain::profile::ineligible_batches`).
pub async fn restricted(
    conn: &mut PgConnection,
    earliest: DateTime<Utc>,
) -> Result<Vec<(Uuid, coupon_domain::Eligibility)>, sqlx::Error> {
    let rows = sqlx::query!(
        r#"SELECT k.batch_id, k.locations, k.min_age FROM campaigns k
           WHERE (cardinality(k.locations) > 0 OR k.min_age IS NOT NULL)
             AND (k.valid_until IS NULL OR k.valid_until > $1)
             AND EXISTS (SELECT 1 FROM coupons c
                         WHERE c.batch_id = k.batch_id AND c.status = 'available')"#,
        earliest
    )
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let rules = coupon_domain::Eligibility {
                locations: r.locations,
                min_age: r.min_age.and_then(|age| u32::try_from(age).ok()),
            };
            (r.batch_id, rules)
        })
        .collect())
}
