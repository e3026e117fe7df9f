//! REST bodies, as they appear in the OpenAPI document. Each has an explicit
//! schema name and an example, so that generated SDKs get readable types and
//! the viewer shows realistic payloads.
//!
//! Request fields use [`JsonString`] rather than `String`: poem-openapi's
//! `String` also accepts JSON numbers and booleans (`5` becomes `"5"`),
//! which the contract treats as a mistyped field (`bad_request`).

use std::borrow::Cow;

use poem_openapi::{
    Enum, Object,
    registry::{MetaSchema, MetaSchemaRef, Registry},
    types::{Example, ParseError, ParseFromJSON, ParseResult, ToJSON, Type},
};
use serde_json::Value;
use time::{OffsetDateTime, format_description::well_known::Rfc3339, macros::datetime};

use crate::{
    domain::{Message, Room, RoomKind},
    protocol::format_time,
};

/// Reads a request body as the REST layer does: JSON (an empty body is
/// `null`), then the schema with its validators. Public for the fuzz target
/// `rest_bodies`; the handlers get the same from poem-openapi's `Json`.
#[doc(hidden)]
pub fn parse_body<T: ParseFromJSON>(bytes: &[u8]) -> Result<T, String> {
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(bytes).map_err(|err| err.to_string())?
    };
    T::parse_from_json(Some(value)).map_err(|err| err.into_message())
}

/// The time used in every example.
const EXAMPLE_TIME: OffsetDateTime = datetime!(2026-11-27 13:00:00.123 UTC);
/// A message id as the service makes them (opaque to clients).
pub const EXAMPLE_MESSAGE_ID: &str = "019ac5a1-7b3e-7c41-9d2f-4e8a6b1c0d2e";

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
            example: Some(Value::String(format_time(EXAMPLE_TIME))),
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

/// A string field of a request body that accepts JSON strings only. Its
/// schema is a plain `string`, and length and pattern validators apply to it
/// as to a `String`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JsonString(pub String);

impl Type for JsonString {
    const IS_REQUIRED: bool = true;
    type RawValueType = String;
    type RawElementValueType = String;

    fn name() -> Cow<'static, str> {
        "string".into()
    }

    fn schema_ref() -> MetaSchemaRef {
        String::schema_ref()
    }

    fn as_raw_value(&self) -> Option<&String> {
        Some(&self.0)
    }

    fn raw_element_iter<'a>(&'a self) -> Box<dyn Iterator<Item = &'a String> + 'a> {
        Box::new(std::iter::once(&self.0))
    }
}

impl ParseFromJSON for JsonString {
    fn parse_from_json(value: Option<Value>) -> ParseResult<Self> {
        match value.unwrap_or_default() {
            Value::String(text) => Ok(Self(text)),
            other => Err(ParseError::expected_type(other)),
        }
    }
}

impl ToJSON for JsonString {
    fn to_json(&self) -> Option<Value> {
        Some(Value::String(self.0.clone()))
    }
}

impl From<&str> for JsonString {
    fn from(text: &str) -> Self {
        Self(text.to_owned())
    }
}

/// A field that is always present and may be `null`: required and nullable
/// in the schema. (An `Option` field is optional instead, which makes
/// generated SDKs expect it to be missing as well as null.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nullable<T>(pub Option<T>);

impl<T: Type> Type for Nullable<T> {
    const IS_REQUIRED: bool = true;
    type RawValueType = T::RawValueType;
    type RawElementValueType = T::RawElementValueType;

    fn name() -> Cow<'static, str> {
        format!("nullable_{}", T::name()).into()
    }

    fn schema_ref() -> MetaSchemaRef {
        match T::schema_ref() {
            MetaSchemaRef::Inline(schema) => MetaSchemaRef::Inline(Box::new(MetaSchema {
                nullable: true,
                ..*schema
            })),
            // OpenAPI 3.0 cannot mark a reference nullable; no field needs it.
            reference => reference,
        }
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
    }

    fn as_raw_value(&self) -> Option<&Self::RawValueType> {
        self.0.as_ref().and_then(Type::as_raw_value)
    }

    fn raw_element_iter<'a>(
        &'a self,
    ) -> Box<dyn Iterator<Item = &'a Self::RawElementValueType> + 'a> {
        match &self.0 {
            Some(value) => value.raw_element_iter(),
            None => Box::new(std::iter::empty()),
        }
    }

    fn is_none(&self) -> bool {
        self.0.is_none()
    }
}

