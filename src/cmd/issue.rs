//! `couponctl issue`: the employee tool. Publishes a batch of new coupons
//! with a progress bar. With `--idempotency-key` the batch is stored before
//! it is published, so running the same command again (after a Ctrl-C, a
//! crash, a broker error) completes that batch instead of releasing another
//! (`coupon_producers::issue`).

use anyhow::Context as _;
use clap::Args;

use coupon_domain::{Category, EmployeeId};
use couponctl::app;

use coupon_platform::settings;

use super::args::{database, Connections};

/// `couponctl issue`'s arguments.
#[derive(Args, Debug)]
pub struct IssueArgs {
    /// The employee releasing the batch.
    #[arg(long)]
    pub employee: String,
    /// The coupons' category.
    #[arg(long)]
    pub category: String,
    /// How many coupons (1 to 1,000,000).
    #[arg(long, default_value_t = 1)]
    pub count: u32,
    /// Snowflake datacenter id (0-31).
    #[arg(long, env = "COUPON_DATACENTER_ID", default_value_t = 0)]
    pub datacenter_id: u16,
    /// Print every code (one per line) after the summary.
    #[arg(long)]
    pub print_codes: bool,
    /// Partitions of topics created if missing.
    #[arg(long, env = "TOPIC_PARTITIONS", default_value_t = settings::TOPIC_PARTITIONS)]
    pub partitions: i32,
    /// Your name for this release (1-128 visible ASCII characters, e.g.
    /// `xmas-electronics`). The batch is stored before it is published:
    /// running the command again with the same key and the same employee,
    /// category and count prints that batch and mints nothing, and completes
    /// it if it was cut (Ctrl-C, a crash, a broker error); the same key with
    /// another employee, category or count is refused. The same key as
    /// `POST /api/v1/coupon`'s `Idempotency-Key`. Without it, every run
    /// releases a new batch, and a run cut mid-way leaves the coupons it
    /// had published.
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,
}

/// How long a run waits for another run publishing the same key.
const KEY_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

pub async fn run(conn: &Connections, args: IssueArgs) -> anyhow::Result<()> {
    let IssueArgs {
        employee,
        category,
        count,
        datacenter_id,
        print_codes,
        partitions,
        idempotency_key,
    } = args;
    let key = idempotency_key
        .as_deref()
        .map(coupon_producers::issue::IdempotencyKey::parse)
        .transpose()
        .context("--idempotency-key")?;
    issue(
        conn,
        employee,
        category,
        count,
        datacenter_id,
        print_codes,
        partitions,
        key,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn issue(
    conn: &Connections,
    employee: String,
    category: String,
    count: u32,
    datacenter_id: u16,
    print_codes: bool,
    partitions: i32,
    key: Option<coupon_producers::issue::IdempotencyKey>,
) -> anyhow::Result<()> {
    let request = coupon_producers::issue::IssueRequest {
        employee: EmployeeId::parse(employee)?,
        category: Category::parse(category)?,
        count,
    };
    if count == 0 || count > coupon_producers::issue::MAX_COUNT {
        anyhow::bail!(
            "--count must be between 1 and {}",
            coupon_producers::issue::MAX_COUNT
        );
    }
    let pool = database(conn).await?;
    coupon_platform::db::migrate(&pool)
        .await
        .context("applying migrations")?;
    let kafka = conn.kafka();
    let topics = coupon_platform::Topics::new(&conn.topic_prefix);
    app::create_topics(
        &kafka,
        &topics,
        partitions,
        conn.topic_replication,
        conn.log_retention_ms,
    )
    .await?;
    let publisher = coupon_platform::kafka::Publisher::new(
        &kafka,
        &format!("couponctl-issue@{}", std::process::id()),
    )?;
    let bar = indicatif::ProgressBar::new(u64::from(count));
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} publishing [{bar:40}] {pos}/{len} coupons ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let started = std::time::Instant::now();
    let batch = coupon_producers::issue::release(
        &pool,
        &publisher,
        &topics,
        datacenter_id,
        &request,
        key.as_ref(),
        KEY_WAIT,
        |done| bar.set_position(done),
    )
    .await;
    bar.finish_and_clear();
    let batch = match (batch, &key) {
        (Ok(batch), _) => batch,
        (Err(error @ coupon_producers::issue::IssueError::KeyReused { .. }), _) => {
            return Err(error.into())
        }
        (Err(error), Some(key)) => {
            return Err(anyhow::Error::new(error).context(format!(
                "publishing to {} at {} (the batch is stored: run the same command with \
                 --idempotency-key {key} again to complete it)",
                topics.created(),
                kafka.brokers
            )))
        }
        (Err(error), None) => {
            return Err(anyhow::Error::new(error).context(format!(
                "publishing to {} at {}",
                topics.created(),
                kafka.brokers
            )))
        }
    };
    if batch.repeated {
        println!(
            "idempotency key {}: this is the batch released earlier with it; nothing new was minted",
            key.as_ref().map(ToString::to_string).unwrap_or_default()
        );
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "issued {} {} coupons as batch {} in {:.2}s ({:.0}/s); first {}, last {}",
        batch.codes.len(),
        request.category,
        batch.batch_id,
        secs,
        batch.codes.len() as f64 / secs.max(1e-9),
        batch
            .codes
            .first()
            .map(ToString::to_string)
            .unwrap_or_default(),
        batch
            .codes
            .last()
            .map(ToString::to_string)
            .unwrap_or_default(),
    );
    if print_codes {
        for code in &batch.codes {
            println!("{code}");
        }
    }
    Ok(())
}
