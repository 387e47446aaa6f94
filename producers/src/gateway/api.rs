//! The bodies and parameters of the HTTP API, as types.
//!
//! The handlers build their answers from these types and the OpenAPI
//! document is derived from the same types (`utoipa`), so the document cannot
//! describe a field the gateway does not send. Optional fields of answers are
//! always sent (as `null` when empty), hence `required = true` on them.

//!
//! Request bodies refuse fields they do not know (`deny_unknown_fields`): a
//! misspelt or unsupported field is a `400` naming it, never silently
//! dropped (a release with an ignored `valid_until` would never end).

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

// The constraints the gateway enforces on text ids (`coupon_domain::ids`),
// as the document states them, each written once. utoipa takes only string
// literals in `pattern`, so the attributes name a pattern by a placeholder
// (`pattern = "{ID_PATTERN}"`) and `openapi::contract` puts the constant in
// its place ([`PATTERNS`]); `openapi::tests` checks that the patterns accept
// exactly what the parsers accept.

/// A user, employee, order id or category: no control characters (Unicode
/// `Cc`), and neither first nor last character is white space (Unicode
/// `White_Space`). Lengths count characters (Unicode scalar values).
pub const ID_PATTERN: &str = r"^[^\x00-\x20\x7f-\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]([^\x00-\x1f\x7f-\x9f]*[^\x00-\x20\x7f-\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000])?$";
/// The same, or empty (an optional category).
pub const OPTIONAL_ID_PATTERN: &str = r"^([^\x00-\x20\x7f-\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]([^\x00-\x1f\x7f-\x9f]*[^\x00-\x20\x7f-\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000])?)?$";
/// A coupon code as a purchase names it: no control characters. Anything
/// else that is not a code is `unknown_coupon`.
pub const CODE_PATTERN: &str = r"^[^\x00-\x1f\x7f-\x9f]+$";
/// The `x-request-id` header the gateway uses: 1 to 64 visible ASCII
/// characters; any other value is replaced by a generated id (so it is told
/// in the description, not a constraint).
pub const REQUEST_ID_PATTERN: &str = r"^[\x21-\x7e]{1,64}$";
/// A UUID in its hyphenated form (a batch id).
pub const UUID_PATTERN: &str =
    "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$";

/// The placeholders of the `pattern` attributes and the patterns they stand
/// for.
pub const PATTERNS: [(&str, &str); 5] = [
    ("{ID_PATTERN}", ID_PATTERN),
    ("{OPTIONAL_ID_PATTERN}", OPTIONAL_ID_PATTERN),
    ("{CODE_PATTERN}", CODE_PATTERN),
    ("{UUID_PATTERN}", UUID_PATTERN),
    ("{CURRENCY_PATTERN}", CURRENCY_PATTERN),
];

/// An active ISO 4217 currency code: one of `coupon_domain::campaign::ISO_4217`
/// (a test checks they are the same list).
pub const CURRENCY_PATTERN: &str = "^(AED|AFN|ALL|AMD|AOA|ARS|AUD|AWG|AZN|BAM|BBD|BDT|BGN|BHD|BIF|BMD|BND|BOB|BRL|BSD|BTN|BWP|BYN|BZD|CAD|CDF|CHF|CLP|CNY|COP|CRC|CUP|CVE|CZK|DJF|DKK|DOP|DZD|EGP|ERN|ETB|EUR|FJD|FKP|GBP|GEL|GHS|GIP|GMD|GNF|GTQ|GYD|HKD|HNL|HTG|HUF|IDR|ILS|INR|IQD|IRR|ISK|JMD|JOD|JPY|KES|KGS|KHR|KMF|KPW|KRW|KWD|KYD|KZT|LAK|LBP|LKR|LRD|LSL|LYD|MAD|MDL|MGA|MKD|MMK|MNT|MOP|MRU|MUR|MVR|MWK|MXN|MYR|MZN|NAD|NGN|NIO|NOK|NPR|NZD|OMR|PAB|PEN|PGK|PHP|PKR|PLN|PYG|QAR|RON|RSD|RUB|RWF|SAR|SBD|SCR|SDG|SEK|SGD|SHP|SLE|SOS|SRD|SSP|STN|SVC|SYP|SZL|THB|TJS|TMT|TND|TOP|TRY|TTD|TWD|TZS|UAH|UGX|USD|UYU|UZS|VES|VND|VUV|WST|XAF|XCD|XCG|XOF|XPF|YER|ZAR|ZMW|ZWG)$";

