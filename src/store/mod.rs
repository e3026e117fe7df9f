//! History and rooms: the durable state of the service.
//!
//! [`Store`] is the only place SQL lives. Two implementations: [`sqlite`]
//! (embedded default, one file) and [`postgres`] (cluster mode), chosen from
//! the `DATABASE_URL` scheme by [`connect`]. In cluster mode [`cached`]
//! wraps the store with a Redis cache of rooms, memberships and each room's
//! newest messages, shared by every pod (it gives the same guarantees), and
//! [`metered`] times every operation for the metrics.
//!
//! Guarantees every implementation gives:
//! - `append` allocates the room's next `seq` and stores the message in one
//!   transaction: seqs are 1, 2, 3, … per room, with no gaps or duplicates,
//!   however many writers (threads or pods) append to the room at once.
//! - `append` is idempotent on `(room, user, client_id)`: a repeat returns the
//!   original message as [`Appended::Duplicate`] and stores nothing.
//! - When `append` returns `Ok`, the message is committed.
//! - `append_all` stores its messages in one transaction, in their order: a
//!   room's messages among them get increasing seqs in that order.
//! - Connection problems are [`ChatError::Unavailable`]; nothing half-done
//!   is left behind.

pub mod cached;
pub mod group;
pub mod metered;
pub mod postgres;
pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::{
    domain::{ClientId, Message, Room, RoomId, User, UserId},
    error::ChatError,
};

/// A message about to be stored; the store gives it its `seq`.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub room_id: RoomId,
    pub id: String,
    pub user: User,
    pub body: String,
    pub client_id: Option<ClientId>,
    pub created_at: OffsetDateTime,
}

impl NewMessage {
    /// The message as stored with `seq`.
    pub(crate) fn stored(&self, seq: u64) -> Message {
        Message {
            room_id: self.room_id.clone(),
            id: self.id.clone(),
            seq,
            user: self.user.clone(),
            body: self.body.clone(),
            client_id: self.client_id.clone(),
            created_at: self.created_at,
            deleted: false,
        }
    }
}

#[derive(Debug, Clone)]
pub enum Appended {
    /// Stored now, with its new `seq`.
    Stored(Message),
    /// The same `(room, user, client_id)` was stored before: the original.
    Duplicate(Message),
}

/// A member of a room; `name` is the last one seen for that user, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: UserId,
    pub name: Option<String>,
}

/// Which page of history to read. Cursors are exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    /// Newest first, seqs below `before` (all when `None`).
    Newest { before: Option<u64> },
    /// Oldest first, seqs above `after` and below `before` (when set).
    Oldest { after: u64, before: Option<u64> },
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies pending migrations (safe to run from several processes).
    async fn migrate(&self) -> Result<(), ChatError>;

    /// Checks that the database answers.
    async fn ping(&self) -> Result<(), ChatError>;

    async fn room(&self, id: &RoomId) -> Result<Option<Room>, ChatError>;

    /// Creates a public or private room with its first members. `Conflict`
    /// when the id is taken.
    async fn create_room(&self, room: &Room, members: &[UserId]) -> Result<(), ChatError>;

    /// Returns the direct room with this id, creating it (with both users as
    /// members) when missing. The flag says whether it was created now.
    async fn ensure_direct_room(
        &self,
        room: &Room,
        a: &UserId,
        b: &UserId,
    ) -> Result<(Room, bool), ChatError>;

    /// The global room, every public room, and the private and direct rooms
    /// the user is a member of, oldest first.
    async fn rooms_for(&self, user: &UserId) -> Result<Vec<Room>, ChatError>;

    async fn is_member(&self, room: &RoomId, user: &UserId) -> Result<bool, ChatError>;

    async fn members(&self, room: &RoomId) -> Result<Vec<Member>, ChatError>;

    /// Adds a member; adding one twice is not an error.
    async fn add_member(&self, room: &RoomId, user: &UserId) -> Result<(), ChatError>;

    /// Removes a member; returns whether they were one.
    async fn remove_member(&self, room: &RoomId, user: &UserId) -> Result<bool, ChatError>;

    /// Remembers a user's display name (shown in member lists).
    async fn remember_user(&self, user: &User) -> Result<(), ChatError>;

    /// Stores a message with the room's next `seq` (see the module doc).
    async fn append(&self, message: NewMessage) -> Result<Appended, ChatError> {
        self.append_all(vec![message])
            .await
            .pop()
            .unwrap_or_else(|| {
                Err(ChatError::Internal(anyhow::anyhow!(
                    "the store answered no result for an append"
                )))
            })
    }

    /// Stores `messages` (each as [`append`](Self::append) does) in one
    /// transaction, in their order; one result each, in the same order. A
    /// connection's sends that arrived together are stored this way, so
    /// they keep their order.
    async fn append_all(&self, messages: Vec<NewMessage>) -> Vec<Result<Appended, ChatError>>;

    /// The room's newest `seq` (0 when it has no message).
    async fn last_seq(&self, room: &RoomId) -> Result<u64, ChatError>;

    /// [`last_seq`](Self::last_seq) of many rooms in one query, in the
    /// order asked (`None`: no such room). A pod's periodic resync asks it
    /// for every room the pod watches.
    async fn last_seqs(&self, rooms: &[RoomId]) -> Result<Vec<Option<u64>>, ChatError>;

    /// A page of history, tombstones included.
    async fn history(
        &self,
        room: &RoomId,
        page: Page,
        limit: u32,
    ) -> Result<Vec<Message>, ChatError>;

    /// Turns a message into a tombstone. `None` when the room has no such
    /// message; the flag says whether it was deleted now (not before).
    async fn delete_message(
        &self,
        room: &RoomId,
        id: &str,
    ) -> Result<Option<(Message, bool)>, ChatError>;

    async fn message(&self, room: &RoomId, id: &str) -> Result<Option<Message>, ChatError>;
}

