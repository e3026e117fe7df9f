//! The room hub: this instance's connections, per room, and the fan-out to
//! them.
//!
//! Every event reaches the hub through [`Hub::dispatch`], whether it was made
//! on this instance (by the chat layer, right after the store committed it)
//! or on another one (from the bus). The hub then:
//!
//! - **orders messages**: each room remembers the highest `seq` it delivered;
//!   a message with the next seq is delivered at once, an older one is
//!   dropped (a duplicate), a newer one waits in `pending` while the gap
//!   before it is filled from the store. So every connection sees a room's
//!   messages in strictly increasing `seq` order with no gap, however the
//!   events arrived.
//! - **serialises each event once** and hands the same bytes to every
//!   connection: written to its socket at once when its session is parked,
//!   or put in its bounded outbound queue (see `outbox.rs`). A connection
//!   whose queue is full is closed as too slow (4008) rather than slowing
//!   the room down.
//! - **batches big rooms when the pod falls behind** ([`Coalescing`]): a
//!   fan-out costs a system call per connection, whatever it carries. In a
//!   room with many connections here, once its messages reach the hub late
//!   (the pod is not keeping up; it stays so for a second), an event that
//!   follows the room's previous fan-out within the linger is held back and
//!   goes out with the others held at the end of it, so each connection gets
//!   them in one write. While the pod keeps up, and after a pause, events go
//!   out at once. Held events keep their order, and a connection joining the
//!   room first gets what is held for the others, so it can neither miss nor
//!   repeat one.
//!
//! Locks: the room map and each room's state are std mutexes, held only for
//! map and queue operations, never across an await.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, OnceLock, Weak},
    time::Duration,
};

use tokio::{
    sync::{Notify, OnceCell},
    time::Instant,
};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::{
    bus::{Bus, Event, WireMessage},
    domain::{RoomId, UserId},
    error::ChatError,
    outbox::{Outbox, Pushed},
    protocol::ServerFrame,
    store::{Page, Store},
};

/// Close codes the hub (or the chat layer through it) closes connections with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// 4008: the outbound queue overflowed.
    TooSlow,
    /// 4003: access to the room was revoked.
    Revoked,
}

impl CloseReason {
    pub fn code(self) -> u16 {
        match self {
            Self::TooSlow => 4008,
            Self::Revoked => 4003,
        }
    }

    pub fn text(self) -> &'static str {
        match self {
            Self::TooSlow => "too slow: outbound queue full",
            Self::Revoked => "access revoked",
        }
    }
}

/// A one-shot request to close a connection, set by whoever notices first.
#[derive(Debug, Default)]
pub struct Closer {
    reason: OnceLock<CloseReason>,
    notify: Notify,
}

impl Closer {
    pub fn close(&self, reason: CloseReason) {
        if self.reason.set(reason).is_ok() {
            self.notify.notify_one();
        }
    }

    /// Resolves once `close` was called.
    pub async fn closed(&self) -> CloseReason {
        loop {
            if let Some(reason) = self.reason.get() {
                return *reason;
            }
            self.notify.notified().await;
        }
    }
}

/// The hub's handle on one WebSocket connection.
#[derive(Debug)]
pub struct Connection {
    pub id: u64,
    pub user_id: UserId,
    pub outbox: Outbox,
    pub closer: Closer,
}

/// When a room's fan-out is batched (see the module doc).
#[derive(Debug, Clone, Copy)]
pub struct Coalescing {
    /// Rooms with fewer connections on this instance never hold an event.
    pub min_connections: usize,
    /// The longest an event is held; zero turns batching off.
    pub linger: Duration,
    /// A message that reaches the hub more than this long after its send
    /// was received marks its room as behind for [`BEHIND_FOR`], and only a
    /// room that is behind holds events. Zero: big rooms are always behind.
    pub lag: Duration,
}

struct HubRoom {
    /// Set once the bus watches the room and `delivered` is initialised.
    ready: OnceCell<()>,
    state: Mutex<RoomState>,
}

