//! The chat layer: the rules of the service, shared by the WebSocket and
//! REST edges. It validates input, checks who may do what, applies rate
//! limits, stores, and announces what happened (hub first, then bus).
//!
//! It only talks to the backend traits, never to a concrete backend.

use std::sync::Arc;

use time::OffsetDateTime;
use tracing::Instrument;

use crate::{
    bus::{Bus, Event, WireMessage, WireUser},
    config::ServeConfig,
    domain::{
        Caller, ClientId, IdShape, Message, MessageBody, Role, Room, RoomId, RoomKind, User,
        UserId, clean_name,
    },
    error::ChatError,
    hub::Hub,
    limiter::{Limit, Limiter, enforce, enforce_all},
    presence::Presence,
    store::{Appended, Member, NewMessage, Page, Store},
};

/// The configured rate limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub send: Limit,
    pub connect: Limit,
    pub rest: Limit,
    pub typing: Limit,
}

impl Limits {
    pub fn from_config(config: &ServeConfig) -> Self {
        Self {
            send: Limit {
                limit: config.send_rate_limit,
                window: config.send_rate_window,
            },
            connect: Limit {
                limit: config.connect_rate_limit,
                window: config.connect_rate_window,
            },
            rest: Limit {
                limit: config.rest_rate_limit,
                window: config.rest_rate_window,
            },
            typing: Limit {
                limit: 1,
                window: config.typing_interval,
            },
        }
    }
}

/// Which edge a send came through (a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Ws,
    Rest,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ws => "ws",
            Self::Rest => "rest",
        }
    }
}

/// Wall-clock microseconds since the epoch (comparable across pods).
pub fn unix_micros() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000) as i64
}

/// One message of a send: its body as received and its `client_id`.
pub struct Outgoing<'a> {
    pub body: &'a str,
    pub client_id: Option<ClientId>,
}

/// What a send did.
#[derive(Debug, Clone)]
pub struct Sent {
    pub message: Message,
    /// A retry of a `client_id` already stored: nothing new was stored or
    /// broadcast, `message` is the original.
    pub duplicate: bool,
}

/// A room to create through REST.
#[derive(Debug, Clone)]
pub struct NewRoom {
    pub id: Option<String>,
    pub name: String,
    pub private: bool,
    pub members: Vec<String>,
}

/// Longest room name, in characters.
pub const MAX_ROOM_NAME_CHARS: usize = 100;
/// Most members a room can be created with.
pub const MAX_INITIAL_MEMBERS: usize = 1000;
/// Longer than any message id the service makes (a UUID is 36 bytes).
const MAX_MESSAGE_ID_BYTES: usize = 128;

pub struct Chat {
    pub store: Arc<dyn Store>,
    pub bus: Arc<dyn Bus>,
    pub presence: Arc<dyn Presence>,
    pub limiter: Arc<dyn Limiter>,
    pub hub: Arc<Hub>,
    pub limits: Limits,
    pub max_message_chars: usize,
    pub replay_limit: u32,
}

impl Chat {
    /// Finds a room the caller may use. Connecting to a direct room one is
    /// part of creates it (`create_direct`).
    pub async fn open_room(
        &self,
        caller: &Caller,
        room_id: &RoomId,
        create_direct: bool,
    ) -> Result<Room, ChatError> {
        let shape = room_id.shape()?;
        if let IdShape::Direct(a, b) = &shape {
            let party = caller.id() == a || caller.id() == b;
            if !party && !caller.is_privileged() {
                return Err(ChatError::forbidden());
            }
            if party && create_direct {
                return self.direct_room_of(a, b).await.map(|(room, _)| room);
            }
        }
        let room = self
            .store
            .room(room_id)
            .await?
            .ok_or_else(ChatError::room_not_found)?;
        self.check_access(caller, &room).await?;
        Ok(room)
    }

