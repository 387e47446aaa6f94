//! `couponctl demo`: the main job end to end on the embedded default.
//!
//! It starts every role in this process against a fresh database, releases
//! coupons in two categories through the HTTP API, lets a burst of users
//! claim at once (one of them blacklisted, some retrying), has half the
//! winners buy and the rest let their short hold expire, lets a second wave
//! claim the released coupons, and prints what happened next to what the
//! database says, with the spec's invariants checked. It cleans up after
//! itself unless asked to keep the database.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures::stream::{self, StreamExt};
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use coupon_platform::store::stats;

use crate::app::{self, AppConfig, Role};

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub users: usize,
    pub electronics: u32,
    pub books: u32,
    pub hold_ttl: Duration,
    /// Keep the demo database (and print its URL) instead of dropping it.
    pub keep: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            users: 1_000,
            electronics: 300,
            books: 200,
            hold_ttl: Duration::from_secs(3),
            keep: false,
        }
    }
}

/// What the simulated users were answered, and what the database says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DemoSummary {
    pub issued: i64,
    pub granted: i64,
    pub sold_out: i64,
    pub blacklisted: i64,
    pub retried_same_coupon: i64,
    pub redeemed: i64,
    pub expired: i64,
    pub regranted: i64,
    pub rate_limited: i64,
    pub db_available: i64,
    pub db_held: i64,
    pub db_redeemed: i64,
    pub db_released: i64,
    pub db_granted: i64,
    /// The database URL, when kept.
    pub database_url: Option<String>,
}

struct Http {
    client: reqwest::Client,
    base: String,
    admin_token: String,
}

impl Http {
    async fn claim(&self, user: &str, category: Option<&str>) -> anyhow::Result<(u16, Value)> {
        let mut url = format!("{}/api/v1/coupon?id={user}", self.base);
        if let Some(category) = category {
            url.push_str(&format!("&category={category}"));
        }
        let response = self.client.get(url).send().await?;
        Ok((
            response.status().as_u16(),
            response.json().await.unwrap_or(Value::Null),
        ))
    }

    async fn purchase(&self, user: &str, code: &str, order: &str) -> anyhow::Result<(u16, Value)> {
        let response = self
            .client
            .post(format!("{}/api/v1/purchase", self.base))
            .json(&json!({"user_id": user, "coupon_code": code, "order_id": order}))
            .send()
            .await?;
        Ok((
            response.status().as_u16(),
            response.json().await.unwrap_or(Value::Null),
        ))
    }

    async fn release(&self, category: &str, count: u32) -> anyhow::Result<()> {
        let response = self
            .client
            .post(format!("{}/api/v1/coupon", self.base))
            .bearer_auth(&self.admin_token)
            .json(&json!({"id": "demo-employee", "category": category, "count": count}))
            .send()
            .await?;
        if response.status().as_u16() != 202 {
            bail!("releasing {category} answered {}", response.status());
        }
        Ok(())
    }
}

fn progress(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {msg:<28} [{bar:30}] {pos}/{len} ({per_sec})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}

