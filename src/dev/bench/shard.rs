//! The sharding rows (README "Sharding"): the claim path against one
//! Postgres server, then against two with the users split between them.
//!
//! The claim processor's own batch function (`claims::handle_events`, with
//! the running system's broker, Redis and policy) decides every claim; only
//! its database differs. Each shard is a fresh database on its own server
//! (`make shard-up`), holding its slice of the release
//! (`coupon_domain::shard::slices`) and deciding the claims of the
//! partitions it owns (`shard_of_partition`). Nothing in a shard's run can
//! reach the other server, so a claim that decides there is a single-shard
//! claim; the rows then check that every user's quota and decision landed
//! on the user's shard and nowhere else, and name the statements each shard
//! ran (`pg_stat_statements`, which `make shard-up` loads).

use std::collections::HashMap;
use std::time::Instant;

use anyhow::Context as _;
use chrono::Utc;
use prost::Message as _;
use sqlx::PgPool;

use coupon_consumers::{claims, Context};
use coupon_domain::shard::{partition_of, shard_of_partition, shard_of_user, slices};
use coupon_domain::snowflake::{SnowflakeGenerator, SystemClock};
use coupon_domain::{Category, CouponCode, EmployeeId};
use coupon_platform::kafka::Record;
use coupon_platform::store::coupons::{insert_coupons, NewCoupon};
use coupon_platform::store::stats;
use coupon_schemas::ClaimRequested;

use super::{Row, Scenario};
use crate::app::{AppConfig, ScratchDatabase};

const CATEGORY: &str = "Sharded";

/// One shard of a run: its database and the context its claims decide in.
struct Shard {
    database: ScratchDatabase,
    context: Context,
}

/// Runs the claim path for `users` users on the first shard alone, then on
/// every shard of `urls`; returns the two rows.
pub async fn sharding(
    config: &AppConfig,
    context: &Context,
    urls: &[String],
    users: usize,
) -> anyhow::Result<Vec<Row>> {
    let stamp = Utc::now().format("%Y%m%d%H%M%S").to_string();
    let mut rows = Vec::new();
    for (run, shard_count) in [(1usize, 1usize), (2, urls.len())] {
        let mut shards = Vec::new();
        for (n, url) in urls.iter().take(shard_count).enumerate() {
            shards.push(
                open_shard(
                    context,
                    url,
                    &format!("coupons_bench_shard{run}_{stamp}_{n}"),
                )
                .await
                .with_context(|| format!("shard {n} at {}", crate::app::redact(url)))?,
            );
        }
        let outcome = run_claims(config, &shards, users, run).await;
        for shard in shards {
            shard.context.pool.close().await;
            shard.database.drop_now().await?;
        }
        rows.push(outcome?);
    }
    let (one, many) = (rows[0].throughput(), rows[1].throughput());
    rows[1].note = format!(
        "{:.2}x the single shard; {}",
        many / one.max(1e-9),
        rows[1].note
    );
    Ok(rows)
}

async fn open_shard(context: &Context, url: &str, name: &str) -> anyhow::Result<Shard> {
    let database = ScratchDatabase::create(url, name).await?;
    let pool = coupon_platform::db::connect(&database.url, 4).await?;
    coupon_platform::db::migrate(&pool).await?;
    // For the statements each shard ran; absent where the server does not
    // load pg_stat_statements (then the row says so).
    let _ = stats::track_statements(&pool).await;
    Ok(Shard {
        database,
        context: Context {
            pool,
            ..context.clone()
        },
    })
}

/// Releases the coupons in slices, splits the claims by partition and lets
/// every shard decide its own at once.
async fn run_claims(
    config: &AppConfig,
    shards: &[Shard],
    users: usize,
    run: usize,
) -> anyhow::Result<Row> {
    let count = shards.len() as u32;
    let partitions = config.partitions.max(1) as u32;
    // A tenth more coupons than users: a shard's users are its hash's share,
    // not exactly its slice, and every claim is meant to win.
    let coupons = (users + users / 10) as u32;
    for (n, (shard, slice)) in shards.iter().zip(slices(coupons, count)).enumerate() {
        release_slice(
            &shard.context.pool,
            &Category::parse(CATEGORY)?,
            slice,
            n as u16 + 1,
        )
        .await?;
        // Where the server does not load it, the row says so.
        let _ = stats::reset_statements(&shard.context.pool).await;
    }
    let users: Vec<String> = (0..users).map(|i| format!("shard{run}-user-{i}")).collect();
    let by_shard = split_claims(
        &shards[0].context,
        &users,
        Category::parse(CATEGORY)?,
        partitions,
        count,
    );
    let claims_per_shard: Vec<usize> = by_shard.iter().map(Vec::len).collect();

    let started = Instant::now();
    let contexts: Vec<Context> = shards.iter().map(|s| s.context.clone()).collect();
    decide_on_each(&contexts, by_shard, config.max_batch).await?;
    let seconds = started.elapsed().as_secs_f64();

    let mut notes = Vec::new();
    for (n, (shard, claims)) in shards.iter().zip(&claims_per_shard).enumerate() {
        // Before the checks below, whose statements are not the claim path's.
        let ran = statements(&shard.context.pool).await;
        let held = owned_here(&shard.context.pool, n as u32, count, partitions).await?;
        anyhow::ensure!(
            held == *claims as i64,
            "shard {n} granted {held} of its {claims} claims to its own users"
        );
        notes.push(format!(
            "shard {n}: {claims} claims, all granted there; {ran}"
        ));
    }
    Ok(Row {
        kind: Scenario::Sharding,
        scenario: match count {
            1 => format!("sharding: {} claims, 1 Postgres server", users.len()),
            n => format!(
                "sharding: {} claims, {n} Postgres servers, users split by partition",
                users.len()
            ),
        },
        operations: users.len() as u64,
        seconds,
        latencies: None,
        note: notes.join("; "),
        memory: None,
        open_loop: None,
    })
}

