//! A campaign: what a batch of coupons is worth, when it may be claimed and
//! who may have it (issue #28). Every field is optional; a batch with none
//! of them has no campaign.
//!
//! [`Campaign::parse`] is the one place a campaign is validated, whatever
//! carried it (the HTTP release, `couponctl issue`, a `coupons.created`
//! event): a percent off is 1 to 100, amounts are positive minor units of
//! an active ISO 4217 currency ([`Currency`]), the window's end lies after
//! its start (and is not over yet when released), the minimum age is sane.
//! Times are kept to the millisecond, as the events carry them, so a
//! campaign reads back from Postgres exactly as it was released.
//!
//! The rules that read a campaign are here too: [`Campaign::is_open_at`]
//! (a coupon is claimable only inside the window) and [`purchase_terms`]
//! (the minimum order, the currency and the discount of a purchase).
//! Who may claim (the locations and the minimum age, against the user's
//! profile) is [`Campaign::eligibility`], judged by `crate::profile`.

use std::fmt;

use chrono::{DateTime, Utc};

/// The active ISO 4217 currency codes a price may be given in (funds,
/// precious metals, test and "no currency" codes left out).
pub const ISO_4217: &[&str] = &[
    "AED", "AFN", "ALL", "AMD", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT", "BGN",
    "BHD", "BIF", "BMD", "BND", "BOB", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD", "CAD", "CDF",
    "CHF", "CLP", "CNY", "COP", "CRC", "CUP", "CVE", "CZK", "DJF", "DKK", "DOP", "DZD", "EGP",
    "ERN", "ETB", "EUR", "FJD", "FKP", "GBP", "GEL", "GHS", "GIP", "GMD", "GNF", "GTQ", "GYD",
    "HKD", "HNL", "HTG", "HUF", "IDR", "ILS", "INR", "IQD", "IRR", "ISK", "JMD", "JOD", "JPY",
    "KES", "KGS", "KHR", "KMF", "KPW", "KRW", "KWD", "KYD", "KZT", "LAK", "LBP", "LKR", "LRD",
    "LSL", "LYD", "MAD", "MDL", "MGA", "MKD", "MMK", "MNT", "MOP", "MRU", "MUR", "MVR", "MWK",
    "MXN", "MYR", "MZN", "NAD", "NGN", "NIO", "NOK", "NPR", "NZD", "OMR", "PAB", "PEN", "PGK",
    "PHP", "PKR", "PLN", "PYG", "QAR", "RON", "RSD", "RUB", "RWF", "SAR", "SBD", "SCR", "SDG",
    "SEK", "SGD", "SHP", "SLE", "SOS", "SRD", "SSP", "STN", "SVC", "SYP", "SZL", "THB", "TJS",
    "TMT", "TND", "TOP", "TRY", "TTD", "TWD", "TZS", "UAH", "UGX", "USD", "UYU", "UZS", "VES",
    "VND", "VUV", "WST", "XAF", "XCD", "XCG", "XOF", "XPF", "YER", "ZAR", "ZMW", "ZWG",
];

/// The most characters a campaign name, or one location, may have.
pub const MAX_NAME_CHARS: usize = 128;
pub const MAX_LOCATION_CHARS: usize = 64;
/// The most locations a campaign may list.
pub const MAX_LOCATIONS: usize = 32;
/// The highest minimum age.
pub const MAX_MIN_AGE: u32 = 120;
/// The largest amount, in minor units (10^12: ten billion of a currency
/// with cents).
pub const MAX_AMOUNT: i64 = 1_000_000_000_000;

/// Why a campaign was refused: the field (its name in the API) and what is
/// wrong with it. The message is safe to show to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct InvalidCampaign {
    pub field: &'static str,
    pub problem: String,
}

fn refuse<T>(field: &'static str, problem: impl Into<String>) -> Result<T, InvalidCampaign> {
    Err(InvalidCampaign {
        field,
        problem: problem.into(),
    })
}

/// An active ISO 4217 currency code (three capital letters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Currency([u8; 3]);