impl<T: ParseFromJSON> ParseFromJSON for Nullable<T> {
    fn parse_from_json(value: Option<Value>) -> ParseResult<Self> {
        match value {
            None | Some(Value::Null) => Ok(Self(None)),
            value => T::parse_from_json(value)
                .map(|inner| Self(Some(inner)))
                .map_err(ParseError::propagate),
        }
    }
}

impl<T: ToJSON> ToJSON for Nullable<T> {
    fn to_json(&self) -> Option<Value> {
        Some(
            self.0
                .as_ref()
                .and_then(ToJSON::to_json)
                .unwrap_or(Value::Null),
        )
    }
}

/// The kind of a room: `global` (the one room everybody is in), `public`,
/// `private` (members only) or `direct` (two users).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename = "RoomKind", rename_all = "lowercase")]
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
#[oai(rename = "Room", example)]
pub struct ApiRoom {
    /// `global`, `dm:<a>:<b>`, or the id given or generated at creation.
    #[oai(validator(
        pattern = r"^[A-Za-z0-9_.:-]{1,128}$",
        min_length = 1,
        max_length = 128
    ))]
    pub id: String,
    pub kind: ApiRoomKind,
    /// Display name.
    pub name: String,
    /// The creator's user id; `null` for the global and direct rooms.
    #[oai(validator(
        pattern = r"^[A-Za-z0-9_.:@-]{1,128}$",
        min_length = 1,
        max_length = 128
    ))]
    pub owner_id: Nullable<String>,
    pub created_at: Timestamp,
}

impl Example for ApiRoom {
    fn example() -> Self {
        Self {
            id: "lobby-1".into(),
            kind: ApiRoomKind::Public,
            name: "Clash lobby #1".into(),
            owner_id: Nullable(Some("1".into())),
            created_at: Timestamp(EXAMPLE_TIME),
        }
    }
}

impl From<&Room> for ApiRoom {
    fn from(room: &Room) -> Self {
        Self {
            id: room.id.to_string(),
            kind: room.kind.into(),
            name: room.name.clone(),
            owner_id: Nullable(room.owner_id.as_ref().map(ToString::to_string)),
            created_at: Timestamp(room.created_at),
        }
    }
}

/// Rooms.
#[derive(Debug, Clone, Object)]
#[oai(example)]
pub struct RoomList {
    pub rooms: Vec<ApiRoom>,
}

impl Example for RoomList {
    fn example() -> Self {
        Self {
            rooms: vec![
                ApiRoom {
                    id: "global".into(),
                    kind: ApiRoomKind::Global,
                    name: "Global".into(),
                    owner_id: Nullable(None),
                    created_at: Timestamp(EXAMPLE_TIME),
                },
                ApiRoom::example(),
            ],
        }
    }
}

/// A user. `name` is absent for a member the service has never seen.
#[derive(Debug, Clone, Object)]
#[oai(rename = "User", example)]
pub struct ApiUser {
    /// User id (the token's `sub`).
    #[oai(validator(
        pattern = r"^[A-Za-z0-9_.:@-]{1,128}$",
        min_length = 1,
        max_length = 128
    ))]
    pub id: String,
    /// Display name (the token's `name`), at most 64 characters.
    #[oai(skip_serializing_if_is_none)]
    pub name: Option<String>,
}

impl ApiUser {
    fn named(id: &str, name: &str) -> Self {
        Self {
            id: id.into(),
            name: Some(name.into()),
        }
    }
}

impl Example for ApiUser {
    fn example() -> Self {
        Self::named("1", "alice")
    }
}

/// Members of a room.
#[derive(Debug, Clone, Object)]
#[oai(example)]
pub struct MemberList {
    pub members: Vec<ApiUser>,
}

impl Example for MemberList {
    fn example() -> Self {
        Self {
            members: vec![
                ApiUser::named("1", "alice"),
                ApiUser {
                    id: "2".into(),
                    name: None,
                },
            ],
        }
    }
}

/// Users.
#[derive(Debug, Clone, Object)]
#[oai(example)]
pub struct UserList {
    pub users: Vec<ApiUser>,
}

impl Example for UserList {
    fn example() -> Self {
        Self {
            users: vec![ApiUser::named("1", "alice"), ApiUser::named("2", "bob")],
        }
    }
}

