//! The profiles processor: `coupons.users` (`UserProfileUpdated`) → the
//! `name`, `dob` and `location` of `users` (issue #28 item 6), which the
//! claim processor's eligibility reads.
//!
//! The log is the source of truth: the gateway's `PUT /api/v1/users/{id}`
//! only publishes, as a storefront publishing straight to Kafka does, so this
//! role is the one writer of profiles and a rebuild from the log gets the
//! same rows.
//!
//! Delivery guarantee: at least once, effect exactly once. Of two events for
//! one user, the one with the later `updated_at_ms` (then the larger event
//! id) wins, in the batch ([`latest_per_user`]) and against the stored row
//! (the upsert's condition), so a redelivered, replayed or late event changes
//! nothing, whatever order events arrive in. An undecodable record or an
//! invalid profile (unparsable user id, a date of birth in the future, a
//! name too long, an `updated_at_ms` far ahead of the record) goes to the
//! dead-letter topic with its reason. Offsets are stored after the commit.

use chrono::{DateTime, Utc};

use coupon_domain::{Profile, UserId};
use coupon_platform::kafka::consumer::{stable_time_ms, BatchError};
use coupon_platform::kafka::role::{self, dead_letter_all, Decoded};
use coupon_platform::kafka::Record;
use coupon_schemas::UserProfileUpdated;

pub use coupon_platform::store::users::ProfileUpdate;

use crate::{Context, Role};

pub const ROLE: Role = Role::Profiles;

/// How far a profile's `updated_at_ms` may lie ahead of its record's time: a
/// clock a little fast is fine, a time years ahead would make the event win
/// over every later one.
pub const MAX_AHEAD_MS: i64 = 5 * 60 * 1000;

/// The profile an event sets, or why it is refused. Judged on the event's
/// own times (`updated_at_ms`, else the envelope's, else the record's), so a
/// replay years later decides the same.
pub fn update_of(event: &UserProfileUpdated, record: &Record) -> Result<ProfileUpdate, String> {
    let user_id = UserId::parse(event.user_id.clone()).map_err(|e| e.to_string())?;
    let envelope = event.envelope.as_ref();
    let record_ms = stable_time_ms(record, envelope.map(|e| e.occurred_at_ms));
    let updated_ms = match event.updated_at_ms {
        0 => record_ms,
        ms if ms > record_ms + MAX_AHEAD_MS => {
            return Err(format!(
                "updated_at_ms {ms} lies more than {MAX_AHEAD_MS} ms after the record's time {record_ms}"
            ))
        }
        ms => ms,
    };
    let updated_at = DateTime::<Utc>::from_timestamp_millis(updated_ms)
        .ok_or_else(|| format!("updated_at_ms {updated_ms} is not a time"))?;
    let profile = Profile::parse(&event.name, &event.dob, &event.location, updated_at)
        .map_err(|e| e.to_string())?;
    let event_id = envelope
        .map(|e| e.event_id.clone())
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| format!("{}-{}-{}", record.topic, record.partition, record.offset));
    Ok(ProfileUpdate {
        user_id,
        profile,
        updated_at,
        event_id,
    })
}

/// Each user's latest update of `updates` (by time, then event id): one row
/// per user for the batch's single upsert.
pub fn latest_per_user(updates: Vec<ProfileUpdate>) -> Vec<ProfileUpdate> {
    let mut latest: std::collections::HashMap<UserId, ProfileUpdate> =
        std::collections::HashMap::new();
    for update in updates {
        match latest.get(&update.user_id) {
            Some(kept)
                if (&kept.updated_at, &kept.event_id) >= (&update.updated_at, &update.event_id) => {
            }
            _ => {
                latest.insert(update.user_id.clone(), update);
            }
        }
    }
    let mut out: Vec<ProfileUpdate> = latest.into_values().collect();
    out.sort_by(|a, b| a.user_id.as_str().cmp(b.user_id.as_str()));
    out
}

pub async fn handle_events(
    ctx: &Context,
    batch: &[Decoded<UserProfileUpdated>],
) -> Result<(), BatchError> {
    let split = role::split(batch, |record, event| update_of(event, record));
    let updates = latest_per_user(split.accepted.into_iter().map(|(_, u)| u).collect());
    if !updates.is_empty() {
        let mut conn = ctx.pool.acquire().await?;
        let written = coupon_platform::store::users::upsert_profiles(&mut conn, &updates).await?;
        metrics::counter!("coupon_profiles_projected_total").increment(written);
    }
    dead_letter_all(&ctx.dead_letters(ROLE), &split.refused).await
}

crate::role_handler!(ROLE, UserProfileUpdated);

#[cfg(test)]
mod tests {
    use super::*;

    fn record(ms: i64) -> Record {
        Record {
            topic: "t.users".into(),
            partition: 0,
            offset: 7,
            key: None,
            value: None,
            timestamp_ms: Some(ms),
        }
    }

    const T: i64 = 1_780_000_000_000;

    fn event(user: &str, dob: &str, updated: i64, id: &str) -> UserProfileUpdated {
        UserProfileUpdated {
            envelope: Some(coupon_schemas::new_envelope::<UserProfileUpdated>(
                id.into(),
                T,
                "test",
                "",
            )),
            user_id: user.into(),
            name: "Ada".into(),
            dob: dob.into(),
            location: "DE".into(),
            updated_at_ms: updated,
        }
    }

    #[test]
    fn events_are_validated_on_their_own_time() {
        let ok = update_of(&event("u1", "1990-01-01", T, "e1"), &record(T)).unwrap();
        assert_eq!(ok.updated_at.timestamp_millis(), T);
        assert_eq!(ok.event_id, "e1");
        // No updated_at: the record's time.
        let ok = update_of(&event("u1", "", 0, "e1"), &record(T + 5)).unwrap();
        assert_eq!(ok.updated_at.timestamp_millis(), T + 5);
        assert!(update_of(&event("", "1990-01-01", T, "e1"), &record(T)).is_err());
        let future = update_of(&event("u1", "2099-01-01", T, "e1"), &record(T)).unwrap_err();
        assert!(future.contains("dob"), "{future}");
        let ahead = update_of(&event("u1", "", T + MAX_AHEAD_MS + 1, "e1"), &record(T));
        assert!(ahead.is_err());
    }

    #[test]
    fn the_latest_update_of_each_user_wins_in_a_batch() {
        let at = |ms: i64, id: &str, user: &str| {
            update_of(&event(user, "", ms, id), &record(T)).unwrap()
        };
        let kept = latest_per_user(vec![
            at(T - 10, "b", "u1"),
            at(T - 20, "c", "u1"),
            at(T - 10, "a", "u1"),
            at(T - 30, "z", "u2"),
        ]);
        assert_eq!(kept.len(), 2);
        assert_eq!(
            (kept[0].event_id.as_str(), kept[1].event_id.as_str()),
            ("b", "z")
        );
    }
}
