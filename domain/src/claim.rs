//! How a claim request is decided.
//!
//! The order matters and is the product's rule: a blacklisted user is refused
//! first; a user who still holds a coupon gets *that* coupon again (so retries
//! and double clicks are harmless); a user who already got one this window is
//! rate limited until the window ends; otherwise one available coupon is
//! allocated, or the answer is `sold_out`, which does not use the quota.
//!
//! The adapter gathers [`UserClaimState`] and carries out the allocation
//! atomically; this module only decides.

use chrono::{DateTime, Utc};

use crate::quota::QuotaWindow;
use crate::{Category, CouponCode, RequestId, UserId};

/// A coupon the user holds right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveHold {
    pub code: CouponCode,
    pub category: Category,
    pub expires_at: DateTime<Utc>,
}

/// What the claim processor knows about the user when a request arrives:
/// stored facts only, not judged against any clock. The rules judge them at
/// the request's time, so one read serves every request of a batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserClaimState {
    /// `Some(None)`: blacklisted with no end; `Some(Some(t))`: until `t`.
    pub blacklisted: Option<Option<DateTime<Utc>>>,
    /// The coupon the user holds (status `held`), whether or not its
    /// deadline has passed: an overdue hold stays until something releases
    /// it, and a new grant must release it first.
    pub hold: Option<ActiveHold>,
    /// The start of the newest quota window in which the user was granted
    /// a coupon.
    pub last_grant_window: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    Granted {
        code: CouponCode,
        category: Category,
        expires_at: DateTime<Utc>,
        /// True when this is the user's existing hold returned again.
        repeated: bool,
    },
    RateLimited {
        retry_at: DateTime<Utc>,
    },
    Blacklisted {
        until: Option<DateTime<Utc>>,
    },
    SoldOut,
}

impl ClaimOutcome {
    pub fn kind(&self) -> ClaimOutcomeKind {
        match self {
            Self::Granted { .. } => ClaimOutcomeKind::Granted,
            Self::RateLimited { .. } => ClaimOutcomeKind::RateLimited,
            Self::Blacklisted { .. } => ClaimOutcomeKind::Blacklisted,
            Self::SoldOut => ClaimOutcomeKind::SoldOut,
        }
    }
}

/// Which of the outcomes a claim decision is, without its data: what the
/// `claim_decisions.outcome` column, the metrics and the history name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClaimOutcomeKind {
    Granted,
    RateLimited,
    Blacklisted,
    SoldOut,
}

impl ClaimOutcomeKind {
    pub const ALL: [ClaimOutcomeKind; 4] = [
        Self::Granted,
        Self::RateLimited,
        Self::Blacklisted,
        Self::SoldOut,
    ];

    /// The stable name used in events, metrics, history and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Granted => "granted",
            Self::RateLimited => "rate_limited",
            Self::Blacklisted => "blacklisted",
            Self::SoldOut => "sold_out",
        }
    }
}

text_enum!(ClaimOutcomeKind);

impl std::str::FromStr for ClaimOutcomeKind {
    type Err = crate::UnknownName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| crate::UnknownName {
                what: "claim outcome",
                name: s.to_owned(),
            })
    }
}

/// The decision before touching the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimPrecheck {
    Decided(ClaimOutcome),
    /// Try to take the quota slot for `window_start` and allocate a coupon held
    /// until `hold_until`.
    Allocate {
        window_start: DateTime<Utc>,
        hold_until: DateTime<Utc>,
        /// The user's hold whose deadline has passed but that nothing has
        /// released yet (the expiry is down, or behind). The grant releases
        /// it first: a user holds one coupon at a time, and an overdue hold
        /// must never make a new grant fail.
        releases: Option<ActiveHold>,
    },
}

pub fn precheck(
    state: &UserClaimState,
    now: DateTime<Utc>,
    window: QuotaWindow,
    hold_ttl: std::time::Duration,
) -> ClaimPrecheck {
    if let Some(until) = state.blacklisted {
        if until.is_none_or(|until| until > now) {
            return ClaimPrecheck::Decided(ClaimOutcome::Blacklisted { until });
        }
    }
    if let Some(hold) = &state.hold {
        if hold.expires_at > now {
            return ClaimPrecheck::Decided(ClaimOutcome::Granted {
                code: hold.code,
                category: hold.category.clone(),
                expires_at: hold.expires_at,
                repeated: true,
            });
        }
    }
    let window_start = window.start_of(now);
    // A grant in a later window than `now`'s counts too: a request judged
    // late must not take a second coupon behind a newer one.
    if state
        .last_grant_window
        .is_some_and(|granted| granted >= window_start)
    {
        return ClaimPrecheck::Decided(rate_limited(now, window));
    }
    let ttl = crate::clock::span(hold_ttl);
    ClaimPrecheck::Allocate {
        window_start,
        hold_until: now + ttl,
        releases: state.hold.clone(),
    }
}

