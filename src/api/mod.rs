//! The REST API under `/api/v1`, described by poem-openapi: the operations
//! here *are* the OpenAPI document (`openapi.yaml` is generated from them).
//!
//! Handlers are thin: authenticate, call the [`Chat`](crate::chat::Chat)
//! layer, convert. Every operation returns `Result<_, ApiError>`, so every
//! error status and its JSON schema appear in the spec.

pub mod error;
pub mod health;
pub mod types;

use poem::web::Data;
use poem_openapi::{
    ApiResponse, OpenApi, OpenApiService, SecurityScheme, Tags,
    auth::Bearer,
    param::{Path, Query},
    payload::Json,
};
use tracing::Instrument;

use self::{
    error::ApiError,
    types::{
        ApiMessage, ApiRoom, ApiUser, CreateRoom, MemberList, MessagePage, NewRoomKind, RoomList,
        SendMessage, UserList,
    },
};
use crate::{
    app::AppState,
    chat::{NewRoom, Transport},
    domain::{Caller, ClientId, RoomId},
    error::ChatError,
    store::Page,
};

/// Default and largest page of history.
pub const DEFAULT_PAGE: u32 = 50;
pub const MAX_PAGE: u32 = 200;

fn default_page() -> u32 {
    DEFAULT_PAGE
}

// Examples of parameters, shown by the viewer and used by generators.
fn example_room_id() -> String {
    "lobby-1".into()
}

fn example_user_id() -> String {
    "2".into()
}

fn example_message_id() -> String {
    types::EXAMPLE_MESSAGE_ID.into()
}

fn example_before_seq() -> Option<u64> {
    Some(42)
}

fn example_after_seq() -> Option<u64> {
    Some(0)
}

/// A JWT issued by the Core service, as `Authorization: Bearer <jwt>`.
#[derive(SecurityScheme)]
#[oai(ty = "bearer", bearer_format = "JWT")]
pub struct BearerAuth(Bearer);

#[derive(Tags)]
enum Tag {
    /// Rooms and their members.
    Rooms,
    /// Message history, sending and deletion.
    Messages,
    /// Who is connected now.
    Presence,
}

#[derive(ApiResponse)]
enum Found<T: poem_openapi::types::ToJSON + Send + Sync> {
    /// The requested data.
    #[oai(status = 200)]
    Ok(Json<T>),
}

#[derive(ApiResponse)]
enum Created<T: poem_openapi::types::ToJSON + Send + Sync> {
    /// Created.
    #[oai(status = 201)]
    Created(Json<T>),
}

#[derive(ApiResponse)]
enum CreatedOrExisting<T: poem_openapi::types::ToJSON + Send + Sync> {
    /// Created now.
    #[oai(status = 201)]
    Created(Json<T>),
    /// Existed already (an idempotent repeat): the original.
    #[oai(status = 200)]
    Existing(Json<T>),
}

#[derive(ApiResponse)]
enum NoContent {
    /// Done.
    #[oai(status = 204)]
    Done,
}

pub struct RestApi;

/// Verifies the bearer token and counts the request against the caller's
/// REST budget (sends are counted by the send limit instead).
async fn caller(state: &AppState, auth: &BearerAuth, counted: bool) -> Result<Caller, ApiError> {
    let caller = state.keys.verify(&auth.0.token)?;
    if counted {
        state.chat.count_request(&caller).await?;
    }
    Ok(caller)
}

fn room_id(raw: &str) -> Result<RoomId, ApiError> {
    Ok(RoomId::parse(raw)?)
}

