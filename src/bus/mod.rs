//! Fan-out between instances.
//!
//! Every event is first delivered to this instance's own connections by the
//! [`Hub`](crate::hub::Hub) and then published on the bus for the other
//! instances. A bus therefore never needs to echo an instance's own events
//! back, and chat keeps working on one pod while the bus is down.
//!
//! What a bus guarantees (and what it does not):
//! - `publish` is best effort: an event may be lost (a dropped connection, a
//!   restart). Sequenced events (messages) are recovered by the hub from the
//!   store when it notices a gap; ephemeral ones (typing, join/leave) are not.
//! - Events of one room published by one instance arrive in publish order;
//!   events of one room from different instances may interleave in any order.
//! - An instance receives only events of rooms it [`watch`](Bus::watch)es.
//!
//! Implementations: [`local`] (one process: nothing to publish to) and
//! [`redis`] (Redis Pub/Sub between pods).

pub mod local;
pub mod redis;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::{
    domain::{Message, RoomId, User, UserId},
    error::ChatError,
};

/// Something that happened in a room, as it travels between instances.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Event {
    /// A stored message, ordered by `seq`. A tombstone (`deleted`) only
    /// travels this way when the hub fills a gap from the store.
    Message(WireMessage),
    /// A message became a tombstone (not part of the `seq` order).
    Deleted {
        room_id: String,
        id: String,
        seq: u64,
    },
    Typing {
        room_id: String,
        user: WireUser,
    },
    Join {
        room_id: String,
        user: WireUser,
    },
    Leave {
        room_id: String,
        user: WireUser,
    },
    /// The user lost access: close their connections to the room with 4003.
    Revoked {
        room_id: String,
        user_id: String,
    },
}

/// Instance-to-instance form of a user.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WireUser {
    pub id: String,
    pub name: String,
}

impl From<&User> for WireUser {
    fn from(user: &User) -> Self {
        Self {
            id: user.id.to_string(),
            name: user.name.clone(),
        }
    }
}

/// Instance-to-instance form of a message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireMessage {
    pub room_id: String,
    pub id: String,
    pub seq: u64,
    pub user: WireUser,
    pub body: String,
    pub client_id: Option<String>,
    /// Milliseconds since the epoch.
    pub created_at: i64,
    #[serde(default)]
    pub deleted: bool,
    /// When the server received the send (µs since the epoch), for the
    /// send-to-delivery latency; absent when read back from the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_at_us: Option<i64>,
}

impl From<&Message> for WireMessage {
    fn from(m: &Message) -> Self {
        Self {
            room_id: m.room_id.to_string(),
            id: m.id.clone(),
            seq: m.seq,
            user: WireUser::from(&m.user),
            body: m.body.clone(),
            client_id: m.client_id.as_ref().map(|c| c.as_str().to_owned()),
            created_at: crate::store::to_millis(m.created_at),
            deleted: m.deleted,
            received_at_us: None,
        }
    }
}

impl Event {
    pub fn room_id(&self) -> &str {
        match self {
            Self::Message(m) => &m.room_id,
            Self::Deleted { room_id, .. }
            | Self::Typing { room_id, .. }
            | Self::Join { room_id, .. }
            | Self::Leave { room_id, .. }
            | Self::Revoked { room_id, .. } => room_id,
        }
    }

    pub fn revoked(room: &RoomId, user: &UserId) -> Self {
        Self::Revoked {
            room_id: room.to_string(),
            user_id: user.to_string(),
        }
    }
}

/// What a bus hands to the hub.
#[derive(Debug)]
pub enum Inbound {
    /// An event from another instance, with the W3C `traceparent` of the
    /// operation that made it (so its fan-out joins the sender's trace).
    Event {
        event: Box<Event>,
        traceparent: Option<String>,
    },
    /// Events may have been lost (the bus reconnected): compare every
    /// watched room with the store and deliver what is missing.
    Resync,
}

#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Sends an event to the other instances watching its room.
    async fn publish(&self, event: &Event) -> Result<(), ChatError>;

    /// Starts delivering the room's events from other instances to the hub.
    async fn watch(&self, room: &RoomId) -> Result<(), ChatError>;

    /// Stops delivering the room's events (no local connection left).
    async fn unwatch(&self, room: &RoomId);

    /// Whether the bus is usable now (readiness).
    async fn ping(&self) -> Result<(), ChatError>;
}