impl HubRoom {
    fn new(coalescing: Coalescing) -> Arc<Self> {
        Arc::new_cyclic(|this| Self {
            ready: OnceCell::new(),
            state: Mutex::new(RoomState {
                initialized: false,
                closed: false,
                delivered: 0,
                pending: BTreeMap::new(),
                filling: false,
                connections: Vec::new(),
                fan_out: FanOut {
                    room: this.clone(),
                    coalescing,
                    held: Vec::new(),
                    last: None,
                    behind_until: None,
                    flush_scheduled: false,
                },
            }),
        })
    }
}

struct RoomState {
    initialized: bool,
    /// Removed from the map: joiners must start over with a fresh room.
    closed: bool,
    /// Highest seq delivered to this room's connections.
    delivered: u64,
    /// Messages that arrived ahead of a gap, by seq.
    pending: BTreeMap<u64, WireMessage>,
    /// A gap-filling task is running for this room.
    filling: bool,
    connections: Vec<Arc<Connection>>,
    fan_out: FanOut,
}

/// A room's batching state.
struct FanOut {
    /// The room itself, for the task that flushes what is held.
    room: Weak<HubRoom>,
    coalescing: Coalescing,
    /// Frames waiting for the flush, oldest first.
    held: Vec<Frame>,
    /// When frames last went out to the room's connections.
    last: Option<Instant>,
    /// The room counts as behind until then: a message reached the hub
    /// later than the lag less than [`BEHIND_FOR`] ago.
    behind_until: Option<Instant>,
    /// A task will flush `held` (at `last` + linger).
    flush_scheduled: bool,
}

/// One event's bytes on their way to a room's connections.
struct Frame {
    bytes: Utf8Bytes,
    skip_user: Option<String>,
    /// Messages count as deliveries, timed from their receipt when known.
    message: bool,
    received_at_us: Option<i64>,
}

pub struct Hub {
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    rooms: Mutex<HashMap<RoomId, Arc<HubRoom>>>,
    /// Serialises `watch`/`unwatch` calls so that they reach the bus in the
    /// order the hub decided them.
    watching: tokio::sync::Mutex<()>,
    /// How long a gap may stay open before it is filled from the store: most
    /// gaps close by themselves within microseconds (two commits published in
    /// the other order).
    gap_wait: Duration,
    coalescing: Coalescing,
}

/// How long a room keeps batching after its last late message: batching
/// is what lets a pod catch up, so it must outlast the catching up.
const BEHIND_FOR: Duration = Duration::from_secs(1);

/// Rows fetched per store read while filling a gap.
const GAP_FILL_BATCH: u32 = 500;

/// Rooms whose last `seq` one resync query reads: a pod watching 10,000
/// rooms asks 10 queries each `RESYNC_INTERVAL`, not 10,000.
const CATCH_UP_ROOMS: usize = 1000;

