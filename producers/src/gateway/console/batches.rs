//! `GET /api/v1/batches`: the releases, newest first, with what became of
//! their coupons.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use coupon_domain::EmployeeId;

use super::super::responses;
use super::super::{AdminCaller, ApiError, ErrorBody, GatewayState};
use super::{listing_limit, millis, query_rejection, store_unavailable};
use crate::console_store::{self, BatchFilter};

/// `GET /api/v1/batches` query.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct BatchQuery {
    /// Only this employee's batches (1 to 64 characters, no control
    /// characters, no white space first or last).
    #[param(
        min_length = 1,
        max_length = 64,
        pattern = "{ID_PATTERN}",
        example = "e1"
    )]
    pub employee: Option<String>,
    /// Only this batch (the `batch_id` a release answered with): how far
    /// its projection has got.
    #[param(
        value_type = String,
        required = false,
        pattern = "{UUID_PATTERN}",
        example = "0b5d1c3e-8f7a-4d2b-9c6e-1a2b3c4d5e6f"
    )]
    pub batch_id: Option<String>,
    /// At most this many batches, newest first (1 to 500; default 50).
    #[param(minimum = 1, maximum = 500, example = 20)]
    pub limit: Option<u32>,
}

/// A batch as projected so far.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchInfo {
    #[schema(format = "uuid")]
    pub batch_id: String,
    #[schema(example = "e1")]
    pub employee_id: String,
    #[schema(example = "Electronics")]
    pub category: String,
    /// Coupons of the batch the projector has stored.
    pub projected: i64,
    pub available: i64,
    pub held: i64,
    pub redeemed: i64,
    /// When its first coupon was generated (RFC 3339, UTC).
    #[schema(format = DateTime)]
    pub generated_at: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BatchesAnswer {
    /// Newest first; a batch is listed from its first projected coupon.
    pub batches: Vec<BatchInfo>,
}

/// A UUID in its hyphenated form only (what [`UUID_PATTERN`] allows).
pub fn parse_batch_id(raw: &str) -> Result<uuid::Uuid, ApiError> {
    let hyphens = [8, 13, 18, 23];
    let well_formed = raw.len() == 36
        && raw.char_indices().all(|(i, c)| {
            if hyphens.contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        });
    if !well_formed {
        return Err(ApiError::invalid(
            "batch_id must be a UUID like 0b5d1c3e-8f7a-4d2b-9c6e-1a2b3c4d5e6f",
        ));
    }
    uuid::Uuid::parse_str(raw).map_err(|e| ApiError::invalid(format!("batch_id: {e}")))
}

/// Recent batches by employee, with how far each is projected.
///
/// With `batch_id`, that batch alone: the console polls it after a release
/// until `projected` reaches the batch's count (an empty list: nothing of
/// it is projected yet).
#[utoipa::path(
    get,
    path = "/api/v1/batches",
    tag = "console",
    params(BatchQuery),
    responses(
        (status = 200, description = "The batches, newest first.", body = BatchesAnswer),
        (status = 400, description = "An invalid employee id, batch id or limit.",
            body = ErrorBody, example = json!({"error": "invalid_request", "message": "limit must be between 1 and 500"})),
        responses::AdminUnauthorized,
        responses::StoreUnavailable,
    ),
    security(("admin_token" = []))
)]
pub(crate) async fn batches(
    State(state): State<Arc<GatewayState>>,
    _caller: AdminCaller,
    query: Result<Query<BatchQuery>, QueryRejection>,
) -> Result<Json<BatchesAnswer>, ApiError> {
    let Query(query) = query.map_err(query_rejection)?;
    let limit = listing_limit(query.limit)?;
    let employee = query
        .employee
        .map(|e| EmployeeId::parse(e).map_err(|e| ApiError::invalid(e.to_string())))
        .transpose()?;
    let batch_id = query.batch_id.as_deref().map(parse_batch_id).transpose()?;
    let filter = BatchFilter {
        employee: employee.map(|e| e.as_str().to_owned()),
        batch_id,
        limit,
    };
    let rows = console_store::batches(&state.pool, &filter)
        .await
        .map_err(store_unavailable)?;
    Ok(Json(BatchesAnswer {
        batches: rows
            .into_iter()
            .map(|r| BatchInfo {
                batch_id: r.batch_id.to_string(),
                employee_id: r.employee_id,
                category: r.category,
                projected: r.projected,
                available: r.available,
                held: r.held,
                redeemed: r.redeemed,
                generated_at: millis(r.generated_at),
            })
            .collect(),
    }))
}