    /// Read and write access: global and public rooms are open to everyone;
    /// private and direct rooms to their members, `admin` and `service`.
    pub async fn check_access(&self, caller: &Caller, room: &Room) -> Result<(), ChatError> {
        match room.kind {
            RoomKind::Global | RoomKind::Public => Ok(()),
            RoomKind::Private | RoomKind::Direct => {
                if caller.is_privileged() || self.store.is_member(&room.id, caller.id()).await? {
                    Ok(())
                } else {
                    Err(ChatError::forbidden())
                }
            }
        }
    }

    async fn direct_room_of(&self, a: &UserId, b: &UserId) -> Result<(Room, bool), ChatError> {
        let room = Room {
            id: RoomId::direct(a, b)?,
            kind: RoomKind::Direct,
            name: format!("{a} & {b}"),
            owner_id: None,
            created_at: now_millis(),
        };
        self.store.ensure_direct_room(&room, a, b).await
    }

    /// The direct room between the caller and another user (created if
    /// needed); the flag says whether it was created now.
    pub async fn direct_room(
        &self,
        caller: &Caller,
        other: &str,
    ) -> Result<(Room, bool), ChatError> {
        let other = UserId::parse(other)?;
        self.direct_room_of(caller.id(), &other).await
    }

    /// Sends a message to a room the caller already opened: validates, rate
    /// limits, stores (idempotently), announces. The whole per-message path
    /// of both edges goes through here and [`Self::send_all`]; it runs in
    /// the caller's `chat.send` span, with a child span per step.
    pub async fn send(
        &self,
        caller: &Caller,
        room: &Room,
        body: &str,
        client_id: Option<ClientId>,
        transport: Transport,
    ) -> Result<Sent, ChatError> {
        let outgoing = Outgoing { body, client_id };
        let mut results = self.send_all(caller, room, vec![outgoing], transport).await;
        results.pop().unwrap_or_else(|| {
            Err(ChatError::Internal(anyhow::anyhow!(
                "a send without a result"
            )))
        })
    }

    /// Sends messages of one caller to one room, in order (a connection's
    /// sends that arrived together), each as [`Self::send`] would: each is
    /// validated and rate limited on its own, the limit deciding them in
    /// their order; access is checked once for them all; those admitted
    /// are stored in one transaction in their order, then announced in it.
    /// One result per message, in the same order.
    pub async fn send_all(
        &self,
        caller: &Caller,
        room: &Room,
        sends: Vec<Outgoing<'_>>,
        transport: Transport,
    ) -> Vec<Result<Sent, ChatError>> {
        let received = std::time::Instant::now();
        let received_at_us = unix_micros();
        let results = self.send_steps(caller, room, sends, received_at_us).await;
        let took = received.elapsed().as_secs_f64();
        let handles = crate::telemetry::per_message();
        let counted = match transport {
            Transport::Ws => &handles.ws,
            Transport::Rest => &handles.rest,
        };
        for result in &results {
            match result {
                Ok(sent) if sent.duplicate => counted.duplicate.increment(1),
                Ok(_) => counted.accepted.increment(1),
                Err(err) => {
                    let reason = err.code().as_str();
                    metrics::counter!("chat_messages_refused_total", "transport" => transport.as_str(), "reason" => reason)
                        .increment(1);
                }
            }
            counted.ack_seconds.record(took);
        }
        results
    }

