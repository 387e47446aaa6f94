//! `GET /api/v1/campaigns`: the campaigns, newest first, each with its
//! terms, where it stands, its coupons by status and its funnel.
//!
//! Two sources, each the authority for what it shows: the coupons by status
//! are Postgres's `coupons` now (what `couponctl status` counts, exact
//! whichever history store is in use); the funnel (claimed, redeemed,
//! released, cancelled, expired) is the history, counted as
//! `GET /api/v1/analytics/funnel` counts it ([`super::analytics::funnel_rows`]), from
//! the oldest listed campaign's creation to now. With the history in
//! Cassandra a funnel reads at most [`super::CASSANDRA_MAX_RANGE_DAYS`] days
//! back: the answer's `funnel_since` says from when each funnel counts, so a
//! number that starts later than the campaign is never shown as its whole
//! life.
//!
//! Ending a campaign early is `DELETE /api/v1/campaigns/{id}`
//! (`routes::campaign_end`); creating one is a release with campaign fields
//! (`POST /api/v1/coupon`): the console's campaigns page calls those.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use coupon_domain::lifecycle::{campaign_end, CampaignPhase};

use super::super::api::{DiscountBody, MoneyBody};
use super::super::responses;
use super::super::{AdminCaller, ApiError, ErrorBody, GatewayState};
use super::{listing_limit, millis, query_rejection, store_unavailable, CASSANDRA_MAX_RANGE_DAYS};
use crate::console_store::{self, CampaignListing, FunnelRow};

/// `GET /api/v1/campaigns` query.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CampaignQuery {
    /// At most this many campaigns, newest first (1 to 500; default 50).
    #[param(minimum = 1, maximum = 500, example = 20)]
    pub limit: Option<u32>,
}

/// A campaign's coupons by status, now.
#[derive(Debug, Serialize, ToSchema)]
pub struct CampaignCoupons {
    /// Projected so far: available + held + redeemed + expired.
    pub issued: i64,
    pub available: i64,
    pub held: i64,
    pub redeemed: i64,
    /// Out of the pool for good: the campaign ended.
    pub expired: i64,
}

/// What became of a campaign's coupons, from the history since
/// `funnel_since`.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct CampaignFunnel {
    /// Holds given (a claim granted one of its coupons).
    pub claimed: i64,
    /// Purchases.
    pub redeemed: i64,
    /// Holds that ended unbought (the coupon went back to the pool).
    pub released: i64,
    /// Orders cancelled (the coupon was given back).
    pub cancelled: i64,
    /// Coupons that left the pool at the campaign's end.
    pub expired: i64,
}

impl From<&FunnelRow> for CampaignFunnel {
    fn from(r: &FunnelRow) -> Self {
        CampaignFunnel {
            claimed: r.granted,
            redeemed: r.redeemed,
            released: r.released,
            cancelled: r.cancelled,
            expired: r.expired,
        }
    }
}