#[OpenApi]
impl RestApi {
    /// List the rooms the caller can see
    ///
    /// The global room, every public room, and the private and direct rooms
    /// the caller is a member of.
    #[oai(
        path = "/rooms",
        method = "get",
        operation_id = "listRooms",
        tag = "Tag::Rooms"
    )]
    async fn list_rooms(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
    ) -> Result<Found<RoomList>, ApiError> {
        let caller = caller(&state, &auth, true).await?;
        let rooms = state.chat.rooms_for(&caller).await?;
        Ok(Found::Ok(Json(RoomList {
            rooms: rooms.iter().map(ApiRoom::from).collect(),
        })))
    }

    /// Create a public or private room
    ///
    /// The caller becomes its owner and first member. Without an `id`, one is
    /// generated.
    #[oai(
        path = "/rooms",
        method = "post",
        operation_id = "createRoom",
        tag = "Tag::Rooms"
    )]
    async fn create_room(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        body: Json<CreateRoom>,
    ) -> Result<Created<ApiRoom>, ApiError> {
        let caller = caller(&state, &auth, true).await?;
        let body = body.0;
        let room = state
            .chat
            .create_room(
                &caller,
                NewRoom {
                    id: body.id.map(|id| id.0),
                    name: body.name.0,
                    private: body.kind == NewRoomKind::Private,
                    members: body
                        .members
                        .unwrap_or_default()
                        .into_iter()
                        .map(|member| member.0)
                        .collect(),
                },
            )
            .await?;
        Ok(Created::Created(Json(ApiRoom::from(&room))))
    }

    /// Get one room
    #[oai(
        path = "/rooms/:room_id",
        method = "get",
        operation_id = "getRoom",
        tag = "Tag::Rooms"
    )]
    async fn get_room(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        /// Room id: `global`, `dm:<a>:<b>` or a created room's id.
        #[oai(
            validator(
                pattern = r"^[A-Za-z0-9_.:-]{1,128}$",
                min_length = 1,
                max_length = 128
            ),
            example = "example_room_id"
        )]
        room_id: Path<String>,
    ) -> Result<Found<ApiRoom>, ApiError> {
        let caller = caller(&state, &auth, true).await?;
        let room = state
            .chat
            .open_room(&caller, &self::room_id(&room_id)?, false)
            .await?;
        Ok(Found::Ok(Json(ApiRoom::from(&room))))
    }

    /// List a room's members
    #[oai(
        path = "/rooms/:room_id/members",
        method = "get",
        operation_id = "listMembers",
        tag = "Tag::Rooms"
    )]
    async fn list_members(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        /// Room id: `global`, `dm:<a>:<b>` or a created room's id.
        #[oai(
            validator(
                pattern = r"^[A-Za-z0-9_.:-]{1,128}$",
                min_length = 1,
                max_length = 128
            ),
            example = "example_room_id"
        )]
        room_id: Path<String>,
    ) -> Result<Found<MemberList>, ApiError> {
        let caller = caller(&state, &auth, true).await?;
        let members = state
            .chat
            .members(&caller, &self::room_id(&room_id)?)
            .await?;
        Ok(Found::Ok(Json(MemberList {
            members: members
                .into_iter()
                .map(|m| ApiUser {
                    id: m.id.to_string(),
                    name: m.name,
                })
                .collect(),
        })))
    }

    /// Add a member
    ///
    /// The room's owner, `admin` or `service`; public and private rooms only.
    /// Adding a member twice is not an error.
    #[oai(
        path = "/rooms/:room_id/members/:user_id",
        method = "put",
        operation_id = "addMember",
        tag = "Tag::Rooms"
    )]
    async fn add_member(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        /// Room id: `global`, `dm:<a>:<b>` or a created room's id.
        #[oai(
            validator(
                pattern = r"^[A-Za-z0-9_.:-]{1,128}$",
                min_length = 1,
                max_length = 128
            ),
            example = "example_room_id"
        )]
        room_id: Path<String>,
        /// User id (a token's `sub`).
        #[oai(
            validator(
                pattern = r"^[A-Za-z0-9_.:@-]{1,128}$",
                min_length = 1,
                max_length = 128
            ),
            example = "example_user_id"
        )]
        user_id: Path<String>,
    ) -> Result<NoContent, ApiError> {
        let caller = caller(&state, &auth, true).await?;
        state
            .chat
            .add_member(&caller, &self::room_id(&room_id)?, &user_id)
            .await?;
        Ok(NoContent::Done)
    }

    /// Remove a member
    ///
    /// The room's owner, `admin` or `service`. In a private room the user's
    /// open connections to it are closed with 4003.
    #[oai(
        path = "/rooms/:room_id/members/:user_id",
        method = "delete",
        operation_id = "removeMember",
        tag = "Tag::Rooms"
    )]
    async fn remove_member(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        /// Room id: `global`, `dm:<a>:<b>` or a created room's id.
        #[oai(
            validator(
                pattern = r"^[A-Za-z0-9_.:-]{1,128}$",
                min_length = 1,
                max_length = 128
            ),
            example = "example_room_id"
        )]
        room_id: Path<String>,
        /// User id (a token's `sub`).
        #[oai(
            validator(
                pattern = r"^[A-Za-z0-9_.:@-]{1,128}$",
                min_length = 1,
                max_length = 128
            ),
            example = "example_user_id"
        )]
        user_id: Path<String>,
    ) -> Result<NoContent, ApiError> {
        let caller = caller(&state, &auth, true).await?;
        state
            .chat
            .remove_member(&caller, &self::room_id(&room_id)?, &user_id)
            .await?;
        Ok(NoContent::Done)
    }

    /// Read history
    ///
    /// Pages by `seq` cursor (exclusive). With no cursor or `before_seq`:
    /// newest first. With `after_seq`: oldest first (and `before_seq`, when
    /// also given, bounds the page from above). Deleted messages appear as
    /// tombstones (`deleted: true`, empty body).
    #[oai(
        path = "/rooms/:room_id/messages",
        method = "get",
        operation_id = "listMessages",
        tag = "Tag::Messages"
    )]
    async fn list_messages(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        /// Room id: `global`, `dm:<a>:<b>` or a created room's id.
        #[oai(
            validator(
                pattern = r"^[A-Za-z0-9_.:-]{1,128}$",
                min_length = 1,
                max_length = 128
            ),
            example = "example_room_id"
        )]
        room_id: Path<String>,
        /// Exclusive upper cursor: only messages with a smaller `seq`.
        #[oai(validator(minimum(value = "0")), example = "example_before_seq")]
        before_seq: Query<Option<u64>>,
        /// Exclusive lower cursor: only messages with a larger `seq`, oldest
        /// first (`0` reads from the start).
        #[oai(validator(minimum(value = "0")), example = "example_after_seq")]
        after_seq: Query<Option<u64>>,
        /// Page size, 1 to 200.
        #[oai(
            validator(minimum(value = "1"), maximum(value = "200")),
            default = "default_page"
        )]
        limit: Query<u32>,
    ) -> Result<Found<MessagePage>, ApiError> {
        let caller = caller(&state, &auth, true).await?;
        let page = match (after_seq.0, before_seq.0) {
            (Some(after), before) => Page::Oldest { after, before },
            (None, before) => Page::Newest { before },
        };
        let limit = limit.0.clamp(1, MAX_PAGE);
        let (messages, has_more) = state
            .chat
            .history(&caller, &self::room_id(&room_id)?, page, limit)
            .await?;
        Ok(Found::Ok(Json(MessagePage {
            messages: messages.iter().map(ApiMessage::from).collect(),
            has_more,
        })))
    }

    /// Send a message
    ///
    /// Same rules as over the WebSocket: validation, idempotency by
    /// `client_id`, the shared send rate limit, and a broadcast to the room.
    /// A repeat of a stored `client_id` answers 200 with the original.
    #[oai(
        path = "/rooms/:room_id/messages",
        method = "post",
        operation_id = "sendMessage",
        tag = "Tag::Messages"
    )]
    async fn send_message(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        /// Room id: `global`, `dm:<a>:<b>` or a created room's id.
        #[oai(
            validator(
                pattern = r"^[A-Za-z0-9_.:-]{1,128}$",
                min_length = 1,
                max_length = 128
            ),
            example = "example_room_id"
        )]
        room_id: Path<String>,
        body: Json<SendMessage>,
    ) -> Result<CreatedOrExisting<ApiMessage>, ApiError> {
        let caller = caller(&state, &auth, false).await?;
        let client_id = body
            .0
            .client_id
            .as_ref()
            .map(|id| ClientId::parse(&id.0))
            .transpose()?;
        let room = state
            .chat
            .open_room(&caller, &self::room_id(&room_id)?, false)
            .await?;
        state.chat.store.remember_user(&caller.user).await?;
        let sent = state
            .chat
            .send(&caller, &room, &body.0.body.0, client_id, Transport::Rest)
            .instrument(
                tracing::info_span!("chat.send", transport = "rest", chat.room_id = %room.id),
            )
            .await?;
        let message = Json(ApiMessage::from(&sent.message));
        Ok(if sent.duplicate {
            CreatedOrExisting::Existing(message)
        } else {
            CreatedOrExisting::Created(message)
        })
    }

    /// Delete a message
    ///
    /// Its author, a `moderator`, `admin` or `service`. The message becomes a
    /// tombstone and `message_deleted` is broadcast. Deleting twice is not an
    /// error.
    #[oai(
        path = "/rooms/:room_id/messages/:message_id",
        method = "delete",
        operation_id = "deleteMessage",
        tag = "Tag::Messages"
    )]
    async fn delete_message(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        /// Room id: `global`, `dm:<a>:<b>` or a created room's id.
        #[oai(
            validator(
                pattern = r"^[A-Za-z0-9_.:-]{1,128}$",
                min_length = 1,
                max_length = 128
            ),
            example = "example_room_id"
        )]
        room_id: Path<String>,
        /// Message id, as returned when it was sent (opaque).
        #[oai(example = "example_message_id")]
        message_id: Path<String>,
    ) -> Result<NoContent, ApiError> {
        let caller = caller(&state, &auth, true).await?;
        state
            .chat
            .delete_message(&caller, &self::room_id(&room_id)?, &message_id)
            .await?;
        Ok(NoContent::Done)
    }

    /// Who is connected
    ///
    /// The distinct users with at least one open connection to the room, on
    /// any instance.
    #[oai(
        path = "/rooms/:room_id/presence",
        method = "get",
        operation_id = "getPresence",
        tag = "Tag::Presence"
    )]
    async fn presence(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        /// Room id: `global`, `dm:<a>:<b>` or a created room's id.
        #[oai(
            validator(
                pattern = r"^[A-Za-z0-9_.:-]{1,128}$",
                min_length = 1,
                max_length = 128
            ),
            example = "example_room_id"
        )]
        room_id: Path<String>,
    ) -> Result<Found<UserList>, ApiError> {
        let caller = caller(&state, &auth, true).await?;
        let users = state
            .chat
            .presence(&caller, &self::room_id(&room_id)?)
            .await?;
        Ok(Found::Ok(Json(UserList {
            users: users
                .into_iter()
                .map(|u| ApiUser {
                    id: u.id.to_string(),
                    name: Some(u.name),
                })
                .collect(),
        })))
    }

    /// Open a direct room
    ///
    /// The direct room between the caller and another user, created on
    /// first use (201) or returned as it is (200).
    #[oai(
        path = "/dm/:user_id",
        method = "post",
        operation_id = "openDirectRoom",
        tag = "Tag::Rooms"
    )]
    async fn direct_room(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        /// The other user's id; it may not contain `:`.
        #[oai(
            validator(
                pattern = r"^[A-Za-z0-9_.:@-]{1,128}$",
                min_length = 1,
                max_length = 128
            ),
            example = "example_user_id"
        )]
        user_id: Path<String>,
    ) -> Result<CreatedOrExisting<ApiRoom>, ApiError> {
        let caller = caller(&state, &auth, true).await?;
        let (room, created) = state.chat.direct_room(&caller, &user_id).await?;
        let room = Json(ApiRoom::from(&room));
        Ok(if created {
            CreatedOrExisting::Created(room)
        } else {
            CreatedOrExisting::Existing(room)
        })
    }
}