impl Currency {
    /// `raw` if it is an active ISO 4217 code (capital letters, as the
    /// standard writes them).
    pub fn parse(raw: &str) -> Option<Self> {
        ISO_4217
            .binary_search(&raw)
            .ok()
            .map(|i| Self(ISO_4217[i].as_bytes().try_into().unwrap_or(*b"XXX")))
    }

    pub fn as_str(&self) -> &str {
        // Only ever built from the table's ASCII codes.
        std::str::from_utf8(&self.0).unwrap_or("XXX")
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An amount in minor units (cents) of a currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Money {
    pub amount: i64,
    pub currency: Currency,
}

impl Money {
    /// `amount` minor units of `currency`; `positive`: zero is refused too.
    pub fn parse(
        field: &'static str,
        amount: i64,
        currency: &str,
        positive: bool,
    ) -> Result<Self, InvalidCampaign> {
        let Some(currency) = Currency::parse(currency) else {
            return refuse(
                field,
                format!("{currency:?} is not an active ISO 4217 currency code (e.g. \"EUR\")"),
            );
        };
        if amount < 0 || (positive && amount == 0) || amount > MAX_AMOUNT {
            return refuse(
                field,
                format!(
                    "the amount must be {} minor units, at most {MAX_AMOUNT} (got {amount})",
                    if positive { "more than 0" } else { "0 or more" }
                ),
            );
        }
        Ok(Self { amount, currency })
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} (minor units)", self.amount, self.currency)
    }
}

/// What a campaign's coupon takes off an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Discount {
    /// 1 to 100 percent of the order total, rounded down in minor units.
    PercentOff(u8),
    /// A fixed amount, at most the order total.
    AmountOff(Money),
}

impl Discount {
    /// A discount from its raw fields: exactly one of a percent, or an
    /// amount with its currency.
    pub fn parse(
        percent_off: Option<i64>,
        amount_off: Option<i64>,
        currency: Option<&str>,
    ) -> Result<Self, InvalidCampaign> {
        match (percent_off, amount_off, currency) {
            (Some(percent), None, None) => match u8::try_from(percent) {
                Ok(p @ 1..=100) => Ok(Self::PercentOff(p)),
                _ => refuse(
                    "discount.percent_off",
                    format!("must be 1 to 100 (got {percent})"),
                ),
            },
            (None, Some(amount), Some(currency)) => Ok(Self::AmountOff(Money::parse(
                "discount.amount_off",
                amount,
                currency,
                true,
            )?)),
            (None, Some(_), None) => refuse("discount.currency", "is required with amount_off"),
            (None, None, Some(_)) => refuse("discount.amount_off", "is required with currency"),
            (Some(_), _, _) => refuse(
                "discount",
                "give either percent_off, or amount_off with currency, not both",
            ),
            (None, None, None) => {
                refuse("discount", "give percent_off, or amount_off with currency")
            }
        }
    }
}

/// A campaign's fields as they arrive, not yet validated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CampaignFields {
    pub name: Option<String>,
    pub discount: Option<Discount>,
    pub min_order: Option<Money>,
    pub valid_from: Option<DateTime<Utc>>,
    pub valid_until: Option<DateTime<Utc>>,
    pub locations: Vec<String>,
    pub min_age: Option<i64>,
}

/// A valid campaign (see the module doc for the rules).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Campaign {
    name: Option<String>,
    discount: Option<Discount>,
    min_order: Option<Money>,
    valid_from: Option<DateTime<Utc>>,
    valid_until: Option<DateTime<Utc>>,
    locations: Vec<String>,
    min_age: Option<u32>,
}

/// `t` to the millisecond (the events' precision).
fn to_millis(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or(t)
}

pub(crate) fn check_text(
    field: &'static str,
    raw: &str,
    max: usize,
) -> Result<(), InvalidCampaign> {
    let chars = raw.chars().count();
    if chars == 0 || chars > max {
        return refuse(
            field,
            format!("must be 1 to {max} characters (got {chars})"),
        );
    }
    if raw.chars().any(char::is_control) || raw.trim() != raw {
        return refuse(
            field,
            "must not contain control characters or start or end with white space",
        );
    }
    Ok(())
}

