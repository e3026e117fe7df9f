//! The cluster store: PostgreSQL, shared by every pod.
//!
//! Seqs are allocated by `UPDATE rooms SET last_seq = last_seq + 1 … RETURNING`
//! inside the appending transaction: the row lock serialises writers of one
//! room (on any pod) while writers of different rooms proceed in parallel,
//! and a rollback gives the seq back, so there are never gaps.

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_trait::async_trait;
use sqlx::{
    Row,
    postgres::{PgPool, PgPoolOptions},
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

pub struct PostgresStore {
    pool: PgPool,
    appends: GroupCommit,
}

/// Transactions appending at once (each holds a pooled connection while it
/// commits), and the most messages one of them takes.
const COMMITTERS: usize = 4;
const MAX_BATCH: usize = 512;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

const MESSAGE_COLUMNS_BY_ROOM_AND_SEQ: &str = "SELECT room_id, seq, id, user_id, user_name, body, client_id, created_at, deleted_at \
     FROM messages WHERE room_id = $1 AND seq = $2";

impl PostgresStore {
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        // Connect lazily: a pod starts (and reports not ready) while the
        // database is still coming up, instead of crashing in a loop.
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(5))
            // Generic plans for every prepared statement. With custom plans
            // the planner sees a batch's array sizes and, once a batch
            // names a few dozen rooms of a small `rooms` table, chose
            // sequential scans of it (for the row locks and the last_seq
            // update) — most of PostgreSQL's time under ingest. The generic
            // plans are the index plans, and skip planning per execution.
            .after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::Executor::execute(&mut *conn, "SET plan_cache_mode = force_generic_plan")
                        .await?;
                    Ok(())
                })
            })
            .connect_lazy(url)?;
        let appends = GroupCommit::start(
            Arc::new(Appender { pool: pool.clone() }),
            COMMITTERS,
            MAX_BATCH,
        );
        Ok(Self { pool, appends })
    }

    async fn message_by_seq(&self, room: &RoomId, seq: i64) -> Result<Message, ChatError> {
        let row = sqlx::query(MESSAGE_COLUMNS_BY_ROOM_AND_SEQ)
            .bind(room.as_str())
            .bind(seq)
            .fetch_one(&self.pool)
            .await?;
        rows::message(&row)
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn migrate(&self) -> Result<(), ChatError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), ChatError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn room(&self, id: &RoomId) -> Result<Option<Room>, ChatError> {
        sqlx::query("SELECT id, kind, name, owner_id, created_at FROM rooms WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?
            .map(|row| rows::room(&row))
            .transpose()
    }

    async fn create_room(&self, room: &Room, members: &[UserId]) -> Result<(), ChatError> {
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO rooms (id, kind, name, owner_id, created_at) VALUES ($1, $2, $3, $4, $5) \
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
                "INSERT INTO room_members (room_id, user_id, added_at) VALUES ($1, $2, $3) \
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
                OR id IN (SELECT room_id FROM room_members WHERE user_id = $1) \
             ORDER BY created_at, id",
        )
        .bind(user.as_str())
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(rows::room)
        .collect()
    }

    async fn is_member(&self, room: &RoomId, user: &UserId) -> Result<bool, ChatError> {
        let row = sqlx::query("SELECT 1 FROM room_members WHERE room_id = $1 AND user_id = $2")
            .bind(room.as_str())
            .bind(user.as_str())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    async fn members(&self, room: &RoomId) -> Result<Vec<Member>, ChatError> {
        sqlx::query(
            "SELECT m.user_id, u.name FROM room_members m LEFT JOIN users u ON u.id = m.user_id \
             WHERE m.room_id = $1 ORDER BY m.added_at, m.user_id",
        )
        .bind(room.as_str())
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(rows::member)
        .collect()
    }

    async fn add_member(&self, room: &RoomId, user: &UserId) -> Result<(), ChatError> {
        sqlx::query(
            "INSERT INTO room_members (room_id, user_id, added_at) VALUES ($1, $2, $3) \
             ON CONFLICT DO NOTHING",
        )
        .bind(room.as_str())
        .bind(user.as_str())
        .bind(to_millis(OffsetDateTime::now_utc()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn remove_member(&self, room: &RoomId, user: &UserId) -> Result<bool, ChatError> {
        let done = sqlx::query("DELETE FROM room_members WHERE room_id = $1 AND user_id = $2")
            .bind(room.as_str())
            .bind(user.as_str())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn remember_user(&self, user: &User) -> Result<(), ChatError> {
        sqlx::query(
            "INSERT INTO users (id, name, updated_at) VALUES ($1, $2, $3) \
             ON CONFLICT (id) DO UPDATE SET name = excluded.name, updated_at = excluded.updated_at \
             WHERE users.name <> excluded.name",
        )
        .bind(user.id.as_str())
        .bind(&user.name)
        .bind(to_millis(OffsetDateTime::now_utc()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn append(&self, message: NewMessage) -> Result<Appended, ChatError> {
        self.appends.append(message).await
    }

    async fn last_seq(&self, room: &RoomId) -> Result<u64, ChatError> {
        let row = sqlx::query("SELECT last_seq FROM rooms WHERE id = $1")
            .bind(room.as_str())
            .fetch_optional(&self.pool)
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
                 FROM messages WHERE room_id = $1 AND seq > $2 AND seq < $3 ORDER BY seq DESC LIMIT $4",
            )
            .bind(room.as_str())
            .bind(0i64)
            .bind(before.map_or(i64::MAX, seq_bound)),
            Page::Oldest { after, before } => sqlx::query(
                "SELECT room_id, seq, id, user_id, user_name, body, client_id, created_at, deleted_at \
                 FROM messages WHERE room_id = $1 AND seq > $2 AND seq < $3 ORDER BY seq ASC LIMIT $4",
            )
            .bind(room.as_str())
            .bind(seq_bound(after))
            .bind(before.map_or(i64::MAX, seq_bound)),
        };
        query
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
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
        let mut tx = self.pool.begin().await?;
        let Some(row) = sqlx::query(
            "SELECT seq, deleted_at FROM messages WHERE room_id = $1 AND id = $2 FOR UPDATE",
        )
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
                "UPDATE messages SET body = '', deleted_at = $1 WHERE room_id = $2 AND seq = $3",
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
             FROM messages WHERE room_id = $1 AND id = $2",
        )
        .bind(room.as_str())
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .map(|row| rows::message(&row))
        .transpose()
    }
}

/// Appends batches for [`GroupCommit`].
struct Appender {
    pool: PgPool,
}

/// A message's idempotency key: room, user, client id.
type Key<'a> = (&'a str, &'a str, &'a str);

fn key_of(message: &NewMessage) -> Option<Key<'_>> {
    Some((
        message.room_id.as_str(),
        message.user.id.as_str(),
        message.client_id.as_ref()?.as_str(),
    ))
}

/// Where the first message with a key is: committed before this batch, or
/// earlier in it (stored with that seq).
enum Original<'a> {
    Committed(&'a Message),
    InBatch(&'a NewMessage, u64),
}

impl Original<'_> {
    fn message(&self) -> Message {
        match self {
            Original::Committed(message) => (*message).clone(),
            Original::InBatch(message, seq) => message.stored(*seq),
        }
    }
}

#[async_trait]
impl AppendBatch for Appender {
    /// Four statements whatever the batch size: lock the rooms, look up
    /// retries, insert the new messages and advance the rooms' `last_seq`.
    async fn append_batch(
        &self,
        batch: &[NewMessage],
    ) -> Result<Vec<Result<Appended, ChatError>>, ChatError> {
        let mut rooms: Vec<&str> = batch.iter().map(|m| m.room_id.as_str()).collect();
        rooms.sort_unstable();
        rooms.dedup();
        let mut tx = self.pool.begin().await?;
        // The room rows' locks serialise appends to a room across committers
        // and pods. Taken in id order, as every batch does, so two batches
        // sharing rooms wait for each other instead of deadlocking.
        let mut last_seq = HashMap::with_capacity(rooms.len());
        for row in
            sqlx::query("SELECT id, last_seq FROM rooms WHERE id = ANY($1) ORDER BY id FOR UPDATE")
                .bind(&rooms)
                .fetch_all(&mut *tx)
                .await?
        {
            last_seq.insert(row.try_get::<String, _>(0)?, row.try_get::<i64, _>(1)?);
        }
        // Retries committed before us. This statement starts after the locks
        // were granted, so it sees every append that held them earlier.
        let keys: Vec<Option<Key>> = batch.iter().map(key_of).collect();
        let mut committed: Vec<Message> = Vec::new();
        if keys.iter().any(Option::is_some) {
            let (mut key_rooms, mut users, mut clients) = (Vec::new(), Vec::new(), Vec::new());
            for &(room, user, client) in keys.iter().flatten() {
                key_rooms.push(room);
                users.push(user);
                clients.push(client);
            }
            let found = sqlx::query(
                "SELECT m.room_id, m.seq, m.id, m.user_id, m.user_name, m.body, m.client_id, \
                        m.created_at, m.deleted_at \
                 FROM messages m \
                 JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(room_id, user_id, client_id) \
                   ON m.room_id = k.room_id AND m.user_id = k.user_id AND m.client_id = k.client_id",
            )
            .bind(key_rooms)
            .bind(users)
            .bind(clients)
            .fetch_all(&mut *tx)
            .await?;
            committed = found.iter().map(rows::message).collect::<Result<_, _>>()?;
        }
        let mut originals: HashMap<Key, Original> = committed
            .iter()
            .filter_map(|m| {
                let key = (
                    m.room_id.as_str(),
                    m.user.id.as_str(),
                    m.client_id.as_ref()?.as_str(),
                );
                Some((key, Original::Committed(m)))
            })
            .collect();
        // Seqs in batch order; a repeat within the batch is a duplicate of
        // its first occurrence.
        let mut results = Vec::with_capacity(batch.len());
        let mut fresh: Vec<(&NewMessage, i64)> = Vec::with_capacity(batch.len());
        for (message, key) in batch.iter().zip(keys) {
            let Some(seq) = last_seq.get_mut(message.room_id.as_str()) else {
                results.push(Err(ChatError::room_not_found()));
                continue;
            };
            if let Some(original) = key.and_then(|k| originals.get(&k)) {
                results.push(Ok(Appended::Duplicate(original.message())));
                continue;
            }
            *seq += 1;
            if let Some(key) = key {
                originals.insert(key, Original::InBatch(message, *seq as u64));
            }
            fresh.push((message, *seq));
            results.push(Ok(Appended::Stored(message.stored(*seq as u64))));
        }
        if !fresh.is_empty() {
            // Each room's new last_seq is its last fresh message's seq
            // (seqs rise in batch order, so the last insert wins).
            let advanced: HashMap<&str, i64> = fresh
                .iter()
                .map(|(m, seq)| (m.room_id.as_str(), *seq))
                .collect();
            sqlx::query(
                "WITH inserted AS ( \
                   INSERT INTO messages (room_id, seq, id, user_id, user_name, body, client_id, created_at) \
                   SELECT * FROM unnest($1::text[], $2::int8[], $3::text[], $4::text[], $5::text[], \
                                        $6::text[], $7::text[], $8::int8[]) \
                 ) \
                 UPDATE rooms SET last_seq = advanced.last_seq \
                 FROM unnest($9::text[], $10::int8[]) AS advanced(id, last_seq) \
                 WHERE rooms.id = advanced.id",
            )
            .bind(fresh.iter().map(|(m, _)| m.room_id.as_str()).collect::<Vec<_>>())
            .bind(fresh.iter().map(|(_, seq)| *seq).collect::<Vec<_>>())
            .bind(fresh.iter().map(|(m, _)| m.id.as_str()).collect::<Vec<_>>())
            .bind(fresh.iter().map(|(m, _)| m.user.id.as_str()).collect::<Vec<_>>())
            .bind(fresh.iter().map(|(m, _)| m.user.name.as_str()).collect::<Vec<_>>())
            .bind(fresh.iter().map(|(m, _)| m.body.as_str()).collect::<Vec<_>>())
            .bind(
                fresh
                    .iter()
                    .map(|(m, _)| m.client_id.as_ref().map(|c| c.as_str()))
                    .collect::<Vec<_>>(),
            )
            .bind(fresh.iter().map(|(m, _)| to_millis(m.created_at)).collect::<Vec<_>>())
            // keys() and values() of an unchanged map walk it in one order.
            .bind(advanced.keys().copied().collect::<Vec<_>>())
            .bind(advanced.values().copied().collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(results)
    }
}
