//! `couponctl audit`: the state rebuilt from the log, compared with the
//! live database; exit code 1 on any difference.

use std::io::Write as _;

use anyhow::Context as _;
use clap::Args;

use coupon_analyst::{audit, replay};
use coupon_consumers::history::HistoryStore;
use coupon_domain::QuotaWindow;
use coupon_platform::reach;

use coupon_platform::settings::{self, Flag};

use super::args::{history_source, parse_window, parse_zone, Connections};

#[derive(Args, Debug)]
pub struct AuditArgs {
    /// The quota window the claim processors run with (quota slots are named
    /// by their window's start).
    #[arg(long, env = "QUOTA_WINDOW", default_value_t = settings::QUOTA_WINDOW, value_parser = parse_window)]
    pub quota_window: QuotaWindow,
    /// The shop's time zone (IANA name, e.g. Europe/Berlin, Asia/Kolkata):
    /// windows of whole days are its calendar days, DST included.
    #[arg(long, env = "QUOTA_TZ", default_value_t = settings::QUOTA_TZ, value_parser = parse_zone)]
    pub quota_tz: coupon_domain::Tz,
    /// How late a request may be decided and still be judged at the time the
    /// broker accepted it; holds are released this long after their deadline.
    #[arg(long, env = "HOLD_GRACE", default_value_t = Flag(settings::HOLD_GRACE), value_parser = settings::HOLD_GRACE_SPAN.parser())]
    pub hold_grace: Flag,
}

pub async fn run(conn: &Connections, args: AuditArgs) -> anyhow::Result<()> {
    let topics = coupon_platform::Topics::new(&conn.topic_prefix);
    reach::kafka(&conn.kafka_brokers).await?;
    reach::postgres(&conn.database_url).await?;
    // Postgres: `coupon_history` in the live database, as the audit reads it.
    let history = match conn.history_store {
        HistoryStore::Postgres => None,
        HistoryStore::Cassandra => Some(history_source(conn).await?),
    };
    let bar = replay::progress_bar(0, "reading the log");
    let report = audit::audit(
        &conn.kafka(),
        &topics,
        args.quota_window.in_zone(args.quota_tz),
        &conn.database_url,
        conn.database_read_url.as_deref(),
        history,
        bar,
    )
    .await?;
    eprintln!("{}", report.rebuild);
    for example in &report.rebuild.anomaly_examples {
        eprintln!("warning: {example}");
    }
    if report.in_flight_records > 0 {
        eprintln!(
            "{} records still in flight: {} coupons and {} users left out",
            report.in_flight_records, report.coupons_skipped, report.users_skipped
        );
    }
    if report.history_skipped > 0 {
        eprintln!(
            "{} history rows of records the history sink has not finished are not checked",
            report.history_skipped
        );
    }
    if report.beyond_retention > 0 {
        eprintln!(
            "{} quota slots, claim decisions and history rows older than the live database \
             keeps (DECISION_RETENTION, HISTORY_RETENTION) are not compared",
            report.beyond_retention
        );
    }
    let mut stdout = std::io::stdout().lock();
    for line in &report.differences {
        writeln!(stdout, "{line}").context("writing the report")?;
    }
    if report.is_clean() {
        writeln!(stdout, "no differences ({})", report.checked()).context("writing the report")?;
        return Ok(());
    }
    let n = report.differences.len();
    anyhow::bail!("{n} difference{}", if n == 1 { "" } else { "s" })
}
