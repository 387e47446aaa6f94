//! The flash sale as users run it: `couponctl run` in a process of its own,
//! started as the README starts it (default logging, both tokens set),
//! driven from outside by `wrk` with a new user on every request, beside
//! `wrk` on the same server's `/healthz` in the same run.
//!
//! The in-process rows measure the pipeline; these measure the product: the
//! logging, the token checks and the HTTP stack a storefront meets. A figure
//! only the in-process bench reaches is not the product's figure.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use coupon_platform::store::stats;

use super::grant_path::{append_batches, Recorder};
use super::{profile, vegeta, wrk, Row, Scenario};

mod day30;
mod open_loop;

use crate::app::{self, AppConfig};
pub use open_loop::OpenLoop;

/// wrk's script: every request claims as a user of its own (`<prefix>-<thread>-<n>`),
/// with the storefront's token, in the category its third argument names.
const CLAIMS_LUA: &str = r#"
local threads = {}
function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end
function init(args)
  n = 0
  prefix = args[1] .. "-" .. tid .. "-"
  headers = { ["Authorization"] = "Bearer " .. args[2] }
  category = args[3]
end
function request()
  n = n + 1
  return wrk.format("GET", "/api/v1/coupon?category=" .. category .. "&id=" .. prefix .. n, headers)
end
"#;

/// How long each `wrk` run lasts.
const WRK_SECONDS: u64 = 20;

/// The rows of `couponctl run` driven from outside, or none when `wrk` is
/// not installed: day 1 (the flash sale and `/healthz`, then the open-loop
/// rows) on one server, then day 30 on a second one whose database gets a
/// month loaded first (unless `day30_per_day` is 0 or `vegeta` is missing),
/// so that both days' flash sale and steady sale start from the same state
/// but for the month.
pub async fn as_run(
    base: &AppConfig,
    coupons: u32,
    connections: usize,
    day30_per_day: usize,
) -> anyhow::Result<Vec<Row>> {
    if std::process::Command::new("wrk")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("bench: no rows of couponctl run as users run it (wrk is not installed)");
        return Ok(Vec::new());
    }
    let stamp = chrono::Utc::now().format("%Y%m%d%H%M%S").to_string();
    let mut rows = on_own_server(base, &stamp, Day::One, coupons, connections).await?;
    if day30_per_day > 0 && vegeta::installed() {
        let per_day = day30_per_day;
        rows.extend(
            on_own_server(base, &stamp, Day::Thirty { per_day }, coupons, connections).await?,
        );
    }
    Ok(rows)
}

/// Which rows a server of its own runs.
#[derive(Debug, Clone, Copy)]
enum Day {
    One,
    /// After 29 days of `per_day` claims were loaded into its database.
    Thirty {
        per_day: usize,
    },
}

/// Starts a `couponctl run` on a scratch database, runs `day`'s rows
/// against it, stops it, and deletes its database, topics and Redis keys.
async fn on_own_server(
    base: &AppConfig,
    stamp: &str,
    day: Day,
    coupons: u32,
    connections: usize,
) -> anyhow::Result<Vec<Row>> {
    let suffix = match day {
        Day::One => "",
        Day::Thirty { .. } => "d30",
    };
    let scratch = app::ScratchDatabase::create(
        &base.database_url,
        &format!("coupons_asrun_{stamp}{suffix}"),
    )
    .await?;
    let prefix = format!("asrun{stamp}{suffix}");
    let server = Server::start(base, &scratch.url, &prefix).await;
    let result = match server {
        Ok(mut server) => {
            let rows = match day {
                Day::One => {
                    drive(
                        &server,
                        &scratch.url,
                        coupons,
                        connections,
                        base.gateway.max_waiting,
                    )
                    .await
                }
                Day::Thirty { per_day } => {
                    day30::rows(&server, &scratch.url, coupons, connections, per_day).await
                }
            };
            server.stop().await;
            rows.map(|mut rows| {
                let log = server.log_note();
                for row in &mut rows {
                    row.note = format!("{}; {log}", row.note);
                }
                rows
            })
        }
        Err(error) => Err(error),
    };
    // Its topics and Redis keys go with its database (half a million holds
    // and quota keys a run, left behind until this was added).
    let mut own = base.clone();
    own.topic_prefix = prefix.clone();
    own.redis_prefix = prefix;
    super::forget_run(&own).await;
    scratch.drop_now().await?;
    result
}

/// A `couponctl run` of its own: its address, tokens and log file.
struct Server {
    child: tokio::process::Child,
    base: String,
    api_token: String,
    admin_token: String,
    prefix: String,
    log: std::path::PathBuf,
}

impl Server {
    async fn start(config: &AppConfig, database_url: &str, prefix: &str) -> anyhow::Result<Self> {
        // A free port: bound and let go, for the child to bind.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .context("a free port for couponctl run")?;
        let log = std::env::temp_dir().join(format!("couponctl-{prefix}.log"));
        let file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let (api_token, admin_token) = (
            uuid::Uuid::new_v4().to_string(),
            uuid::Uuid::new_v4().to_string(),
        );
        let exe = std::env::current_exe().context("finding couponctl")?;
        let child = tokio::process::Command::new(exe)
            .arg("run")
            .env("DATABASE_URL", database_url)
            .env("REDIS_URL", &config.redis_url)
            .env("KAFKA_BROKERS", &config.kafka.brokers)
            .env("COUPON_TOPIC_PREFIX", prefix)
            .env("COUPON_REDIS_PREFIX", prefix)
            .env("HTTP_ADDR", addr.to_string())
            .env("COUPON_API_TOKEN", &api_token)
            .env("COUPON_ADMIN_TOKEN", &admin_token)
            // The defaults, as a user who set nothing has them.
            .env_remove("RUST_LOG")
            .env_remove("LOG_FORMAT")
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .context("starting couponctl run")?;
        let server = Server {
            child,
            base: format!("http://{addr}"),
            api_token,
            admin_token,
            prefix: prefix.to_owned(),
            log,
        };
        server.ready().await?;
        Ok(server)
    }

