//! The command line as a person meets it: a service that is not started is
//! reported in one line within seconds (not a hang, not a chain of
//! timeouts), and every subcommand's `--help` ends with an example.

use std::time::{Duration, Instant};

use crate::harness::TestEnv;

/// A port nothing listens on: bound, then released.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    listener.local_addr().expect("local addr").port()
}

struct Case {
    args: &'static [&'static str],
    /// Which services the command needs (so it must refuse when they are gone).
    postgres: bool,
    redis: bool,
    kafka: bool,
}

const fn case(args: &'static [&'static str], postgres: bool, redis: bool, kafka: bool) -> Case {
    Case {
        args,
        postgres,
        redis,
        kafka,
    }
}

/// Every subcommand, with the services it talks to.
const CASES: &[Case] = &[
    case(&["run"], true, true, true),
    case(&["gateway"], true, true, true),
    case(&["consume", "claims"], true, true, true),
    case(&["holds", "rebuild"], true, true, true),
    case(
        &["issue", "--employee", "e1", "--category", "Books"],
        true,
        false,
        true,
    ),
    case(&["topics"], false, false, true),
    case(&["migrate"], true, false, false),
    case(&["blacklist", "list"], true, false, false),
    // Changes go on the log too (`<prefix>.blacklist`).
    case(&["blacklist", "add", "user-1"], true, false, true),
    case(&["blacklist", "remove", "user-1"], true, false, true),
    case(&["status"], true, false, true),
    case(&["replay"], false, false, true),
    case(&["audit"], true, false, true),
    case(&["history", "--user", "user-1"], true, false, false),
    case(&["demo"], true, true, true),
    case(&["bench", "--quick"], true, true, true),
];

/// Runs `couponctl args` with one service moved to a closed port and checks
/// the answer: exit code 1 within a few seconds, and stderr is exactly the
/// one line `expected`.
fn assert_refused(env: &TestEnv, args: &[&str], var: &str, value: &str, expected: &str) {
    let started = Instant::now();
    let output = env
        .couponctl()
        .args(args)
        .env(var, value)
        .env("HTTP_ADDR", "127.0.0.1:0")
        .output()
        .expect("run couponctl");
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        output.status.code(),
        Some(1),
        "couponctl {args:?} with {var}={value} should fail; stderr:\n{stderr}"
    );
    assert_eq!(
        lines,
        [expected],
        "couponctl {args:?} with {var}={value}: one line naming the service"
    );
    assert!(
        took < Duration::from_secs(8),
        "couponctl {args:?} with {var}={value} took {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_service_is_one_line_and_a_quick_exit() {
    let env = TestEnv::new().await;
    let port = closed_port();
    let address = format!("127.0.0.1:{port}");
    let postgres = format!("postgres://postgres@{address}/coupons");
    let redis = format!("redis://{address}");
    let mut checked = 0;
    for case in CASES {
        if case.postgres {
            assert_refused(
                &env,
                case.args,
                "DATABASE_URL",
                &postgres,
                &format!(
                    "error: cannot reach Postgres at {address} (start it with make up, or set DATABASE_URL)"
                ),
            );
            checked += 1;
        }
        if case.redis {
            assert_refused(
                &env,
                case.args,
                "REDIS_URL",
                &redis,
                &format!(
                    "error: cannot reach Redis at {address} (start it with make up, or set REDIS_URL)"
                ),
            );
            checked += 1;
        }
        if case.kafka {
            assert_refused(
                &env,
                case.args,
                "KAFKA_BROKERS",
                &address,
                &format!(
                    "error: cannot reach the Kafka broker at {address} (start it with make up, or set KAFKA_BROKERS)"
                ),
            );
            checked += 1;
        }
    }
    // The analysts' rebuild target is a Postgres of its own.
    assert_refused(
        &env,
        &["replay", "--rebuild", &postgres],
        "COUPON_TOPIC_PREFIX",
        &env.name,
        &format!(
            "error: cannot reach Postgres at {address} (start it with make up, or set DATABASE_URL)"
        ),
    );
    assert!(checked > 30, "{checked} refusals checked");
}

