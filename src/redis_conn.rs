//! The instance's one connection for Redis commands (Pub/Sub receiving has
//! its own, in `bus/redis.rs`).
//!
//! Every command-issuing part (limiter, cache, presence, bus publishing)
//! shares one multiplexed connection: commands from concurrent tasks are
//! written back to back on one socket and their replies matched in order,
//! so under load many sends' commands leave in one write. A pool would add
//! nothing to that; deadpool-redis, which the project used first, also
//! spends a round trip (`UNWATCH` + `PING`) on every checkout, which doubled
//! the Redis round trips of a send (measured with `redis-cli monitor`, see
//! docs/benchmarks.md). Nothing here uses `WATCH` or blocking commands,
//! which a shared connection would not allow; `MULTI`/`EXEC` goes out as one
//! pipeline and is safe.
//!
//! The connection is made on first use and remade after it breaks. Callers
//! bound each exchange with their own timeout, so a Redis that is down or
//! hung costs them at most that bound.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// A cheap handle on the shared connection: clone it freely.
pub type RedisConn = ConnectionManager;

/// A connection attempt gives up after this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Backstop for a reply that never comes; callers' own bounds are shorter.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Retries within one reconnection: none. While Redis is down, a command
/// fails as soon as the connection attempt does (at once when Redis refuses
/// connections), so its caller falls back at once — the limiter to its
/// in-process window, the cache to the database — instead of waiting out
/// its bound behind a back-off; the next command tries again. Concurrent
/// commands share one attempt, and the limiter and the cache stop asking
/// for a second after a failure, so an outage costs few attempts.
const RECONNECT_RETRIES: usize = 0;

/// Lazily connected: an instance starts even while Redis is down.
pub fn connect(url: &str) -> anyhow::Result<RedisConn> {
    let client = redis::Client::open(url)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_number_of_retries(RECONNECT_RETRIES);
    Ok(ConnectionManager::new_lazy_with_config(client, config)?)
}
