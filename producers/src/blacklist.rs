//! The blacklist lives on `users` in Postgres, where the claim processor
//! checks it. Manual entries come from `couponctl blacklist`; automatic ones
//! from the gateway's flood control. An automatic entry never shortens a
//! manual one.
//!
//! Every change is also an event on `<prefix>.blacklist` (`BlacklistChanged`,
//! keyed by user), so a database rebuilt from the log refuses the same users.
//! The event carries the entry as it stands *after* the change (the outcome,
//! not the request). It reaches the log only with its commit, and always
//! with it (a transactional outbox, `blacklist_outbox`):
//!
//! - the change writes its event, encoded with its envelope, into the
//!   outbox in the transaction that changes `users`. A transaction that
//!   fails (at any statement, or at its commit) leaves neither: nothing is
//!   published that Postgres did not make;
//! - after the commit the change publishes its user's waiting events, and
//!   deletes them once the broker confirmed. A publish that fails (or takes
//!   longer than [`PUBLISH_WAIT`]: the caller is answered, the change is
//!   made) leaves the row; the relay ([`Blacklist::upkeep`], run by every
//!   serving process) publishes it later. A change on the log is therefore
//!   a change Postgres made, and every change Postgres made reaches the log;
//! - a row published twice (confirmed, but the process died before
//!   deleting it; or a timed-out send that librdkafka still delivered) is
//!   the same record with the same event id: the rebuild and the audit drop
//!   the second copy;
//! - the user's row lock is held from the write until the commit, and the
//!   outbox row is numbered (`seq`) under that lock, so `seq` is the commit
//!   order of one user's changes; the events of a user are published in
//!   `seq` order, the pending rows locked while they are, and a failed one
//!   stops the rest (a later change never overtakes an earlier one on the
//!   log, where the last change of a user is the one that counts).
//!
//! Entries with an end are lifted when it has passed ([`Blacklist::upkeep`]):
//! the claim processor already treats them as over, but the row, the
//! console's list and the log would otherwise keep them for ever; the lift
//! is a change like any other (source `expired`), so a rebuild agrees.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use coupon_domain::{EmployeeId, UserId};
use coupon_platform::kafka::{PublishError, Publisher};
use coupon_platform::store::users;
use coupon_platform::time::to_ms;
use coupon_platform::Topics;
use coupon_schemas::BlacklistChanged;
use prost::Message as _;

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
    /// The entry's end passed ([`Blacklist::upkeep`] lifted it).
    Expired,
}

