//! Sliding-window rate limits.
//!
//! A key (e.g. `send:<user>`) may be hit at most `limit` times in any window
//! of length `window`. A refused hit is not counted and says how long until
//! the oldest counted hit leaves the window. Implementations: [`memory`]
//! (one process) and [`redis`] (shared by every instance, failing open to
//! per-instance windows).

pub mod memory;
pub mod redis;

use std::time::Duration;

use async_trait::async_trait;

use crate::error::ChatError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    Refused { retry_after: Duration },
}

/// A limit: at most `limit` hits per `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub limit: u32,
    pub window: Duration,
}

#[async_trait]
pub trait Limiter: Send + Sync + 'static {
    /// Counts a hit on `key` if the limit allows it.
    async fn hit(&self, key: &str, limit: Limit) -> Result<Decision, ChatError>;

    /// `count` hits on `key`, decided in order, each seeing the ones before
    /// it: what `count` calls of [`hit`](Self::hit) one after the other
    /// decide, in as few round trips as the limiter can.
    async fn hit_all(
        &self,
        key: &str,
        limit: Limit,
        count: usize,
    ) -> Result<Vec<Decision>, ChatError> {
        let mut decisions = Vec::with_capacity(count);
        for _ in 0..count {
            decisions.push(self.hit(key, limit).await?);
        }
        Ok(decisions)
    }
}

/// Hits the limit and turns a refusal into the contract's error. The
/// check's duration is recorded (`chat_rate_limit_check_seconds{kind}`):
/// with Redis it is a round trip on every send's path to its ack.
pub async fn enforce(limiter: &dyn Limiter, key: &str, limit: Limit) -> Result<(), ChatError> {
    let kind = kind_of(key);
    let started = std::time::Instant::now();
    let decision = limiter.hit(key, limit).await;
    checked(kind, started, 1);
    decided(kind, decision?)
}

/// [`enforce`] for `count` hits on one key, decided in order (a
/// connection's sends that arrived together); one result per hit, and one
/// recorded check per hit.
pub async fn enforce_all(
    limiter: &dyn Limiter,
    key: &str,
    limit: Limit,
    count: usize,
) -> Vec<Result<(), ChatError>> {
    let kind = kind_of(key);
    let started = std::time::Instant::now();
    let decisions = limiter.hit_all(key, limit, count).await;
    checked(kind, started, count);
    match decisions {
        Ok(decisions) => decisions
            .into_iter()
            .map(|decision| decided(kind, decision))
            .collect(),
        Err(err) => err.for_each(count),
    }
}

/// The limit a key counts against, as a metrics label: the key's first
/// segment (only fixed values become labels).
fn kind_of(key: &str) -> &'static str {
    match key.split(':').next() {
        Some("send") => "send",
        Some("conn") => "connect",
        Some("rest") => "rest",
        Some("typing") => "typing",
        _ => "other",
    }
}

/// Records `count` checks that took from `started` until now (one
/// registry lookup, however many hits a call decided).
fn checked(kind: &'static str, started: std::time::Instant, count: usize) {
    let took = started.elapsed().as_secs_f64();
    // Sends are checked once per message: their handle is registered once.
    let looked_up;
    let histogram = if kind == "send" {
        &crate::telemetry::per_message().send_check_seconds
    } else {
        looked_up = metrics::histogram!("chat_rate_limit_check_seconds", "kind" => kind);
        &looked_up
    };
    histogram.record_many(took, count);
}

fn decided(kind: &'static str, decision: Decision) -> Result<(), ChatError> {
    match decision {
        Decision::Allowed => Ok(()),
        Decision::Refused { retry_after } => {
            metrics::counter!("chat_rate_limited_total", "kind" => kind).increment(1);
            Err(ChatError::RateLimited { retry_after })
        }
    }
}