impl Campaign {
    /// Validates `fields` as released at `now`; `Ok(None)` when no field is
    /// given (a batch without a campaign).
    pub fn parse(
        fields: CampaignFields,
        now: DateTime<Utc>,
    ) -> Result<Option<Self>, InvalidCampaign> {
        if fields == CampaignFields::default() {
            return Ok(None);
        }
        let campaign = Self::from_stored(fields)?;
        if let Some(until) = campaign.valid_until {
            if until <= now {
                return refuse(
                    "valid_until",
                    format!(
                        "{} has passed: the campaign would never be claimable",
                        until.to_rfc3339()
                    ),
                );
            }
        }
        Ok(Some(campaign))
    }

    /// Validates a campaign read back (an event, a row): the rules of
    /// [`Campaign::parse`] but the end being in the future, which held when
    /// it was released.
    pub fn from_stored(fields: CampaignFields) -> Result<Self, InvalidCampaign> {
        if let Some(name) = &fields.name {
            check_text("campaign", name, MAX_NAME_CHARS)?;
        }
        if let Some(min) = fields.min_order {
            if min.amount <= 0 {
                return refuse(
                    "min_order.amount",
                    format!("must be more than 0 minor units (got {})", min.amount),
                );
            }
        }
        if let Some(Discount::AmountOff(off)) = fields.discount {
            if off.amount <= 0 {
                return refuse(
                    "discount.amount_off",
                    format!("must be more than 0 minor units (got {})", off.amount),
                );
            }
            if let Some(min) = fields.min_order {
                if min.currency != off.currency {
                    return refuse(
                        "min_order.currency",
                        format!(
                            "is {} but the discount is in {}: one campaign, one currency",
                            min.currency, off.currency
                        ),
                    );
                }
            }
        }
        if let Some(Discount::PercentOff(p)) = fields.discount {
            if !(1..=100).contains(&p) {
                return refuse(
                    "discount.percent_off",
                    format!("must be 1 to 100 (got {p})"),
                );
            }
        }
        let valid_from = fields.valid_from.map(to_millis);
        let valid_until = fields.valid_until.map(to_millis);
        if let (Some(from), Some(until)) = (valid_from, valid_until) {
            if until <= from {
                return refuse(
                    "valid_until",
                    format!(
                        "must be after valid_from ({} is not after {})",
                        until.to_rfc3339(),
                        from.to_rfc3339()
                    ),
                );
            }
        }
        if fields.locations.len() > MAX_LOCATIONS {
            return refuse(
                "locations",
                format!("at most {MAX_LOCATIONS} (got {})", fields.locations.len()),
            );
        }
        let mut locations = Vec::with_capacity(fields.locations.len());
        for location in fields.locations {
            check_text("locations", &location, MAX_LOCATION_CHARS)?;
            if !locations.contains(&location) {
                locations.push(location);
            }
        }
        let min_age = match fields.min_age {
            None => None,
            Some(age) => match u32::try_from(age) {
                Ok(a @ 1..=MAX_MIN_AGE) => Some(a),
                _ => {
                    return refuse(
                        "min_age",
                        format!("must be 1 to {MAX_MIN_AGE} years (got {age})"),
                    )
                }
            },
        };
        Ok(Self {
            name: fields.name,
            discount: fields.discount,
            min_order: fields.min_order,
            valid_from,
            valid_until,
            locations,
            min_age,
        })
    }

    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }
    pub fn discount(&self) -> Option<Discount> {
        self.discount
    }
    pub fn min_order(&self) -> Option<Money> {
        self.min_order
    }
    pub fn valid_from(&self) -> Option<DateTime<Utc>> {
        self.valid_from
    }
    pub fn valid_until(&self) -> Option<DateTime<Utc>> {
        self.valid_until
    }
    pub fn locations(&self) -> &[String] {
        &self.locations
    }
    pub fn min_age(&self) -> Option<u32> {
        self.min_age
    }
    /// Who may claim its coupons (`crate::profile::eligible`).
    pub fn eligibility(&self) -> crate::profile::Eligibility {
        crate::profile::Eligibility {
            locations: self.locations.clone(),
            min_age: self.min_age,
        }
    }

    /// Whether its coupons may be claimed at `t`: `valid_from <= t <
    /// valid_until` (an open side is unbounded).
    pub fn is_open_at(&self, t: DateTime<Utc>) -> bool {
        self.valid_from.is_none_or(|from| from <= t)
            && self.valid_until.is_none_or(|until| t < until)
    }

    /// The campaign's fields, as [`Campaign::from_stored`] takes them back.
    pub fn fields(&self) -> CampaignFields {
        CampaignFields {
            name: self.name.clone(),
            discount: self.discount,
            min_order: self.min_order,
            valid_from: self.valid_from,
            valid_until: self.valid_until,
            locations: self.locations.clone(),
            min_age: self.min_age.map(i64::from),
        }
    }
}

