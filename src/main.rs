//! `couponctl`: every process and tool of the coupon system in one binary.
//! This file only parses the flags shared by every command and sets up
//! logging; each command's flags and body are in `cmd/<command>.rs`,
//! gathered by [`cmd::Command`]. See `couponctl --help`.

mod cmd;

/// mimalloc instead of glibc's allocator, without huge pages: why in
/// `couponctl::memory`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, ValueEnum};

use coupon_platform::reach;

use cmd::{Command, Connections};

#[derive(Parser, Debug)]
#[command(name = "couponctl", version, about = "Coupon system: gateway, consumers and tools", long_about = None)]
struct Cli {
    #[command(flatten)]
    connections: Connections,

    /// Log format.
    #[arg(long, global = true, env = "LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Logs go to stderr through a writer thread of their own: a request never
/// waits for a terminal or a pipe (a full buffer drops lines rather than
/// stall the request path; the returned guard flushes what is left at
/// exit). Colours only on a terminal: a file or a collector gets plain text
/// (`text`) or one JSON object a line (`json`, for production).
fn init_logging(
    format: LogFormat,
    default_filter: &str,
) -> tracing_appender::non_blocking::WorkerGuard {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let terminal = std::io::stderr().is_terminal();
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(terminal)
        .with_writer(writer);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    guard
}

#[tokio::main]
async fn main() {
    couponctl::memory::without_huge_pages();
    let cli = Cli::try_parse().unwrap_or_else(|error| refuse_flags(error));
    // The demo and the benchmarks print their own progress; the services'
    // start/stop lines would drown it (RUST_LOG still overrides). The
    // Cassandra driver's log is off: while a node is down it repeats the
    // same failure every second; the history role reports the outage
    // itself, once per retry (`RUST_LOG=...,scylla=warn` shows the driver).
    let default_filter = if cli.command.prints_progress() {
        "warn"
    } else {
        "info,rdkafka=warn,sqlx=warn,scylla=off"
    };
    let logs = init_logging(cli.log_format, default_filter);
    if let Err(error) = cli.command.run(&cli.connections).await {
        drop(logs);
        eprintln!("error: {}", one_line(&error));
        std::process::exit(1);
    }
}

/// Help and version go out as clap writes them; a refused flag or value is
/// one line (`error: invalid value '0s' for '--hold-ttl <HOLD_TTL>': must be
/// between 1s and 1d`), like every other refusal, with clap's exit code.
fn refuse_flags(error: clap::Error) -> ! {
    use clap::error::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        error.exit();
    }
    let rendered = error.render().to_string();
    let line = rendered
        .lines()
        .find(|line| !line.trim().is_empty())
        .unwrap_or("error: invalid arguments");
    eprintln!("{line} (see --help)");
    std::process::exit(error.exit_code());
}

/// The error as one line: the error and its causes, or, when a service could
/// not be reached at all, just that (the causes of an unstarted service are
/// noise: the fix is to start it).
fn one_line(error: &anyhow::Error) -> String {
    match error
        .chain()
        .find_map(|cause| cause.downcast_ref::<reach::Unreachable>())
    {
        Some(unreachable) => unreachable.to_string(),
        None => format!("{error:#}"),
    }
}
