//! Domain types that can only be built valid.
//!
//! Everything that arrives from a client (room ids, user ids, message bodies,
//! idempotency keys) is parsed into one of these newtypes at the edge, so the
//! rest of the service never re-validates and never sees a malformed value.

use std::fmt;

use serde::Serialize;
use time::OffsetDateTime;

use crate::error::ChatError;

/// Characters allowed in room ids (and, minus `:`, in user ids).
fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | ':')
}

/// A room id: `[A-Za-z0-9_.:-]{1,128}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct RoomId(String);

/// The id of the one room that always exists.
pub const GLOBAL_ROOM: &str = "global";
const DM_PREFIX: &str = "dm:";

impl RoomId {
    pub const MAX_LEN: usize = 128;

    pub fn parse(raw: &str) -> Result<Self, ChatError> {
        if raw.is_empty() || raw.len() > Self::MAX_LEN || !raw.chars().all(is_id_char) {
            return Err(ChatError::BadRequest(
                "room id must match [A-Za-z0-9_.:-]{1,128}".into(),
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn global() -> Self {
        Self(GLOBAL_ROOM.to_owned())
    }

    /// The direct room of two users: ids sorted as byte strings.
    pub fn direct(a: &UserId, b: &UserId) -> Result<Self, ChatError> {
        if a == b {
            return Err(ChatError::BadRequest(
                "a direct room needs two different users".into(),
            ));
        }
        for user in [a, b] {
            if user.as_str().contains(':') {
                return Err(ChatError::BadRequest(format!(
                    "user id {user} cannot be part of a direct room id"
                )));
            }
        }
        let (lo, hi) = if a.as_str() < b.as_str() {
            (a, b)
        } else {
            (b, a)
        };
        Self::parse(&format!("{DM_PREFIX}{lo}:{hi}"))
    }

    /// What kind of room the id itself names, before any lookup.
    pub fn shape(&self) -> Result<IdShape, ChatError> {
        if self.0 == GLOBAL_ROOM {
            return Ok(IdShape::Global);
        }
        let Some(rest) = self.0.strip_prefix(DM_PREFIX) else {
            return Ok(IdShape::Named);
        };
        let malformed = || {
            ChatError::BadRequest(
                "a direct room id is dm:<a>:<b> with two different user ids sorted as byte strings"
                    .into(),
            )
        };
        let (a, b) = rest.split_once(':').ok_or_else(malformed)?;
        let (a, b) = (UserId::parse(a)?, UserId::parse(b)?);
        if a.as_str() >= b.as_str() || b.as_str().contains(':') {
            return Err(malformed());
        }
        Ok(IdShape::Direct(a, b))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a room id says about its room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdShape {
    Global,
    /// `dm:<a>:<b>` with `a < b`.
    Direct(UserId, UserId),
    /// Any other id: a public or private room created through REST.
    Named,
}

/// A user id, as the `sub` claim gives it: `[A-Za-z0-9_.:@-]{1,128}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct UserId(String);

impl UserId {
    pub const MAX_LEN: usize = 128;

    pub fn parse(raw: &str) -> Result<Self, ChatError> {
        let ok = !raw.is_empty()
            && raw.len() <= Self::MAX_LEN
            && raw.chars().all(|c| is_id_char(c) || c == '@');
        if !ok {
            return Err(ChatError::BadRequest(
                "user id must match [A-Za-z0-9_.:@-]{1,128}".into(),
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A user as other users see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct User {
    pub id: UserId,
    pub name: String,
}

/// Longest display name kept from a token; longer ones are cut.
pub const MAX_NAME_CHARS: usize = 64;

/// Turns a display name from a token or a request into one safe to show:
/// control characters dropped, whitespace trimmed, at most `max_chars`.
pub fn clean_name(raw: &str, max_chars: usize) -> String {
    raw.chars()
        .filter(|c| !c.is_control())
        .collect::<String>()
        .trim()
        .chars()
        .take(max_chars)
        .collect()
}

/// A message body after normalisation: trimmed, `\r\n` → `\n`, no other
/// control characters but `\n` and `\t`, 1..=max characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageBody(String);

impl MessageBody {
    pub fn parse(raw: &str, max_chars: usize) -> Result<Self, ChatError> {
        let normalised = raw.trim().replace("\r\n", "\n");
        if normalised.is_empty() {
            return Err(ChatError::InvalidMessage("message body is empty".into()));
        }
        if normalised
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t')
        {
            return Err(ChatError::InvalidMessage(
                "message body contains a control character".into(),
            ));
        }
        // Count scalar values only when the byte length could exceed the limit.
        if normalised.len() > max_chars && normalised.chars().count() > max_chars {
            return Err(ChatError::MessageTooLong(format!(
                "message body is longer than {max_chars} characters"
            )));
        }
        Ok(Self(normalised))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// The idempotency key of one send: 1..=64 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct ClientId(String);

impl ClientId {
    pub const MAX_CHARS: usize = 64;

    pub fn parse(raw: &str) -> Result<Self, ChatError> {
        let chars = raw.chars().count();
        if chars == 0 || chars > Self::MAX_CHARS || raw.chars().any(char::is_control) {
            return Err(ChatError::BadRequest(
                "client_id must be 1..=64 characters without control characters".into(),
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The four kinds of room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RoomKind {
    Global,
    Public,
    Private,
    Direct,
}

impl RoomKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Global => "global",
            Self::Public => "public",
            Self::Private => "private",
            Self::Direct => "direct",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "global" => Self::Global,
            "public" => Self::Public,
            "private" => Self::Private,
            "direct" => Self::Direct,
            _ => return None,
        })
    }
}

/// A room as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Room {
    pub id: RoomId,
    pub kind: RoomKind,
    pub name: String,
    pub owner_id: Option<UserId>,
    pub created_at: OffsetDateTime,
}

/// A stored message; `deleted` ones are tombstones with an empty body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub room_id: RoomId,
    pub id: String,
    pub seq: u64,
    pub user: User,
    pub body: String,
    pub client_id: Option<ClientId>,
    pub created_at: OffsetDateTime,
    pub deleted: bool,
}

/// Roles a token may carry; unknown roles are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Admin,
    Moderator,
    Service,
}

impl Role {
    pub fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "admin" => Self::Admin,
            "moderator" => Self::Moderator,
            "service" => Self::Service,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Moderator => "moderator",
            Self::Service => "service",
        }
    }
}

/// Who is calling: the verified identity behind a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub user: User,
    pub roles: Vec<Role>,
    /// Token expiry (the `exp` claim).
    pub expires_at: OffsetDateTime,
}

impl Caller {
    pub fn id(&self) -> &UserId {
        &self.user.id
    }

    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// `admin` and `service` may do anything.
    pub fn is_privileged(&self) -> bool {
        self.has(Role::Admin) || self.has(Role::Service)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_ids_follow_the_charset() {
        assert!(RoomId::parse("lobby-42_a.b:c").is_ok());
        assert!(RoomId::parse("").is_err());
        assert!(RoomId::parse("has space").is_err());
        assert!(RoomId::parse("é").is_err());
        assert!(RoomId::parse(&"a".repeat(128)).is_ok());
        assert!(RoomId::parse(&"a".repeat(129)).is_err());
    }

    #[test]
    fn direct_ids_sort_as_byte_strings() {
        let nine = UserId::parse("9").unwrap();
        let ten = UserId::parse("10").unwrap();
        assert_eq!(RoomId::direct(&nine, &ten).unwrap().as_str(), "dm:10:9");
        assert_eq!(
            RoomId::parse("dm:10:9").unwrap().shape().unwrap(),
            IdShape::Direct(ten.clone(), nine.clone())
        );
        assert!(RoomId::parse("dm:9:10").unwrap().shape().is_err());
        assert!(RoomId::parse("dm:9:9").unwrap().shape().is_err());
        assert!(RoomId::parse("dm:9").unwrap().shape().is_err());
        assert!(RoomId::direct(&nine, &nine).is_err());
        assert_eq!(RoomId::global().shape().unwrap(), IdShape::Global);
        assert_eq!(
            RoomId::parse("lobby").unwrap().shape().unwrap(),
            IdShape::Named
        );
    }

    #[test]
    fn bodies_are_normalised_then_checked() {
        let body = MessageBody::parse("  gl\r\nhf\t \n", 2000).unwrap();
        assert_eq!(body.as_str(), "gl\nhf");
        assert!(matches!(
            MessageBody::parse(" \n\t ", 2000),
            Err(ChatError::InvalidMessage(_))
        ));
        for bad in ["a\rb", "a\u{7f}b", "a\u{85}b", "a\u{0}b"] {
            assert!(
                matches!(
                    MessageBody::parse(bad, 2000),
                    Err(ChatError::InvalidMessage(_))
                ),
                "{bad:?}"
            );
        }
        assert!(MessageBody::parse(&"é".repeat(2000), 2000).is_ok());
        assert!(matches!(
            MessageBody::parse(&"é".repeat(2001), 2000),
            Err(ChatError::MessageTooLong(_))
        ));
    }

    #[test]
    fn client_ids_are_bounded() {
        assert!(ClientId::parse("b7c1").is_ok());
        assert!(ClientId::parse("").is_err());
        assert!(ClientId::parse(&"x".repeat(64)).is_ok());
        assert!(ClientId::parse(&"x".repeat(65)).is_err());
    }

    #[test]
    fn names_are_cleaned() {
        assert_eq!(clean_name("  al\u{7}ice ", MAX_NAME_CHARS), "alice");
        assert_eq!(
            clean_name(&"n".repeat(100), MAX_NAME_CHARS).chars().count(),
            MAX_NAME_CHARS
        );
    }
}
