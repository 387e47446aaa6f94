//! Redis: a cache of holds and the gateway's flood counters.
//!
//! Redis is never the authority. Postgres holds every hold with its deadline;
//! Redis mirrors them with a TTL so a hold can be looked up without a database
//! round trip, and is rebuilt from Postgres at start-up (and by `couponctl
//! holds rebuild`). Losing Redis therefore costs speed, never correctness.
//!
//! The gateway's sold-out answer reads the *absence* of a user's hold and
//! used-quota keys as "nothing the user must be told instead", which is only
//! true of a complete cache. So the supply version that every sold-out mark
//! must match doubles as the cache's proof of completeness: it is written
//! only by a restore that refilled the holds and used quotas from Postgres
//! (guarded by a token that a loss in the middle takes with it), replaced
//! only while it exists, and deleted when a hold or quota write fails. A
//! Redis that lost its data has no version, so nothing is answered sold out
//! from it until a restore has run.

use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use coupon_domain::{Category, CouponCode, UserId};
use fred::prelude::*;

/// A hold that ended (redeemed or released): its coupon and its holder, named
/// so the two cannot be swapped as a pair of strings could.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndedHold {
    pub code: CouponCode,
    pub user: UserId,
}

/// How long one command may take. Redis answers in well under a
/// millisecond; a command this slow means it is stalled (a pause, a hung
/// host), and every caller has a way on without it. Not shorter: the answer
/// is timed by this process, and a process saturated by a flash sale reads
/// answers late; a timeout there would turn the sold-out answers off for
/// `UNRESPONSIVE_PAUSE` exactly when they are needed most.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// After a command timed out or the connection failed, how long every
/// command fails at once instead of waiting: a frozen Redis keeps its
/// connections open, so without this each request on the hot path would
/// wait out the timeout (the gateway's several reads add up past the reply
/// deadline), and the claim processor's per-batch writes would stall every
/// batch. The first command after it probes again.
const UNRESPONSIVE_PAUSE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
    #[error("redis: not answering (a command timed out or the connection failed less than {} ms ago)", UNRESPONSIVE_PAUSE.as_millis())]
    Unresponsive,
}

/// What Redis says about one claim ([`Cache::claim_facts`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimFacts {
    pub fast_path: coupon_domain::sold_out::FastPathFacts,
    /// The user's claims in the current second, this one included (`None`
    /// when not counted).
    pub claims_this_second: Option<u64>,
}

/// A hold as mirrored in Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedHold {
    pub code: CouponCode,
    pub user_id: UserId,
    pub category: Category,
    pub expires_at: DateTime<Utc>,
}

#[derive(Clone)]
pub struct Cache {
    client: Client,
    prefix: String,
    /// Until when (ms since the epoch) commands fail at once.
    unresponsive_until_ms: Arc<AtomicI64>,
}

