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
    let client = client(url)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_number_of_retries(RECONNECT_RETRIES);
    Ok(ConnectionManager::new_lazy_with_config(client, config)?)
}

/// A client for `url` whose TCP connections send each write at once.
///
/// The redis crate leaves Nagle's algorithm on, so on the shared connection
/// a command written while an earlier one is unacknowledged waited in the
/// kernel until Redis's reply to that one came back. Commands queued
/// together still leave in one write (the connection's writer gathers
/// them); what Nagle added was only the wait.
pub fn client(url: &str) -> redis::RedisResult<redis::Client> {
    use redis::IntoConnectionInfo;
    let info = url.into_connection_info()?;
    let tcp = info.tcp_settings().clone().set_nodelay(true);
    redis::Client::open(info.set_tcp_settings(tcp))
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, os::fd::BorrowedFd};

    use super::*;
    use crate::testing::{redis_connection, redis_url};

    /// Where Redis sees `conn` coming from: this process's end of it.
    async fn local_end(conn: &mut impl redis::aio::ConnectionLike) -> SocketAddr {
        let info: String = redis::cmd("CLIENT")
            .arg("INFO")
            .query_async(conn)
            .await
            .expect("CLIENT INFO");
        let addr = info
            .split(' ')
            .find_map(|field| field.strip_prefix("addr="))
            .expect("CLIENT INFO names the address");
        addr.parse().expect("an address")
    }

    /// Whether the socket of this process bound to `local` has Nagle's
    /// algorithm off; `None` if there is no such socket.
    fn nodelay_of(local: SocketAddr) -> Option<bool> {
        for entry in std::fs::read_dir("/proc/self/fd")
            .expect("the fd table")
            .flatten()
        {
            let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            // SAFETY: only read through for two getsockopt-like calls; if the
            // descriptor was closed meanwhile they fail, and if it was reused
            // they read another descriptor's options, which the address
            // comparison rules out.
            let fd = unsafe { BorrowedFd::borrow_raw(fd) };
            let socket = socket2::SockRef::from(&fd);
            if socket.local_addr().ok().and_then(|a| a.as_socket()) == Some(local) {
                return socket.tcp_nodelay().ok();
            }
        }
        None
    }

    #[tokio::test]
    async fn commands_and_subscriptions_go_out_without_nagles_delay() {
        let mut shared = redis_connection().await;
        let local = local_end(&mut shared).await;
        assert_eq!(nodelay_of(local), Some(true), "the shared connection");

        // The bus's Pub/Sub connection is made from the same client.
        let mut own = client(&redis_url())
            .expect("a client")
            .get_multiplexed_async_connection()
            .await
            .expect("a connection");
        let local = local_end(&mut own).await;
        assert_eq!(nodelay_of(local), Some(true), "a connection of `client`");
    }
}
