//! `couponctl migrate`: apply the database migrations.

use anyhow::Context as _;

use super::args::{database, Connections};

pub async fn run(conn: &Connections) -> anyhow::Result<()> {
    let pool = database(conn).await?;
    coupon_platform::db::migrate(&pool)
        .await
        .context("applying migrations")?;
    println!("migrations applied");
    Ok(())
}
