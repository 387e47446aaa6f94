//! Redis: a cache of holds and the gateway's flood counters.
//!
//! Redis is never the authority. Postgres holds every hold with its deadline;
//! Redis mirrors them with a TTL so a hold can be looked up without a database
//! round trip, and is rebuilt from Postgres at start-up (and by `couponctl
//! holds rebuild`). Losing Redis therefore costs speed, never correctness.

use std::time::Duration;

use chrono::{DateTime, Utc};
use fred::prelude::*;

#[derive(Debug, thiserror::Error)]
#[error("redis: {0}")]
pub struct CacheError(#[from] fred::error::Error);

/// A hold as mirrored in Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedHold {
    pub code: String,
    pub user_id: String,
    pub category: String,
    pub expires_at: DateTime<Utc>,
}

#[derive(Clone)]
pub struct Cache {
    client: Client,
    prefix: String,
}

impl Cache {
    /// Connects and keeps reconnecting in the background if Redis goes away;
    /// commands fail fast (2 s) meanwhile instead of piling up.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, CacheError> {
        let config = Config::from_url(url)?;
        let client = Builder::from_config(config)
            .with_performance_config(|perf| {
                perf.default_command_timeout = Duration::from_secs(2);
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
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn hold_key(&self, code: &str) -> String {
        format!("{}:hold:{code}", self.prefix)
    }

    fn user_hold_key(&self, user_id: &str) -> String {
        format!("{}:user-hold:{user_id}", self.prefix)
    }

    fn blocked_key(&self, client_id: &str) -> String {
        format!("{}:blocked:{client_id}", self.prefix)
    }

    /// Writes holds (pipelined) with a TTL that ends at each hold's deadline.
    /// Holds already past their deadline are skipped.
    pub async fn put_holds(&self, holds: &[CachedHold]) -> Result<(), CacheError> {
        let mut entries = Vec::with_capacity(holds.len() * 2);
        for hold in holds {
            let value = encode_hold(hold);
            entries.push((self.hold_key(&hold.code), value.clone(), hold.expires_at));
            entries.push((self.user_hold_key(&hold.user_id), value, hold.expires_at));
        }
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
            let _: Vec<Value> = pipeline.all().await?;
        }
        Ok(())
    }

    /// Removes holds that ended (redeemed or released).
    pub async fn remove_holds(&self, ended: &[(String, String)]) -> Result<(), CacheError> {
        if ended.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = ended
            .iter()
            .flat_map(|(code, user)| [self.hold_key(code), self.user_hold_key(user)])
            .collect();
        let _: i64 = self.client.del(keys).await?;
        Ok(())
    }

    /// The user's current hold, if Redis has it.
    pub async fn user_hold(&self, user_id: &str) -> Result<Option<CachedHold>, CacheError> {
        let value: Option<String> = self.client.get(self.user_hold_key(user_id)).await?;
        Ok(value.and_then(|v| parse_hold(&v)))
    }

    pub async fn hold(&self, code: &str) -> Result<Option<CachedHold>, CacheError> {
        let value: Option<String> = self.client.get(self.hold_key(code)).await?;
        Ok(value.and_then(|v| parse_hold(&v)))
    }

    /// Counts one request by `client_id` in the current second; returns the count.
    pub async fn count_request(&self, client_id: &str) -> Result<u64, CacheError> {
        let second = Utc::now().timestamp();
        let key = format!("{}:flood:{client_id}:{second}", self.prefix);
        let pipeline = self.client.pipeline();
        let _: () = pipeline.incr(&key).await?;
        let _: () = pipeline.expire(&key, 2, None).await?;
        let (count, _): (u64, i64) = pipeline.all().await?;
        Ok(count)
    }

    pub async fn block(&self, client_id: &str, for_how_long: Duration) -> Result<(), CacheError> {
        let ms = for_how_long.as_millis().max(1) as i64;
        let _: () = self
            .client
            .set(
                self.blocked_key(client_id),
                "1",
                Some(Expiration::PX(ms)),
                None,
                false,
            )
            .await?;
        Ok(())
    }

    pub async fn is_blocked(&self, client_id: &str) -> Result<bool, CacheError> {
        let exists: i64 = self.client.exists(self.blocked_key(client_id)).await?;
        Ok(exists > 0)
    }

    fn quota_key(&self, user_id: &str) -> String {
        format!("{}:user:{user_id}:quota-used", self.prefix)
    }

    /// Notes that each user's quota is used until the end of the window
    /// given beside it (a grant, or a `rate_limited` answer), so the sold-out
    /// fast path leaves them to the processor's `429`. A cache: a lost mark
    /// only lets such a user be told `sold_out` instead (never a coupon).
    pub async fn put_quota_used(
        &self,
        users: &[(String, DateTime<Utc>)],
    ) -> Result<(), CacheError> {
        let entries: Vec<_> = users
            .iter()
            .map(|(user_id, until)| (self.quota_key(user_id), "1".to_owned(), *until))
            .collect();
        self.set_until(&entries).await
    }

    fn supply_key(&self) -> String {
        format!("{}:pool:supply", self.prefix)
    }

    fn sold_out_key(&self, category: Option<&str>) -> String {
        match category {
            None => format!("{}:pool:sold-out:any", self.prefix),
            Some(category) => format!("{}:pool:sold-out:category:{category}", self.prefix),
        }
    }

    /// Records that coupons became available (a batch projected, holds
    /// released): a new supply version, which voids every sold-out mark
    /// (`coupon_domain::sold_out`). Call it after the commit that made them
    /// available.
    pub async fn supply_changed(&self) -> Result<(), CacheError> {
        let version = uuid::Uuid::new_v4().simple().to_string();
        let _: () = self
            .client
            .set(self.supply_key(), version.as_str(), None, None, false)
            .await?;
        Ok(())
    }

    /// The supply version now (`None`: never set).
    pub async fn supply_version(&self) -> Result<Option<String>, CacheError> {
        Ok(self.client.get(self.supply_key()).await?)
    }

    /// Marks `pools` (`None`: any category) sold out as of supply
    /// `version`, for at most `ttl` (a safety net: a mark outlives no
    /// lost supply write longer than that).
    pub async fn mark_sold_out(
        &self,
        pools: &[Option<&str>],
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
        let _: Vec<Value> = pipeline.all().await?;
        Ok(())
    }

    /// What the gateway needs to answer a claim `sold_out` by itself, in
    /// one round trip: the supply version, the marks of the claim's pools,
    /// and whether the user holds a coupon or is blocked.
    pub async fn fast_path_facts(
        &self,
        user_id: &str,
        category: Option<&str>,
    ) -> Result<coupon_domain::sold_out::FastPathFacts, CacheError> {
        let pipeline = self.client.pipeline();
        let _: () = pipeline.get(self.supply_key()).await?;
        let _: () = pipeline.get(self.sold_out_key(None)).await?;
        let _: () = match category {
            Some(category) => pipeline.get(self.sold_out_key(Some(category))).await?,
            None => pipeline.get(self.supply_key()).await?,
        };
        let _: () = pipeline.exists(self.user_hold_key(user_id)).await?;
        let _: () = pipeline.exists(self.blocked_key(user_id)).await?;
        let _: () = pipeline.exists(self.quota_key(user_id)).await?;
        let (version, any_mark, category_mark, holds, blocked, quota_used): (
            Option<String>,
            Option<String>,
            Option<String>,
            i64,
            i64,
            i64,
        ) = pipeline.all().await?;
        Ok(coupon_domain::sold_out::FastPathFacts {
            version,
            any_mark,
            category_mark: category.and(category_mark),
            holds_coupon: holds > 0,
            blocked: blocked > 0,
            quota_used: quota_used > 0,
        })
    }

    pub async fn ping(&self) -> Result<(), CacheError> {
        let _: String = self.client.ping(None).await?;
        Ok(())
    }

    /// Deletes every key under this prefix (tests and `holds rebuild --clear`).
    pub async fn clear(&self) -> Result<u64, CacheError> {
        let mut cursor = "0".to_owned();
        let mut deleted = 0u64;
        loop {
            let (next, keys): (String, Vec<String>) = self
                .client
                .custom(
                    fred::cmd!("SCAN"),
                    vec![
                        cursor.clone(),
                        "MATCH".into(),
                        format!("{}:*", self.prefix),
                        "COUNT".into(),
                        "1000".into(),
                    ],
                )
                .await?;
            if !keys.is_empty() {
                let n: i64 = self.client.del(keys).await?;
                deleted += n as u64;
            }
            if next == "0" {
                return Ok(deleted);
            }
            cursor = next;
        }
    }

    pub async fn quit(&self) {
        let _ = self.client.quit().await;
    }
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
        code: hold.code.as_str().into(),
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
        code: v.code.into_owned(),
        user_id: v.user_id.into_owned(),
        category: v.category.into_owned(),
        expires_at: crate::time::from_ms(v.expires_at_ms)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hold_values_round_trip_whatever_the_ids_contain() {
        let hold = CachedHold {
            code: "0ABC".into(),
            user_id: "user|with\"quotes".into(),
            category: "Home|Garden".into(),
            expires_at: crate::time::from_ms(1_764_000_000_000).unwrap(),
        };
        assert_eq!(parse_hold(&encode_hold(&hold)), Some(hold));
        assert_eq!(parse_hold("garbage"), None);
    }
}
