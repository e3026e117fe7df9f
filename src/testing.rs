//! Helpers for unit tests that talk to a real Redis (never compiled into
//! the service). The Redis is `CHAT_TEST_REDIS_URL`, or the local default;
//! a missing Redis fails the test, it never skips it.

use std::time::Duration;

use crate::redis_conn::{self, RedisConn};

pub fn redis_url() -> String {
    std::env::var("CHAT_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A connection on any URL (also unreachable ones, to test failures).
pub fn redis_at(url: &str) -> RedisConn {
    redis_conn::connect(url).expect("a Redis URL")
}

/// A connection to the test Redis, checked with a PING.
pub async fn redis_connection() -> RedisConn {
    let url = redis_url();
    let mut conn = redis_at(&url);
    let ping = async {
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map_err(anyhow::Error::from)
    };
    match tokio::time::timeout(Duration::from_secs(5), ping).await {
        Ok(Ok(pong)) => assert_eq!(pong, "PONG"),
        Ok(Err(err)) => {
            panic!("these tests need Redis at {url} (set CHAT_TEST_REDIS_URL): {err:#}")
        }
        Err(_) => {
            panic!("these tests need Redis at {url} (set CHAT_TEST_REDIS_URL): no answer in 5 s")
        }
    }
    conn
}

/// A key prefix no other test uses, so tests run in parallel.
pub fn key_prefix() -> String {
    format!("test:{}:", uuid::Uuid::now_v7().simple())
}