    async fn send_steps(
        &self,
        caller: &Caller,
        room: &Room,
        sends: Vec<Outgoing<'_>>,
        received_at_us: i64,
    ) -> Vec<Result<Sent, ChatError>> {
        let max_chars = self.max_message_chars;
        let validated = tracing::info_span!("chat.validate").in_scope(|| {
            sends
                .into_iter()
                .map(|send| {
                    MessageBody::parse(send.body, max_chars).map(|body| (body, send.client_id))
                })
                .collect()
        });
        let admitted = self
            .admit(caller, room, validated)
            .instrument(tracing::info_span!("chat.rate_limit"))
            .await;
        // Each send's place: refused here, or the next of the appended.
        let mut refused = Vec::with_capacity(admitted.len());
        let mut new = Vec::with_capacity(admitted.len());
        for outcome in admitted {
            match outcome {
                Ok(message) => {
                    new.push(message);
                    refused.push(None);
                }
                Err(err) => refused.push(Some(err)),
            }
        }
        let appended = if new.is_empty() {
            Vec::new()
        } else {
            self.store
                .append_all(new)
                .instrument(tracing::info_span!("chat.store"))
                .await
        };
        let mut appended = appended.into_iter();
        let mut results = Vec::with_capacity(refused.len());
        for refusal in refused {
            let result = match refusal {
                Some(err) => Err(err),
                None => match appended.next() {
                    Some(Ok(Appended::Stored(message))) => {
                        let mut wire = WireMessage::from(&message);
                        wire.received_at_us = Some(received_at_us);
                        self.announce(Event::Message(wire)).await;
                        Ok(Sent {
                            message,
                            duplicate: false,
                        })
                    }
                    Some(Ok(Appended::Duplicate(message))) => Ok(Sent {
                        message,
                        duplicate: true,
                    }),
                    Some(Err(err)) => Err(err),
                    None => Err(ChatError::Internal(anyhow::anyhow!(
                        "the store answered fewer results than messages"
                    ))),
                },
            };
            results.push(result);
        }
        results
    }

    /// Access, checked once, and the send limit, per message in order, for
    /// the valid ones; what passes becomes a message to store.
    async fn admit(
        &self,
        caller: &Caller,
        room: &Room,
        validated: Vec<Result<(MessageBody, Option<ClientId>), ChatError>>,
    ) -> Vec<Result<NewMessage, ChatError>> {
        let valid = validated.iter().filter(|v| v.is_ok()).count();
        // Access can be revoked while a socket is open: check it per send
        // (once for sends that arrived together).
        let verdicts = if valid == 0 {
            Vec::new()
        } else {
            match self.check_access(caller, room).await {
                Ok(()) => {
                    let key = format!("send:{}", caller.id());
                    enforce_all(&*self.limiter, &key, self.limits.send, valid).await
                }
                Err(err) => err.for_each(valid),
            }
        };
        let mut verdicts = verdicts.into_iter();
        validated
            .into_iter()
            .map(|valid| {
                let (body, client_id) = valid?;
                verdicts.next().unwrap_or_else(|| {
                    Err(ChatError::Internal(anyhow::anyhow!(
                        "the limiter decided fewer hits than asked"
                    )))
                })?;
                Ok(NewMessage {
                    room_id: room.id.clone(),
                    id: uuid::Uuid::now_v7().to_string(),
                    user: caller.user.clone(),
                    body: body.into_string(),
                    client_id,
                    created_at: now_millis(),
                })
            })
            .collect()
    }

    /// Delivers an event here, then tells the other instances. A bus failure
    /// is counted, not returned: what was stored stays stored, this
    /// instance's connections have it, and other instances recover messages
    /// from the store. The Redis bus only queues the event here, so this
    /// does not wait for Redis; its sender warns when publishing fails, so a
    /// refused event (a full queue, which follows from that) is logged at
    /// debug level only.
    pub async fn announce(&self, event: Event) {
        tracing::info_span!("hub.fan_out").in_scope(|| self.hub.dispatch(&event));
        let published = self
            .bus
            .publish(&event)
            .instrument(tracing::info_span!("chat.publish"))
            .await;
        if let Err(err) = published {
            metrics::counter!("chat_bus_publish_errors_total").increment(1);
            tracing::debug!(error = %err, "could not publish an event to the bus");
        }
    }

    /// A `typing` notice, at most one per user per room per interval; extra
    /// ones are dropped silently.
    pub async fn typing(&self, caller: &Caller, room: &Room) -> Result<(), ChatError> {
        let key = format!("typing:{}:{}", room.id, caller.id());
        if enforce(&*self.limiter, &key, self.limits.typing)
            .await
            .is_ok()
        {
            self.announce(Event::Typing {
                room_id: room.id.to_string(),
                user: WireUser::from(&caller.user),
            })
            .await;
        }
        Ok(())
    }

