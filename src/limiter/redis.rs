//! Exact sliding windows shared by every instance through Redis.
//!
//! Each limited key is one sorted set, `{prefix}rl:{key}`, holding the hits
//! it counted, scored by the time of the hit in microseconds. One Lua script
//! decides hits atomically: for each request (one hit, or several on one
//! key) it counts the hits held (dropping those that left the window first
//! when the request would not fit), adds the hits the limit allows, and
//! answers how many, and how long until the oldest one leaves. The
//! time is the Redis server's (`TIME`), so instances with drifting clocks
//! still share one window. The key expires one window after its newest
//! hit, so idle keys vanish.
//!
//! Hits are decided in batches, as the store commits and the bus publishes:
//! a hit only queues its request, and one task per instance sends whatever
//! queued since it last ran (at most [`HITS_PER_CALL`]) in one script call,
//! with several calls in flight, so no hit waits for another batch's
//! answer. A lone hit still costs one round trip; under load, dozens share
//! one, and Redis reads the request, starts the script and reads its clock
//! once per batch instead of once per hit (about two fifths less Redis CPU
//! per hit, docs/benchmarks.md). Hits on one key in one call are decided in
//! the order they queued, each seeing the ones before it; the hits of one
//! [`Limiter::hit_all`] (a connection's sends that arrived together) queue
//! as one request, so they share a call and, when they fit in the window,
//! three commands (a fifth less Redis CPU per message at ingest with
//! sixteen sends in flight per connection, docs/benchmarks.md).
//!
//! When Redis cannot answer quickly, limits fail open to an in-process
//! [`MemoryLimiter`]: each instance then enforces the limit on its own, which
//! keeps abuse bounded (by the limit times the number of instances) without
//! making chat depend on Redis being up.

