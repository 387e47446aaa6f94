//! The open-loop rows of `couponctl run` as users run it: the steady sale,
//! the steady day and the overload, sent from outside by `vegeta` at a fixed
//! rate (see [`vegeta`] for why not `wrk`), and the grant capacity the
//! overload doubles, by `wrk`.
//!
//! `vegeta` sends one request per user, so nobody buys here: holds simply
//! run out after the run (the in-process steady rows buy two grants in five).

use std::time::Duration;

use anyhow::{bail, Context as _};
use sqlx::PgPool;

use super::super::grant_path::{append_batches, noted_from, Recorder};
use super::super::{profile, vegeta, Latencies, Row, Scenario, STEADY_TARGET_RATE};
use super::{release, release_projected, wrk_claims, Server, WRK_SECONDS};

/// What an open-loop row's targets are judged on.
#[derive(Debug, Clone, Copy)]
pub struct OpenLoop {
    /// The rate requests were sent at (claims/s).
    pub offered: f64,
    /// Claims answered with a coupon, and how fast.
    pub granted: usize,
    pub grants: Option<Latencies>,
    /// Claims the gateway turned away (`503`, or no connection), and how fast.
    pub shed: usize,
    pub shed_latencies: Option<Latencies>,
    /// For the overload: the grant capacity it doubled (grants/s, closed loop).
    pub capacity: Option<f64>,
}

/// Every answer a claim may get under load; anything else is the bench's
/// own mistake and stops it.
const EXPECTED: [u16; 5] = [200, 404, 503, 504, 0];
const SHED: [u16; 2] = [503, 0];
const SERVED: [u16; 3] = [200, 404, 504];

/// Coupons for the closed-loop grant run: more than it can take in
/// [`WRK_SECONDS`], so every claim finds one.
const GRANT_POOL: u32 = 200_000;

/// `wrk`'s connections in the grant run: as many claims waiting as the
/// gateway lets wait (`MAX_WAITING_REPLIES`, 1,024 by default) less a margin,
/// so the processor's batches can be as large as they ever are, and no
/// claim is shed. With fewer the batches are smaller, and the figure is the
/// generator's, not the server's (256 connections: about 0.7x).
fn grant_connections(max_waiting: usize) -> usize {
    (max_waiting * 95 / 100).clamp(1, 1_000)
}

/// `max_waiting`: the server's `MAX_WAITING_REPLIES` (it inherits the
/// bench's environment).
pub(super) async fn rows(
    server: &Server,
    db: &PgPool,
    max_waiting: usize,
) -> anyhow::Result<Vec<Row>> {
    if !vegeta::installed() {
        eprintln!(
            "bench: no open-loop rows of couponctl run (vegeta is not installed: make setup)"
        );
        return Ok(Vec::new());
    }
    let mut rows = Vec::new();
    // Each row notes the server's claim batches meanwhile, from its /metrics.
    let recorder = Recorder::Served(&server.base);
    eprintln!("bench: couponctl run, the steady sale sent by vegeta");
    rows.push(
        noted_from(recorder, steady_sale(server, None))
            .await
            .context("the steady sale sent by vegeta")?,
    );
    eprintln!("bench: couponctl run, the steady day sent by vegeta");
    rows.push(
        noted_from(recorder, steady_day(server, db))
            .await
            .context("the steady day sent by vegeta")?,
    );
    eprintln!("bench: couponctl run, its grant capacity by wrk");
    let before = recorder.snapshot().await;
    let (mut capacity_row, capacity) = grant_capacity(server, db, grant_connections(max_waiting))
        .await
        .context("the grant capacity by wrk")?;
    append_batches(&mut capacity_row, &before, &recorder.snapshot().await);
    rows.push(capacity_row);
    eprintln!("bench: couponctl run, twice its grant capacity sent by vegeta");
    rows.push(
        noted_from(recorder, overload(server, db, capacity))
            .await
            .context("the overload sent by vegeta")?,
    );
    Ok(rows)
}

/// 5,000 claims/s, a tenth winning: a tenth of a second's claims released
/// every second through the admin route while the claims arrive. On day 1
/// (`month` `None`) or on day 30, after the month `month` describes (said
/// first in the row's note) was loaded.
pub(super) async fn steady_sale(server: &Server, month: Option<&str>) -> anyhow::Result<Row> {
    let (rate, category) = (STEADY_TARGET_RATE, "AsRunSale");
    let per_second = (rate as u32 / 10).max(1);
    let supply = async {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        for _ in 0..WRK_SECONDS {
            tick.tick().await;
            release(server, category, per_second).await?;
        }
        anyhow::Ok(())
    };
    let (outcome, supplied) = tokio::join!(send(server, category, rate), supply);
    supplied.context("the sale's supply")?;
    let (outcome, cpu) = outcome?;
    let (kind, when, month) = match month {
        None => (Scenario::AsRunSteadySale, "", String::new()),
        Some(month) => (
            Scenario::AsRunSteadySaleDay30,
            ", day 30",
            format!("{month}; "),
        ),
    };
    Ok(steady_row(
        kind,
        format!("steady sale as users run it{when}: {rate:.0} claims/s, vegeta"),
        &outcome,
        rate,
        format!(
            "{month}a tenth win: {per_second} coupons released every second through the admin route; {cpu}"
        ),
    ))
}

/// 5,000 claims/s, half winning, the coupons released first.
async fn steady_day(server: &Server, db: &PgPool) -> anyhow::Result<Row> {
    let (rate, category) = (STEADY_TARGET_RATE, "AsRunDay");
    let claims = (rate as u32) * WRK_SECONDS as u32;
    release_projected(server, db, category, claims / 2).await?;
    let (outcome, cpu) = send(server, category, rate).await?;
    Ok(steady_row(
        Scenario::AsRunSteadyDay,
        format!("steady day as users run it: {rate:.0} claims/s, vegeta"),
        &outcome,
        rate,
        format!("half win: {} coupons released first; {cpu}", claims / 2),
    ))
}