/// Issue #24, item 10: settings are checked before anything starts. Each
/// absurd value is refused with exit 1 and one line naming the setting, for
/// every serving command; before, `HOLD_TTL=0s` started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_settings_are_refused_in_one_line_before_anything_starts() {
    let env = TestEnv::new().await;
    let cases: [(&str, &str, &str); 12] = [
        ("QUOTA_TZ", "Mars/Olympus", "unknown time zone"),
        ("HOLD_TTL", "0s", "must be between 1s and 1d"),
        ("HOLD_TTL", "99999999999d", "must be between 1s and 1d"),
        ("REPLY_TIMEOUT", "0s", "must be between 100ms and 5m"),
        ("SWEEP_INTERVAL", "1ns", "must be between 10ms and 1m"),
        ("FLOOD_BLOCK", "400d", "must be between 1s and 30d"),
        ("BODY_READ_TIMEOUT", "0s", "must be between 100ms and 5m"),
        ("HOLD_TTL", "2h", "must be shorter than QUOTA_WINDOW=1h"),
        ("DECISION_RETENTION", "1d", "must be between 2d and 3660d"),
        ("HISTORY_RETENTION", "7d", "must be between 31d and 36600d"),
        (
            "REQUEST_ID_HORIZON",
            "300d",
            "must not be longer than DECISION_RETENTION=35d",
        ),
        (
            "COUPON_ADMIN_TOKEN",
            "same-token",
            "COUPON_API_TOKEN and COUPON_ADMIN_TOKEN are the same",
        ),
    ];
    for args in [&["run"][..], &["gateway"], &["consume", "claims"]] {
        for (var, value, expected) in cases {
            if var == "COUPON_ADMIN_TOKEN" && args[0] == "consume" {
                continue; // a consumer serves no tokens
            }
            let started = Instant::now();
            let mut child = env
                .couponctl()
                .args(args)
                .env(var, value)
                .env("QUOTA_WINDOW", "1h")
                .env("COUPON_API_TOKEN", "same-token")
                .env("HTTP_ADDR", "127.0.0.1:0")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("run couponctl");
            // A setting let through starts the server, which never exits.
            while child.try_wait().expect("wait").is_none() {
                if started.elapsed() > Duration::from_secs(8) {
                    let _ = child.kill();
                    panic!("{args:?} with {var}={value} started instead of refusing");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let output = child.wait_with_output().expect("couponctl output");
            let stderr = String::from_utf8_lossy(&output.stderr);
            let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
            assert_ne!(output.status.code(), Some(0), "{args:?} {var}={value}");
            // The line names the setting (clap's own refusals quote the
            // flag and the variable).
            assert!(
                lines.first().is_some_and(|l| l.starts_with("error: ")
                    && l.contains(expected)
                    && (l.contains(var) || l.contains("--"))),
                "{args:?} {var}={value}: {stderr}"
            );
            assert_eq!(lines.len(), 1, "{args:?} {var}={value}: {stderr}");
            assert!(started.elapsed() < Duration::from_secs(8));
        }
    }
}

/// The subcommands listed under `Commands:` in a help text (without `help`).
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|line| line.trim() != "Commands:")
        .skip(1)
        .take_while(|line| line.starts_with("  "))
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect()
}

fn help_of(path: &[String]) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_couponctl"))
        .args(path)
        .arg("--help")
        .output()
        .expect("couponctl --help");
    assert!(output.status.success(), "couponctl {path:?} --help failed");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn every_subcommand_help_has_an_example() {
    let mut todo: Vec<Vec<String>> = subcommands(&help_of(&[]))
        .into_iter()
        .map(|name| vec![name])
        .collect();
    assert!(todo.len() >= 14, "top-level commands: {todo:?}");
    let mut seen = Vec::new();
    while let Some(path) = todo.pop() {
        let help = help_of(&path);
        assert!(
            help.contains("\nExample:\n") || help.contains("\nExamples:\n"),
            "`couponctl {} --help` has no example section:\n{help}",
            path.join(" ")
        );
        for child in subcommands(&help) {
            let mut child_path = path.clone();
            child_path.push(child);
            todo.push(child_path);
        }
        seen.push(path.join(" "));
    }
    for expected in ["run", "consume", "blacklist add", "holds rebuild", "replay"] {
        assert!(seen.iter().any(|s| s == expected), "{expected} not checked");
    }
}

/// The history role with Cassandra down reports the outage itself, one
/// line per retry with its backoff. The Cassandra driver's own log is off
/// by default: it repeats the same failure, as warnings and errors, every
/// second for as long as a node is down (its control connection repair),
/// which drowned everything else in a long outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cassandra_down_is_reported_by_the_history_role_not_by_the_driver() {
    use std::io::{BufRead as _, BufReader};
    let env = TestEnv::new().await;
    let port = closed_port();
    let mut child = env
        .couponctl()
        .args(["consume", "history"])
        .env("HISTORY_STORE", "cassandra")
        .env("CASSANDRA_NODES", format!("127.0.0.1:{port}"))
        .env("HTTP_ADDR", "127.0.0.1:0")
        .env_remove("RUST_LOG")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("run couponctl");
    let stderr = child.stderr.take().expect("stderr");
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut seen, mut ours) = (Vec::new(), 0);
    while ours < 3 {
        let left = deadline.saturating_duration_since(Instant::now());
        match received.recv_timeout(left) {
            Ok(line) => {
                ours += usize::from(line.contains("cannot reach Cassandra yet"));
                seen.push(line);
            }
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        ours >= 3,
        "the role's own retry lines; got:\n{}",
        seen.join("\n")
    );
    let driver: Vec<&String> = seen.iter().filter(|l| l.contains("scylla")).collect();
    assert!(driver.is_empty(), "the driver's lines: {driver:#?}");
}
