//! `DELETE /api/v1/campaigns/{id}`: an employee ends a campaign early
//! (issue #28 item 3).
//!
//! A campaign's id is its batch's id, the `batch_id` a release answers
//! with: a campaign is the terms of one batch, stored once per batch
//! (`campaigns`, keyed by `batch_id`), so no second id is needed.
//!
//! The end is one Postgres write (`store::campaigns::end_early`), on the
//! database's clock, and the first one stands: a repeat answers the same
//! end. From its commit no claim is granted a coupon of the campaign
//! (`store::claims::grant`); holds taken before keep their deadline. The
//! expiry sweeper then publishes the end (`CampaignEnded`, once, marked in
//! `campaigns.end_published_at` after the broker confirmed it) and moves
//! its available coupons to `expired`, each with
//! a `CouponExpired` event on the log and a history row, as it does at a
//! campaign's natural end (`valid_until`): the sweeper is the one durable
//! place either end is carried out, so an end is not lost with a gateway
//! that stopped after answering.

use std::sync::Arc;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::SecondsFormat;

use coupon_platform::store;

use crate::gateway::api::CampaignEnded;
use crate::gateway::console::parse_batch_id;
use crate::gateway::employees::AdminCaller;
use crate::gateway::responses;
use crate::gateway::GatewayState;
use crate::gateway::{ApiError, ErrorBody, ErrorCode};

/// End a campaign now.
#[utoipa::path(
    delete,
    path = "/api/v1/campaigns/{id}",
    tag = "employees",
    params(
        ("id" = String, Path, pattern = "{UUID_PATTERN}",
            description = "The campaign's id: the `batch_id` its release answered with",
            example = "0b5d1c3e-8f7a-4d2b-9c6e-1a2b3c4d5e6f")
    ),
    responses(
        (status = 200, description = "The campaign has ended (now, or before: ending is idempotent and a repeat answers the first end). Its coupons are no longer granted; its available ones become `expired` within a sweep of the expiry role; holds taken before keep their deadline and their coupons become `expired` if they end unbought.", body = CampaignEnded),
        (status = 400, description = "The id is not a UUID.",
            body = ErrorBody, example = json!({"error": "invalid_request", "message": "batch_id must be a UUID like 0b5d1c3e-8f7a-4d2b-9c6e-1a2b3c4d5e6f"})),
        responses::AdminUnauthorized,
        (status = 404, description = "No batch with this id has a campaign.",
            body = ErrorBody, example = json!({"error": "unknown_campaign", "message": "no campaign has this id"})),
        responses::StoreUnavailable,
    ),
    security(("admin_token" = []))
)]
pub(in crate::gateway) async fn end_campaign(
    State(state): State<Arc<GatewayState>>,
    caller: AdminCaller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<CampaignEnded>, ApiError> {
    let Path(raw) = path.map_err(|e| ApiError::invalid(e.body_text()))?;
    let batch_id = parse_batch_id(&raw)?;
    let author = caller.author();
    let ended = store::campaigns::end_early(&state.pool, batch_id, author.as_str())
        .await
        .map_err(|error| {
            tracing::warn!(%error, "ending a campaign failed");
            ApiError::unavailable("the campaign store is not available; retrying is safe")
        })?;
    let ended = ended.ok_or_else(unknown_campaign)?;
    tracing::info!(campaign = %batch_id, by = %author, "campaign ended");
    Ok(Json(answer(batch_id, ended)))
}

fn unknown_campaign() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::UnknownCampaign,
        "no campaign has this id (a campaign's id is the batch_id of its release)",
    )
}

/// The answer for an ended campaign.
fn answer(batch_id: uuid::Uuid, ended: store::campaigns::CampaignEnd) -> CampaignEnded {
    CampaignEnded {
        campaign_id: batch_id.to_string(),
        status: "ended".to_owned(),
        ended_at: ended.ended_at.to_rfc3339_opts(SecondsFormat::Millis, true),
        ended_by: ended.ended_by,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::response::IntoResponse;

    #[tokio::test]
    async fn an_unknown_campaign_is_a_404_naming_it() {
        let response = unknown_campaign().into_response();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let body = crate::gateway::routes::tests::body_of(response).await;
        assert_eq!(body["error"], "unknown_campaign");
    }

    #[test]
    fn the_answer_names_the_campaign_and_its_end() {
        let id = uuid::Uuid::from_u128(7);
        let at = "2026-12-06T03:00:00.123Z".parse().unwrap();
        let body = answer(
            id,
            store::campaigns::CampaignEnd {
                ended_at: at,
                ended_by: Some("alice".into()),
            },
        );
        assert_eq!(body.campaign_id, id.to_string());
        assert_eq!(body.status, "ended");
        assert_eq!(body.ended_at, "2026-12-06T03:00:00.123Z");
        assert_eq!(body.ended_by.as_deref(), Some("alice"));
    }
}
