//! `POST /api/v1/purchase/{order_id}/cancel`: a cancelled order gives its
//! coupon back (issue #28 item 5), request/reply over Kafka like a
//! purchase: a `PurchaseCancelled` on `coupons.purchases`, keyed by the
//! order's user, decided by the purchase processor
//! (`coupon_consumers::purchases::cancel`).
//!
//! The route reads the order's decision first: an order id under which no
//! coupon was redeemed is a `404 unknown_order` at once, and the request is
//! keyed by the user whose order it is (the storefront names only the
//! order). The coupon goes back to `available`, or to `expired` once its
//! campaign has ended; the user's quota stays used. Idempotent: a repeat
//! answers `200` again and changes nothing.

use std::sync::Arc;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use coupon_domain::{OrderId, PurchaseOutcome as Outcome, UserId};
use coupon_platform::store::decisions;
use coupon_schemas::{PurchaseCancelled, PurchaseDecided, PurchaseOutcome};

use crate::gateway::auth::{Caller, ClientAddr};
use crate::gateway::responses;
use crate::gateway::GatewayState;
use crate::gateway::{publish_and_wait, request_id, storefront_caller, traced, waiting_full};
use crate::gateway::{ApiError, ErrorBody, ErrorCode};

/// Cancel an order: its coupon goes back to the pool.
///
/// The coupon the order redeemed becomes `available` again while its
/// campaign runs (or when it has none), `expired` after the campaign's end.
/// The user's quota stays used. Idempotent on `order_id`.
#[utoipa::path(
    post,
    path = "/api/v1/purchase/{order_id}/cancel",
    tag = "storefront",
    params(
        ("order_id" = String, Path, pattern = "{ID_PATTERN}",
            description = "The order_id of a purchase that redeemed a coupon", example = "order-1"),
        ("x-request-id" = Option<String>, Header,
            description = "Your id for this request; generated when absent, echoed in the answer's x-request-id header.")
    ),
    responses(
        (status = 200, description = "Cancelled (now, or before: a repeat answers the same).", body = crate::gateway::api::Cancelled),
        (status = 400, description = "The order id is not valid.",
            body = ErrorBody, example = json!({"error": "invalid_request", "message": "order_id must not be empty"})),
        responses::ApiUnauthorized,
        (status = 404, description = "No purchase redeemed a coupon under this order id.",
            body = ErrorBody, example = json!({"error": "unknown_order", "message": "no purchase redeemed a coupon under this order id"})),
        responses::AddressLimited,
        (status = 503, description = "The cancellation could not be published, the store is not available, or the gateway is at its limit; retrying is safe.",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying")),
            body = ErrorBody, example = json!({"error": "unavailable", "message": "could not publish the cancellation"})),
        (status = 504, description = "No decision within REPLY_TIMEOUT; retrying is safe.",
            body = ErrorBody, example = json!({"error": "timeout", "message": "no decision in time; the request may still complete and retrying is safe"})),
    ),
    security((), ("api_token" = []))
)]
pub(in crate::gateway) async fn cancel_order(
    State(state): State<Arc<GatewayState>>,
    client: ClientAddr,
    caller: Caller,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    let request_id = request_id(&headers);
    traced(
        "cancel",
        &request_id,
        cancel_inner(&state, client, caller, path, &request_id),
    )
    .await
}

async fn cancel_inner(
    state: &GatewayState,
    client: ClientAddr,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    request_id: &str,
) -> Result<Response, ApiError> {
    let deadline = tokio::time::Instant::now() + state.config.reply_timeout;
    storefront_caller(state, caller, client)?;
    let Path(raw) = path.map_err(|e| ApiError::invalid(e.body_text()))?;
    let order = OrderId::parse(raw).map_err(|e| ApiError::invalid(e.to_string()))?;
    let unavailable = |error: sqlx::Error| {
        tracing::warn!(%error, "reading an order failed");
        ApiError::unavailable("the order store is not available; retrying is safe")
    };
    let mut conn = state.pool.acquire().await.map_err(unavailable)?;
    let decision = decisions::find_purchase(&mut conn, &order)
        .await
        .map_err(unavailable)?;
    drop(conn);
    let user: UserId = match decision {
        Some(d) if d.outcome == Outcome::Redeemed => d.user_id,
        _ => return Err(unknown_order()),
    };
    tracing::debug!(user = %user, order = %order, "cancellation received");
    let event = PurchaseCancelled {
        envelope: Some(state.publisher.envelope::<PurchaseCancelled>(request_id)),
        request_id: request_id.to_owned(),
        user_id: user.to_string(),
        order_id: order.to_string(),
    };
    let pending = state
        .replies
        .expect_purchase(request_id, user.as_str(), order.as_str())
        .map_err(waiting_full)?;
    let decision = publish_and_wait(
        state,
        &state.topics.purchases(),
        &user,
        &event,
        pending,
        deadline,
        "cancellation",
    )
    .await?;
    Ok(cancel_response(&decision))
}

fn unknown_order() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::UnknownOrder,
        "no purchase redeemed a coupon under this order id",
    )
}

/// The answer for the processor's decision: `cancelled`, else the order is
/// not one a coupon was redeemed under (as the processor found it).
fn cancel_response(decision: &PurchaseDecided) -> Response {
    match PurchaseOutcome::try_from(decision.outcome) {
        Ok(PurchaseOutcome::Cancelled) => super::purchase::purchase_response(decision),
        _ => unknown_order().into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::routes::tests::body_of;

    fn decided(outcome: PurchaseOutcome) -> PurchaseDecided {
        PurchaseDecided {
            outcome: outcome as i32,
            order_id: "o-1".into(),
            coupon_status: "available".into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_cancellation_answers_cancelled_and_anything_else_unknown_order() {
        let response = cancel_response(&decided(PurchaseOutcome::Cancelled));
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            body_of(response).await,
            serde_json::json!({"status": "cancelled"})
        );
        for outcome in [
            PurchaseOutcome::Invalid,
            PurchaseOutcome::Conflict,
            PurchaseOutcome::Unspecified,
        ] {
            let response = cancel_response(&decided(outcome));
            assert_eq!(response.status(), StatusCode::NOT_FOUND, "{outcome:?}");
            assert_eq!(body_of(response).await["error"], "unknown_order");
        }
    }
}
