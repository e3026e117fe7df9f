//! The cluster bus: Redis Pub/Sub, one channel per room
//! (`{prefix}room:{room_id}`).
//!
//! Publishing costs one `PUBLISH` per event, whatever the number of
//! recipients, on the instance's shared command connection. `publish` only
//! queues the encoded event: one task sends the queue in order, everything
//! that queued during the previous exchange in one pipeline, so an ack
//! never waits for Redis and the events of one instance reach Redis in the
//! order they were published. Receiving uses
//! one dedicated pub/sub connection per instance, subscribed only to the
//! rooms this instance has connections in. A single task owns that
//! connection: it applies watch/unwatch requests in the order the hub made
//! them, forwards events from other instances to the hub, and when the
//! connection drops it reconnects with backoff, subscribes again to every
//! watched room, and then asks the hub to resynchronise from the store —
//! so messages committed while Redis was unreachable still reach every
//! connection, in order, without any client action.
//!
//! Events carry their origin instance; an instance ignores its own (the hub
//! delivered them locally before publishing).

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{Bus, Event, Inbound};
use crate::{
    config::Secret, domain::RoomId, error::ChatError, redis_conn::RedisConn, telemetry::LogThrottle,
};

/// A publish or a subscription change that takes longer fails (and is
/// recovered from the store, or retried on reconnection).
const REDIS_TIMEOUT: Duration = Duration::from_millis(500);
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Events waiting to be published. It fills only while Redis is slower
/// than the events; what does not fit is not published (counted in
/// `chat_bus_publish_errors_total`, and recovered from the store by the
/// instances that notice the gap).
const PUBLISH_QUEUE: usize = 16_384;
/// Most events one pipeline carries.
const PUBLISHES_PER_CALL: usize = 512;
/// At most one warning per this period while publishing fails.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// What travels on a channel: the event and the instance that made it.
/// `origin` is serialized first: see [`own_prefix`].
#[derive(Serialize)]
struct OutEnvelope<'a> {
    origin: &'a str,
    event: &'a Event,
    #[serde(skip_serializing_if = "Option::is_none")]
    traceparent: Option<String>,
}

#[derive(Deserialize)]
struct InEnvelope {
    origin: String,
    event: Event,
    #[serde(default)]
    traceparent: Option<String>,
}

enum Watch {
    /// Subscribe; the sender (if any) is told once Redis confirmed it.
    Start(RoomId, Option<oneshot::Sender<()>>),
    Stop(RoomId),
}

pub struct RedisBus {
    /// The queue of [`publish_queued`].
    outgoing: mpsc::Sender<Outgoing>,
    redis: RedisConn,
    prefix: String,
    instance_id: String,
    watch: mpsc::UnboundedSender<Watch>,
    connected: Arc<AtomicBool>,
}

impl RedisBus {
    /// Starts the subscriber task; events from other instances (and
    /// resynchronisation requests) arrive on `inbound`.
    pub fn start(
        url: &Secret,
        redis: RedisConn,
        prefix: String,
        instance_id: String,
        inbound: mpsc::Sender<Inbound>,
        stop: CancellationToken,
    ) -> anyhow::Result<Self> {
        let client = crate::redis_conn::client(url.expose())?;
        let (watch, requests) = mpsc::unbounded_channel();
        let connected = Arc::new(AtomicBool::new(false));
        let subscriber = Subscriber {
            client,
            prefix: prefix.clone(),
            own_prefix: own_prefix(&instance_id),
            instance_id: instance_id.clone(),
            inbound,
            requests,
            watched: HashSet::new(),
            connected: Arc::clone(&connected),
        };
        tokio::spawn(subscriber.run(stop));
        let (outgoing, queue) = mpsc::channel(PUBLISH_QUEUE);
        tokio::spawn(publish_queued(redis.clone(), queue));
        Ok(Self {
            outgoing,
            redis,
            prefix,
            instance_id,
            watch,
            connected,
        })
    }
}

fn channel(prefix: &str, room: &str) -> String {
    format!("{prefix}room:{room}")
}

