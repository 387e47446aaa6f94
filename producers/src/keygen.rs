//! Snowflake generators on leased machine ids.
//!
//! Two live generators must never share a (datacenter, machine) pair, or they
//! could mint the same id in the same millisecond. A generator therefore
//! leases its machine id in Postgres (`snowflake_leases`): one row per pair,
//! owned until `expires_at`. Taking a lease is a single conditional upsert, so
//! two processes racing for the same id cannot both win. The lease also
//! remembers the last millisecond used, and the next owner starts after it,
//! so even a clock that was set back between owners cannot repeat an id.

use std::time::Duration;

use sqlx::PgPool;

use coupon_domain::snowflake::{SnowflakeError, SystemClock, MAX_DATACENTER};
use coupon_domain::{SnowflakeGenerator, SnowflakeId};
use coupon_platform::store::leases;

#[derive(Debug, thiserror::Error)]
pub enum KeygenError {
    #[error("all 32 machine ids of datacenter {0} are leased; wait for a lease to expire or use another datacenter id")]
    NoFreeMachineId(u16),
    #[error("datacenter id {0} is out of range 0..={MAX_DATACENTER}")]
    BadDatacenter(u16),
    #[error("machine-id lease (datacenter {datacenter}, machine {machine}) was lost; refusing to generate more ids")]
    LeaseLost { datacenter: u16, machine: u16 },
    #[error(transparent)]
    Snowflake(#[from] SnowflakeError),
    #[error("postgres: {0}")]
    Db(#[from] sqlx::Error),
}

/// A generator that owns its machine id until released (or its lease expires).
pub struct LeasedGenerator {
    pool: PgPool,
    owner: String,
    generator: SnowflakeGenerator,
}

impl std::fmt::Debug for LeasedGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeasedGenerator")
            .field("owner", &self.owner)
            .field("datacenter", &self.generator.datacenter())
            .field("machine", &self.generator.machine())
            .finish()
    }
}

/// Leases a free machine id in `datacenter` for `ttl`.
pub async fn lease(
    pool: &PgPool,
    datacenter: u16,
    ttl: Duration,
) -> Result<LeasedGenerator, KeygenError> {
    if datacenter > MAX_DATACENTER {
        return Err(KeygenError::BadDatacenter(datacenter));
    }
    let owner = format!(
        "{}:{}:{}",
        hostname(),
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    );
    // A lost race for one id just means trying again; a random starting
    // point spreads concurrent leasers over the free ids.
    for attempt in 0..64u32 {
        let start = (uuid::Uuid::new_v4().as_u128() % 32) as i32;
        let row = leases::take(pool, datacenter as i16, &owner, ttl, start).await?;
        if let Some((machine, last_ms)) = row {
            let generator = SnowflakeGenerator::new(datacenter, machine as u16)?
                .resume_after(last_ms.max(0) as u64);
            return Ok(LeasedGenerator {
                pool: pool.clone(),
                owner,
                generator,
            });
        }
        let free = leases::any_free(pool, datacenter as i16).await?;
        if !free {
            return Err(KeygenError::NoFreeMachineId(datacenter));
        }
        tokio::time::sleep(std::time::Duration::from_millis(u64::from(attempt % 8))).await;
    }
    Err(KeygenError::NoFreeMachineId(datacenter))
}

impl LeasedGenerator {
    pub fn datacenter(&self) -> u16 {
        self.generator.datacenter()
    }

    pub fn machine(&self) -> u16 {
        self.generator.machine()
    }

    /// Generates `count` ids. Blocks for at most a few milliseconds (sequence
    /// overflow waits for the next millisecond).
    pub fn generate(&mut self, count: usize) -> Result<Vec<SnowflakeId>, SnowflakeError> {
        let mut clock = SystemClock;
        (0..count)
            .map(|_| self.generator.next_id(&mut clock))
            .collect()
    }

    /// Extends the lease; fails if another owner took it (our lease expired).
    pub async fn renew(&self, ttl: Duration) -> Result<(), KeygenError> {
        let renewed = leases::renew(
            &self.pool,
            self.datacenter() as i16,
            self.machine() as i16,
            &self.owner,
            ttl,
            self.generator.last_ms() as i64,
        )
        .await?;
        if !renewed {
            return Err(KeygenError::LeaseLost {
                datacenter: self.datacenter(),
                machine: self.machine(),
            });
        }
        Ok(())
    }

    /// Gives the machine id back, recording the last millisecond used.
    pub async fn release(self) -> Result<(), KeygenError> {
        leases::release(
            &self.pool,
            self.datacenter() as i16,
            self.machine() as i16,
            &self.owner,
            self.generator.last_ms() as i64,
        )
        .await?;
        Ok(())
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown-host".to_owned())
}
