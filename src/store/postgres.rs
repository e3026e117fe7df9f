//! The cluster store: PostgreSQL, shared by every pod.
//!
//! Appends go through group commit ([`GroupCommit`]); each batch is one call
//! of the `chat_append_batch` function (migrations 0003 to 0008), which is
//! its own transaction. One `UPDATE` advances the `rooms.last_seq` of each
//! of the batch's rooms by its message count, taking the room rows' locks
//! in id order, so writers of one room (on any pod) take turns while
//! writers of different rooms proceed in parallel; the new messages are
//! numbered from where each room stood. A failed call stores nothing and
//! takes no seq, so there are never gaps. A connection that just committed
//! a batch takes the next one as it is (see `WARM_FOR`); the pool's check
//! of a connection it hands out, a round trip to the database, is paid
//! only after a pause.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use sqlx::{
    Postgres, Row,
    pool::PoolConnection,
    postgres::{PgPool, PgPoolOptions},
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

pub struct PostgresStore {
    pool: PgPool,
    appends: GroupCommit,
}

/// Committers (each holds a pooled connection while it commits), and the
/// most messages one transaction takes. The second committer starts a
/// transaction only beside one that has stalled for 10 ms (see
/// [`group`](super::group)): one slow transaction, such as one waiting on a
/// room lock held by another pod, must not stall every append of the pod.
/// Letting both overlap freely halved the batches: at 1,500 msg/s on the
/// reference machine that cost PostgreSQL a third more CPU, and the median
/// send→delivery latency 5–9 ms instead of 3.5–5 (docs/benchmarks.md).
const COMMITTERS: usize = 2;
const MAX_BATCH: usize = 512;

/// Run on every connection of the store's pool (see `connect`).
const SESSION_SETTINGS: &str = "SELECT set_config('plan_cache_mode', 'force_generic_plan', false), \
                                set_config('enable_seqscan', 'off', false)";

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
            // Plans fit for a table of any size. Every query here reads a
            // few rows through an index, but the planner prefers sequential
            // scans of a small table: with custom plans once a batch names a
            // few dozen rooms, and with generic plans whenever a session
            // planned a statement while `rooms` was still small (a fresh
            // deployment) — that plan then stays cached while the table
            // grows. Either way it was most of PostgreSQL's time under
            // ingest. Generic plans also skip planning per execution;
            // `enable_seqscan = off` only makes sequential scans a last
            // resort, where no index applies.
            .after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::Executor::execute(&mut *conn, SESSION_SETTINGS).await?;
                    Ok(())
                })
            })
            .connect_lazy(url)?;
        let appends =
            GroupCommit::start(Arc::new(Appender::new(pool.clone())), COMMITTERS, MAX_BATCH);
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

    async fn append_all(&self, messages: Vec<NewMessage>) -> Vec<Result<Appended, ChatError>> {
        self.appends.append_all(messages).await
    }

    async fn last_seq(&self, room: &RoomId) -> Result<u64, ChatError> {
        let row = sqlx::query("SELECT last_seq FROM rooms WHERE id = $1")
            .bind(room.as_str())
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(ChatError::room_not_found)?;
        Ok(row.try_get::<i64, _>(0)? as u64)
    }

    async fn last_seqs(&self, rooms: &[RoomId]) -> Result<Vec<Option<u64>>, ChatError> {
        let ids: Vec<&str> = rooms.iter().map(RoomId::as_str).collect();
        let rows = sqlx::query_as("SELECT id, last_seq FROM rooms WHERE id = ANY($1)")
            .bind(&ids)
            .fetch_all(&self.pool)
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
    /// Connections that committed a batch, with when, newest last: the
    /// next batch takes the newest as it is if it is younger than
    /// [`WARM_FOR`]. (At most one per committer.)
    warm: Mutex<Vec<(PoolConnection<Postgres>, Instant)>>,
}

/// How long a connection that just committed is reused without a check.
/// The pool checks a connection it hands out with a round trip (a lone
/// `Sync`), which is one more exchange with the database before every
/// transaction, on the path of every ack; a connection that answered a
/// moment ago is as good as checked. If the database went away in that
/// moment, the batch fails as it would have had it gone away during the
/// transaction (its sends are answered `unavailable`), and the connection
/// goes back to the pool, which checks it before handing it out again.
const WARM_FOR: Duration = Duration::from_secs(1);

impl Appender {
    fn new(pool: PgPool) -> Self {
        Self {
            pool,
            warm: Mutex::new(Vec::new()),
        }
    }

    /// Gives every kept connection back to the pool.
    #[cfg(test)]
    fn give_back(&self) {
        self.warm().clear();
    }

