//! `couponctl issue`: the employee tool. Publishes a batch of new coupons
//! with a progress bar. With `--idempotency-key` the batch is stored before
//! it is published, so running the same command again (after a Ctrl-C, a
//! crash, a broker error) completes that batch instead of releasing another
//! (`coupon_producers::issue`).

use anyhow::Context as _;
use clap::Args;

use coupon_domain::campaign::{CampaignFields, Discount};
use coupon_domain::{Campaign, Category, EmployeeId, Money};
use coupon_platform::kafka::Publisher;
use coupon_platform::{settings, Topics};
use coupon_producers::issue::{self, IdempotencyKey, IssueError, IssueRequest};
use couponctl::app;

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
    /// The campaign's name: the batch is a campaign (every campaign flag is
    /// optional; any of them makes one).
    #[arg(long, value_name = "NAME", help_heading = "Campaign")]
    pub campaign: Option<String>,
    /// Percent off an order (1 to 100, rounded down in minor units).
    #[arg(
        long,
        value_name = "PERCENT",
        help_heading = "Campaign",
        conflicts_with = "amount_off"
    )]
    pub percent_off: Option<i64>,
    /// A fixed amount off, in minor units of --currency (at most the order).
    #[arg(
        long,
        value_name = "MINOR_UNITS",
        help_heading = "Campaign",
        requires = "currency"
    )]
    pub amount_off: Option<i64>,
    /// The smallest order total, in minor units of --currency.
    #[arg(
        long,
        value_name = "MINOR_UNITS",
        help_heading = "Campaign",
        requires = "currency"
    )]
    pub min_order: Option<i64>,
    /// The ISO 4217 currency of --amount-off and --min-order (e.g. EUR).
    #[arg(long, value_name = "CODE", help_heading = "Campaign")]
    pub currency: Option<String>,
    /// Claimable from this time (RFC 3339, e.g. 2026-12-20T00:00:00Z).
    #[arg(long, value_name = "TIME", help_heading = "Campaign")]
    pub valid_from: Option<String>,
    /// ... until this time, exclusive (RFC 3339; after --valid-from).
    #[arg(long, value_name = "TIME", help_heading = "Campaign")]
    pub valid_until: Option<String>,
    /// Eligibility: a location the user's profile must have (repeat the
    /// flag for several; compared without regard to case).
    #[arg(long = "location", value_name = "LOCATION", help_heading = "Campaign")]
    pub locations: Vec<String>,
    /// Eligibility: the user's minimum age in years (1 to 120) on the day of
    /// the claim, from the profile's date of birth.
    #[arg(long, value_name = "YEARS", help_heading = "Campaign")]
    pub min_age: Option<i64>,
}

impl IssueArgs {
    /// The campaign the flags describe (`None`: no campaign flag), validated
    /// by the domain's rules, the same as the HTTP release's.
    fn campaign(&self) -> anyhow::Result<Option<Campaign>> {
        let time = |flag: &str, raw: &Option<String>| {
            raw.as_deref()
                .map(|raw| {
                    chrono::DateTime::parse_from_rfc3339(raw)
                        .map(|t| t.with_timezone(&chrono::Utc))
                        .with_context(|| format!("{flag} {raw:?} is not an RFC 3339 time"))
                })
                .transpose()
        };
        if self.currency.is_some() && self.amount_off.is_none() && self.min_order.is_none() {
            anyhow::bail!("--currency goes with --amount-off or --min-order");
        }
        let discount = if self.percent_off.is_some() || self.amount_off.is_some() {
            let currency = self.amount_off.and(self.currency.as_deref());
            Some(Discount::parse(
                self.percent_off,
                self.amount_off,
                currency,
            )?)
        } else {
            None
        };
        let min_order = match (self.min_order, self.currency.as_deref()) {
            (Some(amount), Some(currency)) => {
                Some(Money::parse("--min-order", amount, currency, true)?)
            }
            _ => None,
        };
        Ok(Campaign::parse(
            CampaignFields {
                name: self.campaign.clone(),
                discount,
                min_order,
                valid_from: time("--valid-from", &self.valid_from)?,
                valid_until: time("--valid-until", &self.valid_until)?,
                locations: self.locations.clone(),
                min_age: self.min_age,
            },
            chrono::Utc::now(),
        )?)
    }
}

/// How long a run waits for another run publishing the same key.
const KEY_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

pub async fn run(conn: &Connections, args: IssueArgs) -> anyhow::Result<()> {
    let key = args
        .idempotency_key
        .as_deref()
        .map(IdempotencyKey::parse)
        .transpose()
        .context("--idempotency-key")?;
    let campaign = args.campaign()?;
    let request = IssueRequest {
        employee: EmployeeId::parse(args.employee)?,
        category: Category::parse(args.category)?,
        count: args.count,
        campaign,
    };
    if request.count == 0 || request.count > issue::MAX_COUNT {
        anyhow::bail!("--count must be between 1 and {}", issue::MAX_COUNT);
    }
    let pool = database(conn).await?;
    coupon_platform::db::migrate(&pool)
        .await
        .context("applying migrations")?;
    let kafka = conn.kafka();
    let topics = Topics::new(&conn.topic_prefix);
    app::create_topics(
        &kafka,
        &topics,
        args.partitions,
        conn.topic_replication,
        conn.log_retention_ms,
    )
    .await?;
    let publisher = Publisher::new(&kafka, &format!("couponctl-issue@{}", std::process::id()))?;
    let bar = progress_bar(request.count);
    let started = std::time::Instant::now();
    let batch = issue::release(
        &pool,
        &publisher,
        &topics,
        args.datacenter_id,
        &request,
        key.as_ref(),
        KEY_WAIT,
        |done| bar.set_position(done),
    )
    .await;
    bar.finish_and_clear();
    let batch = batch.map_err(|error| {
        let context = what_to_do(key.as_ref(), &topics, &kafka.brokers);
        match error {
            IssueError::KeyReused { .. } => anyhow::Error::new(error),
            _ => anyhow::Error::new(error).context(context),
        }
    })?;
    print_summary(&batch, &request, key.as_ref(), started.elapsed());
    if args.print_codes {
        for code in &batch.codes {
            println!("{code}");
        }
    }
    Ok(())
}

fn progress_bar(count: u32) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(u64::from(count));
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} publishing [{bar:40}] {pos}/{len} coupons ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar
}

/// Where a failed release was going and, for a keyed one, how to finish it.
fn what_to_do(key: Option<&IdempotencyKey>, topics: &Topics, brokers: &str) -> String {
    match key {
        Some(key) => format!(
            "publishing to {} at {brokers} (the batch is stored: run the same command with \
             --idempotency-key {key} again to complete it)",
            topics.created()
        ),
        None => format!("publishing to {} at {brokers}", topics.created()),
    }
}

fn print_summary(
    batch: &issue::IssuedBatch,
    request: &IssueRequest,
    key: Option<&IdempotencyKey>,
    took: std::time::Duration,
) {
    if batch.repeated {
        println!(
            "idempotency key {}: this is the batch released earlier with it; nothing new was minted",
            key.map(ToString::to_string).unwrap_or_default()
        );
    }
    let secs = took.as_secs_f64();
    let code =
        |c: Option<&coupon_domain::CouponCode>| c.map(ToString::to_string).unwrap_or_default();
    println!(
        "issued {} {} coupons as batch {} in {:.2}s ({:.0}/s); first {}, last {}",
        batch.codes.len(),
        request.category,
        batch.batch_id,
        secs,
        batch.codes.len() as f64 / secs.max(1e-9),
        code(batch.codes.first()),
        code(batch.codes.last()),
    );
}
