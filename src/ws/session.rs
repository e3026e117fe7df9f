//! One WebSocket connection, from `ready` to close.
//!
//! A session is a single task that owns its socket. Its loop waits, in this
//! order of priority, for: a close request (revoked 4003, too slow 4008),
//! server shutdown (1012), token expiry (4001), idle timeout, a frame queued
//! by the hub, the ping timer, and the next client frame. A client frame,
//! with the text frames that arrived behind it, is handled to the end (a
//! send is stored and acked) before the loop looks at anything else, which
//! is what lets shutdown finish in-flight sends. Sends that arrived together
//! (a client sending faster than its acks come back) are stored together,
//! in their order, so a fast sender waits for one commit, not one per send.
//!
//! Frames from the hub wait in a bounded queue; the hub closes the
//! connection (4008) when the queue is full instead of buffering without
//! limit. A write that stalls past the write timeout closes it too. While
//! the loop is parked with nothing to write, the hub writes a frame to the
//! socket itself instead of queueing it and waking the task (see
//! `outbox.rs`); the socket is shared for that, behind a lock that each
//! use takes and lets go within one poll.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Wake, Waker},
    time::Duration,
};

use futures_util::{FutureExt, Sink, StreamExt, task::AtomicWaker};
use poem::Upgraded;
use tokio::{
    io::AsyncWrite,
    time::{Instant, sleep_until, timeout},
};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        self, Message as WsMessage, Utf8Bytes,
        error::CapacityError,
        protocol::{CloseFrame, frame::coding::CloseCode},
    },
};
use tracing::Instrument;

use super::io::FrameIo;
use crate::{
    app::AppState,
    bus::WireUser,
    chat::{Outgoing, Transport},
    domain::{Caller, ClientId, Room, User},
    error::ChatError,
    hub::{CloseReason, Closer, Connection},
    outbox::{Outbox, WriteNow, Writer},
    protocol::{ClientFrame, RoomView, ServerFrame, format_time},
    store::Page,
};

pub type Socket = WebSocketStream<FrameIo<Upgraded>>;

/// A session's socket, shared with the hub's direct writes.
pub struct Shared(Mutex<Socket>);

impl Shared {
    /// Held within one poll, never across an await. (A panic while it is
    /// held ends the session; what it left is still a socket to close.)
    fn lock(&self) -> MutexGuard<'_, Socket> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Writer for Shared {
    fn write_now(&self, payloads: &mut dyn Iterator<Item = &[u8]>) -> WriteNow {
        // Busy: the session is using the socket (on another worker).
        let Ok(mut socket) = self.0.try_lock() else {
            return WriteNow::Busy;
        };
        let io = socket.get_mut();
        if io.owes() {
            // What the session left unwritten goes first, by its flush.
            return WriteNow::Busy;
        }
        // No waker of ours to leave with the socket: whatever is left is
        // the session's to flush, and its flush registers its own. Outside
        // tokio's budget: it counts the pusher's I/O, and a fan-out to a
        // room of 500 would spend it on the first 128 connections and leave
        // the rest to their sessions.
        let mut write = std::pin::pin!(tokio::task::unconstrained(std::future::poll_fn(|cx| {
            Poll::Ready(io.write_texts(payloads, cx))
        })));
        match write.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(true) => WriteNow::Done,
            Poll::Ready(false) | Poll::Pending => WriteNow::Owed,
        }
    }
}

/// A close code as a metrics label (a fixed set).
fn close_label(code: u16) -> &'static str {
    match code {
        close::INVALID_DATA => "1007",
        close::POLICY => "1008",
        close::TOO_BIG => "1009",
        close::RESTART => "1012",
        close::TRY_AGAIN => "1013",
        close::TOKEN_EXPIRED => "4001",
        4003 => "4003",
        close::TOO_SLOW => "4008",
        close::ABUSE => "4029",
        _ => "other",
    }
}