impl<'a> Source<'a> {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Manual(_) => "manual",
            Source::Automatic => "automatic",
            Source::Expired => "expired",
        }
    }

    /// Who made the change (none: the flood control, or the entry's end).
    pub fn author(self) -> Option<&'a EmployeeId> {
        match self {
            Source::Manual(by) => Some(by),
            Source::Automatic | Source::Expired => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BlacklistError {
    #[error("changing the blacklist in Postgres: {0}")]
    Database(#[from] sqlx::Error),
    #[error("putting committed blacklist changes on the log (the relay retries): {0}")]
    Publish(#[from] PublishError),
    #[error(
        "the broker did not confirm a committed blacklist change within {0:?} (the relay retries)"
    )]
    NotConfirmed(Duration),
}

/// How long a change waits for its event's delivery after the commit before
/// it answers anyway (the relay publishes what is left).
pub const PUBLISH_WAIT: Duration = Duration::from_secs(5);

/// How long the relay waits for one change's delivery (the producer's own
/// `message.timeout.ms`).
const RELAY_WAIT: Duration = Duration::from_secs(30);

/// Outbox rows published per relay transaction.
const RELAY_BATCH: i64 = 500;

/// Expired entries lifted per upkeep transaction.
const LIFT_BATCH: i64 = 500;

/// What one [`Blacklist::upkeep`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Upkeep {
    /// Entries lifted because their end had passed.
    pub lifted: usize,
    /// Waiting changes put on the log.
    pub published: usize,
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
        queue(&mut tx, user_id, event).await?;
        tx.commit().await?;
        self.publish_committed(user_id).await;
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
        queue(&mut tx, user_id, event).await?;
        tx.commit().await?;
        self.publish_committed(user_id).await;
        Ok(true)
    }

    /// After a commit: puts `user_id`'s waiting changes on the log, waiting
    /// at most [`PUBLISH_WAIT`] (for the broker, or for a relay publishing
    /// them already). A failure is logged, not returned: the change is
    /// made, and the relay publishes it.
    async fn publish_committed(&self, user_id: &UserId) {
        let publishing = self.publish_pending(Some(user_id), PUBLISH_WAIT);
        let error = match tokio::time::timeout(PUBLISH_WAIT, publishing).await {
            Ok(Ok(_)) => return,
            Ok(Err(error)) => error,
            // Dropped mid-way: its transaction rolls back, the rows stay.
            Err(_) => BlacklistError::NotConfirmed(PUBLISH_WAIT),
        };
        tracing::warn!(
            user = %user_id, %error,
            "a blacklist change is committed but not yet on the log; the relay publishes it"
        );
    }

    /// Publishes the committed changes waiting in the outbox (only
    /// `user_id`'s, when given), oldest first, and deletes each one the
    /// broker confirmed. Stops at the first send that failed or was not
    /// confirmed within `wait` (it may still be delivered: its copy from the
    /// next attempt has the same event id), so no later change of a user
    /// overtakes it. Returns how many were published.
    pub async fn publish_pending(
        &self,
        user_id: Option<&UserId>,
        wait: Duration,
    ) -> Result<usize, BlacklistError> {
        let topic = self.topics.blacklist();
        let mut published = 0;
        loop {
            let mut tx = self.pool.begin().await?;
            let rows = users::outbox_pending(&mut tx, user_id, RELAY_BATCH).await?;
            let mut done = Vec::with_capacity(rows.len());
            let mut failed = None;
            for row in &rows {
                let key = row.user_id.as_str().as_bytes();
                let sent = self.publisher.send_bytes(&topic, Some(key), &row.payload);
                match tokio::time::timeout(wait, sent).await {
                    Ok(Ok(_)) => done.push(row.seq),
                    Ok(Err(error)) => {
                        failed = Some(BlacklistError::Publish(error));
                        break;
                    }
                    Err(_) => {
                        failed = Some(BlacklistError::NotConfirmed(wait));
                        break;
                    }
                }
            }
            users::outbox_done(&mut tx, &done).await?;
            tx.commit().await?;
            published += done.len();
            if let Some(error) = failed {
                return Err(error);
            }
            if (rows.len() as i64) < RELAY_BATCH {
                return Ok(published);
            }
        }
    }

    /// The periodic upkeep of the blacklist: lifts the entries whose end has
    /// passed (each lift a change with its event, source `expired`), then
    /// publishes every change still waiting for the log (the relay).
    pub async fn upkeep(&self) -> Result<Upkeep, BlacklistError> {
        let mut lifted = 0;
        loop {
            let mut tx = self.pool.begin().await?;
            let users = users::lift_expired(&mut tx, LIFT_BATCH).await?;
            for user_id in &users {
                let event = change_event(self.publisher, user_id, None, Source::Expired);
                queue(&mut tx, user_id, event).await?;
            }
            tx.commit().await?;
            lifted += users.len();
            if (users.len() as i64) < LIFT_BATCH {
                break;
            }
        }
        let published = self.publish_pending(None, RELAY_WAIT).await?;
        Ok(Upkeep { lifted, published })
    }
}

/// Writes `event` into the outbox in the change's transaction, with an event
/// id of its own that every publish of it keeps.
async fn queue(
    conn: &mut sqlx::PgConnection,
    user_id: &UserId,
    mut event: BlacklistChanged,
) -> Result<(), sqlx::Error> {
    let event_id = uuid::Uuid::new_v4();
    if let Some(envelope) = event.envelope.as_mut() {
        envelope.event_id = event_id.to_string();
    }
    users::outbox_add(conn, event_id, user_id, &event.encode_to_vec()).await
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