/// One campaign.
#[derive(Debug, Serialize, ToSchema)]
pub struct CampaignInfo {
    /// The campaign's id: the batch id its release answered with (what
    /// `DELETE /api/v1/campaigns/{id}` takes).
    #[schema(format = "uuid")]
    pub batch_id: String,
    #[schema(example = "Winter sale")]
    pub name: Option<String>,
    /// The batch's category and employee (`null` until its first coupon is
    /// projected).
    #[schema(example = "Electronics")]
    pub category: Option<String>,
    #[schema(example = "e1")]
    pub employee_id: Option<String>,
    #[schema(value_type = Option<super::super::api::Discount>)]
    pub discount: Option<DiscountBody>,
    pub min_order: Option<MoneyBody>,
    #[schema(format = DateTime)]
    pub valid_from: Option<String>,
    #[schema(format = DateTime)]
    pub valid_until: Option<String>,
    pub locations: Vec<String>,
    pub min_age: Option<u32>,
    /// When its terms were stored (the release's projection).
    #[schema(format = DateTime)]
    pub created_at: String,
    /// When an employee ended it early, and who.
    #[schema(format = DateTime)]
    pub ended_at: Option<String>,
    pub ended_by: Option<String>,
    /// `scheduled` (its window has not opened), `running` or `ended`.
    #[schema(example = "running")]
    pub phase: String,
    pub coupons: CampaignCoupons,
    pub funnel: CampaignFunnel,
    /// The funnel counts the history from this time (the campaign's
    /// creation, or later when the history store reads less far back).
    #[schema(format = DateTime)]
    pub funnel_since: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CampaignsAnswer {
    /// Newest first (by when their terms were stored).
    pub campaigns: Vec<CampaignInfo>,
}

/// Slack before a campaign's creation from which its funnel reads the
/// history: a history row's time is its event's (the deciding process's
/// clock), the creation the database's.
const CLOCK_SLACK_SECONDS: i64 = 60;

/// The campaigns, newest first, with their terms, phase, coupons and funnel.
#[utoipa::path(
    get,
    path = "/api/v1/campaigns",
    tag = "console",
    params(CampaignQuery),
    responses(
        (status = 200, description = "The campaigns, newest first.", body = CampaignsAnswer),
        (status = 400, description = "A limit outside 1 to 500.",
            body = ErrorBody, example = json!({"error": "invalid_request", "message": "limit must be between 1 and 500"})),
        responses::AdminUnauthorized,
        responses::StoreUnavailable,
    ),
    security(("admin_token" = []))
)]
pub(crate) async fn campaigns(
    State(state): State<Arc<GatewayState>>,
    _caller: AdminCaller,
    query: Result<Query<CampaignQuery>, QueryRejection>,
) -> Result<Json<CampaignsAnswer>, ApiError> {
    let Query(query) = query.map_err(query_rejection)?;
    let limit = listing_limit(query.limit)?;
    let listed = console_store::campaigns(&state.pool, limit)
        .await
        .map_err(store_unavailable)?;
    let now = Utc::now();
    let Some(oldest) = listed.iter().map(|c| c.created_at).min() else {
        return Ok(Json(CampaignsAnswer {
            campaigns: Vec::new(),
        }));
    };
    let mut since = oldest - chrono::Duration::seconds(CLOCK_SLACK_SECONDS);
    if state.history.is_some() {
        since = since.max(now - chrono::Duration::days(CASSANDRA_MAX_RANGE_DAYS));
    }
    let ids: Vec<uuid::Uuid> = listed.iter().map(|c| c.batch_id).collect();
    let funnels: HashMap<uuid::Uuid, FunnelRow> =
        super::analytics::funnel_rows(&state, since, now, Some(&ids))
            .await?
            .into_iter()
            .map(|r| (r.batch_id, r))
            .collect();
    Ok(Json(CampaignsAnswer {
        campaigns: listed
            .into_iter()
            .map(|c| {
                let funnel = funnels.get(&c.batch_id).map(CampaignFunnel::from);
                let funnel_since =
                    since.max(c.created_at - chrono::Duration::seconds(CLOCK_SLACK_SECONDS));
                info(c, funnel.unwrap_or_default(), funnel_since, now)
            })
            .collect(),
    }))
}

fn info(
    c: CampaignListing,
    funnel: CampaignFunnel,
    funnel_since: DateTime<Utc>,
    now: DateTime<Utc>,
) -> CampaignInfo {
    let terms = &c.campaign;
    let wire = coupon_schemas::Campaign::from(terms);
    let end = campaign_end(terms.valid_until(), c.ended_at);
    let phase = CampaignPhase::at(terms.valid_from(), end, now);
    CampaignInfo {
        batch_id: c.batch_id.to_string(),
        name: terms.name().map(str::to_owned),
        category: c.category,
        employee_id: c.employee_id,
        discount: DiscountBody::of(&wire),
        min_order: wire.min_order.as_ref().map(MoneyBody::from),
        valid_from: terms.valid_from().map(millis),
        valid_until: terms.valid_until().map(millis),
        locations: terms.locations().to_vec(),
        min_age: terms.min_age(),
        created_at: millis(c.created_at),
        ended_at: c.ended_at.map(millis),
        ended_by: c.ended_by,
        phase: phase.as_str().to_owned(),
        coupons: CampaignCoupons {
            issued: c.issued,
            available: c.available,
            held: c.held,
            redeemed: c.redeemed,
            expired: c.expired,
        },
        funnel,
        funnel_since: millis(funnel_since),
    }
}
