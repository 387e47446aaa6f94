//! How holds, orders and campaigns end in the projection: purchases and
//! their cancellations, expired holds and the expiries of ended campaigns.
//! A part of `Projection`'s rules, apart from grants and creation (in the
//! parent) only to keep each file readable.

use super::*;

impl Projection {
    /// A purchase's decision; a fresh redemption redeems the buyer's hold.
    pub(super) fn apply_purchase_decision(&mut self, log: &LogRecord, event: &PurchaseDecided) {
        let record = &log.record;
        self.record_purchase_decision(record, event, log.occurred_at_ms);
        if PurchaseOutcome::try_from(event.outcome) == Ok(PurchaseOutcome::Cancelled) {
            if !event.repeated {
                self.apply_cancel(record, event);
            }
            return;
        }
        let redeemed = PurchaseOutcome::try_from(event.outcome) == Ok(PurchaseOutcome::Redeemed);
        if !redeemed || event.repeated {
            return;
        }
        let at = from_ms(event.redeemed_at_ms).or_else(|| from_ms(log.occurred_at_ms));
        let Some(at) = at else {
            return self.anomaly(record, "redemption without a valid time".into());
        };
        match self.coupons.get_mut(&event.coupon_code) {
            None => self.anomaly(
                record,
                format!("redemption of unknown coupon {}", event.coupon_code),
            ),
            Some(state) => {
                let fits = state.status.may_become(CouponStatus::Redeemed)
                    && state.holder_user_id.as_deref() == Some(&event.user_id);
                state.status = CouponStatus::Redeemed;
                state.redeemed_at = Some(at);
                state.redeemed_order_id = Some(event.order_id.clone());
                if !fits {
                    state.holder_user_id = Some(event.user_id.clone());
                    self.anomaly(
                        record,
                        format!(
                            "redemption of {} by {}, who did not hold it",
                            event.coupon_code, event.user_id
                        ),
                    );
                }
            }
        }
        self.touch(&event.coupon_code);
    }

    /// A cancelled order's coupon leaves `redeemed` for the status the
    /// processor decided (`available`, or `expired` after its campaign's
    /// end), if that order still redeems it.
    pub(super) fn apply_cancel(&mut self, record: &Record, event: &PurchaseDecided) {
        let to = match event.coupon_status.parse::<CouponStatus>() {
            Ok(to @ (CouponStatus::Available | CouponStatus::Expired)) => to,
            _ => return self.anomaly(record, format!("cancellation to {:?}", event.coupon_status)),
        };
        match self.coupons.get_mut(&event.coupon_code) {
            Some(state)
                if state.status == CouponStatus::Redeemed
                    && state.redeemed_order_id.as_deref() == Some(event.order_id.as_str()) =>
            {
                state.status = to;
                state.holder_user_id = None;
                state.hold_id = None;
                state.held_until = None;
                state.redeemed_at = None;
                state.redeemed_order_id = None;
                let envelope = event.envelope.as_ref();
                let cancel = (
                    coupon_domain::OrderId::parse(event.order_id.as_str()).ok(),
                    RequestId::parse(event.request_id.as_str()).ok(),
                    envelope.and_then(|e| Uuid::parse_str(&e.event_id).ok()),
                    envelope.and_then(|e| from_ms(e.occurred_at_ms)),
                );
                if let (Some(order), Some(request_id), Some(event_id), Some(at)) = cancel {
                    self.cancels.push((
                        order,
                        CancelRecord {
                            cancelled_at: at,
                            request_id,
                            event_id,
                            coupon_status: to,
                        },
                    ));
                }
            }
            _ => self.anomaly(
                record,
                format!(
                    "cancellation of order {}, which does not redeem {}",
                    event.order_id, event.coupon_code
                ),
            ),
        }
        self.touch(&event.coupon_code);
    }

