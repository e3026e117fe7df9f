//! Who is connected to which room, across every instance.
//!
//! Presence is counted per connection and reported per user: `connect`
//! answers whether this is the user's first connection to the room (the
//! caller then announces `join`), `disconnect` whether it was the last
//! (`leave`). Connection keys are `<instance id>:<n>`, unique across
//! instances. Implementations: [`memory`] (one process) and [`redis`]
//! (every instance sharing one Redis; killed instances are swept).

pub mod memory;
pub mod redis;

use async_trait::async_trait;

use crate::{
    domain::{RoomId, User, UserId},
    error::ChatError,
};

/// Identifies one connection, unique across instances.
pub type ConnectionKey = str;

#[async_trait]
pub trait Presence: Send + Sync + 'static {
    /// Records a connection; `true` when the user had none in the room.
    async fn connect(
        &self,
        room: &RoomId,
        user: &User,
        conn: &ConnectionKey,
    ) -> Result<bool, ChatError>;

    /// Forgets a connection; `true` when it was the user's last in the room.
    async fn disconnect(
        &self,
        room: &RoomId,
        user: &UserId,
        conn: &ConnectionKey,
    ) -> Result<bool, ChatError>;

    /// The distinct users connected to the room now, by id.
    async fn list(&self, room: &RoomId) -> Result<Vec<User>, ChatError>;

    /// Called periodically: tells the other instances this one is alive (and
    /// restores this instance's entries if the backend lost them).
    async fn keep_alive(&self) -> Result<(), ChatError> {
        Ok(())
    }

    /// Called periodically: forgets the connections of instances that
    /// stopped keeping alive (killed pods) and returns, for each room, the
    /// users who thereby lost their last connection (to announce `leave`).
    async fn sweep(&self) -> Result<Vec<(RoomId, User)>, ChatError> {
        Ok(Vec::new())
    }
}