/// The OpenAPI service: operations plus document metadata.
pub fn service() -> OpenApiService<RestApi, ()> {
    OpenApiService::new(RestApi, "Clash of Code chat", env!("CARGO_PKG_VERSION"))
        .license(poem_openapi::LicenseObject::new(env!("CARGO_PKG_LICENSE")))
        .description(
            "REST API of the chat service. Real-time events use the WebSocket at \
             `/ws/chat/{room_id}`, described by the AsyncAPI document served at \
             `/asyncapi.yaml`. Every route takes a JWT from the Core service as \
             `Authorization: Bearer <jwt>`. Errors are `{\"code\", \"message\"}` \
             with a fixed set of codes; a 429 carries `Retry-After` in seconds.",
        )
        .server("/api/v1")
}

/// The OpenAPI document as YAML: what `openapi.yaml` holds and
/// `/openapi.yaml` serves.
///
/// poem-openapi writes YAML 1.2, where `2026-11-27T13:00:00.123Z` is a plain
/// string. YAML 1.1 readers (PyYAML, SnakeYAML, and so many SDK generators)
/// read the same unquoted text as a timestamp, so every `date-time` example
/// would stop being a string for them: such values are quoted.
pub fn spec_yaml(service: &OpenApiService<RestApi, ()>) -> String {
    quote_timestamps(&service.spec_yaml())
}

