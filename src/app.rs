//! Start-up and shutdown: builds the backends from the configuration, wires
//! them into one [`AppState`], binds the listener, and runs until told to
//! stop. Tests build the same application on port 0.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use poem::{
    EndpointExt, IntoEndpoint, Route, Server, get,
    listener::{Acceptor, Listener, TcpListener},
};
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    api,
    auth::JwtKeys,
    bus::{Bus, Event, Inbound, WireUser, local::LocalBus, redis::RedisBus},
    chat::{Chat, Limits},
    config::ServeConfig,
    hub::{Coalescing, Hub},
    limiter::{Limiter, memory::MemoryLimiter, redis::RedisLimiter},
    listener::{ChatAcceptor, HeadTimeouts},
    presence::{Presence, memory::MemoryPresence, redis::RedisPresence},
    store::{self, Store, cached::CachedStore, metered::MeteredStore},
    web, ws,
};

/// Everything a request handler needs, cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub config: ServeConfig,
    pub keys: JwtKeys,
    pub chat: Chat,
    /// Cancelled when shutdown begins: sessions close with 1012.
    pub shutdown: CancellationToken,
    /// Cancelled once the service has stopped: background tasks (bus
    /// subscriber, maintenance) end.
    pub background: CancellationToken,
    /// Open WebSocket sessions, awaited on shutdown.
    pub sessions: TaskTracker,
    /// This process, in connection keys shared with other instances.
    pub instance_id: String,
    /// When pings fall due (shared, so they fall due together).
    pub pings: crate::ws::PingGrid,
    next_connection: AtomicU64,
    shutting_down: AtomicBool,
    pub metrics: PrometheusHandle,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    pub fn next_connection_id(&self) -> u64 {
        self.next_connection.fetch_add(1, Ordering::Relaxed)
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Readiness goes false, sessions are told to close (1012), and we wait
    /// for them (their in-flight sends finish first) up to the grace period.
    pub async fn drain(&self) {
        self.shutting_down.store(true, Ordering::Release);
        self.shutdown.cancel();
        self.sessions.close();
        if tokio::time::timeout(self.config.shutdown_grace, self.sessions.wait())
            .await
            .is_err()
        {
            tracing::warn!("shutdown grace period over with sessions still open");
        }
    }
}

/// The process-wide metrics recorder: `metrics` macros need a global one, so
/// every application in the process (several in tests) shares it.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(crate::telemetry::LATENCY_BUCKETS)
                .expect("latency buckets are valid")
                .set_buckets_for_metric(
                    Matcher::Suffix("_batch_size".into()),
                    crate::telemetry::BATCH_BUCKETS,
                )
                .expect("batch buckets are valid")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may be installed already (e.g. by a test
            // harness); ours then only renders what it saw.
            let _ = metrics::set_global_recorder(recorder);
            crate::telemetry::describe_metrics();
            crate::telemetry::record_runtime();
            handle
        })
        .clone()
}

/// The backends, chosen once from the configuration.
pub struct Backends {
    pub store: Arc<dyn Store>,
    pub bus: Arc<dyn Bus>,
    pub presence: Arc<dyn Presence>,
    pub limiter: Arc<dyn Limiter>,
    /// Events from other instances, for the hub (cluster mode).
    pub inbound: Option<mpsc::Receiver<Inbound>>,
}

/// Shorter HMAC secrets are warned about at start-up (RFC 7518 §3.2: a key
/// at least as long as the hash output).
pub const MIN_SECRET_BYTES: usize = 32;

/// Events from the bus waiting for the hub; the bus waits when it is full.
const INBOUND_QUEUE: usize = 4096;

