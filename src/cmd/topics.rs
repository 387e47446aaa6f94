//! `couponctl topics`: create the topics that are missing, give existing
//! ones the retention of `LOG_RETENTION_MS`, then list them.

use anyhow::Context as _;
use clap::Args;

use couponctl::app;

use coupon_platform::settings;

use super::args::Connections;

/// `couponctl topics`' arguments.
#[derive(Args, Debug)]
pub struct TopicsArgs {
    #[arg(long, env = "TOPIC_PARTITIONS", default_value_t = settings::TOPIC_PARTITIONS)]
    pub partitions: i32,
}

pub async fn run(conn: &Connections, args: TopicsArgs) -> anyhow::Result<()> {
    let topics = coupon_platform::Topics::new(&conn.topic_prefix);
    let created = app::create_topics(
        &conn.kafka(),
        &topics,
        args.partitions,
        conn.topic_replication,
        conn.log_retention_ms,
    )
    .await?;
    let kafka = conn.kafka();
    let mismatched = app::retention_mismatches(&kafka, &topics, conn.log_retention_ms).await?;
    for (name, _) in &mismatched {
        let configs = app::topic_configs(&topics, name, conn.log_retention_ms);
        coupon_platform::kafka::admin::set_topic_configs(&kafka, name, &configs)
            .await
            .with_context(|| format!("setting the retention of {name}"))?;
    }
    for name in topics.all() {
        let note = if created.contains(&name) {
            "created".to_owned()
        } else if let Some((_, kept)) = mismatched.iter().find(|(n, _)| *n == name) {
            format!(
                "exists; retention.ms {} -> {}",
                kept.as_deref().unwrap_or("default"),
                conn.log_retention_ms
            )
        } else {
            "exists".to_owned()
        };
        println!("{name}\t{note}");
    }
    Ok(())
}
