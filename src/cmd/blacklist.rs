//! `couponctl blacklist add|remove|list`. Every change is published on the
//! blacklist topic too, so a rebuild from the log restores it.
//!
//! The command talks to Postgres and the broker directly, with the
//! operator's credentials for them: whoever can run it is trusted as the
//! gateway is, and no employee credential is checked. The author a change
//! is recorded under (`changed_by` on the log) is the one `--by` names
//! (COUPON_EMPLOYEE), else the login name running it (`operator` when
//! there is none): an attestation by the
//! operator, not a proof. The gateway's `/api/v1/blacklist` records the
//! employee its credential proves.

use std::time::Duration;

use anyhow::Context as _;
use clap::Subcommand;

use sqlx::PgPool;

use coupon_domain::{EmployeeId, UserId};
use coupon_platform::kafka::Publisher;
use coupon_platform::{reach, KafkaSettings, Topics};
use coupon_producers::blacklist::{Blacklist, Source};

use super::args::{database, Connections};

#[derive(Subcommand, Debug)]
pub enum BlacklistCommand {
    /// Blacklist a user (indefinitely unless --for is given).
    #[command(
        after_help = "Example:\n  couponctl blacklist add user-42 --for 24h --reason 'chargeback fraud'"
    )]
    Add {
        user: String,
        /// How long, e.g. 24h; omitted: until removed.
        #[arg(long = "for", value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
        #[arg(long, default_value = "manual")]
        reason: String,
        /// The employee recorded as the change's author (default: the
        /// login name, $USER).
        #[arg(long, env = "COUPON_EMPLOYEE")]
        by: Option<String>,
    },
    /// Lift a user's blacklisting.
    #[command(after_help = "Example:\n  couponctl blacklist remove user-42")]
    Remove {
        user: String,
        /// The employee recorded as the change's author (default: the
        /// login name, $USER).
        #[arg(long, env = "COUPON_EMPLOYEE")]
        by: Option<String>,
    },
    /// List blacklisted users.
    #[command(after_help = "Example:\n  couponctl blacklist list")]
    List,
}

/// A producer for blacklist changes, once the broker answers (a producer
/// made first would log every failed connection before the one-line error).
async fn blacklist_publisher(kafka: &KafkaSettings) -> anyhow::Result<Publisher> {
    reach::kafka(&kafka.brokers).await?;
    Ok(Publisher::new(
        kafka,
        &format!("couponctl-blacklist@{}", std::process::id()),
    )?)
}

/// The author of a change: `--by`, else the login name ($USER, $LOGNAME),
/// else `operator` (a service account or container has neither).
fn author(by: Option<String>) -> anyhow::Result<EmployeeId> {
    let name = by
        .or_else(|| std::env::var("USER").ok().filter(|u| !u.is_empty()))
        .or_else(|| std::env::var("LOGNAME").ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| "operator".to_owned());
    EmployeeId::parse(name).context("--by (COUPON_EMPLOYEE)")
}

pub async fn run(conn: &Connections, command: BlacklistCommand) -> anyhow::Result<()> {
    let pool = database(conn).await?;
    coupon_platform::db::migrate(&pool)
        .await
        .context("applying migrations")?;
    if let BlacklistCommand::List = command {
        return list(&pool).await;
    }
    // Every change goes on the log too, so a rebuild restores it.
    let publisher = blacklist_publisher(&conn.kafka()).await?;
    let topics = Topics::new(&conn.topic_prefix);
    let blacklist = Blacklist {
        pool: &pool,
        publisher: &publisher,
        topics: &topics,
    };
    match command {
        BlacklistCommand::Add {
            user,
            duration,
            reason,
            by,
        } => add(&blacklist, user, duration, &reason, by).await,
        BlacklistCommand::Remove { user, by } => remove(conn, &blacklist, user, by).await,
        BlacklistCommand::List => Ok(()),
    }
}

async fn add(
    blacklist: &Blacklist<'_>,
    user: String,
    duration: Option<Duration>,
    reason: &str,
    by: Option<String>,
) -> anyhow::Result<()> {
    let user = UserId::parse(user)?;
    let by = author(by)?;
    let until = match duration {
        Some(d) => {
            Some(chrono::Utc::now() + chrono::Duration::from_std(d).context("--for is too long")?)
        }
        None => None,
    };
    let entry = blacklist
        .add(&user, until, reason, Source::Manual(&by))
        .await?;
    match entry.blacklisted_until {
        Some(until) => println!("{user} blacklisted until {}", until.to_rfc3339()),
        None => println!("{user} blacklisted until removed"),
    }
    Ok(())
}

async fn remove(
    conn: &Connections,
    blacklist: &Blacklist<'_>,
    user: String,
    by: Option<String>,
) -> anyhow::Result<()> {
    let user = UserId::parse(user)?;
    let by = author(by)?;
    let removed = blacklist.remove(&user, Source::Manual(&by)).await?;
    // A flood block (Redis) lifts at once on every gateway too.
    let prefix = conn.redis_prefix.as_deref().unwrap_or(&conn.topic_prefix);
    let unblocked = match coupon_platform::redis::Cache::connect(&conn.redis_url, prefix).await {
        Ok(cache) => cache.unblock(&user).await.is_ok(),
        Err(_) => false,
    };
    if !unblocked {
        eprintln!("warning: Redis not reached; a flood block of {user} ends at its TTL");
    }
    if !removed {
        anyhow::bail!("{user} is not blacklisted");
    }
    println!("{user} removed from the blacklist");
    Ok(())
}

async fn list(pool: &PgPool) -> anyhow::Result<()> {
    let entries = coupon_producers::blacklist::list(pool).await?;
    if entries.is_empty() {
        println!("no blacklisted users");
    }
    for e in entries {
        let until = e
            .blacklisted_until
            .map(|t| t.to_rfc3339())
            .unwrap_or_else(|| "until removed".into());
        println!(
            "{}\t{}\t{}",
            e.user_id,
            until,
            e.blacklist_reason.unwrap_or_default()
        );
    }
    Ok(())
}