/// Opens the store the URL names: `sqlite:` or `postgres:`/`postgresql:`.
/// Any other scheme is an error, never a silent fallback.
pub async fn connect(url: &str) -> anyhow::Result<Arc<dyn Store>> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(sqlite::SqliteStore::connect(url).await?))
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        Ok(Arc::new(postgres::PostgresStore::connect(url).await?))
    } else {
        anyhow::bail!("DATABASE_URL must start with sqlite: or postgres: (got another scheme)")
    }
}

/// A `seq` cursor as SQL compares it. Columns are `BIGINT`, so a cursor past
/// `i64::MAX` means "no bound" below and "nothing" above; casting it would
/// wrap to a negative number and turn the page upside down.
pub(crate) fn seq_bound(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

/// Milliseconds since the epoch, the storage form of every time.
pub(crate) fn to_millis(at: OffsetDateTime) -> i64 {
    (at.unix_timestamp_nanos() / 1_000_000) as i64
}

pub(crate) fn from_millis(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// Row → domain mapping shared by both SQL stores (same column names and
/// storage types in both schemas).
pub(crate) mod rows {
    use sqlx::{ColumnIndex, Decode, Row, Type};

    use super::{Member, from_millis};
    use crate::{
        domain::{ClientId, Message, Room, RoomId, RoomKind, User, UserId},
        error::ChatError,
    };

    fn get<'r, R, T>(row: &'r R, column: &str) -> Result<T, ChatError>
    where
        R: Row,
        for<'c> &'c str: ColumnIndex<R>,
        T: Decode<'r, R::Database> + Type<R::Database>,
    {
        Ok(row.try_get(column)?)
    }

    fn corrupt(what: &str) -> ChatError {
        ChatError::Internal(anyhow::anyhow!("stored {what} is invalid"))
    }

    pub fn room<R>(row: &R) -> Result<Room, ChatError>
    where
        R: Row,
        for<'c> &'c str: ColumnIndex<R>,
        for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
        for<'r> Option<String>: Decode<'r, R::Database> + Type<R::Database>,
        for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    {
        let kind: String = get(row, "kind")?;
        let owner: Option<String> = get(row, "owner_id")?;
        Ok(Room {
            id: RoomId::parse(&get::<R, String>(row, "id")?).map_err(|_| corrupt("room id"))?,
            kind: RoomKind::parse(&kind).ok_or_else(|| corrupt("room kind"))?,
            name: get(row, "name")?,
            owner_id: owner
                .map(|o| UserId::parse(&o))
                .transpose()
                .map_err(|_| corrupt("owner id"))?,
            created_at: from_millis(get(row, "created_at")?),
        })
    }

    pub fn message<R>(row: &R) -> Result<Message, ChatError>
    where
        R: Row,
        for<'c> &'c str: ColumnIndex<R>,
        for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
        for<'r> Option<String>: Decode<'r, R::Database> + Type<R::Database>,
        for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
        for<'r> Option<i64>: Decode<'r, R::Database> + Type<R::Database>,
    {
        let client_id: Option<String> = get(row, "client_id")?;
        let deleted_at: Option<i64> = get(row, "deleted_at")?;
        Ok(Message {
            room_id: RoomId::parse(&get::<R, String>(row, "room_id")?)
                .map_err(|_| corrupt("room id"))?,
            id: get(row, "id")?,
            seq: u64::try_from(get::<R, i64>(row, "seq")?).map_err(|_| corrupt("seq"))?,
            user: User {
                id: UserId::parse(&get::<R, String>(row, "user_id")?)
                    .map_err(|_| corrupt("user id"))?,
                name: get(row, "user_name")?,
            },
            body: get(row, "body")?,
            client_id: client_id
                .map(|c| ClientId::parse(&c))
                .transpose()
                .map_err(|_| corrupt("client id"))?,
            created_at: from_millis(get(row, "created_at")?),
            deleted: deleted_at.is_some(),
        })
    }

    pub fn member<R>(row: &R) -> Result<Member, ChatError>
    where
        R: Row,
        for<'c> &'c str: ColumnIndex<R>,
        for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
        for<'r> Option<String>: Decode<'r, R::Database> + Type<R::Database>,
    {
        Ok(Member {
            id: UserId::parse(&get::<R, String>(row, "user_id")?)
                .map_err(|_| corrupt("user id"))?,
            name: get(row, "name")?,
        })
    }

    /// `(id, last_seq)` rows of the rooms table, put back in the order of
    /// the rooms asked for (`None`: not found).
    pub fn in_order_asked(rooms: &[RoomId], rows: Vec<(String, i64)>) -> Vec<Option<u64>> {
        let found: std::collections::HashMap<String, i64> = rows.into_iter().collect();
        rooms
            .iter()
            .map(|room| found.get(room.as_str()).map(|&seq| seq as u64))
            .collect()
    }
}