fn quote_timestamps(yaml: &str) -> String {
    let mut out = String::with_capacity(yaml.len() + 256);
    for line in yaml.split_inclusive('\n') {
        let (text, end) = match line.strip_suffix('\n') {
            Some(text) => (text, "\n"),
            None => (line, ""),
        };
        // The value of `key: value` or of a list item `- value`.
        let start = text.rfind(": ").map(|at| at + 2).or_else(|| {
            let item = text.trim_start();
            item.starts_with("- ").then(|| text.len() - item.len() + 2)
        });
        match start {
            Some(at) if looks_like_yaml11_timestamp(&text[at..]) => {
                out.push_str(&text[..at]);
                out.push('\'');
                out.push_str(&text[at..]);
                out.push('\'');
            }
            _ => out.push_str(text),
        }
        out.push_str(end);
    }
    out
}

/// `YYYY-MM-DD`, optionally followed by a time: what YAML 1.1 resolves to a
/// timestamp (in the shapes this document can contain).
fn looks_like_yaml11_timestamp(value: &str) -> bool {
    let bytes = value.as_bytes();
    let digits = |range: std::ops::Range<usize>| bytes[range].iter().all(u8::is_ascii_digit);
    bytes.len() >= 10
        && digits(0..4)
        && bytes[4] == b'-'
        && digits(5..7)
        && bytes[7] == b'-'
        && digits(8..10)
        && (bytes.len() == 10
            || (matches!(bytes[10], b'T' | b't')
                && bytes[11..]
                    .iter()
                    .all(|b| b.is_ascii_digit() || matches!(b, b':' | b'.' | b'Z' | b'+' | b'-'))))
}