/// How every event this instance publishes begins. An instance receives its
/// own events back from each room it watches (one per message it stored);
/// recognising them by their first bytes spares decoding them to throw them
/// away. Anything else is decoded and its origin checked again.
fn own_prefix(instance_id: &str) -> Vec<u8> {
    let origin = serde_json::to_string(instance_id).expect("a string serializes");
    format!("{{\"origin\":{origin},").into_bytes()
}

#[async_trait]
impl Bus for RedisBus {
    /// Queues the event; fails only when the queue is full.
    async fn publish(&self, event: &Event) -> Result<(), ChatError> {
        let payload = serde_json::to_vec(&OutEnvelope {
            origin: &self.instance_id,
            event,
            traceparent: crate::telemetry::current_traceparent(),
        })
        .map_err(|err| ChatError::Internal(err.into()))?;
        let outgoing = Outgoing {
            channel: channel(&self.prefix, event.room_id()),
            payload,
        };
        self.outgoing.try_send(outgoing).map_err(|_| {
            ChatError::Unavailable(anyhow::anyhow!(
                "{PUBLISH_QUEUE} events are waiting for Redis"
            ))
        })
    }

    async fn watch(&self, room: &RoomId) -> Result<(), ChatError> {
        // Wait for Redis to confirm, so that the hub's next read of the
        // store cannot miss a message published meanwhile. While Redis is
        // down the request is only recorded (and the confirmation dropped):
        // the subscriber subscribes and resynchronises on reconnection.
        let (confirmed, confirmation) = oneshot::channel();
        let _ = self.watch.send(Watch::Start(room.clone(), Some(confirmed)));
        let _ = tokio::time::timeout(REDIS_TIMEOUT, confirmation).await;
        Ok(())
    }

    async fn unwatch(&self, room: &RoomId) {
        let _ = self.watch.send(Watch::Stop(room.clone()));
    }

    async fn ping(&self) -> Result<(), ChatError> {
        if !self.connected.load(Ordering::Acquire) {
            return Err(ChatError::Unavailable(anyhow::anyhow!(
                "redis pub/sub not connected"
            )));
        }
        let ping = async {
            let mut conn = self.redis.clone();
            let _: String = redis::cmd("PING").query_async(&mut conn).await?;
            Ok::<_, anyhow::Error>(())
        };
        match tokio::time::timeout(REDIS_TIMEOUT, ping).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(ChatError::Unavailable(err)),
            Err(_) => Err(ChatError::Unavailable(anyhow::anyhow!(
                "redis ping timed out"
            ))),
        }
    }
}

/// An encoded event and its channel, waiting in [`RedisBus`]'s queue.
struct Outgoing {
    channel: String,
    payload: Vec<u8>,
}

/// Publishes the queued events in queue order, one pipeline at a time;
/// stops when the bus is dropped. A pipeline that fails or times out loses
/// its events (the bus is best effort: see the module docs of `bus`).
async fn publish_queued(redis: RedisConn, mut queue: mpsc::Receiver<Outgoing>) {
    let mut events = Vec::with_capacity(PUBLISHES_PER_CALL);
    let warnings = LogThrottle::new(WARN_EVERY);
    while queue.recv_many(&mut events, PUBLISHES_PER_CALL).await > 0 {
        let count = events.len();
        let mut pipeline = redis::pipe();
        for event in events.drain(..) {
            pipeline.publish(event.channel, event.payload).ignore();
        }
        let mut conn = redis.clone();
        let sent = tokio::time::timeout(REDIS_TIMEOUT, pipeline.query_async::<()>(&mut conn)).await;
        let error = match sent {
            Ok(Ok(())) => continue,
            Ok(Err(err)) => anyhow::Error::from(err),
            Err(_) => anyhow::anyhow!("Redis did not answer within {REDIS_TIMEOUT:?}"),
        };
        metrics::counter!("chat_bus_publish_errors_total").increment(count as u64);
        if warnings.allow() {
            tracing::warn!(error = %format!("{error:#}"), events = count, "could not publish events to the bus");
        }
    }
}