/// A stored message, or the tombstone of a deleted one.
#[derive(Debug, Clone, Object)]
#[oai(rename = "Message", example)]
pub struct ApiMessage {
    #[oai(validator(
        pattern = r"^[A-Za-z0-9_.:-]{1,128}$",
        min_length = 1,
        max_length = 128
    ))]
    pub room_id: String,
    /// Opaque message id: compare it, never parse it.
    pub id: String,
    /// Position in the room: 1, 2, 3, … with no gaps.
    #[oai(validator(minimum(value = "1")))]
    pub seq: u64,
    pub user: ApiUser,
    /// The normalised body; empty for a tombstone.
    pub body: String,
    /// The idempotency key it was sent with, if any.
    #[oai(skip_serializing_if_is_none)]
    pub client_id: Option<String>,
    pub created_at: Timestamp,
    /// Present (true) only for a deleted message.
    #[oai(skip_serializing_if_is_none)]
    pub deleted: Option<bool>,
}

impl ApiMessage {
    fn example_with(seq: u64, body: &str) -> Self {
        Self {
            room_id: "lobby-1".into(),
            id: EXAMPLE_MESSAGE_ID.into(),
            seq,
            user: ApiUser::named("1", "alice"),
            body: body.into(),
            client_id: None,
            created_at: Timestamp(EXAMPLE_TIME),
            deleted: None,
        }
    }
}

impl Example for ApiMessage {
    fn example() -> Self {
        Self {
            client_id: Some("b7c1".into()),
            ..Self::example_with(42, "gl hf")
        }
    }
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
#[oai(example)]
pub struct MessagePage {
    /// Newest first, or oldest first when paging with `after_seq`.
    pub messages: Vec<ApiMessage>,
    /// More messages exist beyond this page, in the same direction.
    pub has_more: bool,
}

impl Example for MessagePage {
    fn example() -> Self {
        let tombstone = ApiMessage {
            id: "019ac5a1-7b3e-7c41-9d2f-4e8a6b1c0d2d".into(),
            deleted: Some(true),
            ..ApiMessage::example_with(41, "")
        };
        Self {
            messages: vec![ApiMessage::example(), tombstone],
            has_more: true,
        }
    }
}

/// A room to create.
#[derive(Debug, Clone, Object)]
#[oai(example)]
pub struct CreateRoom {
    /// Optional id; generated when absent (or `null`). `global` is taken
    /// and ids starting with `dm:` are reserved for direct rooms.
    #[oai(
        nullable,
        validator(
            pattern = r"^[A-Za-z0-9_.:-]{1,128}$",
            min_length = 1,
            max_length = 128
        )
    )]
    pub id: Option<JsonString>,
    /// Display name, 1 to 100 characters (control characters are removed).
    #[oai(validator(min_length = 1, max_length = 100))]
    pub name: JsonString,
    pub kind: NewRoomKind,
    /// Initial members besides the creator (private rooms: who may enter),
    /// as user ids.
    #[oai(
        nullable,
        validator(
            max_items = 1000,
            pattern = r"^[A-Za-z0-9_.:@-]{1,128}$",
            min_length = 1,
            max_length = 128
        )
    )]
    pub members: Option<Vec<JsonString>>,
}

impl Example for CreateRoom {
    fn example() -> Self {
        Self {
            id: Some("lobby-1".into()),
            name: "Clash lobby #1".into(),
            kind: NewRoomKind::Private,
            members: Some(vec!["2".into(), "3".into()]),
        }
    }
}

/// A message to send.
#[derive(Debug, Clone, Object)]
#[oai(example)]
pub struct SendMessage {
    /// Trimmed, and `\r\n` becomes `\n`; what remains must be 1 to 2000
    /// characters (configurable; `invalid_message` when empty,
    /// `message_too_long` when over) with no control character but `\n` and
    /// `\t` (`invalid_message`).
    pub body: JsonString,
    /// Idempotency key, 1 to 64 characters without control characters: a
    /// repeat returns the original message. Absent or `null`: no key.
    #[oai(nullable, validator(min_length = 1, max_length = 64))]
    pub client_id: Option<JsonString>,
}

impl Example for SendMessage {
    fn example() -> Self {
        Self {
            body: "gl hf".into(),
            client_id: Some("b7c1".into()),
        }
    }
}
