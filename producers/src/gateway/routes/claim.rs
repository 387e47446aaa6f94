//! `GET /api/v1/coupon`: a claim. Flood control ([`super::flood`]), the
//! sold-out fast path, then request/reply over Kafka to the claim processor.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;

use coupon_domain::sold_out::FastPath;
use coupon_domain::{Category, UserId};
use coupon_schemas::{ClaimDecided, ClaimOutcome, ClaimRequested};

use crate::gateway::api::{ClaimGranted, ClaimQuery, DiscountBody, MoneyBody};
use crate::gateway::auth::{Caller, ClientAddr};
use crate::gateway::flood::flood_check;
use crate::gateway::responses;
use crate::gateway::GatewayState;
use crate::gateway::{
    client_request_id, publish_and_wait, request_id_conflict, rfc3339, storefront_caller, traced,
    waiting_full,
};
use crate::gateway::{ApiError, ErrorBody, ErrorCode};

/// Claim a coupon.
///
/// Publishes a claim event and waits for its decision. A repeated claim while
/// the user's hold lasts returns the same coupon; after the hold ended
/// (bought or expired) the user waits for the next quota window.
#[utoipa::path(
    get,
    path = "/api/v1/coupon",
    tag = "storefront",
    params(
        ClaimQuery,
        ("x-request-id" = Option<String>, Header,
            description = "Your id for this request (1-64 visible ASCII characters); generated when absent. Echoed in the answer's x-request-id header; retrying with the same id returns the same decision.")
    ),
    responses(
        (status = 200, description = "Granted: the coupon is held for this user until `expires_at`.",
            body = ClaimGranted,
            headers(("x-request-id" = String, description = "The request id"))),
        (status = 400, description = "Invalid user id or category.",
            body = ErrorBody, example = json!({"error": "invalid_request", "message": "user_id must not be empty"})),
        responses::ApiUnauthorized,
        (status = 403, description = "The user is blacklisted (manually, or for flooding the gateway).",
            body = ErrorBody, example = json!({"error": "blacklisted", "message": "this user may not claim coupons"})),
        (status = 404, description = "No coupon (of the category) is available to this user: none left, or only coupons of campaigns whose eligibility (locations, minimum age) the user's profile does not meet.",
            body = ErrorBody, example = json!({"error": "sold_out", "message": "no coupon is available right now"})),
        (status = 409, description = "The x-request-id was already used for another user's claim: nothing was decided for this one; send a new request id.",
            body = ErrorBody, example = json!({"error": "request_id_conflict", "message": "this x-request-id was already used for another user; send a new one"})),
        (status = 429, description = "`rate_limited`: the user already had a coupon in this quota window (`Retry-After`: seconds until the next window). `address_limited`: on a gateway without COUPON_API_TOKEN, too many requests from one non-loopback client address.",
            headers(("Retry-After" = u64, description = "Seconds until the next quota window, or until the address may send again")),
            body = ErrorBody,
            examples(
                ("rate_limited" = (summary = "the quota: one coupon per user per window", value = json!({"error": "rate_limited", "message": "one coupon per user per quota window; try again after 2026-11-26T00:00:00.000Z"}))),
                ("address_limited" = (summary = "too many requests from this address", value = json!({"error": "address_limited", "message": "too many requests from this address; slow down"})))
            )),
        (status = 503, description = "The claim could not be published, or the gateway is at its limit of requests in flight or waiting; retrying is safe.",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying")),
            body = ErrorBody, example = json!({"error": "unavailable", "message": "could not publish the claim"})),
        (status = 504, description = "No decision within REPLY_TIMEOUT (publishing included); the claim may still complete and retrying (same x-request-id) is safe.",
            body = ErrorBody, example = json!({"error": "timeout", "message": "no decision in time; the request may still complete and retrying is safe"})),
    ),
    security((), ("api_token" = []))
)]
pub(in crate::gateway) async fn claim(
    State(state): State<Arc<GatewayState>>,
    client: ClientAddr,
    caller: Caller,
    headers: HeaderMap,
    query: Result<Query<ClaimQuery>, QueryRejection>,
) -> Response {
    let chosen = client_request_id(&headers);
    let ours = chosen.is_none();
    let request_id = chosen.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    traced(
        "claim",
        &request_id,
        claim_inner(&state, client, caller, query, &request_id, ours),
    )
    .await
}

