//! Audit: rebuild the state from the log into a scratch database and compare
//! it with the live database: coupons, users (`last_coupon_at`, the
//! blacklist and the profile), quota slots and stored claim and purchase decisions, that is
//! everything that decides a later request.
//!
//! Only what the live consumers have finished counts. The cut is each live
//! consumer group's committed offsets, read (before the log's ends are
//! snapshotted) by a client that has the group's id but never subscribes,
//! assigns or commits:
//!
//! - `created` below `<prefix>.coupons-processor`'s offsets and `expirations`
//!   below `<prefix>.expiry-processor`'s are applied; the coupons (and users)
//!   named by later records are skipped, as their effect may or may not be in
//!   the live database yet;
//! - `claim-results` and `purchase-results` are applied up to their ends (a
//!   decision is published only after its effect committed), and users (and
//!   coupons) named by `claims` and `purchases` records at or after
//!   `<prefix>.claims-processor` / `<prefix>.purchases-processor`'s offsets
//!   are skipped, with every coupon a skipped user holds on either side
//!   (its decision may be committed but not yet published). Their quota
//!   slots and stored decisions are skipped too.
//! - `users` (profiles) below `<prefix>.profiles-processor`'s offsets is
//!   applied; the profiles of users named by later records are not compared.
//! - `blacklist` is applied up to its end: a change is published after its
//!   transaction commits (through an outbox, so a committed change may reach
//!   the log a little later). The live entries are read before the log and
//!   again at the end; a user whose entry changed in between, or whose change
//!   still waits in the outbox, is left out.
//!
//! - the history (`history`): every row of a record below the history
//!   role's own committed offsets must be in the store the history is kept
//!   in; later records' rows are counted as in flight.
//!
//! Retention (`coupon_platform::store::retention`) drops old partitions of
//! the live decisions, quota slots and history; the log keeps everything,
//! and so does the rebuild. What is older than a table's floor in the
//! live `retention_floors` (read after the live rows, so a drop while the
//! audit runs only widens what is left out) is not compared: it is counted
//! as beyond retention, never as a difference.
//!
//! The scratch database `audit_<random>` lives on the same server as the
//! live one and is dropped afterwards, whatever happened.
//!
//! `cut_log` reads the log up to the cut, `rows` reads both databases' rows
//! through the store, `compare` lists what differs, `history` checks the
//! history store; this file runs them.

mod compare;
mod cut_log;
mod history;
mod rows;

use compare::compare;
use cut_log::{read_cut_log, CutLog};
use rows::{blacklist_of, BlacklistRow};

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context as _;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use coupon_domain::QuotaWindow;
use coupon_platform::store;
use coupon_platform::{KafkaSettings, Topics};
use coupon_schemas::Role;

use crate::history::HistorySource;
use crate::rebuild::{self, RebuildStats};

/// The live groups whose committed offsets cut the log, with the topic each
/// one's offsets are read on.
const CUTS: [Role; 5] = [
    Role::Coupons,
    Role::Claims,
    Role::Purchases,
    Role::Expiry,
    Role::Profiles,
];

/// The outcome of an audit.
#[derive(Debug, Clone, Default)]
pub struct AuditReport {
    /// One line per coupon or user that differs, sorted.
    pub differences: Vec<String>,
    pub coupons_checked: usize,
    pub users_checked: usize,
    pub quota_checked: usize,
    pub claim_decisions_checked: usize,
    pub purchase_decisions_checked: usize,
    pub blacklist_checked: usize,
    /// Users' profiles (name, dob, location) compared.
    pub profiles_checked: usize,
    /// Left out because records still in flight name them.
    pub coupons_skipped: usize,
    pub users_skipped: usize,
    /// Quota slots and stored decisions of users still in flight.
    pub decisions_skipped: usize,
    /// Blacklist entries that changed while the audit ran.
    pub blacklist_skipped: usize,
    /// History rows the log says are written, all looked up in the store.
    pub history_checked: usize,
    /// History rows of records past the history role's committed offsets.
    pub history_skipped: usize,
    /// Quota slots, claim decisions and history rows on the log older than
    /// what retention keeps in the live database: not compared.
    pub beyond_retention: usize,
    /// Profiles named by `users` records past the profiles processor's
    /// committed offsets.
    pub profiles_skipped: usize,
    /// Records past the live groups' committed offsets.
    pub in_flight_records: u64,
    pub rebuild: RebuildStats,
}

impl AuditReport {
    pub fn is_clean(&self) -> bool {
        self.differences.is_empty()
    }