    /// Records a new connection; the user's first one announces `join`.
    pub async fn connected(&self, room: &RoomId, user: &User, conn: &str) -> Result<(), ChatError> {
        if self.presence.connect(room, user, conn).await? {
            self.announce(Event::Join {
                room_id: room.to_string(),
                user: WireUser::from(user),
            })
            .await;
        }
        Ok(())
    }

    /// Forgets a connection; the user's last one announces `leave`.
    pub async fn disconnected(&self, room: &RoomId, user: &User, conn: &str) {
        match self.presence.disconnect(room, &user.id, conn).await {
            Ok(true) => {
                self.announce(Event::Leave {
                    room_id: room.to_string(),
                    user: WireUser::from(user),
                })
                .await;
            }
            Ok(false) => {}
            Err(err) => tracing::warn!(error = %err, "could not record a disconnection"),
        }
    }

    pub async fn rooms_for(&self, caller: &Caller) -> Result<Vec<Room>, ChatError> {
        self.store.rooms_for(caller.id()).await
    }

    pub async fn create_room(&self, caller: &Caller, new: NewRoom) -> Result<Room, ChatError> {
        let name = clean_name_of_room(&new.name)?;
        let id = match new.id {
            Some(raw) => {
                let id = RoomId::parse(&raw)?;
                match id.shape() {
                    Ok(IdShape::Named) => id,
                    Ok(IdShape::Global) => {
                        return Err(ChatError::Conflict("room id global is taken".into()));
                    }
                    _ => {
                        return Err(ChatError::BadRequest(
                            "ids starting with dm: are reserved for direct rooms".into(),
                        ));
                    }
                }
            }
            None => RoomId::parse(&format!("r-{}", uuid::Uuid::now_v7().simple()))?,
        };
        if new.members.len() > MAX_INITIAL_MEMBERS {
            return Err(ChatError::BadRequest(format!(
                "a room is created with at most {MAX_INITIAL_MEMBERS} members"
            )));
        }
        let mut members = vec![caller.id().clone()];
        for raw in &new.members {
            let member = UserId::parse(raw)?;
            if !members.contains(&member) {
                members.push(member);
            }
        }
        let room = Room {
            id,
            kind: if new.private {
                RoomKind::Private
            } else {
                RoomKind::Public
            },
            name,
            owner_id: Some(caller.id().clone()),
            created_at: now_millis(),
        };
        self.store.remember_user(&caller.user).await?;
        self.store.create_room(&room, &members).await?;
        Ok(room)
    }

    pub async fn members(
        &self,
        caller: &Caller,
        room_id: &RoomId,
    ) -> Result<Vec<Member>, ChatError> {
        let room = self.open_room(caller, room_id, false).await?;
        self.store.members(&room.id).await
    }

    /// Checks that the caller may change the room's members: its owner,
    /// `admin` or `service`, and only in public and private rooms.
    async fn open_for_membership(
        &self,
        caller: &Caller,
        room_id: &RoomId,
        user: &str,
    ) -> Result<(Room, UserId), ChatError> {
        let room = self.open_room(caller, room_id, false).await?;
        let owner = room.owner_id.as_ref() == Some(caller.id());
        if !owner && !caller.is_privileged() {
            return Err(ChatError::Forbidden(
                "only the room's owner may change its members".into(),
            ));
        }
        if !matches!(room.kind, RoomKind::Public | RoomKind::Private) {
            return Err(ChatError::BadRequest(
                "members of global and direct rooms cannot be changed".into(),
            ));
        }
        Ok((room, UserId::parse(user)?))
    }

    pub async fn add_member(
        &self,
        caller: &Caller,
        room_id: &RoomId,
        user: &str,
    ) -> Result<(), ChatError> {
        let (room, user) = self.open_for_membership(caller, room_id, user).await?;
        self.store.add_member(&room.id, &user).await
    }

