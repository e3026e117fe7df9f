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
//!   connection's bounded outbound queue. A connection whose queue is full is
//!   closed as too slow (4008) rather than slowing the room down.
//!
//! Locks: the room map and each room's state are std mutexes, held only for
//! map and queue operations, never across an await.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use tokio::sync::{Notify, OnceCell};
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

struct HubRoom {
    /// Set once the bus watches the room and `delivered` is initialised.
    ready: OnceCell<()>,
    state: Mutex<RoomState>,
}

#[derive(Default)]
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
}

/// Rows fetched per store read while filling a gap.
const GAP_FILL_BATCH: u32 = 500;

impl Hub {
    pub fn new(store: Arc<dyn Store>, bus: Arc<dyn Bus>, gap_wait: Duration) -> Arc<Self> {
        Arc::new(Self {
            store,
            bus,
            rooms: Mutex::new(HashMap::new()),
            watching: tokio::sync::Mutex::new(()),
            gap_wait,
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
                    .or_insert_with(|| {
                        Arc::new(HubRoom {
                            ready: OnceCell::new(),
                            state: Mutex::new(RoomState::default()),
                        })
                    }),
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
            Event::Message(message) => self.ingest(&room, room_id, message),
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
                Self::broadcast(&mut room.state.lock().expect("room lock"), &frame, None);
            }
            Event::Typing { room_id, user } => {
                let frame = ServerFrame::Typing { room_id, user };
                Self::broadcast(
                    &mut room.state.lock().expect("room lock"),
                    &frame,
                    Some(&user.id),
                );
            }
            Event::Join { room_id, user } => {
                let frame = ServerFrame::Join { room_id, user };
                Self::broadcast(&mut room.state.lock().expect("room lock"), &frame, None);
            }
            Event::Leave { room_id, user } => {
                let frame = ServerFrame::Leave { room_id, user };
                Self::broadcast(&mut room.state.lock().expect("room lock"), &frame, None);
            }
        }
    }

    /// Puts a message into its room's order, delivering whatever became
    /// deliverable, and starts filling the gap if one is left.
    /// The message is only copied when it has to wait (out of order, or the
    /// room is still initialising); the usual next-in-line message goes out
    /// straight from the caller's borrow.
    fn ingest(self: &Arc<Self>, room: &Arc<HubRoom>, room_id: RoomId, message: &WireMessage) {
        let mut state = room.state.lock().expect("room lock");
        if state.initialized && message.seq <= state.delivered {
            return; // already delivered (a retry, or our own event echoed)
        }
        if state.initialized && message.seq == state.delivered + 1 {
            Self::deliver(&mut state, message);
        } else {
            state.pending.insert(message.seq, message.clone());
            if !state.initialized {
                return; // init_room drains once it knows where history ends
            }
        }
        Self::drain(&mut state);
        if !state.pending.is_empty() && !state.filling {
            state.filling = true;
            let hub = Arc::clone(self);
            let room = Arc::clone(room);
            tokio::spawn(async move { hub.fill_gaps(room_id, room).await });
        }
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
        let recipients = Self::broadcast(state, &ServerFrame::for_message(message), None);
        metrics::counter!("chat_deliveries_total").increment(recipients);
        if let Some(received) = message.received_at_us {
            let latency = (crate::chat::unix_micros() - received).max(0) as f64 / 1e6;
            metrics::histogram!("chat_send_delivery_seconds").record(latency);
        }
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

    /// Sends one frame to every connection of the room (but the skipped
    /// user's), serialised once. Full queues close their connection (4008).
    /// Returns how many connections got it.
    fn broadcast(state: &mut RoomState, frame: &ServerFrame<'_>, skip_user: Option<&str>) -> u64 {
        if state.connections.is_empty() {
            return 0;
        }
        let mut recipients = 0;
        // The one allocation of the fan-out: every queue shares these bytes.
        let bytes = Utf8Bytes::from(frame.to_json());
        state.connections.retain(|conn| {
            if skip_user.is_some_and(|u| u == conn.user_id.as_str()) {
                return true;
            }
            match conn.outbox.push(bytes.clone()) {
                Pushed::Queued => {
                    recipients += 1;
                    true
                }
                Pushed::Full => {
                    conn.closer.close(CloseReason::TooSlow);
                    false
                }
                Pushed::Closed => false,
            }
        });
        recipients
    }

    /// Checks every watched room against the store and fills what is
    /// missing (after a bus outage, when events may have been lost).
    pub async fn catch_up(self: &Arc<Self>) {
        let rooms: Vec<(RoomId, Arc<HubRoom>)> = self
            .rooms
            .lock()
            .expect("hub lock")
            .iter()
            .map(|(id, room)| (id.clone(), Arc::clone(room)))
            .collect();
        for (room_id, room) in rooms {
            let Ok(last) = self.store.last_seq(&room_id).await else {
                continue;
            };
            loop {
                let delivered = room.state.lock().expect("room lock").delivered;
                if last <= delivered {
                    break;
                }
                let page = Page::Oldest {
                    after: delivered,
                    before: Some(last + 1),
                };
                match self.store.history(&room_id, page, GAP_FILL_BATCH).await {
                    Ok(messages) if !messages.is_empty() => {
                        metrics::counter!("chat_gap_fills_total").increment(messages.len() as u64);
                        for message in &messages {
                            self.ingest(&room, room_id.clone(), &WireMessage::from(message));
                        }
                    }
                    _ => break,
                }
            }
        }
    }
}
