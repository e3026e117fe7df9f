//! The embedded store: one SQLite file, WAL mode, `synchronous = FULL` so an
//! acknowledged message survives a power cut.
//!
//! SQLite allows one writer at a time. Rather than let concurrent writers
//! collide and retry on `SQLITE_BUSY`, writes go through a pool of exactly
//! one connection, so they queue in FIFO order inside the process; reads use
//! their own pool and never wait for writes (WAL).

use std::{collections::HashMap, str::FromStr, sync::Arc, time::Duration};

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
    group::{AppendBatch, Distinct, GroupCommit, Outcome, outcome_at},
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

/// WAL pages (4 KiB each) after which a commit copies the log back into the
/// database file. SQLite's default, 1,000, is about one full append batch
/// here (a message dirties a page or two of its room and its indexes), so
/// nearly every batch paid for a checkpoint, copying again pages the batch
/// before had just copied. At 10,000 the copies coalesce (measured in
/// docs/benchmarks.md); the log then grows to about 40 MiB between
/// checkpoints. Durability is unchanged: a commit is on disk once the log
/// is synced.
const CHECKPOINT_PAGES: &str = "10000";

/// The writer's page cache, in KiB (SQLite's default is 2,000). Messages
/// spread over many rooms touch a page of each room's newest rows and of
/// the retry index per message; with the default cache most of those pages
/// were read back from the OS on each batch (3 to 8 reads per message in
/// the ingest benchmark, about 1 with this). Filled only as the file grows.
const WRITER_CACHE_KIB: &str = "-65536";

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
            .connect_with(
                options
                    .clone()
                    .pragma("wal_autocheckpoint", CHECKPOINT_PAGES)
                    .pragma("cache_size", WRITER_CACHE_KIB),
            )
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

    async fn append_all(&self, messages: Vec<NewMessage>) -> Vec<Result<Appended, ChatError>> {
        self.appends.append_all(messages).await
    }

    async fn last_seq(&self, room: &RoomId) -> Result<u64, ChatError> {
        let row = sqlx::query("SELECT last_seq FROM rooms WHERE id = ?")
            .bind(room.as_str())
            .fetch_optional(&self.reader)
            .await?
            .ok_or_else(ChatError::room_not_found)?;
        Ok(row.try_get::<i64, _>(0)? as u64)
    }

    async fn last_seqs(&self, rooms: &[RoomId]) -> Result<Vec<Option<u64>>, ChatError> {
        let ids: Vec<&str> = rooms.iter().map(RoomId::as_str).collect();
        let rows = sqlx::query_as(
            "SELECT id, last_seq FROM rooms WHERE id IN (SELECT value FROM json_each(?))",
        )
        .bind(serde_json::to_string(&ids).expect("ids serialise"))
        .fetch_all(&self.reader)
        .await?;
        Ok(super::rows::in_order_asked(rooms, rows))
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
    /// A fixed number of statements whatever the batch size: each crosses
    /// to the connection's worker thread and back, and per message those
    /// crossings (not SQLite) were most of the writer's time. The batch
    /// goes in as JSON, read with `json_each`: one statement text,
    /// prepared once, for any batch. One writer connection, so nothing
    /// interleaves with this transaction. Repeats of a key within the
    /// batch never reach it: each is answered from its first occurrence.
    async fn append_batch(
        &self,
        batch: &[NewMessage],
    ) -> Result<Vec<Result<Appended, ChatError>>, ChatError> {
        let distinct = Distinct::of(batch);
        let sent = &distinct.messages;
        let mut outcomes = distinct.unanswered();
        let mut tx = self.writer.begin().await?;

        // Retries of committed sends, answered with the original. Every
        // element is listed, so a row's `j.key` is its index in `sent`; a
        // keyless one (a null client id) matches nothing.
        if sent.iter().any(|m| m.client_id.is_some()) {
            let keys: Vec<_> = sent
                .iter()
                .map(|m| {
                    let client_id = m.client_id.as_ref().map(|c| c.as_str());
                    (m.room_id.as_str(), m.user.id.as_str(), client_id)
                })
                .collect();
            let originals = sqlx::query(
                "SELECT j.key AS ord, m.room_id, m.seq, m.id, m.user_id, m.user_name, m.body, \
                        m.client_id, m.created_at, m.deleted_at \
                 FROM json_each(?) AS j JOIN messages AS m \
                   ON m.room_id = j.value ->> 0 AND m.user_id = j.value ->> 1 \
                  AND m.client_id = j.value ->> 2",
            )
            .bind(to_json(&keys))
            .fetch_all(&mut *tx)
            .await?;
            for row in &originals {
                let ord: i64 = row.try_get("ord")?;
                *outcome_at(&mut outcomes, ord)? = Outcome::Duplicate(rows::message(row)?);
            }
        }

        // Each room advances once by the messages it takes.
        let mut taken: HashMap<&str, i64> = HashMap::new();
        for (message, outcome) in sent.iter().zip(&outcomes) {
            if matches!(outcome, Outcome::NoRoom) {
                *taken.entry(message.room_id.as_str()).or_default() += 1;
            }
        }
        if !taken.is_empty() {
            // `taken` goes in as a JSON object: room id → count.
            let advanced = sqlx::query(
                "UPDATE rooms SET last_seq = last_seq + j.value \
                 FROM json_each(?) AS j WHERE rooms.id = j.key \
                 RETURNING id, last_seq",
            )
            .bind(to_json(&taken))
            .fetch_all(&mut *tx)
            .await?;
            // The next seq of each room that exists (an unknown room
            // returns no row, and its messages stay NoRoom).
            let mut next: HashMap<&str, i64> = HashMap::with_capacity(advanced.len());
            for row in &advanced {
                let id: &str = row.try_get("id")?;
                let last_seq: i64 = row.try_get("last_seq")?;
                let (&room, &count) = taken.get_key_value(id).ok_or_else(|| {
                    ChatError::Internal(anyhow::anyhow!("advanced a room not asked for"))
                })?;
                next.insert(room, last_seq - count + 1);
            }
            let mut inserts = Vec::with_capacity(sent.len());
            for (message, outcome) in sent.iter().zip(outcomes.iter_mut()) {
                let Outcome::NoRoom = outcome else { continue };
                let Some(seq) = next.get_mut(message.room_id.as_str()) else {
                    continue;
                };
                *outcome = Outcome::Stored(*seq as u64);
                inserts.push((
                    message.room_id.as_str(),
                    *seq,
                    message.id.as_str(),
                    message.user.id.as_str(),
                    message.user.name.as_str(),
                    message.body.as_str(),
                    message.client_id.as_ref().map(|c| c.as_str()),
                    to_millis(message.created_at),
                ));
                *seq += 1;
            }
            sqlx::query(
                "INSERT INTO messages \
                   (room_id, seq, id, user_id, user_name, body, client_id, created_at) \
                 SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, \
                        value ->> 5, value ->> 6, value ->> 7 \
                 FROM json_each(?)",
            )
            .bind(to_json(&inserts))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(distinct.answer(&outcomes))
    }
}

/// Strings, integers and nulls, in arrays or a map keyed by strings: their
/// JSON text cannot fail to be written.
fn to_json(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).expect("strings and integers serialize")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{history_of, new_message, public_room};

    fn seq_of(result: &Result<Appended, ChatError>) -> (bool, u64, &str) {
        match result {
            Ok(Appended::Stored(m)) => (false, m.seq, m.body.as_str()),
            Ok(Appended::Duplicate(m)) => (true, m.seq, m.body.as_str()),
            Err(err) => panic!("expected a message, got {err:?}"),
        }
    }

    /// A migrated store in a temporary directory (kept while the first
    /// element lives), with public `rooms`, and its batch appender.
    async fn store_with_rooms(rooms: &[&str]) -> (tempfile::TempDir, SqliteStore, Appender) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("chat.db").display());
        let store = SqliteStore::connect(&url).await.unwrap();
        store.migrate().await.unwrap();
        for id in rooms {
            store.create_room(&public_room(id), &[]).await.unwrap();
        }
        let appender = Appender {
            writer: store.writer.clone(),
        };
        (dir, store, appender)
    }

    /// The same batch as the PostgreSQL store's test: rooms mixed, a retry
    /// within the batch, an unknown room, keyless sends, another user's
    /// same key; then a batch retrying a committed send.
    #[tokio::test]
    async fn a_batch_numbers_each_room_in_order_and_answers_repeats_and_unknown_rooms() {
        let (_dir, store, appender) = store_with_rooms(&["r1", "r2"]).await;

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
        let bodies: Vec<String> = history_of(&store, "r1")
            .await
            .into_iter()
            .map(|m| m.body)
            .collect();
        assert_eq!(bodies, ["first", "second", "third", "fourth"]);
        let r2 = RoomId::parse("r2").unwrap();
        assert_eq!(store.last_seq(&r2).await.unwrap(), 1);
        let unknown = RoomId::parse("no-such-room").unwrap();
        let asked = [r2, unknown, r1];
        assert_eq!(
            store.last_seqs(&asked).await.unwrap(),
            [Some(1), None, Some(4)]
        );
    }

    /// A batch travels to SQLite as JSON: text JSON must escape comes back
    /// exactly as sent, in every column.
    #[tokio::test]
    async fn text_that_json_escapes_is_stored_as_sent() {
        let (_dir, store, appender) = store_with_rooms(&["r1"]).await;
        let mut quoted = new_message(
            "r1",
            "ann",
            "say \"hi\" \\ back\n\tslash / é 漢字 🦀",
            Some("k\"1\\"),
        );
        quoted.user.name = "Ann \"the\" \\ 🦀".into();
        let batch = [quoted, new_message("r1", "bob", "{\"json\": [1, 2]}", None)];
        let results = appender.append_batch(&batch).await.unwrap();
        assert_eq!(seq_of(&results[0]), (false, 1, batch[0].body.as_str()));
        assert_eq!(seq_of(&results[1]), (false, 2, batch[1].body.as_str()));

        let history = history_of(&store, "r1").await;
        assert_eq!(history.len(), 2);
        for (sent, stored) in batch.iter().zip(&history) {
            assert_eq!(stored.id, sent.id);
            assert_eq!(stored.user, sent.user);
            assert_eq!(stored.body, sent.body);
            assert_eq!(stored.client_id, sent.client_id);
            assert_eq!(
                stored.created_at.unix_timestamp_nanos() / 1_000_000,
                sent.created_at.unix_timestamp_nanos() / 1_000_000
            );
        }
        // The retry is found by its escaped key.
        let retry = [new_message("r1", "ann", "again", Some("k\"1\\"))];
        let results = appender.append_batch(&retry).await.unwrap();
        assert_eq!(seq_of(&results[0]), (true, 1, batch[0].body.as_str()));
    }
}
