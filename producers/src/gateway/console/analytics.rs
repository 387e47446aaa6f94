//! `GET /api/v1/analytics/claims` and `/funnel`: claims over a time range,
//! bucketed, and what became of the coupons granted in it.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use chrono::{DateTime, TimeZone as _, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::super::responses;
use super::super::{AdminCaller, ApiError, ErrorBody, GatewayState};
use super::{
    millis, query_rejection, store_unavailable, DEFAULT_RANGE_SECONDS, MAX_BUCKETS,
    MAX_UNIX_SECONDS,
};
use crate::console_store::{self};

/// A time range in Unix seconds (UTC).
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RangeQuery {
    /// From this time (Unix seconds, inclusive); default: an hour before
    /// `until`.
    #[param(minimum = 0, maximum = 253_402_300_799.0, example = 1_764_547_200)]
    pub since: Option<u64>,
    /// Up to this time (Unix seconds, inclusive); default: now. A range
    /// that ends before it starts is empty.
    #[param(minimum = 0, maximum = 253_402_300_799.0, example = 1_764_633_600)]
    pub until: Option<u64>,
}

/// `[since, until]` of a query, defaults applied. No I/O.
pub fn resolve_range(
    since: Option<u64>,
    until: Option<u64>,
    now: DateTime<Utc>,
) -> Result<(DateTime<Utc>, DateTime<Utc>), ApiError> {
    for (name, value) in [("since", since), ("until", until)] {
        if value.is_some_and(|v| v > MAX_UNIX_SECONDS) {
            return Err(ApiError::invalid(format!(
                "{name} must be Unix seconds between 0 and {MAX_UNIX_SECONDS}"
            )));
        }
    }
    let at = |secs: u64| Utc.timestamp_opt(secs as i64, 0).single();
    let until = match until {
        Some(secs) => at(secs).ok_or_else(|| ApiError::invalid("until is not a time"))?,
        None => now,
    };
    let since = match since {
        Some(secs) => at(secs).ok_or_else(|| ApiError::invalid("since is not a time"))?,
        None => until - chrono::Duration::seconds(DEFAULT_RANGE_SECONDS as i64),
    };
    Ok((since, until))
}

/// The longest range the analytics read from Cassandra: each hour is
/// [`coupon_platform::cassandra::TIME_SHARDS`] partitions to read.
pub const CASSANDRA_MAX_RANGE_DAYS: i64 = 31;

