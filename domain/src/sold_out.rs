//! Sold out at the speed of a cache read: when the gateway may answer a
//! claim `sold_out` by itself, without asking the claim processor.
//!
//! A pool (one category, or any category) is *marked* sold out by the claim
//! processor when an allocation from it found nothing. Every mark carries
//! the *supply version* the processor read before its allocation statement
//! started; anything that makes coupons available (a new batch projected, a
//! hold released) sets a new supply version after its commit. So a mark is
//! current exactly when its version is still the supply version: a release
//! that committed after the processor looked invalidates the mark, whatever
//! order the two Redis writes land in. (The processor reads the version
//! *before* its statement's snapshot: a supply whose new version it read
//! had committed before that snapshot, so the statement saw its coupons.)
//!
//! The gateway answers `sold_out` at once only when the claim's pool is
//! marked (a category is also empty when the whole pool is) and nothing
//! about the user could make the processor answer otherwise in a way the
//! user must see: a user who holds a coupon gets that coupon back (the
//! processor returns it), a blocked user gets `403`, and a user whose quota
//! this window is used gets `429` with its retry time (the quota is checked
//! before the pool). Everything else, including any doubt (Redis
//! unreachable), takes the normal path.
//!
//! Those user facts are read as absent keys, which proves nothing of a
//! cache that lost data. So the supply version is also the cache's proof
//! of completeness: it exists only once the holds and used quotas were
//! refilled since the cache was last empty, and without it no mark is
//! current.
//!
//! Campaigns (`crate::campaign`) make supply appear without any write: a
//! batch whose window opens later is stored (and projected) at once, but
//! its coupons are not claimable, so they are no supply, until `valid_from`.
//! Nothing commits at that instant to set a new supply version, so a mark
//! instead never outlives the next opening: the processor writes it with a
//! time to live of at most the time until the earliest `valid_from` after
//! the time the pool was judged empty ([`mark_ttl`]), and a mark past it is
//! gone, so the gateway asks. An opening that came between that judgement
//! and the mark's write (a claim sent just before a campaign opened,
//! decided just after) leaves no time at all: no mark is written. (A window's end only takes supply away: marks
//! stay correct, they may only come later.)
//!
//! Eligibility (`crate::profile`) makes a pool look empty to some users
//! only: a user who may not have a campaign's coupons is allocated from the
//! pool without them, and finding nothing there says nothing about the
//! coupons other users may have. A mark is a claim about everyone, so only
//! an allocation that left no campaign out may be recorded or marked
//! ([`proves_empty`]); otherwise one ineligible user's `sold_out` would be
//! every eligible user's answer until the mark expired.

/// What the gateway read about one claim, in one round trip.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FastPathFacts {
    /// The supply version (`None`: absent, the cache is not known to be
    /// complete).
    pub version: Option<String>,
    /// The version in the "any category" pool's sold-out mark, if marked.
    pub any_mark: Option<String>,
    /// The version in the requested category's mark (`None` without a
    /// category, or unmarked).
    pub category_mark: Option<String>,
    /// The user holds a coupon (the holds cache has one).
    pub holds_coupon: bool,
    /// The user is blocked (blacklisted) in the cache.
    pub blocked: bool,
    /// The user's quota for the current window is used (the cache has the
    /// mark the processor writes with a grant or a `rate_limited` answer).
    pub quota_used: bool,
}

/// The gateway's choice for one claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FastPath {
    /// Answer `sold_out` now; publish the claim flagged as answered.
    SoldOut,
    /// Publish the claim and wait for the processor's decision.
    Ask,
}

/// Whether the pool a claim draws from (`category_mark` for its category,
/// `any_mark` for the whole pool) is currently marked sold out: its mark
/// carries the supply version, and there is one.
pub fn pool_sold_out(facts: &FastPathFacts) -> bool {
    let Some(version) = facts.version.as_deref().filter(|v| !v.is_empty()) else {
        return false;
    };
    let current = |mark: &Option<String>| mark.as_deref() == Some(version);
    current(&facts.any_mark) || current(&facts.category_mark)
}

/// The gateway's rule: sold out now only for a marked pool and a user
/// who neither holds a coupon, nor is blocked, nor has used the quota.
pub fn fast_path(facts: &FastPathFacts) -> FastPath {
    if !facts.holds_coupon && !facts.blocked && !facts.quota_used && pool_sold_out(facts) {
        FastPath::SoldOut
    } else {
        FastPath::Ask
    }
}

/// How long a sold-out mark may live: `max` (the safety net), but never
/// past the next campaign opening, `until_opening` from now (see the module
/// doc). `None`: an opening is due now, write no mark.
pub fn mark_ttl(
    max: std::time::Duration,
    until_opening: Option<chrono::Duration>,
) -> Option<std::time::Duration> {
    match until_opening {
        None => Some(max),
        Some(left) => match left.to_std() {
            Ok(left) if !left.is_zero() => Some(left.min(max)),
            _ => None,
        },
    }
}

