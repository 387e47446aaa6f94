//! `couponctl bench`: the benchmarks, against a fresh database.

use std::path::PathBuf;

use clap::Args;

use super::args::{default_serve_args, Connections};

/// `couponctl bench`'s arguments.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// A short run (20,000 users) instead of the full 1,000,000.
    #[arg(long, env = "BENCH_QUICK", value_parser = clap::builder::FalseyValueParser::new())]
    pub quick: bool,
    /// Override the number of flash-sale users.
    #[arg(long, env = "BENCH_USERS")]
    pub users: Option<usize>,
    /// HTTP requests in flight at once.
    #[arg(long, env = "BENCH_CONCURRENCY", default_value_t = 128)]
    pub concurrency: usize,
    /// Where to write the flash sale over time (SVG: answers/s, p50, p99).
    #[arg(
        long,
        env = "BENCH_PLOT",
        default_value = "target/bench/flash-sale.svg"
    )]
    pub plot: PathBuf,
    /// The Postgres servers of the sharding rows, comma-separated (`make
    /// bench` passes those of `make shard-up`); fewer than two leave the
    /// rows out.
    #[arg(long, env = "BENCH_SHARD_URLS", value_delimiter = ',')]
    pub shard_urls: Vec<String>,
    /// Only the rows of `couponctl run` driven from outside by `wrk` and
    /// `vegeta` (the product as users run it), day 1 and day 30: about five
    /// minutes instead of the whole bench.
    #[arg(long, env = "BENCH_AS_RUN_ONLY", value_parser = clap::builder::FalseyValueParser::new())]
    pub as_run_only: bool,
    /// The scale rows instead of the whole bench: the flash sale alone, once
    /// for each number of users given (comma-separated), each in a fresh
    /// database, a coupon for one user in a hundred (`make bench-scale`:
    /// 100,000, 1,000,000 and 3,000,000).
    #[arg(long, env = "BENCH_SCALE", value_delimiter = ',')]
    pub scale: Vec<usize>,
    /// Claims a day in the 29 days loaded into `couponctl run`'s database
    /// before its day-30 rows [default: 200,000; 4,000 with --quick; 0
    /// leaves the day-30 rows out]
    #[arg(long, env = "BENCH_DAY30_PER_DAY")]
    pub day30_per_day: Option<usize>,
}

pub async fn run(conn: &Connections, args: BenchArgs) -> anyhow::Result<()> {
    let config = conn.app_config(&default_serve_args());
    let mut options = if args.quick {
        couponctl::dev::bench::BenchOptions::quick()
    } else {
        couponctl::dev::bench::BenchOptions::full()
    };
    if let Some(users) = args.users {
        options.users = users;
    }
    options.concurrency = args.concurrency.max(1);
    options.plot = Some(args.plot);
    options.shard_urls = args.shard_urls;
    options.as_run_only = args.as_run_only;
    options.scale = args.scale;
    if let Some(per_day) = args.day30_per_day {
        options.day30_per_day = per_day;
    }
    let rows = couponctl::dev::bench::run(config, options).await?;
    println!("{}", couponctl::dev::bench::render(&rows));
    println!("{}", couponctl::dev::bench::render_targets(&rows));
    Ok(())
}
