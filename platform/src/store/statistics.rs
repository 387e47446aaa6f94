//! The planner's statistics of the tables the claim path reads, kept
//! current by the process itself rather than left to autovacuum.
//!
//! Why: these tables grow from empty in minutes (a fresh deployment, and
//! every UTC midnight the new day's `claim_decisions` and `quota_grants`
//! partitions), and a connection keeps the plan it made of a statement
//! while a table was small until the table is analyzed again. Autovacuum
//! gets to it within its naptime (a minute, shared by every database of the
//! server); meanwhile, measured on the bench's databases: a batch's
//! request-id look-up seq-scanned the day's partition for up to 4.7 s a
//! batch with half a million rows in it, and right after a release the
//! grant statement joined each batch against every available coupon (1.8
//! to 7.9 s a batch). An `ANALYZE` also invalidates the cached plans that
//! read the table, so the next run of each statement is planned afresh.
//! Planning every statement at every run instead (`plan_cache_mode =
//! force_custom_plan`) was tried and cost a third of the grant capacity
//! (5,726 against 3,800 grants/s, same hour).

use sqlx::PgPool;

/// Rows changed since the last `ANALYZE` (as a share of the rows it found)
/// past which the statistics are refreshed.
const STALE_SHARE: f64 = 0.2;
/// ... and at least this many, so a trickle of changes never does.
const STALE_MIN_ROWS: f64 = 1_000.0;

/// Whether a table's statistics are too old to plan by, given the rows the
/// last `ANALYZE` found (negative: never analyzed) and the rows changed
/// since (`pending` are changes Postgres' own counter may not show yet).
pub fn stale(rows_at_last_analyze: f64, changed_since: i64, pending: u64) -> bool {
    let changed = changed_since.max(0) as f64 + pending as f64;
    changed >= STALE_MIN_ROWS.max(rows_at_last_analyze.max(0.0) * STALE_SHARE)
}

/// The claim path's tables: `coupons`, `users` and the partitions of
/// `claim_decisions` and `quota_grants`.
const CLAIM_PATH: &str = "(c.relname IN ('coupons', 'users')
     OR c.relname LIKE 'claim\\_decisions\\_%' OR c.relname LIKE 'quota\\_grants\\_%')";

/// `ANALYZE`s each table (and partition) of the claim path whose
/// statistics are [`stale`]. Returns the tables analyzed.
pub async fn refresh_stale(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    refresh(pool, CLAIM_PATH, 0).await
}

/// After a release of `inserted` coupons: `ANALYZE coupons` when its
/// statistics are [`stale`], counting the release's rows (Postgres' own
/// counter may not show them yet). Returns whether it ran.
///
/// Run by the coupon projector before the sold-out marks are voided, so the
/// claims they let through are planned on statistics that know of the new
/// coupons (the grant statement joined each batch against every available
/// coupon otherwise: 1.8 to 7.9 s a batch right after a 50,000-coupon
/// release).
pub async fn refresh_coupons_after_insert(
    pool: &PgPool,
    inserted: u64,
) -> Result<bool, sqlx::Error> {
    Ok(!refresh(pool, "c.relname = 'coupons'", inserted)
        .await?
        .is_empty())
}

/// `ANALYZE`s each table of this schema that `which` (a condition on
/// `pg_class c`, a constant of this module) selects and whose statistics are
/// [`stale`] with `pending` more changed rows. Never waits long for a lock
/// (autovacuum may hold one: it is doing the same); a table it cannot lock
/// is left to the next round.
async fn refresh(pool: &PgPool, which: &str, pending: u64) -> Result<Vec<String>, sqlx::Error> {
    let tables: Vec<(String, f64, i64)> = sqlx::query_as(&format!(
        "SELECT c.relname::text, c.reltuples::float8, coalesce(s.n_mod_since_analyze, 0)
         FROM pg_class c
         JOIN pg_stat_user_tables s ON s.relid = c.oid
         WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'r'
           AND {which}"
    ))
    .fetch_all(pool)
    .await?;
    let mut analyzed = Vec::new();
    for (table, rows, changed) in tables {
        if stale(rows, changed, pending) && analyze(pool, &table).await? {
            analyzed.push(table);
        }
    }
    Ok(analyzed)
}

/// `ANALYZE table`, waiting at most 200 ms for its lock; `false` when the
/// lock was not had.
async fn analyze(pool: &PgPool, table: &str) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL lock_timeout = '200ms'")
        .execute(&mut *tx)
        .await?;
    // The name comes from pg_class, quoted as an identifier.
    let statement = format!("ANALYZE \"{}\"", table.replace('"', "\"\""));
    match sqlx::query(&statement).execute(&mut *tx).await {
        Ok(_) => {
            tx.commit().await?;
            Ok(true)
        }
        Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("55P03") => Ok(false),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::stale;

    #[test]
    fn a_fifth_of_the_table_changed_or_more_makes_the_statistics_stale() {
        // Never analyzed: a thousand rows or more.
        assert!(stale(-1.0, 0, 1_000));
        assert!(!stale(-1.0, 999, 0));
        // 100,000 rows at the last analyze: 20,000 changed since, in all.
        assert!(!stale(100_000.0, 9_000, 10_000));
        assert!(stale(100_000.0, 10_000, 10_000));
        // A negative counter (never the case, but not trusted) counts as none.
        assert!(!stale(100_000.0, -50_000, 10_000));
    }
}