    async fn ready(&self) -> anyhow::Result<()> {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let answer = http.get(format!("{}/healthz", self.base)).send().await;
            if answer.is_ok_and(|a| a.status().is_success()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "couponctl run did not serve within 60 s (log: {})",
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Ctrl-C, as an operator stops it; killed if it does not stop.
    async fn stop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = tokio::process::Command::new("kill")
                .args(["-INT", &pid.to_string()])
                .status()
                .await;
        }
        if tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }

    /// What the default logging wrote over the run.
    fn log_note(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let _ = std::fs::remove_file(&self.log);
        format!(
            "default logging: {} lines, {:.1} MB, {} with colour codes",
            text.lines().count(),
            text.len() as f64 / 1e6,
            text.lines().filter(|l| l.contains('\u{1b}')).count()
        )
    }
}

async fn drive(
    server: &Server,
    database_url: &str,
    coupons: u32,
    connections: usize,
    max_waiting: usize,
) -> anyhow::Result<Vec<Row>> {
    let db = sqlx::PgPool::connect(database_url).await?;
    release_projected(server, &db, "AsRun", coupons).await?;
    let recorder = Recorder::Served(&server.base);
    let batches_before = recorder.snapshot().await;
    let (claims, claims_cpu) = wrk_claims(server, "AsRun", connections).await?;
    let batches_after = recorder.snapshot().await;
    let granted = stats::status_counts(&db).await?.held;
    let (healthz, healthz_cpu) =
        run_wrk(&[&format!("{}/healthz", server.base)], connections).await?;
    let ratio = claims.per_second / healthz.per_second.max(1e-9);
    let mut rows = vec![
        claims.row(
            Scenario::AsRunClaims,
            "flash sale as users run it: couponctl run, token on, wrk claims",
            format!(
                "default logging (info, one line per request); {ratio:.2}x wrk's /healthz on the same server; {coupons} coupons, {granted} granted, {} answered sold out (non-2xx); wrk -t2 -c{connections} -d{WRK_SECONDS}s, a new user per request; {claims_cpu}",
                claims.non_2xx
            ),
        ),
        healthz.row(
            Scenario::AsRunHealthz,
            "baseline: /healthz of that couponctl run, wrk",
            format!("default logging; wrk -t2 -c{connections} -d{WRK_SECONDS}s; {healthz_cpu}"),
        ),
    ];
    append_batches(&mut rows[0], &batches_before, &batches_after);
    rows.extend(open_loop::rows(server, &db, max_waiting).await?);
    Ok(rows)
}

/// Claims by `wrk` (closed loop) for [`WRK_SECONDS`], a new user on each,
/// in `category`.
async fn wrk_claims(
    server: &Server,
    category: &str,
    connections: usize,
) -> anyhow::Result<(wrk::Summary, String)> {
    let script = std::env::temp_dir().join(format!("couponctl-{}.lua", server.prefix));
    std::fs::write(&script, CLAIMS_LUA).context("writing wrk's script")?;
    let url = format!("{}/api/v1/coupon", server.base);
    let script_arg = script.to_string_lossy().into_owned();
    let prefix = format!("{}-{}", server.prefix, category.to_lowercase());
    let claims = run_wrk(
        &[
            "-s",
            &script_arg,
            &url,
            "--",
            &prefix,
            &server.api_token,
            category,
        ],
        connections,
    )
    .await;
    let _ = std::fs::remove_file(&script);
    claims
}

/// Releases `coupons` in `category` and waits until Postgres has them all.
async fn release_projected(
    server: &Server,
    db: &sqlx::PgPool,
    category: &str,
    coupons: u32,
) -> anyhow::Result<()> {
    let before = stats::status_counts(db).await?.total();
    release(server, category, coupons).await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while stats::status_counts(db).await?.total() < before + i64::from(coupons) {
        if Instant::now() > deadline {
            bail!("the release of {coupons} coupons was not projected within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Releases `coupons` in `category` through the admin route, as an employee's
/// tool does, without waiting for them to be projected.
async fn release(server: &Server, category: &str, coupons: u32) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let mut left = coupons;
    while left > 0 {
        let count = left.min(coupon_producers::gateway::MAX_HTTP_ISSUE);
        let answer = http
            .post(format!("{}/api/v1/coupon", server.base))
            .bearer_auth(&server.admin_token)
            .json(&serde_json::json!({"id": "bench", "category": category, "count": count}))
            .send()
            .await?;
        if !answer.status().is_success() {
            bail!("the release answered {}", answer.status());
        }
        left -= count;
    }
    Ok(())
}

/// `wrk --latency` with `args` (the URL among them), and where the
/// machine's CPU went meanwhile.
async fn run_wrk(args: &[&str], connections: usize) -> anyhow::Result<(wrk::Summary, String)> {
    let before = profile::CpuSample::now();
    let summary = wrk::run(connections, WRK_SECONDS, args)
        .await?
        .context("wrk is not installed")?;
    Ok((summary, profile::since(before).unwrap_or_default()))
}
