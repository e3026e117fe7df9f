//! Exact sliding windows shared by every instance through Redis.
//!
//! Each limited key is one sorted set, `{prefix}rl:{key}`, holding the hits
//! it counted, scored by the time of the hit in microseconds. One Lua script
//! decides a hit in one round trip and atomically: it counts the hits held
//! (dropping those that left the window first when they reach the limit),
//! and either adds the new hit or answers how long until the oldest one
//! leaves. The time is the Redis server's
//! (`TIME`), so instances with drifting clocks still share one window. The
//! key expires one window after its newest hit, so idle keys vanish.
//!
//! When Redis cannot answer quickly, limits fail open to an in-process
//! [`MemoryLimiter`]: each instance then enforces the limit on its own, which
//! keeps abuse bounded (by the limit times the number of instances) without
//! making chat depend on Redis being up.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use crate::redis_conn::RedisConn;
use async_trait::async_trait;
use redis::Script;
use tokio::time::Instant;

use super::{Decision, Limit, Limiter, memory::MemoryLimiter};
use crate::error::ChatError;

/// The longest a hit waits for Redis (connection set-up included) before the
/// in-process window decides instead: a hung Redis must not stall sends.
const REDIS_TIMEOUT: Duration = Duration::from_millis(250);

/// After a failure, how long hits skip Redis altogether. Without it, every
/// send during an outage of an unresponsive (not refusing) Redis would wait
/// the full timeout first.
const BYPASS_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// At most one warning per this period while falling back; the counter
/// `chat_limiter_fallback_total` counts every fallen-back hit.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// KEYS[1]: the sorted set of counted hits. ARGV: limit, window (µs), a
/// member unique to this hit (two hits in the same microsecond must both
/// count, so the time alone cannot be the member), window (ms, at least 1).
///
/// Returns `{1, 0}` when the hit is counted, `{0, µs}` when refused, with
/// the time until the oldest counted hit leaves the window.
///
/// Hits that left the window are dropped only when the set is full: while
/// it holds fewer than `limit` hits, fewer than `limit` are in the window,
/// so the hit is allowed whatever their age, and the set never holds more
/// than `limit`. An allowed hit under the limit, the usual case, so costs
/// four commands, and its score is written from `TIME`'s digits rather
/// than formatted from a number (Redis 7.0 formats script numbers with
/// `%.17g`, a measurable share of its CPU under load).
///
/// Times stay below 2^53 µs, so Lua's doubles and the set's scores hold them
/// exactly.
const HIT_LUA: &str = r#"
local t = redis.call('TIME')
local limit = tonumber(ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= limit then
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local window = tonumber(ARGV[2])
  -- A hit exactly one window old has left it (inclusive bound), as in memory.rs.
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  if redis.call('ZCARD', KEYS[1]) >= limit then
    local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    local wait = window
    if oldest[2] then
      wait = tonumber(oldest[2]) + window - now
    end
    return {0, wait}
  end
end
redis.call('ZADD', KEYS[1], t[1] .. string.rep('0', 6 - #t[2]) .. t[2], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {1, 0}
"#;

pub struct RedisLimiter {
    redis: RedisConn,
    prefix: String,
    script: Script,
    /// Members are `<nonce>:<seq>`: unique across instances (random nonce)
    /// and within one (counter).
    nonce: String,
    seq: AtomicU64,
    fallback: MemoryLimiter,
    /// Held only to read or update two instants, never across an await.
    outage: Mutex<Outage>,
}

#[derive(Debug, Default)]
struct Outage {
    /// Hits go straight to the fallback until then.
    bypass_until: Option<Instant>,
    last_warning: Option<Instant>,
}

impl RedisLimiter {
    pub fn new(redis: RedisConn, prefix: String) -> Self {
        Self {
            redis,
            prefix,
            script: Script::new(HIT_LUA),
            nonce: uuid::Uuid::now_v7().simple().to_string(),
            seq: AtomicU64::new(0),
            fallback: MemoryLimiter::default(),
            outage: Mutex::new(Outage::default()),
        }
    }

    async fn hit_redis(&self, key: &str, limit: Limit) -> anyhow::Result<Decision> {
        let window_us = u64::try_from(limit.window.as_micros()).unwrap_or(u64::MAX);
        let member = format!(
            "{}:{}",
            self.nonce,
            self.seq.fetch_add(1, Ordering::Relaxed)
        );
        let window_ms = window_us.div_ceil(1000).max(1);
        let mut invocation = self.script.key(format!("{}rl:{key}", self.prefix));
        invocation
            .arg(limit.limit)
            .arg(window_us)
            .arg(member)
            .arg(window_ms);
        let call = async {
            let mut conn = self.redis.clone();
            let answer: (i64, i64) = invocation.invoke_async(&mut conn).await?;
            anyhow::Ok(answer)
        };
        let (allowed, wait_us) = tokio::time::timeout(REDIS_TIMEOUT, call)
            .await
            .map_err(|_| anyhow::anyhow!("Redis did not answer within {REDIS_TIMEOUT:?}"))??;
        if allowed == 1 {
            return Ok(Decision::Allowed);
        }
        let wait = Duration::from_micros(u64::try_from(wait_us).unwrap_or(0));
        Ok(Decision::Refused {
            retry_after: wait.max(Duration::from_millis(1)),
        })
    }

    fn bypassing(&self) -> bool {
        let outage = self.outage.lock().expect("limiter outage lock");
        outage.bypass_until.is_some_and(|t| Instant::now() < t)
    }

    /// Starts (or extends) a bypass and warns, at most once per period.
    fn record_failure(&self, err: &anyhow::Error) {
        let now = Instant::now();
        let mut outage = self.outage.lock().expect("limiter outage lock");
        outage.bypass_until = Some(now + BYPASS_AFTER_FAILURE);
        if outage
            .last_warning
            .is_none_or(|t| now.duration_since(t) >= WARN_EVERY)
        {
            outage.last_warning = Some(now);
            tracing::warn!(
                error = %format!("{err:#}"),
                "Redis rate limiter unavailable; limits are enforced per instance meanwhile"
            );
        }
    }

    fn fall_back(&self, key: &str, limit: Limit) -> Decision {
        metrics::counter!("chat_limiter_fallback_total").increment(1);
        self.fallback.hit_now(key, limit)
    }
}

#[async_trait]
impl Limiter for RedisLimiter {
    /// Never fails: Redis trouble falls back to the in-process window.
    async fn hit(&self, key: &str, limit: Limit) -> Result<Decision, ChatError> {
        if self.bypassing() {
            return Ok(self.fall_back(key, limit));
        }
        match self.hit_redis(key, limit).await {
            Ok(decision) => Ok(decision),
            Err(err) => {
                self.record_failure(&err);
                Ok(self.fall_back(key, limit))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use redis::AsyncCommands;

    use super::*;

    use crate::testing::{key_prefix as test_prefix, redis_at, redis_connection};

    fn limit(limit: u32, window_ms: u64) -> Limit {
        Limit {
            limit,
            window: Duration::from_millis(window_ms),
        }
    }

    async fn refusal(limiter: &RedisLimiter, key: &str, limit: Limit) -> Duration {
        match limiter.hit(key, limit).await.expect("hit") {
            Decision::Refused { retry_after } => retry_after,
            Decision::Allowed => panic!("a hit over the limit was allowed"),
        }
    }

    #[tokio::test]
    async fn allows_the_limit_then_refuses_until_the_oldest_hit_leaves() {
        let limiter = RedisLimiter::new(redis_connection().await, test_prefix());
        let l = limit(3, 10_000);
        for _ in 0..3 {
            assert_eq!(limiter.hit("k", l).await.expect("hit"), Decision::Allowed);
        }
        let retry_after = refusal(&limiter, "k", l).await;
        assert!(
            retry_after > Duration::from_secs(9) && retry_after <= Duration::from_secs(10),
            "retry_after {retry_after:?}"
        );
        // Another key has its own window.
        assert_eq!(
            limiter.hit("other", l).await.expect("hit"),
            Decision::Allowed
        );
    }

    #[tokio::test]
    async fn window_slides_and_refused_hits_are_not_counted() {
        let limiter = RedisLimiter::new(redis_connection().await, test_prefix());
        let l = limit(2, 600);
        assert_eq!(limiter.hit("k", l).await.expect("hit"), Decision::Allowed);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(limiter.hit("k", l).await.expect("hit"), Decision::Allowed);
        let retry_after = refusal(&limiter, "k", l).await;
        // About 400 ms: the first hit is 200 ms (or a little more) old.
        assert!(
            retry_after <= Duration::from_millis(400),
            "retry_after {retry_after:?}"
        );
        // Refusals meanwhile must not push the window further.
        for _ in 0..5 {
            refusal(&limiter, "k", l).await;
        }
        tokio::time::sleep(retry_after + Duration::from_millis(20)).await;
        // The first hit left; the second is still in the window.
        assert_eq!(limiter.hit("k", l).await.expect("hit"), Decision::Allowed);
        refusal(&limiter, "k", l).await;
    }

    #[tokio::test]
    async fn instances_sharing_a_prefix_share_the_limit() {
        let prefix = test_prefix();
        let a = RedisLimiter::new(redis_connection().await, prefix.clone());
        let b = RedisLimiter::new(redis_connection().await, prefix);
        let l = limit(2, 10_000);
        assert_eq!(a.hit("k", l).await.expect("hit"), Decision::Allowed);
        assert_eq!(b.hit("k", l).await.expect("hit"), Decision::Allowed);
        refusal(&a, "k", l).await;
        refusal(&b, "k", l).await;
    }

    #[tokio::test]
    async fn concurrent_hits_never_exceed_the_limit() {
        let prefix = test_prefix();
        let limiters = [
            Arc::new(RedisLimiter::new(redis_connection().await, prefix.clone())),
            Arc::new(RedisLimiter::new(redis_connection().await, prefix)),
        ];
        let l = limit(10, 10_000);
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..60 {
            let limiter = Arc::clone(&limiters[i % 2]);
            tasks.spawn(async move { limiter.hit("k", l).await.expect("hit") });
        }
        let allowed = tasks
            .join_all()
            .await
            .into_iter()
            .filter(|d| *d == Decision::Allowed)
            .count();
        assert_eq!(allowed, 10);
    }

    /// Hits that left the window are dropped when the set fills, so a busy
    /// key's set never holds more than the limit, and old hits never count.
    #[tokio::test]
    async fn a_busy_key_holds_at_most_the_limit_window_after_window() {
        let prefix = test_prefix();
        let redis = redis_connection().await;
        let limiter = RedisLimiter::new(redis.clone(), prefix.clone());
        let l = limit(3, 300);
        let mut conn = redis;
        for _ in 0..3 {
            for _ in 0..3 {
                assert_eq!(limiter.hit("k", l).await.expect("hit"), Decision::Allowed);
            }
            refusal(&limiter, "k", l).await;
            let held: u64 = conn.zcard(format!("{prefix}rl:k")).await.expect("ZCARD");
            assert_eq!(held, 3);
            tokio::time::sleep(Duration::from_millis(320)).await;
        }
    }

    #[tokio::test]
    async fn idle_keys_expire_after_one_window() {
        let prefix = test_prefix();
        let redis = redis_connection().await;
        let limiter = RedisLimiter::new(redis.clone(), prefix.clone());
        limiter.hit("k", limit(5, 2_000)).await.expect("hit");
        let mut conn = redis;
        let pttl: i64 = redis::cmd("PTTL")
            .arg(format!("{prefix}rl:k"))
            .query_async(&mut conn)
            .await
            .expect("PTTL");
        assert!(pttl > 0 && pttl <= 2_000, "PTTL {pttl}");
    }

    #[tokio::test]
    async fn fails_open_to_per_instance_limits_and_answers_quickly() {
        // Nothing listens on port 1: every Redis call fails.
        let limiter = RedisLimiter::new(redis_at("redis://127.0.0.1:1"), test_prefix());
        let l = limit(3, 10_000);
        let started = std::time::Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.hit("k", l).await.expect("hit"), Decision::Allowed);
        }
        let retry_after = refusal(&limiter, "k", l).await;
        assert!(retry_after > Duration::from_secs(9), "{retry_after:?}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "took {:?}",
            started.elapsed()
        );
    }
}