/// `GET /api/v1/coupon` query. `id` is optional in the type only so that a
/// missing id is answered with the JSON error shape (`invalid_request`)
/// rather than the query extractor's own text.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ClaimQuery {
    /// The user claiming a coupon: 1 to 128 characters, no control
    /// characters, no white space first or last.
    #[param(required = true, value_type = String, min_length = 1, max_length = 128,
        pattern = "{ID_PATTERN}", example = "user-42")]
    pub id: Option<String>,
    /// Only a coupon of this category (at most 64 characters, no control
    /// characters, no white space first or last); any category when absent
    /// or empty.
    #[param(
        max_length = 64,
        pattern = "{OPTIONAL_ID_PATTERN}",
        example = "Electronics"
    )]
    pub category: Option<String>,
}

/// A granted claim: the coupon is held for this user until `expires_at`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClaimGranted {
    #[schema(example = "0AN35HST00000")]
    pub coupon_code: String,
    #[schema(example = "Electronics")]
    pub category: String,
    #[schema(example = "user-42")]
    pub user_id: String,
    /// End of the hold (RFC 3339, UTC): buy before then.
    #[schema(required = true, format = DateTime, example = "2026-11-25T12:05:00.000Z")]
    pub expires_at: Option<String>,
    /// The name of the coupon's campaign (`null`: none, or unnamed).
    #[schema(required = true, example = "Winter sale")]
    pub campaign: Option<String>,
    /// What the coupon takes off an order (`null`: nothing).
    #[schema(required = true, value_type = Option<Discount>)]
    pub discount: Option<DiscountBody>,
    /// The smallest order total the coupon may be used on (`null`: any).
    #[schema(required = true, value_type = Option<MinOrderBody>)]
    pub min_order: Option<MoneyBody>,
    /// End of the coupon's campaign (RFC 3339, UTC; `null`: none).
    #[schema(required = true, format = DateTime, example = "2026-12-31T23:00:00.000Z")]
    pub valid_until: Option<String>,
}

/// An amount of money in minor units (cents) of an ISO 4217 currency:
/// `{"amount": 1999, "currency": "EUR"}` is 19.99 EUR.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MoneyBody {
    /// Minor units (cents), a whole number (at most 10^12).
    #[serde(deserialize_with = "whole_i64")]
    #[schema(minimum = 0, maximum = 1_000_000_000_000_i64, example = 5000)]
    pub amount: i64,
    /// An active ISO 4217 code, in capitals.
    #[schema(pattern = "{CURRENCY_PATTERN}", example = "EUR")]
    pub currency: String,
}

/// The smallest order total of a campaign: more than 0 minor units of an
/// ISO 4217 currency (the discount's, when the discount is an amount).
/// Read and written as a [`MoneyBody`]; this type only describes it.
#[derive(Debug, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct MinOrderBody {
    /// Minor units (cents), a whole number above 0 (at most 10^12).
    #[schema(minimum = 1, maximum = 1_000_000_000_000_i64, example = 5000)]
    pub amount: i64,
    #[schema(pattern = "{CURRENCY_PATTERN}", example = "EUR")]
    pub currency: String,
}

/// A percent off: 1 to 100 percent of the order total, rounded down in minor
/// units.
#[derive(Debug, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct PercentOff {
    #[schema(minimum = 1, maximum = 100, example = 15)]
    pub percent_off: i64,
}

/// A fixed amount off, in minor units of an ISO 4217 currency; at most the
/// order total.
#[derive(Debug, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct AmountOff {
    #[schema(minimum = 1, maximum = 1_000_000_000_000_i64, example = 500)]
    pub amount_off: i64,
    #[schema(pattern = "{CURRENCY_PATTERN}", example = "EUR")]
    pub currency: String,
}

/// The two forms of a discount, as the document describes [`DiscountBody`]
/// (the type read and written is a flat one, whose refusals name the
/// field).
#[derive(Debug, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub enum Discount {
    PercentOff(PercentOff),
    AmountOff(AmountOff),
}

impl From<&coupon_schemas::Money> for MoneyBody {
    fn from(m: &coupon_schemas::Money) -> Self {
        MoneyBody {
            amount: m.amount,
            currency: m.currency.clone(),
        }
    }
}