    /// The connection that committed last, if warm; else one from the pool
    /// (checked).
    async fn connection(&self) -> Result<PoolConnection<Postgres>, sqlx::Error> {
        let newest = self.warm().pop();
        match newest {
            Some((conn, used)) if used.elapsed() < WARM_FOR => Ok(conn),
            // Stale (older ones are too, and go back when the next batch
            // commits): the pool checks it before handing it out again.
            stale => {
                drop(stale);
                self.pool.acquire().await
            }
        }
    }

    /// Keeps a connection that just committed for the next batch, and gives
    /// the pool back those that went unused for [`WARM_FOR`].
    fn committed(&self, conn: PoolConnection<Postgres>) {
        let mut warm = self.warm();
        let fresh = warm
            .iter()
            .position(|(_, used)| used.elapsed() < WARM_FOR)
            .unwrap_or(warm.len());
        let stale: Vec<_> = warm.drain(..fresh).collect();
        warm.push((conn, Instant::now()));
        drop(warm);
        drop(stale);
    }

    fn warm(&self) -> std::sync::MutexGuard<'_, Vec<(PoolConnection<Postgres>, Instant)>> {
        // Held for a `Vec` operation only: a poisoned lock is still good.
        self.warm.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl AppendBatch for Appender {
    /// One statement whatever the batch size: the `chat_append_batch`
    /// function (migrations 0003 to 0008) advances (and so locks) the
    /// rooms and inserts, as one transaction; a retry of a committed send
    /// is answered with the stored message. Repeats of a key within the
    /// batch never reach it: each is answered here from its first
    /// occurrence.
    async fn append_batch(
        &self,
        batch: &[NewMessage],
    ) -> Result<Vec<Result<Appended, ChatError>>, ChatError> {
        let distinct = Distinct::of(batch);
        let sent = &distinct.messages;
        let mut conn = self.connection().await?;
        let rows = sqlx::query(
            "SELECT * FROM chat_append_batch($1::text[], $2::text[], $3::text[], $4::text[], \
                                             $5::text[], $6::text[], $7::int8[])",
        )
        .bind(sent.iter().map(|m| m.room_id.as_str()).collect::<Vec<_>>())
        .bind(sent.iter().map(|m| m.id.as_str()).collect::<Vec<_>>())
        .bind(sent.iter().map(|m| m.user.id.as_str()).collect::<Vec<_>>())
        .bind(
            sent.iter()
                .map(|m| m.user.name.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(sent.iter().map(|m| m.body.as_str()).collect::<Vec<_>>())
        .bind(
            sent.iter()
                .map(|m| m.client_id.as_ref().map(|c| c.as_str()))
                .collect::<Vec<_>>(),
        )
        .bind(
            sent.iter()
                .map(|m| to_millis(m.created_at))
                .collect::<Vec<_>>(),
        )
        .fetch_all(&mut *conn)
        .await?;
        // (After a failure the connection goes back to the pool instead.)
        self.committed(conn);
        let mut outcomes = distinct.unanswered();
        for row in &rows {
            // `ord` counts from 1 (SQL's `WITH ORDINALITY`).
            let ord: i64 = row.try_get("ord")?;
            *outcome_at(&mut outcomes, ord - 1)? = if row.try_get("duplicate")? {
                Outcome::Duplicate(rows::message(row)?)
            } else {
                let seq: i64 = row.try_get("seq")?;
                Outcome::Stored(seq as u64)
            };
        }
        Ok(distinct.answer(&outcomes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{PgSchema, history_of, new_message, public_room};

    /// A pool of one connection, with the store's session settings.
    async fn one_session(url: &str) -> PgPool {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect(url)
            .await
            .unwrap();
        sqlx::query(SESSION_SETTINGS).execute(&pool).await.unwrap();
        pool
    }

    /// A store on a schema of its own, migrated; the schema goes when the
    /// returned `PgSchema` is dropped.
    async fn migrated() -> (PgSchema, PostgresStore) {
        let schema = PgSchema::new().await;
        let store = PostgresStore::connect(&schema.url).await.unwrap();
        store.migrate().await.unwrap();
        (schema, store)
    }

    fn stored(result: &Result<Appended, ChatError>) -> &Message {
        match result {
            Ok(Appended::Stored(message)) => message,
            other => panic!("expected a stored message, got {other:?}"),
        }
    }

    fn duplicate(result: &Result<Appended, ChatError>) -> &Message {
        match result {
            Ok(Appended::Duplicate(message)) => message,
            other => panic!("expected a duplicate, got {other:?}"),
        }
    }

    /// One batch mixing rooms, a retry within the batch, an unknown room
    /// and keyless sends; then a batch retrying a committed send.
    #[tokio::test]
    async fn a_batch_numbers_each_room_in_order_and_answers_repeats_and_unknown_rooms() {
        let (_schema, store) = migrated().await;
        for id in ["r1", "r2"] {
            store.create_room(&public_room(id), &[]).await.unwrap();
        }
        let appender = Appender::new(store.pool.clone());

        let batch = [
            new_message("r1", "ann", "first", Some("k1")),
            new_message("r2", "ann", "elsewhere", None),
            new_message("r1", "ann", "first again", Some("k1")),
            new_message("nowhere", "ann", "lost", Some("k2")),
            new_message("r1", "bob", "second", Some("k1")),
            new_message("r1", "ann", "third", None),
        ];
        let results = appender.append_batch(&batch).await.unwrap();
        assert_eq!(results.len(), batch.len());
        assert_eq!(stored(&results[0]).seq, 1);
        assert_eq!(stored(&results[1]).seq, 1);
        let repeat = duplicate(&results[2]);
        assert_eq!((repeat.seq, repeat.id.as_str()), (1, batch[0].id.as_str()));
        assert_eq!(repeat.body, "first");
        assert!(matches!(results[3], Err(ChatError::NotFound(_))));
        // Another user's k1 is another key.
        assert_eq!(stored(&results[4]).seq, 2);
        assert_eq!(stored(&results[5]).seq, 3);

        let retry = [
            new_message("r1", "ann", "first, retried", Some("k1")),
            new_message("r1", "ann", "fourth", Some("k4")),
        ];
        let results = appender.append_batch(&retry).await.unwrap();
        let original = duplicate(&results[0]);
        assert_eq!(
            (original.seq, original.id.as_str()),
            (1, batch[0].id.as_str())
        );
        assert_eq!(
            (original.body.as_str(), original.user.name.as_str()),
            ("first", "ANN")
        );
        assert_eq!(stored(&results[1]).seq, 4);

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

    /// Two pods' batches naming the same rooms in opposite orders lock them
    /// in one order, so they wait for each other instead of deadlocking
    /// (PostgreSQL would abort one of a deadlocked pair after a second,
    /// failing its batch). A third transaction holds the middle room while
    /// both batches start, so each takes every lock it can before waiting:
    /// locking in the batches' own orders, each would then hold a room the
    /// other waits for.
    #[tokio::test]
    async fn batches_sharing_rooms_in_opposite_orders_never_deadlock() {
        let (schema, store) = migrated().await;
        // Many rooms, as in production, so the planner looks the batch's
        // rooms up one by one. (Over a table of a few rows it may read the
        // whole index instead, in id order whatever order the function asks
        // for, and the test would prove nothing.)
        sqlx::query(
            "INSERT INTO rooms (id, kind, name, created_at) \
             SELECT format('room-%s', lpad(n::text, 4, '0')), 'public', 'Room', 0 \
             FROM generate_series(0, 1999) AS n",
        )
        .execute(&store.pool)
        .await
        .unwrap();
        sqlx::query("ANALYZE rooms")
            .execute(&store.pool)
            .await
            .unwrap();
        let rooms: Vec<String> = (0..40).map(|n| format!("room-{:04}", n * 50)).collect();
        let mut holder = store.pool.begin().await.unwrap();
        sqlx::query("SELECT 1 FROM rooms WHERE id = 'room-1000' FOR UPDATE")
            .execute(&mut *holder)
            .await
            .unwrap();
        let mut backends = Vec::new();
        let mut pods = Vec::new();
        for (user, reversed) in [("ann", false), ("bob", true)] {
            // A pool of its own, as another pod's.
            let pool = one_session(&schema.url).await;
            let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                .fetch_one(&pool)
                .await
                .unwrap();
            backends.push(backend);
            let mut batch: Vec<NewMessage> = rooms
                .iter()
                .map(|room| new_message(room, user, user, None))
                .collect();
            if reversed {
                batch.reverse();
            }
            pods.push(tokio::spawn(async move {
                let appender = Appender::new(pool);
                let results = appender.append_batch(&batch).await;
                appender.give_back();
                results.map(|results| results.iter().all(Result::is_ok))
            }));
        }
        // Both batches wait on a lock (the middle room, or a room the other
        // took first) before the holder lets go.
        let mut waiting = 0;
        for _ in 0..200 {
            waiting = sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE pid = ANY($1) AND wait_event_type = 'Lock'",
            )
            .bind(&backends)
            .fetch_one(&store.pool)
            .await
            .unwrap();
            if waiting == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(waiting, 2, "both batches should be waiting on a room lock");
        holder.commit().await.unwrap();
        for pod in pods {
            assert!(pod.await.unwrap().unwrap(), "every message stored");
        }
        for room in &rooms {
            let history = history_of(&store, room).await;
            let seqs: Vec<u64> = history.iter().map(|m| m.seq).collect();
            assert_eq!(seqs, [1, 2], "{room}");
            let mut bodies: Vec<&str> = history.iter().map(|m| m.body.as_str()).collect();
            bodies.sort_unstable();
            assert_eq!(bodies, ["ann", "bob"], "{room}");
        }
    }

    /// An append locks its room only against other appends (and writers of
    /// the room row): a membership being added to the room, whose foreign
    /// key holds a share of the room's key until it commits, does not hold
    /// up the room's messages.
    #[tokio::test]
    async fn an_append_does_not_wait_for_a_membership_being_added() {
        use sqlx::Connection;
        let (schema, store) = migrated().await;
        store.create_room(&public_room("lobby"), &[]).await.unwrap();
        let mut adding = sqlx::PgConnection::connect(&schema.url).await.unwrap();
        sqlx::query("BEGIN").execute(&mut adding).await.unwrap();
        sqlx::query(
            "INSERT INTO room_members (room_id, user_id, added_at) VALUES ('lobby', 'zoe', 0)",
        )
        .execute(&mut adding)
        .await
        .unwrap();

        let appender = Appender::new(store.pool.clone());
        let results = tokio::time::timeout(
            Duration::from_secs(5),
            appender.append_batch(&[new_message("lobby", "ann", "hello", Some("k1"))]),
        )
        .await
        .expect("the append waited for the membership's transaction")
        .unwrap();
        assert_eq!(stored(&results[0]).seq, 1);
        appender.give_back();
        sqlx::query("COMMIT").execute(&mut adding).await.unwrap();
        assert_eq!(history_of(&store, "lobby").await.len(), 1);
    }

    /// The retry lookup must stay an index probe per message however small
    /// `messages` was when the session planned it: a plan made on the empty
    /// table once read the whole idempotency index for every batch. (Only a
    /// batch holding a retry of a committed send looks anything up: the
    /// others are inserted straight away.)
    #[tokio::test]
    async fn retries_are_looked_up_per_message_on_a_table_planned_empty() {
        let (schema, store) = migrated().await;
        store.create_room(&public_room("lobby"), &[]).await.unwrap();
        // One session, configured as the store's, does every append, so it
        // plans the lookup while `messages` holds a single row.
        let pool = one_session(&schema.url).await;
        let appender = Appender::new(pool.clone());
        let send = |n: i64| new_message("lobby", "ann", "hello", Some(&format!("k{n}")));
        const SENDS: i64 = 300;
        for n in 0..SENDS {
            let results = appender.append_batch(&[send(n)]).await.unwrap();
            assert_eq!(stored(&results[0]).seq, n as u64 + 1);
            if n == 0 {
                let results = appender.append_batch(&[send(0)]).await.unwrap();
                assert_eq!(duplicate(&results[0]).seq, 1);
            }
        }
        // The appender keeps the pool's one connection while it is warm.
        appender.give_back();
        let before = idempotency_index_use(&pool, 1).await;
        for n in 0..SENDS {
            let results = appender.append_batch(&[send(n)]).await.unwrap();
            assert_eq!(duplicate(&results[0]).seq, n as u64 + 1);
        }
        appender.give_back();
        let after = idempotency_index_use(&pool, before.0 + SENDS).await;
        let (scans, read) = (after.0 - before.0, after.1 - before.1);
        assert!(scans >= SENDS, "one probe per retry, saw {scans} scans");
        // Each probe finds its one entry. A scan of the whole index per
        // batch would have read about SENDS entries for each retry.
        assert_eq!(read, SENDS, "index entries read by {scans} scans");
    }

    /// `(idx_scan, idx_tup_read)` of the idempotency index, once the
    /// statistics show at least `scans` scans (or after ten seconds).
    async fn idempotency_index_use(pool: &PgPool, scans: i64) -> (i64, i64) {
        // The session's counts reach the statistics views once flushed.
        sqlx::query("SELECT pg_stat_force_next_flush()")
            .execute(pool)
            .await
            .unwrap();
        let mut counts = (0, 0);
        for _ in 0..100 {
            counts = sqlx::query_as(
                "SELECT idx_scan, idx_tup_read FROM pg_stat_user_indexes \
                 WHERE schemaname = current_schema() AND indexrelname = 'messages_idempotency'",
            )
            .fetch_one(pool)
            .await
            .unwrap();
            if counts.0 >= scans {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        counts
    }
}