/// The history rows of `[since, until]` from Cassandra's time table.
async fn cassandra_rows(
    history: &coupon_platform::cassandra::LazyCassandra,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<Vec<console_store::HistoryEntry>, ApiError> {
    if until - since > chrono::Duration::days(CASSANDRA_MAX_RANGE_DAYS) {
        return Err(ApiError::invalid(format!(
            "the history is in Cassandra: a range of at most {CASSANDRA_MAX_RANGE_DAYS} days"
        )));
    }
    let unavailable = |error: coupon_platform::cassandra::CassandraError| {
        tracing::warn!(error = ?error, "a console read of the history in Cassandra failed");
        ApiError::unavailable("the history store is not available; retrying is safe")
    };
    let store = history.get().await.map_err(unavailable)?;
    store
        .entries(None, None, Some(since), Some(until))
        .await
        .map_err(unavailable)
}

/// The bucket width of a claims chart over `[since, until]`: a minute, or
/// whole minutes wide enough that the range has at most [`MAX_BUCKETS`].
pub fn bucket_seconds(since: DateTime<Utc>, until: DateTime<Utc>) -> i64 {
    let span = (until - since).num_seconds().max(0);
    let minutes = (span + 59) / 60;
    let per_bucket = (minutes + MAX_BUCKETS - 1) / MAX_BUCKETS;
    per_bucket.max(1) * 60
}

/// Claim decisions of one bucket.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClaimCounts {
    /// The bucket's start (RFC 3339, UTC); absent in the totals.
    #[schema(format = DateTime)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    pub granted: i64,
    pub sold_out: i64,
    pub rate_limited: i64,
    pub blacklisted: i64,
    /// Invalid requests.
    pub other: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ClaimsAnswer {
    #[schema(format = DateTime)]
    pub since: String,
    #[schema(format = DateTime)]
    pub until: String,
    /// Width of each bucket: 60 (claims per minute), wider for ranges
    /// longer than a day so that there are at most 1440.
    pub bucket_seconds: i64,
    /// Buckets with at least one decision, oldest first.
    pub buckets: Vec<ClaimCounts>,
    /// The whole range.
    pub totals: ClaimCounts,
}

/// Claim decisions per minute by outcome, from the history.
///
/// Counts the history sink's rows: a `granted` row per hold given, a
/// `rejected` row per refused claim (repeated grants of a hold already
/// given are not history, so not counted).
#[utoipa::path(
    get,
    path = "/api/v1/analytics/claims",
    tag = "console",
    params(RangeQuery),
    responses(
        (status = 200, description = "Decisions per bucket and in total.", body = ClaimsAnswer),
        (status = 400, description = "A bound that is not Unix seconds between 0 and 253402300799.",
            body = ErrorBody, example = json!({"error": "invalid_request", "message": "since must be Unix seconds between 0 and 253402300799"})),
        responses::AdminUnauthorized,
        responses::StoreUnavailable,
    ),
    security(("admin_token" = []))
)]
pub(crate) async fn analytics_claims(
    State(state): State<Arc<GatewayState>>,
    _caller: AdminCaller,
    query: Result<Query<RangeQuery>, QueryRejection>,
) -> Result<Json<ClaimsAnswer>, ApiError> {
    let Query(query) = query.map_err(query_rejection)?;
    let (since, until) = resolve_range(query.since, query.until, Utc::now())?;
    let width = bucket_seconds(since, until);
    let rows = if until < since {
        Vec::new()
    } else if let Some(history) = &state.history {
        let rows = cassandra_rows(history, since, until).await?;
        console_store::claims_per_bucket_of(&rows, width)
    } else {
        console_store::claims_per_bucket(&state.read_pool, since, until, width)
            .await
            .map_err(store_unavailable)?
    };
    let mut totals = ClaimCounts {
        start: None,
        granted: 0,
        sold_out: 0,
        rate_limited: 0,
        blacklisted: 0,
        other: 0,
    };
    let buckets = rows
        .into_iter()
        .map(|r| {
            totals.granted += r.granted;
            totals.sold_out += r.sold_out;
            totals.rate_limited += r.rate_limited;
            totals.blacklisted += r.blacklisted;
            totals.other += r.other;
            ClaimCounts {
                start: Some(millis(r.bucket_start)),
                granted: r.granted,
                sold_out: r.sold_out,
                rate_limited: r.rate_limited,
                blacklisted: r.blacklisted,
                other: r.other,
            }
        })
        .collect();
    Ok(Json(ClaimsAnswer {
        since: millis(since),
        until: millis(until),
        bucket_seconds: width,
        buckets,
        totals,
    }))
}

/// The funnel of one category or batch.
#[derive(Debug, Serialize, ToSchema)]
pub struct FunnelStep {
    #[schema(example = "Electronics")]
    pub category: String,
    /// Absent in the per-category rows.
    #[schema(format = "uuid")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub employee_id: Option<String>,
    /// Holds given in the range.
    pub granted: i64,
    /// Purchases in the range.
    pub redeemed: i64,
    /// Holds that ended unbought in the range (the coupon went back to the
    /// pool).
    pub released: i64,
    /// Orders cancelled in the range (the coupon was given back).
    pub cancelled: i64,
    /// Coupons that left the pool for good in the range because their
    /// campaign ended (history kind `expired`).
    pub expired: i64,
}