impl From<ChatError> for poem::Error {
    fn from(err: ChatError) -> Self {
        poem::Error::from_response(error::error_response(&err))
    }
}

/// Refuses request bodies over `max` bytes with 413, whether or not they
/// declare their length (chunked bodies are read up to the limit).
pub async fn limit_body(mut req: poem::Request, max: usize) -> poem::Result<poem::Request> {
    let too_large = || poem::Error::from_status(poem::http::StatusCode::PAYLOAD_TOO_LARGE);
    let declared = req
        .headers()
        .get(poem::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    match declared {
        Some(length) if length > max => Err(too_large()),
        Some(_) => Ok(req),
        None => {
            let body = req
                .take_body()
                .into_bytes_limit(max)
                .await
                .map_err(|err| match err {
                    poem::error::ReadBodyError::PayloadTooLarge => too_large(),
                    other => other.into(),
                })?;
            req.set_body(body);
            Ok(req)
        }
    }
}

/// Every HTTP request (REST, probes, WebSocket upgrades): a `http.request`
/// span that continues an incoming `traceparent`, and the request duration
/// by route. Routes are operation ids or fixed paths, never raw paths (which
/// hold room and user ids); query strings are never recorded (they may hold
/// a token).
pub async fn observe<E: poem::Endpoint>(
    next: E,
    req: poem::Request,
) -> poem::Result<poem::Response> {
    use poem::IntoResponse;
    let started = std::time::Instant::now();
    let method = req.method().clone();
    let fixed_route = fixed_route(req.uri().path());
    let span = tracing::info_span!(
        "http.request",
        http.method = %method,
        http.route = tracing::field::Empty,
        http.status_code = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    let traceparent = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok());
    crate::telemetry::adopt_traceparent(&span, traceparent);
    crate::telemetry::record_trace_id(&span);
    let response = next
        .call(req)
        .instrument(span.clone())
        .await
        .map(IntoResponse::into_response);
    let (status, route) = match &response {
        Ok(resp) => (
            resp.status(),
            resp.data::<poem_openapi::OperationId>().map(|op| op.0),
        ),
        Err(err) => (
            err.status(),
            err.data::<poem_openapi::OperationId>().map(|op| op.0),
        ),
    };
    let route = route.unwrap_or(fixed_route);
    span.record("http.route", route);
    span.record("http.status_code", status.as_u16());
    metrics::histogram!(
        "chat_http_request_duration_seconds",
        "route" => route,
        "method" => method_label(&method),
        "status" => status_label(status.as_u16()),
    )
    .record(started.elapsed().as_secs_f64());
    response
}

/// Routes outside the OpenAPI operations, by their fixed paths.
fn fixed_route(path: &str) -> &'static str {
    match path {
        "/healthz" => "/healthz",
        "/readyz" => "/readyz",
        "/metrics" => "/metrics",
        "/openapi.yaml" | "/openapi.json" => "/openapi",
        "/" | "/index.html" | "/app.js" | "/style.css" | "/favicon.svg" => "/ (web client)",
        "/dev/token" => "/dev/token",
        p if p.starts_with("/ws/chat/") => "/ws/chat/:room_id",
        p if p.starts_with("/docs") => "/docs",
        p if p.starts_with("/api/v1") => "/api/v1 (unmatched)",
        _ => "other",
    }
}

