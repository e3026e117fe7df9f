//! The embedded store: one SQLite file, WAL mode, `synchronous = FULL` so an
//! acknowledged message survives a power cut.
//!
//! SQLite allows one writer at a time. Rather than let concurrent writers
//! collide and retry on `SQLITE_BUSY`, writes go through a pool of exactly
//! one connection, so they queue in FIFO order inside the process; reads use
//! their own pool and never wait for writes (WAL).

use std::{str::FromStr, sync::Arc, time::Duration};

use async_trait::async_trait;
use sqlx::{
    Row,
    sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
    },
};
use time::OffsetDateTime;

use super::{
    Appended, Member, NewMessage, Page, Store,
    group::{AppendBatch, GroupCommit},
    rows, seq_bound, to_millis,
};
use crate::{
    domain::{Message, Room, RoomId, User, UserId},
    error::ChatError,
};

pub struct SqliteStore {
    reader: SqlitePool,
    writer: SqlitePool,
    appends: GroupCommit,
}

/// The most messages one append transaction (one fsync) takes.
const MAX_BATCH: usize = 512;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

const MESSAGE_COLUMNS_BY_ROOM_AND_SEQ: &str = "SELECT room_id, seq, id, user_id, user_name, body, client_id, created_at, deleted_at \
     FROM messages WHERE room_id = ? AND seq = ?";

