//! `couponctl topics`: create the topics that are missing, then list them.

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
    )
    .await?;
    for name in topics.all() {
        let note = if created.contains(&name) {
            "created"
        } else {
            "exists"
        };
        println!("{name}\t{note}");
    }
    Ok(())
}
