//! REST bodies, as they appear in the OpenAPI document. Each has an explicit
//! schema name so that generated SDKs get readable types.

use std::borrow::Cow;

use poem_openapi::{
    Enum, Object,
    registry::{MetaSchema, MetaSchemaRef},
    types::{ParseError, ParseFromJSON, ParseResult, ToJSON, Type},
};
use serde_json::Value;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use crate::{
    domain::{Message, Room, RoomKind},
    protocol::format_time,
};

/// A time: RFC 3339, UTC, with milliseconds (`2026-11-27T13:00:00.123Z`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp(pub OffsetDateTime);

impl Type for Timestamp {
    const IS_REQUIRED: bool = true;
    type RawValueType = Self;
    type RawElementValueType = Self;

    fn name() -> Cow<'static, str> {
        "string_date-time".into()
    }

    fn schema_ref() -> MetaSchemaRef {
        MetaSchemaRef::Inline(Box::new(MetaSchema {
            example: Some(Value::String("2026-11-27T13:00:00.123Z".into())),
            ..MetaSchema::new_with_format("string", "date-time")
        }))
    }

    fn as_raw_value(&self) -> Option<&Self> {
        Some(self)
    }

    fn raw_element_iter<'a>(&'a self) -> Box<dyn Iterator<Item = &'a Self> + 'a> {
        Box::new(self.as_raw_value().into_iter())
    }
}

impl ParseFromJSON for Timestamp {
    fn parse_from_json(value: Option<Value>) -> ParseResult<Self> {
        match value.unwrap_or_default() {
            Value::String(text) => Ok(Self(OffsetDateTime::parse(&text, &Rfc3339)?)),
            other => Err(ParseError::expected_type(other)),
        }
    }
}

impl ToJSON for Timestamp {
    fn to_json(&self) -> Option<Value> {
        Some(Value::String(format_time(self.0)))
    }
}

/// The kind of a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum ApiRoomKind {
    Global,
    Public,
    Private,
    Direct,
}

impl From<RoomKind> for ApiRoomKind {
    fn from(kind: RoomKind) -> Self {
        match kind {
            RoomKind::Global => Self::Global,
            RoomKind::Public => Self::Public,
            RoomKind::Private => Self::Private,
            RoomKind::Direct => Self::Direct,
        }
    }
}

/// The kinds of room that can be created through REST.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum NewRoomKind {
    Public,
    Private,
}

/// A room.
#[derive(Debug, Clone, Object)]
#[oai(rename = "Room")]
pub struct ApiRoom {
    /// `global`, `dm:<a>:<b>`, or the id given or generated at creation.
    #[oai(validator(pattern = r"^[A-Za-z0-9_.:-]{1,128}$"))]
    pub id: String,
    pub kind: ApiRoomKind,
    pub name: String,
    /// The creator; absent for the global and direct rooms.
    pub owner_id: Option<String>,
    pub created_at: Timestamp,
}

impl From<&Room> for ApiRoom {
    fn from(room: &Room) -> Self {
        Self {
            id: room.id.to_string(),
            kind: room.kind.into(),
            name: room.name.clone(),
            owner_id: room.owner_id.as_ref().map(ToString::to_string),
            created_at: Timestamp(room.created_at),
        }
    }
}

/// Rooms.
#[derive(Debug, Clone, Object)]
pub struct RoomList {
    pub rooms: Vec<ApiRoom>,
}

/// A user. `name` is absent for a member the service has never seen.
#[derive(Debug, Clone, Object)]
#[oai(rename = "User")]
pub struct ApiUser {
    pub id: String,
    #[oai(skip_serializing_if_is_none)]
    pub name: Option<String>,
}

/// Members of a room.
#[derive(Debug, Clone, Object)]
pub struct MemberList {
    pub members: Vec<ApiUser>,
}

/// Users.
#[derive(Debug, Clone, Object)]
pub struct UserList {
    pub users: Vec<ApiUser>,
}

/// A stored message, or the tombstone of a deleted one.
#[derive(Debug, Clone, Object)]
#[oai(rename = "Message")]
pub struct ApiMessage {
    pub room_id: String,
    /// Opaque message id.
    pub id: String,
    /// Position in the room: 1, 2, 3, … with no gaps.
    pub seq: u64,
    pub user: ApiUser,
    /// Empty for a tombstone.
    pub body: String,
    /// The idempotency key it was sent with, if any.
    #[oai(skip_serializing_if_is_none)]
    pub client_id: Option<String>,
    pub created_at: Timestamp,
    /// Present (true) only for a deleted message.
    #[oai(skip_serializing_if_is_none)]
    pub deleted: Option<bool>,
}

impl From<&Message> for ApiMessage {
    fn from(m: &Message) -> Self {
        Self {
            room_id: m.room_id.to_string(),
            id: m.id.clone(),
            seq: m.seq,
            user: ApiUser {
                id: m.user.id.to_string(),
                name: Some(m.user.name.clone()),
            },
            body: m.body.clone(),
            client_id: m.client_id.as_ref().map(|c| c.as_str().to_owned()),
            created_at: Timestamp(m.created_at),
            deleted: m.deleted.then_some(true),
        }
    }
}

/// A page of history.
#[derive(Debug, Clone, Object)]
pub struct MessagePage {
    pub messages: Vec<ApiMessage>,
    /// More messages exist beyond this page, in the same direction.
    pub has_more: bool,
}

/// A room to create.
#[derive(Debug, Clone, Object)]
pub struct CreateRoom {
    /// Optional id; generated when absent. `global` and ids starting with
    /// `dm:` are reserved.
    #[oai(validator(pattern = r"^[A-Za-z0-9_.:-]{1,128}$"))]
    pub id: Option<String>,
    /// Display name, 1..=100 characters.
    #[oai(validator(min_length = 1, max_length = 100))]
    pub name: String,
    pub kind: NewRoomKind,
    /// Initial members besides the creator (private rooms: who may enter).
    #[oai(validator(max_items = 1000))]
    pub members: Option<Vec<String>>,
}

/// A message to send.
#[derive(Debug, Clone, Object)]
pub struct SendMessage {
    /// Trimmed, `\r\n` → `\n`; then 1..=2000 characters (configurable) with
    /// no control character but `\n` and `\t`.
    pub body: String,
    /// Idempotency key, 1..=64 characters: a repeat returns the original.
    #[oai(validator(min_length = 1, max_length = 64))]
    pub client_id: Option<String>,
}