use std::{
    sync::{
        LazyLock, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use crate::redis_conn::RedisConn;
use async_trait::async_trait;
use redis::Script;
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinSet,
    time::Instant,
};

use super::{Decision, Limit, Limiter, memory::MemoryLimiter};
use crate::{error::ChatError, telemetry::LogThrottle};

/// The longest a hit waits for Redis (its turn in the queue and connection
/// set-up included) before the in-process window decides instead: a hung
/// Redis must not stall sends.
const REDIS_TIMEOUT: Duration = Duration::from_millis(250);

/// After a failure, how long hits skip Redis altogether. Without it, every
/// send during an outage of an unresponsive (not refusing) Redis would wait
/// the full timeout first.
const BYPASS_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// At most one warning per this period while falling back; the counter
/// `chat_limiter_fallback_total` counts every fallen-back hit.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Requests waiting for [`decide_queued`]. It fills only while Redis is
/// slower than the sends; a hit that does not fit is decided by the
/// in-process window, as during an outage.
const HIT_QUEUE: usize = 16_384;

/// Most requests one script call decides (a request is one hit, or the
/// hits of one [`Limiter::hit_all`]).
const HITS_PER_CALL: usize = 256;

/// Most script calls waiting for Redis at once; more hits queue meanwhile.
const CALLS_IN_FLIGHT: usize = 8;

/// KEYS: the sorted sets of counted hits, one per request (a key may
/// repeat). ARGV: five per request, in the order of KEYS: limit, window
/// (µs), hits, the request's member, window (ms, at least 1).
///
/// Returns two integers per request, in order: how many of its hits were
/// counted (the first ones), and, when some were refused, the µs until the
/// oldest counted hit leaves the window (0 when none were).
///
/// A request's hits are decided together, as they would be one after the
/// other: the first `limit - held` are counted (`held`: hits in the
/// window), the rest refused. Hits that left the window are dropped only
/// when the request does not fit: while the set holds room for it, fewer
/// than `limit` are in the window whatever their age, and the set never
/// holds more than `limit`. A request that fits, the usual case, so costs
/// three commands however many hits it has (one `ZADD` of them all), and
/// their score is written from `TIME`'s digits rather than formatted from a
/// number (Redis 7.0 formats script numbers with `%.17g`, a measurable
/// share of its CPU under load). Each hit's member is unique to it (two
/// hits in the same microsecond must both count, so the time alone cannot
/// be the member): a request's member, `<nonce>:<seq>`, is unique to the
/// request ([`RedisLimiter`]) and is its hit's when it makes one; the hits
/// of a larger request add their place, `<nonce>:<seq>:<i>`, a shape no
/// lone hit's member has.
///
/// Times stay below 2^53 µs, so Lua's doubles and the set's scores hold them
/// exactly.
static HIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local score = t[1] .. string.rep('0', 6 - #t[2]) .. t[2]
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
for k = 1, #KEYS do
  local key = KEYS[k]
  local a = 5 * (k - 1)
  local limit = tonumber(ARGV[a + 1])
  local window = tonumber(ARGV[a + 2])
  local hits = tonumber(ARGV[a + 3])
  local held = redis.call('ZCARD', key)
  if held + hits > limit then
    -- A hit exactly one window old has left it (inclusive bound), as in memory.rs.
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
    held = redis.call('ZCARD', key)
  end
  local allowed = math.max(0, math.min(hits, limit - held))
  if hits == 1 and allowed == 1 then
    redis.call('ZADD', key, score, ARGV[a + 4])
  elseif allowed > 0 then
    local prefix = ARGV[a + 4] .. ':'
    -- ZADD takes its members in chunks: Lua's stack bounds unpack.
    for from = 1, allowed, 1000 do
      local args = {}
      for i = from, math.min(allowed, from + 999) do
        args[#args + 1] = score
        args[#args + 1] = prefix .. i
      end
      redis.call('ZADD', key, unpack(args))
    end
  end
  if allowed > 0 then
    redis.call('PEXPIRE', key, ARGV[a + 5])
  end
  local wait = 0
  if allowed < hits then
    local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    wait = window
    if oldest[2] then
      wait = tonumber(oldest[2]) + window - now
    end
  end
  out[2 * k - 1] = allowed
  out[2 * k] = wait
end
return out
"#,
    )
});

/// Hits on one key waiting for their batch.
struct Pending {
    key: String,
    hits: usize,
    /// Unique to the request: see [`HIT`].
    member: String,
    limit: Limit,
    /// The hits counted and the wait (µs) for the rest (see [`HIT`]), or
    /// why the batch failed.
    answer: oneshot::Sender<Result<(i64, i64), String>>,
}

pub struct RedisLimiter {
    prefix: String,
    /// The queue of [`decide_queued`].
    queue: mpsc::Sender<Pending>,
    /// A request's member is `<nonce>:<seq>`: unique across instances
    /// (random nonce) and within one (counter).
    nonce: String,
    seq: AtomicU64,
    fallback: MemoryLimiter,
    /// Held only to read or update two instants, never across an await.
    outage: Mutex<Outage>,
    warnings: LogThrottle,
}

#[derive(Debug, Default)]
struct Outage {
    /// Hits go straight to the fallback until then.
    bypass_until: Option<Instant>,
}

impl RedisLimiter {
    /// Starts the task that sends the hits (so: within a Tokio runtime). It
    /// ends once the limiter is dropped.
    pub fn new(redis: RedisConn, prefix: String) -> Self {
        let (queue, pending) = mpsc::channel(HIT_QUEUE);
        tokio::spawn(decide_queued(redis, pending));
        Self {
            prefix,
            queue,
            nonce: uuid::Uuid::now_v7().simple().to_string(),
            seq: AtomicU64::new(0),
            fallback: MemoryLimiter::default(),
            outage: Mutex::new(Outage::default()),
            warnings: LogThrottle::new(WARN_EVERY),
        }
    }

    /// The sorted set holding `key`'s hits.
    fn set_of(&self, key: &str) -> String {
        format!("{}rl:{key}", self.prefix)
    }

    async fn hit_redis(
        &self,
        key: &str,
        limit: Limit,
        count: usize,
    ) -> anyhow::Result<Vec<Decision>> {
        let (answer, answered) = oneshot::channel();
        let pending = Pending {
            key: self.set_of(key),
            hits: count,
            member: format!(
                "{}:{}",
                self.nonce,
                self.seq.fetch_add(1, Ordering::Relaxed)
            ),
            limit,
            answer,
        };
        self.queue
            .try_send(pending)
            .map_err(|_| anyhow::anyhow!("too many hits waiting for Redis"))?;
        let (allowed, wait_us) = tokio::time::timeout(REDIS_TIMEOUT, answered)
            .await
            .map_err(|_| anyhow::anyhow!("Redis did not answer within {REDIS_TIMEOUT:?}"))?
            .map_err(|_| anyhow::anyhow!("the limiter's task ended"))?
            .map_err(anyhow::Error::msg)?;
        // The first `allowed` hits were counted, the rest refused.
        let allowed = usize::try_from(allowed).unwrap_or(0);
        let refused = Decision::Refused {
            retry_after: Duration::from_micros(u64::try_from(wait_us).unwrap_or(0))
                .max(Duration::from_millis(1)),
        };
        Ok((0..count)
            .map(|hit| {
                if hit < allowed {
                    Decision::Allowed
                } else {
                    refused
                }
            })
            .collect())
    }

    fn bypassing(&self) -> bool {
        let outage = self.outage.lock().expect("limiter outage lock");
        outage.bypass_until.is_some_and(|t| Instant::now() < t)
    }

    /// Starts (or extends) a bypass and warns, at most once per period.
    fn record_failure(&self, err: &anyhow::Error) {
        self.outage
            .lock()
            .expect("limiter outage lock")
            .bypass_until = Some(Instant::now() + BYPASS_AFTER_FAILURE);
        if self.warnings.allow() {
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

/// Sends the queued hits: whatever has queued up (up to [`HITS_PER_CALL`])
/// goes in one script call, and each hit gets its answer. Up to
/// [`CALLS_IN_FLIGHT`] calls run at once (as the history cache's writer
/// does), so a batch never waits for the previous one's answer: a hit costs
/// no more waiting than its own round trip, as when each hit was its own
/// call. A failed or late call fails every hit in it (their callers fall
/// back); hits whose callers stopped waiting are still sent, as a call
/// already in flight would have been.
async fn decide_queued(redis: RedisConn, mut queue: mpsc::Receiver<Pending>) {
    let mut hits = Vec::with_capacity(HITS_PER_CALL);
    let mut calls = JoinSet::new();
    while queue.recv_many(&mut hits, HITS_PER_CALL).await > 0 {
        while calls.try_join_next().is_some() {}
        if calls.len() >= CALLS_IN_FLIGHT {
            calls.join_next().await;
        }
        calls.spawn(decide(redis.clone(), std::mem::take(&mut hits)));
    }
}

/// One script call for `hits`, and their answers.
async fn decide(mut conn: RedisConn, hits: Vec<Pending>) {
    let count: usize = hits.iter().map(|hit| hit.hits).sum();
    metrics::histogram!("chat_limiter_batch_size").record(count as f64);
    let mut call = HIT.prepare_invoke();
    for hit in &hits {
        let window_us = u64::try_from(hit.limit.window.as_micros()).unwrap_or(u64::MAX);
        call.key(&hit.key)
            .arg(hit.limit.limit)
            .arg(window_us)
            .arg(hit.hits)
            .arg(&hit.member)
            .arg(window_us.div_ceil(1000).max(1));
    }
    let answers =
        match tokio::time::timeout(REDIS_TIMEOUT, call.invoke_async::<Vec<i64>>(&mut conn)).await {
            Ok(Ok(answers)) if answers.len() == 2 * hits.len() => Ok(answers),
            Ok(Ok(answers)) => Err(format!(
                "the limiter script answered {} values for {} requests",
                answers.len(),
                hits.len(),
            )),
            Ok(Err(err)) => Err(format!("{:#}", anyhow::Error::from(err))),
            Err(_) => Err(format!("Redis did not answer within {REDIS_TIMEOUT:?}")),
        };
    match answers {
        Ok(answers) => {
            for (hit, pair) in hits.into_iter().zip(answers.chunks_exact(2)) {
                let _ = hit.answer.send(Ok((pair[0], pair[1])));
            }
        }
        Err(error) => {
            for hit in hits {
                let _ = hit.answer.send(Err(error.clone()));
            }
        }
    }
}

#[async_trait]
impl Limiter for RedisLimiter {
    /// Never fails: Redis trouble falls back to the in-process window.
    async fn hit(&self, key: &str, limit: Limit) -> Result<Decision, ChatError> {
        let decisions = self.hit_all(key, limit, 1).await?;
        decisions
            .into_iter()
            .next()
            .ok_or_else(|| ChatError::Internal(anyhow::anyhow!("the limiter decided no hit")))
    }

    /// One request, so one script call, for all `count` hits. Never fails,
    /// as [`Self::hit`].
    async fn hit_all(
        &self,
        key: &str,
        limit: Limit,
        count: usize,
    ) -> Result<Vec<Decision>, ChatError> {
        if count == 0 {
            return Ok(Vec::new());
        }
        if !self.bypassing() {
            match self.hit_redis(key, limit, count).await {
                Ok(decisions) => return Ok(decisions),
                Err(err) => self.record_failure(&err),
            }
        }
        Ok((0..count).map(|_| self.fall_back(key, limit)).collect())
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

    /// A limiter on a key prefix of its own, and a connection to look at
    /// its sets.
    struct Watched {
        limiter: RedisLimiter,
        conn: RedisConn,
    }

    impl Watched {
        async fn new() -> Self {
            let conn = redis_connection().await;
            Self {
                limiter: RedisLimiter::new(conn.clone(), test_prefix()),
                conn,
            }
        }

        /// The hits `key`'s set holds.
        async fn held(&mut self, key: &str) -> u64 {
            let set = self.limiter.set_of(key);
            self.conn.zcard(set).await.expect("ZCARD")
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
    async fn hits_made_together_are_decided_in_order_each_seeing_the_ones_before() {
        let mut watched = Watched::new().await;
        let limiter = &watched.limiter;
        let l = limit(3, 10_000);
        assert_eq!(limiter.hit("k", l).await.expect("hit"), Decision::Allowed);
        let decisions = limiter.hit_all("k", l, 4).await.expect("hits");
        assert_eq!(decisions[..2], [Decision::Allowed, Decision::Allowed]);
        assert!(
            decisions[2..]
                .iter()
                .all(|d| matches!(d, Decision::Refused { .. })),
            "{decisions:?}"
        );
        assert_eq!(decisions.len(), 4);
        assert!(limiter.hit_all("k", l, 0).await.expect("hits").is_empty());
        // Refused hits were not counted: the window is full with three.
        assert_eq!(watched.held("k").await, 3);
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

    /// Hits queued together are decided in one script call: each key keeps
    /// its own limit, repeats of a key within a batch see each other, and
    /// every caller gets its own hit's answer.
    #[tokio::test]
    async fn hits_decided_together_keep_each_key_and_answer_each_caller() {
        let limiter = Arc::new(RedisLimiter::new(redis_connection().await, test_prefix()));
        let mut tasks = tokio::task::JoinSet::new();
        // Interleaved, so one batch holds every key several times.
        for round in 0..8 {
            for key in 0..40u32 {
                let limiter = Arc::clone(&limiter);
                // Key k allows k % 5 + 1 hits: an answer handed to the wrong
                // caller would change some key's count.
                let l = limit(key % 5 + 1, 10_000);
                tasks.spawn(async move {
                    let decision = limiter.hit(&format!("k{key}"), l).await.expect("hit");
                    (key, round, decision)
                });
            }
        }
        let mut allowed = [0u32; 40];
        for (key, round, decision) in tasks.join_all().await {
            match decision {
                Decision::Allowed => allowed[key as usize] += 1,
                Decision::Refused { retry_after } => {
                    assert!(
                        retry_after > Duration::from_secs(9)
                            && retry_after <= Duration::from_secs(10),
                        "key {key} round {round}: retry_after {retry_after:?}"
                    );
                }
            }
        }
        let expected: Vec<u32> = (0..40).map(|key| key % 5 + 1).collect();
        assert_eq!(allowed.to_vec(), expected);
    }

    /// Hits that left the window are dropped when the set fills, so a busy
    /// key's set never holds more than the limit, and old hits never count.
    #[tokio::test]
    async fn a_busy_key_holds_at_most_the_limit_window_after_window() {
        let mut watched = Watched::new().await;
        let l = limit(3, 300);
        for _ in 0..3 {
            for _ in 0..3 {
                let decision = watched.limiter.hit("k", l).await.expect("hit");
                assert_eq!(decision, Decision::Allowed);
            }
            refusal(&watched.limiter, "k", l).await;
            assert_eq!(watched.held("k").await, 3);
            tokio::time::sleep(Duration::from_millis(320)).await;
        }
    }

    /// A request that does not fit first drops the hits that left the
    /// window, then counts what the limit still allows and refuses the rest.
    #[tokio::test]
    async fn hits_made_together_count_what_the_window_frees() {
        let mut watched = Watched::new().await;
        let limiter = &watched.limiter;
        let l = limit(3, 300);
        assert!(
            limiter
                .hit_all("k", l, 2)
                .await
                .expect("hits")
                .iter()
                .all(|d| *d == Decision::Allowed)
        );
        tokio::time::sleep(Duration::from_millis(320)).await;
        assert_eq!(limiter.hit("k", l).await.expect("hit"), Decision::Allowed);
        // Three held, two of them out of the window: two of three fit.
        let decisions = limiter.hit_all("k", l, 3).await.expect("hits");
        assert_eq!(decisions[..2], [Decision::Allowed, Decision::Allowed]);
        match decisions[2] {
            // The oldest hit in the window is the one made after the sleep.
            Decision::Refused { retry_after } => assert!(
                retry_after <= Duration::from_millis(300),
                "retry_after {retry_after:?}"
            ),
            Decision::Allowed => panic!("a hit over the limit was allowed"),
        }
        assert_eq!(watched.held("k").await, 3);
    }

    /// However many hits one request makes, each counted one is a member
    /// of its own (the script adds them in chunks).
    #[tokio::test]
    async fn a_large_request_counts_each_hit_up_to_the_limit() {
        let mut watched = Watched::new().await;
        let l = limit(2_400, 10_000);
        let decisions = watched.limiter.hit_all("k", l, 2_500).await.expect("hits");
        let allowed = decisions
            .iter()
            .take_while(|d| **d == Decision::Allowed)
            .count();
        assert_eq!(allowed, 2_400);
        assert!(
            decisions[allowed..]
                .iter()
                .all(|d| matches!(d, Decision::Refused { .. }))
        );
        assert_eq!(watched.held("k").await, 2_400);
    }

    #[tokio::test]
    async fn idle_keys_expire_after_one_window() {
        let mut watched = Watched::new().await;
        let limiter = &watched.limiter;
        limiter.hit("k", limit(5, 2_000)).await.expect("hit");
        let set = watched.limiter.set_of("k");
        let pttl: i64 = watched.conn.pttl(set).await.expect("PTTL");
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
