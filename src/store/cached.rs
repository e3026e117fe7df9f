//! A Redis cache in front of another [`Store`], shared by every pod.
//!
//! The database behind it stays the source of truth. Every answer this store
//! gives is one the inner store could have given: a cache miss, an entry
//! that cannot be proven current, or any Redis error or timeout only makes a
//! call slower (it falls through to the inner store), never wrong and never
//! an error. Redis calls are bounded by [`REDIS_TIMEOUT`]; each fallback
//! increments `chat_cache_errors_total` (labels `op`, `reason`), and
//! `chat_cache_lookups_total` (labels `kind`, `result`) shows the hit rate.
//!
//! What is cached (keys under the configured prefix):
//!
//! | key | type | holds | TTL |
//! |---|---|---|---|
//! | `c:room:{room}` | string | the room as JSON (only rooms that exist) | [`ROOM_TTL`] |
//! | `c:members:{room}` | set | member ids plus [`COMPLETE`] | [`MEMBERS_TTL`] |
//! | `c:members-token:{room}` | string | the set's generation token | [`TOKEN_TTL`] |
//! | `c:history:{room}` | hash | the newest messages as JSON by seq, and (field `_token`) the token they were written under | [`RECENT_TTL`] |
//! | `c:recent-token:{room}` | string | the room's history generation token | [`TOKEN_TTL`] |
//!
//! Rooms are never renamed or deleted in this service, so a cached room
//! cannot go stale. A missing room is not cached: another pod may create it
//! a moment later.
//!
//! Membership is filled from the inner store on a miss and deleted, on every
//! pod at once since they share Redis, after each write that changes it.
//! A fill races with writes: pod A reads the members, pod B removes one and
//! deletes the set, then A writes the set it read before B's write. To stop
//! that, every fill carries the generation token it saw *before* reading the
//! database, and a Lua script writes the set only if the token is
//! unchanged; invalidation replaces the token and deletes the set in one
//! `MULTI`. Any write committed after A's database read is invalidated after
//! A read the token, so A's fill is refused.
//!
//! History: `c:history:{room}` is a hash from seq to message: the newest
//! `recent` messages, and fewer than `TRIM_EVERY` older ones between trims.
//! (It was a sorted set scored by seq until 2026-12; a hash costs Redis
//! about half as much per message added, and seqs have no gaps, so a page
//! is a run of fields to ask for, not a range to search.) A read makes a
//! room's hash: a page near the newest messages that the hash could not
//! serve is read from the database and written back (a backfill); so does
//! a delete, whose tombstone is always written. From then on each message
//! stored in the room is added to it, until its TTL ends. A room nobody
//! reads costs Redis no memory, and a pod one add a second: an add that
//! finds no hash makes the pod skip the room for a second ([`ColdRooms`];
//! until 2026-12 every add made the hash it did not find). A page is
//! served from it only when the cached run is provably the page: the seqs are
//! consecutive (the store has no gaps, so a hole means the cache missed a
//! write), start where the page starts, and either fill the limit or end
//! where the page ends. Where that end depends on the room's newest seq, it
//! is read from the inner store (`last_seq`, one primary-key lookup) rather
//! than from a cached high-water mark, which could be as stale as the hash
//! itself; a newest page without a cursor reads it first, to know which
//! seqs to ask for. Entries are only ever written from committed messages,
//! and a tombstone always wins over the live message of the same seq,
//! whatever order the writes reach Redis in. The hash records the token it
//! was written under, and is trusted only while the room's token still has
//! that value.