    /// Removes a member; in a private room their open connections are
    /// closed with 4003 on every instance.
    pub async fn remove_member(
        &self,
        caller: &Caller,
        room_id: &RoomId,
        user: &str,
    ) -> Result<(), ChatError> {
        let (room, user) = self.open_for_membership(caller, room_id, user).await?;
        self.store.remove_member(&room.id, &user).await?;
        if room.kind == RoomKind::Private {
            self.announce(Event::revoked(&room.id, &user)).await;
        }
        Ok(())
    }

    /// A page of history and whether there is more in the same direction.
    pub async fn history(
        &self,
        caller: &Caller,
        room_id: &RoomId,
        page: Page,
        limit: u32,
    ) -> Result<(Vec<Message>, bool), ChatError> {
        let room = self.open_room(caller, room_id, false).await?;
        let mut messages = self.store.history(&room.id, page, limit + 1).await?;
        let has_more = messages.len() > limit as usize;
        messages.truncate(limit as usize);
        Ok((messages, has_more))
    }

    /// Deletes a message: its author, `moderator`, `admin` or `service`.
    pub async fn delete_message(
        &self,
        caller: &Caller,
        room_id: &RoomId,
        message_id: &str,
    ) -> Result<(), ChatError> {
        let moderator = caller.has(Role::Moderator) || caller.is_privileged();
        let room = match self.open_room(caller, room_id, false).await {
            Ok(room) => room,
            // Moderators may delete in rooms they cannot read.
            Err(ChatError::Forbidden(_)) if moderator => self
                .store
                .room(room_id)
                .await?
                .ok_or_else(ChatError::room_not_found)?,
            Err(other) => return Err(other),
        };
        let no_such_message = || ChatError::NotFound("no such message".into());
        // Ids are opaque to clients but always short and printable here; a
        // NUL byte would not even reach PostgreSQL (it refuses it in text).
        if message_id.len() > MAX_MESSAGE_ID_BYTES || message_id.contains(char::is_control) {
            return Err(no_such_message());
        }
        let message = self
            .store
            .message(&room.id, message_id)
            .await?
            .ok_or_else(no_such_message)?;
        if message.user.id != *caller.id() && !moderator {
            return Err(ChatError::Forbidden(
                "only the author or a moderator may delete a message".into(),
            ));
        }
        if let Some((tombstone, now)) = self.store.delete_message(&room.id, message_id).await?
            && now
        {
            self.announce(Event::Deleted {
                room_id: room.id.to_string(),
                id: tombstone.id,
                seq: tombstone.seq,
            })
            .await;
        }
        Ok(())
    }

    pub async fn presence(
        &self,
        caller: &Caller,
        room_id: &RoomId,
    ) -> Result<Vec<User>, ChatError> {
        let room = self.open_room(caller, room_id, false).await?;
        self.presence.list(&room.id).await
    }

    /// Counts a REST request against the caller's budget.
    pub async fn count_request(&self, caller: &Caller) -> Result<(), ChatError> {
        enforce(
            &*self.limiter,
            &format!("rest:{}", caller.id()),
            self.limits.rest,
        )
        .await
    }

    /// Counts a connection attempt from an address.
    pub async fn count_connection(&self, ip: &str) -> Result<(), ChatError> {
        enforce(&*self.limiter, &format!("conn:{ip}"), self.limits.connect).await
    }
}

fn clean_name_of_room(raw: &str) -> Result<String, ChatError> {
    let name = clean_name(raw, MAX_ROOM_NAME_CHARS);
    if name.is_empty() || raw.chars().count() > MAX_ROOM_NAME_CHARS {
        return Err(ChatError::BadRequest(format!(
            "room name must be 1..={MAX_ROOM_NAME_CHARS} characters"
        )));
    }
    Ok(name)
}

/// Now, truncated to what the store keeps (milliseconds), so that what is
/// acked and what is read back later are the same.
pub fn now_millis() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(now.nanosecond() / 1_000_000 * 1_000_000)
        .unwrap_or(now)
}