/// Close codes of the contract.
mod close {
    pub const INVALID_DATA: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const RESTART: u16 = 1012;
    pub const TRY_AGAIN: u16 = 1013;
    pub const TOKEN_EXPIRED: u16 = 4001;
    pub const TOO_SLOW: u16 = 4008;
    pub const ABUSE: u16 = 4029;
}

/// The most queued frames written with one flush.
const FRAMES_PER_FLUSH: usize = 64;

/// The most client text frames read and handled together (their sends are
/// stored in one transaction).
const TEXTS_PER_TURN: usize = 32;

/// The window of the frame flood limit (`frame_flood_limit` frames per
/// window, far above what the send limit lets through, so only floods trip it).
const FRAME_FLOOD_WINDOW: Duration = Duration::from_secs(10);

/// A connection between its upgrade and its end. Boxed for its whole life:
/// the task then holds a pointer, not the socket and the caller, across
/// each of its waits. (Every idle connection holds one: its socket is in an
/// allocation of its own, shared with the hub, and what is needed only at
/// the start and the end, such as its presence key, is made then.)
pub struct Session {
    state: AppState,
    socket: Arc<Shared>,
    caller: Caller,
    /// The user as they joined (a refresh may rename them).
    user: User,
    room: Room,
    conn: Arc<Connection>,
}

impl Session {
    pub fn new(state: AppState, socket: Socket, caller: Caller, room: Room) -> Box<Self> {
        let id = state.next_connection_id();
        let socket = Arc::new(Shared(Mutex::new(socket)));
        let conn = Arc::new(Connection {
            id,
            user_id: caller.id().clone(),
            outbox: Outbox::with_writer(
                state.config.outbound_queue,
                Arc::clone(&socket) as Arc<dyn Writer>,
            ),
            closer: Closer::default(),
        });
        Box::new(Self {
            user: caller.user.clone(),
            state,
            socket,
            caller,
            room,
            conn,
        })
    }
}

pub async fn run(mut session: Box<Session>, since: Option<u64>) {
    metrics::gauge!("chat_connections").increment(1.0);
    metrics::counter!("chat_connections_total").increment(1);
    let end = match Box::pin(session.join()).await {
        Ok(delivered) => session.serve(delivered, since).await,
        Err(err) => {
            tracing::warn!(error = %err, "could not register a connection");
            End::Close(close::TRY_AGAIN, "try again later")
        }
    };
    // The connection is gone for the room before its socket finishes
    // closing (which may linger behind a slow peer).
    session.conn.outbox.close();
    Box::pin(session.leave()).await;
    metrics::gauge!("chat_connections").decrement(1.0);
    if let End::Close(code, reason) = end {
        if code == close::TOO_SLOW {
            metrics::counter!("chat_slow_consumer_closes_total").increment(1);
        }
        metrics::counter!("chat_connection_closes_total", "code" => close_label(code)).increment(1);
        Box::pin(close_socket(&session.socket, code, reason)).await;
    }
}

/// Why the loop ended.
/// What woke the session's loop.
enum Event {
    Closed(CloseReason),
    Cancelled,
    Timer,
    Outbox,
    Incoming(Option<Result<WsMessage, tungstenite::Error>>),
}

/// The waker the session's rarely ready futures are polled with: it marks
/// them as worth polling, then wakes the task. The flag starts set.
struct RareWakes {
    flag: Arc<RareFlag>,
    waker: Waker,
}

