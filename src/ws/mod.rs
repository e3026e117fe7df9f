//! The WebSocket edge: `GET /ws/chat/{room_id}`.
//!
//! Everything that can refuse a connection is checked before the upgrade
//! and answered as plain HTTP with the contract's JSON error, in this order:
//! shutting down (503), connection-attempt rate per IP (429), `Origin` not
//! among `ALLOWED_ORIGINS` (403), room id and query (400), token (401), room
//! existence and access (404/403). Only then is the connection upgraded and
//! handed to a [`session`].

mod io;
mod ping;
pub mod session;

pub use ping::PingGrid;

use poem::{
    Body, IntoResponse, Request, Response, handler,
    http::{HeaderValue, Method, StatusCode, header},
    web::{Data, Path},
};
use serde::Deserialize;
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        handshake::derive_accept_key,
        protocol::{Role, WebSocketConfig},
    },
};

use crate::{
    api::error::error_response,
    app::AppState,
    auth::{SUBPROTOCOL, find_token},
    domain::RoomId,
    error::ChatError,
};

#[derive(Debug, Deserialize)]
struct RawQuery {
    token: Option<String>,
    since: Option<String>,
}

/// The handshake's query string, read.
#[derive(Debug)]
pub struct WsQuery {
    pub token: Option<String>,
    pub since: Option<u64>,
}

/// Reads `token` and `since` from the handshake's query string (400 when
/// malformed). Public for the fuzz target `query_params`.
#[doc(hidden)]
pub fn parse_query(req: &Request) -> Result<WsQuery, ChatError> {
    let raw: RawQuery = req
        .params()
        .map_err(|_| ChatError::BadRequest("malformed query string".into()))?;
    let since = raw
        .since
        .as_deref()
        .map(|s| s.parse::<u64>())
        .transpose()
        .map_err(|_| ChatError::BadRequest("since must be a non-negative integer".into()))?;
    Ok(WsQuery {
        token: raw.token,
        since,
    })
}

#[handler]
pub async fn upgrade(
    req: &Request,
    Path(room_id): Path<String>,
    Data(state): Data<&AppState>,
) -> Response {
    match prepare(req, &room_id, state).await {
        Ok(response) => response,
        Err(err) => {
            let reason = err.code().as_str();
            metrics::counter!("chat_connections_refused_total", "reason" => reason).increment(1);
            error_response(&err)
        }
    }
}

async fn prepare(req: &Request, raw_room: &str, state: &AppState) -> Result<Response, ChatError> {
    if state.is_shutting_down() {
        return Err(ChatError::Unavailable(anyhow::anyhow!("shutting down")));
    }
    let key = websocket_key(req)?;
    state
        .chat
        .count_connection(&client_ip(req, state.config.trust_forwarded_for))
        .await?;

    // Browsers send the page's origin; a page elsewhere holding a user's
    // token must not open sockets with it (when origins are configured).
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .map(|v| v.to_str().unwrap_or("?"));
    if !state.config.origin_allowed(origin) {
        return Err(ChatError::Forbidden("origin not allowed".into()));
    }

    let room_id = RoomId::parse(raw_room)?;
    let query = parse_query(req)?;

    let header = |name| {
        req.headers()
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    let offered = header(header::SEC_WEBSOCKET_PROTOCOL);
    let (_, token) = find_token(
        header(header::AUTHORIZATION),
        offered,
        query.token.as_deref(),
    )
    .ok_or_else(|| ChatError::Unauthorized("missing token".into()))?;
    let caller = state.keys.verify(token)?;
    let room = state.chat.open_room(&caller, &room_id, true).await?;

    let on_upgrade = req
        .take_upgrade()
        .map_err(|_| ChatError::BadRequest("connection cannot be upgraded".into()))?;
    let mut response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(
            header::SEC_WEBSOCKET_ACCEPT,
            derive_accept_key(key.as_bytes()),
        );
    if offered.is_some_and(|list| list.split(',').any(|p| p.trim() == SUBPROTOCOL)) {
        response = response.header(header::SEC_WEBSOCKET_PROTOCOL, SUBPROTOCOL);
    }

    let session_state = state.clone();
    let since = query.since;
    // The connection's whole life is one span, a trace of its own.
    let span = tracing::info_span!(
        parent: None,
        "ws.connection",
        chat.room_id = %room.id,
        chat.room_kind = room.kind.as_str(),
        enduser.id = %caller.id(),
        trace_id = tracing::field::Empty,
    );
    crate::telemetry::record_trace_id(&span);
    // What the task keeps until the upgrade completes: one pointer. Every
    // byte held across an await is held by each idle connection.
    let who = Box::new((caller, room));
    let session = async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(err) => {
                tracing::debug!(error = %err, "upgrade failed");
                return;
            }
        };
        let io = io::FrameIo::new(upgraded);
        let config = socket_config(session_state.config.max_frame_bytes);
        let socket = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
        let (caller, room) = *who;
        let session = session::Session::new(session_state, socket, caller, room);
        session::run(session, since).await;
    };
    state
        .sessions
        .spawn(tracing::Instrument::instrument(session, span));
    Ok(response.body(Body::empty()))
}

/// tungstenite's settings for a session's socket.
fn socket_config(max_frame_bytes: usize) -> WebSocketConfig {
    // A small read chunk: most client frames are tiny, and idle connections
    // are many (a larger frame grows the buffer to fit). tungstenite writes
    // through at once: it only writes control frames, into `FrameIo`, which
    // gathers everything until the session flushes.
    const READ_CHUNK_BYTES: usize = 256;
    WebSocketConfig::default()
        .max_frame_size(Some(max_frame_bytes))
        .max_message_size(Some(max_frame_bytes))
        .read_buffer_size(READ_CHUNK_BYTES)
        .write_buffer_size(0)
}

/// Checks that this is a WebSocket handshake and returns its key.
fn websocket_key(req: &Request) -> Result<String, ChatError> {
    let headers = req.headers();
    let has = |name, value: &str| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case(value)))
    };
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|v| v.to_str().ok());
    match key {
        Some(key)
            if req.method() == Method::GET
                && has(header::UPGRADE, "websocket")
                && has(header::CONNECTION, "upgrade")
                && has(header::SEC_WEBSOCKET_VERSION, "13") =>
        {
            Ok(key.to_owned())
        }
        _ => Err(ChatError::BadRequest(
            "expected a WebSocket upgrade request (version 13)".into(),
        )),
    }
}

/// The client's address: the peer, or with `trust_forwarded_for` the last
/// `X-Forwarded-For` entry (the one our own proxy appended).
pub fn client_ip(req: &Request, trust_forwarded_for: bool) -> String {
    if trust_forwarded_for
        && let Some(ip) = req
            .headers()
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .map(str::trim)
            .filter(|ip| !ip.is_empty())
    {
        return ip.to_owned();
    }
    match req.remote_addr().as_socket_addr() {
        Some(addr) => addr.ip().to_string(),
        None => "unknown".to_owned(),
    }
}

impl IntoResponse for ChatError {
    fn into_response(self) -> Response {
        error_response(&self)
    }
}