/// One claim per user in `category`, as the gateway publishes them (keyed
/// by the user, on the user's partition of `partitions`), grouped by the
/// shard of `shards` that owns the partition.
pub fn split_claims(
    context: &Context,
    users: &[String],
    category: Category,
    partitions: u32,
    shards: u32,
) -> Vec<Vec<(Record, ClaimRequested)>> {
    let mut by_shard = vec![Vec::new(); shards.max(1) as usize];
    let mut offsets: HashMap<u32, i64> = HashMap::new();
    let topic = context.topics.claims();
    for user in users {
        let partition = partition_of(user.as_bytes(), partitions);
        let offset = offsets.entry(partition).or_default();
        *offset += 1;
        let request_id = uuid::Uuid::new_v4().to_string();
        let request = ClaimRequested {
            envelope: Some(context.publisher.envelope::<ClaimRequested>(&request_id)),
            request_id,
            user_id: user.clone(),
            category: category.to_string(),
            answered_sold_out: false,
        };
        let record = Record {
            topic: topic.clone(),
            partition: partition as i32,
            offset: *offset,
            key: Some(user.clone().into_bytes()),
            value: Some(request.encode_to_vec()),
            timestamp_ms: Some(coupon_platform::time::now_ms()),
        };
        by_shard[shard_of_partition(partition, shards) as usize].push((record, request));
    }
    by_shard
}

/// Lets the claim processor decide each shard's claims in its context, in
/// batches of at most `max_batch`, every shard at once.
pub async fn decide_on_each(
    contexts: &[Context],
    by_shard: Vec<Vec<(Record, ClaimRequested)>>,
    max_batch: usize,
) -> anyhow::Result<()> {
    let mut runs = tokio::task::JoinSet::new();
    for (context, claims) in contexts.iter().cloned().zip(by_shard) {
        runs.spawn(async move {
            for batch in claims.chunks(max_batch.max(1)) {
                claims::handle_events(&context, batch)
                    .await
                    .map_err(|error| anyhow::anyhow!("a claims batch failed: {error:?}"))?
                    .confirmed()
                    .await
                    .map_err(|error| {
                        anyhow::anyhow!("a claims batch's answers were not confirmed: {error:?}")
                    })?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = runs.join_next().await {
        done??;
    }
    Ok(())
}

/// Inserts a slice of `count` new coupons of `category` into a shard, with
/// codes of Snowflake machine `machine` (one per shard, so no two shards'
/// codes collide).
pub async fn release_slice(
    pool: &PgPool,
    category: &Category,
    count: u32,
    machine: u16,
) -> anyhow::Result<()> {
    let mut generator = SnowflakeGenerator::new(31, machine)?;
    let mut clock = SystemClock;
    let (batch_id, now) = (uuid::Uuid::new_v4(), Utc::now());
    let employee = EmployeeId::parse("bench")?;
    let mut coupons = Vec::with_capacity(count as usize);
    for _ in 0..count {
        coupons.push(NewCoupon {
            code: CouponCode::from_id(generator.next_id(&mut clock)?),
            batch_id,
            employee_id: employee.clone(),
            category: category.clone(),
            generated_at: now,
        });
    }
    insert_coupons(pool, &coupons).await?;
    Ok(())
}

/// How many coupons are held on shard `shard`, failing if any user with a
/// row there (a quota slot, a decision, a hold) belongs to another shard.
async fn owned_here(
    pool: &PgPool,
    shard: u32,
    shards: u32,
    partitions: u32,
) -> anyhow::Result<i64> {
    let users = stats::users_with_rows(pool).await?;
    if let Some(stranger) = users
        .iter()
        .find(|user| shard_of_user(user, partitions, shards) != shard)
    {
        anyhow::bail!("shard {shard} stores a row of {stranger}, another shard's user");
    }
    Ok(stats::status_counts(pool).await?.held)
}

/// The statements this shard's database ran since the reset, most called
/// first, each named by its verb and the tables it touches; or why they
/// cannot be named.
async fn statements(pool: &PgPool) -> String {
    match stats::statements_run(pool).await {
        Err(_) => "pg_stat_statements is not loaded on this server".into(),
        Ok(ran) => {
            let calls: i64 = ran.iter().map(|(calls, _)| calls).sum();
            let named: Vec<String> = ran
                .iter()
                .map(|(calls, query)| format!("{calls}x {}", statement_name(query)))
                .collect();
            format!(
                "{} statements ({calls} calls): {}",
                ran.len(),
                named.join(", ")
            )
        }
    }
}

/// The tables a claim may touch, to name a statement by.
const TABLES: [&str; 5] = [
    "coupons",
    "quota_grants",
    "claim_decisions",
    "users",
    "coupon_history",
];

/// `INSERT claim_decisions`, `WITH coupons+quota_grants`, `BEGIN`.
fn statement_name(query: &str) -> String {
    let verb = query
        .split_whitespace()
        .next()
        .unwrap_or("?")
        .to_uppercase();
    let words: Vec<&str> = query
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .collect();
    let tables: Vec<&str> = TABLES
        .into_iter()
        .filter(|table| words.contains(table))
        .collect();
    if tables.is_empty() {
        query
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    } else {
        format!("{verb} {}", tables.join("+"))
    }
}
