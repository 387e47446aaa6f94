//! The blacklist lives on `users` in Postgres, where the claim processor
//! checks it. Manual entries come from `couponctl blacklist`; automatic ones
//! from the gateway's flood control. An automatic entry never shortens a
//! manual one.
//!
//! Every change is also an event on `<prefix>.blacklist` (`BlacklistChanged`,
//! keyed by user), so a database rebuilt from the log refuses the same users.
//! The event carries the entry as it stands *after* the change (the outcome,
//! not the request), and is published inside the Postgres transaction that
//! makes the change, before its commit:
//!
//! - the row stays locked until the commit, so two changes of one user reach
//!   the log (one partition: the key is the user) in the order they commit;
//! - a failed publish rolls the change back: no entry exists only in
//!   Postgres. The one gap left is a commit that fails after the publish
//!   (the log then has a change Postgres lacks); the caller gets the error,
//!   and `couponctl audit` shows the user until the change is made again.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use coupon_domain::{EmployeeId, UserId};
use coupon_platform::kafka::{PublishError, Publisher};
use coupon_platform::store::users;
use coupon_platform::time::to_ms;
use coupon_platform::Topics;
use coupon_schemas::BlacklistChanged;

pub use coupon_platform::store::users::BlacklistEntry;

/// Who changed an entry; written into the event (`source`, and the
/// author as `changed_by`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source<'a> {
    /// A person: the employee of an admin call's credential (the console's
    /// routes), or the operator running `couponctl blacklist`.
    Manual(&'a EmployeeId),
    /// The gateway's flood control.
    Automatic,
}

impl<'a> Source<'a> {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Manual(_) => "manual",
            Source::Automatic => "automatic",
        }
    }

    /// Who made the change (none: the flood control).
    pub fn author(self) -> Option<&'a EmployeeId> {
        match self {
            Source::Manual(by) => Some(by),
            Source::Automatic => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BlacklistError {
    #[error("changing the blacklist in Postgres: {0}")]
    Database(#[from] sqlx::Error),
    #[error("putting the blacklist change on the log (nothing was changed): {0}")]
    Publish(#[from] PublishError),
}

/// Where blacklist changes go: Postgres, and the log.
#[derive(Clone, Copy)]
pub struct Blacklist<'a> {
    pub pool: &'a PgPool,
    pub publisher: &'a Publisher,
    pub topics: &'a Topics,
}

/// The event for `user_id`'s entry after a change (`None`: lifted). No I/O.
pub fn change_event(
    publisher: &Publisher,
    user_id: &UserId,
    entry: Option<&BlacklistEntry>,
    source: Source,
) -> BlacklistChanged {
    BlacklistChanged {
        envelope: Some(publisher.envelope::<BlacklistChanged>("")),
        user_id: user_id.to_string(),
        blacklisted: entry.is_some(),
        blacklisted_until_ms: entry
            .and_then(|e| e.blacklisted_until)
            .map(to_ms)
            .unwrap_or(0),
        reason: entry
            .and_then(|e| e.blacklist_reason.clone())
            .unwrap_or_default(),
        blacklisted_at_ms: entry.and_then(|e| e.blacklisted_at).map(to_ms).unwrap_or(0),
        source: source.as_str().to_owned(),
        changed_by: source.author().map(|by| by.to_string()).unwrap_or_default(),
    }
}

impl Blacklist<'_> {
    /// Blacklists a user until `until` (`None`: indefinitely), extending any
    /// existing entry, never shortening it. Returns the entry as it now is.
    ///
    /// An [`Source::Automatic`] block only writes when the user has no
    /// current entry: it never overwrites an operator's entry (its reason,
    /// its time), and changes nothing (no event) when one exists.
    pub async fn add(
        &self,
        user_id: &UserId,
        until: Option<DateTime<Utc>>,
        reason: &str,
        source: Source<'_>,
    ) -> Result<BlacklistEntry, BlacklistError> {
        let mut tx = self.pool.begin().await?;
        let written =
            users::blacklist(&mut tx, user_id, until, reason, source == Source::Automatic).await?;
        let Some(entry) = written else {
            // An automatic block of a user with a current entry: keep it.
            let current = users::blacklist_entry(&mut tx, user_id).await?;
            return Ok(current);
        };
        let event = change_event(self.publisher, user_id, Some(&entry), source);
        self.publisher
            .send(&self.topics.blacklist(), user_id.as_str(), &event)
            .await?;
        tx.commit().await?;
        Ok(entry)
    }

    /// Lifts a blacklisting. Returns whether the user was blacklisted (no
    /// event when not).
    pub async fn remove(
        &self,
        user_id: &UserId,
        source: Source<'_>,
    ) -> Result<bool, BlacklistError> {
        let mut tx = self.pool.begin().await?;
        let lifted = users::lift_blacklist(&mut tx, user_id).await?;
        if !lifted {
            return Ok(false);
        }
        let event = change_event(self.publisher, user_id, None, source);
        self.publisher
            .send(&self.topics.blacklist(), user_id.as_str(), &event)
            .await?;
        tx.commit().await?;
        Ok(true)
    }
}

/// Current entries (expired ones are left out).
pub async fn list(pool: &PgPool) -> Result<Vec<BlacklistEntry>, sqlx::Error> {
    users::blacklist_entries(pool).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use coupon_platform::KafkaSettings;

    #[test]
    fn the_event_carries_the_entry_after_the_change() {
        // Creating a producer does not connect.
        let publisher = Publisher::new(&KafkaSettings::new("127.0.0.1:1"), "test").unwrap();
        let at = Utc.timestamp_millis_opt(1_795_564_800_123).unwrap();
        let mallory = UserId::parse("mallory").unwrap();
        let entry = BlacklistEntry {
            user_id: mallory.clone(),
            blacklisted_until: Some(at + chrono::Duration::hours(1)),
            blacklist_reason: Some("fraud".into()),
            blacklisted_at: Some(at),
        };
        let alice = EmployeeId::parse("alice").unwrap();
        let added = change_event(&publisher, &mallory, Some(&entry), Source::Manual(&alice));
        assert!(added.blacklisted);
        assert_eq!(added.blacklisted_until_ms, 1_795_568_400_123);
        assert_eq!(added.blacklisted_at_ms, 1_795_564_800_123);
        assert_eq!(
            (added.reason.as_str(), added.source.as_str()),
            ("fraud", "manual")
        );
        assert_eq!(added.changed_by, "alice");
        let forever = BlacklistEntry {
            blacklisted_until: None,
            ..entry
        };
        let added = change_event(&publisher, &mallory, Some(&forever), Source::Automatic);
        assert_eq!(added.blacklisted_until_ms, 0, "0 = until removed");
        assert_eq!(added.changed_by, "", "the flood control is no one");
        let lifted = change_event(&publisher, &mallory, None, Source::Manual(&alice));
        assert_eq!(lifted.changed_by, "alice");
        assert!(!lifted.blacklisted);
        assert_eq!(lifted.reason, "");
        assert_eq!(
            lifted.envelope.unwrap().event_type,
            "coupons.v1.BlacklistChanged"
        );
    }
}
