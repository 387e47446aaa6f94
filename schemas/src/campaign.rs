//! The wire form of a campaign (`coupons.v1.Campaign`, `Money`) mapped to
//! the domain's once. What comes off the wire is validated again
//! ([`coupon_domain::Campaign::from_stored`]): a foreign producer's event
//! with a percent of 0 or an unknown currency is refused like any bad input.

use chrono::{DateTime, Utc};
use coupon_domain::campaign::{CampaignFields, Discount, InvalidCampaign};
use coupon_domain::{Campaign as DomainCampaign, Money as DomainMoney};

use crate::{Campaign, Money};

impl From<DomainMoney> for Money {
    fn from(money: DomainMoney) -> Self {
        Money {
            amount: money.amount,
            currency: money.currency.as_str().to_owned(),
        }
    }
}

impl Money {
    /// The domain's money (`field` names it in a refusal); a negative
    /// amount or an unknown currency is refused.
    pub fn to_domain(&self, field: &'static str) -> Result<DomainMoney, InvalidCampaign> {
        DomainMoney::parse(field, self.amount, &self.currency, false)
    }
}

fn ms(t: Option<DateTime<Utc>>) -> i64 {
    t.map_or(0, |t| t.timestamp_millis())
}

fn time(field: &'static str, ms: i64) -> Result<Option<DateTime<Utc>>, InvalidCampaign> {
    if ms == 0 {
        return Ok(None);
    }
    DateTime::from_timestamp_millis(ms)
        .map(Some)
        .ok_or_else(|| InvalidCampaign {
            field,
            problem: format!("{ms} ms is no valid time"),
        })
}

impl From<&DomainCampaign> for Campaign {
    fn from(c: &DomainCampaign) -> Self {
        let (percent_off, amount_off) = match c.discount() {
            Some(Discount::PercentOff(p)) => (u32::from(p), None),
            Some(Discount::AmountOff(m)) => (0, Some(m.into())),
            None => (0, None),
        };
        Campaign {
            name: c.name().unwrap_or_default().to_owned(),
            percent_off,
            amount_off,
            min_order: c.min_order().map(Into::into),
            valid_from_ms: ms(c.valid_from()),
            valid_until_ms: ms(c.valid_until()),
            locations: c.locations().to_vec(),
            min_age: c.min_age().unwrap_or(0),
        }
    }
}

impl Campaign {
    /// The domain's campaign, validated as a stored one.
    pub fn to_domain(&self) -> Result<DomainCampaign, InvalidCampaign> {
        let discount = match (self.percent_off, &self.amount_off) {
            (0, None) => None,
            (p, None) => Some(Discount::parse(Some(i64::from(p)), None, None)?),
            (0, Some(m)) => Some(Discount::AmountOff(m.to_domain("discount.amount_off")?)),
            (_, Some(_)) => {
                return Err(InvalidCampaign {
                    field: "discount",
                    problem: "both percent_off and amount_off are set".into(),
                })
            }
        };
        DomainCampaign::from_stored(CampaignFields {
            name: Some(self.name.clone()).filter(|n| !n.is_empty()),
            discount,
            min_order: self
                .min_order
                .as_ref()
                .map(|m| m.to_domain("min_order"))
                .transpose()?,
            valid_from: time("valid_from", self.valid_from_ms)?,
            valid_until: time("valid_until", self.valid_until_ms)?,
            locations: self.locations.clone(),
            min_age: Some(i64::from(self.min_age)).filter(|&a| a != 0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_campaign_round_trips_through_the_wire() {
        let now: DateTime<Utc> = "2026-12-05T12:00:00Z".parse().unwrap();
        let eur = |a| DomainMoney::parse("m", a, "EUR", true).unwrap();
        for discount in [
            None,
            Some(Discount::PercentOff(20)),
            Some(Discount::AmountOff(eur(500))),
        ] {
            let campaign = DomainCampaign::parse(
                CampaignFields {
                    name: Some("Winter".into()),
                    discount,
                    min_order: Some(eur(2000)),
                    valid_from: Some(now),
                    valid_until: Some(now + chrono::Duration::days(7)),
                    locations: vec!["DE".into(), "AT".into()],
                    min_age: Some(18),
                },
                now,
            )
            .unwrap()
            .unwrap();
            assert_eq!(Campaign::from(&campaign).to_domain(), Ok(campaign));
        }
        let bad = Campaign {
            percent_off: 101,
            ..Campaign::default()
        };
        assert!(bad.to_domain().is_err());
    }
}