/// Whether a mark that claims are being answered from is due for renewal,
/// `since_last` after this process last renewed it (`None`: never): at most
/// every quarter of its time to live `ttl`. Often enough that it never
/// lapses while claims keep coming (three renewals fit in a TTL), and no
/// more: a renewal is four round trips (the supply version, the pool probe,
/// the next opening, the write), which a busy processor would otherwise pay
/// on every batch of a sale (issue #27: 37 batches a second in the steady
/// sale, each renewing a mark good for 10 s).
pub fn renewal_due(since_last: Option<std::time::Duration>, ttl: std::time::Duration) -> bool {
    since_last.is_none_or(|since| since >= ttl / 4)
}

/// Whether an allocation that found nothing proves its pool empty for
/// every user, so that it may be remembered and marked sold out: only when
/// it left out no campaign (`left_out`: how many restricted campaigns its
/// users may not have).
pub fn proves_empty(left_out: usize) -> bool {
    left_out == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_is_renewed_at_most_every_quarter_of_its_ttl() {
        let ttl = std::time::Duration::from_secs(10);
        let ms = std::time::Duration::from_millis;
        assert!(renewal_due(None, ttl));
        assert!(!renewal_due(Some(ms(0)), ttl));
        assert!(!renewal_due(Some(ms(2_499)), ttl));
        assert!(renewal_due(Some(ms(2_500)), ttl));
        // Three renewals fit in a TTL: the mark never lapses between them.
        assert!(3 * (ttl / 4) < ttl);
    }

    #[test]
    fn only_an_allocation_over_the_whole_pool_proves_it_empty() {
        assert!(proves_empty(0));
        assert!(!proves_empty(1));
        assert!(!proves_empty(7));
    }

    fn marked(version: Option<&str>, any: Option<&str>, category: Option<&str>) -> FastPathFacts {
        FastPathFacts {
            version: version.map(str::to_owned),
            any_mark: any.map(str::to_owned),
            category_mark: category.map(str::to_owned),
            ..FastPathFacts::default()
        }
    }

    #[test]
    fn a_user_past_the_quota_is_asked_for_the_rate_limit_answer() {
        let mut facts = marked(Some("v1"), Some("v1"), None);
        assert_eq!(fast_path(&facts), FastPath::SoldOut);
        facts.quota_used = true;
        assert_eq!(fast_path(&facts), FastPath::Ask);
    }

    #[test]
    fn a_current_mark_answers_sold_out() {
        assert_eq!(
            fast_path(&marked(Some("v1"), Some("v1"), None)),
            FastPath::SoldOut
        );
        assert_eq!(
            fast_path(&marked(Some("v1"), None, Some("v1"))),
            FastPath::SoldOut
        );
    }

    #[test]
    fn a_mark_from_before_the_last_release_is_void() {
        assert_eq!(
            fast_path(&marked(Some("v2"), Some("v1"), Some("v1"))),
            FastPath::Ask
        );
    }

    #[test]
    fn no_mark_asks_the_processor() {
        assert_eq!(fast_path(&marked(Some("v1"), None, None)), FastPath::Ask);
        assert_eq!(fast_path(&FastPathFacts::default()), FastPath::Ask);
    }

    #[test]
    fn without_a_supply_version_nothing_is_sold_out() {
        // A cache that lost its data: whatever marks were written since,
        // the users' holds and quotas may be missing from it.
        for any in [None, Some(""), Some("0"), Some("v1")] {
            for category in [None, Some(""), Some("v1")] {
                assert_eq!(fast_path(&marked(None, any, category)), FastPath::Ask);
                assert_eq!(fast_path(&marked(Some(""), any, category)), FastPath::Ask);
            }
        }
    }

    #[test]
    fn holders_and_blocked_users_always_ask() {
        let mut facts = marked(Some("v"), Some("v"), None);
        facts.holds_coupon = true;
        assert_eq!(fast_path(&facts), FastPath::Ask);
        facts.holds_coupon = false;
        facts.blocked = true;
        assert_eq!(fast_path(&facts), FastPath::Ask);
    }

    #[test]
    fn a_mark_never_outlives_the_next_campaign_opening() {
        use std::time::Duration;
        let max = Duration::from_secs(30);
        assert_eq!(mark_ttl(max, None), Some(max));
        assert_eq!(
            mark_ttl(max, Some(chrono::Duration::milliseconds(1500))),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(mark_ttl(max, Some(chrono::Duration::hours(1))), Some(max));
        assert_eq!(mark_ttl(max, Some(chrono::Duration::zero())), None);
        assert_eq!(mark_ttl(max, Some(chrono::Duration::seconds(-1))), None);
    }
}
