//! `couponctl holds rebuild`: rewrite every live hold from Postgres into
//! Redis (every start does it too).

use clap::Subcommand;

use couponctl::app;

use super::args::{default_serve_args, Connections};

#[derive(Subcommand, Debug)]
pub enum HoldsCommand {
    /// Rewrite every live hold from Postgres into Redis.
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
            let holds = coupon_consumers::expiry::rebuild_cache(&ctx).await?;
            println!("{holds} live holds written to Redis");
            Ok(())
        }
    }
}