async fn claim_inner(
    state: &GatewayState,
    client: ClientAddr,
    caller: Caller,
    query: Result<Query<ClaimQuery>, QueryRejection>,
    request_id: &str,
    id_is_ours: bool,
) -> Result<Response, ApiError> {
    let deadline = tokio::time::Instant::now() + state.config.reply_timeout;
    let caller = storefront_caller(state, caller, client)?;
    let Query(query) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let user = UserId::parse(query.id.unwrap_or_default())
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    let category = match query.category.as_deref() {
        None | Some("") => None,
        Some(raw) => Some(Category::parse(raw).map_err(|e| ApiError::invalid(e.to_string()))?),
    };
    tracing::debug!(user = %user, category = category.as_ref().map_or("", |c| c.as_str()), "claim received");
    // Only an authenticated storefront vouches for the user ids it sends:
    // without a token, anyone could name a victim's id and get the victim
    // blocked, so open callers are not counted. One request id, one answer
    // on every path: an id the client chose may be in flight on the broker
    // path already (a retry, a second tab, a copy with another category or
    // user), so only an id generated here, which no other request can
    // carry, is answered from the cache.
    let vouched = caller != Caller::Open;
    let may_answer_sold_out = id_is_ours && !state.maybe_blacklisted(user.as_str());
    let facts = if vouched || may_answer_sold_out {
        read_facts(state, &user, category.as_ref(), vouched).await
    } else {
        None
    };
    if vouched {
        flood_check(state, &user, facts.as_ref()).await?;
    }
    let fast = match &facts {
        Some(facts) if may_answer_sold_out => coupon_domain::sold_out::fast_path(&facts.fast_path),
        _ => FastPath::Ask,
    };
    let event = ClaimRequested {
        envelope: Some(state.publisher.envelope::<ClaimRequested>(request_id)),
        request_id: request_id.to_owned(),
        user_id: user.to_string(),
        category: category.map(Category::into_string).unwrap_or_default(),
        answered_sold_out: fast == FastPath::SoldOut,
    };
    if fast == FastPath::SoldOut {
        return answer_sold_out(state, &user, &event, deadline).await;
    }
    let pending = state
        .replies
        .expect_claim(request_id, user.as_str())
        .map_err(waiting_full)?;
    let decision = publish_and_wait(
        state,
        &state.topics.claims(),
        &user,
        &event,
        pending,
        deadline,
        "claim",
    )
    .await?;
    if decision.user_id != user.as_str() {
        // The client's request id was used before, by another user: the
        // stored decision is that user's and must not be shown to this one.
        return Err(request_id_conflict());
    }
    Ok(claim_response(&decision))
}

/// The flood count (when `count_claim`) and the fast path's facts in one
/// Redis round trip; `None` when Redis did not answer (no flood check, no
/// sold-out answer from the cache: the claim takes the normal path).
async fn read_facts(
    state: &GatewayState,
    user: &UserId,
    category: Option<&Category>,
    count_claim: bool,
) -> Option<coupon_platform::redis::ClaimFacts> {
    match state.cache.claim_facts(user, category, count_claim).await {
        Ok(facts) => Some(facts),
        Err(error) => {
            tracing::debug!(%error, "Redis unreadable; no flood check, no sold-out fast path");
            None
        }
    }
}

/// The sold-out fast path: the claim goes on the log flagged
/// `answered_sold_out` (the claim processor records `sold_out` for it and
/// never allocates it a coupon) and is answered `404` once the broker has
/// the record, without waiting for the decision. Every answer is on the
/// log: a broker outage or a `kill -9` of the gateway can cost the answer
/// (`503`/`504`, and retrying is safe), never leave an answered claim
/// without its record. The wait is one produce round trip, not the
/// processor's batch.
async fn answer_sold_out(
    state: &GatewayState,
    user: &UserId,
    event: &ClaimRequested,
    deadline: tokio::time::Instant,
) -> Result<Response, ApiError> {
    let topic = state.topics.claims();
    let delivery = state
        .publisher
        .enqueue_event(&topic, user.as_str(), event)
        .await
        .map_err(|error| {
            tracing::warn!(%error, "could not publish the sold-out claim");
            ApiError::unavailable("could not publish the claim; retrying is safe")
        })?;
    match tokio::time::timeout_at(deadline, delivery).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => {
            metrics::counter!("coupon_claims_sold_out_fast_lost_total").increment(1);
            tracing::warn!(%error, "a sold-out claim was not delivered to the log; not answered");
            return Err(ApiError::unavailable(
                "could not publish the claim; retrying is safe",
            ));
        }
        Err(_) => {
            tracing::warn!("the broker did not acknowledge the sold-out claim in time");
            return Err(ApiError::timeout());
        }
    }
    metrics::counter!("coupon_claims_sold_out_fast_total").increment(1);
    Ok(ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::SoldOut,
        "no coupon is available right now",
    )
    .into_response())
}

