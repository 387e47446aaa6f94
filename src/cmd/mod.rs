//! The subcommands of `couponctl`, one file each, gathered by [`Command`].
//!
//! A command's file holds its arguments (a clap `Args` struct) and its body
//! (`run`); [`args`] holds what several share (the connections to the
//! services, the serving settings). The bodies only wire the library
//! (`couponctl::app`, the producers, the analyst tools) together.

pub mod args;
mod audit;
mod bench;
mod blacklist;
mod campaign;
mod demo;
mod history;
mod holds;
mod issue;
mod migrate;
mod replay;
mod serve;
mod status;
mod topics;

use clap::Subcommand;

use couponctl::app::Role;

pub use args::Connections;
use args::ServeArgs;

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Gateway plus every consumer in one process (the embedded default).
    #[command(after_help = "Example:\n  COUPON_ADMIN_TOKEN=secret couponctl run --hold-ttl 30s")]
    Run(ServeArgs),
    /// Only the HTTP gateway (run several behind a load balancer).
    #[command(after_help = "Example:\n  couponctl gateway --http-addr 0.0.0.0:8080")]
    Gateway(ServeArgs),
    /// One or more consumer roles; run more instances to scale out.
    #[command(
        after_help = "Example:\n  couponctl consume claims purchases --metrics-addr 127.0.0.1:9100"
    )]
    Consume(serve::ConsumeArgs),
    /// Release a batch of new coupons (employee tool).
    #[command(
        after_help = "Examples:\n  couponctl issue --employee e1 --category Electronics --count 10000\n  couponctl issue --employee e1 --category Electronics --count 10000 --idempotency-key xmas-electronics\n    (run it again after a failure: it completes that batch, never a second one)\n  couponctl issue --employee e1 --category Electronics --count 500 --campaign 'Winter sale' --percent-off 15 --min-order 5000 --currency EUR --valid-from 2026-12-20T00:00:00Z --valid-until 2027-01-06T00:00:00Z\n    (a campaign: 15% off orders of 50.00 EUR or more, claimable inside the window)"
    )]
    Issue(issue::IssueArgs),
    /// Create the topics that are missing, then list them.
    #[command(after_help = "Example:\n  couponctl topics --partitions 8")]
    Topics(topics::TopicsArgs),
    /// Apply database migrations.
    #[command(
        after_help = "Example:\n  DATABASE_URL=postgres://postgres@127.0.0.1:5432/coupons couponctl migrate"
    )]
    Migrate,
    /// Manage the blacklist.
    #[command(
        subcommand,
        after_help = "Examples:\n  couponctl blacklist add user-42 --for 24h --reason 'chargeback fraud'\n  couponctl blacklist list\n  couponctl blacklist remove user-42"
    )]
    Blacklist(blacklist::BlacklistCommand),
    /// Manage campaigns (a campaign's id is its release's batch id).
    #[command(
        subcommand,
        after_help = "Example:\n  couponctl campaign end 0b5d1c3e-8f7a-4d2b-9c6e-1a2b3c4d5e6f --by alice"
    )]
    Campaign(campaign::CampaignCommand),
    /// Manage the Redis copy of holds.
    #[command(subcommand, after_help = "Example:\n  couponctl holds rebuild")]
    Holds(holds::HoldsCommand),
    /// Pool per category, overdue holds, consumer lag and service health.
    #[command(after_help = "Example:\n  couponctl status")]
    Status,
    /// Run the benchmarks against a fresh database (BENCH_QUICK=1 for a short run).
    #[command(
        after_help = "Examples:\n  BENCH_QUICK=1 couponctl bench\n  couponctl bench --as-run-only   # couponctl run driven by wrk, as users run it"
    )]
    Bench(bench::BenchArgs),
    /// Run the whole system on a fresh database and play a flash sale through it.
    #[command(after_help = "Example:\n  couponctl demo --users 2000 --hold 5s")]
    Demo(demo::DemoArgs),
    /// Read topics from the start (or an offset, or a time) and write every
    /// event as a JSON line; or rebuild the projections into a fresh database.
    #[command(after_help = "Examples:
  couponctl replay --topic claims,claim-results --since 2026-11-25T00:00:00Z --output claims.jsonl
  couponctl replay --offset 1000 | jq -c 'select(.payload.outcome == \"CLAIM_OUTCOME_GRANTED\")'
  couponctl replay --rebuild postgres://postgres@127.0.0.1:5432/coupons_rebuilt

Each line: topic, topic_kind, partition, offset, timestamp_ms, key, envelope and
payload (the message without its envelope, enums by name, bytes in base64); a
record that does not decode has error and value_base64 instead. The replay reads
with its own group id and plain partition assignment, never commits, and stops at
the end each partition had when it started.")]
    Replay(replay::ReplayArgs),
    /// Rebuild the state from the log into a scratch database and report every
    /// difference from the live database (exit code 1 if there is any).
    #[command(after_help = "Example:
  couponctl audit && echo 'the database matches the log'

Only records below the live consumer groups' committed offsets count; coupons and
users named by later records (still in flight) are left out. The scratch database
audit_<random> is created on the DATABASE_URL server and dropped afterwards.")]
    Audit(audit::AuditArgs),
    /// Every history row of a user or a coupon, in time order.
    #[command(after_help = "Examples:
  couponctl history --user user-42
  couponctl history --coupon 0CKD3QF2R5T00 --since 2026-11-25T00:00:00Z --until 2026-11-26T00:00:00Z

One line per row, tab separated: time, kind, coupon, user, detail (JSON).")]
    History(history::HistoryArgs),
}

impl Command {
    /// Commands that print their own progress (the services' start and
    /// stop lines would drown it).
    pub fn prints_progress(&self) -> bool {
        matches!(self, Command::Demo(_) | Command::Bench(_))
    }

    pub async fn run(self, conn: &Connections) -> anyhow::Result<()> {
        match self {
            Command::Run(serve) => serve::run(conn, &serve, &Role::ALL).await,
            Command::Gateway(serve) => serve::run(conn, &serve, &[Role::Gateway]).await,
            Command::Consume(args) => serve::run(conn, &args.serve, &args.roles).await,
            Command::Issue(args) => issue::run(conn, args).await,
            Command::Topics(args) => topics::run(conn, args).await,
            Command::Migrate => migrate::run(conn).await,
            Command::Blacklist(command) => blacklist::run(conn, command).await,
            Command::Holds(command) => holds::run(conn, command).await,
            Command::Campaign(command) => campaign::run(conn, command).await,
            Command::Status => status::run(conn).await,
            Command::Bench(args) => bench::run(conn, args).await,
            Command::Demo(args) => demo::run(conn, args).await,
            Command::Replay(args) => replay::run(conn, args).await,
            Command::Audit(args) => audit::run(conn, args).await,
            Command::History(args) => history::run(conn, args).await,
        }
    }
}
