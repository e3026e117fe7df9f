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
}

/// Hits the limit and turns a refusal into the contract's error. The
/// check's duration is recorded (`chat_rate_limit_check_seconds{kind}`):
/// with Redis it is a round trip on every send's path to its ack.
pub async fn enforce(limiter: &dyn Limiter, key: &str, limit: Limit) -> Result<(), ChatError> {
    // The key's first segment names the limit; only fixed values become
    // labels.
    let kind = match key.split(':').next() {
        Some("send") => "send",
        Some("conn") => "connect",
        Some("rest") => "rest",
        Some("typing") => "typing",
        _ => "other",
    };
    let started = std::time::Instant::now();
    let decision = limiter.hit(key, limit).await;
    metrics::histogram!("chat_rate_limit_check_seconds", "kind" => kind)
        .record(started.elapsed().as_secs_f64());
    match decision? {
        Decision::Allowed => Ok(()),
        Decision::Refused { retry_after } => {
            metrics::counter!("chat_rate_limited_total", "kind" => kind).increment(1);
            Err(ChatError::RateLimited { retry_after })
        }
    }
}
