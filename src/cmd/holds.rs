//! `couponctl holds rebuild`: rewrite every live hold and used quota from
//! Postgres into Redis (every start does it too, and the claim processor
//! whenever Redis lost its data).

use clap::Subcommand;

use couponctl::app;

use super::args::{default_serve_args, Connections};

#[derive(Subcommand, Debug)]
pub enum HoldsCommand {
    /// Rewrite every live hold and used quota from Postgres into Redis.
    #[command(
        after_help = "Example:\n  couponctl holds rebuild   # after Redis lost its data; every start does it too"
    )]
    Rebuild,
}

pub async fn run(conn: &Connections, command: HoldsCommand) -> anyhow::Result<()> {
    match command {
        HoldsCommand::Rebuild => {
            let config = conn.app_config(&default_serve_args());
            let ctx = app::connect(&config).await?;
            let restored = coupon_consumers::restore::restore(&ctx).await?;
            println!(
                "{} live holds and {} used quotas written to Redis{}",
                restored.holds,
                restored.used_quotas,
                if restored.complete {
                    ""
                } else {
                    " (Redis lost data meanwhile: run it again)"
                }
            );
            Ok(())
        }
    }
}
