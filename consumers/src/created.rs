//! What a `coupons.created` event creates: the rule every reader of that
//! topic applies (the coupon projector, the history sink, the audit), so a
//! chunk one of them refuses is refused by all, for the same reason.

use uuid::Uuid;

use coupon_domain::{Campaign, Category, CouponCode, EmployeeId, SnowflakeId};
use coupon_platform::store::coupons::NewCoupon;
use coupon_schemas::CouponsCreated;

/// How far a coupon id's Snowflake time may lie after the time its batch
/// chunk says it was published (clock skew between the generator and the
/// publisher), and how long before it.
const ID_AFTER_EVENT_MS: i64 = 60_000;
const ID_BEFORE_EVENT_MS: i64 = 86_400_000;

/// Validates a decoded event and expands it into coupons. A coupon id's
/// Snowflake time must lie within a day before the chunk's own time and a
/// minute after it: ids are generated just before their batch is published,
/// so an id minted in the future, or long ago, was not made by the release
/// tool (and a future one would sort after every real coupon).
///
/// The chunk's campaign, if it carries one, must be valid too
/// ([`campaign_of`]): a chunk with a percent of 0 is refused whole.
pub fn coupons_of(event: &CouponsCreated) -> Result<Vec<NewCoupon>, String> {
    campaign_of(event)?;
    let batch_id = Uuid::parse_str(&event.batch_id).map_err(|e| format!("batch_id: {e}"))?;
    let employee_id = EmployeeId::parse(event.employee_id.clone()).map_err(|e| e.to_string())?;
    let category = Category::parse(event.category.clone()).map_err(|e| e.to_string())?;
    if event.coupon_ids.is_empty() {
        return Err("coupon_ids is empty".into());
    }
    event
        .coupon_ids
        .iter()
        .map(|raw| {
            let id = u64::try_from(*raw)
                .map_err(|_| format!("coupon id {raw} is negative"))
                .and_then(|raw| SnowflakeId::from_raw(raw).map_err(|e| e.to_string()))?;
            let id_ms = id.parts().unix_ms as i64;
            if let Some(published_ms) = event.envelope.as_ref().map(|e| e.occurred_at_ms) {
                if id_ms > published_ms + ID_AFTER_EVENT_MS
                    || id_ms < published_ms - ID_BEFORE_EVENT_MS
                {
                    return Err(format!(
                        "coupon id {raw} was generated at {id_ms} ms, out of range for a chunk \
                         published at {published_ms} ms"
                    ));
                }
            }
            let generated_at = coupon_platform::time::from_ms(id_ms)
                .ok_or_else(|| format!("coupon id {raw} has no valid time"))?;
            Ok(NewCoupon {
                code: CouponCode::from_id(id),
                batch_id,
                employee_id: employee_id.clone(),
                category: category.clone(),
                generated_at,
            })
        })
        .collect()
}

/// The batch's campaign as the chunk carries it (`None`: the batch has
/// none), validated as a stored campaign
/// (`coupon_domain::Campaign::from_stored`).
pub fn campaign_of(event: &CouponsCreated) -> Result<Option<Campaign>, String> {
    event
        .campaign
        .as_ref()
        .map(|c| c.to_domain().map_err(|e| format!("campaign: {e}")))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use coupon_domain::snowflake::SnowflakeParts;

    fn chunk(published_ms: i64, ids_ms: &[u64]) -> CouponsCreated {
        CouponsCreated {
            envelope: Some(coupon_schemas::new_envelope::<CouponsCreated>(
                "e".into(),
                published_ms,
                "test",
                "",
            )),
            batch_id: Uuid::nil().to_string(),
            employee_id: "e-1".into(),
            category: "C".into(),
            coupon_ids: ids_ms
                .iter()
                .enumerate()
                .map(|(i, ms)| {
                    SnowflakeId::compose(SnowflakeParts {
                        unix_ms: *ms,
                        datacenter: 0,
                        machine: 1,
                        sequence: i as u16,
                    })
                    .unwrap()
                    .raw() as i64
                })
                .collect(),
            chunk_index: 0,
            chunk_count: 1,
            campaign: None,
        }
    }

    #[test]
    fn ids_minted_in_the_future_or_long_ago_are_refused() {
        let now = 1_795_564_800_000_u64;
        let at = now as i64;
        assert!(coupons_of(&chunk(at, &[now - 1_000, now, now + 59_000])).is_ok());
        let future = coupons_of(&chunk(at, &[now, now + 3_600_000])).unwrap_err();
        assert!(future.contains("out of range"), "{future}");
        let old = coupons_of(&chunk(at, &[now - 2 * 86_400_000])).unwrap_err();
        assert!(old.contains("out of range"), "{old}");
    }

    #[test]
    fn a_chunk_with_an_invalid_campaign_is_refused_whole() {
        let now = 1_795_564_800_000_u64;
        let mut event = chunk(now as i64, &[now]);
        event.campaign = Some(coupon_schemas::Campaign {
            percent_off: 150,
            ..Default::default()
        });
        let refused = coupons_of(&event).unwrap_err();
        assert!(refused.contains("percent_off"), "{refused}");
        event.campaign = Some(coupon_schemas::Campaign {
            percent_off: 15,
            ..Default::default()
        });
        assert!(coupons_of(&event).is_ok());
        assert!(campaign_of(&event).unwrap().is_some());
    }
}
