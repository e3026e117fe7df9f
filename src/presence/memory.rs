//! Presence of a single process: a map guarded by a std mutex (held only for
//! map operations, never across an await).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Mutex,
};

use async_trait::async_trait;

use super::{ConnectionKey, Presence};
use crate::{
    domain::{RoomId, User, UserId},
    error::ChatError,
};

#[derive(Debug, Default)]
pub struct MemoryPresence {
    rooms: Mutex<HashMap<RoomId, BTreeMap<UserId, Entry>>>,
}

#[derive(Debug)]
struct Entry {
    name: String,
    connections: HashSet<String>,
}

#[async_trait]
impl Presence for MemoryPresence {
    async fn connect(
        &self,
        room: &RoomId,
        user: &User,
        conn: &ConnectionKey,
    ) -> Result<bool, ChatError> {
        let mut rooms = self.rooms.lock().expect("presence lock");
        let entry = rooms
            .entry(room.clone())
            .or_default()
            .entry(user.id.clone())
            .or_insert_with(|| Entry {
                name: user.name.clone(),
                connections: HashSet::new(),
            });
        entry.name.clone_from(&user.name);
        let first = entry.connections.is_empty();
        entry.connections.insert(conn.to_owned());
        Ok(first)
    }

    async fn disconnect(
        &self,
        room: &RoomId,
        user: &UserId,
        conn: &ConnectionKey,
    ) -> Result<bool, ChatError> {
        let mut rooms = self.rooms.lock().expect("presence lock");
        let Some(users) = rooms.get_mut(room) else {
            return Ok(false);
        };
        let Some(entry) = users.get_mut(user) else {
            return Ok(false);
        };
        let removed = entry.connections.remove(conn);
        let last = removed && entry.connections.is_empty();
        if entry.connections.is_empty() {
            users.remove(user);
            if users.is_empty() {
                rooms.remove(room);
            }
        }
        Ok(last)
    }

    async fn list(&self, room: &RoomId) -> Result<Vec<User>, ChatError> {
        let rooms = self.rooms.lock().expect("presence lock");
        Ok(rooms
            .get(room)
            .map(|users| {
                users
                    .iter()
                    .map(|(id, e)| User {
                        id: id.clone(),
                        name: e.name.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default())
    }
}
