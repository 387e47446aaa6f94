//! `POST /api/v1/purchase`: a purchase, request/reply over Kafka to the
//! purchase processor, idempotent on `order_id`.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use coupon_domain::{Money, OrderId, RequestedCode, UserId};
use coupon_schemas::{PurchaseDecided, PurchaseOutcome, PurchaseRequested};

use crate::gateway::api::{MoneyBody, PurchaseBody, PurchaseRedeemed, Redeemed};
use crate::gateway::auth::{Caller, ClientAddr};
use crate::gateway::responses;
use crate::gateway::GatewayState;
use crate::gateway::{
    json_rejection, order_id_conflict, publish_and_wait, request_id, rfc3339, storefront_caller,
    traced, waiting_full,
};
use crate::gateway::{ApiError, ErrorBody, ErrorCode};

/// Buy a held coupon.
///
/// Redeems the coupon if this user holds it and the hold has not ended,
/// and, for a campaign's coupon, the order meets the campaign's terms: the
/// `order_total` is at least its minimum, in its currency. The answer says
/// what the coupon takes off (`discount_amount`). Idempotent on `order_id`:
/// the same order again gets the same answer (a refused order too: a new
/// total is a new order id).
#[utoipa::path(
    post,
    path = "/api/v1/purchase",
    tag = "storefront",
    params(
        ("x-request-id" = Option<String>, Header,
            description = "Your id for this request; generated when absent, echoed in the answer's x-request-id header.")
    ),
    request_body = PurchaseBody,
    responses(
        (status = 200, description = "Redeemed.", body = PurchaseRedeemed),
        (status = 400, description = "Invalid ids; an `order_total` that is negative or not in an active ISO 4217 currency; a field the route does not know (named in the message).",
            body = ErrorBody, example = json!({"error": "invalid_request", "message": "order_id must not be empty"})),
        responses::ApiUnauthorized,
        (status = 404, description = "No coupon has this code.",
            body = ErrorBody, example = json!({"error": "unknown_coupon", "message": "no coupon has this code"})),
        (status = 409, description = "The coupon cannot be bought by this user now.", body = ErrorBody,
            examples(
                ("hold_expired" = (summary = "the hold ended before the purchase", value = json!({"error": "hold_expired", "message": "the hold on this coupon ended before the purchase"}))),
                ("not_holder" = (summary = "another user holds it, or nobody", value = json!({"error": "not_holder", "message": "this coupon is not held by this user"}))),
                ("already_redeemed" = (summary = "bought before", value = json!({"error": "already_redeemed", "message": "this coupon was already redeemed"}))),
                ("order_below_minimum" = (summary = "the order total is under the campaign's minimum, or missing", value = json!({"error": "order_below_minimum", "message": "the order total is under this coupon's campaign minimum (send order_total)"}))),
                ("currency_mismatch" = (summary = "the order total is in another currency than the campaign's", value = json!({"error": "currency_mismatch", "message": "the order total is in another currency than this coupon's campaign"}))),
                ("order_total_required" = (summary = "the campaign takes a percent off and no order total was sent", value = json!({"error": "order_total_required", "message": "this coupon takes a percent off: send order_total with the purchase"}))),
                ("order_id_conflict" = (summary = "the order_id is another user's order", value = json!({"error": "order_id_conflict", "message": "this order_id was already used by another user"})))
            )),
        responses::BodyRefused,
        responses::AddressLimited,
        (status = 503, description = "The purchase could not be published, or the gateway is at its limit of requests in flight or waiting; retrying is safe.",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying")),
            body = ErrorBody, example = json!({"error": "unavailable", "message": "could not publish the purchase"})),
        (status = 504, description = "No decision within REPLY_TIMEOUT (publishing included); retrying (same order_id) is safe.",
            body = ErrorBody, example = json!({"error": "timeout", "message": "no decision in time; the request may still complete and retrying is safe"})),
    ),
    security((), ("api_token" = []))
)]
pub(in crate::gateway) async fn purchase(
    State(state): State<Arc<GatewayState>>,
    client: ClientAddr,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Json<PurchaseBody>, JsonRejection>,
) -> Response {
    let request_id = request_id(&headers);
    traced(
        "purchase",
        &request_id,
        purchase_inner(&state, client, caller, body, &request_id),
    )
    .await
}

async fn purchase_inner(
    state: &GatewayState,
    client: ClientAddr,
    caller: Caller,
    body: Result<Json<PurchaseBody>, JsonRejection>,
    request_id: &str,
) -> Result<Response, ApiError> {
    let deadline = tokio::time::Instant::now() + state.config.reply_timeout;
    storefront_caller(state, caller, client)?;
    let Json(body) = body.map_err(json_rejection)?;
    let user = UserId::parse(body.user_id).map_err(|e| ApiError::invalid(e.to_string()))?;
    let order = OrderId::parse(body.order_id).map_err(|e| ApiError::invalid(e.to_string()))?;
    let coupon_code =
        RequestedCode::parse(body.coupon_code).map_err(|e| ApiError::invalid(e.to_string()))?;
    let order_total = body
        .order_total
        .map(|m| Money::parse("order_total", m.amount, &m.currency, false))
        .transpose()
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    tracing::debug!(user = %user, order = %order, coupon = %coupon_code.as_str(), "purchase received");
    let event = PurchaseRequested {
        envelope: Some(state.publisher.envelope::<PurchaseRequested>(request_id)),
        request_id: request_id.to_owned(),
        user_id: user.to_string(),
        coupon_code: coupon_code.into_string(),
        order_id: order.to_string(),
        order_total: order_total.map(Into::into),
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
        "purchase",
    )
    .await?;
    if decision.user_id != user.as_str() {
        // Purchases are idempotent on order_id: the stored answer for this
        // order is another user's and must not be shown to this one.
        return Err(order_id_conflict());
    }
    Ok(purchase_response(&decision))
}