fn method_label(method: &poem::http::Method) -> &'static str {
    match *method {
        poem::http::Method::GET => "GET",
        poem::http::Method::POST => "POST",
        poem::http::Method::PUT => "PUT",
        poem::http::Method::DELETE => "DELETE",
        _ => "other",
    }
}

/// Status codes as labels: the few the service answers, the rest grouped.
fn status_label(status: u16) -> &'static str {
    match status {
        101 => "101",
        200 => "200",
        201 => "201",
        204 => "204",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        409 => "409",
        413 => "413",
        429 => "429",
        500 => "500",
        503 => "503",
        s if s < 400 => "2xx/3xx",
        s if s < 500 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_quoted_for_yaml_1_1_readers() {
        let yaml = "a:\n  example: 2026-11-27T13:00:00.123Z\n  list:\n  - 2026-11-27\n  - created_at: 2026-11-27T13:00:00Z\n  text: 'at 2026'\n  n: 2026\n  id: 2026-11-27-x\n";
        assert_eq!(
            quote_timestamps(yaml),
            "a:\n  example: '2026-11-27T13:00:00.123Z'\n  list:\n  - '2026-11-27'\n  - created_at: '2026-11-27T13:00:00Z'\n  text: 'at 2026'\n  n: 2026\n  id: 2026-11-27-x\n"
        );
    }

    #[test]
    fn the_document_has_no_unquoted_timestamps() {
        let yaml = spec_yaml(&service());
        assert!(yaml.contains("example: '2026-11-27T13:00:00.123Z'"));
        assert!(!yaml.contains(": 2026-"));
    }
}
