//! Exact sliding windows in one process: the times of the counted hits of
//! each key, oldest first. Memory is bounded by the limits themselves (at
//! most `limit` instants per key), and idle keys are swept.

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
    time::Duration,
};

use async_trait::async_trait;
use tokio::time::Instant;

use super::{Decision, Limit, Limiter};
use crate::error::ChatError;

/// How many hits between sweeps of keys whose windows are empty.
const SWEEP_EVERY: u64 = 4096;

#[derive(Debug, Default)]
pub struct MemoryLimiter {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    keys: HashMap<String, Window>,
    hits_since_sweep: u64,
}

#[derive(Debug)]
struct Window {
    hits: VecDeque<Instant>,
    length: Duration,
}

impl Window {
    fn expire(&mut self, now: Instant) {
        while self
            .hits
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.length)
        {
            self.hits.pop_front();
        }
    }
}

impl MemoryLimiter {
    /// The decision itself, synchronous (also used as the fallback of other
    /// limiters).
    pub fn hit_now(&self, key: &str, limit: Limit) -> Decision {
        let now = Instant::now();
        let mut state = self.state.lock().expect("limiter lock");
        state.hits_since_sweep += 1;
        if state.hits_since_sweep >= SWEEP_EVERY {
            state.hits_since_sweep = 0;
            state.keys.retain(|_, w| {
                w.expire(now);
                !w.hits.is_empty()
            });
        }
        let window = state.keys.entry(key.to_owned()).or_insert_with(|| Window {
            hits: VecDeque::new(),
            length: limit.window,
        });
        window.length = limit.window;
        window.expire(now);
        if window.hits.len() < limit.limit as usize {
            window.hits.push_back(now);
            return Decision::Allowed;
        }
        let oldest = window.hits.front().copied().unwrap_or(now);
        let retry_after = limit.window.saturating_sub(now.duration_since(oldest));
        Decision::Refused {
            retry_after: retry_after.max(Duration::from_millis(1)),
        }
    }
}

#[async_trait]
impl Limiter for MemoryLimiter {
    async fn hit(&self, key: &str, limit: Limit) -> Result<Decision, ChatError> {
        Ok(self.hit_now(key, limit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn window_slides() {
        let limiter = MemoryLimiter::default();
        let limit = Limit {
            limit: 2,
            window: Duration::from_secs(10),
        };
        assert_eq!(limiter.hit_now("k", limit), Decision::Allowed);
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(limiter.hit_now("k", limit), Decision::Allowed);
        assert_eq!(
            limiter.hit_now("k", limit),
            Decision::Refused {
                retry_after: Duration::from_secs(6)
            }
        );
        assert_eq!(limiter.hit_now("other", limit), Decision::Allowed);
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(limiter.hit_now("k", limit), Decision::Allowed);
        assert!(matches!(
            limiter.hit_now("k", limit),
            Decision::Refused { .. }
        ));
    }
}
