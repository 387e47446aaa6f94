//! A user's profile (issue #28 item 6) and who may claim a campaign's
//! coupons (item 2, eligibility).
//!
//! A profile is what a storefront tells us about its user: a name, a date of
//! birth and a location. It arrives as a `UserProfileUpdated` event (through
//! `PUT /api/v1/users/{id}` or published straight onto `coupons.users`) and
//! is validated here, once, whatever carried it ([`Profile::parse`]), so the
//! gateway's `400`/`422` and the consumer's dead letter refuse the same
//! things.
//!
//! [`eligible`] is the rule the claim processor filters its grants by: a
//! campaign with locations wants the profile's location among them, one with
//! a minimum age wants the user at least that old on the claim's day. A user
//! without a profile (or without the field a rule reads) is not eligible for
//! a campaign that has rules; a campaign without rules is everyone's.
//! Locations compare without regard to case, so `de` matches `DE`.

use chrono::{DateTime, Datelike, NaiveDate, Utc};

use crate::campaign::{check_text, MAX_LOCATION_CHARS};

/// The most characters a profile's name may have.
pub const MAX_PROFILE_NAME_CHARS: usize = 200;
/// The oldest date of birth accepted (nobody alive was born before it).
pub const EARLIEST_DOB: NaiveDate = match NaiveDate::from_ymd_opt(1900, 1, 1) {
    Some(date) => date,
    None => panic!("1900-01-01 is a date"),
};

/// Why a profile was refused: the field (its name in the API and the event)
/// and what is wrong with it. The message is safe to show to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct InvalidProfile {
    pub field: &'static str,
    pub problem: String,
}

/// A validated profile. Every field is optional: a storefront may know only
/// some of them (and then the rules that read a missing one refuse).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Profile {
    pub name: Option<String>,
    pub dob: Option<NaiveDate>,
    pub location: Option<String>,
}

impl Profile {
    /// Validates a profile as given (empty text = not given), judged at
    /// `now`: a name of 1 to 200 characters, a date of birth `YYYY-MM-DD`
    /// not in the future (the date somewhere on Earth at `now`, UTC+14, so
    /// nobody born today is refused) nor before 1900, a location as a
    /// campaign's.
    pub fn parse(
        name: &str,
        dob: &str,
        location: &str,
        now: DateTime<Utc>,
    ) -> Result<Self, InvalidProfile> {
        let today = (now + chrono::Duration::hours(14)).date_naive();
        let text = |field, raw: &str, max| -> Result<Option<String>, InvalidProfile> {
            if raw.is_empty() {
                return Ok(None);
            }
            check_text(field, raw, max).map_err(|e| InvalidProfile {
                field: e.field,
                problem: e.problem,
            })?;
            Ok(Some(raw.to_owned()))
        };
        let name = text("name", name, MAX_PROFILE_NAME_CHARS)?;
        let location = text("location", location, MAX_LOCATION_CHARS)?;
        let dob = match dob {
            "" => None,
            raw => {
                let date =
                    NaiveDate::parse_from_str(raw, "%Y-%m-%d").map_err(|_| InvalidProfile {
                        field: "dob",
                        problem: format!("must be a date YYYY-MM-DD (got {raw:?})"),
                    })?;
                if date > today {
                    return Err(InvalidProfile {
                        field: "dob",
                        problem: format!("must not be in the future (got {date})"),
                    });
                }
                if date < EARLIEST_DOB {
                    return Err(InvalidProfile {
                        field: "dob",
                        problem: format!("must not be before {EARLIEST_DOB} (got {date})"),
                    });
                }
                Some(date)
            }
        };
        Ok(Self {
            name,
            dob,
            location,
        })
    }
}

/// Who may claim a campaign's coupons. Empty `locations` and no `min_age`:
/// everyone.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Eligibility {
    pub locations: Vec<String>,
    pub min_age: Option<u32>,
}

impl Eligibility {
    /// Whether any rule restricts who may claim.
    pub fn is_restricted(&self) -> bool {
        !self.locations.is_empty() || self.min_age.is_some()
    }
}