impl FunnelStep {
    fn add(&mut self, row: &console_store::FunnelRow) {
        self.granted += row.granted;
        self.redeemed += row.redeemed;
        self.released += row.released;
        self.cancelled += row.cancelled;
        self.expired += row.expired;
    }
}

impl From<console_store::FunnelRow> for FunnelStep {
    fn from(r: console_store::FunnelRow) -> Self {
        FunnelStep {
            category: r.category,
            batch_id: Some(r.batch_id.to_string()),
            employee_id: Some(r.employee_id),
            granted: r.granted,
            redeemed: r.redeemed,
            released: r.released,
            cancelled: r.cancelled,
            expired: r.expired,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FunnelAnswer {
    #[schema(format = DateTime)]
    pub since: String,
    #[schema(format = DateTime)]
    pub until: String,
    pub by_category: Vec<FunnelStep>,
    pub by_batch: Vec<FunnelStep>,
}

/// The funnel rows of `[since, until]` (of `batches` only, if given) from
/// the history store in use: one SQL query on Postgres; on Cassandra, the
/// range's rows counted here with the batches of their coupons.
pub(super) async fn funnel_rows(
    state: &GatewayState,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
    batches: Option<&[uuid::Uuid]>,
) -> Result<Vec<console_store::FunnelRow>, ApiError> {
    if until < since {
        return Ok(Vec::new());
    }
    let Some(history) = &state.history else {
        return console_store::funnel(&state.read_pool, since, until, batches)
            .await
            .map_err(store_unavailable);
    };
    let rows = cassandra_rows(history, since, until).await?;
    let mut codes: Vec<String> = rows
        .iter()
        .filter(|r| console_store::FUNNEL_KINDS.contains(&r.kind.as_str()))
        .filter_map(|r| r.coupon_code.clone())
        .collect();
    codes.sort_unstable();
    codes.dedup();
    let mut of_codes = console_store::coupon_batches(&state.read_pool, &codes)
        .await
        .map_err(store_unavailable)?;
    if let Some(batches) = batches {
        of_codes.retain(|c| batches.contains(&c.batch_id));
    }
    Ok(console_store::funnel_of(&rows, &of_codes))
}

/// The redemption funnel per category and per batch, from the history:
/// holds granted, then redeemed or released; orders cancelled; coupons
/// expired at their campaign's end.
#[utoipa::path(
    get,
    path = "/api/v1/analytics/funnel",
    tag = "console",
    params(RangeQuery),
    responses(
        (status = 200, description = "The funnel per category and per batch.", body = FunnelAnswer),
        (status = 400, description = "A bound that is not Unix seconds between 0 and 253402300799.",
            body = ErrorBody, example = json!({"error": "invalid_request", "message": "since must be Unix seconds between 0 and 253402300799"})),
        responses::AdminUnauthorized,
        responses::StoreUnavailable,
    ),
    security(("admin_token" = []))
)]
pub(crate) async fn analytics_funnel(
    State(state): State<Arc<GatewayState>>,
    _caller: AdminCaller,
    query: Result<Query<RangeQuery>, QueryRejection>,
) -> Result<Json<FunnelAnswer>, ApiError> {
    let Query(query) = query.map_err(query_rejection)?;
    let (since, until) = resolve_range(query.since, query.until, Utc::now())?;
    let rows = funnel_rows(&state, since, until, None).await?;
    let mut by_category: Vec<FunnelStep> = Vec::new();
    for r in &rows {
        match by_category.iter_mut().find(|c| c.category == r.category) {
            Some(c) => c.add(r),
            None => {
                let mut step = FunnelStep::from(r.clone());
                step.batch_id = None;
                step.employee_id = None;
                by_category.push(step);
            }
        }
    }
    Ok(Json(FunnelAnswer {
        since: millis(since),
        until: millis(until),
        by_category,
        by_batch: rows.into_iter().map(FunnelStep::from).collect(),
    }))
}