struct RareFlag {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for RareFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl RareWakes {
    fn new() -> Self {
        let flag = Arc::new(RareFlag {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(Arc::clone(&flag));
        Self { flag, waker }
    }

    /// The waker to poll the rare futures with, if one of them woke (or
    /// [`Self::rearm`] was called) since they were last polled.
    fn take(&self, cx: &Context<'_>) -> Option<&Waker> {
        self.flag.task.register(cx.waker());
        self.flag
            .woken
            .swap(false, Ordering::AcqRel)
            .then_some(&self.waker)
    }

    fn rearm(&self) {
        self.flag.woken.store(true, Ordering::Release);
    }
}

enum End {
    /// Close the socket with this code.
    Close(u16, &'static str),
    /// The socket is gone or stuck: just drop it.
    Drop,
}

impl Drop for Session {
    /// However the session ends (a panic, its task aborted), the hub stops
    /// writing to its socket: the next frame finds the outbox closed and
    /// drops the connection from its room.
    fn drop(&mut self) {
        self.conn.outbox.close();
    }
}

impl Session {
    /// This connection in presence, shared by every instance.
    fn key(&self) -> String {
        format!("{}:{}", self.state.instance_id, self.conn.id)
    }

    /// Presence first, so the connection does not receive its own `join`.
    /// A presence failure (Redis down) costs the `join` event, not the
    /// connection: the backend restores this instance's entries later.
    /// Returns the room's last delivered seq.
    async fn join(&mut self) -> Result<u64, ChatError> {
        let chat = &self.state.chat;
        chat.store.remember_user(&self.user).await?;
        if let Err(err) = chat.connected(&self.room.id, &self.user, &self.key()).await {
            tracing::warn!(error = %err, "could not record presence");
        }
        chat.hub.join(&self.room.id, Arc::clone(&self.conn)).await
    }

    async fn leave(&mut self) {
        let chat = &self.state.chat;
        chat.hub.leave(&self.room.id, self.conn.id);
        chat.disconnected(&self.room.id, &self.user, &self.key())
            .await;
    }

    async fn serve(&mut self, delivered: u64, since: Option<u64>) -> End {
        // Boxed, like every rarely-live step below: a task is as large as
        // its largest state, and most connections spend their life idle in
        // `run_loop`, not in the replay or a send.
        match Box::pin(self.start(delivered, since)).await {
            Ok(()) => self.run_loop().await,
            Err(end) => end,
        }
    }

    /// `ready`, then the replay of what the client missed. Live frames wait
    /// in the queue meanwhile: they all have seqs above `delivered`, and the
    /// replay stops at `delivered`, so nothing is sent twice or out of order.
    async fn start(&mut self, delivered: u64, since: Option<u64>) -> Result<(), End> {
        let chat = &self.state.chat;
        let presence: Vec<WireUser> = match chat.presence.list(&self.room.id).await {
            Ok(users) => users.iter().map(WireUser::from).collect(),
            Err(err) => {
                tracing::warn!(error = %err, "could not read presence");
                Vec::new()
            }
        };
        let (replay, resumed) = match since {
            Some(since) if since < delivered => {
                let limit = chat.replay_limit;
                let missing = delivered - since;
                let result = if missing > u64::from(limit) {
                    chat.store
                        .history(
                            &self.room.id,
                            Page::Newest {
                                before: Some(delivered + 1),
                            },
                            limit,
                        )
                        .await
                        .map(|mut page| {
                            page.reverse();
                            (page, false)
                        })
                } else {
                    chat.store
                        .history(
                            &self.room.id,
                            Page::Oldest {
                                after: since,
                                before: Some(delivered + 1),
                            },
                            limit,
                        )
                        .await
                        .map(|page| (page, true))
                };
                result.map_err(|err| {
                    tracing::warn!(error = %err, "could not read the replay");
                    End::Close(
                        close::TRY_AGAIN,
                        "history unavailable, reconnect with since",
                    )
                })?
            }
            Some(_) => (Vec::new(), true),
            None => (Vec::new(), false),
        };
        let user = WireUser::from(&self.caller.user);
        let ready = ServerFrame::Ready {
            room: RoomView::from(&self.room),
            user: &user,
            last_seq: delivered,
            resumed: since.map(|_| resumed),
            presence: &presence,
        };
        let frames =
            std::iter::once(Utf8Bytes::from(ready.to_json())).chain(replay.iter().map(|message| {
                let wire = crate::bus::WireMessage::from(message);
                Utf8Bytes::from(ServerFrame::for_message(&wire).to_json())
            }));
        write_all(&self.socket, self.state.config.write_timeout, frames).await
    }

    async fn run_loop(&mut self) -> End {
        // Handles, not copies: this future is what an idle connection costs.
        let state = self.state.clone();
        let config = &state.config;
        let conn = Arc::clone(&self.conn);
        let mut last_heard = Instant::now();
        let mut next_ping = state.pings.due(last_heard);
        let mut flood = FloodGuard::new(config.frame_flood_limit);
        // The futures below live across iterations: re-creating them per
        // frame would register (and unregister) timers and waiters for
        // every frame delivered. One timer serves the three deadlines (token
        // expiry, idle timeout, next ping): it fires at the earliest, and
        // each is checked then, so deadlines that only move later (idle,
        // after each client frame) cost nothing until it fires.
        let closed = conn.closer.closed();
        let cancelled = state.shutdown.cancelled();
        let timer = sleep_until(
            next_ping
                .min(last_heard + config.idle_timeout)
                .min(self.expiry_deadline()),
        );
        tokio::pin!(closed, cancelled, timer);
        let rare = RareWakes::new();
        // A client frame read after a run of text frames, handled next
        // (boxed: this future is what an idle connection costs, and a
        // frame's result is large).
        let mut stashed: Option<Box<Option<Result<WsMessage, tungstenite::Error>>>> = None;
        loop {
            // In priority order: a close request, shutdown, the timer,
            // queued frames, the next client frame. Everything but the queue
            // is polled only after one of its own wakers fired (or it was
            // just ready), so the wake for each delivery, nearly every wake
            // of a busy connection, does not also poll the socket's read
            // path, the timer and two waiters.
            let event = std::future::poll_fn(|cx| {
                let Some(waker) = rare.take(cx) else {
                    return conn.outbox.poll_park(cx).map(|()| Event::Outbox);
                };
                let mut rare_cx = Context::from_waker(waker);
                let event = if let Poll::Ready(reason) = closed.as_mut().poll(&mut rare_cx) {
                    Event::Closed(reason)
                } else if cancelled.as_mut().poll(&mut rare_cx).is_ready() {
                    Event::Cancelled
                } else if timer.as_mut().poll(&mut rare_cx).is_ready() {
                    Event::Timer
                } else if conn.outbox.poll_park(cx).is_ready() {
                    Event::Outbox
                } else if let Some(incoming) = stashed.take() {
                    Event::Incoming(*incoming)
                } else if let Poll::Ready(incoming) =
                    self.socket.lock().poll_next_unpin(&mut rare_cx)
                {
                    Event::Incoming(incoming)
                } else {
                    // Each of them now holds the rare waker.
                    return Poll::Pending;
                };
                // Not all of them were polled, or the one that was ready
                // may be ready again at once: look at them all next time.
                rare.rearm();
                // Busy now: the hub queues for us again.
                conn.outbox.unpark();
                Poll::Ready(event)
            })
            .await;
            match event {
                Event::Closed(reason) => return End::Close(reason.code(), reason.text()),
                Event::Cancelled => return End::Close(close::RESTART, "server restarting"),
                Event::Timer => {
                    if self.token_expired() {
                        return End::Close(close::TOKEN_EXPIRED, "token expired");
                    }
                    let now = Instant::now();
                    let idle_deadline = last_heard + config.idle_timeout;
                    if idle_deadline <= now {
                        return End::Close(close::POLICY, "idle timeout");
                    }
                    if next_ping <= now {
                        if let Err(end) =
                            Box::pin(self.send_raw(WsMessage::Ping(Default::default()))).await
                        {
                            return end;
                        }
                        next_ping = state.pings.due(now);
                    }
                    timer
                        .as_mut()
                        .reset(next_ping.min(idle_deadline).min(self.expiry_deadline()));
                }
                Event::Outbox => {
                    if let Err(end) = self.write_backlog().await {
                        return end;
                    }
                }
                Event::Incoming(incoming) => {
                    let message = match incoming {
                        None => return End::Drop,
                        Some(Ok(message)) => message,
                        Some(Err(tungstenite::Error::Capacity(
                            CapacityError::MessageTooLong { .. },
                        ))) => return End::Close(close::TOO_BIG, "frame too large"),
                        // RFC 6455 §8.1: a text frame that is not UTF-8 fails
                        // the connection; 1007 tells the client why.
                        Some(Err(tungstenite::Error::Utf8(_))) => {
                            return End::Close(close::INVALID_DATA, "text frame is not UTF-8");
                        }
                        Some(Err(err)) => {
                            tracing::debug!(error = %err, "socket error");
                            return End::Drop;
                        }
                    };
                    last_heard = Instant::now();
                    if !flood.allow(last_heard) {
                        return End::Close(close::ABUSE, "too many frames");
                    }
                    let expires_at = self.caller.expires_at;
                    let handled = match message {
                        WsMessage::Text(text) => {
                            // The text frames that arrived with it are
                            // handled with it; anything else waits its turn.
                            let mut texts = vec![text];
                            while texts.len() < TEXTS_PER_TURN {
                                let next = self.socket.lock().next().now_or_never();
                                let Some(next) = next else {
                                    break;
                                };
                                if let Some(Ok(WsMessage::Text(text))) = next {
                                    if !flood.allow(last_heard) {
                                        return End::Close(close::ABUSE, "too many frames");
                                    }
                                    texts.push(text);
                                } else {
                                    stashed = Some(Box::new(next));
                                    break;
                                }
                            }
                            Box::pin(self.handle_texts(texts)).await
                        }
                        WsMessage::Binary(_) => {
                            let err = ChatError::BadRequest(
                                "binary frames are not accepted; send JSON text".into(),
                            );
                            Box::pin(self.send_error(&err, None)).await
                        }
                        // tungstenite answers pings and close frames itself;
                        // a pong leaves at once.
                        WsMessage::Close(_) => return End::Drop,
                        WsMessage::Ping(_) => {
                            Box::pin(flush_owed(&self.socket, config.write_timeout)).await
                        }
                        WsMessage::Pong(_) | WsMessage::Frame(_) => Ok(()),
                    };
                    if let Err(end) = handled {
                        return end;
                    }
                    if self.caller.expires_at != expires_at {
                        // A refresh: the new token may also expire sooner.
                        let deadline = timer.deadline().min(self.expiry_deadline());
                        timer.as_mut().reset(deadline);
                    }
                }
            }
        }
    }

    /// The token's end on the wall clock: `exp` plus leeway.
    fn token_end(&self) -> Option<time::OffsetDateTime> {
        let leeway = time::Duration::try_from(self.state.keys.leeway()).ok()?;
        self.caller.expires_at.checked_add(leeway)
    }

    /// Whether the token is past its end (by the wall clock).
    fn token_expired(&self) -> bool {
        self.token_end()
            .is_some_and(|end| time::OffsetDateTime::now_utc() >= end)
    }

    /// When the connection must close for its token, on the timer's clock.
    fn expiry_deadline(&self) -> Instant {
        const FAR: Duration = Duration::from_secs(365 * 24 * 3600);
        let left = match self.token_end() {
            Some(end) => {
                Duration::try_from(end - time::OffsetDateTime::now_utc()).unwrap_or(Duration::ZERO)
            }
            None => FAR,
        };
        Instant::now() + left.min(FAR)
    }

    /// Text frames read together, in order: each run of sends among them
    /// is stored in one go.
    async fn handle_texts(&mut self, texts: Vec<Utf8Bytes>) -> Result<(), End> {
        let mut run = Vec::new();
        for text in &texts {
            match ClientFrame::parse(text.as_str()) {
                Ok(ClientFrame::Message { body, client_id }) => run.push((body, client_id)),
                other => {
                    if !run.is_empty() {
                        self.send_run(std::mem::take(&mut run)).await?;
                    }
                    match other {
                        Ok(frame) => self.handle_frame(frame).await?,
                        Err(bad) => {
                            self.send_error(&bad.error, bad.client_id.as_deref())
                                .await?
                        }
                    }
                }
            }
        }
        if run.is_empty() {
            Ok(())
        } else {
            self.send_run(run).await
        }
    }

    /// Sends that arrived together: stored together in their order, each
    /// answered (ack or error) in that order.
    async fn send_run(&mut self, run: Vec<(String, Option<ClientId>)>) -> Result<(), End> {
        // Each run of sends is a trace of its own (a connection may live
        // for hours), linked to the connection's span.
        let span = tracing::info_span!(
            parent: None,
            "chat.send",
            transport = "ws",
            chat.room_id = %self.room.id,
            chat.messages = run.len(),
            trace_id = tracing::field::Empty,
        );
        span.follows_from(tracing::Span::current());
        crate::telemetry::record_trace_id(&span);
        let (bodies, client_ids): (Vec<String>, Vec<Option<ClientId>>) = run.into_iter().unzip();
        let echoes: Vec<Option<String>> = client_ids
            .iter()
            .map(|c| c.as_ref().map(|c| c.as_str().to_owned()))
            .collect();
        let outgoing = bodies
            .iter()
            .zip(client_ids)
            .map(|(body, client_id)| Outgoing { body, client_id })
            .collect();
        // While the store works on these sends, the hub keeps filling our
        // queue. Those frames go out after the answers (as they always
        // have), but they are taken off the queue meanwhile, up to another
        // queue's worth: a client that reads well must not be closed as too
        // slow (4008) because the database was slow for its own send — e.g.
        // every sender of a busy room committing at once when the database
        // comes back.
        let outbox = &self.conn.outbox;
        let limit = outbox.capacity();
        let mut held = Vec::new();
        let results = {
            let send = self
                .state
                .chat
                .send_all(&self.caller, &self.room, outgoing, Transport::Ws)
                .instrument(span);
            tokio::pin!(send);
            loop {
                tokio::select! {
                    biased;
                    results = &mut send => break results,
                    () = outbox.ready(), if held.len() < limit => {
                        outbox.take(limit - held.len(), |frame| held.push(frame));
                    }
                }
            }
        };
        // What the send itself queued (the sender's copy of its messages,
        // queued by the hub just before the store's answer came back)
        // leaves in the same write, after the answers: one system call per
        // send, not one for the ack and one for the copy.
        outbox.take(limit.saturating_sub(held.len()), |frame| held.push(frame));
        if !held.is_empty() {
            crate::telemetry::per_message()
                .session_writes
                .record(held.len());
        }
        // The answers, in order, and the frames held meanwhile leave with
        // one flush, answers first.
        let answers = results
            .into_iter()
            .zip(echoes)
            .map(|(result, echo)| match result {
                Ok(sent) => {
                    let m = &sent.message;
                    let ack = ServerFrame::Ack {
                        client_id: m.client_id.as_ref().map(|c| c.as_str()),
                        id: &m.id,
                        seq: m.seq,
                        created_at: format_time(m.created_at),
                    };
                    Utf8Bytes::from(ack.to_json())
                }
                Err(err) => error_frame(&err, echo.as_deref()),
            });
        write_all(
            &self.socket,
            self.state.config.write_timeout,
            answers.chain(held),
        )
        .await
    }

    /// One client frame ([`Self::handle_texts`] gathers sends into runs
    /// and passes the other frames here).
    async fn handle_frame(&mut self, frame: ClientFrame) -> Result<(), End> {
        match frame {
            ClientFrame::Message { body, client_id } => {
                self.send_run(vec![(body, client_id)]).await
            }
            ClientFrame::Typing => match self.state.chat.typing(&self.caller, &self.room).await {
                Ok(()) => Ok(()),
                Err(err) => self.send_error(&err, None).await,
            },
            ClientFrame::Ping => {
                self.write(Utf8Bytes::from(ServerFrame::Pong.to_json()))
                    .await
            }
            ClientFrame::Refresh { token } => match self.state.keys.verify(&token) {
                Ok(fresh) if fresh.id() == self.caller.id() => {
                    // The new token must still open this room: a token
                    // without the role that let the old one in is refused,
                    // and the connection closes when the old one expires.
                    if let Err(err) = self.state.chat.check_access(&fresh, &self.room).await {
                        return self.send_error(&err, None).await;
                    }
                    let expires_at = format_time(fresh.expires_at);
                    self.caller = fresh;
                    self.write(Utf8Bytes::from(
                        ServerFrame::Refreshed { expires_at }.to_json(),
                    ))
                    .await
                }
                Ok(_) => {
                    let err = ChatError::Forbidden("the new token belongs to another user".into());
                    self.send_error(&err, None).await
                }
                Err(err) => self.send_error(&err, None).await,
            },
        }
    }

    async fn send_error(&mut self, err: &ChatError, client_id: Option<&str>) -> Result<(), End> {
        self.write(error_frame(err, client_id)).await
    }

    async fn write(&mut self, frame: Utf8Bytes) -> Result<(), End> {
        write_all(
            &self.socket,
            self.state.config.write_timeout,
            std::iter::once(frame),
        )
        .await
    }

    /// Writes what the hub has queued (up to a bound) with one flush: a
    /// connection with a backlog gets several frames per system call.
    async fn write_backlog(&mut self) -> Result<(), End> {
        let taken = {
            let mut socket = self.socket.lock();
            let io = socket.get_mut();
            self.conn
                .outbox
                .take(FRAMES_PER_FLUSH, |frame| io.push_text(frame.as_bytes()))
        };
        if taken > 0 {
            crate::telemetry::record_backlog_write(taken);
        }
        flush(&self.socket, self.state.config.write_timeout).await
    }

    /// Writes one frame through tungstenite (pings); a peer that does not
    /// take it within the write timeout is too slow.
    async fn send_raw(&mut self, message: WsMessage) -> Result<(), End> {
        match timeout(self.state.config.write_timeout, send(&self.socket, message)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(End::Drop),
            Err(_) => Err(End::Close(close::TOO_SLOW, "too slow")),
        }
    }
}

/// The contract's `error` frame for `err`.
fn error_frame(err: &ChatError, client_id: Option<&str>) -> Utf8Bytes {
    let message = err.client_message();
    let retry_after_ms = err.retry_after().map(|d| d.as_millis().max(1) as u64);
    Utf8Bytes::from(ServerFrame::error(err.code(), &message, retry_after_ms, client_id).to_json())
}

/// Writes text frames with one flush; a peer that does not take them
/// within the write timeout is too slow. The frames go straight into the
/// socket's buffer (see `io.rs`); tungstenite's flush then also sends any
/// control frame it owes (a pong) and hands everything to the socket.
async fn write_all(
    socket: &Shared,
    write_timeout: Duration,
    frames: impl Iterator<Item = Utf8Bytes>,
) -> Result<(), End> {
    {
        let mut socket = socket.lock();
        let io = socket.get_mut();
        for frame in frames {
            io.push_text(frame.as_bytes());
        }
    }
    flush(socket, write_timeout).await
}

/// Sends what is buffered; a peer that does not take it within the write
/// timeout is too slow.
///
/// The buffer is flushed directly, not through tungstenite: it holds every
/// frame tungstenite has written too (it writes each at once into the same
/// buffer, see `socket_config`). Going around it saves a waker registration
/// and two layers of wrappers per delivery. What tungstenite owes but has
/// not written yet (the pong for a client's ping) goes out with
/// [`flush_owed`].
///
/// (Each flush awaits its `timeout` directly: the future of a flush lives in
/// every idle connection's task, and a helper taking the flush future as an
/// argument made it larger.)
async fn flush(socket: &Shared, write_timeout: Duration) -> Result<(), End> {
    let flush = std::future::poll_fn(|cx| Pin::new(socket.lock().get_mut()).poll_flush(cx));
    flushed(timeout(write_timeout, flush).await)
}

/// Has tungstenite write what it owes (a pong, queued when it read the
/// client's ping) and sends it with whatever else is buffered.
async fn flush_owed(socket: &Shared, write_timeout: Duration) -> Result<(), End> {
    let flush = std::future::poll_fn(|cx| Pin::new(&mut *socket.lock()).poll_flush(cx));
    flushed(timeout(write_timeout, flush).await)
}

/// Sends one message through tungstenite and flushes it.
async fn send(socket: &Shared, message: WsMessage) -> Result<(), tungstenite::Error> {
    let mut message = Some(message);
    std::future::poll_fn(|cx| {
        let mut socket = socket.lock();
        let mut socket = Pin::new(&mut *socket);
        if message.is_some() {
            std::task::ready!(socket.as_mut().poll_ready(cx))?;
            if let Some(message) = message.take() {
                socket.as_mut().start_send(message)?;
            }
        }
        socket.poll_flush(cx)
    })
    .await
}

/// What a flush within the write timeout came to.
fn flushed<E>(outcome: Result<Result<(), E>, tokio::time::error::Elapsed>) -> Result<(), End> {
    match outcome {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(End::Drop),
        Err(_) => Err(End::Close(close::TOO_SLOW, "too slow")),
    }
}

/// How long a close frame may wait behind a full socket: a client that was
/// only briefly not reading still learns why it was closed (e.g. 4008).
const CLOSE_LINGER: Duration = Duration::from_secs(5);

async fn close_socket(socket: &Shared, code: u16, reason: &'static str) {
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: Utf8Bytes::from_static(reason),
    };
    let _ = timeout(CLOSE_LINGER, send(socket, WsMessage::Close(Some(frame)))).await;
    // Give the peer a moment to answer the close, then drop the socket.
    let _ = timeout(Duration::from_secs(1), async {
        while let Some(Ok(_)) = std::future::poll_fn(|cx| socket.lock().poll_next_unpin(cx)).await {
        }
    })
    .await;
}

/// Counts a client's frames in fixed windows to spot floods.
struct FloodGuard {
    window_start: Instant,
    count: u32,
    limit: u32,
}

impl FloodGuard {
    fn new(limit: u32) -> Self {
        Self {
            window_start: Instant::now(),
            count: 0,
            limit,
        }
    }

    fn allow(&mut self, now: Instant) -> bool {
        if now.duration_since(self.window_start) >= FRAME_FLOOD_WINDOW {
            self.window_start = now;
            self.count = 0;
        }
        self.count += 1;
        self.count <= self.limit
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// A task waker that counts its wakes.
    struct Counting(AtomicUsize);

    impl Wake for Counting {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn rare_futures_are_polled_first_then_only_after_their_waker_fired() {
        let task = Arc::new(Counting(AtomicUsize::new(0)));
        let task_waker = Waker::from(Arc::clone(&task));
        let cx = Context::from_waker(&task_waker);
        let rare = RareWakes::new();

        let waker = rare.take(&cx).expect("polled on the first pass").clone();
        assert!(
            rare.take(&cx).is_none(),
            "a wake for the queue polls only it"
        );

        waker.wake_by_ref();
        assert_eq!(task.0.load(Ordering::SeqCst), 1, "the task is woken");
        assert!(rare.take(&cx).is_some());
        assert!(rare.take(&cx).is_none());

        rare.rearm();
        assert!(
            rare.take(&cx).is_some(),
            "after an event, all are polled again"
        );
        // A wake between two polls is kept until the next one.
        waker.wake_by_ref();
        waker.wake_by_ref();
        assert!(rare.take(&cx).is_some());
        assert!(rare.take(&cx).is_none());

        // Polled with another task waker: wakes reach that one only.
        let before = task.0.load(Ordering::SeqCst);
        let moved = Arc::new(Counting(AtomicUsize::new(0)));
        let moved_waker = Waker::from(Arc::clone(&moved));
        assert!(rare.take(&Context::from_waker(&moved_waker)).is_none());
        waker.wake_by_ref();
        assert_eq!(
            task.0.load(Ordering::SeqCst),
            before,
            "the old waker is left alone"
        );
        assert_eq!(moved.0.load(Ordering::SeqCst), 1);
        assert!(rare.take(&Context::from_waker(&moved_waker)).is_some());
    }
}