/// A discount: `{"percent_off": 15}` (1 to 100 percent of the order total,
/// rounded down in minor units) or `{"amount_off": 500, "currency": "EUR"}`
/// (a fixed amount in minor units, at most the order total).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscountBody {
    #[serde(
        default,
        deserialize_with = "opt_whole_i64",
        skip_serializing_if = "Option::is_none"
    )]
    pub percent_off: Option<i64>,
    #[serde(
        default,
        deserialize_with = "opt_whole_i64",
        skip_serializing_if = "Option::is_none"
    )]
    pub amount_off: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
}

impl DiscountBody {
    /// The discount a wire campaign gives, if any.
    pub fn of(campaign: &coupon_schemas::Campaign) -> Option<Self> {
        match (campaign.percent_off, &campaign.amount_off) {
            (0, None) => None,
            (p, None) => Some(DiscountBody {
                percent_off: Some(i64::from(p)),
                amount_off: None,
                currency: None,
            }),
            (_, Some(m)) => Some(DiscountBody {
                percent_off: None,
                amount_off: Some(m.amount),
                currency: Some(m.currency.clone()),
            }),
        }
    }
}

/// `PUT /api/v1/users/{id}` body: the user's whole profile. A PUT replaces
/// it, so every field must be given; `null` (or, for `name` and `location`,
/// `""`) says the storefront does not know it, and clears it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProfileBody {
    /// 1 to 200 characters, no control characters, no white space first or
    /// last.
    #[serde(deserialize_with = "present")]
    #[schema(
        required = true,
        max_length = 200,
        pattern = "{OPTIONAL_ID_PATTERN}",
        example = "Ada Lovelace"
    )]
    pub name: Option<String>,
    /// Date of birth, `YYYY-MM-DD`: not in the future, not before 1900
    /// (`null` clears it).
    #[serde(deserialize_with = "present")]
    #[schema(required = true, format = Date, example = "1990-04-01")]
    pub dob: Option<String>,
    /// Where the user is, as campaigns' `locations` name places (e.g. a
    /// country code); compared without regard to case. 1 to 64 characters.
    #[serde(deserialize_with = "present")]
    #[schema(
        required = true,
        max_length = 64,
        pattern = "{OPTIONAL_ID_PATTERN}",
        example = "DE"
    )]
    pub location: Option<String>,
}

/// A field that must be given, though it may be `null`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Option::<String>::deserialize(d)
}

/// The `202` answer of `PUT /api/v1/users/{id}`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ProfileAccepted {
    #[schema(example = "user-42")]
    pub user_id: String,
    /// Always `accepted`: published, applied once projected.
    #[schema(example = "accepted")]
    pub status: String,
    /// The profile's time: of two updates, the later wins.
    #[schema(example = "2026-12-06T03:00:00.000Z")]
    pub updated_at: String,
}

/// `POST /api/v1/purchase` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PurchaseBody {
    /// The user who claimed the coupon: 1 to 128 characters, no control
    /// characters, no white space first or last.
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = "{ID_PATTERN}",
        example = "user-42"
    )]
    pub user_id: String,
    /// The code the claim answered with (1 to 64 characters, no control
    /// characters; a string that is no coupon's code is `unknown_coupon`).
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = "{CODE_PATTERN}",
        example = "0AN35HST00000"
    )]
    pub coupon_code: String,
    /// The shop's order id: purchases are idempotent on it. 1 to 128
    /// characters, no control characters, no white space first or last.
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = "{ID_PATTERN}",
        example = "order-1"
    )]
    pub order_id: String,
    /// The order's total before the coupon. Required when the coupon's
    /// campaign has a minimum order (`409 order_below_minimum` without it)
    /// or a percent off (`409 order_total_required`); it must be in the
    /// campaign's currency (`409 currency_mismatch`).
    #[serde(default)]
    pub order_total: Option<MoneyBody>,
}

/// Always `redeemed` in a `200` answer.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Redeemed {
    Redeemed,
}