use std::{
    borrow::Cow,
    collections::HashMap,
    future::Future,
    sync::{
        Arc, LazyLock, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{redis_conn::RedisConn, telemetry::LogThrottle};
use async_trait::async_trait;
use redis::{RedisResult, Script};
use serde::{Deserialize, Serialize};
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinSet,
};

use super::{Appended, Member, NewMessage, Page, Store, from_millis, to_millis};
use crate::{
    domain::{ClientId, Message, Room, RoomId, RoomKind, User, UserId},
    error::ChatError,
};

/// Longest wait for one Redis call, connection included. A cache slower
/// than this costs more than the database read it saves.
pub const REDIS_TIMEOUT: Duration = Duration::from_millis(200);
/// Rooms never change; the TTL only bounds memory.
pub const ROOM_TTL: Duration = Duration::from_secs(3600);
/// Bounds how long a membership set can stay stale if an invalidation is
/// lost (Redis unreachable from the writer and every retry failing): a
/// removed member may keep access at most this long in that case.
pub const MEMBERS_TTL: Duration = Duration::from_secs(60);
/// Set when a room's hash is created and never extended, so that it is
/// rebuilt from the database at least this often whatever a lost write left
/// in it.
pub const RECENT_TTL: Duration = Duration::from_secs(600);
/// Far longer than any fill takes, so a token cannot expire and come back
/// with the same value between a read and the fill that checks it.
pub const TOKEN_TTL: Duration = Duration::from_secs(86_400);
/// The member that marks a membership set as complete: an empty set does
/// not exist in Redis. `#` is not allowed in user ids.
pub const COMPLETE: &str = "#complete";

/// After a Redis fault, calls that may be skipped safely are skipped for this
/// long, so a dead Redis costs one timeout per second rather than one per call.
const COOL_DOWN: Duration = Duration::from_secs(1);
/// Redis trouble is logged at most this often (the counter sees all of it).
const LOG_EVERY: Duration = Duration::from_secs(10);
/// How long a lost invalidation or tombstone is retried in the background.
const REPAIR_FOR: Duration = Duration::from_secs(300);

pub struct CachedStore {
    inner: Arc<dyn Store>,
    cache: Arc<Cache>,
    /// The queue of [`write_recent`], the task that adds stored messages to
    /// the rooms' hashes.
    adds: mpsc::Sender<Add>,
}

/// Key kinds of the history cache: a room's hash of newest messages, its
/// generation token, and the sorted set that held them before (written by
/// pods of earlier versions; see [`CachedStore::delete_message`]).
const HISTORY: &str = "history";
const TOKEN: &str = "recent-token";
const LEGACY_HISTORY: &str = "recent";

/// Most messages one call of [`PUT_RECENT`] adds.
const ADDS_PER_CALL: usize = 256;
/// A room's hash is trimmed back to about the newest `recent` entries once
/// per this many seqs ([`PUT_RECENT`]), not on every add.
const TRIM_EVERY: u64 = 32;
/// Most seqs one read asks for: Lua passes at most about 8,000 values to a
/// command.
const MOST_SEQS_PER_READ: u64 = 4096;
/// How long a pod sends no messages of a room whose hash an add did not
/// find (see [`ColdRooms`]).
const COLD_FOR: Duration = Duration::from_secs(1);
/// Calls of [`write_recent`] at once.
const ADD_CALLS_IN_FLIGHT: usize = 4;
/// Messages waiting for [`write_recent`]. It fills only while Redis is
/// slower than the sends; what does not fit is not cached (a hole, so the
/// reads that would have used it fall back to the database).
const ADD_QUEUE: usize = 16_384;

enum Add {
    Message(RoomId, Entry),
    /// Answered once everything queued before it has been written (or
    /// given up on).
    Flush(oneshot::Sender<()>),
}

impl CachedStore {
    /// `recent` is how many of each room's newest messages are kept in Redis
    /// (0 turns the history cache off).
    ///
    /// Starts the background writer of new messages, so it must be called
    /// within a Tokio runtime; the writer stops when the store is dropped.
    pub fn new(inner: Arc<dyn Store>, redis: RedisConn, prefix: String, recent: usize) -> Self {
        let cache = Arc::new(Cache {
            redis,
            prefix,
            recent,
            health: Health::new(),
            cold: Mutex::new(ColdRooms::default()),
        });
        let (adds, queue) = mpsc::channel(ADD_QUEUE);
        tokio::spawn(write_recent(Arc::clone(&cache), queue));
        Self { inner, cache, adds }
    }

    /// Queues a just-stored message for its room's hash, unless the room
    /// had none a moment ago ([`ColdRooms`]). The send does not wait for
    /// Redis: until the entry lands, reads of that page see a hole (or a
    /// run that ends short of `last_seq`) and use the database.
    fn add_recent(&self, message: &Message) {
        if self.cache.recent == 0 || self.cache.is_cold(&message.room_id) {
            return;
        }
        let add = Add::Message(message.room_id.clone(), Entry::of(message));
        if self.adds.try_send(add).is_err() {
            metrics::counter!("chat_cache_errors_total", "op" => "recent_add", "reason" => "queue_full")
                .increment(1);
        }
    }

    /// Waits until every message queued for the cache so far has been
    /// written or given up on.
    pub async fn flush_recent(&self) {
        let (done, flushed) = oneshot::channel();
        if self.adds.send(Add::Flush(done)).await.is_ok() {
            let _ = flushed.await;
        }
    }

    /// Answers from the inner store's member list and caches that list,
    /// unless the set was invalidated since `token` was handed out.
    async fn member_from_fill(
        &self,
        room: &RoomId,
        user: &UserId,
        token: &str,
    ) -> Result<bool, ChatError> {
        let members = self.inner.members(room).await?;
        let ids: Vec<&str> = members.iter().map(|m| m.id.as_str()).collect();
        self.cache.fill_members(room, token, &ids).await;
        Ok(ids.contains(&user.as_str()))
    }

    /// Serves a page from Redis when the cached run is provably the page;
    /// otherwise what was learned on the way, for the backfill.
    async fn history_from_cache(&self, room: &RoomId, span: &Span, limit: u32) -> Lookup {
        let miss = |run, last| Lookup::Miss { run, last };
        // A newest page without a cursor ends at the room's newest message:
        // read it first, so that Redis is asked for exactly the page's seqs.
        let (span, mut last) = match span.hi {
            None if span.newest_first => match self.inner.last_seq(room).await {
                Ok(newest) if newest >= span.lo => (
                    Span {
                        hi: Some(newest),
                        ..*span
                    },
                    Some(newest),
                ),
                // An empty room (or an error): the database answers.
                _ => return miss(None, None),
            },
            _ => (*span, None),
        };
        let Some(run) = self.cache.read_recent(room, &span, limit).await else {
            return miss(None, last);
        };
        let seqs: Vec<u64> = run.messages.iter().map(|m| m.seq).collect();
        let proven = match judge(&span, &seqs, limit as usize) {
            Verdict::Complete => true,
            Verdict::CompleteIfLastAtMost(end) => match last {
                Some(newest) => newest <= end,
                None => match self.inner.last_seq(room).await {
                    Ok(newest) => {
                        last = Some(newest);
                        newest <= end
                    }
                    // Let the history read itself report what is wrong.
                    Err(_) => false,
                },
            },
            Verdict::Incomplete => false,
        };
        if proven {
            Lookup::Hit(run.messages)
        } else {
            miss(Some(run), last)
        }
    }

    /// Whether a page read from the database belongs in the room's hash:
    /// only pages near the room's newest messages, which the trim would not
    /// drop at once (deep scrolling must not churn the cache).
    fn worth_backfilling(&self, page: Page, messages: &[Message], reference: Option<u64>) -> bool {
        let Some(newest) = messages.iter().map(|m| m.seq).max() else {
            return false;
        };
        matches!(page, Page::Newest { before: None })
            || reference.is_some_and(|top| newest + self.cache.recent as u64 > top)
    }
}

#[async_trait]
impl Store for CachedStore {
    async fn migrate(&self) -> Result<(), ChatError> {
        self.inner.migrate().await
    }

    /// The database only: Redis health is the bus's concern, and this store
    /// works without Redis.
    async fn ping(&self) -> Result<(), ChatError> {
        self.inner.ping().await
    }

    async fn room(&self, id: &RoomId) -> Result<Option<Room>, ChatError> {
        if let Some(room) = self.cache.room(id).await {
            return Ok(Some(room));
        }
        let room = self.inner.room(id).await?;
        if let Some(room) = &room {
            self.cache.put_room(room).await;
        }
        Ok(room)
    }

    async fn create_room(&self, room: &Room, members: &[UserId]) -> Result<(), ChatError> {
        self.inner.create_room(room, members).await?;
        // An `is_member` on the id before it existed cached an empty set.
        self.cache.invalidate_members(&room.id).await;
        self.cache.put_room(room).await;
        Ok(())
    }

    async fn ensure_direct_room(
        &self,
        room: &Room,
        a: &UserId,
        b: &UserId,
    ) -> Result<(Room, bool), ChatError> {
        // Called on every connect to a direct room; a cached room exists in
        // the database, so it was not created now.
        if let Some(existing) = self.cache.room(&room.id).await {
            return Ok((existing, false));
        }
        let (room, created) = self.inner.ensure_direct_room(room, a, b).await?;
        if created {
            self.cache.invalidate_members(&room.id).await;
        }
        self.cache.put_room(&room).await;
        Ok((room, created))
    }

    async fn rooms_for(&self, user: &UserId) -> Result<Vec<Room>, ChatError> {
        self.inner.rooms_for(user).await
    }

    /// Checked on every send to a private or direct room.
    async fn is_member(&self, room: &RoomId, user: &UserId) -> Result<bool, ChatError> {
        match self.cache.lookup_member(room, user).await {
            Some(MemberLookup::Known(answer)) => {
                count_lookup("members", true);
                Ok(answer)
            }
            Some(MemberLookup::Unknown { token }) => {
                count_lookup("members", false);
                self.member_from_fill(room, user, &token).await
            }
            None => self.inner.is_member(room, user).await,
        }
    }

    async fn members(&self, room: &RoomId) -> Result<Vec<Member>, ChatError> {
        self.inner.members(room).await
    }

    async fn add_member(&self, room: &RoomId, user: &UserId) -> Result<(), ChatError> {
        self.inner.add_member(room, user).await?;
        self.cache.invalidate_members(room).await;
        Ok(())
    }

    async fn remove_member(&self, room: &RoomId, user: &UserId) -> Result<bool, ChatError> {
        let removed = self.inner.remove_member(room, user).await?;
        // Even when nothing was removed: a set filled before an earlier
        // removal whose invalidation was lost is dropped here too.
        self.cache.invalidate_members(room).await;
        Ok(removed)
    }

    async fn remember_user(&self, user: &User) -> Result<(), ChatError> {
        self.inner.remember_user(user).await
    }

    /// The per-message path: the database insert; the cache write is
    /// queued, not awaited.
    async fn append_all(&self, messages: Vec<NewMessage>) -> Vec<Result<Appended, ChatError>> {
        let appended = self.inner.append_all(messages).await;
        // A duplicate was cached (or deliberately not) when first stored.
        for result in &appended {
            if let Ok(Appended::Stored(message)) = result {
                self.add_recent(message);
            }
        }
        appended
    }

    /// Always the database: callers rely on it being exact.
    async fn last_seq(&self, room: &RoomId) -> Result<u64, ChatError> {
        self.inner.last_seq(room).await
    }

    async fn last_seqs(&self, rooms: &[RoomId]) -> Result<Vec<Option<u64>>, ChatError> {
        self.inner.last_seqs(rooms).await
    }

    async fn history(
        &self,
        room: &RoomId,
        page: Page,
        limit: u32,
    ) -> Result<Vec<Message>, ChatError> {
        let span = match plan(page, limit) {
            Plan::Empty => return Ok(Vec::new()),
            Plan::Read(span) if self.cache.recent > 0 => span,
            Plan::Read(_) | Plan::Database => return self.inner.history(room, page, limit).await,
        };
        let (run, last) = match self.history_from_cache(room, &span, limit).await {
            Lookup::Hit(messages) => {
                count_lookup("history", true);
                return Ok(messages);
            }
            Lookup::Miss { run, last } => (run, last),
        };
        count_lookup("history", false);
        let messages = self.inner.history(room, page, limit).await?;
        if let Some(run) = run
            && self.worth_backfilling(page, &messages, last)
        {
            self.cache.backfill(room, &run.token, &messages).await;
        }
        Ok(messages)
    }

    async fn delete_message(
        &self,
        room: &RoomId,
        id: &str,
    ) -> Result<Option<(Message, bool)>, ChatError> {
        let deleted = self.inner.delete_message(room, id).await?;
        // Also when it was deleted before: rewriting a tombstone is harmless
        // and heals a cache that lost the first one.
        if let Some((tombstone, _)) = &deleted {
            self.cache.put_tombstone(tombstone).await;
        }
        Ok(deleted)
    }

    async fn message(&self, room: &RoomId, id: &str) -> Result<Option<Message>, ChatError> {
        self.inner.message(room, id).await
    }
}

/// Adds the messages queued by [`CachedStore::add_recent`]: whatever has
/// queued up (up to [`ADDS_PER_CALL`]) goes in one script call, one request
/// instead of one per message, and none on the send path. Up to
/// [`ADD_CALLS_IN_FLIGHT`] calls run at once, so a call queued behind the
/// shared connection's other requests does not hold the next batch back;
/// their order does not matter (a hole is a miss, and a tombstone wins
/// whichever arrives first).
async fn write_recent(cache: Arc<Cache>, mut queue: mpsc::Receiver<Add>) {
    let mut received = Vec::with_capacity(ADDS_PER_CALL);
    let mut flushed = Vec::new();
    let mut calls = JoinSet::new();
    while queue.recv_many(&mut received, ADDS_PER_CALL).await > 0 {
        let mut rooms: HashMap<RoomId, Vec<Entry>> = HashMap::new();
        for add in received.drain(..) {
            match add {
                Add::Message(room, entry) => rooms.entry(room).or_default().push(entry),
                Add::Flush(done) => flushed.push(done),
            }
        }
        while calls.try_join_next().is_some() {}
        if !rooms.is_empty() {
            if calls.len() >= ADD_CALLS_IN_FLIGHT {
                calls.join_next().await;
            }
            let cache = Arc::clone(&cache);
            calls.spawn(async move {
                let sets: Vec<(&RoomId, &[Entry])> = rooms
                    .iter()
                    .map(|(room, entries)| (room, entries.as_slice()))
                    .collect();
                let put = cache
                    .put("recent_add", Need::Optional, &sets, Guard::None)
                    .await;
                if let Some(put) = put.filter(|put| !put.cold.is_empty()) {
                    cache.mark_cold(put.cold.iter().filter_map(|&n| sets.get(n)).map(|s| s.0));
                }
            });
        }
        if !flushed.is_empty() {
            while calls.join_next().await.is_some() {}
            for done in flushed.drain(..) {
                let _ = done.send(());
            }
        }
    }
}

fn count_lookup(kind: &'static str, hit: bool) {
    let result = if hit { "hit" } else { "miss" };
    metrics::counter!("chat_cache_lookups_total", "kind" => kind, "result" => result).increment(1);
}

/// The Redis side: keys, scripts, timeouts and fault handling. Shared with
/// the background repairs, hence its own `Arc`.
struct Cache {
    redis: RedisConn,
    prefix: String,
    recent: usize,
    health: Health,
    cold: Mutex<ColdRooms>,
}

/// Rooms whose hash an add did not find, with when: their new messages
/// are not sent to Redis for [`COLD_FOR`] after that (not even encoded),
/// so a room nobody reads costs one add a second instead of one per
/// message. A hash that another pod's read makes meanwhile misses the
/// messages this pod stores until then: holes, so misses, which the next
/// read of those pages fills from the database. This pod's own reads and
/// deletes warm the room at once.
#[derive(Default)]
struct ColdRooms {
    since: HashMap<RoomId, Instant>,
    /// When rooms cold for longer than [`COLD_FOR`] were last dropped.
    pruned: Option<Instant>,
}

/// What one [`PUT_RECENT`] call did.
struct Put {
    /// False when a backfill was refused by the token check.
    written: bool,
    /// The rooms an `add` found without a hash, as indexes into its rooms.
    cold: Vec<usize>,
}

/// Whether a call may be skipped while Redis is known to be failing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    /// Skipping it only costs a database read later (reads, fills, adds).
    Optional,
    /// Skipping it could leave a stale entry (invalidations, tombstones):
    /// always tried, and retried in the background when it fails.
    Required,
}

enum MemberLookup {
    Known(bool),
    /// No complete set: fill it, checking this token.
    Unknown {
        token: String,
    },
}

/// Messages read from a room's hash for one page, in page order.
struct CachedRun {
    /// The room's generation token, for a backfill after a fallback.
    token: String,
    messages: Vec<Message>,
}

enum Lookup {
    Hit(Vec<Message>),
    Miss {
        run: Option<CachedRun>,
        /// The room's newest seq, when it was read from the inner store.
        last: Option<u64>,
    },
}

/// A write that must reach Redis eventually.
enum Repair {
    Members(RoomId),
    Tombstone(Message),
}

impl Cache {
    fn is_cold(&self, room: &RoomId) -> bool {
        let cold = self.cold.lock().unwrap_or_else(PoisonError::into_inner);
        cold.since
            .get(room)
            .is_some_and(|since| since.elapsed() < COLD_FOR)
    }