impl Backends {
    /// Embedded without `REDIS_URL`, cluster with it. The store follows the
    /// `DATABASE_URL` scheme either way.
    pub async fn from_config(
        config: &ServeConfig,
        instance_id: &str,
        background: &CancellationToken,
    ) -> anyhow::Result<Self> {
        let store: Arc<dyn Store> = Arc::new(MeteredStore::new(
            store::connect(config.database_url.expose()).await?,
        ));
        let Some(redis_url) = &config.redis_url else {
            return Ok(Self {
                store,
                bus: Arc::new(LocalBus),
                presence: Arc::new(MemoryPresence::default()),
                limiter: Arc::new(MemoryLimiter::default()),
                inbound: None,
            });
        };
        let redis = crate::redis_conn::connect(redis_url.expose())?;
        let prefix = config.redis_key_prefix.clone();
        let (sender, inbound) = mpsc::channel(INBOUND_QUEUE);
        let bus = RedisBus::start(
            redis_url,
            redis.clone(),
            prefix.clone(),
            instance_id.to_owned(),
            sender,
            background.child_token(),
        )?;
        let presence = RedisPresence::new(
            redis.clone(),
            prefix.clone(),
            instance_id.to_owned(),
            config.presence_ttl,
        );
        // Announce this pod before it accepts connections; a Redis that is
        // down now is retried by the maintenance loop.
        if let Err(err) = presence.keep_alive().await {
            tracing::warn!(error = %err, "presence keep-alive failed at start-up");
        }
        Ok(Self {
            store: Arc::new(CachedStore::new(
                store,
                redis.clone(),
                prefix.clone(),
                config.cache_recent_messages,
            )),
            bus: Arc::new(bus),
            presence: Arc::new(presence),
            limiter: Arc::new(RedisLimiter::new(redis, prefix)),
            inbound: Some(inbound),
        })
    }
}

pub struct Application {
    state: AppState,
    acceptor: ChatAcceptor,
    local_addr: SocketAddr,
}

impl Application {
    pub async fn build(config: ServeConfig) -> anyhow::Result<Self> {
        let secret = config.require_secret()?.clone();
        config.check_keepalive()?;
        if secret.expose().len() < MIN_SECRET_BYTES {
            // Not refused: the secret is the Core service's, shared with it.
            tracing::warn!(
                bytes = secret.expose().len(),
                "JWT_SECRET is shorter than {MIN_SECRET_BYTES} bytes: HMAC tokens signed with a \
                 short secret can be brute-forced offline; use at least {MIN_SECRET_BYTES} random bytes"
            );
        }
        let instance_id = uuid::Uuid::now_v7().simple().to_string();
        let background = CancellationToken::new();
        let backends = Backends::from_config(&config, &instance_id, &background).await?;
        if config.migrate_on_start {
            backends.store.migrate().await?;
        }
        let hub = Hub::new(
            Arc::clone(&backends.store),
            Arc::clone(&backends.bus),
            Duration::from_millis(50),
            Coalescing {
                min_connections: config.big_room_connections,
                linger: config.big_room_linger,
                lag: config.big_room_lag,
            },
        );
        let cluster = backends.inbound.is_some();
        if let Some(inbound) = backends.inbound {
            tokio::spawn(pump_inbound(Arc::clone(&hub), inbound));
        }
        let chat = Chat {
            store: backends.store,
            bus: backends.bus,
            presence: backends.presence,
            limiter: backends.limiter,
            hub,
            limits: Limits::from_config(&config),
            max_message_chars: config.max_message_chars,
            replay_limit: config.replay_limit,
        };
        let state = AppState(Arc::new(Inner {
            pings: crate::ws::PingGrid::new(config.ping_interval),
            keys: JwtKeys::new(&secret, &config),
            chat,
            shutdown: CancellationToken::new(),
            background,
            sessions: TaskTracker::new(),
            instance_id,
            next_connection: AtomicU64::new(1),
            shutting_down: AtomicBool::new(false),
            metrics: metrics_handle(),
            config,
        }));
        if cluster {
            tokio::spawn(maintain(state.clone()));
        }
        tokio::spawn(crate::telemetry::watch_loop_lag(state.background.clone()));
        if state.config.dev_tokens {
            tracing::warn!(
                "DEV_TOKENS is on: anyone who can reach this service can mint a token for \
                 any user at POST /dev/token. Never turn it on outside local development."
            );
        }
        let acceptor = ChatAcceptor::new(
            TcpListener::bind(state.config.listen)
                .into_acceptor()
                .await?,
            HeadTimeouts {
                first: state.config.request_header_timeout,
                keep_alive: state.config.keep_alive_timeout,
            },
        );
        let local_addr = acceptor
            .local_addr()
            .first()
            .and_then(|a| a.as_socket_addr().copied())
            .ok_or_else(|| anyhow::anyhow!("listener has no socket address"))?;
        Ok(Self {
            state,
            acceptor,
            local_addr,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn state(&self) -> AppState {
        self.state.clone()
    }

    /// Serves until `shutdown` resolves, then drains and returns.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let state = self.state.clone();
        let background = state.background.clone();
        let grace = state.config.shutdown_grace;
        let routes = routes(state.clone());
        tracing::info!(addr = %self.local_addr, "chat service listening");
        Server::new_with_acceptor(self.acceptor)
            .run_with_graceful_shutdown(
                routes,
                async move {
                    shutdown.await;
                    tracing::info!("shutting down: draining connections");
                    state.drain().await;
                },
                Some(grace),
            )
            .await?;
        background.cancel();
        Ok(())
    }
}

/// Hands events from other instances to the hub.
async fn pump_inbound(hub: Arc<Hub>, mut inbound: mpsc::Receiver<Inbound>) {
    while let Some(item) = inbound.recv().await {
        match item {
            Inbound::Event { event, traceparent } => {
                // The fan-out here continues the sender's trace.
                let span = tracing::info_span!(
                    "hub.fan_out",
                    remote = true,
                    trace_id = tracing::field::Empty
                );
                crate::telemetry::adopt_traceparent(&span, traceparent.as_deref());
                crate::telemetry::record_trace_id(&span);
                span.in_scope(|| hub.dispatch(&event));
            }
            Inbound::Resync => {
                let hub = Arc::clone(&hub);
                tokio::spawn(async move { hub.catch_up().await });
            }
        }
    }
}

/// Cluster housekeeping: keep this pod's presence alive, forget killed
/// pods' connections (announcing their users' `leave`), and periodically
/// compare rooms with the store to recover lost bus events.
async fn maintain(state: AppState) {
    let stop = state.background.clone();
    let mut presence = tokio::time::interval(state.config.presence_ttl / 3);
    let mut resync = tokio::time::interval(state.config.resync_interval);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = presence.tick() => {
                let chat = &state.chat;
                if let Err(err) = chat.presence.keep_alive().await {
                    tracing::warn!(error = %err, "presence keep-alive failed");
                }
                match chat.presence.sweep().await {
                    Ok(gone) => {
                        for (room, user) in gone {
                            chat.announce(Event::Leave {
                                room_id: room.to_string(),
                                user: WireUser::from(&user),
                            })
                            .await;
                        }
                    }
                    Err(err) => tracing::warn!(error = %err, "presence sweep failed"),
                }
            }
            _ = resync.tick() => state.chat.hub.catch_up().await,
        }
    }
}

