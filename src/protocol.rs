//! The WebSocket wire format: frames clients send and frames the server
//! sends, exactly as the contract names them.
//!
//! Server frames borrow from the data they describe, so serialising one costs
//! a single allocation (the output buffer).

use serde::{Deserialize, Serialize};
use time::{OffsetDateTime, format_description::FormatItem, macros::format_description};

use crate::{
    bus::{WireMessage, WireUser},
    domain::{ClientId, Room},
    error::{ChatError, ErrorCode},
};

const RFC3339_MILLIS: &[FormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");

/// RFC 3339, UTC, milliseconds: `2026-11-27T13:00:00.123Z`.
pub fn format_time(at: OffsetDateTime) -> String {
    at.to_offset(time::UtcOffset::UTC)
        .format(RFC3339_MILLIS)
        .unwrap_or_else(|_| "1970-01-01T00:00:00.000Z".to_owned())
}

/// A frame from a client, after the `type` has been read.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientFrame {
    Message {
        body: String,
        client_id: Option<ClientId>,
    },
    Typing,
    Ping,
    Refresh {
        token: String,
    },
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum RawFrame {
    Message {
        body: String,
        #[serde(default)]
        client_id: Option<String>,
    },
    Typing,
    Ping,
    Refresh {
        token: String,
    },
}

/// Every field any client frame has, and only those: a frame with any
/// other field goes to the tree. (Skipping an unknown field's value would
/// not count its nesting, so a frame the tree refuses for its depth would
/// pass here.)
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlainFields<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    body: Option<String>,
    /// Borrowed: [`ClientId::parse`] makes the copy it keeps.
    #[serde(borrow)]
    client_id: Option<std::borrow::Cow<'a, str>>,
    token: Option<String>,
}

/// A frame that could not be accepted: the error, and the `client_id` when
/// the frame was readable enough to carry one.
#[derive(Debug)]
pub struct FrameError {
    pub error: ChatError,
    pub client_id: Option<String>,
}

impl ClientFrame {
    /// Parses a text frame. Unknown fields are ignored; everything else that
    /// is off is `bad_request`.
    pub fn parse(text: &str) -> Result<Self, FrameError> {
        Self::parse_plain(text).map_or_else(|| Self::parse_checked(text), Ok)
    }

    /// The common frame, read in one pass: an object of the contract's
    /// fields only, each of the type the contract gives it, at most once.
    /// `None` for anything else, which [`Self::parse_checked`] then reads, so what a
    /// frame is answered (and every error's wording) is decided there
    /// alone; this only skips building a JSON tree for frames that are
    /// fine.
    fn parse_plain(text: &str) -> Option<Self> {
        // A derived struct would also accept a JSON array.
        if !text.trim_start().starts_with('{') {
            return None;
        }
        let fields: PlainFields = serde_json::from_str(text).ok()?;
        Some(match (&*fields.kind, fields.body, fields.token) {
            ("message", Some(body), _) => Self::Message {
                body,
                client_id: match fields.client_id {
                    Some(id) => Some(ClientId::parse(&id).ok()?),
                    None => None,
                },
            },
            ("typing", ..) => Self::Typing,
            ("ping", ..) => Self::Ping,
            ("refresh", _, Some(token)) => Self::Refresh { token },
            _ => return None,
        })
    }

    /// Any frame, valid or not, through a JSON tree: the `client_id` is
    /// read first so that an error can echo it.
    fn parse_checked(text: &str) -> Result<Self, FrameError> {
        let bad = |why: String, client_id: Option<String>| FrameError {
            error: ChatError::BadRequest(why),
            client_id,
        };
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|_| bad("frame is not valid JSON".into(), None))?;
        let client_id = value
            .get("client_id")
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned);
        if !value.is_object() {
            return Err(bad("frame must be a JSON object".into(), None));
        }
        match value.get("type").and_then(serde_json::Value::as_str) {
            None => return Err(bad("frame lacks a string `type`".into(), client_id)),
            Some("message" | "typing" | "ping" | "refresh") => {}
            Some(_) => return Err(bad("unknown frame type".into(), client_id)),
        }
        let raw: RawFrame = serde_json::from_value(value).map_err(|err| {
            bad(
                format!("malformed frame: {}", strip_position(&err)),
                client_id.clone(),
            )
        })?;
        Ok(match raw {
            RawFrame::Message {
                body,
                client_id: id,
            } => {
                let client_id =
                    id.as_deref()
                        .map(ClientId::parse)
                        .transpose()
                        .map_err(|error| FrameError {
                            error,
                            client_id: id.clone(),
                        })?;
                Self::Message { body, client_id }
            }
            RawFrame::Typing => Self::Typing,
            RawFrame::Ping => Self::Ping,
            RawFrame::Refresh { token } => Self::Refresh { token },
        })
    }
}

/// serde's messages end in "at line 1 column 7"; the client needs only the
/// field and the reason.
fn strip_position(err: &serde_json::Error) -> String {
    let text = err.to_string();
    match text.find(" at line ") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

#[derive(Debug, Serialize)]
pub struct RoomView<'a> {
    pub id: &'a str,
    pub kind: &'static str,
    pub name: &'a str,
}

impl<'a> From<&'a Room> for RoomView<'a> {
    fn from(room: &'a Room) -> Self {
        Self {
            id: room.id.as_str(),
            kind: room.kind.as_str(),
            name: &room.name,
        }
    }
}