    /// What was compared, e.g. `3 coupons, 3 users, ... checked` (profiles
    /// named only when there are some).
    pub fn checked(&self) -> String {
        let profiles = match self.profiles_checked {
            0 => String::new(),
            n => format!(", {n} profiles"),
        };
        format!(
            "{} coupons, {} users, {} quota grants, {} claim decisions, {} purchase decisions, \
             {} blacklist entries{profiles}, {} history rows checked",
            self.coupons_checked,
            self.users_checked,
            self.quota_checked,
            self.claim_decisions_checked,
            self.purchase_decisions_checked,
            self.blacklist_checked,
            self.history_checked
        )
    }
}

/// Runs an audit of the deployment under `topics` whose live database is
/// `database_url`. With `read_url` (a replica of it), the live state is read
/// there, once the replica has replayed everything the primary had written
/// when the log was read; the scratch database is made on the primary.
/// `history` is where the history is kept (`None`: `coupon_history` in the
/// live database).
pub async fn audit(
    kafka: &KafkaSettings,
    topics: &Topics,
    window: QuotaWindow,
    database_url: &str,
    read_url: Option<&str>,
    history: Option<HistorySource>,
    bar: indicatif::ProgressBar,
) -> anyhow::Result<AuditReport> {
    let options: PgConnectOptions = database_url
        .parse()
        .context("the database URL is not a valid Postgres URL")?;
    let connect = |options: PgConnectOptions, url: &str, connections: u32| {
        let url = coupon_platform::db::redact(url);
        async move {
            PgPoolOptions::new()
                .max_connections(connections)
                .acquire_timeout(Duration::from_secs(5))
                .connect_with(options)
                .await
                .with_context(|| format!("connecting to Postgres at {url}"))
        }
    };
    let primary = connect(options.clone(), database_url, 2).await?;
    let replica = match read_url.filter(|url| *url != database_url) {
        Some(url) => {
            let replica_options: PgConnectOptions = url
                .parse()
                .context("the read database URL is not a valid Postgres URL")?;
            // One connection: behind a balancer another could reach a
            // replica that has not caught up.
            Some(connect(replica_options, url, 1).await?)
        }
        None => None,
    };
    let live = replica.clone().unwrap_or_else(|| primary.clone());

    // Before the log: a change published then is in the log, or still
    // changing (then the second read differs and the user is left out).
    let blacklist_before = blacklist_of(&live)
        .await
        .context("reading the live blacklist")?;
    let started = std::time::Instant::now();
    let (k, t, b) = (kafka.clone(), topics.clone(), bar.clone());
    let mut log = tokio::task::spawn_blocking(move || read_cut_log(&k, &t, &b))
        .await
        .context("the log reader stopped")??;
    bar.finish_and_clear();
    let read_seconds = started.elapsed().as_secs_f64();
    if let Some(replica) = &replica {
        wait_replayed(&primary, replica, Duration::from_secs(60)).await?;
    }

    // Before the rebuild takes the records.
    let expected_history = history::expected_history(&log);

    let scratch = scratch_name(options.get_database(), uuid::Uuid::new_v4());
    coupon_platform::db::create_database(&primary, &scratch)
        .await
        .with_context(|| {
            format!("creating the scratch database {scratch} (the role needs CREATEDB)")
        })?;
    let scratch_options = options.database(&scratch);
    let result = audit_in(&live, scratch_options, window, &mut log, &blacklist_before).await;
    let dropped = coupon_platform::db::drop_database_when_idle(&primary, &scratch).await;
    let history_check = match &result {
        Ok(_) => {
            let source = history.unwrap_or_else(|| HistorySource::Postgres(live.clone()));
            Some(history::compare_history(&source, expected_history).await)
        }
        Err(_) => None,
    };
    live.close().await;
    primary.close().await;
    let mut report = result?;
    dropped.with_context(|| format!("dropping the scratch database {scratch}"))?;
    if let Some(check) = history_check {
        let check = check?;
        report.differences.extend(check.missing);
        report.history_checked = check.checked;
        report.history_skipped = check.in_flight;
        report.beyond_retention += check.beyond_retention;
    }
    report.rebuild.read_seconds = read_seconds;
    report.rebuild.undecodable = log.undecodable;
    report.in_flight_records = log.in_flight;
    Ok(report)
}