/// The task that owns the pub/sub connection.
struct Subscriber {
    client: redis::Client,
    prefix: String,
    instance_id: String,
    /// [`own_prefix`] of `instance_id`.
    own_prefix: Vec<u8>,
    inbound: mpsc::Sender<Inbound>,
    requests: mpsc::UnboundedReceiver<Watch>,
    /// Rooms this instance wants; resubscribed after every reconnection.
    watched: HashSet<RoomId>,
    connected: Arc<AtomicBool>,
}

impl Subscriber {
    async fn run(mut self, stop: CancellationToken) {
        let mut backoff = BACKOFF_FIRST;
        loop {
            match self.session(&stop).await {
                Ended::Stopped => return,
                Ended::Lost {
                    error,
                    was_connected,
                } => {
                    self.connected.store(false, Ordering::Release);
                    if was_connected {
                        backoff = BACKOFF_FIRST;
                        metrics::counter!("chat_bus_reconnects_total").increment(1);
                    }
                    tracing::warn!(error = %error, retry_in = ?backoff, "redis pub/sub unavailable");
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
            // Watch requests made meanwhile are applied by the next session.
            while let Ok(request) = self.requests.try_recv() {
                self.apply_offline(request);
            }
        }
    }

    fn apply_offline(&mut self, request: Watch) {
        match request {
            Watch::Start(room, _) => self.watched.insert(room),
            Watch::Stop(room) => self.watched.remove(&room),
        };
    }

    /// One connection's life: connect, subscribe to everything watched,
    /// resynchronise, then serve until it breaks.
    async fn session(&mut self, stop: &CancellationToken) -> Ended {
        let connect = tokio::time::timeout(REDIS_TIMEOUT * 4, self.client.get_async_pubsub()).await;
        let pubsub = match connect {
            Ok(Ok(pubsub)) => pubsub,
            Ok(Err(err)) => return Ended::lost(err, false),
            Err(_) => return Ended::lost(anyhow::anyhow!("connect timed out"), false),
        };
        let (mut sink, mut stream) = pubsub.split();
        let channels: Vec<String> = self
            .watched
            .iter()
            .map(|room| channel(&self.prefix, room.as_str()))
            .collect();
        if !channels.is_empty()
            && let Err(err) = sink.subscribe(&channels).await
        {
            return Ended::lost(err, false);
        }
        self.connected.store(true, Ordering::Release);
        if !channels.is_empty() {
            // Rooms were watched while we were not subscribed: what was
            // published meanwhile is in the store. Subscribed first, then
            // resync, so nothing can fall in between.
            tracing::info!(
                rooms = channels.len(),
                "redis pub/sub connected; resynchronising"
            );
            let _ = self.inbound.send(Inbound::Resync).await;
        }
        loop {
            tokio::select! {
                () = stop.cancelled() => return Ended::Stopped,
                request = self.requests.recv() => {
                    let Some(request) = request else { return Ended::Stopped };
                    let result = match request {
                        Watch::Start(room, confirmed) => {
                            let result = if self.watched.insert(room.clone()) {
                                sink.subscribe(channel(&self.prefix, room.as_str())).await
                            } else {
                                Ok(())
                            };
                            if result.is_ok() && let Some(confirmed) = confirmed {
                                let _ = confirmed.send(());
                            }
                            result
                        }
                        Watch::Stop(room) if self.watched.remove(&room) => {
                            sink.unsubscribe(channel(&self.prefix, room.as_str())).await
                        }
                        Watch::Stop(_) => Ok(()),
                    };
                    if let Err(err) = result {
                        return Ended::lost(err, true);
                    }
                }
                message = stream.next() => {
                    let Some(message) = message else {
                        return Ended::lost(anyhow::anyhow!("connection closed"), true);
                    };
                    self.forward(message.get_payload_bytes()).await;
                }
            }
        }
    }

    async fn forward(&self, payload: &[u8]) {
        if payload.starts_with(&self.own_prefix) {
            return; // delivered locally before it was published
        }
        let envelope: InEnvelope = match serde_json::from_slice(payload) {
            Ok(envelope) => envelope,
            Err(err) => {
                tracing::warn!(error = %err, "undecodable bus event dropped");
                return;
            }
        };
        if envelope.origin == self.instance_id {
            return; // delivered locally before it was published
        }
        // Waiting here (rather than dropping) pushes back on Redis; a
        // connection that falls too far behind is cut by Redis and then
        // recovered by the resync.
        let inbound = Inbound::Event {
            event: Box::new(envelope.event),
            traceparent: envelope.traceparent,
        };
        let _ = self.inbound.send(inbound).await;
    }
}

enum Ended {
    Stopped,
    /// The connection failed; `was_connected` if it had been up (so the
    /// next one is a reconnection that must resynchronise).
    Lost {
        error: anyhow::Error,
        was_connected: bool,
    },
}

impl Ended {
    fn lost(error: impl Into<anyhow::Error>, was_connected: bool) -> Self {
        Self::Lost {
            error: error.into(),
            was_connected,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        bus::{WireMessage, WireUser},
        testing::{key_prefix, new_message, redis_at, redis_connection, redis_url, silent_redis},
    };

    fn bus(
        url: &str,
        redis: RedisConn,
        prefix: &str,
        id: &str,
    ) -> (RedisBus, mpsc::Receiver<Inbound>) {
        let (inbound, events) = mpsc::channel(1024);
        let bus = RedisBus::start(
            &Secret::new(url),
            redis,
            prefix.to_owned(),
            id.to_owned(),
            inbound,
            CancellationToken::new(),
        )
        .expect("a bus");
        (bus, events)
    }

    fn message(seq: u64) -> Event {
        let stored = new_message("lobby", "alice", &format!("#{seq}"), None).stored(seq);
        Event::Message(WireMessage::from(&stored))
    }

    /// A send's ack waits for the announce: with Redis hung, publishing
    /// must still return at once (the event waits in the queue).
    #[tokio::test]
    async fn publishing_does_not_wait_for_a_hung_redis() {
        let (url, silent) = silent_redis().await;
        let (bus, _events) = bus(&url, redis_at(&url), &key_prefix(), "pod-1");
        let started = std::time::Instant::now();
        for seq in 1..=100 {
            bus.publish(&message(seq)).await.expect("queued");
        }
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "took {:?}",
            started.elapsed()
        );
        silent.abort();
    }

    /// Events published by one instance reach another in publish order,
    /// also when many are queued at once.
    #[tokio::test]
    async fn another_instance_receives_the_events_in_publish_order() {
        let (url, prefix) = (redis_url(), key_prefix());
        let (sender, _own) = bus(&url, redis_connection().await, &prefix, "pod-1");
        let (receiver, mut events) = bus(&url, redis_connection().await, &prefix, "pod-2");
        receiver
            .watch(&RoomId::parse("lobby").unwrap())
            .await
            .unwrap();
        for seq in 1..=2_000 {
            sender.publish(&message(seq)).await.expect("queued");
        }
        let mut expected = 1;
        while expected <= 2_000 {
            let inbound = tokio::time::timeout(Duration::from_secs(10), events.recv())
                .await
                .expect("the next event within 10 s")
                .expect("the bus is running");
            if let Inbound::Event { event, .. } = inbound {
                let Event::Message(message) = *event else {
                    panic!("unexpected {event:?}");
                };
                assert_eq!(message.seq, expected);
                expected += 1;
            }
        }
    }

    fn published_by(instance_id: &str) -> Vec<u8> {
        let event = Event::Typing {
            room_id: "lobby".to_owned(),
            user: WireUser {
                id: "alice".to_owned(),
                name: "Alice".to_owned(),
            },
        };
        serde_json::to_vec(&OutEnvelope {
            origin: instance_id,
            event: &event,
            traceparent: None,
        })
        .unwrap()
    }

    #[test]
    fn an_instance_recognises_its_own_events_and_only_those() {
        let mine = own_prefix("pod-1");
        assert!(published_by("pod-1").starts_with(&mine));
        for other in ["pod-10", "pod-", "pod-2", "POD-1"] {
            assert!(!published_by(other).starts_with(&mine), "{other}");
        }
        let decoded: InEnvelope = serde_json::from_slice(&published_by("pod-1")).unwrap();
        assert_eq!(decoded.origin, "pod-1");
    }
}
