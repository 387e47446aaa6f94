//! `couponctl campaign end <id>`: an employee ends a campaign early, as
//! `DELETE /api/v1/campaigns/<id>` does (the same store call; the expiry
//! role then moves its available coupons to `expired`). A campaign's id is
//! the batch id its release printed.

use anyhow::Context as _;
use clap::Subcommand;

use coupon_domain::EmployeeId;
use coupon_platform::store;

use super::args::{database, Connections};

#[derive(Subcommand, Debug)]
pub enum CampaignCommand {
    /// End a campaign now: its coupons are no longer granted and its
    /// available ones become `expired` (holds keep their deadline).
    #[command(
        after_help = "Example:\n  couponctl campaign end 0b5d1c3e-8f7a-4d2b-9c6e-1a2b3c4d5e6f --by alice"
    )]
    End {
        /// The campaign's id: the batch id of its release.
        id: String,
        /// The employee recorded as ending it (default: the login name,
        /// $USER).
        #[arg(long, env = "COUPON_EMPLOYEE")]
        by: Option<String>,
    },
}

pub async fn run(conn: &Connections, command: CampaignCommand) -> anyhow::Result<()> {
    match command {
        CampaignCommand::End { id, by } => {
            let batch_id = uuid::Uuid::parse_str(id.trim()).with_context(|| {
                format!("{id:?} is not a campaign id (the batch id of a release, a UUID)")
            })?;
            let author = author(by)?;
            let pool = database(conn).await?;
            coupon_platform::db::migrate(&pool)
                .await
                .context("migrating the database")?;
            let ended = store::campaigns::end_early(&pool, batch_id, author.as_str())
                .await
                .context("ending the campaign")?
                .with_context(|| format!("no campaign has the id {batch_id}"))?;
            println!(
                "campaign {batch_id} ended at {}{}",
                ended
                    .ended_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                ended
                    .ended_by
                    .map(|by| format!(" by {by}"))
                    .unwrap_or_default()
            );
            Ok(())
        }
    }
}

/// `--by`, else the login name, else `operator`.
fn author(by: Option<String>) -> anyhow::Result<EmployeeId> {
    let name = by
        .or_else(|| std::env::var("USER").ok().filter(|u| !u.is_empty()))
        .or_else(|| std::env::var("LOGNAME").ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| "operator".to_owned());
    EmployeeId::parse(name).context("--by (COUPON_EMPLOYEE)")
}