impl SqliteStore {
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.clone())
            .await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        // One committer: there is one writer connection anyway.
        let appends = GroupCommit::start(
            Arc::new(Appender {
                writer: writer.clone(),
            }),
            1,
            MAX_BATCH,
        );
        Ok(Self {
            reader,
            writer,
            appends,
        })
    }

    async fn message_by_seq(&self, room: &RoomId, seq: i64) -> Result<Message, ChatError> {
        let row = sqlx::query(MESSAGE_COLUMNS_BY_ROOM_AND_SEQ)
            .bind(room.as_str())
            .bind(seq)
            .fetch_one(&self.writer)
            .await?;
        rows::message(&row)
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn migrate(&self) -> Result<(), ChatError> {
        MIGRATOR.run(&self.writer).await?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), ChatError> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }

    async fn room(&self, id: &RoomId) -> Result<Option<Room>, ChatError> {
        sqlx::query("SELECT id, kind, name, owner_id, created_at FROM rooms WHERE id = ?")
            .bind(id.as_str())
            .fetch_optional(&self.reader)
            .await?
            .map(|row| rows::room(&row))
            .transpose()
    }

    async fn create_room(&self, room: &Room, members: &[UserId]) -> Result<(), ChatError> {
        let mut tx = self.writer.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO rooms (id, kind, name, owner_id, created_at) VALUES (?, ?, ?, ?, ?) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(room.id.as_str())
        .bind(room.kind.as_str())
        .bind(&room.name)
        .bind(room.owner_id.as_ref().map(UserId::as_str))
        .bind(to_millis(room.created_at))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Err(ChatError::Conflict(format!("room id {} is taken", room.id)));
        }
        for member in members {
            sqlx::query(
                "INSERT INTO room_members (room_id, user_id, added_at) VALUES (?, ?, ?) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(room.id.as_str())
            .bind(member.as_str())
            .bind(to_millis(room.created_at))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn ensure_direct_room(
        &self,
        room: &Room,
        a: &UserId,
        b: &UserId,
    ) -> Result<(Room, bool), ChatError> {
        if let Some(existing) = self.room(&room.id).await? {
            return Ok((existing, false));
        }
        match self.create_room(room, &[a.clone(), b.clone()]).await {
            Ok(()) => Ok((room.clone(), true)),
            // Created by a concurrent request in between: use that one.
            Err(ChatError::Conflict(_)) => Ok((
                self.room(&room.id)
                    .await?
                    .ok_or_else(|| ChatError::Internal(anyhow::anyhow!("direct room vanished")))?,
                false,
            )),
            Err(other) => Err(other),
        }
    }

    async fn rooms_for(&self, user: &UserId) -> Result<Vec<Room>, ChatError> {
        sqlx::query(
            "SELECT id, kind, name, owner_id, created_at FROM rooms \
             WHERE kind IN ('global', 'public') \
                OR id IN (SELECT room_id FROM room_members WHERE user_id = ?) \
             ORDER BY created_at, id",
        )
        .bind(user.as_str())
        .fetch_all(&self.reader)
        .await?
        .iter()
        .map(rows::room)
        .collect()
    }

    async fn is_member(&self, room: &RoomId, user: &UserId) -> Result<bool, ChatError> {
        let row = sqlx::query("SELECT 1 FROM room_members WHERE room_id = ? AND user_id = ?")
            .bind(room.as_str())
            .bind(user.as_str())
            .fetch_optional(&self.reader)
            .await?;
        Ok(row.is_some())
    }

    async fn members(&self, room: &RoomId) -> Result<Vec<Member>, ChatError> {
        sqlx::query(
            "SELECT m.user_id, u.name FROM room_members m LEFT JOIN users u ON u.id = m.user_id \
             WHERE m.room_id = ? ORDER BY m.added_at, m.user_id",
        )
        .bind(room.as_str())
        .fetch_all(&self.reader)
        .await?
        .iter()
        .map(rows::member)
        .collect()
    }

    async fn add_member(&self, room: &RoomId, user: &UserId) -> Result<(), ChatError> {
        sqlx::query(
            "INSERT INTO room_members (room_id, user_id, added_at) VALUES (?, ?, ?) \
             ON CONFLICT DO NOTHING",
        )
        .bind(room.as_str())
        .bind(user.as_str())
        .bind(to_millis(OffsetDateTime::now_utc()))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn remove_member(&self, room: &RoomId, user: &UserId) -> Result<bool, ChatError> {
        let done = sqlx::query("DELETE FROM room_members WHERE room_id = ? AND user_id = ?")
            .bind(room.as_str())
            .bind(user.as_str())
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn remember_user(&self, user: &User) -> Result<(), ChatError> {
        sqlx::query(
            "INSERT INTO users (id, name, updated_at) VALUES (?, ?, ?) \
             ON CONFLICT (id) DO UPDATE SET name = excluded.name, updated_at = excluded.updated_at \
             WHERE users.name <> excluded.name",
        )
        .bind(user.id.as_str())
        .bind(&user.name)
        .bind(to_millis(OffsetDateTime::now_utc()))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn append(&self, message: NewMessage) -> Result<Appended, ChatError> {
        self.appends.append(message).await
    }

    async fn last_seq(&self, room: &RoomId) -> Result<u64, ChatError> {
        let row = sqlx::query("SELECT last_seq FROM rooms WHERE id = ?")
            .bind(room.as_str())
            .fetch_optional(&self.reader)
            .await?
            .ok_or_else(ChatError::room_not_found)?;
        Ok(row.try_get::<i64, _>(0)? as u64)
    }

    async fn history(
        &self,
        room: &RoomId,
        page: Page,
        limit: u32,
    ) -> Result<Vec<Message>, ChatError> {
        let query = match page {
            Page::Newest { before } => sqlx::query(
                "SELECT room_id, seq, id, user_id, user_name, body, client_id, created_at, deleted_at \
                 FROM messages WHERE room_id = ? AND seq > ? AND seq < ? ORDER BY seq DESC LIMIT ?",
            )
            .bind(room.as_str())
            .bind(0i64)
            .bind(before.map_or(i64::MAX, seq_bound)),
            Page::Oldest { after, before } => sqlx::query(
                "SELECT room_id, seq, id, user_id, user_name, body, client_id, created_at, deleted_at \
                 FROM messages WHERE room_id = ? AND seq > ? AND seq < ? ORDER BY seq ASC LIMIT ?",
            )
            .bind(room.as_str())
            .bind(seq_bound(after))
            .bind(before.map_or(i64::MAX, seq_bound)),
        };
        query
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await?
            .iter()
            .map(rows::message)
            .collect()
    }

    async fn delete_message(
        &self,
        room: &RoomId,
        id: &str,
    ) -> Result<Option<(Message, bool)>, ChatError> {
        let mut tx = self.writer.begin().await?;
        let Some(row) =
            sqlx::query("SELECT seq, deleted_at FROM messages WHERE room_id = ? AND id = ?")
                .bind(room.as_str())
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?
        else {
            return Ok(None);
        };
        let seq: i64 = row.try_get(0)?;
        let already: Option<i64> = row.try_get(1)?;
        if already.is_none() {
            sqlx::query(
                "UPDATE messages SET body = '', deleted_at = ? WHERE room_id = ? AND seq = ?",
            )
            .bind(to_millis(OffsetDateTime::now_utc()))
            .bind(room.as_str())
            .bind(seq)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(Some((
            self.message_by_seq(room, seq).await?,
            already.is_none(),
        )))
    }

    async fn message(&self, room: &RoomId, id: &str) -> Result<Option<Message>, ChatError> {
        sqlx::query(
            "SELECT room_id, seq, id, user_id, user_name, body, client_id, created_at, deleted_at \
             FROM messages WHERE room_id = ? AND id = ?",
        )
        .bind(room.as_str())
        .bind(id)
        .fetch_optional(&self.reader)
        .await?
        .map(|row| rows::message(&row))
        .transpose()
    }
}

/// Appends batches for [`GroupCommit`]: one transaction, so one fsync for
/// the whole batch.
struct Appender {
    writer: SqlitePool,
}

#[async_trait]
impl AppendBatch for Appender {
    async fn append_batch(
        &self,
        batch: &[NewMessage],
    ) -> Result<Vec<Result<Appended, ChatError>>, ChatError> {
        // One writer connection: nothing interleaves with this transaction,
        // and its own earlier inserts answer the duplicate checks of later
        // messages in the batch.
        let mut tx = self.writer.begin().await?;
        let mut results = Vec::with_capacity(batch.len());
        for message in batch {
            if let Some(client_id) = &message.client_id {
                let original = sqlx::query(
                    "SELECT room_id, seq, id, user_id, user_name, body, client_id, created_at, deleted_at \
                     FROM messages WHERE room_id = ? AND user_id = ? AND client_id = ?",
                )
                .bind(message.room_id.as_str())
                .bind(message.user.id.as_str())
                .bind(client_id.as_str())
                .fetch_optional(&mut *tx)
                .await?;
                if let Some(row) = original {
                    results.push(Ok(Appended::Duplicate(rows::message(&row)?)));
                    continue;
                }
            }
            let Some(row) = sqlx::query(
                "UPDATE rooms SET last_seq = last_seq + 1 WHERE id = ? RETURNING last_seq",
            )
            .bind(message.room_id.as_str())
            .fetch_optional(&mut *tx)
            .await?
            else {
                results.push(Err(ChatError::room_not_found()));
                continue;
            };
            let seq: i64 = row.try_get(0)?;
            sqlx::query(
                "INSERT INTO messages (room_id, seq, id, user_id, user_name, body, client_id, created_at) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(message.room_id.as_str())
            .bind(seq)
            .bind(&message.id)
            .bind(message.user.id.as_str())
            .bind(&message.user.name)
            .bind(&message.body)
            .bind(message.client_id.as_ref().map(|c| c.as_str()))
            .bind(to_millis(message.created_at))
            .execute(&mut *tx)
            .await?;
            results.push(Ok(Appended::Stored(message.stored(seq as u64))));
        }
        tx.commit().await?;
        Ok(results)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        store::Page,
        testing::{new_message, public_room},
    };

    fn seq_of(result: &Result<Appended, ChatError>) -> (bool, u64, &str) {
        match result {
            Ok(Appended::Stored(m)) => (false, m.seq, m.body.as_str()),
            Ok(Appended::Duplicate(m)) => (true, m.seq, m.body.as_str()),
            Err(err) => panic!("expected a message, got {err:?}"),
        }
    }

    /// The same batch as the PostgreSQL store's test: rooms mixed, a retry
    /// within the batch, an unknown room, keyless sends, another user's
    /// same key; then a batch retrying a committed send.
    #[tokio::test]
    async fn a_batch_numbers_each_room_in_order_and_answers_repeats_and_unknown_rooms() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("chat.db").display());
        let store = SqliteStore::connect(&url).await.unwrap();
        store.migrate().await.unwrap();
        for id in ["r1", "r2"] {
            store.create_room(&public_room(id), &[]).await.unwrap();
        }
        let appender = Appender {
            writer: store.writer.clone(),
        };

        let batch = [
            new_message("r1", "ann", "first", Some("k1")),
            new_message("r2", "ann", "elsewhere", None),
            new_message("r1", "ann", "first again", Some("k1")),
            new_message("nowhere", "ann", "lost", Some("k2")),
            new_message("r1", "bob", "second", Some("k1")),
            new_message("r1", "ann", "third", None),
            new_message("nowhere", "ann", "lost too", None),
        ];
        let results = appender.append_batch(&batch).await.unwrap();
        assert_eq!(seq_of(&results[0]), (false, 1, "first"));
        assert_eq!(seq_of(&results[1]), (false, 1, "elsewhere"));
        assert_eq!(seq_of(&results[2]), (true, 1, "first"));
        assert!(matches!(results[3], Err(ChatError::NotFound(_))));
        // Another user's k1 is another key.
        assert_eq!(seq_of(&results[4]), (false, 2, "second"));
        assert_eq!(seq_of(&results[5]), (false, 3, "third"));
        assert!(matches!(results[6], Err(ChatError::NotFound(_))));

        let retry = [
            new_message("r1", "ann", "first, retried", Some("k1")),
            new_message("r1", "ann", "fourth", Some("k4")),
        ];
        let results = appender.append_batch(&retry).await.unwrap();
        assert_eq!(seq_of(&results[0]), (true, 1, "first"));
        assert_eq!(seq_of(&results[1]), (false, 4, "fourth"));

        let r1 = RoomId::parse("r1").unwrap();
        assert_eq!(store.last_seq(&r1).await.unwrap(), 4);
        let bodies: Vec<String> = store
            .history(
                &r1,
                Page::Oldest {
                    after: 0,
                    before: None,
                },
                10,
            )
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.body)
            .collect();
        assert_eq!(bodies, ["first", "second", "third", "fourth"]);
        let r2 = RoomId::parse("r2").unwrap();
        assert_eq!(store.last_seq(&r2).await.unwrap(), 1);
    }
}