/// Waits until `replica` has replayed the primary's WAL as of now, so that
/// what it answers is at least as new as the log just read.
async fn wait_replayed(primary: &PgPool, replica: &PgPool, within: Duration) -> anyhow::Result<()> {
    let lsn = store::replication::wal_position(primary)
        .await
        .context("reading the primary's WAL position")?;
    let deadline = std::time::Instant::now() + within;
    loop {
        let replayed = store::replication::replayed_up_to(replica, &lsn)
            .await
            .context("reading the replica's replay position")?;
        if replayed {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!(
                "the read replica did not replay the primary's WAL up to {lsn} within {within:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn audit_in(
    live: &PgPool,
    scratch: PgConnectOptions,
    window: QuotaWindow,
    log: &mut CutLog,
    blacklist_before: &HashMap<String, BlacklistRow>,
) -> anyhow::Result<AuditReport> {
    let rebuilt = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(scratch)
        .await
        .context("connecting to the scratch database")?;
    let result = async {
        rebuild::prepare_target(&rebuilt).await?;
        let outcomes = std::mem::take(&mut log.outcomes);
        let (stats, _) = rebuild::project(&rebuilt, window, outcomes).await?;
        let mut report = AuditReport {
            rebuild: stats,
            ..AuditReport::default()
        };
        compare(live, &rebuilt, log, blacklist_before, &mut report).await?;
        compare_profiles(live, &rebuilt, log, &mut report).await?;
        Ok(report)
    }
    .await;
    rebuilt.close().await;
    result
}

/// Every profile in either database, but those of users whose `users`
/// records are still in flight, must be the same.
async fn compare_profiles(
    live: &PgPool,
    rebuilt: &PgPool,
    log: &CutLog,
    report: &mut AuditReport,
) -> anyhow::Result<()> {
    let by_user =
        |rows: Vec<store::users::ProfileUpdate>| -> HashMap<String, store::users::ProfileUpdate> {
            rows.into_iter()
                .map(|p| (p.user_id.as_str().to_owned(), p))
                .collect()
        };
    let live = by_user(
        store::users::all_profiles(live)
            .await
            .context("reading the live profiles")?,
    );
    let logged = by_user(
        store::users::all_profiles(rebuilt)
            .await
            .context("reading the rebuilt profiles")?,
    );
    let mut users: Vec<&String> = live.keys().chain(logged.keys()).collect();
    users.sort_unstable();
    users.dedup();
    let describe = |p: &store::users::ProfileUpdate| {
        format!(
            "name {:?}, dob {:?}, location {:?} as of {}",
            p.profile.name,
            p.profile.dob.map(|d| d.to_string()),
            p.profile.location,
            p.updated_at.to_rfc3339()
        )
    };
    for user in users {
        if log.skip_profiles.contains(user.as_str()) {
            report.profiles_skipped += 1;
            continue;
        }
        report.profiles_checked += 1;
        let (now, then) = (live.get(user), logged.get(user));
        if now != then {
            report.differences.push(format!(
                "profile of user {user}: live {}, log {}",
                now.map_or("none".into(), describe),
                then.map_or("none".into(), describe)
            ));
        }
    }
    Ok(())
}

/// The scratch database of one audit: `audit_`, the live database's name
/// (its letters, digits and underscores, at most 40), and a random part,
/// so that an operator (or a test) sees whose audit a leftover was.
fn scratch_name(live: Option<&str>, id: uuid::Uuid) -> String {
    let live: String = live
        .unwrap_or_default()
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(40)
        .collect();
    format!("audit_{live}_{}", &id.simple().to_string()[..12])
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_scratch_database_is_named_after_the_live_one() {
        let id = uuid::Uuid::from_u128(0xabc);
        let name = super::scratch_name(Some("Coupons-Live_1"), id);
        assert_eq!(name, "audit_couponslive_1_000000000000");
        assert!(super::scratch_name(Some(&"x".repeat(100)), id).len() <= 63);
        assert_eq!(super::scratch_name(None, id), "audit__000000000000");
    }

    use super::cut_log::canonical_code;
    use super::rows::{same_coupon, CouponRow};
    use coupon_domain::CouponCode;

    fn row(status: &str, holder: Option<&str>, order: Option<&str>) -> CouponRow {
        CouponRow {
            code: "C".into(),
            status: status.parse().unwrap(),
            holder_user_id: holder.map(Into::into),
            redeemed_order_id: order.map(Into::into),
        }
    }

    #[test]
    fn coupons_are_compared_on_status_holder_and_order() {
        let redeemed = row("redeemed", Some("bob"), Some("o-1"));
        assert!(same_coupon(&redeemed, &redeemed.clone()));
        assert!(!same_coupon(&redeemed, &row("available", None, None)));
        assert!(!same_coupon(
            &redeemed,
            &row("redeemed", Some("bob"), Some("o-2"))
        ));
        assert!(!same_coupon(
            &row("held", Some("bob"), None),
            &row("held", Some("carol"), None)
        ));
        assert!(same_coupon(
            &row("available", None, None),
            &row("available", None, None)
        ));
    }

    #[test]
    fn codes_are_canonical_before_skipping() {
        let code = CouponCode::from_id(coupon_domain::SnowflakeId::from_raw(1 << 40).unwrap());
        let text = code.to_string();
        assert_eq!(canonical_code(&text.to_lowercase()), text);
        assert_eq!(canonical_code("not a code"), "not a code");
    }
}
