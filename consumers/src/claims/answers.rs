//! What the processor publishes besides stored decisions: answers to
//! invalid requests and refusals, and the event of a stored decision.

use coupon_domain::RequestId;
use coupon_platform::kafka::consumer::{stable_time_ms, BatchError};
use coupon_platform::kafka::{decode, Record};
use coupon_platform::time::to_ms;
use coupon_schemas::{ClaimDecided, ClaimOutcome as WireOutcome, ClaimRequested};

use crate::{Context, Decided};

use super::{ClaimDecisionRecord, ROLE};

/// Sets aside a claim request that fails on its own: the requester is
/// answered `invalid` with the reason (so the gateway does not time out),
/// and the record goes to the dead-letter topic.
pub async fn reject(ctx: &Context, record: &Record, reason: &str) -> Result<(), BatchError> {
    if let Ok(request) = decode::<ClaimRequested>(record) {
        let reason = format!("the claim could not be decided: {reason}");
        if let Some(decision) = invalid_decision(ctx, record, &request, &reason) {
            crate::answer_if_possible(ctx, &ctx.topics.claim_results(), decision).await?;
        }
    }
    ctx.dead_letters(ROLE).send(record, reason).await?;
    Ok(())
}

/// The `invalid` answer to a request that has a usable request id (else
/// there is no one to answer), keyed by the user id it gave.
pub(super) fn invalid_decision(
    ctx: &Context,
    record: &Record,
    request: &ClaimRequested,
    reason: &str,
) -> Option<(String, ClaimDecided)> {
    RequestId::parse(request.request_id.as_str()).ok()?;
    let envelope = request.envelope.as_ref();
    Some(refusal_event(
        ctx,
        WireOutcome::Invalid,
        &request.request_id,
        &crate::echoed_id(&request.user_id),
        envelope.map_or("", |e| e.correlation_id.as_str()),
        stable_time_ms(record, envelope.map(|e| e.occurred_at_ms)),
        reason,
    ))
}

/// An answer that decides nothing (`invalid`, or `conflict`: the request
/// id is another user's) to `user_key`'s request `request_id`. Never
/// stored, so its event id comes from the request and the user, and its
/// time from the record: a redelivery publishes the very same event.
pub(super) fn refusal_event(
    ctx: &Context,
    outcome: WireOutcome,
    request_id: &str,
    user_key: &str,
    correlation_id: &str,
    time_ms: i64,
    reason: &str,
) -> (String, ClaimDecided) {
    let envelope = coupon_schemas::new_envelope::<ClaimDecided>(
        uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_OID,
            format!("invalid-claim:{request_id}:{user_key}").as_bytes(),
        )
        .to_string(),
        time_ms,
        ctx.publisher.name(),
        correlation_id,
    );
    (
        user_key.to_owned(),
        ClaimDecided {
            envelope: Some(envelope),
            request_id: request_id.to_owned(),
            user_id: user_key.to_owned(),
            outcome: outcome as i32,
            // The reason may quote the request: bounded like any echo.
            reason: reason.chars().take(1024).collect(),
            ..Default::default()
        },
    )
}

pub(super) fn invalid_logged(request: &ClaimRequested, user_id: &str, reason: &str) -> Decided {
    Decided {
        request_id: crate::log_request_id(
            request
                .envelope
                .as_ref()
                .map_or("", |e| e.correlation_id.as_str()),
            &request.request_id,
        )
        .to_owned(),
        user_id: user_id.to_owned(),
        outcome: "invalid",
        coupon_code: None,
        redelivered: false,
        reason: Some(reason.to_owned()),
    }
}

/// The event for a stored decision; a stored decision always yields the
/// same event id, so consumers can deduplicate republished decisions.
/// `campaign` is the granted coupon's campaign, if its batch has one
/// (read with the decision: a batch's campaign never changes).
pub fn event_of(
    decision: &ClaimDecisionRecord,
    producer: &str,
    correlation_id: &str,
    campaign: Option<&coupon_domain::Campaign>,
) -> ClaimDecided {
    let outcome = WireOutcome::from(decision.outcome);
    ClaimDecided {
        envelope: Some(coupon_schemas::new_envelope::<ClaimDecided>(
            decision.event_id.to_string(),
            to_ms(decision.decided_at),
            producer,
            correlation_id,
        )),
        request_id: decision.request_id.to_string(),
        user_id: decision.user_id.to_string(),
        outcome: outcome as i32,
        coupon_code: decision
            .coupon_code
            .map(|code| code.to_string())
            .unwrap_or_default(),
        category: decision
            .category
            .as_ref()
            .map(|category| category.to_string())
            .unwrap_or_default(),
        expires_at_ms: decision.expires_at.map(to_ms).unwrap_or(0),
        repeated: decision.repeated,
        retry_at_ms: decision.retry_at.map(to_ms).unwrap_or(0),
        blacklisted_until_ms: decision.blacklisted_until.map(to_ms).unwrap_or(0),
        reason: String::new(),
        campaign: campaign
            .filter(|_| decision.outcome == coupon_domain::ClaimOutcomeKind::Granted)
            .map(coupon_schemas::Campaign::from),
    }
}
