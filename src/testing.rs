//! Helpers for unit tests (never compiled into the service): values the
//! store tests build, and a real Redis or PostgreSQL. The services are
//! `CHAT_TEST_REDIS_URL` and `CHAT_TEST_DATABASE_URL`, or the local
//! defaults; a missing service fails the test, it never skips it.

use std::time::Duration;

use time::OffsetDateTime;

use crate::{
    domain::{ClientId, Message, Room, RoomId, RoomKind, User, UserId},
    redis_conn::{self, RedisConn},
    store::{NewMessage, Page, Store},
};

/// A message from `user` (named in capitals) to `room`, sent now.
pub fn new_message(room: &str, user: &str, body: &str, client_id: Option<&str>) -> NewMessage {
    NewMessage {
        room_id: RoomId::parse(room).unwrap(),
        id: uuid::Uuid::now_v7().to_string(),
        user: User {
            id: UserId::parse(user).unwrap(),
            name: user.to_uppercase(),
        },
        body: body.into(),
        client_id: client_id.map(|c| ClientId::parse(c).unwrap()),
        created_at: OffsetDateTime::now_utc(),
    }
}

/// A room's first messages (up to 100), oldest first, read as a client would.
pub async fn history_of(store: &dyn Store, room: &str) -> Vec<Message> {
    let page = Page::Oldest {
        after: 0,
        before: None,
    };
    store
        .history(&RoomId::parse(room).unwrap(), page, 100)
        .await
        .unwrap()
}

/// A public room named after its id, created now.
pub fn public_room(id: &str) -> Room {
    Room {
        id: RoomId::parse(id).unwrap(),
        kind: RoomKind::Public,
        name: id.into(),
        owner_id: None,
        created_at: OffsetDateTime::now_utc(),
    }
}

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

/// The URL of a "Redis" that accepts connections and never answers (a hung
/// server, a black-holed route); abort the task to close it.
pub async fn silent_redis() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (format!("redis://{address}"), silent)
}

/// A key prefix no other test uses, so tests run in parallel.
pub fn key_prefix() -> String {
    format!("test:{}:", uuid::Uuid::now_v7().simple())
}

/// The test PostgreSQL: a database where tests may create schemas.
pub fn database_url() -> String {
    std::env::var("CHAT_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A schema of its own in the test PostgreSQL, dropped with the value.
pub struct PgSchema {
    /// The test database's URL with `search_path` set to the schema.
    pub url: String,
    name: String,
}

impl PgSchema {
    pub async fn new() -> Self {
        use sqlx::Connection;
        let base = database_url();
        let name = format!("u_{}", uuid::Uuid::now_v7().simple());
        let mut conn = sqlx::PgConnection::connect(&base)
            .await
            .unwrap_or_else(|err| {
                panic!("these tests need PostgreSQL at {base} (set CHAT_TEST_DATABASE_URL): {err}")
            });
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {name}")))
            .execute(&mut conn)
            .await
            .expect("create schema");
        let separator = if base.contains('?') { '&' } else { '?' };
        Self {
            url: format!("{base}{separator}options=-c%20search_path%3D{name}"),
            name,
        }
    }
}

impl Drop for PgSchema {
    /// Best effort, on a thread of its own: the test's runtime may be gone.
    fn drop(&mut self) {
        let (base, name) = (database_url(), std::mem::take(&mut self.name));
        let _ = std::thread::spawn(move || {
            use sqlx::Connection;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let mut conn = sqlx::PgConnection::connect(&base).await?;
                sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {name} CASCADE")))
                    .execute(&mut conn)
                    .await?;
                anyhow::Ok(())
            })
        })
        .join();
    }
}
