//! `couponctl status`: pool per category, overdue holds, consumer lag and
//! service health.

use super::args::{default_serve_args, Connections};

pub async fn run(conn: &Connections) -> anyhow::Result<()> {
    let config = conn.app_config(&default_serve_args());
    print!("{}", couponctl::status::report(&config).await?);
    Ok(())
}