/// Why a purchase of a campaign's coupon is refused by the campaign.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TermsRefusal {
    /// The order total is under the campaign's minimum (or missing while
    /// the campaign has a minimum).
    OrderBelowMinimum,
    /// The order is in another currency than the campaign's minimum or
    /// discount.
    CurrencyMismatch,
    /// The campaign takes a percent off and no order total was sent.
    OrderTotalRequired,
}

/// The campaign's terms for one purchase: `Ok(discount)` (`None` when the
/// coupon takes nothing off), or the refusal. The discount of a percent is
/// rounded down in minor units; a fixed amount is capped at the order total.
pub fn purchase_terms(
    campaign: Option<&Campaign>,
    order_total: Option<Money>,
) -> Result<Option<Money>, TermsRefusal> {
    let Some(campaign) = campaign else {
        return Ok(None);
    };
    let currencies =
        campaign
            .min_order
            .map(|m| m.currency)
            .into_iter()
            .chain(match campaign.discount {
                Some(Discount::AmountOff(off)) => Some(off.currency),
                _ => None,
            });
    if let Some(total) = order_total {
        for currency in currencies {
            if currency != total.currency {
                return Err(TermsRefusal::CurrencyMismatch);
            }
        }
    }
    if let Some(min) = campaign.min_order {
        match order_total {
            Some(total) if total.amount >= min.amount => {}
            _ => return Err(TermsRefusal::OrderBelowMinimum),
        }
    }
    match (campaign.discount, order_total) {
        (None, _) => Ok(None),
        (Some(Discount::PercentOff(_)), None) => Err(TermsRefusal::OrderTotalRequired),
        (Some(Discount::PercentOff(p)), Some(total)) => Ok(Some(Money {
            amount: ((i128::from(total.amount) * i128::from(p)) / 100) as i64,
            currency: total.currency,
        })),
        (Some(Discount::AmountOff(off)), None) => Ok(Some(off)),
        (Some(Discount::AmountOff(off)), Some(total)) => Ok(Some(Money {
            amount: off.amount.min(total.amount),
            currency: off.currency,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn now() -> DateTime<Utc> {
        "2026-12-05T12:00:00Z".parse().unwrap()
    }

    fn eur(amount: i64) -> Money {
        Money::parse("m", amount, "EUR", false).unwrap()
    }

    fn campaign(fields: CampaignFields) -> Campaign {
        Campaign::parse(fields, now()).unwrap().unwrap()
    }

    #[test]
    fn the_currency_table_is_sorted_unique_and_three_capitals() {
        assert!(ISO_4217.windows(2).all(|w| w[0] < w[1]));
        assert!(ISO_4217
            .iter()
            .all(|c| c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase())));
        for code in ["EUR", "USD", "JPY", "INR", "CHF"] {
            assert_eq!(Currency::parse(code).unwrap().as_str(), code);
        }
        for bad in ["eur", "EURO", "XXX", "XTS", "ABC", "", "DEM"] {
            assert_eq!(Currency::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn no_field_is_no_campaign() {
        assert_eq!(Campaign::parse(CampaignFields::default(), now()), Ok(None));
    }

    #[test]
    fn a_discount_is_a_percent_or_an_amount_with_its_currency() {
        assert_eq!(
            Discount::parse(Some(15), None, None),
            Ok(Discount::PercentOff(15))
        );
        assert_eq!(
            Discount::parse(None, Some(500), Some("EUR")),
            Ok(Discount::AmountOff(eur(500)))
        );
        for (p, field) in [(0, "discount.percent_off"), (101, "discount.percent_off")] {
            assert_eq!(
                Discount::parse(Some(p), None, None).unwrap_err().field,
                field
            );
        }
        assert_eq!(
            Discount::parse(None, Some(0), Some("EUR"))
                .unwrap_err()
                .field,
            "discount.amount_off"
        );
        assert_eq!(
            Discount::parse(None, Some(5), Some("EURO"))
                .unwrap_err()
                .field,
            "discount.amount_off"
        );
        assert_eq!(
            Discount::parse(None, Some(5), None).unwrap_err().field,
            "discount.currency"
        );
        assert_eq!(
            Discount::parse(Some(5), Some(5), Some("EUR"))
                .unwrap_err()
                .field,
            "discount"
        );
        assert_eq!(
            Discount::parse(None, None, None).unwrap_err().field,
            "discount"
        );
    }

    #[test]
    fn the_window_ends_after_it_starts_and_not_in_the_past() {
        let later = now() + chrono::Duration::hours(1);
        let fields = |from, until| CampaignFields {
            valid_from: from,
            valid_until: until,
            ..CampaignFields::default()
        };
        assert!(Campaign::parse(fields(Some(now()), Some(later)), now()).is_ok());
        let backwards = Campaign::parse(fields(Some(later), Some(now())), now()).unwrap_err();
        assert_eq!(backwards.field, "valid_until");
        let empty = Campaign::parse(fields(Some(later), Some(later)), now()).unwrap_err();
        assert_eq!(empty.field, "valid_until");
        let over = Campaign::parse(fields(None, Some(now())), now()).unwrap_err();
        assert!(over.problem.contains("has passed"), "{over}");
        // Read back later, a stored campaign that has ended is still one.
        assert!(Campaign::from_stored(fields(None, Some(now()))).is_ok());
    }

    #[test]
    fn names_locations_and_ages_are_checked() {
        let bad_name = CampaignFields {
            name: Some(" x".into()),
            ..CampaignFields::default()
        };
        assert_eq!(
            Campaign::parse(bad_name, now()).unwrap_err().field,
            "campaign"
        );
        for age in [0, -1, 121] {
            let fields = CampaignFields {
                min_age: Some(age),
                ..CampaignFields::default()
            };
            assert_eq!(Campaign::parse(fields, now()).unwrap_err().field, "min_age");
        }
        let c = campaign(CampaignFields {
            locations: vec!["DE".into(), "FR".into(), "DE".into()],
            min_age: Some(18),
            ..CampaignFields::default()
        });
        assert_eq!(c.locations(), ["DE", "FR"]);
        assert_eq!(c.min_age(), Some(18));
        let empty_location = CampaignFields {
            locations: vec![String::new()],
            ..CampaignFields::default()
        };
        assert_eq!(
            Campaign::parse(empty_location, now()).unwrap_err().field,
            "locations"
        );
    }

    #[test]
    fn one_campaign_one_currency() {
        let fields = CampaignFields {
            discount: Some(Discount::AmountOff(eur(100))),
            min_order: Some(Money::parse("m", 1000, "USD", true).unwrap()),
            ..CampaignFields::default()
        };
        assert_eq!(
            Campaign::parse(fields, now()).unwrap_err().field,
            "min_order.currency"
        );
    }

    #[test]
    fn the_window_is_half_open() {
        let from = now();
        let until = now() + chrono::Duration::minutes(10);
        let c = campaign(CampaignFields {
            valid_from: Some(from),
            valid_until: Some(until),
            ..CampaignFields::default()
        });
        assert!(!c.is_open_at(from - chrono::Duration::milliseconds(1)));
        assert!(c.is_open_at(from));
        assert!(c.is_open_at(until - chrono::Duration::milliseconds(1)));
        assert!(!c.is_open_at(until));
    }

    #[test]
    fn purchases_meet_the_minimum_in_the_campaigns_currency() {
        let c = campaign(CampaignFields {
            discount: Some(Discount::PercentOff(15)),
            min_order: Some(eur(5000)),
            ..CampaignFields::default()
        });
        assert_eq!(
            purchase_terms(Some(&c), Some(eur(4999))),
            Err(TermsRefusal::OrderBelowMinimum)
        );
        assert_eq!(
            purchase_terms(Some(&c), None),
            Err(TermsRefusal::OrderBelowMinimum)
        );
        let usd = Money::parse("m", 9000, "USD", true).unwrap();
        assert_eq!(
            purchase_terms(Some(&c), Some(usd)),
            Err(TermsRefusal::CurrencyMismatch)
        );
        // 15% of 50.33 EUR is 7.5495 EUR: 754 cents, rounded down.
        assert_eq!(
            purchase_terms(Some(&c), Some(eur(5033))),
            Ok(Some(eur(754)))
        );
        assert_eq!(purchase_terms(None, Some(eur(1))), Ok(None));
    }

    #[test]
    fn a_percent_needs_the_total_and_an_amount_is_capped_by_it() {
        let percent = campaign(CampaignFields {
            discount: Some(Discount::PercentOff(10)),
            ..CampaignFields::default()
        });
        assert_eq!(
            purchase_terms(Some(&percent), None),
            Err(TermsRefusal::OrderTotalRequired)
        );
        let amount = campaign(CampaignFields {
            discount: Some(Discount::AmountOff(eur(1000))),
            ..CampaignFields::default()
        });
        assert_eq!(
            purchase_terms(Some(&amount), Some(eur(600))),
            Ok(Some(eur(600)))
        );
        assert_eq!(
            purchase_terms(Some(&amount), Some(eur(6000))),
            Ok(Some(eur(1000)))
        );
        assert_eq!(purchase_terms(Some(&amount), None), Ok(Some(eur(1000))));
        let yen = Money::parse("m", 6000, "JPY", true).unwrap();
        assert_eq!(
            purchase_terms(Some(&amount), Some(yen)),
            Err(TermsRefusal::CurrencyMismatch)
        );
    }

    proptest! {
        #[test]
        fn a_discount_never_exceeds_the_order_nor_goes_negative(
            total in 0i64..=MAX_AMOUNT, percent in 1u8..=100, off in 1i64..=MAX_AMOUNT,
        ) {
            let order = Some(eur(total));
            for discount in [Discount::PercentOff(percent), Discount::AmountOff(eur(off))] {
                let c = campaign(CampaignFields { discount: Some(discount), ..CampaignFields::default() });
                let got = purchase_terms(Some(&c), order).unwrap().unwrap();
                prop_assert!(got.amount >= 0 && got.amount <= total);
                prop_assert_eq!(got.currency, eur(total).currency);
            }
            // A percent is rounded down: what is left is at least the rest.
            let c = campaign(CampaignFields { discount: Some(Discount::PercentOff(percent)), ..CampaignFields::default() });
            let got = purchase_terms(Some(&c), order).unwrap().unwrap().amount;
            prop_assert!(i128::from(got) * 100 <= i128::from(total) * i128::from(percent));
            prop_assert!((i128::from(got) + 1) * 100 > i128::from(total) * i128::from(percent));
        }

        #[test]
        fn percents_outside_1_to_100_are_refused_and_inside_accepted(p in -1000i64..1000) {
            let parsed = Discount::parse(Some(p), None, None);
            prop_assert_eq!(parsed.is_ok(), (1..=100).contains(&p));
        }

        #[test]
        fn a_window_is_accepted_exactly_when_it_ends_after_it_starts(
            from_ms in 0i64..10_000_000, len_ms in -5_000_000i64..5_000_000,
        ) {
            let base = now() + chrono::Duration::days(1);
            let from = base + chrono::Duration::milliseconds(from_ms);
            let until = from + chrono::Duration::milliseconds(len_ms);
            let fields = CampaignFields { valid_from: Some(from), valid_until: Some(until), ..CampaignFields::default() };
            let parsed = Campaign::parse(fields, now());
            prop_assert_eq!(parsed.is_ok(), len_ms > 0);
            if let Ok(Some(c)) = parsed {
                // Read back from its fields, it is the same campaign.
                prop_assert_eq!(Campaign::from_stored(c.fields()), Ok(c));
            }
        }
    }
}