pub(super) fn purchase_response(decision: &PurchaseDecided) -> Response {
    let outcome =
        PurchaseOutcome::try_from(decision.outcome).unwrap_or(PurchaseOutcome::Unspecified);
    let conflict =
        |code, message| ApiError::new(StatusCode::CONFLICT, code, message).into_response();
    match outcome {
        PurchaseOutcome::Redeemed => (
            StatusCode::OK,
            Json(PurchaseRedeemed {
                status: Redeemed::Redeemed,
                coupon_code: decision.coupon_code.clone(),
                order_id: decision.order_id.clone(),
                redeemed_at: rfc3339(decision.redeemed_at_ms),
                discount_amount: decision.discount_amount.as_ref().map(MoneyBody::from),
            }),
        )
            .into_response(),
        PurchaseOutcome::HoldExpired => conflict(
            ErrorCode::HoldExpired,
            "the hold on this coupon ended before the purchase",
        ),
        PurchaseOutcome::NotHolder => {
            conflict(ErrorCode::NotHolder, "this coupon is not held by this user")
        }
        PurchaseOutcome::AlreadyRedeemed => conflict(
            ErrorCode::AlreadyRedeemed,
            "this coupon was already redeemed",
        ),
        PurchaseOutcome::UnknownCoupon => ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::UnknownCoupon,
            "no coupon has this code",
        )
        .into_response(),
        PurchaseOutcome::OrderBelowMinimum => conflict(
            ErrorCode::OrderBelowMinimum,
            "the order total is under this coupon's campaign minimum (send order_total)",
        ),
        PurchaseOutcome::CurrencyMismatch => conflict(
            ErrorCode::CurrencyMismatch,
            "the order total is in another currency than this coupon's campaign",
        ),
        PurchaseOutcome::OrderTotalRequired => conflict(
            ErrorCode::OrderTotalRequired,
            "this coupon takes a percent off: send order_total with the purchase",
        ),
        PurchaseOutcome::Conflict => order_id_conflict().into_response(),
        // The answer to a cancellation (`routes::cancel`), never to a
        // purchase request: a reply is matched by its request id.
        PurchaseOutcome::Cancelled => (
            StatusCode::OK,
            Json(crate::gateway::api::Cancelled {
                status: "cancelled".to_owned(),
            }),
        )
            .into_response(),
        PurchaseOutcome::Invalid | PurchaseOutcome::Unspecified => {
            ApiError::invalid(decision.reason.clone()).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::routes::tests::body_of;

    fn decided(outcome: PurchaseOutcome) -> PurchaseDecided {
        PurchaseDecided {
            outcome: outcome as i32,
            user_id: "u1".into(),
            coupon_code: "0AN35HST00000".into(),
            order_id: "o-1".into(),
            redeemed_at_ms: 1_780_000_000_000,
            reason: "order_id must not be empty".into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_redemption_answers_the_order_and_when() {
        let response = purchase_response(&decided(PurchaseOutcome::Redeemed));
        assert_eq!(response.status(), StatusCode::OK);
        let body = body_of(response).await;
        assert_eq!(body["status"], "redeemed");
        assert_eq!(body["coupon_code"], "0AN35HST00000");
        assert_eq!(body["order_id"], "o-1");
        assert_eq!(body["redeemed_at"], "2026-05-28T20:26:40.000Z");
    }

    #[tokio::test]
    async fn each_refusal_has_its_status_and_code() {
        for (outcome, status, code) in [
            (PurchaseOutcome::HoldExpired, 409, "hold_expired"),
            (PurchaseOutcome::NotHolder, 409, "not_holder"),
            (PurchaseOutcome::AlreadyRedeemed, 409, "already_redeemed"),
            (PurchaseOutcome::UnknownCoupon, 404, "unknown_coupon"),
            (PurchaseOutcome::Conflict, 409, "order_id_conflict"),
            (
                PurchaseOutcome::OrderBelowMinimum,
                409,
                "order_below_minimum",
            ),
            (PurchaseOutcome::CurrencyMismatch, 409, "currency_mismatch"),
            (
                PurchaseOutcome::OrderTotalRequired,
                409,
                "order_total_required",
            ),
            (PurchaseOutcome::Invalid, 400, "invalid_request"),
            (PurchaseOutcome::Unspecified, 400, "invalid_request"),
        ] {
            let response = purchase_response(&decided(outcome));
            assert_eq!(response.status().as_u16(), status, "{outcome:?}");
            let body = body_of(response).await;
            assert_eq!(body["error"], code, "{outcome:?}");
            assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
    }

    #[tokio::test]
    async fn an_invalid_purchase_says_why() {
        let response = purchase_response(&decided(PurchaseOutcome::Invalid));
        assert_eq!(
            body_of(response).await["message"],
            "order_id must not be empty"
        );
    }
}