/// A purchase that redeemed the coupon.
#[derive(Debug, Serialize, ToSchema)]
pub struct PurchaseRedeemed {
    pub status: Redeemed,
    #[schema(example = "0AN35HST00000")]
    pub coupon_code: String,
    #[schema(example = "order-1")]
    pub order_id: String,
    #[schema(required = true, format = DateTime, example = "2026-11-25T12:01:30.000Z")]
    pub redeemed_at: Option<String>,
    /// What the coupon's campaign takes off the order (a percent of the
    /// order total rounded down in minor units; a fixed amount at most the
    /// order total); `null` when the coupon gives no discount.
    #[schema(required = true)]
    pub discount_amount: Option<MoneyBody>,
}

/// `POST /api/v1/coupon` body: an employee releases a batch, optionally as
/// a campaign (every campaign field is optional).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCoupons {
    /// The employee id: 1 to 64 characters, no control characters, no white
    /// space first or last.
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = "{ID_PATTERN}",
        example = "e1"
    )]
    pub id: String,
    /// 1 to 64 characters, no control characters, no white space first or
    /// last.
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = "{ID_PATTERN}",
        example = "Electronics"
    )]
    pub category: String,
    /// How many coupons (1 to 100,000; `couponctl issue` goes higher).
    /// An integer, as JSON Schema counts them: `100.0` is one too.
    #[serde(default, deserialize_with = "integral_count")]
    #[schema(minimum = 1, maximum = 100_000, example = 100)]
    pub count: Option<u32>,
    /// The campaign's name (1 to 128 characters, no control characters, no
    /// white space first or last).
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = "{ID_PATTERN}",
        example = "Winter sale"
    )]
    pub campaign: Option<String>,
    /// What each coupon takes off an order.
    #[schema(value_type = Option<Discount>)]
    pub discount: Option<DiscountBody>,
    /// The smallest order total a coupon may be used on (more than 0, in
    /// the discount's currency when the discount is an amount).
    #[schema(value_type = Option<MinOrderBody>)]
    pub min_order: Option<MoneyBody>,
    /// The coupons are claimable from this time (RFC 3339; kept to the
    /// millisecond). Before it a claim does not get them (`sold_out` if
    /// nothing else is available).
    #[schema(format = DateTime, example = "2026-12-01T00:00:00Z")]
    pub valid_from: Option<String>,
    /// ... until this time, exclusive (RFC 3339; after `valid_from`, and not
    /// passed yet).
    #[schema(format = DateTime, example = "2099-01-06T00:00:00Z")]
    pub valid_until: Option<String>,
    /// Eligibility: the user's profile location (`PUT /api/v1/users/{id}`)
    /// must be one of these, compared without regard to case (at most 32,
    /// each 1 to 64 characters).
    #[schema(max_items = 32, value_type = Option<Vec<Location>>)]
    pub locations: Option<Vec<String>>,
    /// Eligibility: the user's minimum age in years (1 to 120) on the day of
    /// the claim, from the profile's date of birth.
    #[serde(default, deserialize_with = "opt_whole_i64")]
    #[schema(minimum = 1, maximum = 120, example = 18)]
    pub min_age: Option<i64>,
}

/// A location a campaign is for: 1 to 64 characters, no control characters,
/// no white space first or last. Only describes the items of `locations`
/// (utoipa takes no length on a newtype's field, so its schema is written
/// out).
pub struct Location;

impl utoipa::PartialSchema for Location {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(1))
            .max_length(Some(64))
            .pattern(Some("{ID_PATTERN}"))
            .examples(["DE"])
            .into()
    }
}

impl ToSchema for Location {}

/// An integer as JSON Schema counts them (`500` or `500.0`); a fraction or
/// a number too large for a double to hold exactly is refused. A number
/// written with a fraction part is read as a double, which may be a unit in
/// the last place off the text: within a thousandth of a whole number it is
/// that number, exact up to 10^12 (the largest amount the rules accept);
/// past it, a double is refused as out of range.
fn whole_i64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    use serde::de::Error;
    let number = serde_json::Number::deserialize(d)?;
    if let Some(n) = number.as_i64() {
        return Ok(n);
    }
    match number.as_f64() {
        Some(f) if f.abs() <= 1e12 && (f - f.round()).abs() < 1e-3 => Ok(f.round() as i64),
        Some(f) if f.abs() > 1e12 => Err(D::Error::custom(format!(
            "{number} is out of range (at most 10^12)"
        ))),
        _ => Err(D::Error::custom(format!("{number} is not a whole number"))),
    }
}

/// [`whole_i64`], optional.
fn opt_whole_i64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    #[derive(Deserialize)]
    struct Whole(#[serde(deserialize_with = "whole_i64")] i64);
    Ok(Option::<Whole>::deserialize(d)?.map(|Whole(n)| n))
}