impl Hub {
    pub fn new(
        store: Arc<dyn Store>,
        bus: Arc<dyn Bus>,
        gap_wait: Duration,
        coalescing: Coalescing,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            bus,
            rooms: Mutex::new(HashMap::new()),
            watching: tokio::sync::Mutex::new(()),
            gap_wait,
            coalescing,
        })
    }

    /// Registers a connection with its room. Returns the seq up to which the
    /// room's messages are history for it: it will receive, in order, every
    /// message after that one.
    pub async fn join(
        self: &Arc<Self>,
        room_id: &RoomId,
        conn: Arc<Connection>,
    ) -> Result<u64, ChatError> {
        loop {
            let room = Arc::clone(
                self.rooms
                    .lock()
                    .expect("hub lock")
                    .entry(room_id.clone())
                    .or_insert_with(|| HubRoom::new(self.coalescing)),
            );
            if let Err(err) = room
                .ready
                .get_or_try_init(|| self.init_room(room_id, &room))
                .await
            {
                self.forget_if_empty(room_id, &room);
                return Err(err);
            }
            let mut state = room.state.lock().expect("room lock");
            if state.closed {
                continue;
            }
            // What is held counts as delivered: the others get it now, and
            // the newcomer's history ends after it.
            state.flush();
            state.connections.push(conn);
            return Ok(state.delivered);
        }
    }

    /// Watches the room on the bus, then reads where its history ends.
    /// Watching first means no message can fall between the two.
    async fn init_room(&self, room_id: &RoomId, room: &HubRoom) -> Result<(), ChatError> {
        {
            let _order = self.watching.lock().await;
            self.bus.watch(room_id).await?;
        }
        let last = self.store.last_seq(room_id).await?;
        let mut state = room.state.lock().expect("room lock");
        state.delivered = last;
        state.initialized = true;
        // Messages that arrived while we were reading: keep the newer ones.
        Self::drain(&mut state);
        Ok(())
    }

    /// Unregisters a connection. The last one out stops watching the room.
    pub fn leave(self: &Arc<Self>, room_id: &RoomId, conn_id: u64) {
        let Some(room) = self.rooms.lock().expect("hub lock").get(room_id).cloned() else {
            return;
        };
        room.state
            .lock()
            .expect("room lock")
            .connections
            .retain(|c| c.id != conn_id);
        self.forget_if_empty(room_id, &room);
    }

    fn forget_if_empty(self: &Arc<Self>, room_id: &RoomId, room: &Arc<HubRoom>) {
        let mut rooms = self.rooms.lock().expect("hub lock");
        let mut state = room.state.lock().expect("room lock");
        let current = rooms.get(room_id).is_some_and(|r| Arc::ptr_eq(r, room));
        if !current || !state.connections.is_empty() {
            return;
        }
        state.closed = true;
        rooms.remove(room_id);
        drop(state);
        drop(rooms);
        let hub = Arc::clone(self);
        let room_id = room_id.clone();
        tokio::spawn(async move {
            let _order = hub.watching.lock().await;
            // A new connection may have arrived meanwhile and watched again.
            if !hub.rooms.lock().expect("hub lock").contains_key(&room_id) {
                hub.bus.unwatch(&room_id).await;
            }
        });
    }

    /// Delivers an event to this instance's connections in its room.
    pub fn dispatch(self: &Arc<Self>, event: &Event) {
        // Ids from the bus were valid when sent; parse only to look up.
        let Ok(room_id) = RoomId::parse(event.room_id()) else {
            return;
        };
        let Some(room) = self.rooms.lock().expect("hub lock").get(&room_id).cloned() else {
            return; // nobody here is in that room
        };
        match event {
            Event::Message(message) => {
                self.ingest(&room, room_id, message);
            }
            Event::Revoked { user_id, .. } => {
                let state = room.state.lock().expect("room lock");
                for conn in state
                    .connections
                    .iter()
                    .filter(|c| c.user_id.as_str() == user_id)
                {
                    conn.closer.close(CloseReason::Revoked);
                }
            }
            Event::Deleted { room_id, id, seq } => {
                let frame = ServerFrame::MessageDeleted {
                    room_id,
                    id,
                    seq: *seq,
                };
                Self::announce(&room, &frame, None);
            }
            Event::Typing { room_id, user } => {
                let frame = ServerFrame::Typing { room_id, user };
                Self::announce(&room, &frame, Some(&user.id));
            }
            Event::Join { room_id, user } => {
                let frame = ServerFrame::Join { room_id, user };
                Self::announce(&room, &frame, None);
            }
            Event::Leave { room_id, user } => {
                let frame = ServerFrame::Leave { room_id, user };
                Self::announce(&room, &frame, None);
            }
        }
    }

    /// Sends a frame that is not a message (no seq, no ordering) to the
    /// room, but not to the skipped user's connections.
    fn announce(room: &HubRoom, frame: &ServerFrame<'_>, skip_user: Option<&str>) {
        let mut state = room.state.lock().expect("room lock");
        if state.connections.is_empty() {
            return;
        }
        state.broadcast(Frame {
            bytes: Utf8Bytes::from(frame.to_json()),
            skip_user: skip_user.map(str::to_owned),
            message: false,
            received_at_us: None,
        });
    }

    /// Puts a message into its room's order, delivering whatever became
    /// deliverable, and starts filling the gap if one is left.
    /// The message is only copied when it has to wait (out of order, or the
    /// room is still initialising); the usual next-in-line message goes out
    /// straight from the caller's borrow.
    /// Returns whether the message was new here (neither delivered nor
    /// already waiting).
    fn ingest(
        self: &Arc<Self>,
        room: &Arc<HubRoom>,
        room_id: RoomId,
        message: &WireMessage,
    ) -> bool {
        let mut state = room.state.lock().expect("room lock");
        if state.initialized && message.seq <= state.delivered {
            return false; // already delivered (a retry, or our own event echoed)
        }
        if state.initialized && message.seq == state.delivered + 1 {
            Self::deliver(&mut state, message);
        } else {
            if state.pending.insert(message.seq, message.clone()).is_some() {
                return false; // already waiting for the gap before it
            }
            if !state.initialized {
                return true; // init_room drains once it knows where history ends
            }
        }
        Self::drain(&mut state);
        if !state.pending.is_empty() && !state.filling {
            state.filling = true;
            let hub = Arc::clone(self);
            let room = Arc::clone(room);
            tokio::spawn(async move { hub.fill_gaps(room_id, room).await });
        }
        true
    }

    /// Delivers pending messages while the next one is there.
    fn drain(state: &mut RoomState) {
        while let Some(entry) = state.pending.first_entry() {
            let seq = *entry.key();
            if seq <= state.delivered {
                entry.remove();
            } else if seq == state.delivered + 1 {
                let message = entry.remove();
                Self::deliver(state, &message);
            } else {
                break;
            }
        }
    }

    /// Hands the next message in seq order to every connection.
    fn deliver(state: &mut RoomState, message: &WireMessage) {
        state.delivered = message.seq;
        if state.connections.is_empty() {
            return;
        }
        state.broadcast(Frame {
            bytes: Utf8Bytes::from(ServerFrame::for_message(message).to_json()),
            skip_user: None,
            message: true,
            received_at_us: message.received_at_us,
        });
    }

    /// Reads the missing messages from the store until no gap is left.
    async fn fill_gaps(self: Arc<Self>, room_id: RoomId, room: Arc<HubRoom>) {
        let mut fruitless = 0u32;
        loop {
            tokio::time::sleep(self.gap_wait).await;
            let (after, before) = {
                let mut state = room.state.lock().expect("room lock");
                Self::drain(&mut state);
                match state.pending.keys().next() {
                    Some(first) if !state.closed => (state.delivered, *first),
                    _ => {
                        state.filling = false;
                        return;
                    }
                }
            };
            let page = Page::Oldest {
                after,
                before: Some(before),
            };
            match self.store.history(&room_id, page, GAP_FILL_BATCH).await {
                Ok(messages) => {
                    fruitless = if messages.is_empty() {
                        fruitless + 1
                    } else {
                        0
                    };
                    let mut state = room.state.lock().expect("room lock");
                    for message in &messages {
                        if message.seq > state.delivered
                            && !state.pending.contains_key(&message.seq)
                        {
                            metrics::counter!("chat_gap_fills_total").increment(1);
                            state
                                .pending
                                .insert(message.seq, WireMessage::from(message));
                        }
                    }
                    if fruitless >= 3 {
                        // Seqs have no gaps by construction; if the store keeps
                        // saying these do not exist, do not stall the room.
                        tracing::error!(room = %room_id, after, before, "gap not in the store; skipping it");
                        state.delivered = before - 1;
                    }
                    Self::drain(&mut state);
                }
                Err(err) => {
                    tracing::warn!(room = %room_id, error = %err, "could not fill a gap; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// Checks every watched room against the store and fills what is
    /// missing (after a bus outage, when events may have been lost). Where
    /// the rooms' histories end is read `CATCH_UP_ROOMS` rooms a query.
    pub async fn catch_up(self: &Arc<Self>) {
        let (ids, rooms): (Vec<RoomId>, Vec<Arc<HubRoom>>) = self
            .rooms
            .lock()
            .expect("hub lock")
            .iter()
            .map(|(id, room)| (id.clone(), Arc::clone(room)))
            .unzip();
        for (ids, rooms) in ids.chunks(CATCH_UP_ROOMS).zip(rooms.chunks(CATCH_UP_ROOMS)) {
            let Ok(lasts) = self.store.last_seqs(ids).await else {
                continue;
            };
            for ((room_id, room), last) in ids.iter().zip(rooms).zip(lasts) {
                // A room the store no longer has has nothing to fill.
                if let Some(last) = last {
                    self.fill_up_to(room_id, room, last).await;
                }
            }
        }
    }

    /// Delivers what the store holds of the room up to `last` and its
    /// connections have not had.
    async fn fill_up_to(self: &Arc<Self>, room_id: &RoomId, room: &Arc<HubRoom>, last: u64) {
        loop {
            let delivered = room.state.lock().expect("room lock").delivered;
            if last <= delivered {
                return;
            }
            let page = Page::Oldest {
                after: delivered,
                before: Some(last + 1),
            };
            match self.store.history(room_id, page, GAP_FILL_BATCH).await {
                Ok(messages) if !messages.is_empty() => {
                    // Only what the bus had not brought counts as filled.
                    let filled = messages
                        .iter()
                        .filter(|m| self.ingest(room, room_id.clone(), &WireMessage::from(*m)))
                        .count();
                    metrics::counter!("chat_gap_fills_total").increment(filled as u64);
                }
                _ => return,
            }
        }
    }
}

impl RoomState {
    /// Sends a frame to the room's connections now, or holds it for the
    /// room's next flush when the room is big, busy and behind (see
    /// [`Coalescing`]).
    fn broadcast(&mut self, frame: Frame) {
        let fan_out = &mut self.fan_out;
        let Coalescing {
            min_connections,
            linger,
            lag,
        } = fan_out.coalescing;
        let big = !linger.is_zero() && self.connections.len() >= min_connections;
        if !big && fan_out.held.is_empty() {
            // A small room (the common case) never holds: no clock to read.
            push(&mut self.connections, std::slice::from_ref(&frame));
            return;
        }
        let now = Instant::now();
        if let Some(received) = frame.received_at_us.filter(|_| big) {
            // How late a message gets here tells whether the pod (its
            // store, its bus, its core) keeps up with the room.
            let late_us = crate::chat::unix_micros() - received;
            if late_us > i64::try_from(lag.as_micros()).unwrap_or(i64::MAX) {
                fan_out.behind_until = Some(now + BEHIND_FOR);
            }
        }
        let behind = lag.is_zero() || fan_out.behind_until.is_some_and(|until| now < until);
        // Once something is held, everything after it waits too (even if
        // the room has shrunk meanwhile): order comes first.
        let hold = !fan_out.held.is_empty()
            || (big && behind && fan_out.last.is_some_and(|at| now < at + linger));
        if !hold {
            fan_out.last = Some(now);
            push(&mut self.connections, std::slice::from_ref(&frame));
            return;
        }
        fan_out.held.push(frame);
        metrics::counter!("chat_fanout_held_total").increment(1);
        if !fan_out.flush_scheduled {
            fan_out.flush_scheduled = true;
            let room = fan_out.room.clone();
            let at = fan_out.last.map_or(now, |last| last + linger);
            tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                if let Some(room) = room.upgrade() {
                    let mut state = room.state.lock().expect("room lock");
                    state.fan_out.flush_scheduled = false;
                    state.flush();
                }
            });
        }
    }

    /// Sends what is held.
    fn flush(&mut self) {
        if self.fan_out.held.is_empty() {
            return;
        }
        self.fan_out.last = Some(Instant::now());
        let held = std::mem::take(&mut self.fan_out.held);
        push(&mut self.connections, &held);
    }
}

/// Hands frames, in order, to each connection (but the skipped user's): a
/// connection whose session is parked gets them written at once, in one
/// write, unless the pod is busy (then a session that waits for its turn
/// finds several frames and writes them together); any other has them
/// queued. A connection whose queue cannot take them is closed as too
/// slow (4008) and dropped.
fn push(connections: &mut Vec<Arc<Connection>>, frames: &[Frame]) {
    let mut deliveries = 0;
    let (mut direct_writes, mut direct_frames) = (0, 0);
    let direct = !crate::telemetry::runtime_busy();
    connections.retain(|conn| {
        let theirs = frames
            .iter()
            .filter(|frame| frame.skip_user.as_deref() != Some(conn.user_id.as_str()));
        // Their frames, and how many are messages, in one pass.
        let (count, messages) = theirs.clone().fold((0, 0), |(all, messages), frame| {
            (all + 1, messages + u64::from(frame.message))
        });
        if count == 0 {
            return true;
        }
        let pushed = conn.outbox.push(theirs.map(|frame| &frame.bytes), direct);
        if pushed == Pushed::Written {
            direct_writes += 1;
            direct_frames += count;
        }
        match pushed {
            Pushed::Written | Pushed::Queued => {
                deliveries += messages;
                true
            }
            Pushed::Full => {
                conn.closer.close(CloseReason::TooSlow);
                false
            }
            Pushed::Closed => false,
        }
    });
    let handles = crate::telemetry::per_message();
    handles.deliveries.increment(deliveries);
    handles
        .direct_writes
        .record_many(direct_writes, direct_frames);
    let mut now = None;
    for received in frames.iter().filter_map(|f| f.received_at_us) {
        let now = *now.get_or_insert_with(crate::chat::unix_micros);
        let latency = (now - received).max(0) as f64 / 1e6;
        handles.delivery_seconds.record(latency);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        bus::{WireUser, local::LocalBus},
        store::{metered::MeteredStore, sqlite::SqliteStore},
        testing::{new_message, public_room},
    };

    const LINGER: Duration = Duration::from_millis(10);
    /// Batching whenever a big room is busy, late or not.
    const ALWAYS: Duration = Duration::ZERO;

    struct Room {
        hub: Arc<Hub>,
        id: RoomId,
        connections: Vec<Arc<Connection>>,
        _dir: tempfile::TempDir,
    }

    impl Room {
        /// A hub whose rooms of `min_connections` or more batch once their
        /// messages arrive `lag` late, and one room with `connections` users
        /// in it (`u0`, `u1`, ...).
        async fn new(min_connections: usize, connections: usize, lag: Duration) -> Self {
            let (store, dir) = sqlite_store().await;
            store.create_room(&public_room("r"), &[]).await.unwrap();
            let hub = hub_on(Arc::new(store), min_connections, lag);
            let mut room = Self {
                hub,
                id: RoomId::parse("r").unwrap(),
                connections: Vec::new(),
                _dir: dir,
            };
            for n in 0..connections {
                room.join(n).await;
            }
            room
        }

        async fn join(&mut self, n: usize) -> u64 {
            let conn = connection(n);
            self.connections.push(Arc::clone(&conn));
            self.hub.join(&self.id, conn).await.unwrap()
        }

        fn message(&self, seq: u64) {
            self.dispatch_message(seq, None);
        }

        /// A message whose send was received `late` ago.
        fn late_message(&self, seq: u64, late: Duration) {
            let received = crate::chat::unix_micros() - late.as_micros() as i64;
            self.dispatch_message(seq, Some(received));
        }

        fn dispatch_message(&self, seq: u64, received_at_us: Option<i64>) {
            self.hub.dispatch(&Event::Message(WireMessage {
                room_id: "r".into(),
                id: format!("m{seq}"),
                seq,
                user: user("u0"),
                body: format!("body {seq}"),
                client_id: None,
                created_at: 0,
                deleted: false,
                received_at_us,
            }));
        }

        fn typing(&self, from: &str) {
            self.hub.dispatch(&Event::Typing {
                room_id: "r".into(),
                user: user(from),
            });
        }

        /// What each connection was handed since the last look: message
        /// bodies, and `typing` for typing notices.
        fn received(&self) -> Vec<Vec<String>> {
            received(&self.connections)
        }
    }

    /// A migrated SQLite store in a directory of its own.
    async fn sqlite_store() -> (SqliteStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("chat.db").display());
        let store = SqliteStore::connect(&url).await.unwrap();
        store.migrate().await.unwrap();
        (store, dir)
    }

    /// A hub whose rooms of `min_connections` or more batch once their
    /// messages arrive `lag` late. Gaps are filled only when a test asks
    /// (`catch_up`).
    fn hub_on(store: Arc<dyn Store>, min_connections: usize, lag: Duration) -> Arc<Hub> {
        let coalescing = Coalescing {
            min_connections,
            linger: LINGER,
            lag,
        };
        let gap_wait = Duration::from_secs(3600);
        Hub::new(store, Arc::new(LocalBus), gap_wait, coalescing)
    }

    /// User `u{n}`'s connection.
    fn connection(n: usize) -> Arc<Connection> {
        Arc::new(Connection {
            id: n as u64,
            user_id: UserId::parse(&format!("u{n}")).unwrap(),
            outbox: Outbox::new(64),
            closer: Closer::default(),
        })
    }

    /// What each connection was handed since the last look: message
    /// bodies, and `typing` for typing notices.
    fn received(connections: &[Arc<Connection>]) -> Vec<Vec<String>> {
        connections
            .iter()
            .map(|conn| {
                let mut seen = Vec::new();
                conn.outbox.take(usize::MAX, |frame| {
                    let value: serde_json::Value = serde_json::from_str(frame.as_str()).unwrap();
                    seen.push(match value["type"].as_str().unwrap() {
                        "message" => value["body"].as_str().unwrap().to_owned(),
                        other => other.to_owned(),
                    });
                });
                seen
            })
            .collect()
    }

    fn user(id: &str) -> WireUser {
        WireUser {
            id: id.into(),
            name: id.to_uppercase(),
        }
    }

    fn each(connections: usize, frames: &[&str]) -> Vec<Vec<String>> {
        let frames: Vec<String> = frames.iter().map(|f| f.to_string()).collect();
        vec![frames; connections]
    }

    /// Lets the runtime run whatever the last time step woke.
    async fn advance(by: Duration) {
        tokio::time::advance(by).await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_busy_big_room_holds_what_follows_a_fan_out_and_sends_it_together_in_order() {
        let room = Room::new(3, 3, ALWAYS).await;
        tokio::time::pause();

        room.message(1);
        assert_eq!(
            room.received(),
            each(3, &["body 1"]),
            "the first goes at once"
        );

        room.message(2);
        room.typing("u1");
        room.message(3);
        advance(LINGER - Duration::from_millis(1)).await;
        assert_eq!(room.received(), each(3, &[]), "held until the linger ends");

        advance(Duration::from_millis(2)).await;
        let mut expected = each(3, &["body 2", "typing", "body 3"]);
        expected[1] = vec!["body 2".into(), "body 3".into()]; // u1 typed
        assert_eq!(room.received(), expected);

        advance(LINGER * 2).await;
        room.message(4);
        assert_eq!(
            room.received(),
            each(3, &["body 4"]),
            "after a pause, at once again"
        );
    }

    #[tokio::test]
    async fn a_big_room_holds_nothing_while_its_messages_arrive_on_time() {
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let _recording = metrics::set_default_local_recorder(&recorder);
        let lag = Duration::from_millis(5);
        let room = Room::new(3, 3, lag).await;
        tokio::time::pause();
        room.late_message(1, Duration::ZERO);
        room.late_message(2, Duration::from_millis(1));
        room.typing("u1");
        let mut expected = each(3, &["body 1", "body 2", "typing"]);
        expected[1].pop();
        assert_eq!(room.received(), expected, "all at once");
        assert_eq!(counter(&snapshotter, "chat_fanout_held_total"), None);

        // A late message shows the pod is behind: the room batches, until
        // its messages have been on time for a while.
        room.late_message(3, lag * 3);
        room.late_message(4, Duration::ZERO);
        assert_eq!(room.received(), each(3, &[]), "held");
        advance(LINGER + Duration::from_millis(1)).await;
        assert_eq!(room.received(), each(3, &["body 3", "body 4"]));
        room.late_message(5, Duration::ZERO);
        assert_eq!(room.received(), each(3, &[]), "still catching up");
        advance(LINGER + Duration::from_millis(1)).await;
        assert_eq!(room.received(), each(3, &["body 5"]));

        advance(BEHIND_FOR).await;
        room.late_message(6, Duration::ZERO);
        room.late_message(7, Duration::ZERO);
        assert_eq!(room.received(), each(3, &["body 6", "body 7"]), "caught up");
        assert_eq!(counter(&snapshotter, "chat_fanout_held_total"), Some(3));
    }

    #[tokio::test]
    async fn a_room_shrinking_while_frames_are_held_keeps_their_order() {
        let room = Room::new(3, 3, ALWAYS).await;
        tokio::time::pause();
        room.message(1);
        room.message(2);
        room.hub.leave(&room.id, 2);
        room.message(3);
        assert_eq!(room.received(), each(3, &["body 1"]), "2 and 3 held");
        advance(LINGER * 2).await;
        let mut expected = each(3, &["body 2", "body 3"]);
        expected[2] = Vec::new(); // it left
        assert_eq!(room.received(), expected);
    }

    #[tokio::test]
    async fn catching_up_counts_as_filled_only_what_the_bus_had_not_brought() {
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let _recording = metrics::set_default_local_recorder(&recorder);
        let room = Room::new(usize::MAX, 1, ALWAYS).await;
        for n in 1..=3 {
            let message = new_message("r", "u0", &format!("stored {n}"), None);
            room.hub.store.append(message).await.unwrap();
        }
        // The bus brought the third message but lost the first two.
        room.message(3);
        room.hub.catch_up().await;

        assert_eq!(
            room.received(),
            each(1, &["stored 1", "stored 2", "body 3"])
        );
        assert_eq!(counter(&snapshotter, "chat_gap_fills_total"), Some(2));
    }

    /// The periodic resync reads where every watched room's history ends
    /// in one query (not one per room) and fills each room from its own.
    #[tokio::test]
    async fn catching_up_reads_every_rooms_end_in_one_query() {
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let _recording = metrics::set_default_local_recorder(&recorder);
        let (sqlite, _dir) = sqlite_store().await;
        let store = Arc::new(MeteredStore::new(Arc::new(sqlite)));
        let hub = hub_on(store.clone(), usize::MAX, ALWAYS);
        let mut connections = Vec::new();
        for (n, id) in ["a", "b", "c"].into_iter().enumerate() {
            store.create_room(&public_room(id), &[]).await.unwrap();
            let conn = connection(n);
            connections.push(Arc::clone(&conn));
            hub.join(&RoomId::parse(id).unwrap(), conn).await.unwrap();
        }
        // Stored, but their bus events were lost.
        for (room, body) in [("a", "a1"), ("c", "c1"), ("a", "a2")] {
            store
                .append(new_message(room, "u0", body, None))
                .await
                .unwrap();
        }
        // Each snapshot takes the histogram values recorded since the last.
        let queries = || {
            let mut count = std::collections::HashMap::<String, usize>::new();
            for (key, .., value) in snapshotter.snapshot().into_vec() {
                if key.key().name() != "chat_db_query_seconds" {
                    continue;
                }
                let metrics_util::debugging::DebugValue::Histogram(values) = value else {
                    panic!("not a histogram: {value:?}");
                };
                for label in key.key().labels().filter(|_| !values.is_empty()) {
                    *count.entry(label.value().to_owned()).or_default() += values.len();
                }
            }
            count
        };
        assert_eq!(queries()["last_seq"], 3, "one per room joined");
        hub.catch_up().await;

        assert_eq!(
            received(&connections),
            [vec!["a1", "a2"], vec![], vec!["c1"]]
        );
        let queries = queries();
        assert_eq!(queries.get("last_seqs"), Some(&1));
        assert_eq!(queries.get("last_seq"), None, "no per-room query");
    }

    /// A counter's value as recorded, if it was ever touched.
    fn counter(snapshotter: &metrics_util::debugging::Snapshotter, name: &str) -> Option<u64> {
        snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .find(|(key, ..)| key.key().name() == name)
            .map(|(.., value)| match value {
                metrics_util::debugging::DebugValue::Counter(n) => n,
                other => panic!("{name} is not a counter: {other:?}"),
            })
    }

    #[tokio::test]
    async fn a_small_room_never_holds_anything() {
        let room = Room::new(3, 2, ALWAYS).await;
        tokio::time::pause();
        room.message(1);
        room.message(2);
        assert_eq!(room.received(), each(2, &["body 1", "body 2"]));
    }

    #[tokio::test]
    async fn a_connection_joining_while_frames_are_held_gets_each_message_once() {
        let mut room = Room::new(3, 3, ALWAYS).await;
        tokio::time::pause();
        room.message(1);
        room.message(2);
        assert_eq!(room.received(), each(3, &["body 1"]));

        // Message 2 is held; the newcomer's history must include it, and
        // the others must have it by then.
        assert_eq!(room.join(3).await, 2);
        let mut expected = each(4, &["body 2"]);
        expected[3] = Vec::new();
        assert_eq!(room.received(), expected);

        advance(LINGER * 2).await;
        assert_eq!(room.received(), each(4, &[]), "nothing is sent twice");
        room.message(3);
        advance(LINGER * 2).await;
        assert_eq!(room.received(), each(4, &["body 3"]));
    }
}
