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
    ) -> Result<Json<RoomList>, ApiError> {
        let caller = caller(&state, &auth, true).await?;
        let rooms = state.chat.rooms_for(&caller).await?;
        Ok(Json(RoomList {
            rooms: rooms.iter().map(ApiRoom::from).collect(),
        }))
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
                    id: body.id,
                    name: body.name,
                    private: body.kind == NewRoomKind::Private,
                    members: body.members.unwrap_or_default(),
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
        /// Room id, `[A-Za-z0-9_.:-]{1,128}`.
        room_id: Path<String>,
    ) -> Result<Json<ApiRoom>, ApiError> {
        let caller = caller(&state, &auth, true).await?;
        let room = state
            .chat
            .open_room(&caller, &self::room_id(&room_id)?, false)
            .await?;
        Ok(Json(ApiRoom::from(&room)))
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
        /// Room id.
        room_id: Path<String>,
    ) -> Result<Json<MemberList>, ApiError> {
        let caller = caller(&state, &auth, true).await?;
        let members = state
            .chat
            .members(&caller, &self::room_id(&room_id)?)
            .await?;
        Ok(Json(MemberList {
            members: members
                .into_iter()
                .map(|m| ApiUser {
                    id: m.id.to_string(),
                    name: m.name,
                })
                .collect(),
        }))
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
        /// Room id.
        room_id: Path<String>,
        /// User id.
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
        /// Room id.
        room_id: Path<String>,
        /// User id.
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
        /// Room id.
        room_id: Path<String>,
        /// Only messages with a smaller `seq`.
        before_seq: Query<Option<u64>>,
        /// Only messages with a larger `seq` (oldest first).
        after_seq: Query<Option<u64>>,
        /// Page size.
        #[oai(validator(minimum(value = "1"), maximum(value = "200")))]
        limit: Query<Option<u32>>,
    ) -> Result<Json<MessagePage>, ApiError> {
        let caller = caller(&state, &auth, true).await?;
        let page = match (after_seq.0, before_seq.0) {
            (Some(after), before) => Page::Oldest { after, before },
            (None, before) => Page::Newest { before },
        };
        let limit = limit.0.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
        let (messages, has_more) = state
            .chat
            .history(&caller, &self::room_id(&room_id)?, page, limit)
            .await?;
        Ok(Json(MessagePage {
            messages: messages.iter().map(ApiMessage::from).collect(),
            has_more,
        }))
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
        /// Room id.
        room_id: Path<String>,
        body: Json<SendMessage>,
    ) -> Result<CreatedOrExisting<ApiMessage>, ApiError> {
        let caller = caller(&state, &auth, false).await?;
        let client_id = body
            .0
            .client_id
            .as_deref()
            .map(ClientId::parse)
            .transpose()?;
        let room = state
            .chat
            .open_room(&caller, &self::room_id(&room_id)?, false)
            .await?;
        state.chat.store.remember_user(&caller.user).await?;
        let sent = state
            .chat
            .send(&caller, &room, &body.0.body, client_id, Transport::Rest)
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
        /// Room id.
        room_id: Path<String>,
        /// Message id.
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
        /// Room id.
        room_id: Path<String>,
    ) -> Result<Json<UserList>, ApiError> {
        let caller = caller(&state, &auth, true).await?;
        let users = state
            .chat
            .presence(&caller, &self::room_id(&room_id)?)
            .await?;
        Ok(Json(UserList {
            users: users
                .into_iter()
                .map(|u| ApiUser {
                    id: u.id.to_string(),
                    name: Some(u.name),
                })
                .collect(),
        }))
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
        /// The other user's id.
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
        .description(
            "REST API of the chat service. Real-time events use the WebSocket at \
             `/ws/chat/{room_id}` (see the protocol reference). Every route takes a JWT \
             from the Core service as `Authorization: Bearer <jwt>`. Errors are \
             `{\"code\", \"message\"}`.",
        )
        .server("/api/v1")
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