/// A claim that passed the rules, as the store needs it to draw a coupon:
/// whose it is, which quota slot it takes, how long its hold lasts, and the
/// time it is judged at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub user_id: UserId,
    pub request_id: RequestId,
    pub window_start: DateTime<Utc>,
    pub hold_until: DateTime<Utc>,
    pub at: DateTime<Utc>,
}

/// What one batch has learned about the pool: once an allocation found
/// nothing (for a category, or for any category), the rest of the batch
/// answers `sold_out` without asking the database again. Nothing returns to
/// the pool inside the batch's transaction, so the answer stays true for
/// the batch; the next batch asks afresh. This makes the tail of a flash
/// sale, where nearly every claim is sold out, cheap.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolKnowledge {
    all_empty: bool,
    empty_categories: std::collections::HashSet<Category>,
}

impl PoolKnowledge {
    /// Whether an allocation for `category` (`None`: any) is known to fail.
    pub fn known_empty(&self, category: Option<&Category>) -> bool {
        self.all_empty || category.is_some_and(|c| self.empty_categories.contains(c))
    }

    /// The pools an allocation found empty (`None`: any category).
    pub fn empty_pools(&self) -> Vec<Option<&Category>> {
        let mut pools: Vec<Option<&Category>> = Vec::new();
        if self.all_empty {
            pools.push(None);
        }
        pools.extend(self.empty_categories.iter().map(Some));
        pools
    }

    /// Records that an allocation for `category` found nothing.
    pub fn record_empty(&mut self, category: Option<&Category>) {
        match category {
            None => self.all_empty = true,
            Some(c) => {
                self.empty_categories.insert(c.clone());
            }
        }
    }
}

/// The claims of one batch that wait for a coupon, grouped by the pool they
/// draw from (`None`: any category; with eligibility, the pool and the
/// campaigns its users may not have), so each pool is asked once per batch.
///
/// Groups come in the order their pool was first asked for, and each group
/// keeps arrival order: the allocation pairs the oldest available coupons
/// with the earliest claims, so a batch is first come, first served just as
/// the sequence of batches is.
pub fn allocation_groups<K: PartialEq, T>(
    waiting: impl IntoIterator<Item = (K, T)>,
) -> Vec<(K, Vec<T>)> {
    let mut groups: Vec<(K, Vec<T>)> = Vec::new();
    for (category, claim) in waiting {
        match groups.iter_mut().find(|(c, _)| *c == category) {
            Some((_, members)) => members.push(claim),
            None => groups.push((category, vec![claim])),
        }
    }
    groups
}

