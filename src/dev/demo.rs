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

/// One compile-checked count (`count(*)` is never NULL; sqlx cannot tell).
macro_rules! count {
    ($pool:expr, $sql:literal) => {
        sqlx::query_scalar!($sql)
            .fetch_one($pool)
            .await
            .map(Option::unwrap_or_default)
            .context($sql)
    };
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
    let outcome = scenario(
        &http,
        &pool,
        &running.context.publisher,
        &running.context.topics,
        &options,
    )
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

async fn scenario(
    http: &Http,
    pool: &PgPool,
    publisher: &coupon_platform::kafka::Publisher,
    topics: &coupon_platform::Topics,
    options: &DemoOptions,
) -> anyhow::Result<DemoSummary> {
    let mut summary = DemoSummary::default();
    let issued = i64::from(options.electronics + options.books);

    // 1. Employees release two categories.
    http.release("Electronics", options.electronics).await?;
    http.release("Books", options.books).await?;
    wait_for(
        "the release to be projected",
        Duration::from_secs(60),
        async || Ok(count!(pool, "SELECT count(*) FROM coupons")? == issued),
    )
    .await?;
    summary.issued = issued;
    eprintln!(
        "demo: released {} Electronics and {} Books coupons",
        options.electronics, options.books
    );

    // 2. One known abuser.
    let blacklist = coupon_producers::blacklist::Blacklist {
        pool,
        publisher,
        topics,
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

    // 3. The burst: every user at once; every third asks for Books.
    let bar = progress(options.users as u64 + 1, "burst of claims");
    let mut users: Vec<(String, Option<&str>)> = (0..options.users)
        .map(|i| (format!("user-{i:05}"), (i % 3 == 0).then_some("Books")))
        .collect();
    users.push(("mallory".into(), None));
    let answers: Vec<(String, anyhow::Result<(u16, Value)>)> = stream::iter(users)
        .map(|(user, category)| {
            let bar = bar.clone();
            async move {
                let answer = http.claim(&user, category).await;
                bar.inc(1);
                (user, answer)
            }
        })
        .buffer_unordered(128)
        .collect()
        .await;
    bar.finish_and_clear();
    let mut winners: Vec<(String, String)> = Vec::new();
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
        options.users + 1,
        summary.granted,
        summary.sold_out,
        summary.blacklisted
    );

    // 4. Every tenth winner double-clicks: the same coupon comes back.
    for (user, code) in winners.iter().step_by(10) {
        let (status, body) = http.claim(user, None).await?;
        if status == 200 && body["coupon_code"].as_str() == Some(code.as_str()) {
            summary.retried_same_coupon += 1;
        } else {
            bail!("{user} retried and got {status} {body} instead of {code}");
        }
    }

    // 5. Half the winners buy in time; the others let the hold run out.
    let bar = progress(winners.len().div_ceil(2) as u64, "purchases");
    let buyers: Vec<&(String, String)> = winners.iter().step_by(2).collect();
    let bought: Vec<anyhow::Result<(u16, Value)>> = stream::iter(buyers.iter().enumerate())
        .map(|(i, (user, code))| {
            let bar = bar.clone();
            async move {
                let answer = http.purchase(user, code, &format!("order-{i}")).await;
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
    let expiring = summary.granted - summary.redeemed;
    eprintln!(
        "demo: {} bought, {} holds left to expire",
        summary.redeemed, expiring
    );

    // 6. The unbought holds end and their coupons return to the pool.
    wait_for(
        "unbought holds to expire",
        options.hold_ttl + Duration::from_secs(30),
        async || Ok(count!(pool, "SELECT count(*) FROM coupons WHERE status = 'held'")? == 0),
    )
    .await?;
    summary.expired = count!(
        pool,
        "SELECT count(*) FROM coupon_history WHERE kind = 'released'"
    )?;
    eprintln!(
        "demo: {} holds expired and went back to the pool",
        summary.expired
    );

    // 7. A second wave takes the released coupons; the first wave's quota stays used.
    let previous_holders: HashMap<String, String> = winners
        .iter()
        .map(|(u, c)| (c.clone(), u.clone()))
        .collect();
    let late: Vec<String> = (0..summary.expired.max(1) + 20)
        .map(|i| format!("late-{i:05}"))
        .collect();
    let late_answers: Vec<(String, anyhow::Result<(u16, Value)>)> = stream::iter(late)
        .map(|user| async move {
            let answer = http.claim(&user, None).await;
            (user, answer)
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let mut regranted = 0;
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
                    regranted += 1;
                }
            }
            404 => summary.sold_out += 1,
            other => bail!("unexpected answer {other} for {user}: {body}"),
        }
    }
    summary.regranted = regranted;
    for (user, _) in winners.iter().skip(1).step_by(2).take(20) {
        let (status, _) = http.claim(user, None).await?;
        if status == 429 {
            summary.rate_limited += 1;
        } else {
            bail!("{user} claimed twice in one window and got {status}");
        }
    }

    // 8. What the database says.
    summary.db_available = count!(
        pool,
        "SELECT count(*) FROM coupons WHERE status = 'available'"
    )?;
    summary.db_held = count!(pool, "SELECT count(*) FROM coupons WHERE status = 'held'")?;
    summary.db_redeemed = count!(
        pool,
        "SELECT count(*) FROM coupons WHERE status = 'redeemed'"
    )?;
    summary.db_released = summary.expired;
    summary.db_granted = count!(
        pool,
        "SELECT count(*) FROM claim_decisions WHERE outcome = 'granted' AND NOT repeated"
    )?;
    if summary.db_granted != summary.granted + late_granted {
        bail!(
            "the database recorded {} grants, the users were told {}",
            summary.db_granted,
            summary.granted + late_granted
        );
    }
    check_invariants(pool, &summary).await?;
    Ok(summary)
}

async fn check_invariants(pool: &PgPool, s: &DemoSummary) -> anyhow::Result<()> {
    if s.db_available + s.db_held + s.db_redeemed != s.issued {
        bail!("invariant broken: available + held + redeemed != issued");
    }
    let double_holds = count!(pool, "SELECT count(*) FROM (SELECT holder_user_id FROM coupons WHERE status = 'held' GROUP BY 1 HAVING count(*) > 1) d")?;
    let double_grants = count!(pool, "SELECT count(*) FROM (SELECT user_id FROM quota_grants GROUP BY user_id, window_start HAVING count(*) > 1) d")?;
    if double_holds + double_grants > 0 {
        bail!(
            "invariant broken: {double_holds} users with two holds, {double_grants} double grants"
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