/// `count` as JSON Schema's `integer`: any number with no fractional part
/// (`100` or `100.0`); a fraction, a negative or an out-of-range number is
/// refused.
fn integral_count<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    use serde::de::Error;
    let Some(number) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    if let Some(n) = number.as_u64() {
        return u32::try_from(n)
            .map(Some)
            .map_err(|_| D::Error::custom("count: out of range"));
    }
    match number.as_f64() {
        Some(f) if f.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(&f) => {
            Ok(Some(f as u32))
        }
        _ => Err(D::Error::custom(format!(
            "count: {number} is not a whole number of coupons"
        ))),
    }
}

/// A duration in whole seconds as JSON Schema's `integer` (`86400` or
/// `86400.0`); a fraction or a negative number is refused, the range is the
/// caller's to check.
pub(super) fn whole_seconds<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<u64>, D::Error> {
    use serde::de::Error;
    let Some(number) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    if let Some(n) = number.as_u64() {
        return Ok(Some(n));
    }
    match number.as_f64() {
        Some(f) if f.fract() == 0.0 && (0.0..=u64::MAX as f64).contains(&f) => Ok(Some(f as u64)),
        _ => Err(D::Error::custom(format!(
            "{number} is not a whole number of seconds"
        ))),
    }
}

/// A released batch: the coupons are published and become available as soon
/// as the projector has stored them.
#[derive(Debug, Serialize, ToSchema)]
pub struct CouponBatch {
    #[schema(format = "uuid")]
    pub batch_id: String,
    #[schema(example = "e1")]
    pub employee_id: String,
    #[schema(example = "Electronics")]
    pub category: String,
    pub count: usize,
    pub codes: Vec<String>,
}

/// Where a coupon is in its lifecycle.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CouponState {
    Available,
    Held,
    Redeemed,
    /// Its campaign ended: out of the pool for good.
    Expired,
}

/// The API's names are the domain's (`coupon_domain::CouponStatus`); this
/// type only carries them into the OpenAPI document.
impl From<coupon_domain::CouponStatus> for CouponState {
    fn from(status: coupon_domain::CouponStatus) -> Self {
        use coupon_domain::CouponStatus as S;
        match status {
            S::Available => CouponState::Available,
            S::Held => CouponState::Held,
            S::Redeemed => CouponState::Redeemed,
            S::Expired => CouponState::Expired,
        }
    }
}

/// One coupon as Postgres has it.
#[derive(Debug, Serialize, ToSchema)]
pub struct CouponStatus {
    #[schema(example = "0AN35HST00000")]
    pub coupon_code: String,
    #[schema(example = "Electronics")]
    pub category: String,
    pub status: CouponState,
    /// The user holding or having redeemed it: shown to admin callers
    /// only (`null` for everyone else).
    #[schema(required = true)]
    pub holder: Option<String>,
    /// End of the hold, while it is held.
    #[schema(required = true, format = DateTime)]
    pub expires_at: Option<String>,
    #[schema(required = true, format = DateTime)]
    pub redeemed_at: Option<String>,
    /// The name of the coupon's campaign (`null`: none, or unnamed).
    #[schema(required = true)]
    pub campaign: Option<String>,
    /// What the coupon takes off an order (`null`: nothing).
    #[schema(required = true, value_type = Option<Discount>)]
    pub discount: Option<DiscountBody>,
    /// The smallest order total the coupon may be used on (`null`: any).
    #[schema(required = true, value_type = Option<MinOrderBody>)]
    pub min_order: Option<MoneyBody>,
    /// The campaign's window: claimable from `valid_from` until
    /// `valid_until` (RFC 3339, UTC; `null`: unbounded).
    #[schema(required = true, format = DateTime)]
    pub valid_from: Option<String>,
    #[schema(required = true, format = DateTime)]
    pub valid_until: Option<String>,
    /// Eligibility, checked against the claiming user's profile: locations
    /// (empty: any) and the minimum age (`null`: any).
    pub locations: Vec<String>,
    #[schema(required = true)]
    pub min_age: Option<u32>,
}

