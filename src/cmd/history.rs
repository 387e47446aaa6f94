//! `couponctl history`: the history sink's rows of a user or a coupon, from
//! the store the history is kept in (`HISTORY_STORE`).

use std::io::Write as _;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use clap::{ArgGroup, Args};

use coupon_analyst::{history, replay};

use super::args::{history_source, Connections};

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("subject").required(true).multiple(true).args(["user", "coupon"])))]
pub struct HistoryArgs {
    /// The user whose history to show.
    #[arg(long)]
    pub user: Option<String>,
    /// The coupon (code) whose history to show.
    #[arg(long)]
    pub coupon: Option<String>,
    /// Only rows at or after this time (RFC 3339).
    #[arg(long, value_parser = replay::parse_time)]
    pub since: Option<DateTime<Utc>>,
    /// Only rows at or before this time (RFC 3339).
    #[arg(long, value_parser = replay::parse_time)]
    pub until: Option<DateTime<Utc>>,
}

pub async fn run(conn: &Connections, args: HistoryArgs) -> anyhow::Result<()> {
    let source = history_source(conn).await?;
    let filter = history::HistoryFilter {
        user: args.user,
        coupon: args.coupon,
        since: args.since,
        until: args.until,
    };
    let rows = history::query(&source, &filter)
        .await
        .context("reading the history")?;
    if rows.is_empty() {
        eprintln!("no history rows");
    }
    let mut stdout = std::io::stdout().lock();
    for row in rows {
        writeln!(stdout, "{row}").context("writing the history")?;
    }
    Ok(())
}
