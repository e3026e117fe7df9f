//! Store timing: wraps any [`Store`] and records each operation's duration
//! (`chat_db_query_seconds{op}`) and failures (`chat_db_errors_total{op}`).
//! The label is the operation name, from a fixed set.

use std::{future::Future, sync::Arc, time::Instant};

use async_trait::async_trait;

use super::{Appended, Member, NewMessage, Page, Store};
use crate::{
    domain::{Message, Room, RoomId, User, UserId},
    error::ChatError,
};

pub struct MeteredStore {
    inner: Arc<dyn Store>,
}

impl MeteredStore {
    pub fn new(inner: Arc<dyn Store>) -> Self {
        Self { inner }
    }
}

async fn timed<T>(
    op: &'static str,
    call: impl Future<Output = Result<T, ChatError>>,
) -> Result<T, ChatError> {
    let seconds = metrics::histogram!("chat_db_query_seconds", "op" => op);
    measured(op, &seconds, call, Result::is_err).await
}

/// Times `call` into `seconds` (`chat_db_query_seconds{op}`), and counts
/// it as an error when `failed` says so.
async fn measured<T>(
    op: &'static str,
    seconds: &metrics::Histogram,
    call: impl Future<Output = T>,
    failed: impl FnOnce(&T) -> bool,
) -> T {
    let started = Instant::now();
    let result = call.await;
    seconds.record(started.elapsed().as_secs_f64());
    if failed(&result) {
        metrics::counter!("chat_db_errors_total", "op" => op).increment(1);
    }
    result
}

#[async_trait]
impl Store for MeteredStore {
    async fn migrate(&self) -> Result<(), ChatError> {
        timed("migrate", self.inner.migrate()).await
    }

    async fn ping(&self) -> Result<(), ChatError> {
        timed("ping", self.inner.ping()).await
    }

    async fn room(&self, id: &RoomId) -> Result<Option<Room>, ChatError> {
        timed("room", self.inner.room(id)).await
    }

    async fn create_room(&self, room: &Room, members: &[UserId]) -> Result<(), ChatError> {
        timed("create_room", self.inner.create_room(room, members)).await
    }

    async fn ensure_direct_room(
        &self,
        room: &Room,
        a: &UserId,
        b: &UserId,
    ) -> Result<(Room, bool), ChatError> {
        timed(
            "ensure_direct_room",
            self.inner.ensure_direct_room(room, a, b),
        )
        .await
    }

    async fn rooms_for(&self, user: &UserId) -> Result<Vec<Room>, ChatError> {
        timed("rooms_for", self.inner.rooms_for(user)).await
    }

    async fn is_member(&self, room: &RoomId, user: &UserId) -> Result<bool, ChatError> {
        timed("is_member", self.inner.is_member(room, user)).await
    }

    async fn members(&self, room: &RoomId) -> Result<Vec<Member>, ChatError> {
        timed("members", self.inner.members(room)).await
    }

    async fn add_member(&self, room: &RoomId, user: &UserId) -> Result<(), ChatError> {
        timed("add_member", self.inner.add_member(room, user)).await
    }

    async fn remove_member(&self, room: &RoomId, user: &UserId) -> Result<bool, ChatError> {
        timed("remove_member", self.inner.remove_member(room, user)).await
    }

    async fn remember_user(&self, user: &User) -> Result<(), ChatError> {
        timed("remember_user", self.inner.remember_user(user)).await
    }

    /// One `append` operation per call, however many messages it stores;
    /// an error when any of them failed.
    async fn append_all(&self, messages: Vec<NewMessage>) -> Vec<Result<Appended, ChatError>> {
        // Once per send: a registered handle, not a lookup by name.
        let seconds = &crate::telemetry::per_message().append_seconds;
        let call = self.inner.append_all(messages);
        measured("append", seconds, call, |results| {
            results.iter().any(Result::is_err)
        })
        .await
    }

    async fn last_seq(&self, room: &RoomId) -> Result<u64, ChatError> {
        timed("last_seq", self.inner.last_seq(room)).await
    }

    async fn last_seqs(&self, rooms: &[RoomId]) -> Result<Vec<Option<u64>>, ChatError> {
        timed("last_seqs", self.inner.last_seqs(rooms)).await
    }

    async fn history(
        &self,
        room: &RoomId,
        page: Page,
        limit: u32,
    ) -> Result<Vec<Message>, ChatError> {
        timed("history", self.inner.history(room, page, limit)).await
    }

    async fn delete_message(
        &self,
        room: &RoomId,
        id: &str,
    ) -> Result<Option<(Message, bool)>, ChatError> {
        timed("delete_message", self.inner.delete_message(room, id)).await
    }

    async fn message(&self, room: &RoomId, id: &str) -> Result<Option<Message>, ChatError> {
        timed("message", self.inner.message(room, id)).await
    }
}