    /// Pauses the rooms; rooms paused longer ago than [`COLD_FOR`] are
    /// dropped here, at most once per [`COLD_FOR`].
    fn mark_cold<'a>(&self, rooms: impl Iterator<Item = &'a RoomId>) {
        let now = Instant::now();
        let mut cold = self.cold.lock().unwrap_or_else(PoisonError::into_inner);
        if cold
            .pruned
            .is_none_or(|at| now.duration_since(at) >= COLD_FOR)
        {
            cold.since
                .retain(|_, since| now.duration_since(*since) < COLD_FOR);
            cold.pruned = Some(now);
        }
        for room in rooms {
            cold.since.insert(room.clone(), now);
        }
    }

    /// The room has a hash now (this pod made it): its messages go to
    /// Redis again.
    fn warm(&self, room: &RoomId) {
        let mut cold = self.cold.lock().unwrap_or_else(PoisonError::into_inner);
        cold.since.remove(room);
    }

    fn key(&self, kind: &str, room: &RoomId) -> String {
        format!("{}c:{kind}:{room}", self.prefix)
    }

    /// Runs one Redis exchange on the shared connection within
    /// [`REDIS_TIMEOUT`]. `None` means it did not happen (or may not have):
    /// the caller falls back to the inner store.
    async fn run<T, F, Fut>(&self, op: &'static str, need: Need, exchange: F) -> Option<T>
    where
        F: FnOnce(RedisConn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        if need == Need::Optional && self.health.cooling_down() {
            metrics::counter!("chat_cache_errors_total", "op" => op, "reason" => "skipped")
                .increment(1);
            return None;
        }
        let attempt = async {
            exchange(self.redis.clone())
                .await
                .map_err(anyhow::Error::from)
        };
        match tokio::time::timeout(REDIS_TIMEOUT, attempt).await {
            Ok(Ok(value)) => Some(value),
            Ok(Err(err)) => {
                self.fault(op, "error", &err);
                None
            }
            Err(_) => {
                self.fault(
                    op,
                    "timeout",
                    &anyhow::anyhow!("no answer within {REDIS_TIMEOUT:?}"),
                );
                None
            }
        }
    }

    fn fault(&self, op: &'static str, reason: &'static str, err: &anyhow::Error) {
        metrics::counter!("chat_cache_errors_total", "op" => op, "reason" => reason).increment(1);
        self.health.trip();
        if self.health.warnings.allow() {
            tracing::warn!(op, error = %format!("{err:#}"), "Redis cache unavailable; using the database");
        }
    }

    /// An entry this code did not write (or an older version's): a miss, but
    /// Redis itself is fine, so the breaker stays closed.
    fn corrupt(&self, op: &'static str) {
        metrics::counter!("chat_cache_errors_total", "op" => op, "reason" => "decode").increment(1);
        if self.health.warnings.allow() {
            tracing::warn!(op, "undecodable Redis cache entry; using the database");
        }
    }

    async fn room(&self, id: &RoomId) -> Option<Room> {
        let key = self.key("room", id);
        let raw: Option<String> = self
            .run("room_get", Need::Optional, |mut conn| async move {
                redis::cmd("GET").arg(key).query_async(&mut conn).await
            })
            .await?;
        let room = raw.as_deref().and_then(decode_room);
        if raw.is_some() && room.is_none() {
            self.corrupt("room_get");
        }
        count_lookup("room", room.is_some());
        room
    }

    async fn put_room(&self, room: &Room) {
        let key = self.key("room", &room.id);
        let json = encode_room(room);
        self.run("room_put", Need::Optional, |mut conn| async move {
            redis::cmd("SET")
                .arg(key)
                .arg(json)
                .arg("EX")
                .arg(ROOM_TTL.as_secs())
                .query_async::<()>(&mut conn)
                .await
        })
        .await;
    }

    async fn lookup_member(&self, room: &RoomId, user: &UserId) -> Option<MemberLookup> {
        // Per send to a private room: two keys and a candidate token are
        // allocated so that a hit and a miss both take one round trip.
        let (set, token_key) = (self.key("members", room), self.key("members-token", room));
        let fresh = new_token();
        let user = user.as_str().to_owned();
        let (state, value): (String, String) = self
            .run("members_get", Need::Optional, |mut conn| async move {
                let mut call = MEMBER_LOOKUP.prepare_invoke();
                call.key(set)
                    .key(token_key)
                    .arg(COMPLETE)
                    .arg(user)
                    .arg(fresh)
                    .arg(TOKEN_TTL.as_secs());
                call.invoke_async(&mut conn).await
            })
            .await?;
        Some(if state == "hit" {
            MemberLookup::Known(value == "1")
        } else {
            MemberLookup::Unknown { token: value }
        })
    }

    /// Writes a complete membership set read from the database, unless it was
    /// invalidated since `token` was read. Returns whether it was written.
    async fn fill_members(&self, room: &RoomId, token: &str, members: &[&str]) -> bool {
        let (set, token_key) = (self.key("members", room), self.key("members-token", room));
        let token = token.to_owned();
        let members: Vec<String> = members.iter().map(|m| (*m).to_owned()).collect();
        let written: Option<i64> = self
            .run("members_fill", Need::Optional, |mut conn| async move {
                let mut call = FILL_MEMBERS.prepare_invoke();
                call.key(set)
                    .key(token_key)
                    .arg(token)
                    .arg(MEMBERS_TTL.as_secs())
                    .arg(COMPLETE)
                    .arg(members);
                call.invoke_async(&mut conn).await
            })
            .await;
        written == Some(1)
    }

    /// Drops the room's membership set on every pod, and refuses any fill
    /// that read the database before the write this follows.
    async fn invalidate_members(self: &Arc<Self>, room: &RoomId) {
        if self.try_invalidate_members(room).await.is_none() {
            self.repair_later(Repair::Members(room.clone()));
        }
    }

    async fn try_invalidate_members(&self, room: &RoomId) -> Option<()> {
        let (set, token_key) = (self.key("members", room), self.key("members-token", room));
        let fresh = new_token();
        self.run(
            "members_invalidate",
            Need::Required,
            |mut conn| async move {
                redis::pipe()
                    .atomic()
                    .cmd("SET")
                    .arg(token_key)
                    .arg(fresh)
                    .arg("EX")
                    .arg(TOKEN_TTL.as_secs())
                    .ignore()
                    .cmd("DEL")
                    .arg(set)
                    .ignore()
                    .query_async::<()>(&mut conn)
                    .await
            },
        )
        .await
    }

    /// Writes messages read from the database, unless a delete happened
    /// since `token` was read (its tombstone may have been trimmed or
    /// expired by now, and must not come back as the live message).
    async fn backfill(&self, room: &RoomId, token: &str, messages: &[Message]) {
        let entries: Vec<Entry> = messages.iter().map(Entry::of).collect();
        let put = self
            .put(
                "recent_backfill",
                Need::Optional,
                &[(room, &entries)],
                Guard::Expect(token),
            )
            .await;
        if put.is_some_and(|put| put.written) {
            self.warm(room);
        }
    }

    /// Replaces a message by its tombstone; required, since a missed
    /// tombstone would keep serving the deleted body.
    async fn put_tombstone(self: &Arc<Self>, tombstone: &Message) {
        if self.recent > 0 && self.try_put_tombstone(tombstone).await.is_none() {
            self.repair_later(Repair::Tombstone(tombstone.clone()));
        }
    }

    async fn try_put_tombstone(&self, tombstone: &Message) -> Option<()> {
        let entries = [Entry::of(tombstone)];
        self.put(
            "recent_tombstone",
            Need::Required,
            &[(&tombstone.room_id, &entries)],
            Guard::Bump,
        )
        .await?;
        self.warm(&tombstone.room_id);
        // Pods of earlier versions keep a room's newest messages in a sorted
        // set this tombstone does not reach: during a rolling upgrade they
        // would serve the deleted body from it. Without it they read the
        // database (and refill it, with the tombstone).
        let legacy = self.key(LEGACY_HISTORY, &tombstone.room_id);
        self.run("recent_tombstone", Need::Required, |mut conn| async move {
            redis::cmd("DEL")
                .arg(legacy)
                .query_async::<()>(&mut conn)
                .await
        })
        .await
    }

    /// Runs [`PUT_RECENT`] on the rooms' hashes; `None` when not done. Only
    /// single-room calls have a guard other than [`Guard::None`].
    async fn put(
        &self,
        op: &'static str,
        need: Need,
        rooms: &[(&RoomId, &[Entry])],
        guard: Guard<'_>,
    ) -> Option<Put> {
        if rooms.is_empty() {
            return None;
        }
        let (mode, token) = match guard {
            Guard::None => ("add", String::new()),
            Guard::Expect(token) => ("backfill", token.to_owned()),
            Guard::Bump => ("tombstone", new_token()),
        };
        let mut call = PUT_RECENT.prepare_invoke();
        call.arg(self.recent)
            .arg(RECENT_TTL.as_secs())
            .arg(mode)
            .arg(token)
            .arg(TOKEN_TTL.as_secs())
            .arg(TRIM_EVERY);
        for (room, entries) in rooms {
            call.key(self.key(HISTORY, room))
                .key(self.key(TOKEN, room))
                .arg(entries.len());
            for entry in *entries {
                call.arg(entry.seq)
                    .arg(if entry.tombstone { "1" } else { "0" })
                    .arg(&entry.json);
            }
        }
        let reply: Vec<usize> = self
            .run(op, need, |mut conn| async move {
                call.invoke_async(&mut conn).await
            })
            .await?;
        let (&written, cold) = reply.split_first()?;
        Some(Put {
            written: written == 1,
            // The script counts rooms from 1.
            cold: cold.iter().filter_map(|n| n.checked_sub(1)).collect(),
        })
    }

    /// Reads the entries of the seqs a page may hold, at most `limit` of
    /// them from its start (`hi` down, or `lo` up), and no more than a hash
    /// holds (a longer run is never all there, so [`judge`] decides the
    /// same on what is). A newest-first span must have its `hi`: the caller
    /// reads the room's newest seq first.
    async fn read_recent(&self, room: &RoomId, span: &Span, limit: u32) -> Option<CachedRun> {
        let most = u64::from(limit)
            .min(self.recent as u64 + TRIM_EVERY)
            .min(MOST_SEQS_PER_READ);
        let (first, count, step) = match (span.newest_first, span.hi) {
            (true, Some(hi)) => (hi, (hi - span.lo + 1).min(most), -1),
            (true, None) => return None,
            (false, hi) => (
                span.lo,
                hi.map_or(most, |hi| (hi - span.lo + 1).min(most)),
                1,
            ),
        };
        let (hash, token_key) = (self.key(HISTORY, room), self.key(TOKEN, room));
        let fresh = new_token();
        let (token, items): (String, Vec<Option<String>>) = self
            .run("recent_read", Need::Optional, |mut conn| async move {
                let mut call = READ_RECENT.prepare_invoke();
                call.key(hash)
                    .key(token_key)
                    .arg(fresh)
                    .arg(TOKEN_TTL.as_secs())
                    .arg(first)
                    .arg(count)
                    .arg(step);
                call.invoke_async(&mut conn).await
            })
            .await?;
        let mut messages = Vec::with_capacity(items.len());
        for (n, item) in (0..).zip(&items) {
            let Some(raw) = item else { continue };
            let seq = if step > 0 { first + n } else { first - n };
            match decode_message(room, raw) {
                Some(message) if message.seq == seq => messages.push(message),
                _ => {
                    self.corrupt("recent_read");
                    return None;
                }
            }
        }
        Some(CachedRun { token, messages })
    }

    /// Retries a required write in the background until it lands or
    /// [`REPAIR_FOR`] has passed; meanwhile [`MEMBERS_TTL`] and
    /// [`RECENT_TTL`] bound how long the stale entry can be served.
    fn repair_later(self: &Arc<Self>, repair: Repair) {
        let cache = Arc::clone(self);
        tokio::spawn(async move {
            let give_up = Instant::now() + REPAIR_FOR;
            let mut wait = Duration::from_millis(250);
            loop {
                tokio::time::sleep(wait).await;
                let done = match &repair {
                    Repair::Members(room) => cache.try_invalidate_members(room).await,
                    Repair::Tombstone(tombstone) => cache.try_put_tombstone(tombstone).await,
                };
                if done.is_some() {
                    tracing::info!("a Redis cache write failed earlier and has now been repaired");
                    return;
                }
                if Instant::now() >= give_up {
                    tracing::error!(
                        "gave up repairing the Redis cache; stale entries expire with their TTL"
                    );
                    return;
                }
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        });
    }
}

/// What a write to a room's hash checks or changes in its token.
#[derive(Clone, Copy)]
enum Guard<'a> {
    None,
    /// Refuse the write if the token changed since this value was read.
    Expect(&'a str),
    /// Change the token: refuses backfills read before this write.
    Bump,
}

/// A fresh generation token: unique, so that a token that was replaced can
/// never match again.
fn new_token() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

/// Breaker and log throttle, in atomics: no lock on the per-message path.
struct Health {
    epoch: Instant,
    /// Until when (ms since `epoch`) Redis is skipped.
    skip_until: AtomicU64,
    warnings: LogThrottle,
}

impl Health {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            skip_until: AtomicU64::new(0),
            warnings: LogThrottle::new(LOG_EVERY),
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn cooling_down(&self) -> bool {
        self.now() < self.skip_until.load(Ordering::Relaxed)
    }

    fn trip(&self) {
        let until = self.now() + COOL_DOWN.as_millis() as u64;
        self.skip_until.fetch_max(until, Ordering::Relaxed);
    }
}

/// How a page maps onto seqs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// The page is empty whatever the room holds.
    Empty,
    /// Cursors beyond 2^53: the cache's scripts compute seqs in Lua's
    /// doubles, and the SQL stores bind cursors as `i64` in their own way.
    /// These rare values are left to the stores, so the answers stay
    /// identical.
    Database,
    Read(Span),
}