fn claim_response(decision: &ClaimDecided) -> Response {
    let outcome = ClaimOutcome::try_from(decision.outcome).unwrap_or(ClaimOutcome::Unspecified);
    match outcome {
        ClaimOutcome::Granted => (
            StatusCode::OK,
            Json(ClaimGranted {
                coupon_code: decision.coupon_code.clone(),
                category: decision.category.clone(),
                user_id: decision.user_id.clone(),
                expires_at: rfc3339(decision.expires_at_ms),
                campaign: decision
                    .campaign
                    .as_ref()
                    .map(|c| c.name.clone())
                    .filter(|name| !name.is_empty()),
                discount: decision.campaign.as_ref().and_then(DiscountBody::of),
                min_order: decision
                    .campaign
                    .as_ref()
                    .and_then(|c| c.min_order.as_ref())
                    .map(MoneyBody::from),
                valid_until: decision
                    .campaign
                    .as_ref()
                    .and_then(|c| rfc3339(c.valid_until_ms)),
            }),
        )
            .into_response(),
        ClaimOutcome::RateLimited => {
            let now = Utc::now().timestamp_millis();
            let secs = ((decision.retry_at_ms - now).max(1) as u64).div_ceil(1000);
            let mut error = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::RateLimited,
                format!(
                    "one coupon per user per quota window; try again after {}",
                    rfc3339(decision.retry_at_ms).unwrap_or_default()
                ),
            );
            error.retry_after_secs = Some(secs);
            error.into_response()
        }
        ClaimOutcome::Blacklisted => ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Blacklisted,
            "this user may not claim coupons",
        )
        .into_response(),
        ClaimOutcome::SoldOut => ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::SoldOut,
            "no coupon is available right now",
        )
        .into_response(),
        ClaimOutcome::Conflict => request_id_conflict().into_response(),
        ClaimOutcome::Invalid | ClaimOutcome::Unspecified => {
            ApiError::invalid(decision.reason.clone()).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::routes::tests::body_of;

    fn decided(outcome: ClaimOutcome) -> ClaimDecided {
        ClaimDecided {
            outcome: outcome as i32,
            user_id: "u1".into(),
            coupon_code: "0AN35HST00000".into(),
            category: "Electronics".into(),
            expires_at_ms: 1_780_000_000_000,
            reason: "user_id must not be empty".into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_grant_answers_the_coupon_and_its_deadline() {
        let response = claim_response(&decided(ClaimOutcome::Granted));
        assert_eq!(response.status(), StatusCode::OK);
        let body = body_of(response).await;
        assert_eq!(body["coupon_code"], "0AN35HST00000");
        assert_eq!(body["category"], "Electronics");
        assert_eq!(body["user_id"], "u1");
        assert_eq!(body["expires_at"], "2026-05-28T20:26:40.000Z");
    }

    #[tokio::test]
    async fn the_quota_answers_429_with_the_seconds_to_the_next_window() {
        let mut decision = decided(ClaimOutcome::RateLimited);
        decision.retry_at_ms = Utc::now().timestamp_millis() + 90_500;
        let response = claim_response(&decision);
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        let retry: u64 = response.headers()["retry-after"]
            .to_str()
            .expect("ascii")
            .parse()
            .expect("seconds");
        assert!((90..=91).contains(&retry), "Retry-After {retry}");
        assert_eq!(body_of(response).await["error"], "rate_limited");
    }

    #[tokio::test]
    async fn a_window_already_over_still_says_wait_one_second() {
        let mut decision = decided(ClaimOutcome::RateLimited);
        decision.retry_at_ms = Utc::now().timestamp_millis() - 5_000;
        let response = claim_response(&decision);
        assert_eq!(response.headers()["retry-after"], "1");
    }

    #[tokio::test]
    async fn each_refusal_has_its_status_and_code() {
        for (outcome, status, code) in [
            (ClaimOutcome::Blacklisted, 403, "blacklisted"),
            (ClaimOutcome::SoldOut, 404, "sold_out"),
            (ClaimOutcome::Conflict, 409, "request_id_conflict"),
            (ClaimOutcome::Invalid, 400, "invalid_request"),
            (ClaimOutcome::Unspecified, 400, "invalid_request"),
        ] {
            let response = claim_response(&decided(outcome));
            assert_eq!(response.status().as_u16(), status, "{outcome:?}");
            let body = body_of(response).await;
            assert_eq!(body["error"], code, "{outcome:?}");
            assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
    }

    #[tokio::test]
    async fn an_outcome_this_gateway_does_not_know_is_a_400_not_a_grant() {
        let mut decision = decided(ClaimOutcome::Granted);
        decision.outcome = 99;
        let response = claim_response(&decision);
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    }
}
