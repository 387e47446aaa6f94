//! The answer to a refused purchase or cancellation, built one way for both.

use uuid::Uuid;

use coupon_domain::RequestId;
use coupon_platform::kafka::consumer::stable_time_ms;
use coupon_platform::kafka::Record;
use coupon_schemas::{PurchaseDecided, PurchaseOutcome as WireOutcome};

use crate::Context;

/// What a refused request (a purchase or a cancellation) is answered by:
/// its ids echoed, an event id derived from its request id in `id_space`
/// (so a redelivery publishes the very same event and the history sink
/// adds no second row), its record's time.
pub(super) struct Refused<'a> {
    pub(super) id_space: &'static str,
    pub(super) request_id: &'a str,
    pub(super) user_id: &'a str,
    pub(super) order_id: &'a str,
    pub(super) envelope: Option<&'a coupon_schemas::Envelope>,
}

impl Refused<'_> {
    /// The answer, addressed to the requester; `None` without a usable
    /// request id (there is no one to answer).
    pub(super) fn answer(
        &self,
        ctx: &Context,
        record: &Record,
        outcome: WireOutcome,
        reason: &str,
    ) -> Option<(String, PurchaseDecided)> {
        RequestId::parse(self.request_id).ok()?;
        let key = crate::echoed_id(self.user_id);
        let event = coupon_schemas::new_envelope::<PurchaseDecided>(
            Uuid::new_v5(
                &Uuid::NAMESPACE_OID,
                format!("{}:{}:{key}", self.id_space, self.request_id).as_bytes(),
            )
            .to_string(),
            stable_time_ms(record, self.envelope.map(|e| e.occurred_at_ms)),
            ctx.publisher.name(),
            self.envelope.map_or("", |e| e.correlation_id.as_str()),
        );
        Some((
            key.clone(),
            PurchaseDecided {
                envelope: Some(event),
                request_id: self.request_id.to_owned(),
                user_id: key,
                // The gateway hands an answer to the waiter of this order
                // only, so a refusal names it too.
                order_id: crate::echoed_id(self.order_id),
                outcome: outcome as i32,
                // The reason may quote the request: bounded like any echo.
                reason: reason.chars().take(1024).collect(),
                ..Default::default()
            },
        ))
    }
}
