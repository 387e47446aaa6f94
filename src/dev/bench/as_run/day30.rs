//! Day 30 as users run it (issue #27 item 4): a second `couponctl run`,
//! started as the first on a database of its own, gets 29 earlier days of
//! claim decisions, quota slots and history loaded into it (`dev::load`,
//! binary `COPY` into the days' partitions, the tables vacuumed and
//! analyzed), then runs the first server's first rows: the flash sale by
//! `wrk` and the steady sale by `vegeta`. (Run on the first server after its
//! other rows, the steady sale met their leftovers: 200,000 more coupons and
//! their holds expiring.) The targets table compares them with day 1's
//! rows of the same run: the
//! claim path looks up request ids within `REQUEST_ID_HORIZON` and a user's
//! state within the quota window, so the month behind it should not show.

use anyhow::Context as _;
use chrono::Utc;
use sqlx::PgPool;

use super::super::grant_path::{append_batches, noted_from, Recorder};
use super::super::{Row, Scenario};
use super::{open_loop, release_projected, wrk_claims, Server, WRK_SECONDS};
use crate::dev::load::load_month;

/// The day-30 rows: the month loaded, then the flash sale and the steady
/// sale again.
pub(super) async fn rows(
    server: &Server,
    database_url: &str,
    coupons: u32,
    connections: usize,
    per_day: usize,
) -> anyhow::Result<Vec<Row>> {
    let db = &PgPool::connect(database_url).await?;
    eprintln!("bench: loading 29 days of {per_day} claims into couponctl run's database");
    let loaded = load_month(db, Utc::now().date_naive(), 29, per_day)
        .await
        .context("loading the month before day 30")?;
    let month = format!(
        "day 30: {} days of {per_day} claims loaded first ({} rows by COPY in {:.0} s, then vacuumed, analyzed and checkpointed in {:.0} s)",
        loaded.days, loaded.rows, loaded.seconds, loaded.settled_seconds
    );
    let recorder = Recorder::Served(&server.base);
    eprintln!("bench: couponctl run on day 30, the flash sale by wrk");
    release_projected(server, db, "AsRun", coupons).await?;
    let before = recorder.snapshot().await;
    let (claims, cpu) = wrk_claims(server, "AsRun", connections).await?;
    let mut flash = claims.row(
        Scenario::AsRunClaimsDay30,
        "flash sale as users run it, day 30: couponctl run, wrk claims",
        format!(
            "{month}; {coupons} coupons, {} answered sold out (non-2xx); wrk -t2 -c{connections} -d{WRK_SECONDS}s, a new user per request; {cpu}",
            claims.non_2xx
        ),
    );
    append_batches(&mut flash, &before, &recorder.snapshot().await);
    eprintln!("bench: couponctl run on day 30, the steady sale by vegeta");
    let steady = noted_from(recorder, open_loop::steady_sale(server, Some(&month)))
        .await
        .context("the steady sale on day 30")?;
    Ok(vec![flash, steady])
}
