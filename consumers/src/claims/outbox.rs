//! What a claim batch publishes, logs and sets aside once it is decided:
//! gathered while the batch is decided, sent only after its commit, so a
//! batch that is rolled back and retried publishes and logs nothing twice.

use coupon_platform::kafka::Record;
use coupon_schemas::{ClaimDecided, ClaimOutcome as WireOutcome};

use crate::{Context, Decided};

use super::answers::{event_of, refusal_event};
use super::{Claim, ClaimDecisionRecord};

/// What a batch publishes, logs and sets aside once it is decided.
pub(super) struct Outbox<'a> {
    pub(super) decisions: Vec<(String, ClaimDecided)>,
    /// Logged once the decisions are published, so a retried batch does not
    /// log decisions that were rolled back.
    pub(super) decided: Vec<Decided>,
    pub(super) refused: Vec<(&'a Record, String)>,
}

impl<'a> Outbox<'a> {
    pub(super) fn with_capacity(n: usize) -> Self {
        Self {
            decisions: Vec::with_capacity(n),
            decided: Vec::with_capacity(n),
            refused: Vec::new(),
        }
    }

    /// A claim's decision, new or stored.
    pub(super) fn decision(
        &mut self,
        ctx: &Context,
        claim: &Claim,
        decision: &ClaimDecisionRecord,
        is_new: bool,
        campaign: Option<&coupon_domain::Campaign>,
    ) {
        self.decided.push(Decided {
            request_id: crate::log_request_id(&claim.correlation_id, claim.request_id.as_str())
                .to_owned(),
            user_id: decision.user_id.to_string(),
            outcome: decision.outcome.as_str(),
            coupon_code: decision.coupon_code.map(|code| code.to_string()),
            redelivered: !is_new,
            reason: None,
        });
        self.decisions.push((
            decision.user_id.to_string(),
            event_of(
                decision,
                ctx.publisher.name(),
                &claim.correlation_id,
                campaign,
            ),
        ));
    }

    /// A claim under another user's request id: answered `conflict` to its
    /// own user, nothing stored.
    pub(super) fn conflict(&mut self, ctx: &Context, claim: &Claim) {
        let reason = format!(
            "request id {} was already used by another user; send a new one",
            claim.request_id
        );
        let answer = refusal_event(
            ctx,
            WireOutcome::Conflict,
            claim.request_id.as_str(),
            claim.user_id.as_str(),
            &claim.correlation_id,
            claim.received_ms,
            &reason,
        );
        self.decided.push(Decided {
            request_id: crate::log_request_id(&claim.correlation_id, claim.request_id.as_str())
                .to_owned(),
            user_id: claim.user_id.as_str().to_owned(),
            outcome: WireOutcome::Conflict.name(),
            coupon_code: None,
            redelivered: false,
            reason: Some(reason),
        });
        self.decisions.push(answer);
    }
}
