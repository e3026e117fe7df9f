//! The cluster store: PostgreSQL, shared by every pod.
//!
//! Seqs are allocated by `UPDATE rooms SET last_seq = last_seq + 1 … RETURNING`
//! inside the appending transaction: the row lock serialises writers of one
//! room (on any pod) while writers of different rooms proceed in parallel,
//! and a rollback gives the seq back, so there are never gaps.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::{
    Row,
    postgres::{PgPool, PgPoolOptions},
};
use time::OffsetDateTime;

use super::{Appended, Member, NewMessage, Page, Store, rows, seq_bound, to_millis};
use crate::{
    domain::{Message, Room, RoomId, User, UserId},
    error::ChatError,
};

pub struct PostgresStore {
    pool: PgPool,
}

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
            .connect_lazy(url)?;
        Ok(Self { pool })
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
        let mut tx = self.pool.begin().await?;
        // Taking the room row's lock first serialises appends to this room
        // across pods; the duplicate check below then sees any retry of the
        // same client_id that committed before us.
        let seq: i64 = sqlx::query(
            "UPDATE rooms SET last_seq = last_seq + 1 WHERE id = $1 RETURNING last_seq",
        )
        .bind(message.room_id.as_str())
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(ChatError::room_not_found)?
        .try_get(0)?;
        if let Some(client_id) = &message.client_id {
            let original = sqlx::query(
                "SELECT room_id, seq, id, user_id, user_name, body, client_id, created_at, deleted_at \
                 FROM messages WHERE room_id = $1 AND user_id = $2 AND client_id = $3",
            )
            .bind(message.room_id.as_str())
            .bind(message.user.id.as_str())
            .bind(client_id.as_str())
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(row) = original {
                // Dropping the transaction rolls the seq bump back.
                return Ok(Appended::Duplicate(rows::message(&row)?));
            }
        }
        sqlx::query(
            "INSERT INTO messages (room_id, seq, id, user_id, user_name, body, client_id, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
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
        tx.commit().await?;
        Ok(Appended::Stored(Message {
            room_id: message.room_id,
            id: message.id,
            seq: seq as u64,
            user: message.user,
            body: message.body,
            client_id: message.client_id,
            created_at: message.created_at,
            deleted: false,
        }))
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