/// `ok`, `degraded` (Redis down: answers stay correct) or `unavailable`
/// (Postgres down).
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    Ok,
    Degraded,
    Unavailable,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub status: HealthState,
    pub postgres: bool,
    pub redis: bool,
    /// HTTP requests waiting for their decision in this gateway.
    pub waiting_requests: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(json: &str) -> Result<Option<u32>, String> {
        serde_json::from_str::<CreateCoupons>(json)
            .map(|c| c.count)
            .map_err(|e| e.to_string())
    }

    /// JSON Schema calls `33718.0` an integer, so the document allows it.
    #[test]
    fn count_is_any_whole_number() {
        let body = |n: &str| format!(r#"{{"id":"e1","category":"c","count":{n}}}"#);
        assert_eq!(count(&body("100")), Ok(Some(100)));
        assert_eq!(count(&body("33718.0")), Ok(Some(33718)));
        assert_eq!(count(&body("1e3")), Ok(Some(1000)));
        assert_eq!(count(&body("null")), Ok(None));
        assert_eq!(count(r#"{"id":"e1","category":"c"}"#), Ok(None));
        assert!(count(&body("1.5")).is_err());
        assert!(count(&body("-1")).is_err());
        assert!(count(&body("\"3\"")).is_err());
        assert!(count(&body("5000000000")).is_err());
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let refused = serde_json::from_str::<CreateCoupons>(
            r#"{"id":"e1","category":"c","valid_til":"2027-01-01T00:00:00Z"}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(refused.contains("unknown field `valid_til`"), "{refused}");
        let refused = serde_json::from_str::<PurchaseBody>(
            r#"{"user_id":"u","coupon_code":"C","order_id":"o","order_total":{"amount":1,"currency":"EUR","tax":2}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(refused.contains("unknown field `tax`"), "{refused}");
    }

    #[test]
    fn campaign_fields_are_read() {
        let body: CreateCoupons = serde_json::from_str(
            r#"{"id":"e1","category":"c","campaign":"W","discount":{"percent_off":15.0},
                "min_order":{"amount":5000,"currency":"EUR"},"locations":["DE"],"min_age":18}"#,
        )
        .unwrap();
        assert_eq!(body.discount.unwrap().percent_off, Some(15));
        assert_eq!(body.min_order.unwrap().amount, 5000);
        assert_eq!(body.min_age, Some(18));
        assert!(serde_json::from_str::<DiscountBody>(r#"{"percent_off":1.5}"#).is_err());
    }

    #[test]
    fn the_currency_pattern_is_the_domains_table() {
        let codes = coupon_domain::campaign::ISO_4217.join("|");
        assert_eq!(CURRENCY_PATTERN, format!("^({codes})$"));
    }

    #[test]
    fn amounts_written_as_doubles_are_read_exactly() {
        let money = |json: &str| serde_json::from_str::<MoneyBody>(json).map(|m| m.amount);
        assert_eq!(
            money(r#"{"amount": 999999999999.0, "currency": "EUR"}"#).unwrap(),
            999_999_999_999
        );
        assert!(
            money(r#"{"amount": 2022819770115041.0, "currency": "EUR"}"#)
                .unwrap_err()
                .to_string()
                .contains("out of range")
        );
        assert!(money(r#"{"amount": 12.5, "currency": "EUR"}"#).is_err());
        assert!(money(r#"{"amount": 1e300, "currency": "EUR"}"#).is_err());
    }
}

/// A campaign ended early (`DELETE /api/v1/campaigns/{id}`).
#[derive(Debug, Serialize, ToSchema)]
pub struct CampaignEnded {
    /// The campaign's id: its batch's id.
    #[schema(example = "0b5d1c3e-8f7a-4d2b-9c6e-1a2b3c4d5e6f")]
    pub campaign_id: String,
    /// Always `ended`.
    #[schema(example = "ended")]
    pub status: String,
    /// When it ended (RFC 3339, UTC, milliseconds): the first early end, or
    /// its `valid_until` when that came first.
    #[schema(example = "2026-12-06T03:00:00.123Z")]
    pub ended_at: String,
    /// The employee who ended it early (`null` when its window had ended
    /// before).
    #[schema(example = "alice")]
    pub ended_by: Option<String>,
}

/// An order cancelled (`POST /api/v1/purchase/{order_id}/cancel`).
#[derive(Debug, Serialize, ToSchema)]
pub struct Cancelled {
    /// Always `cancelled`.
    #[schema(example = "cancelled")]
    pub status: String,
}