/// The seqs a page may hold: `lo..=hi` (no upper bound when `hi` is `None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    lo: u64,
    hi: Option<u64>,
    newest_first: bool,
}

fn plan(page: Page, limit: u32) -> Plan {
    let max = 1 << 53;
    let (after, before, newest_first) = match page {
        Page::Newest { before } => (0, before, true),
        Page::Oldest { after, before } => (after, before, false),
    };
    if after >= max || before.is_some_and(|b| b > max) {
        return Plan::Database;
    }
    let lo = after + 1;
    let hi = before.map(|b| b.saturating_sub(1));
    if limit == 0 || hi.is_some_and(|hi| hi < lo) {
        return Plan::Empty;
    }
    Plan::Read(Span {
        lo,
        hi,
        newest_first,
    })
}

/// What a cached run proves about a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// The run is the page.
    Complete,
    /// The run is the page if the room has no message above this seq. (The
    /// room's newest seq is read after the run, so it is never below the
    /// run's newest: "at most" means "exactly".)
    CompleteIfLastAtMost(u64),
    /// The run has a hole, or starts where the page does not.
    Incomplete,
}

/// Decides whether `seqs`, the cached run for `span` in page order (at most
/// `limit` of them), is the page the database would return.
fn judge(span: &Span, seqs: &[u64], limit: usize) -> Verdict {
    let consecutive = seqs.windows(2).all(|pair| {
        let (earlier, later) = if span.newest_first {
            (pair[1], pair[0])
        } else {
            (pair[0], pair[1])
        };
        earlier.checked_add(1) == Some(later)
    });
    if !consecutive {
        return Verdict::Incomplete;
    }
    let (Some(&first), Some(&last)) = (seqs.first(), seqs.last()) else {
        // Nothing cached: the page is empty only if the room ends before it.
        // (Newest first with nothing cached: let the database answer.)
        return if span.newest_first {
            Verdict::Incomplete
        } else {
            Verdict::CompleteIfLastAtMost(span.lo - 1)
        };
    };
    if span.newest_first {
        // Down from `first`: it must reach the limit or seq 1 (`lo`).
        if seqs.len() < limit && last != span.lo {
            return Verdict::Incomplete;
        }
        if Some(first) == span.hi {
            Verdict::Complete
        } else {
            // `first` is below the page's upper bound: it is the newest
            // message only if the room has none above it.
            Verdict::CompleteIfLastAtMost(first)
        }
    } else {
        if first != span.lo {
            return Verdict::Incomplete;
        }
        if seqs.len() >= limit || Some(last) == span.hi {
            Verdict::Complete
        } else {
            Verdict::CompleteIfLastAtMost(last)
        }
    }
}

/// One message ready for [`PUT_RECENT`].
struct Entry {
    seq: u64,
    tombstone: bool,
    json: String,
}

impl Entry {
    fn of(message: &Message) -> Self {
        Self {
            seq: message.seq,
            tombstone: message.deleted,
            json: encode_message(message),
        }
    }
}

/// A message as cached. The room is the key's, so it is not repeated; times
/// are milliseconds, as stored.
#[derive(Serialize, Deserialize)]
struct CachedMessage<'a> {
    seq: u64,
    id: Cow<'a, str>,
    user_id: Cow<'a, str>,
    user_name: Cow<'a, str>,
    body: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    client_id: Option<Cow<'a, str>>,
    created_at: i64,
    #[serde(default)]
    deleted: bool,
}

fn encode_message(message: &Message) -> String {
    let cached = CachedMessage {
        seq: message.seq,
        id: Cow::Borrowed(&message.id),
        user_id: Cow::Borrowed(message.user.id.as_str()),
        user_name: Cow::Borrowed(&message.user.name),
        body: Cow::Borrowed(&message.body),
        client_id: message
            .client_id
            .as_ref()
            .map(|c| Cow::Borrowed(c.as_str())),
        created_at: to_millis(message.created_at),
        deleted: message.deleted,
    };
    // Strings and integers only: serialising cannot fail.
    serde_json::to_string(&cached).unwrap_or_default()
}

/// `None` for anything not written by [`encode_message`]: then a miss.
fn decode_message(room: &RoomId, raw: &str) -> Option<Message> {
    let cached: CachedMessage<'_> = serde_json::from_str(raw).ok()?;
    Some(Message {
        room_id: room.clone(),
        id: cached.id.into_owned(),
        seq: cached.seq,
        user: User {
            id: UserId::parse(&cached.user_id).ok()?,
            name: cached.user_name.into_owned(),
        },
        body: cached.body.into_owned(),
        client_id: match cached.client_id {
            Some(raw) => Some(ClientId::parse(&raw).ok()?),
            None => None,
        },
        created_at: from_millis(cached.created_at),
        deleted: cached.deleted,
    })
}

#[derive(Serialize, Deserialize)]
struct CachedRoom {
    id: String,
    kind: String,
    name: String,
    owner_id: Option<String>,
    created_at: i64,
}

fn encode_room(room: &Room) -> String {
    let cached = CachedRoom {
        id: room.id.to_string(),
        kind: room.kind.as_str().to_owned(),
        name: room.name.clone(),
        owner_id: room.owner_id.as_ref().map(UserId::to_string),
        created_at: to_millis(room.created_at),
    };
    serde_json::to_string(&cached).unwrap_or_default()
}

fn decode_room(raw: &str) -> Option<Room> {
    let cached: CachedRoom = serde_json::from_str(raw).ok()?;
    Some(Room {
        id: RoomId::parse(&cached.id).ok()?,
        kind: RoomKind::parse(&cached.kind)?,
        name: cached.name,
        owner_id: match cached.owner_id {
            Some(owner) => Some(UserId::parse(&owner).ok()?),
            None => None,
        },
        created_at: from_millis(cached.created_at),
    })
}

/// Answers `is_member` from a complete set, or hands out the generation
/// token a fill must present (creating it when missing, so that a token
/// evicted meanwhile cannot be mistaken for an unchanged one).
///
/// KEYS: set, token. ARGV: complete marker, user, fresh token, token TTL.
static MEMBER_LOOKUP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then
  return {'hit', tostring(redis.call('SISMEMBER', KEYS[1], ARGV[2]))}
end
local token = redis.call('GET', KEYS[2])
if not token then
  token = ARGV[3]
  redis.call('SET', KEYS[2], token, 'EX', ARGV[4])
end
return {'miss', token}
",
    )
});

/// Replaces the membership set if its token is still the one read before
/// the database was; members are added in chunks (Lua's `unpack` limit).
///
/// KEYS: set, token. ARGV: token, set TTL, then the complete marker and the
/// members.
static FILL_MEMBERS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
for i = 3, #ARGV, 1000 do
  redis.call('SADD', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
",
    )
});

/// The entries of one page and the room's token (created when missing, as
/// above). A hash written under another token (a pod of an earlier version
/// bumped it on a delete this hash never saw, or the token expired) is
/// deleted, not read: the page is then a miss, and its backfill starts the
/// hash afresh.
///
/// KEYS: the hash, the token. ARGV: fresh token, token TTL, first seq, how
/// many seqs, step (1 up, -1 down). Returns the token and, per seq asked, its
/// JSON or nil.
static READ_RECENT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local token = redis.call('GET', KEYS[2])
if not token then
  token = ARGV[1]
  redis.call('SET', KEYS[2], token, 'EX', ARGV[2])
