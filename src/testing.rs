//! Helpers for unit tests that talk to a real Redis (never compiled into
//! the service). The Redis is `CHAT_TEST_REDIS_URL`, or the local default;
//! a missing Redis fails the test, it never skips it.

use std::time::Duration;

use deadpool_redis::{Config, Pool, Runtime};

pub fn redis_url() -> String {
    std::env::var("CHAT_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A pool on any URL (also unreachable ones, to test failures).
pub fn pool_at(url: &str) -> Pool {
    Config::from_url(url)
        .create_pool(Some(Runtime::Tokio1))
        .expect("a Redis pool configuration")
}

/// A pool on the test Redis, checked with a PING.
pub async fn redis_pool() -> Pool {
    let url = redis_url();
    let pool = pool_at(&url);
    let ping = async {
        let mut conn = pool.get().await.map_err(anyhow::Error::from)?;
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
    pool
}

/// A key prefix no other test uses, so tests run in parallel.
pub fn key_prefix() -> String {
    format!("test:{}:", uuid::Uuid::now_v7().simple())
}