/// The answer when the quota slot for this window is already taken.
pub fn rate_limited(now: DateTime<Utc>, window: QuotaWindow) -> ClaimOutcome {
    ClaimOutcome::RateLimited {
        retry_at: window.end_of(now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn named(name: &str) -> Category {
        Category::parse(name).expect("a category")
    }

    fn code(n: u64) -> CouponCode {
        CouponCode::from_id(crate::SnowflakeId::from_raw(n).unwrap())
    }

    fn category() -> Category {
        Category::parse("x").unwrap()
    }

    fn now() -> DateTime<Utc> {
        "2026-11-25T12:00:00Z".parse().unwrap()
    }

    const TTL: Duration = Duration::from_secs(300);

    #[test]
    fn fresh_user_gets_an_allocation_held_for_the_ttl() {
        let decision = precheck(&UserClaimState::default(), now(), QuotaWindow::DAY, TTL);
        assert_eq!(
            decision,
            ClaimPrecheck::Allocate {
                window_start: "2026-11-25T00:00:00Z".parse().unwrap(),
                hold_until: "2026-11-25T12:05:00Z".parse().unwrap(),
                releases: None,
            }
        );
    }

    #[test]
    fn blacklist_wins_over_everything_until_it_ends() {
        let hold = ActiveHold {
            code: code(1),
            category: category(),
            expires_at: now() + chrono::Duration::minutes(1),
        };
        let mut state = UserClaimState {
            blacklisted: Some(None),
            hold: Some(hold),
            last_grant_window: Some(QuotaWindow::DAY.start_of(now())),
        };
        assert_eq!(
            precheck(&state, now(), QuotaWindow::DAY, TTL),
            ClaimPrecheck::Decided(ClaimOutcome::Blacklisted { until: None })
        );
        state.blacklisted = Some(Some(now() - chrono::Duration::seconds(1)));
        assert!(matches!(
            precheck(&state, now(), QuotaWindow::DAY, TTL),
            ClaimPrecheck::Decided(ClaimOutcome::Granted { repeated: true, .. })
        ));
    }

    #[test]
    fn an_empty_pool_is_empty_for_every_category_but_not_the_reverse() {
        let (books, toys) = (named("Books"), named("Toys"));
        let mut pool = PoolKnowledge::default();
        assert!(!pool.known_empty(None));
        pool.record_empty(Some(&books));
        assert!(pool.known_empty(Some(&books)));
        assert!(!pool.known_empty(Some(&toys)));
        assert!(
            !pool.known_empty(None),
            "Books being gone says nothing about the rest"
        );
        pool.record_empty(None);
        assert!(pool.known_empty(Some(&toys)));
        assert!(pool.known_empty(None));
    }

    #[test]
    fn allocation_groups_keep_first_asked_order_and_arrival_order() {
        let waiting = [
            (Some(named("Toys")), 1),
            (None, 2),
            (Some(named("Toys")), 3),
            (Some(named("Books")), 4),
            (None, 5),
        ];
        assert_eq!(
            allocation_groups(waiting),
            vec![
                (Some(named("Toys")), vec![1, 3]),
                (None, vec![2, 5]),
                (Some(named("Books")), vec![4]),
            ]
        );
    }

    proptest::proptest! {
        #[test]
        fn allocation_groups_lose_nothing_and_keep_arrival_order(
            categories in proptest::collection::vec(proptest::option::of(0u8..4), 0..60)
        ) {
            let waiting: Vec<(Option<Category>, usize)> = categories
                .iter()
                .enumerate()
                .map(|(i, c)| (c.map(|c| named(&format!("c{c}"))), i))
                .collect();
            let groups = allocation_groups(waiting.clone());
            let mut seen: Vec<usize> = groups.iter().flat_map(|(_, m)| m.clone()).collect();
            seen.sort_unstable();
            proptest::prop_assert_eq!(seen, (0..waiting.len()).collect::<Vec<_>>());
            for (category, members) in &groups {
                proptest::prop_assert!(members.windows(2).all(|w| w[0] < w[1]));
                proptest::prop_assert!(members.iter().all(|&i| &waiting[i].0 == category));
            }
            let firsts: Vec<usize> = groups.iter().map(|(_, m)| m[0]).collect();
            proptest::prop_assert!(firsts.windows(2).all(|w| w[0] < w[1]));
        }
    }

    #[test]
    fn expired_hold_with_used_quota_is_rate_limited_until_the_window_ends() {
        let state = UserClaimState {
            blacklisted: None,
            hold: Some(ActiveHold {
                code: code(1),
                category: category(),
                expires_at: now(),
            }),
            last_grant_window: Some(QuotaWindow::DAY.start_of(now())),
        };
        assert_eq!(
            precheck(&state, now(), QuotaWindow::DAY, TTL),
            ClaimPrecheck::Decided(ClaimOutcome::RateLimited {
                retry_at: "2026-11-26T00:00:00Z".parse().unwrap()
            })
        );
    }

    #[test]
    fn an_overdue_hold_in_a_new_window_is_released_by_the_grant() {
        let window = QuotaWindow::new(Duration::from_secs(60)).unwrap();
        let overdue = ActiveHold {
            code: code(2),
            category: category(),
            expires_at: now() - chrono::Duration::seconds(30),
        };
        let state = UserClaimState {
            blacklisted: None,
            hold: Some(overdue.clone()),
            last_grant_window: Some(window.start_of(now() - chrono::Duration::seconds(60))),
        };
        assert_eq!(
            precheck(&state, now(), window, TTL),
            ClaimPrecheck::Allocate {
                window_start: now(),
                hold_until: now() + chrono::Duration::seconds(300),
                releases: Some(overdue),
            }
        );
    }

    #[test]
    fn a_grant_in_a_later_window_than_the_request_still_uses_the_quota() {
        let state = UserClaimState {
            last_grant_window: Some(QuotaWindow::DAY.end_of(now())),
            ..UserClaimState::default()
        };
        assert!(matches!(
            precheck(&state, now(), QuotaWindow::DAY, TTL),
            ClaimPrecheck::Decided(ClaimOutcome::RateLimited { .. })
        ));
    }

    proptest::proptest! {
        /// Whatever the stored facts and the time, the rules never allocate
        /// while the user holds a live coupon or has used this window, and
        /// every allocation releases whatever (overdue) hold the user has.
        #[test]
        fn allocation_never_collides_with_a_hold_or_the_quota(
            hold_offset in proptest::option::of(-7_200i64..7_200),
            grant_offset in proptest::option::of(-3i64..3),
            window_secs in 1u64..7_200,
        ) {
            let window = QuotaWindow::new(Duration::from_secs(window_secs)).unwrap();
            let hold = hold_offset.map(|s| ActiveHold {
                code: code(3),
                category: category(),
                expires_at: now() + chrono::Duration::seconds(s),
            });
            let last_grant_window = grant_offset.map(|k| {
                window.start_of(now()) + chrono::Duration::seconds(k * window_secs as i64)
            });
            let state = UserClaimState { blacklisted: None, hold: hold.clone(), last_grant_window };
            if let ClaimPrecheck::Allocate { window_start, releases, .. } =
                precheck(&state, now(), window, TTL)
            {
                proptest::prop_assert!(hold.as_ref().is_none_or(|h| h.expires_at <= now()));
                proptest::prop_assert!(last_grant_window.is_none_or(|w| w < window_start));
                proptest::prop_assert_eq!(releases, hold);
            }
        }
    }
}
