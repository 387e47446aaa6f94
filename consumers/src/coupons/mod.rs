//! The coupon projector: `coupons.created` → `coupons` rows, `available`.
//!
//! Delivery guarantee: at least once, effect exactly once. Rows are written
//! with a binary `COPY` (the release's speed is Postgres' insert cost); a
//! replayed or redelivered batch makes the `COPY` fail as a whole, and the same
//! rows then go through `INSERT ... ON CONFLICT DO NOTHING` on the code, which
//! adds nothing that exists. Offsets are stored after the write commits.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use coupon_domain::{Category, CouponCode, EmployeeId, SnowflakeId};
use coupon_platform::kafka::consumer::BatchError;
use coupon_platform::kafka::Record;
use coupon_schemas::CouponsCreated;

use coupon_platform::kafka::role::{self, dead_letter_all};

use crate::{Context, Role};

pub const ROLE: Role = Role::Coupons;

/// One coupon ready to insert.
#[derive(Debug, Clone, PartialEq)]
pub struct NewCoupon {
    pub code: CouponCode,
    pub batch_id: Uuid,
    pub employee_id: EmployeeId,
    pub category: Category,
    pub generated_at: DateTime<Utc>,
}

/// Validates a decoded event and expands it into coupons.
pub fn coupons_of(event: &CouponsCreated) -> Result<Vec<NewCoupon>, String> {
    let batch_id = Uuid::parse_str(&event.batch_id).map_err(|e| format!("batch_id: {e}"))?;
    let employee_id = EmployeeId::parse(event.employee_id.clone()).map_err(|e| e.to_string())?;
    let category = Category::parse(event.category.clone()).map_err(|e| e.to_string())?;
    if event.coupon_ids.is_empty() {
        return Err("coupon_ids is empty".into());
    }
    event
        .coupon_ids
        .iter()
        .map(|raw| {
            let id = u64::try_from(*raw)
                .map_err(|_| format!("coupon id {raw} is negative"))
                .and_then(|raw| SnowflakeId::from_raw(raw).map_err(|e| e.to_string()))?;
            let generated_at = coupon_platform::time::from_ms(id.parts().unix_ms as i64)
                .ok_or_else(|| format!("coupon id {raw} has no valid time"))?;
            Ok(NewCoupon {
                code: CouponCode::from_id(id),
                batch_id,
                employee_id: employee_id.clone(),
                category: category.clone(),
                generated_at,
            })
        })
        .collect()
}

pub async fn handle_batch(ctx: &Context, batch: &[Record]) -> Result<(), BatchError> {
    let split = role::split::<CouponsCreated, _>(batch, |_, event| coupons_of(&event));
    let coupons: Vec<NewCoupon> = split
        .accepted
        .into_iter()
        .flat_map(|(_, coupons)| coupons)
        .collect();
    let inserted = insert_coupons(&ctx.pool, &coupons).await?;
    metrics::counter!("coupon_coupons_projected_total").increment(inserted);
    // New coupons void every sold-out mark (`coupon_domain::sold_out`), after
    // the insert committed. Should Redis not take it, a mark left standing
    // hides them from claims until it expires (`Policy::sold_out_mark_ttl`).
    if inserted > 0 {
        crate::supply_changed(ctx).await;
    }
    dead_letter_all(&ctx.dead_letters(ROLE), &split.refused).await
}

/// Inserts coupons in one statement; returns how many were new.
pub async fn insert_coupons(
    pool: &sqlx::PgPool,
    coupons: &[NewCoupon],
) -> Result<u64, sqlx::Error> {
    if coupons.is_empty() {
        return Ok(0);
    }
    let mut inserted = 0;
    // Chunked to keep each statement's arrays moderate.
    for chunk in coupons.chunks(20_000) {
        // The fast path: a binary COPY. A redelivered chunk (a code already
        // there) makes Postgres refuse it whole, and the statement below,
        // which skips what exists, decides instead.
        match coupon_platform::pgcopy::copy_in(pool, COPY_COUPONS, copy_rows(chunk)).await {
            Ok(rows) => {
                inserted += rows;
                continue;
            }
            Err(error) if coupon_platform::pgcopy::refused(&error) => {
                tracing::debug!(%error, "COPY refused; inserting what is new");
            }
            Err(error) => return Err(error),
        }
        let codes: Vec<String> = chunk.iter().map(|c| c.code.to_string()).collect();
        let ids: Vec<i64> = chunk.iter().map(|c| c.code.id().as_i64()).collect();
        let batches: Vec<Uuid> = chunk.iter().map(|c| c.batch_id).collect();
        let employees: Vec<&str> = chunk.iter().map(|c| c.employee_id.as_str()).collect();
        let categories: Vec<&str> = chunk.iter().map(|c| c.category.as_str()).collect();
        let generated: Vec<DateTime<Utc>> = chunk.iter().map(|c| c.generated_at).collect();
        inserted += sqlx::query(
            "INSERT INTO coupons (code, id, batch_id, employee_id, category, generated_at)
             SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::uuid[], $4::text[], $5::text[], $6::timestamptz[])
             ON CONFLICT DO NOTHING",
        )
        .bind(&codes)
        .bind(&ids)
        .bind(&batches)
        .bind(&employees)
        .bind(&categories)
        .bind(&generated)
        .execute(pool)
        .await?
        .rows_affected();
    }
    Ok(inserted)
}

const COPY_COUPONS: &str = "COPY coupons (code, id, batch_id, employee_id, category, generated_at) FROM STDIN (FORMAT binary)";

fn copy_rows(coupons: &[NewCoupon]) -> coupon_platform::pgcopy::BinaryRows {
    let mut rows = coupon_platform::pgcopy::BinaryRows::new(6, coupons.len() * 110);
    for c in coupons {
        rows.row()
            .text(&c.code.to_string())
            .int8(c.code.id().as_i64())
            .uuid(&c.batch_id)
            .text(c.employee_id.as_str())
            .text(c.category.as_str())
            .timestamptz(&c.generated_at);
    }
    rows
}

crate::role_handler!(ROLE);