/// A frame the server sends.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    Ready {
        room: RoomView<'a>,
        user: &'a WireUser,
        last_seq: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        resumed: Option<bool>,
        presence: &'a [WireUser],
    },
    Message {
        room_id: &'a str,
        id: &'a str,
        seq: u64,
        user: &'a WireUser,
        body: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        client_id: Option<&'a str>,
        created_at: String,
    },
    Ack {
        #[serde(skip_serializing_if = "Option::is_none")]
        client_id: Option<&'a str>,
        id: &'a str,
        seq: u64,
        created_at: String,
    },
    MessageDeleted {
        room_id: &'a str,
        id: &'a str,
        seq: u64,
    },
    Join {
        room_id: &'a str,
        user: &'a WireUser,
    },
    Leave {
        room_id: &'a str,
        user: &'a WireUser,
    },
    Typing {
        room_id: &'a str,
        user: &'a WireUser,
    },
    Error {
        code: &'static str,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        client_id: Option<&'a str>,
    },
    Pong,
    Refreshed {
        expires_at: String,
    },
}

impl<'a> ServerFrame<'a> {
    /// The frame that shows a stored message: `message`, or
    /// `message_deleted` for a tombstone.
    pub fn for_message(m: &'a WireMessage) -> Self {
        if m.deleted {
            return Self::MessageDeleted {
                room_id: &m.room_id,
                id: &m.id,
                seq: m.seq,
            };
        }
        Self::Message {
            room_id: &m.room_id,
            id: &m.id,
            seq: m.seq,
            user: &m.user,
            body: &m.body,
            client_id: m.client_id.as_deref(),
            created_at: format_time(crate::store::from_millis(m.created_at)),
        }
    }

    pub fn error(
        code: ErrorCode,
        message: &'a str,
        retry_after_ms: Option<u64>,
        client_id: Option<&'a str>,
    ) -> Self {
        Self::Error {
            code: code.as_str(),
            message,
            retry_after_ms,
            client_id,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server frames always serialise")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_client_frame() {
        assert_eq!(
            ClientFrame::parse(r#"{"type":"message","body":"gl hf","client_id":"b7","extra":1}"#)
                .unwrap(),
            ClientFrame::Message {
                body: "gl hf".into(),
                client_id: Some(ClientId::parse("b7").unwrap())
            }
        );
        assert_eq!(
            ClientFrame::parse(r#"{"type":"typing"}"#).unwrap(),
            ClientFrame::Typing
        );
        assert_eq!(
            ClientFrame::parse(r#"{"type":"ping"}"#).unwrap(),
            ClientFrame::Ping
        );
        assert_eq!(
            ClientFrame::parse(r#"{"type":"refresh","token":"t"}"#).unwrap(),
            ClientFrame::Refresh { token: "t".into() }
        );
    }

    #[test]
    fn bad_frames_are_bad_requests_that_keep_the_client_id() {
        for (text, client_id) in [
            ("nope", None),
            ("[1]", None),
            (r#"{"type":"shout","client_id":"c1"}"#, Some("c1")),
            (r#"{"type":"message","client_id":"c2"}"#, Some("c2")),
            (
                r#"{"type":"message","body":5,"client_id":"c3"}"#,
                Some("c3"),
            ),
            (r#"{"type":"message","body":"x","client_id":""}"#, Some("")),
            (r#"{"body":"x"}"#, None),
        ] {
            let err = ClientFrame::parse(text).unwrap_err();
            assert_eq!(err.error.code(), ErrorCode::BadRequest, "{text}");
            assert_eq!(err.client_id.as_deref(), client_id, "{text}");
        }
    }

    /// The one-pass reading must never decide a frame differently from the
    /// tree: whatever it accepts, the tree reads the same, and the frames
    /// it declines are the tree's to accept or refuse.
    #[test]
    fn the_one_pass_reading_agrees_with_the_tree_or_declines() {
        // Refused by the tree for its depth, whatever the field.
        let deep = format!(
            r#"{{"type":"ping","a":{}1{}}}"#,
            r#"{"a":"#.repeat(200),
            "}".repeat(200)
        );
        let frames = [
            (
                r#"{"type":"message","body":"gl hf","client_id":"b7"}"#,
                true,
            ),
            (
                r#" {"type":"message","body":"a\nb \u00e9 {[\"x\"]}"}"#,
                true,
            ),
            (r#"{"body":"x","type":"message","client_id":null}"#, true),
            (r#"{"type":"typing","body":"ignored"}"#, true),
            (r#"{"type":"ping"}"#, true),
            (r#"{"type":"refresh","token":"t","client_id":"r1"}"#, true),
            // Declined, and then accepted or refused by the tree.
            (r#"{"type":"message","body":"x","extra":[1,{}]}"#, false),
            (&deep, false),
            (r#"{"type":"typing","body":5}"#, false),
            (r#"{"type":"message","body":"a","body":"b"}"#, false),
            (r#"{"type":"message","body":"x","client_id":""}"#, false),
            (r#"{"type":"message","client_id":"c2"}"#, false),
            (r#"{"type":"refresh"}"#, false),
            (r#"{"type":"shout"}"#, false),
            (r#"["message","x"]"#, false),
            (r#"{"type":"message","body":"x"} trailing"#, false),
            ("nope", false),
        ];
        for (text, plain) in frames {
            let fast = ClientFrame::parse_plain(text);
            assert_eq!(fast.is_some(), plain, "{text}");
            let checked = ClientFrame::parse_checked(text);
            match fast {
                Some(frame) => assert_eq!(checked.unwrap(), frame, "{text}"),
                None => {
                    let via_parse = ClientFrame::parse(text).map_err(|e| e.error.to_string());
                    assert_eq!(
                        via_parse,
                        checked.map_err(|e| e.error.to_string()),
                        "{text}"
                    );
                }
            }
        }
    }

    #[test]
    fn times_have_milliseconds() {
        let at = OffsetDateTime::from_unix_timestamp_nanos(1_795_784_400_123_456_789).unwrap();
        assert_eq!(format_time(at), "2026-11-27T13:00:00.123Z");
    }
}