    /// An available coupon of an ended campaign leaves the pool for good, if
    /// it is still available (a claim judged before the end may have taken
    /// it: that hold keeps its deadline).
    pub(super) fn apply_campaign_expiry(
        &mut self,
        log: &LogRecord,
        event: &CouponExpired,
        rows: &mut Vec<HistoryRow>,
    ) {
        let ended_at =
            from_ms(event.campaign_ended_at_ms).filter(|_| event.campaign_ended_at_ms > 0);
        if let (Ok(batch), Some(at)) = (Uuid::parse_str(&event.batch_id), ended_at) {
            let until = self
                .campaigns
                .iter()
                .find(|(id, _)| *id == batch)
                .and_then(|(_, c)| c.valid_until());
            if until.is_none_or(|until| at < until) {
                self.ended_early.entry(batch).or_insert((at, None));
            }
        }
        if let Some(state) = self.coupons.get_mut(&event.coupon_code) {
            if state.status == CouponStatus::Available {
                state.status = CouponStatus::Expired;
                let event_id = event
                    .envelope
                    .as_ref()
                    .and_then(|e| Uuid::parse_str(&e.event_id).ok());
                if let (Some(event_id), Some(at)) = (event_id, from_ms(log.occurred_at_ms)) {
                    rows.push(HistoryRow::campaign_expired(
                        at,
                        event_id,
                        event.coupon_code.clone(),
                        &event.batch_id,
                        from_ms(event.campaign_ended_at_ms)
                            .filter(|_| event.campaign_ended_at_ms > 0),
                    ));
                }
            }
        }
        self.touch(&event.coupon_code);
    }

    /// An expired hold returns its coupon to the pool, if the coupon is still
    /// held under that hold; to `expired` when its campaign had ended by the
    /// hold's deadline (the event carries that end, as the expiry decided).
    pub(super) fn apply_expiry(
        &mut self,
        log: &LogRecord,
        event: &HoldExpired,
        rows: &mut Vec<HistoryRow>,
    ) {
        let campaign_ended_at =
            from_ms(event.campaign_ended_at_ms).filter(|_| event.campaign_ended_at_ms > 0);
        if let Some(state) = self.coupons.get_mut(&event.coupon_code) {
            if state.status == CouponStatus::Held
                && state.hold_id.as_deref() == Some(event.hold_id.as_str())
            {
                let user = state.holder_user_id.take();
                let held_until = state.held_until.take();
                state.status = if campaign_ended_at.is_some() {
                    CouponStatus::Expired
                } else {
                    CouponStatus::Available
                };
                state.hold_id = None;
                let event_id = event
                    .envelope
                    .as_ref()
                    .and_then(|e| Uuid::parse_str(&e.event_id).ok());
                if let (Some(event_id), Some(at)) = (event_id, from_ms(log.occurred_at_ms)) {
                    rows.push(HistoryRow::released(
                        at,
                        event_id,
                        HoldRelease {
                            code: event.coupon_code.clone(),
                            user,
                            hold_id: &event.hold_id,
                            held_until,
                            by: ReleasedBy::Expiry,
                            campaign_ended_at,
                        },
                    ));
                }
            }
        }
        self.touch(&event.coupon_code);
    }

    /// Stores the decision as the purchase processor did (one per order).
    pub(super) fn record_purchase_decision(
        &mut self,
        record: &Record,
        event: &PurchaseDecided,
        at_ms: i64,
    ) {
        let Some(at) = from_ms(at_ms) else {
            self.anomaly(record, "purchase decision without a valid time".into());
            return;
        };
        match purchase_decision_row(event, at) {
            Ok(None) => {}
            Ok(Some(row)) => {
                if self.purchase_decisions.contains_key(row.order_id.as_str()) {
                    let what = format!(
                        "a second decision for order {}; the first stands",
                        row.order_id
                    );
                    self.anomaly(record, what);
                } else {
                    self.purchase_decisions
                        .insert(row.order_id.to_string(), row);
                }
            }
            Err(reason) => self.anomaly(record, format!("purchase decision not stored: {reason}")),
        }
    }
}