/// The WebSocket protocol as an AsyncAPI 3 document. Unlike `openapi.yaml`
/// it is written by hand (nothing in the code describes the frames
/// declaratively); `tests/sdk` validates it and checks live frames against it.
const ASYNCAPI_YAML: &str = include_str!("../asyncapi.yaml");

/// Every route the service serves.
pub fn routes(state: AppState) -> impl poem::Endpoint {
    let rest = api::service();
    let spec_yaml = api::spec_yaml(&rest);
    let spec_json = rest.spec();
    let viewer = rest.scalar();
    let max_body = state.config.max_body_bytes;
    web::routes(Route::new())
        .nest(
            "/api/v1",
            rest.into_endpoint()
                .before(move |req| api::limit_body(req, max_body))
                .catch_all_error(api::error::into_response),
        )
        .at("/ws/chat/:room_id", get(ws::upgrade))
        .at("/healthz", get(api::health::healthz))
        .at("/readyz", get(api::health::readyz))
        .at("/metrics", get(api::health::metrics))
        .at(
            "/openapi.yaml",
            get(poem::endpoint::make_sync(move |_| {
                poem::Response::builder()
                    .content_type("application/yaml")
                    .body(spec_yaml.clone())
            })),
        )
        .at(
            "/asyncapi.yaml",
            get(poem::endpoint::make_sync(|_| {
                poem::Response::builder()
                    .content_type("application/yaml")
                    .body(ASYNCAPI_YAML)
            })),
        )
        .at(
            "/openapi.json",
            get(poem::endpoint::make_sync(move |_| {
                poem::Response::builder()
                    .content_type("application/json")
                    .body(spec_json.clone())
            })),
        )
        .nest("/docs", viewer)
        .around(api::observe)
        .data(state)
}