/// Grants as fast as the server gives them: `wrk` waits for each answer, so
/// this is the rate the grant path sustains with nothing queued beyond the
/// connections.
async fn grant_capacity(
    server: &Server,
    db: &PgPool,
    connections: usize,
) -> anyhow::Result<(Row, f64)> {
    release_projected(server, db, "AsRunGrant", GRANT_POOL).await?;
    let (summary, cpu) = wrk_claims(server, "AsRunGrant", connections).await?;
    let granted = summary.requests.saturating_sub(summary.non_2xx);
    let seconds = summary.requests as f64 / summary.per_second.max(1e-9);
    let capacity = granted as f64 / seconds.max(1e-9);
    let mut row = summary.row(
        Scenario::AsRunGrants,
        "grant capacity as users run it: every claim wins, wrk",
        format!(
            "{granted} granted, {} not (non-2xx{}); wrk -t2 -c{connections} -d{WRK_SECONDS}s, a new user per request, {GRANT_POOL} coupons released first; {cpu}",
            summary.non_2xx,
            if summary.non_2xx > 0 { ": the figure is a floor" } else { "" }
        ),
    );
    row.operations = granted;
    Ok((row, capacity))
}

/// Twice the grant capacity, every claim able to win: what is served must
/// stay fast and the excess must be turned away at once.
async fn overload(server: &Server, db: &PgPool, capacity: f64) -> anyhow::Result<Row> {
    let rate = (capacity * 2.0).max(1.0);
    let claims = (rate * WRK_SECONDS as f64) as u32;
    release_projected(server, db, "AsRunOverload", claims).await?;
    let (outcome, cpu) = send(server, "AsRunOverload", rate).await?;
    let granted = outcome.count(&[200]);
    let goodput = granted as f64 / outcome.seconds.max(1e-9);
    let mut row = steady_row(
        Scenario::AsRunOverload,
        format!("overload as users run it: {rate:.0} claims/s (2x capacity), vegeta"),
        &outcome,
        rate,
        format!(
            "every claim could win ({claims} coupons released first); goodput {goodput:.0} grants/s, {:.2}x the capacity of {capacity:.0}/s; {cpu}",
            goodput / capacity.max(1e-9)
        ),
    );
    // Its latency figures are the served answers'; the shed ones are apart.
    row.latencies = outcome.latencies(&SERVED);
    if let Some(open_loop) = &mut row.open_loop {
        open_loop.capacity = Some(capacity);
    }
    Ok(row)
}

/// `vegeta` sends a claim for a new user of `category` at `rate` for
/// [`WRK_SECONDS`]; the outcome, and where the machine's CPU went.
async fn send(
    server: &Server,
    category: &str,
    rate: f64,
) -> anyhow::Result<(vegeta::Outcome, String)> {
    let total = (rate * WRK_SECONDS as f64) as usize;
    let prefix = format!("{}-{}", server.prefix, category.to_lowercase());
    let urls: Vec<String> = (0..total)
        .map(|i| {
            format!(
                "{}/api/v1/coupon?category={category}&id={prefix}-{i}",
                server.base
            )
        })
        .collect();
    let header = format!("Authorization: Bearer {}", server.api_token);
    let before = profile::CpuSample::now();
    let outcome = vegeta::attack(&urls, &header, rate).await?;
    let cpu = profile::since(before).unwrap_or_default();
    let unexpected = outcome.unexpected(&EXPECTED);
    if !unexpected.is_empty() {
        bail!("claims answered with codes the load cannot explain (code, count): {unexpected:?}");
    }
    Ok((outcome, cpu))
}

fn steady_row(
    kind: Scenario,
    scenario: String,
    outcome: &vegeta::Outcome,
    offered: f64,
    how: String,
) -> Row {
    let ms = Latencies::brief;
    let open_loop = OpenLoop {
        offered,
        granted: outcome.count(&[200]),
        grants: outcome.latencies(&[200]),
        shed: outcome.count(&SHED),
        shed_latencies: outcome.latencies(&SHED),
        capacity: None,
    };
    Row {
        kind,
        scenario,
        operations: outcome.sent() as u64,
        seconds: outcome.seconds,
        latencies: outcome.latencies(&EXPECTED),
        note: format!(
            "open loop from outside (vegeta), {} claims in {WRK_SECONDS} s, a new user each, no purchases; {} granted ({}), {} sold out ({}), {} shed ({}: 503 or no connection), {} past the deadline (504); {how}",
            outcome.sent(),
            open_loop.granted,
            ms(open_loop.grants),
            outcome.count(&[404]),
            ms(outcome.latencies(&[404])),
            open_loop.shed,
            ms(open_loop.shed_latencies),
            outcome.count(&[504]),
        ),
        memory: None,
        open_loop: Some(open_loop),
    }
}

#[cfg(test)]
mod tests {
    use super::grant_connections;

    #[test]
    fn the_grant_run_keeps_its_connections_under_the_servers_waiting_cap() {
        // The default cap (1,024) and a smaller one: 5% under it.
        assert_eq!(grant_connections(1_024), 972);
        assert_eq!(grant_connections(512), 486);
        // A raised cap: no more than wrk's thousand.
        assert_eq!(grant_connections(1 << 20), 1_000);
        // A cap of nothing still leaves one connection to measure with.
        assert_eq!(grant_connections(0), 1);
    }
}