/// The restricted campaigns (by batch id) whose coupons the user of
/// `profile` may not claim on the day `on`: what the claim processor's grant
/// leaves out for that user.
pub fn ineligible_batches(
    restricted: &[(uuid::Uuid, Eligibility)],
    profile: Option<&Profile>,
    on: NaiveDate,
) -> Vec<uuid::Uuid> {
    let mut out: Vec<uuid::Uuid> = restricted
        .iter()
        .filter(|(_, rules)| !eligible(rules, profile, on))
        .map(|(batch, _)| *batch)
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Whole years between `dob` and `on` (0 before the first birthday; a
/// 29 February birthday counts on 1 March in common years).
pub fn age_on(dob: NaiveDate, on: NaiveDate) -> u32 {
    if on < dob {
        return 0;
    }
    let mut years = on.year() - dob.year();
    if (on.month(), on.day()) < (dob.month(), dob.day()) {
        years -= 1;
    }
    u32::try_from(years).unwrap_or(0)
}

/// Whether the user of `profile` (`None`: no profile) may claim a coupon of
/// a campaign with `rules` on the day `on` (the claim's day).
pub fn eligible(rules: &Eligibility, profile: Option<&Profile>, on: NaiveDate) -> bool {
    if !rules.is_restricted() {
        return true;
    }
    let Some(profile) = profile else {
        return false;
    };
    let location_ok = rules.locations.is_empty()
        || profile.location.as_deref().is_some_and(|location| {
            rules
                .locations
                .iter()
                .any(|wanted| wanted.to_lowercase() == location.to_lowercase())
        });
    let age_ok = match rules.min_age {
        None => true,
        Some(min) => profile.dob.is_some_and(|dob| age_on(dob, on) >= min),
    };
    location_ok && age_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn date(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    fn today() -> NaiveDate {
        date("2026-12-06")
    }

    fn now() -> DateTime<Utc> {
        "2026-12-06T00:00:00Z".parse().unwrap()
    }

    #[test]
    fn a_profile_is_validated_field_by_field() {
        let p = Profile::parse("Ada", "1990-02-03", "DE", now()).unwrap();
        assert_eq!(p.dob, Some(date("1990-02-03")));
        assert_eq!(p.location.as_deref(), Some("DE"));
        assert_eq!(
            Profile::parse("", "", "", now()).unwrap(),
            Profile::default()
        );
        let field = |n: &str, d: &str, l: &str| Profile::parse(n, d, l, now()).unwrap_err().field;
        assert_eq!(field("Ada", "2026-12-07", "DE"), "dob");
        assert_eq!(field("Ada", "06.12.1990", "DE"), "dob");
        assert_eq!(field("Ada", "1899-12-31", "DE"), "dob");
        assert_eq!(field(&"x".repeat(201), "1990-01-01", "DE"), "name");
        assert_eq!(field(" Ada", "1990-01-01", "DE"), "name");
        assert_eq!(field("Ada", "1990-01-01", &"x".repeat(65)), "location");
        assert_eq!(field("Ada", "1990-01-01", "D\u{0}E"), "location");
        // Today is a date of birth (a newborn).
        assert!(Profile::parse("Ada", "2026-12-06", "DE", now()).is_ok());
    }

    #[test]
    fn age_counts_whole_years_on_the_day() {
        assert_eq!(age_on(date("2008-12-06"), date("2026-12-05")), 17);
        assert_eq!(age_on(date("2008-12-06"), date("2026-12-06")), 18);
        assert_eq!(age_on(date("2008-02-29"), date("2026-02-28")), 17);
        assert_eq!(age_on(date("2008-02-29"), date("2026-03-01")), 18);
        assert_eq!(age_on(date("2030-01-01"), date("2026-03-01")), 0);
    }

    #[test]
    fn eligibility_reads_the_location_and_the_age() {
        let everyone = Eligibility::default();
        assert!(eligible(&everyone, None, today()));
        let germany = Eligibility {
            locations: vec!["DE".into(), "AT".into()],
            min_age: None,
        };
        let adults = Eligibility {
            locations: vec![],
            min_age: Some(18),
        };
        let both = Eligibility {
            locations: vec!["DE".into()],
            min_age: Some(18),
        };
        let profile = |dob: &str, location: &str| Profile::parse("", dob, location, now()).unwrap();
        // No profile, or no field the rule reads: not eligible.
        assert!(!eligible(&germany, None, today()));
        assert!(!eligible(&adults, None, today()));
        assert!(!eligible(
            &germany,
            Some(&profile("1990-01-01", "")),
            today()
        ));
        assert!(!eligible(&adults, Some(&profile("", "DE")), today()));
        assert!(eligible(&germany, Some(&profile("", "de")), today()));
        assert!(!eligible(&germany, Some(&profile("", "FR")), today()));
        assert!(eligible(&adults, Some(&profile("2008-12-06", "")), today()));
        assert!(!eligible(
            &adults,
            Some(&profile("2008-12-07", "")),
            today()
        ));
        assert!(eligible(&both, Some(&profile("1990-01-01", "DE")), today()));
        assert!(!eligible(
            &both,
            Some(&profile("1990-01-01", "FR")),
            today()
        ));
        assert!(!eligible(
            &both,
            Some(&profile("2010-01-01", "DE")),
            today()
        ));
    }

    #[test]
    fn ineligible_batches_are_those_whose_rules_refuse_the_profile() {
        let (a, b, c) = (
            uuid::Uuid::from_u128(1),
            uuid::Uuid::from_u128(2),
            uuid::Uuid::from_u128(3),
        );
        let restricted = vec![
            (
                b,
                Eligibility {
                    locations: vec!["DE".into()],
                    min_age: None,
                },
            ),
            (
                a,
                Eligibility {
                    locations: vec![],
                    min_age: Some(18),
                },
            ),
            (
                c,
                Eligibility {
                    locations: vec!["FR".into()],
                    min_age: Some(18),
                },
            ),
        ];
        let adult_german = Profile::parse("", "1990-01-01", "DE", now()).unwrap();
        assert_eq!(
            ineligible_batches(&restricted, Some(&adult_german), today()),
            vec![c]
        );
        assert_eq!(
            ineligible_batches(&restricted, None, today()),
            vec![a, b, c]
        );
        assert!(ineligible_batches(&[], None, today()).is_empty());
    }

    proptest! {
        /// Eligibility by age is monotone: who is old enough stays so, and
        /// a rule without restrictions admits everyone.
        #[test]
        fn age_rules_are_monotone(dob_days in 0i64..40_000, on_days in 0i64..50_000,
                                  later in 0i64..5_000, min in 1u32..=120) {
            let base = date("1900-01-01");
            let dob = base + chrono::Duration::days(dob_days);
            let on = base + chrono::Duration::days(on_days);
            let rules = Eligibility { locations: vec![], min_age: Some(min) };
            let p = Profile { name: None, dob: Some(dob), location: None };
            if eligible(&rules, Some(&p), on) {
                prop_assert!(eligible(&rules, Some(&p), on + chrono::Duration::days(later)));
            }
            prop_assert!(eligible(&Eligibility::default(), Some(&p), on));
            prop_assert!(age_on(dob, on) <= age_on(dob, on + chrono::Duration::days(later)));
        }

        /// A location rule admits exactly the listed locations, whatever
        /// their case.
        #[test]
        fn location_rules_admit_exactly_their_list(loc in "[A-Za-z]{2}", listed in proptest::collection::vec("[A-Z]{2}", 1..5)) {
            let rules = Eligibility { locations: listed.clone(), min_age: None };
            let p = Profile { name: None, dob: None, location: Some(loc.clone()) };
            let expected = listed.iter().any(|l| l.eq_ignore_ascii_case(&loc));
            prop_assert_eq!(eligible(&rules, Some(&p), date("2026-01-01")), expected);
        }
    }
}