end
local held = redis.call('HGET', KEYS[1], '_token')
if held ~= token then
  if held then
    redis.call('DEL', KEYS[1])
  end
  return {token, {}}
end
local first, count, step = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
if count < 1 then
  return {token, {}}
end
local fields = {}
for n = 0, count - 1 do
  fields[n + 1] = string.format('%d', first + step * n)
end
return {token, redis.call('HMGET', KEYS[1], unpack(fields))}
",
    )
});

/// Writes messages into one or more rooms' hashes (field: seq, value: the
/// message as JSON), in one of three modes:
/// - `add`, a committed message: the usual case, once per message under
///   load, so one command per message (`HSETNX`) and one `EXISTS` per room.
///   Only rooms that have a hash are written: a hash is made by a read
///   (`backfill`), so a room nobody reads costs its `EXISTS` and nothing
///   more (and the pod stops sending its messages for a while: the reply
///   names the rooms without a hash). A hash written under another token
///   is left as it is: reads will not trust it.
/// - `backfill`, a page read from the database: refused if the token
///   changed since the read that preceded it; a hash under another token is
///   replaced.
/// - `tombstone`: changes the token (refusing backfills read before it); a
///   hash still under the old token keeps its entries under the new one,
///   any other is replaced.
///
/// A live message never replaces an entry already there for its seq (the
/// same message or its tombstone); a tombstone always does. So a delete and
/// the add of the message it deletes may reach Redis in either order.
///
/// Trimming costs no read: an entry whose seq is a multiple of the trim
/// period deletes the period of seqs that ends `keep` below it (after the
/// call's entries are written, so a backfill cannot put them back), so as
/// a room's seqs advance every seq is deleted once it is `keep` to `keep +
/// period` behind the newest. An entry that escapes (its trimming entry was
/// lost) goes with the hash's TTL, which is set when the hash is created
/// and never extended.
///
/// KEYS: per room, its hash and its token. ARGV: keep, hash TTL, mode, a
/// fresh token (`tombstone`), the expected one (`backfill`) or nothing
/// (`add` reads and writes no token), token TTL, trim period, then per
/// room: its message count, then per message: seq, '1' for a tombstone or
/// '0', JSON.
///
/// Returns `{0}` for a refused backfill, otherwise `1` followed by the
/// rooms an `add` found without a hash (their places in KEYS, from 1).
static PUT_RECENT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local keep, ttl, mode, given = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
local token_ttl, trim_every = ARGV[5], tonumber(ARGV[6])
-- Makes the hash trusted under `new`, keeping its entries only if they
-- were written under `current`.
local function adopt(hash, current, new)
  local held = redis.call('HGET', hash, '_token')
  if not held or held ~= current then
    redis.call('DEL', hash)
    redis.call('HSET', hash, '_token', new)
    redis.call('EXPIRE', hash, ttl)
  elseif current ~= new then
    redis.call('HSET', hash, '_token', new)
  end