async fn wait_for(
    what: &str,
    within: Duration,
    mut check: impl AsyncFnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while !check().await? {
        if Instant::now() > deadline {
            bail!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Runs the demo. `base` says where the services are; the demo uses its own
/// database on that server and its own topic and Redis prefixes.
pub async fn run(base: AppConfig, options: DemoOptions) -> anyhow::Result<DemoSummary> {
    // Before the scratch database exists, so a missing service leaves nothing behind.
    app::check_services(&base).await?;
    let stamp = chrono::Utc::now().format("%Y%m%d%H%M%S").to_string();
    let scratch =
        app::ScratchDatabase::create(&base.database_url, &format!("coupons_demo_{stamp}")).await?;
    let database_url = scratch.url.clone();
    let name = scratch.name.clone();

    let mut config = base.clone();
    config.database_url = database_url.clone();
    config.topic_prefix = format!("demo{stamp}");
    config.redis_prefix = config.topic_prefix.clone();
    config.http_addr = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    config.policy.hold_ttl = options.hold_ttl;
    config.partitions = 2;
    config.sweep_interval = Duration::from_millis(250);
    config.gateway.admin_token = Some(uuid::Uuid::new_v4().to_string().into());
    config.gateway.reply_timeout = Duration::from_secs(30);
    // The users' limits are the defaults a user gets: the simulated users
    // come from this machine (loopback), which the address limit leaves
    // alone, and without a storefront token nobody is blocked for flooding.
    eprintln!(
        "demo: database {name}, topics {}.*, hold {:?}",
        config.topic_prefix, options.hold_ttl
    );

    let token = CancellationToken::new();
    let running = app::start(config.clone(), &Role::ALL, token.clone()).await?;
    let pool = running.context.pool.clone();
    let cache = running.context.cache.clone();
    let http = Http {
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()?,
        base: format!(
            "http://{}",
            running.http_addr.context("the gateway did not start")?
        ),
        admin_token: config
            .gateway
            .admin_token
            .as_ref()
            .map(|t| t.expose().to_owned())
            .unwrap_or_default(),
    };
    let outcome = scenario(&Demo {
        http: &http,
        pool: &pool,
        publisher: &running.context.publisher,
        topics: &running.context.topics,
        options: &options,
    })
    .await;
    token.cancel();
    running.wait().await?;
    let mut summary = outcome?;
    if options.keep {
        summary.database_url = Some(database_url);
    } else {
        let _ = cache.clear().await;
        pool.close().await;
        scratch.drop_now().await?;
    }
    Ok(summary)
}

/// What every step of the scenario works with.
struct Demo<'a> {
    http: &'a Http,
    pool: &'a PgPool,
    publisher: &'a coupon_platform::kafka::Publisher,
    topics: &'a coupon_platform::Topics,
    options: &'a DemoOptions,
}

/// A user and the code of the coupon they were granted.
type Winner = (String, String);

async fn scenario(demo: &Demo<'_>) -> anyhow::Result<DemoSummary> {
    let mut summary = DemoSummary::default();
    release(demo, &mut summary).await?;
    blacklist_an_abuser(demo).await?;
    let winners = burst(demo, &mut summary).await?;
    double_clicks(demo, &winners, &mut summary).await?;
    purchases(demo, &winners, &mut summary).await?;
    expirations(demo, &mut summary).await?;
    let late_granted = second_wave(demo, &winners, &mut summary).await?;
    read_the_database(demo.pool, late_granted, &mut summary).await?;
    check_invariants(demo.pool, &summary).await?;
    Ok(summary)
}

/// Step 1: Employees release two categories.
async fn release(demo: &Demo<'_>, summary: &mut DemoSummary) -> anyhow::Result<()> {
    let options = demo.options;
    let issued = i64::from(options.electronics + options.books);
    demo.http
        .release("Electronics", options.electronics)
        .await?;
    demo.http.release("Books", options.books).await?;
    wait_for(
        "the release to be projected",
        Duration::from_secs(60),
        async || Ok(stats::status_counts(demo.pool).await?.total() == issued),
    )
    .await?;
    summary.issued = issued;
    eprintln!(
        "demo: released {} Electronics and {} Books coupons",
        options.electronics, options.books
    );
    Ok(())
}

/// Step 2: One known abuser.
async fn blacklist_an_abuser(demo: &Demo<'_>) -> anyhow::Result<()> {
    let blacklist = coupon_producers::blacklist::Blacklist {
        pool: demo.pool,
        publisher: demo.publisher,
        topics: demo.topics,
    };
    blacklist
        .add(
            &coupon_domain::UserId::parse("mallory")?,
            None,
            "demo: known abuser",
            coupon_producers::blacklist::Source::Manual(&coupon_domain::EmployeeId::parse("demo")?),
        )
        .await?;
    // The gateways reread the blacklist every BLACKLIST_REFRESH for the
    // sold-out fast path; the burst starts once they have seen mallory.
    tokio::time::sleep(coupon_producers::gateway::BLACKLIST_REFRESH + Duration::from_millis(500))
        .await;
    Ok(())
}

/// Step 3: The burst: every user at once; every third asks for Books.
async fn burst(demo: &Demo<'_>, summary: &mut DemoSummary) -> anyhow::Result<Vec<Winner>> {
    let users_count = demo.options.users;
    let bar = progress(users_count as u64 + 1, "burst of claims");
    let mut users: Vec<(String, Option<&str>)> = (0..users_count)
        .map(|i| (format!("user-{i:05}"), (i % 3 == 0).then_some("Books")))
        .collect();
    users.push(("mallory".into(), None));
    let answers: Vec<(String, anyhow::Result<(u16, Value)>)> = stream::iter(users)
        .map(|(user, category)| {
            let bar = bar.clone();
            async move {
                let answer = demo.http.claim(&user, category).await;
                bar.inc(1);
                (user, answer)
            }
        })
        .buffer_unordered(128)
        .collect()
        .await;
    bar.finish_and_clear();
    let mut winners: Vec<Winner> = Vec::new();
    for (user, answer) in answers {
        let (status, body) = answer?;
        match status {
            200 => winners.push((
                user,
                body["coupon_code"].as_str().unwrap_or_default().to_owned(),
            )),
            404 => summary.sold_out += 1,
            403 => summary.blacklisted += 1,
            other => bail!("unexpected answer {other} for {user}: {body}"),
        }
    }
    winners.sort();
    summary.granted = winners.len() as i64;
    eprintln!(
        "demo: burst of {} claims: {} granted, {} sold out, {} blacklisted",
        users_count + 1,
        summary.granted,
        summary.sold_out,
        summary.blacklisted
    );
    Ok(winners)
}

/// Step 4: Every tenth winner double-clicks: the same coupon comes back.
async fn double_clicks(
    demo: &Demo<'_>,
    winners: &[Winner],
    summary: &mut DemoSummary,
) -> anyhow::Result<()> {
    for (user, code) in winners.iter().step_by(10) {
        let (status, body) = demo.http.claim(user, None).await?;
        if status == 200 && body["coupon_code"].as_str() == Some(code.as_str()) {
            summary.retried_same_coupon += 1;
        } else {
            bail!("{user} retried and got {status} {body} instead of {code}");
        }
    }
    Ok(())
}

/// Step 5: Half the winners buy in time; the others let the hold run out.
async fn purchases(
    demo: &Demo<'_>,
    winners: &[Winner],
    summary: &mut DemoSummary,
) -> anyhow::Result<()> {
    let bar = progress(winners.len().div_ceil(2) as u64, "purchases");
    let buyers: Vec<&Winner> = winners.iter().step_by(2).collect();
    let bought: Vec<anyhow::Result<(u16, Value)>> = stream::iter(buyers.iter().enumerate())
        .map(|(i, (user, code))| {
            let bar = bar.clone();
            async move {
                let answer = demo.http.purchase(user, code, &format!("order-{i}")).await;
                bar.inc(1);
                answer
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    bar.finish_and_clear();
    for answer in bought {
        let (status, body) = answer?;
        match status {
            200 => summary.redeemed += 1,
            409 if body["error"] == "hold_expired" => {}
            other => bail!("unexpected purchase answer {other}: {body}"),
        }
    }
    eprintln!(
        "demo: {} bought, {} holds left to expire",
        summary.redeemed,
        summary.granted - summary.redeemed
    );
    Ok(())
}

/// Step 6: The unbought holds end and their coupons return to the pool.
async fn expirations(demo: &Demo<'_>, summary: &mut DemoSummary) -> anyhow::Result<()> {
    wait_for(
        "unbought holds to expire",
        demo.options.hold_ttl + Duration::from_secs(30),
        async || Ok(stats::active_holds(demo.pool).await? == 0),
    )
    .await?;
    // Every hold has ended: those not bought were released. Counted from
    // the coupons' state, not the history, which may be in Cassandra.
    let redeemed = stats::status_counts(demo.pool).await?.redeemed;
    summary.expired = stats::first_grants(demo.pool).await? - redeemed;
    eprintln!(
        "demo: {} holds expired and went back to the pool",
        summary.expired
    );
    Ok(())
}

/// Step 7: A second wave takes the released coupons; the first wave's quota
/// stays used. Returns how many of the second wave were granted.
async fn second_wave(
    demo: &Demo<'_>,
    winners: &[Winner],
    summary: &mut DemoSummary,
) -> anyhow::Result<i64> {
    let previous_holders: HashMap<&str, &str> = winners
        .iter()
        .map(|(u, c)| (c.as_str(), u.as_str()))
        .collect();
    let late: Vec<String> = (0..summary.expired.max(1) + 20)
        .map(|i| format!("late-{i:05}"))
        .collect();
    let late_answers: Vec<(String, anyhow::Result<(u16, Value)>)> = stream::iter(late)
        .map(|user| async move {
            let answer = demo.http.claim(&user, None).await;
            (user, answer)
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let mut late_granted = 0;
    for (user, answer) in late_answers {
        let (status, body) = answer?;
        match status {
            200 => {
                late_granted += 1;
                let code = body["coupon_code"].as_str().unwrap_or_default();
                if previous_holders
                    .get(code)
                    .is_some_and(|first| *first != user)
                {
                    summary.regranted += 1;
                }
            }
            404 => summary.sold_out += 1,
            other => bail!("unexpected answer {other} for {user}: {body}"),
        }
    }
    for (user, _) in winners.iter().skip(1).step_by(2).take(20) {
        let (status, _) = demo.http.claim(user, None).await?;
        if status == 429 {
            summary.rate_limited += 1;
        } else {
            bail!("{user} claimed twice in one window and got {status}");
        }
    }
    Ok(late_granted)
}

/// Step 8: What the database says, next to what the users were told.
async fn read_the_database(
    pool: &PgPool,
    late_granted: i64,
    summary: &mut DemoSummary,
) -> anyhow::Result<()> {
    let counts = stats::status_counts(pool).await?;
    summary.db_available = counts.available;
    summary.db_held = counts.held;
    summary.db_redeemed = counts.redeemed;
    summary.db_released = summary.expired;
    summary.db_granted = stats::first_grants(pool).await?;
    if summary.db_granted != summary.granted + late_granted {
        bail!(
            "the database recorded {} grants, the users were told {}",
            summary.db_granted,
            summary.granted + late_granted
        );
    }
    Ok(())
}

async fn check_invariants(pool: &PgPool, s: &DemoSummary) -> anyhow::Result<()> {
    if s.db_available + s.db_held + s.db_redeemed != s.issued {
        bail!("invariant broken: available + held + redeemed != issued");
    }
    let breaches = stats::allocation_breaches(pool).await?;
    if breaches != stats::AllocationBreaches::default() {
        bail!(
            "invariant broken: {} users with two holds, {} double grants",
            breaches.users_holding_twice,
            breaches.users_granted_twice
        );
    }
    if s.db_redeemed != s.redeemed {
        bail!(
            "the database has {} redeemed coupons, the users were told {}",
            s.db_redeemed,
            s.redeemed
        );
    }
    Ok(())
}

impl std::fmt::Display for DemoSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rows = [
            ("issued", self.issued, "coupons released by employees"),
            ("granted", self.granted, "first-wave claims answered 200"),
            ("sold out", self.sold_out, "claims answered 404 sold_out"),
            ("blacklisted", self.blacklisted, "claims answered 403"),
            (
                "retried, same coupon",
                self.retried_same_coupon,
                "double clicks answered with the held coupon",
            ),
            ("redeemed", self.redeemed, "purchases answered 200"),
            ("expired", self.expired, "holds released unbought"),
            (
                "re-granted",
                self.regranted,
                "released coupons granted to the second wave",
            ),
            (
                "rate limited",
                self.rate_limited,
                "second claims in the window answered 429",
            ),
        ];
        writeln!(f, "{:<22} {:>8}  meaning", "outcome", "count")?;
        for (name, value, meaning) in rows {
            writeln!(f, "{name:<22} {value:>8}  {meaning}")?;
        }
        writeln!(
            f,
            "database: {} available + {} held + {} redeemed = {} issued; {} grants recorded",
            self.db_available,
            self.db_held,
            self.db_redeemed,
            self.db_available + self.db_held + self.db_redeemed,
            self.db_granted
        )?;
        write!(
            f,
            "invariants: one holder per coupon, one grant per user per window, conservation: ok"
        )
    }
}
