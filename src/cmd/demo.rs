//! `couponctl demo`: the whole system on a fresh database, with a flash
//! sale played through it.

use std::time::Duration;

use clap::Args;

use super::args::{default_serve_args, Connections};

/// `couponctl demo`'s arguments.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Simulated users in the burst.
    #[arg(long, default_value_t = 1_000)]
    pub users: usize,
    /// Electronics coupons released.
    #[arg(long, default_value_t = 300)]
    pub electronics: u32,
    /// Books coupons released.
    #[arg(long, default_value_t = 200)]
    pub books: u32,
    /// The demo's hold, short so expirations happen while you watch.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub hold: Duration,
    /// Keep the demo database instead of dropping it.
    #[arg(long)]
    pub keep: bool,
}

pub async fn run(conn: &Connections, args: DemoArgs) -> anyhow::Result<()> {
    let config = conn.app_config(&default_serve_args());
    let options = couponctl::dev::demo::DemoOptions {
        users: args.users,
        electronics: args.electronics,
        books: args.books,
        hold_ttl: args.hold,
        keep: args.keep,
    };
    let started = std::time::Instant::now();
    let summary = couponctl::dev::demo::run(config, options).await?;
    println!("{summary}");
    match &summary.database_url {
        Some(url) => println!("kept the demo database: {url}"),
        None => println!(
            "cleaned up: demo database dropped, Redis keys removed (its topics stay on the broker; `make clean-state` wipes broker data)"
        ),
    }
    println!("demo finished in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}