end
local i = 7
local reply = {1}
for k = 1, #KEYS, 2 do
  local hash, token_key = KEYS[k], KEYS[k + 1]
  local write = true
  if mode == 'add' then
    write = redis.call('EXISTS', hash) == 1
    if not write then
      reply[#reply + 1] = (k + 1) / 2
    end
  else
    local token = redis.call('GET', token_key)
    if mode == 'backfill' then
      if token ~= given then
        return {0}
      end
      adopt(hash, token, token)
    else
      redis.call('SET', token_key, given, 'EX', token_ttl)
      adopt(hash, token, given)
    end
  end
  local first, last = i + 1, i + 3 * tonumber(ARGV[i])
  i = last + 1
  if write then
    local trims = {}
    for j = first, last, 3 do
      local seq = ARGV[j]
      if ARGV[j + 1] == '1' then
        redis.call('HSET', hash, seq, ARGV[j + 2])
      else
        redis.call('HSETNX', hash, seq, ARGV[j + 2])
      end
      local n = tonumber(seq)
      if n % trim_every == 0 and n > keep then
        trims[#trims + 1] = n - keep
      end
    end
    for _, top in ipairs(trims) do
      local old = {}
      for s = top - trim_every + 1, top do
        old[#old + 1] = string.format('%d', s)
      end
      redis.call('HDEL', hash, unpack(old))
    end
  end
end
return reply
",
    )
});

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use redis::AsyncCommands;
    use tempfile::TempDir;

    use super::*;
    use crate::{domain::RoomKind, store::sqlite::SqliteStore};

    use crate::testing::{redis_at, redis_connection, silent_redis};

    /// A fresh database, a live Redis and a key prefix of its own, so tests
    /// run in parallel.
    struct World {
        _dir: TempDir,
        inner: Arc<dyn Store>,
        redis: RedisConn,
        prefix: String,
    }

    impl World {
        async fn new() -> Self {
            let redis = redis_connection().await;
            let dir = tempfile::tempdir().expect("a temp dir");
            let db = format!("sqlite://{}", dir.path().join("chat.db").display());
            let inner = SqliteStore::connect(&db).await.expect("a SQLite store");
            inner.migrate().await.expect("migrations");
            Self {
                _dir: dir,
                inner: Arc::new(inner),
                redis,
                prefix: format!("test-cache-{}:", uuid::Uuid::now_v7().simple()),
            }
        }

        /// A pod whose Redis accepts connections and never answers (a hung
        /// server, a black-holed route); abort the task to close it.
        async fn pod_with_silent_redis(&self) -> (CachedStore, tokio::task::JoinHandle<()>) {
            let (url, silent) = silent_redis().await;
            let store = CachedStore::new(
                Arc::clone(&self.inner),
                redis_at(&url),
                self.prefix.clone(),
                20,
            );
            (store, silent)
        }

        /// One pod: its own `CachedStore` over the shared database and Redis.
        fn pod(&self, recent: usize) -> CachedStore {
            CachedStore::new(
                Arc::clone(&self.inner),
                self.redis.clone(),
                self.prefix.clone(),
                recent,
            )
        }

        fn redis(&self) -> RedisConn {
            self.redis.clone()
        }

        fn key(&self, kind: &str, room: &RoomId) -> String {
            format!("{}c:{kind}:{room}", self.prefix)
        }

        /// Drops this test's keys (the TTLs would, later).
        async fn clean_up(&self) {
            let mut conn = self.redis();
            let pattern = format!("{}*", self.prefix);
            let mut cursor = 0u64;
            loop {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(500)
                    .query_async(&mut conn)
                    .await
                    .expect("SCAN");
                if !keys.is_empty() {
                    let _: () = conn.del(keys).await.expect("DEL");
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
    }

    fn user(id: &str) -> User {
        User {
            id: UserId::parse(id).unwrap(),
            name: format!("{id} name"),
        }
    }

    fn uid(id: &str) -> UserId {
        UserId::parse(id).unwrap()
    }

    fn rid(id: &str) -> RoomId {
        RoomId::parse(id).unwrap()
    }

    fn room(id: &str, kind: RoomKind) -> Room {
        Room {
            id: rid(id),
            kind,
            name: format!("room {id}"),
            owner_id: Some(uid("alice")),
            created_at: crate::chat::now_millis(),
        }
    }

    fn new_message(room: &RoomId, from: &str, body: &str, client_id: Option<&str>) -> NewMessage {
        NewMessage {
            room_id: room.clone(),
            id: uuid::Uuid::now_v7().to_string(),
            user: user(from),
            body: body.to_owned(),
            client_id: client_id.map(|c| ClientId::parse(c).unwrap()),
            created_at: crate::chat::now_millis(),
        }
    }

    fn stored(appended: Appended) -> Message {
        match appended {
            Appended::Stored(message) => message,
            Appended::Duplicate(message) => panic!("unexpected duplicate {}", message.seq),
        }
    }

    /// Creates a public room with `count` messages, every third with a
    /// client id, through the cached store.
    async fn room_with_messages(
        store: &CachedStore,
        id: &str,
        count: usize,
    ) -> (RoomId, Vec<Message>) {
        let lobby = room(id, RoomKind::Public);
        store.create_room(&lobby, &[uid("alice")]).await.unwrap();
        let mut messages = Vec::new();
        for n in 1..=count {
            let client_id = (n % 3 == 0).then(|| format!("c{n}"));
            let new = new_message(
                &lobby.id,
                "alice",
                &format!("message {n}"),
                client_id.as_deref(),
            );
            messages.push(stored(store.append(new).await.unwrap()));
        }
        read_newest(store, &lobby.id, count).await;
        (lobby.id, messages)
    }

    /// Reads a room's newest page, as a client opening the room does: a
    /// room's hash is made by such a read (messages stored before it were
    /// not cached).
    async fn read_newest(store: &CachedStore, room: &RoomId, limit: usize) {
        let limit = u32::try_from(limit).unwrap();
        let page = store.history(room, Page::Newest { before: None }, limit);
        assert_eq!(page.await.unwrap().len(), limit as usize);
    }

    /// A public room with no messages yet.
    async fn empty_room(store: &CachedStore, id: &str) -> RoomId {
        let lobby = room(id, RoomKind::Public);
        store.create_room(&lobby, &[uid("alice")]).await.unwrap();
        lobby.id
    }

    /// Stores message `#n` from bob.
    async fn append_numbered(store: &CachedStore, room: &RoomId, n: u64) {
        let new = new_message(room, "bob", &format!("#{n}"), None);
        store.append(new).await.unwrap();
    }

    /// Many pages, including empty ones, cursors at and around the edges of
    /// the cached window, and limits around its size.
    fn pages(last: u64) -> Vec<(Page, u32)> {
        let limits = [1, 2, 5, 19, 20, 21, 50];
        let below = |n: u64| last.saturating_sub(n);
        let cursors = [
            0,
            1,
            2,
            10,
            last / 2,
            below(20),
            below(19),
            below(2),
            below(1),
            last,
            last + 1,
            last + 5,
        ];
        let mut pages = Vec::new();
        for limit in limits {
            pages.push((Page::Newest { before: None }, limit));
            for &cursor in &cursors {
                pages.push((
                    Page::Newest {
                        before: Some(cursor),
                    },
                    limit,
                ));
                pages.push((
                    Page::Oldest {
                        after: cursor,
                        before: None,
                    },
                    limit,
                ));
                for width in [1, 2, 6, 30] {
                    pages.push((
                        Page::Oldest {
                            after: cursor,
                            before: Some(cursor + width),
                        },
                        limit,
                    ));
                }
            }
        }
        pages.push((Page::Newest { before: None }, 0));
        pages.push((
            Page::Oldest {
                after: u64::MAX,
                before: None,
            },
            5,
        ));
        pages.push((
            Page::Newest {
                before: Some(u64::MAX),
            },
            5,
        ));
        pages
    }

    async fn assert_pages_match(store: &CachedStore, inner: &dyn Store, room: &RoomId, last: u64) {
        for (page, limit) in pages(last) {
            let expected = inner.history(room, page, limit).await.unwrap();
            let got = store.history(room, page, limit).await.unwrap();
            assert_eq!(got, expected, "{page:?} limit {limit}");
        }
    }

    /// Whether the page would be answered by Redis alone (plus `last_seq`),
    /// once the queued cache writes have landed.
    async fn served_from_redis(store: &CachedStore, room: &RoomId, page: Page, limit: u32) -> bool {
        store.flush_recent().await;
        let Plan::Read(span) = plan(page, limit) else {
            panic!("{page:?} is not read from Redis");
        };
        matches!(
            store.history_from_cache(room, &span, limit).await,
            Lookup::Hit(_)
        )
    }

    /// The newest page of `limit` is answered by Redis alone, and every page
    /// of a room whose newest seq is `last` equals the database's.
    async fn assert_newest_cached(
        world: &World,
        store: &CachedStore,
        room: &RoomId,
        limit: u32,
        last: u64,
    ) {
        assert!(served_from_redis(store, room, Page::Newest { before: None }, limit).await);
        assert_pages_match(store, &*world.inner, room, last).await;
    }

    /// Drops entries from a room's hash, once the queued writes have landed.
    async fn remove_seqs(world: &World, store: &CachedStore, room: &RoomId, seqs: &[u64]) {
        store.flush_recent().await;
        let mut conn = world.redis();
        let _: i64 = conn.hdel(world.key(HISTORY, room), seqs).await.unwrap();
    }

    /// The seqs a room's hash holds, in order.
    async fn cached_seqs(world: &World, room: &RoomId) -> Vec<u64> {
        let mut conn = world.redis();
        let fields: Vec<String> = conn.hkeys(world.key(HISTORY, room)).await.unwrap();
        let mut seqs: Vec<u64> = fields.iter().filter_map(|f| f.parse().ok()).collect();
        seqs.sort_unstable();
        seqs
    }

    #[test]
    fn only_provable_runs_are_trusted() {
        let oldest = |after: u64, before: Option<u64>| Span {
            lo: after + 1,
            hi: before.map(|b| b - 1),
            newest_first: false,
        };
        let newest = |before: Option<u64>| Span {
            lo: 1,
            hi: before.map(|b| b - 1),
            newest_first: true,
        };
        // Oldest first: must start right after the cursor, without holes.
        assert_eq!(judge(&oldest(4, None), &[5, 6, 7], 3), Verdict::Complete);
        assert_eq!(judge(&oldest(4, None), &[6, 7, 8], 3), Verdict::Incomplete);
        assert_eq!(judge(&oldest(4, None), &[5, 7, 8], 3), Verdict::Incomplete);
        assert_eq!(judge(&oldest(4, None), &[5, 5, 6], 3), Verdict::Incomplete);
        assert_eq!(
            judge(&oldest(4, Some(8)), &[5, 6, 7], 10),
            Verdict::Complete
        );
        assert_eq!(
            judge(&oldest(4, Some(9)), &[5, 6, 7], 10),
            Verdict::CompleteIfLastAtMost(7)
        );
        assert_eq!(
            judge(&oldest(4, None), &[], 10),
            Verdict::CompleteIfLastAtMost(4)
        );
        // Newest first: must reach the limit or seq 1, and end at the top.
        assert_eq!(judge(&newest(Some(8)), &[7, 6, 5], 3), Verdict::Complete);
        assert_eq!(
            judge(&newest(Some(9)), &[7, 6, 5], 3),
            Verdict::CompleteIfLastAtMost(7)
        );
        assert_eq!(
            judge(&newest(None), &[7, 6, 5], 3),
            Verdict::CompleteIfLastAtMost(7)
        );
        assert_eq!(judge(&newest(None), &[7, 6, 5], 4), Verdict::Incomplete);
        assert_eq!(
            judge(&newest(None), &[3, 2, 1], 10),
            Verdict::CompleteIfLastAtMost(3)
        );
        assert_eq!(judge(&newest(None), &[7, 5, 4], 3), Verdict::Incomplete);
        assert_eq!(judge(&newest(None), &[], 3), Verdict::Incomplete);
        // Pages that are empty by their cursors, and cursors left to SQL.
        assert_eq!(plan(Page::Newest { before: Some(1) }, 5), Plan::Empty);
        assert_eq!(
            plan(
                Page::Oldest {
                    after: 3,
                    before: Some(4)
                },
                5
            ),
            Plan::Empty
        );
        assert_eq!(plan(Page::Newest { before: None }, 0), Plan::Empty);
        assert_eq!(
            plan(
                Page::Newest {
                    before: Some(u64::MAX)
                },
                5
            ),
            Plan::Database
        );
        assert_eq!(
            plan(
                Page::Oldest {
                    after: u64::MAX,
                    before: None
                },
                5
            ),
            Plan::Database
        );
    }

    #[tokio::test]
    async fn pages_through_the_cache_equal_the_database_pages() {
        let world = World::new().await;
        let store = world.pod(20);
        let (lobby, messages) = room_with_messages(&store, "lobby", 45).await;
        for seq in [3, 30, 44] {
            let id = &messages[seq - 1].id;
            store.delete_message(&lobby, id).await.unwrap();
        }
        assert_pages_match(&store, &*world.inner, &lobby, 45).await;

        // The newest window really is answered by Redis…
        for (page, limit) in [
            (Page::Newest { before: None }, 5),
            (Page::Newest { before: None }, 20),
            (Page::Newest { before: Some(40) }, 10),
            (
                Page::Oldest {
                    after: 40,
                    before: None,
                },
                10,
            ),
            (
                Page::Oldest {
                    after: 28,
                    before: Some(35),
                },
                50,
            ),
            (
                Page::Oldest {
                    after: 45,
                    before: None,
                },
                10,
            ),
        ] {
            assert!(
                served_from_redis(&store, &lobby, page, limit).await,
                "{page:?} {limit}"
            );
        }
        // …tombstones included…
        let page = store
            .history(
                &lobby,
                Page::Oldest {
                    after: 43,
                    before: None,
                },
                1,
            )
            .await
            .unwrap();
        assert!(page[0].deleted && page[0].body.is_empty());
        // Pages longer than a hash holds ask for what it can hold.
        for limit in [53, 10_000] {
            for newest_first in [false, true] {
                let span = Span {
                    lo: 1,
                    hi: newest_first.then_some(45),
                    newest_first,
                };
                let Some(run) = store.cache.read_recent(&lobby, &span, limit).await else {
                    panic!("Redis answers a read of {limit}");
                };
                assert_eq!(run.messages.len(), 33, "{span:?} {limit}");
            }
        }
        // …and pages reaching below the trimmed seqs are not (seq 32 trimmed
        // those up to 32 - 20 = 12; 13 to 25 are kept until seq 64 comes).
        assert_eq!(
            cached_seqs(&world, &lobby).await,
            (13..=45).collect::<Vec<_>>()
        );
        for (page, limit) in [
            (
                Page::Oldest {
                    after: 0,
                    before: None,
                },
                5,
            ),
            (Page::Newest { before: None }, 40),
            (Page::Newest { before: Some(13) }, 3),
        ] {
            assert!(
                !served_from_redis(&store, &lobby, page, limit).await,
                "{page:?} {limit}"
            );
        }
        world.clean_up().await;
    }

    #[tokio::test]
    async fn writes_the_cache_missed_only_make_reads_slower() {
        let world = World::new().await;
        let store = world.pod(20);
        let (lobby, _) = room_with_messages(&store, "lobby", 45).await;
        let newest = Page::Newest { before: None };

        // Lost adds (a pod whose script call timed out): holes in the window.
        remove_seqs(&world, &store, &lobby, &[30, 45]).await;
        assert!(!served_from_redis(&store, &lobby, newest, 3).await);
        assert!(
            !served_from_redis(
                &store,
                &lobby,
                Page::Oldest {
                    after: 28,
                    before: None
                },
                5
            )
            .await
        );
        assert!(
            served_from_redis(
                &store,
                &lobby,
                Page::Oldest {
                    after: 30,
                    before: Some(40)
                },
                20
            )
            .await
        );
        assert_pages_match(&store, &*world.inner, &lobby, 45).await;
        // Reading the newest page from the database put the holes back.
        assert!(served_from_redis(&store, &lobby, newest, 20).await);

        // An entry this code cannot read.
        let mut conn = world.redis();
        remove_seqs(&world, &store, &lobby, &[40]).await;
        let _: i64 = conn
            .hset(world.key(HISTORY, &lobby), 40, "{not json")
            .await
            .unwrap();
        assert!(
            !served_from_redis(
                &store,
                &lobby,
                Page::Oldest {
                    after: 35,
                    before: None
                },
                10
            )
            .await
        );
        assert_pages_match(&store, &*world.inner, &lobby, 45).await;

        // Redis restarted: nothing cached. Messages stored meanwhile do not
        // make the hash again; the next read of the newest page does.
        let _: i64 = conn.del(world.key(HISTORY, &lobby)).await.unwrap();
        assert_pages_match(&store, &*world.inner, &lobby, 45).await;
        let _: i64 = conn.del(world.key(HISTORY, &lobby)).await.unwrap();
        for n in 46..=48 {
            append_numbered(&store, &lobby, n).await;
        }
        store.flush_recent().await;
        assert_eq!(cached_seqs(&world, &lobby).await, Vec::<u64>::new());
        assert!(!served_from_redis(&store, &lobby, newest, 10).await);
        assert_pages_match(&store, &*world.inner, &lobby, 48).await;
        assert!(served_from_redis(&store, &lobby, newest, 10).await);
        append_numbered(&store, &lobby, 49).await;
        assert!(
            served_from_redis(
                &store,
                &lobby,
                Page::Oldest {
                    after: 45,
                    before: None
                },
                10
            )
            .await
        );
        world.clean_up().await;
    }

    #[tokio::test]
    async fn a_deleted_message_stays_deleted_whatever_order_redis_sees_the_writes() {
        let world = World::new().await;
        let store = world.pod(20);
        let (lobby, messages) = room_with_messages(&store, "lobby", 10).await;
        let last_page = |seq: u64| Page::Oldest {
            after: seq - 1,
            before: Some(seq + 1),
        };

        // The add of message 9 reaches Redis after its tombstone.
        let (tombstone, now) = store
            .delete_message(&lobby, &messages[8].id)
            .await
            .unwrap()
            .unwrap();
        assert!(now && tombstone.deleted);
        store.add_recent(&messages[8]);
        store.flush_recent().await;
        assert!(served_from_redis(&store, &lobby, last_page(9), 1).await);
        assert_eq!(
            store.history(&lobby, last_page(9), 1).await.unwrap(),
            vec![tombstone]
        );

        // Message 5's add was lost altogether, then it is deleted, then the
        // lost add turns up late.
        remove_seqs(&world, &store, &lobby, &[5]).await;
        let (tombstone, _) = store
            .delete_message(&lobby, &messages[4].id)
            .await
            .unwrap()
            .unwrap();
        store.add_recent(&messages[4]);
        store.flush_recent().await;
        assert!(served_from_redis(&store, &lobby, last_page(5), 1).await);
        assert_eq!(
            store.history(&lobby, last_page(5), 1).await.unwrap(),
            vec![tombstone]
        );

        // A backfill read from the database before a delete, written after
        // the tombstone was trimmed away, is refused.
        let span = Span {
            lo: 1,
            hi: Some(10),
            newest_first: true,
        };
        let Some(run) = store.cache.read_recent(&lobby, &span, 20).await else {
            panic!("Redis answers");
        };
        let before_delete = world
            .inner
            .history(&lobby, Page::Newest { before: None }, 20)
            .await
            .unwrap();
        store.delete_message(&lobby, &messages[1].id).await.unwrap();
        remove_seqs(&world, &store, &lobby, &[2]).await;
        store
            .cache
            .backfill(&lobby, &run.token, &before_delete)
            .await;
        assert!(!served_from_redis(&store, &lobby, last_page(2), 1).await);
        let page = store.history(&lobby, last_page(2), 1).await.unwrap();
        assert!(page[0].deleted && page[0].body.is_empty());
        assert_pages_match(&store, &*world.inner, &lobby, 10).await;
        world.clean_up().await;
    }

    #[tokio::test]
    async fn duplicates_are_not_cached_twice() {
        let world = World::new().await;
        let store = world.pod(20);
        let (lobby, _) = room_with_messages(&store, "lobby", 2).await;
        let first = store
            .append(new_message(&lobby, "bob", "once", Some("retry-me")))
            .await
            .unwrap();
        let again = store
            .append(new_message(&lobby, "bob", "once", Some("retry-me")))
            .await
            .unwrap();
        let (Appended::Stored(first), Appended::Duplicate(again)) = (first, again) else {
            panic!("expected a stored message, then its duplicate");
        };
        assert_eq!(first, again);
        store.flush_recent().await;
        assert_eq!(cached_seqs(&world, &lobby).await, [1, 2, 3]);
        assert_newest_cached(&world, &store, &lobby, 10, 3).await;
        world.clean_up().await;
    }

    /// A pod of an earlier version deletes a message: it changes the room's
    /// token and writes the tombstone to a sorted set of its own, not to the
    /// hash. The hash, written under the token before, is no longer trusted
    /// (nor read: the next backfill replaces it). And a delete through this
    /// version drops the earlier version's sorted set.
    #[tokio::test]
    async fn a_hash_written_under_another_token_is_not_trusted() {
        let world = World::new().await;
        let store = world.pod(20);
        let (lobby, messages) = room_with_messages(&store, "lobby", 10).await;
        let newest = Page::Newest { before: None };
        assert!(served_from_redis(&store, &lobby, newest, 10).await);

        world
            .inner
            .delete_message(&lobby, &messages[6].id)
            .await
            .unwrap();
        let mut conn = world.redis();
        let _: () = conn
            .set(world.key(TOKEN, &lobby), "an-earlier-version-s-token")
            .await
            .unwrap();
        assert!(!served_from_redis(&store, &lobby, newest, 10).await);
        let page = store.history(&lobby, newest, 10).await.unwrap();
        assert_eq!(
            page.iter().map(|m| m.seq).collect::<Vec<_>>(),
            (1..=10).rev().collect::<Vec<_>>()
        );
        assert!(page[3].deleted && page[3].body.is_empty(), "{:?}", page[3]);
        // That read's backfill started the hash again, under the new token.
        assert_newest_cached(&world, &store, &lobby, 10, 10).await;

        let legacy = world.key(LEGACY_HISTORY, &lobby);
        let _: i64 = conn.zadd(&legacy, "{\"seq\":3}", 3).await.unwrap();
        store.delete_message(&lobby, &messages[2].id).await.unwrap();
        let kept: bool = conn.exists(&legacy).await.unwrap();
        assert!(!kept, "the earlier version's sorted set should be gone");
        let page = store.history(&lobby, newest, 10).await.unwrap();
        assert!(page[7].deleted, "{:?}", page[7]);
        world.clean_up().await;
    }

    #[tokio::test]
    async fn concurrent_appends_from_two_pods_keep_pages_right() {
        let world = World::new().await;
        let pods = [Arc::new(world.pod(30)), Arc::new(world.pod(30))];
        let (lobby, _) = room_with_messages(&pods[0], "lobby", 5).await;
        let mut tasks = Vec::new();
        for (p, pod) in pods.iter().enumerate() {
            for n in 0..20 {
                let (pod, lobby) = (Arc::clone(pod), lobby.clone());
                tasks.push(tokio::spawn(async move {
                    pod.append(new_message(&lobby, "bob", &format!("pod {p} #{n}"), None))
                        .await
                        .unwrap()
                }));
            }
        }
        for task in tasks {
            task.await.unwrap();
        }
        for pod in &pods {
            assert_pages_match(pod, &*world.inner, &lobby, 45).await;
        }
        assert!(served_from_redis(&pods[1], &lobby, Page::Newest { before: None }, 30).await);
        world.clean_up().await;
    }

    /// The cache writer batches whatever has queued up across rooms into one
    /// script call: every room's messages land, each in its own set, in
    /// seq order.
    #[tokio::test]
    async fn messages_appended_at_once_to_many_rooms_are_all_cached() {
        let world = World::new().await;
        let store = Arc::new(world.pod(30));
        let mut rooms = Vec::new();
        for n in 0..6 {
            rooms.push(room_with_messages(&store, &format!("room-{n}"), 1).await.0);
        }
        let mut tasks = Vec::new();
        for n in 0..20 {
            for id in &rooms {
                let (store, id) = (Arc::clone(&store), id.clone());
                tasks.push(tokio::spawn(async move {
                    store
                        .append(new_message(&id, "bob", &format!("#{n}"), None))
                        .await
                        .unwrap()
                }));
            }
        }
        for task in tasks {
            task.await.unwrap();
        }
        for id in &rooms {
            assert_newest_cached(&world, &store, id, 21, 21).await;
        }
        world.clean_up().await;
    }

    /// Only a read makes a room's hash: the messages stored before the
    /// first read leave Redis as it was; that read caches the newest page,
    /// and the messages stored after it join it.
    #[tokio::test]
    async fn a_room_is_cached_from_its_first_read() {
        let world = World::new().await;
        let store = world.pod(20);
        let lobby = empty_room(&store, "lobby").await;
        for n in 1..=5 {
            append_numbered(&store, &lobby, n).await;
        }
        store.flush_recent().await;
        let mut conn = world.redis();
        let made: bool = conn.exists(world.key(HISTORY, &lobby)).await.unwrap();
        assert!(!made, "a room nobody read got a hash");
        let newest = Page::Newest { before: None };
        assert!(!served_from_redis(&store, &lobby, newest, 5).await);

        read_newest(&store, &lobby, 5).await;
        assert_eq!(cached_seqs(&world, &lobby).await, [1, 2, 3, 4, 5]);
        for n in 6..=8 {
            append_numbered(&store, &lobby, n).await;
        }
        assert_newest_cached(&world, &store, &lobby, 8, 8).await;
        world.clean_up().await;
    }

    /// A pod that found a room without a hash sends none of the room's
    /// messages for `COLD_FOR`. When another pod's read makes the hash
    /// meanwhile, what the first pod stores in between is missing from it:
    /// reads of those pages go to the database (and put the messages
    /// back), and once `COLD_FOR` has passed the first pod's adds land.
    #[tokio::test]
    async fn a_pod_skips_a_room_without_a_hash_for_a_while() {
        let world = World::new().await;
        let (writer, reader) = (world.pod(20), world.pod(20));
        let lobby = empty_room(&writer, "lobby").await;
        append_numbered(&writer, &lobby, 1).await;
        writer.flush_recent().await;
        read_newest(&reader, &lobby, 1).await;
        assert_eq!(cached_seqs(&world, &lobby).await, [1]);
        append_numbered(&writer, &lobby, 2).await;
        writer.flush_recent().await;
        assert_eq!(cached_seqs(&world, &lobby).await, [1]);
        let newest = Page::Newest { before: None };
        assert!(!served_from_redis(&reader, &lobby, newest, 2).await);
        assert_pages_match(&reader, &*world.inner, &lobby, 2).await;
        assert_eq!(cached_seqs(&world, &lobby).await, [1, 2]);

        tokio::time::sleep(COLD_FOR).await;
        append_numbered(&writer, &lobby, 3).await;
        assert_newest_cached(&world, &writer, &lobby, 3, 3).await;
        world.clean_up().await;
    }

    /// Messages cached one call at a time: the hash gets its TTL when the
    /// first read makes it, is trimmed back to about the newest `recent`
    /// every `TRIM_EVERY` seqs, and still serves the newest pages.
    #[tokio::test]
    async fn a_room_cached_one_message_at_a_time_stays_bounded_and_expires() {
        let world = World::new().await;
        let store = world.pod(20);
        let (lobby, _) = room_with_messages(&store, "lobby", 1).await;
        let set = world.key(HISTORY, &lobby);
        let mut conn = world.redis();
        let ttl: i64 = conn.ttl(&set).await.unwrap();
        assert!(ttl > 0 && ttl <= RECENT_TTL.as_secs() as i64, "TTL {ttl}");
        let mut largest = 0;
        for n in 2..=150u64 {
            append_numbered(&store, &lobby, n).await;
            store.flush_recent().await;
            let held = cached_seqs(&world, &lobby).await.len() as u64;
            assert!(held >= n.min(20), "{held} cached after {n} messages");
            largest = largest.max(held);
        }
        assert!(
            largest < 20 + TRIM_EVERY,
            "the set grew to {largest} entries"
        );
        let oldest = cached_seqs(&world, &lobby).await[0];
        assert!(oldest > 150 - 20 - TRIM_EVERY, "{oldest}");
        assert_newest_cached(&world, &store, &lobby, 20, 150).await;
        world.clean_up().await;
    }

    /// The cache write of a new message is queued, not awaited: a hung Redis
    /// does not slow the send path at all, not even its first call.
    #[tokio::test]
    async fn appends_do_not_wait_for_the_cache() {
        let world = World::new().await;
        let (store, silent) = world.pod_with_silent_redis().await;
        let lobby = room("lobby", RoomKind::Public);
        world.inner.create_room(&lobby, &[]).await.unwrap();
        for n in 0..10 {
            let started = Instant::now();
            let new = new_message(&lobby.id, "alice", &format!("#{n}"), None);
            stored(store.append(new).await.unwrap());
            let took = started.elapsed();
            assert!(took < REDIS_TIMEOUT / 2, "append #{n} took {took:?}");
        }
        // The writer gives up on the hung Redis and the reads fall back.
        store.flush_recent().await;
        assert_pages_match(&store, &*world.inner, &lobby.id, 10).await;
        silent.abort();
    }

    #[tokio::test]
    async fn membership_changes_are_seen_at_once_by_every_pod() {
        let world = World::new().await;
        let (a, b) = (world.pod(20), world.pod(20));
        let secret = room("secret", RoomKind::Private);

        // Asked before the room exists: an empty set gets cached…
        assert!(!a.is_member(&secret.id, &uid("bob")).await.unwrap());
        // …and creating the room on another pod drops it.
        b.create_room(&secret, &[uid("alice"), uid("bob")])
            .await
            .unwrap();
        assert!(a.is_member(&secret.id, &uid("bob")).await.unwrap());
        assert!(a.is_member(&secret.id, &uid("alice")).await.unwrap());
        assert!(!a.is_member(&secret.id, &uid("carol")).await.unwrap());
        let mut conn = world.redis();
        let cached: bool = conn
            .sismember(world.key("members", &secret.id), COMPLETE)
            .await
            .unwrap();
        assert!(cached, "the membership should be answered from Redis now");

        assert!(b.remove_member(&secret.id, &uid("bob")).await.unwrap());
        assert!(!a.is_member(&secret.id, &uid("bob")).await.unwrap());
        assert!(a.is_member(&secret.id, &uid("alice")).await.unwrap());
        b.add_member(&secret.id, &uid("carol")).await.unwrap();
        assert!(a.is_member(&secret.id, &uid("carol")).await.unwrap());
        assert!(!a.is_member(&secret.id, &uid("bob")).await.unwrap());

        // Direct rooms: created on one pod, members everywhere at once.
        let dm = Room {
            id: RoomId::direct(&uid("alice"), &uid("dave")).unwrap(),
            kind: RoomKind::Direct,
            name: "alice & dave".into(),
            owner_id: None,
            created_at: crate::chat::now_millis(),
        };
        assert!(!a.is_member(&dm.id, &uid("dave")).await.unwrap());
        let (made, created) = b
            .ensure_direct_room(&dm, &uid("alice"), &uid("dave"))
            .await
            .unwrap();
        assert!(created);
        assert_eq!(made, dm);
        assert!(a.is_member(&dm.id, &uid("dave")).await.unwrap());
        assert_eq!(
            a.ensure_direct_room(&dm, &uid("alice"), &uid("dave"))
                .await
                .unwrap(),
            (dm.clone(), false)
        );
        assert_eq!(
            a.members(&secret.id).await.unwrap(),
            world.inner.members(&secret.id).await.unwrap()
        );
        world.clean_up().await;
    }

    #[tokio::test]
    async fn a_fill_read_before_a_removal_cannot_resurrect_the_member() {
        let world = World::new().await;
        let (a, b) = (world.pod(20), world.pod(20));
        let secret = room("secret", RoomKind::Private);
        b.create_room(&secret, &[uid("alice"), uid("bob")])
            .await
            .unwrap();

        // Pod A misses and reads the members: bob is one…
        let Some(MemberLookup::Unknown { token }) =
            a.cache.lookup_member(&secret.id, &uid("bob")).await
        else {
            panic!("expected a miss");
        };
        let read_before: Vec<String> = world
            .inner
            .members(&secret.id)
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.id.to_string())
            .collect();
        assert!(read_before.contains(&"bob".to_owned()));
        // …pod B removes bob, then A writes what it read.
        b.remove_member(&secret.id, &uid("bob")).await.unwrap();
        let old: Vec<&str> = read_before.iter().map(String::as_str).collect();
        assert!(!a.cache.fill_members(&secret.id, &token, &old).await);
        assert!(!a.is_member(&secret.id, &uid("bob")).await.unwrap());
        assert!(!b.is_member(&secret.id, &uid("bob")).await.unwrap());

        // A fill with nothing in between is accepted.
        b.add_member(&secret.id, &uid("bob")).await.unwrap();
        let Some(MemberLookup::Unknown { token }) =
            a.cache.lookup_member(&secret.id, &uid("bob")).await
        else {
            panic!("expected a miss");
        };
        assert!(
            a.cache
                .fill_members(&secret.id, &token, &["alice", "bob"])
                .await
        );
        assert!(matches!(
            a.cache.lookup_member(&secret.id, &uid("bob")).await,
            Some(MemberLookup::Known(true))
        ));
        world.clean_up().await;
    }

    #[tokio::test]
    async fn rooms_are_cached_but_missing_rooms_are_not() {
        let world = World::new().await;
        let (a, b) = (world.pod(20), world.pod(20));
        let later = room("later", RoomKind::Public);
        assert_eq!(a.room(&later.id).await.unwrap(), None);
        b.create_room(&later, &[uid("alice")]).await.unwrap();
        assert_eq!(a.room(&later.id).await.unwrap(), Some(later.clone()));
        assert_eq!(a.cache.room(&later.id).await, Some(later.clone()));
        let global = RoomId::global();
        assert_eq!(
            a.room(&global).await.unwrap(),
            world.inner.room(&global).await.unwrap()
        );
        assert!(a.cache.room(&global).await.is_some());
        world.clean_up().await;
    }

    /// A Redis that accepts connections and never answers (a hung server, a
    /// black-holed route): every call is cut at [`REDIS_TIMEOUT`], and the
    /// calls that may be skipped are skipped while it keeps failing.
    #[tokio::test]
    async fn a_silent_redis_is_given_up_on_quickly() {
        let world = World::new().await;
        let (store, silent) = world.pod_with_silent_redis().await;
        let slowest = std::sync::Mutex::new(Duration::ZERO);
        let timed = async |call: std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>>| {
            let started = Instant::now();
            call.await;
            let took = started.elapsed();
            let mut slowest = slowest.lock().unwrap();
            *slowest = (*slowest).max(took);
        };
        let started = Instant::now();
        let secret = room("secret", RoomKind::Private);
        timed(Box::pin(async {
            store
                .create_room(&secret, &[uid("alice"), uid("bob")])
                .await
                .unwrap();
        }))
        .await;
        for _ in 0..20 {
            timed(Box::pin(async {
                assert!(store.is_member(&secret.id, &uid("bob")).await.unwrap());
                let new = new_message(&secret.id, "alice", "hello", None);
                store.append(new).await.unwrap();
            }))
            .await;
        }
        timed(Box::pin(async {
            assert!(store.remove_member(&secret.id, &uid("bob")).await.unwrap());
            assert!(!store.is_member(&secret.id, &uid("bob")).await.unwrap());
        }))
        .await;
        assert_pages_match(&store, &*world.inner, &secret.id, 20).await;
        let slowest = *slowest.lock().unwrap();
        assert!(
            slowest < Duration::from_secs(1),
            "slowest call took {slowest:?}"
        );
        // Without skipping, every call above would wait out its timeout.
        let took = started.elapsed();
        assert!(took < Duration::from_secs(10), "took {took:?}");
        silent.abort();
    }

    #[tokio::test]
    async fn a_dead_redis_costs_time_not_correctness() {
        let world = World::new().await;
        let store = CachedStore::new(
            Arc::clone(&world.inner),
            redis_at("redis://127.0.0.1:1"),
            world.prefix.clone(),
            20,
        );
        let started = Instant::now();
        let secret = room("secret", RoomKind::Private);
        store
            .create_room(&secret, &[uid("alice"), uid("bob")])
            .await
            .unwrap();
        assert_eq!(store.room(&secret.id).await.unwrap(), Some(secret.clone()));
        assert!(store.is_member(&secret.id, &uid("bob")).await.unwrap());
        assert!(store.remove_member(&secret.id, &uid("bob")).await.unwrap());
        assert!(!store.is_member(&secret.id, &uid("bob")).await.unwrap());
        store.add_member(&secret.id, &uid("carol")).await.unwrap();
        assert!(store.is_member(&secret.id, &uid("carol")).await.unwrap());
        let mut ids = Vec::new();
        for n in 0..25 {
            let new = new_message(
                &secret.id,
                "alice",
                &format!("m{n}"),
                Some(&format!("c{n}")),
            );
            ids.push(stored(store.append(new).await.unwrap()).id);
        }
        let again = new_message(&secret.id, "alice", "m0", Some("c0"));
        assert!(matches!(
            store.append(again).await.unwrap(),
            Appended::Duplicate(_)
        ));
        assert!(
            store
                .delete_message(&secret.id, &ids[3])
                .await
                .unwrap()
                .unwrap()
                .1
        );
        assert_eq!(store.last_seq(&secret.id).await.unwrap(), 25);
        assert_pages_match(&store, &*world.inner, &secret.id, 25).await;
        let dm = Room {
            id: RoomId::direct(&uid("alice"), &uid("dave")).unwrap(),
            kind: RoomKind::Direct,
            name: "alice & dave".into(),
            owner_id: None,
            created_at: crate::chat::now_millis(),
        };
        assert!(
            store
                .ensure_direct_room(&dm, &uid("alice"), &uid("dave"))
                .await
                .unwrap()
                .1
        );
        assert!(store.ping().await.is_ok());
        // Hundreds of calls above: a timeout each would take a minute.
        let took = started.elapsed();
        assert!(took < Duration::from_secs(5), "took {took:?}");
    }
}