impl Cache {
    /// Connects and keeps reconnecting in the background if Redis goes away;
    /// commands fail fast meanwhile (`COMMAND_TIMEOUT`, `UNRESPONSIVE_PAUSE`)
    /// instead of piling up.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, CacheError> {
        let config = Config::from_url(url)?;
        let client = Builder::from_config(config)
            .with_performance_config(|perf| {
                perf.default_command_timeout = COMMAND_TIMEOUT;
            })
            .with_connection_config(|conn| {
                conn.connection_timeout = Duration::from_secs(2);
                conn.max_command_attempts = 2;
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
            .build()?;
        client.init().await?;
        Ok(Self {
            client,
            prefix: prefix.to_owned(),
            unresponsive_until_ms: Arc::default(),
        })
    }

    /// Runs one command (or pipeline) unless Redis was found unresponsive
    /// within `UNRESPONSIVE_PAUSE`; a timeout or a failed connection starts
    /// such a pause.
    async fn call<T>(
        &self,
        command: impl Future<Output = Result<T, fred::error::Error>>,
    ) -> Result<T, CacheError> {
        if Utc::now().timestamp_millis() < self.unresponsive_until_ms.load(Ordering::Relaxed) {
            return Err(CacheError::Unresponsive);
        }
        command.await.map_err(|error| {
            if matches!(
                error.kind(),
                fred::error::ErrorKind::Timeout
                    | fred::error::ErrorKind::IO
                    | fred::error::ErrorKind::Canceled
            ) {
                let until = Utc::now().timestamp_millis() + UNRESPONSIVE_PAUSE.as_millis() as i64;
                self.unresponsive_until_ms.store(until, Ordering::Relaxed);
            }
            CacheError::Redis(error)
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn hold_key(&self, code: &CouponCode) -> String {
        format!("{}:hold:{code}", self.prefix)
    }

    fn user_hold_key(&self, user_id: &UserId) -> String {
        format!("{}:user-hold:{user_id}", self.prefix)
    }

    fn blocked_key(&self, client_id: &UserId) -> String {
        format!("{}:blocked:{client_id}", self.prefix)
    }

    /// Writes holds (pipelined) with a TTL that ends at each hold's deadline.
    /// Holds already past their deadline are skipped.
    pub async fn put_holds(&self, holds: &[CachedHold]) -> Result<(), CacheError> {
        self.set_until(&self.hold_entries(holds)).await
    }

    fn hold_entries(&self, holds: &[CachedHold]) -> Vec<(String, String, DateTime<Utc>)> {
        let mut entries = Vec::with_capacity(holds.len() * 2);
        for hold in holds {
            let value = encode_hold(hold);
            entries.push((self.hold_key(&hold.code), value.clone(), hold.expires_at));
            entries.push((self.user_hold_key(&hold.user_id), value, hold.expires_at));
        }
        entries
    }

    /// [`Cache::put_holds`] and [`Cache::put_quota_used`] in one pipeline:
    /// one round trip for a claim batch's winners.
    pub async fn put_holds_and_quota_used(
        &self,
        holds: &[CachedHold],
        users: &[(UserId, DateTime<Utc>)],
    ) -> Result<(), CacheError> {
        let mut entries = self.hold_entries(holds);
        entries.extend(self.quota_entries(users));
        self.set_until(&entries).await
    }

    /// Sets each key to its value until its deadline, in one pipeline;
    /// entries already past their deadline are skipped.
    async fn set_until(
        &self,
        entries: &[(String, String, DateTime<Utc>)],
    ) -> Result<(), CacheError> {
        let now = Utc::now();
        let pipeline = self.client.pipeline();
        let mut queued = 0;
        for (key, value, until) in entries {
            let ttl_ms = (*until - now).num_milliseconds();
            if ttl_ms <= 0 {
                continue;
            }
            let _: () = pipeline
                .set(
                    key.as_str(),
                    value.as_str(),
                    Some(Expiration::PX(ttl_ms)),
                    None,
                    false,
                )
                .await?;
            queued += 1;
        }
        if queued > 0 {
            let _: Vec<Value> = self.call(pipeline.all()).await?;
        }
        Ok(())
    }

    /// Removes holds that ended (redeemed or released).
    pub async fn remove_holds(&self, ended: &[EndedHold]) -> Result<(), CacheError> {
        if ended.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = ended
            .iter()
            .flat_map(|hold| [self.hold_key(&hold.code), self.user_hold_key(&hold.user)])
            .collect();
        let _: i64 = self.call(self.client.del(keys)).await?;
        Ok(())
    }

    /// The user's current hold, if Redis has it.
    pub async fn user_hold(&self, user: &UserId) -> Result<Option<CachedHold>, CacheError> {
        let value: Option<String> = self.call(self.client.get(self.user_hold_key(user))).await?;
        Ok(value.and_then(|v| parse_hold(&v)))
    }

    pub async fn hold(&self, code: &CouponCode) -> Result<Option<CachedHold>, CacheError> {
        let value: Option<String> = self.call(self.client.get(self.hold_key(code))).await?;
        Ok(value.and_then(|v| parse_hold(&v)))
    }

    pub async fn block(&self, user: &UserId, for_how_long: Duration) -> Result<(), CacheError> {
        let ms = for_how_long.as_millis().max(1) as i64;
        let _: () = self
            .call(self.client.set(
                self.blocked_key(user),
                "1",
                Some(Expiration::PX(ms)),
                None,
                false,
            ))
            .await?;
        Ok(())
    }

    /// Lifts a flood block at once, for every gateway (they all read this
    /// key): an operator's lifting must not wait for the block's TTL.
    /// The counts of the last seconds go too, or the client's next request
    /// would find them over the limit and be blocked again.
    pub async fn unblock(&self, user: &UserId) -> Result<(), CacheError> {
        let second = Utc::now().timestamp();
        let keys = vec![
            self.blocked_key(user),
            self.flood_key(user, second),
            self.flood_key(user, second - 1),
        ];
        let _: i64 = self.call(self.client.del(keys)).await?;
        Ok(())
    }

    fn flood_key(&self, client_id: &UserId, second: i64) -> String {
        format!("{}:flood:{client_id}:{second}", self.prefix)
    }

    fn quota_key(&self, user_id: &UserId) -> String {
        format!("{}:user:{user_id}:quota-used", self.prefix)
    }

    fn quota_entries(
        &self,
        users: &[(UserId, DateTime<Utc>)],
    ) -> Vec<(String, String, DateTime<Utc>)> {
        users
            .iter()
            .map(|(user, until)| (self.quota_key(user), "1".to_owned(), *until))
            .collect()
    }

    /// Notes that each user's quota is used until the end of the window
    /// given beside it (a grant, or a `rate_limited` answer), so the sold-out
    /// fast path leaves them to the processor's `429`. A cache: a lost mark
    /// only lets such a user be told `sold_out` instead (never a coupon).
    pub async fn put_quota_used(
        &self,
        users: &[(UserId, DateTime<Utc>)],
    ) -> Result<(), CacheError> {
        self.set_until(&self.quota_entries(users)).await
    }

    fn supply_key(&self) -> String {
        // `{pool}`: the restore's script writes this key and reads the
        // token in one call, which Redis Cluster allows in one hash slot.
        format!("{}:{{pool}}:supply", self.prefix)
    }

    fn sold_out_key(&self, category: Option<&Category>) -> String {
        match category {
            None => format!("{}:pool:sold-out:any", self.prefix),
            Some(category) => format!("{}:pool:sold-out:category:{category}", self.prefix),
        }
    }

    fn restore_token_key(&self) -> String {
        format!("{}:{{pool}}:restore-token", self.prefix)
    }

    /// Records that coupons became available (a batch projected, holds
    /// released): a new supply version, which voids every sold-out mark
    /// (`coupon_domain::sold_out`). Call it after the commit that made them
    /// available. Only an existing version is replaced: an absent one means
    /// the cache lost what the sold-out answers rest on, and only
    /// [`Cache::finish_restore`] may bring it back.
    pub async fn supply_changed(&self) -> Result<(), CacheError> {
        let version = new_version();
        let _: Option<String> = self
            .call(self.client.set(
                self.supply_key(),
                version.as_str(),
                None,
                Some(SetOptions::XX),
                false,
            ))
            .await?;
        Ok(())
    }

    /// The supply version now (`None`: the cache is not known to be
    /// complete; nothing may be answered sold out from it).
    pub async fn supply_version(&self) -> Result<Option<String>, CacheError> {
        self.call(self.client.get(self.supply_key())).await
    }

    /// Turns the sold-out answers off until the next restore: called when a
    /// hold or a used quota could not be written, since the gateway reads
    /// their absence as "this user may be told sold out". A restore already
    /// running may have read Postgres before that write's commit, so its
    /// token goes too.
    pub async fn forget_supply(&self) -> Result<(), CacheError> {
        let _: i64 = self
            .call(
                self.client
                    .del(vec![self.supply_key(), self.restore_token_key()]),
            )
            .await?;
        Ok(())
    }

    /// Starts refilling the cache from Postgres: returns a token that
    /// [`Cache::finish_restore`] checks, so that a restore the cache was
    /// lost again in the middle of (the token went with it) brings nothing
    /// back. Read Postgres only after this.
    pub async fn begin_restore(&self) -> Result<String, CacheError> {
        let token = new_version();
        let _: () = self
            .call(self.client.set(
                self.restore_token_key(),
                token.as_str(),
                Some(Expiration::EX(3_600)),
                None,
                false,
            ))
            .await?;
        Ok(token)
    }

    /// Ends a restore whose holds and used quotas are written: sets a supply
    /// version (so sold-out answers may start again) if the token is still
    /// the one `begin_restore` wrote, i.e. nothing of the cache was lost
    /// since, and no version exists. One script, so the check and the write
    /// are atomic. `false`: the cache was lost (or another restore began)
    /// meanwhile; the version stays absent.
    pub async fn finish_restore(&self, token: &str) -> Result<bool, CacheError> {
        const SCRIPT: &str = r#"
            if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
            redis.call('SET', KEYS[2], ARGV[2], 'NX')
            return 1"#;
        let restored: i64 = self
            .call(self.client.eval(
                SCRIPT,
                vec![self.restore_token_key(), self.supply_key()],
                vec![token.to_owned(), new_version()],
            ))
            .await?;
        Ok(restored == 1)
    }

    /// Marks `pools` (`None`: any category) sold out as of supply
    /// `version`, for at most `ttl` (a safety net: a mark outlives no
    /// lost supply write longer than that).
    pub async fn mark_sold_out(
        &self,
        pools: &[Option<&Category>],
        version: &str,
        ttl: Duration,
    ) -> Result<(), CacheError> {
        if pools.is_empty() {
            return Ok(());
        }
        let ms = ttl.as_millis().max(1) as i64;
        let pipeline = self.client.pipeline();
        for pool in pools {
            let _: () = pipeline
                .set(
                    self.sold_out_key(*pool),
                    version,
                    Some(Expiration::PX(ms)),
                    None,
                    false,
                )
                .await?;
        }
        let _: Vec<Value> = self.call(pipeline.all()).await?;
        Ok(())
    }

    /// What the gateway reads for one claim, in one round trip: the facts
    /// of the sold-out fast path (the supply version, the marks of the
    /// claim's pools, and whether the user holds a coupon, is blocked or has
    /// used the quota) and, with `count_claim`, this claim counted in the
    /// user's count of the current second (flood control), returned.
    pub async fn claim_facts(
        &self,
        user: &UserId,
        category: Option<&Category>,
        count_claim: bool,
    ) -> Result<ClaimFacts, CacheError> {
        let pipeline = self.client.pipeline();
        let _: () = pipeline.get(self.supply_key()).await?;
        let _: () = pipeline.get(self.sold_out_key(None)).await?;
        let _: () = match category {
            Some(category) => pipeline.get(self.sold_out_key(Some(category))).await?,
            None => pipeline.get(self.supply_key()).await?,
        };
        let _: () = pipeline.exists(self.user_hold_key(user)).await?;
        let _: () = pipeline.exists(self.blocked_key(user)).await?;
        let _: () = pipeline.exists(self.quota_key(user)).await?;
        if count_claim {
            let key = self.flood_key(user, Utc::now().timestamp());
            let _: () = pipeline.incr(&key).await?;
            let _: () = pipeline.expire(&key, 2, None).await?;
        }
        let values: Vec<Value> = self.call(pipeline.all()).await?;
        let mut values = values.into_iter();
        let mut next = || values.next().unwrap_or(Value::Null);
        let version: Option<String> = next().convert()?;
        let any_mark: Option<String> = next().convert()?;
        let category_mark: Option<String> = next().convert()?;
        let holds: i64 = next().convert()?;
        let blocked: i64 = next().convert()?;
        let quota_used: i64 = next().convert()?;
        let claims_this_second: Option<u64> = if count_claim {
            Some(next().convert()?)
        } else {
            None
        };
        Ok(ClaimFacts {
            fast_path: coupon_domain::sold_out::FastPathFacts {
                version,
                any_mark,
                category_mark: category.and(category_mark),
                holds_coupon: holds > 0,
                blocked: blocked > 0,
                quota_used: quota_used > 0,
            },
            claims_this_second,
        })
    }

    /// [`Cache::claim_facts`] without counting the claim.
    pub async fn fast_path_facts(
        &self,
        user: &UserId,
        category: Option<&Category>,
    ) -> Result<coupon_domain::sold_out::FastPathFacts, CacheError> {
        Ok(self.claim_facts(user, category, false).await?.fast_path)
    }

    pub async fn ping(&self) -> Result<(), CacheError> {
        let _: String = self.call(self.client.ping(None)).await?;
        Ok(())
    }

    /// Deletes every key under this prefix at once, as losing Redis would
    /// (tests, and the demo's reset). One script, so nothing written
    /// meanwhile survives half a wipe; it blocks Redis for the scan, so it is
    /// not for a production keyspace.
    pub async fn clear(&self) -> Result<u64, CacheError> {
        const SCRIPT: &str = r#"
            local cursor, deleted = '0', 0
            repeat
                local page = redis.call('SCAN', cursor, 'MATCH', ARGV[1], 'COUNT', 1000)
                cursor = page[1]
                for _, key in ipairs(page[2]) do
                    deleted = deleted + redis.call('DEL', key)
                end
            until cursor == '0'
            return deleted"#;
        let deleted: i64 = self
            .call(self.client.eval(
                SCRIPT,
                Vec::<String>::new(),
                vec![format!("{}:*", self.prefix)],
            ))
            .await?;
        Ok(deleted as u64)
    }

    pub async fn quit(&self) {
        let _ = self.client.quit().await;
    }
}

fn new_version() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

#[derive(serde::Serialize, serde::Deserialize)]
struct HoldValue<'a> {
    #[serde(borrow)]
    code: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    user_id: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    category: std::borrow::Cow<'a, str>,
    expires_at_ms: i64,
}

fn encode_hold(hold: &CachedHold) -> String {
    serde_json::to_string(&HoldValue {
        code: hold.code.to_string().into(),
        user_id: hold.user_id.as_str().into(),
        category: hold.category.as_str().into(),
        expires_at_ms: hold.expires_at.timestamp_millis(),
    })
    .unwrap_or_default()
}

/// A value that does not parse is treated as a cache miss.
fn parse_hold(value: &str) -> Option<CachedHold> {
    let v: HoldValue<'_> = serde_json::from_str(value).ok()?;
    Some(CachedHold {
        code: CouponCode::parse(&v.code).ok()?,
        user_id: UserId::parse(v.user_id.into_owned()).ok()?,
        category: Category::parse(v.category.into_owned()).ok()?,
        expires_at: crate::time::from_ms(v.expires_at_ms)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hold_values_round_trip_whatever_the_ids_contain() {
        let hold = CachedHold {
            code: CouponCode::parse("0AN35HST00000").unwrap(),
            user_id: UserId::parse("user|with\"quotes").unwrap(),
            category: Category::parse("Home|Garden").unwrap(),
            expires_at: crate::time::from_ms(1_764_000_000_000).unwrap(),
        };
        assert_eq!(parse_hold(&encode_hold(&hold)), Some(hold));
        assert_eq!(parse_hold("garbage"), None);
    }
}
